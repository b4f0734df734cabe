//! Cloud Hypervisor's VM life cycle over the REST API, on this host's KVM: the `ioasid-vmm`
//! binary starts empty (`--api-socket` only) and a payload VM is created from a Cloud
//! Hypervisor `VmConfig` (`payload.firmware`, a raw real-mode image) that writes `.` to COM1
//! in a loop, with the serial console in a file. Running is shown by the guest's output
//! growing, paused by it not growing. Also: `vm.info`/`vm.counters`/`vmm.ping` parsed as
//! Cloud Hypervisor's types, and SIGTERM/SIGINT.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use api::client::{ApiClient, ClientResponse};
use api::routes::HttpMethod;
use serde::Deserialize;

use common::kvm_available;

/// Real mode: `mov dx,0x3f8; 1: mov al,'.'; out dx,al; mov cx,0x10; 2: loop 2b; jmp 1b`.
const TICKER: [u8; 13] = [
    0xba, 0xf8, 0x03, 0xb0, 0x2e, 0xee, 0xb9, 0x10, 0x00, 0xe2, 0xfe, 0xeb, 0xf6,
];
/// A hang breaker, not a timing assertion.
const GUARD: Duration = Duration::from_secs(30);
/// How long a paused guest is watched for output it must not make.
const QUIET: Duration = Duration::from_millis(300);

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("vmm-life-{name}-{}", std::process::id()));
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

/// An `ioasid-vmm` process and its API socket.
struct Vmm {
    child: Child,
    sock: PathBuf,
    client: ApiClient,
    dir: PathBuf,
}

impl Vmm {
    /// Starts `ioasid-vmm` with `args` plus `--api-socket` and waits for `vmm.ping`.
    fn start(dir: &Path, args: &[String]) -> Vmm {
        let sock = dir.join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"))
            .args(args)
            .arg("--api-socket")
            .arg(&sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("vmm.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let client = ApiClient::new(&sock).with_timeout(GUARD);
        let mut vmm = Vmm {
            child,
            sock,
            client,
            dir: dir.to_path_buf(),
        };
        let start = Instant::now();
        while vmm
            .client
            .request(HttpMethod::Get, "vmm.ping", None, &[])
            .is_err()
        {
            if let Some(st) = vmm.child.try_wait().unwrap() {
                panic!("ioasid-vmm exited ({st}): {}", vmm.log());
            }
            assert!(start.elapsed() < GUARD, "no vmm.ping answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        vmm
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default()
    }

    fn call(&self, method: HttpMethod, endpoint: &str, body: Option<&str>) -> ClientResponse {
        self.client
            .request(method, endpoint, body.map(str::as_bytes), &[])
            .unwrap()
    }

    /// A PUT that must answer `status`; for an error, the body must be Cloud Hypervisor's
    /// array of strings.
    fn put(&self, endpoint: &str, body: Option<&str>, status: u16) {
        let r = self.call(HttpMethod::Put, endpoint, body);
        println!("PUT {endpoint}: {} {}", r.status, r.error_message());
        assert_eq!(
            r.status,
            status,
            "PUT {endpoint}: {}; log: {}",
            r.error_message(),
            self.log()
        );
        if status >= 400 {
            let m: Vec<String> = serde_json::from_slice(&r.body).unwrap();
            assert!(!m.is_empty() && !m[0].is_empty(), "{m:?}");
        } else {
            assert!(r.body.is_empty());
        }
    }

    /// A GET that must answer `status`; the body as JSON.
    fn get(&self, endpoint: &str, status: u16) -> serde_json::Value {
        let r = self.call(HttpMethod::Get, endpoint, None);
        assert_eq!(r.status, status, "GET {endpoint}: {}", r.error_message());
        r.json().unwrap()
    }

    fn state(&self) -> String {
        self.get("vm.info", 200)["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            if start.elapsed() > GUARD {
                let _ = self.child.kill();
                panic!("ioasid-vmm did not exit: {}", self.log());
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

/// The serial file's length.
fn serial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Waits (up to the guard) until the guest wrote more than `than` bytes to `path`.
fn wait_output(path: &Path, than: u64) -> u64 {
    let start = Instant::now();
    loop {
        let n = serial_len(path);
        if n > than {
            return n;
        }
        assert!(
            start.elapsed() < GUARD,
            "the guest wrote nothing to {} beyond {than} bytes",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest's output is all `.`: the bytes are the guest's, not ours.
fn assert_guest_bytes(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        !bytes.is_empty() && bytes.iter().all(|b| *b == b'.'),
        "serial output is not the ticker's"
    );
}

/// A `vm.create` body: the ticker as `payload.firmware`, COM1 to `serial`.
fn ticker_config(dir: &Path, serial: &Path) -> String {
    let fw = dir.join("ticker.bin");
    std::fs::write(&fw, TICKER).unwrap();
    serde_json::json!({
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 16u64 << 20},
        "payload": {"firmware": fw},
        "serial": {"mode": "File", "file": serial},
        "console": {"mode": "Off"},
    })
    .to_string()
}

#[test]
fn api_lifecycle_create_boot_pause_resume_shutdown_boot_delete() {
    let name = "api_lifecycle_create_boot_pause_resume_shutdown_boot_delete";
    if !kvm_available(name) {
        return;
    }
    let dir = Scratch::new("cycle");
    let serial = dir.0.join("serial.out");
    let mut vmm = Vmm::start(&dir.0, &[]);

    // Empty VMM: nothing to boot, pause or shut down.
    vmm.get("vm.info", 404);
    vmm.put("vm.boot", None, 404);
    vmm.put("vm.reboot", None, 404);
    vmm.put("vm.pause", None, 500);
    vmm.put("vm.shutdown", None, 500);
    vmm.get("vm.counters", 500);
    vmm.put("vm.delete", None, 204);

    // Create: stored, not running.
    vmm.put(
        "vm.create",
        Some(r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d"}]}"#),
        400,
    );
    vmm.put("vm.create", Some(&ticker_config(&dir.0, &serial)), 204);
    vmm.put("vm.create", Some(&ticker_config(&dir.0, &serial)), 500);
    assert_eq!(vmm.state(), "Created");
    vmm.put("vm.pause", None, 500);
    vmm.put("vm.resume", None, 500);
    vmm.put("vm.shutdown", None, 500);
    assert_eq!(serial_len(&serial), 0, "the guest ran before vm.boot");

    // Boot: the guest runs.
    vmm.put("vm.boot", None, 204);
    assert_eq!(vmm.state(), "Running");
    wait_output(&serial, 0);
    vmm.put("vm.boot", None, 500);
    vmm.put("vm.resume", None, 500);

    // Pause: the guest stops; a second pause is a state error.
    vmm.put("vm.pause", None, 204);
    assert_eq!(vmm.state(), "Paused");
    vmm.put("vm.pause", None, 500);
    vmm.put("vm.boot", None, 500);
    let paused_at = serial_len(&serial);
    std::thread::sleep(QUIET);
    assert_eq!(
        serial_len(&serial),
        paused_at,
        "the guest wrote to COM1 while paused"
    );

    // Resume: it runs on.
    vmm.put("vm.resume", None, 204);
    assert_eq!(vmm.state(), "Running");
    let resumed = wait_output(&serial, paused_at);

    // Shutdown: the VM stops, the VMM and its API stay.
    vmm.put("vm.shutdown", None, 204);
    assert_eq!(vmm.state(), "Shutdown");
    assert_eq!(vmm.get("vmm.ping", 200)["pid"], i64::from(vmm.child.id()));
    let stopped_at = serial_len(&serial);
    assert!(stopped_at >= resumed);
    std::thread::sleep(QUIET);
    assert_eq!(serial_len(&serial), stopped_at, "output after vm.shutdown");
    vmm.put("vm.shutdown", None, 500);
    vmm.put("vm.pause", None, 500);
    vmm.get("vm.counters", 500);
    assert!(vmm.child.try_wait().unwrap().is_none(), "the VMM exited");

    // Boot again from the same configuration, then reboot.
    vmm.put("vm.boot", None, 204);
    assert_eq!(vmm.state(), "Running");
    let rebooted = wait_output(&serial, stopped_at);
    vmm.put("vm.reboot", None, 204);
    assert_eq!(vmm.state(), "Running");
    wait_output(&serial, rebooted);

    // Delete: the VM and its configuration are gone; a second delete is fine.
    vmm.put("vm.delete", None, 204);
    vmm.get("vm.info", 404);
    vmm.put("vm.boot", None, 404);
    vmm.put("vm.delete", None, 204);
    let deleted_at = serial_len(&serial);
    std::thread::sleep(QUIET);
    assert_eq!(serial_len(&serial), deleted_at, "output after vm.delete");
    assert_guest_bytes(&serial);

    vmm.put("vmm.shutdown", None, 204);
    let st = vmm.wait_exit();
    assert_eq!(st.code(), Some(0), "{}", vmm.log());
    assert!(!vmm.sock.exists(), "socket left behind");
    println!("{name}: {deleted_at} guest bytes over two boots and a reboot");
}

// Cloud Hypervisor's response types, as its typed clients read them (field names, nesting,
// required fields; unknown fields ignored, as serde does by default).
#[derive(Debug, Deserialize)]
struct ChVmInfo {
    config: ChVmConfig,
    state: ChVmState,
    memory_actual_size: u64,
    device_tree: Option<HashMap<String, ChDeviceNode>>,
}

#[derive(Debug, Deserialize, PartialEq)]
enum ChVmState {
    Created,
    Running,
    Shutdown,
    Paused,
    BreakPoint,
}

#[derive(Debug, Deserialize)]
struct ChVmConfig {
    cpus: ChCpusConfig,
    memory: ChMemoryConfig,
    payload: Option<ChPayloadConfig>,
    devices: Option<Vec<ChDeviceConfig>>,
    serial: ChConsoleConfig,
    console: ChConsoleConfig,
}

#[derive(Debug, Deserialize)]
struct ChCpusConfig {
    boot_vcpus: u32,
    max_vcpus: u32,
}

#[derive(Debug, Deserialize)]
struct ChMemoryConfig {
    size: u64,
    #[serde(default)]
    hugepages: bool,
}

#[derive(Debug, Deserialize)]
struct ChPayloadConfig {
    firmware: Option<PathBuf>,
    kernel: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct ChDeviceConfig {
    path: PathBuf,
    #[serde(default)]
    iommu: bool,
    id: Option<String>,
    #[serde(default)]
    pci_segment: u16,
}

#[derive(Debug, Deserialize)]
struct ChConsoleConfig {
    file: Option<PathBuf>,
    mode: ChConsoleMode,
}

#[derive(Debug, Deserialize, PartialEq)]
enum ChConsoleMode {
    Off,
    Pty,
    Tty,
    File,
    Socket,
    Null,
}

#[derive(Debug, Deserialize)]
struct ChDeviceNode {
    id: String,
    children: Vec<String>,
    pci_bdf: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChVmmPingResponse {
    build_version: String,
    version: String,
    pid: i64,
    features: Vec<String>,
}

/// Cloud Hypervisor's `vm.counters`: device id to counter name to value.
type ChVmCounters = HashMap<String, HashMap<String, u64>>;

#[test]
fn api_counters_and_info_shapes() {
    if !kvm_available("api_counters_and_info_shapes") {
        return;
    }
    let dir = Scratch::new("shapes");
    let serial = dir.0.join("serial.out");
    let mut vmm = Vmm::start(&dir.0, &[]);
    let ping: ChVmmPingResponse = serde_json::from_value(vmm.get("vmm.ping", 200)).unwrap();
    assert_eq!(ping.pid, i64::from(vmm.child.id()));
    assert!(!ping.version.is_empty() && !ping.build_version.is_empty());
    assert!(ping.features.iter().any(|f| f == "iommufd"), "{ping:?}");

    vmm.put("vm.create", Some(&ticker_config(&dir.0, &serial)), 204);
    let info: ChVmInfo = serde_json::from_value(vmm.get("vm.info", 200)).unwrap();
    println!("created: {info:?}");
    assert_eq!(info.state, ChVmState::Created);
    assert!(info.device_tree.is_none(), "a device tree before boot");

    vmm.put("vm.boot", None, 204);
    let raw = vmm.get("vm.info", 200);
    println!("vm.info: {raw}");
    let info: ChVmInfo = serde_json::from_value(raw).unwrap();
    assert_eq!(info.state, ChVmState::Running);
    assert_eq!(
        (info.config.cpus.boot_vcpus, info.config.cpus.max_vcpus),
        (1, 1)
    );
    assert_eq!(info.config.memory.size, 16 << 20);
    assert!(!info.config.memory.hugepages);
    assert_eq!(info.memory_actual_size, 16 << 20);
    let payload = info.config.payload.unwrap();
    assert_eq!(payload.firmware, Some(dir.0.join("ticker.bin")));
    assert!(payload.kernel.is_none());
    assert_eq!(info.config.serial.mode, ChConsoleMode::File);
    assert_eq!(info.config.serial.file, Some(serial.clone()));
    assert_eq!(info.config.console.mode, ChConsoleMode::Off);
    let devices = info.config.devices.unwrap_or_default();
    assert!(devices.is_empty(), "{devices:?}");
    let tree = info.device_tree.unwrap();
    for (id, node) in &tree {
        assert_eq!(id, &node.id);
        assert!(node.children.is_empty() || node.pci_bdf.is_some());
    }

    // A device in the configuration keeps Cloud Hypervisor's DeviceConfig shape.
    vmm.put("vm.shutdown", None, 204);
    let pci = "/sys/bus/pci/devices/0000:ff:1f.7";
    let add = format!(r#"{{"path":"{pci}","id":"later0","iommu":false}}"#);
    vmm.put("vm.add-device", Some(&add), 204);
    let info: ChVmInfo = serde_json::from_value(vmm.get("vm.info", 200)).unwrap();
    assert_eq!(info.state, ChVmState::Shutdown);
    let devices = info.config.devices.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].path, Path::new(pci));
    assert_eq!(devices[0].id.as_deref(), Some("later0"));
    assert!(!devices[0].iommu && devices[0].pci_segment == 0);
    vmm.put("vm.add-device", Some(&add), 409);
    vmm.put("vm.remove-device", Some(r#"{"id":"later0"}"#), 204);
    vmm.put("vm.remove-device", Some(r#"{"id":"later0"}"#), 404);

    vmm.put("vm.boot", None, 204);
    let raw = vmm.get("vm.counters", 200);
    println!("vm.counters: {raw}");
    let counters: ChVmCounters = serde_json::from_value(raw).unwrap();
    let iommu = counters
        .get(api::IOMMU_COUNTERS_KEY)
        .unwrap_or_else(|| panic!("no {} entry: {counters:?}", api::IOMMU_COUNTERS_KEY));
    for c in ["faults", "page_requests", "invalidations", "host_ioctls"] {
        assert!(iommu.contains_key(c), "{c} missing from {iommu:?}");
    }
    vmm.put("vmm.shutdown", None, 204);
    assert_eq!(vmm.wait_exit().code(), Some(0), "{}", vmm.log());
}

fn signal_case(name: &str, sig: libc::c_int, with_vm: bool) {
    let dir = Scratch::new(name);
    let serial = dir.0.join("serial.out");
    let mut args = Vec::new();
    if with_vm {
        let fw = dir.0.join("ticker.bin");
        std::fs::write(&fw, TICKER).unwrap();
        args = vec![
            "--payload".to_string(),
            format!("{},mode=real,irqchip=on", fw.display()),
            "--memory".into(),
            "size=16M".into(),
            "--serial".into(),
            format!("file={}", serial.display()),
        ];
    }
    let mut vmm = Vmm::start(&dir.0, &args);
    if with_vm {
        assert_eq!(vmm.state(), "Running");
        wait_output(&serial, 0);
    }
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    let rc = unsafe { libc::kill(vmm.child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
    let st = vmm.wait_exit();
    println!("{name}: exit {st}");
    // Exit status 0, not "killed by signal": the handler ran and the VMM shut down.
    assert_eq!(st.code(), Some(0), "{st}: {}", vmm.log());
    assert!(
        !vmm.sock.exists(),
        "{} is still there after the VMM exited",
        vmm.sock.display()
    );
    if with_vm {
        let at = serial_len(&serial);
        std::thread::sleep(QUIET);
        assert_eq!(serial_len(&serial), at);
        assert_guest_bytes(&serial);
    }
}

#[test]
fn api_sigterm_releases_and_unlinks() {
    if !kvm_available("api_sigterm_releases_and_unlinks") {
        return;
    }
    signal_case("sigterm-vm", libc::SIGTERM, true);
    signal_case("sigint-empty", libc::SIGINT, false);
}

#[test]
fn empty_vmm_refuses_vm_flags_without_a_kernel() {
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"))
        .args([
            "--api-socket",
            "/nonexistent/dir/api.sock",
            "--memory",
            "size=1G",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("stderr: {err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--memory") && err.contains("vm.create"),
        "{err}"
    );
}
