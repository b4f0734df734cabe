//! The REST API end to end on this host: the `ioasid-vmm` binary runs a tiny payload VM
//! (`hlt; jmp $-1` with the in-kernel irqchip, so it idles until stopped) with `--api-socket`,
//! and the tests talk to it over the real Unix socket. There is no VFIO here, so every add is
//! refused: these tests cover the control loop, the error paths and the life cycle; the lab
//! (`tests/src/lab/api_tests.rs`) adds and removes real devices.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use api::client::{ApiClient, ClientResponse};
use api::routes::HttpMethod;

use common::kvm_available;

/// `hlt; jmp $-1`: with an in-kernel irqchip HLT stays in KVM, so the guest idles.
const IDLE_PAYLOAD: [u8; 3] = [0xf4, 0xeb, 0xfd];
/// A hang breaker, not a timing assertion.
const GUARD: Duration = Duration::from_secs(30);

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-api-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ioasid-vmm` with its API socket.
struct Vmm {
    child: Child,
    sock: PathBuf,
    client: ApiClient,
}

fn vmm_command(dir: &Path, sock: &Path) -> Command {
    let payload = dir.join("idle.bin");
    std::fs::write(&payload, IDLE_PAYLOAD).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"));
    c.arg("--payload")
        .arg(format!("{},mode=real,irqchip=on", payload.display()))
        .args(["--memory", "size=16M", "--serial", "off"])
        .arg("--api-socket")
        .arg(sock)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

impl Vmm {
    /// Starts the VMM and waits until it answers `vmm.ping`.
    fn start(dir: &Path) -> Vmm {
        let sock = dir.join("api.sock");
        let child = vmm_command(dir, &sock).spawn().unwrap();
        let client = ApiClient::new(&sock).with_timeout(GUARD);
        let mut vmm = Vmm {
            child,
            sock,
            client,
        };
        let start = Instant::now();
        loop {
            if let Ok(r) = vmm.client.request(HttpMethod::Get, "vmm.ping", None, &[]) {
                assert_eq!(r.status, 200, "{}", r.error_message());
                break;
            }
            if let Some(st) = vmm.child.try_wait().unwrap() {
                let log = vmm.stderr();
                panic!("ioasid-vmm exited ({st}) before answering: {log}");
            }
            assert!(
                start.elapsed() < GUARD,
                "ioasid-vmm never answered vmm.ping"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    fn call(
        &self,
        method: HttpMethod,
        endpoint: &str,
        body: Option<&str>,
        fds: &[BorrowedFd<'_>],
    ) -> ClientResponse {
        self.client
            .request(method, endpoint, body.map(str::as_bytes), fds)
            .unwrap()
    }

    fn get(&self, endpoint: &str) -> serde_json::Value {
        let r = self.call(HttpMethod::Get, endpoint, None, &[]);
        assert_eq!(r.status, 200, "GET {endpoint}: {}", r.error_message());
        r.json().unwrap()
    }

    /// What bad requests must leave unchanged.
    fn snapshot(&self) -> Vec<(String, serde_json::Value)> {
        [
            "vm.info",
            "vm.iommu",
            "vm.ioasids",
            "vm.pasids",
            "vm.counters",
        ]
        .iter()
        .map(|e| (e.to_string(), self.get(e)))
        .collect()
    }

    /// The VMM's open fds, as `fd -> target` lines (sockets of API connections the server
    /// has not yet seen close are given a moment to go).
    fn fds(&self) -> Vec<String> {
        let list = || {
            let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .flatten()
                .map(|e| {
                    let target = std::fs::read_link(e.path()).unwrap_or_default();
                    format!(
                        "{} -> {}",
                        e.file_name().to_string_lossy(),
                        target.display()
                    )
                })
                .collect();
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

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > GUARD {
                let _ = self.child.kill();
                let st = self.child.wait().unwrap();
                panic!(
                    "ioasid-vmm did not exit within {GUARD:?} ({st}): {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn api_ping_info_and_vm_shutdown() {
    if !kvm_available("api_ping_info_and_vm_shutdown") {
        return;
    }
    let dir = Scratch::new("life");
    let mut vmm = Vmm::start(&dir.0);
    let mode = std::fs::metadata(&vmm.sock).unwrap();
    assert!(mode.file_type().is_socket());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let ping = vmm.get("vmm.ping");
    println!("vmm.ping: {ping}");
    assert_eq!(ping["pid"], i64::from(vmm.pid()));
    assert_eq!(ping["version"], env!("CARGO_PKG_VERSION"));

    let info = vmm.get("vm.info");
    println!("vm.info: {info}");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"], 16u64 << 20);
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 1);
    assert_eq!(info["config"]["devices"], serde_json::json!([]));
    assert_eq!(info["device_tree"], serde_json::json!({}));
    let iommu = vmm.get("vm.iommu");
    assert_eq!(iommu["backend"], "none", "{iommu}");

    // vm.shutdown stops the VM; the VMM and its API stay (Cloud Hypervisor's semantics).
    let r = vmm.call(HttpMethod::Put, "vm.shutdown", None, &[]);
    assert_eq!(r.status, 204, "{}", r.error_message());
    assert_eq!(vmm.get("vm.info")["state"], "Shutdown");
    assert_eq!(vmm.get("vmm.ping")["pid"], i64::from(vmm.pid()));
    let r = vmm.call(HttpMethod::Put, "vmm.shutdown", None, &[]);
    assert_eq!(r.status, 204, "{}", r.error_message());
    let st = vmm.wait_exit();
    let log = vmm.stderr();
    println!("ioasid-vmm log: {log}");
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(
        !vmm.sock.exists(),
        "the socket {} is still there after exit",
        vmm.sock.display()
    );
}

#[test]
fn api_vmm_shutdown_exits_0() {
    if !kvm_available("api_vmm_shutdown_exits_0") {
        return;
    }
    let dir = Scratch::new("vmmdown");
    let mut vmm = Vmm::start(&dir.0);
    let r = vmm.call(HttpMethod::Put, "vmm.shutdown", None, &[]);
    assert_eq!(r.status, 204, "{}", r.error_message());
    let st = vmm.wait_exit();
    assert_eq!(st.code(), Some(0), "{}", vmm.stderr());
    assert!(!vmm.sock.exists());
}

#[test]
fn api_socket_stale_replaced_non_socket_refused() {
    if !kvm_available("api_socket_stale_replaced_non_socket_refused") {
        return;
    }
    let dir = Scratch::new("sockpath");
    // A stale socket (its listener is gone) is replaced.
    let sock = dir.0.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut vmm = Vmm::start(&dir.0);
    assert_eq!(vmm.get("vmm.ping")["pid"], i64::from(vmm.pid()));
    // A second VMM on the live socket is refused and leaves it alone.
    let out = vmm_command(&dir.0, &sock).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("in use"), "{err}");
    assert_eq!(vmm.get("vmm.ping")["pid"], i64::from(vmm.pid()));
    let r = vmm.call(HttpMethod::Put, "vmm.shutdown", None, &[]);
    assert_eq!(r.status, 204);
    assert_eq!(vmm.wait_exit().code(), Some(0));

    // A regular file in the way is refused and kept.
    std::fs::write(&sock, b"not a socket").unwrap();
    let out = vmm_command(&dir.0, &sock).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("stderr: {err}");
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
}

/// One bad request: what is sent, the status expected, and words the message must contain.
struct Case {
    name: &'static str,
    method: HttpMethod,
    endpoint: &'static str,
    body: Option<String>,
    raw: Option<Vec<u8>>,
    fd: Option<&'static str>,
    status: u16,
    mentions: Vec<&'static str>,
}

fn put(
    name: &'static str,
    endpoint: &'static str,
    body: &str,
    status: u16,
    mentions: &[&'static str],
) -> Case {
    Case {
        name,
        method: HttpMethod::Put,
        endpoint,
        body: Some(body.to_string()),
        raw: None,
        fd: None,
        status,
        mentions: mentions.to_vec(),
    }
}

#[test]
fn api_bad_inputs_state_unchanged() {
    if !kvm_available("api_bad_inputs_state_unchanged") {
        return;
    }
    let dir = Scratch::new("bad");
    let regular = dir.0.join("regular-file");
    std::fs::write(&regular, b"x").unwrap();
    let mut vmm = Vmm::start(&dir.0);
    let before = vmm.snapshot();
    let fds_before = vmm.fds();

    let missing_pci = "/sys/bus/pci/devices/0000:ff:1f.7";
    let missing_mdev = "/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let big = format!(
        r#"{{"path":"{missing_pci}","id":"{}"}}"#,
        "a".repeat(60_000)
    );
    let mut cases = vec![
        put(
            "malformed JSON",
            "vm.add-device",
            r#"{"path": "#,
            400,
            &["Invalid DeviceConfig"],
        ),
        put(
            "unknown field",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","colour":"red"}}"#),
            400,
            &["colour"],
        ),
        put(
            "wrong type",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","iommu":"yes"}}"#),
            400,
            &["iommu"],
        ),
        put("oversized body", "vm.add-device", &big, 413, &["51200"]),
        put(
            "PCI device that does not exist",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","id":"dev0"}}"#),
            404,
            &["0000:ff:1f.7"],
        ),
        put(
            "mdev that does not exist",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_mdev}"}}"#),
            404,
            &["83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"],
        ),
        put(
            "a regular file",
            "vm.add-device",
            &format!(r#"{{"path":"{}"}}"#, regular.display()),
            400,
            &["regular-file", "not allowed"],
        ),
        put(
            "path outside sysfs devices",
            "vm.add-device",
            r#"{"path":"/etc/passwd"}"#,
            400,
            &["/etc/passwd", "not allowed"],
        ),
        put(
            "dot-dot out of sysfs devices",
            "vm.add-device",
            r#"{"path":"/sys/bus/pci/devices/../../../etc/passwd"}"#,
            400,
            &["not allowed"],
        ),
        put(
            "VFIO cdev that does not exist",
            "vm.add-device",
            r#"{"path":"/dev/vfio/devices/vfio999"}"#,
            404,
            &["/dev/vfio/devices/vfio999"],
        ),
        put(
            "BDF with a device number above 0x1f",
            "vm.add-device",
            r#"{"path":"/sys/bus/pci/devices/0000:00:20.0"}"#,
            400,
            &["device number 0x20 is above 0x1f"],
        ),
        put(
            "x_exclude_mmap_bars set",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","x_exclude_mmap_bars":[0]}}"#),
            400,
            &["x_exclude_mmap_bars"],
        ),
        put(
            "x_nv_gpudirect_clique set",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","x_nv_gpudirect_clique":1}}"#),
            400,
            &["x_nv_gpudirect_clique"],
        ),
        put(
            "pasid without iommu",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","pasid":true}}"#),
            400,
            &["pasid", "iommu"],
        ),
        put(
            "segment that does not exist",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","pci_segment":1}}"#),
            400,
            &["pci_segment=1"],
        ),
        put(
            "slot out of range",
            "vm.add-device",
            &format!(r#"{{"path":"{missing_pci}","pci_device_id":32}}"#),
            400,
            &["pci_device_id"],
        ),
        put(
            "neither path nor fd",
            "vm.add-device",
            r#"{"id":"x"}"#,
            400,
            &["path"],
        ),
        put(
            "body names an fd that was not passed",
            "vm.add-device",
            r#"{"fd":3}"#,
            400,
            &["SCM_RIGHTS"],
        ),
        put(
            "remove of an unknown id",
            "vm.remove-device",
            r#"{"id":"ghost0"}"#,
            404,
            &["ghost0"],
        ),
        put(
            "remove without id",
            "vm.remove-device",
            r#"{}"#,
            400,
            &["id"],
        ),
        put(
            "remove with a malformed id",
            "vm.remove-device",
            r#"{"id":"a b"}"#,
            400,
            &["a b"],
        ),
        put(
            "body on vm.shutdown",
            "vm.shutdown",
            "{}",
            400,
            &["no request body"],
        ),
    ];
    cases.push(Case {
        name: "unknown route",
        method: HttpMethod::Get,
        endpoint: "vm.nonsense",
        body: None,
        raw: None,
        fd: None,
        status: 404,
        mentions: vec!["vm.nonsense"],
    });
    cases.push(Case {
        name: "wrong method",
        method: HttpMethod::Get,
        endpoint: "vm.add-device",
        body: None,
        raw: None,
        fd: None,
        status: 405,
        mentions: vec!["GET", "PUT"],
    });
    cases.push(Case {
        name: "malformed HTTP",
        method: HttpMethod::Get,
        endpoint: "",
        body: None,
        raw: Some(b"BREW /api/v1/vmm.ping HTCPCP/1.0\r\n\r\n".to_vec()),
        fd: None,
        status: 400,
        mentions: vec!["Malformed HTTP"],
    });
    for (name, path, mentions) in [
        (
            "/dev/null fd",
            "/dev/null",
            vec!["cdev fd", "not a VFIO cdev"],
        ),
        (
            "regular file fd",
            "REGULAR",
            vec!["cdev fd", "not a character device"],
        ),
    ] {
        cases.push(Case {
            name,
            method: HttpMethod::Put,
            endpoint: "vm.add-device",
            body: Some(r#"{"fd":5,"id":"fd0"}"#.to_string()),
            raw: None,
            fd: Some(path),
            status: 400,
            mentions,
        });
    }
    cases.push(Case {
        name: "fd and path",
        method: HttpMethod::Put,
        endpoint: "vm.add-device",
        body: Some(format!(r#"{{"path":"{missing_pci}"}}"#)),
        raw: None,
        fd: Some("/dev/null"),
        status: 400,
        mentions: vec!["exactly one"],
    });
    cases.push(Case {
        name: "fd on an endpoint without fds",
        method: HttpMethod::Put,
        endpoint: "vm.remove-device",
        body: Some(r#"{"id":"ghost0"}"#.to_string()),
        raw: None,
        fd: Some("/dev/null"),
        status: 400,
        mentions: vec!["file descriptors"],
    });

    let mut failures = Vec::new();
    for c in &cases {
        let file = c.fd.map(|p| {
            if p == "REGULAR" {
                File::open(&regular).unwrap()
            } else {
                File::open(p).unwrap()
            }
        });
        let fds: Vec<BorrowedFd<'_>> = file.iter().map(|f| f.as_fd()).collect();
        let r = match &c.raw {
            Some(raw) => vmm.client.raw_request(raw, &fds).unwrap(),
            None => vmm.call(c.method, c.endpoint, c.body.as_deref(), &fds),
        };
        let body: Result<api::ErrorBody, _> = serde_json::from_slice(&r.body);
        let msg = r.error_message();
        println!("{:<40} {} {msg}", c.name, r.status);
        if r.status != c.status {
            failures.push(format!(
                "{}: status {} (expected {}): {msg}",
                c.name, r.status, c.status
            ));
        } else if body.is_err() {
            failures.push(format!("{}: body is not a JSON error: {msg}", c.name));
        } else if let Some(m) = c.mentions.iter().find(|m| !msg.contains(*m)) {
            failures.push(format!("{}: message does not mention {m:?}: {msg}", c.name));
        }
    }
    let after = vmm.snapshot();
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if a != b {
            failures.push(format!("{name} changed: before {b} after {a}"));
        }
    }
    let fds_after = vmm.fds();
    if fds_after != fds_before {
        failures.push(format!(
            "the VMM's open fds changed: before {fds_before:?}, after {fds_after:?}"
        ));
    }
    // Still serving, and still running.
    assert_eq!(vmm.get("vm.info")["state"], "Running");
    let r = vmm.call(HttpMethod::Put, "vmm.shutdown", None, &[]);
    assert_eq!(r.status, 204);
    assert_eq!(vmm.wait_exit().code(), Some(0));
    let log = vmm.stderr();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}\nVMM log:\n{log}",
        failures.len(),
        failures.join("\n")
    );
    println!(
        "{} bad inputs refused; state and fd count unchanged",
        cases.len()
    );
}
