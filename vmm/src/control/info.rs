//! `vmm.ping`, and the VM configuration in both directions: Cloud Hypervisor's `VmConfig`
//! from `vm.create` into ours ([`from_api`], through the same checks as the command line),
//! and ours into Cloud Hypervisor's field names for `vm.info` ([`to_api`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use api::types::VmmPingResponse;
use api::vm_config::{
    ConsoleConfig, ConsoleMode, CpusConfig, MemoryConfig, PayloadConfig, VmConfig as ApiVmConfig,
};
use api::{ApiError, ApiErrorKind};
use serde_json::Value;

use crate::config::{
    BootConfig, HwptMode, OnOffAuto, RlimitMode, SerialConfig, ViommuKind, VmArgs, VmConfig,
};

/// `vmm.ping`: our version and pid.
pub fn ping() -> VmmPingResponse {
    VmmPingResponse {
        build_version: format!("ioasid-vmm {}", env!("CARGO_PKG_VERSION")),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: i64::from(std::process::id()),
        features: vec!["iommufd".into(), "type1".into(), "pci_hotplug".into()],
    }
}

/// Our configuration in Cloud Hypervisor's `VmConfig` field names (`vm.info`'s `config`).
/// A raw payload is reported as `payload.firmware`.
pub fn to_api(cfg: &VmConfig) -> ApiVmConfig {
    let payload = match &cfg.boot {
        BootConfig::Linux(l) => PayloadConfig {
            kernel: Some(l.kernel.clone()),
            cmdline: Some(l.cmdline.clone()),
            initramfs: l.initramfs.clone(),
            firmware: None,
        },
        BootConfig::Payload(p) => PayloadConfig {
            firmware: Some(p.path.clone()),
            ..Default::default()
        },
    };
    let serial = match &cfg.serial {
        SerialConfig::Tty => ConsoleConfig::mode(ConsoleMode::Tty),
        SerialConfig::Off => ConsoleConfig::mode(ConsoleMode::Null),
        SerialConfig::File { path, .. } => ConsoleConfig {
            mode: ConsoleMode::File,
            file: Some(path.clone()),
        },
    };
    let mut platform = BTreeMap::new();
    let on_off_auto = |v: OnOffAuto| match v {
        OnOffAuto::On => "on",
        OnOffAuto::Off => "off",
        OnOffAuto::Auto => "auto",
    };
    let on_off = |b: bool| if b { "on" } else { "off" };
    platform.insert(
        "iommufd".to_string(),
        Value::from(on_off_auto(cfg.platform.iommufd)),
    );
    if cfg.platform.hwpt == HwptMode::Explicit {
        platform.insert("hwpt".to_string(), Value::from("explicit"));
    }
    if cfg.platform.rlimit_mode == RlimitMode::Process {
        platform.insert("rlimit_mode".to_string(), Value::from("process"));
    }
    let viommu = match cfg.platform.viommu {
        ViommuKind::Off => "off",
        ViommuKind::Vtd => "vtd",
    };
    platform.insert("viommu".to_string(), Value::from(viommu));
    if cfg.platform.viommu == ViommuKind::Vtd {
        // The VT-d unit's options under their command-line names, so that vm.create takes
        // this platform map back as it is.
        let vtd = &cfg.platform.vtd;
        for (k, v) in [
            ("scalable-mode", Value::from(on_off(vtd.scalable_mode))),
            ("fsts", Value::from(on_off_auto(vtd.fsts))),
            ("pasid-bits", Value::from(vtd.pasid_bits)),
            ("svm", Value::from(on_off(vtd.svm))),
        ] {
            platform.insert(k.to_string(), v);
        }
    }
    if let Some(w) = cfg.platform.iommu_address_width {
        platform.insert("iommu_address_width".to_string(), Value::from(w));
    }
    ApiVmConfig {
        cpus: CpusConfig {
            boot_vcpus: cfg.cpus.boot,
            max_vcpus: Some(cfg.cpus.boot),
        },
        memory: MemoryConfig {
            size: cfg.memory.size,
            hugepages: cfg.memory.hugepages,
        },
        payload,
        devices: cfg.devices.clone(),
        serial,
        console: ConsoleConfig::mode(ConsoleMode::Off),
        platform,
    }
}

fn refuse(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// A path that goes into a `--payload` value, where `,` separates options.
fn payload_path(p: &std::path::Path) -> Result<String, ApiError> {
    let s = p
        .to_str()
        .ok_or_else(|| refuse(format!("payload.firmware {} is not UTF-8", p.display())))?;
    if s.contains(',') || s.is_empty() {
        return Err(refuse(format!(
            "payload.firmware `{s}` must be a non-empty path without `,`"
        )));
    }
    Ok(s.to_string())
}

fn platform_value(key: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) if !s.contains(',') && !s.contains('=') => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(true) => Ok("on".into()),
        Value::Bool(false) => Ok("off".into()),
        other => Err(refuse(format!(
            "platform.{key}: {other} is not a string, number or boolean"
        ))),
    }
}

/// Cloud Hypervisor's `VmConfig` (from `vm.create`) as ours, checked as the command line
/// is: the same rules, the same messages (which name the command-line flag; the JSON
/// field is the flag without `--`, `boot_vcpus` is `--cpus boot`). `api_socket` is the
/// VMM's own.
pub fn from_api(c: &ApiVmConfig, api_socket: Option<PathBuf>) -> Result<VmConfig, ApiError> {
    let mut a = VmArgs::default();
    let p = &c.payload;
    match (&p.kernel, &p.firmware) {
        (Some(k), None) => {
            a.kernel = Some(k.clone());
            a.cmdline = p.cmdline.clone();
            a.initramfs = p.initramfs.clone();
        }
        (None, Some(f)) => {
            if p.cmdline.is_some() || p.initramfs.is_some() {
                return Err(refuse(
                    "payload.cmdline and payload.initramfs apply only to payload.kernel",
                ));
            }
            a.payload = Some(format!("{},mode=real,irqchip=on", payload_path(f)?));
        }
        (Some(_), Some(_)) => {
            return Err(refuse(
                "payload: give kernel or firmware, not both (ioasid-vmm boots Linux directly)",
            ))
        }
        (None, None) => return Err(refuse("payload: kernel (or firmware) is required")),
    }
    if let Some(max) = c.cpus.max_vcpus {
        if max != c.cpus.boot_vcpus {
            return Err(refuse(format!(
                "cpus.max_vcpus {max} differs from cpus.boot_vcpus {}: ioasid-vmm has no CPU \
                 hotplug",
                c.cpus.boot_vcpus
            )));
        }
    }
    a.cpus = Some(format!("boot={}", c.cpus.boot_vcpus));
    a.memory = Some(format!(
        "size={},hugepages={}",
        c.memory.size,
        if c.memory.hugepages { "on" } else { "off" }
    ));
    a.serial = Some(match c.serial.mode {
        ConsoleMode::Off | ConsoleMode::Null => "off".to_string(),
        ConsoleMode::Tty => "tty".to_string(),
        ConsoleMode::File => match &c.serial.file {
            Some(f) => format!("file={}", f.display()),
            None => return Err(refuse("serial: mode File needs serial.file")),
        },
        m @ (ConsoleMode::Pty | ConsoleMode::Socket) => {
            return Err(refuse(format!(
                "serial.mode {m:?} is not supported: use Off, Null, Tty or File"
            )))
        }
    });
    if !matches!(c.console.mode, ConsoleMode::Off | ConsoleMode::Null) {
        return Err(refuse(format!(
            "console.mode {:?} is not supported: ioasid-vmm has no virtio console (use serial)",
            c.console.mode
        )));
    }
    let mut platform = Vec::new();
    for (k, v) in &c.platform {
        if k == "num_pci_segments" {
            if v.as_u64() != Some(1) {
                return Err(refuse(format!(
                    "platform.num_pci_segments {v} is not supported: ioasid-vmm has one PCI \
                     segment"
                )));
            }
            continue;
        }
        platform.push(format!("{k}={}", platform_value(k, v)?));
    }
    if !platform.is_empty() {
        a.platform = Some(platform.join(","));
    }
    a.api_socket = api_socket;
    let mut cfg = VmConfig::from_args(&a)
        .map_err(|e| ApiError::from_chain(ApiErrorKind::BadRequest, &InvalidConfig(e)))?;
    let mut ids = Vec::new();
    for (i, d) in c.devices.iter().enumerate() {
        crate::device_manager::check_device_config(d, false)
            .map_err(|e| refuse(format!("devices[{i}]: {e}")))?;
        if let Some(id) = &d.id {
            if ids.contains(id) {
                return Err(refuse(format!(
                    "devices[{i}]: id {id} is used by more than one device"
                )));
            }
            ids.push(id.clone());
        }
        if d.iommu && cfg.platform.viommu == ViommuKind::Off {
            return Err(refuse(format!(
                "devices[{i}]: iommu needs a vIOMMU: set platform.viommu to \"vtd\""
            )));
        }
    }
    cfg.devices = c.devices.clone();
    Ok(cfg)
}

/// The command-line checks' error as the cause of "Invalid VmConfig".
#[derive(Debug, thiserror::Error)]
#[error("Invalid VmConfig")]
struct InvalidConfig(#[source] crate::config::ConfigError);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::VmArgs;

    /// `vm.info`'s config goes back into `vm.create` unchanged: the VT-d options included.
    #[test]
    fn info_platform_round_trips_through_create() {
        let a = VmArgs {
            kernel: Some("/boot/vmlinuz".into()),
            platform: Some(
                "iommufd=auto,hwpt=explicit,viommu=vtd,scalable-mode=on,fsts=on,pasid-bits=20,\
                 svm=on"
                    .to_string(),
            ),
            ..Default::default()
        };
        let cfg = VmConfig::from_args(&a).unwrap();
        let api = to_api(&cfg);
        let want = [
            ("iommufd", Value::from("auto")),
            ("hwpt", Value::from("explicit")),
            ("viommu", Value::from("vtd")),
            ("scalable-mode", Value::from("on")),
            ("fsts", Value::from("on")),
            ("pasid-bits", Value::from(20u8)),
            ("svm", Value::from("on")),
        ];
        for (k, v) in &want {
            assert_eq!(
                api.platform.get(*k),
                Some(v),
                "platform.{k} in {:?}",
                api.platform
            );
        }
        let back = from_api(&api, None).unwrap();
        assert_eq!(back.platform, cfg.platform);
    }
}
