//! The CPU side of ENQCMD behind one trait, [`CpuPasidTranslation`]: whether the host can
//! make the CPU translate the guest's ENQCMD PASID to the host PASID, and programming it.
//!
//! A guest's ENQCMD puts the PASID from its IA32_PASID into the descriptor; the device and
//! the IOMMU know only host PASIDs. On VT-x the CPU translates through the VMCS
//! PASID-translation structure ([`super::table`]); only the kernel (KVM) can point the
//! VMCS at it and enable it. Upstream KVM has no uAPI for that (the RFC's `KVM_MAP_PASID`
//! was never merged) and does not expose ENQCMD in `KVM_GET_SUPPORTED_CPUID`, so the one
//! implementation here, [`UpstreamKvm`], reports "no CPU PASID translation" and ENQCMD
//! (CPUID.(EAX=7,ECX=0):ECX[29]) stays hidden from the guest. No implementation is written
//! against a uAPI no kernel has; `docs/ENQCMD.md` says what a second one would need.
//!
//! The policy, `--cpus ...,enqcmd=on|off|auto`: `off` and `auto` hide ENQCMD unless the
//! CPU side can translate (`auto` would expose it then); `on` fails at start when it
//! cannot, saying why ([`check_policy`]).
//!
//! Owns: the trait, the upstream implementation, the policy decision. Must not touch: KVM
//! capability numbers from the RFC (see [`crate::kvm_caps`]).

use thiserror::Error;

use crate::config::OnOffAuto;

/// Why a host cannot translate guest PASIDs in the CPU.
pub const UPSTREAM_KVM_REASON: &str =
    "no kernel offers KVM PASID translation: upstream KVM has no ioctl to program the VT-x \
     PASID-translation table (the /dev/ioasid RFC's KVM_MAP_PASID was never merged) and does \
     not expose ENQCMD in KVM_GET_SUPPORTED_CPUID. ENQCMD in a guest needs a CPU with ENQCMD \
     and VT-x PASID translation, and a KVM that maps guest PASIDs to host PASIDs (a \
     map/unmap ioctl) and reports a missing translation to the VMM (an exit); see \
     docs/ENQCMD.md";

/// Whether the CPU side can translate guest PASIDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuPasidSupport {
    /// The CPU translates guest PASIDs through the table this side programs.
    Available,
    /// It cannot, and why.
    Unavailable {
        /// Why.
        reason: &'static str,
    },
}

/// Errors of the CPU side.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EnqcmdError {
    /// `enqcmd=on`, and the host cannot translate guest PASIDs in the CPU.
    #[error("--cpus enqcmd=on: ENQCMD cannot be offered to the guest: {reason}")]
    Unavailable {
        /// Why.
        reason: &'static str,
    },
    /// The CPU side refused a translation change.
    #[error("CPU PASID translation of guest PASID {guest:#x}: {reason}")]
    Program {
        /// The guest PASID.
        guest: u32,
        /// Why.
        reason: &'static str,
    },
}

/// The CPU side of ENQCMD (see the module documentation).
pub trait CpuPasidTranslation: Send + Sync + std::fmt::Debug {
    /// Whether the CPU translates guest PASIDs on this host.
    fn support(&self) -> CpuPasidSupport;
    /// Makes the CPU translate guest PASID `guest` to host PASID `host`.
    fn map(&self, guest: u32, host: u32) -> Result<(), EnqcmdError>;
    /// Removes the CPU's translation of `guest`.
    fn unmap(&self, guest: u32) -> Result<(), EnqcmdError>;
}

/// Upstream KVM (every kernel today): no CPU PASID translation.
#[derive(Debug, Clone, Copy, Default)]
pub struct UpstreamKvm;

impl CpuPasidTranslation for UpstreamKvm {
    fn support(&self) -> CpuPasidSupport {
        CpuPasidSupport::Unavailable {
            reason: UPSTREAM_KVM_REASON,
        }
    }

    fn map(&self, guest: u32, _host: u32) -> Result<(), EnqcmdError> {
        Err(EnqcmdError::Program {
            guest,
            reason: UPSTREAM_KVM_REASON,
        })
    }

    fn unmap(&self, guest: u32) -> Result<(), EnqcmdError> {
        Err(EnqcmdError::Program {
            guest,
            reason: UPSTREAM_KVM_REASON,
        })
    }
}

/// The CPU side of this host's KVM.
pub fn host_cpu_side() -> &'static dyn CpuPasidTranslation {
    &UpstreamKvm
}

/// Whether the guest sees ENQCMD under `policy` with `cpu`, or (for `on`) why it cannot.
pub fn check_policy(policy: OnOffAuto, cpu: &dyn CpuPasidTranslation) -> Result<bool, EnqcmdError> {
    match (policy, cpu.support()) {
        (OnOffAuto::Off, _) => Ok(false),
        (_, CpuPasidSupport::Available) => Ok(true),
        (OnOffAuto::Auto, CpuPasidSupport::Unavailable { .. }) => Ok(false),
        (OnOffAuto::On, CpuPasidSupport::Unavailable { reason }) => {
            Err(EnqcmdError::Unavailable { reason })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn upstream_kvm_has_no_cpu_pasid_translation() {
        let cpu = host_cpu_side();
        assert!(matches!(cpu.support(), CpuPasidSupport::Unavailable { .. }));
        assert!(cpu.map(5, 0x40).is_err());
        assert!(cpu.unmap(5).is_err());
        assert_eq!(check_policy(OnOffAuto::Auto, cpu), Ok(false));
        assert_eq!(check_policy(OnOffAuto::Off, cpu), Ok(false));
        let e = check_policy(OnOffAuto::On, cpu).unwrap_err().to_string();
        assert!(e.contains("no kernel offers KVM PASID translation"), "{e}");
        assert!(e.contains("docs/ENQCMD.md"), "{e}");
        // A CPU side that translates: `cpuid::tests::cpuid_enqcmd_policy`.
    }
}
