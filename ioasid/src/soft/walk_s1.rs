//! The VT-d first-stage walker: x86-64 paging, 4 or 5 levels, 4 KiB / 2 MiB / 1 GiB leaves.
//!
//! Guest tables are hostile input. The walk is bounded by the level count (a table that points
//! at itself just ends the walk after 4 or 5 reads), every entry is read through
//! [`TableMemory`] (which faults outside guest RAM), reserved bits fault, and the input address
//! must be canonical for the address width.
//!
//! Access rights, as VT-d's first-stage translation defines them:
//! - supervisor (privileged) requests fault unless SRE is set in the binding;
//! - user requests need U/S=1 at every level; user writes need R/W=1 at every level;
//! - supervisor writes need R/W=1 at every level only when WPE is set;
//! - execute requests need XD=0 at every level; supervisor execute of a user page faults
//!   (VT-d behaves as if SMEP were on).
//!
//! A successful walk sets the Accessed flag on every entry it used (and the extended-accessed
//! flag, bit 10, when EAFE is set) and the Dirty flag on the leaf for writes, each with an
//! atomic compare-exchange on guest memory. If an entry changed between the read and the
//! update, the walk restarts (a few times, then faults).

use crate::fault_types::{FaultPerm, FaultReason};
use crate::types::VtdStage1;

use super::descent::{descend, EntryFormat};
use super::table::{TableMemory, WalkFault, ADDR_MASK};

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const EA: u64 = 1 << 10;
const XD: u64 = 1 << 63;
/// Bits 29:13 of a 1 GiB leaf (bit 12 is PAT) must be zero.
const RSVD_1G: u64 = 0x3fff_e000;
/// Bits 20:13 of a 2 MiB leaf must be zero.
const RSVD_2M: u64 = 0x001f_e000;

const MAX_RESTARTS: usize = 8;

/// A first-stage binding, decoded from [`VtdStage1`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct S1Config {
    /// GPA of the root table (PML4 or PML5).
    pub root: u64,
    /// Paging levels: 4 (48-bit) or 5 (57-bit). Anything else faults every walk.
    pub levels: u8,
    /// Supervisor requests enabled.
    pub sre: bool,
    /// Write protect enable for supervisor writes.
    pub wpe: bool,
    /// Extended accessed flag enable.
    pub eafe: bool,
}

impl S1Config {
    /// Decodes a binding; `None` when the address width is not 48 or 57 or the root is not
    /// page aligned (the kernel refuses those with `EINVAL`).
    pub fn from_vtd(s1: &VtdStage1) -> Option<Self> {
        let levels = match s1.addr_width {
            48 => 4,
            57 => 5,
            _ => return None,
        };
        if s1.pgtbl_addr & !ADDR_MASK != 0 {
            return None;
        }
        Some(S1Config {
            root: s1.pgtbl_addr,
            levels,
            sre: s1.sre,
            wpe: s1.wpe,
            eafe: s1.eafe,
        })
    }
}

/// The accumulated rights of a first-stage translation (what an IOTLB entry caches).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct S1Rights {
    /// R/W=1 at every level.
    pub writable: bool,
    /// U/S=1 at every level.
    pub user: bool,
    /// XD=1 at some level.
    pub no_exec: bool,
    /// The leaf's Dirty flag is set (a write may use the cached entry without a walk).
    pub dirty: bool,
}

impl S1Rights {
    /// Whether these rights allow `access` under the binding's SRE/WPE.
    pub fn allow(&self, access: FaultPerm, sre: bool, wpe: bool) -> bool {
        if access.exec && self.no_exec {
            return false;
        }
        if access.privileged {
            if !sre || (access.exec && self.user) {
                return false;
            }
            self.writable || !access.write || !wpe
        } else {
            self.user && (self.writable || !access.write)
        }
    }
}

/// A successful first-stage walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct S1Leaf {
    /// The output GPA for the input address.
    pub gpa: u64,
    /// Base of the input page the leaf maps.
    pub page_base: u64,
    /// Size of that page (4 KiB, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// The accumulated rights.
    pub rights: S1Rights,
}

/// Whether `addr` is canonical for a `width`-bit address space.
pub fn canonical(addr: u64, width: u32) -> bool {
    if !(1..64).contains(&width) {
        return false;
    }
    let shift = 64 - width;
    (((addr << shift) as i64) >> shift) as u64 == addr
}

/// Walks the first-stage tables for `addr` and checks `access`; sets A/D on success.
pub fn walk_first_stage<M: TableMemory>(
    mem: &mut M,
    cfg: &S1Config,
    addr: u64,
    access: FaultPerm,
) -> Result<S1Leaf, WalkFault> {
    if !(4..=5).contains(&cfg.levels) {
        return Err(WalkFault::new(FaultReason::AddressOutOfRange, 0));
    }
    let width = 12 + 9 * u32::from(cfg.levels);
    if !canonical(addr, width) {
        return Err(WalkFault::new(FaultReason::AddressOutOfRange, 0));
    }
    if access.privileged && !cfg.sre {
        return Err(WalkFault::new(FaultReason::Permission, 0));
    }
    for _ in 0..MAX_RESTARTS {
        if let Some(leaf) = walk_once(mem, cfg, addr, access)? {
            return Ok(leaf);
        }
    }
    Err(WalkFault::new(FaultReason::NotPresent, cfg.levels))
}

/// The first-stage entry format for the shared descent.
const FORMAT: EntryFormat = EntryFormat {
    present: P,
    rsvd_1g: RSVD_1G,
    rsvd_2m: RSVD_2M,
};

/// One walk; `Ok(None)` when an A/D update raced with a change of the entry.
fn walk_once<M: TableMemory>(
    mem: &mut M,
    cfg: &S1Config,
    addr: u64,
    access: FaultPerm,
) -> Result<Option<S1Leaf>, WalkFault> {
    let (mut writable, mut user, mut no_exec) = (true, true, false);
    let d = descend(mem, &FORMAT, cfg.root, cfg.levels, addr, |e| {
        writable &= e & RW != 0;
        user &= e & US != 0;
        no_exec |= e & XD != 0;
    })?;
    let mut rights = S1Rights {
        writable,
        user,
        no_exec,
        dirty: d.leaf & D != 0,
    };
    if !rights.allow(access, cfg.sre, cfg.wpe) {
        return Err(WalkFault::new(FaultReason::Permission, d.level));
    }
    let accessed = if cfg.eafe { A | EA } else { A };
    let used = d.used.get(..d.n).unwrap_or(&[]);
    for (i, &(gpa, e)) in used.iter().enumerate() {
        let mut want = e | accessed;
        if i + 1 == d.n && access.write {
            want |= D;
        }
        if want != e {
            let level = cfg.levels.saturating_sub(i as u8);
            let done = mem
                .update_entry(gpa, e, want)
                .map_err(|r| WalkFault::new(r, level))?;
            if !done {
                return Ok(None);
            }
        }
    }
    rights.dirty |= access.write;
    let page_mask = !(d.size - 1);
    Ok(Some(S1Leaf {
        gpa: d.out_base | (addr & (d.size - 1)),
        page_base: addr & page_mask,
        page_size: d.size,
        rights,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;
    use crate::soft::descent::LARGE as PS;

    /// Sparse model memory.
    #[derive(Default)]
    struct Mem(HashMap<u64, u64>);

    impl TableMemory for Mem {
        fn read_entry(&mut self, gpa: u64) -> Result<u64, FaultReason> {
            if gpa >= 1 << 32 {
                return Err(FaultReason::AddressOutOfRange);
            }
            Ok(*self.0.get(&gpa).unwrap_or(&0))
        }
        fn update_entry(&mut self, gpa: u64, old: u64, new: u64) -> Result<bool, FaultReason> {
            let cur = self.read_entry(gpa)?;
            if cur != old {
                return Ok(false);
            }
            self.0.insert(gpa, new);
            Ok(true)
        }
    }

    fn cfg() -> S1Config {
        S1Config {
            root: 0x1000,
            levels: 4,
            sre: true,
            wpe: true,
            eafe: false,
        }
    }

    const R: FaultPerm = FaultPerm {
        read: true,
        write: false,
        exec: false,
        privileged: false,
    };

    /// With EAFE the walk sets EA (bit 10) next to A on every entry it uses, and only bit 10;
    /// without it, never (scripts/mutants found the EA bit untested).
    #[test]
    fn eafe_sets_extended_accessed_on_every_level() {
        for eafe in [false, true] {
            let mut m = Mem::default();
            m.0.insert(0x1000, 0x2000 | P | RW | US);
            m.0.insert(0x2000, 0x3000 | P | RW | US);
            m.0.insert(0x3000, 0x4000 | P | RW | US);
            m.0.insert(0x4000 + 8, 0x9000 | P | RW | US);
            let c = S1Config { eafe, ..cfg() };
            walk_first_stage(&mut m, &c, 0x1234, R).unwrap();
            for gpa in [0x1000, 0x2000, 0x3000, 0x4000 + 8] {
                let want = if eafe { A | (1 << 10) } else { A };
                assert_eq!(
                    m.0[&gpa] & (A | (1 << 10)),
                    want,
                    "eafe {eafe}, entry {gpa:#x}"
                );
            }
        }
    }

    #[test]
    fn four_level_4k_walk_sets_a_and_d() {
        let mut m = Mem::default();
        m.0.insert(0x1000, 0x2000 | P | RW | US);
        m.0.insert(0x2000, 0x3000 | P | RW | US);
        m.0.insert(0x3000, 0x4000 | P | RW | US);
        m.0.insert(0x4000 + 8, 0x9000 | P | RW | US);
        let leaf = walk_first_stage(&mut m, &cfg(), 0x1234, R).unwrap();
        assert_eq!(leaf.gpa, 0x9234);
        assert_eq!(m.0[&0x1000] & A, A);
        assert_eq!(m.0[&(0x4000 + 8)] & D, 0);
        let w = FaultPerm { write: true, ..R };
        walk_first_stage(&mut m, &cfg(), 0x1234, w).unwrap();
        assert_eq!(m.0[&(0x4000 + 8)] & D, D);
    }

    #[test]
    fn large_pages_reserved_bits_and_canonical() {
        let mut m = Mem::default();
        m.0.insert(0x1000, 0x2000 | P | RW | US);
        m.0.insert(0x2000, 0x4000_0000 | P | RW | US | PS); // 1 GiB at 0
        let leaf = walk_first_stage(&mut m, &cfg(), 0x1234_5678, R).unwrap();
        assert_eq!((leaf.gpa, leaf.page_size), (0x5234_5678, 1 << 30));
        m.0.insert(0x2000, 0x4000_2000 | P | RW | US | PS);
        assert_eq!(
            walk_first_stage(&mut m, &cfg(), 0x1234_5678, R)
                .unwrap_err()
                .reason,
            FaultReason::ReservedBit
        );
        m.0.insert(0x1000, 0x2000 | P | RW | US | PS);
        assert_eq!(
            walk_first_stage(&mut m, &cfg(), 0x1234_5678, R)
                .unwrap_err()
                .reason,
            FaultReason::ReservedBit
        );
        assert_eq!(
            walk_first_stage(&mut m, &cfg(), 1 << 47, R)
                .unwrap_err()
                .reason,
            FaultReason::AddressOutOfRange
        );
    }

    #[test]
    fn rights() {
        let ro_super = S1Rights {
            writable: false,
            user: false,
            no_exec: false,
            dirty: false,
        };
        let w = FaultPerm {
            write: true,
            privileged: true,
            ..R
        };
        assert!(!ro_super.allow(w, true, true));
        assert!(ro_super.allow(w, true, false));
        assert!(!ro_super.allow(w, false, false));
        assert!(!ro_super.allow(R, true, false));
        let user_x = S1Rights {
            user: true,
            ..ro_super
        };
        let x = FaultPerm {
            exec: true,
            privileged: true,
            ..R
        };
        assert!(!user_x.allow(x, true, false));
        assert!(user_x.allow(FaultPerm { exec: true, ..R }, true, false));
    }
}
