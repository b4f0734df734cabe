//! vSVA's fault path on a real kernel, with the iommufd selftest mock as the device: the
//! guest (the VT-d model driven by its Linux harness, with the PRQ enabled and PRE in the
//! device's context entry) binds PASID 5 to a first-stage table; the bridge nests it on the
//! mock (`IOMMU_HWPT_ALLOC_PASID`, a fault queue, attached to the host PASID the VM's PASID
//! space gave it). A mock-triggered IOPF (`IOMMU_TEST_OP_TRIGGER_IOPF`) on that host PASID
//! arrives in the guest's PRQ as the right page request descriptor (guest PASID, PRGI, R/W,
//! last page, address); the guest's page group response becomes the kernel's page response
//! (`write` on the fault fd, which the kernel refuses for a group it does not have pending).

use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::pci::{MsiMessage, PciBdf};
use devices::viommu::linux_harness::{desc, LinuxHarness, Stage};
use devices::viommu::{BridgeMode, GuestMemoryAccess, MsiSignal, ViommuBridge, Vtd, VtdConfig};
use ioasid::iommufd::selftest::{MockDevice, MOCK_FLAGS_DEVICE_PASID};
use ioasid::{IommuBackend, IommufdBackend, Pasid};
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::{GuestRam, RamConfig};
use vmm::viommu::{VmGuestMemory, VtdBridge};

use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The vSVA lab tests on the mock.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "vsva_mock_iopf_to_guest_prq_and_back",
        run: vsva_mock_iopf_to_guest_prq_and_back,
    }]
}

fn s(e: impl std::error::Error) -> String {
    chain(&e)
}

const MIB: u64 = 1 << 20;
const PQH: u64 = 0xc0;
const PQT: u64 = 0xc8;
const PQA: u64 = 0xd0;
const PRS: u64 = 0xdc;
const PECTL: u64 = 0xe0;
const RTADDR: u64 = 0x20;
const PERM_RW: u32 = 1 | 2;

struct NoMsi;

impl MsiSignal for NoMsi {
    fn signal(&self, _msg: MsiMessage) {}
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

struct Rig {
    b: Arc<IommufdBackend>,
    mock: MockDevice,
    ram: GuestRam,
    bridge: Arc<VtdBridge>,
    vtd: Arc<Mutex<Vtd>>,
    h: LinuxHarness,
    bdf: PciBdf,
    prq: u64,
    head: u64,
}

impl Rig {
    fn r64g(&self, gpa: u64) -> Result<u64, String> {
        self.ram.memory().read_obj(GuestAddress(gpa)).map_err(s)
    }

    /// Pumps until the guest's PRQ has a descriptor (deadline 5 s); returns (q0, q1).
    fn next_request(&mut self) -> Result<(u64, u64), String> {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            self.bridge.pump(&self.vtd, Instant::now());
            let tail = {
                let mut v = self.vtd.lock().map_err(|e| e.to_string())?;
                r64(&mut *v, PQT)
            };
            if tail != self.head {
                let a = self.prq + self.head;
                let d = (self.r64g(a)?, self.r64g(a + 8)?);
                self.head = (self.head + 32) % 4096;
                let mut v = self.vtd.lock().map_err(|e| e.to_string())?;
                w64(&mut *v, PQH, self.head);
                w32(&mut *v, PRS, 2);
                return Ok(d);
            }
            ensure!(
                Instant::now() < end,
                "no page request reached the guest's PRQ; bridge counters {:?}",
                self.bridge.counters()
            );
            sleep(Duration::from_millis(5));
        }
    }

    fn respond(&mut self, q0: u64, q1: u64, code: u8) -> Result<(), String> {
        let pasid = (q0 & (1 << 8) != 0).then_some(((q0 >> 32) & 0xf_ffff) as u32);
        let mut v = self.vtd.lock().map_err(|e| e.to_string())?;
        self.h
            .submit(
                &mut *v,
                &[desc::page_response(
                    (q0 >> 16) as u16,
                    pasid,
                    ((q1 >> 3) & 0x1ff) as u16,
                    code,
                )],
            )
            .map_err(s)
    }
}

fn rig() -> Result<Rig, String> {
    let b = Arc::new(IommufdBackend::open().map_err(s)?);
    let ioas = b.ioas_alloc().map_err(s)?;
    let mock: MockDevice = b
        .selftest()
        .mock_domain(ioas, MOCK_FLAGS_DEVICE_PASID)
        .map_err(s)?;
    let caps = b.hw_info(mock.dev).map_err(s)?;
    ensure!(
        caps.supports_nesting() && caps.supports_prs() && caps.max_pasid_bits() > 0,
        "the mock should nest, take page requests and have PASIDs: {caps:?}"
    );
    let ram = GuestRam::new(RamConfig {
        size: 32 * MIB,
        hugepages: false,
    })
    .map_err(s)?;
    let backend: Arc<dyn IommuBackend> = b.clone();
    // The nested path needs no guest RAM in the IOAS: the guest's first-stage table is the
    // mock's tag.
    let bridge = Arc::new(VtdBridge::new(backend, ioas, Vec::new()));
    let mem: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(ram.memory().clone()));
    let cfg = VtdConfig {
        scalable_mode: true,
        first_stage: true,
        pasid_bits: 20,
        svm: true,
        device_tlb: true,
        aw_bits: 48,
        segment: 0,
    };
    let vb: Arc<dyn ViommuBridge> = bridge.clone();
    let vtd = Arc::new(Mutex::new(
        Vtd::new(cfg, mem.clone(), vb, Arc::new(NoMsi)).map_err(s)?,
    ));
    let bdf: PciBdf = "00:04.0".parse().map_err(s)?;
    bridge.add_assigned(bdf, mock.dev, Some(&caps)).map_err(s)?;
    let mut h = LinuxHarness::new(mem, 4 * MIB..8 * MIB);
    h.ats = true;
    let prq;
    {
        let mut v = vtd.lock().map_err(|e| e.to_string())?;
        v.add_device(bdf);
        h.boot(&mut *v).map_err(s)?;
        prq = h.alloc(1).map_err(s)?;
        w64(&mut *v, PQH, 0);
        w64(&mut *v, PQT, 0);
        w64(&mut *v, PQA, prq);
        w32(&mut *v, PECTL, 0);
        h.probe(&mut *v, bdf).map_err(s)?;
    }
    let mut r = Rig {
        b,
        mock,
        ram,
        bridge,
        vtd,
        h,
        bdf,
        prq,
        head: 0,
    };
    // PRE in the device's scalable-mode context entry (lower half of the root entry: devfn
    // 0x20).
    {
        let mut v = r.vtd.lock().map_err(|e| e.to_string())?;
        let root = r64(&mut *v, RTADDR) & !0xfff;
        let re = r
            .ram
            .memory()
            .read_obj::<u64>(GuestAddress(root))
            .map_err(s)?;
        let ctx = (re & !0xfff) + u64::from(bdf.rid() & 0x7f) * 32;
        let lo: u64 = r.ram.memory().read_obj(GuestAddress(ctx)).map_err(s)?;
        r.ram
            .memory()
            .write_obj(lo | (1 << 4), GuestAddress(ctx))
            .map_err(s)?;
        r.h.submit(&mut *v, &[desc::context_device(0, bdf.rid(), 0)])
            .map_err(s)?;
        // Linux: the RID's DMA domain first (first stage with FSTS), then the SVA PASID.
        r.h.attach(&mut *v, bdf, Stage::First).map_err(s)?;
        r.h.attach_pasid(&mut *v, bdf, 5, Stage::First).map_err(s)?;
    }
    Ok(r)
}

fn vsva_mock_iopf_to_guest_prq_and_back() -> TestResult {
    let mut r = rig()?;
    let view = r.bridge.devices().into_iter().find(|v| v.pasid == Pasid(5));
    let Some(view) = view else {
        // Why: the model's translation for PASID 5, and the bridge's answer to it.
        let t = r
            .vtd
            .lock()
            .map_err(|e| e.to_string())?
            .translation(r.bdf, Pasid(5));
        let why = match t {
            Some(t) => r
                .bridge
                .set_translation(r.bdf, Pasid(5), t)
                .map_err(s)
                .err(),
            None => None,
        };
        return Err(format!(
            "PASID 5 is not bound: model translation {t:?}, bridge {why:?}, devices {:?}, \
             model counters {:?}",
            r.bridge.devices(),
            r.vtd.lock().map_err(|e| e.to_string())?.counters()
        ));
    };
    ensure!(view.mode == BridgeMode::Nested, "PASID 5: {view:?}");
    let hp = r
        .bridge
        .pasid_space()
        .lock()
        .map_err(|e| e.to_string())?
        .translate(r.mock.dev, Pasid(5))
        .ok_or("PASID 5 has no host PASID in the VM's PASID space")?;
    let hwpt = ioasid::HwptId(view.host_pt.ok_or("no nested HWPT")?);
    ensure!(
        r.b.selftest()
            .pasid_check_hwpt(&r.mock, hp, hwpt)
            .map_err(s)?,
        "host PASID {hp} of the mock is not attached to nested HWPT {}",
        hwpt.0
    );

    // The mock raises a page request on the host PASID: the guest sees it on PASID 5.
    r.b.selftest()
        .trigger_iopf(r.mock.dev, Some(hp), 7, PERM_RW, 0xdead_b000)
        .map_err(s)?;
    let (q0, q1) = r.next_request()?;
    let got = (
        q0 & 0xff,
        (q0 >> 8) & 1,
        (q0 >> 16) & 0xffff,
        (q0 >> 32) & 0xf_ffff,
        q1 & 7,
        (q1 >> 3) & 0x1ff,
        q1 & !0xfff,
    );
    let want = (1, 1, u64::from(r.bdf.rid()), 5, 1 | 2 | 4, 7, 0xdead_b000);
    ensure!(
        got == want,
        "page request descriptor (type, PP, RID, PASID, R|W|L, PRGI, address) {got:x?}, \
         want {want:x?}"
    );
    // The guest answers Success: the bridge writes the kernel's page response (refused by
    // the kernel for a group it does not have pending, which would count a host error).
    r.respond(q0, q1, 0)?;
    let c = r.bridge.counters();
    ensure!(
        c.page_requests == 1 && c.page_responses_success == 1 && c.host_errors == 0,
        "counters after the response: {c:?}"
    );
    // The same group again: the bridge has nothing pending for it.
    r.respond(q0, q1, 0)?;
    let c = r.bridge.counters();
    ensure!(
        c.page_responses_unmatched == 1 && c.host_errors == 0,
        "a second response reached the host: {c:?}"
    );
    // The device keeps working: another fault, answered Invalid.
    r.b.selftest()
        .trigger_iopf(r.mock.dev, Some(hp), 8, PERM_RW, 0xbeef_0000)
        .map_err(s)?;
    let (q0, q1) = r.next_request()?;
    ensure!(
        (q1 >> 3) & 0x1ff == 8 && q1 & !0xfff == 0xbeef_0000,
        "second request q1 {q1:#x}"
    );
    r.respond(q0, q1, 1)?;
    // A fault the guest tears down before answering is answered Invalid by the bridge.
    r.b.selftest()
        .trigger_iopf(r.mock.dev, Some(hp), 9, PERM_RW, 0xcafe_0000)
        .map_err(s)?;
    let _ = r.next_request()?;
    {
        let mut v = r.vtd.lock().map_err(|e| e.to_string())?;
        r.h.detach_pasid(&mut *v, r.bdf, 5).map_err(s)?;
    }
    let c = r.bridge.counters();
    ensure!(
        c.page_responses_invalid == 1 && c.page_requests_torn_down == 1 && c.host_errors == 0,
        "counters after teardown: {c:?}"
    );
    let rel = r.bridge.remove(r.bdf).map_err(s)?;
    ensure!(rel.errors.is_empty(), "teardown errors: {:?}", rel.errors);
    Ok(Outcome::Pass)
}
