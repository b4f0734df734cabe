//! The synthesized PRI capability of an assigned device (vfio-pci hides PRI; the host
//! kernel enables it on the device with its own allocation). The guest's Enable, Reset and
//! Outstanding Page Request Allocation are honoured: Reset self-clears and clears the
//! status errors, Stopped follows Enable (no request of the guest's is ever outstanding at
//! the device once it disables PRI: the VMM answers them, see the fault path), and the
//! allocation is capped at the advertised capacity and only changes while PRI is disabled.
//! A [`PriListener`] lets the VMM follow the state.

pub use crate::pci::ext_caps::{
    PRI_CTRL_ENABLE, PRI_CTRL_RESET, PRI_STATUS_PASID, PRI_STATUS_RF, PRI_STATUS_STOPPED,
    PRI_STATUS_UPRGI,
};

use super::*;

/// Length of the PRI extended capability.
pub(super) const VPRI_LEN: usize = 16;

mod off {
    pub const CTRL: usize = 4;
    pub const STATUS: usize = 6;
    pub const CAPACITY: usize = 8;
    pub const ALLOC: usize = 12;
}

/// The guest's view of the vPRI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriControl {
    /// PRI Enable.
    pub enabled: bool,
    /// Stopped (set exactly while PRI is disabled).
    pub stopped: bool,
    /// Outstanding Page Request Allocation (at most `capacity`).
    pub allocation: u32,
    /// Outstanding Page Request Capacity advertised.
    pub capacity: u32,
    /// The guest wrote Reset (in this write).
    pub reset: bool,
}

/// Called when the guest writes the vPRI control, status or allocation registers.
pub type PriListener = Box<dyn Fn(PriControl) + Send>;

impl VfioPciDevice {
    pub(super) fn install_vpri(&mut self, at: usize, capacity: u32) {
        self.emulate(at, VPRI_LEN);
        self.virt.set_read_only(at, VPRI_LEN);
        self.virt.set_u32(at + off::CAPACITY, capacity);
        self.vpri = Some(at);
        self.pri_reset();
    }

    /// Reset values: disabled and Stopped, no allocation.
    pub(super) fn pri_reset(&mut self) {
        let Some(at) = self.vpri else {
            return;
        };
        self.virt.set_u16(at + off::CTRL, 0);
        self.virt
            .set_u16(at + off::STATUS, PRI_STATUS_STOPPED | PRI_STATUS_PASID);
        self.virt.set_u32(at + off::ALLOC, 0);
        self.virt
            .set_wmask_u16(at + off::CTRL, PRI_CTRL_ENABLE | PRI_CTRL_RESET);
        self.virt
            .set_w1c_u16(at + off::STATUS, PRI_STATUS_RF | PRI_STATUS_UPRGI);
        self.virt.set_wmask_u32(at + off::ALLOC, u32::MAX);
    }

    /// The guest's vPRI state, when a vPRI capability is synthesized.
    pub fn pri_control(&self) -> Option<PriControl> {
        let at = self.vpri?;
        let ctrl = self.virt.read_u16(at + off::CTRL);
        Some(PriControl {
            enabled: ctrl & PRI_CTRL_ENABLE != 0,
            stopped: self.virt.read_u16(at + off::STATUS) & PRI_STATUS_STOPPED != 0,
            allocation: self.virt.read_u32(at + off::ALLOC),
            capacity: self.virt.read_u32(at + off::CAPACITY),
            reset: false,
        })
    }

    /// Calls `listener` after every guest write to the vPRI registers.
    pub fn set_pri_listener(&mut self, listener: PriListener) {
        self.pri_listener = Some(listener);
    }

    /// After a guest config write of `[o, o + len)`: Reset self-clears (clearing the status
    /// errors), Stopped follows Enable, the allocation is capped at the capacity and frozen
    /// while PRI is enabled (the spec leaves a change then undefined; Linux only writes it
    /// while disabled); then the listener hears the new state.
    pub(super) fn pri_written(&mut self, o: usize, len: usize) {
        let Some(at) = self.vpri else {
            return;
        };
        if !(o < at + VPRI_LEN && at + off::CTRL < o + len) {
            return;
        }
        let ctrl = self.virt.read_u16(at + off::CTRL);
        let mut status = self.virt.read_u16(at + off::STATUS);
        let reset = ctrl & PRI_CTRL_RESET != 0;
        if reset {
            self.virt.set_u16(at + off::CTRL, ctrl & !PRI_CTRL_RESET);
            status &= !(PRI_STATUS_RF | PRI_STATUS_UPRGI);
        }
        let enabled = ctrl & PRI_CTRL_ENABLE != 0;
        if enabled {
            status &= !PRI_STATUS_STOPPED;
        } else {
            status |= PRI_STATUS_STOPPED;
        }
        self.virt.set_u16(at + off::STATUS, status);
        let capacity = self.virt.read_u32(at + off::CAPACITY);
        let alloc = self.virt.read_u32(at + off::ALLOC);
        if alloc > capacity {
            self.virt.set_u32(at + off::ALLOC, capacity);
        }
        self.virt
            .set_wmask_u32(at + off::ALLOC, if enabled { 0 } else { u32::MAX });
        if let (Some(l), Some(mut c)) = (&self.pri_listener, self.pri_control()) {
            c.reset = reset;
            l(c);
        }
    }
}
