//! `--device`: the REST API's `DeviceConfig` syntax, checked as the device manager will
//! ([`check_device_config`] is the one check both use).

use api::DeviceConfigError;

use super::ConfigError;

/// `--device`: the REST API's `DeviceConfig` (one syntax for the flag and `vm.add-device`).
pub use api::DeviceConfig;

/// Where VFIO cdevs live.
pub const CDEV_DIR: &str = "/dev/vfio/devices";

/// Checks a device config the way the device manager's `add_device` will, without touching
/// the host: the `api` crate's rules, with a VFIO cdev path (`/dev/vfio/devices/vfioN`)
/// accepted like an fd. `fd_supplied`: an open cdev comes with it.
pub fn check_device_config(cfg: &DeviceConfig, fd_supplied: bool) -> Result<(), DeviceConfigError> {
    let cdev_path = cfg.path.as_deref().is_some_and(|p| p.starts_with(CDEV_DIR));
    if cdev_path && fd_supplied {
        return Err(DeviceConfigError::BothPathAndFd);
    }
    if let Some(p) = cfg.path.as_deref().filter(|_| cdev_path) {
        let name = p.strip_prefix(CDEV_DIR).unwrap_or(p).to_string_lossy();
        let ok = name
            .strip_prefix("vfio")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !ok {
            return Err(DeviceConfigError::PathNotAllowed(p.to_path_buf()));
        }
    }
    let mut c = cfg.clone();
    c.fd = None;
    if cdev_path {
        c.path = None;
    }
    c.validate_with_fd(fd_supplied || cdev_path)
}

/// Parses one `--device` value with [`DeviceConfig::parse`] and checks it with
/// [`check_device_config`]; `fd=N` names a file descriptor the VMM inherited.
pub(super) fn parse_device(s: &str) -> Result<DeviceConfig, ConfigError> {
    let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid {
        flag: "--device",
        reason: format!("{e} (in '{s}'; syntax: {})", DeviceConfig::SYNTAX),
    };
    let cfg = DeviceConfig::parse(s).map_err(|e| invalid(&e))?;
    check_device_config(&cfg, cfg.fd.is_some()).map_err(|e| invalid(&e))?;
    if let Some(fd) = cfg.fd {
        if fd <= 2 {
            return Err(ConfigError::Invalid {
                flag: "--device",
                reason: format!(
                    "fd={fd} is stdin, stdout or stderr, not an inherited VFIO cdev (in '{s}')"
                ),
            });
        }
    }
    Ok(cfg)
}
