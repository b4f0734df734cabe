//! What the page-table walkers share: how they read guest table entries, and how a walk fails.
//!
//! Walkers read tables only through [`TableMemory`], so the same walker runs over stage 2 plus
//! guest RAM (nested translation, shadowing) or over a test's plain model memory.

use crate::fault_types::FaultReason;

use super::guest_mem::GuestRam;
use super::stage2::Ioas;

/// Mask of the address field of a paging-structure entry (bits 51:12).
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The GPA of the entry that translates `addr` in the level-`level` table at `table` (level 1
/// holds the 4 KiB leaves; each level resolves 9 bits of the input address).
pub(crate) fn entry_gpa(table: u64, addr: u64, level: u8) -> u64 {
    let shift = 12 + 9 * u32::from(level.saturating_sub(1));
    (table & ADDR_MASK) + ((addr >> shift) & 0x1ff) * 8
}

/// A failed walk: why, and at which level (the root table is the highest level; 0 means the
/// input address or the configuration itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalkFault {
    /// Why the walk failed.
    pub reason: FaultReason,
    /// The level whose entry failed (4 or 5 for the root; 0 before any table was read).
    pub level: u8,
}

impl WalkFault {
    pub(crate) fn new(reason: FaultReason, level: u8) -> Self {
        WalkFault { reason, level }
    }
}

/// How walkers reach table entries: by guest physical address (the parent IOAS's IOVA).
pub trait TableMemory {
    /// Reads the 8-byte entry at `gpa` (8-byte aligned).
    fn read_entry(&mut self, gpa: u64) -> Result<u64, FaultReason>;
    /// Atomically replaces the entry at `gpa` with `new` if it still holds `old`; `Ok(false)`
    /// when it changed under us (the walker then restarts).
    fn update_entry(&mut self, gpa: u64, old: u64, new: u64) -> Result<bool, FaultReason>;
}

/// Table memory behind a stage-2 IOAS: GPAs are translated by the IOAS, then read from
/// registered guest RAM. Counts the guest-memory reads and updates.
pub(crate) struct S2Tables<'a> {
    pub ioas: &'a Ioas,
    pub ram: &'a GuestRam,
    pub reads: u32,
    pub updates: u32,
}

impl<'a> S2Tables<'a> {
    pub(crate) fn new(ioas: &'a Ioas, ram: &'a GuestRam) -> Self {
        S2Tables {
            ioas,
            ram,
            reads: 0,
            updates: 0,
        }
    }

    /// The host address of the entry at `gpa`: it must be 8-byte aligned and mapped by the
    /// IOAS for reading, or for writing when `write`.
    fn entry_hva(&self, gpa: u64, write: bool) -> Result<u64, FaultReason> {
        if !gpa.is_multiple_of(8) {
            return Err(FaultReason::AddressOutOfRange);
        }
        let hit = self
            .ioas
            .translate(gpa)
            .ok_or(FaultReason::AddressOutOfRange)?;
        let allowed = if write { hit.perm.write } else { hit.perm.read };
        if !allowed {
            return Err(FaultReason::Permission);
        }
        Ok(hit.hva)
    }
}

impl TableMemory for S2Tables<'_> {
    fn read_entry(&mut self, gpa: u64) -> Result<u64, FaultReason> {
        let hva = self.entry_hva(gpa, false)?;
        self.reads += 1;
        self.ram.read_u64(hva).ok_or(FaultReason::AddressOutOfRange)
    }

    fn update_entry(&mut self, gpa: u64, old: u64, new: u64) -> Result<bool, FaultReason> {
        let hva = self.entry_hva(gpa, true)?;
        self.updates += 1;
        match self.ram.cmpxchg_u64(hva, old, new) {
            Some(r) => Ok(r.is_ok()),
            None => Err(FaultReason::AddressOutOfRange),
        }
    }
}
