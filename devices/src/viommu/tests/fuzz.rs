//! A bounded, seeded property run of hostile guests: random register writes (any size and
//! alignment), root/context/PASID entries with random bits and pointers inside and outside
//! guest RAM, random invalidation descriptors, queues that wrap, tails beyond the queue, page
//! requests into a queue anywhere. Nothing may panic, every translation the bridge sees
//! must name a table inside guest RAM (or be Blocked/PassThrough), and the run must have
//! recorded faults and queue errors (so the hostile paths were reached).
//!
//! Seed and budget: the crate's `fuzz` plumbing (`FUZZ_SEED`, `FUZZ_CASES`; printed).

use std::ops::Range;

use super::*;
use crate::fuzz::{self, Rng};
use crate::viommu::linux_harness::desc;
use crate::viommu::prq::PageRequest;
use crate::viommu::regs::{self, gcmd};
use crate::viommu::vtd::VtdCounters;

/// The shared generator with the shorthands this target uses.
trait RngExt {
    fn next(&mut self) -> u64;
    fn percent(&mut self, p: u64) -> bool;
}

impl RngExt for Rng {
    fn next(&mut self) -> u64 {
        self.next_u64()
    }

    fn percent(&mut self, p: u64) -> bool {
        Rng::chance(self, p, 100)
    }
}

const BASE: u64 = 0x10_0000;
const SIZE: u64 = 256 << 10;

/// Checks every translation against guest RAM.
#[derive(Default)]
struct CheckingBridge {
    inner: FakeBridge,
    violations: Mutex<Vec<String>>,
}

fn inside(range: &Range<u64>, gpa: u64) -> bool {
    gpa >= range.start && gpa.checked_add(4096).is_some_and(|e| e <= range.end)
}

impl ViommuBridge for CheckingBridge {
    fn set_translation(
        &self,
        bdf: PciBdf,
        pasid: Pasid,
        t: Translation,
    ) -> Result<BridgeMode, BridgeError> {
        let ram = BASE..BASE + SIZE;
        let ok = match t {
            Translation::Blocked | Translation::PassThrough => true,
            Translation::SecondStage { table, .. } => {
                inside(&ram, table.root) && (3..=5).contains(&table.levels)
            }
            Translation::FirstStage { table, .. } => {
                inside(&ram, table.pgtbl_addr) && matches!(table.addr_width, 48 | 57)
            }
        };
        if !ok {
            self.violations
                .lock()
                .unwrap()
                .push(format!("{bdf} {pasid}: {t:?}"));
        }
        self.inner.set_translation(bdf, pasid, t)
    }

    fn invalidate(&self, batch: &[GuestInvalidation]) -> Result<(), BridgeError> {
        assert!(!batch.is_empty(), "empty invalidation batch");
        self.inner.invalidate(batch)
    }

    fn page_response(&self, resp: GuestPageResponse) -> Result<(), BridgeError> {
        self.inner.page_response(resp)
    }
}

fn configs() -> [VtdConfig; 5] {
    let d = VtdConfig::default();
    [
        d,
        full_cfg(),
        VtdConfig {
            scalable_mode: false,
            ..d
        },
        VtdConfig {
            pasid_bits: 10,
            aw_bits: 57,
            first_stage: true,
            ..d
        },
        VtdConfig {
            pasid_bits: 1,
            aw_bits: 39,
            device_tlb: true,
            ..d
        },
    ]
}

/// A guest address: mostly inside RAM (page aligned or not), sometimes outside or huge.
fn addr(r: &mut Rng) -> u64 {
    match r.below(10) {
        0 => r.next(),
        1 => BASE + SIZE - r.below(64) * 8,
        2 => r.below(BASE),
        3 => BASE + r.below(SIZE),
        _ => BASE + (r.below(SIZE / 4096) << 12),
    }
}

/// A qword that looks like a table entry: a pointer with random low bits.
fn entry(r: &mut Rng) -> u64 {
    let p = addr(r) & !0xfff;
    let low = if r.percent(70) {
        1 | (r.below(0x1000) & r.next())
    } else {
        r.below(0x1000)
    };
    let high = if r.percent(10) {
        r.next() & 0xfff0_0000_0000_0000
    } else {
        0
    };
    p | low | high
}

fn descriptor(r: &mut Rng, rids: &[u16]) -> [u64; 4] {
    let did = r.below(8) as u16;
    let sid = if r.percent(80) {
        r.pick(rids)
    } else {
        r.next() as u16
    };
    let pasid = r.below(300) as u32;
    let a = addr(r);
    let mut d = match r.below(14) {
        0 => desc::context_global(),
        1 => desc::context_device(did, sid, r.below(4) as u8),
        2 => desc::context_domain(did),
        3 => desc::iotlb_global(),
        4 => desc::iotlb_page(did, a, r.below(24) as u8, r.percent(50)),
        5 => desc::piotlb_page(did, pasid, a, r.below(24) as u8, r.percent(50)),
        6 => desc::pasid_cache(r.below(4) as u8, did, pasid),
        7 => desc::dev_tlb(sid, sid, 0, a, r.below(53) as u8),
        8 => desc::pasid_dev_tlb(sid, sid, pasid, 0, a, r.below(53) as u8),
        9 => desc::wait(addr(r), r.next() as u32, r.percent(50), r.percent(50)),
        10 => desc::page_response(
            sid,
            r.percent(50).then_some(pasid),
            r.below(512) as u16,
            r.pick(&[0, 1, 0xf, 3]),
        ),
        11 => desc::piotlb_pasid(did, pasid),
        12 => [r.next(), r.next(), r.next(), r.next()],
        _ => [r.below(16), 0, 0, 0],
    };
    if r.percent(10) {
        d[r.below(2) as usize] ^= 1 << r.below(64);
    }
    d
}

const REG_OFFSETS: &[u64] = &[
    regs::GCMD,
    regs::RTADDR,
    regs::CCMD,
    regs::FSTS,
    regs::FECTL,
    regs::FEDATA,
    regs::FEADDR,
    regs::IQT,
    regs::IQA,
    regs::ICS,
    regs::IECTL,
    regs::PQH,
    regs::PQT,
    regs::PQA,
    regs::PRS,
    regs::PECTL,
    regs::IVA,
    regs::IOTLB,
    regs::FRCD_OFFSET,
    regs::FRCD_OFFSET + 12,
    regs::FRCD_OFFSET + 0x3c,
    regs::CAP,
    regs::IQH,
];

struct Case {
    vtd: Vtd,
    mem: Arc<VecGuestMemory>,
    bridge: Arc<CheckingBridge>,
    rids: Vec<u16>,
}

fn write_reg(c: &mut Case, r: &mut Rng) {
    let off = if r.percent(85) {
        r.pick(REG_OFFSETS)
    } else {
        r.below(0x1100)
    };
    let len = if r.percent(90) {
        r.pick(&[4usize, 8])
    } else {
        r.pick(&[1usize, 2, 3, 16])
    };
    let v = match off {
        regs::GCMD => {
            let mut v = r.next() as u32 & 0xff80_0000;
            if r.percent(50) {
                v |= gcmd::TE | gcmd::QIE;
            }
            u64::from(v)
        }
        regs::RTADDR => (addr(r) & !0xfff) | (r.below(4) << 10),
        regs::IQA => (addr(r) & !0xfff) | (r.below(2) << 11) | r.below(8),
        regs::PQA => (addr(r) & !0xfff) | r.below(8),
        regs::IQT | regs::PQH => r.below(0x8_0000),
        regs::CCMD => (1 << 63) | (r.below(4) << 61) | r.next() & 0xffff_ffff,
        regs::IOTLB => (1 << 63) | (r.below(4) << 60) | (r.next() & 0xffff_0000_0000),
        _ => r.next(),
    };
    let bytes = v.to_le_bytes();
    let mut data = vec![0u8; len];
    for (d, b) in data.iter_mut().zip(bytes.iter().cycle()) {
        *d = *b;
    }
    c.vtd.write(0, off, &data);
}

fn scribble_tables(c: &mut Case, r: &mut Rng) {
    // Entries at plausible table positions: the latched root, context tables behind it,
    // PASID directories and tables anywhere in RAM.
    let mut b = [0u8; 8];
    c.vtd.read(0, regs::RTADDR, &mut b);
    let root = u64::from_le_bytes(b) & !0xfff;
    for _ in 0..r.below(16) {
        let at = match r.below(4) {
            0 => root.wrapping_add(r.below(256) * 16 + r.below(2) * 8),
            1 => BASE + (r.below(SIZE / 4096) << 12) + r.below(128) * 32 + r.below(4) * 8,
            2 => BASE + (r.below(SIZE / 4096) << 12) + r.below(64) * 64 + r.below(8) * 8,
            _ => BASE + r.below(SIZE / 8) * 8,
        };
        let v = match r.below(3) {
            0 => entry(r),
            1 => r.next(),
            _ => r.below(4) << 9 | (r.next() & 0x3f) | (addr(r) & !0xfff),
        };
        let _ = c.mem.write_u64(at, v);
    }
}

fn queue_descriptors(c: &mut Case, r: &mut Rng) {
    if r.percent(60) {
        // The guest's IQE handler: clear and go on.
        c.vtd.write(0, regs::FSTS, &regs::fsts::IQE.to_le_bytes());
    }
    let mut b = [0u8; 8];
    c.vtd.read(0, regs::IQA, &mut b);
    let iqa = u64::from_le_bytes(b);
    c.vtd.read(0, regs::IQH, &mut b);
    let head = u64::from_le_bytes(b);
    let size = 4096u64 << (iqa & 7);
    let dsize = if iqa & (1 << 11) != 0 { 32 } else { 16 };
    let n = r.below(12);
    let mut tail = head;
    for _ in 0..n {
        let d = descriptor(r, &c.rids);
        for (i, q) in d.iter().take(dsize as usize / 8).enumerate() {
            let _ = c
                .mem
                .write_u64((iqa & !0xfff).wrapping_add(tail + i as u64 * 8), *q);
        }
        tail = (tail + dsize) % size;
    }
    if r.percent(5) {
        tail = r.below(0x8_0000);
    }
    c.vtd.write(0, regs::IQT, &(tail as u32).to_le_bytes());
}

fn page_request(c: &mut Case, r: &mut Rng) {
    let rid = if r.percent(80) {
        r.pick(&c.rids)
    } else {
        r.next() as u16
    };
    let bdf = PciBdf::new(
        0,
        (rid >> 8) as u8,
        ((rid >> 3) & 0x1f) as u8,
        (rid & 7) as u8,
    )
    .unwrap();
    if r.percent(50) {
        // Make the requester's context entry take page requests (P, DTE, PASIDE, PRE), so
        // that the queue itself is exercised.
        let mut b = [0u8; 8];
        c.vtd.read(0, regs::RTADDR, &mut b);
        let root = u64::from_le_bytes(b) & !0xfff;
        let devfn = u64::from(rid & 0xff);
        let re_addr = root.wrapping_add(u64::from(rid >> 8) * 16 + (devfn >> 7) * 8);
        if let Ok(mut re) = c.mem.read_u64(re_addr) {
            if re & 1 == 0 || r.percent(30) {
                re = (BASE + (r.below(SIZE / 4096) << 12)) | 1;
                let _ = c.mem.write_u64(re_addr, re);
            }
            let ce = (re & !0xfff).wrapping_add((devfn & 0x7f) * 32);
            let _ = c.mem.write_u64(ce, (addr(r) & !0xfff) | 0x1d);
            for q in 1..4 {
                let _ = c.mem.write_u64(ce.wrapping_add(q * 8), 0);
            }
        }
        if r.percent(50) {
            let pq = (addr(r) & !0xfff) | r.below(3);
            c.vtd.write(0, regs::PQA, &pq.to_le_bytes());
        }
    }
    let _ = c.vtd.post_page_request(PageRequest {
        bdf,
        pasid: r.percent(50).then_some(Pasid(r.below(1 << 20) as u32)),
        prgi: r.next() as u16,
        last: r.percent(50),
        read: r.percent(50),
        write: r.percent(50),
        exec: r.percent(10),
        privileged: r.percent(10),
        addr: r.next(),
    });
}

fn run_case(r: &mut Rng, ops: u64) -> (Vec<String>, VtdCounters) {
    let cfg = r.pick(&configs());
    let mem = Arc::new(VecGuestMemory::new(BASE, SIZE as usize));
    let bridge = Arc::new(CheckingBridge::default());
    let msi = Arc::new(FakeMsi::default());
    let vtd = Vtd::new(cfg, mem.clone(), bridge.clone(), msi).unwrap();
    let mut c = Case {
        vtd,
        mem,
        bridge,
        rids: Vec::new(),
    };
    for _ in 0..1 + r.below(4) {
        let rid = if r.percent(70) {
            (r.below(32) << 3) as u16
        } else {
            r.next() as u16
        };
        let bdf = PciBdf::new(
            0,
            (rid >> 8) as u8,
            ((rid >> 3) & 0x1f) as u8,
            (rid & 7) as u8,
        )
        .unwrap();
        c.vtd.add_device(bdf);
        c.rids.push(rid);
    }
    // Start like a guest would most of the time: queue and root programmed and enabled.
    if r.percent(80) {
        let iq = BASE + (r.below(SIZE / 4096) << 12);
        let dw = if cfg.scalable_mode && r.percent(80) {
            1u64 << 11
        } else {
            0
        };
        c.vtd
            .write(0, regs::IQA, &(iq | dw | r.below(2)).to_le_bytes());
        let root = addr(r) & !0xfff;
        let ttm = if r.percent(80) {
            u64::from(cfg.scalable_mode) << 10
        } else {
            r.below(4) << 10
        };
        c.vtd.write(0, regs::RTADDR, &(root | ttm).to_le_bytes());
        c.vtd
            .write(0, regs::GCMD, &(gcmd::QIE | gcmd::SRTP).to_le_bytes());
        c.vtd
            .write(0, regs::GCMD, &(gcmd::QIE | gcmd::TE).to_le_bytes());
        c.vtd.write(0, regs::FECTL, &0u32.to_le_bytes());
    }
    // Some cases start with whole pages of random bytes (the latched root table's among
    // them).
    if r.percent(30) {
        let mut b = [0u8; 8];
        c.vtd.read(0, regs::RTADDR, &mut b);
        let root = u64::from_le_bytes(b) & !0xfff;
        let pages = [root, addr(r) & !0xfff, addr(r) & !0xfff, addr(r) & !0xfff];
        for p in pages {
            for i in 0..512 {
                let _ = c.mem.write_u64(p.wrapping_add(i * 8), r.next());
            }
        }
    }
    for _ in 0..ops {
        match r.below(10) {
            0..=2 => write_reg(&mut c, r),
            3..=5 => scribble_tables(&mut c, r),
            6..=8 => queue_descriptors(&mut c, r),
            _ => page_request(&mut c, r),
        }
        if r.percent(3) {
            if let Some(&rid) = c.rids.first() {
                let bdf = PciBdf::new(
                    0,
                    (rid >> 8) as u8,
                    ((rid >> 3) & 0x1f) as u8,
                    (rid & 7) as u8,
                )
                .unwrap();
                c.vtd.remove_device(bdf);
                c.vtd.add_device(bdf);
            }
        }
    }
    // Every register reads without panic at every width and alignment.
    for off in (0..0x280).step_by(4) {
        let mut b4 = [0u8; 4];
        c.vtd.read(0, off, &mut b4);
        let mut b8 = [0u8; 8];
        c.vtd.read(0, off, &mut b8);
    }
    let v = c.bridge.violations.lock().unwrap().clone();
    (v, c.vtd.counters())
}

#[test]
fn viommu_bad_tables_fault_not_panic() {
    const OPS: u64 = 40;
    let seed = fuzz::seed("viommu_bad_tables_fault_not_panic", 0x5eed_7d00_2026_1204);
    let cases = fuzz::cases(3000) as u64;
    let mut total = VtdCounters::default();
    for case in 0..cases {
        let mut r = Rng::new(seed ^ case.wrapping_mul(0x9e37_79b9));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(&mut r, OPS)));
        let Ok((violations, c)) = run else {
            panic!("seed {seed} case {case}: the model panicked (replay with FUZZ_SEED={seed})");
        };
        assert!(
            violations.is_empty(),
            "seed {seed} case {case}: translations outside guest RAM: {violations:?}"
        );
        total.faults_recorded += c.faults_recorded;
        total.queue_errors += c.queue_errors;
        total.set_translation_calls += c.set_translation_calls;
        total.invalidate_calls += c.invalidate_calls;
        total.page_requests += c.page_requests;
        total.prq_full += c.prq_full;
        total.bad_accesses += c.bad_accesses;
        total.page_responses += c.page_responses;
        total.desc_wait += c.desc_wait;
        total.desc_context_cache += c.desc_context_cache;
        total.desc_pasid_cache += c.desc_pasid_cache;
        total.desc_iotlb += c.desc_iotlb + c.desc_pasid_iotlb;
        total.desc_device_tlb += c.desc_device_tlb + c.desc_pasid_device_tlb;
    }
    println!("viommu_bad_tables_fault_not_panic: totals {total:?}");
    assert!(total.faults_recorded > 0, "no fault was recorded");
    assert!(total.queue_errors > 0, "no queue error");
    assert!(total.set_translation_calls > 0);
    assert!(total.invalidate_calls > 0);
    assert!(total.bad_accesses > 0);
    assert!(
        total.page_requests > 0,
        "the page request queue was never reached"
    );
    assert!(total.desc_wait > 0 && total.desc_context_cache > 0 && total.desc_pasid_cache > 0);
}

/// Pointers at the very top of the address space: every sum of a table pointer and an
/// offset must be checked (no overflow panic in debug builds), and every such table faults.
#[test]
fn viommu_hostile_pointers_at_top_of_address_space() {
    let cfg = VtdConfig {
        pasid_bits: 20,
        ..full_cfg()
    };
    let mut rig = Rig::new(cfg);
    let dev = PciBdf::new(0, 0xff, 31, 7).unwrap();
    rig.vtd.add_device(dev);
    rig.vtd.add_device(bdf(1));
    let top = 0xffff_ffff_ffff_f000u64;
    rig.w64(regs::RTADDR, top | (1 << 10));
    rig.w32(regs::GCMD, gcmd::SRTP);
    rig.w32(regs::GCMD, gcmd::TE);
    // Root table outside RAM: both devices blocked, faults recorded.
    assert!(rig.vtd.counters().faults_recorded >= 1);
    assert_eq!(
        rig.vtd.translation(dev, Pasid(0)),
        Some(Translation::Blocked)
    );
    // A root table in RAM whose context entry names a PASID directory at the top, with the
    // largest PDTS and PASIDE: the bounded scan faults instead of wrapping.
    rig.mem.write_u64(0x20_0000, 0x20_1000 | 1).unwrap();
    rig.mem
        .write_u64(0x20_1000 + 8 * 32, top | (7 << 9) | (1 << 3) | 1)
        .unwrap();
    rig.w64(regs::RTADDR, 0x20_0000 | (1 << 10));
    rig.w32(regs::GCMD, gcmd::TE | gcmd::SRTP);
    // Queue at the top of the address space with the largest size.
    rig.w64(regs::IQA, top | (1 << 11) | 7);
    rig.w32(regs::GCMD, gcmd::TE | gcmd::QIE);
    rig.w32(regs::IQT, 0x7_ffe0);
    assert_ne!(rig.r32(regs::FSTS) & regs::fsts::IQE, 0);
    assert_eq!(rig.r64(regs::IQERCD) & 0xf, 2, "fetch error");
    // A queue in RAM with a wait whose status address is the top of memory, a context
    // invalidation that scans the hostile directory, and an IOTLB register invalidation
    // with the largest address mask.
    // (Clearing IQE resumes the queue where it stopped: empty it first.)
    rig.w32(regs::IQT, 0);
    rig.w32(regs::FSTS, regs::fsts::IQE);
    assert_eq!(rig.r32(regs::FSTS) & regs::fsts::IQE, 0);
    let mut q = Queue::enable(&mut rig);
    q.submit(
        &mut rig,
        &[
            desc::context_global(),
            desc::pasid_cache(1, 0, (1 << 20) - 1),
            desc::wait(u64::MAX, 1, true, false),
        ],
    );
    assert_eq!(rig.r64(regs::IQH), q.tail);
    rig.w64(regs::IVA, u64::MAX);
    rig.w64(regs::IOTLB, (1 << 63) | (3 << 60));
    // Page request queue at the top.
    rig.w64(regs::PQA, top | 7);
    rig.w64(regs::PQT, 0x7_ffe0);
    let _ = rig.vtd.post_page_request(PageRequest {
        bdf: dev,
        pasid: Some(Pasid((1 << 20) - 1)),
        prgi: u16::MAX,
        last: true,
        read: true,
        write: true,
        exec: true,
        privileged: true,
        addr: u64::MAX,
    });
    let c = rig.vtd.counters();
    assert!(c.faults_recorded >= 2, "{c:?}");
    for (_, _, t) in rig.vtd.translations() {
        assert!(matches!(t, Translation::Blocked | Translation::PassThrough));
    }
}
