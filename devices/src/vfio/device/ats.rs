//! The synthesized ATS capability of an assigned device (vfio-pci shows the device's own,
//! which the model hides: the host kernel owns ATS enable on the device). The guest's
//! Enable and Smallest Translation Unit are kept and readable back, and an [`AtsListener`]
//! lets the VMM follow them (device-TLB invalidations are the vIOMMU's business).

pub use crate::pci::ext_caps::{ATS_CTRL_ENABLE, ATS_CTRL_STU};

use super::*;

/// Length of the ATS extended capability.
pub(super) const VATS_LEN: usize = 8;

/// ATS capability register bits copied from the device: Invalidate Queue Depth (4:0),
/// Page Aligned Request (5), Global Invalidate Supported (6).
const ATS_CAP_FROM_DEVICE: u16 = 0x7f;

/// The guest's ATS control register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AtsControl {
    /// ATS Enable.
    pub enabled: bool,
    /// Smallest Translation Unit (translations cover at least `4 KiB << stu`).
    pub stu: u8,
}

/// Called when the guest writes the vATS control register.
pub type AtsListener = Box<dyn Fn(AtsControl) + Send>;

impl VfioPciDevice {
    /// Installs the vATS at `off`; `device_cap` is the device's own ATS capability register.
    pub(super) fn install_vats(&mut self, off: usize, device_cap: u16) {
        self.emulate(off, VATS_LEN);
        self.virt.set_u16(off + 4, device_cap & ATS_CAP_FROM_DEVICE);
        self.virt.set_u16(off + 6, 0);
        self.virt.set_read_only(off, VATS_LEN);
        self.virt
            .set_wmask_u16(off + 6, ATS_CTRL_ENABLE | ATS_CTRL_STU);
        self.vats = Some(off);
    }

    /// The guest's vATS control register, when a vATS capability is synthesized.
    pub fn ats_control(&self) -> Option<AtsControl> {
        let off = self.vats?;
        let c = self.virt.read_u16(off + 6);
        Some(AtsControl {
            enabled: c & ATS_CTRL_ENABLE != 0,
            stu: (c & ATS_CTRL_STU) as u8,
        })
    }

    /// Calls `listener` after every guest write to the vATS control register.
    pub fn set_ats_listener(&mut self, listener: AtsListener) {
        self.ats_listener = Some(listener);
    }

    pub(super) fn ats_written(&self, off: usize, len: usize) {
        let Some(a) = self.vats else {
            return;
        };
        if off < a + 8 && a + 6 < off + len {
            if let (Some(l), Some(c)) = (&self.ats_listener, self.ats_control()) {
                l(c);
            }
        }
    }

    pub(super) fn ats_reset(&mut self) {
        if let Some(a) = self.vats {
            self.virt.set_u16(a + 6, 0);
        }
    }
}
