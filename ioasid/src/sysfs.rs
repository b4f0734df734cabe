//! Resolving a device the user named (a sysfs path) into what the backends need: its name
//! (BDF or UUID), its VFIO cdev, its IOMMU group, and whether it is usable at all.
//!
//! All checks read sysfs under a root that tests can replace.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::types::{Bdf, DeviceName};

/// A VFIO-capable device as found in sysfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// The device's name (BDF for a pdev, UUID for an mdev).
    pub name: DeviceName,
    /// Its sysfs directory (as the user gave it, under the root).
    pub sysfs: PathBuf,
    /// Its VFIO cdev (`/dev/vfio/devices/vfioN`), when the kernel has VFIO cdev.
    pub cdev: Option<PathBuf>,
    /// Its IOMMU group number.
    pub group: Option<u32>,
    /// Whether it is an mdev.
    pub is_mdev: bool,
}

fn link_name(p: &Path) -> Option<String> {
    fs::read_link(p)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Resolves a user path such as `/sys/bus/pci/devices/0000:00:03.0` or
/// `/sys/bus/mdev/devices/<UUID>`, reading sysfs under `root` (normally `/`).
pub fn resolve_in(root: &Path, path: &Path) -> Result<DeviceSpec> {
    let not_found = |reason: String| Error::DeviceNotFound {
        path: path.to_path_buf(),
        reason,
    };
    let rel = path.strip_prefix("/").unwrap_or(path);
    let mut comps = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned());
    let (bus, leaf) = match (
        comps.next(),
        comps.next(),
        comps.next(),
        comps.next(),
        comps.next(),
        comps.next(),
    ) {
        (Some(s), Some(b), Some(bus), Some(d), Some(leaf), None)
            if s == "sys" && b == "bus" && d == "devices" =>
        {
            (bus, leaf)
        }
        _ => {
            return Err(not_found(
                "expected /sys/bus/pci/devices/<BDF> or /sys/bus/mdev/devices/<UUID>".to_string(),
            ))
        }
    };
    let sysfs = root.join(rel);
    let name = match bus.as_str() {
        "pci" => DeviceName::Pci(leaf.parse::<Bdf>().map_err(not_found)?),
        "mdev" if is_uuid(&leaf) => DeviceName::Mdev(leaf.clone()),
        "mdev" => return Err(not_found(format!("'{leaf}' is not an mdev UUID"))),
        other => {
            return Err(not_found(format!(
                "bus '{other}' cannot be assigned: only pci and mdev devices can"
            )))
        }
    };
    if !sysfs.exists() {
        return Err(not_found(match &name {
            DeviceName::Pci(bdf) => format!("no PCI device {bdf} on this host (see lspci -D)"),
            _ => format!("no mdev {leaf}: create it by writing the UUID to mdev_supported_types/<type>/create"),
        }));
    }
    let is_mdev = bus == "mdev";
    if let DeviceName::Pci(bdf) = &name {
        let driver = link_name(&sysfs.join("driver"));
        if driver.as_deref() != Some("vfio-pci") {
            let unbind = if driver.is_some() {
                format!("echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind\n  ")
            } else {
                String::new()
            };
            return Err(Error::NotBoundToVfio {
                device: name.clone(),
                driver: driver.unwrap_or_else(|| "no driver".to_string()),
                commands: format!(
                    "echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override\n  {unbind}echo {bdf} > /sys/bus/pci/drivers/vfio-pci/bind"
                ),
            });
        }
    }
    let group = link_name(&sysfs.join("iommu_group")).and_then(|g| g.parse().ok());
    let cdev = fs::read_dir(sysfs.join("vfio-dev"))
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .find(|n| n.starts_with("vfio"))
                .map(|n| PathBuf::from("/dev/vfio/devices").join(n))
        });
    Ok(DeviceSpec {
        name,
        sysfs,
        cdev,
        group,
        is_mdev,
    })
}

/// Resolves a user path against the real sysfs.
pub fn resolve(path: &Path) -> Result<DeviceSpec> {
    resolve_in(Path::new("/"), path)
}

/// The devices of `group` other than `spec` that keep the group from being viable: bound to
/// a driver other than vfio-pci (driverless devices and PCI bridges are fine).
pub fn group_blockers_in(root: &Path, spec: &DeviceSpec, group: u32) -> Vec<String> {
    let dir = root.join(format!("sys/kernel/iommu_groups/{group}/devices"));
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let own = spec
        .sysfs
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if Some(&name) == own.as_ref() {
                return None;
            }
            let driver = link_name(&e.path().join("driver"))?;
            match driver.as_str() {
                "vfio-pci" | "pci-stub" | "pcieport" => None,
                d => Some(format!("{name} (driver {d})")),
            }
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::symlink;

    use super::*;

    struct Tree(PathBuf);
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tree(tag: &str) -> Tree {
        let root = std::env::temp_dir().join(format!("ioasid-sysfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let pci = root.join("sys/bus/pci/devices");
        fs::create_dir_all(&pci).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(root.join("sys/bus/pci/drivers/e1000e")).unwrap();
        fs::create_dir_all(root.join("sys/kernel/iommu_groups/7/devices")).unwrap();
        for (bdf, drv) in [
            ("0000:00:03.0", "vfio-pci"),
            ("0000:00:04.0", "e1000e"),
            ("0000:00:05.0", ""),
        ] {
            let d = pci.join(bdf);
            fs::create_dir_all(d.join("vfio-dev/vfio3")).unwrap();
            if !drv.is_empty() {
                symlink(root.join("sys/bus/pci/drivers").join(drv), d.join("driver")).unwrap();
            }
            symlink(
                root.join("sys/kernel/iommu_groups/7"),
                d.join("iommu_group"),
            )
            .unwrap();
            symlink(&d, root.join("sys/kernel/iommu_groups/7/devices").join(bdf)).unwrap();
        }
        Tree(root)
    }

    #[test]
    fn resolves_vfio_bound_pci_device() {
        let t = tree("ok");
        let spec = resolve_in(&t.0, Path::new("/sys/bus/pci/devices/0000:00:03.0")).unwrap();
        assert_eq!(spec.name.to_string(), "0000:00:03.0");
        assert_eq!(spec.group, Some(7));
        assert_eq!(spec.cdev, Some(PathBuf::from("/dev/vfio/devices/vfio3")));
        let blockers = group_blockers_in(&t.0, &spec, 7);
        assert_eq!(blockers, vec!["0000:00:04.0 (driver e1000e)".to_string()]);
    }

    #[test]
    fn wrong_driver_gives_driver_override_commands() {
        let t = tree("drv");
        let e = resolve_in(&t.0, Path::new("/sys/bus/pci/devices/0000:00:04.0")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("bound to e1000e"), "{s}");
        assert!(
            s.contains("echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override"),
            "{s}"
        );
        assert!(s.contains("driver/unbind"), "{s}");
        let e = resolve_in(&t.0, Path::new("/sys/bus/pci/devices/0000:00:05.0")).unwrap_err();
        assert!(e.to_string().contains("no driver"), "{e}");
    }

    #[test]
    fn bad_paths_are_named() {
        let t = tree("bad");
        for (p, want) in [
            (
                "/sys/bus/pci/devices/0000:00:1f.7",
                "no PCI device 0000:00:1f.7",
            ),
            ("/etc/passwd", "expected /sys/bus/pci/devices"),
            ("/sys/bus/usb/devices/1-1", "bus 'usb' cannot be assigned"),
            ("/sys/bus/mdev/devices/not-a-uuid", "not an mdev UUID"),
            ("/sys/bus/pci/devices/../../../etc", "expected /sys/bus"),
        ] {
            let e = resolve_in(&t.0, Path::new(p)).unwrap_err().to_string();
            assert!(e.contains(want), "{p}: {e}");
        }
    }
}
