//! The vIOMMU's own interrupts (fault event, invalidation completion, page request event)
//! through `KVM_SIGNAL_MSI`.

use std::sync::Arc;

use devices::pci::MsiMessage;
use devices::viommu::MsiSignal;
use kvm_bindings::kvm_msi;
use kvm_ioctls::VmFd;
use log::warn;

/// [`MsiSignal`] over the VM's KVM fd.
#[derive(Debug, Clone)]
pub struct KvmMsiSignal {
    vm: Arc<VmFd>,
}

impl KvmMsiSignal {
    /// MSIs of the VM behind `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        KvmMsiSignal { vm }
    }
}

impl MsiSignal for KvmMsiSignal {
    fn signal(&self, msg: MsiMessage) {
        let msi = kvm_msi {
            address_lo: msg.address as u32,
            address_hi: (msg.address >> 32) as u32,
            data: msg.data,
            ..Default::default()
        };
        match self.vm.signal_msi(msi) {
            // 0: the guest blocked the interrupt (masked or no destination); not an error.
            Ok(_) => {}
            Err(e) => warn!(
                "vIOMMU MSI to {:#x} data {:#x} was not delivered: {e}",
                msg.address, msg.data
            ),
        }
    }
}
