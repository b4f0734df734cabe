//! The API server over a real Unix socket against a fake VMM thread.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use api::routes::HttpMethod;
use common::{pci_path, Harness};

#[test]
fn api_ping_and_info_happy_path() {
    println!("TEST api_ping_and_info_happy_path: GET vmm.ping and vm.info");
    let h = Harness::start("ping");
    let r = h.get("vmm.ping");
    assert_eq!(r.status, 200, "{}", r.error_message());
    let v = r.json().unwrap();
    assert_eq!(v["version"], "fake-vmm");
    assert_eq!(v["pid"], i64::from(std::process::id()));

    let r = h.get("vm.info");
    assert_eq!(r.status, 200, "{}", r.error_message());
    let v = r.json().unwrap();
    assert_eq!(v["state"], "Running");
    assert_eq!(v["config"]["payload"]["kernel"], "/fake");
    assert!(v["device_tree"].as_object().unwrap().is_empty());
}

#[test]
fn api_socket_is_private() {
    println!("TEST api_socket_is_private: the socket file has mode 0600");
    let h = Harness::start("mode");
    let meta = std::fs::metadata(&h.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // A second server on the same live socket is refused, and the first keeps working.
    let (_rx, tx, evt) = api::ApiReceiver::new().unwrap();
    let err = api::start_server(&h.socket, tx, evt).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(h.get("vmm.ping").status, 200);
}

#[test]
fn api_add_remove_device_happy_path() {
    println!("TEST api_add_remove_device_happy_path: add (Cloud Hypervisor body), info, remove");
    let h = Harness::start("addrm");
    // Exactly what a Cloud Hypervisor client serializes for `path=...,iommu=on,id=nic0`.
    let body = format!(
        r#"{{"id":"nic0","iommu":true,"pci_segment":0,"path":"{}","x_exclude_mmap_bars":[]}}"#,
        pci_path(0)
    );
    let r = h.put("vm.add-device", Some(&body));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let info = r.json().unwrap();
    assert_eq!(info["id"], "nic0");
    assert_eq!(info["bdf"], "0000:00:01.0");

    // Our extension, and an id chosen by the VMM.
    let body = format!(
        r#"{{"path":"{}","iommu":true,"pasid":true,"pci_device_id":7}}"#,
        pci_path(1)
    );
    let r = h.put("vm.add-device", Some(&body));
    assert_eq!(r.status, 200, "{}", r.error_message());
    let auto = r.json().unwrap();
    assert_eq!(auto["bdf"], "0000:00:07.0");
    let auto_id = auto["id"].as_str().unwrap().to_string();

    let tree = h.get("vm.info").json().unwrap()["device_tree"].clone();
    assert_eq!(tree["nic0"]["pci_bdf"], "0000:00:01.0");
    assert_eq!(tree[&auto_id]["pci_bdf"], "0000:00:07.0");
    let pasids = h.get("vm.pasids").json().unwrap();
    assert_eq!(pasids["entries"][0]["device"], auto_id.as_str());
    let iommu = h.get("vm.iommu").json().unwrap();
    assert_eq!(iommu["devices"].as_array().unwrap().len(), 2);

    let r = h.put("vm.remove-device", Some(r#"{"id":"nic0"}"#));
    assert_eq!(r.status, 204, "{}", r.error_message());
    assert!(r.body.is_empty());
    let tree = h.get("vm.info").json().unwrap()["device_tree"].clone();
    assert!(tree.get("nic0").is_none());
    assert_eq!(
        h.get("vm.counters").json().unwrap()[api::IOMMU_COUNTERS_KEY]["host_ioctls"],
        3
    );

    // Removing it again is a 404 (Cloud Hypervisor PR #8559 semantics).
    let r = h.put("vm.remove-device", Some(r#"{"id":"nic0"}"#));
    assert_eq!(r.status, 404, "{}", r.error_message());
    assert!(r.error_message().contains("nic0"));
}

#[test]
fn api_shutdown_endpoints() {
    println!("TEST api_shutdown_endpoints: vm.shutdown and vmm.shutdown give 204");
    let h = Harness::start("shutdown");
    let r = h.put("vm.shutdown", None);
    assert_eq!(r.status, 204, "{}", r.error_message());
    assert_eq!(h.get("vm.info").json().unwrap()["state"], "Shutdown");
    let r = h.put("vmm.shutdown", None);
    assert_eq!(r.status, 204, "{}", r.error_message());
    assert_eq!(
        h.fake
            .vmm_shutdowns
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// One bad request and what it must get back.
struct Case {
    name: &'static str,
    raw: Vec<u8>,
    fds: usize,
    status: u16,
    /// Text the error message must contain.
    mentions: &'static str,
}

fn put_raw(endpoint: &str, body: &str) -> Vec<u8> {
    format!(
        "PUT /api/v1/{endpoint} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn add(body: &str) -> Vec<u8> {
    put_raw("vm.add-device", body)
}

fn request_line(method: &str, endpoint: &str) -> Vec<u8> {
    format!("{method} /api/v1/{endpoint} HTTP/1.1\r\n\r\n").into_bytes()
}

fn case(name: &'static str, raw: Vec<u8>, status: u16, mentions: &'static str) -> Case {
    Case {
        name,
        raw,
        fds: 0,
        status,
        mentions,
    }
}

#[test]
fn api_bad_inputs_state_unchanged() {
    println!("TEST api_bad_inputs_state_unchanged: every bad input gets a 4xx/5xx JSON error");
    let h = Harness::start("bad");
    // Existing state the bad requests must not disturb.
    let setup = format!(r#"{{"path":"{}","id":"keep0"}}"#, pci_path(0));
    assert_eq!(h.put("vm.add-device", Some(&setup)).status, 200);
    let before = h.snapshot();

    let p = pci_path(5);
    let big = format!(r#"{{"path":"{p}","id":"{}"}}"#, "a".repeat(60_000));
    let long_header = format!(
        "GET /api/v1/vmm.ping HTTP/1.1\r\nX-Long: {}\r\n\r\n",
        "b".repeat(2000)
    );
    let mut non_utf8 = b"PUT /api/v1/vm.add-device HTTP/1.1\r\nContent-Length: 4\r\n\r\n".to_vec();
    non_utf8.extend_from_slice(&[0xff, 0xfe, 0x00, 0x80]);
    let cases = vec![
        case(
            "malformed JSON",
            add(r#"{"path": "#),
            400,
            "Invalid DeviceConfig",
        ),
        case("JSON array body", add("[1,2]"), 400, "Invalid DeviceConfig"),
        case("not UTF-8", non_utf8, 400, "Invalid DeviceConfig"),
        case(
            "empty add-device body",
            request_line("PUT", "vm.add-device"),
            400,
            "body required",
        ),
        case(
            "unknown field",
            add(&format!(r#"{{"path":"{p}","colour":"red"}}"#)),
            400,
            "colour",
        ),
        case(
            "unknown x_ field",
            add(&format!(r#"{{"path":"{p}","x_foo":1}}"#)),
            400,
            "x_foo",
        ),
        case(
            "wrong type bool",
            add(&format!(r#"{{"path":"{p}","iommu":"yes"}}"#)),
            400,
            "boolean",
        ),
        case(
            "wrong type path",
            add(r#"{"path":42}"#),
            400,
            "Invalid DeviceConfig",
        ),
        case(
            "pci_device_id > u8",
            add(&format!(r#"{{"path":"{p}","pci_device_id":300}}"#)),
            400,
            "pci_device_id",
        ),
        case(
            "pci_device_id 32",
            add(&format!(r#"{{"path":"{p}","pci_device_id":32}}"#)),
            400,
            "pci_device_id",
        ),
        case(
            "negative segment",
            add(&format!(r#"{{"path":"{p}","pci_segment":-1}}"#)),
            400,
            "Invalid DeviceConfig",
        ),
        case(
            "path /etc/passwd",
            add(r#"{"path":"/etc/passwd"}"#),
            400,
            "not allowed",
        ),
        case(
            "path with ..",
            add(r#"{"path":"/sys/bus/pci/devices/../../../etc/passwd"}"#),
            400,
            "not allowed",
        ),
        case(
            "cdev path not vfioN",
            add(r#"{"path":"/dev/vfio/devices/vfio0x"}"#),
            400,
            "vfio<N>",
        ),
        case(
            "BDF device number above 0x1f",
            add(r#"{"path":"/sys/bus/pci/devices/0000:00:20.0"}"#),
            400,
            "device number 0x20 is above 0x1f",
        ),
        case(
            "path not a BDF",
            add(r#"{"path":"/sys/bus/pci/devices/foo"}"#),
            400,
            "not allowed",
        ),
        case(
            "x_nv_gpudirect_clique set",
            add(&format!(r#"{{"path":"{p}","x_nv_gpudirect_clique":1}}"#)),
            400,
            "x_nv_gpudirect_clique",
        ),
        case(
            "x_exclude_mmap_bars set",
            add(&format!(r#"{{"path":"{p}","x_exclude_mmap_bars":[0]}}"#)),
            400,
            "x_exclude_mmap_bars",
        ),
        case("neither path nor fd", add("{}"), 400, "path"),
        case(
            "fd in body, none passed",
            add(r#"{"fd":5}"#),
            400,
            "SCM_RIGHTS",
        ),
        case(
            "pasid without iommu",
            add(&format!(r#"{{"path":"{p}","pasid":true}}"#)),
            400,
            "iommu",
        ),
        case(
            "bad id",
            add(&format!(r#"{{"path":"{p}","id":"a b"}}"#)),
            400,
            "id",
        ),
        case(
            "duplicate id",
            add(&format!(r#"{{"path":"{p}","id":"keep0"}}"#)),
            409,
            "keep0",
        ),
        case(
            "duplicate path",
            add(&format!(r#"{{"path":"{}"}}"#, pci_path(0))),
            409,
            "already assigned",
        ),
        case(
            "VMM: host device missing",
            add(r#"{"path":"/sys/bus/pci/devices/0000:ff:1f.7"}"#),
            404,
            "does not exist",
        ),
        case(
            "VMM: slot 0",
            add(&format!(r#"{{"path":"{p}","pci_device_id":0}}"#)),
            400,
            "host bridge",
        ),
        case(
            "VMM: internal failure",
            add(&format!(r#"{{"path":"{p}","id":"boom"}}"#)),
            500,
            "boom",
        ),
        case("oversized body", add(&big), 413, "exceeds the limit"),
        case(
            "remove unknown id",
            put_raw("vm.remove-device", r#"{"id":"nope"}"#),
            404,
            "nope",
        ),
        case(
            "remove without id",
            put_raw("vm.remove-device", "{}"),
            400,
            "id",
        ),
        case(
            "remove unknown field",
            put_raw("vm.remove-device", r#"{"id":"keep0","force":true}"#),
            400,
            "force",
        ),
        case(
            "remove wrong type",
            put_raw("vm.remove-device", r#"{"id":7}"#),
            400,
            "Invalid VmRemoveDevice",
        ),
        case(
            "remove bad id",
            put_raw("vm.remove-device", r#"{"id":""}"#),
            400,
            "id",
        ),
        case(
            "vm.shutdown with a body",
            put_raw("vm.shutdown", "{}"),
            400,
            "no request body",
        ),
        case(
            "vm.info with a body",
            b"GET /api/v1/vm.info HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
            400,
            "no request body",
        ),
        case(
            "unknown route",
            request_line("GET", "vm.nope"),
            404,
            "Unknown route",
        ),
        case(
            "unknown version",
            b"GET /api/v2/vmm.ping HTTP/1.1\r\n\r\n".to_vec(),
            404,
            "Unknown route",
        ),
        case(
            "POST add-device",
            request_line("POST", "vm.add-device"),
            405,
            "PUT",
        ),
        case(
            "GET add-device",
            request_line("GET", "vm.add-device"),
            405,
            "PUT",
        ),
        case("PUT vmm.ping", request_line("PUT", "vmm.ping"), 405, "GET"),
        case(
            "DELETE remove-device",
            request_line("DELETE", "vm.remove-device"),
            405,
            "PUT",
        ),
        case(
            "PATCH vm.shutdown",
            request_line("PATCH", "vm.shutdown"),
            405,
            "PUT",
        ),
        case(
            "unsupported method",
            b"FOO /api/v1/vmm.ping HTTP/1.1\r\n\r\n".to_vec(),
            400,
            "method",
        ),
        case(
            "garbage request line",
            b"GARBAGE\r\n\r\n".to_vec(),
            400,
            "Malformed",
        ),
        case(
            "bad HTTP version",
            b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n".to_vec(),
            400,
            "Malformed",
        ),
        case(
            "header line too long",
            long_header.into_bytes(),
            400,
            "Malformed",
        ),
        Case {
            name: "fd on vm.info",
            raw: request_line("GET", "vm.info"),
            fds: 1,
            status: 400,
            mentions: "file descriptors",
        },
        Case {
            name: "two fds on add-device",
            raw: add(r#"{"id":"two"}"#),
            fds: 2,
            status: 400,
            mentions: "at most one",
        },
        Case {
            name: "fd and path",
            raw: add(&format!(r#"{{"path":"{p}"}}"#)),
            fds: 1,
            status: 400,
            mentions: "not both",
        },
    ];

    let scratch = File::open("/dev/null").unwrap();
    let mut failures = Vec::new();
    for c in &cases {
        let fds: Vec<BorrowedFd<'_>> = (0..c.fds).map(|_| scratch.as_fd()).collect();
        let r = h.client.raw_request(&c.raw, &fds).unwrap();
        let msg = r.error_message();
        // Cloud Hypervisor's error body: a JSON array of strings, the message first.
        let json_ok = serde_json::from_slice::<Vec<String>>(&r.body)
            .is_ok_and(|m| m.first().is_some_and(|m| !m.is_empty()));
        let mentions = msg.to_lowercase().contains(&c.mentions.to_lowercase());
        println!(
            "  case {:<28} expect {} got {} : {msg}",
            c.name, c.status, r.status
        );
        if r.status != c.status || !json_ok || !mentions {
            failures.push(format!(
                "{}: expected {} mentioning {:?}, got {} {:?}",
                c.name,
                c.status,
                c.mentions,
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "bad-input failures:\n{}",
        failures.join("\n")
    );

    let after = h.snapshot();
    assert_eq!(before, after, "a rejected request changed VM state");
    // The server is still healthy after all of that.
    assert_eq!(h.get("vmm.ping").status, 200);
}

fn file_identity(f: &File) -> (u64, u64) {
    let m = f.metadata().unwrap();
    (m.dev(), m.ino())
}

#[test]
fn api_add_device_fd_passing() {
    println!("TEST api_add_device_fd_passing: an SCM_RIGHTS fd reaches the VMM as the same file");
    let h = Harness::start("fdpass");
    let file_path = h.dir.path().join("fake-cdev");
    let mut file = File::create(&file_path).unwrap();
    file.write_all(b"not really a VFIO cdev").unwrap();
    let (dev, ino) = file_identity(&file);

    // Library client, as ioasid-remote uses it. The body names an fd number, as a Cloud
    // Hypervisor client does; the server must ignore the number and use the passed fd.
    let body = br#"{"fd":99,"id":"cdev0","iommu":true}"#;
    let r = h
        .client
        .request(
            HttpMethod::Put,
            "vm.add-device",
            Some(body),
            &[file.as_fd()],
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    assert_eq!(r.json().unwrap()["id"], "cdev0");
    let got = h.fake.received_fds.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "fake VMM received {got:?}");
    assert_eq!(
        (got[0].dev, got[0].ino),
        (dev, ino),
        "a different file arrived"
    );
    assert!(got[0].cloexec, "received fd is not close-on-exec");

    // The binary, with an inherited fd: dup() gives a descriptor without FD_CLOEXEC.
    // SAFETY: dup of an open fd; the result is checked and then owned by `inheritable`.
    let raw = unsafe { libc::dup(file.as_raw_fd()) };
    assert!(raw >= 0);
    // SAFETY: `raw` is a fresh fd nothing else owns.
    let inheritable = unsafe { OwnedFd::from_raw_fd(raw) };
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid-remote"))
        .arg("--api-socket")
        .arg(&h.socket)
        .arg("add-device")
        .arg(format!("fd={raw},id=cdev1,iommu=on"))
        .output()
        .unwrap();
    drop(inheritable);
    assert!(
        out.status.success(),
        "ioasid-remote failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["id"], "cdev1");
    let got = h.fake.received_fds.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "fake VMM received {got:?}");
    assert_eq!((got[1].dev, got[1].ino), (dev, ino));
}

fn remote(h: &Harness, args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid-remote"))
        .arg("--api-socket")
        .arg(&h.socket)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let json = if stdout.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: bad JSON {e}: {stdout}"))
    };
    let code = out.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!(
        "  ioasid-remote {args:?} -> {code}; stderr: {}",
        stderr.trim()
    );
    (code, json, stderr)
}

#[test]
fn ioasid_remote_cli() {
    println!("TEST ioasid_remote_cli: exit codes and JSON output of the ioasid-remote binary");
    let h = Harness::start("cli");
    let (code, v, _) = remote(&h, &["ping"]);
    assert_eq!(code, 0);
    assert_eq!(v["version"], "fake-vmm");

    let dev = format!(
        "path={},iommu=on,pasid=on,id=cli0,pci_segment=0,pci_device_id=9",
        pci_path(3)
    );
    let (code, v, _) = remote(&h, &["add-device", &dev]);
    assert_eq!(code, 0);
    assert_eq!(v["id"], "cli0");
    assert_eq!(v["bdf"], "0000:00:09.0");

    let (code, v, _) = remote(&h, &["info"]);
    assert_eq!(code, 0);
    assert_eq!(v["device_tree"]["cli0"]["pci_bdf"], "0000:00:09.0");
    for sub in ["iommu", "ioasids", "pasids", "counters"] {
        let (code, v, _) = remote(&h, &[sub]);
        assert_eq!(code, 0, "{sub}");
        assert!(v.is_object(), "{sub} printed {v}");
    }
    let (_, v, _) = remote(&h, &["pasids"]);
    assert_eq!(v["entries"][0]["device"], "cli0");

    // Server-side error: the message and a non-zero exit.
    let (code, v, err) = remote(
        &h,
        &[
            "add-device",
            &dev.replace("pci_device_id=9", "pci_device_id=10"),
        ],
    );
    assert_eq!(code, 1);
    assert!(v.is_null());
    assert!(err.contains("409") && err.contains("already"), "{err}");

    // Client-side errors name the key and the accepted values; nothing is sent.
    let before = h.snapshot();
    let (code, _, err) = remote(&h, &["add-device", "path=/etc/passwd"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/etc/passwd") && err.contains("/sys/bus/pci/devices"),
        "{err}"
    );
    let (code, _, err) = remote(
        &h,
        &["add-device", &format!("path={},colour=red", pci_path(4))],
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("colour") && err.contains("pci_device_id"),
        "{err}"
    );
    let (code, _, err) = remote(
        &h,
        &["add-device", &format!("path={},iommu=maybe", pci_path(4))],
    );
    assert_eq!(code, 1);
    assert!(err.contains("iommu") && err.contains("on or off"), "{err}");
    let (code, _, err) = remote(&h, &["add-device", "fd=987654"]);
    assert_eq!(code, 1);
    assert!(err.contains("fd=987654"), "{err}");
    assert_eq!(before, h.snapshot());

    let (code, v, _) = remote(&h, &["remove-device", "cli0"]);
    assert_eq!(code, 0);
    assert!(v.is_null());
    let (code, _, err) = remote(&h, &["remove-device", "cli0"]);
    assert_eq!(code, 1);
    assert!(err.contains("404") && err.contains("cli0"), "{err}");

    // The life cycle: a Cloud Hypervisor VmConfig file, then the state commands.
    let cfg = h.dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":2}}"#,
    )
    .unwrap();
    let cfg_arg = cfg.display().to_string();
    let (code, v, _) = remote(&h, &["create", &cfg_arg]);
    assert_eq!((code, v), (0, serde_json::Value::Null));
    for cmd in ["boot", "pause", "resume", "reboot", "shutdown", "delete"] {
        let (code, v, _) = remote(&h, &[cmd]);
        assert_eq!((code, v), (0, serde_json::Value::Null), "{cmd}");
    }
    // An error with causes prints one per line; a field we do not implement is refused
    // before anything is sent.
    std::fs::write(
        &cfg,
        r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":0}}"#,
    )
    .unwrap();
    let (code, _, err) = remote(&h, &["create", &cfg_arg]);
    assert_eq!(code, 1);
    assert!(
        err.contains("Error 400: Invalid VmConfig") && err.contains("Caused by: --cpus"),
        "{err}"
    );
    std::fs::write(&cfg, r#"{"payload":{"kernel":"/k"},"net":[{"tap":"t0"}]}"#).unwrap();
    let (code, _, err) = remote(&h, &["create", &cfg_arg]);
    assert_eq!(code, 1);
    assert!(err.contains("net"), "{err}");

    let (code, v, _) = remote(&h, &["shutdown"]);
    assert_eq!((code, v), (0, serde_json::Value::Null));
    let (code, _, _) = remote(&h, &["shutdown-vmm"]);
    assert_eq!(code, 0);

    // No server there.
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid-remote"))
        .args(["--api-socket"])
        .arg(h.dir.path().join("missing.sock"))
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot connect"));
    // Usage errors are clap's (exit 2).
    let out = Command::new(env!("CARGO_BIN_EXE_ioasid-remote"))
        .arg("ping")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn api_vmm_gone_is_503() {
    println!("TEST api_vmm_gone_is_503: requests get 503 once the VMM side is gone");
    let dir = common::TempDir::new("gone");
    let socket = dir.path().join("api.sock");
    let (receiver, tx, evt) = api::ApiReceiver::new().unwrap();
    let server = api::start_server(&socket, tx, evt).unwrap();
    drop(receiver);
    let client = api::client::ApiClient::new(&socket);
    let r = client
        .request(HttpMethod::Get, "vmm.ping", None, &[])
        .unwrap();
    assert_eq!(r.status, 503, "{}", r.error_message());
    // Validation still happens before the VMM is involved.
    let r = client
        .request(
            HttpMethod::Put,
            "vm.add-device",
            Some(br#"{"path":"/etc"}"#),
            &[],
        )
        .unwrap();
    assert_eq!(r.status, 400);
    server.stop().unwrap();
    assert!(!socket.exists(), "stop() must remove the socket file");
}

/// Reads one final reply from a raw stream; returns (status, body). Skips 1xx replies.
fn read_one_reply(stream: &mut std::os::unix::net::UnixStream, buf: &mut Vec<u8>) -> (u16, String) {
    use std::io::Read;
    loop {
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed early");
            buf.extend_from_slice(&chunk[..n]);
        }
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8(buf[..end].to_vec()).unwrap();
        buf.drain(..end + 4);
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        if status < 200 {
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < len {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "connection closed in body");
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = String::from_utf8(buf.drain(..len).collect()).unwrap();
        return (status, body);
    }
}

#[test]
fn api_keepalive_pipelining_and_expect() {
    println!("TEST api_keepalive_pipelining_and_expect: several requests on one connection");
    let h = Harness::start("keepalive");
    let mut s = std::os::unix::net::UnixStream::connect(&h.socket).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    // Two pipelined requests in one write, answered in order.
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\nGET /api/v1/vm.counters HTTP/1.1\r\n\r\n")
        .unwrap();
    let (st, body) = read_one_reply(&mut s, &mut buf);
    assert_eq!(st, 200);
    assert!(body.contains("fake-vmm"), "{body}");
    let (st, body) = read_one_reply(&mut s, &mut buf);
    assert_eq!(st, 200);
    assert!(body.contains("host_ioctls"), "{body}");
    // A body announced with `Expect: 100-continue` (what curl does for larger bodies).
    let dev = format!(r#"{{"path":"{}","id":"exp0"}}"#, pci_path(2));
    s.write_all(
        format!(
            "PUT /api/v1/vm.add-device HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            dev.len()
        )
        .as_bytes(),
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    s.write_all(dev.as_bytes()).unwrap();
    let (st, body) = read_one_reply(&mut s, &mut buf);
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("exp0"), "{body}");
    // A 204 on the same connection, then one more request still works.
    s.write_all(
        b"PUT /api/v1/vm.remove-device HTTP/1.1\r\nContent-Length: 13\r\n\r\n{\"id\":\"exp0\"}",
    )
    .unwrap();
    assert_eq!(read_one_reply(&mut s, &mut buf).0, 204);
    s.write_all(b"GET /api/v1/vmm.ping HTTP/1.0\r\n\r\n")
        .unwrap();
    assert_eq!(read_one_reply(&mut s, &mut buf).0, 200);
}

#[test]
fn api_stop_while_vmm_stuck() {
    println!("TEST api_stop_while_vmm_stuck: stop() ends a wait on a VMM that never answers");
    let dir = common::TempDir::new("stuck");
    let socket = dir.path().join("api.sock");
    let (receiver, tx, evt) = api::ApiReceiver::new().unwrap();
    let server = api::start_server(&socket, tx, evt).unwrap();
    let client = api::client::ApiClient::new(&socket);
    let pending = std::thread::spawn(move || client.request(HttpMethod::Get, "vm.info", None, &[]));
    // Wait until the request has reached the (never draining) VMM side.
    let mut pfd = libc::pollfd {
        fd: receiver.event_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, 30_000) };
    assert_eq!(ready, 1, "the request never reached the VMM channel");
    // With the bug this test names, stop() or the request would wait forever: both are
    // joined with a deadline, so the test fails instead of hanging.
    let stopper = std::thread::spawn(move || server.stop());
    join_within(stopper, std::time::Duration::from_secs(30), "server.stop()").unwrap();
    let r = join_within(
        pending,
        std::time::Duration::from_secs(30),
        "the pending request",
    )
    .unwrap();
    assert_eq!(r.status, 503);
    assert!(
        r.error_message().contains("stopping"),
        "{}",
        r.error_message()
    );
    drop(receiver);
}

/// Joins `t`, failing the test (instead of hanging it) when `what` has not finished within
/// `limit`.
fn join_within<T>(t: std::thread::JoinHandle<T>, limit: std::time::Duration, what: &str) -> T {
    let deadline = std::time::Instant::now() + limit;
    while !t.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} still running after {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    t.join().unwrap()
}
