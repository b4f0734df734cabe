//! I/O page fault records, as the kernel reports them (`struct iommu_hwpt_pgfault`) and as the
//! soft backend synthesizes them, and the page response (`struct iommu_hwpt_page_response`).

use serde::{Deserialize, Serialize};

use crate::types::{DevId, Pasid};

/// Access permissions of a faulting request (`IOMMU_PGFAULT_PERM_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FaultPerm {
    /// A read.
    pub read: bool,
    /// A write.
    pub write: bool,
    /// An instruction fetch.
    pub exec: bool,
    /// A privileged (supervisor) request.
    pub privileged: bool,
}

/// One page request: a single `iommu_hwpt_pgfault` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageFault {
    /// The device that faulted.
    pub dev: DevId,
    /// The PASID of the request, when it carried one.
    pub pasid: Option<Pasid>,
    /// The page request group index (PRGI).
    pub grpid: u32,
    /// The access.
    pub perm: FaultPerm,
    /// The faulting address (page aligned).
    pub addr: u64,
    /// The length of the access (0 when unknown).
    pub length: u32,
    /// The kernel's cookie: the page response for the group quotes it.
    pub cookie: u32,
    /// The last request of its group (`IOMMU_PGFAULT_FLAGS_LAST_PAGE`).
    pub last_page: bool,
}

/// Why a translation failed without a page request (the soft backend's unrecoverable faults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultReason {
    /// No stage-1 or stage-2 entry maps the address.
    NotPresent,
    /// The entry does not allow the access (R/W/U/S/NX).
    Permission,
    /// A reserved bit was set in a guest table entry.
    ReservedBit,
    /// A table pointer (or the address) is outside guest memory or the address width.
    AddressOutOfRange,
    /// Nothing is attached for this (device, PASID).
    NoContext,
}

/// A fault that no page response can fix (the soft backend's equivalent of a DMAR fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct UnrecoverableFault {
    /// The device.
    pub dev: DevId,
    /// The PASID, when the request carried one.
    pub pasid: Option<Pasid>,
    /// The input address.
    pub addr: u64,
    /// The access.
    pub perm: FaultPerm,
    /// Why it failed.
    pub reason: FaultReason,
}

/// A fault record on a fault queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FaultRecord {
    /// A recoverable page request; answer its group with a page response.
    PageRequest(PageFault),
    /// An unrecoverable fault; nothing to answer.
    Unrecoverable(UnrecoverableFault),
}

/// The answer to a page request group (`IOMMUFD_PAGE_RESP_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PageResponseCode {
    /// The fault was fixed: the device retries.
    Success,
    /// The fault cannot be fixed: the device aborts the request.
    Invalid,
}

/// A page response for one group, identified by the cookie of its last page request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageResponse {
    /// The cookie from the group's last page request.
    pub cookie: u32,
    /// The answer.
    pub code: PageResponseCode,
}

use iommufd_bindings::iommufd::{
    iommu_hwpt_page_response, iommu_hwpt_pgfault,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_LAST_PAGE as FLAG_LAST_PAGE,
    iommu_hwpt_pgfault_flags_IOMMU_PGFAULT_FLAGS_PASID_VALID as FLAG_PASID_VALID,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_EXEC as PERM_EXEC,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_PRIV as PERM_PRIV,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_READ as PERM_READ,
    iommu_hwpt_pgfault_perm_IOMMU_PGFAULT_PERM_WRITE as PERM_WRITE,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_INVALID as RESP_INVALID,
    iommufd_page_response_code_IOMMUFD_PAGE_RESP_SUCCESS as RESP_SUCCESS,
};

impl FaultPerm {
    fn from_raw(perm: u32) -> Self {
        FaultPerm {
            read: perm & PERM_READ != 0,
            write: perm & PERM_WRITE != 0,
            exec: perm & PERM_EXEC != 0,
            privileged: perm & PERM_PRIV != 0,
        }
    }

    fn to_raw(self) -> u32 {
        let mut p = 0;
        if self.read {
            p |= PERM_READ;
        }
        if self.write {
            p |= PERM_WRITE;
        }
        if self.exec {
            p |= PERM_EXEC;
        }
        if self.privileged {
            p |= PERM_PRIV;
        }
        p
    }
}

impl PageFault {
    /// Decodes a kernel record.
    pub fn from_raw(raw: &iommu_hwpt_pgfault) -> Self {
        PageFault {
            dev: DevId(raw.dev_id),
            pasid: (raw.flags & FLAG_PASID_VALID != 0).then_some(Pasid(raw.pasid)),
            grpid: raw.grpid,
            perm: FaultPerm::from_raw(raw.perm),
            addr: raw.addr,
            length: raw.length,
            cookie: raw.cookie,
            last_page: raw.flags & FLAG_LAST_PAGE != 0,
        }
    }

    /// Encodes as the kernel's record (what the soft backend would have delivered through
    /// iommufd).
    pub fn to_raw(&self) -> iommu_hwpt_pgfault {
        let mut flags = 0;
        if self.pasid.is_some() {
            flags |= FLAG_PASID_VALID;
        }
        if self.last_page {
            flags |= FLAG_LAST_PAGE;
        }
        iommu_hwpt_pgfault {
            flags,
            dev_id: self.dev.0,
            pasid: self.pasid.map_or(0, |p| p.0),
            grpid: self.grpid,
            perm: self.perm.to_raw(),
            __reserved: 0,
            addr: self.addr,
            length: self.length,
            cookie: self.cookie,
        }
    }
}

impl PageResponse {
    /// Encodes as the kernel's `iommu_hwpt_page_response`.
    pub fn to_raw(&self) -> iommu_hwpt_page_response {
        iommu_hwpt_page_response {
            cookie: self.cookie,
            code: match self.code {
                PageResponseCode::Success => RESP_SUCCESS,
                PageResponseCode::Invalid => RESP_INVALID,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pgfault_raw_round_trip() {
        let f = PageFault {
            dev: DevId(3),
            pasid: Some(Pasid(0x41)),
            grpid: 7,
            perm: FaultPerm {
                read: true,
                write: true,
                exec: false,
                privileged: true,
            },
            addr: 0xdead_b000,
            length: 4096,
            cookie: 99,
            last_page: true,
        };
        let raw = f.to_raw();
        assert_eq!(raw.flags, 3);
        assert_eq!(raw.perm, 1 | 2 | 8);
        assert_eq!(PageFault::from_raw(&raw), f);
        let no_pasid = PageFault {
            pasid: None,
            last_page: false,
            ..f
        };
        assert_eq!(no_pasid.to_raw().flags, 0);
        assert_eq!(PageFault::from_raw(&no_pasid.to_raw()), no_pasid);
    }
}
