//! The portal's descriptor assembly: the guest's stores into the 64-byte window, staged per
//! submitting vCPU, become one descriptor when the store that covers the window's last byte
//! arrives.
//!
//! A guest without ENQCMD writes a descriptor as eight 8-byte MOV stores (or `rep movsq`);
//! KVM delivers each as an MMIO exit on the vCPU's own thread. Two vCPUs may submit at the
//! same time, so the staging is keyed by the submitter (the vCPU thread), and so is the
//! submit status each vCPU reads back. Rules (the device's ABI):
//! - a store is 8 bytes at an 8-byte-aligned offset or 4 bytes at a 4-byte-aligned offset
//!   inside the window; anything else (other sizes, misaligned, or beyond the window)
//!   drops the submitter's staged bytes and makes its status MALFORMED;
//! - the store that covers the window's last byte (offset 0x38 qword or 0x3c dword)
//!   submits; the descriptor must then have had all 64 bytes stored since the last
//!   submission or drop, else it is dropped as MALFORMED (a descending `rep movsq` hits
//!   this: store the last qword last);
//! - a byte stored twice keeps its last value.

use std::collections::HashMap;
use std::thread::ThreadId;

use super::abi::{SubmitStatus, DESC_SIZE, PORTAL_WINDOW};

/// Most submitters tracked at once (vCPUs: far above any VM here). Past it, the entry of a
/// submitter with nothing staged is recycled first.
pub const MAX_SUBMITTERS: usize = 1024;

/// What one store did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Store {
    /// Staged; the descriptor is not complete yet.
    Staged,
    /// The descriptor is complete: submit it.
    Complete(Box<[u8; DESC_SIZE]>),
    /// A bad store or an incomplete descriptor: the staged bytes were dropped.
    Malformed,
}

#[derive(Debug, Clone)]
struct Submitter {
    bytes: [u8; DESC_SIZE],
    /// Bit i: byte i was stored since the last submission or drop.
    written: u64,
    status: SubmitStatus,
}

impl Default for Submitter {
    fn default() -> Self {
        Self {
            bytes: [0; DESC_SIZE],
            written: 0,
            status: SubmitStatus::Idle,
        }
    }
}

/// Per-submitter staging and submit status.
#[derive(Debug, Default)]
pub struct Portal {
    submitters: HashMap<ThreadId, Submitter>,
}

impl Portal {
    fn entry(&mut self, who: ThreadId) -> &mut Submitter {
        if !self.submitters.contains_key(&who) && self.submitters.len() >= MAX_SUBMITTERS {
            let victim = self
                .submitters
                .iter()
                .find(|(_, s)| s.written == 0)
                .or_else(|| self.submitters.iter().next())
                .map(|(k, _)| *k);
            if let Some(k) = victim {
                self.submitters.remove(&k);
            }
        }
        self.submitters.entry(who).or_default()
    }

    /// A store of `data` at portal offset `off` by `who`.
    pub fn store(&mut self, who: ThreadId, off: u64, data: &[u8]) -> Store {
        let s = self.entry(who);
        let len = data.len() as u64;
        let aligned = (len == 8 || len == 4) && off.is_multiple_of(len);
        let end = off.checked_add(len).filter(|e| *e <= PORTAL_WINDOW);
        let (Some(end), true) = (end, aligned) else {
            s.written = 0;
            s.status = SubmitStatus::Malformed;
            return Store::Malformed;
        };
        let (start, stop) = (off as usize, end as usize);
        let Some(dst) = s.bytes.get_mut(start..stop) else {
            s.written = 0;
            s.status = SubmitStatus::Malformed;
            return Store::Malformed;
        };
        dst.copy_from_slice(data);
        s.written |= (u64::MAX >> (64 - len)) << off;
        if end < PORTAL_WINDOW {
            return Store::Staged;
        }
        let complete = s.written == u64::MAX;
        s.written = 0;
        if !complete {
            s.status = SubmitStatus::Malformed;
            return Store::Malformed;
        }
        Store::Complete(Box::new(s.bytes))
    }

    /// Records the outcome of `who`'s submission.
    pub fn set_status(&mut self, who: ThreadId, status: SubmitStatus) {
        self.entry(who).status = status;
    }

    /// The outcome of `who`'s last submission.
    pub fn status(&self, who: ThreadId) -> SubmitStatus {
        self.submitters
            .get(&who)
            .map_or(SubmitStatus::Idle, |s| s.status)
    }

    /// Forgets every submitter (device reset).
    pub fn reset(&mut self) {
        self.submitters.clear();
    }
}
