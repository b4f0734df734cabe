//! ECAM: memory-mapped config access, 4 KiB per function (PCIe enhanced configuration).

use std::sync::Arc;

use super::root::{with_bus, SharedPciBus, WeakPciBus};
use crate::bus::BusDevice;

/// ECAM bytes per bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM window of one segment, registered on the MMIO bus (at least
/// [`ECAM_BUS_SIZE`] bytes for bus 0).
pub struct PciEcam {
    bus: WeakPciBus,
}

/// Bus, device, function and register of an ECAM offset.
pub fn decode(offset: u64) -> (u8, u8, u8, u16) {
    (
        ((offset >> 20) & 0xff) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
        (offset & 0xfff) as u16,
    )
}

fn naturally_aligned(reg: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && usize::from(reg) % len == 0
}

impl PciEcam {
    /// An ECAM handler for `bus` (held weakly: the bus owns the MMIO bus this handler sits on).
    pub fn new(bus: SharedPciBus) -> Self {
        Self {
            bus: Arc::downgrade(&bus),
        }
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let (b, d, f, reg) = decode(offset);
        if !naturally_aligned(reg, data.len()) {
            return;
        }
        with_bus(&self.bus, |bus| bus.config_read(b, d, f, reg, data));
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = decode(offset);
        if naturally_aligned(reg, data.len()) {
            with_bus(&self.bus, |bus| bus.config_write(b, d, f, reg, data));
        }
    }
}
