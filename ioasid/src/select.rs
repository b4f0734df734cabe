//! Run-time backend choice: `--platform iommufd=on|off|auto`.

use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::BackendKind;
use crate::error::{Error, Result};
use crate::sysfs::DeviceSpec;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// iommufd when `/dev/iommu` exists and the device has a cdev, else type1.
    #[default]
    Auto,
    /// iommufd, or an error saying why not.
    Iommufd,
    /// type1, or an error saying why not.
    Type1,
    /// The software IOMMU (emulated devices only).
    Soft,
}

impl FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "on" | "iommufd" => Ok(BackendChoice::Iommufd),
            "off" | "type1" => Ok(BackendChoice::Type1),
            "soft" => Ok(BackendChoice::Soft),
            other => Err(format!(
                "'{other}' is not a backend: expected on|off|auto (or iommufd|type1|soft)"
            )),
        }
    }
}

/// The host facts the choice depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/iommu` exists.
    pub iommufd: bool,
    /// `/dev/vfio/vfio` exists.
    pub container: bool,
}

impl HostFacts {
    /// Reads them from this host.
    pub fn probe() -> Self {
        HostFacts {
            iommufd: Path::new("/dev/iommu").exists(),
            container: Path::new("/dev/vfio/vfio").exists(),
        }
    }
}

/// Why iommufd cannot serve `device` (or the VM when `None`) on `host`; `None` when it can.
fn iommufd_blocker(host: HostFacts, device: Option<&DeviceSpec>) -> Option<String> {
    let has_cdev = device.is_none_or(|d| d.cdev.is_some());
    if !host.iommufd {
        Some("/dev/iommu does not exist (kernel without CONFIG_IOMMUFD)".to_string())
    } else if !has_cdev {
        device.map(|d| {
            format!(
                "{} has no VFIO cdev (kernel without CONFIG_VFIO_DEVICE_CDEV)",
                d.name
            )
        })
    } else {
        None
    }
}

/// Why `choice` = auto led to `kind` rather than iommufd (the fallback's reason, for the
/// log); `None` when iommufd was chosen or the user asked for another backend.
pub fn why_not_iommufd(
    choice: BackendChoice,
    host: HostFacts,
    kind: BackendKind,
    device: Option<&DeviceSpec>,
) -> Option<String> {
    if choice != BackendChoice::Auto || kind == BackendKind::Iommufd {
        return None;
    }
    iommufd_blocker(host, device)
}

/// Picks the backend for `device` (or for the VM when `None`).
pub fn choose(
    choice: BackendChoice,
    host: HostFacts,
    device: Option<&DeviceSpec>,
) -> Result<BackendKind> {
    let why_not_iommufd = iommufd_blocker(host, device);
    let why_not_type1 = (!host.container).then(|| {
        "/dev/vfio/vfio does not exist (kernel without CONFIG_VFIO_CONTAINER)".to_string()
    });
    match choice {
        BackendChoice::Soft => Ok(BackendKind::Soft),
        BackendChoice::Iommufd => match why_not_iommufd {
            None => Ok(BackendKind::Iommufd),
            Some(reason) => Err(Error::BackendUnavailable {
                backend: "iommufd",
                reason,
            }),
        },
        BackendChoice::Type1 => match why_not_type1 {
            None => Ok(BackendKind::Type1),
            Some(reason) => Err(Error::BackendUnavailable {
                backend: "type1",
                reason,
            }),
        },
        BackendChoice::Auto => match (why_not_iommufd, why_not_type1) {
            (None, _) => Ok(BackendKind::Iommufd),
            (Some(_), None) => Ok(BackendKind::Type1),
            (Some(a), Some(b)) => Err(Error::BackendUnavailable {
                backend: "auto",
                reason: format!("neither iommufd ({a}) nor type1 ({b}) works here"),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::DeviceName;

    fn spec(cdev: bool) -> DeviceSpec {
        DeviceSpec {
            name: DeviceName::Mdev("x".into()),
            sysfs: "/sys/bus/mdev/devices/x".into(),
            cdev: cdev.then(|| "/dev/vfio/devices/vfio0".into()),
            group: Some(1),
            is_mdev: true,
        }
    }

    #[test]
    fn auto_prefers_iommufd_with_cdev() {
        let both = HostFacts {
            iommufd: true,
            container: true,
        };
        assert_eq!(
            choose(BackendChoice::Auto, both, Some(&spec(true))).unwrap(),
            BackendKind::Iommufd
        );
        assert_eq!(
            choose(BackendChoice::Auto, both, Some(&spec(false))).unwrap(),
            BackendKind::Type1
        );
        let legacy = HostFacts {
            iommufd: false,
            container: true,
        };
        assert_eq!(
            choose(BackendChoice::Auto, legacy, None).unwrap(),
            BackendKind::Type1
        );
    }

    #[test]
    fn auto_fallback_gives_its_reason() {
        let legacy = HostFacts {
            iommufd: false,
            container: true,
        };
        let kind = choose(BackendChoice::Auto, legacy, Some(&spec(true))).unwrap();
        assert_eq!(kind, BackendKind::Type1);
        let why = why_not_iommufd(BackendChoice::Auto, legacy, kind, Some(&spec(true))).unwrap();
        assert!(why.contains("/dev/iommu does not exist"), "{why}");
        let both = HostFacts {
            iommufd: true,
            container: true,
        };
        let why = why_not_iommufd(
            BackendChoice::Auto,
            both,
            BackendKind::Type1,
            Some(&spec(false)),
        )
        .unwrap();
        assert!(why.contains("no VFIO cdev"), "{why}");
        // No fallback, no reason: iommufd chosen, or type1 asked for.
        assert_eq!(
            why_not_iommufd(
                BackendChoice::Auto,
                both,
                BackendKind::Iommufd,
                Some(&spec(true))
            ),
            None
        );
        assert_eq!(
            why_not_iommufd(BackendChoice::Type1, legacy, BackendKind::Type1, None),
            None
        );
    }

    #[test]
    fn explicit_choice_that_cannot_work_says_why() {
        let legacy = HostFacts {
            iommufd: false,
            container: true,
        };
        let e = choose(BackendChoice::Iommufd, legacy, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/iommu does not exist"), "{e}");
        let none = HostFacts {
            iommufd: false,
            container: false,
        };
        let e = choose(BackendChoice::Auto, none, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither iommufd"), "{e}");
        assert!("maybe"
            .parse::<BackendChoice>()
            .unwrap_err()
            .contains("on|off|auto"));
    }
}
