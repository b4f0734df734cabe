//! How a device model's interrupts leave it: the [`InterruptSink`] the VMM implements.
//!
//! The models in this crate never touch KVM. An MSI or MSI-X vector the guest enables
//! becomes a call to [`InterruptSink::msi_route`], which returns the eventfd whose signal
//! raises that vector (the VMM: an irqfd plus a GSI route). The model hands the eventfd to
//! the device (for VFIO, `VFIO_DEVICE_SET_IRQS`), so interrupts then flow device → eventfd →
//! KVM without passing through the model.
//!
//! Route changes a single guest write causes (enabling 2048 MSI-X vectors, disabling them)
//! are bracketed by [`RouteBatch`], so the VMM commits its routing table once per guest
//! write rather than once per vector.

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

/// A legacy interrupt pin, as the Interrupt Pin register names it (1 = INTA .. 4 = INTD).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IntxPin {
    /// INTA# (register value 1).
    A,
    /// INTB# (register value 2).
    B,
    /// INTC# (register value 3).
    C,
    /// INTD# (register value 4).
    D,
}

impl IntxPin {
    /// The pin an Interrupt Pin register value names; `None` for 0 (no pin) and values
    /// above 4 (reserved).
    pub fn from_register(v: u8) -> Option<Self> {
        match v {
            1 => Some(IntxPin::A),
            2 => Some(IntxPin::B),
            3 => Some(IntxPin::C),
            4 => Some(IntxPin::D),
            _ => None,
        }
    }

    /// The Interrupt Pin register value (1..=4).
    pub fn register(self) -> u8 {
        self.index() + 1
    }

    /// The pin number as routing tables count it (INTA = 0 .. INTD = 3).
    pub fn index(self) -> u8 {
        match self {
            IntxPin::A => 0,
            IntxPin::B => 1,
            IntxPin::C => 2,
            IntxPin::D => 3,
        }
    }
}

impl std::fmt::Display for IntxPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "INT{}", (b'A' + self.index()) as char)
    }
}

/// The eventfds of a level-triggered INTx line.
#[derive(Debug)]
pub struct IntxEventFds {
    /// Signalled by the device to assert the line. The line stays asserted until the guest
    /// EOIs it (with `resample`), or is pulsed once per signal (without).
    pub trigger: EventFd,
    /// Signalled by the VMM when the guest EOIs the line (after it was deasserted), so the
    /// device can be unmasked and re-assert. `None`: the line is pulsed per signal, and
    /// nothing reports the EOI.
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
    /// The VMM could not commit a batch of route changes.
    #[error("Cannot commit a batch of interrupt route changes")]
    Commit {
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

    /// The INTx line of this device's pin `pin`, if the VMM wires one. Called once when the
    /// device is created; the default is no INTx (the model then shows the guest no pin).
    fn intx(&self, pin: IntxPin) -> Option<IntxEventFds> {
        let _ = pin;
        None
    }

    /// Releases the INTx line [`Self::intx`] returned (the device is removed). The default
    /// does nothing.
    fn intx_release(&self) {}

    /// Starts a batch: the route changes up to the matching [`Self::end_route_batch`] may be
    /// committed together (the VMM: one `KVM_SET_GSI_ROUTING`). Batches nest. An eventfd
    /// [`Self::msi_route`] returns inside a batch may deliver only once the batch ends. The
    /// default commits each change at once. Use [`RouteBatch`] rather than calling this.
    fn begin_route_batch(&self) {}

    /// Ends a batch and commits what it deferred.
    fn end_route_batch(&self) -> Result<(), InterruptError> {
        Ok(())
    }
}

/// A batch of route changes on a sink, ended (and committed) by [`RouteBatch::finish`], or
/// on drop when an early return skips that (the commit error is then lost).
pub struct RouteBatch<'a> {
    sink: &'a dyn InterruptSink,
    open: bool,
}

impl<'a> RouteBatch<'a> {
    /// Starts a batch on `sink`.
    pub fn new(sink: &'a dyn InterruptSink) -> Self {
        sink.begin_route_batch();
        Self { sink, open: true }
    }

    /// Ends the batch: the sink commits the deferred changes.
    pub fn finish(mut self) -> Result<(), InterruptError> {
        self.open = false;
        self.sink.end_route_batch()
    }
}

impl Drop for RouteBatch<'_> {
    fn drop(&mut self) {
        if self.open {
            if let Err(e) = self.sink.end_route_batch() {
                log::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::IntxPin;

    #[test]
    fn pins_from_the_register() {
        assert_eq!(IntxPin::from_register(0), None);
        assert_eq!(IntxPin::from_register(5), None);
        for (v, pin, index, name) in [
            (1, IntxPin::A, 0, "INTA"),
            (2, IntxPin::B, 1, "INTB"),
            (3, IntxPin::C, 2, "INTC"),
            (4, IntxPin::D, 3, "INTD"),
        ] {
            assert_eq!(IntxPin::from_register(v), Some(pin));
            assert_eq!((pin.register(), pin.index()), (v, index));
            assert_eq!(pin.to_string(), name);
        }
    }
}
