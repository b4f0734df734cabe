//! Putting a VM together and running it: the payload runner tests use, and the CLI's `run`.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};

use thiserror::Error;

use crate::acpi::{write_tables, AcpiError, AcpiPmDevice};
use crate::boot::linux::{load_linux, LinuxBootConfig, LinuxBootError};
use crate::boot::payload::{load_payload, read_payload, PayloadError, PayloadMode};
use crate::boot::BootEntry;
use crate::config::{BootConfig, SerialConfig, VmConfig};
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
    /// A vCPU failed.
    #[error("The guest stopped with an error")]
    Guest(#[source] crate::vcpu::VcpuError),
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
}

/// Builds the VM `cfg` describes, boots it and waits until it ends. Returns the process exit
/// code (0 for a clean guest stop). `--device` entries are reported as not attached; use
/// [`run_with`] to attach them.
pub fn run(cfg: &VmConfig) -> Result<i32, RunError> {
    run_with(cfg, |_vm, cfg| {
        if !cfg.devices.is_empty() {
            log::warn!(
                "{} --device entries parsed but not attached: no device manager is wired",
                cfg.devices.len()
            );
        }
        Ok(Vec::new())
    })
}

/// [`run`] with an `attach` step where the device manager registers its devices on the
/// buses, sets up interrupt routes and maps guest RAM for DMA. It runs after RAM, the serial
/// port and the buses exist and before the guest is loaded, and returns extra ACPI tables
/// (e.g. a DMAR) to link from the XSDT.
pub fn run_with<'a>(
    cfg: &VmConfig,
    attach: impl FnOnce(&mut Vm, &VmConfig) -> Result<Vec<Vec<u8>>, RunError> + 'a,
) -> Result<i32, RunError> {
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
    let extra_tables = attach(&mut vm, cfg)?;
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
    let running = vm.start(&entry)?;
    let exit = running.wait();
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
