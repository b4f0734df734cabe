//! [`SwqDevice`]: the PCI function. Config space, BAR0 registers and MSI-X, and the portal
//! page (BAR2) on the vCPU side; descriptors on the worker thread of [`super::worker`].

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::cpu_pasid::{self, PasidTranslate};
use crate::pci::bar::{BarKind, PciBarInfo};
use crate::pci::config::{reg as creg, ConfigSpace};
use crate::pci::device::PciDevice;
use crate::pci::interrupt::InterruptSink;
use crate::pci::msix::MsixState;
use crate::sva::caps::{self, BarAccess, CapState};
use crate::sva::dma::DeviceDma;
use crate::sva::worker::lock;

use super::abi::{self, ctrl, reg, status, SubmitStatus, DESC_SIZE, PASID_MASK, PASID_VALID};
use super::portal::{Portal, Store};
use super::worker::{self, bump, Counters, Queue, Shared, SwqCounters};
use super::SwqError;

/// The portal BAR as the device declares it.
pub fn portal_bar() -> PciBarInfo {
    PciBarInfo {
        index: abi::PORTAL_BAR,
        kind: BarKind::Mem64,
        size: abi::PORTAL_SIZE,
        prefetchable: false,
    }
}

/// The reset-state config space: the SVA engine's (PCI Express RC integrated endpoint,
/// MSI-X with 2 vectors in BAR0, ATS, PASID with 20 bits, PRI) with this device's IDs and
/// the portal BAR added.
pub fn build_config() -> Result<ConfigSpace, SwqError> {
    let mut c = caps::build(20, 1)?;
    c.set_u16(creg::DEVICE_ID, abi::DEVICE_ID);
    c.set_u16(creg::SUBSYSTEM_ID, abi::DEVICE_ID);
    c.set_u8(creg::REVISION_ID, abi::REVISION);
    c.add_bar(&portal_bar());
    Ok(c)
}

/// A cloneable handle on a running device for the VMM (counters, introspection).
#[derive(Clone)]
pub struct SwqHandle {
    shared: Arc<Shared>,
}

impl SwqHandle {
    /// The device's counters.
    pub fn counters(&self) -> SwqCounters {
        self.shared.counters.snapshot()
    }

    /// Descriptors queued or in flight.
    pub fn occupancy(&self) -> u32 {
        lock(&self.shared.queue).occupancy()
    }
}

/// The emulated shared-work-queue device (see the module doc of [`super`] for the ABI).
pub struct SwqDevice {
    cfg: ConfigSpace,
    shared: Arc<Shared>,
    portal: Mutex<Portal>,
    translate: Arc<dyn PasidTranslate>,
    sink: Arc<dyn InterruptSink>,
    worker: Option<JoinHandle<()>>,
}

impl SwqDevice {
    /// A device whose DMA goes through `dma` addressed by HOST PASID, whose guest PASIDs
    /// are translated by `translate` (the VM's table), and whose MSI-X vectors go to
    /// `irq`. Starts the worker thread.
    pub fn new(
        dma: Arc<dyn DeviceDma>,
        irq: Arc<dyn InterruptSink>,
        translate: Arc<dyn PasidTranslate>,
    ) -> Result<Self, SwqError> {
        let cfg = build_config()?;
        let queue = Queue {
            caps: CapState::read(&cfg),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            wake: Default::default(),
            msix: Mutex::new(MsixState::new(caps::msix_cap())),
            counters: Counters::default(),
            dma,
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("swq-device".into())
            .spawn(move || worker::run(s))
            .map_err(|source| SwqError::Spawn { source })?;
        Ok(Self {
            cfg,
            shared,
            portal: Mutex::default(),
            translate,
            sink: irq,
            worker: Some(worker),
        })
    }

    /// A handle for the VMM.
    pub fn handle(&self) -> SwqHandle {
        SwqHandle {
            shared: self.shared.clone(),
        }
    }

    /// The device's counters.
    pub fn counters(&self) -> SwqCounters {
        self.shared.counters.snapshot()
    }

    /// Whether the worker thread is running (false after [`PciDevice::removed`]).
    pub fn worker_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    fn sync_caps(&self) {
        let caps = CapState::read(&self.cfg);
        lock(&self.shared.queue).caps = caps;
        self.shared.wake.notify_all();
    }

    /// A complete descriptor from the calling vCPU: the ENQCMD rule (the PASID word is
    /// the vCPU's IA32_PASID, translated to the host PASID; what the guest wrote there is
    /// ignored), then the queue. Never waits for DMA.
    fn submit(&self, mut desc: [u8; DESC_SIZE]) -> SubmitStatus {
        let c = &self.shared.counters;
        let refuse = |counter: &std::sync::atomic::AtomicU64, s: SubmitStatus| {
            bump(counter, 1);
            let mut q = lock(&self.shared.queue);
            q.rejected = q.rejected.wrapping_add(1);
            s
        };
        let open = {
            let q = lock(&self.shared.queue);
            q.enabled && q.caps.bus_master
        };
        if !open {
            return refuse(&c.disabled, SubmitStatus::Disabled);
        }
        let Some(guest) = cpu_pasid::current_pasid() else {
            return refuse(&c.no_pasid, SubmitStatus::NoPasid);
        };
        let host = self
            .translate
            .host_pasid(guest)
            .filter(|h| *h <= PASID_MASK);
        let Some(host) = host else {
            log::debug!("SWQ device: guest PASID {guest:#x} has no host translation");
            return refuse(&c.untranslated, SubmitStatus::Untranslated);
        };
        if let Some(w) = desc.get_mut(0..4) {
            w.copy_from_slice(&(host | PASID_VALID).to_le_bytes());
        }
        let mut q = lock(&self.shared.queue);
        if !(q.enabled && q.caps.bus_master) {
            drop(q);
            return refuse(&c.disabled, SubmitStatus::Disabled);
        }
        if q.occupancy() >= abi::WQ_SIZE {
            q.retries = q.retries.wrapping_add(1);
            bump(&c.retries, 1);
            return SubmitStatus::Retry;
        }
        let generation = q.generation;
        q.jobs.push_back(worker::Job { desc, generation });
        q.submitted = q.submitted.wrapping_add(1);
        bump(&c.submitted, 1);
        drop(q);
        self.shared.wake.notify_all();
        SubmitStatus::Accepted
    }

    fn portal_write(&self, off: u64, data: &[u8]) {
        let who = std::thread::current().id();
        let outcome = lock(&self.portal).store(who, off, data);
        let status = match outcome {
            Store::Staged => return,
            Store::Malformed => {
                bump(&self.shared.counters.malformed, 1);
                let mut q = lock(&self.shared.queue);
                q.malformed = q.malformed.wrapping_add(1);
                return;
            }
            Store::Complete(desc) => self.submit(*desc),
        };
        lock(&self.portal).set_status(who, status);
    }

    fn portal_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0);
        if off != abi::PORTAL_STATUS {
            return;
        }
        let s = lock(&self.portal)
            .status(std::thread::current().id())
            .code();
        for (d, b) in data.iter_mut().zip(s.to_le_bytes()) {
            *d = b;
        }
    }

    fn read_reg(&self, off: u64) -> u32 {
        let q = lock(&self.shared.queue);
        match off {
            reg::ID => abi::ID_VALUE,
            reg::STATUS => {
                (if q.enabled { status::ENABLED } else { 0 })
                    | (if q.busy { status::BUSY } else { 0 })
                    | (if q.error { status::ERROR } else { 0 })
            }
            reg::CTRL if q.enabled => ctrl::ENABLE,
            reg::WQ_SIZE => abi::WQ_SIZE,
            reg::OCCUPANCY => q.occupancy(),
            reg::SUBMITTED => q.submitted,
            reg::COMPLETED => q.completed,
            reg::RETRIES => q.retries,
            reg::REJECTED => q.rejected,
            reg::MALFORMED => q.malformed,
            _ => 0,
        }
    }

    /// A CTRL write. RESET wins over ENABLE in the same write.
    fn write_ctrl(&self, v: u32) {
        let mut q = lock(&self.shared.queue);
        let mut dropped = 0;
        if v & ctrl::RESET != 0 {
            dropped = q.drop_queued();
            q.enabled = false;
            q.error = false;
            q.submitted = 0;
            q.completed = 0;
            q.retries = 0;
            q.rejected = 0;
            q.malformed = 0;
        } else {
            if v & ctrl::CLEAR_ERROR != 0 {
                q.error = false;
            }
            let enable = v & ctrl::ENABLE != 0;
            if enable && !q.enabled {
                q.enabled = true;
                q.submitted = 0;
                q.completed = 0;
            } else if !enable && q.enabled {
                dropped = q.drop_queued();
                q.enabled = false;
            }
        }
        drop(q);
        bump(&self.shared.counters.abandoned, dropped);
        if v & ctrl::RESET != 0 {
            lock(&self.portal).reset();
        }
        self.shared.wake.notify_all();
    }

    fn stop_worker(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            if w.join().is_err() {
                log::warn!("SWQ device: the worker thread panicked");
            }
        }
    }
}

impl PciDevice for SwqDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.cfg.read_u32(reg_idx.saturating_mul(4))
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        caps::config_write(
            &mut self.cfg,
            &self.shared.msix,
            self.sink.as_ref(),
            (reg_idx, offset),
            data,
            "SWQ device",
        );
        self.sync_caps();
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        vec![caps::bar0(), portal_bar()]
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() > 8 {
            return;
        }
        if bar == abi::PORTAL_BAR {
            return self.portal_read(offset, data);
        }
        if bar != abi::REGS_BAR {
            return;
        }
        let (msix, sink) = (&self.shared.msix, self.sink.as_ref());
        if caps::msix_bar_access(msix, sink, offset, BarAccess::Read(data), "SWQ device") {
            return;
        }
        caps::read_dwords(offset, data, |o| self.read_reg(o));
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == abi::PORTAL_BAR {
            return self.portal_write(offset, data);
        }
        if bar != abi::REGS_BAR {
            return;
        }
        let (msix, sink) = (&self.shared.msix, self.sink.as_ref());
        if caps::msix_bar_access(msix, sink, offset, BarAccess::Write(data), "SWQ device") {
            return;
        }
        // CTRL is the only writable register: a dword at CTRL, or the low half of the
        // qword at CTRL (its high half, WQ_SIZE, is read-only).
        let lo = match (data.len(), offset) {
            (4 | 8, reg::CTRL) => data.get(0..4),
            _ => None,
        };
        if let Some(b) = lo.and_then(|b| <[u8; 4]>::try_from(b).ok()) {
            self.write_ctrl(u32::from_le_bytes(b));
        }
    }

    fn reset(&mut self) {
        self.write_ctrl(ctrl::RESET);
        lock(&self.shared.msix).reset(self.sink.as_ref());
        match build_config() {
            Ok(c) => self.cfg = c,
            Err(e) => log::warn!("SWQ device: config space rebuild: {e}"),
        }
        self.sync_caps();
    }

    fn removed(&mut self) {
        self.stop_worker();
        lock(&self.shared.msix).release(self.sink.as_ref());
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Drop for SwqDevice {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
