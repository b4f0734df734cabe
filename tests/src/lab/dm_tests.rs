//! The device manager against the real kernel (iommufd, vfio-pci edu, the mtty mdev), with
//! no vCPU running: the test plays the guest's driver through ECAM and BAR0 on the VM's
//! buses, and checks what the kernel holds through a second iommufd: a device the VMM
//! released can be bound by another iommufd, one it still holds cannot (a VFIO cdev is bound
//! once at a time).
//!
//! * `add_device_rollback_at_every_step`: a fault injected after each step of `add_device`
//!   (the steps a successful add passes, with a fresh backend and with another device
//!   attached, and the vIOMMU step) leaves nothing behind.
//! * `remove_one_of_two_releases_only_it`: with edu and mtty attached, removing either
//!   releases exactly it (its iommufd binding included) while the other stays attached and
//!   edu's DMA keeps working, and re-adding it works.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::DeviceConfig;
use devices::pci::PciBdf;
use devices::viommu::GuestMemoryAccess;
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::add::{arm_add_faults, disarm_add_faults, AddStep};
use vmm::device_manager::assign::resolve_path;
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::layout::PCI_ECAM_START;
use vmm::memory::RamConfig;
use vmm::viommu::VmGuestMemory;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use super::env::{edu_path, mmio_read, mmio_write, mtty_path, pattern};
use super::pdev_fixture::{
    s, CMD_MASTER, CMD_MEMORY, EDU_DMA_CMD, EDU_DMA_DST, EDU_DMA_LEN, EDU_DMA_SRC,
};
use crate::edu::{EDU_BUF, EDU_BUF_LEN, EDU_IDENT};
use crate::ensure;
use crate::guest_ram::lift_memlock_limit;
use crate::harness::{LabTest, Outcome, TestResult};

/// The tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "add_device_rollback_at_every_step",
            run: add_device_rollback_at_every_step,
        },
        LabTest {
            name: "remove_one_of_two_releases_only_it",
            run: remove_one_of_two_releases_only_it,
        },
    ]
}

const MIB: u64 = 1 << 20;
/// Guest RAM, inside edu's 28-bit DMA mask; mapped at IOVA = GPA.
const RAM: u64 = 128 * MIB;
/// Guest buffers of the DMA round trip: source and destination.
const SRC: u64 = 0x0300_0000;
const DST: u64 = 0x0200_0000;

/// A VM and its device manager on iommufd (with a VT-d unit if `viommu`), or `None` when
/// this L2 has no /dev/kvm (the reason printed).
fn vm_and_dm(test: &str, viommu: bool) -> Result<Option<(Vm, DeviceManager)>, String> {
    if !Path::new("/dev/kvm").exists() {
        println!("{test}: skipped: no /dev/kvm in L2");
        return Ok(None);
    }
    lift_memlock_limit().map_err(|e| format!("RLIMIT_MEMLOCK: {e}"))?;
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: RAM,
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .map_err(s)?;
    let dm = DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            backend: ioasid::BackendChoice::Iommufd,
            intx: IntxWiring::Off,
            viommu: viommu.then(|| ViommuSetup {
                vtd: ViommuConfig {
                    fsts: OnOffAuto::Off,
                    ..ViommuConfig::default()
                },
                address_width: 48,
            }),
            ..DeviceManagerConfig::default()
        },
    )
    .map_err(|e| e.message())?;
    Ok(Some((vm, dm)))
}

fn device(path: &Path, id: &str, iommu: bool) -> DeviceConfig {
    DeviceConfig {
        path: Some(path.to_path_buf()),
        id: Some(id.to_string()),
        iommu,
        ..Default::default()
    }
}

/// This process's VFIO and iommufd fds (the VM-scoped KVM-VFIO device left out).
fn vfio_fds() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.to_string_lossy().into_owned())
                .filter(|t| {
                    t.starts_with("/dev/vfio")
                        || t.starts_with("/dev/iommu")
                        || t.contains("iommufd")
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Everything a failed add could leave behind, as the device manager and the VM show it.
fn snapshot(vm: &Vm, dm: &DeviceManager) -> String {
    let bus: Vec<String> = dm
        .pci_bus()
        .lock()
        .map(|b| b.devices().iter().map(PciBdf::to_string).collect())
        .unwrap_or_default();
    let routes = vm.gsi_router().map(|r| r.msi_routes().len()).ok();
    serde_json::json!({
        "iommu": dm.iommu_info(),
        "ioasids": dm.ioasids(),
        "pasids": dm.pasids(),
        "ids": dm.device_ids(),
        "bus": bus,
        "mmio": vm.mmio_bus().ranges(),
        "slots": vm.memory_slots().in_use(),
        "msi_routes": routes,
        "backend": format!("{:?}", dm.backend_kind()),
        "fds": vfio_fds(),
    })
    .to_string()
}

/// Binds the device at `path` to a second iommufd and releases it again: this works only
/// when no other iommufd holds it (the kernel binds a VFIO cdev once at a time).
fn bindable_elsewhere(path: &Path) -> Result<(), String> {
    let spec = resolve_path(path).map_err(s)?;
    let other = ioasid::IommufdBackend::open().map_err(s)?;
    let (dev, vfio) = other.bind(&spec).map_err(|e| {
        format!(
            "{} cannot be bound to a second iommufd, so the VMM still holds it: {}",
            path.display(),
            crate::harness::chain(&e)
        )
    })?;
    drop(vfio);
    other.unbind(dev);
    Ok(())
}

/// The same, expected to fail: the VMM holds the device.
fn held_by_vmm(path: &Path) -> Result<(), String> {
    ensure!(
        bindable_elsewhere(path).is_err(),
        "{} could be bound to a second iommufd while the VMM has it attached",
        path.display()
    );
    Ok(())
}

/// edu as the guest's driver sees it, at `bdf` on the VM's buses.
struct Edu<'a> {
    vm: &'a Vm,
    mem: VmGuestMemory,
    bar0: u64,
}

impl<'a> Edu<'a> {
    /// Memory decode and bus mastering on through ECAM; edu's ident checked through BAR0.
    fn enable(vm: &'a Vm, dm: &DeviceManager, bdf: PciBdf) -> Result<Self, String> {
        let bar0 = dm
            .pci_bus()
            .lock()
            .map_err(|_| "PCI bus lock poisoned".to_string())?
            .bar_states(bdf)
            .and_then(|b| b.into_iter().find(|b| b.info.index == 0))
            .map(|b| b.assigned)
            .ok_or("no BAR0 for edu")?;
        let edu = Edu {
            vm,
            mem: VmGuestMemory::new(vm.ram().memory().clone()),
            bar0,
        };
        let cmd = PCI_ECAM_START + (u64::from(bdf.device()) << 15) + 4;
        let old = edu.read(cmd, 2)? as u16;
        edu.write(cmd, 2, u64::from(old | CMD_MEMORY | CMD_MASTER))?;
        let ident = edu.read(bar0, 4)? as u32;
        ensure!(ident == EDU_IDENT, "edu ident {ident:#x} at BAR0 {bar0:#x}");
        Ok(edu)
    }

    fn read(&self, addr: u64, len: usize) -> Result<u64, String> {
        mmio_read(self.vm, addr, len)
    }

    fn write(&self, addr: u64, len: usize, v: u64) -> Result<(), String> {
        mmio_write(self.vm, addr, len, v)
    }

    /// One edu DMA, waited for with a deadline.
    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<(), String> {
        self.write(self.bar0 + EDU_DMA_SRC, 8, src)?;
        self.write(self.bar0 + EDU_DMA_DST, 8, dst)?;
        self.write(self.bar0 + EDU_DMA_LEN, 8, EDU_BUF_LEN as u64)?;
        self.write(self.bar0 + EDU_DMA_CMD, 8, 1 | if to_ram { 2 } else { 0 })?;
        let start = Instant::now();
        while self.read(self.bar0 + EDU_DMA_CMD, 4)? & 1 != 0 {
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "edu DMA {src:#x} -> {dst:#x} still running after 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Guest RAM to edu and back (IOVA = GPA through the VM's IOAS): `seed`'s pattern must
    /// arrive in the destination buffer.
    fn round_trip(&self, seed: u8) -> Result<(), String> {
        let want = pattern(seed, EDU_BUF_LEN);
        self.mem.write(SRC, &want).map_err(s)?;
        self.mem.write(DST, &vec![0xee; EDU_BUF_LEN]).map_err(s)?;
        self.dma(SRC, EDU_BUF, false)?;
        self.dma(EDU_BUF, DST, true)?;
        let mut got = vec![0u8; EDU_BUF_LEN];
        self.mem.read(DST, &mut got).map_err(s)?;
        if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
            return Err(format!(
                "edu DMA round trip (seed {seed:#x}): byte {i} at GPA {:#x} is {:#04x}, want {:#04x}",
                DST + i as u64,
                got[i],
                want[i]
            ));
        }
        Ok(())
    }
}

/// Adds `cfg`, recording the fault points it passes.
fn add_traced(dm: &mut DeviceManager, cfg: &DeviceConfig) -> Result<Vec<AddStep>, String> {
    arm_add_faults(None);
    let added = dm.add_device(cfg, None);
    let passed = disarm_add_faults();
    added.map_err(|e| e.message())?;
    Ok(passed)
}

/// For each step of `steps`: a fault after it makes adding `cfg` fail there and leaves the
/// VM, the device manager and the kernel as they were (`path` bindable elsewhere again).
fn fault_each(
    vm: &Vm,
    dm: &mut DeviceManager,
    cfg: &DeviceConfig,
    path: &Path,
    steps: &[AddStep],
    pass: &str,
) -> Result<(), String> {
    for &step in steps {
        let before = snapshot(vm, dm);
        arm_add_faults(Some(step));
        let result = dm.add_device(cfg, None);
        let passed = disarm_add_faults();
        let e = match result {
            Ok(a) => {
                return Err(format!(
                    "{pass}: the fault after {step:?} did not fire ({a:?})"
                ))
            }
            Err(e) => e.message(),
        };
        println!("  {pass}: fault after {step:?}: {e}");
        ensure!(
            e.contains("fault injected") && e.contains(step.name()),
            "{pass}: the add failed elsewhere than after {step:?}: {e}"
        );
        ensure!(
            passed.last() == Some(&step),
            "{pass}: fault points passed {passed:?}, want them to end at {step:?}"
        );
        let after = snapshot(vm, dm);
        ensure!(
            after == before,
            "{pass}: the fault after {step:?} left state behind:\n  before {before}\n  after  {after}"
        );
        bindable_elsewhere(path).map_err(|e| format!("{pass}, fault after {step:?}: {e}"))?;
    }
    Ok(())
}

fn add_device_rollback_at_every_step() -> TestResult {
    let name = "add_device_rollback_at_every_step";
    let Some((vm, mut dm)) = vm_and_dm(name, false)? else {
        return Ok(Outcome::Skip("no /dev/kvm in L2".into()));
    };
    let edu = edu_path()?;
    let mtty = mtty_path()?;
    let edu_cfg = device(&edu, "edu0", false);
    let mut covered: Vec<AddStep> = Vec::new();

    // Pass 1, the first device: a fresh backend, IOAS and RAM mapping. One good add first
    // (the KVM-VFIO device it creates stays with the VM), whose fault points are the steps.
    let fresh = add_traced(&mut dm, &edu_cfg)?;
    dm.remove_device("edu0").map_err(|e| e.message())?;
    println!("  fresh backend: {fresh:?}");
    fault_each(&vm, &mut dm, &edu_cfg, &edu, &fresh, "first device")?;
    ensure!(dm.backend_kind().is_none(), "a backend outlived the faults");
    covered.extend(&fresh);

    // Pass 2, with mtty attached: the backend, IOAS and RAM mapping are shared and must stay.
    dm.add_device(&device(&mtty, "mtty0", false), None)
        .map_err(|e| e.message())?;
    let shared = add_traced(&mut dm, &edu_cfg)?;
    dm.remove_device("edu0").map_err(|e| e.message())?;
    println!("  shared backend: {shared:?}");
    fault_each(&vm, &mut dm, &edu_cfg, &edu, &shared, "second device")?;
    held_by_vmm(&mtty)?;
    // After every fault, edu still adds and does DMA through the shared IOAS.
    let added = dm.add_device(&edu_cfg, None).map_err(|e| e.message())?;
    Edu::enable(&vm, &dm, added.bdf)?.round_trip(0x5a)?;
    dm.remove_all();
    ensure!(
        dm.backend_kind().is_none(),
        "the backend outlived its devices"
    );
    drop(dm);
    drop(vm);

    // Pass 3, behind the vIOMMU: the step that puts the device behind it.
    let Some((vm, mut dm)) = vm_and_dm(name, true)? else {
        return Ok(Outcome::Skip("no /dev/kvm in L2".into()));
    };
    let viommu_cfg = device(&edu, "edu0", true);
    let behind = add_traced(&mut dm, &viommu_cfg)?;
    dm.remove_device("edu0").map_err(|e| e.message())?;
    println!("  behind the vIOMMU: {behind:?}");
    let last: Vec<AddStep> = behind.last().copied().into_iter().collect();
    ensure!(
        last == [AddStep::AttachViommu],
        "behind the vIOMMU the last fault point is {last:?}"
    );
    fault_each(&vm, &mut dm, &viommu_cfg, &edu, &last, "behind the vIOMMU")?;
    covered.extend(&behind);
    ensure!(dm.backend_kind().is_none(), "a backend outlived the faults");

    // Every step was injected at: a step without a fault point is never passed.
    let missing: Vec<AddStep> = AddStep::ALL
        .into_iter()
        .filter(|s| !covered.contains(s))
        .collect();
    ensure!(
        missing.is_empty(),
        "no add passed the fault points of {missing:?}"
    );
    Ok(Outcome::Pass)
}

/// Removes `id` (at `path`) while `other` (at `other_path`) stays; checks exactly `id` was
/// released and re-adds it.
fn remove_one(
    vm: &Vm,
    dm: &mut DeviceManager,
    id: &str,
    cfg: &DeviceConfig,
    other: &str,
    other_path: &Path,
    edu_bdf: &mut PciBdf,
) -> Result<(), String> {
    let path: PathBuf = cfg.path.clone().ok_or("no path")?;
    let before = dm.ioasids();
    let removed = dm.remove_device(id).map_err(|e| e.message())?;
    ensure!(
        removed.warnings.is_empty(),
        "removing {id} warned: {:?}",
        removed.warnings
    );
    // The kernel released it: a second iommufd can bind it. The other one it still holds.
    bindable_elsewhere(&path)?;
    held_by_vmm(other_path)?;
    let after = dm.ioasids();
    ensure!(
        after.ioases.len() == 1
            && after.ioases.first().map(|i| (i.id, i.mappings))
                == before.ioases.first().map(|i| (i.id, i.mappings)),
        "the VM's IOAS changed when {id} left: before {:?}, after {:?}",
        before.ioases,
        after.ioases
    );
    let attached: Vec<&str> = after
        .attachments
        .iter()
        .map(|a| a.device.as_str())
        .collect();
    ensure!(
        attached == [other],
        "after removing {id} the attachments are {attached:?}, want [{other}]"
    );
    // edu works, through the IOAS that stayed.
    if other == "edu0" {
        Edu::enable(vm, dm, *edu_bdf)?.round_trip(0x21)?;
    }
    // And it comes back.
    let added = dm.add_device(cfg, None).map_err(|e| e.message())?;
    held_by_vmm(&path)?;
    let n = dm.ioasids().attachments.len();
    ensure!(n == 2, "after re-adding {id}: {n} attachments");
    if id == "edu0" {
        *edu_bdf = added.bdf;
    }
    Edu::enable(vm, dm, *edu_bdf)?.round_trip(0x42)?;
    Ok(())
}

fn remove_one_of_two_releases_only_it() -> TestResult {
    let name = "remove_one_of_two_releases_only_it";
    let Some((vm, mut dm)) = vm_and_dm(name, false)? else {
        return Ok(Outcome::Skip("no /dev/kvm in L2".into()));
    };
    let edu = edu_path()?;
    let mtty = mtty_path()?;
    let edu_cfg = device(&edu, "edu0", false);
    let mtty_cfg = device(&mtty, "mtty0", false);
    let mut edu_bdf = dm.add_device(&edu_cfg, None).map_err(|e| e.message())?.bdf;
    dm.add_device(&mtty_cfg, None).map_err(|e| e.message())?;
    held_by_vmm(&edu)?;
    held_by_vmm(&mtty)?;
    Edu::enable(&vm, &dm, edu_bdf)?.round_trip(0x11)?;

    remove_one(&vm, &mut dm, "mtty0", &mtty_cfg, "edu0", &edu, &mut edu_bdf)?;
    remove_one(&vm, &mut dm, "edu0", &edu_cfg, "mtty0", &mtty, &mut edu_bdf)?;

    dm.remove_all();
    ensure!(
        dm.backend_kind().is_none(),
        "the backend outlived its devices"
    );
    bindable_elsewhere(&edu)?;
    bindable_elsewhere(&mtty)?;
    Ok(Outcome::Pass)
}
