//! The register window of the PCI hotplug controller: offsets, access decoding, and a limit on
//! the warnings a guest can cause.
//!
//! Every register is 32 bits wide and only naturally aligned 32-bit accesses reach it (the
//! AML fields use `DWordAcc`). Anything else is guest misbehaviour: ignored, reads return 0.

use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;

/// `PCIU`: bitmap of slots with a newly added device (bit n = slot n). Reading clears it.
pub const PCIU: u64 = 0x00;
/// `PCID`: bitmap of slots whose device the VMM wants removed. Reading clears it.
pub const PCID: u64 = 0x04;
/// `B0EJ`: the guest writes `1 << slot` from the slot's `_EJ0` once it let go of the device.
/// Reads return 0.
pub const B0EJ: u64 = 0x08;
/// `PSEG`: PCI segment the other registers refer to. Only segment 0 exists.
pub const PSEG: u64 = 0x0c;
/// `GDAT`: the ACPI GED event register (bits `GED_EVENT_*`). Reading clears it.
pub const GDAT: u64 = 0x10;
/// Bytes of the window the registers occupy (the rest of the window is reserved).
pub const REGS_LEN: u64 = 0x14;

/// One register of the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    /// [`PCIU`].
    SlotsUp,
    /// [`PCID`].
    SlotsDown,
    /// [`B0EJ`].
    Eject,
    /// [`PSEG`].
    Segment,
    /// [`GDAT`].
    GedEvent,
}

/// A guest access that matches no register.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum AccessError {
    /// Not a 4-byte access, or not 4-byte aligned.
    #[error(
        "PCI hotplug register access of {len} bytes at offset {offset:#x} is not an aligned \
         32-bit access"
    )]
    Width {
        /// Offset into the window.
        offset: u64,
        /// Access size in bytes.
        len: usize,
    },
    /// Aligned, but past the last register.
    #[error("No PCI hotplug register at offset {offset:#x}")]
    Offset {
        /// Offset into the window.
        offset: u64,
    },
}

impl Register {
    /// The register an access of `len` bytes at `offset` reaches.
    pub fn decode(offset: u64, len: usize) -> Result<Self, AccessError> {
        if len != 4 || !offset.is_multiple_of(4) {
            return Err(AccessError::Width { offset, len });
        }
        match offset {
            PCIU => Ok(Self::SlotsUp),
            PCID => Ok(Self::SlotsDown),
            B0EJ => Ok(Self::Eject),
            PSEG => Ok(Self::Segment),
            GDAT => Ok(Self::GedEvent),
            _ => Err(AccessError::Offset { offset }),
        }
    }

    /// The register's offset in the window.
    pub fn offset(self) -> u64 {
        match self {
            Self::SlotsUp => PCIU,
            Self::SlotsDown => PCID,
            Self::Eject => B0EJ,
            Self::Segment => PSEG,
            Self::GedEvent => GDAT,
        }
    }
}

/// How many guest-caused warnings are logged before the rest are suppressed.
const WARN_LIMIT: u32 = 32;

/// Logs guest-caused warnings up to [`WARN_LIMIT`] times, so a guest hammering the window
/// cannot flood the log.
#[derive(Debug, Default)]
pub(crate) struct WarnLimit {
    count: AtomicU32,
}

impl WarnLimit {
    /// Logs `args` as a warning unless the limit was reached.
    pub(crate) fn warn(&self, args: std::fmt::Arguments<'_>) {
        let n = self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                Some(c.saturating_add(1))
            })
            .unwrap_or(u32::MAX);
        if n < WARN_LIMIT {
            log::warn!("{args}");
        } else if n == WARN_LIMIT {
            log::warn!("{args} (further PCI hotplug register warnings are suppressed)");
        }
    }

    /// How many warnings were asked for (logged or not).
    #[cfg(test)]
    pub(crate) fn count(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_accepts_only_aligned_dwords_on_registers() {
        for r in [
            Register::SlotsUp,
            Register::SlotsDown,
            Register::Eject,
            Register::Segment,
            Register::GedEvent,
        ] {
            assert_eq!(Register::decode(r.offset(), 4), Ok(r));
            assert!(r.offset() < REGS_LEN);
        }
        for len in [0, 1, 2, 3, 8] {
            assert_eq!(
                Register::decode(PCIU, len),
                Err(AccessError::Width { offset: PCIU, len })
            );
        }
        assert_eq!(
            Register::decode(2, 4),
            Err(AccessError::Width { offset: 2, len: 4 })
        );
        assert_eq!(
            Register::decode(REGS_LEN, 4),
            Err(AccessError::Offset { offset: REGS_LEN })
        );
        assert_eq!(
            Register::decode(u64::MAX - 3, 4),
            Err(AccessError::Offset {
                offset: u64::MAX - 3
            })
        );
    }

    #[test]
    fn warn_limit_counts_and_saturates() {
        let w = WarnLimit::default();
        for _ in 0..(WARN_LIMIT + 5) {
            w.warn(format_args!("test"));
        }
        assert_eq!(w.count(), WARN_LIMIT + 5);
        w.count.store(u32::MAX, Ordering::Relaxed);
        w.warn(format_args!("test"));
        assert_eq!(w.count(), u32::MAX);
    }
}
