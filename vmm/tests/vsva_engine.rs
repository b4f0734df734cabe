//! The SVA copy engine in a VM: `--device emulated=sva-copy,iommu=on` on a VM with
//! `--platform viommu=vtd,fsts=on,pasid-bits=20,svm=on`, through the device manager, on this
//! host's KVM (a VM without vCPUs running: the guest's side is the model's Linux harness on
//! the test thread). The engine's worker DMAs with PRI through the bridge's soft path; the
//! device manager's page request pump thread moves the fault into the guest's PRQ; the
//! "guest" maps the page and answers with a page group response; the engine retries and
//! completes. Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::DeviceConfig;
use devices::bus::BusDevice;
use devices::pci::config::{command, reg as creg};
use devices::pci::{PciBdf, SharedPciDevice};
use devices::sva::abi::{self, ctrl, reg, status, CompletionStatus, RawDescriptor, PASID_VALID};
use devices::sva::caps;
use devices::viommu::linux_harness::{desc, LinuxHarness, Stage};
use devices::viommu::{GuestMemoryAccess, Vtd};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::memory::RamConfig;
use vmm::viommu::VmGuestMemory;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::kvm_available;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const TABLES: u64 = 8 * MIB;
const TABLES_END: u64 = 16 * MIB;
const BUFS: u64 = 32 * MIB;
/// IOVA of the ring on PASID 0 (the driver's DMA API).
const RING_IOVA: u64 = 0x10_0000;
const GVA: u64 = 0x7f00_0000_0000;
const DEADLINE: Duration = Duration::from_secs(20);

const RTADDR: u64 = 0x20;
const PQH: u64 = 0xc0;
const PQT: u64 = 0xc8;
const PQA: u64 = 0xd0;
const PRS: u64 = 0xdc;
const PECTL: u64 = 0xe0;

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

fn cfg_w(e: &SharedPciDevice, off: usize, data: &[u8]) {
    e.lock()
        .unwrap()
        .write_config_register(off / 4, (off % 4) as u64, data);
}

fn bar_w(e: &SharedPciDevice, off: u64, v: u32) {
    e.lock().unwrap().write_bar(0, off, &v.to_le_bytes());
}

fn bar_r(e: &SharedPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    e.lock().unwrap().read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn svm_vm(name: &str) -> Option<(Vm, DeviceManager)> {
    if !kvm_available(name) {
        return None;
    }
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: RAM,
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .unwrap();
    let dm = DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            intx: IntxWiring::Off,
            viommu: Some(ViommuSetup {
                vtd: ViommuConfig {
                    scalable_mode: true,
                    fsts: OnOffAuto::On,
                    pasid_bits: 20,
                    svm: true,
                },
                address_width: 48,
            }),
            ..DeviceManagerConfig::default()
        },
    )
    .unwrap();
    Some((vm, dm))
}

struct Guest {
    vm: Vm,
    vtd: Arc<Mutex<Vtd>>,
    h: LinuxHarness,
    bdf: PciBdf,
    prq: u64,
    prq_head: u64,
}

impl Guest {
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.vm
            .ram()
            .memory()
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap();
        v
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.vm
            .ram()
            .memory()
            .write_slice(data, GuestAddress(gpa))
            .unwrap();
    }

    fn r64g(&self, gpa: u64) -> u64 {
        self.vm.ram().memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    /// Boots the unit, enables the PRQ, probes the device and sets PRE in its context
    /// entry (what intel-iommu does before `iommu_sva_bind_device` can succeed).
    fn boot(&mut self) {
        let mut v = self.vtd.lock().unwrap();
        self.h.ats = true;
        self.h.boot(&mut *v).unwrap();
        self.prq = self.h.alloc(1).unwrap();
        w64(&mut *v, PQH, 0);
        w64(&mut *v, PQT, 0);
        w64(&mut *v, PQA, self.prq);
        w32(&mut *v, PECTL, 0);
        self.h.probe(&mut *v, self.bdf).unwrap();
        let root = r64(&mut *v, RTADDR) & !0xfff;
        // Scalable mode: the lower half of the root entry covers devfn 0-127, the upper
        // half 128-255.
        let devfn = u64::from(self.bdf.rid() & 0xff);
        let half = if devfn >= 128 { 8 } else { 0 };
        let re = self.r64g(root + u64::from(self.bdf.bus()) * 16 + half);
        let ctx = (re & !0xfff) + (devfn & 0x7f) * 32;
        let lo = self.r64g(ctx);
        self.vm
            .ram()
            .memory()
            .write_obj(lo | (1 << 4), GuestAddress(ctx))
            .unwrap();
        self.h
            .submit(&mut *v, &[desc::context_device(0, self.bdf.rid(), 0)])
            .unwrap();
    }

    /// The guest's PRQ handler for one pass: for each request, `fix` then a page group
    /// response Success; returns the requests' addresses.
    fn serve_prq(&mut self, mut fix: impl FnMut(&mut Self, u64)) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        loop {
            let tail = {
                let mut v = self.vtd.lock().unwrap();
                r64(&mut *v, PQT)
            };
            if tail == self.prq_head {
                return out;
            }
            let a = self.prq + self.prq_head;
            let (q0, q1) = (self.r64g(a), self.r64g(a + 8));
            self.prq_head = (self.prq_head + 32) % 4096;
            fix(self, q1 & !0xfff);
            let mut v = self.vtd.lock().unwrap();
            w64(&mut *v, PQH, self.prq_head);
            w32(&mut *v, PRS, 2);
            let pasid = (q0 & (1 << 8) != 0).then_some(((q0 >> 32) & 0xf_ffff) as u32);
            let prgi = ((q1 >> 3) & 0x1ff) as u16;
            self.h
                .submit(
                    &mut *v,
                    &[desc::page_response((q0 >> 16) as u16, pasid, prgi, 0)],
                )
                .unwrap();
            out.push((q0, q1));
        }
    }
}

#[test]
fn vsva_engine_in_vm_faults_through_prq() {
    let name = "vsva_engine_in_vm_faults_through_prq";
    let Some((vm, mut dm)) = svm_vm(name) else {
        return;
    };
    let cfg = DeviceConfig::parse("emulated=sva-copy,id=sva0,iommu=on").unwrap();
    let added = dm.add_device(&cfg, None).unwrap();
    let engine = dm.emulated_model("sva0").unwrap();
    let vtd = dm.vtd().unwrap();
    let mem: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(vm.ram().memory().clone()));
    let mut g = Guest {
        vm,
        vtd,
        h: LinuxHarness::new(mem, TABLES..TABLES_END),
        bdf: added.bdf,
        prq: 0,
        prq_head: 0,
    };
    g.boot();
    // The driver: PASID 0 (DMA API) first stage with the ring and records mapped; the
    // process's PASID 5 with its source mapped and its destination never touched.
    let (ring_gpa, src_gpa) = (BUFS, BUFS + 0x10_0000);
    {
        let mut v = g.vtd.lock().unwrap();
        g.h.attach(&mut *v, g.bdf, Stage::First).unwrap();
        g.h.map(&mut *v, g.bdf, RING_IOVA, ring_gpa, 0x2000)
            .unwrap();
        g.h.attach_pasid(&mut *v, g.bdf, 5, Stage::First).unwrap();
        g.h.map_pasid(&mut *v, g.bdf, 5, GVA, src_gpa, 0x2000)
            .unwrap();
    }
    let data: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 + 3) as u8).collect();
    g.write(src_gpa, &data);
    // The engine as the driver programs it: bus master, PASID and PRI enabled, the ring.
    cfg_w(
        &engine,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    cfg_w(
        &engine,
        caps::PASID_CAP + 6,
        &caps::PASID_CTRL_ENABLE.to_le_bytes(),
    );
    cfg_w(&engine, caps::PRI_CAP + 12, &32u32.to_le_bytes());
    cfg_w(
        &engine,
        caps::PRI_CAP + 4,
        &caps::PRI_CTRL_ENABLE.to_le_bytes(),
    );
    bar_w(&engine, reg::RING_BASE, RING_IOVA as u32);
    bar_w(&engine, reg::RING_BASE_HI, 0);
    bar_w(&engine, reg::RING_SIZE, 4);
    bar_w(&engine, reg::CTRL, ctrl::ENABLE);
    assert_eq!(
        bar_r(&engine, reg::STATUS) & status::ENABLED,
        status::ENABLED
    );
    // One copy on PASID 5 into fresh memory; the completion record goes to the
    // descriptor's space, mapped on PASID 5.
    let comp_gva = GVA + 0x80_0000;
    {
        let mut v = g.vtd.lock().unwrap();
        g.h.map_pasid(&mut *v, g.bdf, 5, comp_gva, ring_gpa + 0x1000, 0x1000)
            .unwrap();
    }
    let d = RawDescriptor {
        pasid: 5 | PASID_VALID,
        src: GVA + 0x10,
        dst: GVA + 0x40_0010,
        len: 0x1800,
        completion: comp_gva,
        ..Default::default()
    };
    g.write(ring_gpa, &d.encode());
    g.write(ring_gpa + 0x1000, &[0u8; 16]);
    bar_w(&engine, reg::RING_TAIL, 1);
    // The guest's side until the record says done.
    let end = Instant::now() + DEADLINE;
    let mut served = Vec::new();
    let mut next_dst = BUFS + 0x30_0000;
    let st = loop {
        let mut fixed = g.serve_prq(|g, addr| {
            let gpa = next_dst;
            next_dst += 0x1000;
            let mut v = g.vtd.lock().unwrap();
            g.h.map_pasid(&mut *v, g.bdf, 5, addr, gpa, 0x1000).unwrap();
        });
        served.append(&mut fixed);
        let rec = g.read(ring_gpa + 0x1000, 16);
        let (s, n) = abi::decode_completion(&rec.clone().try_into().unwrap());
        if s != 0 {
            break (s, n);
        }
        assert!(
            Instant::now() < end,
            "{name}: no completion; page requests served {served:x?}, counters {:?}",
            dm.viommu_counters()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        st,
        (CompletionStatus::Success as u32, 0x1800),
        "{served:x?} {:?}",
        dm.viommu_counters()
    );
    // Two destination pages were faulted in, in order, each one page request for PASID 5
    // with the write bit, from the engine's RID.
    assert_eq!(served.len(), 2, "{served:x?}");
    for (i, (q0, q1)) in served.iter().enumerate() {
        assert_eq!((q0 >> 32) & 0xf_ffff, 5);
        assert_eq!((q0 >> 16) & 0xffff, u64::from(g.bdf.rid()));
        assert_eq!(q1 & 2, 2, "write access");
        assert_eq!(q1 & !0xfff, GVA + 0x40_0000 + i as u64 * 0x1000);
    }
    let mut got = g.read(BUFS + 0x30_0010, 0x1000 - 0x10);
    got.extend(g.read(BUFS + 0x30_1000, 0x1800 - (0x1000 - 0x10)));
    assert_eq!(got, data[0x10..0x1810].to_vec());
    // vm.pasids and vm.counters.
    let pasids = dm.pasids();
    assert_eq!(pasids.entries.len(), 1, "{pasids:?}");
    assert_eq!(pasids.entries[0].gpasid, 5);
    let (_, bridge) = dm.viommu_counters().unwrap();
    assert_eq!(
        (bridge.page_requests, bridge.page_responses_success),
        (2, 2),
        "{bridge:?}"
    );
    // Hot-unplug: the engine goes, and with it its PASID binding.
    dm.remove_device("sva0").unwrap();
    assert!(dm.pasids().entries.is_empty());
}

#[test]
fn vsva_engine_needs_svm_platform() {
    let name = "vsva_engine_needs_svm_platform";
    if !kvm_available(name) {
        return;
    }
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: RAM,
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .unwrap();
    let mut dm = DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            intx: IntxWiring::Off,
            viommu: Some(ViommuSetup {
                vtd: ViommuConfig {
                    fsts: OnOffAuto::Off,
                    ..ViommuConfig::default()
                },
                address_width: 48,
            }),
            ..DeviceManagerConfig::default()
        },
    )
    .unwrap();
    let cfg = DeviceConfig::parse("emulated=sva-copy,id=sva0,iommu=on").unwrap();
    let e = dm.add_device(&cfg, None).unwrap_err().message();
    assert!(e.contains("svm=on"), "{e}");
    assert!(dm.emulated_model("sva0").is_none());
}
