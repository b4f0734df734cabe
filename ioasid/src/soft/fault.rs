//! The soft fault queue: the same [`FaultQueue`] interface as iommufd's fault fd.
//!
//! Records are [`FaultRecord`]s; an eventfd becomes readable while unread records are pending.
//! Page requests follow the kernel's rules: each page request group gets a cookie (every
//! record of the group carries it; the group's last record has `last_page`), the reader answers
//! a group once by its cookie, and a response for a cookie that is not pending — never read,
//! already answered, or unknown — fails with `EINVAL`. A group may be answered `Invalid` at any
//! time after it was read (the lead's timeout does that). Dropping the queue answers every
//! pending group `Invalid`, as the kernel does when the fault fd is closed.
//!
//! The faulting DMA gets a [`PendingPageRequest`]: it can wait for the answer (blocking, with
//! a timeout) or poll it, then retry on `Success` and give up on `Invalid`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::backend::FaultQueue;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::fault_types::{
    FaultRecord, PageFault, PageResponse, PageResponseCode, UnrecoverableFault,
};
use crate::types::FaultId;

/// At most this many unread records; beyond it unrecoverable faults are counted as lost and
/// page requests are answered `Invalid` at once (the kernel's IOPF queue does the same).
pub const QUEUE_DEPTH: usize = 4096;

#[derive(Debug, Default)]
struct Inner {
    unread: VecDeque<FaultRecord>,
    /// Page request groups awaiting a response: cookie -> already read by the VMM.
    pending: HashMap<u32, bool>,
    /// Responses not yet collected by the waiting DMA.
    answers: HashMap<u32, PageResponseCode>,
    /// Pending groups whose DMA stopped waiting: their answer is not kept.
    abandoned: HashSet<u32>,
    next_cookie: u32,
    closed: bool,
    lost: u64,
}

/// State shared by the backend (which delivers) and the queue handle (which reads).
#[derive(Debug)]
pub(crate) struct FaultShared {
    id: FaultId,
    event: EventFd,
    inner: Mutex<Inner>,
    answered: Condvar,
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl FaultShared {
    pub(crate) fn new(id: FaultId) -> Result<Arc<Self>> {
        let event = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| Error::kernel(Op::FaultQueueAlloc, Ctx::object(id.0), Errno::from(e)))?;
        Ok(Arc::new(FaultShared {
            id,
            event,
            inner: Mutex::new(Inner::default()),
            answered: Condvar::new(),
        }))
    }

    fn signal(&self) {
        // The counter only needs to be non-zero; an overflowing counter (EAGAIN) is readable
        // already.
        let _ = self.event.write(1);
    }

    /// Delivers an unrecoverable fault; `false` when it was lost (queue full or closed).
    pub(crate) fn push_unrecoverable(&self, f: UnrecoverableFault) -> bool {
        let mut g = lock(&self.inner);
        if g.closed || g.unread.len() >= QUEUE_DEPTH {
            g.lost += 1;
            return false;
        }
        g.unread.push_back(FaultRecord::Unrecoverable(f));
        drop(g);
        self.signal();
        true
    }

    /// Delivers a single-page page request group; returns its cookie, or `None` when the
    /// queue cannot take it (the request is then answered `Invalid` by the caller).
    pub(crate) fn push_page_request(&self, mut f: PageFault) -> Option<u32> {
        let mut g = lock(&self.inner);
        if g.closed || g.unread.len() >= QUEUE_DEPTH {
            g.lost += 1;
            return None;
        }
        let mut cookie = g.next_cookie;
        while g.pending.contains_key(&cookie)
            || g.answers.contains_key(&cookie)
            || g.abandoned.contains(&cookie)
        {
            cookie = cookie.wrapping_add(1);
        }
        g.next_cookie = cookie.wrapping_add(1);
        f.cookie = cookie;
        f.last_page = true;
        g.pending.insert(cookie, false);
        g.unread.push_back(FaultRecord::PageRequest(f));
        drop(g);
        self.signal();
        Some(cookie)
    }

    fn read(&self) -> Vec<FaultRecord> {
        let mut g = lock(&self.inner);
        let out: Vec<FaultRecord> = g.unread.drain(..).collect();
        for r in &out {
            if let FaultRecord::PageRequest(p) = r {
                if let Some(read) = g.pending.get_mut(&p.cookie) {
                    *read = true;
                }
            }
        }
        // Reset the eventfd while holding the lock, so a concurrent push re-signals after.
        let _ = self.event.read();
        out
    }

    fn respond(&self, r: PageResponse) -> Result<()> {
        let mut g = lock(&self.inner);
        match g.pending.get(&r.cookie) {
            Some(true) => {
                g.pending.remove(&r.cookie);
                if !g.abandoned.remove(&r.cookie) {
                    g.answers.insert(r.cookie, r.code);
                }
                drop(g);
                self.answered.notify_all();
                Ok(())
            }
            _ => Err(Error::kernel(
                Op::PageResponse,
                Ctx::object(self.id.0),
                Errno(libc::EINVAL),
            )),
        }
    }

    fn close(&self) {
        let mut g = lock(&self.inner);
        g.closed = true;
        g.unread.clear();
        let cookies: Vec<u32> = g.pending.drain().map(|(c, _)| c).collect();
        for c in cookies {
            if !g.abandoned.remove(&c) {
                g.answers.insert(c, PageResponseCode::Invalid);
            }
        }
        drop(g);
        self.answered.notify_all();
    }

    /// Records lost because the queue was full or closed.
    pub(crate) fn lost(&self) -> u64 {
        lock(&self.inner).lost
    }

    fn take_answer(&self, cookie: u32, timeout: Option<Duration>) -> Option<PageResponseCode> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = lock(&self.inner);
        loop {
            if let Some(code) = g.answers.remove(&cookie) {
                return Some(code);
            }
            if !g.pending.contains_key(&cookie) {
                // Neither pending nor answered: already collected.
                return None;
            }
            let left = deadline?.checked_duration_since(Instant::now())?;
            g = self
                .answered
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn forget(&self, cookie: u32) {
        let mut g = lock(&self.inner);
        g.answers.remove(&cookie);
        if g.pending.contains_key(&cookie) {
            g.abandoned.insert(cookie);
        }
    }
}

/// The handle returned by `fault_queue_alloc` on the soft backend.
#[derive(Debug)]
pub struct SoftFaultQueue {
    shared: Arc<FaultShared>,
}

impl SoftFaultQueue {
    pub(crate) fn new(shared: Arc<FaultShared>) -> Self {
        SoftFaultQueue { shared }
    }

    /// Records lost because the queue was full.
    pub fn lost(&self) -> u64 {
        self.shared.lost()
    }
}

impl FaultQueue for SoftFaultQueue {
    fn id(&self) -> FaultId {
        self.shared.id
    }

    fn as_raw_fd(&self) -> RawFd {
        self.shared.event.as_raw_fd()
    }

    fn read_records(&mut self) -> Result<Vec<FaultRecord>> {
        Ok(self.shared.read())
    }

    fn respond(&mut self, response: PageResponse) -> Result<()> {
        self.shared.respond(response)
    }
}

impl Drop for SoftFaultQueue {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// A DMA that raised a page request and waits for the VMM's answer.
#[derive(Debug)]
pub struct PendingPageRequest {
    shared: Arc<FaultShared>,
    fault: PageFault,
}

impl PendingPageRequest {
    pub(crate) fn new(shared: Arc<FaultShared>, fault: PageFault) -> Self {
        PendingPageRequest { shared, fault }
    }

    /// The record the VMM reads (with its cookie).
    pub fn fault(&self) -> &PageFault {
        &self.fault
    }

    /// The answer, if there is one yet (consumes it: a later call returns `None`).
    pub fn poll(&self) -> Option<PageResponseCode> {
        self.shared.take_answer(self.fault.cookie, None)
    }

    /// Waits up to `timeout` for the answer; `None` on timeout.
    pub fn wait(&self, timeout: Duration) -> Option<PageResponseCode> {
        self.shared.take_answer(self.fault.cookie, Some(timeout))
    }
}

impl Drop for PendingPageRequest {
    fn drop(&mut self) {
        self.shared.forget(self.fault.cookie);
    }
}
