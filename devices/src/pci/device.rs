//! The interface between the PCI bus and a PCI function.

use std::any::Any;
use std::sync::{Arc, Mutex};

use super::bar::PciBarInfo;

/// A PCI function on a [`super::PciBus`].
///
/// Config space is accessed by dword register index plus byte lanes, as the bus delivers
/// it (ECAM or 0xCF8/0xCFC). The bus learns the BAR addresses and the decode-enable bits by
/// reading the function's own BAR and command registers after each write to them; it then
/// registers, moves or removes the BAR ranges on the MMIO/PIO buses and calls
/// [`PciDevice::bar_moved`].
pub trait PciDevice: Send {
    /// Reads the dword register `reg_idx` (byte offset `reg_idx * 4`). Registers the function
    /// does not implement read as 0.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;

    /// Writes `data` (1, 2 or 4 bytes) at byte `offset` within the dword register `reg_idx`.
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]);

    /// The BARs the function decodes. Fixed for the function's lifetime.
    fn bars(&self) -> Vec<PciBarInfo>;

    /// A read of `data.len()` bytes at `offset` into BAR `bar`.
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// A write of `data` at `offset` into BAR `bar`.
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// The bus moved BAR `bar`: it was live at `old` and is live at `new` (`None`: not
    /// decoded, because decode is disabled, the BAR is unassigned or its address conflicts).
    /// A model with direct mappings (VFIO mmaps) moves them here.
    fn bar_moved(&mut self, _bar: u8, _old: Option<u64>, _new: Option<u64>) {}

    /// Resets the function (VM reset).
    fn reset(&mut self) {}

    /// The bus removed the function: release interrupts, mappings and device state.
    fn removed(&mut self) {}

    /// For downcasting to the concrete model.
    fn as_any(&self) -> &dyn Any;

    /// For downcasting to the concrete model.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A shared, lockable PCI function.
pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;
