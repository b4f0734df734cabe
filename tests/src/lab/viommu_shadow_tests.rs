//! The vIOMMU's shadow path against a real device: edu (behind QEMU's VT-d in L1) assigned
//! with `iommu=on` to a VM the VMM's device manager builds (`--platform viommu=vtd`), with no
//! vCPU running. The test plays the guest: it programs the emulated VT-d as Linux's
//! intel-iommu does (the model's `LinuxHarness`: QI, root, scalable-mode context and PASID
//! entries, second-stage tables in guest RAM, invalidations), and issues edu's DMA commands
//! through BAR0 on the VM's MMIO bus. The bridge shadows the guest's second-stage table into
//! a host IOAS; edu's DMA at IOVA X must land in the guest buffer B the guest mapped X to,
//! and nowhere once the guest unmapped and invalidated.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::process::{Command, Stdio};

use api::client::ApiClient;
use api::routes::HttpMethod;
use api::DeviceConfig;
use devices::pci::PciBdf;
use devices::viommu::linux_harness::{LinuxHarness, Stage};
use devices::viommu::{BridgeMode, GuestMemoryAccess, Vtd};
use ioasid::Pasid;
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::layout::{PCI_ECAM_START, VTD_REGS_START};
use vmm::memory::RamConfig;
use vmm::viommu::{VmGuestMemory, VtdBridge};
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use super::api_tests::IDLE_PAYLOAD;
use super::env::{edu_path, pattern};
use super::l3_tests::{tail, VMM_BIN};
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
            name: "viommu_shadow_edu_dma",
            run: viommu_shadow_edu_dma,
        },
        LabTest {
            name: "viommu_shadow_unmap_plus_invalidate_blocks_dma",
            run: viommu_shadow_unmap_plus_invalidate_blocks_dma,
        },
        LabTest {
            name: "viommu_missing_invalidation_is_guest_bug_not_host_hole",
            run: viommu_missing_invalidation_is_guest_bug_not_host_hole,
        },
        LabTest {
            name: "viommu_shadow_fsts_on_refused_without_host_nesting",
            run: viommu_shadow_fsts_on_refused_without_host_nesting,
        },
        LabTest {
            name: "viommu_type1_refused",
            run: viommu_type1_refused,
        },
        LabTest {
            name: "viommu_shadow_rest_unplug_releases_everything",
            run: viommu_shadow_rest_unplug_releases_everything,
        },
    ]
}

const MIB: u64 = 1 << 20;
/// Guest RAM: everything inside edu's 28-bit DMA mask.
const RAM: u64 = 128 * MIB;
/// The harness's tables and queue.
const ARENA: std::ops::Range<u64> = 96 * MIB..112 * MIB;
/// IOVAs the guest maps (below 256 MiB for edu's mask). X and Y are also GPAs in RAM, so a
/// DMA that bypassed translation would land there: the tests poison and check them.
const X: u64 = 0x0400_0000;
const Y: u64 = 0x0500_0000;
/// Guest buffers: B (destination), B2 (the remap target), S (source).
const B: u64 = 0x0200_0000;
const B2: u64 = 0x0280_0000;
const S: u64 = 0x0300_0000;
const PAGE: u64 = 0x1000;
const LEN: usize = EDU_BUF_LEN;

/// The VM with edu behind the vIOMMU, as the guest found it after boot.
struct Lab {
    // Dropped first: removes edu (bridge teardown, detach, unbind) while the VM exists.
    dm: DeviceManager,
    vm: Vm,
    vtd: Arc<Mutex<Vtd>>,
    mem: Arc<VmGuestMemory>,
    harness: LinuxHarness,
    bdf: PciBdf,
    id: String,
    bar0: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lab {
    /// Builds the VM, assigns edu with `iommu=on`, boots the vIOMMU as Linux does and
    /// attaches edu with a second-stage domain. `Ok(None)`: skipped (reason printed).
    fn new(test: &str) -> Result<Option<Self>, String> {
        if !std::path::Path::new("/dev/kvm").exists() {
            println!("{test}: skipped: no /dev/kvm in L2");
            return Ok(None);
        }
        let edu = edu_path()?;
        if let Some(old) = lift_memlock_limit().map_err(|e| format!("RLIMIT_MEMLOCK: {e}"))? {
            println!("  RLIMIT_MEMLOCK lifted from {old} bytes for iommufd's pinned guest RAM");
        }
        let vm = Vm::new(VmOptions {
            vcpus: 1,
            ram: RamConfig {
                size: RAM,
                hugepages: false,
            },
            irqchip: IrqchipMode::Off,
        })
        .map_err(s)?;
        let mut dm = DeviceManager::new(
            &vm,
            DeviceManagerConfig {
                backend: ioasid::BackendChoice::Iommufd,
                intx: IntxWiring::Off,
                viommu: Some(ViommuSetup {
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
        let cfg = DeviceConfig {
            path: Some(edu.clone()),
            iommu: true,
            id: Some("edu0".into()),
            ..Default::default()
        };
        let added = dm.add_device(&cfg, None).map_err(|e| e.message())?;
        let tables = dm.acpi_tables().map_err(|e| e.message())?;
        ensure!(
            tables.len() == 1 && tables[0].starts_with(b"DMAR"),
            "no DMAR with viommu=vtd"
        );
        let slot = added.bdf.device();
        ensure!(
            tables[0]
                .get(64..)
                .unwrap_or_default()
                .chunks(8)
                .any(|c| c.len() == 8 && c[0] == 1 && c[6] == slot),
            "the DMAR does not list edu's slot {slot}"
        );
        let vtd = dm.vtd().ok_or("no VT-d unit")?;
        let mem = Arc::new(VmGuestMemory::new(vm.ram().memory().clone()));
        let mut harness = LinuxHarness::new(mem.clone(), ARENA);
        harness.mmio_base = VTD_REGS_START;
        let bar0 = {
            let pci = lock(dm.pci_bus());
            pci.bar_states(added.bdf)
                .and_then(|b| b.into_iter().find(|b| b.info.index == 0))
                .map(|b| b.assigned)
                .ok_or("no BAR0 for edu")?
        };
        let mut lab = Lab {
            dm,
            vm,
            vtd,
            mem,
            harness,
            bdf: added.bdf,
            id: added.id,
            bar0,
        };
        lab.enable_edu()?;
        {
            let mut vtd = lock(&lab.vtd);
            lab.harness.boot(&mut *vtd).map_err(s)?;
            lab.harness
                .attach(&mut *vtd, lab.bdf, Stage::Second)
                .map_err(s)?;
        }
        let mode = lab.mode()?;
        ensure!(
            mode == Some(BridgeMode::Shadow),
            "after a second-stage attach, edu's PASID 0 is {mode:?} on the bridge, want Shadow"
        );
        Ok(Some(lab))
    }

    fn bridge(&self) -> Result<Arc<VtdBridge>, String> {
        self.dm
            .viommu_bridge()
            .ok_or_else(|| "no vIOMMU host bridge".to_string())
    }

    fn mode(&self) -> Result<Option<BridgeMode>, String> {
        Ok(self
            .bridge()?
            .devices()
            .into_iter()
            .find(|d| d.bdf == self.bdf && d.pasid == Pasid(0))
            .map(|d| d.mode))
    }

    fn did(&self) -> Result<u16, String> {
        self.harness
            .attached(self.bdf)
            .map(|a| a.did)
            .ok_or_else(|| "edu is not attached in the harness".to_string())
    }

    fn map(&mut self, iova: u64, gpa: u64) -> Result<(), String> {
        let mut vtd = lock(&self.vtd);
        self.harness
            .map(&mut *vtd, self.bdf, iova, gpa, PAGE)
            .map_err(s)
    }

    fn unmap(&mut self, iova: u64) -> Result<(), String> {
        let mut vtd = lock(&self.vtd);
        self.harness
            .unmap(&mut *vtd, self.bdf, iova, PAGE)
            .map_err(s)
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        self.mem.write(gpa, data).map_err(s)
    }

    fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len];
        self.mem.read(gpa, &mut v).map_err(s)?;
        Ok(v)
    }

    fn mmio_read(&self, addr: u64, len: usize) -> Result<u64, String> {
        super::env::mmio_read(&self.vm, addr, len)
    }

    fn mmio_write(&self, addr: u64, len: usize, v: u64) -> Result<(), String> {
        super::env::mmio_write(&self.vm, addr, len, v)
    }

    /// Memory decode and bus mastering on through ECAM, as the guest's driver does; edu's
    /// ident through BAR0.
    fn enable_edu(&self) -> Result<(), String> {
        let cmd_addr = PCI_ECAM_START + (u64::from(self.bdf.device()) << 15) + 4;
        let cmd = self.mmio_read(cmd_addr, 2)? as u16;
        self.mmio_write(cmd_addr, 2, u64::from(cmd | CMD_MEMORY | CMD_MASTER))?;
        let ident = self.mmio_read(self.bar0, 4)? as u32;
        ensure!(
            ident == EDU_IDENT,
            "edu ident {ident:#x} at BAR0 {:#x}",
            self.bar0
        );
        Ok(())
    }

    /// One edu DMA (`to_ram`: edu's buffer to `dst`), waited for with a deadline. A DMA the
    /// host IOMMU blocks still completes (edu ignores the fault).
    fn dma(&self, src: u64, dst: u64, to_ram: bool) -> Result<(), String> {
        self.mmio_write(self.bar0 + EDU_DMA_SRC, 8, src)?;
        self.mmio_write(self.bar0 + EDU_DMA_DST, 8, dst)?;
        self.mmio_write(self.bar0 + EDU_DMA_LEN, 8, LEN as u64)?;
        self.mmio_write(self.bar0 + EDU_DMA_CMD, 8, 1 | if to_ram { 2 } else { 0 })?;
        let start = Instant::now();
        while self.mmio_read(self.bar0 + EDU_DMA_CMD, 4)? & 1 != 0 {
            ensure!(
                start.elapsed() < Duration::from_secs(10),
                "edu DMA {src:#x} -> {dst:#x} still running after 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// Loads edu's buffer with `data` from guest buffer S through IOVA Y (mapped here).
    fn load_edu(&mut self, data: &[u8]) -> Result<(), String> {
        self.write(S, data)?;
        self.dma(Y, EDU_BUF, false)
    }

    fn counters(&self) -> String {
        let c = self.dm.counters();
        format!(
            "guest descriptors {}, host invalidation calls {}, shadow maps {}, unmaps {}, faults {}",
            c.iommu.guest_invalidation_descriptors,
            c.iommu.host_invalidation_calls,
            c.iommu.shadow_map_calls,
            c.iommu.shadow_unmap_calls,
            c.iommu.faults_recorded
        )
    }

    /// Removes edu and checks the bridge kept nothing of it.
    fn finish(mut self) -> TestResult {
        let removed = self.dm.remove_device(&self.id).map_err(|e| e.message())?;
        ensure!(
            removed.warnings.is_empty(),
            "removing edu left warnings: {:?}",
            removed.warnings
        );
        ensure!(
            self.dm.viommu_bridge().is_none(),
            "the host bridge outlived the last device"
        );
        Ok(Outcome::Pass)
    }
}

/// Writes the second-stage leaf of `iova` in the guest's table directly (no invalidation):
/// a 4-level walk from the attached domain's root, creating nothing.
fn set_leaf(lab: &Lab, iova: u64, value: u64) -> Result<(), String> {
    let a = lab
        .harness
        .attached(lab.bdf)
        .ok_or("edu is not attached in the harness")?;
    let mut table = a.pgtable;
    for level in (1..=4u32).rev() {
        let idx = (iova >> (12 + 9 * (level - 1))) & 0x1ff;
        let entry_addr = table + idx * 8;
        if level == 1 {
            return lab.write(entry_addr, &value.to_le_bytes());
        }
        let mut e = [0u8; 8];
        lab.mem.read(entry_addr, &mut e).map_err(s)?;
        let e = u64::from_le_bytes(e);
        ensure!(e & 3 != 0, "no table at level {level} for IOVA {iova:#x}");
        table = e & 0x000f_ffff_ffff_f000;
    }
    Err("walk did not reach a leaf".into())
}

fn first_diff(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b)
}

fn viommu_shadow_edu_dma() -> TestResult {
    let name = "viommu_shadow_edu_dma";
    let Some(mut lab) = Lab::new(name)? else {
        return Ok(Outcome::Skip("no /dev/kvm in L2".into()));
    };
    let want = pattern(0x3c, LEN);
    lab.write(B, &vec![0xee; LEN])?;
    lab.write(X, &vec![0xdd; LEN])?;
    lab.map(Y, S)?;
    lab.map(X, B)?;
    let areas = lab.bridge()?.shadow_areas(lab.did()?);
    println!("  shadow areas (iova, len, gpa): {areas:x?}");
    ensure!(
        areas
            .iter()
            .any(|&(i, l, g)| i <= X && X < i + l && g + (X - i) == B),
        "the bridge's shadow does not map IOVA {X:#x} to GPA {B:#x}: {areas:x?}"
    );
    lab.load_edu(&want)?;
    lab.dma(EDU_BUF, X, true)?;
    let got = lab.read(B, LEN)?;
    if let Some(i) = first_diff(&got, &want) {
        return Err(format!(
            "byte {i} of guest buffer B ({B:#x}) is {:#04x}, want {:#04x} (edu DMA at IOVA {X:#x}); {}",
            got[i],
            want[i],
            lab.counters()
        ));
    }
    let at_x = lab.read(X, LEN)?;
    ensure!(
        at_x.iter().all(|&b| b == 0xdd),
        "the DMA also wrote GPA {X:#x}: translation was bypassed"
    );
    let c = lab.dm.counters();
    println!("  LAB-INFO {}", lab.counters());
    ensure!(
        c.iommu.shadow_map_calls >= 2 && c.iommu.guest_invalidation_descriptors > 0,
        "counters do not show the shadow maps and guest invalidations: {}",
        lab.counters()
    );
    lab.finish()
}

fn viommu_shadow_unmap_plus_invalidate_blocks_dma() -> TestResult {
    let name = "viommu_shadow_unmap_plus_invalidate_blocks_dma";
    let Some(mut lab) = Lab::new(name)? else {
        return Ok(Outcome::Skip("no /dev/kvm in L2".into()));
    };
    let first = pattern(0x11, LEN);
    let second = pattern(0x99, LEN);
    lab.write(X, &vec![0xdd; LEN])?;
    lab.map(Y, S)?;
    lab.map(X, B)?;
    lab.load_edu(&first)?;
    lab.dma(EDU_BUF, X, true)?;
    ensure!(
        lab.read(B, LEN)? == first,
        "the mapped DMA did not land in B ({})",
        lab.counters()
    );
    let unmaps_before = lab.dm.counters().iommu.shadow_unmap_calls;
    lab.unmap(X)?;
    let areas = lab.bridge()?.shadow_areas(lab.did()?);
    ensure!(
        !areas.iter().any(|&(i, l, _)| i <= X && X < i + l),
        "after unmap + invalidation the shadow still maps IOVA {X:#x}: {areas:x?}"
    );
    ensure!(
        lab.dm.counters().iommu.shadow_unmap_calls > unmaps_before,
        "no shadow unmap call after the guest's unmap + invalidation ({})",
        lab.counters()
    );
    lab.load_edu(&second)?;
    lab.dma(EDU_BUF, X, true)?;
    let got = lab.read(B, LEN)?;
    ensure!(
        got == first,
        "a DMA to the unmapped IOVA {X:#x} reached B (byte 0 is {:#04x}; {})",
        got[0],
        lab.counters()
    );
    ensure!(
        lab.read(X, LEN)?.iter().all(|&b| b == 0xdd),
        "a DMA to the unmapped IOVA {X:#x} reached GPA {X:#x}"
    );
    println!("  LAB-INFO {}", lab.counters());
    lab.finish()
}

fn viommu_missing_invalidation_is_guest_bug_not_host_hole() -> TestResult {
    let name = "viommu_missing_invalidation_is_guest_bug_not_host_hole";
    let Some(mut lab) = Lab::new(name)? else {
        return Ok(Outcome::Skip("no /dev/kvm in L2".into()));
    };
    let ram_end = lab.vm.ram().end();
    let data = pattern(0x5a, LEN);
    lab.write(B, &vec![0xee; LEN])?;
    lab.write(B2, &vec![0xee; LEN])?;
    lab.map(Y, S)?;
    lab.map(X, B)?;
    // The guest points X at B2 without invalidating: a guest bug. The shadow may keep the
    // stale X -> B; the DMA lands in B or B2, both guest RAM.
    set_leaf(&lab, X, B2 | 3)?;
    lab.load_edu(&data)?;
    lab.dma(EDU_BUF, X, true)?;
    let (in_b, in_b2) = (lab.read(B, LEN)? == data, lab.read(B2, LEN)? == data);
    println!("  stale mapping: DMA landed in B {in_b}, in B2 {in_b2}");
    ensure!(
        in_b || in_b2,
        "the DMA at IOVA {X:#x} landed in neither B nor B2 ({})",
        lab.counters()
    );
    // The guest then points X outside its RAM and this time invalidates: the bridge must
    // refuse to map it (the shadow maps only guest RAM, from the guest-RAM IOAS).
    let outside = (ram_end + 0x1000_0000) & !(PAGE - 1);
    set_leaf(&lab, X, outside | 3)?;
    {
        let mut vtd = lock(&lab.vtd);
        let did = lab.did()?;
        lab.harness
            .submit(
                &mut *vtd,
                &[devices::viommu::linux_harness::desc::iotlb_domain(did)],
            )
            .map_err(s)?;
    }
    let areas = lab.bridge()?.shadow_areas(lab.did()?);
    println!("  shadow areas after the bad map (iova, len, gpa): {areas:x?}");
    if let Some(&(i, l, g)) = areas
        .iter()
        .find(|&&(_, l, g)| g.checked_add(l).is_none_or(|e| e > ram_end))
    {
        return Err(format!(
            "the shadow maps IOVA {i:#x}+{l:#x} to GPA {g:#x}, beyond guest RAM (ends {ram_end:#x})"
        ));
    }
    ensure!(
        !areas.iter().any(|&(i, l, _)| i <= X && X < i + l),
        "IOVA {X:#x} still maps after the guest pointed it outside RAM and invalidated: {areas:x?}"
    );
    // A DMA there now lands nowhere in guest RAM.
    lab.write(B, &vec![0xee; LEN])?;
    lab.write(B2, &vec![0xee; LEN])?;
    lab.dma(EDU_BUF, X, true)?;
    ensure!(
        lab.read(B, LEN)?.iter().all(|&b| b == 0xee)
            && lab.read(B2, LEN)?.iter().all(|&b| b == 0xee),
        "a DMA at IOVA {X:#x} (pointed outside RAM) landed in guest RAM"
    );
    println!("  LAB-INFO {}", lab.counters());
    lab.finish()
}

// ---- the VMM binary: start-time refusal and REST hot-unplug ------------------------------

/// How long the VMM's start or one request may take (a hang breaker, not a timing check).
const GUARD: Duration = Duration::from_secs(60);

/// Writes the idle payload (`hlt; jmp $-1`) for a payload VM and returns its path.
fn idle_payload(name: &str) -> Result<std::path::PathBuf, String> {
    let p = std::path::PathBuf::from(format!("/tmp/viommu-{name}.bin"));
    std::fs::write(&p, IDLE_PAYLOAD).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(p)
}

/// Whether the host IOMMU can nest edu, as `ioasid-vmm iommu-info` reports it.
fn edu_host_nesting(edu: &std::path::Path) -> Result<bool, String> {
    let out = Command::new(VMM_BIN)
        .args(["iommu-info", "--device"])
        .arg(edu)
        .output()
        .map_err(|e| format!("{VMM_BIN} iommu-info: {e}"))?;
    ensure!(
        out.status.success(),
        "iommu-info failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iommu-info output is not JSON: {e}"))?;
    v["nesting"]
        .as_bool()
        .ok_or_else(|| format!("iommu-info has no nesting field: {v}"))
}

fn viommu_shadow_fsts_on_refused_without_host_nesting() -> TestResult {
    let edu = edu_path()?;
    ensure!(
        std::path::Path::new(VMM_BIN).exists(),
        "{VMM_BIN} is missing from L2"
    );
    if edu_host_nesting(&edu)? {
        return Ok(Outcome::Skip(
            "the host IOMMU nests edu: fsts=on is honoured there".into(),
        ));
    }
    let err = refused_start("fsts", "viommu=vtd,fsts=on", &edu)?;
    ensure!(
        err.contains("first-stage") && err.contains("nesting"),
        "the refusal does not give the reason (first stage needs host nesting): {err}"
    );
    Ok(Outcome::Pass)
}

/// `ioasid-vmm` with edu behind the vIOMMU on the legacy VFIO container refuses to start:
/// the shadow needs a host IOAS per guest domain and `IOAS_COPY`, which type1 lacks.
fn viommu_type1_refused() -> TestResult {
    let edu = edu_path()?;
    ensure!(
        std::path::Path::new(VMM_BIN).exists(),
        "{VMM_BIN} is missing from L2"
    );
    let err = refused_start("type1", "iommufd=off,viommu=vtd", &edu)?;
    ensure!(
        err.contains("iommufd") && err.contains("type1"),
        "the refusal does not name the backend (the vIOMMU needs iommufd): {err}"
    );
    Ok(Outcome::Pass)
}

/// Starts `ioasid-vmm` on an idle payload with `--platform platform` and edu with
/// `iommu=on`, expects it to exit non-zero within [`GUARD`], and returns its stderr.
fn refused_start(name: &str, platform: &str, edu: &std::path::Path) -> Result<String, String> {
    let payload = idle_payload(name)?;
    let mut child = Command::new(VMM_BIN)
        .arg("--payload")
        .arg(format!("{},mode=real,irqchip=on", payload.display()))
        .args(["--memory", "size=64M", "--serial", "off"])
        .args(["--platform", platform])
        .arg("--device")
        .arg(format!("path={},iommu=on", edu.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {VMM_BIN}: {e}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if start.elapsed() > GUARD {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "ioasid-vmm --platform {platform} with edu iommu=on still runs after \
                 {GUARD:?}: it should refuse to start"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    println!("  ioasid-vmm exited {status}: {}", tail(&err, 4));
    ensure!(
        !status.success(),
        "ioasid-vmm started with --platform {platform}: {err}"
    );
    Ok(err)
}

/// `ioasid-vmm` running the idle payload with `--platform viommu=vtd` and an API socket.
struct ViommuVmm {
    child: std::process::Child,
    client: ApiClient,
    log: std::path::PathBuf,
}

impl Drop for ViommuVmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl ViommuVmm {
    fn start(name: &str) -> Result<Self, String> {
        ensure!(
            std::path::Path::new(VMM_BIN).exists(),
            "{VMM_BIN} is missing from L2"
        );
        let payload = idle_payload(name)?;
        let sock = std::path::PathBuf::from(format!("/tmp/viommu-{name}.sock"));
        let log = std::path::PathBuf::from(format!("/tmp/viommu-{name}.log"));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new(VMM_BIN)
            .arg("--payload")
            .arg(format!("{},mode=real,irqchip=on", payload.display()))
            .args(["--memory", "size=64M", "--serial", "off"])
            .args(["--platform", "viommu=vtd,fsts=off"])
            .arg("--api-socket")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("cannot start {VMM_BIN}: {e}"))?;
        let mut vmm = ViommuVmm {
            child,
            client: ApiClient::new(&sock).with_timeout(GUARD),
            log,
        };
        let start = Instant::now();
        loop {
            if vmm.call(HttpMethod::Get, "vmm.ping", None).is_ok() {
                return Ok(vmm);
            }
            if let Ok(Some(st)) = vmm.child.try_wait() {
                return Err(format!("ioasid-vmm exited ({st}); log: {}", vmm.log_tail()));
            }
            ensure!(
                start.elapsed() < GUARD,
                "ioasid-vmm did not answer within {GUARD:?}; log: {}",
                vmm.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_tail(&self) -> String {
        tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 8)
    }

    fn call(
        &mut self,
        method: HttpMethod,
        endpoint: &str,
        body: Option<&str>,
    ) -> Result<(u16, serde_json::Value), String> {
        let r = self
            .client
            .request(method, endpoint, body.map(str::as_bytes), &[])
            .map_err(|e| format!("{method:?} {endpoint}: {}", crate::harness::chain(&e)))?;
        let v = r.json().unwrap_or(serde_json::Value::Null);
        Ok((r.status, v))
    }

    fn get(&mut self, endpoint: &str) -> Result<serde_json::Value, String> {
        let (st, v) = self.call(HttpMethod::Get, endpoint, None)?;
        ensure!(st == 200, "GET {endpoint}: {st} {v}");
        Ok(v)
    }
}

fn viommu_shadow_rest_unplug_releases_everything() -> TestResult {
    let edu = edu_path()?;
    let mut vmm = ViommuVmm::start("unplug")?;
    let body = format!(r#"{{"path":"{}","iommu":true,"id":"edu0"}}"#, edu.display());
    let (st, added) = vmm.call(HttpMethod::Put, "vm.add-device", Some(&body))?;
    ensure!(
        st == 200,
        "vm.add-device with iommu=on: {st} {added}; log: {}",
        vmm.log_tail()
    );
    let bdf = added["bdf"].as_str().unwrap_or_default().to_string();
    let slot = bdf
        .rsplit(':')
        .next()
        .and_then(|d| d.split('.').next())
        .and_then(|d| u8::from_str_radix(d, 16).ok())
        .ok_or_else(|| format!("bad BDF in {added}"))?;
    ensure!(
        (24..=31).contains(&slot),
        "edu with iommu=on landed at {bdf}, outside the DMAR scope slots 24-31"
    );
    // An iommu=off device may not take a scope slot.
    let (st, v) = vmm.call(
        HttpMethod::Put,
        "vm.add-device",
        Some(&format!(
            r#"{{"path":"{}","pci_device_id":25}}"#,
            edu.display()
        )),
    )?;
    ensure!(
        st == 400
            && v.to_string()
                .contains("reserved for devices behind the vIOMMU"),
        "an iommu=off add at scope slot 25: {st} {v}, want 400 naming the reservation"
    );
    let iommu = vmm.get("vm.iommu")?;
    let viommu = &iommu["viommu"];
    println!("  vm.iommu viommu: {viommu}");
    let ecap: Vec<&str> = viommu["ecap_names"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    ensure!(
        ecap.contains(&"QI") && ecap.contains(&"SMTS") && !ecap.contains(&"FSTS"),
        "vm.iommu ECAP names {ecap:?}: want QI and SMTS, no FSTS with fsts=off"
    );
    let devices = viommu["devices"].as_array().cloned().unwrap_or_default();
    ensure!(
        devices
            .iter()
            .any(|d| d["id"] == "edu0" && d["mode"] == "pass-through"),
        "vm.iommu does not show edu0 behind the vIOMMU in pass-through: {viommu}"
    );
    let (st, v) = vmm.call(
        HttpMethod::Put,
        "vm.remove-device",
        Some(r#"{"id":"edu0"}"#),
    )?;
    ensure!(
        st == 204,
        "vm.remove-device: {st} {v}; log: {}",
        vmm.log_tail()
    );
    let iommu = vmm.get("vm.iommu")?;
    ensure!(
        iommu["viommu"]["devices"]
            .as_array()
            .is_some_and(|d| d.is_empty()),
        "devices left behind the vIOMMU after unplug: {iommu}"
    );
    let counters = vmm.get("vm.counters")?;
    let v = &counters["_viommu"];
    println!("  vm.counters _viommu after unplug: {v}");
    for live in [
        "bridge_shadow_ioases_live",
        "bridge_nested_hwpts_live",
        "bridge_nest_parents_live",
        "bridge_pasids_live",
    ] {
        ensure!(
            v[live].as_u64() == Some(0),
            "{live} is {} after unplug: {counters}",
            v[live]
        );
    }
    let ioasids = vmm.get("vm.ioasids")?;
    ensure!(
        ioasids["ioases"].as_array().is_none_or(|a| a.is_empty()),
        "IOASes left after the last device left: {ioasids}"
    );
    let (st, _) = vmm.call(HttpMethod::Put, "vm.shutdown", None)?;
    ensure!(st == 204, "vm.shutdown: {st}");
    Ok(Outcome::Pass)
}
