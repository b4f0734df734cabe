//! The controller driven through a bus exactly as a guest's AML would drive it. The tests on
//! /dev/kvm (the window and GED interrupt on a real VM, a guest taking the interrupt) are in
//! `vmm/tests/hotplug.rs`.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{OnceLock, Weak};

use devices::bus::Bus;

use super::regs::{B0EJ, GDAT, PCID, PCIU, PSEG, REGS_LEN};
use super::*;

/// Counts triggers; fails them on demand.
#[derive(Default)]
struct FakeLine {
    count: AtomicUsize,
    fail: AtomicBool,
}

impl InterruptLine for FakeLine {
    fn trigger(&self) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EAGAIN));
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    hp: Arc<PciHotplug>,
    line: Arc<FakeLine>,
    ejected: Arc<Mutex<Vec<u8>>>,
    bus: Bus,
}

impl Rig {
    fn new() -> Self {
        let line = Arc::new(FakeLine::default());
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let log = ejected.clone();
        let hp = PciHotplug::new(
            line.clone(),
            Box::new(move |slot| log.lock().unwrap().push(slot)),
        );
        let bus = Bus::new();
        bus.insert(hp.bus_device(), PCI_HOTPLUG_START, PCI_HOTPLUG_SIZE)
            .unwrap();
        Self {
            hp,
            line,
            ejected,
            bus,
        }
    }

    fn read(&self, offset: u64) -> u32 {
        let mut b = [0xaau8; 4];
        self.bus.read(PCI_HOTPLUG_START + offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn write(&self, offset: u64, v: u32) {
        self.bus
            .write(PCI_HOTPLUG_START + offset, &v.to_le_bytes())
            .unwrap();
    }

    fn irqs(&self) -> usize {
        self.line.count.load(Ordering::SeqCst)
    }

    fn ejected(&self) -> Vec<u8> {
        std::mem::take(&mut *self.ejected.lock().unwrap())
    }
}

#[test]
fn notify_added_sets_pciu_and_raises_ged_once() {
    let r = Rig::new();
    r.hp.notify_added(3).unwrap();
    assert_eq!(r.irqs(), 1);
    assert_eq!(r.hp.pending(), (1 << 3, 0));
    // What _EVT then PCNT read: the GED event, then the bitmaps; each read clears.
    assert_eq!(r.read(GDAT), GED_EVENT_PCI_HOTPLUG);
    assert_eq!(r.read(GDAT), 0);
    assert_eq!(r.read(PCIU), 1 << 3);
    assert_eq!(r.read(PCIU), 0);
    assert_eq!(r.read(PCID), 0);
    // Two notifications before the guest scans: two interrupts, both slots in one read.
    r.hp.notify_added(1).unwrap();
    r.hp.notify_added(31).unwrap();
    assert_eq!(r.irqs(), 3);
    assert_eq!(r.read(PCIU), (1 << 1) | (1 << 31));
    assert!(r.ejected().is_empty());
}

#[test]
fn request_eject_sets_pcid_and_eject_reports_the_slot() {
    let r = Rig::new();
    r.hp.notify_added(4).unwrap();
    r.hp.request_eject(4).unwrap();
    r.hp.request_eject(9).unwrap();
    assert_eq!(r.irqs(), 3);
    // The later eject request replaced the pending add of slot 4.
    assert_eq!(r.read(PCIU), 0);
    assert_eq!(r.read(PCID), (1 << 4) | (1 << 9));
    assert_eq!(r.read(PCID), 0);
    assert!(r.ejected().is_empty(), "no eject before the guest's _EJ0");
    // _EJ0 of S09 through PCEJ: PSEG = 0, B0EJ = 1 << 9.
    r.write(PSEG, 0);
    r.write(B0EJ, 1 << 9);
    assert_eq!(r.ejected(), vec![9]);
    // B0EJ reads as 0 and does not raise interrupts.
    assert_eq!(r.read(B0EJ), 0);
    assert_eq!(r.irqs(), 3);
    // Several bits at once are reported in slot order.
    r.write(B0EJ, (1 << 30) | (1 << 2));
    assert_eq!(r.ejected(), vec![2, 30]);
}

#[test]
fn eject_clears_a_pending_request_for_that_slot() {
    let r = Rig::new();
    r.hp.request_eject(6).unwrap();
    r.hp.request_eject(7).unwrap();
    // The guest ejects slot 6 on its own before scanning.
    r.write(B0EJ, 1 << 6);
    assert_eq!(r.ejected(), vec![6]);
    assert_eq!(r.hp.pending(), (0, 1 << 7));
}

#[test]
fn eject_of_host_bridge_or_other_segment_is_ignored() {
    let r = Rig::new();
    r.write(B0EJ, 1);
    assert!(r.ejected().is_empty());
    r.write(PSEG, 1);
    assert_eq!(r.read(PSEG), 1);
    r.write(B0EJ, 1 << 5);
    assert!(r.ejected().is_empty(), "segment 1 does not exist");
    r.write(PSEG, 0);
    r.write(B0EJ, (1 << 5) | 1);
    assert_eq!(r.ejected(), vec![5]);
    assert!(r.hp.warn.count() >= 2);
}

#[test]
fn out_of_range_slots_are_rejected_without_interrupt() {
    let r = Rig::new();
    for slot in [0u8, 32, 200, u8::MAX] {
        assert!(matches!(
            r.hp.notify_added(slot),
            Err(HotplugError::InvalidSlot { slot: s }) if s == slot
        ));
        assert!(matches!(
            r.hp.request_eject(slot),
            Err(HotplugError::InvalidSlot { slot: s }) if s == slot
        ));
    }
    assert_eq!(r.irqs(), 0);
    assert_eq!(r.hp.pending(), (0, 0));
    assert_eq!(r.hp.ged().pending(), 0);
}

#[test]
fn odd_width_and_offset_accesses_are_ignored() {
    let r = Rig::new();
    r.hp.notify_added(8).unwrap();
    r.hp.request_eject(10).unwrap();
    let warned = r.hp.warn.count();
    // Byte, word and qword reads of PCIU, and a misaligned dword: no clearing, zero data.
    for (offset, len) in [
        (PCIU, 1),
        (PCIU, 2),
        (PCIU, 8),
        (PCIU + 1, 4),
        (PCID + 2, 2),
    ] {
        let mut b = vec![0xaau8; len];
        r.bus.read(PCI_HOTPLUG_START + offset, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "{offset:#x}/{len}: {b:?}");
    }
    assert_eq!(r.hp.pending(), (1 << 8, 1 << 10));
    // Reserved offsets in the window read 0.
    let mut off = REGS_LEN;
    while off < PCI_HOTPLUG_SIZE {
        assert_eq!(r.read(off), 0, "{off:#x}");
        off += 4;
    }
    // Odd-width writes to B0EJ and PSEG do nothing.
    r.bus.write(PCI_HOTPLUG_START + B0EJ, &[1 << 3]).unwrap();
    r.bus
        .write(PCI_HOTPLUG_START + B0EJ, &(1u64 << 3).to_le_bytes())
        .unwrap();
    r.bus.write(PCI_HOTPLUG_START + PSEG, &[1, 0]).unwrap();
    assert_eq!(r.read(PSEG), 0);
    assert!(r.ejected().is_empty());
    // Writes to the read-only registers are ignored.
    r.write(PCIU, 0);
    r.write(PCID, 0);
    r.write(GDAT, 0);
    assert_eq!(r.hp.pending(), (1 << 8, 1 << 10));
    assert_eq!(r.hp.ged().pending(), GED_EVENT_PCI_HOTPLUG);
    assert!(r.hp.warn.count() >= warned + 11);
    // Accesses crossing the end of the window never reach the device.
    let mut b = [0u8; 4];
    assert!(r
        .bus
        .read(PCI_HOTPLUG_START + PCI_HOTPLUG_SIZE - 2, &mut b)
        .is_err());
    assert_eq!(r.irqs(), 2);
}

#[test]
fn failed_interrupt_is_reported_and_keeps_the_bit() {
    let r = Rig::new();
    r.line.fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        r.hp.notify_added(12),
        Err(HotplugError::Interrupt { slot: 12, .. })
    ));
    r.line.fail.store(false, Ordering::SeqCst);
    // The next notification's interrupt makes the guest see both.
    r.hp.notify_added(13).unwrap();
    assert_eq!(r.irqs(), 1);
    assert_eq!(r.read(PCIU), (1 << 12) | (1 << 13));
}

#[test]
fn eject_callback_may_call_back_into_the_controller() {
    let line = Arc::new(FakeLine::default());
    let me: Arc<OnceLock<Weak<PciHotplug>>> = Arc::new(OnceLock::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (me2, seen2) = (me.clone(), seen.clone());
    let hp = PciHotplug::new(
        line.clone(),
        Box::new(move |slot| {
            let hp = me2.get().and_then(Weak::upgrade).unwrap();
            // E.g. the device manager re-plugging a new device into the freed slot.
            hp.notify_added(slot).unwrap();
            seen2.lock().unwrap().push((slot, hp.pending()));
        }),
    );
    me.set(Arc::downgrade(&hp)).unwrap();
    let dev = hp.bus_device();
    dev.lock()
        .unwrap()
        .write(PCI_HOTPLUG_START, B0EJ, &(1u32 << 17).to_le_bytes());
    assert_eq!(*seen.lock().unwrap(), vec![(17, (1 << 17, 0))]);
    assert_eq!(line.count.load(Ordering::SeqCst), 1);
}

/// splitmix64, for the seeded fuzz target below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the controller must do, written independently of it.
#[derive(Debug, Default, Clone, Copy)]
struct Model {
    up: u32,
    down: u32,
    segment: u32,
    ged: u32,
    irqs: usize,
}

/// The register window against a reference model: random slot notifications and eject
/// requests (valid and invalid slots) interleaved with guest accesses of every width and
/// alignment anywhere in the window (and across its end). Every read returns what the model
/// says, every eject callback is a slot the guest named in an aligned `B0EJ` write on
/// segment 0, and the pending bitmaps match after every step. Seeded (`FUZZ_SEED`), with a
/// fixed budget (`FUZZ_CASES`).
#[test]
fn fuzz_hotplug_registers() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0407_7e60);
    let cases: usize = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("fuzz_hotplug_registers: seed {seed} (replay with FUZZ_SEED={seed})");
    let mut master = Rng(seed);
    for case in 0..cases {
        let case_seed = master.next();
        let mut rng = Rng(case_seed);
        let rig = Rig::new();
        let mut m = Model::default();
        for step in 0..200 {
            let ctx = format!("case {case} (case seed {case_seed:#x}) step {step}");
            match rng.below(6) {
                0 | 1 => {
                    let slot = rng.below(40) as u8;
                    let add = rng.below(2) == 0;
                    let r = if add {
                        rig.hp.notify_added(slot)
                    } else {
                        rig.hp.request_eject(slot)
                    };
                    if (FIRST_SLOT..=LAST_SLOT).contains(&slot) {
                        assert!(r.is_ok(), "{ctx}");
                        let bit = 1u32 << slot;
                        if add {
                            m.up |= bit;
                            m.down &= !bit;
                        } else {
                            m.down |= bit;
                            m.up &= !bit;
                        }
                        m.ged |= GED_EVENT_PCI_HOTPLUG;
                        m.irqs += 1;
                    } else {
                        assert!(r.is_err(), "{ctx}: slot {slot} accepted");
                    }
                }
                2 | 3 => {
                    let len = [1usize, 2, 4, 4, 4, 8][rng.below(6) as usize];
                    let off = if rng.below(2) == 0 {
                        4 * rng.below(REGS_LEN / 4 + 1)
                    } else {
                        rng.below(PCI_HOTPLUG_SIZE + 4)
                    };
                    let mut b = vec![0xaau8; len];
                    if rig.bus.read(PCI_HOTPLUG_START + off, &mut b).is_err() {
                        assert!(off + len as u64 > PCI_HOTPLUG_SIZE, "{ctx}");
                        continue;
                    }
                    let want: u32 = if len != 4 || off % 4 != 0 {
                        0
                    } else {
                        match off {
                            PCIU => std::mem::take(&mut m.up),
                            PCID => std::mem::take(&mut m.down),
                            PSEG => m.segment,
                            GDAT => std::mem::take(&mut m.ged),
                            _ => 0,
                        }
                    };
                    let mut wb = vec![0u8; len];
                    if len == 4 {
                        wb.copy_from_slice(&want.to_le_bytes());
                    }
                    assert_eq!(b, wb, "{ctx}: read of {len} at {off:#x}");
                }
                _ => {
                    let len = [1usize, 2, 4, 4, 4, 8][rng.below(6) as usize];
                    let off = if rng.below(3) != 0 {
                        [B0EJ, PSEG, PCIU, GDAT][rng.below(4) as usize]
                    } else {
                        rng.below(PCI_HOTPLUG_SIZE + 4)
                    };
                    // Segment 0 most of the time, so ejects are reached.
                    let v: u32 = if off == PSEG && rng.below(3) != 0 {
                        0
                    } else {
                        rng.next() as u32
                    };
                    let mut b = vec![0u8; len];
                    for (i, x) in b.iter_mut().enumerate() {
                        *x = v.to_le_bytes().get(i).copied().unwrap_or(0);
                    }
                    if rig.bus.write(PCI_HOTPLUG_START + off, &b).is_err() {
                        assert!(off + len as u64 > PCI_HOTPLUG_SIZE, "{ctx}");
                        continue;
                    }
                    let mut want_ejects = Vec::new();
                    if len == 4 && off % 4 == 0 {
                        match off {
                            B0EJ if m.segment == 0 => {
                                let slots = v & !1;
                                m.up &= !slots;
                                m.down &= !slots;
                                want_ejects =
                                    (1..=31u8).filter(|s| slots & (1 << s) != 0).collect();
                            }
                            PSEG => m.segment = v,
                            _ => {}
                        }
                    }
                    assert_eq!(rig.ejected(), want_ejects, "{ctx}: ejects of {v:#x}");
                }
            }
            assert_eq!(rig.hp.pending(), (m.up, m.down), "{ctx}: pending bitmaps");
            assert_eq!(rig.hp.ged().pending(), m.ged, "{ctx}: GED events");
            assert_eq!(rig.irqs(), m.irqs, "{ctx}: GED interrupts");
        }
    }
}
