//! The engine over the real soft backend: a `DmaView` as the VMM builds one (the device's
//! requests without PASID on a guest-RAM IOAS, PASID 5 on a nested HWPT whose first-stage
//! table lives in guest RAM and has a fault queue). A not-present destination raises a real
//! page request on the `ioasid` fault queue; the test plays the VMM and the guest (fix the
//! table, answer by cookie) and the copy completes.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ioasid::backend::FaultQueue;
use ioasid::{
    DevId, DmaError, DmaRequest, FaultRecord, HostRegion, HwptAlloc, IommuBackend, MapUser,
    PageFault, PageResponse, PageResponseCode, Pasid, Perm, PtId, SoftIommu, Stage1Format,
    VtdStage1,
};

use super::abi::{self, ctrl, flags, reg, RawDescriptor, PASID_VALID};
use super::caps;
use super::SvaEngine;
use crate::pci::config::{command, reg as creg};
use crate::pci::interrupt::{InterruptError, InterruptSink, MsiMessage, MsiVector};
use crate::pci::PciDevice;
use crate::viommu::DmaView;

const RAM_LEN: u64 = 1 << 20;
const RING: u64 = 0x30000;
const PASID: u32 = 5;

/// Guest RAM: an anonymous mapping, touched only with volatile accesses.
struct Ram {
    map: *mut libc::c_void,
}

// SAFETY: plain anonymous memory owned by this value, only accessed with volatile operations.
unsafe impl Send for Ram {}
// SAFETY: as above.
unsafe impl Sync for Ram {}

impl Ram {
    fn new() -> Ram {
        // SAFETY: an anonymous private mapping; the result is checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAM_LEN as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(map, libc::MAP_FAILED);
        Ram { map }
    }

    fn base(&self) -> u64 {
        self.map as u64
    }

    fn poke(&self, gpa: u64, data: &[u8]) {
        assert!(gpa + data.len() as u64 <= RAM_LEN);
        for (i, b) in data.iter().enumerate() {
            // SAFETY: inside our own mapping (checked above).
            unsafe { std::ptr::write_volatile((self.base() + gpa + i as u64) as *mut u8, *b) }
        }
    }

    fn peek(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa + len as u64 <= RAM_LEN);
        (0..len as u64)
            // SAFETY: inside our own mapping (checked above).
            .map(|i| unsafe { std::ptr::read_volatile((self.base() + gpa + i) as *const u8) })
            .collect()
    }

    fn w64(&self, gpa: u64, v: u64) {
        self.poke(gpa, &v.to_le_bytes());
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, after its users (declared later, dropped first).
        unsafe { libc::munmap(self.map, RAM_LEN as usize) };
    }
}

/// The VMM's view: requests without PASID use the RID's attachment, PASID 5 its own; the
/// request attributes (PRI, privileged) go through.
struct SoftView {
    soft: Arc<SoftIommu>,
    dev: DevId,
}

impl DmaView for SoftView {
    fn read(&self, pasid: Option<Pasid>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read_with(pasid, iova, buf, DmaRequest::default())
    }
    fn write(&self, pasid: Option<Pasid>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.write_with(pasid, iova, buf, DmaRequest::default())
    }
    fn read_with(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        self.soft.dma_read(self.dev, pasid, iova, buf, req)
    }
    fn write_with(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        self.soft.dma_write(self.dev, pasid, iova, buf, req)
    }
}

struct NoIrq;

impl InterruptSink for NoIrq {
    fn msi_route(
        &self,
        _v: MsiVector,
        _m: MsiMessage,
        _masked: bool,
    ) -> Result<vmm_sys_util::eventfd::EventFd, InterruptError> {
        Ok(vmm_sys_util::eventfd::EventFd::new(0).unwrap())
    }
    fn msi_update(&self, _v: MsiVector, _m: MsiMessage) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_mask(&self, _v: MsiVector, _m: bool) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_release(&self, _v: MsiVector) {}
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;

/// A 4-level first-stage table at GPA 0x1000..0x5000 mapping user page `va` to `gpa`.
fn map_4k(ram: &Ram, va: u64, gpa: u64) {
    let (l4, l3, l2, l1) = (0x1000, 0x2000, 0x3000, 0x4000);
    let idx = |lvl: u32| (va >> (12 + 9 * (lvl - 1))) & 0x1ff;
    ram.w64(l4 + idx(4) * 8, l3 | P | RW | US);
    ram.w64(l3 + idx(3) * 8, l2 | P | RW | US);
    ram.w64(l2 + idx(2) * 8, l1 | P | RW | US);
    ram.w64(l1 + idx(1) * 8, gpa | P | RW | US);
}

/// Reads the fault queue until a page request arrives (deadline 20 s).
fn next_request(q: &mut dyn FaultQueue) -> PageFault {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        for r in q.read_records().unwrap() {
            if let FaultRecord::PageRequest(p) = r {
                return p;
            }
        }
        assert!(Instant::now() < end, "no page request");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn completion(ram: &Ram, gpa: u64) -> (u32, u64) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let b: [u8; 16] = ram.peek(gpa, 16).try_into().unwrap();
        let r = abi::decode_completion(&b);
        if r.0 != 0 {
            return r;
        }
        assert!(Instant::now() < end, "no completion");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn sva_soft_backend_page_request_round_trip() {
    let ram = Ram::new();
    let region = HostRegion {
        hva: ram.base(),
        len: RAM_LEN,
    };
    // SAFETY: the RAM mapping outlives the IOMMU (the engine and the IOMMU are dropped at
    // the end of this function before `ram`, declared first) and is only accessed with
    // volatile operations.
    let soft = Arc::new(unsafe { SoftIommu::new(&[region]) }.unwrap());
    let mut queue = soft.fault_queue_alloc().unwrap();
    let dev = soft.register_device("sva").unwrap();
    let ioas = soft.ioas_alloc().unwrap();
    let map = MapUser {
        iova: Some(0),
        user_va: ram.base(),
        len: RAM_LEN,
        perm: Perm::RW,
    };
    // SAFETY: the whole registered RAM region, which outlives the IOMMU.
    unsafe { soft.ioas_map(ioas, &map) }.unwrap();
    let parent = soft.hwpt_alloc(&HwptAlloc::nest_parent(dev, ioas)).unwrap();
    let s1 = VtdStage1 {
        pgtbl_addr: 0x1000,
        addr_width: 48,
        sre: false,
        wpe: false,
        eafe: false,
    };
    let hwpt = soft
        .hwpt_alloc(&HwptAlloc::nested(
            dev,
            parent,
            Stage1Format::VtdS1(s1),
            Some(queue.id()),
            true,
        ))
        .unwrap();
    soft.attach(dev, None, PtId::Ioas(ioas)).unwrap();
    soft.attach(dev, Some(Pasid(PASID)), PtId::Hwpt(hwpt))
        .unwrap();

    // User memory: source and completion records mapped, destination not yet.
    let (src, dst, comp) = (0x7000_0000u64, 0x7000_1000u64, 0x7000_2000u64);
    map_4k(&ram, src, 0x20000);
    map_4k(&ram, comp, 0x22000);
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    ram.poke(0x20000, &data);

    let view = Arc::new(SoftView {
        soft: soft.clone(),
        dev,
    });
    let mut eng = SvaEngine::new(view, Arc::new(NoIrq), super::SvaOptions::default()).unwrap();
    let cfgw = |e: &mut SvaEngine, off: usize, d: &[u8]| {
        e.write_config_register(off / 4, (off % 4) as u64, d)
    };
    cfgw(
        &mut eng,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    cfgw(
        &mut eng,
        caps::PASID_CAP + 6,
        &caps::PASID_CTRL_ENABLE.to_le_bytes(),
    );
    cfgw(&mut eng, caps::PRI_CAP + 12, &32u32.to_le_bytes());
    cfgw(
        &mut eng,
        caps::PRI_CAP + 4,
        &caps::PRI_CTRL_ENABLE.to_le_bytes(),
    );
    let bar = |e: &mut SvaEngine, off: u64, v: u32| e.write_bar(0, off, &v.to_le_bytes());
    bar(&mut eng, reg::RING_BASE, RING as u32);
    bar(&mut eng, reg::RING_SIZE, 4);
    bar(&mut eng, reg::CTRL, ctrl::ENABLE);
    let d = |dst: u64, comp: u64| RawDescriptor {
        pasid: PASID_VALID | PASID,
        flags: flags::INTERRUPT,
        src,
        dst,
        len: 4096,
        completion: comp,
        reserved_nonzero: false,
    };
    ram.poke(RING, &d(dst, comp).encode());
    bar(&mut eng, reg::RING_TAIL, 1);

    // The page request the engine raised: PASID 5, a write at the destination.
    let pf = next_request(queue.as_mut());
    assert_eq!((pf.dev, pf.pasid, pf.addr), (dev, Some(Pasid(PASID)), dst));
    assert!(pf.perm.write && pf.last_page);
    map_4k(&ram, dst, 0x21000);
    queue
        .respond(PageResponse {
            cookie: pf.cookie,
            code: PageResponseCode::Success,
        })
        .unwrap();
    assert_eq!(completion(&ram, 0x22000), (1, 4096));
    assert_eq!(ram.peek(0x21000, 4096), data);

    // A destination the guest refuses: Invalid → PAGE_FAULT.
    ram.poke(RING + 64, &d(0x7000_5000, comp + 16).encode());
    bar(&mut eng, reg::RING_TAIL, 2);
    let pf = next_request(queue.as_mut());
    assert_eq!(pf.addr, 0x7000_5000);
    queue
        .respond(PageResponse {
            cookie: pf.cookie,
            code: PageResponseCode::Invalid,
        })
        .unwrap();
    assert_eq!(completion(&ram, 0x22010), (2, 0));
    let mut st = [0u8; 4];
    eng.read_bar(0, reg::PRQ_STATS, &mut st);
    assert_eq!(u32::from_le_bytes(st), 2);
    eng.removed();
    drop(eng);
    drop(queue);
}
