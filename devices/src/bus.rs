//! Address-range dispatch for MMIO and port I/O.
//!
//! A [`Bus`] maps non-overlapping `[base, base + len)` ranges to devices. A vCPU exit handler
//! calls [`Bus::read`] / [`Bus::write`] with the guest address; tests call the same entry
//! points, so a test drives a device exactly as a guest would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

/// A device that answers reads and writes in one or more bus ranges.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset` into the range that starts at `base`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset` into the range that starts at `base`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A shared, lockable bus device.
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus registration and dispatch.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error("Bus range {base:#x}+{len:#x} overlaps the range {other_base:#x}+{other_len:#x}")]
    Overlap {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
        /// Base of the registered range it overlaps.
        other_base: u64,
        /// Length of the registered range it overlaps.
        other_len: u64,
    },
    /// A zero-length range, or one that wraps around the address space.
    #[error("Bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// No device is registered at this address (or the access crosses the end of a range).
    #[error("No device at bus address {addr:#x} (access of {len} bytes)")]
    NoDevice {
        /// The guest address of the access.
        addr: u64,
        /// The access size.
        len: usize,
    },
    /// No range starts at this base.
    #[error("No bus range starts at {base:#x}")]
    NotRegistered {
        /// The base that was looked up.
        base: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedBusDevice,
}

/// A bus: MMIO or PIO ranges mapped to devices.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = match self.ranges.read() {
            Ok(r) => r.iter().map(|(b, e)| (*b, e.len)).collect(),
            Err(_) => Vec::new(),
        };
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        // A poisoned lock only means another thread panicked while holding it; the map
        // itself is always left consistent (every mutation is a single insert/remove).
        self.ranges.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.ranges.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(&self, device: SharedBusDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let mut map = self.write_map();
        let last = base + (len - 1);
        // The closest range starting at or before `last` is the only one that can overlap.
        if let Some((&b, e)) = map.range(..=last).next_back() {
            if b + (e.len - 1) >= base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base: b,
                    other_len: e.len,
                });
            }
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the range that starts at `base`, returning its device.
    pub fn remove(&self, base: u64) -> Result<SharedBusDevice, BusError> {
        self.write_map()
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotRegistered { base })
    }

    /// Moves the range at `old_base` to `new_base` (a guest reprogramming a BAR).
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut map = self.write_map();
        let entry = map
            .remove(&old_base)
            .ok_or(BusError::NotRegistered { base: old_base })?;
        let len = entry.len;
        let device = entry.device.clone();
        drop(map);
        if let Err(e) = self.insert(device, new_base, len) {
            // Put the old range back so nothing is lost.
            self.write_map().insert(old_base, entry);
            return Err(e);
        }
        Ok(())
    }

    /// The device, its base and the offset for an access of `len` bytes at `addr`.
    pub fn resolve(&self, addr: u64, len: usize) -> Option<(SharedBusDevice, u64, u64)> {
        let map = self.read_map();
        let (&base, e) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(len as u64)?;
        if end > e.len {
            return None;
        }
        Some((e.device.clone(), base, offset))
    }

    /// Dispatches a read. Unclaimed addresses give [`BusError::NoDevice`].
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (dev, base, offset) = self.resolve(addr, data.len()).ok_or(BusError::NoDevice {
            addr,
            len: data.len(),
        })?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(base, offset, data);
        Ok(())
    }

    /// Dispatches a write. Unclaimed addresses give [`BusError::NoDevice`].
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (dev, base, offset) = self.resolve(addr, data.len()).ok_or(BusError::NoDevice {
            addr,
            len: data.len(),
        })?;
        dev.lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(base, offset, data);
        Ok(())
    }

    /// The registered ranges as `(base, len)`, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.read_map().iter().map(|(b, e)| (*b, e.len)).collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    struct Reg {
        last: Vec<(u64, u64, Vec<u8>)>,
    }
    impl BusDevice for Reg {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last.push((base, offset, data.to_vec()));
        }
    }

    fn dev() -> Arc<Mutex<Reg>> {
        Arc::new(Mutex::new(Reg { last: Vec::new() }))
    }

    #[test]
    fn dispatch_by_range() {
        let bus = Bus::new();
        let a = dev();
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        let mut buf = [0u8; 4];
        bus.read(0x1010, &mut buf).unwrap();
        assert_eq!(buf, [0x10, 0x11, 0x12, 0x13]);
        bus.write(0x10ff, &[7]).unwrap();
        assert_eq!(a.lock().unwrap().last, vec![(0x1000, 0xff, vec![7])]);
        // Crossing the end of the range, or below it, is unclaimed.
        assert!(matches!(
            bus.read(0x10fe, &mut buf),
            Err(BusError::NoDevice { addr: 0x10fe, .. })
        ));
        assert!(bus.read(0xfff, &mut buf[..1]).is_err());
    }

    #[test]
    fn overlap_and_invalid_rejected() {
        let bus = Bus::new();
        bus.insert(dev(), 0x1000, 0x100).unwrap();
        assert!(matches!(
            bus.insert(dev(), 0x10ff, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 0xf00, 0x101),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(dev(), 0x1100, 1).unwrap();
        bus.insert(dev(), 0xf00, 0x100).unwrap();
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev(), 5, 0),
            Err(BusError::InvalidRange { .. })
        ));
    }

    #[test]
    fn relocate_keeps_device_and_restores_on_conflict() {
        let bus = Bus::new();
        let a = dev();
        bus.insert(a.clone(), 0x1000, 0x100).unwrap();
        bus.insert(dev(), 0x3000, 0x100).unwrap();
        bus.relocate(0x1000, 0x2000).unwrap();
        bus.write(0x2004, &[1]).unwrap();
        assert_eq!(a.lock().unwrap().last[0].0, 0x2000);
        assert!(bus.relocate(0x2000, 0x2f80).is_err());
        assert_eq!(bus.ranges(), vec![(0x2000, 0x100), (0x3000, 0x100)]);
        assert!(bus.remove(0x1000).is_err());
        bus.remove(0x2000).unwrap();
        assert_eq!(bus.ranges(), vec![(0x3000, 0x100)]);
    }
}
