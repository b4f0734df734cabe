//! Lab tests that boot a real Linux L3 guest under `ioasid-vmm` inside L2, with edu and the
//! mtty mdev assigned, and read the guest's `L3-RESULT` lines from its serial console.
//!
//! One boot serves the boot/edu/mtty tests: the first of them boots the guest with
//! `l3.tasks=up,edu,mtty` and keeps the outcome; each test then checks its own facts of
//! that run. The L3 pieces come from scripts/lab/run.sh: `/bin/ioasid-vmm`, `/l3/bzImage`
//! (the tinyconfig-based L3 kernel) and `/l3/initramfs.cpio.gz` (scripts/lab/l3-init plus
//! `ioasid-guest`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::env;
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// Where run.sh puts the VMM and the L3 guest.
pub const VMM_BIN: &str = "/bin/ioasid-vmm";
/// The L3 kernel.
pub const L3_KERNEL: &str = "/l3/bzImage";
/// The L3 initramfs.
pub const L3_INITRD: &str = "/l3/initramfs.cpio.gz";
/// The L3 guest's RAM: below 256 MiB, so every guest-physical address fits edu's DMA mask.
pub const L3_MEMORY: &str = "size=256M";

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "linux_guest_boots",
            run: linux_guest_boots,
        },
        LabTest {
            name: "linux_guest_sees_edu",
            run: linux_guest_sees_edu,
        },
        LabTest {
            name: "linux_guest_edu_dma_noiommu",
            run: linux_guest_edu_dma_noiommu,
        },
        LabTest {
            name: "linux_guest_mtty_serial_io",
            run: linux_guest_mtty_serial_io,
        },
        LabTest {
            name: "linux_guest_hotplug_via_rest",
            run: linux_guest_hotplug_via_rest,
        },
    ]
}

/// What one L3 run left behind.
#[derive(Debug, Clone)]
pub struct L3Outcome {
    /// The VMM's exit status (None: killed at the deadline).
    pub status: Option<i32>,
    /// The guest's serial console.
    pub serial: String,
    /// The VMM's stderr (its log, RUST_LOG=info).
    pub vmm_log: String,
    /// From the VMM's start to its exit (or the kill).
    pub elapsed: Duration,
}

impl L3Outcome {
    /// The detail of `L3-RESULT <name> PASS <detail>`, or the reason it is not there.
    pub fn result(&self, name: &str) -> Result<String, String> {
        let pass = format!("L3-RESULT {name} PASS");
        let fail = format!("L3-RESULT {name} FAIL");
        for line in self.serial.lines() {
            let line = line.trim_end_matches('\r');
            if let Some(rest) = line.strip_prefix(&pass) {
                return Ok(rest.trim().to_string());
            }
            if let Some(rest) = line.strip_prefix(&fail) {
                return Err(format!("L3 guest reports {name} failed: {}", rest.trim()));
            }
        }
        Err(format!(
            "no L3-RESULT {name} line; {}; serial tail: {} ; VMM log tail: {}",
            self.describe_exit(),
            tail(&self.serial, 12),
            tail(&self.vmm_log, 12)
        ))
    }

    /// Why a shared L3 run failed, for its tests' messages: the early stop (if any), the
    /// VMM's exit, and the tails of the guest's console and the VMM's log.
    pub fn why(&self, stopped: Option<&str>) -> String {
        format!(
            "{}{}; serial tail: {}; VMM log tail: {}",
            stopped.map(|s| format!("{s}; ")).unwrap_or_default(),
            self.describe_exit(),
            tail(&self.serial, 10),
            tail(&self.vmm_log, 10)
        )
    }

    /// The VMM's exit, in words.
    pub fn describe_exit(&self) -> String {
        match self.status {
            Some(c) => format!(
                "ioasid-vmm exited with {c} after {:.1} s",
                self.elapsed.as_secs_f64()
            ),
            None => format!(
                "ioasid-vmm killed after {:.1} s",
                self.elapsed.as_secs_f64()
            ),
        }
    }
}

/// The last `n` lines of `s`, joined with " | ".
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(|l| l.trim_end_matches('\r')).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The pieces an L3 run needs, or why one is missing.
pub fn l3_pieces() -> Result<(), String> {
    for p in [VMM_BIN, L3_KERNEL, L3_INITRD] {
        ensure!(
            Path::new(p).exists(),
            "{p} is missing from the L2 initramfs (scripts/lab/run.sh carries it unless --no-l3)"
        );
    }
    ensure!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is absent in L2 (kvm_amd under -cpu max?)"
    );
    Ok(())
}

/// The L3 kernel command line for an L3 guest running `tasks`, with `more` words appended
/// (e.g. `intel_iommu=on,sm_on` for a guest behind the vIOMMU).
pub fn l3_cmdline(tasks: &str, more: &str) -> String {
    let base =
        format!("console=ttyS0 panic=-1 quiet vfio.enable_unsafe_noiommu_mode=1 l3.tasks={tasks}");
    if more.is_empty() {
        base
    } else {
        format!("{base} {more}")
    }
}

/// The VMM command line for an L3 guest with kernel command line `cmdline` (see
/// [`l3_cmdline`]), with `devices` (--device values) and `extra` arguments ([`MAIN_CPUS`]
/// vCPUs unless `extra` has `--cpus`, [`L3_MEMORY`] unless it has `--memory`, [`L3_KERNEL`]
/// unless it has `--kernel`); the serial console goes to `serial`.
pub fn vmm_command(cmdline: &str, devices: &[String], extra: &[String], serial: &Path) -> Command {
    let mut c = Command::new(VMM_BIN);
    if !extra.iter().any(|a| a == "--kernel") {
        c.arg("--kernel").arg(L3_KERNEL);
    }
    c.arg("--initramfs")
        .arg(L3_INITRD)
        .arg("--cmdline")
        .arg(cmdline)
        .arg("--serial")
        .arg(format!("file={}", serial.display()));
    for d in devices {
        c.arg("--device").arg(d);
    }
    if !extra.iter().any(|a| a == "--cpus") {
        c.arg("--cpus").arg(format!("boot={MAIN_CPUS}"));
    }
    if !extra.iter().any(|a| a == "--memory") {
        c.args(["--memory", L3_MEMORY]);
    }
    c.args(extra);
    c.env("RUST_LOG", "info");
    c
}

/// Waits for `child` up to `limit`, killing it at the deadline; returns its status.
pub fn wait_child(child: &mut Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st.code().unwrap_or(-1)),
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// A running L3 guest: the VMM process, its serial file and its stderr reader.
pub struct L3Session {
    name: String,
    child: Child,
    serial: PathBuf,
    start: Instant,
    reader: Option<std::thread::JoinHandle<String>>,
}

impl L3Session {
    /// Starts `ioasid-vmm` for an L3 guest running `tasks`, with `devices` and `extra` args.
    pub fn start(
        name: &str,
        tasks: &str,
        devices: &[String],
        extra: &[String],
    ) -> Result<Self, String> {
        Self::start_cmdline(name, &l3_cmdline(tasks, ""), devices, extra)
    }

    /// Starts `ioasid-vmm` for an L3 guest with kernel command line `cmdline`.
    pub fn start_cmdline(
        name: &str,
        cmdline: &str,
        devices: &[String],
        extra: &[String],
    ) -> Result<Self, String> {
        l3_pieces()?;
        let serial = Self::serial_path(name);
        let _ = std::fs::remove_file(&serial);
        Self::spawn(name, vmm_command(cmdline, devices, extra, &serial), serial)
    }

    /// Where the guest's serial output of the run `name` goes.
    pub fn serial_path(name: &str) -> PathBuf {
        PathBuf::from(format!("/tmp/l3-{name}.serial"))
    }

    /// Starts the VMM as `c` says (its serial output going to `serial`), stderr drained.
    pub fn spawn(name: &str, mut c: Command, serial: PathBuf) -> Result<Self, String> {
        let start = Instant::now();
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {VMM_BIN} ({name}): {e}"))?;
        // Drain stderr on a thread so a chatty log cannot block the VMM.
        let mut err = child.stderr.take();
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(e) = err.as_mut() {
                let _ = e.read_to_string(&mut s);
            }
            s
        });
        Ok(L3Session {
            name: name.to_string(),
            child,
            serial,
            start,
            reader: Some(reader),
        })
    }

    /// The VMM's process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the VMM still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The guest's serial output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    /// Waits until the serial output contains `marker`; false at the deadline or when the
    /// VMM exits first.
    pub fn wait_serial(&mut self, marker: &str, limit: Duration) -> bool {
        let start = Instant::now();
        loop {
            if self.serial().contains(marker) {
                return true;
            }
            if start.elapsed() > limit || matches!(self.child.try_wait(), Ok(Some(_))) {
                return self.serial().contains(marker);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the VMM to exit (killing it at the deadline) and collects the outcome.
    pub fn finish(mut self, limit: Duration) -> L3Outcome {
        let status = wait_child(&mut self.child, limit);
        let elapsed = self.start.elapsed();
        let vmm_log = self
            .reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default();
        let out = L3Outcome {
            status,
            serial: self.serial(),
            vmm_log,
            elapsed,
        };
        println!("LAB-INFO l3 run {}: {}", self.name, out.describe_exit());
        out
    }
}

impl Drop for L3Session {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Boots an L3 guest to completion (it powers off after its tasks) and collects the outcome.
pub fn run_l3(
    name: &str,
    tasks: &str,
    devices: &[String],
    limit: Duration,
) -> Result<L3Outcome, String> {
    Ok(L3Session::start(name, tasks, devices, &[])?.finish(limit))
}

/// vCPUs of the L3 guests of the suite (the shared boot, the hotplug run, and any run whose
/// `extra` arguments do not say `--cpus`). Two: an SMP guest boots reliably under ioasid-vmm
/// in the lab (scripts/lab/README.md, "SMP L3 guests").
pub const MAIN_CPUS: u32 = 2;

/// The shared boot of the boot/edu/mtty tests: edu and mtty assigned, tasks up, edu, mtty.
fn main_run() -> &'static Result<L3Outcome, String> {
    static RUN: OnceLock<Result<L3Outcome, String>> = OnceLock::new();
    RUN.get_or_init(|| {
        let edu = env::edu_path()?;
        let mtty = env::mtty_path()?;
        let devices = vec![
            format!("path={},id=edu0", edu.display()),
            format!("path={},id=mtty0", mtty.display()),
        ];
        let extra = ["--cpus".to_string(), format!("boot={MAIN_CPUS}")];
        let s = L3Session::start("main", "up,edu,mtty", &devices, &extra)?;
        Ok(s.finish(Duration::from_secs(240)))
    })
}

fn main_result(name: &str) -> Result<String, String> {
    main_run().as_ref().map_err(Clone::clone)?.result(name)
}

fn linux_guest_boots() -> TestResult {
    let detail = main_result("up")?;
    let run = main_run().as_ref().map_err(Clone::clone)?;
    ensure!(
        run.status == Some(0),
        "the guest reached userspace ({detail}) but {}",
        run.describe_exit()
    );
    ensure!(
        detail.contains(&format!("cpus {MAIN_CPUS} ")),
        "the guest does not see its {MAIN_CPUS} vCPUs online: {detail}"
    );
    println!("LAB-INFO L3 up: {detail}; {}", run.describe_exit());
    Ok(Outcome::Pass)
}

fn linux_guest_sees_edu() -> TestResult {
    let seen = main_result("sees_edu")?;
    let msi = main_result("edu_msi")?;
    println!("LAB-INFO L3 edu: {seen}; MSI: {msi}");
    Ok(Outcome::Pass)
}

fn linux_guest_edu_dma_noiommu() -> TestResult {
    let dma = main_result("edu_dma")?;
    println!("LAB-INFO L3 edu DMA: {dma}");
    Ok(Outcome::Pass)
}

fn linux_guest_mtty_serial_io() -> TestResult {
    let echo = main_result("mtty_echo")?;
    println!("LAB-INFO L3 mtty: {echo}");
    Ok(Outcome::Pass)
}

/// Where run.sh puts the REST client.
pub const REMOTE_BIN: &str = "/bin/ioasid-remote";

/// Runs `ioasid-remote --api-socket SOCK ARGS...`; Ok(stdout) on success.
pub fn remote(sock: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(REMOTE_BIN)
        .arg("--api-socket")
        .arg(sock)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {REMOTE_BIN}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "ioasid-remote {} failed ({}): {} {}",
            args.join(" "),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn linux_guest_hotplug_via_rest() -> TestResult {
    hotplug_via_rest("hotplug", MAIN_CPUS)
}

/// The REST hotplug flow with a `cpus`-vCPU guest: edu added through the API, the guest sees
/// it, takes its MSI and does a DMA round trip, then the API removes it. `name` names the
/// run (its serial file and API socket).
pub fn hotplug_via_rest(name: &str, cpus: u32) -> TestResult {
    ensure!(
        Path::new(REMOTE_BIN).exists(),
        "{REMOTE_BIN} is missing from the L2 initramfs"
    );
    let edu = env::edu_path()?;
    let sock = PathBuf::from(format!("/tmp/l3-{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let extra = vec![
        "--api-socket".to_string(),
        sock.display().to_string(),
        "--cpus".to_string(),
        format!("boot={cpus}"),
    ];
    let mut vm = L3Session::start(name, "hotplug", &[], &extra)?;
    if !vm.wait_serial("L3-READY hotplug", Duration::from_secs(120)) {
        let out = vm.finish(Duration::from_secs(1));
        return Err(format!(
            "the L3 guest never got ready for hotplug; {}; serial tail: {}; VMM log tail: {}",
            out.describe_exit(),
            tail(&out.serial, 10),
            tail(&out.vmm_log, 10)
        ));
    }
    let added = remote(
        &sock,
        &["add-device", &format!("path={},id=hot0", edu.display())],
    )?;
    println!(
        "LAB-INFO add-device answered: {}",
        added.trim().replace('\n', " ")
    );
    ensure!(
        added.contains("hot0"),
        "add-device reply lacks the id: {added}"
    );
    let ready = vm.wait_serial("L3-READY unplug", Duration::from_secs(120));
    if ready {
        let removed = remote(&sock, &["remove-device", "hot0"]);
        if let Err(e) = removed {
            let out = vm.finish(Duration::from_secs(1));
            return Err(format!("{e}; serial tail: {}", tail(&out.serial, 10)));
        }
    }
    let out = vm.finish(Duration::from_secs(150));
    for name in [
        "hotplug_added",
        "hotplug_sees_edu",
        "hotplug_edu_msi",
        "hotplug_edu_dma",
        "hotplug_removed",
    ] {
        let detail = out.result(name)?;
        println!("LAB-INFO {name}: {detail}");
    }
    ensure!(
        out.status == Some(0),
        "the guest passed every check but {}",
        out.describe_exit()
    );
    Ok(Outcome::Pass)
}
