//! The kernel's fault queue (`IOMMU_FAULT_QUEUE_ALLOC`): a non-blocking fd that yields
//! `struct iommu_hwpt_pgfault` records and takes `struct iommu_hwpt_page_response` writes.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use iommufd_bindings::iommufd::iommu_hwpt_pgfault;

use crate::backend::FaultQueue;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::fault_types::{FaultRecord, PageFault, PageResponse};
use crate::types::FaultId;

const RECORD: usize = std::mem::size_of::<iommu_hwpt_pgfault>();
/// Records read per `read()` call (QEMU reads batches of 100 too).
const BATCH: usize = 64;

/// A kernel fault queue.
#[derive(Debug)]
pub struct KernelFaultQueue {
    id: FaultId,
    file: File,
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
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECORD * BATCH];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    out.extend(
                        decode_records(&buf[..n])
                            .into_iter()
                            .map(FaultRecord::PageRequest),
                    );
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::kernel(Op::FaultRead, Ctx::object(self.id.0), e)),
            }
        }
        Ok(out)
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
