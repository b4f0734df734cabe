//! IOASes on an iommufd: allocation, maps of process memory and of memfds, unmap, copy
//! between IOASes, the usable IOVA ranges, and the IOAS options.

use std::sync::atomic::Ordering;

use iommufd_ioctls::IommuFd;

use iommufd_bindings::iommufd::*;

use super::{errno_of, sys, IommufdBackend};
use crate::backend::{CopyRequest, MapFile, MapUser};
use crate::error::{Ctx, Error, Op, Result};
use crate::types::{IoasId, IovaRange, IovaRanges, Perm};

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

impl IommufdBackend {
    /// [`IommuBackend::ioas_alloc`](crate::backend::IommuBackend::ioas_alloc).
    pub(super) fn alloc_ioas(&self) -> Result<IoasId> {
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

    /// [`IommuBackend::ioas_map`](crate::backend::IommuBackend::ioas_map).
    ///
    /// # Safety
    ///
    /// As `IommuBackend::ioas_map`: the user range stays mapped while the IOAS maps it.
    pub(super) unsafe fn map_user(&self, ioas: IoasId, req: &MapUser) -> Result<u64> {
        let mut m = iommu_ioas_map {
            size: 0,
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
        // reference and cannot return a kernel-chosen IOVA.
        // SAFETY: the caller keeps `user_va .. + len` mapped while the IOAS maps it (this
        // fn's contract, which is the trait's).
        unsafe { sys::ioas_map(&*self.fd, &mut m) }.map_err(|e| {
            Error::kernel(
                Op::IoasMap,
                Ctx::object(ioas.0).range(req.iova.unwrap_or(0), req.len),
                e,
            )
        })?;
        Ok(m.iova)
    }

    /// [`IommuBackend::ioas_map_file`](crate::backend::IommuBackend::ioas_map_file).
    pub(super) fn map_file(&self, ioas: IoasId, req: &MapFile) -> Result<u64> {
        let mut map = iommu_ioas_map_file {
            size: 0,
            flags: map_flags(req.perm, req.iova.is_some()),
            ioas_id: ioas.0,
            fd: req.fd,
            start: req.start,
            length: req.len,
            iova: req.iova.unwrap_or(0),
        };
        self.count();
        self.counters.maps.fetch_add(1, Ordering::Relaxed);
        sys::ioas_map_file(&*self.fd, &mut map).map_err(|e| {
            Error::kernel(
                Op::IoasMapFile,
                Ctx::object(ioas.0).range(req.iova.unwrap_or(0), req.len),
                e,
            )
        })?;
        Ok(map.iova)
    }

    /// [`IommuBackend::ioas_unmap`](crate::backend::IommuBackend::ioas_unmap).
    pub(super) fn unmap_range(&self, ioas: IoasId, iova: u64, len: u64) -> Result<u64> {
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

    /// [`IommuBackend::ioas_copy`](crate::backend::IommuBackend::ioas_copy).
    pub(super) fn copy_range(&self, req: &CopyRequest) -> Result<u64> {
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

    /// [`IommuBackend::iova_ranges`](crate::backend::IommuBackend::iova_ranges).
    pub(super) fn ranges_of(&self, ioas: IoasId) -> Result<IovaRanges> {
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

    /// [`IommuBackend::allow_iovas`](crate::backend::IommuBackend::allow_iovas).
    pub(super) fn allow_ranges(&self, ioas: IoasId, ranges: &[IovaRange]) -> Result<()> {
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

    /// `IOMMU_OPTION` `HUGE_PAGES` SET on an IOAS: true lets the IOMMU map physically
    /// contiguous pages with large IOPTEs (the kernel's default), false forces 4 KiB IOPTEs.
    /// Turning it off fails (EINVAL) once the IOAS holds a mapping or a device is attached.
    pub fn set_huge_pages(&self, ioas: IoasId, on: bool) -> Result<()> {
        let mut opt = option_arg(
            iommufd_option_IOMMU_OPTION_HUGE_PAGES,
            iommufd_option_ops_IOMMU_OPTION_OP_SET,
            ioas.0,
            u64::from(on),
        );
        self.count();
        sys::option(&*self.fd, &mut opt)
            .map_err(|e| Error::kernel(Op::SetOption, Ctx::object(ioas.0), e))
    }

    /// `IOMMU_OPTION` `HUGE_PAGES` GET: whether the IOAS may use large IOPTEs.
    pub fn huge_pages(&self, ioas: IoasId) -> Result<bool> {
        let mut opt = option_arg(
            iommufd_option_IOMMU_OPTION_HUGE_PAGES,
            iommufd_option_ops_IOMMU_OPTION_OP_GET,
            ioas.0,
            0,
        );
        self.count();
        sys::option(&*self.fd, &mut opt)
            .map_err(|e| Error::kernel(Op::SetOption, Ctx::object(ioas.0), e))?;
        Ok(opt.val64 != 0)
    }

    /// `IOMMU_OPTION` `RLIMIT_MODE` GET: how this iommufd charges pinned pages.
    pub fn pin_accounting(&self) -> Result<PinAccounting> {
        let mut opt = option_arg(
            iommufd_option_IOMMU_OPTION_RLIMIT_MODE,
            iommufd_option_ops_IOMMU_OPTION_OP_GET,
            0,
            0,
        );
        self.count();
        sys::option(&*self.fd, &mut opt)
            .map_err(|e| Error::kernel(Op::SetOption, Ctx::default(), e))?;
        Ok(if opt.val64 != 0 {
            PinAccounting::Process
        } else {
            PinAccounting::User
        })
    }
}

/// `IOMMU_OPTION` `RLIMIT_MODE` SET (for the whole iommufd): how pinned pages are charged
/// against RLIMIT_MEMLOCK. Needs CAP_SYS_RESOURCE (EPERM without), and an iommufd that holds
/// no object yet (EBUSY), which is why
/// [`IommufdBackend::from_file_with`] sets it before its first allocation.
pub(super) fn set_pin_accounting(fd: &IommuFd, mode: PinAccounting) -> Result<()> {
    let mut opt = option_arg(
        iommufd_option_IOMMU_OPTION_RLIMIT_MODE,
        iommufd_option_ops_IOMMU_OPTION_OP_SET,
        0,
        u64::from(mode == PinAccounting::Process),
    );
    sys::option(fd, &mut opt).map_err(|e| Error::kernel(Op::SetOption, Ctx::default(), e))
}

/// An `iommu_option` for `option_id`/`op` on `object_id` (0: the iommufd itself).
fn option_arg(option_id: u32, op: u32, object_id: u32, val64: u64) -> iommu_option {
    iommu_option {
        option_id,
        op: op as u16,
        object_id,
        val64,
        ..Default::default()
    }
}

/// How an iommufd charges the pages it pins against RLIMIT_MEMLOCK (`IOMMU_OPTION_RLIMIT_MODE`).
/// A task with CAP_IPC_LOCK that maps is charged nothing in either mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum PinAccounting {
    /// Per user (`user->locked_vm`), the iommufd default: all processes of the user share
    /// one limit.
    #[default]
    User,
    /// Per process (`mm->pinned_vm`), as the VFIO type1 container charges: the limit of
    /// the VMM process alone, so a VM's memlock budget is the same on both backends.
    Process,
}
