//! vSVA through the VT-d model and the bridge, on the soft backend: a guest (the Linux
//! harness, plus the PRQ programming intel-iommu's `intel_iommu_enable_prq` does) binds
//! first-stage GVA spaces to PASIDs of an emulated device; a test device DMAs with PRI
//! through the bridge's `SoftDma` exactly as the SVA copy engine does (read source, write
//! destination, a page request on a fault, wait for the answer, retry on Success, error on
//! Invalid). Every check reads what the device wrote into guest RAM, what the model wrote
//! into the guest's PRQ, or the answer the device got.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::pci::MsiMessage;
use devices::pci::PciBdf;
use devices::viommu::linux_harness::{desc, LinuxHarness, Stage};
use devices::viommu::{BridgeMode, GuestMemoryAccess, MsiSignal, ViommuBridge, Vtd, VtdConfig};
use ioasid::soft::{PendingPageRequest, SoftConfig, SoftIommu};
use ioasid::{DevId, DmaError, DmaRequest, IommuBackend, PageResponseCode, Pasid};
use vm_memory::{Bytes, GuestAddress};
use vmm::device_manager::dma::{map_ram, RamMapMode};
use vmm::memory::{GuestRam, RamConfig};
use vmm::viommu::{DevTlbHook, SoftDma, VmGuestMemory, VtdBridge, PAGE_REQUEST_TIMEOUT};

const MIB: u64 = 1 << 20;
const RAM: u64 = 128 * MIB;
const TABLES: u64 = 16 * MIB;
const TABLES_END: u64 = 32 * MIB;
/// Guest data pages.
const BUFS: u64 = 64 * MIB;
/// The guest process's virtual addresses.
const GVA: u64 = 0x7f00_0000_0000;

// VT-d registers the PRQ setup uses (VT-d 10.4.32-.38).
const RTADDR: u64 = 0x20;
const PQH: u64 = 0xc0;
const PQT: u64 = 0xc8;
const PQA: u64 = 0xd0;
const PRS: u64 = 0xdc;
const PECTL: u64 = 0xe0;
const PEDATA: u64 = 0xe4;
const PEADDR: u64 = 0xe8;
const PRS_PPR: u32 = 1 << 1;
const PRS_PRO: u32 = 1;

#[derive(Default)]
struct Msis(Mutex<Vec<MsiMessage>>);

impl MsiSignal for Msis {
    fn signal(&self, msg: MsiMessage) {
        self.0.lock().unwrap().push(msg);
    }
}

#[derive(Default)]
struct DevTlbLog(Mutex<Vec<(Option<Pasid>, u64, u64)>>);

impl DevTlbHook for DevTlbLog {
    fn invalidate(&self, pasid: Option<Pasid>, addr: u64, npages: u64) {
        self.0.lock().unwrap().push((pasid, addr, npages));
    }
}

/// One page request descriptor as the guest reads it from its PRQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prd {
    rid: u16,
    pasid: Option<u32>,
    prgi: u16,
    last: bool,
    read: bool,
    write: bool,
    exec: bool,
    privileged: bool,
    addr: u64,
}

fn decode(q0: u64, q1: u64) -> Prd {
    assert_eq!(q0 & 0xff, 1, "descriptor type: page request");
    let pp = q0 & (1 << 8) != 0;
    Prd {
        rid: (q0 >> 16) as u16,
        pasid: pp.then_some(((q0 >> 32) & 0xf_ffff) as u32),
        prgi: ((q1 >> 3) & 0x1ff) as u16,
        last: q1 & 4 != 0,
        read: q1 & 1 != 0,
        write: q1 & 2 != 0,
        exec: q0 & (1 << 52) != 0,
        privileged: q0 & (1 << 53) != 0,
        addr: q1 & !0xfff,
    }
}

/// How a test copy ended (the engine's completion statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Success,
    PageFault,
    Timeout,
}

/// The test device: copies `len` bytes from `src` to `dst` in the address space of `pasid`,
/// with PRI, as the SVA copy engine does. One `step` is one attempt: it returns the page
/// request it raised (the device waits for its answer) or the end of the copy.
struct CopyDev {
    dma: Arc<SoftDma>,
}

enum Step {
    Done(Status),
    Waiting(PendingPageRequest),
}

impl CopyDev {
    fn step(&self, pasid: u32, src: u64, dst: u64, len: usize) -> Step {
        let req = DmaRequest {
            pri: true,
            ..Default::default()
        };
        let p = Some(Pasid(pasid));
        let mut buf = vec![0u8; len];
        let r = self
            .dma
            .read_req(p, src, &mut buf, req)
            .and_then(|()| self.dma.write_req(p, dst, &buf, req));
        match r {
            Ok(()) => Step::Done(Status::Success),
            Err(DmaError::PageRequest(pending)) => Step::Waiting(pending),
            Err(DmaError::Timeout(_)) => Step::Done(Status::Timeout),
            Err(_) => Step::Done(Status::PageFault),
        }
    }
}

struct Sva {
    ram: GuestRam,
    soft: Arc<SoftIommu>,
    bridge: Arc<VtdBridge>,
    vtd: Arc<Mutex<Vtd>>,
    h: LinuxHarness,
    msis: Arc<Msis>,
    bdf: PciBdf,
    dev: CopyDev,
    dev_id: DevId,
    prq: u64,
    prq_head: u64,
    next_buf: u64,
}

fn vsva_config() -> VtdConfig {
    VtdConfig {
        scalable_mode: true,
        first_stage: true,
        pasid_bits: 20,
        svm: true,
        device_tlb: true,
        aw_bits: 48,
        segment: 0,
    }
}

impl Sva {
    /// A booted unit with the PRQ enabled and the device probed with PRE (what Linux's
    /// `intel_iommu_enable_iopf` leads to: the context entry's PRE bit), its PASID width
    /// `pasid_bits`.
    fn new(pasid_bits: u8) -> Sva {
        Self::with_timeout(pasid_bits, PAGE_REQUEST_TIMEOUT)
    }

    fn with_timeout(pasid_bits: u8, timeout: Duration) -> Sva {
        let ram = GuestRam::new(RamConfig {
            size: RAM,
            hugepages: false,
        })
        .unwrap();
        let soft =
            Arc::new(SoftIommu::from_guest_memory(ram.memory(), SoftConfig::default()).unwrap());
        let ram_ioas = soft.ioas_alloc().unwrap();
        map_ram(&*soft, ram_ioas, ram.regions(), RamMapMode::ByAddress).unwrap();
        let backend: Arc<dyn IommuBackend> = soft.clone();
        let bridge = Arc::new(
            VtdBridge::new(backend, ram_ioas, ram.regions().to_vec())
                .with_page_request_timeout(timeout),
        );
        let mem: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(ram.memory().clone()));
        let msis = Arc::new(Msis::default());
        let b: Arc<dyn ViommuBridge> = bridge.clone();
        let vtd = Vtd::new(vsva_config(), mem.clone(), b, msis.clone()).unwrap();
        let vtd = Arc::new(Mutex::new(vtd));
        let bdf: PciBdf = "00:04.0".parse().unwrap();
        let dev_id = soft.register_device("sva-test").unwrap();
        let dma = bridge
            .add_emulated_soft(bdf, soft.clone(), dev_id, pasid_bits)
            .unwrap();
        vtd.lock().unwrap().add_device(bdf);
        let mut h = LinuxHarness::new(mem, TABLES..TABLES_END);
        h.ats = true;
        let mut s = Sva {
            ram,
            soft,
            bridge,
            vtd,
            h,
            msis,
            bdf,
            dev: CopyDev { dma },
            dev_id,
            prq: 0,
            prq_head: 0,
            next_buf: BUFS,
        };
        {
            let mut v = s.vtd.lock().unwrap();
            s.h.boot(&mut *v).unwrap();
            // intel_iommu_enable_prq: one page (128 descriptors), head = tail = 0, the
            // event's message, unmasked.
            s.prq = s.h.alloc(1).unwrap();
            w64(&mut *v, PQH, 0);
            w64(&mut *v, PQT, 0);
            w64(&mut *v, PQA, s.prq);
            w32(&mut *v, PEDATA, 0x42);
            w32(&mut *v, PEADDR, 0xfee0_0000);
            w32(&mut *v, PECTL, 0);
            s.h.probe(&mut *v, bdf).unwrap();
        }
        s.set_pre();
        s
    }

    /// Sets PRE in the device's scalable-mode context entry and flushes it.
    fn set_pre(&mut self) {
        let mut v = self.vtd.lock().unwrap();
        let root = r64(&mut *v, RTADDR) & !0xfff;
        let devfn = u64::from(self.bdf.rid() & 0xff);
        let half = if devfn >= 128 { 8 } else { 0 };
        let re = self.r64g(root + u64::from(self.bdf.bus()) * 16 + half);
        assert_eq!(re & 1, 1, "root entry present after probe");
        let ctx = (re & !0xfff) + (devfn & 0x7f) * 32;
        let lo = self.r64g(ctx);
        self.w64g(ctx, lo | (1 << 4));
        self.h
            .submit(&mut *v, &[desc::context_device(0, self.bdf.rid(), 0)])
            .unwrap();
    }

    fn attach(&mut self, pasid: u32) -> u16 {
        let mut v = self.vtd.lock().unwrap();
        self.h
            .attach_pasid(&mut *v, self.bdf, pasid, Stage::First)
            .unwrap()
    }

    fn map(&mut self, pasid: u32, gva: u64, gpa: u64, len: u64) {
        let mut v = self.vtd.lock().unwrap();
        self.h
            .map_pasid(&mut *v, self.bdf, pasid, gva, gpa, len)
            .unwrap();
    }

    /// A fresh data page in guest RAM, filled with `fill`.
    fn page(&mut self, fill: u8) -> u64 {
        let p = self.next_buf;
        self.next_buf += 4096;
        self.ram
            .memory()
            .write_slice(&[fill; 4096], GuestAddress(p))
            .unwrap();
        p
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.ram
            .memory()
            .write_slice(data, GuestAddress(gpa))
            .unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.ram
            .memory()
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap();
        v
    }

    fn r64g(&self, gpa: u64) -> u64 {
        self.ram.memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    fn w64g(&self, gpa: u64, v: u64) {
        self.ram.memory().write_obj(v, GuestAddress(gpa)).unwrap();
    }

    fn pump(&self) -> vmm::viommu::PumpReport {
        self.bridge.pump(&self.vtd, Instant::now())
    }

    /// The guest's PRQ handler: every descriptor from PQH to PQT, then PQH = PQT and PPR
    /// cleared (`prq_event_thread`).
    fn drain_prq(&mut self) -> Vec<Prd> {
        let mut v = self.vtd.lock().unwrap();
        let tail = r64(&mut *v, PQT);
        let mut out = Vec::new();
        while self.prq_head != tail {
            // A ring of 128 descriptors: a tail the head never reaches fails, not hangs.
            assert!(out.len() < 128, "PQT {tail:#x} is not a descriptor offset");
            let a = self.prq + self.prq_head;
            out.push(decode(self.r64g(a), self.r64g(a + 8)));
            self.prq_head = (self.prq_head + 32) % 4096;
        }
        w64(&mut *v, PQH, self.prq_head);
        w32(&mut *v, PRS, PRS_PPR);
        out
    }

    fn prs(&self) -> u32 {
        let mut v = self.vtd.lock().unwrap();
        r32(&mut *v, PRS)
    }

    /// A page group response (`code`: 0 success, 1 invalid).
    fn respond(&mut self, d: &Prd, code: u8) {
        let mut v = self.vtd.lock().unwrap();
        self.h
            .submit(
                &mut *v,
                &[desc::page_response(d.rid, d.pasid, d.prgi, code)],
            )
            .unwrap();
    }
}

fn w64(v: &mut dyn BusDevice, off: u64, x: u64) {
    v.write(0, off, &x.to_le_bytes());
}

fn w32(v: &mut dyn BusDevice, off: u64, x: u32) {
    v.write(0, off, &x.to_le_bytes());
}

fn r64(v: &mut dyn BusDevice, off: u64) -> u64 {
    let mut b = [0u8; 8];
    v.read(0, off, &mut b);
    u64::from_le_bytes(b)
}

fn r32(v: &mut dyn BusDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    v.read(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

#[test]
fn vsva_gva_copy_pasid5() {
    let mut s = Sva::new(20);
    let did = s.attach(5);
    // The guest process: source and destination buffers, two pages each, scattered in GPA.
    let (src_gpa, dst_gpa) = (s.page(0), s.page(0));
    let (src2, dst2) = (s.page(0), s.page(0));
    s.map(5, GVA, src_gpa, 4096);
    s.map(5, GVA + 4096, src2, 4096);
    s.map(5, GVA + 0x10_0000, dst_gpa, 4096);
    s.map(5, GVA + 0x10_1000, dst2, 4096);
    let data = pattern(0x5a, 8192);
    s.write(src_gpa, &data[..4096]);
    s.write(src2, &data[4096..]);
    match s.dev.step(5, GVA + 0x10, GVA + 0x10_0010, 8000) {
        Step::Done(st) => assert_eq!(st, Status::Success),
        Step::Waiting(p) => panic!("unexpected page request {:?}", p.fault()),
    }
    let mut got = s.read(dst_gpa + 0x10, 4096 - 0x10);
    got.extend(s.read(dst2, 8000 - (4096 - 0x10)));
    assert_eq!(got, data[0x10..0x10 + 8000].to_vec());

    // The binding: soft first stage on PASID 5, a host PASID from the VM's PASID space.
    let v = s.bridge.devices();
    let e = v.iter().find(|d| d.pasid == Pasid(5)).unwrap();
    assert_eq!((e.mode, e.did), (BridgeMode::Soft, Some(did)));
    let bindings = s.bridge.pasid_space().lock().unwrap().bindings();
    assert_eq!(bindings.len(), 1, "{bindings:?}");
    let space_id = DevId(s.dev_id.0 | vmm::viommu::EMULATED_SPACE_TAG);
    assert_eq!((bindings[0].dev, bindings[0].guest), (space_id, Pasid(5)));
    let views = s.bridge.pasids();
    assert_eq!(views.len(), 1);
    assert_eq!((views[0].bdf, views[0].host), (s.bdf, bindings[0].host));
    assert_eq!(views[0].host_pt, e.host_pt);
    // The host PASID is what the soft backend sees: a DMA on it (bypassing the guest
    // PASID) reaches the same GVA space.
    let mut b = [0u8; 4];
    s.soft
        .dma_read(
            s.dev_id,
            Some(bindings[0].host),
            GVA + 0x10_0010,
            &mut b,
            DmaRequest::default(),
        )
        .unwrap();
    assert_eq!(&b, &data[0x10..0x14]);
    // A PASID the guest never bound faults.
    assert!(matches!(
        s.dev
            .dma
            .read_req(Some(Pasid(6)), GVA, &mut b, DmaRequest::default()),
        Err(DmaError::Fault(_))
    ));

    // Device-TLB: the guest's unmap sends a PASID-based device-TLB invalidation, which
    // reaches the device's hook with the guest PASID.
    let log = Arc::new(DevTlbLog::default());
    s.bridge.set_devtlb_hook(s.bdf, log.clone()).unwrap();
    {
        let mut v = s.vtd.lock().unwrap();
        s.h.unmap_pasid(&mut *v, s.bdf, 5, GVA + 0x10_0000, 4096)
            .unwrap();
    }
    let calls = log.0.lock().unwrap().clone();
    assert_eq!(calls, vec![(Some(Pasid(5)), GVA + 0x10_0000, 1)]);
    assert!(matches!(
        s.dev.step(5, GVA, GVA + 0x10_0000, 16),
        Step::Waiting(_)
    ));
}

/// Runs one copy to its end, answering each page request as `guest` decides: it gets the
/// descriptor and returns the response code after fixing what it wants.
fn run_copy(
    s: &mut Sva,
    pasid: u32,
    src: u64,
    dst: u64,
    len: usize,
    mut guest: impl FnMut(&mut Sva, &Prd) -> u8,
) -> (Status, Vec<Prd>) {
    let mut seen = Vec::new();
    // A bound on the attempts instead of a clock: each fixed fault is one more attempt.
    for _ in 0..16 {
        let pending = match s.dev.step(pasid, src, dst, len) {
            Step::Done(st) => return (st, seen),
            Step::Waiting(p) => p,
        };
        let rep = s.pump();
        assert_eq!(rep.posted, 1, "{rep:?}");
        let prds = s.drain_prq();
        assert_eq!(prds.len(), 1, "{prds:?}");
        let code = guest(s, &prds[0]);
        s.respond(&prds[0], code);
        seen.push(prds[0]);
        match pending.poll() {
            Some(PageResponseCode::Success) => continue,
            Some(PageResponseCode::Invalid) => return (Status::PageFault, seen),
            None => panic!("the device got no answer after the guest's response"),
        }
    }
    panic!("the copy did not end in 16 attempts");
}

#[test]
fn vsva_fault_prq_response_completes() {
    let mut s = Sva::new(20);
    s.attach(5);
    let src = s.page(0);
    let dst = s.page(0xee);
    s.map(5, GVA, src, 4096);
    let data = pattern(7, 256);
    s.write(src + 0x100, &data);
    let msis_before = s.msis.0.lock().unwrap().len();
    // The destination was never touched: the write faults, the guest faults it in.
    let (st, prds) = run_copy(&mut s, 5, GVA + 0x100, GVA + 0x20_0100, 256, |s, d| {
        s.map(5, d.addr, dst, 4096);
        0
    });
    assert_eq!(st, Status::Success);
    assert_eq!(s.read(dst + 0x100, 256), data);
    assert_eq!(
        s.read(dst, 4),
        vec![0xee; 4],
        "only the copy's bytes written"
    );
    assert_eq!(prds.len(), 1);
    let d = prds[0];
    assert_eq!(
        (
            d.rid,
            d.pasid,
            d.last,
            d.read,
            d.write,
            d.exec,
            d.privileged,
            d.addr
        ),
        (
            s.bdf.rid(),
            Some(5),
            true,
            false,
            true,
            false,
            false,
            GVA + 0x20_0000
        ),
        "{d:?}"
    );
    // The page request event went to the guest.
    let msis = s.msis.0.lock().unwrap().clone();
    assert!(
        msis[msis_before..]
            .iter()
            .any(|m| m.address == 0xfee0_0000 && m.data == 0x42),
        "{msis:?}"
    );
    let c = s.bridge.counters();
    assert_eq!(
        (
            c.page_requests,
            c.page_responses_success,
            c.page_responses_invalid
        ),
        (1, 1, 0),
        "{c:?}"
    );
    assert_eq!(s.vtd.lock().unwrap().counters().page_requests, 1);
}

#[test]
fn vsva_invalid_response_reports_error() {
    let mut s = Sva::new(20);
    s.attach(5);
    let src = s.page(0);
    s.map(5, GVA, src, 4096);
    let dst = s.page(0xcc);
    // The guest cannot fix the fault (a bad pointer in the process): Invalid.
    let (st, prds) = run_copy(&mut s, 5, GVA, GVA + 0x30_0000, 64, |_, _| 1);
    assert_eq!(st, Status::PageFault);
    assert_eq!(prds.len(), 1);
    assert_eq!(s.read(dst, 64), vec![0xcc; 64]);
    let c = s.bridge.counters();
    assert_eq!(
        (
            c.page_requests,
            c.page_responses_success,
            c.page_responses_invalid
        ),
        (1, 0, 1),
        "{c:?}"
    );
    // The group is answered once: a second response for it is dropped and counted.
    s.respond(&prds[0], 0);
    assert_eq!(s.bridge.counters().page_responses_unmatched, 1);
    // A request without PRI (the engine's NO_PRI) faults for good: no page request, the
    // guest sees a DMA remapping fault (write, on PASID 5) in its fault recording registers.
    let before = s.vtd.lock().unwrap().counters().faults_recorded;
    assert!(matches!(
        s.dev
            .dma
            .write_req(Some(Pasid(5)), GVA + 0x30_0000, b"x", DmaRequest::default()),
        Err(DmaError::Fault(_))
    ));
    let rep = s.pump();
    assert_eq!((rep.posted, rep.dma_faults), (0, 1), "{rep:?}");
    assert_eq!(s.vtd.lock().unwrap().counters().faults_recorded, before + 1);
}

#[test]
fn vsva_pasid_too_wide_rejected() {
    // The device's PASID capability is 8 bits wide; the unit's is 20.
    let mut s = Sva::new(8);
    let faults_before = s.vtd.lock().unwrap().counters().faults_recorded;
    s.attach(0x100);
    // The bridge refused it: no host binding, the model recorded a fault, DMA on it faults.
    assert!(s
        .bridge
        .devices()
        .iter()
        .all(|d| d.pasid != Pasid(0x100) || d.mode == BridgeMode::Blocked));
    assert!(s.bridge.pasid_space().lock().unwrap().bindings().is_empty());
    assert!(s.vtd.lock().unwrap().counters().faults_recorded > faults_before);
    let mut b = [0u8; 4];
    assert!(s
        .dev
        .dma
        .read_req(Some(Pasid(0x100)), GVA, &mut b, DmaRequest::default())
        .is_err());
    // The widest PASID the device has works.
    s.attach(0xff);
    let p = s.page(0x77);
    s.map(0xff, GVA, p, 4096);
    s.dev
        .dma
        .read_req(Some(Pasid(0xff)), GVA, &mut b, DmaRequest::default())
        .unwrap();
    assert_eq!(b, [0x77; 4]);
    let bindings = s.bridge.pasid_space().lock().unwrap().bindings();
    assert_eq!(bindings.len(), 1);
    assert_eq!(bindings[0].guest, Pasid(0xff));
}

#[test]
fn vsva_pasids_isolated() {
    let mut s = Sva::new(20);
    s.attach(5);
    s.attach(6);
    let (a_src, a_dst) = (s.page(0xa1), s.page(0));
    let (b_src, b_dst) = (s.page(0xb2), s.page(0));
    // Same GVAs, different address spaces.
    s.map(5, GVA, a_src, 4096);
    s.map(5, GVA + 0x1000, a_dst, 4096);
    s.map(6, GVA, b_src, 4096);
    s.map(6, GVA + 0x1000, b_dst, 4096);
    // Only PASID 5 maps this one.
    let secret = s.page(0x5e);
    s.map(5, GVA + 0x8000, secret, 4096);
    for (p, dst, fill) in [(5u32, a_dst, 0xa1u8), (6, b_dst, 0xb2)] {
        match s.dev.step(p, GVA, GVA + 0x1000, 4096) {
            Step::Done(st) => assert_eq!(st, Status::Success),
            Step::Waiting(x) => panic!("{:?}", x.fault()),
        }
        assert_eq!(s.read(dst, 4096), vec![fill; 4096], "PASID {p}");
    }
    // PASID 6 reading PASID 5's page: a page request for PASID 6, never PASID 5's data.
    let (st, prds) = run_copy(&mut s, 6, GVA + 0x8000, GVA + 0x1000, 16, |_, _| 1);
    assert_eq!(st, Status::PageFault);
    assert_eq!(prds[0].pasid, Some(6));
    assert_eq!(prds[0].addr, GVA + 0x8000);
    assert_eq!(s.read(b_dst, 16), vec![0xb2; 16]);
    let hosts: Vec<Pasid> = s
        .bridge
        .pasid_space()
        .lock()
        .unwrap()
        .bindings()
        .iter()
        .map(|b| b.host)
        .collect();
    assert_eq!(hosts.len(), 2);
    assert_ne!(hosts[0], hosts[1]);
}

#[test]
fn vsva_prq_full_answers_and_counts() {
    let mut s = Sva::new(20);
    s.attach(5);
    let src = s.page(0x11);
    s.map(5, GVA, src, 4096);
    // 130 faulting copies in flight, each to its own unmapped page; the guest's PRQ has
    // 128 slots, 127 usable (head == tail means empty).
    let mut pending = Vec::new();
    for i in 0..130u64 {
        match s.dev.step(5, GVA, GVA + 0x100_0000 + i * 4096, 8) {
            Step::Waiting(p) => pending.push(p),
            Step::Done(st) => panic!("copy {i} ended {st:?}"),
        }
    }
    let rep = s.pump();
    assert_eq!((rep.posted, rep.prq_full), (127, 3), "{rep:?}");
    assert_ne!(s.prs() & PRS_PRO, 0, "PRS.PRO set");
    // The three that did not fit were answered Success: their devices retry.
    let answered: Vec<usize> = pending
        .iter()
        .enumerate()
        .filter_map(|(i, p)| (p.poll() == Some(PageResponseCode::Success)).then_some(i))
        .collect();
    assert_eq!(answered.len(), 3, "{answered:?}");
    assert_eq!(s.bridge.counters().prq_full_answers, 3);
    // The guest drains its queue, clears PRO and answers everything after mapping.
    let prds = s.drain_prq();
    assert_eq!(prds.len(), 127);
    {
        let mut v = s.vtd.lock().unwrap();
        w32(&mut *v, PRS, PRS_PRO);
    }
    let dst = s.page(0);
    for d in &prds {
        s.map(5, d.addr, dst, 4096);
        s.respond(d, 0);
    }
    for p in &pending {
        let _ = p.poll();
    }
    // The retried three fault again and now reach the guest.
    for i in answered {
        let st = s.dev.step(5, GVA, GVA + 0x100_0000 + i as u64 * 4096, 8);
        let Step::Waiting(p) = st else {
            panic!("retry of {i} did not fault");
        };
        assert_eq!(s.pump().posted, 1);
        let d = s.drain_prq();
        assert_eq!(d[0].addr, GVA + 0x100_0000 + i as u64 * 4096);
        drop(p);
    }
    let c = s.bridge.counters();
    assert_eq!(
        (c.page_requests, c.page_responses_success),
        (133, 127),
        "{c:?}"
    );
    assert_eq!(s.vtd.lock().unwrap().counters().prq_full, 3);
}

#[test]
fn vsva_pasid_teardown_answers_outstanding() {
    let mut s = Sva::new(20);
    s.attach(5);
    let src = s.page(0);
    s.map(5, GVA, src, 4096);
    let Step::Waiting(p) = s.dev.step(5, GVA, GVA + 0x40_0000, 8) else {
        panic!("expected a page request");
    };
    assert_eq!(s.pump().posted, 1);
    let prds = s.drain_prq();
    // The process exits before the guest answers: intel_svm unbinds, the PASID entry goes.
    {
        let mut v = s.vtd.lock().unwrap();
        s.h.detach_pasid(&mut *v, s.bdf, 5).unwrap();
    }
    assert_eq!(p.poll(), Some(PageResponseCode::Invalid));
    let c = s.bridge.counters();
    assert_eq!(c.page_requests_torn_down, 1, "{c:?}");
    assert!(s.bridge.pasid_space().lock().unwrap().bindings().is_empty());
    // The guest's late answer matches nothing.
    s.respond(&prds[0], 0);
    assert_eq!(s.bridge.counters().page_responses_unmatched, 1);
    // Removal answers what is left on other PASIDs too.
    s.attach(7);
    s.map(7, GVA, src, 4096);
    let Step::Waiting(p7) = s.dev.step(7, GVA, GVA + 0x40_0000, 8) else {
        panic!("expected a page request");
    };
    assert_eq!(s.pump().posted, 1);
    s.vtd.lock().unwrap().remove_device(s.bdf);
    let rel = s.bridge.remove(s.bdf).unwrap();
    assert_eq!(rel.page_requests_answered, 1, "{rel:?}");
    assert_eq!(p7.poll(), Some(PageResponseCode::Invalid));
    assert!(s.bridge.pasid_space().lock().unwrap().bindings().is_empty());
}

#[test]
fn vsva_unanswered_page_request_times_out() {
    let mut s = Sva::with_timeout(20, Duration::from_secs(5));
    s.attach(5);
    let src = s.page(0);
    s.map(5, GVA, src, 4096);
    let Step::Waiting(p) = s.dev.step(5, GVA, GVA + 0x50_0000, 8) else {
        panic!("expected a page request");
    };
    let t0 = Instant::now();
    assert_eq!(s.bridge.pump(&s.vtd, t0).posted, 1);
    assert_eq!(p.poll(), None, "not answered before the deadline");
    // The pump at a later instant (given, not waited for) answers it Invalid.
    let rep = s.bridge.pump(&s.vtd, t0 + Duration::from_secs(6));
    assert_eq!(rep.timeouts, 1);
    assert_eq!(p.poll(), Some(PageResponseCode::Invalid));
    assert_eq!(s.bridge.counters().page_request_timeouts, 1);
    // The guest's answer after the timeout is dropped.
    let prds = s.drain_prq();
    s.respond(&prds[0], 0);
    assert_eq!(s.bridge.counters().page_responses_unmatched, 1);
}
