//! Guest RAM as the vIOMMU sees it: bounds ([`RamMap`]), the guest's I/O page tables for the
//! shadow walker ([`RamTables`]), and the model's own accesses ([`VmGuestMemory`]).
//!
//! The bridge reads guest tables through the RAM memfd (`pread`), not through the VM's
//! mapping: it owns the memfd (an `Arc<File>` in every [`RamRegion`]), so no lifetime contract
//! with the VM's mapping is needed and no `unsafe` either. Every read is bounded by the RAM
//! regions; an address outside them is a walk fault, never a read elsewhere.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use devices::viommu::{GuestMemoryAccess, GuestMemoryError};
use ioasid::soft::TableMemory;
use ioasid::FaultReason;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemory, RamRegion};

/// The guest RAM regions, for bounds checks.
#[derive(Debug, Clone)]
pub struct RamMap {
    regions: Vec<RamRegion>,
}

impl RamMap {
    /// The map of `regions` (any order).
    pub fn new(mut regions: Vec<RamRegion>) -> Self {
        regions.sort_by_key(|r| r.gpa);
        RamMap { regions }
    }

    /// The regions, by GPA.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The region that holds all of `[gpa, gpa + len)` (`len > 0`).
    pub fn region_of(&self, gpa: u64, len: u64) -> Option<&RamRegion> {
        let last = gpa.checked_add(len.checked_sub(1)?)?;
        let idx = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(idx.checked_sub(1)?)?;
        (last <= r.gpa + (r.size - 1)).then_some(r)
    }

    /// Whether `[gpa, gpa + len)` lies inside one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.region_of(gpa, len).is_some()
    }
}

/// Table pages cached per scan before the cache starts over (16 MiB of tables).
const MAX_CACHED_PAGES: usize = 4096;

/// The guest's I/O page tables, read from the RAM memfd with bounds, one 4 KiB page per
/// `pread`, cached for the life of this object (one scan): a table the guest changes during
/// the scan may be seen old or new, as a hardware walk would.
pub struct RamTables<'a> {
    ram: &'a RamMap,
    pages: HashMap<u64, Box<[u8; 4096]>>,
    /// Pages read from the memfd.
    pub page_reads: u64,
}

impl<'a> RamTables<'a> {
    /// Tables over `ram`.
    pub fn new(ram: &'a RamMap) -> Self {
        RamTables {
            ram,
            pages: HashMap::new(),
            page_reads: 0,
        }
    }

    fn page(&mut self, page: u64) -> Result<&[u8; 4096], FaultReason> {
        if !self.pages.contains_key(&page) {
            let r = self
                .ram
                .region_of(page, 4096)
                .ok_or(FaultReason::AddressOutOfRange)?;
            let mut buf = Box::new([0u8; 4096]);
            r.memfd
                .read_exact_at(&mut buf[..], r.file_offset + (page - r.gpa))
                .map_err(|_| FaultReason::AddressOutOfRange)?;
            self.page_reads += 1;
            if self.pages.len() >= MAX_CACHED_PAGES {
                self.pages.clear();
            }
            self.pages.insert(page, buf);
        }
        self.pages
            .get(&page)
            .map(|b| &**b)
            .ok_or(FaultReason::AddressOutOfRange)
    }
}

impl TableMemory for RamTables<'_> {
    fn read_entry(&mut self, gpa: u64) -> Result<u64, FaultReason> {
        if !gpa.is_multiple_of(8) {
            return Err(FaultReason::AddressOutOfRange);
        }
        let off = (gpa & 0xfff) as usize;
        let page = self.page(gpa & !0xfff)?;
        let bytes: [u8; 8] = page
            .get(off..off + 8)
            .and_then(|b| b.try_into().ok())
            .ok_or(FaultReason::AddressOutOfRange)?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The shadow never writes guest tables (second-level A/D is not modelled).
    fn update_entry(&mut self, _gpa: u64, _old: u64, _new: u64) -> Result<bool, FaultReason> {
        Err(FaultReason::Permission)
    }
}

/// [`GuestMemoryAccess`] over the VM's guest memory (vm-memory): the model's root, context
/// and PASID tables, invalidation queue, status writes and page request queue. An access
/// that is not entirely inside guest RAM fails and touches nothing.
#[derive(Debug, Clone)]
pub struct VmGuestMemory {
    mem: GuestMemory,
}

impl VmGuestMemory {
    /// The model's view of `mem` (a cheap clone of the VM's memory map; it keeps the
    /// mappings alive).
    pub fn new(mem: GuestMemory) -> Self {
        VmGuestMemory { mem }
    }

    fn check(&self, gpa: u64, len: usize) -> Result<(), GuestMemoryError> {
        let err = GuestMemoryError { gpa, len };
        if len == 0 {
            return Ok(());
        }
        let ok = vm_memory::GuestMemory::check_range(
            &self.mem,
            GuestAddress(gpa),
            len,
            vm_memory::Permissions::ReadWrite,
        );
        if ok {
            Ok(())
        } else {
            Err(err)
        }
    }
}

impl GuestMemoryAccess for VmGuestMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestMemoryError> {
        self.check(gpa, buf.len())?;
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestMemoryError {
                gpa,
                len: buf.len(),
            })
    }

    fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestMemoryError> {
        self.check(gpa, buf.len())?;
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestMemoryError {
                gpa,
                len: buf.len(),
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::memory::{GuestRam, RamConfig};

    #[test]
    fn bounds_tables_and_model_memory() {
        let ram = GuestRam::new(RamConfig {
            size: 4 << 20,
            hugepages: false,
        })
        .unwrap();
        let map = RamMap::new(ram.regions().to_vec());
        assert!(map.contains(0, 4 << 20));
        assert!(!map.contains((4 << 20) - 8, 16));
        assert!(!map.contains(u64::MAX - 3, 8));
        assert!(!map.contains(0, 0));

        let model = VmGuestMemory::new(ram.memory().clone());
        model.write(0x2000, &0x1234_5678_u64.to_le_bytes()).unwrap();
        let mut b = [0u8; 8];
        model.read(0x2000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1234_5678);
        // Crossing the end of RAM: refused, and nothing is written.
        let end = 4 << 20;
        assert_eq!(
            model.write(end - 4, &[0xff; 8]),
            Err(GuestMemoryError {
                gpa: end - 4,
                len: 8
            })
        );
        model.read(end - 4, &mut b[..4]).unwrap();
        assert_eq!(&b[..4], &[0; 4]);

        // The shadow's table reads go through the memfd with the same bounds.
        let mut t = RamTables::new(&map);
        assert_eq!(t.read_entry(0x2000), Ok(0x1234_5678));
        assert_eq!(t.read_entry(0x2004), Err(FaultReason::AddressOutOfRange));
        assert_eq!(t.read_entry(end), Err(FaultReason::AddressOutOfRange));
        assert_eq!(t.update_entry(0x2000, 0, 1), Err(FaultReason::Permission));
        // Cached per scan: a second read of the page costs no pread.
        t.read_entry(0x2008).unwrap();
        assert_eq!(t.page_reads, 1);
    }
}
