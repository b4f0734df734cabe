//! The engine's worker thread and the state it shares with the vCPU side.
//!
//! A vCPU's register write only changes the register state under a short lock and wakes the worker; the
//! worker never holds that lock across a DMA or a page-request wait, so a vCPU is never
//! blocked behind a descriptor (the vCPU that must service the guest's PRQ in particular).
//! The worker runs one descriptor at a time: fetch (without PASID, without PRI), validate,
//! copy in chunks that never cross a 4 KiB page of either address, write the completion
//! record, advance HEAD, raise MSI-X. RESET, disable, Bus Master clear and shutdown are
//! noticed between chunks and every [`WAIT_SLICE`] of a page-request wait: the descriptor
//! is abandoned without a completion record, and BUSY clears.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ioasid::{DmaRequest, PageResponseCode, Pasid};
use serde::Serialize;

use crate::pci::msix::MsixState;

use super::abi::{self, CompletionStatus, RawDescriptor};
use super::caps::CapState;
use super::dma::{AccessError, DeviceDma, PendingPage};
use super::SvaOptions;

/// How often a page-request wait checks for RESET, disable and shutdown.
pub const WAIT_SLICE: Duration = Duration::from_millis(10);
/// How long the idle worker sleeps between checks when nothing wakes it.
const IDLE_SLICE: Duration = Duration::from_millis(500);
/// Largest single access (one 4 KiB page).
const PAGE: u64 = 4096;

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Raises MSI-X vector `v` of `msix` if MSI-X is enabled (the sink's route holds it while
/// masked), counting it in `sent`; `who` names the device in warnings.
pub(crate) fn fire_vector(msix: &Mutex<MsixState>, v: u16, sent: &AtomicU64, who: &str) {
    let m = lock(msix);
    if !m.enabled() {
        return;
    }
    if let Some(fd) = m.eventfds().get(usize::from(v)) {
        match fd.write(1) {
            Ok(()) => bump(sent, 1),
            Err(e) => log::warn!("{who}: MSI-X vector {v}: {e}"),
        }
    }
}

/// The BAR0 register state (and what the worker needs from config space).
#[derive(Debug, Default, Clone)]
pub(crate) struct Regs {
    pub enabled: bool,
    pub error: bool,
    pub busy: bool,
    pub ring_base: u64,
    pub ring_size: u32,
    pub head: u32,
    pub tail: u32,
    pub completed: u32,
    pub prq_stats: u32,
    /// Bumped by RESET: a descriptor of an older generation never completes.
    pub generation: u64,
    pub shutdown: bool,
    pub caps: CapState,
}

impl Regs {
    fn runnable(&self) -> bool {
        self.enabled
            && self.caps.bus_master
            && self.head != self.tail
            && self.ring_size.is_power_of_two()
    }
}

/// The engine's counters (for `vm.counters`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SvaCounters {
    /// Descriptors that ended (completion record written or not).
    pub descriptors: u64,
    /// Descriptors that ended with a status other than SUCCESS.
    pub errors: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Page requests sent.
    pub page_requests: u64,
    /// Page responses Success.
    pub responses_success: u64,
    /// Page responses Invalid.
    pub responses_invalid: u64,
    /// Page requests that got no response in time.
    pub timeouts: u64,
    /// Descriptor fetches that failed (the engine then disables itself).
    pub ring_faults: u64,
    /// Completion records that could not be written.
    pub completion_faults: u64,
    /// Descriptors abandoned by RESET, disable or removal.
    pub abandoned: u64,
    /// Device-TLB invalidations received (completed at once: no device TLB).
    pub device_tlb_invalidations: u64,
    /// MSI-X messages sent (both vectors).
    pub interrupts: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    descriptors: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    page_requests: AtomicU64,
    responses_success: AtomicU64,
    responses_invalid: AtomicU64,
    timeouts: AtomicU64,
    ring_faults: AtomicU64,
    completion_faults: AtomicU64,
    abandoned: AtomicU64,
    pub(crate) device_tlb_invalidations: AtomicU64,
    interrupts: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SvaCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SvaCounters {
            descriptors: g(&self.descriptors),
            errors: g(&self.errors),
            bytes: g(&self.bytes),
            page_requests: g(&self.page_requests),
            responses_success: g(&self.responses_success),
            responses_invalid: g(&self.responses_invalid),
            timeouts: g(&self.timeouts),
            ring_faults: g(&self.ring_faults),
            completion_faults: g(&self.completion_faults),
            abandoned: g(&self.abandoned),
            device_tlb_invalidations: g(&self.device_tlb_invalidations),
            interrupts: g(&self.interrupts),
        }
    }
}

/// State shared by the vCPU side ([`super::SvaEngine`]) and the worker.
pub(crate) struct Shared {
    pub regs: Mutex<Regs>,
    pub wake: Condvar,
    pub msix: Mutex<MsixState>,
    pub counters: Counters,
    pub dma: Arc<dyn DeviceDma>,
    pub opts: SvaOptions,
}

/// One descriptor's worth of the registers, taken when the worker starts it.
struct Job {
    generation: u64,
    slot: u64,
    caps: CapState,
    /// The accesses in flight use a PASID: clearing PASID Enable abandons them.
    uses_pasid: bool,
}

/// Why an access ended the descriptor.
enum Fail {
    Status(CompletionStatus),
    Aborted,
}

impl Shared {
    /// Raises MSI-X vector `v` if MSI-X is enabled (the sink's route holds it while masked).
    pub(crate) fn fire(&self, v: u16) {
        fire_vector(&self.msix, v, &self.counters.interrupts, "SVA engine");
    }

    /// Whether the descriptor in flight must be abandoned: shutdown, RESET, disable, Bus
    /// Master Enable cleared, or PASID Enable cleared under a PASID descriptor.
    fn aborted(&self, job: &Job) -> bool {
        let r = lock(&self.regs);
        r.shutdown
            || r.generation != job.generation
            || !r.enabled
            || !r.caps.bus_master
            || (job.uses_pasid && !r.caps.pasid.enabled)
    }

    /// Whether page requests may be sent now (PRI Enable and an allocation, as the guest
    /// has them at this moment: a PRI disable stops new requests at once).
    fn pri_live(&self) -> bool {
        let r = lock(&self.regs);
        r.caps.pri_enabled && r.caps.pri_alloc > 0
    }

    /// Waits for the next descriptor; `None` on shutdown.
    fn next_job(&self) -> Option<Job> {
        let mut r = lock(&self.regs);
        loop {
            if r.shutdown {
                return None;
            }
            if r.runnable() {
                break;
            }
            r = self
                .wake
                .wait_timeout(r, IDLE_SLICE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        r.busy = true;
        let slot = u64::from(r.head & (r.ring_size - 1));
        Some(Job {
            generation: r.generation,
            slot: r.ring_base.wrapping_add(slot * abi::DESC_SIZE as u64),
            caps: r.caps,
            uses_pasid: false,
        })
    }

    /// Waits on a page request up to the configured timeout, in slices, giving up early
    /// when the descriptor is abandoned. `Ok(None)`: no answer in time.
    fn wait_response(
        &self,
        job: &Job,
        p: &dyn PendingPage,
    ) -> Result<Option<PageResponseCode>, Fail> {
        let deadline = Instant::now() + self.opts.page_request_timeout;
        loop {
            if self.aborted(job) {
                return Err(Fail::Aborted);
            }
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return Ok(None);
            }
            let slice = left.min(WAIT_SLICE);
            if let Some(code) = p.wait(slice) {
                return Ok(Some(code));
            }
            // A request that is neither pending nor answered returns at once: do not spin.
            let spent = now.elapsed();
            if spent < slice {
                std::thread::sleep(slice - spent);
            }
        }
    }

    /// One access with the PRI protocol: on a page request, wait, retry on Success (at most
    /// `max_retries_per_page` times), PAGE_FAULT on Invalid, TIMEOUT on no answer.
    fn access(
        &self,
        job: &Job,
        req: DmaRequest,
        mut op: impl FnMut(DmaRequest) -> Result<(), AccessError>,
    ) -> Result<(), Fail> {
        let mut retries = 0u32;
        loop {
            let req = DmaRequest {
                pri: req.pri && self.pri_live(),
                ..req
            };
            let pending = match op(req) {
                Ok(()) => return Ok(()),
                Err(AccessError::Fault | AccessError::Invalid) => {
                    return Err(Fail::Status(CompletionStatus::PageFault))
                }
                Err(AccessError::Timeout) => return Err(Fail::Status(CompletionStatus::Timeout)),
                Err(AccessError::PageRequest(p)) => p,
            };
            bump(&self.counters.page_requests, 1);
            {
                let mut r = lock(&self.regs);
                if r.generation == job.generation {
                    r.prq_stats = r.prq_stats.wrapping_add(1);
                }
            }
            if !req.pri {
                // The path sent a request the device did not ask for: treat as a fault.
                return Err(Fail::Status(CompletionStatus::PageFault));
            }
            match self.wait_response(job, pending.as_ref())? {
                Some(PageResponseCode::Success) => {
                    bump(&self.counters.responses_success, 1);
                    retries += 1;
                    if retries > self.opts.max_retries_per_page {
                        return Err(Fail::Status(CompletionStatus::PageFault));
                    }
                }
                Some(PageResponseCode::Invalid) => {
                    bump(&self.counters.responses_invalid, 1);
                    return Err(Fail::Status(CompletionStatus::PageFault));
                }
                None => {
                    bump(&self.counters.timeouts, 1);
                    return Err(Fail::Status(CompletionStatus::Timeout));
                }
            }
        }
    }

    /// Copies `d`'s bytes; returns the status and the bytes copied.
    fn copy(
        &self,
        job: &Job,
        d: &abi::Descriptor,
        req: DmaRequest,
        buf: &mut [u8],
    ) -> Result<(CompletionStatus, u64), Fail> {
        let pasid = d.pasid.map(Pasid);
        let mut done = 0u64;
        while done < d.len {
            if self.aborted(job) {
                return Err(Fail::Aborted);
            }
            // No overflow: validation checked src + len and dst + len.
            let src = d.src + done;
            let dst = d.dst + done;
            let n = (d.len - done)
                .min(PAGE - (src % PAGE))
                .min(PAGE - (dst % PAGE)) as usize;
            let Some(chunk) = buf.get_mut(..n) else {
                return Err(Fail::Status(CompletionStatus::BadDescriptor));
            };
            let r = self
                .access(job, req, |req| self.dma.read(pasid, src, chunk, req))
                .and_then(|()| self.access(job, req, |req| self.dma.write(pasid, dst, chunk, req)));
            match r {
                Ok(()) => done += n as u64,
                Err(Fail::Status(s)) => return Ok((s, done)),
                Err(Fail::Aborted) => return Err(Fail::Aborted),
            }
        }
        Ok((CompletionStatus::Success, done))
    }

    /// Runs one descriptor to its end.
    fn run_one(&self, job: &mut Job, buf: &mut [u8]) {
        let mut raw = [0u8; abi::DESC_SIZE];
        let fetched = self
            .dma
            .read(None, job.slot, &mut raw, DmaRequest::default());
        if fetched.is_err() {
            bump(&self.counters.ring_faults, 1);
            log::warn!("SVA engine: descriptor fetch at {:#x} failed", job.slot);
            {
                let mut r = lock(&self.regs);
                if r.generation == job.generation {
                    r.error = true;
                    r.enabled = false;
                }
                r.busy = false;
            }
            self.fire(abi::VECTOR_ERROR);
            return;
        }
        let raw = RawDescriptor::parse(&raw);
        let pri_ok = job.caps.pri_enabled && job.caps.pri_alloc > 0;
        let (status, bytes, cpasid, creq, interrupt) = match raw.validate(&job.caps.pasid) {
            Ok(d) => {
                job.uses_pasid = d.pasid.is_some();
                let req = DmaRequest {
                    privileged: d.privileged,
                    exec: false,
                    pri: pri_ok && !d.no_pri,
                };
                match self.copy(job, &d, req, buf) {
                    Ok((s, n)) => (s, n, d.pasid, req, d.interrupt),
                    Err(_) => return self.abandon(),
                }
            }
            Err(rej) => (
                rej.status,
                0,
                rej.completion_pasid,
                DmaRequest::default(),
                rej.interrupt,
            ),
        };
        let record = abi::encode_completion(status, bytes);
        job.uses_pasid = cpasid.is_some();
        let written = self.access(job, creq, |req| {
            self.dma
                .write(cpasid.map(Pasid), raw.completion, &record, req)
        });
        let written = match written {
            Ok(()) => true,
            Err(Fail::Aborted) => return self.abandon(),
            Err(Fail::Status(_)) => false,
        };
        bump(&self.counters.descriptors, 1);
        bump(&self.counters.bytes, bytes);
        if status != CompletionStatus::Success {
            bump(&self.counters.errors, 1);
        }
        if !written {
            bump(&self.counters.completion_faults, 1);
        }
        let current = {
            let mut r = lock(&self.regs);
            let current = r.generation == job.generation && r.ring_size.is_power_of_two();
            if current {
                r.head = (r.head.wrapping_add(1)) & (r.ring_size - 1);
                r.completed = r.completed.wrapping_add(1);
                if status != CompletionStatus::Success || !written {
                    r.error = true;
                }
            }
            r.busy = false;
            current
        };
        if !current {
            return;
        }
        if !written {
            self.fire(abi::VECTOR_ERROR);
        } else if interrupt {
            self.fire(abi::VECTOR_COMPLETION);
        }
    }

    fn abandon(&self) {
        bump(&self.counters.abandoned, 1);
        lock(&self.regs).busy = false;
        self.wake.notify_all();
    }
}

/// The worker thread's body: runs descriptors until shutdown.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut buf = vec![0u8; PAGE as usize];
    while let Some(mut job) = shared.next_job() {
        shared.run_one(&mut job, &mut buf);
        shared.wake.notify_all();
    }
    lock(&shared.regs).busy = false;
}
