//! The "VM without vCPUs" the device-model lab tests use: guest RAM assigned through the
//! `ioasid` crate, the devices crate's PCI bus on MMIO/PIO buses with ECAM and CF8/CFC, a
//! recording interrupt sink, and edu driven only through bus dispatch.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devices::bus::Bus;
use devices::pci::{
    AddressWindow, InterruptError, InterruptSink, MsiMessage, MsiVector, PciBdf, PciBus,
    PciBusConfig, PciConfigIo, PciEcam, SharedPciBus, ECAM_BUS_SIZE, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_PORT_SIZE,
};
use devices::vfio::{VfioDeviceId, VfioPciDevice, VfioPciOptions};
use ioasid::{sysfs, DevId, IoasId, IommuBackend, IommufdBackend, PtId, Type1Backend};
use vfio_ioctls::VfioDevice;
use vmm_sys_util::eventfd::EventFd;

use super::env::edu_path;
use crate::edu::{EDU_BUF_LEN, EDU_IDENT};
use crate::ensure;
use crate::guest_ram::{lift_memlock_limit, GuestRam};
use crate::harness::chain;

pub(crate) fn s(e: impl std::error::Error) -> String {
    chain(&e)
}

pub(crate) const MIB: u64 = 1 << 20;
/// Guest RAM of the DMA tests: 64 MiB at 0, 16 MiB at 192 MiB (both inside edu's 28-bit DMA
/// mask, with a hole between them), and 16 MiB at 4 GiB (mapped, beyond edu's reach).
pub(crate) const RAM_LAYOUT: [(u64, u64); 3] = [
    (0, 64 * MIB),
    (0x0c00_0000, 16 * MIB),
    (0x1_0000_0000, 16 * MIB),
];
/// Source and destination GPAs: unaligned, in different regions, the destination crossing a
/// page boundary.
pub(crate) const SRC_GPA: u64 = 0x0031_4150;
pub(crate) const DST_GPA: u64 = 0x0c12_3e80;
/// A second source, to refill edu's buffer before the negative case.
pub(crate) const SRC2_GPA: u64 = 0x0200_0000;
/// Just past the end of the first region. Backed by nothing; in the memfd, the bytes after
/// region 0 belong to region 1, so a map that leaked past region 0 would show up there.
pub(crate) const HOLE_GPA: u64 = 64 * MIB;
pub(crate) const LEN: usize = EDU_BUF_LEN;

/// Where the model sits.
pub(crate) const EDU_SLOT: u8 = 3;
pub(crate) const MTTY_SLOT: u8 = 4;
pub(crate) const ECAM_BASE: u64 = 0xe000_0000;
pub(crate) const MMIO32: AddressWindow = AddressWindow {
    base: 0xc000_0000,
    size: 0x1000_0000,
};
pub(crate) const IO_WINDOW: AddressWindow = AddressWindow {
    base: 0xc000,
    size: 0x4000,
};

/// PCI command register bits.
pub(crate) const CMD_IO: u16 = 1 << 0;
pub(crate) const CMD_MEMORY: u16 = 1 << 1;
pub(crate) const CMD_MASTER: u16 = 1 << 2;

/// edu registers (QEMU docs/specs/edu.rst).
pub(crate) const EDU_IRQ_STATUS: u64 = 0x24;
pub(crate) const EDU_IRQ_RAISE: u64 = 0x60;
pub(crate) const EDU_IRQ_ACK: u64 = 0x64;
pub(crate) const EDU_DMA_SRC: u64 = 0x80;
pub(crate) const EDU_DMA_DST: u64 = 0x88;
pub(crate) const EDU_DMA_LEN: u64 = 0x90;
pub(crate) const EDU_DMA_CMD: u64 = 0x98;

// ---- the interrupt sink ------------------------------------------------------------------

/// One call the model made on the sink.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SinkCall {
    Route(MsiVector, MsiMessage, bool),
    Update(MsiVector, MsiMessage),
    Mask(MsiVector, bool),
    Release(MsiVector),
}

/// A live route: the message, the mask state, and a duplicate of the eventfd handed out.
pub(crate) struct Route {
    pub(crate) msg: MsiMessage,
    pub(crate) masked: bool,
    pub(crate) fd: EventFd,
}

#[derive(Default)]
pub(crate) struct SinkState {
    pub(crate) routes: BTreeMap<MsiVector, Route>,
    pub(crate) calls: Vec<SinkCall>,
}

/// An interrupt sink that creates an eventfd per route and records every call.
#[derive(Default)]
pub(crate) struct RecordingSink {
    pub(crate) state: Mutex<SinkState>,
}

impl RecordingSink {
    pub(crate) fn lock(&self) -> MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn calls(&self) -> Vec<SinkCall> {
        self.lock().calls.clone()
    }

    /// The message, mask state and a duplicate eventfd of `vector`'s route.
    pub(crate) fn route(
        &self,
        vector: MsiVector,
    ) -> Result<Option<(MsiMessage, bool, EventFd)>, String> {
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
pub(crate) fn wait_readable(fd: &EventFd, timeout: Duration) -> Result<bool, String> {
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
pub(crate) struct Machine {
    pub(crate) mmio: Arc<Bus>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) pci: SharedPciBus,
}

impl Machine {
    pub(crate) fn new() -> Result<Self, String> {
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

    pub(crate) fn bus(&self) -> Result<MutexGuard<'_, PciBus>, String> {
        self.pci
            .lock()
            .map_err(|_| "PCI bus lock poisoned".to_string())
    }

    pub(crate) fn add(&self, model: VfioPciDevice, slot: u8) -> Result<PciBdf, String> {
        self.bus()?
            .add_device(Arc::new(Mutex::new(model)), Some(slot))
            .map_err(s)
    }

    pub(crate) fn ecam(slot: u8, reg: u16) -> u64 {
        ECAM_BASE + (u64::from(slot) << 15) + u64::from(reg)
    }

    /// A config read of 1, 2 or 4 bytes through ECAM.
    pub(crate) fn cfg_read(&self, slot: u8, reg: u16, len: usize) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.mmio
            .read(Self::ecam(slot, reg), &mut b[..len])
            .map_err(s)?;
        Ok(u32::from_le_bytes(b))
    }

    /// A config write of 1, 2 or 4 bytes through ECAM.
    pub(crate) fn cfg_write(&self, slot: u8, reg: u16, len: usize, v: u32) -> Result<(), String> {
        self.mmio
            .write(Self::ecam(slot, reg), &v.to_le_bytes()[..len])
            .map_err(s)
    }

    /// Sets `bits` in the command register, as a guest driver does, and checks they stuck.
    pub(crate) fn enable(&self, slot: u8, bits: u16) -> Result<(), String> {
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
    pub(crate) fn find_cap(&self, slot: u8, id: u8) -> Result<Option<u16>, String> {
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
    pub(crate) fn with_model<R>(
        &self,
        bdf: PciBdf,
        f: impl FnOnce(&VfioPciDevice) -> R,
    ) -> Result<R, String> {
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

    pub(crate) fn mmio_read(&self, addr: u64, len: usize) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.mmio.read(addr, &mut b[..len]).map_err(s)?;
        Ok(u64::from_le_bytes(b))
    }

    pub(crate) fn mmio_write(&self, addr: u64, len: usize, v: u64) -> Result<(), String> {
        self.mmio.write(addr, &v.to_le_bytes()[..len]).map_err(s)
    }

    pub(crate) fn inb(&self, port: u64) -> Result<u8, String> {
        let mut b = [0u8; 1];
        self.pio.read(port, &mut b).map_err(s)?;
        Ok(b[0])
    }

    pub(crate) fn outb(&self, port: u64, v: u8) -> Result<(), String> {
        self.pio.write(port, &[v]).map_err(s)
    }
}

// ---- edu assigned through one of the backends --------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Iommufd,
    Type1,
}

/// The backend side of an assignment; unbinds on drop.
pub(crate) enum Iommu {
    Iommufd(Arc<IommufdBackend>, DevId),
    Type1(Arc<Type1Backend>, DevId),
}

impl Iommu {
    pub(crate) fn backend(&self) -> &dyn IommuBackend {
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
pub(crate) struct Assigned {
    pub(crate) m: Machine,
    pub(crate) bdf: PciBdf,
    pub(crate) vfio: Arc<VfioDevice>,
    pub(crate) ioas: IoasId,
    pub(crate) iommu: Iommu,
    pub(crate) ram: Option<GuestRam>,
}

impl Assigned {
    pub(crate) fn edu(
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

    pub(crate) fn ram(&self) -> Result<&GuestRam, String> {
        self.ram.as_ref().ok_or_else(|| "no guest RAM".to_string())
    }

    /// BAR0's address as the guest reads it, checked against what the bus assigned; then
    /// memory decode and bus mastering on, and edu's ident read through the MMIO bus.
    pub(crate) fn bring_up(&self) -> Result<EduBus<'_>, String> {
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
pub(crate) struct EduBus<'a> {
    pub(crate) m: &'a Machine,
    pub(crate) bar0: u64,
}

impl EduBus<'_> {
    pub(crate) fn read32(&self, off: u64) -> Result<u32, String> {
        Ok(self.m.mmio_read(self.bar0 + off, 4)? as u32)
    }

    pub(crate) fn write32(&self, off: u64, v: u32) -> Result<(), String> {
        self.m.mmio_write(self.bar0 + off, 4, u64::from(v))
    }

    /// An 8-byte register write, read back (edu's DMA registers are readable).
    pub(crate) fn set64(&self, off: u64, v: u64) -> Result<(), String> {
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
    pub(crate) fn dma(&self, src: u64, dst: u64, len: usize, to_ram: bool) -> Result<(), String> {
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
