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

/// Reads `len` (at most 8) bytes at `addr` through the VM's MMIO bus, as a vCPU would.
pub fn mmio_read(vm: &vmm::vm::Vm, addr: u64, len: usize) -> Result<u64, String> {
    let mut b = [0u8; 8];
    let part = b
        .get_mut(..len)
        .ok_or_else(|| format!("MMIO read of {len} bytes at {addr:#x}: at most 8"))?;
    vm.mmio_bus()
        .read(addr, part)
        .map_err(|e| format!("MMIO read at {addr:#x}: {e}"))?;
    Ok(u64::from_le_bytes(b))
}

/// Writes the low `len` (at most 8) bytes of `v` at `addr` through the VM's MMIO bus.
pub fn mmio_write(vm: &vmm::vm::Vm, addr: u64, len: usize, v: u64) -> Result<(), String> {
    let bytes = v.to_le_bytes();
    let part = bytes
        .get(..len)
        .ok_or_else(|| format!("MMIO write of {len} bytes at {addr:#x}: at most 8"))?;
    vm.mmio_bus()
        .write(addr, part)
        .map_err(|e| format!("MMIO write at {addr:#x}: {e}"))
}
