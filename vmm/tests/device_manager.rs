//! The device manager on the host's /dev/kvm (no VFIO, no /dev/iommu here): the PCI bus of a
//! VM without devices, add-device errors that leave nothing behind, and a fake VFIO device
//! (added without an IOMMU backend) whose MSI reaches a guest handler through the KVM sink
//! and whose BAR window the guest reads through a KVM memory slot.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use api::DeviceConfig;
use devices::pci::{InterruptSink, MsiKind, MsiMessage, MsiVector};
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::device_manager::add::{arm_add_faults, disarm_add_faults, AddStep};
use vmm::device_manager::interrupts::KvmInterruptSink;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, DeviceManagerError};
use vmm::layout::{PCI_ECAM_START, PCI_MMIO32_START};
use vmm::memory::RamConfig;
use vmm::runner::{PayloadOutcome, PayloadVm};
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::{
    assert_halted, assert_msi_handler_ran, ecam_read32, kvm_available, read_guest, run_msi_payload,
    FakeVfio, BAR0_PATTERN, EDU_ID, HANG_GUARD, MEM, MSI_CAP, MSI_VECTOR,
};

/// The host bridge's vendor/device dword (Red Hat 1b36:0008).
const HOST_BRIDGE_ID: u32 = 0x0008_1b36;

fn plain_vm() -> Vm {
    Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: MEM,
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .unwrap()
}

fn manager(vm: &Vm) -> DeviceManager {
    DeviceManager::new(vm, DeviceManagerConfig::default()).unwrap()
}

/// A plain VM and its device manager, or `None` (skipping) without /dev/kvm.
fn vm_with_manager(test: &str) -> Option<(Vm, DeviceManager)> {
    if !kvm_available(test) {
        return None;
    }
    let vm = plain_vm();
    let dm = manager(&vm);
    Some((vm, dm))
}

/// A payload VM (no irqchip) and its device manager, or `None` (skipping) without /dev/kvm.
fn payload_vm_with_manager(test: &str) -> Option<(PayloadVm, DeviceManager)> {
    if !kvm_available(test) {
        return None;
    }
    let pvm = PayloadVm::new(MEM, IrqchipMode::Off).unwrap();
    let dm = manager(pvm.vm());
    Some((pvm, dm))
}

fn ecam_write(vm: &Vm, slot: u8, reg: u64, data: &[u8]) {
    vm.mmio_bus()
        .write(PCI_ECAM_START + (u64::from(slot) << 15) + reg, data)
        .unwrap();
}

fn cf8_read32(vm: &Vm, slot: u8, reg: u32) -> u32 {
    let addr = 0x8000_0000u32 | (u32::from(slot) << 11) | (reg & 0xfc);
    vm.pio_bus().write(0xcf8, &addr.to_le_bytes()).unwrap();
    let mut b = [0u8; 4];
    vm.pio_bus().read(0xcfc, &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// This process's open fds that a failed add could leak: files and devices. The other tests
/// of this binary run in parallel threads and open and close KVM fds, eventfds and guest-RAM
/// memfds all the time, and spawn the VMM binary (pipes), so those (anonymous inodes, memfds,
/// /dev/kvm, pipes, sockets) are not counted: a count of everything raced with them.
fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| {
            let t = t.to_string_lossy();
            !(t.starts_with("anon_inode:")
                || t.starts_with("/memfd:")
                || t.starts_with("pipe:")
                || t.starts_with("socket:")
                || t == "/dev/kvm")
        })
        .count()
}

#[test]
fn host_bridge_answers_through_ecam_and_cf8_without_devices() {
    let name = "host_bridge_answers_through_ecam_and_cf8_without_devices";
    let Some((vm, dm)) = vm_with_manager(name) else {
        return;
    };
    assert_eq!(ecam_read32(&vm, 0, 0), HOST_BRIDGE_ID);
    assert_eq!(
        ecam_read32(&vm, 0, 8) >> 8,
        0x06_00_00,
        "class: host bridge"
    );
    assert_eq!(ecam_read32(&vm, 1, 0), u32::MAX, "slot 1 is empty");
    assert_eq!(cf8_read32(&vm, 0, 0), HOST_BRIDGE_ID);
    assert_eq!(cf8_read32(&vm, 0, 8) >> 8, 0x06_00_00);
    assert_eq!(cf8_read32(&vm, 31, 0), u32::MAX);
    let bus = dm.pci_bus().lock().unwrap().devices();
    assert_eq!(
        bus.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        vec!["0000:00:00.0"]
    );
    // No device: no backend was chosen or opened, nothing is mapped.
    assert_eq!(dm.backend_kind(), None);
    assert_eq!(dm.iommu_info().backend, "none");
    assert!(dm.ioasids().ioases.is_empty());
    assert!(dm.pasids().entries.is_empty());
    assert_eq!(dm.ram_map_calls(), 0);
    drop(dm);
    // The manager takes its config handlers off the VM's buses when it goes.
    assert!(vm.mmio_bus().read(PCI_ECAM_START, &mut [0u8; 4]).is_err());
}

/// Runs `code` on `pvm` in long mode, stopping it if it hangs, and asserts it halted.
fn run_halting(name: &str, pvm: &mut PayloadVm, code: &[u8]) -> PayloadOutcome {
    let running = pvm
        .start(code, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    println!("{name}: exit {:?}", out.exit);
    assert_halted(&out);
    out
}

#[test]
fn guest_reads_host_bridge_through_ecam_and_cf8() {
    let name = "guest_reads_host_bridge_through_ecam_and_cf8";
    let Some((mut pvm, _dm)) = payload_vm_with_manager(name) else {
        return;
    };
    // mov rbx,0xe0000000; mov eax,[rbx]; mov [0x8000],eax
    // mov dx,0xcf8; mov eax,0x80000008; out dx,eax; mov dx,0xcfc; in eax,dx; mov [0x8004],eax
    // hlt
    let code = [
        0x48, 0xbb, 0x00, 0x00, 0x00, 0xe0, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x03, 0x89, 0x04, 0x25,
        0x00, 0x80, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x0c, 0xb8, 0x08, 0x00, 0x00, 0x80, 0xef, 0x66,
        0xba, 0xfc, 0x0c, 0xed, 0x89, 0x04, 0x25, 0x04, 0x80, 0x00, 0x00, 0xf4,
    ];
    let out = run_halting(name, &mut pvm, &code);
    let id: u32 = read_guest(&pvm, 0x8000);
    let class: u32 = read_guest(&pvm, 0x8004);
    assert_eq!(id, HOST_BRIDGE_ID, "ECAM read from the guest");
    assert_eq!(class >> 8, 0x06_00_00, "0xCFC read from the guest");
    let exits = &out.exit.first_report().unwrap().exits;
    assert_eq!((exits.mmio_read, exits.unclaimed), (1, 0));
}

/// Everything introspection and the buses show, to compare before and after a failed add.
fn snapshot(vm: &Vm, dm: &DeviceManager) -> String {
    let bus = dm.pci_bus().lock().unwrap().devices();
    serde_json::json!({
        "iommu": dm.iommu_info(),
        "ioasids": dm.ioasids(),
        "pasids": dm.pasids(),
        "counters": dm.counters(),
        "devices": dm.pci_devices(),
        "tree": dm.device_tree(),
        "ids": dm.device_ids(),
        "bus": bus.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
        "mmio": vm.mmio_bus().ranges(),
        "pio": vm.pio_bus().ranges(),
        "slots": vm.memory_slots().in_use(),
        "backend": format!("{:?}", dm.backend_kind()),
        "ram_map_calls": dm.ram_map_calls(),
    })
    .to_string()
}

fn cfg(s: &str) -> DeviceConfig {
    DeviceConfig::parse(s).unwrap()
}

/// Asserts that adding fails with a message containing every `want`, and changes nothing.
fn refused(vm: &Vm, dm: &mut DeviceManager, c: &DeviceConfig, fd: Option<OwnedFd>, want: &[&str]) {
    let before = snapshot(vm, dm);
    let e = dm.add_device(c, fd).unwrap_err();
    let msg = e.message();
    println!("{c:?} -> {msg}");
    for w in want {
        assert!(msg.contains(w), "missing {w:?} in: {msg}");
    }
    assert_eq!(snapshot(vm, dm), before, "state changed after: {msg}");
}

#[test]
fn failed_adds_name_the_device_and_leave_nothing_behind() {
    let name = "failed_adds_name_the_device_and_leave_nothing_behind";
    let Some((vm, mut dm)) = vm_with_manager(name) else {
        return;
    };
    let fds = fd_count();
    let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            "path=/sys/bus/pci/devices/0000:7f:1f.7".into(),
            vec!["0000:7f:1f.7", "resolving the device", "no PCI device"],
        ),
        (
            format!("path=/sys/bus/mdev/devices/{uuid}"),
            vec![uuid, "resolving the device"],
        ),
        (
            "path=/dev/vfio/devices/vfio42".into(),
            vec!["/dev/vfio/devices/vfio42", "/sys/class/vfio-dev/vfio42"],
        ),
        (
            "path=/etc/passwd".into(),
            vec!["/etc/passwd", "not allowed"],
        ),
        (
            "path=/sys/bus/pci/devices/0000:00:03.0,pci_segment=1".into(),
            vec!["0000:00:03.0", "pci_segment=1"],
        ),
        (
            "path=/sys/bus/pci/devices/0000:00:03.0,pci_device_id=0".into(),
            vec!["0000:00:03.0", "PCI slot", "not a device slot"],
        ),
        (
            "path=/sys/bus/pci/devices/0000:00:03.0,pasid=on".into(),
            vec!["0000:00:03.0", "pasid=on needs iommu=on"],
        ),
        ("iommu=off".into(), vec!["needs `path`"]),
    ];
    for (c, want) in &cases {
        refused(&vm, &mut dm, &cfg(c), None, want);
    }
    // Open fds that are not VFIO cdevs: refused by number, and closed (ownership was taken).
    let tmp = std::env::temp_dir().join(format!("dm-fd-{}", std::process::id()));
    std::fs::write(&tmp, b"x").unwrap();
    for (path, why) in [
        ("/dev/null", "not a VFIO cdev"),
        (tmp.to_str().unwrap(), "not a character device"),
    ] {
        let f = File::open(path).unwrap();
        let n = std::os::fd::AsRawFd::as_raw_fd(&f);
        let number = format!("cdev fd {n}");
        refused(
            &vm,
            &mut dm,
            &DeviceConfig::default(),
            Some(OwnedFd::from(f)),
            &[&number, why],
        );
    }
    let _ = std::fs::remove_file(&tmp);
    // A path and an fd together are refused before the fd is looked at.
    let f = File::open("/dev/null").unwrap();
    refused(
        &vm,
        &mut dm,
        &cfg("path=/sys/bus/pci/devices/0000:00:03.0"),
        Some(OwnedFd::from(f)),
        &["not both"],
    );
    assert_eq!(fd_count(), fds, "an fd was left open");
    assert_eq!(dm.backend_kind(), None);
}

#[test]
fn ids_slots_duplicates_and_removal() {
    let name = "ids_slots_duplicates_and_removal";
    let Some((vm, mut dm)) = vm_with_manager(name) else {
        return;
    };
    let fake = FakeVfio::edu_msi();
    let added = dm
        .add_unbacked_device(Some("edu0"), "fake-edu", fake.clone(), Some(3))
        .unwrap();
    assert_eq!(added.bdf.to_string(), "0000:00:03.0");
    assert_eq!(added.to_api().bdf, "0000:00:03.0");
    assert_eq!(ecam_read32(&vm, 3, 0), EDU_ID);
    assert_eq!(cf8_read32(&vm, 3, 0), EDU_ID);

    // A duplicate id and a taken slot are refused before the host is touched.
    refused(
        &vm,
        &mut dm,
        &cfg("path=/sys/bus/pci/devices/0000:00:04.0,id=edu0"),
        None,
        &["edu0", "already in use", "fake-edu"],
    );
    let e = dm
        .add_device(&cfg("path=/sys/bus/pci/devices/0000:00:04.0,id=edu0"), None)
        .unwrap_err();
    assert!(matches!(e, DeviceManagerError::DuplicateId { .. }));
    assert_eq!(e.to_api_error().status(), 409);
    refused(
        &vm,
        &mut dm,
        &cfg("path=/sys/bus/pci/devices/0000:00:04.0,pci_device_id=3"),
        None,
        &["0000:00:04.0", "0000:00:03.0 is already in use"],
    );
    let e = dm
        .add_unbacked_device(Some("edu0"), "other", FakeVfio::edu_msi(), None)
        .unwrap_err();
    assert!(e.message().contains("edu0"), "{}", e.message());

    // Generated ids, like Cloud Hypervisor's; a failed add does not use one up.
    let auto = dm
        .add_unbacked_device(None, "fake-2", FakeVfio::edu_msi(), None)
        .unwrap();
    assert_eq!(
        (auto.id.as_str(), auto.bdf.to_string()),
        ("_vfio0", "0000:00:01.0".to_string())
    );
    assert_eq!(dm.device_ids(), vec!["edu0", "_vfio0"]);
    let tree = dm.device_tree();
    assert_eq!(tree["edu0"].pci_bdf.as_deref(), Some("0000:00:03.0"));
    assert!(tree["edu0"]
        .resources
        .iter()
        .any(|r| r["type"] == "bar" && r["size"] == 0x1000));
    // Unbacked devices have no backend: no attachment, and no capability claims.
    assert!(dm.ioasids().attachments.is_empty());
    let caps = dm.iommu_info();
    assert_eq!(caps.devices.len(), 2);
    assert!(!caps.devices[0].nesting && caps.devices[0].pasid_width == 0);

    let removed = dm.remove_device("_vfio0").unwrap();
    assert_eq!(removed.bdf.to_string(), "0000:00:01.0");
    assert!(removed.warnings.is_empty(), "{:?}", removed.warnings);
    assert_eq!(ecam_read32(&vm, 1, 0), u32::MAX);
    let e = dm.remove_device("_vfio0").unwrap_err();
    assert!(e.message().contains("_vfio0"), "{}", e.message());
    assert_eq!(e.to_api_error().status(), 404);
    dm.remove_device("edu0").unwrap();
    assert_eq!(ecam_read32(&vm, 3, 0), u32::MAX);
    assert!(dm.device_ids().is_empty());
    // The model (and with it the fake) is gone: only our handle is left.
    assert_eq!(Arc::strong_count(&fake), 1);
}

#[test]
fn bar_window_reaches_the_guest_through_a_memory_slot() {
    let name = "bar_window_reaches_the_guest_through_a_memory_slot";
    let Some((mut pvm, mut dm)) = payload_vm_with_manager(name) else {
        return;
    };
    let slots_before = pvm.vm().memory_slots().in_use();
    dm.add_unbacked_device(Some("bar"), "fake-bar", FakeVfio::edu_msi(), Some(3))
        .unwrap();
    let bar0 = u64::from(ecam_read32(pvm.vm(), 3, 0x10) & !0xf);
    assert!(bar0 >= PCI_MMIO32_START, "BAR0 at {bar0:#x}");
    // Memory decode on: the bus puts the BAR on the MMIO bus and the model maps its window.
    ecam_write(pvm.vm(), 3, 0x04, &2u16.to_le_bytes());
    assert_eq!(pvm.vm().memory_slots().in_use(), slots_before + 1);
    let windows = dm.counters().devices["bar"]["bar_windows_mapped"];
    assert_eq!(windows, 1);

    // mov rbx,bar0; mov rax,[rbx]; mov [0x8000],rax; hlt
    let mut code = vec![0x48, 0xbb];
    code.extend_from_slice(&bar0.to_le_bytes());
    code.extend_from_slice(&[
        0x48, 0x8b, 0x03, 0x48, 0x89, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0xf4,
    ]);
    let out = run_halting(name, &mut pvm, &code);
    let got: u64 = read_guest(&pvm, 0x8000);
    assert_eq!(got, BAR0_PATTERN);
    // Served by the memory slot, not trapped to the VMM.
    assert_eq!(out.exit.first_report().unwrap().exits.mmio_read, 0);

    // Decode off and removal take the slot away again.
    ecam_write(pvm.vm(), 3, 0x04, &0u16.to_le_bytes());
    assert_eq!(pvm.vm().memory_slots().in_use(), slots_before);
    ecam_write(pvm.vm(), 3, 0x04, &2u16.to_le_bytes());
    dm.remove_device("bar").unwrap();
    assert_eq!(pvm.vm().memory_slots().in_use(), slots_before);
}

#[test]
fn memory_slots_start_above_ram_and_are_reused() {
    if !kvm_available("memory_slots_start_above_ram_and_are_reused") {
        return;
    }
    let vm = plain_vm();
    let slots = vm.memory_slots();
    let first = slots.allocate().unwrap();
    assert_eq!(first as usize, vm.ram_regions().len());
    let second = slots.allocate().unwrap();
    assert_eq!(second, first + 1);
    slots.free(first);
    assert_eq!(slots.allocate(), Some(first));
    assert_eq!(slots.in_use(), 2);
}

#[test]
fn device_msi_reaches_the_guest_through_the_kvm_sink() {
    let name = "device_msi_reaches_the_guest_through_the_kvm_sink";
    let fake = FakeVfio::edu_msi();
    let f = fake.clone();
    let Some((pvm, out, mut m)) = run_msi_payload(
        name,
        move |vm| {
            let mut m = manager(vm);
            m.add_unbacked_device(Some("msi0"), "fake-msi", f, Some(3))
                .unwrap();
            // The guest driver's part, through ECAM: message address/data, then MSI enable.
            let c = PCI_ECAM_START + (3 << 15) + MSI_CAP as u64;
            let bus = vm.mmio_bus();
            bus.write(c + 4, &0xfee0_0000u32.to_le_bytes()).unwrap();
            bus.write(c + 8, &0u32.to_le_bytes()).unwrap();
            bus.write(c + 12, &u16::from(MSI_VECTOR).to_le_bytes())
                .unwrap();
            bus.write(c + 2, &0x0081u16.to_le_bytes()).unwrap();
            assert_eq!(m.interrupt_state("msi0"), Some((true, false)));
            let routes = vm.gsi_router().unwrap().msi_routes();
            assert_eq!(routes.len(), 1, "{routes:?}");
            assert_eq!(routes[0].1.data, u32::from(MSI_VECTOR));
            assert_eq!(m.counters().devices["msi0"]["msi_vectors"], 1);
            m
        },
        |_| fake.fire_msi(),
    ) else {
        return;
    };
    assert_msi_handler_ran(name, &pvm, &out);
    // Removal releases the route.
    m.remove_device("msi0").unwrap();
    assert!(pvm.vm().gsi_router().unwrap().msi_routes().is_empty());
}

#[test]
fn masked_vector_holds_its_interrupt_until_unmasked() {
    let name = "masked_vector_holds_its_interrupt_until_unmasked";
    let vector = MsiVector {
        kind: MsiKind::Msix,
        index: 0,
    };
    let Some((pvm, out, (k, _fd))) = run_msi_payload(
        name,
        |vm| {
            let k = KvmInterruptSink::new("masked", Some(vm.gsi_router().unwrap().clone()));
            let msg = MsiMessage {
                address: 0xfee0_0000,
                data: u32::from(MSI_VECTOR),
            };
            // Routed masked; the device signals before the guest even runs.
            let fd = k.msi_route(vector, msg, true).unwrap();
            fd.write(1).unwrap();
            assert!(k.routes()[0].masked);
            (k, fd)
        },
        |(k, _)| {
            // Unmasking delivers the signal that arrived while masked (the pending bit).
            k.msi_mask(vector, false).unwrap();
        },
    ) else {
        return;
    };
    assert_msi_handler_ran(name, &pvm, &out);
    assert!(!k.routes()[0].masked);
    k.msi_release(vector);
    assert!(pvm.vm().gsi_router().unwrap().msi_routes().is_empty());
}

#[test]
fn iommu_info_without_vfio_fails_naming_the_device() {
    for (dev, want) in [
        ("/dev/vfio/devices/vfio0", "/sys/class/vfio-dev/vfio0"),
        (
            "/sys/bus/pci/devices/0000:7f:1f.7",
            "no PCI device 0000:7f:1f.7",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"))
            .args(["iommu-info", "--device", dev])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{dev}: {err}");
        assert_ne!(out.status.code(), Some(0));
        assert!(err.contains(dev) && err.contains(want), "{err}");
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_bad_device_aborts_boot_naming_it() {
    let name = "a_bad_device_aborts_boot_naming_it";
    if !kvm_available(name) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-dm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = dir.join("hlt.bin");
    std::fs::write(&payload, [0xf4]).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"))
        .arg("--payload")
        .arg(payload.display().to_string())
        .args(["--memory", "size=16M", "--serial", "off"])
        .args([
            "--device",
            "path=/sys/bus/pci/devices/0000:7f:1f.7,id=missing",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{name}: {err}");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        err.contains("0000:7f:1f.7") && err.contains("resolving the device"),
        "{err}"
    );
}

#[test]
fn device_manager_can_be_shared_with_the_api_thread() {
    fn shareable<T: Send + Sync>() {}
    shareable::<std::sync::Mutex<DeviceManager>>();
}

#[test]
fn device_manager_refuses_slot_32() {
    let name = "device_manager_refuses_slot_32";
    let Some((vm, mut dm)) = vm_with_manager(name) else {
        return;
    };
    let fds = fd_count();
    // Built directly, not parsed: the device manager must refuse these whatever its caller
    // checked (slot 32 has device number 0 in five bits, the host bridge's).
    for slot in [32u8, 33, 0x3f, 0xff] {
        let want_slot = format!("PCI slot {slot} is not a device slot");
        let assigned = DeviceConfig {
            path: Some("/sys/bus/pci/devices/0000:00:03.0".into()),
            pci_device_id: Some(slot),
            ..Default::default()
        };
        let emulated = DeviceConfig {
            emulated: Some("sva-copy".into()),
            pci_device_id: Some(slot),
            ..Default::default()
        };
        for c in [&assigned, &emulated] {
            let e = dm.add_device(c, None).unwrap_err();
            assert!(
                matches!(
                    &e,
                    DeviceManagerError::Step {
                        step: "choosing the PCI slot",
                        ..
                    }
                ),
                "slot {slot}: {}",
                e.message()
            );
            refused(
                &vm,
                &mut dm,
                c,
                None,
                &[&want_slot, "choosing the PCI slot"],
            );
            assert!(!e.message().contains("0000:00:00.0"), "{}", e.message());
        }
        let fake = FakeVfio::edu_msi();
        let before = snapshot(&vm, &dm);
        let e = dm
            .add_unbacked_device(Some("edu32"), "fake-edu", fake.clone(), Some(slot))
            .unwrap_err();
        assert!(e.message().contains(&want_slot), "{}", e.message());
        assert_eq!(
            snapshot(&vm, &dm),
            before,
            "state changed after: {}",
            e.message()
        );
        assert_eq!(Arc::strong_count(&fake), 1, "the refused model was kept");
    }
    // The host bridge still answers at 00:00.0, and slot 31 is a real slot.
    assert_eq!(ecam_read32(&vm, 0, 0), HOST_BRIDGE_ID);
    let added = dm
        .add_unbacked_device(Some("edu31"), "fake-edu", FakeVfio::edu_msi(), Some(31))
        .unwrap();
    assert_eq!(added.bdf.to_string(), "0000:00:1f.0");
    assert_eq!(ecam_read32(&vm, 31, 0), EDU_ID);
    dm.remove_device("edu31").unwrap();
    assert!(dm.device_ids().is_empty());
    assert_eq!(fd_count(), fds, "an fd was left open");
}

/// The literal `step` of every `DeviceManagerError::step(device, "step", ...)` call in
/// add.rs, the source of the add path.
fn add_rs_error_steps() -> Vec<String> {
    include_str!("../src/device_manager/add.rs")
        .split("DeviceManagerError::step(")
        .skip(1)
        .filter_map(|call| {
            let after_device = call.split_once(',')?.1.trim_start();
            let literal = after_device.strip_prefix('"')?;
            Some(literal.split_once('"')?.0.to_string())
        })
        .collect()
}

/// The position of `s` in [`AddStep::ALL`]; a match without wildcard, so a new step does not
/// compile here until this test knows it.
fn add_step_order(s: AddStep) -> usize {
    match s {
        AddStep::ChooseSlot => 0,
        AddStep::Resolve => 1,
        AddStep::OpenBackend => 2,
        AddStep::AllocIoas => 3,
        AddStep::Bind => 4,
        AddStep::KvmVfio => 5,
        AddStep::Caps => 6,
        AddStep::MapRam => 7,
        AddStep::Attach => 8,
        AddStep::BuildModel => 9,
        AddStep::PlaceOnBus => 10,
        AddStep::AttachViommu => 11,
    }
}

/// A failure injected right after each step of adding a device leaves nothing behind (bus
/// slot, model, KVM memory slots, ids, backend and mappings), with another device
/// staying. On this host (no /dev/iommu, no VFIO device) the steps an unbacked device takes
/// run here; the backend steps (bind, KVM-VFIO, RAM map, attach) run in the lab test of the
/// same name against a real edu.
#[test]
fn add_device_rollback_at_every_step() {
    let name = "add_device_rollback_at_every_step";
    // Every step error add.rs can return belongs to an AddStep, which has a fault point.
    let literal = add_rs_error_steps();
    assert!(
        literal.len() >= 12,
        "too few step errors found: {literal:?}"
    );
    for s in &literal {
        assert!(
            AddStep::ALL
                .iter()
                .any(|a| a.error_steps().contains(&s.as_str())),
            "add.rs fails with step {s:?}, which no AddStep (and so no fault point) covers"
        );
    }
    for (i, s) in AddStep::ALL.iter().enumerate() {
        assert_eq!(add_step_order(*s), i, "AddStep::ALL out of order at {s:?}");
        // An injected fault is named like the step's own errors.
        assert_eq!(s.error_steps().first(), Some(&s.name()), "{s:?}");
    }
    let Some((vm, mut dm)) = vm_with_manager(name) else {
        return;
    };
    // (No fd count here: the other tests of this binary open and close files and pipes in
    // parallel, and an unbacked add opens none. The lab test counts the VFIO and iommufd fds.)
    // Another device stays throughout: a rollback must leave it alone.
    let stays = FakeVfio::edu_msi();
    dm.add_unbacked_device(Some("stays"), "fake-stays", stays.clone(), Some(4))
        .unwrap();

    // The fault points an unbacked add passes, in order.
    arm_add_faults(None);
    dm.add_unbacked_device(Some("probe"), "fake-probe", FakeVfio::edu_msi(), Some(3))
        .unwrap();
    let passed = disarm_add_faults();
    assert_eq!(
        passed,
        [
            AddStep::ChooseSlot,
            AddStep::BuildModel,
            AddStep::PlaceOnBus
        ]
    );
    dm.remove_device("probe").unwrap();

    for step in passed {
        let fake = FakeVfio::edu_msi();
        let before = snapshot(&vm, &dm);
        arm_add_faults(Some(step));
        let e = dm
            .add_unbacked_device(Some("faulty"), "fake-faulty", fake.clone(), Some(3))
            .unwrap_err();
        let reached = disarm_add_faults();
        let msg = e.message();
        println!("{name}: fault after {step:?}: {msg}");
        assert!(
            msg.contains("fake-faulty") && msg.contains(step.name()) && msg.contains("injected"),
            "{step:?}: {msg}"
        );
        assert_eq!(reached.last(), Some(&step), "{step:?}: {reached:?}");
        assert_eq!(snapshot(&vm, &dm), before, "{step:?} left state behind");
        assert_eq!(ecam_read32(&vm, 3, 0), u32::MAX, "{step:?}: slot 3 kept");
        assert_eq!(Arc::strong_count(&fake), 1, "{step:?}: the model was kept");
        // The slot is free again: the same add now works.
        dm.add_unbacked_device(Some("faulty"), "fake-faulty", fake.clone(), Some(3))
            .unwrap();
        dm.remove_device("faulty").unwrap();
    }

    // add_device's own first step (the slot) on a device this host does not have; the fault
    // fires before the path is resolved.
    let before = snapshot(&vm, &dm);
    arm_add_faults(Some(AddStep::ChooseSlot));
    let e = dm
        .add_device(&cfg("path=/sys/bus/pci/devices/0000:00:03.0,id=edu3"), None)
        .unwrap_err();
    assert_eq!(disarm_add_faults(), [AddStep::ChooseSlot]);
    assert!(e.message().contains("injected"), "{}", e.message());
    assert_eq!(snapshot(&vm, &dm), before);
    println!(
        "{name}: steps {:?} need /dev/iommu and a VFIO device: the lab test \
         add_device_rollback_at_every_step covers them",
        &AddStep::ALL[1..AddStep::ALL.len() - 3]
    );

    assert_eq!(ecam_read32(&vm, 4, 0), EDU_ID, "the staying device left");
    dm.remove_device("stays").unwrap();
    assert_eq!(Arc::strong_count(&stays), 1);
}

/// Generated ids are not reused after a removal (the next one counts on), and the slot an
/// unbacked device was asked for is recorded in its config (two mutants scripts/mutants
/// found missed).
#[test]
fn unbacked_auto_ids_count_on_and_slot_is_recorded() {
    let name = "unbacked_auto_ids_count_on_and_slot_is_recorded";
    let Some((_vm, mut dm)) = vm_with_manager(name) else {
        return;
    };
    let a = dm
        .add_unbacked_device(None, "fake-a", FakeVfio::edu_msi(), Some(5))
        .unwrap();
    let b = dm
        .add_unbacked_device(None, "fake-b", FakeVfio::edu_msi(), None)
        .unwrap();
    assert_eq!((a.id.as_str(), b.id.as_str()), ("_vfio0", "_vfio1"));
    // The newest generated id leaves: it is not handed out again.
    dm.remove_device("_vfio1").unwrap();
    let c = dm
        .add_unbacked_device(None, "fake-c", FakeVfio::edu_msi(), None)
        .unwrap();
    assert_eq!(c.id, "_vfio2", "a generated id was reused");
    let d = dm
        .add_unbacked_device(Some("slot6"), "fake-d", FakeVfio::edu_msi(), Some(6))
        .unwrap();
    assert_eq!(d.bdf.to_string(), "0000:00:06.0");
    let tree = serde_json::to_value(dm.device_tree()).unwrap();
    let slot = tree["slot6"]["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["type"] == "host"))
        .map(|r| r["config"]["pci_device_id"].clone());
    assert_eq!(slot, Some(serde_json::json!(6)), "{tree}");
    dm.remove_all();
}
