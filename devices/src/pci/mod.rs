//! The PCI bus: config space, the root bus with its host bridge, config access (ECAM and
//! 0xCF8/0xCFC), BAR allocation and BAR ranges on the MMIO/PIO [`crate::bus::Bus`].
//!
//! Following one guest access:
//! - Config: a vCPU MMIO exit in the ECAM window reaches [`PciEcam`] through the MMIO bus
//!   (or a port exit reaches [`PciConfigIo`]); both call [`PciBus::config_read`] /
//!   [`PciBus::config_write`], which call the function's [`PciDevice`] by dword register
//!   and byte lane. After a write to the command register or a BAR, the bus re-reads them
//!   and registers, moves ([`crate::bus::Bus::relocate`]) or removes the BAR ranges, so a
//!   BAR is live only while its decode-enable bit is set, like real hardware.
//! - BAR: an exit inside a live BAR range reaches [`PciDevice::read_bar`] /
//!   [`PciDevice::write_bar`] with the offset inside that BAR.
//!
//! Modules: [`bdf`] addresses, [`bar`] BAR encoding, [`config`] the register model and
//! capability lists, [`msi`] / [`msix`] message-signalled interrupt emulation, [`interrupt`]
//! the trait interrupts leave through, [`ratelimit`] the limit on guest-triggered
//! warnings, [`device`] the function trait, [`root`] the bus,
//! [`ecam`] and [`port_io`] the two config mechanisms, [`host_bridge`] 00:00.0.

pub mod bar;
pub mod bdf;
pub mod config;
pub mod device;
pub mod ecam;
pub mod ext_caps;
pub mod host_bridge;
pub mod interrupt;
pub mod msi;
pub mod msix;
pub mod port_io;
pub mod ratelimit;
pub mod root;

pub use bar::{BarKind, PciBarInfo};
pub use bdf::PciBdf;
pub use config::ConfigSpace;
pub use device::{PciDevice, SharedPciDevice};
pub use ecam::{PciEcam, ECAM_BUS_SIZE};
pub use interrupt::{
    InterruptError, InterruptSink, IntxEventFds, IntxPin, MsiKind, MsiMessage, MsiVector,
    RouteBatch,
};
pub use port_io::{PciConfigIo, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE};
pub use root::{AddressWindow, BarState, PciBus, PciBusConfig, PciError, SharedPciBus};

#[cfg(test)]
pub(crate) mod tests;
