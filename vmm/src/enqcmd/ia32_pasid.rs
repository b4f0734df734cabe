//! IA32_PASID (MSR 0xD93) virtualization: KVM's MSR filter denies the guest's RDMSR and
//! WRMSR of it, `KVM_CAP_X86_USER_SPACE_MSR` (exit reason `FILTER`) turns the denial into a
//! `KVM_EXIT_X86_RDMSR/WRMSR` exit, and the vCPU loop answers from the per-vCPU value kept
//! here.
//!
//! The MSR (SDM vol. 4, "IA32_PASID"; ANCHORS §1.4): bits 19:0 the PASID, bit 31 valid, the
//! others reserved; a WRMSR that sets a reserved bit raises #GP. The value of each vCPU is
//! published to its own thread ([`devices::cpu_pasid::set_current_ia32_pasid`]) when the
//! thread starts and after every accepted write, so that a shared-work-queue portal store
//! executed on that vCPU finds it.
//!
//! **The VM's PASID space** (what a write is checked against): the guest PASIDs are the ones
//! the VM's vIOMMU can name, `1 ..= 2^pasid_bits - 1`, `pasid_bits` being the width the
//! vIOMMU advertises (`--platform ...,pasid-bits=N`, ECAP.PSS + 1; 0 without a vIOMMU or
//! without PASIDs). A write with the valid bit set is refused (#GP) when
//! - its PASID does not fit `pasid_bits`: the vIOMMU cannot give it a translation, so no
//!   descriptor carrying it could ever reach memory; hardware would accept any 20-bit value
//!   and fail at ENQCMD time instead — failing at the WRMSR is stricter and says so earlier;
//! - its PASID is 0: PASID 0 is the RID_PASID of this vIOMMU (the requests without PASID,
//!   Linux's choice), never a process address space.
//!
//! With the valid bit clear the PASID field is kept as written (ENQCMD would #GP on it; Linux
//! writes 0 there). A VM created without a platform defaults to the architectural 20 bits.
//!
//! Owns: the per-vCPU values, the write check, the MSR filter of the VM. Must not touch: the
//! PASID translation (the vIOMMU bridge and [`super::VmPasidTable`] own it).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use devices::cpu_pasid::{set_current_ia32_pasid, IA32_PASID_PASID_MASK, IA32_PASID_VALID};
use kvm_bindings::{kvm_enable_cap, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, ReadMsrExit, VmFd,
    WriteMsrExit,
};
use thiserror::Error;

use crate::kvm_caps::has_cap;

/// The IA32_PASID MSR.
pub const MSR_IA32_PASID: u32 = 0xd93;
/// The bits of IA32_PASID a WRMSR may set (PASID 19:0 and valid 31); the rest are reserved.
pub const IA32_PASID_WRITABLE: u64 = IA32_PASID_VALID | IA32_PASID_PASID_MASK;
/// IA32_PASID's PASID width (the architectural guest PASID width by default).
pub const IA32_PASID_BITS: u8 = 20;

/// Why a guest WRMSR of IA32_PASID gets #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Ia32PasidReject {
    /// A reserved bit (anything but 19:0 and 31) is set; hardware raises #GP too.
    #[error("IA32_PASID write {value:#x} sets reserved bits {:#x}", value & !IA32_PASID_WRITABLE)]
    Reserved {
        /// The value written.
        value: u64,
    },
    /// The PASID does not fit the vIOMMU's PASID width.
    #[error(
        "IA32_PASID write {value:#x}: PASID {pasid:#x} is outside the VM's {bits}-bit PASID space"
    )]
    OutOfRange {
        /// The value written.
        value: u64,
        /// Its PASID.
        pasid: u32,
        /// The VM's guest PASID width.
        bits: u8,
    },
    /// Valid with PASID 0 (the vIOMMU's RID_PASID).
    #[error("IA32_PASID write {value:#x}: PASID 0 is the requests-without-PASID context")]
    Pasid0 {
        /// The value written.
        value: u64,
    },
    /// The vCPU index is not one of the VM's.
    #[error("IA32_PASID write {value:#x} from unknown vCPU {vcpu}")]
    NoVcpu {
        /// The value written.
        value: u64,
        /// The vCPU index.
        vcpu: u8,
    },
}

/// Checks a guest's IA32_PASID write against the VM's PASID space of `pasid_bits`.
pub fn check_write(value: u64, pasid_bits: u8) -> Result<(), Ia32PasidReject> {
    if value & !IA32_PASID_WRITABLE != 0 {
        return Err(Ia32PasidReject::Reserved { value });
    }
    if value & IA32_PASID_VALID == 0 {
        return Ok(());
    }
    let pasid = (value & IA32_PASID_PASID_MASK) as u32;
    if pasid == 0 {
        return Err(Ia32PasidReject::Pasid0 { value });
    }
    let bits = pasid_bits.min(IA32_PASID_BITS);
    if pasid >> bits != 0 {
        return Err(Ia32PasidReject::OutOfRange { value, pasid, bits });
    }
    Ok(())
}

/// Counters of the IA32_PASID exits, for introspection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ia32PasidCounters {
    /// RDMSRs answered.
    pub reads: u64,
    /// WRMSRs accepted.
    pub writes: u64,
    /// WRMSRs refused with #GP.
    pub rejected: u64,
    /// Accesses to another MSR that reached the filter exit (refused with #GP).
    pub other_msrs: u64,
}

/// The VM's IA32_PASID state: one value per vCPU (reset value 0) and the PASID width.
#[derive(Debug)]
pub struct Ia32Pasid {
    values: Vec<AtomicU64>,
    pasid_bits: AtomicU8,
    reads: AtomicU64,
    writes: AtomicU64,
    rejected: AtomicU64,
    other_msrs: AtomicU64,
}

impl Ia32Pasid {
    /// The state of a VM with `vcpus` vCPUs, every value 0, the PASID width 20 bits.
    pub fn new(vcpus: u8) -> Self {
        Ia32Pasid {
            values: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            pasid_bits: AtomicU8::new(IA32_PASID_BITS),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            other_msrs: AtomicU64::new(0),
        }
    }

    /// Sets the VM's guest PASID width (the vIOMMU's `pasid-bits`; capped at 20).
    pub fn set_pasid_bits(&self, bits: u8) {
        self.pasid_bits
            .store(bits.min(IA32_PASID_BITS), Ordering::Relaxed);
    }

    /// The VM's guest PASID width.
    pub fn pasid_bits(&self) -> u8 {
        self.pasid_bits.load(Ordering::Relaxed)
    }

    /// vCPU `vcpu`'s IA32_PASID (`None`: no such vCPU).
    pub fn value(&self, vcpu: u8) -> Option<u64> {
        self.values
            .get(usize::from(vcpu))
            .map(|v| v.load(Ordering::Acquire))
    }

    /// Every vCPU's IA32_PASID, by vCPU index.
    pub fn values(&self) -> Vec<u64> {
        self.values
            .iter()
            .map(|v| v.load(Ordering::Acquire))
            .collect()
    }

    /// The exit counters.
    pub fn counters(&self) -> Ia32PasidCounters {
        Ia32PasidCounters {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            other_msrs: self.other_msrs.load(Ordering::Relaxed),
        }
    }

    /// Publishes vCPU `vcpu`'s value to the calling thread (the vCPU thread, at its start).
    pub fn publish(&self, vcpu: u8) {
        set_current_ia32_pasid(self.value(vcpu).unwrap_or(0));
    }

    /// A guest RDMSR of IA32_PASID on `vcpu`.
    pub fn read(&self, vcpu: u8) -> u64 {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.value(vcpu).unwrap_or(0)
    }

    /// A guest WRMSR of IA32_PASID on `vcpu`: checked, stored and published to the calling
    /// thread (the vCPU's own), or refused (the caller injects #GP; the value is unchanged).
    pub fn write(&self, vcpu: u8, value: u64) -> Result<(), Ia32PasidReject> {
        let r = check_write(value, self.pasid_bits()).and_then(|()| {
            self.values
                .get(usize::from(vcpu))
                .ok_or(Ia32PasidReject::NoVcpu { value, vcpu })
        });
        match r {
            Ok(slot) => {
                slot.store(value, Ordering::Release);
                set_current_ia32_pasid(value);
                self.writes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Answers a `KVM_EXIT_X86_RDMSR` of `vcpu` (`error = 1` makes KVM inject #GP).
    pub fn on_rdmsr(&self, vcpu: u8, exit: ReadMsrExit<'_>) {
        if exit.index == MSR_IA32_PASID {
            *exit.data = self.read(vcpu);
            *exit.error = 0;
        } else {
            self.other_msrs.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "vCPU {vcpu}: RDMSR {:#x} reached user space ({:?}); #GP",
                exit.index,
                exit.reason
            );
            *exit.error = 1;
        }
    }

    /// Answers a `KVM_EXIT_X86_WRMSR` of `vcpu`: a refused write gets #GP, as on hardware.
    pub fn on_wrmsr(&self, vcpu: u8, exit: WriteMsrExit<'_>) {
        if exit.index != MSR_IA32_PASID {
            self.other_msrs.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "vCPU {vcpu}: WRMSR {:#x} <- {:#x} reached user space ({:?}); #GP",
                exit.index,
                exit.data,
                exit.reason
            );
            *exit.error = 1;
            return;
        }
        match self.write(vcpu, exit.data) {
            Ok(()) => *exit.error = 0,
            Err(e) => {
                log::debug!("vCPU {vcpu}: {e}; #GP");
                *exit.error = 1;
            }
        }
    }
}

/// Why the IA32_PASID filter is not installed.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum MsrFilterError {
    /// KVM lacks a capability the filter needs.
    #[error(
        "KVM lacks {cap}: IA32_PASID (MSR 0xD93) cannot be virtualized in user space (needs \
         KVM_CAP_X86_USER_SPACE_MSR and KVM_CAP_X86_MSR_FILTER, Linux 5.10 or later)"
    )]
    MissingCap {
        /// The capability.
        cap: &'static str,
    },
    /// An ioctl failed.
    #[error("{what} failed (errno {errno}): IA32_PASID (MSR 0xD93) cannot be virtualized")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        errno: i32,
    },
}

/// Makes KVM send the guest's RDMSR/WRMSR of IA32_PASID to user space on `vm`: user-space
/// MSR exits for filtered MSRs, and a filter that allows everything but 0xD93 (read and
/// write). This is the VM's only MSR filter (KVM has one per VM). Call before the vCPUs run.
pub fn install_msr_filter(kvm: &Kvm, vm: &VmFd) -> Result<(), MsrFilterError> {
    for (cap, name) in [
        (Cap::X86UserSpaceMsr, "KVM_CAP_X86_USER_SPACE_MSR"),
        (Cap::X86MsrFilter, "KVM_CAP_X86_MSR_FILTER"),
    ] {
        if !has_cap(kvm, cap) {
            return Err(MsrFilterError::MissingCap { cap: name });
        }
    }
    let enable = kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&enable).map_err(|e| MsrFilterError::Ioctl {
        what: "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)",
        errno: e.errno(),
    })?;
    // A clear bit denies the access; the denial becomes a user-space exit.
    let deny = [0u8];
    let range = MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base: MSR_IA32_PASID,
        msr_count: 1,
        bitmap: &deny,
    };
    vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
        .map_err(|e| MsrFilterError::Ioctl {
            what: "KVM_X86_SET_MSR_FILTER",
            errno: e.errno(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_check_follows_the_msr_layout_and_the_pasid_space() {
        let v = IA32_PASID_VALID;
        assert_eq!(check_write(0, 20), Ok(()));
        assert_eq!(check_write(v | 5, 20), Ok(()));
        assert_eq!(check_write(v | 0xf_ffff, 20), Ok(()));
        // Invalid with a PASID field: kept (ENQCMD would #GP on it).
        assert_eq!(check_write(0x1234, 8), Ok(()));
        for bit in (20..31).chain(32..64) {
            assert_eq!(
                check_write(v | 5 | (1u64 << bit), 20),
                Err(Ia32PasidReject::Reserved {
                    value: v | 5 | (1u64 << bit)
                }),
                "bit {bit}"
            );
        }
        assert!(matches!(
            check_write(v, 20),
            Err(Ia32PasidReject::Pasid0 { .. })
        ));
        assert!(matches!(
            check_write(v | 0x100, 8),
            Err(Ia32PasidReject::OutOfRange {
                pasid: 0x100,
                bits: 8,
                ..
            })
        ));
        assert_eq!(check_write(v | 0xff, 8), Ok(()));
        assert!(matches!(
            check_write(v | 1, 0),
            Err(Ia32PasidReject::OutOfRange { bits: 0, .. })
        ));
    }

    #[test]
    fn values_are_per_vcpu_and_published_on_write() {
        let s = Ia32Pasid::new(2);
        set_current_ia32_pasid(0);
        assert_eq!(s.write(1, IA32_PASID_VALID | 7), Ok(()));
        assert_eq!(s.values(), vec![0, IA32_PASID_VALID | 7]);
        assert_eq!(devices::cpu_pasid::current_pasid(), Some(7));
        // A refused write changes nothing.
        assert!(s.write(1, 1 << 40).is_err());
        assert!(s.write(2, IA32_PASID_VALID | 7).is_err());
        assert_eq!(s.value(1), Some(IA32_PASID_VALID | 7));
        assert_eq!(devices::cpu_pasid::current_pasid(), Some(7));
        s.publish(0);
        assert_eq!(devices::cpu_pasid::current_pasid(), None);
        assert_eq!(s.read(1), IA32_PASID_VALID | 7);
        let c = s.counters();
        assert_eq!((c.reads, c.writes, c.rejected), (1, 1, 2));
    }
}
