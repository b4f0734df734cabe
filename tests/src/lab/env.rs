//! What the lab's init prepared: the edu function bound to vfio-pci, the mtty instance.

use std::fs;
use std::path::PathBuf;

/// The sysfs path of the edu device (from `LAB_EDU_BDF`, else by scanning for 1234:11e8).
pub fn edu_path() -> Result<PathBuf, String> {
    if let Ok(bdf) = std::env::var("LAB_EDU_BDF") {
        if !bdf.is_empty() {
            return Ok(PathBuf::from(format!("/sys/bus/pci/devices/{bdf}")));
        }
    }
    let entries =
        fs::read_dir("/sys/bus/pci/devices").map_err(|e| format!("no PCI in this guest: {e}"))?;
    for e in entries.flatten() {
        let p = e.path();
        let vendor = fs::read_to_string(p.join("vendor")).unwrap_or_default();
        let device = fs::read_to_string(p.join("device")).unwrap_or_default();
        if vendor.trim() == "0x1234" && device.trim() == "0x11e8" {
            return Ok(PathBuf::from("/sys/bus/pci/devices").join(e.file_name()));
        }
    }
    Err("no edu device (1234:11e8) in this guest: QEMU was started without -device edu".to_string())
}

/// The sysfs path of the mtty mdev (from `LAB_MTTY_UUID`, else the first mdev).
pub fn mtty_path() -> Result<PathBuf, String> {
    if let Ok(uuid) = std::env::var("LAB_MTTY_UUID") {
        if !uuid.is_empty() {
            return Ok(PathBuf::from(format!("/sys/bus/mdev/devices/{uuid}")));
        }
    }
    fs::read_dir("/sys/bus/mdev/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| PathBuf::from("/sys/bus/mdev/devices").join(e.file_name()))
        .ok_or_else(|| "no mdev instance: the lab init did not create mtty".to_string())
}

/// A byte pattern that differs per seed.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
