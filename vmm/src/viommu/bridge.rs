//! [`VtdBridge`]: the VM's [`ViommuBridge`], which turns guest intent (a (BDF, PASID)
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

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::PciBdf;
use devices::viommu::{
    BridgeError, BridgeMode, DmaView, DomainScope, GuestInvalidation, GuestPageResponse,
    SecondStage, Translation, ViommuBridge,
};
use ioasid::soft::{SlConfig, SoftIommu};
use ioasid::{
    alloc_nest_parent, bind_stage1, DevId, HwCaps, HwptAlloc, HwptId, Invalidation, IoasId,
    IommuBackend, NestParent, Pasid, PtId, VtdStage1,
};
use log::{debug, warn};

use super::guest_mem::RamMap;
use super::nested::{compact, host_invalidations, HostFormat};
use super::shadow::{ShadowDomain, SyncCtx, SyncReport};
use super::soft_path::{host_pasid, map_ram_ioas, SoftDma};
use super::view::{BridgeCounters, DevicePath, DeviceView, Released};
use crate::memory::RamRegion;

/// Tunables of the bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeLimits {
    /// Descents one shadow scan may make (one per leaf or hole): bounds the work a hostile
    /// table can cause. The default covers 8 GiB of 4 KiB mappings.
    pub max_scan_steps: u64,
}

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

#[derive(Debug)]
struct Device {
    dev: DevId,
    path: Path,
    bindings: BTreeMap<Pasid, Binding>,
}

#[derive(Debug, Default)]
struct State {
    devices: BTreeMap<PciBdf, Device>,
    shadows: BTreeMap<u64, ShadowDomain>,
    next_shadow: u64,
    /// An IOAS with nothing mapped, for blocked RIDs of assigned devices.
    blocked_ioas: Option<IoasId>,
    /// Guest-RAM IOASes of soft backends other than the VM's own.
    soft_ram: Vec<(Arc<SoftIommu>, IoasId)>,
    counters: BridgeCounters,
}

/// The VM's vIOMMU bridge. One per VM.
#[derive(Debug)]
pub struct VtdBridge {
    backend: Arc<dyn IommuBackend>,
    ram_ioas: IoasId,
    ram: RamMap,
    limits: BridgeLimits,
    state: Mutex<State>,
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
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
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
        let mut bindings = BTreeMap::new();
        bindings.insert(Pasid(0), Binding::PassThrough);
        st.devices.insert(
            bdf,
            Device {
                dev,
                path,
                bindings,
            },
        );
        Ok(())
    }

    /// An emulated device registered on `soft` as `dev`: it DMAs through the returned view,
    /// in pass-through until the guest says otherwise.
    pub fn add_emulated(
        &self,
        bdf: PciBdf,
        soft: Arc<SoftIommu>,
        dev: DevId,
    ) -> Result<Arc<dyn DmaView>, BridgeError> {
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
        let mut bindings = BTreeMap::new();
        bindings.insert(Pasid(0), Binding::PassThrough);
        st.devices.insert(
            bdf,
            Device {
                dev,
                path: Path::Emulated {
                    soft: soft.clone(),
                    ram_ioas,
                    parent,
                },
                bindings,
            },
        );
        Ok(Arc::new(SoftDma::new(soft, dev)))
    }

    /// Tears down what the bridge holds for `bdf`: detaches its PASIDs and its RID from the
    /// objects the bridge made (re-attaching nothing), destroys its nested HWPTs and nest
    /// parent, and the shadow IOASes no other device uses.
    pub fn remove(&self, bdf: PciBdf) -> Result<Released, BridgeError> {
        let mut st = self.lock();
        let d = st
            .devices
            .remove(&bdf)
            .ok_or(BridgeError::NoDevice { bdf })?;
        let mut rel = Released::default();
        let backend: &dyn IommuBackend = match &d.path {
            Path::Assigned { .. } => &*self.backend,
            Path::Emulated { soft, .. } => &**soft,
        };
        let emulated = matches!(d.path, Path::Emulated { .. });
        // PASIDs first, the RID last (the kernel wants PASIDs gone before the RID goes).
        for (pasid, b) in d.bindings.iter().rev() {
            let owned = !matches!(b, Binding::Blocked | Binding::PassThrough);
            match host_pasid(*pasid) {
                Some(p) if *b != Binding::Blocked => match backend.detach(d.dev, Some(p)) {
                    Ok(()) => rel.pasids += 1,
                    Err(e) => rel.errors.push(e.to_string()),
                },
                None if owned || emulated => {
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
                _ => {}
            }
        }
        for (pasid, b) in &d.bindings {
            self.release(&mut st, backend, bdf, *pasid, *b, Some(&mut rel));
        }
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

    fn blocked_ioas(&self, st: &mut State) -> ioasid::Result<IoasId> {
        if let Some(io) = st.blocked_ioas {
            return Ok(io);
        }
        let io = self.backend.ioas_alloc()?;
        st.blocked_ioas = Some(io);
        Ok(io)
    }

    fn sync_ctx(&self) -> SyncCtx<'_> {
        SyncCtx {
            backend: &*self.backend,
            ram_ioas: self.ram_ioas,
            ram: &self.ram,
            max_scan_steps: self.limits.max_scan_steps,
        }
    }

    fn account(&self, st: &mut State, did: u16, rep: &SyncReport) {
        st.counters.resyncs += 1;
        st.counters.shadow_map_calls += rep.maps;
        st.counters.shadow_unmap_calls += rep.unmaps;
        st.counters.bad_table_entries += rep.bad_entries;
        st.counters.host_errors += rep.host_errors.len() as u64;
        if let Some(b) = &rep.first_bad {
            warn!(
                "vIOMMU shadow of guest domain {did}: {} bad entries skipped (never mapped); \
                 first: {b}",
                rep.bad_entries
            );
        }
        for e in &rep.host_errors {
            warn!("vIOMMU shadow of guest domain {did}: {e}");
        }
    }

    /// Releases what `b` held for (bdf, pasid); the device is no longer attached to it.
    fn release(
        &self,
        st: &mut State,
        backend: &dyn IommuBackend,
        bdf: PciBdf,
        pasid: Pasid,
        b: Binding,
        mut rel: Option<&mut Released>,
    ) {
        match b {
            Binding::Shadow { id, .. } => {
                let empty = match st.shadows.get_mut(&id) {
                    Some(s) => {
                        s.users.remove(&(bdf, pasid));
                        s.users.is_empty()
                    }
                    None => false,
                };
                if empty {
                    if let Some(mut s) = st.shadows.remove(&id) {
                        let (unmaps, r) = s.release(&*self.backend);
                        st.counters.shadow_unmap_calls += unmaps;
                        match r {
                            Ok(()) => {
                                if let Some(rel) = rel.as_deref_mut() {
                                    rel.shadow_ioases += 1;
                                }
                            }
                            Err(e) => {
                                warn!("vIOMMU: shadow IOAS {} of {bdf}: {e}", s.ioas.0);
                                st.counters.host_errors += 1;
                                if let Some(rel) = rel.as_deref_mut() {
                                    rel.errors.push(e.to_string());
                                }
                            }
                        }
                    }
                }
            }
            Binding::Nested { hwpt, .. } | Binding::Soft { hwpt, .. } => {
                match backend.destroy(hwpt.0) {
                    Ok(()) => {
                        if let Some(rel) = rel {
                            rel.nested_hwpts += 1;
                        }
                    }
                    Err(e) => {
                        warn!("vIOMMU: nested HWPT {} of {bdf} {pasid}: {e}", hwpt.0);
                        st.counters.host_errors += 1;
                        if let Some(rel) = rel {
                            rel.errors.push(e.to_string());
                        }
                    }
                }
            }
            Binding::Blocked | Binding::PassThrough => {}
        }
    }

    /// The shadow domain for (did, table), created and synced if new; `(id, created)`.
    fn shadow_domain(
        &self,
        st: &mut State,
        bdf: PciBdf,
        did: u16,
        table: SecondStage,
    ) -> Result<(u64, bool), BridgeError> {
        if let Some((id, _)) = st
            .shadows
            .iter()
            .find(|(_, s)| s.did == did && s.table == table)
        {
            return Ok((*id, false));
        }
        let ioas = self.backend.ioas_alloc().map_err(host_err(bdf))?;
        let mut s = ShadowDomain::new(did, table, ioas, None);
        let rep = s.resync(&self.sync_ctx(), None);
        self.account(st, did, &rep);
        st.next_shadow += 1;
        let id = st.next_shadow;
        st.shadows.insert(id, s);
        Ok((id, true))
    }

    /// The nest parent of an assigned device, allocated on first use.
    fn nest_parent(
        &self,
        st: &mut State,
        bdf: PciBdf,
        pasid: Pasid,
    ) -> Result<HwptId, BridgeError> {
        let Some(d) = st.devices.get_mut(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let Path::Assigned { caps, parent, .. } = &mut d.path else {
            return Err(BridgeError::NoDevice { bdf });
        };
        if let Some(p) = parent {
            return Ok(*p);
        }
        let caps = caps.clone().unwrap_or_else(|| HwCaps::none("unknown"));
        match alloc_nest_parent(&*self.backend, &caps, d.dev, self.ram_ioas) {
            Ok(NestParent::Parent(h)) => {
                *parent = Some(h);
                st.counters.nest_parents_live += 1;
                Ok(h)
            }
            Ok(NestParent::Unsupported { reason }) => Err(BridgeError::Unsupported {
                bdf,
                pasid,
                reason: format!("{FIRST_STAGE_NEEDS_NESTING} ({reason})"),
            }),
            Err(e) => Err(host_err(bdf)(e)),
        }
    }

    /// Blocks (bdf, pasid): a PASID (or an emulated device's RID) is detached, an assigned
    /// device's RID is attached to the empty IOAS.
    fn block(
        &self,
        st: &mut State,
        bdf: PciBdf,
        pasid: Pasid,
        old: Binding,
    ) -> Result<Binding, BridgeError> {
        let Some(d) = st.devices.get(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let dev = d.dev;
        let hp = host_pasid(pasid);
        let soft = match &d.path {
            Path::Assigned { .. } => None,
            Path::Emulated { soft, .. } => Some(soft.clone()),
        };
        let backend: &dyn IommuBackend = match &soft {
            None => &*self.backend,
            Some(s) => &**s,
        };
        if hp.is_some() || soft.is_some() {
            if old != Binding::Blocked {
                backend.detach(dev, hp).map_err(host_err(bdf))?;
            }
        } else {
            let io = self.blocked_ioas(st).map_err(host_err(bdf))?;
            backend
                .attach(dev, None, PtId::Ioas(io))
                .map_err(host_err(bdf))?;
        }
        Ok(Binding::Blocked)
    }

    /// Prepares the host object for `t` on (bdf, pasid) and attaches the device to it.
    fn bind(
        &self,
        st: &mut State,
        bdf: PciBdf,
        pasid: Pasid,
        t: Translation,
        old: Binding,
    ) -> Result<Binding, BridgeError> {
        if t == Translation::Blocked {
            return self.block(st, bdf, pasid, old);
        }
        let Some(d) = st.devices.get(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let dev = d.dev;
        let hp = host_pasid(pasid);
        match (&d.path, t) {
            (_, Translation::Blocked) => Ok(Binding::Blocked),
            (Path::Assigned { .. }, Translation::PassThrough) => {
                self.backend
                    .attach(dev, hp, PtId::Ioas(self.ram_ioas))
                    .map_err(host_err(bdf))?;
                Ok(Binding::PassThrough)
            }
            (Path::Emulated { soft, ram_ioas, .. }, Translation::PassThrough) => {
                soft.attach(dev, hp, PtId::Ioas(*ram_ioas))
                    .map_err(host_err(bdf))?;
                Ok(Binding::PassThrough)
            }
            (Path::Assigned { .. }, Translation::SecondStage { did, table }) => {
                if let Binding::Shadow { id, .. } = old {
                    if st
                        .shadows
                        .get(&id)
                        .is_some_and(|s| s.did == did && s.table == table)
                    {
                        return Ok(old);
                    }
                }
                let (id, created) = self.shadow_domain(st, bdf, did, table)?;
                let Some(ioas) = st.shadows.get(&id).map(|s| s.ioas) else {
                    return Err(BridgeError::NoDevice { bdf });
                };
                if let Err(e) = self.backend.attach(dev, hp, PtId::Ioas(ioas)) {
                    if created {
                        if let Some(mut s) = st.shadows.remove(&id) {
                            let (unmaps, _) = s.release(&*self.backend);
                            st.counters.shadow_unmap_calls += unmaps;
                        }
                    }
                    return Err(host_err(bdf)(e));
                }
                if let Some(s) = st.shadows.get_mut(&id) {
                    s.users.insert((bdf, pasid));
                }
                Ok(Binding::Shadow { did, id })
            }
            (
                Path::Assigned {
                    caps,
                    format,
                    pasid_hwpts,
                    ..
                },
                Translation::FirstStage { did, table },
            ) => {
                if !caps.as_ref().is_some_and(HwCaps::supports_nesting) {
                    let why = caps
                        .as_ref()
                        .and_then(HwCaps::nesting_unsupported_reason)
                        .unwrap_or_else(|| "no host capabilities".to_string());
                    return Err(BridgeError::Unsupported {
                        bdf,
                        pasid,
                        reason: format!("{FIRST_STAGE_NEEDS_NESTING} ({why})"),
                    });
                }
                if let Binding::Nested {
                    did: od, table: ot, ..
                } = old
                {
                    if od == did && ot == table {
                        return Ok(old);
                    }
                }
                let (format, pasid_hwpts) = (*format, *pasid_hwpts);
                let parent = self.nest_parent(st, bdf, pasid)?;
                let hwpt = bind_stage1(
                    &*self.backend,
                    dev,
                    parent,
                    format.stage1(&table),
                    None,
                    pasid_hwpts || hp.is_some(),
                )
                .map_err(host_err(bdf))?;
                if let Err(e) = self.backend.attach(dev, hp, PtId::Hwpt(hwpt)) {
                    let _ = self.backend.destroy(hwpt.0);
                    return Err(host_err(bdf)(e));
                }
                Ok(Binding::Nested { did, table, hwpt })
            }
            (Path::Emulated { soft, parent, .. }, Translation::SecondStage { did, table }) => {
                if let Binding::Soft { t: ot, .. } = old {
                    if ot == t {
                        return Ok(old);
                    }
                }
                let cfg = SlConfig {
                    root: table.root,
                    levels: table.levels,
                };
                let hwpt = soft
                    .hwpt_alloc_second_level(dev, *parent, cfg, None, true)
                    .map_err(|e| bad_table(bdf, pasid, table.root, e))?;
                attach_soft(soft, dev, hp, hwpt, bdf)?;
                Ok(Binding::Soft { did, t, hwpt })
            }
            (Path::Emulated { soft, parent, .. }, Translation::FirstStage { did, table }) => {
                if let Binding::Soft { t: ot, .. } = old {
                    if ot == t {
                        return Ok(old);
                    }
                }
                let hwpt = bind_stage1(
                    &**soft,
                    dev,
                    *parent,
                    HostFormat::VtdS1.stage1(&table),
                    None,
                    true,
                )
                .map_err(|e| bad_table(bdf, pasid, table.pgtbl_addr, e))?;
                attach_soft(soft, dev, hp, hwpt, bdf)?;
                Ok(Binding::Soft { did, t, hwpt })
            }
        }
    }
}

fn already(bdf: PciBdf) -> BridgeError {
    BridgeError::Unsupported {
        bdf,
        pasid: Pasid(0),
        reason: "the device is already behind the vIOMMU".to_string(),
    }
}

fn bad_table(bdf: PciBdf, pasid: Pasid, gpa: u64, e: ioasid::Error) -> BridgeError {
    BridgeError::BadTable {
        bdf,
        pasid,
        gpa,
        reason: e.to_string(),
    }
}

fn attach_soft(
    soft: &SoftIommu,
    dev: DevId,
    hp: Option<Pasid>,
    hwpt: HwptId,
    bdf: PciBdf,
) -> Result<(), BridgeError> {
    if let Err(e) = soft.attach(dev, hp, PtId::Hwpt(hwpt)) {
        let _ = soft.destroy(hwpt.0);
        return Err(host_err(bdf)(e));
    }
    Ok(())
}

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
