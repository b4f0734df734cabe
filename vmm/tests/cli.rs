//! The `ioasid-vmm` binary end to end: flag errors, the iommu-info stub, and a payload run.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::process::Command;

use common::kvm_available;

fn vmm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ioasid-vmm"))
}

#[test]
fn bad_flag_value_exits_2_naming_flag_and_choices() {
    let out = vmm()
        .args(["--kernel", "/k", "--memory", "size=lots"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("stderr: {err}");
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("--memory") && err.contains("512M"), "{err}");
}

#[test]
fn payload_run_writes_serial_file() {
    if !kvm_available("payload_run_writes_serial_file") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vmm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let payload = dir.join("hi.bin");
    // mov dx,0x3f8; mov al,'H'; out dx,al; mov al,'i'; out dx,al; hlt
    std::fs::write(
        &payload,
        [0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xb0, 0x69, 0xee, 0xf4],
    )
    .unwrap();
    let log = dir.join("serial.log");
    let out = vmm()
        .arg("--payload")
        .arg(format!("{},mode=real", payload.display()))
        .arg("--memory")
        .arg("size=16M")
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .output()
        .unwrap();
    println!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(std::fs::read(&log).unwrap(), b"Hi");
    // A payload that writes 0x07 to the debug-exit port sets the exit code.
    // mov dx,0x501; mov al,7; out dx,al; hlt
    std::fs::write(&payload, [0xba, 0x01, 0x05, 0xb0, 0x07, 0xee, 0xf4]).unwrap();
    let out = vmm()
        .arg("--payload")
        .arg(payload.display().to_string())
        .args(["--memory", "size=16M", "--serial", "off"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
