//! The vIOMMU bridge on the soft backend, with guest RAM in memory and guest tables built by
//! the test as a guest driver would: the shadow path (map, unmap, invalidate, coalescing,
//! stale-but-inside-RAM, hostile tables), the nested path (with nesting capabilities decoded
//! from a VT-d ECAP), the soft path for emulated devices, and teardown. Every check reads
//! data the "device" (a soft-backend DMA) wrote into guest RAM, or the host mappings the
//! soft backend holds.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use devices::pci::{MsiMessage, PciBdf};
use devices::viommu::linux_harness::{LinuxHarness, Stage};
use devices::viommu::{
    BridgeError, BridgeMode, DomainScope, GuestInvalidation, GuestMemoryAccess, MsiSignal,
    SecondStage, Translation, ViommuBridge, Vtd, VtdConfig,
};
use ioasid::soft::{SoftConfig, SoftIommu};
use ioasid::{
    DevId, DmaError, DmaRequest, HwCaps, Invalidation, IoasId, IommuBackend, Pasid, PtId, VtdStage1,
};
use vm_memory::{Bytes, GuestAddress};
use vmm::device_manager::dma::{map_ram, RamMapMode};
use vmm::memory::{GuestRam, RamConfig};
use vmm::viommu::{BridgeLimits, DevicePath, KvmMsiSignal, VmGuestMemory, VtdBridge};

use common::{assert_msi_handler_ran, run_msi_payload, MSI_VECTOR};

const MIB: u64 = 1 << 20;
const RAM: u64 = 256 * MIB;
/// Guest table pages are allocated from here.
const TABLES: u64 = 16 * MIB;
const TABLES_END: u64 = 32 * MIB;
/// Guest data buffers.
const BUFS: u64 = 64 * MIB;

// Second-level entry bits.
const SL_R: u64 = 1;
const SL_W: u64 = 2;
const PS: u64 = 1 << 7;
// First-stage entry bits.
const S1_P: u64 = 1;
const S1_RW: u64 = 2;
const S1_US: u64 = 4;
const ADDR: u64 = 0x000f_ffff_ffff_f000;

struct Env {
    ram: GuestRam,
    soft: Arc<SoftIommu>,
    bridge: Arc<VtdBridge>,
    next_table: u64,
}

fn env_with(limits: BridgeLimits) -> Env {
    let ram = GuestRam::new(RamConfig {
        size: RAM,
        hugepages: false,
    })
    .unwrap();
    let soft = Arc::new(SoftIommu::from_guest_memory(ram.memory(), SoftConfig::default()).unwrap());
    let ram_ioas = soft.ioas_alloc().unwrap();
    map_ram(&*soft, ram_ioas, ram.regions(), RamMapMode::ByAddress).unwrap();
    let backend: Arc<dyn IommuBackend> = soft.clone();
    let bridge = Arc::new(VtdBridge::with_limits(
        backend,
        ram_ioas,
        ram.regions().to_vec(),
        limits,
    ));
    Env {
        ram,
        soft,
        bridge,
        next_table: TABLES,
    }
}

fn env() -> Env {
    env_with(BridgeLimits::default())
}

fn bdf(s: &str) -> PciBdf {
    s.parse().unwrap()
}

impl Env {
    fn ram_ioas(&self) -> IoasId {
        // The first IOAS the soft backend allocated (see env_with).
        IoasId(1)
    }

    /// An "assigned" device on the VM's backend, attached to the guest-RAM IOAS as the
    /// device manager leaves it.
    fn assigned(&self, at: &str, caps: Option<&HwCaps>) -> (PciBdf, DevId) {
        let dev = self.soft.register_device(at).unwrap();
        self.soft
            .attach(dev, None, PtId::Ioas(self.ram_ioas()))
            .unwrap();
        let b = bdf(at);
        self.bridge.add_assigned(b, dev, caps).unwrap();
        (b, dev)
    }

    fn w64(&self, gpa: u64, v: u64) {
        self.ram.memory().write_obj(v, GuestAddress(gpa)).unwrap();
    }

    fn r64(&self, gpa: u64) -> u64 {
        self.ram.memory().read_obj(GuestAddress(gpa)).unwrap()
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.ram
            .memory()
            .read_slice(&mut v, GuestAddress(gpa))
            .unwrap();
        v
    }

    fn table(&mut self) -> u64 {
        let t = self.next_table;
        assert!(t < TABLES_END, "test table pool exhausted");
        self.next_table += 4096;
        self.ram
            .memory()
            .write_slice(&[0u8; 4096], GuestAddress(t))
            .unwrap();
        t
    }

    /// Installs a leaf for `iova` at `leaf_level` (1: 4 KiB, 2: 2 MiB, 3: 1 GiB) of a
    /// `levels`-level table, with table entries `tflags` and leaf `lflags`.
    #[allow(clippy::too_many_arguments)]
    fn map(
        &mut self,
        root: u64,
        levels: u8,
        iova: u64,
        gpa: u64,
        leaf_level: u8,
        tflags: u64,
        lflags: u64,
    ) {
        let mut table = root;
        for level in ((leaf_level + 1)..=levels).rev() {
            let slot = table + ((iova >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) * 8;
            let e = self.r64(slot);
            table = if e & 7 == 0 {
                let t = self.table();
                self.w64(slot, t | tflags);
                t
            } else {
                e & ADDR
            };
        }
        let slot = table + ((iova >> (12 + 9 * (u32::from(leaf_level) - 1))) & 0x1ff) * 8;
        let ps = if leaf_level > 1 { PS } else { 0 };
        self.w64(slot, gpa | lflags | ps);
    }

    /// Clears the 4 KiB leaf of `iova`.
    fn unmap(&self, root: u64, levels: u8, iova: u64) {
        let mut table = root;
        for level in (2..=levels).rev() {
            let e = self.r64(table + ((iova >> (12 + 9 * (u32::from(level) - 1))) & 0x1ff) * 8);
            table = e & ADDR;
        }
        self.w64(table + ((iova >> 12) & 0x1ff) * 8, 0);
    }

    fn sl_map(&mut self, root: u64, iova: u64, gpa: u64, len: u64) {
        let mut off = 0;
        while off < len {
            self.map(root, 4, iova + off, gpa + off, 1, SL_R | SL_W, SL_R | SL_W);
            off += 4096;
        }
    }

    fn dma_write(&self, dev: DevId, iova: u64, data: &[u8]) -> Result<(), DmaError> {
        self.soft
            .dma_write(dev, None, iova, data, DmaRequest::default())
    }

    /// Every host mapping of every IOAS the bridge made lies inside guest RAM.
    fn assert_shadow_inside_ram(&self, seed: u64) {
        let regions = self.ram.regions();
        for v in self.bridge.devices() {
            if v.mode != BridgeMode::Shadow {
                continue;
            }
            let ioas = IoasId(v.host_pt.unwrap());
            for (iova, len, hva, _) in self.soft.mappings(ioas).unwrap() {
                let inside = regions
                    .iter()
                    .any(|r| hva >= r.host_addr && hva + len <= r.host_addr + r.size);
                assert!(
                    inside,
                    "seed {seed}: shadow IOAS {} maps IOVA {iova:#x}+{len:#x} to HVA {hva:#x}, \
                     outside guest RAM",
                    ioas.0
                );
            }
        }
    }
}

fn sl(root: u64) -> SecondStage {
    SecondStage {
        root,
        levels: 4,
        slee: false,
        slade: false,
    }
}

fn psi(did: u16, addr: u64, npages: u64) -> GuestInvalidation {
    GuestInvalidation::Iotlb {
        scope: DomainScope::Domain(did),
        inv: Invalidation::Range {
            pasid: None,
            addr,
            npages,
            leaf: true,
        },
    }
}

fn domain_inv(did: u16) -> GuestInvalidation {
    GuestInvalidation::Iotlb {
        scope: DomainScope::Domain(did),
        inv: Invalidation::All,
    }
}

#[test]
fn shadow_map_dma_unmap_invalidate() {
    let mut e = env();
    let (b, dev) = e.assigned("00:04.0", None);
    let root = e.table();
    let (x, buf) = (0x8000_0000u64, BUFS + 0x3000);
    e.sl_map(root, x, buf, 4096);
    let mode = e
        .bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::SecondStage {
                did: 7,
                table: sl(root),
            },
        )
        .unwrap();
    assert_eq!(mode, BridgeMode::Shadow);
    // DMA at IOVA X lands in guest buffer B.
    e.dma_write(dev, x + 0x10, b"through the shadow").unwrap();
    assert_eq!(&e.read(buf + 0x10, 18), b"through the shadow");
    // IOVA = GPA no longer works: the device is on the shadow IOAS.
    assert!(e.dma_write(dev, buf, b"gpa").is_err());
    // A second page mapped after the domain exists: visible after its invalidation (caching
    // mode: Linux invalidates after second-stage maps).
    e.sl_map(root, x + 0x1000, BUFS + 0x9000, 4096);
    assert!(e.dma_write(dev, x + 0x1000, b"early").is_err());
    e.bridge.invalidate(&[psi(7, x + 0x1000, 1)]).unwrap();
    e.dma_write(dev, x + 0x1000, b"late").unwrap();
    assert_eq!(&e.read(BUFS + 0x9000, 4), b"late");
    // Unmap without invalidation: the stale mapping stays, still inside guest RAM.
    e.unmap(root, 4, x);
    e.dma_write(dev, x, b"stale").unwrap();
    assert_eq!(&e.read(buf, 5), b"stale");
    e.assert_shadow_inside_ram(0);
    // With the invalidation, the DMA faults.
    e.bridge.invalidate(&[psi(7, x, 1)]).unwrap();
    assert!(matches!(
        e.dma_write(dev, x, b"gone"),
        Err(DmaError::Fault(_))
    ));
    e.dma_write(dev, x + 0x1000, b"kept").unwrap();
    let c = e.bridge.counters();
    assert_eq!(c.shadow_ioases_live, 1);
    assert_eq!(c.guest_invalidations, 2);
    assert_eq!(c.resyncs, 3, "{c:?}");
    let views = e.bridge.devices();
    assert_eq!(views.len(), 1);
    assert_eq!(
        (views[0].mode, views[0].did, views[0].path),
        (BridgeMode::Shadow, Some(7), DevicePath::Assigned)
    );
}

#[test]
fn shadow_coalesces_2m_contiguous_runs() {
    let mut e = env();
    let (b, dev) = e.assigned("00:04.0", None);
    let root = e.table();
    e.bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::SecondStage {
                did: 1,
                table: sl(root),
            },
        )
        .unwrap();
    // 64 MiB of 2 MiB buffers, each physically contiguous, mapped with 4 KiB leaves at
    // consecutive IOVAs but scattered in GPA (reverse order), one invalidation per buffer
    // as Linux sends them, all in one doorbell.
    let iova0 = 0x1_0000_0000u64;
    let mut batch = Vec::new();
    for i in 0..32u64 {
        let gpa = BUFS + (31 - i) * 2 * MIB;
        e.sl_map(root, iova0 + i * 2 * MIB, gpa, 2 * MIB);
        batch.push(psi(1, iova0 + i * 2 * MIB, 512));
    }
    let before = e.bridge.counters();
    e.bridge.invalidate(&batch).unwrap();
    let c = e.bridge.counters();
    let maps = c.shadow_map_calls - before.shadow_map_calls;
    println!("64 MiB of 2 MiB-contiguous buffers: {maps} host map calls (4 KiB baseline: 16384)");
    assert_eq!(maps, 32, "one IOAS_COPY per 2 MiB run");
    assert_eq!(
        c.resyncs - before.resyncs,
        1,
        "one resync per domain per doorbell"
    );
    assert_eq!(e.bridge.shadow_areas(1).len(), 32);
    for i in [0u64, 13, 31] {
        let iova = iova0 + i * 2 * MIB + 0x1f_f000;
        e.dma_write(dev, iova, &i.to_le_bytes()).unwrap();
        assert_eq!(
            e.read(BUFS + (31 - i) * 2 * MIB + 0x1f_f000, 8),
            i.to_le_bytes()
        );
    }
    // Contiguous in GPA too: one run for all 64 MiB.
    let root2 = e.table();
    e.sl_map(root2, iova0, BUFS, 64 * MIB);
    e.bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::SecondStage {
                did: 2,
                table: sl(root2),
            },
        )
        .unwrap();
    assert_eq!(e.bridge.shadow_areas(2).len(), 1);
    // The old domain lost its only user and is gone.
    assert_eq!(e.bridge.counters().shadow_ioases_live, 1);
}

#[test]
fn shadow_page_resync_splits_area_and_keeps_neighbours() {
    let mut e = env();
    let (b, dev) = e.assigned("00:04.0", None);
    let root = e.table();
    let x = 0x4000_0000u64;
    e.sl_map(root, x, BUFS, 2 * MIB);
    // A 2 MiB large leaf elsewhere.
    e.map(
        root,
        4,
        x + 4 * MIB,
        BUFS + 4 * MIB,
        2,
        SL_R | SL_W,
        SL_R | SL_W,
    );
    e.bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::SecondStage {
                did: 3,
                table: sl(root),
            },
        )
        .unwrap();
    assert_eq!(e.bridge.shadow_areas(3).len(), 2);
    e.unmap(root, 4, x + 0x10_0000);
    let before = e.bridge.counters();
    e.bridge.invalidate(&[psi(3, x + 0x10_0000, 1)]).unwrap();
    let c = e.bridge.counters();
    // The whole area went (iommufd cannot split), the two halves came back.
    assert_eq!(c.shadow_unmap_calls - before.shadow_unmap_calls, 1);
    assert_eq!(c.shadow_map_calls - before.shadow_map_calls, 2);
    assert!(matches!(
        e.dma_write(dev, x + 0x10_0000, b"x"),
        Err(DmaError::Fault(_))
    ));
    e.dma_write(dev, x + 0x0f_f000, b"lo").unwrap();
    e.dma_write(dev, x + 0x10_1000, b"hi").unwrap();
    assert_eq!(&e.read(BUFS + 0x10_1000, 2), b"hi");
    // The large leaf was not touched, and a domain invalidation with nothing changed maps
    // and unmaps nothing (diff).
    let before = e.bridge.counters();
    e.bridge.invalidate(&[domain_inv(3)]).unwrap();
    let c = e.bridge.counters();
    assert_eq!(c.shadow_map_calls, before.shadow_map_calls);
    assert_eq!(c.shadow_unmap_calls, before.shadow_unmap_calls);
    e.dma_write(dev, x + 4 * MIB + 0x1234, b"large").unwrap();
    assert_eq!(&e.read(BUFS + 4 * MIB + 0x1234, 5), b"large");
    // Global invalidation after moving the large leaf: only that area is redone.
    e.map(root, 4, x + 4 * MIB, BUFS + 8 * MIB, 2, SL_R | SL_W, SL_R);
    e.bridge
        .invalidate(&[GuestInvalidation::Iotlb {
            scope: DomainScope::All,
            inv: Invalidation::All,
        }])
        .unwrap();
    let d = e.bridge.counters();
    assert_eq!(d.shadow_unmap_calls - c.shadow_unmap_calls, 1);
    assert_eq!(d.shadow_map_calls - c.shadow_map_calls, 1);
    // Read-only now: a device write faults.
    assert!(e.dma_write(dev, x + 4 * MIB, b"ro").is_err());
}

#[test]
fn shadow_blocked_passthrough_and_first_stage_unsupported() {
    let mut e = env();
    let (b, dev) = e.assigned("00:04.0", None);
    assert_eq!(e.bridge.supports_first_stage(b), Some(false));
    assert_eq!(e.bridge.supports_first_stage(bdf("00:1f.0")), None);
    e.dma_write(dev, BUFS, b"pt").unwrap();
    assert_eq!(
        e.bridge
            .set_translation(b, Pasid(0), Translation::Blocked)
            .unwrap(),
        BridgeMode::Blocked
    );
    assert!(e.dma_write(dev, BUFS, b"blocked").is_err());
    assert_eq!(&e.read(BUFS, 2), b"pt");
    e.bridge
        .set_translation(b, Pasid(0), Translation::PassThrough)
        .unwrap();
    e.dma_write(dev, BUFS, b"pt again").unwrap();
    assert_eq!(&e.read(BUFS, 8), b"pt again");
    let root = e.table();
    let err = e
        .bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::FirstStage {
                did: 1,
                table: VtdStage1 {
                    pgtbl_addr: root,
                    addr_width: 48,
                    sre: false,
                    wpe: false,
                    eafe: false,
                },
            },
        )
        .unwrap_err();
    assert!(
        matches!(&err, BridgeError::Unsupported { reason, .. } if reason.contains("cache_tag_flush_range_np")),
        "{err}"
    );
    // A table with a level count the unit never advertises: the domain maps nothing.
    let bad = e.bridge.counters().bad_table_entries;
    e.sl_map(root, 0x1000, BUFS, 4096);
    e.bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::SecondStage {
                did: 1,
                table: SecondStage {
                    levels: 9,
                    ..sl(root)
                },
            },
        )
        .unwrap();
    assert!(e.bridge.shadow_areas(1).is_empty());
    assert_eq!(e.bridge.counters().bad_table_entries, bad + 1);
    assert!(e.dma_write(dev, 0x1000, b"x").is_err());
    // Unknown BDF.
    assert!(matches!(
        e.bridge
            .set_translation(bdf("00:1f.0"), Pasid(0), Translation::PassThrough),
        Err(BridgeError::NoDevice { .. })
    ));
}

#[test]
fn remove_releases_shadow_when_last_user_goes() {
    let mut e = env();
    let (b1, _) = e.assigned("00:04.0", None);
    let (b2, d2) = e.assigned("00:05.0", None);
    let root = e.table();
    e.sl_map(root, 0x1000, BUFS, 4096);
    for b in [b1, b2] {
        e.bridge
            .set_translation(
                b,
                Pasid(0),
                Translation::SecondStage {
                    did: 9,
                    table: sl(root),
                },
            )
            .unwrap();
    }
    assert_eq!(
        e.bridge.counters().shadow_ioases_live,
        1,
        "one IOAS per domain"
    );
    let r1 = e.bridge.remove(b1).unwrap();
    assert_eq!(r1.shadow_ioases, 0);
    assert!(r1.errors.is_empty(), "{:?}", r1.errors);
    e.dma_write(d2, 0x1000, b"still").unwrap();
    let r2 = e.bridge.remove(b2).unwrap();
    assert_eq!(r2.shadow_ioases, 1);
    let c = e.bridge.counters();
    assert_eq!(
        (
            c.shadow_ioases_live,
            c.nested_hwpts_live,
            c.nest_parents_live
        ),
        (0, 0, 0)
    );
    assert!(e.bridge.devices().is_empty());
    assert!(matches!(
        e.bridge.remove(b2),
        Err(BridgeError::NoDevice { .. })
    ));
    // Nothing of the shadow is left in the backend: only the guest-RAM IOAS maps anything.
    assert!(e.soft.mappings(IoasId(1)).unwrap().len() == 1);
}

fn vtd_nesting_caps() -> HwCaps {
    // ECAP with QI, PT, PASID (20 bits), NEST, SLTS and FLTS: a nesting-capable VT-d.
    let ecap: u64 =
        (1 << 1) | (1 << 6) | (19 << 35) | (1 << 40) | (1 << 26) | (1 << 46) | (1 << 47);
    let mut blob = vec![0u8; 8];
    blob.extend_from_slice(&0u64.to_le_bytes());
    blob.extend_from_slice(&ecap.to_le_bytes());
    HwCaps::decode(1, &blob, 0, 20)
}

fn s1(root: u64) -> VtdStage1 {
    VtdStage1 {
        pgtbl_addr: root,
        addr_width: 48,
        sre: false,
        wpe: false,
        eafe: false,
    }
}

#[test]
fn nested_path_replaces_hwpt_and_batches_invalidations() {
    let mut e = env();
    let caps = vtd_nesting_caps();
    assert!(caps.supports_nesting());
    let (b, dev) = e.assigned("00:06.0", Some(&caps));
    assert_eq!(e.bridge.supports_first_stage(b), Some(true));
    let (t1, t2) = (e.table(), e.table());
    let f = S1_P | S1_RW | S1_US;
    e.map(t1, 4, 0x20_0000, BUFS, 1, f, f);
    e.map(t2, 4, 0x20_0000, BUFS + 0x1000, 1, f, f);
    let mode = e
        .bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::FirstStage {
                did: 4,
                table: s1(t1),
            },
        )
        .unwrap();
    assert_eq!(mode, BridgeMode::Nested);
    e.dma_write(dev, 0x20_0000, b"one").unwrap();
    assert_eq!(&e.read(BUFS, 3), b"one");
    // The PASID entry changes: a new nested HWPT replaces the old one.
    e.bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::FirstStage {
                did: 4,
                table: s1(t2),
            },
        )
        .unwrap();
    e.dma_write(dev, 0x20_0000, b"two").unwrap();
    assert_eq!(&e.read(BUFS + 0x1000, 3), b"two");
    let c = e.bridge.counters();
    assert_eq!((c.nested_hwpts_live, c.nest_parents_live), (1, 1));
    // Guest unmaps; the soft IOTLB keeps the translation until the invalidation, which
    // three descriptors of one doorbell turn into one host call.
    e.unmap(t2, 4, 0x20_0000);
    e.dma_write(dev, 0x20_0000, b"tlb").unwrap();
    e.bridge
        .invalidate(&[
            psi(4, 0x20_0000, 1),
            psi(4, 0x40_0000, 2),
            psi(5, 0, 1),
            GuestInvalidation::DeviceTlb {
                bdf: b,
                pasid: None,
                addr: 0x20_0000,
                npages: 1,
            },
        ])
        .unwrap();
    assert_eq!(e.bridge.counters().host_invalidation_calls, 1);
    assert!(e.dma_write(dev, 0x20_0000, b"gone").is_err());
    // PASID 1 gets its own nested HWPT (IOMMU_HWPT_ALLOC_PASID, attach with a PASID).
    e.map(t1, 4, 0x30_0000, BUFS + 0x2000, 1, f, f);
    e.bridge
        .set_translation(
            b,
            Pasid(1),
            Translation::FirstStage {
                did: 6,
                table: s1(t1),
            },
        )
        .unwrap();
    e.soft
        .dma_write(
            dev,
            Some(Pasid(1)),
            0x30_0000,
            b"pasid",
            DmaRequest::default(),
        )
        .unwrap();
    assert_eq!(&e.read(BUFS + 0x2000, 5), b"pasid");
    assert_eq!(e.bridge.counters().pasids_live, 1);
    let rel = e.bridge.remove(b).unwrap();
    assert_eq!(
        (rel.nested_hwpts, rel.nest_parents, rel.pasids),
        (2, 1, 1),
        "{rel:?}"
    );
    let c = e.bridge.counters();
    assert_eq!(
        (c.nested_hwpts_live, c.nest_parents_live, c.pasids_live),
        (0, 0, 0)
    );
}

#[test]
fn soft_path_walks_guest_tables_per_access() {
    let mut e = env();
    let dev = e.soft.register_device("emulated").unwrap();
    let b = bdf("00:07.0");
    let view = e.bridge.add_emulated(b, e.soft.clone(), dev).unwrap();
    // Pass-through first.
    view.write(None, BUFS, b"gpa").unwrap();
    assert_eq!(&e.read(BUFS, 3), b"gpa");
    // Second stage, walked per access (no shadow IOAS).
    let root = e.table();
    e.sl_map(root, 0x7000_0000, BUFS + 0x5000, 4096);
    let mode = e
        .bridge
        .set_translation(
            b,
            Pasid(0),
            Translation::SecondStage {
                did: 2,
                table: sl(root),
            },
        )
        .unwrap();
    assert_eq!(mode, BridgeMode::Soft);
    assert_eq!(e.bridge.counters().shadow_ioases_live, 0);
    view.write(None, 0x7000_0010, b"soft sl").unwrap();
    assert_eq!(&e.read(BUFS + 0x5010, 7), b"soft sl");
    e.unmap(root, 4, 0x7000_0000);
    // Cached until invalidated, as on hardware.
    view.write(None, 0x7000_0010, b"cached").unwrap();
    e.bridge.invalidate(&[psi(2, 0x7000_0000, 1)]).unwrap();
    assert!(view.write(None, 0x7000_0010, b"gone").is_err());
    // First stage on PASID 3.
    let t = e.table();
    let f = S1_P | S1_RW | S1_US;
    e.map(t, 4, 0x1000, BUFS + 0x6000, 1, f, f);
    e.bridge
        .set_translation(
            b,
            Pasid(3),
            Translation::FirstStage {
                did: 8,
                table: s1(t),
            },
        )
        .unwrap();
    view.write(Some(Pasid(3)), 0x1008, b"soft s1").unwrap();
    assert_eq!(&e.read(BUFS + 0x6008, 7), b"soft s1");
    // Blocked: faults.
    e.bridge
        .set_translation(b, Pasid(3), Translation::Blocked)
        .unwrap();
    assert!(view.write(Some(Pasid(3)), 0x1008, b"x").is_err());
    let c = e.bridge.counters();
    assert_eq!((c.nested_hwpts_live, c.nest_parents_live), (1, 1));
    let rel = e.bridge.remove(b).unwrap();
    assert!(rel.errors.is_empty(), "{:?}", rel.errors);
    assert_eq!((rel.nested_hwpts, rel.nest_parents), (1, 1));
    assert!(view.write(None, 0x7000_0010, b"after").is_err());
    let c = e.bridge.counters();
    assert_eq!((c.nested_hwpts_live, c.nest_parents_live), (0, 0));
}

/// xorshift64*: a small seeded generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A random entry: a pointer to one of the test's table pages (loops included), a pointer or
/// leaf outside RAM, a leaf inside RAM, a large leaf with random reserved bits, or nothing.
fn hostile_entry(r: &mut Rng, pages: &[u64]) -> u64 {
    let rights = r.below(4) & 3;
    match r.below(7) {
        0 => 0,
        1 | 2 => pages[r.below(pages.len() as u64) as usize] | rights.max(1),
        3 => (r.next() & ADDR) | rights,
        4 => (r.below(RAM) & !0xfff) | rights.max(1),
        5 => (r.next() & ADDR) | PS | rights.max(1),
        _ => (r.below(RAM) & !0x1f_ffff) | PS | rights.max(1) | (r.next() & 0x1f_f000),
    }
}

#[test]
fn shadow_hostile_tables_never_map_outside_ram() {
    let seed = std::env::var("VIOMMU_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    println!("shadow_hostile_tables_never_map_outside_ram: seed {seed} (VIOMMU_SEED to replay)");
    let mut e = env_with(BridgeLimits {
        max_scan_steps: 4096,
    });
    let (b, dev) = e.assigned("00:04.0", None);
    let pages: Vec<u64> = (0..6).map(|_| e.table()).collect();
    let mut r = Rng(seed);
    for case in 0..48u64 {
        for _ in 0..(64 + r.below(256)) {
            let p = pages[r.below(pages.len() as u64) as usize];
            e.w64(p + 8 * r.below(512), hostile_entry(&mut r, &pages));
        }
        let root = match r.below(8) {
            0 => r.next() & ADDR,
            _ => pages[r.below(pages.len() as u64) as usize],
        };
        let table = SecondStage {
            root,
            levels: 3 + r.below(3) as u8,
            slee: false,
            slade: false,
        };
        let did = r.below(3) as u16;
        let _ = e
            .bridge
            .set_translation(b, Pasid(0), Translation::SecondStage { did, table });
        e.assert_shadow_inside_ram(seed);
        for _ in 0..4 {
            let inv = match r.below(4) {
                0 => domain_inv(did),
                1 => GuestInvalidation::Iotlb {
                    scope: DomainScope::All,
                    inv: Invalidation::All,
                },
                2 => psi(did, r.next() & ADDR, u64::MAX - r.below(3)),
                _ => psi(did, r.next() & 0xff_ffff_f000, 1 + r.below(1 << 20)),
            };
            let _ = e.bridge.invalidate(&[inv]);
            e.assert_shadow_inside_ram(seed);
            // Random device DMA: whatever it reaches is guest RAM (the soft backend would
            // fault otherwise; the mapping check above is what the bridge guarantees).
            let _ = e.dma_write(dev, r.next() & 0xffff_ffff_f000, &case.to_le_bytes());
            for p in 0..4 {
                let page = pages[r.below(pages.len() as u64) as usize];
                e.w64(page + 8 * r.below(512), hostile_entry(&mut r, &pages) | p);
            }
        }
    }
    let c = e.bridge.counters();
    println!("seed {seed}: {c:?}");
    assert!(
        c.bad_table_entries > 0,
        "the hostile tables were never hostile"
    );
    // The bridge never even asked the host to map something it should not have.
    assert_eq!(c.host_errors, 0, "seed {seed}: {c:?}");
    let rel = e.bridge.remove(b).unwrap();
    assert!(rel.errors.is_empty(), "seed {seed}: {:?}", rel.errors);
    assert_eq!(e.bridge.counters().shadow_ioases_live, 0);
}

/// Records the model's own MSIs.
#[derive(Default)]
struct Msis(Mutex<Vec<MsiMessage>>);

impl MsiSignal for Msis {
    fn signal(&self, msg: MsiMessage) {
        self.0.lock().unwrap().push(msg);
    }
}

/// The model programmed as Linux's intel-iommu does (boot, attach, map, unmap, teardown),
/// wired to the bridge: an emulated device on the soft path and an "assigned" one on the
/// shadow path. DMA at IOVA X lands in guest buffer B; after unmap and its invalidation it
/// faults.
#[test]
fn viommu_harness_linux_sequence() {
    let e = env();
    let mem: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(e.ram.memory().clone()));
    let bridge: Arc<dyn ViommuBridge> = e.bridge.clone();
    let msis = Arc::new(Msis::default());
    let mut vtd = Vtd::new(VtdConfig::default(), mem.clone(), bridge, msis.clone()).unwrap();
    // The emulated device (soft path) and an assigned one (shadow path).
    let emu = bdf("00:03.0");
    let dev = e.soft.register_device("emulated").unwrap();
    let view = e.bridge.add_emulated(emu, e.soft.clone(), dev).unwrap();
    let (asg, adev) = e.assigned("00:05.0", None);
    vtd.add_device(emu);
    vtd.add_device(asg);
    let mut h = LinuxHarness::new(mem, TABLES..TABLES_END);

    h.boot(&mut vtd).unwrap();
    // Translation on, nothing attached: every DMA is blocked.
    assert!(view.write(None, BUFS, b"boot").is_err());
    assert!(e.dma_write(adev, BUFS, b"boot").is_err());
    assert_eq!(&e.read(BUFS, 4), &[0u8; 4]);

    let did = h.attach(&mut vtd, emu, Stage::Second).unwrap();
    let adid = h.attach(&mut vtd, asg, Stage::Second).unwrap();
    let modes: Vec<(PciBdf, BridgeMode, Option<u16>)> = e
        .bridge
        .devices()
        .iter()
        .map(|v| (v.bdf, v.mode, v.did))
        .collect();
    assert_eq!(
        modes,
        vec![
            (emu, BridgeMode::Soft, Some(did)),
            (asg, BridgeMode::Shadow, Some(adid))
        ]
    );

    let (x, b) = (0x10_0000u64, BUFS + 0x20_0000);
    h.map(&mut vtd, emu, x, b, 0x3000).unwrap();
    h.map(&mut vtd, asg, x, b + 0x10_0000, 0x3000).unwrap();
    view.write(None, x + 0x1008, b"emulated DMA at X").unwrap();
    assert_eq!(&e.read(b + 0x1008, 17), b"emulated DMA at X");
    let mut back = [0u8; 17];
    view.read(None, x + 0x1008, &mut back).unwrap();
    assert_eq!(&back, b"emulated DMA at X");
    e.dma_write(adev, x + 0x2010, b"assigned DMA at X").unwrap();
    assert_eq!(&e.read(b + 0x10_2010, 17), b"assigned DMA at X");
    let c = e.bridge.counters();
    assert_eq!(
        c.shadow_map_calls, 1,
        "three contiguous pages, one IOAS_COPY: {c:?}"
    );

    h.unmap(&mut vtd, emu, x, 0x3000).unwrap();
    h.unmap(&mut vtd, asg, x, 0x3000).unwrap();
    assert!(matches!(
        view.write(None, x + 0x1008, b"after unmap"),
        Err(DmaError::Fault(_))
    ));
    assert!(matches!(
        e.dma_write(adev, x + 0x2010, b"after unmap"),
        Err(DmaError::Fault(_))
    ));
    assert_eq!(&e.read(b + 0x1008, 17), b"emulated DMA at X");
    assert!(e.bridge.shadow_areas(adid).is_empty());

    // A burst as Linux sends it: 64 MiB of 2 MiB buffers, each physically contiguous but
    // scattered in GPA, each map followed by its invalidation (one doorbell per map).
    let before = e.bridge.counters();
    for i in 0..32u64 {
        let gpa = BUFS + (31 - i) * 2 * MIB;
        h.map(&mut vtd, asg, 0x4000_0000 + i * 2 * MIB, gpa, 2 * MIB)
            .unwrap();
    }
    let c = e.bridge.counters();
    let maps = c.shadow_map_calls - before.shadow_map_calls;
    println!(
        "through the model: 64 MiB in 2 MiB buffers took {maps} host map calls over {} \
         doorbells (4 KiB baseline: 16384)",
        c.doorbells - before.doorbells
    );
    assert_eq!(maps, 32);
    assert_eq!(c.shadow_unmap_calls, before.shadow_unmap_calls);
    e.dma_write(adev, 0x4000_0000 + 31 * 2 * MIB + 8, b"last")
        .unwrap();
    assert_eq!(&e.read(BUFS + 8, 4), b"last");

    h.teardown(&mut vtd, emu).unwrap();
    h.teardown(&mut vtd, asg).unwrap();
    assert!(e
        .bridge
        .devices()
        .iter()
        .all(|v| v.mode == BridgeMode::Blocked));
    assert!(!h.queue_error(&mut vtd));
    let model = vtd.counters();
    assert_eq!(model.faults_recorded, 0, "{model:?}");
    let c = e.bridge.counters();
    assert_eq!((c.shadow_ioases_live, c.nested_hwpts_live), (0, 0), "{c:?}");
    assert!(c.guest_invalidations > 0 && c.resyncs > 0, "{c:?}");
    for b in [emu, asg] {
        vtd.remove_device(b);
        let rel = e.bridge.remove(b).unwrap();
        assert!(rel.errors.is_empty(), "{:?}", rel.errors);
    }
    let c = e.bridge.counters();
    assert_eq!((c.nest_parents_live, c.pasids_live), (0, 0), "{c:?}");
    assert!(
        msis.0.lock().unwrap().is_empty(),
        "no fault events expected"
    );
}

/// The model's own interrupts (fault event, invalidation completion) go through
/// `KVM_SIGNAL_MSI`: a long-mode payload on this host's KVM takes one in its handler.
#[test]
fn viommu_msi_signal_reaches_guest_handler() {
    let name = "viommu_msi_signal_reaches_guest_handler";
    let Some((pvm, out, _)) = run_msi_payload(
        name,
        |vm| KvmMsiSignal::new(vm.vm_fd().clone()),
        |msi| {
            msi.signal(MsiMessage {
                address: 0xfee0_0000,
                data: u32::from(MSI_VECTOR),
            })
        },
    ) else {
        return;
    };
    assert_msi_handler_ran(name, &pvm, &out);
}
