//! IOMMU capabilities decoded from `IOMMU_GET_HW_INFO`, readable before any attach.
//!
//! This answers the RFC's question "is there a way to detect nesting before attach?": bind the
//! device, call [`HwCaps`]'s source (`get_hw_info`), and ask [`HwCaps::supports_nesting`].

use serde::{Deserialize, Serialize};

/// VT-d CAP_REG decoded (Intel VT-d spec, §11.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtdCap {
    /// Number of domains supported, as 2^(4 + 2*ND).
    pub nd: u8,
    /// Caching mode: not-present entries may be cached (the IOMMU is emulated).
    pub cm: bool,
    /// Supported adjusted guest address widths (bit 1: 39-bit/3-level, bit 2: 48-bit/4-level, bit 3: 57-bit/5-level).
    pub sagaw: u8,
    /// Maximum guest address width in bits.
    pub mgaw: u8,
    /// Second-level large page support (bit 0: 2 MiB, bit 1: 1 GiB).
    pub sllps: u8,
    /// Page-selective invalidation.
    pub psi: bool,
    /// Number of fault-recording registers.
    pub nfr: u16,
    /// Maximum address mask value for page-selective invalidation.
    pub mamv: u8,
    /// Write and read draining.
    pub dwd: bool,
    /// Read draining.
    pub drd: bool,
    /// First-stage 1 GiB pages.
    pub fs1gp: bool,
    /// Posted interrupts.
    pub pi: bool,
    /// First-stage 5-level paging.
    pub fs5lp: bool,
}

/// VT-d ECAP_REG decoded (Intel VT-d spec, §11.4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtdEcap {
    /// Page-walk coherency.
    pub c: bool,
    /// Queued invalidation.
    pub qi: bool,
    /// Device TLB (ATS) support.
    pub dt: bool,
    /// Interrupt remapping.
    pub ir: bool,
    /// Extended interrupt mode (x2APIC).
    pub eim: bool,
    /// Pass-through.
    pub pt: bool,
    /// Snoop control.
    pub sc: bool,
    /// Nested translation (first stage over second stage).
    pub nest: bool,
    /// Page request support (PRI).
    pub prs: bool,
    /// Execute request support.
    pub ers: bool,
    /// Supervisor request support.
    pub srs: bool,
    /// No write flag support.
    pub nwfs: bool,
    /// Extended accessed flag support.
    pub eafs: bool,
    /// PASID size supported, in bits (PSS + 1), meaningful when `pasid`.
    pub pasid_bits: u8,
    /// PASID support.
    pub pasid: bool,
    /// Page-request drain support.
    pub pds: bool,
    /// Scalable-mode translation.
    pub smts: bool,
    /// Second-level accessed/dirty support.
    pub slads: bool,
    /// Second-stage (second-level) translation support.
    pub slts: bool,
    /// First-stage (first-level) translation support.
    pub flts: bool,
    /// Scalable-mode page-walk coherency.
    pub smpwcs: bool,
    /// RID-PASID support.
    pub rps: bool,
}

fn bit(v: u64, n: u32) -> bool {
    (v >> n) & 1 == 1
}

fn bits(v: u64, lo: u32, hi: u32) -> u64 {
    (v >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

impl VtdCap {
    /// Decodes CAP_REG.
    pub fn decode(cap: u64) -> Self {
        VtdCap {
            nd: bits(cap, 0, 2) as u8,
            cm: bit(cap, 7),
            sagaw: bits(cap, 8, 12) as u8,
            mgaw: bits(cap, 16, 21) as u8 + 1,
            sllps: bits(cap, 34, 37) as u8,
            psi: bit(cap, 39),
            nfr: bits(cap, 40, 47) as u16 + 1,
            mamv: bits(cap, 48, 53) as u8,
            dwd: bit(cap, 54),
            drd: bit(cap, 55),
            fs1gp: bit(cap, 56),
            pi: bit(cap, 59),
            fs5lp: bit(cap, 60),
        }
    }
}

impl VtdEcap {
    /// Decodes ECAP_REG.
    pub fn decode(ecap: u64) -> Self {
        VtdEcap {
            c: bit(ecap, 0),
            qi: bit(ecap, 1),
            dt: bit(ecap, 2),
            ir: bit(ecap, 3),
            eim: bit(ecap, 4),
            pt: bit(ecap, 6),
            sc: bit(ecap, 7),
            nest: bit(ecap, 26),
            prs: bit(ecap, 29),
            ers: bit(ecap, 30),
            srs: bit(ecap, 31),
            nwfs: bit(ecap, 33),
            eafs: bit(ecap, 34),
            pasid_bits: bits(ecap, 35, 39) as u8 + 1,
            pasid: bit(ecap, 40),
            pds: bit(ecap, 42),
            smts: bit(ecap, 43),
            slads: bit(ecap, 45),
            slts: bit(ecap, 46),
            flts: bit(ecap, 47),
            smpwcs: bit(ecap, 48),
            rps: bit(ecap, 49),
        }
    }
}

/// Intel VT-d hardware info (`struct iommu_hw_info_vtd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtdInfo {
    /// Raw CAP_REG.
    pub cap_reg: u64,
    /// Raw ECAP_REG.
    pub ecap_reg: u64,
    /// `IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17`: stage-1 read-only mappings are not safe.
    pub errata_772415_spr17: bool,
    /// CAP_REG decoded.
    pub cap: VtdCap,
    /// ECAP_REG decoded.
    pub ecap: VtdEcap,
}

impl VtdInfo {
    /// Decodes the raw registers.
    pub fn new(flags: u32, cap_reg: u64, ecap_reg: u64) -> Self {
        VtdInfo {
            cap_reg,
            ecap_reg,
            errata_772415_spr17: flags & 1 != 0,
            cap: VtdCap::decode(cap_reg),
            ecap: VtdEcap::decode(ecap_reg),
        }
    }
}

/// What kind of IOMMU sits behind the device, with its vendor data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum HwInfo {
    /// Intel VT-d.
    IntelVtd(VtdInfo),
    /// ARM SMMUv3: the raw ID registers.
    ArmSmmuv3 {
        /// IDR0..IDR5.
        idr: [u32; 6],
        /// IIDR.
        iidr: u32,
        /// AIDR.
        aidr: u32,
    },
    /// AMD IOMMU: the extended feature registers.
    Amd {
        /// EFR.
        efr: u64,
        /// EFR2.
        efr2: u64,
    },
    /// The kernel selftest's mock IOMMU.
    Selftest {
        /// The mock's test register (0xdeadbeef).
        test_reg: u32,
    },
    /// An IOMMU type this crate does not decode.
    Unknown {
        /// The kernel's `out_data_type`.
        data_type: u32,
    },
    /// No hardware info: an emulated device (mdev), or a device with no IOMMU.
    None {
        /// Why there is none.
        reason: String,
    },
}

/// The capabilities of the IOMMU path of one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HwCaps {
    /// The vendor data.
    pub info: HwInfo,
    /// Raw `out_capabilities`.
    pub out_capabilities: u64,
    /// `IOMMU_HW_CAP_DIRTY_TRACKING`.
    pub dirty_tracking: bool,
    /// `IOMMU_HW_CAP_PCI_PASID_EXEC`.
    pub pasid_exec: bool,
    /// `IOMMU_HW_CAP_PCI_PASID_PRIV`.
    pub pasid_priv: bool,
    /// `IOMMU_HW_CAP_PCI_ATS_NOT_SUPPORTED`.
    pub ats_not_supported: bool,
    /// `out_max_pasid_log2`: the PASID width the device and its IOMMU both support (0: none).
    pub max_pasid_log2: u8,
    /// Whether the device can use PCIe Deferrable Memory Writes (ENQCMD's DMWr). No kernel
    /// uAPI reports it today, so this is always false (see ANCHORS §1.4).
    pub dmwr: bool,
}

/// The selftest mock's `IOMMU_HW_INFO_TYPE_SELFTEST`.
pub const HW_INFO_TYPE_SELFTEST: u32 = 0xfeed_beef;

impl HwCaps {
    /// Capabilities of a device with no hardware info.
    pub fn none(reason: impl Into<String>) -> Self {
        HwCaps {
            info: HwInfo::None {
                reason: reason.into(),
            },
            out_capabilities: 0,
            dirty_tracking: false,
            pasid_exec: false,
            pasid_priv: false,
            ats_not_supported: false,
            max_pasid_log2: 0,
            dmwr: false,
        }
    }

    /// Decodes the kernel's answer: `out_data_type`, the data blob, `out_capabilities` and
    /// `out_max_pasid_log2`.
    pub fn decode(data_type: u32, data: &[u8], out_capabilities: u64, max_pasid_log2: u8) -> Self {
        let u32_at = |off: usize| -> u32 {
            data.get(off..off + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        let u64_at = |off: usize| -> u64 {
            data.get(off..off + 8)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_le_bytes)
        };
        let info = match data_type {
            // IOMMU_HW_INFO_TYPE_INTEL_VTD: {u32 flags, u32 reserved, u64 cap_reg, u64 ecap_reg}
            1 => HwInfo::IntelVtd(VtdInfo::new(u32_at(0), u64_at(8), u64_at(16))),
            // IOMMU_HW_INFO_TYPE_ARM_SMMUV3: {u32 flags, u32 reserved, u32 idr[6], u32 iidr, u32 aidr}
            2 => {
                let mut idr = [0u32; 6];
                for (i, v) in idr.iter_mut().enumerate() {
                    *v = u32_at(8 + 4 * i);
                }
                HwInfo::ArmSmmuv3 {
                    idr,
                    iidr: u32_at(32),
                    aidr: u32_at(36),
                }
            }
            // IOMMU_HW_INFO_TYPE_AMD: {u64 efr, u64 efr2}
            4 => HwInfo::Amd {
                efr: u64_at(0),
                efr2: u64_at(8),
            },
            HW_INFO_TYPE_SELFTEST => HwInfo::Selftest {
                test_reg: u32_at(4),
            },
            0 => HwInfo::None {
                reason: "the IOMMU driver reports no vendor data".to_string(),
            },
            t => HwInfo::Unknown { data_type: t },
        };
        HwCaps {
            info,
            out_capabilities,
            dirty_tracking: out_capabilities & 1 != 0,
            pasid_exec: out_capabilities & 2 != 0,
            pasid_priv: out_capabilities & 4 != 0,
            ats_not_supported: out_capabilities & 8 != 0,
            max_pasid_log2,
            dmwr: false,
        }
    }

    /// Whether the IOMMU can nest a guest stage-1 table over a host stage-2 (nest-parent HWPT).
    pub fn supports_nesting(&self) -> bool {
        match &self.info {
            HwInfo::IntelVtd(v) => v.ecap.nest && v.ecap.flts && v.ecap.slts,
            // IDR0: S2P bit 0, S1P bit 1.
            HwInfo::ArmSmmuv3 { idr, .. } => idr[0] & 0b11 == 0b11,
            // The mock implements nest parents and nested HWPTs.
            HwInfo::Selftest { .. } => true,
            HwInfo::Amd { .. } | HwInfo::Unknown { .. } | HwInfo::None { .. } => false,
        }
    }

    /// Why nesting is not available, in words (`None` when it is).
    pub fn nesting_unsupported_reason(&self) -> Option<String> {
        if self.supports_nesting() {
            return None;
        }
        Some(match &self.info {
            HwInfo::IntelVtd(v) => format!(
                "VT-d ECAP {:#x}: NEST={} FLTS={} SLTS={} (nesting needs all three)",
                v.ecap_reg, v.ecap.nest as u8, v.ecap.flts as u8, v.ecap.slts as u8
            ),
            HwInfo::ArmSmmuv3 { idr, .. } => format!("SMMUv3 IDR0 {:#x} lacks S1P and S2P", idr[0]),
            HwInfo::Amd { .. } => {
                "AMD guest page tables are not supported by this VMM yet".to_string()
            }
            HwInfo::Unknown { data_type } => format!("unknown IOMMU type {data_type:#x}"),
            HwInfo::None { reason } => format!("no IOMMU hardware info: {reason}"),
            HwInfo::Selftest { .. } => String::new(),
        })
    }

    /// The PASID width usable with this device (0: no PASID).
    pub fn max_pasid_bits(&self) -> u8 {
        self.max_pasid_log2
    }

    /// Whether the IOMMU takes page requests (PRI) for this device.
    pub fn supports_prs(&self) -> bool {
        match &self.info {
            HwInfo::IntelVtd(v) => v.ecap.prs,
            HwInfo::Selftest { .. } => true,
            _ => false,
        }
    }

    /// Whether the device has hardware info at all.
    pub fn has_hw_info(&self) -> bool {
        !matches!(self.info, HwInfo::None { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded in the lab (shared/lab/README.md): QEMU 10.0 intel-iommu with
    // x-scalable-mode=on,x-flts=on; GET_HW_INFO on edu gave type 1, caps 0x8, max_pasid_log2 0.
    const LAB_ECAP: u64 = 0x8800_00f0_0f4a;

    fn vtd_blob(flags: u32, cap: u64, ecap: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&cap.to_le_bytes());
        b.extend_from_slice(&ecap.to_le_bytes());
        b
    }

    #[test]
    fn lab_vtd_ecap_decodes_as_measured() {
        let e = VtdEcap::decode(LAB_ECAP);
        assert!(e.smts && e.flts, "{e:?}");
        assert!(!e.nest && !e.pasid && !e.prs && !e.slts, "{e:?}");
        assert!(e.qi && e.ir && e.pt, "{e:?}");
        let caps = HwCaps::decode(1, &vtd_blob(0, 0x00d2_0081_6f62, LAB_ECAP), 0x8, 0);
        assert!(caps.ats_not_supported);
        assert!(!caps.dirty_tracking);
        assert!(!caps.supports_nesting());
        assert_eq!(caps.max_pasid_bits(), 0);
        let reason = caps.nesting_unsupported_reason().unwrap_or_default();
        assert!(reason.contains("NEST=0"), "{reason}");
        assert!(caps.has_hw_info());
    }

    #[test]
    fn vtd_cap_fields() {
        // SAGAW 48/39-bit (0b00110), MGAW 48 (47 encoded), CM, PSI, FS1GP, ND=2, NFR=8, SLLPS 2M+1G.
        let cap: u64 = 2
            | (1 << 7)
            | (0b00110 << 8)
            | (47 << 16)
            | (0b11 << 34)
            | (1 << 39)
            | (7 << 40)
            | (1 << 56);
        let c = VtdCap::decode(cap);
        assert_eq!(c.nd, 2);
        assert!(c.cm && c.psi && c.fs1gp);
        assert_eq!(c.sagaw, 0b00110);
        assert_eq!(c.mgaw, 48);
        assert_eq!(c.nfr, 8);
        assert_eq!(c.sllps, 0b11);
        assert!(!c.fs5lp && !c.pi);
    }

    #[test]
    fn nest_capable_vtd_and_pasid_width() {
        let ecap = LAB_ECAP | (1 << 26) | (1 << 46) | (1 << 40) | (19 << 35) | (1 << 29);
        let caps = HwCaps::decode(1, &vtd_blob(1, 0, ecap), 0x6, 20);
        let HwInfo::IntelVtd(v) = &caps.info else {
            unreachable!("decoded as VT-d")
        };
        assert_eq!(v.ecap.pasid_bits, 20);
        assert!(v.errata_772415_spr17);
        assert!(caps.supports_nesting());
        assert!(caps.supports_prs());
        assert!(caps.pasid_exec && caps.pasid_priv);
        assert_eq!(caps.max_pasid_bits(), 20);
        assert_eq!(caps.nesting_unsupported_reason(), None);
    }

    /// Each condition of `supports_nesting()` on its own: dropping any one of NEST, FLTS and
    /// SLTS (VT-d) or S1P and S2P (SMMUv3) turns nesting off and the reason names it.
    #[test]
    fn caps_nesting_requires_every_condition() {
        const NEST: u64 = 1 << 26;
        const FLTS: u64 = 1 << 47;
        const SLTS: u64 = 1 << 46;
        let all = NEST | FLTS | SLTS;
        let vtd = |ecap: u64| HwCaps::decode(1, &vtd_blob(0, 0, ecap), 0, 0);
        assert!(vtd(all).supports_nesting());
        assert_eq!(vtd(all).nesting_unsupported_reason(), None);
        for (bit, name) in [(NEST, "NEST=0"), (FLTS, "FLTS=0"), (SLTS, "SLTS=0")] {
            let caps = vtd(all & !bit);
            assert!(!caps.supports_nesting(), "{name}: nesting must be off");
            let reason = caps.nesting_unsupported_reason().unwrap_or_default();
            assert!(reason.contains(name), "{name}: {reason}");
        }
        // Unrelated ECAP bits never turn nesting on by themselves.
        assert!(!vtd(!all).supports_nesting());

        let smmu = |idr0: u32| {
            // {u32 flags, u32 reserved, u32 idr[6], u32 iidr, u32 aidr}: IDR0 at byte 8.
            let mut blob = vec![0u8; 40];
            blob[8..12].copy_from_slice(&idr0.to_le_bytes());
            HwCaps::decode(2, &blob, 0, 0)
        };
        assert!(matches!(smmu(0b11).info, HwInfo::ArmSmmuv3 { .. }));
        assert!(smmu(0b11).supports_nesting());
        assert!(!smmu(0b01).supports_nesting(), "S2P without S1P");
        assert!(!smmu(0b10).supports_nesting(), "S1P without S2P");
        assert!(!HwCaps::none("no IOMMU").supports_nesting());
    }

    /// Each bit of `out_capabilities` sets its own flag and no other, and `supports_prs()`
    /// is true only for a VT-d unit with ECAP.PRS and for the selftest mock (scripts/mutants
    /// found both decisions untested).
    #[test]
    fn caps_flags_and_prs_each_on_their_own() {
        let flags = |c: &HwCaps| {
            (
                c.dirty_tracking,
                c.pasid_exec,
                c.pasid_priv,
                c.ats_not_supported,
            )
        };
        let blob = vtd_blob(0, 0, 0);
        assert_eq!(
            flags(&HwCaps::decode(1, &blob, 0, 0)),
            (false, false, false, false)
        );
        assert_eq!(
            flags(&HwCaps::decode(1, &blob, 1, 0)),
            (true, false, false, false)
        );
        assert_eq!(
            flags(&HwCaps::decode(1, &blob, 2, 0)),
            (false, true, false, false)
        );
        assert_eq!(
            flags(&HwCaps::decode(1, &blob, 4, 0)),
            (false, false, true, false)
        );
        assert_eq!(
            flags(&HwCaps::decode(1, &blob, 8, 0)),
            (false, false, false, true)
        );
        assert_eq!(
            flags(&HwCaps::decode(1, &blob, !0xf, 0)),
            (false, false, false, false)
        );

        const PRS: u64 = 1 << 29;
        assert!(HwCaps::decode(1, &vtd_blob(0, 0, PRS), 0, 20).supports_prs());
        assert!(!HwCaps::decode(1, &vtd_blob(0, 0, !PRS), 0, 20).supports_prs());
        let mut selftest = 0u32.to_le_bytes().to_vec();
        selftest.extend_from_slice(&0u32.to_le_bytes());
        assert!(HwCaps::decode(HW_INFO_TYPE_SELFTEST, &selftest, 0, 20).supports_prs());
        assert!(
            !HwCaps::decode(2, &[0u8; 40], 0, 20).supports_prs(),
            "SMMUv3"
        );
        assert!(!HwCaps::decode(4, &[0u8; 16], 0, 20).supports_prs(), "AMD");
        assert!(!HwCaps::none("mdev").supports_prs());
    }

    #[test]
    fn selftest_and_none() {
        let mut blob = 0u32.to_le_bytes().to_vec();
        blob.extend_from_slice(&0xdead_beefu32.to_le_bytes());
        let caps = HwCaps::decode(HW_INFO_TYPE_SELFTEST, &blob, 0, 20);
        assert_eq!(
            caps.info,
            HwInfo::Selftest {
                test_reg: 0xdead_beef
            }
        );
        assert!(caps.supports_nesting());
        let none = HwCaps::none("mdev");
        assert!(!none.has_hw_info());
        assert!(!none.supports_nesting());
        let json = serde_json::to_string(&none).unwrap_or_default();
        assert!(json.contains("\"type\":\"none\""), "{json}");
    }
}
