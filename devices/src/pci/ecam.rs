//! ECAM: memory-mapped config access, 4 KiB per function (PCIe enhanced configuration).

use std::sync::MutexGuard;

use super::root::{PciBus, SharedPciBus};
use crate::bus::BusDevice;

/// ECAM bytes per bus (32 devices × 8 functions × 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The ECAM window of one segment, registered on the MMIO bus (at least
/// [`ECAM_BUS_SIZE`] bytes for bus 0).
pub struct PciEcam {
    bus: SharedPciBus,
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
    /// An ECAM handler for `bus`.
    pub fn new(bus: SharedPciBus) -> Self {
        Self { bus }
    }

    fn lock(&self) -> MutexGuard<'_, PciBus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let (b, d, f, reg) = decode(offset);
        if !naturally_aligned(reg, data.len()) {
            data.fill(0xff);
            return;
        }
        self.lock().config_read(b, d, f, reg, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (b, d, f, reg) = decode(offset);
        if naturally_aligned(reg, data.len()) {
            self.lock().config_write(b, d, f, reg, data);
        }
    }
}
