//! What the guest sees of each capability of an assigned device: pass, emulate or hide.
//! The table and reasons are in the [`crate::vfio`] module doc; this file is the code.

use crate::pci::config::{cap_id, ext_cap_id};

/// How a capability is presented to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapPolicy {
    /// In the list; reads come from the device; only the named writable registers reach it.
    Pass,
    /// In the list; registers are the model's own (the device never sees guest writes).
    Emulate,
    /// Unlinked from the list; its header reads as zero and writes are dropped.
    Hide,
}

/// The decision taken for one capability of one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapDecision {
    /// Offset in config space.
    pub offset: usize,
    /// Capability ID (standard IDs are 8-bit).
    pub id: u16,
    /// An extended (PCIe, ≥ 0x100) capability.
    pub extended: bool,
    /// Pass, emulate or hide.
    pub policy: CapPolicy,
    /// Why, in a few words (for logs and the device manager).
    pub reason: &'static str,
}

/// Facts about the device the decisions depend on.
#[derive(Clone, Copy, Debug, Default)]
pub struct CapContext {
    /// VFIO reports MSI vectors.
    pub msi_irqs: bool,
    /// VFIO reports MSI-X vectors and the table/PBA BARs exist.
    pub msix_usable: bool,
    /// The assignment enables PASID (a vPASID capability is synthesized).
    pub vpasid: bool,
}

/// The policy for a standard capability.
pub fn standard(id: u8, ctx: &CapContext) -> (CapPolicy, &'static str) {
    match id {
        cap_id::MSI if ctx.msi_irqs => (CapPolicy::Emulate, "vectors become InterruptSink routes"),
        cap_id::MSI => (CapPolicy::Hide, "VFIO reports no MSI vectors"),
        cap_id::MSIX if ctx.msix_usable => (
            CapPolicy::Emulate,
            "table trapped, vectors become InterruptSink routes",
        ),
        cap_id::MSIX => (
            CapPolicy::Hide,
            "VFIO reports no MSI-X vectors or the table BAR is missing",
        ),
        cap_id::PM => (
            CapPolicy::Pass,
            "power state handled by vfio-pci; PMCSR writable",
        ),
        cap_id::EXP => (
            CapPolicy::Pass,
            "device control/status (incl. FLR) writable; link control stays with the host",
        ),
        cap_id::VENDOR => (CapPolicy::Pass, "driver-private registers"),
        _ => (CapPolicy::Hide, "not modelled"),
    }
}

/// The policy for an extended capability.
pub fn extended(id: u16, ctx: &CapContext) -> (CapPolicy, &'static str) {
    match id {
        ext_cap_id::PASID if ctx.vpasid => (
            CapPolicy::Emulate,
            "vPASID synthesized for the ioasid layer",
        ),
        ext_cap_id::PASID => (CapPolicy::Hide, "assignment does not enable PASID"),
        ext_cap_id::ATS => (
            CapPolicy::Hide,
            "no device-TLB invalidation path in the vIOMMU; ATS stays host-owned",
        ),
        ext_cap_id::PRI => (CapPolicy::Hide, "page requests need the ioasid fault path"),
        ext_cap_id::DEV3 => (CapPolicy::Hide, "no uAPI to enable DMWr routing"),
        ext_cap_id::AER => (CapPolicy::Hide, "errors are handled by the host"),
        ext_cap_id::SRIOV => (CapPolicy::Hide, "VFs are the host's"),
        ext_cap_id::VSEC | ext_cap_id::DVSEC => (CapPolicy::Pass, "driver-private registers"),
        _ => (CapPolicy::Hide, "not modelled"),
    }
}
