//! Answering each API request, and acting on the guest's ejects and on eject timeouts.

use std::os::fd::OwnedFd;
use std::str::FromStr;
use std::time::Instant;

use api::types::{PciDeviceInfo, VmInfo, VmState};
use api::{ApiError, ApiRequest, ApiResult, DeviceConfig, Responder};
use devices::pci::PciBdf;
use log::{debug, info, warn};

use super::removals::PendingRemoval;
use super::{info as vm_info, Control};
use crate::device_manager::DeviceManagerError;

/// The REST status of a failed add. The device manager maps most errors; here the steps that
/// are the caller's fault get a 4xx: a host device that does not exist or is not usable
/// through VFIO (404, as Cloud Hypervisor answers a failed add), an fd that is not a VFIO cdev
/// (400), a slot already taken (409).
fn add_error(e: &DeviceManagerError) -> ApiError {
    match e {
        DeviceManagerError::Step { step, .. } => match *step {
            "resolving the device" => ApiError::NotFound(e.message()),
            "identifying the device" => ApiError::BadRequest(e.message()),
            "choosing the PCI slot" => ApiError::Conflict(e.message()),
            _ => e.to_api_error(),
        },
        _ => e.to_api_error(),
    }
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

impl Control {
    /// Answers one request. Add and introspection answer at once; a removal from an ACPI
    /// guest answers when the guest ejects (or at the timeout); shutdowns answer, then stop
    /// the vCPUs.
    pub fn handle(&mut self, request: ApiRequest) {
        debug!("API request {}", request.name());
        match request {
            ApiRequest::Ping(r) => r.send(Ok(vm_info::ping())),
            ApiRequest::VmInfo(r) => r.send(Ok(self.vm_info())),
            ApiRequest::AddDevice { config, fd, reply } => reply.send(self.add_device(&config, fd)),
            ApiRequest::RemoveDevice { id, reply } => self.remove_device(id, reply),
            ApiRequest::VmShutdown(r) => {
                r.send(Ok(()));
                self.shutdown("vm.shutdown");
            }
            ApiRequest::VmmShutdown(r) => {
                r.send(Ok(()));
                self.shutdown("vmm.shutdown");
            }
            ApiRequest::Iommu(r) => r.send(Ok(self.dm().iommu_info())),
            ApiRequest::Ioasids(r) => r.send(Ok(self.dm().ioasids())),
            ApiRequest::Pasids(r) => r.send(Ok(self.dm().pasids())),
            ApiRequest::Counters(r) => r.send(Ok(self.dm().counters())),
        }
    }

    fn shutdown(&mut self, why: &str) {
        if !self.stopping {
            info!("{why}: stopping the VM");
        }
        self.stopping = true;
        self.stopper.stop();
    }

    fn vm_info(&self) -> VmInfo {
        let dm = self.dm();
        let mut config = self.config.clone();
        if let Some(obj) = config.as_object_mut() {
            obj.insert(
                "devices".into(),
                serde_json::to_value(dm.pci_devices()).unwrap_or_default(),
            );
        }
        VmInfo {
            config,
            state: if self.stopping {
                VmState::Shutdown
            } else {
                VmState::Running
            },
            memory_actual_size: Some(self.memory_size),
            device_tree: Some(dm.device_tree()),
        }
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
            return reply.send(Err(
                DeviceManagerError::UnknownId { id: id.clone() }.to_api_error()
            ));
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
            Err(e) => Err(e.to_api_error()),
        }
    }

    /// The guest ejected `slot`: finish the removal waiting on it, or remove what is there
    /// (the guest gave the device up on its own).
    pub fn on_eject(&mut self, slot: u8) {
        if let Some(p) = self.pending.take_slot(slot) {
            info!("{}: the guest ejected PCI slot {slot}", p.id);
            let r = self.release(&p.id);
            return p.reply.send(r);
        }
        match self.id_in_slot(slot) {
            Some(id) => {
                info!("{id}: the guest ejected PCI slot {slot} on its own; removing the device");
                if let Err(e) = self.release(&id) {
                    warn!("{id}: {}", e.message());
                }
            }
            None => info!("The guest ejected PCI slot {slot}, which holds no device"),
        }
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
