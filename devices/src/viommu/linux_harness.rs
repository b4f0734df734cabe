//! Test support (not a guest path): [`LinuxHarness`] programs a VT-d unit through
//! [`BusDevice`] register writes and tables in guest memory, in the order Linux 7.x
//! intel-iommu does in scalable mode (`drivers/iommu/intel/{dmar.c,iommu.c,pasid.c,
//! cache.c}`), and [`VecGuestMemory`] is a simple in-memory guest RAM for it.
//!
//! It lives outside `cfg(test)` so that the VMM's tests can drive a [`super::Vtd`] wired to a
//! real bridge (the soft path) with the same sequence. Every step that Linux submits with
//! `qi_submit_sync` is one doorbell here: its descriptors plus an invalidation wait with a
//! status write, checked after the IQT write (the model completes the queue synchronously).
//!
//! Sequence (Linux 7.x, caching mode):
//! - boot: fault event MSI set up and unmasked; QI enabled (IQT=0, IQA with DW=1 and QS=1,
//!   GCMD.QIE); root table allocated and latched (RTADDR with TTM=01b, GCMD.SRTP); global
//!   context-cache, global PASID-cache and global IOTLB invalidations, one doorbell each;
//!   GCMD.TE;
//! - attach (`attach_pasid` for PASID > 0): the scalable-mode context entry (PASID directory, PDTS, PASIDE/DTE if
//!   supported) made present, then a device-selective context-cache and a domain-selective
//!   IOTLB invalidation of domain 0; then the PASID entry of RID_PASID 0 (second stage, or
//!   first stage) made present, then a PASID-selective PASID-cache and a PASID-based IOTLB
//!   invalidation (`pasid_flush_caches`);
//! - map: leaf entries written, then (second stage only: Linux flushes nothing after a map
//!   of a first-stage domain) one page-selective IOTLB invalidation covering the range
//!   (`calculate_psi_aligned_address`), domain-selective beyond MAMV;
//! - unmap: leaf entries cleared, then the same invalidation (PASID-based for first stage),
//!   plus the device TLB when ATS is on;
//! - teardown: PASID entry cleared (FPD kept), PASID-selective PASID-cache invalidation,
//!   IOTLB invalidation of the domain, device TLB; then the context entry cleared, a
//!   device-selective context-cache invalidation and the device TLB.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::bus::BusDevice;
use crate::pci::{MsiMessage, PciBdf};

use super::caps::{cap_bits, ecap_bits, MAMV};
use super::mem::{GuestMemoryAccess, GuestMemoryError};
use super::regs::{self, fsts, gcmd, iqa, rtaddr};

/// Guest RAM as one vector at `[base, base + len)`.
#[derive(Debug)]
pub struct VecGuestMemory {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl VecGuestMemory {
    /// `len` zeroed bytes at `base`.
    pub fn new(base: u64, len: usize) -> Self {
        Self {
            base,
            bytes: Mutex::new(vec![0; len]),
        }
    }

    /// The guest address range.
    pub fn range(&self) -> Range<u64> {
        let len = self.lock().len() as u64;
        self.base..self.base + len
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn offset(&self, gpa: u64, len: usize, total: usize) -> Result<usize, GuestMemoryError> {
        let err = GuestMemoryError { gpa, len };
        let off = gpa.checked_sub(self.base).ok_or(err)?;
        let end = off.checked_add(len as u64).ok_or(err)?;
        if end > total as u64 {
            return Err(err);
        }
        Ok(off as usize)
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, GuestMemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), GuestMemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, GuestMemoryError> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

impl GuestMemoryAccess for VecGuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        let bytes = self.lock();
        let off = self.offset(gpa, buf.len(), bytes.len())?;
        let src = bytes.get(off..off + buf.len()).ok_or(GuestMemoryError {
            gpa,
            len: buf.len(),
        })?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        let mut bytes = self.lock();
        let total = bytes.len();
        let off = self.offset(gpa, buf.len(), total)?;
        let dst = bytes
            .get_mut(off..off + buf.len())
            .ok_or(GuestMemoryError {
                gpa,
                len: buf.len(),
            })?;
        dst.copy_from_slice(buf);
        Ok(())
    }
}

/// Invalidation queue descriptors as Linux builds them (`include/.../iommu.h` `QI_*`).
pub mod desc {
    /// Context-cache invalidation, global.
    pub fn context_global() -> [u64; 4] {
        [1 | (1 << 4), 0, 0, 0]
    }

    /// Context-cache invalidation, domain-selective.
    pub fn context_domain(did: u16) -> [u64; 4] {
        [1 | (2 << 4) | (u64::from(did) << 16), 0, 0, 0]
    }

    /// Context-cache invalidation, device-selective (`fm`: function mask).
    pub fn context_device(did: u16, sid: u16, fm: u8) -> [u64; 4] {
        [
            1 | (3 << 4)
                | (u64::from(did) << 16)
                | (u64::from(sid) << 32)
                | (u64::from(fm & 3) << 48),
            0,
            0,
            0,
        ]
    }

    /// IOTLB invalidation, global (with drain read/write, as Linux sets them).
    pub fn iotlb_global() -> [u64; 4] {
        [2 | (1 << 4) | (1 << 6) | (1 << 7), 0, 0, 0]
    }

    /// IOTLB invalidation, domain-selective.
    pub fn iotlb_domain(did: u16) -> [u64; 4] {
        [
            2 | (2 << 4) | (1 << 6) | (1 << 7) | (u64::from(did) << 16),
            0,
            0,
            0,
        ]
    }

    /// IOTLB invalidation, page-selective: 2^`am` pages at `addr`.
    pub fn iotlb_page(did: u16, addr: u64, am: u8, ih: bool) -> [u64; 4] {
        [
            2 | (3 << 4) | (1 << 6) | (1 << 7) | (u64::from(did) << 16),
            (addr & !0xfff) | (u64::from(ih) << 6) | u64::from(am & 0x3f),
            0,
            0,
        ]
    }

    /// PASID-based IOTLB invalidation of everything of one PASID.
    pub fn piotlb_pasid(did: u16, pasid: u32) -> [u64; 4] {
        [
            6 | (2 << 4) | (u64::from(did) << 16) | (u64::from(pasid & 0xf_ffff) << 32),
            0,
            0,
            0,
        ]
    }

    /// PASID-based IOTLB invalidation, page-selective within a PASID.
    pub fn piotlb_page(did: u16, pasid: u32, addr: u64, am: u8, ih: bool) -> [u64; 4] {
        [
            6 | (3 << 4) | (u64::from(did) << 16) | (u64::from(pasid & 0xf_ffff) << 32),
            (addr & !0xfff) | (u64::from(ih) << 6) | u64::from(am & 0x3f),
            0,
            0,
        ]
    }

    /// PASID-cache invalidation: `g` 0 = all PASIDs of `did`, 1 = one PASID, 3 = global.
    pub fn pasid_cache(g: u8, did: u16, pasid: u32) -> [u64; 4] {
        [
            7 | (u64::from(g & 3) << 4)
                | (u64::from(did) << 16)
                | (u64::from(pasid & 0xf_ffff) << 32),
            0,
            0,
            0,
        ]
    }

    fn pfsid(pfsid: u16) -> u64 {
        (u64::from(pfsid & 0xf) << 12) | (u64::from(pfsid >> 4) << 52)
    }

    fn size_encode(addr: u64, size_order: u8) -> (u64, bool) {
        if size_order == 0 {
            return (addr & !0xfff, false);
        }
        let a = (addr | ((1u64 << (12 + u32::from(size_order) - 1)) - 1)) & !0xfff;
        (a, true)
    }

    /// Device-TLB invalidation of 2^`size_order` pages at `addr` (Linux
    /// `qi_flush_dev_iotlb`; size order 52 = everything).
    pub fn dev_tlb(sid: u16, pfsid_: u16, qdep: u8, addr: u64, size_order: u8) -> [u64; 4] {
        let (a, s) = size_encode(addr, size_order);
        [
            3 | (u64::from(sid) << 32) | (u64::from(qdep & 0x1f) << 16) | pfsid(pfsid_),
            a | u64::from(s),
            0,
            0,
        ]
    }

    /// PASID-based device-TLB invalidation (Linux `qi_flush_dev_iotlb_pasid`).
    pub fn pasid_dev_tlb(
        sid: u16,
        pfsid_: u16,
        pasid: u32,
        qdep: u8,
        addr: u64,
        size_order: u8,
    ) -> [u64; 4] {
        let (a, s) = size_encode(addr, size_order);
        [
            8 | (u64::from(sid) << 16)
                | (u64::from(pasid & 0xf_ffff) << 32)
                | (u64::from(qdep & 0x1f) << 4)
                | pfsid(pfsid_),
            a | (u64::from(s) << 11),
            0,
            0,
        ]
    }

    /// Interrupt entry cache invalidation, global (ignored by a unit without IR).
    pub fn iec() -> [u64; 4] {
        [4 | (1 << 4), 0, 0, 0]
    }

    /// Invalidation wait with a status write of `data` at `status`.
    pub fn wait(status: u64, data: u32, interrupt: bool, fence: bool) -> [u64; 4] {
        [
            5 | (1 << 5)
                | (u64::from(interrupt) << 4)
                | (u64::from(fence) << 6)
                | (u64::from(data) << 32),
            status & !3,
            0,
            0,
        ]
    }

    /// Page group response (`code`: 0 success, 1 invalid, 0xf failure).
    pub fn page_response(rid: u16, pasid: Option<u32>, prgi: u16, code: u8) -> [u64; 4] {
        let (pp, p) = match pasid {
            Some(p) => (1u64, u64::from(p & 0xf_ffff)),
            None => (0, 0),
        };
        [
            9 | (pp << 4) | (u64::from(code & 0xf) << 12) | (u64::from(rid) << 16) | (p << 32),
            u64::from(prgi & 0x1ff) << 3,
            0,
            0,
        ]
    }
}

/// Why a harness step failed.
#[derive(Debug, Error)]
pub enum HarnessError {
    /// The arena for tables and queues is exhausted.
    #[error("The harness arena is exhausted")]
    OutOfArena,
    /// A guest memory access failed.
    #[error("Guest memory")]
    Memory(#[from] GuestMemoryError),
    /// A register did not show what the step set (e.g. GSTS.QIES after GCMD.QIE).
    #[error("Register {reg:#x} is {value:#x} after the write, expected bits {expected:#x}")]
    Register {
        /// The register offset.
        reg: u64,
        /// Its value.
        value: u64,
        /// The bits expected set.
        expected: u64,
    },
    /// The wait descriptor's status write did not happen.
    #[error("Invalidation wait status not written (FSTS {fsts:#x}, IQH {iqh:#x}, IQT {iqt:#x})")]
    WaitNotDone {
        /// FSTS.
        fsts: u32,
        /// IQH.
        iqh: u64,
        /// IQT.
        iqt: u64,
    },
    /// The device was not attached.
    #[error("{0} is not attached")]
    NotAttached(PciBdf),
    /// Unaligned map/unmap.
    #[error("IOVA {iova:#x}, GPA {gpa:#x} or length {len:#x} is not 4 KiB aligned")]
    Unaligned {
        /// IOVA.
        iova: u64,
        /// GPA.
        gpa: u64,
        /// Length.
        len: u64,
    },
}

/// Which stage the harness programs for a device's PASID 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// PGTT = second stage (what Linux uses without ECAP.FSTS).
    Second,
    /// PGTT = first stage (what Linux uses with ECAP.FSTS).
    First,
}

/// One attached (device, PASID).
#[derive(Debug, Clone, Copy)]
pub struct Attached {
    /// The device.
    pub bdf: PciBdf,
    /// The PASID (0: requests without PASID).
    pub pasid: u32,
    /// Its domain id.
    pub did: u16,
    /// The stage programmed.
    pub stage: Stage,
    /// Guest address of the device's PASID directory.
    pub pasid_dir: u64,
    /// Guest address of the PASID table entry (legacy mode: the context entry).
    pub pasid_entry: u64,
    /// Guest address of the I/O page table root (4-level).
    pub pgtable: u64,
}

/// The tables of one probed device.
#[derive(Debug, Clone)]
struct DeviceTables {
    ctx: u64,
    pasid_dir: u64,
    pasid_tables: BTreeMap<u64, u64>,
}

const PAGE: u64 = 4096;
/// Page directory size Linux gives a one-page PASID directory (512 entries).
const PDTS_ONE_PAGE: u64 = 2;

/// Programs a VT-d unit as Linux 7.x intel-iommu does (see the module doc).
pub struct LinuxHarness {
    mem: Arc<dyn GuestMemoryAccess>,
    /// The bus base passed to every `BusDevice` access.
    pub mmio_base: u64,
    /// The fault event message programmed at boot.
    pub fault_msi: MsiMessage,
    next: u64,
    end: u64,
    cap: u64,
    ecap: u64,
    gcmd: u32,
    root: u64,
    iq: u64,
    iq_size: u64,
    wide: bool,
    tail: u64,
    status: u64,
    seq: u32,
    next_did: u16,
    /// Whether device-TLB invalidations are sent (ATS on the devices).
    pub ats: bool,
    devices: BTreeMap<u16, DeviceTables>,
    attached: BTreeMap<(u16, u32), Attached>,
    /// Doorbells rung (IQT writes).
    pub doorbells: u64,
}

impl std::fmt::Debug for LinuxHarness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxHarness")
            .field("root", &format_args!("{:#x}", self.root))
            .field("iq", &format_args!("{:#x}", self.iq))
            .field("attached", &self.attached)
            .field("doorbells", &self.doorbells)
            .finish()
    }
}

impl LinuxHarness {
    /// A harness that allocates its tables and queues from `arena` (page aligned, inside
    /// the guest memory `mem`).
    pub fn new(mem: Arc<dyn GuestMemoryAccess>, arena: Range<u64>) -> Self {
        Self {
            mem,
            mmio_base: 0,
            fault_msi: MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
            next: (arena.start + PAGE - 1) & !(PAGE - 1),
            end: arena.end,
            cap: 0,
            ecap: 0,
            gcmd: 0,
            root: 0,
            iq: 0,
            iq_size: 0,
            wide: false,
            tail: 0,
            status: 0,
            seq: 0,
            // Linux: domain ids start at 2 (IDA_START_DID).
            next_did: 2,
            ats: false,
            devices: BTreeMap::new(),
            attached: BTreeMap::new(),
            doorbells: 0,
        }
    }

    /// PASID 0 of `bdf`, if attached.
    pub fn attached(&self, bdf: PciBdf) -> Option<Attached> {
        self.attached_pasid(bdf, 0)
    }

    /// (`bdf`, `pasid`), if attached.
    pub fn attached_pasid(&self, bdf: PciBdf, pasid: u32) -> Option<Attached> {
        self.attached.get(&(bdf.rid(), pasid)).copied()
    }

    /// Allocates `pages` zeroed, contiguous pages from the arena.
    pub fn alloc(&mut self, pages: u64) -> Result<u64, HarnessError> {
        let len = pages.checked_mul(PAGE).ok_or(HarnessError::OutOfArena)?;
        let a = self.next;
        let end = a.checked_add(len).ok_or(HarnessError::OutOfArena)?;
        if end > self.end {
            return Err(HarnessError::OutOfArena);
        }
        let zero = vec![0u8; PAGE as usize];
        for p in 0..pages {
            self.mem.write(a + p * PAGE, &zero)?;
        }
        self.next = end;
        Ok(a)
    }

    fn w32(&self, vtd: &mut dyn BusDevice, off: u64, v: u32) {
        vtd.write(self.mmio_base, off, &v.to_le_bytes());
    }

    fn w64(&self, vtd: &mut dyn BusDevice, off: u64, v: u64) {
        vtd.write(self.mmio_base, off, &v.to_le_bytes());
    }

    fn r32(&self, vtd: &mut dyn BusDevice, off: u64) -> u32 {
        let mut b = [0u8; 4];
        vtd.read(self.mmio_base, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn r64(&self, vtd: &mut dyn BusDevice, off: u64) -> u64 {
        let mut b = [0u8; 8];
        vtd.read(self.mmio_base, off, &mut b);
        u64::from_le_bytes(b)
    }

    fn w_u64(&self, gpa: u64, v: u64) -> Result<(), HarnessError> {
        Ok(self.mem.write(gpa, &v.to_le_bytes())?)
    }

    fn r_u64(&self, gpa: u64) -> Result<u64, HarnessError> {
        let mut b = [0u8; 8];
        self.mem.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn gcmd_set(
        &mut self,
        vtd: &mut dyn BusDevice,
        bit: u32,
        one_shot: bool,
    ) -> Result<(), HarnessError> {
        let v = self.gcmd | bit;
        if !one_shot {
            self.gcmd = v;
        }
        self.w32(vtd, regs::GCMD, v);
        let sts = self.r32(vtd, regs::GSTS);
        if sts & bit == 0 {
            return Err(HarnessError::Register {
                reg: regs::GSTS,
                value: u64::from(sts),
                expected: u64::from(bit),
            });
        }
        Ok(())
    }

    /// `intel_iommu_init` for one unit: fault interrupt, QI, root table, global
    /// invalidations, translation enable.
    pub fn boot(&mut self, vtd: &mut dyn BusDevice) -> Result<(), HarnessError> {
        self.cap = self.r64(vtd, regs::CAP);
        self.ecap = self.r64(vtd, regs::ECAP);
        // dmar_set_interrupt: data, address, upper address, then unmask.
        self.w32(vtd, regs::FEDATA, self.fault_msi.data);
        self.w32(vtd, regs::FEADDR, self.fault_msi.address as u32);
        self.w32(vtd, regs::FEUADDR, (self.fault_msi.address >> 32) as u32);
        self.w32(vtd, regs::FECTL, 0);
        // dmar_enable_qi: 256-bit descriptors and two pages in scalable mode.
        self.wide = self.ecap & ecap_bits::SMTS != 0;
        let qs: u64 = u64::from(self.wide);
        self.iq_size = PAGE << qs;
        self.iq = self.alloc(1 << qs)?;
        self.status = self.alloc(1)?;
        self.tail = 0;
        self.w32(vtd, regs::IQT, 0);
        let dw = if self.wide { iqa::DW } else { 0 };
        self.w64(vtd, regs::IQA, self.iq | dw | qs);
        self.gcmd_set(vtd, gcmd::QIE, false)?;
        // iommu_alloc_root_entry + iommu_set_root_entry.
        self.root = self.alloc(1)?;
        let ttm = if self.wide { rtaddr::TTM_SCALABLE } else { 0 };
        self.w64(vtd, regs::RTADDR, self.root | ttm);
        self.gcmd_set(vtd, gcmd::SRTP, true)?;
        self.submit(vtd, &[desc::context_global()])?;
        if self.wide {
            self.submit(vtd, &[desc::pasid_cache(3, 0, 0)])?;
        }
        self.submit(vtd, &[desc::iotlb_global()])?;
        // iommu_enable_translation.
        self.gcmd_set(vtd, gcmd::TE, false)
    }

    /// Queues `descs` plus a wait descriptor, rings the doorbell once and checks the wait's
    /// status write (Linux `qi_submit_sync`).
    pub fn submit(
        &mut self,
        vtd: &mut dyn BusDevice,
        descs: &[[u64; 4]],
    ) -> Result<(), HarnessError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.mem.write(self.status, &0u32.to_le_bytes())?;
        let size: u64 = if self.wide { 32 } else { 16 };
        let wait = desc::wait(self.status, seq, false, false);
        for d in descs.iter().chain(std::iter::once(&wait)) {
            let n = if self.wide { 4 } else { 2 };
            for (i, q) in d.iter().take(n).enumerate() {
                self.w_u64(self.iq + self.tail + i as u64 * 8, *q)?;
            }
            self.tail = (self.tail + size) % self.iq_size;
        }
        self.w32(vtd, regs::IQT, self.tail as u32);
        self.doorbells += 1;
        let mut b = [0u8; 4];
        self.mem.read(self.status, &mut b)?;
        if u32::from_le_bytes(b) != seq {
            return Err(HarnessError::WaitNotDone {
                fsts: self.r32(vtd, regs::FSTS),
                iqh: self.r64(vtd, regs::IQH),
                iqt: self.r64(vtd, regs::IQT),
            });
        }
        Ok(())
    }

    fn context_entry_addr(
        &mut self,
        bdf: PciBdf,
        alloc: bool,
    ) -> Result<Option<u64>, HarnessError> {
        let bus = u64::from(bdf.bus());
        let devfn = u64::from(bdf.rid() & 0xff);
        let (re_addr, index, size) = if self.wide {
            let half = if devfn >= 128 { 8 } else { 0 };
            (self.root + bus * 16 + half, devfn & 0x7f, 32)
        } else {
            (self.root + bus * 16, devfn, 16)
        };
        let mut re = self.r_u64(re_addr)?;
        if re & 1 == 0 {
            if !alloc {
                return Ok(None);
            }
            let table = self.alloc(1)?;
            re = table | 1;
            self.w_u64(re_addr, re)?;
        }
        Ok(Some((re & !0xfff) + index * size))
    }

    /// Probe of `bdf` (`intel_pasid_setup_sm_context` / `device_pasid_table_setup`): a
    /// one-page PASID directory named by a scalable-mode context entry, then the
    /// caching-mode flush of a non-present to present context. Idempotent.
    pub fn probe(&mut self, vtd: &mut dyn BusDevice, bdf: PciBdf) -> Result<(), HarnessError> {
        let sid = bdf.rid();
        if self.devices.contains_key(&sid) {
            return Ok(());
        }
        let ctx = self
            .context_entry_addr(bdf, true)?
            .ok_or(HarnessError::NotAttached(bdf))?;
        let pasid_dir = self.alloc(1)?;
        if self.wide {
            let mut lo = pasid_dir | (PDTS_ONE_PAGE << 9) | 1;
            if self.ats && self.ecap & ecap_bits::DT != 0 {
                lo |= 1 << 2; // DTE
            }
            if self.ecap & ecap_bits::PASID != 0 {
                lo |= 1 << 3; // PASIDE
            }
            self.w_u64(ctx + 8, 0)?; // RID_PASID = 0
            self.w_u64(ctx, lo)?;
            // Non-present to present: flush domain 0, where not-present entries may be
            // cached.
            self.submit(vtd, &[desc::context_device(0, sid, 0)])?;
            self.submit(vtd, &[desc::iotlb_domain(0)])?;
        }
        self.devices.insert(
            sid,
            DeviceTables {
                ctx,
                pasid_dir,
                pasid_tables: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Probe and attach of `bdf` to a new paging domain on PASID 0 (RID_PASID). Returns the
    /// domain id.
    pub fn attach(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        stage: Stage,
    ) -> Result<u16, HarnessError> {
        self.attach_pasid(vtd, bdf, 0, stage)
    }

    /// Attach of `bdf`'s `pasid` to a new paging domain (`intel_pasid_setup_second_level`
    /// or `intel_pasid_setup_first_level`, then `pasid_flush_caches`: PASID-selective
    /// PASID-cache and PASID-based IOTLB invalidations). In legacy mode only PASID 0 exists
    /// and the context entry itself names the table. Returns the domain id.
    pub fn attach_pasid(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        pasid: u32,
        stage: Stage,
    ) -> Result<u16, HarnessError> {
        self.probe(vtd, bdf)?;
        let sid = bdf.rid();
        let dev = self
            .devices
            .get(&sid)
            .cloned()
            .ok_or(HarnessError::NotAttached(bdf))?;
        let did = self.next_did;
        self.next_did = self.next_did.wrapping_add(1).max(2);
        let pgtable = self.alloc(1)?;
        let pasid_entry = if self.wide {
            let dir_index = u64::from(pasid >> 6);
            let table = match dev.pasid_tables.get(&dir_index) {
                Some(t) => *t,
                None => {
                    let t = self.alloc(1)?;
                    self.w_u64(dev.pasid_dir + dir_index * 8, t | 1)?;
                    if let Some(d) = self.devices.get_mut(&sid) {
                        d.pasid_tables.insert(dir_index, t);
                    }
                    t
                }
            };
            let entry = table + u64::from(pasid & 0x3f) * 64;
            let agaw: u64 = 2; // 48-bit, 4 levels
            let (q0, q1, q2) = match stage {
                Stage::Second => (pgtable | (2 << 6) | (agaw << 2) | 1, u64::from(did), 0),
                Stage::First => (
                    (1 << 6) | (agaw << 2) | 1,
                    u64::from(did) | (1 << 24),
                    pgtable,
                ),
            };
            self.w_u64(entry + 8, q1)?;
            self.w_u64(entry + 16, q2)?;
            self.w_u64(entry, q0)?;
            self.submit(vtd, &[desc::pasid_cache(1, did, pasid)])?;
            self.submit(vtd, &[desc::piotlb_pasid(did, pasid)])?;
            entry
        } else {
            if pasid != 0 || stage != Stage::Second {
                return Err(HarnessError::NotAttached(bdf));
            }
            // Legacy context entry: second stage, 4 levels.
            self.w_u64(dev.ctx + 8, 2 | (u64::from(did) << 8))?;
            self.w_u64(dev.ctx, pgtable | 1)?;
            self.submit(vtd, &[desc::context_device(did, sid, 0)])?;
            self.submit(vtd, &[desc::iotlb_domain(did)])?;
            dev.ctx
        };
        self.attached.insert(
            (sid, pasid),
            Attached {
                bdf,
                pasid,
                did,
                stage,
                pasid_dir: dev.pasid_dir,
                pasid_entry,
                pgtable,
            },
        );
        Ok(did)
    }

    fn walk(
        &mut self,
        root: u64,
        iova: u64,
        stage: Stage,
        alloc: bool,
    ) -> Result<Option<u64>, HarnessError> {
        let nonleaf = match stage {
            Stage::Second => 0x3,
            Stage::First => 0x7,
        };
        let mut table = root;
        for level in (2..=4u32).rev() {
            let idx = (iova >> (12 + 9 * (level - 1))) & 511;
            let e_addr = table + idx * 8;
            let mut e = self.r_u64(e_addr)?;
            if e & 3 == 0 {
                if !alloc {
                    return Ok(None);
                }
                let page = self.alloc(1)?;
                e = page | nonleaf;
                self.w_u64(e_addr, e)?;
            }
            table = e & 0x000f_ffff_ffff_f000;
        }
        Ok(Some(table + ((iova >> 12) & 511) * 8))
    }

    fn check_aligned(iova: u64, gpa: u64, len: u64) -> Result<(), HarnessError> {
        if (iova | gpa | len) & (PAGE - 1) != 0 || len == 0 {
            return Err(HarnessError::Unaligned { iova, gpa, len });
        }
        Ok(())
    }

    /// Linux `calculate_psi_aligned_address`: (aligned address, address mask).
    pub fn psi_aligned(start: u64, end: u64) -> (u64, u8) {
        let pages = ((end | (PAGE - 1)) - (start & !(PAGE - 1)) + 1) >> 12;
        let aligned = pages.next_power_of_two();
        let bitmask = aligned - 1;
        let mut mask = aligned.trailing_zeros();
        let pfn = start >> 12;
        if bitmask & pfn != 0 {
            let end_pfn = pfn + pages - 1;
            let shared = !(pfn ^ end_pfn) & !bitmask;
            mask = if shared != 0 {
                shared.trailing_zeros()
            } else {
                52
            };
        }
        let align = (PAGE << mask.min(52)).wrapping_sub(1);
        (start & !align, mask as u8)
    }

    fn flush_range(
        &mut self,
        vtd: &mut dyn BusDevice,
        a: Attached,
        iova: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), HarnessError> {
        let (addr, am) = Self::psi_aligned(iova, iova + len - 1);
        let psi = self.cap & cap_bits::PSI != 0;
        let mut descs = Vec::new();
        match a.stage {
            Stage::Second => {
                if !psi || am > MAMV {
                    descs.push(desc::iotlb_domain(a.did));
                } else {
                    descs.push(desc::iotlb_page(a.did, addr, am, false));
                }
            }
            Stage::First => {
                if !unmap {
                    // cache_tag_flush_range_np: nothing for first-stage domains.
                    return Ok(());
                }
                if am > MAMV {
                    descs.push(desc::piotlb_pasid(a.did, a.pasid));
                } else {
                    descs.push(desc::piotlb_page(a.did, a.pasid, addr, am, false));
                }
            }
        }
        if unmap && self.ats {
            let sid = a.bdf.rid();
            if a.pasid == 0 {
                descs.push(desc::dev_tlb(sid, sid, 0, addr, am));
            } else {
                descs.push(desc::pasid_dev_tlb(sid, sid, a.pasid, 0, addr, am));
            }
        }
        self.submit(vtd, &descs)
    }

    /// Maps `[iova, iova + len)` to `[gpa, gpa + len)` on PASID 0 (see [`Self::map_pasid`]).
    pub fn map(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        iova: u64,
        gpa: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        self.map_pasid(vtd, bdf, 0, iova, gpa, len)
    }

    /// Maps `[iova, iova + len)` to `[gpa, gpa + len)` with 4 KiB pages in the domain of
    /// (`bdf`, `pasid`), then invalidates as Linux does after a map (`iotlb_sync_map`).
    pub fn map_pasid(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        pasid: u32,
        iova: u64,
        gpa: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        Self::check_aligned(iova, gpa, len)?;
        let a = self
            .attached_pasid(bdf, pasid)
            .ok_or(HarnessError::NotAttached(bdf))?;
        let leaf = match a.stage {
            Stage::Second => 0x3,
            Stage::First => 0x67,
        };
        for off in (0..len).step_by(PAGE as usize) {
            let pte = self
                .walk(a.pgtable, iova + off, a.stage, true)?
                .ok_or(HarnessError::OutOfArena)?;
            self.w_u64(pte, (gpa + off) | leaf)?;
        }
        self.flush_range(vtd, a, iova, len, false)
    }

    /// Unmaps `[iova, iova + len)` on PASID 0 (see [`Self::unmap_pasid`]).
    pub fn unmap(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        iova: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        self.unmap_pasid(vtd, bdf, 0, iova, len)
    }

    /// Unmaps `[iova, iova + len)` of (`bdf`, `pasid`) and invalidates (`iotlb_sync`).
    pub fn unmap_pasid(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        pasid: u32,
        iova: u64,
        len: u64,
    ) -> Result<(), HarnessError> {
        Self::check_aligned(iova, 0, len)?;
        let a = self
            .attached_pasid(bdf, pasid)
            .ok_or(HarnessError::NotAttached(bdf))?;
        for off in (0..len).step_by(PAGE as usize) {
            if let Some(pte) = self.walk(a.pgtable, iova + off, a.stage, false)? {
                self.w_u64(pte, 0)?;
            }
        }
        self.flush_range(vtd, a, iova, len, true)
    }

    /// Detach of (`bdf`, `pasid`): `intel_pasid_tear_down_entry` (entry cleared keeping
    /// FPD, PASID-selective PASID-cache invalidation, domain-selective IOTLB for second
    /// stage or PASID-based IOTLB for first stage, the device TLB).
    pub fn detach_pasid(
        &mut self,
        vtd: &mut dyn BusDevice,
        bdf: PciBdf,
        pasid: u32,
    ) -> Result<(), HarnessError> {
        let sid = bdf.rid();
        let a = self
            .attached
            .remove(&(sid, pasid))
            .ok_or(HarnessError::NotAttached(bdf))?;
        if !self.wide {
            return Ok(());
        }
        // pasid_clear_entry_with_fpd: everything but FPD cleared.
        self.w_u64(a.pasid_entry + 8, 0)?;
        self.w_u64(a.pasid_entry + 16, 0)?;
        self.w_u64(a.pasid_entry, 2)?;
        self.submit(vtd, &[desc::pasid_cache(1, a.did, pasid)])?;
        match a.stage {
            Stage::First => self.submit(vtd, &[desc::piotlb_pasid(a.did, pasid)])?,
            Stage::Second => self.submit(vtd, &[desc::iotlb_domain(a.did)])?,
        }
        if self.ats {
            if pasid == 0 {
                self.submit(vtd, &[desc::dev_tlb(sid, sid, 0, 0, 52)])?;
            } else {
                self.submit(vtd, &[desc::pasid_dev_tlb(sid, sid, pasid, 0, 0, 52)])?;
            }
        }
        Ok(())
    }

    /// Detach and release of `bdf`: every attached PASID detached ([`Self::detach_pasid`]),
    /// then `device_pasid_table_teardown` (context entry cleared,
    /// `intel_context_flush_present`: device-selective context-cache invalidation and the
    /// global device TLB; legacy mode: the domain's IOTLB).
    pub fn teardown(&mut self, vtd: &mut dyn BusDevice, bdf: PciBdf) -> Result<(), HarnessError> {
        let sid = bdf.rid();
        let dev = self
            .devices
            .remove(&sid)
            .ok_or(HarnessError::NotAttached(bdf))?;
        let pasids: Vec<(u32, u16)> = self
            .attached
            .range((sid, 0)..=(sid, u32::MAX))
            .map(|(&(_, p), a)| (p, a.did))
            .collect();
        for (p, _) in &pasids {
            self.detach_pasid(vtd, bdf, *p)?;
        }
        let did = pasids.first().map(|(_, d)| *d).unwrap_or(0);
        self.w_u64(dev.ctx, 0)?;
        self.w_u64(dev.ctx + 8, 0)?;
        self.submit(vtd, &[desc::context_device(did, sid, 0)])?;
        if !self.wide {
            self.submit(vtd, &[desc::iotlb_domain(did)])?;
        }
        if self.ats {
            self.submit(vtd, &[desc::dev_tlb(sid, sid, 0, 0, 52)])?;
        }
        Ok(())
    }

    /// Whether FSTS shows an invalidation queue error.
    pub fn queue_error(&self, vtd: &mut dyn BusDevice) -> bool {
        self.r32(vtd, regs::FSTS) & fsts::IQE != 0
    }
}
