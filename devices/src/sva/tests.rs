//! Host tests of the SVA copy engine with a fake DMA path: an in-memory map of
//! (PASID, page) → bytes whose absent pages fault, as page requests the test answers when
//! the request asked for PRI. Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ioasid::{DmaRequest, PageResponseCode, Pasid};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::abi::{self, ctrl, flags, reg, status, CompletionStatus, RawDescriptor, PASID_VALID};
use super::caps;
use super::dma::{AccessError, DeviceDma, PendingPage};
use super::{SvaEngine, SvaOptions};
use crate::pci::config::{cap_id, command, ext_cap_id, reg as creg};
use crate::pci::interrupt::{InterruptError, InterruptSink, MsiMessage, MsiVector};
use crate::pci::PciDevice;

const PAGE: u64 = 4096;
const RING: u64 = 0x10000;
const COMP: u64 = 0x20000;
const DEADLINE: Duration = Duration::from_secs(20);

type Key = (Option<u32>, u64);
/// One access the fake saw: (PASID, address, write, request).
type Access = (Option<u32>, u64, bool, DmaRequest);

/// A page request the fake sent, for the test to answer.
struct FakeRequest {
    pasid: Option<u32>,
    addr: u64,
    write: bool,
    req: DmaRequest,
    answer: Sender<PageResponseCode>,
}

struct FakePending(Receiver<PageResponseCode>);

impl PendingPage for FakePending {
    fn wait(&self, timeout: Duration) -> Option<PageResponseCode> {
        self.0.recv_timeout(timeout).ok()
    }
}

/// (PASID, page) → bytes; absent pages fault.
struct FakeMem {
    pages: Mutex<HashMap<Key, Vec<u8>>>,
    prq: Mutex<Sender<FakeRequest>>,
    log: Mutex<Vec<Access>>,
}

impl FakeMem {
    fn new() -> (Arc<Self>, Receiver<FakeRequest>) {
        let (tx, rx) = channel();
        (
            Arc::new(Self {
                pages: Mutex::default(),
                prq: Mutex::new(tx),
                log: Mutex::default(),
            }),
            rx,
        )
    }

    /// Maps (zeroed) pages covering `addr..addr+len`.
    fn map(&self, pasid: Option<u32>, addr: u64, len: u64) {
        let mut p = self.pages.lock().unwrap();
        let mut a = addr & !(PAGE - 1);
        while a < addr + len {
            p.entry((pasid, a))
                .or_insert_with(|| vec![0; PAGE as usize]);
            a += PAGE;
        }
    }

    fn unmap(&self, pasid: Option<u32>, addr: u64) {
        self.pages
            .lock()
            .unwrap()
            .remove(&(pasid, addr & !(PAGE - 1)));
    }

    fn put(&self, pasid: Option<u32>, addr: u64, data: &[u8]) {
        self.map(pasid, addr, data.len() as u64);
        let mut p = self.pages.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            let a = addr + i as u64;
            p.get_mut(&(pasid, a & !(PAGE - 1))).unwrap()[(a % PAGE) as usize] = *b;
        }
    }

    fn get(&self, pasid: Option<u32>, addr: u64, len: usize) -> Option<Vec<u8>> {
        let p = self.pages.lock().unwrap();
        (0..len as u64)
            .map(|i| {
                let a = addr + i;
                p.get(&(pasid, a & !(PAGE - 1)))
                    .map(|pg| pg[(a % PAGE) as usize])
            })
            .collect()
    }

    fn miss(&self, pasid: Option<u32>, addr: u64, write: bool, req: DmaRequest) -> AccessError {
        if !req.pri {
            return AccessError::Fault;
        }
        let (tx, rx) = channel();
        let r = FakeRequest {
            pasid,
            addr: addr & !(PAGE - 1),
            write,
            req,
            answer: tx,
        };
        if self.prq.lock().unwrap().send(r).is_err() {
            return AccessError::Fault;
        }
        AccessError::PageRequest(Box::new(FakePending(rx)))
    }

    fn access(
        &self,
        pasid: Option<u32>,
        addr: u64,
        len: usize,
        write: bool,
        req: DmaRequest,
        mut f: impl FnMut(&mut u8, usize),
    ) -> Result<(), AccessError> {
        self.log.lock().unwrap().push((pasid, addr, write, req));
        let mut p = self.pages.lock().unwrap();
        for i in 0..len {
            let a = addr.checked_add(i as u64).ok_or(AccessError::Fault)?;
            if !p.contains_key(&(pasid, a & !(PAGE - 1))) {
                drop(p);
                return Err(self.miss(pasid, a, write, req));
            }
        }
        for i in 0..len {
            let a = addr + i as u64;
            let pg = p.get_mut(&(pasid, a & !(PAGE - 1))).unwrap();
            f(&mut pg[(a % PAGE) as usize], i);
        }
        Ok(())
    }
}

impl DeviceDma for FakeMem {
    fn read(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), AccessError> {
        let len = buf.len();
        self.access(pasid.map(|p| p.0), addr, len, false, req, |b, i| {
            buf[i] = *b
        })
    }

    fn write(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), AccessError> {
        self.access(pasid.map(|p| p.0), addr, buf.len(), true, req, |b, i| {
            *b = buf[i]
        })
    }
}

/// An interrupt sink that hands out eventfds and keeps a clone of each to count signals.
#[derive(Default)]
struct Sink {
    fds: Mutex<HashMap<u16, EventFd>>,
}

impl Sink {
    fn count(&self, v: u16) -> u64 {
        self.fds
            .lock()
            .unwrap()
            .get(&v)
            .and_then(|fd| fd.read().ok())
            .unwrap_or(0)
    }
}

impl InterruptSink for Sink {
    fn msi_route(
        &self,
        vector: MsiVector,
        _msg: MsiMessage,
        _masked: bool,
    ) -> Result<EventFd, InterruptError> {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        self.fds
            .lock()
            .unwrap()
            .insert(vector.index, fd.try_clone().unwrap());
        Ok(fd)
    }
    fn msi_update(&self, _v: MsiVector, _m: MsiMessage) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_mask(&self, _v: MsiVector, _m: bool) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_release(&self, v: MsiVector) {
        self.fds.lock().unwrap().remove(&v.index);
    }
}

fn cfg_write(e: &mut SvaEngine, off: usize, data: &[u8]) {
    e.write_config_register(off / 4, (off % 4) as u64, data);
}

fn cfg_read(e: &mut SvaEngine, off: usize) -> u32 {
    e.read_config_register(off / 4)
}

fn bar_w32(e: &mut SvaEngine, off: u64, v: u32) {
    e.write_bar(0, off, &v.to_le_bytes());
}

fn bar_r32(e: &mut SvaEngine, off: u64) -> u32 {
    let mut b = [0u8; 4];
    e.read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

/// Polls `f` until it returns `Some`, or panics at the deadline.
fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Rig {
    eng: SvaEngine,
    mem: Arc<FakeMem>,
    sink: Arc<Sink>,
    prq: Receiver<FakeRequest>,
    size: u32,
    tail: u32,
    next_comp: u64,
}

fn opts(timeout_ms: u64) -> SvaOptions {
    SvaOptions {
        page_request_timeout: Duration::from_millis(timeout_ms),
        ..Default::default()
    }
}

/// An engine programmed as a driver does: memory + bus master, MSI-X with both vectors
/// unmasked, PASID (with privileged mode) and PRI enabled, a ring of `size`, ENABLE.
fn rig_with(o: SvaOptions, size: u32, pasid_ctrl: u16, pri: bool) -> Rig {
    let (mem, prq) = FakeMem::new();
    let sink = Arc::new(Sink::default());
    let mut eng = SvaEngine::with_dma(mem.clone(), sink.clone(), o).unwrap();
    cfg_write(
        &mut eng,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    for v in 0..2u64 {
        let t = abi::MSIX_TABLE_OFFSET + v * 16;
        bar_w32(&mut eng, t, 0xfee0_0000);
        bar_w32(&mut eng, t + 4, 0);
        bar_w32(&mut eng, t + 8, 0x40 + v as u32);
        bar_w32(&mut eng, t + 12, 0);
    }
    cfg_write(&mut eng, caps::MSIX_CAP + 2, &(1u16 << 15).to_le_bytes());
    cfg_write(&mut eng, caps::PASID_CAP + 6, &pasid_ctrl.to_le_bytes());
    if pri {
        cfg_write(&mut eng, caps::PRI_CAP + 12, &32u32.to_le_bytes());
        cfg_write(
            &mut eng,
            caps::PRI_CAP + 4,
            &caps::PRI_CTRL_ENABLE.to_le_bytes(),
        );
    }
    mem.map(None, RING, size as u64 * 64);
    mem.map(None, COMP, 0x4000);
    bar_w32(&mut eng, reg::RING_BASE, RING as u32);
    bar_w32(&mut eng, reg::RING_BASE_HI, 0);
    bar_w32(&mut eng, reg::RING_SIZE, size);
    bar_w32(&mut eng, reg::CTRL, ctrl::ENABLE);
    assert_eq!(
        bar_r32(&mut eng, reg::STATUS) & status::ENABLED,
        status::ENABLED
    );
    Rig {
        eng,
        mem,
        sink,
        prq,
        size,
        tail: 0,
        next_comp: COMP,
    }
}

fn rig(o: SvaOptions) -> Rig {
    rig_with(o, 16, caps::PASID_CTRL_ENABLE | caps::PASID_CTRL_PRIV, true)
}

fn desc(pasid: Option<u32>, fl: u32, src: u64, dst: u64, len: u64) -> RawDescriptor {
    RawDescriptor {
        pasid: pasid.map_or(0, |p| p | PASID_VALID),
        flags: fl,
        src,
        dst,
        len,
        completion: 0,
        reserved_nonzero: false,
    }
}

impl Rig {
    /// Puts `d` in the ring with a fresh completion record in `comp_pasid`'s space (mapped
    /// and zeroed there), rings the doorbell, returns the record's (PASID, address).
    fn submit_in(&mut self, mut d: RawDescriptor, comp_pasid: Option<u32>) -> (Option<u32>, u64) {
        if d.completion == 0 {
            d.completion = self.next_comp;
            self.next_comp += 16;
        }
        self.mem.put(comp_pasid, d.completion, &[0; 16]);
        let slot = RING + u64::from(self.tail) * 64;
        self.mem.put(None, slot, &d.encode());
        self.tail = (self.tail + 1) % self.size;
        bar_w32(&mut self.eng, reg::RING_TAIL, self.tail);
        (comp_pasid, d.completion)
    }

    fn submit(&mut self, d: RawDescriptor) -> (Option<u32>, u64) {
        let p = d.pasid();
        self.submit_in(d, p)
    }

    fn completion(&self, at: (Option<u32>, u64)) -> (u32, u64) {
        until("the completion record", || {
            let b: [u8; 16] = self.mem.get(at.0, at.1, 16)?.try_into().ok()?;
            let (s, n) = abi::decode_completion(&b);
            (s != 0).then_some((s, n))
        })
    }

    fn status(&self, at: (Option<u32>, u64)) -> CompletionStatus {
        CompletionStatus::from_code(self.completion(at).0).unwrap()
    }

    fn idle(&mut self) {
        until("the engine to go idle", || {
            let st = bar_r32(&mut self.eng, reg::STATUS);
            let head = bar_r32(&mut self.eng, reg::RING_HEAD);
            (st & status::BUSY == 0 && (head == self.tail || st & status::ENABLED == 0))
                .then_some(())
        });
    }

    fn request(&self) -> FakeRequest {
        self.prq.recv_timeout(DEADLINE).expect("a page request")
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn sva_config_space_caps() {
    let r = rig_with(opts(1000), 16, 0, false);
    let mut e = r.eng;
    assert_eq!(cfg_read(&mut e, 0), 0x5a5a_1234);
    assert_eq!(cfg_read(&mut e, 8) >> 8, abi::CLASS_CODE);
    assert_eq!(cfg_read(&mut e, 8) & 0xff, 1);
    let std_caps: Vec<u8> = e_caps(&mut e);
    assert_eq!(std_caps, vec![cap_id::EXP, cap_id::MSIX]);
    // PCIe capability: version 2, RC integrated endpoint, End-End TLP prefix in DevCap2.
    let flags = cfg_read(&mut e, caps::PCIE_CAP) >> 16;
    assert_eq!((flags & 0xf, (flags >> 4) & 0xf), (2, 9));
    assert_ne!(cfg_read(&mut e, caps::PCIE_CAP + 0x24) & (1 << 21), 0);
    // Extended capabilities ATS, PASID, PRI, linked from 0x100.
    let mut ext = Vec::new();
    let mut off = 0x100usize;
    while off != 0 && ext.len() < 8 {
        let h = cfg_read(&mut e, off);
        ext.push(((h & 0xffff) as u16, off));
        off = (h >> 20) as usize;
    }
    assert_eq!(
        ext,
        vec![
            (ext_cap_id::ATS, caps::ATS_CAP),
            (ext_cap_id::PASID, caps::PASID_CAP),
            (ext_cap_id::PRI, caps::PRI_CAP)
        ]
    );
    let pasid_caps = cfg_read(&mut e, caps::PASID_CAP + 4) & 0xffff;
    assert_eq!((pasid_caps >> 8) & 0x1f, 20);
    assert_eq!(pasid_caps & 0x6, 0x6, "exec and privileged supported");
    assert_eq!(cfg_read(&mut e, caps::PRI_CAP + 8), 32);
    // PRI: Stopped while disabled, clear once enabled; Reset self-clears.
    let pri_status = |e: &mut SvaEngine| (cfg_read(e, caps::PRI_CAP + 4) >> 16) as u16;
    assert_ne!(pri_status(&mut e) & caps::PRI_STATUS_STOPPED, 0);
    assert_ne!(pri_status(&mut e) & caps::PRI_STATUS_PASID, 0);
    cfg_write(&mut e, caps::PRI_CAP + 12, &40u32.to_le_bytes());
    cfg_write(
        &mut e,
        caps::PRI_CAP + 4,
        &(caps::PRI_CTRL_ENABLE | caps::PRI_CTRL_RESET).to_le_bytes(),
    );
    assert_eq!(
        cfg_read(&mut e, caps::PRI_CAP + 4) & 0xffff,
        u32::from(caps::PRI_CTRL_ENABLE)
    );
    assert_eq!(pri_status(&mut e) & caps::PRI_STATUS_STOPPED, 0);
    let st = e.cap_state();
    assert!(st.pri_enabled);
    assert_eq!(st.pri_alloc, 32, "allocation capped at the capacity");
    // PASID enables; the capability register is read-only.
    cfg_write(&mut e, caps::PASID_CAP + 4, &0xffff_ffffu32.to_le_bytes());
    assert_eq!(cfg_read(&mut e, caps::PASID_CAP + 4) & 0xffff, pasid_caps);
    assert_eq!(
        cfg_read(&mut e, caps::PASID_CAP + 4) >> 16,
        7,
        "enable, exec and privileged enable are writable, nothing else"
    );
    let st = e.cap_state();
    assert!(st.pasid.enabled && st.pasid.privileged && st.pasid_exec);
    assert_eq!(st.pasid.width, 20);
    // ATS enable and STU.
    cfg_write(&mut e, caps::ATS_CAP + 6, &(0x8000u16 | 3).to_le_bytes());
    let st = e.cap_state();
    assert!(st.ats_enabled);
    assert_eq!(st.ats_stu, 3);
    // Header: BAR0 sizes as 4 KiB 64-bit memory.
    cfg_write(&mut e, 0x10, &[0xff; 4]);
    cfg_write(&mut e, 0x14, &[0xff; 4]);
    assert_eq!(cfg_read(&mut e, 0x10), 0xffff_f004);
    assert_eq!(cfg_read(&mut e, 0x14), 0xffff_ffff);
    assert_eq!(bar_r32(&mut e, reg::ID), abi::ID_VALUE);
    let _ = creg::STATUS;
}

fn e_caps(e: &mut SvaEngine) -> Vec<u8> {
    let mut out = Vec::new();
    let mut p = (cfg_read(e, creg::CAPABILITY_LIST) & 0xff) as usize;
    while p != 0 && out.len() < 8 {
        let h = cfg_read(e, p);
        out.push((h & 0xff) as u8);
        p = ((h >> 8) & 0xff) as usize;
    }
    out
}

#[test]
fn sva_copy_without_pasid() {
    let mut r = rig(opts(1000));
    let data = pattern(1, 3 * PAGE as usize + 100);
    r.mem.put(None, 0x10_0010, &data);
    r.mem.map(None, 0x20_0ff0, data.len() as u64);
    let at = r.submit(desc(None, 0, 0x10_0010, 0x20_0ff0, data.len() as u64));
    assert_eq!(r.completion(at), (1, data.len() as u64));
    assert_eq!(r.mem.get(None, 0x20_0ff0, data.len()).unwrap(), data);
    r.idle();
    assert_eq!(bar_r32(&mut r.eng, reg::COMPLETED), 1);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_HEAD), 1);
    assert_eq!(bar_r32(&mut r.eng, reg::STATUS), status::ENABLED);
    // Every copy access stayed inside one page and used no PASID.
    for (p, a, _, _) in r.mem.log.lock().unwrap().iter() {
        assert_eq!(*p, None);
        assert!(*a >= RING);
    }
}

#[test]
fn sva_copy_with_pasid() {
    let mut r = rig(opts(1000));
    let data = pattern(2, 8192);
    r.mem.put(Some(5), 0x7f00_0000, &data);
    r.mem.map(Some(5), 0x7f10_0000, 8192);
    let at = r.submit(desc(
        Some(5),
        flags::PRIVILEGED,
        0x7f00_0000,
        0x7f10_0000,
        8192,
    ));
    assert_eq!(r.completion(at), (1, 8192));
    assert_eq!(r.mem.get(Some(5), 0x7f10_0000, 8192).unwrap(), data);
    // The copy and the record were issued with PASID 5, privileged, with PRI.
    let log = r.mem.log.lock().unwrap();
    let data_accesses: Vec<_> = log.iter().filter(|l| l.0 == Some(5)).collect();
    assert!(!data_accesses.is_empty());
    assert!(data_accesses.iter().all(|l| l.3.privileged && l.3.pri));
    // The ring fetch used no PASID and no PRI.
    assert!(log
        .iter()
        .filter(|l| l.0.is_none())
        .all(|l| !l.3.pri && !l.3.privileged));
}

#[test]
fn sva_pasids_isolated() {
    let mut r = rig(opts(1000));
    let a = pattern(3, 4096);
    let b = pattern(4, 4096);
    r.mem.put(Some(1), 0x40_0000, &a);
    r.mem.put(Some(2), 0x40_0000, &b);
    r.mem.map(Some(1), 0x50_0000, 4096);
    r.mem.map(Some(2), 0x50_0000, 4096);
    r.mem.put(Some(2), 0x60_0000, &b);
    let at = r.submit(desc(Some(1), 0, 0x40_0000, 0x50_0000, 4096));
    assert_eq!(r.completion(at).0, 1);
    assert_eq!(r.mem.get(Some(1), 0x50_0000, 4096).unwrap(), a);
    assert_eq!(r.mem.get(Some(2), 0x50_0000, 4096).unwrap(), vec![0; 4096]);
    // PASID 1 cannot read what only PASID 2 maps.
    let at = r.submit(desc(Some(1), flags::NO_PRI, 0x60_0000, 0x50_0000, 4096));
    assert_eq!(r.status(at), CompletionStatus::PageFault);
    assert_eq!(r.completion(at).1, 0);
    assert_eq!(r.mem.get(Some(1), 0x50_0000, 4096).unwrap(), a);
    let at = r.submit(desc(Some(2), 0, 0x60_0000, 0x50_0000, 4096));
    assert_eq!(r.status(at), CompletionStatus::Success);
    assert_eq!(r.mem.get(Some(2), 0x50_0000, 4096).unwrap(), b);
}

#[test]
fn sva_fault_page_request_success_completes() {
    let mut r = rig(opts(10_000));
    let data = pattern(5, 6000);
    r.mem.put(Some(7), 0x1000_0000, &data);
    // Destination never touched: not mapped.
    let at = r.submit(desc(
        Some(7),
        flags::INTERRUPT,
        0x1000_0000,
        0x2000_0800,
        6000,
    ));
    let mut seen = Vec::new();
    for _ in 0..2 {
        let q = r.request();
        assert_eq!(q.pasid, Some(7));
        assert!(q.write && q.req.pri && !q.req.privileged);
        seen.push(q.addr);
        r.mem.map(Some(7), q.addr, PAGE);
        q.answer.send(PageResponseCode::Success).unwrap();
    }
    assert_eq!(seen, vec![0x2000_0000, 0x2000_1000]);
    assert_eq!(r.completion(at), (1, 6000));
    assert_eq!(r.mem.get(Some(7), 0x2000_0800, 6000).unwrap(), data);
    r.idle();
    assert_eq!(bar_r32(&mut r.eng, reg::PRQ_STATS), 2);
    let c = r.eng.counters();
    assert_eq!((c.page_requests, c.responses_success), (2, 2));
    until("vector 0", || (r.sink.count(0) == 1).then_some(()));
}

#[test]
fn sva_page_response_invalid_page_fault() {
    let mut r = rig(opts(10_000));
    r.mem.put(Some(7), 0x1000_0000, &pattern(6, 8192));
    r.mem.map(Some(7), 0x3000_0000, 4096);
    let at = r.submit(desc(Some(7), 0, 0x1000_0000, 0x3000_0000, 8192));
    let q = r.request();
    assert_eq!(q.addr, 0x3000_1000);
    q.answer.send(PageResponseCode::Invalid).unwrap();
    assert_eq!(r.completion(at), (2, 4096), "the first page was copied");
    r.idle();
    assert_ne!(bar_r32(&mut r.eng, reg::STATUS) & status::ERROR, 0);
    bar_w32(&mut r.eng, reg::CTRL, ctrl::ENABLE | ctrl::CLEAR_ERROR);
    assert_eq!(bar_r32(&mut r.eng, reg::STATUS) & status::ERROR, 0);
    assert_eq!(r.eng.counters().responses_invalid, 1);
}

#[test]
fn sva_page_request_timeout() {
    let mut r = rig(opts(100));
    r.mem.put(Some(9), 0x1000_0000, &pattern(7, 64));
    let at = r.submit(desc(Some(9), 0, 0x1000_0000, 0x5000_0000, 64));
    let q = r.request();
    assert_eq!(r.status(at), CompletionStatus::Timeout);
    drop(q);
    r.idle();
    assert_eq!(r.eng.counters().timeouts, 1);
}

#[test]
fn sva_no_pri_faults() {
    // NO_PRI: a fault ends the descriptor, no page request.
    let mut r = rig(opts(1000));
    r.mem.put(Some(3), 0x1000, &pattern(8, 64));
    let at = r.submit(desc(Some(3), flags::NO_PRI, 0x1000, 0x9000, 64));
    assert_eq!(r.status(at), CompletionStatus::PageFault);
    assert!(r.prq.try_recv().is_err());
    // PRI disabled in the capability: same.
    let mut r = rig_with(opts(1000), 16, caps::PASID_CTRL_ENABLE, false);
    r.mem.put(Some(3), 0x1000, &pattern(8, 64));
    let at = r.submit(desc(Some(3), 0, 0x1000, 0x9000, 64));
    assert_eq!(r.status(at), CompletionStatus::PageFault);
    assert!(r.prq.try_recv().is_err());
    r.idle();
    assert_eq!(bar_r32(&mut r.eng, reg::PRQ_STATS), 0);
}

#[test]
fn sva_retries_bounded() {
    let o = SvaOptions {
        max_retries_per_page: 3,
        ..opts(5000)
    };
    let mut r = rig(o);
    r.mem.put(Some(3), 0x1000, &pattern(8, 64));
    let at = r.submit(desc(Some(3), 0, 0x1000, 0x9000, 64));
    // A guest that answers Success without fixing anything.
    for _ in 0..4 {
        r.request().answer.send(PageResponseCode::Success).unwrap();
    }
    assert_eq!(r.status(at), CompletionStatus::PageFault);
    assert!(r.prq.recv_timeout(Duration::from_millis(50)).is_err());
}

#[test]
fn sva_bad_descriptors() {
    let mut r = rig(opts(1000));
    r.mem.put(None, 0x1000, &pattern(9, 64));
    r.mem.map(None, 0x9000, 64);
    let good = desc(None, 0, 0x1000, 0x9000, 64);
    let bad = [
        RawDescriptor {
            pasid: 1 << 20,
            ..good
        },
        RawDescriptor {
            flags: 1 << 3,
            ..good
        },
        RawDescriptor {
            reserved_nonzero: true,
            ..good
        },
        RawDescriptor { len: 0, ..good },
        RawDescriptor {
            len: abi::MAX_LEN + 1,
            ..good
        },
        RawDescriptor {
            src: u64::MAX - 10,
            ..good
        },
        RawDescriptor {
            completion: COMP + 0x1008,
            ..good
        },
        RawDescriptor {
            flags: flags::PRIVILEGED,
            ..good
        },
    ];
    for d in bad {
        let at = r.submit(d);
        assert_eq!(r.completion(at), (4, 0), "{d:?}");
    }
    r.idle();
    assert_eq!(r.mem.get(None, 0x9000, 64).unwrap(), vec![0; 64]);
    assert_ne!(bar_r32(&mut r.eng, reg::STATUS) & status::ERROR, 0);
    assert_eq!(bar_r32(&mut r.eng, reg::COMPLETED), 8);
    // A good one still works afterwards.
    let at = r.submit(good);
    assert_eq!(r.completion(at), (1, 64));
}

#[test]
fn sva_pasid_too_wide_bad_pasid() {
    let o = SvaOptions {
        max_pasid_bits: 8,
        ..opts(1000)
    };
    let mut r = rig(o);
    r.mem.put(Some(255), 0x1000, &pattern(10, 64));
    r.mem.map(Some(255), 0x9000, 64);
    r.mem.put(Some(256), 0x1000, &pattern(10, 64));
    r.mem.map(Some(256), 0x9000, 64);
    // 256 is wider than 8 bits: BAD_PASID, record written without PASID.
    let at = r.submit_in(desc(Some(256), 0, 0x1000, 0x9000, 64), None);
    assert_eq!(r.status(at), CompletionStatus::BadPasid);
    assert_eq!(r.mem.get(Some(256), 0x9000, 64).unwrap(), vec![0; 64]);
    let at = r.submit(desc(Some(255), 0, 0x1000, 0x9000, 64));
    assert_eq!(r.status(at), CompletionStatus::Success);
    // PASID not enabled: BAD_PASID; privileged without Privileged Mode Enable: BAD_PASID.
    let mut r = rig_with(opts(1000), 16, 0, true);
    r.mem.put(Some(1), 0x1000, &pattern(10, 64));
    r.mem.map(Some(1), 0x9000, 64);
    let at = r.submit_in(desc(Some(1), 0, 0x1000, 0x9000, 64), None);
    assert_eq!(r.status(at), CompletionStatus::BadPasid);
    let mut r = rig_with(opts(1000), 16, caps::PASID_CTRL_ENABLE, true);
    r.mem.put(Some(1), 0x1000, &pattern(10, 64));
    r.mem.map(Some(1), 0x9000, 64);
    let at = r.submit(desc(Some(1), flags::PRIVILEGED, 0x1000, 0x9000, 64));
    assert_eq!(r.status(at), CompletionStatus::BadPasid);
    assert_eq!(r.mem.get(Some(1), 0x9000, 64).unwrap(), vec![0; 64]);
}

#[test]
fn sva_msix_on_completion() {
    let mut r = rig(opts(1000));
    r.mem.put(None, 0x1000, &pattern(11, 64));
    r.mem.map(None, 0x9000, 64);
    let at = r.submit(desc(None, 0, 0x1000, 0x9000, 64));
    r.completion(at);
    r.idle();
    assert_eq!(r.sink.count(0), 0, "no INTERRUPT, no message");
    let at = r.submit(desc(None, flags::INTERRUPT, 0x1000, 0x9000, 64));
    r.completion(at);
    until("vector 0", || (r.sink.count(0) == 1).then_some(()));
    assert_eq!(r.sink.count(1), 0);
    // A completion record that cannot be written: ERROR and vector 1, no vector 0.
    let d = RawDescriptor {
        completion: 0xdead_0000,
        ..desc(None, flags::INTERRUPT, 0x1000, 0x9000, 64)
    };
    let slot = RING + u64::from(r.tail) * 64;
    r.mem.put(None, slot, &d.encode());
    r.tail += 1;
    bar_w32(&mut r.eng, reg::RING_TAIL, r.tail);
    r.idle();
    until("vector 1", || (r.sink.count(1) == 1).then_some(()));
    assert_eq!(r.sink.count(0), 0);
    assert_ne!(bar_r32(&mut r.eng, reg::STATUS) & status::ERROR, 0);
    assert_eq!(r.eng.counters().completion_faults, 1);
}

#[test]
fn sva_ring_wrap() {
    let mut r = rig_with(
        opts(1000),
        4,
        caps::PASID_CTRL_ENABLE | caps::PASID_CTRL_PRIV,
        true,
    );
    for i in 0..10u8 {
        let data = pattern(i, 100);
        r.mem.put(Some(2), 0x1000, &data);
        r.mem.map(Some(2), 0x8000 + u64::from(i) * 0x100, 100);
        let at = r.submit(desc(Some(2), 0, 0x1000, 0x8000 + u64::from(i) * 0x100, 100));
        assert_eq!(r.completion(at), (1, 100));
        assert_eq!(
            r.mem
                .get(Some(2), 0x8000 + u64::from(i) * 0x100, 100)
                .unwrap(),
            data
        );
    }
    r.idle();
    assert_eq!(bar_r32(&mut r.eng, reg::COMPLETED), 10);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_HEAD), 10 % 4);
    // A doorbell beyond the ring is reduced mod RING_SIZE.
    bar_w32(&mut r.eng, reg::RING_TAIL, 4 + 2);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_TAIL), 2);
}

#[test]
fn sva_reset_mid_stream() {
    let mut r = rig(opts(60_000));
    r.mem.put(Some(4), 0x1000, &pattern(12, 64));
    let at = r.submit(desc(Some(4), 0, 0x1000, 0x9000, 64));
    r.mem.put(Some(4), 0x2000, &pattern(13, 64));
    let at2 = r.submit(desc(Some(4), 0, 0x2000, 0x9000, 64));
    // The worker waits on a page request nobody answers (60 s timeout)...
    let q = r.request();
    assert_ne!(bar_r32(&mut r.eng, reg::STATUS) & status::BUSY, 0);
    // ...and the vCPU's RESET returns at once and the engine drains.
    bar_w32(&mut r.eng, reg::CTRL, ctrl::RESET);
    until("BUSY to clear after RESET", || {
        (bar_r32(&mut r.eng, reg::STATUS) & status::BUSY == 0).then_some(())
    });
    assert_eq!(bar_r32(&mut r.eng, reg::STATUS), 0);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_HEAD), 0);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_TAIL), 0);
    assert_eq!(bar_r32(&mut r.eng, reg::CTRL), 0, "RESET self-clears");
    assert_eq!(r.mem.get(Some(4), at.1, 16).unwrap(), vec![0; 16]);
    assert_eq!(r.mem.get(Some(4), at2.1, 16).unwrap(), vec![0; 16]);
    assert_eq!(r.eng.counters().abandoned, 1);
    drop(q);
    // Re-enabled, the ring runs from slot 0 again.
    r.tail = 0;
    bar_w32(&mut r.eng, reg::CTRL, ctrl::ENABLE);
    r.mem.map(Some(4), 0x9000, 64);
    let at = r.submit(desc(Some(4), 0, 0x2000, 0x9000, 64));
    assert_eq!(r.completion(at), (1, 64));
    assert_eq!(r.mem.get(Some(4), 0x9000, 64).unwrap(), pattern(13, 64));
}

#[test]
fn sva_disable_and_remove_stop_worker() {
    let mut r = rig(opts(60_000));
    r.mem.put(Some(4), 0x1000, &pattern(12, 64));
    let at = r.submit(desc(Some(4), 0, 0x1000, 0x9000, 64));
    let q = r.request();
    bar_w32(&mut r.eng, reg::CTRL, 0);
    r.idle();
    assert_eq!(
        bar_r32(&mut r.eng, reg::RING_HEAD),
        0,
        "HEAD kept on disable"
    );
    assert_eq!(r.mem.get(Some(4), at.1, 16).unwrap(), vec![0; 16]);
    drop(q);
    // Re-enable: the same descriptor runs again and now faults the page in.
    bar_w32(&mut r.eng, reg::CTRL, ctrl::ENABLE);
    let q = r.request();
    r.mem.map(Some(4), q.addr, PAGE);
    q.answer.send(PageResponseCode::Success).unwrap();
    assert_eq!(r.completion(at), (1, 64));
    // removed() joins the worker even while it waits on a page request.
    r.mem.unmap(Some(4), 0x9000);
    let _at = r.submit(desc(Some(4), 0, 0x1000, 0x9000, 64));
    let _q = r.request();
    assert!(r.eng.worker_running());
    r.eng.removed();
    assert!(!r.eng.worker_running());
}

#[test]
fn sva_ring_rules() {
    let mut r = rig(opts(1000));
    // Ring registers are ignored while enabled.
    bar_w32(&mut r.eng, reg::RING_SIZE, 8);
    bar_w32(&mut r.eng, reg::RING_BASE, 0x40);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_SIZE), 16);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_BASE), RING as u32);
    let mut b = [0u8; 8];
    r.eng.read_bar(0, reg::RING_BASE, &mut b);
    assert_eq!(u64::from_le_bytes(b), RING);
    bar_w32(&mut r.eng, reg::CTRL, ctrl::RESET);
    // Bad sizes and a misaligned base refuse ENABLE with ERROR.
    for (size, base) in [
        (3, RING),
        (1, RING),
        (8192, RING),
        (0, RING),
        (16, RING + 8),
    ] {
        bar_w32(&mut r.eng, reg::CTRL, ctrl::CLEAR_ERROR);
        r.eng.write_bar(0, reg::RING_BASE, &base.to_le_bytes());
        bar_w32(&mut r.eng, reg::RING_SIZE, size);
        bar_w32(&mut r.eng, reg::CTRL, ctrl::ENABLE);
        assert_eq!(
            bar_r32(&mut r.eng, reg::STATUS),
            status::ERROR,
            "size {size} base {base:#x}"
        );
    }
    // A ring that cannot be fetched: ERROR, disabled, vector 1.
    bar_w32(&mut r.eng, reg::CTRL, ctrl::CLEAR_ERROR);
    r.eng
        .write_bar(0, reg::RING_BASE, &0x7777_0000u64.to_le_bytes());
    bar_w32(&mut r.eng, reg::RING_SIZE, 16);
    bar_w32(&mut r.eng, reg::CTRL, ctrl::ENABLE);
    bar_w32(&mut r.eng, reg::RING_TAIL, 1);
    until("the ring fault", || {
        (bar_r32(&mut r.eng, reg::STATUS) == status::ERROR).then_some(())
    });
    until("vector 1", || (r.sink.count(1) == 1).then_some(()));
    assert_eq!(r.eng.counters().ring_faults, 1);
    // No DMA without Bus Master Enable.
    let mut r = rig(opts(1000));
    cfg_write(&mut r.eng, creg::COMMAND, &command::MEMORY.to_le_bytes());
    r.mem.put(None, 0x1000, &pattern(1, 64));
    r.mem.map(None, 0x9000, 64);
    let at = r.submit(desc(None, 0, 0x1000, 0x9000, 64));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.mem.get(None, at.1, 16).unwrap(), vec![0; 16]);
    cfg_write(
        &mut r.eng,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    assert_eq!(r.completion(at), (1, 64));
}

#[test]
fn sva_device_tlb_invalidation_completes() {
    let r = rig(opts(1000));
    let h = r.eng.handle();
    h.invalidate_device_tlb(Some(Pasid(5)), 0x1000, 4);
    r.eng.invalidate_device_tlb(None, 0, u64::MAX);
    assert_eq!(h.counters().device_tlb_invalidations, 2);
}

#[test]
fn sva_options_validated() {
    let cases = [
        SvaOptions {
            max_pasid_bits: 0,
            ..Default::default()
        },
        SvaOptions {
            max_pasid_bits: 21,
            ..Default::default()
        },
        SvaOptions {
            pri_capacity: 0,
            ..Default::default()
        },
        SvaOptions {
            page_request_timeout: Duration::ZERO,
            ..Default::default()
        },
        SvaOptions {
            max_retries_per_page: 0,
            ..Default::default()
        },
    ];
    for o in cases {
        assert!(o.validate().is_err(), "{o:?}");
        let (mem, _rx) = FakeMem::new();
        assert!(SvaEngine::with_dma(mem, Arc::new(Sink::default()), o).is_err());
    }
    assert!(SvaOptions::default().validate().is_ok());
}

/// A `DmaView` over the fake, to run the engine through [`SvaEngine::new`] (the VMM's
/// constructor) with the `ioasid` error type.
struct FakeView(Arc<FakeMem>);

fn unrecoverable(pasid: Option<Pasid>, addr: u64) -> ioasid::DmaError {
    ioasid::DmaError::Fault(ioasid::UnrecoverableFault {
        dev: ioasid::DevId(1),
        pasid,
        addr,
        perm: Default::default(),
        reason: ioasid::FaultReason::NotPresent,
    })
}

impl crate::viommu::DmaView for FakeView {
    fn read(
        &self,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &mut [u8],
    ) -> Result<(), ioasid::DmaError> {
        self.0
            .read(pasid, iova, buf, DmaRequest::default())
            .map_err(|_| unrecoverable(pasid, iova))
    }
    fn write(&self, pasid: Option<Pasid>, iova: u64, buf: &[u8]) -> Result<(), ioasid::DmaError> {
        self.0
            .write(pasid, iova, buf, DmaRequest::default())
            .map_err(|_| unrecoverable(pasid, iova))
    }
}

#[test]
fn sva_dma_view_path() {
    let (mem, _rx) = FakeMem::new();
    let sink = Arc::new(Sink::default());
    let mut eng = SvaEngine::new(Arc::new(FakeView(mem.clone())), sink, opts(1000)).unwrap();
    cfg_write(
        &mut eng,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    cfg_write(
        &mut eng,
        caps::PASID_CAP + 6,
        &caps::PASID_CTRL_ENABLE.to_le_bytes(),
    );
    mem.map(None, RING, 64 * 4);
    bar_w32(&mut eng, reg::RING_BASE, RING as u32);
    bar_w32(&mut eng, reg::RING_SIZE, 4);
    bar_w32(&mut eng, reg::CTRL, ctrl::ENABLE);
    let data = pattern(20, 5000);
    mem.put(Some(6), 0x1000, &data);
    mem.map(Some(6), 0x8000, 5000);
    mem.map(Some(6), 0x20000, 32);
    let mut d = desc(Some(6), 0, 0x1000, 0x8000, 5000);
    d.completion = 0x20000;
    mem.put(None, RING, &d.encode());
    // A fault through the view is PAGE_FAULT (this view has no PRI).
    let mut d2 = desc(Some(6), 0, 0x1000, 0xf000, 64);
    d2.completion = 0x20010;
    mem.put(None, RING + 64, &d2.encode());
    bar_w32(&mut eng, reg::RING_TAIL, 2);
    let rec = |a: u64| {
        until("a completion", || {
            let b: [u8; 16] = mem.get(Some(6), a, 16)?.try_into().ok()?;
            let r = abi::decode_completion(&b);
            (r.0 != 0).then_some(r)
        })
    };
    assert_eq!(rec(0x20000), (1, 5000));
    assert_eq!(mem.get(Some(6), 0x8000, 5000).unwrap(), data);
    assert_eq!(rec(0x20010), (2, 0));
}

/// Seeded fuzz of register, config and descriptor contents with random page-request
/// answers: no panic on the vCPU side or in the worker, and the worker always drains on
/// RESET and ends on removal.
#[test]
fn sva_fuzz_registers_and_descriptors() {
    use crate::fuzz;
    let seed = fuzz::seed("sva_fuzz_registers_and_descriptors", 0x5a5a_0001);
    let budget = fuzz::cases(48);
    let (failures, ran) = std::thread::Builder::new()
        .name("sva-fuzz".into())
        .spawn(move || {
            let mut ran = 0u64;
            let f = fuzz::run("sva_fuzz_registers_and_descriptors", seed, budget, |rng| {
                ran += fuzz_case(rng);
            });
            (f, ran)
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(failures, 0, "see the failing cases above");
    eprintln!("sva_fuzz_registers_and_descriptors: {ran} descriptors ended");
    if budget >= 16 {
        assert!(ran > 0, "the fuzz never ran a descriptor to its end");
    }
}

/// One case; returns the descriptors the engine ended.
fn fuzz_case(rng: &mut crate::fuzz::Rng) -> u64 {
    let o = SvaOptions {
        max_pasid_bits: 1 + rng.below(20) as u8,
        page_request_timeout: Duration::from_millis(1 + rng.below(20)),
        max_retries_per_page: 1 + rng.below(4) as u32,
        ..Default::default()
    };
    let mut r = rig_with(
        o,
        rng.pick(&[2, 4, 16]),
        rng.below(8) as u16,
        rng.chance(3, 4),
    );
    let addrs = [
        0x1000u64,
        0x1ff0,
        0x2000,
        0x9000,
        0xfffff000,
        u64::MAX - 7,
        0,
    ];
    for a in [0x1000u64, 0x2000, 0x9000] {
        let p = if rng.chance(1, 2) {
            None
        } else {
            Some(rng.below(4) as u32)
        };
        r.mem.map(p, a, PAGE);
    }
    for _ in 0..(8 + rng.below(24)) {
        match rng.below(6) {
            0 => {
                let off = rng.below(0x200) as usize;
                let len = rng.pick(&[1usize, 2, 4]);
                let mut v = [0u8; 4];
                rng.fill(&mut v);
                cfg_write(&mut r.eng, off, &v[..len]);
            }
            1 => {
                let off = rng.pick(&[
                    0u64, 4, 8, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x800, 0x80c, 0xc00,
                ]) + if rng.chance(1, 8) { rng.below(8) } else { 0 };
                let len = rng.pick(&[1usize, 2, 4, 8]);
                let mut v = [0u8; 8];
                rng.fill(&mut v);
                if off == reg::CTRL && rng.chance(1, 2) {
                    v[0] &= 0x5;
                }
                r.eng.write_bar(0, off, &v[..len]);
                let mut rb = [0u8; 8];
                r.eng.read_bar(0, rng.below(0x1000), &mut rb[..len]);
            }
            2 | 3 => {
                let mut d = RawDescriptor {
                    pasid: if rng.chance(1, 2) {
                        PASID_VALID | rng.below(4) as u32
                    } else {
                        rng.next_u64() as u32
                    },
                    flags: if rng.chance(3, 4) {
                        rng.below(8) as u32
                    } else {
                        rng.next_u64() as u32
                    },
                    src: rng.pick(&addrs).wrapping_add(rng.below(64)),
                    dst: rng.pick(&addrs).wrapping_add(rng.below(64)),
                    len: rng.pick(&[1u64, 64, 4096, 8192, abi::MAX_LEN, abi::MAX_LEN + 1, 0]),
                    completion: rng.pick(&addrs) & !0xf,
                    reserved_nonzero: rng.chance(1, 16),
                };
                if rng.chance(1, 4) {
                    d.completion = rng.next_u64();
                }
                let slot = RING + rng.below(16) * 64;
                r.mem.put(None, slot, &d.encode());
                bar_w32(&mut r.eng, reg::RING_TAIL, rng.below(32) as u32);
            }
            4 => {
                while let Ok(q) = r.prq.try_recv() {
                    match rng.below(3) {
                        0 => {
                            r.mem.map(q.pasid, q.addr, PAGE);
                            let _ = q.answer.send(PageResponseCode::Success);
                        }
                        1 => {
                            let _ = q.answer.send(PageResponseCode::Invalid);
                        }
                        _ => {}
                    }
                }
            }
            _ => std::thread::sleep(Duration::from_millis(rng.below(3))),
        }
    }
    bar_w32(&mut r.eng, reg::CTRL, ctrl::RESET);
    until("BUSY to clear after RESET", || {
        (bar_r32(&mut r.eng, reg::STATUS) & status::BUSY == 0).then_some(())
    });
    assert!(r.eng.worker_running(), "the worker died");
    r.eng.removed();
    assert!(!r.eng.worker_running());
    r.eng.counters().descriptors
}

/// On the PCI bus: the extended capabilities are reachable through ECAM, BAR0 decodes once
/// memory space is enabled, and a copy runs with the registers written over MMIO.
#[test]
fn sva_on_pci_bus() {
    use crate::pci::tests::Rig as BusRig;
    let (mem, _prq) = FakeMem::new();
    let eng = SvaEngine::with_dma(mem.clone(), Arc::new(Sink::default()), opts(1000)).unwrap();
    let handle = eng.handle();
    let bus = BusRig::new();
    let dev: crate::pci::SharedPciDevice = Arc::new(Mutex::new(eng));
    let bdf = bus.add(dev.clone(), None).unwrap();
    assert_eq!(bus.ecam_read32(bdf, 0), 0x5a5a_1234);
    let mut ids = Vec::new();
    let mut off = 0x100u16;
    while off != 0 && ids.len() < 8 {
        let h = bus.ecam_read32(bdf, off);
        ids.push(h & 0xffff);
        off = (h >> 20) as u16;
    }
    assert_eq!(ids, vec![0x0f, 0x1b, 0x13]);
    bus.ecam_write(
        bdf,
        creg::COMMAND as u16,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    let bars = bus.bars(bdf);
    assert_eq!(bars.len(), 1);
    let base = bars[0].live.expect("BAR0 decoded");
    let rd = |off: u64| {
        let mut b = [0u8; 4];
        bus.mmio.read(base + off, &mut b).unwrap();
        u32::from_le_bytes(b)
    };
    let wr = |off: u64, v: u32| bus.mmio.write(base + off, &v.to_le_bytes()).unwrap();
    assert_eq!(rd(reg::ID), abi::ID_VALUE);
    mem.map(None, RING, 64 * 2);
    mem.map(None, COMP, 16);
    mem.put(None, 0x1000, &pattern(30, 100));
    mem.map(None, 0x9000, 100);
    let mut d = desc(None, 0, 0x1000, 0x9000, 100);
    d.completion = COMP;
    mem.put(None, RING, &d.encode());
    bus.mmio
        .write(base + reg::RING_BASE, &RING.to_le_bytes())
        .unwrap();
    wr(reg::RING_SIZE, 2);
    wr(reg::CTRL, ctrl::ENABLE);
    wr(reg::RING_TAIL, 1);
    until("the copy", || {
        let b: [u8; 16] = mem.get(None, COMP, 16)?.try_into().ok()?;
        (abi::decode_completion(&b) == (1, 100)).then_some(())
    });
    assert_eq!(mem.get(None, 0x9000, 100).unwrap(), pattern(30, 100));
    until("the counter", || {
        (handle.counters().descriptors == 1).then_some(())
    });
    dev.lock().unwrap().removed();
}

/// PRI enabled with an Outstanding Page Request Allocation of 0: the engine may not send a
/// page request, so a fault ends the descriptor.
#[test]
fn sva_pri_allocation_zero_sends_nothing() {
    let mut r = rig(opts(1000));
    cfg_write(&mut r.eng, caps::PRI_CAP + 12, &0u32.to_le_bytes());
    assert_eq!(r.eng.cap_state().pri_alloc, 0);
    r.mem.put(Some(3), 0x1000, &pattern(8, 64));
    let at = r.submit(desc(Some(3), 0, 0x1000, 0x9000, 64));
    assert_eq!(r.status(at), CompletionStatus::PageFault);
    assert!(r.prq.try_recv().is_err());
    // The log shows the copy was issued without PRI.
    assert!(r
        .mem
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.0 == Some(3))
        .all(|l| !l.3.pri));
}

/// A VM reset returns the function to its reset state: capabilities disabled, MSI-X
/// released, ring registers cleared, and the worker still serves a reprogrammed ring.
#[test]
fn sva_vm_reset() {
    let mut r = rig(opts(1000));
    assert!(r.eng.cap_state().pasid.enabled && r.eng.cap_state().pri_enabled);
    r.eng.reset();
    let st = r.eng.cap_state();
    assert!(!st.pasid.enabled && !st.pri_enabled && !st.bus_master);
    assert_eq!(bar_r32(&mut r.eng, reg::STATUS), 0);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_SIZE), 0);
    assert_eq!(bar_r32(&mut r.eng, reg::RING_BASE), 0);
    assert!(
        r.sink.fds.lock().unwrap().is_empty(),
        "MSI-X routes released"
    );
    // Reprogrammed as a driver would after boot, the same engine runs descriptors again.
    cfg_write(
        &mut r.eng,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    bar_w32(&mut r.eng, reg::RING_BASE, RING as u32);
    bar_w32(&mut r.eng, reg::RING_SIZE, r.size);
    bar_w32(&mut r.eng, reg::CTRL, ctrl::ENABLE);
    r.tail = 0;
    r.mem.put(None, 0x1000, &pattern(1, 64));
    r.mem.map(None, 0x9000, 64);
    let at = r.submit(desc(None, 0, 0x1000, 0x9000, 64));
    assert_eq!(r.completion(at), (1, 64));
    // PASID is disabled after the reset: a PASID descriptor is refused.
    let at = r.submit_in(desc(Some(1), 0, 0x1000, 0x9000, 64), None);
    assert_eq!(r.status(at), CompletionStatus::BadPasid);
}

/// The guest disables PRI while a page request is outstanding: the outstanding request
/// still completes, but the retry sends no new one (PAGE_FAULT). Clearing PASID Enable
/// under a PASID descriptor abandons it.
#[test]
fn sva_pri_and_pasid_disable_mid_descriptor() {
    let mut r = rig(opts(10_000));
    r.mem.put(Some(3), 0x1000, &pattern(8, 64));
    let at = r.submit(desc(Some(3), 0, 0x1000, 0x9000, 64));
    let q = r.request();
    cfg_write(&mut r.eng, caps::PRI_CAP + 4, &0u16.to_le_bytes());
    q.answer.send(PageResponseCode::Success).unwrap();
    assert_eq!(r.status(at), CompletionStatus::PageFault);
    assert!(
        r.prq.try_recv().is_err(),
        "no page request after PRI disable"
    );

    let mut r = rig(opts(60_000));
    r.mem.put(Some(3), 0x1000, &pattern(8, 64));
    let at = r.submit(desc(Some(3), 0, 0x1000, 0x9000, 64));
    let _q = r.request();
    cfg_write(&mut r.eng, caps::PASID_CAP + 6, &0u16.to_le_bytes());
    until("BUSY to clear", || {
        (bar_r32(&mut r.eng, reg::STATUS) & status::BUSY == 0).then_some(())
    });
    until("the abandon", || {
        (r.eng.counters().abandoned == 1).then_some(())
    });
    assert_eq!(r.mem.get(Some(3), at.1, 16).unwrap(), vec![0; 16]);
}
