//! Device DMA through the soft IOMMU: translation of one (device, PASID, address) and the
//! `read`/`write` API for emulated devices, split at 4 KiB page boundaries.
//!
//! A DMA holds the backend's state lock (shared) from translation to the end of its copy, and
//! stage-2 unmaps take it exclusively before invalidating the IOTLB: once `ioas_unmap` has
//! returned, no access can reach the unmapped memory.
//!
//! On a translation failure the DMA stops at the faulting page (earlier pages were already
//! transferred, as with a real device's earlier TLPs) and returns:
//! - [`DmaError::PageRequest`] when the request was made with PRI ([`DmaRequest::pri`]), the
//!   attached HWPT has a fault queue, and the fault is one a page request can fix (a
//!   not-present or permission fault of the stage the owner controls: stage 1 when nested,
//!   stage 2 otherwise). The [`PendingPageRequest`] is waited on or polled; on `Success` the
//!   device retries the access, on `Invalid` it aborts. [`SoftIommu::dma_read_wait`] and
//!   [`SoftIommu::dma_write_wait`] do that loop.
//! - [`DmaError::Fault`] otherwise: an unrecoverable fault, logged and delivered to the
//!   HWPT's fault queue as [`FaultRecord::Unrecoverable`](crate::FaultRecord) when it has one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use thiserror::Error;

use crate::fault_types::{FaultPerm, FaultReason, PageFault, PageResponseCode, UnrecoverableFault};
use crate::types::{DevId, Pasid};

use super::fault::PendingPageRequest;
use super::iotlb::{Entry, Rights, Tag};
use super::table::S2Tables;
use super::walk_s1::walk_first_stage;
use super::walk_sl::walk_second_level;
use super::{pasid_tag, GuestTable, SoftIommu, State};

/// The 4 KiB page holding `addr`.
#[inline]
fn page_of(addr: u64) -> u64 {
    addr & !0xfff
}

/// How a device issues a DMA.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DmaRequest {
    /// A privileged (supervisor) request.
    pub privileged: bool,
    /// An instruction fetch (reads only).
    pub exec: bool,
    /// The device uses PRI: translation faults become page requests when they can.
    pub pri: bool,
}

/// Why a DMA did not complete.
#[derive(Debug, Error)]
pub enum DmaError {
    /// An unrecoverable translation fault.
    #[error("DMA fault for device {} at IOVA {:#x}: {:?}", .0.dev.0, .0.addr, .0.reason)]
    Fault(UnrecoverableFault),
    /// A page request was raised; wait for its answer and retry.
    #[error("DMA raised a page request for device {} at IOVA {:#x}", .0.fault().dev.0, .0.fault().addr)]
    PageRequest(PendingPageRequest),
    /// The page request was answered `Invalid` (or could not be queued).
    #[error("Page request for device {} at IOVA {:#x} was answered Invalid", .0.dev.0, .0.addr)]
    Aborted(PageFault),
    /// Nobody answered the page request in time.
    #[error("Page request for device {} at IOVA {:#x} was not answered in time", .0.dev.0, .0.addr)]
    Timeout(PageFault),
}

/// A failed walk, before it becomes a fault record.
struct Miss {
    reason: FaultReason,
    recoverable: bool,
    queue: Option<u32>,
}

impl Miss {
    fn unrecoverable(reason: FaultReason) -> Self {
        Miss {
            reason,
            recoverable: false,
            queue: None,
        }
    }
}

/// Retries of a `_wait` DMA before it gives up on a device that keeps faulting.
const MAX_PAGE_REQUEST_RETRIES: usize = 64;

impl SoftIommu {
    /// Walks (stage 1 if nested, then stage 2) and builds the IOTLB entry for `addr`.
    fn walk(
        &self,
        st: &State,
        dev: DevId,
        tag: u32,
        addr: u64,
        access: FaultPerm,
    ) -> Result<Entry, Miss> {
        let att = st
            .devices
            .get(&dev.0)
            .and_then(|d| d.attach.get(&tag))
            .ok_or(Miss::unrecoverable(FaultReason::NoContext))?;
        let ioas = st
            .ioas
            .get(&att.ioas)
            .ok_or(Miss::unrecoverable(FaultReason::NoContext))?;
        self.walks.fetch_add(1, Ordering::Relaxed);
        let nested = att.table.is_some();
        let (s2_in, leaf_base, leaf_size, rights) = match att.table {
            Some(table) => {
                let mut mem = S2Tables::new(ioas, &self.ram);
                let r = match table {
                    GuestTable::FirstStage(cfg) => walk_first_stage(&mut mem, &cfg, addr, access)
                        .map(|l| {
                            let rights = Rights::Nested {
                                s1: l.rights,
                                sre: cfg.sre,
                                wpe: cfg.wpe,
                            };
                            (l.gpa, l.page_base, l.page_size, rights)
                        }),
                    GuestTable::SecondLevel(cfg) => walk_second_level(&mut mem, &cfg, addr, access)
                        .map(|l| {
                            let rights = Rights::SecondLevel {
                                read: l.read,
                                write: l.write,
                                exec: l.exec,
                            };
                            (l.addr, l.page_base, l.page_size, rights)
                        }),
                };
                self.table_reads
                    .fetch_add(u64::from(mem.reads), Ordering::Relaxed);
                self.table_updates
                    .fetch_add(u64::from(mem.updates), Ordering::Relaxed);
                match r {
                    Ok(v) => v,
                    Err(f) => {
                        let fixable = f.level != 0
                            && matches!(
                                f.reason,
                                FaultReason::NotPresent | FaultReason::Permission
                            );
                        return Err(Miss {
                            reason: f.reason,
                            recoverable: fixable,
                            queue: att.fault,
                        });
                    }
                }
            }
            None => (addr, page_of(addr), 4096, Rights::Stage2),
        };
        let page = page_of(s2_in);
        let s2_miss = |reason| Miss {
            reason,
            recoverable: !nested,
            queue: att.fault,
        };
        let hit = ioas
            .translate(page)
            .ok_or_else(|| s2_miss(FaultReason::NotPresent))?;
        let need_read = access.read || access.exec;
        if (need_read && !hit.perm.read) || (access.write && !hit.perm.write) {
            return Err(s2_miss(FaultReason::Permission));
        }
        if !self.ram.contains(hit.hva, 4096) {
            // Stage 2 only ever maps registered RAM; this is a second line of defence.
            return Err(Miss::unrecoverable(FaultReason::AddressOutOfRange));
        }
        Ok(Entry {
            vpn: addr >> 12,
            tag: Tag {
                dev: dev.0,
                pasid: tag,
                domain: att.domain,
            },
            ioas: att.ioas,
            hva_page: hit.hva,
            s2_page: page,
            leaf_base,
            leaf_size,
            s2_read: hit.perm.read,
            s2_write: hit.perm.write,
            rights,
        })
    }

    /// Turns a miss into a fault record, delivered where it belongs.
    #[allow(clippy::too_many_arguments)]
    fn raise(
        &self,
        st: &State,
        dev: DevId,
        pasid: Option<Pasid>,
        addr: u64,
        len: u32,
        access: FaultPerm,
        pri: bool,
        miss: Miss,
    ) -> DmaError {
        let queue = miss.queue.and_then(|q| st.faults.get(&q));
        if miss.recoverable && pri {
            if let (Some(q), Some(d)) = (queue, st.devices.get(&dev.0)) {
                let grpid = d.next_grpid.fetch_add(1, Ordering::Relaxed) & 0x1ff;
                let mut pf = PageFault {
                    dev,
                    pasid,
                    grpid,
                    perm: access,
                    addr: addr & !0xfff,
                    length: len,
                    cookie: 0,
                    last_page: true,
                };
                return match q.push_page_request(pf) {
                    Some(cookie) => {
                        pf.cookie = cookie;
                        DmaError::PageRequest(PendingPageRequest::new(q.clone(), pf))
                    }
                    None => DmaError::Aborted(pf),
                };
            }
        }
        let f = UnrecoverableFault {
            dev,
            pasid,
            addr,
            perm: access,
            reason: miss.reason,
        };
        self.log_fault(f);
        if let Some(q) = queue {
            q.push_unrecoverable(f);
        }
        DmaError::Fault(f)
    }

    /// Translates `addr` for an access of `len` bytes within its page, with the state lock
    /// held by the caller.
    #[allow(clippy::too_many_arguments)]
    fn translate_locked(
        &self,
        st: &State,
        dev: DevId,
        pasid: Option<Pasid>,
        addr: u64,
        len: u32,
        access: FaultPerm,
        pri: bool,
    ) -> Result<u64, DmaError> {
        let tag = pasid_tag(pasid);
        let generation = {
            let mut tlb = self.tlb();
            if let Some(e) = tlb.lookup(dev.0, tag, addr, access) {
                return Ok(e.hva_page | (addr & 0xfff));
            }
            tlb.generation()
        };
        match self.walk(st, dev, tag, addr, access) {
            Ok(e) => {
                // Not cached if a guest invalidation ran during the walk (it may have been
                // for the entries just read).
                self.tlb().insert_if_generation(e, generation);
                Ok(e.hva_page | (addr & 0xfff))
            }
            Err(miss) => Err(self.raise(st, dev, pasid, addr, len, access, pri, miss)),
        }
    }

    /// Translates one address as a device access would, through the IOTLB; returns the host
    /// address. Faults are delivered as for a DMA. The result is only a snapshot: use
    /// [`SoftIommu::dma_read`]/[`SoftIommu::dma_write`] to access memory.
    pub fn translate(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        iova: u64,
        access: FaultPerm,
        pri: bool,
    ) -> Result<u64, DmaError> {
        let st = self.read_state();
        self.translate_locked(&st, dev, pasid, iova, 1, access, pri)
    }

    #[allow(clippy::too_many_arguments)]
    fn dma(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        iova: u64,
        len: usize,
        req: DmaRequest,
        write: bool,
        mut copy: impl FnMut(u64, usize, usize) -> bool,
    ) -> Result<(), DmaError> {
        let access = FaultPerm {
            read: !write,
            write,
            exec: req.exec && !write,
            privileged: req.privileged,
        };
        let st = self.read_state();
        let mut done = 0usize;
        while done < len {
            let Some(addr) = iova.checked_add(done as u64) else {
                let miss = Miss::unrecoverable(FaultReason::AddressOutOfRange);
                return Err(self.raise(&st, dev, pasid, iova, 0, access, false, miss));
            };
            let chunk = (len - done).min(4096 - (addr & 0xfff) as usize);
            let hva =
                self.translate_locked(&st, dev, pasid, addr, chunk as u32, access, req.pri)?;
            if !copy(hva, done, chunk) {
                let miss = Miss::unrecoverable(FaultReason::AddressOutOfRange);
                return Err(self.raise(&st, dev, pasid, addr, chunk as u32, access, false, miss));
            }
            done += chunk;
        }
        Ok(())
    }

    /// A device reads `buf.len()` bytes at `iova` (of `pasid`, or without a PASID).
    pub fn dma_read(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &mut [u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        let len = buf.len();
        self.dma(dev, pasid, iova, len, req, false, |hva, off, n| {
            self.ram.read_bytes(hva, &mut buf[off..off + n])
        })
    }

    /// A device writes `buf` at `iova` (of `pasid`, or without a PASID).
    pub fn dma_write(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &[u8],
        req: DmaRequest,
    ) -> Result<(), DmaError> {
        self.dma(dev, pasid, iova, buf.len(), req, true, |hva, off, n| {
            self.ram.write_bytes(hva, &buf[off..off + n])
        })
    }

    fn retry_loop(
        &self,
        timeout: Duration,
        mut op: impl FnMut() -> Result<(), DmaError>,
    ) -> Result<(), DmaError> {
        for _ in 0..MAX_PAGE_REQUEST_RETRIES {
            match op() {
                Err(DmaError::PageRequest(p)) => match p.wait(timeout) {
                    Some(PageResponseCode::Success) => continue,
                    Some(PageResponseCode::Invalid) => return Err(DmaError::Aborted(*p.fault())),
                    None => return Err(DmaError::Timeout(*p.fault())),
                },
                other => return other,
            }
        }
        op()
    }

    /// [`SoftIommu::dma_read`] that waits for page responses (up to `timeout` each) and
    /// retries after `Success`. Must not run on the thread that answers the fault queue.
    pub fn dma_read_wait(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &mut [u8],
        req: DmaRequest,
        timeout: Duration,
    ) -> Result<(), DmaError> {
        self.retry_loop(timeout, || self.dma_read(dev, pasid, iova, buf, req))
    }

    /// [`SoftIommu::dma_write`] that waits for page responses and retries after `Success`.
    pub fn dma_write_wait(
        &self,
        dev: DevId,
        pasid: Option<Pasid>,
        iova: u64,
        buf: &[u8],
        req: DmaRequest,
        timeout: Duration,
    ) -> Result<(), DmaError> {
        self.retry_loop(timeout, || self.dma_write(dev, pasid, iova, buf, req))
    }
}
