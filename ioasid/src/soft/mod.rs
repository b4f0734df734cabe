//! The soft backend: a software IOMMU with the same API contract as the kernel backends.
//!
//! It serves emulated devices (the vIOMMU's own DMA users, test devices), hosts without
//! `/dev/iommu`, and the vIOMMU's shadowing fallback (walkers of guest tables).
//!
//! - Stage 2 is an IOAS: an interval map of IOVA ranges to host virtual addresses
//!   ([`stage2`]). Only registered guest RAM can be a target: a map whose user range is not
//!   inside one registered region fails with `EFAULT`, as the kernel fails to pin unmapped
//!   memory. Unmap may split a mapping (iommufd cannot). `ioas_map_file` is refused with
//!   [`Error::Unsupported`]: a memfd range would be memory outside the registered regions.
//! - Stage 1 is a guest VT-d first-stage table bound with `hwpt_alloc(parent = nest parent,
//!   stage1 = VtdS1)` ([`walk_s1`]); table reads go through stage 2 (nested translation).
//!   A device attached to an IOAS or a paging HWPT gets stage 2 only. A guest VT-d
//!   second-level table can be bound the same way, soft only
//!   ([`SoftIommu::hwpt_alloc_second_level`]): an emulated vIOMMU's second-stage domain is
//!   then walked per access, without a shadow copy. Both walkers share one descent
//!   (`descent.rs`). The second-level walker ([`walk_sl`]) is also offered to a shadowing
//!   vIOMMU: [`SoftIommu::walk_second_level`] per address, [`walk_sl::scan_second_level`]
//!   for every leaf of a range over any [`TableMemory`].
//! - Translation contexts are keyed by (device, PASID); the IOTLB ([`iotlb`]) is tagged by
//!   device, PASID and domain, keeps stale entries until the guest invalidates them, and is
//!   invalidated by the backend itself on every stage-2 unmap, under the lock that DMA holds
//!   while it copies: after `ioas_unmap` returns, no device access reaches the old memory.
//! - Faults become [`FaultRecord`](crate::FaultRecord)s on a [`SoftFaultQueue`]
//!   ([`fault`]); a DMA that raised a page request gets a [`PendingPageRequest`] to wait on
//!   and retries on `Success` ([`dma`]).
//!
//! Errors use the kernel's errnos for the same misuse ([`Error::kernel`]).

mod descent;
pub mod dma;
pub mod fault;
pub mod guest_mem;
pub mod iotlb;
pub mod stage2;
pub mod table;
pub mod walk_s1;
pub mod walk_sl;

#[cfg(test)]
mod second_level_tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use vm_memory::bitmap::Bitmap;
use vm_memory::GuestMemoryMmap;

use crate::backend::{
    BackendKind, CopyRequest, FaultQueue, InvalidateOutcome, IommuBackend, MapFile, MapUser,
};
use crate::error::{likely_cause, Ctx, Errno, Error, Op, Result};
use crate::fault_types::UnrecoverableFault;
use crate::types::{
    DevId, DeviceName, HwptAlloc, HwptFlags, HwptId, Invalidation, IoasId, IovaRange, IovaRanges,
    Pasid, PtId, Stage1Format,
};

pub use dma::{DmaError, DmaRequest};
pub use fault::{PendingPageRequest, SoftFaultQueue};
pub use guest_mem::HostRegion;
pub use iotlb::IotlbStats;
pub use table::{TableMemory, WalkFault};
pub use walk_s1::{S1Config, S1Leaf, S1Rights};
pub use walk_sl::{scan_second_level, SlConfig, SlLeaf, SlScan};

use fault::FaultShared;
use guest_mem::GuestRam;
use iotlb::{Iotlb, NO_PASID};
use stage2::{Ioas, PAGE_SIZE};

const BACKEND: &str = "soft";

/// Tunables of the soft IOMMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftConfig {
    /// Stage-2 IOVA width in bits (the aperture is `[0, 2^iova_bits)`).
    pub iova_bits: u32,
    /// IOTLB sets (of 4 ways each).
    pub iotlb_sets: usize,
    /// Unrecoverable faults kept for [`SoftIommu::take_unrecoverable_faults`].
    pub fault_log_depth: usize,
}

impl Default for SoftConfig {
    fn default() -> Self {
        SoftConfig {
            iova_bits: 48,
            iotlb_sets: 1024,
            fault_log_depth: 256,
        }
    }
}

/// What a (device, PASID) is attached to, resolved at attach time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Attachment {
    /// The IOTLB domain tag: the HWPT id, or the IOAS id for a direct IOAS attach.
    pub domain: u32,
    /// The stage-2 IOAS.
    pub ioas: u32,
    /// The guest table walked before stage 2, for a nested HWPT.
    pub table: Option<GuestTable>,
    /// The HWPT's fault queue.
    pub fault: Option<u32>,
}

#[derive(Debug)]
pub(crate) struct Device {
    pub name: DeviceName,
    /// Keyed by PASID, or [`NO_PASID`] for requests without one.
    pub attach: HashMap<u32, Attachment>,
    /// Next page request group index (9-bit PRGI).
    pub next_grpid: AtomicU32,
}

/// A guest table that a nested HWPT walks over its parent's stage 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestTable {
    /// A VT-d first-stage table (`Stage1Format::VtdS1`).
    FirstStage(S1Config),
    /// A VT-d second-level table (soft only, [`SoftIommu::hwpt_alloc_second_level`]).
    SecondLevel(SlConfig),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Hwpt {
    pub ioas: u32,
    pub flags: HwptFlags,
    pub fault: Option<u32>,
    /// `Some` for a nested HWPT: the parent HWPT and the binding.
    pub nested: Option<(u32, GuestTable)>,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    next_id: u32,
    pub ioas: HashMap<u32, Ioas>,
    pub hwpts: HashMap<u32, Hwpt>,
    pub faults: HashMap<u32, Arc<FaultShared>>,
    pub devices: HashMap<u32, Device>,
}

impl State {
    fn alloc_id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.ioas.contains_key(&self.next_id)
            || self.hwpts.contains_key(&self.next_id)
            || self.faults.contains_key(&self.next_id)
            || self.devices.contains_key(&self.next_id)
        {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        self.next_id
    }

    fn domain_in_use(&self, id: u32) -> bool {
        self.devices
            .values()
            .any(|d| d.attach.values().any(|a| a.domain == id))
    }
}

/// Walk counters (the IOTLB's are in [`IotlbStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SoftStats {
    /// IOTLB counters.
    pub iotlb: IotlbStats,
    /// Translations that needed a walk.
    pub walks: u64,
    /// Guest-memory reads of table entries.
    pub table_reads: u64,
    /// Atomic A/D updates of table entries.
    pub table_updates: u64,
}

/// The software IOMMU.
#[derive(Debug)]
pub struct SoftIommu {
    config: SoftConfig,
    ram: GuestRam,
    state: RwLock<State>,
    iotlb: Mutex<Iotlb>,
    fault_log: Mutex<VecDeque<UnrecoverableFault>>,
    walks: AtomicU64,
    table_reads: AtomicU64,
    table_updates: AtomicU64,
}

fn kerr(op: Op, ctx: Ctx, errno: i32) -> Error {
    Error::kernel(op, ctx, Errno(errno))
}

fn pasid_tag(pasid: Option<Pasid>) -> u32 {
    pasid.map_or(NO_PASID, |p| p.0)
}

impl SoftIommu {
    /// A soft IOMMU whose DMA may reach only `regions`.
    ///
    /// # Safety
    ///
    /// Every region must be memory mapped in this process, readable and writable, for the
    /// whole life of the returned object, and must not be accessed through Rust references
    /// meanwhile (devices write it at any time).
    pub unsafe fn new(regions: &[HostRegion]) -> Result<Self> {
        // SAFETY: `with_config` has exactly this function's contract (every region mapped,
        // readable and writable for the object's life, never accessed through references);
        // the caller upholds it for `regions`, which are passed on unchanged.
        unsafe { Self::with_config(regions, SoftConfig::default()) }
    }

    /// [`SoftIommu::new`] with tunables.
    ///
    /// # Safety
    ///
    /// As for [`SoftIommu::new`].
    pub unsafe fn with_config(regions: &[HostRegion], config: SoftConfig) -> Result<Self> {
        let ram = GuestRam::new(regions, None).map_err(|e| Error::BackendUnavailable {
            backend: BACKEND,
            reason: e.to_string(),
        })?;
        Ok(Self::build(ram, config))
    }

    /// A soft IOMMU over the regions of a vm-memory guest memory object, which it keeps
    /// alive (the regions stay mapped as long as the soft IOMMU exists).
    pub fn from_guest_memory<B>(mem: &GuestMemoryMmap<B>, config: SoftConfig) -> Result<Self>
    where
        B: Bitmap + Send + Sync + 'static,
    {
        let regions = GuestRam::regions_of(mem);
        let ram = GuestRam::new(&regions, Some(Box::new(mem.clone()))).map_err(|e| {
            Error::BackendUnavailable {
                backend: BACKEND,
                reason: e.to_string(),
            }
        })?;
        Ok(Self::build(ram, config))
    }

    fn build(ram: GuestRam, config: SoftConfig) -> Self {
        SoftIommu {
            iotlb: Mutex::new(Iotlb::new(config.iotlb_sets)),
            config,
            ram,
            state: RwLock::new(State::default()),
            fault_log: Mutex::new(VecDeque::new()),
            walks: AtomicU64::new(0),
            table_reads: AtomicU64::new(0),
            table_updates: AtomicU64::new(0),
        }
    }

    pub(crate) fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn tlb(&self) -> MutexGuard<'_, Iotlb> {
        self.iotlb.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The registered guest RAM regions.
    pub fn regions(&self) -> &[HostRegion] {
        self.ram.regions()
    }

    /// Registers an emulated device; it starts attached to nothing.
    pub fn register_device(&self, name: &str) -> Result<DevId> {
        let mut st = self.write_state();
        let id = st.alloc_id();
        st.devices.insert(
            id,
            Device {
                name: DeviceName::Emulated(name.to_string()),
                attach: HashMap::new(),
                next_grpid: AtomicU32::new(0),
            },
        );
        Ok(DevId(id))
    }

    /// Removes a device with all its attachments and cached translations.
    pub fn unregister_device(&self, dev: DevId) -> Result<()> {
        let mut st = self.write_state();
        if st.devices.remove(&dev.0).is_none() {
            return Err(kerr(Op::Destroy, Ctx::object(dev.0), libc::ENOENT));
        }
        self.tlb().invalidate_device(dev.0);
        Ok(())
    }

    /// The mappings of an IOAS as `(iova, len, hva, perm)`.
    pub fn mappings(&self, ioas: IoasId) -> Result<Vec<(u64, u64, u64, crate::types::Perm)>> {
        let st = self.read_state();
        let a = st
            .ioas
            .get(&ioas.0)
            .ok_or_else(|| kerr(Op::IovaRanges, Ctx::object(ioas.0), libc::ENOENT))?;
        Ok(a.mappings().collect())
    }

    /// Counters.
    pub fn stats(&self) -> SoftStats {
        SoftStats {
            iotlb: self.tlb().stats(),
            walks: self.walks.load(Ordering::Relaxed),
            table_reads: self.table_reads.load(Ordering::Relaxed),
            table_updates: self.table_updates.load(Ordering::Relaxed),
        }
    }

    /// Takes the unrecoverable faults logged so far (every one, whether or not a fault queue
    /// also got it; the oldest are dropped beyond `fault_log_depth`).
    pub fn take_unrecoverable_faults(&self) -> Vec<UnrecoverableFault> {
        let mut g = self.fault_log.lock().unwrap_or_else(|e| e.into_inner());
        g.drain(..).collect()
    }

    pub(crate) fn log_fault(&self, f: UnrecoverableFault) {
        let mut g = self.fault_log.lock().unwrap_or_else(|e| e.into_inner());
        if g.len() >= self.config.fault_log_depth.max(1) {
            g.pop_front();
        }
        g.push_back(f);
    }

    /// Walks a guest VT-d second-level table whose table pages are GPAs of `ioas` (for a
    /// shadowing vIOMMU). No A/D updates; nothing is cached. A missing IOAS is a
    /// [`FaultReason::NoContext`](crate::FaultReason::NoContext) fault.
    pub fn walk_second_level(
        &self,
        ioas: IoasId,
        cfg: &SlConfig,
        addr: u64,
        access: crate::fault_types::FaultPerm,
    ) -> std::result::Result<SlLeaf, WalkFault> {
        let st = self.read_state();
        let Some(a) = st.ioas.get(&ioas.0) else {
            return Err(WalkFault::new(crate::FaultReason::NoContext, 0));
        };
        let mut mem = table::S2Tables::new(a, &self.ram);
        let r = walk_sl::walk_second_level(&mut mem, cfg, addr, access);
        self.table_reads
            .fetch_add(u64::from(mem.reads), Ordering::Relaxed);
        r
    }

    /// Walks a guest VT-d first-stage table whose table pages are GPAs of `ioas` (for a
    /// shadowing vIOMMU): sets A/D like the hardware walk; nothing is cached.
    pub fn walk_first_stage(
        &self,
        ioas: IoasId,
        cfg: &S1Config,
        addr: u64,
        access: crate::fault_types::FaultPerm,
    ) -> std::result::Result<S1Leaf, WalkFault> {
        let st = self.read_state();
        let Some(a) = st.ioas.get(&ioas.0) else {
            return Err(WalkFault::new(crate::FaultReason::NoContext, 0));
        };
        let mut mem = table::S2Tables::new(a, &self.ram);
        let r = walk_s1::walk_first_stage(&mut mem, cfg, addr, access);
        self.table_reads
            .fetch_add(u64::from(mem.reads), Ordering::Relaxed);
        self.table_updates
            .fetch_add(u64::from(mem.updates), Ordering::Relaxed);
        r
    }

    /// Allocates a soft-only nested HWPT that walks a guest VT-d **second-level** table on
    /// each access (through the IOTLB), over the stage 2 of the nest parent `parent`: an
    /// emulated vIOMMU's second-stage domain without a shadow copy. It behaves like a nested
    /// HWPT otherwise: attach it to (device, PASID), invalidate it with `hwpt_invalidate`
    /// (cached translations stay until then, as on hardware), destroy it when unused. A
    /// second-level table has no A/D flags here (SLADS is not modelled).
    pub fn hwpt_alloc_second_level(
        &self,
        dev: DevId,
        parent: HwptId,
        table: SlConfig,
        fault: Option<crate::types::FaultId>,
        pasid: bool,
    ) -> Result<HwptId> {
        let op = Op::NestedAlloc;
        let mut st = self.write_state();
        let ctx = Self::device_ctx(&st, dev).with_object(parent.0);
        if !st.devices.contains_key(&dev.0) {
            return Err(kerr(op, ctx, libc::ENOENT));
        }
        if fault.is_some_and(|f| !st.faults.contains_key(&f.0)) {
            return Err(kerr(op, ctx, libc::ENOENT));
        }
        if !(3..=5).contains(&table.levels) || table.root & !table::ADDR_MASK != 0 {
            return Err(kerr(op, ctx, libc::EINVAL));
        }
        let p = st
            .hwpts
            .get(&parent.0)
            .ok_or_else(|| kerr(op, ctx.clone(), libc::ENOENT))?;
        if p.nested.is_some() || !p.flags.nest_parent {
            return Err(kerr(op, ctx, libc::EINVAL));
        }
        let hwpt = Hwpt {
            ioas: p.ioas,
            flags: HwptFlags {
                pasid,
                ..HwptFlags::default()
            },
            fault: fault.map(|f| f.0),
            nested: Some((parent.0, GuestTable::SecondLevel(table))),
        };
        let id = st.alloc_id();
        st.hwpts.insert(id, hwpt);
        Ok(HwptId(id))
    }

    fn device_ctx(st: &State, dev: DevId) -> Ctx {
        match st.devices.get(&dev.0) {
            Some(d) => Ctx::device(&d.name),
            None => Ctx::object(dev.0),
        }
    }
}

impl IommuBackend for SoftIommu {
    fn kind(&self) -> BackendKind {
        BackendKind::Soft
    }

    fn ioas_alloc(&self) -> Result<IoasId> {
        let mut st = self.write_state();
        let id = st.alloc_id();
        st.ioas.insert(id, Ioas::new(self.config.iova_bits));
        Ok(IoasId(id))
    }

    fn destroy(&self, id: u32) -> Result<()> {
        let mut st = self.write_state();
        let busy = || kerr(Op::Destroy, Ctx::object(id), libc::EBUSY);
        if st.ioas.contains_key(&id) {
            if st.hwpts.values().any(|h| h.ioas == id) || st.domain_in_use(id) {
                return Err(busy());
            }
            st.ioas.remove(&id);
            self.tlb().invalidate_ioas(id);
            return Ok(());
        }
        if st.hwpts.contains_key(&id) {
            let parent_of_nested = st
                .hwpts
                .values()
                .any(|h| h.nested.is_some_and(|(p, _)| p == id));
            if parent_of_nested || st.domain_in_use(id) {
                return Err(busy());
            }
            st.hwpts.remove(&id);
            self.tlb().invalidate_domain(id, None);
            return Ok(());
        }
        if st.faults.contains_key(&id) {
            if st.hwpts.values().any(|h| h.fault == Some(id)) {
                return Err(busy());
            }
            st.faults.remove(&id);
            return Ok(());
        }
        if st.devices.contains_key(&id) {
            return Err(busy());
        }
        Err(kerr(Op::Destroy, Ctx::object(id), libc::ENOENT))
    }

    unsafe fn ioas_map(&self, ioas: IoasId, req: &MapUser) -> Result<u64> {
        let op = Op::IoasMap;
        let ctx = Ctx::object(ioas.0).range(req.iova.unwrap_or(req.user_va), req.len);
        let mut st = self.write_state();
        let a = st
            .ioas
            .get_mut(&ioas.0)
            .ok_or_else(|| kerr(op, ctx.clone(), libc::ENOENT))?;
        if req.len == 0 || !req.len.is_multiple_of(PAGE_SIZE) {
            return Err(kerr(op, ctx, libc::EINVAL));
        }
        if req.user_va.checked_add(req.len - 1).is_none() {
            return Err(kerr(op, ctx, libc::EOVERFLOW));
        }
        if !req.user_va.is_multiple_of(PAGE_SIZE) {
            return Err(kerr(op, ctx, libc::EINVAL));
        }
        let iova = a
            .check_map(req.iova, req.len)
            .map_err(|e| kerr(op, ctx.clone(), e))?;
        if !self.ram.contains(req.user_va, req.len) {
            return Err(kerr(op, ctx, libc::EFAULT));
        }
        a.insert(iova, req.len, req.user_va, req.perm);
        Ok(iova)
    }

    fn ioas_map_file(&self, _ioas: IoasId, _req: &MapFile) -> Result<u64> {
        Err(Error::Unsupported {
            op: Op::IoasMapFile,
            backend: BACKEND,
        })
    }

    fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        if iova == 0 && len == u64::MAX {
            return self.ioas_unmap_all(ioas);
        }
        let ctx = Ctx::object(ioas.0).range(iova, len);
        let mut st = self.write_state();
        let a = st
            .ioas
            .get_mut(&ioas.0)
            .ok_or_else(|| kerr(Op::IoasUnmap, ctx.clone(), libc::ENOENT))?;
        let (bytes, removed) = a
            .unmap(iova, len)
            .map_err(|e| kerr(Op::IoasUnmap, ctx, e))?;
        // Still under the state write lock: no DMA is between translation and copy.
        let mut tlb = self.tlb();
        for r in removed {
            tlb.invalidate_stage2(ioas.0, r.start, r.last);
        }
        Ok(bytes)
    }

    fn ioas_unmap_all(&self, ioas: IoasId) -> Result<u64> {
        let mut st = self.write_state();
        let a = st
            .ioas
            .get_mut(&ioas.0)
            .ok_or_else(|| kerr(Op::IoasUnmap, Ctx::object(ioas.0), libc::ENOENT))?;
        let bytes = a.unmap_all();
        self.tlb().invalidate_ioas(ioas.0);
        Ok(bytes)
    }

    fn ioas_copy(&self, req: &CopyRequest) -> Result<u64> {
        let op = Op::IoasCopy;
        let ctx = Ctx::object(req.dst.0).range(req.src_iova, req.len);
        let mut st = self.write_state();
        let src = st
            .ioas
            .get(&req.src.0)
            .ok_or_else(|| kerr(op, Ctx::object(req.src.0), libc::ENOENT))?;
        if !st.ioas.contains_key(&req.dst.0) {
            return Err(kerr(op, ctx, libc::ENOENT));
        }
        let pieces = src
            .pieces(req.src_iova, req.len, req.perm)
            .map_err(|e| kerr(op, ctx.clone(), e))?;
        let dst = st
            .ioas
            .get_mut(&req.dst.0)
            .ok_or_else(|| kerr(op, ctx.clone(), libc::ENOENT))?;
        let base = dst
            .check_map(req.dst_iova, req.len)
            .map_err(|e| kerr(op, ctx, e))?;
        for (iova, len, hva) in pieces {
            dst.insert(base + (iova - req.src_iova), len, hva, req.perm);
        }
        Ok(base)
    }

    fn iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges> {
        let st = self.read_state();
        let a = st
            .ioas
            .get(&ioas.0)
            .ok_or_else(|| kerr(Op::IovaRanges, Ctx::object(ioas.0), libc::ENOENT))?;
        Ok(IovaRanges {
            ranges: a.ranges(),
            alignment: PAGE_SIZE,
        })
    }

    fn allow_iovas(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()> {
        let mut st = self.write_state();
        let a = st
            .ioas
            .get_mut(&ioas.0)
            .ok_or_else(|| kerr(Op::AllowIovas, Ctx::object(ioas.0), libc::ENOENT))?;
        a.allow(ranges)
            .map_err(|e| kerr(Op::AllowIovas, Ctx::object(ioas.0), e))
    }

    fn attach(&self, dev: DevId, pasid: Option<Pasid>, pt: PtId) -> Result<()> {
        let op = if pasid.is_some() {
            Op::AttachPasid
        } else {
            Op::Attach
        };
        let mut st = self.write_state();
        let mut ctx = Self::device_ctx(&st, dev).with_object(pt.raw());
        if let Some(p) = pasid {
            ctx = ctx.pasid(p);
        }
        if !st.devices.contains_key(&dev.0) {
            return Err(kerr(op, ctx, libc::ENOENT));
        }
        if pasid.is_some_and(|p| p.0 >= 1 << Pasid::MAX_BITS) {
            return Err(kerr(op, ctx, libc::EINVAL));
        }
        let att = match pt {
            PtId::Ioas(IoasId(id)) => {
                if !st.ioas.contains_key(&id) {
                    return Err(kerr(op, ctx, libc::ENOENT));
                }
                Attachment {
                    domain: id,
                    ioas: id,
                    table: None,
                    fault: None,
                }
            }
            PtId::Hwpt(HwptId(id)) => {
                let h = st
                    .hwpts
                    .get(&id)
                    .ok_or_else(|| kerr(op, ctx.clone(), libc::ENOENT))?;
                if pasid.is_some() && !h.flags.pasid {
                    return Err(kerr(op, ctx, libc::EINVAL));
                }
                Attachment {
                    domain: id,
                    ioas: h.ioas,
                    table: h.nested.map(|(_, t)| t),
                    fault: h.fault,
                }
            }
        };
        let tag = pasid_tag(pasid);
        if let Some(d) = st.devices.get_mut(&dev.0) {
            d.attach.insert(tag, att);
        }
        self.tlb().invalidate_context(dev.0, tag);
        Ok(())
    }

    fn detach(&self, dev: DevId, pasid: Option<Pasid>) -> Result<()> {
        let mut st = self.write_state();
        let tag = pasid_tag(pasid);
        match st.devices.get_mut(&dev.0) {
            Some(d) => {
                d.attach.remove(&tag);
            }
            None => {
                let op = if pasid.is_some() {
                    Op::DetachPasid
                } else {
                    Op::Detach
                };
                return Err(kerr(op, Ctx::object(dev.0), libc::ENOENT));
            }
        }
        self.tlb().invalidate_context(dev.0, tag);
        Ok(())
    }

    fn hwpt_alloc(&self, req: &HwptAlloc) -> Result<HwptId> {
        let mut st = self.write_state();
        let op = match (req.stage1.is_some(), req.flags.nest_parent) {
            (true, _) => Op::NestedAlloc,
            (false, true) => Op::NestParentAlloc,
            (false, false) => Op::HwptAlloc,
        };
        let ctx = Self::device_ctx(&st, req.dev).with_object(req.parent.raw());
        if !st.devices.contains_key(&req.dev.0) {
            return Err(kerr(op, ctx, libc::ENOENT));
        }
        if let Some(f) = req.fault {
            if !st.faults.contains_key(&f.0) {
                return Err(kerr(op, ctx, libc::ENOENT));
            }
        }
        let hwpt = match (req.parent, req.stage1) {
            (PtId::Ioas(IoasId(ioas)), None) => {
                if !st.ioas.contains_key(&ioas) {
                    return Err(kerr(op, ctx, libc::ENOENT));
                }
                if req.flags.dirty_tracking {
                    return Err(kerr(op, ctx, libc::EOPNOTSUPP));
                }
                Hwpt {
                    ioas,
                    flags: req.flags,
                    fault: req.fault.map(|f| f.0),
                    nested: None,
                }
            }
            (PtId::Ioas(_), Some(_)) | (PtId::Hwpt(_), None) => {
                return Err(kerr(op, ctx, libc::EINVAL));
            }
            (PtId::Hwpt(HwptId(parent)), Some(format)) => {
                let p = st
                    .hwpts
                    .get(&parent)
                    .ok_or_else(|| kerr(op, ctx.clone(), libc::ENOENT))?;
                if p.nested.is_some() || !p.flags.nest_parent {
                    return Err(kerr(op, ctx, libc::EINVAL));
                }
                if req.flags.nest_parent || req.flags.dirty_tracking {
                    return Err(kerr(op, ctx, libc::EOPNOTSUPP));
                }
                let s1 = match format {
                    Stage1Format::VtdS1(v) => {
                        S1Config::from_vtd(&v).ok_or_else(|| kerr(op, ctx.clone(), libc::EINVAL))?
                    }
                    Stage1Format::Selftest { .. } => {
                        return Err(kerr(op, ctx, libc::EOPNOTSUPP));
                    }
                };
                Hwpt {
                    ioas: p.ioas,
                    flags: req.flags,
                    fault: req.fault.map(|f| f.0),
                    nested: Some((parent, GuestTable::FirstStage(s1))),
                }
            }
        };
        let id = st.alloc_id();
        st.hwpts.insert(id, hwpt);
        Ok(HwptId(id))
    }

    fn hwpt_invalidate(&self, hwpt: HwptId, batch: &[Invalidation]) -> Result<InvalidateOutcome> {
        let st = self.read_state();
        let op = Op::HwptInvalidate;
        let h = st
            .hwpts
            .get(&hwpt.0)
            .ok_or_else(|| kerr(op, Ctx::object(hwpt.0), libc::ENOENT))?;
        if h.nested.is_none() {
            return Err(kerr(op, Ctx::object(hwpt.0), libc::EINVAL));
        }
        let total = batch.len() as u32;
        let mut tlb = self.tlb();
        for (i, inv) in batch.iter().enumerate() {
            let bad = |errno: i32| Error::PartialInvalidation {
                hwpt,
                handled: i as u32,
                total,
                errno: Errno(errno),
                cause: likely_cause(op, Errno(errno), &Ctx::object(hwpt.0)),
            };
            match *inv {
                Invalidation::All => {
                    tlb.invalidate_domain(hwpt.0, None);
                }
                Invalidation::Pasid(p) => {
                    tlb.invalidate_domain(hwpt.0, Some(p.0));
                }
                Invalidation::Range {
                    pasid,
                    addr,
                    npages,
                    leaf: _,
                } => {
                    // No paging-structure cache: a non-leaf invalidation drops the same entries.
                    if !addr.is_multiple_of(PAGE_SIZE) || (npages == u64::MAX && addr != 0) {
                        return Err(bad(libc::EINVAL));
                    }
                    let p = pasid.map(|p| p.0);
                    if npages == u64::MAX {
                        tlb.invalidate_domain(hwpt.0, p);
                    } else if npages > 0 {
                        let last = npages
                            .checked_mul(PAGE_SIZE)
                            .and_then(|b| addr.checked_add(b - 1))
                            .unwrap_or(u64::MAX);
                        tlb.invalidate_range(hwpt.0, p, addr, last);
                    }
                }
                Invalidation::Selftest { .. } => return Err(bad(libc::EINVAL)),
            }
        }
        Ok(InvalidateOutcome { handled: total })
    }

    fn fault_queue_alloc(&self) -> Result<Box<dyn FaultQueue>> {
        let mut st = self.write_state();
        let id = st.alloc_id();
        let shared = FaultShared::new(crate::types::FaultId(id))?;
        st.faults.insert(id, shared.clone());
        Ok(Box::new(SoftFaultQueue::new(shared)))
    }
}
