//! How a device model's interrupts leave it: the [`InterruptSink`] the VMM implements.
//!
//! The models in this crate never touch KVM. An MSI or MSI-X vector the guest enables
//! becomes a call to [`InterruptSink::msi_route`], which returns the eventfd whose signal
//! raises that vector (the VMM: an irqfd plus a GSI route). The model hands the eventfd to
//! the device (for VFIO, `VFIO_DEVICE_SET_IRQS`), so interrupts then flow device → eventfd →
//! KVM without passing through the model.

use std::io;

use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

/// Which message-signalled interrupt mechanism a vector belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MsiKind {
    /// MSI (the MSI capability, up to 32 vectors).
    Msi,
    /// MSI-X (the table in a BAR, up to 2048 vectors).
    Msix,
}

/// One vector of one mechanism.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsiVector {
    /// MSI or MSI-X.
    pub kind: MsiKind,
    /// Vector index (MSI-X table entry, or MSI vector number).
    pub index: u16,
}

/// The write a vector makes: the guest-programmed address and data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (64-bit).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// The eventfds of a level-triggered INTx line.
#[derive(Debug)]
pub struct IntxEventFds {
    /// Signalled by the device to assert the line.
    pub trigger: EventFd,
    /// Signalled by the VMM when the guest EOIs, so the device can re-assert (may be absent).
    pub resample: Option<EventFd>,
}

/// An interrupt routing failure in the VMM.
#[derive(Debug, Error)]
pub enum InterruptError {
    /// The VMM could not create or update the route.
    #[error("Cannot route interrupt vector {vector:?}")]
    Route {
        /// The vector.
        vector: MsiVector,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

/// Where a device model's interrupts go. Implemented by the VMM (KVM irqfd + GSI routes),
/// and by fakes in tests.
pub trait InterruptSink: Send + Sync {
    /// Creates the route of `vector` to `msg` and returns the eventfd whose signal raises it.
    /// Called once per vector when the guest enables MSI or MSI-X. `masked` says whether the
    /// vector starts masked (the route must then not deliver until [`Self::msi_mask`] unmasks
    /// it; a signal while masked stays pending).
    fn msi_route(
        &self,
        vector: MsiVector,
        msg: MsiMessage,
        masked: bool,
    ) -> Result<EventFd, InterruptError>;

    /// Points an existing route at a new message (the guest rewrote address or data).
    fn msi_update(&self, vector: MsiVector, msg: MsiMessage) -> Result<(), InterruptError>;

    /// Masks or unmasks a vector.
    fn msi_mask(&self, vector: MsiVector, masked: bool) -> Result<(), InterruptError>;

    /// Tears a route down (the guest disabled MSI/MSI-X, or the device is removed).
    fn msi_release(&self, vector: MsiVector);

    /// The INTx line of this device, if the VMM wires one. Called once when the device is
    /// created; the default is no INTx.
    fn intx(&self) -> Option<IntxEventFds> {
        None
    }
}
