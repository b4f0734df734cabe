//! [`SvaEngine`]: the PCI function. Config space (with the capabilities of [`super::caps`]),
//! BAR0 registers and the MSI-X table on the vCPU side; descriptors on the worker thread
//! of [`super::worker`].

use std::any::Any;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ioasid::Pasid;

use crate::pci::bar::PciBarInfo;
use crate::pci::config::ConfigSpace;
use crate::pci::device::PciDevice;
use crate::pci::interrupt::InterruptSink;
use crate::pci::msix::MsixState;
use crate::viommu::DmaView;

use super::abi::{self, ctrl, reg, status};
use super::caps::{self, BarAccess, CapState};
use super::dma::{DeviceDma, ViewDma};
use super::worker::{self, lock, Counters, Regs, Shared, SvaCounters};
use super::{SvaError, SvaOptions};

/// A cloneable handle on a running engine for the VMM: counters and the ATS hook, usable
/// without the PCI bus's lock on the device.
#[derive(Clone)]
pub struct SvaHandle {
    shared: Arc<Shared>,
}

impl SvaHandle {
    /// The engine's counters.
    pub fn counters(&self) -> SvaCounters {
        self.shared.counters.snapshot()
    }

    /// A device-TLB (ATS) invalidation the guest queued for this device (`pasid` for a
    /// PASID-based one; `npages` 4 KiB pages from `addr`, `u64::MAX` for all). The engine
    /// keeps no private translation cache: every access is translated by the vIOMMU path
    /// at the time it is made, so there is nothing to drop and the invalidation is complete
    /// when this returns. Call it when the vIOMMU's QI sees a device-TLB descriptor for the
    /// engine's BDF, before completing the guest's wait descriptor.
    pub fn invalidate_device_tlb(&self, pasid: Option<Pasid>, addr: u64, npages: u64) {
        let _ = (pasid, addr, npages);
        self.shared
            .counters
            .device_tlb_invalidations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the worker is inside a descriptor (STATUS.BUSY).
    pub fn busy(&self) -> bool {
        lock(&self.shared.regs).busy
    }
}

/// The emulated PCIe SVA copy engine (see the module doc of [`super`] for the ABI).
pub struct SvaEngine {
    cfg: ConfigSpace,
    shared: Arc<Shared>,
    sink: Arc<dyn InterruptSink>,
    worker: Option<JoinHandle<()>>,
}

impl SvaEngine {
    /// An engine whose DMA goes through the vIOMMU's `dma` view (its `read_with` /
    /// `write_with` carry the privileged and PRI attributes) and whose MSI-X vectors go to
    /// `irq`. Starts the worker thread.
    pub fn new(
        dma: Arc<dyn DmaView>,
        irq: Arc<dyn InterruptSink>,
        opts: SvaOptions,
    ) -> Result<Self, SvaError> {
        Self::with_dma(Arc::new(ViewDma(dma)), irq, opts)
    }

    /// An engine over any [`DeviceDma`] (tests, or a path that is not a `DmaView`).
    pub fn with_dma(
        dma: Arc<dyn DeviceDma>,
        irq: Arc<dyn InterruptSink>,
        opts: SvaOptions,
    ) -> Result<Self, SvaError> {
        opts.validate()?;
        let cfg = caps::build(opts.max_pasid_bits, opts.pri_capacity)?;
        let regs = Regs {
            caps: CapState::read(&cfg),
            ..Default::default()
        };
        let shared = Arc::new(Shared {
            regs: Mutex::new(regs),
            wake: Default::default(),
            msix: Mutex::new(MsixState::new(caps::msix_cap())),
            counters: Counters::default(),
            dma,
            opts,
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("sva-engine".into())
            .spawn(move || worker::run(s))
            .map_err(|source| SvaError::Spawn { source })?;
        Ok(Self {
            cfg,
            shared,
            sink: irq,
            worker: Some(worker),
        })
    }

    /// A handle for the VMM (counters, device-TLB invalidation).
    pub fn handle(&self) -> SvaHandle {
        SvaHandle {
            shared: self.shared.clone(),
        }
    }

    /// The engine's counters.
    pub fn counters(&self) -> SvaCounters {
        self.shared.counters.snapshot()
    }

    /// See [`SvaHandle::invalidate_device_tlb`].
    pub fn invalidate_device_tlb(&self, pasid: Option<Pasid>, addr: u64, npages: u64) {
        self.handle().invalidate_device_tlb(pasid, addr, npages);
    }

    /// The decoded capability state (PASID/PRI/ATS enables as the guest wrote them).
    pub fn cap_state(&self) -> CapState {
        CapState::read(&self.cfg)
    }

    /// Whether the worker thread is running (false after [`PciDevice::removed`]).
    pub fn worker_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|w| !w.is_finished())
    }

    fn sync_caps(&self) {
        let caps = CapState::read(&self.cfg);
        lock(&self.shared.regs).caps = caps;
        self.shared.wake.notify_all();
    }

    fn read_reg(&self, off: u64) -> u32 {
        let r = lock(&self.shared.regs);
        match off {
            reg::ID => abi::ID_VALUE,
            reg::STATUS => {
                (if r.enabled { status::ENABLED } else { 0 })
                    | (if r.busy { status::BUSY } else { 0 })
                    | (if r.error { status::ERROR } else { 0 })
            }
            reg::CTRL if r.enabled => ctrl::ENABLE,
            reg::RING_BASE => r.ring_base as u32,
            reg::RING_BASE_HI => (r.ring_base >> 32) as u32,
            reg::RING_SIZE => r.ring_size,
            reg::RING_HEAD => r.head,
            reg::RING_TAIL => r.tail,
            reg::COMPLETED => r.completed,
            reg::PRQ_STATS => r.prq_stats,
            _ => 0,
        }
    }

    fn ring_mask(size: u32) -> u32 {
        if size.is_power_of_two() && (abi::RING_MIN..=abi::RING_MAX).contains(&size) {
            size - 1
        } else {
            abi::RING_MAX - 1
        }
    }

    /// A CTRL write. RESET wins over ENABLE in the same write.
    fn write_ctrl(r: &mut Regs, v: u32) {
        if v & ctrl::RESET != 0 {
            r.generation = r.generation.wrapping_add(1);
            r.enabled = false;
            r.head = 0;
            r.tail = 0;
            r.completed = 0;
            r.prq_stats = 0;
            r.error = false;
            return;
        }
        if v & ctrl::CLEAR_ERROR != 0 {
            r.error = false;
        }
        let enable = v & ctrl::ENABLE != 0;
        if enable && !r.enabled {
            let size = r.ring_size;
            let size_ok = size.is_power_of_two() && (abi::RING_MIN..=abi::RING_MAX).contains(&size);
            if !size_ok || !r.ring_base.is_multiple_of(abi::RING_ALIGN) {
                r.error = true;
                return;
            }
            r.enabled = true;
            r.completed = 0;
            r.prq_stats = 0;
            r.head &= size - 1;
            r.tail &= size - 1;
        } else if !enable {
            r.enabled = false;
        }
    }

    fn write_reg(&self, off: u64, v: u32) {
        let mut r = lock(&self.shared.regs);
        match off {
            reg::CTRL => Self::write_ctrl(&mut r, v),
            reg::RING_BASE if !r.enabled => {
                r.ring_base = (r.ring_base & !0xffff_ffff) | u64::from(v);
            }
            reg::RING_BASE_HI if !r.enabled => {
                r.ring_base = (r.ring_base & 0xffff_ffff) | (u64::from(v) << 32);
            }
            reg::RING_SIZE if !r.enabled => r.ring_size = v,
            reg::RING_TAIL => r.tail = v & Self::ring_mask(r.ring_size),
            _ => return,
        }
        drop(r);
        self.shared.wake.notify_all();
    }

    fn stop_worker(&mut self) {
        lock(&self.shared.regs).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            if w.join().is_err() {
                log::warn!("SVA engine: the worker thread panicked");
            }
        }
    }
}

impl PciDevice for SvaEngine {
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
            "SVA engine",
        );
        self.sync_caps();
    }

    fn bars(&self) -> Vec<PciBarInfo> {
        vec![caps::bar0()]
    }

    fn read_bar(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 || data.len() > 8 {
            return;
        }
        let (msix, sink) = (&self.shared.msix, self.sink.as_ref());
        if caps::msix_bar_access(msix, sink, offset, BarAccess::Read(data), "SVA engine") {
            return;
        }
        caps::read_dwords(offset, data, |o| self.read_reg(o));
    }

    fn write_bar(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let (msix, sink) = (&self.shared.msix, self.sink.as_ref());
        if caps::msix_bar_access(msix, sink, offset, BarAccess::Write(data), "SVA engine") {
            return;
        }
        let dword = |b: &[u8]| -> u32 {
            let mut v = [0u8; 4];
            v.copy_from_slice(b);
            u32::from_le_bytes(v)
        };
        match (data.len(), offset % 8, offset % 4) {
            (4, _, 0) => self.write_reg(offset, dword(data)),
            (8, 0, _) => {
                let (lo, hi) = data.split_at(4);
                self.write_reg(offset, dword(lo));
                self.write_reg(offset.saturating_add(4), dword(hi));
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        {
            let mut r = lock(&self.shared.regs);
            Self::write_ctrl(&mut r, ctrl::RESET);
            r.ring_base = 0;
            r.ring_size = 0;
        }
        lock(&self.shared.msix).reset(self.sink.as_ref());
        match caps::build(
            self.shared.opts.max_pasid_bits,
            self.shared.opts.pri_capacity,
        ) {
            Ok(c) => self.cfg = c,
            Err(e) => log::warn!("SVA engine: config space rebuild: {e}"),
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

impl Drop for SvaEngine {
    fn drop(&mut self) {
        self.stop_worker();
    }
}
