//! ENQCMD support in the VMM: what can be done honestly on today's kernels, ready for the
//! kernel side (`docs/ENQCMD.md`).
//!
//! - [`cpu`]: the CPU side behind [`cpu::CpuPasidTranslation`]; upstream KVM has no CPU
//!   PASID translation, so ENQCMD stays hidden from the guest and `--cpus enqcmd=on` fails
//!   at start, saying why;
//! - [`ia32_pasid`]: IA32_PASID (MSR 0xD93) virtualized through KVM's MSR filter and
//!   user-space MSR exits; one value per vCPU, checked against the VM's PASID space, #GP
//!   for a reserved or out-of-range value, published to the vCPU thread for a
//!   shared-work-queue portal ([`devices::cpu_pasid`]);
//! - [`table`]: the PASID-translation structure in the VT-x layout (two directories split
//!   on PASID bit 19, 4 KiB tables of 1024 entries);
//! - [`vm_table`]: [`VmPasidTable`], the VM's one guest-to-host PASID translation, fed by
//!   the vIOMMU bridge (one host PASID per guest PASID, shared by the devices that have it),
//!   kept in the VT-x layout, read through [`devices::cpu_pasid::PasidTranslate`].
//!
//! Must not touch: the shared-work-queue device (`devices::swq`), iommufd, the host PASID
//! allocator (the bridge owns it).

pub mod cpu;
pub mod ia32_pasid;
pub mod table;
pub mod vm_table;

pub use ia32_pasid::{
    check_write, install_msr_filter, Ia32Pasid, Ia32PasidCounters, Ia32PasidReject, MsrFilterError,
    IA32_PASID_BITS, MSR_IA32_PASID,
};
pub use table::{PasidIndex, PasidTranslationTable};
pub use vm_table::{PasidTranslationView, PasidUser, Release, VmPasidError, VmPasidTable};
