//! The KVM [`BarMapper`]: the mmap-able windows of an assigned device's BARs become KVM user
//! memory slots, so guest accesses to them never exit to the VMM.
//!
//! Slot numbers come from the VM's [`MemorySlots`] (above the RAM slots). The model calls
//! `map` when a BAR becomes decoded (or moves) and `unmap` when it stops being decoded, moves
//! away or the device is removed; [`KvmBarMapper::unmap_all`] is the safety net on removal.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::vfio::BarMapper;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use log::{info, warn};

use crate::vm::MemorySlots;

/// One installed window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedWindow {
    /// KVM slot.
    pub slot: u32,
    /// Guest physical address.
    pub guest_addr: u64,
    /// Host virtual address.
    pub host_addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// The BAR mapper of one device.
pub struct KvmBarMapper {
    device: String,
    vm: Arc<VmFd>,
    slots: Arc<MemorySlots>,
    windows: Mutex<BTreeMap<u64, MappedWindow>>,
}

impl std::fmt::Debug for KvmBarMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmBarMapper")
            .field("device", &self.device)
            .field("windows", &*self.lock())
            .finish()
    }
}

impl KvmBarMapper {
    /// A mapper for `device` (its id, for logs) installing slots in `vm`.
    pub fn new(device: &str, vm: Arc<VmFd>, slots: Arc<MemorySlots>) -> Self {
        Self {
            device: device.to_string(),
            vm,
            slots,
            windows: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, MappedWindow>> {
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_region(&self, slot: u32, guest_addr: u64, host_addr: u64, len: u64) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: `host_addr..+len` is a shared mapping of device memory (a VFIO BAR mmap) that
        // the device model owns and unmaps only after calling `unmap` here; Rust never holds a
        // reference into it (the model uses volatile accesses). If the mapping vanished first,
        // KVM's MMU notifier drops the pages and guest accesses fault: nothing in this process
        // is corrupted. A zero `len` deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    /// The windows installed now.
    pub fn windows(&self) -> Vec<MappedWindow> {
        self.lock().values().copied().collect()
    }

    /// Removes every window (device removal).
    pub fn unmap_all(&self) {
        let all: Vec<MappedWindow> = self.windows();
        for w in all {
            if let Err(e) = self.unmap(w.guest_addr, w.len) {
                warn!("{}: {e}", self.device);
            }
        }
    }
}

impl BarMapper for KvmBarMapper {
    fn map(&self, guest_addr: u64, host_addr: u64, len: u64) -> io::Result<()> {
        let mut windows = self.lock();
        if windows.contains_key(&guest_addr) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("A BAR window is already mapped at {guest_addr:#x}"),
            ));
        }
        let slot = self.slots.allocate().ok_or_else(|| {
            io::Error::other(format!(
                "No free KVM memory slot for the BAR window at {guest_addr:#x}"
            ))
        })?;
        if let Err(e) = self.set_region(slot, guest_addr, host_addr, len) {
            self.slots.free(slot);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "KVM_SET_USER_MEMORY_REGION slot {slot} at {guest_addr:#x}+{len:#x} failed: {e}"
                ),
            ));
        }
        info!(
            "{}: BAR window mapped at GPA {guest_addr:#x}+{len:#x} (KVM slot {slot})",
            self.device
        );
        windows.insert(
            guest_addr,
            MappedWindow {
                slot,
                guest_addr,
                host_addr,
                len,
            },
        );
        Ok(())
    }

    fn unmap(&self, guest_addr: u64, _len: u64) -> io::Result<()> {
        let mut windows = self.lock();
        let Some(w) = windows.remove(&guest_addr) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("No BAR window is mapped at {guest_addr:#x}"),
            ));
        };
        // Deleting a slot: size 0 (the address must still be given but is not used).
        if let Err(e) = self.set_region(w.slot, w.guest_addr, w.host_addr, 0) {
            windows.insert(guest_addr, w);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "Deleting KVM slot {} at {guest_addr:#x} failed: {e}",
                    w.slot
                ),
            ));
        }
        self.slots.free(w.slot);
        info!(
            "{}: BAR window unmapped from GPA {guest_addr:#x} (KVM slot {})",
            self.device, w.slot
        );
        Ok(())
    }
}

impl Drop for KvmBarMapper {
    fn drop(&mut self) {
        self.unmap_all();
    }
}
