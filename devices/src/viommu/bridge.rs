//! The seam between the guest-visible VT-d model and the host: [`ViommuBridge`].
//!
//! The model parses guest formats (root, context and PASID entries, QI descriptors, page
//! group responses) into the `ioasid` vocabulary and calls the bridge; the VMM implements the
//! bridge with `ioasid` (nesting, shadowing or the soft backend). The model never holds an
//! `IommuBackend` and the bridge never reads guest tables that the model owns (root, context,
//! PASID directory and tables); it does read the guest's I/O page tables (second-stage for a
//! shadow, first-stage for the soft backend), which are the device's address space.
//!
//! Keying: a device is its guest BDF; a translation context is (BDF, PASID), where requests
//! without a PASID use the context entry's RID_PASID (Linux: PASID 0).

use ioasid::{Invalidation, PageResponseCode, Pasid, VtdStage1};
use thiserror::Error;

use crate::pci::PciBdf;

/// A guest second-stage (VT-d "second-level") table: the shadow's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SecondStage {
    /// Guest physical address of the root table (SLPTPTR).
    pub root: u64,
    /// Paging levels: 3, 4 or 5 (from the entry's AW field).
    pub levels: u8,
    /// Second-level execute enable (SLEE).
    pub slee: bool,
    /// Second-level access/dirty enable (SLADE).
    pub slade: bool,
}

/// How one (BDF, PASID) translates, as the guest's context and PASID entries say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Translation {
    /// Not present, fault-processing disabled or blocked: every DMA faults.
    Blocked,
    /// Pass-through (PGTT = 100b, or translation disabled in GSTS): IOVA = GPA.
    PassThrough,
    /// Second-stage only (PGTT = 010b).
    SecondStage {
        /// The guest's domain id.
        did: u16,
        /// The table.
        table: SecondStage,
    },
    /// First-stage only (PGTT = 001b): nested over the host's GPA tables on the host.
    FirstStage {
        /// The guest's domain id.
        did: u16,
        /// The table, in the `ioasid` binding format.
        table: VtdStage1,
    },
}

/// Which guest domains an invalidation names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DomainScope {
    /// Every domain (global invalidation).
    All,
    /// One guest domain id.
    Domain(u16),
}

/// One guest invalidation, decoded from a QI descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GuestInvalidation {
    /// IOTLB or PASID-based IOTLB: `inv` within `scope`.
    Iotlb {
        /// The domains.
        scope: DomainScope,
        /// What to drop (`Invalidation::All`, `Pasid` or `Range`).
        inv: Invalidation,
    },
    /// Device-TLB (ATS) or PASID-based device-TLB of one device.
    DeviceTlb {
        /// The device (the descriptor's SID).
        bdf: PciBdf,
        /// The PASID, for a PASID-based device-TLB invalidation.
        pasid: Option<Pasid>,
        /// First address.
        addr: u64,
        /// Number of 4 KiB pages (`u64::MAX`: everything).
        npages: u64,
    },
}

/// A guest page group response (QI page group response descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestPageResponse {
    /// The device.
    pub bdf: PciBdf,
    /// The PASID of the group, if the request carried one.
    pub pasid: Option<Pasid>,
    /// Page request group index (9 bits).
    pub prgi: u16,
    /// The answer.
    pub code: PageResponseCode,
}

/// How the bridge honours one translation (for `vm.iommu` and the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BridgeMode {
    /// A nested HWPT on the host (hardware walks the guest's first-stage table).
    Nested,
    /// A host IOAS kept in sync with the guest's second-stage table.
    Shadow,
    /// The soft backend walks the guest table on each access (emulated device).
    Soft,
    /// Guest-physical addresses (pass-through or translation disabled).
    PassThrough,
    /// Every DMA is blocked.
    Blocked,
}

/// Why the bridge could not honour a request. The model turns it into a fault record (where
/// the spec has one) and a rate-limited warning; it never stops the VM.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// No device at this BDF is behind the vIOMMU.
    #[error("No device at {bdf} is behind the vIOMMU")]
    NoDevice {
        /// The BDF the guest named.
        bdf: PciBdf,
    },
    /// The translation cannot be honoured on this device's path (e.g. first stage for an
    /// assigned device on a host without nesting).
    #[error("{bdf} PASID {pasid}: {reason}")]
    Unsupported {
        /// The device.
        bdf: PciBdf,
        /// The PASID.
        pasid: Pasid,
        /// Why.
        reason: String,
    },
    /// A guest table points outside guest RAM or is malformed.
    #[error("{bdf} PASID {pasid}: bad guest table at {gpa:#x}: {reason}")]
    BadTable {
        /// The device.
        bdf: PciBdf,
        /// The PASID.
        pasid: Pasid,
        /// The guest address of the offending entry or table.
        gpa: u64,
        /// Why.
        reason: String,
    },
    /// The host refused (the `ioasid` error carries op, device, IOVA/PASID and errno).
    #[error("{bdf}: host IOMMU call failed")]
    Host {
        /// The device.
        bdf: PciBdf,
        /// The cause.
        #[source]
        source: ioasid::Error,
    },
}

/// The host side of the vIOMMU, implemented by the VMM. Calls come from the vCPU thread that
/// wrote the register (one doorbell = one call per kind), so implementations keep them short
/// and never block on the guest.
pub trait ViommuBridge: Send + Sync {
    /// (bdf, pasid) now translates as `t`. Called when the guest's context or PASID entry
    /// for it changed and the guest invalidated the context or PASID cache, when translation
    /// is enabled or disabled, and with [`Translation::Blocked`] when an entry is cleared.
    fn set_translation(
        &self,
        bdf: PciBdf,
        pasid: Pasid,
        t: Translation,
    ) -> Result<BridgeMode, BridgeError>;

    /// The guest's invalidations of one doorbell (queue head to tail), in queue order. The
    /// bridge turns them into at most one host invalidation call per nested HWPT, or one
    /// resync per shadow domain.
    fn invalidate(&self, batch: &[GuestInvalidation]) -> Result<(), BridgeError>;

    /// A page group response from the guest.
    fn page_response(&self, resp: GuestPageResponse) -> Result<(), BridgeError>;
}
