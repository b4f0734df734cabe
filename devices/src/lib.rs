//! Guest-visible devices of ioasid-vmm.
//!
//! Owns: the MMIO/PIO [`bus`], the PCI bus and config space, the vfio-pci (pdev) and mdev
//! device models, the emulated vIOMMU, the emulated SVA copy engine ([`sva`]), the
//! shared-work-queue device ([`swq`]), and test DMA devices.
//!
//! Must not touch: KVM (interrupts leave through a small trait the VMM implements), the VMM's
//! device bookkeeping, or the kernel IOMMU uAPI directly: every DMA mapping goes through the
//! `ioasid` crate.

pub mod bus;
pub mod cpu_pasid;
pub mod pci;
pub mod sva;
pub mod swq;
pub mod vfio;
pub mod viommu;

#[cfg(test)]
pub(crate) mod fuzz;
