//! One test per guest format: CAP/ECAP, root/context/PASID entries, every QI descriptor
//! type, reserved bits.

use ioasid::VtdStage1;

use super::*;
use crate::viommu::bridge::SecondStage;
use crate::viommu::caps::{cap_fields, cap_names, ecap_fields, ecap_names, VtdConfigError};
use crate::viommu::linux_harness::desc;
use crate::viommu::qi::{decode, ContextScope, Descriptor, IotlbScope, IqeCause, PasidCacheScope};
use crate::viommu::tables::{
    self, parse_pasid_entry, parse_sm_context, read_context, DeviceContext, FaultReason, Pgtt,
};

#[test]
fn viommu_caps_from_config() {
    let cfg = VtdConfig::default();
    cfg.validate().unwrap();
    let cap = cfg.cap();
    let ecap = cfg.ecap();
    assert_eq!(
        cap_names(cap),
        ["CM", "SLLPS-2M", "SLLPS-1G", "PSI", "DWD", "DRD"]
    );
    assert_eq!(ecap_names(ecap), ["QI", "PT", "SMTS", "SLTS", "SMPWC"]);
    let f = cap_fields(cap);
    assert!(f.contains(&("MGAW", 48)));
    assert!(f.contains(&("SAGAW", 0b0110)));
    assert!(f.contains(&("FRO", 0x220)));
    assert!(f.contains(&("NFR", 4)));
    assert!(ecap_fields(ecap).contains(&("IRO", 0xf0)));
    assert!(ecap_fields(ecap).contains(&("PSS", 0)));

    let full = full_cfg();
    full.validate().unwrap();
    let names = ecap_names(full.ecap());
    for n in [
        "QI", "DT", "PRS", "NWFS", "PASID", "PDS", "SMTS", "SLTS", "FSTS", "SMPWC",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(!names.contains(&"NEST") && !names.contains(&"IR"));
    assert!(ecap_fields(full.ecap()).contains(&("PSS", 8)));
    assert!(cap_names(full.cap()).contains(&"FL1GP"));
    assert!(!cap_names(full.cap()).contains(&"FL5LP"));
    let five = VtdConfig {
        aw_bits: 57,
        ..full
    };
    assert!(cap_names(five.cap()).contains(&"FL5LP"));
    assert!(cap_fields(five.cap()).contains(&("SAGAW", 0b1110)));

    let bad = |c: VtdConfig| c.validate().unwrap_err();
    assert_eq!(
        bad(VtdConfig { aw_bits: 40, ..cfg }),
        VtdConfigError::AddressWidth(40)
    );
    assert_eq!(
        bad(VtdConfig {
            scalable_mode: false,
            pasid_bits: 8,
            ..cfg
        }),
        VtdConfigError::PasidWithoutScalableMode(8)
    );
    assert_eq!(
        bad(VtdConfig {
            scalable_mode: false,
            first_stage: true,
            ..cfg
        }),
        VtdConfigError::FirstStageWithoutScalableMode
    );
    assert!(matches!(
        bad(VtdConfig {
            first_stage: false,
            ..full
        }),
        VtdConfigError::SvmIncomplete { missing: "fsts=on" }
    ));
    assert!(matches!(
        bad(VtdConfig {
            device_tlb: false,
            ..full
        }),
        VtdConfigError::SvmIncomplete { .. }
    ));
    assert!(matches!(
        bad(VtdConfig {
            pasid_bits: 0,
            ..full
        }),
        VtdConfigError::SvmIncomplete { .. }
    ));
    assert_eq!(
        bad(VtdConfig {
            pasid_bits: 21,
            ..full
        }),
        VtdConfigError::PasidBits(21)
    );
    let legacy = VtdConfig {
        scalable_mode: false,
        ..cfg
    };
    legacy.validate().unwrap();
    assert!(!ecap_names(legacy.ecap()).contains(&"SMTS"));
}

#[test]
fn viommu_root_and_context_entries() {
    let cfg = full_cfg();
    let mem = VecGuestMemory::new(0, 1 << 20);
    let rt = 0x1000u64;
    let sm = rt | (1 << 10);
    // Not present root entry.
    assert_eq!(
        read_context(&mem, &cfg, sm, 0x0010).unwrap(),
        DeviceContext::NotPresent
    );
    // Upper half (devfn >= 128) present, lower not.
    mem.write_u64(rt + 8, 0x3000 | 1).unwrap();
    assert_eq!(
        read_context(&mem, &cfg, sm, 0x0010).unwrap(),
        DeviceContext::NotPresent
    );
    let ce = 0x3000 + (0x90 & 0x7f) * 32;
    mem.write_u64(ce, 0x5000 | (3 << 9) | (1 << 3) | (1 << 2) | (1 << 4) | 1)
        .unwrap();
    mem.write_u64(ce + 8, 7).unwrap();
    let DeviceContext::Scalable(c) = read_context(&mem, &cfg, sm, 0x0090).unwrap() else {
        panic!("not scalable");
    };
    assert_eq!(
        (
            c.pasid_dir,
            c.pdts,
            c.paside,
            c.dte,
            c.pre,
            c.rid_pasid,
            c.fpd
        ),
        (0x5000, 3, true, true, true, 7, false)
    );
    // Root entry reserved bits.
    mem.write_u64(rt + 8, 0x3000 | 1 | (1 << 4)).unwrap();
    let f = read_context(&mem, &cfg, sm, 0x0090).unwrap_err();
    assert_eq!(f.reason, FaultReason::RootEntryReserved);
    assert_eq!(f.reason.code(true), 0x3a);
    // Root table outside RAM.
    let f = read_context(&mem, &cfg, (2 << 20) | (1 << 10), 0x0090).unwrap_err();
    assert_eq!(f.reason, FaultReason::RootEntryAccess);
    // Reserved TTM.
    let f = read_context(&mem, &cfg, rt | (3 << 10), 0x0090).unwrap_err();
    assert_eq!(f.reason, FaultReason::InvalidRootTableAddress);
    // Context entry reserved bits: qw0 8:5, qw1 63:21, qw2, qw3.
    let base = [0x5000 | 1, 0, 0, 0];
    for (i, bit) in [(0, 5), (1, 21), (2, 0), (3, 63)] {
        let mut q = base;
        q[i] |= 1 << bit;
        let f = parse_sm_context(&cfg, q, 0x3000).unwrap_err();
        assert_eq!(
            f.reason,
            FaultReason::ContextEntryReserved,
            "qw{i} bit {bit}"
        );
    }
    // FPD travels with the fault.
    let f = parse_sm_context(&cfg, [0x5000 | 3 | (1 << 5), 0, 0, 0], 0).unwrap_err();
    assert!(f.fpd);
    // Features not advertised: invalid programming.
    let plain = VtdConfig::default();
    for bit in [2, 3, 4] {
        let f = parse_sm_context(&plain, [0x5000 | 1 | (1 << bit), 0, 0, 0], 0).unwrap_err();
        assert_eq!(f.reason, FaultReason::ContextEntryInvalid, "bit {bit}");
    }
    // RID_PASID beyond the PASID width.
    let f = parse_sm_context(&cfg, [0x5000 | 1, 256, 0, 0], 0).unwrap_err();
    assert_eq!(f.reason, FaultReason::RidPasidInvalid);

    // Legacy root and context entries.
    let lcfg = VtdConfig {
        scalable_mode: false,
        ..VtdConfig::default()
    };
    mem.write_u64(rt, 0x6000 | 1).unwrap();
    mem.write_u64(rt + 8, 0).unwrap();
    mem.write_u64(0x6000 + 0x18 * 16, 0x7000 | 1).unwrap();
    mem.write_u64(0x6000 + 0x18 * 16 + 8, 2 | (9 << 8)).unwrap();
    assert_eq!(
        read_context(&mem, &lcfg, rt, 0x0018).unwrap(),
        DeviceContext::Legacy(tables::LegacyContextEntry {
            fpd: false,
            translation: Translation::SecondStage {
                did: 9,
                table: SecondStage {
                    root: 0x7000,
                    levels: 4,
                    slee: false,
                    slade: false
                }
            }
        })
    );
    // Pass-through (TT=2), then a 5-level AW the unit does not have.
    mem.write_u64(0x6000 + 0x18 * 16, 1 | (2 << 2)).unwrap();
    let DeviceContext::Legacy(e) = read_context(&mem, &lcfg, rt, 0x0018).unwrap() else {
        panic!()
    };
    assert_eq!(e.translation, Translation::PassThrough);
    mem.write_u64(0x6000 + 0x18 * 16, 0x7000 | 1).unwrap();
    mem.write_u64(0x6000 + 0x18 * 16 + 8, 3).unwrap();
    let f = read_context(&mem, &lcfg, rt, 0x0018).unwrap_err();
    assert_eq!(f.reason, FaultReason::ContextEntryInvalid);
    assert_eq!(f.reason.code(false), 3);
    // Scalable TTM on a unit without scalable mode.
    let f = read_context(&mem, &lcfg, rt | (1 << 10), 0x0018).unwrap_err();
    assert_eq!(f.reason, FaultReason::InvalidRootTableAddress);
}

#[test]
fn viommu_pasid_entries() {
    let cfg = full_cfg();
    let mem = VecGuestMemory::new(0, 1 << 20);
    let ss = |extra0: u64| -> [u64; 8] {
        [
            0x8000 | (2 << 6) | (2 << 2) | 1 | extra0,
            0x33,
            0,
            0,
            0,
            0,
            0,
            0,
        ]
    };
    let e = parse_pasid_entry(&ss(1 << 5), 0, 1).unwrap().unwrap();
    assert_eq!(
        (e.pgtt, e.aw, e.slee, e.did, e.slptptr),
        (Pgtt::SecondStage, 2, true, 0x33, 0x8000)
    );
    assert_eq!(
        e.translation(&mem, &cfg, 0, 1).unwrap(),
        Translation::SecondStage {
            did: 0x33,
            table: SecondStage {
                root: 0x8000,
                levels: 4,
                slee: true,
                slade: false
            }
        }
    );
    // Not present.
    assert_eq!(
        parse_pasid_entry(&[0x8000, 0, 0, 0, 0, 0, 0, 0], 0, 1).unwrap(),
        None
    );
    // Reserved bits.
    for q in [ss(1 << 10), ss(1 << 11)] {
        assert_eq!(
            parse_pasid_entry(&q, 0x40, 1).unwrap_err().reason,
            FaultReason::PasidEntryReserved
        );
    }
    // PGTT 0, 5, 6, 7 are invalid; nested is not supported.
    for pgtt in [0u64, 5, 6, 7] {
        let q = [1 | (pgtt << 6), 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            parse_pasid_entry(&q, 0, 1).unwrap_err().reason,
            FaultReason::PasidEntryInvalid
        );
    }
    let nested = parse_pasid_entry(&[1 | (3 << 6), 0, 0, 0, 0, 0, 0, 0], 0, 1)
        .unwrap()
        .unwrap();
    assert_eq!(
        nested.translation(&mem, &cfg, 0, 1).unwrap_err().reason,
        FaultReason::PasidEntryInvalid
    );
    // AW outside SAGAW (5 levels on a 48-bit unit).
    let e = parse_pasid_entry(
        &[0x8000 | (2 << 6) | (3 << 2) | 1, 0, 0, 0, 0, 0, 0, 0],
        0,
        1,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        e.translation(&mem, &cfg, 0, 1).unwrap_err().reason,
        FaultReason::PasidEntryInvalid
    );
    // Second-stage table outside guest RAM.
    let e = parse_pasid_entry(
        &[(4 << 20) | (2 << 6) | (2 << 2) | 1, 0, 0, 0, 0, 0, 0, 0],
        0,
        1,
    )
    .unwrap()
    .unwrap();
    let f = e.translation(&mem, &cfg, 0, 1).unwrap_err();
    assert_eq!(
        (f.reason, f.addr, f.pasid),
        (FaultReason::SecondStageAccess, 4 << 20, Some(1))
    );
    // First stage: SRE, WPE, EAFE, 4-level; FLPM 2 reserved; 5-level needs FL5LP.
    let fs = [
        1 | (1 << 6),
        0x44 | (1 << 24),
        0x9000 | 1 | (1 << 4) | (1 << 7),
        0,
        0,
        0,
        0,
        0,
    ];
    let e = parse_pasid_entry(&fs, 0, 2).unwrap().unwrap();
    assert_eq!(
        e.translation(&mem, &cfg, 0, 2).unwrap(),
        Translation::FirstStage {
            did: 0x44,
            table: VtdStage1 {
                pgtbl_addr: 0x9000,
                addr_width: 48,
                sre: true,
                wpe: true,
                eafe: true
            }
        }
    );
    let mut fs5 = fs;
    fs5[2] |= 1 << 2;
    let e = parse_pasid_entry(&fs5, 0, 2).unwrap().unwrap();
    assert_eq!(
        e.translation(&mem, &cfg, 0, 2).unwrap_err().reason,
        FaultReason::PasidEntryInvalid
    );
    let cfg57 = VtdConfig { aw_bits: 57, ..cfg };
    let Translation::FirstStage { table, .. } = e.translation(&mem, &cfg57, 0, 2).unwrap() else {
        panic!()
    };
    assert_eq!(table.addr_width, 57);
    let mut bad = fs;
    bad[2] |= 2 << 2;
    assert_eq!(
        parse_pasid_entry(&bad, 0, 2).unwrap_err().reason,
        FaultReason::PasidEntryReserved
    );
    // First stage on a unit without it.
    let e = parse_pasid_entry(&fs, 0, 2).unwrap().unwrap();
    assert_eq!(
        e.translation(&mem, &VtdConfig::default(), 0, 2)
            .unwrap_err()
            .reason,
        FaultReason::PasidEntryInvalid
    );
    // Pass-through.
    let e = parse_pasid_entry(&[1 | (4 << 6), 0, 0, 0, 0, 0, 0, 0], 0, 3)
        .unwrap()
        .unwrap();
    assert_eq!(
        e.translation(&mem, &cfg, 0, 3).unwrap(),
        Translation::PassThrough
    );
}

#[test]
fn viommu_pasid_directory_walk_and_scan() {
    let cfg = full_cfg(); // 8 PASID bits: 4 directory entries
    let mem = VecGuestMemory::new(0, 1 << 20);
    let ctx = tables::SmContextEntry {
        fpd: false,
        dte: false,
        paside: true,
        pre: false,
        pdts: 0,
        pasid_dir: 0x1000,
        rid_pasid: 0,
    };
    let write_pe = |table: u64, idx: u64, q0: u64, did: u64| {
        mem.write_u64(table + idx * 64, q0).unwrap();
        mem.write_u64(table + idx * 64 + 8, did).unwrap();
    };
    assert_eq!(tables::read_pasid(&mem, &cfg, &ctx, 0).unwrap(), None);
    mem.write_u64(0x1000, 0x2000 | 1).unwrap(); // PASIDs 0..63
    mem.write_u64(0x1000 + 3 * 8, 0x3000 | 1).unwrap(); // PASIDs 192..255
    let ss = 0x8000 | (2 << 6) | (2 << 2) | 1;
    write_pe(0x2000, 0, ss, 1);
    write_pe(0x2000, 5, 1 | (4 << 6), 2);
    write_pe(0x3000, 63, ss, 3);
    write_pe(0x3000, 1, 1 | (7 << 6), 4); // invalid PGTT
    assert!(matches!(
        tables::read_pasid(&mem, &cfg, &ctx, 0).unwrap(),
        Some(Translation::SecondStage { did: 1, .. })
    ));
    assert_eq!(
        tables::read_pasid(&mem, &cfg, &ctx, 5).unwrap(),
        Some(Translation::PassThrough)
    );
    // Beyond the PASID width.
    assert_eq!(
        tables::read_pasid(&mem, &cfg, &ctx, 256)
            .unwrap_err()
            .reason,
        FaultReason::PasidTooLarge
    );
    let scan = tables::scan_pasids(&mem, &cfg, &ctx);
    let pasids: Vec<u32> = scan.present.iter().map(|(p, _)| *p).collect();
    assert_eq!(pasids, [5, 255], "RID_PASID 0 is left to the caller");
    assert_eq!(scan.faults.len(), 1);
    assert_eq!(scan.faults[0].reason, FaultReason::PasidEntryInvalid);
    assert_eq!(scan.faults[0].pasid, Some(193));
    // Directory entry reserved bits.
    mem.write_u64(0x1000 + 8, 0x4000 | 1 | (1 << 5)).unwrap();
    let f = tables::read_pasid(&mem, &cfg, &ctx, 64).unwrap_err();
    assert_eq!(f.reason, FaultReason::PasidDirReserved);
    // PASID table outside RAM.
    mem.write_u64(0x1000 + 8, (8 << 20) | 1).unwrap();
    let f = tables::read_pasid(&mem, &cfg, &ctx, 64).unwrap_err();
    assert_eq!(f.reason, FaultReason::PasidTableAccess);
    // Without PASIDE only RID_PASID counts.
    let no_pasid = tables::SmContextEntry {
        paside: false,
        ..ctx
    };
    assert!(tables::scan_pasids(&mem, &cfg, &no_pasid)
        .present
        .is_empty());
}

#[test]
fn viommu_qi_descriptor_decoding() {
    let cfg = full_cfg();
    let d = |q: [u64; 4]| decode(&q, &cfg);
    assert_eq!(
        d(desc::context_global()),
        Ok(Descriptor::ContextCache(ContextScope::Global))
    );
    assert_eq!(
        d(desc::context_domain(7)),
        Ok(Descriptor::ContextCache(ContextScope::Domain(7)))
    );
    assert_eq!(
        d(desc::context_device(7, 0x18, 2)),
        Ok(Descriptor::ContextCache(ContextScope::Device {
            did: 7,
            sid: 0x18,
            fm: 2
        }))
    );
    assert!(ContextScope::Device {
        did: 0,
        sid: 0x18,
        fm: 2
    }
    .covers(0x1b));
    assert!(!ContextScope::Device {
        did: 0,
        sid: 0x18,
        fm: 2
    }
    .covers(0x1c));
    assert_eq!(
        d(desc::iotlb_global()),
        Ok(Descriptor::Iotlb(IotlbScope::Global))
    );
    assert_eq!(
        d(desc::iotlb_domain(3)),
        Ok(Descriptor::Iotlb(IotlbScope::Domain(3)))
    );
    assert_eq!(
        d(desc::iotlb_page(3, 0x12_3000, 2, true)),
        Ok(Descriptor::Iotlb(IotlbScope::Pages {
            did: 3,
            pasid: None,
            addr: 0x12_0000,
            npages: 4,
            ih: true
        }))
    );
    assert_eq!(
        d(desc::piotlb_pasid(3, 9)),
        Ok(Descriptor::Iotlb(IotlbScope::Pasid { did: 3, pasid: 9 }))
    );
    assert_eq!(
        d(desc::piotlb_page(3, 9, 0x5000, 0, false)),
        Ok(Descriptor::Iotlb(IotlbScope::Pages {
            did: 3,
            pasid: Some(9),
            addr: 0x5000,
            npages: 1,
            ih: false
        }))
    );
    assert_eq!(
        d(desc::pasid_cache(0, 4, 0)),
        Ok(Descriptor::PasidCache(PasidCacheScope::Domain(4)))
    );
    assert_eq!(
        d(desc::pasid_cache(1, 4, 17)),
        Ok(Descriptor::PasidCache(PasidCacheScope::Pasid {
            did: 4,
            pasid: 17
        }))
    );
    assert_eq!(
        d(desc::pasid_cache(3, 0, 0)),
        Ok(Descriptor::PasidCache(PasidCacheScope::Global))
    );
    // Device TLB with Linux's PFSID bits set; size encodings.
    assert_eq!(
        d(desc::dev_tlb(0x18, 0x18, 4, 0x8000, 0)),
        Ok(Descriptor::DeviceTlb {
            sid: 0x18,
            pasid: None,
            addr: 0x8000,
            npages: 1
        })
    );
    assert_eq!(
        d(desc::dev_tlb(0x18, 0x118, 4, 0x8000, 3)),
        Ok(Descriptor::DeviceTlb {
            sid: 0x18,
            pasid: None,
            addr: 0x8000,
            npages: 8
        })
    );
    assert_eq!(
        d(desc::pasid_dev_tlb(0x18, 0x18, 6, 0, 0, 52)),
        Ok(Descriptor::DeviceTlb {
            sid: 0x18,
            pasid: Some(6),
            addr: 0,
            npages: u64::MAX
        })
    );
    assert_eq!(
        d(desc::wait(0x1004, 9, true, true)),
        Ok(Descriptor::Wait {
            status: Some((0x1004, 9)),
            interrupt: true,
            fence: true,
            drain: false
        })
    );
    assert_eq!(
        d(desc::page_response(0x18, Some(3), 0x1ff, 0xf)),
        Ok(Descriptor::PageResponse {
            rid: 0x18,
            pasid: Some(3),
            prgi: 0x1ff,
            code: 0xf
        })
    );
    assert_eq!(d([4, 0, 0, 0]), Ok(Descriptor::InterruptEntryCache));

    // Unknown types, reserved granularities, reserved bits.
    for ty in [0u64, 0xa, 0xf, 1 << 9] {
        assert_eq!(d([ty, 0, 0, 0]), Err(IqeCause::InvalidType), "type {ty:#x}");
    }
    assert_eq!(d([1, 0, 0, 0]), Err(IqeCause::Reserved), "CC granularity 0");
    assert_eq!(
        d([2, 0, 0, 0]),
        Err(IqeCause::Reserved),
        "IOTLB granularity 0"
    );
    assert_eq!(
        d([6 | (1 << 4), 0, 0, 0]),
        Err(IqeCause::Reserved),
        "PIOTLB granularity 1"
    );
    assert_eq!(
        d([7 | (2 << 4), 0, 0, 0]),
        Err(IqeCause::Reserved),
        "PC granularity 2"
    );
    let reserved = [
        [desc::context_global()[0] | (1 << 50), 0, 0, 0],
        [desc::context_global()[0], 1, 0, 0],
        [desc::iotlb_global()[0] | (1 << 8), 0, 0, 0],
        [desc::iotlb_page(1, 0, 0, false)[0], 1 << 7, 0, 0],
        [desc::iotlb_page(1, 0, 19, false)[0], 19, 0, 0], // AM above MAMV
        [desc::dev_tlb(1, 1, 0, 0, 0)[0] | (1 << 4), 0, 0, 0],
        [desc::dev_tlb(1, 1, 0, 0, 0)[0], 1 << 1, 0, 0],
        [desc::wait(0, 0, false, false)[0] | (1 << 8), 0, 0, 0],
        [desc::wait(0, 0, false, false)[0], 1, 0, 0],
        [desc::piotlb_pasid(1, 1)[0] | (1 << 60), 0, 0, 0],
        [desc::pasid_cache(3, 0, 0)[0], 1, 0, 0],
        [desc::pasid_dev_tlb(1, 1, 1, 0, 0, 0)[0], 1 << 1, 0, 0],
        [desc::page_response(1, None, 0, 0)[0] | (1 << 5), 0, 0, 0],
        [desc::page_response(1, None, 0, 0)[0], 1, 0, 0],
        [desc::page_response(1, None, 0, 2)[0], 0, 0, 0], // response code 2
    ];
    for (i, q) in reserved.into_iter().enumerate() {
        assert_eq!(d(q), Err(IqeCause::Reserved), "case {i}: {q:x?}");
    }
    // Types the unit does not advertise.
    let plain = VtdConfig::default();
    assert_eq!(
        decode(&desc::dev_tlb(1, 1, 0, 0, 0), &plain),
        Err(IqeCause::InvalidType)
    );
    assert_eq!(
        decode(&desc::page_response(1, None, 0, 0), &plain),
        Err(IqeCause::InvalidType)
    );
    assert_eq!(
        decode(
            &[desc::wait(0, 0, false, false)[0] | (1 << 7), 0, 0, 0],
            &plain
        ),
        Err(IqeCause::Reserved),
        "page request drain without PDS"
    );
    let legacy = VtdConfig {
        scalable_mode: false,
        ..plain
    };
    assert_eq!(
        decode(&desc::pasid_cache(3, 0, 0), &legacy),
        Err(IqeCause::InvalidType)
    );
    assert_eq!(
        decode(&desc::piotlb_pasid(1, 1), &legacy),
        Err(IqeCause::InvalidType)
    );
}
