//! The `ioasid-vmm` binary with a stdout nobody reads: a payload writes 256 KiB to COM1 (more
//! than the pipe and the console buffer hold together), then exits through the debug-exit
//! port. The vCPU never blocks on the console, so the VMM finishes the payload and exits; the
//! bytes that reached the pipe are the payload's. Before the console buffer, the vCPU
//! blocked in `write(1)` once the pipe was full, and the VMM never exited.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, HANG_GUARD};

/// Real mode: 4 x 65536 `out 0x3f8, 'x'`, then `out 0x501, 7; hlt`.
const PAYLOAD: [u8; 23] = [
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xb0, 0x78, // mov al, 'x'
    0xbe, 0x04, 0x00, // mov si, 4
    0x31, 0xc9, // outer: xor cx, cx
    0xee, // inner: out dx, al
    0xe2, 0xfd, // loop inner
    0x4e, // dec si
    0x75, 0xf8, // jnz outer
    0xba, 0x01, 0x05, // mov dx, 0x501
    0xb0, 0x07, // mov al, 7
    0xee, // out dx, al
    0xf4, // hlt
];

#[test]
fn serial_unread_stdout_vmm_exits() {
    let name = "serial_unread_stdout_vmm_exits";
    if !kvm_available(name) {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-serial-bp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = dir.join("flood.bin");
    std::fs::write(&payload, PAYLOAD).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"))
        .arg("--payload")
        .arg(format!("{},mode=real", payload.display()))
        .args(["--memory", "size=16M", "--serial", "tty"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Nobody reads stdout until the VMM has exited (or the hang guard fires).
    let deadline = Instant::now() + HANG_GUARD * 3;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.unwrap_or_else(|| {
        panic!(
            "the VMM did not exit with its stdout unread ({} bytes had reached the pipe)",
            out.len()
        )
    });
    assert_eq!(status.code(), Some(7), "the payload ran to its exit port");
    println!(
        "{name}: VMM exited; {} of {} bytes reached the unread pipe",
        out.len(),
        4 * 65536
    );
    assert!(!out.is_empty() && out.len() < 4 * 65536);
    assert!(out.iter().all(|&b| b == b'x'));
}
