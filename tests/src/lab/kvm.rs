//! `/dev/kvm` inside L2 (nested through QEMU's emulated AMD SVM).

use kvm_ioctls::{Kvm, VcpuExit};

use crate::harness::{LabTest, Outcome, TestResult};

/// The KVM tests.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "l2_kvm_runs_payload",
        run: l2_kvm_runs_payload,
    }]
}

/// A real-mode payload: `mov dx,0x3f8; mov al,'K'; out dx,al; hlt` gives an IoOut exit with
/// the byte, then Hlt.
fn l2_kvm_runs_payload() -> TestResult {
    let kvm = Kvm::new()
        .map_err(|e| format!("open /dev/kvm: {e} (is kvm_amd loaded with nested SVM?)"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let size = 0x10000usize;
    // SAFETY: anonymous private mapping; result checked below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err("mmap guest memory failed".into());
    }
    let code: [u8; 8] = [0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xf4, 0xf4];
    // SAFETY: mem is a fresh writable mapping of `size` bytes; 0x1000 + 8 < size; no
    // reference to it exists and the guest is not running yet.
    unsafe {
        std::ptr::copy_nonoverlapping(code.as_ptr(), mem.cast::<u8>().add(0x1000), code.len())
    };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: mem as u64,
    };
    // SAFETY: the region is a valid mapping that outlives the VM (unmapped after it drops).
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    let mut regs = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    regs.rip = 0x1000;
    regs.rflags = 2;
    vcpu.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
    let mut saw_out = false;
    let mut result = Err("no exit seen".to_string());
    for _ in 0..16 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port != 0x3f8 || data != b"K" {
                    result = Err(format!("IoOut at {port:#x} with {data:?}, want 0x3f8 'K'"));
                    break;
                }
                saw_out = true;
            }
            Ok(VcpuExit::Hlt) => {
                result = if saw_out {
                    Ok(Outcome::Pass)
                } else {
                    Err("HLT before the OUT".into())
                };
                break;
            }
            Ok(other) => {
                result = Err(format!("unexpected exit {other:?}"));
                break;
            }
            Err(e) => {
                result = Err(format!("KVM_RUN: {e}"));
                break;
            }
        }
    }
    drop(vcpu);
    drop(vm);
    // SAFETY: the VM that used the mapping is gone.
    unsafe { libc::munmap(mem, size) };
    result
}
