//! A VFIO device opened in no-IOMMU mode inside the L3 guest (legacy group API).
//!
//! L3 has no IOMMU, so `vfio.enable_unsafe_noiommu_mode=1` lets vfio-pci bind with a
//! `/dev/vfio/noiommu-N` group. DMA then uses guest-physical addresses: exactly what proves
//! that the VMM (L2) mapped L3's RAM into edu's IOAS at IOVA = GPA.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_irq_set, vfio_region_info, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD,
    VFIO_NOIOMMU_IOMMU,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_val};
use vmm_sys_util::ioctl_io_nr;

const VFIO_TYPE: u32 = b';' as u32;
ioctl_io_nr!(VFIO_SET_IOMMU, VFIO_TYPE, 102);
ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, VFIO_TYPE, 104);
ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, VFIO_TYPE, 106);
ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, 108);
ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE, 110);

/// The config-space region index of a vfio-pci device.
pub const CONFIG_REGION: u32 = 7;
/// The MSI interrupt index of a vfio-pci device.
pub const MSI_IRQ_INDEX: u32 = 1;

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// One region's offset and size within the device fd.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// Offset of the region in the device fd.
    pub offset: u64,
    /// Size of the region.
    pub size: u64,
}

/// An open no-IOMMU VFIO device with its container and group.
#[derive(Debug)]
pub struct NoiommuDevice {
    _container: File,
    _group: File,
    device: File,
}

impl NoiommuDevice {
    /// Opens the device `bdf`, which must already be bound to vfio-pci, through its no-IOMMU
    /// group.
    pub fn open(bdf: &str) -> Result<Self, String> {
        let link = std::fs::read_link(format!("/sys/bus/pci/devices/{bdf}/iommu_group"))
            .map_err(|e| format!("{bdf} has no iommu_group link (vfio-pci not bound?): {e}"))?;
        let group_nr = link
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("{bdf}: odd iommu_group link {}", link.display()))?
            .to_string();
        let group_path = format!("/dev/vfio/noiommu-{group_nr}");
        let rw = |p: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(Path::new(p))
                .map_err(|e| format!("cannot open {p}: {e}"))
        };
        let container = rw("/dev/vfio/vfio")?;
        let group = rw(&group_path)?;
        let cfd = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) through the
        // pointer, which points at a live local.
        let r = unsafe { ioctl_with_ptr(&group, VFIO_GROUP_SET_CONTAINER(), &cfd) };
        if r < 0 {
            return Err(os_err(&format!("VFIO_GROUP_SET_CONTAINER on {group_path}")));
        }
        // SAFETY: VFIO_SET_IOMMU takes the IOMMU type by value.
        let r = unsafe {
            ioctl_with_val(
                &container,
                VFIO_SET_IOMMU(),
                libc::c_ulong::from(VFIO_NOIOMMU_IOMMU),
            )
        };
        if r < 0 {
            return Err(os_err("VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU)"));
        }
        let name = CString::new(bdf).map_err(|_| format!("bad BDF {bdf:?}"))?;
        // SAFETY: the argument is a NUL-terminated string that outlives the call; the
        // return value is a new fd or negative.
        let fd = unsafe { ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        if fd < 0 {
            return Err(os_err(&format!("VFIO_GROUP_GET_DEVICE_FD({bdf})")));
        }
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        let device = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(NoiommuDevice {
            _container: container,
            _group: group,
            device,
        })
    }

    /// The device fd.
    pub fn fd(&self) -> &File {
        &self.device
    }

    /// Region `index`'s offset and size.
    pub fn region(&self, index: u32) -> Result<Region, String> {
        let mut info = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: the kernel writes at most argsz bytes into `info`, a live local.
        let r =
            unsafe { ioctl_with_mut_ref(&self.device, VFIO_DEVICE_GET_REGION_INFO(), &mut info) };
        if r < 0 {
            return Err(os_err(&format!("VFIO_DEVICE_GET_REGION_INFO({index})")));
        }
        Ok(Region {
            offset: info.offset,
            size: info.size,
        })
    }

    /// Reads `buf.len()` bytes of config space at `off`.
    pub fn config_read(&self, off: u64, buf: &mut [u8]) -> Result<(), String> {
        let r = self.region(CONFIG_REGION)?;
        self.device
            .read_exact_at(buf, r.offset + off)
            .map_err(|e| format!("config read at {off:#x}: {e}"))
    }

    /// Writes `buf` to config space at `off`.
    pub fn config_write(&self, off: u64, buf: &[u8]) -> Result<(), String> {
        let r = self.region(CONFIG_REGION)?;
        self.device
            .write_all_at(buf, r.offset + off)
            .map_err(|e| format!("config write at {off:#x}: {e}"))
    }

    /// Routes vector 0 of interrupt `index` (MSI: [`MSI_IRQ_INDEX`]) to `efd`.
    pub fn set_irq_eventfd(&self, index: u32, efd: &EventFd) -> Result<(), String> {
        #[repr(C)]
        struct IrqSetOne {
            head: vfio_irq_set,
            fd: i32,
        }
        let mut set = IrqSetOne {
            head: vfio_irq_set {
                argsz: std::mem::size_of::<IrqSetOne>() as u32,
                flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count: 1,
                ..Default::default()
            },
            fd: efd.as_raw_fd(),
        };
        // SAFETY: argsz covers the header plus one fd, all in the live local `set`.
        let r = unsafe { ioctl_with_mut_ref(&self.device, VFIO_DEVICE_SET_IRQS(), &mut set) };
        if r < 0 {
            return Err(os_err(&format!(
                "VFIO_DEVICE_SET_IRQS(index {index}, eventfd)"
            )));
        }
        Ok(())
    }
}
