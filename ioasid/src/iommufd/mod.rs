//! The iommufd backend: `/dev/iommu` plus VFIO cdevs (`/dev/vfio/devices/vfioN`).
//!
//! IOAS calls go through `iommufd-ioctls` where it wraps them and through [`sys`] where it
//! does not. Devices are bound with `VFIO_DEVICE_BIND_IOMMUFD` and attached to an IOAS or a
//! HWPT with `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (attaching again replaces, hitlessly).
//!
//! This file holds the backend object and its [`IommuBackend`] face; the work is in one
//! module per kernel object: `device` (bind, attach, hardware info), `ioas` (maps,
//! copies, ranges, options), `hwpt` (allocation, nested data, invalidation) and [`fault`]
//! (the fault queue). Every raw ioctl is a thin wrapper in [`sys`].

mod device;
pub mod fault;
mod hwpt;
mod ioas;
pub use ioas::PinAccounting;
pub mod selftest;
pub mod sys;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_ioctls::IommuFd;
use vfio_ioctls::{VfioDevice, VfioIommufd};

use crate::backend::{
    BackendKind, CopyRequest, FaultQueue, InvalidateOutcome, IommuBackend, MapFile, MapUser,
};
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::types::{
    DevId, DeviceName, HwptAlloc, HwptId, Invalidation, IoasId, IovaRange, IovaRanges, Pasid, PtId,
};

/// The errno at the bottom of an error chain from `iommufd-ioctls` or `vfio-ioctls`.
pub(crate) fn errno_of(e: &(dyn std::error::Error + 'static)) -> Errno {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(s) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Errno(s.errno());
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(code) = io.raw_os_error() {
                return Errno(code);
            }
        }
        cur = err.source();
    }
    Errno(libc::EIO)
}

/// A device bound to this iommufd.
#[derive(Clone)]
enum Bound {
    /// A VFIO cdev.
    Vfio {
        dev: Arc<VfioDevice>,
        name: DeviceName,
    },
    /// A selftest mock device (`IOMMU_TEST_OP_MOCK_DOMAIN`), attached through test ops.
    Mock { stdev_id: u32, name: DeviceName },
}

impl Bound {
    fn name(&self) -> &DeviceName {
        match self {
            Bound::Vfio { name, .. } | Bound::Mock { name, .. } => name,
        }
    }
}

/// Counters of host calls, for introspection.
#[derive(Debug, Default)]
pub struct HostCounters {
    /// ioctls issued.
    pub ioctls: AtomicU64,
    /// Invalidation entries sent.
    pub invalidations: AtomicU64,
    /// IOAS map calls.
    pub maps: AtomicU64,
}

/// The iommufd backend.
pub struct IommufdBackend {
    fd: Arc<IommuFd>,
    vfio: Arc<VfioIommufd>,
    devices: Mutex<HashMap<DevId, Bound>>,
    /// Data type of each nested HWPT, to encode its invalidations.
    hwpt_types: Mutex<HashMap<u32, u32>>,
    counters: HostCounters,
}

impl std::fmt::Debug for IommufdBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommufdBackend")
            .field("fd", &self.fd.as_raw_fd())
            .field("devices", &self.lock_devices().keys().collect::<Vec<_>>())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl IommufdBackend {
    /// Opens `/dev/iommu`.
    pub fn open() -> Result<Self> {
        Self::open_with(PinAccounting::User)
    }

    /// Opens `/dev/iommu` and sets how it charges pinned pages (`IOMMU_OPTION_RLIMIT_MODE`,
    /// which needs CAP_SYS_RESOURCE for [`PinAccounting::Process`]).
    pub fn open_with(accounting: PinAccounting) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/iommu")
            .map_err(|e| Error::kernel(Op::OpenIommufd, Ctx::default(), e))?;
        Self::from_file_with(file, accounting)
    }

    /// Uses an already-open `/dev/iommu` (fd passing).
    pub fn from_file(file: File) -> Result<Self> {
        Self::from_file_with(file, PinAccounting::User)
    }

    /// Uses an already-open `/dev/iommu` and sets its pin accounting first: the kernel takes
    /// `IOMMU_OPTION_RLIMIT_MODE` only while the iommufd holds no object, so it is set before
    /// the placeholder IOAS below. [`PinAccounting::User`] is the kernel's default and sets
    /// nothing.
    pub fn from_file_with(file: File, accounting: PinAccounting) -> Result<Self> {
        let fd = Arc::new(IommuFd::new_from_fd(file));
        if accounting != PinAccounting::User {
            ioas::set_pin_accounting(&fd, accounting)?;
        }
        let placeholder = iommufd_ioctls::IommufdIoas::new(fd.clone())
            .map_err(|e| Error::kernel(Op::IoasAlloc, Ctx::default(), errno_of(&e)))?;
        let vfio = VfioIommufd::new(fd.clone(), Some(Arc::new(placeholder)), None)
            .map_err(|e| Error::kernel(Op::IoasAlloc, Ctx::default(), errno_of(&e)))?;
        let backend = IommufdBackend {
            fd,
            vfio: Arc::new(vfio),
            devices: Mutex::new(HashMap::new()),
            hwpt_types: Mutex::new(HashMap::new()),
            counters: HostCounters::default(),
        };
        // The placeholder IOAS and the RLIMIT_MODE SET before it.
        let calls = if accounting == PinAccounting::User {
            1
        } else {
            2
        };
        backend.counters.ioctls.fetch_add(calls, Ordering::Relaxed);
        Ok(backend)
    }

    fn lock_devices(&self) -> MutexGuard<'_, HashMap<DevId, Bound>> {
        lock(&self.devices)
    }

    /// The iommufd file, for KVM or for sharing.
    pub fn iommufd(&self) -> &Arc<IommuFd> {
        &self.fd
    }

    /// Host call counters.
    pub fn counters(&self) -> &HostCounters {
        &self.counters
    }

    fn count(&self) {
        self.counters.ioctls.fetch_add(1, Ordering::Relaxed);
    }

    fn dev_name(&self, dev: DevId) -> Option<DeviceName> {
        self.lock_devices().get(&dev).map(|b| b.name().clone())
    }

    fn ctx_dev(&self, dev: DevId) -> Ctx {
        match self.dev_name(dev) {
            Some(n) => Ctx::device(&n),
            None => Ctx::default(),
        }
    }

    fn bound(&self, dev: DevId, op: Op) -> Result<Bound> {
        self.lock_devices()
            .get(&dev)
            .cloned()
            .ok_or_else(|| Error::InvalidArgument {
                op,
                ctx: Ctx::default(),
                reason: format!("device id {} is not bound to this iommufd", dev.0),
            })
    }
}

/// The trait face of the backend: each call goes to the module of its kernel object.
impl IommuBackend for IommufdBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Iommufd
    }

    fn ioas_alloc(&self) -> Result<IoasId> {
        self.alloc_ioas()
    }

    fn destroy(&self, id: u32) -> Result<()> {
        self.count();
        lock(&self.hwpt_types).remove(&id);
        self.fd
            .destroy_iommu_object(id)
            .map_err(|e| Error::kernel(Op::Destroy, Ctx::object(id), errno_of(&e)))
    }

    unsafe fn ioas_map(&self, ioas: IoasId, req: &MapUser) -> Result<u64> {
        // SAFETY: the caller upholds the trait's contract, which is map_user's.
        unsafe { self.map_user(ioas, req) }
    }

    fn ioas_map_file(&self, ioas: IoasId, req: &MapFile) -> Result<u64> {
        self.map_file(ioas, req)
    }

    fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        self.unmap_range(ioas, iova, len)
    }

    fn ioas_unmap_all(&self, ioas: IoasId) -> Result<u64> {
        self.unmap_range(ioas, 0, u64::MAX)
    }

    fn ioas_copy(&self, req: &CopyRequest) -> Result<u64> {
        self.copy_range(req)
    }

    fn iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges> {
        self.ranges_of(ioas)
    }

    fn allow_iovas(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()> {
        self.allow_ranges(ioas, ranges)
    }

    fn attach(&self, dev: DevId, pasid: Option<Pasid>, pt: PtId) -> Result<()> {
        self.attach_pt(dev, pasid, pt)
    }

    fn detach(&self, dev: DevId, pasid: Option<Pasid>) -> Result<()> {
        self.detach_pt(dev, pasid)
    }

    fn hwpt_alloc(&self, req: &HwptAlloc) -> Result<HwptId> {
        self.alloc_hwpt(req)
    }

    fn hwpt_invalidate(&self, hwpt: HwptId, batch: &[Invalidation]) -> Result<InvalidateOutcome> {
        self.invalidate_hwpt(hwpt, batch)
    }

    fn fault_queue_alloc(&self) -> Result<Box<dyn FaultQueue>> {
        self.count();
        let (id, fd) = sys::fault_queue_alloc(&*self.fd)
            .map_err(|e| Error::kernel(Op::FaultQueueAlloc, Ctx::default(), e))?;
        // SAFETY: the kernel just returned `fd` as a new file descriptor that nothing else
        // owns; wrapping it in a File transfers ownership to us exactly once.
        let file = unsafe { File::from_raw_fd(fd) };
        Ok(Box::new(fault::KernelFaultQueue::new(id, file)?))
    }
}
