//! The emulated VT-d driven by a vCPU on the host's KVM: a long-mode payload programs the
//! registers and the invalidation queue by MMIO, as a guest driver does, and waits on the
//! wait descriptor's status write in its own memory.
//!
//! The unit is the one the device manager creates for `--platform viommu=vtd`, on the VM's
//! MMIO bus at `layout::VTD_REGS_START`. The payload is hand-assembled; the assembly is in
//! the comment next to its bytes.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::layout::VTD_REGS_START;
use vmm::runner::PayloadVm;
use vmm::vm::IrqchipMode;

use common::{assert_halted, kvm_available, read_guest, HANG_GUARD, MEM};

/// Where the payload puts its root table, its invalidation queue and the status dword.
const ROOT_GPA: u64 = 0x20_0000;
const QUEUE_GPA: u64 = 0x20_1000;
const STATUS_GPA: u64 = 0x20_2000;
/// The status data of the wait descriptor.
const STATUS: u32 = 0x5a5a_a5a5;

/// ```text
///     mov rbx, 0xfed90000                  ; VT-d registers (layout::VTD_REGS_START)
///     mov rax, 0x200400                    ; root table 0x200000, TTM=01 (scalable mode)
///     mov [rbx+0x20], rax                  ; RTADDR
///     mov dword [rbx+0x18], 0x40000000     ; GCMD.SRTP
///     mov ecx, 0x100000
/// 1:  mov eax, [rbx+0x1c]                  ; GSTS
///     test eax, 0x40000000                 ; RTPS
///     jnz 2f
///     dec ecx
///     jnz 1b
///     jmp fail
/// 2:  mov rax, 0x201800                    ; IQA: queue 0x201000, DW=1 (256-bit), QS=0
///     mov [rbx+0x90], rax
///     mov dword [rbx+0x18], 0x04000000     ; GCMD.QIE
///     mov ecx, 0x100000
/// 3:  mov eax, [rbx+0x1c]
///     test eax, 0x04000000                 ; QIES
///     jnz 4f
///     dec ecx
///     jnz 3b
///     jmp fail
/// 4:  mov rdi, 0x201000                    ; descriptor 0: context-cache invalidation, global
///     mov qword [rdi], 0x11
///     mov qword [rdi+8], 0
///     mov qword [rdi+16], 0
///     mov qword [rdi+24], 0
///     mov rax, 0x5a5aa5a500000025          ; descriptor 1: wait, SW, status 0x5a5aa5a5
///     mov [rdi+32], rax
///     mov qword [rdi+40], 0x202000         ; status address
///     mov qword [rdi+48], 0
///     mov qword [rdi+56], 0
///     mov qword [rbx+0x88], 64             ; IQT: two 256-bit descriptors (doorbell)
///     mov ecx, 0x1000000
/// 5:  mov eax, [0x202000]                  ; wait for the status write in our own memory
///     cmp eax, 0x5a5aa5a5
///     je 6f
///     pause
///     dec ecx
///     jnz 5b
///     jmp fail
/// 6:  mov rax, [rbx+0x80]                  ; IQH
///     mov [0x8000], rax
///     mov eax, [rbx+0x34]                  ; FSTS (fault status)
///     mov [0x8008], eax
///     mov eax, [rbx+0x9c]                  ; ICS
///     mov [0x800c], eax
///     mov dx, 0x3f8
///     mov al, 'Q'
///     out dx, al
///     mov al, 'I'
///     out dx, al
///     hlt
/// fail:
///     mov eax, [rbx+0x34]
///     mov [0x8008], eax
///     mov eax, [rbx+0x1c]
///     mov [0x8010], eax
///     mov dx, 0x3f8
///     mov al, 'F'
///     out dx, al
///     hlt
/// ```
const QI_PAYLOAD: [u8; 288] = [
    0x48, 0xbb, 0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc0, 0x00, 0x04, 0x20,
    0x00, 0x48, 0x89, 0x43, 0x20, 0xc7, 0x43, 0x18, 0x00, 0x00, 0x00, 0x40, 0xb9, 0x00, 0x00, 0x10,
    0x00, 0x8b, 0x43, 0x1c, 0xa9, 0x00, 0x00, 0x00, 0x40, 0x75, 0x09, 0xff, 0xc9, 0x75, 0xf2, 0xe9,
    0xd0, 0x00, 0x00, 0x00, 0x48, 0xc7, 0xc0, 0x00, 0x18, 0x20, 0x00, 0x48, 0x89, 0x83, 0x90, 0x00,
    0x00, 0x00, 0xc7, 0x43, 0x18, 0x00, 0x00, 0x00, 0x04, 0xb9, 0x00, 0x00, 0x10, 0x00, 0x8b, 0x43,
    0x1c, 0xa9, 0x00, 0x00, 0x00, 0x04, 0x75, 0x09, 0xff, 0xc9, 0x75, 0xf2, 0xe9, 0xa3, 0x00, 0x00,
    0x00, 0x48, 0xc7, 0xc7, 0x00, 0x10, 0x20, 0x00, 0x48, 0xc7, 0x07, 0x11, 0x00, 0x00, 0x00, 0x48,
    0xc7, 0x47, 0x08, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x47, 0x10, 0x00, 0x00, 0x00, 0x00, 0x48,
    0xc7, 0x47, 0x18, 0x00, 0x00, 0x00, 0x00, 0x48, 0xb8, 0x25, 0x00, 0x00, 0x00, 0xa5, 0xa5, 0x5a,
    0x5a, 0x48, 0x89, 0x47, 0x20, 0x48, 0xc7, 0x47, 0x28, 0x00, 0x20, 0x20, 0x00, 0x48, 0xc7, 0x47,
    0x30, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x47, 0x38, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x83,
    0x88, 0x00, 0x00, 0x00, 0x40, 0x00, 0x00, 0x00, 0xb9, 0x00, 0x00, 0x00, 0x01, 0x8b, 0x04, 0x25,
    0x00, 0x20, 0x20, 0x00, 0x3d, 0xa5, 0xa5, 0x5a, 0x5a, 0x74, 0x08, 0xf3, 0x90, 0xff, 0xc9, 0x75,
    0xec, 0xeb, 0x31, 0x48, 0x8b, 0x83, 0x80, 0x00, 0x00, 0x00, 0x48, 0x89, 0x04, 0x25, 0x00, 0x80,
    0x00, 0x00, 0x8b, 0x43, 0x34, 0x89, 0x04, 0x25, 0x08, 0x80, 0x00, 0x00, 0x8b, 0x83, 0x9c, 0x00,
    0x00, 0x00, 0x89, 0x04, 0x25, 0x0c, 0x80, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x51, 0xee,
    0xb0, 0x49, 0xee, 0xf4, 0x8b, 0x43, 0x34, 0x89, 0x04, 0x25, 0x08, 0x80, 0x00, 0x00, 0x8b, 0x43,
    0x1c, 0x89, 0x04, 0x25, 0x10, 0x80, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x46, 0xee, 0xf4,
];

#[test]
fn viommu_vcpu_payload_programs_qi() {
    let name = "viommu_vcpu_payload_programs_qi";
    if !kvm_available(name) {
        return;
    }
    assert_eq!(
        VTD_REGS_START, 0xfed9_0000,
        "the payload hard-codes the base"
    );
    let mut pvm = PayloadVm::new(MEM, IrqchipMode::Off).unwrap();
    let dm = DeviceManager::new(
        pvm.vm(),
        DeviceManagerConfig {
            intx: IntxWiring::Off,
            viommu: Some(ViommuSetup {
                vtd: ViommuConfig {
                    fsts: OnOffAuto::Off,
                    ..ViommuConfig::default()
                },
                address_width: 48,
            }),
            ..DeviceManagerConfig::default()
        },
    )
    .unwrap();
    let running = pvm
        .start(&QI_PAYLOAD, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    println!("{name}: exit {:?}, serial {:?}", out.exit, out.serial);
    let fsts: u32 = read_guest(&pvm, 0x8008);
    let gsts: u32 = read_guest(&pvm, 0x8010);
    assert_halted(&out);
    assert_eq!(
        out.serial, b"QI",
        "the payload gave up (FSTS {fsts:#x}, GSTS {gsts:#x})"
    );

    // What the payload saw: the status write landed in its RAM, the queue head caught up
    // with the tail, no queue error; ICS.IWC stays clear (the wait asked for a status
    // write, not an interrupt: IF=0).
    let status: u32 = read_guest(&pvm, STATUS_GPA);
    assert_eq!(status, STATUS);
    let iqh: u64 = read_guest(&pvm, 0x8000);
    assert_eq!(iqh, 64, "IQH after two 256-bit descriptors");
    assert_eq!(fsts, 0, "FSTS: no fault, no IQE");
    let ics: u32 = read_guest(&pvm, 0x800c);
    assert_eq!(ics & 1, 0, "ICS.IWC without IF");
    // The root table and the queue stay where the payload put them (the model only reads).
    let root: u64 = read_guest(&pvm, ROOT_GPA);
    let desc0: u64 = read_guest(&pvm, QUEUE_GPA);
    assert_eq!((root, desc0), (0, 0x11));

    // What the model counted.
    let (model, bridge) = dm.viommu_counters().unwrap();
    println!("{name}: model counters {model:?}");
    assert_eq!(model.doorbells, 1);
    assert_eq!(model.desc_context_cache, 1);
    assert_eq!(model.desc_wait, 1);
    assert_eq!(model.descriptors(), 2);
    assert_eq!(model.queue_errors, 0);
    assert_eq!(model.faults_recorded, 0);
    // No device behind it: nothing reached the host.
    assert_eq!(bridge.host_invalidation_calls, 0);
    let c = dm.counters();
    assert_eq!(c.iommu.guest_invalidation_descriptors, 2);
    let info = dm.iommu_info().viommu.unwrap();
    println!("{name}: vm.iommu viommu {info}");
    let ecap: Vec<String> = serde_json::from_value(info["ecap_names"].clone()).unwrap();
    assert!(ecap.iter().any(|n| n == "QI") && ecap.iter().any(|n| n == "SMTS"));
    assert!(!ecap.iter().any(|n| n == "FSTS"), "fsts=off: {ecap:?}");
}
