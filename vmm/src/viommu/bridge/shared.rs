//! One host PASID per guest PASID, VM-wide: ENQCMD's translation is the CPU's, so a guest
//! PASID must mean the same host PASID whichever device a descriptor goes to.
//!
//! The first device that binds a guest PASID allocates its host PASID in the VM's
//! [`PasidSpace`](ioasid::PasidSpace) under its own key (what `vm.pasids` lists) and records
//! it in the VM's [`VmPasidTable`](crate::enqcmd::VmPasidTable); the next devices share it
//! (one more user there, no second allocation). The translation goes with its last user.
//! When the device whose key holds the allocation lets go while others still use the guest
//! PASID, the allocation moves to one of them, make before break: a new host PASID is bound
//! under its key, every remaining user is attached with it to the same host object and then
//! detached from the old one, the table is pointed at the new one, and only then is the old
//! host PASID freed. (The allocator cannot re-key an allocation, and a freed host PASID
//! still in use could be handed to another guest PASID.)

use devices::pci::PciBdf;
use devices::viommu::BridgeError;
use ioasid::{DevId, IommuBackend, Pasid, PasidError, PtId};
use log::warn;

use super::{Binding, Device, Path, State, VtdBridge};
use crate::enqcmd::Release;

/// The checks the PASID space makes on a binding, for a device that shares a host PASID
/// another device allocated.
fn check_width(dev: DevId, pasid: Pasid, bits: u8) -> Result<(), PasidError> {
    if bits == 0 {
        return Err(PasidError::NoPasid { dev, pasid });
    }
    if pasid.0 == 0 {
        return Err(PasidError::Reserved { pasid });
    }
    if bits < 32 && pasid.0 >> bits != 0 {
        return Err(PasidError::TooWide { dev, pasid, bits });
    }
    Ok(())
}

impl VtdBridge {
    /// The host object `b` attaches a PASID of `d` to.
    fn host_pt(&self, st: &State, d: &Device, b: Binding) -> Option<PtId> {
        match b {
            Binding::Shadow { id, .. } => st.shadows.get(&id).map(|s| PtId::Ioas(s.ioas)),
            Binding::Nested { hwpt, .. } | Binding::Soft { hwpt, .. } => Some(PtId::Hwpt(hwpt)),
            Binding::PassThrough => Some(PtId::Ioas(match &d.path {
                Path::Assigned { .. } => self.ram_ioas,
                Path::Emulated { ram_ioas, .. } => *ram_ioas,
            })),
            Binding::Blocked => None,
        }
    }

    /// The host PASID for guest `pasid` of `bdf`: the one the VM already has for it
    /// (shared), or a new one; recorded in the device's map.
    pub(super) fn acquire_host_pasid(
        &self,
        st: &State,
        bdf: PciBdf,
        pasid: Pasid,
    ) -> Result<Pasid, BridgeError> {
        let Some(d) = st.devices.get(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let (user, bits) = (d.space_id(), d.pasid_bits);
        let refuse = |reason: String| BridgeError::Unsupported { bdf, pasid, reason };
        check_width(user, pasid, bits).map_err(|e| refuse(e.to_string()))?;
        let host = match self.pasid_table.share(pasid.0, user.0) {
            Some(h) => Pasid(h),
            None => {
                let mut space = self.lock_pasids();
                let h = space
                    .bind(user, pasid, bits)
                    .map_err(|e| refuse(e.to_string()))?;
                if let Err(e) = self.pasid_table.insert(pasid.0, h.0, user.0) {
                    let _ = space.unbind(user, pasid);
                    return Err(refuse(e.to_string()));
                }
                h
            }
        };
        d.host_pasids.insert(pasid, host);
        Ok(host)
    }

    /// The device keyed `user` in the PASID space lets go of guest `pasid` (its host PASID
    /// already detached and out of its map).
    pub(super) fn release_host_pasid(&self, st: &mut State, user: DevId, pasid: Pasid) {
        match self.pasid_table.release(pasid.0, user.0) {
            Release::NotUsed => {}
            Release::Last { .. } => {
                if let Err(e) = self.lock_pasids().unbind(user, pasid) {
                    warn!("vIOMMU: guest {pasid} of device {}: {e}", user.0);
                }
            }
            Release::Shared { host, users } => {
                let owner = self.lock_pasids().translate(user, pasid) == Some(Pasid(host));
                if owner {
                    self.move_allocation(st, user, pasid, Pasid(host), &users);
                }
            }
        }
    }

    /// Moves the allocation of guest `pasid` (host `old`, held under `from`'s key) to the
    /// first of `users` (see the module documentation).
    fn move_allocation(
        &self,
        st: &mut State,
        from: DevId,
        pasid: Pasid,
        old: Pasid,
        users: &[u32],
    ) {
        let remaining: Vec<PciBdf> = users
            .iter()
            .filter_map(|u| {
                st.devices
                    .iter()
                    .find(|(_, d)| d.space_id().0 == *u)
                    .map(|(b, _)| *b)
            })
            .collect();
        let Some(first) = remaining.first().and_then(|b| st.devices.get(b)) else {
            warn!("vIOMMU: guest {pasid}: users {users:?} are gone; host PASID {old:?} freed");
            let _ = self.lock_pasids().unbind(from, pasid);
            return;
        };
        let new = match self
            .lock_pasids()
            .bind(first.space_id(), pasid, first.pasid_bits)
        {
            Ok(h) => h,
            Err(e) => {
                // The allocation stays under the departed device's key rather than free a
                // host PASID still in use.
                warn!(
                    "vIOMMU: guest {pasid}: cannot move host PASID {old:?} off device {}: {e}",
                    from.0
                );
                st.counters.host_errors += 1;
                return;
            }
        };
        let mut moved_all = true;
        for bdf in &remaining {
            let Some(d) = st.devices.get(bdf) else {
                continue;
            };
            let b = d.bindings.get(&pasid).copied().unwrap_or(Binding::Blocked);
            let backend: &dyn IommuBackend = match &d.path {
                Path::Assigned { .. } => &*self.backend,
                Path::Emulated { soft, .. } => &**soft,
            };
            let r = match self.host_pt(st, d, b) {
                Some(pt) => backend
                    .attach(d.dev, Some(new), pt)
                    .and_then(|()| backend.detach(d.dev, Some(old))),
                None => Ok(()),
            };
            match r {
                Ok(()) => d.host_pasids.insert(pasid, new),
                Err(e) => {
                    warn!("vIOMMU {bdf} {pasid}: moving to host PASID {new:?}: {e}");
                    moved_all = false;
                }
            }
        }
        if !moved_all {
            st.counters.host_errors += 1;
        }
        if let Err(e) = self.pasid_table.rehost(pasid.0, new.0) {
            warn!("vIOMMU: guest {pasid}: {e}");
        }
        if moved_all {
            let _ = self.lock_pasids().unbind(from, pasid);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;

    use devices::cpu_pasid::PasidTranslate;
    use devices::viommu::{DmaView, Translation, ViommuBridge};
    use ioasid::soft::{SoftConfig, SoftIommu};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::device_manager::dma::{map_ram, RamMapMode};
    use crate::memory::{GuestRam, RamConfig};

    #[test]
    fn guest_pasid_shares_one_host_pasid_across_devices() {
        let ram = GuestRam::new(RamConfig {
            size: 4 << 20,
            hugepages: false,
        })
        .unwrap();
        ram.memory()
            .write_slice(&[0x5a; 4], GuestAddress(0x1000))
            .unwrap();
        let soft =
            Arc::new(SoftIommu::from_guest_memory(ram.memory(), SoftConfig::default()).unwrap());
        let ioas = soft.ioas_alloc().unwrap();
        map_ram(&*soft, ioas, ram.regions(), RamMapMode::ByAddress).unwrap();
        let backend: Arc<dyn IommuBackend> = soft.clone();
        let bridge = VtdBridge::new(backend, ioas, ram.regions().to_vec());
        let table = bridge.pasid_table().clone();
        let (a, b, c): (PciBdf, PciBdf, PciBdf) = (
            "00:04.0".parse().unwrap(),
            "00:05.0".parse().unwrap(),
            "00:06.0".parse().unwrap(),
        );
        let mut views = Vec::new();
        for bdf in [a, b, c] {
            let dev = soft.register_device(&bdf.to_string()).unwrap();
            views.push(bridge.add_emulated(bdf, soft.clone(), dev).unwrap());
        }
        let read = |v: &Arc<dyn DmaView>| {
            let mut buf = [0u8; 4];
            v.read(Some(Pasid(5)), 0x1000, &mut buf).map(|()| buf)
        };
        for bdf in [a, b] {
            bridge
                .set_translation(bdf, Pasid(5), Translation::PassThrough)
                .unwrap();
        }
        // One host PASID for both, one allocation (under the first device's key).
        let host = table.host_pasid(5).unwrap();
        let pairs: Vec<_> = bridge.pasids().iter().map(|v| (v.bdf, v.host.0)).collect();
        assert_eq!(pairs, vec![(a, host), (b, host)]);
        assert_eq!(bridge.pasid_space().lock().unwrap().bindings().len(), 1);
        assert_eq!(table.entries()[0].users.len(), 2);
        assert_eq!(read(&views[0]).unwrap(), [0x5a; 4]);
        assert_eq!(read(&views[1]).unwrap(), [0x5a; 4]);
        assert!(read(&views[2]).is_err(), "device c never bound PASID 5");

        // The allocating device goes: the other keeps guest PASID 5, on a new host PASID
        // now allocated under its own key; the old one is detached from it.
        bridge.remove(a).unwrap();
        let moved = table.host_pasid(5).unwrap();
        assert_ne!(moved, host);
        let bindings = bridge.pasid_space().lock().unwrap().bindings();
        assert_eq!(bindings.len(), 1);
        assert_eq!(
            (bindings[0].guest, bindings[0].host),
            (Pasid(5), Pasid(moved))
        );
        assert_eq!(bridge.pasids()[0].host, Pasid(moved));
        assert_eq!(read(&views[1]).unwrap(), [0x5a; 4]);
        let mut buf = [0u8; 4];
        let b_dev = DevId(bindings[0].dev.0 & !super::super::EMULATED_SPACE_TAG);
        assert!(
            soft.dma_read(
                b_dev,
                Some(Pasid(host)),
                0x1000,
                &mut buf,
                Default::default()
            )
            .is_err(),
            "the old host PASID is detached"
        );

        // A third device shares the moved one; the last user takes the translation away.
        bridge
            .set_translation(c, Pasid(5), Translation::PassThrough)
            .unwrap();
        assert_eq!(bridge.pasids()[1].host, Pasid(moved));
        // b (holding the allocation now) lets go: it moves again, to c.
        bridge
            .set_translation(b, Pasid(5), Translation::Blocked)
            .unwrap();
        let again = table.host_pasid(5).unwrap();
        assert_ne!(again, moved);
        assert_eq!(bridge.pasids()[0].host, Pasid(again));
        assert_eq!(bridge.pasid_space().lock().unwrap().bindings().len(), 1);
        assert_eq!(read(&views[2]).unwrap(), [0x5a; 4]);
        assert!(read(&views[1]).is_err(), "b blocked PASID 5");
        bridge.remove(c).unwrap();
        assert_eq!(table.host_pasid(5), None);
        assert!(table.entries().is_empty());
        assert!(bridge.pasid_space().lock().unwrap().bindings().is_empty());
    }
}
