//! One error type for the crate: what was being done, to which device, at which IOVA/PASID,
//! and the errno decoded with its likely cause.
//!
//! Messages start with a capital letter and carry their context inline, because a VMM user
//! sees exactly this text (in the CLI, the REST API and the log).

use std::fmt;
use std::path::PathBuf;

use thiserror::Error;

use crate::types::{DeviceName, HwptId, Pasid};

/// The operation that failed, named as the kernel uAPI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Op {
    OpenIommufd,
    OpenContainer,
    OpenGroup,
    OpenDevice,
    GetDeviceInfo,
    BindIommufd,
    Attach,
    Detach,
    AttachPasid,
    DetachPasid,
    Destroy,
    IoasAlloc,
    IoasMap,
    IoasMapFile,
    IoasUnmap,
    IoasCopy,
    IovaRanges,
    AllowIovas,
    SetOption,
    HwptAlloc,
    NestParentAlloc,
    NestedAlloc,
    HwptInvalidate,
    GetHwInfo,
    FaultQueueAlloc,
    FaultRead,
    PageResponse,
    GroupStatus,
    GroupSetContainer,
    ContainerSetIommu,
    DmaMap,
    DmaUnmap,
    TestCmd,
    SoftTranslate,
}

impl Op {
    /// The uAPI name of the operation.
    pub fn name(self) -> &'static str {
        match self {
            Op::OpenIommufd => "open(/dev/iommu)",
            Op::OpenContainer => "open(/dev/vfio/vfio)",
            Op::OpenGroup => "open(/dev/vfio/GROUP)",
            Op::OpenDevice => "open(VFIO device)",
            Op::GetDeviceInfo => "VFIO_DEVICE_GET_INFO",
            Op::BindIommufd => "VFIO_DEVICE_BIND_IOMMUFD",
            Op::Attach => "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            Op::Detach => "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            Op::AttachPasid => "VFIO_DEVICE_ATTACH_IOMMUFD_PT(PASID)",
            Op::DetachPasid => "VFIO_DEVICE_DETACH_IOMMUFD_PT(PASID)",
            Op::Destroy => "IOMMU_DESTROY",
            Op::IoasAlloc => "IOMMU_IOAS_ALLOC",
            Op::IoasMap => "IOMMU_IOAS_MAP",
            Op::IoasMapFile => "IOMMU_IOAS_MAP_FILE",
            Op::IoasUnmap => "IOMMU_IOAS_UNMAP",
            Op::IoasCopy => "IOMMU_IOAS_COPY",
            Op::IovaRanges => "IOMMU_IOAS_IOVA_RANGES",
            Op::AllowIovas => "IOMMU_IOAS_ALLOW_IOVAS",
            Op::SetOption => "IOMMU_OPTION",
            Op::HwptAlloc => "IOMMU_HWPT_ALLOC",
            Op::NestParentAlloc => "IOMMU_HWPT_ALLOC(NEST_PARENT)",
            Op::NestedAlloc => "IOMMU_HWPT_ALLOC(nested stage-1)",
            Op::HwptInvalidate => "IOMMU_HWPT_INVALIDATE",
            Op::GetHwInfo => "IOMMU_GET_HW_INFO",
            Op::FaultQueueAlloc => "IOMMU_FAULT_QUEUE_ALLOC",
            Op::FaultRead => "read(fault queue)",
            Op::PageResponse => "write(page response)",
            Op::GroupStatus => "VFIO_GROUP_GET_STATUS",
            Op::GroupSetContainer => "VFIO_GROUP_SET_CONTAINER",
            Op::ContainerSetIommu => "VFIO_SET_IOMMU",
            Op::DmaMap => "VFIO_IOMMU_MAP_DMA",
            Op::DmaUnmap => "VFIO_IOMMU_UNMAP_DMA",
            Op::TestCmd => "IOMMU_TEST_CMD",
            Op::SoftTranslate => "soft IOMMU translation",
        }
    }

    fn is_map(self) -> bool {
        matches!(
            self,
            Op::IoasMap | Op::IoasMapFile | Op::IoasCopy | Op::DmaMap
        )
    }

    fn is_unmap(self) -> bool {
        matches!(self, Op::IoasUnmap | Op::DmaUnmap)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where an operation applied: the device, the IOVA range, the PASID, the object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ctx {
    /// The device, when the operation concerns one.
    pub device: Option<DeviceName>,
    /// The IOVA (or address) involved.
    pub iova: Option<u64>,
    /// The length involved.
    pub len: Option<u64>,
    /// The PASID involved.
    pub pasid: Option<Pasid>,
    /// The iommufd object (IOAS, HWPT, fault queue) involved.
    pub object: Option<u32>,
}

impl Ctx {
    /// Context naming a device.
    pub fn device(device: &DeviceName) -> Self {
        Ctx {
            device: Some(device.clone()),
            ..Ctx::default()
        }
    }

    /// Context naming an object.
    pub fn object(id: u32) -> Self {
        Ctx {
            object: Some(id),
            ..Ctx::default()
        }
    }

    /// Adds an IOVA range.
    pub fn range(mut self, iova: u64, len: u64) -> Self {
        self.iova = Some(iova);
        self.len = Some(len);
        self
    }

    /// Adds a PASID.
    pub fn pasid(mut self, pasid: Pasid) -> Self {
        self.pasid = Some(pasid);
        self
    }

    /// Adds an object id.
    pub fn with_object(mut self, id: u32) -> Self {
        self.object = Some(id);
        self
    }

    /// Adds a device.
    pub fn with_device(mut self, device: &DeviceName) -> Self {
        self.device = Some(device.clone());
        self
    }
}

impl fmt::Display for Ctx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(d) = &self.device {
            write!(f, " on {d}")?;
        }
        if let Some(id) = self.object {
            write!(f, " (object {id})")?;
        }
        match (self.iova, self.len) {
            (Some(iova), Some(len)) => write!(f, " at IOVA {iova:#x} length {len:#x}")?,
            (Some(iova), None) => write!(f, " at IOVA {iova:#x}")?,
            _ => {}
        }
        if let Some(p) = self.pasid {
            write!(f, " for {p}")?;
        }
        Ok(())
    }
}

/// An errno value that prints as `EEXIST (17)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

impl Errno {
    /// The errno of the last failed libc call.
    pub fn last() -> Self {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    /// The symbolic name.
    pub fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::E2BIG => "E2BIG",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::ENOSPC => "ENOSPC",
            libc::ENOTTY => "ENOTTY",
            libc::ERANGE => "ERANGE",
            libc::EOPNOTSUPP => "EOPNOTSUPP",
            libc::EOVERFLOW => "EOVERFLOW",
            libc::EMSGSIZE => "EMSGSIZE",
            libc::ETIMEDOUT => "ETIMEDOUT",
            libc::EDOM => "EDOM",
            _ => "errno",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl From<vmm_sys_util::errno::Error> for Errno {
    fn from(e: vmm_sys_util::errno::Error) -> Self {
        Errno(e.errno())
    }
}

/// The likely cause of `errno` from `op`, in words a VMM user can act on.
pub fn likely_cause(op: Op, errno: Errno, ctx: &Ctx) -> String {
    let e = errno.0;
    let s: &str = match (op, e) {
        (Op::NestParentAlloc, libc::EOPNOTSUPP) => {
            "the IOMMU cannot nest: no hardware nesting (VT-d ECAP.NEST=0, as on QEMU's emulated VT-d) or the driver lacks it; fall back to shadow page tables"
        }
        (Op::NestedAlloc, libc::EINVAL) => {
            "the parent is not a nest-parent HWPT, or the stage-1 data is invalid (root address, addr_width 48/57, flags)"
        }
        (Op::NestedAlloc, libc::EOPNOTSUPP) => "the IOMMU driver does not support this stage-1 format",
        (Op::HwptAlloc, libc::EOPNOTSUPP) => {
            "the IOMMU does not support the requested HWPT flags (dirty tracking, PASID or fault reporting)"
        }
        (_, libc::EFAULT) if op.is_map() => {
            "the user address is not ordinary pinnable memory: a VM_PFNMAP/VM_IO mapping such as a PCI BAR mmap (P2P needs a VFIO dma-buf and IOMMU_IOAS_MAP_FILE), or the range is not mapped in this process"
        }
        (_, libc::ENOMEM) if op.is_map() => {
            return match ctx.len {
                Some(len) => format!(
                    "RLIMIT_MEMLOCK is too low to pin {len:#x} bytes ({} MiB): raise it (ulimit -l, or LimitMEMLOCK= in systemd) by at least that much",
                    len.div_ceil(1 << 20)
                ),
                None => "RLIMIT_MEMLOCK is too low to pin the memory: raise it (ulimit -l)".to_string(),
            };
        }
        (_, libc::EEXIST) if op.is_map() => "the IOVA range overlaps an existing mapping in this address space",
        (_, libc::ENOSPC) if op.is_map() => "no free IOVA window of this size is left in the allowed ranges",
        (_, libc::EINVAL) if op.is_map() => {
            "the IOVA or length is not aligned to the IOMMU page size, the range is outside the allowed IOVA ranges, or the flags are invalid"
        }
        (_, libc::ENOENT) if op.is_unmap() => {
            "nothing is mapped exactly there: the range must cover whole existing mappings (iommufd and type1 do not split a mapping)"
        }
        (_, libc::ENOENT) if op.is_map() => "the IOAS does not exist",
        (Op::BindIommufd, libc::EBUSY) | (Op::OpenDevice, libc::EBUSY) => {
            "the device is already in use: bound to another iommufd, opened through its group, or assigned to another VM"
        }
        (Op::BindIommufd, libc::EINVAL) => "the device fd is already bound, or the iommufd fd is invalid",
        (Op::Attach, libc::EINVAL) | (Op::AttachPasid, libc::EINVAL) => {
            "the device is not bound, the page table id is wrong, or the HWPT is not compatible with this device's IOMMU"
        }
        (Op::AttachPasid, libc::EOPNOTSUPP) | (Op::DetachPasid, libc::EOPNOTSUPP) => {
            "the device or its IOMMU has no PASID support"
        }
        (Op::GetHwInfo, libc::ENOENT) | (Op::GetHwInfo, libc::EOPNOTSUPP) | (Op::GetHwInfo, libc::ENODEV) => {
            "the device has no IOMMU hardware info (an emulated device, an mdev, or a mock)"
        }
        (Op::HwptInvalidate, libc::EINVAL) => "an invalidation entry is malformed (address alignment, page count, or flags)",
        (Op::FaultQueueAlloc, libc::EOPNOTSUPP) => "the kernel has no I/O page fault delivery for this IOMMU",
        (Op::PageResponse, libc::EINVAL) => "the cookie does not match a pending fault group, or it was already answered",
        (Op::GroupSetContainer, libc::EINVAL) | (Op::GroupSetContainer, libc::EBUSY) => {
            "the group is already in another container, or the container's IOMMU model does not fit it"
        }
        (Op::OpenIommufd, libc::ENOENT) => "the kernel has no /dev/iommu (CONFIG_IOMMUFD is off)",
        (Op::OpenContainer, libc::ENOENT) => "the kernel has no /dev/vfio/vfio (VFIO_CONTAINER is off, or vfio is not loaded)",
        (Op::OpenGroup, libc::ENOENT) => "the IOMMU group node does not exist: is the device bound to vfio-pci?",
        (_, libc::EPERM) | (_, libc::EACCES) => {
            "permission denied: run as root, or give this user access to /dev/iommu and /dev/vfio/*"
        }
        (_, libc::ENOTTY) => "the kernel does not know this ioctl: too old, or iommufd/VFIO cdev is not configured",
        (_, libc::E2BIG) => "the kernel's struct is older than ours and a newer field was set",
        (_, libc::EOVERFLOW) => "the address plus length overflows",
        (_, libc::EOPNOTSUPP) => "the IOMMU or its driver does not support this operation",
        (_, libc::ENOENT) => "the object id does not exist",
        (_, libc::EBUSY) => "the object is still in use (devices attached, or mappings pinned by a device)",
        _ => return std::io::Error::from_raw_os_error(e).to_string(),
    };
    s.to_string()
}

/// The crate's error.
#[derive(Debug, Error)]
pub enum Error {
    /// A kernel call (or the soft backend acting as one) failed.
    #[error("{op} failed{ctx}: {errno}: {cause}")]
    Kernel {
        /// What was being done.
        op: Op,
        /// Where.
        ctx: Ctx,
        /// The errno.
        errno: Errno,
        /// The likely cause, decoded from `op` and `errno`.
        cause: String,
    },
    /// A sysfs path that is not a VFIO-capable device.
    #[error("Device {path} not usable: {reason}")]
    DeviceNotFound {
        /// The path given.
        path: PathBuf,
        /// Why it is not usable.
        reason: String,
    },
    /// A PCI device that is not bound to vfio-pci.
    #[error("{device} is bound to {driver}, not vfio-pci; bind it with:\n  {commands}")]
    NotBoundToVfio {
        /// The device.
        device: DeviceName,
        /// Its current driver, or "no driver".
        driver: String,
        /// The commands that rebind it.
        commands: String,
    },
    /// Legacy group path: some device in the group is not bound to vfio.
    #[error("IOMMU group {group} of {device} is not viable: these devices in the group are not bound to vfio-pci (bind or unbind them too): {others}")]
    GroupNotViable {
        /// The device.
        device: DeviceName,
        /// The group number.
        group: u32,
        /// The other devices and their drivers.
        others: String,
    },
    /// A backend that cannot work here.
    #[error("The {backend} backend is not available: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: &'static str,
        /// Why it cannot work.
        reason: String,
    },
    /// An argument the crate rejects before calling the kernel.
    #[error("{op} rejected{ctx}: {reason}")]
    InvalidArgument {
        /// What was being done.
        op: Op,
        /// Where.
        ctx: Ctx,
        /// What is wrong.
        reason: String,
    },
    /// An invalidation batch that the kernel handled only in part.
    #[error("IOMMU_HWPT_INVALIDATE on HWPT {}: the kernel handled {handled} of {total} entries; entry {handled} failed: {errno}: {cause}", hwpt.0)]
    PartialInvalidation {
        /// The HWPT.
        hwpt: HwptId,
        /// Entries handled (0-based index of the failed one).
        handled: u32,
        /// Entries in the batch.
        total: u32,
        /// The errno for the failed entry.
        errno: Errno,
        /// The likely cause.
        cause: String,
    },
    /// An operation the chosen backend does not provide.
    #[error("{op} is not supported by the {backend} backend")]
    Unsupported {
        /// What was asked.
        op: Op,
        /// The backend.
        backend: &'static str,
    },
}

impl Error {
    /// A kernel error with its cause decoded.
    pub fn kernel(op: Op, ctx: Ctx, errno: impl Into<Errno>) -> Self {
        let errno = errno.into();
        let cause = likely_cause(op, errno, &ctx);
        Error::Kernel {
            op,
            ctx,
            errno,
            cause,
        }
    }

    /// The errno, for kernel errors.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Kernel { errno, .. } | Error::PartialInvalidation { errno, .. } => Some(errno.0),
            _ => None,
        }
    }
}

/// The crate's result.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Bdf;

    #[test]
    fn kernel_error_names_device_range_and_cause() {
        let dev = DeviceName::Pci(Bdf {
            segment: 0,
            bus: 0,
            device: 3,
            function: 0,
        });
        let e = Error::kernel(
            Op::IoasMap,
            Ctx::device(&dev).range(0x10_0000, 0x2000),
            Errno(libc::EEXIST),
        );
        let s = e.to_string();
        assert!(s.contains("IOMMU_IOAS_MAP"), "{s}");
        assert!(s.contains("0000:00:03.0"), "{s}");
        assert!(s.contains("0x100000"), "{s}");
        assert!(s.contains("EEXIST (17)"), "{s}");
        assert!(s.contains("overlaps"), "{s}");
        assert_eq!(e.errno(), Some(libc::EEXIST));
    }

    #[test]
    fn memlock_cause_names_size() {
        let e = Error::kernel(
            Op::IoasMap,
            Ctx::default().range(0, 64 << 20),
            Errno(libc::ENOMEM),
        );
        let s = e.to_string();
        assert!(s.contains("RLIMIT_MEMLOCK"), "{s}");
        assert!(s.contains("64 MiB"), "{s}");
    }

    #[test]
    fn nest_parent_eopnotsupp_says_no_nesting() {
        let e = Error::kernel(Op::NestParentAlloc, Ctx::default(), Errno(libc::EOPNOTSUPP));
        assert!(e.to_string().contains("cannot nest"));
        let e = Error::kernel(Op::IoasMap, Ctx::default(), Errno(libc::EFAULT));
        assert!(e.to_string().contains("PFNMAP"));
    }
}
