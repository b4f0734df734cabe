//! The CPU side of a shared-work-queue submission, as devices see it.
//!
//! With ENQCMD the CPU puts the submitting thread's PASID (its IA32_PASID MSR, MSR 0xD93:
//! bits 19:0 the PASID, bit 31 valid) into the work descriptor. A portal emulated by the VMM
//! does the same on the guest's behalf: the store to the portal reaches the device on the
//! thread of the vCPU that executed it, so the vCPU loop publishes that vCPU's IA32_PASID in a
//! thread-local before it dispatches MMIO, and the device reads it here.
//!
//! The guest PASID is then translated to the host PASID the IOMMU knows through the VM's
//! PASID translation table (owned by the VMM, behind [`PasidTranslate`]).
//!
//! Owns: the thread-local and the trait. Must not touch: KVM, the table itself.

use std::cell::Cell;

/// IA32_PASID's valid bit.
pub const IA32_PASID_VALID: u64 = 1 << 31;
/// IA32_PASID's PASID field (bits 19:0).
pub const IA32_PASID_PASID_MASK: u64 = 0xf_ffff;

thread_local! {
    static CURRENT_IA32_PASID: Cell<u64> = const { Cell::new(0) };
}

/// Publishes the IA32_PASID of the vCPU that runs on this thread (called by the vCPU loop
/// when the value changes and when the thread starts).
pub fn set_current_ia32_pasid(raw: u64) {
    CURRENT_IA32_PASID.with(|c| c.set(raw));
}

/// The raw IA32_PASID of the vCPU running on this thread (0 on threads that are no vCPU).
pub fn current_ia32_pasid() -> u64 {
    CURRENT_IA32_PASID.with(Cell::get)
}

/// The PASID ENQCMD would put into a descriptor on this thread: `None` when IA32_PASID's
/// valid bit is clear (ENQCMD itself raises #GP then).
pub fn current_pasid() -> Option<u32> {
    let raw = current_ia32_pasid();
    (raw & IA32_PASID_VALID != 0).then_some((raw & IA32_PASID_PASID_MASK) as u32)
}

/// Guest PASID to host PASID, VM-wide (the translation the CPU applies to ENQCMD).
pub trait PasidTranslate: Send + Sync {
    /// The host PASID for `guest`, `None` when the guest PASID has no translation.
    fn host_pasid(&self, guest: u32) -> Option<u32>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_pasid_needs_the_valid_bit() {
        set_current_ia32_pasid(0x1234);
        assert_eq!(current_pasid(), None);
        set_current_ia32_pasid(IA32_PASID_VALID | 0x1234);
        assert_eq!(current_pasid(), Some(0x1234));
        // A thread that is not this one sees its own value.
        let other = std::thread::spawn(current_ia32_pasid)
            .join()
            .unwrap_or(u64::MAX);
        assert_eq!(other, 0);
        set_current_ia32_pasid(0);
    }
}
