//! ENQCMD's CPU side on the host's real /dev/kvm: IA32_PASID (MSR 0xD93) reaches the VMM
//! through KVM's MSR filter and user-space MSR exits; the VMM keeps each vCPU's value and
//! refuses a reserved or out-of-range value with #GP, which the payload's own IDT handler
//! receives.
//!
//! The payload is hand-assembled; the assembly is in the comment next to its bytes.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};

use clap::Parser;
use devices::bus::BusDevice;
use devices::cpu_pasid::{current_pasid, set_current_ia32_pasid};
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::runner::PayloadVm;
use vmm::vm::IrqchipMode;

use common::ia32_pasid::{ia32_pasid_valid, rdmsr_ia32_pasid_to, wrmsr_ia32_pasid};
use common::{kvm_available, read_guest, write_idt, HANG_GUARD, MEM};

/// #GP.
const GP_VECTOR: u8 = 13;
/// Where [`GP_PAYLOAD`]'s #GP handler starts.
const GP_HANDLER_OFFSET: u64 = 0x80;
/// The offsets of the four WRMSRs that must fault.
const BAD_WRMSRS: [u64; 4] = [0x35, 0x41, 0x4a, 0x51];
/// What the payload stores: the read-back after the valid write, the read-back at the end,
/// the #GP count, each #GP's RIP and error code.
const READBACK_GPA: u64 = 0x8000;
const FINAL_GPA: u64 = 0x8008;
const COUNT_GPA: u64 = 0x8020;
const RIPS_GPA: u64 = 0x8040;
const ERRORS_GPA: u64 = 0x8080;

/// ```text
///     lidt [0x3000]
///     mov ecx, 0xd93                ; IA32_PASID = valid | PASID 5 (accepted)
///     mov eax, 0x80000005
///     mov edx, 0
///     wrmsr
///     mov ecx, 0xd93                ; read it back to 0x8000
///     rdmsr
///     mov [0x8000], eax
///     mov [0x8004], edx
///     mov eax, 0x80100005           ; bit 20: reserved
///     xor edx, edx
/// w1: wrmsr                         ; 0x35: #GP
///     mov eax, 0x80000005
///     mov edx, 1                    ; bit 32: reserved
/// w2: wrmsr                         ; 0x41: #GP
///     mov eax, 0x80000000           ; valid, PASID 0 (the RID_PASID)
///     xor edx, edx
/// w3: wrmsr                         ; 0x4a: #GP
///     mov eax, 0x80000100           ; PASID 0x100: outside the VM's 8-bit PASID space
/// w4: wrmsr                         ; 0x51: #GP
///     rdmsr                         ; still valid | 5
///     mov [0x8008], eax
///     mov [0x800c], edx
///     mov eax, [0x8020]             ; the #GP count is the exit code
///     mov dx, 0x501
///     out dx, al
/// 1:  hlt
///     jmp 1b
/// .balign 128, 0x90
/// handler:                          ; #GP (vector 13): record, skip the 2-byte WRMSR
///     push rax
///     push rbx
///     mov ebx, [0x8020]
///     and ebx, 7
///     mov rax, [rsp+24]             ; the faulting RIP
///     mov [0x8040+rbx*8], rax
///     mov rax, [rsp+16]             ; the error code
///     mov [0x8080+rbx*8], rax
///     inc dword ptr [0x8020]
///     add qword ptr [rsp+24], 2
///     pop rbx
///     pop rax
///     add rsp, 8
///     iretq
/// ```
const GP_PAYLOAD: [u8; 187] = [
    0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0xb9, 0x93, 0x0d, 0x00, 0x00, 0xb8, 0x05, 0x00,
    0x00, 0x80, 0xba, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x30, 0xb9, 0x93, 0x0d, 0x00, 0x00, 0x0f, 0x32,
    0x89, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0x89, 0x14, 0x25, 0x04, 0x80, 0x00, 0x00, 0xb8, 0x05,
    0x00, 0x10, 0x80, 0x31, 0xd2, 0x0f, 0x30, 0xb8, 0x05, 0x00, 0x00, 0x80, 0xba, 0x01, 0x00, 0x00,
    0x00, 0x0f, 0x30, 0xb8, 0x00, 0x00, 0x00, 0x80, 0x31, 0xd2, 0x0f, 0x30, 0xb8, 0x00, 0x01, 0x00,
    0x80, 0x0f, 0x30, 0x0f, 0x32, 0x89, 0x04, 0x25, 0x08, 0x80, 0x00, 0x00, 0x89, 0x14, 0x25, 0x0c,
    0x80, 0x00, 0x00, 0x8b, 0x04, 0x25, 0x20, 0x80, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xee, 0xf4,
    0xeb, 0xfd, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x1f, 0x00,
    0x50, 0x53, 0x8b, 0x1c, 0x25, 0x20, 0x80, 0x00, 0x00, 0x83, 0xe3, 0x07, 0x48, 0x8b, 0x44, 0x24,
    0x18, 0x48, 0x89, 0x04, 0xdd, 0x40, 0x80, 0x00, 0x00, 0x48, 0x8b, 0x44, 0x24, 0x10, 0x48, 0x89,
    0x04, 0xdd, 0x80, 0x80, 0x00, 0x00, 0xff, 0x04, 0x25, 0x20, 0x80, 0x00, 0x00, 0x48, 0x83, 0x44,
    0x24, 0x18, 0x02, 0x5b, 0x58, 0x48, 0x83, 0xc4, 0x08, 0x48, 0xcf,
];

#[test]
fn enqcmd_reserved_pasid_gp() {
    const NAME: &str = "enqcmd_reserved_pasid_gp";
    if !kvm_available(NAME) {
        return;
    }
    // The payload's first two steps are the shared IA32_PASID snippets.
    assert_eq!(GP_PAYLOAD[8..25], wrmsr_ia32_pasid(ia32_pasid_valid(5)));
    assert_eq!(GP_PAYLOAD[25..46], rdmsr_ia32_pasid_to(READBACK_GPA as u32));

    let mut pvm = PayloadVm::new(MEM, IrqchipMode::Off).unwrap();
    let state = match pvm.vm().ia32_pasid() {
        Ok(s) => s.clone(),
        Err(e) => {
            common::skip(NAME, &e.to_string());
            return;
        }
    };
    // The VM's PASID space: what an 8-bit vIOMMU (`pasid-bits=8`) can name.
    pvm.vm().set_guest_pasid_bits(8);
    write_idt(pvm.vm(), GP_VECTOR, DEFAULT_LONG_GPA + GP_HANDLER_OFFSET);
    let running = pvm
        .start(&GP_PAYLOAD, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    println!("{NAME}: exit {:?}", out.exit);

    // Every bad write reached the payload's own #GP handler, at its WRMSR, error code 0.
    let count: u32 = read_guest(&pvm, COUNT_GPA);
    assert_eq!(out.guest_exit_code(), Some(4), "{:?}", out.exit);
    assert_eq!(count, 4);
    for (i, off) in BAD_WRMSRS.iter().enumerate() {
        let rip: u64 = read_guest(&pvm, RIPS_GPA + 8 * i as u64);
        let err: u64 = read_guest(&pvm, ERRORS_GPA + 8 * i as u64);
        assert_eq!(rip, DEFAULT_LONG_GPA + off, "#GP {i}");
        assert_eq!(err, 0, "#GP {i}");
    }
    // The valid write was kept, read back, and no refused write changed it.
    let readback: u64 = read_guest(&pvm, READBACK_GPA);
    let last: u64 = read_guest(&pvm, FINAL_GPA);
    assert_eq!(readback, ia32_pasid_valid(5));
    assert_eq!(last, ia32_pasid_valid(5));
    // The VMM's per-vCPU value and its counts of the exits.
    assert_eq!(state.value(0), Some(ia32_pasid_valid(5)));
    let c = state.counters();
    assert_eq!((c.writes, c.rejected, c.reads, c.other_msrs), (1, 4, 2, 0));
    let exits = &out.exit.first_report().unwrap().exits;
    assert_eq!((exits.msr_write, exits.msr_read), (5, 2));
}

#[test]
fn enqcmd_on_fails_at_start_saying_why() {
    // The policy is checked before the VM is made: no /dev/kvm needed.
    let cfg = match vmm::config::Cli::try_parse_from([
        "ioasid-vmm",
        "--payload",
        "/nonexistent-payload",
        "--cpus",
        "boot=1,enqcmd=on",
    ])
    .unwrap()
    .action()
    .unwrap()
    {
        vmm::config::Action::Run(c) => *c,
        a => panic!("expected a run, got {a:?}"),
    };
    let attach = |_: &mut vmm::vm::Vm,
                  _: &vmm::runner::SharedDeviceManager,
                  _: &vmm::config::VmConfig| Ok(Vec::new());
    let e = match vmm::runner::boot(&cfg, Vec::new(), &attach, Box::new(|_| {})) {
        Ok(_) => panic!("enqcmd=on booted"),
        Err(e) => e,
    };
    let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    println!("{chain}");
    assert!(matches!(e, vmm::runner::RunError::Enqcmd(_)), "{chain}");
    assert!(chain.contains("enqcmd=on"), "{chain}");
    assert!(
        chain.contains("no kernel offers KVM PASID translation"),
        "{chain}"
    );
}

/// Per MMIO store: the byte stored and the PASID ENQCMD would take on the storing thread.
type Seen = Arc<Mutex<Vec<(u8, Option<u32>)>>>;

/// Records, for each MMIO store, the PASID ENQCMD would take on the storing thread.
struct PasidProbe(Seen);

impl BusDevice for PasidProbe {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _base: u64, _offset: u64, data: &[u8]) {
        let tag = data.first().copied().unwrap_or(0);
        self.0.lock().unwrap().push((tag, current_pasid()));
    }
}

/// Where [`PasidProbe`] sits (an MMIO address no other device of a payload VM uses).
const PROBE_GPA: u64 = 0xd000_0000;

#[test]
fn enqcmd_ia32_pasid_reaches_the_vcpu_thread() {
    const NAME: &str = "enqcmd_ia32_pasid_reaches_the_vcpu_thread";
    if !kvm_available(NAME) {
        return;
    }
    // mov rbx, 0xd0000000; mov dword [rbx], 1      (before: IA32_PASID is 0)
    // <wrmsr_ia32_pasid(valid | 7)>
    // mov dword [rbx], 2; hlt                     (after: PASID 7, on this vCPU's thread)
    let mut code = vec![0x48, 0xbb];
    code.extend_from_slice(&PROBE_GPA.to_le_bytes());
    code.extend_from_slice(&[0xc7, 0x03, 0x01, 0x00, 0x00, 0x00]);
    code.extend_from_slice(&wrmsr_ia32_pasid(ia32_pasid_valid(7)));
    code.extend_from_slice(&[0xc7, 0x03, 0x02, 0x00, 0x00, 0x00, 0xf4]);

    let mut pvm = PayloadVm::new(MEM, IrqchipMode::Off).unwrap();
    if let Err(e) = pvm.vm().ia32_pasid() {
        common::skip(NAME, &e.to_string());
        return;
    }
    let seen: Seen = Arc::default();
    pvm.vm()
        .add_mmio_device(Arc::new(Mutex::new(PasidProbe(seen.clone()))), PROBE_GPA, 4)
        .unwrap();
    // The test thread is no vCPU: what it publishes never reaches the vCPU's thread.
    set_current_ia32_pasid(ia32_pasid_valid(9));
    let running = pvm
        .start(&code, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    set_current_ia32_pasid(0);
    println!("{NAME}: exit {:?}", out.exit);
    assert!(
        matches!(out.stop(), Some(Ok(vmm::vcpu::VcpuStop::Halted))),
        "{:?}",
        out.exit
    );
    assert_eq!(*seen.lock().unwrap(), vec![(1, None), (2, Some(7))]);
}
