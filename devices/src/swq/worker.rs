//! The work queue and its worker thread.
//!
//! A submission (on the vCPU thread) only takes the queue lock, pushes and wakes the
//! worker: it never waits for DMA. The worker runs one descriptor at a time with the host
//! PASID the submission put in it: validate, copy in chunks that never cross a 4 KiB page
//! of either address, write the completion record, raise MSI-X. RESET, disable, Bus Master
//! clear and shutdown are noticed between chunks: the descriptor is abandoned without a
//! completion record.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ioasid::{DmaRequest, Pasid};
use serde::Serialize;

use crate::pci::msix::MsixState;
use crate::sva::caps::CapState;
use crate::sva::dma::DeviceDma;
use crate::sva::worker::{fire_vector, lock};

use super::abi::{self, flags, CompletionStatus, RawDescriptor, DESC_SIZE};

/// How long the idle worker sleeps between checks when nothing wakes it.
const IDLE_SLICE: Duration = Duration::from_millis(500);
/// Largest single access (one 4 KiB page).
const PAGE: u64 = 4096;

/// One accepted submission.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    /// The descriptor with its PASID word filled by the device (host PASID, valid).
    pub desc: [u8; DESC_SIZE],
    /// The generation it was accepted in (RESET and disable bump it).
    pub generation: u64,
}

/// The queue and registers.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub jobs: VecDeque<Job>,
    pub enabled: bool,
    pub busy: bool,
    pub error: bool,
    pub generation: u64,
    pub submitted: u32,
    pub completed: u32,
    pub retries: u32,
    pub rejected: u32,
    pub malformed: u32,
    pub shutdown: bool,
    pub caps: CapState,
}

impl Queue {
    /// Descriptors queued or in flight.
    pub fn occupancy(&self) -> u32 {
        (self.jobs.len() as u32).saturating_add(u32::from(self.busy))
    }

    /// Drops what is queued (RESET, disable): the descriptor in flight is abandoned too.
    pub fn drop_queued(&mut self) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        let n = self.jobs.len() as u64;
        self.jobs.clear();
        n
    }
}

/// The device's counters (host side; the guest sees the BAR0 registers).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SwqCounters {
    /// Descriptors accepted into the queue.
    pub submitted: u64,
    /// Descriptors that ended (completion record written or not).
    pub completed: u64,
    /// Descriptors that ended with a status other than SUCCESS.
    pub errors: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Submissions refused with RETRY (queue full).
    pub retries: u64,
    /// Submissions refused: the vCPU's IA32_PASID was not valid.
    pub no_pasid: u64,
    /// Submissions refused: the guest PASID had no host translation.
    pub untranslated: u64,
    /// Submissions refused: queue disabled or Bus Master Enable clear.
    pub disabled: u64,
    /// Bad portal stores and incomplete descriptors.
    pub malformed: u64,
    /// Completion records that could not be written.
    pub completion_faults: u64,
    /// Descriptors dropped or abandoned by RESET, disable or removal.
    pub abandoned: u64,
    /// MSI-X messages sent.
    pub interrupts: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
    pub errors: AtomicU64,
    pub bytes: AtomicU64,
    pub retries: AtomicU64,
    pub no_pasid: AtomicU64,
    pub untranslated: AtomicU64,
    pub disabled: AtomicU64,
    pub malformed: AtomicU64,
    pub completion_faults: AtomicU64,
    pub abandoned: AtomicU64,
    pub interrupts: AtomicU64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn snapshot(&self) -> SwqCounters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SwqCounters {
            submitted: g(&self.submitted),
            completed: g(&self.completed),
            errors: g(&self.errors),
            bytes: g(&self.bytes),
            retries: g(&self.retries),
            no_pasid: g(&self.no_pasid),
            untranslated: g(&self.untranslated),
            disabled: g(&self.disabled),
            malformed: g(&self.malformed),
            completion_faults: g(&self.completion_faults),
            abandoned: g(&self.abandoned),
            interrupts: g(&self.interrupts),
        }
    }
}

/// State shared by the vCPU side ([`super::SwqDevice`]) and the worker.
pub(crate) struct Shared {
    pub queue: Mutex<Queue>,
    pub wake: Condvar,
    pub msix: Mutex<MsixState>,
    pub counters: Counters,
    /// DMA addressed by HOST PASID (the PASID the device put in the descriptor).
    pub dma: Arc<dyn DeviceDma>,
}

/// Why a copy stopped early.
enum Stop {
    Status(CompletionStatus),
    Aborted,
}

impl Shared {
    /// Raises MSI-X vector `v` if MSI-X is enabled.
    fn fire(&self, v: u16) {
        fire_vector(&self.msix, v, &self.counters.interrupts, "SWQ device");
    }

    fn aborted(&self, generation: u64) -> bool {
        let q = lock(&self.queue);
        q.shutdown || q.generation != generation || !q.enabled || !q.caps.bus_master
    }

    /// Waits for the next job; `None` on shutdown.
    fn next_job(&self) -> Option<(Job, CapState)> {
        let mut q = lock(&self.queue);
        loop {
            if q.shutdown {
                return None;
            }
            if q.enabled && q.caps.bus_master {
                if let Some(job) = q.jobs.pop_front() {
                    q.busy = true;
                    return Some((job, q.caps));
                }
            }
            q = self
                .wake
                .wait_timeout(q, IDLE_SLICE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Copies `len` bytes from `src` to `dst` in `pasid`'s address space.
    fn copy(
        &self,
        generation: u64,
        pasid: Option<Pasid>,
        (src, dst, len): (u64, u64, u64),
        buf: &mut [u8],
    ) -> Result<u64, (Stop, u64)> {
        let req = DmaRequest::default();
        let mut done = 0u64;
        while done < len {
            if self.aborted(generation) {
                return Err((Stop::Aborted, done));
            }
            // No overflow: validation checked src + len and dst + len.
            let (s, d) = (src + done, dst + done);
            let n = (len - done).min(PAGE - s % PAGE).min(PAGE - d % PAGE) as usize;
            let Some(chunk) = buf.get_mut(..n) else {
                return Err((Stop::Status(CompletionStatus::BadDescriptor), done));
            };
            let r = self
                .dma
                .read(pasid, s, chunk, req)
                .and_then(|()| self.dma.write(pasid, d, chunk, req));
            if r.is_err() {
                return Err((Stop::Status(CompletionStatus::PageFault), done));
            }
            done += n as u64;
        }
        Ok(done)
    }

    /// Runs one job to its end.
    fn run_one(&self, job: &Job, caps: &CapState, buf: &mut [u8]) {
        let raw = RawDescriptor::parse(&job.desc);
        // ENQCMD submits user requests; a PRIVILEGED descriptor is refused like a reserved
        // bit (ENQCMDS, which may set it, is not emulated).
        let validated = if raw.flags & flags::PRIVILEGED != 0 {
            let pasid = raw.pasid();
            Err((CompletionStatus::BadDescriptor, pasid))
        } else {
            raw.validate(&caps.pasid)
                .map_err(|r| (r.status, r.completion_pasid))
        };
        let interrupt = raw.flags & flags::INTERRUPT != 0 && raw.flags & !flags::ALL == 0;
        let (status, bytes, cpasid) = match validated {
            Ok(d) => {
                let pasid = d.pasid.map(Pasid);
                match self.copy(job.generation, pasid, (d.src, d.dst, d.len), buf) {
                    Ok(n) => (CompletionStatus::Success, n, d.pasid),
                    Err((Stop::Status(s), n)) => (s, n, d.pasid),
                    Err((Stop::Aborted, _)) => return self.abandon(),
                }
            }
            Err((s, p)) => (s, 0, p),
        };
        if self.aborted(job.generation) {
            return self.abandon();
        }
        let record = abi::encode_completion(status, bytes);
        let written = self
            .dma
            .write(
                cpasid.map(Pasid),
                raw.completion,
                &record,
                DmaRequest::default(),
            )
            .is_ok();
        bump(&self.counters.completed, 1);
        bump(&self.counters.bytes, bytes);
        if status != CompletionStatus::Success {
            bump(&self.counters.errors, 1);
        }
        if !written {
            bump(&self.counters.completion_faults, 1);
        }
        let current = {
            let mut q = lock(&self.queue);
            q.busy = false;
            let current = q.generation == job.generation;
            if current {
                q.completed = q.completed.wrapping_add(1);
                if status != CompletionStatus::Success || !written {
                    q.error = true;
                }
            }
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
        lock(&self.queue).busy = false;
        self.wake.notify_all();
    }
}

/// The worker thread's body: runs jobs until shutdown.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut buf = vec![0u8; PAGE as usize];
    while let Some((job, caps)) = shared.next_job() {
        shared.run_one(&job, &caps, &mut buf);
        shared.wake.notify_all();
    }
    lock(&shared.queue).busy = false;
}
