//! Guest RAM: one memfd, mapped `MAP_SHARED`, split around the 32-bit PCI hole.
//!
//! Every region is a window of the same memfd, so the passthrough layer can map guest RAM
//! for DMA by file (`IOMMU_IOAS_MAP_FILE`) with the `(memfd, file_offset, size)` triple
//! [`RamRegion`] exposes, and KVM gets the same pages through the host address.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use thiserror::Error;
use vm_memory::{
    mmap::MmapRegionBuilder, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap,
};

use crate::layout::{HIGH_RAM_START, MEM_32BIT_HOLE_START};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap;

/// Smallest guest RAM we accept.
pub const MIN_RAM_SIZE: u64 = 2 << 20;

/// Errors of guest RAM setup.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The requested size is too small, not page aligned, or too large.
    #[error("Guest memory size {size:#x} is invalid: {reason}")]
    InvalidSize {
        /// The requested size in bytes.
        size: u64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// `memfd_create` failed.
    #[error("Cannot create the guest memory memfd (hugepages={hugepages})")]
    MemfdCreate {
        /// Whether MFD_HUGETLB was requested.
        hugepages: bool,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// `ftruncate` of the memfd failed.
    #[error("Cannot size the guest memory memfd to {size:#x} bytes")]
    Truncate {
        /// The size.
        size: u64,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// Hugepages were requested but the host has too few reserved.
    #[error(
        "Cannot map {size:#x} bytes of hugepage-backed guest memory: the host has too few \
         hugepages reserved (free 2 MiB pages: {free}); reserve more with \
         `echo N > /proc/sys/vm/nr_hugepages` or use hugepages=off"
    )]
    NoHugepages {
        /// The size that was requested.
        size: u64,
        /// `HugePages_Free` from /proc/meminfo, when readable.
        free: String,
    },
    /// Mapping a region failed.
    #[error("Cannot mmap guest RAM region at GPA {gpa:#x} ({size:#x} bytes)")]
    Mmap {
        /// Guest physical address of the region.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// The mmap error.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// vm-memory rejected the region layout.
    #[error("Cannot build the guest memory map")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// One contiguous RAM region: where it is for the guest, for this process, and in the memfd.
#[derive(Clone, Debug)]
pub struct RamRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping in this process.
    pub host_addr: u64,
    /// The memfd that backs the region (shared by all regions).
    pub memfd: Arc<File>,
    /// Offset of the region's first byte in `memfd`.
    pub file_offset: u64,
}

/// Guest RAM options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamConfig {
    /// Total RAM in bytes.
    pub size: u64,
    /// Back RAM with hugetlbfs pages (`MFD_HUGETLB`).
    pub hugepages: bool,
}

/// The guest RAM of a VM.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemory,
    regions: Vec<RamRegion>,
    memfd: Arc<File>,
    hugepages: bool,
}

/// The `(gpa, size)` ranges guest RAM of `size` bytes occupies: split at 3 GiB, the rest above
/// 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MEM_32BIT_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MEM_32BIT_HOLE_START),
            (HIGH_RAM_START, size - MEM_32BIT_HOLE_START),
        ]
    }
}

fn hugepages_free() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .map(|l| l.trim_start_matches("HugePages_Free:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn create_memfd(size: u64, hugepages: bool) -> Result<File, MemoryError> {
    let name = CString::new("ioasid-vmm-ram").unwrap_or_default();
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call; the flags are
    // valid memfd_create flags. The return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::MemfdCreate {
            hugepages,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let len = i64::try_from(size).map_err(|_| MemoryError::InvalidSize {
        size,
        reason: "too large",
    })?;
    // SAFETY: `file` is a valid open fd; ftruncate does not touch our memory.
    let ret = unsafe { libc::ftruncate(file.as_raw_fd(), len) };
    if ret < 0 {
        let source = std::io::Error::last_os_error();
        if hugepages {
            return Err(MemoryError::NoHugepages {
                size,
                free: hugepages_free(),
            });
        }
        return Err(MemoryError::Truncate { size, source });
    }
    Ok(file)
}

impl GuestRam {
    /// Creates the memfd, sizes it and maps each RAM range of [`ram_ranges`] from it.
    pub fn new(config: RamConfig) -> Result<Self, MemoryError> {
        let size = config.size;
        let align = if config.hugepages { 2 << 20 } else { 4096 };
        if size < MIN_RAM_SIZE {
            return Err(MemoryError::InvalidSize {
                size,
                reason: "at least 2 MiB is needed",
            });
        }
        if !size.is_multiple_of(align) {
            return Err(MemoryError::InvalidSize {
                size,
                reason: if config.hugepages {
                    "must be a multiple of 2 MiB with hugepages"
                } else {
                    "must be a multiple of 4 KiB"
                },
            });
        }
        if size > (1 << 46) {
            return Err(MemoryError::InvalidSize {
                size,
                reason: "larger than 64 TiB",
            });
        }
        let memfd = Arc::new(create_memfd(size, config.hugepages)?);
        let mut regions = Vec::new();
        let mut mmaps = Vec::new();
        let mut file_offset = 0u64;
        for (gpa, len) in ram_ranges(size) {
            let len_usize = usize::try_from(len).map_err(|_| MemoryError::InvalidSize {
                size,
                reason: "too large for this host",
            })?;
            // Hugetlb mappings are made without MAP_NORESERVE so that a shortage of reserved
            // hugepages fails here (ENOMEM) instead of as a SIGBUS on first touch.
            let mut flags = libc::MAP_SHARED;
            if !config.hugepages {
                flags |= libc::MAP_NORESERVE;
            }
            let mapping = MmapRegionBuilder::new(len_usize)
                .with_file_offset(FileOffset::from_arc(memfd.clone(), file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_hugetlbfs(config.hugepages)
                .build()
                .map_err(|source| {
                    if config.hugepages {
                        MemoryError::NoHugepages {
                            size,
                            free: hugepages_free(),
                        }
                    } else {
                        MemoryError::Mmap {
                            gpa,
                            size: len,
                            source,
                        }
                    }
                })?;
            let host_addr = mapping.as_ptr() as u64;
            let region = GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(
                MemoryError::InvalidSize {
                    size,
                    reason: "region wraps the guest address space",
                },
            )?;
            mmaps.push(region);
            regions.push(RamRegion {
                gpa,
                size: len,
                host_addr,
                memfd: memfd.clone(),
                file_offset,
            });
            file_offset += len;
        }
        let memory = GuestMemory::from_regions(mmaps).map_err(MemoryError::Collection)?;
        Ok(Self {
            memory,
            regions,
            memfd,
            hugepages: config.hugepages,
        })
    }

    /// The vm-memory view of guest RAM (for loaders, devices and tests).
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The RAM regions in guest address order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The memfd behind all regions.
    pub fn memfd(&self) -> &Arc<File> {
        &self.memfd
    }

    /// Whether RAM is hugepage-backed.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.size).sum()
    }

    /// End of RAM below the 32-bit hole (exclusive).
    pub fn low_ram_end(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.gpa < MEM_32BIT_HOLE_START)
            .map(|r| r.gpa + r.size)
            .max()
            .unwrap_or(0)
    }

    /// The highest guest address of RAM plus one.
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.gpa + r.size)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::Bytes;

    #[test]
    fn ranges_split_at_the_hole() {
        assert_eq!(ram_ranges(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(5 << 30), vec![(0, 3 << 30), (4 << 30, 2 << 30)]);
    }

    #[test]
    fn memfd_backs_every_region() {
        // 3 GiB + 8 MiB: two regions; MAP_NORESERVE keeps this cheap.
        let ram = GuestRam::new(RamConfig {
            size: (3 << 30) + (8 << 20),
            hugepages: false,
        })
        .unwrap();
        let r = ram.regions();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].gpa, r[0].file_offset), (0, 0));
        assert_eq!((r[1].gpa, r[1].file_offset), (4 << 30, 3 << 30));
        assert_eq!(r[1].size, 8 << 20);
        assert_eq!(ram.low_ram_end(), 3 << 30);
        assert_eq!(ram.end(), (4 << 30) + (8 << 20));
        // A guest write above 4 GiB lands in the memfd at the region's file offset.
        ram.memory()
            .write_obj(0xdead_beef_u32, GuestAddress((4 << 30) + 0x10))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.memfd().read_at(&mut buf, (3 << 30) + 0x10).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
        // And the host address points at the same page.
        // SAFETY: host_addr maps the region; offset 0x10 + 4 is inside it.
        let v = unsafe { std::ptr::read_volatile((r[1].host_addr + 0x10) as *const u32) };
        assert_eq!(v, 0xdead_beef);
    }

    #[test]
    fn bad_sizes_rejected() {
        for size in [0, 4096, (16 << 20) + 1] {
            let e = GuestRam::new(RamConfig {
                size,
                hugepages: false,
            })
            .unwrap_err();
            assert!(matches!(e, MemoryError::InvalidSize { .. }), "{e}");
        }
        let e = GuestRam::new(RamConfig {
            size: (16 << 20) + 4096,
            hugepages: true,
        })
        .unwrap_err();
        assert!(e.to_string().contains("2 MiB"), "{e}");
    }

    #[test]
    fn hugepages_clear_error_or_success() {
        let r = GuestRam::new(RamConfig {
            size: 4 << 20,
            hugepages: true,
        });
        match r {
            Ok(ram) => assert!(ram.hugepages()),
            Err(e) => {
                let msg = e.to_string();
                println!("hugepages unavailable here: {msg}");
                assert!(
                    msg.contains("hugepages") || msg.contains("hugepage"),
                    "unclear error: {msg}"
                );
            }
        }
    }
}
