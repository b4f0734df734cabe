//! I/O page fault handling above any [`FaultQueue`]: records are assembled into page request
//! groups, handed out once complete, and every group gets exactly one answer — from the
//! caller, or "invalid" when nobody answers within the timeout, so a device never hangs.
//!
//! The owner polls [`FaultHandler::as_raw_fd`] in its event loop (epoll-friendly), calls
//! [`FaultHandler::poll`] when readable, and [`FaultHandler::expire`] on a timer.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backend::FaultQueue;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::fault_types::{
    FaultRecord, PageFault, PageResponse, PageResponseCode, UnrecoverableFault,
};
use crate::types::{DevId, Pasid};

/// A complete page request group: what a page response answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultGroup {
    /// The device.
    pub dev: DevId,
    /// The PASID.
    pub pasid: Option<Pasid>,
    /// The page request group index.
    pub grpid: u32,
    /// The cookie to answer with (from the last request).
    pub cookie: u32,
    /// The requests, in arrival order.
    pub faults: Vec<PageFault>,
}

/// Counters for introspection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultCounters {
    /// Page requests read.
    pub page_requests: u64,
    /// Complete groups handed out.
    pub groups: u64,
    /// Responses sent by the caller.
    pub responses: u64,
    /// Groups answered "invalid" on timeout.
    pub timeouts: u64,
    /// Unrecoverable faults read.
    pub unrecoverable: u64,
    /// Answers (caller's or timeout) the queue refused; the group is no longer tracked.
    pub failed_responses: u64,
}

type GroupKey = (DevId, Option<Pasid>, u32);

/// Assembles records into groups across partial reads.
#[derive(Debug, Default)]
pub struct GroupAssembler {
    partial: HashMap<GroupKey, (Vec<PageFault>, Instant)>,
}

impl GroupAssembler {
    /// Adds one request; returns the group when this request completes it.
    pub fn push(&mut self, f: PageFault, now: Instant) -> Option<FaultGroup> {
        let key = (f.dev, f.pasid, f.grpid);
        let entry = self.partial.entry(key).or_insert_with(|| (Vec::new(), now));
        entry.0.push(f);
        if !f.last_page {
            return None;
        }
        let (faults, _) = self.partial.remove(&key)?;
        Some(FaultGroup {
            dev: f.dev,
            pasid: f.pasid,
            grpid: f.grpid,
            cookie: f.cookie,
            faults,
        })
    }

    /// Removes and returns the incomplete groups older than `timeout` (their last request
    /// never came); they are answered with the cookie of their latest request.
    pub fn take_stale(&mut self, now: Instant, timeout: Duration) -> Vec<FaultGroup> {
        let stale: Vec<GroupKey> = self
            .partial
            .iter()
            .filter(|(_, (_, t))| now.saturating_duration_since(*t) >= timeout)
            .map(|(k, _)| *k)
            .collect();
        stale
            .into_iter()
            .filter_map(|k| {
                let (faults, _) = self.partial.remove(&k)?;
                let cookie = faults.last()?.cookie;
                Some(FaultGroup {
                    dev: k.0,
                    pasid: k.1,
                    grpid: k.2,
                    cookie,
                    faults,
                })
            })
            .collect()
    }

    /// Incomplete groups held.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// A fault queue with group assembly, answer tracking and timeouts.
#[derive(Debug)]
pub struct FaultHandler {
    queue: Box<dyn FaultQueue>,
    assembler: GroupAssembler,
    /// Groups handed out and not yet answered: cookie -> deadline.
    outstanding: HashMap<u32, Instant>,
    timeout: Duration,
    counters: FaultCounters,
    unrecoverable: Vec<UnrecoverableFault>,
}

impl FaultHandler {
    /// Wraps a queue; groups unanswered after `timeout` are answered "invalid".
    pub fn new(queue: Box<dyn FaultQueue>, timeout: Duration) -> Self {
        FaultHandler {
            queue,
            assembler: GroupAssembler::default(),
            outstanding: HashMap::new(),
            timeout,
            counters: FaultCounters::default(),
            unrecoverable: Vec::new(),
        }
    }

    /// The queue's fd, for epoll.
    pub fn as_raw_fd(&self) -> RawFd {
        self.queue.as_raw_fd()
    }

    /// The queue (its id goes into `HwptAlloc::fault`).
    pub fn queue(&self) -> &dyn FaultQueue {
        &*self.queue
    }

    /// Counters.
    pub fn counters(&self) -> FaultCounters {
        self.counters
    }

    /// Unrecoverable faults read so far (drained).
    pub fn take_unrecoverable(&mut self) -> Vec<UnrecoverableFault> {
        std::mem::take(&mut self.unrecoverable)
    }

    /// Reads what is pending and returns the groups that are now complete; each must be
    /// answered with [`respond`](Self::respond) before its deadline.
    pub fn poll(&mut self, now: Instant) -> Result<Vec<FaultGroup>> {
        let mut out = Vec::new();
        for rec in self.queue.read_records()? {
            match rec {
                FaultRecord::PageRequest(f) => {
                    self.counters.page_requests += 1;
                    if let Some(g) = self.assembler.push(f, now) {
                        self.counters.groups += 1;
                        self.outstanding.insert(g.cookie, now + self.timeout);
                        out.push(g);
                    }
                }
                FaultRecord::Unrecoverable(u) => {
                    self.counters.unrecoverable += 1;
                    self.unrecoverable.push(u);
                }
            }
        }
        Ok(out)
    }

    /// Answers a group handed out by [`poll`](Self::poll).
    pub fn respond(&mut self, cookie: u32, code: PageResponseCode) -> Result<()> {
        if self.outstanding.remove(&cookie).is_none() {
            return Err(Error::kernel(
                Op::PageResponse,
                Ctx::object(self.queue.id().0),
                Errno(libc::EINVAL),
            ));
        }
        if let Err(e) = self.queue.respond(PageResponse { cookie, code }) {
            self.counters.failed_responses += 1;
            return Err(e);
        }
        self.counters.responses += 1;
        Ok(())
    }

    /// Answers "invalid" for every group past its deadline (and incomplete groups older than
    /// the timeout); returns the cookies answered. Every group taken is answered even when
    /// one answer fails (the queue refuses it, e.g. after the device went away): the others
    /// still get theirs, the failed ones are counted in
    /// [`FaultCounters::failed_responses`], and the first failure is returned after all
    /// were tried. No group taken here stays tracked, so none is answered twice.
    pub fn expire(&mut self, now: Instant) -> Result<Vec<u32>> {
        let mut due: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(c, _)| *c)
            .collect();
        for g in self.assembler.take_stale(now, self.timeout) {
            due.push(g.cookie);
        }
        due.sort_unstable();
        due.dedup();
        let mut answered = Vec::with_capacity(due.len());
        let mut first_error = None;
        for cookie in due {
            self.outstanding.remove(&cookie);
            match self.queue.respond(PageResponse {
                cookie,
                code: PageResponseCode::Invalid,
            }) {
                Ok(()) => {
                    self.counters.timeouts += 1;
                    answered.push(cookie);
                }
                Err(e) => {
                    self.counters.failed_responses += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(answered),
        }
    }

    /// Groups handed out and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::VecDeque;

    use super::*;
    use crate::types::FaultId;
    use crate::FaultPerm;

    fn pf(grpid: u32, cookie: u32, last: bool, addr: u64) -> PageFault {
        PageFault {
            dev: DevId(1),
            pasid: Some(Pasid(9)),
            grpid,
            perm: FaultPerm {
                read: true,
                ..Default::default()
            },
            addr,
            length: 0,
            cookie,
            last_page: last,
        }
    }

    /// A queue that yields scripted batches and records responses.
    #[derive(Debug, Default)]
    struct Scripted {
        batches: VecDeque<Vec<FaultRecord>>,
        answered: Vec<PageResponse>,
    }

    impl FaultQueue for Scripted {
        fn id(&self) -> FaultId {
            FaultId(7)
        }
        fn as_raw_fd(&self) -> RawFd {
            -1
        }
        fn read_records(&mut self) -> Result<Vec<FaultRecord>> {
            Ok(self.batches.pop_front().unwrap_or_default())
        }
        fn respond(&mut self, r: PageResponse) -> Result<()> {
            self.answered.push(r);
            Ok(())
        }
    }

    /// A queue whose answers all fail, with a given fd.
    #[derive(Debug)]
    struct Refusing {
        fd: RawFd,
        batches: VecDeque<Vec<FaultRecord>>,
    }

    impl FaultQueue for Refusing {
        fn id(&self) -> FaultId {
            FaultId(8)
        }
        fn as_raw_fd(&self) -> RawFd {
            self.fd
        }
        fn read_records(&mut self) -> Result<Vec<FaultRecord>> {
            Ok(self.batches.pop_front().unwrap_or_default())
        }
        fn respond(&mut self, _: PageResponse) -> Result<()> {
            Err(Error::kernel(
                Op::PageResponse,
                Ctx::object(8),
                Errno(libc::ENODEV),
            ))
        }
    }

    /// What the handler tells its owner: the queue's fd, the unrecoverable faults (each
    /// handed over once), the groups outstanding and incomplete, and a counter for each kind
    /// of record and answer (scripts/mutants found these untested).
    #[test]
    fn fault_handler_reports_fd_faults_and_counts() {
        let unrecoverable = |addr| UnrecoverableFault {
            dev: DevId(1),
            pasid: None,
            addr,
            perm: FaultPerm::default(),
            reason: crate::FaultReason::NotPresent,
        };
        let q = Refusing {
            fd: 42,
            batches: [vec![
                FaultRecord::Unrecoverable(unrecoverable(0x1000)),
                FaultRecord::PageRequest(pf(1, 10, true, 0x2000)),
                FaultRecord::PageRequest(pf(2, 11, false, 0x3000)),
                FaultRecord::Unrecoverable(unrecoverable(0x4000)),
            ]]
            .into(),
        };
        let mut h = FaultHandler::new(Box::new(q), Duration::from_secs(60));
        assert_eq!(h.as_raw_fd(), 42);
        let t = Instant::now();
        let groups = h.poll(t).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(h.outstanding(), 1);
        assert_eq!(h.assembler.pending(), 1, "group 2 is incomplete");
        let c = h.counters();
        assert_eq!((c.page_requests, c.groups, c.unrecoverable), (2, 1, 2));
        let faults = h.take_unrecoverable();
        assert_eq!(
            faults.iter().map(|f| f.addr).collect::<Vec<_>>(),
            vec![0x1000, 0x4000]
        );
        assert!(h.take_unrecoverable().is_empty(), "handed over twice");
        assert!(h.respond(10, PageResponseCode::Success).is_err());
        let c = h.counters();
        assert_eq!((c.responses, c.failed_responses), (0, 1));
        assert_eq!(
            h.outstanding(),
            0,
            "a refused answer is not tracked any more"
        );
    }

    #[test]
    fn groups_assemble_across_partial_reads() {
        let mut a = GroupAssembler::default();
        let t = Instant::now();
        assert!(a.push(pf(3, 40, false, 0x1000), t).is_none());
        assert!(
            a.push(pf(4, 41, true, 0x9000), t).is_some(),
            "a one-request group completes at once"
        );
        assert!(a.push(pf(3, 40, false, 0x2000), t).is_none());
        let g = a.push(pf(3, 40, true, 0x3000), t).unwrap();
        assert_eq!(g.grpid, 3);
        assert_eq!(g.cookie, 40);
        assert_eq!(
            g.faults.iter().map(|f| f.addr).collect::<Vec<_>>(),
            vec![0x1000, 0x2000, 0x3000]
        );
        assert_eq!(a.pending(), 0);
    }

    #[test]
    fn handler_answers_once_and_times_out() {
        let mut q = Scripted::default();
        q.batches
            .push_back(vec![FaultRecord::PageRequest(pf(1, 10, false, 0x1000))]);
        q.batches.push_back(vec![
            FaultRecord::PageRequest(pf(1, 10, true, 0x2000)),
            FaultRecord::PageRequest(pf(2, 11, true, 0x3000)),
            FaultRecord::PageRequest(pf(5, 12, false, 0x4000)),
        ]);
        let mut h = FaultHandler::new(Box::new(q), Duration::from_millis(100));
        let t0 = Instant::now();
        assert!(h.poll(t0).unwrap().is_empty());
        let groups = h.poll(t0).unwrap();
        assert_eq!(
            groups.iter().map(|g| g.cookie).collect::<Vec<_>>(),
            vec![10, 11]
        );
        h.respond(10, PageResponseCode::Success).unwrap();
        assert!(
            h.respond(10, PageResponseCode::Success).is_err(),
            "a second answer is refused"
        );
        assert!(
            h.respond(99, PageResponseCode::Success).is_err(),
            "an unknown cookie is refused"
        );
        assert!(h.expire(t0 + Duration::from_millis(50)).unwrap().is_empty());
        // Group 11 was never answered; group 12 never completed: both are answered invalid.
        let expired = h.expire(t0 + Duration::from_millis(150)).unwrap();
        assert_eq!(expired, vec![11, 12]);
        assert_eq!(h.outstanding(), 0);
        let c = h.counters();
        assert_eq!(
            (c.page_requests, c.groups, c.responses, c.timeouts),
            (4, 2, 1, 2)
        );
    }
}
