//! The IOASID uAPI for ioasid-vmm.
//!
//! The 2021 `/dev/ioasid` RFC's concepts, as Linux realized them in iommufd:
//! an **IOAS** (the RFC's kernel-managed IOASID) that the VMM maps guest memory into; **HWPTs**
//! over it, including a nest parent (the RFC's "gpa_ioasid") and nested stage-1 HWPTs that
//! bind a guest I/O page table with its format (`IOASID_BIND_PGTABLE`); **invalidation**
//! batches (`IOASID_INVALIDATE_CACHE`); **fault queues** for I/O page faults; **PASIDs**; and
//! **capabilities** decoded from `IOMMU_GET_HW_INFO`, readable before any attach.
//!
//! Backends, chosen at run time behind [`backend::IommuBackend`]:
//! - `iommufd`: `/dev/iommu` and VFIO cdevs;
//! - `type1`: the legacy VFIO container/group;
//! - `soft`: a software IOMMU for emulated devices and hosts without one.
//!
//! Owns: every ioctl on `/dev/iommu` and `/dev/vfio/*` that concerns DMA and address spaces,
//! device bind/attach, and the decoding of IOMMU capabilities and errors.
//!
//! Must not touch: KVM, guest-visible device state (config space, BARs, interrupts: that is
//! `devices`), or VMM policy (which device goes where: that is the VMM's device manager).

pub mod backend;
pub mod caps;
pub mod error;
pub mod fault;
pub mod fault_types;
pub mod iommufd;
pub mod nesting;
pub mod pasid;
pub mod select;
pub mod soft;
pub mod sysfs;
#[doc(hidden)]
pub mod test_skip;
pub mod type1;
pub mod types;

pub use backend::{
    BackendKind, CopyRequest, FaultQueue, InvalidateOutcome, IommuBackend, MapFile, MapUser,
};
pub use caps::{HwCaps, HwInfo};
pub use error::{Ctx, Errno, Error, Op, Result};
pub use fault::{FaultCounters, FaultGroup, FaultHandler};
pub use fault_types::{
    FaultPerm, FaultReason, FaultRecord, PageFault, PageResponse, PageResponseCode,
    UnrecoverableFault,
};
pub use iommufd::{IommufdBackend, PinAccounting};
pub use nesting::{alloc_nest_parent, bind_stage1, NestParent};
pub use pasid::{PasidBinding, PasidError, PasidSpace};
pub use select::{choose, BackendChoice, HostFacts};
pub use soft::{DmaError, DmaRequest, HostRegion, SoftConfig, SoftFaultQueue, SoftIommu};
pub use sysfs::DeviceSpec;
pub use type1::Type1Backend;
pub use types::{
    Bdf, DevId, DeviceName, FaultId, HwptAlloc, HwptFlags, HwptId, Invalidation, IoasId, IovaRange,
    IovaRanges, Pasid, Perm, PtId, Stage1Format, VtdStage1,
};
