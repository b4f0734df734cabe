//! A driver for QEMU's `edu` test device (1234:11e8) through a mapped BAR0.
//!
//! Registers (QEMU docs/specs/edu.rst): 0x00 ident (0x010000ed), 0x04 liveness (reads back
//! the inverse), 0x08 factorial, 0x20 status, 0x80 DMA source, 0x88 DMA destination, 0x90 DMA
//! count, 0x98 DMA command (bit 0 start, bit 1 direction: 1 = device to RAM, bit 2 raise an
//! interrupt). The device's own buffer is at device address 0x40000 (4 KiB). Its DMA mask is
//! 28 bits, so IOVAs must stay below 256 MiB.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vfio_ioctls::VfioDevice;

/// edu's ident register value.
pub const EDU_IDENT: u32 = 0x0100_00ed;
/// edu's internal DMA buffer address.
pub const EDU_BUF: u64 = 0x40000;
/// edu's internal DMA buffer size.
pub const EDU_BUF_LEN: usize = 4096;

/// BAR0 of an edu device, mmap-ed from its VFIO region.
#[derive(Debug)]
pub struct Edu {
    base: *mut u8,
    len: usize,
}

impl Edu {
    /// Maps BAR0 (VFIO region 0) of `dev`, and enables memory decode and bus mastering in
    /// its command register (QEMU drops the DMA of a device that is not a bus master).
    pub fn map(dev: &VfioDevice) -> Result<Self, String> {
        let cfg = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
        let mut cmd = [0u8; 2];
        dev.region_read(cfg, &mut cmd, 4);
        let want = u16::from_le_bytes(cmd) | 0x6;
        dev.region_write(cfg, &want.to_le_bytes(), 4);
        dev.region_read(cfg, &mut cmd, 4);
        if u16::from_le_bytes(cmd) & 0x6 != 0x6 {
            return Err(format!(
                "PCI command register {:#06x}: memory/bus-master enable did not stick",
                u16::from_le_bytes(cmd)
            ));
        }
        Self::map_region(dev, dev.get_region_offset(0), dev.get_region_size(0))
    }

    /// Maps BAR0 from a VFIO device fd at `off` (its region offset), `len` bytes. The caller
    /// has enabled memory decode and bus mastering.
    pub fn map_region(fd: &impl AsRawFd, off: u64, len: u64) -> Result<Self, String> {
        let len = usize::try_from(len).map_err(|_| format!("BAR0 of {len} bytes"))?;
        if len < 0x100 {
            return Err(format!("BAR0 is {len} bytes: not an edu device"));
        }
        // SAFETY: a shared mapping of the VFIO device fd at BAR0's region offset and size,
        // as VFIO documents; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap of BAR0 failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Edu {
            base: p.cast(),
            len,
        })
    }

    /// A 32-bit register read.
    pub fn read32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: off + 4 <= len, inside the BAR mapping; MMIO needs volatile, aligned access.
        unsafe { self.base.add(off).cast::<u32>().read_volatile() }
    }

    /// A 32-bit register write.
    pub fn write32(&self, off: usize, v: u32) {
        assert!(off + 4 <= self.len);
        // SAFETY: as in read32.
        unsafe { self.base.add(off).cast::<u32>().write_volatile(v) }
    }

    /// A 64-bit register write (edu takes 8-byte accesses at 0x80 and above).
    pub fn write64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: as in read32.
        unsafe { self.base.add(off).cast::<u64>().write_volatile(v) }
    }

    /// Runs one DMA transfer and waits for it (edu takes ~100 ms per transfer under TCG).
    pub fn dma(&self, src: u64, dst: u64, len: u32, to_ram: bool) -> Result<(), String> {
        self.write64(0x80, src);
        self.write64(0x88, dst);
        self.write64(0x90, u64::from(len));
        self.write64(0x98, 1 | if to_ram { 2 } else { 0 });
        let start = Instant::now();
        while self.read32(0x98) & 1 != 0 {
            if start.elapsed() > Duration::from_secs(10) {
                return Err("edu DMA did not complete within 10 s".to_string());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Copies `len` bytes from `iova_src` (RAM) into the device, then from the device to
    /// `iova_dst` (RAM).
    pub fn round_trip(&self, iova_src: u64, iova_dst: u64, len: u32) -> Result<(), String> {
        self.dma(iova_src, EDU_BUF, len, false)?;
        self.dma(EDU_BUF, iova_dst, len, true)
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly the mapping created in `map`.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}
