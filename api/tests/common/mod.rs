//! Test harness: a temp dir, the real API server on a real Unix socket, and a fake VMM thread
//! that keeps a small device table and answers requests the way the real VMM will.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use api::client::{ApiClient, ClientResponse};
use api::routes::HttpMethod;
use api::{
    ApiError, ApiReceiver, ApiRequest, Attachment, DeviceConfig, DeviceIommuCaps, DeviceNode,
    HwptInfo, HwptKind, IoasInfo, IoasidsInfo, IommuInfo, PasidEntry, PasidsInfo, PciDeviceInfo,
    PtType, ServerHandle, VmCounters, VmInfo, VmState, VmmPingResponse,
};

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "ioasid-api-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fake VMM saw of an fd that came with `vm.add-device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceivedFd {
    pub dev: u64,
    pub ino: u64,
    pub cloexec: bool,
}

struct FakeDevice {
    config: DeviceConfig,
    bdf: String,
    slot: u8,
}

/// The fake VMM's state.
struct FakeState {
    devices: BTreeMap<String, FakeDevice>,
    next_auto_id: u32,
    ops: u64,
    vm_state: VmState,
}

/// Behaviour knobs of the fake, to drive every `ApiError` kind:
/// - a path whose BDF is `0000:ff:1f.7` does not exist on the "host" (NotFound, 404);
/// - `pci_device_id` 0 is the host bridge (BadRequest, 400);
/// - the id `boom` makes the VMM fail (Internal, 500);
/// - an id or path already present is a Conflict (409).
const MISSING_BDF: &str = "0000:ff:1f.7";

impl FakeState {
    fn add_device(
        &mut self,
        config: DeviceConfig,
        fd: Option<OwnedFd>,
        received: &Mutex<Vec<ReceivedFd>>,
    ) -> Result<PciDeviceInfo, ApiError> {
        if let Some(fd) = &fd {
            received.lock().unwrap().push(fstat_fd(fd));
        }
        if let Some(path) = &config.path {
            if path.to_string_lossy().contains(MISSING_BDF) {
                return Err(ApiError::NotFound(format!(
                    "Host device {} does not exist",
                    path.display()
                )));
            }
            if self
                .devices
                .values()
                .any(|d| d.config.path.as_ref() == Some(path))
            {
                return Err(ApiError::Conflict(format!(
                    "Device {} is already assigned",
                    path.display()
                )));
            }
        }
        let id = match &config.id {
            Some(id) => id.clone(),
            None => {
                self.next_auto_id += 1;
                format!("_vfio{}", self.next_auto_id - 1)
            }
        };
        if id == "boom" {
            return Err(ApiError::Internal(
                "Fake VMM failure while adding boom".into(),
            ));
        }
        if self.devices.contains_key(&id) {
            return Err(ApiError::Conflict(format!("Device id {id} already exists")));
        }
        let slot = match config.pci_device_id {
            Some(0) => return Err(ApiError::BadRequest("PCI slot 0 is the host bridge".into())),
            Some(s) => {
                if self.devices.values().any(|d| d.slot == s) {
                    return Err(ApiError::Conflict(format!("PCI slot {s} is taken")));
                }
                s
            }
            None => (1..32)
                .find(|s| self.devices.values().all(|d| d.slot != *s))
                .ok_or_else(|| ApiError::BadRequest("No free PCI slot".into()))?,
        };
        let bdf = format!("{:04x}:00:{slot:02x}.0", config.pci_segment);
        self.devices.insert(
            id.clone(),
            FakeDevice {
                config,
                bdf: bdf.clone(),
                slot,
            },
        );
        self.ops += 1;
        Ok(PciDeviceInfo { id, bdf })
    }

    fn remove_device(&mut self, id: &str) -> Result<(), ApiError> {
        self.devices
            .remove(id)
            .map(|_| self.ops += 1)
            .ok_or_else(|| ApiError::NotFound(format!("No device with id {id}")))
    }

    fn info(&self) -> VmInfo {
        let tree = self
            .devices
            .iter()
            .map(|(id, d)| {
                (
                    id.clone(),
                    DeviceNode {
                        id: id.clone(),
                        resources: Vec::new(),
                        children: Vec::new(),
                        pci_bdf: Some(d.bdf.clone()),
                    },
                )
            })
            .collect();
        VmInfo {
            config: api::VmConfig::from_json(br#"{"payload":{"kernel":"/fake"}}"#).unwrap(),
            state: self.vm_state,
            memory_actual_size: Some(1 << 30),
            device_tree: Some(tree),
        }
    }

    fn iommu(&self) -> IommuInfo {
        IommuInfo {
            backend: "soft".into(),
            viommu: None,
            devices: self
                .devices
                .iter()
                .map(|(id, d)| DeviceIommuCaps {
                    id: id.clone(),
                    host: d.config.path.as_ref().map(|p| p.display().to_string()),
                    nesting: d.config.iommu,
                    pasid_width: if d.config.pasid { 20 } else { 0 },
                    prs: d.config.pasid,
                    dmwr: false,
                    details: serde_json::json!({ "fake": true }),
                })
                .collect(),
        }
    }

    fn ioasids(&self) -> IoasidsInfo {
        IoasidsInfo {
            ioases: vec![IoasInfo {
                id: 1,
                mappings: self.devices.len() as u64,
                mapped_bytes: (self.devices.len() as u64) << 30,
            }],
            hwpts: vec![HwptInfo {
                id: 2,
                kind: HwptKind::NestParent,
                ioas: 1,
                parent: None,
                format: None,
            }],
            attachments: self
                .devices
                .keys()
                .map(|id| Attachment {
                    device: id.clone(),
                    pasid: None,
                    pt_type: PtType::Hwpt,
                    pt_id: 2,
                })
                .collect(),
        }
    }

    fn pasids(&self) -> PasidsInfo {
        PasidsInfo {
            entries: self
                .devices
                .iter()
                .filter(|(_, d)| d.config.pasid)
                .map(|(id, _)| PasidEntry {
                    device: id.clone(),
                    gpasid: 1,
                    hpasid: 1,
                    hwpt: None,
                })
                .collect(),
        }
    }

    fn counters(&self) -> VmCounters {
        VmCounters {
            iommu: api::IommuCounters {
                host_ioctls: self.ops,
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

fn fstat_fd(fd: &OwnedFd) -> ReceivedFd {
    // SAFETY: fstat writes into a zeroed stat struct we own; the fd is open (owned).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` outlives the call.
    let rc = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    assert_eq!(rc, 0, "fstat of the received fd failed");
    // SAFETY: F_GETFD only reads the descriptor flags of an open fd.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    ReceivedFd {
        dev: st.st_dev,
        ino: st.st_ino,
        cloexec: flags >= 0 && flags & libc::FD_CLOEXEC != 0,
    }
}

/// The fake VMM thread.
pub struct FakeVmm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub received_fds: Arc<Mutex<Vec<ReceivedFd>>>,
    pub vmm_shutdowns: Arc<AtomicU64>,
}

impl FakeVmm {
    fn spawn(receiver: ApiReceiver) -> FakeVmm {
        let stop = Arc::new(AtomicBool::new(false));
        let received_fds = Arc::new(Mutex::new(Vec::new()));
        let vmm_shutdowns = Arc::new(AtomicU64::new(0));
        let (s, r, v) = (stop.clone(), received_fds.clone(), vmm_shutdowns.clone());
        let thread = std::thread::spawn(move || fake_loop(receiver, &s, &r, &v));
        FakeVmm {
            stop,
            thread: Some(thread),
            received_fds,
            vmm_shutdowns,
        }
    }
}

impl Drop for FakeVmm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fake_loop(
    receiver: ApiReceiver,
    stop: &AtomicBool,
    received: &Mutex<Vec<ReceivedFd>>,
    vmm_shutdowns: &AtomicU64,
) {
    let mut state = FakeState {
        devices: BTreeMap::new(),
        next_auto_id: 0,
        ops: 0,
        vm_state: VmState::Running,
    };
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: receiver.event_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call.
        unsafe { libc::poll(&mut pfd, 1, 50) };
        for req in receiver.drain() {
            match req {
                ApiRequest::Ping(r) => r.send(Ok(VmmPingResponse {
                    build_version: "test".into(),
                    version: "fake-vmm".into(),
                    pid: i64::from(std::process::id()),
                    features: vec!["fake".into()],
                })),
                ApiRequest::VmInfo(r) => r.send(Ok(state.info())),
                ApiRequest::AddDevice { config, fd, reply } => {
                    assert!(config.fd.is_none(), "server must clear config.fd");
                    reply.send(state.add_device(config, fd, received).map(Some))
                }
                ApiRequest::RemoveDevice { id, reply } => reply.send(state.remove_device(&id)),
                ApiRequest::VmShutdown(r) => {
                    state.vm_state = VmState::Shutdown;
                    r.send(Ok(()))
                }
                ApiRequest::VmCreate { config, reply } => {
                    reply.send(if config.cpus.boot_vcpus == 0 {
                        Err(ApiError::Chain {
                            kind: api::ApiErrorKind::BadRequest,
                            messages: vec![
                                "Invalid VmConfig".into(),
                                "--cpus: invalid value '0' for boot".into(),
                            ],
                        })
                    } else {
                        Ok(())
                    })
                }
                ApiRequest::VmBoot(r) | ApiRequest::VmResume(r) | ApiRequest::VmReboot(r) => {
                    state.vm_state = VmState::Running;
                    r.send(Ok(()))
                }
                ApiRequest::VmPause(r) => {
                    state.vm_state = VmState::Paused;
                    r.send(Ok(()))
                }
                ApiRequest::VmDelete(r) => r.send(Ok(())),
                ApiRequest::VmmShutdown(r) => {
                    vmm_shutdowns.fetch_add(1, Ordering::SeqCst);
                    r.send(Ok(()))
                }
                ApiRequest::Iommu(r) => r.send(Ok(state.iommu())),
                ApiRequest::Ioasids(r) => r.send(Ok(state.ioasids())),
                ApiRequest::Pasids(r) => r.send(Ok(state.pasids())),
                ApiRequest::Counters(r) => r.send(Ok(state.counters())),
            }
        }
    }
}

/// Server + fake VMM + client in a temp dir. Dropping stops everything.
pub struct Harness {
    pub client: ApiClient,
    pub socket: PathBuf,
    pub server: Option<ServerHandle>,
    pub fake: FakeVmm,
    pub dir: TempDir,
}

impl Harness {
    pub fn start(tag: &str) -> Harness {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("api.sock");
        let (receiver, tx, evt) = ApiReceiver::new().unwrap();
        let fake = FakeVmm::spawn(receiver);
        let server = api::start_server(&socket, tx, evt).unwrap();
        let client = ApiClient::new(&socket).with_timeout(Duration::from_secs(30));
        Harness {
            client,
            socket,
            server: Some(server),
            fake,
            dir,
        }
    }

    pub fn get(&self, endpoint: &str) -> ClientResponse {
        self.client
            .request(HttpMethod::Get, endpoint, None, &[])
            .unwrap()
    }

    pub fn put(&self, endpoint: &str, body: Option<&str>) -> ClientResponse {
        self.client
            .request(HttpMethod::Put, endpoint, body.map(str::as_bytes), &[])
            .unwrap()
    }

    /// Everything the introspection endpoints say, for before/after comparisons.
    pub fn snapshot(&self) -> BTreeMap<&'static str, serde_json::Value> {
        let mut out = BTreeMap::new();
        for ep in [
            "vm.info",
            "vm.iommu",
            "vm.ioasids",
            "vm.pasids",
            "vm.counters",
        ] {
            let r = self.get(ep);
            assert_eq!(r.status, 200, "GET {ep}: {}", r.error_message());
            out.insert(ep, r.json().unwrap());
        }
        out
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop().unwrap();
        }
    }
}

/// A sysfs path the fake accepts.
pub fn pci_path(dev: u8) -> String {
    format!("/sys/bus/pci/devices/0000:01:{dev:02x}.0")
}
