//! Removing a device: off the bus, out of KVM-VFIO, detached, unbound, closed; and the DMA
//! space with the last device.

use ioasid::IommuBackend;
use log::{info, warn};

use super::dma::{self, Backend};
use super::{lock, DeviceManager, DeviceManagerError, RemovedDevice};

impl DeviceManager {
    /// Destroys the IOAS and closes the backend (no device left).
    pub(super) fn teardown_dma(&mut self) {
        // The vIOMMU's host bridge holds the backend: it goes first, unless emulated
        // devices are still behind it (they keep it, over their soft backends, until they
        // leave).
        if let Some(v) = self.viommu.as_mut() {
            let busy = v.host.as_ref().is_some_and(|h| !h.devices().is_empty());
            if !busy {
                v.drop_host();
            }
        }
        if let Some(d) = self.dma.take() {
            d.teardown();
        }
    }

    /// Removes device `id`: off the PCI bus (interrupts released, BAR windows unmapped,
    /// decode and bus mastering stopped), out of KVM-VFIO, detached, unbound, every fd
    /// closed. The last device also takes the IOAS and the RAM mappings with it.
    pub fn remove_device(&mut self, id: &str) -> Result<RemovedDevice, DeviceManagerError> {
        let idx = self
            .devices
            .iter()
            .position(|d| d.id == id)
            .ok_or_else(|| DeviceManagerError::UnknownId { id: id.to_string() })?;
        let a = self.devices.remove(idx);
        self.emulated_counters.remove(id);
        let (mut warnings, rid_released) = self.detach_viommu(&a);
        let mut note = |w: String| {
            warn!("{id}: {w}");
            warnings.push(w);
        };
        match lock(&self.pci).remove_device(a.bdf) {
            Ok(_) => info!("{id}: removed from {}", a.bdf),
            Err(e) => note(e.to_string()),
        }
        a.sink.release_all();
        a.mapper.unmap_all();
        if let (Some(raw), Some(kv)) = (a.kvm_file, &self.kvm_vfio) {
            if let Err(e) = kv.del(raw) {
                note(format!("KVM_DEV_VFIO_FILE_DEL of fd {raw}: {e}"));
            }
        }
        if let Some(dev) = a.dev {
            let released = lock(&self.pasids).release_device(dev);
            if released > 0 {
                info!("{id}: {released} PASID bindings released");
            }
        }
        // Unbacked devices do not count: the DMA space goes with the last bound device.
        let last = !self.devices.iter().any(|d| d.dev.is_some());
        if let (Some(d), Some(dev)) = (&self.dma, a.dev) {
            // A device behind the vIOMMU whose RID the bridge took off its shadow IOAS or
            // nested HWPT is attached to nothing now; unbinding releases it either way.
            if let (Backend::Iommufd(b), false) = (&d.backend, rid_released) {
                if let Err(e) = b.detach(dev, None) {
                    note(e.to_string());
                }
            }
            if last && !d.ram.is_empty() {
                // While the device is still bound: type1 drops a container's mappings with its
                // last group.
                dma::unmap_ram(d.backend.as_dyn(), d.ioas, &d.ram);
            }
            match &d.backend {
                Backend::Iommufd(b) => b.unbind(dev),
                Backend::Type1(b) => b.unbind(dev),
            }
        }
        if last {
            if let Some(d) = self.dma.as_mut() {
                d.ram.clear();
            }
        }
        let removed = RemovedDevice {
            id: a.id.clone(),
            bdf: a.bdf,
            host: a.host.to_string(),
            warnings,
        };
        info!("{id}: {} unbound and closed", a.given);
        drop(a);
        if last {
            self.teardown_dma();
        }
        Ok(removed)
    }

    /// Removes every device (VM shutdown).
    pub fn remove_all(&mut self) {
        for id in self.device_ids().into_iter().rev() {
            if let Err(e) = self.remove_device(&id) {
                warn!("{e}");
            }
        }
    }
}
