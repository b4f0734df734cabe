//! The ACPI PCI hotplug controller on the host's /dev/kvm: its register window and GED irqfd
//! on a real VM, and a guest that takes the GED interrupt on GSI 5, reads the registers as
//! `_EVT`/`PCNT` would and ejects the slot as `_EJ0` would. The bus-level register tests are
//! unit tests next to the controller (`vmm/src/hotplug/tests.rs`).
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use vmm::hotplug::regs::{B0EJ, GDAT, PCIU, PSEG};
use vmm::hotplug::{HotplugError, PciHotplug, GED_EVENT_PCI_HOTPLUG};
use vmm::layout::{GED_GSI, PCI_HOTPLUG_SIZE, PCI_HOTPLUG_START};
use vmm::memory::RamConfig;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::{kvm_available, read_guest, run_interrupt_payload};

#[test]
fn install_registers_window_and_irqfd_on_a_kvm_vm() {
    if !kvm_available("install_registers_window_and_irqfd_on_a_kvm_vm") {
        return;
    }
    let opts = |irqchip| VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: 64 << 20,
            hugepages: false,
        },
        irqchip,
    };
    let vm = Vm::new(opts(IrqchipMode::InKernel)).unwrap();
    let ejected = Arc::new(Mutex::new(Vec::new()));
    let log = ejected.clone();
    let hp = PciHotplug::install(&vm, Box::new(move |s| log.lock().unwrap().push(s))).unwrap();
    assert!(vm
        .mmio_bus()
        .ranges()
        .contains(&(PCI_HOTPLUG_START, PCI_HOTPLUG_SIZE)));
    hp.notify_added(2).unwrap();
    let mut b = [0u8; 4];
    vm.mmio_bus()
        .read(PCI_HOTPLUG_START + PCIU, &mut b)
        .unwrap();
    assert_eq!(u32::from_le_bytes(b), 1 << 2);
    vm.mmio_bus()
        .write(PCI_HOTPLUG_START + B0EJ, &(1u32 << 2).to_le_bytes())
        .unwrap();
    assert_eq!(*ejected.lock().unwrap(), vec![2]);
    // A second controller cannot take the same window.
    assert!(matches!(
        PciHotplug::install(&vm, Box::new(|_| {})),
        Err(HotplugError::Register { .. })
    ));
    // Without the in-kernel irqchip there is no GED interrupt.
    let bare = Vm::new(opts(IrqchipMode::Off)).unwrap();
    assert!(matches!(
        PciHotplug::install(&bare, Box::new(|_| {})),
        Err(HotplugError::Irq { gsi: GED_GSI, .. })
    ));
}

/// The vector the payload's IOAPIC entry 5 (the GED's GSI) raises.
const VECTOR: u8 = 0x45;
/// Where the payload's handler starts.
const HANDLER_OFFSET: u64 = 0x80;

/// Long mode, 4 GiB identity-mapped. Mask both PICs; lidt [0x3000]; LAPIC SVR = 0x1ff,
/// TPR = 0; IOAPIC redirection entry 5 (IOREGSEL 0x1a/0x1b) = vector 0x45, fixed, edge,
/// active high, unmasked, destination APIC 0; sti; out 0x520 (ready); 1: hlt; jmp 1b.
/// .balign 128, handler: mov rbx,0xfe000010; [0x8000] = GDAT; rbx = 0xfe000000;
/// [0x8004] = PCIU; [0x8008] = PCIU (again); PSEG = 0; B0EJ = 0x80 (slot 7);
/// LAPIC EOI; out 0x501, 0x45 (debug exit); 2: hlt; jmp 2b.
const GED_PAYLOAD: [u8; 215] = [
    0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1, 0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0x48, 0xbb,
    0xf0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0xff, 0x01, 0x00, 0x00, 0x48, 0xbb,
    0x80, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x48, 0xbb,
    0x00, 0x00, 0xc0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x1a, 0x00, 0x00, 0x00, 0xc7, 0x43,
    0x10, 0x45, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x1b, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x10, 0x00, 0x00,
    0x00, 0x00, 0xfb, 0x66, 0xba, 0x20, 0x05, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd, 0x66, 0x66, 0x2e,
    0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x90,
    0x48, 0xbb, 0x10, 0x00, 0x00, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x00,
    0x80, 0x00, 0x00, 0x48, 0xbb, 0x00, 0x00, 0x00, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x03, 0x89,
    0x04, 0x25, 0x04, 0x80, 0x00, 0x00, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x08, 0x80, 0x00, 0x00, 0xc7,
    0x43, 0x0c, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x43, 0x08, 0x80, 0x00, 0x00, 0x00, 0x48, 0xbb, 0xb0,
    0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba, 0x01,
    0x05, 0xb0, 0x45, 0xee, 0xf4, 0xeb, 0xfd,
];

#[test]
fn guest_gets_ged_interrupt_on_gsi5_reads_registers_and_ejects() {
    let name = "guest_gets_ged_interrupt_on_gsi5_reads_registers_and_ejects";
    assert_eq!(
        PCI_HOTPLUG_START, 0xfe00_0000,
        "the payload hard-codes the window"
    );
    assert_eq!((GED_GSI, GDAT, B0EJ, PSEG), (5, 0x10, 0x08, 0x0c));
    let Some((pvm, out, (hp, eject_rx))) = run_interrupt_payload(
        name,
        &GED_PAYLOAD,
        VECTOR,
        HANDLER_OFFSET,
        |vm| {
            // The eject callback does what the device manager's should: send a message.
            let (eject_tx, eject_rx) = mpsc::channel();
            let hp = PciHotplug::install(
                vm,
                Box::new(move |slot| {
                    let _ = eject_tx.send(slot);
                }),
            )
            .unwrap();
            (hp, eject_rx)
        },
        |(hp, _)| hp.notify_added(7).unwrap(),
    ) else {
        return;
    };
    assert_eq!(
        out.guest_exit_code(),
        Some(u32::from(VECTOR)),
        "{name}: the GED interrupt handler did not run: {:?}",
        out.exit
    );
    let seen: [u32; 3] = read_guest(&pvm, 0x8000);
    assert_eq!(seen, [GED_EVENT_PCI_HOTPLUG, 1 << 7, 0], "GDAT, PCIU, PCIU");
    assert_eq!(eject_rx.try_recv(), Ok(7));
    assert!(eject_rx.try_recv().is_err(), "one eject only");
    assert_eq!(hp.pending(), (0, 0));
}
