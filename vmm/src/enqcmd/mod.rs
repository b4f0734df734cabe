//! ENQCMD support in the VMM: what can be done honestly on today's kernels, ready for the
//! kernel side (`docs/ENQCMD.md`).
//!
//! - [`ia32_pasid`]: IA32_PASID (MSR 0xD93) virtualized through KVM's MSR filter and
//!   user-space MSR exits; one value per vCPU, checked against the VM's PASID space, #GP
//!   for a reserved or out-of-range value, published to the vCPU thread for a
//!   shared-work-queue portal ([`devices::cpu_pasid`]).
//!
//! Must not touch: the shared-work-queue device (`devices::swq`), iommufd.

pub mod ia32_pasid;

pub use ia32_pasid::{
    check_write, install_msr_filter, Ia32Pasid, Ia32PasidCounters, Ia32PasidReject, MsrFilterError,
    IA32_PASID_BITS, MSR_IA32_PASID,
};
