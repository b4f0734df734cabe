//! The vIOMMU side of the device manager: which root-bus slots sit behind the emulated VT-d
//! (the DMAR's device scope), the DMAR itself, and the forwarding seam between the model and
//! the host bridge, which exists only while the VM has an IOMMU backend.
//!
//! Slots: devices with `iommu=on` take the slots of [`VIOMMU_SLOTS`] (or, at boot, the one
//! their `pci_device_id` names, which then joins the scope); devices with `iommu=off` never
//! take those. The DMAR lists the scope when the guest's tables are built, which seals it:
//! a device hot-plugged later behind the vIOMMU must land in a slot Linux already knows to be
//! behind the unit (`dmar_pci_bus_add_dev` matches hot-added devices against the boot scope).
//!
//! One DRHD unit for now. The design has two (one without FSTS for assigned devices
//! on hosts without nesting, one with FSTS for emulated devices); with one unit, `fsts=auto`
//! turns first stage on only where every assigned device can be nested by the host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};

use devices::viommu::caps::{cap_fields, ecap_fields};
use devices::viommu::{
    cap_names, ecap_names, BridgeError, BridgeMode, GuestInvalidation, GuestPageResponse,
    Translation, ViommuBridge, Vtd, VtdConfig, VtdCounters,
};
use ioasid::{IoasId, IommuBackend, Pasid, SoftIommu};

use api::types::{ViommuDevice, ViommuInfo};
use api::DeviceConfig;
use log::info;

use super::dma::{unmap_ram, RamMapping};
use super::{lock, Assigned, DeviceManager, DeviceManagerError, Reason, PCI_SEGMENT};
use crate::acpi::dmar::{dmar_table, DmarConfig, DmarError, DrhdUnit, PciEndpoint, SatcUnit};
use crate::config::{OnOffAuto, PlatformConfig, ViommuConfig, ViommuKind};
use crate::layout::{VIOMMU_SLOTS, VTD_REGS_SIZE, VTD_REGS_START};
use crate::viommu::{
    mode_name, BridgeCounters, DevicePath, KvmMsiSignal, VmGuestMemory, VtdBridge,
};
use crate::vm::Vm;
use devices::pci::PciBdf;

/// The vIOMMU options the device manager needs (from `--platform`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViommuSetup {
    /// The VT-d options.
    pub vtd: ViommuConfig,
    /// Guest address width in bits.
    pub address_width: u8,
}

impl ViommuSetup {
    /// From `--platform` (`None` without `viommu=vtd`).
    pub fn from_platform(p: &PlatformConfig) -> Option<Self> {
        (p.viommu == ViommuKind::Vtd).then(|| Self {
            vtd: p.vtd,
            address_width: p.address_width(),
        })
    }
}

/// The vIOMMU of one VM, as the device manager keeps it.
pub struct ViommuState {
    /// Its options.
    pub setup: ViommuSetup,
    /// Whether the unit offers first stage (`fsts=` resolved against the host).
    pub first_stage: bool,
    /// The DMAR scope.
    pub slots: SlotScope,
    /// The model's bridge: forwards to the host bridge while there is one.
    pub bridge: Arc<BridgeSlot>,
    /// The VT-d unit, on the MMIO bus at [`VTD_REGS_START`].
    pub vtd: Arc<Mutex<Vtd>>,
    /// The host bridge, created with the VM's IOMMU backend (first device behind the vIOMMU)
    /// and dropped with it.
    pub host: Option<Arc<VtdBridge>>,
    /// What the host bridges dropped so far had counted (they restart with each backend).
    pub past: BridgeCounters,
    /// The backend the host bridge was created over.
    pub host_backend: Option<Arc<dyn IommuBackend>>,
    /// A host bridge over an emulated device's soft backend (no VFIO backend yet): that
    /// backend and the IOAS mapping guest RAM in it.
    pub soft_ram: Option<(Arc<SoftIommu>, IoasId)>,
    /// The thread that moves page requests between the host bridge's fault queues and the
    /// unit's PRQ (with `svm=on`, while there is a host bridge).
    pub pump: Option<crate::viommu::FaultPump>,
    /// The VM's guest-to-host PASID translation (ENQCMD's, a shared-work-queue portal's):
    /// every host bridge records into this one, so it outlives a bridge dropped with its
    /// backend.
    pub pasid_table: Arc<crate::enqcmd::VmPasidTable>,
}

impl ViommuState {
    /// The unit for `setup`, resolving `fsts=auto` against this host, on `vm`'s MMIO bus.
    pub fn new(setup: ViommuSetup, vm: &Vm) -> Result<Self, DeviceManagerError> {
        let host = host_vtd_nesting();
        let first_stage = first_stage(setup.vtd.fsts, host);
        let cfg = VtdConfig {
            scalable_mode: setup.vtd.scalable_mode,
            first_stage,
            pasid_bits: setup.vtd.pasid_bits,
            svm: setup.vtd.svm,
            // Page requests need ATS; nothing else asks for the device TLB yet.
            device_tlb: setup.vtd.svm,
            aw_bits: setup.address_width,
            segment: PCI_SEGMENT,
        };
        let bridge = Arc::new(BridgeSlot::default());
        let vtd = Vtd::new(
            cfg,
            Arc::new(VmGuestMemory::new(vm.ram().memory().clone())),
            bridge.clone(),
            Arc::new(KvmMsiSignal::new(vm.vm_fd().clone())),
        )
        .map_err(|e| DeviceManagerError::step("the vIOMMU", "checking its options", e))?;
        info!(
            "vIOMMU: VT-d at {VTD_REGS_START:#x}, scalable mode {}, first stage {first_stage} \
             (fsts={:?}, host nesting {host:?}), PASID bits {}, SVM {}, address width {}; \
             CAP {:#x} [{}], ECAP {:#x} [{}]",
            cfg.scalable_mode,
            setup.vtd.fsts,
            cfg.pasid_bits,
            cfg.svm,
            cfg.aw_bits,
            vtd.cap(),
            cap_names(vtd.cap()).join(" "),
            vtd.ecap(),
            ecap_names(vtd.ecap()).join(" "),
        );
        let vtd = Arc::new(Mutex::new(vtd));
        vm.mmio_bus()
            .insert(vtd.clone(), VTD_REGS_START, VTD_REGS_SIZE)
            .map_err(|e| {
                DeviceManagerError::step("the vIOMMU", "putting its registers on the MMIO bus", e)
            })?;
        Ok(Self {
            setup,
            first_stage,
            slots: SlotScope::default(),
            bridge,
            vtd,
            host: None,
            past: BridgeCounters::default(),
            host_backend: None,
            soft_ram: None,
            pump: None,
            pasid_table: Arc::new(crate::enqcmd::VmPasidTable::new()),
        })
    }

    /// Why an assigned device with these host capabilities cannot sit behind this unit, if
    /// it cannot: a unit that offers first stage needs host nesting (Linux does not
    /// invalidate after first-stage maps under caching mode, so a shadow could not follow).
    pub fn refuse_assigned(&self, nesting: Result<bool, &str>) -> Option<String> {
        refuse_assigned(self.first_stage, self.setup.vtd.fsts, nesting)
    }

    /// Drops the host bridge (the backend goes), keeping its counts.
    pub fn drop_host(&mut self) {
        self.host_backend = None;
        self.pump = None;
        if let Some(h) = self.host.take() {
            self.bridge.set(None);
            add_counters(&mut self.past, &h.counters());
        }
    }

    /// The host bridge's counters, over every backend the VM had.
    pub fn bridge_counters(&self) -> BridgeCounters {
        let mut c = self.past;
        if let Some(h) = &self.host {
            add_counters(&mut c, &h.counters());
        }
        c
    }
}

/// Why an assigned device whose host IOMMU can (`Ok(true)`) or cannot nest, or whose
/// capabilities are unknown, cannot sit behind a unit offering first stage (`first_stage`,
/// resolved from `fsts`); `None` when it can.
pub fn refuse_assigned(
    first_stage: bool,
    fsts: OnOffAuto,
    nesting: Result<bool, &str>,
) -> Option<String> {
    if !first_stage {
        return None;
    }
    let why = match nesting {
        Ok(true) => return None,
        Ok(false) => "its host IOMMU has no nesting".to_string(),
        Err(e) => format!("its host IOMMU capabilities are unknown ({e})"),
    };
    Some(format!(
        "iommu=on with a vIOMMU that offers first-stage translation (fsts={}), but {why}: \
         Linux does not invalidate after first-stage maps under caching mode, so a shadow \
         cannot follow them; use fsts=off (or auto)",
        match fsts {
            OnOffAuto::On => "on",
            OnOffAuto::Off => "off",
            OnOffAuto::Auto => "auto, resolved to on",
        }
    ))
}

/// Adds the monotonic counts of `b` to `a` (the live gauges are `b`'s).
fn add_counters(a: &mut BridgeCounters, b: &BridgeCounters) {
    a.guest_invalidations += b.guest_invalidations;
    a.doorbells += b.doorbells;
    a.host_invalidation_calls += b.host_invalidation_calls;
    a.shadow_map_calls += b.shadow_map_calls;
    a.shadow_unmap_calls += b.shadow_unmap_calls;
    a.resyncs += b.resyncs;
    a.bad_table_entries += b.bad_table_entries;
    a.host_errors += b.host_errors;
    a.shadow_ioases_live = b.shadow_ioases_live;
    a.nested_hwpts_live = b.nested_hwpts_live;
    a.nest_parents_live = b.nest_parents_live;
    a.pasids_live = b.pasids_live;
    super::sva::add_fault_counters(a, b);
}

/// Why a slot cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotRefusal {
    /// `iommu=off` at a slot reserved for the vIOMMU.
    Reserved(u8),
    /// `iommu=on` at a slot the sealed DMAR scope does not list.
    OutsideScope(u8),
    /// No free slot of the right kind.
    Full {
        /// Behind the vIOMMU or not.
        iommu: bool,
    },
}

impl std::fmt::Display for SlotRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (lo, hi) = (VIOMMU_SLOTS.start(), VIOMMU_SLOTS.end());
        match self {
            SlotRefusal::Reserved(s) => write!(
                f,
                "slot {s} is reserved for devices behind the vIOMMU (slots {lo}-{hi}); give \
                 iommu=on or another pci_device_id"
            ),
            SlotRefusal::OutsideScope(s) => write!(
                f,
                "slot {s} is not behind the vIOMMU in the guest's DMAR (fixed at boot); a \
                 device hot-plugged with iommu=on takes one of slots {lo}-{hi}"
            ),
            SlotRefusal::Full { iommu: true } => {
                write!(f, "no free slot behind the vIOMMU (slots {lo}-{hi})")
            }
            SlotRefusal::Full { iommu: false } => write!(
                f,
                "no free slot outside those reserved for the vIOMMU (slots {lo}-{hi})"
            ),
        }
    }
}

/// The guest-visible DMAR scope: which slots sit behind the unit.
#[derive(Debug, Clone)]
pub struct SlotScope {
    scope: BTreeSet<u8>,
    sealed: bool,
}

impl Default for SlotScope {
    fn default() -> Self {
        Self {
            scope: VIOMMU_SLOTS.collect(),
            sealed: false,
        }
    }
}

impl SlotScope {
    /// The slot for a device (`iommu`: behind the vIOMMU), `requested` or the first free one
    /// of its kind; `used(slot)` says whether a slot is taken. Does not record anything:
    /// [`Self::commit`] does once the device is placed.
    pub fn choose(
        &self,
        iommu: bool,
        requested: Option<u8>,
        used: impl Fn(u8) -> bool,
    ) -> Result<Option<u8>, SlotRefusal> {
        match requested {
            Some(s) if iommu && self.sealed && !self.scope.contains(&s) => {
                Err(SlotRefusal::OutsideScope(s))
            }
            Some(s) if !iommu && VIOMMU_SLOTS.contains(&s) => Err(SlotRefusal::Reserved(s)),
            Some(s) => Ok(Some(s)),
            None if iommu => self
                .scope
                .iter()
                .copied()
                .find(|s| !used(*s))
                .map(Some)
                .ok_or(SlotRefusal::Full { iommu }),
            None => (1..*VIOMMU_SLOTS.start())
                .chain(VIOMMU_SLOTS.end().saturating_add(1)..=31)
                .find(|s| !used(*s))
                .map(Some)
                .ok_or(SlotRefusal::Full { iommu }),
        }
    }

    /// Records that a device behind the vIOMMU took `slot` (it joins the scope before the
    /// DMAR is built).
    pub fn commit(&mut self, slot: u8) {
        if !self.sealed {
            self.scope.insert(slot);
        }
    }

    /// The scope, sealed: what the DMAR lists.
    pub fn seal(&mut self) -> Vec<u8> {
        self.sealed = true;
        self.scope.iter().copied().collect()
    }

    /// The slots behind the unit (the DMAR's scope once sealed).
    pub fn scope(&self) -> Vec<u8> {
        self.scope.iter().copied().collect()
    }

    /// Whether the DMAR was built.
    pub fn sealed(&self) -> bool {
        self.sealed
    }
}

/// The DMAR for one unit at [`VTD_REGS_START`] covering `slots` of segment `segment`, plus
/// the host bridge (00:00.0).
///
/// The host bridge is there because Linux ignores a DRHD none of whose scope devices exists
/// at boot (`init_no_remapping_devices`: "ignore DMAR unit if no devices exist"), and then
/// treats devices hot-plugged into its scope as having no IOMMU: with no `iommu=on` device
/// at boot, the unit would never be used. The host bridge always exists and never does DMA
/// (QEMU's single DRHD covers it too, with INCLUDE_PCI_ALL); the model ignores context
/// entries of devices it was not given.
///
/// With `ats` (`svm=on`: page requests need the device TLB), an SATC lists the scope slots
/// as integrated endpoints with an ATC, which Linux requires before it enables ATS on an
/// integrated endpoint.
pub fn dmar_for(
    segment: u16,
    address_width: u8,
    slots: &[u8],
    ats: bool,
) -> Result<Vec<u8>, DmarError> {
    let satc = slots
        .iter()
        .filter(|s| **s != 0)
        .map(|&device| PciEndpoint {
            bus: 0,
            device,
            function: 0,
        })
        .collect::<Vec<_>>();
    let satc = if ats && !satc.is_empty() {
        vec![SatcUnit {
            segment,
            atc_required: false,
            endpoints: satc,
        }]
    } else {
        Vec::new()
    };
    let endpoints = std::iter::once(0)
        .chain(slots.iter().copied().filter(|s| *s != 0))
        .map(|device| PciEndpoint {
            bus: 0,
            device,
            function: 0,
        })
        .collect();
    dmar_table(&DmarConfig {
        address_width,
        // Interrupt remapping is not emulated.
        flags: 0,
        units: vec![DrhdUnit {
            register_base: VTD_REGS_START,
            register_size: VTD_REGS_SIZE,
            segment,
            include_pci_all: false,
            endpoints,
        }],
        satc,
    })
}

/// Whether the unit offers first-stage translation (ECAP.FSTS), from `fsts=` and whether
/// the host can nest every assigned device (`host_nesting`, `None` when no host IOMMU
/// reports it). `auto` turns it on only where the bridge can honour it: with one unit
/// covering assigned devices, that is a host with nesting; Linux does not invalidate after
/// first-stage maps under caching mode (ANCHORS §6), so a shadow could not follow.
pub fn first_stage(fsts: OnOffAuto, host_nesting: Option<bool>) -> bool {
    match fsts {
        OnOffAuto::On => true,
        OnOffAuto::Off => false,
        OnOffAuto::Auto => host_nesting == Some(true),
    }
}

/// Whether every VT-d unit of the host offers nesting (ECAP NEST, FSTS and SLTS), read from
/// `/sys/class/iommu/*/intel-iommu/ecap`; `None` without a host VT-d.
pub fn host_vtd_nesting() -> Option<bool> {
    let dir = std::fs::read_dir("/sys/class/iommu").ok()?;
    let mut seen = false;
    for e in dir.flatten() {
        let Ok(s) = std::fs::read_to_string(e.path().join("intel-iommu/ecap")) else {
            continue;
        };
        let Ok(ecap) = u64::from_str_radix(s.trim().trim_start_matches("0x"), 16) else {
            continue;
        };
        seen = true;
        // NEST bit 26, FSTS (FLTS) bit 47, SLTS bit 46.
        let nest = ecap & (1 << 26) != 0 && ecap & (1 << 47) != 0 && ecap & (1 << 46) != 0;
        if !nest {
            return Some(false);
        }
    }
    seen.then_some(true)
}

/// The model's view of the host: forwards to the host bridge while the VM has an IOMMU
/// backend (it comes with the first device and goes with the last), and answers
/// [`BridgeError::NoDevice`] in between (no device is behind the vIOMMU then).
#[derive(Default)]
pub struct BridgeSlot {
    inner: RwLock<Option<Arc<dyn ViommuBridge>>>,
}

impl BridgeSlot {
    /// Installs (or, with `None`, removes) the host bridge.
    pub fn set(&self, b: Option<Arc<dyn ViommuBridge>>) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = b;
    }

    fn get(&self) -> Option<Arc<dyn ViommuBridge>> {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ViommuBridge for BridgeSlot {
    fn set_translation(
        &self,
        bdf: PciBdf,
        pasid: Pasid,
        t: Translation,
    ) -> Result<BridgeMode, BridgeError> {
        match self.get() {
            Some(b) => b.set_translation(bdf, pasid, t),
            None => Err(BridgeError::NoDevice { bdf }),
        }
    }

    fn invalidate(&self, batch: &[GuestInvalidation]) -> Result<(), BridgeError> {
        match self.get() {
            Some(b) => b.invalidate(batch),
            // Nothing is cached on the host without a device.
            None => Ok(()),
        }
    }

    fn page_response(&self, resp: GuestPageResponse) -> Result<(), BridgeError> {
        match self.get() {
            Some(b) => b.page_response(resp),
            None => Err(BridgeError::NoDevice { bdf: resp.bdf }),
        }
    }
}

impl DeviceManager {
    /// Refuses `iommu=on` without a vIOMMU and `pasid=on` without PASIDs on it (REST adds
    /// reach here without the command line's checks).
    pub(super) fn check_viommu_options(
        &self,
        cfg: &DeviceConfig,
        given: &str,
    ) -> Result<(), DeviceManagerError> {
        let unsupported = |reason: &str| DeviceManagerError::Unsupported {
            device: given.to_string(),
            reason: reason.to_string(),
        };
        match &self.viommu {
            None if cfg.iommu => Err(unsupported(
                "iommu=on needs a vIOMMU: start the VM with --platform viommu=vtd",
            )),
            Some(v) if cfg.pasid && v.setup.vtd.pasid_bits == 0 => Err(unsupported(
                "pasid=on needs a vIOMMU with PASIDs: start the VM with --platform pasid-bits=N",
            )),
            _ => Ok(()),
        }
    }

    /// The slot for a new device: with a vIOMMU, [`SlotScope::choose`]; without one, the
    /// requested slot or the bus's choice.
    pub(super) fn choose_slot(
        &self,
        iommu: bool,
        requested: Option<u8>,
        given: &str,
    ) -> Result<Option<u8>, DeviceManagerError> {
        let Some(v) = &self.viommu else {
            return Ok(requested);
        };
        let pci = lock(&self.pci);
        v.slots
            .choose(iommu, requested, |s| {
                pci.device(PciBdf::root_slot(PCI_SEGMENT, s)).is_some()
            })
            .map_err(|r| DeviceManagerError::Unsupported {
                device: given.to_string(),
                reason: r.to_string(),
            })
    }

    /// The host bridge over the VM's backend, created on first use. A bridge left over a
    /// different backend (an emulated device's soft backend, or a backend the VM has since
    /// closed) is replaced when idle, and refuses assigned devices while emulated ones
    /// still use it.
    pub(super) fn host_bridge(&mut self) -> Result<Arc<VtdBridge>, DeviceManagerError> {
        let current = self.dma.as_ref().map(|d| d.backend.as_arc());
        let stale = self.viommu.as_ref().is_some_and(|v| {
            v.host.is_some()
                && !matches!((&v.host_backend, &current),
                    (Some(a), Some(b)) if std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)))
        });
        if stale {
            self.drop_idle_bridge();
            if self.viommu.as_ref().is_some_and(|v| v.host.is_some()) {
                return Err(DeviceManagerError::step(
                    "the vIOMMU",
                    "creating its host bridge",
                    Reason(
                        "emulated devices behind the vIOMMU hold a bridge over another backend; \
                         an assigned device can join them only when it came first"
                            .into(),
                    ),
                ));
            }
        }
        let (Some(v), Some(d)) = (self.viommu.as_mut(), self.dma.as_ref()) else {
            return Err(DeviceManagerError::step(
                "the vIOMMU",
                "creating its host bridge",
                Reason("the VM has no IOMMU backend".into()),
            ));
        };
        // The shadow mirrors guest tables with IOAS_COPY into per-domain IOASes; the legacy
        // VFIO container has neither, so a device on it could not follow the guest's tables
        // (its DMA would stay at guest-physical addresses while the guest believes it is
        // translated). Refuse instead.
        if d.backend.kind() == ioasid::BackendKind::Type1 {
            return Err(DeviceManagerError::step(
                "the vIOMMU",
                "creating its host bridge",
                Reason(
                    "devices behind the vIOMMU need the iommufd backend (a host IOAS per guest \
                     domain, IOAS_COPY); this VM uses the legacy VFIO container (type1): use \
                     --platform iommufd=on or auto on a host with /dev/iommu"
                        .into(),
                ),
            ));
        }
        if let Some(h) = &v.host {
            return Ok(h.clone());
        }
        let h = super::sva::new_host_bridge(
            v,
            &self.pasids,
            d.backend.as_arc(),
            d.ioas,
            self.ram.clone(),
        );
        v.bridge.set(Some(h.clone()));
        v.host = Some(h.clone());
        v.host_backend = Some(d.backend.as_arc());
        info!(
            "vIOMMU: host bridge over the {} backend, guest RAM in IOAS {}",
            d.backend.kind(),
            d.ioas.0
        );
        Ok(h)
    }

    /// Puts a placed device behind the vIOMMU: the host bridge first (it starts the device
    /// in pass-through, attached to the guest-RAM IOAS), then the model (which, when the
    /// guest already enabled translation, reads the device's context now and tells the
    /// bridge).
    pub(super) fn attach_viommu(&mut self, a: &Assigned) -> Result<(), DeviceManagerError> {
        if self.viommu.is_none() {
            return Ok(());
        }
        let Some(dev) = a.dev else {
            return Err(DeviceManagerError::step(
                &a.given,
                "putting it behind the vIOMMU",
                Reason("it has no IOMMU backend".into()),
            ));
        };
        let host = self.host_bridge()?;
        host.add_assigned(a.bdf, dev, a.caps.as_ref().ok())
            .map_err(|e| DeviceManagerError::step(&a.given, "putting it behind the vIOMMU", e))?;
        if let Some(v) = self.viommu.as_mut() {
            v.slots.commit(a.bdf.device());
            lock(&v.vtd).add_device(a.bdf);
        }
        info!("{}: at {} behind the vIOMMU", a.id, a.bdf);
        Ok(())
    }

    /// Takes a device out from behind the vIOMMU, before it leaves the bus: out of the
    /// model's scope, then the bridge tears down its shadow IOAS, nested HWPTs and PASIDs.
    /// Returns the teardown steps that failed and whether the bridge took the device's RID
    /// off its objects (then the device manager does not detach it again).
    pub(super) fn detach_viommu(&mut self, a: &Assigned) -> (Vec<String>, bool) {
        let Some(v) = self.viommu.as_ref() else {
            return (Vec::new(), false);
        };
        if !a.config.iommu {
            return (Vec::new(), false);
        }
        lock(&v.vtd).remove_device(a.bdf);
        let Some(host) = v.host.clone() else {
            return (Vec::new(), false);
        };
        let mut out = match host.remove(a.bdf) {
            Ok(rel) => {
                info!(
                    "{}: left the vIOMMU: {} nested HWPTs, {} nest parents, {} shadow IOASes, \
                     {} PASIDs released",
                    a.id, rel.nested_hwpts, rel.nest_parents, rel.shadow_ioases, rel.pasids
                );
                (rel.errors, true)
            }
            Err(e) => (vec![format!("vIOMMU bridge: {e}")], false),
        };
        if let Some(s) = &a.soft {
            if let Err(e) = s.soft.unregister_device(s.dev) {
                out.0.push(format!("soft backend: {e}"));
            }
        }
        if self.dma.is_none() {
            self.drop_idle_bridge();
        }
        out
    }

    /// Drops a host bridge no device is behind any more, when it is not the bridge over the
    /// VM's current backend (a soft backend's, or one left from a closed backend), with the
    /// soft backend's RAM IOAS.
    pub(super) fn drop_idle_bridge(&mut self) {
        let current = self.dma.as_ref().map(|d| d.backend.as_arc());
        let ram = self.ram.clone();
        let Some(v) = self.viommu.as_mut() else {
            return;
        };
        let idle = v.host.as_ref().is_some_and(|h| h.devices().is_empty());
        let ours = matches!((&v.host_backend, &current),
            (Some(a), Some(b)) if std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)));
        if !idle || ours {
            return;
        }
        v.drop_host();
        if let Some((soft, ioas)) = v.soft_ram.take() {
            let maps: Vec<RamMapping> = ram
                .iter()
                .map(|r| RamMapping {
                    iova: r.gpa,
                    len: r.size,
                })
                .collect();
            unmap_ram(soft.as_ref(), ioas, &maps);
            if let Err(e) = soft.destroy(ioas.0) {
                log::warn!("vIOMMU: destroying the soft backend's RAM IOAS: {e}");
            }
        }
    }

    /// `vm.iommu`'s `viommu`: the guest-visible CAP/ECAP by name, the DMAR scope, and each
    /// (device, PASID) behind the unit with its mode (the model's devices without a host
    /// bridge entry are listed in pass-through, as the guest left them).
    pub fn viommu_info(&self) -> Option<ViommuInfo> {
        let v = self.viommu.as_ref()?;
        let (cap, ecap, enabled, scope) = {
            let vtd = lock(&v.vtd);
            (
                vtd.cap(),
                vtd.ecap(),
                vtd.translation_enabled(),
                vtd.devices(),
            )
        };
        let id_of = |bdf: PciBdf| {
            self.devices
                .iter()
                .find(|d| d.bdf == bdf)
                .map_or_else(|| bdf.to_string(), |d| d.id.clone())
        };
        let views = v.host.as_ref().map(|h| h.devices()).unwrap_or_default();
        let mut devices: Vec<ViommuDevice> = views
            .iter()
            .map(|d| ViommuDevice {
                id: id_of(d.bdf),
                bdf: d.bdf.to_string(),
                pasid: d.pasid.0,
                mode: mode_name(d.mode).to_string(),
                path: match d.path {
                    DevicePath::Assigned => "assigned",
                    DevicePath::Emulated => "emulated",
                }
                .to_string(),
                did: d.did,
                host_pt: d.host_pt,
            })
            .collect();
        for bdf in scope {
            if !views.iter().any(|d| d.bdf == bdf) {
                devices.push(ViommuDevice {
                    id: id_of(bdf),
                    bdf: bdf.to_string(),
                    pasid: 0,
                    mode: mode_name(BridgeMode::PassThrough).to_string(),
                    path: "assigned".into(),
                    did: None,
                    host_pt: None,
                });
            }
        }
        let mut fields: BTreeMap<String, u64> = BTreeMap::new();
        for (k, val) in cap_fields(cap).into_iter().chain(ecap_fields(ecap)) {
            fields.insert(k.to_string(), val);
        }
        Some(ViommuInfo {
            model: "vtd".into(),
            register_base: VTD_REGS_START,
            cap,
            ecap,
            cap_names: cap_names(cap).into_iter().map(String::from).collect(),
            ecap_names: ecap_names(ecap).into_iter().map(String::from).collect(),
            fields,
            scope_slots: v.slots.scope(),
            translation_enabled: enabled,
            devices,
        })
    }

    /// The vIOMMU's counters for `vm.counters`: the model's (descriptors, faults) and the
    /// host bridge's (host invalidation calls, shadow map and unmap calls), all zero without
    /// a vIOMMU. Also the model's and bridge's detailed counts under `_viommu`.
    pub fn viommu_counters(&self) -> Option<(VtdCounters, BridgeCounters)> {
        let v = self.viommu.as_ref()?;
        let model = lock(&v.vtd).counters();
        Some((model, v.bridge_counters()))
    }

    /// The VT-d unit (tests drive it as the guest would, e.g. with the model's Linux
    /// harness).
    pub fn vtd(&self) -> Option<Arc<Mutex<Vtd>>> {
        self.viommu.as_ref().map(|v| v.vtd.clone())
    }

    /// The vIOMMU's host bridge, while the VM has an IOMMU backend (tests check its view of
    /// the mappings).
    pub fn viommu_bridge(&self) -> Option<Arc<VtdBridge>> {
        self.viommu.as_ref().and_then(|v| v.host.clone())
    }

    /// The ACPI tables the devices need (the DMAR with a vIOMMU, else none), built once the
    /// boot devices are placed; seals the DMAR scope.
    pub fn acpi_tables(&mut self) -> Result<Vec<Vec<u8>>, DeviceManagerError> {
        let Some(v) = self.viommu.as_mut() else {
            return Ok(Vec::new());
        };
        let slots = v.slots.seal();
        let dmar = dmar_for(PCI_SEGMENT, v.setup.address_width, &slots, v.setup.vtd.svm)
            .map_err(|e| DeviceManagerError::step("the vIOMMU", "building the DMAR", e))?;
        info!(
            "DMAR: one DRHD at {VTD_REGS_START:#x}, host address width {}, scope slots {slots:?}",
            v.setup.address_width
        );
        Ok(vec![dmar])
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn iommu_devices_take_reserved_slots_others_never_do() {
        let mut s = SlotScope::default();
        let used = |x: u8| x == 1 || x == 24;
        assert_eq!(s.choose(true, None, used), Ok(Some(25)));
        assert_eq!(s.choose(false, None, used), Ok(Some(2)));
        assert_eq!(
            s.choose(false, Some(26), used),
            Err(SlotRefusal::Reserved(26))
        );
        // Before the DMAR, an explicit slot joins the scope.
        assert_eq!(s.choose(true, Some(5), used), Ok(Some(5)));
        s.commit(5);
        let scope = s.seal();
        assert!(scope.contains(&5) && scope.contains(&24) && scope.contains(&31));
        assert_eq!(scope.len(), 9);
        // After it, hot-plug stays inside it.
        assert_eq!(
            s.choose(true, Some(6), used),
            Err(SlotRefusal::OutsideScope(6))
        );
        assert_eq!(s.choose(true, Some(5), used), Ok(Some(5)));
        s.commit(6);
        assert!(!s.seal().contains(&6));
        let full = |x: u8| VIOMMU_SLOTS.contains(&x) || x == 5;
        assert_eq!(
            s.choose(true, None, full),
            Err(SlotRefusal::Full { iommu: true })
        );
        assert_eq!(
            s.choose(false, None, |x| x != 24),
            Err(SlotRefusal::Full { iommu: false })
        );
    }

    #[test]
    fn dmar_lists_the_scope_at_the_register_base() {
        let t = dmar_for(0, 48, &[3, 24], false).unwrap();
        assert_eq!(t[36], 47);
        assert_eq!(
            u64::from_le_bytes(t[56..64].try_into().unwrap()),
            VTD_REGS_START
        );
        // The host bridge first (keeps the unit alive in Linux), then the scope.
        assert_eq!((t[64 + 6], t[72 + 6], t[80 + 6]), (0, 3, 24));
        assert_eq!(t.len(), 48 + 16 + 3 * 8);
        // svm=on: an SATC after the unit lists the scope (not the host bridge).
        let t = dmar_for(0, 48, &[3, 24], true).unwrap();
        let satc = &t[48 + 16 + 3 * 8..];
        assert_eq!(u16::from_le_bytes([satc[0], satc[1]]), 5);
        assert_eq!((satc[8 + 6], satc[16 + 6]), (3, 24));
        assert_eq!(satc.len(), 8 + 2 * 8);
    }

    #[test]
    fn first_stage_refuses_assigned_devices_the_host_cannot_nest() {
        assert_eq!(refuse_assigned(false, OnOffAuto::Off, Ok(false)), None);
        assert_eq!(refuse_assigned(true, OnOffAuto::On, Ok(true)), None);
        let no = refuse_assigned(true, OnOffAuto::On, Ok(false)).unwrap();
        assert!(no.contains("fsts=on") && no.contains("no nesting"), "{no}");
        assert!(no.contains("Linux does not invalidate after first-stage maps"));
        let unknown = refuse_assigned(true, OnOffAuto::Auto, Err("type1")).unwrap();
        assert!(unknown.contains("unknown (type1)") && unknown.contains("auto"));
    }

    #[test]
    fn fsts_auto_needs_host_nesting() {
        assert!(first_stage(OnOffAuto::On, Some(false)));
        assert!(!first_stage(OnOffAuto::Off, Some(true)));
        assert!(first_stage(OnOffAuto::Auto, Some(true)));
        assert!(!first_stage(OnOffAuto::Auto, Some(false)));
        assert!(!first_stage(OnOffAuto::Auto, None));
    }
}
