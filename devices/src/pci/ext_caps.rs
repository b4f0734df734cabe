//! Register layouts of the PCIe extended capabilities a VMM synthesizes for vSVA: ATS, PASID
//! and PRI (PCIe Base Specification, "Address Translation Services", "PASID Extended
//! Capability", "Page Request Interface"). One definition for every model that exposes them
//! (the SVA copy engine, the synthesized capabilities of an assigned device).

/// ATS control: Enable.
pub const ATS_CTRL_ENABLE: u16 = 1 << 15;
/// ATS control: Smallest Translation Unit.
pub const ATS_CTRL_STU: u16 = 0x1f;

/// PASID capability: Execute Permission Supported.
pub const PASID_CAP_EXEC: u16 = 1 << 1;
/// PASID capability: Privileged Mode Supported.
pub const PASID_CAP_PRIV: u16 = 1 << 2;
/// PASID control: PASID Enable.
pub const PASID_CTRL_ENABLE: u16 = 1 << 0;
/// PASID control: Execute Permission Enable.
pub const PASID_CTRL_EXEC: u16 = 1 << 1;
/// PASID control: Privileged Mode Enable.
pub const PASID_CTRL_PRIV: u16 = 1 << 2;

/// PRI control: Enable.
pub const PRI_CTRL_ENABLE: u16 = 1 << 0;
/// PRI control: Reset (self-clearing).
pub const PRI_CTRL_RESET: u16 = 1 << 1;
/// PRI status: Response Failure (W1C).
pub const PRI_STATUS_RF: u16 = 1 << 0;
/// PRI status: Unexpected Page Request Group Index (W1C).
pub const PRI_STATUS_UPRGI: u16 = 1 << 1;
/// PRI status: Stopped (RO; set while PRI is disabled and nothing is outstanding). Linux's
/// `pci_enable_pri` refuses a device that does not show it while disabled.
pub const PRI_STATUS_STOPPED: u16 = 1 << 8;
/// PRI status: PRG Response PASID Required (RO): page responses to requests with a PASID
/// carry it (the vIOMMU matches responses by PRGI and PASID).
pub const PRI_STATUS_PASID: u16 = 1 << 15;

// DMWr (Deferrable Memory Write, PCIe 6.0: the non-posted write ENQCMD produces). There is
// no DMWr extended capability: extended capability ID 0x30 is IDE (Integrity and Data
// Encryption), and DMWr is described by the PCI Express capability's Device Capabilities 2
// and the Device 3 extended capability (ID 0x2f, [`crate::pci::config::ext_cap_id::DEV3`]).
// Sources: pciutils `lib/header.h` (2025-12, commit 0f5b941: `PCI_EXT_CAP_ID_DEV3` 0x2f,
// `PCI_EXT_CAP_ID_IDE` 0x30, `PCI_DEV3_DEVCAP3_DMWR_REQ`, `PCI_DEV3_DEVCTL3_DMWR_REQ_EN`,
// `PCI_DEV3_DEVCTL3_DMWR_EGRESS_BLK`, `PCI_ERR_UNC_DMWR_REQ_EGRESS_BLOCKED`). The Device
// Capabilities 2 bits come from EDK2-derived bit-field definitions in public code
// (`DmwrCompleter` bit 28, `DmwrLengths` bits 30:29), not from the specification text:
// unverified against the PCIe 6.0 specification. Linux's uAPI `pci_regs.h` (7.3) names
// none of them but the AER bit.

/// PCI Express capability: offset of Device Capabilities 2 (capability version 2).
pub const PCIE_DEVCAP2: usize = 0x24;
/// Device Capabilities 2: DMWr Completer Supported (unverified, see above).
pub const DEVCAP2_DMWR_COMPLETER: u32 = 1 << 28;
/// Device Capabilities 2: DMWr Lengths Supported, bits 30:29 (unverified encoding).
pub const DEVCAP2_DMWR_LENGTHS_SHIFT: u32 = 29;
/// Device Capabilities 2: the DMWr Lengths Supported field mask (after the shift).
pub const DEVCAP2_DMWR_LENGTHS_MASK: u32 = 0x3;
/// Device 3 extended capability: offset of Device Capabilities 3.
pub const DEV3_DEVCAP3: usize = 0x04;
/// Device Capabilities 3: DMWr Request Routing Supported (pciutils `PCI_DEV3_DEVCAP3_DMWR_REQ`).
pub const DEV3_DEVCAP3_DMWR_ROUTING: u32 = 1 << 0;
/// Device 3 extended capability: offset of Device Control 3.
pub const DEV3_DEVCTL3: usize = 0x08;
/// Device Control 3: DMWr Requester Enable.
pub const DEV3_DEVCTL3_DMWR_REQ_EN: u32 = 1 << 0;
/// Device Control 3: DMWr Egress Blocking.
pub const DEV3_DEVCTL3_DMWR_EGRESS_BLK: u32 = 1 << 1;
/// AER Uncorrectable Error Status: DMWr Request Egress Blocked (bit 27).
pub const AER_UNC_DMWR_EGRESS_BLOCKED: u32 = 1 << 27;
