//! The mapping decision for each BAR of an assigned device, as data: which windows are
//! mmapped (so the VMM can install them as memory slots) and which ranges are trapped.

use std::io;
use std::ops::Range;

use super::backend::{MmapWindow, RegionInfo};
use crate::pci::bar::PciBarInfo;
use crate::pci::msix::MsixCap;

/// How one BAR is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarPlan {
    /// The BAR the guest sees (size rounded up to a power of two).
    pub info: PciBarInfo,
    /// Size of the VFIO region behind it (accesses past it read as ones).
    pub region_size: u64,
    /// Windows mapped directly: page aligned, inside the region, clear of the MSI-X table
    /// and PBA.
    pub mmap: Vec<MmapWindow>,
    /// Everything else, trapped to the model.
    pub trapped: Vec<Range<u64>>,
    /// The MSI-X table inside this BAR (emulated).
    pub msix_table: Option<Range<u64>>,
    /// The MSI-X PBA inside this BAR (emulated).
    pub msix_pba: Option<Range<u64>>,
}

/// A directly mapped window and where it is now (for the VMM's memory slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectMapping {
    /// BAR index.
    pub bar: u8,
    /// Offset of the window in the BAR.
    pub bar_offset: u64,
    /// Length.
    pub len: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
    /// Guest physical address while the BAR is decoded, else `None`.
    pub guest_addr: Option<u64>,
}

/// Installs direct mappings of BAR windows into the guest (the VMM: KVM memory slots).
pub trait BarMapper: Send + Sync {
    /// Maps `len` bytes of host memory at `host_addr` at guest address `guest_addr`.
    fn map(&self, guest_addr: u64, host_addr: u64, len: u64) -> io::Result<()>;
    /// Removes the mapping at `guest_addr`.
    fn unmap(&self, guest_addr: u64, len: u64) -> io::Result<()>;
}

fn subtract(windows: Vec<Range<u64>>, hole: &Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    for w in windows {
        if hole.end <= w.start || w.end <= hole.start {
            out.push(w);
            continue;
        }
        if w.start < hole.start {
            out.push(w.start..hole.start);
        }
        if hole.end < w.end {
            out.push(hole.end..w.end);
        }
    }
    out
}

/// Decides how BAR `info` backed by `region` is served. `msix` is the MSI-X layout when
/// MSI-X is emulated.
pub fn plan_bar(
    info: PciBarInfo,
    region: &RegionInfo,
    msix: Option<&MsixCap>,
    page: u64,
) -> BarPlan {
    let idx = info.index;
    let msix_table = msix.filter(|m| m.table_bar == idx).map(|m| m.table_range());
    let msix_pba = msix.filter(|m| m.pba_bar == idx).map(|m| m.pba_range());
    let size = region.size.min(info.size);
    let mut windows: Vec<Range<u64>> = if !region.mmap || !info.is_memory() {
        Vec::new()
    } else {
        match &region.sparse_mmap {
            Some(areas) => areas
                .iter()
                .map(|a| a.offset.min(size)..a.offset.saturating_add(a.len).min(size))
                .collect(),
            None => std::iter::once(0..size).collect(),
        }
    };
    for hole in [&msix_table, &msix_pba].into_iter().flatten() {
        let h = (hole.start & !(page - 1))..hole.end.div_ceil(page) * page;
        windows = subtract(windows, &h);
    }
    // Only whole pages can be mapped.
    let mut mmap: Vec<MmapWindow> = windows
        .into_iter()
        .filter_map(|w| {
            let start = w.start.div_ceil(page) * page;
            let end = w.end & !(page - 1);
            (end > start).then_some(MmapWindow {
                offset: start,
                len: end - start,
            })
        })
        .collect();
    mmap.sort_by_key(|w| w.offset);
    let trapped = trapped_ranges(info.size, &mmap);
    BarPlan {
        info,
        region_size: region.size,
        mmap,
        trapped,
        msix_table,
        msix_pba,
    }
}

/// The complement of `mmap` in `[0, size)`.
pub fn trapped_ranges(size: u64, mmap: &[MmapWindow]) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = std::iter::once(0..size).collect();
    for w in mmap {
        out = subtract(out, &(w.offset..w.offset + w.len));
    }
    out
}

/// Which part of a BAR a piece of an access falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarPart {
    /// The MSI-X table (emulated).
    MsixTable,
    /// The MSI-X PBA (emulated).
    MsixPba,
    /// The device (trapped to VFIO).
    Device,
}

impl BarPlan {
    /// Whether `offset` falls in the MSI-X table.
    pub fn in_table(&self, offset: u64) -> bool {
        self.msix_table
            .as_ref()
            .is_some_and(|r| r.contains(&offset))
    }

    /// Whether `offset` falls in the MSI-X PBA.
    pub fn in_pba(&self, offset: u64) -> bool {
        self.msix_pba.as_ref().is_some_and(|r| r.contains(&offset))
    }

    /// Splits an access of `len` bytes at `offset` by range overlap: each piece (BAR offsets)
    /// goes to the MSI-X table, the PBA or the device. An access that straddles the start
    /// or end of the table is emulated for its table bytes and never reaches the device
    /// there (as QEMU's memory core splits it at region boundaries). The table wins where
    /// a device lays the table and PBA over each other.
    pub fn split(&self, offset: u64, len: usize) -> Vec<(Range<u64>, BarPart)> {
        let end = offset.saturating_add(len as u64);
        let parts = [
            (self.msix_table.as_ref(), BarPart::MsixTable),
            (self.msix_pba.as_ref(), BarPart::MsixPba),
        ];
        let mut out: Vec<(Range<u64>, BarPart)> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let inside = parts
                .iter()
                .find_map(|(r, p)| r.filter(|r| r.contains(&pos)).map(|r| (r.end, *p)));
            let (stop, part) = match inside {
                Some((r_end, p)) => (r_end.min(end), p),
                None => {
                    // Up to the next emulated range that starts after `pos`.
                    let next = parts
                        .iter()
                        .filter_map(|(r, _)| r.map(|r| r.start))
                        .filter(|&s| s > pos)
                        .min()
                        .unwrap_or(end);
                    (next.min(end), BarPart::Device)
                }
            };
            out.push((pos..stop, part));
            pos = stop;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pci::bar::BarKind;

    #[test]
    fn split_by_overlap() {
        let plan = BarPlan {
            info: PciBarInfo::new(0, BarKind::Mem32, 0x4000, false).unwrap(),
            region_size: 0x4000,
            mmap: Vec::new(),
            trapped: std::iter::once(0..0x4000).collect(),
            msix_table: Some(0x1000..0x1100),
            msix_pba: Some(0x1100..0x1108),
        };
        assert_eq!(
            plan.split(0x0ffc, 8),
            vec![
                (0x0ffc..0x1000, BarPart::Device),
                (0x1000..0x1004, BarPart::MsixTable)
            ]
        );
        assert_eq!(
            plan.split(0x10fc, 16),
            vec![
                (0x10fc..0x1100, BarPart::MsixTable),
                (0x1100..0x1108, BarPart::MsixPba),
                (0x1108..0x110c, BarPart::Device)
            ]
        );
        assert_eq!(
            plan.split(0x2000, 4),
            vec![(0x2000..0x2004, BarPart::Device)]
        );
        assert!(plan.split(u64::MAX, 8).len() <= 1);
    }
}
