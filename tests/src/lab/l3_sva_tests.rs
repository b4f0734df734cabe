//! Lab tests with a Linux L3 guest whose own SVA code drives ioasid-vmm's emulated SVA copy
//! engine through ioasid-vmm's emulated VT-d: L3's intel-iommu (scalable mode, first stage,
//! PASID, ATS, PRI), `iommu_sva_bind_device()` in the test module `sva_copy.ko`
//! (tests/l3-module, carried in the L3 initramfs by scripts/lab/run.sh), L3's PRQ handler
//! and iopf queue answering the device's page requests.
//!
//! One boot serves the three tests: the guest (`l3.tasks=sva-copy,sva-iopf,sva-two-procs,
//! sva-ready`) loads the module and runs its copies; when it is done the L2 side reads the
//! VMM's `vm.counters` over REST and stops the VMM. Each test checks its own facts: the
//! guest's verified data and, for the page faults, the VMM's page request and response
//! counters.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::l3_tests::{l3_cmdline, remote, tail, L3Outcome, L3Session, REMOTE_BIN};
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// The vIOMMU for Linux SVA: scalable mode, first stage (SVA binds the process's page
/// tables as a first-stage table), 20-bit PASIDs, page requests (ECAP.PRS/PDS) and ATS.
pub const PLATFORM: &str = "viommu=vtd,scalable-mode=on,fsts=on,pasid-bits=20,svm=on";
/// The copy engine (SVA-ABI.md: 1234:5a5a) behind the vIOMMU.
pub const DEVICE: &str = "emulated=sva-copy,id=sva0,iommu=on";
/// What L3's command line adds: intel-iommu on in scalable mode, and 4-level paging
/// (`no5lvl`): Linux's `intel_svm_check` refuses SVM on a CPU with LA57 unless the unit has
/// CAP.FL5LP, which our unit sets only with a 57-bit address width, and the lab's L2 CPU
/// (`-cpu max` under TCG) may pass LA57 on to L3.
pub const CMDLINE_MORE: &str = "intel_iommu=on,sm_on no5lvl";
/// The guest's tasks.
pub const TASKS: &str = "sva-copy,sva-iopf,sva-two-procs,sva-ready";

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "linux_guest_sva_bind_and_copy",
            run: linux_guest_sva_bind_and_copy,
        },
        LabTest {
            name: "linux_guest_sva_iopf",
            run: linux_guest_sva_iopf,
        },
        LabTest {
            name: "linux_guest_sva_two_processes_isolated",
            run: linux_guest_sva_two_processes_isolated,
        },
    ]
}

/// What the one SVA boot left behind.
#[derive(Debug)]
pub struct SvaRun {
    /// The guest's console and the VMM's exit.
    pub out: L3Outcome,
    /// `vm.counters` once the guest finished its copies.
    pub counters: Option<Result<Value, String>>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
}

impl SvaRun {
    fn why(&self) -> String {
        format!(
            "{}{}; serial tail: {}; VMM log tail: {}",
            self.stopped
                .as_ref()
                .map(|s| format!("{s}; "))
                .unwrap_or_default(),
            self.out.describe_exit(),
            tail(&self.out.serial, 10),
            tail(&self.out.vmm_log, 10)
        )
    }
}

fn run() -> &'static Result<SvaRun, String> {
    static RUN: OnceLock<Result<SvaRun, String>> = OnceLock::new();
    RUN.get_or_init(boot)
}

fn boot() -> Result<SvaRun, String> {
    ensure!(
        Path::new(REMOTE_BIN).exists(),
        "{REMOTE_BIN} is missing from the L2 initramfs"
    );
    let sock = PathBuf::from("/tmp/l3-sva.sock");
    let _ = std::fs::remove_file(&sock);
    let extra = [
        "--platform",
        PLATFORM,
        "--api-socket",
        &sock.display().to_string(),
        "--cpus",
        "boot=1",
    ]
    .map(str::to_string);
    let mut vm = L3Session::start_cmdline(
        "sva",
        &l3_cmdline(TASKS, CMDLINE_MORE),
        &[DEVICE.to_string()],
        &extra,
    )?;
    let ready = vm.wait_serial("L3-READY sva-done", Duration::from_secs(600));
    let counters = ready.then(|| {
        remote(&sock, &["counters"]).and_then(|t| {
            serde_json::from_str(&t).map_err(|e| format!("vm.counters: bad JSON ({e}): {t}"))
        })
    });
    if let Err(e) = remote(&sock, &["shutdown-vmm"]) {
        println!("LAB-INFO sva: shutdown-vmm: {e}");
    }
    let out = vm.finish(Duration::from_secs(60));
    let stopped = (!ready).then(|| early_stop(&out));
    Ok(SvaRun {
        out,
        counters,
        stopped,
    })
}

/// Why the guest never finished, in words: most of all, a VMM that does not know the copy
/// engine or the SVA platform options yet (the device and host work not merged).
fn early_stop(out: &L3Outcome) -> String {
    let log = out.vmm_log.to_ascii_lowercase();
    let refused = out.status.is_some_and(|c| c != 0)
        && out.serial.trim().is_empty()
        && (log.contains("sva-copy")
            || log.contains("emulated")
            || log.contains("--device")
            || log.contains("svm"));
    if refused {
        format!(
            "ioasid-vmm refused `--device {DEVICE}` or `--platform {PLATFORM}` (is the SVA copy engine and its VMM side merged?): {}",
            tail(&out.vmm_log, 4)
        )
    } else if out.serial.trim().is_empty() {
        "the L3 guest printed nothing".to_string()
    } else {
        "the guest never finished its SVA tasks (no L3-READY sva-done)".to_string()
    }
}

/// The run, or why it could not start.
fn the_run() -> Result<&'static SvaRun, String> {
    run().as_ref().map_err(Clone::clone)
}

/// The detail of the guest's `L3-RESULT name PASS`, with the run's state on failure.
fn guest_result(r: &SvaRun, name: &str) -> Result<String, String> {
    r.out.result(name).map_err(|e| match &r.stopped {
        Some(s) => format!("{e} ({s})"),
        None => e,
    })
}

// --- reading vm.counters -----------------------------------------------------------------

/// Every numeric leaf of `v` with its dotted path, lower case.
fn leaves(v: &Value, path: &str, out: &mut Vec<(String, u64)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.to_ascii_lowercase()
                } else {
                    format!("{path}.{}", k.to_ascii_lowercase())
                };
                leaves(x, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => {
            if let Some(n) = v.as_u64() {
                out.push((path.to_string(), n));
            }
        }
    }
}

/// The page-request counters of `vm.counters`: (requests, responses, the paths used).
/// Requests: a leaf about page requests (`page_req...`, `prq...`) whose name says request
/// and not response, queue-full, timeout, drop or pending. Responses: a leaf about page
/// requests or page group responses whose name says response; a total (`..._responses`)
/// when shown, else the sum of the per-code leaves. Queue-full answers and timeouts are
/// the VMM's own answers and are counted apart, not as the guest's responses.
fn page_request_counters(counters: &Value) -> (u64, u64, Vec<String>) {
    let mut all = Vec::new();
    leaves(counters, "", &mut all);
    let about_prq = |p: &str| {
        p.contains("page_req")
            || p.contains("page_resp")
            || p.contains("prq")
            || p.contains("page_group")
            || p.contains("iopf")
    };
    let last = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
    let vmm_answer = |l: &str| {
        [
            "full",
            "timeout",
            "timed_out",
            "drop",
            "pending",
            "outstanding",
        ]
        .iter()
        .any(|x| l.contains(x))
    };
    let mut used = Vec::new();
    let mut requests = 0u64;
    for (p, n) in &all {
        let l = last(p);
        if about_prq(p)
            && (l.contains("request") || l.ends_with("reqs"))
            && !l.contains("resp")
            && !vmm_answer(&l)
        {
            requests = requests.saturating_add(*n);
            used.push(format!("{p}={n}"));
        }
    }
    let resp: Vec<&(String, u64)> = all
        .iter()
        .filter(|(p, _)| about_prq(p) && last(p).contains("resp") && !vmm_answer(&last(p)))
        .collect();
    let totals: Vec<&&(String, u64)> = resp
        .iter()
        .filter(|(p, _)| {
            let l = last(p);
            l == "responses" || l.ends_with("_responses") || l == "responses_total"
        })
        .collect();
    let responses = if totals.is_empty() {
        resp.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n))
    } else {
        totals.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n))
    };
    let shown: Vec<String> = if totals.is_empty() {
        resp.iter().map(|(p, n)| format!("{p}={n}")).collect()
    } else {
        totals.iter().map(|(p, n)| format!("{p}={n}")).collect()
    };
    used.extend(shown);
    (requests, responses, used)
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 800 {
        format!("{}...", &s[..800])
    } else {
        s
    }
}

// --- the tests -----------------------------------------------------------------------

fn linux_guest_sva_bind_and_copy() -> TestResult {
    let r = the_run()?;
    let detail = guest_result(r, "sva_bind_and_copy")?;
    println!("LAB-INFO L3 SVA copy: {detail}");
    Ok(Outcome::Pass)
}

fn linux_guest_sva_iopf() -> TestResult {
    let r = the_run()?;
    let detail = guest_result(r, "sva_iopf")?;
    println!("LAB-INFO L3 SVA copy into untouched pages: {detail}");
    match guest_result(r, "sva_iopf_invalid") {
        Ok(d) => println!("LAB-INFO L3 SVA copy from an unmapped source: {d}"),
        Err(e) => println!("LAB-INFO L3 SVA copy from an unmapped source (not required): {e}"),
    }
    let counters = match &r.counters {
        Some(c) => c.as_ref().map_err(Clone::clone)?,
        None => return Err(format!("no vm.counters snapshot: {}", r.why())),
    };
    let (requests, responses, paths) = page_request_counters(counters);
    ensure!(
        requests > 0,
        "vm.counters shows no page requests although the guest's copy into untouched pages succeeded ({paths:?}): {}",
        compact(counters)
    );
    ensure!(
        responses == requests,
        "vm.counters shows {requests} page request(s) but {responses} response(s) ({paths:?})"
    );
    println!(
        "LAB-INFO vm.counters: {requests} page request(s), {responses} response(s): {paths:?}"
    );
    Ok(Outcome::Pass)
}

fn linux_guest_sva_two_processes_isolated() -> TestResult {
    let r = the_run()?;
    let detail = guest_result(r, "sva_two_processes_isolated")?;
    println!("LAB-INFO L3 two SVA processes: {detail}");
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn page_request_counters_in_several_shapes() {
        let a = json!({"_viommu": {"prq_page_requests": 5, "prq_responses_success": 4,
            "prq_responses_invalid": 1, "prq_queue_full_answers": 2, "prq_timeouts": 0}});
        let (req, resp, _) = page_request_counters(&a);
        assert_eq!((req, resp), (5, 5));
        let b = json!({"viommu": {"page_requests": 3, "page_responses": 3,
            "page_responses_by_code": {"success": 3, "invalid": 0}}});
        let (req, resp, _) = page_request_counters(&b);
        assert_eq!((req, resp), (3, 3));
        let none = json!({"viommu": {"guest_qi_descriptors": 9}});
        assert_eq!(page_request_counters(&none).0, 0);
    }

    #[test]
    fn refusal_is_named() {
        let out = L3Outcome {
            status: Some(2),
            serial: String::new(),
            vmm_log: "error: invalid value 'emulated=sva-copy,id=sva0' for '--device'".into(),
            elapsed: Duration::from_millis(5),
        };
        assert!(early_stop(&out).contains("merged"));
        let hung = L3Outcome {
            status: None,
            serial: "L3-INIT kernel 7.3.4".into(),
            vmm_log: String::new(),
            elapsed: Duration::from_secs(600),
        };
        assert!(early_stop(&hung).contains("never finished"));
    }
}
