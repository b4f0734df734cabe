//! The host side of the vIOMMU: [`VtdBridge`] implements the `devices` crate's
//! [`ViommuBridge`](devices::viommu::ViommuBridge) with `ioasid`, plus the guest memory and
//! MSI the VT-d model needs.
//!
//! Owns: the translation of guest intent (per (BDF, PASID): blocked, pass-through,
//! second-stage, first-stage; invalidation batches) into host objects, on three paths chosen
//! per device from the host's decoded capabilities:
//! - **shadow** ([`shadow`]): assigned device, host without nesting (every machine here): a
//!   host IOAS per guest domain, the guest's second-stage table mirrored into it with
//!   `IOAS_COPY` from the guest-RAM IOAS, coalesced, resynced on invalidation;
//! - **nested** ([`nested`]): assigned device, host with nesting: a nest parent over the
//!   guest-RAM IOAS, a nested HWPT per guest first-stage table, guest IOTLB invalidations
//!   forwarded as one `HWPT_INVALIDATE` batch per nested HWPT per doorbell;
//! - **soft** ([`soft_path`]): emulated device: the soft backend walks the guest's tables per
//!   access (first-stage: soft nested HWPT; second-stage: soft second-level HWPT).
//!
//! Must not touch: the guest-visible model (registers, root/context/PASID tables, QI: that is
//! `devices::viommu`), the device manager's attach of devices to the guest-RAM IOAS, KVM
//! beyond `KVM_SIGNAL_MSI`.
//!
//! API for the device manager and the runner:
//! - [`VtdBridge::new`]`(backend, ram_ioas, ram_regions)`: one per VM, over the VM's backend
//!   and the IOAS that maps guest RAM at IOVA = GPA;
//! - [`VtdBridge::add_assigned`]`(bdf, dev, caps)`: an assigned device, already attached to
//!   the guest-RAM IOAS (pass-through until the guest enables translation);
//! - [`VtdBridge::add_emulated`]`(bdf, soft, dev)` → `Arc<dyn DmaView>`: an emulated device
//!   registered on a soft backend; its DMA goes through the returned view;
//! - [`VtdBridge::remove`]`(bdf)` → [`Released`]: detaches the device's PASIDs and RID from
//!   the bridge's objects (re-attaching nothing) and destroys its nested HWPTs, nest parent
//!   and the shadow IOASes no other device uses;
//! - [`VtdBridge::supports_first_stage`]`(bdf)`: whether the unit covering `bdf` may
//!   advertise ECAP.FSTS (emulated, or assigned on a host that nests);
//! - [`VtdBridge::devices`] → [`DeviceView`]s for `vm.iommu` ([`DeviceView::to_json`]);
//!   [`VtdBridge::counters`] → [`BridgeCounters`] for `vm.counters`;
//! - [`VmGuestMemory`] ([`GuestMemoryAccess`](devices::viommu::GuestMemoryAccess) over the
//!   VM's guest memory) and [`KvmMsiSignal`] ([`MsiSignal`](devices::viommu::MsiSignal) over
//!   `KVM_SIGNAL_MSI`) for the model.
//!
//! PASID 0 is the guest's RID_PASID (Linux's choice): it is the device's requests without
//! PASID on the host. Every other guest PASID the guest gives a translation is bound to a
//! host PASID in the VM's [`ioasid::PasidSpace`] ([`VtdBridge::with_pasid_space`]: the
//! device manager's, shown in `vm.pasids`) and attaches with `attach(dev, Some(host), ..)`;
//! a PASID wider than the device's PASID capability is refused. An emulated device's
//! [`SoftDma`] issues its requests with the host PASID.
//!
//! The fault path ([`prq`]): host page requests (the soft backend's fault queue, or
//! iommufd's) go to the guest's PRQ, the guest's page group responses back to the host;
//! [`FaultPump`] is the thread that moves them.

pub mod bridge;
pub mod guest_mem;
pub mod msi;
pub mod nested;
pub mod prq;
pub mod shadow;
pub mod soft_path;
pub mod view;

pub use bridge::{
    BridgeLimits, DevTlbHook, PasidView, VtdBridge, EMULATED_PASID_BITS, EMULATED_SPACE_TAG,
    PAGE_REQUEST_TIMEOUT,
};
pub use guest_mem::{RamMap, RamTables, VmGuestMemory};
pub use msi::KvmMsiSignal;
pub use nested::{selftest_iotlb_tag, HostFormat};
pub use prq::{FaultPump, PumpReport};
pub use soft_path::{HostPasids, SoftDma};
pub use view::{mode_name, BridgeCounters, DevicePath, DeviceView, Released};
