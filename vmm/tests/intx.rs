//! PCI INTx end to end on the host's /dev/kvm: a fake VFIO device (mtty's IDs, pin INTA, an
//! automasking INTx line) added without an IOMMU backend; a payload that programs the IOAPIC
//! entry of the device's GSI level-triggered and active-low (what the DSDT's `_PRT` tells
//! Linux), takes the interrupt, EOIs it; the resample eventfd (or the model's own unmask, when
//! the device refuses an unmask eventfd) re-opens the line for the next interrupt.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::BusDevice;
use devices::pci::{InterruptSink, IntxPin};
use devices::vfio::backend::{CONFIG_REGION, INTX_IRQ};
use devices::vfio::{IrqInfo, MmapArea, RegionInfo, VfioRegions};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::device_manager::interrupts::KvmInterruptSink;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig};
use vmm::layout::{pci_intx_gsi, IOAPIC_START, LAPIC_START, PCI_ECAM_START};
use vmm::runner::{PayloadOutcome, PayloadVm};
use vmm::vm::{IrqchipMode, Vm};
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 16 << 20;
/// A guard against a guest that never stops: not a timing assertion, a hang breaker.
const HANG_GUARD: Duration = Duration::from_secs(20);
/// mtty's vendor/device dword.
const MTTY_ID: u32 = 0x3253_4348;
const VECTOR: u8 = 0x40;
const IDTR_GPA: u64 = 0x3000;
const IDT_GPA: u64 = 0x4000;
const HANDLER_OFFSET: u64 = 0x80;
/// The handler counts interrupts here.
const COUNT_GPA: u32 = 0x8000;
/// The slot the fake device is put in.
const SLOT: u8 = 3;

fn kvm_available(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        println!("{test}: running on /dev/kvm");
        true
    } else {
        println!("{test}: skipped: no /dev/kvm");
        false
    }
}

/// Waits (bounded, as a hang breaker) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + HANG_GUARD;
    while !f() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An mtty-like fake: 4348:3253, pin INTA, one 8-byte I/O BAR, an INTx line that VFIO masks
/// after each trigger until unmasked (by the unmask eventfd, when accepted, or by an unmask
/// call).
struct FakeMtty {
    config: Mutex<[u8; 256]>,
    accept_unmask_fd: bool,
    trigger: Mutex<Option<EventFd>>,
    unmask_fd: Mutex<Option<EventFd>>,
    masked: AtomicBool,
    unmasks: AtomicU64,
    fired: AtomicU64,
}

impl FakeMtty {
    fn new(accept_unmask_fd: bool) -> Arc<Self> {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&MTTY_ID.to_le_bytes());
        c[0x09..0x0c].copy_from_slice(&[0x02, 0x00, 0x07]);
        c[0x10] = 0x01; // I/O BAR0
        c[0x3d] = 0x01; // INTA
        Arc::new(Self {
            config: Mutex::new(c),
            accept_unmask_fd,
            trigger: Mutex::new(None),
            unmask_fd: Mutex::new(None),
            masked: AtomicBool::new(false),
            unmasks: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        })
    }

    /// The device raises INTx: signals the trigger eventfd unless the line is masked, then
    /// masks it (VFIO's automask). Returns whether it signalled.
    fn fire(&self) -> bool {
        if self.masked.swap(true, Ordering::AcqRel) {
            return false;
        }
        let t = self.trigger.lock().unwrap();
        t.as_ref().expect("INTx enabled").write(1).unwrap();
        self.fired.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// What the kernel does with an accepted unmask eventfd: unmask when it is signalled.
    fn poll_unmask_fd(&self) -> bool {
        let g = self.unmask_fd.lock().unwrap();
        let Some(fd) = g.as_ref() else { return false };
        if fd.read().is_ok() {
            self.masked.store(false, Ordering::Release);
            return true;
        }
        false
    }
}

impl VfioRegions for FakeMtty {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => 8,
            CONFIG_REGION => 256,
            _ => return None,
        };
        Some(RegionInfo {
            size,
            read: true,
            write: true,
            ..Default::default()
        })
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        match index {
            CONFIG_REGION => {
                let c = self.config.lock().unwrap();
                let o = offset as usize;
                data.copy_from_slice(&c[o..o + data.len()]);
            }
            _ => data.fill(0x60),
        }
        Ok(())
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        if index == CONFIG_REGION {
            let o = offset as usize;
            self.config.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        }
        Ok(())
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        (index == INTX_IRQ).then_some(IrqInfo {
            count: 1,
            eventfd: true,
            maskable: true,
            automasked: true,
        })
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        if index != INTX_IRQ || fds.len() != 1 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        *self.trigger.lock().unwrap() = Some(fds[0].try_clone()?);
        self.masked.store(false, Ordering::Release);
        Ok(())
    }
    fn disable_irq(&self, _index: u32) -> io::Result<()> {
        *self.trigger.lock().unwrap() = None;
        *self.unmask_fd.lock().unwrap() = None;
        Ok(())
    }
    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()> {
        if !self.accept_unmask_fd {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        *self.unmask_fd.lock().unwrap() = Some(fd.try_clone()?);
        Ok(())
    }
    fn unmask_intx(&self) -> io::Result<()> {
        self.unmasks.fetch_add(1, Ordering::Relaxed);
        self.masked.store(false, Ordering::Release);
        Ok(())
    }
    fn reset(&self) -> io::Result<()> {
        Ok(())
    }
    fn mmap_region(&self, _i: u32, _o: u64, _l: u64, _w: bool) -> io::Result<MmapArea> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// Signals a channel when the guest writes port 0x520 (it is ready for interrupts).
struct ReadyPort(mpsc::Sender<()>);
impl BusDevice for ReadyPort {
    fn read(&mut self, _b: u64, _o: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _b: u64, _o: u64, _data: &[u8]) {
        let _ = self.0.send(());
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

/// The IDT gate for VECTOR and the IDTR image the payload loads.
fn write_idt(vm: &Vm) {
    let handler = DEFAULT_LONG_GPA + HANDLER_OFFSET;
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    let m = vm.ram().memory();
    m.write_slice(&gate, GuestAddress(IDT_GPA + u64::from(VECTOR) * 16))
        .unwrap();
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT_GPA.to_le_bytes());
    m.write_slice(&idtr, GuestAddress(IDTR_GPA)).unwrap();
}

fn ecam_read32(vm: &Vm, slot: u8, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    vm.mmio_bus()
        .read(PCI_ECAM_START + (u64::from(slot) << 15) + reg, &mut b)
        .unwrap();
    u32::from_le_bytes(b)
}

/// Boots the payload for `interrupts` interrupts with the fake at SLOT; `drive` runs once the
/// guest waits for interrupts. Returns `None` (skipping) when this KVM cannot make an irqchip
/// VM.
fn run_intx(
    name: &str,
    fake: Arc<FakeMtty>,
    interrupts: u8,
    drive: impl FnOnce(&FakeMtty),
) -> Option<(PayloadVm, DeviceManager, PayloadOutcome)> {
    let mut pvm = match PayloadVm::new(MEM, IrqchipMode::InKernel) {
        Ok(p) => p,
        Err(e) => {
            println!("{name}: skipped: this KVM cannot create an in-kernel irqchip VM: {e:?}");
            return None;
        }
    };
    write_idt(pvm.vm());
    let (ready_tx, ready_rx) = mpsc::channel();
    pvm.vm()
        .add_pio_device(Arc::new(Mutex::new(ReadyPort(ready_tx))), 0x520, 1)
        .unwrap();
    let mut dm = DeviceManager::new(pvm.vm(), DeviceManagerConfig::default()).unwrap();
    let added = dm
        .add_unbacked_device(Some("mtty0"), "fake-mtty", fake.clone(), Some(SLOT))
        .unwrap();
    assert_eq!(added.bdf.to_string(), "0000:00:03.0");
    // The guest sees mtty's IDs and pin INTA; the line register is the guest's to write.
    assert_eq!(ecam_read32(pvm.vm(), SLOT, 0), MTTY_ID);
    assert_eq!(ecam_read32(pvm.vm(), SLOT, 0x3c) >> 8 & 0xff, 1, "INTA");
    let gsi = pci_intx_gsi(SLOT, 0);
    println!("{name}: slot {SLOT} INTA on GSI {gsi}");
    let code = payload(gsi, interrupts);
    let running = pvm
        .start(&code, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let stopper = running.stopper();
    let ready = ready_rx.recv_timeout(HANG_GUARD).is_ok();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if done_rx.recv_timeout(HANG_GUARD).is_err() {
            stopper.stop();
        }
    });
    if ready {
        drive(&fake);
    }
    let out = pvm.finish(running);
    let _ = done_tx.send(());
    guard.join().unwrap();
    println!("{name}: exit {:?}", out.exit);
    if let Some(Err(e)) = out.stop() {
        panic!("{name}: the payload failed before INTx could be checked: {e}");
    }
    assert!(
        ready,
        "{name}: the payload never reported ready: {:?}",
        out.exit
    );
    Some((pvm, dm, out))
}

fn count(pvm: &PayloadVm) -> u32 {
    pvm.vm()
        .ram()
        .memory()
        .read_obj(GuestAddress(u64::from(COUNT_GPA)))
        .unwrap()
}

#[test]
fn intx_reaches_the_guest_and_its_eoi_signals_the_resample_eventfd() {
    let name = "intx_reaches_the_guest_and_its_eoi_signals_the_resample_eventfd";
    if !kvm_available(name) {
        return;
    }
    let fake = FakeMtty::new(true);
    let Some((pvm, mut dm, out)) = run_intx(name, fake.clone(), 2, |f| {
        assert!(f.fire());
        // The guest's EOI signals the resample eventfd, which VFIO (here: the fake) took as
        // its unmask eventfd.
        eventually("the EOI signals the resample eventfd", || {
            f.poll_unmask_fd()
        });
        assert!(f.fire(), "the line was unmasked");
    }) else {
        return;
    };
    assert_eq!(
        out.guest_exit_code(),
        Some(0x42),
        "{name}: the handler did not see two interrupts (count {}): {:?}",
        count(&pvm),
        out.exit
    );
    assert_eq!(count(&pvm), 2);
    // The second EOI too; and the model never had to unmask by itself.
    eventually("the second EOI signals the resample eventfd", || {
        fake.poll_unmask_fd()
    });
    assert_eq!(fake.unmasks.load(Ordering::Relaxed), 0);
    assert_eq!(fake.fired.load(Ordering::Relaxed), 2);
    dm.remove_device("mtty0").unwrap();
    assert!(fake.trigger.lock().unwrap().is_none(), "INTx disabled");
}

#[test]
fn refused_unmask_eventfd_still_gives_one_interrupt_per_eoi() {
    let name = "refused_unmask_eventfd_still_gives_one_interrupt_per_eoi";
    if !kvm_available(name) {
        return;
    }
    // mtty's case: ENOTTY for the unmask eventfd. The model unmasks after each EOI; without
    // that the second fire would find the line masked and the guest would wait forever.
    let fake = FakeMtty::new(false);
    let Some((pvm, mut dm, out)) = run_intx(name, fake.clone(), 3, |f| {
        for n in 1..=3u64 {
            assert!(f.fire(), "interrupt {n}: the line is still masked");
            if n < 3 {
                eventually("the model unmasks after the EOI", || {
                    f.unmasks.load(Ordering::Relaxed) >= n
                });
            }
        }
    }) else {
        return;
    };
    assert_eq!(
        out.guest_exit_code(),
        Some(0x42),
        "{name}: the handler did not see three interrupts (count {}): {:?}",
        count(&pvm),
        out.exit
    );
    assert_eq!(count(&pvm), 3);
    assert!(fake.unmask_fd.lock().unwrap().is_none());
    eventually("the third EOI is followed by an unmask", || {
        fake.unmasks.load(Ordering::Relaxed) == 3
    });
    dm.remove_device("mtty0").unwrap();
}

#[test]
fn intx_irqfd_is_released_with_the_line() {
    let name = "intx_irqfd_is_released_with_the_line";
    if !kvm_available(name) {
        return;
    }
    let pvm = match PayloadVm::new(MEM, IrqchipMode::InKernel) {
        Ok(p) => p,
        Err(e) => {
            println!("{name}: skipped: this KVM cannot create an in-kernel irqchip VM: {e:?}");
            return;
        }
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
    let fake = FakeMtty::new(true);
    dm.add_unbacked_device(Some("mtty0"), "fake-mtty", fake.clone(), Some(SLOT))
        .unwrap();
    assert_eq!(ecam_read32(pvm.vm(), SLOT, 0x3c) >> 8 & 0xff, 0, "no pin");
    assert!(fake.trigger.lock().unwrap().is_none());
}
