//! Emulated PCI devices: any [`devices::pci::PciDevice`] model the VMM builds itself, placed
//! on the bus like an assigned device, optionally behind the vIOMMU with its DMA through a
//! soft backend the caller chooses per device (the vSVA issue's emulated devices, and tests
//! that want their own `SoftIommu` to observe).
//!
//! The model is built after its slot is chosen and, behind the vIOMMU, after the bridge has
//! registered it: it receives its BDF, an interrupt sink, and the `DmaView` its DMA goes
//! through (guest IOVAs translated by the guest's own tables on each access).

use std::collections::BTreeMap;
use std::sync::Arc;

use api::DeviceConfig;
use devices::pci::{PciBdf, SharedPciDevice};
use devices::sva::SvaHandle;
use devices::swq::SwqHandle;
use devices::viommu::DmaView;
use ioasid::{DevId, DeviceName, IommuBackend, SoftIommu};
use log::info;

use super::bar_mapper::KvmBarMapper;
use super::interrupts::KvmInterruptSink;
use super::{
    lock, AddedDevice, Assigned, DeviceManager, DeviceManagerError, Model, Reason, PCI_SEGMENT,
};

/// How an emulated device reaches guest memory.
#[derive(Clone, Default)]
pub enum EmulatedDma {
    /// Not behind the vIOMMU: the model gets no DMA view.
    #[default]
    Direct,
    /// Behind the vIOMMU: the model's DMA goes through a view over this soft backend, which
    /// walks the guest's tables per access.
    Soft(Arc<SoftIommu>),
}

/// What the model of an emulated device is built with.
pub struct EmulatedParts {
    /// Its address.
    pub bdf: PciBdf,
    /// Its interrupts (MSI routes through KVM irqfds).
    pub sink: Arc<KvmInterruptSink>,
    /// Its DMA through the vIOMMU ([`EmulatedDma::Soft`]), addressed by guest PASID.
    pub dma: Option<Arc<dyn DmaView>>,
    /// Its soft-backend registration ([`EmulatedDma::Soft`]), for a model that issues DMA
    /// with host PASIDs itself (the shared-work-queue device: the CPU side gives it the
    /// host PASID, as ENQCMD does).
    pub soft: Option<(Arc<SoftIommu>, DevId)>,
}

/// A handle on an emulated device's counters, read for `vm.counters` without the device's
/// lock.
#[derive(Clone)]
pub(super) enum CounterHandle {
    /// The SVA copy engine (`emulated=sva-copy`).
    Sva(SvaHandle),
    /// The shared-work-queue device (`emulated=swq`).
    Swq(SwqHandle),
}

impl CounterHandle {
    /// The device's counters by name (the fields of its counters struct).
    pub(super) fn snapshot(&self) -> BTreeMap<String, u64> {
        let v = match self {
            CounterHandle::Sva(h) => serde_json::to_value(h.counters()),
            CounterHandle::Swq(h) => serde_json::to_value(h.counters()),
        };
        v.ok()
            .as_ref()
            .and_then(serde_json::Value::as_object)
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The soft-backend registration of an emulated device behind the vIOMMU.
pub(super) struct SoftDevice {
    pub(super) soft: Arc<SoftIommu>,
    pub(super) dev: DevId,
}

impl DeviceManager {
    /// Adds an emulated PCI device: the slot (behind the vIOMMU: one of its DMAR scope), the
    /// bridge registration with `dma`'s soft backend, then `build` with the parts, then the
    /// bus and the model's scope. `name` names it in errors and introspection. On failure
    /// nothing is left behind.
    pub fn add_emulated_device(
        &mut self,
        id: Option<&str>,
        name: &str,
        slot: Option<u8>,
        dma: EmulatedDma,
        build: impl FnOnce(EmulatedParts) -> Result<SharedPciDevice, String>,
    ) -> Result<AddedDevice, DeviceManagerError> {
        self.check_new_id(id, name)?;
        let behind = matches!(dma, EmulatedDma::Soft(_));
        if behind && self.viommu.is_none() {
            return Err(DeviceManagerError::Unsupported {
                device: name.to_string(),
                reason: "a device behind the vIOMMU needs --platform viommu=vtd".into(),
            });
        }
        let slot = match self.choose_slot(behind, slot, name)? {
            Some(s) => s,
            None => lock(&self.pci).free_slot().ok_or_else(|| {
                DeviceManagerError::step(
                    name,
                    "choosing the PCI slot",
                    Reason("no free slot".into()),
                )
            })?,
        };
        let bdf = PciBdf::root_slot(PCI_SEGMENT, slot);
        if lock(&self.pci).device(bdf).is_some() {
            return Err(DeviceManagerError::step(
                name,
                "choosing the PCI slot",
                Reason(format!("{bdf} is in use")),
            ));
        }
        let (id, auto) = match id {
            Some(id) => (id.to_string(), None),
            None => {
                let (id, n) = self.auto_id();
                (id, Some(n))
            }
        };
        let mut soft_dev: Option<SoftDevice> = None;
        let mut view: Option<Arc<dyn DmaView>> = None;
        if let EmulatedDma::Soft(soft) = dma {
            let dev = soft.register_device(name).map_err(|e| {
                DeviceManagerError::step(name, "registering it on the soft backend", e)
            })?;
            let registered = self.emulated_bridge(&soft).and_then(|h| {
                h.add_emulated(bdf, soft.clone(), dev)
                    .map_err(|e| DeviceManagerError::step(name, "putting it behind the vIOMMU", e))
            });
            match registered {
                Ok(v) => view = Some(v),
                Err(e) => {
                    let _ = soft.unregister_device(dev);
                    self.drop_idle_bridge();
                    return Err(e);
                }
            }
            soft_dev = Some(SoftDevice { soft, dev });
        }
        let sink = Arc::new(KvmInterruptSink::new(&id, self.router.clone()));
        let undo = |dm: &mut Self, soft_dev: Option<SoftDevice>| {
            if let Some(s) = soft_dev {
                if let Some(h) = dm.viommu.as_ref().and_then(|v| v.host.clone()) {
                    let _ = h.remove(bdf);
                }
                let _ = s.soft.unregister_device(s.dev);
                dm.drop_idle_bridge();
            }
        };
        let model = match build(EmulatedParts {
            bdf,
            sink: sink.clone(),
            dma: view,
            soft: soft_dev.as_ref().map(|s| (s.soft.clone(), s.dev)),
        }) {
            Ok(m) => m,
            Err(why) => {
                undo(self, soft_dev);
                return Err(DeviceManagerError::step(
                    name,
                    "building the PCI model",
                    Reason(why),
                ));
            }
        };
        let placed = lock(&self.pci).add_device(model.clone(), Some(slot));
        if let Err(e) = placed {
            sink.release_all();
            undo(self, soft_dev);
            return Err(DeviceManagerError::step(
                name,
                "placing it on the PCI bus",
                e,
            ));
        }
        if behind {
            if let Some(v) = self.viommu.as_mut() {
                v.slots.commit(slot);
                lock(&v.vtd).add_device(bdf);
            }
        }
        if let Some(n) = auto {
            self.next_auto_id = n + 1;
        }
        info!(
            "{id}: emulated {name} at {bdf}{}",
            if behind {
                " behind the vIOMMU (soft backend)"
            } else {
                ""
            }
        );
        self.devices.push(Assigned {
            id: id.clone(),
            bdf,
            host: DeviceName::Emulated(name.to_string()),
            given: name.to_string(),
            dev: None,
            config: DeviceConfig {
                id: Some(id.clone()),
                iommu: behind,
                pci_device_id: Some(slot),
                ..Default::default()
            },
            _vfio: None,
            model: Model::Emulated(model),
            sink,
            mapper: Arc::new(KvmBarMapper::new(
                &id,
                self.vm_fd.clone(),
                self.slots.clone(),
            )),
            hwpt: None,
            caps: Err("an emulated device has no host IOMMU".to_string()),
            kvm_file: None,
            soft: soft_dev,
        });
        Ok(AddedDevice { id, bdf })
    }

    /// The host bridge for an emulated device on `soft`: the VM's, or (without one) a
    /// bridge over `soft` itself with guest RAM mapped into an IOAS of it.
    fn emulated_bridge(
        &mut self,
        soft: &Arc<SoftIommu>,
    ) -> Result<Arc<crate::viommu::VtdBridge>, DeviceManagerError> {
        if let Some(h) = self.viommu.as_ref().and_then(|v| v.host.clone()) {
            return Ok(h);
        }
        if self.dma.is_some() {
            return self.host_bridge();
        }
        let step = |e: ioasid::Error| {
            DeviceManagerError::step("the vIOMMU", "mapping guest RAM into the soft backend", e)
        };
        let ioas = soft.ioas_alloc().map_err(step)?;
        if let Err(f) = super::dma::map_ram(
            soft.as_ref(),
            ioas,
            &self.ram,
            super::dma::RamMapMode::ByAddress,
        ) {
            let _ = soft.destroy(ioas.0);
            return Err(step(*f.error));
        }
        let backend: Arc<dyn IommuBackend> = soft.clone();
        let Some(v) = self.viommu.as_mut() else {
            let _ = soft.destroy(ioas.0);
            return Err(DeviceManagerError::Unsupported {
                device: "an emulated device".into(),
                reason: "a device behind the vIOMMU needs --platform viommu=vtd".into(),
            });
        };
        let h =
            super::sva::new_host_bridge(v, &self.pasids, backend.clone(), ioas, self.ram.clone());
        v.bridge.set(Some(h.clone()));
        v.host = Some(h.clone());
        v.host_backend = Some(backend);
        v.soft_ram = Some((soft.clone(), ioas));
        info!(
            "vIOMMU: host bridge over an emulated device's soft backend (IOAS {})",
            ioas.0
        );
        Ok(h)
    }
}

impl DeviceManager {
    /// The model of emulated device `id` (tests and the emulated devices' own code).
    pub fn emulated_model(&self, id: &str) -> Option<SharedPciDevice> {
        self.find(id).and_then(|d| match &d.model {
            Model::Emulated(m) => Some(m.clone()),
            Model::Vfio(_) => None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::any::Any;
    use std::sync::Mutex;

    use devices::pci::{PciBarInfo, PciDevice};
    use devices::viommu::linux_harness::{LinuxHarness, Stage};
    use devices::viommu::GuestMemoryAccess;
    use ioasid::SoftConfig;

    use super::*;
    use crate::config::{OnOffAuto, ViommuConfig};
    use crate::device_manager::viommu::ViommuSetup;
    use crate::device_manager::{DeviceManagerConfig, IntxWiring};
    use crate::layout::{VIOMMU_SLOTS, VTD_REGS_START};
    use crate::memory::RamConfig;
    use crate::viommu::VmGuestMemory;
    use crate::vm::{IrqchipMode, Vm, VmOptions};

    /// A PCI function with an id and nothing else.
    struct Bare;

    impl PciDevice for Bare {
        fn read_config_register(&mut self, reg_idx: usize) -> u32 {
            if reg_idx == 0 {
                0x0001_1af4
            } else {
                0
            }
        }
        fn write_config_register(&mut self, _reg_idx: usize, _offset: u64, _data: &[u8]) {}
        fn bars(&self) -> Vec<PciBarInfo> {
            Vec::new()
        }
        fn read_bar(&mut self, _bar: u8, _offset: u64, _data: &mut [u8]) {}
        fn write_bar(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn Any {
            self
        }
    }

    const IOVA: u64 = 0x4000_0000;
    const BUF: u64 = 0x20_0000;

    #[test]
    fn emulated_device_dma_goes_through_the_viommu_on_its_soft_backend() {
        let name = "emulated_device_dma_goes_through_the_viommu_on_its_soft_backend";
        if !std::path::Path::new("/dev/kvm").exists() {
            ioasid::test_skip::record(name, "no /dev/kvm");
            return;
        }
        let vm = Vm::new(VmOptions {
            vcpus: 1,
            ram: RamConfig {
                size: 32 << 20,
                hugepages: false,
            },
            irqchip: IrqchipMode::Off,
        })
        .unwrap();
        let mut dm = DeviceManager::new(
            &vm,
            DeviceManagerConfig {
                intx: IntxWiring::Off,
                viommu: Some(ViommuSetup {
                    vtd: ViommuConfig {
                        fsts: OnOffAuto::Off,
                        ..ViommuConfig::default()
                    },
                    address_width: 48,
                }),
                ..DeviceManagerConfig::default()
            },
        )
        .unwrap();
        let soft = Arc::new(
            SoftIommu::from_guest_memory(vm.ram().memory(), SoftConfig::default()).unwrap(),
        );
        let view: Arc<Mutex<Option<Arc<dyn DmaView>>>> = Arc::default();
        let v = view.clone();
        let added = dm
            .add_emulated_device(
                Some("emu0"),
                "bare",
                None,
                EmulatedDma::Soft(soft.clone()),
                move |parts| {
                    *v.lock().unwrap() = parts.dma;
                    Ok(Arc::new(Mutex::new(Bare)))
                },
            )
            .unwrap();
        assert!(VIOMMU_SLOTS.contains(&added.bdf.device()), "{}", added.bdf);
        let view = view.lock().unwrap().clone().expect("a DMA view");
        // Pass-through until the guest enables translation.
        view.write(None, BUF, b"gpa").unwrap();

        let vtd = dm.vtd().unwrap();
        let mem = Arc::new(VmGuestMemory::new(vm.ram().memory().clone()));
        let mut h = LinuxHarness::new(mem.clone(), (16 << 20)..(24 << 20));
        h.mmio_base = VTD_REGS_START;
        {
            let mut u = vtd.lock().unwrap();
            h.boot(&mut *u).unwrap();
            h.attach(&mut *u, added.bdf, Stage::Second).unwrap();
            h.map(&mut *u, added.bdf, IOVA, BUF, 0x1000).unwrap();
        }
        view.write(None, IOVA + 0x10, b"through the vIOMMU")
            .unwrap();
        let mut got = [0u8; 18];
        mem.read(BUF + 0x10, &mut got).unwrap();
        assert_eq!(&got, b"through the vIOMMU");
        let info = dm.viommu_info().unwrap();
        let d = info.devices.iter().find(|d| d.id == "emu0").unwrap();
        assert_eq!(
            (d.mode.as_str(), d.path.as_str()),
            ("soft", "emulated"),
            "{info:?}"
        );

        {
            let mut u = vtd.lock().unwrap();
            h.unmap(&mut *u, added.bdf, IOVA, 0x1000).unwrap();
        }
        assert!(view.write(None, IOVA, b"x").is_err(), "DMA after unmap");

        let removed = dm.remove_device("emu0").unwrap();
        assert!(removed.warnings.is_empty(), "{:?}", removed.warnings);
        assert!(
            dm.viommu_bridge().is_none(),
            "the soft bridge outlived its device"
        );
        assert!(dm.emulated_model("emu0").is_none());
    }
}
