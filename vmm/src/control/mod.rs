//! The VMM around the VM: Cloud Hypervisor's life cycle over the REST API, the control loop
//! of the main thread, and termination signals.
//!
//! [`run`] is the process: it takes the inherited device fds, installs the SIGTERM/SIGINT
//! handler ([`signals`]), starts the API server when `--api-socket` is given, boots the VM
//! of the command line if there is one (else it waits for `vm.create`), then loops with one
//! `poll(2)` over the API's eventfd, the signals' eventfd, and for a booted VM its end and the
//! guest's ejects ([`ejects`]), never holding the device manager's lock while it waits.
//!
//! The life cycle ([`lifecycle`]) is Cloud Hypervisor's: `vm.create` stores a configuration
//! ([`info::from_api`]), `vm.boot` builds the VM from it ([`crate::runner::boot`]), `vm.pause`
//! parks the vCPUs and freezes the guest clock, `vm.resume` undoes that, `vm.shutdown` stops
//! the VM and releases its devices but keeps the configuration (with devices added since) and
//! the API, `vm.reboot` is a shutdown then a boot, `vm.delete` forgets the configuration, and
//! `vmm.shutdown` deletes the VM and ends the process. A VM that ends on its own (the guest
//! powers off or resets) ends the process with the guest's exit code, as Cloud Hypervisor.
//!
//! The devices of a booted VM ([`devices`]): removal is deterministic. With an ACPI guest
//! (Linux boot) `vm.remove-device` asks the guest to eject the slot and keeps the reply pending
//! ([`removals`]); the guest's `_EJ0` removes the device and answers 204. If no eject comes
//! within [`EJECT_TIMEOUT`], the device is removed anyway (a surprise removal, logged as a
//! warning) and the reply is still 204: the host side is always released. A payload VM (no
//! ACPI) loses the device at once. An eject nobody asked for removes the device too.
//!
//! Owns: the VM's configuration and state, the order of API requests, signals and ejects, and
//! pending removals. Must not touch: device internals (only the device manager's public
//! calls) or the hotplug registers (only `notify_added` and `request_eject`).

pub mod devices;
pub mod ejects;
pub mod info;
pub mod lifecycle;
pub mod removals;
mod requests;
pub mod signals;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api::{ApiReceiver, ServerHandle};
use log::{error, info};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::runner::{take_inherited_fds, AttachFn, RunError};

pub use ejects::{eject_channel, EjectReceiver};
use lifecycle::Instance;
use signals::Signals;

/// How long `vm.remove-device` waits for the guest to eject the slot before removing the
/// device anyway.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the VMM process (not of the requests it serves).
#[derive(Debug, Error)]
pub enum ControlError {
    /// Assembling or booting the VM of the command line failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The REST API channel or server could not be set up.
    #[error("Cannot start the REST API on {path}")]
    Api {
        /// The `--api-socket` path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: api::ServerError,
    },
    /// The SIGTERM/SIGINT handler could not be installed.
    #[error("Cannot install the SIGTERM/SIGINT handler")]
    Signals(#[source] io::Error),
}

/// The VMM: its API, the VM's configuration and, when booted, the VM.
pub struct Vmm<'a> {
    api: Option<ApiReceiver>,
    signals: Option<Signals>,
    api_socket: Option<PathBuf>,
    /// The created VM's configuration (devices added since included, with their ids).
    config: Option<VmConfig>,
    /// The cdev fd of each device of `config` that came with one (same order).
    fds: Vec<Option<OwnedFd>>,
    /// The booted VM.
    vm: Option<Instance>,
    /// Bumped at each boot and shutdown, so a poll result is not applied to another VM.
    generation: u64,
    /// The VM was shut down (and not booted since): `vm.info` says `Shutdown`.
    shut_down: bool,
    attach: Box<AttachFn<'a>>,
    /// Set when the process should end, with its exit code.
    exit: Option<Result<i32, RunError>>,
}

fn pollfd(fd: &EventFd) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Milliseconds for `poll`, rounded up so a deadline is never polled early; -1 is forever.
fn poll_timeout(t: Option<Duration>) -> libc::c_int {
    match t {
        None => -1,
        Some(d) => {
            let ms = d.as_micros().div_ceil(1000);
            libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
        }
    }
}

/// The VMM process: serves until `vmm.shutdown`, a termination signal, or the end of the VM,
/// and returns the exit code. `cfg` is the VM of the command line (booted at once), or none
/// for an empty VMM that waits for `vm.create` on `api_socket`.
pub fn run(cfg: Option<VmConfig>, api_socket: Option<PathBuf>) -> Result<i32, ControlError> {
    // The device manager's own ACPI tables (the DMAR when a vIOMMU is configured).
    run_with(
        cfg,
        api_socket,
        Box::new(|_, devices, _| {
            Ok(devices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .acpi_tables()?)
        }),
    )
}

/// [`run`] with an attach step for every boot (see [`crate::runner::boot`]).
pub fn run_with(
    cfg: Option<VmConfig>,
    api_socket: Option<PathBuf>,
    attach: Box<AttachFn<'_>>,
) -> Result<i32, ControlError> {
    // First, before the VMM opens files of its own.
    let (config, fds) = match cfg {
        Some(mut c) => {
            let fds = take_inherited_fds(&c.devices)?;
            // The numbers meant something only at start; the fds themselves are kept.
            for d in &mut c.devices {
                d.fd = None;
            }
            (Some(c), fds)
        }
        None => (None, Vec::new()),
    };
    let signals = signals::install().map_err(ControlError::Signals)?;
    let boot_now = config.is_some();
    let mut vmm = Vmm {
        api: None,
        signals: Some(signals),
        api_socket,
        config,
        fds,
        vm: None,
        generation: 0,
        shut_down: false,
        attach,
        exit: None,
    };
    // The VM of the command line boots before the API opens (as before the life cycle came),
    // so the first request finds it running.
    if boot_now {
        vmm.boot_vm()?;
    } else {
        info!("No VM configured: waiting for vm.create");
    }
    let server = match vmm.api_socket.clone() {
        Some(path) => {
            let api_err = |source| ControlError::Api {
                path: path.clone(),
                source,
            };
            let (rx, tx, evt) =
                api::ApiReceiver::new().map_err(|e| api_err(api::ServerError::EventFd(e)))?;
            let server = api::start_server(&path, tx, evt).map_err(api_err)?;
            info!("REST API listening on {}", path.display());
            vmm.api = Some(rx);
            Some(server)
        }
        None => None,
    };
    let result = vmm.serve();
    stop_server(server);
    result.map_err(ControlError::Run)
}

/// Stops the API server after the loop, so the reply to a shutdown request is delivered
/// first; the socket file is removed.
fn stop_server(server: Option<ServerHandle>) {
    if let Some(server) = server {
        if let Err(e) = server.stop() {
            log::warn!("Stopping the REST API: {e}");
        }
    }
}

impl Vmm<'_> {
    /// The loop; see the module documentation.
    fn serve(&mut self) -> Result<i32, RunError> {
        loop {
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            let mut fds = Vec::new();
            let sig_at = self.signals.as_ref().map(|s| {
                fds.push(pollfd(s.event_fd()));
                fds.len() - 1
            });
            let api_at = self.api.as_ref().map(|a| {
                fds.push(pollfd(a.event_fd()));
                fds.len() - 1
            });
            let generation = self.generation;
            let (exit_at, ejects_at, timeout) = match &self.vm {
                Some(vm) => {
                    fds.push(pollfd(vm.exit_evt()));
                    let exit_at = fds.len() - 1;
                    let ejects_at = vm.devices().ejects().map(|e| {
                        fds.push(pollfd(e.event_fd()));
                        fds.len() - 1
                    });
                    (
                        Some(exit_at),
                        ejects_at,
                        vm.devices().next_timeout(Instant::now()),
                    )
                }
                None => (None, None, None),
            };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
            let rc = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    poll_timeout(timeout),
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("Control loop poll failed, stopping the VM: {e}");
                self.delete_vm();
                return Ok(1);
            }
            let ready =
                |at: Option<usize>| at.and_then(|i| fds.get(i)).is_some_and(|p| p.revents != 0);
            if ready(sig_at) {
                if let Some(sig) = self.signals.as_ref().and_then(|s| s.take()) {
                    info!("{}: shutting the VM down and exiting", signals::name(sig));
                    self.delete_vm();
                    return Ok(0);
                }
            }
            if ready(ejects_at) && self.generation == generation {
                self.on_ejects();
            }
            if ready(api_at) {
                self.on_api();
            }
            if self.generation == generation {
                self.expire(Instant::now());
                if ready(exit_at) {
                    self.on_vm_end();
                }
            }
        }
    }

    /// Answers every queued API request.
    fn on_api(&mut self) {
        let requests = match &self.api {
            Some(a) => a.drain(),
            None => return,
        };
        for r in requests {
            self.handle(r);
        }
    }
}

#[cfg(test)]
mod tests;
