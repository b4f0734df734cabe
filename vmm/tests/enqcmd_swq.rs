//! The shared-work-queue device (`--device emulated=swq,iommu=on`) in a VM on this host's
//! KVM: the guest's side of the vIOMMU is the model's Linux harness (a guest PASID bound to
//! a first-stage table, as `iommu_sva_bind_device` leaves it), the submitter sets its
//! IA32_PASID, stores a descriptor to the portal and reads the submit status back; the copy
//! runs on the device's worker through the soft backend in the host PASID's context.
//!
//! The payload tests (`enqcmd_*`) run a long-mode payload on a vCPU: it writes IA32_PASID
//! with WRMSR (recorded through the VMM's user-space MSR exit, which publishes it to the
//! vCPU thread), stores descriptors to the portal (BAR2, placed by the test in the 32-bit
//! MMIO window) by MMIO, eight MOV stores for the first and `rep movsq` for the second,
//! and reads the submit status back after each. The host-side tests submit from the test
//! thread (its IA32_PASID published the way the vCPU loop publishes a vCPU's).
//! `dmwr_reported_in_vm_iommu` checks the DMWr report of assigned devices in `vm.iommu`.
//! Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::DeviceConfig;
use devices::cpu_pasid::{set_current_ia32_pasid, IA32_PASID_VALID};
use devices::pci::config::{command, reg as creg};
use devices::pci::{PciBdf, SharedPciDevice};
use devices::sva::caps;
use devices::swq::abi::{self, ctrl, reg, CompletionStatus, RawDescriptor, SubmitStatus};
use devices::viommu::linux_harness::{LinuxHarness, Stage};
use devices::viommu::{GuestMemoryAccess, Vtd};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::layout::{PCI_ECAM_START, PCI_MMIO32_START};
use vmm::memory::{GuestMemory, RamConfig};
use vmm::runner::PayloadVm;
use vmm::viommu::VmGuestMemory;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::{assert_halted, kvm_available, read_guest, HANG_GUARD};

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const TABLES: u64 = 8 * MIB;
const TABLES_END: u64 = 16 * MIB;
const BUFS: u64 = 32 * MIB;
const GVA: u64 = 0x7f00_0000_0000;
const GPASID: u32 = 5;
const DEADLINE: Duration = Duration::from_secs(20);

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

#[test]
fn swq_device_copies_in_the_host_pasid_of_the_table() {
    let name = "swq_device_copies_in_the_host_pasid_of_the_table";
    let Some(vm) = vm(name) else {
        return;
    };
    let mut dm = DeviceManager::new(&vm, pasid_setup(20)).unwrap();
    let cfg = DeviceConfig::parse("emulated=swq,id=swq0,iommu=on").unwrap();
    let added = dm.add_device(&cfg, None).unwrap();
    let dev = dm.emulated_model("swq0").unwrap();
    let mut g = Guest::new(&vm, &dm, added.bdf);
    // The process's address space: GVA..+16 KiB at BUFS (src, dst, record pages).
    g.bind(GPASID, BUFS, 0x4000);
    assert_eq!(dm.pasids().entries.len(), 1, "{:?}", dm.pasids());
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
    let swq = d["swq"].as_str().unwrap();
    assert!(
        swq.starts_with("not exposed: no CPU PASID translation"),
        "{swq}"
    );
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

/// Where the test puts the portal BAR (the payload's identity map covers the low 4 GiB; the
/// bus assigned the 64-bit BAR above them).
const PORTAL_GPA: u64 = PCI_MMIO32_START + 0x10_0000;
/// The payload's mailbox: +0 portal GPA, +8 and +16 the GPAs of descriptors 1 and 2, +0x18
/// the IA32_PASID value to write; the payload leaves the submit statuses at +0x20 and
/// +0x24 and IA32_PASID as RDMSR reads it back at +0x28.
const MAILBOX: u64 = 0x8000;
const DESC1_GPA: u64 = 0x9000;
const DESC2_GPA: u64 = 0x9040;
/// A second address space: guest PASID 7 maps the same GVAs to other memory.
const BUFS7: u64 = 48 * MIB;

/// ```text
///     mov ecx, 0xd93                   ; IA32_PASID
///     mov eax, dword ptr [0x8018]      ; the value, from the mailbox
///     mov edx, dword ptr [0x801c]
///     wrmsr                            ; a user-space MSR exit
///     mov ecx, 0xd93
///     rdmsr
///     mov dword ptr [0x8028], eax      ; read back
///     mov dword ptr [0x802c], edx
///     mov rbx, qword ptr [0x8000]      ; the portal
///     mov rsi, qword ptr [0x8008]      ; descriptor 1: eight MOV stores
///     mov rax, qword ptr [rsi]
///     mov qword ptr [rbx], rax
///     ...                              ; +8 .. +0x30 the same way
///     mov rax, qword ptr [rsi+0x38]
///     mov qword ptr [rbx+0x38], rax    ; the last qword submits
///     mov eax, dword ptr [rbx]         ; submit status (ZF's analogue)
///     mov dword ptr [0x8020], eax
///     mov rsi, qword ptr [0x8010]      ; descriptor 2: rep movsq
///     mov rdi, rbx
///     mov ecx, 8
///     cld
///     rep movsq
///     mov eax, dword ptr [rbx]
///     mov dword ptr [0x8024], eax
///     mov dx, 0x3f8
///     mov al, 'O'
///     out dx, al
///     mov al, 'K'
///     out dx, al
///     hlt
/// ```
const PORTAL_PAYLOAD: [u8; 169] = [
    0xb9, 0x93, 0x0d, 0x00, 0x00, 0x8b, 0x04, 0x25, 0x18, 0x80, 0x00, 0x00, 0x8b, 0x14, 0x25, 0x1c,
    0x80, 0x00, 0x00, 0x0f, 0x30, 0xb9, 0x93, 0x0d, 0x00, 0x00, 0x0f, 0x32, 0x89, 0x04, 0x25, 0x28,
    0x80, 0x00, 0x00, 0x89, 0x14, 0x25, 0x2c, 0x80, 0x00, 0x00, 0x48, 0x8b, 0x1c, 0x25, 0x00, 0x80,
    0x00, 0x00, 0x48, 0x8b, 0x34, 0x25, 0x08, 0x80, 0x00, 0x00, 0x48, 0x8b, 0x06, 0x48, 0x89, 0x03,
    0x48, 0x8b, 0x46, 0x08, 0x48, 0x89, 0x43, 0x08, 0x48, 0x8b, 0x46, 0x10, 0x48, 0x89, 0x43, 0x10,
    0x48, 0x8b, 0x46, 0x18, 0x48, 0x89, 0x43, 0x18, 0x48, 0x8b, 0x46, 0x20, 0x48, 0x89, 0x43, 0x20,
    0x48, 0x8b, 0x46, 0x28, 0x48, 0x89, 0x43, 0x28, 0x48, 0x8b, 0x46, 0x30, 0x48, 0x89, 0x43, 0x30,
    0x48, 0x8b, 0x46, 0x38, 0x48, 0x89, 0x43, 0x38, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x20, 0x80, 0x00,
    0x00, 0x48, 0x8b, 0x34, 0x25, 0x10, 0x80, 0x00, 0x00, 0x48, 0x89, 0xdf, 0xb9, 0x08, 0x00, 0x00,
    0x00, 0xfc, 0xf3, 0x48, 0xa5, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x24, 0x80, 0x00, 0x00, 0x66, 0xba,
    0xf8, 0x03, 0xb0, 0x4f, 0xee, 0xb0, 0x4b, 0xee, 0xf4,
];

fn ecam_write(vm: &Vm, bdf: PciBdf, reg: u64, data: &[u8]) {
    let addr = PCI_ECAM_START + (u64::from(bdf.device()) << 15) + reg;
    vm.mmio_bus().write(addr, data).unwrap();
}

/// A payload VM with the SWQ device added by `--device emulated=swq,id=swq0,iommu=on`,
/// its portal moved to [`PORTAL_GPA`] and enabled as a driver would (memory decode, bus
/// master, PASID Enable, queue enabled), guest PASID 5 bound to GVAs at `BUFS` and guest
/// PASID 7 to the same GVAs at [`BUFS7`].
fn portal_vm(name: &str) -> Option<(PayloadVm, DeviceManager, Guest, SharedPciDevice)> {
    if !kvm_available(name) {
        return None;
    }
    let pvm = PayloadVm::new(RAM, IrqchipMode::Off).unwrap();
    if let Err(e) = pvm.vm().ia32_pasid() {
        common::skip(name, &format!("this KVM cannot virtualize IA32_PASID: {e}"));
        return None;
    }
    let mut dm = DeviceManager::new(pvm.vm(), pasid_setup(20)).unwrap();
    let cfg = DeviceConfig::parse("emulated=swq,id=swq0,iommu=on").unwrap();
    let added = dm.add_device(&cfg, None).unwrap();
    let dev = dm.emulated_model("swq0").unwrap();
    let bar2 = 0x10 + 4 * u64::from(abi::PORTAL_BAR);
    ecam_write(
        pvm.vm(),
        added.bdf,
        bar2,
        &(PORTAL_GPA as u32).to_le_bytes(),
    );
    ecam_write(pvm.vm(), added.bdf, bar2 + 4, &0u32.to_le_bytes());
    ecam_write(
        pvm.vm(),
        added.bdf,
        creg::COMMAND as u64,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    program(&dev);
    let mut g = Guest::new(pvm.vm(), &dm, added.bdf);
    g.bind(GPASID, BUFS, 0x4000);
    g.bind(7, BUFS7, 0x4000);
    // The portal answers at its new address (this thread has submitted nothing: IDLE).
    let mut st = [0xffu8; 4];
    pvm.vm().mmio_bus().read(PORTAL_GPA, &mut st).unwrap();
    assert_eq!(u32::from_le_bytes(st), SubmitStatus::Idle.code());
    Some((pvm, dm, g, dev))
}

/// Descriptor `i` (1 or 2): copies 0x800 bytes from GVA+0x100 to GVA+i*0x1000, its record
/// at GVA+0x3000+(i-1)*16. The PASID word holds a decoy (the device ignores it).
fn portal_desc(i: u64) -> [u8; 64] {
    RawDescriptor {
        pasid: abi::PASID_VALID | 7,
        src: GVA + 0x100,
        dst: GVA + i * 0x1000,
        len: 0x800,
        completion: GVA + 0x3000 + (i - 1) * 16,
        ..Default::default()
    }
    .encode()
}

/// Writes the mailbox and descriptors, runs [`PORTAL_PAYLOAD`] with IA32_PASID `ia32`,
/// and returns (status 1, status 2, IA32_PASID read back).
fn run_portal_payload(pvm: &mut PayloadVm, g: &Guest, ia32: u64) -> (u32, u32, u64) {
    let m = &g.mem;
    m.write_obj(PORTAL_GPA, GuestAddress(MAILBOX)).unwrap();
    m.write_obj(DESC1_GPA, GuestAddress(MAILBOX + 8)).unwrap();
    m.write_obj(DESC2_GPA, GuestAddress(MAILBOX + 16)).unwrap();
    m.write_obj(ia32, GuestAddress(MAILBOX + 0x18)).unwrap();
    m.write_obj(u64::MAX, GuestAddress(MAILBOX + 0x20)).unwrap();
    g.write(DESC1_GPA, &portal_desc(1));
    g.write(DESC2_GPA, &portal_desc(2));
    let running = pvm
        .start(&PORTAL_PAYLOAD, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    println!("exit {:?}, serial {:?}", out.exit, out.serial);
    assert_halted(&out);
    assert_eq!(out.serial, b"OK");
    (
        read_guest(pvm, MAILBOX + 0x20),
        read_guest(pvm, MAILBOX + 0x24),
        read_guest(pvm, MAILBOX + 0x28),
    )
}

#[test]
fn enqcmd_msr_exit_and_swq_copy() {
    let name = "enqcmd_msr_exit_and_swq_copy";
    let Some((mut pvm, dm, g, dev)) = portal_vm(name) else {
        return;
    };
    let src5: Vec<u8> = (0..0x800u32).map(|i| (i * 3 + 1) as u8).collect();
    let src7: Vec<u8> = (0..0x800u32).map(|i| (i * 5 + 2) as u8).collect();
    g.write(BUFS + 0x100, &src5);
    g.write(BUFS7 + 0x100, &src7);
    let ia32 = IA32_PASID_VALID | u64::from(GPASID);
    let (s1, s2, back) = run_portal_payload(&mut pvm, &g, ia32);
    assert_eq!(back, ia32, "IA32_PASID read back through the MSR exit");
    let msr = pvm.vm().ia32_pasid().unwrap();
    assert_eq!(msr.value(0), Some(ia32), "recorded by the WRMSR exit");
    assert_eq!((msr.counters().writes, msr.counters().rejected), (1, 0));
    assert_eq!(
        (s1, s2),
        (SubmitStatus::Accepted.code(), SubmitStatus::Accepted.code()),
        "pasids {:?}",
        dm.pasids()
    );
    // Both copies ran in guest PASID 5's address space (the vCPU's IA32_PASID), not in
    // PASID 7's (the decoy in the descriptors), and their records say so.
    for i in 1..=2u64 {
        let rec = g.record(BUFS + 0x3000 + (i - 1) * 16);
        assert_eq!(rec, Some((CompletionStatus::Success as u32, 0x800)), "{i}");
        assert_eq!(g.read(BUFS + i * 0x1000, 0x800), src5, "destination {i}");
        assert!(g.read(BUFS7 + i * 0x1000, 0x800).iter().all(|b| *b == 0));
    }
    assert!(g.read(BUFS7 + 0x3000, 32).iter().all(|b| *b == 0));
    assert_eq!(reg_r(&dev, reg::SUBMITTED), 2);
}

#[test]
fn enqcmd_unmapped_gpasid_rejected() {
    let name = "enqcmd_unmapped_gpasid_rejected";
    let Some((mut pvm, _dm, g, dev)) = portal_vm(name) else {
        return;
    };
    let src: Vec<u8> = (0..0x800u32).map(|i| (i * 3 + 1) as u8).collect();
    g.write(BUFS + 0x100, &src);
    g.write(BUFS7 + 0x100, &src);
    let before = (g.read(BUFS, 0x4000), g.read(BUFS7, 0x4000));
    // Guest PASID 6: in range, so IA32_PASID takes it, but bound to no address space.
    let ia32 = IA32_PASID_VALID | 6;
    let (s1, s2, back) = run_portal_payload(&mut pvm, &g, ia32);
    assert_eq!(back, ia32);
    assert_eq!(
        (s1, s2),
        (
            SubmitStatus::Untranslated.code(),
            SubmitStatus::Untranslated.code()
        )
    );
    assert_eq!(reg_r(&dev, reg::REJECTED), 2);
    assert_eq!(reg_r(&dev, reg::SUBMITTED), 0);
    // Nothing was queued, so nothing can still be running: memory is as it was.
    assert_eq!((g.read(BUFS, 0x4000), g.read(BUFS7, 0x4000)), before);
}

/// Waits (up to [`DEADLINE`]) until `vm.counters` entry `dev`'s counter `key` reaches `want`,
/// and returns the last value seen.
fn counter_reaches(dm: &DeviceManager, dev: &str, key: &str, want: u64) -> u64 {
    let end = Instant::now() + DEADLINE;
    loop {
        let got = dm
            .counters()
            .devices
            .get(dev)
            .and_then(|c| c.get(key).copied())
            .unwrap_or(0);
        if got >= want || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn vm_counters_count_swq_and_ia32_pasid_exits() {
    let name = "vm_counters_count_swq_and_ia32_pasid_exits";
    let Some((mut pvm, dm, g, dev)) = portal_vm(name) else {
        return;
    };
    let c = dm.counters();
    println!("before: {:?}", c.devices);
    let swq = &c.devices["swq0"];
    for k in [
        "submitted",
        "completed",
        "bytes",
        "retries",
        "malformed",
        "untranslated",
    ] {
        assert_eq!(
            swq.get(k),
            Some(&0),
            "swq0 {k} before any submission: {swq:?}"
        );
    }
    let vmc = &c.devices["_vm"];
    for k in [
        "ia32_pasid_reads",
        "ia32_pasid_writes",
        "ia32_pasid_rejected",
    ] {
        assert_eq!(vmc.get(k), Some(&0), "_vm {k} before the payload: {vmc:?}");
    }

    // The payload: one WRMSR and one RDMSR of IA32_PASID, two descriptors to the portal.
    let src: Vec<u8> = (0..0x800u32).map(|i| (i * 3 + 1) as u8).collect();
    g.write(BUFS + 0x100, &src);
    let ia32 = IA32_PASID_VALID | u64::from(GPASID);
    let (s1, s2, back) = run_portal_payload(&mut pvm, &g, ia32);
    let ok = SubmitStatus::Accepted.code();
    assert_eq!(
        (s1, s2, back),
        (ok, ok, ia32),
        "statuses, IA32_PASID read back"
    );
    for i in 1..=2u64 {
        let rec = g.record(BUFS + 0x3000 + (i - 1) * 16);
        assert_eq!(rec, Some((CompletionStatus::Success as u32, 0x800)), "{i}");
    }
    assert_eq!(counter_reaches(&dm, "swq0", "completed", 2), 2);
    // A submission the table cannot translate, from this thread.
    set_current_ia32_pasid(IA32_PASID_VALID | 9);
    let st = submit(&dev, &portal_desc(1));
    set_current_ia32_pasid(0);
    assert_eq!(st, SubmitStatus::Untranslated.code());

    let c = dm.counters();
    println!("after: {:?}", c.devices);
    let swq = &c.devices["swq0"];
    let got = |k: &str| swq.get(k).copied();
    assert_eq!(got("submitted"), Some(2), "{swq:?}");
    assert_eq!(got("completed"), Some(2), "{swq:?}");
    assert_eq!(got("errors"), Some(0), "{swq:?}");
    assert_eq!(got("bytes"), Some(0x1000), "{swq:?}");
    assert_eq!(got("untranslated"), Some(1), "{swq:?}");
    assert_eq!(got("retries"), Some(0), "{swq:?}");
    assert_eq!(got("malformed"), Some(0), "{swq:?}");
    // The device-register view agrees with the host counters.
    assert_eq!(u64::from(reg_r(&dev, reg::SUBMITTED)), 2);
    let vmc = &c.devices["_vm"];
    let msr = pvm.vm().ia32_pasid().unwrap().counters();
    assert_eq!(vmc.get("ia32_pasid_writes"), Some(&1), "{vmc:?}");
    assert_eq!(vmc.get("ia32_pasid_reads"), Some(&msr.reads), "{vmc:?}");
    assert!(msr.reads >= 1, "{msr:?}");
    assert_eq!(vmc.get("ia32_pasid_rejected"), Some(&0), "{vmc:?}");
}
