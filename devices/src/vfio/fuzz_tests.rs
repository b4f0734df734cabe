//! Fuzz targets and regression tests for what a device (its config space) and a guest (its
//! config and BAR accesses) can throw at the vfio-pci model. See [`crate::fuzz`].
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::backend::{IrqInfo, RegionInfo, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use super::fake::{FakeSink, FakeVfio};
use super::*;
use crate::fuzz::{self, Rng};
use crate::pci::config::{
    cap_id, ext_cap_id, reg, status, walk_capabilities, walk_ext_capabilities,
    EXT_CONFIG_SPACE_SIZE,
};
use crate::pci::PciDevice;

fn put16(c: &mut [u8], o: usize, v: u16) {
    if let Some(s) = c.get_mut(o..o + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put32(c: &mut [u8], o: usize, v: u32) {
    if let Some(s) = c.get_mut(o..o + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// A hostile config space: random bytes with capability lists whose IDs are the ones the
/// model treats specially, whose pointers run to the end of the space, backwards, or into
/// each other, and whose length fields lie.
pub(crate) fn hostile_config(rng: &mut Rng) -> Vec<u8> {
    let size = if rng.chance(4, 5) { 4096 } else { 256 };
    let mut c = vec![0u8; size];
    rng.fill(&mut c);
    // A plausible header most of the time, so the walks are reached.
    if rng.chance(9, 10) {
        c[reg::STATUS] |= status::CAP_LIST as u8;
        c[reg::HEADER_TYPE] &= 0x80;
    }
    let std_ids = [
        cap_id::PM,
        cap_id::MSI,
        cap_id::MSIX,
        cap_id::EXP,
        cap_id::VENDOR,
        cap_id::VPD,
        0xff,
    ];
    let near_end_std = |rng: &mut Rng| 0xf0 + rng.index(16) as u8;
    let mut ptr = if rng.chance(1, 3) {
        near_end_std(rng)
    } else {
        0x40 + rng.index(0xc0) as u8
    };
    c[reg::CAPABILITY_LIST] = ptr;
    for _ in 0..rng.index(8) {
        let o = usize::from(ptr & !3);
        if o + 1 >= 256 {
            break;
        }
        c[o] = if rng.chance(1, 8) {
            rng.next_u64() as u8
        } else {
            rng.pick(&std_ids)
        };
        ptr = match rng.index(4) {
            0 => near_end_std(rng),
            1 => ptr, // a loop onto itself
            _ => 0x40 + rng.index(0xc0) as u8,
        };
        c[o + 1] = ptr;
    }
    if size == 4096 {
        let ext_ids = [
            ext_cap_id::AER,
            ext_cap_id::VSEC,
            ext_cap_id::DVSEC,
            ext_cap_id::PASID,
            ext_cap_id::ATS,
            ext_cap_id::PRI,
            ext_cap_id::SRIOV,
            ext_cap_id::DEV3,
        ];
        let near_end = |rng: &mut Rng| 0xf00 + rng.index(0x100);
        let mut o = 0x100;
        for _ in 0..1 + rng.index(8) {
            let id = if rng.chance(1, 8) {
                rng.next_u64() as u16
            } else {
                rng.pick(&ext_ids)
            };
            let next = match rng.index(5) {
                0 | 1 => near_end(rng),
                2 => o,
                3 => 0x100 + rng.index(0x100),
                _ => 0x100 + rng.index(0xf00),
            } & !3;
            let hdr = u32::from(id) | ((rng.index(16) as u32) << 16) | ((next as u32) << 20);
            put32(&mut c, o, hdr);
            if matches!(id, ext_cap_id::VSEC | ext_cap_id::DVSEC) && rng.chance(1, 2) {
                // Length field (bits 31:20 of the second dword): often larger than what is left.
                let any = rng.below(0x1000) as u32;
                let len = rng.pick(&[0u32, 4, 8, 12, 0x100, 0xfff, any]);
                put32(&mut c, o + 4, (len << 20) | (rng.below(1 << 20) as u32));
            }
            if next < 0x100 {
                break;
            }
            o = next;
        }
    }
    c
}

fn region(size: u64, mmap: bool) -> RegionInfo {
    RegionInfo {
        size,
        read: true,
        write: true,
        mmap,
        ..Default::default()
    }
}

fn irq(count: u32) -> IrqInfo {
    IrqInfo {
        count,
        eventfd: true,
        maskable: true,
        automasked: false,
    }
}

/// A fake device around `config`, with random BAR regions and interrupt counts.
pub(crate) fn hostile_fake(rng: &mut Rng, config: Vec<u8>) -> FakeVfio {
    let mut regions = BTreeMap::new();
    let cfg_size = rng.pick(&[
        config.len() as u64,
        config.len() as u64,
        64,
        255,
        4095,
        8192,
    ]);
    regions.insert(CONFIG_REGION, region(cfg_size, false));
    let mut bar_mem = BTreeMap::new();
    for i in 0..6u32 {
        if rng.chance(1, 2) {
            let any = rng.below(0x20000) + 1;
            let size = rng.pick(&[0x10u64, 0x100, 0x1000, 0x4000, 0x10000, any]);
            regions.insert(i, region(size, rng.chance(1, 4)));
            bar_mem.insert(i, vec![0u8; size.min(0x20000) as usize]);
        }
    }
    let mut irqs = BTreeMap::new();
    irqs.insert(INTX_IRQ, irq(rng.below(2) as u32));
    irqs.insert(MSI_IRQ, irq(rng.pick(&[0u32, 1, 4, 32, 33])));
    irqs.insert(MSIX_IRQ, irq(rng.pick(&[0u32, 1, 16, 2048, 4096])));
    FakeVfio::from_parts(config, regions, bar_mem, irqs, rng.chance(1, 2))
}

fn options(rng: &mut Rng) -> VfioPciOptions {
    VfioPciOptions {
        vpasid: rng.chance(1, 3).then(|| VpasidConfig {
            max_pasid_width: rng.below(32) as u8,
            execute: rng.chance(1, 2),
            privileged: rng.chance(1, 2),
            ats: rng.chance(1, 2),
            pri_capacity: rng
                .chance(1, 2)
                .then(|| rng.pick(&[0u32, 1, 32, VPRI_DEFAULT_CAPACITY, u32::MAX])),
            // Sometimes an explicit offset, aligned or not, inside or past the end: a
            // colliding one is refused with an error, never a panic.
            offset: rng.chance(1, 4).then(|| {
                rng.pick(&[0usize, 0xfc, 0x100, 0x102, 0xfe0, 0xff8, 0xffc, 0x1000])
                    .max(rng.index(0x1100))
            }),
        }),
    }
}

/// The guest's view of config space, dword by dword.
fn guest_view(d: &mut VfioPciDevice) -> Vec<u8> {
    let mut v = Vec::with_capacity(EXT_CONFIG_SPACE_SIZE);
    for i in 0..EXT_CONFIG_SPACE_SIZE / 4 {
        v.extend(d.read_config_register(i).to_le_bytes());
    }
    v
}

/// Walks the list a guest sees as Linux does and checks that it is well formed: every
/// header in bounds, no offset twice, a null terminator reached.
fn check_guest_lists(view: &[u8], size: usize) {
    if view[reg::STATUS] & status::CAP_LIST as u8 != 0 {
        let mut seen = HashSet::new();
        let mut p = usize::from(view[reg::CAPABILITY_LIST]);
        while p != 0 {
            assert!((0x40..0xff).contains(&p), "standard capability at {p:#x}");
            assert!(seen.insert(p), "standard list loops at {p:#x}");
            p = usize::from(view[p + 1]);
        }
    }
    if size == EXT_CONFIG_SPACE_SIZE {
        let mut seen = HashSet::new();
        let mut p = 0x100;
        loop {
            let hdr = u32::from_le_bytes([view[p], view[p + 1], view[p + 2], view[p + 3]]);
            if hdr == 0 {
                break;
            }
            assert!(seen.insert(p), "extended list loops at {p:#x}");
            p = (hdr >> 20) as usize;
            if p == 0 {
                break;
            }
            assert!(
                (0x100..=0xffc).contains(&p),
                "extended capability at {p:#x}"
            );
        }
    }
}

/// One hostile device: the model is built (or refused with an error), and the guest view
/// of its config space is a well-formed list.
fn config_case(rng: &mut Rng) {
    let config = hostile_config(rng);
    let fake = Arc::new(hostile_fake(rng, config));
    let sink = Arc::new(FakeSink::default());
    let id = VfioDeviceId::Mdev("fuzz".into());
    let opts = options(rng);
    let Ok(mut dev) = VfioPciDevice::new(id, fake, sink, opts) else {
        return;
    };
    // A 256-byte model reads 0 past its end, which ends the extended walk at once.
    let view = guest_view(&mut dev);
    check_guest_lists(&view, EXT_CONFIG_SPACE_SIZE);
    check_vsva(&dev, &view);
    if let (Some(want), Some(p)) = (
        opts.vpasid.and_then(|v| v.offset),
        vsva_chain(&dev).first().map(|c| c.0),
    ) {
        assert_eq!(p, want, "explicit vPASID offset not honoured");
    }
}

/// The synthesized chain's capabilities (offset, ID, length) the guest sees.
fn vsva_chain(d: &VfioPciDevice) -> Vec<(usize, u16, usize)> {
    let mut v: Vec<(usize, u16, usize)> = d
        .capabilities()
        .iter()
        .filter(|c| c.extended && c.policy != CapPolicy::Hide)
        .filter_map(|c| {
            let len = match c.id {
                ext_cap_id::PASID => 8,
                ext_cap_id::ATS => 8,
                ext_cap_id::PRI => 16,
                _ => return None,
            };
            Some((c.offset, c.id, len))
        })
        .collect();
    v.sort_unstable();
    v
}

/// The vSVA chain's invariants in the guest's view: contiguous from the vPASID, inside
/// 0x100..0x1000, reachable by the guest's walk, covering no other header the guest sees;
/// PRI allocation within capacity, Stopped exactly while disabled, Reset reads 0; PASID and
/// ATS control hold only writable bits.
fn check_vsva(d: &VfioPciDevice, view: &[u8]) {
    let chain = vsva_chain(d);
    let Some(&(start, id, _)) = chain.first() else {
        return;
    };
    assert_eq!(
        id,
        ext_cap_id::PASID,
        "chain does not start with PASID: {chain:?}"
    );
    let mut at = start;
    for &(o, _, len) in &chain {
        assert_eq!(o, at, "chain not contiguous: {chain:?}");
        at += len;
    }
    assert!(start >= 0x100 && at <= EXT_CONFIG_SPACE_SIZE, "{chain:?}");
    let u16_at = |o: usize| u16::from_le_bytes([view[o], view[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(view[o..o + 4].try_into().unwrap());
    let walked: Vec<usize> = walk_ext_capabilities(view)
        .iter()
        .map(|c| c.offset)
        .collect();
    for &(o, _, _) in &chain {
        assert!(walked.contains(&o), "chain cap at {o:#x} not reachable");
    }
    for w in walked {
        let ours = chain.iter().any(|c| c.0 == w);
        assert!(
            ours || w + 4 <= start || w >= at,
            "guest-visible header at {w:#x} inside the chain {chain:?}"
        );
    }
    for &(o, id, _) in &chain {
        match id {
            ext_cap_id::PASID => {
                let cap = u16_at(o + 4);
                assert!((1..=20).contains(&((cap >> 8) & 0x1f)), "width {cap:#x}");
                assert_eq!(u16_at(o + 6) & !(1 | (cap & 6)), 0, "PASID control");
            }
            ext_cap_id::ATS => assert_eq!(u16_at(o + 6) & !0x801f, 0, "ATS control"),
            _ => {
                let (ctrl, status) = (u16_at(o + 4), u16_at(o + 6));
                assert_eq!(ctrl & !1, 0, "PRI control (Reset self-clears)");
                assert_eq!(status & (1 << 8) != 0, ctrl & 1 == 0, "Stopped vs Enable");
                assert!(u32_at(o + 12) <= u32_at(o + 8), "allocation above capacity");
            }
        }
    }
}

#[test]
fn fuzz_config_space_walk() {
    let seed = fuzz::seed("fuzz_config_space_walk", 0x5eed_c0f1);
    let budget = fuzz::cases(20_000);
    let failed = fuzz::run("fuzz_config_space_walk", seed, budget, |rng| {
        // The walkers alone over raw random images.
        let mut img = vec![0u8; rng.pick(&[0usize, 1, 0x35, 255, 256, 4095, 4096])];
        rng.fill(&mut img);
        if let Some(b) = img.get_mut(reg::STATUS) {
            *b |= status::CAP_LIST as u8;
        }
        let caps = walk_capabilities(&img);
        let mut seen = HashSet::new();
        for c in &caps {
            assert!(c.offset + 2 <= img.len().min(256));
            assert!(
                seen.insert(c.offset),
                "standard walk repeats {:#x}",
                c.offset
            );
        }
        let mut seen = HashSet::new();
        for c in walk_ext_capabilities(&img) {
            assert!(c.offset + 4 <= img.len());
            assert!(
                seen.insert(c.offset),
                "extended walk repeats {:#x}",
                c.offset
            );
        }
        // And the whole model over a hostile device.
        config_case(rng);
    });
    assert_eq!(failed, 0, "{failed} of {budget} cases failed (seed {seed})");
}

/// A 4 KiB (or 256-byte) config space with a type 0 header, BAR0 a 64 KiB memory BAR, and
/// the capability list bit set.
fn base_config(size: usize) -> Vec<u8> {
    let mut c = vec![0u8; size];
    put16(&mut c, reg::VENDOR_ID, 0x8086);
    put16(&mut c, reg::DEVICE_ID, 0x1234);
    put16(&mut c, reg::STATUS, status::CAP_LIST);
    c
}

fn plain_fake(config: Vec<u8>) -> FakeVfio {
    let mut regions = BTreeMap::new();
    regions.insert(CONFIG_REGION, region(config.len() as u64, false));
    regions.insert(0, region(0x10000, false));
    let mut bar_mem = BTreeMap::new();
    bar_mem.insert(0, vec![0u8; 0x10000]);
    let mut irqs = BTreeMap::new();
    irqs.insert(MSI_IRQ, irq(4));
    irqs.insert(MSIX_IRQ, irq(16));
    FakeVfio::from_parts(config, regions, bar_mem, irqs, false)
}

fn build(config: Vec<u8>, options: VfioPciOptions) -> VfioPciDevice {
    VfioPciDevice::new(
        VfioDeviceId::Mdev("hostile".into()),
        Arc::new(plain_fake(config)),
        Arc::new(FakeSink::default()),
        options,
    )
    .unwrap()
}

fn ext_hdr(id: u16, next: usize) -> u32 {
    u32::from(id) | (1 << 16) | ((next as u32) << 20)
}

/// Regression tests for the layouts the fuzz target found (a VSEC header in the last dword
/// indexed past the 4 KiB snapshot on the control thread, during add-device) and their
/// neighbours: headers near 0xfff, truncated capabilities, looped and self-referencing
/// lists, and capabilities overlapping an emulated one.
#[test]
fn config_space_hostile_layouts_no_panic() {
    // VSEC and DVSEC in the last dword, reached from 0x100: the model keeps them visible,
    // the guest list ends there, and their (absent) body is not forwarded.
    for id in [ext_cap_id::VSEC, ext_cap_id::DVSEC] {
        let mut c = base_config(4096);
        c[reg::STATUS] = 0;
        put32(&mut c, 0x100, ext_hdr(ext_cap_id::AER, 0xffc));
        put32(&mut c, 0xffc, ext_hdr(id, 0));
        let mut d = build(c, VfioPciOptions::default());
        let view = guest_view(&mut d);
        check_guest_lists(&view, EXT_CONFIG_SPACE_SIZE);
        let caps: Vec<(usize, u16)> = d
            .capabilities()
            .iter()
            .filter(|c| c.extended && c.policy == CapPolicy::Pass)
            .map(|c| (c.offset, c.id))
            .collect();
        assert_eq!(caps, vec![(0xffc, id)]);
        // AER at 0x100 is hidden: a null header at 0x100 links to the VSEC.
        assert_eq!(
            u32::from_le_bytes(view[0x100..0x104].try_into().unwrap()) >> 20,
            0xffc
        );
    }
    // A VSEC whose length runs past the end: writes beyond its header reach the device only
    // inside config space.
    let mut c = base_config(4096);
    put32(&mut c, 0x100, ext_hdr(ext_cap_id::VSEC, 0));
    put32(&mut c, 0x104, 0xfff << 20);
    let mut d = build(c, VfioPciOptions::default());
    d.write_config_register(0xffc / 4, 0, &[1, 2, 3, 4]);
    check_guest_lists(&guest_view(&mut d), EXT_CONFIG_SPACE_SIZE);
    // Extended list pointing at itself, and at 0xfff (not dword aligned, last byte).
    for next in [0x100usize, 0xfff] {
        let mut c = base_config(4096);
        put32(&mut c, 0x100, ext_hdr(ext_cap_id::VSEC, next));
        let mut d = build(c, VfioPciOptions::default());
        check_guest_lists(&guest_view(&mut d), EXT_CONFIG_SPACE_SIZE);
    }
    // PASID in the last dword with a vPASID requested: the vPASID (8 bytes) cannot go there
    // and takes the fallback place; the guest sees a whole capability.
    let mut c = base_config(4096);
    put32(&mut c, 0x100, ext_hdr(ext_cap_id::AER, 0xffc));
    put32(&mut c, 0xffc, ext_hdr(ext_cap_id::PASID, 0));
    let vpasid = VpasidConfig {
        max_pasid_width: 20,
        execute: false,
        privileged: false,
        ..Default::default()
    };
    let mut d = build(
        c,
        VfioPciOptions {
            vpasid: Some(vpasid),
        },
    );
    let view = guest_view(&mut d);
    check_guest_lists(&view, EXT_CONFIG_SPACE_SIZE);
    let p = d
        .capabilities()
        .iter()
        .find(|c| c.id == ext_cap_id::PASID)
        .unwrap()
        .offset;
    assert!(p + 8 <= EXT_CONFIG_SPACE_SIZE, "vPASID at {p:#x}");
    assert_eq!(
        (u16::from_le_bytes([view[p + 4], view[p + 5]]) >> 8) & 0x1f,
        20
    );
    // Standard capabilities in the last bytes of the 256: PCIe (its version byte is the
    // last byte), MSI and MSI-X truncated, vendor with a length past the end.
    for (at, id) in [
        (0xfc, cap_id::EXP),
        (0xf8, cap_id::MSI),
        (0xf8, cap_id::MSIX),
        (0xfc, cap_id::VENDOR),
        (0xfe, cap_id::PM),
    ] {
        for size in [256, 4096] {
            let mut c = base_config(size);
            c[reg::CAPABILITY_LIST] = at;
            c[usize::from(at)] = id;
            c[usize::from(at) + 1] = 0;
            if id == cap_id::VENDOR {
                c[usize::from(at) + 2] = 0xff;
            }
            if id == cap_id::MSI {
                // 64-bit with per-vector masking: 0x18 bytes, past the end.
                put16(&mut c, usize::from(at) + 2, 0x0180);
            }
            let mut d = build(c, VfioPciOptions::default());
            check_guest_lists(&guest_view(&mut d), size);
            assert!(!d.msi_enabled() && !d.msix_enabled());
            for i in 0..size / 4 {
                d.write_config_register(i, 0, &[0xff; 4]);
            }
        }
    }
    // A standard list that loops onto itself, and one that loops back to an earlier entry.
    for (a, b) in [(0x40u8, 0x40u8), (0x40, 0x50)] {
        let mut c = base_config(256);
        c[reg::CAPABILITY_LIST] = 0x40;
        c[0x40] = cap_id::PM;
        c[0x41] = b;
        c[0x50] = cap_id::VENDOR;
        c[0x51] = a;
        let mut d = build(c, VfioPciOptions::default());
        check_guest_lists(&guest_view(&mut d), 256);
    }
    // A capability header inside the emulated MSI registers: hidden, and the MSI registers
    // keep what the guest writes.
    let mut c = base_config(256);
    c[reg::CAPABILITY_LIST] = 0x40;
    c[0x40] = cap_id::MSI;
    c[0x41] = 0x48;
    put16(&mut c, 0x42, 0x0180);
    c[0x48] = cap_id::VPD;
    c[0x49] = 0;
    let mut d = build(c, VfioPciOptions::default());
    let hidden = d.capabilities().iter().find(|c| c.offset == 0x48).unwrap();
    assert_eq!(hidden.policy, CapPolicy::Hide);
    d.write_config_register(0x48 / 4, 0, &0x1234_5678u32.to_le_bytes());
    assert_eq!(
        d.read_config_register(0x48 / 4),
        0x1234_5678,
        "MSI upper address"
    );
    check_guest_lists(&guest_view(&mut d), 256);
    // Found by fuzz_pci_config_registers (seed 11, case seed 0x7cdc44b3acd276c3): an MSI
    // capability whose registers cover the header of a visible capability let the guest
    // rewrite that header's next pointer (to 0x3c) through the MSI upper address. The MSI
    // is now hidden, and the visible list holds whatever the guest writes.
    let mut c = base_config(256);
    c[reg::CAPABILITY_LIST] = 0x50;
    c[0x50] = cap_id::PM;
    c[0x51] = 0x48;
    c[0x48] = cap_id::MSI;
    c[0x49] = 0;
    put16(&mut c, 0x4a, 0x0180); // 64-bit, per-vector mask: 0x48..0x60 covers 0x50
    let mut d = build(c, VfioPciOptions::default());
    let msi = d.capabilities().iter().find(|c| c.offset == 0x48).unwrap();
    assert_eq!(msi.policy, CapPolicy::Hide, "{}", msi.reason);
    for i in 0x40 / 4..0x60 / 4 {
        d.write_config_register(i, 0, &0x3c3c_3c3cu32.to_le_bytes());
    }
    check_guest_lists(&guest_view(&mut d), 256);
    // The same for the vPASID: its control register must not cover a visible header (here
    // a VSEC four bytes after the hidden PASID); it moves to the last 8 bytes.
    let mut c = base_config(4096);
    put32(&mut c, 0x100, ext_hdr(ext_cap_id::PASID, 0x104));
    put32(&mut c, 0x104, ext_hdr(ext_cap_id::VSEC, 0));
    let mut d = build(
        c,
        VfioPciOptions {
            vpasid: Some(vpasid),
        },
    );
    let p = d
        .capabilities()
        .iter()
        .find(|c| c.id == ext_cap_id::PASID)
        .unwrap()
        .offset;
    assert_eq!(p, EXT_CONFIG_SPACE_SIZE - 8);
    d.write_config_register(p / 4 + 1, 2, &[0xff, 0xff]);
    d.write_config_register(0x104 / 4, 0, &[0xff; 4]);
    let view = guest_view(&mut d);
    check_guest_lists(&view, EXT_CONFIG_SPACE_SIZE);
    assert_eq!(
        u32::from_le_bytes(view[0x104..0x108].try_into().unwrap()) & 0xffff,
        u32::from(ext_cap_id::VSEC)
    );
    // Config regions too small for a header, or of odd sizes.
    for size in [0u64, 0x3f, 0x40, 0x41, 0xff, 0x101, 0xfff, 0x1001] {
        let mut c = base_config(4096);
        put32(&mut c, 0x100, ext_hdr(ext_cap_id::VSEC, 0xffc));
        put32(&mut c, 0xffc, ext_hdr(ext_cap_id::VSEC, 0));
        let mut fake = plain_fake(c);
        fake.regions.insert(CONFIG_REGION, region(size, false));
        let r = VfioPciDevice::new(
            VfioDeviceId::Mdev("small".into()),
            Arc::new(fake),
            Arc::new(FakeSink::default()),
            VfioPciOptions::default(),
        );
        if let Ok(mut d) = r {
            check_guest_lists(&guest_view(&mut d), EXT_CONFIG_SPACE_SIZE);
        } else {
            assert!(size < 0x40, "size {size:#x} refused");
        }
    }
}

/// A NIC-like device with 2048 MSI-X vectors (table in BAR2 at 0x2000, PBA at 0x12000).
fn msix_2048() -> (Arc<FakeVfio>, Arc<FakeSink>, VfioPciDevice) {
    let mut c = base_config(4096);
    put32(&mut c, 0x18, 0x0000_000c); // BAR2: 64-bit prefetchable
    c[reg::CAPABILITY_LIST] = 0x70;
    c[0x70] = cap_id::MSIX;
    c[0x71] = 0;
    put16(&mut c, 0x72, 2047);
    put32(&mut c, 0x74, 0x2000 | 2);
    put32(&mut c, 0x78, 0x12000 | 2);
    let mut fake = plain_fake(c);
    fake.regions.insert(2, region(0x20000, false));
    fake.bar_mem.lock().unwrap().insert(2, vec![0u8; 0x20000]);
    fake.irqs.insert(MSIX_IRQ, irq(2048));
    let fake = Arc::new(fake);
    let sink = Arc::new(FakeSink::default());
    let dev = VfioPciDevice::new(
        VfioDeviceId::Pdev("0000:00:04.0".into()),
        fake.clone(),
        sink.clone(),
        VfioPciOptions::default(),
    )
    .unwrap();
    (fake, sink, dev)
}

/// The guest's one write that enables 2048 MSI-X vectors is one routing commit (and the
/// one that disables them another), not one per vector; every vector is still routed.
#[test]
fn msix_enable_commits_once_fake_sink() {
    let (_fake, sink, mut d) = msix_2048();
    d.write_config_register(0x70 / 4, 2, &0x8000u16.to_le_bytes());
    assert!(d.msix_enabled());
    let routed = sink
        .take()
        .iter()
        .filter(|c| matches!(c, super::fake::SinkCall::Route(..)))
        .count();
    assert_eq!(routed, 2048);
    assert_eq!(sink.commits(), 1, "one commit for the enabling write");
    // Function mask on and off: irqfd changes only, no table commit.
    d.write_config_register(0x70 / 4, 2, &0xc000u16.to_le_bytes());
    d.write_config_register(0x70 / 4, 2, &0x8000u16.to_le_bytes());
    assert_eq!(sink.commits(), 1);
    d.write_config_register(0x70 / 4, 2, &0u16.to_le_bytes());
    assert!(!d.msix_enabled());
    assert_eq!(sink.commits(), 2, "one commit for the disabling write");
}

/// An access that starts before the MSI-X table and ends inside it is split: the table
/// bytes are emulated (the device never sees them), the rest reaches the device. Likewise
/// at the table's end and over the PBA.
#[test]
fn msix_straddling_access_emulated() {
    let (fake, sink, mut d) = msix_2048();
    d.write_config_register(0x70 / 4, 2, &0x8000u16.to_le_bytes());
    sink.take();
    let bar_mem = |o: usize, n: usize| fake.bar_mem.lock().unwrap()[&2][o..o + n].to_vec();
    // 8 bytes at 0x1ffc: 4 device bytes, then entry 0's address low.
    d.write_bar(2, 0x1ffc, &[1, 2, 3, 4, 0x00, 0x10, 0xe0, 0xfe]);
    assert_eq!(bar_mem(0x1ffc, 4), vec![1, 2, 3, 4], "device part written");
    assert_eq!(
        bar_mem(0x2000, 4),
        vec![0; 4],
        "table bytes never reach the device"
    );
    let mut e = [0u8; 4];
    d.read_bar(2, 0x2000, &mut e);
    assert_eq!(
        u32::from_le_bytes(e),
        0xfee0_1000,
        "entry 0 address low emulated"
    );
    // A straddling read returns device bytes then table bytes.
    let mut r = [0u8; 8];
    d.read_bar(2, 0x1ffc, &mut r);
    assert_eq!(r, [1, 2, 3, 4, 0x00, 0x10, 0xe0, 0xfe]);
    // The last table dword (entry 2047's vector control) and the dword after the table.
    let end = 0x2000 + 2048 * 16;
    d.write_bar(2, end - 4, &[0, 0, 0, 0, 9, 9, 9, 9]);
    assert_eq!(bar_mem(end as usize - 4, 4), vec![0; 4]);
    assert_eq!(bar_mem(end as usize, 4), vec![9; 4]);
    let calls = sink.take();
    assert!(
        calls.contains(&super::fake::SinkCall::Mask(
            crate::pci::MsiVector {
                kind: crate::pci::MsiKind::Msix,
                index: 2047
            },
            false
        )),
        "entry 2047 unmasked by the emulated half: {calls:?}"
    );
    // Over the PBA start: PBA bytes read as 0 and are not written to the device.
    d.write_bar(2, 0x11ffc, &[7; 8]);
    assert_eq!(bar_mem(0x11ffc, 4), vec![7; 4]);
    assert_eq!(bar_mem(0x12000, 4), vec![0; 4]);
}

/// The guest's config and BAR accesses through the whole bus (ECAM, 0xCF8/0xCFC, BAR
/// ranges on the MMIO/PIO buses) on the NIC-like model and on hostile devices: random
/// offsets, widths, values, BAR sizing and moves, decode toggles. Nothing panics, the
/// device's identity stays read-only, the guest's capability lists stay well formed, and
/// no two live BAR ranges overlap.
#[test]
fn fuzz_pci_config_registers() {
    use crate::pci::tests::{Rig, ECAM_BASE, IO, MMIO32, MMIO64};
    use std::sync::Mutex;
    let seed = fuzz::seed("fuzz_pci_config_registers", 0x0c0f_1600);
    let budget = fuzz::cases(300);
    let failed = fuzz::run("fuzz_pci_config_registers", seed, budget, |rng| {
        let rig = Rig::new();
        let fake = if rng.chance(1, 2) {
            FakeVfio::nic()
        } else {
            let c = hostile_config(rng);
            hostile_fake(rng, c)
        };
        let fake = Arc::new(fake);
        let vendor = {
            let c = fake.config.lock().unwrap();
            u16::from_le_bytes([c[0], c[1]])
        };
        let sink = Arc::new(CheckingSink::default());
        let Ok(dev) = VfioPciDevice::new(
            VfioDeviceId::Pdev("0000:00:03.0".into()),
            fake,
            sink.clone(),
            options(rng),
        ) else {
            return;
        };
        let dev: crate::pci::SharedPciDevice = Arc::new(Mutex::new(dev));
        let chain = {
            let d = dev.lock().unwrap();
            let d = d.as_any().downcast_ref::<VfioPciDevice>().unwrap();
            vsva_chain(d)
        };
        let chain_span = chain
            .first()
            .zip(chain.last())
            .map(|(f, l)| (f.0, l.0 + l.2 - f.0));
        let Ok(bdf) = rig.add(dev.clone(), Some(3)) else {
            return;
        };
        for _ in 0..200 {
            let len = rng.pick(&[1usize, 2, 4, 4, 4, 8]);
            let off = match (rng.index(5), chain_span) {
                (0, _) => 0x04 + rng.index(2) * 0x0c, // command, BARs
                (1, _) => 0x10 + 4 * rng.index(6),
                (2, _) => 0x40 + rng.index(0xc0),
                // The vSVA chain's registers (and one dword either side).
                (3, Some((start, span))) => (start - 4 + rng.index(span + 8)).min(4095),
                _ => rng.index(4096),
            } as u16;
            let mut data = vec![0u8; len];
            match rng.index(3) {
                0 => data.fill(0xff),
                _ => rng.fill(&mut data),
            }
            match rng.index(6) {
                0 => {
                    let _ = rig.ecam_read(bdf, off & 0xffc, 4);
                }
                1 => {
                    // Anywhere in the ECAM window: other functions, other slots.
                    let a = ECAM_BASE + rng.below(32 << 15);
                    let mut b = vec![0u8; len];
                    let _ = rig.mmio.read(a, &mut b);
                    let _ = rig.mmio.write(a, &data);
                }
                2 => {
                    // A live BAR, anywhere in it or across its end.
                    let bars = rig.bars(bdf);
                    if let Some(b) = bars.get(rng.index(bars.len().max(1))) {
                        if let Some(base) = b.live {
                            let a = base.wrapping_add(rng.below(b.info.size + 8));
                            let bus = if b.info.is_memory() {
                                &rig.mmio
                            } else {
                                &rig.pio
                            };
                            let mut r = vec![0u8; len];
                            let _ = bus.read(a, &mut r);
                            let _ = bus.write(a, &data);
                        }
                    }
                }
                3 => {
                    // A random address in the windows the BARs live in.
                    let w = rng.pick(&[MMIO32, MMIO64]);
                    let a = w.base + rng.below(w.size);
                    let _ = rig.mmio.write(a, &data);
                    let io = IO.base + rng.below(IO.size);
                    let _ = rig.pio.write(io, &data[..len.min(4)]);
                }
                _ => {
                    if off as usize + len <= 4096 {
                        rig.ecam_write(bdf, off, &data);
                    }
                }
            }
        }
        let id = rig.ecam_read32(bdf, 0);
        assert_eq!(id as u16, vendor, "vendor ID changed");
        // Routes exist exactly while MSI or MSI-X is on, and every batch was closed.
        assert_eq!(*sink.depth.lock().unwrap(), 0, "batch left open");
        {
            let d = dev.lock().unwrap();
            let d = d.as_any().downcast_ref::<VfioPciDevice>().unwrap();
            let routed = !sink.routes.lock().unwrap().is_empty();
            assert_eq!(
                routed,
                d.msi_enabled() || d.msix_enabled(),
                "routes vs enable bits"
            );
        }
        let mut view = Vec::with_capacity(4096);
        for o in (0..4096).step_by(4) {
            view.extend(rig.ecam_read32(bdf, o as u16).to_le_bytes());
        }
        check_guest_lists(&view, EXT_CONFIG_SPACE_SIZE);
        {
            let d = dev.lock().unwrap();
            check_vsva(d.as_any().downcast_ref::<VfioPciDevice>().unwrap(), &view);
        }
        // u128: a BAR may end exactly at 2^64.
        let mut live: Vec<(bool, u128, u128)> = rig
            .bars(bdf)
            .iter()
            .filter_map(|b| {
                b.live.map(|l| {
                    (
                        b.info.is_memory(),
                        u128::from(l),
                        u128::from(l) + u128::from(b.info.size),
                    )
                })
            })
            .collect();
        live.sort_unstable();
        for w in live.windows(2) {
            assert!(
                w[0].0 != w[1].0 || w[0].2 <= w[1].1,
                "live BARs overlap: {live:?}"
            );
        }
    });
    assert_eq!(failed, 0, "{failed} of {budget} cases failed (seed {seed})");
}

/// A sink that checks the model's calls against the routes it holds: no route twice, no
/// update, mask or release of a vector that has none, batches balanced.
#[derive(Default)]
struct CheckingSink {
    routes: std::sync::Mutex<BTreeMap<crate::pci::MsiVector, (crate::pci::MsiMessage, bool)>>,
    depth: std::sync::Mutex<i32>,
}

impl crate::pci::InterruptSink for CheckingSink {
    fn msi_route(
        &self,
        vector: crate::pci::MsiVector,
        msg: crate::pci::MsiMessage,
        masked: bool,
    ) -> Result<vmm_sys_util::eventfd::EventFd, crate::pci::InterruptError> {
        let old = self.routes.lock().unwrap().insert(vector, (msg, masked));
        assert!(old.is_none(), "{vector:?} routed twice");
        Ok(vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap())
    }
    fn msi_update(
        &self,
        vector: crate::pci::MsiVector,
        msg: crate::pci::MsiMessage,
    ) -> Result<(), crate::pci::InterruptError> {
        let mut r = self.routes.lock().unwrap();
        let e = r
            .get_mut(&vector)
            .unwrap_or_else(|| panic!("update of unrouted {vector:?}"));
        e.0 = msg;
        Ok(())
    }
    fn msi_mask(
        &self,
        vector: crate::pci::MsiVector,
        masked: bool,
    ) -> Result<(), crate::pci::InterruptError> {
        let mut r = self.routes.lock().unwrap();
        let e = r
            .get_mut(&vector)
            .unwrap_or_else(|| panic!("mask of unrouted {vector:?}"));
        e.1 = masked;
        Ok(())
    }
    fn msi_release(&self, vector: crate::pci::MsiVector) {
        assert!(
            self.routes.lock().unwrap().remove(&vector).is_some(),
            "release of unrouted {vector:?}"
        );
    }
    fn begin_route_batch(&self) {
        *self.depth.lock().unwrap() += 1;
    }
    fn end_route_batch(&self) -> Result<(), crate::pci::InterruptError> {
        let mut d = self.depth.lock().unwrap();
        *d -= 1;
        assert!(*d >= 0, "batch ended twice");
        Ok(())
    }
}

/// MSI-X through the model: random table sizes and layouts (table and PBA anywhere in the
/// BAR, even overlapping), random guest table and PBA accesses of every width and
/// alignment (straddling included), enable and function-mask writes. After every access the
/// routes the sink holds are exactly the table's vectors while enabled (each with the
/// entry's message, masked by its own bit or the function mask) and none while disabled.
#[test]
fn fuzz_msix_table() {
    let seed = fuzz::seed("fuzz_msix_table", 0x0d15_0fab);
    let budget = fuzz::cases(300);
    let failed = fuzz::run("fuzz_msix_table", seed, budget, |rng| {
        let max = if rng.chance(1, 8) { 2048 } else { 64 };
        let size = 1 + rng.below(max) as u32;
        let bar_size = 0x20000u64;
        let table_off = (rng.below(bar_size) & !7) as u32;
        let pba_off = if rng.chance(1, 4) {
            table_off + ((rng.below(u64::from(size) * 16)) as u32 & !7)
        } else {
            (rng.below(bar_size) & !7) as u32
        };
        let mut c = base_config(4096);
        put32(&mut c, 0x18, 0x0000_000c);
        c[reg::CAPABILITY_LIST] = 0x70;
        c[0x70] = cap_id::MSIX;
        c[0x71] = 0;
        put16(&mut c, 0x72, (size - 1) as u16);
        put32(&mut c, 0x74, table_off | 2);
        put32(&mut c, 0x78, pba_off | 2);
        let mut fake = plain_fake(c);
        fake.regions.insert(2, region(bar_size, false));
        fake.bar_mem
            .lock()
            .unwrap()
            .insert(2, vec![0u8; bar_size as usize]);
        fake.irqs
            .insert(MSIX_IRQ, irq(rng.pick(&[size, size, 1, 2048])));
        let sink = Arc::new(CheckingSink::default());
        let Ok(mut d) = VfioPciDevice::new(
            VfioDeviceId::Pdev("0000:00:04.0".into()),
            Arc::new(fake),
            sink.clone(),
            VfioPciOptions::default(),
        ) else {
            return;
        };
        let Some(cap) = d.msix_state().map(|m| *m.cap()) else {
            return;
        };
        let table = cap.table_range();
        for _ in 0..300 {
            match rng.index(8) {
                0 => {
                    let ctrl = rng.pick(&[0u16, 0x4000, 0x8000, 0xc000]);
                    d.write_config_register(0x70 / 4, 2, &ctrl.to_le_bytes());
                }
                1 => {
                    let mut r = vec![0u8; rng.pick(&[1usize, 2, 4, 8, 16])];
                    d.read_bar(2, rng.below(bar_size + 16), &mut r);
                }
                _ => {
                    let len = rng.pick(&[1usize, 2, 4, 4, 8, 8, 3, 16]);
                    let at = match rng.index(3) {
                        0 => table.start + rng.below(table.end - table.start + 8),
                        1 => (table.start + 16 * rng.below(u64::from(cap.table_size)))
                            .saturating_sub(rng.below(8)),
                        _ => rng.below(bar_size + 16),
                    };
                    let mut data = vec![0u8; len];
                    rng.fill(&mut data);
                    d.write_bar(2, at, &data);
                }
            }
            assert_eq!(*sink.depth.lock().unwrap(), 0, "batch left open");
            let routes = sink.routes.lock().unwrap().clone();
            if !d.msix_enabled() {
                assert!(routes.is_empty(), "{} routes while disabled", routes.len());
                continue;
            }
            assert_eq!(routes.len(), usize::from(cap.table_size));
            let fmask = d.read_config_register(0x70 / 4) >> 16 & 0x4000 != 0;
            let m = d.msix_state().unwrap();
            for (v, (msg, masked)) in &routes {
                let (want, entry_masked) = m.entry(v.index).unwrap();
                assert_eq!(*msg, want, "{v:?} routed to a stale message");
                if !fmask {
                    assert_eq!(*masked, entry_masked, "{v:?} mask bit");
                } else {
                    assert!(
                        *masked || !entry_masked,
                        "{v:?} delivering under the function mask"
                    );
                }
            }
        }
    });
    assert_eq!(failed, 0, "{failed} of {budget} cases failed (seed {seed})");
}
