//! The L3 guest's view of its PCI devices, through sysfs.

use std::path::PathBuf;

use crate::hexfile::read_hex;
use std::time::{Duration, Instant};

/// The BDFs of the functions with this vendor and device ID.
pub fn find(vendor: u16, device: u16) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return out;
    };
    for e in rd.flatten() {
        let d = e.path();
        if read_hex(&d.join("vendor")).ok() == Some(u64::from(vendor))
            && read_hex(&d.join("device")).ok() == Some(u64::from(device))
        {
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    out
}

/// Waits up to `limit` for a function with these IDs to appear (or, with `present` false,
/// for every such function to go); returns the BDFs seen last.
pub fn wait_for(vendor: u16, device: u16, present: bool, limit: Duration) -> Vec<String> {
    let start = Instant::now();
    loop {
        let found = find(vendor, device);
        if found.is_empty() != present || start.elapsed() > limit {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The sysfs directory of `bdf`.
pub fn dir(bdf: &str) -> PathBuf {
    PathBuf::from("/sys/bus/pci/devices").join(bdf)
}

/// BAR `n`'s (start, size, flags) from the `resource` file; size 0 when unused.
pub fn bar(bdf: &str, n: usize) -> Result<(u64, u64, u64), String> {
    let text = std::fs::read_to_string(dir(bdf).join("resource"))
        .map_err(|e| format!("{bdf}: reading resource: {e}"))?;
    let line = text
        .lines()
        .nth(n)
        .ok_or_else(|| format!("{bdf}: resource has no line for BAR{n}"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok())
        .collect();
    match v.as_slice() {
        [start, end, flags] => {
            let size = if *end > *start { end - start + 1 } else { 0 };
            Ok((*start, size, *flags))
        }
        _ => Err(format!("{bdf}: odd resource line {line:?}")),
    }
}

/// The driver bound to `bdf`, if any.
pub fn driver(bdf: &str) -> Option<String> {
    std::fs::read_link(dir(bdf).join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Binds `bdf` to vfio-pci via driver_override (unbinding another driver first).
pub fn bind_vfio(bdf: &str) -> Result<(), String> {
    let d = dir(bdf);
    match driver(bdf).as_deref() {
        Some("vfio-pci") => return Ok(()),
        Some(other) => std::fs::write(d.join("driver/unbind"), bdf)
            .map_err(|e| format!("{bdf}: unbinding from {other}: {e}"))?,
        None => {}
    }
    std::fs::write(d.join("driver_override"), "vfio-pci")
        .map_err(|e| format!("{bdf}: writing driver_override: {e}"))?;
    // A function just hot-added shows in sysfs before the PCI core lets drivers match it
    // (pci_bus_add_device sets match_driver after device_add); on an SMP guest this task
    // can run in between, and the probe then binds nothing. So probe again until the
    // deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        std::fs::write("/sys/bus/pci/drivers_probe", bdf).map_err(|e| {
            format!("{bdf}: drivers_probe: {e} (vfio.enable_unsafe_noiommu_mode=1?)")
        })?;
        match driver(bdf).as_deref() {
            Some("vfio-pci") => return Ok(()),
            other if std::time::Instant::now() >= deadline => {
                return Err(format!(
                    "{bdf}: bound to {other:?} instead of vfio-pci after probing for 10 s"
                ))
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// The serial ttys (ttyS*) whose device sits under `bdf` in sysfs, sorted. Serial-core
/// puts port devices between the PCI function and the tty, so the tty is not a direct child.
pub fn ttys_of(bdf: &str) -> Result<Vec<String>, String> {
    let rd = std::fs::read_dir("/sys/class/tty").map_err(|e| format!("/sys/class/tty: {e}"))?;
    let needle = format!("/{bdf}/");
    let mut out: Vec<String> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ttyS"))
        .filter(|e| {
            std::fs::canonicalize(e.path())
                .map(|p| p.to_string_lossy().contains(&needle))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort_by_key(|n| (n.len(), n.clone()));
    Ok(out)
}

/// A one-line summary of `bdf`'s sysfs state (class, irq, enable, resources) for failures.
pub fn describe(bdf: &str) -> String {
    let d = dir(bdf);
    let get = |f: &str| {
        std::fs::read_to_string(d.join(f))
            .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|e| format!("<{e}>"))
    };
    let res: Vec<String> = (0..2)
        .filter_map(|n| bar(bdf, n).ok())
        .map(|(s, l, f)| format!("{s:#x}+{l:#x}/{f:#x}"))
        .collect();
    format!(
        "class {} irq {} enable {} BARs {}",
        get("class"),
        get("irq"),
        get("enable"),
        res.join(",")
    )
}
