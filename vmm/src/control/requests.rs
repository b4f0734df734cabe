//! Answering each API request from the VMM's state: the life cycle, the VM's devices (a
//! created but not booted VM takes devices into its configuration, as Cloud Hypervisor's
//! cold add), and introspection.

use std::os::fd::OwnedFd;

use api::types::{PciDeviceInfo, VmInfo};
use api::{ApiError, ApiRequest, ApiResult, DeviceConfig, Responder};
use log::debug;

use super::lifecycle::Instance;
use super::{info, Vmm};
use crate::device_manager::{check_device_config, DeviceManager, DeviceManagerError};

fn not_running() -> ApiError {
    ApiError::InvalidState("VM is not running".into())
}

impl Vmm<'_> {
    /// Answers one request. Everything answers at once, except a removal from an ACPI guest,
    /// which answers when the guest ejects (or at the timeout).
    pub(super) fn handle(&mut self, request: ApiRequest) {
        debug!("API request {}", request.name());
        match request {
            ApiRequest::Ping(r) => r.send(Ok(info::ping())),
            ApiRequest::VmInfo(r) => r.send(self.vm_info()),
            ApiRequest::VmCreate { config, reply } => reply.send(self.create(&config)),
            ApiRequest::VmBoot(r) => r.send(self.boot()),
            ApiRequest::VmPause(r) => r.send(self.pause()),
            ApiRequest::VmResume(r) => r.send(self.resume()),
            ApiRequest::VmReboot(r) => r.send(self.reboot()),
            ApiRequest::VmShutdown(r) => r.send(self.shutdown()),
            ApiRequest::VmDelete(r) => {
                self.delete_vm();
                r.send(Ok(()));
            }
            ApiRequest::VmmShutdown(r) => {
                self.delete_vm();
                r.send(Ok(()));
                log::info!("vmm.shutdown: exiting");
                self.exit = Some(Ok(0));
            }
            ApiRequest::AddDevice { config, fd, reply } => reply.send(self.add_device(config, fd)),
            ApiRequest::RemoveDevice { id, reply } => self.remove_device(id, reply),
            ApiRequest::Iommu(r) => r.send(self.with_dm(DeviceManager::iommu_info)),
            ApiRequest::Ioasids(r) => r.send(self.with_dm(DeviceManager::ioasids)),
            ApiRequest::Pasids(r) => r.send(self.with_dm(DeviceManager::pasids)),
            ApiRequest::Counters(r) => r.send(self.with_dm(DeviceManager::counters)),
        }
    }

    fn booted(&self) -> ApiResult<&Instance> {
        self.vm.as_ref().ok_or_else(not_running)
    }

    fn with_dm<T>(&self, f: impl FnOnce(&DeviceManager) -> T) -> ApiResult<T> {
        Ok(f(&self.booted()?.devices().dm()))
    }

    fn vm_info(&self) -> ApiResult<VmInfo> {
        let (Some(cfg), Some(state)) = (&self.config, self.state()) else {
            return Err(ApiError::NotFound("VM is not created".into()));
        };
        Ok(VmInfo {
            config: info::to_api(cfg),
            state,
            memory_actual_size: Some(cfg.memory.size),
            device_tree: self.vm.as_ref().map(|vm| vm.devices().dm().device_tree()),
        })
    }

    /// `vm.add-device`: to the booted VM (200 with its address), or to the configuration of
    /// a VM that is not booted (204). Either way the configuration keeps it, so the next boot
    /// has it too.
    fn add_device(
        &mut self,
        mut config: DeviceConfig,
        fd: Option<OwnedFd>,
    ) -> ApiResult<Option<PciDeviceInfo>> {
        let Some(cfg) = &self.config else {
            return Err(ApiError::NotFound("VM is not created".into()));
        };
        let keep = match &fd {
            Some(f) => Some(f.try_clone().map_err(|e| {
                ApiError::Internal(format!("Cannot duplicate the device's cdev fd: {e}"))
            })?),
            None => None,
        };
        let Some(vm) = &mut self.vm else {
            check_device_config(&config, fd.is_some())
                .map_err(|e| ApiError::BadRequest(e.to_string()))?;
            if let Some(id) = &config.id {
                if cfg.devices.iter().any(|d| d.id.as_ref() == Some(id)) {
                    return Err(ApiError::Conflict(format!(
                        "Device id {id} is already in use"
                    )));
                }
            }
            if let Some(p) = &config.path {
                if cfg.devices.iter().any(|d| d.path.as_ref() == Some(p)) {
                    return Err(ApiError::Conflict(format!(
                        "{} is already in the VM's configuration",
                        p.display()
                    )));
                }
            }
            log::info!("vm.add-device: added to the configuration of the VM (not booted)");
            self.push_config_device(config, keep);
            return Ok(None);
        };
        let added = vm.devices_mut().add_device(&config, fd)?;
        config.id = Some(added.id.clone());
        self.push_config_device(config, keep);
        Ok(Some(added))
    }

    fn push_config_device(&mut self, mut config: DeviceConfig, fd: Option<OwnedFd>) {
        config.fd = None;
        if let Some(cfg) = &mut self.config {
            cfg.devices.push(config);
            self.fds.resize_with(cfg.devices.len() - 1, || None);
            self.fds.push(fd);
        }
    }

    /// `vm.remove-device`: from the booted VM (see [`super::devices`]) and from the
    /// configuration.
    fn remove_device(&mut self, id: String, reply: Responder<()>) {
        if self.config.is_none() {
            return reply.send(Err(ApiError::NotFound("VM is not created".into())));
        }
        let in_config = self.take_config_device(&id);
        match &mut self.vm {
            Some(vm) => vm.devices_mut().remove_device(id, reply),
            None if in_config => reply.send(Ok(())),
            None => reply.send(Err(super::devices::api_error(
                &DeviceManagerError::UnknownId { id },
            ))),
        }
    }
}
