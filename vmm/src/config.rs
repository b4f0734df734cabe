//! The command line: clap definitions and their translation into a typed [`VmConfig`].
//!
//! Option syntax follows Cloud Hypervisor where it has an equivalent (`--cpus boot=N`,
//! `--memory size=..`, `--device path=..`, `--platform iommufd=..`, `--serial tty|file=..|off`).
//! Every rejected value names its flag, the key, and what is accepted.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;

use crate::boot::payload::{PayloadMode, DEFAULT_LONG_GPA, DEFAULT_REAL_GPA};

/// Default kernel command line when `--kernel` is given without `--cmdline`.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// Errors of command-line interpretation.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A value was not accepted.
    #[error("{flag}: invalid value '{value}' for {key} (accepted: {accepted})")]
    InvalidValue {
        /// The flag, e.g. `--memory`.
        flag: &'static str,
        /// The key within the flag, e.g. `size`.
        key: String,
        /// The rejected value.
        value: String,
        /// What would be accepted.
        accepted: &'static str,
    },
    /// An unknown key.
    #[error("{flag}: unknown option '{key}' (accepted: {accepted})")]
    UnknownKey {
        /// The flag.
        flag: &'static str,
        /// The key.
        key: String,
        /// The accepted keys.
        accepted: &'static str,
    },
    /// A key given twice.
    #[error("{flag}: option '{key}' given more than once")]
    DuplicateKey {
        /// The flag.
        flag: &'static str,
        /// The key.
        key: String,
    },
    /// Something required is missing or two options conflict.
    #[error("{flag}: {reason}")]
    Invalid {
        /// The flag (or flags).
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The `ioasid-vmm` command line.
#[derive(Debug, Parser)]
#[command(
    name = "ioasid-vmm",
    version,
    about = "A KVM VMM with iommufd-based (\"/dev/ioasid\") device passthrough",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A subcommand instead of running a VM.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// VM options.
    #[command(flatten)]
    pub vm: VmArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Report the IOMMU capabilities of a VFIO device (GET_HW_INFO and related).
    IommuInfo {
        /// The device: /dev/vfio/devices/vfioN, or a sysfs device path.
        #[arg(long)]
        device: PathBuf,
    },
}

/// The VM options as clap sees them (strings); see [`VmConfig`] for the typed form.
#[derive(Debug, Args, Default)]
pub struct VmArgs {
    /// Kernel image: bzImage, or an ELF vmlinux with a PVH note.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Initramfs image.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// vCPUs: boot=N.
    #[arg(long, value_name = "boot=<count>")]
    pub cpus: Option<String>,
    /// Guest RAM: size=SIZE[,hugepages=on|off] (sizes like 512M, 2G).
    #[arg(long, value_name = "size=<size>,hugepages=on|off")]
    pub memory: Option<String>,
    /// A passthrough device (repeatable, or several values after one flag):
    /// path=PATH (sysfs device or VFIO cdev) or fd=FD (a VFIO cdev fd), iommu=on|off,
    /// pasid=on|off, id=ID, pci_segment=N, pci_device_id=SLOT.
    #[arg(long, value_name = "path=..|fd=..,iommu=on|off,pasid=on|off,id=..", num_args = 1..)]
    pub device: Vec<String>,
    /// Platform: iommufd=on|off|auto,iommu_address_width=BITS,viommu=vtd|off.
    #[arg(
        long,
        value_name = "iommufd=on|off|auto,iommu_address_width=<bits>,viommu=vtd|off"
    )]
    pub platform: Option<String>,
    /// Serial console (COM1): tty, file=PATH or off.
    #[arg(long, value_name = "tty|file=<path>|off")]
    pub serial: Option<String>,
    /// REST API socket path.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Test aid: run a raw payload: FILE[,gpa=ADDR,mode=real|long,irqchip=on|off].
    #[arg(
        long,
        hide = true,
        value_name = "FILE[,gpa=..,mode=real|long,irqchip=on|off]"
    )]
    pub payload: Option<String>,
}

/// `--cpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot: u8,
}

/// `--memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of RAM.
    pub size: u64,
    /// Hugepage backing.
    pub hugepages: bool,
}

/// `--device`: the REST API's `DeviceConfig` (one syntax for the flag and `vm.add-device`).
pub use api::DeviceConfig;

/// On, off, or decided by probing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOffAuto {
    /// Required.
    On,
    /// Not used.
    Off,
    /// Used when available.
    Auto,
}

/// `viommu=`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViommuKind {
    /// No vIOMMU.
    Off,
    /// Emulated Intel VT-d.
    Vtd,
}

/// `--platform`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    /// iommufd (cdev) versus legacy VFIO container.
    pub iommufd: OnOffAuto,
    /// vIOMMU guest address width in bits.
    pub iommu_address_width: Option<u8>,
    /// The vIOMMU model.
    pub viommu: ViommuKind,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        Self {
            iommufd: OnOffAuto::Auto,
            iommu_address_width: None,
            viommu: ViommuKind::Off,
        }
    }
}

/// `--serial`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// stdout, with stdin input when it is a terminal.
    Tty,
    /// Append to a file.
    File(PathBuf),
    /// No output.
    Off,
}

/// A Linux boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Command line.
    pub cmdline: String,
    /// Initramfs.
    pub initramfs: Option<PathBuf>,
}

/// A raw payload boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadConfig {
    /// Payload file.
    pub path: PathBuf,
    /// Load address.
    pub gpa: u64,
    /// Entry mode.
    pub mode: PayloadMode,
    /// Create the in-kernel irqchip.
    pub irqchip: bool,
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootConfig {
    /// Linux.
    Linux(LinuxConfig),
    /// A raw payload.
    Payload(PayloadConfig),
}

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

/// `key=value` pairs of one option string, checked against the accepted keys.
struct KeyValues {
    flag: &'static str,
    map: BTreeMap<String, String>,
}

impl KeyValues {
    fn parse(
        flag: &'static str,
        s: &str,
        keys: &[&str],
        accepted: &'static str,
    ) -> Result<Self, ConfigError> {
        let mut map = BTreeMap::new();
        for part in s.split(',') {
            if part.is_empty() {
                return Err(ConfigError::Invalid {
                    flag,
                    reason: format!("empty option in '{s}' (accepted: {accepted})"),
                });
            }
            let (k, v) = part.split_once('=').ok_or_else(|| ConfigError::Invalid {
                flag,
                reason: format!("'{part}' is not key=value (accepted: {accepted})"),
            })?;
            if !keys.contains(&k) {
                return Err(ConfigError::UnknownKey {
                    flag,
                    key: k.to_string(),
                    accepted,
                });
            }
            if map.insert(k.to_string(), v.to_string()).is_some() {
                return Err(ConfigError::DuplicateKey {
                    flag,
                    key: k.to_string(),
                });
            }
        }
        Ok(Self { flag, map })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    fn invalid(&self, key: &str, value: &str, accepted: &'static str) -> ConfigError {
        ConfigError::InvalidValue {
            flag: self.flag,
            key: key.to_string(),
            value: value.to_string(),
            accepted,
        }
    }

    fn on_off(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some("on") => Ok(true),
            Some("off") => Ok(false),
            Some(v) => Err(self.invalid(key, v, "on, off")),
        }
    }

    fn number<T: TryFrom<u64>>(
        &self,
        key: &str,
        accepted: &'static str,
    ) -> Result<Option<T>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => parse_u64(v)
                .and_then(|n| T::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.invalid(key, v, accepted)),
        }
    }
}

/// Parses a decimal or `0x` hexadecimal number.
fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses a size: bytes, or a number with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, shift) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], 10),
        'm' | 'M' => (&s[..s.len() - 1], 20),
        'g' | 'G' => (&s[..s.len() - 1], 30),
        't' | 'T' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    const ACCEPTED: &str = "boot=<count>";
    let kv = KeyValues::parse("--cpus", s, &["boot"], ACCEPTED)?;
    let boot = match kv.get("boot") {
        None => {
            return Err(ConfigError::Invalid {
                flag: "--cpus",
                reason: format!("boot=<count> is required (accepted: {ACCEPTED})"),
            })
        }
        Some(v) => match v.parse::<u8>() {
            Ok(n) if n >= 1 => n,
            _ => return Err(kv.invalid("boot", v, "an integer from 1 to 255")),
        },
    };
    Ok(CpusConfig { boot })
}

fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
    const ACCEPTED: &str = "size=<size>,hugepages=on|off";
    const SIZES: &str =
        "a size like 512M or 2G (K, M, G, T suffixes), a multiple of 4K, at least 2M";
    let kv = KeyValues::parse("--memory", s, &["size", "hugepages"], ACCEPTED)?;
    let size = match kv.get("size") {
        None => DEFAULT_MEMORY,
        Some(v) => match parse_size(v) {
            Some(n) if n >= (2 << 20) && n % 4096 == 0 => n,
            _ => return Err(kv.invalid("size", v, SIZES)),
        },
    };
    let hugepages = kv.on_off("hugepages", false)?;
    if hugepages && size % (2 << 20) != 0 {
        return Err(kv.invalid(
            "size",
            kv.get("size").unwrap_or_default(),
            "with hugepages=on, a multiple of 2M",
        ));
    }
    Ok(MemoryConfig { size, hugepages })
}

/// Parses one `--device` value with [`DeviceConfig::parse`] and checks it as the device
/// manager will ([`crate::device_manager::check_device_config`]); `fd=N` names a file
/// descriptor the VMM inherited.
fn parse_device(s: &str) -> Result<DeviceConfig, ConfigError> {
    let invalid = |e: &dyn std::fmt::Display| ConfigError::Invalid {
        flag: "--device",
        reason: format!("{e} (in '{s}'; syntax: {})", DeviceConfig::SYNTAX),
    };
    let cfg = DeviceConfig::parse(s).map_err(|e| invalid(&e))?;
    crate::device_manager::check_device_config(&cfg, cfg.fd.is_some()).map_err(|e| invalid(&e))?;
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

fn parse_platform(s: &str) -> Result<PlatformConfig, ConfigError> {
    const ACCEPTED: &str = "iommufd=on|off|auto, iommu_address_width=<39-64>, viommu=vtd|off";
    let kv = KeyValues::parse(
        "--platform",
        s,
        &["iommufd", "iommu_address_width", "viommu"],
        ACCEPTED,
    )?;
    let iommufd = match kv.get("iommufd") {
        None | Some("auto") => OnOffAuto::Auto,
        Some("on") => OnOffAuto::On,
        Some("off") => OnOffAuto::Off,
        Some(v) => return Err(kv.invalid("iommufd", v, "on, off, auto")),
    };
    let width: Option<u8> = kv.number("iommu_address_width", "a bit width from 39 to 64")?;
    if let Some(w) = width {
        if !(39..=64).contains(&w) {
            return Err(kv.invalid(
                "iommu_address_width",
                kv.get("iommu_address_width").unwrap_or_default(),
                "a bit width from 39 to 64",
            ));
        }
    }
    let viommu = match kv.get("viommu") {
        None | Some("off") => ViommuKind::Off,
        Some("vtd") => ViommuKind::Vtd,
        Some(v) => return Err(kv.invalid("viommu", v, "vtd, off")),
    };
    Ok(PlatformConfig {
        iommufd,
        iommu_address_width: width,
        viommu,
    })
}

fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    const ACCEPTED: &str = "tty, file=<path>, off";
    match s {
        "tty" => Ok(SerialConfig::Tty),
        "off" | "null" => Ok(SerialConfig::Off),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialConfig::File(PathBuf::from(p))),
            _ => Err(ConfigError::InvalidValue {
                flag: "--serial",
                key: "mode".into(),
                value: s.to_string(),
                accepted: ACCEPTED,
            }),
        },
    }
}

fn parse_payload(s: &str) -> Result<PayloadConfig, ConfigError> {
    const ACCEPTED: &str = "FILE[,gpa=<addr>,mode=real|long,irqchip=on|off]";
    let (file, rest) = match s.split_once(',') {
        Some((f, r)) => (f, Some(r)),
        None => (s, None),
    };
    if file.is_empty() || file.contains('=') {
        return Err(ConfigError::Invalid {
            flag: "--payload",
            reason: format!("the first item must be the payload file (accepted: {ACCEPTED})"),
        });
    }
    let kv = match rest {
        Some(r) => KeyValues::parse("--payload", r, &["gpa", "mode", "irqchip"], ACCEPTED)?,
        None => KeyValues {
            flag: "--payload",
            map: BTreeMap::new(),
        },
    };
    let mode = match kv.get("mode") {
        None | Some("real") => PayloadMode::Real,
        Some("long") => PayloadMode::Long,
        Some(v) => return Err(kv.invalid("mode", v, "real, long")),
    };
    let gpa: Option<u64> = kv.number("gpa", "an address, decimal or 0x-hex")?;
    Ok(PayloadConfig {
        path: PathBuf::from(file),
        gpa: gpa.unwrap_or(match mode {
            PayloadMode::Real => DEFAULT_REAL_GPA,
            PayloadMode::Long => DEFAULT_LONG_GPA,
        }),
        mode,
        irqchip: kv.on_off("irqchip", false)?,
    })
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
            None => CpusConfig { boot: 1 },
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn parse(args: &[&str]) -> Result<Action, ConfigError> {
        let mut v = vec!["ioasid-vmm"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap().action()
    }

    fn vm(args: &[&str]) -> VmConfig {
        match parse(args).unwrap() {
            Action::Run(c) => *c,
            a => panic!("expected run, got {a:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        let e = parse(args).unwrap_err().to_string();
        println!("{args:?} -> {e}");
        e
    }

    /// Asserts that `args` fail with a message naming `flag` and containing `hint`.
    fn rejects(args: &[&str], flag: &str, hint: &str) {
        let e = err(args);
        assert!(e.starts_with(flag), "{e}");
        assert!(e.contains(hint), "{e}");
    }

    #[test]
    fn full_command_line() {
        let c = vm(&[
            "--kernel", "/k", "--cmdline", "console=ttyS0", "--initramfs", "/i",
            "--cpus", "boot=2", "--memory", "size=2G,hugepages=off",
            "--device", "path=/sys/bus/pci/devices/0000:00:03.0,iommu=on,pasid=on,id=edu0,pci_segment=0,pci_device_id=5",
            "--device", "fd=7",
            "--platform", "iommufd=on,iommu_address_width=48,viommu=vtd",
            "--serial", "file=/tmp/s.log", "--api-socket", "/tmp/api.sock",
        ]);
        assert_eq!(
            c.boot,
            BootConfig::Linux(LinuxConfig {
                kernel: "/k".into(),
                cmdline: "console=ttyS0".into(),
                initramfs: Some("/i".into())
            })
        );
        assert_eq!(c.cpus.boot, 2);
        assert_eq!(
            c.memory,
            MemoryConfig {
                size: 2 << 30,
                hugepages: false
            }
        );
        assert_eq!(c.devices.len(), 2);
        let d = &c.devices[0];
        assert!(d.iommu && d.pasid);
        assert_eq!(d.id.as_deref(), Some("edu0"));
        assert_eq!(d.pci_device_id, Some(5));
        assert_eq!(c.devices[1].fd, Some(7));
        assert_eq!(c.platform.iommufd, OnOffAuto::On);
        assert_eq!(c.platform.iommu_address_width, Some(48));
        assert_eq!(c.platform.viommu, ViommuKind::Vtd);
        assert_eq!(c.serial, SerialConfig::File("/tmp/s.log".into()));
        assert_eq!(c.api_socket, Some("/tmp/api.sock".into()));
    }

    #[test]
    fn defaults() {
        let c = vm(&["--kernel", "/k"]);
        assert_eq!(c.cpus.boot, 1);
        assert_eq!(c.memory.size, DEFAULT_MEMORY);
        assert_eq!(c.serial, SerialConfig::Tty);
        assert_eq!(c.platform, PlatformConfig::default());
        match c.boot {
            BootConfig::Linux(l) => assert_eq!(l.cmdline, DEFAULT_CMDLINE),
            b => panic!("{b:?}"),
        }
    }

    #[test]
    fn several_devices_after_one_flag() {
        let c = vm(&[
            "--kernel",
            "/k",
            "--device",
            "path=/sys/bus/pci/devices/0000:00:03.0",
            "path=/sys/bus/pci/devices/0000:00:04.0",
        ]);
        assert_eq!(c.devices.len(), 2);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("-1G"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn bad_cpus() {
        rejects(
            &["--kernel", "/k", "--cpus", "boot=0"],
            "--cpus",
            "1 to 255",
        );
        rejects(
            &["--kernel", "/k", "--cpus", "boot=x"],
            "--cpus",
            "1 to 255",
        );
        rejects(
            &["--kernel", "/k", "--cpus", "boot=256"],
            "--cpus",
            "1 to 255",
        );
        rejects(&["--kernel", "/k", "--cpus", "4"], "--cpus", "boot=<count>");
        rejects(
            &["--kernel", "/k", "--cpus", "max=4"],
            "--cpus",
            "boot=<count>",
        );
        rejects(
            &["--kernel", "/k", "--cpus", "boot=1,boot=2"],
            "--cpus",
            "more than once",
        );
    }

    #[test]
    fn bad_memory() {
        rejects(
            &["--kernel", "/k", "--memory", "size=abc"],
            "--memory",
            "512M",
        );
        rejects(
            &["--kernel", "/k", "--memory", "size=1M"],
            "--memory",
            "at least 2M",
        );
        rejects(
            &["--kernel", "/k", "--memory", "size=4097"],
            "--memory",
            "multiple of 4K",
        );
        rejects(
            &["--kernel", "/k", "--memory", "size=1G,hugepages=yes"],
            "--memory",
            "on, off",
        );
        rejects(
            &["--kernel", "/k", "--memory", "size=3M,hugepages=on"],
            "--memory",
            "2M",
        );
        rejects(
            &["--kernel", "/k", "--memory", "sz=1G"],
            "--memory",
            "size=<size>",
        );
        rejects(
            &["--kernel", "/k", "--memory", "1G"],
            "--memory",
            "key=value",
        );
    }

    const EDU: &str = "/sys/bus/pci/devices/0000:00:03.0";

    #[test]
    fn bad_device() {
        let dev = |v: &str| {
            vec![
                "--kernel".to_string(),
                "/k".into(),
                "--device".into(),
                v.into(),
            ]
        };
        let cases: Vec<(String, &str)> = vec![
            ("iommu=on".to_string(), "needs `path`"),
            (format!("path={EDU},fd=3"), "not both"),
            ("fd=-1".to_string(), "file descriptor"),
            ("fd=1".to_string(), "stdin, stdout or stderr"),
            (format!("path={EDU},iommu=maybe"), "on or off"),
            (format!("path={EDU},iommu=on,pasid=1"), "on or off"),
            (format!("path={EDU},pasid=on"), "needs iommu=on"),
            (format!("path={EDU},pci_device_id=32"), "0-31"),
            (format!("path={EDU},pci_segment=70000"), "0-65535"),
            (format!("path={EDU},id="), "empty"),
            (format!("path={EDU},id=a b"), "only letters"),
            (format!("path={EDU},colour=red"), "pci_device_id"),
            ("path=,id=x".to_string(), "sysfs device path"),
            ("path=/etc/passwd".to_string(), "not allowed"),
            ("path=/dev/vfio/devices/vfiox".to_string(), "not allowed"),
            (
                format!("path={EDU},x_exclude_mmap_bars=[1]"),
                "not supported",
            ),
        ];
        for (value, hint) in &cases {
            let args = dev(value);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            rejects(&args, "--device", hint);
            // The rejected value is quoted, so the user sees which --device was wrong.
            assert!(err(&args).contains(value), "{value}");
        }
        rejects(
            &[
                "--kernel",
                "/k",
                "--device",
                &format!("path={EDU},id=d"),
                "--device",
                "path=/sys/bus/pci/devices/0000:00:04.0,id=d",
            ],
            "--device",
            "more than one device",
        );
        rejects(
            &["--kernel", "/k", "--device", "fd=5", "--device", "fd=5"],
            "--device",
            "fd=5 is given for more than one device",
        );
        rejects(
            &[
                "--kernel",
                "/k",
                "--device",
                &format!("path={EDU},iommu=on"),
            ],
            "--device",
            "viommu=vtd",
        );
    }

    #[test]
    fn device_accepts_cdev_paths_and_mdevs() {
        let c = vm(&[
            "--kernel",
            "/k",
            "--device",
            "path=/dev/vfio/devices/vfio3,id=c",
            "path=/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
        ]);
        assert_eq!(
            c.devices[0].path.as_deref(),
            Some(std::path::Path::new("/dev/vfio/devices/vfio3"))
        );
        assert_eq!(c.devices[1].id, None);
    }

    #[test]
    fn bad_platform() {
        rejects(
            &["--kernel", "/k", "--platform", "iommufd=yes"],
            "--platform",
            "on, off, auto",
        );
        rejects(
            &["--kernel", "/k", "--platform", "iommu_address_width=20"],
            "--platform",
            "39 to 64",
        );
        rejects(
            &["--kernel", "/k", "--platform", "iommu_address_width=x"],
            "--platform",
            "39 to 64",
        );
        rejects(
            &["--kernel", "/k", "--platform", "viommu=smmu"],
            "--platform",
            "vtd, off",
        );
        rejects(
            &["--kernel", "/k", "--platform", "num_pci_segments=2"],
            "--platform",
            "iommufd=on|off|auto",
        );
    }

    #[test]
    fn serial_modes() {
        assert_eq!(
            vm(&["--kernel", "/k", "--serial", "off"]).serial,
            SerialConfig::Off
        );
        assert_eq!(
            vm(&["--kernel", "/k", "--serial", "tty"]).serial,
            SerialConfig::Tty
        );
        rejects(
            &["--kernel", "/k", "--serial", "pty"],
            "--serial",
            "tty, file=<path>, off",
        );
        rejects(
            &["--kernel", "/k", "--serial", "file="],
            "--serial",
            "tty, file=<path>, off",
        );
    }

    #[test]
    fn boot_choice() {
        rejects(&[], "--kernel", "nothing to boot");
        rejects(
            &["--kernel", "/k", "--payload", "/p"],
            "--kernel/--payload",
            "not both",
        );
        rejects(
            &["--payload", "/p", "--initramfs", "/i"],
            "--payload",
            "only to --kernel",
        );
        let c = vm(&["--payload", "/p,mode=long,gpa=0x200000"]);
        assert_eq!(
            c.boot,
            BootConfig::Payload(PayloadConfig {
                path: "/p".into(),
                gpa: 0x20_0000,
                mode: PayloadMode::Long,
                irqchip: false
            })
        );
        let c = vm(&["--payload", "/p"]);
        match c.boot {
            BootConfig::Payload(p) => {
                assert_eq!((p.gpa, p.mode), (DEFAULT_REAL_GPA, PayloadMode::Real))
            }
            b => panic!("{b:?}"),
        }
        rejects(
            &["--payload", "/p,mode=protected"],
            "--payload",
            "real, long",
        );
        rejects(&["--payload", "/p,gpa=zz"], "--payload", "0x-hex");
        rejects(&["--payload", "gpa=1"], "--payload", "payload file");
        rejects(
            &["--payload", "/p", "--cpus", "boot=2"],
            "--cpus",
            "one vCPU",
        );
    }

    #[test]
    fn iommu_info_subcommand() {
        assert_eq!(
            parse(&["iommu-info", "--device", "/dev/vfio/devices/vfio0"]).unwrap(),
            Action::IommuInfo {
                device: "/dev/vfio/devices/vfio0".into()
            }
        );
        assert!(Cli::try_parse_from(["ioasid-vmm", "iommu-info"]).is_err());
    }
}
