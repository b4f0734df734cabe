//! The vIOMMU bridge's nested path on the kernel's selftest mock IOMMU: guest PASID-entry
//! changes become nested HWPT allocations and replaces, guest IOTLB invalidations become
//! `HWPT_INVALIDATE` batches (one per nested HWPT per doorbell), checked with the mock's own
//! `IOMMU_TEST_OP_MD_CHECK_IOTLB` and `IOMMU_TEST_OP_PASID_CHECK_HWPT`; removal releases
//! every host object.

use std::sync::Arc;

use devices::pci::PciBdf;
use devices::viommu::{BridgeMode, DomainScope, GuestInvalidation, Translation, ViommuBridge};
use ioasid::iommufd::selftest::{MockDevice, MOCK_FLAGS_DEVICE_PASID};
use ioasid::{HwInfo, HwptId, Invalidation, IommuBackend, IommufdBackend, Pasid, VtdStage1};
use vmm::viommu::{selftest_iotlb_tag, VtdBridge};

use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The vIOMMU mock tests.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "viommu_nested_bridge_mock",
        run: viommu_nested_bridge_mock,
    }]
}

fn s(e: impl std::error::Error) -> String {
    chain(&e)
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
    ensure!(
        b.selftest().pasid_check_hwpt(&mock, p, n3).map_err(s)?,
        "PASID 5 is not attached to nested HWPT {}",
        n3.0
    );
    slots(&b, n3, [tag1; 4])?;
    bridge
        .set_translation(bdf, p, Translation::Blocked)
        .map_err(s)?;
    ensure!(
        b.selftest()
            .pasid_check_hwpt(&mock, p, HwptId(0))
            .map_err(s)?,
        "PASID 5 still attached after the guest cleared its entry"
    );
    bridge
        .set_translation(bdf, p, Translation::FirstStage { did: 3, table: t2 })
        .map_err(s)?;

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
            .pasid_check_hwpt(&mock, p, HwptId(0))
            .map_err(s)?,
        "PASID 5 still attached after remove"
    );
    Ok(Outcome::Pass)
}
