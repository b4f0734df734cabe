//! Lab tests of the REST API with real devices: `/bin/ioasid-vmm` runs an idle payload VM
//! (`hlt; jmp $-1` with the in-kernel irqchip, 64 MiB) with `--api-socket`, and edu (bound to
//! vfio-pci) and the mtty mdev are added and removed over the socket, by sysfs path and by a
//! VFIO cdev fd passed with `SCM_RIGHTS`. A payload VM has no ACPI, so removal is immediate:
//! these tests are about the host side (fds, IOAS mappings, PASIDs); the L3 test
//! `linux_guest_hotplug_via_rest` covers the guest side.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::{ApiClient, ClientResponse};
use api::routes::HttpMethod;
use serde_json::Value;

use super::env;
use super::l3_tests::{remote, tail, VMM_BIN};
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// `hlt; jmp $-1`: with the in-kernel irqchip the guest idles in KVM until stopped.
pub const IDLE_PAYLOAD: [u8; 3] = [0xf4, 0xeb, 0xfd];
/// How long one request or the VMM's start may take before the test gives up (a hang breaker).
const GUARD: Duration = Duration::from_secs(60);
/// Add/remove cycles of the churn test.
const CHURN: usize = 200;

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "api_add_device_fd_passing",
            run: api_add_device_fd_passing,
        },
        LabTest {
            name: "api_bad_inputs_state_unchanged_lab",
            run: api_bad_inputs_state_unchanged_lab,
        },
        LabTest {
            name: "api_hotplug_churn_no_leaks",
            run: api_hotplug_churn_no_leaks,
        },
    ]
}

/// A payload VM under `/bin/ioasid-vmm` with its API socket; shut down (or killed) on drop.
pub struct LabVmm {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    client: ApiClient,
}

impl LabVmm {
    /// Starts the VMM (RAM `memory`, e.g. `size=64M`) and waits until it answers `vmm.ping`.
    pub fn start(name: &str, memory: &str) -> Result<LabVmm, String> {
        let payload = PathBuf::from("/tmp/api-idle.bin");
        std::fs::write(&payload, IDLE_PAYLOAD)
            .map_err(|e| format!("cannot write {}: {e}", payload.display()))?;
        let args = [
            "--payload".to_string(),
            format!("{},mode=real,irqchip=on", payload.display()),
            "--memory".into(),
            memory.into(),
            "--serial".into(),
            "off".into(),
        ];
        LabVmm::start_with(name, &args)
    }

    /// Starts the VMM with `args` and `--api-socket` (no `args`: an empty VMM that waits for
    /// `vm.create`) and waits until it answers `vmm.ping`.
    pub fn start_with(name: &str, args: &[String]) -> Result<LabVmm, String> {
        ensure!(Path::new(VMM_BIN).exists(), "{VMM_BIN} is missing from L2");
        ensure!(Path::new("/dev/kvm").exists(), "/dev/kvm is absent in L2");
        let sock = PathBuf::from(format!("/tmp/api-{name}.sock"));
        let log = PathBuf::from(format!("/tmp/api-{name}.log"));
        let log_file =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = Command::new(VMM_BIN)
            .args(args)
            .arg("--api-socket")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .map_err(|e| format!("cannot start {VMM_BIN}: {e}"))?;
        let client = ApiClient::new(&sock).with_timeout(GUARD);
        let mut vmm = LabVmm {
            child,
            sock,
            log,
            client,
        };
        let start = Instant::now();
        loop {
            if let Ok(r) = vmm.client.request(HttpMethod::Get, "vmm.ping", None, &[]) {
                ensure!(
                    r.status == 200,
                    "vmm.ping: {} {}",
                    r.status,
                    r.error_message()
                );
                return Ok(vmm);
            }
            if let Ok(Some(st)) = vmm.child.try_wait() {
                return Err(format!(
                    "ioasid-vmm exited ({st}) before answering; log: {}",
                    tail(&vmm.log(), 10)
                ));
            }
            if start.elapsed() > GUARD {
                return Err(format!(
                    "ioasid-vmm did not answer vmm.ping within {GUARD:?}; log: {}",
                    tail(&vmm.log(), 10)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket path.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The VMM's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One request; transport errors become `Err`.
    pub fn call(
        &self,
        method: HttpMethod,
        endpoint: &str,
        body: Option<&str>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ClientResponse, String> {
        self.client
            .request(method, endpoint, body.map(str::as_bytes), fds)
            .map_err(|e| format!("{method:?} {endpoint}: {}", crate::harness::chain(&e)))
    }

    /// A GET that must answer 200 with JSON.
    pub fn get(&self, endpoint: &str) -> Result<Value, String> {
        let r = self.call(HttpMethod::Get, endpoint, None, &[])?;
        ensure!(
            r.status == 200,
            "GET {endpoint}: {} {}",
            r.status,
            r.error_message()
        );
        r.json()
            .map_err(|e| format!("GET {endpoint}: not JSON: {e}"))
    }

    /// `vm.add-device` that must succeed; returns `(id, bdf)`.
    pub fn add(&self, body: &str, fds: &[BorrowedFd<'_>]) -> Result<(String, String), String> {
        let r = self.call(HttpMethod::Put, "vm.add-device", Some(body), fds)?;
        ensure!(
            r.status == 200,
            "vm.add-device {body}: {} {}; log: {}",
            r.status,
            r.error_message(),
            tail(&self.log(), 6)
        );
        let v = r
            .json()
            .map_err(|e| format!("vm.add-device: not JSON: {e}"))?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let bdf = v["bdf"].as_str().unwrap_or_default().to_string();
        ensure!(
            !id.is_empty() && !bdf.is_empty(),
            "vm.add-device reply: {v}"
        );
        Ok((id, bdf))
    }

    /// `vm.remove-device` that must answer 204.
    pub fn remove(&self, id: &str) -> Result<(), String> {
        let body = format!(r#"{{"id":"{id}"}}"#);
        let r = self.call(HttpMethod::Put, "vm.remove-device", Some(&body), &[])?;
        ensure!(
            r.status == 204,
            "vm.remove-device {id}: {} {}; log: {}",
            r.status,
            r.error_message(),
            tail(&self.log(), 6)
        );
        Ok(())
    }

    /// The introspection a bad request must leave unchanged.
    pub fn snapshot(&self) -> Result<Vec<(&'static str, Value)>, String> {
        let mut v = Vec::new();
        for e in [
            "vm.info",
            "vm.iommu",
            "vm.ioasids",
            "vm.pasids",
            "vm.counters",
        ] {
            v.push((e, self.get(e)?));
        }
        Ok(v)
    }

    /// The VMM's open fds as sorted `fd -> target` lines, once the list is stable (the API
    /// server closes a finished connection's socket asynchronously).
    pub fn fds(&self) -> Vec<String> {
        let list = || {
            let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            let t = std::fs::read_link(e.path()).unwrap_or_default();
                            format!("{} -> {}", e.file_name().to_string_lossy(), t.display())
                        })
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        let mut last = list();
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = list();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }

    /// `vm.shutdown` (the API stays up and reports the VM shut down), then `vmm.shutdown`:
    /// the process must exit with 0 and remove its socket.
    pub fn shutdown(self) -> Result<(), String> {
        let r = self.call(HttpMethod::Put, "vm.shutdown", None, &[])?;
        ensure!(
            r.status == 204,
            "vm.shutdown: {} {}",
            r.status,
            r.error_message()
        );
        let state = self.get("vm.info")?["state"].clone();
        ensure!(
            state == "Shutdown",
            "vm.info after vm.shutdown: state {state}"
        );
        self.vmm_shutdown()
    }

    /// `vmm.shutdown`: the process must exit with 0 and remove its socket.
    pub fn vmm_shutdown(mut self) -> Result<(), String> {
        let r = self.call(HttpMethod::Put, "vmm.shutdown", None, &[])?;
        ensure!(
            r.status == 204,
            "vmm.shutdown: {} {}",
            r.status,
            r.error_message()
        );
        let start = Instant::now();
        let status = loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                break st;
            }
            if start.elapsed() > GUARD {
                return Err(format!(
                    "ioasid-vmm did not exit within {GUARD:?} of vmm.shutdown"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(
            status.code() == Some(0),
            "ioasid-vmm exited with {status} after vmm.shutdown; log: {}",
            tail(&self.log(), 8)
        );
        ensure!(
            !self.sock.exists(),
            "{} is still there after the VMM exited",
            self.sock.display()
        );
        Ok(())
    }
}

impl Drop for LabVmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The VFIO cdev (`/dev/vfio/devices/vfioN`) of the device at sysfs `dev`.
pub fn cdev_of(dev: &Path) -> Result<PathBuf, String> {
    let dir = dev.join("vfio-dev");
    let name = std::fs::read_dir(&dir)
        .map_err(|e| {
            format!(
                "{}: {e} (is the device bound to a VFIO driver?)",
                dir.display()
            )
        })?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vfio"))
        .ok_or_else(|| format!("no vfioN under {}", dir.display()))?;
    Ok(PathBuf::from("/dev/vfio/devices").join(name))
}

/// Opens `path` read-write *without* close-on-exec, so a child (ioasid-remote) inherits it.
fn open_inheritable(path: &Path) -> Result<OwnedFd, String> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDWR) };
    if fd < 0 {
        return Err(format!(
            "open {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The fds of `fds` that point at VFIO or iommufd files.
pub fn vfio_links(fds: &[String]) -> Vec<String> {
    fds.iter()
        .filter(|l| l.contains("/dev/vfio") || l.contains("/dev/iommu"))
        .cloned()
        .collect()
}

/// The one fd the VMM opens with its first VFIO device and keeps for the VM's life: the
/// KVM-VFIO pseudo device (`KVM_CREATE_DEVICE` has no destroy; it goes with the VM).
const KVM_VFIO: &str = "anon_inode:kvm-vfio";

/// Whether `after` is `before` plus, at most, the VM's one KVM-VFIO device.
fn vm_scoped(after: &[String], before: &[String]) -> bool {
    let strip = |v: &[String]| -> Vec<String> {
        v.iter()
            .filter(|l| !l.ends_with(KVM_VFIO))
            .cloned()
            .collect()
    };
    let extra = after.iter().filter(|l| l.ends_with(KVM_VFIO)).count();
    extra <= 1 + before.iter().filter(|l| l.ends_with(KVM_VFIO)).count()
        && strip(after) == strip(before)
}

/// Checks that `vm.ioasids` shows `id` attached to an IOAS with all of the VM's RAM mapped.
fn check_attached(vmm: &LabVmm, id: &str, ram: u64) -> Result<(), String> {
    let io = vmm.get("vm.ioasids")?;
    let ioas = &io["ioases"][0];
    let ioas_id = ioas["id"].as_u64();
    ensure!(ioas_id.is_some(), "vm.ioasids has no IOAS: {io}");
    ensure!(
        ioas["mappings"].as_u64().unwrap_or(0) > 0 && ioas["mapped_bytes"].as_u64() == Some(ram),
        "vm.ioasids: the IOAS does not map the VM's {ram} bytes of RAM: {io}"
    );
    let attached = io["attachments"].as_array().is_some_and(|a| {
        a.iter()
            .any(|x| x["device"] == id && x["pt_id"].as_u64() == ioas_id)
    });
    ensure!(
        attached,
        "vm.ioasids has no attachment of {id} to IOAS {ioas_id:?}: {io}"
    );
    Ok(())
}

/// Checks that no device, IOAS mapping, attachment or PASID is left.
fn check_empty(vmm: &LabVmm) -> Result<(), String> {
    let io = vmm.get("vm.ioasids")?;
    let mapped: u64 = io["ioases"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["mapped_bytes"].as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    ensure!(mapped == 0, "IOAS mappings left: {io}");
    ensure!(
        io["attachments"].as_array().is_none_or(|a| a.is_empty()),
        "attachments left: {io}"
    );
    let pasids = vmm.get("vm.pasids")?;
    ensure!(
        pasids["entries"].as_array().is_none_or(|a| a.is_empty()),
        "PASID bindings left: {pasids}"
    );
    let info = vmm.get("vm.info")?;
    ensure!(
        info["device_tree"].as_object().is_none_or(|m| m.is_empty()),
        "devices left in vm.info: {}",
        info["device_tree"]
    );
    Ok(())
}

const RAM: u64 = 64 << 20;

fn api_add_device_fd_passing() -> TestResult {
    let edu = env::edu_path()?;
    let cdev = cdev_of(&edu)?;
    let vmm = LabVmm::start("fd", "size=64M")?;
    let fds_before = vmm.fds();

    // 1. The library client: our open cdev goes over with SCM_RIGHTS, and we close our
    //    copy (a VFIO cdev stays bound to the iommufd as long as any copy of the open file
    //    lives, so a client must not keep it).
    let file = open_inheritable(&cdev)?;
    let (id, bdf) = vmm.add(
        &format!(r#"{{"fd":{},"id":"edu_fd"}}"#, file.as_raw_fd()),
        &[file.as_fd()],
    )?;
    drop(file);
    ensure!(id == "edu_fd", "reply id {id}");
    println!(
        "LAB-INFO edu added from cdev fd ({}) as {id} at {bdf}",
        cdev.display()
    );
    check_attached(&vmm, &id, RAM)?;
    let info = vmm.get("vm.info")?;
    ensure!(
        info["device_tree"][&id]["pci_bdf"] == bdf.as_str(),
        "vm.info device_tree lacks {id} at {bdf}: {}",
        info["device_tree"]
    );
    let host = info["device_tree"][&id]["resources"]
        .as_array()
        .and_then(|r| r.iter().find(|x| x["type"] == "host").cloned())
        .unwrap_or_default();
    let edu_bdf = edu
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    ensure!(
        host["device"]
            .as_str()
            .is_some_and(|d| d.contains(&edu_bdf)),
        "the VMM did not trace the fd back to {edu_bdf}: {host}"
    );
    let iommu = vmm.get("vm.iommu")?;
    ensure!(
        iommu["backend"] == "iommufd",
        "a cdev fd needs iommufd: {iommu}"
    );
    let links = vfio_links(&vmm.fds());
    ensure!(
        links.iter().any(|l| l.ends_with(&*cdev.to_string_lossy())),
        "the VMM holds no fd of {}: {links:?}",
        cdev.display()
    );
    vmm.remove(&id)?;
    check_empty(&vmm)?;
    let links = vfio_links(&vmm.fds());
    ensure!(
        links.is_empty(),
        "VFIO fds left after removing {id}: {links:?}"
    );

    // 2. ioasid-remote fd=N: the child inherits a fresh open of the cdev and sends it.
    let file = open_inheritable(&cdev)?;
    let out = remote(
        vmm.sock(),
        &[
            "add-device",
            &format!("fd={},id=edu_remote", file.as_raw_fd()),
        ],
    );
    drop(file);
    let out = out?;
    let v: Value =
        serde_json::from_str(&out).map_err(|e| format!("ioasid-remote output {out}: {e}"))?;
    ensure!(
        v["id"] == "edu_remote",
        "ioasid-remote add-device answered {v}"
    );
    check_attached(&vmm, "edu_remote", RAM)?;
    remote(vmm.sock(), &["remove-device", "edu_remote"])?;
    check_empty(&vmm)?;

    let fds_after = vmm.fds();
    ensure!(
        vm_scoped(&fds_after, &fds_before),
        "the VMM's fds changed: before {fds_before:?} after {fds_after:?}"
    );
    vmm.shutdown()?;
    Ok(Outcome::Pass)
}

/// One bad request of the lab table.
struct Bad<'a> {
    name: &'static str,
    endpoint: &'static str,
    body: String,
    fd: Option<BorrowedFd<'a>>,
    status: u16,
    mentions: Vec<String>,
}

fn api_bad_inputs_state_unchanged_lab() -> TestResult {
    let edu = env::edu_path()?;
    let mtty = env::mtty_path()?;
    let edu_bdf = edu
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    let vmm = LabVmm::start("bad", "size=64M")?;
    let (id, bdf) = vmm.add(
        &format!(r#"{{"path":"{}","id":"edu0"}}"#, edu.display()),
        &[],
    )?;
    let slot = bdf
        .rsplit(':')
        .next()
        .and_then(|d| d.split('.').next())
        .and_then(|d| u8::from_str_radix(d, 16).ok())
        .ok_or_else(|| format!("cannot read the slot of {bdf}"))?;
    let before = vmm.snapshot()?;
    let fds_before = vmm.fds();
    let devnull = File::open("/dev/null").map_err(|e| e.to_string())?;
    let cases = vec![
        Bad {
            name: "duplicate id",
            endpoint: "vm.add-device",
            body: format!(r#"{{"path":"{}","id":"edu0"}}"#, mtty.display()),
            fd: None,
            status: 409,
            mentions: vec!["edu0".into()],
        },
        Bad {
            name: "the same edu under a second id",
            endpoint: "vm.add-device",
            body: format!(r#"{{"path":"{}","id":"edu1"}}"#, edu.display()),
            fd: None,
            status: 409,
            mentions: vec![edu_bdf.clone(), "edu0".into()],
        },
        Bad {
            name: "a slot in use",
            endpoint: "vm.add-device",
            body: format!(r#"{{"path":"{}","pci_device_id":{slot}}}"#, mtty.display()),
            fd: None,
            status: 409,
            mentions: vec![bdf.clone()],
        },
        Bad {
            name: "PCI device that does not exist",
            endpoint: "vm.add-device",
            body: r#"{"path":"/sys/bus/pci/devices/0000:ff:1f.7"}"#.into(),
            fd: None,
            status: 404,
            mentions: vec!["0000:ff:1f.7".into()],
        },
        Bad {
            name: "non-VFIO fd",
            endpoint: "vm.add-device",
            body: r#"{"id":"null0"}"#.into(),
            fd: Some(devnull.as_fd()),
            status: 400,
            mentions: vec!["not a VFIO cdev".into()],
        },
        Bad {
            name: "x_ option set",
            endpoint: "vm.add-device",
            body: format!(
                r#"{{"path":"{}","x_exclude_mmap_bars":[2]}}"#,
                mtty.display()
            ),
            fd: None,
            status: 400,
            mentions: vec!["x_exclude_mmap_bars".into()],
        },
        Bad {
            name: "unknown field",
            endpoint: "vm.add-device",
            body: format!(r#"{{"path":"{}","hotplug":true}}"#, mtty.display()),
            fd: None,
            status: 400,
            mentions: vec!["hotplug".into()],
        },
        Bad {
            name: "remove of an unknown id",
            endpoint: "vm.remove-device",
            body: r#"{"id":"edu9"}"#.into(),
            fd: None,
            status: 404,
            mentions: vec!["edu9".into()],
        },
    ];
    let mut failures = Vec::new();
    for c in &cases {
        let fds: Vec<BorrowedFd<'_>> = c.fd.iter().copied().collect();
        let r = vmm.call(HttpMethod::Put, c.endpoint, Some(&c.body), &fds)?;
        let msg = r.error_message();
        println!("LAB-INFO bad input {}: {} {msg}", c.name, r.status);
        if r.status != c.status {
            failures.push(format!(
                "{}: {} (expected {}): {msg}",
                c.name, r.status, c.status
            ));
        } else if serde_json::from_slice::<api::ErrorBody>(&r.body).is_err() {
            failures.push(format!("{}: not a JSON error: {msg}", c.name));
        } else if let Some(m) = c.mentions.iter().find(|m| !msg.contains(m.as_str())) {
            failures.push(format!("{}: message lacks {m:?}: {msg}", c.name));
        }
    }
    let after = vmm.snapshot()?;
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if a != b {
            failures.push(format!("{name} changed: before {b} after {a}"));
        }
    }
    let fds_after = vmm.fds();
    if fds_after != fds_before {
        failures.push(format!(
            "fds changed: before {fds_before:?} after {fds_after:?}"
        ));
    }
    ensure!(failures.is_empty(), "{}", failures.join("; "));
    // edu0 still works as a device: remove it and nothing is left.
    vmm.remove(&id)?;
    check_empty(&vmm)?;
    vmm.shutdown()?;
    Ok(Outcome::Pass)
}

fn api_hotplug_churn_no_leaks() -> TestResult {
    let edu = env::edu_path()?;
    let mtty = env::mtty_path()?;
    let vmm = LabVmm::start("churn", "size=64M")?;
    let fds_before = vmm.fds();
    ensure!(
        vfio_links(&fds_before).is_empty(),
        "VFIO fds open before any add: {fds_before:?}"
    );
    let start = Instant::now();
    let mut after_first = Vec::new();
    for i in 0..CHURN {
        let (id, _) = vmm
            .add(
                &format!(r#"{{"path":"{}","id":"churn"}}"#, edu.display()),
                &[],
            )
            .map_err(|e| format!("cycle {i}: {e}"))?;
        vmm.remove(&id).map_err(|e| format!("cycle {i}: {e}"))?;
        if i == 0 {
            after_first = vmm.fds();
        }
        if (i + 1) % 50 == 0 {
            println!(
                "LAB-INFO churn: {} edu add/remove cycles in {:.1} s",
                i + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
    for i in 0..5 {
        let (id, _) = vmm
            .add(&format!(r#"{{"path":"{}"}}"#, mtty.display()), &[])
            .map_err(|e| format!("mtty cycle {i}: {e}"))?;
        vmm.remove(&id)
            .map_err(|e| format!("mtty cycle {i}: {e}"))?;
    }
    // Both at once, removed in the order they came.
    let (a, _) = vmm.add(&format!(r#"{{"path":"{}"}}"#, edu.display()), &[])?;
    let (b, _) = vmm.add(&format!(r#"{{"path":"{}"}}"#, mtty.display()), &[])?;
    vmm.remove(&a)?;
    vmm.remove(&b)?;
    check_empty(&vmm)?;
    let fds_after = vmm.fds();
    let left = vfio_links(&fds_after);
    ensure!(left.is_empty(), "VFIO/iommufd fds left open: {left:?}");
    // Exactly the fds of the first cycle's end (no growth over the cycles), and those are
    // the fds before the first add plus only the VM's KVM-VFIO device.
    ensure!(
        fds_after == after_first,
        "fds grew over {CHURN} cycles: after the first {after_first:?}, at the end {fds_after:?}"
    );
    ensure!(
        vm_scoped(&fds_after, &fds_before),
        "the VMM's fds differ from before the first add by more than the KVM-VFIO device: \
         before {fds_before:?} after {fds_after:?}"
    );
    let counters = vmm.get("vm.counters")?;
    println!(
        "LAB-INFO churn: {CHURN} edu + 6 mtty cycles, fds {} before the first add, {} after \
         (the VM's KVM-VFIO device), ram_map_calls {}",
        fds_before.len(),
        fds_after.len(),
        counters["_vm"]["ram_map_calls"]
    );
    let mut log = String::new();
    if let Ok(mut f) = File::open(&vmm.log) {
        let _ = f.read_to_string(&mut log);
    }
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    let mut kinds: Vec<&str> = warnings
        .iter()
        .map(|l| l.split_once("] ").map_or(*l, |(_, m)| m))
        .collect();
    kinds.sort_unstable();
    kinds.dedup();
    println!(
        "LAB-INFO churn: {} warnings in the VMM log, {} distinct: {}",
        warnings.len(),
        kinds.len(),
        kinds
            .iter()
            .take(4)
            .copied()
            .collect::<Vec<_>>()
            .join(" | ")
    );
    vmm.shutdown()?;
    Ok(Outcome::Pass)
}
