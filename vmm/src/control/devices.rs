//! The devices of a booted VM: hot-add, hot-remove (with the guest's eject when it runs an
//! ACPI OS), the guest's own ejects and eject timeouts.

use std::os::fd::OwnedFd;
use std::str::FromStr;
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use api::types::PciDeviceInfo;
use api::{ApiError, ApiErrorKind, ApiResult, DeviceConfig, Responder};
use devices::pci::PciBdf;
use log::{info, warn};

use super::ejects::EjectReceiver;
use super::removals::{PendingRemoval, PendingRemovals};
use super::EJECT_TIMEOUT;
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::hotplug::PciHotplug;
use crate::runner::SharedDeviceManager;

/// A device manager error as the REST API answers it: the message and its causes.
pub fn api_error(e: &DeviceManagerError) -> ApiError {
    ApiError::from_chain(e.to_api_error().kind(), e)
}

/// The REST status of a failed add. The device manager maps most errors; here the steps that
/// are the caller's fault get a 4xx: a host device that does not exist or is not usable
/// through VFIO (404, as Cloud Hypervisor answers a failed add), an fd that is not a VFIO cdev
/// (400), a slot already taken (409).
fn add_error(e: &DeviceManagerError) -> ApiError {
    let kind = match e {
        DeviceManagerError::Step { step, .. } => match *step {
            "resolving the device" => ApiErrorKind::NotFound,
            "identifying the device" => ApiErrorKind::BadRequest,
            "choosing the PCI slot" => ApiErrorKind::Conflict,
            _ => e.to_api_error().kind(),
        },
        _ => e.to_api_error().kind(),
    };
    ApiError::from_chain(kind, e)
}

/// What [`VmDevices`] works with.
pub struct VmDevicesSetup {
    /// The VM's device manager.
    pub devices: SharedDeviceManager,
    /// The ACPI PCI hotplug controller, when the VM has one.
    pub hotplug: Option<Arc<PciHotplug>>,
    /// The guest's ejects (the receiver of the channel whose callback `hotplug` calls).
    pub ejects: Option<EjectReceiver>,
    /// The guest is an ACPI OS (Linux boot): adds are announced and removals ejected.
    pub acpi_guest: bool,
}

/// The device side of one booted VM. See the module documentation.
pub struct VmDevices {
    devices: SharedDeviceManager,
    hotplug: Option<Arc<PciHotplug>>,
    acpi_guest: bool,
    ejects: Option<EjectReceiver>,
    pending: PendingRemovals,
    eject_timeout: Duration,
}

/// An error with its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

impl VmDevices {
    /// The device side of a VM that was just booted.
    pub fn new(setup: VmDevicesSetup) -> Self {
        Self {
            devices: setup.devices,
            hotplug: setup.hotplug,
            acpi_guest: setup.acpi_guest,
            ejects: setup.ejects,
            pending: PendingRemovals::default(),
            eject_timeout: EJECT_TIMEOUT,
        }
    }

    /// Overrides [`EJECT_TIMEOUT`] (tests).
    pub fn set_eject_timeout(&mut self, t: Duration) {
        self.eject_timeout = t;
    }

    /// Removals waiting for the guest.
    pub fn pending_removals(&self) -> usize {
        self.pending.len()
    }

    /// How long until the next eject deadline, if a removal waits.
    pub fn next_timeout(&self, now: Instant) -> Option<Duration> {
        self.pending.next_timeout(now)
    }

    /// The guest's ejects, to poll.
    pub fn ejects(&self) -> Option<&EjectReceiver> {
        self.ejects.as_ref()
    }

    /// The device manager, locked.
    pub fn dm(&self) -> MutexGuard<'_, DeviceManager> {
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `vm.add-device`: assign, then announce the slot to an ACPI guest. On any failure
    /// nothing is left behind.
    pub fn add_device(
        &mut self,
        config: &DeviceConfig,
        fd: Option<OwnedFd>,
    ) -> ApiResult<PciDeviceInfo> {
        let added = self.dm().add_device(config, fd).map_err(|e| {
            warn!("vm.add-device refused: {}", e.message());
            add_error(&e)
        })?;
        self.announce(added)
    }

    /// Announces a device just added to an ACPI guest; removes it again when that fails.
    fn announce(&mut self, added: crate::device_manager::AddedDevice) -> ApiResult<PciDeviceInfo> {
        if self.acpi_guest {
            if let Some(hp) = &self.hotplug {
                let slot = added.bdf.device();
                if let Err(e) = hp.notify_added(slot) {
                    let message = format!(
                        "Cannot announce {} at {} to the guest: {}",
                        added.id,
                        added.bdf,
                        chain(&e)
                    );
                    warn!("{message}; removing it again");
                    if let Err(r) = self.dm().remove_device(&added.id) {
                        warn!("{}", r.message());
                    }
                    return Err(ApiError::Internal(message));
                }
            }
        }
        info!("vm.add-device: {} at {}", added.id, added.bdf);
        Ok(added.to_api())
    }

    /// The slot of device `id`, or `None` when no device has that id.
    fn slot_of(&self, id: &str) -> Option<u8> {
        self.dm()
            .pci_devices()
            .into_iter()
            .find(|d| d.id == id)
            .and_then(|d| PciBdf::from_str(&d.bdf).ok())
            .map(|b| b.device())
    }

    /// The id of the device in `slot`.
    fn id_in_slot(&self, slot: u8) -> Option<String> {
        self.dm()
            .pci_devices()
            .into_iter()
            .find(|d| PciBdf::from_str(&d.bdf).is_ok_and(|b| b.bus() == 0 && b.device() == slot))
            .map(|d| d.id)
    }

    /// `vm.remove-device`: 404 for an unknown id, 409 while a removal of it waits; an ACPI
    /// guest is asked to eject the slot and the reply waits; otherwise removed at once.
    pub fn remove_device(&mut self, id: String, reply: Responder<()>) {
        if let Some(slot) = self.pending.slot_of(&id) {
            return reply.send(Err(ApiError::Conflict(format!(
                "Device {id} is already being removed: waiting for the guest to eject PCI slot \
                 {slot}"
            ))));
        }
        let Some(slot) = self.slot_of(&id) else {
            return reply.send(Err(api_error(&DeviceManagerError::UnknownId {
                id: id.clone(),
            })));
        };
        let hotplug = self.hotplug.as_ref().filter(|_| self.acpi_guest);
        let Some(hp) = hotplug else {
            return reply.send(self.release(&id));
        };
        if let Err(e) = hp.request_eject(slot) {
            let message = format!(
                "Cannot ask the guest to eject {id} (PCI slot {slot}): {}",
                chain(&e)
            );
            warn!("{message}");
            return reply.send(Err(ApiError::Internal(message)));
        }
        info!(
            "vm.remove-device {id}: asked the guest to eject PCI slot {slot}; waiting up to {} s",
            self.eject_timeout.as_secs_f64()
        );
        self.pending.push(PendingRemoval {
            id,
            slot,
            reply,
            deadline: Instant::now() + self.eject_timeout,
        });
    }

    /// Removes device `id` from the VM; Ok also when steps of the teardown failed (they are
    /// logged: the device is gone either way).
    pub(super) fn release(&self, id: &str) -> ApiResult<()> {
        match self.dm().remove_device(id) {
            Ok(removed) => {
                info!(
                    "{}: removed from {} (host {}){}",
                    removed.id,
                    removed.bdf,
                    removed.host,
                    if removed.warnings.is_empty() {
                        String::new()
                    } else {
                        format!("; teardown warnings: {}", removed.warnings.join("; "))
                    }
                );
                Ok(())
            }
            Err(e) => Err(api_error(&e)),
        }
    }

    /// Removes the devices in the slots the guest ejected; returns the ids of the devices
    /// the guest gave up on its own (no removal was asked for them).
    pub fn on_ejects(&mut self) -> Vec<String> {
        let slots = match &self.ejects {
            Some(e) => e.drain(),
            None => return Vec::new(),
        };
        slots.into_iter().filter_map(|s| self.on_eject(s)).collect()
    }

    /// The guest ejected `slot`: finish the removal waiting on it, or remove what is there
    /// (the guest gave the device up on its own; its id is returned).
    pub fn on_eject(&mut self, slot: u8) -> Option<String> {
        if let Some(p) = self.pending.take_slot(slot) {
            info!("{}: the guest ejected PCI slot {slot}", p.id);
            let r = self.release(&p.id);
            p.reply.send(r);
            return None;
        }
        match self.id_in_slot(slot) {
            Some(id) => {
                info!("{id}: the guest ejected PCI slot {slot} on its own; removing the device");
                if let Err(e) = self.release(&id) {
                    warn!("{id}: {}", e.message());
                }
                Some(id)
            }
            None => {
                info!("The guest ejected PCI slot {slot}, which holds no device");
                None
            }
        }
    }

    /// After the VM stopped: the ejects it made last, then the removals still waiting (the
    /// devices are removed, the replies say so). Returns what [`Self::on_ejects`] returns.
    pub fn finish(&mut self) -> Vec<String> {
        let gone = self.on_ejects();
        for p in self.pending.take_all() {
            info!(
                "{}: the VM stopped before the guest ejected slot {}; removing it",
                p.id, p.slot
            );
            p.reply.send(self.release(&p.id));
        }
        gone
    }

    /// Removes the devices whose eject did not come in time (surprise removal) and answers.
    pub fn expire(&mut self, now: Instant) {
        for p in self.pending.take_expired(now) {
            warn!(
                "{}: the guest did not eject PCI slot {} within {} s; removing the device \
                 anyway (surprise removal)",
                p.id,
                p.slot,
                self.eject_timeout.as_secs_f64()
            );
            let r = self.release(&p.id);
            p.reply.send(r);
        }
    }
}
