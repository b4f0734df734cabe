//! The API server under an fd flood (issue 17, item 1). Its own test binary, because it
//! lowers the process's RLIMIT_NOFILE to make `accept` fail with EMFILE.
#![allow(clippy::unwrap_used, clippy::panic)]

mod hard;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use api::ServerOptions;
use hard::{
    closed_within, fds_on, read_reply, rss_kib, send_with_fds, server_cpu_ticks, test_options,
    wait_until, Rig,
};

const PER_REQUEST: usize = 4;
const TOTAL: usize = 16;

fn set_nofile(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the call fills.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur = soft.min(lim.rlim_max);
    // SAFETY: `lim` is a valid rlimit.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

fn nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the call fills.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur
}

fn highest_open_fd() -> i32 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .max()
        .unwrap_or(0)
}

#[test]
fn api_fd_flood_stays_available() {
    println!("TEST api_fd_flood_stays_available: fds on unfinished requests, then EMFILE");
    let options = ServerOptions {
        max_fds_per_request: PER_REQUEST,
        max_fds_total: TOTAL,
        ..test_options()
    };
    let rig = Rig::start("fdflood", options);
    let marker_path = rig.dir.path().join("marker");
    let marker = File::create(&marker_path).unwrap();
    let mine = 1;
    let held = || fds_on(&marker_path) - mine;
    let rss_before = rss_kib();

    // One request with more fds than allowed: 400 at once, its fds closed.
    let mut s = rig.connect();
    let fds = vec![marker.as_raw_fd(); 64];
    send_with_fds(&s, b"PUT /api/v1/vm.add-device HTTP/1.1\r\n", &fds).unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
    println!("  64 fds on one request: {r:?}");
    assert_eq!(r.as_ref().map(|r| r.0), Some(400), "{r:?}");
    assert!(closed_within(&mut s, Duration::from_secs(10)));
    assert!(
        wait_until(Duration::from_secs(10), || held() == 0),
        "fds kept: {}",
        held()
    );

    // Many connections, each with allowed fds on an unfinished request: held fds stay
    // under the total bound; those that go over get 429 and their fds are closed at once.
    let mut flood = Vec::new();
    let mut peak = 0;
    for _ in 0..24 {
        let s = rig.connect();
        send_with_fds(
            &s,
            b"PUT /api/v1/vm.add-device HTTP/1.1\r\n",
            &[marker.as_raw_fd(); PER_REQUEST - 1],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        peak = peak.max(held());
        flood.push(s);
    }
    let mut codes = Vec::new();
    for s in flood.iter_mut() {
        let mut buf = Vec::new();
        codes.push(read_reply(s, &mut buf, Duration::from_millis(300)).map(|r| r.0));
    }
    peak = peak.max(held());
    println!(
        "  24 connections x {} fds: peak held {peak} (bound {TOTAL} + {PER_REQUEST}), replies {codes:?}",
        PER_REQUEST - 1
    );
    assert!(peak <= TOTAL + PER_REQUEST, "held {peak} fds");
    assert!(codes.contains(&Some(429)), "{codes:?}");
    // A legitimate client is served meanwhile.
    let (status, took) = rig.ping();
    println!("  legitimate ping during the fd flood: {status} in {took:?}");
    assert_eq!(status, 200);
    // Dropping the connections closes the fds received on them.
    drop(flood);
    assert!(
        wait_until(Duration::from_secs(10), || held() == 0),
        "fds kept: {}",
        held()
    );

    // EMFILE: the process is out of fds while clients connect. accept backs off instead of
    // spinning; when fds are free again the waiting clients are served.
    let spare: Vec<OwnedFd> = (0..4)
        .map(|_| {
            // SAFETY: socket() takes no pointers; the result is checked.
            let fd =
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0);
            // SAFETY: a fresh fd nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect();
    let mut stat = hard::server_stat_files();
    assert_eq!(stat.len(), 1, "the api-server thread's stat file");
    let old_limit = nofile();
    set_nofile(highest_open_fd() as u64 + 1);
    // Fill any holes below the limit so no new fd can be allocated.
    let mut fillers = Vec::new();
    while let Ok(f) = marker.try_clone() {
        fillers.push(f);
    }
    let addr = rig.socket.clone();
    for fd in &spare {
        let c = std::ffi::CString::new(addr.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: sockaddr_un is plain old data.
        let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in sa.sun_path.iter_mut().zip(c.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: `sa` is a valid sockaddr_un that outlives the call.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &sa as *const libc::sockaddr_un as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    let failures0 = rig.server.as_ref().unwrap().accept_failures();
    let cpu0 = server_cpu_ticks(&mut stat);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let cpu = server_cpu_ticks(&mut stat) - cpu0;
    let failures = rig.server.as_ref().unwrap().accept_failures() - failures0;
    // SAFETY: sysconf takes no pointers.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    drop(fillers);
    set_nofile(old_limit);
    println!(
        "  server thread CPU while accept hits EMFILE: {cpu} ticks in {:?} ({} ms at {hz} Hz)",
        t.elapsed(),
        cpu * 1000 / hz
    );
    println!("  failed accept calls in that second: {failures}");
    // A spinning accept loop fails thousands of times a second; the back-off (10 ms
    // doubling to 1 s) a handful.
    assert!(
        failures >= 1,
        "accept never hit EMFILE: the test did not exhaust fds"
    );
    assert!(
        failures <= 20,
        "accept spun on EMFILE: {failures} failures in a second"
    );
    // The clients that connected during EMFILE are served once fds are free.
    let t = Instant::now();
    for fd in spare {
        let mut s = std::os::unix::net::UnixStream::from(fd);
        s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
        assert_eq!(r.map(|r| r.0), Some(200));
    }
    println!(
        "  clients queued during EMFILE served {:?} after fds were freed",
        t.elapsed()
    );
    println!("  RSS {} -> {} KiB", rss_before, rss_kib());
    assert_eq!(held(), 0);
}
