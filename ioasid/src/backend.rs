//! The backend seam: one API over iommufd, legacy VFIO type1 and the soft IOMMU.
//!
//! Callers hold an `Arc<dyn IommuBackend>` and never know which one they have. A backend that
//! cannot do something returns [`Error::Unsupported`](crate::Error::Unsupported) (type1 has no
//! HWPTs, for example); it never pretends.

use std::fmt;
use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::fault_types::{FaultRecord, PageResponse};
use crate::types::{
    DevId, FaultId, HwptAlloc, HwptId, Invalidation, IoasId, IovaRange, IovaRanges, Pasid, Perm,
    PtId,
};

/// Which backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `/dev/iommu` with VFIO cdevs.
    Iommufd,
    /// The legacy VFIO container with the type1 IOMMU.
    Type1,
    /// The software IOMMU.
    Soft,
}

impl BackendKind {
    /// The name users type (`--platform iommufd=...`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Iommufd => "iommufd",
            BackendKind::Type1 => "type1",
            BackendKind::Soft => "soft",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A request to map process memory into an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapUser {
    /// The IOVA, or `None` to let the backend choose one.
    pub iova: Option<u64>,
    /// Start of the process virtual range.
    pub user_va: u64,
    /// Length in bytes.
    pub len: u64,
    /// DMA permissions.
    pub perm: Perm,
}

/// A request to map a range of a memfd (or a VFIO dma-buf) into an IOAS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapFile {
    /// The IOVA, or `None` to let the backend choose one.
    pub iova: Option<u64>,
    /// The file.
    pub fd: RawFd,
    /// Offset into the file.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// DMA permissions.
    pub perm: Perm,
}

/// A request to copy mappings from one IOAS to another, sharing the pinned pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRequest {
    /// Source IOAS.
    pub src: IoasId,
    /// Source IOVA.
    pub src_iova: u64,
    /// Destination IOAS.
    pub dst: IoasId,
    /// Destination IOVA, or `None` to let the backend choose.
    pub dst_iova: Option<u64>,
    /// Length in bytes.
    pub len: u64,
    /// Permissions of the copy (at most those of the source).
    pub perm: Perm,
}

/// The result of an invalidation batch that the backend handled completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidateOutcome {
    /// Entries handled (all of them).
    pub handled: u32,
}

/// A fault queue: a pollable fd plus typed reads and page responses.
pub trait FaultQueue: Send + fmt::Debug {
    /// The queue's id, to pass in [`HwptAlloc::fault`].
    fn id(&self) -> FaultId;
    /// A non-blocking fd that becomes readable when records are pending (epoll-friendly).
    fn as_raw_fd(&self) -> RawFd;
    /// Reads the pending records without blocking (empty when none).
    fn read_records(&mut self) -> Result<Vec<FaultRecord>>;
    /// Answers one page request group.
    fn respond(&mut self, response: PageResponse) -> Result<()>;
}

/// The operations every backend provides (or refuses with `Unsupported`).
pub trait IommuBackend: Send + Sync + fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Allocates an IOAS.
    fn ioas_alloc(&self) -> Result<IoasId>;
    /// Destroys any object: IOAS, HWPT or fault queue.
    fn destroy(&self, id: u32) -> Result<()>;

    /// Maps process memory; returns the IOVA used.
    ///
    /// # Safety
    ///
    /// `[user_va, user_va + len)` must stay mapped in this process, and must not be accessed
    /// through Rust references, until it is unmapped from the IOAS: a device may read and
    /// write it at any time (the same contract as `vfio_ioctls::VfioOps::vfio_dma_map`).
    unsafe fn ioas_map(&self, ioas: IoasId, req: &MapUser) -> Result<u64>;
    /// Maps a file range (memfd); returns the IOVA used.
    fn ioas_map_file(&self, ioas: IoasId, req: &MapFile) -> Result<u64>;
    /// Unmaps `[iova, iova + len)`; returns the bytes unmapped.
    fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64>;
    /// Unmaps everything; returns the bytes unmapped.
    fn ioas_unmap_all(&self, ioas: IoasId) -> Result<u64>;
    /// Copies mappings between IOASes; returns the destination IOVA.
    fn ioas_copy(&self, req: &CopyRequest) -> Result<u64>;
    /// The IOVA windows and alignment of an IOAS.
    fn iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges>;
    /// Restricts the IOVAs the backend may choose itself.
    fn allow_iovas(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()>;

    /// Attaches a device (or one of its PASIDs) to an IOAS or HWPT; attaching again replaces.
    fn attach(&self, dev: DevId, pasid: Option<Pasid>, pt: PtId) -> Result<()>;
    /// Detaches a device (or one of its PASIDs).
    fn detach(&self, dev: DevId, pasid: Option<Pasid>) -> Result<()>;

    /// Allocates a HWPT: paging, nest parent, or nested stage-1.
    fn hwpt_alloc(&self, req: &HwptAlloc) -> Result<HwptId>;
    /// Sends an invalidation batch to a HWPT in one call.
    fn hwpt_invalidate(&self, hwpt: HwptId, batch: &[Invalidation]) -> Result<InvalidateOutcome>;
    /// Allocates a fault queue.
    fn fault_queue_alloc(&self) -> Result<Box<dyn FaultQueue>>;
}
