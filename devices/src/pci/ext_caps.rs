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
