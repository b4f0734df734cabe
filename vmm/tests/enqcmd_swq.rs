//! The shared-work-queue device (`--device emulated=swq,iommu=on`) in a VM on this host's
//! KVM: the guest's side of the vIOMMU is the model's Linux harness (a guest PASID bound to
//! a first-stage table, as `iommu_sva_bind_device` leaves it), the submitter sets its
//! IA32_PASID, stores a descriptor to the portal and reads the submit status back; the copy
//! runs on the device's worker through the soft backend in the host PASID's context.
//!
//! The host-side tests submit from the test thread (its IA32_PASID published the way the
//! vCPU loop publishes a vCPU's). Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::DeviceConfig;
use devices::cpu_pasid::{set_current_ia32_pasid, PasidTranslate, IA32_PASID_VALID};
use devices::pci::config::{command, reg as creg};
use devices::pci::{PciBdf, SharedPciDevice};
use devices::sva::caps;
use devices::swq::abi::{self, ctrl, reg, CompletionStatus, RawDescriptor, SubmitStatus};
use devices::viommu::linux_harness::{LinuxHarness, Stage};
use devices::viommu::{GuestMemoryAccess, Vtd};
use vm_memory::{Bytes, GuestAddress};
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::memory::{GuestMemory, RamConfig};
use vmm::viommu::VmGuestMemory;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::kvm_available;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const TABLES: u64 = 8 * MIB;
const TABLES_END: u64 = 16 * MIB;
const BUFS: u64 = 32 * MIB;
const GVA: u64 = 0x7f00_0000_0000;
const GPASID: u32 = 5;
const DEADLINE: Duration = Duration::from_secs(20);

/// The VM's guest-to-host PASID table as a test fills it (from `vm.pasids`, which is what
/// the VM's table is fed from).
#[derive(Default)]
struct Table(Mutex<HashMap<u32, u32>>);

impl PasidTranslate for Table {
    fn host_pasid(&self, guest: u32) -> Option<u32> {
        self.0.lock().unwrap().get(&guest).copied()
    }
}

/// `--platform viommu=vtd,fsts=on,pasid-bits=20`.
fn pasid_setup(pasid_bits: u8) -> DeviceManagerConfig {
    DeviceManagerConfig {
        intx: IntxWiring::Off,
        viommu: Some(ViommuSetup {
            vtd: ViommuConfig {
                scalable_mode: true,
                fsts: OnOffAuto::On,
                pasid_bits,
                svm: false,
            },
            address_width: 48,
        }),
        ..DeviceManagerConfig::default()
    }
}

fn vm(name: &str) -> Option<Vm> {
    if !kvm_available(name) {
        return None;
    }
    Some(
        Vm::new(VmOptions {
            vcpus: 1,
            ram: RamConfig {
                size: RAM,
                hugepages: false,
            },
            irqchip: IrqchipMode::Off,
        })
        .unwrap(),
    )
}

fn cfg_w(e: &SharedPciDevice, off: usize, data: &[u8]) {
    e.lock()
        .unwrap()
        .write_config_register(off / 4, (off % 4) as u64, data);
}

fn reg_r(e: &SharedPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    e.lock().unwrap().read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

/// The guest driver's setup: bus master, PASID Enable, the queue enabled.
fn program(dev: &SharedPciDevice) {
    cfg_w(
        dev,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    cfg_w(
        dev,
        caps::PASID_CAP + 6,
        &caps::PASID_CTRL_ENABLE.to_le_bytes(),
    );
    dev.lock()
        .unwrap()
        .write_bar(0, reg::CTRL, &ctrl::ENABLE.to_le_bytes());
}

/// Eight qword stores to the portal, then the status read-back, as a vCPU does them.
fn submit(dev: &SharedPciDevice, desc: &[u8; 64]) -> u32 {
    let mut d = dev.lock().unwrap();
    for (i, q) in desc.chunks(8).enumerate() {
        d.write_bar(abi::PORTAL_BAR, i as u64 * 8, q);
    }
    let mut b = [0u8; 4];
    d.read_bar(abi::PORTAL_BAR, abi::PORTAL_STATUS, &mut b);
    u32::from_le_bytes(b)
}

struct Guest {
    mem: GuestMemory,
    vtd: Arc<Mutex<Vtd>>,
    h: LinuxHarness,
    bdf: PciBdf,
}

impl Guest {
    fn new(vm: &Vm, dm: &DeviceManager, bdf: PciBdf) -> Self {
        let gm: Arc<dyn GuestMemoryAccess> =
            Arc::new(VmGuestMemory::new(vm.ram().memory().clone()));
        let mut g = Guest {
            mem: vm.ram().memory().clone(),
            vtd: dm.vtd().unwrap(),
            h: LinuxHarness::new(gm, TABLES..TABLES_END),
            bdf,
        };
        {
            let mut v = g.vtd.lock().unwrap();
            g.h.boot(&mut *v).unwrap();
            g.h.attach(&mut *v, bdf, Stage::First).unwrap();
        }
        g
    }

    /// Binds guest PASID `pasid` to a first-stage table mapping `GVA..+len` to `gpa`.
    fn bind(&mut self, pasid: u32, gpa: u64, len: u64) {
        let mut v = self.vtd.lock().unwrap();
        self.h
            .attach_pasid(&mut *v, self.bdf, pasid, Stage::First)
            .unwrap();
        self.h
            .map_pasid(&mut *v, self.bdf, pasid, GVA, gpa, len)
            .unwrap();
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    fn record(&self, gpa: u64) -> Option<(u32, u64)> {
        let end = Instant::now() + DEADLINE;
        loop {
            let rec: [u8; 16] = self.read(gpa, 16).try_into().unwrap();
            let (s, n) = abi::decode_completion(&rec);
            if s != 0 {
                return Some((s, n));
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The table entries `vm.pasids` shows for the device `id`.
fn fill_table(dm: &DeviceManager, id: &str, t: &Table) {
    let mut m = t.0.lock().unwrap();
    for e in dm.pasids().entries.iter().filter(|e| e.device == id) {
        m.insert(e.gpasid, e.hpasid);
    }
}

#[test]
fn swq_device_copies_in_the_host_pasid_of_the_table() {
    let name = "swq_device_copies_in_the_host_pasid_of_the_table";
    let Some(vm) = vm(name) else {
        return;
    };
    let mut dm = DeviceManager::new(&vm, pasid_setup(20)).unwrap();
    let table = Arc::new(Table::default());
    let cfg = DeviceConfig::parse("emulated=swq,id=swq0,iommu=on").unwrap();
    let added = dm.add_swq_device(&cfg, table.clone()).unwrap();
    let dev = dm.emulated_model("swq0").unwrap();
    let mut g = Guest::new(&vm, &dm, added.bdf);
    // The process's address space: GVA..+16 KiB at BUFS (src, dst, record pages).
    g.bind(GPASID, BUFS, 0x4000);
    fill_table(&dm, "swq0", &table);
    assert!(table.host_pasid(GPASID).is_some(), "{:?}", dm.pasids());
    program(&dev);
    let data: Vec<u8> = (0..0x1000u32).map(|i| (i * 11 + 5) as u8).collect();
    g.write(BUFS + 0x100, &data[..0xe00]);
    let desc = RawDescriptor {
        pasid: 0,
        src: GVA + 0x100,
        dst: GVA + 0x1100,
        len: 0xe00,
        completion: GVA + 0x3000,
        ..Default::default()
    };
    set_current_ia32_pasid(IA32_PASID_VALID | u64::from(GPASID));
    let st = submit(&dev, &desc.encode());
    assert_eq!(st, SubmitStatus::Accepted.code());
    let rec = g.record(BUFS + 0x3000);
    assert_eq!(rec, Some((CompletionStatus::Success as u32, 0xe00)));
    assert_eq!(g.read(BUFS + 0x1100, 0xe00), data[..0xe00].to_vec());

    // A guest PASID the table does not translate: refused, no DMA.
    let before = g.read(BUFS, 0x4000);
    set_current_ia32_pasid(IA32_PASID_VALID | 9);
    let desc2 = RawDescriptor {
        dst: GVA + 0x2000,
        completion: GVA + 0x3010,
        ..desc
    };
    assert_eq!(
        submit(&dev, &desc2.encode()),
        SubmitStatus::Untranslated.code()
    );
    set_current_ia32_pasid(0);
    assert_eq!(reg_r(&dev, reg::REJECTED), 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.read(BUFS, 0x4000), before);

    dm.remove_device("swq0").unwrap();
    assert!(dm.pasids().entries.is_empty());
}

#[test]
fn swq_device_needs_a_viommu_with_pasids() {
    let name = "swq_device_needs_a_viommu_with_pasids";
    let Some(vm) = vm(name) else {
        return;
    };
    let cfg = DeviceConfig::parse("emulated=swq,id=swq0,iommu=on").unwrap();
    let mut dm = DeviceManager::new(&vm, pasid_setup(0)).unwrap();
    let e = dm.add_device(&cfg, None).unwrap_err().message();
    assert!(e.contains("PASID") && e.contains("pasid-bits=20"), "{e}");
    assert!(dm.emulated_model("swq0").is_none());
    drop(dm);
    let mut dm = DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            intx: IntxWiring::Off,
            ..DeviceManagerConfig::default()
        },
    )
    .unwrap();
    let e = dm.add_device(&cfg, None).unwrap_err().message();
    assert!(e.contains("vIOMMU"), "{e}");
}
