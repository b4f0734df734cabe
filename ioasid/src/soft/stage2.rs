//! Stage 2 of the soft IOMMU: an IOAS as an interval map of IOVA ranges to host virtual
//! addresses with permissions.
//!
//! The checks and errnos follow iommufd's `io_pagetable.c` so callers see the same errors
//! whichever backend they hold: zero or misaligned lengths and IOVAs give `EINVAL`, wrapping
//! ranges `EOVERFLOW`, IOVAs outside the aperture `EINVAL`, overlaps `EEXIST`, unmapping
//! nothing `ENOENT`, and no free IOVA window `ENOSPC`. Unlike iommufd, unmap may split a
//! mapping (the vIOMMU's shadow tables unmap single pages of larger maps).

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::types::{IovaRange, Perm};

/// The soft IOMMU's page size and IOVA alignment.
pub const PAGE_SIZE: u64 = 4096;

/// One mapping: `[start, last]` (the map's key is `start`) to `hva`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Area {
    /// Last IOVA (inclusive).
    pub last: u64,
    /// Host virtual address of the first byte.
    pub hva: u64,
    /// DMA permissions.
    pub perm: Perm,
}

/// A stage-2 translation of one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct S2Hit {
    /// The host virtual address.
    pub hva: u64,
    /// The permissions of the containing mapping.
    pub perm: Perm,
}

/// An IOAS: the mappings plus the IOVAs automatic allocation may use.
#[derive(Debug, Clone)]
pub(crate) struct Ioas {
    areas: BTreeMap<u64, Area>,
    /// `IOMMU_IOAS_ALLOW_IOVAS`: windows automatic allocation is restricted to (empty: all).
    allowed: Vec<IovaRange>,
    /// The aperture `[0, aperture_last]`.
    aperture_last: u64,
}

/// A plain errno, turned into [`crate::Error`] with its context by the caller.
pub(crate) type Errno = i32;

fn check_len(iova: u64, len: u64) -> Result<u64, Errno> {
    if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    let last = iova.checked_add(len - 1).ok_or(libc::EOVERFLOW)?;
    if !iova.is_multiple_of(PAGE_SIZE) {
        return Err(libc::EINVAL);
    }
    Ok(last)
}

impl Ioas {
    /// An empty IOAS with IOVAs `[0, 2^bits)`.
    pub(crate) fn new(iova_bits: u32) -> Self {
        let aperture_last = if iova_bits >= 64 {
            u64::MAX
        } else {
            (1u64 << iova_bits) - 1
        };
        Ioas {
            areas: BTreeMap::new(),
            allowed: Vec::new(),
            aperture_last,
        }
    }

    /// `IOMMU_IOAS_IOVA_RANGES`: the aperture.
    pub(crate) fn ranges(&self) -> Vec<IovaRange> {
        vec![IovaRange {
            start: 0,
            last: self.aperture_last,
        }]
    }

    /// `IOMMU_IOAS_ALLOW_IOVAS`.
    pub(crate) fn allow(&mut self, ranges: &[IovaRange]) -> Result<(), Errno> {
        let mut v = ranges.to_vec();
        v.sort();
        for r in &v {
            if r.start > r.last || r.last > self.aperture_last {
                return Err(libc::EINVAL);
            }
        }
        if v.windows(2).any(|w| w[0].last >= w[1].start) {
            return Err(libc::EINVAL);
        }
        self.allowed = v;
        Ok(())
    }

    fn overlaps(&self, start: u64, last: u64) -> bool {
        // The area starting at or before `last` with the highest start is the only candidate
        // that can reach into `[start, last]` from the left; anything starting inside overlaps.
        match self.areas.range(..=last).next_back() {
            Some((_, a)) => a.last >= start,
            None => false,
        }
    }

    /// Picks the lowest free IOVA for `len` bytes (`ENOSPC` when none).
    fn alloc_iova(&self, len: u64) -> Result<u64, Errno> {
        let whole = [IovaRange {
            start: 0,
            last: self.aperture_last,
        }];
        let windows: &[IovaRange] = if self.allowed.is_empty() {
            &whole
        } else {
            &self.allowed
        };
        for w in windows {
            let mut cand = w.start.next_multiple_of(PAGE_SIZE);
            while let Some(last) = cand.checked_add(len - 1) {
                if last > w.last {
                    break;
                }
                // First area that ends at or after `cand` and starts at or before `last`.
                let blocker = self
                    .areas
                    .range(..=last)
                    .next_back()
                    .filter(|(_, a)| a.last >= cand);
                match blocker {
                    None => return Ok(cand),
                    Some((_, a)) => match a.last.checked_add(1) {
                        Some(next) => cand = next,
                        None => break,
                    },
                }
            }
        }
        Err(libc::ENOSPC)
    }

    /// Checks a map request and picks its IOVA; does not insert.
    pub(crate) fn check_map(&self, iova: Option<u64>, len: u64) -> Result<u64, Errno> {
        match iova {
            Some(iova) => {
                let last = check_len(iova, len)?;
                if last > self.aperture_last {
                    return Err(libc::EINVAL);
                }
                if self.overlaps(iova, last) {
                    return Err(libc::EEXIST);
                }
                Ok(iova)
            }
            None => {
                if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
                    return Err(libc::EINVAL);
                }
                self.alloc_iova(len)
            }
        }
    }

    /// Maps `[iova, iova + len)` to `hva` after [`Ioas::check_map`] accepted it.
    pub(crate) fn insert(&mut self, iova: u64, len: u64, hva: u64, perm: Perm) {
        self.areas.insert(
            iova,
            Area {
                last: iova + (len - 1),
                hva,
                perm,
            },
        );
    }

    /// Unmaps `[iova, iova + len)`, splitting mappings at the edges. Returns the bytes
    /// unmapped and the removed IOVA pieces (for IOTLB invalidation).
    pub(crate) fn unmap(&mut self, iova: u64, len: u64) -> Result<(u64, Vec<IovaRange>), Errno> {
        let last = check_len(iova, len)?;
        let keys: Vec<u64> = {
            let mut k: Vec<u64> = self.areas.range(iova..=last).map(|(s, _)| *s).collect();
            if let Some((s, a)) = self.areas.range(..iova).next_back() {
                if a.last >= iova {
                    k.insert(0, *s);
                }
            }
            k
        };
        if keys.is_empty() {
            return Err(libc::ENOENT);
        }
        let mut bytes = 0u64;
        let mut removed = Vec::with_capacity(keys.len());
        for start in keys {
            let Some(a) = self.areas.remove(&start) else {
                continue;
            };
            let cut_start = start.max(iova);
            let cut_last = a.last.min(last);
            if start < cut_start {
                self.areas.insert(
                    start,
                    Area {
                        last: cut_start - 1,
                        ..a
                    },
                );
            }
            if a.last > cut_last {
                self.areas.insert(
                    cut_last + 1,
                    Area {
                        last: a.last,
                        hva: a.hva + (cut_last + 1 - start),
                        perm: a.perm,
                    },
                );
            }
            bytes += cut_last - cut_start + 1;
            removed.push(IovaRange {
                start: cut_start,
                last: cut_last,
            });
        }
        Ok((bytes, removed))
    }

    /// Unmaps everything; returns the bytes unmapped.
    pub(crate) fn unmap_all(&mut self) -> u64 {
        let bytes = self
            .areas
            .values()
            .zip(self.areas.keys())
            .map(|(a, s)| a.last - s + 1)
            .sum();
        self.areas.clear();
        bytes
    }

    /// The pieces of `[iova, iova + len)` with their host addresses, for `IOMMU_IOAS_COPY`:
    /// `ENOENT` when part of the range is not mapped, `EPERM` when `write` is asked of a
    /// read-only piece.
    pub(crate) fn pieces(
        &self,
        iova: u64,
        len: u64,
        perm: Perm,
    ) -> Result<Vec<(u64, u64, u64)>, Errno> {
        let last = check_len(iova, len)?;
        let mut out = Vec::new();
        let mut cur = iova;
        loop {
            let (start, a) = self
                .areas
                .range(..=cur)
                .next_back()
                .filter(|(_, a)| a.last >= cur)
                .ok_or(libc::ENOENT)?;
            if (perm.write && !a.perm.write) || (perm.read && !a.perm.read) {
                return Err(libc::EPERM);
            }
            let piece_last = a.last.min(last);
            out.push((cur, piece_last - cur + 1, a.hva + (cur - start)));
            if piece_last == last {
                return Ok(out);
            }
            cur = piece_last + 1;
        }
    }

    /// Translates one IOVA.
    #[inline]
    pub(crate) fn translate(&self, iova: u64) -> Option<S2Hit> {
        let (start, a) = self
            .areas
            .range((Bound::Unbounded, Bound::Included(iova)))
            .next_back()?;
        if a.last < iova {
            return None;
        }
        Some(S2Hit {
            hva: a.hva + (iova - start),
            perm: a.perm,
        })
    }

    /// Every mapping as `(iova, len, hva, perm)`, in IOVA order.
    pub(crate) fn mappings(&self) -> impl Iterator<Item = (u64, u64, u64, Perm)> + '_ {
        self.areas
            .iter()
            .map(|(s, a)| (*s, a.last - s + 1, a.hva, a.perm))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn map_errors_match_iommufd() {
        let mut s = Ioas::new(48);
        assert_eq!(s.check_map(Some(0x1000), 0x2000), Ok(0x1000));
        s.insert(0x1000, 0x2000, 0x10_0000, Perm::RW);
        assert_eq!(s.check_map(Some(0x2000), 0x1000), Err(libc::EEXIST));
        assert_eq!(s.check_map(Some(0), 0x2000), Err(libc::EEXIST));
        assert_eq!(s.check_map(Some(0), 0x1000), Ok(0));
        assert_eq!(s.check_map(Some(0x3000), 0x1000), Ok(0x3000));
        assert_eq!(s.check_map(Some(0x3800), 0x1000), Err(libc::EINVAL));
        assert_eq!(s.check_map(Some(0x3000), 0x800), Err(libc::EINVAL));
        assert_eq!(s.check_map(Some(0x3000), 0), Err(libc::EINVAL));
        assert_eq!(
            s.check_map(Some(u64::MAX - 0xfff), 0x2000),
            Err(libc::EOVERFLOW)
        );
        assert_eq!(s.check_map(Some(1 << 48), 0x1000), Err(libc::EINVAL));
        assert_eq!(s.check_map(None, 0x1000), Ok(0));
        assert_eq!(s.check_map(None, 0x3000), Ok(0x3000));
        assert_eq!(s.check_map(None, 1 << 49), Err(libc::ENOSPC));
    }

    #[test]
    fn unmap_splits_and_reports() {
        let mut s = Ioas::new(48);
        s.insert(0x10000, 0x4000, 0x100000, Perm::RW);
        assert_eq!(s.unmap(0x20000, 0x1000), Err(libc::ENOENT));
        let (bytes, removed) = s.unmap(0x11000, 0x1000).unwrap();
        assert_eq!(bytes, 0x1000);
        assert_eq!(
            removed,
            vec![IovaRange {
                start: 0x11000,
                last: 0x11fff
            }]
        );
        assert!(s.translate(0x11000).is_none());
        assert_eq!(s.translate(0x10fff).unwrap().hva, 0x100fff);
        assert_eq!(s.translate(0x12000).unwrap().hva, 0x102000);
        assert_eq!(s.unmap(0x10800, 0x1000), Err(libc::EINVAL));
        let (bytes, _) = s.unmap(0, 0x20000).unwrap();
        assert_eq!(bytes, 0x3000);
        assert_eq!(s.unmap_all(), 0);
    }

    #[test]
    fn allowed_iovas_steer_allocation() {
        let mut s = Ioas::new(48);
        s.allow(&[IovaRange {
            start: 0x10_0000,
            last: 0x10_ffff,
        }])
        .unwrap();
        assert_eq!(s.check_map(None, 0x1000), Ok(0x10_0000));
        assert_eq!(s.check_map(None, 0x2_0000), Err(libc::ENOSPC));
        assert_eq!(
            s.allow(&[IovaRange { start: 5, last: 1 }]),
            Err(libc::EINVAL)
        );
        assert_eq!(
            s.allow(&[IovaRange {
                start: 0,
                last: 1 << 48
            }]),
            Err(libc::EINVAL)
        );
    }

    #[test]
    fn pieces_for_copy() {
        let mut s = Ioas::new(48);
        s.insert(0x1000, 0x1000, 0xa000, Perm::RO);
        s.insert(0x2000, 0x1000, 0xf000, Perm::RW);
        assert_eq!(
            s.pieces(0x1000, 0x2000, Perm::RO).unwrap(),
            vec![(0x1000, 0x1000, 0xa000), (0x2000, 0x1000, 0xf000)]
        );
        assert_eq!(s.pieces(0x1000, 0x2000, Perm::RW), Err(libc::EPERM));
        assert_eq!(s.pieces(0x1000, 0x3000, Perm::RO), Err(libc::ENOENT));
    }

    #[test]
    fn pieces_from_the_middle_of_mappings() {
        let mut s = Ioas::new(48);
        s.insert(0x1_0000, 0x4000, 0xa_0000, Perm::RW);
        s.insert(0x1_4000, 0x4000, 0xf_0000, Perm::RW);
        s.insert(0x1_8000, 0x1000, 0x3_0000, Perm::RW);
        // Starts two pages into the first mapping, crosses the second whole, ends in the third.
        assert_eq!(
            s.pieces(0x1_2000, 0x7000, Perm::RW).unwrap(),
            vec![
                (0x1_2000, 0x2000, 0xa_2000),
                (0x1_4000, 0x4000, 0xf_0000),
                (0x1_8000, 0x1000, 0x3_0000),
            ]
        );
        assert_eq!(
            s.pieces(0x1_5000, 0x1000, Perm::RO).unwrap(),
            vec![(0x1_5000, 0x1000, 0xf_1000)]
        );
    }

    #[test]
    fn mappings_report_lengths() {
        let mut s = Ioas::new(48);
        s.insert(0x1_0000, 0x4000, 0xa_0000, Perm::RW);
        s.insert(0x2_0000, 0x1000, 0xb_0000, Perm::RO);
        assert_eq!(
            s.mappings().collect::<Vec<_>>(),
            vec![
                (0x1_0000, 0x4000, 0xa_0000, Perm::RW),
                (0x2_0000, 0x1000, 0xb_0000, Perm::RO),
            ]
        );
    }

    #[test]
    fn aperture_edges_are_inclusive() {
        let mut s = Ioas::new(48);
        let top = (1u64 << 48) - 1;
        // The last page of the aperture maps; one byte further does not.
        assert_eq!(s.check_map(Some(top - 0xfff), 0x1000), Ok(top - 0xfff));
        assert_eq!(s.check_map(Some(top - 0xfff), 0x2000), Err(libc::EINVAL));
        // Automatic allocation refuses zero and partial-page lengths.
        assert_eq!(s.check_map(None, 0), Err(libc::EINVAL));
        assert_eq!(s.check_map(None, 0x800), Err(libc::EINVAL));
        // An allowed window may be one IOVA, and may end at the aperture's last IOVA.
        let r = |start, last| IovaRange { start, last };
        s.allow(&[r(0x1000, 0x1000), r(0x10_0000, top)]).unwrap();
        assert_eq!(s.check_map(None, 0x1000), Ok(0x10_0000));
    }

    #[test]
    fn allowed_iovas_may_be_several_but_not_overlap() {
        let mut s = Ioas::new(48);
        let r = |start, last| IovaRange { start, last };
        // Disjoint windows, given out of order, are accepted (and sorted).
        s.allow(&[r(0x20_0000, 0x20_ffff), r(0x10_0000, 0x10_ffff)])
            .unwrap();
        assert_eq!(s.check_map(None, 0x1000), Ok(0x10_0000));
        assert_eq!(s.check_map(None, 0x1_0000), Ok(0x10_0000));
        // Adjacent windows do not overlap either.
        s.allow(&[r(0x10_0000, 0x10_ffff), r(0x11_0000, 0x11_ffff)])
            .unwrap();
        // Overlapping windows, or sharing one IOVA, are refused and keep the old windows.
        assert_eq!(
            s.allow(&[r(0x10_0000, 0x10_ffff), r(0x10_f000, 0x11_ffff)]),
            Err(libc::EINVAL)
        );
        assert_eq!(
            s.allow(&[r(0x10_0000, 0x10_ffff), r(0x10_ffff, 0x11_ffff)]),
            Err(libc::EINVAL)
        );
        assert_eq!(s.check_map(None, 0x1000), Ok(0x10_0000));
    }
}
