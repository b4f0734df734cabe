//! The soft-only second-level binding ([`SoftIommu::hwpt_alloc_second_level`]): allocation
//! checks, per-access walks through the IOTLB, invalidation, and stage-2 changes under it.

#![allow(clippy::unwrap_used)]

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::types::Perm;

const R: u64 = 1;
const W: u64 = 2;

fn setup() -> (GuestMemoryMmap<()>, SoftIommu, DevId, IoasId, HwptId) {
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
    let soft = SoftIommu::from_guest_memory(&mem, SoftConfig::default()).unwrap();
    let dev = soft.register_device("sl").unwrap();
    let ioas = soft.ioas_alloc().unwrap();
    let hva = soft.regions()[0].hva;
    // SAFETY: the region is the soft IOMMU's own registered guest memory (kept alive by it)
    // and is only accessed through vm-memory's volatile accessors.
    unsafe {
        soft.ioas_map(
            ioas,
            &MapUser {
                iova: Some(0),
                user_va: hva,
                len: 16 << 20,
                perm: Perm::RW,
            },
        )
    }
    .unwrap();
    let parent = soft.hwpt_alloc(&HwptAlloc::nest_parent(dev, ioas)).unwrap();
    (mem, soft, dev, ioas, parent)
}

/// The IOVA the test table maps.
const IOVA: u64 = 0x4020_3000;

/// The entry for `iova` in the table at `table`, at the level that resolves bits from
/// `shift` up.
fn slot(table: u64, iova: u64, shift: u32) -> GuestAddress {
    GuestAddress(table + ((iova >> shift) & 511) * 8)
}

/// A 3-level table at 0x10_0000 mapping [`IOVA`] to GPA 0x80_0000 (4 KiB, R/W).
fn table(mem: &GuestMemoryMmap<()>) -> SlConfig {
    let (root, l2, l1) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
    mem.write_obj(l2 | R | W, slot(root, IOVA, 30)).unwrap();
    mem.write_obj(l1 | R | W, slot(l2, IOVA, 21)).unwrap();
    mem.write_obj(0x80_0000u64 | R | W, slot(l1, IOVA, 12))
        .unwrap();
    SlConfig { root, levels: 3 }
}

#[test]
fn second_level_hwpt_allocation_checks() {
    let (mem, soft, dev, ioas, parent) = setup();
    let cfg = table(&mem);
    let errno = |r: Result<HwptId>| r.err().and_then(|e| e.errno());
    let bad_levels = SlConfig { levels: 6, ..cfg };
    assert_eq!(
        errno(soft.hwpt_alloc_second_level(dev, parent, bad_levels, None, false)),
        Some(libc::EINVAL)
    );
    let unaligned = SlConfig {
        root: 0x10_0008,
        ..cfg
    };
    assert_eq!(
        errno(soft.hwpt_alloc_second_level(dev, parent, unaligned, None, false)),
        Some(libc::EINVAL)
    );
    // The parent must be a nest parent, not a paging HWPT or another nested one.
    let paging = soft
        .hwpt_alloc(&HwptAlloc {
            dev,
            parent: PtId::Ioas(ioas),
            flags: HwptFlags::default(),
            fault: None,
            stage1: None,
        })
        .unwrap();
    assert_eq!(
        errno(soft.hwpt_alloc_second_level(dev, paging, cfg, None, false)),
        Some(libc::EINVAL)
    );
    let n = soft
        .hwpt_alloc_second_level(dev, parent, cfg, None, false)
        .unwrap();
    assert_eq!(
        errno(soft.hwpt_alloc_second_level(dev, n, cfg, None, false)),
        Some(libc::EINVAL)
    );
    assert_eq!(
        errno(soft.hwpt_alloc_second_level(DevId(999), parent, cfg, None, false)),
        Some(libc::ENOENT)
    );
    // Without the PASID flag it cannot serve a PASID; the parent is busy while it exists.
    assert_eq!(
        soft.attach(dev, Some(Pasid(1)), PtId::Hwpt(n))
            .err()
            .and_then(|e| e.errno()),
        Some(libc::EINVAL)
    );
    assert_eq!(
        soft.destroy(parent.0).err().and_then(|e| e.errno()),
        Some(libc::EBUSY)
    );
    soft.destroy(n.0).unwrap();
    soft.destroy(parent.0).unwrap();
}

#[test]
fn second_level_walked_per_access_until_invalidated() {
    let (mem, soft, dev, ioas, parent) = setup();
    let cfg = table(&mem);
    let n = soft
        .hwpt_alloc_second_level(dev, parent, cfg, None, true)
        .unwrap();
    soft.attach(dev, Some(Pasid(2)), PtId::Hwpt(n)).unwrap();
    let req = DmaRequest::default();
    soft.dma_write(dev, Some(Pasid(2)), IOVA + 0x10, b"sl", req)
        .unwrap();
    let mut b = [0u8; 2];
    mem.read_slice(&mut b, GuestAddress(0x80_0010)).unwrap();
    assert_eq!(&b, b"sl");
    // Read-only leaf: writes fault (rights come from the guest table).
    let leaf = slot(0x10_2000, IOVA, 12);
    mem.write_obj(0x80_0000u64 | R, leaf).unwrap();
    soft.hwpt_invalidate(n, &[Invalidation::All]).unwrap();
    assert!(soft
        .dma_write(dev, Some(Pasid(2)), IOVA + 0x10, b"ro", req)
        .is_err());
    soft.dma_read(dev, Some(Pasid(2)), IOVA + 0x10, &mut b, req)
        .unwrap();
    // Cleared without invalidation: the IOTLB keeps serving the old translation.
    mem.write_obj(0u64, leaf).unwrap();
    soft.dma_read(dev, Some(Pasid(2)), IOVA + 0x10, &mut b, req)
        .unwrap();
    soft.hwpt_invalidate(
        n,
        &[Invalidation::Range {
            pasid: None,
            addr: IOVA,
            npages: 1,
            leaf: true,
        }],
    )
    .unwrap();
    assert!(matches!(
        soft.dma_read(dev, Some(Pasid(2)), IOVA + 0x10, &mut b, req),
        Err(DmaError::Fault(f)) if f.reason == crate::FaultReason::NotPresent
    ));
    // Stage 2 under the table: unmapping the table pages from the parent's IOAS makes the
    // walk fault, with no guest invalidation needed.
    mem.write_obj(0x80_0000u64 | R | W, leaf).unwrap();
    soft.hwpt_invalidate(n, &[Invalidation::All]).unwrap();
    soft.dma_read(dev, Some(Pasid(2)), IOVA + 0x10, &mut b, req)
        .unwrap();
    soft.ioas_unmap(ioas, 0x10_0000, 0x3000).unwrap();
    assert!(soft
        .dma_read(dev, Some(Pasid(2)), IOVA + 0x10, &mut b, req)
        .is_err());
}
