//! The "SVA copy engine": an emulated PCIe function with PASID, ATS and PRI that copies
//! memory by descriptor, DMAing through the vIOMMU in the context of (device, PASID). It is
//! the device a guest's own SVA code (`iommu_sva_bind_device`, the VT-d PRQ and iopf path)
//! drives end to end.
//!
//! Modules, one job each:
//! - [`abi`]: the guest-visible formats (registers, descriptor, completion) and descriptor
//!   validation;
//! - [`caps`]: the config space (PCI Express, MSI-X, ATS, PASID, PRI) and its decoded state;
//! - [`dma`]: how the engine's DMA leaves it ([`DeviceDma`], over the vIOMMU's
//!   [`DmaView`](crate::viommu::DmaView) by [`ViewDma`]);
//! - [`worker`]: the worker thread that runs descriptors;
//! - [`engine`]: [`SvaEngine`], the [`PciDevice`](crate::pci::PciDevice).
//!
//! # API for the VMM
//! [`SvaEngine::new`]`(dma, irq, opts)` with the `DmaView` the vIOMMU bridge returns for the
//! device's BDF (its `read_with`/`write_with` must honour [`ioasid::DmaRequest`]: `pri` makes
//! fixable faults page requests, `privileged` supervisor requests), the device's
//! [`InterruptSink`](crate::pci::InterruptSink), and [`SvaOptions`]. Put it on the PCI bus;
//! [`SvaEngine::handle`] gives an [`SvaHandle`] for [`SvaHandle::counters`] (`vm.counters`)
//! and [`SvaHandle::invalidate_device_tlb`] (call it for each device-TLB invalidation the
//! vIOMMU's QI decodes for this BDF). [`PciDevice::removed`](crate::pci::PciDevice::removed)
//! (and drop) stop and join the worker.
//!
//! # Threads
//! Config and BAR accesses run on the vCPU thread and only take short locks; a doorbell
//! (RING_TAIL write) wakes the worker thread, which does all DMA, including the wait for a
//! page response (bounded by [`SvaOptions::page_request_timeout`], checked for RESET every
//! [`worker::WAIT_SLICE`]), so the vCPU that services the guest's PRQ is never blocked.
//!
//! # ATS
//! The engine keeps no device TLB (no translation cache of its own: each access is
//! translated by the vIOMMU path when it is made, and an ATS translation request is never
//! issued), so a device-TLB invalidation has nothing to drop and is complete at once.
//!
//! # Guest-visible ABI (fixed; the L3 driver is written against the same text)
//!
//! PCI function: vendor 0x1234, device 0x5a5a, class 0x088000 (other system peripheral),
//! revision 1. PCIe endpoint (a PCI Express capability, type "RC integrated endpoint" 0x9 so
//! Linux's ATS/PRI checks accept an endpoint on the root bus; the DMAR needs a SATC entry for
//! it if Linux asks), with extended capabilities at 0x100+: ATS (ID 0x0f), PASID (ID 0x1b:
//! max PASID width 20, Execute and Privileged Mode supported), PRI (ID 0x13: outstanding
//! page request capacity 32). MSI-X with 2 vectors (vector 0: completion, vector 1: error),
//! table and PBA in BAR0 at 0x800 and 0xC00.
//!
//! BAR0: 4 KiB, 64-bit non-prefetchable memory. Registers (little endian; 32-bit unless
//! noted):
//!
//! | off  | name       | access | meaning |
//! |------|------------|--------|---------|
//! | 0x00 | ID         | RO     | 0x5356_4131 ("SVA1") |
//! | 0x04 | STATUS     | RO     | bit0 ENABLED, bit1 BUSY, bit2 ERROR (a descriptor ended with an error since the last clear) |
//! | 0x08 | CTRL       | RW     | bit0 ENABLE, bit1 RESET (self-clearing: stops, drains, clears ring state), bit2 CLEAR_ERROR (self-clearing) |
//! | 0x10 | RING_BASE  | RW 64  | IOVA of the descriptor ring, read WITHOUT a PASID (the driver's DMA API address); 64-byte aligned |
//! | 0x18 | RING_SIZE  | RW     | number of descriptors, a power of two from 2 to 4096 (others: STATUS.ERROR, ring disabled) |
//! | 0x1C | RING_HEAD  | RO     | index of the next descriptor the device will process |
//! | 0x20 | RING_TAIL  | RW     | doorbell: index one past the last valid descriptor (mod RING_SIZE) |
//! | 0x24 | COMPLETED  | RO     | descriptors completed since enable (wrapping counter) |
//! | 0x28 | PRQ_STATS  | RO     | page requests sent since enable |
//!
//! Descriptor, 64 bytes:
//!
//! | off | size | field |
//! |-----|------|-------|
//! | 0   | 4    | pasid: bits 19:0 the PASID, bit 31 PASID_VALID (without it, src/dst/completion use requests without PASID) |
//! | 4   | 4    | flags: bit0 INTERRUPT (MSI-X vector 0 on completion), bit1 PRIVILEGED (supervisor request), bit2 NO_PRI (do not send page requests; a fault ends the descriptor) |
//! | 8   | 8    | src address (in the descriptor's address space) |
//! | 16  | 8    | dst address |
//! | 24  | 8    | length in bytes (0 < len <= 16 MiB) |
//! | 32  | 8    | completion record address (in the descriptor's address space), 16-byte aligned |
//! | 40  | 24   | reserved, zero |
//!
//! Completion record, 16 bytes, written by the device when the descriptor ends:
//!
//! | off | size | field |
//! |-----|------|-------|
//! | 0   | 4    | status: 1 SUCCESS, 2 PAGE_FAULT (page response Invalid, or a fault without PRI), 3 TIMEOUT (no page response in time), 4 BAD_DESCRIPTOR (reserved bits, bad length, bad alignment), 5 BAD_PASID (PASID not enabled in the PASID capability, or wider than its enabled width) |
//! | 4   | 4    | reserved |
//! | 8   | 8    | bytes copied |
//!
//! The driver zeroes the record before submitting and polls status != 0. If the completion
//! record itself cannot be written, STATUS.ERROR is set and MSI-X vector 1 fires.
//!
//! ## How this model reads the points the ABI leaves open
//! - "Enabled width" is the Max PASID Width the PASID capability advertises
//!   ([`SvaOptions::max_pasid_bits`], 20 by default; the PCIe PASID control register has no
//!   width field): a PASID `>= 1 << width` is BAD_PASID.
//! - PRIVILEGED with PASID_VALID while the PASID capability's Privileged Mode Enable is
//!   clear is BAD_PASID; PRIVILEGED without PASID_VALID is BAD_DESCRIPTOR (the privileged
//!   bit travels in the PASID prefix).
//! - A BAD_PASID descriptor's completion record is written with requests WITHOUT PASID (its
//!   PASID cannot be used); every other record goes to the descriptor's address space. A
//!   misaligned completion address is still written (status BAD_DESCRIPTOR).
//! - Page requests are sent only when the PRI capability is enabled with an Outstanding
//!   Page Request Allocation >= 1 and the descriptor lacks NO_PRI; the engine keeps at most
//!   one outstanding. A page response Success is retried at most
//!   [`SvaOptions::max_retries_per_page`] times per access, then PAGE_FAULT. The completion
//!   record write follows the same PRI protocol as the copy.
//! - PRI Enable is read at every access: once the guest clears it, an outstanding request
//!   is still waited for, but no new one is sent (the retry faults: PAGE_FAULT). PRI Stopped
//!   reads as the inverse of PRI Enable.
//! - No DMA while the command register's Bus Master Enable is clear; clearing it, or PASID
//!   Enable under a PASID descriptor, abandons the descriptor in flight (as disable does).
//! - RING_BASE and RING_SIZE writes are ignored while ENABLED. ENABLE with a bad ring size
//!   or a RING_BASE not 64-byte aligned sets STATUS.ERROR and leaves the engine disabled.
//!   ENABLE resets COMPLETED and PRQ_STATS and keeps HEAD/TAIL (reduced mod RING_SIZE).
//! - RESET (which wins over ENABLE in the same write) disables, zeroes HEAD, TAIL,
//!   COMPLETED, PRQ_STATS and ERROR and keeps RING_BASE/RING_SIZE. The descriptor in flight
//!   is abandoned without a completion record (within one chunk or page-request wait slice);
//!   STATUS.BUSY reads 1 until then: "drains" = poll BUSY == 0. Clearing ENABLE abandons
//!   the descriptor in flight the same way but keeps HEAD, so re-enabling runs it again.
//! - A descriptor fetch that fails sets STATUS.ERROR, disables the engine and fires vector 1.
//! - A descriptor ending with status != SUCCESS sets STATUS.ERROR; vector 0 fires for it
//!   when it has INTERRUPT (vector 1 only when the record could not be written).

pub mod abi;
pub mod caps;
pub mod dma;
pub mod engine;
pub mod worker;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod soft_tests;

use std::time::Duration;

use thiserror::Error;

pub use abi::CompletionStatus;
pub use caps::CapState;
pub use dma::{AccessError, DeviceDma, PendingPage, ViewDma};
pub use engine::{SvaEngine, SvaHandle};
pub use worker::SvaCounters;

/// Construction options of an [`SvaEngine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SvaOptions {
    /// Max PASID Width of the PASID capability, 1..=20 (the ABI: 20).
    pub max_pasid_bits: u8,
    /// Outstanding Page Request Capacity of the PRI capability, >= 1 (the ABI: 32).
    pub pri_capacity: u32,
    /// How long a DMA waits for a page response before the descriptor ends with TIMEOUT
    /// (up to [`SvaOptions::MAX_TIMEOUT`]).
    pub page_request_timeout: Duration,
    /// Page responses Success one access may get before it ends with PAGE_FAULT, 1..=1024.
    pub max_retries_per_page: u32,
}

impl SvaOptions {
    /// The longest page-request timeout accepted.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

    /// Names an impossible option.
    pub fn validate(&self) -> Result<(), SvaError> {
        let bad = |reason: &str| {
            Err(SvaError::InvalidOptions {
                reason: reason.to_string(),
            })
        };
        if !(1..=20).contains(&self.max_pasid_bits) {
            return bad("max_pasid_bits must be 1..=20");
        }
        if self.pri_capacity == 0 {
            return bad("pri_capacity must be at least 1");
        }
        if self.page_request_timeout.is_zero() || self.page_request_timeout > Self::MAX_TIMEOUT {
            return bad("page_request_timeout must be in (0, 600 s]");
        }
        if !(1..=1024).contains(&self.max_retries_per_page) {
            return bad("max_retries_per_page must be 1..=1024");
        }
        Ok(())
    }
}

impl Default for SvaOptions {
    /// The ABI's values; a 30 s page-request timeout (longer than a VMM's own PRQ timeout,
    /// and enough for a nested TCG guest to fault a page in).
    fn default() -> Self {
        Self {
            max_pasid_bits: 20,
            pri_capacity: 32,
            page_request_timeout: Duration::from_secs(30),
            max_retries_per_page: 8,
        }
    }
}

/// Why an engine could not be built.
#[derive(Debug, Error)]
pub enum SvaError {
    /// An option is out of range.
    #[error("SVA engine options: {reason}")]
    InvalidOptions {
        /// Which and why.
        reason: String,
    },
    /// The config space could not be laid out.
    #[error("SVA engine config space")]
    Config(#[from] crate::pci::config::ConfigError),
    /// The worker thread could not be started.
    #[error("SVA engine: cannot start the worker thread")]
    Spawn {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
