//! Config-space virtualization: the snapshot of the device's config space becomes the
//! model's [`ConfigSpace`] with a per-bit "served by the model" mask and a per-byte "guest
//! writes reach the device" flag; the header, the BARs and the capability lists are built
//! here, with every device-supplied offset bounded (a capability list is device input), and
//! guest config accesses are served here. See the tables in [`crate::vfio`].

use super::super::backend::{CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use super::super::caps::{self, CapContext, CapDecision, CapPolicy};
use super::*;
use crate::pci::bar::{BarKind, PciBarInfo, BAR0_OFFSET, MAX_IO_BAR, NUM_BARS};
use crate::pci::config::{
    cap_id, ext_cap_id, image_u16, image_u32, reg, status, walk_capabilities,
    walk_ext_capabilities, ConfigSpace, CONFIG_SPACE_SIZE, EXT_CAP_START, EXT_CONFIG_SPACE_SIZE,
};
use crate::pci::msi::{MsiCap, MsiState};
use crate::pci::msix::{MsixCap, MsixState};

/// Command bits the guest may set and that are forwarded to the device. Special cycles,
/// memory-write-and-invalidate, VGA snoop and fast back-to-back read as 0 and never reach
/// it.
const COMMAND_FORWARDED: u16 = ConfigSpace::COMMAND_WRITABLE;

impl VfioPciDevice {
    pub(super) fn emulate(&mut self, off: usize, len: usize) {
        for b in self.emu.iter_mut().skip(off).take(len) {
            *b = 0xff;
        }
    }

    pub(super) fn passthrough_writes(&mut self, off: usize, len: usize) {
        for b in self.pass_write.iter_mut().skip(off).take(len) {
            *b = true;
        }
    }

    pub(super) fn discover_bars(&self, snap: &[u8]) -> Result<Vec<PciBarInfo>, VfioPciError> {
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

    pub(super) fn build_header(&mut self, snap: &[u8], bars: &[PciBarInfo]) {
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

    pub(super) fn build_capabilities(&mut self, snap: &[u8], bars: &[PciBarInfo]) {
        let msi_count = irq_count(self.regions.as_ref(), MSI_IRQ);
        let msix_count = irq_count(self.regions.as_ref(), MSIX_IRQ);
        let has_bar = |i: u8| bars.iter().any(|b| b.index == i && b.is_memory());
        let u16_at = |o: usize| image_u16(snap, o);
        let u32_at = |o: usize| image_u32(snap, o);
        let mut visible = Vec::new();
        // Registers of emulated capabilities: a later header inside them is the device lying
        // about its layout; it is hidden without touching the registers.
        let mut claimed: Vec<std::ops::Range<usize>> = Vec::new();
        let all = walk_capabilities(snap);
        // The policy table's answer for a capability, and its MSI-X layout.
        let decide = |cap: &crate::pci::config::CapEntry| {
            let o = cap.offset;
            let msix_layout = (cap.id == cap_id::MSIX && o + MsixCap::LEN <= CONFIG_SPACE_SIZE)
                .then(|| {
                    MsixCap::from_registers(o, u16_at(o + 2), u32_at(o + 4), u32_at(o + 8))
                        .with_table_size(u16::try_from(msix_count).unwrap_or(u16::MAX))
                });
            let ctx = CapContext {
                msi_irqs: msi_count > 0,
                msix_usable: msix_count > 0
                    && msix_layout.is_some_and(|m| has_bar(m.table_bar) && has_bar(m.pba_bar)),
                ..Default::default()
            };
            (caps::standard(cap.id, &ctx), msix_layout)
        };
        // An emulated capability whose registers cover the header of a capability the guest
        // will see would let the guest rewrite that header's next pointer through its own
        // registers: such an emulated capability is hidden instead.
        let shown: Vec<usize> = all
            .iter()
            .filter(|c| decide(c).0 .0 != CapPolicy::Hide)
            .map(|c| c.offset)
            .collect();
        let covers_other =
            |o: usize, len: usize| shown.iter().any(|&c| c != o && c < o + len && o < c + 2);
        for cap in all.iter().copied() {
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
            let ((policy, reason), msix_layout) = decide(&cap);
            let (mut policy, mut reason) = (policy, reason);
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
                    } else if covers_other(o, m.len()) {
                        (policy, reason) = (CapPolicy::Hide, "overlaps another capability");
                    } else {
                        m.install(&mut self.virt);
                        self.emulate(o, m.len());
                        claimed.push(o..o + m.len());
                        self.msi = Some(MsiState::new(m));
                    }
                }
                (CapPolicy::Emulate, cap_id::MSIX) if covers_other(o, MsixCap::LEN) => {
                    (policy, reason) = (CapPolicy::Hide, "overlaps another capability");
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

    pub(super) fn build_ext_capabilities(
        &mut self,
        snap: &[u8],
        vpasid: Option<VpasidConfig>,
    ) -> Result<(), VfioPciError> {
        let ctx = CapContext {
            vpasid: vpasid.is_some(),
            ..Default::default()
        };
        let mut visible: Vec<(usize, u16, u8)> = Vec::new();
        let mut hidden_pasid = None;
        let mut replaced: Vec<usize> = Vec::new();
        let mut device_ats = None;
        let all = walk_ext_capabilities(snap);
        for cap in all.iter().copied() {
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
            if matches!(
                cap.id,
                ext_cap_id::PASID | ext_cap_id::ATS | ext_cap_id::PRI
            ) {
                replaced.push(cap.offset);
            }
            if cap.id == ext_cap_id::ATS && device_ats.is_none() {
                device_ats = Some(image_u16(snap, cap.offset + 4));
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
            let layout = DeviceSvaLayout {
                hidden_pasid,
                lowest_replaced: replaced.iter().copied().min(),
                device_ats,
                obstacles: ext_obstacles(snap, &all, &replaced),
            };
            self.place_vsva(cfg, &layout, &ctx, &mut visible)?;
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
        Ok(())
    }

    /// Places the vSVA chain (PASID, then ATS, then PRI, contiguous) and installs it. An
    /// explicit `cfg.offset` must be dword aligned, inside `0x100..0x1000` with the whole
    /// chain, and collide with none of `obstacles`; else the assignment is refused. Without
    /// one, the chain goes to the first free place of: the hidden PASID's offset, the
    /// lowest of the hidden PASID/ATS/PRI offsets, then the highest free dword-aligned
    /// window (the last bytes of config space when free); with no free place it is hidden.
    fn place_vsva(
        &mut self,
        cfg: VpasidConfig,
        layout: &DeviceSvaLayout,
        ctx: &CapContext,
        visible: &mut Vec<(usize, u16, u8)>,
    ) -> Result<(), VfioPciError> {
        let DeviceSvaLayout {
            hidden_pasid,
            lowest_replaced,
            device_ats,
            ref obstacles,
        } = *layout;
        let ats = cfg.ats && device_ats.is_some();
        if cfg.ats && !ats {
            self.caps.push(CapDecision {
                offset: 0,
                id: ext_cap_id::ATS,
                extended: true,
                policy: CapPolicy::Hide,
                reason: "no vATS: the device has no ATS capability",
            });
        }
        let len = cfg.chain_len(ats);
        let free = |o: usize| {
            o.is_multiple_of(4)
                && o >= EXT_CAP_START
                && o + len <= EXT_CONFIG_SPACE_SIZE
                && !obstacles.iter().any(|r| r.start < o + len && o < r.end)
        };
        let place = match cfg.offset {
            Some(o) => {
                let why = if !o.is_multiple_of(4) {
                    Some("not dword aligned".to_string())
                } else if o < EXT_CAP_START || o + len > EXT_CONFIG_SPACE_SIZE {
                    Some(format!(
                        "the {len}-byte PASID/ATS/PRI chain must lie inside \
                         {EXT_CAP_START:#x}..{EXT_CONFIG_SPACE_SIZE:#x}"
                    ))
                } else {
                    obstacles
                        .iter()
                        .find(|r| r.start < o + len && o < r.end)
                        .map(|r| {
                            format!(
                                "the {len}-byte PASID/ATS/PRI chain would cover the \
                                 device's capability at {:#x}..{:#x}",
                                r.start, r.end
                            )
                        })
                };
                if let Some(reason) = why {
                    return Err(VfioPciError::VsvaOffset {
                        device: self.id.clone(),
                        offset: o,
                        reason,
                    });
                }
                Some(o)
            }
            None => hidden_pasid
                .filter(|&o| free(o))
                .or_else(|| lowest_replaced.filter(|&o| free(o)))
                .or_else(|| {
                    (EXT_CAP_START..=EXT_CONFIG_SPACE_SIZE.saturating_sub(len))
                        .rev()
                        .find(|&o| free(o))
                }),
        };
        let Some(off) = place else {
            self.caps.push(CapDecision {
                offset: VPASID_FALLBACK_OFFSET,
                id: ext_cap_id::PASID,
                extended: true,
                policy: CapPolicy::Hide,
                reason: "no room for a vPASID without covering another capability",
            });
            return Ok(());
        };
        let (policy, reason) = caps::extended(ext_cap_id::PASID, ctx);
        self.install_vpasid(off, cfg);
        self.present_pasid_path();
        visible.push((off, ext_cap_id::PASID, 1));
        self.caps.push(CapDecision {
            offset: off,
            id: ext_cap_id::PASID,
            extended: true,
            policy,
            reason,
        });
        let mut at = off + VPASID_LEN;
        if let (true, Some(dev_cap)) = (ats, device_ats) {
            self.install_vats(at, dev_cap);
            visible.push((at, ext_cap_id::ATS, 1));
            self.caps.push(CapDecision {
                offset: at,
                id: ext_cap_id::ATS,
                extended: true,
                policy: CapPolicy::Emulate,
                reason: "vATS synthesized: the IOMMU supports ATS for the device",
            });
            at += super::ats::VATS_LEN;
        }
        if let Some(capacity) = cfg.pri_capacity {
            self.install_vpri(at, capacity);
            visible.push((at, ext_cap_id::PRI, 1));
            self.caps.push(CapDecision {
                offset: at,
                id: ext_cap_id::PRI,
                extended: true,
                policy: CapPolicy::Emulate,
                reason: "vPRI synthesized: the IOMMU takes page requests (PRS)",
            });
        }
        Ok(())
    }

    pub(super) fn device_read_dword(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        match self.regions.region_read(CONFIG_REGION, off as u64, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                // Guest reads reach this: rate limited.
                self.warn.warn(format_args!(
                    "{}: config read at {off:#x} failed: {e}",
                    self.id
                ));
                u32::MAX
            }
        }
    }

    pub(super) fn command_written(&mut self) {
        let guest = self.virt.read_u16(reg::COMMAND);
        let mut cur = [0u8; 2];
        if let Err(e) = self
            .regions
            .region_read(CONFIG_REGION, reg::COMMAND as u64, &mut cur)
        {
            self.warn.warn(format_args!(
                "{}: cannot read the device command register: {e}",
                self.id
            ));
            return;
        }
        let cur = u16::from_le_bytes(cur);
        let new = (cur & !COMMAND_FORWARDED) | (guest & COMMAND_FORWARDED);
        if new != cur {
            if let Err(e) =
                self.regions
                    .region_write(CONFIG_REGION, reg::COMMAND as u64, &new.to_le_bytes())
            {
                self.warn.warn(format_args!(
                    "{}: cannot write the device command register: {e}",
                    self.id
                ));
            }
        }
    }

    pub(super) fn config_read(&mut self, reg_idx: usize) -> u32 {
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

    pub(super) fn config_write(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
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
                self.warn.warn(format_args!(
                    "{}: config write at {:#x} failed: {e}",
                    self.id,
                    off + start
                ));
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
        self.vsva_written(off, data.len());
    }
}

/// What the vSVA chain's placement needs to know about the device's extended capabilities.
struct DeviceSvaLayout {
    /// The device's own PASID capability (hidden).
    hidden_pasid: Option<usize>,
    /// The lowest of the device's own PASID/ATS/PRI capabilities (hidden, replaced).
    lowest_replaced: Option<usize>,
    /// The device's ATS capability register (its ATS is hidden; no ATS, no vATS).
    device_ats: Option<u16>,
    /// The registers of every other extended capability of the device.
    obstacles: Vec<std::ops::Range<usize>>,
}

/// Register lengths of the extended capabilities whose size is fixed.
fn fixed_ext_len(id: u16) -> Option<usize> {
    match id {
        ext_cap_id::AER => Some(0x48),
        ext_cap_id::SRIOV => Some(0x40),
        ext_cap_id::DEV3 => Some(0x0c),
        _ => None,
    }
}

/// The registers of the device's extended capabilities, except the PASID/ATS/PRI ones the
/// chain replaces (`replaced`): a fixed length where the ID has one, the VSEC/DVSEC length
/// field (at least the 8 bytes of headers), else up to the next header in address order
/// (the last such capability: its header only, there is nothing to bound it by).
fn ext_obstacles(
    snap: &[u8],
    all: &[crate::pci::config::ExtCapEntry],
    replaced: &[usize],
) -> Vec<std::ops::Range<usize>> {
    let mut starts: Vec<usize> = all.iter().map(|c| c.offset).collect();
    starts.sort_unstable();
    all.iter()
        .filter(|c| !replaced.contains(&c.offset))
        .map(|c| {
            let o = c.offset;
            let next = starts.iter().copied().find(|&s| s > o);
            let len = match c.id {
                ext_cap_id::VSEC | ext_cap_id::DVSEC => {
                    ((image_u32(snap, o + 4) >> 20) as usize).max(8)
                }
                id => fixed_ext_len(id).or(next.map(|n| n - o)).unwrap_or(4),
            };
            o..(o + len).min(EXT_CONFIG_SPACE_SIZE).max(o + 4)
        })
        .collect()
}
