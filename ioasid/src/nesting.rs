//! Nesting: a nest-parent HWPT over the GPA IOAS (the RFC's "gpa_ioasid") and nested stage-1
//! HWPTs that bind a guest I/O page table with its format (the RFC's `IOASID_BIND_PGTABLE`).
//!
//! Capability first: [`alloc_nest_parent`] looks at the decoded capabilities before any
//! ioctl and returns [`NestParent::Unsupported`] — a typed result, not an error — when the
//! IOMMU cannot nest, so the caller can fall back to shadowing the guest tables.

use serde::{Deserialize, Serialize};

use crate::backend::IommuBackend;
use crate::caps::HwCaps;
use crate::error::{Error, Result};
use crate::types::{DevId, FaultId, HwptAlloc, HwptId, IoasId, Stage1Format};

/// The outcome of asking for a nest parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NestParent {
    /// The nest-parent HWPT over the IOAS.
    Parent(HwptId),
    /// The IOMMU cannot nest; shadow the guest's tables instead.
    Unsupported {
        /// Why, from the capabilities or from the kernel.
        reason: String,
    },
}

/// Allocates a nest-parent HWPT over `ioas` for `dev`, or says why nesting is unavailable.
pub fn alloc_nest_parent(
    backend: &dyn IommuBackend,
    caps: &HwCaps,
    dev: DevId,
    ioas: IoasId,
) -> Result<NestParent> {
    if let Some(reason) = caps.nesting_unsupported_reason() {
        return Ok(NestParent::Unsupported { reason });
    }
    match backend.hwpt_alloc(&HwptAlloc::nest_parent(dev, ioas)) {
        Ok(id) => Ok(NestParent::Parent(id)),
        // The capabilities said yes but the kernel said no (driver without nesting support).
        Err(e @ Error::Kernel { .. }) if e.errno() == Some(libc::EOPNOTSUPP) => {
            Ok(NestParent::Unsupported {
                reason: e.to_string(),
            })
        }
        Err(Error::Unsupported { op, backend }) => Ok(NestParent::Unsupported {
            reason: format!("{op} is not available on the {backend} backend"),
        }),
        Err(e) => Err(e),
    }
}

/// Binds a guest stage-1 table under a nest parent: allocates the nested HWPT. With `fault`,
/// I/O page faults of the HWPT go to that queue; with `pasid`, the HWPT may serve PASIDs.
pub fn bind_stage1(
    backend: &dyn IommuBackend,
    dev: DevId,
    parent: HwptId,
    format: Stage1Format,
    fault: Option<FaultId>,
    pasid: bool,
) -> Result<HwptId> {
    backend.hwpt_alloc(&HwptAlloc::nested(dev, parent, format, fault, pasid))
}
