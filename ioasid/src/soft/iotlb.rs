//! The soft IOMMU's IOTLB: a set-associative cache of complete (stage 1 + stage 2)
//! translations of 4 KiB input pages, tagged by device, PASID and domain (HWPT, or the IOAS
//! for a device attached directly to one).
//!
//! A translation of a large stage-1 page is cached per 4 KiB piece, each piece remembering its
//! leaf's base and size, so a range invalidation that touches any part of a large page drops
//! every cached piece of it (as hardware drops a large-page entry). There is no
//! paging-structure cache: non-leaf invalidations need no extra work.
//!
//! Entries stay until invalidated, as on hardware: a guest that changes a PTE without
//! invalidating keeps getting the old translation. Stage-2 changes are the host's and are
//! invalidated by the backend itself on unmap ([`Iotlb::invalidate_stage2`]), including every
//! nested translation over the IOAS (a guest table page may have been unmapped).

use crate::fault_types::FaultPerm;

use super::walk_s1::S1Rights;

/// "No PASID" in a tag (requests without a PASID prefix).
pub const NO_PASID: u32 = u32::MAX;

const WAYS: usize = 4;
const INVALID_VPN: u64 = u64::MAX;

/// Who a cached translation belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tag {
    /// Device.
    pub dev: u32,
    /// PASID, or [`NO_PASID`].
    pub pasid: u32,
    /// The domain: a HWPT id, or an IOAS id for a direct IOAS attach.
    pub domain: u32,
}

/// What a translation allows, as cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rights {
    /// Stage 2 only (pass-through of stage 1).
    Stage2,
    /// Nested: the stage-1 rights under the binding's SRE/WPE.
    Nested {
        /// Accumulated stage-1 rights.
        s1: S1Rights,
        /// SRE of the binding.
        sre: bool,
        /// WPE of the binding.
        wpe: bool,
    },
    /// Nested over a guest second-level table: its accumulated R/W/X.
    SecondLevel {
        /// Read allowed at every level.
        read: bool,
        /// Write allowed at every level.
        write: bool,
        /// Execute allowed at every level.
        exec: bool,
    },
}

/// A cached translation of one 4 KiB input page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Input page number (`addr >> 12`).
    pub vpn: u64,
    /// The tag.
    pub tag: Tag,
    /// The stage-2 IOAS the output went through.
    pub ioas: u32,
    /// Host page address.
    pub hva_page: u64,
    /// Stage-2 input page (GPA / IOVA of the IOAS).
    pub s2_page: u64,
    /// Base of the stage-1 leaf page (input address), for range invalidation of large pages.
    pub leaf_base: u64,
    /// Size of the stage-1 leaf page.
    pub leaf_size: u64,
    /// Stage-2 read permission.
    pub s2_read: bool,
    /// Stage-2 write permission.
    pub s2_write: bool,
    /// Stage-1 rights.
    pub rights: Rights,
}

impl Entry {
    const EMPTY: Entry = Entry {
        vpn: INVALID_VPN,
        tag: Tag {
            dev: 0,
            pasid: 0,
            domain: 0,
        },
        ioas: 0,
        hva_page: 0,
        s2_page: 0,
        leaf_base: 0,
        leaf_size: 0,
        s2_read: false,
        s2_write: false,
        rights: Rights::Stage2,
    };

    /// Whether the entry serves `access` without a walk.
    #[inline]
    pub fn allows(&self, access: FaultPerm) -> bool {
        let s2 = (!access.read && !access.exec || self.s2_read) && (!access.write || self.s2_write);
        s2 && match self.rights {
            Rights::Stage2 => true,
            Rights::Nested { s1, sre, wpe } => {
                s1.allow(access, sre, wpe) && (!access.write || s1.dirty)
            }
            Rights::SecondLevel { read, write, exec } => {
                (!access.read || read) && (!access.write || write) && (!access.exec || exec)
            }
        }
    }
}

/// Hit/miss counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IotlbStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that needed a walk.
    pub misses: u64,
    /// Entries dropped by invalidations.
    pub invalidated: u64,
}

/// The cache.
#[derive(Debug)]
pub struct Iotlb {
    entries: Vec<Entry>,
    set_mask: usize,
    victim: Vec<u8>,
    stats: IotlbStats,
    /// Bumped by every invalidation: a walk that started before one must not be cached.
    generation: u64,
}

/// The set of a page and context: Fibonacci hashing, the top `log2(sets)` bits of the
/// product. (A multiplication carries input bits only upwards, so the top bits are the ones
/// every input bit reaches; the device at bit 44 never reached the bits 32 and up this took
/// before, and every device's IOVA 0 shared one set.)
#[inline]
fn set_index(vpn: u64, dev: u32, pasid: u32, mask: usize) -> usize {
    let h = (vpn ^ (u64::from(dev) << 44) ^ (u64::from(pasid) << 24))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h.rotate_left(mask.count_ones()) as usize & mask
}

impl Iotlb {
    /// A cache with `sets` sets of 4 ways (`sets` rounded up to a power of two, at least 1).
    pub fn new(sets: usize) -> Self {
        let sets = sets.max(1).next_power_of_two();
        Iotlb {
            entries: vec![Entry::EMPTY; sets * WAYS],
            set_mask: sets - 1,
            victim: vec![0; sets],
            stats: IotlbStats::default(),
            generation: 0,
        }
    }

    /// Looks up the page of `addr` for `dev`/`pasid`; counts a hit or a miss. An entry that
    /// does not allow `access` is a miss (the caller walks again).
    #[inline]
    pub fn lookup(&mut self, dev: u32, pasid: u32, addr: u64, access: FaultPerm) -> Option<Entry> {
        let vpn = addr >> 12;
        let set = set_index(vpn, dev, pasid, self.set_mask);
        let base = set * WAYS;
        let ways = &self.entries[base..base + WAYS];
        for e in ways {
            if e.vpn == vpn && e.tag.dev == dev && e.tag.pasid == pasid && e.allows(access) {
                self.stats.hits += 1;
                return Some(*e);
            }
        }
        self.stats.misses += 1;
        None
    }

    /// Inserts an entry, replacing one for the same page and tag or a victim.
    pub fn insert(&mut self, entry: Entry) {
        let set = set_index(entry.vpn, entry.tag.dev, entry.tag.pasid, self.set_mask);
        let base = set * WAYS;
        let slot = (0..WAYS)
            .find(|&i| {
                let e = &self.entries[base + i];
                e.vpn == entry.vpn && e.tag.dev == entry.tag.dev && e.tag.pasid == entry.tag.pasid
            })
            .or_else(|| (0..WAYS).find(|&i| self.entries[base + i].vpn == INVALID_VPN))
            .unwrap_or_else(|| {
                let v = usize::from(self.victim[set]) % WAYS;
                self.victim[set] = self.victim[set].wrapping_add(1);
                v
            });
        self.entries[base + slot] = entry;
    }

    /// The invalidation generation (read before a walk, see [`Iotlb::insert_if_generation`]).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Inserts `entry` unless an invalidation ran since `generation` was read.
    pub fn insert_if_generation(&mut self, entry: Entry, generation: u64) {
        if self.generation == generation {
            self.insert(entry);
        }
    }

    fn drop_where(&mut self, f: impl Fn(&Entry) -> bool) -> u64 {
        self.generation += 1;
        let mut n = 0;
        for e in &mut self.entries {
            if e.vpn != INVALID_VPN && f(e) {
                *e = Entry::EMPTY;
                n += 1;
            }
        }
        self.stats.invalidated += n;
        n
    }

    /// Drops everything.
    pub fn invalidate_all(&mut self) -> u64 {
        self.drop_where(|_| true)
    }

    /// Drops every entry of a domain, optionally of one PASID only.
    pub fn invalidate_domain(&mut self, domain: u32, pasid: Option<u32>) -> u64 {
        self.drop_where(|e| e.tag.domain == domain && pasid.is_none_or(|p| e.tag.pasid == p))
    }

    /// Drops entries of a domain (optionally one PASID) whose stage-1 leaf page overlaps the
    /// input range `[start, last]`.
    pub fn invalidate_range(
        &mut self,
        domain: u32,
        pasid: Option<u32>,
        start: u64,
        last: u64,
    ) -> u64 {
        self.drop_where(|e| {
            e.tag.domain == domain
                && pasid.is_none_or(|p| e.tag.pasid == p)
                && e.leaf_base <= last
                && e.leaf_base.saturating_add(e.leaf_size - 1) >= start
        })
    }

    /// Drops every entry of one device and PASID (on attach, replace and detach).
    pub fn invalidate_context(&mut self, dev: u32, pasid: u32) -> u64 {
        self.drop_where(|e| e.tag.dev == dev && e.tag.pasid == pasid)
    }

    /// Drops every entry of one device.
    pub fn invalidate_device(&mut self, dev: u32) -> u64 {
        self.drop_where(|e| e.tag.dev == dev)
    }

    /// After an unmap of `[start, last]` from stage-2 IOAS `ioas`: drops the stage-2-only
    /// entries whose output page is in the range, and every nested entry over that IOAS (its
    /// stage-1 tables may have been in the range too; the kernel likewise flushes nested
    /// domains whole when their parent's mappings change).
    pub fn invalidate_stage2(&mut self, ioas: u32, start: u64, last: u64) -> u64 {
        self.drop_where(|e| {
            e.ioas == ioas
                && (matches!(e.rights, Rights::Nested { .. } | Rights::SecondLevel { .. })
                    || (e.s2_page <= last && e.s2_page >= (start & !0xfff)))
        })
    }

    /// Drops every entry that went through IOAS `ioas`.
    pub fn invalidate_ioas(&mut self, ioas: u32) -> u64 {
        self.drop_where(|e| e.ioas == ioas)
    }

    /// The counters.
    pub fn stats(&self) -> IotlbStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const R: FaultPerm = FaultPerm {
        read: true,
        write: false,
        exec: false,
        privileged: false,
    };

    fn entry(vpn: u64, domain: u32, pasid: u32) -> Entry {
        Entry {
            vpn,
            tag: Tag {
                dev: 1,
                pasid,
                domain,
            },
            ioas: 9,
            hva_page: 0x1000 * vpn,
            s2_page: 0x1000 * vpn,
            leaf_base: vpn << 12,
            leaf_size: 4096,
            s2_read: true,
            s2_write: false,
            rights: Rights::Stage2,
        }
    }

    #[test]
    fn tags_and_invalidation() {
        let mut t = Iotlb::new(4);
        for vpn in 0..8 {
            t.insert(entry(vpn, 5, 0));
            t.insert(entry(vpn, 5, 1));
        }
        // 4 sets x 4 ways: some were evicted, the last inserted are present.
        assert!(t.lookup(1, 1, 7 << 12, R).is_some());
        assert!(t
            .lookup(1, 1, 7 << 12, FaultPerm { write: true, ..R })
            .is_none());
        assert!(t.lookup(2, 1, 7 << 12, R).is_none());
        t.invalidate_range(5, Some(1), 7 << 12, (7 << 12) + 0xfff);
        assert!(t.lookup(1, 1, 7 << 12, R).is_none());
        assert!(t.lookup(1, 0, 7 << 12, R).is_some());
        t.invalidate_stage2(9, 7 << 12, (8 << 12) - 1);
        assert!(t.lookup(1, 0, 7 << 12, R).is_none());
        t.insert(entry(3, 5, 0));
        t.invalidate_domain(5, None);
        assert!(t.lookup(1, 0, 3 << 12, R).is_none());
        assert!(t.stats().hits >= 2);
    }

    fn perm(read: bool, write: bool, exec: bool) -> FaultPerm {
        FaultPerm {
            read,
            write,
            exec,
            privileged: false,
        }
    }

    #[test]
    fn iotlb_entry_rights_follow_stage2() {
        // A write-only stage-2 mapping: writes hit, reads and instruction fetches (which need
        // stage-2 read) do not.
        let wo = Entry {
            s2_read: false,
            s2_write: true,
            ..entry(1, 5, 0)
        };
        assert!(wo.allows(perm(false, true, false)));
        assert!(!wo.allows(perm(true, false, false)));
        assert!(!wo.allows(perm(false, false, true)));
        assert!(!wo.allows(perm(true, false, true)));
        // Read-only: reads and fetches hit, writes do not.
        let ro = entry(1, 5, 0);
        assert!(ro.allows(perm(true, false, false)));
        assert!(ro.allows(perm(false, false, true)));
        assert!(!ro.allows(perm(false, true, false)));
    }

    #[test]
    fn iotlb_entry_rights_follow_second_level() {
        // Stage 2 allows everything; the guest's second-level leaf is write-only, then
        // read/execute-only.
        let sl = |read, write, exec| Entry {
            s2_write: true,
            rights: Rights::SecondLevel { read, write, exec },
            ..entry(1, 5, 0)
        };
        let wo = sl(false, true, false);
        assert!(wo.allows(perm(false, true, false)));
        assert!(!wo.allows(perm(true, false, false)));
        assert!(!wo.allows(perm(true, true, false)));
        assert!(!wo.allows(perm(true, false, true)));
        let rx = sl(true, false, true);
        assert!(rx.allows(perm(true, false, false)));
        assert!(rx.allows(perm(true, false, true)));
        assert!(!rx.allows(perm(false, true, false)));
        let r = sl(true, false, false);
        assert!(!r.allows(perm(true, false, true)));
    }

    #[test]
    fn iotlb_insert_replaces_only_the_same_page_and_context() {
        // One set of 4 ways: entries that differ in one of page, device, PASID each keep a
        // way; a second insert of the same page and context replaces the first.
        let mut t = Iotlb::new(1);
        let e = |vpn, dev, pasid| Entry {
            tag: Tag {
                dev,
                pasid,
                domain: 5,
            },
            ..entry(vpn, 5, pasid)
        };
        t.insert(e(1, 1, 0));
        t.insert(e(2, 1, 0));
        t.insert(e(1, 2, 0));
        t.insert(e(1, 1, 3));
        t.insert(Entry {
            hva_page: 0x77_7000,
            ..e(1, 1, 3)
        });
        for (vpn, dev, pasid) in [(1, 1, 0), (2, 1, 0), (1, 2, 0), (1, 1, 3)] {
            let hit = t.lookup(dev, pasid, vpn << 12, R);
            assert!(hit.is_some(), "vpn {vpn} dev {dev} pasid {pasid}");
        }
        assert_eq!(t.lookup(1, 3, 1 << 12, R).unwrap().hva_page, 0x77_7000);
        assert_eq!(t.lookup(3, 0, 1 << 12, R), None);
        assert_eq!((t.stats().hits, t.stats().misses), (5, 1));
    }

    #[test]
    fn iotlb_full_set_evicts_round_robin() {
        // One set of 4 ways, 300 pages (past the u8 victim counter's wrap): the last 4
        // inserted are always the ones cached.
        let mut t = Iotlb::new(1);
        for vpn in 0..300 {
            t.insert(entry(vpn, 5, 0));
            for back in 0..4.min(vpn + 1) {
                let v = vpn - back;
                assert!(t.lookup(1, 0, v << 12, R).is_some(), "{v} after {vpn}");
            }
            if vpn >= 4 {
                assert!(t.lookup(1, 0, (vpn - 4) << 12, R).is_none(), "{vpn}");
            }
        }
    }

    #[test]
    fn iotlb_holds_a_full_cache_of_one_context() {
        // 64 sets of 4 ways: 16 consecutive pages of one device, one page of 16 devices, one
        // page of 16 PASIDs all stay cached (the set hash spreads them; a hash that ignores
        // the page, the device or the PASID puts them in one set, which keeps 4).
        let mut t = Iotlb::new(64);
        for vpn in 0..16 {
            t.insert(entry(vpn, 5, NO_PASID));
        }
        for vpn in 0..16 {
            assert!(t.lookup(1, NO_PASID, vpn << 12, R).is_some(), "vpn {vpn}");
        }
        let mut t = Iotlb::new(64);
        for dev in 0..16 {
            t.insert(Entry {
                tag: Tag {
                    dev,
                    pasid: NO_PASID,
                    domain: 5,
                },
                ..entry(0x42, 5, NO_PASID)
            });
        }
        for dev in 0..16 {
            assert!(
                t.lookup(dev, NO_PASID, 0x42 << 12, R).is_some(),
                "dev {dev}"
            );
        }
        assert_eq!(t.stats().misses, 0);
        let mut t = Iotlb::new(64);
        for pasid in 0..16 {
            t.insert(entry(0x42, 5, pasid));
        }
        for pasid in 0..16 {
            assert!(t.lookup(1, pasid, 0x42 << 12, R).is_some(), "pasid {pasid}");
        }
        assert_eq!(t.stats().misses, 0);
    }

    #[test]
    fn iotlb_invalidations_drop_exactly_their_entries() {
        let mut t = Iotlb::new(64);
        let dev = |d: u32, pasid: u32, ioas: u32| Entry {
            tag: Tag {
                dev: d,
                pasid,
                domain: ioas,
            },
            ioas,
            ..entry(7, ioas, pasid)
        };
        t.insert(dev(1, 3, 10));
        t.insert(dev(1, 4, 10));
        t.insert(dev(2, 3, 11));
        t.insert(dev(2, 4, 11));
        // One context: device 1, PASID 3; not device 1's other PASID nor device 2's PASID 3.
        assert_eq!(t.invalidate_context(1, 3), 1);
        assert!(t.lookup(1, 3, 7 << 12, R).is_none());
        assert!(t.lookup(1, 4, 7 << 12, R).is_some());
        assert!(t.lookup(2, 3, 7 << 12, R).is_some());
        assert_eq!(t.stats().invalidated, 1);
        // One device.
        assert_eq!(t.invalidate_device(1), 1);
        assert!(t.lookup(1, 4, 7 << 12, R).is_none());
        assert!(t.lookup(2, 3, 7 << 12, R).is_some());
        t.insert(dev(1, 4, 10));
        // One IOAS.
        assert_eq!(t.invalidate_ioas(11), 2);
        assert!(t.lookup(2, 3, 7 << 12, R).is_none());
        assert!(t.lookup(2, 4, 7 << 12, R).is_none());
        assert!(t.lookup(1, 4, 7 << 12, R).is_some());
        assert_eq!(t.invalidate_ioas(11), 0);
        assert_eq!(t.stats().invalidated, 4);
    }

    #[test]
    fn iotlb_domain_and_stage2_invalidations_stay_in_scope() {
        let mut t = Iotlb::new(64);
        let at = |vpn: u64, dev, domain, ioas, rights| Entry {
            tag: Tag {
                dev,
                pasid: 0,
                domain,
            },
            ioas,
            rights,
            ..entry(vpn, domain, 0)
        };
        let nested = Rights::SecondLevel {
            read: true,
            write: true,
            exec: false,
        };
        // A domain's invalidation leaves other domains alone.
        t.insert(at(1, 1, 5, 9, Rights::Stage2));
        t.insert(at(1, 2, 6, 9, Rights::Stage2));
        assert_eq!(t.invalidate_domain(5, None), 1);
        assert!(t.lookup(2, 0, 1 << 12, R).is_some());
        t.invalidate_all();
        // A stage-2 unmap of pages [0x20, 0x21] of IOAS 9: stage-2 entries inside go, those
        // below and above stay; every nested entry over IOAS 9 goes, none over IOAS 10.
        for vpn in 0x1f..=0x22 {
            t.insert(at(vpn, 1, 9, 9, Rights::Stage2));
        }
        t.insert(at(0x40, 2, 7, 9, nested));
        t.insert(at(0x40, 3, 8, 10, nested));
        t.insert(at(0x20, 4, 10, 10, Rights::Stage2));
        assert_eq!(t.invalidate_stage2(9, 0x20 << 12, (0x22 << 12) - 1), 3);
        assert!(t.lookup(1, 0, 0x1f << 12, R).is_some());
        assert!(t.lookup(1, 0, 0x20 << 12, R).is_none());
        assert!(t.lookup(1, 0, 0x21 << 12, R).is_none());
        assert!(t.lookup(1, 0, 0x22 << 12, R).is_some());
        assert!(t.lookup(2, 0, 0x40 << 12, R).is_none());
        assert!(t.lookup(3, 0, 0x40 << 12, R).is_some());
        assert!(t.lookup(4, 0, 0x20 << 12, R).is_some());
    }

    #[test]
    fn iotlb_walk_older_than_an_invalidation_is_not_cached() {
        let mut t = Iotlb::new(4);
        let g = t.generation();
        t.insert_if_generation(entry(1, 5, 0), g);
        assert!(t.lookup(1, 0, 1 << 12, R).is_some());
        let g = t.generation();
        // An invalidation (even one that drops nothing) runs while the walk is in flight.
        assert_eq!(t.invalidate_device(9), 0);
        t.insert_if_generation(entry(2, 5, 0), g);
        assert!(t.lookup(1, 0, 2 << 12, R).is_none());
        let g = t.generation();
        t.invalidate_all();
        t.insert_if_generation(entry(3, 5, 0), g);
        assert!(t.lookup(1, 0, 3 << 12, R).is_none());
    }
}
