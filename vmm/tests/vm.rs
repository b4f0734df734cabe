//! VM construction on the host's /dev/kvm: irqchip VMs with several vCPUs, RAM slots split
//! around the PCI hole, and interrupt routing.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use vm_memory::{Bytes, GuestAddress};
use vmm::irq::MsiMessage;
use vmm::memory::RamConfig;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::kvm_available;

#[test]
fn irqchip_vm_sets_lint0_extint_and_lint1_nmi() {
    if !kvm_available("irqchip_vm_sets_lint0_extint_and_lint1_nmi") {
        return;
    }
    let vm = Vm::new(VmOptions {
        vcpus: 2,
        ram: RamConfig {
            size: 64 << 20,
            hugepages: false,
        },
        irqchip: IrqchipMode::InKernel,
    })
    .unwrap();
    assert_eq!(vm.vcpus().len(), 2);
    for v in vm.vcpus() {
        let lapic = v.fd().get_lapic().unwrap();
        let reg = |off: usize| {
            u32::from_le_bytes([
                lapic.regs[off] as u8,
                lapic.regs[off + 1] as u8,
                lapic.regs[off + 2] as u8,
                lapic.regs[off + 3] as u8,
            ])
        };
        assert_eq!(
            (reg(0x350) >> 8) & 7,
            7,
            "vCPU {}: LINT0 not ExtINT",
            v.id()
        );
        assert_eq!((reg(0x360) >> 8) & 7, 4, "vCPU {}: LINT1 not NMI", v.id());
        // CPUID leaf 1 reports this vCPU's APIC ID and the hypervisor bit.
        let cpuid = v.fd().get_cpuid2(80).unwrap();
        let l1 = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .copied()
            .unwrap();
        assert_eq!(l1.ebx >> 24, u32::from(v.id()));
        assert_ne!(l1.ecx & (1 << 31), 0);
    }
}

#[test]
fn ram_above_4g_is_registered_and_usable() {
    if !kvm_available("ram_above_4g_is_registered_and_usable") {
        return;
    }
    // 3 GiB + 64 MiB: the last 64 MiB live above 4 GiB (MAP_NORESERVE keeps it cheap).
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: (3 << 30) + (64 << 20),
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .unwrap();
    let r = vm.ram_regions();
    assert_eq!(r.len(), 2);
    assert_eq!(r[1].gpa, 4 << 30);
    vm.ram()
        .memory()
        .write_obj(0x55aa_u16, GuestAddress((4 << 30) + 0x100))
        .unwrap();
    assert!(vm.gsi_router().is_err());
}

#[test]
fn msi_routes_allocate_update_and_free() {
    if !kvm_available("msi_routes_allocate_update_and_free") {
        return;
    }
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: 16 << 20,
            hugepages: false,
        },
        irqchip: IrqchipMode::InKernel,
    })
    .unwrap();
    let router = vm.gsi_router().unwrap().clone();
    let a = router
        .create_msi_irqfd(MsiMessage {
            address: 0xfee0_0000,
            data: 0x30,
        })
        .unwrap();
    let b = router
        .create_msi_irqfd(MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        })
        .unwrap();
    assert_ne!(a.gsi(), b.gsi());
    b.update(MsiMessage {
        address: 0xfee0_1000,
        data: 0x32,
    })
    .unwrap();
    let routes = router.msi_routes();
    assert_eq!(routes.len(), 2);
    assert!(routes.contains(&(
        b.gsi(),
        MsiMessage {
            address: 0xfee0_1000,
            data: 0x32
        }
    )));
    let freed = a.gsi();
    drop(a);
    assert_eq!(router.msi_routes().len(), 1);
    // The freed GSI is reused.
    let c = router
        .create_msi_irqfd(MsiMessage {
            address: 0xfee0_0000,
            data: 0x33,
        })
        .unwrap();
    assert_eq!(c.gsi(), freed);
    assert!(router
        .update_msi_route(4000, MsiMessage::default())
        .is_err());
}

#[test]
fn stop_reaches_waiting_application_processors() {
    if !kvm_available("stop_reaches_waiting_application_processors") {
        return;
    }
    let mut vm = Vm::new(VmOptions {
        vcpus: 3,
        ram: RamConfig {
            size: 16 << 20,
            hugepages: false,
        },
        irqchip: IrqchipMode::InKernel,
    })
    .unwrap();
    // The BSP spins (1: jmp 1b); the APs wait for INIT/SIPI inside KVM_RUN.
    let entry = vmm::boot::payload::load_payload(
        vm.ram(),
        &[0xeb, 0xfe],
        0x1000,
        vmm::boot::payload::PayloadMode::Real,
    )
    .unwrap();
    let running = vm.start(&entry).unwrap();
    assert!(matches!(
        vm.start(&entry),
        Err(vmm::vm::VmError::AlreadyStarted)
    ));
    std::thread::sleep(std::time::Duration::from_millis(100));
    running.stop();
    let exit = running.wait();
    assert_eq!(exit.reports.len(), 3);
    for r in &exit.reports {
        assert!(
            matches!(r.result, Ok(vmm::vcpu::VcpuStop::Kicked)),
            "vCPU {}: {:?}",
            r.id,
            r.result
        );
    }
}
