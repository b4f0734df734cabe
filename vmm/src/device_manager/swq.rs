//! The shared-work-queue device in the device manager (`--device emulated=swq,iommu=on`, or
//! `vm.add-device` with `{"emulated": "swq", "iommu": true}`): behind the vIOMMU unit, which
//! must offer PASIDs (the device's DMA is always in a PASID's context), with its DMA issued
//! on the soft backend with the HOST PASID the VM's PASID translation table gives for the
//! submitting vCPU's IA32_PASID.
//!
//! Which PASID the DMA uses: the bridge's per-device view ([`devices::viommu::DmaView`],
//! `SoftDma`) takes guest PASIDs and maps them through the device's own guest-to-host map;
//! the SWQ device instead gets the host PASID from the VM-wide table (as the CPU gives it to
//! a device with ENQCMD) and [`HostPasidDma`] issues exactly that PASID on the soft backend.
//! When the table and the bridge agree (the table is fed from the same PASID space), the
//! host PASID is the one the bridge attached the guest's tables to for this device; when
//! they do not, the host PASID has no context for this device on the soft backend and the
//! copy faults (PAGE_FAULT in the completion record): it can never land in another address
//! space.
//!
//! "Never expose a shared work queue when the path cannot be honoured": this device honours
//! it itself (it translates on the guest's behalf), but only with a vIOMMU that offers
//! PASIDs and a KVM whose MSR exits let the VMM keep each vCPU's IA32_PASID; without
//! either it is refused.

use std::sync::{Arc, Mutex};

use api::DeviceConfig;
use devices::cpu_pasid::PasidTranslate;
use devices::pci::SharedPciDevice;
use devices::sva::{AccessError, DeviceDma};
use devices::swq::{SwqDevice, SwqHandle};
use ioasid::{DevId, DmaRequest, Pasid, SoftIommu};

use super::emulated::{CounterHandle, EmulatedDma};
use super::{AddedDevice, DeviceManager, DeviceManagerError};

/// What `--platform` must say for the SWQ device.
pub const SWQ_PLATFORM: &str = "--platform viommu=vtd,pasid-bits=20";

/// DMA of a device on the soft backend, addressed by HOST PASID (no guest-to-host mapping
/// on the way: the caller already holds the host PASID).
pub struct HostPasidDma {
    soft: Arc<SoftIommu>,
    dev: DevId,
}

impl HostPasidDma {
    /// The DMA of `dev` on `soft`.
    pub fn new(soft: Arc<SoftIommu>, dev: DevId) -> Self {
        Self { soft, dev }
    }
}

impl DeviceDma for HostPasidDma {
    fn read(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), AccessError> {
        Ok(self.soft.dma_read(self.dev, pasid, addr, buf, req)?)
    }

    fn write(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), AccessError> {
        Ok(self.soft.dma_write(self.dev, pasid, addr, buf, req)?)
    }
}

impl DeviceManager {
    /// The VM's guest-to-host PASID translation, fed by the vIOMMU bridges (`None` without a
    /// vIOMMU): what `emulated=swq` translates through.
    pub fn pasid_table(&self) -> Option<Arc<crate::enqcmd::VmPasidTable>> {
        self.viommu.as_ref().map(|v| v.pasid_table.clone())
    }

    /// The SWQ device behind the vIOMMU, its guest PASIDs translated by the VM's PASID
    /// translation table (the vIOMMU state's [`crate::enqcmd::VmPasidTable`], which the
    /// bridge feeds as the guest binds PASIDs). Needs a unit that offers PASIDs
    /// ([`SWQ_PLATFORM`]).
    pub fn add_swq_device(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<AddedDevice, DeviceManagerError> {
        const NAME: &str = "swq";
        let refuse = |reason: String| DeviceManagerError::Unsupported {
            device: NAME.to_string(),
            reason,
        };
        let Some(v) = self.viommu.as_ref() else {
            return Err(refuse(format!(
                "a shared work queue DMAs in the submitter's PASID context, so it sits \
                 behind a vIOMMU with PASIDs: start with {SWQ_PLATFORM}"
            )));
        };
        let vtd = v.setup.vtd;
        if !(vtd.scalable_mode && vtd.pasid_bits >= 1) {
            return Err(refuse(format!(
                "a shared work queue needs a vIOMMU with PASID support (this one: \
                 scalable-mode {}, pasid-bits {}): start with {SWQ_PLATFORM}",
                vtd.scalable_mode, vtd.pasid_bits
            )));
        }
        if let Err(e) = &v.ia32_pasid {
            return Err(refuse(format!(
                "the portal takes the submitter's PASID from its vCPU's IA32_PASID: {e}"
            )));
        }
        let translate: Arc<dyn PasidTranslate> = v.pasid_table.clone();
        let soft = match v.soft_ram.as_ref() {
            Some((s, _)) => s.clone(),
            None => Arc::new(self.soft_over_ram().map_err(|e| {
                DeviceManagerError::step(NAME, "making a soft IOMMU over guest RAM", e)
            })?),
        };
        let mut handle: Option<SwqHandle> = None;
        let added = self.add_emulated_device(
            cfg.id.as_deref(),
            NAME,
            cfg.pci_device_id,
            EmulatedDma::Soft(soft),
            |parts| {
                let (soft, dev) = parts
                    .soft
                    .ok_or_else(|| "no soft-backend registration".to_string())?;
                let dma = Arc::new(HostPasidDma::new(soft, dev));
                let d = SwqDevice::new(dma, parts.sink, translate).map_err(|e| e.to_string())?;
                handle = Some(d.handle());
                let m: SharedPciDevice = Arc::new(Mutex::new(d));
                Ok(m)
            },
        )?;
        if let Some(h) = handle {
            self.emulated_counters
                .insert(added.id.clone(), CounterHandle::Swq(h));
        }
        Ok(added)
    }
}
