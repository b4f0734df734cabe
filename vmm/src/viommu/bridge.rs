//! [`VtdBridge`]: the VM's [`ViommuBridge`](devices::viommu::ViommuBridge), which turns guest intent (a (BDF, PASID)
//! translation, an invalidation batch) into `ioasid` calls on one of three paths, chosen per
//! device from the host's decoded capabilities:
//!
//! - **shadow** (assigned device, host without nesting): [`super::shadow`];
//! - **nested** (assigned device, host with nesting): a nest parent over the guest-RAM IOAS and
//!   a nested HWPT per guest first-stage table ([`super::nested`]);
//! - **soft** (emulated device): the soft backend walks the guest tables ([`super::soft_path`]).
//!
//! All state sits behind one lock: calls come from the vCPU thread of the register write
//! and are short. A change of translation prepares the new host object, attaches (replaces)
//! the device to it, and only then releases the old one, so the device never sees a gap.
//!
//! This file holds the state and the VMM's API; `bind` makes and releases the host objects of
//! one (device, PASID); `guest` answers the guest's calls (the trait); `shared` keeps one
//! host PASID per guest PASID across the VM's devices (the VM's [`VmPasidTable`], which
//! ENQCMD's translation and a shared-work-queue portal read).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use devices::pci::PciBdf;
use devices::viommu::{BridgeError, BridgeMode, DmaView, Translation};
use ioasid::soft::SoftIommu;
use ioasid::{
    DevId, FaultHandler, HwCaps, HwptAlloc, HwptId, IoasId, IommuBackend, Pasid, PasidSpace, PtId,
    VtdStage1,
};
use log::warn;

use super::guest_mem::RamMap;
use super::nested::HostFormat;
use super::prq::PrqState;
use super::shadow::ShadowDomain;
use super::soft_path::{map_ram_ioas, HostPasids, SoftDma};
use super::view::{BridgeCounters, DevicePath, DeviceView, Released};
use crate::enqcmd::VmPasidTable;
use crate::memory::RamRegion;

mod bind;
mod guest;
mod shared;

/// Tunables of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeLimits {
    /// Descents one shadow scan may make (one per leaf or hole): bounds the work a hostile
    /// table can cause. The default covers 8 GiB of 4 KiB mappings.
    pub max_scan_steps: u64,
}

/// How long a page request group forwarded to the guest may stay unanswered before the
/// bridge answers the host `Invalid` itself (a guest that never answers must not hang the
/// device); [`VtdBridge::with_page_request_timeout`] changes it.
pub const PAGE_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The PASID width of an emulated device when the caller gives none (the SVA copy engine's
/// PASID capability: 20 bits).
pub const EMULATED_PASID_BITS: u8 = 20;

impl Default for BridgeLimits {
    fn default() -> Self {
        BridgeLimits {
            max_scan_steps: 1 << 21,
        }
    }
}

/// How a (device, PASID) is bound on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Binding {
    Blocked,
    PassThrough,
    /// Attached to shadow domain `id`.
    Shadow {
        did: u16,
        id: u64,
    },
    /// Attached to a nested HWPT over the device's nest parent.
    Nested {
        did: u16,
        table: VtdStage1,
        hwpt: HwptId,
    },
    /// Attached to a soft nested HWPT (first- or second-stage table).
    Soft {
        did: u16,
        t: Translation,
        hwpt: HwptId,
    },
}

impl Binding {
    fn did(&self) -> Option<u16> {
        match *self {
            Binding::Shadow { did, .. }
            | Binding::Nested { did, .. }
            | Binding::Soft { did, .. } => Some(did),
            Binding::Blocked | Binding::PassThrough => None,
        }
    }

    fn mode(&self) -> BridgeMode {
        match self {
            Binding::Blocked => BridgeMode::Blocked,
            Binding::PassThrough => BridgeMode::PassThrough,
            Binding::Shadow { .. } => BridgeMode::Shadow,
            Binding::Nested { .. } => BridgeMode::Nested,
            Binding::Soft { .. } => BridgeMode::Soft,
        }
    }

    fn hwpt(&self) -> Option<HwptId> {
        match *self {
            Binding::Nested { hwpt, .. } | Binding::Soft { hwpt, .. } => Some(hwpt),
            _ => None,
        }
    }
}

/// Which backend a device is on, and what the path needs.
#[derive(Debug)]
enum Path {
    Assigned {
        caps: Option<HwCaps>,
        format: HostFormat,
        /// HWPTs are allocated with `IOMMU_HWPT_ALLOC_PASID` (the device has PASIDs).
        pasid_hwpts: bool,
        parent: Option<HwptId>,
    },
    Emulated {
        soft: Arc<SoftIommu>,
        ram_ioas: IoasId,
        parent: HwptId,
    },
}

pub(super) struct Device {
    dev: DevId,
    path: Path,
    bindings: BTreeMap<Pasid, Binding>,
    /// The device's PASID width (its PASID capability): wider guest PASIDs are refused.
    pasid_bits: u8,
    /// Guest PASID -> host PASID of the bound PASIDs other than 0 (shared with the device's
    /// [`SoftDma`], which issues DMA with the host PASID). The VM's [`VmPasidTable`] holds
    /// the same translations (one host PASID per guest PASID, shared by its devices); the
    /// VM's [`PasidSpace`] holds the allocation, under the key of one of them.
    pub(super) host_pasids: HostPasids,
    /// The host fault queue of the device's HWPTs (allocated with the first translated
    /// binding that can fault to the guest), with group tracking and timeouts.
    pub(super) fault: Option<FaultHandler>,
    /// The device-TLB hook of an emulated device with ATS.
    devtlb: Option<Arc<dyn DevTlbHook>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("dev", &self.dev)
            .field("path", &self.path)
            .field("bindings", &self.bindings)
            .field("pasid_bits", &self.pasid_bits)
            .field("fault", &self.fault.as_ref().map(|h| h.queue().id()))
            .finish()
    }
}

impl Device {
    fn new(dev: DevId, path: Path, pasid_bits: u8) -> Self {
        let mut bindings = BTreeMap::new();
        bindings.insert(Pasid(0), Binding::PassThrough);
        Device {
            dev,
            path,
            bindings,
            pasid_bits,
            host_pasids: HostPasids::default(),
            fault: None,
            devtlb: None,
        }
    }

    /// The device's key in the VM's PASID space: its `ioasid` device id, tagged for an
    /// emulated device (the soft backend numbers its devices apart from iommufd, so the two
    /// could collide).
    fn space_id(&self) -> DevId {
        match self.path {
            Path::Assigned { .. } => self.dev,
            Path::Emulated { .. } => DevId(self.dev.0 | EMULATED_SPACE_TAG),
        }
    }

    /// The host PASID of guest `pasid` (`None`: PASID 0, the requests without PASID, or
    /// not bound).
    fn host_pasid(&self, pasid: Pasid) -> Option<Pasid> {
        if pasid.0 == 0 {
            return None;
        }
        self.host_pasids.get(pasid)
    }
}

/// The bit that tags an emulated device's id in the VM's PASID space.
pub const EMULATED_SPACE_TAG: u32 = 1 << 31;

/// One guest PASID bound on the host, for `vm.pasids`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasidView {
    /// The device's key in the VM's PASID space.
    pub space_id: DevId,
    /// The device.
    pub bdf: PciBdf,
    /// The guest PASID.
    pub guest: Pasid,
    /// The host PASID.
    pub host: Pasid,
    /// The host object (HWPT or IOAS id) the host PASID is attached to.
    pub host_pt: Option<u32>,
}

/// Where the bridge forwards a guest device-TLB invalidation of an emulated device with
/// ATS (the device model drops its cached translations and completes it).
pub trait DevTlbHook: Send + Sync {
    /// Drops translations of `pasid` (`None`: requests without PASID) in
    /// `addr..addr + npages * 4 KiB` (`npages == u64::MAX`: everything).
    fn invalidate(&self, pasid: Option<Pasid>, addr: u64, npages: u64);
}

#[derive(Debug, Default)]
pub(super) struct State {
    pub(super) devices: BTreeMap<PciBdf, Device>,
    shadows: BTreeMap<u64, ShadowDomain>,
    next_shadow: u64,
    /// An IOAS with nothing mapped, for blocked RIDs of assigned devices.
    blocked_ioas: Option<IoasId>,
    /// Guest-RAM IOASes of soft backends other than the VM's own.
    soft_ram: Vec<(Arc<SoftIommu>, IoasId)>,
    /// Page request groups forwarded to the guest and not answered yet.
    pub(super) prq: PrqState,
    pub(super) counters: BridgeCounters,
}

/// The VM's vIOMMU bridge. One per VM.
#[derive(Debug)]
pub struct VtdBridge {
    backend: Arc<dyn IommuBackend>,
    ram_ioas: IoasId,
    ram: RamMap,
    limits: BridgeLimits,
    page_request_timeout: Duration,
    /// Whether host fault queues are made (the guest's unit takes page requests).
    page_requests: bool,
    state: Mutex<State>,
    /// The VM's host PASID allocator, with the bindings `vm.pasids` shows (lock order:
    /// after `state`).
    pasids: Arc<Mutex<PasidSpace>>,
    /// The VM's guest-to-host PASID translation (lock order: after `pasids`).
    pasid_table: Arc<VmPasidTable>,
}

fn host_err(bdf: PciBdf) -> impl FnOnce(ioasid::Error) -> BridgeError {
    move |source| BridgeError::Host { bdf, source }
}

const FIRST_STAGE_NEEDS_NESTING: &str =
    "first-stage translation of an assigned device needs host nesting, and a shadow cannot \
     follow first-stage tables: Linux does not invalidate after first-stage maps even with \
     caching mode (drivers/iommu/intel/cache.c, cache_tag_flush_range_np), so the vIOMMU \
     must not advertise FSTS to this device";

impl VtdBridge {
    /// A bridge over the VM's backend, whose IOAS `ram_ioas` maps guest RAM (`ram`) at
    /// IOVA = GPA.
    pub fn new(backend: Arc<dyn IommuBackend>, ram_ioas: IoasId, ram: Vec<RamRegion>) -> Self {
        Self::with_limits(backend, ram_ioas, ram, BridgeLimits::default())
    }

    /// [`VtdBridge::new`] with tunables.
    pub fn with_limits(
        backend: Arc<dyn IommuBackend>,
        ram_ioas: IoasId,
        ram: Vec<RamRegion>,
        limits: BridgeLimits,
    ) -> Self {
        VtdBridge {
            backend,
            ram_ioas,
            ram: RamMap::new(ram),
            limits,
            page_request_timeout: PAGE_REQUEST_TIMEOUT,
            page_requests: true,
            state: Mutex::new(State::default()),
            pasids: Arc::new(Mutex::new(default_pasid_space())),
            pasid_table: Arc::new(VmPasidTable::new()),
        }
    }

    /// Records the guest-to-host PASID translations in `table` (the VM's, which a
    /// shared-work-queue portal and ENQCMD translate through) instead of the bridge's own.
    /// Call before any device is added.
    pub fn with_pasid_table(mut self, table: Arc<VmPasidTable>) -> Self {
        self.pasid_table = table;
        self
    }

    /// The VM's guest-to-host PASID translation (implements
    /// [`PasidTranslate`](devices::cpu_pasid::PasidTranslate)).
    pub fn pasid_table(&self) -> &Arc<VmPasidTable> {
        &self.pasid_table
    }

    /// Records the bridge's PASID bindings in `space` (the device manager's, which
    /// `vm.pasids` shows) instead of the bridge's own. Call before any device is added.
    pub fn with_pasid_space(mut self, space: Arc<Mutex<PasidSpace>>) -> Self {
        self.pasids = space;
        self
    }

    /// The VM's guest-to-host PASID table the bridge records its bindings in.
    pub fn pasid_space(&self) -> &Arc<Mutex<PasidSpace>> {
        &self.pasids
    }

    pub(super) fn lock_pasids(&self) -> MutexGuard<'_, PasidSpace> {
        self.pasids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Page request groups the guest leaves unanswered for `t` are answered `Invalid`
    /// (default [`PAGE_REQUEST_TIMEOUT`]). Call before any device is added.
    pub fn with_page_request_timeout(mut self, t: Duration) -> Self {
        self.page_request_timeout = t;
        self
    }

    /// Whether the bridge makes host fault queues (default: yes). A VM whose vIOMMU has no
    /// page requests (`svm=off`) says no: nobody would read them.
    pub fn with_page_requests(mut self, on: bool) -> Self {
        self.page_requests = on;
        self
    }

    pub(super) fn page_requests(&self) -> bool {
        self.page_requests
    }

    pub(super) fn page_request_timeout(&self) -> Duration {
        self.page_request_timeout
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An assigned device, already attached to the guest-RAM IOAS by the device manager
    /// (pass-through: the state before the guest enables translation). `caps` are its
    /// decoded host capabilities (`None`: unknown, shadow only).
    pub fn add_assigned(
        &self,
        bdf: PciBdf,
        dev: DevId,
        caps: Option<&HwCaps>,
    ) -> Result<(), BridgeError> {
        let mut st = self.lock();
        if st.devices.contains_key(&bdf) {
            return Err(already(bdf));
        }
        let path = Path::Assigned {
            caps: caps.cloned(),
            format: caps.map_or(HostFormat::VtdS1, HostFormat::from_caps),
            pasid_hwpts: caps.is_some_and(|c| c.max_pasid_bits() > 0),
            parent: None,
        };
        let bits = caps.map_or(0, HwCaps::max_pasid_bits);
        st.devices.insert(bdf, Device::new(dev, path, bits));
        Ok(())
    }

    /// An emulated device registered on `soft` as `dev`: it DMAs through the returned view,
    /// in pass-through until the guest says otherwise. Its PASID width is
    /// [`EMULATED_PASID_BITS`].
    pub fn add_emulated(
        &self,
        bdf: PciBdf,
        soft: Arc<SoftIommu>,
        dev: DevId,
    ) -> Result<Arc<dyn DmaView>, BridgeError> {
        self.add_emulated_soft(bdf, soft, dev, EMULATED_PASID_BITS)
            .map(|d| d as Arc<dyn DmaView>)
    }

    /// [`VtdBridge::add_emulated`] with the device's PASID width (`pasid_bits`, from its
    /// PASID capability; 0: no PASIDs); returns the [`SoftDma`] itself, whose
    /// [`SoftDma::read_req`]/[`SoftDma::write_req`] issue requests with PRI.
    pub fn add_emulated_soft(
        &self,
        bdf: PciBdf,
        soft: Arc<SoftIommu>,
        dev: DevId,
        pasid_bits: u8,
    ) -> Result<Arc<SoftDma>, BridgeError> {
        let mut st = self.lock();
        if st.devices.contains_key(&bdf) {
            return Err(already(bdf));
        }
        let same = std::ptr::addr_eq(Arc::as_ptr(&soft), Arc::as_ptr(&self.backend));
        let ram_ioas = if same {
            self.ram_ioas
        } else if let Some((_, ioas)) = st.soft_ram.iter().find(|(s, _)| Arc::ptr_eq(s, &soft)) {
            *ioas
        } else {
            let ioas = map_ram_ioas(&soft, &self.ram).map_err(host_err(bdf))?;
            st.soft_ram.push((soft.clone(), ioas));
            ioas
        };
        let parent = soft
            .hwpt_alloc(&HwptAlloc::nest_parent(dev, ram_ioas))
            .map_err(host_err(bdf))?;
        if let Err(e) = soft.attach(dev, None, PtId::Ioas(ram_ioas)) {
            let _ = soft.destroy(parent.0);
            return Err(host_err(bdf)(e));
        }
        st.counters.nest_parents_live += 1;
        let path = Path::Emulated {
            soft: soft.clone(),
            ram_ioas,
            parent,
        };
        let d = Device::new(dev, path, pasid_bits.min(EMULATED_PASID_BITS));
        let view = Arc::new(SoftDma::new(soft, dev, d.host_pasids.clone()));
        st.devices.insert(bdf, d);
        Ok(view)
    }

    /// Forwards the guest's device-TLB invalidations of `bdf` (an emulated device with ATS)
    /// to `hook`.
    pub fn set_devtlb_hook(
        &self,
        bdf: PciBdf,
        hook: Arc<dyn DevTlbHook>,
    ) -> Result<(), BridgeError> {
        let mut st = self.lock();
        let d = st
            .devices
            .get_mut(&bdf)
            .ok_or(BridgeError::NoDevice { bdf })?;
        d.devtlb = Some(hook);
        Ok(())
    }

    /// Tears down what the bridge holds for `bdf`: detaches its PASIDs and its RID from the
    /// objects the bridge made (re-attaching nothing), destroys its nested HWPTs and nest
    /// parent, and the shadow IOASes no other device uses.
    pub fn remove(&self, bdf: PciBdf) -> Result<Released, BridgeError> {
        let mut st = self.lock();
        let mut d = st
            .devices
            .remove(&bdf)
            .ok_or(BridgeError::NoDevice { bdf })?;
        let mut rel = Released::default();
        // Outstanding page requests first: the device must not wait for a guest that no
        // longer sees it.
        if let Some(h) = d.fault.as_mut() {
            let st = &mut *st;
            let n = st.prq.answer_device(h, bdf, None, &mut st.counters);
            rel.page_requests_answered += n;
        }
        let backend: &dyn IommuBackend = match &d.path {
            Path::Assigned { .. } => &*self.backend,
            Path::Emulated { soft, .. } => &**soft,
        };
        let emulated = matches!(d.path, Path::Emulated { .. });
        // PASIDs first, the RID last (the kernel wants PASIDs gone before the RID goes).
        for (pasid, b) in d.bindings.iter().rev() {
            let owned = !matches!(b, Binding::Blocked | Binding::PassThrough);
            if pasid.0 != 0 {
                let Some(p) = d.host_pasid(*pasid) else {
                    continue;
                };
                if *b != Binding::Blocked {
                    match backend.detach(d.dev, Some(p)) {
                        Ok(()) => rel.pasids += 1,
                        Err(e) => rel.errors.push(e.to_string()),
                    }
                }
                continue;
            }
            if owned || emulated {
                if let Err(e) = backend.detach(d.dev, None) {
                    // A mock device cannot be detached: park it on the empty IOAS.
                    let parked = match &d.path {
                        Path::Assigned { .. } => self
                            .blocked_ioas(&mut st)
                            .and_then(|io| backend.attach(d.dev, None, PtId::Ioas(io))),
                        Path::Emulated { .. } => Err(e),
                    };
                    if let Err(e) = parked {
                        rel.errors.push(e.to_string());
                    }
                }
            }
        }
        for (pasid, b) in &d.bindings {
            self.release(&mut st, backend, bdf, *pasid, *b, Some(&mut rel));
        }
        for (g, _) in d.host_pasids.drain() {
            self.release_host_pasid(&mut st, d.space_id(), g);
        }
        // Dropping the handler closes the host fault queue (the soft backend answers what
        // is still pending Invalid, as the kernel does).
        drop(d.fault.take());
        let parent = match &d.path {
            Path::Assigned { parent, .. } => *parent,
            Path::Emulated { parent, .. } => Some(*parent),
        };
        if let Some(p) = parent {
            match backend.destroy(p.0) {
                Ok(()) => {
                    rel.nest_parents += 1;
                    st.counters.nest_parents_live = st.counters.nest_parents_live.saturating_sub(1);
                }
                Err(e) => rel.errors.push(e.to_string()),
            }
        }
        for e in &rel.errors {
            warn!("vIOMMU: removing {bdf}: {e}");
        }
        Ok(rel)
    }

    /// Whether `bdf` can be given first-stage translation: an emulated device always (the
    /// soft backend walks it), an assigned one only on a host that nests. The wiring
    /// advertises ECAP.FSTS only on units whose every device can (Linux prefers first stage
    /// whenever FSTS is set, and a shadow cannot follow first-stage maps). `None`: unknown
    /// device.
    pub fn supports_first_stage(&self, bdf: PciBdf) -> Option<bool> {
        let st = self.lock();
        st.devices.get(&bdf).map(|d| match &d.path {
            Path::Assigned { caps, .. } => caps.as_ref().is_some_and(HwCaps::supports_nesting),
            Path::Emulated { .. } => true,
        })
    }

    /// Every (device, PASID) behind the vIOMMU with its mode, for `vm.iommu`.
    pub fn devices(&self) -> Vec<DeviceView> {
        let st = self.lock();
        let mut v = Vec::new();
        for (bdf, d) in &st.devices {
            for (pasid, b) in &d.bindings {
                let host_pt = match *b {
                    Binding::Shadow { id, .. } => st.shadows.get(&id).map(|s| s.ioas.0),
                    Binding::Nested { hwpt, .. } | Binding::Soft { hwpt, .. } => Some(hwpt.0),
                    Binding::PassThrough => Some(match &d.path {
                        Path::Assigned { .. } => self.ram_ioas.0,
                        Path::Emulated { ram_ioas, .. } => ram_ioas.0,
                    }),
                    Binding::Blocked => None,
                };
                v.push(DeviceView {
                    bdf: *bdf,
                    pasid: *pasid,
                    mode: b.mode(),
                    did: b.did(),
                    path: match d.path {
                        Path::Assigned { .. } => DevicePath::Assigned,
                        Path::Emulated { .. } => DevicePath::Emulated,
                    },
                    host_pt,
                });
            }
        }
        v
    }

    /// The guest PASIDs bound on the host (what `vm.pasids` shows), by device.
    pub fn pasids(&self) -> Vec<PasidView> {
        let views = self.devices();
        let st = self.lock();
        let mut out = Vec::new();
        for (bdf, d) in &st.devices {
            for (guest, host) in d.host_pasids.pairs() {
                out.push(PasidView {
                    space_id: d.space_id(),
                    bdf: *bdf,
                    guest,
                    host,
                    host_pt: views
                        .iter()
                        .find(|v| v.bdf == *bdf && v.pasid == guest)
                        .and_then(|v| v.host_pt),
                });
            }
        }
        out
    }

    /// The counters, with the live host objects counted now.
    pub fn counters(&self) -> BridgeCounters {
        let st = self.lock();
        let mut c = st.counters;
        c.shadow_ioases_live = st.shadows.len() as u64;
        let bindings = || st.devices.values().flat_map(|d| d.bindings.iter());
        c.nested_hwpts_live = bindings().filter(|(_, b)| b.hwpt().is_some()).count() as u64;
        c.pasids_live = bindings()
            .filter(|(p, b)| p.0 != 0 && **b != Binding::Blocked)
            .count() as u64;
        c
    }

    /// The mapped areas of the shadow IOAS of guest domain `did`, as `(iova, len, gpa)`
    /// (for tests and introspection).
    pub fn shadow_areas(&self, did: u16) -> Vec<(u64, u64, u64)> {
        let st = self.lock();
        st.shadows
            .values()
            .filter(|s| s.did == did)
            .flat_map(|s| s.areas().collect::<Vec<_>>())
            .collect()
    }
}

/// The host PASIDs a VM's PASID space hands out (PASID 0 is the no-PASID context).
pub const HOST_PASIDS: (u32, u32) = (1, (1 << 20) - 1);

/// A PASID space when the caller gives none: [`HOST_PASIDS`].
fn default_pasid_space() -> PasidSpace {
    match PasidSpace::new(HOST_PASIDS.0, HOST_PASIDS.1) {
        Some(s) => s,
        // The range is not empty; the allocator cannot refuse it.
        None => unreachable!("a non-empty PASID range"),
    }
}

fn already(bdf: PciBdf) -> BridgeError {
    BridgeError::Unsupported {
        bdf,
        pasid: Pasid(0),
        reason: "the device is already behind the vIOMMU".to_string(),
    }
}
