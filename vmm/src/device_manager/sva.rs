//! vSVA in the device manager: the host bridge is made with the VM's PASID space (the
//! bridge records each guest PASID it binds there; `vm.pasids` shows them) and, on a unit
//! with `svm=on`, with the page request pump ([`FaultPump`]: a thread per host bridge that
//! moves host page requests into the unit's PRQ and times out what the guest leaves
//! unanswered).
//!
//! The SVA copy engine (`--device emulated=sva-copy,iommu=on`, or `vm.add-device` with
//! `{"emulated": "sva-copy", "iommu": true}`) is added here: behind the single vIOMMU unit,
//! which must offer first stage, PASIDs and page requests ([`SVA_PLATFORM`]; the wiring
//! refuses assigned devices that would need a shadow on such a unit), with its DMA through
//! the bridge's soft path and the guest's device-TLB invalidations forwarded to it.

use std::sync::{Arc, Mutex};

use api::DeviceConfig;
use devices::pci::SharedPciDevice;
use devices::sva::{SvaEngine, SvaHandle, SvaOptions};
use ioasid::{HostRegion, IoasId, IommuBackend, Pasid, PasidSpace, SoftIommu};
use log::{info, warn};

use super::emulated::{CounterHandle, EmulatedDma};
use super::viommu::ViommuState;
use super::{AddedDevice, DeviceManager, DeviceManagerError};
use crate::memory::RamRegion;
use crate::viommu::{BridgeCounters, DevTlbHook, FaultPump, VtdBridge};

/// A host bridge over `backend` (guest RAM in `ioas`) for `v`, recording PASIDs in
/// `pasids`; starts `v`'s page request pump when the unit offers page requests.
pub(super) fn new_host_bridge(
    v: &mut ViommuState,
    pasids: &Arc<Mutex<PasidSpace>>,
    backend: Arc<dyn IommuBackend>,
    ioas: IoasId,
    ram: Vec<RamRegion>,
) -> Arc<VtdBridge> {
    let h = Arc::new(
        VtdBridge::new(backend, ioas, ram)
            .with_pasid_space(pasids.clone())
            .with_pasid_table(v.pasid_table.clone())
            .with_page_requests(v.setup.vtd.svm),
    );
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

/// What `--platform` must say for the SVA copy engine.
pub const SVA_PLATFORM: &str = "--platform viommu=vtd,fsts=on,pasid-bits=20,svm=on";

/// Forwards the bridge's device-TLB invalidations to the engine.
struct EngineDevTlb(SvaHandle);

impl DevTlbHook for EngineDevTlb {
    fn invalidate(&self, pasid: Option<Pasid>, addr: u64, npages: u64) {
        self.0.invalidate_device_tlb(pasid, addr, npages);
    }
}

impl DeviceManager {
    /// `--device emulated=<name>,...` / `{"emulated": "<name>", ...}`: a device the VMM
    /// emulates (`cfg` was checked: `iommu=on`, no path or fd).
    pub(super) fn add_emulated_config(
        &mut self,
        name: &str,
        cfg: &DeviceConfig,
    ) -> Result<AddedDevice, DeviceManagerError> {
        match name {
            "sva-copy" => self.add_sva_engine(cfg),
            "swq" => self.add_swq_device(cfg),
            other => Err(DeviceManagerError::Unsupported {
                device: other.to_string(),
                reason: format!(
                    "no such emulated device; accepted: {}",
                    api::device_config::EMULATED_DEVICES.join(", ")
                ),
            }),
        }
    }

    /// The SVA copy engine behind the vIOMMU: its DMA through the bridge's soft path (the
    /// soft backend walks the guest's first-stage tables per access, with PRI), its
    /// device-TLB invalidations forwarded to it. Needs a unit that offers first stage,
    /// PASIDs and page requests ([`SVA_PLATFORM`]).
    fn add_sva_engine(&mut self, cfg: &DeviceConfig) -> Result<AddedDevice, DeviceManagerError> {
        const NAME: &str = "sva-copy";
        let refuse = |reason: String| DeviceManagerError::Unsupported {
            device: NAME.to_string(),
            reason,
        };
        let Some(v) = self.viommu.as_ref() else {
            return Err(refuse(format!(
                "it sits behind a vIOMMU: start with {SVA_PLATFORM}"
            )));
        };
        let vtd = v.setup.vtd;
        if !(vtd.svm && v.first_stage && vtd.pasid_bits >= 1) {
            return Err(refuse(format!(
                "it needs a vIOMMU with first stage, PASIDs and page requests (this one: \
                 first stage {}, pasid-bits {}, svm {}): start with {SVA_PLATFORM}",
                v.first_stage, vtd.pasid_bits, vtd.svm
            )));
        }
        let soft = match v.soft_ram.as_ref() {
            Some((s, _)) => s.clone(),
            None => Arc::new(self.soft_over_ram().map_err(|e| {
                DeviceManagerError::step(NAME, "making a soft IOMMU over guest RAM", e)
            })?),
        };
        let mut handle: Option<SvaHandle> = None;
        let added = self.add_emulated_device(
            cfg.id.as_deref(),
            NAME,
            cfg.pci_device_id,
            EmulatedDma::Soft(soft),
            |parts| {
                let dma = parts
                    .dma
                    .ok_or_else(|| "no DMA view from the vIOMMU bridge".to_string())?;
                let engine = SvaEngine::new(dma, parts.sink, SvaOptions::default())
                    .map_err(|e| e.to_string())?;
                handle = Some(engine.handle());
                let m: SharedPciDevice = Arc::new(Mutex::new(engine));
                Ok(m)
            },
        )?;
        if let Some(handle) = &handle {
            self.emulated_counters
                .insert(added.id.clone(), CounterHandle::Sva(handle.clone()));
        }
        let host = self.viommu.as_ref().and_then(|v| v.host.clone());
        if let (Some(h), Some(handle)) = (host, handle) {
            if let Err(e) = h.set_devtlb_hook(added.bdf, Arc::new(EngineDevTlb(handle))) {
                warn!("{}: device-TLB invalidations not forwarded: {e}", added.id);
            }
        }
        Ok(added)
    }

    /// A soft IOMMU whose DMA reaches exactly the VM's RAM.
    pub(super) fn soft_over_ram(&self) -> ioasid::Result<SoftIommu> {
        let regions: Vec<HostRegion> = self
            .ram
            .iter()
            .map(|r| HostRegion {
                hva: r.host_addr,
                len: r.size,
            })
            .collect();
        // SAFETY: the regions are the VM's guest RAM mappings, which stay mapped for the
        // VM's life (the device manager, its bridge and its devices go before the RAM), are
        // readable and writable, and are only accessed through volatile accessors and raw
        // pointers, never through Rust references.
        unsafe { SoftIommu::new(&regions) }
    }
}
