//! Helpers of the hardening tests: a server with chosen [`ServerOptions`], a fake VMM that
//! counts what it executes and can be made busy, raw clients that send bytes and
//! `SCM_RIGHTS` fds, and process figures (fds, RSS, the server thread's CPU).
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api::{ApiError, ApiReceiver, ApiRequest, ServerHandle, ServerOptions, VmmPingResponse};

#[path = "../common/mod.rs"]
mod common;
pub use common::TempDir;

/// What the fake VMM executed, by request name.
pub type Executed = Arc<Mutex<BTreeMap<&'static str, u32>>>;

/// A server on a temp socket and a fake VMM thread.
pub struct Rig {
    pub dir: TempDir,
    pub socket: PathBuf,
    pub server: Option<ServerHandle>,
    pub executed: Executed,
    /// While set, the fake VMM does not drain its channel (a VMM stuck on a long request).
    pub busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    vmm: Option<JoinHandle<()>>,
}

impl Rig {
    pub fn start(tag: &str, options: ServerOptions) -> Rig {
        let dir = TempDir::new(tag);
        let socket = dir.path().join("api.sock");
        let (receiver, tx, evt) = ApiReceiver::new().unwrap();
        let server = api::start_server_with_options(&socket, tx, evt, options).unwrap();
        let executed: Executed = Arc::default();
        let busy = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let vmm = {
            let (executed, busy, stop) = (executed.clone(), busy.clone(), stop.clone());
            std::thread::spawn(move || fake_vmm(receiver, executed, busy, stop))
        };
        Rig {
            dir,
            socket,
            server: Some(server),
            executed,
            busy,
            stop,
            vmm: Some(vmm),
        }
    }

    pub fn count(&self, name: &str) -> u32 {
        self.executed
            .lock()
            .unwrap()
            .get(name)
            .copied()
            .unwrap_or(0)
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }

    /// A legitimate client: one ping on a new connection. Returns the status and how long
    /// it took to be served.
    pub fn ping(&self) -> (u16, Duration) {
        let t = Instant::now();
        let mut s = self.connect();
        s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
        (r.map(|r| r.0).unwrap_or(0), t.elapsed())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.busy.store(false, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.vmm.take() {
            let _ = t.join();
        }
    }
}

fn fake_vmm(
    receiver: ApiReceiver,
    executed: Executed,
    busy: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: receiver.event_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call.
        unsafe { libc::poll(&mut pfd, 1, 20) };
        if busy.load(Ordering::SeqCst) {
            continue;
        }
        for req in receiver.drain() {
            *executed.lock().unwrap().entry(req.name()).or_default() += 1;
            match req {
                ApiRequest::Ping(r) => r.send(Ok(VmmPingResponse {
                    version: "fake".into(),
                    ..Default::default()
                })),
                ApiRequest::VmShutdown(r) => r.send(Ok(())),
                other => other.fail(ApiError::NotFound("fake VMM: no VM".into())),
            }
        }
    }
}

/// Reads one reply (status, body) from `s`, skipping `100 Continue`; `None` on EOF, error
/// or when `limit` passes. Bytes after the reply stay in `buf`.
pub fn read_reply(s: &mut UnixStream, buf: &mut Vec<u8>, limit: Duration) -> Option<(u16, String)> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.get(9..12)?.parse().ok()?;
            if status == 100 {
                buf.drain(..end + 4);
                continue;
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
                buf.drain(..end + 4 + len);
                return Some((status, body));
            }
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Whether the server closed `s` (EOF, or a reset) within `limit`, reading and discarding
/// anything before it.
pub fn closed_within(s: &mut UnixStream, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// `sendmsg` of `bytes` with `fds` as `SCM_RIGHTS`.
pub fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds CMSG_SPACE(fd_bytes) aligned bytes, so the first
        // header and its data (fd_bytes) fit.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr() as *const u8,
                libc::CMSG_DATA(cmsg),
                fd_bytes,
            );
        }
    }
    // SAFETY: `msg` points at `iov` (valid for `bytes`) and `control`, which outlive the call.
    let n = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// How many of this process's fds are open on `path` (the server's copies plus ours).
pub fn fds_on(path: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
                .count()
        })
        .unwrap_or(0)
}

/// Waits (up to `limit`) until `f()` holds; returns whether it did.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// This process's resident set, KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The `stat` files of this process's threads named `api-server`, opened now so they can
/// be read while the process has no fd to spare.
pub fn server_stat_files() -> Vec<std::fs::File> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "api-server")
        })
        .filter_map(|t| std::fs::File::open(t.path().join("stat")).ok())
        .collect()
}

/// CPU time (user + system, clock ticks) of the threads whose `stat` files are `files`.
pub fn server_cpu_ticks(files: &mut [std::fs::File]) -> u64 {
    use std::io::{Seek, SeekFrom};
    files
        .iter_mut()
        .filter_map(|f| {
            f.seek(SeekFrom::Start(0)).ok()?;
            let mut stat = String::new();
            f.read_to_string(&mut stat).ok()?;
            Some(stat)
        })
        .map(|stat| {
            // Fields after the ")" of comm: state is field 3; utime 14, stime 15.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = rest.split_whitespace().collect();
            let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            get(11) + get(12)
        })
        .sum()
}

/// Short timeouts for tests.
pub fn test_options() -> ServerOptions {
    ServerOptions {
        reply_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
        ..ServerOptions::default()
    }
}
