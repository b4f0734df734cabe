//! Getting the guest started: Linux (bzImage, PVH ELF) and raw payloads, and the initial CPU
//! state each needs.

pub mod linux;
pub mod payload;
pub mod regs;

/// The CPU mode a vCPU starts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 16-bit real mode, CS based at `cs_base`.
    Real {
        /// CS base (a multiple of 16 below 1 MiB).
        cs_base: u64,
    },
    /// 32-bit protected mode with paging off (the PVH entry).
    Protected32,
    /// 64-bit long mode on the boot page tables.
    Long64,
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// CPU mode.
    pub mode: EntryMode,
    /// Instruction pointer (an offset from CS base in real mode).
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// RSI (Linux 64-bit boot protocol: the zero page address).
    pub rsi: u64,
    /// RBX (PVH: the `hvm_start_info` address).
    pub rbx: u64,
}
