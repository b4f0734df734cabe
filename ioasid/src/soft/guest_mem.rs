//! Bounded access to registered guest RAM.
//!
//! Every byte the soft IOMMU reads or writes on behalf of a device or a table walk goes through
//! `GuestRam`, which checks that the whole access lies inside one registered region. Guest
//! memory is shared with the guest and with other devices, so it is only touched with volatile
//! or atomic operations on raw pointers, never through Rust references to plain data.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{
    GuestMemoryBackend, GuestMemoryRegion, GuestMemoryRegionBytes, MemoryRegionAddress,
};

/// One region of guest RAM as the VMM mapped it in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostRegion {
    /// Host virtual address of the first byte.
    pub hva: u64,
    /// Length in bytes.
    pub len: u64,
}

impl HostRegion {
    fn last(&self) -> u64 {
        self.hva + (self.len - 1)
    }
}

/// The registered guest RAM regions, sorted and non-overlapping.
pub(crate) struct GuestRam {
    regions: Vec<HostRegion>,
    /// Keeps the owner of the mappings (a `GuestMemoryMmap`) alive, when there is one.
    _keep: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

/// Why a set of regions cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    /// A region is empty, wraps around, or is not page aligned.
    #[error(
        "Guest RAM region at HVA {hva:#x} length {len:#x} is empty, wraps or is not 4 KiB aligned"
    )]
    Invalid {
        /// Its host address.
        hva: u64,
        /// Its length.
        len: u64,
    },
    /// Two regions overlap.
    #[error("Guest RAM regions at HVA {a:#x} and {b:#x} overlap")]
    Overlap {
        /// The first region.
        a: u64,
        /// The second region.
        b: u64,
    },
}

impl GuestRam {
    /// Registers raw regions. The caller of [`super::SoftIommu::new`] vouches for them.
    pub(crate) fn new(
        regions: &[HostRegion],
        keep: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<Self, RegionError> {
        let mut v: Vec<HostRegion> = regions.to_vec();
        for r in &v {
            let aligned = r.hva.is_multiple_of(4096) && r.len.is_multiple_of(4096);
            if r.len == 0 || r.hva.checked_add(r.len - 1).is_none() || !aligned {
                return Err(RegionError::Invalid {
                    hva: r.hva,
                    len: r.len,
                });
            }
        }
        v.sort_by_key(|r| r.hva);
        for w in v.windows(2) {
            if w[0].last() >= w[1].hva {
                return Err(RegionError::Overlap {
                    a: w[0].hva,
                    b: w[1].hva,
                });
            }
        }
        Ok(GuestRam {
            regions: v,
            _keep: keep,
        })
    }

    /// The regions of a vm-memory guest memory object.
    pub(crate) fn regions_of<M>(mem: &M) -> Vec<HostRegion>
    where
        M: GuestMemoryBackend,
        M::R: GuestMemoryRegionBytes,
    {
        mem.iter()
            .filter_map(|r| {
                let ptr = r.get_host_address(MemoryRegionAddress(0)).ok()?;
                Some(HostRegion {
                    hva: ptr as u64,
                    len: r.len(),
                })
            })
            .collect()
    }

    /// The registered regions.
    pub(crate) fn regions(&self) -> &[HostRegion] {
        &self.regions
    }

    /// Whether `[hva, hva + len)` lies inside one registered region (`len > 0`).
    pub(crate) fn contains(&self, hva: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let Some(last) = hva.checked_add(len - 1) else {
            return false;
        };
        let idx = self.regions.partition_point(|r| r.hva <= hva);
        idx > 0 && self.regions[idx - 1].last() >= last
    }

    /// Reads the naturally aligned `u64` at `hva` atomically; `None` when outside guest RAM.
    pub(crate) fn read_u64(&self, hva: u64) -> Option<u64> {
        if !hva.is_multiple_of(8) || !self.contains(hva, 8) {
            return None;
        }
        // SAFETY: `[hva, hva + 8)` lies inside a registered region, which the registrant
        // guarantees stays mapped for the life of `self`; it is 8-byte aligned. Guest memory is
        // shared, so it is accessed only atomically (never through a plain reference).
        let v = unsafe { AtomicU64::from_ptr(hva as *mut u64) }.load(Ordering::Acquire);
        Some(v)
    }

    /// Compare-exchanges the aligned `u64` at `hva`: `Some(Ok(old))` when it held `old` and now
    /// holds `new`, `Some(Err(actual))` when it held something else, `None` when outside.
    pub(crate) fn cmpxchg_u64(&self, hva: u64, old: u64, new: u64) -> Option<Result<u64, u64>> {
        if !hva.is_multiple_of(8) || !self.contains(hva, 8) {
            return None;
        }
        // SAFETY: as in `read_u64`: inside a registered, mapped region, aligned, atomic access.
        let a = unsafe { AtomicU64::from_ptr(hva as *mut u64) };
        Some(a.compare_exchange(old, new, Ordering::AcqRel, Ordering::Acquire))
    }

    /// Copies `buf.len()` bytes from `hva`; `false` (nothing read) when outside guest RAM.
    pub(crate) fn read_bytes(&self, hva: u64, buf: &mut [u8]) -> bool {
        if !self.contains(hva, buf.len() as u64) {
            return buf.is_empty();
        }
        let src = hva as *const u8;
        let mut i = 0;
        // Word copies where the host address is aligned, bytes at the edges.
        while i < buf.len() {
            let p = src.wrapping_add(i);
            if (p as usize).is_multiple_of(8) && buf.len() - i >= 8 {
                // SAFETY: `p..p+8` is inside the checked range, aligned, in a registered mapped
                // region; a volatile read does not create a reference to shared memory.
                let w = unsafe { std::ptr::read_volatile(p as *const u64) };
                buf[i..i + 8].copy_from_slice(&w.to_ne_bytes());
                i += 8;
            } else {
                // SAFETY: `p` is inside the checked range, in a registered mapped region.
                buf[i] = unsafe { std::ptr::read_volatile(p) };
                i += 1;
            }
        }
        true
    }

    /// Copies `buf` to `hva`; `false` (nothing written) when outside guest RAM.
    pub(crate) fn write_bytes(&self, hva: u64, buf: &[u8]) -> bool {
        if !self.contains(hva, buf.len() as u64) {
            return buf.is_empty();
        }
        let dst = hva as *mut u8;
        let mut i = 0;
        while i < buf.len() {
            let p = dst.wrapping_add(i);
            if (p as usize).is_multiple_of(8) && buf.len() - i >= 8 {
                let mut w = [0u8; 8];
                w.copy_from_slice(&buf[i..i + 8]);
                // SAFETY: `p..p+8` is inside the checked range, aligned, in a registered mapped
                // region; a volatile write does not create a reference to shared memory.
                unsafe { std::ptr::write_volatile(p as *mut u64, u64::from_ne_bytes(w)) };
                i += 8;
            } else {
                // SAFETY: `p` is inside the checked range, in a registered mapped region.
                unsafe { std::ptr::write_volatile(p, buf[i]) };
                i += 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bounds_are_checked() {
        let mut backing = vec![0u64; 1024]; // 8 KiB, not necessarily page aligned
        let base = backing.as_mut_ptr() as u64;
        let aligned = base.next_multiple_of(4096);
        let ram = GuestRam::new(
            &[HostRegion {
                hva: aligned,
                len: 4096,
            }],
            None,
        )
        .unwrap();
        assert!(ram.contains(aligned, 4096));
        assert!(!ram.contains(aligned, 4097));
        assert!(!ram.contains(aligned - 1, 2));
        assert!(!ram.contains(u64::MAX, 1));
        assert!(ram.read_u64(aligned + 4088).is_some());
        assert!(ram.read_u64(aligned + 4096).is_none());
        assert!(ram.read_u64(aligned + 3).is_none());
        assert!(ram.write_bytes(aligned + 5, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]));
        let mut out = [0u8; 11];
        assert!(ram.read_bytes(aligned + 5, &mut out));
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert!(!ram.write_bytes(aligned + 4090, &[0; 8]));
        let v = ram.read_u64(aligned).unwrap();
        assert_eq!(ram.cmpxchg_u64(aligned, v, 7), Some(Ok(v)));
        assert_eq!(ram.cmpxchg_u64(aligned, v, 9), Some(Err(7)));
        assert_eq!(ram.cmpxchg_u64(aligned + 4096, 7, 9), None);
        drop(backing);
    }

    #[test]
    fn overlap_and_bad_regions_refused() {
        assert!(GuestRam::new(
            &[HostRegion {
                hva: 0x1000,
                len: 0
            }],
            None
        )
        .is_err());
        assert!(GuestRam::new(
            &[HostRegion {
                hva: 0x1001,
                len: 0x1000
            }],
            None
        )
        .is_err());
        assert!(GuestRam::new(
            &[
                HostRegion {
                    hva: 0x1000,
                    len: 0x2000
                },
                HostRegion {
                    hva: 0x2000,
                    len: 0x1000
                }
            ],
            None
        )
        .is_err());
    }
}
