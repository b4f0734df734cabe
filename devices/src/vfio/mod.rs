//! The vfio-pci device model: a VFIO device (a physical function, "pdev", or a mediated
//! device, "mdev") presented to the guest as a PCI function on the [`crate::pci`] bus.
//!
//! The model reaches the device only through [`VfioRegions`] (implemented for
//! `vfio_ioctls::VfioDevice` in [`host`], and by a fake in the tests) and sends interrupts
//! only through [`crate::pci::InterruptSink`] (the VMM implements it with KVM irqfds and GSI
//! routes). DMA is not here: the `ioasid` crate opens the device, binds it and owns its
//! address spaces.
//!
//! # Config space
//!
//! The device's config region is read once into a virtual [`crate::pci::ConfigSpace`]; a
//! per-bit mask says which bits the model serves and which are read live from the device,
//! and a per-byte flag says which guest writes reach the device.
//!
//! | Register | Treatment |
//! |---|---|
//! | IDs, class, revision, subsystem, pin, min/max | emulated, read-only copies of the device's |
//! | Command | emulated; guest may set I/O, memory, bus master, parity, SERR, INTx-disable, and exactly those are forwarded (read-modify-write); other bits read 0 and never reach the device; memory/I/O decode gate the BAR ranges on the bus |
//! | Status | live from the device, except the capability-list bit (ours); error-bit W1C writes forwarded |
//! | Header type | emulated, multi-function bit cleared (the guest sees one function) |
//! | BAR0..5 | emulated: sizes from the VFIO region sizes (rounded up to a power of two), kind and prefetch from the device's BAR flags; guest addresses are ours |
//! | Expansion ROM, CardBus CIS, BIST | emulated as 0 (no ROM is presented) |
//! | Cache line, latency timer, interrupt line | emulated read/write |
//!
//! # Capabilities
//!
//! | Capability | Decision | Why |
//! |---|---|---|
//! | MSI (0x05) | emulate | vectors become `InterruptSink` routes and `VFIO_DEVICE_SET_IRQS` eventfds; Multiple Message Capable is capped at what VFIO reports; hidden if VFIO reports no MSI |
//! | MSI-X (0x11) | emulate | enable/function-mask emulated, table and PBA trapped in their BAR; table size capped at the VFIO vector count; hidden if VFIO reports none |
//! | Power management (0x01) | pass | vfio-pci virtualizes D-state changes; PMCSR writes forwarded |
//! | PCI Express (0x10) | pass | reads live; device control/status (FLR included, which vfio-pci turns into a reset) and device control 2 writes forwarded; link control and slot registers read-only: the link belongs to the host |
//! | Vendor specific (0x09) | pass | driver-private; body writes forwarded |
//! | any other standard capability | hide | not modelled: unlinked, header reads 0, writes dropped |
//! | PASID (ext 0x1B) | hide, or emulate as a synthesized vPASID when [`VfioPciOptions::vpasid`] is set | PASID enable belongs to the host kernel; the ioasid layer attaches PASIDs and reads the guest's control through [`VfioPciDevice::pasid_control`] (vfio-pci does not expose PASID, so the vPASID goes at the hidden one's offset or the last 8 bytes of config space) |
//! | ATS (ext 0x0F) | hide | the vIOMMU has no device-TLB invalidation path yet; ATS stays host-owned |
//! | PRI (ext 0x13) | hide | page requests need the ioasid fault path (hook for later) |
//! | Device 3 / DMWr (ext 0x2F) | hide | Linux has no uAPI to enable DMWr routing on the host path |
//! | AER (ext 0x01), SR-IOV (ext 0x10) | hide | host-owned |
//! | VSEC (ext 0x0B), DVSEC (ext 0x23) | pass | driver-private; body writes forwarded |
//! | any other extended capability | hide | not modelled |
//!
//! A hidden capability is unlinked: the previous visible one (or the capabilities pointer)
//! points past it. If the capability at 0x100 is hidden, 0x100 reads as a null header
//! (ID 0) whose next pointer is the first visible extended capability.
//!
//! # BARs and interrupts
//!
//! Each BAR's [`BarPlan`] lists the page-aligned windows mmapped from VFIO (region flag
//! MMAP, restricted to the sparse mmap areas when present, never over the MSI-X table or
//! PBA) and the trapped rest. A trapped access is split by range overlap: its bytes in the
//! MSI-X table or PBA are emulated even when it starts or ends outside them (the rest reaches
//! the device). Trapped accesses use `region_read`/`region_write` (never a
//! mapping, so a disabled BAR gives an error, not a SIGBUS). A [`BarMapper`] installed by the
//! VMM receives the windows as guest mappings and follows BAR moves. INTx, when the VMM
//! wires it ([`crate::pci::InterruptSink::intx`] for the device's pin), is an eventfd plus an
//! optional resample eventfd, switched off while MSI or MSI-X is on; when the device refuses
//! the resample eventfd as its unmask eventfd, the model unmasks it after each guest EOI
//! ([`intx`]). The guest sees the device's Interrupt Pin only while the line is wired, and 0
//! when VFIO reports no INTx or the VMM wires none. Removal disables every interrupt, stops
//! decode and bus mastering, and drops the mappings.

pub mod backend;
pub mod bar;
pub mod caps;
pub mod device;
pub mod host;
pub mod intx;
pub mod mdev;

pub use backend::{IrqInfo, MmapArea, MmapWindow, RegionInfo, VfioRegions};
pub use bar::{BarMapper, BarPlan, DirectMapping};
pub use caps::{CapDecision, CapPolicy};
pub use device::{
    AtsControl, AtsListener, DmwrInfo, PasidControl, PasidListener, PriControl, PriListener,
    VfioDeviceId, VfioPciDevice, VfioPciError, VfioPciOptions, VpasidConfig, VPRI_DEFAULT_CAPACITY,
};
pub use intx::IntxUnmask;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod tests;
