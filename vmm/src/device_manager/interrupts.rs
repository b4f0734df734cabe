//! The KVM [`InterruptSink`]: one per assigned device, turning the model's MSI and MSI-X
//! vectors into GSI routes with irqfds.
//!
//! Each vector gets a GSI routed to its MSI message ([`GsiRouter::add_msi_route`]) and an
//! eventfd. The model hands the eventfd to VFIO, so the device signals KVM directly. Masking
//! deassigns the irqfd and leaves the eventfd alone: signals from the device accumulate in
//! its counter and nothing reaches the guest. Unmasking assigns the irqfd again, and KVM checks
//! the eventfd at assign time and injects once if it was signalled while masked. That is the
//! pending bit of the PCI spec. A masked vector keeps its GSI and route. The model brackets
//! the route changes of one guest write with a batch, which this sink maps to a
//! [`GsiRouter`] batch: one `KVM_SET_GSI_ROUTING` per guest write, not per vector. A masked
//! vector's new message is kept and written to KVM at unmask, so a guest that programs a
//! masked table (as Linux does) costs no commits until it unmasks.
//!
//! INTx: a sink made [`KvmInterruptSink::with_intx`] for the device's slot wires the pin the
//! model asks for to the IOAPIC GSI [`pci_intx_gsi`] gives (the DSDT's `_PRT` names the same
//! GSI): a trigger eventfd registered as a KVM irqfd with a resample eventfd. KVM keeps the
//! line asserted from the trigger until the guest EOIs it, then deasserts it and signals the
//! resample eventfd, which the model hands to VFIO as its unmask eventfd (or, when the device
//! refuses that, waits on itself and unmasks through VFIO: see `devices::vfio::intx`). If KVM
//! refuses the resample irqfd, the line is a plain irqfd (pulsed per trigger) and the model
//! gets no resample eventfd. Without a slot or an irqchip there is no INTx, and the model
//! shows the guest no interrupt pin.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::{
    InterruptError, InterruptSink, IntxEventFds, IntxPin, MsiKind, MsiMessage, MsiVector,
};
use kvm_ioctls::VmFd;
use log::{debug, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::irq::{self, GsiRouter, IrqError};
use crate::layout::pci_intx_gsi;

/// One routed vector.
#[derive(Debug)]
struct Route {
    gsi: u32,
    /// A duplicate of the eventfd the model gave VFIO (same file), for KVM_IRQFD.
    eventfd: EventFd,
    /// The irqfd is assigned (the vector is unmasked).
    delivering: bool,
    msg: MsiMessage,
    /// `msg` changed while masked and the KVM route still has the old one: it is written at
    /// unmask (a masked vector's route delivers nothing, so it may lag).
    stale: bool,
}

/// A vector's route as introspection shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteInfo {
    /// The vector.
    pub vector: MsiVector,
    /// Its GSI.
    pub gsi: u32,
    /// Whether it is masked (irqfd deassigned).
    pub masked: bool,
    /// The message it is routed to.
    pub address: u64,
    /// The message data.
    pub data: u32,
}

/// The wired INTx line of a device.
#[derive(Debug)]
struct IntxLine {
    pin: IntxPin,
    gsi: u32,
    /// The KVM side of the trigger eventfd (the model gave VFIO a duplicate).
    trigger: EventFd,
    /// The irqfd has a resample eventfd.
    resample: bool,
}

/// The INTx line as introspection and tests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IntxInfo {
    /// The pin the model asked for.
    pub pin: IntxPin,
    /// The IOAPIC GSI it is wired to.
    pub gsi: u32,
    /// The irqfd deasserts at EOI and signals a resample eventfd (false: pulsed per trigger).
    pub resample: bool,
}

/// The interrupt sink of one device.
pub struct KvmInterruptSink {
    device: String,
    router: Option<Arc<GsiRouter>>,
    routes: Mutex<BTreeMap<MsiVector, Route>>,
    /// The device's slot and the VM, for INTx (`None`: no INTx).
    intx_wiring: Option<(u8, Arc<VmFd>)>,
    intx: Mutex<Option<IntxLine>>,
}

impl std::fmt::Debug for KvmInterruptSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmInterruptSink")
            .field("device", &self.device)
            .field("routes", &self.lock().len())
            .finish()
    }
}

fn kind_name(kind: MsiKind) -> &'static str {
    match kind {
        MsiKind::Msi => "MSI",
        MsiKind::Msix => "MSI-X",
    }
}

fn route_err(vector: MsiVector, e: IrqError) -> InterruptError {
    InterruptError::Route {
        vector,
        source: io::Error::other(e),
    }
}

fn not_routed(vector: MsiVector) -> InterruptError {
    InterruptError::Route {
        vector,
        source: io::Error::new(io::ErrorKind::NotFound, "The vector has no route"),
    }
}

fn kvm_msg(msg: MsiMessage) -> irq::MsiMessage {
    irq::MsiMessage {
        address: msg.address,
        data: msg.data,
    }
}

impl KvmInterruptSink {
    /// A sink for `device` (its id, for logs). Without a router (no in-kernel irqchip) every
    /// route request fails with [`IrqError::NoIrqchip`].
    pub fn new(device: &str, router: Option<Arc<GsiRouter>>) -> Self {
        Self {
            device: device.to_string(),
            router,
            routes: Mutex::new(BTreeMap::new()),
            intx_wiring: None,
            intx: Mutex::new(None),
        }
    }

    /// Wires INTx for a device in root-bus slot `slot` of `vm` (used only when the sink has a
    /// router, i.e. the VM has an in-kernel irqchip).
    pub fn with_intx(mut self, slot: u8, vm: Arc<VmFd>) -> Self {
        self.intx_wiring = Some((slot, vm));
        self
    }

    fn intx_lock(&self) -> MutexGuard<'_, Option<IntxLine>> {
        self.intx.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The wired INTx line, if the model asked for one.
    pub fn intx_info(&self) -> Option<IntxInfo> {
        self.intx_lock().as_ref().map(|l| IntxInfo {
            pin: l.pin,
            gsi: l.gsi,
            resample: l.resample,
        })
    }

    /// Registers the INTx irqfd on `gsi`: with a resample eventfd when KVM allows it.
    fn wire_intx(
        &self,
        vm: &VmFd,
        pin: IntxPin,
        gsi: u32,
    ) -> Result<(IntxLine, IntxEventFds), String> {
        let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let for_model = trigger
            .try_clone()
            .map_err(|e| format!("eventfd dup: {e}"))?;
        let resample = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let with_resample = match vm.register_irqfd_with_resample(&trigger, &resample, gsi) {
            Ok(()) => true,
            Err(e) => {
                info!(
                    "{}: KVM_IRQFD with resample on GSI {gsi} failed ({e}); INTx {pin} falls \
                     back to an irqfd that pulses the line",
                    self.device
                );
                vm.register_irqfd(&trigger, gsi)
                    .map_err(|e| format!("KVM_IRQFD on GSI {gsi}: {e}"))?;
                false
            }
        };
        Ok((
            IntxLine {
                pin,
                gsi,
                trigger,
                resample: with_resample,
            },
            IntxEventFds {
                trigger: for_model,
                resample: with_resample.then_some(resample),
            },
        ))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<MsiVector, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn router(&self, vector: MsiVector) -> Result<&Arc<GsiRouter>, InterruptError> {
        self.router
            .as_ref()
            .ok_or_else(|| route_err(vector, IrqError::NoIrqchip))
    }

    /// The vectors routed now.
    pub fn routes(&self) -> Vec<RouteInfo> {
        self.lock()
            .iter()
            .map(|(v, r)| RouteInfo {
                vector: *v,
                gsi: r.gsi,
                masked: !r.delivering,
                address: r.msg.address,
                data: r.msg.data,
            })
            .collect()
    }

    /// Releases every route and the INTx line (device removal; the model normally releases
    /// them first).
    pub fn release_all(&self) {
        let vectors: Vec<MsiVector> = self.lock().keys().copied().collect();
        for v in vectors {
            self.msi_release(v);
        }
        self.intx_release();
    }
}

impl InterruptSink for KvmInterruptSink {
    fn msi_route(
        &self,
        vector: MsiVector,
        msg: MsiMessage,
        masked: bool,
    ) -> Result<EventFd, InterruptError> {
        let router = self.router(vector)?.clone();
        // A vector routed twice (the model re-enabling without a release) replaces the old route.
        if self.lock().contains_key(&vector) {
            self.msi_release(vector);
        }
        let gsi = router
            .add_msi_route(kvm_msg(msg))
            .map_err(|e| route_err(vector, e))?;
        let undo = |e: InterruptError| {
            if let Err(r) = router.remove_msi_route(gsi) {
                warn!("{}: {r}", self.device);
            }
            e
        };
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| undo(InterruptError::Route { vector, source }))?;
        let for_model = eventfd
            .try_clone()
            .map_err(|source| undo(InterruptError::Route { vector, source }))?;
        if !masked {
            router
                .register_irqfd(&eventfd, gsi)
                .map_err(|e| undo(route_err(vector, e)))?;
        }
        // Per vector and guest-driven (2048 per MSI-X enable): debug, not info.
        debug!(
            "{}: {} vector {} routed to GSI {gsi} (address {:#x}, data {:#x}){}",
            self.device,
            kind_name(vector.kind),
            vector.index,
            msg.address,
            msg.data,
            if masked { ", masked" } else { "" }
        );
        self.lock().insert(
            vector,
            Route {
                gsi,
                eventfd,
                delivering: !masked,
                msg,
                stale: false,
            },
        );
        Ok(for_model)
    }

    fn msi_update(&self, vector: MsiVector, msg: MsiMessage) -> Result<(), InterruptError> {
        let router = self.router(vector)?;
        let mut routes = self.lock();
        let Some(r) = routes.get_mut(&vector) else {
            return Err(not_routed(vector));
        };
        if r.msg == msg {
            return Ok(());
        }
        if !r.delivering {
            // Masked: nothing can be delivered through the route, so the table commit waits
            // for the unmask. Linux programs every entry of a masked function this way.
            r.msg = msg;
            r.stale = true;
            return Ok(());
        }
        router
            .update_msi_route(r.gsi, kvm_msg(msg))
            .map_err(|e| route_err(vector, e))?;
        r.msg = msg;
        debug!(
            "{}: {} vector {} (GSI {}) now targets address {:#x}, data {:#x}",
            self.device,
            kind_name(vector.kind),
            vector.index,
            r.gsi,
            msg.address,
            msg.data
        );
        Ok(())
    }

    fn msi_mask(&self, vector: MsiVector, masked: bool) -> Result<(), InterruptError> {
        let router = self.router(vector)?;
        let mut routes = self.lock();
        let Some(r) = routes.get_mut(&vector) else {
            return Err(not_routed(vector));
        };
        if r.delivering != masked {
            return Ok(());
        }
        if masked {
            router
                .unregister_irqfd(&r.eventfd, r.gsi)
                .map_err(|e| route_err(vector, e))?;
        } else {
            if r.stale {
                router
                    .update_msi_route(r.gsi, kvm_msg(r.msg))
                    .map_err(|e| route_err(vector, e))?;
                r.stale = false;
            }
            // KVM polls the eventfd when the irqfd is assigned: a signal that arrived while
            // masked is injected now.
            router
                .register_irqfd(&r.eventfd, r.gsi)
                .map_err(|e| route_err(vector, e))?;
        }
        r.delivering = !masked;
        Ok(())
    }

    fn intx(&self, pin: IntxPin) -> Option<IntxEventFds> {
        let (slot, vm) = self.intx_wiring.as_ref()?;
        if self.router.is_none() {
            info!("{}: no INTx: the VM has no in-kernel irqchip", self.device);
            return None;
        }
        // Asked again (a model rebuilt on the same sink): the old line goes first.
        self.intx_release();
        let gsi = pci_intx_gsi(*slot, pin.index());
        match self.wire_intx(vm, pin, gsi) {
            Ok((line, fds)) => {
                info!(
                    "{}: INTx {pin} of slot {slot} wired to GSI {gsi} (level, {})",
                    self.device,
                    if line.resample {
                        "deasserted at EOI, resample eventfd"
                    } else {
                        "pulsed per trigger"
                    }
                );
                *self.intx_lock() = Some(line);
                Some(fds)
            }
            Err(e) => {
                warn!(
                    "{}: INTx {pin} cannot be wired to GSI {gsi}: {e}; the guest sees no                      interrupt pin",
                    self.device
                );
                None
            }
        }
    }

    fn intx_release(&self) {
        let Some(line) = self.intx_lock().take() else {
            return;
        };
        if let Some((_, vm)) = &self.intx_wiring {
            if let Err(e) = vm.unregister_irqfd(&line.trigger, line.gsi) {
                warn!(
                    "{}: KVM_IRQFD deassign of INTx on GSI {}: {e}",
                    self.device, line.gsi
                );
            }
        }
        info!(
            "{}: INTx {} released (GSI {})",
            self.device, line.pin, line.gsi
        );
    }

    fn begin_route_batch(&self) {
        if let Some(router) = &self.router {
            router.begin_batch();
        }
    }

    fn end_route_batch(&self) -> Result<(), InterruptError> {
        match &self.router {
            Some(router) => router.end_batch().map_err(|e| InterruptError::Commit {
                source: io::Error::other(e),
            }),
            None => Ok(()),
        }
    }

    fn msi_release(&self, vector: MsiVector) {
        let Some(r) = self.lock().remove(&vector) else {
            return;
        };
        let Some(router) = self.router.as_ref() else {
            return;
        };
        if r.delivering {
            if let Err(e) = router.unregister_irqfd(&r.eventfd, r.gsi) {
                warn!("{}: {e}", self.device);
            }
        }
        if let Err(e) = router.remove_msi_route(r.gsi) {
            warn!("{}: {e}", self.device);
        }
        debug!(
            "{}: {} vector {} released (GSI {})",
            self.device,
            kind_name(vector.kind),
            vector.index,
            r.gsi
        );
    }
}

impl Drop for KvmInterruptSink {
    fn drop(&mut self) {
        self.release_all();
    }
}
