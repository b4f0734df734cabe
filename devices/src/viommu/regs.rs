//! VT-d register offsets and bit definitions (Intel VT-d specification, chapter 11), and the
//! width of each register so that the MMIO dispatch can tell a 32-bit half of a 64-bit
//! register from a 32-bit register.

/// Version (32-bit).
pub const VER: u64 = 0x00;
/// Capability (64-bit).
pub const CAP: u64 = 0x08;
/// Extended capability (64-bit).
pub const ECAP: u64 = 0x10;
/// Global command (32-bit, write-only).
pub const GCMD: u64 = 0x18;
/// Global status (32-bit, read-only).
pub const GSTS: u64 = 0x1c;
/// Root table address (64-bit).
pub const RTADDR: u64 = 0x20;
/// Context command (64-bit).
pub const CCMD: u64 = 0x28;
/// Fault status (32-bit).
pub const FSTS: u64 = 0x34;
/// Fault event control (32-bit).
pub const FECTL: u64 = 0x38;
/// Fault event data (32-bit).
pub const FEDATA: u64 = 0x3c;
/// Fault event address (32-bit).
pub const FEADDR: u64 = 0x40;
/// Fault event upper address (32-bit).
pub const FEUADDR: u64 = 0x44;
/// Invalidation queue head (64-bit, read-only).
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64-bit).
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64-bit).
pub const IQA: u64 = 0x90;
/// Invalidation completion status (32-bit).
pub const ICS: u64 = 0x9c;
/// Invalidation event control (32-bit).
pub const IECTL: u64 = 0xa0;
/// Invalidation event data (32-bit).
pub const IEDATA: u64 = 0xa4;
/// Invalidation event address (32-bit).
pub const IEADDR: u64 = 0xa8;
/// Invalidation event upper address (32-bit).
pub const IEUADDR: u64 = 0xac;
/// Invalidation queue error record (64-bit, read-only).
pub const IQERCD: u64 = 0xb0;
/// Page request queue head (64-bit).
pub const PQH: u64 = 0xc0;
/// Page request queue tail (64-bit; advanced by hardware, reset by software).
pub const PQT: u64 = 0xc8;
/// Page request queue address (64-bit).
pub const PQA: u64 = 0xd0;
/// Page request status (32-bit).
pub const PRS: u64 = 0xdc;
/// Page request event control (32-bit).
pub const PECTL: u64 = 0xe0;
/// Page request event data (32-bit).
pub const PEDATA: u64 = 0xe4;
/// Page request event address (32-bit).
pub const PEADDR: u64 = 0xe8;
/// Page request event upper address (32-bit).
pub const PEUADDR: u64 = 0xec;
/// Register-based IOTLB invalidation: the pair starts here (ECAP.IRO).
pub const IOTLB_REG_OFFSET: u64 = 0xf0;
/// Invalidate address (64-bit).
pub const IVA: u64 = IOTLB_REG_OFFSET;
/// IOTLB invalidate (64-bit).
pub const IOTLB: u64 = IOTLB_REG_OFFSET + 8;
/// First fault recording register (CAP.FRO); each is 128 bits.
pub const FRCD_OFFSET: u64 = 0x220;

/// GCMD/GSTS bits (the status bit sits at the command bit's position).
pub mod gcmd {
    /// Translation enable / status.
    pub const TE: u32 = 1 << 31;
    /// Set root table pointer / root table pointer status.
    pub const SRTP: u32 = 1 << 30;
    /// Set fault log (unsupported).
    pub const SFL: u32 = 1 << 29;
    /// Enable advanced fault logging (unsupported).
    pub const EAFL: u32 = 1 << 28;
    /// Write buffer flush / status.
    pub const WBF: u32 = 1 << 27;
    /// Queued invalidation enable / status.
    pub const QIE: u32 = 1 << 26;
    /// Interrupt remapping enable (unsupported).
    pub const IRE: u32 = 1 << 25;
    /// Set interrupt remap table pointer (unsupported).
    pub const SIRTP: u32 = 1 << 24;
    /// Compatibility format interrupt (unsupported).
    pub const CFI: u32 = 1 << 23;
}

/// RTADDR: translation table mode (bits 11:10).
pub mod rtaddr {
    /// TTM mask.
    pub const TTM_MASK: u64 = 3 << 10;
    /// TTM = 00b: legacy root and context entries.
    pub const TTM_LEGACY: u64 = 0;
    /// TTM = 01b: scalable-mode root and context entries.
    pub const TTM_SCALABLE: u64 = 1 << 10;
}

/// CCMD bits.
pub mod ccmd {
    /// Invalidate context cache (cleared by hardware on completion).
    pub const ICC: u64 = 1 << 63;
    /// Shift of the requested granularity (CIRG, 62:61).
    pub const CIRG_SHIFT: u32 = 61;
    /// Shift of the actual granularity (CAIG, 60:59).
    pub const CAIG_SHIFT: u32 = 59;
}

/// IOTLB register bits.
pub mod iotlb {
    /// Invalidate IOTLB (cleared by hardware on completion).
    pub const IVT: u64 = 1 << 63;
    /// Shift of the requested granularity (IIRG, 61:60).
    pub const IIRG_SHIFT: u32 = 60;
    /// Shift of the actual granularity (IAIG, 58:57).
    pub const IAIG_SHIFT: u32 = 57;
}

/// FSTS bits.
pub mod fsts {
    /// Primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// Primary pending fault (read-only: some FRCD has F set).
    pub const PPF: u32 = 1 << 1;
    /// Invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// Invalidation completion error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// Invalidation time-out error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// Fault record index shift (15:8).
    pub const FRI_SHIFT: u32 = 8;
    /// Write-one-to-clear bits.
    pub const RW1C: u32 = PFO | IQE | ICE | ITE;
}

/// FECTL/IECTL/PECTL bits.
pub mod ectl {
    /// Interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// Interrupt pending (read-only).
    pub const IP: u32 = 1 << 30;
}

/// ICS bits.
pub mod ics {
    /// Invalidation wait descriptor complete (RW1C).
    pub const IWC: u32 = 1;
}

/// PRS bits.
pub mod prs {
    /// Pending page request (RW1C).
    pub const PPR: u32 = 1;
    /// Page request overflow (RW1C).
    pub const PRO: u32 = 1 << 1;
}

/// IQA bits.
pub mod iqa {
    /// Queue size: 2^QS 4 KiB pages.
    pub const QS_MASK: u64 = 7;
    /// 256-bit descriptors.
    pub const DW: u64 = 1 << 11;
    /// Base address.
    pub const ADDR_MASK: u64 = !0xfff;
}

/// Width of the register that covers `offset` (its aligned start and size in bytes), or
/// `None` for a hole. Fault recording registers are modelled as two 64-bit registers each.
pub fn register_at(offset: u64, nfr: usize) -> Option<(u64, u8)> {
    const REGS: &[(u64, u8)] = &[
        (VER, 4),
        (CAP, 8),
        (ECAP, 8),
        (GCMD, 4),
        (GSTS, 4),
        (RTADDR, 8),
        (CCMD, 8),
        (FSTS, 4),
        (FECTL, 4),
        (FEDATA, 4),
        (FEADDR, 4),
        (FEUADDR, 4),
        (IQH, 8),
        (IQT, 8),
        (IQA, 8),
        (ICS, 4),
        (IECTL, 4),
        (IEDATA, 4),
        (IEADDR, 4),
        (IEUADDR, 4),
        (IQERCD, 8),
        (PQH, 8),
        (PQT, 8),
        (PQA, 8),
        (PRS, 4),
        (PECTL, 4),
        (PEDATA, 4),
        (PEADDR, 4),
        (PEUADDR, 4),
        (IVA, 8),
        (IOTLB, 8),
    ];
    let frcd_end = FRCD_OFFSET + 16 * nfr as u64;
    if (FRCD_OFFSET..frcd_end).contains(&offset) {
        return Some((offset & !7, 8));
    }
    REGS.iter()
        .find(|(start, size)| offset >= *start && offset < start + u64::from(*size))
        .copied()
}
