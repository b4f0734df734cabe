//! The ACPI Generic Event Device (GED, `ACPI0013`): how a hardware-reduced platform (no GPE
//! block) tells the guest "something changed".
//!
//! The VMM sets event bits, then pulses the GED's interrupt once. The guest's GED driver runs
//! `_EVT`, which reads (and so clears) the event register and calls the handler of each set
//! bit. Setting the bits before the pulse means no event is lost: an event that lands after
//! the guest read the register comes with a pulse of its own.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::irq::InterruptLine;

/// GED event bit: PCI devices were added or need removal; `_EVT` calls `\_SB.PCI0.PCNT`.
pub const GED_EVENT_PCI_HOTPLUG: u32 = 1 << 0;

/// The GED's pending events and its interrupt line.
pub struct Ged {
    events: AtomicU32,
    irq: Arc<dyn InterruptLine>,
}

impl std::fmt::Debug for Ged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ged")
            .field("events", &self.events.load(Ordering::Relaxed))
            .finish()
    }
}

impl Ged {
    /// A GED that raises `irq` (edge: one call is one interrupt).
    pub fn new(irq: Arc<dyn InterruptLine>) -> Self {
        Self {
            events: AtomicU32::new(0),
            irq,
        }
    }

    /// Records `events` and raises the interrupt once.
    pub fn raise(&self, events: u32) -> std::io::Result<()> {
        self.events.fetch_or(events, Ordering::SeqCst);
        self.irq.trigger()
    }

    /// The guest read of the event register: returns the pending events and clears them.
    pub fn take(&self) -> u32 {
        self.events.swap(0, Ordering::SeqCst)
    }

    /// The pending events, without clearing them.
    pub fn pending(&self) -> u32 {
        self.events.load(Ordering::SeqCst)
    }
}
