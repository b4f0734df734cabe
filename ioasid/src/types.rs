//! The vocabulary shared by every backend: object ids, IOVA ranges, permissions, device names,
//! PASIDs, the "bind page table" request and invalidation requests.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IOAS: an I/O address space the VMM manages with map/unmap (the RFC's kernel-managed
/// IOASID; iommufd's `IOMMU_IOAS_ALLOC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IoasId(pub u32);

/// A hardware page table (HWPT): a paging domain over an IOAS, a nest parent, or a nested
/// stage-1 table bound from the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HwptId(pub u32);

/// A device bound to the backend (iommufd's `out_devid`, or the soft backend's own id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DevId(pub u32);

/// A fault queue object (iommufd's `IOMMU_FAULT_QUEUE_ALLOC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FaultId(pub u32);

/// A Process Address Space ID (20 bits on PCIe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Pasid(pub u32);

impl Pasid {
    /// The architectural maximum width of a PCIe PASID.
    pub const MAX_BITS: u8 = 20;
}

impl fmt::Display for Pasid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PASID {:#x}", self.0)
    }
}

/// What a device attaches to: an IOAS (the kernel then picks or creates a paging HWPT) or a
/// specific HWPT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PtId {
    /// An IOAS.
    Ioas(IoasId),
    /// A hardware page table.
    Hwpt(HwptId),
}

impl PtId {
    /// The raw object id the kernel takes as `pt_id`.
    pub fn raw(self) -> u32 {
        match self {
            PtId::Ioas(IoasId(id)) | PtId::Hwpt(HwptId(id)) => id,
        }
    }
}

impl From<IoasId> for PtId {
    fn from(id: IoasId) -> Self {
        PtId::Ioas(id)
    }
}

impl From<HwptId> for PtId {
    fn from(id: HwptId) -> Self {
        PtId::Hwpt(id)
    }
}

/// DMA permissions of a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Perm {
    /// The device may read.
    pub read: bool,
    /// The device may write.
    pub write: bool,
}

impl Perm {
    /// Read and write.
    pub const RW: Perm = Perm {
        read: true,
        write: true,
    };
    /// Read only (the device reads guest memory).
    pub const RO: Perm = Perm {
        read: true,
        write: false,
    };
    /// Write only.
    pub const WO: Perm = Perm {
        read: false,
        write: true,
    };
}

/// An inclusive IOVA range `[start, last]`, as the kernel reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IovaRange {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA (inclusive).
    pub last: u64,
}

impl IovaRange {
    /// The range `[start, start + len)`; `None` when empty or wrapping.
    pub fn from_len(start: u64, len: u64) -> Option<Self> {
        if len == 0 {
            return None;
        }
        Some(IovaRange {
            start,
            last: start.checked_add(len - 1)?,
        })
    }

    /// Whether `[start, start + len)` lies inside this range.
    pub fn contains(&self, start: u64, len: u64) -> bool {
        match IovaRange::from_len(start, len) {
            Some(r) => r.start >= self.start && r.last <= self.last,
            None => false,
        }
    }
}

/// The IOVA windows an IOAS accepts, and the alignment every mapping must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IovaRanges {
    /// Allowed windows, sorted.
    pub ranges: Vec<IovaRange>,
    /// Required alignment of IOVA and length (the IOMMU's smallest page size).
    pub alignment: u64,
}

impl IovaRanges {
    /// Whether a mapping of `len` bytes at `iova` fits a window and the alignment.
    pub fn permits(&self, iova: u64, len: u64) -> bool {
        let aligned = self.alignment == 0
            || (iova.is_multiple_of(self.alignment) && len.is_multiple_of(self.alignment));
        aligned && self.ranges.iter().any(|r| r.contains(iova, len))
    }
}

/// A PCI address: segment, bus, device, function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bdf {
    /// PCI segment (domain).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..=31).
    pub device: u8,
    /// Function number (0..=7).
    pub function: u8,
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment, self.bus, self.device, self.function
        )
    }
}

impl FromStr for Bdf {
    type Err = String;

    /// Parses `SSSS:BB:DD.F` or `BB:DD.F` (hex).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("'{s}' is not a PCI address (expected SSSS:BB:DD.F, e.g. 0000:00:03.0)");
        let (rest, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (segment, bus, device) = match parts.as_slice() {
            [seg, bus, dev] => (*seg, *bus, *dev),
            [bus, dev] => ("0", *bus, *dev),
            _ => return Err(bad()),
        };
        let segment = u16::from_str_radix(segment, 16).map_err(|_| bad())?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| bad())?;
        let device = u8::from_str_radix(device, 16).map_err(|_| bad())?;
        let function = u8::from_str_radix(function, 16).map_err(|_| bad())?;
        if device > 31 || function > 7 {
            return Err(bad());
        }
        Ok(Bdf {
            segment,
            bus,
            device,
            function,
        })
    }
}

/// How errors and introspection name a device.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DeviceName {
    /// A PCI function (pdev).
    Pci(Bdf),
    /// A mediated device, by UUID.
    Mdev(String),
    /// A cdev passed in as an open fd, before its identity is known.
    Fd(i32),
    /// A device created by the kernel's selftest mock (`IOMMU_TEST_OP_MOCK_DOMAIN`).
    Mock(u32),
    /// An emulated device of the VMM on the soft backend.
    Emulated(String),
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceName::Pci(bdf) => write!(f, "{bdf}"),
            DeviceName::Mdev(uuid) => write!(f, "mdev {uuid}"),
            DeviceName::Fd(fd) => write!(f, "cdev fd {fd}"),
            DeviceName::Mock(id) => write!(f, "mock device {id}"),
            DeviceName::Emulated(name) => write!(f, "emulated device {name}"),
        }
    }
}

/// VT-d first-stage ("stage-1") page-table binding: `struct iommu_hwpt_vtd_s1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VtdStage1 {
    /// Guest physical address of the first-stage root table (PML4 or PML5).
    pub pgtbl_addr: u64,
    /// Input address width: 48 (4-level) or 57 (5-level).
    pub addr_width: u32,
    /// Supervisor requests enabled (SRE).
    pub sre: bool,
    /// Write protect enable (WPE): supervisor writes honour R/W.
    pub wpe: bool,
    /// Extended access flag enable (EAFE).
    pub eafe: bool,
}

/// The RFC's `IOASID_BIND_PGTABLE`: a guest I/O page table with its format, bound as a
/// stage-1 (nested) HWPT over a nest parent. New formats (SMMUv3 STE, AMD DTE) are new
/// variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage1Format {
    /// Intel VT-d first-stage tables (x86-64 paging format).
    VtdS1(VtdStage1),
    /// The kernel selftest mock's format (`IOMMU_HWPT_DATA_SELFTEST`): one IOTLB tag.
    Selftest {
        /// Initial value of the mock's IOTLB entries.
        iotlb: u32,
    },
}

/// One entry of an invalidation batch (the RFC's `IOASID_INVALIDATE_CACHE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Invalidation {
    /// Everything cached for the HWPT.
    All,
    /// Everything cached for one PASID. On the kernel backends a nested HWPT is one PASID's
    /// table, so this flushes the whole HWPT; the soft backend filters by the tag.
    Pasid(Pasid),
    /// `npages` 4 KiB pages from `addr`; `leaf` says only leaf entries changed.
    Range {
        /// Restrict to this PASID (soft backend); `None` for every PASID of the HWPT.
        pasid: Option<Pasid>,
        /// First input address (page aligned).
        addr: u64,
        /// Number of 4 KiB pages.
        npages: u64,
        /// Only leaf entries changed: paging-structure caches may stay.
        leaf: bool,
    },
    /// The selftest mock's format: clear one of its IOTLB slots (or all of them).
    Selftest {
        /// Which mock IOTLB slot.
        iotlb_id: u32,
        /// Clear every slot (`IOMMU_TEST_INVALIDATE_FLAG_ALL`).
        all: bool,
    },
}

/// Flags of a HWPT allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HwptFlags {
    /// The HWPT can parent nested (stage-1) HWPTs: it is the RFC's "gpa_ioasid".
    pub nest_parent: bool,
    /// Track dirty pages.
    pub dirty_tracking: bool,
    /// The HWPT may be attached to PASIDs (`IOMMU_HWPT_ALLOC_PASID`).
    pub pasid: bool,
}

/// A HWPT allocation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HwptAlloc {
    /// The device whose IOMMU the HWPT is for.
    pub dev: DevId,
    /// The IOAS (paging or nest-parent HWPT) or the parent HWPT (nested HWPT).
    pub parent: PtId,
    /// Allocation flags.
    pub flags: HwptFlags,
    /// Deliver I/O page faults of this HWPT to this queue.
    pub fault: Option<FaultId>,
    /// The stage-1 binding; `None` for a paging HWPT.
    pub stage1: Option<Stage1Format>,
}

impl HwptAlloc {
    /// A nest-parent HWPT over `ioas` for `dev`: no fault queue, no stage-1 binding.
    pub fn nest_parent(dev: DevId, ioas: IoasId) -> Self {
        HwptAlloc {
            dev,
            parent: PtId::Ioas(ioas),
            flags: HwptFlags {
                nest_parent: true,
                ..HwptFlags::default()
            },
            fault: None,
            stage1: None,
        }
    }

    /// A nested HWPT binding `stage1` under the nest parent `parent`. With `fault`, its I/O
    /// page faults go to that queue; with `pasid`, it may serve PASIDs.
    pub fn nested(
        dev: DevId,
        parent: HwptId,
        stage1: Stage1Format,
        fault: Option<FaultId>,
        pasid: bool,
    ) -> Self {
        HwptAlloc {
            dev,
            parent: PtId::Hwpt(parent),
            flags: HwptFlags {
                pasid,
                ..HwptFlags::default()
            },
            fault,
            stage1: Some(stage1),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bdf_parse_and_display() {
        let b: Bdf = "0000:00:03.0".parse().unwrap();
        assert_eq!(b.to_string(), "0000:00:03.0");
        let b: Bdf = "1a:1f.7".parse().unwrap();
        assert_eq!(b.to_string(), "0000:1a:1f.7");
        assert!("00:20.0".parse::<Bdf>().is_err());
        assert!("00:03.8".parse::<Bdf>().is_err());
        assert!("0000:00:03".parse::<Bdf>().is_err());
        assert!("zz:00.0".parse::<Bdf>().is_err());
    }

    #[test]
    fn iova_ranges_permit() {
        let r = IovaRanges {
            ranges: vec![
                IovaRange {
                    start: 0,
                    last: 0xfedf_ffff,
                },
                IovaRange {
                    start: 0xfef0_0000,
                    last: (1 << 48) - 1,
                },
            ],
            alignment: 4096,
        };
        assert!(r.permits(0x10_0000, 0x1000));
        assert!(!r.permits(0x10_0800, 0x1000));
        assert!(!r.permits(0xfee0_0000, 0x1000));
        assert!(!r.permits(1 << 48, 0x1000));
        assert!(!r.permits(0, 0));
        assert!(IovaRange::from_len(u64::MAX, 2).is_none());
    }
}
