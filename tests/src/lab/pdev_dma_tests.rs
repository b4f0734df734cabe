//! Assigned devices doing real work on a "VM without vCPUs": edu DMA into guest RAM (iommufd
//! and type1), edu MSI through the interrupt sink, the mtty mdev's I/O BAR, and the teardown
//! of an assignment. Every guest action goes through the bus entry points a vCPU exit handler
//! uses: config space through ECAM on the MMIO bus, BARs through the MMIO and PIO buses.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::pci::{
    AddressWindow, BarKind, InterruptError, InterruptSink, MsiKind, MsiMessage, MsiVector, PciBdf,
    PciBus, PciBusConfig, PciConfigIo, PciEcam, SharedPciBus, SharedPciDevice, ECAM_BUS_SIZE,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use devices::vfio::{VfioDeviceId, VfioPciDevice, VfioPciOptions};
use ioasid::{
    sysfs, DevId, DeviceName, DeviceSpec, IoasId, IommuBackend, IommufdBackend, MapFile, Perm,
    PtId, Type1Backend,
};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

use super::env::{edu_path, mtty_path, pattern};
use crate::edu::{EDU_BUF, EDU_BUF_LEN, EDU_IDENT};
use crate::ensure;
use crate::guest_ram::{lift_memlock_limit, GuestRam};
use crate::harness::{chain, LabTest, Outcome, TestResult};

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

fn s(e: impl std::error::Error) -> String {
    chain(&e)
}

const MIB: u64 = 1 << 20;
/// Guest RAM of the DMA tests: 64 MiB at 0, 16 MiB at 192 MiB (both inside edu's 28-bit DMA
/// mask, with a hole between them), and 16 MiB at 4 GiB (mapped, beyond edu's reach).
const RAM_LAYOUT: [(u64, u64); 3] = [
    (0, 64 * MIB),
    (0x0c00_0000, 16 * MIB),
    (0x1_0000_0000, 16 * MIB),
];
/// Source and destination GPAs: unaligned, in different regions, the destination crossing a
/// page boundary.
const SRC_GPA: u64 = 0x0031_4150;
const DST_GPA: u64 = 0x0c12_3e80;
/// A second source, to refill edu's buffer before the negative case.
const SRC2_GPA: u64 = 0x0200_0000;
/// Just past the end of the first region. Backed by nothing; in the memfd, the bytes after
/// region 0 belong to region 1, so a map that leaked past region 0 would show up there.
const HOLE_GPA: u64 = 64 * MIB;
const LEN: usize = EDU_BUF_LEN;

/// Where the model sits.
const EDU_SLOT: u8 = 3;
const MTTY_SLOT: u8 = 4;
const ECAM_BASE: u64 = 0xe000_0000;
const MMIO32: AddressWindow = AddressWindow {
    base: 0xc000_0000,
    size: 0x1000_0000,
};
const IO_WINDOW: AddressWindow = AddressWindow {
    base: 0xc000,
    size: 0x4000,
};

/// PCI command register bits.
const CMD_IO: u16 = 1 << 0;
const CMD_MEMORY: u16 = 1 << 1;
const CMD_MASTER: u16 = 1 << 2;

/// edu registers (QEMU docs/specs/edu.rst).
const EDU_IRQ_STATUS: u64 = 0x24;
const EDU_IRQ_RAISE: u64 = 0x60;
const EDU_IRQ_ACK: u64 = 0x64;
const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_LEN: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;

// ---- the interrupt sink ------------------------------------------------------------------

/// One call the model made on the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SinkCall {
    Route(MsiVector, MsiMessage, bool),
    Update(MsiVector, MsiMessage),
    Mask(MsiVector, bool),
    Release(MsiVector),
}

/// A live route: the message, the mask state, and a duplicate of the eventfd handed out.
struct Route {
    msg: MsiMessage,
    masked: bool,
    fd: EventFd,
}

#[derive(Default)]
struct SinkState {
    routes: BTreeMap<MsiVector, Route>,
    calls: Vec<SinkCall>,
}

/// An interrupt sink that creates an eventfd per route and records every call.
#[derive(Default)]
struct RecordingSink {
    state: Mutex<SinkState>,
}

impl RecordingSink {
    fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn calls(&self) -> Vec<SinkCall> {
        self.lock().calls.clone()
    }

    /// The message, mask state and a duplicate eventfd of `vector`'s route.
    fn route(&self, vector: MsiVector) -> Result<Option<(MsiMessage, bool, EventFd)>, String> {
        match self.lock().routes.get(&vector) {
            Some(r) => Ok(Some((
                r.msg,
                r.masked,
                r.fd.try_clone()
                    .map_err(|e| format!("dup of a route eventfd: {e}"))?,
            ))),
            None => Ok(None),
        }
    }
}

impl InterruptSink for RecordingSink {
    fn msi_route(
        &self,
        vector: MsiVector,
        msg: MsiMessage,
        masked: bool,
    ) -> Result<EventFd, InterruptError> {
        let route = |source| InterruptError::Route { vector, source };
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(route)?;
        let keep = fd.try_clone().map_err(route)?;
        let mut st = self.lock();
        st.calls.push(SinkCall::Route(vector, msg, masked));
        st.routes.insert(
            vector,
            Route {
                msg,
                masked,
                fd: keep,
            },
        );
        Ok(fd)
    }

    fn msi_update(&self, vector: MsiVector, msg: MsiMessage) -> Result<(), InterruptError> {
        let mut st = self.lock();
        st.calls.push(SinkCall::Update(vector, msg));
        if let Some(r) = st.routes.get_mut(&vector) {
            r.msg = msg;
        }
        Ok(())
    }

    fn msi_mask(&self, vector: MsiVector, masked: bool) -> Result<(), InterruptError> {
        let mut st = self.lock();
        st.calls.push(SinkCall::Mask(vector, masked));
        if let Some(r) = st.routes.get_mut(&vector) {
            r.masked = masked;
        }
        Ok(())
    }

    fn msi_release(&self, vector: MsiVector) {
        let mut st = self.lock();
        st.calls.push(SinkCall::Release(vector));
        st.routes.remove(&vector);
    }
}

/// Waits up to `timeout` for `fd` to become readable.
fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<bool, String> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        return Err(format!("poll: {}", io::Error::last_os_error()));
    }
    Ok(n > 0 && p.revents & libc::POLLIN != 0)
}

// ---- the machine: buses, PCI bus, config access ------------------------------------------

/// A VM without vCPUs: MMIO and PIO buses, a PCI bus with ECAM and 0xCF8 config access.
struct Machine {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    pci: SharedPciBus,
}

impl Machine {
    fn new() -> Result<Self, String> {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let cfg = PciBusConfig {
            segment: 0,
            mmio32: MMIO32,
            mmio64: None,
            io: Some(IO_WINDOW),
        };
        let pci: SharedPciBus = Arc::new(Mutex::new(
            PciBus::new(cfg, mmio.clone(), pio.clone()).map_err(s)?,
        ));
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(pci.clone()))),
            ECAM_BASE,
            ECAM_BUS_SIZE,
        )
        .map_err(s)?;
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            PCI_CONFIG_IO_PORT,
            PCI_CONFIG_IO_PORT_SIZE,
        )
        .map_err(s)?;
        Ok(Machine { mmio, pio, pci })
    }

    fn bus(&self) -> Result<MutexGuard<'_, PciBus>, String> {
        self.pci
            .lock()
            .map_err(|_| "PCI bus lock poisoned".to_string())
    }

    fn add(&self, model: VfioPciDevice, slot: u8) -> Result<PciBdf, String> {
        self.bus()?
            .add_device(Arc::new(Mutex::new(model)), Some(slot))
            .map_err(s)
    }

    fn ecam(slot: u8, reg: u16) -> u64 {
        ECAM_BASE + (u64::from(slot) << 15) + u64::from(reg)
    }

    /// A config read of 1, 2 or 4 bytes through ECAM.
    fn cfg_read(&self, slot: u8, reg: u16, len: usize) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.mmio
            .read(Self::ecam(slot, reg), &mut b[..len])
            .map_err(s)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A config write of 1, 2 or 4 bytes through ECAM.
    fn cfg_write(&self, slot: u8, reg: u16, len: usize, v: u32) -> Result<(), String> {
        self.mmio
            .write(Self::ecam(slot, reg), &v.to_le_bytes()[..len])
            .map_err(s)
    }

    /// Sets `bits` in the command register, as a guest driver does, and checks they stuck.
    fn enable(&self, slot: u8, bits: u16) -> Result<(), String> {
        let cmd = self.cfg_read(slot, 0x04, 2)? as u16;
        self.cfg_write(slot, 0x04, 2, u32::from(cmd | bits))?;
        let got = self.cfg_read(slot, 0x04, 2)? as u16;
        ensure!(
            got & bits == bits,
            "command register {got:#06x} after setting {bits:#06x}"
        );
        Ok(())
    }

    /// The capability with `id` in the standard list, walked as a guest does.
    fn find_cap(&self, slot: u8, id: u8) -> Result<Option<u16>, String> {
        let status = self.cfg_read(slot, 0x06, 2)?;
        if status & 0x10 == 0 {
            return Ok(None);
        }
        let mut ptr = self.cfg_read(slot, 0x34, 1)? as u16 & 0xfc;
        for _ in 0..48 {
            if ptr < 0x40 {
                return Ok(None);
            }
            let hdr = self.cfg_read(slot, ptr, 2)?;
            if hdr & 0xff == u32::from(id) {
                return Ok(Some(ptr));
            }
            ptr = ((hdr >> 8) & 0xfc) as u16;
        }
        Err("capability list does not end within 48 entries".to_string())
    }

    /// The model at `bdf`, locked, for introspection.
    fn with_model<R>(&self, bdf: PciBdf, f: impl FnOnce(&VfioPciDevice) -> R) -> Result<R, String> {
        let dev = self
            .bus()?
            .device(bdf)
            .ok_or_else(|| format!("no device at {bdf}"))?;
        let g = dev.lock().map_err(|_| "device lock poisoned".to_string())?;
        let m = g
            .as_any()
            .downcast_ref::<VfioPciDevice>()
            .ok_or_else(|| format!("{bdf} is not a vfio-pci model"))?;
        Ok(f(m))
    }

    fn mmio_read(&self, addr: u64, len: usize) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.mmio.read(addr, &mut b[..len]).map_err(s)?;
        Ok(u64::from_le_bytes(b))
    }

    fn mmio_write(&self, addr: u64, len: usize, v: u64) -> Result<(), String> {
        self.mmio.write(addr, &v.to_le_bytes()[..len]).map_err(s)
    }

    fn inb(&self, port: u64) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.pio.read(port, &mut b).map_err(s)?;
        Ok(b[0])
    }

    fn outb(&self, port: u64, v: u8) -> Result<(), String> {
        self.pio.write(port, &[v]).map_err(s)
    }
}

// ---- edu assigned through one of the backends --------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Iommufd,
    Type1,
}

/// The backend side of an assignment; unbinds on drop.
enum Iommu {
    Iommufd(Arc<IommufdBackend>, DevId),
    Type1(Arc<Type1Backend>, DevId),
}

impl Iommu {
    fn backend(&self) -> &dyn IommuBackend {
        match self {
            Iommu::Iommufd(b, _) => &**b,
            Iommu::Type1(b, _) => &**b,
        }
    }
}

impl Drop for Iommu {
    fn drop(&mut self) {
        match self {
            Iommu::Iommufd(b, d) => b.unbind(*d),
            Iommu::Type1(b, d) => b.unbind(*d),
        }
    }
}

/// edu assigned to a machine: model at [`EDU_SLOT`], the backend, and optionally guest RAM
/// mapped at IOVA = GPA. Fields drop in order: the machine (and the model with its VFIO
/// reference), then the backend, then the RAM the IOAS mapped.
struct Assigned {
    m: Machine,
    bdf: PciBdf,
    vfio: Arc<VfioDevice>,
    ioas: IoasId,
    iommu: Iommu,
    ram: Option<GuestRam>,
}

impl Assigned {
    fn edu(
        kind: Kind,
        layout: Option<&[(u64, u64)]>,
        sink: Arc<RecordingSink>,
    ) -> Result<Self, String> {
        let spec = sysfs::resolve(&edu_path()?).map_err(s)?;
        let ram = layout.map(GuestRam::new).transpose().map_err(s)?;
        let (iommu, vfio, ioas) = match kind {
            Kind::Iommufd => {
                if ram.is_some() {
                    if let Some(old) = lift_memlock_limit().map_err(|e| {
                        format!("cannot lift RLIMIT_MEMLOCK for iommufd's pinned guest RAM: {e}")
                    })? {
                        println!("  RLIMIT_MEMLOCK lifted from {old} bytes to unlimited: iommufd accounts pinned guest RAM against it");
                    }
                }
                let b = Arc::new(IommufdBackend::open().map_err(s)?);
                let (dev, vfio) = b.bind(&spec).map_err(s)?;
                let iommu = Iommu::Iommufd(b.clone(), dev);
                let ioas = b.ioas_alloc().map_err(s)?;
                b.attach(dev, None, PtId::Ioas(ioas)).map_err(s)?;
                if let Some(r) = &ram {
                    r.map_file_into(&*b, ioas).map_err(s)?;
                }
                (iommu, vfio, ioas)
            }
            Kind::Type1 => {
                let b = Arc::new(Type1Backend::open().map_err(s)?);
                let ioas = b.ioas_alloc().map_err(s)?;
                let (dev, vfio) = b.bind(&spec, ioas).map_err(s)?;
                let iommu = Iommu::Type1(b.clone(), dev);
                if let Some(r) = &ram {
                    // SAFETY: `ram` is stored after `iommu` in `Assigned`, so the backend (and
                    // its container with the mappings) drops before the memory.
                    unsafe { r.map_user_into(&*b, ioas) }.map_err(s)?;
                }
                (iommu, vfio, ioas)
            }
        };
        let m = Machine::new()?;
        let model = VfioPciDevice::new(
            VfioDeviceId::Pdev(spec.name.to_string()),
            vfio.clone(),
            sink,
            VfioPciOptions::default(),
        )
        .map_err(s)?;
        let bdf = m.add(model, EDU_SLOT)?;
        Ok(Assigned {
            m,
            bdf,
            vfio,
            ioas,
            iommu,
            ram,
        })
    }

    fn ram(&self) -> Result<&GuestRam, String> {
        self.ram.as_ref().ok_or_else(|| "no guest RAM".to_string())
    }

    /// BAR0's address as the guest reads it, checked against what the bus assigned; then
    /// memory decode and bus mastering on, and edu's ident read through the MMIO bus.
    fn bring_up(&self) -> Result<EduBus<'_>, String> {
        let bar0 = u64::from(self.m.cfg_read(EDU_SLOT, 0x10, 4)? & 0xffff_fff0);
        let assigned = self
            .m
            .bus()?
            .bar_states(self.bdf)
            .and_then(|b| b.into_iter().find(|b| b.info.index == 0))
            .map(|b| b.assigned)
            .ok_or("the PCI bus has no BAR0 for edu")?;
        ensure!(
            bar0 == assigned,
            "BAR0 reads {bar0:#x}, the bus assigned {assigned:#x}"
        );
        self.m.enable(EDU_SLOT, CMD_MEMORY | CMD_MASTER)?;
        let edu = EduBus { m: &self.m, bar0 };
        let ident = edu.read32(0)?;
        ensure!(
            ident == EDU_IDENT,
            "edu ident {ident:#x} at BAR0 {bar0:#x}, want {EDU_IDENT:#x}"
        );
        Ok(edu)
    }
}

/// edu's registers reached through the MMIO bus at the BAR0 address the guest sees.
struct EduBus<'a> {
    m: &'a Machine,
    bar0: u64,
}

impl EduBus<'_> {
    fn read32(&self, off: u64) -> Result<u32, String> {
        Ok(self.m.mmio_read(self.bar0 + off, 4)? as u32)
    }

    fn write32(&self, off: u64, v: u32) -> Result<(), String> {
        self.m.mmio_write(self.bar0 + off, 4, u64::from(v))
    }

    /// An 8-byte register write, read back (edu's DMA registers are readable).
    fn set64(&self, off: u64, v: u64) -> Result<(), String> {
        self.m.mmio_write(self.bar0 + off, 8, v)?;
        let back = self.m.mmio_read(self.bar0 + off, 8)?;
        ensure!(
            back == v,
            "edu register {off:#x}: wrote {v:#x} through the MMIO bus, read back {back:#x}"
        );
        Ok(())
    }

    /// One DMA transfer, waited for with a bounded poll: a transfer that faults in the IOMMU
    /// still completes (edu ignores the error), so a hang here is a real failure.
    fn dma(&self, src: u64, dst: u64, len: usize, to_ram: bool) -> Result<(), String> {
        self.set64(EDU_DMA_SRC, src)?;
        self.set64(EDU_DMA_DST, dst)?;
        self.set64(EDU_DMA_LEN, len as u64)?;
        self.m
            .mmio_write(self.bar0 + EDU_DMA_CMD, 8, 1 | if to_ram { 2 } else { 0 })?;
        let start = Instant::now();
        while self.read32(EDU_DMA_CMD)? & 1 != 0 {
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "edu DMA {src:#x} -> {dst:#x} ({len} bytes) still running after 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

// ---- pdev_dma_into_guest_ram(_type1) -----------------------------------------------------

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
