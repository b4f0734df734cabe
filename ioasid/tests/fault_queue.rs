//! The fault queue cannot wedge: host tests with a fake fault fd that follows the kernel's
//! read rules (`iommufd_fault_fops_read`: whole groups only; a buffer that cannot hold the
//! next group reads nothing while the fd stays readable), and a fake queue whose answers can
//! fail.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use ioasid::backend::FaultQueue;
use ioasid::iommufd::fault::{read_records, FaultFd, INITIAL_RECORDS, MAX_RECORDS};
use ioasid::types::FaultId;
use ioasid::{
    DevId, Error, FaultHandler, FaultPerm, FaultRecord, PageFault, PageResponse, PageResponseCode,
    Pasid, Result,
};

use ioasid::iommufd::fault::RECORD;

fn pf(grpid: u32, cookie: u32, last: bool, addr: u64) -> PageFault {
    PageFault {
        dev: DevId(1),
        pasid: Some(Pasid(5)),
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

/// The wire form of a record (`struct iommu_hwpt_pgfault`).
fn raw(f: &PageFault) -> Vec<u8> {
    let r = f.to_raw();
    let mut b = Vec::with_capacity(RECORD);
    for v in [r.flags, r.dev_id, r.pasid, r.grpid, r.perm, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&r.addr.to_le_bytes());
    b.extend_from_slice(&r.length.to_le_bytes());
    b.extend_from_slice(&r.cookie.to_le_bytes());
    assert_eq!(b.len(), RECORD);
    b
}

/// A group of `n` page requests, the last one with LAST_PAGE.
fn group(grpid: u32, cookie: u32, n: usize) -> Vec<PageFault> {
    (0..n)
        .map(|i| pf(grpid, cookie, i + 1 == n, 0x10_0000 + (i as u64) * 0x1000))
        .collect()
}

/// A fault fd with the kernel's read rules. `einval`: answer a too-small read with EINVAL
/// (else 0, as 6.x `iommufd_fault_fops_read` does).
struct KernelRules {
    groups: VecDeque<Vec<PageFault>>,
    einval: bool,
    reads: usize,
}

impl FaultFd for KernelRules {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reads += 1;
        if !buf.len().is_multiple_of(RECORD) {
            return Err(io::Error::from_raw_os_error(libc::ESPIPE));
        }
        let mut done = 0;
        while let Some(g) = self.groups.front() {
            if g.len() * RECORD > buf.len() - done {
                break;
            }
            for f in self.groups.pop_front().unwrap() {
                buf[done..done + RECORD].copy_from_slice(&raw(&f));
                done += RECORD;
            }
        }
        if done == 0 && !self.groups.is_empty() && self.einval {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if done == 0 && self.groups.is_empty() {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        Ok(done)
    }

    fn readable(&self) -> io::Result<bool> {
        Ok(!self.groups.is_empty())
    }
}

/// A [`FaultQueue`] over the fake fd, as `KernelFaultQueue` is over the kernel's.
struct FakeKernelQueue {
    fd: KernelRules,
    buf: Vec<u8>,
    answered: Vec<PageResponse>,
}

impl std::fmt::Debug for FakeKernelQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeKernelQueue")
    }
}

impl FaultQueue for FakeKernelQueue {
    fn id(&self) -> FaultId {
        FaultId(3)
    }
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
    fn read_records(&mut self) -> Result<Vec<FaultRecord>> {
        Ok(read_records(&mut self.fd, &mut self.buf, FaultId(3))?
            .into_iter()
            .map(FaultRecord::PageRequest)
            .collect())
    }
    fn respond(&mut self, r: PageResponse) -> Result<()> {
        self.answered.push(r);
        Ok(())
    }
}

/// A group of 1000 page requests (more than the 64 records main read at a time) between
/// two small ones: one read call returns all three, in order, and the handler hands the big
/// group out whole so it can be answered. With either kernel answer to a short buffer.
#[test]
fn fault_queue_large_group_not_wedged() {
    for einval in [false, true] {
        let small_a = group(1, 101, 3);
        let big = group(2, 102, 1000);
        let small_b = group(3, 103, 1);
        let mut fd = KernelRules {
            groups: [small_a.clone(), big.clone(), small_b.clone()].into(),
            einval,
            reads: 0,
        };
        let mut buf = Vec::new();
        let got = read_records(&mut fd, &mut buf, FaultId(3)).unwrap();
        let want: Vec<PageFault> = [small_a, big, small_b].concat();
        assert_eq!(got, want, "einval={einval}");
        assert!(fd.groups.is_empty());
        assert!(buf.len() >= 1000 * RECORD && buf.len().is_multiple_of(RECORD));
        println!(
            "fault_queue_large_group_not_wedged: einval={einval}: 1004 records in {} reads, buffer grew to {} records",
            fd.reads,
            buf.len() / RECORD
        );

        // Through the handler: the group comes out whole and is answered once.
        let q = FakeKernelQueue {
            fd: KernelRules {
                groups: [group(7, 700, 5000)].into(),
                einval,
                reads: 0,
            },
            buf: Vec::new(),
            answered: Vec::new(),
        };
        let mut h = FaultHandler::new(Box::new(q), Duration::from_secs(1));
        let groups = h.poll(Instant::now()).unwrap();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].faults.len(), 5000);
        h.respond(700, PageResponseCode::Success).unwrap();
        assert_eq!(h.outstanding(), 0);
    }
    // A group past MAX_RECORDS is reported, not silently left in the queue.
    let mut fd = KernelRules {
        groups: [group(9, 900, MAX_RECORDS + 1)].into(),
        einval: false,
        reads: 0,
    };
    let mut buf = vec![0u8; INITIAL_RECORDS * RECORD];
    let e = read_records(&mut fd, &mut buf, FaultId(3)).unwrap_err();
    assert!(
        format!("{e:?}").contains(&format!("Errno({})", libc::E2BIG)),
        "{e:?}"
    );
}

/// A queue whose answer to one cookie fails.
#[derive(Debug, Default)]
struct FailingQueue {
    batches: VecDeque<Vec<FaultRecord>>,
    refuse: Vec<u32>,
    answered: std::sync::Arc<std::sync::Mutex<Vec<PageResponse>>>,
}

impl FaultQueue for FailingQueue {
    fn id(&self) -> FaultId {
        FaultId(4)
    }
    fn as_raw_fd(&self) -> RawFd {
        -1
    }
    fn read_records(&mut self) -> Result<Vec<FaultRecord>> {
        Ok(self.batches.pop_front().unwrap_or_default())
    }
    fn respond(&mut self, r: PageResponse) -> Result<()> {
        if self.refuse.contains(&r.cookie) {
            return Err(Error::kernel(
                ioasid::Op::PageResponse,
                ioasid::Ctx::object(4),
                ioasid::Errno(libc::EINVAL),
            ));
        }
        self.answered.lock().unwrap().push(r);
        Ok(())
    }
}

/// Five groups time out; the queue refuses the answer to the second. `expire` still answers
/// the other four (and the incomplete one), reports the failure, and tracks none of them
/// afterwards: a later `expire` answers nothing twice.
#[test]
fn fault_expire_answers_all_taken() {
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut batch: Vec<FaultRecord> = (0..5)
        .map(|i| FaultRecord::PageRequest(pf(i, 10 + i, true, 0x1000)))
        .collect();
    // An incomplete group (no LAST_PAGE), answered by the timeout too.
    batch.push(FaultRecord::PageRequest(pf(9, 19, false, 0x9000)));
    let q = FailingQueue {
        batches: [batch].into(),
        refuse: vec![11],
        answered: answered.clone(),
    };
    let mut h = FaultHandler::new(Box::new(q), Duration::from_millis(10));
    let t0 = Instant::now();
    assert_eq!(h.poll(t0).unwrap().len(), 5);
    let r = h.expire(t0 + Duration::from_secs(1));
    assert!(r.is_err(), "the refused answer is reported");
    let mut cookies: Vec<u32> = answered.lock().unwrap().iter().map(|a| a.cookie).collect();
    cookies.sort_unstable();
    assert_eq!(
        cookies,
        vec![10, 12, 13, 14, 19],
        "every other group answered"
    );
    assert!(answered
        .lock()
        .unwrap()
        .iter()
        .all(|a| a.code == PageResponseCode::Invalid));
    assert_eq!(h.outstanding(), 0);
    let c = h.counters();
    assert_eq!((c.timeouts, c.failed_responses), (5, 1));
    assert!(h.expire(t0 + Duration::from_secs(2)).unwrap().is_empty());
    assert_eq!(answered.lock().unwrap().len(), 5, "nothing answered twice");
}
