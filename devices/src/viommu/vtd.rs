//! The emulated VT-d remapping unit: its 4 KiB register page ([`BusDevice`]), the state
//! behind the registers, and the glue from guest actions (GCMD, the QI doorbell, page
//! requests) to the [`ViommuBridge`].
//!
//! Caching mode is always on, so the guest invalidates the context or PASID cache after it
//! makes an entry present or changes it; that invalidation is when the model re-reads the
//! entries (only for the devices registered with [`Vtd::add_device`]) and tells the bridge
//! every (BDF, PASID) whose translation changed. The last translation sent per (BDF, PASID)
//! is kept to diff against.

use std::collections::BTreeMap;
use std::sync::Arc;

use ioasid::{Invalidation, PageResponseCode, Pasid};
use serde::Serialize;

use crate::bus::BusDevice;
use crate::pci::ratelimit::GuestWarn;
use crate::pci::{MsiMessage, PciBdf};

use super::bridge::{
    BridgeError, DomainScope, GuestInvalidation, GuestPageResponse, Translation, ViommuBridge,
};
use super::caps::{VtdConfig, VtdConfigError, NUM_FAULT_RECORDS};
use super::event::EventRegs;
use super::fault::{DmaFaultKind, FaultRecord, FaultUnit};
use super::mem::{GuestMemoryAccess, MsiSignal};
use super::prq::{PageRequest, PrqError, PrqRegs, OFFSET_MASK};
use super::qi::{
    self, ContextScope, Descriptor, DescriptorKind, IotlbScope, IqeCause, PasidCacheScope,
};
use super::regs::{self, ccmd, gcmd, ics, iotlb, iqa, rtaddr};
use super::tables::{self, DeviceContext, FaultReason, TableFault};

/// What the unit did, for `vm.counters`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VtdCounters {
    /// Context-cache invalidation descriptors processed.
    pub desc_context_cache: u64,
    /// IOTLB invalidation descriptors processed.
    pub desc_iotlb: u64,
    /// Device-TLB invalidation descriptors processed.
    pub desc_device_tlb: u64,
    /// Interrupt entry cache invalidation descriptors (ignored: no IR).
    pub desc_iec: u64,
    /// Invalidation wait descriptors processed.
    pub desc_wait: u64,
    /// PASID-based IOTLB invalidation descriptors processed.
    pub desc_pasid_iotlb: u64,
    /// PASID-cache invalidation descriptors processed.
    pub desc_pasid_cache: u64,
    /// PASID-based device-TLB invalidation descriptors processed.
    pub desc_pasid_device_tlb: u64,
    /// Page group response descriptors processed.
    pub desc_page_response: u64,
    /// Descriptors that stopped the queue (FSTS.IQE).
    pub queue_errors: u64,
    /// IQT writes (doorbells).
    pub doorbells: u64,
    /// `ViommuBridge::set_translation` calls.
    pub set_translation_calls: u64,
    /// `ViommuBridge::invalidate` calls.
    pub invalidate_calls: u64,
    /// Errors the bridge returned.
    pub bridge_errors: u64,
    /// Fault records written.
    pub faults_recorded: u64,
    /// Page requests queued to the guest.
    pub page_requests: u64,
    /// Page requests refused because the queue was full.
    pub prq_full: u64,
    /// Page responses passed to the bridge.
    pub page_responses: u64,
    /// Register accesses of a size or alignment other than 32/64-bit aligned (ignored).
    pub bad_accesses: u64,
}

impl VtdCounters {
    /// Guest invalidation descriptors processed, all types.
    pub fn descriptors(&self) -> u64 {
        self.desc_context_cache
            + self.desc_iotlb
            + self.desc_device_tlb
            + self.desc_iec
            + self.desc_wait
            + self.desc_pasid_iotlb
            + self.desc_pasid_cache
            + self.desc_pasid_device_tlb
            + self.desc_page_response
    }

    fn count(&mut self, kind: DescriptorKind) {
        let c = match kind {
            DescriptorKind::ContextCache => &mut self.desc_context_cache,
            DescriptorKind::Iotlb => &mut self.desc_iotlb,
            DescriptorKind::DeviceTlb => &mut self.desc_device_tlb,
            DescriptorKind::InterruptEntryCache => &mut self.desc_iec,
            DescriptorKind::Wait => &mut self.desc_wait,
            DescriptorKind::PasidIotlb => &mut self.desc_pasid_iotlb,
            DescriptorKind::PasidCache => &mut self.desc_pasid_cache,
            DescriptorKind::PasidDeviceTlb => &mut self.desc_pasid_device_tlb,
            DescriptorKind::PageResponse => &mut self.desc_page_response,
        };
        *c += 1;
    }
}

/// The guest-programmed state of the unit, for `vm.iommu` and debugging.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VtdStatus {
    /// GSTS.
    pub gsts: u32,
    /// Translation enabled (GSTS.TES).
    pub translation_enabled: bool,
    /// Queued invalidation enabled (GSTS.QIES).
    pub qi_enabled: bool,
    /// The root table latched by the last SRTP (with TTM), if any.
    pub root_table: Option<u64>,
    /// The latched root table is in scalable mode (TTM = 01b).
    pub scalable: bool,
    /// FSTS.
    pub fsts: u32,
    /// IQA.
    pub iqa: u64,
    /// IQH.
    pub iqh: u64,
    /// IQT.
    pub iqt: u64,
    /// PQA.
    pub pqa: u64,
    /// PQH.
    pub pqh: u64,
    /// PQT.
    pub pqt: u64,
    /// PRS.
    pub prs: u32,
}

/// The register version: 3.0 in scalable mode (as QEMU reports), 1.0 otherwise.
fn version(cfg: &VtdConfig) -> u32 {
    if cfg.scalable_mode {
        0x30
    } else {
        0x10
    }
}

/// One emulated VT-d remapping unit.
pub struct Vtd {
    cfg: VtdConfig,
    cap: u64,
    ecap: u64,
    mem: Arc<dyn GuestMemoryAccess>,
    bridge: Arc<dyn ViommuBridge>,
    msi: Arc<dyn MsiSignal>,
    gsts: u32,
    rtaddr: u64,
    /// RTADDR as latched by the last SRTP.
    root: Option<u64>,
    ccmd: u64,
    iva: u64,
    iotlb_reg: u64,
    faults: FaultUnit,
    iqh: u64,
    iqt: u64,
    iqa: u64,
    ics: u32,
    inv_event: EventRegs,
    iqercd: u64,
    prq: PrqRegs,
    /// Registered devices by requester id.
    devices: BTreeMap<u16, PciBdf>,
    /// Last translation sent per (requester id, PASID).
    known: BTreeMap<(u16, u32), Translation>,
    counters: VtdCounters,
    warnings: GuestWarn,
}

impl std::fmt::Debug for Vtd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vtd")
            .field("cfg", &self.cfg)
            .field("gsts", &format_args!("{:#x}", self.gsts))
            .field("devices", &self.devices.len())
            .field("counters", &self.counters)
            .finish()
    }
}

fn bdf_from_rid(segment: u16, rid: u16) -> PciBdf {
    let bus = (rid >> 8) as u8;
    let dev = ((rid >> 3) & 0x1f) as u8;
    let func = (rid & 7) as u8;
    PciBdf::new(segment, bus, dev, func).unwrap_or_else(|_| PciBdf::root_slot(segment, dev))
}

impl Vtd {
    /// Size of the register page.
    pub const MMIO_SIZE: u64 = 4096;

    /// A unit with `cfg`, reading guest tables through `mem`, telling `bridge` about
    /// translations and sending its interrupts through `msi`.
    pub fn new(
        cfg: VtdConfig,
        mem: Arc<dyn GuestMemoryAccess>,
        bridge: Arc<dyn ViommuBridge>,
        msi: Arc<dyn MsiSignal>,
    ) -> Result<Vtd, VtdConfigError> {
        cfg.validate()?;
        Ok(Vtd {
            cap: cfg.cap(),
            ecap: cfg.ecap(),
            cfg,
            mem,
            bridge,
            msi,
            gsts: 0,
            rtaddr: 0,
            root: None,
            ccmd: 0,
            iva: 0,
            iotlb_reg: 0,
            faults: FaultUnit::new(),
            iqh: 0,
            iqt: 0,
            iqa: 0,
            ics: 0,
            inv_event: EventRegs::new(),
            iqercd: 0,
            prq: PrqRegs::new(),
            devices: BTreeMap::new(),
            known: BTreeMap::new(),
            counters: VtdCounters::default(),
            warnings: GuestWarn::new(),
        })
    }

    /// The options this unit was built with.
    pub fn config(&self) -> &VtdConfig {
        &self.cfg
    }

    /// The CAP register the guest sees.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The ECAP register the guest sees.
    pub fn ecap(&self) -> u64 {
        self.ecap
    }

    /// The counters.
    pub fn counters(&self) -> VtdCounters {
        self.counters
    }

    /// The guest-programmed state.
    pub fn status(&self) -> VtdStatus {
        VtdStatus {
            gsts: self.gsts,
            translation_enabled: self.translation_enabled(),
            qi_enabled: self.gsts & gcmd::QIE != 0,
            root_table: self.root,
            scalable: self.scalable_active(),
            fsts: self.faults.fsts(),
            iqa: self.iqa,
            iqh: self.iqh,
            iqt: self.iqt,
            pqa: self.prq.pqa,
            pqh: self.prq.pqh,
            pqt: self.prq.pqt,
            prs: self.prq.prs,
        }
    }

    /// Whether the guest enabled translation (GSTS.TES).
    pub fn translation_enabled(&self) -> bool {
        self.gsts & gcmd::TE != 0
    }

    /// The devices in this unit's scope.
    pub fn devices(&self) -> Vec<PciBdf> {
        self.devices.values().copied().collect()
    }

    /// Puts `bdf` in this unit's scope. With translation disabled the bridge is assumed to
    /// start the device in pass-through and is not called; with translation enabled (a
    /// hot-plugged device) its context is read now and sent (usually `Blocked`: the guest
    /// has not set it up yet).
    pub fn add_device(&mut self, bdf: PciBdf) {
        let rid = bdf.rid();
        self.devices.insert(rid, bdf);
        if self.translation_enabled() {
            self.refresh_device(rid);
        } else {
            self.known.insert((rid, 0), Translation::PassThrough);
        }
    }

    /// Takes `bdf` out of scope and forgets its translations without calling the bridge
    /// (the VMM tears the device's host state down itself).
    pub fn remove_device(&mut self, bdf: PciBdf) {
        let rid = bdf.rid();
        self.devices.remove(&rid);
        self.known.retain(|(r, _), _| *r != rid);
    }

    /// The last translation sent for (`bdf`, `pasid`); requests without PASID are PASID 0
    /// (the RID_PASID Linux uses).
    pub fn translation(&self, bdf: PciBdf, pasid: Pasid) -> Option<Translation> {
        self.known.get(&(bdf.rid(), pasid.0)).copied()
    }

    /// Every (BDF, PASID) with its last translation.
    pub fn translations(&self) -> Vec<(PciBdf, Pasid, Translation)> {
        self.known
            .iter()
            .map(|(&(rid, pasid), t)| (self.bdf_of(rid), Pasid(pasid), *t))
            .collect()
    }

    /// Queues a page request for the guest (PRQ). A full queue sets PRS.PRO and returns
    /// [`PrqError::Full`]: the caller answers the device itself (SUCCESS, the device
    /// retries). A device whose context entry does not enable page requests (PRE) gets
    /// [`PrqError::Refused`] and a fault record, as QEMU does: answer it Invalid.
    pub fn post_page_request(&mut self, req: PageRequest) -> Result<(), PrqError> {
        if !self.cfg.svm || !self.prq.enabled() {
            return Err(PrqError::NotEnabled { bdf: req.bdf });
        }
        let refused = |reason| PrqError::Refused {
            bdf: req.bdf,
            reason,
        };
        if !self.translation_enabled() {
            return Err(refused("translation is disabled"));
        }
        let rid = req.bdf.rid();
        match self.context_of(rid) {
            Some(DeviceContext::Scalable(ctx)) if ctx.pre => {}
            Some(DeviceContext::Scalable(ctx)) => {
                if !ctx.fpd {
                    self.record_fault(FaultRecord {
                        sid: rid,
                        pasid: req.pasid.map(|p| p.0),
                        reason: FaultReason::PageRequestDisabled.code(true),
                        addr: req.addr,
                        write: req.write,
                    });
                }
                return Err(refused("the context entry's PRE bit is clear"));
            }
            _ => return Err(refused("no scalable-mode context entry")),
        }
        match self.prq.post(self.mem.as_ref(), &req) {
            Ok(msg) => {
                self.counters.page_requests += 1;
                self.signal(msg);
                Ok(())
            }
            Err((e, msg)) => {
                if matches!(e, PrqError::Full { .. }) {
                    self.counters.prq_full += 1;
                }
                self.signal(msg);
                Err(e)
            }
        }
    }

    /// Records a fault for a DMA request that the VMM's translation path refused (soft
    /// walk or shadow miss), so that the guest sees it as it would on hardware: a fault
    /// recording register and the fault event. Ignored while translation is disabled.
    pub fn record_dma_fault(
        &mut self,
        bdf: PciBdf,
        pasid: Option<Pasid>,
        addr: u64,
        kind: DmaFaultKind,
    ) {
        if !self.translation_enabled() {
            return;
        }
        self.record_fault(FaultRecord {
            sid: bdf.rid(),
            pasid: pasid.map(|p| p.0),
            reason: kind.code(),
            addr,
            write: matches!(kind, DmaFaultKind::Write),
        });
    }

    fn bdf_of(&self, rid: u16) -> PciBdf {
        self.devices
            .get(&rid)
            .copied()
            .unwrap_or_else(|| bdf_from_rid(self.cfg.segment, rid))
    }

    fn signal(&self, msg: Option<MsiMessage>) {
        if let Some(m) = msg {
            self.msi.signal(m);
        }
    }

    fn warn_limited(&self, what: std::fmt::Arguments<'_>) {
        self.warnings.warn(format_args!("vIOMMU: {what}"));
    }

    fn scalable_active(&self) -> bool {
        self.root
            .is_some_and(|r| r & rtaddr::TTM_MASK == rtaddr::TTM_SCALABLE)
    }

    fn record_fault(&mut self, rec: FaultRecord) {
        let (recorded, msg) = self.faults.record(&rec);
        if recorded {
            self.counters.faults_recorded += 1;
        }
        self.signal(msg);
    }

    fn table_fault(&mut self, rid: u16, f: TableFault) {
        if f.fpd {
            return;
        }
        let rec = FaultRecord {
            sid: rid,
            pasid: f.pasid,
            reason: f.reason.code(self.scalable_active()),
            addr: f.addr,
            write: false,
        };
        self.record_fault(rec);
    }

    fn bridge_error(&mut self, e: BridgeError, t: Option<Translation>) {
        self.counters.bridge_errors += 1;
        self.warn_limited(format_args!("bridge: {e}"));
        let (bdf, pasid, reason, addr) = match &e {
            BridgeError::BadTable {
                bdf, pasid, gpa, ..
            } => {
                let reason = match t {
                    Some(Translation::FirstStage { .. }) => FaultReason::FirstStageAccess,
                    _ => FaultReason::SecondStageAccess,
                };
                (*bdf, *pasid, reason, *gpa)
            }
            BridgeError::Unsupported { bdf, pasid, .. } => {
                (*bdf, *pasid, FaultReason::PasidEntryInvalid, 0)
            }
            BridgeError::NoDevice { .. } | BridgeError::Host { .. } => return,
        };
        let rec = FaultRecord {
            sid: bdf.rid(),
            pasid: Some(pasid.0),
            reason: reason.code(self.scalable_active()),
            addr,
            write: false,
        };
        self.record_fault(rec);
    }

    fn send_translation(&mut self, rid: u16, pasid: u32, t: Translation) {
        self.counters.set_translation_calls += 1;
        let bdf = self.bdf_of(rid);
        if let Err(e) = self.bridge.set_translation(bdf, Pasid(pasid), t) {
            self.bridge_error(e, Some(t));
        }
        self.known.insert((rid, pasid), t);
    }

    fn forget_translation(&mut self, rid: u16, pasid: u32) {
        if self.known.remove(&(rid, pasid)).is_some() {
            self.counters.set_translation_calls += 1;
            let bdf = self.bdf_of(rid);
            if let Err(e) = self
                .bridge
                .set_translation(bdf, Pasid(pasid), Translation::Blocked)
            {
                self.bridge_error(e, None);
            }
        }
    }

    /// Reads the device's context (recording faults) while translation is enabled.
    fn context_of(&mut self, rid: u16) -> Option<DeviceContext> {
        let root = self.root?;
        match tables::read_context(self.mem.as_ref(), &self.cfg, root, rid) {
            Ok(c) => Some(c),
            Err(f) => {
                self.table_fault(rid, f);
                None
            }
        }
    }

    /// Every translation of device `rid` as the tables say now.
    fn device_view(&mut self, rid: u16) -> BTreeMap<u32, Translation> {
        let mut view = BTreeMap::new();
        if !self.translation_enabled() {
            view.insert(0, Translation::PassThrough);
            return view;
        }
        match self.context_of(rid) {
            None | Some(DeviceContext::NotPresent) => {
                view.insert(0, Translation::Blocked);
            }
            Some(DeviceContext::Legacy(e)) => {
                view.insert(0, e.translation);
            }
            Some(DeviceContext::Scalable(ctx)) => {
                let t = match tables::read_pasid(self.mem.as_ref(), &self.cfg, &ctx, ctx.rid_pasid)
                {
                    Ok(Some(t)) => t,
                    Ok(None) => Translation::Blocked,
                    Err(f) => {
                        self.table_fault(rid, f);
                        Translation::Blocked
                    }
                };
                view.insert(ctx.rid_pasid, t);
                let scan = tables::scan_pasids(self.mem.as_ref(), &self.cfg, &ctx);
                for f in scan.faults {
                    self.table_fault(rid, f);
                }
                view.extend(scan.present);
            }
        }
        view
    }

    /// Re-reads every translation of device `rid` and sends the differences.
    fn refresh_device(&mut self, rid: u16) {
        let view = self.device_view(rid);
        let old: Vec<u32> = self
            .known
            .range((rid, 0)..=(rid, u32::MAX))
            .map(|(&(_, p), _)| p)
            .collect();
        for p in old {
            if !view.contains_key(&p) {
                self.forget_translation(rid, p);
            }
        }
        for (p, t) in view {
            if self.known.get(&(rid, p)) != Some(&t) {
                self.send_translation(rid, p, t);
            }
        }
    }

    /// Re-reads one PASID of device `rid` (PASID-selective PASID-cache invalidation).
    fn refresh_pasid(&mut self, rid: u16, pasid: u32) {
        if !self.translation_enabled() {
            return;
        }
        let ctx = match self.context_of(rid) {
            Some(DeviceContext::Scalable(ctx)) => ctx,
            // Legacy or missing context: the whole device.
            _ => return self.refresh_device(rid),
        };
        if pasid != ctx.rid_pasid && !ctx.paside {
            return self.forget_translation(rid, pasid);
        }
        let t = match tables::read_pasid(self.mem.as_ref(), &self.cfg, &ctx, pasid) {
            Ok(t) => t,
            Err(f) => {
                self.table_fault(rid, f);
                None
            }
        };
        match t {
            Some(t) => {
                if self.known.get(&(rid, pasid)) != Some(&t) {
                    self.send_translation(rid, pasid, t);
                }
            }
            None if pasid == ctx.rid_pasid => {
                if self.known.get(&(rid, pasid)) != Some(&Translation::Blocked) {
                    self.send_translation(rid, pasid, Translation::Blocked);
                }
            }
            None => self.forget_translation(rid, pasid),
        }
    }

    fn refresh_all(&mut self) {
        let rids: Vec<u16> = self.devices.keys().copied().collect();
        for rid in rids {
            self.refresh_device(rid);
        }
    }

    fn context_invalidate(&mut self, scope: ContextScope) {
        let rids: Vec<u16> = self
            .devices
            .keys()
            .copied()
            .filter(|r| scope.covers(*r))
            .collect();
        for rid in rids {
            self.refresh_device(rid);
        }
    }

    fn pasid_cache_invalidate(&mut self, scope: PasidCacheScope) {
        match scope {
            // Refreshing more than the guest named is allowed: with caching mode the unit
            // may refill any cache entry at any time.
            PasidCacheScope::Global | PasidCacheScope::Domain(_) => self.refresh_all(),
            PasidCacheScope::Pasid { pasid, .. } => {
                let rids: Vec<u16> = self.devices.keys().copied().collect();
                for rid in rids {
                    self.refresh_pasid(rid, pasid);
                }
            }
        }
    }

    // ---- registers ----

    fn write_gcmd(&mut self, v: u32) {
        if v & gcmd::SRTP != 0 {
            // Latch only: the guest follows with a global context invalidation.
            self.root = Some(self.rtaddr);
            self.gsts |= gcmd::SRTP;
        }
        let qie = v & gcmd::QIE != 0;
        if qie != (self.gsts & gcmd::QIE != 0) {
            if qie {
                self.iqh = 0;
                self.gsts |= gcmd::QIE;
                self.process_queue();
            } else {
                // Linux waits for IQH == IQT before it disables; the queue restarts at 0.
                self.gsts &= !gcmd::QIE;
                self.iqh = 0;
                self.iqt = 0;
            }
        }
        let te = v & gcmd::TE != 0;
        if te != self.translation_enabled() {
            if te {
                self.gsts |= gcmd::TE;
            } else {
                self.gsts &= !gcmd::TE;
            }
            self.refresh_all();
        }
        // WBF completes at once (WBFS stays clear); SFL, EAFL, IRE, SIRTP and CFI name
        // features the unit does not have and are ignored.
    }

    fn write_ccmd(&mut self, v: u64) {
        if v & ccmd::ICC == 0 {
            self.ccmd = v;
            return;
        }
        let cirg = (v >> ccmd::CIRG_SHIFT) & 3;
        let scope = match cirg {
            1 => Some(ContextScope::Global),
            2 => Some(ContextScope::Domain((v & 0xffff) as u16)),
            3 => Some(ContextScope::Device {
                did: (v & 0xffff) as u16,
                sid: ((v >> 16) & 0xffff) as u16,
                fm: ((v >> 32) & 3) as u8,
            }),
            _ => None,
        };
        if let Some(scope) = scope {
            self.context_invalidate(scope);
        }
        let caig = if scope.is_some() { cirg } else { 0 };
        self.ccmd = (v & !ccmd::ICC & !(3 << ccmd::CAIG_SHIFT)) | (caig << ccmd::CAIG_SHIFT);
    }

    fn write_iotlb(&mut self, v: u64) {
        if v & iotlb::IVT == 0 {
            self.iotlb_reg = v;
            return;
        }
        let iirg = (v >> iotlb::IIRG_SHIFT) & 3;
        let did = ((v >> 32) & 0xffff) as u16;
        let scope = match iirg {
            1 => Some(IotlbScope::Global),
            2 => Some(IotlbScope::Domain(did)),
            3 => {
                let am = (self.iva & 0x3f).min(u64::from(super::caps::MAMV));
                let npages = 1u64 << am;
                Some(IotlbScope::Pages {
                    did,
                    pasid: None,
                    addr: self.iva & !0xfff & !((npages << 12) - 1),
                    npages,
                    ih: self.iva & (1 << 6) != 0,
                })
            }
            _ => None,
        };
        if let Some(scope) = scope {
            let batch = [iotlb_invalidation(scope)];
            self.send_invalidations(&batch);
        }
        let iaig = if scope.is_some() { iirg } else { 0 };
        self.iotlb_reg =
            (v & !iotlb::IVT & !(3 << iotlb::IAIG_SHIFT)) | (iaig << iotlb::IAIG_SHIFT);
    }

    fn send_invalidations(&mut self, batch: &[GuestInvalidation]) {
        if batch.is_empty() {
            return;
        }
        self.counters.invalidate_calls += 1;
        if let Err(e) = self.bridge.invalidate(batch) {
            self.bridge_error(e, None);
        }
    }

    fn queue_error(&mut self, cause: IqeCause) {
        self.iqercd = cause.iqei();
        self.counters.queue_errors += 1;
        let msg = self.faults.set_iqe();
        self.signal(msg);
    }

    /// Processes descriptors from IQH to IQT (the doorbell), bounded by the queue size.
    fn process_queue(&mut self) {
        if self.gsts & gcmd::QIE == 0 || self.faults.iqe() {
            return;
        }
        let wide = self.cfg.scalable_mode && self.iqa & iqa::DW != 0;
        let desc_size: u64 = if wide { 32 } else { 16 };
        let qsize = 4096u64 << (self.iqa & iqa::QS_MASK);
        let tail = self.iqt;
        if tail >= qsize || !tail.is_multiple_of(desc_size) {
            return self.queue_error(IqeCause::InvalidTail);
        }
        let base = self.iqa & iqa::ADDR_MASK;
        let mut head = (self.iqh % qsize) & !(desc_size - 1);
        self.iqh = head;
        let mut batch: Vec<GuestInvalidation> = Vec::new();
        let mut buf = [0u8; 32];
        for _ in 0..qsize / desc_size {
            if head == tail {
                break;
            }
            let bytes = buf.get_mut(..desc_size as usize).unwrap_or_default();
            let fetched = base
                .checked_add(head)
                .is_some_and(|a| self.mem.read(a, bytes).is_ok());
            if !fetched {
                self.send_invalidations(&batch);
                return self.queue_error(IqeCause::FetchError);
            }
            let mut q = [0u64; 4];
            for (slot, chunk) in q.iter_mut().zip(bytes.chunks_exact(8)) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                *slot = u64::from_le_bytes(b);
            }
            let desc = match qi::decode(&q, &self.cfg) {
                Ok(d) => d,
                Err(cause) => {
                    // IQH stays at the offending descriptor.
                    self.send_invalidations(&batch);
                    return self.queue_error(cause);
                }
            };
            if let Some(kind) = qi::kind_of(q[0]) {
                self.counters.count(kind);
            }
            self.execute(desc, &mut batch);
            head = (head + desc_size) % qsize;
            self.iqh = head;
        }
        self.send_invalidations(&batch);
    }

    fn execute(&mut self, desc: Descriptor, batch: &mut Vec<GuestInvalidation>) {
        match desc {
            Descriptor::ContextCache(scope) => self.context_invalidate(scope),
            Descriptor::PasidCache(scope) => self.pasid_cache_invalidate(scope),
            Descriptor::Iotlb(scope) => batch.push(iotlb_invalidation(scope)),
            Descriptor::DeviceTlb {
                sid,
                pasid,
                addr,
                npages,
            } => batch.push(GuestInvalidation::DeviceTlb {
                bdf: self.bdf_of(sid),
                pasid: pasid.map(Pasid),
                addr,
                npages,
            }),
            Descriptor::InterruptEntryCache => {}
            Descriptor::Wait {
                status, interrupt, ..
            } => {
                // The host invalidation happens before the status write the guest polls.
                self.send_invalidations(batch);
                batch.clear();
                if let Some((addr, data)) = status {
                    if let Err(e) = self.mem.write(addr, &data.to_le_bytes()) {
                        self.warn_limited(format_args!("invalidation wait status write: {e}"));
                    }
                }
                if interrupt && self.ics & ics::IWC == 0 {
                    self.ics |= ics::IWC;
                    let msg = self.inv_event.raise();
                    self.signal(msg);
                }
            }
            Descriptor::PageResponse {
                rid,
                pasid,
                prgi,
                code,
            } => {
                // Invalidations queued before the response reach the host first: the device
                // retries as soon as it has the response.
                self.send_invalidations(batch);
                batch.clear();
                let resp = GuestPageResponse {
                    bdf: self.bdf_of(rid),
                    pasid: pasid.map(Pasid),
                    prgi,
                    code: if code == 0 {
                        PageResponseCode::Success
                    } else {
                        PageResponseCode::Invalid
                    },
                };
                self.counters.page_responses += 1;
                if let Err(e) = self.bridge.page_response(resp) {
                    self.bridge_error(e, None);
                }
            }
        }
    }

    /// The value of the register that starts at `start`.
    fn reg_read(&self, start: u64) -> u64 {
        match start {
            regs::VER => u64::from(version(&self.cfg)),
            regs::CAP => self.cap,
            regs::ECAP => self.ecap,
            regs::GCMD => 0,
            regs::GSTS => u64::from(self.gsts),
            regs::RTADDR => self.rtaddr,
            regs::CCMD => self.ccmd,
            regs::FSTS => u64::from(self.faults.fsts()),
            regs::FECTL => u64::from(self.faults.event.ctl()),
            regs::FEDATA => u64::from(self.faults.event.data()),
            regs::FEADDR => u64::from(self.faults.event.addr()),
            regs::FEUADDR => u64::from(self.faults.event.uaddr()),
            regs::IQH => self.iqh,
            regs::IQT => self.iqt,
            regs::IQA => self.iqa,
            regs::ICS => u64::from(self.ics),
            regs::IECTL => u64::from(self.inv_event.ctl()),
            regs::IEDATA => u64::from(self.inv_event.data()),
            regs::IEADDR => u64::from(self.inv_event.addr()),
            regs::IEUADDR => u64::from(self.inv_event.uaddr()),
            regs::IQERCD => self.iqercd,
            regs::PQH => self.prq.pqh,
            regs::PQT => self.prq.pqt,
            regs::PQA => self.prq.pqa,
            regs::PRS => u64::from(self.prq.prs),
            regs::PECTL => u64::from(self.prq.event.ctl()),
            regs::PEDATA => u64::from(self.prq.event.data()),
            regs::PEADDR => u64::from(self.prq.event.addr()),
            regs::PEUADDR => u64::from(self.prq.event.uaddr()),
            regs::IVA => self.iva,
            regs::IOTLB => self.iotlb_reg,
            _ => match frcd_index(start) {
                Some((i, high)) => self.faults.read_frcd(i, high),
                None => 0,
            },
        }
    }

    /// A write of the register at `start`: `v` is the merged value, `mask` the bits the
    /// access wrote (a 32-bit half of a 64-bit register writes half of them).
    fn reg_write(&mut self, start: u64, v: u64, mask: u64) {
        let v32 = v as u32;
        match start {
            regs::GCMD => self.write_gcmd(v32),
            regs::RTADDR => {
                let ttm = if self.cfg.scalable_mode {
                    rtaddr::TTM_MASK
                } else {
                    0
                };
                self.rtaddr = v & (!0xfff | ttm);
            }
            regs::CCMD => self.write_ccmd(v),
            regs::FSTS => {
                // Clearing IQE resumes fetching at IQH, as the spec says (QEMU waits for
                // the next IQT write). Linux copies its wait descriptor over the bad one
                // before it clears IQE, so both work for it.
                if self.faults.write_fsts(v32) {
                    self.process_queue();
                }
            }
            regs::FECTL => {
                let msg = self.faults.event.write_ctl(v32);
                self.signal(msg);
            }
            regs::FEDATA => self.faults.event.write_data(v32),
            regs::FEADDR => self.faults.event.write_addr(v32),
            regs::FEUADDR => self.faults.event.write_uaddr(v32),
            regs::IQT => {
                self.iqt = v & 0x7fff0;
                self.counters.doorbells += 1;
                self.process_queue();
            }
            regs::IQA => {
                let dw = if self.cfg.scalable_mode { iqa::DW } else { 0 };
                self.iqa = v & (iqa::ADDR_MASK | dw | iqa::QS_MASK);
            }
            regs::ICS => {
                if v32 & ics::IWC != 0 {
                    self.ics &= !ics::IWC;
                    self.inv_event.clear_pending();
                }
            }
            regs::IECTL => {
                let msg = self.inv_event.write_ctl(v32);
                self.signal(msg);
            }
            regs::IEDATA => self.inv_event.write_data(v32),
            regs::IEADDR => self.inv_event.write_addr(v32),
            regs::IEUADDR => self.inv_event.write_uaddr(v32),
            regs::PQH => self.prq.pqh = v & OFFSET_MASK,
            // Linux resets PQT (and PQH) to 0 before it programs PQA.
            regs::PQT => self.prq.pqt = v & OFFSET_MASK,
            regs::PQA => self.prq.pqa = v & (!0xfff | 7),
            regs::PRS => self.prq.write_prs(v32),
            regs::PECTL => {
                let msg = self.prq.event.write_ctl(v32);
                self.signal(msg);
            }
            regs::PEDATA => self.prq.event.write_data(v32),
            regs::PEADDR => self.prq.event.write_addr(v32),
            regs::PEUADDR => self.prq.event.write_uaddr(v32),
            regs::IVA => self.iva = v & (!0xfff | 0x7f),
            regs::IOTLB => self.write_iotlb(v),
            _ => {
                if let Some((i, high)) = frcd_index(start) {
                    self.faults.write_frcd(i, high, v & mask);
                }
                // VER, CAP, ECAP, GSTS, IQH, IQERCD: read-only.
            }
        }
    }

    /// Whether an access of `len` bytes at `offset` is one the unit answers (32- or 64-bit,
    /// naturally aligned, inside the page); others are counted and ignored.
    fn access_ok(&mut self, offset: u64, len: usize) -> bool {
        let ok =
            matches!(len, 4 | 8) && offset.is_multiple_of(len as u64) && offset < Self::MMIO_SIZE;
        if !ok {
            self.counters.bad_accesses += 1;
        }
        ok
    }

    fn read32(&self, offset: u64) -> u32 {
        match regs::register_at(offset, NUM_FAULT_RECORDS) {
            Some((start, _)) => (self.reg_read(start) >> ((offset - start) * 8)) as u32,
            None => 0,
        }
    }

    fn write32(&mut self, offset: u64, v: u32) {
        match regs::register_at(offset, NUM_FAULT_RECORDS) {
            Some((start, 4)) => self.reg_write(start, u64::from(v), 0xffff_ffff),
            Some((start, _)) => {
                let shift = (offset - start) * 8;
                let mask = 0xffff_ffffu64 << shift;
                let merged = (self.reg_read(start) & !mask) | (u64::from(v) << shift);
                self.reg_write(start, merged, mask);
            }
            None => {}
        }
    }
}

fn frcd_index(start: u64) -> Option<(usize, bool)> {
    let end = regs::FRCD_OFFSET + 16 * NUM_FAULT_RECORDS as u64;
    if !(regs::FRCD_OFFSET..end).contains(&start) {
        return None;
    }
    let rel = start - regs::FRCD_OFFSET;
    Some(((rel / 16) as usize, rel % 16 >= 8))
}

fn iotlb_invalidation(scope: IotlbScope) -> GuestInvalidation {
    match scope {
        IotlbScope::Global => GuestInvalidation::Iotlb {
            scope: DomainScope::All,
            inv: Invalidation::All,
        },
        IotlbScope::Domain(did) => GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(did),
            inv: Invalidation::All,
        },
        IotlbScope::Pasid { did, pasid } => GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(did),
            inv: Invalidation::Pasid(Pasid(pasid)),
        },
        IotlbScope::Pages {
            did,
            pasid,
            addr,
            npages,
            ih,
        } => GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(did),
            inv: Invalidation::Range {
                pasid: pasid.map(Pasid),
                addr,
                npages,
                leaf: ih,
            },
        },
    }
}

impl BusDevice for Vtd {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len();
        if !self.access_ok(offset, len) {
            return;
        }
        let whole = regs::register_at(offset, NUM_FAULT_RECORDS) == Some((offset, 8));
        let v = if len == 8 && whole {
            self.reg_read(offset)
        } else if len == 8 {
            u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
        } else {
            u64::from(self.read32(offset))
        };
        for (d, b) in data.iter_mut().zip(v.to_le_bytes()) {
            *d = b;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let len = data.len();
        if !self.access_ok(offset, len) {
            return;
        }
        let mut bytes = [0u8; 8];
        for (b, d) in bytes.iter_mut().zip(data) {
            *b = *d;
        }
        let v = u64::from_le_bytes(bytes);
        let whole = regs::register_at(offset, NUM_FAULT_RECORDS) == Some((offset, 8));
        if len == 8 && whole {
            self.reg_write(offset, v, u64::MAX);
        } else if len == 8 {
            self.write32(offset, v as u32);
            self.write32(offset + 4, (v >> 32) as u32);
        } else {
            self.write32(offset, v as u32);
        }
    }
}
