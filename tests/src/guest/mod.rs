//! The L3 guest side of the lab: checks that run inside a Linux guest booted by
//! `ioasid-vmm` in L2, and print `L3-RESULT <name> PASS|FAIL <detail>` lines on the guest's
//! serial console, which the L2 lab tests read back.
//!
//! Owns: the guest-side checks (edu seen, MSI, DMA with guest-physical addresses, mtty echo,
//! waiting for hotplug, a task pinned to every CPU (`smp`); with the vIOMMU: intel-iommu bound to ioasid-vmm's VT-d, DMA at
//! IOVAs through L3's own VFIO, unplug behind the unit; with the SVA copy engine: Linux SVA
//! through the test module sva_copy.ko, copies by virtual address, I/O page faults). Must not touch: anything of L2.
//! Without a vIOMMU the L3 guest has no IOMMU, and edu is used through vfio-pci in no-IOMMU
//! mode; with one (`intel_iommu=on,sm_on`), through type1 and iommufd.

pub mod dmesg;
pub mod lifecycle;
pub mod noiommu;
pub mod pagemap;
pub mod pci;
pub mod smp;
pub mod sva;
pub mod tasks;
pub mod viommu;

/// Prints one result line.
pub fn report(name: &str, r: &Result<String, String>) {
    match r {
        Ok(detail) => println!("L3-RESULT {name} PASS {detail}"),
        Err(why) => println!("L3-RESULT {name} FAIL {}", why.replace('\n', " | ")),
    }
}
