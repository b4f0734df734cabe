//! The PASID capability the guest sees: hidden, or a synthesized vPASID whose control
//! register the ioasid layer follows through a [`PasidListener`]. PASID enable on the device
//! itself belongs to the host kernel. (The vSVA work extends this: PRI and ATS exposure,
//! per-PASID attach driven by the guest's control writes.)

use super::*;
use crate::pci::config::EXT_CONFIG_SPACE_SIZE;

/// vPASID placement when the device has no (hidden) PASID capability: the last 8 bytes.
pub(super) const VPASID_FALLBACK_OFFSET: usize = EXT_CONFIG_SPACE_SIZE - 8;

/// A synthesized PASID capability (the assignment enables PASID; the ioasid layer attaches
/// PASIDs as the guest programs them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VpasidConfig {
    /// Max PASID width in bits (1..=20).
    pub max_pasid_width: u8,
    /// Execute permission supported.
    pub execute: bool,
    /// Privileged mode supported.
    pub privileged: bool,
}

/// The guest's PASID control register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PasidControl {
    /// PASID enable.
    pub enabled: bool,
    /// Execute permission enable.
    pub execute: bool,
    /// Privileged mode enable.
    pub privileged: bool,
}

/// Called when the guest writes the vPASID control register.
pub type PasidListener = Box<dyn Fn(PasidControl) + Send>;

impl VfioPciDevice {
    pub(super) fn install_vpasid(&mut self, off: usize, cfg: VpasidConfig) {
        let width = cfg.max_pasid_width.clamp(1, 20);
        let cap = (u16::from(cfg.execute) << 1)
            | (u16::from(cfg.privileged) << 2)
            | (u16::from(width) << 8);
        self.emulate(off, 8);
        self.virt.set_u16(off + 4, cap);
        self.virt.set_u16(off + 6, 0);
        self.virt.set_read_only(off, 6);
        self.virt.set_wmask_u16(
            off + 6,
            1 | (u16::from(cfg.execute) << 1) | (u16::from(cfg.privileged) << 2),
        );
        self.vpasid = Some(off);
    }

    /// The guest's vPASID control register, when a vPASID capability is synthesized. This is
    /// the hook for the ioasid layer: PASID attach is only meaningful while `enabled`.
    pub fn pasid_control(&self) -> Option<PasidControl> {
        let off = self.vpasid?;
        let c = self.virt.read_u16(off + 6);
        Some(PasidControl {
            enabled: c & 1 != 0,
            execute: c & 2 != 0,
            privileged: c & 4 != 0,
        })
    }

    /// Calls `listener` after every guest write to the vPASID control register.
    pub fn set_pasid_listener(&mut self, listener: PasidListener) {
        self.pasid_listener = Some(listener);
    }

    /// After a guest config write of `[off, off + len)`: tells the listener when it touched
    /// the vPASID control register.
    pub(super) fn pasid_written(&self, off: usize, len: usize) {
        let Some(p) = self.vpasid else {
            return;
        };
        if off < p + 8 && p + 6 < off + len {
            if let (Some(l), Some(c)) = (&self.pasid_listener, self.pasid_control()) {
                l(c);
            }
        }
    }
}
