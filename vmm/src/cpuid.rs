//! The CPUID policy: KVM's supported set, adjusted per vCPU.
//!
//! - leaf 0x1: hypervisor bit, initial APIC ID, logical CPU count, TSC-deadline when the
//!   in-kernel LAPIC supports it, APIC bit only with an irqchip;
//! - leaves 0x4, 0xb, 0x1f: a one-socket topology of `vcpu_count` cores, one thread each;
//! - leaf 0xa (architectural PMU): cleared, we do not promise a PMU;
//! - leaf 0x6 (thermal/power): cleared;
//! - leaf 0x7.0 ECX[29] (ENQCMD): cleared unless the CPU side of ENQCMD can translate
//!   guest PASIDs ([`crate::enqcmd::cpu`]; upstream KVM cannot, so it stays hidden).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: TSC-deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: MONITOR/MWAIT (not offered to guests).
const ECX_MONITOR: u32 = 1 << 3;
/// Leaf 1 EDX: on-chip APIC.
const EDX_APIC: u32 = 1 << 9;
/// Leaf 1 EDX: hyper-threading / multi-core package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 7 subleaf 0 ECX: ENQCMD/ENQCMDS.
pub const ECX7_ENQCMD: u32 = 1 << 29;

/// What the policy needs to know about the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidParams {
    /// This vCPU's index (= APIC ID).
    pub vcpu_id: u8,
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Whether the VM has an in-kernel LAPIC.
    pub has_lapic: bool,
    /// Whether KVM can emulate the TSC-deadline timer (`KVM_CAP_TSC_DEADLINE_TIMER`).
    pub tsc_deadline: bool,
    /// Whether ENQCMD may be offered ([`crate::enqcmd::cpu::check_policy`]); when false the
    /// bit is cleared, when true KVM's own answer is kept.
    pub enqcmd: bool,
}

/// Bits needed to number `count` items (the x2APIC ID shift for a topology level).
fn shift_for(count: u8) -> u32 {
    let c = u32::from(count.max(1));
    32 - (c - 1).leading_zeros()
}

fn topology_leaf(e: &mut kvm_cpuid_entry2, p: &CpuidParams) {
    let apic = u32::from(p.vcpu_id);
    match e.index {
        // SMT level: one thread per core.
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = (1 << 8) | e.index;
        }
        // Core level: all vCPUs in one package.
        1 => {
            e.eax = shift_for(p.vcpu_count);
            e.ebx = u32::from(p.vcpu_count);
            e.ecx = (2 << 8) | e.index;
        }
        _ => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = e.index;
        }
    }
    e.edx = apic;
}

/// Applies the policy to `cpuid` (a copy of KVM's supported set) for one vCPU.
pub fn apply_policy(cpuid: &mut CpuId, p: &CpuidParams) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ecx |= ECX_HYPERVISOR;
                e.ecx &= !ECX_MONITOR;
                if p.has_lapic && p.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if p.has_lapic {
                    e.edx |= EDX_APIC;
                } else {
                    e.edx &= !EDX_APIC;
                }
                // EBX: [31:24] initial APIC ID, [23:16] logical processors, [15:8] CLFLUSH
                // line size (kept), [7:0] brand index (kept).
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(p.vcpu_id) << 24)
                    | (u32::from(p.vcpu_count) << 16);
                if p.vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1.
                let cores = u32::from(p.vcpu_count.max(1)) - 1;
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cores } else { 0 };
                e.eax = (e.eax & 0x3fff) | (cores << 26) | (sharing << 14);
            }
            0x6 | 0xa => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0x7 if e.index == 0 && !p.enqcmd => e.ecx &= !ECX7_ENQCMD,
            0xb | 0x1f => topology_leaf(e, p),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> CpuId {
        let mut e1 = kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0102_0800,
            ecx: ECX_MONITOR,
            ..Default::default()
        };
        e1.edx = EDX_APIC;
        let entries = [
            e1,
            kvm_cpuid_entry2 {
                function: 0xa,
                eax: 0x0730_0805,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4,
                index: 3,
                eax: (3 << 5) | 0x3,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn leaf1_identity_and_hypervisor() {
        let mut c = sample();
        apply_policy(
            &mut c,
            &CpuidParams {
                vcpu_id: 2,
                vcpu_count: 4,
                has_lapic: true,
                tsc_deadline: true,
                enqcmd: false,
            },
        );
        let e = c.as_slice()[0];
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e.ecx & ECX_MONITOR, 0);
        assert_eq!(e.ebx >> 24, 2);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.edx & EDX_HTT, 0);
        // PMU leaf cleared.
        assert_eq!(c.as_slice()[1].eax, 0);
        // Topology: x2APIC id in EDX, core level counts 4 with a 2-bit shift.
        let l0 = c.as_slice()[2];
        let l1 = c.as_slice()[3];
        assert_eq!((l0.edx, l0.ebx, l0.ecx), (2, 1, 0x100));
        assert_eq!((l1.edx, l1.eax, l1.ebx, l1.ecx), (2, 2, 4, 0x201));
        // L3 cache shared by the 4 cores.
        let l3 = c.as_slice()[4];
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn no_lapic_clears_apic_bits() {
        let mut c = sample();
        apply_policy(
            &mut c,
            &CpuidParams {
                vcpu_id: 0,
                vcpu_count: 1,
                has_lapic: false,
                tsc_deadline: true,
                enqcmd: false,
            },
        );
        let e = c.as_slice()[0];
        assert_eq!(e.edx & EDX_APIC, 0);
        assert_eq!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn cpuid_enqcmd_policy() {
        use crate::config::OnOffAuto;
        use crate::enqcmd::cpu::{
            check_policy, host_cpu_side, CpuPasidSupport, CpuPasidTranslation, EnqcmdError,
        };

        /// A CPU side that translates (what a kernel with PASID translation would give).
        #[derive(Debug)]
        struct Translating;
        impl CpuPasidTranslation for Translating {
            fn support(&self) -> CpuPasidSupport {
                CpuPasidSupport::Available
            }
            fn map(&self, _: u32, _: u32) -> Result<(), EnqcmdError> {
                Ok(())
            }
            fn unmap(&self, _: u32) -> Result<(), EnqcmdError> {
                Ok(())
            }
        }

        // KVM's supported set as if it reported ENQCMD (and a neighbour bit that stays).
        let leaf7 = |ecx| kvm_cpuid_entry2 {
            function: 7,
            index: 0,
            ecx,
            ..Default::default()
        };
        let enqcmd_seen = |policy, cpu: &dyn CpuPasidTranslation| {
            let expose = check_policy(policy, cpu)?;
            let mut c = CpuId::from_entries(&[leaf7(ECX7_ENQCMD | 1 << 27), leaf7_sub1()]).unwrap();
            apply_policy(
                &mut c,
                &CpuidParams {
                    vcpu_id: 0,
                    vcpu_count: 1,
                    has_lapic: true,
                    tsc_deadline: true,
                    enqcmd: expose,
                },
            );
            let e = c.as_slice()[0];
            assert_ne!(e.ecx & (1 << 27), 0, "MOVDIR64B is not ENQCMD's to clear");
            // Subleaf 1 is a different leaf: untouched.
            assert_eq!(c.as_slice()[1].ecx, ECX7_ENQCMD);
            Ok::<bool, EnqcmdError>(e.ecx & ECX7_ENQCMD != 0)
        };
        fn leaf7_sub1() -> kvm_cpuid_entry2 {
            kvm_cpuid_entry2 {
                function: 7,
                index: 1,
                ecx: ECX7_ENQCMD,
                ..Default::default()
            }
        }
        // Upstream KVM: auto and off hide it; on fails, saying why.
        let upstream = host_cpu_side();
        assert_eq!(enqcmd_seen(OnOffAuto::Auto, upstream), Ok(false));
        assert_eq!(enqcmd_seen(OnOffAuto::Off, upstream), Ok(false));
        let e = enqcmd_seen(OnOffAuto::On, upstream).unwrap_err();
        assert!(
            e.to_string()
                .contains("no kernel offers KVM PASID translation"),
            "{e}"
        );
        // A CPU side that translates: auto and on keep KVM's bit, off hides it.
        assert_eq!(enqcmd_seen(OnOffAuto::Auto, &Translating), Ok(true));
        assert_eq!(enqcmd_seen(OnOffAuto::On, &Translating), Ok(true));
        assert_eq!(enqcmd_seen(OnOffAuto::Off, &Translating), Ok(false));
    }

    #[test]
    fn shifts() {
        assert_eq!(shift_for(1), 0);
        assert_eq!(shift_for(2), 1);
        assert_eq!(shift_for(3), 2);
        assert_eq!(shift_for(4), 2);
        assert_eq!(shift_for(5), 3);
    }
}
