//! The nested path's formats: which stage-1 format and which invalidation entries the host
//! IOMMU takes, from its decoded capabilities.
//!
//! On VT-d (and on the soft backend) the guest's first-stage table is bound as
//! `IOMMU_HWPT_DATA_VTD_S1` and guest IOTLB invalidations go through as VT-d stage-1
//! invalidation entries. On the kernel's selftest mock, which has no page tables, the binding
//! is the mock's IOTLB tag ([`selftest_iotlb_tag`]) and invalidations are mock slot flushes
//! ([`host_invalidations`]), so the nested path can be checked on the mock with
//! `IOMMU_TEST_OP_MD_CHECK_IOTLB`.

use ioasid::{HwCaps, HwInfo, Invalidation, Stage1Format, VtdStage1};

/// The mock's IOTLB slots (`MOCK_NESTED_DOMAIN_IOTLB_NUM`).
pub const SELFTEST_IOTLB_SLOTS: u64 = 4;

/// How the host takes stage-1 bindings and their invalidations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostFormat {
    /// `IOMMU_HWPT_DATA_VTD_S1` and VT-d stage-1 invalidation entries.
    VtdS1,
    /// The selftest mock's `IOMMU_HWPT_DATA_SELFTEST` and slot flushes.
    Selftest,
}

impl HostFormat {
    /// The format of the IOMMU behind a device.
    pub fn from_caps(caps: &HwCaps) -> Self {
        match caps.info {
            HwInfo::Selftest { .. } => HostFormat::Selftest,
            _ => HostFormat::VtdS1,
        }
    }

    /// The binding of a guest first-stage table.
    pub fn stage1(self, table: &VtdStage1) -> Stage1Format {
        match self {
            HostFormat::VtdS1 => Stage1Format::VtdS1(*table),
            HostFormat::Selftest => Stage1Format::Selftest {
                iotlb: selftest_iotlb_tag(table),
            },
        }
    }
}

/// The value the mock's IOTLB slots hold for a binding of `table`: the root's page frame
/// number (low 32 bits), so a test sees which table the nested HWPT was built from.
pub fn selftest_iotlb_tag(table: &VtdStage1) -> u32 {
    (table.pgtbl_addr >> 12) as u32
}

/// The host entries for one guest IOTLB invalidation of a nested HWPT (which serves one
/// (device, PASID), so PASID filters are already applied).
pub fn host_invalidations(format: HostFormat, inv: &Invalidation) -> Vec<Invalidation> {
    match format {
        HostFormat::VtdS1 => match *inv {
            Invalidation::All | Invalidation::Pasid(_) => vec![Invalidation::All],
            Invalidation::Range { npages: 0, .. } => Vec::new(),
            Invalidation::Range {
                npages: u64::MAX, ..
            } => vec![Invalidation::All],
            Invalidation::Range {
                addr, npages, leaf, ..
            } => vec![Invalidation::Range {
                pasid: None,
                addr: addr & !0xfff,
                npages,
                leaf,
            }],
            Invalidation::Selftest { .. } => Vec::new(),
        },
        HostFormat::Selftest => {
            let all = Invalidation::Selftest {
                iotlb_id: 0,
                all: true,
            };
            match *inv {
                Invalidation::All | Invalidation::Pasid(_) => vec![all],
                Invalidation::Range { addr, npages, .. } => {
                    if npages >= SELFTEST_IOTLB_SLOTS {
                        vec![all]
                    } else {
                        // Page n of the guest's space is cached in slot n mod 4.
                        (0..npages)
                            .map(|i| Invalidation::Selftest {
                                iotlb_id: (((addr >> 12) + i) % SELFTEST_IOTLB_SLOTS) as u32,
                                all: false,
                            })
                            .collect()
                    }
                }
                Invalidation::Selftest { .. } => vec![*inv],
            }
        }
    }
}

/// One HWPT's batch of a doorbell, without repeats; a flush-all makes the rest redundant.
pub fn compact(batch: Vec<Invalidation>) -> Vec<Invalidation> {
    let all = batch.iter().find(|i| {
        matches!(
            i,
            Invalidation::All | Invalidation::Selftest { all: true, .. }
        )
    });
    if let Some(a) = all {
        return vec![*a];
    }
    let mut out: Vec<Invalidation> = Vec::with_capacity(batch.len());
    for i in batch {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_ranges_flush_slots() {
        let r = |addr, npages| Invalidation::Range {
            pasid: None,
            addr,
            npages,
            leaf: true,
        };
        assert_eq!(
            host_invalidations(HostFormat::Selftest, &r(0x5000, 2)),
            vec![
                Invalidation::Selftest {
                    iotlb_id: 1,
                    all: false
                },
                Invalidation::Selftest {
                    iotlb_id: 2,
                    all: false
                }
            ]
        );
        assert_eq!(
            compact(host_invalidations(HostFormat::Selftest, &r(0, 64))),
            vec![Invalidation::Selftest {
                iotlb_id: 0,
                all: true
            }]
        );
        assert_eq!(
            host_invalidations(HostFormat::VtdS1, &r(0x1234, u64::MAX)),
            vec![Invalidation::All]
        );
        assert!(host_invalidations(HostFormat::VtdS1, &r(0x1000, 0)).is_empty());
    }
}
