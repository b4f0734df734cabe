//! Assigned devices doing real work on a "VM without vCPUs": edu DMA into guest RAM (iommufd
//! and type1), edu MSI through the interrupt sink, the mtty mdev's I/O BAR, and the teardown
//! of an assignment. Every guest action goes through the bus entry points a vCPU exit handler
//! uses: config space through ECAM on the MMIO bus, BARs through the MMIO and PIO buses.

use std::fs;
use std::sync::Arc;
use std::time::Duration;

use devices::pci::{BarKind, MsiKind, MsiMessage, MsiVector, SharedPciDevice};
use devices::vfio::{VfioDeviceId, VfioPciDevice, VfioPciOptions};
use ioasid::{sysfs, DeviceName, DeviceSpec, IommuBackend, IommufdBackend, MapFile, Perm, PtId};

use super::env::{edu_path, mtty_path, pattern};
use crate::edu::{EDU_BUF, EDU_IDENT};
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

use super::pdev_fixture::*;

/// The tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "pdev_dma_into_guest_ram",
            run: pdev_dma_into_guest_ram,
        },
        LabTest {
            name: "pdev_dma_into_guest_ram_type1",
            run: pdev_dma_into_guest_ram_type1,
        },
        LabTest {
            name: "pdev_msi_fires",
            run: pdev_msi_fires,
        },
        LabTest {
            name: "mdev_mtty_region_io",
            run: mdev_mtty_region_io,
        },
        LabTest {
            name: "pdev_remove_releases_everything",
            run: pdev_remove_releases_everything,
        },
    ]
}

fn pdev_dma_into_guest_ram() -> TestResult {
    dma_into_guest_ram(Kind::Iommufd)
}

fn pdev_dma_into_guest_ram_type1() -> TestResult {
    dma_into_guest_ram(Kind::Type1)
}

fn dma_into_guest_ram(kind: Kind) -> TestResult {
    let a = Assigned::edu(kind, Some(&RAM_LAYOUT), Arc::default())?;
    let ram = a.ram()?;
    let edu = a.bring_up()?;

    // RAM (region 0) -> edu -> RAM (region 1), with guard bytes around the destination.
    let want = pattern(0x6b, LEN);
    ram.write(SRC_GPA, &want).map_err(s)?;
    ram.fill(DST_GPA - 64, LEN + 128, 0xee).map_err(s)?;
    edu.dma(SRC_GPA, EDU_BUF, LEN, false)?;
    edu.dma(EDU_BUF, DST_GPA, LEN, true)?;
    let got = ram.read(DST_GPA, LEN).map_err(s)?;
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        return Err(format!(
            "{kind:?}: byte {i} at GPA {:#x} is {:#04x}, want {:#04x} (DMA from GPA {SRC_GPA:#x})",
            DST_GPA + i as u64,
            got[i],
            want[i]
        ));
    }
    let before = ram.read(DST_GPA - 64, 64).map_err(s)?;
    let after = ram.read(DST_GPA + LEN as u64, 64).map_err(s)?;
    ensure!(
        before.iter().chain(&after).all(|&b| b == 0xee),
        "{kind:?}: the DMA wrote outside [{DST_GPA:#x}, +{LEN:#x})"
    );
    println!(
        "  {kind:?}: {LEN} bytes GPA {SRC_GPA:#x} -> edu -> GPA {DST_GPA:#x} through BAR0 {:#x} on the MMIO bus: match",
        edu.bar0
    );

    // Negative: refill edu's buffer with a fresh pattern, then DMA it to a GPA no region
    // covers. The IOMMU must fault it; guest RAM must not change anywhere.
    ram.write(SRC2_GPA, &pattern(0xc3, LEN)).map_err(s)?;
    edu.dma(SRC2_GPA, EDU_BUF, LEN, false)?;
    let digest = ram.digest();
    edu.dma(EDU_BUF, HOLE_GPA, LEN, true)?;
    ensure!(
        ram.digest() == digest,
        "{kind:?}: a DMA to unmapped GPA {HOLE_GPA:#x} changed guest RAM"
    );
    // The device survived the fault.
    let ident = edu.read32(0)?;
    ensure!(
        ident == EDU_IDENT,
        "{kind:?}: edu ident {ident:#x} after the faulting DMA"
    );
    println!("  {kind:?}: DMA to unmapped GPA {HOLE_GPA:#x} completed without touching guest RAM");

    // The region above 4 GiB is one mapping at IOVA = GPA: unmapping it removes exactly it.
    let hi = &ram.regions()[2];
    let n = a
        .iommu
        .backend()
        .ioas_unmap(a.ioas, hi.gpa, hi.len)
        .map_err(s)?;
    ensure!(
        n == hi.len,
        "{kind:?}: unmapping the region at {:#x} removed {n:#x} bytes, want {:#x}",
        hi.gpa,
        hi.len
    );
    Ok(Outcome::Pass)
}

// ---- pdev_msi_fires ----------------------------------------------------------------------

const MSI0: MsiVector = MsiVector {
    kind: MsiKind::Msi,
    index: 0,
};
const MSI_ADDR: u32 = 0xfee0_0000;
const MSI_DATA: u32 = 0x0041;

fn pdev_msi_fires() -> TestResult {
    let sink = Arc::new(RecordingSink::default());
    let a = Assigned::edu(Kind::Iommufd, None, sink.clone())?;
    let edu = a.bring_up()?;
    let m = &a.m;
    let cap = m
        .find_cap(EDU_SLOT, 0x05)?
        .ok_or("edu's MSI capability is not in the guest's capability list")?;
    let ctrl = m.cfg_read(EDU_SLOT, cap + 2, 2)? as u16;
    let is64 = ctrl & 0x80 != 0;
    let pvm = ctrl & 0x100 != 0;
    let data_off = cap + if is64 { 0x0c } else { 0x08 };
    ensure!(ctrl & 1 == 0, "MSI enabled before the guest enabled it");

    // Program address and data, then enable: only the enable creates the route.
    m.cfg_write(EDU_SLOT, cap + 4, 4, MSI_ADDR)?;
    if is64 {
        m.cfg_write(EDU_SLOT, cap + 8, 4, 0)?;
    }
    m.cfg_write(EDU_SLOT, data_off, 2, MSI_DATA)?;
    ensure!(
        sink.calls().is_empty(),
        "the model called the sink before MSI enable: {:?}",
        sink.calls()
    );
    m.cfg_write(EDU_SLOT, cap + 2, 2, u32::from(ctrl | 1))?;
    ensure!(
        m.cfg_read(EDU_SLOT, cap + 2, 2)? & 1 == 1,
        "MSI enable did not stick"
    );
    let want = MsiMessage {
        address: u64::from(MSI_ADDR),
        data: MSI_DATA,
    };
    ensure!(
        sink.calls() == vec![SinkCall::Route(MSI0, want, false)],
        "sink calls after enable: {:?}, want one unmasked route of MSI 0 to {want:x?}",
        sink.calls()
    );
    let (msg, masked, fd) = sink.route(MSI0)?.ok_or("no route for MSI 0")?;
    ensure!(
        msg == want && !masked,
        "route {msg:x?} masked={masked}, want {want:x?} unmasked"
    );
    ensure!(
        a.m.with_model(a.bdf, |d| d.msi_enabled())?,
        "the model does not report MSI enabled"
    );

    // Nothing pending yet; then edu raises through its BAR0 register.
    ensure!(
        !wait_readable(&fd, Duration::ZERO)?,
        "the eventfd was signalled before edu raised an interrupt"
    );
    edu.write32(EDU_IRQ_RAISE, 1)?;
    let fired = wait_readable(&fd, Duration::from_secs(5))?;
    let status = edu.read32(EDU_IRQ_STATUS)?;
    edu.write32(EDU_IRQ_ACK, status)?;
    ensure!(
        status & 1 != 0,
        "edu interrupt status {status:#x} after raising bit 0"
    );
    ensure!(
        fired,
        "the eventfd of MSI 0 did not become readable within 5 s of edu raising"
    );
    let count = fd.read().map_err(|e| format!("eventfd read: {e}"))?;
    ensure!(count >= 1, "eventfd count {count}");
    ensure!(
        edu.read32(EDU_IRQ_STATUS)? & 1 == 0,
        "edu interrupt status not cleared by the ack"
    );
    println!(
        "  edu raised, eventfd of MSI 0 (address {MSI_ADDR:#x}, data {MSI_DATA:#x}) fired {count}x"
    );

    // A data rewrite while enabled updates the route in place.
    let want2 = MsiMessage {
        data: MSI_DATA + 1,
        ..want
    };
    m.cfg_write(EDU_SLOT, data_off, 2, MSI_DATA + 1)?;
    ensure!(
        sink.calls().last() == Some(&SinkCall::Update(MSI0, want2)),
        "no route update after rewriting the data: {:?}",
        sink.calls()
    );
    if pvm {
        let mask_off = cap + if is64 { 0x10 } else { 0x0c };
        m.cfg_write(EDU_SLOT, mask_off, 4, 1)?;
        ensure!(
            sink.calls().last() == Some(&SinkCall::Mask(MSI0, true)),
            "no mask call after setting the mask bit: {:?}",
            sink.calls()
        );
    } else {
        println!("  edu's MSI has no per-vector mask: masking not exercised");
    }

    // Disable: the route is released and the model stops routing.
    m.cfg_write(EDU_SLOT, cap + 2, 2, u32::from(ctrl & !1))?;
    ensure!(
        sink.calls().last() == Some(&SinkCall::Release(MSI0)),
        "no release after MSI disable: {:?}",
        sink.calls()
    );
    ensure!(
        sink.route(MSI0)?.is_none(),
        "MSI 0 still routed after disable"
    );
    ensure!(
        !a.m.with_model(a.bdf, |d| d.msi_enabled())?,
        "the model still reports MSI enabled"
    );
    Ok(Outcome::Pass)
}

// ---- mdev_mtty_region_io -----------------------------------------------------------------

/// 16550 registers (offsets in the I/O BAR).
const UART_RBR_THR: u64 = 0;
const UART_FCR: u64 = 2;
const UART_LCR: u64 = 3;
const UART_MCR: u64 = 4;
const UART_LSR: u64 = 5;
const UART_SCR: u64 = 7;
const LSR_DR: u8 = 0x01;
const MCR_LOOP: u8 = 0x10;

fn mdev_mtty_region_io() -> TestResult {
    let spec = sysfs::resolve(&mtty_path()?).map_err(s)?;
    let DeviceName::Mdev(uuid) = &spec.name else {
        return Err(format!("{} is not an mdev", spec.name));
    };
    let backend = Arc::new(IommufdBackend::open().map_err(s)?);
    let (dev, vfio) = backend.bind(&spec).map_err(s)?;
    let iommu = Iommu::Iommufd(backend.clone(), dev);
    let ioas = backend.ioas_alloc().map_err(s)?;
    backend.attach(dev, None, PtId::Ioas(ioas)).map_err(s)?;
    let caps = backend.hw_info(dev).map_err(s)?;
    ensure!(
        !caps.has_hw_info(),
        "mtty reports IOMMU hardware info: {:?}",
        caps.info
    );

    let m = Machine::new()?;
    let model = VfioPciDevice::new(
        VfioDeviceId::Mdev(uuid.clone()),
        vfio,
        Arc::new(RecordingSink::default()),
        VfioPciOptions::default(),
    )
    .map_err(s)?;
    let bdf = m.add(model, MTTY_SLOT)?;
    let id = m.cfg_read(MTTY_SLOT, 0, 4)?;
    ensure!(
        id == 0x3253_4348,
        "mtty vendor:device {:04x}:{:04x}, want 4348:3253",
        id & 0xffff,
        id >> 16
    );
    let bars = m
        .bus()?
        .bar_states(bdf)
        .ok_or("no BARs on the bus for mtty")?;
    let io_bars: Vec<_> = bars.iter().filter(|b| b.info.kind == BarKind::Io).collect();
    ensure!(
        !io_bars.is_empty() && io_bars[0].info.index == 0,
        "mtty's BAR0 is not an I/O BAR: {bars:?}"
    );
    let mut ports = Vec::new();
    for b in &io_bars {
        let reg = 0x10 + 4 * u16::from(b.info.index);
        let v = m.cfg_read(MTTY_SLOT, reg, 4)?;
        ensure!(
            v & 1 == 1,
            "BAR{} reads {v:#x}: not an I/O BAR",
            b.info.index
        );
        let port = u64::from(v & !3);
        ensure!(
            port == b.assigned
                && port >= IO_WINDOW.base
                && port + b.info.size <= IO_WINDOW.base + IO_WINDOW.size,
            "BAR{} at port {port:#x}, bus assigned {:#x}",
            b.info.index,
            b.assigned
        );
        // Sizing, as a guest does: all ones, read the mask, restore.
        m.cfg_write(MTTY_SLOT, reg, 4, 0xffff_ffff)?;
        let mask = m.cfg_read(MTTY_SLOT, reg, 4)?;
        m.cfg_write(MTTY_SLOT, reg, 4, v)?;
        let size = (!(mask & !3)).wrapping_add(1);
        ensure!(
            mask & 1 == 1 && u64::from(size) == b.info.size && size >= 8,
            "BAR{} sizing read {mask:#x}: want an I/O BAR of {} bytes",
            b.info.index,
            b.info.size
        );
        ensure!(
            m.cfg_read(MTTY_SLOT, reg, 4)? == v,
            "BAR{} did not take its address back after sizing",
            b.info.index
        );
        ports.push(port);
    }
    // I/O decode off: the ports are not claimed.
    ensure!(
        m.inb(ports[0] + UART_LSR).is_err(),
        "port {:#x} answers with I/O decode off",
        ports[0] + UART_LSR
    );
    m.enable(MTTY_SLOT, CMD_IO)?;
    let p = ports[0];

    // Registers that hold what was written.
    for v in [0x5a, 0xa5] {
        m.outb(p + UART_SCR, v)?;
        let got = m.inb(p + UART_SCR)?;
        ensure!(
            got == v,
            "scratch register: wrote {v:#04x}, read {got:#04x}"
        );
    }
    m.outb(p + UART_LCR, 0x03)?;
    let lcr = m.inb(p + UART_LCR)?;
    ensure!(lcr == 0x03, "LCR: wrote 0x03 (8N1), read {lcr:#04x}");
    if let Some(&p1) = ports.get(1) {
        m.outb(p1 + UART_SCR, 0x11)?;
        let (a0, a1) = (m.inb(p + UART_SCR)?, m.inb(p1 + UART_SCR)?);
        ensure!(
            a0 == 0xa5 && a1 == 0x11,
            "the two ports' scratch registers are not independent: {a0:#04x}, {a1:#04x}"
        );
    }

    // Loopback echo: THR -> RBR, with LSR data-ready following.
    m.outb(p + UART_MCR, MCR_LOOP)?;
    let mcr = m.inb(p + UART_MCR)?;
    ensure!(
        mcr & MCR_LOOP != 0,
        "MCR loopback bit did not stick: {mcr:#04x}"
    );
    // FIFO on, both FIFOs cleared.
    m.outb(p + UART_FCR, 0x07)?;
    for _ in 0..64 {
        if m.inb(p + UART_LSR)? & LSR_DR == 0 {
            break;
        }
        m.inb(p + UART_RBR_THR)?;
    }
    ensure!(
        m.inb(p + UART_LSR)? & LSR_DR == 0,
        "receive FIFO does not drain"
    );
    for byte in *b"Ok!" {
        m.outb(p + UART_RBR_THR, byte)?;
        let lsr = m.inb(p + UART_LSR)?;
        ensure!(
            lsr & LSR_DR != 0,
            "LSR {lsr:#04x} after writing {byte:#04x}: no data ready"
        );
        let got = m.inb(p + UART_RBR_THR)?;
        ensure!(got == byte, "echoed {got:#04x}, want {byte:#04x}");
        let lsr = m.inb(p + UART_LSR)?;
        ensure!(
            lsr & LSR_DR == 0,
            "LSR {lsr:#04x}: data ready after reading the only byte"
        );
    }
    println!(
        "  {uuid}: config 4348:3253, I/O BAR0 at port {p:#x} ({} I/O BARs): scratch, LCR and loopback echo via the PIO bus",
        ports.len()
    );
    m.outb(p + UART_MCR, 0)?;

    // Reset, as a guest's bus reset or a VMM reboot does: VFIO_DEVICE_RESET on the mdev
    // (mtty accepts it), the config space back to power-on: decode off, so the ports vanish.
    m.bus()?.reset();
    let cmd = m.cfg_read(MTTY_SLOT, 4, 2)?;
    ensure!(
        cmd & u32::from(CMD_IO) == 0,
        "command register {cmd:#06x} after reset: I/O decode still on"
    );
    ensure!(
        m.inb(p + UART_LSR).is_err(),
        "port {:#x} still answers after reset",
        p + UART_LSR
    );
    let id = m.cfg_read(MTTY_SLOT, 0, 4)?;
    ensure!(id == 0x3253_4348, "after reset the IDs read {id:#x}");
    m.enable(MTTY_SLOT, CMD_IO)?;
    m.outb(p + UART_SCR, 0x3c)?;
    ensure!(
        m.inb(p + UART_SCR)? == 0x3c,
        "the port does not work again after reset and re-enable"
    );
    println!("  {uuid}: bus reset: decode off, ports gone, IDs kept; re-enabled and working");
    drop(m);
    drop(iommu);
    Ok(Outcome::Pass)
}

// ---- pdev_remove_releases_everything -----------------------------------------------------

/// Small RAM for the teardown test: two regions.
const SMALL_RAM: [(u64, u64); 2] = [(0, 4 * MIB), (0x0800_0000, MIB)];

/// `/proc/self/fd` as (fd, link target).
fn fd_links() -> Result<Vec<(String, String)>, String> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))? {
        let e = e.map_err(|e| format!("/proc/self/fd: {e}"))?;
        // An fd can close between the listing and the readlink (the listing's own).
        if let Ok(t) = fs::read_link(e.path()) {
            v.push((
                e.file_name().to_string_lossy().into_owned(),
                t.to_string_lossy().into_owned(),
            ));
        }
    }
    Ok(v)
}

fn vfio_links(links: &[(String, String)]) -> Vec<String> {
    links
        .iter()
        .filter(|(_, t)| t.starts_with("/dev/vfio") || t == "/dev/iommu")
        .map(|(fd, t)| format!("{fd} -> {t}"))
        .collect()
}

/// Opens `/dev/vfio/GROUP`; the error's errno when it fails.
fn open_group(path: &str) -> Result<(), i32> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|e| e.raw_os_error().unwrap_or(0))
}

/// Binds the edu cdev to a fresh iommufd; the errno when it fails.
fn fresh_bind(spec: &DeviceSpec) -> Result<Result<(), Option<i32>>, String> {
    let b = IommufdBackend::open().map_err(s)?;
    Ok(match b.bind(spec) {
        Ok((dev, vfio)) => {
            drop(vfio);
            b.unbind(dev);
            Ok(())
        }
        Err(e) => Err(e.errno()),
    })
}

fn pdev_remove_releases_everything() -> TestResult {
    let spec = sysfs::resolve(&edu_path()?).map_err(s)?;
    let group = spec
        .group
        .map(|g| format!("/dev/vfio/{g}"))
        .ok_or_else(|| format!("{} has no IOMMU group", spec.name))?;
    if let Ok(g) = std::env::var("LAB_EDU_GROUP") {
        ensure!(
            group == format!("/dev/vfio/{g}"),
            "sysfs says {group}, the lab init exported LAB_EDU_GROUP={g}"
        );
    }
    for kind in [Kind::Iommufd, Kind::Type1] {
        remove_cycle(kind, &spec, &group)?;
    }
    Ok(Outcome::Pass)
}

fn remove_cycle(kind: Kind, spec: &DeviceSpec, group: &str) -> Result<(), String> {
    let base = fd_links()?;
    let leaked = vfio_links(&base);
    ensure!(
        leaked.is_empty(),
        "{kind:?}: before assigning, this process already holds {leaked:?} (an earlier test leaked them)"
    );

    let a = Assigned::edu(kind, Some(&SMALL_RAM), Arc::default())?;
    let ram = a.ram()?;
    let edu = a.bring_up()?;
    let want = pattern(0x29, LEN);
    ram.write(0x1000, &want).map_err(s)?;
    ram.fill(0x0800_0800, LEN, 0).map_err(s)?;
    edu.dma(0x1000, EDU_BUF, LEN, false)?;
    edu.dma(EDU_BUF, 0x0800_0800, LEN, true)?;
    ensure!(
        ram.read(0x0800_0800, LEN).map_err(s)? == want,
        "{kind:?}: DMA round trip before removal: data mismatch"
    );

    // The IOAS maps each region: mapping it again is refused as a duplicate.
    for r in ram.regions() {
        let again = match kind {
            Kind::Iommufd => a.iommu.backend().ioas_map_file(
                a.ioas,
                &MapFile {
                    iova: Some(r.gpa),
                    fd: ram.fd(),
                    start: r.file_offset,
                    len: r.len,
                    perm: Perm::RW,
                },
            ),
            // SAFETY: the map is expected to fail; if it succeeded, the range is the RAM's,
            // which outlives the backend (see `Assigned`).
            Kind::Type1 => unsafe {
                a.iommu.backend().ioas_map(
                    a.ioas,
                    &ioasid::MapUser {
                        iova: Some(r.gpa),
                        user_va: r.host_addr(),
                        len: r.len,
                        perm: Perm::RW,
                    },
                )
            },
        };
        match again {
            Err(e) if e.errno() == Some(libc::EEXIST) => {}
            other => {
                return Err(format!(
                    "{kind:?}: mapping region {:#x}+{:#x} again: {:?}, want EEXIST (is it mapped?)",
                    r.gpa,
                    r.len,
                    other.map_err(|e| e.to_string())
                ))
            }
        }
    }

    // While held, nobody else can take the device or its group.
    let held = vfio_links(&fd_links()?);
    ensure!(
        !held.is_empty(),
        "{kind:?}: no /dev/vfio or /dev/iommu fd while the device is assigned"
    );
    match fresh_bind(spec)? {
        Err(Some(e)) if e == libc::EINVAL || e == libc::EBUSY => {}
        other => {
            return Err(format!(
                "{kind:?}: binding {} to a second iommufd while assigned: {other:?}, want EINVAL (iommufd) or EBUSY (type1)",
                spec.name
            ))
        }
    }
    ensure!(
        open_group(group) == Err(libc::EBUSY),
        "{kind:?}: opening {group} while the device is assigned: {:?}, want EBUSY",
        open_group(group)
    );

    // Remove it from the PCI bus like a hot-unplug: BAR0 leaves the bus, and the device is
    // told to stop decoding and DMA.
    let bar0 = edu.bar0;
    let removed: SharedPciDevice = a.m.bus()?.remove_device(a.bdf).map_err(s)?;
    ensure!(
        !a.m.mmio.ranges().iter().any(|&(b, _)| b == bar0),
        "{kind:?}: BAR0 {bar0:#x} still on the MMIO bus after removal"
    );
    let mut cmd = [0u8; 2];
    a.vfio.region_read(
        vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX,
        &mut cmd,
        4,
    );
    let cmd = u16::from_le_bytes(cmd);
    ensure!(
        cmd & (CMD_MEMORY | CMD_MASTER) == 0,
        "{kind:?}: the device's command register is {cmd:#06x} after removal: decode or bus mastering still on"
    );
    drop(removed);
    drop(a);

    // Every fd is back to the baseline, and the kernel sees the device free.
    let after = fd_links()?;
    let left = vfio_links(&after);
    ensure!(
        left.is_empty(),
        "{kind:?}: after removal and drop, still open: {left:?}"
    );
    ensure!(
        after.len() == base.len(),
        "{kind:?}: {} fds open after teardown, {} before: now {after:?}",
        after.len(),
        base.len()
    );
    match fresh_bind(spec)? {
        Ok(()) => {}
        Err(e) => {
            return Err(format!(
                "{kind:?}: rebinding {} to a fresh iommufd after teardown failed (errno {e:?}): the device is still held",
                spec.name
            ))
        }
    }
    ensure!(
        open_group(group).is_ok(),
        "{kind:?}: opening {group} after teardown: {:?}: the group is still held",
        open_group(group)
    );
    println!(
        "  {kind:?}: {} fds before and after; while held: {held:?}; after: device rebinds, {group} opens",
        base.len()
    );
    Ok(())
}
