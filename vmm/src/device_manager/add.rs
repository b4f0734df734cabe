//! Adding a device: resolve, choose the backend (first device), bind, register with
//! KVM-VFIO, map guest RAM (first device), attach, build the model, put it on the bus; and
//! undoing those steps in reverse when one fails. Each step has a fault point
//! ([`AddStep`]) a test can fire to check that undoing it leaves nothing behind.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use api::{DeviceConfig, DeviceConfigError};
use devices::pci::root::MAX_SLOT;
use devices::pci::{PciBdf, PciError, SharedPciDevice};
use devices::vfio::{
    CapPolicy, VfioDeviceId, VfioPciDevice, VfioPciError, VfioPciOptions, VfioRegions,
    VpasidConfig, VPRI_DEFAULT_CAPACITY,
};
use ioasid::{BackendChoice, BackendKind, DevId, DeviceName, HostFacts, HwCaps};
use log::{info, warn};

use super::assign::{self, KvmVfio, Source, CDEV_DIR};
use super::bar_mapper::KvmBarMapper;
use super::dma::{self, Backend, DmaState, RamMapMode};
use super::interrupts::KvmInterruptSink;
use super::IntxWiring;
use super::{
    check_device_config, lock, AddedDevice, Assigned, DeviceManager, DeviceManagerError, Model,
    Placed, Progress, Reason, PCI_SEGMENT,
};

/// The steps of adding a device, in the order [`DeviceManager::add_device`] takes them. Each
/// has a fault point right after the step succeeded: a test arms one
/// ([`arm_add_faults`]) and the add fails there, so its rollback must undo that step and
/// every one before it. [`AddStep::error_steps`] names the `step` of every error the step
/// can return; `add_device_rollback_at_every_step` checks that every step error of this file
/// belongs to an `AddStep`, so a new step cannot come without its fault point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddStep {
    /// The PCI slot chosen (nothing held yet).
    ChooseSlot,
    /// The device resolved (an fd given by the caller is held).
    Resolve,
    /// The backend (`/dev/iommu` or a VFIO container) opened, first device only.
    OpenBackend,
    /// The VM's IOAS allocated, first device only.
    AllocIoas,
    /// The device bound to the backend.
    Bind,
    /// Its VFIO file registered with the KVM-VFIO device.
    KvmVfio,
    /// Its IOMMU capabilities read and the PASID options decided.
    Caps,
    /// Guest RAM mapped into the IOAS, first device only.
    MapRam,
    /// The device attached to the IOAS (iommufd).
    Attach,
    /// The PCI model built, with its interrupt sink and BAR mapper.
    BuildModel,
    /// The model put on the PCI bus.
    PlaceOnBus,
    /// The device put behind the vIOMMU (`iommu=on` only).
    AttachViommu,
}

impl AddStep {
    /// Every step, in order.
    pub const ALL: [AddStep; 12] = [
        AddStep::ChooseSlot,
        AddStep::Resolve,
        AddStep::OpenBackend,
        AddStep::AllocIoas,
        AddStep::Bind,
        AddStep::KvmVfio,
        AddStep::Caps,
        AddStep::MapRam,
        AddStep::Attach,
        AddStep::BuildModel,
        AddStep::PlaceOnBus,
        AddStep::AttachViommu,
    ];

    /// The `step` of each [`DeviceManagerError::Step`] this step can fail with; the first
    /// one names an injected fault.
    pub fn error_steps(self) -> &'static [&'static str] {
        match self {
            AddStep::ChooseSlot => &["choosing the PCI slot"],
            AddStep::Resolve => &["resolving the device", "identifying the device"],
            AddStep::OpenBackend => &[
                "opening the IOMMU backend",
                "choosing the IOMMU backend",
                "opening /dev/iommu",
                "opening the VFIO container",
            ],
            AddStep::AllocIoas => &["allocating the VM's IOAS"],
            AddStep::Bind => &["binding to iommufd", "opening it through its VFIO group"],
            AddStep::KvmVfio => &["KVM_DEV_VFIO_FILE_ADD", "creating the KVM-VFIO device"],
            AddStep::Caps => &["checking PASID support"],
            AddStep::MapRam => &["mapping guest RAM for DMA"],
            AddStep::Attach => &["attaching to the VM's IOAS"],
            AddStep::BuildModel => &["building the PCI model"],
            AddStep::PlaceOnBus => &["placing it on the PCI bus"],
            AddStep::AttachViommu => &["putting it behind the vIOMMU"],
        }
    }

    /// The step's name in errors.
    pub fn name(self) -> &'static str {
        self.error_steps()
            .first()
            .copied()
            .unwrap_or("adding the device")
    }
}

/// This thread's armed fault points: the step to fail at (if any) and the steps passed.
struct Armed {
    fail_at: Option<AddStep>,
    passed: Vec<AddStep>,
}

thread_local! {
    static ARMED: RefCell<Option<Armed>> = const { RefCell::new(None) };
}

/// Test-only: arms the fault points for adds made by this thread: each records that it was
/// passed, and the add fails at `fail_at` (once). Disarmed by [`disarm_add_faults`].
#[doc(hidden)]
pub fn arm_add_faults(fail_at: Option<AddStep>) {
    ARMED.with(|a| {
        *a.borrow_mut() = Some(Armed {
            fail_at,
            passed: Vec::new(),
        })
    });
}

/// Test-only: disarms this thread's fault points; returns the steps passed since
/// [`arm_add_faults`], in order.
#[doc(hidden)]
pub fn disarm_add_faults() -> Vec<AddStep> {
    ARMED.with(|a| a.borrow_mut().take().map(|a| a.passed).unwrap_or_default())
}

/// The fault point after `step`: fails there when a test armed it (see [`AddStep`]).
fn fault_point(step: AddStep, device: &str) -> Result<(), DeviceManagerError> {
    let fire = ARMED.with(|a| match a.borrow_mut().as_mut() {
        Some(armed) => {
            armed.passed.push(step);
            armed.fail_at.take_if(|s| *s == step).is_some()
        }
        None => false,
    });
    if fire {
        return Err(DeviceManagerError::step(
            device,
            step.name(),
            Reason("fault injected by a test".to_string()),
        ));
    }
    Ok(())
}

/// Refuses a requested slot above [`MAX_SLOT`]: a device number has five bits, so slot 32
/// would otherwise wrap to `0000:00:00.0` wherever it is turned into a BDF.
fn check_slot_range(slot: Option<u8>, device: &str) -> Result<(), DeviceManagerError> {
    match slot {
        Some(slot) if slot > MAX_SLOT => Err(DeviceManagerError::step(
            device,
            "choosing the PCI slot",
            PciError::InvalidSlot { slot },
        )),
        _ => Ok(()),
    }
}

impl DeviceManager {
    /// Assigns the device `cfg` names (or the cdev `fd`): resolve, choose the backend (first
    /// device), bind, map RAM (first device), attach to the VM's IOAS, register with
    /// KVM-VFIO, build the model and put it on the PCI bus (at `pci_device_id` if given).
    /// `cfg.fd` is ignored: the open cdev is `fd`. On failure nothing is left behind.
    pub fn add_device(
        &mut self,
        cfg: &DeviceConfig,
        fd: Option<OwnedFd>,
    ) -> Result<AddedDevice, DeviceManagerError> {
        let given = match (&cfg.path, &fd) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(f)) => format!("cdev fd {}", f.as_raw_fd()),
            (None, None) => "a device without path or fd".to_string(),
        };
        // Before anything else, whatever the caller checked: slot 32 would wrap to 00:00.0.
        check_slot_range(cfg.pci_device_id, cfg.emulated.as_deref().unwrap_or(&given))?;
        check_device_config(cfg, fd.is_some()).map_err(|source| DeviceManagerError::Config {
            device: given.clone(),
            source,
        })?;
        if let Some(name) = &cfg.emulated {
            return self.add_emulated_config(name, cfg);
        }
        if cfg.pci_segment != PCI_SEGMENT {
            return Err(DeviceManagerError::Unsupported {
                device: given,
                reason: format!(
                    "pci_segment={} does not exist: this VM has only segment {PCI_SEGMENT}",
                    cfg.pci_segment
                ),
            });
        }
        if let Some(id) = &cfg.id {
            if let Some(d) = self.find(id) {
                return Err(DeviceManagerError::DuplicateId {
                    id: id.clone(),
                    host: d.host.to_string(),
                });
            }
        }
        self.check_viommu_options(cfg, &given)?;
        if let Some(slot) = cfg.pci_device_id {
            let bdf = PciBdf::root_slot(PCI_SEGMENT, slot);
            if slot == 0 || lock(&self.pci).device(bdf).is_some() {
                return Err(DeviceManagerError::step(
                    &given,
                    "choosing the PCI slot",
                    if slot == 0 {
                        PciError::InvalidSlot { slot }
                    } else {
                        PciError::SlotInUse { bdf }
                    },
                ));
            }
        }
        let slot = self.choose_slot(cfg.iommu, cfg.pci_device_id, &given)?;
        fault_point(AddStep::ChooseSlot, &given)?;
        let source = self.resolve(cfg, fd, &given)?;
        fault_point(AddStep::Resolve, &source.given)?;
        if !matches!(source.name, DeviceName::Fd(_)) {
            if let Some(d) = self.devices.iter().find(|d| d.host == source.name) {
                return Err(DeviceManagerError::AlreadyAssigned {
                    device: source.name.to_string(),
                    id: d.id.clone(),
                });
            }
        }
        let device = source.given.clone();
        let fresh_backend = self.dma.is_none();
        if let Err(e) = self.ensure_backend(&source) {
            // The backend may have been opened and its IOAS allocated before the failure.
            if fresh_backend {
                self.teardown_dma();
            }
            return Err(e);
        }
        let (id, auto) = match &cfg.id {
            Some(id) => (id.clone(), None),
            None => {
                let (id, n) = self.auto_id();
                (id, Some(n))
            }
        };
        let mut progress = Progress::default();
        match self.assign(&id, source, cfg, slot, &mut progress) {
            Ok(assigned) => {
                let added = AddedDevice {
                    id: assigned.id.clone(),
                    bdf: assigned.bdf,
                };
                info!(
                    "{}: {} assigned at {} ({} backend, RAM map calls so far: {} for {} RAM regions)",
                    added.id,
                    assigned.host,
                    added.bdf,
                    self.backend_kind().map_or("no", BackendKind::name),
                    self.ram_map_calls,
                    self.ram.len()
                );
                if cfg.iommu {
                    let attached = self
                        .attach_viommu(&assigned)
                        .and_then(|()| fault_point(AddStep::AttachViommu, &assigned.given));
                    if let Err(e) = attached {
                        warn!("{id}: {}; undoing", e.message());
                        self.devices.push(assigned);
                        if let Err(r) = self.remove_device(&id) {
                            warn!("{id}: {}", r.message());
                        }
                        return Err(e);
                    }
                }
                self.devices.push(assigned);
                if let Some(n) = auto {
                    self.next_auto_id = n + 1;
                }
                Ok(added)
            }
            Err(e) => {
                warn!("{id}: {}; undoing", e.message());
                self.rollback(&device, progress);
                if fresh_backend || !self.devices.iter().any(|d| d.dev.is_some()) {
                    self.teardown_dma();
                }
                Err(e)
            }
        }
    }

    fn resolve(
        &self,
        cfg: &DeviceConfig,
        fd: Option<OwnedFd>,
        given: &str,
    ) -> Result<Source, DeviceManagerError> {
        let source = match (fd, &cfg.path) {
            (Some(fd), _) => assign::resolve_fd(fd).map_err(|why| {
                DeviceManagerError::step(given, "identifying the device", Reason(why))
            })?,
            (None, Some(path)) => {
                let spec = assign::resolve_path(path)
                    .map_err(|e| DeviceManagerError::step(given, "resolving the device", e))?;
                Source {
                    name: spec.name.clone(),
                    given: if path.starts_with(CDEV_DIR) {
                        format!("{} ({})", spec.name, path.display())
                    } else {
                        spec.name.to_string()
                    },
                    spec: Some(spec),
                    file: None,
                }
            }
            (None, None) => {
                return Err(DeviceManagerError::Config {
                    device: given.to_string(),
                    source: DeviceConfigError::NoPathOrFd,
                })
            }
        };
        info!(
            "Resolved {given} to {}{}{}",
            source.name,
            source
                .spec
                .as_ref()
                .and_then(|s| s.cdev.as_ref())
                .map(|c| format!(", cdev {}", c.display()))
                .unwrap_or_default(),
            source
                .spec
                .as_ref()
                .and_then(|s| s.group)
                .map(|g| format!(", IOMMU group {g}"))
                .unwrap_or_default()
        );
        Ok(source)
    }

    /// Chooses and opens the backend and allocates the VM's IOAS, on the first device.
    fn ensure_backend(&mut self, source: &Source) -> Result<(), DeviceManagerError> {
        let device = source.given.as_str();
        if let Some(d) = &self.dma {
            if source.file.is_some() && d.backend.kind() != BackendKind::Iommufd {
                return Err(DeviceManagerError::Unsupported {
                    device: device.to_string(),
                    reason: format!(
                        "an open cdev needs the iommufd backend, but this VM uses {}",
                        d.backend.kind()
                    ),
                });
            }
            return Ok(());
        }
        let host = HostFacts::probe();
        let kind = if source.file.is_some() {
            // A cdev fd can only be bound to an iommufd.
            match self.config.backend {
                BackendChoice::Type1 => {
                    return Err(DeviceManagerError::Unsupported {
                        device: device.to_string(),
                        reason: "an open cdev needs the iommufd backend, but --platform \
                                 iommufd=off asks for type1"
                            .to_string(),
                    })
                }
                c => ioasid::choose(
                    if c == BackendChoice::Auto {
                        BackendChoice::Iommufd
                    } else {
                        c
                    },
                    host,
                    None,
                ),
            }
        } else {
            ioasid::choose(self.config.backend, host, source.spec.as_ref())
        }
        .map_err(|e| DeviceManagerError::step(device, "choosing the IOMMU backend", e))?;
        if let Some(why) =
            ioasid::select::why_not_iommufd(self.config.backend, host, kind, source.spec.as_ref())
        {
            info!("{device}: IOMMU backend {kind} instead of iommufd: {why}");
        }
        if kind == BackendKind::Soft {
            return Err(DeviceManagerError::Unsupported {
                device: device.to_string(),
                reason: "the soft backend serves emulated devices, not VFIO devices".to_string(),
            });
        }
        let backend = dma::open_backend(kind, &self.config.dma).map_err(|e| {
            DeviceManagerError::step(
                device,
                match kind {
                    BackendKind::Iommufd => "opening /dev/iommu",
                    _ => "opening the VFIO container",
                },
                e,
            )
        })?;
        fault_point(AddStep::OpenBackend, device)?;
        let state = DmaState::new(backend, self.config.dma, &self.ram)
            .map_err(|e| DeviceManagerError::step(device, "allocating the VM's IOAS", e))?;
        info!(
            "IOMMU backend {kind} chosen (choice {:?}); IOAS {} allocated for the VM",
            self.config.backend, state.ioas.0
        );
        self.dma = Some(state);
        fault_point(AddStep::AllocIoas, device)
    }

    /// The steps after the backend exists; records what it did in `p`.
    fn assign(
        &mut self,
        id: &str,
        source: Source,
        cfg: &DeviceConfig,
        slot: Option<u8>,
        p: &mut Progress,
    ) -> Result<Assigned, DeviceManagerError> {
        let device = source.given.clone();
        let dev_str = device.as_str();
        let Some(dma) = self.dma.as_ref() else {
            return Err(DeviceManagerError::step(
                dev_str,
                "choosing the IOMMU backend",
                Reason("no backend".to_string()),
            ));
        };
        let backend = dma.backend.clone();
        let ioas = dma.ioas;
        let need_ram = dma.ram.is_empty();

        // Bind, and register the VFIO file with KVM.
        let (dev, vfio, kvm_raw): (DevId, Arc<dyn VfioRegions>, Option<RawFd>) =
            match (&backend, source.file, &source.spec) {
                (Backend::Iommufd(b), Some(file), _) => {
                    let (d, v) = b
                        .bind_file(file, source.name.clone())
                        .map_err(|e| DeviceManagerError::step(dev_str, "binding to iommufd", e))?;
                    let raw = v.as_raw_fd();
                    (d, v, Some(raw))
                }
                (Backend::Iommufd(b), None, Some(spec)) => {
                    let (d, v) = b
                        .bind(spec)
                        .map_err(|e| DeviceManagerError::step(dev_str, "binding to iommufd", e))?;
                    let raw = v.as_raw_fd();
                    (d, v, Some(raw))
                }
                (Backend::Type1(b), None, Some(spec)) => {
                    let (d, v) = b.bind(spec, ioas).map_err(|e| {
                        DeviceManagerError::step(dev_str, "opening it through its VFIO group", e)
                    })?;
                    let raw = spec.group.and_then(assign::find_group_fd);
                    if raw.is_none() {
                        warn!(
                            "{dev_str}: the fd of its VFIO group was not found; not registered \
                             with the KVM-VFIO device"
                        );
                    }
                    (d, v, raw)
                }
                _ => {
                    return Err(DeviceManagerError::Unsupported {
                        device: device.clone(),
                        reason: "the type1 backend needs a sysfs path, not an open cdev"
                            .to_string(),
                    })
                }
            };
        p.dev = Some(dev);
        p.vfio = Some(vfio.clone());
        fault_point(AddStep::Bind, dev_str)?;
        if let Some(raw) = kvm_raw {
            self.register_kvm(dev_str, raw, p)?;
        }
        info!(
            "{id}: {device} bound to the {} backend as dev_id {}",
            backend.kind(),
            dev.0
        );

        // Capabilities (iommufd only; an mdev answers "no hardware info", which is not an error).
        let caps = match &backend {
            Backend::Iommufd(b) => b.hw_info(dev).map_err(|e| e.to_string()),
            Backend::Type1(_) => {
                Err("the type1 backend has no IOMMU_GET_HW_INFO (use iommufd)".to_string())
            }
        };
        match &caps {
            Ok(c) => info!(
                "{id}: IOMMU caps: hw info {}, nesting {}, PASID width {}, PRS {}",
                if c.has_hw_info() { "present" } else { "none" },
                c.supports_nesting(),
                c.max_pasid_bits(),
                c.supports_prs()
            ),
            Err(e) => info!("{id}: IOMMU caps unknown: {e}"),
        }
        let mut options = VfioPciOptions::default();
        if cfg.pasid {
            let c = caps.as_ref().map_err(|e| {
                DeviceManagerError::step(dev_str, "checking PASID support", Reason(e.clone()))
            })?;
            if c.max_pasid_bits() == 0 {
                return Err(DeviceManagerError::Unsupported {
                    device: device.clone(),
                    reason: "pasid=on, but GET_HW_INFO reports no PASID support \
                             (out_max_pasid_log2 = 0)"
                        .to_string(),
                });
            }
            options.vpasid = Some(VpasidConfig {
                max_pasid_width: c.max_pasid_bits().min(20),
                execute: c.pasid_exec,
                privileged: c.pasid_priv,
                // vfio-pci shows the device's ATS but the host owns it: a vATS (shown only
                // when the device has ATS) unless the IOMMU path cannot do ATS.
                ats: !c.ats_not_supported,
                // vfio-pci hides PRI: a vPRI only when the IOMMU takes page requests.
                pri_capacity: c.supports_prs().then_some(VPRI_DEFAULT_CAPACITY),
                offset: cfg.x_pasid_offset.map(usize::from),
            });
        }
        if cfg.iommu {
            if let Some(why) = self.viommu.as_ref().and_then(|v| {
                v.refuse_assigned(
                    caps.as_ref()
                        .map(HwCaps::supports_nesting)
                        .map_err(|e| e.as_str()),
                )
            }) {
                return Err(DeviceManagerError::Unsupported {
                    device: device.clone(),
                    reason: why,
                });
            }
        }

        fault_point(AddStep::Caps, dev_str)?;

        // RAM, once per VM (type1 needs a group in the container first, hence after bind).
        if need_ram {
            let mode = RamMapMode::for_kind(backend.kind());
            let result = dma::map_ram(backend.as_dyn(), ioas, &self.ram, mode);
            match result {
                Ok((maps, calls)) => {
                    self.ram_map_calls += calls;
                    if let Some(d) = self.dma.as_mut() {
                        d.ram = maps;
                    }
                    p.ram_mapped = true;
                    fault_point(AddStep::MapRam, dev_str)?;
                    info!(
                        "Guest RAM mapped into IOAS {} with {calls} map calls for {} RAM regions \
                         (total RAM map calls: {})",
                        ioas.0,
                        self.ram.len(),
                        self.ram_map_calls
                    );
                }
                Err(f) => {
                    self.ram_map_calls += f.calls;
                    return Err(DeviceManagerError::step(
                        dev_str,
                        "mapping guest RAM for DMA",
                        f.error,
                    ));
                }
            }
        }

        // Attach (type1 attached the group's container when binding). iommufd reports the
        // paging HWPT the device reaches the IOAS through (`--platform hwpt=`).
        let mut hwpt = None;
        if let (Backend::Iommufd(_), Some(d)) = (&backend, self.dma.as_mut()) {
            // An emulated device (mdev) has no IOMMU of its own: no HWPT can be allocated
            // for it, the kernel reaches the IOAS through an access.
            let emulated = caps.as_ref().is_ok_and(|c| !c.has_hw_info());
            hwpt = d
                .attach_device(dev, emulated)
                .map_err(|e| DeviceManagerError::step(dev_str, "attaching to the VM's IOAS", e))?;
            p.attached = true;
            fault_point(AddStep::Attach, dev_str)?;
        } else {
            info!("{id}: in container (IOAS) {} since it was bound", ioas.0);
        }

        let (bdf, model, sink, mapper) =
            self.place(id, dev_str, &source.name, vfio.clone(), options, slot, p)?;
        Ok(Assigned {
            id: id.to_string(),
            bdf,
            host: source.name,
            given: device,
            dev: Some(dev),
            hwpt,
            config: cfg.clone(),
            _vfio: Some(vfio),
            model: Model::Vfio(model),
            sink,
            mapper,
            caps,
            kvm_file: p.kvm_file,
            soft: None,
        })
    }

    /// Builds the model of `vfio` with its interrupt sink and BAR mapper and puts it on the
    /// PCI bus at `slot` (or the first free one); records what it did in `p`.
    #[allow(clippy::too_many_arguments)]
    fn place(
        &mut self,
        id: &str,
        device: &str,
        name: &DeviceName,
        vfio: Arc<dyn VfioRegions>,
        options: VfioPciOptions,
        slot: Option<u8>,
        p: &mut Progress,
    ) -> Result<Placed, DeviceManagerError> {
        let model_id = match name {
            DeviceName::Mdev(uuid) => VfioDeviceId::Mdev(uuid.clone()),
            other => VfioDeviceId::Pdev(other.to_string()),
        };
        // The slot is chosen before the model is built: its INTx GSI depends on it, and the
        // model asks for its INTx line when it is created.
        let slot = slot.or_else(|| lock(&self.pci).free_slot());
        let mut sink = KvmInterruptSink::new(id, self.router.clone());
        if let Some(s) = slot.filter(|s| (1..=MAX_SLOT).contains(s)) {
            if self.config.intx == IntxWiring::Wire {
                sink = sink.with_intx(s, self.vm_fd.clone());
            }
        }
        let sink = Arc::new(sink);
        p.sink = Some(sink.clone());
        let model = VfioPciDevice::new(model_id, vfio, sink.clone(), options).map_err(
            |e: VfioPciError| DeviceManagerError::step(device, "building the PCI model", e),
        )?;
        let mapper = Arc::new(KvmBarMapper::new(
            id,
            self.vm_fd.clone(),
            self.slots.clone(),
        ));
        p.mapper = Some(mapper.clone());
        let model = Arc::new(Mutex::new(model));
        {
            let mut m = lock(&model);
            m.set_bar_mapper(mapper.clone());
            let windows: usize = m.bar_plans().iter().map(|b| b.mmap.len()).sum();
            let has = |cap: u16| {
                if m.capabilities()
                    .iter()
                    .any(|c| c.id == cap && !c.extended && c.policy != CapPolicy::Hide)
                {
                    "on"
                } else {
                    "off"
                }
            };
            let intx = match (m.intx_pin(), sink.intx_info(), m.intx_unmask()) {
                (Some(pin), Some(line), Some(unmask)) => {
                    format!("{pin} on GSI {} ({})", line.gsi, unmask.name())
                }
                _ => "off".to_string(),
            };
            info!(
                "{id}: model built: {} BARs ({windows} mmapped windows, mapped into the guest \
                 when decoded), MSI {}, MSI-X {}, INTx {intx}",
                m.bar_plans().len(),
                has(0x05),
                has(0x11)
            );
        }
        p.model = Some(model.clone());
        fault_point(AddStep::BuildModel, device)?;
        let shared: SharedPciDevice = model.clone();
        let bdf = lock(&self.pci)
            .add_device(shared, slot)
            .map_err(|e| DeviceManagerError::step(device, "placing it on the PCI bus", e))?;
        p.bdf = Some(bdf);
        fault_point(AddStep::PlaceOnBus, device)?;
        if let Some(states) = lock(&self.pci).bar_states(bdf) {
            for s in states {
                info!(
                    "{id}: at {bdf}, BAR{} ({:?}, {:#x} bytes) assigned at {:#x}",
                    s.info.index, s.info.kind, s.info.size, s.assigned
                );
            }
        }
        Ok((bdf, model, sink, mapper))
    }

    /// Adds `raw` (a cdev or group fd) to the KVM-VFIO device, creating it on first use.
    fn register_kvm(
        &mut self,
        device: &str,
        raw: RawFd,
        p: &mut Progress,
    ) -> Result<(), DeviceManagerError> {
        if self.kvm_vfio.is_none() {
            let kv = KvmVfio::create(&self.vm_fd)
                .map_err(|e| DeviceManagerError::step(device, "creating the KVM-VFIO device", e))?;
            self.kvm_vfio = Some(kv);
        }
        if let Some(kv) = &self.kvm_vfio {
            kv.add(raw)
                .map_err(|e| DeviceManagerError::step(device, "KVM_DEV_VFIO_FILE_ADD", e))?;
        }
        p.kvm_file = Some(raw);
        fault_point(AddStep::KvmVfio, device)?;
        info!("{device}: VFIO file (fd {raw}) registered with the KVM-VFIO device");
        Ok(())
    }

    /// Undoes a partial add, in reverse order.
    fn rollback(&mut self, device: &str, p: Progress) {
        if let Some(bdf) = p.bdf {
            if let Err(e) = lock(&self.pci).remove_device(bdf) {
                warn!("{device}: {e}");
            }
        }
        if let Some(s) = &p.sink {
            s.release_all();
        }
        if let Some(m) = &p.mapper {
            m.unmap_all();
        }
        drop(p.model);
        if let (Some(raw), Some(kv)) = (p.kvm_file, &self.kvm_vfio) {
            if let Err(e) = kv.del(raw) {
                warn!("{device}: KVM_DEV_VFIO_FILE_DEL: {e}");
            }
        }
        if let Some(d) = &self.dma {
            if let (true, Some(dev)) = (p.attached, p.dev) {
                if let Err(e) = d.backend.as_dyn().detach(dev, None) {
                    warn!("{device}: {e}");
                }
            }
            if p.ram_mapped && self.devices.is_empty() {
                dma::unmap_ram(d.backend.as_dyn(), d.ioas, &d.ram);
            }
            if let Some(dev) = p.dev {
                match &d.backend {
                    Backend::Iommufd(b) => b.unbind(dev),
                    Backend::Type1(b) => b.unbind(dev),
                }
            }
        }
        if p.ram_mapped && self.devices.is_empty() {
            if let Some(d) = self.dma.as_mut() {
                d.ram.clear();
            }
        }
        drop(p.sink);
        drop(p.mapper);
        drop(p.vfio);
    }

    /// Adds a PCI function whose VFIO regions come from `regions`, without an IOMMU backend:
    /// no bind, no IOAS, no RAM mapping, so the device cannot do DMA. Its interrupts and BAR
    /// windows go through the same KVM sink and mapper as an assigned device's. A seam for
    /// tests (a fake `VfioRegions`) and for VMM-internal device models; `name` names the host
    /// side in errors and introspection.
    pub fn add_unbacked_device(
        &mut self,
        id: Option<&str>,
        name: &str,
        regions: Arc<dyn VfioRegions>,
        slot: Option<u8>,
    ) -> Result<AddedDevice, DeviceManagerError> {
        check_slot_range(slot, name)?;
        self.check_new_id(id, name)?;
        let (id, auto) = match id {
            Some(id) => (id.to_string(), None),
            None => {
                let (id, n) = self.auto_id();
                (id, Some(n))
            }
        };
        let host = DeviceName::Emulated(name.to_string());
        let slot = self.choose_slot(false, slot, name)?;
        fault_point(AddStep::ChooseSlot, name)?;
        let mut p = Progress::default();
        let placed = self.place(
            &id,
            name,
            &host,
            regions.clone(),
            VfioPciOptions::default(),
            slot,
            &mut p,
        );
        let (bdf, model, sink, mapper) = match placed {
            Ok(placed) => placed,
            Err(e) => {
                self.rollback(name, p);
                return Err(e);
            }
        };
        if let Some(n) = auto {
            self.next_auto_id = n + 1;
        }
        info!("{id}: {host} added at {bdf} without an IOMMU backend");
        self.devices.push(Assigned {
            id: id.clone(),
            bdf,
            host,
            given: name.to_string(),
            dev: None,
            hwpt: None,
            config: DeviceConfig {
                id: Some(id.clone()),
                pci_device_id: slot,
                ..Default::default()
            },
            _vfio: Some(regions),
            model: Model::Vfio(model),
            sink,
            mapper,
            caps: Err("no IOMMU backend: the device was added without one".to_string()),
            kvm_file: None,
            soft: None,
        });
        Ok(AddedDevice { id, bdf })
    }
}
