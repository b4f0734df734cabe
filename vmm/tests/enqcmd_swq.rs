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

/// A PCIe function with a 4 KiB config space: a version 2 PCI Express capability with
/// `devcap2` and, when `devctl3` is given, a Device 3 extended capability with that Device
/// Control 3. No BARs, no interrupts.
struct Pcie6Fake {
    config: Mutex<Vec<u8>>,
}

impl Pcie6Fake {
    fn new(devcap2: u32, devctl3: Option<u32>) -> Arc<Self> {
        let mut c = vec![0u8; 4096];
        c[0..4].copy_from_slice(&0x0b25_8086u32.to_le_bytes());
        c[0x06] = 0x10; // capability list
        c[0x0a..0x0c].copy_from_slice(&[0x80, 0x08]);
        c[0x34] = 0x40;
        c[0x40] = 0x10; // PCI Express, last capability
        c[0x42] = 0x02; // version 2, endpoint
        c[0x40 + 0x24..0x40 + 0x28].copy_from_slice(&devcap2.to_le_bytes());
        if let Some(ctl3) = devctl3 {
            // Device 3 (0x2f), version 1, last.
            c[0x100..0x104].copy_from_slice(&(0x2fu32 | (1 << 16)).to_le_bytes());
            c[0x108..0x10c].copy_from_slice(&ctl3.to_le_bytes());
        }
        Arc::new(Self {
            config: Mutex::new(c),
        })
    }
}

impl devices::vfio::VfioRegions for Pcie6Fake {
    fn region_info(&self, index: u32) -> Option<devices::vfio::RegionInfo> {
        (index == devices::vfio::backend::CONFIG_REGION).then(|| devices::vfio::RegionInfo {
            size: 4096,
            read: true,
            write: true,
            ..Default::default()
        })
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let c = self.config.lock().unwrap();
        let o = offset as usize;
        match (index, c.get(o..o + data.len())) {
            (devices::vfio::backend::CONFIG_REGION, Some(s)) => {
                data.copy_from_slice(s);
                Ok(())
            }
            _ => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
    fn region_write(&self, _index: u32, _offset: u64, _data: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn irq_info(&self, _index: u32) -> Option<devices::vfio::IrqInfo> {
        None
    }
    fn enable_irq(
        &self,
        _index: u32,
        _fds: &[&vmm_sys_util::eventfd::EventFd],
    ) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn disable_irq(&self, _index: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn set_intx_resample(&self, _fd: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
    fn reset(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn mmap_region(
        &self,
        _index: u32,
        _offset: u64,
        _len: u64,
        _writable: bool,
    ) -> std::io::Result<devices::vfio::MmapArea> {
        Err(std::io::Error::from_raw_os_error(libc::EINVAL))
    }
}

#[test]
fn dmwr_reported_in_vm_iommu() {
    let name = "dmwr_reported_in_vm_iommu";
    let Some(vm) = vm(name) else {
        return;
    };
    let mut dm = DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            intx: IntxWiring::Off,
            ..DeviceManagerConfig::default()
        },
    )
    .unwrap();
    // DMWr Completer Supported (DevCap2 bit 28), Device 3 with DMWr Requester Enable.
    dm.add_unbacked_device(
        Some("dsa0"),
        "dsa-like",
        Pcie6Fake::new(1 << 28, Some(1)),
        None,
    )
    .unwrap();
    dm.add_unbacked_device(Some("plain0"), "plain", Pcie6Fake::new(0, None), None)
        .unwrap();
    let info = dm.iommu_info();
    let dsa = info.devices.iter().find(|d| d.id == "dsa0").unwrap();
    let plain = info.devices.iter().find(|d| d.id == "plain0").unwrap();
    assert!(dsa.dmwr && !plain.dmwr, "{info:?}");
    let d = &dsa.details["dmwr"];
    assert_eq!(d["completer"], true, "{d}");
    assert_eq!(d["requester_enabled"], true, "{d}");
    assert_eq!(d["dev3_offset"], 0x100, "{d}");
    assert!(d["swq"].as_str().unwrap().starts_with("not exposed"), "{d}");
    assert_eq!(
        plain.details["dmwr"]["dev3_offset"],
        serde_json::Value::Null
    );
    // The same report over the wire: the JSON `vm.iommu` returns.
    let wire = serde_json::to_value(&info).unwrap();
    assert!(wire["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["id"] == "dsa0" && d["dmwr"] == true));
}
