//! The ioasid-vmm virtual machine monitor core.
//!
//! Owns: the KVM VM ([`vm`]), guest RAM ([`memory`], memfd-backed so it can be mapped for DMA
//! by file), vCPUs and their run loop ([`vcpu`], [`cpuid`], [`vcpu_dump`] for a stall diagnosis), interrupt routing ([`irq`]),
//! Linux and payload boot ([`boot`]), ACPI tables ([`acpi`]), the 16550 console ([`serial`]),
//! the guest address map ([`layout`]), the command line ([`config`]), building and booting
//! a VM ([`runner`]), the VMM process around it ([`control`]: REST API, life cycle,
//! signals), and the PCI bus with its assigned VFIO devices ([`device_manager`]:
//! backend choice, the VM's IOAS with RAM mapped once per region, bind/attach, KVM-VFIO, MSI
//! routes through irqfds, BAR windows as KVM memory slots, introspection), ENQCMD's CPU side
//! ([`enqcmd`]: IA32_PASID virtualization, the VM's PASID translation table, the CPUID
//! policy), and the one probe of KVM capabilities ([`kvm_caps`]).
//!
//! Must not touch: device internals beyond the `devices` traits (bus, PCI device, interrupt
//! sink, BAR mapper), and the kernel IOMMU uAPI (no iommufd or VFIO ioctls here: the device
//! manager uses the `ioasid` crate, fed with the RAM regions [`memory::GuestRam::regions`]
//! describes; the only VFIO-related call here is KVM's own KVM-VFIO pseudo device).
//!
//! For the device manager:
//! - guest RAM: [`vm::Vm::ram_regions`] gives each region's memfd, file offset, GPA, size and
//!   host address;
//! - buses: [`vm::Vm::add_mmio_device`], [`vm::Vm::add_pio_device`] (or the `Arc<Bus>` from
//!   [`vm::Vm::mmio_bus`] / [`vm::Vm::pio_bus`], which BAR relocation needs);
//! - interrupts: [`vm::Vm::gsi_router`] then [`irq::GsiRouter::create_msi_irqfd`] (an MSI
//!   vector with its eventfd for VFIO), or `add_msi_route` / `register_irqfd` separately;
//! - the KVM VM fd for the KVM-VFIO device: [`vm::Vm::vm_fd`];
//! - address windows: [`layout::PCI_MMIO32_START`], [`layout::pci_mmio64_window`],
//!   [`layout::PCI_ECAM_START`];
//! - running: [`runner::boot`] calls an attach step between VM creation and boot
//!   ([`control::run_with`] passes it to every boot);
//! - PCI hotplug: [`hotplug::PciHotplug::install`], then `notify_added(slot)` after putting a
//!   function on the bus and `request_eject(slot)` to ask the guest to let go of one (the
//!   guest's eject comes back through the `on_eject` callback).
//!
//! The REST API (`--api-socket`, the `api` crate's server) reaches the VM through [`control`]:
//! the main thread's loop over the API's eventfd, the termination signals, the guest's ejects
//! and the VM's end; it runs Cloud Hypervisor's life cycle (create, boot, pause, resume,
//! shutdown, reboot, delete), adds and removes devices through the device manager and
//! announces them through ACPI hotplug. `control` depends on `runner`, never the reverse.

pub mod acpi;
pub mod boot;
pub mod cmos;
pub mod config;
pub mod control;
pub mod cpuid;
pub mod device_manager;
pub mod enqcmd;
pub mod hotplug;
pub mod irq;
pub mod kvm_caps;
pub mod layout;
pub mod memory;
pub mod runner;
pub mod serial;
pub mod vcpu;
pub mod vcpu_dump;
pub mod viommu;
pub mod vm;
