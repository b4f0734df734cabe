//! The page request queue (VT-d 7.5): page requests from devices (through the VMM, from the
//! host's fault queue or an emulated device) are written as 256-bit page request
//! descriptors at PQT; PRS.PPR and the page request event tell the guest.
//!
//! A full queue sets PRS.PRO and the request is refused ([`PrqError::Full`]); the caller
//! answers the device itself (the host's SUCCESS: the device retries), as QEMU does.

use ioasid::Pasid;
use thiserror::Error;

use crate::pci::{MsiMessage, PciBdf};

use super::event::EventRegs;
use super::mem::{GuestMemoryAccess, GuestMemoryError};
use super::regs::prs;

/// Size of one page request descriptor.
pub const DESC_SIZE: u64 = 32;

/// One page request, as a device sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRequest {
    /// The requester.
    pub bdf: PciBdf,
    /// The PASID of the request, if it has one.
    pub pasid: Option<Pasid>,
    /// Page request group index (9 bits).
    pub prgi: u16,
    /// Last request of the group.
    pub last: bool,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Execute access requested.
    pub exec: bool,
    /// Privileged (supervisor) access requested.
    pub privileged: bool,
    /// The page address.
    pub addr: u64,
}

impl PageRequest {
    /// The 256-bit page request descriptor (VT-d 7.5.1.1), as four qwords.
    pub fn encode(&self) -> [u64; 4] {
        let mut q0 = 1u64; // type: page request
        if let Some(p) = self.pasid {
            q0 |= 1 << 8;
            q0 |= u64::from(p.0 & 0xf_ffff) << 32;
            if self.exec {
                q0 |= 1 << 52;
            }
            if self.privileged {
                q0 |= 1 << 53;
            }
        }
        q0 |= u64::from(self.bdf.rid()) << 16;
        let mut q1 = self.addr & !0xfff;
        if self.read {
            q1 |= 1;
        }
        if self.write {
            q1 |= 1 << 1;
        }
        if self.last {
            q1 |= 1 << 2;
        }
        q1 |= u64::from(self.prgi & 0x1ff) << 3;
        [q0, q1, 0, 0]
    }
}

/// Why a page request was not queued.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum PrqError {
    /// The queue is full (PRS.PRO is now set) or overflowed earlier and the guest has not
    /// cleared PRS.PRO.
    #[error("The guest page request queue is full (request of {bdf} at {addr:#x})")]
    Full {
        /// The requester.
        bdf: PciBdf,
        /// The page address.
        addr: u64,
    },
    /// The unit has no page requests (svm=off), or the guest has not programmed PQA.
    #[error("Page requests are not enabled on this vIOMMU (request of {bdf})")]
    NotEnabled {
        /// The requester.
        bdf: PciBdf,
    },
    /// The guest does not accept page requests from this device now: translation is off,
    /// the device has no scalable-mode context entry, or the entry's PRE bit is clear (then
    /// a fault with reason 47h is recorded). Answer the device Invalid.
    #[error("Page request of {bdf} refused: {reason}")]
    Refused {
        /// The requester.
        bdf: PciBdf,
        /// Why.
        reason: &'static str,
    },
    /// The queue lies outside guest RAM.
    #[error("The guest page request queue is outside guest RAM")]
    Memory(#[source] GuestMemoryError),
}

/// PQH, PQT, PQA, PRS and the page request event registers.
#[derive(Debug)]
pub struct PrqRegs {
    /// Head (byte offset, bits 18:5), written by the guest.
    pub pqh: u64,
    /// Tail (byte offset), advanced by the model (software writes it only to reset it).
    pub pqt: u64,
    /// Queue address and size.
    pub pqa: u64,
    /// PRS: PPR and PRO.
    pub prs: u32,
    /// The page request event.
    pub event: EventRegs,
}

impl Default for PrqRegs {
    fn default() -> Self {
        Self::new()
    }
}

/// Mask of PQH/PQT: bits 18:5.
pub const OFFSET_MASK: u64 = 0x7_ffe0;

impl PrqRegs {
    /// Reset state.
    pub fn new() -> Self {
        Self {
            pqh: 0,
            pqt: 0,
            pqa: 0,
            prs: 0,
            event: EventRegs::new(),
        }
    }

    /// Whether the guest programmed the queue (PQA).
    pub fn enabled(&self) -> bool {
        self.pqa & !0xfff != 0
    }

    /// Queue size in bytes (2^PQS 4 KiB pages).
    pub fn size(&self) -> u64 {
        4096u64 << (self.pqa & 7)
    }

    /// A write of PRS: write-one-to-clear of PPR and PRO.
    pub fn write_prs(&mut self, v: u32) {
        self.prs &= !(v & (prs::PPR | prs::PRO));
        if self.prs == 0 {
            self.event.clear_pending();
        }
    }

    /// Queues `req`: writes the descriptor at PQT, advances PQT, sets PPR, and returns the
    /// event to send (only when PPR or PRO was clear before).
    pub fn post(
        &mut self,
        mem: &dyn GuestMemoryAccess,
        req: &PageRequest,
    ) -> Result<Option<MsiMessage>, (PrqError, Option<MsiMessage>)> {
        if !self.enabled() {
            return Err((PrqError::NotEnabled { bdf: req.bdf }, None));
        }
        let full = PrqError::Full {
            bdf: req.bdf,
            addr: req.addr,
        };
        if self.prs & prs::PRO != 0 {
            return Err((full, None));
        }
        let size = self.size();
        let tail = self.pqt % size;
        let next = (tail + DESC_SIZE) % size;
        if next == self.pqh % size {
            let was = self.prs;
            self.prs |= prs::PRO;
            let msg = if was == 0 { self.event.raise() } else { None };
            return Err((full, msg));
        }
        let mut bytes = [0u8; DESC_SIZE as usize];
        for (chunk, q) in bytes.chunks_exact_mut(8).zip(req.encode()) {
            chunk.copy_from_slice(&q.to_le_bytes());
        }
        let addr = (self.pqa & !0xfff).wrapping_add(tail);
        mem.write(addr, &bytes)
            .map_err(|e| (PrqError::Memory(e), None))?;
        self.pqt = next;
        let was = self.prs;
        self.prs |= prs::PPR;
        Ok(if was == 0 { self.event.raise() } else { None })
    }
}
