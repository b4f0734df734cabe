//! The DSDT objects of ACPI PCI hotplug, in the shape Linux's `acpiphp` drives.
//!
//! ```text
//! Scope (\_SB) {
//!   Device (PCI0) {                        // the host bridge (built in acpi.rs)
//!     ...
//!     Method (DVNT, 2) {                   // Arg0: slot bitmap, Arg1: notify code
//!       If (Arg0 & 0x2) { Notify (S01, Arg1) }  ... one If per slot 1..31
//!     }
//!     Method (PCNT, 0) {                   // the PCI hotplug scan
//!       Acquire (\_SB.PHPR.BLCK, 0xFFFF)
//!       \_SB.PHPR.PSEG = 0
//!       Local0 = \_SB.PHPR.PCIU            // read clears
//!       DVNT (Local0, 1)                   // bus check: acpiphp enables the slot
//!       Local1 = \_SB.PHPR.PCID            // read clears
//!       DVNT (Local1, 3)                   // eject request: acpiphp removes, calls _EJ0
//!       Release (\_SB.PHPR.BLCK)
//!     }
//!     Device (S01) {                       // ... S1F; no S00 (slot 0 is the host bridge)
//!       Name (_ADR, 0x00010000)            // slot << 16, function 0
//!       Name (_SUN, 1)
//!       Method (_EJ0, 1) { \_SB.PHPR.PCEJ (_SUN, _SEG) }
//!     }
//!   }
//!   Device (PHPR) {                        // the hotplug controller's registers
//!     Name (_HID, EisaId ("PNP0A06"))  Name (_UID, "PCI Hotplug Controller")
//!     Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, base, size) })
//!     Mutex (BLCK, 0)
//!     OperationRegion (PCST, SystemMemory, base, 0x10)
//!     Field (PCST, DWordAcc, NoLock, WriteAsZeros) { PCIU,32, PCID,32, B0EJ,32, PSEG,32 }
//!     Method (PCEJ, 2) {                   // Arg0: slot, Arg1: segment
//!       Acquire (BLCK, 0xFFFF)  PSEG = Arg1  B0EJ = 1 << Arg0  Release (BLCK)  Return (0)
//!     }
//!   }
//!   Device (GED_) {
//!     Name (_HID, "ACPI0013")  Name (_UID, 0)
//!     Name (_CRS, ResourceTemplate () { Interrupt (ResourceConsumer, Edge, ActiveHigh,
//!                                       Exclusive) { GED_GSI } })
//!     OperationRegion (GDST, SystemMemory, base + 0x10, 4)
//!     Field (GDST, DWordAcc, NoLock, WriteAsZeros) { GDAT, 32 }
//!     Method (_EVT, 1, Serialized) {
//!       Local0 = GDAT                      // read clears
//!       If (Local0 & GED_EVENT_PCI_HOTPLUG) { \_SB.PCI0.PCNT () }
//!     }
//!   }
//! }
//! ```

use acpi_tables::aml::{
    Acquire, And, Arg, Device, EISAName, Field, FieldAccessType, FieldEntry, FieldLockRule,
    FieldUpdateRule, If, Interrupt, Local, Memory32Fixed, Method, MethodCall, Mutex, Name, Notify,
    OpRegion, OpRegionSpace, Path, Release, ResourceTemplate, Return, ShiftLeft, Store, ONE, ZERO,
};
use acpi_tables::{Aml, AmlSink};

use super::ged::GED_EVENT_PCI_HOTPLUG;
use super::regs::{GDAT, REGS_LEN};
use super::{FIRST_SLOT, LAST_SLOT};
use crate::layout::{GED_GSI, PCI_HOTPLUG_SIZE, PCI_HOTPLUG_START};

/// Name of the scan method under `\_SB.PCI0`.
pub const SCAN_METHOD: &str = "PCNT";
/// Notify code for a slot with a new device (ACPI "bus check").
pub const NOTIFY_BUS_CHECK: u8 = 1;
/// Notify code for a slot whose device should go (ACPI "eject request").
pub const NOTIFY_EJECT_REQUEST: u8 = 3;
/// Timeout for `Acquire` meaning "wait forever".
const ACQUIRE_FOREVER: u16 = 0xffff;

/// Already-encoded AML that can sit among other [`Aml`] children.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawAml(Vec<u8>);

impl RawAml {
    /// The encoded bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn encode(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The ACPI name of slot `slot`'s device: `S01_` .. `S1F_` (ASL shows `S01` .. `S1F`).
pub fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// `DVNT (bitmap, code)`: `Notify (Sxx, code)` for each slot whose bit is set.
fn dvnt() -> Vec<u8> {
    let mut ifs = Vec::new();
    for slot in FIRST_SLOT..=LAST_SLOT {
        let bit = 1u32 << slot;
        let name = slot_name(slot);
        let target = Path::new(&name);
        let test = And::new(&ZERO, &Arg(0), &bit);
        let notify = Notify::new(&target, &Arg(1));
        ifs.extend(encode(&If::new(&test, vec![&notify])));
    }
    let ifs = RawAml(ifs);
    encode(&Method::new("DVNT".into(), 2, false, vec![&ifs]))
}

/// `PCNT ()`: reads the slot bitmaps (which clears them) and notifies each slot.
fn pcnt() -> Vec<u8> {
    let lock = "\\_SB_.PHPR.BLCK";
    let acquire = Acquire::new(lock.into(), ACQUIRE_FOREVER);
    let pseg = Path::new("\\_SB_.PHPR.PSEG");
    let select = Store::new(&pseg, &ZERO);
    let pciu = Path::new("\\_SB_.PHPR.PCIU");
    let pcid = Path::new("\\_SB_.PHPR.PCID");
    let read_up = Store::new(&Local(0), &pciu);
    let read_down = Store::new(&Local(1), &pcid);
    let bus_check = NOTIFY_BUS_CHECK;
    let eject_request = NOTIFY_EJECT_REQUEST;
    let notify_up = MethodCall::new("DVNT".into(), vec![&Local(0), &bus_check]);
    let notify_down = MethodCall::new("DVNT".into(), vec![&Local(1), &eject_request]);
    let release = Release::new(lock.into());
    encode(&Method::new(
        SCAN_METHOD.into(),
        0,
        false,
        vec![
            &acquire,
            &select,
            &read_up,
            &notify_up,
            &read_down,
            &notify_down,
            &release,
        ],
    ))
}

/// `Device (Sxx)` with `_ADR`, `_SUN` and `_EJ0`.
fn slot_device(slot: u8) -> Vec<u8> {
    let adr = u32::from(slot) << 16;
    let sun = u32::from(slot);
    let n_adr = Name::new("_ADR".into(), &adr);
    let n_sun = Name::new("_SUN".into(), &sun);
    let sun_ref = Path::new("_SUN");
    let seg_ref = Path::new("_SEG");
    let eject = MethodCall::new("\\_SB_.PHPR.PCEJ".into(), vec![&sun_ref, &seg_ref]);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&eject]);
    let name = slot_name(slot);
    encode(&Device::new(Path::new(&name), vec![&n_adr, &n_sun, &ej0]))
}

/// The objects that go inside `\_SB.PCI0`: `DVNT`, `PCNT` and the slot devices `S01`..`S1F`.
pub fn pci_root_objects() -> RawAml {
    let mut v = dvnt();
    v.extend(pcnt());
    for slot in FIRST_SLOT..=LAST_SLOT {
        v.extend(slot_device(slot));
    }
    RawAml(v)
}

/// `Device (PHPR)`: the register window, its lock and the eject method.
fn phpr() -> Vec<u8> {
    let hid = EISAName::new("PNP0A06");
    let n_hid = Name::new("_HID".into(), &hid);
    let uid: &'static str = "PCI Hotplug Controller";
    let n_uid = Name::new("_UID".into(), &uid);
    let window = Memory32Fixed::new(true, PCI_HOTPLUG_START as u32, PCI_HOTPLUG_SIZE as u32);
    let crs = ResourceTemplate::new(vec![&window]);
    let n_crs = Name::new("_CRS".into(), &crs);
    let mutex = Mutex::new("BLCK".into(), 0);
    let base = PCI_HOTPLUG_START;
    let len = GDAT;
    let region = OpRegion::new("PCST".into(), OpRegionSpace::SystemMemory, &base, &len);
    let field = Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
            FieldEntry::Named(*b"PSEG", 32),
        ],
    );
    let acquire = Acquire::new("BLCK".into(), ACQUIRE_FOREVER);
    let pseg = Path::new("PSEG");
    let select = Store::new(&pseg, &Arg(1));
    let b0ej = Path::new("B0EJ");
    let bit = ShiftLeft::new(&b0ej, &ONE, &Arg(0));
    let release = Release::new("BLCK".into());
    let ret = Return::new(&ZERO);
    let pcej = Method::new(
        "PCEJ".into(),
        2,
        false,
        vec![&acquire, &select, &bit, &release, &ret],
    );
    encode(&Device::new(
        "PHPR".into(),
        vec![&n_hid, &n_uid, &n_crs, &mutex, &region, &field, &pcej],
    ))
}

/// `Device (GED_)`: the Generic Event Device whose `_EVT` runs the PCI hotplug scan.
fn ged() -> Vec<u8> {
    let hid: &'static str = "ACPI0013";
    let n_hid = Name::new("_HID".into(), &hid);
    let n_uid = Name::new("_UID".into(), &ZERO);
    // Edge-triggered, active-high: the irqfd pulses the pin once per event.
    let irq = Interrupt::new(true, true, false, false, GED_GSI);
    let crs = ResourceTemplate::new(vec![&irq]);
    let n_crs = Name::new("_CRS".into(), &crs);
    let base = PCI_HOTPLUG_START + GDAT;
    let len = REGS_LEN - GDAT;
    let region = OpRegion::new("GDST".into(), OpRegionSpace::SystemMemory, &base, &len);
    let field = Field::new(
        "GDST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );
    let gdat = Path::new("GDAT");
    let read = Store::new(&Local(0), &gdat);
    let pci = GED_EVENT_PCI_HOTPLUG;
    let test = And::new(&ZERO, &Local(0), &pci);
    let scan_path = format!("\\_SB_.PCI0.{SCAN_METHOD}");
    let scan = MethodCall::new(Path::new(&scan_path), vec![]);
    let on_pci = If::new(&test, vec![&scan]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &on_pci]);
    encode(&Device::new(
        "GED_".into(),
        vec![&n_hid, &n_uid, &n_crs, &region, &field, &evt],
    ))
}

/// The devices that go inside `\_SB`: the controller `PHPR` and the GED `GED_`.
pub fn sb_devices() -> RawAml {
    let mut v = phpr();
    v.extend(ged());
    RawAml(v)
}
