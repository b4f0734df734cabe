//! vCPUs: per-vCPU setup (CPUID, MSRs, LAPIC, FPU, entry registers) and the run loop that
//! dispatches MMIO and port I/O exits to the buses.
//!
//! Stopping: [`VcpuKicker::kick`] sets a stop flag and sends [`kick_signal`] to the vCPU
//! thread. The signal handler sets `kvm_run.immediate_exit` for that thread's vCPU, so a kick
//! that lands just before `KVM_RUN` is not lost: the ioctl returns `EINTR` at once.
//!
//! Pausing: [`VcpuKicker::pause`] sets a pause request and sends the same signal; the run loop
//! parks the thread outside `KVM_RUN` until [`VcpuKicker::resume`] (or a stop).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::Instant;

use devices::bus::Bus;
use kvm_bindings::{
    kvm_msr_entry, kvm_run, CpuId, Msrs, KVM_INTERNAL_ERROR_DELIVERY_EV,
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_SIMUL_EX,
    KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use thiserror::Error;

use crate::boot::regs;
use crate::boot::{BootEntry, EntryMode};
use crate::cpuid::{apply_policy, CpuidParams};
use crate::enqcmd::Ia32Pasid;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// LAPIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors of vCPU setup and execution.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("Cannot create vCPU {id}")]
    Create {
        /// vCPU index.
        id: u8,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A setup ioctl failed.
    #[error("vCPU {id}: {what} failed")]
    Setup {
        /// vCPU index.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_RUN` returned an error.
    #[error("vCPU {id}: KVM_RUN failed")]
    Run {
        /// vCPU index.
        id: u8,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM reported an internal error.
    #[error("vCPU {id}: KVM internal error, suberror {suberror} ({name}) at RIP {rip:#x}, data {data:x?}")]
    InternalError {
        /// vCPU index.
        id: u8,
        /// The suberror code.
        suberror: u32,
        /// Its name.
        name: &'static str,
        /// Guest RIP (or `u64::MAX` if unreadable).
        rip: u64,
        /// The `ndata` words KVM supplied.
        data: Vec<u64>,
    },
    /// VM entry failed.
    #[error("vCPU {id}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}")]
    FailEntry {
        /// vCPU index.
        id: u8,
        /// Hardware entry failure reason.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {id}: unhandled exit {exit}")]
    UnhandledExit {
        /// vCPU index.
        id: u8,
        /// Exit description.
        exit: String,
    },
    /// The kick signal handler could not be installed.
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be spawned.
    #[error("Cannot spawn the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// The name of a `KVM_EXIT_INTERNAL_ERROR` suberror.
pub fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        KVM_INTERNAL_ERROR_DELIVERY_EV => "cannot deliver an event (e.g. stack fault)",
        KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected hardware exit reason",
        _ => "unknown suberror",
    }
}

/// Why a vCPU stopped running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest executed HLT (only seen without an in-kernel LAPIC).
    Halted,
    /// Triple fault.
    Shutdown,
    /// `KVM_SYSTEM_EVENT_SHUTDOWN`.
    PowerOff,
    /// `KVM_SYSTEM_EVENT_RESET`.
    Reset,
    /// `KVM_SYSTEM_EVENT_CRASH`.
    Crash,
    /// Another system event.
    SystemEvent(u32),
    /// Stopped by [`VcpuKicker::kick`].
    Kicked,
}

/// Exit counters of one vCPU run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// Accesses no bus device claimed.
    pub unclaimed: u64,
    /// `EINTR` returns of `KVM_RUN`.
    pub interrupted: u64,
    /// RDMSR exits (IA32_PASID, through the MSR filter).
    pub msr_read: u64,
    /// WRMSR exits (IA32_PASID, through the MSR filter).
    pub msr_write: u64,
}

/// The outcome of a vCPU thread.
#[derive(Debug)]
pub struct VcpuReport {
    /// vCPU index.
    pub id: u8,
    /// How it stopped, or the error that stopped it.
    pub result: Result<VcpuStop, VcpuError>,
    /// Exit counters.
    pub exits: ExitCounts,
}

/// The buses a vCPU dispatches to.
#[derive(Clone, Debug)]
pub struct Buses {
    /// MMIO bus (guest physical addresses).
    pub mmio: Arc<Bus>,
    /// Port I/O bus.
    pub pio: Arc<Bus>,
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set only by the vCPU thread itself while its VcpuFd (and so
        // the kvm_run mapping) is alive, and cleared before the VcpuFd is dropped; this
        // handler runs on that same thread. A volatile byte store is what KVM's ABI expects.
        unsafe {
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1);
        }
    }
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static RESULT: Mutex<Option<i32>> = Mutex::new(None);
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            if let Ok(mut r) = RESULT.lock() {
                *r = Some(e.errno());
            }
        }
    });
    match RESULT.lock().ok().and_then(|r| *r) {
        Some(errno) => Err(VcpuError::Signal(vmm_sys_util::errno::Error::new(errno))),
        None => Ok(()),
    }
}

/// Stops, pauses and resumes one vCPU thread.
#[derive(Debug, Default)]
pub struct VcpuKicker {
    stop: AtomicBool,
    thread: Mutex<Option<libc::pthread_t>>,
    pause: Mutex<PauseState>,
    pause_cv: Condvar,
}

/// The pause handshake of one vCPU.
#[derive(Debug, Default)]
struct PauseState {
    /// A pause is requested.
    requested: bool,
    /// The thread is parked (outside `KVM_RUN`).
    parked: bool,
}

impl VcpuKicker {
    /// A kicker for a vCPU not yet running.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the vCPU to stop and interrupts `KVM_RUN` if it is inside it.
    pub fn kick(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // A parked thread wakes up to see the stop.
        drop(self.pause_state());
        self.pause_cv.notify_all();
        self.signal();
    }

    fn pause_state(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks the vCPU to park outside `KVM_RUN` (interrupting it if it is inside); see
    /// [`Self::wait_parked`].
    pub fn pause(&self) {
        self.pause_state().requested = true;
        self.signal();
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.pause_state().requested = false;
        self.pause_cv.notify_all();
    }

    /// Waits until the vCPU is parked, or is not running at all, or `deadline` passes;
    /// true unless the deadline passed.
    pub fn wait_parked(&self, deadline: Instant) -> bool {
        let mut st = self.pause_state();
        loop {
            let running = self.thread.lock().map(|t| t.is_some()).unwrap_or(false);
            if st.parked || !running || self.stop_requested() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = match self.pause_cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Called by the vCPU thread outside `KVM_RUN`: parks while a pause is requested.
    fn park_if_paused(&self) {
        let mut st = self.pause_state();
        if !st.requested {
            return;
        }
        st.parked = true;
        self.pause_cv.notify_all();
        while st.requested && !self.stop_requested() {
            st = match self.pause_cv.wait(st) {
                Ok(g) => g,
                Err(e) => e.into_inner(),
            };
        }
        st.parked = false;
    }

    fn signal(&self) {
        let t = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tid) = *t {
            // SAFETY: `tid` is registered by the vCPU thread and removed (under this lock)
            // before the thread exits, so it names a live thread. The signal has a handler.
            unsafe {
                libc::pthread_kill(tid, kick_signal());
            }
        }
    }

    /// Whether a stop was requested.
    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn attach_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(me);
    }

    fn detach(&self) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // A pause waiting for this thread stops waiting: it no longer runs.
        drop(self.pause_state());
        self.pause_cv.notify_all();
    }
}

/// Per-VM facts the vCPU setup needs.
#[derive(Clone, Debug)]
pub struct VcpuConfig {
    /// KVM's supported CPUID (the policy is applied per vCPU).
    pub supported_cpuid: CpuId,
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// In-kernel LAPIC present.
    pub has_lapic: bool,
    /// `KVM_CAP_TSC_DEADLINE_TIMER`.
    pub tsc_deadline: bool,
    /// MSR indices KVM can save/restore (others are skipped).
    pub msr_index_list: Vec<u32>,
    /// Whether the guest may see ENQCMD ([`crate::enqcmd::cpu::check_policy`]).
    pub enqcmd: bool,
}

/// One vCPU.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// The VM's IA32_PASID state, when KVM sends IA32_PASID accesses to user space.
    ia32_pasid: Option<Arc<Ia32Pasid>>,
}

impl Vcpu {
    /// Creates vCPU `id`.
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Self {
            id,
            fd,
            ia32_pasid: None,
        })
    }

    /// Answers this vCPU's IA32_PASID exits from `state` (the VM installed the MSR filter).
    pub fn set_ia32_pasid(&mut self, state: Arc<Ia32Pasid>) {
        self.ia32_pasid = Some(state);
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd (tests read registers through it).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Setup { id, what, source }
    }

    /// CPUID, boot MSRs, LAPIC LINT0/LINT1 (with an in-kernel LAPIC) and the FPU.
    pub fn configure(&self, cfg: &VcpuConfig) -> Result<(), VcpuError> {
        let mut cpuid = cfg.supported_cpuid.clone();
        apply_policy(
            &mut cpuid,
            &CpuidParams {
                vcpu_id: self.id,
                vcpu_count: cfg.vcpu_count,
                has_lapic: cfg.has_lapic,
                tsc_deadline: cfg.tsc_deadline,
                enqcmd: cfg.enqcmd,
            },
        );
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("KVM_SET_CPUID2"))?;
        self.set_boot_msrs(&cfg.msr_index_list)?;
        if cfg.has_lapic {
            self.set_lint()?;
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.setup_err("KVM_SET_FPU"))?;
        Ok(())
    }

    fn set_boot_msrs(&self, supported: &[u32]) -> Result<(), VcpuError> {
        let wanted = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
        ];
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .filter(|(i, _)| supported.is_empty() || supported.contains(i))
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
            id: self.id,
            what: "building the MSR list",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        })?;
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(self.setup_err("KVM_SET_MSRS"))?;
        if n != entries.len() {
            // KVM stops at the first MSR it refuses.
            let idx = entries.get(n).map(|e| e.index).unwrap_or(0);
            log::warn!(
                "vCPU {}: KVM set {n} of {} boot MSRs; MSR {idx:#x} was refused",
                self.id,
                entries.len()
            );
        }
        Ok(())
    }

    fn set_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.setup_err("KVM_GET_LAPIC"))?;
        for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let mut b = [0u8; 4];
            for (i, x) in b.iter_mut().enumerate() {
                *x = lapic.regs[reg + i] as u8;
            }
            let v = u32::from_le_bytes(b);
            // Delivery mode is bits 10:8; clear the mask bit (16).
            let v = (v & !0x0001_0700) | (mode << 8);
            for (i, x) in v.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *x as libc::c_char;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("KVM_SET_LAPIC"))
    }

    /// Sets registers for the boot vCPU's entry.
    pub fn set_entry(&self, entry: &BootEntry) -> Result<(), VcpuError> {
        let sregs = self
            .fd
            .get_sregs()
            .map_err(self.setup_err("KVM_GET_SREGS"))?;
        let sregs = match entry.mode {
            EntryMode::Real { cs_base } => regs::real_mode_sregs(sregs, cs_base),
            EntryMode::Protected32 => regs::protected_mode_sregs(sregs),
            EntryMode::Long64 => regs::long_mode_sregs(sregs),
        };
        self.fd
            .set_sregs(&sregs)
            .map_err(self.setup_err("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&regs::entry_regs(
                entry.rip, entry.rsp, entry.rsi, entry.rbx,
            ))
            .map_err(self.setup_err("KVM_SET_REGS"))
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX)
    }

    /// Runs until the guest stops, an error occurs, or `kicker` is kicked. Must be called on
    /// the thread that owns the vCPU for the whole run (the kick signal targets it).
    pub fn run(&mut self, buses: &Buses, kicker: &VcpuKicker) -> VcpuReport {
        let mut exits = ExitCounts::default();
        let p: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|c| c.set(p));
        kicker.attach_current_thread();
        if let Some(s) = &self.ia32_pasid {
            s.publish(self.id);
        }
        let result = self.run_loop(buses, kicker, &mut exits);
        if matches!(result, Ok(VcpuStop::Kicked)) {
            // Where each vCPU was when the VMM stopped it (a stalled guest killed at a deadline).
            log::info!(
                "vCPU {} at stop: {}",
                self.id,
                crate::vcpu_dump::state_line(&self.fd)
            );
        }
        kicker.detach();
        KVM_RUN_PTR.with(|c| c.set(std::ptr::null_mut()));
        VcpuReport {
            id: self.id,
            result,
            exits,
        }
    }

    fn run_loop(
        &mut self,
        buses: &Buses,
        kicker: &VcpuKicker,
        exits: &mut ExitCounts,
    ) -> Result<VcpuStop, VcpuError> {
        enum Next {
            Continue,
            Stop(VcpuStop),
            Internal,
            Fail(u64, u32),
            Unhandled(String),
        }
        let id = self.id;
        loop {
            kicker.park_if_paused();
            if kicker.stop_requested() {
                return Ok(VcpuStop::Kicked);
            }
            let next = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    exits.io_in += 1;
                    if buses.pio.read(u64::from(port), data).is_err() {
                        exits.unclaimed += 1;
                        log::debug!("vCPU {id}: unclaimed port read {port:#x}/{}", data.len());
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    exits.io_out += 1;
                    if buses.pio.write(u64::from(port), data).is_err() {
                        exits.unclaimed += 1;
                        log::debug!("vCPU {id}: unclaimed port write {port:#x} {data:x?}");
                    }
                    Next::Continue
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    exits.mmio_read += 1;
                    if buses.mmio.read(addr, data).is_err() {
                        exits.unclaimed += 1;
                        log::debug!("vCPU {id}: unclaimed MMIO read {addr:#x}/{}", data.len());
                        data.fill(0xff);
                    }
                    Next::Continue
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    exits.mmio_write += 1;
                    if buses.mmio.write(addr, data).is_err() {
                        exits.unclaimed += 1;
                        log::debug!("vCPU {id}: unclaimed MMIO write {addr:#x} {data:x?}");
                    }
                    Next::Continue
                }
                Ok(VcpuExit::X86Rdmsr(exit)) => {
                    exits.msr_read += 1;
                    match &self.ia32_pasid {
                        Some(s) => s.on_rdmsr(id, exit),
                        None => unfiltered_msr(id, exit.index, exit.error),
                    }
                    Next::Continue
                }
                Ok(VcpuExit::X86Wrmsr(exit)) => {
                    exits.msr_write += 1;
                    match &self.ia32_pasid {
                        Some(s) => s.on_wrmsr(id, exit),
                        None => unfiltered_msr(id, exit.index, exit.error),
                    }
                    Next::Continue
                }
                Ok(VcpuExit::Hlt) => Next::Stop(VcpuStop::Halted),
                Ok(VcpuExit::Shutdown) => Next::Stop(VcpuStop::Shutdown),
                Ok(VcpuExit::SystemEvent(kind, _)) => Next::Stop(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VcpuStop::Crash,
                    k => VcpuStop::SystemEvent(k),
                }),
                Ok(VcpuExit::InternalError) => Next::Internal,
                Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Fail(reason, cpu),
                Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Next::Continue,
                Ok(other) => Next::Unhandled(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    exits.interrupted += 1;
                    Next::Continue
                }
                Err(source) => return Err(VcpuError::Run { id, source }),
            };
            match next {
                Next::Continue => {
                    // An EINTR from a kick leaves immediate_exit set; clear it unless stopping.
                    if !kicker.stop_requested() {
                        self.fd.set_kvm_immediate_exit(0);
                    }
                }
                Next::Stop(s) => return Ok(s),
                Next::Internal => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: KVM_EXIT_INTERNAL_ERROR selects the `internal` union member.
                    let internal = unsafe { run.__bindgen_anon_1.internal };
                    let n = (internal.ndata as usize).min(internal.data.len());
                    return Err(VcpuError::InternalError {
                        id,
                        suberror: internal.suberror,
                        name: internal_error_name(internal.suberror),
                        rip: self.rip(),
                        data: internal.data[..n].to_vec(),
                    });
                }
                Next::Fail(reason, cpu) => return Err(VcpuError::FailEntry { id, reason, cpu }),
                Next::Unhandled(exit) => return Err(VcpuError::UnhandledExit { id, exit }),
            }
        }
    }
}

/// An MSR exit with no IA32_PASID state to answer it (KVM only sends the filtered MSR, and
/// the filter is installed together with the state): #GP, as for an MSR that does not exist.
fn unfiltered_msr(id: u8, index: u32, error: &mut u8) {
    log::warn!("vCPU {id}: MSR {index:#x} exit without an MSR filter of ours; #GP");
    *error = 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suberror_names() {
        assert_eq!(internal_error_name(1), "instruction emulation failed");
        assert_eq!(internal_error_name(99), "unknown suberror");
    }
}
