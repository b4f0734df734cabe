//! Introspection: the device manager's real state in the REST API's types
//! (`vm.iommu`, `vm.ioasids`, `vm.pasids`, `vm.counters`, and the device part of `vm.info`).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use api::types::{
    Attachment, DeviceIommuCaps, DeviceNode, HwptInfo, HwptKind, IoasInfo, IoasidsInfo,
    IommuCounters, IommuInfo, PasidEntry, PasidsInfo, PciDeviceInfo, PtType, VmCounters,
};
use ioasid::{HwCaps, HwptId};
use serde_json::json;

use super::dma::Backend;
use super::{lock, DeviceManager, Model};

/// One `vm.iommu` device entry from decoded capabilities.
pub fn caps_entry(id: &str, host: Option<String>, caps: &HwCaps) -> DeviceIommuCaps {
    DeviceIommuCaps {
        id: id.to_string(),
        host,
        nesting: caps.supports_nesting(),
        pasid_width: caps.max_pasid_bits(),
        prs: caps.supports_prs(),
        dmwr: caps.dmwr,
        details: json!({
            "hw_info": caps,
            "has_hw_info": caps.has_hw_info(),
            "nesting_unsupported_reason": caps.nesting_unsupported_reason(),
        }),
    }
}

/// Puts an assigned device's DMWr report (decoded from its own config space:
/// `devices::vfio::VfioPciDevice::dmwr`) into its entry: `dmwr` is DMWr Completer
/// Supported, `details.dmwr` the decoded bits and whether its shared work queues are
/// exposed (never while the CPU cannot translate ENQCMD's PASID).
pub fn add_dmwr(e: &mut DeviceIommuCaps, completer: bool, mut report: serde_json::Value) {
    e.dmwr = e.dmwr || completer;
    if let Some(r) = report.as_object_mut() {
        r.insert("swq".to_string(), json!(swq_exposure()));
    }
    if let Some(obj) = e.details.as_object_mut() {
        obj.insert("dmwr".to_string(), report);
    }
}

/// Whether an assigned device's shared work queues can be used, as the CPU side
/// ([`crate::enqcmd::cpu::host_cpu_side`]) decides: only ENQCMD submits to them, and only a
/// CPU that translates guest PASIDs makes ENQCMD's PASID the one the device's IOMMU knows.
fn swq_exposure() -> String {
    use crate::enqcmd::cpu::{host_cpu_side, CpuPasidSupport};
    match host_cpu_side().support() {
        CpuPasidSupport::Available => {
            "usable through ENQCMD: the CPU translates the guest's PASIDs".to_string()
        }
        CpuPasidSupport::Unavailable { reason } => format!(
            "not exposed: no CPU PASID translation, so ENQCMD stays hidden from the guest and \
             the device's shared work queues stay unused ({reason})"
        ),
    }
}

/// Each distinct HWPT of `hwpts` once, in first-seen order, as a paging HWPT over `ioas`.
fn paging_hwpts(ioas: u32, hwpts: impl IntoIterator<Item = HwptId>) -> Vec<HwptInfo> {
    let mut out: Vec<HwptInfo> = Vec::new();
    for h in hwpts {
        if !out.iter().any(|x| x.id == h.0) {
            out.push(HwptInfo {
                id: h.0,
                kind: HwptKind::Paging,
                ioas,
                parent: None,
                format: None,
            });
        }
    }
    out
}

impl DeviceManager {
    /// `vm.iommu`: the backend in use (`none` before the first device) and each device's
    /// decoded `IOMMU_GET_HW_INFO`. A device whose capabilities are unknown (type1 has no
    /// GET_HW_INFO) reports no nesting, PASID, PRS or DMWr, with the reason in `details`.
    /// `viommu` ([`api::types::ViommuInfo`]) is present with `--platform viommu=vtd`.
    pub fn iommu_info(&self) -> IommuInfo {
        IommuInfo {
            backend: self
                .backend_kind()
                .map_or("none", ioasid::BackendKind::name)
                .to_string(),
            viommu: self
                .viommu_info()
                .and_then(|v| serde_json::to_value(v).ok()),
            devices: self
                .devices
                .iter()
                .map(|d| {
                    let mut e = match &d.caps {
                        Ok(c) => caps_entry(&d.id, Some(d.host.to_string()), c),
                        Err(reason) => DeviceIommuCaps {
                            id: d.id.clone(),
                            host: Some(d.host.to_string()),
                            details: json!({ "unknown": reason }),
                            ..Default::default()
                        },
                    };
                    if let Model::Vfio(m) = &d.model {
                        let info = lock(m).dmwr();
                        add_dmwr(&mut e, info.completer, json!(info));
                    }
                    e
                })
                .collect(),
        }
    }

    /// `vm.ioasids`: the VM's IOAS with its RAM mappings, the paging HWPTs its devices are
    /// attached through, and each device's attachment (RID, no PASID) to the IOAS.
    ///
    /// `hwpts`: devices attach to the IOAS and the kernel finds or creates a paging HWPT over
    /// it for each, whose id the attach reports back; each distinct one is listed once, in
    /// the order devices were added (devices behind compatible IOMMUs share one). An emulated
    /// device (mdev) has none: it reaches the IOAS through an iommufd access. type1 lists
    /// none: its container has no HWPT objects, only the type1 driver's internal domains,
    /// which it never names to userspace. Attachments point at the IOAS, which is what the
    /// VMM attached to.
    pub fn ioasids(&self) -> IoasidsInfo {
        let Some(d) = &self.dma else {
            return IoasidsInfo::default();
        };
        IoasidsInfo {
            ioases: vec![IoasInfo {
                id: d.ioas.0,
                mappings: d.ram.len() as u64,
                mapped_bytes: d.ram.iter().map(|m| m.len).sum(),
            }],
            hwpts: paging_hwpts(d.ioas.0, self.devices.iter().filter_map(|a| a.hwpt)),
            attachments: self
                .devices
                .iter()
                .filter(|a| a.dev.is_some())
                .map(|a| Attachment {
                    device: a.id.clone(),
                    pasid: None,
                    pt_type: PtType::Ioas,
                    pt_id: d.ioas.0,
                })
                .collect(),
        }
    }

    /// `vm.pasids`: the guest-to-host PASID table. Bindings are made when a guest programs a
    /// PASID through the vIOMMU; until one is wired the table stays empty.
    pub fn pasids(&self) -> PasidsInfo {
        // The bridge knows each binding's device (by BDF) and host object.
        let views = self.viommu_bridge().map(|h| h.pasids()).unwrap_or_default();
        PasidsInfo {
            entries: lock(&self.pasids)
                .bindings()
                .into_iter()
                .map(|b| {
                    let v = views
                        .iter()
                        .find(|v| v.space_id == b.dev && v.guest == b.guest);
                    let by_bdf = v.and_then(|v| self.devices.iter().find(|d| d.bdf == v.bdf));
                    PasidEntry {
                        device: by_bdf
                            .or_else(|| self.devices.iter().find(|d| d.dev == Some(b.dev)))
                            .map_or_else(|| format!("dev_id {}", b.dev.0), |d| d.id.clone()),
                        gpasid: b.guest.0,
                        hpasid: b.host.0,
                        hwpt: v.and_then(|v| v.host_pt),
                    }
                })
                .collect(),
        }
    }

    /// `vm.counters`. With a vIOMMU: guest invalidation descriptors and faults recorded (the
    /// model), host invalidation calls and shadow map/unmap calls (the bridge), with every
    /// model and bridge count under `_viommu` (`model_*`, `bridge_*`). `host_ioctls` and
    /// `invalidations` are the iommufd backend's own counters (0 with type1, which does not
    /// count its calls; they restart when the backend is reopened after the last device
    /// left). Fault and page-request counters are 0: no fault queue is wired yet. Per device:
    /// `dev_id` (devices bound to a backend), `msi_vectors`, `msi_vectors_masked`,
    /// `bar_windows_mapped`, and for the emulated SVA copy engine and shared-work-queue
    /// device every field of their counters (`SvaCounters`, `SwqCounters`: `descriptors`,
    /// `submitted`, `completed`, `retries`, `malformed`, ...); the VM-wide `ram_map_calls`
    /// and `ram_regions` are under `_vm`, with the IA32_PASID MSR exits of all vCPUs
    /// (`ia32_pasid_reads`, `_writes`, `_rejected`, `_other_msrs`) when KVM virtualizes it.
    pub fn counters(&self) -> VmCounters {
        let (host_ioctls, invalidations) = match self.dma.as_ref().map(|d| &d.backend) {
            Some(Backend::Iommufd(b)) => (
                b.counters().ioctls.load(Ordering::Relaxed),
                b.counters().invalidations.load(Ordering::Relaxed),
            ),
            _ => (0, 0),
        };
        let mut devices = BTreeMap::new();
        devices.insert(
            "_vm".to_string(),
            BTreeMap::from([
                ("ram_map_calls".to_string(), self.ram_map_calls),
                ("ram_regions".to_string(), self.ram.len() as u64),
            ]),
        );
        if let (Some(msr), Some(vm)) = (&self.ia32_pasid, devices.get_mut("_vm")) {
            let c = msr.counters();
            vm.extend([
                ("ia32_pasid_reads".to_string(), c.reads),
                ("ia32_pasid_writes".to_string(), c.writes),
                ("ia32_pasid_rejected".to_string(), c.rejected),
                ("ia32_pasid_other_msrs".to_string(), c.other_msrs),
            ]);
        }
        for d in &self.devices {
            let routes = d.sink.routes();
            let mut c = BTreeMap::from([
                ("msi_vectors".to_string(), routes.len() as u64),
                (
                    "msi_vectors_masked".to_string(),
                    routes.iter().filter(|r| r.masked).count() as u64,
                ),
                (
                    "bar_windows_mapped".to_string(),
                    d.mapper.windows().len() as u64,
                ),
            ]);
            if let Some(dev) = d.dev {
                c.insert("dev_id".to_string(), u64::from(dev.0));
            }
            if matches!(d.model, Model::Emulated(_)) {
                if let Some(h) = self.emulated_counters.get(&d.id) {
                    c.extend(h.snapshot());
                }
            }
            devices.insert(d.id.clone(), c);
        }
        let mut out = VmCounters {
            iommu: IommuCounters {
                host_ioctls,
                invalidations,
                ..Default::default()
            },
            ..Default::default()
        };
        if let Some((model, bridge)) = self.viommu_counters() {
            out.iommu.guest_invalidation_descriptors = model.descriptors();
            out.iommu.faults_recorded = model.faults_recorded;
            out.iommu.host_invalidation_calls = bridge.host_invalidation_calls;
            out.iommu.shadow_map_calls = bridge.shadow_map_calls;
            out.iommu.shadow_unmap_calls = bridge.shadow_unmap_calls;
            let detail = |v: serde_json::Value| -> BTreeMap<String, u64> {
                v.as_object()
                    .map(|o| {
                        o.iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let mut c = BTreeMap::new();
            for (k, v) in detail(serde_json::to_value(model).unwrap_or_default()) {
                c.insert(format!("model_{k}"), v);
            }
            for (k, v) in detail(serde_json::to_value(bridge).unwrap_or_default()) {
                c.insert(format!("bridge_{k}"), v);
            }
            devices.insert("_viommu".to_string(), c);
        }
        out.devices = devices;
        out
    }

    /// The assigned devices as `vm.add-device` reported them.
    pub fn pci_devices(&self) -> Vec<PciDeviceInfo> {
        self.devices
            .iter()
            .map(|d| PciDeviceInfo {
                id: d.id.clone(),
                bdf: d.bdf.to_string(),
            })
            .collect()
    }

    /// The device part of `vm.info`: one node per assigned device with its BARs (assigned and
    /// live addresses), MSI routes, directly mapped BAR windows and host device.
    pub fn device_tree(&self) -> BTreeMap<String, DeviceNode> {
        let pci = lock(&self.pci);
        self.devices
            .iter()
            .map(|d| {
                let mut resources: Vec<serde_json::Value> = pci
                    .bar_states(d.bdf)
                    .unwrap_or_default()
                    .iter()
                    .map(|b| {
                        json!({
                            "type": "bar",
                            "index": b.info.index,
                            "kind": format!("{:?}", b.info.kind),
                            "size": b.info.size,
                            "assigned": b.assigned,
                            "live": b.live,
                        })
                    })
                    .collect();
                resources.extend(d.sink.routes().iter().map(|r| {
                    json!({
                        "type": "msi",
                        "kind": format!("{:?}", r.vector.kind),
                        "vector": r.vector.index,
                        "gsi": r.gsi,
                        "masked": r.masked,
                        "address": r.address,
                        "data": r.data,
                    })
                }));
                resources.extend(d.mapper.windows().iter().map(|w| {
                    json!({
                        "type": "bar_window",
                        "gpa": w.guest_addr,
                        "len": w.len,
                        "kvm_slot": w.slot,
                    })
                }));
                resources.push(json!({
                    "type": "host",
                    "device": d.host.to_string(),
                    "given": d.given,
                    "dev_id": d.dev.map(|d| d.0),
                    "config": d.config,
                }));
                (
                    d.id.clone(),
                    DeviceNode {
                        id: d.id.clone(),
                        resources,
                        children: Vec::new(),
                        pci_bdf: Some(d.bdf.to_string()),
                    },
                )
            })
            .collect()
    }

    /// Whether the guest enabled MSI or MSI-X on device `id` (from the vfio-pci model; `None`
    /// for an emulated model), for tests and diagnostics.
    pub fn interrupt_state(&self, id: &str) -> Option<(bool, bool)> {
        self.find(id).and_then(|d| match &d.model {
            Model::Vfio(m) => {
                let m = lock(m);
                Some((m.msi_enabled(), m.msix_enabled()))
            }
            Model::Emulated(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_hwpts_are_listed_once_in_first_seen_order() {
        let got = paging_hwpts(2, [HwptId(5), HwptId(5), HwptId(9), HwptId(5)]);
        let ids: Vec<u32> = got.iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![5, 9]);
        assert!(got
            .iter()
            .all(|h| h.ioas == 2 && h.kind == HwptKind::Paging && h.parent.is_none()));
        assert!(paging_hwpts(2, []).is_empty());
    }
}
