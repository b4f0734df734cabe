//! The `smp` task: every online CPU runs a task pinned to it (`sched_setaffinity`), which
//! checks with `getcpu` that it runs there, does some work and reports back to the main
//! thread. Moving a new thread to another CPU and waking the waiting main thread from there
//! take IPIs (reschedule, function call), so a vCPU that never gets its IPIs, or never comes
//! back from HLT, shows up as a task that does not report before the deadline.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long every pinned task has to report.
const DEADLINE: Duration = Duration::from_secs(30);
/// Work each task does: rounds of a xorshift, summed.
const WORK_ROUNDS: u32 = 2_000_000;

/// The online CPUs, from `/sys/devices/system/cpu/online` ("0-1,3").
fn online_cpus() -> Result<Vec<usize>, String> {
    let list = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map_err(|e| format!("cannot read /sys/devices/system/cpu/online: {e}"))?;
    parse_cpu_list(list.trim())
}

/// Expands a kernel CPU list ("0-1,3") into its CPUs.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list '{list}'");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (
                    a.parse::<usize>().map_err(|_| bad())?,
                    b.parse::<usize>().map_err(|_| bad())?,
                );
                if b < a || b - a > 4096 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse::<usize>().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= 8 * std::mem::size_of::<libc::cpu_set_t>() {
        return Err(format!("CPU {cpu} does not fit a cpu_set_t"));
    }
    // SAFETY: `cpu` is below the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(format!(
            "sched_setaffinity(CPU {cpu}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The CPU the calling thread runs on.
fn current_cpu() -> Result<usize, String> {
    // SAFETY: sched_getcpu has no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).map_err(|_| format!("sched_getcpu: {}", std::io::Error::last_os_error()))
}

/// The work: a checksum the main thread can recompute.
fn work(seed: u64) -> u64 {
    let mut x = seed | 1;
    let mut sum = 0u64;
    for _ in 0..WORK_ROUNDS {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum = sum.wrapping_add(x);
    }
    sum
}

/// One pinned task's report: where it ran and what it computed.
struct Report {
    cpu: usize,
    ran_on: Result<usize, String>,
    sum: u64,
}

/// The rescheduling and function-call IPI counts per CPU from `/proc/interrupts` ("RES" and
/// "CAL" rows), as "RES a/b CAL c/d", or "" when the kernel has no such rows.
fn ipi_counts() -> String {
    let Ok(text) = std::fs::read_to_string("/proc/interrupts") else {
        return String::new();
    };
    let mut out = Vec::new();
    for row in ["RES:", "CAL:"] {
        if let Some(line) = text.lines().find(|l| l.trim_start().starts_with(row)) {
            let counts: Vec<&str> = line
                .split_whitespace()
                .skip(1)
                .take_while(|w| w.chars().all(|c| c.is_ascii_digit()))
                .collect();
            out.push(format!(
                "{} {}",
                row.trim_end_matches(':'),
                counts.join("/")
            ));
        }
    }
    out.join(" ")
}

/// `smp`: a pinned task on every online CPU reports back.
pub fn smp() -> Result<String, String> {
    let cpus = online_cpus()?;
    let (tx, rx) = mpsc::channel::<Report>();
    let mut handles = Vec::new();
    for &cpu in &cpus {
        let tx = tx.clone();
        let h = std::thread::Builder::new()
            .name(format!("smp{cpu}"))
            .spawn(move || {
                let ran_on = pin_to(cpu).and_then(|()| current_cpu());
                let sum = work(cpu as u64 + 1);
                let _ = tx.send(Report { cpu, ran_on, sum });
            })
            .map_err(|e| format!("cannot spawn the task for CPU {cpu}: {e}"))?;
        handles.push(h);
    }
    drop(tx);
    let start = Instant::now();
    let mut got: Vec<Report> = Vec::new();
    while got.len() < cpus.len() {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(r) => got.push(r),
            Err(_) => {
                let missing: Vec<usize> = cpus
                    .iter()
                    .copied()
                    .filter(|c| !got.iter().any(|r| r.cpu == *c))
                    .collect();
                return Err(format!(
                    "no report within {} s from the tasks pinned to CPUs {missing:?} (online {cpus:?}); {}",
                    DEADLINE.as_secs(),
                    ipi_counts()
                ));
            }
        }
    }
    for h in handles {
        let _ = h.join();
    }
    got.sort_by_key(|r| r.cpu);
    let mut parts = Vec::new();
    for r in &got {
        match &r.ran_on {
            Ok(on) if *on == r.cpu => {}
            Ok(on) => return Err(format!("the task pinned to CPU {} ran on CPU {on}", r.cpu)),
            Err(e) => return Err(format!("the task for CPU {}: {e}", r.cpu)),
        }
        if r.sum != work(r.cpu as u64 + 1) {
            return Err(format!("the task on CPU {} computed a wrong sum", r.cpu));
        }
        parts.push(format!("cpu{}", r.cpu));
    }
    Ok(format!(
        "tasks on {} of {} online CPUs reported: {}; {}",
        got.len(),
        cpus.len(),
        parts.join(" "),
        ipi_counts()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1,3"), Ok(vec![0, 1, 3]));
        assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
        assert!(parse_cpu_list("1-0").is_err());
        assert!(parse_cpu_list("x").is_err());
    }

    #[test]
    fn smp_on_this_host() {
        // Every CPU of the test host runs its pinned task.
        let r = smp();
        assert!(r.is_ok(), "{r:?}");
    }
}
