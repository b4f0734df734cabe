//! The control loop: the main thread's work while the vCPUs run.
//!
//! One `poll(2)` over three eventfds, never holding the device manager's lock while it waits:
//! - the REST API's ([`api::ApiReceiver`]): each request is answered from the
//!   [`DeviceManager`](crate::device_manager::DeviceManager) (add, remove, introspection),
//!   from the configuration (`vm.info`), or by stopping the VM (`vm.shutdown`,
//!   `vmm.shutdown`);
//! - the guest's ejects ([`ejects`]): the hotplug controller's `on_eject` callback queues the
//!   slot on a vCPU thread; here the device in that slot is removed;
//! - the VM's end: a thread waits on [`RunningVm::wait`] and signals when every vCPU stopped.
//!
//! Removal is deterministic. With an ACPI guest (Linux boot) `vm.remove-device` asks the guest
//! to eject the slot and keeps the reply pending ([`removals`]); the guest's `_EJ0` removes
//! the device and answers 204. If no eject comes within [`EJECT_TIMEOUT`], the device is
//! removed anyway (a surprise removal, logged as a warning) and the reply is still 204: the
//! host side is always released. A payload VM (no ACPI) loses the device at once. An eject
//! nobody asked for (the guest powered the slot off itself) removes the device too.
//!
//! Owns: the order of API requests and ejects, and pending removals. Must not touch: device
//! internals (only the device manager's public calls) or the hotplug registers (only
//! `notify_added` and `request_eject`).

pub mod ejects;
pub mod info;
pub mod removals;
mod requests;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use api::ApiReceiver;
use log::{error, info};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{BootConfig, VmConfig};
use crate::device_manager::DeviceManager;
use crate::hotplug::PciHotplug;
use crate::runner::SharedDeviceManager;
use crate::vm::{RunningVm, VmExit, VmStopper};

pub use ejects::{eject_channel, EjectReceiver};
use removals::PendingRemovals;

/// How long `vm.remove-device` waits for the guest to eject the slot before removing the
/// device anyway.
pub const EJECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the control loop itself (not of the requests it serves).
#[derive(Debug, Error)]
pub enum ControlError {
    /// The VM-exit eventfd could not be created.
    #[error("Cannot create the VM-exit eventfd of the control loop")]
    EventFd(#[source] io::Error),
    /// The thread that waits for the vCPUs could not be spawned (the VM was stopped).
    #[error("Cannot spawn the thread that waits for the vCPUs")]
    Spawn(#[source] io::Error),
    /// That thread panicked.
    #[error("The thread that waits for the vCPUs panicked")]
    WaiterPanicked,
}

/// What the control loop serves.
pub struct ControlSetup<'a> {
    /// The VM's device manager.
    pub devices: SharedDeviceManager,
    /// The ACPI PCI hotplug controller, when the VM has one.
    pub hotplug: Option<Arc<PciHotplug>>,
    /// The guest's ejects (the receiver of the channel whose callback `hotplug` calls).
    pub ejects: Option<EjectReceiver>,
    /// The API's requests, when `--api-socket` is given.
    pub api: Option<ApiReceiver>,
    /// The VM's configuration (for `vm.info`, and whether the guest runs an ACPI OS).
    pub config: &'a VmConfig,
    /// Stops the vCPUs (`vm.shutdown`).
    pub stopper: Arc<VmStopper>,
}

/// The control loop's state. See the module documentation.
pub struct Control {
    devices: SharedDeviceManager,
    hotplug: Option<Arc<PciHotplug>>,
    /// The guest is an ACPI OS (Linux boot): adds are announced and removals ejected.
    acpi_guest: bool,
    ejects: Option<EjectReceiver>,
    api: Option<ApiReceiver>,
    stopper: Arc<VmStopper>,
    config: serde_json::Value,
    memory_size: u64,
    pending: PendingRemovals,
    eject_timeout: Duration,
    stopping: bool,
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

impl Control {
    /// The control state for `setup`.
    pub fn new(setup: ControlSetup<'_>) -> Self {
        Self {
            devices: setup.devices,
            hotplug: setup.hotplug,
            acpi_guest: matches!(setup.config.boot, BootConfig::Linux(_)),
            ejects: setup.ejects,
            api: setup.api,
            stopper: setup.stopper,
            config: info::config_json(setup.config),
            memory_size: setup.config.memory.size,
            pending: PendingRemovals::default(),
            eject_timeout: EJECT_TIMEOUT,
            stopping: false,
        }
    }

    /// Overrides whether the guest is treated as an ACPI OS (tests).
    pub fn set_acpi_guest(&mut self, acpi: bool) {
        self.acpi_guest = acpi;
    }

    /// Overrides [`EJECT_TIMEOUT`] (tests).
    pub fn set_eject_timeout(&mut self, t: Duration) {
        self.eject_timeout = t;
    }

    /// Removals waiting for the guest.
    pub fn pending_removals(&self) -> usize {
        self.pending.len()
    }

    fn dm(&self) -> MutexGuard<'_, DeviceManager> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves API requests and ejects until every vCPU of `running` stopped, then finishes
    /// pending removals and returns how the VM ended.
    pub fn run(mut self, running: RunningVm) -> Result<VmExit, ControlError> {
        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(ControlError::EventFd)?;
        let notify = exit_evt.try_clone().map_err(ControlError::EventFd)?;
        let waiter = std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                let exit = running.wait();
                if let Err(e) = notify.write(1) {
                    error!("Cannot signal the VM's end to the control loop: {e}");
                }
                exit
            })
            .map_err(ControlError::Spawn)?;
        loop {
            let mut fds = vec![pollfd(&exit_evt)];
            if let Some(e) = &self.ejects {
                fds.push(pollfd(e.event_fd()));
            }
            if let Some(a) = &self.api {
                fds.push(pollfd(a.event_fd()));
            }
            let timeout = poll_timeout(self.pending.next_timeout(Instant::now()));
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds that outlives the call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!("Control loop poll failed, stopping the VM: {e}");
                self.stopper.stop();
                break;
            }
            let mut i = 1;
            if self.ejects.is_some() {
                if fds[i].revents != 0 {
                    self.on_ejects();
                }
                i += 1;
            }
            if self.api.is_some() && fds[i].revents != 0 {
                self.on_api();
            }
            self.expire(Instant::now());
            if fds[0].revents != 0 {
                break;
            }
        }
        let exit = waiter.join().map_err(|_| ControlError::WaiterPanicked)?;
        self.finish();
        Ok(exit)
    }

    /// Answers every queued API request.
    pub fn on_api(&mut self) {
        let requests = match &self.api {
            Some(a) => a.drain(),
            None => return,
        };
        for r in requests {
            self.handle(r);
        }
    }

    /// Removes the devices in the slots the guest ejected.
    pub fn on_ejects(&mut self) {
        let slots = match &self.ejects {
            Some(e) => e.drain(),
            None => return,
        };
        for slot in slots {
            self.on_eject(slot);
        }
    }

    /// After the VM ended: the ejects it made last, then the removals still waiting (the
    /// devices are removed, the replies say so).
    fn finish(&mut self) {
        self.on_ejects();
        for p in self.pending.take_all() {
            info!(
                "{}: the VM stopped before the guest ejected slot {}; removing it",
                p.id, p.slot
            );
            p.reply.send(self.release(&p.id));
        }
    }
}

#[cfg(test)]
mod tests;
