//! `VmConfig`: the body of `PUT /api/v1/vm.create` and the `config` of `vm.info`, in Cloud
//! Hypervisor's field names, for the parts of it ioasid-vmm implements: `cpus`, `memory`,
//! `payload` (kernel, initramfs, cmdline; or a raw `firmware` image), `devices`, `serial`,
//! `console` and `platform`.
//!
//! Anything else is refused with its name ([`VmConfig::from_json`]). A typed Cloud
//! Hypervisor client serializes every field, most of them as `null`, `false`, `[]` or `{}`
//! when unused; those values mean "not used" and are accepted for any field. The checks of
//! values (sizes, counts, paths) are the VMM's, the same as for its command line.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::device_config::DeviceConfig;

/// `cpus` (Cloud Hypervisor's `CpusConfig`, the fields we implement).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot_vcpus: u8,
    /// Most vCPUs; ioasid-vmm has no CPU hotplug, so only `boot_vcpus` is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u8>,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig {
            boot_vcpus: 1,
            max_vcpus: None,
        }
    }
}

/// `memory` (Cloud Hypervisor's `MemoryConfig`, the fields we implement).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Back guest RAM with huge pages.
    #[serde(default)]
    pub hugepages: bool,
}

/// Cloud Hypervisor's default guest RAM (512 MiB).
pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY_SIZE,
            hugepages: false,
        }
    }
}

/// `payload` (Cloud Hypervisor's `PayloadConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PayloadConfig {
    /// Kernel image (bzImage, or an ELF vmlinux with a PVH note).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// Initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// A raw image the boot vCPU runs in real mode (ioasid-vmm has no firmware support beyond
    /// this: the image is loaded at 0x1000, not below 4 GiB as Cloud Hypervisor loads a
    /// firmware).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<PathBuf>,
}

/// `serial.mode` / `console.mode` (Cloud Hypervisor's `ConsoleConfig.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleMode {
    /// Disabled.
    Off,
    /// A pseudo terminal (not supported).
    Pty,
    /// The VMM's stdin/stdout.
    Tty,
    /// Output appended to `file`.
    File,
    /// A Unix socket (not supported).
    Socket,
    /// Present, output discarded.
    Null,
}

/// `serial` and `console` (Cloud Hypervisor's `ConsoleConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Mode.
    pub mode: ConsoleMode,
    /// Output file, for `File`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

impl ConsoleConfig {
    /// A console of `mode` without a file.
    pub fn mode(mode: ConsoleMode) -> ConsoleConfig {
        ConsoleConfig { mode, file: None }
    }
}

/// A full VM configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs (default: one).
    #[serde(default)]
    pub cpus: CpusConfig,
    /// Guest RAM (default: 512 MiB).
    #[serde(default)]
    pub memory: MemoryConfig,
    /// What to boot (required).
    pub payload: PayloadConfig,
    /// Passthrough devices.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// The 16550 at COM1 (default: `Null`, as Cloud Hypervisor).
    #[serde(default = "null_console")]
    pub serial: ConsoleConfig,
    /// The virtio console: ioasid-vmm has none, so only `Off` and `Null` are accepted
    /// (default: `Off`).
    #[serde(default = "off_console")]
    pub console: ConsoleConfig,
    /// Platform options: the keys of `ioasid-vmm --platform` (`iommufd`, `viommu`,
    /// `iommu_address_width`, ...), with strings, numbers or booleans (`true` is `on`), and
    /// Cloud Hypervisor's `num_pci_segments` when it is 1.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub platform: BTreeMap<String, Value>,
}

fn null_console() -> ConsoleConfig {
    ConsoleConfig::mode(ConsoleMode::Null)
}

fn off_console() -> ConsoleConfig {
    ConsoleConfig::mode(ConsoleMode::Off)
}

/// The fields of each object [`VmConfig::from_json`] knows, by path.
const KNOWN: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "cpus", "memory", "payload", "devices", "serial", "console", "platform",
        ],
    ),
    ("cpus", &["boot_vcpus", "max_vcpus"]),
    ("memory", &["size", "hugepages"]),
    ("payload", &["kernel", "cmdline", "initramfs", "firmware"]),
    ("serial", &["mode", "file"]),
    ("console", &["mode", "file"]),
];

/// Whether `v` is a typed client's "not used" value.
fn unused(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// Drops the fields of the object at `path` that we do not know and whose value means "not
/// used", and `null`s of the ones we know; recurses into the known sub-objects.
fn strip_unused(path: &str, v: &mut Value) {
    let Some(obj) = v.as_object_mut() else {
        return;
    };
    let known = KNOWN
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, k)| *k)
        .unwrap_or(&[]);
    obj.retain(|k, v| {
        if known.contains(&k.as_str()) {
            !v.is_null()
        } else {
            !unused(v)
        }
    });
    for (k, v) in obj.iter_mut() {
        let sub = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if KNOWN.iter().any(|(p, _)| *p == sub) {
            strip_unused(&sub, v);
        }
    }
    if path.is_empty() {
        // `false` is a value of the `--platform` on/off keys, so only Cloud Hypervisor's
        // confidential-computing switches are dropped when false.
        if let Some(Value::Object(p)) = obj.get_mut("platform") {
            p.retain(|k, v| match v {
                Value::Bool(false) => !matches!(k.as_str(), "tdx" | "sev_snp"),
                other => !unused(other),
            });
        }
    }
}

impl VmConfig {
    /// Parses a `vm.create` body: unused fields of a typed client are dropped (see the module
    /// documentation), then every remaining field must be one we implement; an error names
    /// the first that is not.
    pub fn from_json(body: &[u8]) -> Result<VmConfig, String> {
        let mut v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if !v.is_object() {
            return Err("expected a JSON object".into());
        }
        strip_unused("", &mut v);
        serde_json::from_value(v).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn minimal_and_typed_client_bodies() {
        let c = VmConfig::from_json(br#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 1);
        assert_eq!(c.memory.size, DEFAULT_MEMORY_SIZE);
        assert_eq!(c.serial.mode, ConsoleMode::Null);
        // What a typed Cloud Hypervisor client sends for the same VM.
        let body = br#"{"cpus":{"boot_vcpus":2,"max_vcpus":2,"topology":null,"kvm_hyperv":false,
            "affinity":null,"features":{}},"memory":{"size":268435456,"mergeable":false,
            "shared":false,"hugepages":false,"zones":null},"payload":{"kernel":"/k",
            "cmdline":"console=ttyS0","initramfs":null,"firmware":null},"disks":null,"net":null,
            "rng":{},"devices":[],"serial":{"mode":"File","file":"/tmp/s","iommu":false},
            "console":{"mode":"Off","file":null,"iommu":false},"iommu":false,"watchdog":false,
            "platform":{"num_pci_segments":1,"iommu_address_width":null,"tdx":false,
            "oem_strings":null}}"#;
        let c = VmConfig::from_json(body).unwrap();
        assert_eq!(c.cpus.max_vcpus, Some(2));
        assert_eq!(c.memory.size, 256 << 20);
        assert_eq!(
            c.serial.file.as_deref(),
            Some(std::path::Path::new("/tmp/s"))
        );
        assert_eq!(c.platform.get("num_pci_segments"), Some(&Value::from(1)));
        assert!(!c.platform.contains_key("iommu_address_width"));
    }

    #[test]
    fn unsupported_fields_are_named() {
        for (body, name) in [
            (
                r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d"}]}"#,
                "disks",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"memory":{"size":1,"shared":true}}"#,
                "shared",
            ),
            (r#"{"payload":{"kernel":"/k","igvm":"/i"}}"#, "igvm"),
            (r#"{"cpus":{"boot_vcpus":1}}"#, "payload"),
        ] {
            let e = VmConfig::from_json(body.as_bytes()).unwrap_err();
            assert!(e.contains(name), "{body}: {e}");
        }
    }
}
