//! Payload tests on the host's real /dev/kvm: small guest programs exercise the vCPU run
//! loop, the buses, the serial port, long mode and MSI delivery through an irqfd.
//!
//! Each payload is hand-assembled; the assembly is in the comment next to its bytes.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::BusDevice;
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA, DEFAULT_REAL_GPA};
use vmm::irq::{InterruptLine, MsiMessage};
use vmm::runner::PayloadVm;
use vmm::vcpu::VcpuStop;
use vmm::vm::{IrqchipMode, StopReason};

use common::{
    assert_halted, assert_msi_handler_ran, kvm_available, read_guest, run_msi_payload, write_idt,
    HANG_GUARD, MEM, MSI_VECTOR,
};

/// Runs `code` on a fresh VM, after `setup` registers devices. Breaks hangs with a stop.
fn run(
    code: &[u8],
    gpa: u64,
    mode: PayloadMode,
    irqchip: IrqchipMode,
    setup: impl FnOnce(&vmm::vm::Vm),
) -> (PayloadVm, vmm::runner::PayloadOutcome) {
    let mut pvm = PayloadVm::new(MEM, irqchip).unwrap();
    setup(pvm.vm());
    let running = pvm.start(code, gpa, mode).unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    (pvm, out)
}

/// A device that records writes and answers reads with a fixed pattern.
struct Recorder {
    writes: Vec<(u64, u64, Vec<u8>)>,
    answer: u64,
}

impl BusDevice for Recorder {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = self.answer.wrapping_add(offset);
        let bytes = v.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.writes.push((base, offset, data.to_vec()));
    }
}

#[test]
fn real_mode_payload_writes_hi_to_serial() {
    if !kvm_available("real_mode_payload_writes_hi_to_serial") {
        return;
    }
    // mov dx,0x3f8; mov al,'H'; out dx,al; mov al,'i'; out dx,al; hlt
    let code = [0xba, 0xf8, 0x03, 0xb0, 0x48, 0xee, 0xb0, 0x69, 0xee, 0xf4];
    let (_vm, out) = run(
        &code,
        DEFAULT_REAL_GPA,
        PayloadMode::Real,
        IrqchipMode::Off,
        |_| {},
    );
    println!("exit: {:?}, serial {:?}", out.exit, out.serial);
    assert_halted(&out);
    assert_eq!(out.serial, b"Hi");
    let r = out.exit.first_report().unwrap();
    assert_eq!(r.exits.io_out, 2);
}

#[test]
fn pio_read_returns_device_answer_into_guest_memory() {
    if !kvm_available("pio_read_returns_device_answer_into_guest_memory") {
        return;
    }
    // mov dx,0x510; in eax,dx; mov [0x8000],eax; in al,dx; mov [0x8004],al; hlt
    let code = [
        0xba, 0x10, 0x05, 0x66, 0xed, 0x66, 0xa3, 0x00, 0x80, 0xec, 0xa2, 0x04, 0x80, 0xf4,
    ];
    let dev = Arc::new(Mutex::new(Recorder {
        writes: Vec::new(),
        answer: 0xa1b2_c3d4,
    }));
    let d = dev.clone();
    let (pvm, out) = run(
        &code,
        DEFAULT_REAL_GPA,
        PayloadMode::Real,
        IrqchipMode::Off,
        |vm| {
            vm.add_pio_device(d, 0x510, 4).unwrap();
        },
    );
    assert_halted(&out);
    let dword: u32 = read_guest(&pvm, 0x8000);
    let byte: u8 = read_guest(&pvm, 0x8004);
    assert_eq!(dword, 0xa1b2_c3d4);
    assert_eq!(byte, 0xd4);
    assert_eq!(out.exit.first_report().unwrap().exits.io_in, 2);
}

#[test]
fn long_mode_payload_mmio_write_and_read_reach_bus_device() {
    if !kvm_available("long_mode_payload_mmio_write_and_read_reach_bus_device") {
        return;
    }
    // mov rbx,0xd0000010; mov dword [rbx],0x12345678; mov rax,[rbx+8]; mov [0x8000],rax
    // xor ecx,ecx; xor eax,eax; 1: inc ecx; add rax,rcx; cmp ecx,100; jne 1b
    // mov [0x8008],rax; mov dx,0x3f8; mov al,'L'; out dx,al; mov al,'M'; out dx,al; hlt
    let code = [
        0x48, 0xbb, 0x10, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x78, 0x56, 0x34,
        0x12, 0x48, 0x8b, 0x43, 0x08, 0x48, 0x89, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00, 0x31, 0xc9,
        0x31, 0xc0, 0xff, 0xc1, 0x48, 0x01, 0xc8, 0x83, 0xf9, 0x64, 0x75, 0xf6, 0x48, 0x89, 0x04,
        0x25, 0x08, 0x80, 0x00, 0x00, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4c, 0xee, 0xb0, 0x4d, 0xee,
        0xf4,
    ];
    let dev = Arc::new(Mutex::new(Recorder {
        writes: Vec::new(),
        answer: 0x1122_3344_5566_7700,
    }));
    let d = dev.clone();
    let (pvm, out) = run(
        &code,
        DEFAULT_LONG_GPA,
        PayloadMode::Long,
        IrqchipMode::Off,
        |vm| {
            vm.add_mmio_device(d, 0xd000_0000, 0x1000).unwrap();
        },
    );
    println!("exit: {:?}, serial {:?}", out.exit, out.serial);
    assert_halted(&out);
    assert_eq!(out.serial, b"LM");
    let writes = dev.lock().unwrap().writes.clone();
    assert_eq!(
        writes,
        vec![(0xd000_0000, 0x10, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
    let read_back: u64 = read_guest(&pvm, 0x8000);
    assert_eq!(read_back, 0x1122_3344_5566_7700 + 0x18);
    let sum: u64 = read_guest(&pvm, 0x8008);
    assert_eq!(sum, 5050);
    let e = out.exit.first_report().unwrap().exits;
    assert_eq!((e.mmio_write, e.mmio_read), (1, 1));
}

#[test]
fn stop_kicks_a_spinning_vcpu() {
    if !kvm_available("stop_kicks_a_spinning_vcpu") {
        return;
    }
    // 1: jmp 1b
    let code = [0xeb, 0xfe];
    let mut pvm = PayloadVm::new(MEM, IrqchipMode::Off).unwrap();
    let running = pvm
        .start(&code, DEFAULT_REAL_GPA, PayloadMode::Real)
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    running.stop();
    let out = pvm.finish(running);
    assert!(
        matches!(out.stop(), Some(Ok(VcpuStop::Kicked))),
        "{:?}",
        out.exit
    );
    assert_eq!(out.exit.requested, Some(StopReason::Requested));
}

#[test]
fn unclaimed_port_reads_all_ones() {
    if !kvm_available("unclaimed_port_reads_all_ones") {
        return;
    }
    // mov dx,0x510; in eax,dx; mov [0x8000],eax; ... (same as the PIO test, no device)
    let code = [
        0xba, 0x10, 0x05, 0x66, 0xed, 0x66, 0xa3, 0x00, 0x80, 0xec, 0xa2, 0x04, 0x80, 0xf4,
    ];
    let (pvm, out) = run(
        &code,
        DEFAULT_REAL_GPA,
        PayloadMode::Real,
        IrqchipMode::Off,
        |_| {},
    );
    assert_halted(&out);
    let v: u32 = read_guest(&pvm, 0x8000);
    assert_eq!(v, 0xffff_ffff);
    assert_eq!(out.exit.first_report().unwrap().exits.unclaimed, 2);
}

#[test]
fn msi_through_irqfd_reaches_guest_idt_handler() {
    let name = "msi_through_irqfd_reaches_guest_idt_handler";
    let Some((pvm, out, (router, msi))) = run_msi_payload(
        name,
        |vm| {
            let router = vm.gsi_router().unwrap().clone();
            // Fixed delivery, physical destination APIC ID 0, edge.
            let msi = router
                .create_msi_irqfd(MsiMessage {
                    address: 0xfee0_0000,
                    data: u32::from(MSI_VECTOR),
                })
                .unwrap();
            assert!(msi.gsi() >= vmm::layout::MSI_GSI_BASE);
            assert_eq!(router.msi_routes().len(), 1);
            (router, msi)
        },
        |(_, msi)| msi.trigger().unwrap(),
    ) else {
        return;
    };
    assert_msi_handler_ran(name, &pvm, &out);
    drop(msi);
    assert!(router.msi_routes().is_empty());
}

#[test]
fn serial_thre_interrupt_reaches_guest_through_ioapic_gsi4() {
    let name = "serial_thre_interrupt_reaches_guest_through_ioapic_gsi4";
    if !kvm_available(name) {
        return;
    }
    // mov al,0xff; out 0x21,al; out 0xa1,al (mask both PICs); lidt [0x3000]
    // mov rbx,0xfee000f0; mov dword [rbx],0x1ff (LAPIC on)
    // mov rbx,0xfec00000; IOREGSEL=0x18, IOWIN=0x41; IOREGSEL=0x19, IOWIN=0
    //   (IOAPIC pin 4: vector 0x41, fixed, edge, unmasked, destination APIC 0); sti
    // mov dx,0x3f9; mov al,2; out dx,al (COM1 IER = THRE); 2: hlt; jmp 2b
    // .balign 64 (to 0x80) handler: mov dx,0x3fa; in al,dx; mov [0x8000],al (IIR)
    // mov rbx,0xfee000b0; mov dword [rbx],0 (EOI); mov dx,0x501; mov al,0x43; out dx,al
    let code = [
        0xb0, 0xff, 0xe6, 0x21, 0xe6, 0xa1, 0x0f, 0x01, 0x1c, 0x25, 0x00, 0x30, 0x00, 0x00, 0x48,
        0xbb, 0xf0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0xff, 0x01, 0x00, 0x00,
        0x48, 0xbb, 0x00, 0x00, 0xc0, 0xfe, 0x00, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x18, 0x00, 0x00,
        0x00, 0xc7, 0x43, 0x10, 0x41, 0x00, 0x00, 0x00, 0xc7, 0x03, 0x19, 0x00, 0x00, 0x00, 0xc7,
        0x43, 0x10, 0x00, 0x00, 0x00, 0x00, 0xfb, 0x66, 0xba, 0xf9, 0x03, 0xb0, 0x02, 0xee, 0xf4,
        0xeb, 0xfd, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x66,
        0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x0f, 0x1f, 0x80, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba, 0xfa, 0x03, 0xec, 0x88, 0x04,
        0x25, 0x00, 0x80, 0x00, 0x00, 0x48, 0xbb, 0xb0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00,
        0xc7, 0x03, 0x00, 0x00, 0x00, 0x00, 0x66, 0xba, 0x01, 0x05, 0xb0, 0x43, 0xee, 0xf4, 0xeb,
        0xfd,
    ];
    let (pvm, out) = run(
        &code,
        DEFAULT_LONG_GPA,
        PayloadMode::Long,
        IrqchipMode::InKernel,
        |vm| write_idt(vm, 0x41, DEFAULT_LONG_GPA + 0x80),
    );
    println!("{name}: exit {:?}", out.exit);
    if let Some(Err(e)) = out.stop() {
        panic!("{name}: the payload failed: {e}");
    }
    let iir: u8 = read_guest(&pvm, 0x8000);
    assert_eq!(
        out.guest_exit_code(),
        Some(0x43),
        "{name}: the serial interrupt handler did not run: {:?}",
        out.exit
    );
    // The handler saw "THR empty" as the pending interrupt.
    assert_eq!(iir, 0x02);
}

#[test]
fn internal_error_is_decoded_with_suberror_and_rip() {
    if !kvm_available("internal_error_is_decoded_with_suberror_and_rip") {
        return;
    }
    // mov rbx,0xd0000000; crc32 eax,byte [rbx]; hlt
    // KVM's instruction emulator has no CRC32, so the MMIO access cannot be emulated.
    let code = [
        0x48, 0xbb, 0x00, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, 0xf2, 0x0f, 0x38, 0xf0, 0x03,
        0xf4,
    ];
    let (_vm, out) = run(
        &code,
        DEFAULT_LONG_GPA,
        PayloadMode::Long,
        IrqchipMode::Off,
        |_| {},
    );
    match out.stop() {
        Some(Err(vmm::vcpu::VcpuError::InternalError {
            suberror,
            name,
            rip,
            ..
        })) => {
            println!("internal error: suberror {suberror} ({name}) at {rip:#x}");
            assert_eq!(*suberror, 1);
            assert_eq!(*name, "instruction emulation failed");
            assert_eq!(*rip, DEFAULT_LONG_GPA + 10);
            let msg = out.stop().unwrap().as_ref().unwrap_err().to_string();
            assert!(msg.contains("suberror 1"), "{msg}");
        }
        other => panic!("expected a KVM internal error, got {other:?}"),
    }
}

#[test]
fn triple_fault_reports_shutdown() {
    if !kvm_available("triple_fault_reports_shutdown") {
        return;
    }
    // ud2 with an IDT that has no #UD, #GP or #DF gate: a triple fault.
    let (_vm, out) = run(
        &[0x0f, 0x0b],
        DEFAULT_LONG_GPA,
        PayloadMode::Long,
        IrqchipMode::Off,
        |_| {},
    );
    assert!(
        matches!(out.stop(), Some(Ok(VcpuStop::Shutdown))),
        "{:?}",
        out.exit
    );
}

#[test]
fn acpi_s5_write_powers_off() {
    if !kvm_available("acpi_s5_write_powers_off") {
        return;
    }
    // mov dx,0x600; mov al,0x34 (SLP_TYP=5, SLP_EN); out dx,al; 1: jmp 1b
    let code = [0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xeb, 0xfe];
    let (_vm, out) = run(
        &code,
        DEFAULT_REAL_GPA,
        PayloadMode::Real,
        IrqchipMode::Off,
        |vm| {
            let pm = vmm::acpi::AcpiPmDevice::new(vm.stopper().clone());
            vm.add_pio_device(
                Arc::new(Mutex::new(pm)),
                vmm::layout::ACPI_SLEEP_CONTROL_PORT,
                3,
            )
            .unwrap();
        },
    );
    assert_eq!(
        out.exit.requested,
        Some(StopReason::GuestPowerOff),
        "{:?}",
        out.exit
    );
}
