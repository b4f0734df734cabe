//! The fault path between the host's fault queues and the guest's page request queue (PRQ).
//!
//! Host side: each device behind the bridge whose HWPTs can fault to the guest gets one host
//! fault queue (the soft backend's for an emulated device, iommufd's fault fd for an assigned
//! one on a host with nesting and PRS), wrapped in an [`ioasid::FaultHandler`] (groups,
//! deadlines). Every HWPT the bridge allocates for that device names it.
//!
//! [`VtdBridge::pump`] reads the queues and turns each complete page request group into
//! page request descriptors in the guest's PRQ ([`Vtd::post_page_request`]: PASID, PRGI,
//! last-page bit, R/W/X/PRIV, address; the model raises the page request event). The host
//! PASID is translated back to the guest's, and each group gets a guest PRGI that is free
//! for its (device, PASID) (the host's group index when it is free), so that the guest's
//! page group response ([`ViommuBridge::page_response`](devices::viommu::ViommuBridge)) is
//! matched by (BDF, PASID, PRGI) to the host cookie of the group.
//!
//! Answers the bridge gives the host itself:
//! - a full guest PRQ (or PRS.PRO still set): `Success`, so the device retries (QEMU's
//!   design; the retry faults again once the guest has drained the queue), counted;
//! - a guest that does not take page requests from the device (PRE clear, translation off,
//!   no PRQ): `Invalid`;
//! - a group the guest did not answer within the bridge's page request timeout
//!   ([`PAGE_REQUEST_TIMEOUT`](super::bridge::PAGE_REQUEST_TIMEOUT) unless
//!   [`VtdBridge::with_page_request_timeout`] says otherwise): `Invalid`
//!   ([`ioasid::FaultHandler::expire`]);
//! - a PASID the guest tears down (or a device removed) with groups outstanding: `Invalid`.
//!
//! Who runs the pump: [`FaultPump`], one thread per VM with a vIOMMU that offers page
//! requests, which `poll(2)`s the queues' fds (re-read every [`PUMP_TICK`], which also drives
//! the timeouts). Tests call [`VtdBridge::pump`] themselves with the instant they want.
//!
//! Lock order: the model's lock, then the bridge's state. The pump never holds the bridge's
//! state while it takes the model's lock (the model calls `page_response` with its own lock
//! held).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::pci::PciBdf;
use devices::viommu::{GuestPageResponse, PageRequest, PrqError, Vtd};
use ioasid::{FaultGroup, FaultHandler, PageResponseCode, Pasid};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::view::BridgeCounters;
use super::VtdBridge;

/// How often the pump thread wakes without a readable queue (new queues, timeouts).
pub const PUMP_TICK: Duration = Duration::from_millis(100);

/// A page request group in the guest's eyes: (device, guest PASID, guest PRGI).
type GroupKey = (PciBdf, Option<Pasid>, u16);

/// PRGIs are 9 bits.
const PRGI_MASK: u16 = 0x1ff;

/// Page request groups forwarded to the guest and not answered yet.
#[derive(Debug, Default)]
pub(super) struct PrqState {
    /// Guest group -> host cookie.
    groups: BTreeMap<GroupKey, u32>,
}

impl PrqState {
    /// A PRGI free for (bdf, pasid): `want` if free, else the first free one.
    fn alloc_prgi(&self, bdf: PciBdf, pasid: Option<Pasid>, want: u16) -> Option<u16> {
        let free = |p: u16| !self.groups.contains_key(&(bdf, pasid, p));
        let want = want & PRGI_MASK;
        if free(want) {
            return Some(want);
        }
        (0..=PRGI_MASK).find(|p| free(*p))
    }

    /// Answers `Invalid` every outstanding group of `bdf` whose guest PASID `which` selects
    /// (`None`: all), through the device's handler; returns how many.
    pub(super) fn answer_device(
        &mut self,
        h: &mut FaultHandler,
        bdf: PciBdf,
        which: Option<Option<Pasid>>,
        counters: &mut BridgeCounters,
    ) -> u64 {
        let keys: Vec<GroupKey> = self
            .groups
            .keys()
            .filter(|(b, p, _)| *b == bdf && which.is_none_or(|w| w == *p))
            .copied()
            .collect();
        let mut n = 0;
        for k in keys {
            let Some(cookie) = self.groups.remove(&k) else {
                continue;
            };
            match h.respond(cookie, PageResponseCode::Invalid) {
                Ok(()) => {
                    n += 1;
                    counters.page_requests_torn_down += 1;
                }
                Err(e) => {
                    counters.host_errors += 1;
                    warn!("vIOMMU {bdf}: answering group {} on teardown: {e}", k.2);
                }
            }
        }
        n
    }

    /// Forgets the groups of `bdf` whose host cookie is in `cookies` (answered elsewhere).
    fn forget(&mut self, bdf: PciBdf, cookies: &[u32]) {
        self.groups
            .retain(|(b, _, _), c| *b != bdf || !cookies.contains(c));
    }
}

/// What one [`VtdBridge::pump`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PumpReport {
    /// Page request descriptors written to the guest's PRQ.
    pub posted: u64,
    /// Groups answered `Success` because the guest's PRQ was full.
    pub prq_full: u64,
    /// Groups answered `Invalid` because the guest does not take them.
    pub refused: u64,
    /// Groups answered `Invalid` on timeout.
    pub timeouts: u64,
}

/// One group ready for the guest.
struct Outgoing {
    bdf: PciBdf,
    key: GroupKey,
    reqs: Vec<PageRequest>,
}

fn requests(bdf: PciBdf, pasid: Option<Pasid>, prgi: u16, g: &FaultGroup) -> Vec<PageRequest> {
    let n = g.faults.len();
    g.faults
        .iter()
        .enumerate()
        .map(|(i, f)| PageRequest {
            bdf,
            pasid,
            prgi,
            last: i + 1 == n,
            read: f.perm.read,
            write: f.perm.write,
            exec: f.perm.exec,
            privileged: f.perm.privileged,
            addr: f.addr & !0xfff,
        })
        .collect()
}

impl VtdBridge {
    /// The fds of the host fault queues (for the pump's `poll`).
    pub fn fault_fds(&self) -> Vec<RawFd> {
        let st = self.lock();
        st.devices
            .values()
            .filter_map(|d| d.fault.as_ref().map(FaultHandler::as_raw_fd))
            .collect()
    }

    /// Moves host page requests into the guest's PRQ and answers what the guest cannot
    /// (full queue, refused, timed out at `now`). See the module doc.
    pub fn pump(&self, vtd: &Mutex<Vtd>, now: Instant) -> PumpReport {
        let mut rep = PumpReport::default();
        let mut out: Vec<Outgoing> = Vec::new();
        {
            let mut st = self.lock();
            let st = &mut *st;
            for (bdf, d) in st.devices.iter_mut() {
                let Some(h) = d.fault.as_mut() else { continue };
                match h.expire(now) {
                    Ok(c) => {
                        rep.timeouts += c.len() as u64;
                        st.counters.page_request_timeouts += c.len() as u64;
                        st.prq.forget(*bdf, &c);
                    }
                    Err(e) => {
                        st.counters.host_errors += 1;
                        warn!("vIOMMU {bdf}: answering timed-out page requests: {e}");
                    }
                }
                let groups = match h.poll(now) {
                    Ok(g) => g,
                    Err(e) => {
                        st.counters.host_errors += 1;
                        warn!("vIOMMU {bdf}: reading the host fault queue: {e}");
                        continue;
                    }
                };
                let lost = h.take_unrecoverable();
                st.counters.host_unrecoverable_faults += lost.len() as u64;
                for g in groups {
                    st.counters.page_requests += g.faults.len() as u64;
                    // The host PASID back to the guest's; a host PASID the guest no longer
                    // has (torn down meanwhile) cannot be answered by the guest.
                    let pasid = match g.pasid {
                        None => None,
                        Some(hp) => match d.host_pasids.guest_of(hp) {
                            Some(gp) => Some(gp),
                            None => {
                                answer(h, &mut st.counters, *bdf, g.cookie, false);
                                rep.refused += 1;
                                continue;
                            }
                        },
                    };
                    let Some(prgi) = st.prq.alloc_prgi(*bdf, pasid, g.grpid as u16) else {
                        answer(h, &mut st.counters, *bdf, g.cookie, false);
                        rep.refused += 1;
                        continue;
                    };
                    let key = (*bdf, pasid, prgi);
                    st.prq.groups.insert(key, g.cookie);
                    out.push(Outgoing {
                        bdf: *bdf,
                        key,
                        reqs: requests(*bdf, pasid, prgi, &g),
                    });
                }
            }
        }
        if out.is_empty() {
            return rep;
        }
        // Post with the model's lock only.
        let mut failed: Vec<(Outgoing, PrqError)> = Vec::new();
        {
            let mut m = vtd.lock().unwrap_or_else(|e| e.into_inner());
            for o in out {
                let mut err = None;
                for r in &o.reqs {
                    match m.post_page_request(*r) {
                        Ok(()) => rep.posted += 1,
                        Err(e) => {
                            err = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = err {
                    failed.push((o, e));
                }
            }
        }
        if failed.is_empty() {
            return rep;
        }
        let mut st = self.lock();
        let st = &mut *st;
        for (o, e) in failed {
            // The guest may have answered meanwhile (a partial group cannot be answered by
            // a Linux guest, but a hostile one may): answer only what is still ours.
            let Some(cookie) = st.prq.groups.remove(&o.key) else {
                continue;
            };
            let Some(h) = st.devices.get_mut(&o.bdf).and_then(|d| d.fault.as_mut()) else {
                continue;
            };
            let full = matches!(e, PrqError::Full { .. });
            if full {
                rep.prq_full += 1;
                st.counters.prq_full_answers += 1;
            } else {
                rep.refused += 1;
                st.counters.page_requests_refused += 1;
                debug!("vIOMMU {}: page request not queued: {e}", o.bdf);
            }
            answer(h, &mut st.counters, o.bdf, cookie, full);
        }
        rep
    }

    /// The guest's page group response: the host response for the group it names.
    pub(super) fn answer_guest(&self, resp: GuestPageResponse) {
        let mut st = self.lock();
        let st = &mut *st;
        let key = (
            resp.bdf,
            resp.pasid.filter(|p| p.0 != 0),
            resp.prgi & PRGI_MASK,
        );
        let Some(cookie) = st.prq.groups.remove(&key) else {
            // Answered already (timeout, teardown) or never asked: the spec drops it.
            st.counters.page_responses_unmatched += 1;
            debug!(
                "vIOMMU {}: page group response for PASID {:?} PRGI {} matches no request",
                resp.bdf, resp.pasid, resp.prgi
            );
            return;
        };
        let Some(h) = st.devices.get_mut(&resp.bdf).and_then(|d| d.fault.as_mut()) else {
            st.counters.page_responses_unmatched += 1;
            return;
        };
        match h.respond(cookie, resp.code) {
            Ok(()) => match resp.code {
                PageResponseCode::Success => st.counters.page_responses_success += 1,
                PageResponseCode::Invalid => st.counters.page_responses_invalid += 1,
            },
            Err(e) => {
                st.counters.host_errors += 1;
                warn!(
                    "vIOMMU {}: page response for PRGI {}: {e}",
                    resp.bdf, resp.prgi
                );
            }
        }
    }
}

/// Answers a group the guest will not see (`success`: the device retries).
fn answer(h: &mut FaultHandler, c: &mut BridgeCounters, bdf: PciBdf, cookie: u32, success: bool) {
    let code = if success {
        PageResponseCode::Success
    } else {
        PageResponseCode::Invalid
    };
    if let Err(e) = h.respond(cookie, code) {
        c.host_errors += 1;
        warn!("vIOMMU {bdf}: answering a page request the guest cannot take: {e}");
    }
}

/// The pump thread: polls the bridge's host fault queues and runs [`VtdBridge::pump`].
#[derive(Debug)]
pub struct FaultPump {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl FaultPump {
    /// Starts the thread for `bridge` and its model `vtd`.
    pub fn spawn(bridge: Arc<VtdBridge>, vtd: Arc<Mutex<Vtd>>) -> std::io::Result<Self> {
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("viommu-prq".into())
            .spawn(move || run(&bridge, &vtd, &s))?;
        Ok(FaultPump {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FaultPump {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(bridge: &VtdBridge, vtd: &Mutex<Vtd>, stop: &EventFd) {
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(stop.as_raw_fd())
            .chain(bridge.fault_fds())
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let tick = PUMP_TICK.as_millis() as libc::c_int;
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd structs
        // for the duration of the call; poll only writes their `revents`.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, tick) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                warn!("vIOMMU page request pump: poll: {e}");
                std::thread::sleep(PUMP_TICK);
            }
        }
        if fds.first().is_some_and(|f| f.revents != 0) {
            return;
        }
        bridge.pump(vtd, Instant::now());
    }
}
