//! The reply bytes on a real socket are micro_http's, as Cloud Hypervisor's client reads them:
//! status line `HTTP/1.1 NNN ` without a reason phrase, `Content-Length: ` only with a body,
//! error bodies as JSON arrays of strings, and ASCII bodies (that client converts each
//! 256-byte chunk to UTF-8 on its own).
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::Harness;

/// One reply read as Cloud Hypervisor's client reads it: 256-byte chunks, each converted
/// to UTF-8 on its own; the status is what follows `HTTP/1.1 ` up to the CR; the body length
/// comes from `Content-Length: ` when present, else the reply ends with the headers.
struct Reply {
    head: String,
    status: u16,
    body: String,
}

fn exchange(h: &Harness, request: &[u8]) -> Reply {
    let mut s = UnixStream::connect(&h.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut res = String::new();
    let mut chunk = [0u8; 256];
    loop {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a complete reply: {res:?}");
        let text = std::str::from_utf8(&chunk[..n])
            .unwrap_or_else(|e| panic!("a 256-byte chunk is not UTF-8 on its own: {e}"));
        res.push_str(text);
        let Some(end) = res.find("\r\n\r\n") else {
            continue;
        };
        let head = res[..end + 4].to_string();
        let length = head.find("Content-Length: ").map(|o| {
            let rest = &head[o + "Content-Length: ".len()..];
            rest[..rest.find('\r').unwrap()]
                .trim()
                .parse::<usize>()
                .unwrap()
        });
        let body_len = length.unwrap_or(0);
        if res.len() < end + 4 + body_len {
            continue;
        }
        let o = head
            .find("HTTP/1.1 ")
            .expect("no HTTP/1.1 in the status line");
        let code = &head[o + "HTTP/1.1 ".len()..o + head[o..].find('\r').unwrap()];
        let status = code.trim().parse().unwrap_or_else(|_| {
            panic!("status `{code}` is not a number as Cloud Hypervisor's client reads it")
        });
        return Reply {
            body: res[end + 4..end + 4 + body_len].to_string(),
            head,
            status,
        };
    }
}

fn json_head(code: u16, extra: &str, len: usize) -> String {
    format!(
        "HTTP/1.1 {code} \r\nServer: ioasid-vmm API\r\nConnection: keep-alive\r\n{extra}\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

#[test]
fn api_wire_matches_micro_http() {
    println!("TEST api_wire_matches_micro_http: exact status lines, headers and bodies");
    let h = Harness::start("wire");

    // 200 with a JSON body.
    let r = exchange(
        &h,
        b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    println!("200: {:?} {}", r.head, r.body);
    assert_eq!(r.status, 200);
    assert_eq!(r.head, json_head(200, "", r.body.len()));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["version"], "fake-vmm");

    // 204: no body, so neither Content-Type nor Content-Length.
    let r = exchange(
        &h,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: localhost\r\n\r\n",
    );
    println!("204: {:?}", r.head);
    assert_eq!(r.status, 204);
    assert_eq!(
        r.head,
        "HTTP/1.1 204 \r\nServer: ioasid-vmm API\r\nConnection: keep-alive\r\n\r\n"
    );
    assert!(r.body.is_empty());

    // 4xx: the error body is an array of strings, the message first.
    let body = r#"{"id":"ghost0"}"#;
    let req = format!(
        "PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = exchange(&h, req.as_bytes());
    println!("404: {:?} {}", r.head, r.body);
    assert_eq!(r.status, 404);
    assert_eq!(r.head, json_head(404, "", r.body.len()));
    let messages: Vec<String> = serde_json::from_str(&r.body).unwrap();
    assert!(messages[0].contains("ghost0"), "{messages:?}");

    let r = exchange(
        &h,
        b"PUT /api/v1/vm.shutdown HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
    );
    println!("400: {:?} {}", r.head, r.body);
    assert_eq!(r.status, 400);
    assert_eq!(r.head, json_head(400, "", r.body.len()));
    let messages: Vec<String> = serde_json::from_str(&r.body).unwrap();
    assert_eq!(
        messages,
        vec!["This endpoint takes no request body".to_string()]
    );

    let r = exchange(&h, b"GET /api/v1/vm.boot HTTP/1.1\r\n\r\n");
    println!("405: {:?} {}", r.head, r.body);
    assert_eq!(r.status, 405);
    assert_eq!(r.head, json_head(405, "Allow: PUT\r\n", r.body.len()));
    serde_json::from_str::<Vec<String>>(&r.body).unwrap();

    // A path with non-ASCII characters: the reply is ASCII (escapes in the JSON strings),
    // and decodes to the characters that were sent.
    let mut req = b"GET /api/v1/vm.".to_vec();
    let word = "\u{e9}t\u{e9}-\u{1f600}-".repeat(20);
    req.extend_from_slice(word.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\n\r\n");
    let r = exchange(&h, &req);
    println!("non-ASCII path: {:?} {}", r.head, r.body);
    assert!(
        (400..500).contains(&r.status),
        "status {} for an unknown non-ASCII path",
        r.status
    );
    assert!(r.body.is_ascii(), "body is not ASCII: {}", r.body);
    assert!(r.body.contains("\\u00e9"), "no \\u escape: {}", r.body);
    let messages: Vec<String> = serde_json::from_str(&r.body).unwrap();
    assert!(
        messages.iter().any(|m| m.contains(&word)),
        "the decoded message does not name the path: {messages:?}"
    );
}
