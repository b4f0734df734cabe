//! The guest-visible ABI of the SVA copy engine: PCI identity, BAR0 register offsets and bits,
//! and the descriptor and completion record formats with their validation. Nothing here
//! touches state: the formats are parsed once, with explicit bounds, into plain values.

/// PCI vendor ID.
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x5a5a;
/// Class code: other system peripheral (0x08 / 0x80 / 0x00).
pub const CLASS_CODE: u32 = 0x08_80_00;
/// Revision ID.
pub const REVISION: u8 = 1;

/// BAR0 size (4 KiB, 64-bit, non-prefetchable).
pub const BAR0_SIZE: u64 = 0x1000;
/// MSI-X vectors: 0 completion, 1 error.
pub const MSIX_VECTORS: u16 = 2;
/// MSI-X vector raised on a completion with INTERRUPT.
pub const VECTOR_COMPLETION: u16 = 0;
/// MSI-X vector raised when a completion record (or the ring) cannot be accessed.
pub const VECTOR_ERROR: u16 = 1;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u64 = 0x800;
/// Offset of the MSI-X pending-bit array in BAR0.
pub const MSIX_PBA_OFFSET: u64 = 0xc00;

/// BAR0 register offsets (32-bit unless noted).
pub mod reg {
    /// ID (RO): [`super::ID_VALUE`].
    pub const ID: u64 = 0x00;
    /// STATUS (RO).
    pub const STATUS: u64 = 0x04;
    /// CTRL (RW).
    pub const CTRL: u64 = 0x08;
    /// RING_BASE (RW, 64-bit; the high half at 0x14).
    pub const RING_BASE: u64 = 0x10;
    /// High half of RING_BASE.
    pub const RING_BASE_HI: u64 = 0x14;
    /// RING_SIZE (RW).
    pub const RING_SIZE: u64 = 0x18;
    /// RING_HEAD (RO).
    pub const RING_HEAD: u64 = 0x1c;
    /// RING_TAIL (RW, the doorbell).
    pub const RING_TAIL: u64 = 0x20;
    /// COMPLETED (RO).
    pub const COMPLETED: u64 = 0x24;
    /// PRQ_STATS (RO).
    pub const PRQ_STATS: u64 = 0x28;
}

/// The ID register value, "SVA1".
pub const ID_VALUE: u32 = 0x5356_4131;

/// STATUS bits.
pub mod status {
    /// The engine is enabled.
    pub const ENABLED: u32 = 1 << 0;
    /// The engine is processing a descriptor (or draining one after RESET/disable).
    pub const BUSY: u32 = 1 << 1;
    /// A descriptor ended with an error, or a ring/completion access failed, since the last
    /// CLEAR_ERROR.
    pub const ERROR: u32 = 1 << 2;
}

/// CTRL bits.
pub mod ctrl {
    /// Enable the engine.
    pub const ENABLE: u32 = 1 << 0;
    /// Reset (self-clearing).
    pub const RESET: u32 = 1 << 1;
    /// Clear STATUS.ERROR (self-clearing).
    pub const CLEAR_ERROR: u32 = 1 << 2;
}

/// Smallest ring.
pub const RING_MIN: u32 = 2;
/// Largest ring.
pub const RING_MAX: u32 = 4096;
/// Ring base alignment.
pub const RING_ALIGN: u64 = 64;
/// Bytes per descriptor.
pub const DESC_SIZE: usize = 64;
/// Bytes per completion record.
pub const COMPLETION_SIZE: usize = 16;
/// Completion record alignment.
pub const COMPLETION_ALIGN: u64 = 16;
/// Largest copy of one descriptor.
pub const MAX_LEN: u64 = 16 << 20;

/// Descriptor `pasid` word: the PASID valid bit.
pub const PASID_VALID: u32 = 1 << 31;
/// Descriptor `pasid` word: the PASID field.
pub const PASID_MASK: u32 = 0x000f_ffff;

/// Descriptor flags.
pub mod flags {
    /// Raise MSI-X vector 0 on completion.
    pub const INTERRUPT: u32 = 1 << 0;
    /// Supervisor (privileged) requests.
    pub const PRIVILEGED: u32 = 1 << 1;
    /// Do not send page requests: a translation fault ends the descriptor.
    pub const NO_PRI: u32 = 1 << 2;
    /// Every defined bit.
    pub const ALL: u32 = INTERRUPT | PRIVILEGED | NO_PRI;
}

/// Completion status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CompletionStatus {
    /// The copy completed.
    Success = 1,
    /// A translation fault that a page request did not fix (Invalid, or no PRI).
    PageFault = 2,
    /// No page response arrived in time.
    Timeout = 3,
    /// Reserved bits, bad length or bad alignment.
    BadDescriptor = 4,
    /// PASID not enabled, wider than the width, or privileged mode not enabled.
    BadPasid = 5,
}

impl CompletionStatus {
    /// The register value.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The status a register value names.
    pub fn from_code(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Success,
            2 => Self::PageFault,
            3 => Self::Timeout,
            4 => Self::BadDescriptor,
            5 => Self::BadPasid,
            _ => return None,
        })
    }
}

/// A descriptor as read from the ring (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawDescriptor {
    /// The `pasid` word (PASID and PASID_VALID).
    pub pasid: u32,
    /// The flags word.
    pub flags: u32,
    /// Source address.
    pub src: u64,
    /// Destination address.
    pub dst: u64,
    /// Length in bytes.
    pub len: u64,
    /// Completion record address.
    pub completion: u64,
    /// Whether any reserved byte (40..64) is non-zero.
    pub reserved_nonzero: bool,
}

fn u32_at(b: &[u8; DESC_SIZE], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(b.get(off..off + 4).unwrap_or(&[0; 4]));
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; DESC_SIZE], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(b.get(off..off + 8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(v)
}

impl RawDescriptor {
    /// Parses the 64 bytes of a descriptor.
    pub fn parse(b: &[u8; DESC_SIZE]) -> Self {
        Self {
            pasid: u32_at(b, 0),
            flags: u32_at(b, 4),
            src: u64_at(b, 8),
            dst: u64_at(b, 16),
            len: u64_at(b, 24),
            completion: u64_at(b, 32),
            reserved_nonzero: b.iter().skip(40).any(|&x| x != 0),
        }
    }

    /// The 64 bytes of this descriptor (the reserved bytes are zero, or 0xff in byte 40 when
    /// `reserved_nonzero`; for tests and guest harnesses).
    pub fn encode(&self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[0..4].copy_from_slice(&self.pasid.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.src.to_le_bytes());
        b[16..24].copy_from_slice(&self.dst.to_le_bytes());
        b[24..32].copy_from_slice(&self.len.to_le_bytes());
        b[32..40].copy_from_slice(&self.completion.to_le_bytes());
        if self.reserved_nonzero {
            b[40] = 0xff;
        }
        b
    }

    /// The PASID the descriptor names, when PASID_VALID is set (bits 30:20 not checked).
    pub fn pasid(&self) -> Option<u32> {
        (self.pasid & PASID_VALID != 0).then_some(self.pasid & PASID_MASK)
    }
}

/// What the PASID capability allows now (guest-written enables and the advertised width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PasidPolicy {
    /// PASID Enable.
    pub enabled: bool,
    /// Privileged Mode Enable.
    pub privileged: bool,
    /// The Max PASID Width the capability advertises (PASIDs are below `1 << width`).
    pub width: u8,
}

/// A descriptor that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// The PASID of src, dst and the completion record (`None`: requests without PASID).
    pub pasid: Option<u32>,
    /// Raise vector 0 on completion.
    pub interrupt: bool,
    /// Supervisor requests.
    pub privileged: bool,
    /// No page requests.
    pub no_pri: bool,
    /// Source.
    pub src: u64,
    /// Destination.
    pub dst: u64,
    /// Length, `1..=MAX_LEN`, and neither range wraps.
    pub len: u64,
    /// Completion record address, 16-byte aligned.
    pub completion: u64,
}

/// A descriptor that failed validation: its status, and where its completion record goes
/// (the descriptor's address space when that is usable, else requests without PASID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejected {
    /// BAD_DESCRIPTOR or BAD_PASID.
    pub status: CompletionStatus,
    /// The PASID the completion record is written with.
    pub completion_pasid: Option<u32>,
    /// Raise vector 0 (the INTERRUPT flag, when the flags word is valid).
    pub interrupt: bool,
}

impl RawDescriptor {
    /// Validates the descriptor against the ABI and the PASID capability. Checks, in order:
    /// reserved bits (pasid word bits 30:20, flag bits 31:3, bytes 40..64), length
    /// (`1..=16 MiB`, no address wrap), completion alignment, PRIVILEGED without
    /// PASID_VALID (BAD_DESCRIPTOR: the privileged bit travels in the PASID prefix), then the
    /// PASID (BAD_PASID: PASID not enabled, PASID `>= 1 << width`, PRIVILEGED while
    /// Privileged Mode Enable is clear).
    pub fn validate(&self, policy: &PasidPolicy) -> Result<Descriptor, Rejected> {
        let pasid = self.pasid();
        let pasid_usable =
            pasid.is_some_and(|p| policy.enabled && u64::from(p) < (1u64 << policy.width.min(20)));
        let completion_pasid = if pasid_usable { pasid } else { None };
        let flags_ok = self.flags & !flags::ALL == 0;
        let reject = |status| Rejected {
            status,
            completion_pasid,
            interrupt: flags_ok && self.flags & flags::INTERRUPT != 0,
        };
        let privileged = self.flags & flags::PRIVILEGED != 0;
        let reserved =
            self.pasid & !(PASID_VALID | PASID_MASK) != 0 || !flags_ok || self.reserved_nonzero;
        let len_ok = self.len > 0
            && self.len <= MAX_LEN
            && self.src.checked_add(self.len).is_some()
            && self.dst.checked_add(self.len).is_some();
        if reserved
            || !len_ok
            || !self.completion.is_multiple_of(COMPLETION_ALIGN)
            || (privileged && pasid.is_none())
        {
            return Err(reject(CompletionStatus::BadDescriptor));
        }
        if pasid.is_some() && (!pasid_usable || (privileged && !policy.privileged)) {
            return Err(reject(CompletionStatus::BadPasid));
        }
        Ok(Descriptor {
            pasid,
            interrupt: self.flags & flags::INTERRUPT != 0,
            privileged,
            no_pri: self.flags & flags::NO_PRI != 0,
            src: self.src,
            dst: self.dst,
            len: self.len,
            completion: self.completion,
        })
    }
}

/// The 16 bytes of a completion record.
pub fn encode_completion(status: CompletionStatus, bytes: u64) -> [u8; COMPLETION_SIZE] {
    let mut b = [0u8; COMPLETION_SIZE];
    b[0..4].copy_from_slice(&status.code().to_le_bytes());
    b[8..16].copy_from_slice(&bytes.to_le_bytes());
    b
}

/// Parses a completion record: (status register value, bytes copied).
pub fn decode_completion(b: &[u8; COMPLETION_SIZE]) -> (u32, u64) {
    let mut s = [0u8; 4];
    s.copy_from_slice(&b[0..4]);
    let mut n = [0u8; 8];
    n.copy_from_slice(&b[8..16]);
    (u32::from_le_bytes(s), u64::from_le_bytes(n))
}
