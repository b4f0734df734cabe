//! Root bus tests with a small emulated function.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::any::Any;
use std::sync::{Arc, Mutex};

use super::config::{command, reg, TypeZeroHeader};
use super::*;
use crate::bus::Bus;

/// A function with a 4 KiB Mem32 BAR0, a 1 MiB 64-bit prefetchable BAR2 and a 32-byte
/// I/O BAR4. BAR reads return `bar << 4 | offset`; writes and moves are recorded.
struct TestDev {
    config: ConfigSpace,
    bars: Vec<PciBarInfo>,
    writes: Vec<(u8, u64, Vec<u8>)>,
    moves: Vec<(u8, Option<u64>, Option<u64>)>,
    removed: bool,
}

impl TestDev {
    fn new() -> Self {
        let mut config = ConfigSpace::type0(
            4096,
            &TypeZeroHeader {
                vendor_id: 0x1af4,
                device_id: 0x10f0,
                class_code: 0xff_00_00,
                revision_id: 3,
                ..Default::default()
            },
        );
        let bars = vec![
            PciBarInfo::new(0, BarKind::Mem32, 0x1000, false).unwrap(),
            PciBarInfo::new(2, BarKind::Mem64, 0x10_0000, true).unwrap(),
            PciBarInfo::new(4, BarKind::Io, 32, false).unwrap(),
        ];
        for b in &bars {
            config.add_bar(b);
        }
        Self {
            config,
            bars,
            writes: Vec::new(),
            moves: Vec::new(),
            removed: false,
        }
    }
}

impl PciDevice for TestDev {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_u32(reg_idx * 4)
    }
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write(reg_idx * 4 + offset as usize, data);
    }
    fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.clone()
    }
    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = (bar << 4) | ((offset as u8).wrapping_add(i as u8) & 0xf);
        }
    }
    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.writes.push((bar, offset, data.to_vec()));
    }
    fn bar_moved(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
        self.moves.push((bar, old, new));
    }
    fn removed(&mut self) {
        self.removed = true;
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

pub(crate) const MMIO32: AddressWindow = AddressWindow {
    base: 0xc000_0000,
    size: 0x1000_0000,
};
pub(crate) const MMIO64: AddressWindow = AddressWindow {
    base: 0x100_0000_0000,
    size: 0x10_0000_0000,
};
pub(crate) const IO: AddressWindow = AddressWindow {
    base: 0xc000,
    size: 0x1000,
};
pub(crate) const ECAM_BASE: u64 = 0xe000_0000;

pub(crate) struct Rig {
    pub pci: SharedPciBus,
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
}

impl Rig {
    pub fn new() -> Self {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let cfg = PciBusConfig {
            segment: 0,
            mmio32: MMIO32,
            mmio64: Some(MMIO64),
            io: Some(IO),
        };
        let pci = Arc::new(Mutex::new(
            PciBus::new(cfg, mmio.clone(), pio.clone()).unwrap(),
        ));
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(pci.clone()))),
            ECAM_BASE,
            ECAM_BUS_SIZE,
        )
        .unwrap();
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_PORT_SIZE,
        )
        .unwrap();
        Self { pci, mmio, pio }
    }

    pub fn add(&self, dev: SharedPciDevice, slot: Option<u8>) -> Result<PciBdf, PciError> {
        self.pci.lock().unwrap().add_device(dev, slot)
    }

    fn ecam_addr(bdf: PciBdf, off: u16) -> u64 {
        ECAM_BASE
            + (u64::from(bdf.device()) << 15)
            + (u64::from(bdf.function()) << 12)
            + u64::from(off)
    }

    /// A config read through ECAM on the MMIO bus.
    pub fn ecam_read(&self, bdf: PciBdf, off: u16, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        self.mmio.read(Self::ecam_addr(bdf, off), &mut d).unwrap();
        d
    }

    pub fn ecam_read32(&self, bdf: PciBdf, off: u16) -> u32 {
        let v = self.ecam_read(bdf, off, 4);
        u32::from_le_bytes([v[0], v[1], v[2], v[3]])
    }

    pub fn ecam_write(&self, bdf: PciBdf, off: u16, data: &[u8]) {
        self.mmio.write(Self::ecam_addr(bdf, off), data).unwrap();
    }

    pub fn ecam_write32(&self, bdf: PciBdf, off: u16, v: u32) {
        self.ecam_write(bdf, off, &v.to_le_bytes());
    }

    /// A config read through 0xCF8/0xCFC on the PIO bus.
    pub fn cf8_read(&self, bdf: PciBdf, off: u16, len: usize) -> Vec<u8> {
        let addr = 0x8000_0000u32
            | (u32::from(bdf.bus()) << 16)
            | (u32::from(bdf.device()) << 11)
            | (u32::from(bdf.function()) << 8)
            | u32::from(off & 0xfc);
        self.pio
            .write(PCI_CONFIG_IO_PORT, &addr.to_le_bytes())
            .unwrap();
        let mut d = vec![0u8; len];
        self.pio
            .read(PCI_CONFIG_IO_PORT + 4 + u64::from(off & 3), &mut d)
            .unwrap();
        d
    }

    pub fn bars(&self, bdf: PciBdf) -> Vec<BarState> {
        self.pci.lock().unwrap().bar_states(bdf).unwrap()
    }
}

fn test_dev() -> (Arc<Mutex<TestDev>>, SharedPciDevice) {
    let d = Arc::new(Mutex::new(TestDev::new()));
    let shared: SharedPciDevice = d.clone();
    (d, shared)
}

#[test]
fn host_bridge_at_00_00_0() {
    let rig = Rig::new();
    let hb = PciBdf::new(0, 0, 0, 0).unwrap();
    assert_eq!(rig.ecam_read32(hb, 0), 0x0008_1b36);
    assert_eq!(rig.ecam_read32(hb, 8) >> 8, 0x06_00_00);
    // An empty slot and a nonzero function read as all ones.
    assert_eq!(
        rig.ecam_read32(PciBdf::new(0, 0, 5, 0).unwrap(), 0),
        u32::MAX
    );
    assert_eq!(
        rig.ecam_read32(PciBdf::new(0, 0, 0, 1).unwrap(), 0),
        u32::MAX
    );
    assert!(rig.pci.lock().unwrap().remove_device(hb).is_err());
}

#[test]
fn bdf_allocation_and_conflicts() {
    let rig = Rig::new();
    let a = rig.add(test_dev().1, None).unwrap();
    assert_eq!(a.to_string(), "0000:00:01.0");
    let b = rig.add(test_dev().1, Some(7)).unwrap();
    assert_eq!(b.device(), 7);
    assert!(matches!(
        rig.add(test_dev().1, Some(7)),
        Err(PciError::SlotInUse { bdf }) if bdf == b
    ));
    assert!(matches!(
        rig.add(test_dev().1, Some(0)),
        Err(PciError::InvalidSlot { slot: 0 })
    ));
    assert!(matches!(
        rig.add(test_dev().1, Some(32)),
        Err(PciError::InvalidSlot { slot: 32 })
    ));
    // The next automatic slot skips the taken ones.
    assert_eq!(rig.add(test_dev().1, None).unwrap().device(), 2);
    assert_eq!(
        rig.pci
            .lock()
            .unwrap()
            .devices()
            .iter()
            .map(|b| b.device())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 7]
    );
}

#[test]
fn slots_run_out() {
    let rig = Rig::new();
    // Small BAR-less functions are enough to fill the bus; `free_slot` names the slot each
    // add without a slot takes.
    for want in 1..=31u8 {
        let free = rig.pci.lock().unwrap().free_slot();
        assert_eq!(free, Some(want));
        let bdf = rig
            .add(
                Arc::new(Mutex::new(super::host_bridge::HostBridge::new())),
                None,
            )
            .unwrap();
        assert_eq!(bdf, PciBdf::root_slot(0, want));
    }
    assert_eq!(rig.pci.lock().unwrap().free_slot(), None);
    assert!(matches!(
        rig.add(test_dev().1, None),
        Err(PciError::NoFreeSlot { segment: 0 })
    ));
}

#[test]
fn ecam_and_cf8_give_the_same_bytes() {
    let rig = Rig::new();
    let bdf = rig.add(test_dev().1, Some(3)).unwrap();
    let hb = PciBdf::new(0, 0, 0, 0).unwrap();
    for target in [bdf, hb, PciBdf::new(0, 0, 9, 0).unwrap()] {
        for off in (0u16..0x40).step_by(1) {
            for len in [1usize, 2, 4] {
                if usize::from(off) % len != 0 {
                    continue;
                }
                assert_eq!(
                    rig.ecam_read(target, off, len),
                    rig.cf8_read(target, off, len),
                    "{target} offset {off:#x} len {len}"
                );
            }
        }
    }
    // The function's identity is what both paths show.
    assert_eq!(rig.cf8_read(bdf, 0, 4), vec![0xf4, 0x1a, 0xf0, 0x10]);
    // A disabled address register reads all ones.
    rig.pio
        .write(PCI_CONFIG_IO_PORT, &0u32.to_le_bytes())
        .unwrap();
    let mut d = [0u8; 4];
    rig.pio.read(PCI_CONFIG_IO_PORT + 4, &mut d).unwrap();
    assert_eq!(d, [0xff; 4]);
}

#[test]
fn bars_allocated_programmed_and_gated_by_decode() {
    let rig = Rig::new();
    let (dev, shared) = test_dev();
    let bdf = rig.add(shared, None).unwrap();
    let bars = rig.bars(bdf);
    assert_eq!(bars.len(), 3);
    assert!((MMIO32.base..MMIO32.base + MMIO32.size).contains(&bars[0].assigned));
    assert!((MMIO64.base..MMIO64.base + MMIO64.size).contains(&bars[1].assigned));
    assert_eq!(bars[1].assigned % 0x10_0000, 0, "BARs are size aligned");
    assert!((IO.base..IO.base + IO.size).contains(&bars[2].assigned));
    // The guest sees the assigned addresses in the BAR registers.
    assert_eq!(u64::from(rig.ecam_read32(bdf, 0x10)), bars[0].assigned);
    let lo = u64::from(rig.ecam_read32(bdf, 0x18));
    let hi = u64::from(rig.ecam_read32(bdf, 0x1c));
    assert_eq!(((hi << 32) | lo) & !0xf, bars[1].assigned);
    assert_eq!(lo & 0xf, 0xc);

    // Decode is off: nothing on the buses besides the config handlers.
    assert!(bars.iter().all(|b| b.live.is_none()));
    assert_eq!(rig.mmio.ranges().len(), 1);
    let mut buf = [0u8; 4];
    assert!(rig.mmio.read(bars[0].assigned, &mut buf).is_err());

    // Memory decode brings the memory BARs live, not the I/O BAR.
    rig.ecam_write(bdf, reg::COMMAND as u16, &command::MEMORY.to_le_bytes());
    let live: Vec<Option<u64>> = rig.bars(bdf).iter().map(|b| b.live).collect();
    assert_eq!(
        live,
        vec![Some(bars[0].assigned), Some(bars[1].assigned), None]
    );
    rig.mmio.read(bars[0].assigned + 4, &mut buf).unwrap();
    assert_eq!(buf, [0x04, 0x05, 0x06, 0x07]);
    rig.mmio.write(bars[1].assigned + 0x10, &[9, 9]).unwrap();
    assert_eq!(dev.lock().unwrap().writes, vec![(2, 0x10, vec![9, 9])]);

    // I/O decode adds the I/O BAR on the PIO bus; clearing memory decode drops the others.
    rig.ecam_write(bdf, reg::COMMAND as u16, &command::IO.to_le_bytes());
    let live: Vec<Option<u64>> = rig.bars(bdf).iter().map(|b| b.live).collect();
    assert_eq!(live, vec![None, None, Some(bars[2].assigned)]);
    rig.pio.read(bars[2].assigned + 1, &mut buf[..1]).unwrap();
    assert_eq!(buf[0], 0x41);
    assert!(rig.mmio.read(bars[0].assigned, &mut buf).is_err());
    let moves = dev.lock().unwrap().moves.clone();
    assert!(moves.contains(&(0, Some(bars[0].assigned), None)));
    assert!(moves.contains(&(4, None, Some(bars[2].assigned))));
}

#[test]
fn bar_sizing_and_relocation_move_the_bus_range() {
    let rig = Rig::new();
    let (dev, shared) = test_dev();
    let bdf = rig.add(shared, None).unwrap();
    let old = rig.bars(bdf)[0].assigned;
    rig.ecam_write(bdf, reg::COMMAND as u16, &command::MEMORY.to_le_bytes());

    // Sizing with decode off (as Linux does), then a new address.
    rig.ecam_write(bdf, reg::COMMAND as u16, &0u16.to_le_bytes());
    rig.ecam_write32(bdf, 0x10, u32::MAX);
    assert_eq!(rig.ecam_read32(bdf, 0x10), 0xffff_f000);
    rig.ecam_write32(bdf, 0x18, u32::MAX);
    rig.ecam_write32(bdf, 0x1c, u32::MAX);
    assert_eq!(rig.ecam_read32(bdf, 0x18), 0xfff0_000c);
    assert_eq!(rig.ecam_read32(bdf, 0x1c), u32::MAX);
    rig.ecam_write32(bdf, 0x18, rig.bars(bdf)[1].assigned as u32);
    rig.ecam_write32(bdf, 0x1c, (rig.bars(bdf)[1].assigned >> 32) as u32);
    let new = 0xd000_0000u64;
    rig.ecam_write32(bdf, 0x10, new as u32);
    rig.ecam_write(bdf, reg::COMMAND as u16, &command::MEMORY.to_le_bytes());
    assert_eq!(rig.bars(bdf)[0].live, Some(new));
    let mut buf = [0u8; 2];
    assert!(rig.mmio.read(old, &mut buf).is_err());
    rig.mmio.read(new + 2, &mut buf).unwrap();
    assert_eq!(buf, [0x02, 0x03]);

    // Moving a live BAR (decode on) relocates the range in place.
    let newer = 0xd010_0000u64;
    rig.ecam_write32(bdf, 0x10, newer as u32);
    assert_eq!(rig.bars(bdf)[0].live, Some(newer));
    assert!(rig.mmio.ranges().contains(&(newer, 0x1000)));
    assert!(!rig.mmio.ranges().iter().any(|r| r.0 == new));
    assert!(dev
        .lock()
        .unwrap()
        .moves
        .contains(&(0, Some(new), Some(newer))));

    // A guest address that collides with the ECAM window is not decoded.
    rig.ecam_write32(bdf, 0x10, ECAM_BASE as u32);
    assert_eq!(rig.bars(bdf)[0].live, None);
    rig.ecam_write32(bdf, 0x10, newer as u32);
    assert_eq!(rig.bars(bdf)[0].live, Some(newer));
}

#[test]
fn remove_frees_slot_bars_and_ranges() {
    let rig = Rig::new();
    let (dev, shared) = test_dev();
    let bdf = rig.add(shared, Some(4)).unwrap();
    let first = rig.bars(bdf);
    rig.ecam_write(
        bdf,
        reg::COMMAND as u16,
        &(command::MEMORY | command::IO).to_le_bytes(),
    );
    assert_eq!(rig.mmio.ranges().len(), 3);
    assert_eq!(rig.pio.ranges().len(), 2);
    rig.pci.lock().unwrap().remove_device(bdf).unwrap();
    assert!(dev.lock().unwrap().removed);
    assert_eq!(rig.mmio.ranges().len(), 1, "only ECAM remains");
    assert_eq!(rig.pio.ranges().len(), 1, "only 0xCF8 remains");
    assert_eq!(rig.ecam_read32(bdf, 0), u32::MAX);
    assert!(rig.pci.lock().unwrap().remove_device(bdf).is_err());
    // Slot and BAR space are reusable: the same addresses come back.
    let again = rig.add(test_dev().1, Some(4)).unwrap();
    assert_eq!(again, bdf);
    assert_eq!(rig.bars(again), first);
}

#[test]
fn io_bar_without_io_window_is_rejected() {
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let cfg = PciBusConfig {
        segment: 1,
        mmio32: MMIO32,
        mmio64: None,
        io: None,
    };
    let mut bus = PciBus::new(cfg, mmio, pio).unwrap();
    let err = bus.add_device(test_dev().1, None).unwrap_err();
    assert!(matches!(err, PciError::NoWindow { bar: 4, .. }), "{err}");
    // The failed add took no slot.
    assert_eq!(bus.devices().len(), 1);
}

#[test]
fn dropping_the_bus_releases_devices_despite_config_handlers() {
    let rig = Rig::new();
    let (dev, shared) = test_dev();
    rig.add(shared, None).unwrap();
    let device = Arc::downgrade(&dev);
    drop(dev);
    let Rig { pci, mmio, pio } = rig;
    // The ECAM and 0xCF8 handlers stay registered on buses that outlive the PCI bus: they
    // must not keep it (and its devices) alive.
    drop(pci);
    assert!(
        device.upgrade().is_none(),
        "the device outlived its PCI bus"
    );
    let mut b = [0u8; 4];
    mmio.read(ECAM_BASE, &mut b).unwrap();
    assert_eq!(b, [0xff; 4], "ECAM of a dropped bus reads all ones");
    pio.write(PCI_CONFIG_IO_PORT, &0x8000_0000u32.to_le_bytes())
        .unwrap();
    pio.read(PCI_CONFIG_IO_PORT + 4, &mut b).unwrap();
    assert_eq!(b, [0xff; 4], "0xCFC of a dropped bus reads all ones");
}
