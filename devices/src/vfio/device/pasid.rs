//! The PASID capability the guest sees: hidden, or a synthesized vPASID whose control
//! register the ioasid layer follows through a [`PasidListener`]. PASID enable on the device
//! itself belongs to the host kernel. The vPASID heads the synthesized vSVA chain (PASID,
//! then ATS (`ats`) and PRI (`pri`) when the host caps allow them); where the chain goes is
//! decided in `config` (`build_ext_capabilities`).

use super::super::caps::CapPolicy;
use super::*;
use crate::pci::config::{cap_id, EXT_CONFIG_SPACE_SIZE};

/// vPASID placement when the device has no (hidden) PASID capability and nothing sits in
/// the last bytes: the chain ends at the end of config space (a PASID-only chain takes the
/// last 8 bytes).
pub(super) const VPASID_FALLBACK_OFFSET: usize = EXT_CONFIG_SPACE_SIZE - VPASID_LEN;

/// Length of the PASID extended capability.
pub(super) const VPASID_LEN: usize = 8;

/// The vPRI's Outstanding Page Request Capacity when the VMM has no better number: the
/// host kernel owns the device's real allocation (vfio-pci hides PRI), so this only bounds
/// how many page requests the guest driver plans for.
pub const VPRI_DEFAULT_CAPACITY: u32 = 256;

/// A synthesized PASID capability (the assignment enables PASID; the ioasid layer attaches
/// PASIDs as the guest programs them), with the ATS and PRI capabilities chained after it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VpasidConfig {
    /// Max PASID width in bits (1..=20; the device manager clamps it to `max_pasid_bits`).
    pub max_pasid_width: u8,
    /// Execute permission supported.
    pub execute: bool,
    /// Privileged mode supported.
    pub privileged: bool,
    /// Synthesize an ATS capability (the IOMMU does not report ATS_NOT_SUPPORTED). Shown
    /// only when the device has an ATS capability of its own.
    pub ats: bool,
    /// Synthesize a PRI capability with this Outstanding Page Request Capacity (the IOMMU
    /// takes page requests: PRS). `None`: no PRI.
    pub pri_capacity: Option<u32>,
    /// Where the chain starts (`x_pasid_offset`); `None` picks a place that collides with
    /// nothing the device has. An explicit offset that collides is refused.
    pub offset: Option<usize>,
}

/// PASID capability register: Execute Permission Supported.
const PASID_CAP_EXEC: u16 = 1 << 1;
/// PASID capability register: Privileged Mode Supported.
const PASID_CAP_PRIV: u16 = 1 << 2;
/// PASID control: PASID Enable.
const PASID_CTRL_ENABLE: u16 = 1 << 0;

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

impl VpasidConfig {
    /// The Max PASID Width the guest sees.
    pub fn width(&self) -> u8 {
        self.max_pasid_width.clamp(1, 20)
    }

    /// Bytes the chain needs when ATS is shown (`ats`) or not: PASID, then ATS, then PRI.
    pub(super) fn chain_len(&self, ats: bool) -> usize {
        VPASID_LEN
            + if ats { super::ats::VATS_LEN } else { 0 }
            + if self.pri_capacity.is_some() {
                super::pri::VPRI_LEN
            } else {
                0
            }
    }
}

impl VfioPciDevice {
    pub(super) fn install_vpasid(&mut self, off: usize, cfg: VpasidConfig) {
        let cap = (u16::from(cfg.execute) * PASID_CAP_EXEC)
            | (u16::from(cfg.privileged) * PASID_CAP_PRIV)
            | (u16::from(cfg.width()) << 8);
        self.emulate(off, VPASID_LEN);
        self.virt.set_u16(off + 4, cap);
        self.virt.set_u16(off + 6, 0);
        self.virt.set_read_only(off, VPASID_LEN);
        self.virt
            .set_wmask_u16(off + 6, PASID_CTRL_ENABLE | (cap & 0x6));
        self.vpasid = Some(off);
    }

    /// The guest's vPASID control register, when a vPASID capability is synthesized. This is
    /// the hook for the ioasid layer: PASID attach is only meaningful while `enabled`.
    pub fn pasid_control(&self) -> Option<PasidControl> {
        let off = self.vpasid?;
        let c = self.virt.read_u16(off + 6);
        Some(PasidControl {
            enabled: c & PASID_CTRL_ENABLE != 0,
            execute: c & PASID_CAP_EXEC != 0,
            privileged: c & PASID_CAP_PRIV != 0,
        })
    }

    /// The guest-visible Max PASID Width of the vPASID (`None`: no vPASID).
    pub fn pasid_width(&self) -> Option<u8> {
        let off = self.vpasid?;
        Some(((self.virt.read_u16(off + 4) >> 8) & 0x1f) as u8)
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

    /// After a guest config write: the vSVA chain's side effects and listeners.
    pub(super) fn vsva_written(&mut self, off: usize, len: usize) {
        self.pasid_written(off, len);
        self.ats_written(off, len);
        self.pri_written(off, len);
    }

    /// Function reset: the chain's control registers return to their reset values.
    pub(super) fn vsva_reset(&mut self) {
        if let Some(p) = self.vpasid {
            self.virt.set_u16(p + 6, 0);
        }
        self.ats_reset();
        self.pri_reset();
    }
}

/// PCI Express Capabilities register: Device/Port Type field.
const EXP_FLAGS_TYPE: u16 = 0x00f0;
/// Device/Port Type: PCI Express Endpoint.
const EXP_TYPE_ENDPOINT: u16 = 0x0;
/// Device/Port Type: Legacy PCI Express Endpoint.
const EXP_TYPE_LEG_END: u16 = 0x1;
/// Device/Port Type: Root Complex Integrated Endpoint.
const EXP_TYPE_RC_END: u16 = 0x9;
/// Device Capabilities 2: End-End TLP Prefix Supported (21), Max End-End TLP Prefixes = 1
/// (23:22).
const EXP_DEVCAP2_EE_PREFIX: u32 = (1 << 21) | (1 << 22);
const EXP_DEVCAP2_EE_MASK: u32 = (1 << 21) | (3 << 22);

impl VfioPciDevice {
    /// Makes the guest's Linux accept PASID on the assigned device: `pci_enable_pasid`
    /// refuses a device without `eetlp_prefix_path`, which Linux sets only for a Root Port or
    /// an RC integrated endpoint with End-End TLP Prefix Supported in Device Capabilities 2,
    /// or below a bridge that has it. The device sits on the guest's root bus with no Root
    /// Port above it, so (as QEMU's vfio-pci does for a device on a root bus) an Endpoint is
    /// presented as an RC integrated endpoint, without link registers (RCiEPs have no link),
    /// and its Device Capabilities 2 says End-End TLP Prefix Supported: PASID-tagged TLPs
    /// are the host's concern, the host enabled PASID on the real path. Only the guest's
    /// view changes, and only with a vPASID.
    pub(super) fn present_pasid_path(&mut self) {
        let Some(o) = self
            .caps
            .iter()
            .find(|c| !c.extended && c.id == u16::from(cap_id::EXP) && c.policy != CapPolicy::Hide)
            .map(|c| c.offset)
        else {
            return;
        };
        // A version 2 capability with Device Capabilities 2 inside the 256 bytes.
        if o + 0x28 > CONFIG_SPACE_SIZE || self.virt.read_u16(o + 2) & 0xf < 2 {
            return;
        }
        let flags = self.virt.read_u16(o + 2);
        let kind = (flags & EXP_FLAGS_TYPE) >> 4;
        if matches!(kind, EXP_TYPE_ENDPOINT | EXP_TYPE_LEG_END) {
            self.emulate(o + 2, 2);
            self.virt
                .set_u16(o + 2, (flags & !EXP_FLAGS_TYPE) | (EXP_TYPE_RC_END << 4));
            // Link Capabilities, Control and Status read 0 and are not writable.
            self.emulate(o + 0x0c, 8);
            self.virt.set_u32(o + 0x0c, 0);
            self.virt.set_u32(o + 0x10, 0);
            self.virt.set_read_only(o + 0x0c, 8);
            for b in self.pass_write.iter_mut().skip(o + 0x0c).take(8) {
                *b = false;
            }
        } else if kind != EXP_TYPE_RC_END {
            return;
        }
        let cap2 = self.virt.read_u32(o + 0x24);
        self.emulate(o + 0x24, 4);
        self.virt.set_u32(
            o + 0x24,
            (cap2 & !EXP_DEVCAP2_EE_MASK) | EXP_DEVCAP2_EE_PREFIX,
        );
        self.virt.set_read_only(o + 0x24, 4);
    }
}
