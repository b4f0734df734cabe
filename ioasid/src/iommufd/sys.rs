//! Thin wrappers for the iommufd ioctls that `iommufd-ioctls` does not wrap: IOAS_COPY,
//! IOVA_RANGES, ALLOW_IOVAS, OPTION, FAULT_QUEUE_ALLOC, and the selftest's IOMMU_TEST_CMD.
//! Each function is one ioctl; it returns the raw errno on failure and leaves policy to the
//! caller.

use std::os::fd::AsRawFd;

use iommufd_bindings::iommufd::{
    iommu_fault_alloc, iommu_ioas_allow_iovas, iommu_ioas_copy, iommu_ioas_iova_ranges,
    iommu_iova_range, iommu_option, IOMMUFD_CMD_FAULT_QUEUE_ALLOC, IOMMUFD_CMD_IOAS_ALLOW_IOVAS,
    IOMMUFD_CMD_IOAS_COPY, IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_CMD_OPTION, IOMMUFD_TYPE,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use crate::error::Errno;

ioctl_io_nr!(IOMMU_IOAS_COPY, IOMMUFD_TYPE as u32, IOMMUFD_CMD_IOAS_COPY);
ioctl_io_nr!(
    IOMMU_IOAS_IOVA_RANGES,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_IOVA_RANGES
);
ioctl_io_nr!(
    IOMMU_IOAS_ALLOW_IOVAS,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_ALLOW_IOVAS
);
ioctl_io_nr!(IOMMU_OPTION, IOMMUFD_TYPE as u32, IOMMUFD_CMD_OPTION);
ioctl_io_nr!(
    IOMMU_FAULT_QUEUE_ALLOC,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC
);
// IOMMUFD_CMD_BASE + 32, from drivers/iommu/iommufd/iommufd_test.h.
ioctl_io_nr!(IOMMU_TEST_CMD, IOMMUFD_TYPE as u32, 0x80 + 32);

fn check(ret: i32) -> Result<(), Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `IOMMU_IOAS_COPY`.
pub fn ioas_copy(fd: &impl AsRawFd, arg: &mut iommu_ioas_copy) -> Result<(), Errno> {
    arg.size = std::mem::size_of::<iommu_ioas_copy>() as u32;
    // SAFETY: `arg` is a valid, exclusively borrowed iommu_ioas_copy whose size field matches
    // its type; the kernel reads it and writes back only dst_iova within it.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_IOAS_COPY(), arg) })
}

/// `IOMMU_IOAS_IOVA_RANGES`, retried with a larger array on EMSGSIZE.
pub fn ioas_iova_ranges(
    fd: &impl AsRawFd,
    ioas_id: u32,
) -> Result<(Vec<iommu_iova_range>, u64), Errno> {
    let mut ranges = vec![iommu_iova_range::default(); 8];
    loop {
        let mut arg = iommu_ioas_iova_ranges {
            size: std::mem::size_of::<iommu_ioas_iova_ranges>() as u32,
            ioas_id,
            num_iovas: ranges.len() as u32,
            __reserved: 0,
            allowed_iovas: ranges.as_mut_ptr() as u64,
            out_iova_alignment: 0,
        };
        // SAFETY: `arg` is valid for the call; `allowed_iovas` points to `num_iovas` writable
        // iommu_iova_range elements owned by `ranges`, which outlives the call. The kernel
        // writes at most `num_iovas` of them.
        let ret = unsafe { ioctl_with_mut_ref(fd, IOMMU_IOAS_IOVA_RANGES(), &mut arg) };
        if ret < 0 {
            let e = Errno::last();
            if e.0 == libc::EMSGSIZE
                && (arg.num_iovas as usize) > ranges.len()
                && arg.num_iovas <= 4096
            {
                ranges.resize(arg.num_iovas as usize, iommu_iova_range::default());
                continue;
            }
            return Err(e);
        }
        ranges.truncate(arg.num_iovas as usize);
        return Ok((ranges, arg.out_iova_alignment));
    }
}

/// `IOMMU_IOAS_ALLOW_IOVAS`.
pub fn ioas_allow_iovas(
    fd: &impl AsRawFd,
    ioas_id: u32,
    ranges: &[iommu_iova_range],
) -> Result<(), Errno> {
    let mut arg = iommu_ioas_allow_iovas {
        size: std::mem::size_of::<iommu_ioas_allow_iovas>() as u32,
        ioas_id,
        num_iovas: ranges.len() as u32,
        __reserved: 0,
        allowed_iovas: ranges.as_ptr() as u64,
    };
    // SAFETY: `arg` is valid; `allowed_iovas` points to `num_iovas` readable elements of
    // `ranges`, borrowed for the duration of the call; the kernel only reads them.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_IOAS_ALLOW_IOVAS(), &mut arg) })
}

/// `IOMMU_OPTION`.
pub fn option(fd: &impl AsRawFd, arg: &mut iommu_option) -> Result<(), Errno> {
    arg.size = std::mem::size_of::<iommu_option>() as u32;
    // SAFETY: `arg` is a valid iommu_option; the kernel writes back val64 on GET only.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_OPTION(), arg) })
}

/// `IOMMU_FAULT_QUEUE_ALLOC`: returns (fault id, fault fd). The fd is owned by the caller.
pub fn fault_queue_alloc(fd: &impl AsRawFd) -> Result<(u32, i32), Errno> {
    let mut arg = iommu_fault_alloc {
        size: std::mem::size_of::<iommu_fault_alloc>() as u32,
        ..Default::default()
    };
    // SAFETY: `arg` is a valid iommu_fault_alloc; the kernel writes the out fields.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_FAULT_QUEUE_ALLOC(), &mut arg) })?;
    Ok((arg.out_fault_id, arg.out_fault_fd as i32))
}

/// `struct iommu_test_cmd` from the kernel selftest uAPI: a header, a 48-byte union and a
/// trailing `last` field (72 bytes in all).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuTestCmd {
    /// sizeof(struct iommu_test_cmd).
    pub size: u32,
    /// `IOMMU_TEST_OP_*`.
    pub op: u32,
    /// The object the op applies to.
    pub id: u32,
    /// Must be 0.
    pub reserved: u32,
    /// The op's arguments, as 64-bit words.
    pub union: [u64; 6],
    /// Trailing field; unused.
    pub last: u32,
    /// Padding to the C size.
    pub pad: u32,
}

const _: () = assert!(std::mem::size_of::<IommuTestCmd>() == 72);

impl IommuTestCmd {
    /// A command for `op` on object `id`.
    pub fn new(op: u32, id: u32) -> Self {
        IommuTestCmd {
            size: std::mem::size_of::<Self>() as u32,
            op,
            id,
            ..Default::default()
        }
    }

    /// Sets the 32-bit field at `index` (in 32-bit units) of the union.
    pub fn set_u32(&mut self, index: usize, val: u32) {
        let word = &mut self.union[index / 2];
        if index.is_multiple_of(2) {
            *word = (*word & !0xffff_ffff) | u64::from(val);
        } else {
            *word = (*word & 0xffff_ffff) | (u64::from(val) << 32);
        }
    }

    /// Reads the 32-bit field at `index` (in 32-bit units) of the union.
    pub fn get_u32(&self, index: usize) -> u32 {
        let word = self.union[index / 2];
        if index.is_multiple_of(2) {
            word as u32
        } else {
            (word >> 32) as u32
        }
    }
}

/// `IOMMU_TEST_CMD` (only on kernels with `CONFIG_IOMMUFD_TEST`).
pub fn test_cmd(fd: &impl AsRawFd, cmd: &mut IommuTestCmd) -> Result<(), Errno> {
    // SAFETY: `cmd` is a valid, exclusively borrowed iommu_test_cmd laid out as the kernel's
    // (size asserted above); the kernel reads and writes within its `size`.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_TEST_CMD(), cmd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        // _IO(';', nr): type 0x3b in bits 8..15, nr in bits 0..7, no size, no direction.
        assert_eq!(IOMMU_IOAS_COPY(), 0x3b83);
        assert_eq!(IOMMU_IOAS_IOVA_RANGES(), 0x3b84);
        assert_eq!(IOMMU_IOAS_ALLOW_IOVAS(), 0x3b82);
        assert_eq!(IOMMU_OPTION(), 0x3b87);
        assert_eq!(IOMMU_FAULT_QUEUE_ALLOC(), 0x3b8e);
        assert_eq!(IOMMU_TEST_CMD(), 0x3ba0);
    }

    #[test]
    fn test_cmd_union_fields() {
        let mut c = IommuTestCmd::new(2, 5);
        c.set_u32(0, 0x11);
        c.set_u32(1, 0x22);
        c.set_u32(2, 0x33);
        assert_eq!(c.union[0], 0x22_0000_0011);
        assert_eq!(c.get_u32(1), 0x22);
        assert_eq!(c.get_u32(2), 0x33);
        assert_eq!(c.size, 72);
    }
}
