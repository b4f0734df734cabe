//! The per-VM PASID space: guest PASIDs mapped to host PASIDs.
//!
//! A guest programs its own PASIDs (gPASID) into devices and page tables; the host has its
//! own space (hPASID). ENQCMD carries the PASID from the CPU's IA32_PASID, which the guest
//! owns, so KVM would have to translate gPASID -> hPASID (the RFC's `KVM_MAP_PASID`, never
//! merged). This table is that translation's source of truth: the device manager fills it,
//! introspection shows it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_allocator::IdAllocator;

use crate::types::{DevId, Pasid};

/// Errors of the PASID space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PasidError {
    /// The guest PASID does not fit the device's PASID width.
    #[error("{pasid} of device {} is wider than its {bits}-bit PASID capability", dev.0)]
    TooWide {
        /// The device.
        dev: DevId,
        /// The guest PASID.
        pasid: Pasid,
        /// The device's width.
        bits: u8,
    },
    /// The device has no PASID support at all.
    #[error("device {} has no PASID support (max_pasid_bits = 0); guest {pasid} refused", dev.0)]
    NoPasid {
        /// The device.
        dev: DevId,
        /// The guest PASID.
        pasid: Pasid,
    },
    /// The guest PASID is already bound for this device.
    #[error("guest {pasid} of device {} is already bound (to host PASID {host:#x})", dev.0)]
    InUse {
        /// The device.
        dev: DevId,
        /// The guest PASID.
        pasid: Pasid,
        /// The host PASID it maps to.
        host: u32,
    },
    /// Nothing is bound there.
    #[error("guest {pasid} of device {} is not bound", dev.0)]
    NotBound {
        /// The device.
        dev: DevId,
        /// The guest PASID.
        pasid: Pasid,
    },
    /// The host space is exhausted.
    #[error("no host PASID left for guest {pasid}")]
    Exhausted {
        /// The guest PASID.
        pasid: Pasid,
    },
    /// PASID 0 is reserved (RID_PASID, the device's requests without a PASID).
    #[error("{pasid} is reserved (PASID 0 is the request-without-PASID context)")]
    Reserved {
        /// The guest PASID.
        pasid: Pasid,
    },
}

/// One binding, for introspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasidBinding {
    /// The device.
    pub dev: DevId,
    /// The guest PASID.
    pub guest: Pasid,
    /// The host PASID.
    pub host: Pasid,
}

/// A VM's PASID space.
#[derive(Debug)]
pub struct PasidSpace {
    host: IdAllocator,
    map: BTreeMap<(DevId, Pasid), Pasid>,
}

impl PasidSpace {
    /// A space handing out host PASIDs in `[first, last]` (e.g. 1..=2^20-1).
    pub fn new(first: u32, last: u32) -> Option<Self> {
        Some(PasidSpace {
            host: IdAllocator::new(first, last).ok()?,
            map: BTreeMap::new(),
        })
    }

    /// Binds guest `pasid` of `dev` (whose PASID width is `max_pasid_bits`) to a new host
    /// PASID.
    pub fn bind(
        &mut self,
        dev: DevId,
        pasid: Pasid,
        max_pasid_bits: u8,
    ) -> Result<Pasid, PasidError> {
        if max_pasid_bits == 0 {
            return Err(PasidError::NoPasid { dev, pasid });
        }
        if pasid.0 == 0 {
            return Err(PasidError::Reserved { pasid });
        }
        if max_pasid_bits < 32 && pasid.0 >> max_pasid_bits != 0 {
            return Err(PasidError::TooWide {
                dev,
                pasid,
                bits: max_pasid_bits,
            });
        }
        if let Some(h) = self.map.get(&(dev, pasid)) {
            return Err(PasidError::InUse {
                dev,
                pasid,
                host: h.0,
            });
        }
        let host = self
            .host
            .allocate_id()
            .map_err(|_| PasidError::Exhausted { pasid })?;
        self.map.insert((dev, pasid), Pasid(host));
        Ok(Pasid(host))
    }

    /// Releases a binding and its host PASID.
    pub fn unbind(&mut self, dev: DevId, pasid: Pasid) -> Result<Pasid, PasidError> {
        let host = self
            .map
            .remove(&(dev, pasid))
            .ok_or(PasidError::NotBound { dev, pasid })?;
        // The id came from this allocator, so freeing it cannot fail; ignore the impossible.
        let _ = self.host.free_id(host.0);
        Ok(host)
    }

    /// The host PASID for a guest PASID (what KVM would use for ENQCMD translation).
    pub fn translate(&self, dev: DevId, pasid: Pasid) -> Option<Pasid> {
        self.map.get(&(dev, pasid)).copied()
    }

    /// Every binding, ordered by device and guest PASID.
    pub fn bindings(&self) -> Vec<PasidBinding> {
        self.map
            .iter()
            .map(|(&(dev, guest), &host)| PasidBinding { dev, guest, host })
            .collect()
    }

    /// Releases every binding of a device (on removal).
    pub fn release_device(&mut self, dev: DevId) -> usize {
        let keys: Vec<(DevId, Pasid)> = self
            .map
            .keys()
            .filter(|(d, _)| *d == dev)
            .copied()
            .collect();
        for (d, p) in &keys {
            let _ = self.unbind(*d, *p);
        }
        keys.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn binds_translates_and_refuses_misuse() {
        let mut s = PasidSpace::new(1, (1 << 20) - 1).unwrap();
        let d = DevId(3);
        let h = s.bind(d, Pasid(5), 20).unwrap();
        assert_eq!(s.translate(d, Pasid(5)), Some(h));
        assert_eq!(s.translate(DevId(4), Pasid(5)), None);
        assert!(matches!(
            s.bind(d, Pasid(5), 20),
            Err(PasidError::InUse { .. })
        ));
        // Another device may use the same guest PASID; it gets another host PASID.
        let h2 = s.bind(DevId(4), Pasid(5), 20).unwrap();
        assert_ne!(h, h2);
        assert!(matches!(
            s.bind(d, Pasid(1 << 8), 8),
            Err(PasidError::TooWide { bits: 8, .. })
        ));
        assert!(s.bind(d, Pasid((1 << 8) - 1), 8).is_ok());
        assert!(matches!(
            s.bind(d, Pasid(7), 0),
            Err(PasidError::NoPasid { .. })
        ));
        assert!(matches!(
            s.bind(d, Pasid(0), 20),
            Err(PasidError::Reserved { .. })
        ));
        assert_eq!(s.unbind(d, Pasid(5)).unwrap(), h);
        assert!(matches!(
            s.unbind(d, Pasid(5)),
            Err(PasidError::NotBound { .. })
        ));
        assert_eq!(s.release_device(DevId(4)), 1);
        assert_eq!(s.bindings().len(), 1);
    }

    #[test]
    fn host_space_exhaustion_and_reuse() {
        let mut s = PasidSpace::new(1, 2).unwrap();
        let d = DevId(1);
        s.bind(d, Pasid(10), 20).unwrap();
        s.bind(d, Pasid(11), 20).unwrap();
        assert!(matches!(
            s.bind(d, Pasid(12), 20),
            Err(PasidError::Exhausted { .. })
        ));
        s.unbind(d, Pasid(10)).unwrap();
        assert!(s.bind(d, Pasid(12), 20).is_ok());
    }
}
