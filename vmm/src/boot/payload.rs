//! Raw payloads: small guest programs loaded at a GPA and started in real mode or long mode.
//! Tests use them to exercise the VM core on any KVM, including hosts that cannot boot Linux.

use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::regs::{self, RegsError};
use super::{BootEntry, EntryMode};
use crate::layout::{BOOT_STACK_POINTER, PDE_START};
use crate::memory::GuestRam;

/// Default load address of a real-mode payload.
pub const DEFAULT_REAL_GPA: u64 = 0x1000;
/// Default load address of a long-mode payload.
pub const DEFAULT_LONG_GPA: u64 = 0x10_0000;
/// Real mode reaches only the first MiB.
const REAL_MODE_LIMIT: u64 = 0x10_0000;
/// Long-mode payloads must stay clear of the boot structures (GDT, page tables).
const LONG_MODE_MIN_GPA: u64 = PDE_START + 4 * 0x1000;

/// How a payload starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadMode {
    /// 16-bit real mode.
    Real,
    /// 64-bit long mode with the boot GDT and identity-mapped page tables.
    Long,
}

/// Errors of payload loading.
#[derive(Debug, Error)]
pub enum PayloadError {
    /// The payload file could not be read.
    #[error("Cannot read payload {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The payload does not fit where it was asked to go.
    #[error("Payload of {len} bytes at GPA {gpa:#x} does not fit: {reason}")]
    Placement {
        /// Load address.
        gpa: u64,
        /// Size.
        len: usize,
        /// Why.
        reason: &'static str,
    },
    /// Writing guest memory failed.
    #[error("Cannot write the payload at GPA {gpa:#x}")]
    Write {
        /// Load address.
        gpa: u64,
        /// The memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Boot CPU structures could not be written.
    #[error("Cannot write the long-mode boot structures")]
    Regs(#[from] RegsError),
}

/// Loads `code` at `gpa` and returns the entry state for `mode`.
pub fn load_payload(
    ram: &GuestRam,
    code: &[u8],
    gpa: u64,
    mode: PayloadMode,
) -> Result<BootEntry, PayloadError> {
    let placement = |reason| PayloadError::Placement {
        gpa,
        len: code.len(),
        reason,
    };
    let end = gpa
        .checked_add(code.len() as u64)
        .ok_or(placement("the end wraps around"))?;
    match mode {
        PayloadMode::Real if end > REAL_MODE_LIMIT => {
            return Err(placement("real-mode payloads must end below 1 MiB"))
        }
        PayloadMode::Long if gpa < LONG_MODE_MIN_GPA => {
            return Err(placement(
                "long-mode payloads must start at or above 0xf000 (boot page tables below)",
            ))
        }
        _ => {}
    }
    if end > ram.low_ram_end() {
        return Err(placement("beyond the end of low RAM"));
    }
    ram.memory()
        .write_slice(code, GuestAddress(gpa))
        .map_err(|source| PayloadError::Write { gpa, source })?;
    Ok(match mode {
        PayloadMode::Real => {
            let cs_base = gpa & !0xf;
            BootEntry {
                mode: EntryMode::Real { cs_base },
                rip: gpa - cs_base,
                rsp: 0,
                rsi: 0,
                rbx: 0,
            }
        }
        PayloadMode::Long => {
            regs::write_gdt_idt(ram.memory())?;
            regs::write_identity_page_tables(ram.memory())?;
            BootEntry {
                mode: EntryMode::Long64,
                rip: gpa,
                rsp: BOOT_STACK_POINTER,
                rsi: 0,
                rbx: 0,
            }
        }
    })
}

/// Reads a payload file.
pub fn read_payload(path: &Path) -> Result<Vec<u8>, PayloadError> {
    std::fs::read(path).map_err(|source| PayloadError::Read {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::memory::RamConfig;

    #[test]
    fn placement_rules() {
        let ram = GuestRam::new(RamConfig {
            size: 4 << 20,
            hugepages: false,
        })
        .unwrap();
        let e = load_payload(&ram, &[0xf4], 0x7c05, PayloadMode::Real).unwrap();
        assert_eq!(e.mode, EntryMode::Real { cs_base: 0x7c00 });
        assert_eq!(e.rip, 5);
        let b: u8 = ram.memory().read_obj(GuestAddress(0x7c05)).unwrap();
        assert_eq!(b, 0xf4);
        assert!(load_payload(&ram, &[0; 16], 0xffff8, PayloadMode::Real).is_err());
        assert!(load_payload(&ram, &[0xf4], 0x1000, PayloadMode::Long).is_err());
        assert!(load_payload(&ram, &[0xf4], 4 << 20, PayloadMode::Long).is_err());
        let e = load_payload(&ram, &[0xf4], DEFAULT_LONG_GPA, PayloadMode::Long).unwrap();
        assert_eq!((e.mode, e.rip), (EntryMode::Long64, DEFAULT_LONG_GPA));
    }
}
