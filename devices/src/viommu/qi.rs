//! Invalidation queue descriptors (VT-d 6.5.2): decoding of one 128- or 256-bit descriptor
//! into a typed [`Descriptor`], or the invalidation queue error (IQE) cause.
//!
//! Reserved fields are checked as the spec defines them, except where Linux sets fields that
//! older descriptions call reserved: the PFSID of device-TLB descriptors (bits 15:12 and
//! 63:52) is accepted. The upper 128 bits of a 256-bit descriptor are ignored (Linux: "either
//! reserved or used by software as private data").

use super::caps::{VtdConfig, MAMV};

/// Why the queue stopped with FSTS.IQE; the IQEI field of IQERCD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IqeCause {
    /// IQT beyond the queue, or bit 4 set with 256-bit descriptors (IQEI 1).
    InvalidTail,
    /// The descriptor could not be read from guest memory (IQEI 2).
    FetchError,
    /// Unknown or unsupported descriptor type (IQEI 3).
    InvalidType,
    /// Reserved field set or invalid field value (IQEI 4).
    Reserved,
}

impl IqeCause {
    /// The IQEI code.
    pub fn iqei(self) -> u64 {
        match self {
            IqeCause::InvalidTail => 1,
            IqeCause::FetchError => 2,
            IqeCause::InvalidType => 3,
            IqeCause::Reserved => 4,
        }
    }
}

/// Scope of a context-cache invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContextScope {
    /// Every context entry.
    Global,
    /// Every entry of a domain (legacy DID).
    Domain(u16),
    /// The entries of the source ids that match `sid` under function mask `fm`.
    Device {
        /// Domain id.
        did: u16,
        /// Source id.
        sid: u16,
        /// Function mask: 0 none, 1 the low bit of the function, 2 two bits, 3 three.
        fm: u8,
    },
}

impl ContextScope {
    /// Whether requester `rid` is in scope.
    pub fn covers(&self, rid: u16) -> bool {
        match *self {
            ContextScope::Global | ContextScope::Domain(_) => true,
            ContextScope::Device { sid, fm, .. } => {
                let mask: u16 = !((1u16 << fm.min(3)) - 1);
                rid & mask == sid & mask
            }
        }
    }
}

/// Scope of a PASID-cache invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PasidCacheScope {
    /// Every PASID of a domain.
    Domain(u16),
    /// One PASID of a domain.
    Pasid {
        /// Domain id.
        did: u16,
        /// The PASID.
        pasid: u32,
    },
    /// Everything.
    Global,
}

/// Granularity of an IOTLB or PASID-based IOTLB invalidation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IotlbScope {
    /// Everything (IOTLB global).
    Global,
    /// One domain (IOTLB domain-selective).
    Domain(u16),
    /// `npages` pages at `addr` of one domain (page-selective), optionally for one PASID.
    Pages {
        /// Domain id.
        did: u16,
        /// The PASID (PASID-based IOTLB).
        pasid: Option<u32>,
        /// First address, aligned down to the range the address mask covers.
        addr: u64,
        /// 2^AM pages.
        npages: u64,
        /// Invalidation hint: only leaf entries changed.
        ih: bool,
    },
    /// Every mapping of one PASID of a domain (PASID-based IOTLB, non-global).
    Pasid {
        /// Domain id.
        did: u16,
        /// The PASID.
        pasid: u32,
    },
}

/// One decoded invalidation queue descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Descriptor {
    /// Context-cache invalidation (type 1).
    ContextCache(ContextScope),
    /// IOTLB invalidation (type 2) or PASID-based IOTLB invalidation (type 6).
    Iotlb(IotlbScope),
    /// Device-TLB (type 3) or PASID-based device-TLB invalidation (type 8).
    DeviceTlb {
        /// The device's source id.
        sid: u16,
        /// The PASID, for type 8.
        pasid: Option<u32>,
        /// First address.
        addr: u64,
        /// Pages (`u64::MAX`: everything).
        npages: u64,
    },
    /// Interrupt entry cache invalidation (type 4): accepted and ignored (no IR).
    InterruptEntryCache,
    /// Invalidation wait (type 5).
    Wait {
        /// Status write: (address, data).
        status: Option<(u64, u32)>,
        /// Raise the invalidation completion event.
        interrupt: bool,
        /// Fence (the model completes everything in order anyway).
        fence: bool,
        /// Page request drain.
        drain: bool,
    },
    /// PASID-cache invalidation (type 7).
    PasidCache(PasidCacheScope),
    /// Page group response (type 9).
    PageResponse {
        /// Requester id.
        rid: u16,
        /// The PASID, if the request carried one.
        pasid: Option<u32>,
        /// Page request group index.
        prgi: u16,
        /// Response code: 0 success, 1 invalid request, 0xf response failure.
        code: u8,
    },
}

/// Descriptor kinds, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DescriptorKind {
    /// Type 1.
    ContextCache,
    /// Type 2.
    Iotlb,
    /// Type 3.
    DeviceTlb,
    /// Type 4.
    InterruptEntryCache,
    /// Type 5.
    Wait,
    /// Type 6.
    PasidIotlb,
    /// Type 7.
    PasidCache,
    /// Type 8.
    PasidDeviceTlb,
    /// Type 9.
    PageResponse,
}

fn bits(v: u64, shift: u32, width: u32) -> u64 {
    (v >> shift) & ((1u64 << width) - 1)
}

/// Decodes a device-TLB size: with S set, the lowest clear bit of the page number above bit
/// 12 encodes 2^(n+1) pages.
fn dev_tlb_range(addr_field: u64, s: bool) -> (u64, u64) {
    let page = addr_field >> 12;
    if !s {
        return (page << 12, 1);
    }
    let ones = page.trailing_ones();
    if ones >= 51 {
        return (0, u64::MAX);
    }
    let npages = 1u64 << (ones + 1);
    ((page & !(npages - 1)) << 12, npages)
}

/// The kind of a descriptor's type field (None: unknown).
pub fn kind_of(q0: u64) -> Option<DescriptorKind> {
    let ty = (q0 & 0xf) | ((q0 >> 5) & 0x70);
    Some(match ty {
        1 => DescriptorKind::ContextCache,
        2 => DescriptorKind::Iotlb,
        3 => DescriptorKind::DeviceTlb,
        4 => DescriptorKind::InterruptEntryCache,
        5 => DescriptorKind::Wait,
        6 => DescriptorKind::PasidIotlb,
        7 => DescriptorKind::PasidCache,
        8 => DescriptorKind::PasidDeviceTlb,
        9 => DescriptorKind::PageResponse,
        _ => return None,
    })
}

/// Decodes one descriptor (`q` holds 2 or 4 qwords; only the first two are read).
pub fn decode(q: &[u64; 4], cfg: &VtdConfig) -> Result<Descriptor, IqeCause> {
    let [q0, q1, ..] = *q;
    let kind = kind_of(q0).ok_or(IqeCause::InvalidType)?;
    let reserved = |cond: bool| {
        if cond {
            Err(IqeCause::Reserved)
        } else {
            Ok(())
        }
    };
    // The upper type bits 11:9 are part of the type; every mask below leaves them out.
    match kind {
        DescriptorKind::ContextCache => {
            reserved(q0 & 0xfffc_0000_0000_f1c0 != 0 || q1 != 0)?;
            let did = bits(q0, 16, 16) as u16;
            let scope = match bits(q0, 4, 2) {
                1 => ContextScope::Global,
                2 => ContextScope::Domain(did),
                3 => ContextScope::Device {
                    did,
                    sid: bits(q0, 32, 16) as u16,
                    fm: bits(q0, 48, 2) as u8,
                },
                _ => return Err(IqeCause::Reserved),
            };
            Ok(Descriptor::ContextCache(scope))
        }
        DescriptorKind::Iotlb => {
            // qw0: G 5:4, DW 6, DR 7, DID 31:16; qw1: AM 5:0, IH 6, ADDR 63:12.
            reserved(q0 & 0xffff_ffff_0000_f100 != 0 || q1 & 0xf80 != 0)?;
            let did = bits(q0, 16, 16) as u16;
            let scope = match bits(q0, 4, 2) {
                1 => IotlbScope::Global,
                2 => IotlbScope::Domain(did),
                3 => page_scope(did, None, q1)?,
                _ => return Err(IqeCause::Reserved),
            };
            Ok(Descriptor::Iotlb(scope))
        }
        DescriptorKind::DeviceTlb => {
            if !cfg.device_tlb {
                return Err(IqeCause::InvalidType);
            }
            // qw0: PFSID 15:12 and 63:52, MIP 20:16, SID 47:32; qw1: S 0, ADDR 63:12.
            reserved(q0 & 0x000f_0000_ffe0_01f0 != 0 || q1 & 0xffe != 0)?;
            let (addr, npages) = dev_tlb_range(q1, q1 & 1 != 0);
            Ok(Descriptor::DeviceTlb {
                sid: bits(q0, 32, 16) as u16,
                pasid: None,
                addr,
                npages,
            })
        }
        DescriptorKind::InterruptEntryCache => Ok(Descriptor::InterruptEntryCache),
        DescriptorKind::Wait => {
            // qw0: IF 4, SW 5, FN 6, PD 7 (with PDS), data 63:32; qw1: address 63:2.
            let pd_reserved = if cfg.svm { 0 } else { 0x80 };
            reserved(q0 & (0xffff_f100 | pd_reserved) != 0 || q1 & 3 != 0)?;
            let status = (q0 & (1 << 5) != 0).then_some((q1 & !3, (q0 >> 32) as u32));
            Ok(Descriptor::Wait {
                status,
                interrupt: q0 & (1 << 4) != 0,
                fence: q0 & (1 << 6) != 0,
                drain: q0 & (1 << 7) != 0,
            })
        }
        DescriptorKind::PasidIotlb => {
            if !cfg.scalable_mode {
                return Err(IqeCause::InvalidType);
            }
            // qw0: G 5:4, DID 31:16, PASID 51:32; qw1: AM 5:0, IH 6, ADDR 63:12.
            reserved(q0 & 0xfff0_0000_0000_f1c0 != 0 || q1 & 0xf80 != 0)?;
            let did = bits(q0, 16, 16) as u16;
            let pasid = bits(q0, 32, 20) as u32;
            let scope = match bits(q0, 4, 2) {
                2 => IotlbScope::Pasid { did, pasid },
                3 => page_scope(did, Some(pasid), q1)?,
                _ => return Err(IqeCause::Reserved),
            };
            Ok(Descriptor::Iotlb(scope))
        }
        DescriptorKind::PasidCache => {
            if !cfg.scalable_mode {
                return Err(IqeCause::InvalidType);
            }
            // qw0: G 5:4, DID 31:16, PASID 51:32.
            reserved(q0 & 0xfff0_0000_0000_f1c0 != 0 || q1 != 0)?;
            let did = bits(q0, 16, 16) as u16;
            let scope = match bits(q0, 4, 2) {
                0 => PasidCacheScope::Domain(did),
                1 => PasidCacheScope::Pasid {
                    did,
                    pasid: bits(q0, 32, 20) as u32,
                },
                3 => PasidCacheScope::Global,
                _ => return Err(IqeCause::Reserved),
            };
            Ok(Descriptor::PasidCache(scope))
        }
        DescriptorKind::PasidDeviceTlb => {
            if !cfg.scalable_mode || !cfg.device_tlb {
                return Err(IqeCause::InvalidType);
            }
            // qw0: QDEP 8:4, PFSID 15:12 and 63:52, SID 31:16, PASID 51:32;
            // qw1: G 0, S 11, ADDR 63:12.
            reserved(q1 & 0x7fe != 0)?;
            let (addr, npages) = dev_tlb_range(q1, q1 & (1 << 11) != 0);
            Ok(Descriptor::DeviceTlb {
                sid: bits(q0, 16, 16) as u16,
                pasid: Some(bits(q0, 32, 20) as u32),
                addr,
                npages,
            })
        }
        DescriptorKind::PageResponse => {
            if !cfg.svm {
                return Err(IqeCause::InvalidType);
            }
            // qw0: PP 4, RC 15:12, RID 31:16, PASID 51:32; qw1: LPIG 2, PRGI 11:3.
            reserved(q0 & 0xfff0_0000_0000_01e0 != 0 || q1 & 0xffff_ffff_ffff_f003 != 0)?;
            let code = bits(q0, 12, 4) as u8;
            if !matches!(code, 0 | 1 | 0xf) {
                return Err(IqeCause::Reserved);
            }
            Ok(Descriptor::PageResponse {
                rid: bits(q0, 16, 16) as u16,
                pasid: (q0 & (1 << 4) != 0).then_some(bits(q0, 32, 20) as u32),
                prgi: bits(q1, 3, 9) as u16,
                code,
            })
        }
    }
}

fn page_scope(did: u16, pasid: Option<u32>, q1: u64) -> Result<IotlbScope, IqeCause> {
    let am = bits(q1, 0, 6) as u32;
    if am > u32::from(MAMV) {
        return Err(IqeCause::Reserved);
    }
    let npages = 1u64 << am;
    let addr = q1 & !0xfff & !((npages << 12) - 1);
    Ok(IotlbScope::Pages {
        did,
        pasid,
        addr,
        npages,
        ih: q1 & (1 << 6) != 0,
    })
}
