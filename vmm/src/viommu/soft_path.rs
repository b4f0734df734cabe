//! The soft path: an emulated device DMAs through the soft backend, which walks the guest's
//! own tables on each access through its PASID-tagged IOTLB (no shadow copy).
//!
//! Per soft backend instance, the bridge keeps a guest-RAM IOAS (RAM at IOVA = GPA) and, per
//! device, a nest parent over it; a guest first-stage table becomes a soft nested HWPT
//! (`Stage1Format::VtdS1`), a guest second-stage table a soft second-level HWPT
//! ([`SoftIommu::hwpt_alloc_second_level`]), both replaced when the guest's entry changes and
//! invalidated with `hwpt_invalidate` when the guest invalidates.

use std::sync::Arc;

use devices::viommu::DmaView;
use ioasid::soft::SoftIommu;
use ioasid::{DevId, DmaError, DmaRequest, IoasId, IommuBackend, MapUser, Pasid, Perm};

use super::guest_mem::RamMap;

/// The host PASID of a guest context: PASID 0 (RID_PASID) is the requests without PASID.
pub fn host_pasid(pasid: Pasid) -> Option<Pasid> {
    (pasid.0 != 0).then_some(pasid)
}

/// Allocates a guest-RAM IOAS in `soft` and maps every RAM region at IOVA = GPA.
pub(crate) fn map_ram_ioas(soft: &SoftIommu, ram: &RamMap) -> ioasid::Result<IoasId> {
    let ioas = soft.ioas_alloc()?;
    for r in ram.regions() {
        // SAFETY: `host_addr..+size` is the VM's guest RAM mapping, which lives as long as
        // the VM and is only accessed through volatile accessors and raw pointers, never
        // through Rust references. The soft backend also refuses (EFAULT) any range that is
        // not inside the regions it was built over, so a wrong address cannot be mapped.
        let res = unsafe {
            soft.ioas_map(
                ioas,
                &MapUser {
                    iova: Some(r.gpa),
                    user_va: r.host_addr,
                    len: r.size,
                    perm: Perm::RW,
                },
            )
        };
        if let Err(e) = res {
            let _ = soft.destroy(ioas.0);
            return Err(e);
        }
    }
    Ok(ioas)
}

/// An emulated device's DMA through the soft backend.
#[derive(Debug)]
pub struct SoftDma {
    soft: Arc<SoftIommu>,
    dev: DevId,
}

impl SoftDma {
    /// The DMA of `dev` on `soft`.
    pub fn new(soft: Arc<SoftIommu>, dev: DevId) -> Self {
        SoftDma { soft, dev }
    }
}

fn host(pasid: Option<Pasid>) -> Option<Pasid> {
    pasid.and_then(host_pasid)
}

impl DmaView for SoftDma {
    fn read(&self, pasid: Option<Pasid>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.soft
            .dma_read(self.dev, host(pasid), iova, buf, DmaRequest::default())
    }

    fn write(&self, pasid: Option<Pasid>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.soft
            .dma_write(self.dev, host(pasid), iova, buf, DmaRequest::default())
    }
}
