//! The guest physical address map (x86_64).
//!
//! ```text
//! 0x0000_0000 .. LOW_RAM_END     RAM (boot structures live in the first MiB)
//! 0xC000_0000 .. 0xE000_0000     32-bit PCI MMIO window (32-bit BARs)
//! 0xE000_0000 .. 0xF000_0000     PCIe ECAM (256 buses x 1 MiB)
//! 0xF000_0000 .. 4 GiB           platform: PCI hotplug/GED registers, IOAPIC, the
//!                                VT-d registers, LAPIC, KVM TSS/identity map
//! 4 GiB .. 4 GiB + high RAM      RAM above the hole
//! above RAM                      64-bit PCI MMIO window (the device manager allocates it)
//! ```

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// One MiB.
pub const MIB: u64 = 1 << 20;

/// Start of the 32-bit hole: RAM is split here when the guest has more than 3 GiB.
pub const MEM_32BIT_HOLE_START: u64 = 3 * GIB;
/// The 32-bit PCI MMIO window for 32-bit BARs.
pub const PCI_MMIO32_START: u64 = MEM_32BIT_HOLE_START;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 512 * MIB;
/// PCIe enhanced configuration space (ECAM / MMCONFIG), segment 0.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// Size of the ECAM window: 256 buses.
pub const PCI_ECAM_SIZE: u64 = 256 * MIB;
/// The ACPI PCI hotplug controller's registers (slot bitmaps, eject, segment select and the
/// GED event register; see `hotplug`). Platform area, below the IOAPIC, outside RAM, the PCI
/// windows and ECAM.
pub const PCI_HOTPLUG_START: u64 = 0xFE00_0000;
/// Size of the PCI hotplug register window.
pub const PCI_HOTPLUG_SIZE: u64 = 0x20;
/// The IOAPIC (in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// The register set of the emulated VT-d unit (the DMAR's DRHD register base), where QEMU
/// puts its intel-iommu: platform area, between the IOAPIC and the local APIC, 4 KiB
/// aligned as Linux requires.
pub const VTD_REGS_START: u64 = 0xFED9_0000;
/// Size reserved for each VT-d unit's register set (one page; the model's registers, fault
/// recording and page request registers included, fit in it).
pub const VTD_REGS_SIZE: u64 = 0x1000;
/// Root-bus slots reserved for devices behind the vIOMMU (`iommu=on`): the DMAR lists them in
/// the DRHD's device scope at boot, so that Linux also puts devices hot-plugged there behind
/// the unit. Devices with `iommu=off` never take them.
pub const VIOMMU_SLOTS: std::ops::RangeInclusive<u8> = 24..=31;
/// The local APIC.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// KVM's identity-map page (one page, below the TSS).
pub const KVM_IDENTITY_MAP_START: u64 = 0xFFFB_C000;
/// KVM's TSS area (three pages).
pub const KVM_TSS_START: u64 = 0xFFFB_D000;
/// First address above 4 GiB: RAM beyond the hole starts here.
pub const HIGH_RAM_START: u64 = 4 * GIB;

/// Real-mode IVT/BDA end; the extended BIOS data area starts at 0x9fc00.
pub const EBDA_START: u64 = 0x9_fc00;
/// Start of "high memory" (the first MiB boundary) where kernels are loaded.
pub const HIMEM_START: u64 = MIB;

/// Boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT (empty; the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map table (after the 56-byte start info).
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// PVH module list (one entry: the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6800;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the boot page tables.
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories (one per identity-mapped GiB).
pub const PDE_START: u64 = 0xb000;
/// How many GiB the boot page tables identity-map (2 MiB pages).
pub const BOOT_IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Maximum command line length (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// First GSI free for MSI routes (0..24 are the irqchip pins).
pub const MSI_GSI_BASE: u32 = 24;
/// ISA IRQ of the first serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// I/O port of COM1.
pub const SERIAL_PORT: u64 = 0x3f8;
/// GSI of the ACPI Generic Event Device (hotplug notifications): ISA IRQ 5, unused by any
/// other device, edge-triggered active-high (the irqfd pulses it once per event).
pub const GED_GSI: u32 = 5;

/// First IOAPIC pin (GSI) for PCI INTx lines: GSIs 16..24 belong to PCI (ISA IRQs end at 15).
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// How many GSIs the PCI INTx lines share: every pin of every slot maps onto one of
/// `PCI_INTX_GSI_BASE..PCI_INTX_GSI_BASE + PCI_INTX_GSI_COUNT`.
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI of INTx pin `pin` (INTA = 0 .. INTD = 3) of the function in root-bus slot `slot`:
/// `16 + (slot + pin) % 8`, the usual swizzle, so neighbouring slots land on different lines.
/// The DSDT's `_PRT` and the KVM irqfds both use it. Level-triggered, active-low (ACPI's
/// convention for a `_PRT` entry that names a GSI; KVM's IOAPIC ignores the polarity bit).
pub const fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (slot as u32 + pin as u32) % PCI_INTX_GSI_COUNT
}

/// Size of the 64-bit PCI MMIO window (64-bit BARs).
pub const PCI_MMIO64_SIZE: u64 = 64 * GIB;

/// The 64-bit PCI MMIO window for a guest whose RAM ends at `ram_end`: it starts at the first
/// GiB boundary at or above both `ram_end` and 4 GiB.
pub const fn pci_mmio64_window(ram_end: u64) -> (u64, u64) {
    let floor = if ram_end > HIGH_RAM_START {
        ram_end
    } else {
        HIGH_RAM_START
    };
    let start = (floor + GIB - 1) & !(GIB - 1);
    (start, PCI_MMIO64_SIZE)
}

/// ACPI tables (RSDP first) in the legacy BIOS area, where Linux also scans for the RSDP.
pub const ACPI_START: u64 = 0xE_0000;
/// End of the ACPI table area (exclusive).
pub const ACPI_END: u64 = 0x10_0000;
/// Hardware-reduced ACPI sleep control register (I/O port, 1 byte).
pub const ACPI_SLEEP_CONTROL_PORT: u64 = 0x600;
/// Hardware-reduced ACPI sleep status register (I/O port, 1 byte).
pub const ACPI_SLEEP_STATUS_PORT: u64 = 0x601;
/// ACPI reset register (I/O port, 1 byte).
pub const ACPI_RESET_PORT: u64 = 0x602;
/// Value written to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 0x1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_gsis_swizzle_over_sixteen_to_twenty_three() {
        assert_eq!(pci_intx_gsi(1, 0), 17);
        assert_eq!(pci_intx_gsi(3, 0), 19);
        assert_eq!(pci_intx_gsi(7, 0), 23);
        assert_eq!(pci_intx_gsi(8, 0), 16);
        assert_eq!(pci_intx_gsi(1, 3), 20);
        assert_eq!(pci_intx_gsi(31, 3), 18);
        // Every slot/pin lands in 16..24, below the MSI GSIs and clear of the ISA IRQs
        // (serial, GED) the platform uses.
        for slot in 1..=31u8 {
            let mut seen = Vec::new();
            for pin in 0..4u8 {
                let gsi = pci_intx_gsi(slot, pin);
                assert!((16..24).contains(&gsi), "slot {slot} pin {pin}: {gsi}");
                assert!(gsi < MSI_GSI_BASE && gsi != SERIAL_IRQ && gsi != GED_GSI);
                seen.push(gsi);
            }
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 4, "slot {slot}: its four pins share a line");
        }
        // The eight lines are used evenly by the 31 slots' INTA.
        let mut count = [0u32; 8];
        for slot in 1..=31u8 {
            count[(pci_intx_gsi(slot, 0) - PCI_INTX_GSI_BASE) as usize] += 1;
        }
        assert!(count.iter().all(|&c| c == 3 || c == 4), "{count:?}");
    }

    #[test]
    fn vtd_registers_sit_alone_in_the_platform_area() {
        const {
            assert!(
                VTD_REGS_START.is_multiple_of(0x1000),
                "Linux needs a page-aligned DRHD base"
            );
            assert!(VTD_REGS_START >= IOAPIC_START + 0x1000);
            assert!(VTD_REGS_START + VTD_REGS_SIZE <= LAPIC_START);
            assert!(VTD_REGS_START > PCI_HOTPLUG_START + PCI_HOTPLUG_SIZE);
            assert!(VTD_REGS_START >= PCI_ECAM_START + PCI_ECAM_SIZE);
        }
        assert!(!VIOMMU_SLOTS.contains(&0), "slot 0 is the host bridge");
    }
}
