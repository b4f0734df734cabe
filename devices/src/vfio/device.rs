//! The vfio-pci device model: a VFIO device (pdev or mdev) as a guest PCI function.

use std::any::Any;
use std::fmt;
use std::io;
use std::sync::Arc;

use log::{debug, info, warn};
use thiserror::Error;

use super::backend::{
    page_size, MmapArea, VfioRegions, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ,
};
use super::bar::{plan_bar, trapped_ranges, BarMapper, BarPart, BarPlan, DirectMapping};
use super::caps::{self, CapContext, CapDecision, CapPolicy};
use super::intx::{IntxUnmask, IntxUnmasker};
use crate::pci::bar::{BarKind, PciBarInfo, BAR0_OFFSET, MAX_IO_BAR, NUM_BARS};
use crate::pci::config::{
    cap_id, ext_cap_id, image_u16, image_u32, reg, status, walk_capabilities,
    walk_ext_capabilities, ConfigSpace, CONFIG_SPACE_SIZE, EXT_CAP_START, EXT_CONFIG_SPACE_SIZE,
};
use crate::pci::device::PciDevice;
use crate::pci::interrupt::{InterruptSink, IntxEventFds, IntxPin};
use crate::pci::msi::{MsiCap, MsiChange, MsiState};
use crate::pci::msix::{MsixCap, MsixState};
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
}

/// A synthesized PASID capability (the assignment enables PASID; the ioasid layer attaches
/// PASIDs as the guest programs them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VpasidConfig {
    /// Max PASID width in bits (1..=20).
    pub max_pasid_width: u8,
    /// Execute permission supported.
    pub execute: bool,
    /// Privileged mode supported.
    pub privileged: bool,
}

/// The guest's PASID control register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PasidControl {
    /// PASID enable.
    pub enabled: bool,
    /// Execute permission enable.
    pub execute: bool,
    /// Privileged mode enable.
    pub privileged: bool,
}

/// Called when the guest writes the vPASID control register.
pub type PasidListener = Box<dyn Fn(PasidControl) + Send>;

/// Options of one assignment.
#[derive(Clone, Copy, Debug, Default)]
pub struct VfioPciOptions {
    /// Synthesize a vPASID capability (default: PASID hidden).
    pub vpasid: Option<VpasidConfig>,
}

/// Command bits the guest may set and that are forwarded to the device. Special cycles,
/// memory-write-and-invalidate, VGA snoop and fast back-to-back read as 0 and never reach
/// it.
const COMMAND_FORWARDED: u16 = ConfigSpace::COMMAND_WRITABLE;
/// vPASID placement when the device has no (hidden) PASID capability: the last 8 bytes.
const VPASID_FALLBACK_OFFSET: usize = EXT_CONFIG_SPACE_SIZE - 8;

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
            warn: GuestWarn::new(),
        };
        dev.virt.set_bytes(0, &snap);
        let bar_infos = dev.discover_bars(&snap)?;
        dev.build_header(&snap, &bar_infos);
        dev.build_capabilities(&snap, &bar_infos);
        if size == EXT_CONFIG_SPACE_SIZE {
            dev.build_ext_capabilities(&snap, options.vpasid);
        }
        dev.build_bars(bar_infos);
        dev.arm_intx();
        Ok(dev)
    }

    fn emulate(&mut self, off: usize, len: usize) {
        for b in self.emu.iter_mut().skip(off).take(len) {
            *b = 0xff;
        }
    }

    fn passthrough_writes(&mut self, off: usize, len: usize) {
        for b in self.pass_write.iter_mut().skip(off).take(len) {
            *b = true;
        }
    }

    fn discover_bars(&self, snap: &[u8]) -> Result<Vec<PciBarInfo>, VfioPciError> {
        let mut out = Vec::new();
        let mut i = 0u8;
        while usize::from(i) < NUM_BARS {
            let off = BAR0_OFFSET + 4 * usize::from(i);
            let low = u32::from_le_bytes([snap[off], snap[off + 1], snap[off + 2], snap[off + 3]]);
            let kind = if low & 1 != 0 {
                BarKind::Io
            } else if (low >> 1) & 3 == 2 && i < 5 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let step = if kind == BarKind::Mem64 { 2 } else { 1 };
            if let Some(region) = self.regions.region_info(u32::from(i)) {
                let bad = || VfioPciError::UnsupportedBar {
                    device: self.id.clone(),
                    bar: i,
                    kind,
                    size: region.size,
                };
                let bar_size = PciBarInfo::size_for(kind, region.size).ok_or_else(bad)?;
                if kind == BarKind::Io && bar_size > MAX_IO_BAR {
                    return Err(bad());
                }
                let info = PciBarInfo::new(i, kind, bar_size, low & 0x8 != 0).map_err(|_| bad())?;
                out.push(info);
            }
            i += step;
        }
        Ok(out)
    }

    fn build_header(&mut self, snap: &[u8], bars: &[PciBarInfo]) {
        self.emulate(0, reg::HEADER_END);
        // Status: only the capability-list bit is ours; the rest (INTx status, error bits)
        // is the device's, and the guest's W1C writes to the error bits reach it.
        self.emu[reg::STATUS] = status::CAP_LIST as u8;
        self.emu[reg::STATUS + 1] = 0;
        self.passthrough_writes(reg::STATUS + 1, 1);
        self.virt.set_u16(reg::STATUS, 0);
        // Command: starts with decode and bus mastering off, as after reset.
        self.virt.set_u16(reg::COMMAND, 0);
        self.virt.set_wmask_u16(reg::COMMAND, COMMAND_FORWARDED);
        self.virt
            .set_u8(reg::HEADER_TYPE, snap[reg::HEADER_TYPE] & 0x7f);
        self.virt.set_u8(reg::BIST, 0);
        self.virt.set_wmask_u8(reg::CACHE_LINE_SIZE, 0xff);
        self.virt.set_wmask_u8(reg::LATENCY_TIMER, 0xff);
        for off in (BAR0_OFFSET..reg::CARDBUS_CIS + 4).step_by(4) {
            self.virt.set_u32(off, 0);
        }
        for b in bars {
            self.virt.add_bar(b);
        }
        // No expansion ROM is presented.
        self.virt.set_u32(reg::ROM_ADDRESS, 0);
        self.virt.set_u8(reg::CAPABILITY_LIST, 0);
        self.virt.set_u8(reg::INTERRUPT_LINE, 0);
        self.virt.set_wmask_u8(reg::INTERRUPT_LINE, 0xff);
        if irq_count(self.regions.as_ref(), INTX_IRQ) == 0 {
            self.virt.set_u8(reg::INTERRUPT_PIN, 0);
        }
    }

    fn build_capabilities(&mut self, snap: &[u8], bars: &[PciBarInfo]) {
        let msi_count = irq_count(self.regions.as_ref(), MSI_IRQ);
        let msix_count = irq_count(self.regions.as_ref(), MSIX_IRQ);
        let has_bar = |i: u8| bars.iter().any(|b| b.index == i && b.is_memory());
        let u16_at = |o: usize| image_u16(snap, o);
        let u32_at = |o: usize| image_u32(snap, o);
        let mut visible = Vec::new();
        // Registers of emulated capabilities: a later header inside them is the device lying
        // about its layout; it is hidden without touching the registers.
        let mut claimed: Vec<std::ops::Range<usize>> = Vec::new();
        for cap in walk_capabilities(snap) {
            let o = cap.offset;
            if claimed
                .iter()
                .any(|r| r.contains(&o) || r.contains(&(o + 1)))
            {
                self.caps.push(CapDecision {
                    offset: o,
                    id: u16::from(cap.id),
                    extended: false,
                    policy: CapPolicy::Hide,
                    reason: "overlaps an emulated capability",
                });
                continue;
            }
            let mut ctx = CapContext {
                msi_irqs: msi_count > 0,
                ..Default::default()
            };
            let msix_layout = (cap.id == cap_id::MSIX && o + MsixCap::LEN <= CONFIG_SPACE_SIZE)
                .then(|| {
                    MsixCap::from_registers(o, u16_at(o + 2), u32_at(o + 4), u32_at(o + 8))
                        .with_table_size(u16::try_from(msix_count).unwrap_or(u16::MAX))
                });
            ctx.msix_usable = msix_count > 0
                && msix_layout.is_some_and(|m| has_bar(m.table_bar) && has_bar(m.pba_bar));
            let (mut policy, mut reason) = caps::standard(cap.id, &ctx);
            if (policy == CapPolicy::Emulate && self.msi.is_some() && cap.id == cap_id::MSI)
                || (policy == CapPolicy::Emulate && self.msix.is_some() && cap.id == cap_id::MSIX)
            {
                (policy, reason) = (CapPolicy::Hide, "duplicate capability");
            }
            match (policy, cap.id) {
                (CapPolicy::Emulate, cap_id::MSI) => {
                    let mut m = MsiCap::from_control(o, u16_at(o + 2));
                    // Never offer more vectors than VFIO can deliver.
                    let granted = 31 - msi_count.max(1).leading_zeros();
                    m.mmc_log2 = m.mmc_log2.min(granted as u8);
                    if o + m.len() > CONFIG_SPACE_SIZE {
                        (policy, reason) = (CapPolicy::Hide, "truncated capability");
                    } else {
                        m.install(&mut self.virt);
                        self.emulate(o, m.len());
                        claimed.push(o..o + m.len());
                        self.msi = Some(MsiState::new(m));
                    }
                }
                (CapPolicy::Emulate, cap_id::MSIX) => {
                    if let Some(m) = msix_layout {
                        m.install(&mut self.virt);
                        self.emulate(o, MsixCap::LEN);
                        claimed.push(o..o + MsixCap::LEN);
                        self.msix = Some(MsixState::new(m));
                    }
                }
                (CapPolicy::Pass, cap_id::PM) => self.passthrough_writes(o + 4, 2),
                (CapPolicy::Pass, cap_id::EXP) => {
                    // Device control and status; device control 2 for a version 2 capability.
                    self.passthrough_writes(o + 8, 4);
                    if snap.get(o + 2).is_some_and(|v| v & 0xf >= 2) {
                        self.passthrough_writes(o + 0x28, 2);
                    }
                }
                (CapPolicy::Pass, cap_id::VENDOR) => {
                    let len = usize::from(snap.get(o + 2).copied().unwrap_or(0));
                    let end = (o + len).min(CONFIG_SPACE_SIZE);
                    if end > o + 3 {
                        self.passthrough_writes(o + 3, end - o - 3);
                    }
                }
                _ => {}
            }
            self.caps.push(CapDecision {
                offset: o,
                id: u16::from(cap.id),
                extended: false,
                policy,
                reason,
            });
            self.emulate(o, 2);
            if policy == CapPolicy::Hide {
                self.virt.set_u16(o, 0);
            } else {
                visible.push(o);
            }
        }
        // Relink the list through the visible capabilities only.
        let mut next = 0u8;
        for &o in visible.iter().rev() {
            self.virt.set_u8(o + 1, next);
            next = o as u8;
        }
        self.virt.set_u8(reg::CAPABILITY_LIST, next);
        if !visible.is_empty() {
            self.virt.set_u16(reg::STATUS, status::CAP_LIST);
        }
    }

    fn build_ext_capabilities(&mut self, snap: &[u8], vpasid: Option<VpasidConfig>) {
        let ctx = CapContext {
            vpasid: vpasid.is_some(),
            ..Default::default()
        };
        let mut visible: Vec<(usize, u16, u8)> = Vec::new();
        let mut hidden_pasid = None;
        for cap in walk_ext_capabilities(snap) {
            let (mut policy, mut reason) = caps::extended(cap.id, &ctx);
            if cap.id == ext_cap_id::PASID {
                if hidden_pasid.is_some() {
                    (policy, reason) = (CapPolicy::Hide, "duplicate capability");
                } else {
                    hidden_pasid = Some(cap.offset);
                    // A synthesized vPASID replaces it below.
                    policy = CapPolicy::Hide;
                }
            }
            if cap.id != ext_cap_id::PASID || vpasid.is_none() {
                self.caps.push(CapDecision {
                    offset: cap.offset,
                    id: cap.id,
                    extended: true,
                    policy,
                    reason,
                });
            }
            self.emulate(cap.offset, 4);
            self.virt.set_u32(cap.offset, 0);
            if policy == CapPolicy::Pass {
                visible.push((cap.offset, cap.id, cap.version));
                if matches!(cap.id, ext_cap_id::VSEC | ext_cap_id::DVSEC) {
                    // The walk only promises the 4-byte header inside the image: a VSEC header
                    // in the last dword has its length dword past the end (reads as 0).
                    let hdr = image_u32(snap, cap.offset + 4);
                    let len = ((hdr >> 20) as usize).min(
                        snap.len()
                            .min(EXT_CONFIG_SPACE_SIZE)
                            .saturating_sub(cap.offset),
                    );
                    if len > 8 {
                        self.passthrough_writes(cap.offset + 8, len - 8);
                    }
                }
            }
        }
        if let Some(cfg) = vpasid {
            // The hidden capability's place when the 8 bytes fit there.
            let off = hidden_pasid
                .filter(|&o| o + 8 <= EXT_CONFIG_SPACE_SIZE)
                .unwrap_or(VPASID_FALLBACK_OFFSET);
            self.install_vpasid(off, cfg);
            visible.push((off, ext_cap_id::PASID, 1));
            let (policy, reason) = caps::extended(ext_cap_id::PASID, &ctx);
            self.caps.push(CapDecision {
                offset: off,
                id: ext_cap_id::PASID,
                extended: true,
                policy,
                reason,
            });
        }
        visible.sort_by_key(|v| v.0);
        visible.dedup_by_key(|v| v.0);
        let mut next = 0u32;
        for &(o, id, ver) in visible.iter().rev() {
            self.virt.set_u32(
                o,
                u32::from(id) | (u32::from(ver & 0xf) << 16) | (next << 20),
            );
            next = o as u32;
        }
        if visible.first().map(|v| v.0) != Some(EXT_CAP_START) {
            // 0x100 must start the list: a null header (ID 0) that points at the first
            // visible capability, or reads 0 when there is none.
            self.emulate(EXT_CAP_START, 4);
            self.virt.set_u32(EXT_CAP_START, next << 20);
        }
    }

    fn install_vpasid(&mut self, off: usize, cfg: VpasidConfig) {
        let width = cfg.max_pasid_width.clamp(1, 20);
        let cap = (u16::from(cfg.execute) << 1)
            | (u16::from(cfg.privileged) << 2)
            | (u16::from(width) << 8);
        self.emulate(off, 8);
        self.virt.set_u16(off + 4, cap);
        self.virt.set_u16(off + 6, 0);
        self.virt.set_read_only(off, 6);
        self.virt.set_wmask_u16(
            off + 6,
            1 | (u16::from(cfg.execute) << 1) | (u16::from(cfg.privileged) << 2),
        );
        self.vpasid = Some(off);
    }

    fn build_bars(&mut self, infos: Vec<PciBarInfo>) {
        let page = page_size();
        let msix = self.msix.as_ref().map(|m| *m.cap());
        for info in infos {
            let Some(region) = self.regions.region_info(u32::from(info.index)) else {
                continue;
            };
            let mut plan = plan_bar(info, &region, msix.as_ref(), page);
            let mut maps = Vec::new();
            let mut kept = Vec::new();
            for w in &plan.mmap {
                match self
                    .regions
                    .mmap_region(u32::from(info.index), w.offset, w.len, region.write)
                {
                    Ok(area) => {
                        maps.push((w.offset, area));
                        kept.push(*w);
                    }
                    Err(e) => warn!(
                        "{}: BAR{} window {:#x}+{:#x} stays trapped: mmap failed: {e}",
                        self.id, info.index, w.offset, w.len
                    ),
                }
            }
            if kept.len() != plan.mmap.len() {
                plan.trapped = trapped_ranges(info.size, &kept);
                plan.mmap = kept;
            }
            self.bars.push(VfioBar {
                plan,
                maps,
                guest_base: None,
            });
        }
    }

    fn arm_intx(&mut self) {
        let Some(pin) = IntxPin::from_register(self.virt.read_u8(reg::INTERRUPT_PIN)) else {
            self.virt.set_u8(reg::INTERRUPT_PIN, 0);
            return;
        };
        let Some(fds) = self.sink.intx(pin) else {
            // The VMM wires no INTx line: the guest sees no pin.
            self.virt.set_u8(reg::INTERRUPT_PIN, 0);
            return;
        };
        let mut armed = false;
        match self.regions.enable_irq(INTX_IRQ, &[&fds.trigger]) {
            Ok(()) => armed = true,
            Err(e) => warn!("{}: cannot enable INTx: {e}", self.id),
        }
        let unmasker = self.intx_unmasker(&fds);
        debug!("{}: INTx {pin}: {}", self.id, unmasker.mode().name());
        unmasker.set_armed(armed);
        self.intx = Some(Intx {
            pin,
            fds,
            armed,
            unmasker,
        });
    }

    /// Chooses how the line is unmasked after each EOI (see [`super::intx`]).
    fn intx_unmasker(&self, fds: &IntxEventFds) -> IntxUnmasker {
        let masks = self
            .regions
            .irq_info(INTX_IRQ)
            .is_some_and(|i| i.automasked || i.maskable);
        let Some(resample) = &fds.resample else {
            return if masks {
                info!(
                    "{}: INTx without a resample eventfd: unmasking before each trapped BAR \
                     access",
                    self.id
                );
                IntxUnmasker::on_access(self.regions.clone())
            } else {
                IntxUnmasker::passive(IntxUnmask::NotNeeded)
            };
        };
        let refused = match self.regions.set_intx_resample(resample) {
            Ok(()) => return IntxUnmasker::passive(IntxUnmask::Kernel),
            Err(e) => e,
        };
        if !masks {
            info!(
                "{}: the device refuses an INTx unmask eventfd ({refused}) and does not mask \
                     INTx: the line is deasserted at each guest EOI",
                self.id
            );
            return IntxUnmasker::passive(IntxUnmask::NotNeeded);
        }
        match resample.try_clone() {
            Ok(dup) => {
                // mtty, for one, answers ENOTTY.
                info!(
                    "{}: the device refuses an INTx unmask eventfd ({refused}): the VMM \
                     unmasks INTx after each guest EOI",
                    self.id
                );
                IntxUnmasker::after_eoi(&self.id.to_string(), self.regions.clone(), dup)
            }
            Err(e) => {
                warn!(
                    "{}: the device refuses an INTx unmask eventfd ({refused}) and the resample \
                     eventfd cannot be duplicated ({e}): unmasking before each trapped BAR \
                     access",
                    self.id
                );
                IntxUnmasker::on_access(self.regions.clone())
            }
        }
    }

    fn set_intx(&mut self, on: bool) {
        let Some(intx) = self.intx.as_mut() else {
            return;
        };
        if intx.armed == on {
            return;
        }
        let r = if on {
            self.regions.enable_irq(INTX_IRQ, &[&intx.fds.trigger])
        } else {
            self.regions.disable_irq(INTX_IRQ)
        };
        match r {
            Ok(()) => intx.armed = on,
            Err(e) => {
                self.warn.warn(format_args!(
                    "{}: cannot switch INTx {}: {e}",
                    self.id,
                    if on { "on" } else { "off" }
                ));
            }
        }
        intx.unmasker.set_armed(intx.armed);
        if on && intx.unmasker.mode() == IntxUnmask::Kernel {
            // VFIO drops the unmask eventfd with the trigger.
            if let Some(rs) = &intx.fds.resample {
                if let Err(e) = self.regions.set_intx_resample(rs) {
                    warn!("{}: cannot set the INTx unmask eventfd again: {e}", self.id);
                }
            }
        }
    }

    /// Before a trapped BAR access: unmask INTx if the guest EOIed it and the model is the one
    /// that unmasks.
    fn intx_before_access(&self) {
        if let Some(i) = &self.intx {
            i.unmasker.before_access();
        }
    }

    fn device_read_dword(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        match self.regions.region_read(CONFIG_REGION, off as u64, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                warn!("{}: config read at {off:#x} failed: {e}", self.id);
                u32::MAX
            }
        }
    }

    fn command_written(&mut self) {
        let guest = self.virt.read_u16(reg::COMMAND);
        let mut cur = [0u8; 2];
        if let Err(e) = self
            .regions
            .region_read(CONFIG_REGION, reg::COMMAND as u64, &mut cur)
        {
            warn!("{}: cannot read the device command register: {e}", self.id);
            return;
        }
        let cur = u16::from_le_bytes(cur);
        let new = (cur & !COMMAND_FORWARDED) | (guest & COMMAND_FORWARDED);
        if new != cur {
            if let Err(e) =
                self.regions
                    .region_write(CONFIG_REGION, reg::COMMAND as u64, &new.to_le_bytes())
            {
                warn!("{}: cannot write the device command register: {e}", self.id);
            }
        }
    }

    fn msi_written(&mut self) {
        let change = match self.msi.as_mut() {
            Some(m) => m.update(&self.virt, self.sink.as_ref()),
            None => return,
        };
        match change {
            Ok(MsiChange::Enabled) => {
                self.set_intx(false);
                let fds = self.msi.as_ref().map(|m| m.eventfds()).unwrap_or_default();
                if let Err(e) = self.regions.enable_irq(MSI_IRQ, &fds) {
                    self.warn.warn(format_args!(
                        "{}: cannot enable {} MSI vectors: {e}",
                        self.id,
                        fds.len()
                    ));
                }
            }
            Ok(MsiChange::Disabled) => {
                if let Err(e) = self.regions.disable_irq(MSI_IRQ) {
                    self.warn
                        .warn(format_args!("{}: cannot disable MSI: {e}", self.id));
                }
                self.set_intx(true);
            }
            Ok(MsiChange::None) => {}
            Err(e) => {
                self.warn
                    .warn(format_args!("{}: MSI routing failed: {e}", self.id));
            }
        }
    }

    fn msix_control_written(&mut self) {
        let change = match self.msix.as_mut() {
            Some(m) => m.control_written(&self.virt, self.sink.as_ref()),
            None => return,
        };
        match change {
            Ok(MsiChange::Enabled) => {
                self.set_intx(false);
                let fds = self.msix.as_ref().map(|m| m.eventfds()).unwrap_or_default();
                if let Err(e) = self.regions.enable_irq(MSIX_IRQ, &fds) {
                    self.warn.warn(format_args!(
                        "{}: cannot enable {} MSI-X vectors: {e}",
                        self.id,
                        fds.len()
                    ));
                }
            }
            Ok(MsiChange::Disabled) => {
                if let Err(e) = self.regions.disable_irq(MSIX_IRQ) {
                    self.warn
                        .warn(format_args!("{}: cannot disable MSI-X: {e}", self.id));
                }
                self.set_intx(true);
            }
            Ok(MsiChange::None) => {}
            Err(e) => {
                self.warn
                    .warn(format_args!("{}: MSI-X routing failed: {e}", self.id));
            }
        }
    }

    /// Which device this is.
    pub fn id(&self) -> &VfioDeviceId {
        &self.id
    }

    /// The pass/emulate/hide decision for every capability found (and a synthesized vPASID).
    pub fn capabilities(&self) -> &[CapDecision] {
        &self.caps
    }

    /// How each BAR is served.
    pub fn bar_plans(&self) -> Vec<&BarPlan> {
        self.bars.iter().map(|b| &b.plan).collect()
    }

    /// Every directly mappable window, with its guest address while decoded.
    pub fn direct_mappings(&self) -> Vec<DirectMapping> {
        self.bars
            .iter()
            .flat_map(|b| {
                b.maps.iter().map(move |(off, area)| DirectMapping {
                    bar: b.plan.info.index,
                    bar_offset: *off,
                    len: area.len(),
                    host_addr: area.host_addr(),
                    guest_addr: b.guest_base.map(|g| g + off),
                })
            })
            .collect()
    }

    /// Installs the mapper that turns mmapped windows into guest mappings; windows of BARs
    /// already decoded are mapped now, and later BAR moves remap them.
    pub fn set_bar_mapper(&mut self, mapper: Arc<dyn BarMapper>) {
        for m in self.direct_mappings() {
            if let Some(g) = m.guest_addr {
                if let Err(e) = mapper.map(g, m.host_addr, m.len) {
                    warn!("{}: cannot map BAR{} at {g:#x}: {e}", self.id, m.bar);
                }
            }
        }
        self.mapper = Some(mapper);
    }

    /// MSI vectors are routed.
    pub fn msi_enabled(&self) -> bool {
        self.msi.as_ref().is_some_and(|m| m.enabled())
    }

    /// The MSI-X state (tests).
    #[cfg(test)]
    pub(crate) fn msix_state(&self) -> Option<&MsixState> {
        self.msix.as_ref()
    }

    /// MSI-X vectors are routed.
    pub fn msix_enabled(&self) -> bool {
        self.msix.as_ref().is_some_and(|m| m.enabled())
    }

    /// INTx is wired to the device.
    pub fn intx_enabled(&self) -> bool {
        self.intx.as_ref().is_some_and(|i| i.armed)
    }

    /// The INTx pin the guest sees, when the VMM wired the line.
    pub fn intx_pin(&self) -> Option<IntxPin> {
        self.intx.as_ref().map(|i| i.pin)
    }

    /// How INTx is unmasked after each guest EOI, when wired.
    pub fn intx_unmask(&self) -> Option<IntxUnmask> {
        self.intx.as_ref().map(|i| i.unmasker.mode())
    }

    /// How many times the model unmasked INTx itself ([`IntxUnmask::AfterEoi`],
    /// [`IntxUnmask::OnAccess`]); 0 otherwise.
    pub fn intx_unmasks(&self) -> u64 {
        self.intx.as_ref().map_or(0, |i| i.unmasker.unmasks())
    }

    /// The guest's vPASID control register, when a vPASID capability is synthesized. This is
    /// the hook for the ioasid layer: PASID attach is only meaningful while `enabled`.
    pub fn pasid_control(&self) -> Option<PasidControl> {
        let off = self.vpasid?;
        let c = self.virt.read_u16(off + 6);
        Some(PasidControl {
            enabled: c & 1 != 0,
            execute: c & 2 != 0,
            privileged: c & 4 != 0,
        })
    }

    /// Calls `listener` after every guest write to the vPASID control register.
    pub fn set_pasid_listener(&mut self, listener: PasidListener) {
        self.pasid_listener = Some(listener);
    }

    fn bar(&self, index: u8) -> Option<&VfioBar> {
        self.bars.iter().find(|b| b.plan.info.index == index)
    }

    fn release_interrupts(&mut self) {
        if let Some(m) = self.msi.as_mut() {
            if m.enabled() {
                m.release(self.sink.as_ref());
                let _ = self.regions.disable_irq(MSI_IRQ);
            }
        }
        if let Some(m) = self.msix.as_mut() {
            if m.enabled() {
                m.release(self.sink.as_ref());
                let _ = self.regions.disable_irq(MSIX_IRQ);
            }
        }
    }

    fn unmap_all(&mut self) {
        if let Some(mapper) = &self.mapper {
            for m in self.direct_mappings() {
                if let Some(g) = m.guest_addr {
                    if let Err(e) = mapper.unmap(g, m.len) {
                        warn!("{}: cannot unmap BAR{} at {g:#x}: {e}", self.id, m.bar);
                    }
                }
            }
        }
    }
}

impl PciDevice for VfioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        let off = reg_idx * 4;
        if off + 4 > self.size {
            return 0;
        }
        let emu = u32::from_le_bytes([
            self.emu[off],
            self.emu[off + 1],
            self.emu[off + 2],
            self.emu[off + 3],
        ]);
        let v = self.virt.read_u32(off);
        if emu == u32::MAX {
            return v;
        }
        (self.device_read_dword(off) & !emu) | (v & emu)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        let off = reg_idx * 4 + offset as usize;
        if data.is_empty() || off + data.len() > self.size {
            return;
        }
        self.virt.write(off, data);
        // Forward runs of pass-through bytes.
        let mut i = 0;
        while i < data.len() {
            if !self.pass_write[off + i] {
                i += 1;
                continue;
            }
            let start = i;
            while i < data.len() && self.pass_write[off + i] {
                i += 1;
            }
            if let Err(e) =
                self.regions
                    .region_write(CONFIG_REGION, (off + start) as u64, &data[start..i])
            {
                warn!(
                    "{}: config write at {:#x} failed: {e}",
                    self.id,
                    off + start
                );
            }
        }
        let end = off + data.len();
        let touches = |a: usize, len: usize| off < a + len && a < end;
        if touches(reg::COMMAND, 2) {
            self.command_written();
        }
        if self
            .msi
            .as_ref()
            .is_some_and(|m| m.cap().overlaps(off, data.len()))
        {
            self.msi_written();
        }
        if self
            .msix
            .as_ref()
            .is_some_and(|m| m.cap().touches_control(off, data.len()))
        {
            self.msix_control_written();
        }
        if let Some(p) = self.vpasid {
            if touches(p + 6, 2) {
                if let (Some(l), Some(c)) = (&self.pasid_listener, self.pasid_control()) {
                    l(c);
                }
            }
        }
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        self.bars.iter().map(|b| b.plan.info).collect()
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let Some(b) = self.bar(bar) else {
            data.fill(0xff);
            return;
        };
        let region_size = b.plan.region_size;
        let table_start = b.plan.msix_table.as_ref().map_or(0, |t| t.start);
        let pba_start = b.plan.msix_pba.as_ref().map_or(0, |p| p.start);
        for (range, part) in b.plan.split(offset, data.len()) {
            let Some(piece) =
                data.get_mut((range.start - offset) as usize..(range.end - offset) as usize)
            else {
                continue;
            };
            match (part, &self.msix) {
                (BarPart::MsixTable, Some(m)) => m.table_read(range.start - table_start, piece),
                (BarPart::MsixPba, Some(m)) => m.pba_read(range.start - pba_start, piece),
                (BarPart::MsixTable | BarPart::MsixPba, None) => piece.fill(0),
                (BarPart::Device, _) => {
                    if range.end > region_size {
                        piece.fill(0xff);
                        continue;
                    }
                    self.intx_before_access();
                    if let Err(e) = self.regions.region_read(u32::from(bar), range.start, piece) {
                        debug!(
                            "{}: BAR{bar} read at {:#x} failed: {e}",
                            self.id, range.start
                        );
                        piece.fill(0xff);
                    }
                }
            }
        }
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let Some(b) = self.bar(bar) else {
            return;
        };
        let region_size = b.plan.region_size;
        let table_start = b.plan.msix_table.as_ref().map_or(0, |t| t.start);
        for (range, part) in b.plan.split(offset, data.len()) {
            let Some(piece) =
                data.get((range.start - offset) as usize..(range.end - offset) as usize)
            else {
                continue;
            };
            match part {
                BarPart::MsixTable => {
                    if let Some(m) = self.msix.as_mut() {
                        if let Err(e) =
                            m.table_write(range.start - table_start, piece, self.sink.as_ref())
                        {
                            self.warn
                                .warn(format_args!("{}: MSI-X table update failed: {e}", self.id));
                        }
                    }
                }
                // The PBA is read-only.
                BarPart::MsixPba => {}
                BarPart::Device => {
                    if range.end > region_size {
                        continue;
                    }
                    self.intx_before_access();
                    if let Err(e) = self
                        .regions
                        .region_write(u32::from(bar), range.start, piece)
                    {
                        debug!(
                            "{}: BAR{bar} write at {:#x} failed: {e}",
                            self.id, range.start
                        );
                    }
                }
            }
        }
    }

    fn bar_moved(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
        let id = self.id.clone();
        let mapper = self.mapper.clone();
        let Some(b) = self.bars.iter_mut().find(|b| b.plan.info.index == bar) else {
            return;
        };
        b.guest_base = new;
        let Some(mapper) = mapper else {
            return;
        };
        // The guest moves BARs as often as it likes: these warnings are rate limited.
        let limit = &self.warn;
        for (off, area) in &b.maps {
            if let Some(o) = old {
                if let Err(e) = mapper.unmap(o + off, area.len()) {
                    limit.warn(format_args!(
                        "{id}: cannot unmap BAR{bar} at {:#x}: {e}",
                        o + off
                    ));
                }
            }
            if let Some(n) = new {
                if let Err(e) = mapper.map(n + off, area.host_addr(), area.len()) {
                    limit.warn(format_args!(
                        "{id}: cannot map BAR{bar} at {:#x}: {e}",
                        n + off
                    ));
                }
            }
        }
    }

    fn reset(&mut self) {
        self.release_interrupts();
        if let Err(e) = self.regions.reset() {
            warn!("{}: device reset failed: {e}", self.id);
        }
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
        if let Some(p) = self.vpasid {
            self.virt.set_u16(p + 6, 0);
        }
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
