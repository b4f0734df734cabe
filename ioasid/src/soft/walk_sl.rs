//! The VT-d second-level walker (legacy and scalable-mode second-level tables), for a
//! shadowing vIOMMU that must read the guest's second-level tables.
//!
//! Entry format: R bit 0, W bit 1, X bit 2, SP bit 7 (at levels 2 and 3), address bits 51:12.
//! An entry with R, W and X all clear is not present. Rights are the AND over all levels.
//! 3, 4 or 5 levels (39-, 48- or 57-bit input, per SAGAW/AW); other level counts, input
//! addresses beyond the width, SP at level 4 or 5, and non-zero reserved bits of a large leaf
//! fault. This walker does not update A/D flags (SLADS is not modelled).

use crate::fault_types::{FaultPerm, FaultReason};

use super::descent::{descend, entry_span, EntryFormat};
use super::table::{TableMemory, WalkFault};

const R: u64 = 1;
const W: u64 = 1 << 1;
const X: u64 = 1 << 2;
/// Bits 29:12 of a 1 GiB leaf must be zero.
const RSVD_1G: u64 = 0x3fff_f000;
/// Bits 20:12 of a 2 MiB leaf must be zero.
const RSVD_2M: u64 = 0x001f_f000;

/// A second-level table: root and depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlConfig {
    /// GPA of the root table.
    pub root: u64,
    /// Levels: 3, 4 or 5.
    pub levels: u8,
}

impl SlConfig {
    /// The levels for an address width (AGAW): 39 -> 3, 48 -> 4, 57 -> 5.
    pub fn levels_for_width(width: u32) -> Option<u8> {
        match width {
            39 => Some(3),
            48 => Some(4),
            57 => Some(5),
            _ => None,
        }
    }
}

/// A successful second-level walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SlLeaf {
    /// The output address for the input address.
    pub addr: u64,
    /// Base of the input page the leaf maps.
    pub page_base: u64,
    /// Size of that page.
    pub page_size: u64,
    /// Read allowed at every level.
    pub read: bool,
    /// Write allowed at every level.
    pub write: bool,
    /// Execute allowed at every level.
    pub exec: bool,
}

/// The second-level entry format for the shared descent.
const FORMAT: EntryFormat = EntryFormat {
    present: R | W | X,
    rsvd_1g: RSVD_1G,
    rsvd_2m: RSVD_2M,
};

/// Walks the second-level tables for `addr` and checks `access` (R needs R, W needs W, an
/// execute request needs X).
pub fn walk_second_level<M: TableMemory>(
    mem: &mut M,
    cfg: &SlConfig,
    addr: u64,
    access: FaultPerm,
) -> Result<SlLeaf, WalkFault> {
    if !(3..=5).contains(&cfg.levels) {
        return Err(WalkFault::new(FaultReason::AddressOutOfRange, 0));
    }
    let width = 12 + 9 * u32::from(cfg.levels);
    if addr >> width != 0 {
        return Err(WalkFault::new(FaultReason::AddressOutOfRange, 0));
    }
    let (mut r, mut w, mut x) = (true, true, true);
    let d = descend(mem, &FORMAT, cfg.root, cfg.levels, addr, |e| {
        r &= e & R != 0;
        w &= e & W != 0;
        x &= e & X != 0;
    })?;
    if (access.read && !r) || (access.write && !w) || (access.exec && !x) {
        return Err(WalkFault::new(FaultReason::Permission, d.level));
    }
    Ok(SlLeaf {
        addr: d.out_base | (addr & (d.size - 1)),
        page_base: addr & !(d.size - 1),
        page_size: d.size,
        read: r,
        write: w,
        exec: x,
    })
}

/// The leaves of a second-level table over an input range, found by [`scan_second_level`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlScan {
    /// The leaves, in input-address order. A leaf that straddles the range's ends is reported
    /// whole (its `page_base` may lie before the range).
    pub leaves: Vec<SlLeaf>,
    /// Entries that could not be used (outside guest memory, reserved bits set), with the
    /// input address that reached them; at most [`SCAN_FAULTS_KEPT`] are kept.
    pub faults: Vec<(u64, WalkFault)>,
    /// How many bad entries were found in all (`faults` keeps the first few).
    pub fault_count: u64,
    /// The step budget ran out before the end of the range: the scan is incomplete.
    pub truncated: bool,
    /// When truncated: the first input address the scan did not look at.
    pub resume_at: Option<u64>,
}

/// Bad entries a scan keeps for its report.
pub const SCAN_FAULTS_KEPT: usize = 16;

/// Finds every present leaf of the table for inputs in `[start, last]`, skipping what is not
/// present or unusable (an entry outside guest memory or with reserved bits set skips the
/// input span that entry covers, and is reported). At most `max_steps` descents are made: a
/// hostile table (every entry present, tables pointing at themselves) cannot make the scan
/// run for long; it is then marked `truncated`.
pub fn scan_second_level<M: TableMemory>(
    mem: &mut M,
    cfg: &SlConfig,
    start: u64,
    last: u64,
    max_steps: u64,
) -> SlScan {
    let mut scan = SlScan::default();
    if !(3..=5).contains(&cfg.levels) || start > last {
        return scan;
    }
    let width = 12 + 9 * u32::from(cfg.levels);
    let last = last.min((1u64 << width) - 1);
    let no_access = FaultPerm {
        read: false,
        write: false,
        exec: false,
        privileged: false,
    };
    let mut addr = start & !0xfff;
    let mut steps = 0u64;
    while addr <= last {
        if steps >= max_steps {
            scan.truncated = true;
            scan.resume_at = Some(addr);
            break;
        }
        steps += 1;
        let skip_to = match walk_second_level(mem, cfg, addr, no_access) {
            Ok(leaf) => {
                let next = leaf.page_base.checked_add(leaf.page_size);
                scan.leaves.push(leaf);
                next
            }
            Err(f) if f.level == 0 => break,
            Err(f) => {
                if f.reason != FaultReason::NotPresent {
                    scan.fault_count += 1;
                    if scan.faults.len() < SCAN_FAULTS_KEPT {
                        scan.faults.push((addr, f));
                    }
                }
                let span = entry_span(f.level);
                (addr & !(span - 1)).checked_add(span)
            }
        };
        match skip_to {
            Some(next) => addr = next,
            None => break,
        }
    }
    scan
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;
    use crate::soft::descent::LARGE as SP;

    struct Mem(HashMap<u64, u64>);

    impl TableMemory for Mem {
        fn read_entry(&mut self, gpa: u64) -> Result<u64, FaultReason> {
            Ok(*self.0.get(&gpa).unwrap_or(&0))
        }
        fn update_entry(&mut self, _: u64, _: u64, _: u64) -> Result<bool, FaultReason> {
            Ok(false)
        }
    }

    const READ: FaultPerm = FaultPerm {
        read: true,
        write: false,
        exec: false,
        privileged: false,
    };

    /// The address widths the second level knows, and no other (scripts/mutants found them
    /// untested).
    #[test]
    fn levels_for_each_width() {
        assert_eq!(SlConfig::levels_for_width(39), Some(3));
        assert_eq!(SlConfig::levels_for_width(48), Some(4));
        assert_eq!(SlConfig::levels_for_width(57), Some(5));
        for w in [0, 30, 38, 40, 47, 49, 56, 58, 64] {
            assert_eq!(SlConfig::levels_for_width(w), None, "width {w}");
        }
    }

    /// An entry is present when any one of R, W and X is set, and the leaf grants exactly
    /// the bits every level has.
    #[test]
    fn any_one_right_makes_an_entry_present() {
        let cfg = SlConfig {
            root: 0x1000,
            levels: 3,
        };
        let none = FaultPerm {
            read: false,
            ..READ
        };
        for bit in [R, W, X] {
            let mut m = Mem(HashMap::new());
            m.0.insert(0x1000, 0x2000 | R | W | X);
            m.0.insert(0x2000, 0x3000 | bit);
            m.0.insert(0x3000, 0x9000 | R | W | X);
            let leaf = walk_second_level(&mut m, &cfg, 0x123, none);
            assert!(leaf.is_ok(), "entry with only {bit:#x}: {leaf:?}");
            let leaf = leaf.unwrap();
            assert_eq!(leaf.addr, 0x9123);
            assert_eq!(
                (leaf.read, leaf.write, leaf.exec),
                (bit == R, bit == W, bit == X)
            );
        }
    }

    /// The scan's edges: an empty or inverted range and a bad depth scan nothing; a one-page
    /// range scans that page; the range is clipped to the input width, so a scan that ends
    /// exactly at the top is complete; the step budget stops a scan where it says; only bad
    /// entries (not absent ones) are counted as faults.
    #[test]
    fn scan_edges() {
        let cfg = SlConfig {
            root: 0x1000,
            levels: 3,
        };
        let top = (1u64 << 39) - 0x1000;
        let mut m = Mem(HashMap::new());
        // The first and the last 4 KiB page of the 39-bit input space.
        m.0.insert(0x1000, 0x2000 | R | W);
        m.0.insert(0x2000, 0x3000 | R | W);
        m.0.insert(0x3000, 0x9000 | R | W);
        m.0.insert(0x1000 + 511 * 8, 0x4000 | R | W);
        m.0.insert(0x4000 + 511 * 8, 0x5000 | R | W);
        m.0.insert(0x5000 + 511 * 8, 0xa000 | R | W);
        // A 1 GiB leaf with a reserved bit in slot 1 of the root (a bad entry).
        m.0.insert(0x1000 + 8, R | SP | (1 << 20));

        assert_eq!(
            scan_second_level(&mut m, &cfg, 0x2000, 0x1000, 100),
            SlScan::default()
        );
        // Inverted inside one page (that page has a leaf): still nothing.
        assert_eq!(
            scan_second_level(&mut m, &cfg, 0x800, 0x10, 100),
            SlScan::default()
        );
        let bad_depth = SlConfig { levels: 2, ..cfg };
        assert_eq!(
            scan_second_level(&mut m, &bad_depth, 0, 0, 100),
            SlScan::default()
        );
        let one = scan_second_level(&mut m, &cfg, 0, 0, 100);
        assert_eq!(one.leaves.len(), 1, "{one:?}");
        let at_top = scan_second_level(&mut m, &cfg, top, u64::MAX, 1);
        assert_eq!(at_top.leaves.len(), 1, "{at_top:?}");
        assert_eq!(at_top.leaves[0].addr, 0xa000);
        assert!(
            !at_top.truncated,
            "a scan that ends at the top is complete: {at_top:?}"
        );
        let gib = 1u64 << 30;
        let faults = scan_second_level(&mut m, &cfg, 0, 2 * gib - 1, 10_000);
        assert_eq!(faults.fault_count, 1, "{faults:?}");
        assert_eq!(faults.faults.len(), 1);
        assert_eq!(faults.faults[0].0, gib);
        assert_eq!(faults.faults[0].1.reason, FaultReason::ReservedBit);
        // Twenty bad entries: all counted, the first SCAN_FAULTS_KEPT kept.
        let mut bad = Mem(m.0.clone());
        for slot in 2..21u64 {
            bad.0.insert(0x1000 + slot * 8, R | SP | (1 << 20));
        }
        let many = scan_second_level(&mut bad, &cfg, 0, 21 * gib - 1, 10_000);
        assert_eq!(many.fault_count, 20, "{many:?}");
        assert_eq!(many.faults.len(), SCAN_FAULTS_KEPT);
        assert_eq!(many.faults.last().map(|f| f.0), Some(16 * gib));
        // The step budget: three descents, then the scan says where it stopped.
        let cut = scan_second_level(&mut m, &cfg, 0, u64::MAX, 3);
        assert!(cut.truncated, "{cut:?}");
        assert_eq!(cut.resume_at, Some(0x3000), "{cut:?}");
        let whole = scan_second_level(&mut m, &cfg, 0, u64::MAX, 10_000);
        assert_eq!(
            whole.leaves.iter().map(|l| l.addr).collect::<Vec<_>>(),
            vec![0x9000, 0xa000],
            "{whole:?}"
        );
    }

    #[test]
    fn three_level_walk_with_2m_leaf() {
        let mut m = Mem(HashMap::new());
        m.0.insert(0x1000, 0x2000 | R | W);
        m.0.insert(0x2000 + 8, 0x4000_0000 | R | SP); // 2 MiB at 0x20_0000 -> 0x4000_0000
        let cfg = SlConfig {
            root: 0x1000,
            levels: 3,
        };
        let leaf = walk_second_level(&mut m, &cfg, 0x21_2345, READ).unwrap();
        assert_eq!((leaf.addr, leaf.page_size), (0x4001_2345, 1 << 21));
        let write = FaultPerm {
            write: true,
            read: false,
            ..READ
        };
        assert_eq!(
            walk_second_level(&mut m, &cfg, 0x21_2345, write)
                .unwrap_err()
                .reason,
            FaultReason::Permission
        );
        assert_eq!(
            walk_second_level(&mut m, &cfg, 1 << 39, READ)
                .unwrap_err()
                .reason,
            FaultReason::AddressOutOfRange
        );
        let bad = SlConfig { levels: 9, ..cfg };
        assert_eq!(
            walk_second_level(&mut m, &bad, 0, READ).unwrap_err().reason,
            FaultReason::AddressOutOfRange
        );
        m.0.insert(0x2000 + 8, 0x4000_1000 | R | SP);
        assert_eq!(
            walk_second_level(&mut m, &cfg, 0x21_2345, READ)
                .unwrap_err()
                .reason,
            FaultReason::ReservedBit
        );
    }

    #[test]
    fn scan_finds_leaves_and_skips_holes_and_bad_entries() {
        let mut m = Mem(HashMap::new());
        // 3 levels: root 0x1000; L2 table 0x2000 for [0, 1 GiB).
        m.0.insert(0x1000, 0x2000 | R | W);
        m.0.insert(0x2000, 0x3000 | R | W); // [0, 2 MiB): L1 table 0x3000
        m.0.insert(0x3000 + 8, 0x7000 | R | W); // 0x1000 -> 0x7000
        m.0.insert(0x3000 + 16, 0x8000 | R); // 0x2000 -> 0x8000 RO
        m.0.insert(0x2000 + 8, 0x4000_0000 | R | W | SP); // 2 MiB at 0x20_0000
        m.0.insert(0x2000 + 16, 0x4000_1000 | R | SP); // reserved bits: skipped, reported
        let cfg = SlConfig {
            root: 0x1000,
            levels: 3,
        };
        let scan = scan_second_level(&mut m, &cfg, 0, (1 << 39) - 1, 10_000);
        let got: Vec<(u64, u64, u64, bool)> = scan
            .leaves
            .iter()
            .map(|l| (l.page_base, l.page_size, l.addr, l.write))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x1000, 0x1000, 0x7000, true),
                (0x2000, 0x1000, 0x8000, false),
                (0x20_0000, 1 << 21, 0x4000_0000, true),
            ]
        );
        assert_eq!(scan.fault_count, 1);
        assert_eq!(scan.faults[0].1.reason, FaultReason::ReservedBit);
        assert!(!scan.truncated);
        // A table whose every entry points at itself: bounded by the step budget. Over the
        // first 1 GiB only (2^18 leaves), so that a budget that does not hold fails here in a
        // moment instead of walking the whole input space.
        let mut lp = Mem(HashMap::new());
        for i in 0..512u64 {
            lp.0.insert(0x1000 + 8 * i, 0x1000 | R | W);
        }
        let scan = scan_second_level(&mut lp, &cfg, 0, (1 << 30) - 1, 1000);
        assert!(scan.truncated);
        assert_eq!(scan.leaves.len(), 1000);
    }
}
