//! The engine's PCI config space: a type 0 header with BAR0, the PCI Express capability
//! (RC integrated endpoint), MSI-X, and the ATS, PASID and PRI extended capabilities, with
//! the write masks that let the guest program exactly the fields the spec makes writable;
//! and [`CapState`], the decoded view of those fields that the worker acts on.

pub use crate::pci::ext_caps::{
    ATS_CTRL_ENABLE, ATS_CTRL_STU, PASID_CAP_EXEC, PASID_CAP_PRIV, PASID_CTRL_ENABLE,
    PASID_CTRL_EXEC, PASID_CTRL_PRIV, PRI_CTRL_ENABLE, PRI_CTRL_RESET, PRI_STATUS_PASID,
    PRI_STATUS_RF, PRI_STATUS_STOPPED, PRI_STATUS_UPRGI,
};

use crate::pci::bar::{BarKind, PciBarInfo};
use crate::pci::config::{
    cap_id, command, ext_cap_id, reg, ConfigError, ConfigSpace, TypeZeroHeader,
    EXT_CONFIG_SPACE_SIZE,
};
use crate::pci::msix::MsixCap;

use super::abi;

/// Config-space offset of the PCI Express capability.
pub const PCIE_CAP: usize = 0x40;
/// Length of a version 2 PCI Express capability.
pub const PCIE_CAP_LEN: usize = 0x3c;
/// Config-space offset of the MSI-X capability.
pub const MSIX_CAP: usize = 0x7c;
/// Config-space offset of the ATS extended capability.
pub const ATS_CAP: usize = 0x100;
/// Config-space offset of the PASID extended capability.
pub const PASID_CAP: usize = 0x108;
/// Config-space offset of the PRI extended capability.
pub const PRI_CAP: usize = 0x110;

/// PCI Express capability register: version 2, device/port type 9 (RC integrated endpoint).
const PCIE_FLAGS: u16 = 0x0002 | (0x9 << 4);
/// Device Capabilities: role-based error reporting, 128-byte max payload.
const PCIE_DEVCAP: u32 = 1 << 15;
/// Device Control at reset: relaxed ordering, no snoop, 512-byte max read request.
const PCIE_DEVCTL: u16 = 0x2810;
/// Device Control bits the guest may write (everything but bit 15, Initiate FLR: no FLR).
const PCIE_DEVCTL_WRITABLE: u16 = 0x7fff;
/// Device Status error bits (W1C).
const PCIE_DEVSTA_W1C: u16 = 0x000f;
/// Device Capabilities 2: End-End TLP Prefix Supported (bit 21) with Max End-End TLP
/// Prefixes = 1 (bits 23:22). Linux's `pci_enable_pasid` refuses a device whose path has no
/// `eetlp_prefix_path`, which it derives from this bit (an RC integrated endpoint needs no
/// upstream bridge to have it).
const PCIE_DEVCAP2: u32 = (1 << 21) | (1 << 22);

/// ATS capability register: invalidate queue depth 0 (= 32), page aligned requests.
const ATS_CAPS: u16 = 1 << 5;

/// Offsets inside the extended capabilities (from the capability header).
mod off {
    pub const ATS_CTRL: usize = 6;
    pub const PASID_CAPS: usize = 4;
    pub const PASID_CTRL: usize = 6;
    pub const PRI_CTRL: usize = 4;
    pub const PRI_STATUS: usize = 6;
    pub const PRI_CAPACITY: usize = 8;
    pub const PRI_ALLOC: usize = 12;
}

/// BAR0 as the engine declares it.
pub fn bar0() -> PciBarInfo {
    PciBarInfo {
        index: 0,
        kind: BarKind::Mem64,
        size: abi::BAR0_SIZE,
        prefetchable: false,
    }
}

/// The MSI-X layout: 2 vectors, table and PBA in BAR0.
pub fn msix_cap() -> MsixCap {
    MsixCap {
        offset: MSIX_CAP,
        table_size: abi::MSIX_VECTORS,
        table_bar: 0,
        table_offset: abi::MSIX_TABLE_OFFSET,
        pba_bar: 0,
        pba_offset: abi::MSIX_PBA_OFFSET,
    }
}

/// Builds the reset-state config space. `max_pasid_bits` (1..=20) is the Max PASID Width;
/// `pri_capacity` the Outstanding Page Request Capacity.
pub fn build(max_pasid_bits: u8, pri_capacity: u32) -> Result<ConfigSpace, ConfigError> {
    let mut c = ConfigSpace::type0(
        EXT_CONFIG_SPACE_SIZE,
        &TypeZeroHeader {
            vendor_id: abi::VENDOR_ID,
            device_id: abi::DEVICE_ID,
            class_code: abi::CLASS_CODE,
            revision_id: abi::REVISION,
            subsystem_vendor_id: abi::VENDOR_ID,
            subsystem_id: abi::DEVICE_ID,
            interrupt_pin: 0,
        },
    );
    // No I/O BAR and no INTx: neither bit is the guest's to set.
    c.set_wmask_u16(
        reg::COMMAND,
        ConfigSpace::COMMAND_WRITABLE & !command::IO & !command::INTX_DISABLE,
    );
    c.add_bar(&bar0());

    let mut pcie = [0u8; PCIE_CAP_LEN - 2];
    pcie[0..2].copy_from_slice(&PCIE_FLAGS.to_le_bytes());
    pcie[2..6].copy_from_slice(&PCIE_DEVCAP.to_le_bytes());
    pcie[6..8].copy_from_slice(&PCIE_DEVCTL.to_le_bytes());
    pcie[0x22..0x26].copy_from_slice(&PCIE_DEVCAP2.to_le_bytes());
    let at = c.add_capability(cap_id::EXP, &pcie)?;
    debug_assert_eq!(at, PCIE_CAP);
    c.set_wmask_u16(PCIE_CAP + 8, PCIE_DEVCTL_WRITABLE);
    c.set_w1c_u16(PCIE_CAP + 0xa, PCIE_DEVSTA_W1C);

    let m = msix_cap();
    let at = c.add_capability(cap_id::MSIX, &[0; crate::pci::msix::MsixCap::LEN - 2])?;
    debug_assert_eq!(at, MSIX_CAP);
    m.install(&mut c);

    let mut ats = [0u8; 4];
    ats[0..2].copy_from_slice(&ATS_CAPS.to_le_bytes());
    c.add_ext_capability(ext_cap_id::ATS, 1, &ats)?;
    c.set_wmask_u16(ATS_CAP + off::ATS_CTRL, ATS_CTRL_ENABLE | ATS_CTRL_STU);

    let width = max_pasid_bits.clamp(1, 20);
    let pasid_caps = PASID_CAP_EXEC | PASID_CAP_PRIV | (u16::from(width) << 8);
    let mut pasid = [0u8; 4];
    pasid[0..2].copy_from_slice(&pasid_caps.to_le_bytes());
    c.add_ext_capability(ext_cap_id::PASID, 1, &pasid)?;
    c.set_wmask_u16(
        PASID_CAP + off::PASID_CTRL,
        PASID_CTRL_ENABLE | PASID_CTRL_EXEC | PASID_CTRL_PRIV,
    );

    let mut pri = [0u8; 12];
    pri[2..4].copy_from_slice(&(PRI_STATUS_STOPPED | PRI_STATUS_PASID).to_le_bytes());
    pri[4..8].copy_from_slice(&pri_capacity.to_le_bytes());
    c.add_ext_capability(ext_cap_id::PRI, 1, &pri)?;
    c.set_wmask_u16(PRI_CAP + off::PRI_CTRL, PRI_CTRL_ENABLE | PRI_CTRL_RESET);
    c.set_w1c_u16(PRI_CAP + off::PRI_STATUS, PRI_STATUS_RF | PRI_STATUS_UPRGI);
    c.set_wmask_u32(PRI_CAP + off::PRI_ALLOC, u32::MAX);
    Ok(c)
}

/// Applies the side effects of a guest config write: PRI Reset self-clears (and clears the
/// W1C status bits), PRI Stopped follows PRI Enable.
pub fn after_write(c: &mut ConfigSpace) {
    let ctrl = c.read_u16(PRI_CAP + off::PRI_CTRL);
    let mut status = c.read_u16(PRI_CAP + off::PRI_STATUS);
    if ctrl & PRI_CTRL_RESET != 0 {
        c.set_u16(PRI_CAP + off::PRI_CTRL, ctrl & !PRI_CTRL_RESET);
        status &= !(PRI_STATUS_RF | PRI_STATUS_UPRGI);
    }
    if ctrl & PRI_CTRL_ENABLE != 0 {
        status &= !PRI_STATUS_STOPPED;
    } else {
        status |= PRI_STATUS_STOPPED;
    }
    c.set_u16(PRI_CAP + off::PRI_STATUS, status);
}

/// The fields of the config space the engine acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CapState {
    /// Command: Bus Master Enable (no DMA without it).
    pub bus_master: bool,
    /// PASID Enable, Privileged Mode Enable and the width.
    pub pasid: abi::PasidPolicy,
    /// PASID: Execute Permission Enable (the engine never fetches instructions).
    pub pasid_exec: bool,
    /// PRI Enable.
    pub pri_enabled: bool,
    /// Outstanding Page Request Allocation, capped at the capacity.
    pub pri_alloc: u32,
    /// ATS Enable.
    pub ats_enabled: bool,
    /// ATS Smallest Translation Unit (pages of `4 KiB << stu`).
    pub ats_stu: u8,
}

impl CapState {
    /// Decodes the current config space.
    pub fn read(c: &ConfigSpace) -> Self {
        let pasid_caps = c.read_u16(PASID_CAP + off::PASID_CAPS);
        let pasid_ctrl = c.read_u16(PASID_CAP + off::PASID_CTRL);
        let ats_ctrl = c.read_u16(ATS_CAP + off::ATS_CTRL);
        let capacity = c.read_u32(PRI_CAP + off::PRI_CAPACITY);
        Self {
            bus_master: c.read_u16(reg::COMMAND) & command::BUS_MASTER != 0,
            pasid: abi::PasidPolicy {
                enabled: pasid_ctrl & PASID_CTRL_ENABLE != 0,
                privileged: pasid_ctrl & PASID_CTRL_PRIV != 0,
                width: ((pasid_caps >> 8) & 0x1f) as u8,
            },
            pasid_exec: pasid_ctrl & PASID_CTRL_EXEC != 0,
            pri_enabled: c.read_u16(PRI_CAP + off::PRI_CTRL) & PRI_CTRL_ENABLE != 0,
            pri_alloc: c.read_u32(PRI_CAP + off::PRI_ALLOC).min(capacity),
            ats_enabled: ats_ctrl & ATS_CTRL_ENABLE != 0,
            ats_stu: (ats_ctrl & ATS_CTRL_STU) as u8,
        }
    }
}

/// A guest config write of `data` at dword `reg_idx` + `offset` (at most 4 bytes; other
/// accesses are ignored) into a config space built by [`build`]: the write masks, the PRI
/// side effects ([`after_write`]), and MSI-X enable/mask changes through `sink`. `who`
/// names the device in warnings. Shared by every model with this config space (the SVA
/// engine, the shared-work-queue device).
pub fn config_write(
    cfg: &mut ConfigSpace,
    msix: &std::sync::Mutex<crate::pci::msix::MsixState>,
    sink: &dyn crate::pci::interrupt::InterruptSink,
    (reg_idx, offset): (usize, u64),
    data: &[u8],
    who: &str,
) {
    let Some(off) = reg_idx
        .checked_mul(4)
        .and_then(|o| o.checked_add(usize::try_from(offset).ok()?))
    else {
        return;
    };
    if data.len() > 4 {
        return;
    }
    cfg.write(off, data);
    after_write(cfg);
    let mut m = msix.lock().unwrap_or_else(|e| e.into_inner());
    if m.cap().touches_control(off, data.len()) {
        if let Err(e) = m.control_written(cfg, sink) {
            log::warn!("{who}: MSI-X: {e}");
        }
    }
}

/// A BAR0 access inside the MSI-X table or PBA of [`msix_cap`]: served (reads fill
/// `data`, table writes go through `sink`) and `true`; `false` when `offset` is elsewhere.
pub fn msix_bar_access(
    msix: &std::sync::Mutex<crate::pci::msix::MsixState>,
    sink: &dyn crate::pci::interrupt::InterruptSink,
    offset: u64,
    access: BarAccess<'_>,
    who: &str,
) -> bool {
    let layout = msix_cap();
    let (table, pba) = (layout.table_range(), layout.pba_range());
    let mut m = msix.lock().unwrap_or_else(|e| e.into_inner());
    match access {
        BarAccess::Read(data) if table.contains(&offset) => {
            m.table_read(offset - table.start, data)
        }
        BarAccess::Read(data) if pba.contains(&offset) => m.pba_read(offset - pba.start, data),
        BarAccess::Write(data) if table.contains(&offset) => {
            if let Err(e) = m.table_write(offset - table.start, data, sink) {
                log::warn!("{who}: MSI-X table: {e}");
            }
        }
        BarAccess::Write(_) if pba.contains(&offset) => {}
        _ => return false,
    }
    true
}

/// One BAR access, for [`msix_bar_access`].
pub enum BarAccess<'a> {
    /// A read into the buffer.
    Read(&'a mut [u8]),
    /// A write of the bytes.
    Write(&'a [u8]),
}

/// Serves a read of `data.len()` bytes at `offset` from 32-bit registers (`reg` gives the
/// dword at an aligned offset), byte by byte.
pub fn read_dwords(offset: u64, data: &mut [u8], mut reg: impl FnMut(u64) -> u32) {
    for (i, b) in data.iter_mut().enumerate() {
        let o = offset.saturating_add(i as u64);
        *b = reg(o & !3).to_le_bytes()[(o & 3) as usize];
    }
}
