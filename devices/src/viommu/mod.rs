//! The emulated Intel VT-d (scalable mode) that the guest programs itself.
//!
//! The guest's own intel-iommu driver is the client: it writes the registers, builds root,
//! context and PASID tables in its RAM, queues invalidations and reads page requests. This
//! module parses each guest format once, with explicit bounds, into the `ioasid` vocabulary
//! and hands the result to a [`bridge::ViommuBridge`] that the VMM implements; it reads and
//! writes guest memory only through [`mem::GuestMemoryAccess`] and raises its own interrupts
//! through [`mem::MsiSignal`].
//!
//! Modules:
//! - [`bridge`]: the host seam (translation per (BDF, PASID), invalidation batches, page
//!   responses);
//! - [`mem`]: guest memory, MSI and the DMA view for emulated devices.

pub mod bridge;
pub mod mem;

pub use bridge::{
    BridgeError, BridgeMode, DomainScope, GuestInvalidation, GuestPageResponse, SecondStage,
    Translation, ViommuBridge,
};
pub use mem::{DmaView, GuestMemoryAccess, GuestMemoryError, MsiSignal};
