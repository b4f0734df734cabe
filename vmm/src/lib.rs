//! The ioasid-vmm virtual machine monitor core.
//!
//! Owns: the KVM VM ([`vm`]), guest RAM ([`memory`], memfd-backed so it can be mapped for DMA
//! by file), vCPUs and their run loop ([`vcpu`], [`cpuid`]), interrupt routing ([`irq`]),
//! Linux and payload boot ([`boot`]), the 16550 console ([`serial`]), the address map
//! ([`layout`]) and the command line ([`config`]).
//!
//! Must not touch: device internals beyond the `devices::bus` traits, and the kernel IOMMU
//! uAPI (no iommufd or VFIO ioctls here: the device manager uses the `ioasid` crate, fed with
//! the RAM regions [`memory::GuestRam::regions`] describes).

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpuid;
pub mod irq;
pub mod layout;
pub mod memory;
pub mod runner;
pub mod serial;
pub mod vcpu;
pub mod vm;
