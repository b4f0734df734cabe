//! Register semantics: GCMD/GSTS, access widths, fault recording and the fault event,
//! invalidation wait, IQE, the page request queue.

use ioasid::PageResponseCode;

use super::*;
use crate::viommu::linux_harness::desc;
use crate::viommu::prq::{PageRequest, PrqError};
use crate::viommu::regs::{self, ectl, fsts, gcmd, ics, prs};

#[test]
fn viommu_gcmd_gsts_write_one_semantics() {
    let mut rig = Rig::new(VtdConfig::default());
    let dev = bdf(2);
    rig.vtd.add_device(dev);
    assert_eq!(rig.r32(regs::GSTS), 0);
    // RTADDR keeps TTM and the address, drops reserved bits 9:0.
    rig.w64(regs::RTADDR, 0x20_0000 | (1 << 10) | 0x3ff);
    assert_eq!(rig.r64(regs::RTADDR), 0x20_0000 | (1 << 10));
    rig.w32(regs::GCMD, gcmd::SRTP);
    assert_eq!(rig.r32(regs::GSTS), gcmd::SRTP);
    assert_eq!(rig.r32(regs::GCMD), 0, "GCMD reads as zero");
    // Linux writes its whole command word with one bit changed: SRTP again is harmless.
    rig.w32(regs::GCMD, gcmd::TE);
    assert_eq!(rig.r32(regs::GSTS), gcmd::SRTP | gcmd::TE);
    // Empty root table: the device is blocked.
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Set(dev, Pasid(0), Translation::Blocked)]
    );
    // WBF completes at once; IRE is not supported and does not show.
    rig.w32(regs::GCMD, gcmd::TE | gcmd::WBF | gcmd::IRE);
    assert_eq!(rig.r32(regs::GSTS), gcmd::SRTP | gcmd::TE);
    // TE off: pass-through again.
    rig.w32(regs::GCMD, 0);
    assert_eq!(rig.r32(regs::GSTS), gcmd::SRTP);
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Set(dev, Pasid(0), Translation::PassThrough)]
    );
    // Read-only registers keep their value.
    let cap = rig.r64(regs::CAP);
    rig.w64(regs::CAP, 0);
    rig.w64(regs::ECAP, 0);
    assert_eq!(rig.r64(regs::CAP), cap);
    assert_eq!(rig.r64(regs::ECAP), rig.vtd.ecap());
    assert_eq!(rig.r32(regs::VER), 0x30);
}

#[test]
fn viommu_register_access_widths() {
    let mut rig = Rig::new(VtdConfig::default());
    // 32-bit halves of a 64-bit register.
    rig.w32(regs::RTADDR, 0x1234_5000);
    rig.w32(regs::RTADDR + 4, 0x1);
    assert_eq!(rig.r64(regs::RTADDR), 0x1_1234_5000);
    assert_eq!(rig.r32(regs::RTADDR + 4), 1);
    // Two 32-bit registers read with one 64-bit access.
    rig.w32(regs::FEDATA, 0x55);
    let v = rig.r64(regs::FECTL);
    assert_eq!(v >> 32, 0x55);
    assert_eq!(v as u32, ectl::IM);
    // Other sizes and misaligned accesses are ignored and read 0.
    let before = rig.vtd.counters().bad_accesses;
    rig.vtd.write(0, regs::FEDATA, &[0xff, 0xff]);
    rig.vtd
        .write(0, regs::RTADDR + 2, &0xffff_ffffu32.to_le_bytes());
    rig.vtd.write(0, regs::RTADDR + 4, &u64::MAX.to_le_bytes());
    rig.vtd.write(0, 0x1000, &0u32.to_le_bytes());
    let mut b = [0xaau8; 2];
    rig.vtd.read(0, regs::CAP, &mut b);
    assert_eq!(b, [0, 0]);
    assert_eq!(rig.vtd.counters().bad_accesses, before + 5);
    assert_eq!(rig.r32(regs::FEDATA), 0x55);
    assert_eq!(rig.r64(regs::RTADDR), 0x1_1234_5000);
}

/// A scalable-mode root table at 0x20_0000 whose bus 0 lower context table is at
/// 0x20_1000.
fn sm_root(rig: &mut Rig) {
    rig.mem.write_u64(0x20_0000, 0x20_1000 | 1).unwrap();
    rig.w64(regs::RTADDR, 0x20_0000 | (1 << 10));
    rig.w32(regs::GCMD, gcmd::SRTP);
}

fn ctx_addr(dev: PciBdf) -> u64 {
    0x20_1000 + u64::from(dev.rid() & 0x7f) * 32
}

#[test]
fn viommu_fault_recording_and_event() {
    let mut rig = Rig::new(VtdConfig::default());
    let dev = bdf(5);
    rig.vtd.add_device(dev);
    rig.w32(regs::FEDATA, 0x42);
    rig.w32(regs::FEADDR, 0xfee0_1000);
    rig.w32(regs::FEUADDR, 0);
    rig.w32(regs::FECTL, 0);
    sm_root(&mut rig);
    // Context entry with a reserved bit (qw0 bit 5).
    rig.mem
        .write_u64(ctx_addr(dev), 0x30_0000 | 1 | (1 << 5))
        .unwrap();
    rig.w32(regs::GCMD, gcmd::SRTP | gcmd::TE);
    assert_eq!(
        rig.bridge.take(),
        vec![Call::Set(dev, Pasid(0), Translation::Blocked)]
    );
    let st = rig.r32(regs::FSTS);
    assert_eq!(st & fsts::PPF, fsts::PPF);
    assert_eq!((st >> 8) & 0xff, 0, "FRI");
    let frcd = regs::FRCD_OFFSET;
    let hi = rig.r64(frcd + 8);
    assert_eq!(hi >> 63, 1, "F");
    assert_eq!((hi >> 32) & 0xff, 0x42, "SM context entry reserved");
    assert_eq!(hi & 0xffff, u64::from(dev.rid()));
    assert_eq!(rig.r64(frcd), ctx_addr(dev) & !0xfff);
    assert_eq!(
        rig.msi.take(),
        vec![MsiMessage {
            address: 0xfee0_1000,
            data: 0x42
        }]
    );
    assert_eq!(rig.vtd.counters().faults_recorded, 1);
    // Linux clears F with a 32-bit write of the top dword, then PPF reads clear.
    rig.w32(frcd + 12, 1 << 31);
    assert_eq!(rig.r64(frcd + 8) >> 63, 0);
    assert_eq!(rig.r32(regs::FSTS) & fsts::PPF, 0);
    // Masked: the event stays pending until unmasked.
    rig.w32(regs::FECTL, ectl::IM);
    rig.mem
        .write_u64(ctx_addr(dev), 0x30_0000 | 1 | (1 << 6))
        .unwrap();
    let mut q = Queue::enable(&mut rig);
    q.submit(&mut rig, &[desc::context_global()]);
    assert_ne!(rig.r32(regs::FSTS) & fsts::PPF, 0);
    assert!(rig.msi.take().is_empty());
    assert_eq!(rig.r32(regs::FECTL), ectl::IM | ectl::IP);
    rig.w32(regs::FECTL, 0);
    assert_eq!(rig.msi.take().len(), 1);
    assert_eq!(rig.r32(regs::FECTL), 0);
    // FPD suppresses the record. (The second fault went to record 1: round robin.)
    assert_eq!(rig.r64(frcd + 16 + 8) >> 63, 1);
    rig.w32(frcd + 16 + 12, 1 << 31);
    rig.mem
        .write_u64(ctx_addr(dev), 0x30_0000 | 1 | 2 | (1 << 6))
        .unwrap();
    q.submit(&mut rig, &[desc::context_global()]);
    assert_eq!(rig.r32(regs::FSTS) & fsts::PPF, 0);
    assert_eq!(rig.vtd.counters().faults_recorded, 2);
}

#[test]
fn viommu_fault_overflow_sets_pfo() {
    let mut rig = Rig::new(VtdConfig::default());
    sm_root(&mut rig);
    let devs: Vec<PciBdf> = (1..=6).map(bdf).collect();
    for d in &devs {
        rig.vtd.add_device(*d);
        rig.mem.write_u64(ctx_addr(*d), 1 | (1 << 7)).unwrap();
    }
    rig.w32(regs::GCMD, gcmd::TE);
    // Four records, then overflow.
    assert_eq!(rig.vtd.counters().faults_recorded, 4);
    let st = rig.r32(regs::FSTS);
    assert_eq!(st & (fsts::PPF | fsts::PFO), fsts::PPF | fsts::PFO);
    rig.w32(regs::FSTS, fsts::PFO);
    assert_eq!(rig.r32(regs::FSTS) & fsts::PFO, 0);
}

#[test]
fn viommu_wait_status_write_and_iwc_interrupt() {
    let mut rig = Rig::new(VtdConfig::default());
    rig.w32(regs::IEDATA, 0x51);
    rig.w32(regs::IEADDR, 0xfee0_2000);
    rig.w32(regs::IECTL, 0);
    let mut q = Queue::enable(&mut rig);
    q.submit(&mut rig, &[desc::wait(STATUS, 7, true, false)]);
    assert_eq!(rig.mem.read_u32(STATUS).unwrap(), 7);
    assert_eq!(rig.r32(regs::ICS), ics::IWC);
    assert_eq!(
        rig.msi.take(),
        vec![MsiMessage {
            address: 0xfee0_2000,
            data: 0x51
        }]
    );
    assert_eq!(rig.r64(regs::IQH), q.tail);
    // IWC still set: no new interrupt.
    q.submit(&mut rig, &[desc::wait(STATUS, 8, true, true)]);
    assert_eq!(rig.mem.read_u32(STATUS).unwrap(), 8);
    assert!(rig.msi.take().is_empty());
    rig.w32(regs::ICS, ics::IWC);
    assert_eq!(rig.r32(regs::ICS), 0);
    q.submit(&mut rig, &[desc::wait(STATUS, 9, true, false)]);
    assert_eq!(rig.msi.take().len(), 1);
    assert_eq!(rig.vtd.counters().desc_wait, 3);
}

#[test]
fn viommu_iqe_on_bad_descriptor_stops_and_resumes() {
    let mut rig = Rig::new(VtdConfig::default());
    rig.w32(regs::FECTL, 0);
    let mut q = Queue::enable(&mut rig);
    let bad = [0xf, 0, 0, 0];
    q.submit(
        &mut rig,
        &[
            desc::iotlb_global(),
            bad,
            desc::wait(STATUS, 1, false, false),
        ],
    );
    // The IOTLB invalidation before the bad descriptor reached the bridge.
    assert_eq!(rig.bridge.take().len(), 1);
    assert_ne!(rig.r32(regs::FSTS) & fsts::IQE, 0);
    assert_eq!(rig.r64(regs::IQERCD) & 0xf, 3, "IQEI: invalid type");
    assert_eq!(rig.r64(regs::IQH), 32, "IQH stays at the bad descriptor");
    assert_eq!(rig.mem.read_u32(STATUS).unwrap(), 0);
    assert_eq!(rig.msi.take().len(), 1, "fault event");
    // More doorbells do nothing while IQE is set.
    rig.w32(regs::IQT, q.tail as u32);
    assert_eq!(rig.mem.read_u32(STATUS).unwrap(), 0);
    // Linux copies its wait descriptor over the bad one and clears IQE: the queue resumes.
    let w = desc::wait(STATUS, 2, false, false);
    for (i, v) in w.iter().enumerate() {
        rig.mem.write_u64(q.base + 32 + i as u64 * 8, *v).unwrap();
    }
    rig.w32(regs::FSTS, fsts::IQE);
    assert_eq!(rig.r32(regs::FSTS) & fsts::IQE, 0);
    assert_eq!(rig.mem.read_u32(STATUS).unwrap(), 1);
    assert_eq!(rig.r64(regs::IQH), q.tail);
    // Reserved bits: IQEI 4.
    q.submit(&mut rig, &[[desc::iotlb_global()[0] | (1 << 40), 0, 0, 0]]);
    assert_eq!(rig.r64(regs::IQERCD) & 0xf, 4);
}

#[test]
fn viommu_iqt_beyond_queue_is_iqe() {
    let mut rig = Rig::new(VtdConfig::default());
    let _q = Queue::enable(&mut rig);
    rig.w32(regs::IQT, 0x2000);
    assert_ne!(rig.r32(regs::FSTS) & fsts::IQE, 0);
    assert_eq!(rig.r64(regs::IQERCD) & 0xf, 1);
    rig.w32(regs::FSTS, fsts::IQE);
    rig.w32(regs::IQT, 0x10);
    assert_ne!(
        rig.r32(regs::FSTS) & fsts::IQE,
        0,
        "bit 4 with 256-bit descriptors"
    );
}

#[test]
fn viommu_prq_post_full_and_response() {
    let mut rig = Rig::new(full_cfg());
    let dev = bdf(6);
    rig.vtd.add_device(dev);
    let req = |prgi: u16| PageRequest {
        bdf: dev,
        pasid: Some(Pasid(5)),
        prgi,
        last: true,
        read: true,
        write: true,
        exec: false,
        privileged: false,
        addr: 0x7000_1000,
    };
    assert!(matches!(
        rig.vtd.post_page_request(req(1)),
        Err(PrqError::NotEnabled { .. })
    ));
    const PQ: u64 = 0x18_0000;
    rig.w64(regs::PQA, PQ); // one page: 128 descriptors
                            // Translation off, then a context entry without PRE: refused, with a fault record.
    assert!(matches!(
        rig.vtd.post_page_request(req(1)),
        Err(PrqError::Refused { .. })
    ));
    sm_root(&mut rig);
    rig.mem
        .write_u64(ctx_addr(dev), 0x30_0000 | 1 | (1 << 3))
        .unwrap();
    rig.w32(regs::GCMD, gcmd::TE);
    assert!(matches!(
        rig.vtd.post_page_request(req(1)),
        Err(PrqError::Refused { .. })
    ));
    assert_eq!((rig.r64(regs::FRCD_OFFSET + 8) >> 32) & 0xff, 0x47);
    rig.w32(regs::FRCD_OFFSET + 12, 1 << 31);
    rig.mem
        .write_u64(ctx_addr(dev), 0x30_0000 | 1 | (1 << 3) | (1 << 4))
        .unwrap();
    rig.msi.take();
    rig.w32(regs::PEDATA, 0x61);
    rig.w32(regs::PEADDR, 0xfee0_3000);
    rig.w32(regs::PECTL, 0);
    rig.vtd.post_page_request(req(1)).unwrap();
    assert_eq!(rig.r64(regs::PQT), 32);
    assert_eq!(rig.r32(regs::PRS), prs::PPR);
    assert_eq!(rig.msi.take().len(), 1);
    let q0 = rig.mem.read_u64(PQ).unwrap();
    let q1 = rig.mem.read_u64(PQ + 8).unwrap();
    assert_eq!(q0 & 0xff, 1, "type");
    assert_eq!((q0 >> 8) & 1, 1, "PASID present");
    assert_eq!((q0 >> 16) & 0xffff, u64::from(dev.rid()));
    assert_eq!((q0 >> 32) & 0xf_ffff, 5);
    assert_eq!(q1 & 7, 0b111, "read, write, last");
    assert_eq!((q1 >> 3) & 0x1ff, 1, "PRGI");
    assert_eq!(q1 & !0xfff, 0x7000_1000);
    // PPR still set: no new interrupt.
    for i in 2..=127 {
        rig.vtd.post_page_request(req(i)).unwrap();
    }
    assert!(rig.msi.take().is_empty());
    assert!(matches!(
        rig.vtd.post_page_request(req(200)),
        Err(PrqError::Full { .. })
    ));
    assert_eq!(rig.r32(regs::PRS), prs::PPR | prs::PRO);
    assert_eq!(rig.vtd.counters().prq_full, 1);
    assert_eq!(rig.vtd.counters().page_requests, 127);
    // The guest drains and clears.
    let t = rig.r64(regs::PQT);
    rig.w64(regs::PQH, t);
    rig.w32(regs::PRS, prs::PPR | prs::PRO);
    rig.vtd.post_page_request(req(3)).unwrap();
    assert_eq!(rig.msi.take().len(), 1);
    // A page group response in the QI reaches the bridge.
    rig.bridge.take();
    let mut q = Queue::enable(&mut rig);
    q.submit(
        &mut rig,
        &[
            desc::page_response(dev.rid(), Some(5), 3, 0),
            desc::page_response(dev.rid(), None, 4, 1),
            desc::wait(STATUS, 1, false, false),
        ],
    );
    assert_eq!(
        rig.bridge.take(),
        vec![
            Call::Response(GuestPageResponse {
                bdf: dev,
                pasid: Some(Pasid(5)),
                prgi: 3,
                code: PageResponseCode::Success
            }),
            Call::Response(GuestPageResponse {
                bdf: dev,
                pasid: None,
                prgi: 4,
                code: PageResponseCode::Invalid
            }),
        ]
    );
    assert_eq!(rig.vtd.counters().page_responses, 2);
}

#[test]
fn viommu_dma_fault_record() {
    let mut rig = Rig::new(VtdConfig::default());
    let dev = bdf(12);
    rig.w32(regs::FECTL, 0);
    // Translation off: nothing recorded.
    rig.vtd
        .record_dma_fault(dev, None, 0x1234_5000, crate::viommu::DmaFaultKind::Write);
    assert_eq!(rig.vtd.counters().faults_recorded, 0);
    rig.w32(regs::GCMD, gcmd::TE);
    rig.vtd.record_dma_fault(
        dev,
        Some(Pasid(3)),
        0x1234_5678,
        crate::viommu::DmaFaultKind::Write,
    );
    let lo = rig.r64(regs::FRCD_OFFSET);
    let hi = rig.r64(regs::FRCD_OFFSET + 8);
    assert_eq!(lo, 0x1234_5000);
    assert_eq!((hi >> 32) & 0xff, 5, "write permission");
    assert_eq!((hi >> 62) & 1, 0, "T1 = write");
    assert_eq!((hi >> 40) & 0xf_ffff, 3);
    assert_eq!(hi & 0xffff, u64::from(dev.rid()));
    assert_eq!(rig.msi.take().len(), 1);
}
