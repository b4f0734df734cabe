//! The DMAR table (Intel VT-d specification, chapter 8 "BIOS Considerations"): the host
//! address width, the DMAR flags and one DRHD (DMA-remapping hardware unit definition) per
//! emulated VT-d unit, each with its register base and the device scopes of the PCI
//! endpoints behind it.
//!
//! Built by hand (the `acpi_tables` crate has no DMAR), checked by the unit tests below
//! against the byte layout of the specification (rev 4.x, section 8.1-8.3):
//!
//! ```text
//! DMAR  0  header (36 bytes, "DMAR", revision 1)
//!      36  host address width (N: the width is N + 1 bits)
//!      37  flags (bit 0 INTR_REMAP, bit 1 X2APIC_OPT_OUT, bit 2 DMA_CTRL_PLATFORM_OPT_IN)
//!      38  reserved (10 bytes)
//!      48  remapping structures
//! DRHD  0  type 0 (u16), 2 length (u16), 4 flags (bit 0 INCLUDE_PCI_ALL),
//!       5  size (register set is 2^size 4 KiB pages), 6 segment (u16), 8 register base (u64),
//!      16  device scopes
//! SATC  0  type 5 (u16), 2 length (u16), 4 flags (bit 0 ATC_REQUIRED), 5 reserved,
//!       6  segment (u16), 8 device scopes
//! scope 0  type (1: PCI endpoint), 1 length (6 + 2 per path entry), 2 flags, 3 reserved,
//!       4  enumeration id (0 for PCI), 5 start bus, 6 path: (device, function) pairs
//! ```
//!
//! Linux maps each DRHD's register base with `ioremap` after checking that it is page
//! aligned and that CAP/ECAP do not read as all ones (`dmar_validate_one_drhd`), so the base
//! must be 4 KiB aligned and the VT-d unit must be on the MMIO bus before the guest boots.

use acpi_tables::sdt::Sdt;
use thiserror::Error;

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// DMAR flag: interrupt remapping supported.
pub const DMAR_INTR_REMAP: u8 = 1 << 0;
/// DMAR flag: the platform asks the OS not to use x2APIC (only with INTR_REMAP).
pub const DMAR_X2APIC_OPT_OUT: u8 = 1 << 1;
/// DRHD flag: the unit covers every PCI device of its segment not named by another unit.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;
/// Remapping structure type of a DRHD.
const TYPE_DRHD: u16 = 0;
/// Device scope type of a PCI endpoint.
const SCOPE_PCI_ENDPOINT: u8 = 1;
/// Fixed part of the DMAR (header, width, flags, reserved).
const DMAR_FIXED_LEN: usize = 48;
/// Fixed part of a DRHD.
const DRHD_FIXED_LEN: usize = 16;
/// A device scope with a one-entry path.
const SCOPE_LEN: usize = 8;
/// 4 KiB.
const PAGE: u64 = 0x1000;

/// One PCI endpoint in a device scope: a function on bus `bus` (a root-bus device: one path
/// entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciEndpoint {
    /// Start bus number.
    pub bus: u8,
    /// Device (slot) number, 0-31.
    pub device: u8,
    /// Function number, 0-7.
    pub function: u8,
}

/// One DMA-remapping hardware unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrhdUnit {
    /// Guest physical address of its register set (4 KiB aligned).
    pub register_base: u64,
    /// Size of its register set in bytes (a power of two, at least 4 KiB).
    pub register_size: u64,
    /// PCI segment.
    pub segment: u16,
    /// Covers every device of the segment no other unit names (then `endpoints` is empty).
    pub include_pci_all: bool,
    /// The PCI endpoints behind it (present at boot or reserved for hotplug).
    pub endpoints: Vec<PciEndpoint>,
}

/// An SoC integrated address translation cache (SATC) structure: the integrated endpoints
/// of a segment that have an ATC (Linux looks an integrated endpoint up here before it turns
/// ATS on: `dmar_ats_supported` -> `dmar_find_matched_satc_unit`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SatcUnit {
    /// PCI segment.
    pub segment: u16,
    /// The endpoints must use their ATC (ATC_REQUIRED).
    pub atc_required: bool,
    /// The endpoints.
    pub endpoints: Vec<PciEndpoint>,
}

/// The whole table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarConfig {
    /// The DMA address width the platform supports, in bits (the table stores width - 1).
    pub address_width: u8,
    /// DMAR flags ([`DMAR_INTR_REMAP`], ...).
    pub flags: u8,
    /// The units.
    pub units: Vec<DrhdUnit>,
    /// SATC structures (after the units, as the specification orders structure types).
    pub satc: Vec<SatcUnit>,
}

/// A DMAR that cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DmarError {
    /// The address width is outside what VT-d can describe.
    #[error("DMAR: address width {0} is not within 32-64 bits")]
    AddressWidth(u8),
    /// A register base is not 4 KiB aligned (Linux refuses the unit).
    #[error("DMAR: DRHD register base {0:#x} is not 4 KiB aligned")]
    UnalignedBase(u64),
    /// A register size is not a power of two of at least 4 KiB (the DRHD's size field is
    /// a page-count exponent).
    #[error("DMAR: DRHD register size {0:#x} is not a power of two of at least 4 KiB")]
    RegisterSize(u64),
    /// A unit has both INCLUDE_PCI_ALL and explicit scopes, or names a bad endpoint.
    #[error("DMAR: DRHD at {base:#x}: {reason}")]
    Scope {
        /// The unit's register base.
        base: u64,
        /// Why.
        reason: String,
    },
    /// No unit, or the table outgrows its 16-bit structure lengths.
    #[error("DMAR: {0}")]
    Shape(String),
}

fn drhd_bytes(u: &DrhdUnit) -> Result<Vec<u8>, DmarError> {
    if !u.register_base.is_multiple_of(PAGE) {
        return Err(DmarError::UnalignedBase(u.register_base));
    }
    if u.register_size < PAGE || !u.register_size.is_power_of_two() {
        return Err(DmarError::RegisterSize(u.register_size));
    }
    let scope = |reason: String| DmarError::Scope {
        base: u.register_base,
        reason,
    };
    if u.include_pci_all && !u.endpoints.is_empty() {
        return Err(scope(
            "INCLUDE_PCI_ALL with explicit device scopes (Linux expects none)".into(),
        ));
    }
    if let Some(e) = u.endpoints.iter().find(|e| e.device > 31 || e.function > 7) {
        return Err(scope(format!(
            "endpoint {:02x}:{:02x}.{} is not a PCI address",
            e.bus, e.device, e.function
        )));
    }
    let len = DRHD_FIXED_LEN + SCOPE_LEN * u.endpoints.len();
    let len16 = u16::try_from(len)
        .map_err(|_| scope(format!("{} device scopes do not fit", u.endpoints.len())))?;
    // 2^size pages; size is 4 bits.
    let size = (u.register_size / PAGE).trailing_zeros();
    let size = u8::try_from(size)
        .ok()
        .filter(|s| *s < 16)
        .ok_or(DmarError::RegisterSize(u.register_size))?;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&TYPE_DRHD.to_le_bytes());
    v.extend_from_slice(&len16.to_le_bytes());
    v.push(if u.include_pci_all {
        DRHD_INCLUDE_PCI_ALL
    } else {
        0
    });
    v.push(size);
    v.extend_from_slice(&u.segment.to_le_bytes());
    v.extend_from_slice(&u.register_base.to_le_bytes());
    scope_bytes(&mut v, &u.endpoints);
    Ok(v)
}

/// Structure type of an SATC.
const TYPE_SATC: u16 = 5;
/// Fixed part of an SATC.
const SATC_FIXED_LEN: usize = 8;

fn scope_bytes(v: &mut Vec<u8>, endpoints: &[PciEndpoint]) {
    for e in endpoints {
        v.extend_from_slice(&[
            SCOPE_PCI_ENDPOINT,
            SCOPE_LEN as u8,
            0,
            0,
            0,
            e.bus,
            e.device,
            e.function,
        ]);
    }
}

fn satc_bytes(u: &SatcUnit) -> Result<Vec<u8>, DmarError> {
    if u.endpoints.is_empty() {
        return Err(DmarError::Shape("an SATC without endpoints".into()));
    }
    if let Some(e) = u.endpoints.iter().find(|e| e.device > 31 || e.function > 7) {
        return Err(DmarError::Shape(format!(
            "SATC endpoint {:02x}:{:02x}.{} is not a PCI address",
            e.bus, e.device, e.function
        )));
    }
    let len = SATC_FIXED_LEN + SCOPE_LEN * u.endpoints.len();
    let len16 = u16::try_from(len)
        .map_err(|_| DmarError::Shape(format!("{} SATC scopes do not fit", u.endpoints.len())))?;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&TYPE_SATC.to_le_bytes());
    v.extend_from_slice(&len16.to_le_bytes());
    v.push(u8::from(u.atc_required));
    v.push(0);
    v.extend_from_slice(&u.segment.to_le_bytes());
    scope_bytes(&mut v, &u.endpoints);
    Ok(v)
}

/// The DMAR bytes (header and checksum included), ready for the XSDT.
pub fn dmar_table(cfg: &DmarConfig) -> Result<Vec<u8>, DmarError> {
    if !(32..=64).contains(&cfg.address_width) {
        return Err(DmarError::AddressWidth(cfg.address_width));
    }
    if cfg.units.is_empty() {
        return Err(DmarError::Shape("no DRHD unit".into()));
    }
    let mut sdt = Sdt::new(
        *b"DMAR",
        DMAR_FIXED_LEN as u32,
        1,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.write_u8(36, cfg.address_width - 1);
    sdt.write_u8(37, cfg.flags);
    for u in &cfg.units {
        sdt.append_slice(&drhd_bytes(u)?);
    }
    for u in &cfg.satc {
        sdt.append_slice(&satc_bytes(u)?);
    }
    Ok(sdt.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    fn ep(device: u8) -> PciEndpoint {
        PciEndpoint {
            bus: 0,
            device,
            function: 0,
        }
    }

    fn unit(base: u64, endpoints: Vec<PciEndpoint>) -> DrhdUnit {
        DrhdUnit {
            register_base: base,
            register_size: 0x1000,
            segment: 0,
            include_pci_all: false,
            endpoints,
        }
    }

    #[test]
    fn dmar_bytes_checksum_lengths_and_scopes() {
        let cfg = DmarConfig {
            address_width: 48,
            flags: 0,
            satc: vec![],
            units: vec![
                unit(0xfed9_0000, vec![ep(3), ep(24), ep(25)]),
                DrhdUnit {
                    register_size: 0x4000,
                    ..unit(0xfed9_1000, vec![ep(7)])
                },
            ],
        };
        let t = dmar_table(&cfg).unwrap();
        assert_eq!(&t[0..4], b"DMAR");
        let len = u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize;
        assert_eq!(len, t.len());
        assert_eq!(len, 48 + (16 + 3 * 8) + (16 + 8));
        assert_eq!(t[8], 1, "revision");
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0, "checksum");
        assert_eq!(&t[10..16], b"IOASID");
        assert_eq!(t[36], 47, "HAW = width - 1");
        assert_eq!(t[37], 0, "INTR_REMAP off");
        assert!(t[38..48].iter().all(|b| *b == 0), "reserved");

        // First DRHD.
        let d = &t[48..];
        assert_eq!(u16_at(d, 0), 0, "type DRHD");
        assert_eq!(u16_at(d, 2), 16 + 24);
        assert_eq!(d[4], 0, "no INCLUDE_PCI_ALL");
        assert_eq!(d[5], 0, "one page");
        assert_eq!(u16_at(d, 6), 0, "segment");
        assert_eq!(
            u64::from_le_bytes(d[8..16].try_into().unwrap()),
            0xfed9_0000
        );
        let slots: Vec<u8> = (0..3)
            .map(|i| {
                let s = &d[16 + 8 * i..24 + 8 * i];
                assert_eq!(s[0], 1, "PCI endpoint");
                assert_eq!(s[1], 8, "scope length");
                assert_eq!(s[5], 0, "start bus");
                assert_eq!(s[7], 0, "function");
                s[6]
            })
            .collect();
        assert_eq!(slots, vec![3, 24, 25]);

        // Second DRHD: 4 pages -> size 2.
        let d = &t[48 + 40..];
        assert_eq!(u16_at(d, 2), 24);
        assert_eq!(d[5], 2);
        assert_eq!(
            u64::from_le_bytes(d[8..16].try_into().unwrap()),
            0xfed9_1000
        );
        assert_eq!(d[16 + 6], 7);
    }

    #[test]
    fn dmar_include_all_and_flags() {
        let t = dmar_table(&DmarConfig {
            address_width: 39,
            flags: DMAR_INTR_REMAP,
            satc: vec![],
            units: vec![DrhdUnit {
                include_pci_all: true,
                ..unit(0xfed9_0000, vec![])
            }],
        })
        .unwrap();
        assert_eq!(t[36], 38);
        assert_eq!(t[37], DMAR_INTR_REMAP);
        assert_eq!(t[48 + 4], DRHD_INCLUDE_PCI_ALL);
        assert_eq!(t.len(), 48 + 16);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
    }

    #[test]
    fn satc_follows_the_units() {
        let t = dmar_table(&DmarConfig {
            address_width: 48,
            flags: 0,
            units: vec![unit(0xfed9_0000, vec![ep(24)])],
            satc: vec![SatcUnit {
                segment: 0,
                atc_required: true,
                endpoints: vec![ep(24), ep(25)],
            }],
        })
        .unwrap();
        assert_eq!(t.len(), 48 + 24 + 8 + 16);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let s = &t[48 + 24..];
        assert_eq!(u16_at(s, 0), 5, "type SATC");
        assert_eq!(u16_at(s, 2), 24);
        assert_eq!(s[4], 1, "ATC_REQUIRED");
        assert_eq!(u16_at(s, 6), 0, "segment");
        assert_eq!((s[8], s[8 + 6], s[16 + 6]), (1, 24, 25));
        assert!(dmar_table(&DmarConfig {
            address_width: 48,
            flags: 0,
            units: vec![unit(0xfed9_0000, vec![])],
            satc: vec![SatcUnit {
                segment: 0,
                atc_required: false,
                endpoints: vec![],
            }],
        })
        .is_err());
    }

    #[test]
    fn dmar_refuses_what_linux_would_refuse() {
        let one = |u: DrhdUnit| {
            dmar_table(&DmarConfig {
                address_width: 48,
                flags: 0,
                units: vec![u],
                satc: vec![],
            })
        };
        assert_eq!(
            one(unit(0xfed9_0800, vec![])),
            Err(DmarError::UnalignedBase(0xfed9_0800))
        );
        assert_eq!(
            one(DrhdUnit {
                register_size: 0x1800,
                ..unit(0xfed9_0000, vec![])
            }),
            Err(DmarError::RegisterSize(0x1800))
        );
        assert!(matches!(
            one(DrhdUnit {
                include_pci_all: true,
                ..unit(0xfed9_0000, vec![ep(1)])
            }),
            Err(DmarError::Scope { .. })
        ));
        assert!(matches!(
            one(unit(0xfed9_0000, vec![ep(32)])),
            Err(DmarError::Scope { .. })
        ));
        assert_eq!(
            dmar_table(&DmarConfig {
                address_width: 20,
                flags: 0,
                units: vec![unit(0xfed9_0000, vec![])],
                satc: vec![],
            }),
            Err(DmarError::AddressWidth(20))
        );
        assert!(matches!(
            dmar_table(&DmarConfig {
                address_width: 48,
                flags: 0,
                units: vec![],
                satc: vec![],
            }),
            Err(DmarError::Shape(_))
        ));
    }
}
