//! The command line: clap definitions ([`cli`]) and their translation into a typed
//! [`VmConfig`], one module per flag family ([`machine`], [`boot`], [`device`], [`platform`]),
//! over one `key=value` parser ([`kv`]).
//!
//! Option syntax follows Cloud Hypervisor where it has an equivalent (`--cpus boot=N`,
//! `--memory size=..`, `--device path=..`, `--platform iommufd=..`, `--serial tty|file=..|off`);
//! the vIOMMU options take QEMU's 2026 property names (`scalable-mode`, `fsts`, `pasid-bits`,
//! `svm`). Every rejected value names its flag, the key, and what is accepted.
//!
//! Owns: syntax and the checks that need no host. Must not reach into the device manager
//! (which depends on this module, not the other way round): checks that need the host (a
//! device's IOMMU capabilities) happen when the device manager applies the config.

pub mod boot;
pub mod cli;
pub mod device;
pub mod error;
pub mod kv;
pub mod machine;
pub mod platform;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use boot::{BootConfig, LinuxConfig, PayloadConfig, DEFAULT_CMDLINE};
pub use cli::{Cli, Command, VmArgs};
pub use device::{check_device_config, DeviceConfig, CDEV_DIR};
pub use error::ConfigError;
pub use kv::parse_size;
pub use machine::{CpusConfig, MemoryConfig, SerialConfig, DEFAULT_MEMORY};
pub use platform::{
    FstsMode, HwptMode, OnOffAuto, PlatformConfig, RlimitMode, ViommuConfig, ViommuKind,
};

use boot::parse_payload;
use device::parse_device;
use machine::{parse_cpus, parse_memory, parse_serial};
use platform::parse_platform;

/// A fully checked VM configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootConfig,
    /// vCPUs.
    pub cpus: CpusConfig,
    /// RAM.
    pub memory: MemoryConfig,
    /// Passthrough devices (parsed and stored; the device manager applies them).
    pub devices: Vec<DeviceConfig>,
    /// Platform options.
    pub platform: PlatformConfig,
    /// Serial console.
    pub serial: SerialConfig,
    /// API socket.
    pub api_socket: Option<PathBuf>,
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Run a VM.
    Run(Box<VmConfig>),
    /// `iommu-info --device PATH`.
    IommuInfo {
        /// The device.
        device: PathBuf,
    },
}

impl VmConfig {
    /// Checks and types the VM options.
    pub fn from_args(a: &VmArgs) -> Result<Self, ConfigError> {
        let boot = match (&a.kernel, &a.payload) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    flag: "--kernel/--payload",
                    reason: "give either a kernel or a payload, not both".into(),
                })
            }
            (None, None) => {
                return Err(ConfigError::Invalid {
                    flag: "--kernel",
                    reason: "nothing to boot: give --kernel <PATH> (or the test flag --payload)"
                        .into(),
                })
            }
            (Some(k), None) => BootConfig::Linux(LinuxConfig {
                kernel: k.clone(),
                cmdline: a
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
                initramfs: a.initramfs.clone(),
            }),
            (None, Some(p)) => {
                if a.initramfs.is_some() || a.cmdline.is_some() {
                    return Err(ConfigError::Invalid {
                        flag: "--payload",
                        reason: "--cmdline and --initramfs apply only to --kernel".into(),
                    });
                }
                BootConfig::Payload(parse_payload(p)?)
            }
        };
        let cpus = match &a.cpus {
            Some(s) => parse_cpus(s)?,
            None => CpusConfig::with_boot(1),
        };
        if let BootConfig::Payload(p) = &boot {
            if cpus.boot > 1 && !p.irqchip {
                return Err(ConfigError::Invalid {
                    flag: "--cpus",
                    reason: "a payload without irqchip=on runs on exactly one vCPU".into(),
                });
            }
        }
        let memory = match &a.memory {
            Some(s) => parse_memory(s)?,
            None => MemoryConfig {
                size: DEFAULT_MEMORY,
                hugepages: false,
            },
        };
        let mut devices = Vec::new();
        for d in &a.device {
            let dev = parse_device(d)?;
            if let Some(id) = &dev.id {
                if devices
                    .iter()
                    .any(|o: &DeviceConfig| o.id.as_ref() == Some(id))
                {
                    return Err(ConfigError::Invalid {
                        flag: "--device",
                        reason: format!("id={id} is used by more than one device"),
                    });
                }
            }
            if let Some(fd) = dev.fd {
                if devices.iter().any(|o: &DeviceConfig| o.fd == Some(fd)) {
                    return Err(ConfigError::Invalid {
                        flag: "--device",
                        reason: format!("fd={fd} is given for more than one device"),
                    });
                }
            }
            devices.push(dev);
        }
        let platform = match &a.platform {
            Some(s) => parse_platform(s)?,
            None => PlatformConfig::default(),
        };
        if devices.iter().any(|d| d.iommu) && platform.viommu == ViommuKind::Off {
            return Err(ConfigError::Invalid {
                flag: "--device",
                reason: "iommu=on needs a vIOMMU: add --platform viommu=vtd".into(),
            });
        }
        if devices.iter().any(|d| d.pasid) && platform.vtd.pasid_bits == 0 {
            return Err(ConfigError::Invalid {
                flag: "--device",
                reason: "pasid=on needs a vIOMMU with PASIDs: add pasid-bits=N to --platform"
                    .into(),
            });
        }
        let serial = match &a.serial {
            Some(s) => parse_serial(s)?,
            None => SerialConfig::Tty,
        };
        Ok(Self {
            boot,
            cpus,
            memory,
            devices,
            platform,
            serial,
            api_socket: a.api_socket.clone(),
        })
    }
}

impl Cli {
    /// What the command line asks for.
    pub fn action(&self) -> Result<Action, ConfigError> {
        match &self.command {
            Some(Command::IommuInfo { device }) => Ok(Action::IommuInfo {
                device: device.clone(),
            }),
            None => Ok(Action::Run(Box::new(VmConfig::from_args(&self.vm)?))),
        }
    }
}
