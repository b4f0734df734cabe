//! The page-table descent both VT-d walkers share ([`super::walk_s1`], [`super::walk_sl`]).
//!
//! Both formats are radix trees of 512 8-byte entries per 4 KiB table, 9 input bits per level,
//! 4 KiB leaves at level 1 and large leaves (1 GiB, 2 MiB) at levels 3 and 2 marked by bit 7.
//! They differ in what "present" means, in the reserved bits of a large leaf, and in how rights
//! accumulate; the walkers pass those in an [`EntryFormat`] and a per-entry visitor.
//!
//! The descent is bounded by the level count: a table that points at itself just ends the walk
//! after `levels` reads. Every entry is read through [`TableMemory`], which faults outside
//! guest memory.

use crate::fault_types::FaultReason;

use super::table::{entry_gpa, TableMemory, WalkFault, ADDR_MASK};

/// Bit 7: page size (SP in second-level entries, PS in first-stage ones).
pub(crate) const LARGE: u64 = 1 << 7;

/// What distinguishes one entry format in the descent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryFormat {
    /// The entry is present when any of these bits is set.
    pub present: u64,
    /// Bits of a 1 GiB leaf that must be zero.
    pub rsvd_1g: u64,
    /// Bits of a 2 MiB leaf that must be zero.
    pub rsvd_2m: u64,
}

/// Where a descent ended: the leaf entry and the entries it used on the way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Descent {
    /// The leaf entry.
    pub leaf: u64,
    /// The leaf's level (1: 4 KiB, 2: 2 MiB, 3: 1 GiB).
    pub level: u8,
    /// The output address of the leaf page (aligned to `size`).
    pub out_base: u64,
    /// The leaf page size.
    pub size: u64,
    /// `(gpa, value)` of every entry read, root first (for A/D updates).
    pub used: [(u64, u64); 5],
    /// How many of `used` are valid.
    pub n: usize,
}

/// The input span one entry at `level` covers.
pub(crate) fn entry_span(level: u8) -> u64 {
    1u64 << (12 + 9 * u32::from(level.clamp(1, 5) - 1))
}

/// Descends from `root` (a `levels`-level table) to the leaf for `addr`. `visit` sees every
/// present entry, root first, before the descent goes on (the walkers accumulate rights in
/// it). The caller has checked `levels` (at most 5) and the input address.
pub(crate) fn descend<M: TableMemory>(
    mem: &mut M,
    fmt: &EntryFormat,
    root: u64,
    levels: u8,
    addr: u64,
    mut visit: impl FnMut(u64),
) -> Result<Descent, WalkFault> {
    if !(1..=5).contains(&levels) {
        return Err(WalkFault::new(FaultReason::AddressOutOfRange, 0));
    }
    let mut used = [(0u64, 0u64); 5];
    let mut n = 0usize;
    let mut table = root & ADDR_MASK;
    let mut level = levels;
    loop {
        let gpa = entry_gpa(table, addr, level);
        let e = mem.read_entry(gpa).map_err(|r| WalkFault::new(r, level))?;
        if let Some(slot) = used.get_mut(n) {
            *slot = (gpa, e);
            n += 1;
        }
        if e & fmt.present == 0 {
            return Err(WalkFault::new(FaultReason::NotPresent, level));
        }
        visit(e);
        let leaf_size = match level {
            1 => Some(1u64 << 12),
            2 | 3 if e & LARGE != 0 => {
                let (rsvd, size) = if level == 3 {
                    (fmt.rsvd_1g, 1u64 << 30)
                } else {
                    (fmt.rsvd_2m, 1u64 << 21)
                };
                if e & rsvd != 0 {
                    return Err(WalkFault::new(FaultReason::ReservedBit, level));
                }
                Some(size)
            }
            _ if e & LARGE != 0 => return Err(WalkFault::new(FaultReason::ReservedBit, level)),
            _ => None,
        };
        if let Some(size) = leaf_size {
            return Ok(Descent {
                leaf: e,
                level,
                out_base: e & ADDR_MASK & !(size - 1),
                size,
                used,
                n,
            });
        }
        table = e & ADDR_MASK;
        level -= 1;
    }
}
