//! Mediated devices: naming and sysfs paths. The device model is the same
//! [`super::VfioPciDevice`]; it relies only on what the mdev's region and IRQ info say
//! (an mdev such as mtty has a 256-byte config space, no capabilities, I/O BARs, no mmap,
//! and no INTx unmask eventfd), never on PCI quirks of physical functions.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::device::VfioDeviceId;

/// Where mdevs appear in sysfs.
pub const MDEV_SYSFS_DIR: &str = "/sys/bus/mdev/devices";

/// A malformed mdev UUID.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("Invalid mdev UUID {0:?}: expected 8-4-4-4-12 hexadecimal digits")]
pub struct MdevUuidError(pub String);

/// Checks that `uuid` has the canonical 8-4-4-4-12 form and returns it in lower case.
pub fn parse_uuid(uuid: &str) -> Result<String, MdevUuidError> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, l)| g.len() == l && g.chars().all(|c| c.is_ascii_hexdigit()));
    if ok {
        Ok(uuid.to_ascii_lowercase())
    } else {
        Err(MdevUuidError(uuid.to_string()))
    }
}

/// The sysfs path of mdev `uuid` (what `vfio_ioctls::VfioDevice::new` takes).
pub fn sysfs_path(uuid: &str) -> Result<PathBuf, MdevUuidError> {
    Ok(Path::new(MDEV_SYSFS_DIR).join(parse_uuid(uuid)?))
}

/// The model's device identity for a sysfs path: an mdev when the path is under
/// [`MDEV_SYSFS_DIR`] or its last component is a UUID with an `mdev_type` link, else a
/// physical function named by its last component (its host BDF).
pub fn device_id(path: &Path) -> VfioDeviceId {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let is_mdev = path.starts_with(MDEV_SYSFS_DIR)
        || (parse_uuid(&name).is_ok() && path.join("mdev_type").exists());
    if is_mdev {
        VfioDeviceId::Mdev(name)
    } else {
        VfioDeviceId::Pdev(name)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn uuid_and_paths() {
        let u = "83B8F4F2-509F-382F-3C1E-E6BFE0FA1001";
        assert_eq!(
            sysfs_path(u).unwrap(),
            PathBuf::from("/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")
        );
        assert!(parse_uuid("83b8f4f2-509f-382f-3c1e").is_err());
        assert!(parse_uuid("83b8f4f2-509f-382f-3c1e-e6bfe0fa100g").is_err());
        assert_eq!(
            device_id(&sysfs_path(u).unwrap()),
            VfioDeviceId::Mdev("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001".into())
        );
        assert_eq!(
            device_id(Path::new("/sys/bus/pci/devices/0000:00:03.0")),
            VfioDeviceId::Pdev("0000:00:03.0".into())
        );
    }
}
