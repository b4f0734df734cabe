//! IOASes on an iommufd: allocation, maps of process memory and of memfds, unmap, copy
//! between IOASes, the usable IOVA ranges, and the IOAS options.

use std::sync::atomic::Ordering;

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
}
