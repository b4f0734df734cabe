//! REST API benchmarks (`ioasid-lab bench`): how long `vm.add-device` of edu takes, timed
//! on the client side, in ioasid-vmm and in the peer (QEMU 10.0's QMP `device_add` of
//! `vfio-pci` with iommufd). Results are `LAB-BENCH` lines; nothing here asserts a time.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::api_tests::LabVmm;
use super::bench::QEMU_BIN;
use super::env;
use crate::harness::{LabTest, Outcome, TestResult};

/// Add/remove cycles timed in ioasid-vmm.
const OURS_N: usize = 50;
/// Fresh QEMU instances, one `device_add` each (a paused guest never acknowledges a
/// `device_del`, so each instance is used once).
const QEMU_N: usize = 10;

/// The API benchmarks.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "bench_add_device_latency",
        run: bench_add_device_latency,
    }]
}

/// The `p`-th percentile (nearest rank) of `v`, in the unit of `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `OURS_N` x (add edu, remove edu) in one payload VM; returns (add times, remove times).
fn ours(edu: &Path) -> Result<(Vec<f64>, Vec<f64>), String> {
    let vmm = LabVmm::start("bench", "size=64M")?;
    let body = format!(r#"{{"path":"{}","id":"bench0"}}"#, edu.display());
    let (mut adds, mut removes) = (Vec::new(), Vec::new());
    for i in 0..OURS_N {
        let t = Instant::now();
        let (id, _) = vmm.add(&body, &[]).map_err(|e| format!("add {i}: {e}"))?;
        adds.push(ms(t.elapsed()));
        let t = Instant::now();
        vmm.remove(&id).map_err(|e| format!("remove {i}: {e}"))?;
        removes.push(ms(t.elapsed()));
    }
    vmm.shutdown()?;
    Ok((adds, removes))
}

/// A QMP session on a QEMU started paused; the process is killed on drop.
struct Qmp {
    child: Child,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn start(sock: &Path) -> Result<Qmp, String> {
        let _ = std::fs::remove_file(sock);
        let mut child = Command::new(QEMU_BIN)
            .args(["-accel", "kvm", "-M", "pc", "-m", "64M", "-nodefaults"])
            .args(["-display", "none", "-L", "/usr/share/qemu", "-S"])
            .args(["-object", "iommufd,id=iofd0"])
            .arg("-qmp")
            .arg(format!("unix:{},server,nowait", sock.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {QEMU_BIN}: {e}"))?;
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(st)) = child.try_wait() {
                        let mut err = String::new();
                        if let Some(mut e) = child.stderr.take() {
                            let _ = std::io::Read::read_to_string(&mut e, &mut err);
                        }
                        return Err(format!("QEMU exited ({st}) before QMP was up: {err}"));
                    }
                    if start.elapsed() > Duration::from_secs(60) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(format!("QMP socket {} never came up: {e}", sock.display()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut q = Qmp {
            child,
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.line()?;
        if !greeting.contains("QMP") {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String, String> {
        let mut l = String::new();
        match self.reader.read_line(&mut l) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(l),
            Err(e) => Err(format!("QMP read: {e}")),
        }
    }

    /// Sends one command and waits for its `return` (events in between are skipped).
    fn execute(&mut self, cmd: &str) -> Result<String, String> {
        self.writer
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(|e| format!("QMP write: {e}"))?;
        loop {
            let l = self.line()?;
            if l.contains("\"return\"") {
                return Ok(l);
            }
            if l.contains("\"error\"") {
                return Err(format!("QMP {cmd}: {}", l.trim()));
            }
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `QEMU_N` fresh paused QEMUs, one timed `device_add vfio-pci` each.
fn qemu(edu: &Path) -> Result<Vec<f64>, String> {
    let bdf = edu
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("edu path has no BDF")?;
    let sock = Path::new("/tmp/qmp.sock");
    let cmd = format!(
        r#"{{"execute":"device_add","arguments":{{"driver":"vfio-pci","host":"{bdf}","id":"hot0","iommufd":"iofd0"}}}}"#
    );
    let mut times = Vec::new();
    for i in 0..QEMU_N {
        let mut q = Qmp::start(sock).map_err(|e| format!("QEMU {i}: {e}"))?;
        let t = Instant::now();
        q.execute(&cmd).map_err(|e| format!("QEMU {i}: {e}"))?;
        times.push(ms(t.elapsed()));
        drop(q);
    }
    let _ = std::fs::remove_file(sock);
    Ok(times)
}

fn bench_add_device_latency() -> TestResult {
    let edu = env::edu_path()?;
    let (adds, removes) = ours(&edu)?;
    let (p50, p99) = (percentile(&adds, 50.0), percentile(&adds, 99.0));
    println!(
        "LAB-BENCH add_device_latency ioasid-vmm p50 {p50:.1} ms p99 {p99:.1} ms (N={OURS_N})"
    );
    println!(
        "LAB-INFO add_device_latency ioasid-vmm: first add {:.1} ms, slowest {:.1} ms, fastest {:.1} ms",
        adds.first().copied().unwrap_or(f64::NAN),
        percentile(&adds, 100.0),
        percentile(&adds, 0.0)
    );
    println!(
        "LAB-BENCH remove_device_latency ioasid-vmm p50 {:.1} ms p99 {:.1} ms (N={OURS_N}, payload VM: no guest eject)",
        percentile(&removes, 50.0),
        percentile(&removes, 99.0)
    );
    if !Path::new(QEMU_BIN).exists() {
        println!("LAB-INFO add_device_latency: no peer: {QEMU_BIN} is missing in L2 (run.sh --mode bench carries it)");
        return Ok(Outcome::Pass);
    }
    let q = qemu(&edu)?;
    let (q50, q99) = (percentile(&q, 50.0), percentile(&q, 99.0));
    println!("LAB-BENCH add_device_latency qemu p50 {q50:.1} ms p99 {q99:.1} ms (N={QEMU_N})");
    println!(
        "LAB-BENCH add_device_latency ioasid-vmm/qemu p50 {:.2}x (edu via iommufd into a 64 MiB VM, client-side round trip: REST vm.add-device vs QMP device_add; QEMU's iommufd object is opened at start, ours on the add)",
        p50 / q50
    );
    Ok(Outcome::Pass)
}
