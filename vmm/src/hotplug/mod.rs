//! ACPI PCI hotplug for a hardware-reduced guest, driven by Linux's `acpiphp`
//! (`CONFIG_HOTPLUG_PCI_ACPI`).
//!
//! The DSDT ([`aml`]) gives the host bridge one device per slot (`S01`..`S1F`, slot 0 is the
//! host bridge) with `_ADR`, `_SUN` and `_EJ0`, a scan method `PCNT`, a device `PHPR` for
//! the register window at [`PCI_HOTPLUG_START`], and a Generic Event Device `GED_` on GSI
//! [`GED_GSI`] whose `_EVT` calls `PCNT`. [`PciHotplug`] is the register window.
//!
//! Adding a device in slot `n`: the device manager puts the function on the PCI bus, then
//! calls [`PciHotplug::notify_added`]. That sets bit `n` of `PCIU` and the GED's PCI event,
//! and pulses the GED interrupt; the guest runs `_EVT` → `PCNT` → `Notify (Snn, 1)`, and
//! `acpiphp` scans the slot through ECAM, assigns BARs and binds a driver.
//!
//! Removing it: [`PciHotplug::request_eject`] sets bit `n` of `PCID` and pulses the
//! interrupt; the guest runs `Notify (Snn, 3)`, `acpiphp` unbinds the driver, removes the
//! function and calls `Snn._EJ0`, which writes `1 << n` to `B0EJ`. That write calls the
//! `on_eject` callback given to [`PciHotplug::install`], on the vCPU thread that made it:
//! only then may the device manager take the function off the bus.
//!
//! Must not touch: the PCI bus or any device model (the callback reports an eject; the
//! device manager acts on it).

pub mod aml;
pub mod ged;
pub mod regs;

use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::BusDevice;
use thiserror::Error;

use crate::irq::{InterruptLine, IrqError, IrqfdLine};
use crate::layout::{GED_GSI, PCI_HOTPLUG_SIZE, PCI_HOTPLUG_START};
use crate::vm::{Vm, VmError};

pub use ged::{Ged, GED_EVENT_PCI_HOTPLUG};
use regs::{Register, WarnLimit};

/// Lowest hotpluggable slot (slot 0 is the host bridge).
pub const FIRST_SLOT: u8 = 1;
/// Highest slot on a PCI bus.
pub const LAST_SLOT: u8 = 31;

/// Called with the slot number when the guest ejects a slot (writes `B0EJ` from `_EJ0`).
///
/// It runs on a vCPU thread, inside the MMIO exit: it must not block, in particular not on
/// device-manager locks that may be held while a vCPU is paused. Send a message to the
/// device manager and return. The guest may also eject a slot on its own (e.g. `echo 0 >
/// /sys/bus/pci/slots/N/power`) or a slot that holds no device, so the receiver must check.
pub type EjectCallback = Box<dyn Fn(u8) + Send + Sync>;

/// Errors of the PCI hotplug controller.
#[derive(Debug, Error)]
pub enum HotplugError {
    /// The slot is not hotpluggable.
    #[error(
        "PCI slot {slot} is not hotpluggable: slots {FIRST_SLOT}..={LAST_SLOT} are (slot 0 is \
         the host bridge)"
    )]
    InvalidSlot {
        /// The slot.
        slot: u8,
    },
    /// The GED interrupt could not be wired.
    #[error("Cannot wire the ACPI GED interrupt to GSI {gsi}")]
    Irq {
        /// The GSI.
        gsi: u32,
        /// The routing error.
        #[source]
        source: IrqError,
    },
    /// The register window could not be put on the MMIO bus.
    #[error("Cannot register the PCI hotplug registers at {base:#x}+{len:#x} on the MMIO bus")]
    Register {
        /// Window base.
        base: u64,
        /// Window length.
        len: u64,
        /// The bus error.
        #[source]
        source: VmError,
    },
    /// The GED interrupt could not be raised (the slot's bit stays set for the next scan).
    #[error("Cannot raise the ACPI GED interrupt for PCI slot {slot}")]
    Interrupt {
        /// The slot.
        slot: u8,
        /// The eventfd error.
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Default)]
struct SlotState {
    /// `PCIU`.
    up: u32,
    /// `PCID`.
    down: u32,
    /// `PSEG`.
    segment: u32,
}

/// The ACPI PCI hotplug controller: slot bitmaps, eject register, segment select and the GED.
pub struct PciHotplug {
    state: Mutex<SlotState>,
    ged: Ged,
    on_eject: EjectCallback,
    warn: WarnLimit,
}

impl std::fmt::Debug for PciHotplug {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciHotplug")
            .field("state", &*self.lock())
            .field("ged", &self.ged)
            .finish()
    }
}

fn slot_bit(slot: u8) -> Result<u32, HotplugError> {
    if (FIRST_SLOT..=LAST_SLOT).contains(&slot) {
        Ok(1 << slot)
    } else {
        Err(HotplugError::InvalidSlot { slot })
    }
}

/// Bits of the slots that can be hotplugged.
const SLOT_MASK: u32 = !1;

impl PciHotplug {
    /// A controller raising `irq` (the GED interrupt) and reporting ejects to `on_eject`.
    /// [`Self::install`] is this plus the KVM wiring; tests call it with a fake line.
    pub fn new(irq: Arc<dyn InterruptLine>, on_eject: EjectCallback) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(SlotState::default()),
            ged: Ged::new(irq),
            on_eject,
            warn: WarnLimit::default(),
        })
    }

    /// Creates the controller for `vm`: the GED interrupt is GSI [`GED_GSI`] through an irqfd,
    /// the registers sit at [`PCI_HOTPLUG_START`] on the MMIO bus. Needs the in-kernel
    /// irqchip. Call once per VM, before the guest boots (the DSDT always describes it).
    pub fn install(vm: &Vm, on_eject: EjectCallback) -> Result<Arc<Self>, HotplugError> {
        let irq_err = |source| HotplugError::Irq {
            gsi: GED_GSI,
            source,
        };
        let router = vm.gsi_router().map_err(irq_err)?;
        let line = IrqfdLine::new(router, GED_GSI).map_err(irq_err)?;
        let hp = Self::new(Arc::new(line), on_eject);
        vm.add_mmio_device(hp.bus_device(), PCI_HOTPLUG_START, PCI_HOTPLUG_SIZE)
            .map_err(|source| HotplugError::Register {
                base: PCI_HOTPLUG_START,
                len: PCI_HOTPLUG_SIZE,
                source,
            })?;
        Ok(hp)
    }

    /// The MMIO device for the register window ([`PCI_HOTPLUG_SIZE`] bytes); [`Self::install`]
    /// registers it.
    pub fn bus_device(self: &Arc<Self>) -> Arc<Mutex<dyn BusDevice>> {
        Arc::new(Mutex::new(HotplugRegs { hp: self.clone() }))
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state is three integers, each update a single store: a panic elsewhere cannot
        // leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the guest a device appeared in `slot` (its function must already answer config
    /// reads): sets the slot's `PCIU` bit (clearing a pending eject request for it) and
    /// raises the GED interrupt once.
    pub fn notify_added(&self, slot: u8) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        {
            let mut s = self.lock();
            s.up |= bit;
            s.down &= !bit;
        }
        self.ged
            .raise(GED_EVENT_PCI_HOTPLUG)
            .map_err(|source| HotplugError::Interrupt { slot, source })
    }

    /// Asks the guest to release the device in `slot`: sets the slot's `PCID` bit (clearing
    /// a pending add notification for it) and raises the GED interrupt once. The device stays
    /// until the guest ejects the slot, reported through the `on_eject` callback.
    pub fn request_eject(&self, slot: u8) -> Result<(), HotplugError> {
        let bit = slot_bit(slot)?;
        {
            let mut s = self.lock();
            s.down |= bit;
            s.up &= !bit;
        }
        self.ged
            .raise(GED_EVENT_PCI_HOTPLUG)
            .map_err(|source| HotplugError::Interrupt { slot, source })
    }

    /// The pending `(PCIU, PCID)` bitmaps the guest has not read yet.
    pub fn pending(&self) -> (u32, u32) {
        let s = self.lock();
        (s.up, s.down)
    }

    /// The GED (its pending events).
    pub fn ged(&self) -> &Ged {
        &self.ged
    }

    fn read_register(&self, reg: Register) -> u32 {
        match reg {
            Register::SlotsUp => std::mem::take(&mut self.lock().up),
            Register::SlotsDown => std::mem::take(&mut self.lock().down),
            Register::Eject => 0,
            Register::Segment => self.lock().segment,
            Register::GedEvent => self.ged.take(),
        }
    }

    fn write_register(&self, reg: Register, value: u32) {
        match reg {
            Register::Eject => self.eject(value),
            Register::Segment => self.lock().segment = value,
            Register::SlotsUp | Register::SlotsDown | Register::GedEvent => {
                self.warn.warn(format_args!(
                    "PCI hotplug register at offset {:#x} is read-only; write of {value:#x} \
                     ignored",
                    reg.offset()
                ))
            }
        }
    }

    /// The guest wrote `value` to `B0EJ`.
    fn eject(&self, value: u32) {
        let slots = {
            let mut s = self.lock();
            if s.segment != 0 {
                let seg = s.segment;
                drop(s);
                self.warn.warn(format_args!(
                    "PCI hotplug eject of slots {value:#x} on segment {seg} ignored: only \
                     segment 0 exists"
                ));
                return;
            }
            let slots = value & SLOT_MASK;
            s.up &= !slots;
            s.down &= !slots;
            slots
        };
        if value & !SLOT_MASK != 0 {
            self.warn.warn(format_args!(
                "PCI hotplug eject of slot 0 (the host bridge) ignored"
            ));
        }
        // Called without the state lock, so the callee may call back into this controller.
        for slot in FIRST_SLOT..=LAST_SLOT {
            if slots & (1 << slot) != 0 {
                log::info!("Guest ejected PCI slot {slot}");
                (self.on_eject)(slot);
            }
        }
    }
}

/// The bus face of [`PciHotplug`].
struct HotplugRegs {
    hp: Arc<PciHotplug>,
}

impl BusDevice for HotplugRegs {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        let reg = match Register::decode(offset, len) {
            Ok(r) => r,
            Err(e) => return self.hp.warn.warn(format_args!("{e}; read returns 0")),
        };
        if let Ok(buf) = <&mut [u8; 4]>::try_from(data) {
            *buf = self.hp.read_register(reg).to_le_bytes();
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let reg = match Register::decode(offset, data.len()) {
            Ok(r) => r,
            Err(e) => return self.hp.warn.warn(format_args!("{e}; write ignored")),
        };
        if let Ok(buf) = <[u8; 4]>::try_from(data) {
            self.hp.write_register(reg, u32::from_le_bytes(buf));
        }
    }
}

#[cfg(test)]
mod tests;
