//! Putting a VM together and running it: the payload runner tests use, and the CLI's `run`.

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
use crate::control::{eject_channel, Control, ControlError, ControlSetup, EjectReceiver};
use crate::device_manager::{DeviceManager, DeviceManagerConfig, DeviceManagerError, IntxWiring};
use crate::hotplug::{HotplugError, PciHotplug};
use crate::irq::{InterruptLine, IrqError, IrqfdLine};
use crate::layout::{ACPI_SLEEP_CONTROL_PORT, SERIAL_IRQ, SERIAL_PORT};
use crate::memory::RamConfig;
use crate::serial::{CaptureBuffer, Serial};
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
    /// The channel from the hotplug controller to the control loop could not be created.
    #[error("Cannot create the guest-eject channel")]
    EjectChannel(#[source] std::io::Error),
    /// The REST API channel or server could not be set up.
    #[error("Cannot start the REST API on {path}")]
    Api {
        /// The `--api-socket` path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: api::ServerError,
    },
    /// The control loop failed.
    #[error("The control loop failed")]
    Control(#[from] ControlError),
}

/// Where serial output goes.
#[derive(Debug)]
pub enum SerialSink {
    /// Process stdout.
    Stdout,
    /// An in-memory buffer.
    Capture(CaptureBuffer),
    /// A file.
    File(std::fs::File),
    /// Discarded.
    Off,
}

/// Registers a 16550 at COM1 on `vm`'s port bus, with its interrupt on GSI 4 when the VM has
/// an irqchip.
pub fn add_serial(vm: &Vm, sink: SerialSink) -> Result<Arc<Mutex<Serial>>, RunError> {
    let out: Option<Box<dyn Write + Send>> = match sink {
        SerialSink::Stdout => Some(Box::new(std::io::stdout())),
        SerialSink::Capture(b) => Some(Box::new(b)),
        SerialSink::File(f) => Some(Box::new(f)),
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

/// Builds the VM `cfg` describes, with its device manager and every `--device` assigned,
/// boots it and waits until it ends. Returns the process exit code (0 for a clean guest stop).
pub fn run(cfg: &VmConfig) -> Result<i32, RunError> {
    run_with(cfg, |_vm, devices, _cfg| {
        Ok(devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .acpi_tables()?)
    })
}

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

/// [`run`] with an `attach` step. Before it runs, the VM exists with RAM, the serial port and
/// its buses, the [`DeviceManager`] has created the PCI bus, and every `--device` is assigned
/// (the first failure aborts the boot, naming the device). `attach` may keep a clone of the
/// shared device manager (the REST API adds and removes devices through it while the VM
/// runs) and returns extra ACPI tables (e.g. a DMAR) to link from the XSDT. The device
/// manager is dropped, removing every device, when the VM has ended.
pub fn run_with<'a>(
    cfg: &VmConfig,
    attach: impl FnOnce(&mut Vm, &SharedDeviceManager, &VmConfig) -> Result<Vec<Vec<u8>>, RunError> + 'a,
) -> Result<i32, RunError> {
    let mut fds = take_inherited_fds(&cfg.devices)?;
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
    let mut vm = Vm::new(VmOptions {
        vcpus: cfg.cpus.boot,
        ram: RamConfig {
            size: cfg.memory.size,
            hugepages: cfg.memory.hugepages,
        },
        irqchip,
    })?;
    // Declared after `vm`, so it is dropped (devices removed) before the VM.
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
    {
        let mut dm = devices.lock().unwrap_or_else(|e| e.into_inner());
        for (d, fd) in cfg.devices.iter().zip(fds.iter_mut()) {
            let added = dm.add_device(d, fd.take())?;
            log::info!("--device {}: {} at {}", added.id, describe(d), added.bdf);
        }
    }
    let sink = match &cfg.serial {
        SerialConfig::Tty => SerialSink::Stdout,
        SerialConfig::Off => SerialSink::Off,
        SerialConfig::File(path) => SerialSink::File(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| RunError::SerialFile {
                    path: path.clone(),
                    source,
                })?,
        ),
    };
    let serial = add_serial(&vm, sink)?;
    let _terminal = if cfg.serial == SerialConfig::Tty {
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
    let (hotplug, ejects) = install_hotplug(&vm)?;
    let (api_rx, server) = match &cfg.api_socket {
        Some(path) => {
            let api_err = |source| RunError::Api {
                path: path.clone(),
                source,
            };
            let (rx, tx, evt) =
                api::ApiReceiver::new().map_err(|e| api_err(api::ServerError::EventFd(e)))?;
            let server = api::start_server(path, tx, evt).map_err(api_err)?;
            log::info!("REST API listening on {}", path.display());
            (Some(rx), Some(server))
        }
        None => (None, None),
    };
    let running = vm.start(&entry)?;
    let control = Control::new(ControlSetup {
        devices: devices.clone(),
        hotplug,
        ejects,
        api: api_rx,
        config: cfg,
        stopper: running.stopper(),
    });
    let exit = control.run(running)?;
    if let Some(server) = server {
        // After the control loop, so the reply to a shutdown request is delivered first.
        if let Err(e) = server.stop() {
            log::warn!("Stopping the REST API: {e}");
        }
    }
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

/// With an in-kernel irqchip: the ACPI PCI hotplug controller (the DSDT always describes
/// it), feeding the guest's ejects to the control loop.
fn install_hotplug(vm: &Vm) -> Result<(Option<Arc<PciHotplug>>, Option<EjectReceiver>), RunError> {
    if vm.irqchip() != IrqchipMode::InKernel {
        return Ok((None, None));
    }
    let (on_eject, ejects) = eject_channel().map_err(RunError::EjectChannel)?;
    let hotplug = PciHotplug::install(vm, on_eject)?;
    Ok((Some(hotplug), Some(ejects)))
}

fn describe(d: &DeviceConfig) -> String {
    match (&d.path, d.fd) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(fd)) => format!("fd {fd}"),
        (None, None) => "device".to_string(),
    }
}
