//! The root bus: a host bridge at 00:00.0, device slots 1..=31, BAR allocation and the
//! BAR ranges on the MMIO and PIO [`Bus`]es.

use super::ratelimit::GuestWarn;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;
use thiserror::Error;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use super::bar::{BarKind, PciBarInfo, NUM_BARS};
use super::bdf::PciBdf;
use super::config::{command, reg, EXT_CONFIG_SPACE_SIZE};
use super::device::{PciDevice, SharedPciDevice};
use super::host_bridge::HostBridge;
use crate::bus::{Bus, BusDevice, SharedBusDevice};

/// Highest device slot on a bus.
pub const MAX_SLOT: u8 = 31;
/// Memory BARs are placed at least page-aligned, so they can be mapped directly.
const MIN_MEM_ALIGN: u64 = 4096;
/// End of the x86 I/O port space.
const IO_SPACE_END: u64 = 0x1_0000;

/// A guest-physical (or port) window BARs are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressWindow {
    /// First address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Where the root bus lives and what it may hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBusConfig {
    /// PCI segment number.
    pub segment: u16,
    /// Window for 32-bit memory BARs (below 4 GiB).
    pub mmio32: AddressWindow,
    /// Window for 64-bit memory BARs; without it they go into `mmio32`.
    pub mmio64: Option<AddressWindow>,
    /// Window for I/O BARs; without it a device with an I/O BAR cannot be added.
    pub io: Option<AddressWindow>,
}

/// Errors of the root bus.
#[derive(Debug, Error)]
pub enum PciError {
    /// The requested slot is 0 (the host bridge) or above 31.
    #[error("PCI slot {slot} is not a device slot (1..=31)")]
    InvalidSlot {
        /// The slot.
        slot: u8,
    },
    /// The requested slot holds a device.
    #[error("PCI slot {bdf} is already in use")]
    SlotInUse {
        /// The address asked for.
        bdf: PciBdf,
    },
    /// Slots 1..=31 are all taken.
    #[error("No free PCI slot on segment {segment:04x}")]
    NoFreeSlot {
        /// The segment.
        segment: u16,
    },
    /// Nothing at that address (or it is the host bridge, which cannot be removed).
    #[error("No removable PCI device at {bdf}")]
    NoDevice {
        /// The address.
        bdf: PciBdf,
    },
    /// An address window cannot back an allocator.
    #[error("Invalid {space} window {base:#x}+{size:#x}")]
    Window {
        /// Which window.
        space: &'static str,
        /// Base.
        base: u64,
        /// Size.
        size: u64,
        /// Why.
        #[source]
        source: vm_allocator::Error,
    },
    /// The bus has no window of the kind a BAR needs.
    #[error("BAR{bar} of {bdf} needs {space} space, which this PCI bus has no window for")]
    NoWindow {
        /// Device.
        bdf: PciBdf,
        /// BAR index.
        bar: u8,
        /// Which space.
        space: &'static str,
    },
    /// The window is full (or fragmented).
    #[error("Cannot allocate {size:#x} bytes of {space} space for BAR{bar} of {bdf}")]
    BarAllocation {
        /// Device.
        bdf: PciBdf,
        /// BAR index.
        bar: u8,
        /// BAR size.
        size: u64,
        /// Which space.
        space: &'static str,
        /// Allocator error.
        #[source]
        source: vm_allocator::Error,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    Mmio32,
    Mmio64,
    Io,
}

impl Pool {
    fn name(self) -> &'static str {
        match self {
            Pool::Mmio32 => "32-bit MMIO",
            Pool::Mmio64 => "64-bit MMIO",
            Pool::Io => "I/O port",
        }
    }
}

/// Routes one BAR's bus range to the device.
struct BarRange {
    device: SharedPciDevice,
    bar: u8,
}

fn lock_dev(d: &SharedPciDevice) -> MutexGuard<'_, dyn PciDevice + 'static> {
    d.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for BarRange {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock_dev(&self.device).read_bar(self.bar, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        lock_dev(&self.device).write_bar(self.bar, offset, data);
    }
}

struct BarSlot {
    info: PciBarInfo,
    pool: Pool,
    allocation: RangeInclusive,
    live: Option<u64>,
    range: SharedBusDevice,
}

struct Slot {
    device: SharedPciDevice,
    bars: Vec<BarSlot>,
}

/// A BAR as the bus sees it, for the device manager and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarState {
    /// The BAR.
    pub info: PciBarInfo,
    /// The address the bus assigned when the device was added.
    pub assigned: u64,
    /// Where the BAR is decoded now (`None`: decode off, unassigned or conflicting).
    pub live: Option<u64>,
}

/// The root bus of one PCI segment.
pub struct PciBus {
    segment: u16,
    mmio_bus: Arc<Bus>,
    pio_bus: Arc<Bus>,
    mmio32: AddressAllocator,
    mmio64: Option<AddressAllocator>,
    io: Option<AddressAllocator>,
    slots: BTreeMap<u8, Slot>,
    /// BAR moves are guest writes: their warnings are rate limited.
    warn: GuestWarn,
}

/// The root bus as the ECAM and 0xCF8 handlers and the device manager share it.
pub type SharedPciBus = Arc<Mutex<PciBus>>;

/// How config-access handlers (ECAM, 0xCF8/0xCFC) refer to the bus. The bus owns the MMIO and
/// PIO buses those handlers sit on, so a strong reference back would be a cycle that keeps
/// every device (and its VFIO fd) alive after the VM drops its bus.
pub(crate) type WeakPciBus = std::sync::Weak<Mutex<PciBus>>;

/// Runs `f` on the bus behind `bus`; `None` once the bus is gone.
pub(crate) fn with_bus<R>(bus: &WeakPciBus, f: impl FnOnce(&mut PciBus) -> R) -> Option<R> {
    let bus = bus.upgrade()?;
    let mut guard = bus.lock().unwrap_or_else(|e| e.into_inner());
    Some(f(&mut guard))
}

fn allocator(space: &'static str, w: AddressWindow) -> Result<AddressAllocator, PciError> {
    AddressAllocator::new(w.base, w.size).map_err(|source| PciError::Window {
        space,
        base: w.base,
        size: w.size,
        source,
    })
}

impl PciBus {
    /// A root bus with its host bridge at 00:00.0. BAR ranges go on `mmio_bus` and
    /// `pio_bus`.
    pub fn new(
        config: PciBusConfig,
        mmio_bus: Arc<Bus>,
        pio_bus: Arc<Bus>,
    ) -> Result<Self, PciError> {
        let mut slots = BTreeMap::new();
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        slots.insert(
            0,
            Slot {
                device: bridge,
                bars: Vec::new(),
            },
        );
        Ok(Self {
            segment: config.segment,
            mmio_bus,
            pio_bus,
            mmio32: allocator(Pool::Mmio32.name(), config.mmio32)?,
            mmio64: config
                .mmio64
                .map(|w| allocator(Pool::Mmio64.name(), w))
                .transpose()?,
            io: config
                .io
                .map(|w| allocator(Pool::Io.name(), w))
                .transpose()?,
            slots,
            warn: GuestWarn::new(),
        })
    }

    /// The segment number.
    pub fn segment(&self) -> u16 {
        self.segment
    }

    /// The MMIO bus BAR ranges go on.
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The PIO bus I/O BAR ranges go on.
    pub fn pio_bus(&self) -> &Arc<Bus> {
        &self.pio_bus
    }

    fn bdf(&self, slot: u8) -> PciBdf {
        PciBdf::root_slot(self.segment, slot)
    }

    /// The slot [`Self::add_device`] picks when given none: the lowest free one.
    pub fn free_slot(&self) -> Option<u8> {
        (1..=MAX_SLOT).find(|s| !self.slots.contains_key(s))
    }

    /// Adds `device` at `slot` (1..=31), or at the lowest free slot. Allocates its BARs,
    /// programs their addresses into its BAR registers (decode stays as the device has it,
    /// normally off until the guest enables it), and returns its address.
    pub fn add_device(
        &mut self,
        device: SharedPciDevice,
        slot: Option<u8>,
    ) -> Result<PciBdf, PciError> {
        let slot = match slot {
            Some(s) if s == 0 || s > MAX_SLOT => return Err(PciError::InvalidSlot { slot: s }),
            Some(s) if self.slots.contains_key(&s) => {
                return Err(PciError::SlotInUse { bdf: self.bdf(s) })
            }
            Some(s) => s,
            None => self.free_slot().ok_or(PciError::NoFreeSlot {
                segment: self.segment,
            })?,
        };
        let bdf = self.bdf(slot);
        let infos = lock_dev(&device).bars();
        let mut bars: Vec<BarSlot> = Vec::with_capacity(infos.len());
        for info in infos
            .into_iter()
            .filter(|b| usize::from(b.index) < NUM_BARS)
        {
            match self.allocate_bar(bdf, &info) {
                Ok((pool, allocation)) => bars.push(BarSlot {
                    info,
                    pool,
                    allocation,
                    live: None,
                    range: Arc::new(Mutex::new(BarRange {
                        device: device.clone(),
                        bar: info.index,
                    })),
                }),
                Err(e) => {
                    for b in &bars {
                        self.free(b.pool, &b.allocation);
                    }
                    return Err(e);
                }
            }
        }
        {
            let mut d = lock_dev(&device);
            for b in &bars {
                let addr = b.allocation.start();
                let reg_idx = b.info.offset() / 4;
                d.write_config_register(reg_idx, 0, &(addr as u32).to_le_bytes());
                if b.info.kind == BarKind::Mem64 {
                    d.write_config_register(reg_idx + 1, 0, &((addr >> 32) as u32).to_le_bytes());
                }
            }
        }
        self.slots.insert(slot, Slot { device, bars });
        self.refresh_bars(slot);
        Ok(bdf)
    }

    fn allocate_bar(
        &mut self,
        bdf: PciBdf,
        info: &PciBarInfo,
    ) -> Result<(Pool, RangeInclusive), PciError> {
        let pool = match info.kind {
            BarKind::Io => Pool::Io,
            BarKind::Mem64 if self.mmio64.is_some() => Pool::Mmio64,
            _ => Pool::Mmio32,
        };
        let align = if info.is_memory() {
            info.size.max(MIN_MEM_ALIGN)
        } else {
            info.size
        };
        let alloc = match pool {
            Pool::Mmio32 => Some(&mut self.mmio32),
            Pool::Mmio64 => self.mmio64.as_mut(),
            Pool::Io => self.io.as_mut(),
        }
        .ok_or(PciError::NoWindow {
            bdf,
            bar: info.index,
            space: pool.name(),
        })?;
        let range = alloc
            .allocate(info.size, align, AllocPolicy::FirstMatch)
            .map_err(|source| PciError::BarAllocation {
                bdf,
                bar: info.index,
                size: info.size,
                space: pool.name(),
                source,
            })?;
        Ok((pool, range))
    }

    fn free(&mut self, pool: Pool, range: &RangeInclusive) {
        let alloc = match pool {
            Pool::Mmio32 => Some(&mut self.mmio32),
            Pool::Mmio64 => self.mmio64.as_mut(),
            Pool::Io => self.io.as_mut(),
        };
        if let Some(a) = alloc {
            if let Err(e) = a.free(range) {
                warn!("Cannot free {} range {range:?}: {e}", pool.name());
            }
        }
    }

    /// Removes the device at `bdf`: its BAR ranges leave the buses, its BAR space and slot
    /// are freed, and it is told [`PciDevice::removed`]. Returns it.
    pub fn remove_device(&mut self, bdf: PciBdf) -> Result<SharedPciDevice, PciError> {
        let slot = self
            .slot_of(bdf)
            .filter(|s| *s != 0)
            .ok_or(PciError::NoDevice { bdf })?;
        let Some(s) = self.slots.remove(&slot) else {
            return Err(PciError::NoDevice { bdf });
        };
        let mut moved = Vec::new();
        for b in &s.bars {
            if let Some(base) = b.live {
                let bus = if b.info.is_memory() {
                    &self.mmio_bus
                } else {
                    &self.pio_bus
                };
                if let Err(e) = bus.remove(base) {
                    warn!("Removing BAR{} of {bdf}: {e}", b.info.index);
                }
                moved.push((b.info.index, base));
            }
        }
        for b in &s.bars {
            self.free(b.pool, &b.allocation);
        }
        {
            let mut d = lock_dev(&s.device);
            for (bar, base) in moved {
                d.bar_moved(bar, Some(base), None);
            }
            d.removed();
        }
        Ok(s.device)
    }

    fn slot_of(&self, bdf: PciBdf) -> Option<u8> {
        (bdf.segment() == self.segment && bdf.bus() == 0 && bdf.function() == 0)
            .then_some(bdf.device())
            .filter(|s| self.slots.contains_key(s))
    }

    /// The device at `bdf`.
    pub fn device(&self, bdf: PciBdf) -> Option<SharedPciDevice> {
        self.slot_of(bdf)
            .and_then(|s| self.slots.get(&s))
            .map(|s| s.device.clone())
    }

    /// Addresses of all functions, the host bridge first.
    pub fn devices(&self) -> Vec<PciBdf> {
        self.slots.keys().map(|s| self.bdf(*s)).collect()
    }

    /// The BARs of the device at `bdf` with their assigned and live addresses.
    pub fn bar_states(&self, bdf: PciBdf) -> Option<Vec<BarState>> {
        let s = self.slots.get(&self.slot_of(bdf)?)?;
        Some(
            s.bars
                .iter()
                .map(|b| BarState {
                    info: b.info,
                    assigned: b.allocation.start(),
                    live: b.live,
                })
                .collect(),
        )
    }

    /// A config read of `data.len()` (1, 2 or 4) bytes at `offset` of bus/device/function,
    /// as ECAM or 0xCFC deliver it. Absent functions read as all ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: u16, data: &mut [u8]) {
        data.fill(0xff);
        let off = usize::from(offset);
        if bus != 0 || function != 0 || off + data.len() > EXT_CONFIG_SPACE_SIZE {
            return;
        }
        let Some(slot) = self.slots.get(&device) else {
            return;
        };
        let lane = off % 4;
        if lane + data.len() > 4 {
            return;
        }
        let v = lock_dev(&slot.device)
            .read_config_register(off / 4)
            .to_le_bytes();
        data.copy_from_slice(&v[lane..lane + data.len()]);
    }

    /// A config write; a write to the command register or a BAR re-evaluates the BAR
    /// ranges on the buses.
    pub fn config_write(&mut self, bus: u8, device: u8, function: u8, offset: u16, data: &[u8]) {
        let off = usize::from(offset);
        if bus != 0 || function != 0 || off + data.len() > EXT_CONFIG_SPACE_SIZE {
            return;
        }
        let lane = off % 4;
        if lane + data.len() > 4 {
            return;
        }
        let Some(slot) = self.slots.get(&device) else {
            return;
        };
        let reg_idx = off / 4;
        lock_dev(&slot.device).write_config_register(reg_idx, lane as u64, data);
        if reg_idx == reg::COMMAND / 4 || (4..=9).contains(&reg_idx) {
            self.refresh_bars(device);
        }
    }

    /// Brings the bus ranges of `slot` in line with its command register and BARs.
    fn refresh_bars(&mut self, slot: u8) {
        let bdf = self.bdf(slot);
        let Some(s) = self.slots.get_mut(&slot) else {
            return;
        };
        let (cmd, regs) = {
            let mut d = lock_dev(&s.device);
            let cmd = d.read_config_register(reg::COMMAND / 4) as u16;
            let mut regs = [0u32; NUM_BARS + 1];
            for (i, r) in regs.iter_mut().enumerate().take(NUM_BARS) {
                *r = d.read_config_register(4 + i);
            }
            (cmd, regs)
        };
        let mut moved = Vec::new();
        for b in s.bars.iter_mut() {
            let i = usize::from(b.info.index);
            let want = desired_base(&b.info, cmd, regs[i], regs[i + 1]);
            if want == b.live {
                continue;
            }
            let bus = if b.info.is_memory() {
                &self.mmio_bus
            } else {
                &self.pio_bus
            };
            let now = match (b.live, want) {
                (Some(old), Some(new)) => match bus.relocate(old, new) {
                    Ok(()) => Some(new),
                    Err(e) => {
                        self.warn.warn(format_args!(
                            "BAR{} of {bdf} not decoded at {new:#x}: {e}",
                            b.info.index
                        ));
                        let _ = bus.remove(old);
                        None
                    }
                },
                (Some(old), None) => {
                    let _ = bus.remove(old);
                    None
                }
                (None, Some(new)) => match bus.insert(b.range.clone(), new, b.info.size) {
                    Ok(()) => Some(new),
                    Err(e) => {
                        self.warn.warn(format_args!(
                            "BAR{} of {bdf} not decoded at {new:#x}: {e}",
                            b.info.index
                        ));
                        None
                    }
                },
                (None, None) => None,
            };
            if now != b.live {
                moved.push((b.info.index, b.live, now));
                b.live = now;
            }
        }
        if !moved.is_empty() {
            let mut d = lock_dev(&s.device);
            for (bar, old, new) in moved {
                d.bar_moved(bar, old, new);
            }
        }
    }

    /// Resets every function (VM reset).
    pub fn reset(&mut self) {
        let slots: Vec<u8> = self.slots.keys().copied().collect();
        for s in slots {
            if let Some(slot) = self.slots.get(&s) {
                lock_dev(&slot.device).reset();
            }
            self.refresh_bars(s);
        }
    }
}

/// Where a BAR should be decoded given the command register and its register values.
fn desired_base(info: &PciBarInfo, cmd: u16, low: u32, high: u32) -> Option<u64> {
    let enable = if info.is_memory() {
        command::MEMORY
    } else {
        command::IO
    };
    if cmd & enable == 0 {
        return None;
    }
    let addr = info.decode(low, high);
    let last = addr.checked_add(info.size - 1)?;
    if addr == 0 || (info.kind == BarKind::Io && last >= IO_SPACE_END) {
        return None;
    }
    Some(addr)
}
