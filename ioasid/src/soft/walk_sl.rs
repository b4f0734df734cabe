//! The VT-d second-level walker (legacy and scalable-mode second-level tables), for a
//! shadowing vIOMMU that must read the guest's second-level tables.
//!
//! Entry format: R bit 0, W bit 1, X bit 2, SP bit 7 (at levels 2 and 3), address bits 51:12.
//! An entry with R, W and X all clear is not present. Rights are the AND over all levels.
//! 3, 4 or 5 levels (39-, 48- or 57-bit input, per SAGAW/AW); other level counts, input
//! addresses beyond the width, SP at level 4 or 5, and non-zero reserved bits of a large leaf
//! fault. This walker does not update A/D flags (SLADS is not modelled).

use crate::fault_types::{FaultPerm, FaultReason};

use super::table::{entry_gpa, TableMemory, WalkFault, ADDR_MASK};

const R: u64 = 1 << 0;
const W: u64 = 1 << 1;
const X: u64 = 1 << 2;
const SP: u64 = 1 << 7;
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
    let mut table = cfg.root & ADDR_MASK;
    let mut level = cfg.levels;
    let (mut r, mut w, mut x) = (true, true, true);
    let (base, size) = loop {
        let gpa = entry_gpa(table, addr, level);
        let e = mem
            .read_entry(gpa)
            .map_err(|reason| WalkFault::new(reason, level))?;
        if e & (R | W | X) == 0 {
            return Err(WalkFault::new(FaultReason::NotPresent, level));
        }
        r &= e & R != 0;
        w &= e & W != 0;
        x &= e & X != 0;
        if level == 1 {
            break (e & ADDR_MASK, 1u64 << 12);
        }
        if e & SP != 0 {
            let (rsvd, size) = match level {
                3 => (RSVD_1G, 1u64 << 30),
                2 => (RSVD_2M, 1u64 << 21),
                _ => return Err(WalkFault::new(FaultReason::ReservedBit, level)),
            };
            if e & rsvd != 0 {
                return Err(WalkFault::new(FaultReason::ReservedBit, level));
            }
            break (e & ADDR_MASK, size);
        }
        table = e & ADDR_MASK;
        level -= 1;
    };
    if (access.read && !r) || (access.write && !w) || (access.exec && !x) {
        return Err(WalkFault::new(FaultReason::Permission, level));
    }
    Ok(SlLeaf {
        addr: base | (addr & (size - 1)),
        page_base: addr & !(size - 1),
        page_size: size,
        read: r,
        write: w,
        exec: x,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;

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
}
