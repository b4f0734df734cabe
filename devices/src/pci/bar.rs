//! Base address registers: kinds, sizes, the flag bits a BAR reports, and address decoding.

use thiserror::Error;

/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;
/// Byte offset of BAR0 in config space.
pub const BAR0_OFFSET: usize = 0x10;
/// Smallest memory BAR the spec allows.
pub const MIN_MEM_BAR: u64 = 16;
/// Smallest I/O BAR the spec allows.
pub const MIN_IO_BAR: u64 = 4;
/// Largest I/O BAR (the PCI spec limits I/O BARs to 256 bytes).
pub const MAX_IO_BAR: u64 = 256;

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarKind {
    /// Port I/O space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space (uses this BAR and the next one).
    Mem64,
}

/// A BAR as a device declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBarInfo {
    /// BAR index, 0..=5 (the low half for a 64-bit BAR).
    pub index: u8,
    /// I/O, 32-bit or 64-bit memory.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least [`MIN_MEM_BAR`] or [`MIN_IO_BAR`].
    pub size: u64,
    /// The prefetchable bit (memory BARs only).
    pub prefetchable: bool,
}

/// A BAR declaration that cannot be encoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BarError {
    /// Index above 5, or a 64-bit BAR at index 5.
    #[error("BAR index {index} cannot hold a {kind:?} BAR")]
    BadIndex {
        /// The index.
        index: u8,
        /// The kind.
        kind: BarKind,
    },
    /// Size not a power of two, or out of the range the kind allows.
    #[error("BAR{index} size {size:#x} is invalid for a {kind:?} BAR")]
    BadSize {
        /// The index.
        index: u8,
        /// The kind.
        kind: BarKind,
        /// The rejected size.
        size: u64,
    },
}

impl PciBarInfo {
    /// A checked BAR declaration.
    pub fn new(index: u8, kind: BarKind, size: u64, prefetchable: bool) -> Result<Self, BarError> {
        let max_index = if kind == BarKind::Mem64 { 4 } else { 5 };
        if index > max_index {
            return Err(BarError::BadIndex { index, kind });
        }
        let (min, max) = match kind {
            BarKind::Io => (MIN_IO_BAR, MAX_IO_BAR),
            BarKind::Mem32 => (MIN_MEM_BAR, 1 << 31),
            BarKind::Mem64 => (MIN_MEM_BAR, 1 << 63),
        };
        if !size.is_power_of_two() || size < min || size > max {
            return Err(BarError::BadSize { index, kind, size });
        }
        Ok(Self {
            index,
            kind,
            size,
            prefetchable: prefetchable && kind != BarKind::Io,
        })
    }

    /// The smallest legal BAR size that covers `len` bytes of a region.
    pub fn size_for(kind: BarKind, len: u64) -> Option<u64> {
        let min = if kind == BarKind::Io {
            MIN_IO_BAR
        } else {
            MIN_MEM_BAR
        };
        len.max(min).checked_next_power_of_two()
    }

    /// The read-only flag bits in the low dword.
    pub fn flags(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Mem32 => u32::from(self.prefetchable) << 3,
            BarKind::Mem64 => 0x4 | (u32::from(self.prefetchable) << 3),
        }
    }

    /// Writable address bits of the low dword (what a sizing write of all ones reads back,
    /// minus the flags).
    pub fn low_mask(&self) -> u32 {
        let flag_bits: u32 = if self.kind == BarKind::Io { 0x3 } else { 0xf };
        (!(self.size - 1) as u32) & !flag_bits
    }

    /// Writable bits of the high dword of a 64-bit BAR (0 for other kinds).
    pub fn high_mask(&self) -> u32 {
        if self.kind == BarKind::Mem64 {
            (!(self.size - 1) >> 32) as u32
        } else {
            0
        }
    }

    /// The address the registers `low` (and `high`, for a 64-bit BAR) hold.
    pub fn decode(&self, low: u32, high: u32) -> u64 {
        let lo = u64::from(low & self.low_mask());
        match self.kind {
            BarKind::Mem64 => lo | (u64::from(high & self.high_mask()) << 32),
            _ => lo,
        }
    }

    /// Whether this BAR decodes memory (as opposed to I/O) space.
    pub fn is_memory(&self) -> bool {
        self.kind != BarKind::Io
    }

    /// Config-space byte offset of this BAR's low dword.
    pub fn offset(&self) -> usize {
        BAR0_OFFSET + 4 * usize::from(self.index)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn masks_and_decode() {
        let b = PciBarInfo::new(2, BarKind::Mem64, 1 << 33, true).unwrap();
        assert_eq!(b.flags(), 0xc);
        assert_eq!(b.low_mask(), 0);
        assert_eq!(b.high_mask(), 0xffff_fffe);
        assert_eq!(b.decode(0xc, 0x4), 0x4_0000_0000);
        let io = PciBarInfo::new(1, BarKind::Io, 32, true).unwrap();
        assert!(!io.prefetchable);
        assert_eq!(io.low_mask(), 0xffff_ffe0);
        assert_eq!(io.decode(0xc021, 0), 0xc020);
        assert!(PciBarInfo::new(5, BarKind::Mem64, 4096, false).is_err());
        assert!(PciBarInfo::new(0, BarKind::Mem32, 3000, false).is_err());
        assert!(PciBarInfo::new(0, BarKind::Io, 512, false).is_err());
        assert_eq!(PciBarInfo::size_for(BarKind::Mem32, 0x1800), Some(0x2000));
        assert_eq!(PciBarInfo::size_for(BarKind::Io, 1), Some(4));
    }
}
