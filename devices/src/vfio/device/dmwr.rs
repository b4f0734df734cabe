//! DMWr (PCIe Deferrable Memory Write) as an assigned device's own config space describes
//! it: the Completer bit and Lengths field of Device Capabilities 2 (PCI Express
//! capability), and the Device 3 extended capability's DMWr Request Routing Supported,
//! DMWr Requester Enable and DMWr Egress Blocking. Where each bit comes from, and which are
//! unverified, is in [`crate::pci::ext_caps`].
//!
//! DMWr is how ENQCMD reaches a shared work queue. A device that completes DMWr may have
//! SWQ portals, but a guest can only use them with ENQCMD, whose PASID the CPU must
//! translate guest to host; with no CPU PASID translation (upstream KVM has none) ENQCMD
//! stays hidden from the guest and an assigned device's shared work queues stay unused:
//! the VMM never exposes a shared work queue whose path it cannot honour. The report says
//! so ([`DmwrInfo::swq`]).
//!
//! The parse reads a config-space image the device controls: every offset is bounded, a
//! malformed chain is reported, never a panic.

use serde::Serialize;

use super::*;
use crate::pci::config::walk_ext_capabilities;
use crate::pci::config::{cap_id, ext_cap_id, image_u16, image_u32, walk_capabilities};
use crate::pci::ext_caps::{
    DEV3_DEVCAP3, DEV3_DEVCAP3_DMWR_ROUTING, DEV3_DEVCTL3, DEV3_DEVCTL3_DMWR_EGRESS_BLK,
    DEV3_DEVCTL3_DMWR_REQ_EN, DEVCAP2_DMWR_COMPLETER, DEVCAP2_DMWR_LENGTHS_MASK,
    DEVCAP2_DMWR_LENGTHS_SHIFT, PCIE_DEVCAP2,
};

/// Length of the Device 3 extended capability (header, DevCap3, DevCtl3, DevSta3).
const DEV3_LEN: usize = 0x10;

/// What the ENQCMD path is for an assigned device's shared work queues today.
pub const SWQ_NOT_EXPOSED: &str = "not exposed: no CPU PASID translation (upstream KVM has \
    none, so ENQCMD stays hidden from the guest); the device's shared work queues stay unused";

/// The DMWr bits of one device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DmwrInfo {
    /// Device Capabilities 2: DMWr Completer Supported (the device accepts DMWr, as a
    /// shared work queue's portal does).
    pub completer: bool,
    /// Device Capabilities 2: DMWr Lengths Supported (raw 2-bit field).
    pub lengths: u8,
    /// Config-space offset of the Device 3 extended capability, if any.
    pub dev3_offset: Option<u16>,
    /// Device Capabilities 3: DMWr Request Routing Supported (a port's bit).
    pub routing: bool,
    /// Device Control 3: DMWr Requester Enable.
    pub requester_enabled: bool,
    /// Device Control 3: DMWr Egress Blocking.
    pub egress_blocking: bool,
    /// What was wrong with the image, when something was (the other fields hold what could
    /// be read).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<String>,
    /// Whether the device's shared work queues are exposed, and why.
    pub swq: &'static str,
}

impl DmwrInfo {
    /// Decodes a config-space image (256 or 4096 bytes; shorter images are read as far as
    /// they go).
    pub fn detect(bytes: &[u8]) -> Self {
        let mut out = DmwrInfo {
            swq: SWQ_NOT_EXPOSED,
            ..Default::default()
        };
        let mut problems = Vec::new();
        if bytes.len() < reg::HEADER_END {
            problems.push(format!("config image of {} bytes", bytes.len()));
        }
        let pcie = walk_capabilities(bytes)
            .into_iter()
            .find(|c| c.id == cap_id::EXP);
        if let Some(c) = pcie {
            let version = image_u16(bytes, c.offset + 2) & 0xf;
            let end = c.offset + PCIE_DEVCAP2 + 4;
            if version < 2 {
                // Version 1 capabilities end before Device Capabilities 2.
            } else if end > bytes.len().min(CONFIG_SPACE_SIZE) {
                problems.push(format!(
                    "PCI Express capability at {:#x} runs past the header space",
                    c.offset
                ));
            } else {
                let devcap2 = image_u32(bytes, c.offset + PCIE_DEVCAP2);
                out.completer = devcap2 & DEVCAP2_DMWR_COMPLETER != 0;
                out.lengths =
                    ((devcap2 >> DEVCAP2_DMWR_LENGTHS_SHIFT) & DEVCAP2_DMWR_LENGTHS_MASK) as u8;
            }
        }
        if let Some(e) = walk_ext_capabilities(bytes)
            .into_iter()
            .find(|e| e.id == ext_cap_id::DEV3)
        {
            if e.offset + DEV3_LEN > bytes.len() {
                problems.push(format!(
                    "Device 3 capability at {:#x} runs past the image",
                    e.offset
                ));
            } else {
                out.dev3_offset = u16::try_from(e.offset).ok();
                let cap3 = image_u32(bytes, e.offset + DEV3_DEVCAP3);
                let ctl3 = image_u32(bytes, e.offset + DEV3_DEVCTL3);
                out.routing = cap3 & DEV3_DEVCAP3_DMWR_ROUTING != 0;
                out.requester_enabled = ctl3 & DEV3_DEVCTL3_DMWR_REQ_EN != 0;
                out.egress_blocking = ctl3 & DEV3_DEVCTL3_DMWR_EGRESS_BLK != 0;
            }
        }
        if !problems.is_empty() {
            out.malformed = Some(problems.join("; "));
        }
        out
    }

    /// Whether the device names DMWr at all (completer, or a Device 3 capability with a
    /// DMWr bit set).
    pub fn present(&self) -> bool {
        self.completer || self.routing || self.requester_enabled
    }
}

impl VfioPciDevice {
    /// The device's DMWr bits, read from its own config space now (not the guest's view:
    /// the model hides nothing of DMWr, but the device's Device Control 3 is what counts).
    pub fn dmwr(&self) -> DmwrInfo {
        let mut image = vec![0u8; self.size];
        match self.regions.region_read(CONFIG_REGION, 0, &mut image) {
            Ok(()) => DmwrInfo::detect(&image),
            Err(e) => DmwrInfo {
                swq: SWQ_NOT_EXPOSED,
                malformed: Some(format!("config space read of the {}: {e}", self.id)),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::pci::config::{ConfigSpace, TypeZeroHeader};

    fn base() -> ConfigSpace {
        ConfigSpace::type0(
            EXT_CONFIG_SPACE_SIZE,
            &TypeZeroHeader {
                vendor_id: 0x8086,
                device_id: 0x0b25,
                ..Default::default()
            },
        )
    }

    /// A version 2 PCI Express capability with `devcap2`.
    fn with_pcie(c: &mut ConfigSpace, devcap2: u32) {
        let mut body = [0u8; 0x3a];
        body[0..2].copy_from_slice(&0x0092u16.to_le_bytes());
        body[0x22..0x26].copy_from_slice(&devcap2.to_le_bytes());
        c.add_capability(cap_id::EXP, &body).unwrap();
    }

    fn with_dev3(c: &mut ConfigSpace, cap3: u32, ctl3: u32) -> usize {
        c.add_ext_capability(ext_cap_id::PASID, 1, &[0; 4]).unwrap();
        let mut body = [0u8; 12];
        body[0..4].copy_from_slice(&cap3.to_le_bytes());
        body[4..8].copy_from_slice(&ctl3.to_le_bytes());
        c.add_ext_capability(ext_cap_id::DEV3, 1, &body).unwrap()
    }

    #[test]
    fn dmwr_present_with_completer_and_device3_bits() {
        let mut c = base();
        with_pcie(
            &mut c,
            DEVCAP2_DMWR_COMPLETER | (2 << DEVCAP2_DMWR_LENGTHS_SHIFT),
        );
        let off = with_dev3(
            &mut c,
            DEV3_DEVCAP3_DMWR_ROUTING,
            DEV3_DEVCTL3_DMWR_REQ_EN | DEV3_DEVCTL3_DMWR_EGRESS_BLK,
        );
        let d = DmwrInfo::detect(c.bytes());
        assert_eq!(
            d,
            DmwrInfo {
                completer: true,
                lengths: 2,
                dev3_offset: Some(off as u16),
                routing: true,
                requester_enabled: true,
                egress_blocking: true,
                malformed: None,
                swq: SWQ_NOT_EXPOSED,
            }
        );
        assert!(d.present());
    }

    #[test]
    fn dmwr_absent_without_the_bits() {
        // A PCIe device with other DevCap2 bits and no Device 3 capability.
        let mut c = base();
        with_pcie(&mut c, (1 << 21) | (1 << 22) | (1 << 27) | (1 << 31));
        let d = DmwrInfo::detect(c.bytes());
        assert!(!d.present(), "{d:?}");
        assert_eq!((d.dev3_offset, d.malformed), (None, None));
        // A conventional PCI function: nothing at all.
        let d = DmwrInfo::detect(base().bytes());
        assert!(!d.present());
        // Device 3 without DMWr bits.
        let mut c = base();
        with_pcie(&mut c, 0);
        let off = with_dev3(&mut c, 0x2, 0x4);
        let d = DmwrInfo::detect(c.bytes());
        assert_eq!(d.dev3_offset, Some(off as u16));
        assert!(!d.present());
    }

    #[test]
    fn dmwr_malformed_chains_are_reported() {
        // A version 1 PCI Express capability: no Device Capabilities 2 to read.
        let mut c = base();
        let mut body = [0u8; 0x12];
        body[0..2].copy_from_slice(&0x0001u16.to_le_bytes());
        c.add_capability(cap_id::EXP, &body).unwrap();
        assert!(!DmwrInfo::detect(c.bytes()).completer);
        // The PCIe capability placed at 0xf8: DevCap2 would be past 0x100.
        let mut b = base().bytes().to_vec();
        b[reg::STATUS] |= 0x10;
        b[reg::CAPABILITY_LIST] = 0xf8;
        b[0xf8] = cap_id::EXP;
        b[0xf9] = 0;
        b[0xfa] = 0x02;
        let d = DmwrInfo::detect(&b);
        assert!(d.malformed.unwrap().contains("PCI Express"));
        // A Device 3 header at the very end of config space.
        let mut b = base().bytes().to_vec();
        b[0x100..0x104].copy_from_slice(&(0x1bu32 | (1 << 16) | (0xffc << 20)).to_le_bytes());
        b[0xffc..0x1000].copy_from_slice(&u32::from(ext_cap_id::DEV3).to_le_bytes());
        let d = DmwrInfo::detect(&b);
        assert!(d.malformed.unwrap().contains("Device 3"));
        assert_eq!(d.dev3_offset, None);
        // A looped extended chain and a truncated image: bounded, no panic.
        let mut b = base().bytes().to_vec();
        b[0x100..0x104].copy_from_slice(&(0x1bu32 | (0x100 << 20)).to_le_bytes());
        assert!(!DmwrInfo::detect(&b).present());
        let d = DmwrInfo::detect(&b[..0x30]);
        assert!(d.malformed.unwrap().contains("48 bytes"));
        assert!(!DmwrInfo::detect(&[]).present());
    }

    #[test]
    fn dmwr_random_images_never_panic() {
        // Seeded loop with a fixed case budget (xorshift64*).
        let seed: u64 = 0x5eed_d3a7_0000_0030;
        println!("dmwr_random_images_never_panic: seed {seed:#x}");
        let mut s = seed;
        let mut next = || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            s.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        for case in 0..2000 {
            let len = [0usize, 0x40, 0x100, 0x1000][(next() % 4) as usize];
            let mut b: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 0x100 && case % 2 == 0 {
                b[reg::STATUS] |= 0x10;
                b[reg::CAPABILITY_LIST] = 0x40 + (next() % 0xc0) as u8;
            }
            if len == 0x1000 && case % 3 == 0 {
                let next_off = (next() % 0x1000) as u32;
                let hdr = u32::from(ext_cap_id::DEV3) | (1 << 16) | (next_off << 20);
                b[0x100..0x104].copy_from_slice(&hdr.to_le_bytes());
            }
            let _ = DmwrInfo::detect(&b);
        }
    }
}
