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
use super::{Binding, Path, VtdBridge};

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
        let new = self.bind(&mut st, bdf, pasid, t, old)?;
        debug!("vIOMMU {bdf} {pasid}: {t:?} -> {:?}", new.mode());
        if new != old {
            let backend: Arc<dyn IommuBackend> = match st.devices.get(&bdf).map(|d| &d.path) {
                Some(Path::Emulated { soft, .. }) => soft.clone(),
                _ => self.backend.clone(),
            };
            self.release(&mut st, &*backend, bdf, pasid, old, None);
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
        for gi in batch {
            let GuestInvalidation::Iotlb { scope, inv } = gi else {
                // Device-TLB: the host's own unmap and HWPT invalidation flush the device's
                // ATC; the soft backend has none.
                continue;
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
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn page_response(&self, resp: GuestPageResponse) -> Result<(), BridgeError> {
        let st = self.lock();
        if !st.devices.contains_key(&resp.bdf) {
            return Err(BridgeError::NoDevice { bdf: resp.bdf });
        }
        Err(BridgeError::Unsupported {
            bdf: resp.bdf,
            pasid: resp.pasid.unwrap_or(Pasid(0)),
            reason: "page requests are not bridged yet (the vSVA issue)".to_string(),
        })
    }
}
