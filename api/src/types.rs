//! Request and response bodies other than `DeviceConfig`: plain serde structs the VMM fills.
//!
//! The Cloud Hypervisor ones (`VmmPingResponse`, `VmInfo`, `VmCounters`, `PciDeviceInfo`,
//! `VmRemoveDevice`) have Cloud Hypervisor's field names and nesting. The introspection ones
//! (`IommuInfo`, `IoasidsInfo`, `PasidsInfo`) are ours; `api/openapi.yaml` describes all of
//! them. `VmConfig` (the body of `vm.create`) is in [`crate::vm_config`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `GET /api/v1/vmm.ping`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// Build identification (e.g. git describe).
    #[serde(default)]
    pub build_version: String,
    /// VMM version.
    pub version: String,
    /// VMM process id.
    #[serde(default)]
    pub pid: i64,
    /// Compiled-in features.
    #[serde(default)]
    pub features: Vec<String>,
}

/// Life-cycle state of the VM (Cloud Hypervisor's `VmState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Created, not booted.
    Created,
    /// Running.
    Running,
    /// Shut down.
    Shutdown,
    /// Paused.
    Paused,
    /// Stopped at a debugger breakpoint.
    BreakPoint,
}

/// One node of the device tree in [`VmInfo`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Device id.
    pub id: String,
    /// Resources (BARs, interrupts...), free-form.
    #[serde(default)]
    pub resources: Vec<serde_json::Value>,
    /// Ids of child nodes.
    #[serde(default)]
    pub children: Vec<String>,
    /// Guest BDF for PCI devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bdf: Option<String>,
}

/// `GET /api/v1/vm.info` (Cloud Hypervisor's `VmInfo`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's configuration in Cloud Hypervisor's `VmConfig` field names, with the devices
    /// added since (and their ids).
    pub config: crate::vm_config::VmConfig,
    /// VM state.
    pub state: VmState,
    /// Guest memory actually backed, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    /// Devices by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tree: Option<BTreeMap<String, DeviceNode>>,
}

/// The reply to `PUT /api/v1/vm.add-device` (Cloud Hypervisor's `PciDeviceInfo`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// Device id.
    pub id: String,
    /// Guest BDF, `SSSS:BB:DD.F`.
    pub bdf: String,
}

/// The body of `PUT /api/v1/vm.remove-device`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRemoveDevice {
    /// Id of the device to remove.
    pub id: String,
}

/// One device's IOMMU capabilities as the backend reports them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceIommuCaps {
    /// Device id.
    pub id: String,
    /// Host device (BDF, mdev UUID or cdev), as the VMM names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The IOMMU can nest (stage-1 over a nest parent).
    pub nesting: bool,
    /// PASID width in bits (`out_max_pasid_log2`); 0 when the device has no PASID support.
    pub pasid_width: u8,
    /// Page Request Services (I/O page faults with PRI).
    pub prs: bool,
    /// The device completes PCIe Deferrable Memory Writes (the writes ENQCMD produces):
    /// DMWr Completer Supported in its own config space (`details.dmwr` has the decoded
    /// bits and whether its shared work queues are exposed).
    pub dmwr: bool,
    /// The backend's full decoded capability record (e.g. the `ioasid` crate's struct).
    #[serde(default)]
    pub details: serde_json::Value,
}

/// The guest-visible vIOMMU in [`IommuInfo::viommu`] (serialized into that field).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViommuInfo {
    /// The model: `vtd`.
    pub model: String,
    /// Guest physical address of the register page (the DMAR's DRHD register base).
    pub register_base: u64,
    /// The CAP register the guest reads.
    pub cap: u64,
    /// The ECAP register the guest reads.
    pub ecap: u64,
    /// CAP flags set, by the specification's names (e.g. `CM`, `PSI`).
    pub cap_names: Vec<String>,
    /// ECAP flags set, by name (e.g. `QI`, `SMTS`, `SLTS`, `FSTS`).
    pub ecap_names: Vec<String>,
    /// CAP and ECAP numeric fields by name (e.g. `SAGAW`, `MGAW`, `NFR`, `PSS`).
    #[serde(default)]
    pub fields: BTreeMap<String, u64>,
    /// Root-bus slots the DMAR puts behind the unit.
    #[serde(default)]
    pub scope_slots: Vec<u8>,
    /// Whether the guest enabled translation (GSTS.TES).
    pub translation_enabled: bool,
    /// Every (device, PASID) behind the vIOMMU with its mode.
    #[serde(default)]
    pub devices: Vec<ViommuDevice>,
}

/// One (device, PASID) behind the vIOMMU in [`ViommuInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViommuDevice {
    /// Device id (as `vm.add-device` named it), or its BDF.
    pub id: String,
    /// Guest BDF.
    pub bdf: String,
    /// PASID (0: requests without PASID).
    pub pasid: u32,
    /// How the host honours the guest's translation: `nested`, `shadow`, `soft`,
    /// `pass-through` or `blocked`.
    pub mode: String,
    /// `assigned` or `emulated`.
    pub path: String,
    /// Guest domain id, when translated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<u16>,
    /// Host IOAS or HWPT the context is attached to, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_pt: Option<u32>,
}

/// `GET /api/v1/vm.iommu`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IommuInfo {
    /// Backend in use: `iommufd`, `type1` or `soft`.
    pub backend: String,
    /// The guest-visible vIOMMU, if any (free-form).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viommu: Option<serde_json::Value>,
    /// Per-device capabilities.
    #[serde(default)]
    pub devices: Vec<DeviceIommuCaps>,
}

/// One IOAS in [`IoasidsInfo`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoasInfo {
    /// IOAS object id.
    pub id: u32,
    /// Number of mappings.
    pub mappings: u64,
    /// Bytes mapped.
    pub mapped_bytes: u64,
}

/// Kind of a hardware page table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HwptKind {
    /// A paging domain over an IOAS.
    Paging,
    /// A nest parent (stage-2) over an IOAS.
    NestParent,
    /// A nested stage-1 table bound from the guest.
    Nested,
}

/// One HWPT in [`IoasidsInfo`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HwptInfo {
    /// HWPT object id.
    pub id: u32,
    /// Kind.
    pub kind: HwptKind,
    /// The IOAS it maps (directly or through its parent).
    pub ioas: u32,
    /// Parent HWPT of a nested HWPT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    /// Stage-1 format of a nested HWPT (e.g. `vtd_s1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// What an attachment points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PtType {
    /// An IOAS (the kernel picks the HWPT).
    Ioas,
    /// A HWPT.
    Hwpt,
}

/// A (device, PASID) attached to a page table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Device id.
    pub device: String,
    /// PASID, or none for the RID (requests without PASID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pasid: Option<u32>,
    /// Whether `pt_id` is an IOAS or a HWPT.
    pub pt_type: PtType,
    /// IOAS or HWPT id.
    pub pt_id: u32,
}

/// `GET /api/v1/vm.ioasids`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoasidsInfo {
    /// I/O address spaces.
    #[serde(default)]
    pub ioases: Vec<IoasInfo>,
    /// Hardware page tables.
    #[serde(default)]
    pub hwpts: Vec<HwptInfo>,
    /// Attached (device, PASID) pairs.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

/// One row of the guest-PASID to host-PASID table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasidEntry {
    /// Device id.
    pub device: String,
    /// PASID the guest uses.
    pub gpasid: u32,
    /// PASID the host IOMMU uses.
    pub hpasid: u32,
    /// HWPT attached at that PASID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hwpt: Option<u32>,
}

/// `GET /api/v1/vm.pasids`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasidsInfo {
    /// The table.
    #[serde(default)]
    pub entries: Vec<PasidEntry>,
}

/// The VM-wide IOMMU counters: one entry of `vm.counters`, under [`IOMMU_COUNTERS_KEY`].
///
/// Serialized as a map of counter name to integer built from the fields, so a counter added
/// here appears in `vm.counters` without a schema change (the schema says "map of integers").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct IommuCounters {
    /// I/O page faults read from fault queues.
    pub faults: u64,
    /// Page requests (PRI) forwarded to the guest.
    pub page_requests: u64,
    /// Page responses written back.
    pub page_responses: u64,
    /// Page requests answered by timeout.
    pub page_response_timeouts: u64,
    /// Cache invalidations forwarded to the host.
    pub invalidations: u64,
    /// ioctls issued on `/dev/iommu` and `/dev/vfio/*`.
    pub host_ioctls: u64,
    /// vIOMMU: guest invalidation queue descriptors processed (all types).
    pub guest_invalidation_descriptors: u64,
    /// vIOMMU: host invalidation calls (`HWPT_INVALIDATE`) the bridge issued.
    pub host_invalidation_calls: u64,
    /// vIOMMU: shadow map calls (`IOAS_COPY`/`IOAS_MAP_FILE` into shadow IOASes).
    pub shadow_map_calls: u64,
    /// vIOMMU: shadow unmap calls.
    pub shadow_unmap_calls: u64,
    /// vIOMMU: fault records written for the guest.
    pub faults_recorded: u64,
}

/// The key of [`IommuCounters`] in `vm.counters`. Device ids starting with `_` are the
/// VMM's own, so no device can take it.
pub const IOMMU_COUNTERS_KEY: &str = "_iommu";

/// `GET /api/v1/vm.counters`: Cloud Hypervisor's shape, a map of device id to a map of
/// counter name to integer. The VM-wide IOMMU counters are the entry
/// [`IOMMU_COUNTERS_KEY`]; the device manager may add VM-wide entries of its own (`_vm`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// The VM-wide IOMMU counters.
    pub iommu: IommuCounters,
    /// Per-device counters, free-form names.
    pub devices: BTreeMap<String, BTreeMap<String, u64>>,
}

impl VmCounters {
    /// The wire form: every device's map plus the IOMMU counters under their key.
    pub fn to_map(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        let mut map = self.devices.clone();
        let iommu: BTreeMap<String, u64> = serde_json::to_value(&self.iommu)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        map.insert(IOMMU_COUNTERS_KEY.to_string(), iommu);
        map
    }
}

impl Serialize for VmCounters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_map().serialize(s)
    }
}

impl<'de> Deserialize<'de> for VmCounters {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut devices = BTreeMap::<String, BTreeMap<String, u64>>::deserialize(d)?;
        let iommu = match devices.remove(IOMMU_COUNTERS_KEY) {
            Some(m) => serde_json::to_value(m)
                .and_then(serde_json::from_value)
                .map_err(serde::de::Error::custom)?,
            None => IommuCounters::default(),
        };
        Ok(VmCounters { iommu, devices })
    }
}

/// The body of every error reply: the message, then its causes, outermost first (Cloud
/// Hypervisor's clients read a JSON array of strings).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ErrorBody(pub Vec<String>);

impl ErrorBody {
    /// Message and causes joined with `: `.
    pub fn joined(&self) -> String {
        self.0.join(": ")
    }
}
