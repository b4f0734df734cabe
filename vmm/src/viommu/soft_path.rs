//! The soft path: an emulated device DMAs through the soft backend, which walks the guest's
//! own tables on each access through its PASID-tagged IOTLB (no shadow copy).
//!
//! Per soft backend instance, the bridge keeps a guest-RAM IOAS (RAM at IOVA = GPA) and, per
//! device, a nest parent over it; a guest first-stage table becomes a soft nested HWPT
//! (`Stage1Format::VtdS1`), a guest second-stage table a soft second-level HWPT
//! ([`SoftIommu::hwpt_alloc_second_level`]), both replaced when the guest's entry changes and
//! invalidated with `hwpt_invalidate` when the guest invalidates.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use devices::viommu::DmaView;
use ioasid::soft::SoftIommu;
use ioasid::{
    DevId, DmaError, DmaRequest, FaultPerm, FaultReason, IoasId, IommuBackend, MapUser, Pasid,
    Perm, UnrecoverableFault,
};

use super::guest_mem::RamMap;

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

/// Guest PASID -> host PASID of one device (PASIDs other than 0), shared between the bridge
/// (which binds) and the device's [`SoftDma`] (which issues DMA with the host PASID).
#[derive(Debug, Clone, Default)]
pub struct HostPasids(Arc<RwLock<BTreeMap<Pasid, Pasid>>>);

impl HostPasids {
    /// The host PASID of guest `pasid`.
    pub fn get(&self, pasid: Pasid) -> Option<Pasid> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&pasid)
            .copied()
    }

    /// The guest PASID of host `pasid`.
    pub fn guest_of(&self, host: Pasid) -> Option<Pasid> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(_, h)| **h == host)
            .map(|(g, _)| *g)
    }

    pub(crate) fn insert(&self, guest: Pasid, host: Pasid) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(guest, host);
    }

    pub(crate) fn remove(&self, guest: Pasid) -> Option<Pasid> {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&guest)
    }

    /// Every (guest, host) pair.
    pub fn pairs(&self) -> Vec<(Pasid, Pasid)> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(g, h)| (*g, *h))
            .collect()
    }

    pub(crate) fn drain(&self) -> Vec<(Pasid, Pasid)> {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *m).into_iter().collect()
    }
}

/// An emulated device's DMA through the soft backend.
///
/// The device names guest PASIDs; the view issues the request with the host PASID the
/// bridge bound it to (a guest PASID that is not bound faults, `NoContext`, as a PASID with
/// a non-present entry does on hardware).
#[derive(Debug)]
pub struct SoftDma {
    soft: Arc<SoftIommu>,
    dev: DevId,
    pasids: HostPasids,
}

impl SoftDma {
    /// The DMA of `dev` on `soft`, with guest PASIDs translated by `pasids`.
    pub fn new(soft: Arc<SoftIommu>, dev: DevId, pasids: HostPasids) -> Self {
        SoftDma { soft, dev, pasids }
    }

    /// The soft-backend device.
    pub fn dev(&self) -> DevId {
        self.dev
    }

    fn host(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        write: bool,
    ) -> Result<Option<Pasid>, DmaError> {
        match pasid {
            None => Ok(None),
            Some(p) if p.0 == 0 => Ok(None),
            Some(p) => self
                .pasids
                .get(p)
                .map(Some)
                .ok_or(DmaError::Fault(UnrecoverableFault {
                    dev: self.dev,
                    pasid: Some(p),
                    addr: iova,
                    perm: FaultPerm {
                        read: !write,
                        write,
                        ..Default::default()
                    },
                    reason: FaultReason::NoContext,
                })),
        }
    }

    /// Reads at (`pasid`, `iova`) as a device request `req` (with `req.pri`, a fixable
    /// translation fault returns [`DmaError::PageRequest`]: the page request is on its way
    /// to the guest; wait on it and retry on `Success`).
    pub fn read_req(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        let hp = self.host(pasid, iova, false)?;
        self.soft.dma_read(self.dev, hp, iova, buf, req)
    }

    /// Writes at (`pasid`, `iova`) as a device request `req` (see [`SoftDma::read_req`]).
    pub fn write_req(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        let hp = self.host(pasid, iova, true)?;
        self.soft.dma_write(self.dev, hp, iova, buf, req)
    }
}

impl DmaView for SoftDma {
    fn read(&self, pasid: Option<Pasid>, iova: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.read_req(pasid, iova, buf, DmaRequest::default())
    }

    fn write(&self, pasid: Option<Pasid>, iova: u64, buf: &[u8]) -> Result<(), DmaError> {
        self.write_req(pasid, iova, buf, DmaRequest::default())
    }

    fn read_with(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        self.read_req(pasid, iova, buf, req)
    }

    fn write_with(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        self.write_req(pasid, iova, buf, req)
    }
}
