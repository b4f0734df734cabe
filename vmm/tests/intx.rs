//! PCI INTx end to end on the host's /dev/kvm: a fake VFIO device (mtty's IDs, pin INTA, an
//! automasking INTx line) added without an IOMMU backend; a payload that programs the IOAPIC
//! entry of the device's GSI level-triggered and active-low (what the DSDT's `_PRT` tells
//! Linux), takes the interrupt, EOIs it; the resample eventfd (or the model's own unmask, when
//! the device refuses an unmask eventfd) re-opens the line for the next interrupt.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::pci::{InterruptSink, IntxPin};
use vmm::device_manager::interrupts::KvmInterruptSink;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig};
use vmm::layout::{pci_intx_gsi, IOAPIC_START, LAPIC_START};
use vmm::runner::{PayloadOutcome, PayloadVm};
use vmm::vm::IrqchipMode;

use common::{
    ecam_read32, irqchip_vm, kvm_available, read_guest, run_interrupt_payload, FakeVfio,
    HANG_GUARD, IDTR_GPA, MEM, MTTY_ID,
};

const VECTOR: u8 = 0x40;
const HANDLER_OFFSET: u64 = 0x80;
/// The handler counts interrupts here.
const COUNT_GPA: u32 = 0x8000;
/// The slot the fake device is put in.
const SLOT: u8 = 3;

/// Waits (bounded, as a hang breaker) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn mov_rbx(v: u64) -> Vec<u8> {
    let mut c = vec![0x48, 0xbb];
    c.extend(v.to_le_bytes());
    c
}

/// `mov dword [rbx + disp], imm`.
fn store_rbx(disp: u8, imm: u32) -> Vec<u8> {
    let mut c = if disp == 0 {
        vec![0xc7, 0x03]
    } else {
        vec![0xc7, 0x43, disp]
    };
    c.extend(imm.to_le_bytes());
    c
}

/// IOAPIC redirection entry (low dword): fixed delivery to APIC 0, unmasked, level-triggered
/// (bit 15), active-low (bit 13): how Linux programs a GSI a `_PRT` entry names.
const REDIR_LEVEL_LOW: u32 = (1 << 15) | (1 << 13) | VECTOR as u32;

/// Long mode: load the IDT, program the IOAPIC entry of `gsi`, enable the LAPIC, sti, report
/// ready on port 0x520, hlt in a loop. The handler (at HANDLER_OFFSET) counts at COUNT_GPA,
/// EOIs at the LAPIC, and exits with 0x42 on port 0x501 at the `interrupts`th interrupt
/// (iretq before that).
fn payload(gsi: u32, interrupts: u8) -> Vec<u8> {
    let mut c = vec![0x0f, 0x01, 0x1c, 0x25];
    c.extend((IDTR_GPA as u32).to_le_bytes()); // lidt [IDTR_GPA]
    c.extend(mov_rbx(IOAPIC_START));
    c.extend(store_rbx(0, 0x10 + 2 * gsi)); // IOREGSEL: entry low
    c.extend(store_rbx(0x10, REDIR_LEVEL_LOW)); // IOWIN
    c.extend(store_rbx(0, 0x11 + 2 * gsi)); // IOREGSEL: entry high
    c.extend(store_rbx(0x10, 0)); // destination APIC 0
    c.extend(mov_rbx(LAPIC_START + 0xf0));
    c.extend(store_rbx(0, 0x1ff)); // SVR: APIC on, spurious vector 0xff
    c.push(0xfb); // sti
    c.extend([0x66, 0xba, 0x20, 0x05, 0xb0, 0x01, 0xee]); // out 0x520, 1
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    assert!(c.len() as u64 <= HANDLER_OFFSET, "main part too long");
    c.resize(HANDLER_OFFSET as usize, 0x90);
    // inc dword [COUNT_GPA]
    c.extend([0xff, 0x04, 0x25]);
    c.extend(COUNT_GPA.to_le_bytes());
    c.extend(mov_rbx(LAPIC_START + 0xb0));
    c.extend(store_rbx(0, 0)); // EOI
                               // cmp dword [COUNT_GPA], interrupts; jne iret
    c.extend([0x83, 0x3c, 0x25]);
    c.extend(COUNT_GPA.to_le_bytes());
    c.push(interrupts);
    c.extend([0x75, 10]);
    c.extend([0x66, 0xba, 0x01, 0x05, 0xb0, 0x42, 0xee, 0xf4, 0xeb, 0xfd]); // out 0x501, 0x42
    c.extend([0x48, 0xcf]); // iretq
    c
}

/// Boots the payload for `interrupts` interrupts with the fake at SLOT; `drive` runs once the
/// guest waits for interrupts. Returns `None` (skipping) when this KVM cannot make an irqchip
/// VM.
fn run_intx(
    name: &str,
    fake: Arc<FakeVfio>,
    interrupts: u8,
    drive: impl FnOnce(&FakeVfio),
) -> Option<(PayloadVm, DeviceManager, PayloadOutcome)> {
    let gsi = pci_intx_gsi(SLOT, 0);
    let code = payload(gsi, interrupts);
    let f = fake.clone();
    let (pvm, out, dm) = run_interrupt_payload(
        name,
        &code,
        VECTOR,
        HANDLER_OFFSET,
        |vm| {
            let mut dm = DeviceManager::new(vm, DeviceManagerConfig::default()).unwrap();
            let added = dm
                .add_unbacked_device(Some("mtty0"), "fake-mtty", f, Some(SLOT))
                .unwrap();
            assert_eq!(added.bdf.to_string(), "0000:00:03.0");
            // The guest sees mtty's IDs and pin INTA; the line register is the guest's to
            // write.
            assert_eq!(ecam_read32(vm, SLOT, 0), MTTY_ID);
            assert_eq!(ecam_read32(vm, SLOT, 0x3c) >> 8 & 0xff, 1, "INTA");
            println!("{name}: slot {SLOT} INTA on GSI {gsi}");
            dm
        },
        |_| drive(&fake),
    )?;
    Some((pvm, dm, out))
}

/// Asserts that the handler saw `interrupts` interrupts and then exited with 0x42.
fn assert_handler_counted(name: &str, pvm: &PayloadVm, out: &PayloadOutcome, interrupts: u32) {
    let count: u32 = read_guest(pvm, u64::from(COUNT_GPA));
    assert_eq!(
        out.guest_exit_code(),
        Some(0x42),
        "{name}: the handler did not see {interrupts} interrupts (count {count}): {:?}",
        out.exit
    );
    assert_eq!(count, interrupts);
}

#[test]
fn intx_reaches_the_guest_and_its_eoi_signals_the_resample_eventfd() {
    let name = "intx_reaches_the_guest_and_its_eoi_signals_the_resample_eventfd";
    let fake = FakeVfio::mtty_intx(true);
    let Some((pvm, mut dm, out)) = run_intx(name, fake.clone(), 2, |f| {
        assert!(f.fire_intx());
        // The guest's EOI signals the resample eventfd, which VFIO (here: the fake) took as
        // its unmask eventfd.
        eventually("the EOI signals the resample eventfd", || {
            f.poll_unmask_fd()
        });
        assert!(f.fire_intx(), "the line was unmasked");
    }) else {
        return;
    };
    assert_handler_counted(name, &pvm, &out, 2);
    // The second EOI too; and the model never had to unmask by itself.
    eventually("the second EOI signals the resample eventfd", || {
        fake.poll_unmask_fd()
    });
    assert_eq!(fake.unmasks(), 0);
    assert_eq!(fake.fired(), 2);
    dm.remove_device("mtty0").unwrap();
    assert!(!fake.irq_enabled(), "INTx disabled");
}

#[test]
fn refused_unmask_eventfd_still_gives_one_interrupt_per_eoi() {
    let name = "refused_unmask_eventfd_still_gives_one_interrupt_per_eoi";
    // mtty's case: ENOTTY for the unmask eventfd. The model unmasks after each EOI; without
    // that the second fire would find the line masked and the guest would wait forever.
    let fake = FakeVfio::mtty_intx(false);
    let Some((pvm, mut dm, out)) = run_intx(name, fake.clone(), 3, |f| {
        for n in 1..=3u64 {
            assert!(f.fire_intx(), "interrupt {n}: the line is still masked");
            if n < 3 {
                eventually("the model unmasks after the EOI", || f.unmasks() >= n);
            }
        }
    }) else {
        return;
    };
    assert_handler_counted(name, &pvm, &out, 3);
    assert!(!fake.has_unmask_fd());
    eventually("the third EOI is followed by an unmask", || {
        fake.unmasks() == 3
    });
    dm.remove_device("mtty0").unwrap();
}

#[test]
fn intx_irqfd_is_released_with_the_line() {
    let name = "intx_irqfd_is_released_with_the_line";
    if !kvm_available(name) {
        return;
    }
    let Some(pvm) = irqchip_vm(name) else {
        return;
    };
    let vm = pvm.vm();
    let router = vm.gsi_router().unwrap().clone();
    let sink = KvmInterruptSink::new("s5", Some(router)).with_intx(5, vm.vm_fd().clone());
    let fds = sink.intx(IntxPin::B).unwrap();
    let info = sink.intx_info().unwrap();
    assert_eq!((info.pin, info.gsi), (IntxPin::B, pci_intx_gsi(5, 1)));
    assert_eq!(info.gsi, 22);
    assert!(info.resample, "KVM took the irqfd with a resample eventfd");
    assert!(fds.resample.is_some());
    // KVM holds the trigger eventfd: assigning it again is refused (EBUSY)...
    let again = vm.vm_fd().register_irqfd(&fds.trigger, info.gsi);
    assert!(again.is_err(), "the irqfd is registered");
    // ...until the line is released.
    sink.intx_release();
    assert!(sink.intx_info().is_none());
    vm.vm_fd().register_irqfd(&fds.trigger, info.gsi).unwrap();
    vm.vm_fd().unregister_irqfd(&fds.trigger, info.gsi).unwrap();

    // No slot given: no INTx.
    let plain = KvmInterruptSink::new("plain", Some(vm.gsi_router().unwrap().clone()));
    assert!(plain.intx(IntxPin::A).is_none());
    // No irqchip: no INTx either.
    let no_chip = KvmInterruptSink::new("nochip", None).with_intx(5, vm.vm_fd().clone());
    assert!(no_chip.intx(IntxPin::A).is_none());
}

#[test]
fn intx_pin_is_hidden_without_an_irqchip() {
    let name = "intx_pin_is_hidden_without_an_irqchip";
    if !kvm_available(name) {
        return;
    }
    let pvm = PayloadVm::new(MEM, IrqchipMode::Off).unwrap();
    let mut dm = DeviceManager::new(pvm.vm(), DeviceManagerConfig::default()).unwrap();
    let fake = FakeVfio::mtty_intx(true);
    dm.add_unbacked_device(Some("mtty0"), "fake-mtty", fake.clone(), Some(SLOT))
        .unwrap();
    assert_eq!(ecam_read32(pvm.vm(), SLOT, 0x3c) >> 8 & 0xff, 0, "no pin");
    assert!(!fake.irq_enabled());
}
