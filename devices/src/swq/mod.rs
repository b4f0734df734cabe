//! A shared-work-queue device: a DSA-like SWQ portal for guests without ENQCMD.
//!
//! With ENQCMD, a process stores a 64-byte descriptor to a device's portal and the CPU puts
//! the process's PASID (its IA32_PASID) into the descriptor, translated to the host PASID
//! the IOMMU knows; the device answers "accepted" or "retry" (ZF). No CPU here has ENQCMD
//! and upstream KVM exposes none, so this device does the CPU's part itself: the guest
//! stores the descriptor to a trapped portal page with ordinary MOV stores, the store of
//! the last qword submits on the vCPU's thread, and the device fills the PASID from that
//! vCPU's IA32_PASID ([`crate::cpu_pasid::current_pasid`]) and translates it through the
//! VM's table ([`crate::cpu_pasid::PasidTranslate`]). The copy then runs on a worker thread
//! through the vIOMMU in that host PASID's context.
//!
//! Modules, one job each:
//! - [`abi`]: identity, BARs, registers and status codes (the descriptor and completion
//!   record are the SVA copy engine's, [`crate::sva::abi`]);
//! - [`portal`]: the per-vCPU assembly of portal stores into descriptors;
//! - [`worker`]: the queue and the worker thread that runs descriptors;
//! - [`device`]: [`SwqDevice`], the [`PciDevice`](crate::pci::PciDevice).
//!
//! # API for the VMM
//! [`SwqDevice::new`]`(dma, irq, translate)`: `dma` is a
//! [`DeviceDma`](crate::sva::DeviceDma) addressed by HOST PASID (the VMM's implementation
//! issues soft-backend DMA for the device's `ioasid` id with the host PASID as given, so
//! the host PASID from the table is exactly the context the DMA uses: if the table and the
//! vIOMMU bridge disagree, the host PASID has no context for this device and the copy
//! faults, PAGE_FAULT, instead of landing in another address space); `irq` the device's
//! interrupt sink; `translate` the VM's guest-to-host PASID table. [`SwqDevice::handle`]
//! gives counters. [`PciDevice::removed`](crate::pci::PciDevice::removed) (and drop) stop
//! and join the worker.
//!
//! # Threads
//! Portal stores, config and BAR accesses run on the vCPU thread and take short locks
//! only; a submission pushes onto the queue and wakes the worker, which does all DMA. A
//! vCPU never waits for a copy.
//!
//! # Guest-visible ABI
//!
//! PCI function: vendor 0x1234, device **0x5a5b** (a test ID), class 0x088000, revision 1.
//! Config space as the SVA copy engine's (PCI Express RC integrated endpoint; ATS, PASID
//! with Max PASID Width 20, PRI; MSI-X with 2 vectors, table at BAR0 + 0x800, PBA at BAR0 +
//! 0xC00). The device never sends page requests or ATS translation requests: a fault ends
//! the descriptor with PAGE_FAULT.
//!
//! BAR0: 4 KiB, 64-bit, registers (32-bit, little endian, read-only unless noted):
//!
//! | off  | name      | meaning |
//! |------|-----------|---------|
//! | 0x00 | ID        | 0x5357_5131 ("SWQ1") |
//! | 0x04 | STATUS    | bit0 ENABLED, bit1 BUSY, bit2 ERROR (a descriptor ended with an error, or its record could not be written, since the last clear) |
//! | 0x08 | CTRL (RW) | bit0 ENABLE, bit1 RESET (self-clearing: disable, drop the queue, zero the counters and ERROR, forget every vCPU's status), bit2 CLEAR_ERROR (self-clearing) |
//! | 0x0C | WQ_SIZE   | 16: descriptors queued or in flight at most |
//! | 0x10 | OCCUPANCY | descriptors queued or in flight |
//! | 0x14 | SUBMITTED | descriptors accepted since enable |
//! | 0x18 | COMPLETED | descriptors ended since enable |
//! | 0x1C | RETRIES   | submissions answered RETRY |
//! | 0x20 | REJECTED  | submissions refused with NO_PASID, UNTRANSLATED or DISABLED |
//! | 0x24 | MALFORMED | bad portal stores and incomplete descriptors |
//!
//! Clearing ENABLE drops the queued descriptors and abandons the one in flight (no
//! completion record), as RESET does, but keeps the counters.
//!
//! BAR2: 4 KiB, 64-bit, the portal page. The descriptor window is bytes 0x00..0x40:
//! - stores: 8 bytes at an 8-byte-aligned offset or 4 bytes at a 4-byte-aligned offset
//!   inside the window, staged per vCPU (each vCPU assembles its own descriptor, so two
//!   vCPUs submitting at once do not mix). The store that covers byte 0x3F (the qword at
//!   0x38 or the dword at 0x3C) submits the staged 64 bytes. Any other store (other size,
//!   misaligned, or at 0x40 and above), or a submitting store before all 64 bytes were
//!   stored since the vCPU's last submission, drops the vCPU's staged bytes: status
//!   MALFORMED, MALFORMED counts it, nothing is queued. Store in ascending order (or at
//!   least the last qword last); a descending `rep movsq` is MALFORMED.
//! - reads at offset 0 (1 to 8 bytes) return the reading vCPU's submit status, the result
//!   of its last submission (ENQCMD's ZF): 0 IDLE (none since reset), 1 ACCEPTED, 2 RETRY
//!   (the queue held WQ_SIZE descriptors: nothing queued, submit again), 3 NO_PASID (the
//!   vCPU's IA32_PASID has no valid bit, where ENQCMD raises #GP), 4 UNTRANSLATED (the
//!   guest PASID has no host translation), 5 DISABLED (queue disabled or Bus Master Enable
//!   clear), 6 MALFORMED. Other portal reads return 0. NO_PASID, UNTRANSLATED and DISABLED
//!   do no DMA at all (no completion record: there is no address space to write it in).
//!
//! Submission (the ENQCMD rule): the descriptor's first dword (the PASID word) is replaced
//! by the host PASID with bit 31 set, whatever the guest stored there; the rest is the SVA
//! engine's descriptor (flags, src, dst, len, completion address, 24 reserved bytes),
//! validated on the worker as the SVA engine validates it (reserved bits, length, 16-byte
//! completion alignment, PASID Enable and width in the PASID capability: BAD_DESCRIPTOR or
//! BAD_PASID), plus: PRIVILEGED is BAD_DESCRIPTOR (ENQCMD submits user requests). src, dst
//! and the completion record are in the host PASID's address space; the 16-byte record
//! (status, bytes copied) is written when the descriptor ends; INTERRUPT raises MSI-X
//! vector 0 then, a record that cannot be written sets ERROR and raises vector 1. No DMA
//! while Bus Master Enable is clear.

pub mod abi;
pub mod device;
pub mod portal;
pub mod worker;

#[cfg(test)]
mod tests;

use thiserror::Error;

pub use abi::SubmitStatus;
pub use device::{SwqDevice, SwqHandle};
pub use worker::SwqCounters;

/// Why a device could not be built.
#[derive(Debug, Error)]
pub enum SwqError {
    /// The config space could not be laid out.
    #[error("SWQ device config space")]
    Config(#[from] crate::pci::config::ConfigError),
    /// The worker thread could not be started.
    #[error("SWQ device: cannot start the worker thread")]
    Spawn {
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}
