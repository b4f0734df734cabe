//! The parts of `vmm.ping` and `vm.info` that come from the VMM's configuration rather than
//! from the device manager.

use api::types::VmmPingResponse;
use serde_json::{json, Value};

use crate::config::{BootConfig, SerialConfig, ViommuKind, VmConfig};

/// `vmm.ping`: our version and pid.
pub fn ping() -> VmmPingResponse {
    VmmPingResponse {
        build_version: format!("ioasid-vmm {}", env!("CARGO_PKG_VERSION")),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: i64::from(std::process::id()),
        features: vec!["iommufd".into(), "type1".into(), "pci_hotplug".into()],
    }
}

/// The `config` object of `vm.info`, in Cloud Hypervisor's shape where it has one
/// (`cpus.boot_vcpus`, `memory.size`, `payload`, `serial`); `devices` is filled by the caller.
pub fn config_json(cfg: &VmConfig) -> Value {
    let payload = match &cfg.boot {
        BootConfig::Linux(l) => json!({
            "kernel": l.kernel,
            "cmdline": l.cmdline,
            "initramfs": l.initramfs,
        }),
        BootConfig::Payload(p) => json!({
            "raw": p.path,
            "gpa": p.gpa,
            "mode": format!("{:?}", p.mode).to_lowercase(),
            "irqchip": p.irqchip,
        }),
    };
    let serial = match &cfg.serial {
        SerialConfig::Tty => json!({ "mode": "Tty" }),
        SerialConfig::Off => json!({ "mode": "Off" }),
        SerialConfig::File(f) => json!({ "mode": "File", "file": f }),
    };
    json!({
        "cpus": { "boot_vcpus": cfg.cpus.boot, "max_vcpus": cfg.cpus.boot },
        "memory": { "size": cfg.memory.size, "hugepages": cfg.memory.hugepages },
        "payload": payload,
        "serial": serial,
        "platform": {
            "iommufd": format!("{:?}", cfg.platform.iommufd).to_lowercase(),
            "iommu_address_width": cfg.platform.iommu_address_width,
            "viommu": match cfg.platform.viommu {
                ViommuKind::Off => "off",
                ViommuKind::Vtd => "vtd",
            },
        },
        "api_socket": cfg.api_socket,
    })
}
