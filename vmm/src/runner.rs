//! Putting a VM together and starting it: [`boot`] builds one VM from a [`VmConfig`] (RAM,
//! device manager with its devices, serial, ACPI or payload, hotplug controller) and starts
//! its vCPUs; [`PayloadVm`] is the payload runner tests use. Running the VMM around it (the
//! REST API, the VM's life cycle, signals) is [`crate::control`]'s job: this module does not
//! depend on it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::acpi::{write_tables, AcpiError, AcpiPmDevice};
use crate::boot::linux::{load_linux, LinuxBootConfig, LinuxBootError};
use crate::boot::payload::{load_payload, read_payload, PayloadError, PayloadMode};
use crate::boot::BootEntry;
use crate::config::{BootConfig, DeviceConfig, SerialConfig, VmConfig};
use crate::device_manager::{
    AddedDevice, DeviceManager, DeviceManagerConfig, DeviceManagerError, IntxWiring,
};
use crate::hotplug::{EjectCallback, HotplugError, PciHotplug};
use crate::irq::{InterruptLine, IrqError, IrqfdLine};
use crate::layout::{ACPI_SLEEP_CONTROL_PORT, SERIAL_IRQ, SERIAL_PORT};
use crate::memory::RamConfig;
use crate::serial::{CaptureBuffer, ConsoleOutput, Serial, TerminalGuard, DEFAULT_FILE_CAP};
use crate::vcpu::VcpuStop;
use crate::vm::{
    IrqchipMode, RunningVm, StopReason, Vm, VmError, VmExit, VmOptions, DEBUG_EXIT_PORT,
};

/// Errors of assembling or running a VM.
#[derive(Debug, Error)]
pub enum RunError {
    /// VM creation or start failed.
    #[error("VM setup failed")]
    Vm(#[from] VmError),
    /// `--cpus enqcmd=on` on a host that cannot translate guest PASIDs in the CPU.
    #[error("CPU setup failed")]
    Enqcmd(#[from] crate::enqcmd::cpu::EnqcmdError),
    /// The serial interrupt could not be wired.
    #[error("Cannot wire the serial interrupt to GSI {SERIAL_IRQ}")]
    SerialIrq(#[source] IrqError),
    /// The serial output file could not be opened.
    #[error("Cannot open serial output file {path}")]
    SerialFile {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Loading Linux failed.
    #[error("Linux boot setup failed")]
    Linux(#[from] LinuxBootError),
    /// Writing the ACPI tables failed.
    #[error("ACPI setup failed")]
    Acpi(#[from] AcpiError),
    /// Loading a payload failed.
    #[error("Payload setup failed")]
    Payload(#[from] PayloadError),
    /// The device-attach step failed.
    #[error("Device setup failed")]
    Devices(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The device manager could not be created, or a `--device` could not be assigned.
    #[error("Device setup failed")]
    DeviceManager(#[from] DeviceManagerError),
    /// A `--device fd=N` that is not an open file descriptor of this process.
    #[error("--device fd={fd}: not an open file descriptor of ioasid-vmm (pass the VFIO cdev open, without close-on-exec)")]
    InheritedFd {
        /// The number.
        fd: i32,
        /// The errno of fcntl(F_GETFD).
        #[source]
        source: std::io::Error,
    },
    /// A vCPU failed.
    #[error("The guest stopped with an error")]
    Guest(#[source] crate::vcpu::VcpuError),
    /// The ACPI PCI hotplug controller could not be installed.
    #[error("PCI hotplug setup failed")]
    Hotplug(#[from] HotplugError),
}

/// Where serial output goes.
#[derive(Debug)]
pub enum SerialSink {
    /// Process stdout.
    Stdout,
    /// An in-memory buffer.
    Capture(CaptureBuffer),
    /// A file, with the cap on bytes this run writes to it.
    File(std::fs::File, u64),
    /// Discarded.
    Off,
}

/// Registers a 16550 at COM1 on `vm`'s port bus, with its interrupt on GSI 4 when the VM has
/// an irqchip.
pub fn add_serial(vm: &Vm, sink: SerialSink) -> Result<Arc<Mutex<Serial>>, RunError> {
    // Stdout and files go through a bounded buffer and a writer thread: console output
    // never blocks a vCPU. A capture buffer (tests, payloads) stays synchronous.
    let out: Option<Box<dyn Write + Send>> = match sink {
        SerialSink::Stdout => match ConsoleOutput::stdout() {
            Ok(c) => Some(Box::new(c)),
            Err(e) => {
                log::warn!("Cannot duplicate stdout for the console ({e}): writing directly");
                Some(Box::new(std::io::stdout()))
            }
        },
        SerialSink::Capture(b) => Some(Box::new(b)),
        SerialSink::File(f, cap) => Some(Box::new(ConsoleOutput::file(f, cap))),
        SerialSink::Off => None,
    };
    let irq: Option<Arc<dyn InterruptLine>> = match vm.gsi_router() {
        Ok(router) => Some(Arc::new(
            IrqfdLine::new(router, SERIAL_IRQ).map_err(RunError::SerialIrq)?,
        )),
        Err(_) => None,
    };
    let serial = Arc::new(Mutex::new(Serial::new(out, irq)));
    vm.add_pio_device(serial.clone(), SERIAL_PORT, 8)?;
    Ok(serial)
}

/// A VM for raw payloads, with serial output captured and a debug-exit port at 0x501.
#[derive(Debug)]
pub struct PayloadVm {
    vm: Vm,
    serial: CaptureBuffer,
}

/// The result of a payload run.
#[derive(Debug)]
pub struct PayloadOutcome {
    /// How the VM ended.
    pub exit: VmExit,
    /// Bytes the payload wrote to COM1.
    pub serial: Vec<u8>,
}

impl PayloadOutcome {
    /// The boot vCPU's stop (or error) and the VMM stop reason, in one place.
    pub fn stop(&self) -> Option<&Result<VcpuStop, crate::vcpu::VcpuError>> {
        self.exit.first_result()
    }

    /// The code the guest wrote to the debug-exit port, if it ended that way.
    pub fn guest_exit_code(&self) -> Option<u32> {
        match self.exit.requested {
            Some(StopReason::GuestExit(c)) => Some(c),
            _ => None,
        }
    }
}

impl PayloadVm {
    /// A one-vCPU VM with `mem_size` bytes of RAM.
    pub fn new(mem_size: u64, irqchip: IrqchipMode) -> Result<Self, RunError> {
        let vm = Vm::new(VmOptions {
            vcpus: 1,
            ram: RamConfig {
                size: mem_size,
                hugepages: false,
            },
            irqchip,
        })?;
        let serial = CaptureBuffer::new();
        add_serial(&vm, SerialSink::Capture(serial.clone()))?;
        vm.add_debug_exit(DEBUG_EXIT_PORT)?;
        Ok(Self { vm, serial })
    }

    /// The VM, to register devices, routes, or read memory.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Loads `code` at `gpa` and starts the vCPU; the caller waits on the result.
    pub fn start(
        &mut self,
        code: &[u8],
        gpa: u64,
        mode: PayloadMode,
    ) -> Result<RunningVm, RunError> {
        let entry = load_payload(self.vm.ram(), code, gpa, mode)?;
        Ok(self.vm.start(&entry)?)
    }

    /// Loads and runs `code` until the vCPU stops (HLT without an irqchip, a debug-exit
    /// write, an error, or a stop request).
    pub fn run(
        &mut self,
        code: &[u8],
        gpa: u64,
        mode: PayloadMode,
    ) -> Result<PayloadOutcome, RunError> {
        let running = self.start(code, gpa, mode)?;
        Ok(self.finish(running))
    }

    /// Waits for a started payload and collects the outcome.
    pub fn finish(&self, running: RunningVm) -> PayloadOutcome {
        let exit = running.wait();
        PayloadOutcome {
            exit,
            serial: self.serial.contents(),
        }
    }

    /// Like [`Self::finish`], but stops the VM when it has not ended within `limit`: the
    /// guard tests use against a payload that hangs.
    pub fn finish_within(&self, running: RunningVm, limit: std::time::Duration) -> PayloadOutcome {
        let stopper = running.stopper();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let guard = std::thread::spawn(move || {
            if done_rx.recv_timeout(limit).is_err() {
                stopper.stop();
            }
        });
        let out = self.finish(running);
        let _ = done_tx.send(());
        let _ = guard.join();
        out
    }
}

/// The device manager of a running VM, shared with whoever serves the REST API.
pub type SharedDeviceManager = Arc<Mutex<DeviceManager>>;

/// The attach step of [`boot`]: runs after the VM, its device manager and its devices exist
/// and before the boot payload is loaded; may keep a clone of the device manager, and
/// returns extra ACPI tables (e.g. a DMAR) to link from the XSDT.
pub type AttachFn<'a> =
    dyn Fn(&mut Vm, &SharedDeviceManager, &VmConfig) -> Result<Vec<Vec<u8>>, RunError> + 'a;

/// Takes ownership of the fds `--device fd=N` names. Done first thing, before the VMM opens
/// files of its own, so a number can only be one the process inherited.
pub fn take_inherited_fds(devices: &[DeviceConfig]) -> Result<Vec<Option<OwnedFd>>, RunError> {
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        let Some(fd) = d.fd else {
            out.push(None);
            continue;
        };
        // SAFETY: F_GETFD only reads the fd's flags; an invalid number fails with EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(RunError::InheritedFd {
                fd,
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is open (checked above), was named on the command line as a file the
        // process inherited, is taken before the VMM opens any file of its own, and each
        // number is taken once (the config refuses duplicates and 0..=2); from here the
        // OwnedFd is its only owner.
        out.push(Some(unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(out)
}

/// A booted VM: its vCPUs run. Dropping it stops them, removes every device, then frees the
/// VM (the fields drop in this order).
pub struct BootedVm {
    /// The vCPU threads (taken by whoever waits for the VM's end).
    pub running: Option<RunningVm>,
    /// The device manager.
    pub devices: SharedDeviceManager,
    /// The ACPI PCI hotplug controller (VMs with an in-kernel irqchip); it calls the
    /// `on_eject` given to [`boot`].
    pub hotplug: Option<Arc<PciHotplug>>,
    /// The guest runs an ACPI OS (a Linux boot): adds are announced and removals ejected.
    pub acpi_guest: bool,
    /// The devices of the configuration as they were added, in order (ids assigned).
    pub added: Vec<AddedDevice>,
    _terminal: Option<TerminalGuard>,
    /// The VM, last to go.
    pub vm: Vm,
}

impl std::fmt::Debug for BootedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootedVm")
            .field("acpi_guest", &self.acpi_guest)
            .field("added", &self.added)
            .finish_non_exhaustive()
    }
}

/// Builds the VM `cfg` describes and starts its vCPUs: RAM, the device manager with every
/// device of `cfg.devices` assigned (`fds[i]` is device `i`'s cdev fd, if it has one; the
/// first failure aborts the boot, naming the device), the serial port, `attach`, ACPI tables
/// and the Linux boot (or the payload), and the hotplug controller, which reports the guest's
/// ejects to `on_eject`.
pub fn boot(
    cfg: &VmConfig,
    mut fds: Vec<Option<OwnedFd>>,
    attach: &AttachFn<'_>,
    on_eject: EjectCallback,
) -> Result<BootedVm, RunError> {
    let (irqchip, entry_of): (IrqchipMode, &BootConfig) = match &cfg.boot {
        BootConfig::Linux(_) => (IrqchipMode::InKernel, &cfg.boot),
        BootConfig::Payload(p) => (
            if p.irqchip {
                IrqchipMode::InKernel
            } else {
                IrqchipMode::Off
            },
            &cfg.boot,
        ),
    };
    crate::enqcmd::cpu::check_policy(cfg.cpus.enqcmd, crate::enqcmd::cpu::host_cpu_side())?;
    let mut vm = Vm::new(VmOptions {
        vcpus: cfg.cpus.boot,
        ram: RamConfig {
            size: cfg.memory.size,
            hugepages: cfg.memory.hugepages,
        },
        irqchip,
    })?;
    // A guest IA32_PASID write is checked against the PASIDs the vIOMMU can name.
    vm.set_guest_pasid_bits(match cfg.platform.viommu {
        crate::config::ViommuKind::Vtd => cfg.platform.vtd.pasid_bits,
        crate::config::ViommuKind::Off => 0,
    });
    let devices: SharedDeviceManager = Arc::new(Mutex::new(DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            // A payload has no ACPI, hence no _PRT to find an INTx route by.
            intx: match cfg.boot {
                BootConfig::Linux(_) => IntxWiring::Wire,
                BootConfig::Payload(_) => IntxWiring::Off,
            },
            ..DeviceManagerConfig::from_platform(&cfg.platform)
        },
    )?));
    let mut added = Vec::with_capacity(cfg.devices.len());
    {
        let mut dm = devices.lock().unwrap_or_else(|e| e.into_inner());
        fds.resize_with(cfg.devices.len(), || None);
        for (d, fd) in cfg.devices.iter().zip(fds.iter_mut()) {
            let a = dm.add_device(d, fd.take())?;
            log::info!("device {}: {} at {}", a.id, describe(d), a.bdf);
            added.push(a);
        }
    }
    let sink = match &cfg.serial {
        SerialConfig::Tty => SerialSink::Stdout,
        SerialConfig::Off => SerialSink::Off,
        SerialConfig::File { path, max_size } => SerialSink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| RunError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
            max_size.unwrap_or(DEFAULT_FILE_CAP),
        ),
    };
    let serial = add_serial(&vm, sink)?;
    let terminal = if cfg.serial == SerialConfig::Tty {
        crate::serial::spawn_stdin_reader(serial.clone())
    } else {
        None
    };
    let extra_tables = attach(&mut vm, &devices, cfg)?;
    let entry: BootEntry = match entry_of {
        BootConfig::Linux(l) => {
            let rsdp = write_tables(
                vm.ram().memory(),
                cfg.cpus.boot,
                vm.ram().end(),
                &extra_tables,
            )?;
            let pm = Arc::new(Mutex::new(AcpiPmDevice::new(vm.stopper().clone())));
            vm.add_pio_device(pm, ACPI_SLEEP_CONTROL_PORT, 3)?;
            let rtc = Arc::new(Mutex::new(crate::cmos::Cmos::new()));
            vm.add_pio_device(rtc, crate::cmos::CMOS_PORT, crate::cmos::CMOS_PORT_COUNT)?;
            load_linux(
                vm.ram(),
                &LinuxBootConfig {
                    kernel: l.kernel.clone(),
                    cmdline: l.cmdline.clone(),
                    initramfs: l.initramfs.clone(),
                    rsdp: Some(rsdp),
                },
            )?
        }
        BootConfig::Payload(p) => {
            vm.add_debug_exit(DEBUG_EXIT_PORT)?;
            let code = read_payload(&p.path)?;
            load_payload(vm.ram(), &code, p.gpa, p.mode)?
        }
    };
    let hotplug = if vm.irqchip() == IrqchipMode::InKernel {
        Some(PciHotplug::install(&vm, on_eject)?)
    } else {
        None
    };
    let running = vm.start(&entry)?;
    Ok(BootedVm {
        running: Some(running),
        devices,
        hotplug,
        acpi_guest: matches!(cfg.boot, BootConfig::Linux(_)),
        added,
        _terminal: terminal,
        vm,
    })
}

/// The process exit code for a VM that ended as `exit` says: the guest's debug-exit code, 0
/// for a requested stop, a power-off or a reset, 1 for a crash; a vCPU error is an error.
pub fn exit_code(exit: VmExit) -> Result<i32, RunError> {
    for r in &exit.reports {
        log::info!("vCPU {} exits: {:?}", r.id, r.exits);
    }
    if let Some(reason) = exit.requested {
        log::info!("VM stopped: {reason:?}");
        return Ok(match reason {
            StopReason::GuestExit(code) => (code & 0xff) as i32,
            StopReason::Requested | StopReason::GuestPowerOff | StopReason::GuestReset => 0,
        });
    }
    match exit.reports.into_iter().next().map(|r| r.result) {
        Some(Ok(stop)) => {
            log::info!("VM stopped: {stop:?}");
            Ok(match stop {
                VcpuStop::Crash => 1,
                _ => 0,
            })
        }
        Some(Err(e)) => Err(RunError::Guest(e)),
        None => Ok(0),
    }
}

fn describe(d: &DeviceConfig) -> String {
    match (&d.path, &d.emulated) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(e)) => format!("emulated {e}"),
        (None, None) => "cdev fd".to_string(),
    }
}
