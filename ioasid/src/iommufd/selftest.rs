//! The kernel selftest mock IOMMU (`CONFIG_IOMMUFD_TEST`, `IOMMU_TEST_CMD`): mock devices
//! and domains, IOTLB checks and fault injection. The lab uses it to run the kernel's real
//! nesting, invalidation, IOPF and PASID code on a machine with no nesting-capable IOMMU.

use iommufd_ioctls::IommuFd;

use super::sys::{test_cmd, IommuTestCmd};
use super::IommufdBackend;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::types::{DevId, HwptId, IoasId, Pasid};

const OP_MOCK_DOMAIN: u32 = 2;
const OP_MD_CHECK_MAP: u32 = 3;
const OP_MOCK_DOMAIN_REPLACE: u32 = 10;
const OP_MOCK_DOMAIN_FLAGS: u32 = 12;
const OP_MD_CHECK_IOTLB: u32 = 14;
const OP_TRIGGER_IOPF: u32 = 15;
const OP_PASID_ATTACH: u32 = 18;
const OP_PASID_DETACH: u32 = 20;
const OP_PASID_CHECK_HWPT: u32 = 21;

/// `MOCK_FLAGS_DEVICE_PASID`: the mock device supports PASIDs (20 bits).
pub const MOCK_FLAGS_DEVICE_PASID: u32 = 1 << 2;
/// `IOMMU_TEST_IOTLB_DEFAULT`: the mock's IOTLB value after a nested HWPT is created.
pub const IOTLB_DEFAULT: u32 = 0x0bad_beef;
/// `MOCK_APERTURE_START`: the mock domain's first IOVA.
pub const MOCK_APERTURE_START: u64 = 1 << 24;
/// `MOCK_PAGE_SIZE`: the mock domain's page size.
pub const MOCK_PAGE_SIZE: u64 = 2048;

/// A mock device: the selftest device object and the iommufd device bound for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MockDevice {
    /// The selftest device object (`out_stdev_id`): what test ops take.
    pub stdev_id: u32,
    /// The HWPT the mock attached it to (`out_hwpt_id`).
    pub hwpt: HwptId,
    /// The bound device (`out_idev_id`): what HWPT_ALLOC and faults name.
    pub dev: DevId,
}

pub(crate) fn mock_domain_replace(
    fd: &IommuFd,
    stdev_id: u32,
    pt_id: u32,
) -> std::result::Result<(), Errno> {
    let mut c = IommuTestCmd::new(OP_MOCK_DOMAIN_REPLACE, stdev_id);
    c.set_u32(0, pt_id);
    test_cmd(fd, &mut c)
}

pub(crate) fn pasid_attach(
    fd: &IommuFd,
    stdev_id: u32,
    pasid: u32,
    pt_id: u32,
) -> std::result::Result<(), Errno> {
    let mut c = IommuTestCmd::new(OP_PASID_ATTACH, stdev_id);
    c.set_u32(0, pasid);
    c.set_u32(1, pt_id);
    test_cmd(fd, &mut c)
}

pub(crate) fn pasid_detach(
    fd: &IommuFd,
    stdev_id: u32,
    pasid: u32,
) -> std::result::Result<(), Errno> {
    let mut c = IommuTestCmd::new(OP_PASID_DETACH, stdev_id);
    c.set_u32(0, pasid);
    test_cmd(fd, &mut c)
}

/// Selftest operations on an iommufd backend.
#[derive(Debug)]
pub struct Selftest<'a> {
    backend: &'a IommufdBackend,
}

impl IommufdBackend {
    /// The selftest mock's operations (they fail with ENOTTY on kernels without
    /// `CONFIG_IOMMUFD_TEST`).
    pub fn selftest(&self) -> Selftest<'_> {
        Selftest { backend: self }
    }
}

impl Selftest<'_> {
    fn run(&self, c: &mut IommuTestCmd, ctx: Ctx) -> Result<()> {
        self.backend.count();
        test_cmd(&**self.backend.iommufd(), c).map_err(|e| Error::kernel(Op::TestCmd, ctx, e))
    }

    /// Creates a mock device attached to `ioas` (`IOMMU_TEST_OP_MOCK_DOMAIN[_FLAGS]`) and
    /// registers it with the backend, so `attach`/`hwpt_alloc` work on it like on a VFIO device.
    pub fn mock_domain(&self, ioas: IoasId, dev_flags: u32) -> Result<MockDevice> {
        let mut c = if dev_flags == 0 {
            IommuTestCmd::new(OP_MOCK_DOMAIN, ioas.0)
        } else {
            let mut c = IommuTestCmd::new(OP_MOCK_DOMAIN_FLAGS, ioas.0);
            c.set_u32(3, dev_flags);
            c
        };
        self.run(&mut c, Ctx::object(ioas.0))?;
        let mock = MockDevice {
            stdev_id: c.get_u32(0),
            hwpt: HwptId(c.get_u32(1)),
            dev: DevId(c.get_u32(2)),
        };
        self.backend.register_mock(mock.dev, mock.stdev_id);
        Ok(mock)
    }

    /// `IOMMU_TEST_OP_MD_CHECK_IOTLB`: whether mock IOTLB slot `iotlb_id` of nested HWPT
    /// `hwpt` holds `expected`.
    pub fn check_iotlb(&self, hwpt: HwptId, iotlb_id: u32, expected: u32) -> Result<bool> {
        let mut c = IommuTestCmd::new(OP_MD_CHECK_IOTLB, hwpt.0);
        c.set_u32(0, iotlb_id);
        c.set_u32(1, expected);
        match self.run(&mut c, Ctx::object(hwpt.0)) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `IOMMU_TEST_OP_MD_CHECK_MAP`: whether the mock domain of paging HWPT `pt` translates
    /// `[iova, iova + len)` to the process memory at `uptr`.
    pub fn check_map(&self, pt: u32, iova: u64, len: u64, uptr: u64) -> Result<bool> {
        let mut c = IommuTestCmd::new(OP_MD_CHECK_MAP, pt);
        c.union[0] = iova;
        c.union[1] = len;
        c.union[2] = uptr;
        match self.run(&mut c, Ctx::object(pt).range(iova, len)) {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.errno(), Some(libc::EINVAL) | Some(libc::ENOENT)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `IOMMU_TEST_OP_TRIGGER_IOPF`: makes the mock device raise a page request.
    pub fn trigger_iopf(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        grpid: u32,
        perm: u32,
        addr: u64,
    ) -> Result<()> {
        let mut c = IommuTestCmd::new(OP_TRIGGER_IOPF, 0);
        c.set_u32(0, dev.0);
        c.set_u32(1, pasid.map_or(0, |p| p.0));
        c.set_u32(2, grpid);
        c.set_u32(3, perm);
        c.union[2] = addr;
        self.run(&mut c, Ctx::default().range(addr, 0))
    }

    /// `IOMMU_TEST_OP_PASID_CHECK_HWPT`: whether `pasid` of the mock device is attached to
    /// `hwpt` (pass HwptId(0) to check that it is detached).
    pub fn pasid_check_hwpt(&self, mock: &MockDevice, pasid: Pasid, hwpt: HwptId) -> Result<bool> {
        let mut c = IommuTestCmd::new(OP_PASID_CHECK_HWPT, mock.stdev_id);
        c.set_u32(0, pasid.0);
        c.set_u32(1, hwpt.0);
        match self.run(&mut c, Ctx::default().pasid(pasid)) {
            Ok(()) => Ok(true),
            Err(e) if e.errno() == Some(libc::EINVAL) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
