//! The device manager: the VM's PCI bus and its assigned (VFIO) devices.
//!
//! Created for every VM right after [`crate::vm::Vm::new`], with or without devices:
//! - the root PCI bus ([`devices::pci::PciBus`]) with its host bridge at 00:00.0, reachable
//!   through ECAM at [`layout::PCI_ECAM_START`] and the legacy 0xCF8/0xCFC ports, handing out
//!   BARs from the 32-bit window at [`layout::PCI_MMIO32_START`], the 64-bit window of
//!   [`layout::pci_mmio64_window`] and the I/O window [`PCI_IO_START`];
//! - the `ioasid` backend, chosen when the first device arrives (`--platform iommufd=`),
//!   with one IOAS for the VM into which guest RAM is mapped once per RAM region ([`dma`]);
//! - per device: bind, attach to the IOAS (iommufd reports the paging HWPT it attached the
//!   device through), the KVM-VFIO registration ([`assign`]), the
//!   vfio-pci model with a KVM interrupt sink ([`interrupts`]) and BAR mapper
//!   ([`bar_mapper`]), and its slot on the bus;
//! - introspection from that state in the API's types ([`state`]).
//!
//! Every step of [`DeviceManager::add_device`] is undone when a later one fails, so a failed
//! add leaves no fd, mapping, route or bus entry behind. Logging at `info` names each step
//! (bound dev_id, attached IOAS, RAM mapped, BAR windows mapped, MSI routes).
//!
//! Owns: the PCI bus and its config-access handlers on the VM's buses, the backend and IOAS,
//! the assigned devices. Must not touch: guest notification of hotplug (ACPI's job), ioctls
//! on `/dev/iommu` or `/dev/vfio/*` other than through `ioasid` (the KVM-VFIO device is a KVM
//! ioctl).

pub mod add;
pub mod assign;
pub mod bar_mapper;
pub mod dma;
pub mod emulated;
pub mod interrupts;
pub mod remove;
pub mod state;
pub mod sva;
pub mod swq;
pub mod viommu;

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use api::{DeviceConfig, DeviceConfigError};
use devices::bus::Bus;
use devices::pci::{
    AddressWindow, PciBdf, PciBus, PciBusConfig, PciConfigIo, PciEcam, PciError, SharedPciBus,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use devices::vfio::{VfioPciDevice, VfioRegions};
use ioasid::{
    BackendChoice, BackendKind, DevId, DeviceName, HwCaps, HwptId, IommufdBackend, PasidSpace,
};
use kvm_ioctls::VmFd;
use log::info;
use thiserror::Error;

pub use crate::config::check_device_config;
use crate::config::{OnOffAuto, PlatformConfig};
use crate::irq::GsiRouter;
use crate::layout::{
    pci_mmio64_window, PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO32_SIZE, PCI_MMIO32_START,
};
use crate::memory::RamRegion;
use crate::vm::{MemorySlots, Vm};

use assign::KvmVfio;
use bar_mapper::KvmBarMapper;
use dma::DmaState;
use interrupts::KvmInterruptSink;

/// First port of the I/O window for I/O BARs. Not in `layout` (which another change owns);
/// it lies inside the `0x0d00..=0xffff` I/O range the DSDT gives PCI0.
pub const PCI_IO_START: u64 = 0xc000;
/// Size of the I/O BAR window.
pub const PCI_IO_SIZE: u64 = 0x4000;
/// The one PCI segment.
pub const PCI_SEGMENT: u16 = 0;
/// Prefix of the ids the manager makes up (`_vfio0`, `_vfio1`, ...), as Cloud Hypervisor.
pub const AUTO_ID_PREFIX: &str = "_vfio";

/// Whether assigned devices get a legacy INTx line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IntxWiring {
    /// Each device's INTx pin is routed to its slot's IOAPIC GSI (what the DSDT's `_PRT`
    /// tells an ACPI guest) with a KVM resample irqfd.
    #[default]
    Wire,
    /// No INTx: the guest has no ACPI to find the route (payload VMs), so a line would only
    /// cost a resample irqfd per device add and remove. MSI and MSI-X are unaffected.
    Off,
}

/// Device manager options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceManagerConfig {
    /// Which `ioasid` backend to use for assigned devices.
    pub backend: BackendChoice,
    /// INTx lines for assigned devices.
    pub intx: IntxWiring,
    /// The emulated VT-d (`--platform viommu=vtd`), if any.
    pub viommu: Option<viommu::ViommuSetup>,
    /// The iommufd options of `--platform` (`hwpt=`, `rlimit_mode=`).
    pub dma: dma::DmaOptions,
}

impl DeviceManagerConfig {
    /// From `--platform`: `iommufd=on` is iommufd, `off` type1, `auto` whichever works.
    pub fn from_platform(p: &PlatformConfig) -> Self {
        Self {
            backend: match p.iommufd {
                OnOffAuto::On => BackendChoice::Iommufd,
                OnOffAuto::Off => BackendChoice::Type1,
                OnOffAuto::Auto => BackendChoice::Auto,
            },
            intx: IntxWiring::Wire,
            viommu: viommu::ViommuSetup::from_platform(p),
            dma: dma::DmaOptions {
                hwpt: p.hwpt,
                rlimit: p.rlimit_mode,
            },
        }
    }
}

/// A device that was added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddedDevice {
    /// Its id.
    pub id: String,
    /// Its guest address.
    pub bdf: PciBdf,
}

impl AddedDevice {
    /// The REST API's reply body.
    pub fn to_api(&self) -> api::types::PciDeviceInfo {
        api::types::PciDeviceInfo {
            id: self.id.clone(),
            bdf: self.bdf.to_string(),
        }
    }
}

/// A device that was removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemovedDevice {
    /// Its id.
    pub id: String,
    /// The guest address it had.
    pub bdf: PciBdf,
    /// The host device (BDF, mdev UUID, or cdev fd).
    pub host: String,
    /// Steps of the teardown that failed (logged; the removal itself went through).
    pub warnings: Vec<String>,
}

/// Errors of the device manager.
#[derive(Debug, Error)]
pub enum DeviceManagerError {
    /// The root bus could not be created.
    #[error("Cannot create the PCI bus")]
    PciBus(#[source] PciError),
    /// A config-access handler could not be registered.
    #[error("Cannot register PCI {what} at {base:#x} on the VM's bus")]
    ConfigAccess {
        /// "ECAM" or "0xCF8/0xCFC".
        what: &'static str,
        /// Its base address or port.
        base: u64,
        /// The bus error.
        #[source]
        source: devices::bus::BusError,
    },
    /// The configuration is refused before anything is touched.
    #[error("Invalid device config for {device}")]
    Config {
        /// The device as given.
        device: String,
        /// Why.
        #[source]
        source: DeviceConfigError,
    },
    /// An option this VMM does not implement.
    #[error("Cannot assign {device}: {reason}")]
    Unsupported {
        /// The device as given.
        device: String,
        /// What is not supported.
        reason: String,
    },
    /// The id is taken.
    #[error("Device id {id} is already in use (by {host})")]
    DuplicateId {
        /// The id.
        id: String,
        /// The host device that has it.
        host: String,
    },
    /// The host device is already assigned to this VM.
    #[error("{device} is already assigned to this VM as {id}")]
    AlreadyAssigned {
        /// The host device.
        device: String,
        /// The id it has.
        id: String,
    },
    /// One step of assigning failed.
    #[error("Cannot assign {device}: {step} failed")]
    Step {
        /// The host device (BDF, UUID, path or fd).
        device: String,
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No device has that id.
    #[error("No device with id {id}")]
    UnknownId {
        /// The id.
        id: String,
    },
}

/// A plain message as a source of [`DeviceManagerError::Step`].
#[derive(Debug, Error)]
#[error("{0}")]
pub struct Reason(pub String);

impl DeviceManagerError {
    fn step(
        device: &str,
        step: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        DeviceManagerError::Step {
            device: device.to_string(),
            step,
            source: source.into(),
        }
    }

    /// The message with its whole cause chain, `: `-separated (for the REST API and logs).
    pub fn message(&self) -> String {
        let mut s = self.to_string();
        let mut src = std::error::Error::source(self);
        while let Some(e) = src {
            s.push_str(": ");
            s.push_str(&e.to_string());
            src = e.source();
        }
        s
    }

    /// The REST API error for this failure: 404 for an unknown id, 409 for a duplicate id or
    /// device, 400 for a refused config, 500 otherwise.
    pub fn to_api_error(&self) -> api::ApiError {
        let m = self.message();
        match self {
            DeviceManagerError::UnknownId { .. } => api::ApiError::NotFound(m),
            DeviceManagerError::DuplicateId { .. } | DeviceManagerError::AlreadyAssigned { .. } => {
                api::ApiError::Conflict(m)
            }
            DeviceManagerError::Config { .. } | DeviceManagerError::Unsupported { .. } => {
                api::ApiError::BadRequest(m)
            }
            _ => api::ApiError::Internal(m),
        }
    }
}

/// The PCI model of a device.
enum Model {
    /// The vfio-pci model of an assigned (or unbacked) VFIO device.
    Vfio(Arc<Mutex<VfioPciDevice>>),
    /// Any other PCI device model, emulated by the VMM.
    Emulated(devices::pci::SharedPciDevice),
}

/// One device on the bus: assigned (VFIO), unbacked, or emulated.
struct Assigned {
    id: String,
    bdf: PciBdf,
    host: DeviceName,
    given: String,
    /// The backend's id for it; `None` for a device added without a backend
    /// ([`DeviceManager::add_unbacked_device`]).
    dev: Option<DevId>,
    config: DeviceConfig,
    /// Keeps the VFIO device open (the model and the backend hold it too); `None` for an
    /// emulated device.
    _vfio: Option<Arc<dyn VfioRegions>>,
    model: Model,
    sink: Arc<KvmInterruptSink>,
    mapper: Arc<KvmBarMapper>,
    /// The paging HWPT the kernel attached it to over the VM's IOAS, as the attach reported
    /// it (iommufd and a physical device); `None` with type1, for an emulated device (mdev)
    /// and for an unbacked device.
    hwpt: Option<HwptId>,
    /// `IOMMU_GET_HW_INFO`, decoded (iommufd), or why it is unknown.
    caps: Result<HwCaps, String>,
    /// The file registered with the KVM-VFIO device (cdev or group fd).
    kvm_file: Option<RawFd>,
    /// An emulated device behind the vIOMMU: its soft backend registration.
    soft: Option<emulated::SoftDevice>,
}

/// What [`DeviceManager::place`] returns.
type Placed = (
    PciBdf,
    Arc<Mutex<VfioPciDevice>>,
    Arc<KvmInterruptSink>,
    Arc<KvmBarMapper>,
);

/// What an add had done when it failed, to undo in reverse.
#[derive(Default)]
struct Progress {
    dev: Option<DevId>,
    vfio: Option<Arc<dyn VfioRegions>>,
    ram_mapped: bool,
    attached: bool,
    kvm_file: Option<RawFd>,
    model: Option<Arc<Mutex<VfioPciDevice>>>,
    sink: Option<Arc<KvmInterruptSink>>,
    mapper: Option<Arc<KvmBarMapper>>,
    bdf: Option<PciBdf>,
}

/// The device manager of one VM. See the module documentation.
pub struct DeviceManager {
    config: DeviceManagerConfig,
    pci: SharedPciBus,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    vm_fd: Arc<VmFd>,
    router: Option<Arc<GsiRouter>>,
    slots: Arc<MemorySlots>,
    ram: Vec<RamRegion>,
    dma: Option<DmaState>,
    kvm_vfio: Option<KvmVfio>,
    devices: Vec<Assigned>,
    next_auto_id: u32,
    /// The VM's guest-to-host PASID table, shared with the vIOMMU bridge (which binds).
    pasids: Arc<Mutex<PasidSpace>>,
    ram_map_calls: u64,
    /// The emulated VT-d and its slots (`--platform viommu=vtd`).
    viommu: Option<viommu::ViommuState>,
    /// The VM's IA32_PASID state (`None` when KVM cannot virtualize the MSR), for the exit
    /// counters in `vm.counters`.
    ia32_pasid: Option<Arc<crate::enqcmd::Ia32Pasid>>,
    /// The counter handles of the emulated devices that have them, by device id.
    emulated_counters: std::collections::BTreeMap<String, emulated::CounterHandle>,
}

impl std::fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceManager")
            .field("backend", &self.backend_kind())
            .field(
                "devices",
                &self.devices.iter().map(|d| &d.id).collect::<Vec<_>>(),
            )
            .field("ram_map_calls", &self.ram_map_calls)
            .finish()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceManager {
    /// Creates the PCI bus of `vm` and registers ECAM and 0xCF8/0xCFC on its buses. Opens no
    /// IOMMU or VFIO file: that waits for the first device.
    pub fn new(vm: &Vm, config: DeviceManagerConfig) -> Result<Self, DeviceManagerError> {
        let (mmio64_base, mmio64_size) = pci_mmio64_window(vm.ram().end());
        let bus_config = PciBusConfig {
            segment: PCI_SEGMENT,
            mmio32: AddressWindow {
                base: PCI_MMIO32_START,
                size: PCI_MMIO32_SIZE,
            },
            mmio64: Some(AddressWindow {
                base: mmio64_base,
                size: mmio64_size,
            }),
            io: Some(AddressWindow {
                base: PCI_IO_START,
                size: PCI_IO_SIZE,
            }),
        };
        let mmio = vm.mmio_bus().clone();
        let pio = vm.pio_bus().clone();
        let pci: SharedPciBus = Arc::new(Mutex::new(
            PciBus::new(bus_config, mmio.clone(), pio.clone())
                .map_err(DeviceManagerError::PciBus)?,
        ));
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(pci.clone()))),
            PCI_ECAM_START,
            PCI_ECAM_SIZE,
        )
        .map_err(|source| DeviceManagerError::ConfigAccess {
            what: "ECAM",
            base: PCI_ECAM_START,
            source,
        })?;
        if let Err(source) = pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_PORT_SIZE,
        ) {
            let _ = mmio.remove(PCI_ECAM_START);
            return Err(DeviceManagerError::ConfigAccess {
                what: "0xCF8/0xCFC",
                base: PCI_CONFIG_IO_PORT,
                source,
            });
        }
        info!(
            "PCI bus {PCI_SEGMENT:04x}:00: host bridge at 00:00.0, ECAM at {PCI_ECAM_START:#x}, \
             config ports 0xcf8/0xcfc, BAR windows 32-bit {PCI_MMIO32_START:#x}+{PCI_MMIO32_SIZE:#x}, \
             64-bit {mmio64_base:#x}+{mmio64_size:#x}, I/O {PCI_IO_START:#x}+{PCI_IO_SIZE:#x}; \
             backend choice {:?}",
            config.backend
        );
        let pasids = PasidSpace::new(
            crate::viommu::bridge::HOST_PASIDS.0,
            crate::viommu::bridge::HOST_PASIDS.1,
        )
        .ok_or_else(|| {
            DeviceManagerError::step("the VM", "PASID space setup", Reason("empty range".into()))
        })?;
        Ok(Self {
            config,
            pci,
            mmio,
            pio,
            vm_fd: vm.vm_fd().clone(),
            router: vm.gsi_router().ok().cloned(),
            slots: vm.memory_slots().clone(),
            ram: vm.ram_regions().to_vec(),
            dma: None,
            kvm_vfio: None,
            devices: Vec::new(),
            next_auto_id: 0,
            pasids: Arc::new(Mutex::new(pasids)),
            ram_map_calls: 0,
            viommu: None,
            ia32_pasid: vm.ia32_pasid().ok().cloned(),
            emulated_counters: std::collections::BTreeMap::new(),
        })
        .and_then(|mut dm: Self| {
            if let Some(setup) = config.viommu {
                dm.viommu = Some(viommu::ViommuState::new(setup, vm)?);
            }
            Ok(dm)
        })
    }

    /// The PCI bus (for tests and the ACPI hotplug controller).
    pub fn pci_bus(&self) -> &SharedPciBus {
        &self.pci
    }

    /// The backend in use (`None` until the first device is added, and again after the last
    /// one is removed).
    pub fn backend_kind(&self) -> Option<BackendKind> {
        self.dma.as_ref().map(|d| d.backend.kind())
    }

    /// RAM map calls issued since the VM started (one per RAM region per time the VM's RAM
    /// was mapped; RAM is mapped when the first device arrives).
    pub fn ram_map_calls(&self) -> u64 {
        self.ram_map_calls
    }

    /// The RAM regions of the VM (what one full RAM mapping covers).
    pub fn ram_regions(&self) -> &[RamRegion] {
        &self.ram
    }

    /// Ids of the assigned devices, in the order they were added.
    pub fn device_ids(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.id.clone()).collect()
    }

    fn find(&self, id: &str) -> Option<&Assigned> {
        self.devices.iter().find(|d| d.id == id)
    }

    /// Refuses a caller-chosen `id` that is malformed or taken (`name` names the device in
    /// the error); `None` (the manager makes one up) passes.
    fn check_new_id(&self, id: Option<&str>, name: &str) -> Result<(), DeviceManagerError> {
        let Some(id) = id else {
            return Ok(());
        };
        api::device_config::validate_id(id).map_err(|source| DeviceManagerError::Config {
            device: name.to_string(),
            source,
        })?;
        match self.find(id) {
            Some(d) => Err(DeviceManagerError::DuplicateId {
                id: id.to_string(),
                host: d.host.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// The next free made-up id and its number (taken only when the add succeeds).
    fn auto_id(&self) -> (String, u32) {
        let mut n = self.next_auto_id;
        loop {
            let id = format!("{AUTO_ID_PREFIX}{n}");
            if self.find(&id).is_none() {
                return (id, n);
            }
            n += 1;
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.remove_all();
        self.teardown_dma();
        let _ = self.mmio.remove(PCI_ECAM_START);
        let _ = self.pio.remove(PCI_CONFIG_IO_PORT);
        if self.viommu.take().is_some() {
            let _ = self.mmio.remove(crate::layout::VTD_REGS_START);
        }
    }
}

/// `ioasid-vmm iommu-info --device PATH`: binds the device to a fresh iommufd (no attach)
/// and returns its decoded `IOMMU_GET_HW_INFO` in the shape of a [`api::types::IommuInfo`]
/// device entry. `PATH` is a sysfs device path or `/dev/vfio/devices/vfioN`.
pub fn host_iommu_info(path: &Path) -> Result<api::types::DeviceIommuCaps, ioasid::Error> {
    let spec = assign::resolve_path(path)?;
    let backend = IommufdBackend::open()?;
    let (dev, _vfio) = backend.bind(&spec)?;
    let caps = backend.hw_info(dev);
    backend.unbind(dev);
    let caps = caps?;
    let mut e = state::caps_entry(&spec.name.to_string(), Some(spec.name.to_string()), &caps);
    if !spec.is_mdev {
        // The function's own config space, as sysfs gives it to root (4 KiB with the
        // extended capabilities); an unreadable file is reported, not fatal.
        let cfg = spec.sysfs.join("config");
        let report = match std::fs::read(&cfg) {
            Ok(image) => {
                let info = devices::vfio::DmwrInfo::detect(&image);
                (info.completer, serde_json::json!(info))
            }
            Err(e) => (
                false,
                serde_json::json!({ "unknown": format!("{}: {e}", cfg.display()) }),
            ),
        };
        state::add_dmwr(&mut e, report.0, report.1);
    }
    Ok(e)
}
