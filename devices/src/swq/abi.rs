//! The guest-visible ABI of the shared-work-queue device: PCI identity, BAR layout, BAR0
//! registers, the portal's submit status codes. The 64-byte descriptor and the 16-byte
//! completion record are the SVA copy engine's ([`crate::sva::abi`]), parsed by the same
//! code; only the way a descriptor arrives (a portal store, not a ring) and who fills its
//! PASID word (the device, from the submitting vCPU) differ.

/// STATUS bits (the SVA engine's: ENABLED, BUSY, ERROR) and CTRL bits (ENABLE; RESET, which
/// here also drops the queue and forgets every vCPU's submit status; CLEAR_ERROR).
pub use crate::sva::abi::{ctrl, status};
pub use crate::sva::abi::{
    decode_completion, encode_completion, flags, CompletionStatus, RawDescriptor, COMPLETION_SIZE,
    DESC_SIZE, MAX_LEN, PASID_MASK, PASID_VALID,
};

/// PCI vendor ID (the test vendor of QEMU's `edu` and of the SVA engine).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID: a new test ID, next to the SVA copy engine's 0x5a5a.
pub const DEVICE_ID: u16 = 0x5a5b;
/// Revision ID.
pub const REVISION: u8 = 1;

/// BAR0: registers and the MSI-X table/PBA (the SVA engine's layout: 4 KiB, 64-bit).
pub const REGS_BAR: u8 = 0;
/// BAR2: the portal page.
pub const PORTAL_BAR: u8 = 2;
/// BAR2 size: one 4 KiB portal page.
pub const PORTAL_SIZE: u64 = 0x1000;
/// The descriptor window at the start of the portal page.
pub const PORTAL_WINDOW: u64 = DESC_SIZE as u64;
/// Offset of the portal's submit-status read-back.
pub const PORTAL_STATUS: u64 = 0;

/// MSI-X vector raised when a descriptor with INTERRUPT completes.
pub const VECTOR_COMPLETION: u16 = 0;
/// MSI-X vector raised when a completion record cannot be written.
pub const VECTOR_ERROR: u16 = 1;

/// Work-queue capacity: descriptors queued or in flight.
pub const WQ_SIZE: u32 = 16;

/// The ID register value, "SWQ1".
pub const ID_VALUE: u32 = 0x5357_5131;

/// BAR0 register offsets (32-bit, read-only unless noted).
pub mod reg {
    /// ID: [`super::ID_VALUE`].
    pub const ID: u64 = 0x00;
    /// STATUS.
    pub const STATUS: u64 = 0x04;
    /// CTRL (RW).
    pub const CTRL: u64 = 0x08;
    /// WQ_SIZE: [`super::WQ_SIZE`].
    pub const WQ_SIZE: u64 = 0x0c;
    /// OCCUPANCY: descriptors queued or in flight.
    pub const OCCUPANCY: u64 = 0x10;
    /// SUBMITTED: descriptors accepted since enable (wrapping).
    pub const SUBMITTED: u64 = 0x14;
    /// COMPLETED: descriptors that ended since enable (wrapping).
    pub const COMPLETED: u64 = 0x18;
    /// RETRIES: submissions refused because the queue was full.
    pub const RETRIES: u64 = 0x1c;
    /// REJECTED: submissions refused for their PASID or a disabled queue (no DMA).
    pub const REJECTED: u64 = 0x20;
    /// MALFORMED: portal stores of a bad size, alignment or offset, and incomplete
    /// descriptors.
    pub const MALFORMED: u64 = 0x24;
}

/// What the portal read-back says about the reading vCPU's last submission (the ENQCMD
/// analogue: ACCEPTED is ZF = 0, RETRY is ZF = 1; the other codes are where ENQCMD would
/// fault or the VMM would refuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SubmitStatus {
    /// No submission from this vCPU since the device was reset.
    Idle = 0,
    /// Queued: a completion record follows.
    Accepted = 1,
    /// The queue was full: nothing queued, submit again (ENQCMD's ZF = 1).
    Retry = 2,
    /// The vCPU's IA32_PASID has no valid bit (ENQCMD would #GP): nothing queued, no DMA.
    NoPasid = 3,
    /// The guest PASID has no host translation: nothing queued, no DMA.
    Untranslated = 4,
    /// The queue is disabled (or Bus Master Enable is clear): nothing queued, no DMA.
    Disabled = 5,
    /// A bad portal store (size, alignment, offset) or a descriptor whose last qword was
    /// stored before all 64 bytes were: the partial descriptor is dropped.
    Malformed = 6,
}

impl SubmitStatus {
    /// The register value.
    pub fn code(self) -> u32 {
        self as u32
    }
}
