//! What the bridge sees for the guest's context and PASID changes: several PASIDs, entries
//! going away, hot-add with translation on, removal, bridge errors, register-based
//! invalidation.

use ioasid::Invalidation;

use super::*;
use crate::viommu::bridge::{DomainScope, SecondStage};
use crate::viommu::linux_harness::desc;
use crate::viommu::regs::{self, fsts, gcmd};

const ROOT: u64 = 0x20_0000;
const CTX: u64 = 0x20_1000;
const DIR: u64 = 0x20_2000;
const PT0: u64 = 0x20_3000;
const PT1: u64 = 0x20_4000;
const SLPT: u64 = 0x30_0000;

fn ss(did: u16) -> Translation {
    Translation::SecondStage {
        did,
        table: SecondStage {
            root: SLPT,
            levels: 4,
            slee: false,
            slade: false,
        },
    }
}

fn write_pe(rig: &Rig, table: u64, idx: u64, did: u16) {
    rig.mem
        .write_u64(table + idx * 64 + 8, u64::from(did))
        .unwrap();
    rig.mem
        .write_u64(table + idx * 64, SLPT | (2 << 6) | (2 << 2) | 1)
        .unwrap();
}

/// Root, context (PASIDE, PDTS 0) and directory entries 0 and 1 for `dev`; TE on.
fn setup(rig: &mut Rig, dev: PciBdf) -> Queue {
    rig.mem.write_u64(ROOT, CTX | 1).unwrap();
    let ce = CTX + u64::from(dev.rid() & 0x7f) * 32;
    rig.mem.write_u64(ce, DIR | (1 << 3) | 1).unwrap();
    rig.mem.write_u64(DIR, PT0 | 1).unwrap();
    rig.mem.write_u64(DIR + 8, PT1 | 1).unwrap();
    rig.w64(regs::RTADDR, ROOT | (1 << 10));
    rig.w32(regs::GCMD, gcmd::SRTP);
    let q = Queue::enable(rig);
    rig.w32(regs::GCMD, gcmd::QIE | gcmd::TE);
    q
}

#[test]
fn viommu_pasid_changes_reach_the_bridge() {
    let mut rig = Rig::new(full_cfg());
    let dev = bdf(7);
    rig.vtd.add_device(dev);
    let mut q = setup(&mut rig, dev);
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Set(dev, Pasid(0), Translation::Blocked)]
    );
    // Three PASIDs made present; one global PASID-cache invalidation finds all of them.
    write_pe(&rig, PT0, 0, 1);
    write_pe(&rig, PT0, 9, 2);
    write_pe(&rig, PT1, 3, 3); // PASID 67
    q.submit(
        &mut rig,
        &[
            desc::pasid_cache(3, 0, 0),
            desc::wait(STATUS, 1, false, false),
        ],
    );
    assert_eq!(
        rig.bridge.take(),
        vec![
            Call::Set(dev, Pasid(0), ss(1)),
            Call::Set(dev, Pasid(9), ss(2)),
            Call::Set(dev, Pasid(67), ss(3)),
        ]
    );
    // Nothing changed: nothing sent.
    q.submit(
        &mut rig,
        &[desc::context_global(), desc::pasid_cache(0, 2, 0)],
    );
    assert!(rig.bridge.take().is_empty());
    // PASID 9 cleared, PASID 67 changed; a PASID-selective invalidation of 9 only updates 9.
    rig.mem.write_u64(PT0 + 9 * 64, 0).unwrap();
    write_pe(&rig, PT1, 3, 4);
    q.submit(&mut rig, &[desc::pasid_cache(1, 2, 9)]);
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Set(dev, Pasid(9), Translation::Blocked)]
    );
    assert_eq!(rig.vtd.translation(dev, Pasid(9)), None);
    assert_eq!(rig.vtd.translation(dev, Pasid(67)), Some(ss(3)));
    q.submit(&mut rig, &[desc::pasid_cache(1, 4, 67)]);
    assert_eq!(rig.bridge.take(), vec![Call::Set(dev, Pasid(67), ss(4))]);
    // The context entry goes away: every PASID is blocked, RID_PASID stays known.
    rig.mem
        .write_u64(CTX + u64::from(dev.rid() & 0x7f) * 32, 0)
        .unwrap();
    q.submit(&mut rig, &[desc::context_device(0, dev.rid(), 0)]);
    assert_eq!(
        rig.bridge.take(),
        vec![
            Call::Set(dev, Pasid(67), Translation::Blocked),
            Call::Set(dev, Pasid(0), Translation::Blocked),
        ]
    );
    assert_eq!(
        rig.vtd.translation(dev, Pasid(0)),
        Some(Translation::Blocked)
    );
    // A device-selective invalidation of another device does not look at this one.
    rig.mem
        .write_u64(CTX + u64::from(dev.rid() & 0x7f) * 32, DIR | (1 << 3) | 1)
        .unwrap();
    q.submit(&mut rig, &[desc::context_device(0, bdf(8).rid(), 0)]);
    assert!(rig.bridge.take().is_empty());
    // Translation off: pass-through for requests without PASID, PASIDs blocked.
    q.submit(&mut rig, &[desc::context_global()]);
    rig.bridge.take();
    rig.w32(regs::GCMD, gcmd::QIE);
    let calls = rig.bridge.take();
    assert!(calls.contains(&Call::Set(dev, Pasid(0), Translation::PassThrough)));
    assert!(calls.contains(&Call::Set(dev, Pasid(67), Translation::Blocked)));
    assert_eq!(rig.vtd.translations().len(), 1);
}

#[test]
fn viommu_hot_add_and_remove_device() {
    let mut rig = Rig::new(full_cfg());
    let dev = bdf(9);
    let mut q = setup(&mut rig, dev);
    assert!(rig.bridge.take().is_empty(), "no device registered yet");
    write_pe(&rig, PT0, 0, 5);
    // Hot-add with translation on: the tables are read now.
    rig.vtd.add_device(dev);
    assert_eq!(rig.bridge.take(), vec![Call::Set(dev, Pasid(0), ss(5))]);
    // Removal forgets without calling the bridge; invalidations then ignore the device.
    rig.vtd.remove_device(dev);
    assert_eq!(rig.vtd.translation(dev, Pasid(0)), None);
    write_pe(&rig, PT0, 0, 6);
    q.submit(
        &mut rig,
        &[desc::context_global(), desc::pasid_cache(3, 0, 0)],
    );
    assert!(rig.bridge.take().is_empty());
    assert!(rig.vtd.devices().is_empty());
}

#[test]
fn viommu_bridge_error_records_fault() {
    let mut rig = Rig::new(full_cfg());
    let dev = bdf(10);
    rig.vtd.add_device(dev);
    rig.w32(regs::FECTL, 0);
    let mut q = setup(&mut rig, dev);
    rig.bridge.take();
    *rig.bridge.fail_set.lock().unwrap() = Some(|bdf, pasid| BridgeError::Unsupported {
        bdf,
        pasid,
        reason: "first stage without host nesting".into(),
    });
    write_pe(&rig, PT0, 0, 5);
    q.submit(&mut rig, &[desc::pasid_cache(1, 5, 0)]);
    assert_eq!(rig.bridge.take(), vec![Call::Set(dev, Pasid(0), ss(5))]);
    let c = rig.vtd.counters();
    assert_eq!((c.bridge_errors, c.faults_recorded), (1, 1));
    assert_ne!(rig.r32(regs::FSTS) & fsts::PPF, 0);
    let hi = rig.r64(regs::FRCD_OFFSET + 8);
    assert_eq!((hi >> 32) & 0xff, 0x5b);
    assert_eq!(hi & 0xffff, u64::from(dev.rid()));
    assert_eq!((hi >> 31) & 1, 1, "PASID present");
    assert_eq!(rig.msi.take().len(), 1);
}

#[test]
fn viommu_register_based_invalidation() {
    let mut rig = Rig::new(VtdConfig::default());
    let dev = bdf(11);
    rig.vtd.add_device(dev);
    rig.mem.write_u64(ROOT, CTX | 1).unwrap();
    rig.w64(regs::RTADDR, ROOT | (1 << 10));
    rig.w32(regs::GCMD, gcmd::SRTP);
    rig.w32(regs::GCMD, gcmd::TE);
    rig.bridge.take();
    let ce = CTX + u64::from(dev.rid() & 0x7f) * 32;
    rig.mem.write_u64(ce, DIR | 1).unwrap();
    rig.mem.write_u64(DIR, PT0 | 1).unwrap();
    write_pe(&rig, PT0, 0, 3);
    // CCMD device-selective: ICC clears, CAIG reports the granularity done.
    rig.w64(
        regs::CCMD,
        (1 << 63) | (3 << 61) | (u64::from(dev.rid()) << 16),
    );
    let v = rig.r64(regs::CCMD);
    assert_eq!(v >> 63, 0);
    assert_eq!((v >> 59) & 3, 3);
    assert_eq!(rig.bridge.take(), vec![Call::Set(dev, Pasid(0), ss(3))]);
    // IVA + IOTLB page-selective.
    rig.w64(regs::IVA, 0x4_3000 | 1);
    rig.w64(regs::IOTLB, (1 << 63) | (3 << 60) | (3 << 32));
    let v = rig.r64(regs::IOTLB);
    assert_eq!(v >> 63, 0);
    assert_eq!((v >> 57) & 3, 3);
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Invalidate(vec![GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(3),
            inv: Invalidation::Range {
                pasid: None,
                addr: 0x4_2000,
                npages: 2,
                leaf: false
            }
        }])]
    );
}

#[test]
fn viommu_one_invalidate_call_per_wait() {
    let mut rig = Rig::new(full_cfg());
    let mut q = Queue::enable(&mut rig);
    // Two batches separated by a wait: two calls, the first before the first status write.
    q.submit(
        &mut rig,
        &[
            desc::iotlb_page(1, 0x1000, 0, false),
            desc::piotlb_page(1, 4, 0x2000, 1, true),
            desc::dev_tlb(0x18, 0x18, 0, 0x1000, 0),
            desc::wait(STATUS, 1, false, false),
            desc::iotlb_domain(2),
            desc::iec(),
        ],
    );
    let calls = rig.bridge.take();
    assert_eq!(calls.len(), 2);
    let Call::Invalidate(first) = &calls[0] else {
        panic!()
    };
    assert_eq!(first.len(), 3);
    assert_eq!(
        calls[1],
        Call::Invalidate(vec![GuestInvalidation::Iotlb {
            scope: DomainScope::Domain(2),
            inv: Invalidation::All
        }])
    );
    assert_eq!(rig.mem.read_u32(STATUS).unwrap(), 1);
    let c = rig.vtd.counters();
    assert_eq!(
        (
            c.desc_iotlb,
            c.desc_pasid_iotlb,
            c.desc_device_tlb,
            c.desc_wait,
            c.desc_iec
        ),
        (2, 1, 1, 1, 1)
    );
    assert_eq!(c.invalidate_calls, 2);
}

#[test]
fn viommu_queue_wraps() {
    let mut rig = Rig::new(VtdConfig::default());
    let mut q = Queue::enable(&mut rig);
    // 128 descriptors per page: go round three times.
    for i in 0..200u32 {
        q.submit(&mut rig, &[desc::wait(STATUS, i, false, false)]);
        assert_eq!(rig.mem.read_u32(STATUS).unwrap(), i);
    }
    q.submit(&mut rig, &[desc::iotlb_global(); 100]);
    assert_eq!(rig.bridge.take().len(), 1, "one call per doorbell");
    assert_eq!(rig.r64(regs::IQH), q.tail);
    assert_eq!(rig.vtd.counters().desc_wait, 200);
}
