//! The narrow interface the vfio-pci model uses to reach a VFIO device: region info and
//! access, interrupt setup, reset, and mmap. [`crate::vfio::host`] implements it for
//! `vfio_ioctls::VfioDevice`; tests implement it with a fake.

use std::io;
use std::os::unix::io::RawFd;
use std::ptr::NonNull;

use vmm_sys_util::eventfd::EventFd;

/// Region index of BAR0 (BARn is `n`).
pub const BAR0_REGION: u32 = 0;
/// Region index of the expansion ROM.
pub const ROM_REGION: u32 = 6;
/// Region index of config space.
pub const CONFIG_REGION: u32 = 7;
/// IRQ index of INTx.
pub const INTX_IRQ: u32 = 0;
/// IRQ index of MSI.
pub const MSI_IRQ: u32 = 1;
/// IRQ index of MSI-X.
pub const MSIX_IRQ: u32 = 2;

/// A window of a region the device allows to be mmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapWindow {
    /// Offset in the region.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What VFIO says about one region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Readable with `region_read`.
    pub read: bool,
    /// Writable with `region_write`.
    pub write: bool,
    /// May be mmapped.
    pub mmap: bool,
    /// With `mmap`: only these windows may be mapped (sparse mmap capability). `None`: the
    /// whole region.
    pub sparse_mmap: Option<Vec<MmapWindow>>,
    /// The kernel allows mapping over the MSI-X table (we still trap it).
    pub msix_mappable: bool,
}

/// What VFIO says about one interrupt index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// Number of vectors (0: not supported).
    pub count: u32,
    /// Can signal an eventfd.
    pub eventfd: bool,
    /// Can be masked.
    pub maskable: bool,
    /// Masked by the kernel after each trigger (level-triggered INTx).
    pub automasked: bool,
}

/// A VFIO device as the vfio-pci model needs it.
pub trait VfioRegions: Send + Sync {
    /// Region `index`, or `None` if the device has no such region (or it is empty).
    fn region_info(&self, index: u32) -> Option<RegionInfo>;
    /// Reads `data.len()` bytes at `offset` of region `index`. A short or failed access is
    /// an error.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Interrupt index `index`, or `None` if the device does not report it.
    fn irq_info(&self, index: u32) -> Option<IrqInfo>;
    /// Signals `fds[i]` for vector `i` of interrupt index `index` (enables it).
    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()>;
    /// Disables every vector of interrupt index `index`.
    fn disable_irq(&self, index: u32) -> io::Result<()>;
    /// Unmasks INTx when `fd` is signalled (the VMM's resample eventfd):
    /// `VFIO_IRQ_SET_ACTION_UNMASK` with an eventfd. Some devices refuse it (mtty: `ENOTTY`).
    fn set_intx_resample(&self, fd: &EventFd) -> io::Result<()>;
    /// Unmasks INTx once (`VFIO_IRQ_SET_ACTION_UNMASK`, no data): what the model does itself
    /// after each guest EOI when the device refuses [`Self::set_intx_resample`]. The default
    /// reports it unsupported.
    fn unmask_intx(&self) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "INTx unmask is not implemented for this device",
        ))
    }
    /// Maps `len` bytes at `offset` of region `index` into this process.
    fn mmap_region(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<MmapArea>;
}

/// A shared mapping of device memory (or, in tests, anonymous memory), unmapped on drop.
#[derive(Debug)]
pub struct MmapArea {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only reached through volatile accesses
// bounded by `len`; device memory has no thread affinity.
unsafe impl Send for MmapArea {}
// SAFETY: as above; concurrent volatile accesses to MMIO are what the hardware expects.
unsafe impl Sync for MmapArea {}

impl MmapArea {
    /// Maps `len` bytes of `fd` at file offset `offset`, shared.
    pub fn map_fd(fd: RawFd, offset: u64, len: u64, writable: bool) -> io::Result<Self> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        Self::map(fd, offset, len, prot, libc::MAP_SHARED)
    }

    /// Anonymous shared memory of `len` bytes (tests, fakes).
    pub fn anonymous(len: u64) -> io::Result<Self> {
        Self::map(
            -1,
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        )
    }

    fn map(fd: RawFd, offset: u64, len: u64, prot: i32, flags: i32) -> io::Result<Self> {
        let len_usize =
            usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len_usize == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: a new mapping at an address the kernel chooses cannot alias existing Rust
        // memory; the arguments are plain values and the result is checked below.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len_usize, prot, flags, fd, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))?;
        Ok(Self {
            ptr,
            len: len_usize,
        })
    }

    /// Host virtual address of the mapping (for a KVM memory slot).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: empty mappings are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn in_bounds(&self, offset: u64, len: usize) -> Option<usize> {
        let o = usize::try_from(offset).ok()?;
        (o.checked_add(len)? <= self.len).then_some(o)
    }

    /// Reads at `offset` with one access of the natural size when `data` is 1, 2, 4 or 8
    /// bytes and aligned, byte by byte otherwise. Returns false if out of bounds.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let Some(o) = self.in_bounds(offset, data.len()) else {
            return false;
        };
        // SAFETY: `o + data.len() <= len`, so every access stays inside the live mapping;
        // the typed accesses are only used when the address is aligned for the type.
        unsafe {
            let p = self.ptr.as_ptr().add(o);
            match data.len() {
                2 if (p as usize).is_multiple_of(2) => {
                    data.copy_from_slice(&std::ptr::read_volatile(p.cast::<u16>()).to_ne_bytes())
                }
                4 if (p as usize).is_multiple_of(4) => {
                    data.copy_from_slice(&std::ptr::read_volatile(p.cast::<u32>()).to_ne_bytes())
                }
                8 if (p as usize).is_multiple_of(8) => {
                    data.copy_from_slice(&std::ptr::read_volatile(p.cast::<u64>()).to_ne_bytes())
                }
                _ => {
                    for (i, b) in data.iter_mut().enumerate() {
                        *b = std::ptr::read_volatile(p.add(i));
                    }
                }
            }
        }
        true
    }

    /// Writes at `offset`, with the same access sizes as [`Self::read`]. Returns false if
    /// out of bounds.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Some(o) = self.in_bounds(offset, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`; the mapping is writable for every area this crate writes
        // (tests and writable regions).
        unsafe {
            let p = self.ptr.as_ptr().add(o);
            match data.len() {
                2 if (p as usize).is_multiple_of(2) => std::ptr::write_volatile(
                    p.cast::<u16>(),
                    u16::from_ne_bytes([data[0], data[1]]),
                ),
                4 if (p as usize).is_multiple_of(4) => std::ptr::write_volatile(
                    p.cast::<u32>(),
                    u32::from_ne_bytes([data[0], data[1], data[2], data[3]]),
                ),
                _ => {
                    for (i, b) in data.iter().enumerate() {
                        std::ptr::write_volatile(p.add(i), *b);
                    }
                }
            }
        }
        true
    }
}

impl Drop for MmapArea {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and still owns.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

/// The host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant and has no memory effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}
