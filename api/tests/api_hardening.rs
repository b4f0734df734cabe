//! The API server under hostile clients (issue 17, item 1): slow clients, header and reply
//! bounds, request smuggling through framing headers, and withdrawn 503 requests.
#![allow(clippy::unwrap_used, clippy::panic)]

mod hard;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use api::ServerOptions;
use hard::{closed_within, read_reply, rss_kib, test_options, wait_until, Rig};

#[test]
fn api_slow_clients_time_out() {
    println!("TEST api_slow_clients_time_out: 32 unfinished requests do not lock others out");
    let options = ServerOptions {
        request_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(800),
        ..test_options()
    };
    let rig = Rig::start("slow", options);
    // 32 slowloris connections: a request head that never ends.
    let mut slow: Vec<_> = (0..32)
        .map(|i| {
            let mut s = rig.connect();
            s.write_all(format!("GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow-{i}: ").as_bytes())
                .unwrap();
            s
        })
        .collect();
    // A legitimate client is served while they hold every slot.
    let (status, took) = rig.ping();
    println!("  legitimate ping during 32 slow clients: {status} in {took:?}");
    assert_eq!(status, 200);
    // Each slow client gets 408 (or 503 if it was the one evicted for the ping) and is
    // closed.
    let mut codes = Vec::new();
    for s in slow.iter_mut() {
        let mut buf = Vec::new();
        codes.push(read_reply(s, &mut buf, Duration::from_secs(10)).map(|r| r.0));
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "slow client not closed"
        );
    }
    println!("  slow clients' replies: {codes:?}");
    assert!(
        codes.iter().all(|c| matches!(c, Some(408) | Some(503))),
        "{codes:?}"
    );
    assert!(
        codes.iter().filter(|c| **c == Some(408)).count() >= 31,
        "{codes:?}"
    );
    // A client dripping one byte at a time still has to finish within the request timeout.
    let mut drip = rig.connect();
    let mut answered = None;
    let request = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    for b in request.iter() {
        if drip.write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut buf = Vec::new();
    if let Some((code, body)) = read_reply(&mut drip, &mut buf, Duration::from_secs(10)) {
        answered = Some(code);
        println!("  dripping client: {code} {body}");
    }
    assert_eq!(answered, Some(408));
    // An idle connection is closed; a client that sent nothing gets no reply.
    let mut idle = rig.connect();
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)),
        "idle connection kept"
    );
    assert_eq!(rig.ping().0, 200);
    assert_eq!(rig.count("vmm.ping"), 2, "a slow request reached the VMM");
}

#[test]
fn api_header_and_reply_bounds() {
    println!("TEST api_header_and_reply_bounds: header bytes and unsent replies are bounded");
    let options = ServerOptions {
        max_header_bytes: 4096,
        max_reply_buffer: 4096,
        ..test_options()
    };
    let rig = Rig::start("bounds", options);
    // Many short unknown headers: 431 once the head passes 4096 bytes, then closed.
    let rss_before = rss_kib();
    let mut s = rig.connect();
    let mut sent = 0usize;
    let line = format!("X-Filler: {}\r\n", "f".repeat(100));
    let _ = s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n");
    for _ in 0..200_000 {
        if s.write_all(line.as_bytes()).is_err() {
            break;
        }
        sent += line.len();
    }
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
    println!(
        "  {sent} header bytes accepted by the socket before it closed; reply {:?}; RSS {} -> {} KiB",
        r,
        rss_before,
        rss_kib()
    );
    assert_eq!(r.as_ref().map(|r| r.0), Some(431), "{r:?}");
    assert!(
        sent < 8 << 20,
        "the server kept reading headers: {sent} bytes"
    );
    // Pipelined pings whose replies are never read: the server stops reading.
    let t0 = Instant::now();
    let mut flood = rig.connect();
    flood.set_nonblocking(true).unwrap();
    let ping = b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n";
    let mut requests = 0usize;
    let mut last_progress = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && last_progress.elapsed() < Duration::from_millis(500) {
        match flood.write(ping) {
            Ok(n) if n == ping.len() => {
                requests += 1;
                last_progress = Instant::now();
            }
            Ok(n) => {
                // Finish the partial request blocking, so the stream stays aligned.
                flood.set_nonblocking(false).unwrap();
                flood.write_all(&ping[n..]).unwrap();
                flood.set_nonblocking(true).unwrap();
                requests += 1;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
        if requests > 1_000_000 {
            break;
        }
    }
    println!(
        "  pipelined pings accepted before the server stopped reading: {requests} ({} bytes) in {:?}",
        requests * ping.len(),
        t0.elapsed()
    );
    assert!(
        requests * ping.len() < 8 << 20,
        "the server kept reading a client that does not read its replies"
    );
    // Others are served meanwhile.
    let (status, took) = rig.ping();
    println!("  legitimate ping while a client does not read: {status} in {took:?}");
    assert_eq!(status, 200);
    // When the client reads, every request is answered, in order, none lost.
    flood.set_nonblocking(false).unwrap();
    let mut buf = Vec::new();
    let mut answered = 0;
    while answered < requests {
        match read_reply(&mut flood, &mut buf, Duration::from_secs(10)) {
            Some((200, _)) => {
                answered += 1;
                if answered % 500 == 0 {
                    println!("  {answered} replies after {:?}", t0.elapsed());
                }
            }
            other => panic!(
                "reply {answered} of {requests}: {other:?} after {:?}",
                t0.elapsed()
            ),
        }
    }
    assert!(wait_until(Duration::from_secs(10), || rig
        .count("vmm.ping")
        == requests as u32 + 1));
}

/// Sends `raw` on a new connection; returns the reply and whether the server then closed.
fn exchange(rig: &Rig, raw: &[u8]) -> (Option<(u16, String)>, bool) {
    let mut s = rig.connect();
    let _ = s.write_all(raw);
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
    let closed = buf.is_empty() && closed_within(&mut s, Duration::from_secs(10));
    (r, closed)
}

#[test]
fn api_chunked_and_duplicate_length_rejected() {
    println!("TEST api_chunked_and_duplicate_length_rejected: framing headers that smuggle");
    let rig = Rig::start("framing", test_options());
    let shutdown = "PUT /api/v1/vm.shutdown HTTP/1.1\r\n\r\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "chunked body",
            format!("PUT /api/v1/vm.shutdown HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{shutdown}"),
            "transfer-encoding",
        ),
        (
            "chunked with a length",
            format!("PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n{shutdown}"),
            "transfer-encoding",
        ),
        (
            "conflicting lengths",
            format!(
                "PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{shutdown}",
                shutdown.len()
            ),
            "conflicting",
        ),
        (
            "duplicate lengths",
            "PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 9\r\ncontent-length: 9\r\n\r\n{\"id\":\"a\"}".into(),
            "duplicate",
        ),
        (
            "length list",
            "PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 9, 9\r\n\r\n{\"id\":\"a\"}".into(),
            "content-length",
        ),
        (
            "negative length",
            "PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: -1\r\n\r\n".into(),
            "content-length",
        ),
    ];
    let mut failures = Vec::new();
    for (name, raw, word) in &cases {
        let (r, closed) = exchange(&rig, raw.as_bytes());
        println!("  {name}: {r:?}, closed: {closed}");
        let ok = matches!(&r, Some((400, body))
            if body.to_lowercase().contains(word)
                && serde_json::from_str::<Vec<String>>(body).is_ok());
        if !ok || !closed {
            failures.push(format!("{name}: {r:?}, closed {closed}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Nothing smuggled reached the VMM; a well-framed request still does.
    assert_eq!(rig.count("vm.shutdown"), 0);
    assert_eq!(rig.count("vm.remove-device"), 0);
    let (r, _) = exchange(&rig, shutdown.as_bytes());
    assert_eq!(r.map(|r| r.0), Some(204));
    assert_eq!(rig.count("vm.shutdown"), 1);
}

#[test]
fn api_503_request_never_runs() {
    println!("TEST api_503_request_never_runs: a request answered 503 is withdrawn");
    let options = ServerOptions {
        reply_timeout: Duration::from_millis(300),
        ..test_options()
    };
    let rig = Rig::start("withdraw", options);
    // The VMM is busy past the reply timeout: the client gets 503...
    rig.busy.store(true, Ordering::SeqCst);
    let mut s = rig.connect();
    s.write_all(b"PUT /api/v1/vm.shutdown HTTP/1.1\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
    println!("  while the VMM is busy: {r:?}");
    assert_eq!(r.as_ref().map(|r| r.0), Some(503));
    // ...and when the VMM is free again, the request is not executed.
    rig.busy.store(false, Ordering::SeqCst);
    let (status, _) = rig.ping();
    assert_eq!(status, 200);
    assert_eq!(
        rig.count("vm.shutdown"),
        0,
        "a request answered 503 ran later"
    );
    // A request the VMM answers in time runs once.
    s.write_all(b"PUT /api/v1/vm.shutdown HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(
        read_reply(&mut s, &mut buf, Duration::from_secs(10)).map(|r| r.0),
        Some(204)
    );
    assert_eq!(rig.count("vm.shutdown"), 1);
    drop(rig);
    // The server stops while a request waits on a busy VMM: 503, and never executed. (A
    // long reply timeout, so the 503 can only come from the stop.)
    let options = ServerOptions {
        reply_timeout: Duration::from_secs(60),
        ..test_options()
    };
    let mut rig = Rig::start("withdraw-stop", options);
    rig.busy.store(true, Ordering::SeqCst);
    let mut s = rig.connect();
    s.write_all(b"PUT /api/v1/vm.shutdown HTTP/1.1\r\n\r\n")
        .unwrap();
    // Let the server read it and hand it over (a stop before that is a plain close, which
    // the assertion below would report).
    std::thread::sleep(Duration::from_millis(300));
    let server = rig.server.take().unwrap();
    let stopper = std::thread::spawn(move || server.stop());
    let mut buf = Vec::new();
    let r = read_reply(&mut s, &mut buf, Duration::from_secs(10));
    println!("  at stop: {r:?}");
    assert_eq!(r.map(|r| r.0), Some(503));
    // A stop() that never ends fails here instead of hanging the test.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stopper.is_finished() {
        assert!(
            Instant::now() < deadline,
            "server.stop() still running after 30 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stopper.join().unwrap().unwrap();
    rig.busy.store(false, Ordering::SeqCst);
    // The fake VMM drains every 20 ms; give it a few rounds.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        rig.count("vm.shutdown"),
        0,
        "a request answered 503 at stop ran later"
    );
}
