//! The vfio-pci device model on a "VM without vCPUs": guest address spaces (MMIO and PIO
//! buses), the PCI bus, and edu assigned through the `ioasid` crate. Tests drive the device
//! exactly as a guest would, through the buses' entry points.

use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::pci::{
    AddressWindow, InterruptError, InterruptSink, MsiMessage, MsiVector, PciBus, PciBusConfig,
    PciConfigIo, SharedPciBus, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use devices::vfio::{VfioDeviceId, VfioPciDevice, VfioPciOptions};
use ioasid::{sysfs, IommuBackend, IommufdBackend, PtId};
use vmm_sys_util::eventfd::EventFd;

use super::env::edu_path;
use crate::edu::EDU_IDENT;
use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The pdev tests.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "pdev_config_space_virtualized",
            run: pdev_config_space_virtualized,
        },
        LabTest {
            name: "pdev_bar0_ident_and_liveness",
            run: pdev_bar0_ident_and_liveness,
        },
    ]
}

/// Interrupts go nowhere here: each route gets a fresh eventfd.
struct EventSink;

impl InterruptSink for EventSink {
    fn msi_route(
        &self,
        vector: MsiVector,
        _msg: MsiMessage,
        _masked: bool,
    ) -> Result<EventFd, InterruptError> {
        EventFd::new(libc::EFD_NONBLOCK).map_err(|source| InterruptError::Route { vector, source })
    }
    fn msi_update(&self, _vector: MsiVector, _msg: MsiMessage) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_mask(&self, _vector: MsiVector, _masked: bool) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_release(&self, _vector: MsiVector) {}
}

/// A VM without vCPUs, with edu at 00:03.0 of its PCI bus.
struct Vm {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    _pci: SharedPciBus,
    backend: Arc<IommufdBackend>,
    dev: ioasid::DevId,
    slot: u8,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Dropping `_pci` afterwards drops the device model and closes the VFIO fd; the next
        // test's bind proves it (a leaked fd makes VFIO_DEVICE_BIND_IOMMUFD fail).
        self.backend.unbind(self.dev);
    }
}

const MMIO32: u64 = 0xc000_0000;

fn vm() -> Result<Vm, String> {
    let spec = sysfs::resolve(&edu_path()?).map_err(|e| chain(&e))?;
    let backend = Arc::new(IommufdBackend::open().map_err(|e| chain(&e))?);
    let (dev, vfio) = backend.bind(&spec).map_err(|e| chain(&e))?;
    let ioas = backend.ioas_alloc().map_err(|e| chain(&e))?;
    backend
        .attach(dev, None, PtId::Ioas(ioas))
        .map_err(|e| chain(&e))?;
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let cfg = PciBusConfig {
        segment: 0,
        mmio32: AddressWindow {
            base: MMIO32,
            size: 0x1000_0000,
        },
        mmio64: None,
        io: Some(AddressWindow {
            base: 0xc000,
            size: 0x4000,
        }),
    };
    let pci: SharedPciBus = Arc::new(Mutex::new(
        PciBus::new(cfg, mmio.clone(), pio.clone()).map_err(|e| chain(&e))?,
    ));
    pio.insert(
        Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
        PCI_CONFIG_IO_PORT,
        PCI_CONFIG_IO_PORT_SIZE,
    )
    .map_err(|e| chain(&e))?;
    let model = VfioPciDevice::new(
        VfioDeviceId::Pdev(spec.name.to_string()),
        vfio,
        Arc::new(EventSink),
        VfioPciOptions::default(),
    )
    .map_err(|e| chain(&e))?;
    let slot = 3;
    pci.lock()
        .map_err(|_| "PCI bus lock poisoned".to_string())?
        .add_device(Arc::new(Mutex::new(model)), Some(slot))
        .map_err(|e| chain(&e))?;
    Ok(Vm {
        mmio,
        pio,
        _pci: pci,
        backend,
        dev,
        slot,
    })
}

impl Vm {
    fn cf8(&self, reg: u32) -> Result<(), String> {
        let addr = 0x8000_0000u32 | (u32::from(self.slot) << 11) | (reg & 0xfc);
        self.pio
            .write(0xcf8, &addr.to_le_bytes())
            .map_err(|e| e.to_string())
    }
    fn cfg_read32(&self, reg: u32) -> Result<u32, String> {
        self.cf8(reg)?;
        let mut b = [0u8; 4];
        self.pio.read(0xcfc, &mut b).map_err(|e| e.to_string())?;
        Ok(u32::from_le_bytes(b))
    }
    fn cfg_write32(&self, reg: u32, v: u32) -> Result<(), String> {
        self.cf8(reg)?;
        self.pio
            .write(0xcfc, &v.to_le_bytes())
            .map_err(|e| e.to_string())
    }
    fn mmio_read32(&self, addr: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.mmio.read(addr, &mut b).map_err(|e| e.to_string())?;
        Ok(u32::from_le_bytes(b))
    }
}

fn pdev_config_space_virtualized() -> TestResult {
    let vm = vm()?;
    let id = vm.cfg_read32(0)?;
    ensure!(
        id == 0x11e8_1234,
        "vendor/device {id:#010x}, want 0x11e81234"
    );
    // BAR0: 1 MiB, 32-bit, non-prefetchable memory.
    let orig = vm.cfg_read32(0x10)?;
    vm.cfg_write32(0x10, 0xffff_ffff)?;
    let mask = vm.cfg_read32(0x10)?;
    ensure!(
        mask == 0xfff0_0000,
        "BAR0 sizing read {mask:#x}, want 0xfff00000 (1 MiB memory BAR)"
    );
    ensure!(
        orig & 0xfff0_0000 != 0 && orig & 0xf == 0,
        "BAR0 not given a 32-bit memory address: {orig:#x}"
    );
    // Relocate it and enable memory decode: the MMIO bus follows.
    let new = MMIO32 + 0x0800_0000;
    vm.cfg_write32(0x10, new as u32)?;
    ensure!(
        vm.cfg_read32(0x10)? == new as u32,
        "BAR0 did not take the new address"
    );
    let cmd = vm.cfg_read32(0x04)? & 0xffff;
    vm.cfg_write32(0x04, cmd | 0x2)?;
    ensure!(
        vm.mmio
            .ranges()
            .iter()
            .any(|&(b, l)| b == new && l == 0x10_0000),
        "MMIO bus has no 1 MiB range at {new:#x}: {:x?}",
        vm.mmio.ranges()
    );
    // Command register: bits outside the allowed set read back 0.
    vm.cfg_write32(0x04, 0xffff)?;
    let got = vm.cfg_read32(0x04)? & 0xffff;
    ensure!(
        got & 0x2 != 0 && got & 0x4 != 0,
        "memory/bus-master enable lost: {got:#x}"
    );
    ensure!(
        got & (0x8 | 0x10 | 0x20 | 0x200) == 0,
        "special-cycle/MWI/VGA/fast-b2b bits leaked: {got:#x}"
    );
    // Memory decode off: the BAR leaves the bus.
    vm.cfg_write32(0x04, 0)?;
    ensure!(
        !vm.mmio.ranges().iter().any(|&(b, _)| b == new),
        "BAR0 still decoded with memory decode off"
    );
    Ok(Outcome::Pass)
}

fn pdev_bar0_ident_and_liveness() -> TestResult {
    let vm = vm()?;
    let bar0 = u64::from(vm.cfg_read32(0x10)? & 0xffff_fff0);
    let cmd = vm.cfg_read32(0x04)? & 0xffff;
    vm.cfg_write32(0x04, cmd | 0x2)?;
    let ident = vm.mmio_read32(bar0)?;
    ensure!(
        ident == EDU_IDENT,
        "BAR0 ident {ident:#x} via the MMIO bus, want {EDU_IDENT:#x}"
    );
    for v in [0x1234_5678u32, 0xa5a5_0f0f] {
        vm.mmio
            .write(bar0 + 4, &v.to_le_bytes())
            .map_err(|e| e.to_string())?;
        let back = vm.mmio_read32(bar0 + 4)?;
        ensure!(
            back == !v,
            "liveness: wrote {v:#x}, read {back:#x}, want {:#x}",
            !v
        );
    }
    Ok(Outcome::Pass)
}
