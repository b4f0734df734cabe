//! HWPTs on an iommufd: paging and nest-parent HWPTs, nested (stage-1) HWPTs with their
//! vendor data (VT-d first stage, the selftest's mock format), and user invalidation
//! batches (`IOMMU_HWPT_INVALIDATE`) encoded per data type.

use std::sync::atomic::Ordering;

use iommufd_bindings::iommufd::*;

use super::{errno_of, lock, IommufdBackend};
use crate::backend::InvalidateOutcome;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::types::{HwptAlloc, HwptId, Invalidation, Stage1Format};

/// `IOMMU_HWPT_DATA_SELFTEST` (iommufd_test.h).
const HWPT_DATA_SELFTEST: u32 = 0xdead;
/// `IOMMU_HWPT_INVALIDATE_DATA_SELFTEST` (iommufd_test.h).
const INVALIDATE_DATA_SELFTEST: u32 = 0xdead_beef;

impl IommufdBackend {
    fn hwpt_data(stage1: &Stage1Format) -> (u32, Vec<u8>) {
        match stage1 {
            Stage1Format::VtdS1(v) => {
                let mut flags = 0;
                if v.sre {
                    flags |= iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_SRE;
                }
                if v.wpe {
                    flags |= iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_WPE;
                }
                if v.eafe {
                    flags |= iommu_hwpt_vtd_s1_flags_IOMMU_VTD_S1_EAFE;
                }
                let raw = iommu_hwpt_vtd_s1 {
                    flags: u64::from(flags),
                    pgtbl_addr: v.pgtbl_addr,
                    addr_width: v.addr_width,
                    __reserved: 0,
                };
                let mut b = Vec::with_capacity(24);
                b.extend_from_slice(&raw.flags.to_le_bytes());
                b.extend_from_slice(&raw.pgtbl_addr.to_le_bytes());
                b.extend_from_slice(&raw.addr_width.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
                (iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1, b)
            }
            Stage1Format::Selftest { iotlb } => {
                let mut b = iotlb.to_le_bytes().to_vec();
                b.extend_from_slice(&0u32.to_le_bytes());
                (HWPT_DATA_SELFTEST, b)
            }
        }
    }

    /// [`IommuBackend::hwpt_alloc`](crate::backend::IommuBackend::hwpt_alloc).
    pub(super) fn alloc_hwpt(&self, req: &HwptAlloc) -> Result<HwptId> {
        let mut flags = 0;
        if req.flags.nest_parent {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_NEST_PARENT;
        }
        if req.flags.dirty_tracking {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING;
        }
        if req.flags.pasid {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_PASID;
        }
        if req.fault.is_some() {
            flags |= iommufd_hwpt_alloc_flags_IOMMU_HWPT_FAULT_ID_VALID;
        }
        let (data_type, data) = match &req.stage1 {
            Some(s1) => Self::hwpt_data(s1),
            None => (iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE, Vec::new()),
        };
        let mut a = iommu_hwpt_alloc {
            size: std::mem::size_of::<iommu_hwpt_alloc>() as u32,
            flags,
            dev_id: req.dev.0,
            pt_id: req.parent.raw(),
            data_type,
            data_len: data.len() as u32,
            data_uptr: if data.is_empty() {
                0
            } else {
                data.as_ptr() as u64
            },
            fault_id: req.fault.map_or(0, |f| f.0),
            ..Default::default()
        };
        let op = if req.stage1.is_some() {
            Op::NestedAlloc
        } else if req.flags.nest_parent {
            Op::NestParentAlloc
        } else {
            Op::HwptAlloc
        };
        self.count();
        self.fd.alloc_iommu_hwpt(&mut a).map_err(|e| {
            Error::kernel(
                op,
                self.ctx_dev(req.dev).with_object(req.parent.raw()),
                errno_of(&e),
            )
        })?;
        if req.stage1.is_some() {
            lock(&self.hwpt_types).insert(a.out_hwpt_id, data_type);
        }
        Ok(HwptId(a.out_hwpt_id))
    }

    /// [`IommuBackend::hwpt_invalidate`](crate::backend::IommuBackend::hwpt_invalidate).
    pub(super) fn invalidate_hwpt(
        &self,
        hwpt: HwptId,
        batch: &[Invalidation],
    ) -> Result<InvalidateOutcome> {
        let data_type = lock(&self.hwpt_types).get(&hwpt.0).copied().ok_or_else(|| Error::InvalidArgument {
            op: Op::HwptInvalidate,
            ctx: Ctx::object(hwpt.0),
            reason: "not a nested HWPT allocated through this backend: only stage-1 HWPTs take user invalidations".to_string(),
        })?;
        let (inv_type, entry_len, bytes) =
            encode_invalidations(data_type, batch).map_err(|reason| Error::InvalidArgument {
                op: Op::HwptInvalidate,
                ctx: Ctx::object(hwpt.0),
                reason,
            })?;
        let total = batch.len() as u32;
        let mut inv = iommu_hwpt_invalidate {
            size: std::mem::size_of::<iommu_hwpt_invalidate>() as u32,
            hwpt_id: hwpt.0,
            data_uptr: bytes.as_ptr() as u64,
            data_type: inv_type,
            entry_len,
            entry_num: total,
            __reserved: 0,
        };
        self.count();
        self.counters
            .invalidations
            .fetch_add(u64::from(total), Ordering::Relaxed);
        match self.fd.invalidate_hwpt(&mut inv) {
            Ok(()) if inv.entry_num == total => Ok(InvalidateOutcome { handled: total }),
            Ok(()) => Err(Error::PartialInvalidation {
                hwpt,
                handled: inv.entry_num,
                total,
                errno: Errno(0),
                cause: "the kernel stopped early without an error".to_string(),
            }),
            Err(e) => {
                let errno = errno_of(&e);
                let cause =
                    crate::error::likely_cause(Op::HwptInvalidate, errno, &Ctx::object(hwpt.0));
                Err(Error::PartialInvalidation {
                    hwpt,
                    handled: inv.entry_num,
                    total,
                    errno,
                    cause,
                })
            }
        }
    }
}

/// Encodes an invalidation batch for a HWPT of `data_type`: (invalidate data type, entry
/// length, bytes).
fn encode_invalidations(
    data_type: u32,
    batch: &[Invalidation],
) -> std::result::Result<(u32, u32, Vec<u8>), String> {
    let mut out = Vec::with_capacity(batch.len() * 16);
    if data_type == iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1 {
        for (i, inv) in batch.iter().enumerate() {
            let (addr, npages, flags) = match *inv {
                Invalidation::All | Invalidation::Pasid(_) => (0u64, u64::MAX, 0u32),
                Invalidation::Range {
                    addr, npages, leaf, ..
                } => {
                    if addr % 4096 != 0 || npages == 0 {
                        return Err(format!("entry {i}: address {addr:#x} must be 4 KiB aligned and npages non-zero"));
                    }
                    (
                        addr,
                        npages,
                        if leaf {
                            iommu_hwpt_vtd_s1_invalidate_flags_IOMMU_VTD_INV_FLAGS_LEAF
                        } else {
                            0
                        },
                    )
                }
                Invalidation::Selftest { .. } => {
                    return Err(format!("entry {i}: a selftest entry on a VT-d HWPT"))
                }
            };
            out.extend_from_slice(&addr.to_le_bytes());
            out.extend_from_slice(&npages.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        Ok((
            iommu_hwpt_invalidate_data_type_IOMMU_HWPT_INVALIDATE_DATA_VTD_S1,
            24,
            out,
        ))
    } else if data_type == HWPT_DATA_SELFTEST {
        for inv in batch {
            let (flags, id) = match *inv {
                Invalidation::All | Invalidation::Pasid(_) => (1u32, 0u32),
                Invalidation::Selftest { iotlb_id, all } => (u32::from(all), iotlb_id),
                // The mock has no addresses: a range flushes everything, which is what a
                // conservative IOMMU may do.
                Invalidation::Range { .. } => (1, 0),
            };
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        Ok((INVALIDATE_DATA_SELFTEST, 8, out))
    } else {
        Err(format!(
            "HWPT data type {data_type:#x} has no invalidation format here"
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn vtd_invalidation_encoding() {
        let (t, len, b) = encode_invalidations(
            iommu_hwpt_data_type_IOMMU_HWPT_DATA_VTD_S1,
            &[
                Invalidation::All,
                Invalidation::Range {
                    pasid: None,
                    addr: 0x20_0000,
                    npages: 4,
                    leaf: true,
                },
            ],
        )
        .unwrap();
        assert_eq!(t, 0, "IOMMU_HWPT_INVALIDATE_DATA_VTD_S1 is 0 in the uAPI");
        assert_eq!(len, 24);
        assert_eq!(b.len(), 48);
        assert_eq!(&b[8..16], &u64::MAX.to_le_bytes());
        assert_eq!(&b[24..32], &0x20_0000u64.to_le_bytes());
        assert_eq!(&b[32..40], &4u64.to_le_bytes());
        assert_eq!(&b[40..44], &1u32.to_le_bytes());
        assert!(encode_invalidations(
            1,
            &[Invalidation::Range {
                pasid: None,
                addr: 0x123,
                npages: 1,
                leaf: false
            }]
        )
        .is_err());
    }

    #[test]
    fn selftest_invalidation_encoding() {
        let (t, len, b) = encode_invalidations(
            HWPT_DATA_SELFTEST,
            &[
                Invalidation::Selftest {
                    iotlb_id: 2,
                    all: false,
                },
                Invalidation::All,
            ],
        )
        .unwrap();
        assert_eq!((t, len), (0xdead_beef, 8));
        assert_eq!(b, vec![0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
