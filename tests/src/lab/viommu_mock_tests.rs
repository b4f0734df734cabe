//! The vIOMMU bridge on real kernels. On the kernel's selftest mock IOMMU, the nested path:
//! guest PASID-entry changes become nested HWPT allocations and replaces, guest IOTLB
//! invalidations become `HWPT_INVALIDATE` batches (one per nested HWPT per doorbell), checked
//! with the mock's own `IOMMU_TEST_OP_MD_CHECK_IOTLB` and `IOMMU_TEST_OP_PASID_CHECK_HWPT`;
//! removal releases every host object. On QEMU's VT-d (no nesting) with edu, the shadow path
//! on a "VM without vCPUs": the guest's second-stage table (written into guest RAM by the
//! test) maps IOVA X to buffer B, and edu's DMA at X lands in B (through `IOAS_COPY` into the
//! shadow IOAS); after unmap and invalidation it does not; a missing invalidation leaves a
//! stale mapping that still points inside guest RAM.

use std::fs::File;
use std::sync::Arc;

use devices::pci::PciBdf;
use devices::viommu::{
    BridgeMode, DomainScope, GuestInvalidation, SecondStage, Translation, ViommuBridge,
};
use ioasid::iommufd::selftest::{MockDevice, MOCK_FLAGS_DEVICE_PASID};
use ioasid::{HwInfo, HwptId, Invalidation, IommuBackend, IommufdBackend, Pasid, VtdStage1};
use vmm::memory::RamRegion;
use vmm::viommu::{selftest_iotlb_tag, VtdBridge};

use super::env::pattern;
use super::pdev_fixture::{Assigned, EduBus, Iommu, Kind, LEN, RAM_LAYOUT, SRC_GPA};
use crate::edu::EDU_BUF;

use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The vIOMMU bridge's lab tests: the nested path on the mock, the shadow path on QEMU's
/// VT-d with edu.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "viommu_nested_bridge_mock",
            run: viommu_nested_bridge_mock,
        },
        LabTest {
            name: "viommu_bridge_shadow_edu_dma",
            run: viommu_bridge_shadow_edu_dma,
        },
        LabTest {
            name: "viommu_bridge_shadow_unmap_blocks_dma",
            run: viommu_bridge_shadow_unmap_blocks_dma,
        },
        LabTest {
            name: "viommu_bridge_missing_invalidation_stays_in_ram",
            run: viommu_bridge_missing_invalidation_stays_in_ram,
        },
    ]
}

fn s(e: impl std::error::Error) -> String {
    chain(&e)
}

// ---- the shadow path on QEMU's VT-d (no nesting) with edu ---------------------------------

/// Guest IOVA X: in the hole between the RAM regions (not a GPA, so nothing maps it unless
/// the shadow does), below edu's 28-bit DMA mask.
const X: u64 = 0x0800_0000;
/// Guest buffer B (region 1).
const B: u64 = 0x0c20_0000;
/// The guest's second-stage table pages (region 0).
const SL_TABLES: u64 = 0x0100_0000;
const DID: u16 = 5;

/// edu assigned on iommufd with guest RAM mapped at IOVA = GPA, a bridge over that IOAS, and
/// the guest's second-stage table mapping `[X, X + 8 KiB)` to B (4-level, 4 KiB leaves).
struct Shadow {
    a: Assigned,
    bridge: VtdBridge,
    root: u64,
}

fn shadow_fixture() -> Result<Shadow, String> {
    let a = Assigned::edu(Kind::Iommufd, Some(&RAM_LAYOUT), Arc::default())?;
    let ram = a.ram()?;
    let memfd = Arc::new(
        File::open(format!("/proc/self/fd/{}", ram.fd()))
            .map_err(|e| format!("reopen of the RAM memfd: {e}"))?,
    );
    let regions: Vec<RamRegion> = ram
        .regions()
        .iter()
        .map(|r| RamRegion {
            gpa: r.gpa,
            size: r.len,
            host_addr: r.host_addr(),
            memfd: memfd.clone(),
            file_offset: r.file_offset,
        })
        .collect();
    let Iommu::Iommufd(b, dev) = &a.iommu else {
        return Err("edu is not on iommufd".to_string());
    };
    let caps = b.hw_info(*dev).map_err(s)?;
    ensure!(
        !caps.supports_nesting(),
        "this lab's VT-d nests: the shadow test expects it not to"
    );
    let backend: Arc<dyn IommuBackend> = b.clone();
    let bridge = VtdBridge::new(backend, a.ioas, regions);
    bridge.add_assigned(a.bdf, *dev, Some(&caps)).map_err(s)?;
    // The guest's table: root -> L3 -> L2 -> L1, two leaves X -> B, X + 4K -> B + 4K.
    let (root, l3, l2, l1) = (
        SL_TABLES,
        SL_TABLES + 0x1000,
        SL_TABLES + 0x2000,
        SL_TABLES + 0x3000,
    );
    let rw = 3u64;
    let e = |gpa: u64, v: u64| ram.write(gpa, &v.to_le_bytes()).map_err(s);
    e(root + ((X >> 39) & 511) * 8, l3 | rw)?;
    e(l3 + ((X >> 30) & 511) * 8, l2 | rw)?;
    e(l2 + ((X >> 21) & 511) * 8, l1 | rw)?;
    e(l1 + ((X >> 12) & 511) * 8, B | rw)?;
    e(l1 + (((X >> 12) + 1) & 511) * 8, (B + 0x1000) | rw)?;
    Ok(Shadow { a, bridge, root })
}

impl Shadow {
    fn translate(&self) -> Result<(), String> {
        let mode = self
            .bridge
            .set_translation(
                self.a.bdf,
                Pasid(0),
                Translation::SecondStage {
                    did: DID,
                    table: SecondStage {
                        root: self.root,
                        levels: 4,
                        slee: false,
                        slade: false,
                    },
                },
            )
            .map_err(s)?;
        ensure!(mode == BridgeMode::Shadow, "mode {mode:?}, want shadow");
        Ok(())
    }

    /// Clears the guest's leaf for X (the guest unmaps; no invalidation yet).
    fn guest_unmap_x(&self) -> Result<(), String> {
        let l1 = SL_TABLES + 0x3000;
        self.a
            .ram()?
            .write(l1 + ((X >> 12) & 511) * 8, &0u64.to_le_bytes())
            .map_err(s)
    }

    fn teardown(self) -> TestResult {
        let rel = self.bridge.remove(self.a.bdf).map_err(s)?;
        ensure!(rel.errors.is_empty(), "teardown: {:?}", rel.errors);
        let c = self.bridge.counters();
        ensure!(
            rel.shadow_ioases == 1 && c.shadow_ioases_live == 0,
            "shadow IOAS not released: {rel:?} {c:?}"
        );
        Ok(Outcome::Pass)
    }
}

/// Loads edu's buffer with a pattern from RAM (pass-through, before translation is on).
fn load_edu(sh: &Shadow, edu: &EduBus<'_>, seed: u8) -> Result<Vec<u8>, String> {
    let want = pattern(seed, LEN);
    sh.a.ram()?.write(SRC_GPA, &want).map_err(s)?;
    edu.dma(SRC_GPA, EDU_BUF, LEN, false)?;
    Ok(want)
}

fn viommu_bridge_shadow_edu_dma() -> TestResult {
    let sh = shadow_fixture()?;
    let edu = sh.a.bring_up()?;
    let want = load_edu(&sh, &edu, 0x3c)?;
    sh.translate()?;
    let ram = sh.a.ram()?;
    ram.fill(B - 64, LEN + 0x1000 + 128, 0xee).map_err(s)?;
    // edu DMA at guest IOVA X + 0x800 (crossing into the second page) lands in B + 0x800.
    edu.dma(EDU_BUF, X + 0x800, LEN, true)?;
    let got = ram.read(B + 0x800, LEN).map_err(s)?;
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        return Err(format!(
            "byte {i} at GPA {:#x} is {:#04x}, want {:#04x} (edu DMA at IOVA {:#x})",
            B + 0x800 + i as u64,
            got[i],
            want[i],
            X + 0x800
        ));
    }
    let c = sh.bridge.counters();
    ensure!(
        c.shadow_map_calls == 1,
        "two contiguous guest pages took {} IOAS_COPY calls",
        c.shadow_map_calls
    );
    // IOVA = GPA no longer reaches RAM: B is not mapped at IOVA B in the shadow.
    let before = ram.digest();
    edu.dma(EDU_BUF, B, LEN, true)?;
    ensure!(
        ram.digest() == before,
        "a DMA to IOVA {B:#x} (a GPA the guest did not map) changed guest RAM"
    );
    sh.teardown()
}

fn viommu_bridge_shadow_unmap_blocks_dma() -> TestResult {
    let sh = shadow_fixture()?;
    let edu = sh.a.bring_up()?;
    load_edu(&sh, &edu, 0x51)?;
    sh.translate()?;
    sh.guest_unmap_x()?;
    sh.bridge
        .invalidate(&[GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(DID),
            inv: Invalidation::Range {
                pasid: None,
                addr: X,
                npages: 1,
                leaf: true,
            },
        }])
        .map_err(s)?;
    let ram = sh.a.ram()?;
    let before = ram.digest();
    edu.dma(EDU_BUF, X, LEN, true)?;
    ensure!(
        ram.digest() == before,
        "a DMA to IOVA {X:#x} after unmap + invalidation changed guest RAM"
    );
    // The other page stays mapped.
    ram.fill(B + 0x1000, LEN, 0xee).map_err(s)?;
    edu.dma(EDU_BUF, X + 0x1000, LEN, true)?;
    ensure!(
        ram.read(B + 0x1000, 16).map_err(s)? == pattern(0x51, 16),
        "the page next to the unmapped one lost its mapping"
    );
    sh.teardown()
}

fn viommu_bridge_missing_invalidation_stays_in_ram() -> TestResult {
    let sh = shadow_fixture()?;
    let edu = sh.a.bring_up()?;
    let want = load_edu(&sh, &edu, 0x77)?;
    sh.translate()?;
    // The guest unmaps X and points its leaf outside RAM, without invalidating: the stale
    // shadow mapping may stay, and it still points at B, inside guest RAM.
    let l1 = SL_TABLES + 0x3000;
    let ram = sh.a.ram()?;
    ram.write(
        l1 + ((X >> 12) & 511) * 8,
        &(0x7_0000_0000u64 | 3).to_le_bytes(),
    )
    .map_err(s)?;
    ram.fill(B, LEN, 0xee).map_err(s)?;
    edu.dma(EDU_BUF, X, LEN, true)?;
    ensure!(
        ram.read(B, LEN).map_err(s)? == want,
        "the stale mapping did not reach B (the shadow changed without an invalidation)"
    );
    // Once the guest invalidates, the bad leaf is skipped (never mapped) and reported.
    sh.bridge
        .invalidate(&[GuestInvalidation::Iotlb {
            scope: DomainScope::All,
            inv: Invalidation::All,
        }])
        .map_err(s)?;
    let c = sh.bridge.counters();
    ensure!(
        c.bad_table_entries >= 1 && c.host_errors == 0,
        "the leaf outside RAM was not skipped and reported: {c:?}"
    );
    let before = ram.digest();
    edu.dma(EDU_BUF, X, LEN, true)?;
    ensure!(
        ram.digest() == before,
        "a DMA to IOVA {X:#x}, whose guest leaf points outside RAM, changed guest RAM"
    );
    sh.teardown()
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

fn psi(did: u16, addr: u64) -> GuestInvalidation {
    GuestInvalidation::Iotlb {
        scope: DomainScope::Domain(did),
        inv: Invalidation::Range {
            pasid: None,
            addr,
            npages: 1,
            leaf: true,
        },
    }
}

/// The nested HWPT the bridge attached (bdf, pasid) to.
fn hwpt_of(bridge: &VtdBridge, bdf: PciBdf, pasid: Pasid) -> Result<HwptId, String> {
    bridge
        .devices()
        .into_iter()
        .find(|v| v.bdf == bdf && v.pasid == pasid && v.mode == BridgeMode::Nested)
        .and_then(|v| v.host_pt)
        .map(HwptId)
        .ok_or_else(|| format!("{bdf} {pasid} is not nested: {:?}", bridge.devices()))
}

/// Whether every mock IOTLB slot of `hwpt` holds `want`, else which do not.
fn slots(b: &IommufdBackend, hwpt: HwptId, want: [u32; 4]) -> Result<(), String> {
    let st = b.selftest();
    for (slot, v) in want.iter().enumerate() {
        ensure!(
            st.check_iotlb(hwpt, slot as u32, *v).map_err(s)?,
            "mock IOTLB slot {slot} of nested HWPT {} does not hold {v:#x}",
            hwpt.0
        );
    }
    Ok(())
}

fn viommu_nested_bridge_mock() -> TestResult {
    let b = Arc::new(IommufdBackend::open().map_err(s)?);
    let ioas = b.ioas_alloc().map_err(s)?;
    let mock: MockDevice = b
        .selftest()
        .mock_domain(ioas, MOCK_FLAGS_DEVICE_PASID)
        .map_err(s)?;
    let caps = b.hw_info(mock.dev).map_err(s)?;
    ensure!(
        matches!(caps.info, HwInfo::Selftest { .. }),
        "mock caps: {:?}",
        caps.info
    );
    let backend: Arc<dyn IommuBackend> = b.clone();
    // The nested path needs no guest RAM: the guest's first-stage table is the mock's tag.
    let bridge = VtdBridge::new(backend, ioas, Vec::new());
    let bdf: PciBdf = "00:04.0".parse().map_err(s)?;
    bridge.add_assigned(bdf, mock.dev, Some(&caps)).map_err(s)?;

    // The guest's PASID entry for RID_PASID: a nested HWPT bound to its first-stage table.
    let (t1, t2) = (s1(0x1234_5000), s1(0x2345_6000));
    let mode = bridge
        .set_translation(bdf, Pasid(0), Translation::FirstStage { did: 1, table: t1 })
        .map_err(s)?;
    ensure!(mode == BridgeMode::Nested, "mode {mode:?}");
    let n1 = hwpt_of(&bridge, bdf, Pasid(0))?;
    let tag1 = selftest_iotlb_tag(&t1);
    slots(&b, n1, [tag1; 4])?;

    // The entry changes: a new nested HWPT replaces the old one, which is destroyed.
    bridge
        .set_translation(bdf, Pasid(0), Translation::FirstStage { did: 1, table: t2 })
        .map_err(s)?;
    let n2 = hwpt_of(&bridge, bdf, Pasid(0))?;
    ensure!(
        n2 != n1,
        "the PASID-entry change did not allocate a new HWPT"
    );
    let tag2 = selftest_iotlb_tag(&t2);
    slots(&b, n2, [tag2; 4])?;
    ensure!(
        !b.selftest().check_iotlb(n1, 0, tag1).unwrap_or(false),
        "the replaced nested HWPT {} is still alive",
        n1.0
    );
    let c = bridge.counters();
    ensure!(
        c.nested_hwpts_live == 1 && c.nest_parents_live == 1,
        "live objects after replace: {c:?}"
    );

    // A page-selective invalidation of page 1: one HWPT_INVALIDATE, mock slot 1 flushed.
    bridge.invalidate(&[psi(1, 0x1000)]).map_err(s)?;
    slots(&b, n2, [tag2, 0, tag2, tag2])?;
    // Three descriptors of one doorbell (pages 2 and 3, and a device-TLB one): one call.
    let before = bridge.counters().host_invalidation_calls;
    bridge
        .invalidate(&[
            psi(1, 0x2000),
            psi(1, 0x3000),
            GuestInvalidation::DeviceTlb {
                bdf,
                pasid: None,
                addr: 0x2000,
                npages: 1,
            },
        ])
        .map_err(s)?;
    let calls = bridge.counters().host_invalidation_calls - before;
    ensure!(calls == 1, "{calls} host calls for one doorbell");
    slots(&b, n2, [tag2, 0, 0, 0])?;
    // Another domain's invalidation does not reach this HWPT.
    bridge.invalidate(&[psi(2, 0)]).map_err(s)?;
    slots(&b, n2, [tag2, 0, 0, 0])?;
    // A domain-wide one flushes everything.
    bridge
        .invalidate(&[GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(1),
            inv: Invalidation::All,
        }])
        .map_err(s)?;
    slots(&b, n2, [0; 4])?;

    // PASID 5: its own nested HWPT (IOMMU_HWPT_ALLOC_PASID), attached to the PASID.
    let p = Pasid(5);
    bridge
        .set_translation(bdf, p, Translation::FirstStage { did: 3, table: t1 })
        .map_err(s)?;
    let n3 = hwpt_of(&bridge, bdf, p)?;
    // The host PASID the VM's PASID space gave guest PASID 5 (vSVA: not the guest's value).
    let host = |bridge: &VtdBridge| {
        bridge
            .pasid_space()
            .lock()
            .map_err(|e| e.to_string())?
            .translate(mock.dev, p)
            .ok_or_else(|| "PASID 5 has no host PASID".to_string())
    };
    let hp = host(&bridge)?;
    ensure!(
        b.selftest().pasid_check_hwpt(&mock, hp, n3).map_err(s)?,
        "PASID 5 (host {hp}) is not attached to nested HWPT {}",
        n3.0
    );
    slots(&b, n3, [tag1; 4])?;
    bridge
        .set_translation(bdf, p, Translation::Blocked)
        .map_err(s)?;
    ensure!(
        b.selftest()
            .pasid_check_hwpt(&mock, hp, HwptId(0))
            .map_err(s)?,
        "PASID 5 still attached after the guest cleared its entry"
    );
    bridge
        .set_translation(bdf, p, Translation::FirstStage { did: 3, table: t2 })
        .map_err(s)?;
    let hp = host(&bridge)?;

    // Removal: every nested HWPT, the nest parent and the PASID are released.
    let rel = bridge.remove(bdf).map_err(s)?;
    ensure!(rel.errors.is_empty(), "teardown errors: {:?}", rel.errors);
    ensure!(
        rel.nested_hwpts == 2 && rel.nest_parents == 1 && rel.pasids == 1,
        "released {rel:?}"
    );
    let c = bridge.counters();
    ensure!(
        c.nested_hwpts_live == 0 && c.nest_parents_live == 0 && c.pasids_live == 0,
        "live objects after remove: {c:?}"
    );
    ensure!(
        b.selftest()
            .pasid_check_hwpt(&mock, hp, HwptId(0))
            .map_err(s)?,
        "PASID 5 still attached after remove"
    );
    Ok(Outcome::Pass)
}
