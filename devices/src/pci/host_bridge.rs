//! The host bridge at 00:00.0: identity only, no BARs.

use std::any::Any;

use super::bar::PciBarInfo;
use super::config::{ConfigSpace, TypeZeroHeader, EXT_CONFIG_SPACE_SIZE};
use super::device::PciDevice;

/// Red Hat's vendor ID and its generic PCIe host bridge device ID.
const VENDOR_ID: u16 = 0x1b36;
const DEVICE_ID: u16 = 0x0008;
/// Class 06 (bridge), subclass 00 (host bridge).
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// The root complex's host bridge function.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    /// A host bridge with a 4 KiB (PCIe) config space.
    pub fn new() -> Self {
        let mut config = ConfigSpace::type0(
            EXT_CONFIG_SPACE_SIZE,
            &TypeZeroHeader {
                vendor_id: VENDOR_ID,
                device_id: DEVICE_ID,
                class_code: CLASS_HOST_BRIDGE,
                subsystem_vendor_id: VENDOR_ID,
                subsystem_id: DEVICE_ID,
                ..Default::default()
            },
        );
        // A host bridge decodes nothing itself; only bus mastering is meaningful.
        config.set_wmask_u16(super::config::reg::COMMAND, 0);
        Self { config }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_u32(reg_idx * 4)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write(reg_idx * 4 + offset as usize, data);
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        Vec::new()
    }

    fn read_bar(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
