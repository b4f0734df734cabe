//! ACPI tables (hardware-reduced): RSDP, XSDT, FADT, MADT, MCFG and a DSDT describing the
//! PCIe host bridge (ECAM, 32- and 64-bit MMIO windows, the `_PRT` routing every slot's INTx
//! pins to IOAPIC GSIs by [`crate::layout::pci_intx_gsi`]) with its hotplug slots, the PCI
//! hotplug controller and Generic Event Device ([`crate::hotplug::aml`]), COM1 and the S5
//! sleep state; plus the small port device behind the FADT's sleep-control and reset
//! registers. The DMAR of the emulated VT-d is built in [`dmar`] and linked from the XSDT as
//! one of the `extra` tables.

pub mod dmar;

use std::sync::Arc;

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, Package,
    PackageBuilder, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::bus::BusDevice;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::hotplug::aml::{pci_root_objects, sb_devices};
use crate::layout::{
    pci_intx_gsi, pci_mmio64_window, ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE,
    ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START, IOAPIC_START, LAPIC_START,
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START, SERIAL_IRQ, SERIAL_PORT,
};
use crate::memory::GuestMemory;
use crate::vm::{StopReason, VmStopper};

const OEM_ID: [u8; 6] = *b"IOASID";
const OEM_TABLE_ID: [u8; 8] = *b"IOASIDVM";
const OEM_REVISION: u32 = 1;
/// The S5 (soft off) sleep type value the DSDT advertises.
pub const SLP_TYP_S5: u8 = 5;
/// SLP_EN in the hardware-reduced sleep control register.
const SLP_EN: u8 = 1 << 5;

/// Errors of ACPI table generation.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error(
        "ACPI tables need {needed:#x} bytes; the area at {ACPI_START:#x} holds {available:#x}"
    )]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Writing a table failed.
    #[error("Cannot write ACPI table {table} at GPA {gpa:#x}")]
    Write {
        /// Table signature.
        table: &'static str,
        /// Address.
        gpa: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One table placed in guest memory: its signature, GPA and bytes.
pub type PlacedTable = (&'static str, u64, Vec<u8>);

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// PCI slots the `_PRT` routes (slot 0 is the host bridge, which has no interrupt).
const PRT_SLOTS: std::ops::RangeInclusive<u8> = 1..=31;
/// INTA..INTD.
const PRT_PINS: std::ops::Range<u8> = 0..4;

/// The `_PRT` of the root bus: for every slot 1..31 and pin INTA..INTD,
/// `Package { slot << 16 | 0xFFFF, pin, 0, gsi }`. A zero source means the last field is a
/// GSI, which the guest programs level-triggered, active-low (what KVM's irqfds with resample
/// expect; its IOAPIC ignores the polarity bit).
fn pci_prt() -> PackageBuilder {
    let mut prt = PackageBuilder::new();
    for slot in PRT_SLOTS {
        for pin in PRT_PINS {
            let address = (u32::from(slot) << 16) | 0xffff;
            let source = 0u8;
            let gsi = pci_intx_gsi(slot, pin);
            prt.add_element(&Package::new(vec![&address, &pin, &source, &gsi]));
        }
    }
    prt
}

/// The DSDT body (without header) for a guest whose RAM ends at `ram_end`.
pub fn dsdt_aml(ram_end: u64) -> Vec<u8> {
    let (mmio64_start, mmio64_size) = pci_mmio64_window(ram_end);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let zero = 0u8;
    let bus = AddressSpace::<u16>::new_bus_number(0, 255);
    let cf8 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_hi = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_START + PCI_MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + mmio64_size - 1,
        None,
    );
    let pci_crs = ResourceTemplate::new(vec![&bus, &cf8, &io_lo, &io_hi, &mmio32, &mmio64]);
    let n_hid = Name::new("_HID".into(), &hid);
    let n_cid = Name::new("_CID".into(), &cid);
    let n_adr = Name::new("_ADR".into(), &zero);
    let n_seg = Name::new("_SEG".into(), &zero);
    let n_uid = Name::new("_UID".into(), &zero);
    let n_bbn = Name::new("_BBN".into(), &zero);
    let n_crs = Name::new("_CRS".into(), &pci_crs);
    let prt = pci_prt();
    let n_prt = Name::new("_PRT".into(), &prt);
    // Hotplug slots S01..S1F and the scan method PCNT: always present; without the
    // controller installed its registers read 0 and nothing happens.
    let slots = pci_root_objects();
    let pci0 = Device::new(
        "PCI0".into(),
        vec![
            &n_hid, &n_cid, &n_adr, &n_seg, &n_uid, &n_bbn, &n_crs, &n_prt, &slots,
        ],
    );

    let com_hid = EISAName::new("PNP0501");
    let one = 1u8;
    let com_io = IO::new(SERIAL_PORT as u16, SERIAL_PORT as u16, 1, 8);
    let com_irq = Interrupt::new(true, true, false, false, SERIAL_IRQ);
    let com_crs = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let c_hid = Name::new("_HID".into(), &com_hid);
    let c_uid = Name::new("_UID".into(), &one);
    let c_crs = Name::new("_CRS".into(), &com_crs);
    let com1 = Device::new("COM1".into(), vec![&c_hid, &c_uid, &c_crs]);

    let hotplug = sb_devices();
    let sb = Scope::new("_SB_".into(), vec![&pci0, &com1, &hotplug]);
    let s5_typ = SLP_TYP_S5;
    let s5_pkg = Package::new(vec![&s5_typ]);
    let s5 = Name::new("_S5_".into(), &s5_pkg);

    let mut v = aml_bytes(&sb);
    v.extend(aml_bytes(&s5));
    v
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    aml_bytes(&m)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .preferred_pm_profile(PmProfile::EnterpriseServer);
    let port = |p: u64| GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, p);
    b.sleep_control_reg = port(ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = port(ACPI_SLEEP_STATUS_PORT);
    b.reset_reg = port(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"IOASIDVM").into();
    aml_bytes(&b.finalize())
}

fn mcfg() -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = (PCI_ECAM_SIZE >> 20).saturating_sub(1) as u8;
    m.add_ecam(PCI_ECAM_START, 0, 0, last_bus);
    aml_bytes(&m)
}

fn dsdt(ram_end: u64) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&dsdt_aml(ram_end));
    sdt.as_slice().to_vec()
}

/// The tables laid out from [`ACPI_START`]: `(signature, gpa, bytes)`, RSDP first. `extra`
/// holds complete tables (header and checksum included) other parts of the VMM add, e.g. a
/// DMAR for the emulated VT-d; each is linked from the XSDT.
pub fn build_tables(
    vcpus: u8,
    ram_end: u64,
    extra: &[Vec<u8>],
) -> Result<Vec<PlacedTable>, AcpiError> {
    let align = |x: u64| (x + 15) & !15;
    let rsdp_addr = ACPI_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut out: Vec<PlacedTable> = Vec::new();
    let dsdt_addr = next;
    let d = dsdt(ram_end);
    next = align(next + d.len() as u64);
    out.push(("DSDT", dsdt_addr, d));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut tables = vec![
        ("FACP", fadt(dsdt_addr)),
        ("APIC", madt(vcpus)),
        ("MCFG", mcfg()),
    ];
    tables.extend(extra.iter().map(|t| ("extra", t.clone())));
    for (sig, bytes) in tables {
        xsdt.add_entry(next);
        let len = bytes.len() as u64;
        out.push((sig, next, bytes));
        next = align(next + len);
    }
    let xsdt_addr = next;
    let x = aml_bytes(&xsdt);
    next = align(next + x.len() as u64);
    out.push(("XSDT", xsdt_addr, x));
    out.insert(
        0,
        ("RSDP", rsdp_addr, aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr))),
    );
    if next > ACPI_END {
        return Err(AcpiError::TooLarge {
            needed: next - ACPI_START,
            available: ACPI_END - ACPI_START,
        });
    }
    Ok(out)
}

/// Writes the ACPI tables (plus `extra`, see [`build_tables`]) into guest memory; returns the
/// RSDP address.
pub fn write_tables(
    mem: &GuestMemory,
    vcpus: u8,
    ram_end: u64,
    extra: &[Vec<u8>],
) -> Result<u64, AcpiError> {
    let tables = build_tables(vcpus, ram_end, extra)?;
    for (table, gpa, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*gpa))
            .map_err(|source| AcpiError::Write {
                table,
                gpa: *gpa,
                source,
            })?;
    }
    Ok(ACPI_START)
}

/// The hardware-reduced ACPI sleep-control, sleep-status and reset registers: S5 powers the
/// VM off, the reset value resets it (both stop the VM with the matching [`StopReason`]).
#[derive(Debug)]
pub struct AcpiPmDevice {
    stopper: Arc<VmStopper>,
}

impl AcpiPmDevice {
    /// The device; register it on the PIO bus at [`ACPI_SLEEP_CONTROL_PORT`], 3 bytes.
    pub fn new(stopper: Arc<VmStopper>) -> Self {
        Self { stopper }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match base + offset {
            ACPI_SLEEP_CONTROL_PORT if v & SLP_EN != 0 && (v >> 2) & 7 == SLP_TYP_S5 => {
                self.stopper.stop_with(StopReason::GuestPowerOff)
            }
            ACPI_RESET_PORT if v == ACPI_RESET_VALUE => {
                self.stopper.stop_with(StopReason::GuestReset)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn find<'a>(
        t: &'a [(&'static str, u64, Vec<u8>)],
        sig: &str,
    ) -> &'a (&'static str, u64, Vec<u8>) {
        t.iter().find(|x| x.0 == sig).unwrap()
    }

    #[test]
    fn tables_checksum_and_link() {
        let mut dmar = b"DMAR".to_vec();
        dmar.extend_from_slice(&48u32.to_le_bytes());
        dmar.resize(48, 0);
        let fix = 0u8.wrapping_sub(sum(&dmar));
        dmar[9] = fix;
        let t = build_tables(2, 512 << 20, &[dmar]).unwrap();
        for (sig, gpa, bytes) in &t {
            assert!(
                *gpa >= ACPI_START && *gpa + bytes.len() as u64 <= ACPI_END,
                "{sig}"
            );
            if *sig == "RSDP" {
                assert_eq!(&bytes[..8], b"RSD PTR ");
                assert_eq!(sum(&bytes[..20]), 0, "RSDP v1 checksum");
                assert_eq!(sum(bytes), 0, "RSDP extended checksum");
            } else {
                if *sig != "extra" {
                    assert_eq!(&bytes[..4], sig.as_bytes());
                }
                let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
                assert_eq!(len, bytes.len(), "{sig} length");
                assert_eq!(sum(bytes), 0, "{sig} checksum");
            }
        }
        // RSDP -> XSDT -> FACP/APIC/MCFG, FACP -> DSDT.
        let rsdp = &find(&t, "RSDP").2;
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = find(&t, "XSDT");
        assert_eq!(xsdt.1, xsdt_addr);
        let entries: Vec<u64> = xsdt.2[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            entries,
            vec![
                find(&t, "FACP").1,
                find(&t, "APIC").1,
                find(&t, "MCFG").1,
                find(&t, "extra").1
            ]
        );
        assert_eq!(&find(&t, "extra").2[..4], b"DMAR");
        let fadt = &find(&t, "FACP").2;
        // X_DSDT at offset 140.
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, find(&t, "DSDT").1);
        // Flags at offset 112: HW_REDUCED_ACPI (bit 20) and RESET_REG_SUP (bit 10).
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let m = madt(3);
        // Header 44 bytes, 3 LAPIC entries of 8, one IOAPIC of 12.
        assert_eq!(m.len(), 44 + 3 * 8 + 12);
        assert_eq!(
            u32::from_le_bytes(m[36..40].try_into().unwrap()),
            LAPIC_START as u32
        );
        for i in 0..3usize {
            let e = &m[44 + i * 8..52 + i * 8];
            assert_eq!((e[0], e[1], e[2], e[3]), (0, 8, i as u8, i as u8));
        }
        let io = &m[68..80];
        assert_eq!((io[0], io[1]), (1, 12));
        assert_eq!(
            u32::from_le_bytes(io[4..8].try_into().unwrap()),
            IOAPIC_START as u32
        );
    }

    #[test]
    fn mcfg_points_at_ecam() {
        let m = mcfg();
        // Header 36 + 8 reserved, then base(8), segment(2), start bus, end bus.
        let e = &m[44..60];
        assert_eq!(
            u64::from_le_bytes(e[0..8].try_into().unwrap()),
            PCI_ECAM_START
        );
        assert_eq!((e[10], e[11]), (0, 255));
    }

    #[test]
    fn dsdt_names_host_bridge_and_windows() {
        // A 6 GiB guest: RAM ends at 7 GiB (3 GiB below the hole, 3 GiB above 4 GiB).
        let ram_end = 7u64 << 30;
        let d = dsdt_aml(ram_end);
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0") && has(b"COM1") && has(b"_S5_") && has(b"_CRS"));
        // The 32-bit window's bounds appear as DWords.
        assert!(has(&(PCI_MMIO32_START as u32).to_le_bytes()));
        // The 64-bit window starts at or above the end of RAM and appears as a QWord.
        let (start, size) = pci_mmio64_window(ram_end);
        assert_eq!(start, ram_end);
        assert!(has(&start.to_le_bytes()));
        assert!(has(&(start + size - 1).to_le_bytes()));
        // Small guests still get the window above 4 GiB.
        assert_eq!(pci_mmio64_window(512 << 20).0, 4 << 30);
        assert_eq!(pci_mmio64_window((4 << 30) + 1).0, 5 << 30);
    }

    /// One `_PRT` entry as AML: PackageOp, PkgLength, 4 elements, the DWord address, the pin
    /// (ZeroOp, OneOp or a BytePrefix constant), ZeroOp for the source, the GSI as a byte.
    fn prt_entry(slot: u8, pin: u8, gsi: u8) -> Vec<u8> {
        let mut body = vec![4u8, 0x0c];
        body.extend(((u32::from(slot) << 16) | 0xffff).to_le_bytes());
        match pin {
            0 => body.push(0x00),
            1 => body.push(0x01),
            p => body.extend([0x0a, p]),
        }
        body.extend([0x00, 0x0a, gsi]);
        let mut e = vec![0x12, body.len() as u8 + 1];
        e.extend(body);
        e
    }

    #[test]
    fn dsdt_routes_every_slot_pin_to_an_ioapic_gsi() {
        let d = dsdt_aml(512 << 20);
        let count = |needle: &[u8]| d.windows(needle.len()).filter(|w| *w == needle).count();
        assert_eq!(count(b"_PRT"), 1);
        // Name (_PRT, Package (124) {...}): NameOp, the name, PackageOp, a 2-byte PkgLength,
        // 124 elements.
        let at = d.windows(4).position(|w| w == b"_PRT").unwrap();
        assert_eq!(d[at - 1], 0x08, "NameOp");
        assert_eq!(d[at + 4], 0x12, "PackageOp");
        assert_eq!(d[at + 7], 124, "31 slots x 4 pins");
        // Slot 3's INTA is GSI 19, slot 8's INTA wraps to 16, and so on (written out, not
        // computed, so a change of the swizzle shows here).
        for (slot, pin, gsi) in [(1, 0, 17), (3, 0, 19), (7, 0, 23), (8, 0, 16), (3, 3, 22)] {
            assert_eq!(
                count(&prt_entry(slot, pin, gsi)),
                1,
                "slot {slot} pin {pin}"
            );
        }
        // Every slot and pin, with the GSI the device manager's irqfds use.
        for slot in 1..=31u8 {
            for pin in 0..4u8 {
                let gsi = pci_intx_gsi(slot, pin) as u8;
                assert_eq!(
                    count(&prt_entry(slot, pin, gsi)),
                    1,
                    "slot {slot} pin {pin}"
                );
            }
        }
        // The host bridge's slot 0 is not routed.
        let mut slot0 = vec![0x0c];
        slot0.extend(0xffffu32.to_le_bytes());
        assert_eq!(count(&slot0), 0);
    }

    #[test]
    fn dsdt_has_pci_hotplug_slots_controller_and_ged() {
        use crate::hotplug::aml::slot_name;
        use crate::layout::{GED_GSI, PCI_HOTPLUG_SIZE, PCI_HOTPLUG_START};
        let d = dsdt_aml(512 << 20);
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        let count = |needle: &[u8]| d.windows(needle.len()).filter(|w| *w == needle).count();
        for name in [
            &b"PCNT"[..],
            b"DVNT",
            b"PHPR",
            b"PCEJ",
            b"BLCK",
            b"GED_",
            b"_EVT",
        ] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        for name in [&b"PCIU"[..], b"PCID", b"B0EJ", b"PSEG", b"GDAT"] {
            assert!(has(name), "{}", String::from_utf8_lossy(name));
        }
        assert!(has(b"ACPI0013"));
        // One device per slot 1..31, none for the host bridge's slot 0; each has _EJ0.
        for slot in 1..=31u8 {
            let name = slot_name(slot);
            // DeviceOp (0x5b 0x82), a one-byte PkgLength, then the name.
            let dev = d
                .windows(7)
                .any(|w| w[..2] == [0x5b, 0x82] && &w[3..] == name.as_bytes());
            assert!(dev, "no Device ({name})");
        }
        assert!(!has(b"S00_"));
        assert_eq!(count(b"_EJ0"), 31);
        assert_eq!(count(b"_SUN"), 31 * 2, "Name (_SUN) and the _EJ0 argument");
        // The register window: _CRS Memory32Fixed (base, size) and the operation regions.
        let mut mem32 = vec![0x86, 9, 0, 1];
        mem32.extend((PCI_HOTPLUG_START as u32).to_le_bytes());
        mem32.extend((PCI_HOTPLUG_SIZE as u32).to_le_bytes());
        assert!(has(&mem32));
        let mut region = vec![0x5b, 0x80];
        region.extend(b"PCST");
        region.extend([0x00, 0x0c]);
        region.extend((PCI_HOTPLUG_START as u32).to_le_bytes());
        assert!(
            has(&region),
            "OperationRegion (PCST, SystemMemory, base, ...)"
        );
        // The GED interrupt: Extended IRQ descriptor, consumer + edge, active high, one GSI.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend(GED_GSI.to_le_bytes());
        assert!(has(&irq));
    }

    #[test]
    fn dsdt_disassembles_with_iasl() {
        let name = "dsdt_disassembles_with_iasl";
        let Ok(out) = std::process::Command::new("iasl").arg("-v").output() else {
            ioasid::test_skip::record(name, "iasl not found (apt-get install acpica-tools)");
            return;
        };
        assert!(out.status.success(), "iasl -v failed: {out:?}");
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ioasid-vmm-dsdt").unwrap();
        let path = dir.as_path();
        std::fs::write(path.join("dsdt.dat"), dsdt(7 << 30)).unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("iasl")
                .current_dir(path)
                .args(args)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "iasl {args:?} failed:\n{text}");
            text
        };
        let text = run(&["-d", "dsdt.dat"]);
        assert!(!text.contains("Error"), "iasl -d reported errors:\n{text}");
        let dsl = std::fs::read_to_string(path.join("dsdt.dsl")).unwrap();
        for needle in [
            "Device (PCI0)",
            "Device (S01)",
            "Device (S1F)",
            "Method (PCNT, 0, NotSerialized)",
            "Method (_EJ0, 1, NotSerialized)",
            "Method (_EVT, 1, Serialized)",
            "\"ACPI0013\"",
            "Device (PHPR)",
            "Name (_PRT, Package (0x7C)",
        ] {
            assert!(dsl.contains(needle), "{needle} missing from:\n{dsl}");
        }
        assert!(!dsl.contains("Device (S00)"));
        // Slot 3's INTA goes to GSI 19 (0x13).
        let compact: String = dsl.split_whitespace().collect();
        assert!(
            compact.contains("Package(0x04){0x0003FFFF,Zero,Zero,0x13}"),
            "_PRT entry for slot 3 INTA missing from:\n{dsl}"
        );
        // The disassembly compiles back without errors (warnings and remarks are fine).
        let text = run(&["-p", "recompiled", "dsdt.dsl"]);
        assert!(
            text.contains(" 0 Errors") || text.contains("0 Errors,"),
            "iasl reported errors compiling the disassembly:\n{text}"
        );
    }
}
