//! The KVM VM: creation, the irqchip, guest RAM registration, the buses, vCPU threads and
//! stopping them.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::bus::{Bus, BusDevice, BusError};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use thiserror::Error;

use crate::boot::BootEntry;
use crate::config::OnOffAuto;
use crate::enqcmd::cpu::{check_policy, host_cpu_side};
use crate::enqcmd::{install_msr_filter, Ia32Pasid, MsrFilterError};
use crate::irq::{GsiRouter, IrqError};
use crate::kvm_caps::has_cap;
use crate::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::memory::{GuestRam, MemoryError, RamConfig, RamRegion};
use crate::vcpu::{
    install_kick_handler, Buses, Vcpu, VcpuConfig, VcpuError, VcpuKicker, VcpuReport, VcpuStop,
};

/// Whether the VM gets KVM's in-kernel irqchip (PIC, IOAPIC, LAPICs, PIT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqchipMode {
    /// In-kernel irqchip: required for Linux, MSI routes and irqfds. With it, HLT is handled
    /// inside KVM and never reaches the run loop.
    InKernel,
    /// No irqchip: one vCPU, no interrupts; HLT exits to the VMM (payload tests).
    Off,
}

/// VM creation options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmOptions {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM.
    pub ram: RamConfig,
    /// Irqchip choice.
    pub irqchip: IrqchipMode,
}

/// Errors of VM creation and running.
#[derive(Debug, Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("Cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A capability the VMM depends on is missing.
    #[error("KVM lacks {cap}, which {why}")]
    MissingCap {
        /// The capability.
        cap: &'static str,
        /// What needs it.
        why: &'static str,
    },
    /// A VM-level setup ioctl failed.
    #[error("{what} failed")]
    Setup {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The in-kernel irqchip could not be created.
    #[error(
        "KVM could not create the in-kernel irqchip (KVM_CREATE_IRQCHIP); Linux guests, MSI \
         routes and irqfds need it"
    )]
    Irqchip(#[source] kvm_ioctls::Error),
    /// Invalid vCPU count.
    #[error("Invalid vCPU count {count}: {reason}")]
    VcpuCount {
        /// The count.
        count: u8,
        /// Why.
        reason: &'static str,
    },
    /// Guest RAM setup failed.
    #[error("Guest memory setup failed")]
    Memory(#[from] MemoryError),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("Cannot register RAM slot {slot} (GPA {gpa:#x}, {size:#x} bytes) with KVM")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// vCPU setup failed.
    #[error("vCPU setup failed")]
    Vcpu(#[from] VcpuError),
    /// Interrupt routing failed.
    #[error("Interrupt setup failed")]
    Irq(#[from] IrqError),
    /// A bus registration failed.
    #[error("Cannot register a device on the {bus} bus")]
    Bus {
        /// "mmio" or "pio".
        bus: &'static str,
        /// The bus error.
        #[source]
        source: BusError,
    },
    /// The VM was already started.
    #[error("The VM's vCPUs were already started")]
    AlreadyStarted,
}

/// Why the VMM (not the guest) stopped the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// [`VmStopper::stop`] was called (API, test, signal).
    Requested,
    /// The guest wrote `code` to the debug-exit port.
    GuestExit(u32),
    /// The guest entered ACPI S5 (power off).
    GuestPowerOff,
    /// The guest wrote the ACPI reset register.
    GuestReset,
}

/// Stops every vCPU of a VM; shareable with devices and other threads.
#[derive(Debug)]
pub struct VmStopper {
    kickers: Vec<Arc<VcpuKicker>>,
    reason: Mutex<Option<StopReason>>,
}

impl VmStopper {
    /// Records `reason` (the first one wins) and kicks every vCPU.
    pub fn stop_with(&self, reason: StopReason) {
        {
            let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                *r = Some(reason);
            }
        }
        for k in &self.kickers {
            k.kick();
        }
    }

    /// Stops the VM ([`StopReason::Requested`]).
    pub fn stop(&self) {
        self.stop_with(StopReason::Requested);
    }

    /// Parks every vCPU outside `KVM_RUN` and waits until they are (or `timeout` passes;
    /// false then). vCPUs that ended are not waited for.
    pub fn pause(&self, timeout: std::time::Duration) -> bool {
        for k in &self.kickers {
            k.pause();
        }
        let deadline = std::time::Instant::now() + timeout;
        self.kickers.iter().all(|k| k.wait_parked(deadline))
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        for k in &self.kickers {
            k.resume();
        }
    }

    /// The recorded stop reason, if any.
    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick_all(&self) {
        for k in &self.kickers {
            k.kick();
        }
    }
}

/// A QEMU-style `isa-debug-exit` port: a guest write of `v` stops the VM with
/// [`StopReason::GuestExit`]`(v)`. Payloads running with an in-kernel irqchip (where HLT
/// does not exit) end this way.
#[derive(Debug)]
pub struct DebugExit {
    stopper: Arc<VmStopper>,
}

/// Default port of [`DebugExit`].
pub const DEBUG_EXIT_PORT: u64 = 0x501;

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        self.stopper
            .stop_with(StopReason::GuestExit(u32::from_le_bytes(b)));
    }
}

/// How a VM run ended.
#[derive(Debug)]
pub struct VmExit {
    /// The VMM-side stop reason, when the VMM stopped it.
    pub requested: Option<StopReason>,
    /// The index in `reports` of the vCPU that ended first.
    pub first: usize,
    /// Every vCPU's report.
    pub reports: Vec<VcpuReport>,
}

impl VmExit {
    /// The report of the vCPU that ended first.
    pub fn first_report(&self) -> Option<&VcpuReport> {
        self.reports.get(self.first)
    }

    /// The first vCPU's stop, or its error.
    pub fn first_result(&self) -> Option<&Result<VcpuStop, VcpuError>> {
        self.first_report().map(|r| &r.result)
    }
}

/// Running vCPU threads. Dropping it stops and joins them.
#[derive(Debug)]
pub struct RunningVm {
    stopper: Arc<VmStopper>,
    handles: Vec<JoinHandle<()>>,
    rx: mpsc::Receiver<VcpuReport>,
    count: usize,
}

impl RunningVm {
    /// A handle that stops the VM from any thread.
    pub fn stopper(&self) -> Arc<VmStopper> {
        self.stopper.clone()
    }

    /// Stops every vCPU.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Waits for the first vCPU to end, stops the others, and returns every report.
    pub fn wait(mut self) -> VmExit {
        let mut reports = Vec::new();
        if let Ok(r) = self.rx.recv() {
            reports.push(r);
        }
        self.stopper.kick_all();
        while reports.len() < self.count {
            match self.rx.recv() {
                Ok(r) => reports.push(r),
                Err(_) => break,
            }
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
        VmExit {
            requested: self.stopper.reason(),
            first: 0,
            reports,
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stopper.kick_all();
            for h in self.handles.drain(..) {
                let _ = h.join();
            }
        }
    }
}

/// KVM user memory slot numbers: RAM takes the first ones when the VM is created; the rest
/// are handed out (and taken back) for device memory such as directly mapped BAR windows.
#[derive(Debug)]
pub struct MemorySlots {
    state: Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    next: u32,
    limit: u32,
    free: Vec<u32>,
    in_use: usize,
}

impl MemorySlots {
    /// Slots `first..limit` are free (`limit` is KVM_CAP_NR_MEMSLOTS).
    pub fn new(first: u32, limit: u32) -> Self {
        Self {
            state: Mutex::new(SlotState {
                next: first,
                limit,
                free: Vec::new(),
                in_use: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot number, or `None` when all `limit` slots are taken.
    pub fn allocate(&self) -> Option<u32> {
        let mut s = self.lock();
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None if s.next < s.limit => {
                s.next += 1;
                s.next - 1
            }
            None => return None,
        };
        s.in_use += 1;
        Some(slot)
    }

    /// Gives `slot` back (after KVM removed it with a zero-sized region).
    pub fn free(&self, slot: u32) {
        let mut s = self.lock();
        if slot < s.next && !s.free.contains(&slot) {
            s.free.push(slot);
            s.in_use = s.in_use.saturating_sub(1);
        }
    }

    /// Slots handed out and not freed.
    pub fn in_use(&self) -> usize {
        self.lock().in_use
    }
}

/// A KVM VM with its RAM, buses, interrupt routing and vCPUs.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    buses: Buses,
    router: Option<Arc<GsiRouter>>,
    vcpus: Vec<Vcpu>,
    stopper: Arc<VmStopper>,
    irqchip: IrqchipMode,
    slots: Arc<MemorySlots>,
    /// The vCPUs' IA32_PASID, or why KVM cannot send its accesses to user space.
    ia32_pasid: Result<Arc<Ia32Pasid>, MsrFilterError>,
}

fn setup<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Setup { what, source })
}

/// Registers `device` at `[base, base + len)` on `bus` (named `name` in errors).
fn insert_on(
    bus: &Bus,
    name: &'static str,
    device: Arc<Mutex<dyn BusDevice>>,
    base: u64,
    len: u64,
) -> Result<(), VmError> {
    bus.insert(device, base, len)
        .map_err(|source| VmError::Bus { bus: name, source })
}

impl Vm {
    /// Creates the VM: RAM, irqchip (and PIT), memory slots, vCPUs with CPUID/MSRs/LAPIC.
    pub fn new(opts: VmOptions) -> Result<Self, VmError> {
        if opts.vcpus == 0 {
            return Err(VmError::VcpuCount {
                count: 0,
                reason: "at least one vCPU is needed",
            });
        }
        if opts.vcpus > 1 && opts.irqchip == IrqchipMode::Off {
            return Err(VmError::VcpuCount {
                count: opts.vcpus,
                reason: "more than one vCPU needs the in-kernel irqchip (INIT/SIPI)",
            });
        }
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name, why) in [
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY", "guest RAM needs"),
            (
                Cap::ImmediateExit,
                "KVM_CAP_IMMEDIATE_EXIT",
                "stopping vCPUs reliably needs",
            ),
        ] {
            if !has_cap(&kvm, cap) {
                return Err(VmError::MissingCap { cap: name, why });
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(opts.vcpus) > max {
            return Err(VmError::VcpuCount {
                count: opts.vcpus,
                reason: "more than KVM_CAP_MAX_VCPUS",
            });
        }
        let fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        // IA32_PASID is virtualized when this KVM can filter MSRs; otherwise the VM runs as
        // before and whatever needs IA32_PASID says why it cannot ([`Vm::ia32_pasid`]).
        let ia32_pasid = match install_msr_filter(&kvm, &fd) {
            Ok(()) => Ok(Arc::new(Ia32Pasid::new(opts.vcpus))),
            Err(e) => {
                log::info!("{e}");
                Err(e)
            }
        };
        setup(
            "KVM_SET_IDENTITY_MAP_ADDR",
            fd.set_identity_map_address(KVM_IDENTITY_MAP_START),
        )?;
        setup(
            "KVM_SET_TSS_ADDR",
            fd.set_tss_address(KVM_TSS_START as usize),
        )?;
        let router = match opts.irqchip {
            IrqchipMode::InKernel => {
                for (cap, name) in [
                    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
                    (Cap::Irqfd, "KVM_CAP_IRQFD"),
                    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
                ] {
                    if !has_cap(&kvm, cap) {
                        return Err(VmError::MissingCap {
                            cap: name,
                            why: "the in-kernel irqchip mode needs",
                        });
                    }
                }
                fd.create_irq_chip().map_err(VmError::Irqchip)?;
                let pit = kvm_pit_config {
                    flags: KVM_PIT_SPEAKER_DUMMY,
                    ..Default::default()
                };
                if let Err(e) = fd.create_pit2(pit) {
                    log::warn!(
                        "KVM_CREATE_PIT2 failed ({e}); continuing without the i8254 PIT \
                         (Linux falls back to other clock sources)"
                    );
                }
                Some(Arc::new(GsiRouter::new(fd.clone())))
            }
            IrqchipMode::Off => None,
        };
        let ram = GuestRam::new(opts.ram)?;
        for (slot, r) in ram.regions().iter().enumerate() {
            let slot = slot as u32;
            let region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: r.gpa,
                memory_size: r.size,
                userspace_addr: r.host_addr,
            };
            // SAFETY: the region describes a live mapping owned by `ram`, which this Vm keeps
            // for as long as the VM fd can run vCPUs through it (RunningVm documents that the
            // Vm must outlive it; a dropped mapping only makes KVM_RUN fail with EFAULT).
            unsafe { fd.set_user_memory_region(region) }.map_err(|source| VmError::MemorySlot {
                slot,
                gpa: r.gpa,
                size: r.size,
                source,
            })?;
        }
        let supported_cpuid = setup(
            "KVM_GET_SUPPORTED_CPUID",
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES),
        )?;
        let msr_index_list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let vcfg = VcpuConfig {
            supported_cpuid,
            vcpu_count: opts.vcpus,
            has_lapic: router.is_some(),
            tsc_deadline: has_cap(&kvm, Cap::TscDeadlineTimer),
            msr_index_list,
            // `auto`: shown only when the host's CPU side translates guest PASIDs (upstream
            // KVM does not); `--cpus enqcmd=on` was refused before the VM was made.
            enqcmd: check_policy(OnOffAuto::Auto, host_cpu_side()).unwrap_or(false),
        };
        let ram_slots = ram.regions().len() as u32;
        let slot_limit = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
        let slots = Arc::new(MemorySlots::new(ram_slots, slot_limit.max(ram_slots)));
        let mut vcpus = Vec::new();
        let mut kickers = Vec::new();
        for id in 0..opts.vcpus {
            let mut v = Vcpu::new(&fd, id)?;
            v.configure(&vcfg)?;
            if let Ok(s) = &ia32_pasid {
                v.set_ia32_pasid(s.clone());
            }
            vcpus.push(v);
            kickers.push(Arc::new(VcpuKicker::new()));
        }
        Ok(Self {
            kvm,
            fd,
            ram,
            buses: Buses {
                mmio: Arc::new(Bus::new()),
                pio: Arc::new(Bus::new()),
            },
            router,
            vcpus,
            stopper: Arc::new(VmStopper {
                kickers,
                reason: Mutex::new(None),
            }),
            irqchip: opts.irqchip,
            slots,
            ia32_pasid,
        })
    }

    /// The vCPUs' IA32_PASID (MSR 0xD93) values and the VM's guest PASID width, or why this
    /// KVM cannot virtualize IA32_PASID (no user-space MSR exits or no MSR filter). A device
    /// that needs the submitting vCPU's PASID (a shared-work-queue portal) fails with this
    /// error; nothing else needs it.
    pub fn ia32_pasid(&self) -> Result<&Arc<Ia32Pasid>, MsrFilterError> {
        self.ia32_pasid.as_ref().map_err(Clone::clone)
    }

    /// Sets the VM's guest PASID width, what a guest IA32_PASID write is checked against:
    /// the vIOMMU's `pasid-bits` (0 without a vIOMMU or without PASIDs). Default: 20.
    pub fn set_guest_pasid_bits(&self, bits: u8) {
        if let Ok(s) = &self.ia32_pasid {
            s.set_pasid_bits(bits);
        }
    }

    /// The allocator of KVM memory slot numbers above the RAM slots (device memory).
    pub fn memory_slots(&self) -> &Arc<MemorySlots> {
        &self.slots
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The KVM VM fd (for the KVM-VFIO device, ioeventfds, and similar).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest RAM regions: memfd, file offset, GPA, size and host address of each.
    pub fn ram_regions(&self) -> &[RamRegion] {
        self.ram.regions()
    }

    /// The MMIO bus.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.buses.mmio
    }

    /// The port I/O bus.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.buses.pio
    }

    /// Registers `device` at `[base, base + len)` on the MMIO bus.
    pub fn add_mmio_device(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), VmError> {
        insert_on(&self.buses.mmio, "mmio", device, base, len)
    }

    /// Registers `device` at `[base, base + len)` on the port I/O bus.
    pub fn add_pio_device(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), VmError> {
        insert_on(&self.buses.pio, "pio", device, base, len)
    }

    /// The irqchip mode.
    pub fn irqchip(&self) -> IrqchipMode {
        self.irqchip
    }

    /// The GSI router (MSI routes, irqfds). Fails without an in-kernel irqchip.
    pub fn gsi_router(&self) -> Result<&Arc<GsiRouter>, IrqError> {
        self.router.as_ref().ok_or(IrqError::NoIrqchip)
    }

    /// The stop handle of this VM.
    pub fn stopper(&self) -> &Arc<VmStopper> {
        &self.stopper
    }

    /// Registers a [`DebugExit`] port at `port` (normally [`DEBUG_EXIT_PORT`]).
    pub fn add_debug_exit(&self, port: u64) -> Result<(), VmError> {
        let dev = Arc::new(Mutex::new(DebugExit {
            stopper: self.stopper.clone(),
        }));
        self.add_pio_device(dev, port, 1)
    }

    /// The vCPUs not yet started (tests inspect registers through them).
    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    /// Sets the boot vCPU's entry state and starts one thread per vCPU.
    ///
    /// The returned [`RunningVm`] must not outlive this `Vm` for the guest to keep its RAM.
    pub fn start(&mut self, entry: &BootEntry) -> Result<RunningVm, VmError> {
        if self.vcpus.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
        if let Some(bsp) = self.vcpus.first() {
            bsp.set_entry(entry)?;
        }
        let (tx, rx) = mpsc::channel();
        let count = self.vcpus.len();
        // Built up front so that, if a spawn fails, dropping it stops the threads started.
        let mut running = RunningVm {
            stopper: self.stopper.clone(),
            handles: Vec::new(),
            rx,
            count,
        };
        for (mut vcpu, kicker) in self.vcpus.drain(..).zip(self.stopper.kickers.iter()) {
            let kicker = kicker.clone();
            let buses = self.buses.clone();
            let tx = tx.clone();
            let id = vcpu.id();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let report = vcpu.run(&buses, &kicker);
                    let _ = tx.send(report);
                })
                .map_err(|source| VcpuError::Spawn { id, source })?;
            running.handles.push(h);
        }
        Ok(running)
    }
}
