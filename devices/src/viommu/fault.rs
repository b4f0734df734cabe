//! Primary fault logging: the fault status register, the fault recording registers (CAP.NFR
//! of them at CAP.FRO) and the fault event interrupt.
//!
//! Records are written round-robin; a record whose F bit is still set when its turn comes
//! sets FSTS.PFO and the new fault is dropped, as the spec says. A fault from a source that
//! already has a pending record is collapsed into it (the spec allows it; QEMU does it). The
//! fault event is raised only when no earlier condition (PPF, PFO, IQE, ICE, ITE) is pending.

use crate::pci::MsiMessage;

use super::caps::NUM_FAULT_RECORDS;
use super::event::EventRegs;
use super::regs::fsts;

/// One fault as the model records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultRecord {
    /// Source id: the requester id (bus << 8 | devfn) of the device.
    pub sid: u16,
    /// The PASID, for a fault on a PASID-granular entry.
    pub pasid: Option<u32>,
    /// The spec's fault reason code (see `tables::FaultReason`).
    pub reason: u8,
    /// The address the record names: for a fault found while reading guest tables (there is
    /// no DMA request) the guest address of the offending entry or table.
    pub addr: u64,
    /// A write request (T=0); the model's table faults are reported as reads.
    pub write: bool,
}

impl FaultRecord {
    /// The 128-bit fault recording register value (low, high).
    pub fn encode(&self) -> (u64, u64) {
        let lo = self.addr & !0xfff;
        let mut hi = 1u64 << 63; // F
        if !self.write {
            hi |= 1 << 62; // T1: read
        }
        if let Some(p) = self.pasid {
            hi |= u64::from(p & 0xf_ffff) << 40;
            hi |= 1 << 31; // PP
        }
        hi |= u64::from(self.reason) << 32;
        hi |= u64::from(self.sid);
        (lo, hi)
    }
}

/// Why a DMA request faulted, as the VMM's translation path (soft walk, shadow) saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DmaFaultKind {
    /// The leaf (or a directory) entry does not allow the read: fault reason 6h.
    Read,
    /// The leaf (or a directory) entry does not allow the write: fault reason 5h.
    Write,
    /// The address is beyond the table's input width (MGAW): fault reason 4h.
    AddressBeyondWidth,
    /// A paging entry could not be read (outside guest RAM) or is malformed: 7h.
    PagingEntry,
}

impl DmaFaultKind {
    /// The fault reason code. The legacy codes are used in scalable mode too, as QEMU
    /// does; Linux decodes both ranges.
    pub fn code(self) -> u8 {
        match self {
            DmaFaultKind::AddressBeyondWidth => 0x04,
            DmaFaultKind::Write => 0x05,
            DmaFaultKind::Read => 0x06,
            DmaFaultKind::PagingEntry => 0x07,
        }
    }
}

const F_BIT: u64 = 1 << 63;

/// FSTS, FECTL/FEDATA/FEADDR/FEUADDR and the fault recording registers.
#[derive(Debug)]
pub struct FaultUnit {
    /// The stored FSTS bits: PFO, IQE, ICE, ITE (PPF and FRI are derived).
    status: u32,
    /// The fault event interrupt.
    pub event: EventRegs,
    records: [(u64, u64); NUM_FAULT_RECORDS],
    next: usize,
    fri: usize,
}

impl Default for FaultUnit {
    fn default() -> Self {
        Self::new()
    }
}

impl FaultUnit {
    /// Reset state.
    pub fn new() -> Self {
        Self {
            status: 0,
            event: EventRegs::new(),
            records: [(0, 0); NUM_FAULT_RECORDS],
            next: 0,
            fri: 0,
        }
    }

    fn ppf(&self) -> bool {
        self.records.iter().any(|(_, hi)| hi & F_BIT != 0)
    }

    fn any_pending(&self) -> bool {
        self.ppf() || self.status & fsts::RW1C != 0
    }

    /// The FSTS register.
    pub fn fsts(&self) -> u32 {
        let mut v = self.status;
        if self.ppf() {
            v |= fsts::PPF | ((self.fri as u32 & 0xff) << fsts::FRI_SHIFT);
        }
        v
    }

    /// A write of FSTS: write-one-to-clear of PFO, IQE, ICE and ITE. Returns whether IQE
    /// went from set to clear (the queue may then resume).
    pub fn write_fsts(&mut self, v: u32) -> bool {
        let iqe_was = self.status & fsts::IQE != 0;
        self.status &= !(v & fsts::RW1C);
        if !self.any_pending() {
            self.event.clear_pending();
        }
        iqe_was && self.status & fsts::IQE == 0
    }

    /// Whether FSTS.IQE is set (the queue is stopped).
    pub fn iqe(&self) -> bool {
        self.status & fsts::IQE != 0
    }

    fn raise_if_first(&mut self, was_pending: bool) -> Option<MsiMessage> {
        if was_pending {
            None
        } else {
            self.event.raise()
        }
    }

    /// Records a fault. Returns whether a record was written and the fault event message
    /// to send, if any.
    pub fn record(&mut self, rec: &FaultRecord) -> (bool, Option<MsiMessage>) {
        let was_pending = self.any_pending();
        if self.status & fsts::PFO != 0 {
            return (false, None);
        }
        let (lo, hi) = rec.encode();
        // Collapse into a pending record of the same source.
        if self
            .records
            .iter()
            .any(|(_, h)| h & F_BIT != 0 && (h & 0xffff) as u16 == rec.sid)
        {
            return (false, None);
        }
        let idx = self.next % NUM_FAULT_RECORDS;
        let Some(slot) = self.records.get_mut(idx) else {
            return (false, None);
        };
        if slot.1 & F_BIT != 0 {
            self.status |= fsts::PFO;
            return (false, self.raise_if_first(was_pending));
        }
        *slot = (lo, hi);
        if !self.ppf_except(idx) {
            self.fri = idx;
        }
        self.next = (idx + 1) % NUM_FAULT_RECORDS;
        (true, self.raise_if_first(was_pending))
    }

    fn ppf_except(&self, idx: usize) -> bool {
        self.records
            .iter()
            .enumerate()
            .any(|(i, (_, hi))| i != idx && hi & F_BIT != 0)
    }

    /// Sets FSTS.IQE (an invalidation queue error) and returns the event to send.
    pub fn set_iqe(&mut self) -> Option<MsiMessage> {
        let was_pending = self.any_pending();
        self.status |= fsts::IQE;
        self.raise_if_first(was_pending)
    }

    /// Reads one 64-bit half of a fault recording register (`index`, `high`).
    pub fn read_frcd(&self, index: usize, high: bool) -> u64 {
        self.records
            .get(index)
            .map(|(lo, hi)| if high { *hi } else { *lo })
            .unwrap_or(0)
    }

    /// A write of a fault recording register: only F (bit 127) is writable, one to clear.
    pub fn write_frcd(&mut self, index: usize, high: bool, v: u64) {
        if !high || v & F_BIT == 0 {
            return;
        }
        if let Some(slot) = self.records.get_mut(index) {
            slot.1 &= !F_BIT;
        }
        if self.ppf() {
            // FRI names the first pending record from the current index on.
            if let Some(i) = (0..NUM_FAULT_RECORDS)
                .map(|k| (self.fri + k) % NUM_FAULT_RECORDS)
                .find(|&i| self.records.get(i).is_some_and(|r| r.1 & F_BIT != 0))
            {
                self.fri = i;
            }
        } else if !self.any_pending() {
            self.event.clear_pending();
        }
    }
}
