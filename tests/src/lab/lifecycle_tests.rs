//! Cloud Hypervisor's VM life cycle over the REST API with a real Linux L3 guest and edu
//! passed through: `ioasid-vmm --api-socket` starts empty; `ioasid-remote create` (a Cloud
//! Hypervisor `VmConfig` file) and `boot` start the guest, which runs the `lifecycle` task
//! (`tests/src/guest/lifecycle.rs`): edu checks, clock ticks, edu checks again. The host
//! pauses the VM during the ticks (no guest output while paused), resumes it (ticks and edu
//! work again), shuts it down (the API stays, the host side of edu is released), boots it
//! again (edu is passed through again), and deletes it: no VFIO or iommufd fd, no guest RAM
//! or BAR mapping is left in the VMM, which then exits on `vmm.shutdown`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use api::routes::HttpMethod;

use super::api_tests::{vfio_links, LabVmm};
use super::env;
use super::l3_tests::{l3_pieces, remote, tail, L3_INITRD, L3_KERNEL, L3_MEMORY, REMOTE_BIN};
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "linux_guest_lifecycle_via_rest",
        run: linux_guest_lifecycle_via_rest,
    }]
}

/// How long an L3 boot to its first marker may take (a hang breaker).
const BOOT_GUARD: Duration = Duration::from_secs(180);
/// How long the paused guest is watched for output it must not make: 8 of its ticks.
const PAUSED_FOR: Duration = Duration::from_secs(2);

/// The guest's serial console file.
struct Serial(PathBuf);

impl Serial {
    fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    fn len(&self) -> usize {
        std::fs::metadata(&self.0).map_or(0, |m| m.len() as usize)
    }

    /// The output from byte `from` on.
    fn since(&self, from: usize) -> String {
        let t = self.text();
        t.get(from..).unwrap_or("").to_string()
    }

    /// Waits until the output after `from` contains `marker`.
    fn wait(&self, from: usize, marker: &str, limit: Duration, vmm: &LabVmm) -> Result<(), String> {
        let start = Instant::now();
        while !self.since(from).contains(marker) {
            ensure!(
                start.elapsed() < limit,
                "no `{marker}` from the guest within {limit:?}; serial tail: {}; VMM log tail: {}",
                tail(&self.text(), 8),
                tail(&vmm.log(), 8)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }
}

/// The detail of `L3-RESULT <name> PASS` in `text`, or why it is not there.
fn passed(text: &str, name: &str) -> Result<String, String> {
    let pass = format!("L3-RESULT {name} PASS");
    let fail = format!("L3-RESULT {name} FAIL");
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix(&pass) {
            return Ok(rest.trim().to_string());
        }
        if let Some(rest) = line.strip_prefix(&fail) {
            return Err(format!("the guest reports {name} failed: {}", rest.trim()));
        }
    }
    Err(format!("no L3-RESULT {name} line; tail: {}", tail(text, 8)))
}

/// The last `L3-TICK n t ms` of `text`, as (n, t).
fn last_tick(text: &str) -> Option<(u64, u64)> {
    text.lines().rev().find_map(|l| {
        let mut w = l.trim_end_matches('\r').split_whitespace();
        match (w.next(), w.next(), w.next()) {
            (Some("L3-TICK"), Some(n), Some(t)) => Some((n.parse().ok()?, t.parse().ok()?)),
            _ => None,
        }
    })
}

fn state(vmm: &LabVmm) -> Result<String, String> {
    Ok(vmm.get("vm.info")?["state"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// What the VMM process holds of VFIO, iommufd and guest memory: its fds to `/dev/vfio` and
/// `/dev/iommu`, and its mappings of VFIO regions and memfds (guest RAM).
fn held(vmm: &LabVmm) -> Vec<String> {
    let mut v = vfio_links(&vmm.fds());
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vmm.pid())).unwrap_or_default();
    v.extend(
        maps.lines()
            .filter(|l| l.contains("/dev/vfio") || l.contains("memfd:") || l.contains("vfio-"))
            .map(str::to_string),
    );
    v
}

fn linux_guest_lifecycle_via_rest() -> TestResult {
    l3_pieces()?;
    ensure!(
        Path::new(REMOTE_BIN).exists(),
        "{REMOTE_BIN} is missing from the L2 initramfs"
    );
    let edu = env::edu_path()?;
    let serial = Serial(PathBuf::from("/tmp/l3-lifecycle.serial"));
    let _ = std::fs::remove_file(&serial.0);
    let vmm = LabVmm::start_with("lifecycle", &[])?;
    let sock = vmm.sock().to_path_buf();
    let held_empty = held(&vmm);
    ensure!(held_empty.is_empty(), "the empty VMM holds {held_empty:?}");
    let r = vmm.call(HttpMethod::Get, "vm.info", None, &[])?;
    ensure!(r.status == 404, "vm.info before vm.create: {}", r.status);

    // Create and boot with ioasid-remote, from a Cloud Hypervisor VmConfig file.
    let size = L3_MEMORY.trim_start_matches("size=");
    let mib: u64 = size.trim_end_matches('M').parse().unwrap_or(256);
    let config = serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": mib << 20},
        "payload": {
            "kernel": L3_KERNEL,
            "initramfs": L3_INITRD,
            "cmdline": "console=ttyS0 panic=-1 quiet vfio.enable_unsafe_noiommu_mode=1 \
                        l3.tasks=lifecycle",
        },
        "devices": [{"path": edu, "id": "edu0"}],
        "serial": {"mode": "File", "file": serial.0},
        "console": {"mode": "Off"},
    });
    let config_path = PathBuf::from("/tmp/l3-lifecycle.json");
    std::fs::write(&config_path, config.to_string())
        .map_err(|e| format!("cannot write {}: {e}", config_path.display()))?;
    let path_arg = config_path.display().to_string();
    remote(&sock, &["create", &path_arg])?;
    ensure!(state(&vmm)? == "Created", "state after create");
    ensure!(held(&vmm).is_empty(), "a created VM holds host resources");
    remote(&sock, &["boot"])?;
    ensure!(state(&vmm)? == "Running", "state after boot");

    // First boot: edu works, then the ticks start.
    serial.wait(0, "L3-READY pause", BOOT_GUARD, &vmm)?;
    let first = serial.text();
    let dma = passed(&first, "edu_dma")?;
    passed(&first, "edu_msi")?;
    println!("LAB-INFO lifecycle: first boot, edu DMA: {dma}");

    // Pause: the guest prints nothing (it ticks every 250 ms when it runs).
    remote(&sock, &["pause"])?;
    ensure!(state(&vmm)? == "Paused", "state after pause");
    let paused_at = serial.len();
    let tick_at_pause = last_tick(&serial.text());
    std::thread::sleep(PAUSED_FOR);
    ensure!(
        serial.len() == paused_at,
        "the guest wrote {} bytes while paused: {}",
        serial.len() - paused_at,
        serial.since(paused_at)
    );
    let r = vmm.call(HttpMethod::Put, "vm.pause", None, &[])?;
    ensure!(r.status == 500, "a second vm.pause: {}", r.status);

    // Resume: the clock ticks on, and edu works again.
    remote(&sock, &["resume"])?;
    ensure!(state(&vmm)? == "Running", "state after resume");
    serial.wait(paused_at, "L3-TICK", Duration::from_secs(60), &vmm)?;
    serial.wait(paused_at, "L3-READY shutdown", BOOT_GUARD, &vmm)?;
    let after = serial.since(paused_at);
    let clock = passed(&after, "clock")?;
    let resumed = passed(&after, "resumed_edu_dma")?;
    passed(&after, "resumed_edu_msi")?;
    let tick_after = last_tick(&after);
    ensure!(
        match (tick_at_pause, tick_after) {
            (Some((n0, t0)), Some((n1, t1))) => n1 > n0 && t1 > t0,
            (None, Some(_)) => true,
            _ => false,
        },
        "the guest's ticks did not advance across the pause: {tick_at_pause:?} -> {tick_after:?}"
    );
    println!("LAB-INFO lifecycle: resumed, clock {clock}; edu DMA {resumed}");

    // Shutdown: the API stays, and the host side of edu is released.
    remote(&sock, &["shutdown"])?;
    ensure!(state(&vmm)? == "Shutdown", "state after shutdown");
    ensure!(
        vmm.get("vmm.ping")?["pid"] == i64::from(vmm.pid()),
        "vmm.ping after shutdown"
    );
    let left = held(&vmm);
    ensure!(
        left.is_empty(),
        "after vm.shutdown the VMM still holds {left:?}"
    );

    // Boot again: edu is passed through again.
    let second_at = serial.len();
    remote(&sock, &["boot"])?;
    serial.wait(second_at, "L3-READY pause", BOOT_GUARD, &vmm)?;
    let second = serial.since(second_at);
    let dma = passed(&second, "edu_dma")?;
    let tree = vmm.get("vm.info")?["device_tree"].clone();
    ensure!(
        tree.get("edu0").is_some(),
        "edu0 not in the device tree: {tree}"
    );
    println!("LAB-INFO lifecycle: second boot, edu DMA: {dma}");

    // Delete: nothing of the VM is left in the VMM.
    remote(&sock, &["delete"])?;
    let r = vmm.call(HttpMethod::Get, "vm.info", None, &[])?;
    ensure!(r.status == 404, "vm.info after delete: {}", r.status);
    let left = held(&vmm);
    ensure!(
        left.is_empty(),
        "after vm.delete the VMM still holds {left:?}"
    );
    let fds = vmm.fds();
    println!(
        "LAB-INFO lifecycle: deleted; the VMM holds {} fds, none of VFIO or iommufd",
        fds.len()
    );
    vmm.vmm_shutdown()?;
    ensure!(!sock.exists(), "socket left behind");
    Ok(Outcome::Pass)
}
