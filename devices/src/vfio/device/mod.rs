//! The vfio-pci device model: a VFIO device (pdev or mdev) as a guest PCI function.
//!
//! This file holds the model's state, its construction and its [`PciDevice`] face; the work
//! is split by responsibility: `config` virtualizes config space (header, BARs,
//! capability lists), `interrupts` turns MSI, MSI-X and INTx into routes and VFIO
//! eventfds, `bars` serves BAR accesses and direct mappings, and `pasid`, `ats` and `pri`
//! present the synthesized vSVA chain (PASID, ATS, PRI capabilities).

mod ats;
mod bars;
mod config;
mod dmwr;
mod interrupts;
mod pasid;
mod pri;

pub use ats::{AtsControl, AtsListener};
pub use dmwr::{DmwrInfo, SWQ_NOT_EXPOSED};
pub use pasid::{PasidControl, PasidListener, VpasidConfig, VPRI_DEFAULT_CAPACITY};
use pasid::{VPASID_FALLBACK_OFFSET, VPASID_LEN};
pub use pri::{PriControl, PriListener};

use std::any::Any;
use std::fmt;
use std::io;
use std::sync::Arc;

use thiserror::Error;

use super::backend::{MmapArea, VfioRegions, CONFIG_REGION, INTX_IRQ};
use super::bar::{BarMapper, BarPlan};
use super::caps::CapDecision;
use super::intx::IntxUnmasker;
use crate::pci::bar::{BarKind, PciBarInfo};
use crate::pci::config::{reg, ConfigSpace, CONFIG_SPACE_SIZE, EXT_CONFIG_SPACE_SIZE};
use crate::pci::device::PciDevice;
use crate::pci::interrupt::{InterruptSink, IntxEventFds, IntxPin};
use crate::pci::msi::MsiState;
use crate::pci::msix::MsixState;
use crate::pci::ratelimit::GuestWarn;

/// Which assigned device a model stands for (error and log context).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfioDeviceId {
    /// A physical PCI function, by host address.
    Pdev(String),
    /// A mediated device, by UUID.
    Mdev(String),
}

impl fmt::Display for VfioDeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VfioDeviceId::Pdev(bdf) => write!(f, "pdev {bdf}"),
            VfioDeviceId::Mdev(uuid) => write!(f, "mdev {uuid}"),
        }
    }
}

/// Errors creating the model.
#[derive(Debug, Error)]
pub enum VfioPciError {
    /// VFIO reports no config region.
    #[error("The {device} has no VFIO config region")]
    NoConfigRegion {
        /// Device.
        device: VfioDeviceId,
    },
    /// The config region cannot hold a type 0 header.
    #[error("The {device} config region is only {size} bytes")]
    ConfigTooSmall {
        /// Device.
        device: VfioDeviceId,
        /// Region size.
        size: u64,
    },
    /// Reading the device's config space failed.
    #[error("Cannot read the config space of the {device}")]
    ConfigRead {
        /// Device.
        device: VfioDeviceId,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A BAR region that no PCI BAR can describe.
    #[error("BAR{bar} of the {device} cannot be presented: {kind:?} region of {size:#x} bytes")]
    UnsupportedBar {
        /// Device.
        device: VfioDeviceId,
        /// BAR index.
        bar: u8,
        /// Kind the config space claims.
        kind: BarKind,
        /// Region size.
        size: u64,
    },
    /// The synthesized PASID/ATS/PRI chain cannot go at the requested offset.
    #[error(
        "Cannot place the synthesized PASID/ATS/PRI capabilities of the {device} at \
         {offset:#x}: {reason}"
    )]
    VsvaOffset {
        /// Device.
        device: VfioDeviceId,
        /// The requested offset (`x_pasid_offset`).
        offset: usize,
        /// Why not.
        reason: String,
    },
}

/// Options of one assignment.
#[derive(Clone, Copy, Debug, Default)]
pub struct VfioPciOptions {
    /// Synthesize a vPASID capability (default: PASID hidden).
    pub vpasid: Option<VpasidConfig>,
}

struct VfioBar {
    plan: BarPlan,
    maps: Vec<(u64, MmapArea)>,
    guest_base: Option<u64>,
}

struct Intx {
    pin: IntxPin,
    fds: IntxEventFds,
    armed: bool,
    unmasker: IntxUnmasker,
}

/// A VFIO device presented as a PCI function, with virtualized config space, emulated BARs
/// and MSI/MSI-X, and direct BAR mappings where VFIO allows them.
pub struct VfioPciDevice {
    id: VfioDeviceId,
    regions: Arc<dyn VfioRegions>,
    sink: Arc<dyn InterruptSink>,
    mapper: Option<Arc<dyn BarMapper>>,
    size: usize,
    virt: ConfigSpace,
    /// Per bit: 1 = served by `virt`, 0 = read from the device.
    emu: Vec<u8>,
    /// Per byte: a guest write reaches the device.
    pass_write: Vec<bool>,
    bars: Vec<VfioBar>,
    msi: Option<MsiState>,
    msix: Option<MsixState>,
    intx: Option<Intx>,
    caps: Vec<CapDecision>,
    vpasid: Option<usize>,
    pasid_listener: Option<PasidListener>,
    vats: Option<usize>,
    ats_listener: Option<AtsListener>,
    vpri: Option<usize>,
    pri_listener: Option<PriListener>,
    /// Warnings a guest can trigger (MSI/MSI-X routing, BAR moves) go through this limit.
    warn: GuestWarn,
}

fn irq_count(regions: &dyn VfioRegions, index: u32) -> u32 {
    regions
        .irq_info(index)
        .filter(|i| i.eventfd)
        .map(|i| i.count)
        .unwrap_or(0)
}

impl VfioPciDevice {
    /// Builds the model from the device's regions and interrupts. `sink` receives MSI/MSI-X
    /// routes and supplies the INTx eventfds.
    pub fn new(
        id: VfioDeviceId,
        regions: Arc<dyn VfioRegions>,
        sink: Arc<dyn InterruptSink>,
        options: VfioPciOptions,
    ) -> Result<Self, VfioPciError> {
        let cfg_info = regions
            .region_info(CONFIG_REGION)
            .ok_or_else(|| VfioPciError::NoConfigRegion { device: id.clone() })?;
        if cfg_info.size < reg::HEADER_END as u64 {
            return Err(VfioPciError::ConfigTooSmall {
                device: id,
                size: cfg_info.size,
            });
        }
        let size = if cfg_info.size >= EXT_CONFIG_SPACE_SIZE as u64 {
            EXT_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        };
        let mut snap = vec![0u8; size];
        let readable = (cfg_info.size as usize).min(size);
        regions
            .region_read(CONFIG_REGION, 0, &mut snap[..readable])
            .map_err(|source| VfioPciError::ConfigRead {
                device: id.clone(),
                source,
            })?;

        let mut dev = Self {
            id,
            regions,
            sink,
            mapper: None,
            size,
            virt: ConfigSpace::new(size),
            emu: vec![0; size],
            pass_write: vec![false; size],
            bars: Vec::new(),
            msi: None,
            msix: None,
            intx: None,
            caps: Vec::new(),
            vpasid: None,
            pasid_listener: None,
            vats: None,
            ats_listener: None,
            vpri: None,
            pri_listener: None,
            warn: GuestWarn::new(),
        };
        dev.virt.set_bytes(0, &snap);
        let bar_infos = dev.discover_bars(&snap)?;
        dev.build_header(&snap, &bar_infos);
        dev.build_capabilities(&snap, &bar_infos);
        if size == EXT_CONFIG_SPACE_SIZE {
            dev.build_ext_capabilities(&snap, options.vpasid)?;
        } else if let Some(offset) = options.vpasid.and_then(|v| v.offset) {
            return Err(VfioPciError::VsvaOffset {
                device: dev.id.clone(),
                offset,
                reason: "the device has no extended config space".to_string(),
            });
        }
        dev.build_bars(bar_infos);
        dev.arm_intx();
        Ok(dev)
    }

    /// Which device this is.
    pub fn id(&self) -> &VfioDeviceId {
        &self.id
    }

    /// The pass/emulate/hide decision for every capability found (and the synthesized vSVA
    /// chain: vPASID, vATS, vPRI).
    pub fn capabilities(&self) -> &[CapDecision] {
        &self.caps
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config_read(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config_write(reg_idx, offset, data)
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.iter().map(|b| b.plan.info).collect()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.bar_read(bar, offset, data)
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.bar_write(bar, offset, data)
    }

    fn bar_moved(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
        self.bar_move(bar, old, new)
    }

    fn reset(&mut self) {
        // The virtual state only: the physical function is reset by vfio-pci (on open and
        // close, and on the guest's FLR, which is forwarded as a config write).
        self.release_interrupts();
        self.virt.set_u16(reg::COMMAND, 0);
        self.command_written();
        if let Some(m) = self.msi.as_ref().map(|m| *m.cap()) {
            m.install(&mut self.virt);
            self.msi = Some(MsiState::new(m));
        }
        if let Some(m) = self.msix.as_mut() {
            m.reset(self.sink.as_ref());
            let cap = *m.cap();
            cap.install(&mut self.virt);
        }
        self.vsva_reset();
        self.set_intx(true);
    }

    fn removed(&mut self) {
        self.release_interrupts();
        if let Some(i) = self.intx.take() {
            i.unmasker.set_armed(false);
            if i.armed {
                let _ = self.regions.disable_irq(INTX_IRQ);
            }
            // Stops the model's unmask thread before the VMM's line goes.
            drop(i);
            self.sink.intx_release();
        }
        // Stop decode and DMA before the device goes back to the host.
        self.virt.set_u16(reg::COMMAND, 0);
        self.command_written();
        self.unmap_all();
        for b in &mut self.bars {
            b.maps.clear();
            b.guest_base = None;
        }
        self.mapper = None;
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
