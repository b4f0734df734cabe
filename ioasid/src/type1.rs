//! The legacy backend: VFIO containers and groups with the type1 IOMMU (`/dev/vfio/vfio`).
//!
//! One container is one IOAS. A device joins a container when it is bound (its group is
//! added), and stays there: type1 has no attach/replace, no HWPTs, no PASIDs and no fault
//! queues, so those return [`Error::Unsupported`]. The type1 IOMMU model is only chosen once
//! the first group joins, so maps come after the first bind.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};

use crate::backend::{
    BackendKind, CopyRequest, FaultQueue, InvalidateOutcome, IommuBackend, MapFile, MapUser,
};
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::iommufd::errno_of;
use crate::sysfs::{group_blockers_in, DeviceSpec};
use crate::types::{
    DevId, DeviceName, HwptAlloc, HwptId, Invalidation, IoasId, IovaRange, IovaRanges, Pasid, PtId,
};

struct Container {
    container: Arc<VfioContainer>,
    /// iova -> len of each mapping, for "unmap all" and exact-range checks.
    maps: BTreeMap<u64, u64>,
}

/// A device opened through its group: the device, its name, and the container it joined.
type GroupDevice = (Arc<VfioDevice>, DeviceName, IoasId);

/// The type1 backend.
#[derive(Default)]
pub struct Type1Backend {
    containers: Mutex<HashMap<u32, Container>>,
    devices: Mutex<HashMap<DevId, GroupDevice>>,
    next_id: AtomicU32,
}

impl std::fmt::Debug for Type1Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Type1Backend")
            .field(
                "containers",
                &self.lock_containers().keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn unsupported(op: Op) -> Error {
    Error::Unsupported {
        op,
        backend: "type1",
    }
}

impl Type1Backend {
    /// A backend with no containers yet; fails when the kernel has no VFIO container support.
    pub fn open() -> Result<Self> {
        if !std::path::Path::new("/dev/vfio/vfio").exists() {
            return Err(Error::kernel(
                Op::OpenContainer,
                Ctx::default(),
                Errno(libc::ENOENT),
            ));
        }
        Ok(Type1Backend {
            next_id: AtomicU32::new(1),
            ..Default::default()
        })
    }

    fn lock_containers(&self) -> MutexGuard<'_, HashMap<u32, Container>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn container(&self, ioas: IoasId, op: Op) -> Result<Arc<VfioContainer>> {
        self.lock_containers()
            .get(&ioas.0)
            .map(|c| c.container.clone())
            .ok_or_else(|| Error::kernel(op, Ctx::object(ioas.0), Errno(libc::ENOENT)))
    }

    /// Opens the device through its group in the container `ioas` (checking group viability
    /// first, so the error names the devices that block it).
    pub fn bind(&self, spec: &DeviceSpec, ioas: IoasId) -> Result<(DevId, Arc<VfioDevice>)> {
        let group = spec.group.ok_or_else(|| Error::DeviceNotFound {
            path: spec.sysfs.clone(),
            reason: format!(
                "{} has no IOMMU group: the host IOMMU is off (intel_iommu=on?)",
                spec.name
            ),
        })?;
        let blockers = group_blockers_in(std::path::Path::new("/"), spec, group);
        if !blockers.is_empty() {
            return Err(Error::GroupNotViable {
                device: spec.name.clone(),
                group,
                others: blockers.join(", "),
            });
        }
        let container = self.container(ioas, Op::GroupSetContainer)?;
        let dev = VfioDevice::new(&spec.sysfs, container, false).map_err(|e| match e {
            VfioError::GroupViable => Error::GroupNotViable {
                device: spec.name.clone(),
                group,
                others: "(the kernel reports the group not viable)".to_string(),
            },
            VfioError::OpenGroup(io, _) => {
                Error::kernel(Op::OpenGroup, Ctx::device(&spec.name), io)
            }
            other => Error::kernel(
                Op::GroupSetContainer,
                Ctx::device(&spec.name),
                errno_of(&other),
            ),
        })?;
        let dev = Arc::new(dev);
        let id = DevId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, (dev.clone(), spec.name.clone(), ioas));
        Ok((id, dev))
    }

    /// Forgets a device; its group leaves the container when the last reference drops.
    pub fn unbind(&self, dev: DevId) {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&dev);
    }
}

impl IommuBackend for Type1Backend {
    fn kind(&self) -> BackendKind {
        BackendKind::Type1
    }

    fn ioas_alloc(&self) -> Result<IoasId> {
        let container = VfioContainer::new(None)
            .map_err(|e| Error::kernel(Op::OpenContainer, Ctx::default(), errno_of(&e)))?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock_containers().insert(
            id,
            Container {
                container: Arc::new(container),
                maps: BTreeMap::new(),
            },
        );
        Ok(IoasId(id))
    }

    fn destroy(&self, id: u32) -> Result<()> {
        let in_use = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .any(|(_, _, ioas)| ioas.0 == id);
        if in_use {
            return Err(Error::kernel(
                Op::Destroy,
                Ctx::object(id),
                Errno(libc::EBUSY),
            ));
        }
        self.lock_containers()
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| Error::kernel(Op::Destroy, Ctx::object(id), Errno(libc::ENOENT)))
    }

    unsafe fn ioas_map(&self, ioas: IoasId, req: &MapUser) -> Result<u64> {
        let iova = req.iova.ok_or_else(|| Error::InvalidArgument {
            op: Op::DmaMap,
            ctx: Ctx::object(ioas.0),
            reason: "type1 cannot choose an IOVA: pass a fixed one".to_string(),
        })?;
        let ctx = Ctx::object(ioas.0).range(iova, req.len);
        let len = usize::try_from(req.len)
            .map_err(|_| Error::kernel(Op::DmaMap, ctx.clone(), Errno(libc::EOVERFLOW)))?;
        let container = self.container(ioas, Op::DmaMap)?;
        // SAFETY: the caller upholds the trait's contract for [user_va, user_va + len), which
        // is the contract of VfioContainer::vfio_dma_map.
        unsafe { container.vfio_dma_map(iova, len, req.user_va as *mut u8) }
            .map_err(|e| Error::kernel(Op::DmaMap, ctx, errno_of(&e)))?;
        if let Some(c) = self.lock_containers().get_mut(&ioas.0) {
            c.maps.insert(iova, req.len);
        }
        Ok(iova)
    }

    fn ioas_map_file(&self, _ioas: IoasId, _req: &MapFile) -> Result<u64> {
        Err(unsupported(Op::IoasMapFile))
    }

    fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        let ctx = Ctx::object(ioas.0).range(iova, len);
        let container = self.container(ioas, Op::DmaUnmap)?;
        let size = usize::try_from(len)
            .map_err(|_| Error::kernel(Op::DmaUnmap, ctx.clone(), Errno(libc::EOVERFLOW)))?;
        container.vfio_dma_unmap(iova, size).map_err(|e| match e {
            // type1 reports "nothing there" as a short unmap; speak iommufd's ENOENT.
            VfioError::InvalidDmaUnmapSize => {
                Error::kernel(Op::DmaUnmap, ctx.clone(), Errno(libc::ENOENT))
            }
            other => Error::kernel(Op::DmaUnmap, ctx.clone(), errno_of(&other)),
        })?;
        if let Some(c) = self.lock_containers().get_mut(&ioas.0) {
            let end = iova.saturating_add(len);
            let gone: Vec<u64> = c.maps.range(iova..end).map(|(k, _)| *k).collect();
            for k in gone {
                c.maps.remove(&k);
            }
        }
        Ok(len)
    }

    fn ioas_unmap_all(&self, ioas: IoasId) -> Result<u64> {
        let maps: Vec<(u64, u64)> = self
            .lock_containers()
            .get(&ioas.0)
            .map(|c| c.maps.iter().map(|(a, b)| (*a, *b)).collect())
            .ok_or_else(|| Error::kernel(Op::DmaUnmap, Ctx::object(ioas.0), Errno(libc::ENOENT)))?;
        let mut total = 0;
        for (iova, len) in maps {
            total += self.ioas_unmap(ioas, iova, len)?;
        }
        Ok(total)
    }

    fn ioas_copy(&self, _req: &CopyRequest) -> Result<u64> {
        Err(unsupported(Op::IoasCopy))
    }

    fn iova_ranges(&self, _ioas: IoasId) -> Result<IovaRanges> {
        Err(unsupported(Op::IovaRanges))
    }

    fn allow_iovas(&self, _ioas: IoasId, _ranges: &[IovaRange]) -> Result<()> {
        Err(unsupported(Op::AllowIovas))
    }

    fn attach(&self, dev: DevId, pasid: Option<Pasid>, pt: PtId) -> Result<()> {
        let devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        let (_, name, ioas) = devices.get(&dev).ok_or_else(|| Error::InvalidArgument {
            op: Op::Attach,
            ctx: Ctx::default(),
            reason: format!("device id {} is not bound", dev.0),
        })?;
        match (pasid, pt) {
            (None, PtId::Ioas(target)) if target == *ioas => Ok(()),
            (Some(_), _) => Err(unsupported(Op::AttachPasid)),
            _ => Err(Error::InvalidArgument {
                op: Op::Attach,
                ctx: Ctx::device(name),
                reason: format!(
                    "type1 cannot move a device: it stays in container {} it was bound into",
                    ioas.0
                ),
            }),
        }
    }

    fn detach(&self, _dev: DevId, _pasid: Option<Pasid>) -> Result<()> {
        Err(unsupported(Op::Detach))
    }

    fn hwpt_alloc(&self, _req: &HwptAlloc) -> Result<HwptId> {
        Err(unsupported(Op::HwptAlloc))
    }

    fn hwpt_invalidate(&self, _hwpt: HwptId, _batch: &[Invalidation]) -> Result<InvalidateOutcome> {
        Err(unsupported(Op::HwptInvalidate))
    }

    fn fault_queue_alloc(&self) -> Result<Box<dyn FaultQueue>> {
        Err(unsupported(Op::FaultQueueAlloc))
    }
}
