//! One VT-d interrupt source (fault event, invalidation completion event, page request
//! event): its control, data and address registers and the mask/pending protocol.
//!
//! The three sources behave alike: a new event with the interrupt masked (IM) sets the
//! pending bit (IP) instead of sending; unmasking with IP set sends the message and clears
//! IP; software clearing the status that caused the event clears IP.

use crate::pci::MsiMessage;

use super::regs::ectl;

/// The control (xECTL), data, address and upper address registers of one event source.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EventRegs {
    ctl: u32,
    data: u32,
    addr: u32,
    uaddr: u32,
}

impl EventRegs {
    /// Reset state: masked, nothing pending.
    pub fn new() -> Self {
        Self {
            ctl: ectl::IM,
            ..Self::default()
        }
    }

    /// The control register.
    pub fn ctl(&self) -> u32 {
        self.ctl
    }

    /// The data register.
    pub fn data(&self) -> u32 {
        self.data
    }

    /// The address register.
    pub fn addr(&self) -> u32 {
        self.addr
    }

    /// The upper address register.
    pub fn uaddr(&self) -> u32 {
        self.uaddr
    }

    /// A write of the control register: only IM is writable. Unmasking with an event
    /// pending returns the message to send.
    pub fn write_ctl(&mut self, v: u32) -> Option<MsiMessage> {
        let was_pending = self.ctl & ectl::IP != 0;
        self.ctl = (self.ctl & ectl::IP) | (v & ectl::IM);
        if was_pending && v & ectl::IM == 0 {
            self.ctl &= !ectl::IP;
            return Some(self.message());
        }
        None
    }

    /// A write of the data register (bits 15:0 data; the extended bits 31:16 are kept as
    /// written, which is what x86 MSI data allows).
    pub fn write_data(&mut self, v: u32) {
        self.data = v;
    }

    /// A write of the address register (bits 1:0 reserved).
    pub fn write_addr(&mut self, v: u32) {
        self.addr = v & !3;
    }

    /// A write of the upper address register.
    pub fn write_uaddr(&mut self, v: u32) {
        self.uaddr = v;
    }

    /// A new event: the message to send now, or `None` when masked (IP is set instead).
    pub fn raise(&mut self) -> Option<MsiMessage> {
        if self.ctl & ectl::IM != 0 {
            self.ctl |= ectl::IP;
            None
        } else {
            Some(self.message())
        }
    }

    /// Software serviced the cause: drop a pending event.
    pub fn clear_pending(&mut self) {
        self.ctl &= !ectl::IP;
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.uaddr) << 32) | u64::from(self.addr),
            data: self.data,
        }
    }
}
