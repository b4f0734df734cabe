//! Lab benchmarks (`ioasid-lab bench`, run by `scripts/bench` through
//! `scripts/lab/run.sh --mode bench`): measured inside L2, ioasid-vmm side by side with the
//! peer, QEMU 10.0 from the host's Debian packages, in the same run. Results are
//! `LAB-BENCH <name> <values>` lines; nothing here asserts a time.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::env;
use super::l3_tests::{tail, wait_child, L3Session, L3_INITRD, L3_KERNEL};
use crate::harness::{LabTest, Outcome, TestResult};

/// Where `run.sh --mode bench` puts QEMU in L2.
pub const QEMU_BIN: &str = "/usr/bin/qemu-system-x86_64";
const ROUNDS: usize = 3;

/// The benchmarks.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "bench_l3_boot_vs_qemu",
        run: bench_l3_boot_vs_qemu,
    }]
}

/// Times of one boot: to the guest's first userspace result line, and to the VMM's exit.
#[derive(Debug, Clone, Copy)]
struct BootTimes {
    userspace: Duration,
    exit: Duration,
}

fn wait_marker(serial: &Path, marker: &str, start: Instant, limit: Duration) -> Option<Duration> {
    while start.elapsed() < limit {
        if std::fs::read_to_string(serial).is_ok_and(|s| s.contains(marker)) {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn ours(edu: &Path) -> Result<BootTimes, String> {
    let devices = vec![format!("path={}", edu.display())];
    let start = Instant::now();
    let mut s = L3Session::start("bench-ours", "up", &devices, &[])?;
    if !s.wait_serial("L3-RESULT up PASS", Duration::from_secs(120)) {
        let out = s.finish(Duration::from_secs(1));
        return Err(format!(
            "ioasid-vmm: no L3 userspace; {}; {}",
            out.describe_exit(),
            tail(&out.serial, 8)
        ));
    }
    let userspace = start.elapsed();
    let out = s.finish(Duration::from_secs(60));
    if out.status != Some(0) {
        return Err(format!("ioasid-vmm: {}", out.describe_exit()));
    }
    Ok(BootTimes {
        userspace,
        exit: start.elapsed(),
    })
}

fn qemu(edu: &Path) -> Result<BootTimes, String> {
    let bdf = edu
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("edu path has no BDF")?;
    let serial = Path::new("/tmp/l3-bench-qemu.serial");
    let _ = std::fs::remove_file(serial);
    let start = Instant::now();
    let mut child = Command::new(QEMU_BIN)
        .args(["-accel", "kvm", "-cpu", "host", "-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-M", "pc", "-no-reboot"])
        .args(["-L", "/usr/share/qemu"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-kernel", L3_KERNEL, "-initrd", L3_INITRD])
        .args(["-append", "console=ttyS0 panic=-1 quiet l3.tasks=up"])
        .args(["-object", "iommufd,id=iofd0"])
        .arg("-device")
        .arg(format!("vfio-pci,host={bdf},iommufd=iofd0"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {QEMU_BIN}: {e}"))?;
    let userspace = wait_marker(serial, "L3-RESULT up PASS", start, Duration::from_secs(120));
    let status = wait_child(&mut child, Duration::from_secs(60));
    let Some(userspace) = userspace else {
        return Err(format!(
            "QEMU: no L3 userspace (exit {status:?}); {}",
            tail(&std::fs::read_to_string(serial).unwrap_or_default(), 8)
        ));
    };
    Ok(BootTimes {
        userspace,
        exit: start.elapsed(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench_l3_boot_vs_qemu() -> TestResult {
    if !Path::new(QEMU_BIN).exists() {
        return Err(format!(
            "{QEMU_BIN} is missing in L2 (run.sh --mode bench carries it)"
        ));
    }
    let edu = env::edu_path()?;
    let (mut o_u, mut o_e, mut q_u, mut q_e) = (vec![], vec![], vec![], vec![]);
    for round in 0..ROUNDS {
        // Alternate the order so that neither VMM always runs on a warmer L2.
        let pair = if round % 2 == 0 {
            let a = ours(&edu)?;
            (a, qemu(&edu)?)
        } else {
            let b = qemu(&edu)?;
            (ours(&edu)?, b)
        };
        println!(
            "LAB-BENCH l3_boot round {round}: ioasid-vmm userspace {:.2} s exit {:.2} s; qemu userspace {:.2} s exit {:.2} s",
            pair.0.userspace.as_secs_f64(),
            pair.0.exit.as_secs_f64(),
            pair.1.userspace.as_secs_f64(),
            pair.1.exit.as_secs_f64()
        );
        o_u.push(pair.0.userspace.as_secs_f64());
        o_e.push(pair.0.exit.as_secs_f64());
        q_u.push(pair.1.userspace.as_secs_f64());
        q_e.push(pair.1.exit.as_secs_f64());
    }
    let (ou, oe, qu, qe) = (median(o_u), median(o_e), median(q_u), median(q_e));
    println!(
        "LAB-BENCH l3_boot median of {ROUNDS} (same L3 kernel and initramfs, edu passed through via iommufd, 256 MiB, 1 vCPU, nested KVM in L2 under TCG): \
         to userspace ioasid-vmm {ou:.2} s vs qemu {qu:.2} s = {:.2}x; to exit {oe:.2} s vs {qe:.2} s = {:.2}x",
        ou / qu,
        oe / qe
    );
    Ok(Outcome::Pass)
}
