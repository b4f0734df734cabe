//! The BARs of the model: windows VFIO lets us mmap become direct guest mappings through
//! the VMM's [`BarMapper`] (and follow BAR moves); everything else is trapped, with the
//! MSI-X table and PBA emulated by range overlap ([`BarPlan::split`]).

use std::sync::Arc;

use log::{debug, warn};

use super::super::backend::page_size;
use super::super::bar::{plan_bar, trapped_ranges, BarMapper, BarPart, BarPlan, DirectMapping};
use super::*;
use crate::pci::bar::PciBarInfo;

impl VfioPciDevice {
    pub(super) fn build_bars(&mut self, infos: Vec<PciBarInfo>) {
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

    pub(super) fn bar(&self, index: u8) -> Option<&VfioBar> {
        self.bars.iter().find(|b| b.plan.info.index == index)
    }

    pub(super) fn unmap_all(&mut self) {
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

    pub(super) fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
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

    pub(super) fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
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

    pub(super) fn bar_move(&mut self, bar: u8, old: Option<u64>, new: Option<u64>) {
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
}
