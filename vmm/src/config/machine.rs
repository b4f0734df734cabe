//! `--cpus`, `--memory` and `--serial`.

use std::path::PathBuf;

use super::kv::{parse_size, KeyValues};
use super::{ConfigError, OnOffAuto};

/// Default guest RAM.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// `--cpus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot: u8,
    /// `enqcmd=`: offer ENQCMD (CPUID.(EAX=7,ECX=0):ECX[29]) to the guest. `auto` and
    /// `off` keep it hidden on every kernel today; `on` fails at start, saying why
    /// ([`crate::enqcmd::cpu::check_policy`]).
    pub enqcmd: OnOffAuto,
}

impl CpusConfig {
    /// `boot` vCPUs, every option at its default.
    pub fn with_boot(boot: u8) -> Self {
        CpusConfig {
            boot,
            enqcmd: OnOffAuto::Auto,
        }
    }
}

/// `--memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of RAM.
    pub size: u64,
    /// Hugepage backing.
    pub hugepages: bool,
}

/// `--serial`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// stdout, with stdin input when it is a terminal.
    Tty,
    /// Append to a file, at most `max_size` bytes per run (`None`: the default cap,
    /// [`crate::serial::DEFAULT_FILE_CAP`]).
    File {
        /// The file.
        path: PathBuf,
        /// The cap on bytes written by this run.
        max_size: Option<u64>,
    },
    /// No output.
    Off,
}

pub(super) fn parse_cpus(s: &str) -> Result<CpusConfig, ConfigError> {
    const ACCEPTED: &str = "boot=<count>,enqcmd=on|off|auto";
    let kv = KeyValues::parse("--cpus", s, &["boot", "enqcmd"], ACCEPTED)?;
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
    let enqcmd = match kv.get("enqcmd") {
        None | Some("auto") => OnOffAuto::Auto,
        Some("on") => OnOffAuto::On,
        Some("off") => OnOffAuto::Off,
        Some(v) => return Err(kv.invalid("enqcmd", v, "on, off or auto")),
    };
    Ok(CpusConfig { boot, enqcmd })
}

pub(super) fn parse_memory(s: &str) -> Result<MemoryConfig, ConfigError> {
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

pub(super) fn parse_serial(s: &str) -> Result<SerialConfig, ConfigError> {
    const ACCEPTED: &str = "tty, file=<path>[,max_size=<bytes>], off";
    match s {
        "tty" => Ok(SerialConfig::Tty),
        "off" | "null" => Ok(SerialConfig::Off),
        _ => match s.strip_prefix("file=") {
            Some(rest) if !rest.is_empty() => {
                // A path may contain commas; only a trailing `,max_size=` is an option.
                let (path, max_size) = match rest.rsplit_once(",max_size=") {
                    Some((p, v)) => match parse_size(v) {
                        Some(n) if n > 0 && !p.is_empty() => (p, Some(n)),
                        _ => {
                            return Err(ConfigError::InvalidValue {
                                flag: "--serial",
                                key: "max_size".into(),
                                value: v.to_string(),
                                accepted: "a size in bytes above 0 (K, M, G suffixes)",
                            })
                        }
                    },
                    None => (rest, None),
                };
                Ok(SerialConfig::File {
                    path: PathBuf::from(path),
                    max_size,
                })
            }
            _ => Err(ConfigError::InvalidValue {
                flag: "--serial",
                key: "mode".into(),
                value: s.to_string(),
                accepted: ACCEPTED,
            }),
        },
    }
}
