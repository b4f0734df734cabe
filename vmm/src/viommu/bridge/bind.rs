//! Binding one (device, PASID) on the host: blocking, pass-through, the shadow domain, the
//! nest parent and nested HWPT, the soft backend's HWPTs; and releasing what a binding held.

use devices::pci::PciBdf;
use devices::viommu::{BridgeError, SecondStage, Translation};
use ioasid::soft::{SlConfig, SoftIommu};
use ioasid::{
    alloc_nest_parent, bind_stage1, DevId, FaultHandler, FaultId, HwCaps, HwptId, IoasId,
    IommuBackend, NestParent, Pasid, PtId,
};
use log::warn;

use super::super::nested::HostFormat;
use super::super::shadow::{ShadowDomain, SyncCtx, SyncReport};
use super::super::view::Released;
use super::{host_err, Binding, Path, State, VtdBridge, FIRST_STAGE_NEEDS_NESTING};

impl VtdBridge {
    pub(super) fn blocked_ioas(&self, st: &mut State) -> ioasid::Result<IoasId> {
        if let Some(io) = st.blocked_ioas {
            return Ok(io);
        }
        let io = self.backend.ioas_alloc()?;
        st.blocked_ioas = Some(io);
        Ok(io)
    }

    pub(super) fn sync_ctx(&self) -> SyncCtx<'_> {
        SyncCtx {
            backend: &*self.backend,
            ram_ioas: self.ram_ioas,
            ram: &self.ram,
            max_scan_steps: self.limits.max_scan_steps,
        }
    }

    pub(super) fn account(&self, st: &mut State, did: u16, rep: &SyncReport) {
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
    pub(super) fn release(
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
        hp: Option<Pasid>,
        old: Binding,
    ) -> Result<Binding, BridgeError> {
        let Some(d) = st.devices.get(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let dev = d.dev;
        if pasid.0 != 0 && hp.is_none() {
            // A PASID never bound on the host: nothing to detach.
            return Ok(Binding::Blocked);
        }
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

    /// The device's host fault queue, allocated on first use: for an emulated device
    /// always (it raises page requests only when its request asks for PRI), for an
    /// assigned one when the host IOMMU has PRS and nesting (iommufd attaches a HWPT with a
    /// fault queue only to a device that can fault). `None`: no page requests.
    fn fault_queue(&self, st: &mut State, bdf: PciBdf) -> Option<FaultId> {
        let d = st.devices.get_mut(&bdf)?;
        if let Some(h) = &d.fault {
            return Some(h.queue().id());
        }
        let backend: &dyn IommuBackend = match &d.path {
            Path::Emulated { soft, .. } => &**soft,
            Path::Assigned { caps, .. } => {
                let ok = caps
                    .as_ref()
                    .is_some_and(|c| c.supports_nesting() && c.supports_prs());
                if !ok {
                    return None;
                }
                &*self.backend
            }
        };
        match backend.fault_queue_alloc() {
            Ok(q) => {
                let h = FaultHandler::new(q, self.page_request_timeout());
                let id = h.queue().id();
                d.fault = Some(h);
                Some(id)
            }
            Err(e) => {
                warn!("vIOMMU {bdf}: no host fault queue, page requests answered by the host: {e}");
                st.counters.host_errors += 1;
                None
            }
        }
    }

    /// Prepares the host object for `t` on (bdf, pasid) — host PASID `hp`, `None` for the
    /// requests without PASID — and attaches the device to it.
    pub(super) fn bind(
        &self,
        st: &mut State,
        bdf: PciBdf,
        pasid: Pasid,
        hp: Option<Pasid>,
        t: Translation,
        old: Binding,
    ) -> Result<Binding, BridgeError> {
        if t == Translation::Blocked {
            return self.block(st, bdf, pasid, hp, old);
        }
        if pasid.0 != 0 && hp.is_none() {
            return Err(BridgeError::Unsupported {
                bdf,
                pasid,
                reason: "the PASID has no host PASID".to_string(),
            });
        }
        let fault = match t {
            Translation::FirstStage { .. } | Translation::SecondStage { .. } => {
                let emulated = matches!(
                    st.devices.get(&bdf).map(|d| &d.path),
                    Some(Path::Emulated { .. })
                );
                if emulated || matches!(t, Translation::FirstStage { .. }) {
                    self.fault_queue(st, bdf)
                } else {
                    None
                }
            }
            _ => None,
        };
        let Some(d) = st.devices.get(&bdf) else {
            return Err(BridgeError::NoDevice { bdf });
        };
        let dev = d.dev;
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
                    fault,
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
                    .hwpt_alloc_second_level(dev, *parent, cfg, fault, true)
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
                    fault,
                    true,
                )
                .map_err(|e| bad_table(bdf, pasid, table.pgtbl_addr, e))?;
                attach_soft(soft, dev, hp, hwpt, bdf)?;
                Ok(Binding::Soft { did, t, hwpt })
            }
        }
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
