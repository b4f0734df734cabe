//! The shadow path: a host IOAS per guest second-stage domain, kept in sync with the guest's
//! second-stage table.
//!
//! A sync walks the guest table over an input range ([`ioasid::soft::scan_second_level`]
//! over [`RamTables`]), turns each leaf into GPA runs, checks that every run lies inside one
//! guest RAM region (a leaf or a table pointer outside RAM is skipped and reported, never
//! mapped), coalesces contiguous runs (IOVA and GPA both contiguous, same permissions, same
//! region) and maps each run with one `IOAS_COPY` from the guest-RAM IOAS (IOVA = GPA there),
//! which shares the pages that IOAS already pinned.
//!
//! iommufd cannot split a mapping on unmap, so the domain keeps its own interval map of the
//! areas it mapped, and always unmaps whole areas: a range to resync is first widened to the
//! areas it touches. The new state is then compared with the old one (a diff): areas that
//! stay identical are not touched, so a resync of a page does not open a window in which a
//! neighbouring DMA faults. Consecutive areas that go are unmapped with one call.
//!
//! A guest that changes its table without invalidating keeps the old mappings (stale, as
//! with a real IOTLB); they still point inside guest RAM, because every mapping was checked
//! when it was made and guest RAM is all the guest-RAM IOAS holds.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use devices::pci::PciBdf;
use devices::viommu::SecondStage;
use ioasid::soft::{scan_second_level, SlConfig};
use ioasid::{CopyRequest, IoasId, IommuBackend, IovaRanges, Pasid, Perm};

use super::guest_mem::{RamMap, RamTables};

/// One area mapped into the shadow IOAS (the key of the map is its IOVA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Area {
    len: u64,
    gpa: u64,
    perm: Perm,
}

/// A run the guest table asks for: IOVA, length, GPA, permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Run {
    iova: u64,
    len: u64,
    gpa: u64,
    perm: Perm,
}

/// What one sync did and found.
#[derive(Debug, Default)]
pub(crate) struct SyncReport {
    /// `IOAS_COPY` calls.
    pub maps: u64,
    /// `IOAS_UNMAP` calls.
    pub unmaps: u64,
    /// Guest entries skipped: outside guest RAM, reserved bits, leaves outside RAM.
    pub bad_entries: u64,
    /// The first of them, in words.
    pub first_bad: Option<String>,
    /// The scan's step budget ran out (a table too large or hostile).
    pub truncated: bool,
    /// Host calls that failed.
    pub host_errors: Vec<ioasid::Error>,
}

impl SyncReport {
    fn bad(&mut self, what: String) {
        self.bad_entries += 1;
        if self.first_bad.is_none() {
            self.first_bad = Some(what);
        }
    }
}

/// What a sync needs from the bridge.
pub(crate) struct SyncCtx<'a> {
    pub backend: &'a dyn IommuBackend,
    pub ram_ioas: IoasId,
    pub ram: &'a RamMap,
    pub max_scan_steps: u64,
}

/// One shadowed guest domain.
#[derive(Debug)]
pub(crate) struct ShadowDomain {
    /// The guest's domain id.
    pub did: u16,
    /// The guest's second-stage table.
    pub table: SecondStage,
    /// The host IOAS the devices of this domain are attached to.
    pub ioas: IoasId,
    /// The (device, PASID) contexts that use it.
    pub users: BTreeSet<(PciBdf, Pasid)>,
    areas: BTreeMap<u64, Area>,
    /// The host IOAS's IOVA windows (`None`: unknown, the host call decides).
    aperture: Option<IovaRanges>,
}

/// Sorts and merges inclusive ranges that overlap or touch.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, l) in v {
        match out.last_mut() {
            Some(prev) if s <= prev.1.saturating_add(1) => prev.1 = prev.1.max(l),
            _ => out.push((s, l)),
        }
    }
    out
}

impl ShadowDomain {
    /// A domain for `table` with an empty host IOAS `ioas`, whose IOVA windows are
    /// `aperture` (a guest IOVA outside them is reported, not mapped).
    pub fn new(did: u16, table: SecondStage, ioas: IoasId, aperture: Option<IovaRanges>) -> Self {
        ShadowDomain {
            did,
            table,
            ioas,
            users: BTreeSet::new(),
            areas: BTreeMap::new(),
            aperture,
        }
    }

    /// The last input address of the table (its width: 39, 48 or 57 bits).
    pub fn input_last(&self) -> u64 {
        let width = 12 + 9 * u32::from(self.table.levels.clamp(3, 5));
        (1u64 << width) - 1
    }

    /// The mapped areas as `(iova, len, gpa)`.
    pub fn areas(&self) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        self.areas.iter().map(|(i, a)| (*i, a.len, a.gpa))
    }

    /// Widens a range to the whole areas it touches.
    fn widen(&self, s: u64, l: u64) -> (u64, u64) {
        let mut ws = s;
        if let Some((start, _)) = self
            .areas
            .range(..=s)
            .next_back()
            .filter(|(st, a)| **st + (a.len - 1) >= s)
        {
            ws = *start;
        }
        let mut wl = l;
        if let Some((start, a)) = self.areas.range(..=l).next_back() {
            wl = wl.max(start + (a.len - 1));
        }
        (ws, wl)
    }

    /// The runs the guest table asks for in `[s, l]`, coalesced and checked against RAM.
    fn desired(
        &self,
        ctx: &SyncCtx<'_>,
        tables: &mut RamTables<'_>,
        s: u64,
        l: u64,
        report: &mut SyncReport,
    ) -> (Vec<Run>, Option<u64>) {
        if !(3..=5).contains(&self.table.levels) {
            report.bad(format!(
                "the table at {:#x} has {} levels (3, 4 or 5 are valid)",
                self.table.root, self.table.levels
            ));
            return (Vec::new(), Some(l));
        }
        let cfg = SlConfig {
            root: self.table.root,
            levels: self.table.levels,
        };
        let scan = scan_second_level(tables, &cfg, s, l, ctx.max_scan_steps);
        for (addr, f) in &scan.faults {
            report.bad(format!(
                "IOVA {addr:#x}: {:?} at level {} of the table at {:#x}",
                f.reason, f.level, self.table.root
            ));
        }
        // Faults beyond those kept are counted, not described.
        report.bad_entries += scan.fault_count - scan.faults.len() as u64;
        let mut covered_last = l;
        if scan.truncated {
            report.truncated = true;
            report.bad(format!(
                "the table at {:#x} is larger than the scan budget of {} steps",
                self.table.root, ctx.max_scan_steps
            ));
            match scan.resume_at {
                Some(r) if r <= s => return (Vec::new(), None),
                Some(r) => covered_last = (r - 1).min(l),
                None => {}
            }
        }
        let mut runs: Vec<Run> = Vec::new();
        for leaf in &scan.leaves {
            if !leaf.read && !leaf.write {
                continue;
            }
            let size = leaf.page_size;
            let out_base = leaf.addr & !(size - 1);
            let lo = leaf.page_base.max(s);
            let hi = (leaf.page_base + (size - 1)).min(covered_last);
            if lo > hi {
                continue;
            }
            let gpa = out_base + (lo - leaf.page_base);
            let len = hi - lo + 1;
            if !ctx.ram.contains(gpa, len) {
                report.bad(format!(
                    "IOVA {lo:#x}+{len:#x} maps GPA {gpa:#x}, outside guest RAM"
                ));
                continue;
            }
            if self.aperture.as_ref().is_some_and(|a| !a.permits(lo, len)) {
                report.bad(format!(
                    "IOVA {lo:#x}+{len:#x} is outside the host IOAS's IOVA windows"
                ));
                continue;
            }
            let perm = Perm {
                read: leaf.read,
                write: leaf.write,
            };
            if let Some(prev) = runs.last_mut() {
                if prev.iova + prev.len == lo
                    && prev.gpa + prev.len == gpa
                    && prev.perm == perm
                    && ctx.ram.contains(prev.gpa, prev.len + len)
                {
                    prev.len += len;
                    continue;
                }
            }
            runs.push(Run {
                iova: lo,
                len,
                gpa,
                perm,
            });
        }
        (runs, Some(covered_last))
    }

    /// Brings `[s, l]` (already widened) in line with `runs`.
    fn apply(&mut self, ctx: &SyncCtx<'_>, s: u64, l: u64, runs: &[Run], rep: &mut SyncReport) {
        let want: HashSet<Run> = runs.iter().copied().collect();
        let current: Vec<(u64, Area)> = self.areas.range(s..=l).map(|(i, a)| (*i, *a)).collect();
        let mut kept: HashSet<u64> = HashSet::new();
        // Groups of consecutive areas that go, each unmapped with one call.
        let mut groups: Vec<Vec<u64>> = Vec::new();
        let mut group: Vec<u64> = Vec::new();
        for (iova, a) in &current {
            let run = Run {
                iova: *iova,
                len: a.len,
                gpa: a.gpa,
                perm: a.perm,
            };
            if want.contains(&run) {
                kept.insert(*iova);
                if !group.is_empty() {
                    groups.push(std::mem::take(&mut group));
                }
            } else {
                group.push(*iova);
            }
        }
        if !group.is_empty() {
            groups.push(group);
        }
        for g in groups {
            let (Some(first), Some(last)) = (g.first(), g.last()) else {
                continue;
            };
            let Some(last_area) = self.areas.get(last) else {
                continue;
            };
            let len = last + last_area.len - first;
            rep.unmaps += 1;
            match ctx.backend.ioas_unmap(self.ioas, *first, len) {
                Ok(_) => {
                    for iova in g {
                        self.areas.remove(&iova);
                    }
                }
                Err(e) => rep.host_errors.push(e),
            }
        }
        for r in runs {
            if kept.contains(&r.iova) {
                continue;
            }
            rep.maps += 1;
            let req = CopyRequest {
                src: ctx.ram_ioas,
                src_iova: r.gpa,
                dst: self.ioas,
                dst_iova: Some(r.iova),
                len: r.len,
                perm: r.perm,
            };
            match ctx.backend.ioas_copy(&req) {
                Ok(_) => {
                    self.areas.insert(
                        r.iova,
                        Area {
                            len: r.len,
                            gpa: r.gpa,
                            perm: r.perm,
                        },
                    );
                }
                Err(e) => rep.host_errors.push(e),
            }
        }
    }

    /// Resyncs the input ranges `ranges` (inclusive; `None`: the whole table) with the guest
    /// table: widen to whole areas, walk, diff, unmap and map.
    pub fn resync(&mut self, ctx: &SyncCtx<'_>, ranges: Option<Vec<(u64, u64)>>) -> SyncReport {
        let top = self.input_last();
        let ranges = ranges.unwrap_or_else(|| vec![(0, top)]);
        let clipped: Vec<(u64, u64)> = ranges
            .into_iter()
            .filter(|(s, l)| s <= l && *s <= top)
            .map(|(s, l)| (s & !0xfff, l.min(top) | 0xfff))
            .collect();
        let widened = merge(
            merge(clipped)
                .into_iter()
                .map(|(s, l)| self.widen(s, l))
                .collect(),
        );
        // The windows change when devices attach (their reserved regions, e.g. the MSI
        // window, leave the IOAS): ask once per resync.
        if let Ok(a) = ctx.backend.iova_ranges(self.ioas) {
            self.aperture = Some(a);
        }
        let mut rep = SyncReport::default();
        let mut tables = RamTables::new(ctx.ram);
        for (s, l) in widened {
            let (runs, covered) = self.desired(ctx, &mut tables, s, l, &mut rep);
            let Some(covered_last) = covered else {
                continue;
            };
            // A truncated scan leaves the areas it did not reach alone.
            let (s2, l2) = self.widen(s, covered_last);
            self.apply(ctx, s2, l2.min(l), &runs, &mut rep);
        }
        rep
    }

    /// Unmaps everything and destroys the IOAS (no device may be attached any more).
    pub fn release(&mut self, backend: &dyn IommuBackend) -> (u64, Result<(), ioasid::Error>) {
        let mut unmaps = 0;
        if !self.areas.is_empty() {
            unmaps += 1;
            if let Err(e) = backend.ioas_unmap_all(self.ioas) {
                return (unmaps, Err(e));
            }
            self.areas.clear();
        }
        (unmaps, backend.destroy(self.ioas.0))
    }
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn merge_joins_touching_and_overlapping() {
        assert_eq!(
            merge(vec![
                (0x3000, 0x3fff),
                (0, 0xfff),
                (0x1000, 0x1fff),
                (0x3800, 0x5fff)
            ]),
            vec![(0, 0x1fff), (0x3000, 0x5fff)]
        );
        assert_eq!(merge(vec![(5, u64::MAX), (7, 9)]), vec![(5, u64::MAX)]);
    }
}
