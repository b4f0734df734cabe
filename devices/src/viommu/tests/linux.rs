//! The Linux sequence of the harness against the model: exactly the expected bridge calls.

use ioasid::{Invalidation, Pasid, VtdStage1};

use super::*;
use crate::viommu::bridge::{DomainScope, SecondStage};
use crate::viommu::linux_harness::{LinuxHarness, Stage};

fn iotlb(scope: DomainScope, inv: Invalidation) -> Call {
    Call::Invalidate(vec![GuestInvalidation::Iotlb { scope, inv }])
}

#[test]
fn viommu_model_linux_sequence() {
    let mut rig = Rig::new(VtdConfig::default());
    let dev = bdf(3);
    rig.vtd.add_device(dev);
    assert!(
        rig.bridge.take().is_empty(),
        "add_device before TE calls nobody"
    );
    assert_eq!(
        rig.vtd.translation(dev, Pasid(0)),
        Some(Translation::PassThrough)
    );
    let mut h = LinuxHarness::new(rig.mem.clone(), 8 << 20..16 << 20);

    h.boot(&mut rig.vtd).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![
            iotlb(DomainScope::All, Invalidation::All),
            Call::Set(dev, Pasid(0), Translation::Blocked),
        ]
    );
    assert!(rig.vtd.translation_enabled());
    let st = rig.vtd.status();
    assert!(st.qi_enabled && st.scalable && st.root_table.is_some());
    assert_eq!(st.iqh, st.iqt);

    let did = h.attach(&mut rig.vtd, dev, Stage::Second).unwrap();
    let a = h.attached(dev).unwrap();
    let expected_t = Translation::SecondStage {
        did,
        table: SecondStage {
            root: a.pgtable,
            levels: 4,
            slee: false,
            slade: false,
        },
    };
    assert_eq!(
        rig.bridge.take(),
        vec![
            iotlb(DomainScope::Domain(0), Invalidation::All),
            Call::Set(dev, Pasid(0), expected_t),
            iotlb(DomainScope::Domain(did), Invalidation::Pasid(Pasid(0))),
        ]
    );
    assert_eq!(rig.vtd.translation(dev, Pasid(0)), Some(expected_t));

    h.map(&mut rig.vtd, dev, 0x10000, 0x20_0000, 0x3000)
        .unwrap();
    let range = Invalidation::Range {
        pasid: None,
        addr: 0x10000,
        npages: 4,
        leaf: false,
    };
    assert_eq!(
        rig.bridge.take(),
        vec![iotlb(DomainScope::Domain(did), range)]
    );
    // The guest's table maps what the harness asked (the bridge would walk it).
    assert_eq!(
        walk_second_stage(&rig.mem, a.pgtable, 0x11000),
        Some(0x20_1000)
    );

    h.unmap(&mut rig.vtd, dev, 0x10000, 0x3000).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![iotlb(DomainScope::Domain(did), range)]
    );
    assert_eq!(walk_second_stage(&rig.mem, a.pgtable, 0x11000), None);

    h.teardown(&mut rig.vtd, dev).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![
            Call::Set(dev, Pasid(0), Translation::Blocked),
            iotlb(DomainScope::Domain(did), Invalidation::All),
        ]
    );
    let c = rig.vtd.counters();
    // Linux also writes IQT = 0 before enabling QI.
    assert_eq!(c.doorbells, h.doorbells + 1);
    assert_eq!(c.desc_wait, h.doorbells);
    assert_eq!(c.invalidate_calls, 6);
    assert_eq!(c.set_translation_calls, 3);
    assert_eq!(c.faults_recorded, 0);
    assert_eq!(c.queue_errors, 0);
}

#[test]
fn viommu_model_linux_sequence_first_stage() {
    let mut rig = Rig::new(full_cfg());
    let dev = bdf(4);
    rig.vtd.add_device(dev);
    let mut h = LinuxHarness::new(rig.mem.clone(), 8 << 20..16 << 20);
    h.ats = true;
    h.boot(&mut rig.vtd).unwrap();
    rig.bridge.take();
    let did = h.attach(&mut rig.vtd, dev, Stage::First).unwrap();
    let a = h.attached(dev).unwrap();
    let t = Translation::FirstStage {
        did,
        table: VtdStage1 {
            pgtbl_addr: a.pgtable,
            addr_width: 48,
            sre: false,
            wpe: false,
            eafe: false,
        },
    };
    let calls = rig.bridge.take();
    assert!(calls.contains(&Call::Set(dev, Pasid(0), t)), "{calls:?}");
    // Linux flushes nothing after a first-stage map.
    h.map(&mut rig.vtd, dev, 0x40_0000, 0x30_0000, 0x1000)
        .unwrap();
    assert!(rig.bridge.take().is_empty());
    h.unmap(&mut rig.vtd, dev, 0x40_0000, 0x1000).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Invalidate(vec![
            GuestInvalidation::Iotlb {
                scope: DomainScope::Domain(did),
                inv: Invalidation::Range {
                    pasid: Some(Pasid(0)),
                    addr: 0x40_0000,
                    npages: 1,
                    leaf: false
                }
            },
            GuestInvalidation::DeviceTlb {
                bdf: dev,
                pasid: None,
                addr: 0x40_0000,
                npages: 1
            },
        ])]
    );
}

/// A minimal 4-level second-stage walk for checking what the harness wrote.
fn walk_second_stage(mem: &VecGuestMemory, root: u64, iova: u64) -> Option<u64> {
    let mut table = root;
    for level in (1..=4u32).rev() {
        let idx = (iova >> (12 + 9 * (level - 1))) & 511;
        let e = mem.read_u64(table + idx * 8).ok()?;
        if e & 3 == 0 {
            return None;
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    Some(table | (iova & 0xfff))
}

#[test]
fn viommu_model_linux_sequence_legacy_mode() {
    let cfg = VtdConfig {
        scalable_mode: false,
        ..VtdConfig::default()
    };
    let mut rig = Rig::new(cfg);
    let dev = bdf(5);
    rig.vtd.add_device(dev);
    let mut h = LinuxHarness::new(rig.mem.clone(), 8 << 20..16 << 20);
    h.boot(&mut rig.vtd).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![
            iotlb(DomainScope::All, Invalidation::All),
            Call::Set(dev, Pasid(0), Translation::Blocked),
        ]
    );
    let did = h.attach(&mut rig.vtd, dev, Stage::Second).unwrap();
    let a = h.attached(dev).unwrap();
    let t = Translation::SecondStage {
        did,
        table: SecondStage {
            root: a.pgtable,
            levels: 4,
            slee: false,
            slade: false,
        },
    };
    let calls = rig.bridge.take();
    assert!(calls.contains(&Call::Set(dev, Pasid(0), t)), "{calls:?}");
    h.map(&mut rig.vtd, dev, 0x1000, 0x20_0000, 0x1000).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![iotlb(
            DomainScope::Domain(did),
            Invalidation::Range {
                pasid: None,
                addr: 0x1000,
                npages: 1,
                leaf: false
            }
        )]
    );
    h.teardown(&mut rig.vtd, dev).unwrap();
    let calls = rig.bridge.take();
    assert_eq!(calls[0], Call::Set(dev, Pasid(0), Translation::Blocked));
    assert_eq!(rig.vtd.counters().queue_errors, 0);
}

#[test]
fn viommu_harness_psi_alignment_matches_linux() {
    // calculate_psi_aligned_address: a range straddling an alignment boundary widens.
    assert_eq!(LinuxHarness::psi_aligned(0x10000, 0x12fff), (0x10000, 2));
    assert_eq!(LinuxHarness::psi_aligned(0x3000, 0x4fff), (0x0, 3));
    assert_eq!(LinuxHarness::psi_aligned(0x5000, 0x5fff), (0x5000, 0));
}

#[test]
fn viommu_model_linux_sequence_pasid() {
    let mut rig = Rig::new(full_cfg());
    let dev = bdf(6);
    rig.vtd.add_device(dev);
    let mut h = LinuxHarness::new(rig.mem.clone(), 8 << 20..16 << 20);
    h.ats = true;
    h.boot(&mut rig.vtd).unwrap();
    let did0 = h.attach(&mut rig.vtd, dev, Stage::Second).unwrap();
    rig.bridge.take();
    let did5 = h.attach_pasid(&mut rig.vtd, dev, 5, Stage::First).unwrap();
    let a = h.attached_pasid(dev, 5).unwrap();
    let t = Translation::FirstStage {
        did: did5,
        table: VtdStage1 {
            pgtbl_addr: a.pgtable,
            addr_width: 48,
            sre: false,
            wpe: false,
            eafe: false,
        },
    };
    assert_eq!(
        rig.bridge.take(),
        vec![
            Call::Set(dev, Pasid(5), t),
            iotlb(DomainScope::Domain(did5), Invalidation::Pasid(Pasid(5))),
        ]
    );
    h.map_pasid(&mut rig.vtd, dev, 5, 0x8000, 0x30_0000, 0x2000)
        .unwrap();
    assert!(rig.bridge.take().is_empty());
    h.unmap_pasid(&mut rig.vtd, dev, 5, 0x8000, 0x2000).unwrap();
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Invalidate(vec![
            GuestInvalidation::Iotlb {
                scope: DomainScope::Domain(did5),
                inv: Invalidation::Range {
                    pasid: Some(Pasid(5)),
                    addr: 0x8000,
                    npages: 2,
                    leaf: false
                }
            },
            GuestInvalidation::DeviceTlb {
                bdf: dev,
                pasid: Some(Pasid(5)),
                addr: 0x8000,
                npages: 2
            },
        ])]
    );
    h.detach_pasid(&mut rig.vtd, dev, 5).unwrap();
    let calls = rig.bridge.take();
    assert_eq!(calls[0], Call::Set(dev, Pasid(5), Translation::Blocked));
    assert_eq!(rig.vtd.translation(dev, Pasid(5)), None);
    assert!(matches!(
        rig.vtd.translation(dev, Pasid(0)),
        Some(Translation::SecondStage { did, .. }) if did == did0
    ));
    h.teardown(&mut rig.vtd, dev).unwrap();
    assert_eq!(
        rig.vtd.translation(dev, Pasid(0)),
        Some(Translation::Blocked)
    );
    assert_eq!(rig.vtd.counters().queue_errors, 0);
    assert_eq!(rig.vtd.counters().faults_recorded, 0);
}
