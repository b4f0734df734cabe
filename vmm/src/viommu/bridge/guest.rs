//! The guest's calls: [`ViommuBridge`] for [`VtdBridge`]. A translation change binds the new
//! state before releasing the old; an invalidation batch becomes at most one resync per shadow
//! domain and one `HWPT_INVALIDATE` per nested HWPT.

use std::collections::BTreeMap;
use std::sync::Arc;

use devices::pci::PciBdf;
use devices::viommu::{
    BridgeError, BridgeMode, DomainScope, GuestInvalidation, GuestPageResponse, Translation,
    ViommuBridge,
};
use ioasid::{Invalidation, IommuBackend, Pasid};
use log::{debug, warn};

use super::super::nested::{compact, host_invalidations, HostFormat};
use super::{Binding, DevTlbHook, Path, VtdBridge};

/// What a guest IOTLB invalidation asks of a shadow domain: a range, or everything.
fn shadow_range(inv: &Invalidation) -> Option<(u64, u64)> {
    match *inv {
        Invalidation::Range { addr, npages, .. } if npages != u64::MAX => {
            let bytes = npages.checked_mul(4096)?;
            Some((addr & !0xfff, addr.checked_add(bytes.checked_sub(1)?)?))
        }
        _ => None,
    }
}

/// The PASID an invalidation is restricted to, if any.
fn pasid_filter(inv: &Invalidation) -> Option<Pasid> {
    match *inv {
        Invalidation::Pasid(p) => Some(p),
        Invalidation::Range { pasid, .. } => pasid,
        _ => None,
    }
}

/// A device-TLB invalidation for an emulated device's hook: (hook, PASID, address, pages).
type DevTlbCall = (Arc<dyn DevTlbHook>, Option<Pasid>, u64, u64);

/// A shadow domain's work for one doorbell.
enum Plan {
    Full,
    Ranges(Vec<(u64, u64)>),
}

impl ViommuBridge for VtdBridge {
    fn set_translation(
        &self,
        bdf: PciBdf,
        pasid: Pasid,
        t: Translation,
    ) -> Result<BridgeMode, BridgeError> {
        let mut st = self.lock();
        let Some(d) = st.devices.get(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let old = d.bindings.get(&pasid).copied().unwrap_or(Binding::Blocked);
        let mut hp = d.host_pasid(pasid);
        let mut fresh = false;
        if pasid.0 != 0 && hp.is_none() && t != Translation::Blocked {
            // A new guest PASID for this device: the VM's host PASID for it, shared with the
            // other devices that have it, or a new one (refuses one wider than the device's
            // PASID capability).
            hp = Some(self.acquire_host_pasid(&st, bdf, pasid)?);
            fresh = true;
        }
        if t == Translation::Blocked {
            // Torn down: what the device still waits for is answered first, while the
            // group is still pending on the host (the kernel answers a detached PASID's
            // pending faults itself, and refuses ours after that).
            let st = &mut *st;
            if let Some(h) = st.devices.get_mut(&bdf).and_then(|d| d.fault.as_mut()) {
                let which = Some(Some(pasid).filter(|p| p.0 != 0));
                st.prq.answer_device(h, bdf, which, &mut st.counters);
            }
        }
        let new = match self.bind(&mut st, bdf, pasid, hp, t, old) {
            Ok(b) => b,
            Err(e) => {
                if fresh {
                    self.unbind_pasid(&mut st, bdf, pasid);
                }
                return Err(e);
            }
        };
        debug!(
            "vIOMMU {bdf} {pasid}: {t:?} -> {:?} (host {hp:?})",
            new.mode()
        );
        if new != old {
            let backend: Arc<dyn IommuBackend> = match st.devices.get(&bdf).map(|d| &d.path) {
                Some(Path::Emulated { soft, .. }) => soft.clone(),
                _ => self.backend.clone(),
            };
            self.release(&mut st, &*backend, bdf, pasid, old, None);
        }
        if new == Binding::Blocked && pasid.0 != 0 {
            // A PASID other than 0 gives its host PASID back.
            self.unbind_pasid(&mut st, bdf, pasid);
        }
        if let Some(d) = st.devices.get_mut(&bdf) {
            d.bindings.insert(pasid, new);
        }
        Ok(new.mode())
    }

    fn invalidate(&self, batch: &[GuestInvalidation]) -> Result<(), BridgeError> {
        let mut st = self.lock();
        st.counters.doorbells += 1;
        st.counters.guest_invalidations += batch.len() as u64;
        let mut plans: BTreeMap<u64, Plan> = BTreeMap::new();
        let mut hwpt_batches: BTreeMap<(PciBdf, Pasid), Vec<Invalidation>> = BTreeMap::new();
        let mut devtlb: Vec<DevTlbCall> = Vec::new();
        for gi in batch {
            let (scope, inv) = match gi {
                GuestInvalidation::Iotlb { scope, inv } => (scope, inv),
                GuestInvalidation::DeviceTlb {
                    bdf,
                    pasid,
                    addr,
                    npages,
                } => {
                    // Assigned: the host's own unmap and HWPT invalidation flush the
                    // device's ATC. Emulated with ATS: its hook drops its cached
                    // translations.
                    if let Some(h) = st.devices.get(bdf).and_then(|d| d.devtlb.clone()) {
                        devtlb.push((h, *pasid, *addr, *npages));
                    }
                    continue;
                }
            };
            let filter = pasid_filter(inv);
            for (bdf, d) in &st.devices {
                let format = match &d.path {
                    Path::Assigned { format, .. } => *format,
                    Path::Emulated { .. } => HostFormat::VtdS1,
                };
                for (pasid, b) in &d.bindings {
                    let Some(did) = b.did() else { continue };
                    let in_scope = match scope {
                        DomainScope::All => true,
                        DomainScope::Domain(x) => *x == did,
                    };
                    if !in_scope || filter.is_some_and(|p| p != *pasid) {
                        continue;
                    }
                    match *b {
                        Binding::Shadow { id, .. } => {
                            let plan = plans.entry(id).or_insert(Plan::Ranges(Vec::new()));
                            match (shadow_range(inv), &mut *plan) {
                                (Some(r), Plan::Ranges(v)) => v.push(r),
                                (Some(_), Plan::Full) => {}
                                (None, _) => *plan = Plan::Full,
                            }
                        }
                        Binding::Nested { .. } | Binding::Soft { .. } => hwpt_batches
                            .entry((*bdf, *pasid))
                            .or_default()
                            .extend(host_invalidations(format, inv)),
                        Binding::Blocked | Binding::PassThrough => {}
                    }
                }
            }
        }
        let mut first_err: Option<BridgeError> = None;
        let ctx = self.sync_ctx();
        for (id, plan) in plans {
            let Some(s) = st.shadows.get_mut(&id) else {
                continue;
            };
            let ranges = match plan {
                Plan::Full => None,
                Plan::Ranges(v) => Some(v),
            };
            let rep = s.resync(&ctx, ranges);
            let did = s.did;
            self.account(&mut st, did, &rep);
        }
        for ((bdf, pasid), entries) in hwpt_batches {
            let entries = compact(entries);
            let Some(d) = st.devices.get(&bdf) else {
                continue;
            };
            let Some(hwpt) = d.bindings.get(&pasid).and_then(Binding::hwpt) else {
                continue;
            };
            if entries.is_empty() {
                continue;
            }
            let r = match &d.path {
                Path::Assigned { .. } => self.backend.hwpt_invalidate(hwpt, &entries),
                Path::Emulated { soft, .. } => soft.hwpt_invalidate(hwpt, &entries),
            };
            st.counters.host_invalidation_calls += 1;
            if let Err(e) = r {
                st.counters.host_errors += 1;
                warn!("vIOMMU {bdf} {pasid}: {e}");
                first_err.get_or_insert(BridgeError::Host { bdf, source: e });
            }
        }
        st.counters.devtlb_forwarded += devtlb.len() as u64;
        drop(st);
        // Outside the bridge's lock: the hook is the device model's.
        for (h, pasid, addr, npages) in devtlb {
            h.invalidate(pasid, addr, npages);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn page_response(&self, resp: GuestPageResponse) -> Result<(), BridgeError> {
        if !self.lock().devices.contains_key(&resp.bdf) {
            return Err(BridgeError::NoDevice { bdf: resp.bdf });
        }
        self.answer_guest(resp);
        Ok(())
    }
}

impl VtdBridge {
    /// `bdf` lets go of guest `pasid`: out of its map, and out of the VM's translation when
    /// it was the last device with it.
    fn unbind_pasid(&self, st: &mut super::State, bdf: PciBdf, pasid: Pasid) {
        let Some(d) = st.devices.get(&bdf) else {
            return;
        };
        let user = d.space_id();
        if d.host_pasids.remove(pasid).is_some() {
            self.release_host_pasid(st, user, pasid);
        }
    }
}
