//! What the bridge shows: per (device, PASID) its mode for `vm.iommu`, its counters for
//! `vm.counters`, and what a removal released.

use devices::pci::PciBdf;
use devices::viommu::BridgeMode;
use ioasid::Pasid;
use serde::Serialize;

/// How a device reaches guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DevicePath {
    /// An assigned (VFIO) device on the VM's backend: nested or shadow.
    Assigned,
    /// An emulated device on the soft backend.
    Emulated,
}

/// One (device, PASID) behind the vIOMMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceView {
    /// The guest BDF.
    pub bdf: PciBdf,
    /// The PASID (0: requests without PASID, Linux's RID_PASID).
    pub pasid: Pasid,
    /// How the bridge honours it.
    pub mode: BridgeMode,
    /// The guest domain id, when translated.
    pub did: Option<u16>,
    /// Assigned or emulated.
    pub path: DevicePath,
    /// The host object the context is attached to (IOAS or HWPT id), when there is one.
    pub host_pt: Option<u32>,
}

/// The name `vm.iommu` shows for a mode.
pub fn mode_name(mode: BridgeMode) -> &'static str {
    match mode {
        BridgeMode::Nested => "nested",
        BridgeMode::Shadow => "shadow",
        BridgeMode::Soft => "soft",
        BridgeMode::PassThrough => "pass-through",
        BridgeMode::Blocked => "blocked",
    }
}

impl DeviceView {
    /// The JSON object `vm.iommu` lists.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "bdf": self.bdf.to_string(),
            "pasid": self.pasid.0,
            "mode": mode_name(self.mode),
            "did": self.did,
            "path": self.path,
            "host_pt": self.host_pt,
        })
    }
}

/// The bridge's counters (`vm.counters`). Totals since the VM started, plus the host
/// objects alive now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BridgeCounters {
    /// Guest invalidation descriptors received (IOTLB, PASID-based IOTLB, device-TLB).
    pub guest_invalidations: u64,
    /// Doorbells: invalidation batches received.
    pub doorbells: u64,
    /// Host `HWPT_INVALIDATE` calls (one per nested HWPT per doorbell at most).
    pub host_invalidation_calls: u64,
    /// Shadow `IOAS_COPY` map calls.
    pub shadow_map_calls: u64,
    /// Shadow unmap calls.
    pub shadow_unmap_calls: u64,
    /// Shadow syncs (initial, page-selective or full; one per domain per doorbell at most).
    pub resyncs: u64,
    /// Guest table entries skipped (outside guest RAM, reserved bits, too large a table).
    pub bad_table_entries: u64,
    /// Host calls of the bridge that failed.
    pub host_errors: u64,
    /// Shadow IOASes alive.
    pub shadow_ioases_live: u64,
    /// Nested HWPTs (host stage-1 bindings, and the soft backend's nested bindings) alive.
    pub nested_hwpts_live: u64,
    /// Nest-parent HWPTs alive.
    pub nest_parents_live: u64,
    /// PASIDs other than 0 attached on the host.
    pub pasids_live: u64,
    /// Page requests read from the host fault queues (each a PRQ descriptor when the
    /// guest's queue takes it).
    pub page_requests: u64,
    /// Guest page group responses forwarded to the host with `Success`.
    pub page_responses_success: u64,
    /// Guest page group responses forwarded to the host with `Invalid`.
    pub page_responses_invalid: u64,
    /// Guest page group responses that matched no outstanding group (dropped).
    pub page_responses_unmatched: u64,
    /// Groups answered `Success` by the bridge because the guest's PRQ was full (the
    /// device retries).
    pub prq_full_answers: u64,
    /// Groups answered `Invalid` by the bridge because the guest does not take page
    /// requests from the device (PRE clear, no PRQ, translation off, PASID gone).
    pub page_requests_refused: u64,
    /// Groups answered `Invalid` because the guest did not answer in time.
    pub page_request_timeouts: u64,
    /// Groups answered `Invalid` because the guest tore the PASID (or the device) down.
    pub page_requests_torn_down: u64,
    /// Unrecoverable faults read from the host fault queues.
    pub host_unrecoverable_faults: u64,
    /// Guest device-TLB invalidations forwarded to an emulated device's hook.
    pub devtlb_forwarded: u64,
}

/// What [`super::VtdBridge::remove`] tore down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// Nested HWPTs destroyed (including the soft backend's).
    pub nested_hwpts: u64,
    /// Nest parents destroyed.
    pub nest_parents: u64,
    /// Shadow IOASes destroyed (a domain another device still uses stays).
    pub shadow_ioases: u64,
    /// PASIDs (other than 0) detached.
    pub pasids: u64,
    /// Outstanding page request groups answered `Invalid`.
    pub page_requests_answered: u64,
    /// Teardown steps that failed (the rest went on).
    pub errors: Vec<String>,
}
