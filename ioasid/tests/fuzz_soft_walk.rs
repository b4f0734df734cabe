//! Fuzz target for the soft backend's page-table walkers (VT-d first stage and second level),
//! through their public API over a model guest memory: random, hostile tables (entries that
//! point outside guest RAM, at themselves, with reserved bits, large pages at every level),
//! random input addresses, access kinds and bindings. A seeded loop with a fixed budget
//! (`FUZZ_SEED`, `FUZZ_CASES`); the seed is printed.
//!
//! Checked on every walk: it ends (at most one read per level: the model memory never
//! changes under it, so no restart); a leaf maps the input address inside its page, to the
//! page the last entry read names, with exactly the rights the entries read grant (AND of
//! R/W and U/S, OR of XD for the first stage; AND of R, W, X for the second level), and
//! those rights allow the access; the first stage only ever sets A/D (and EA) bits, on
//! entries it read; the second level writes nothing.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::HashMap;

use ioasid::soft::table::ADDR_MASK;
use ioasid::soft::walk_s1::{walk_first_stage, S1Config};
use ioasid::soft::walk_sl::{walk_second_level, SlConfig};
use ioasid::soft::TableMemory;
use ioasid::{FaultPerm, FaultReason};

/// Guest RAM of the model: this many 4 KiB pages from GPA 0.
const PAGES: u64 = 48;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// Guest RAM as 8-byte entries, logging what the walker reads and writes.
struct ModelMemory {
    entries: HashMap<u64, u64>,
    reads: Vec<(u64, u64)>,
    updates: Vec<(u64, u64, u64)>,
}

impl TableMemory for ModelMemory {
    fn read_entry(&mut self, gpa: u64) -> Result<u64, FaultReason> {
        if gpa >= PAGES * 4096 || !gpa.is_multiple_of(8) {
            return Err(FaultReason::AddressOutOfRange);
        }
        let v = self.entries.get(&gpa).copied().unwrap_or(0);
        self.reads.push((gpa, v));
        Ok(v)
    }

    fn update_entry(&mut self, gpa: u64, old: u64, new: u64) -> Result<bool, FaultReason> {
        if gpa >= PAGES * 4096 || !gpa.is_multiple_of(8) {
            return Err(FaultReason::AddressOutOfRange);
        }
        let cur = self.entries.entry(gpa).or_insert(0);
        if *cur != old {
            return Ok(false);
        }
        *cur = new;
        self.updates.push((gpa, old, new));
        Ok(true)
    }
}

/// A hostile entry: mostly pointers into guest RAM with random flags, some outside it, some
/// not present, some random bits.
fn entry(rng: &mut Rng) -> u64 {
    let flags = rng.next() & 0x8000_0000_0000_0fff;
    match rng.below(10) {
        0 | 1 => 0,
        2 => rng.next(),
        3 => (rng.next() & ADDR_MASK) | flags | 1,
        _ => (rng.below(PAGES) << 12) | flags | if rng.chance(4, 5) { 0x7 } else { 0 },
    }
}

fn memory(rng: &mut Rng) -> ModelMemory {
    let mut entries = HashMap::new();
    for _ in 0..rng.below(300) {
        let gpa = rng.below(PAGES * 512) * 8;
        entries.insert(gpa, entry(rng));
    }
    ModelMemory {
        entries,
        reads: Vec::new(),
        updates: Vec::new(),
    }
}

/// Puts entries on the path of `addr` from `root` (most of the time, so walks reach leaves):
/// mostly valid pointers to guest RAM pages with permissive flags, sometimes a large-page
/// bit, reserved bits, a missing right or a pointer out of guest RAM.
fn populate_path(rng: &mut Rng, mem: &mut ModelMemory, root: u64, addr: u64, levels: u8) {
    let mut table = root & ADDR_MASK;
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let gpa = table.wrapping_add(((addr >> shift) & 0x1ff) * 8);
        if rng.chance(1, 12) {
            return;
        }
        let mut e = (rng.below(PAGES) << 12) | 0x7;
        if rng.chance(1, 8) {
            e &= !(1 << rng.below(3));
        }
        if rng.chance(1, 8) {
            e |= 1 << 7; // PS / SP
        }
        if rng.chance(1, 16) {
            e |= 1 << 63; // XD
        }
        if rng.chance(1, 20) {
            e |= 1 << (13 + rng.below(17)); // reserved in a large leaf
        }
        if rng.chance(1, 30) {
            e = (rng.next() & ADDR_MASK) | 0x7; // out of guest RAM
        }
        mem.entries.insert(gpa, e);
        table = e & ADDR_MASK;
    }
}

/// An input address: mostly canonical for the width, sometimes anything.
fn input(rng: &mut Rng, width: u32) -> u64 {
    if rng.chance(1, 10) {
        return rng.next();
    }
    let a = rng.next() & ((1u64 << width) - 1);
    // Sign-extend from bit width-1, as a canonical address is.
    let shift = 64 - width;
    (((a << shift) as i64) >> shift) as u64
}

fn access(rng: &mut Rng) -> FaultPerm {
    FaultPerm {
        read: rng.chance(3, 4),
        write: rng.chance(1, 2),
        exec: rng.chance(1, 6),
        privileged: rng.chance(1, 3),
    }
}

fn check_leaf_geometry(addr: u64, out: u64, base: u64, size: u64, last: u64, ctx: &str) {
    assert!(
        [1u64 << 12, 1 << 21, 1 << 30].contains(&size),
        "{ctx}: page size {size:#x}"
    );
    assert_eq!(base, addr & !(size - 1), "{ctx}: page base");
    assert_eq!(out & (size - 1), addr & (size - 1), "{ctx}: page offset");
    assert_eq!(
        out & !(size - 1),
        last & ADDR_MASK & !(size - 1),
        "{ctx}: output page"
    );
}

#[test]
fn fuzz_soft_walk() {
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x50f7_3a1c);
    let cases: usize = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    eprintln!("fuzz_soft_walk: seed {seed} (replay with FUZZ_SEED={seed})");
    let mut master = Rng(seed);
    let (mut s1_leaves, mut sl_leaves) = (0u32, 0u32);
    for case in 0..cases {
        let case_seed = master.next();
        let mut rng = Rng(case_seed);
        let mut mem = memory(&mut rng);
        let root = if rng.chance(9, 10) {
            rng.below(PAGES) << 12
        } else {
            rng.next() & ADDR_MASK
        };
        for step in 0..20 {
            let ctx = format!("case {case} (case seed {case_seed:#x}) step {step}");
            let perm = access(&mut rng);
            mem.reads.clear();
            mem.updates.clear();
            if rng.chance(1, 2) {
                let cfg = S1Config {
                    root,
                    levels: if rng.chance(1, 10) {
                        rng.below(8) as u8
                    } else {
                        4 + rng.below(2) as u8
                    },
                    sre: rng.chance(1, 2),
                    wpe: rng.chance(1, 2),
                    eafe: rng.chance(1, 2),
                };
                let width = 12 + 9 * u32::from(cfg.levels.clamp(4, 5));
                let addr = input(&mut rng, width);
                if rng.chance(4, 5) {
                    populate_path(&mut rng, &mut mem, root, addr, cfg.levels.clamp(4, 5));
                }
                let r = walk_first_stage(&mut mem, &cfg, addr, perm);
                // One pass reads one entry per level. A pass restarts (at most 8 passes) only
                // when its own A/D update changed an entry it had read at another level: a
                // table that aliases itself.
                let levels = usize::from(cfg.levels);
                assert!(
                    mem.reads.len() <= levels * 8,
                    "{ctx}: {} reads",
                    mem.reads.len()
                );
                if mem.reads.len() > levels {
                    let first: Vec<u64> = mem.reads[..levels].iter().map(|(g, _)| *g).collect();
                    let aliased = first
                        .iter()
                        .enumerate()
                        .any(|(i, g)| first[..i].contains(g));
                    assert!(aliased, "{ctx}: restarted without an aliased entry");
                }
                // With an aliased entry the passes cannot be told apart in the read log: the
                // rights check below needs the entries of exactly one pass.
                let gpas: Vec<u64> = mem.reads.iter().map(|(g, _)| *g).collect();
                let aliased = gpas.iter().enumerate().any(|(i, g)| gpas[..i].contains(g));
                for (gpa, old, new) in &mem.updates {
                    assert!(
                        mem.reads.iter().any(|(g, _)| g == gpa),
                        "{ctx}: update of an entry not read"
                    );
                    assert_eq!(old & !new, 0, "{ctx}: an update cleared bits");
                    assert_eq!(
                        (new & !old) & !((1 << 5) | (1 << 6) | (1 << 10)),
                        0,
                        "{ctx}: an update set more than A/D/EA"
                    );
                    if !cfg.eafe {
                        assert_eq!((new & !old) & (1 << 10), 0, "{ctx}: EA set without EAFE");
                    }
                }
                match r {
                    Ok(leaf) => {
                        s1_leaves += 1;
                        let used: Vec<u64> = mem.reads.iter().map(|(_, v)| *v).collect();
                        let last = *used.last().unwrap();
                        check_leaf_geometry(
                            addr,
                            leaf.gpa,
                            leaf.page_base,
                            leaf.page_size,
                            last,
                            &ctx,
                        );
                        if !aliased {
                            assert_eq!(
                                leaf.rights.writable,
                                used.iter().all(|e| e & 2 != 0),
                                "{ctx}: R/W"
                            );
                            assert_eq!(
                                leaf.rights.user,
                                used.iter().all(|e| e & 4 != 0),
                                "{ctx}: U/S"
                            );
                            assert_eq!(
                                leaf.rights.no_exec,
                                used.iter().any(|e| e >> 63 != 0),
                                "{ctx}: XD"
                            );
                        }
                        assert!(
                            leaf.rights.allow(perm, cfg.sre, cfg.wpe),
                            "{ctx}: a leaf that denies the access"
                        );
                    }
                    Err(f) => assert!(f.level <= cfg.levels, "{ctx}: fault level {}", f.level),
                }
            } else {
                let cfg = SlConfig {
                    root,
                    levels: if rng.chance(1, 10) {
                        rng.below(8) as u8
                    } else {
                        3 + rng.below(3) as u8
                    },
                };
                let width = 12 + 9 * u32::from(cfg.levels.clamp(3, 5));
                let addr = if rng.chance(1, 10) {
                    rng.next()
                } else {
                    rng.next() & ((1u64 << width) - 1)
                };
                if rng.chance(4, 5) {
                    populate_path(&mut rng, &mut mem, root, addr, cfg.levels.clamp(3, 5));
                }
                let r = walk_second_level(&mut mem, &cfg, addr, perm);
                assert!(
                    mem.reads.len() <= usize::from(cfg.levels),
                    "{ctx}: {} reads",
                    mem.reads.len()
                );
                assert!(mem.updates.is_empty(), "{ctx}: the second-level walk wrote");
                match r {
                    Ok(leaf) => {
                        sl_leaves += 1;
                        let used: Vec<u64> = mem.reads.iter().map(|(_, v)| *v).collect();
                        let last = *used.last().unwrap();
                        check_leaf_geometry(
                            addr,
                            leaf.addr,
                            leaf.page_base,
                            leaf.page_size,
                            last,
                            &ctx,
                        );
                        assert_eq!(leaf.read, used.iter().all(|e| e & 1 != 0), "{ctx}: R");
                        assert_eq!(leaf.write, used.iter().all(|e| e & 2 != 0), "{ctx}: W");
                        assert_eq!(leaf.exec, used.iter().all(|e| e & 4 != 0), "{ctx}: X");
                        assert!(!perm.read || leaf.read, "{ctx}: read allowed without R");
                        assert!(!perm.write || leaf.write, "{ctx}: write allowed without W");
                        assert!(!perm.exec || leaf.exec, "{ctx}: exec allowed without X");
                    }
                    Err(f) => assert!(f.level <= cfg.levels, "{ctx}: fault level {}", f.level),
                }
            }
        }
    }
    eprintln!("fuzz_soft_walk: {cases} cases, {s1_leaves} first-stage and {sl_leaves} second-level leaves checked");
    assert!(
        s1_leaves > 0 && sl_leaves > 0,
        "the generator never reached a leaf"
    );
}
