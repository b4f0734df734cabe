//! The vfio-pci model against the fake VFIO device.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use super::backend::{page_size, CONFIG_REGION, INTX_IRQ, MSIX_IRQ, MSI_IRQ};
use super::fake::{nic, FakeMapper, FakeSink, FakeVfio, IrqCall, SinkCall};
use super::*;
use crate::pci::config::{cap_id, ext_cap_id, reg, walk_capabilities, walk_ext_capabilities};
use crate::pci::interrupt::{MsiKind, MsiMessage, MsiVector};
use crate::pci::tests::Rig;
use crate::pci::{BarKind, PciDevice, SharedPciDevice};

struct Model {
    fake: Arc<FakeVfio>,
    sink: Arc<FakeSink>,
    dev: VfioPciDevice,
}

fn model_with(fake: FakeVfio, options: VfioPciOptions) -> Model {
    let fake = Arc::new(fake);
    let sink = Arc::new(FakeSink::with_intx());
    let dev = VfioPciDevice::new(
        VfioDeviceId::Pdev("0000:00:03.0".into()),
        fake.clone(),
        sink.clone(),
        options,
    )
    .unwrap();
    Model { fake, sink, dev }
}

fn nic_model() -> Model {
    model_with(FakeVfio::nic(), VfioPciOptions::default())
}

/// Builds the model for the mdev "x" over `fake`, with default options.
fn mdev_x(fake: Arc<FakeVfio>, sink: Arc<FakeSink>) -> Result<VfioPciDevice, VfioPciError> {
    VfioPciDevice::new(
        VfioDeviceId::Mdev("x".into()),
        fake,
        sink,
        VfioPciOptions::default(),
    )
}

fn r32(d: &mut dyn PciDevice, off: usize) -> u32 {
    d.read_config_register(off / 4)
}

fn r16(d: &mut dyn PciDevice, off: usize) -> u16 {
    (r32(d, off & !3) >> ((off & 2) * 8)) as u16
}

fn w(d: &mut dyn PciDevice, off: usize, data: &[u8]) {
    d.write_config_register(off / 4, (off % 4) as u64, data);
}

/// Config space as the guest sees it, dword by dword.
fn guest_image(d: &mut dyn PciDevice, size: usize) -> Vec<u8> {
    (0..size / 4)
        .flat_map(|i| d.read_config_register(i).to_le_bytes())
        .collect()
}

fn msix_vec(i: u16) -> MsiVector {
    MsiVector {
        kind: MsiKind::Msix,
        index: i,
    }
}

#[test]
fn header_is_virtualized() {
    let mut m = nic_model();
    let d = &mut m.dev;
    assert_eq!(r32(d, 0), 0x1234_8086);
    assert_eq!(r32(d, 8), 0x0200_0002);
    assert_eq!(
        r32(d, reg::HEADER_TYPE & !3) >> 16 & 0xff,
        0,
        "multi-function bit hidden"
    );
    assert_eq!(r32(d, reg::ROM_ADDRESS), 0, "no ROM presented");
    assert_eq!(r16(d, reg::COMMAND), 0, "decode off at start");
    assert_eq!(r32(d, 0x3c) & 0xffff, 0x0100, "pin A kept, line ours");
    // Status: INTx and the error bit are live from the device, the cap bit is ours.
    assert_eq!(r16(d, reg::STATUS), 0x2018);
    w(d, reg::STATUS, &0x2000u16.to_le_bytes());
    assert_eq!(m.fake.config_writes_in(6, 8), vec![(7, vec![0x20])]);
    // Identity writes are dropped, the line is ours.
    w(d, 0, &[0xff; 4]);
    w(d, 0x3c, &[0x0a]);
    assert_eq!(r32(d, 0), 0x1234_8086);
    assert_eq!(r32(d, 0x3c) & 0xff, 0x0a);
    assert!(m.fake.config_writes_in(0, 4).is_empty());
    assert!(m.fake.config_writes_in(0x3c, 0x40).is_empty());
}

#[test]
fn bar_sizing_round_trip() {
    let mut m = nic_model();
    let d = &mut m.dev;
    let bars: Vec<(u8, BarKind, u64, bool)> = d
        .bars()
        .iter()
        .map(|b| (b.index, b.kind, b.size, b.prefetchable))
        .collect();
    assert_eq!(
        bars,
        vec![
            (0, BarKind::Mem32, 0x10000, false),
            (1, BarKind::Io, 0x20, false),
            (2, BarKind::Mem64, 0x10_0000, true),
            (4, BarKind::Mem32, 0x2000, false),
        ]
    );
    for off in (0x10..0x28).step_by(4) {
        w(d, off, &[0xff; 4]);
    }
    let sized: Vec<u32> = (0x10..0x28).step_by(4).map(|o| r32(d, o)).collect();
    assert_eq!(
        sized,
        vec![
            0xffff_0000,
            0xffff_ffe1,
            0xfff0_000c,
            0xffff_ffff,
            0xffff_e000,
            0
        ]
    );
    w(d, 0x10, &0xc001_0000u32.to_le_bytes());
    w(d, 0x18, &0x0010_0000u32.to_le_bytes());
    w(d, 0x1c, &0x1u32.to_le_bytes());
    assert_eq!(r32(d, 0x10), 0xc001_0000);
    assert_eq!(r32(d, 0x18), 0x0010_000c);
    assert_eq!(r32(d, 0x1c), 1);
    // BAR registers never reach the device.
    assert!(m.fake.config_writes_in(0x10, 0x28).is_empty());
}

#[test]
fn command_register_is_filtered() {
    let mut m = nic_model();
    w(&mut m.dev, reg::COMMAND, &0xffffu16.to_le_bytes());
    assert_eq!(r16(&mut m.dev, reg::COMMAND), 0x0547);
    // Forwarded bits reach the device; the device-owned special-cycles bit is preserved
    // and the other non-forwarded bits are not set.
    assert_eq!(m.fake.device_u16(reg::COMMAND), 0x0547 | 0x0008);
    w(&mut m.dev, reg::COMMAND, &0u16.to_le_bytes());
    assert_eq!(r16(&mut m.dev, reg::COMMAND), 0);
    assert_eq!(m.fake.device_u16(reg::COMMAND), 0x0008);
    // A byte write to the high half only touches INTx-disable and SERR.
    w(&mut m.dev, reg::COMMAND + 1, &[0x04]);
    assert_eq!(r16(&mut m.dev, reg::COMMAND), 0x0400);
    assert_eq!(m.fake.device_u16(reg::COMMAND), 0x0408);
}

#[test]
fn capability_list_as_the_guest_sees_it() {
    let mut m = nic_model();
    let img = guest_image(&mut m.dev, 4096);
    let std: Vec<(usize, u8)> = walk_capabilities(&img)
        .iter()
        .map(|c| (c.offset, c.id))
        .collect();
    assert_eq!(
        std,
        vec![
            (nic::PM, cap_id::PM),
            (nic::MSI, cap_id::MSI),
            (nic::MSIX, cap_id::MSIX),
            (nic::EXP, cap_id::EXP),
            (nic::VNDR, cap_id::VENDOR)
        ]
    );
    assert_eq!(
        &img[nic::VPD..nic::VPD + 2],
        &[0, 0],
        "hidden VPD header reads 0"
    );
    let ext: Vec<(usize, u16)> = walk_ext_capabilities(&img)
        .iter()
        .map(|c| (c.offset, c.id))
        .collect();
    // 0x100 (AER, hidden) becomes a null header pointing at the only visible one.
    assert_eq!(ext, vec![(0x100, 0), (nic::VSEC, ext_cap_id::VSEC)]);
    for off in [nic::ATS, nic::PRI, nic::PASID] {
        assert_eq!(&img[off..off + 4], &[0; 4], "hidden ext cap at {off:#x}");
    }
    // Passed capabilities read live from the device (link status), emulated ones do not.
    assert_eq!(
        u16::from_le_bytes([img[nic::EXP + 0x12], img[nic::EXP + 0x13]]),
        0x1011
    );
    assert_eq!(img[nic::VNDR + 4], 0xab);
    // Multiple Message Capable is the device's 4 vectors, since VFIO grants 4.
    assert_eq!((img[nic::MSI + 2] >> 1) & 7, 2);
    let hidden: Vec<(u16, bool)> = m
        .dev
        .capabilities()
        .iter()
        .filter(|c| c.policy == CapPolicy::Hide)
        .map(|c| (c.id, c.extended))
        .collect();
    assert_eq!(
        hidden,
        vec![
            (u16::from(cap_id::VPD), false),
            (ext_cap_id::AER, true),
            (ext_cap_id::ATS, true),
            (ext_cap_id::PRI, true),
            (ext_cap_id::PASID, true)
        ]
    );
    assert!(m.dev.pasid_control().is_none());
}

#[test]
fn pcie_and_pm_writes_are_deliberate() {
    let mut m = nic_model();
    let d = &mut m.dev;
    // Device control reaches the device; link control does not.
    w(d, nic::EXP + 8, &0x2810u16.to_le_bytes());
    w(d, nic::EXP + 0x10, &0x0003u16.to_le_bytes());
    w(d, nic::PM + 4, &0x0003u16.to_le_bytes());
    assert_eq!(
        m.fake.config_writes_in(nic::EXP + 8, nic::EXP + 10).len(),
        1
    );
    assert!(m
        .fake
        .config_writes_in(nic::EXP + 0x10, nic::EXP + 0x12)
        .is_empty());
    assert_eq!(m.fake.config_writes_in(nic::PM + 4, nic::PM + 6).len(), 1);
    // Writes to hidden capabilities are dropped.
    w(d, nic::VPD + 2, &[0xff, 0xff]);
    w(d, nic::ATS + 6, &[0xff, 0xff]);
    assert!(m.fake.config_writes_in(nic::VPD, nic::VPD + 8).is_empty());
    assert!(m.fake.config_writes_in(nic::ATS, nic::ATS + 8).is_empty());
}

#[test]
fn vpasid_is_synthesized_when_enabled() {
    let opts = VfioPciOptions {
        vpasid: Some(VpasidConfig {
            max_pasid_width: 16,
            execute: false,
            privileged: true,
            ..Default::default()
        }),
    };
    let mut m = model_with(FakeVfio::nic(), opts);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    m.dev
        .set_pasid_listener(Box::new(move |c| s.lock().unwrap().push(c)));
    let img = guest_image(&mut m.dev, 4096);
    let ext: Vec<(usize, u16)> = walk_ext_capabilities(&img)
        .iter()
        .map(|c| (c.offset, c.id))
        .collect();
    assert_eq!(
        ext,
        vec![
            (0x100, 0),
            (nic::PASID, ext_cap_id::PASID),
            (nic::VSEC, ext_cap_id::VSEC)
        ]
    );
    assert_eq!(r16(&mut m.dev, nic::PASID + 4), (16 << 8) | 0x4);
    w(&mut m.dev, nic::PASID + 6, &0xffffu16.to_le_bytes());
    assert_eq!(
        r16(&mut m.dev, nic::PASID + 6),
        0x5,
        "exec not supported, so not settable"
    );
    let ctl = PasidControl {
        enabled: true,
        execute: false,
        privileged: true,
    };
    assert_eq!(m.dev.pasid_control(), Some(ctl));
    assert_eq!(*seen.lock().unwrap(), vec![ctl]);
    assert!(m
        .fake
        .config_writes_in(nic::PASID, nic::PASID + 8)
        .is_empty());
}

#[test]
fn msi_enable_routes_vectors() {
    let mut m = nic_model();
    let d = &mut m.dev;
    m.sink.take();
    w(d, nic::MSI + 4, &0xfee0_1000u32.to_le_bytes());
    w(d, nic::MSI + 8, &0u32.to_le_bytes());
    w(d, nic::MSI + 0xc, &0x0030u16.to_le_bytes());
    assert!(m.sink.take().is_empty(), "nothing routed while disabled");
    // Enable with Multiple Message Enable = 1 (2 vectors).
    w(d, nic::MSI + 2, &0x0011u16.to_le_bytes());
    assert!(d.msi_enabled());
    let v = |i| MsiVector {
        kind: MsiKind::Msi,
        index: i,
    };
    let msg = |data| MsiMessage {
        address: 0xfee0_1000,
        data,
    };
    assert_eq!(
        m.sink.take(),
        vec![
            SinkCall::Route(v(0), msg(0x30), false),
            SinkCall::Route(v(1), msg(0x31), false)
        ]
    );
    assert_eq!(
        m.fake.irq_log(),
        vec![
            IrqCall::Enable(INTX_IRQ, 1),
            IrqCall::Resample,
            IrqCall::Disable(INTX_IRQ),
            IrqCall::Enable(MSI_IRQ, 2)
        ]
    );
    // Per-vector mask and a data change while enabled.
    w(d, nic::MSI + 0x10, &0b10u32.to_le_bytes());
    w(d, nic::MSI + 0xc, &0x0040u16.to_le_bytes());
    assert_eq!(
        m.sink.take(),
        vec![
            SinkCall::Mask(v(1), true),
            SinkCall::Update(v(0), msg(0x40)),
            SinkCall::Update(v(1), msg(0x41))
        ]
    );
    // None of it reached the device's config space.
    assert!(m
        .fake
        .config_writes_in(nic::MSI, nic::MSI + 0x18)
        .is_empty());
    w(d, nic::MSI + 2, &0u16.to_le_bytes());
    assert_eq!(
        m.sink.take(),
        vec![SinkCall::Release(v(0)), SinkCall::Release(v(1))]
    );
    assert_eq!(
        m.fake.irq_log()[4..],
        [
            IrqCall::Disable(MSI_IRQ),
            IrqCall::Enable(INTX_IRQ, 1),
            IrqCall::Resample
        ]
    );
}

#[test]
fn msix_table_writes_produce_routes() {
    let mut m = nic_model();
    let d = &mut m.dev;
    m.sink.take();
    w(d, nic::MSIX + 2, &0x8000u16.to_le_bytes());
    assert!(d.msix_enabled());
    let routes = m.sink.take();
    assert_eq!(routes.len(), 16);
    assert!(routes
        .iter()
        .enumerate()
        .all(|(i, c)| *c == SinkCall::Route(msix_vec(i as u16), MsiMessage::default(), true)));
    assert_eq!(
        m.fake.irq_log().last(),
        Some(&IrqCall::Enable(MSIX_IRQ, 16))
    );

    // Program entry 3 through BAR2 (the table is at 0x2000) and unmask it.
    let e3 = 0x2000 + 3 * 16;
    d.write_bar(2, e3, &0xfee0_0000u32.to_le_bytes());
    d.write_bar(2, e3 + 4, &0u32.to_le_bytes());
    d.write_bar(2, e3 + 8, &0x4041u32.to_le_bytes());
    d.write_bar(2, e3 + 12, &0u32.to_le_bytes());
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x4041,
    };
    let calls = m.sink.take();
    assert_eq!(calls.last(), Some(&SinkCall::Mask(msix_vec(3), false)));
    assert!(calls.contains(&SinkCall::Update(msix_vec(3), msg)));
    let mut back = [0u8; 4];
    d.read_bar(2, e3 + 8, &mut back);
    assert_eq!(u32::from_le_bytes(back), 0x4041);
    d.read_bar(2, 0x2000 + 5 * 16 + 12, &mut back);
    assert_eq!(u32::from_le_bytes(back), 1, "untouched entries stay masked");
    // The table never reaches the device region.
    assert_eq!(
        m.fake.bar_mem.lock().unwrap()[&2][e3 as usize + 8],
        (e3 as u8 + 8) ^ 2
    );

    // Function mask masks only the unmasked vector; disable releases all.
    w(d, nic::MSIX + 2, &0xc000u16.to_le_bytes());
    assert_eq!(m.sink.take(), vec![SinkCall::Mask(msix_vec(3), true)]);
    w(d, nic::MSIX + 2, &0u16.to_le_bytes());
    assert_eq!(m.sink.take().len(), 16);
    assert!(!d.msix_enabled());
    let log = m.fake.irq_log();
    assert_eq!(
        log[log.len() - 3..],
        [
            IrqCall::Disable(MSIX_IRQ),
            IrqCall::Enable(INTX_IRQ, 1),
            IrqCall::Resample
        ]
    );
}

#[test]
fn bar_plans_trap_msix_and_follow_sparse_mmap() {
    if page_size() != 4096 {
        ioasid::test_skip::record(
            "",
            &format!(
                "expectations are written for 4 KiB pages, host has {}",
                page_size()
            ),
        );
        return;
    }
    let m = nic_model();
    let plans = m.dev.bar_plans();
    let mm = |p: &BarPlan| p.mmap.iter().map(|w| (w.offset, w.len)).collect::<Vec<_>>();
    assert_eq!(mm(plans[0]), vec![(0, 0x10000)]);
    assert!(plans[0].trapped.is_empty());
    assert!(mm(plans[1]).is_empty(), "I/O BARs are never mapped");
    assert_eq!(plans[1].trapped, vec![0..0x20]);
    assert_eq!(mm(plans[2]), vec![(0, 0x2000), (0x4000, 0xfc000)]);
    assert_eq!(plans[2].trapped, vec![0x2000..0x4000]);
    assert_eq!(plans[2].msix_table, Some(0x2000..0x2100));
    assert_eq!(plans[2].msix_pba, Some(0x3000..0x3008));
    assert!(mm(plans[3]).is_empty(), "no MMAP flag");
    assert_eq!(plans[3].trapped, vec![0..0x2000]);
    assert_eq!(m.fake.mmaps.lock().unwrap().len(), 3);

    // A BAR without sparse areas still keeps the table's page trapped.
    let mut fake = FakeVfio::nic();
    let r2 = fake.regions.get_mut(&2).unwrap();
    r2.sparse_mmap = None;
    let m = model_with(fake, VfioPciOptions::default());
    assert_eq!(m.dev.bar_plans()[2].trapped, vec![0x2000..0x4000]);
}

#[test]
fn on_the_bus_bars_relocate_and_mappings_follow() {
    let rig = Rig::new();
    let m = nic_model();
    let fake = m.fake.clone();
    let mapper = Arc::new(FakeMapper::default());
    let dev = Arc::new(Mutex::new(m.dev));
    dev.lock().unwrap().set_bar_mapper(mapper.clone());
    let shared: SharedPciDevice = dev.clone();
    let bdf = rig.add(shared, Some(3)).unwrap();
    let bars = rig.bars(bdf);
    let (b0, b2, b4) = (bars[0].assigned, bars[2].assigned, bars[3].assigned);
    assert!(
        mapper.maps.lock().unwrap().is_empty(),
        "nothing mapped before decode"
    );

    rig.ecam_write(bdf, reg::COMMAND as u16, &0x0006u16.to_le_bytes());
    assert_eq!(
        *mapper.maps.lock().unwrap(),
        vec![
            (true, b0, 0x10000),
            (true, b2, 0x2000),
            (true, b2 + 0x4000, 0xfc000)
        ]
    );
    // BAR0's first register through the MMIO bus reaches the device region.
    let mut v = [0u8; 4];
    rig.mmio.read(b0, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), nic::BAR0_IDENT);
    // A trapped BAR, through the bus.
    rig.mmio.write(b4 + 0x10, &[0xaa, 0xbb]).unwrap();
    assert_eq!(&fake.bar_mem.lock().unwrap()[&4][0x10..0x12], &[0xaa, 0xbb]);
    // Beyond the 0x1800-byte region but inside the 0x2000 BAR: all ones.
    rig.mmio.read(b4 + 0x1900, &mut v).unwrap();
    assert_eq!(v, [0xff; 4]);
    // The MSI-X table through the bus is the emulated one.
    rig.mmio.read(b2 + 0x2000 + 12, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 1);

    mapper.maps.lock().unwrap().clear();
    let new = 0xd000_0000u64;
    rig.ecam_write32(bdf, 0x10, new as u32);
    assert_eq!(
        *mapper.maps.lock().unwrap(),
        vec![(false, b0, 0x10000), (true, new, 0x10000)]
    );
    assert!(rig.mmio.ranges().contains(&(new, 0x10000)));
    let dm = dev.lock().unwrap().direct_mappings();
    assert_eq!(dm[0].guest_addr, Some(new));
    rig.mmio.read(new, &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), nic::BAR0_IDENT);
}

#[test]
fn ecam_and_cf8_agree_on_a_vfio_function() {
    let rig = Rig::new();
    let m = nic_model();
    let bdf = rig.add(Arc::new(Mutex::new(m.dev)), None).unwrap();
    for off in (0u16..256).step_by(4) {
        assert_eq!(
            rig.ecam_read(bdf, off, 4),
            rig.cf8_read(bdf, off, 4),
            "offset {off:#x}"
        );
    }
    assert_eq!(rig.ecam_read32(bdf, 0), 0x1234_8086);
}

#[test]
fn removal_releases_interrupts_decode_and_mappings() {
    let rig = Rig::new();
    let m = nic_model();
    let (fake, sink) = (m.fake.clone(), m.sink.clone());
    let mapper = Arc::new(FakeMapper::default());
    let dev = Arc::new(Mutex::new(m.dev));
    dev.lock().unwrap().set_bar_mapper(mapper.clone());
    let bdf = rig.add(dev.clone(), None).unwrap();
    rig.ecam_write(bdf, reg::COMMAND as u16, &0x0007u16.to_le_bytes());
    rig.ecam_write(bdf, nic::MSIX as u16 + 2, &0x8000u16.to_le_bytes());
    assert_eq!(fake.device_u16(reg::COMMAND) & 0x7, 0x7);
    sink.take();
    mapper.maps.lock().unwrap().clear();

    rig.pci.lock().unwrap().remove_device(bdf).unwrap();
    let released = sink.take();
    assert_eq!(released.len(), 16);
    assert!(released.iter().all(|c| matches!(c, SinkCall::Release(_))));
    let log = fake.irq_log();
    assert!(log.ends_with(&[IrqCall::Disable(MSIX_IRQ)]), "{log:?}");
    assert_eq!(
        fake.device_u16(reg::COMMAND) & 0x7,
        0,
        "decode and bus master off"
    );
    let unmaps = mapper.maps.lock().unwrap().clone();
    assert_eq!(unmaps.len(), 3);
    assert!(unmaps.iter().all(|u| !u.0));
    let d = dev.lock().unwrap();
    assert!(d.direct_mappings().is_empty());
    assert!(!d.intx_enabled());
    assert_eq!(*sink.intx_released.lock().unwrap(), 1, "INTx line released");
    assert_eq!(rig.mmio.ranges().len(), 1);
    assert_eq!(rig.ecam_read32(bdf, 0), u32::MAX);
}

#[test]
fn reset_returns_to_power_on_state() {
    let mut m = nic_model();
    w(&mut m.dev, reg::COMMAND, &0x0006u16.to_le_bytes());
    w(&mut m.dev, nic::MSI + 2, &0x0001u16.to_le_bytes());
    assert!(m.dev.msi_enabled());
    m.dev.reset();
    assert!(!m.dev.msi_enabled());
    assert_eq!(r16(&mut m.dev, reg::COMMAND), 0);
    assert_eq!(r16(&mut m.dev, nic::MSI + 2) & 1, 0);
    assert!(m.dev.intx_enabled());
}

#[test]
fn mdev_without_pci_extras() {
    let rig = Rig::new();
    let fake = Arc::new(FakeVfio::mtty());
    let sink = Arc::new(FakeSink::with_intx());
    let mut dev = VfioPciDevice::new(
        VfioDeviceId::Mdev("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into()),
        fake.clone(),
        sink,
        VfioPciOptions::default(),
    )
    .unwrap();
    assert!(dev.capabilities().is_empty());
    let img = guest_image(&mut dev, 256);
    assert!(walk_capabilities(&img).is_empty());
    assert_eq!(img[reg::CAPABILITY_LIST], 0);
    assert_eq!(dev.read_config_register(0x100 / 4), 0, "no extended space");
    let kinds: Vec<(BarKind, u64)> = dev.bars().iter().map(|b| (b.kind, b.size)).collect();
    assert_eq!(kinds, vec![(BarKind::Io, 8), (BarKind::Io, 8)]);
    assert!(dev.direct_mappings().is_empty());
    // INTx works without a resample eventfd (mtty answers ENOTTY): the model unmasks.
    assert!(dev.intx_enabled());
    assert_eq!(dev.intx_unmask(), Some(IntxUnmask::AfterEoi));
    assert_eq!(fake.irq_log(), vec![IrqCall::Enable(INTX_IRQ, 1)]);

    let bdf = rig.add(Arc::new(Mutex::new(dev)), None).unwrap();
    let io0 = rig.bars(bdf)[0].assigned;
    rig.ecam_write(bdf, reg::COMMAND as u16, &0x0001u16.to_le_bytes());
    let mut b = [0u8; 1];
    rig.pio.read(io0, &mut b).unwrap();
    assert_eq!(b[0], 0x60);
    rig.pio.write(io0 + 1, &[0x5a]).unwrap();
    assert_eq!(fake.bar_mem.lock().unwrap()[&0][1], 0x5a);
}

#[test]
fn broken_config_regions_are_errors() {
    let sink: Arc<FakeSink> = Arc::new(FakeSink::default());
    let mut fake = FakeVfio::mtty();
    fake.regions.remove(&CONFIG_REGION);
    let e = mdev_x(Arc::new(fake), sink.clone()).err().unwrap();
    assert!(matches!(e, VfioPciError::NoConfigRegion { .. }), "{e}");
    let mut fake = FakeVfio::mtty();
    fake.regions.get_mut(&CONFIG_REGION).unwrap().size = 32;
    let e = mdev_x(Arc::new(fake), sink).err().unwrap();
    assert!(
        matches!(e, VfioPciError::ConfigTooSmall { size: 32, .. }),
        "{e}"
    );
    assert_eq!(e.to_string(), "The mdev x config region is only 32 bytes");
}

/// Waits (bounded, as a hang breaker, not a timing assertion) until `f` holds.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

fn unmasks(fake: &FakeVfio) -> usize {
    fake.irq_log()
        .iter()
        .filter(|c| **c == IrqCall::Unmask)
        .count()
}

fn mtty_model(sink: FakeSink) -> Model {
    let fake = Arc::new(FakeVfio::mtty());
    let sink = Arc::new(sink);
    let dev = VfioPciDevice::new(
        VfioDeviceId::Mdev("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into()),
        fake.clone(),
        sink.clone(),
        VfioPciOptions::default(),
    )
    .unwrap();
    Model { fake, sink, dev }
}

#[test]
fn intx_pin_is_shown_only_when_wired() {
    // Wired: the sink is asked for the device's pin, and the guest reads it.
    let mut m = mtty_model(FakeSink::with_intx());
    assert_eq!(r32(&mut m.dev, 0x3c) >> 8 & 0xff, 1, "INTA");
    assert_eq!(m.dev.intx_pin(), Some(crate::pci::IntxPin::A));
    assert_eq!(
        m.sink.intx_given.lock().unwrap().as_ref().map(|g| g.0),
        Some(crate::pci::IntxPin::A)
    );
    // The VMM wires no line: no pin.
    let mut m = mtty_model(FakeSink::default());
    assert_eq!(r32(&mut m.dev, 0x3c) >> 8 & 0xff, 0);
    assert_eq!(m.dev.intx_pin(), None);
    assert!(m.fake.irq_log().is_empty());
    // VFIO reports no INTx: no pin, and the sink is not asked.
    let mut fake = FakeVfio::mtty();
    fake.irqs.remove(&INTX_IRQ);
    let sink = Arc::new(FakeSink::with_intx());
    let mut dev = mdev_x(Arc::new(fake), sink.clone()).unwrap();
    assert_eq!(r32(&mut dev, 0x3c) >> 8 & 0xff, 0);
    assert!(sink.intx_given.lock().unwrap().is_none());
    assert!(!dev.intx_enabled());
    // A reserved pin value (above INTD) is not a pin.
    let mut fake = FakeVfio::mtty();
    fake.config.get_mut().unwrap()[0x3d] = 7;
    let sink = Arc::new(FakeSink::with_intx());
    let mut dev = mdev_x(Arc::new(fake), sink.clone()).unwrap();
    assert_eq!(r32(&mut dev, 0x3c) >> 8 & 0xff, 0);
    assert!(sink.intx_given.lock().unwrap().is_none());
}

#[test]
fn intx_unmask_eventfd_goes_to_vfio_when_accepted() {
    let m = nic_model();
    assert_eq!(m.dev.intx_unmask(), Some(IntxUnmask::Kernel));
    assert_eq!(
        m.fake.irq_log(),
        vec![IrqCall::Enable(INTX_IRQ, 1), IrqCall::Resample]
    );
    // The kernel unmasks: an EOI does not make the model unmask.
    m.sink.eoi();
    let mut b = [0u8; 4];
    let mut dev = m.dev;
    dev.read_bar(0, 0, &mut b);
    assert_eq!(unmasks(&m.fake), 0);
    assert_eq!(dev.intx_unmasks(), 0);
}

#[test]
fn refused_unmask_eventfd_makes_the_model_unmask_after_each_eoi() {
    let rig = Rig::new();
    let m = mtty_model(FakeSink::with_intx());
    let (fake, sink) = (m.fake.clone(), m.sink.clone());
    assert_eq!(m.dev.intx_unmask(), Some(IntxUnmask::AfterEoi));
    let dev = Arc::new(Mutex::new(m.dev));
    let bdf = rig.add(dev.clone(), None).unwrap();
    rig.ecam_write(bdf, reg::COMMAND as u16, &0x0001u16.to_le_bytes());
    let io0 = rig.bars(bdf)[0].assigned;
    // No EOI yet: BAR accesses do not unmask.
    let mut b = [0u8; 1];
    rig.pio.read(io0, &mut b).unwrap();
    assert_eq!(unmasks(&fake), 0);

    // An EOI with no BAR access after it: the model's thread unmasks.
    sink.eoi();
    eventually("the thread unmasks after an EOI", || unmasks(&fake) == 1);

    // An EOI then at once a register access: the access reaches an unmasked device (the
    // thread or the access itself unmasks first, never both).
    sink.eoi();
    rig.pio.write(io0 + 1, &[0x02]).unwrap();
    let log = fake.irq_log();
    let unmask_at = log.iter().rposition(|c| *c == IrqCall::Unmask);
    assert_eq!(unmasks(&fake), 2, "{log:?}");
    assert!(unmask_at.is_some());
    assert_eq!(fake.bar_mem.lock().unwrap()[&0][1], 0x02);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(unmasks(&fake), 2, "one EOI, one unmask");
    assert_eq!(dev.lock().unwrap().intx_unmasks(), 2);

    // Removal stops it all and releases the line.
    rig.pci.lock().unwrap().remove_device(bdf).unwrap();
    assert_eq!(*sink.intx_released.lock().unwrap(), 1);
    assert!(fake.irq_log().ends_with(&[IrqCall::Disable(INTX_IRQ)]));
    assert!(!dev.lock().unwrap().intx_enabled());
    sink.eoi();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(unmasks(&fake), 2, "no unmask after removal");
}

#[test]
fn model_unmasks_only_while_intx_is_on() {
    let mut fake = FakeVfio::nic();
    fake.resample_supported = false;
    let mut m = model_with(fake, VfioPciOptions::default());
    assert_eq!(m.dev.intx_unmask(), Some(IntxUnmask::AfterEoi));
    let d = &mut m.dev;
    // MSI on: INTx off; an EOI of the shared line does not unmask the device.
    w(d, nic::MSI + 2, &0x0001u16.to_le_bytes());
    assert!(d.msi_enabled() && !d.intx_enabled());
    m.sink.eoi();
    let mut b = [0u8; 4];
    d.read_bar(0, 0, &mut b);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(unmasks(&m.fake), 0);
    // MSI off: INTx back on (no unmask eventfd to set again), and EOIs unmask again.
    w(d, nic::MSI + 2, &0u16.to_le_bytes());
    assert!(d.intx_enabled());
    let log = m.fake.irq_log();
    assert_eq!(log.last(), Some(&IrqCall::Enable(INTX_IRQ, 1)), "{log:?}");
    m.sink.eoi();
    d.read_bar(0, 0, &mut b);
    assert_eq!(unmasks(&m.fake), 1);
}

#[test]
fn without_a_resample_eventfd_the_model_unmasks_on_access() {
    let mut m = mtty_model(FakeSink {
        wire_intx: true,
        no_resample: true,
        ..Default::default()
    });
    assert_eq!(m.dev.intx_unmask(), Some(IntxUnmask::OnAccess));
    assert!(m.dev.intx_enabled());
    // No unmask eventfd was offered to VFIO.
    assert_eq!(m.fake.irq_log(), vec![IrqCall::Enable(INTX_IRQ, 1)]);
    let mut b = [0u8; 1];
    m.dev.read_bar(0, 2, &mut b);
    m.dev.write_bar(1, 0, &[1]);
    assert_eq!(unmasks(&m.fake), 2);
}

#[test]
fn a_device_that_does_not_mask_needs_no_unmask() {
    let mut fake = FakeVfio::mtty();
    fake.irqs.get_mut(&INTX_IRQ).unwrap().maskable = false;
    let fake = Arc::new(fake);
    let sink = Arc::new(FakeSink::with_intx());
    let mut dev = mdev_x(fake.clone(), sink.clone()).unwrap();
    assert_eq!(dev.intx_unmask(), Some(IntxUnmask::NotNeeded));
    sink.eoi();
    let mut b = [0u8; 1];
    dev.read_bar(0, 0, &mut b);
    assert_eq!(unmasks(&fake), 0);
}

// The synthesized vSVA chain (PASID, ATS, PRI) of an assigned device.

fn vsva_opts(offset: Option<usize>) -> VfioPciOptions {
    VfioPciOptions {
        vpasid: Some(VpasidConfig {
            max_pasid_width: 20,
            execute: true,
            privileged: true,
            ats: true,
            pri_capacity: Some(32),
            offset,
        }),
    }
}

/// `pci_find_ext_capability` as Linux does it: from 0x100, at most 480 headers, stop at a
/// pointer below 0x100; the header at 0x100 counts too.
fn linux_find_ext_cap(img: &[u8], id: u16) -> Option<usize> {
    let rd = |p: usize| u32::from_le_bytes(img[p..p + 4].try_into().unwrap());
    let mut pos = 0x100;
    let mut hdr = rd(pos);
    let mut ttl = (4096 - 256) / 8;
    if hdr == 0 {
        return None;
    }
    while ttl > 0 {
        ttl -= 1;
        if hdr & 0xffff == u32::from(id) {
            return Some(pos);
        }
        pos = (hdr >> 20) as usize;
        if pos < 0x100 {
            break;
        }
        hdr = rd(pos);
    }
    None
}

/// Every extended header the guest walk reaches, with its offset.
fn guest_ext_caps(img: &[u8]) -> Vec<(usize, u16)> {
    walk_ext_capabilities(img)
        .iter()
        .map(|c| (c.offset, c.id))
        .collect()
}

#[test]
fn vsva_chain_placed_without_collision() {
    let mut m = model_with(FakeVfio::nic(), vsva_opts(None));
    let img = guest_image(&mut m.dev, 4096);
    // The hidden PASID's place (0x160) has no room for 32 bytes before the VSEC at 0x170;
    // the chain takes the place of the device's own ATS/PRI/PASID, from 0x148.
    let pasid = linux_find_ext_cap(&img, ext_cap_id::PASID).unwrap();
    let ats = linux_find_ext_cap(&img, ext_cap_id::ATS).unwrap();
    let pri = linux_find_ext_cap(&img, ext_cap_id::PRI).unwrap();
    assert_eq!((pasid, ats, pri), (nic::ATS, nic::ATS + 8, nic::ATS + 16));
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::VSEC), Some(nic::VSEC));
    // Nothing the device shows lies inside the chain, and the chain ends before the VSEC.
    let ext = guest_ext_caps(&img);
    assert_eq!(
        ext,
        vec![
            (0x100, 0),
            (pasid, ext_cap_id::PASID),
            (ats, ext_cap_id::ATS),
            (pri, ext_cap_id::PRI),
            (nic::VSEC, ext_cap_id::VSEC)
        ]
    );
    assert!(pri + 16 <= nic::VSEC);
    // The VSEC is still the device's.
    assert_eq!(
        r32(&mut m.dev, nic::VSEC + 4),
        0x1234 | (1 << 16) | (0x18 << 20)
    );
    let decided: Vec<(usize, u16, CapPolicy)> = m
        .dev
        .capabilities()
        .iter()
        .filter(|c| c.extended && c.policy != CapPolicy::Hide)
        .map(|c| (c.offset, c.id, c.policy))
        .filter(|c| c.1 != ext_cap_id::VSEC)
        .collect();
    assert_eq!(decided.len(), 3, "{decided:?}");
}

#[test]
fn vsva_chain_at_explicit_offset() {
    let mut m = model_with(FakeVfio::nic(), vsva_opts(Some(0xe00)));
    let img = guest_image(&mut m.dev, 4096);
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::PASID), Some(0xe00));
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::ATS), Some(0xe08));
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::PRI), Some(0xe10));
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::VSEC), Some(nic::VSEC));
    // The device's own PASID/ATS/PRI stay hidden.
    for o in [nic::ATS, nic::PRI, nic::PASID] {
        assert!(!guest_ext_caps(&img).iter().any(|c| c.0 == o), "{o:#x}");
    }
    // A PASID-only chain in the last 8 bytes.
    let opts = VfioPciOptions {
        vpasid: Some(VpasidConfig {
            max_pasid_width: 8,
            offset: Some(0xff8),
            ..Default::default()
        }),
    };
    let mut m = model_with(FakeVfio::nic(), opts);
    let img = guest_image(&mut m.dev, 4096);
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::PASID), Some(0xff8));
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::ATS), None);
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::PRI), None);
    assert_eq!(m.dev.pasid_width(), Some(8));
}

#[test]
fn vsva_colliding_offset_refused() {
    for (off, why) in [
        (nic::VSEC, "cover the device's capability at 0x170"),
        (0x168, "cover the device's capability at 0x170"),
        (0x0f0, "inside 0x100..0x1000"),
        (0xff0, "inside 0x100..0x1000"),
        (0xe02, "not dword aligned"),
        // AER (0x100..0x148) is hidden, but it is the device's: not overwritten.
        (0x120, "cover the device's capability at 0x100..0x148"),
    ] {
        let err = VfioPciDevice::new(
            VfioDeviceId::Pdev("0000:00:03.0".into()),
            Arc::new(FakeVfio::nic()),
            Arc::new(FakeSink::with_intx()),
            vsva_opts(Some(off)),
        )
        .err()
        .unwrap_or_else(|| panic!("offset {off:#x} accepted"));
        assert!(
            matches!(err, VfioPciError::VsvaOffset { offset, .. } if offset == off),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("0000:00:03.0"), "{msg}");
        assert!(msg.contains(&format!("{off:#x}")), "{msg}");
        assert!(msg.contains(why), "{off:#x}: {msg}");
    }
}

#[test]
fn vsva_caps_follow_host_caps() {
    // No PRS, ATS not supported, no exec/priv, a 5-bit width.
    let opts = VfioPciOptions {
        vpasid: Some(VpasidConfig {
            max_pasid_width: 5,
            ..Default::default()
        }),
    };
    let mut m = model_with(FakeVfio::nic(), opts);
    let img = guest_image(&mut m.dev, 4096);
    let p = linux_find_ext_cap(&img, ext_cap_id::PASID).unwrap();
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::ATS), None);
    assert_eq!(linux_find_ext_cap(&img, ext_cap_id::PRI), None);
    assert_eq!(r16(&mut m.dev, p + 4), 5 << 8, "no exec/priv, width 5");
    w(&mut m.dev, p + 6, &0xffffu16.to_le_bytes());
    assert_eq!(r16(&mut m.dev, p + 6), 1, "only Enable is writable");
    assert!(m.dev.pri_control().is_none() && m.dev.ats_control().is_none());
    // A width beyond 20 bits is clamped.
    let opts = VfioPciOptions {
        vpasid: Some(VpasidConfig {
            max_pasid_width: 31,
            ..Default::default()
        }),
    };
    let m = model_with(FakeVfio::nic(), opts);
    assert_eq!(m.dev.pasid_width(), Some(20));
}

#[test]
fn vsva_guest_writes_honoured() {
    let mut m = model_with(FakeVfio::nic(), vsva_opts(Some(0xe00)));
    let pris = Arc::new(Mutex::new(Vec::new()));
    let atss = Arc::new(Mutex::new(Vec::new()));
    let (p2, a2) = (pris.clone(), atss.clone());
    m.dev
        .set_pri_listener(Box::new(move |c| p2.lock().unwrap().push(c)));
    m.dev
        .set_ats_listener(Box::new(move |c| a2.lock().unwrap().push(c)));
    let d = &mut m.dev;
    let img = guest_image(d, 4096);
    let pasid = linux_find_ext_cap(&img, ext_cap_id::PASID).unwrap();
    let ats = linux_find_ext_cap(&img, ext_cap_id::ATS).unwrap();
    let pri = linux_find_ext_cap(&img, ext_cap_id::PRI).unwrap();

    // pci_enable_pasid: features from the capability register into control.
    let feat = r16(d, pasid + 4);
    assert_eq!(feat, (20 << 8) | 0x6);
    w(d, pasid + 6, &(1 | (feat & 0x6)).to_le_bytes());
    assert_eq!(r16(d, pasid + 6), 0x7);
    assert_eq!(
        d.pasid_control(),
        Some(PasidControl {
            enabled: true,
            execute: true,
            privileged: true
        })
    );

    // pci_enable_pri: Stopped while disabled, PRG Response PASID Required, capacity,
    // allocation = min(capacity, wanted), then Enable.
    assert_eq!(r16(d, pri + 6), (1 << 8) | (1 << 15));
    assert_eq!(r32(d, pri + 8), 32);
    w(d, pri + 12, &0x800u32.to_le_bytes());
    assert_eq!(r32(d, pri + 12), 32, "allocation capped at the capacity");
    w(d, pri + 12, &16u32.to_le_bytes());
    assert_eq!(r32(d, pri + 12), 16);
    w(d, pri + 4, &1u16.to_le_bytes());
    assert_eq!(r16(d, pri + 4), 1);
    assert_eq!(r16(d, pri + 6), 1 << 15, "Stopped clears with Enable");
    w(d, pri + 12, &8u32.to_le_bytes());
    assert_eq!(r32(d, pri + 12), 16, "allocation frozen while enabled");
    // Status is read-only but for the W1C errors; Capacity is read-only.
    w(d, pri + 6, &0xffffu16.to_le_bytes());
    w(d, pri + 8, &0u32.to_le_bytes());
    assert_eq!(r16(d, pri + 6), 1 << 15);
    assert_eq!(r32(d, pri + 8), 32);
    // pci_disable_pri, then pci_reset_pri: Reset self-clears.
    w(d, pri + 4, &0u16.to_le_bytes());
    assert_eq!(r16(d, pri + 6), (1 << 8) | (1 << 15), "Stopped again");
    w(d, pri + 4, &2u16.to_le_bytes());
    assert_eq!(r16(d, pri + 4), 0, "Reset reads 0");
    let got = pris.lock().unwrap().clone();
    assert!(got.iter().any(|c| c.reset), "{got:?}");
    let last = *got.last().unwrap();
    assert_eq!(
        (last.enabled, last.stopped, last.allocation, last.capacity),
        (false, true, 16, 32)
    );
    assert!(got.iter().any(|c| c.enabled && !c.stopped));

    // pci_enable_ats with a 4 KiB STU (0), then a 64 KiB one.
    w(d, ats + 6, &0x8000u16.to_le_bytes());
    assert_eq!(r16(d, ats + 6), 0x8000);
    w(d, ats + 6, &0xffe4u16.to_le_bytes());
    assert_eq!(r16(d, ats + 6), 0x8004, "only Enable and STU stick");
    assert_eq!(
        d.ats_control(),
        Some(AtsControl {
            enabled: true,
            stu: 4
        })
    );
    assert_eq!(
        *atss.lock().unwrap(),
        vec![
            AtsControl {
                enabled: true,
                stu: 0
            },
            AtsControl {
                enabled: true,
                stu: 4
            }
        ]
    );
    // Headers are read-only: the guest cannot relink the list.
    for o in [pasid, ats, pri] {
        let before = r32(d, o);
        w(d, o, &0u32.to_le_bytes());
        assert_eq!(r32(d, o), before);
    }
    // Nothing reached the device.
    assert!(m.fake.config_writes_in(0xe00, 0xe20).is_empty());

    // Function reset: everything back to reset values.
    m.dev.reset();
    let d = &mut m.dev;
    assert_eq!(r16(d, pasid + 6), 0);
    assert_eq!(r16(d, ats + 6), 0);
    assert_eq!(r16(d, pri + 4), 0);
    assert_eq!(r16(d, pri + 6), (1 << 8) | (1 << 15));
    assert_eq!(r32(d, pri + 12), 0);
    w(d, pri + 12, &4u32.to_le_bytes());
    assert_eq!(r32(d, pri + 12), 4, "allocation writable again after reset");
}

#[test]
fn vsva_pcie_cap_gives_linux_a_pasid_path() {
    // Without a vPASID the PCIe capability is the device's.
    let mut m = nic_model();
    assert_eq!(r16(&mut m.dev, nic::EXP + 2), 0x0002);
    assert_eq!(r16(&mut m.dev, nic::EXP + 0x12), 0x1011);
    assert_eq!(r32(&mut m.dev, nic::EXP + 0x24) & (7 << 21), 0);
    // With one, an Endpoint on the guest's root bus becomes an RC integrated endpoint with
    // End-End TLP Prefix Supported (Linux's eetlp_prefix_path, which pci_enable_pasid
    // needs) and no link.
    let mut m = model_with(FakeVfio::nic(), vsva_opts(None));
    let d = &mut m.dev;
    assert_eq!(r16(d, nic::EXP + 2), 0x0092);
    let cap2 = r32(d, nic::EXP + 0x24);
    assert_ne!(cap2 & (1 << 21), 0, "End-End TLP Prefix Supported");
    assert_eq!((cap2 >> 22) & 3, 1, "Max End-End TLP Prefixes");
    assert_eq!(r32(d, nic::EXP + 0x0c), 0, "no link capabilities");
    assert_eq!(r16(d, nic::EXP + 0x12), 0, "no link status");
    w(d, nic::EXP + 0x10, &0xffffu16.to_le_bytes());
    w(d, nic::EXP + 0x24, &0u32.to_le_bytes());
    assert_eq!(r16(d, nic::EXP + 0x10), 0);
    assert_eq!(r32(d, nic::EXP + 0x24), cap2);
    assert!(m
        .fake
        .config_writes_in(nic::EXP + 0x0c, nic::EXP + 0x14)
        .is_empty());
    assert!(m
        .fake
        .config_writes_in(nic::EXP + 0x24, nic::EXP + 0x28)
        .is_empty());
    // Device control still reaches the device.
    w(d, nic::EXP + 8, &0x0010u16.to_le_bytes());
    assert_eq!(
        m.fake.config_writes_in(nic::EXP + 8, nic::EXP + 10).len(),
        1
    );
}
