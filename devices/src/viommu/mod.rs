//! The emulated Intel VT-d (scalable mode) that the guest programs itself.
//!
//! The guest's own intel-iommu driver is the client: it writes the registers, builds root,
//! context and PASID tables in its RAM, queues invalidations and reads page requests. This
//! module parses each guest format once, with explicit bounds, into the `ioasid` vocabulary
//! and hands the result to a [`bridge::ViommuBridge`] that the VMM implements; it reads and
//! writes guest memory only through [`mem::GuestMemoryAccess`] and raises its own interrupts
//! through [`mem::MsiSignal`].
//!
//! Modules, one per guest format or job:
//! - [`bridge`]: the host seam (translation per (BDF, PASID), invalidation batches, page
//!   responses);
//! - [`mem`]: guest memory, MSI and the DMA view for emulated devices;
//! - [`caps`]: the options ([`VtdConfig`]), their validation and the CAP/ECAP values, with
//!   decoders by name;
//! - [`regs`]: register offsets and bits;
//! - [`tables`]: root, context, PASID directory and PASID table parsers with fault reasons;
//! - [`qi`]: invalidation queue descriptors;
//! - [`fault`]: fault recording registers and the fault event;
//! - [`event`]: the mask/pending protocol of the unit's three interrupts;
//! - [`prq`]: the page request queue;
//! - [`vtd`]: the unit itself ([`Vtd`], a [`crate::bus::BusDevice`]);
//! - [`linux_harness`]: test support that programs a [`Vtd`] as Linux's intel-iommu does.
//!
//! # API for the VMM
//! Build one unit per DRHD with [`Vtd::new`]`(cfg, mem, bridge, msi)` ([`VtdConfig::validate`]
//! names an impossible option combination), insert it on the MMIO bus at the DRHD's register
//! base with length [`Vtd::MMIO_SIZE`], and call [`Vtd::add_device`] for every device in the
//! unit's scope before the guest boots (or on hot-plug) and [`Vtd::remove_device`] on unplug.
//! The unit calls the bridge from the vCPU thread that wrote the register: `set_translation`
//! when the guest enables or disables translation or invalidates a context or PASID cache
//! entry whose translation changed, `invalidate` once per batch of IOTLB/device-TLB
//! descriptors (before each wait descriptor and at the end of a doorbell), and
//! `page_response` for page group responses. A device starts in pass-through (the bridge is
//! not called for it until the guest enables translation). [`Vtd::cap`], [`Vtd::ecap`] with
//! [`cap_names`]/[`ecap_names`] feed `vm.iommu`; [`Vtd::counters`] feeds `vm.counters`;
//! [`Vtd::translation`] is the last translation sent for a (BDF, PASID); [`Vtd::status`]
//! is the guest-programmed state (GSTS, root table, queues);
//! [`Vtd::post_page_request`] queues a page request (a full queue returns
//! [`PrqError::Full`]: answer the device SUCCESS and count it; [`PrqError::Refused`] means
//! the guest's context entry does not take page requests: answer Invalid).
//!
//! Faults: the model reads guest tables when the guest invalidates a cache (caching mode),
//! not per DMA, so a malformed present entry is recorded then (fault recording registers,
//! fault event MSI) and the (BDF, PASID) becomes [`Translation::Blocked`]; a not-present
//! entry is just `Blocked`. Bridge errors `BadTable`/`Unsupported` are recorded as faults
//! too, with a rate-limited warning. A DMA that the VMM's path refused can be shown to the
//! guest with [`Vtd::record_dma_fault`].

pub mod bridge;
pub mod caps;
pub mod event;
pub mod fault;
pub mod linux_harness;
pub mod mem;
pub mod prq;
pub mod qi;
pub mod regs;
pub mod tables;
pub mod vtd;

#[cfg(test)]
mod tests;

pub use bridge::{
    BridgeError, BridgeMode, DomainScope, GuestInvalidation, GuestPageResponse, SecondStage,
    Translation, ViommuBridge,
};
pub use caps::{cap_names, ecap_names, VtdConfig, VtdConfigError};
pub use fault::DmaFaultKind;
pub use mem::{DmaView, GuestMemoryAccess, GuestMemoryError, MsiSignal};
pub use prq::{PageRequest, PrqError};
pub use vtd::{Vtd, VtdCounters, VtdStatus};
