//! Thin wrappers for the iommufd ioctls that `iommufd-ioctls` does not wrap, or wraps without
//! the kernel's write-back: IOAS_MAP and IOAS_MAP_FILE (the kernel-chosen IOVA), IOAS_COPY,
//! IOVA_RANGES, ALLOW_IOVAS, OPTION, FAULT_QUEUE_ALLOC, and the selftest's IOMMU_TEST_CMD;
//! plus `VFIO_DEVICE_BIND_IOMMUFD` and `VFIO_DEVICE_ATTACH_IOMMUFD_PT` on a VFIO cdev, whose
//! written-back ids `vfio-ioctls` keeps private or drops. Each function is one ioctl; it returns the raw errno on failure and leaves policy to the
//! caller.

use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::vfio_device_attach_iommufd_pt;

use iommufd_bindings::iommufd::{
    iommu_fault_alloc, iommu_ioas_allow_iovas, iommu_ioas_copy, iommu_ioas_iova_ranges,
    iommu_ioas_map, iommu_ioas_map_file, iommu_iova_range, iommu_option,
    IOMMUFD_CMD_FAULT_QUEUE_ALLOC, IOMMUFD_CMD_IOAS_ALLOW_IOVAS, IOMMUFD_CMD_IOAS_COPY,
    IOMMUFD_CMD_IOAS_IOVA_RANGES, IOMMUFD_CMD_IOAS_MAP, IOMMUFD_CMD_IOAS_MAP_FILE,
    IOMMUFD_CMD_OPTION, IOMMUFD_TYPE,
};
use vfio_bindings::bindings::vfio::vfio_device_bind_iommufd;
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_io_nr;

use crate::error::Errno;

ioctl_io_nr!(IOMMU_IOAS_MAP, IOMMUFD_TYPE as u32, IOMMUFD_CMD_IOAS_MAP);
ioctl_io_nr!(
    IOMMU_IOAS_MAP_FILE,
    IOMMUFD_TYPE as u32,
    IOMMUFD_CMD_IOAS_MAP_FILE
);
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
/// `VFIO_TYPE` (`';'`) of include/uapi/linux/vfio.h.
const VFIO_TYPE: u32 = 0x3b;
/// `VFIO_BASE` of include/uapi/linux/vfio.h.
const VFIO_BASE: u32 = 100;
// `_IO(VFIO_TYPE, VFIO_BASE + 18)` in include/uapi/linux/vfio.h (Linux 6.6 and later).
ioctl_io_nr!(VFIO_DEVICE_BIND_IOMMUFD, VFIO_TYPE, VFIO_BASE + 18);
// `_IO(VFIO_TYPE, VFIO_BASE + 19)` in include/uapi/linux/vfio.h (Linux 6.6 and later).
ioctl_io_nr!(VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_TYPE, VFIO_BASE + 19);

fn check(ret: i32) -> Result<(), Errno> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// `IOMMU_IOAS_MAP` of process memory; the kernel writes back the IOVA it chose (without
/// `FIXED_IOVA`).
///
/// # Safety
///
/// `arg.user_va .. + arg.length` must be memory of this process that stays mapped, and is
/// not handed back to the allocator, for as long as the mapping exists: the device may
/// read and write it at any time (the contract of `IommuBackend::ioas_map`).
pub unsafe fn ioas_map(fd: &impl AsRawFd, arg: &mut iommu_ioas_map) -> Result<(), Errno> {
    arg.size = std::mem::size_of::<iommu_ioas_map>() as u32;
    // SAFETY: `arg` is a valid, exclusively borrowed iommu_ioas_map with its size set; the
    // kernel writes back `iova` only. The memory contract for `user_va` is the caller's.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_IOAS_MAP(), arg) })
}

/// `IOMMU_IOAS_MAP_FILE`: maps a range of a memfd; the kernel writes back the IOVA.
pub fn ioas_map_file(fd: &impl AsRawFd, arg: &mut iommu_ioas_map_file) -> Result<(), Errno> {
    arg.size = std::mem::size_of::<iommu_ioas_map_file>() as u32;
    // SAFETY: `arg` is a valid, exclusively borrowed iommu_ioas_map_file with its size set;
    // the kernel pins the file's pages itself (no process memory contract) and writes back
    // `iova` only.
    check(unsafe { ioctl_with_mut_ref(fd, IOMMU_IOAS_MAP_FILE(), arg) })
}

/// `VFIO_DEVICE_BIND_IOMMUFD` on a VFIO cdev: binds it to `iommufd` and returns the device id
/// the kernel writes back.
pub fn device_bind_iommufd(dev: &impl AsRawFd, iommufd: i32) -> Result<u32, Errno> {
    let mut bind = vfio_device_bind_iommufd {
        argsz: std::mem::size_of::<vfio_device_bind_iommufd>() as u32,
        flags: 0,
        iommufd,
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: `bind` is a valid vfio_device_bind_iommufd with its argsz set, borrowed
    // exclusively for the call; the kernel writes `out_devid` only. On a fd that is not a
    // VFIO cdev the ioctl fails without touching memory.
    check(unsafe { ioctl_with_mut_ref(dev, VFIO_DEVICE_BIND_IOMMUFD(), &mut bind) })?;
    Ok(bind.out_devid)
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

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` on the VFIO cdev `dev`, for the RID (no PASID): attaches
/// it to the IOAS or HWPT `pt_id` (replacing, hitlessly, what it was attached to) and returns
/// the `pt_id` the kernel writes back. For an IOAS that is the paging HWPT the kernel found
/// or created for the device; an emulated device (mdev, which reaches the IOAS through an
/// iommufd access, not a HWPT) gets the IOAS id itself back.
pub fn device_attach_pt(dev: &impl AsRawFd, pt_id: u32) -> Result<u32, Errno> {
    let mut arg = vfio_device_attach_iommufd_pt {
        argsz: std::mem::size_of::<vfio_device_attach_iommufd_pt>() as u32,
        flags: 0,
        pt_id,
        pasid: 0,
    };
    // SAFETY: `arg` is a valid, exclusively borrowed vfio_device_attach_iommufd_pt laid out
    // as the kernel's (size and offsets tested below) with argsz set to its size; the kernel
    // reads at most argsz bytes and writes back `pt_id` only. On any other fd the ioctl
    // fails (ENOTTY) without touching memory.
    check(unsafe { ioctl_with_mut_ref(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT(), &mut arg) })?;
    Ok(arg.pt_id)
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
        // _IO(';', 100 + 19), the value of include/uapi/linux/vfio.h (Linux 6.6+).
        assert_eq!(VFIO_DEVICE_ATTACH_IOMMUFD_PT(), 0x3b77);
    }

    /// The `VFIO_BASE + N` of `#define NAME _IO(VFIO_TYPE, VFIO_BASE + N)` in a vfio.h.
    fn vfio_nr_in_header(header: &str, name: &str) -> Option<u32> {
        let line = header.lines().find(|l| {
            l.trim_start()
                .strip_prefix("#define")
                .is_some_and(|r| r.split_whitespace().next() == Some(name))
        })?;
        let rest = line.split("_IO(VFIO_TYPE,").nth(1)?;
        let n = rest.split("VFIO_BASE").nth(1)?.trim_start();
        let n = n.strip_prefix('+')?.trim_start();
        let digits: String = n.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    #[test]
    fn attach_pt_number_matches_the_installed_header() {
        // IOASID_VFIO_H points at another vfio.h (e.g. a kernel tree's include/uapi).
        let path = std::env::var("IOASID_VFIO_H")
            .unwrap_or_else(|_| "/usr/include/linux/vfio.h".to_string());
        let Ok(header) = std::fs::read_to_string(&path) else {
            crate::test_skip::record("", &format!("no {path}"));
            return;
        };
        let Some(n) = vfio_nr_in_header(&header, "VFIO_DEVICE_ATTACH_IOMMUFD_PT") else {
            crate::test_skip::record(
                "",
                &format!(
                    "{path} predates VFIO_DEVICE_ATTACH_IOMMUFD_PT (Linux < 6.6 uAPI headers)"
                ),
            );
            return;
        };
        assert_eq!(
            VFIO_DEVICE_ATTACH_IOMMUFD_PT(),
            u64::from((VFIO_TYPE << 8) | (VFIO_BASE + n))
        );
    }

    #[test]
    fn header_parser_reads_the_define() {
        let h = "#define VFIO_DEVICE_BIND_IOMMUFD\t_IO(VFIO_TYPE, VFIO_BASE + 18)\n\
                 #define VFIO_DEVICE_ATTACH_IOMMUFD_PT\t\t_IO(VFIO_TYPE, VFIO_BASE + 19)\n";
        assert_eq!(
            vfio_nr_in_header(h, "VFIO_DEVICE_ATTACH_IOMMUFD_PT"),
            Some(19)
        );
        assert_eq!(vfio_nr_in_header(h, "VFIO_DEVICE_BIND_IOMMUFD"), Some(18));
        assert_eq!(vfio_nr_in_header(h, "VFIO_DEVICE_DETACH_IOMMUFD_PT"), None);
    }

    #[test]
    fn attach_pt_struct_layout() {
        // struct vfio_device_attach_iommufd_pt { __u32 argsz, flags, pt_id, pasid; }
        assert_eq!(std::mem::size_of::<vfio_device_attach_iommufd_pt>(), 16);
        assert_eq!(
            std::mem::offset_of!(vfio_device_attach_iommufd_pt, argsz),
            0
        );
        assert_eq!(
            std::mem::offset_of!(vfio_device_attach_iommufd_pt, flags),
            4
        );
        assert_eq!(
            std::mem::offset_of!(vfio_device_attach_iommufd_pt, pt_id),
            8
        );
        assert_eq!(
            std::mem::offset_of!(vfio_device_attach_iommufd_pt, pasid),
            12
        );
    }

    #[test]
    fn attach_pt_on_a_non_vfio_fd_returns_the_errno() {
        let null = std::fs::File::open("/dev/null");
        let Ok(null) = null else {
            crate::test_skip::record("", "no /dev/null");
            return;
        };
        assert_eq!(device_attach_pt(&null, 1), Err(Errno(libc::ENOTTY)));
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
