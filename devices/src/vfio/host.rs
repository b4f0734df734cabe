//! [`VfioRegions`] for the real `vfio_ioctls::VfioDevice` (a PCI device or an mdev, opened
//! and bound to an IOAS by the `ioasid` crate).
//!
//! Region reads and writes use `pread`/`pwrite` on the device fd at the region offset
//! rather than `VfioDevice::region_read/write`, which log and swallow errors: a failed
//! config access here is an error the model can see. There is no device reset here: a guest's
//! FLR is a config write that vfio-pci itself turns into a reset, and a device is reset by
//! the kernel when the VMM opens and closes it, so `VFIO_DEVICE_RESET` had no caller.

use std::io;
use std::os::unix::io::AsRawFd;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IRQ_INFO_AUTOMASKED, VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE,
    VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, VFIO_TYPE,
};
use vfio_ioctls::{VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use super::backend::{
    IrqInfo, MmapArea, MmapWindow, RegionInfo, VfioRegions, CONFIG_REGION, INTX_IRQ,
};

ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);

/// `struct vfio_irq_set` for one vector, with room for one eventfd.
#[repr(C)]
#[derive(Default)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}

/// Size of `struct vfio_irq_set` without data.
const IRQ_SET_HEADER: u32 = 20;

/// `VFIO_DEVICE_SET_IRQS` for vector 0 of `index`, with an eventfd or no data. Kept here
/// rather than `vfio_ioctls` so the errno (`ENOTTY` from mtty's unmask eventfd) survives.
fn set_irqs_one(dev: &VfioDevice, index: u32, action: u32, fd: Option<&EventFd>) -> io::Result<()> {
    let set = IrqSetOne {
        argsz: IRQ_SET_HEADER + if fd.is_some() { 4 } else { 0 },
        flags: action
            | if fd.is_some() {
                VFIO_IRQ_SET_DATA_EVENTFD
            } else {
                VFIO_IRQ_SET_DATA_NONE
            },
        index,
        start: 0,
        count: 1,
        fd: fd.map_or(-1, |f| f.as_raw_fd()),
    };
    // SAFETY: VFIO_DEVICE_SET_IRQS reads `argsz` bytes from `set`, which is a live
    // `#[repr(C)]` vfio_irq_set header followed by the one fd `argsz` counts (or nothing);
    // the fd is this device's.
    let ret = unsafe { ioctl_with_ref(dev, VFIO_DEVICE_SET_IRQS(), &set) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Region indexes a PCI function uses (BAR0..5, ROM, config). `VfioDevice` stores regions
/// in a vector and warns on indexes past it, so nothing above config is asked for.
const LAST_PCI_REGION: u32 = CONFIG_REGION;

fn checked_range(dev: &VfioDevice, index: u32, offset: u64, len: usize) -> io::Result<u64> {
    if index > LAST_PCI_REGION {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "No such VFIO region",
        ));
    }
    let size = dev.get_region_size(index);
    let end = offset
        .checked_add(len as u64)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    if end > size {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "Access {offset:#x}+{len:#x} is outside VFIO region {index} of {size:#x} bytes"
            ),
        ));
    }
    Ok(dev.get_region_offset(index) + offset)
}

impl VfioRegions for VfioDevice {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        if index > LAST_PCI_REGION {
            return None;
        }
        let size = self.get_region_size(index);
        if size == 0 {
            return None;
        }
        let flags = self.get_region_flags(index);
        let mut info = RegionInfo {
            size,
            read: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            write: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap: flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            sparse_mmap: None,
            msix_mappable: false,
        };
        for cap in self.get_region_caps(index) {
            match cap {
                VfioRegionInfoCap::SparseMmap(s) => {
                    info.sparse_mmap = Some(
                        s.areas
                            .iter()
                            .map(|a| MmapWindow {
                                offset: a.offset,
                                len: a.size,
                            })
                            .collect(),
                    )
                }
                VfioRegionInfoCap::MsixMappable => info.msix_mappable = true,
                _ => {}
            }
        }
        Some(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let pos = checked_range(self, index, offset, data.len())?;
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `data` is a valid writable buffer of `data.len()` bytes for the call.
        let n = unsafe { libc::pread(self.as_raw_fd(), data.as_mut_ptr().cast(), data.len(), pos) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize != data.len() => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => Ok(()),
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let pos = checked_range(self, index, offset, data.len())?;
        let pos =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `data` is a valid readable buffer of `data.len()` bytes for the call.
        let n = unsafe { libc::pwrite(self.as_raw_fd(), data.as_ptr().cast(), data.len(), pos) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            n if n as usize != data.len() => Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => Ok(()),
        }
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.get_irq_info(index).map(|i| IrqInfo {
            count: i.count,
            eventfd: i.flags & VFIO_IRQ_INFO_EVENTFD != 0,
            maskable: i.flags & VFIO_IRQ_INFO_MASKABLE != 0,
            automasked: i.flags & VFIO_IRQ_INFO_AUTOMASKED != 0,
        })
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        VfioDevice::enable_irq(self, index, fds.to_vec()).map_err(io::Error::other)
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        VfioDevice::disable_irq(self, index).map_err(io::Error::other)
    }

    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()> {
        set_irqs_one(self, INTX_IRQ, VFIO_IRQ_SET_ACTION_UNMASK, Some(fd))
    }

    fn unmask_intx(&self) -> io::Result<()> {
        set_irqs_one(self, INTX_IRQ, VFIO_IRQ_SET_ACTION_UNMASK, None)
    }

    fn mmap_region(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<MmapArea> {
        let info = self
            .region_info(index)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "No such VFIO region"))?;
        if !info.mmap {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Region cannot be mmapped",
            ));
        }
        let len_usize =
            usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let pos = checked_range(self, index, offset, len_usize)?;
        MmapArea::map_fd(self.as_raw_fd(), pos, len, writable && info.write)
    }
}
