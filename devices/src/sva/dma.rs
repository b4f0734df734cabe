//! How the engine's DMA leaves it: [`DeviceDma`], one access at (PASID, address) with the
//! request attributes (privileged, PRI), whose fixable faults hand back a pending page
//! request to wait on. [`ViewDma`] implements it over the vIOMMU's
//! [`DmaView`] (the VMM's soft backend); tests implement it with
//! fakes whose page requests they answer themselves.

use std::sync::Arc;
use std::time::Duration;

use ioasid::soft::PendingPageRequest;
use ioasid::{DmaError, DmaRequest, PageResponseCode, Pasid};

use crate::viommu::DmaView;

/// A page request the device sent and waits on.
pub trait PendingPage: Send {
    /// Waits up to `timeout` for the page group response; `None` when none came.
    fn wait(&self, timeout: Duration) -> Option<PageResponseCode>;
}

impl PendingPage for PendingPageRequest {
    fn wait(&self, timeout: Duration) -> Option<PageResponseCode> {
        PendingPageRequest::wait(self, timeout)
    }
}

/// Why one access did not complete.
pub enum AccessError {
    /// An unrecoverable translation fault (or a fault without PRI).
    Fault,
    /// A page request was sent; wait for its response, then retry or abort.
    PageRequest(Box<dyn PendingPage>),
    /// The page request was answered Invalid (by the path, not the device).
    Invalid,
    /// The page request was not answered in time (by the path, not the device).
    Timeout,
}

impl std::fmt::Debug for AccessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccessError::Fault => "Fault",
            AccessError::PageRequest(_) => "PageRequest",
            AccessError::Invalid => "Invalid",
            AccessError::Timeout => "Timeout",
        })
    }
}

impl From<DmaError> for AccessError {
    fn from(e: DmaError) -> Self {
        match e {
            DmaError::Fault(_) => AccessError::Fault,
            DmaError::PageRequest(p) => AccessError::PageRequest(Box::new(p)),
            DmaError::Aborted(_) => AccessError::Invalid,
            DmaError::Timeout(_) => AccessError::Timeout,
        }
    }
}

/// The engine's DMA at (PASID, address). The engine never crosses a 4 KiB page of the
/// address in one access.
pub trait DeviceDma: Send + Sync {
    /// Reads `buf.len()` bytes at `addr` in the context of `pasid` (`None`: without PASID).
    fn read(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), AccessError>;

    /// Writes `buf` at `addr` in the context of `pasid`.
    fn write(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), AccessError>;
}

/// [`DeviceDma`] over the vIOMMU's [`DmaView`] (its `read_with`/`write_with`).
pub struct ViewDma(pub Arc<dyn DmaView>);

impl DeviceDma for ViewDma {
    fn read(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), AccessError> {
        Ok(self.0.read_with(pasid, addr, buf, req)?)
    }

    fn write(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), AccessError> {
        Ok(self.0.write_with(pasid, addr, buf, req)?)
    }
}
