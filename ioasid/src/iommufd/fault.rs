//! The kernel's fault queue (`IOMMU_FAULT_QUEUE_ALLOC`): a non-blocking fd that yields
//! `struct iommu_hwpt_pgfault` records and takes `struct iommu_hwpt_page_response` writes.
//!
//! The kernel hands out whole page request groups only: a `read()` whose buffer cannot hold
//! the next group returns nothing (0, or `EINVAL` on some kernels) while the fd stays
//! readable. A fixed buffer smaller than the largest group the device sends would wedge the
//! queue for good: the group is never read, so never answered, and its timeout answer never
//! comes. [`read_records`] therefore grows its buffer (doubling, up to [`MAX_RECORDS`]) and
//! retries whenever a read returns nothing while `poll` still reports records.

use std::fs::File;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use iommufd_bindings::iommufd::iommu_hwpt_pgfault;

use crate::backend::FaultQueue;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::fault_types::{FaultRecord, PageFault, PageResponse};
use crate::types::FaultId;

/// Bytes of one record (`struct iommu_hwpt_pgfault`).
pub const RECORD: usize = std::mem::size_of::<iommu_hwpt_pgfault>();
/// Records the first read asks for (QEMU's PRQ series reads batches of 2048).
pub const INITIAL_RECORDS: usize = 256;
/// The largest group the reader grows to: 65536 records (3 MiB). A PCIe page request group
/// has no architectural size limit; past this the group is reported, not read.
pub const MAX_RECORDS: usize = 1 << 16;
/// Reads per [`read_records`] call, so one busy queue cannot starve the event loop.
const MAX_READS: usize = 64;

/// A kernel fault queue.
#[derive(Debug)]
pub struct KernelFaultQueue {
    id: FaultId,
    file: File,
    /// The read buffer: a whole number of records, grown for large groups and kept.
    buf: Vec<u8>,
}

/// What [`read_records`] needs of a fault fd: the kernel's, or a fake in the tests.
pub trait FaultFd {
    /// One `read()`.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Whether records are waiting (`poll` reports `POLLIN` without waiting).
    fn readable(&self) -> io::Result<bool>;
}

impl FaultFd for File {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Read::read(self, buf)
    }

    fn readable(&self) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: `p` is one valid pollfd for the duration of the call; timeout 0.
            let r = unsafe { libc::poll(&mut p, 1, 0) };
            if r >= 0 {
                return Ok(r > 0 && p.revents & libc::POLLIN != 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Reads every record waiting on `fd` (up to 64 reads), growing `buf` whenever a
/// read returns nothing while records wait: the next group is larger than the buffer.
/// `buf` keeps its size for the next call. A group larger than [`MAX_RECORDS`] records is an
/// `E2BIG` error (the queue is then wedged by the kernel's rules, and the caller knows it).
pub fn read_records(
    fd: &mut dyn FaultFd,
    buf: &mut Vec<u8>,
    id: FaultId,
) -> Result<Vec<PageFault>> {
    let err = |e: io::Error| Error::kernel(Op::FaultRead, Ctx::object(id.0), e);
    if buf.len() < RECORD || !buf.len().is_multiple_of(RECORD) {
        buf.resize(RECORD * INITIAL_RECORDS, 0);
    }
    let mut out = Vec::new();
    let mut reads = 0;
    while reads < MAX_READS {
        reads += 1;
        let empty = match fd.read(buf) {
            Ok(0) => true,
            Ok(n) => {
                out.extend(decode_records(buf.get(..n).unwrap_or(buf)));
                false
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => true,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(err(e)),
        };
        if !empty {
            continue;
        }
        if !fd.readable().map_err(err)? {
            break;
        }
        // Records wait but none fit: the next group is larger than the buffer.
        let records = buf.len() / RECORD;
        if records >= MAX_RECORDS {
            return Err(err(io::Error::from_raw_os_error(libc::E2BIG)));
        }
        buf.resize(RECORD * (records * 2).min(MAX_RECORDS), 0);
    }
    Ok(out)
}

impl KernelFaultQueue {
    /// Wraps the fd `IOMMU_FAULT_QUEUE_ALLOC` returned and makes it non-blocking.
    pub fn new(id: u32, file: File) -> Result<Self> {
        // SAFETY: fcntl on an fd we own, with integer arguments only; the result is checked.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        let set = if flags < 0 {
            -1
        } else {
            // SAFETY: as above; F_SETFL with the flags just read plus O_NONBLOCK.
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) }
        };
        if set < 0 {
            return Err(Error::kernel(
                Op::FaultQueueAlloc,
                Ctx::object(id),
                Errno::last(),
            ));
        }
        Ok(KernelFaultQueue {
            id: FaultId(id),
            file,
            buf: vec![0; RECORD * INITIAL_RECORDS],
        })
    }
}

/// Decodes whole records from `buf` (a partial trailing record is impossible from the
/// kernel, which only returns whole records, but is ignored defensively).
pub fn decode_records(buf: &[u8]) -> Vec<PageFault> {
    buf.chunks_exact(RECORD)
        .map(|c| {
            let u32_at = |o: usize| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
            let mut a = [0u8; 8];
            a.copy_from_slice(&c[24..32]);
            let raw = iommu_hwpt_pgfault {
                flags: u32_at(0),
                dev_id: u32_at(4),
                pasid: u32_at(8),
                grpid: u32_at(12),
                perm: u32_at(16),
                __reserved: 0,
                addr: u64::from_le_bytes(a),
                length: u32_at(32),
                cookie: u32_at(36),
            };
            PageFault::from_raw(&raw)
        })
        .collect()
}

impl FaultQueue for KernelFaultQueue {
    fn id(&self) -> FaultId {
        self.id
    }

    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn read_records(&mut self) -> Result<Vec<FaultRecord>> {
        let faults = read_records(&mut self.file, &mut self.buf, self.id)?;
        Ok(faults.into_iter().map(FaultRecord::PageRequest).collect())
    }

    fn respond(&mut self, response: PageResponse) -> Result<()> {
        let raw = response.to_raw();
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&raw.cookie.to_le_bytes());
        b[4..].copy_from_slice(&raw.code.to_le_bytes());
        match self.file.write(&b) {
            Ok(8) => Ok(()),
            Ok(_) => Err(Error::kernel(
                Op::PageResponse,
                Ctx::object(self.id.0),
                Errno(libc::EIO),
            )),
            Err(e) => Err(Error::kernel(Op::PageResponse, Ctx::object(self.id.0), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_whole_records_only() {
        let f = PageFault {
            dev: crate::DevId(4),
            pasid: None,
            grpid: 2,
            perm: crate::FaultPerm {
                read: true,
                ..Default::default()
            },
            addr: 0xdeadbeaf,
            length: 0,
            cookie: 11,
            last_page: true,
        };
        let raw = f.to_raw();
        let mut bytes = Vec::new();
        for v in [raw.flags, raw.dev_id, raw.pasid, raw.grpid, raw.perm, 0] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        bytes.extend_from_slice(&raw.addr.to_le_bytes());
        bytes.extend_from_slice(&raw.length.to_le_bytes());
        bytes.extend_from_slice(&raw.cookie.to_le_bytes());
        assert_eq!(bytes.len(), RECORD);
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes[..20]);
        assert_eq!(decode_records(&two), vec![f]);
    }
}
