//! The controller driven through a bus exactly as a guest's AML would drive it.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{OnceLock, Weak};

use devices::bus::Bus;

use super::regs::{B0EJ, GDAT, PCID, PCIU, PSEG, REGS_LEN};
use super::*;

/// Counts triggers; fails them on demand.
#[derive(Default)]
struct FakeLine {
    count: AtomicUsize,
    fail: AtomicBool,
}

impl InterruptLine for FakeLine {
    fn trigger(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    hp: Arc<PciHotplug>,
    line: Arc<FakeLine>,
    ejected: Arc<Mutex<Vec<u8>>>,
    bus: Bus,
}

impl Rig {
    fn new() -> Self {
        let line = Arc::new(FakeLine::default());
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let log = ejected.clone();
        let hp = PciHotplug::new(
            line.clone(),
            Box::new(move |slot| log.lock().unwrap().push(slot)),
        );
        let bus = Bus::new();
        bus.insert(hp.bus_device(), PCI_HOTPLUG_START, PCI_HOTPLUG_SIZE)
            .unwrap();
        Self {
            hp,
            line,
            ejected,
            bus,
        }
    }

    fn read(&self, offset: u64) -> u32 {
        let mut b = [0xaau8; 4];
        self.bus.read(PCI_HOTPLUG_START + offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn write(&self, offset: u64, v: u32) {
        self.bus
            .write(PCI_HOTPLUG_START + offset, &v.to_le_bytes())
            .unwrap();
    }

    fn irqs(&self) -> usize {
        self.line.count.load(Ordering::SeqCst)
    }

    fn ejected(&self) -> Vec<u8> {
        std::mem::take(&mut *self.ejected.lock().unwrap())
    }
}

#[test]
fn notify_added_sets_pciu_and_raises_ged_once() {
    let r = Rig::new();
    r.hp.notify_added(3).unwrap();
    assert_eq!(r.irqs(), 1);
    assert_eq!(r.hp.pending(), (1 << 3, 0));
    // What _EVT then PCNT read: the GED event, then the bitmaps; each read clears.
    assert_eq!(r.read(GDAT), GED_EVENT_PCI_HOTPLUG);
    assert_eq!(r.read(GDAT), 0);
    assert_eq!(r.read(PCIU), 1 << 3);
    assert_eq!(r.read(PCIU), 0);
    assert_eq!(r.read(PCID), 0);
    // Two notifications before the guest scans: two interrupts, both slots in one read.
    r.hp.notify_added(1).unwrap();
    r.hp.notify_added(31).unwrap();
    assert_eq!(r.irqs(), 3);
    assert_eq!(r.read(PCIU), (1 << 1) | (1 << 31));
    assert!(r.ejected().is_empty());
}

#[test]
fn request_eject_sets_pcid_and_eject_reports_the_slot() {
    let r = Rig::new();
    r.hp.notify_added(4).unwrap();
    r.hp.request_eject(4).unwrap();
    r.hp.request_eject(9).unwrap();
    assert_eq!(r.irqs(), 3);
    // The later eject request replaced the pending add of slot 4.
    assert_eq!(r.read(PCIU), 0);
    assert_eq!(r.read(PCID), (1 << 4) | (1 << 9));
    assert_eq!(r.read(PCID), 0);
    assert!(r.ejected().is_empty(), "no eject before the guest's _EJ0");
    // _EJ0 of S09 through PCEJ: PSEG = 0, B0EJ = 1 << 9.
    r.write(PSEG, 0);
    r.write(B0EJ, 1 << 9);
    assert_eq!(r.ejected(), vec![9]);
    // B0EJ reads as 0 and does not raise interrupts.
    assert_eq!(r.read(B0EJ), 0);
    assert_eq!(r.irqs(), 3);
    // Several bits at once are reported in slot order.
    r.write(B0EJ, (1 << 30) | (1 << 2));
    assert_eq!(r.ejected(), vec![2, 30]);
}

#[test]
fn eject_clears_a_pending_request_for_that_slot() {
    let r = Rig::new();
    r.hp.request_eject(6).unwrap();
    r.hp.request_eject(7).unwrap();
    // The guest ejects slot 6 on its own before scanning.
    r.write(B0EJ, 1 << 6);
    assert_eq!(r.ejected(), vec![6]);
    assert_eq!(r.hp.pending(), (0, 1 << 7));
}

#[test]
fn eject_of_host_bridge_or_other_segment_is_ignored() {
    let r = Rig::new();
    r.write(B0EJ, 1);
    assert!(r.ejected().is_empty());
    r.write(PSEG, 1);
    assert_eq!(r.read(PSEG), 1);
    r.write(B0EJ, 1 << 5);
    assert!(r.ejected().is_empty(), "segment 1 does not exist");
    r.write(PSEG, 0);
    r.write(B0EJ, (1 << 5) | 1);
    assert_eq!(r.ejected(), vec![5]);
    assert!(r.hp.warn.count() >= 2);
}

#[test]
fn out_of_range_slots_are_rejected_without_interrupt() {
    let r = Rig::new();
    for slot in [0u8, 32, 200, u8::MAX] {
        assert!(matches!(
            r.hp.notify_added(slot),
            Err(HotplugError::InvalidSlot { slot: s }) if s == slot
        ));
        assert!(matches!(
            r.hp.request_eject(slot),
            Err(HotplugError::InvalidSlot { slot: s }) if s == slot
        ));
    }
    assert_eq!(r.irqs(), 0);
    assert_eq!(r.hp.pending(), (0, 0));
    assert_eq!(r.hp.ged().pending(), 0);
}

#[test]
fn odd_width_and_offset_accesses_are_ignored() {
    let r = Rig::new();
    r.hp.notify_added(8).unwrap();
    r.hp.request_eject(10).unwrap();
    let warned = r.hp.warn.count();
    // Byte, word and qword reads of PCIU, and a misaligned dword: no clearing, zero data.
    for (offset, len) in [
        (PCIU, 1),
        (PCIU, 2),
        (PCIU, 8),
        (PCIU + 1, 4),
        (PCID + 2, 2),
    ] {
        let mut b = vec![0xaau8; len];
        r.bus.read(PCI_HOTPLUG_START + offset, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "{offset:#x}/{len}: {b:?}");
    }
    assert_eq!(r.hp.pending(), (1 << 8, 1 << 10));
    // Reserved offsets in the window read 0.
    let mut off = REGS_LEN;
    while off < PCI_HOTPLUG_SIZE {
        assert_eq!(r.read(off), 0, "{off:#x}");
        off += 4;
    }
    // Odd-width writes to B0EJ and PSEG do nothing.
    r.bus.write(PCI_HOTPLUG_START + B0EJ, &[1 << 3]).unwrap();
    r.bus
        .write(PCI_HOTPLUG_START + B0EJ, &(1u64 << 3).to_le_bytes())
        .unwrap();
    r.bus.write(PCI_HOTPLUG_START + PSEG, &[1, 0]).unwrap();
    assert_eq!(r.read(PSEG), 0);
    assert!(r.ejected().is_empty());
    // Writes to the read-only registers are ignored.
    r.write(PCIU, 0);
    r.write(PCID, 0);
    r.write(GDAT, 0);
    assert_eq!(r.hp.pending(), (1 << 8, 1 << 10));
    assert_eq!(r.hp.ged().pending(), GED_EVENT_PCI_HOTPLUG);
    assert!(r.hp.warn.count() >= warned + 11);
    // Accesses crossing the end of the window never reach the device.
    let mut b = [0u8; 4];
    assert!(r
        .bus
        .read(PCI_HOTPLUG_START + PCI_HOTPLUG_SIZE - 2, &mut b)
        .is_err());
    assert_eq!(r.irqs(), 2);
}

#[test]
fn failed_interrupt_is_reported_and_keeps_the_bit() {
    let r = Rig::new();
    r.line.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        r.hp.notify_added(12),
        Err(HotplugError::Interrupt { slot: 12, .. })
    ));
    r.line.fail.store(false, Ordering::SeqCst);
    // The next notification's interrupt makes the guest see both.
    r.hp.notify_added(13).unwrap();
    assert_eq!(r.irqs(), 1);
    assert_eq!(r.read(PCIU), (1 << 12) | (1 << 13));
}

#[test]
fn eject_callback_may_call_back_into_the_controller() {
    let line = Arc::new(FakeLine::default());
    let me: Arc<OnceLock<Weak<PciHotplug>>> = Arc::new(OnceLock::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (me2, seen2) = (me.clone(), seen.clone());
    let hp = PciHotplug::new(
        line.clone(),
        Box::new(move |slot| {
            let hp = me2.get().and_then(Weak::upgrade).unwrap();
            // E.g. the device manager re-plugging a new device into the freed slot.
            hp.notify_added(slot).unwrap();
            seen2.lock().unwrap().push((slot, hp.pending()));
        }),
    );
    me.set(Arc::downgrade(&hp)).unwrap();
    let dev = hp.bus_device();
    dev.lock()
        .unwrap()
        .write(PCI_HOTPLUG_START, B0EJ, &(1u32 << 17).to_le_bytes());
    assert_eq!(*seen.lock().unwrap(), vec![(17, (1 << 17, 0))]);
    assert_eq!(line.count.load(Ordering::SeqCst), 1);
}

#[test]
fn install_registers_window_and_irqfd_on_a_kvm_vm() {
    use crate::memory::RamConfig;
    use crate::vm::{IrqchipMode, VmOptions};
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("install_registers_window_and_irqfd_on_a_kvm_vm: skipped: no /dev/kvm");
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

/// Port the guest payload writes once its IDT, LAPIC and IOAPIC are ready.
struct ReadyPort(std::sync::mpsc::Sender<()>);

impl BusDevice for ReadyPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        let _ = self.0.send(());
    }
}

#[test]
fn guest_gets_ged_interrupt_on_gsi5_reads_registers_and_ejects() {
    use std::sync::mpsc;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};

    use crate::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
    use crate::runner::PayloadVm;
    use crate::vm::IrqchipMode;

    let name = "guest_gets_ged_interrupt_on_gsi5_reads_registers_and_ejects";
    if !std::path::Path::new("/dev/kvm").exists() {
        println!("{name}: skipped: no /dev/kvm");
        return;
    }
    const VECTOR: u8 = 0x45;
    const IDTR_GPA: u64 = 0x3000;
    const IDT_GPA: u64 = 0x4000;
    const HANDLER: u64 = DEFAULT_LONG_GPA + 0x80;
    // Long mode, 4 GiB identity-mapped. Mask both PICs; lidt [0x3000]; LAPIC SVR = 0x1ff,
    // TPR = 0; IOAPIC redirection entry 5 (IOREGSEL 0x1a/0x1b) = vector 0x45, fixed, edge,
    // active high, unmasked, destination APIC 0; sti; out 0x520 (ready); 1: hlt; jmp 1b.
    // .balign 128, handler: mov rbx,0xfe000010; [0x8000] = GDAT; rbx = 0xfe000000;
    // [0x8004] = PCIU; [0x8008] = PCIU (again); PSEG = 0; B0EJ = 0x80 (slot 7);
    // LAPIC EOI; out 0x501, 0x45 (debug exit); 2: hlt; jmp 2b.
    let code = [
        0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1, 0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0x48,
        0xbb, 0xf0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0xff, 0x01, 0x00, 0x00,
        0x48, 0xbb, 0x80, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x00, 0x00, 0x00,
        0x00, 0x48, 0xbb, 0x00, 0x00, 0xc0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x1a, 0x00,
        0x00, 0x00, 0xc7, 0x43, 0x10, 0x45, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x1b, 0x00, 0x00, 0x00,
        0xc7, 0x43, 0x10, 0x00, 0x00, 0x00, 0x00, 0xfb, 0x66, 0xba, 0x20, 0x05, 0xb0, 0x01, 0xee,
        0xf4, 0xeb, 0xfd, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66,
        0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x66, 0x2e, 0x0f, 0x1f,
        0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x90, 0x48, 0xbb, 0x10, 0x00, 0x00, 0xfe, 0x00,
        0x00, 0x00, 0x00, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0x48, 0xbb, 0x00,
        0x00, 0x00, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x04, 0x80, 0x00,
        0x00, 0x8b, 0x03, 0x89, 0x04, 0x25, 0x08, 0x80, 0x00, 0x00, 0xc7, 0x43, 0x0c, 0x00, 0x00,
        0x00, 0x00, 0xc7, 0x43, 0x08, 0x80, 0x00, 0x00, 0x00, 0x48, 0xbb, 0xb0, 0x00, 0xe0, 0xfe,
        0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xb0,
        0x45, 0xee, 0xf4, 0xeb, 0xfd,
    ];
    assert_eq!(
        PCI_HOTPLUG_START, 0xfe00_0000,
        "the payload hard-codes the window"
    );
    assert_eq!((GED_GSI, GDAT, B0EJ, PSEG), (5, 0x10, 0x08, 0x0c));
    let mut pvm = match PayloadVm::new(16 << 20, IrqchipMode::InKernel) {
        Ok(p) => p,
        Err(e) => {
            println!("{name}: skipped: cannot create an in-kernel irqchip VM: {e:?}");
            return;
        }
    };
    // A 64-bit interrupt gate (selector 0x10, the boot code segment) and the IDTR image.
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((HANDLER >> 32) as u32).to_le_bytes());
    let mem = pvm.vm().ram().memory();
    mem.write_slice(&gate, GuestAddress(IDT_GPA + u64::from(VECTOR) * 16))
        .unwrap();
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT_GPA.to_le_bytes());
    mem.write_slice(&idtr, GuestAddress(IDTR_GPA)).unwrap();

    let (ready_tx, ready_rx) = mpsc::channel();
    pvm.vm()
        .add_pio_device(Arc::new(Mutex::new(ReadyPort(ready_tx))), 0x520, 1)
        .unwrap();
    // The eject callback does what the device manager's should: send a message.
    let (eject_tx, eject_rx) = mpsc::channel();
    let hp = PciHotplug::install(
        pvm.vm(),
        Box::new(move |slot| {
            let _ = eject_tx.send(slot);
        }),
    )
    .unwrap();

    let running = pvm
        .start(&code, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let guard_time = Duration::from_secs(20);
    let ready = ready_rx.recv_timeout(guard_time).is_ok();
    if ready {
        hp.notify_added(7).unwrap();
    }
    let out = pvm.finish_within(running, guard_time);
    println!("{name}: exit {:?}", out.exit);
    if let Some(Err(e)) = out.stop() {
        panic!("{name}: the payload failed: {e}");
    }
    assert!(ready, "{name}: the payload never reported ready");
    assert_eq!(
        out.guest_exit_code(),
        Some(u32::from(VECTOR)),
        "{name}: the GED interrupt handler did not run: {:?}",
        out.exit
    );
    let seen: [u32; 3] = pvm
        .vm()
        .ram()
        .memory()
        .read_obj(GuestAddress(0x8000))
        .unwrap();
    assert_eq!(seen, [GED_EVENT_PCI_HOTPLUG, 1 << 7, 0], "GDAT, PCIU, PCIU");
    assert_eq!(eject_rx.try_recv(), Ok(7));
    assert!(eject_rx.try_recv().is_err(), "one eject only");
    assert_eq!(hp.pending(), (0, 0));
}
