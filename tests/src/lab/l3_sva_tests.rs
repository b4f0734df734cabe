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
        self.out.why(self.stopped.as_deref())
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
        Some(s) => format!("{s}; {e}"),
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

/// The fault path's counters in `vm.counters`: the bridge's `BridgeCounters`, which the
/// VMM shows in `_viommu` with a `bridge_` prefix (or, without any `bridge_` leaf, leaves
/// named exactly so), summed.
#[derive(Debug, Default, PartialEq, Eq)]
struct FaultCounters {
    /// `page_requests`: page requests read from the host fault queues.
    requests: u64,
    /// `page_responses_success` + `page_responses_invalid`: the guest's page group
    /// responses forwarded to the host.
    guest_responses: u64,
    /// `prq_full_answers`: Success answers of the VMM for a full guest PRQ (the device
    /// retries, and its retry is a new page request).
    full_answers: u64,
    /// `page_requests_refused` + `page_request_timeouts` + `page_requests_torn_down`: the
    /// VMM's Invalid answers, none of which a healthy run needs.
    invalid_answers: u64,
    /// `page_responses_unmatched`.
    unmatched: u64,
    /// The leaves used, `path=value`.
    paths: Vec<String>,
}

impl FaultCounters {
    fn read(counters: &Value) -> Self {
        let mut all = Vec::new();
        leaves(counters, "", &mut all);
        // The bridge's counters carry a `bridge_` prefix in `_viommu` (the model's own,
        // `model_page_requests` etc., count the PRQ's side and are not summed in).
        let bridged = all.iter().any(|(p, _)| {
            p.rsplit('.')
                .next()
                .is_some_and(|l| l.starts_with("bridge_"))
        });
        let mut c = FaultCounters::default();
        for (p, n) in all {
            let last = p.rsplit('.').next().unwrap_or(&p);
            let name = if bridged {
                match last.strip_prefix("bridge_") {
                    Some(n) => n,
                    None => continue,
                }
            } else {
                last
            };
            let slot = match name {
                "page_requests" => &mut c.requests,
                "page_responses_success" | "page_responses_invalid" => &mut c.guest_responses,
                "prq_full_answers" => &mut c.full_answers,
                "page_requests_refused" | "page_request_timeouts" | "page_requests_torn_down" => {
                    &mut c.invalid_answers
                }
                "page_responses_unmatched" => &mut c.unmatched,
                _ => continue,
            };
            *slot = slot.saturating_add(n);
            c.paths.push(format!("{p}={n}"));
        }
        c
    }

    /// Every page request answered: by the guest, or with a retry for a full queue.
    fn check(&self) -> Result<(), String> {
        ensure!(
            !self.paths.is_empty(),
            "vm.counters shows no page request counters (page_requests, page_responses_*)"
        );
        ensure!(
            self.requests > 0,
            "vm.counters counts no page requests although the guest's copy into untouched pages succeeded: {:?}",
            self.paths
        );
        ensure!(
            self.guest_responses > 0,
            "vm.counters counts no page response of the guest: {:?}",
            self.paths
        );
        ensure!(
            self.requests == self.guest_responses + self.full_answers,
            "vm.counters: {} page request(s), but {} guest response(s) and {} queue-full answer(s): {:?}",
            self.requests,
            self.guest_responses,
            self.full_answers,
            self.paths
        );
        ensure!(
            self.invalid_answers == 0,
            "vm.counters: the VMM itself answered {} page request(s) Invalid (refused, timed out or torn down): {:?}",
            self.invalid_answers,
            self.paths
        );
        Ok(())
    }
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
    // The other answer of L3's handler: no VMA behind the address, Invalid, PAGE_FAULT.
    let invalid = guest_result(r, "sva_iopf_invalid")?;
    println!("LAB-INFO L3 SVA copy from an unmapped source: {invalid}");
    let counters = match &r.counters {
        Some(c) => c.as_ref().map_err(Clone::clone)?,
        None => return Err(format!("no vm.counters snapshot: {}", r.why())),
    };
    let c = FaultCounters::read(counters);
    c.check()
        .map_err(|e| format!("{e}; vm.counters: {}", compact(counters)))?;
    println!(
        "LAB-INFO vm.counters: {} page request(s), {} guest response(s), {} queue-full answer(s): {:?}",
        c.requests, c.guest_responses, c.full_answers, c.paths
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
    fn fault_counters_are_read_and_checked() {
        let ok = json!({"_viommu": {"bridge_page_requests": 5, "bridge_page_responses_success": 3,
            "bridge_page_responses_invalid": 1, "bridge_prq_full_answers": 1,
            "bridge_page_request_timeouts": 0, "bridge_page_requests_refused": 0,
            "bridge_page_requests_torn_down": 0, "bridge_page_responses_unmatched": 0,
            "bridge_shadow_map_calls": 7, "model_page_requests": 5, "model_page_responses": 4}});
        let c = FaultCounters::read(&ok);
        assert_eq!((c.requests, c.guest_responses, c.full_answers), (5, 4, 1));
        assert!(c.check().is_ok());
        let short = json!({"page_requests": 4, "page_responses_success": 3});
        assert!(FaultCounters::read(&short).check().is_err());
        let timed_out = json!({"page_requests": 2, "page_responses_success": 1,
            "page_request_timeouts": 1});
        assert!(FaultCounters::read(&timed_out).check().is_err());
        let none = json!({"viommu": {"guest_qi_descriptors": 9}});
        assert!(FaultCounters::read(&none).check().is_err());
        let zero = json!({"page_requests": 0, "page_responses_success": 0});
        assert!(FaultCounters::read(&zero).check().is_err());
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
