//! Interrupt delivery: the GSI routing table, irqfds, and the small [`InterruptLine`] trait
//! devices raise interrupts through.
//!
//! KVM's `KVM_SET_GSI_ROUTING` replaces the whole table, so [`GsiRouter`] keeps the complete
//! table (the irqchip's default pin routes for GSI 0..24 plus every MSI route) and commits it
//! on each change, or once at the end of a batch ([`GsiRouter::begin_batch`]): a guest write
//! that enables 2048 MSI-X vectors is one commit, not 2048.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::layout::MSI_GSI_BASE;

/// Highest GSI we hand out (KVM allows 4096 routes here and in L2).
pub const MAX_GSI: u32 = 4095;
/// Number of IOAPIC pins (GSI 0..24).
pub const IOAPIC_PINS: u32 = 24;

/// Errors of interrupt routing.
#[derive(Debug, Error)]
pub enum IrqError {
    /// All GSIs are in use.
    #[error("No free GSI left for an MSI route (GSIs {MSI_GSI_BASE}..={MAX_GSI} are in use)")]
    NoFreeGsi,
    /// The GSI is not an allocated MSI GSI.
    #[error("GSI {gsi} is not an allocated MSI route")]
    UnknownGsi {
        /// The GSI.
        gsi: u32,
    },
    /// The routing table could not be built.
    #[error("Cannot build a GSI routing table of {entries} entries")]
    Table {
        /// How many entries it would have had.
        entries: usize,
    },
    /// `KVM_SET_GSI_ROUTING` failed.
    #[error("KVM_SET_GSI_ROUTING with {entries} routes failed")]
    SetRouting {
        /// How many entries the table had.
        entries: usize,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` assign failed.
    #[error("KVM_IRQFD assign to GSI {gsi} failed")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` deassign failed.
    #[error("KVM_IRQFD deassign from GSI {gsi} failed")]
    UnregisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Creating an eventfd failed.
    #[error("Cannot create an eventfd for GSI {gsi}")]
    EventFd {
        /// The GSI.
        gsi: u32,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// The VM has no irqchip, so GSIs cannot be routed.
    #[error("The VM has no in-kernel irqchip: GSI routes and irqfds are unavailable")]
    NoIrqchip,
}

/// An interrupt line a device raises. Edge semantics: each call is one interrupt.
pub trait InterruptLine: Send + Sync {
    /// Raises the interrupt once.
    fn trigger(&self) -> std::io::Result<()>;
}

/// An MSI message as a device programs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low 32 bits in `address as u32`, high in `address >> 32`).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// The VM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<RouterState>,
}

struct RouterState {
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    free: Vec<u32>,
    /// Open batches; changes wait for the outermost one to end.
    batch_depth: u32,
    /// A change waits for the batch's commit.
    dirty: bool,
    /// `KVM_SET_GSI_ROUTING` calls made.
    commits: u64,
}

impl std::fmt::Debug for GsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.state.lock().map(|s| s.msi.len()).unwrap_or(0);
        f.debug_struct("GsiRouter").field("msi_routes", &n).finish()
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The routes KVM installs by default with an in-kernel irqchip: GSI 0..16 to both PICs and
/// the IOAPIC, GSI 16..24 to the IOAPIC.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

impl GsiRouter {
    /// A router for `vm`, which must have an in-kernel irqchip.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            state: Mutex::new(RouterState {
                msi: BTreeMap::new(),
                next_gsi: MSI_GSI_BASE,
                free: Vec::new(),
                batch_depth: 0,
                dirty: false,
                commits: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RouterState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn commit(&self, state: &mut RouterState) -> Result<(), IrqError> {
        if state.batch_depth > 0 {
            state.dirty = true;
            return Ok(());
        }
        self.commit_now(state)
    }

    fn commit_now(&self, state: &mut RouterState) -> Result<(), IrqError> {
        state.dirty = false;
        state.commits += 1;
        let mut entries = default_irqchip_routes();
        entries.extend(state.msi.iter().map(|(&g, &m)| msi_entry(g, m)));
        let n = entries.len();
        let table =
            KvmIrqRouting::from_entries(&entries).map_err(|_| IrqError::Table { entries: n })?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| IrqError::SetRouting { entries: n, source })
    }

    /// Allocates a GSI and routes it to `msg`.
    pub fn add_msi_route(&self, msg: MsiMessage) -> Result<u32, IrqError> {
        let mut s = self.lock();
        let gsi = match s.free.pop() {
            Some(g) => g,
            None if s.next_gsi <= MAX_GSI => {
                s.next_gsi += 1;
                s.next_gsi - 1
            }
            None => return Err(IrqError::NoFreeGsi),
        };
        s.msi.insert(gsi, msg);
        if let Err(e) = self.commit(&mut s) {
            s.msi.remove(&gsi);
            s.free.push(gsi);
            return Err(e);
        }
        Ok(gsi)
    }

    /// Points an allocated MSI GSI at a new message (the guest reprogrammed the vector).
    pub fn update_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        let mut s = self.lock();
        let old = *s.msi.get(&gsi).ok_or(IrqError::UnknownGsi { gsi })?;
        s.msi.insert(gsi, msg);
        if let Err(e) = self.commit(&mut s) {
            s.msi.insert(gsi, old);
            return Err(e);
        }
        Ok(())
    }

    /// Removes an MSI route and frees its GSI.
    pub fn remove_msi_route(&self, gsi: u32) -> Result<(), IrqError> {
        let mut s = self.lock();
        s.msi.remove(&gsi).ok_or(IrqError::UnknownGsi { gsi })?;
        s.free.push(gsi);
        self.commit(&mut s)
    }

    /// Starts a batch: route changes are committed together when the outermost batch ends
    /// ([`Self::end_batch`]). A GSI added inside a batch does not deliver until then (KVM
    /// keeps an irqfd on an unrouted GSI inactive until the routing update). Batches are
    /// VM-wide: another device's change inside one waits for the same commit.
    pub fn begin_batch(&self) {
        let mut s = self.lock();
        s.batch_depth = s.batch_depth.saturating_add(1);
    }

    /// Ends a batch; the outermost one commits the table if anything changed.
    pub fn end_batch(&self) -> Result<(), IrqError> {
        let mut s = self.lock();
        s.batch_depth = s.batch_depth.saturating_sub(1);
        if s.batch_depth == 0 && s.dirty {
            return self.commit_now(&mut s);
        }
        Ok(())
    }

    /// `KVM_SET_GSI_ROUTING` calls made so far.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    /// The MSI routes currently installed, by GSI.
    pub fn msi_routes(&self) -> Vec<(u32, MsiMessage)> {
        self.lock().msi.iter().map(|(&g, &m)| (g, m)).collect()
    }

    /// Connects `fd` to `gsi`: each write to `fd` injects the GSI.
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|source| IrqError::RegisterIrqfd { gsi, source })
    }

    /// Disconnects `fd` from `gsi`.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), IrqError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|source| IrqError::UnregisterIrqfd { gsi, source })
    }

    /// Allocates an MSI route and an eventfd bound to it with an irqfd.
    pub fn create_msi_irqfd(self: &Arc<Self>, msg: MsiMessage) -> Result<MsiIrqfd, IrqError> {
        let gsi = self.add_msi_route(msg)?;
        let eventfd = match EventFd::new(libc::EFD_NONBLOCK) {
            Ok(e) => e,
            Err(source) => {
                let _ = self.remove_msi_route(gsi);
                return Err(IrqError::EventFd { gsi, source });
            }
        };
        if let Err(e) = self.register_irqfd(&eventfd, gsi) {
            let _ = self.remove_msi_route(gsi);
            return Err(e);
        }
        Ok(MsiIrqfd {
            router: self.clone(),
            gsi,
            eventfd,
        })
    }
}

/// An MSI vector: a GSI routed to an MSI message plus the eventfd that fires it. The route
/// and irqfd are removed on drop.
#[derive(Debug)]
pub struct MsiIrqfd {
    router: Arc<GsiRouter>,
    gsi: u32,
    eventfd: EventFd,
}

impl MsiIrqfd {
    /// The GSI of this vector.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// The eventfd; hand it to VFIO (`VFIO_DEVICE_SET_IRQS`) so the device interrupts the guest
    /// without a trip through the VMM.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Re-targets the vector.
    pub fn update(&self, msg: MsiMessage) -> Result<(), IrqError> {
        self.router.update_msi_route(self.gsi, msg)
    }
}

impl InterruptLine for MsiIrqfd {
    fn trigger(&self) -> std::io::Result<()> {
        self.eventfd.write(1)
    }
}

impl Drop for MsiIrqfd {
    fn drop(&mut self) {
        if let Err(e) = self.router.unregister_irqfd(&self.eventfd, self.gsi) {
            log::warn!("{e}");
        }
        if let Err(e) = self.router.remove_msi_route(self.gsi) {
            log::warn!("{e}");
        }
    }
}

/// A legacy irqchip pin (e.g. GSI 4 for COM1) raised through an irqfd.
#[derive(Debug)]
pub struct IrqfdLine {
    gsi: u32,
    eventfd: EventFd,
}

impl IrqfdLine {
    /// Creates an eventfd and binds it to `gsi` with an irqfd.
    pub fn new(router: &GsiRouter, gsi: u32) -> Result<Self, IrqError> {
        let eventfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| IrqError::EventFd { gsi, source })?;
        router.register_irqfd(&eventfd, gsi)?;
        Ok(Self { gsi, eventfd })
    }

    /// The GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl InterruptLine for IrqfdLine {
    fn trigger(&self) -> std::io::Result<()> {
        self.eventfd.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_cover_pic_and_ioapic() {
        let r = default_irqchip_routes();
        // 16 PIC + 24 IOAPIC.
        assert_eq!(r.len(), 40);
        // SAFETY: these entries were built as irqchip routes.
        let (chip, pin) = unsafe { (r[0].u.irqchip.irqchip, r[0].u.irqchip.pin) };
        assert_eq!((r[0].gsi, chip, pin), (0, KVM_IRQCHIP_PIC_MASTER, 0));
        let e = r.iter().rfind(|e| e.gsi == 23);
        assert!(e.is_some_and(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }

    #[test]
    fn msi_entry_splits_address() {
        let e = msi_entry(
            30,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        // SAFETY: built as an MSI route.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
    }
}
