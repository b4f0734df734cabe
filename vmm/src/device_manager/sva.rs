//! vSVA in the device manager: the host bridge is made with the VM's PASID space (the
//! bridge records each guest PASID it binds there; `vm.pasids` shows them) and, on a unit
//! with `svm=on`, with the page request pump ([`FaultPump`]: a thread per host bridge that
//! moves host page requests into the unit's PRQ and times out what the guest leaves
//! unanswered).

use std::sync::{Arc, Mutex};

use ioasid::{IoasId, IommuBackend, PasidSpace};
use log::{info, warn};

use super::viommu::ViommuState;
use crate::memory::RamRegion;
use crate::viommu::{BridgeCounters, FaultPump, VtdBridge};

/// A host bridge over `backend` (guest RAM in `ioas`) for `v`, recording PASIDs in
/// `pasids`; starts `v`'s page request pump when the unit offers page requests.
pub(super) fn new_host_bridge(
    v: &mut ViommuState,
    pasids: &Arc<Mutex<PasidSpace>>,
    backend: Arc<dyn IommuBackend>,
    ioas: IoasId,
    ram: Vec<RamRegion>,
) -> Arc<VtdBridge> {
    let h = Arc::new(VtdBridge::new(backend, ioas, ram).with_pasid_space(pasids.clone()));
    v.pump = None;
    if v.setup.vtd.svm {
        match FaultPump::spawn(h.clone(), v.vtd.clone()) {
            Ok(p) => {
                info!("vIOMMU: page request pump started");
                v.pump = Some(p);
            }
            Err(e) => warn!(
                "vIOMMU: no page request pump ({e}): page requests from devices stay \
                 unanswered until the device gives up"
            ),
        }
    }
    h
}

/// Adds the fault path's counts of `b` to `a` (all monotonic).
pub(super) fn add_fault_counters(a: &mut BridgeCounters, b: &BridgeCounters) {
    a.page_requests += b.page_requests;
    a.page_responses_success += b.page_responses_success;
    a.page_responses_invalid += b.page_responses_invalid;
    a.page_responses_unmatched += b.page_responses_unmatched;
    a.prq_full_answers += b.prq_full_answers;
    a.page_requests_refused += b.page_requests_refused;
    a.page_request_timeouts += b.page_request_timeouts;
    a.page_requests_torn_down += b.page_requests_torn_down;
    a.host_unrecoverable_faults += b.host_unrecoverable_faults;
    a.devtlb_forwarded += b.devtlb_forwarded;
}
