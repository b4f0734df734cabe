//! Lab tests with a Linux L3 guest behind ioasid-vmm's emulated VT-d: the guest's own
//! intel-iommu driver is the client of our unit, and edu's DMA takes the whole path: L3's
//! intel-iommu, our VT-d model, our shadow of the guest's second-stage tables, L2's iommufd,
//! QEMU's VT-d, edu.
//!
//! One boot serves the three tests. The guest (`l3.tasks=viommu,edu-viommu,viommu-unplug`
//! with `intel_iommu=on,sm_on`) checks the DMAR unit and edu's group, runs edu's DMA through
//! its own VFIO (type1, then iommufd), then waits to be unplugged. The L2 side reads the
//! VMM's `vm.iommu`, `vm.counters` and `vm.ioasids` over REST when the guest is ready for
//! the unplug, removes edu with `ioasid-remote remove-device`, reads them again once the
//! guest has checked itself after the eject, and stops the VMM. Each test then checks its
//! own facts of that run: the data the guest and the VMM reported, never our log lines.
//!
//! The VMM side reads the REST replies by meaning, not by one fixed schema (see
//! [`registers`], [`device_mode`], [`counter`]): the vIOMMU's part of `vm.iommu` is a free
//! JSON object (`IommuInfo::viommu`).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use ioasid::caps::VtdEcap;
use serde_json::Value;

use super::env;
use super::l3_tests::{l3_cmdline, remote, L3Outcome, L3Session, REMOTE_BIN};
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// The vIOMMU the tests ask for: scalable mode, second stage only (a shadowed device must
/// not be offered first stage: Linux does not invalidate after first-stage maps).
pub const PLATFORM: &str = "viommu=vtd,scalable-mode=on,fsts=off";
/// edu's id in the VMM.
pub const DEVICE_ID: &str = "vedu0";
/// What L3's command line adds: intel-iommu on in scalable mode, and VFIO with a real IOMMU
/// although our unit has no interrupt remapping (type1 and iommufd refuse such a unit
/// unless told so).
pub const CMDLINE_MORE: &str = "intel_iommu=on,sm_on vfio_iommu_type1.allow_unsafe_interrupts=1 iommufd.allow_unsafe_interrupts=1";
/// The guest's tasks.
pub const TASKS: &str = "viommu,edu-viommu,viommu-unplug";

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "linux_guest_intel_iommu_binds_our_vtd",
            run: linux_guest_intel_iommu_binds_our_vtd,
        },
        LabTest {
            name: "linux_guest_edu_dma_through_viommu",
            run: linux_guest_edu_dma_through_viommu,
        },
        LabTest {
            name: "linux_guest_unplug_behind_viommu",
            run: linux_guest_unplug_behind_viommu,
        },
    ]
}

/// The VMM's state as its REST API reported it at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `vm.iommu`.
    pub iommu: Result<Value, String>,
    /// `vm.counters`.
    pub counters: Result<Value, String>,
    /// `vm.ioasids`.
    pub ioasids: Result<Value, String>,
}

fn query(sock: &Path, what: &str) -> Result<Value, String> {
    let text = remote(sock, &[what])?;
    serde_json::from_str(&text).map_err(|e| format!("ioasid-remote {what}: bad JSON ({e}): {text}"))
}

fn snapshot(sock: &Path) -> Snapshot {
    Snapshot {
        iommu: query(sock, "iommu"),
        counters: query(sock, "counters"),
        ioasids: query(sock, "ioasids"),
    }
}

/// What the one vIOMMU boot left behind.
#[derive(Debug)]
pub struct ViommuRun {
    /// The guest's console and the VMM's exit.
    pub out: L3Outcome,
    /// The VMM's state when the guest was ready for the unplug (after its DMA checks).
    pub before: Option<Snapshot>,
    /// The reply of `ioasid-remote remove-device`.
    pub removed: Option<Result<String, String>>,
    /// The VMM's state after the guest checked itself past the eject.
    pub after: Option<Snapshot>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
}

impl ViommuRun {
    fn why(&self) -> String {
        self.out.why(self.stopped.as_deref())
    }
}

fn run() -> &'static Result<ViommuRun, String> {
    static RUN: OnceLock<Result<ViommuRun, String>> = OnceLock::new();
    RUN.get_or_init(boot)
}

fn boot() -> Result<ViommuRun, String> {
    ensure!(
        Path::new(REMOTE_BIN).exists(),
        "{REMOTE_BIN} is missing from the L2 initramfs"
    );
    let edu = env::edu_path()?;
    let sock = PathBuf::from("/tmp/l3-viommu.sock");
    let _ = std::fs::remove_file(&sock);
    let devices = vec![format!("path={},iommu=on,id={DEVICE_ID}", edu.display())];
    let extra = [
        "--platform",
        PLATFORM,
        "--api-socket",
        &sock.display().to_string(),
    ]
    .map(str::to_string);
    let mut vm =
        L3Session::start_cmdline("viommu", &l3_cmdline(TASKS, CMDLINE_MORE), &devices, &extra)?;
    if !vm.wait_serial("L3-READY viommu-unplug", Duration::from_secs(420)) {
        return Ok(stop(
            vm,
            &sock,
            Some("the guest never got ready for the unplug".into()),
            None,
            None,
            None,
        ));
    }
    let before = snapshot(&sock);
    let removed = remote(&sock, &["remove-device", DEVICE_ID]);
    if removed.is_err() {
        return Ok(stop(
            vm,
            &sock,
            Some("remove-device failed".into()),
            Some(before),
            Some(removed),
            None,
        ));
    }
    if !vm.wait_serial("L3-READY viommu-done", Duration::from_secs(240)) {
        let after = snapshot(&sock);
        return Ok(stop(
            vm,
            &sock,
            Some("the guest did not finish its checks after the unplug".into()),
            Some(before),
            Some(removed),
            Some(after),
        ));
    }
    // The guest sees edu gone before the VMM handles the eject; give the teardown a moment.
    let deadline = Instant::now() + Duration::from_secs(60);
    let after = loop {
        let s = snapshot(&sock);
        if released(&s).is_ok() || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    Ok(stop(
        vm,
        &sock,
        None,
        Some(before),
        Some(removed),
        Some(after),
    ))
}

/// Ends the run: stops the VMM (the guest lingers after its last check; a guest stuck
/// early would only run into the deadline) and collects the outcome.
fn stop(
    vm: L3Session,
    sock: &Path,
    stopped: Option<String>,
    before: Option<Snapshot>,
    removed: Option<Result<String, String>>,
    after: Option<Snapshot>,
) -> ViommuRun {
    if let Err(e) = remote(sock, &["shutdown-vmm"]) {
        println!("LAB-INFO viommu: shutdown-vmm: {e}");
    }
    ViommuRun {
        out: vm.finish(Duration::from_secs(60)),
        before,
        removed,
        after,
        stopped,
    }
}

/// The run, or why it could not start.
fn the_run() -> Result<&'static ViommuRun, String> {
    run().as_ref().map_err(Clone::clone)
}

/// The detail of the guest's `L3-RESULT name PASS`, with the run's state on failure.
fn guest_result(r: &ViommuRun, name: &str) -> Result<String, String> {
    r.out.result(name).map_err(|e| match &r.stopped {
        Some(s) => format!("{e} ({s})"),
        None => e,
    })
}

// --- reading the REST replies ----------------------------------------------------------

/// A JSON number, or a string holding a decimal or `0x` hex number.
fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => {
            let s = s.trim();
            match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16).ok(),
                None => s.parse().ok(),
            }
        }
        _ => None,
    }
}

/// Every leaf of `v` with its dotted path (array elements as `[i]`).
fn leaves<'a>(v: &'a Value, path: &str, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(x, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => out.push((path.to_string(), v)),
    }
}

/// The raw `cap` and `ecap` registers the vIOMMU part of `vm.iommu` shows: leaves under
/// `viommu` whose key is `cap`/`ecap` (or `cap_reg`, `cap_raw`, `raw` under a `cap`
/// object, ...). Returns (path, value) pairs for each.
fn registers(iommu: &Value, reg: &str) -> Vec<(String, u64)> {
    let Some(v) = iommu.get("viommu") else {
        return Vec::new();
    };
    let mut all = Vec::new();
    leaves(v, "viommu", &mut all);
    let names = [
        reg.to_string(),
        format!("{reg}_reg"),
        format!("{reg}_raw"),
        format!("{reg}.raw"),
        format!("{reg}.value"),
    ];
    all.into_iter()
        .filter(|(p, _)| {
            let p = p.to_ascii_lowercase();
            names.iter().any(|n| p.ends_with(&format!(".{n}")))
        })
        .filter_map(|(p, v)| as_u64(v).map(|x| (p, x)))
        .collect()
}

/// The objects of `v` (at any depth) that name `id` in an `id` or `device` field.
fn objects_naming<'a>(v: &'a Value, id: &str, out: &mut Vec<&'a Value>) {
    match v {
        Value::Object(m) => {
            if ["id", "device"]
                .iter()
                .any(|k| m.get(*k).and_then(Value::as_str) == Some(id))
            {
                out.push(v);
            }
            for x in m.values() {
                objects_naming(x, id, out);
            }
        }
        Value::Array(a) => {
            for x in a {
                objects_naming(x, id, out);
            }
        }
        _ => {}
    }
}

/// The bridge mode `vm.iommu` gives device `id` for requests without PASID: the `mode` of
/// its `viommu.devices[]` entry with PASID 0 (`api::types::ViommuDevice`), else a `mode`
/// field of any object naming it.
fn device_mode(iommu: &Value, id: &str) -> Option<String> {
    let listed = iommu
        .get("viommu")
        .and_then(|v| v.get("devices"))
        .and_then(Value::as_array)
        .and_then(|a| {
            a.iter().find(|d| {
                d.get("id").and_then(Value::as_str) == Some(id)
                    && d.get("pasid").and_then(Value::as_u64).unwrap_or(0) == 0
            })
        })
        .and_then(|d| d.get("mode"))
        .and_then(Value::as_str);
    if let Some(m) = listed {
        return Some(m.to_ascii_lowercase());
    }
    let mut objs = Vec::new();
    objects_naming(iommu, id, &mut objs);
    objs.iter().find_map(|o| {
        let mut all = Vec::new();
        leaves(o, "", &mut all);
        all.into_iter()
            .find(|(p, _)| p == "mode" || p.ends_with(".mode"))
            .and_then(|(_, v)| v.as_str().map(str::to_ascii_lowercase))
    })
}

/// The sum of the counters whose path (lower case) satisfies `pick`, and their paths.
fn counter(counters: &Value, pick: impl Fn(&str) -> bool) -> (u64, Vec<String>) {
    let mut all = Vec::new();
    leaves(counters, "", &mut all);
    let mut sum = 0u64;
    let mut paths = Vec::new();
    for (p, v) in all {
        let lp = p.to_ascii_lowercase();
        if let (true, Some(n)) = (pick(&lp), v.as_u64()) {
            sum = sum.saturating_add(n);
            paths.push(format!("{p}={n}"));
        }
    }
    (sum, paths)
}

/// Guest invalidation descriptors the model consumed.
fn guest_invalidations(counters: &Value) -> (u64, Vec<String>) {
    counter(counters, |p| {
        (p.contains("inval") || p.contains("qi_desc") || p.contains("descriptor"))
            && (p.contains("guest") || p.contains("qi") || p.contains("desc"))
    })
}

/// Shadow map calls (not unmaps).
fn shadow_maps(counters: &Value) -> (u64, Vec<String>) {
    counter(counters, |p| {
        p.contains("shadow") && p.contains("map") && !p.contains("unmap")
    })
}

/// Whether `device` still has an attachment in `vm.ioasids`.
fn attached(ioasids: &Value, device: &str) -> bool {
    ioasids
        .get("attachments")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|x| x.get("device").and_then(Value::as_str) == Some(device))
        })
}

/// Shadow IOASes alive (the bridge's `shadow_ioases_live`, wherever `vm.counters` puts it);
/// `None` when no such counter is shown.
fn shadow_ioases_live(counters: &Value) -> Option<(u64, Vec<String>)> {
    let (n, paths) = counter(counters, |p| {
        p.contains("shadow") && p.contains("ioas") && p.contains("live")
    });
    (!paths.is_empty()).then_some((n, paths))
}

/// Ok when the snapshot shows edu's vIOMMU state released: no device entry or mode for it in
/// `vm.iommu`, no attachment in `vm.ioasids`.
fn released(s: &Snapshot) -> Result<(), String> {
    let iommu = s.iommu.as_ref().map_err(Clone::clone)?;
    let ioasids = s.ioasids.as_ref().map_err(Clone::clone)?;
    if let Some(mode) = device_mode(iommu, DEVICE_ID) {
        return Err(format!("vm.iommu still shows {DEVICE_ID} in mode {mode}"));
    }
    if attached(ioasids, DEVICE_ID) {
        return Err(format!(
            "vm.ioasids still shows an attachment of {DEVICE_ID}"
        ));
    }
    Ok(())
}

/// `key=0x..` from a guest result's detail (the first such word; trailing punctuation is
/// not part of the number).
fn detail_hex(detail: &str, key: &str) -> Option<u64> {
    detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim_start_matches("0x").trim_end_matches([':', ';', ',']))
        .and_then(|v| u64::from_str_radix(v, 16).ok())
}

/// An optional register value in words.
fn hex_or_none(v: Option<u64>) -> String {
    v.map_or_else(|| "none".to_string(), |x| format!("{x:#x}"))
}

fn compact(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 600 {
        format!("{}...", &s[..600])
    } else {
        s
    }
}

// --- the peer: the same guest tasks under QEMU's intel-iommu --------------------------

/// The L3 guest's vIOMMU tasks under QEMU (KVM in L2) with QEMU's own VT-d (scalable mode,
/// caching mode, second stage; QEMU shadows for VFIO as we do) and edu passed through with
/// iommufd. Only in `run.sh --mode bench`, which carries QEMU into L2. It shows the guest
/// side of the tests works against the reference VT-d, so a failure of the tests above
/// under ioasid-vmm points at our unit, not at the guest's checks.
pub fn peer_tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "peer_qemu_l3_viommu_guest_tasks",
        run: peer_qemu_l3_viommu_guest_tasks,
    }]
}

fn peer_qemu_l3_viommu_guest_tasks() -> TestResult {
    use super::bench::QEMU_BIN;
    use super::l3_tests::{wait_child, L3_INITRD, L3_KERNEL};
    use std::process::{Command, Stdio};

    ensure!(
        Path::new(QEMU_BIN).exists(),
        "{QEMU_BIN} is missing in L2 (run.sh --mode bench carries it)"
    );
    let edu = env::edu_path()?;
    let bdf = edu
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or("edu path has no BDF")?;
    let serial = Path::new("/tmp/l3-viommu-qemu.serial");
    let stderr = Path::new("/tmp/l3-viommu-qemu.stderr");
    let _ = std::fs::remove_file(serial);
    let start = Instant::now();
    let mut child = Command::new(QEMU_BIN)
        .args(["-accel", "kvm", "-cpu", "host", "-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-M", "q35", "-no-reboot"])
        .args(["-L", "/usr/share/qemu"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-kernel", L3_KERNEL, "-initrd", L3_INITRD])
        .arg("-append")
        .arg(l3_cmdline("viommu,edu-viommu", CMDLINE_MORE))
        .args([
            "-device",
            "intel-iommu,caching-mode=on,x-scalable-mode=on,aw-bits=39",
        ])
        .args(["-object", "iommufd,id=iofd0"])
        .arg("-device")
        .arg(format!("vfio-pci,host={bdf},iommufd=iofd0"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(stderr).map_err(|e| format!("{}: {e}", stderr.display()))?,
        ))
        .spawn()
        .map_err(|e| format!("cannot start {QEMU_BIN}: {e}"))?;
    let status = wait_child(&mut child, Duration::from_secs(300));
    let out = L3Outcome {
        status,
        serial: std::fs::read_to_string(serial).unwrap_or_default(),
        vmm_log: std::fs::read_to_string(stderr).unwrap_or_default(),
        elapsed: start.elapsed(),
    };
    for name in [
        "viommu_dmar",
        "viommu_edu_group",
        "edu_viommu_type1",
        "edu_viommu_iommufd",
    ] {
        let detail = out.result(name).map_err(|e| format!("under QEMU: {e}"))?;
        println!("LAB-INFO QEMU peer {name}: {detail}");
    }
    println!(
        "LAB-INFO QEMU peer: {}",
        out.describe_exit().replace("ioasid-vmm", "qemu")
    );
    Ok(Outcome::Pass)
}

// --- the tests -----------------------------------------------------------------------

fn linux_guest_intel_iommu_binds_our_vtd() -> TestResult {
    let r = the_run()?;
    let dmar = guest_result(r, "viommu_dmar")?;
    let group = guest_result(r, "viommu_edu_group")?;
    println!("LAB-INFO L3 DMAR: {dmar}");
    println!("LAB-INFO L3 edu group: {group}");
    let (Some(cap), Some(ecap)) = (detail_hex(&dmar, "cap"), detail_hex(&dmar, "ecap")) else {
        return Err(format!("the guest's DMAR detail lacks cap=/ecap=: {dmar}"));
    };
    let e = VtdEcap::decode(ecap);
    ensure!(
        !e.flts,
        "the guest sees ECAP.FSTS (ecap {ecap:#x}) although the VMM runs {PLATFORM}: Linux would use first stage, which it does not invalidate after maps"
    );
    let before = r
        .before
        .as_ref()
        .ok_or_else(|| format!("no vm.iommu snapshot: {}", r.why()))?;
    let iommu = before.iommu.as_ref().map_err(Clone::clone)?;
    for (name, guest) in [("cap", cap), ("ecap", ecap)] {
        let shown = registers(iommu, name);
        ensure!(
            !shown.is_empty(),
            "vm.iommu shows no raw {name} register of the vIOMMU: {}",
            compact(iommu)
        );
        ensure!(
            shown.iter().all(|(_, v)| *v == guest),
            "the guest's intel-iommu read {name} {guest:#x}, vm.iommu shows {shown:?}"
        );
    }
    let viommu = iommu.get("viommu").ok_or("vm.iommu has no viommu object")?;
    let base = viommu.get("register_base").and_then(as_u64);
    ensure!(
        base.is_some() && base == detail_hex(&dmar, "base"),
        "the guest's DMAR unit is at {}, vm.iommu's register_base is {}",
        hex_or_none(detail_hex(&dmar, "base")),
        hex_or_none(base)
    );
    ensure!(
        viommu.get("translation_enabled") == Some(&Value::Bool(true)),
        "vm.iommu says the guest did not enable translation (GSTS.TES): {}",
        compact(viommu)
    );
    let mode = device_mode(iommu, DEVICE_ID);
    ensure!(
        mode.as_deref() == Some("shadow"),
        "vm.iommu gives {DEVICE_ID} mode {mode:?}, want shadow (no host nesting in the lab): {}",
        compact(iommu)
    );
    // The unit's latched state, where vm.iommu shows it (the model's `VtdStatus`): the
    // root table in scalable mode (TTM 01b) and the invalidation queue on.
    let mut state = Vec::new();
    leaves(viommu, "viommu", &mut state);
    for (key, what, guest_side) in [
        (
            "scalable",
            "the latched root table in scalable mode",
            "sm_on with ECAP.SMTS",
        ),
        (
            "qi_enabled",
            "queued invalidation enabled",
            "its 'Using Queued invalidation' line",
        ),
    ] {
        match state.iter().find(|(p, _)| p.ends_with(&format!(".{key}"))) {
            Some((p, v)) => ensure!(
                **v == Value::Bool(true),
                "vm.iommu {p} is {v}: the guest's intel-iommu did not leave {what}"
            ),
            None => println!(
                "LAB-INFO vm.iommu shows no {key}: {what} is checked on the guest's side only ({guest_side})"
            ),
        }
    }
    println!("LAB-INFO vm.iommu: cap {cap:#x} ecap {ecap:#x}, {DEVICE_ID} mode shadow");
    Ok(Outcome::Pass)
}

fn linux_guest_edu_dma_through_viommu() -> TestResult {
    let r = the_run()?;
    let type1 = guest_result(r, "edu_viommu_type1")?;
    let iommufd = guest_result(r, "edu_viommu_iommufd")?;
    println!("LAB-INFO L3 edu DMA through type1: {type1}");
    println!("LAB-INFO L3 edu DMA through iommufd: {iommufd}");
    // L3's IOMMU_GET_HW_INFO reports the registers of the unit its intel-iommu drives.
    if let Ok(dmar) = guest_result(r, "viommu_dmar") {
        let hw_info = iommufd.split_once("hw_info ").map_or("", |(_, rest)| rest);
        for reg in ["cap", "ecap"] {
            let probe = detail_hex(&dmar, reg);
            let hw = detail_hex(hw_info, reg);
            ensure!(
                probe.is_some() && probe == hw,
                "L3's IOMMU_GET_HW_INFO gives {reg} {}, its intel-iommu probed {}",
                hex_or_none(hw),
                hex_or_none(probe)
            );
        }
    }
    let before = r
        .before
        .as_ref()
        .ok_or_else(|| format!("no vm.counters snapshot: {}", r.why()))?;
    let counters = before.counters.as_ref().map_err(Clone::clone)?;
    let (inv, inv_paths) = guest_invalidations(counters);
    let (maps, map_paths) = shadow_maps(counters);
    ensure!(
        inv > 0,
        "vm.counters shows no guest invalidation descriptors after the guest's maps and unmaps ({inv_paths:?}): {}",
        compact(counters)
    );
    ensure!(
        maps > 0,
        "vm.counters shows no shadow map calls after the guest's maps ({map_paths:?}): {}",
        compact(counters)
    );
    println!("LAB-INFO vm.counters: {inv_paths:?} {map_paths:?}");
    Ok(Outcome::Pass)
}

fn linux_guest_unplug_behind_viommu() -> TestResult {
    let r = the_run()?;
    let before = r
        .before
        .as_ref()
        .ok_or_else(|| format!("the guest never got to the unplug: {}", r.why()))?;
    match &r.removed {
        Some(Ok(reply)) => println!(
            "LAB-INFO remove-device answered: {}",
            reply.trim().replace('\n', " ")
        ),
        Some(Err(e)) => return Err(format!("{e}; {}", r.why())),
        None => return Err(format!("remove-device was not sent: {}", r.why())),
    }
    let removed = guest_result(r, "viommu_unplug_removed")?;
    let healthy = guest_result(r, "viommu_unplug_healthy")?;
    println!("LAB-INFO L3 after the unplug: {removed}; {healthy}");
    // Before: edu was behind the vIOMMU with a shadow IOAS (so their absence afterwards
    // means something).
    let iommu_before = before.iommu.as_ref().map_err(Clone::clone)?;
    let counters_before = before.counters.as_ref().map_err(Clone::clone)?;
    ensure!(
        device_mode(iommu_before, DEVICE_ID).is_some(),
        "before the unplug vm.iommu gives {DEVICE_ID} no mode: {}",
        compact(iommu_before)
    );
    let (live_before, paths) = shadow_ioases_live(counters_before).ok_or_else(|| {
        format!(
            "vm.counters shows no live shadow IOAS count: {}",
            compact(counters_before)
        )
    })?;
    ensure!(
        live_before > 0,
        "before the unplug vm.counters counts no live shadow IOAS ({paths:?}) although {DEVICE_ID} is shadowed"
    );
    let after = r
        .after
        .as_ref()
        .ok_or_else(|| format!("no snapshot after the unplug: {}", r.why()))?;
    released(after)?;
    let counters_after = after.counters.as_ref().map_err(Clone::clone)?;
    let (live_after, paths_after) = shadow_ioases_live(counters_after).unwrap_or_default();
    ensure!(
        live_after == 0,
        "after the unplug vm.counters still counts live shadow IOASes: {paths_after:?}"
    );
    let (errors, error_paths) = counter(counters_after, |p| {
        p.ends_with("host_errors") || p.ends_with("bridge_errors") || p.ends_with("queue_errors")
    });
    ensure!(
        errors == 0,
        "vm.counters shows errors of the vIOMMU path: {error_paths:?}"
    );
    println!(
        "LAB-INFO live shadow IOASes before/after the unplug: {live_before}/{live_after}; {}",
        r.out.describe_exit()
    );
    Ok(Outcome::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registers_are_found_in_several_shapes() {
        let a = json!({"viommu": {"cap": "0xd2008c22260286", "ecap": 123}});
        assert_eq!(
            registers(&a, "cap"),
            vec![("viommu.cap".into(), 0xd2_008c_2226_0286)]
        );
        assert_eq!(registers(&a, "ecap"), vec![("viommu.ecap".into(), 123)]);
        let b = json!({"viommu": {"units": [{"cap": {"raw": "0x10", "names": ["CM"]}}]}});
        assert_eq!(registers(&b, "cap").len(), 1);
        assert_eq!(registers(&b, "ecap"), vec![]);
        assert_eq!(registers(&json!({"devices": []}), "cap"), vec![]);
    }

    #[test]
    fn modes_counters_and_release() {
        let iommu =
            json!({"viommu": {"devices": [{"id": "vedu0", "mode": "Shadow"}]}, "devices": []});
        assert_eq!(device_mode(&iommu, "vedu0").as_deref(), Some("shadow"));
        assert_eq!(device_mode(&iommu, "other"), None);
        let c = json!({"viommu": {"guest_qi_descriptors": 7, "shadow_map_calls": 3, "shadow_unmap_calls": 2}});
        assert_eq!(guest_invalidations(&c).0, 7);
        assert_eq!(shadow_maps(&c).0, 3);
        assert_eq!(shadow_ioases_live(&c), None);
        let c2 = json!({"_viommu": {"bridge_shadow_ioases_live": 1, "bridge_shadow_map_calls": 4}});
        assert_eq!(shadow_ioases_live(&c2).map(|x| x.0), Some(1));
        assert_eq!(shadow_maps(&c2).0, 4);
        // The schema of api::types::ViommuInfo: the PASID 0 entry decides.
        let typed = json!({"viommu": {"devices": [
            {"id": "vedu0", "bdf": "0000:00:01.0", "pasid": 1, "mode": "nested"},
            {"id": "vedu0", "bdf": "0000:00:01.0", "pasid": 0, "mode": "shadow"}
        ]}});
        assert_eq!(device_mode(&typed, "vedu0").as_deref(), Some("shadow"));
        let ioasids = json!({"ioases": [{"id": 1}], "attachments": [{"device": "vedu0"}]});
        let s = Snapshot {
            iommu: Ok(iommu),
            counters: Ok(c),
            ioasids: Ok(ioasids),
        };
        assert!(released(&s).is_err());
        let gone = Snapshot {
            iommu: Ok(json!({"viommu": {"devices": []}})),
            counters: Ok(json!({})),
            ioasids: Ok(json!({"ioases": [], "attachments": []})),
        };
        assert!(released(&gone).is_ok());
    }

    #[test]
    fn detail_hex_reads_guest_details() {
        let d = "unit=dmar0 base=0xfed90000 ver=1:0 cap=0xd2008c22260286 ecap=0xf00f5e";
        assert_eq!(detail_hex(d, "cap"), Some(0xd2_008c_2226_0286));
        assert_eq!(detail_hex(d, "ecap"), Some(0xf0_0f5e));
        assert_eq!(detail_hex(d, "nope"), None);
        let t = "iommufd /dev/vfio/devices/vfio0 hw_info cap=0xd2038c222f0686 ecap=0x1480000000f42: 4096 bytes";
        assert_eq!(detail_hex(t, "ecap"), Some(0x1_4800_0000_0f42));
    }
}
