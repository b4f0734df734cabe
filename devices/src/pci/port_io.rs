//! The legacy config mechanism #1: address at port 0xCF8, data at 0xCFC..=0xCFF.

use std::sync::Arc;

use super::root::{with_bus, SharedPciBus, WeakPciBus};
use crate::bus::BusDevice;

/// First port of the pair.
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports covered: 0xCF8..=0xCFF.
pub const PCI_CONFIG_IO_PORT_SIZE: u64 = 8;

const ENABLE: u32 = 1 << 31;
/// Enable, bus, device, function and register (dword aligned) bits.
const ADDRESS_MASK: u32 = ENABLE | 0x00ff_fffc;

/// The 0xCF8/0xCFC handler, registered on the PIO bus at [`PCI_CONFIG_IO_PORT`].
pub struct PciConfigIo {
    bus: WeakPciBus,
    address: u32,
}

impl PciConfigIo {
    /// A handler for `bus` (held weakly: the bus owns the PIO bus this handler sits on), with
    /// the address register cleared.
    pub fn new(bus: SharedPciBus) -> Self {
        Self {
            bus: Arc::downgrade(&bus),
            address: 0,
        }
    }

    /// Bus, device, function and byte offset for a data access at `lane` (0..=3).
    fn target(&self, lane: u64) -> Option<(u8, u8, u8, u16)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let a = self.address;
        Some((
            ((a >> 16) & 0xff) as u8,
            ((a >> 11) & 0x1f) as u8,
            ((a >> 8) & 0x7) as u8,
            (a & 0xfc) as u16 + lane as u16,
        ))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            }
            return;
        }
        let lane = offset - 4;
        if lane + data.len() as u64 > 4 {
            return;
        }
        if let Some((b, d, f, reg)) = self.target(lane) {
            with_bus(&self.bus, |bus| bus.config_read(b, d, f, reg, data));
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset < 4 {
            // Only a dword write at 0xCF8 sets the address (byte writes to 0xCF9 are the
            // reset control register on real chipsets, which is not ours).
            if offset == 0 && data.len() == 4 {
                let mut v = [0u8; 4];
                v.copy_from_slice(data);
                self.address = u32::from_le_bytes(v) & ADDRESS_MASK;
            }
            return;
        }
        let lane = offset - 4;
        if lane + data.len() as u64 > 4 {
            return;
        }
        if let Some((b, d, f, reg)) = self.target(lane) {
            with_bus(&self.bus, |bus| bus.config_write(b, d, f, reg, data));
        }
    }
}
