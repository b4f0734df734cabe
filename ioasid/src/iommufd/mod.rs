//! The iommufd backend: `/dev/iommu` plus VFIO cdevs (`/dev/vfio/devices/vfioN`).
//!
//! IOAS calls go through `iommufd-ioctls` where it wraps them and through [`sys`] where it
//! does not. Devices are bound with `VFIO_DEVICE_BIND_IOMMUFD` and attached to an IOAS or a
//! HWPT with `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (attaching again replaces, hitlessly).

pub mod fault;
pub mod selftest;
pub mod sys;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use iommufd_bindings::iommufd::*;
use iommufd_ioctls::IommuFd;
use vfio_bindings::bindings::vfio::vfio_device_bind_iommufd;
use vfio_ioctls::{VfioDevice, VfioIommufd};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::backend::{
    BackendKind, CopyRequest, FaultQueue, InvalidateOutcome, IommuBackend, MapFile, MapUser,
};
use crate::caps::HwCaps;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::sysfs::DeviceSpec;
use crate::types::{
    DevId, DeviceName, HwptAlloc, HwptId, Invalidation, IoasId, IovaRange, IovaRanges, Pasid, Perm,
    PtId, Stage1Format,
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

/// The error of a failed RID attach of `name` to object `pt_id`, the same whichever call
/// issued it.
fn attach_error(name: &DeviceName, pt_id: u32, errno: Errno) -> Error {
    Error::kernel(Op::Attach, Ctx::device(name).with_object(pt_id), errno)
}

fn map_flags(perm: Perm, fixed: bool) -> u32 {
    let mut f = 0;
    if fixed {
        f |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA;
    }
    if perm.read {
        f |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
    }
    if perm.write {
        f |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
    }
    f
}

/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE` (iommufd_test.h); the kernel writes the attached
/// HWPT's id back into the op's `pt_id`.
const TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;

/// What an attach to `ioas` that wrote back `pt_id` attached the device to.
fn reported_hwpt(ioas: IoasId, pt_id: u32) -> Option<HwptId> {
    (pt_id != ioas.0 && pt_id != 0).then_some(HwptId(pt_id))
}

/// `IOMMU_HWPT_DATA_SELFTEST` (iommufd_test.h).
const HWPT_DATA_SELFTEST: u32 = 0xdead;
/// `IOMMU_HWPT_INVALIDATE_DATA_SELFTEST` (iommufd_test.h).
const INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;

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
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/iommu")
            .map_err(|e| Error::kernel(Op::OpenIommufd, Ctx::default(), e))?;
        Self::from_file(file)
    }

    /// Uses an already-open `/dev/iommu` (fd passing).
    pub fn from_file(file: File) -> Result<Self> {
        let fd = Arc::new(IommuFd::new_from_fd(file));
        // vfio-ioctls wants an IOAS for its cdev wrapper; it stays empty and unused, because
        // this backend attaches devices to the IOASes and HWPTs its callers choose.
        let placeholder = iommufd_ioctls::IommufdIoas::new(fd.clone())
            .map_err(|e| Error::kernel(Op::IoasAlloc, Ctx::default(), errno_of(&e)))?;
        let vfio = VfioIommufd::new(fd.clone(), Some(Arc::new(placeholder)), None)
            .map_err(|e| Error::kernel(Op::IoasAlloc, Ctx::default(), errno_of(&e)))?;
        Ok(IommufdBackend {
            fd,
            vfio: Arc::new(vfio),
            devices: Mutex::new(HashMap::new()),
            hwpt_types: Mutex::new(HashMap::new()),
            counters: HostCounters::default(),
        })
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

    /// Opens the device's cdev and binds it (`VFIO_DEVICE_BIND_IOMMUFD`), without attaching.
    pub fn bind(&self, spec: &DeviceSpec) -> Result<(DevId, Arc<VfioDevice>)> {
        let cdev = spec.cdev.as_ref().ok_or_else(|| Error::DeviceNotFound {
            path: spec.sysfs.clone(),
            reason: format!(
                "{} has no VFIO cdev (no vfio-dev/ in sysfs): the kernel lacks CONFIG_VFIO_DEVICE_CDEV; use the type1 backend",
                spec.name
            ),
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(cdev)
            .map_err(|e| Error::kernel(Op::OpenDevice, Ctx::device(&spec.name), e))?;
        self.bind_file(file, spec.name.clone())
    }

    /// Binds an already-open cdev (fd passing).
    pub fn bind_file(&self, file: File, name: DeviceName) -> Result<(DevId, Arc<VfioDevice>)> {
        let mut bind = vfio_device_bind_iommufd {
            argsz: std::mem::size_of::<vfio_device_bind_iommufd>() as u32,
            flags: 0,
            iommufd: self.fd.as_raw_fd(),
            out_devid: 0,
            token_uuid_ptr: 0,
        };
        self.count();
        // SAFETY: `file` is an open VFIO cdev; `bind` is a valid vfio_device_bind_iommufd with
        // its argsz set, borrowed exclusively for the call; the kernel writes out_devid.
        let ret = unsafe {
            ioctl_with_mut_ref(&file, vfio_ioctls_nr::VFIO_DEVICE_BIND_IOMMUFD(), &mut bind)
        };
        if ret < 0 {
            return Err(Error::kernel(
                Op::BindIommufd,
                Ctx::device(&name),
                Errno::last(),
            ));
        }
        let dev = VfioDevice::new_from_bound_fd(file, self.vfio.clone(), false)
            .map_err(|e| Error::kernel(Op::GetDeviceInfo, Ctx::device(&name), errno_of(&e)))?;
        let dev = Arc::new(dev);
        let id = DevId(bind.out_devid);
        self.lock_devices().insert(
            id,
            Bound::Vfio {
                dev: dev.clone(),
                name,
            },
        );
        Ok((id, dev))
    }

    /// Forgets a device (its fd closes when the last `Arc<VfioDevice>` drops, which unbinds it).
    pub fn unbind(&self, dev: DevId) {
        self.lock_devices().remove(&dev);
    }

    /// Registers a selftest mock device created by [`selftest::Selftest::mock_domain`].
    pub(crate) fn register_mock(&self, dev: DevId, stdev_id: u32) {
        self.lock_devices().insert(
            dev,
            Bound::Mock {
                stdev_id,
                name: DeviceName::Mock(stdev_id),
            },
        );
    }

    /// Attaches `dev` (RID, no PASID) to `ioas`, as [`IommuBackend::attach`] with
    /// [`PtId::Ioas`] does (same ioctl, same errors), and returns the HWPT the kernel attached
    /// it to: `VFIO_DEVICE_ATTACH_IOMMUFD_PT` writes back the id of the paging HWPT it found
    /// or created for the device over that IOAS. Devices whose IOMMUs are compatible share
    /// one; the kernel creates another for a device that cannot use the existing ones. The
    /// HWPT is the kernel's: it is destroyed when its last device detaches, never by us.
    ///
    /// `Ok(None)`: the kernel reported the IOAS id itself, meaning no HWPT is involved (an
    /// emulated device such as an mdev reaches the IOAS through an iommufd access).
    pub fn attach_ioas_reporting_hwpt(&self, dev: DevId, ioas: IoasId) -> Result<Option<HwptId>> {
        let bound = self.bound(dev, Op::Attach)?;
        self.count();
        let pt_id = match &bound {
            Bound::Vfio { dev: d, name } => {
                sys::device_attach_pt(&**d, ioas.0).map_err(|e| attach_error(name, ioas.0, e))?
            }
            Bound::Mock { stdev_id, name } => {
                let mut c = sys::IommuTestCmd::new(TEST_OP_MOCK_DOMAIN_REPLACE, *stdev_id);
                c.set_u32(0, ioas.0);
                sys::test_cmd(&*self.fd, &mut c).map_err(|e| attach_error(name, ioas.0, e))?;
                c.get_u32(0)
            }
        };
        Ok(reported_hwpt(ioas, pt_id))
    }

    /// `IOMMU_GET_HW_INFO`: the IOMMU capabilities of a bound device, before any attach.
    pub fn hw_info(&self, dev: DevId) -> Result<HwCaps> {
        let mut data = [0u8; 128];
        let mut info = iommu_hw_info {
            size: std::mem::size_of::<iommu_hw_info>() as u32,
            dev_id: dev.0,
            data_len: data.len() as u32,
            data_uptr: data.as_mut_ptr() as u64,
            ..Default::default()
        };
        self.count();
        match self.fd.get_hw_info(&mut info) {
            Ok(()) => {
                let len = (info.data_len as usize).min(data.len());
                // SAFETY: both union members are a plain u32; on success the kernel wrote
                // out_data_type, and any bit pattern is a valid u32.
                let data_type = unsafe { info.__bindgen_anon_1.out_data_type };
                Ok(HwCaps::decode(
                    data_type,
                    &data[..len],
                    info.out_capabilities,
                    info.out_max_pasid_log2,
                ))
            }
            Err(e) => {
                let errno = errno_of(&e);
                let name = self.dev_name(dev);
                if matches!(errno.0, libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) {
                    let what = match &name {
                        Some(DeviceName::Mdev(_)) => {
                            "an mdev is emulated by its parent driver; no IOMMU translates its DMA"
                        }
                        _ => "the device has no IOMMU hardware info",
                    };
                    return Ok(HwCaps::none(format!("{what} (IOMMU_GET_HW_INFO: {errno})")));
                }
                Err(Error::kernel(Op::GetHwInfo, self.ctx_dev(dev), errno))
            }
        }
    }

    /// `IOMMU_OPTION` `HUGE_PAGES` on an IOAS (true: combine contiguous pages, the default).
    pub fn set_huge_pages(&self, ioas: IoasId, on: bool) -> Result<()> {
        let mut opt = iommu_option {
            option_id: iommufd_option_IOMMU_OPTION_HUGE_PAGES,
            op: iommufd_option_ops_IOMMU_OPTION_OP_SET as u16,
            object_id: ioas.0,
            val64: u64::from(on),
            ..Default::default()
        };
        self.count();
        sys::option(&*self.fd, &mut opt)
            .map_err(|e| Error::kernel(Op::SetOption, Ctx::object(ioas.0), e))
    }

    /// `IOMMU_OPTION` `RLIMIT_MODE` (global): true accounts pinned pages per process instead of
    /// per user (needs CAP_SYS_RESOURCE).
    pub fn set_rlimit_per_process(&self, on: bool) -> Result<()> {
        let mut opt = iommu_option {
            option_id: iommufd_option_IOMMU_OPTION_RLIMIT_MODE,
            op: iommufd_option_ops_IOMMU_OPTION_OP_SET as u16,
            object_id: 0,
            val64: u64::from(on),
            ..Default::default()
        };
        self.count();
        sys::option(&*self.fd, &mut opt)
            .map_err(|e| Error::kernel(Op::SetOption, Ctx::default(), e))
    }

    fn hwpt_data(stage1: &Stage1Format) -> (u32, Vec<u8>) {
        match stage1 {
            Stage1Format::VtdS1(v) => {
                let mut flags = 0;
                if v.sre {
                    flags |= iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_SRE;
                }
                if v.wpe {
                    flags |= iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_WPE;
                }
                if v.eafe {
                    flags |= iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_EAFE;
                }
                let raw = iommu_hwpt_vtd_s1 {
                    flags: u64::from(flags),
                    pgtbl_addr: v.pgtbl_addr,
                    addr_width: v.addr_width,
                    __reserved: 0,
                };
                let mut b = Vec::with_capacity(24);
                b.extend_from_slice(&raw.flags.to_le_bytes());
                b.extend_from_slice(&raw.pgtbl_addr.to_le_bytes());
                b.extend_from_slice(&raw.addr_width.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                (iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1, b)
            }
            Stage1Format::Selftest { iotlb } => {
                let mut b = iotlb.to_le_bytes().to_vec();
                b.extend_from_slice(&0u32.to_le_bytes());
                (HWPT_DATA_SELFTEST, b)
            }
        }
    }
}

/// ioctl numbers vfio-ioctls keeps private.
mod vfio_ioctls_nr {
    use vmm_sys_util::ioctl_io_nr;
    // VFIO_TYPE ';' (0x3b), VFIO_BASE 100; BIND_IOMMUFD is VFIO_BASE + 18.
    ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, 0x3b, 100 + 18);
}

impl IommuBackend for IommufdBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Iommufd
    }

    fn ioas_alloc(&self) -> Result<IoasId> {
        let mut a = iommu_ioas_alloc {
            size: std::mem::size_of::<iommu_ioas_alloc>() as u32,
            ..Default::default()
        };
        self.count();
        self.fd
            .alloc_iommu_ioas(&mut a)
            .map_err(|e| Error::kernel(Op::IoasAlloc, Ctx::default(), errno_of(&e)))?;
        Ok(IoasId(a.out_ioas_id))
    }

    fn destroy(&self, id: u32) -> Result<()> {
        self.count();
        lock(&self.hwpt_types).remove(&id);
        self.fd
            .destroy_iommu_object(id)
            .map_err(|e| Error::kernel(Op::Destroy, Ctx::object(id), errno_of(&e)))
    }

    unsafe fn ioas_map(&self, ioas: IoasId, req: &MapUser) -> Result<u64> {
        let map = iommu_ioas_map {
            size: std::mem::size_of::<iommu_ioas_map>() as u32,
            flags: map_flags(req.perm, req.iova.is_some()),
            ioas_id: ioas.0,
            __reserved: 0,
            user_va: req.user_va,
            length: req.len,
            iova: req.iova.unwrap_or(0),
        };
        self.count();
        self.counters.maps.fetch_add(1, Ordering::Relaxed);
        // One ioctl for both cases: iommufd-ioctls' wrapper takes the struct by shared
        // reference and cannot return a kernel-chosen IOVA, so the write-back needs our own.
        let mut m = map;
        // SAFETY: `m` is a valid iommu_ioas_map with its size set, exclusively borrowed for
        // the call; the kernel writes back `iova` only. The memory contract for `user_va` is
        // the caller's (this fn is unsafe, see the trait).
        let ret = unsafe { ioctl_with_mut_ref(&*self.fd, map_ioctl::IOMMU_IOAS_MAP(), &mut m) };
        if ret < 0 {
            return Err(Error::kernel(
                Op::IoasMap,
                Ctx::object(ioas.0).range(req.iova.unwrap_or(0), req.len),
                Errno::last(),
            ));
        }
        Ok(m.iova)
    }

    fn ioas_map_file(&self, ioas: IoasId, req: &MapFile) -> Result<u64> {
        let mut map = iommu_ioas_map_file {
            size: std::mem::size_of::<iommu_ioas_map_file>() as u32,
            flags: map_flags(req.perm, req.iova.is_some()),
            ioas_id: ioas.0,
            fd: req.fd,
            start: req.start,
            length: req.len,
            iova: req.iova.unwrap_or(0),
        };
        self.count();
        self.counters.maps.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `map` is a valid iommu_ioas_map_file borrowed for the call; the kernel pins
        // the file's pages itself, so no process memory contract is involved; it writes back
        // `iova` only.
        let ret =
            unsafe { ioctl_with_mut_ref(&*self.fd, map_ioctl::IOMMU_IOAS_MAP_FILE(), &mut map) };
        if ret < 0 {
            return Err(Error::kernel(
                Op::IoasMapFile,
                Ctx::object(ioas.0).range(req.iova.unwrap_or(0), req.len),
                Errno::last(),
            ));
        }
        Ok(map.iova)
    }

    fn ioas_unmap(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
        let mut u = iommu_ioas_unmap {
            size: std::mem::size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: ioas.0,
            iova,
            length: len,
        };
        self.count();
        self.fd.unmap_iommu_ioas(&mut u).map_err(|e| {
            Error::kernel(
                Op::IoasUnmap,
                Ctx::object(ioas.0).range(iova, len),
                errno_of(&e),
            )
        })?;
        Ok(u.length)
    }

    fn ioas_unmap_all(&self, ioas: IoasId) -> Result<u64> {
        self.ioas_unmap(ioas, 0, u64::MAX)
    }

    fn ioas_copy(&self, req: &CopyRequest) -> Result<u64> {
        let mut c = iommu_ioas_copy {
            size: 0,
            flags: map_flags(req.perm, req.dst_iova.is_some()),
            dst_ioas_id: req.dst.0,
            src_ioas_id: req.src.0,
            length: req.len,
            dst_iova: req.dst_iova.unwrap_or(0),
            src_iova: req.src_iova,
        };
        self.count();
        sys::ioas_copy(&*self.fd, &mut c).map_err(|e| {
            Error::kernel(
                Op::IoasCopy,
                Ctx::object(req.src.0).range(req.src_iova, req.len),
                e,
            )
        })?;
        Ok(c.dst_iova)
    }

    fn iova_ranges(&self, ioas: IoasId) -> Result<IovaRanges> {
        self.count();
        let (ranges, alignment) = sys::ioas_iova_ranges(&*self.fd, ioas.0)
            .map_err(|e| Error::kernel(Op::IovaRanges, Ctx::object(ioas.0), e))?;
        Ok(IovaRanges {
            ranges: ranges
                .iter()
                .map(|r| IovaRange {
                    start: r.start,
                    last: r.last,
                })
                .collect(),
            alignment,
        })
    }

    fn allow_iovas(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()> {
        let raw: Vec<iommu_iova_range> = ranges
            .iter()
            .map(|r| iommu_iova_range {
                start: r.start,
                last: r.last,
            })
            .collect();
        self.count();
        sys::ioas_allow_iovas(&*self.fd, ioas.0, &raw)
            .map_err(|e| Error::kernel(Op::AllowIovas, Ctx::object(ioas.0), e))
    }

    fn attach(&self, dev: DevId, pasid: Option<Pasid>, pt: PtId) -> Result<()> {
        let bound = self.bound(dev, Op::Attach)?;
        self.count();
        match (&bound, pasid) {
            (Bound::Vfio { dev: d, name }, None) => d
                .attach_hwpt(pt.raw())
                .map_err(|e| attach_error(name, pt.raw(), errno_of(&e))),
            (Bound::Vfio { dev: d, name }, Some(p)) => {
                d.attach_iommufd_pt_pasid(pt.raw(), p.0).map_err(|e| {
                    Error::kernel(
                        Op::AttachPasid,
                        Ctx::device(name).with_object(pt.raw()).pasid(p),
                        errno_of(&e),
                    )
                })
            }
            (Bound::Mock { stdev_id, name }, None) => {
                selftest::mock_domain_replace(&self.fd, *stdev_id, pt.raw())
                    .map_err(|e| attach_error(name, pt.raw(), e))
            }
            (Bound::Mock { stdev_id, name }, Some(p)) => {
                selftest::pasid_attach(&self.fd, *stdev_id, p.0, pt.raw()).map_err(|e| {
                    Error::kernel(
                        Op::AttachPasid,
                        Ctx::device(name).with_object(pt.raw()).pasid(p),
                        e,
                    )
                })
            }
        }
    }

    fn detach(&self, dev: DevId, pasid: Option<Pasid>) -> Result<()> {
        let bound = self.bound(dev, Op::Detach)?;
        self.count();
        match (&bound, pasid) {
            (Bound::Vfio { dev: d, name }, None) => d
                .detach_hwpt()
                .map_err(|e| Error::kernel(Op::Detach, Ctx::device(name), errno_of(&e))),
            (Bound::Vfio { dev: d, name }, Some(p)) => {
                d.detach_iommufd_pt_pasid(p.0).map_err(|e| {
                    Error::kernel(Op::DetachPasid, Ctx::device(name).pasid(p), errno_of(&e))
                })
            }
            (Bound::Mock { name, .. }, None) => Err(Error::InvalidArgument {
                op: Op::Detach,
                ctx: Ctx::device(name),
                reason: "a mock device is always attached; replace its domain instead".to_string(),
            }),
            (Bound::Mock { stdev_id, name }, Some(p)) => {
                selftest::pasid_detach(&self.fd, *stdev_id, p.0)
                    .map_err(|e| Error::kernel(Op::DetachPasid, Ctx::device(name).pasid(p), e))
            }
        }
    }

    fn hwpt_alloc(&self, req: &HwptAlloc) -> Result<HwptId> {
        let mut flags = 0;
        if req.flags.nest_parent {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT;
        }
        if req.flags.dirty_tracking {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
        }
        if req.flags.pasid {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID;
        }
        if req.fault.is_some() {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;
        }
        let (data_type, data) = match &req.stage1 {
            Some(s1) => Self::hwpt_data(s1),
            None => (iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE, Vec::new()),
        };
        let mut a = iommu_hwpt_alloc {
            size: std::mem::size_of::<iommu_hwpt_alloc>() as u32,
            flags,
            dev_id: req.dev.0,
            pt_id: req.parent.raw(),
            data_type,
            data_len: data.len() as u32,
            data_uptr: if data.is_empty() {
                0
            } else {
                data.as_ptr() as u64
            },
            fault_id: req.fault.map_or(0, |f| f.0),
            ..Default::default()
        };
        let op = if req.stage1.is_some() {
            Op::NestedAlloc
        } else if req.flags.nest_parent {
            Op::NestParentAlloc
        } else {
            Op::HwptAlloc
        };
        self.count();
        self.fd.alloc_iommu_hwpt(&mut a).map_err(|e| {
            Error::kernel(
                op,
                self.ctx_dev(req.dev).with_object(req.parent.raw()),
                errno_of(&e),
            )
        })?;
        if req.stage1.is_some() {
            lock(&self.hwpt_types).insert(a.out_hwpt_id, data_type);
        }
        Ok(HwptId(a.out_hwpt_id))
    }

    fn hwpt_invalidate(&self, hwpt: HwptId, batch: &[Invalidation]) -> Result<InvalidateOutcome> {
        let data_type = lock(&self.hwpt_types).get(&hwpt.0).copied().ok_or_else(|| Error::InvalidArgument {
            op: Op::HwptInvalidate,
            ctx: Ctx::object(hwpt.0),
            reason: "not a nested HWPT allocated through this backend: only stage-1 HWPTs take user invalidations".to_string(),
        })?;
        let (inv_type, entry_len, bytes) =
            encode_invalidations(data_type, batch).map_err(|reason| Error::InvalidArgument {
                op: Op::HwptInvalidate,
                ctx: Ctx::object(hwpt.0),
                reason,
            })?;
        let total = batch.len() as u32;
        let mut inv = iommu_hwpt_invalidate {
            size: std::mem::size_of::<iommu_hwpt_invalidate>() as u32,
            hwpt_id: hwpt.0,
            data_uptr: bytes.as_ptr() as u64,
            data_type: inv_type,
            entry_len,
            entry_num: total,
            __reserved: 0,
        };
        self.count();
        self.counters
            .invalidations
            .fetch_add(u64::from(total), Ordering::Relaxed);
        match self.fd.invalidate_hwpt(&mut inv) {
            Ok(()) if inv.entry_num == total => Ok(InvalidateOutcome { handled: total }),
            Ok(()) => Err(Error::PartialInvalidation {
                hwpt,
                handled: inv.entry_num,
                total,
                errno: Errno(0),
                cause: "the kernel stopped early without an error".to_string(),
            }),
            Err(e) => {
                let errno = errno_of(&e);
                let cause =
                    crate::error::likely_cause(Op::HwptInvalidate, errno, &Ctx::object(hwpt.0));
                Err(Error::PartialInvalidation {
                    hwpt,
                    handled: inv.entry_num,
                    total,
                    errno,
                    cause,
                })
            }
        }
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

/// ioctl numbers for calls where we need the kernel's write-back.
mod map_ioctl {
    use iommufd_bindings::iommufd::{
        IOMMUFD_CMD_IOAS_MAP, IOMMUFD_CMD_IOAS_MAP_FILE, IOMMUFD_TYPE,
    };
    use vmm_sys_util::ioctl_io_nr;
    ioctl_io_nr!(IOMMU_IOAS_MAP, IOMMUFD_TYPE as u32, IOMMUFD_CMD_IOAS_MAP);
    ioctl_io_nr!(
        IOMMU_IOAS_MAP_FILE,
        IOMMUFD_TYPE as u32,
        IOMMUFD_CMD_IOAS_MAP_FILE
    );
}

/// Encodes an invalidation batch for a HWPT of `data_type`: (invalidate data type, entry
/// length, bytes).
fn encode_invalidations(
    data_type: u32,
    batch: &[Invalidation],
) -> std::result::Result<(u32, u32, Vec<u8>), String> {
    let mut out = Vec::with_capacity(batch.len() * 16);
    if data_type == iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1 {
        for (i, inv) in batch.iter().enumerate() {
            let (addr, npages, flags) = match *inv {
                Invalidation::All | Invalidation::Pasid(_) => (0u64, u64::MAX, 0u32),
                Invalidation::Range {
                    addr, npages, leaf, ..
                } => {
                    if addr % 4096 != 0 || npages == 0 {
                        return Err(format!("entry {i}: address {addr:#x} must be 4 KiB aligned and npages non-zero"));
                    }
                    (
                        addr,
                        npages,
                        if leaf {
                            iommu_hwpt_vtd_s1_invalidate_flags_IOMMU_VTD_INV_FLAGS_LEAF
                        } else {
                            0
                        },
                    )
                }
                Invalidation::Selftest { .. } => {
                    return Err(format!("entry {i}: a selftest entry on a VT-d HWPT"))
                }
            };
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&npages.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        Ok((
            iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
            24,
            out,
        ))
    } else if data_type == HWPT_DATA_SELFTEST {
        for inv in batch {
            let (flags, id) = match *inv {
                Invalidation::All | Invalidation::Pasid(_) => (1u32, 0u32),
                Invalidation::Selftest { iotlb_id, all } => (u32::from(all), iotlb_id),
                // The mock has no addresses: a range flushes everything, which is what a
                // conservative IOMMU may do.
                Invalidation::Range { .. } => (1, 0),
            };
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Ok((INVALIDATE_DATA_SELFTEST, 8, out))
    } else {
        Err(format!(
            "HWPT data type {data_type:#x} has no invalidation format here"
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn attach_reports_the_hwpt_only_when_the_kernel_names_one() {
        assert_eq!(reported_hwpt(IoasId(3), 7), Some(HwptId(7)));
        // An emulated device: the kernel echoes the IOAS id.
        assert_eq!(reported_hwpt(IoasId(3), 3), None);
        assert_eq!(reported_hwpt(IoasId(3), 0), None);
    }

    #[test]
    fn attach_errors_name_the_device_the_object_and_the_errno() {
        let name = DeviceName::Mock(4);
        let e = attach_error(&name, 9, Errno(libc::EINVAL));
        match &e {
            Error::Kernel { op, ctx, errno, .. } => {
                assert_eq!(*op, Op::Attach);
                assert_eq!(ctx.device.as_ref(), Some(&name));
                assert_eq!(ctx.object, Some(9));
                assert_eq!(*errno, Errno(libc::EINVAL));
            }
            other => panic!("not a kernel error: {other:?}"),
        }
        let text = e.to_string();
        assert!(text.contains("VFIO_DEVICE_ATTACH_IOMMUFD_PT"), "{text}");
        assert!(text.contains("EINVAL"), "{text}");
    }

    #[test]
    fn vtd_invalidation_encoding() {
        let (t, len, b) = encode_invalidations(
            iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1,
            &[
                Invalidation::All,
                Invalidation::Range {
                    pasid: None,
                    addr: 0x20_0000,
                    npages: 4,
                    leaf: true,
                },
            ],
        )
        .unwrap();
        assert_eq!(t, 0, "IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 is 0 in the uAPI");
        assert_eq!(len, 24);
        assert_eq!(b.len(), 48);
        assert_eq!(&b[8..16], &u64::MAX.to_le_bytes());
        assert_eq!(&b[24..32], &0x20_0000u64.to_le_bytes());
        assert_eq!(&b[32..40], &4u64.to_le_bytes());
        assert_eq!(&b[40..44], &1u32.to_le_bytes());
        assert!(encode_invalidations(
            1,
            &[Invalidation::Range {
                pasid: None,
                addr: 0x123,
                npages: 1,
                leaf: false
            }]
        )
        .is_err());
    }

    #[test]
    fn selftest_invalidation_encoding() {
        let (t, len, b) = encode_invalidations(
            HWPT_DATA_SELFTEST,
            &[
                Invalidation::Selftest {
                    iotlb_id: 2,
                    all: false,
                },
                Invalidation::All,
            ],
        )
        .unwrap();
        assert_eq!((t, len), (0xdead_beef, 8));
        assert_eq!(b, vec![0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
