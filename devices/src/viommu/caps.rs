//! What the emulated VT-d unit advertises: [`VtdConfig`], its validation, and the CAP/ECAP
//! register values derived from it, with decoders by name for `vm.iommu`.
//!
//! Fixed choices (the model honours nothing else): second-stage translation always (SLTS),
//! caching mode always (CM=1: the guest invalidates after making entries present, which is
//! how the VMM learns about every change), queued invalidation always (QI), no interrupt
//! remapping, no nesting. First stage (ECAP.FSTS, the spec's FLTS), PASID, device TLB and
//! page requests follow the options.

use thiserror::Error;

use super::regs::{FRCD_OFFSET, IOTLB_REG_OFFSET};

/// Number of fault recording registers (CAP.NFR + 1).
pub const NUM_FAULT_RECORDS: usize = 4;
/// Maximum address mask value for page-selective invalidation (CAP.MAMV).
pub const MAMV: u8 = 18;

/// Options of one emulated VT-d unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtdConfig {
    /// Scalable mode (ECAP.SMTS): PASID-granular tables. Without it only legacy root and
    /// context entries exist.
    pub scalable_mode: bool,
    /// First-stage translation (ECAP.FSTS, bit 47). Linux prefers first stage whenever this
    /// is set, so a unit that covers shadowed (assigned, no host nesting) devices must not
    /// set it.
    pub first_stage: bool,
    /// PASID width in bits (1..=20); 0 = no PASID support.
    pub pasid_bits: u8,
    /// Shared virtual addressing: page requests (ECAP.PRS, PDS). Needs first stage, PASID and
    /// the device TLB.
    pub svm: bool,
    /// Device TLB / ATS (ECAP.DT).
    pub device_tlb: bool,
    /// Guest address width: 39, 48 or 57 bits.
    pub aw_bits: u8,
    /// The PCI segment of the devices this unit covers (for page responses to BDFs that were
    /// never registered).
    pub segment: u16,
}

impl Default for VtdConfig {
    /// Scalable mode, second stage only, no PASID, 48-bit address width: what a shadowing
    /// VMM offers.
    fn default() -> Self {
        Self {
            scalable_mode: true,
            first_stage: false,
            pasid_bits: 0,
            svm: false,
            device_tlb: false,
            aw_bits: 48,
            segment: 0,
        }
    }
}

/// A combination of options that the model cannot honour.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum VtdConfigError {
    /// aw_bits other than 39, 48 or 57.
    #[error("VT-d address width {0} is not supported: use 39, 48 or 57")]
    AddressWidth(u8),
    /// pasid_bits above 20.
    #[error("VT-d pasid-bits={0} is above the PCIe maximum of 20")]
    PasidBits(u8),
    /// PASID needs scalable mode.
    #[error(
        "VT-d pasid-bits={0} needs scalable-mode=on (PASID tables exist only in scalable mode)"
    )]
    PasidWithoutScalableMode(u8),
    /// First stage needs scalable mode.
    #[error("VT-d fsts=on needs scalable-mode=on (first-stage tables are named by PASID entries)")]
    FirstStageWithoutScalableMode,
    /// SVM needs first stage, PASID and the device TLB.
    #[error(
        "VT-d svm=on needs {missing} (page requests target first-stage PASID tables through ATS)"
    )]
    SvmIncomplete {
        /// What is missing.
        missing: &'static str,
    },
}

impl VtdConfig {
    /// Checks that the options can be honoured together.
    pub fn validate(&self) -> Result<(), VtdConfigError> {
        if !matches!(self.aw_bits, 39 | 48 | 57) {
            return Err(VtdConfigError::AddressWidth(self.aw_bits));
        }
        if self.pasid_bits > 20 {
            return Err(VtdConfigError::PasidBits(self.pasid_bits));
        }
        if self.pasid_bits > 0 && !self.scalable_mode {
            return Err(VtdConfigError::PasidWithoutScalableMode(self.pasid_bits));
        }
        if self.first_stage && !self.scalable_mode {
            return Err(VtdConfigError::FirstStageWithoutScalableMode);
        }
        if self.svm {
            let missing = if !self.first_stage {
                Some("fsts=on")
            } else if self.pasid_bits == 0 {
                Some("pasid-bits>0")
            } else if !self.device_tlb {
                Some("the device TLB (ATS)")
            } else {
                None
            };
            if let Some(missing) = missing {
                return Err(VtdConfigError::SvmIncomplete { missing });
            }
        }
        Ok(())
    }

    /// The CAP register.
    pub fn cap(&self) -> u64 {
        let mut cap = 0u64;
        cap |= 6; // ND: 2^16 domain ids (16-bit DID)
        cap |= cap_bits::CM;
        // SAGAW: every table depth up to aw_bits (bit 1: 3 levels, 2: 4, 3: 5).
        let sagaw: u64 = match self.aw_bits {
            39 => 0b0010,
            48 => 0b0110,
            _ => 0b1110,
        };
        cap |= sagaw << 8;
        cap |= u64::from(self.aw_bits - 1) << 16; // MGAW
        cap |= (FRCD_OFFSET / 16) << 24; // FRO
        cap |= cap_bits::SLLPS_2M | cap_bits::SLLPS_1G;
        cap |= cap_bits::PSI;
        cap |= (NUM_FAULT_RECORDS as u64 - 1) << 40; // NFR
        cap |= u64::from(MAMV) << 48;
        cap |= cap_bits::DWD | cap_bits::DRD;
        if self.first_stage {
            cap |= cap_bits::FL1GP;
            if self.aw_bits == 57 {
                cap |= cap_bits::FL5LP;
            }
        }
        cap
    }

    /// The ECAP register.
    pub fn ecap(&self) -> u64 {
        let mut ecap = 0u64;
        ecap |= ecap_bits::QI;
        ecap |= ecap_bits::PT;
        ecap |= (IOTLB_REG_OFFSET / 16) << 8; // IRO
        ecap |= ecap_bits::SLTS;
        if self.device_tlb {
            ecap |= ecap_bits::DT;
        }
        if self.scalable_mode {
            ecap |= ecap_bits::SMTS | ecap_bits::SMPWC;
        }
        if self.first_stage {
            ecap |= ecap_bits::FSTS;
        }
        if self.pasid_bits > 0 {
            ecap |= ecap_bits::PASID;
            ecap |= u64::from(self.pasid_bits - 1) << 35; // PSS
        }
        if self.svm {
            ecap |= ecap_bits::PRS | ecap_bits::PDS | ecap_bits::NWFS;
        }
        ecap
    }

    /// Paging levels the second stage accepts (from SAGAW): 3, 4 and, with 57 bits, 5.
    pub fn max_levels(&self) -> u8 {
        match self.aw_bits {
            39 => 3,
            48 => 4,
            _ => 5,
        }
    }
}

/// CAP register bits.
pub mod cap_bits {
    /// Caching mode.
    pub const CM: u64 = 1 << 7;
    /// Second-stage 2 MiB pages.
    pub const SLLPS_2M: u64 = 1 << 34;
    /// Second-stage 1 GiB pages.
    pub const SLLPS_1G: u64 = 1 << 35;
    /// Page-selective invalidation.
    pub const PSI: u64 = 1 << 39;
    /// Write draining.
    pub const DWD: u64 = 1 << 54;
    /// Read draining.
    pub const DRD: u64 = 1 << 55;
    /// First-stage 1 GiB pages.
    pub const FL1GP: u64 = 1 << 56;
    /// First-stage 5-level paging.
    pub const FL5LP: u64 = 1 << 60;
}

/// ECAP register bits.
pub mod ecap_bits {
    /// Queued invalidation.
    pub const QI: u64 = 1 << 1;
    /// Device TLB.
    pub const DT: u64 = 1 << 2;
    /// Pass-through.
    pub const PT: u64 = 1 << 6;
    /// Page requests.
    pub const PRS: u64 = 1 << 29;
    /// No write flag on page requests.
    pub const NWFS: u64 = 1 << 33;
    /// PASID.
    pub const PASID: u64 = 1 << 40;
    /// Page request drain.
    pub const PDS: u64 = 1 << 42;
    /// Scalable-mode translation.
    pub const SMTS: u64 = 1 << 43;
    /// Second-stage translation.
    pub const SLTS: u64 = 1 << 46;
    /// First-stage translation (the spec's FLTS).
    pub const FSTS: u64 = 1 << 47;
    /// Scalable-mode page-walk coherency.
    pub const SMPWC: u64 = 1 << 48;
}

const CAP_FLAGS: &[(u64, &str)] = &[
    (1 << 3, "AFL"),
    (1 << 4, "RWBF"),
    (cap_bits::CM, "CM"),
    (cap_bits::SLLPS_2M, "SLLPS-2M"),
    (cap_bits::SLLPS_1G, "SLLPS-1G"),
    (cap_bits::PSI, "PSI"),
    (cap_bits::DWD, "DWD"),
    (cap_bits::DRD, "DRD"),
    (cap_bits::FL1GP, "FL1GP"),
    (1 << 59, "PI"),
    (cap_bits::FL5LP, "FL5LP"),
];

const ECAP_FLAGS: &[(u64, &str)] = &[
    (1 << 0, "C"),
    (ecap_bits::QI, "QI"),
    (ecap_bits::DT, "DT"),
    (1 << 3, "IR"),
    (1 << 4, "EIM"),
    (ecap_bits::PT, "PT"),
    (1 << 7, "SC"),
    (1 << 26, "NEST"),
    (ecap_bits::PRS, "PRS"),
    (1 << 31, "SRS"),
    (ecap_bits::NWFS, "NWFS"),
    (ecap_bits::PASID, "PASID"),
    (ecap_bits::PDS, "PDS"),
    (ecap_bits::SMTS, "SMTS"),
    (1 << 45, "SLADS"),
    (ecap_bits::SLTS, "SLTS"),
    (ecap_bits::FSTS, "FSTS"),
    (ecap_bits::SMPWC, "SMPWC"),
];

/// The set CAP flags by name (fields such as SAGAW and MGAW are left to [`cap_fields`]).
pub fn cap_names(cap: u64) -> Vec<&'static str> {
    CAP_FLAGS
        .iter()
        .filter(|(bit, _)| cap & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// The set ECAP flags by name (PSS and IRO are left to [`ecap_fields`]).
pub fn ecap_names(ecap: u64) -> Vec<&'static str> {
    ECAP_FLAGS
        .iter()
        .filter(|(bit, _)| ecap & bit != 0)
        .map(|(_, n)| *n)
        .collect()
}

/// CAP's numeric fields by name: ND, SAGAW, MGAW (bits), FRO (byte offset), NFR (count),
/// MAMV.
pub fn cap_fields(cap: u64) -> Vec<(&'static str, u64)> {
    vec![
        ("ND", cap & 7),
        ("SAGAW", (cap >> 8) & 0x1f),
        ("MGAW", ((cap >> 16) & 0x3f) + 1),
        ("FRO", ((cap >> 24) & 0x3ff) * 16),
        ("NFR", ((cap >> 40) & 0xff) + 1),
        ("MAMV", (cap >> 48) & 0x3f),
    ]
}

/// ECAP's numeric fields by name: IRO (byte offset), PSS (PASID bits; 0 without PASID).
pub fn ecap_fields(ecap: u64) -> Vec<(&'static str, u64)> {
    let pss = if ecap & ecap_bits::PASID != 0 {
        ((ecap >> 35) & 0x1f) + 1
    } else {
        0
    };
    vec![("IRO", ((ecap >> 8) & 0x3ff) * 16), ("PSS", pss)]
}
