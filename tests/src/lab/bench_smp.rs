//! L3 boot experiments of the bench (`scripts/bench lab`), ioasid-vmm beside QEMU in the
//! same L2, with the same L3 kernel, initramfs and kernel command line:
//!
//! - `bench_l3_smp_stalls`: N rounds (`lab.rounds=`, default 10) of 2-vCPU and 4-vCPU boots
//!   with each VMM, each round with a time limit (`lab.round_limit=` seconds, default 90).
//!   Per VMM and size: rounds completed, stalled (still running at the limit), failed; for a
//!   stalled guest its last console line and each vCPU's state from the VMM (ioasid-vmm logs
//!   one line per vCPU when SIGTERM stops it, see `vmm::vcpu_dump`; QEMU answers
//!   `info registers -a` on its monitor socket).
//! - `bench_l3_boot_overhead`: the VMM's own share of a boot with 1, 2 and 4 vCPUs and
//!   256 MiB and 2 GiB of RAM (`lab.overhead_rounds=`, default 3): the time from the VMM's
//!   process start to the guest's first userspace line (`L3-INIT uptime <s> ...`, printed by
//!   scripts/lab/l3-init) minus that uptime, i.e. what lies outside the guest kernel's own
//!   time (setup, firmware, pinning RAM for the IOAS, device realize).
//!
//! Results are `LAB-BENCH` lines; nothing here asserts a time. A round that ends other than
//! by completing is counted, never retried.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::bench::QEMU_BIN;
use super::env;
use super::l3_tests::{l3_cmdline, tail, wait_child, L3Session, L3_INITRD, L3_KERNEL};
use crate::harness::{LabTest, Outcome, TestResult};

/// The experiments of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "bench_l3_smp_stalls",
            run: bench_l3_smp_stalls,
        },
        LabTest {
            name: "bench_l3_boot_overhead",
            run: bench_l3_boot_overhead,
        },
    ]
}

/// A numeric knob `name=value` from L2's kernel command line (`scripts/bench lab --rounds`
/// puts them there), or `default`.
fn knob(name: &str, default: u64) -> u64 {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let key = format!("{name}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&key).and_then(|v| v.parse().ok()))
        .unwrap_or(default)
}

/// The two VMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Ours,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ours => "ioasid-vmm",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One boot to run.
#[derive(Clone, Debug)]
struct BootSpec {
    cpus: u32,
    mem_mib: u64,
    tasks: &'static str,
    /// Results that must PASS for the round to count as completed.
    must_pass: &'static [&'static str],
    edu: PathBuf,
    limit: Duration,
    /// ioasid-vmm only: guest RAM from hugetlbfs 2 MiB pages (`--memory ...,hugepages=on`).
    hugepages: bool,
    /// The L3 kernel: [`L3_KERNEL`] (bzImage) or [`L3_VMLINUX`] (PVH entry, no decompressor).
    kernel: &'static str,
}

/// The same L3 kernel as an uncompressed ELF with a PVH note (run.sh carries it in bench
/// mode).
const L3_VMLINUX: &str = "/l3/vmlinux";

/// How a boot ended.
#[derive(Debug)]
enum BootEnd {
    /// Every result passed and the VMM exited 0 within the limit.
    Completed {
        /// Process start to the `L3-INIT uptime` line.
        to_userspace: Duration,
        /// The guest kernel's uptime on that line.
        uptime: f64,
        /// Process start to exit.
        exit: Duration,
        /// ioasid-vmm: milliseconds it spent pinning guest RAM for the IOAS ([`pin_ms`]).
        pin_ms: Option<u64>,
        /// ioasid-vmm: when (from process start) its log reached each start-up step.
        steps: Vec<(&'static str, f64)>,
    },
    /// Still running at the limit.
    Stalled {
        last_line: String,
        vcpus: Vec<String>,
    },
    /// Ended otherwise (a FAIL result, a non-zero exit, no userspace).
    Failed(String),
}

/// The uptime on the `L3-INIT uptime <s>` line of `serial`, if it is there.
fn init_uptime(serial: &str) -> Option<f64> {
    serial.lines().find_map(|l| {
        let rest = l.split("L3-INIT uptime ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Milliseconds the VMM spent pinning guest RAM for the IOAS: its `... mapped for DMA ...
/// in <n> ms` times (the map calls), plus, from `steps`, the time from the map to the
/// device's attach, where iommufd pins the pages of a map made before any domain existed
/// (it fills the new domain from the IOAS).
fn pin_ms(log: &str, steps: &[(&str, f64)]) -> Option<u64> {
    let times: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("mapped for DMA"))
        .filter_map(|l| {
            let (_, t) = l.rsplit_once(" in ")?;
            t.trim().strip_suffix(" ms")?.parse().ok()
        })
        .collect();
    if times.is_empty() {
        return None;
    }
    let step = |name: &str| steps.iter().find(|(n, _)| *n == name).map(|(_, t)| *t);
    let attach = match (step("RAM mapped"), step("device attached")) {
        (Some(m), Some(a)) if a >= m => ((a - m) * 1000.0) as u64,
        _ => 0,
    };
    Some(times.iter().sum::<u64>() + attach)
}

/// The VMM's start-up steps, by the first log line (env_logger, millisecond UTC timestamps
/// `[2026-12-04T21:25:00.123Z INFO ...]`) that contains each marker.
const STEPS: [(&str, &str); 5] = [
    ("first log line", ""),
    ("device bound", " bound to the "),
    ("RAM mapped", "mapped for DMA"),
    ("device attached", ": attached to IOAS"),
    ("vCPUs started", "VM booted"),
];

/// Seconds since midnight (UTC) of an env_logger line's timestamp.
fn log_time_of_day(line: &str) -> Option<f64> {
    let ts = line.strip_prefix('[')?.split_whitespace().next()?;
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let mut it = time.split(':');
    let h: f64 = it.next()?.parse().ok()?;
    let m: f64 = it.next()?.parse().ok()?;
    let s: f64 = it.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// When (seconds from `spawned_at`) the log reached each of [`STEPS`].
fn log_steps(log: &str, spawned_at: std::time::SystemTime) -> Vec<(&'static str, f64)> {
    let Ok(since_epoch) = spawned_at.duration_since(std::time::UNIX_EPOCH) else {
        return Vec::new();
    };
    let t0 = since_epoch.as_secs_f64() % 86_400.0;
    STEPS
        .iter()
        .filter_map(|(name, marker)| {
            let line = log.lines().find(|l| l.contains(marker))?;
            let t = log_time_of_day(line)?;
            // Across midnight the time of day wraps.
            Some((*name, (t - t0).rem_euclid(86_400.0)))
        })
        .collect()
}

/// The last non-empty line of a console log.
fn last_line(serial: &str) -> String {
    serial
        .lines()
        .map(|l| l.trim_end_matches('\r').trim())
        .rfind(|l| !l.is_empty())
        .unwrap_or("<no console output>")
        .to_string()
}

/// Whether every `must_pass` result is there as PASS; Err(why) on a FAIL or a missing one.
fn results_pass(serial: &str, must_pass: &[&str]) -> Result<(), String> {
    for name in must_pass {
        let pass = format!("L3-RESULT {name} PASS");
        if !serial.contains(&pass) {
            let fail = format!("L3-RESULT {name} FAIL");
            let why = serial
                .lines()
                .find(|l| l.contains(&fail))
                .map(|l| l.trim().to_string())
                .unwrap_or_else(|| format!("no {pass} line"));
            return Err(why);
        }
    }
    Ok(())
}

/// Polls `serial()` every 10 ms for the `L3-INIT uptime` line while `alive()`; the time from
/// `start` it was first seen.
fn watch_userspace(
    start: Instant,
    limit: Duration,
    mut serial: impl FnMut() -> String,
    mut alive: impl FnMut() -> bool,
) -> Option<Duration> {
    while start.elapsed() < limit {
        if serial().contains("L3-INIT uptime ") {
            return Some(start.elapsed());
        }
        if !alive() {
            return serial()
                .contains("L3-INIT uptime ")
                .then(|| start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

/// Judges a finished or timed-out boot from its console and exit.
fn judge(
    spec: &BootSpec,
    serial: &str,
    to_userspace: Option<Duration>,
    status: Option<i32>,
    exit: Duration,
) -> Result<BootEnd, String> {
    let Some(to_userspace) = to_userspace else {
        return Err(format!(
            "no L3 userspace (exit {status:?}); {}",
            tail(serial, 4)
        ));
    };
    results_pass(serial, spec.must_pass)?;
    if status != Some(0) {
        return Err(format!("exit status {status:?} after every result passed"));
    }
    let uptime = init_uptime(serial).ok_or("the L3-INIT line has no uptime")?;
    Ok(BootEnd::Completed {
        to_userspace,
        uptime,
        exit,
        pin_ms: None,
        steps: Vec::new(),
    })
}

/// One boot under ioasid-vmm.
fn boot_ours(spec: &BootSpec) -> BootEnd {
    let devices = vec![format!("path={},id=edu0", spec.edu.display())];
    let extra = vec![
        "--kernel".to_string(),
        spec.kernel.to_string(),
        "--cpus".to_string(),
        format!("boot={}", spec.cpus),
        "--memory".to_string(),
        format!(
            "size={}M{}",
            spec.mem_mib,
            if spec.hugepages { ",hugepages=on" } else { "" }
        ),
    ];
    let start = Instant::now();
    let spawned_at = std::time::SystemTime::now();
    let mut s = match L3Session::start("bench-smp", spec.tasks, &devices, &extra) {
        Ok(s) => s,
        Err(e) => return BootEnd::Failed(e),
    };
    let serial_path = PathBuf::from("/tmp/l3-bench-smp.serial");
    let to_userspace = watch_userspace(
        start,
        spec.limit,
        || std::fs::read_to_string(&serial_path).unwrap_or_default(),
        || s.running(),
    );
    // Wait for the guest to power off within what is left of the limit.
    while s.running() && start.elapsed() < spec.limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    if s.running() {
        // Stalled: SIGTERM makes the VMM stop its vCPUs, each logging its state.
        // SAFETY: kill(2) on our own child's pid; it is still running (checked above).
        unsafe {
            libc::kill(s.pid() as libc::pid_t, libc::SIGTERM);
        }
        let out = s.finish(Duration::from_secs(15));
        let vcpus = out
            .vmm_log
            .lines()
            .filter_map(|l| l.split_once("vCPU ").map(|(_, r)| r))
            .filter(|r| r.contains(" at stop: "))
            .map(|r| format!("vCPU {}", r.trim()))
            .collect::<Vec<_>>();
        let vcpus = if vcpus.is_empty() {
            vec![format!(
                "no vCPU state in the VMM log ({}); log tail: {}",
                out.describe_exit(),
                tail(&out.vmm_log, 4)
            )]
        } else {
            vcpus
        };
        return BootEnd::Stalled {
            last_line: last_line(&out.serial),
            vcpus,
        };
    }
    let out = s.finish(Duration::from_secs(5));
    match judge(spec, &out.serial, to_userspace, out.status, out.elapsed) {
        Ok(BootEnd::Completed {
            to_userspace,
            uptime,
            exit,
            ..
        }) => BootEnd::Completed {
            to_userspace,
            uptime,
            exit,
            pin_ms: pin_ms(&out.vmm_log, &log_steps(&out.vmm_log, spawned_at)),
            steps: log_steps(&out.vmm_log, spawned_at),
        },
        Ok(end) => end,
        Err(e) => BootEnd::Failed(format!("{e}; VMM log tail: {}", tail(&out.vmm_log, 3))),
    }
}

/// Reads from the monitor into `got` until the text after `from` has a `(qemu)` prompt, the
/// socket closes, or 5 s pass.
fn read_to_prompt(s: &mut UnixStream, got: &mut Vec<u8>, from: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(_) => {}
        }
        if String::from_utf8_lossy(got.get(from..).unwrap_or_default()).contains("(qemu)") {
            break;
        }
    }
}

/// Sends `cmd` to QEMU's human monitor on `sock` and returns its answer.
fn qemu_monitor(sock: &Path, cmd: &str) -> Result<String, String> {
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("monitor {}: {e}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("monitor timeout: {e}"))?;
    let mut got = Vec::new();
    read_to_prompt(&mut s, &mut got, 0);
    let banner = got.len();
    s.write_all(format!("{cmd}\n").as_bytes())
        .map_err(|e| format!("monitor write: {e}"))?;
    read_to_prompt(&mut s, &mut got, banner);
    Ok(String::from_utf8_lossy(got.get(banner..).unwrap_or_default()).into_owned())
}

/// Each CPU of QEMU's `info registers -a`: `vCPU n rip=.. if=.. hlt=..`.
fn qemu_cpu_states(regs: &str) -> Vec<String> {
    let clean: String = regs.chars().filter(|c| *c != '\r').collect();
    let mut out = Vec::new();
    let mut cpu: Option<String> = None;
    for line in clean.lines() {
        if let Some(rest) = line.trim().strip_prefix("CPU#") {
            cpu = Some(rest.trim().to_string());
        }
        if let Some(i) = line.find("RIP=") {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or("?")
                    .to_string()
            };
            let rfl = u64::from_str_radix(&field("RFL="), 16).unwrap_or(0);
            let rip = line
                .get(i + 4..)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("?");
            out.push(format!(
                "vCPU {} rip=0x{rip} if={} hlt={}",
                cpu.take().unwrap_or_else(|| "?".into()),
                u8::from(rfl & 0x200 != 0),
                field("HLT=")
            ));
        }
    }
    out
}

/// One boot under QEMU, with its monitor on a unix socket.
fn boot_qemu(spec: &BootSpec) -> BootEnd {
    let bdf = match spec.edu.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => return BootEnd::Failed("edu path has no BDF".into()),
    };
    let serial = PathBuf::from("/tmp/l3-bench-smp-qemu.serial");
    let mon = PathBuf::from("/tmp/l3-bench-smp-qemu.mon");
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&mon);
    let start = Instant::now();
    let spawned = Command::new(QEMU_BIN)
        .args(["-accel", "kvm", "-cpu", "host"])
        .args(["-m", &format!("{}M", spec.mem_mib)])
        .args(["-smp", &spec.cpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-M", "pc", "-no-reboot"])
        .args(["-L", "/usr/share/qemu"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", mon.display()))
        .args(["-kernel", spec.kernel, "-initrd", L3_INITRD])
        .args(["-append", &l3_cmdline(spec.tasks, "")])
        .args(["-object", "iommufd,id=iofd0"])
        .arg("-device")
        .arg(format!("vfio-pci,host={bdf},iommufd=iofd0"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child: Child = match spawned {
        Ok(c) => c,
        Err(e) => return BootEnd::Failed(format!("cannot start {QEMU_BIN}: {e}")),
    };
    let to_userspace = watch_userspace(
        start,
        spec.limit,
        || std::fs::read_to_string(&serial).unwrap_or_default(),
        || matches!(child.try_wait(), Ok(None)),
    );
    while matches!(child.try_wait(), Ok(None)) && start.elapsed() < spec.limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let vcpus = match qemu_monitor(&mon, "info registers -a") {
            Ok(regs) => {
                let v = qemu_cpu_states(&regs);
                if v.is_empty() {
                    vec![format!("monitor answered without RIP: {}", tail(&regs, 3))]
                } else {
                    v
                }
            }
            Err(e) => vec![e],
        };
        let _ = wait_child(&mut child, Duration::ZERO);
        return BootEnd::Stalled {
            last_line: last_line(&std::fs::read_to_string(&serial).unwrap_or_default()),
            vcpus,
        };
    }
    let status = wait_child(&mut child, Duration::from_secs(5));
    let text = std::fs::read_to_string(&serial).unwrap_or_default();
    judge(spec, &text, to_userspace, status, start.elapsed()).unwrap_or_else(BootEnd::Failed)
}

fn boot(vmm: Vmm, spec: &BootSpec) -> BootEnd {
    match vmm {
        Vmm::Ours => boot_ours(spec),
        Vmm::Qemu => boot_qemu(spec),
    }
}

/// The peer must be there (`run.sh --mode bench` carries it).
fn need_qemu() -> Result<(), String> {
    if Path::new(QEMU_BIN).exists() {
        Ok(())
    } else {
        Err(format!(
            "{QEMU_BIN} is missing in L2 (run.sh --mode bench carries it)"
        ))
    }
}

/// Per VMM and size: completed, stalled, failed rounds.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    completed: u32,
    stalled: u32,
    failed: u32,
}

fn bench_l3_smp_stalls() -> TestResult {
    need_qemu()?;
    let edu = env::edu_path()?;
    let rounds = knob("lab.rounds", 10).max(1);
    let limit = Duration::from_secs(knob("lab.round_limit", 90).max(10));
    for cpus in [2u32, 4] {
        let spec = BootSpec {
            cpus,
            mem_mib: 256,
            tasks: "up,smp",
            must_pass: &["up", "smp"],
            edu: edu.clone(),
            limit,
            hugepages: false,
            kernel: L3_KERNEL,
        };
        let mut tally = [Tally::default(); 2];
        for round in 0..rounds {
            // Alternate the order so that neither VMM always runs on a warmer L2.
            let order = if round % 2 == 0 {
                [Vmm::Ours, Vmm::Qemu]
            } else {
                [Vmm::Qemu, Vmm::Ours]
            };
            for vmm in order {
                let t = &mut tally[usize::from(vmm == Vmm::Qemu)];
                match boot(vmm, &spec) {
                    BootEnd::Completed { exit, .. } => {
                        t.completed += 1;
                        println!(
                            "LAB-BENCH smp cpus {cpus} round {round} {}: completed in {:.1} s",
                            vmm.name(),
                            exit.as_secs_f64()
                        );
                    }
                    BootEnd::Stalled { last_line, vcpus } => {
                        t.stalled += 1;
                        println!(
                            "LAB-BENCH smp cpus {cpus} round {round} {}: STALLED at {} s; last console line: {last_line}",
                            vmm.name(),
                            limit.as_secs()
                        );
                        for v in vcpus {
                            println!("LAB-BENCH smp   {} {v}", vmm.name());
                        }
                    }
                    BootEnd::Failed(why) => {
                        t.failed += 1;
                        println!(
                            "LAB-BENCH smp cpus {cpus} round {round} {}: FAILED: {why}",
                            vmm.name()
                        );
                    }
                }
            }
        }
        for (vmm, t) in [Vmm::Ours, Vmm::Qemu].iter().zip(tally) {
            println!(
                "LAB-BENCH smp summary cpus {cpus} {}: {} of {rounds} completed, {} stalled, {} failed (limit {} s per round, tasks up,smp, edu assigned, 256 MiB)",
                vmm.name(),
                t.completed,
                t.stalled,
                t.failed,
                limit.as_secs()
            );
        }
    }
    Ok(Outcome::Pass)
}

/// "bzImage" or "vmlinux (PVH)".
fn kernel_name(kernel: &str) -> &'static str {
    if kernel == L3_VMLINUX {
        "vmlinux (PVH)"
    } else {
        "bzImage"
    }
}

/// Reserves `pages` 2 MiB huge pages in L2 (0 frees them); Err when fewer were reserved.
fn set_hugepages(pages: u64) -> Result<(), String> {
    let knob = "/proc/sys/vm/nr_hugepages";
    std::fs::write(knob, format!("{pages}\n")).map_err(|e| format!("{knob}: {e}"))?;
    let got: u64 = std::fs::read_to_string(knob)
        .map_err(|e| format!("{knob}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{knob}: {e}"))?;
    if got < pages {
        return Err(format!(
            "only {got} of {pages} huge pages could be reserved"
        ));
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn bench_l3_boot_overhead() -> TestResult {
    need_qemu()?;
    let edu = env::edu_path()?;
    let rounds = knob("lab.overhead_rounds", 3).max(1);
    let limit = Duration::from_secs(knob("lab.round_limit", 90).max(10));
    let mut table = Vec::new();
    let vmlinux = Path::new(L3_VMLINUX).exists();
    if !vmlinux {
        println!("LAB-BENCH overhead: {L3_VMLINUX} is missing; no PVH rows");
    }
    let mut cells: Vec<(u32, u64, &'static str)> = Vec::new();
    for mem_mib in [256u64, 2048] {
        for cpus in [1u32, 2, 4] {
            cells.push((cpus, mem_mib, L3_KERNEL));
        }
        if vmlinux {
            cells.push((1, mem_mib, L3_VMLINUX));
        }
    }
    {
        for (cpus, mem_mib, kernel) in cells {
            let spec = BootSpec {
                cpus,
                mem_mib,
                tasks: "up",
                must_pass: &["up"],
                edu: edu.clone(),
                limit,
                hugepages: false,
                kernel,
            };
            let kname = kernel_name(kernel);
            // Per VMM: (share, to userspace, uptime, pinning) of each completed round.
            let mut got: [Vec<(f64, f64, f64, f64)>; 2] = [vec![], vec![]];
            for round in 0..rounds {
                let order = if round % 2 == 0 {
                    [Vmm::Ours, Vmm::Qemu]
                } else {
                    [Vmm::Qemu, Vmm::Ours]
                };
                for vmm in order {
                    match boot(vmm, &spec) {
                        BootEnd::Completed {
                            to_userspace,
                            uptime,
                            pin_ms,
                            steps,
                            ..
                        } => {
                            let t = to_userspace.as_secs_f64();
                            if !steps.is_empty() {
                                let s: Vec<String> = steps
                                    .iter()
                                    .map(|(n, t)| format!("{n} +{t:.2} s"))
                                    .collect();
                                println!(
                                    "LAB-BENCH overhead cpus {cpus} mem {mem_mib}M {kname} round {round} ioasid-vmm steps: {}",
                                    s.join(", ")
                                );
                            }
                            println!(
                                "LAB-BENCH overhead cpus {cpus} mem {mem_mib}M {kname} round {round} {}: userspace at {t:.2} s, kernel uptime {uptime:.2} s, VMM share {:.2} s{}",
                                vmm.name(),
                                t - uptime,
                                pin_ms.map(|p| format!(" (of it pinning guest RAM for the IOAS: {:.2} s)", p as f64 / 1000.0)).unwrap_or_default()
                            );
                            let pin = pin_ms.map_or(f64::NAN, |p| p as f64 / 1000.0);
                            got[usize::from(vmm == Vmm::Qemu)].push((t - uptime, t, uptime, pin));
                        }
                        BootEnd::Stalled { last_line, .. } => println!(
                            "LAB-BENCH overhead cpus {cpus} mem {mem_mib}M round {round} {}: stalled ({last_line})",
                            vmm.name()
                        ),
                        BootEnd::Failed(why) => println!(
                            "LAB-BENCH overhead cpus {cpus} mem {mem_mib}M round {round} {}: failed: {why}",
                            vmm.name()
                        ),
                    }
                }
            }
            type Row = (f64, f64, f64, f64);
            let med = |v: &Vec<Row>, f: fn(&Row) -> f64| {
                median(v.iter().map(f).filter(|x| !x.is_nan()).collect())
            };
            let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
            let (os, qs) = (med(&got[0], |x| x.0), med(&got[1], |x| x.0));
            let ratio = match (os, qs) {
                (Some(o), Some(q)) if q > 0.0 => format!("{:.2}x", o / q),
                _ => "-".to_string(),
            };
            let row = format!(
                "| {cpus} | {mem_mib} MiB, {kname} | {} | {} | {} | {} | {} | {} | {} | {ratio} |",
                fmt(os),
                fmt(med(&got[0], |x| x.3)),
                fmt(med(&got[0], |x| x.1)),
                fmt(med(&got[0], |x| x.2)),
                fmt(qs),
                fmt(med(&got[1], |x| x.1)),
                fmt(med(&got[1], |x| x.2)),
            );
            println!("LAB-BENCH overhead row {row}");
            table.push(row);
        }
    }
    // What the kernel offers against the pinning cost: guest RAM on 2 MiB hugetlbfs pages
    // (the lab's L2 kernel has no transparent huge pages), reserved for these rounds only.
    let kernels: Vec<&'static str> = if vmlinux {
        vec![L3_KERNEL, L3_VMLINUX]
    } else {
        vec![L3_KERNEL]
    };
    for (mem_mib, kernel) in [256u64, 2048]
        .into_iter()
        .flat_map(|m| kernels.iter().map(move |k| (m, *k)))
    {
        let kname = kernel_name(kernel);
        let pages = mem_mib / 2 + 8;
        if let Err(e) = set_hugepages(pages) {
            println!("LAB-BENCH overhead hugepages mem {mem_mib}M: not measured: {e}");
            continue;
        }
        let spec = BootSpec {
            cpus: 1,
            mem_mib,
            tasks: "up",
            must_pass: &["up"],
            edu: edu.clone(),
            limit,
            hugepages: true,
            kernel,
        };
        let mut shares = Vec::new();
        let mut pins = Vec::new();
        for round in 0..rounds {
            match boot_ours(&spec) {
                BootEnd::Completed {
                    to_userspace,
                    uptime,
                    pin_ms,
                    steps,
                    ..
                } => {
                    let share = to_userspace.as_secs_f64() - uptime;
                    let st: Vec<String> =
                        steps.iter().map(|(n, t)| format!("{n} +{t:.2} s")).collect();
                    println!(
                        "LAB-BENCH overhead hugepages mem {mem_mib}M {kname} round {round} ioasid-vmm steps: {}",
                        st.join(", ")
                    );
                    let pin = pin_ms.map_or(f64::NAN, |p| p as f64 / 1000.0);
                    println!(
                        "LAB-BENCH overhead hugepages cpus 1 mem {mem_mib}M {kname} round {round} ioasid-vmm: VMM share {share:.2} s, pinning {pin:.2} s"
                    );
                    shares.push(share);
                    pins.push(pin);
                }
                BootEnd::Stalled { last_line, .. } => println!(
                    "LAB-BENCH overhead hugepages mem {mem_mib}M round {round}: stalled ({last_line})"
                ),
                BootEnd::Failed(why) => println!(
                    "LAB-BENCH overhead hugepages mem {mem_mib}M round {round}: failed: {why}"
                ),
            }
        }
        let _ = set_hugepages(0);
        let fmt = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        let row = format!(
            "| 1 | {mem_mib} MiB, {kname}, ours hugepages=on | {} | {} | | | | | | |",
            fmt(median(shares)),
            fmt(median(pins.into_iter().filter(|x| !x.is_nan()).collect()))
        );
        println!("LAB-BENCH overhead row {row}");
        table.push(row);
    }
    println!(
        "LAB-BENCH overhead table (median of {rounds}; s; share = process start to first L3 userspace line minus the L3 kernel's uptime on it; edu assigned via iommufd):"
    );
    println!("LAB-BENCH | vCPUs | RAM | ours share | ours pinning | ours to userspace | ours kernel uptime | qemu share | qemu to userspace | qemu kernel uptime | share ours/qemu |");
    for row in table {
        println!("LAB-BENCH {row}");
    }
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_init_uptime() {
        let s = "boot noise\nL3-INIT uptime 3.41 kernel 7.3.4, tasks: up\nL3-RESULT up PASS x\n";
        assert_eq!(init_uptime(s), Some(3.41));
        assert_eq!(init_uptime("L3-INIT kernel 7.3.4"), None);
        assert_eq!(last_line(s), "L3-RESULT up PASS x");
        assert!(results_pass(s, &["up"]).is_ok());
        assert!(results_pass(s, &["smp"]).is_err());
        let log = "[x INFO vmm] Guest RAM GPA 0x0+0x10000000 mapped for DMA at IOVA 0x0 in IOAS 1 (by memfd) in 812 ms\nother\n";
        assert_eq!(pin_ms(log, &[]), Some(812));
        let steps = [("RAM mapped", 0.5), ("device attached", 2.5)];
        assert_eq!(pin_ms(log, &steps), Some(2812));
        assert_eq!(pin_ms("nothing", &steps), None);
        assert_eq!(
            log_time_of_day("[2026-12-04T21:25:00.250Z INFO  vmm] VM booted"),
            Some(21.0 * 3600.0 + 25.0 * 60.0 + 0.25)
        );
    }

    #[test]
    fn reads_qemu_cpu_states() {
        let regs = "info registers -a\r\n\r\nCPU#0\r\nRAX=0000000000000000 RBX=0000000000000000\r\nRIP=ffffffff8100a1b2 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\r\nCPU#1\r\nRIP=ffffffff81000002 RFL=00000006 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n(qemu) ";
        assert_eq!(
            qemu_cpu_states(regs),
            vec![
                "vCPU 0 rip=0xffffffff8100a1b2 if=1 hlt=1".to_string(),
                "vCPU 1 rip=0xffffffff81000002 if=0 hlt=0".to_string()
            ]
        );
    }
}
