//! The VM's life cycle, as Cloud Hypervisor's: create, boot, pause, resume, shutdown,
//! reboot, delete; and what happens when the VM ends on its own.
//!
//! State errors answer with Cloud Hypervisor's status codes: a VM that is not created is 404
//! for `vm.boot`, `vm.reboot` and `vm.info`; every other request that the state forbids
//! (creating twice, booting a booted VM, pausing a VM that does not run, resuming one that is
//! not paused, shutting down one that is not booted) is 500.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::types::VmState;
use api::{ApiError, ApiErrorKind, ApiResult};
use kvm_bindings::kvm_clock_data;
use log::{error, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::devices::{VmDevices, VmDevicesSetup};
use super::ejects::{eject_channel, EjectReceiver};
use super::Vmm;
use crate::runner::{boot, exit_code, BootedVm, RunError};
use crate::vm::{VmExit, VmStopper};

/// How long `vm.pause` waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A booted VM and what watches it.
pub struct Instance {
    devices: VmDevices,
    stopper: Arc<VmStopper>,
    waiter: Option<JoinHandle<VmExit>>,
    exit_evt: EventFd,
    paused: bool,
    /// The guest clock when it was paused (restored at resume, so paused time does not
    /// count, as Cloud Hypervisor does).
    clock: Option<kvm_clock_data>,
    booted: BootedVm,
}

impl Instance {
    /// Starts watching `booted` (whose hotplug controller feeds `ejects`): a thread waits
    /// for its vCPUs and signals the eventfd.
    fn new(mut booted: BootedVm, ejects: EjectReceiver) -> Result<Instance, ApiError> {
        let internal = |what: &str, e: std::io::Error| {
            ApiError::Internal(format!("Cannot watch the booted VM: {what}: {e}"))
        };
        let running = booted
            .running
            .take()
            .ok_or_else(|| ApiError::Internal("The booted VM has no vCPUs running".into()))?;
        let stopper = running.stopper();
        let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| internal("eventfd", e))?;
        let notify = exit_evt.try_clone().map_err(|e| internal("eventfd", e))?;
        let waiter = std::thread::Builder::new()
            .name("vm-wait".into())
            .spawn(move || {
                let exit = running.wait();
                if let Err(e) = notify.write(1) {
                    error!("Cannot signal the VM's end to the control loop: {e}");
                }
                exit
            })
            .map_err(|e| internal("thread", e))?;
        Ok(Instance {
            devices: VmDevices::new(VmDevicesSetup {
                devices: booted.devices.clone(),
                hotplug: booted.hotplug.clone(),
                ejects: booted.hotplug.is_some().then_some(ejects),
                acpi_guest: booted.acpi_guest,
            }),
            stopper,
            waiter: Some(waiter),
            exit_evt,
            paused: false,
            clock: None,
            booted,
        })
    }

    /// The eventfd written when every vCPU stopped.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    /// The devices.
    pub fn devices(&self) -> &VmDevices {
        &self.devices
    }

    /// The devices, mutably.
    pub fn devices_mut(&mut self) -> &mut VmDevices {
        &mut self.devices
    }

    /// Running or paused.
    pub fn state(&self) -> VmState {
        if self.paused {
            VmState::Paused
        } else {
            VmState::Running
        }
    }

    /// Stops the vCPUs (a paused VM too), waits for them, and finishes the device side;
    /// returns how the VM ended and the ids of devices the guest gave up on its own. The
    /// devices are removed when `self` drops.
    fn stop(&mut self) -> (Option<VmExit>, Vec<String>) {
        self.stopper.stop();
        self.stopper.resume();
        let exit = self.waiter.take().and_then(|w| w.join().ok());
        let gone = self.devices.finish();
        (exit, gone)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // Never free the VM under running vCPUs.
        if self.waiter.is_some() {
            let _ = self.stop();
        }
    }
}

fn not_created() -> ApiError {
    ApiError::NotFound("VM is not created".into())
}

fn not_running() -> ApiError {
    ApiError::InvalidState("VM is not running".into())
}

impl Vmm<'_> {
    /// The VM's state for `vm.info`, when it is created.
    pub(super) fn state(&self) -> Option<VmState> {
        self.config.as_ref()?;
        Some(match &self.vm {
            Some(vm) => vm.state(),
            None if self.shut_down => VmState::Shutdown,
            None => VmState::Created,
        })
    }

    /// `vm.create`.
    pub(super) fn create(&mut self, config: &api::VmConfig) -> ApiResult<()> {
        if self.config.is_some() {
            return Err(ApiError::InvalidState(
                "VM is already created (vm.delete it first)".into(),
            ));
        }
        let cfg = super::info::from_api(config, self.api_socket.clone())?;
        info!(
            "vm.create: {} vCPU(s), {} MiB, {} device(s)",
            cfg.cpus.boot,
            cfg.memory.size >> 20,
            cfg.devices.len()
        );
        self.fds = cfg.devices.iter().map(|_| None).collect();
        self.config = Some(cfg);
        self.shut_down = false;
        Ok(())
    }

    /// Builds the VM from the configuration and starts it.
    pub(super) fn boot_vm(&mut self) -> Result<(), RunError> {
        let Some(cfg) = &self.config else {
            return Ok(());
        };
        let mut fds = Vec::with_capacity(self.fds.len());
        for f in &self.fds {
            fds.push(match f {
                Some(f) => Some(f.try_clone().map_err(|source| RunError::InheritedFd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(f),
                    source,
                })?),
                None => None,
            });
        }
        let (on_eject, ejects) = eject_channel().map_err(|e| {
            RunError::Devices(format!("Cannot create the guest-eject channel: {e}").into())
        })?;
        let booted = boot(cfg, fds, &*self.attach, on_eject)?;
        // The ids the device manager gave devices that came without one stay theirs.
        if let Some(cfg) = &mut self.config {
            for (d, a) in cfg.devices.iter_mut().zip(&booted.added) {
                d.id = Some(a.id.clone());
            }
        }
        let instance =
            Instance::new(booted, ejects).map_err(|e| RunError::Devices(e.to_string().into()))?;
        self.vm = Some(instance);
        self.generation += 1;
        self.shut_down = false;
        info!("VM booted");
        Ok(())
    }

    /// `vm.boot`.
    pub(super) fn boot(&mut self) -> ApiResult<()> {
        if self.config.is_none() {
            return Err(not_created());
        }
        if let Some(vm) = &self.vm {
            return Err(ApiError::InvalidState(format!(
                "VM is already booted (state {:?})",
                vm.state()
            )));
        }
        self.boot_vm()
            .map_err(|e| ApiError::from_chain(ApiErrorKind::Internal, &e))
    }

    /// `vm.pause`: parks every vCPU outside KVM_RUN and saves the guest clock.
    pub(super) fn pause(&mut self) -> ApiResult<()> {
        let Some(vm) = &mut self.vm else {
            return Err(not_running());
        };
        if vm.paused {
            return Err(ApiError::InvalidState("VM is already paused".into()));
        }
        if !vm.stopper.pause(PAUSE_TIMEOUT) {
            vm.stopper.resume();
            return Err(ApiError::Internal(format!(
                "The vCPUs did not stop within {} s; the VM keeps running",
                PAUSE_TIMEOUT.as_secs()
            )));
        }
        vm.clock = match vm.booted.vm.vm_fd().get_clock() {
            Ok(mut c) => {
                // Restored as a plain value: KVM_CLOCK_REALTIME would add the paused time.
                c.flags = 0;
                Some(c)
            }
            Err(e) => {
                warn!("vm.pause: KVM_GET_CLOCK failed ({e}); the guest clock runs on");
                None
            }
        };
        vm.paused = true;
        info!("VM paused");
        Ok(())
    }

    /// `vm.resume`.
    pub(super) fn resume(&mut self) -> ApiResult<()> {
        let Some(vm) = &mut self.vm else {
            return Err(not_running());
        };
        if !vm.paused {
            return Err(ApiError::InvalidState("VM is not paused".into()));
        }
        if let Some(c) = vm.clock.take() {
            if let Err(e) = vm.booted.vm.vm_fd().set_clock(&c) {
                warn!("vm.resume: KVM_SET_CLOCK failed ({e}); the guest sees the paused time");
            }
        }
        vm.stopper.resume();
        vm.paused = false;
        info!("VM resumed");
        Ok(())
    }

    /// Stops the booted VM, if any, and releases its devices; the configuration stays.
    pub(super) fn shutdown_vm(&mut self) -> Option<VmExit> {
        let mut vm = self.vm.take()?;
        let (exit, gone) = vm.stop();
        self.forget_devices(&gone);
        drop(vm);
        self.generation += 1;
        self.shut_down = true;
        info!("VM shut down; its devices are released");
        exit
    }

    /// `vm.shutdown`.
    pub(super) fn shutdown(&mut self) -> ApiResult<()> {
        if self.vm.is_none() {
            return Err(not_running());
        }
        self.shutdown_vm();
        Ok(())
    }

    /// `vm.reboot`: shutdown, then boot with the same configuration.
    pub(super) fn reboot(&mut self) -> ApiResult<()> {
        if self.config.is_none() || self.vm.is_none() {
            return Err(ApiError::NotFound("VM is not booted".into()));
        }
        self.shutdown_vm();
        self.boot()
    }

    /// Shuts the VM down, if booted, and forgets its configuration.
    pub(super) fn delete_vm(&mut self) {
        self.shutdown_vm();
        if self.config.take().is_some() {
            info!("VM deleted");
        }
        self.fds.clear();
        self.shut_down = false;
    }

    /// The VM ended on its own (the guest powered off or reset, or a vCPU failed): the VMM
    /// ends with the guest's exit code.
    pub(super) fn on_vm_end(&mut self) {
        let Some(exit) = self.shutdown_vm() else {
            return;
        };
        self.exit = Some(exit_code(exit));
    }

    /// The guest's ejects; a device the guest gave up on its own leaves the configuration.
    pub(super) fn on_ejects(&mut self) {
        let gone = match &mut self.vm {
            Some(vm) => vm.devices_mut().on_ejects(),
            None => return,
        };
        self.forget_devices(&gone);
    }

    /// Eject timeouts.
    pub(super) fn expire(&mut self, now: Instant) {
        if let Some(vm) = &mut self.vm {
            vm.devices_mut().expire(now);
        }
    }

    /// Removes the devices `ids` from the configuration (and their fds).
    pub(super) fn forget_devices(&mut self, ids: &[String]) {
        for id in ids {
            self.take_config_device(id);
        }
    }

    /// Removes device `id` from the configuration, with its fd; whether it was there.
    pub(super) fn take_config_device(&mut self, id: &str) -> bool {
        let Some(cfg) = &mut self.config else {
            return false;
        };
        let Some(i) = cfg.devices.iter().position(|d| d.id.as_deref() == Some(id)) else {
            return false;
        };
        cfg.devices.remove(i);
        if i < self.fds.len() {
            let _: Option<OwnedFd> = self.fds.remove(i);
        }
        true
    }
}
