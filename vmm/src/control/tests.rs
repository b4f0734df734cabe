//! The device side's decisions on a real VM (host `/dev/kvm`), with devices that have no
//! backend (a fake VFIO region set) and the hotplug controller driven through its registers
//! as the guest's `_EJ0` would.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{ApiResult, Responder};
use devices::vfio::backend::CONFIG_REGION;
use devices::vfio::{IrqInfo, MmapArea, RegionInfo, VfioRegions};
use vmm_sys_util::eventfd::EventFd;

use super::devices::{VmDevices, VmDevicesSetup};
use super::eject_channel;
use crate::device_manager::{DeviceManager, DeviceManagerConfig};
use crate::hotplug::regs::B0EJ;
use crate::hotplug::PciHotplug;
use crate::irq::InterruptLine;
use crate::memory::RamConfig;
use crate::vm::{IrqchipMode, Vm, VmOptions};

/// A PCI function with config space only (vendor/device 1234:11e8).
struct ConfigOnly(Mutex<[u8; 256]>);

impl ConfigOnly {
    fn new() -> Arc<Self> {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&0x11e8_1234u32.to_le_bytes());
        c[0x0a] = 0xff;
        Arc::new(Self(Mutex::new(c)))
    }
}

impl VfioRegions for ConfigOnly {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (index == CONFIG_REGION).then_some(RegionInfo {
            size: 256,
            read: true,
            write: true,
            mmap: false,
            sparse_mmap: None,
            msix_mappable: false,
        })
    }
    fn region_read(&self, _index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let c = self.0.lock().unwrap();
        let o = offset as usize;
        data.copy_from_slice(&c[o..o + data.len()]);
        Ok(())
    }
    fn region_write(&self, _index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        self.0.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn irq_info(&self, _index: u32) -> Option<IrqInfo> {
        None
    }
    fn enable_irq(&self, _index: u32, _fds: &[&EventFd]) -> io::Result<()> {
        Ok(())
    }
    fn disable_irq(&self, _index: u32) -> io::Result<()> {
        Ok(())
    }
    fn set_intx_resample(&self, _fd: &EventFd) -> io::Result<()> {
        Ok(())
    }
    fn mmap_region(&self, _i: u32, _o: u64, len: u64, _w: bool) -> io::Result<MmapArea> {
        MmapArea::anonymous(len)
    }
}

/// Counts GED interrupts.
#[derive(Default)]
struct CountingLine(AtomicUsize);

impl InterruptLine for CountingLine {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

struct Rig {
    _vm: Vm,
    control: VmDevices,
    hotplug: Arc<PciHotplug>,
    line: Arc<CountingLine>,
    devices: Arc<Mutex<DeviceManager>>,
}

impl Rig {
    fn new(acpi: bool) -> Option<Self> {
        if !std::path::Path::new("/dev/kvm").exists() {
            ioasid::test_skip::record("", "no /dev/kvm");
            return None;
        }
        let vm = Vm::new(VmOptions {
            vcpus: 1,
            ram: RamConfig {
                size: 16 << 20,
                hugepages: false,
            },
            irqchip: IrqchipMode::Off,
        })
        .unwrap();
        let devices = Arc::new(Mutex::new(
            DeviceManager::new(&vm, DeviceManagerConfig::default()).unwrap(),
        ));
        let (on_eject, ejects) = eject_channel().unwrap();
        let line = Arc::new(CountingLine::default());
        let hotplug = PciHotplug::new(line.clone(), on_eject);
        let control = VmDevices::new(VmDevicesSetup {
            devices: devices.clone(),
            hotplug: Some(hotplug.clone()),
            ejects: Some(ejects),
            acpi_guest: acpi,
        });
        Some(Rig {
            _vm: vm,
            control,
            hotplug,
            line,
            devices,
        })
    }

    fn add(&self, id: &str, slot: u8) {
        self.devices
            .lock()
            .unwrap()
            .add_unbacked_device(Some(id), "fake", ConfigOnly::new(), Some(slot))
            .unwrap();
    }

    fn ids(&self) -> Vec<String> {
        self.devices.lock().unwrap().device_ids()
    }

    fn remove(&mut self, id: &str) -> Receiver<ApiResult<()>> {
        let (reply, rx) = Responder::pair();
        self.control.remove_device(id.to_string(), reply);
        rx
    }

    /// The guest's `_EJ0` for `slot`: a write of the slot's bit to `B0EJ`.
    fn guest_ejects(&mut self, slot: u8) {
        let dev = self.hotplug.bus_device();
        dev.lock()
            .unwrap()
            .write(0, B0EJ, &(1u32 << slot).to_le_bytes());
        self.control.on_ejects();
    }
}

#[test]
fn acpi_removal_waits_for_the_guest_eject() {
    let Some(mut r) = Rig::new(true) else { return };
    r.add("edu0", 3);
    let rx = r.remove("edu0");
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(r.control.pending_removals(), 1);
    assert_eq!(r.hotplug.pending().1, 1 << 3, "PCID bit of slot 3");
    assert_eq!(r.line.0.load(Ordering::SeqCst), 1, "one GED interrupt");
    assert_eq!(r.ids(), vec!["edu0"], "still there until the guest ejects");

    // A second removal while the first waits: 409.
    let second = r.remove("edu0").try_recv().unwrap().unwrap_err();
    assert_eq!(second.status(), 409, "{second}");
    assert!(second.message().contains("edu0"), "{second}");

    r.guest_ejects(3);
    assert_eq!(rx.try_recv().unwrap(), Ok(()));
    assert!(r.ids().is_empty());
    assert_eq!(r.control.pending_removals(), 0);

    // Unknown ids: 404 naming the id, nothing asked of the guest.
    let e = r.remove("edu0").try_recv().unwrap().unwrap_err();
    assert_eq!(e.status(), 404);
    assert!(e.message().contains("edu0"), "{e}");
    assert_eq!(r.line.0.load(Ordering::SeqCst), 1);
}

#[test]
fn acpi_removal_without_eject_times_out_and_removes() {
    let Some(mut r) = Rig::new(true) else { return };
    r.add("edu1", 4);
    r.control.set_eject_timeout(Duration::from_millis(50));
    let rx = r.remove("edu1");
    r.control.expire(Instant::now());
    assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty, "not yet");
    r.control.expire(Instant::now() + Duration::from_millis(60));
    assert_eq!(rx.try_recv().unwrap(), Ok(()));
    assert!(
        r.ids().is_empty(),
        "removed although the guest never ejected"
    );
    // The late eject finds an empty slot and changes nothing.
    r.add("other", 6);
    r.guest_ejects(4);
    assert_eq!(r.ids(), vec!["other"]);
}

#[test]
fn guest_initiated_eject_removes_the_device() {
    let Some(mut r) = Rig::new(true) else { return };
    r.add("edu2", 5);
    r.add("edu3", 7);
    r.guest_ejects(5);
    assert_eq!(r.ids(), vec!["edu3"]);
}

#[test]
fn vm_end_finishes_pending_removals() {
    let Some(mut r) = Rig::new(true) else { return };
    r.add("edu4", 8);
    let rx = r.remove("edu4");
    r.control.finish();
    assert_eq!(rx.try_recv().unwrap(), Ok(()));
    assert!(r.ids().is_empty());
}

#[test]
fn payload_removal_is_immediate() {
    let Some(mut r) = Rig::new(false) else { return };
    r.add("edu5", 3);
    assert_eq!(r.remove("edu5").try_recv().unwrap(), Ok(()));
    assert!(r.ids().is_empty());
    assert_eq!(
        r.line.0.load(Ordering::SeqCst),
        0,
        "no ACPI: no GED interrupt"
    );
    assert_eq!(r.hotplug.pending(), (0, 0));
}
