//! What the VM boots: `--kernel`/`--cmdline`/`--initramfs`, or the test flag `--payload`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::boot::payload::{PayloadMode, DEFAULT_LONG_GPA, DEFAULT_REAL_GPA};

use super::kv::KeyValues;
use super::ConfigError;

/// Default kernel command line when `--kernel` is given without `--cmdline`.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

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

pub(super) fn parse_payload(s: &str) -> Result<PayloadConfig, ConfigError> {
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
