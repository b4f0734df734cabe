//! Guest memory for the lab's "VM without vCPUs": one memfd, mmapped, carved into regions at
//! guest-physical addresses, and mapped into an IOAS once per region with IOVA = GPA (what a
//! VMM does for its RAM slots).
//!
//! The memory is only accessed with volatile reads and writes of raw pointers: once a region
//! is mapped into an IOAS, a device may write it at any time, so no Rust reference to it may
//! exist (the contract of `IommuBackend::ioas_map`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use ioasid::{IoasId, IommuBackend, MapFile, MapUser, Perm};

/// One region of guest RAM: `len` bytes at guest-physical `gpa`, backed by the memfd at
/// `file_offset`.
#[derive(Debug)]
pub struct RamRegion {
    /// Guest-physical address (and IOVA) of the first byte.
    pub gpa: u64,
    /// Length in bytes (a multiple of 4 KiB).
    pub len: u64,
    /// Offset of the region in the memfd.
    pub file_offset: u64,
    host: NonNull<u8>,
}

impl RamRegion {
    /// The host virtual address of the first byte (for a type1 map or a KVM slot).
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.len)
    }
}

/// Guest RAM: a memfd holding every region back to back, each mmapped shared.
#[derive(Debug)]
pub struct GuestRam {
    fd: OwnedFd,
    regions: Vec<RamRegion>,
}

// SAFETY: the mappings are owned by this value and only accessed with volatile operations
// through `&self`; nothing in them is tied to a thread.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// RAM with one region per `(gpa, len)`. GPAs and lengths must be 4 KiB aligned and the
    /// regions must not overlap.
    pub fn new(layout: &[(u64, u64)]) -> io::Result<Self> {
        let bad = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        for (i, &(gpa, len)) in layout.iter().enumerate() {
            if len == 0 || gpa % 4096 != 0 || len % 4096 != 0 {
                return Err(bad(format!(
                    "Guest RAM region {gpa:#x}+{len:#x} is empty or not 4 KiB aligned"
                )));
            }
            for &(g2, l2) in &layout[..i] {
                if gpa < g2 + l2 && g2 < gpa + len {
                    return Err(bad(format!(
                        "Guest RAM regions {gpa:#x}+{len:#x} and {g2:#x}+{l2:#x} overlap"
                    )));
                }
            }
        }
        let total: u64 = layout.iter().map(|r| r.1).sum();
        let name = CString::new("lab-guest-ram").map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string; the result is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd this function owns from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(total).map_err(|e| bad(e.to_string()))?;
        // SAFETY: ftruncate on our own memfd with a checked size.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ram = GuestRam {
            fd,
            regions: Vec::with_capacity(layout.len()),
        };
        let mut off = 0u64;
        for &(gpa, len) in layout {
            let ulen = usize::try_from(len).map_err(|e| bad(e.to_string()))?;
            let foff = libc::off_t::try_from(off).map_err(|e| bad(e.to_string()))?;
            // SAFETY: a new shared mapping of our memfd at a kernel-chosen address (no aliasing
            // of Rust memory), inside the file's size; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ulen,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    ram.fd.as_raw_fd(),
                    foff,
                )
            };
            if p == libc::MAP_FAILED {
                // Regions mapped so far are unmapped by `ram`'s drop.
                return Err(io::Error::last_os_error());
            }
            let host =
                NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
            ram.regions.push(RamRegion {
                gpa,
                len,
                file_offset: off,
                host,
            });
            off += len;
        }
        Ok(ram)
    }

    /// The regions, in the order given.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The memfd.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The host pointer of `[gpa, gpa + len)`, if it lies inside one region.
    fn host(&self, gpa: u64, len: usize) -> io::Result<*mut u8> {
        let r = self
            .regions
            .iter()
            .find(|r| r.contains(gpa, len as u64))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("Guest range {gpa:#x}+{len:#x} is not inside one RAM region"),
                )
            })?;
        // The offset is below the region's length, which fits a usize (it was mmapped).
        let off = (gpa - r.gpa) as usize;
        // SAFETY: `off + len <= r.len`, so the pointer stays inside the region's mapping.
        Ok(unsafe { r.host.as_ptr().add(off) })
    }

    /// Writes `data` at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> io::Result<()> {
        let p = self.host(gpa, data.len())?;
        for (i, b) in data.iter().enumerate() {
            // SAFETY: `host` checked `[gpa, gpa + len)`; volatile because a device may access
            // the memory concurrently.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    /// Reads `len` bytes at `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> io::Result<Vec<u8>> {
        let p = self.host(gpa, len)?;
        // SAFETY: as in `write`.
        Ok((0..len)
            .map(|i| unsafe { p.add(i).read_volatile() })
            .collect())
    }

    /// Fills `[gpa, gpa + len)` with `b`.
    pub fn fill(&self, gpa: u64, len: usize, b: u8) -> io::Result<()> {
        let p = self.host(gpa, len)?;
        for i in 0..len {
            // SAFETY: as in `write`.
            unsafe { p.add(i).write_volatile(b) };
        }
        Ok(())
    }

    /// A hash (FNV-1a over 64-bit words) of every region's contents: a cheap way to prove
    /// that nothing in guest RAM changed.
    pub fn digest(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for r in &self.regions {
            let words = (r.len / 8) as usize;
            let p = r.host.as_ptr().cast::<u64>();
            for i in 0..words {
                // SAFETY: `i * 8 + 8 <= len`, inside the region's page-aligned mapping, so the
                // u64 access is in bounds and aligned; volatile as in `write`.
                let w = unsafe { p.add(i).read_volatile() };
                h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }

    /// Maps every region into `ioas` with `IOMMU_IOAS_MAP_FILE` at IOVA = GPA: one map per
    /// region. Returns the number of maps made.
    pub fn map_file_into(&self, backend: &dyn IommuBackend, ioas: IoasId) -> ioasid::Result<usize> {
        for r in &self.regions {
            backend.ioas_map_file(
                ioas,
                &MapFile {
                    iova: Some(r.gpa),
                    fd: self.fd(),
                    start: r.file_offset,
                    len: r.len,
                    perm: Perm::RW,
                },
            )?;
        }
        Ok(self.regions.len())
    }

    /// Maps every region into `ioas` by host address (the only way type1 can) at IOVA = GPA:
    /// one map per region. Returns the number of maps made.
    ///
    /// # Safety
    ///
    /// `self` must outlive the mappings: the caller unmaps them, or drops the backend (which
    /// tears down the IOAS), before dropping this `GuestRam`.
    pub unsafe fn map_user_into(
        &self,
        backend: &dyn IommuBackend,
        ioas: IoasId,
    ) -> ioasid::Result<usize> {
        for r in &self.regions {
            // SAFETY: the region stays mapped while `self` lives (the caller's contract) and
            // is only accessed through volatile raw-pointer operations.
            unsafe {
                backend.ioas_map(
                    ioas,
                    &MapUser {
                        iova: Some(r.gpa),
                        user_va: r.host_addr(),
                        len: r.len,
                        perm: Perm::RW,
                    },
                )
            }?;
        }
        Ok(self.regions.len())
    }
}

/// Lifts `RLIMIT_MEMLOCK` to unlimited (the lab runs as root). iommufd accounts the pages an
/// IOAS pins against the user's locked-memory limit, which defaults to 8 MiB, with no
/// `CAP_IPC_LOCK` exemption (type1 exempts it), so a VMM operator raises it for guest RAM the
/// same way. Returns the previous soft limit when it changed it.
pub fn lift_memlock_limit() -> io::Result<Option<u64>> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `cur` is a valid rlimit the call writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if cur.rlim_cur == libc::RLIM_INFINITY {
        return Ok(None);
    }
    let new = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `new` is a valid rlimit the call reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Some(cur.rlim_cur))
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        for r in &self.regions {
            // SAFETY: `host`/`len` describe a mapping `new` created and this value owns.
            unsafe { libc::munmap(r.host.as_ptr().cast(), r.len as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn regions_read_write_and_bounds() {
        let ram = GuestRam::new(&[(0, 0x10000), (0x1_0000_0000, 0x2000)]).unwrap();
        assert_eq!(ram.regions().len(), 2);
        assert_eq!(ram.regions()[1].file_offset, 0x10000);
        let d0 = ram.digest();
        ram.write(0xfff0, &[1, 2, 3]).unwrap();
        assert_eq!(ram.read(0xfff0, 3).unwrap(), vec![1, 2, 3]);
        assert_ne!(ram.digest(), d0);
        ram.fill(0x1_0000_1000, 0x1000, 0xaa).unwrap();
        assert_eq!(ram.read(0x1_0000_1ffe, 2).unwrap(), vec![0xaa, 0xaa]);
        // Outside every region, or across a region's end: refused.
        assert!(ram.read(0x10000, 1).is_err());
        assert!(ram.write(0xffff, &[0, 0]).is_err());
        assert!(ram.read(0x1_0000_2000, 1).is_err());
    }

    #[test]
    fn bad_layouts_refused() {
        assert!(GuestRam::new(&[(0x100, 0x1000)]).is_err());
        assert!(GuestRam::new(&[(0, 0)]).is_err());
        assert!(GuestRam::new(&[(0, 0x2000), (0x1000, 0x1000)]).is_err());
    }
}
