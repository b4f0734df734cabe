//! One line of a vCPU's state for a stalled-guest diagnosis: where it runs (RIP, interrupt
//! flag), KVM's MP state (halted, waiting for SIPI, ...), and its LAPIC timer and pending
//! vectors. Logged when a vCPU stops on a kick, so a guest killed at a deadline (SIGTERM)
//! leaves each vCPU's state in the VMM's log.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{KvmNestedStateBuffer, VcpuFd};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// RFLAGS.IF.
const RFLAGS_IF: u64 = 1 << 9;

/// LAPIC register offsets (each register is 32 bits at a 16-byte stride).
const APIC_TPR: usize = 0x80;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;
const APIC_LVTT: usize = 0x320;
const APIC_TMICT: usize = 0x380;
const APIC_TMCCT: usize = 0x390;

/// The name of a `KVM_MP_STATE_*` value.
pub fn mp_state_name(state: u32) -> &'static str {
    match state {
        kvm_bindings::KVM_MP_STATE_RUNNABLE => "runnable",
        kvm_bindings::KVM_MP_STATE_UNINITIALIZED => "uninitialized",
        kvm_bindings::KVM_MP_STATE_INIT_RECEIVED => "init-received",
        kvm_bindings::KVM_MP_STATE_HALTED => "halted",
        kvm_bindings::KVM_MP_STATE_SIPI_RECEIVED => "sipi-received",
        _ => "other",
    }
}

/// The 32-bit LAPIC register at `off` of a `KVM_GET_LAPIC` page (0 past its end).
fn lapic_reg(regs: &[libc::c_char], off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs.get(off + i).copied().unwrap_or(0) as u8;
    }
    u32::from_le_bytes(b)
}

/// The highest vector set in the 256-bit LAPIC bitmap at `base` (ISR, IRR), if any.
fn highest_vector(regs: &[libc::c_char], base: usize) -> Option<u32> {
    (0..8usize).rev().find_map(|i| {
        let word = lapic_reg(regs, base + i * 0x10);
        (word != 0).then(|| (i as u32) * 32 + 31 - word.leading_zeros())
    })
}

/// `rip=.. if=.. mp=.. tpr=.. lvtt=.. tmict=.. tmcct=.. irr=.. isr=.. shadow=.. injected=..
/// gif=.. tscdl=..` for the vCPU `fd`;
/// a part KVM refuses to read says so instead.
pub fn state_line(fd: &VcpuFd) -> String {
    let mut parts = Vec::new();
    match fd.get_regs() {
        Ok(r) => parts.push(format!(
            "rip={:#x} if={}",
            r.rip,
            u8::from(r.rflags & RFLAGS_IF != 0)
        )),
        Err(e) => parts.push(format!("regs=<{e}>")),
    }
    match fd.get_mp_state() {
        Ok(m) => parts.push(format!("mp={}", mp_state_name(m.mp_state))),
        Err(e) => parts.push(format!("mp=<{e}>")),
    }
    match fd.get_lapic() {
        Ok(l) => {
            let fmt_vec = |v: Option<u32>| v.map_or("-".to_string(), |v| format!("{v:#x}"));
            parts.push(format!(
                "tpr={:#x} lvtt={:#x} tmict={:#x} tmcct={:#x} irr={} isr={}",
                lapic_reg(&l.regs, APIC_TPR),
                lapic_reg(&l.regs, APIC_LVTT),
                lapic_reg(&l.regs, APIC_TMICT),
                lapic_reg(&l.regs, APIC_TMCCT),
                fmt_vec(highest_vector(&l.regs, APIC_IRR)),
                fmt_vec(highest_vector(&l.regs, APIC_ISR)),
            ));
        }
        Err(e) => parts.push(format!("lapic=<{e}>")),
    }
    // What can hold off a pending interrupt besides RFLAGS.IF: the one-instruction interrupt
    // shadow (after STI or MOV SS) and, on AMD, the global interrupt flag (GIF), which KVM
    // reports only through the nested state.
    match fd.get_vcpu_events() {
        Ok(ev) => parts.push(format!(
            "shadow={} injected={}",
            ev.interrupt.shadow,
            if ev.interrupt.injected != 0 {
                format!("{:#x}", ev.interrupt.nr)
            } else {
                "-".to_string()
            }
        )),
        Err(e) => parts.push(format!("events=<{e}>")),
    }
    let mut nested = KvmNestedStateBuffer::empty();
    match fd.nested_state(&mut nested) {
        // Only SVM's format carries GIF; VMX has none.
        Ok(_) if u32::from(nested.format) == kvm_bindings::KVM_STATE_NESTED_FORMAT_SVM => parts
            .push(format!(
                "gif={}",
                u8::from(u32::from(nested.flags) & kvm_bindings::KVM_STATE_NESTED_GIF_SET != 0)
            )),
        Ok(_) => {}
        Err(e) => parts.push(format!("gif=<{e}>")),
    }
    let entries = [MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE].map(|index| kvm_msr_entry {
        index,
        ..Default::default()
    });
    if let Ok(mut msrs) = Msrs::from_entries(&entries) {
        match fd.get_msrs(&mut msrs) {
            Ok(2) => {
                let (tsc, dl) = match msrs.as_slice() {
                    [t, d] => (t.data, d.data),
                    _ => (0, 0),
                };
                if dl == 0 {
                    parts.push("tscdl=off".to_string());
                } else {
                    // Signed: a deadline in the past that never fired is the lost-timer case.
                    parts.push(format!("tscdl={:+}", dl.wrapping_sub(tsc) as i64));
                }
            }
            Ok(n) => parts.push(format!("tscdl=<{n} of 2 MSRs read>")),
            Err(e) => parts.push(format!("tscdl=<{e}>")),
        }
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_vector_reads_the_bitmap() {
        let mut regs = vec![0 as libc::c_char; 1024];
        assert_eq!(highest_vector(&regs, APIC_IRR), None);
        // Vector 0xec: word 7 (0xe0..0xff), bit 12.
        let w = (1u32 << 12).to_le_bytes();
        for (i, b) in w.iter().enumerate() {
            regs[APIC_IRR + 7 * 0x10 + i] = *b as libc::c_char;
        }
        regs[APIC_IRR + 0x10] = 1; // vector 0x20
        assert_eq!(highest_vector(&regs, APIC_IRR), Some(0xec));
        assert_eq!(highest_vector(&regs, APIC_ISR), None);
        assert_eq!(lapic_reg(&regs, 1022), 0, "a short read past the end is 0");
    }

    #[test]
    fn mp_state_names() {
        assert_eq!(mp_state_name(kvm_bindings::KVM_MP_STATE_HALTED), "halted");
        assert_eq!(mp_state_name(99), "other");
    }
}
