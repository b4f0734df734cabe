//! `DeviceConfig`: the body of `PUT /api/v1/vm.add-device` and the value of the VMM's
//! `--device` flag.
//!
//! The JSON form is Cloud Hypervisor's `DeviceConfig` (`path`, `fd`, `iommu`, `id`,
//! `pci_segment`, `pci_device_id`, `x_nv_gpudirect_clique`, `x_exclude_mmap_bars`) plus our
//! `pasid` and `emulated` (a device the VMM emulates instead of a VFIO device:
//! [`EMULATED_DEVICES`]; mutually exclusive with `path` and `fd`). The command-line form is `key=value[,key=value...]` with the same keys
//! ([`DeviceConfig::SYNTAX`]).
//!
//! Parsing ([`DeviceConfig::parse`], serde) is purely syntactic; [`DeviceConfig::validate`]
//! applies the rules the VMM relies on (where a path may point, which options we implement).

use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};
use thiserror::Error;

/// The keys [`DeviceConfig::parse`] accepts, in the order [`DeviceConfig::SYNTAX`] lists them.
pub const KEYS: &[&str] = &[
    "path",
    "fd",
    "emulated",
    "iommu",
    "pasid",
    "id",
    "pci_segment",
    "pci_device_id",
    "x_nv_gpudirect_clique",
    "x_exclude_mmap_bars",
    "x_pasid_offset",
];

/// The devices `emulated=` names: the SVA copy engine (PASID, ATS, PRI; its DMA goes
/// through the vIOMMU's soft path, so it needs `iommu=on`) and the shared-work-queue
/// device (a portal that takes each descriptor's PASID from the submitting vCPU's
/// IA32_PASID; DMA through the vIOMMU as well).
pub const EMULATED_DEVICES: &[&str] = &["sva-copy", "swq"];

/// [`EMULATED_DEVICES`] as an error message's "expected".
const EMULATED_EXPECTED: &str = "an emulated device: sva-copy or swq";

/// Longest device id we accept.
pub const MAX_ID_LEN: usize = 64;

/// Highest PCI device (slot) number on a bus.
pub const MAX_PCI_DEVICE_ID: u8 = 31;

/// Errors from parsing or validating a device configuration.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DeviceConfigError {
    /// A key we do not know.
    #[error("Unknown key `{key}` in device config; accepted keys: {accepted}")]
    UnknownKey {
        /// The key as given.
        key: String,
        /// The accepted keys, comma separated.
        accepted: String,
    },
    /// A key given twice.
    #[error("Key `{0}` is given more than once in device config")]
    DuplicateKey(String),
    /// `key` without `=value`.
    #[error("Key `{key}` in device config needs a value: `{key}=<value>`")]
    MissingValue {
        /// The key.
        key: String,
    },
    /// A value of the wrong form.
    #[error("Invalid value `{value}` for `{key}`: expected {expected}")]
    InvalidValue {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What the key accepts.
        expected: &'static str,
    },
    /// A `[` without its `]`, or the reverse.
    #[error("Unbalanced brackets in device config `{0}`")]
    UnbalancedBrackets(String),
    /// Neither `path` nor a cdev fd.
    #[error("Device config needs `path` (a sysfs device path) or a VFIO cdev fd")]
    NoPathOrFd,
    /// Both `path` and a cdev fd: Cloud Hypervisor accepts exactly one.
    #[error("Device config takes exactly one of `path` and a VFIO cdev fd, not both")]
    BothPathAndFd,
    /// `path` outside the two sysfs directories and the VFIO cdev directory we accept.
    #[error(
        "Device path {0} is not allowed: expected /sys/bus/pci/devices/<DDDD:BB:DD.F>, \
         /sys/bus/mdev/devices/<UUID> or /dev/vfio/devices/vfio<N>"
    )]
    PathNotAllowed(PathBuf),
    /// `path` has an accepted form's directory, but one part of it is wrong.
    #[error("Device path {path} is not allowed: {reason}")]
    BadPath {
        /// The path as given.
        path: PathBuf,
        /// Which part is wrong, and what is expected there.
        reason: String,
    },
    /// An id that is empty, too long or has characters we refuse.
    #[error("Invalid device id `{id}`: {reason}")]
    InvalidId {
        /// The id as given.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// `pci_device_id` above 31.
    #[error("pci_device_id {0} is out of range: expected 0-31")]
    PciDeviceIdOutOfRange(u8),
    /// An `x_` option we do not implement, given a non-empty value.
    #[error(
        "Option `{key}` is not supported by ioasid-vmm; it is accepted only when empty or \
         null (got {value})"
    )]
    Unsupported {
        /// The option.
        key: &'static str,
        /// Its value, rendered.
        value: String,
    },
    /// `emulated` together with `path` or a cdev fd.
    #[error("Device config takes `emulated` or one of `path` and a VFIO cdev fd, not both")]
    EmulatedWithPathOrFd,
    /// An emulated device that needs `iommu=on` given without it.
    #[error("emulated={0} needs iommu=on: its DMA goes through the vIOMMU")]
    EmulatedWithoutIommu(String),
    /// `pasid=on` without `iommu=on`.
    #[error("pasid=on needs iommu=on: the guest can only program PASIDs through the vIOMMU")]
    PasidWithoutIommu,
}

/// A passthrough device: Cloud Hypervisor's `DeviceConfig` plus `pasid`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Sysfs path of the device: `/sys/bus/pci/devices/<BDF>` or `/sys/bus/mdev/devices/<UUID>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// A VFIO cdev fd number *in the sender's process*. On the API the fd itself travels out of
    /// band with `SCM_RIGHTS` and this number is ignored (as Cloud Hypervisor does); on the
    /// VMM's command line it names an fd the VMM inherited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// A device the VMM emulates (ioasid-vmm extension), one of [`EMULATED_DEVICES`];
    /// exclusive with `path` and `fd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emulated: Option<String>,
    /// Put the device behind the guest-visible vIOMMU.
    #[serde(default, skip_serializing_if = "is_false")]
    pub iommu: bool,
    /// Let the guest use PASIDs with this device (ioasid-vmm extension; needs `iommu`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub pasid: bool,
    /// Device id; the VMM picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PCI segment to place the device on.
    #[serde(default)]
    pub pci_segment: u16,
    /// PCI device (slot) number on the segment's root bus; the VMM picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_device_id: Option<u8>,
    /// Cloud Hypervisor's NVIDIA GPUDirect clique. Not implemented: accepted only when null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_nv_gpudirect_clique: Option<u8>,
    /// Cloud Hypervisor's list of BARs not to mmap. Not implemented: accepted only when empty
    /// (or null). Serialized even when empty, as a Cloud Hypervisor client does.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub x_exclude_mmap_bars: Vec<u64>,
    /// Config-space offset of the synthesized PASID/ATS/PRI chain (ioasid-vmm extension, as
    /// QEMU's vPASID offset; needs `pasid`). The VMM picks a free place when absent and
    /// refuses an offset that collides with a capability of the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x_pasid_offset: Option<u16>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    Ok(Option::<Vec<u64>>::deserialize(d)?.unwrap_or_default())
}

/// The device a device path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SysfsDevice {
    /// A PCI function, `DDDD:BB:DD.F`.
    Pci(String),
    /// A mediated device, by UUID.
    Mdev(String),
    /// A VFIO cdev, `vfio<N>` under `/dev/vfio/devices`.
    Cdev(String),
}

impl fmt::Display for SysfsDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SysfsDevice::Pci(bdf) => write!(f, "{bdf}"),
            SysfsDevice::Mdev(uuid) => write!(f, "mdev {uuid}"),
            SysfsDevice::Cdev(name) => write!(f, "/dev/vfio/devices/{name}"),
        }
    }
}

impl DeviceConfig {
    /// The `--device` / `ioasid-remote add-device` syntax.
    pub const SYNTAX: &'static str = "path=<sysfs device path>,fd=<VFIO cdev fd>,\
        emulated=sva-copy|swq,iommu=on|off,\
        pasid=on|off,id=<device id>,pci_segment=<segment>,pci_device_id=<slot 0-31>,\
        x_nv_gpudirect_clique=<clique id> (unsupported),x_exclude_mmap_bars=[<bar>,...] \
        (unsupported),x_pasid_offset=<0x100-0xffc, with pasid=on>; path is /sys/bus/pci/devices/<DDDD:BB:DD.F>, \
        /sys/bus/mdev/devices/<UUID> or /dev/vfio/devices/vfio<N>; emulated (instead of path \
        or fd) names a device the VMM emulates";

    /// Parses `key=value[,key=value...]`. Commas inside `[...]` belong to the value. Checks
    /// syntax and value types only; call [`DeviceConfig::validate`] afterwards.
    pub fn parse(input: &str) -> Result<Self, DeviceConfigError> {
        let mut cfg = DeviceConfig::default();
        let mut seen: Vec<&str> = Vec::new();
        for item in split_top_level(input)? {
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => {
                    let key = item.trim().to_string();
                    return Err(if KEYS.contains(&key.as_str()) {
                        DeviceConfigError::MissingValue { key }
                    } else {
                        unknown_key(&key)
                    });
                }
            };
            let Some(canonical) = KEYS.iter().copied().find(|k| *k == key) else {
                return Err(unknown_key(key));
            };
            if seen.contains(&canonical) {
                return Err(DeviceConfigError::DuplicateKey(canonical.to_string()));
            }
            seen.push(canonical);
            cfg.set(canonical, value)?;
        }
        Ok(cfg)
    }

    fn set(&mut self, key: &'static str, value: &str) -> Result<(), DeviceConfigError> {
        let invalid = |expected: &'static str| DeviceConfigError::InvalidValue {
            key: key.to_string(),
            value: value.to_string(),
            expected,
        };
        match key {
            "path" => {
                if value.is_empty() {
                    return Err(invalid("a sysfs device path"));
                }
                self.path = Some(PathBuf::from(value));
            }
            "fd" => {
                let fd: i32 = value
                    .parse()
                    .map_err(|_| invalid("a file descriptor number (0 or more)"))?;
                if fd < 0 {
                    return Err(invalid("a file descriptor number (0 or more)"));
                }
                self.fd = Some(fd);
            }
            "emulated" => {
                if !EMULATED_DEVICES.contains(&value) {
                    return Err(invalid(EMULATED_EXPECTED));
                }
                self.emulated = Some(value.to_string());
            }
            "iommu" => self.iommu = parse_toggle(value).ok_or_else(|| invalid("on or off"))?,
            "pasid" => self.pasid = parse_toggle(value).ok_or_else(|| invalid("on or off"))?,
            "id" => self.id = Some(value.to_string()),
            "pci_segment" => {
                self.pci_segment = value
                    .parse()
                    .map_err(|_| invalid("a PCI segment number, 0-65535"))?;
            }
            "pci_device_id" => {
                self.pci_device_id = Some(
                    value
                        .parse()
                        .map_err(|_| invalid("a PCI device (slot) number, 0-31"))?,
                );
            }
            "x_nv_gpudirect_clique" => {
                self.x_nv_gpudirect_clique =
                    Some(value.parse().map_err(|_| invalid("a clique id, 0-255"))?);
            }
            "x_exclude_mmap_bars" => {
                let inner = value
                    .strip_prefix('[')
                    .and_then(|v| v.strip_suffix(']'))
                    .unwrap_or(value);
                let mut bars = Vec::new();
                for bar in inner.split(',').map(str::trim).filter(|b| !b.is_empty()) {
                    bars.push(
                        bar.parse()
                            .map_err(|_| invalid("a list of BAR numbers, [<bar>,...]"))?,
                    );
                }
                self.x_exclude_mmap_bars = bars;
            }
            "x_pasid_offset" => {
                let expected = "a dword-aligned extended config offset, 0x100-0xffc";
                let n = match value
                    .strip_prefix("0x")
                    .or_else(|| value.strip_prefix("0X"))
                {
                    Some(hex) => u16::from_str_radix(hex, 16),
                    None => value.parse(),
                }
                .map_err(|_| invalid(expected))?;
                if !(0x100..=0xffc).contains(&n) || n % 4 != 0 {
                    return Err(invalid(expected));
                }
                self.x_pasid_offset = Some(n);
            }
            _ => return Err(unknown_key(key)),
        }
        Ok(())
    }

    /// Checks the semantic rules, with `self.fd` telling whether a cdev fd is supplied.
    /// See [`DeviceConfig::validate_with_fd`].
    pub fn validate(&self) -> Result<(), DeviceConfigError> {
        self.validate_with_fd(self.fd.is_some())
    }

    /// Checks the semantic rules: `emulated` (with `iommu`, without path or fd) or exactly
    /// one of `path` and a cdev fd (`fd_supplied`), the
    /// path is a sysfs PCI or mdev device path, the id is well formed, `pci_device_id` is a
    /// slot number, the `x_` options we do not implement are empty, and `pasid` comes with
    /// `iommu`.
    pub fn validate_with_fd(&self, fd_supplied: bool) -> Result<(), DeviceConfigError> {
        if let Some(e) = &self.emulated {
            if self.path.is_some() || fd_supplied {
                return Err(DeviceConfigError::EmulatedWithPathOrFd);
            }
            if !EMULATED_DEVICES.contains(&e.as_str()) {
                return Err(DeviceConfigError::InvalidValue {
                    key: "emulated".to_string(),
                    value: e.clone(),
                    expected: EMULATED_EXPECTED,
                });
            }
            if !self.iommu {
                return Err(DeviceConfigError::EmulatedWithoutIommu(e.clone()));
            }
        }
        match (&self.path, fd_supplied) {
            (None, false) if self.emulated.is_some() => {}
            (None, false) => return Err(DeviceConfigError::NoPathOrFd),
            (Some(_), true) => return Err(DeviceConfigError::BothPathAndFd),
            (Some(path), false) => {
                sysfs_device(path)?;
            }
            (None, true) => {}
        }
        if let Some(id) = &self.id {
            validate_id(id)?;
        }
        if let Some(slot) = self.pci_device_id {
            if slot > MAX_PCI_DEVICE_ID {
                return Err(DeviceConfigError::PciDeviceIdOutOfRange(slot));
            }
        }
        if let Some(clique) = self.x_nv_gpudirect_clique {
            return Err(DeviceConfigError::Unsupported {
                key: "x_nv_gpudirect_clique",
                value: clique.to_string(),
            });
        }
        if !self.x_exclude_mmap_bars.is_empty() {
            return Err(DeviceConfigError::Unsupported {
                key: "x_exclude_mmap_bars",
                value: format!("{:?}", self.x_exclude_mmap_bars),
            });
        }
        if self.pasid && !self.iommu {
            return Err(DeviceConfigError::PasidWithoutIommu);
        }
        if let (Some(off), false) = (self.x_pasid_offset, self.pasid) {
            return Err(DeviceConfigError::InvalidValue {
                key: "x_pasid_offset".to_string(),
                value: format!("{off:#x}"),
                expected: "an offset only together with pasid=on",
            });
        }
        Ok(())
    }

    /// The device `path` names, when there is a path and it is well formed.
    pub fn sysfs_device(&self) -> Option<SysfsDevice> {
        self.path.as_deref().and_then(|p| sysfs_device(p).ok())
    }
}

fn unknown_key(key: &str) -> DeviceConfigError {
    DeviceConfigError::UnknownKey {
        key: key.to_string(),
        accepted: KEYS.join(", "),
    }
}

fn parse_toggle(value: &str) -> Option<bool> {
    match value {
        "on" | "true" => Some(true),
        "off" | "false" => Some(false),
        _ => None,
    }
}

/// Splits at commas outside brackets.
fn split_top_level(input: &str) -> Result<Vec<&str>, DeviceConfigError> {
    let mut out = Vec::new();
    let mut depth = 0usize;
    let mut start = 0usize;
    for (i, c) in input.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth = depth
                    .checked_sub(1)
                    .ok_or_else(|| DeviceConfigError::UnbalancedBrackets(input.to_string()))?;
            }
            ',' if depth == 0 => {
                out.push(&input[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(DeviceConfigError::UnbalancedBrackets(input.to_string()));
    }
    out.push(&input[start..]);
    Ok(out)
}

/// Checks, without touching the filesystem, that `path` is one of the accepted forms:
/// `/sys/bus/pci/devices/<DDDD:BB:DD.F>`, `/sys/bus/mdev/devices/<UUID>` or
/// `/dev/vfio/devices/vfio<N>` (a trailing slash is fine; `.` and `..` are not). An error
/// says which part is wrong.
pub fn sysfs_device(path: &Path) -> Result<SysfsDevice, DeviceConfigError> {
    let bad = |reason: String| DeviceConfigError::BadPath {
        path: path.to_path_buf(),
        reason,
    };
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir => parts.push("/"),
            Component::Normal(s) => parts.push(
                s.to_str()
                    .ok_or_else(|| bad("it is not valid UTF-8".into()))?,
            ),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(bad("`.` and `..` are not allowed".into()))
            }
        }
    }
    let (dir, rest): (&[&str], &[&str]) = match parts.as_slice() {
        ["/", "sys", "bus", "pci", "devices", rest @ ..] => (&["pci"], rest),
        ["/", "sys", "bus", "mdev", "devices", rest @ ..] => (&["mdev"], rest),
        ["/", "dev", "vfio", "devices", rest @ ..] => (&["cdev"], rest),
        _ => return Err(DeviceConfigError::PathNotAllowed(path.to_path_buf())),
    };
    let name = match rest {
        [name] => *name,
        [] => return Err(bad("it names the directory, not a device in it".into())),
        [name, ..] => {
            return Err(bad(format!(
                "it goes below the device `{name}` (give the device directory itself)"
            )))
        }
    };
    match dir {
        ["pci"] => bdf_problem(name)
            .map(|p| {
                Err(bad(format!(
                    "`{name}` is not a PCI address DDDD:BB:DD.F: {p}"
                )))
            })
            .unwrap_or_else(|| Ok(SysfsDevice::Pci(name.to_string()))),
        ["mdev"] if is_uuid(name) => Ok(SysfsDevice::Mdev(name.to_string())),
        ["mdev"] => Err(bad(format!(
            "`{name}` is not an mdev UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, hex)"
        ))),
        _ => match name.strip_prefix("vfio") {
            Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                Ok(SysfsDevice::Cdev(name.to_string()))
            }
            _ => Err(bad(format!("`{name}` is not a VFIO cdev name vfio<N>"))),
        },
    }
}

fn is_hex_field(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// What is wrong with `s` as `DDDD:BB:DD.F` (device <= 0x1f, function <= 7), if anything.
fn bdf_problem(s: &str) -> Option<String> {
    let mut it = s.split(':');
    let (Some(dom), Some(bus), Some(devfn), None) = (it.next(), it.next(), it.next(), it.next())
    else {
        return Some("expected three `:`-separated parts".into());
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return Some(format!("`{devfn}` lacks the `.F` function number"));
    };
    if !is_hex_field(dom, 4) {
        return Some(format!("domain `{dom}` is not 4 hex digits"));
    }
    if !is_hex_field(bus, 2) {
        return Some(format!("bus `{bus}` is not 2 hex digits"));
    }
    if !is_hex_field(dev, 2) {
        return Some(format!("device `{dev}` is not 2 hex digits"));
    }
    if !is_hex_field(func, 1) {
        return Some(format!("function `{func}` is not 1 hex digit"));
    }
    match (u8::from_str_radix(dev, 16), u8::from_str_radix(func, 16)) {
        (Ok(d), _) if d > MAX_PCI_DEVICE_ID => Some(format!(
            "device number {d:#x} is above {MAX_PCI_DEVICE_ID:#x}"
        )),
        (_, Ok(f)) if f > 7 => Some(format!("function number {f} is above 7")),
        (Ok(_), Ok(_)) => None,
        _ => Some("not hexadecimal".into()),
    }
}

/// `DDDD:BB:DD.F` with device <= 0x1f and function <= 7.
pub fn is_bdf(s: &str) -> bool {
    bdf_problem(s).is_none()
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex).
pub fn is_uuid(s: &str) -> bool {
    let lens = [8, 4, 4, 4, 12];
    let fields: Vec<&str> = s.split('-').collect();
    fields.len() == lens.len() && fields.iter().zip(lens).all(|(f, l)| is_hex_field(f, l))
}

/// A device id: 1 to [`MAX_ID_LEN`] characters from `[A-Za-z0-9_.:-]`.
pub fn validate_id(id: &str) -> Result<(), DeviceConfigError> {
    let invalid = |reason| DeviceConfigError::InvalidId {
        id: id.to_string(),
        reason,
    };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid("it is longer than 64 characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    {
        return Err(invalid("only letters, digits and _ . : - are allowed"));
    }
    if RESERVED_IDS.contains(&id) {
        return Err(invalid(
            "it names one of the VMM's own entries of vm.counters",
        ));
    }
    Ok(())
}

/// Ids no device may take: the VM-wide entries of `vm.counters`.
pub const RESERVED_IDS: &[&str] = &[crate::types::IOMMU_COUNTERS_KEY, "_vm"];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    const BDF_PATH: &str = "/sys/bus/pci/devices/0000:01:00.0";

    #[test]
    fn parse_full_syntax() {
        let cfg = DeviceConfig::parse(&format!(
            "path={BDF_PATH},iommu=on,pasid=on,id=nic0,pci_segment=1,pci_device_id=5"
        ))
        .unwrap();
        assert_eq!(cfg.path.as_deref(), Some(Path::new(BDF_PATH)));
        assert!(cfg.iommu && cfg.pasid);
        assert_eq!(cfg.id.as_deref(), Some("nic0"));
        assert_eq!(cfg.pci_segment, 1);
        assert_eq!(cfg.pci_device_id, Some(5));
        cfg.validate().unwrap();
        assert_eq!(
            cfg.sysfs_device(),
            Some(SysfsDevice::Pci("0000:01:00.0".into()))
        );
    }

    #[test]
    fn parse_errors_name_key_and_accepted_values() {
        let e = DeviceConfig::parse("path=/x,colour=red").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("colour") && msg.contains("pci_device_id"),
            "{msg}"
        );

        let e = DeviceConfig::parse("path=/x,iommu=yes").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("iommu") && msg.contains("on or off"), "{msg}");

        let e = DeviceConfig::parse("pci_device_id=300").unwrap_err();
        assert!(e.to_string().contains("pci_device_id"), "{e}");

        assert_eq!(
            DeviceConfig::parse("id=a,id=b").unwrap_err(),
            DeviceConfigError::DuplicateKey("id".into())
        );
        assert_eq!(
            DeviceConfig::parse("iommu").unwrap_err(),
            DeviceConfigError::MissingValue {
                key: "iommu".into()
            }
        );
        assert!(matches!(
            DeviceConfig::parse("x_exclude_mmap_bars=[1,2"),
            Err(DeviceConfigError::UnbalancedBrackets(_))
        ));
        assert!(DeviceConfig::parse("fd=-3").is_err());
    }

    #[test]
    fn x_pasid_offset_parsed_and_checked() {
        let cfg = DeviceConfig::parse(&format!(
            "path={BDF_PATH},iommu=on,pasid=on,x_pasid_offset=0xe00"
        ))
        .unwrap();
        assert_eq!(cfg.x_pasid_offset, Some(0xe00));
        cfg.validate().unwrap();
        let cfg = DeviceConfig::parse(&format!("path={BDF_PATH},x_pasid_offset=256")).unwrap();
        assert_eq!(cfg.x_pasid_offset, Some(0x100));
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("pasid=on"), "{msg}");
        for bad in ["0x102", "0x80", "0x1000", "x"] {
            let e = DeviceConfig::parse(&format!("path={BDF_PATH},x_pasid_offset={bad}"));
            assert!(e.is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn x_options_only_when_empty() {
        let cfg = DeviceConfig::parse(&format!("path={BDF_PATH},x_exclude_mmap_bars=[]")).unwrap();
        cfg.validate().unwrap();
        let cfg =
            DeviceConfig::parse(&format!("path={BDF_PATH},x_exclude_mmap_bars=[0,2]")).unwrap();
        assert_eq!(cfg.x_exclude_mmap_bars, vec![0, 2]);
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("x_exclude_mmap_bars"), "{msg}");
        let cfg = DeviceConfig::parse(&format!("path={BDF_PATH},x_nv_gpudirect_clique=3")).unwrap();
        let msg = cfg.validate().unwrap_err().to_string();
        assert!(msg.contains("x_nv_gpudirect_clique"), "{msg}");
    }

    #[test]
    fn path_errors_say_which_part() {
        for (path, part) in [
            (
                "/sys/bus/pci/devices/0000:01:20.0",
                "device number 0x20 is above 0x1f",
            ),
            ("/sys/bus/pci/devices/0000:01:00.8", "function number 8"),
            ("/sys/bus/pci/devices/01:00.0", "three"),
            ("/sys/bus/pci/devices/000g:01:00.0", "domain `000g`"),
            ("/sys/bus/pci/devices/0000:01:00.0/config", "goes below"),
            ("/sys/bus/mdev/devices/nope", "UUID"),
            ("/dev/vfio/devices/vfiox", "vfio<N>"),
            ("/sys/bus/pci/devices/../x", "`..`"),
            ("/etc/passwd", "/sys/bus/pci/devices/<DDDD:BB:DD.F>"),
        ] {
            let e = sysfs_device(Path::new(path)).unwrap_err().to_string();
            assert!(e.contains(part) && e.contains(path), "{path}: {e}");
        }
    }

    #[test]
    fn path_rules() {
        for good in [
            BDF_PATH,
            "/sys/bus/pci/devices/0000:01:00.0/",
            "/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
            "/dev/vfio/devices/vfio0",
        ] {
            sysfs_device(Path::new(good)).unwrap();
        }
        for bad in [
            "/dev/vfio/devices/vfio",
            "/sys/bus/pci/devices/../../../etc/passwd",
            "/sys/bus/pci/devices/0000:01:00.0/../0000:02:00.0",
            "sys/bus/pci/devices/0000:01:00.0",
            "/sys/bus/pci/devices/0000:01:00.0/config",
            "/sys/bus/pci/devices/01:00.0",
            "/sys/bus/pci/devices/0000:01:20.0",
            "/sys/bus/pci/devices/0000:01:00.8",
            "/sys/bus/mdev/devices/not-a-uuid",
            "/sys/bus/usb/devices/1-1",
            "/sys/bus/pci/devices",
        ] {
            assert!(sysfs_device(Path::new(bad)).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn path_xor_fd_and_pasid_needs_iommu() {
        assert_eq!(
            DeviceConfig::default().validate(),
            Err(DeviceConfigError::NoPathOrFd)
        );
        let both = DeviceConfig::parse(&format!("path={BDF_PATH},fd=3")).unwrap();
        assert_eq!(both.validate(), Err(DeviceConfigError::BothPathAndFd));
        DeviceConfig::parse("fd=3").unwrap().validate().unwrap();
        let p = DeviceConfig::parse(&format!("path={BDF_PATH},pasid=on")).unwrap();
        assert_eq!(p.validate(), Err(DeviceConfigError::PasidWithoutIommu));
        let bad_id = DeviceConfig::parse(&format!("path={BDF_PATH},id=a b")).unwrap();
        assert!(matches!(
            bad_id.validate(),
            Err(DeviceConfigError::InvalidId { .. })
        ));
    }

    #[test]
    fn json_is_cloud_hypervisor_compatible() {
        // What a Cloud Hypervisor client sends for `path=...` (x_exclude_mmap_bars always).
        let body = format!(r#"{{"path":"{BDF_PATH}","pci_segment":0,"x_exclude_mmap_bars":[]}}"#);
        let cfg: DeviceConfig = serde_json::from_str(&body).unwrap();
        cfg.validate().unwrap();
        let nulls = format!(
            r#"{{"path":"{BDF_PATH}","id":null,"pci_device_id":null,"x_nv_gpudirect_clique":null,"x_exclude_mmap_bars":null}}"#
        );
        let cfg: DeviceConfig = serde_json::from_str(&nulls).unwrap();
        cfg.validate().unwrap();
        let unknown = format!(r#"{{"path":"{BDF_PATH}","x_foo":1}}"#);
        let e = serde_json::from_str::<DeviceConfig>(&unknown).unwrap_err();
        assert!(e.to_string().contains("x_foo"), "{e}");
        // Our serializer round-trips and omits defaults Cloud Hypervisor would not know.
        let cfg = DeviceConfig::parse(&format!("path={BDF_PATH},id=d0")).unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        assert!(json.get("pasid").is_none());
        assert_eq!(json["x_exclude_mmap_bars"], serde_json::json!([]));
        assert_eq!(serde_json::from_value::<DeviceConfig>(json).unwrap(), cfg);
    }

    #[test]
    fn emulated_excludes_path_and_fd_and_needs_iommu() {
        let c = DeviceConfig::parse("emulated=sva-copy,id=sva0,iommu=on").unwrap();
        c.validate().unwrap();
        assert_eq!(c.emulated.as_deref(), Some("sva-copy"));
        let e = DeviceConfig::parse("emulated=nic").unwrap_err();
        assert!(e.to_string().contains("sva-copy"), "{e}");
        let both =
            DeviceConfig::parse(&format!("emulated=sva-copy,iommu=on,path={BDF_PATH}")).unwrap();
        assert_eq!(
            both.validate(),
            Err(DeviceConfigError::EmulatedWithPathOrFd)
        );
        let fd = DeviceConfig::parse("emulated=sva-copy,iommu=on,fd=3").unwrap();
        assert_eq!(fd.validate(), Err(DeviceConfigError::EmulatedWithPathOrFd));
        let off = DeviceConfig::parse("emulated=sva-copy").unwrap();
        assert_eq!(
            off.validate(),
            Err(DeviceConfigError::EmulatedWithoutIommu("sva-copy".into()))
        );
        // REST: the same key in JSON; an unknown device names the accepted ones.
        let j: DeviceConfig =
            serde_json::from_str(r#"{"emulated":"sva-copy","iommu":true,"id":"sva0"}"#).unwrap();
        assert_eq!(j, c);
        let bad: DeviceConfig = serde_json::from_str(r#"{"emulated":"x","iommu":true}"#).unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("sva-copy"));
    }

    #[test]
    fn emulated_swq_parses_on_the_command_line_and_in_json() {
        let c = DeviceConfig::parse("emulated=swq,id=swq0,iommu=on").unwrap();
        c.validate().unwrap();
        assert_eq!(c.emulated.as_deref(), Some("swq"));
        let j: DeviceConfig =
            serde_json::from_str(r#"{"emulated":"swq","iommu":true,"id":"swq0"}"#).unwrap();
        assert_eq!(j, c);
        assert_eq!(
            DeviceConfig::parse("emulated=swq").unwrap().validate(),
            Err(DeviceConfigError::EmulatedWithoutIommu("swq".into()))
        );
        let e = DeviceConfig::parse("emulated=dsa").unwrap_err().to_string();
        assert!(e.contains("sva-copy or swq"), "{e}");
        assert!(DeviceConfig::SYNTAX.contains("emulated=sva-copy|swq"));
    }
}
