//! What the KVM integration tests share: the skip helper, VMs with an in-kernel irqchip, the
//! "ready" port, IDT gates, the MSI payload and its checks, a runner for payloads that wait
//! for an interrupt, a fake VFIO device (edu-like with MSI, or mtty-like with INTx), and
//! IA32_PASID snippets ([`ia32_pasid`]).
//!
//! Each test binary uses part of this, hence `dead_code` is allowed here.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

pub mod ia32_pasid;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::BusDevice;
use devices::vfio::backend::{CONFIG_REGION, INTX_IRQ, MSI_IRQ};
use devices::vfio::{IrqInfo, MmapArea, RegionInfo, VfioRegions};
use vm_memory::{ByteValued, Bytes, GuestAddress};
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::layout::PCI_ECAM_START;
use vmm::runner::{PayloadOutcome, PayloadVm};
use vmm::vcpu::VcpuStop;
use vmm::vm::{IrqchipMode, Vm};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of the payload VMs.
pub const MEM: u64 = 16 << 20;
/// A guard against a guest that never stops: not a timing assertion, a hang breaker.
pub const HANG_GUARD: Duration = Duration::from_secs(20);

/// Reports that `test` skips, and why: prints `SKIP <test>: <reason>` (and to stderr, which
/// the harness shows even for a passing test only with --nocapture), and appends
/// `<test>\t<reason>` to the file `IOASID_TEST_SKIPS` names, if set. `scripts/test` sets it
/// and counts the skips in its summary (`N passed, N failed, N skipped`), so a skipped test
/// is not reported as passed.
pub fn skip(test: &str, reason: &str) {
    ioasid::test_skip::record(test, reason);
}

/// Whether /dev/kvm exists; reports the skip ([`skip`]) when it does not.
pub fn kvm_available(test: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        println!("{test}: running on /dev/kvm");
        true
    } else {
        skip(test, "no /dev/kvm");
        false
    }
}

/// A payload VM with the in-kernel irqchip, or `None` (printing why the test skips) when this
/// KVM cannot make one.
pub fn irqchip_vm(test: &str) -> Option<PayloadVm> {
    match PayloadVm::new(MEM, IrqchipMode::InKernel) {
        Ok(p) => Some(p),
        Err(e) => {
            skip(
                test,
                &format!("this KVM cannot create an in-kernel irqchip VM: {e:?}"),
            );
            None
        }
    }
}

/// Asserts that the payload stopped with `hlt`.
pub fn assert_halted(out: &PayloadOutcome) {
    assert!(
        matches!(out.stop(), Some(Ok(VcpuStop::Halted))),
        "{:?}",
        out.exit
    );
}

/// Reads a `T` from guest RAM at `gpa`.
pub fn read_guest<T: ByteValued>(pvm: &PayloadVm, gpa: u64) -> T {
    pvm.vm().ram().memory().read_obj(GuestAddress(gpa)).unwrap()
}

/// Reads dword `reg` of slot `slot`'s configuration space through ECAM, as the guest would.
pub fn ecam_read32(vm: &Vm, slot: u8, reg: u64) -> u32 {
    let mut b = [0u8; 4];
    vm.mmio_bus()
        .read(PCI_ECAM_START + (u64::from(slot) << 15) + reg, &mut b)
        .unwrap();
    u32::from_le_bytes(b)
}

/// The port a payload writes once its IDT and interrupt controllers are ready.
pub const READY_PORT: u16 = 0x520;

/// Signals a channel when the guest writes [`READY_PORT`] (it is ready for interrupts).
pub struct ReadyPort(mpsc::Sender<()>);

impl BusDevice for ReadyPort {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        let _ = self.0.send(());
    }
}

/// Puts a [`ReadyPort`] on `vm`'s PIO bus; the receiver hears of each guest write.
pub fn add_ready_port(vm: &Vm) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel();
    vm.add_pio_device(
        Arc::new(Mutex::new(ReadyPort(tx))),
        u64::from(READY_PORT),
        1,
    )
    .unwrap();
    rx
}

/// Where the payloads' `lidt` finds the IDTR image.
pub const IDTR_GPA: u64 = 0x3000;
/// Where the IDT is.
pub const IDT_GPA: u64 = 0x4000;

/// Writes a 64-bit interrupt gate for `vector` to `handler` (selector 0x10, the boot code64
/// segment) into the IDT at [`IDT_GPA`], and the IDTR image the payloads load from
/// [`IDTR_GPA`].
pub fn write_idt(vm: &Vm, vector: u8, handler: u64) {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x10u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    let m = vm.ram().memory();
    m.write_slice(&gate, GuestAddress(IDT_GPA + u64::from(vector) * 16))
        .unwrap();
    let mut idtr = [0u8; 10];
    idtr[0..2].copy_from_slice(&(256u16 * 16 - 1).to_le_bytes());
    idtr[2..10].copy_from_slice(&IDT_GPA.to_le_bytes());
    m.write_slice(&idtr, GuestAddress(IDTR_GPA)).unwrap();
}

/// Boots `code` in long mode on an in-kernel-irqchip VM whose IDT sends `vector` to the
/// handler at `handler_offset` into the payload, with a [`ReadyPort`]. `setup` runs before
/// the guest starts; `on_ready` gets what it returned once the guest reports it waits for
/// interrupts. The run is stopped if it hangs; a failed run or a guest that never reported
/// ready fails the test. Returns `None` (skipping, the reason printed) when there is no
/// /dev/kvm or this KVM cannot make an irqchip VM.
pub fn run_interrupt_payload<T>(
    name: &str,
    code: &[u8],
    vector: u8,
    handler_offset: u64,
    setup: impl FnOnce(&Vm) -> T,
    on_ready: impl FnOnce(&T),
) -> Option<(PayloadVm, PayloadOutcome, T)> {
    if !kvm_available(name) {
        return None;
    }
    let mut pvm = irqchip_vm(name)?;
    write_idt(pvm.vm(), vector, DEFAULT_LONG_GPA + handler_offset);
    let ready_rx = add_ready_port(pvm.vm());
    let state = setup(pvm.vm());
    let running = pvm
        .start(code, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let ready = ready_rx.recv_timeout(HANG_GUARD).is_ok();
    if ready {
        on_ready(&state);
    }
    let out = pvm.finish_within(running, HANG_GUARD);
    println!("{name}: exit {:?}", out.exit);
    if let Some(Err(e)) = out.stop() {
        panic!("{name}: the payload failed before its interrupt could be checked: {e}");
    }
    assert!(
        ready,
        "{name}: the payload never reported ready: {:?}",
        out.exit
    );
    Some((pvm, out, state))
}

/// The vector [`MSI_PAYLOAD`] handles.
pub const MSI_VECTOR: u8 = 0x40;
/// Where [`MSI_PAYLOAD`]'s handler starts.
pub const MSI_HANDLER_OFFSET: u64 = 0x40;
/// Where [`MSI_PAYLOAD`]'s handler writes its marker.
pub const MSI_MARKER_GPA: u64 = 0x8000;

/// Long mode: load the IDT, enable the LAPIC, sti, report ready on port 0x520, hlt. The
/// handler for vector 0x40 (at 0x40) writes 0xc0ffee to 0x8000, EOIs and exits with 0x42 on
/// port 0x501.
///
/// lidt [0x3000]; mov rbx,0xfee000f0; mov dword [rbx],0x1ff (LAPIC SVR: enable)
/// mov rbx,0xfee00080; mov dword [rbx],0 (TPR 0); sti
/// mov dx,0x520; mov al,1; out dx,al (ready); 2: hlt; jmp 2b
/// .balign 16 (to 0x40) handler: mov dword [0x8000],0xc0ffee
/// mov rbx,0xfee000b0; mov dword [rbx],0 (EOI); mov dx,0x501; mov al,0x42; out dx,al
/// 3: hlt; jmp 3b
pub const MSI_PAYLOAD: [u8; 101] = [
    0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0x48, 0xbb, 0xf0, 0x00, 0xe0, 0xfe, 0x00, 0x00,
    0x00, 0x00, 0xc7, 0x03, 0xff, 0x01, 0x00, 0x00, 0x48, 0xbb, 0x80, 0x00, 0xe0, 0xfe, 0x00, 0x00,
    0x00, 0x00, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0xfb, 0x66, 0xba, 0x20, 0x05, 0xb0, 0x01, 0xee,
    0xf4, 0xeb, 0xfd, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x90,
    0xc7, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0xee, 0xff, 0xc0, 0x00, 0x48, 0xbb, 0xb0, 0x00, 0xe0,
    0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xb0,
    0x42, 0xee, 0xf4, 0xeb, 0xfd,
];

/// Runs [`MSI_PAYLOAD`] through [`run_interrupt_payload`].
pub fn run_msi_payload<T>(
    name: &str,
    setup: impl FnOnce(&Vm) -> T,
    on_ready: impl FnOnce(&T),
) -> Option<(PayloadVm, PayloadOutcome, T)> {
    run_interrupt_payload(
        name,
        &MSI_PAYLOAD,
        MSI_VECTOR,
        MSI_HANDLER_OFFSET,
        setup,
        on_ready,
    )
}

/// Asserts that [`MSI_PAYLOAD`]'s handler ran: the exit code and the marker it wrote.
pub fn assert_msi_handler_ran(name: &str, pvm: &PayloadVm, out: &PayloadOutcome) {
    let marker: u32 = read_guest(pvm, MSI_MARKER_GPA);
    assert_eq!(
        out.guest_exit_code(),
        Some(0x42),
        "{name}: the MSI handler did not run (marker {marker:#x}): {:?}",
        out.exit
    );
    assert_eq!(marker, 0xc0ffee);
}

/// edu's vendor/device dword (1234:11e8).
pub const EDU_ID: u32 = 0x11e8_1234;
/// mtty's vendor/device dword (4348:3253).
pub const MTTY_ID: u32 = 0x3253_4348;
/// What the edu-like fake's BAR0 mapping holds at offset 0.
pub const BAR0_PATTERN: u64 = 0x1122_3344_5566_7788;
/// The edu-like fake's MSI capability.
pub const MSI_CAP: usize = 0x40;

/// The fake's interrupts.
#[derive(Clone, Copy, Debug)]
pub enum FakeIrq {
    /// One MSI vector; every enable is taken and its eventfds kept to fire them.
    Msi,
    /// INTx that VFIO masks after each trigger until unmasked (by the unmask eventfd, when
    /// the device accepts one, or by an unmask call).
    Intx {
        /// Whether the device takes an unmask eventfd (mtty refuses it with ENOTTY).
        accept_unmask_fd: bool,
    },
}

/// A fake VFIO device for devices added without an IOMMU backend. The eventfds the model
/// enables are kept so the test can fire them.
pub struct FakeVfio {
    config: Mutex<[u8; 256]>,
    irq: FakeIrq,
    bar0_size: u64,
    bar0_mmap: bool,
    /// What non-mmapped reads of BAR0 return.
    bar0_fill: u8,
    /// MSI vectors, or the INTx trigger.
    irq_fds: Mutex<Vec<EventFd>>,
    unmask_fd: Mutex<Option<EventFd>>,
    masked: AtomicBool,
    unmasks: AtomicU64,
    fired: AtomicU64,
}

impl FakeVfio {
    fn with(config: [u8; 256], irq: FakeIrq, bar0_size: u64, bar0_mmap: bool, fill: u8) -> Self {
        Self {
            config: Mutex::new(config),
            irq,
            bar0_size,
            bar0_mmap,
            bar0_fill: fill,
            irq_fds: Mutex::new(Vec::new()),
            unmask_fd: Mutex::new(None),
            masked: AtomicBool::new(false),
            unmasks: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        }
    }

    /// edu's IDs, a 4 KiB mmap-able BAR0 holding [`BAR0_PATTERN`], and a 64-bit MSI
    /// capability with one vector.
    pub fn edu_msi() -> Arc<Self> {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&EDU_ID.to_le_bytes());
        c[6] = 0x10; // status: capability list
        c[0x0a] = 0xff; // class 00ff00
        c[0x34] = MSI_CAP as u8;
        c[MSI_CAP] = 0x05; // MSI, last capability
        c[MSI_CAP + 2] = 0x80; // 64-bit address, one vector
        Arc::new(Self::with(c, FakeIrq::Msi, 0x1000, true, 0xee))
    }

    /// mtty-like: 4348:3253, pin INTA, one 8-byte I/O BAR, an automasked INTx line;
    /// `accept_unmask_fd` says whether it takes an unmask eventfd.
    pub fn mtty_intx(accept_unmask_fd: bool) -> Arc<Self> {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&MTTY_ID.to_le_bytes());
        c[0x09..0x0c].copy_from_slice(&[0x02, 0x00, 0x07]);
        c[0x10] = 0x01; // I/O BAR0
        c[0x3d] = 0x01; // INTA
        let irq = FakeIrq::Intx { accept_unmask_fd };
        Arc::new(Self::with(c, irq, 8, false, 0x60))
    }

    /// Signals the first MSI vector's eventfd.
    pub fn fire_msi(&self) {
        self.irq_fds.lock().unwrap()[0].write(1).unwrap();
    }

    /// The device raises INTx: signals the trigger eventfd unless the line is masked, then
    /// masks it (VFIO's automask). Returns whether it signalled.
    pub fn fire_intx(&self) -> bool {
        if self.masked.swap(true, Ordering::AcqRel) {
            return false;
        }
        let fds = self.irq_fds.lock().unwrap();
        fds.first().expect("INTx enabled").write(1).unwrap();
        self.fired.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// What the kernel does with an accepted unmask eventfd: unmask when it is signalled.
    pub fn poll_unmask_fd(&self) -> bool {
        let g = self.unmask_fd.lock().unwrap();
        let Some(fd) = g.as_ref() else { return false };
        if fd.read().is_ok() {
            self.masked.store(false, Ordering::Release);
            return true;
        }
        false
    }

    /// Whether interrupts are enabled (the model holds eventfds of ours).
    pub fn irq_enabled(&self) -> bool {
        !self.irq_fds.lock().unwrap().is_empty()
    }

    /// Whether the device holds an unmask eventfd.
    pub fn has_unmask_fd(&self) -> bool {
        self.unmask_fd.lock().unwrap().is_some()
    }

    /// How often the model unmasked INTx by a call.
    pub fn unmasks(&self) -> u64 {
        self.unmasks.load(Ordering::Relaxed)
    }

    /// How many INTx the device signalled.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::Relaxed)
    }
}

impl VfioRegions for FakeVfio {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let (size, mmap) = match index {
            0 => (self.bar0_size, self.bar0_mmap),
            CONFIG_REGION => (256, false),
            _ => return None,
        };
        Some(RegionInfo {
            size,
            read: true,
            write: true,
            mmap,
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
            _ => data.fill(self.bar0_fill),
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
        match self.irq {
            FakeIrq::Msi => (index == MSI_IRQ).then_some(IrqInfo {
                count: 1,
                eventfd: true,
                maskable: false,
                automasked: false,
            }),
            FakeIrq::Intx { .. } => (index == INTX_IRQ).then_some(IrqInfo {
                count: 1,
                eventfd: true,
                maskable: true,
                automasked: true,
            }),
        }
    }
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        if matches!(self.irq, FakeIrq::Intx { .. }) && (index != INTX_IRQ || fds.len() != 1) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut v = self.irq_fds.lock().unwrap();
        v.clear();
        for f in fds {
            v.push(f.try_clone()?);
        }
        self.masked.store(false, Ordering::Release);
        Ok(())
    }
    fn disable_irq(&self, _index: u32) -> io::Result<()> {
        self.irq_fds.lock().unwrap().clear();
        *self.unmask_fd.lock().unwrap() = None;
        Ok(())
    }
    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()> {
        match self.irq {
            FakeIrq::Msi => Ok(()),
            FakeIrq::Intx {
                accept_unmask_fd: false,
            } => Err(io::Error::from_raw_os_error(libc::ENOTTY)),
            FakeIrq::Intx {
                accept_unmask_fd: true,
            } => {
                *self.unmask_fd.lock().unwrap() = Some(fd.try_clone()?);
                Ok(())
            }
        }
    }
    fn unmask_intx(&self) -> io::Result<()> {
        if let FakeIrq::Msi = self.irq {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the MSI fake has no INTx",
            ));
        }
        self.unmasks.fetch_add(1, Ordering::Relaxed);
        self.masked.store(false, Ordering::Release);
        Ok(())
    }
    fn mmap_region(&self, _index: u32, offset: u64, len: u64, _w: bool) -> io::Result<MmapArea> {
        if !self.bar0_mmap {
            return Err(io::Error::from(io::ErrorKind::Unsupported));
        }
        let area = MmapArea::anonymous(len)?;
        if offset == 0 {
            area.write(0, &BAR0_PATTERN.to_le_bytes());
        }
        Ok(area)
    }
}
