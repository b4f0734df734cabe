//! Typed parsers of the guest's translation structures, with explicit bounds: the root
//! table, scalable-mode and legacy context entries, the PASID directory and the PASID
//! table. Every read goes through [`GuestMemoryAccess`]; every parser returns a typed value,
//! `None` for a not-present entry, or a [`TableFault`] with the spec's fault reason.
//!
//! Not-present entries are not faults here: the model parses tables when the guest
//! invalidates a cache, not on a DMA request, and a device without a context entry is the
//! normal state between boot and driver attach. Such devices are [`Translation::Blocked`].
//! Malformed present entries (reserved bits, invalid programming, pointers outside guest
//! RAM) are faults, recorded unless the entry's fault processing disable (FPD) bit is set.

use ioasid::VtdStage1;

use super::bridge::{SecondStage, Translation};
use super::caps::VtdConfig;
use super::mem::GuestMemoryAccess;
use super::regs::rtaddr;

/// The spec's fault reasons for faults found in guest tables (VT-d 7.1.3; scalable-mode
/// codes 30h and up, legacy codes 1h..Fh).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultReason {
    /// RTADDR.TTM is a reserved value, or scalable mode without ECAP.SMTS (30h).
    InvalidRootTableAddress,
    /// The root entry could not be read (SM 38h, legacy 8h).
    RootEntryAccess,
    /// Reserved bits set in a present root entry (SM 3Ah, legacy Ah).
    RootEntryReserved,
    /// The context entry could not be read (SM 40h, legacy 9h).
    ContextEntryAccess,
    /// Reserved bits set in a present context entry (SM 42h, legacy Bh).
    ContextEntryReserved,
    /// Invalid programming of a present context entry (SM 43h, legacy 3h).
    ContextEntryInvalid,
    /// The PASID is beyond the PASID directory size (PDTS) of the context entry (46h).
    PasidTooLarge,
    /// A page request from a device whose context entry has PRE clear (47h).
    PageRequestDisabled,
    /// RID_PASID beyond the supported PASID width (48h).
    RidPasidInvalid,
    /// The PASID directory entry could not be read (50h).
    PasidDirAccess,
    /// Reserved bits set in a present PASID directory entry (52h).
    PasidDirReserved,
    /// The PASID table entry could not be read (58h).
    PasidTableAccess,
    /// Reserved bits set in a present PASID table entry (5Ah).
    PasidEntryReserved,
    /// Invalid programming of a present PASID table entry: PGTT the unit does not support,
    /// an address width outside SAGAW, 5-level first stage without FL5LP (5Bh).
    PasidEntryInvalid,
    /// The first-stage table pointer is outside guest RAM (60h).
    FirstStageAccess,
    /// The second-stage table pointer is outside guest RAM (SM 70h, legacy 7h).
    SecondStageAccess,
}

impl FaultReason {
    /// The fault reason code of the fault recording register.
    pub fn code(self, scalable: bool) -> u8 {
        use FaultReason::*;
        match (self, scalable) {
            (InvalidRootTableAddress, _) => 0x30,
            (RootEntryAccess, true) => 0x38,
            (RootEntryAccess, false) => 0x08,
            (RootEntryReserved, true) => 0x3a,
            (RootEntryReserved, false) => 0x0a,
            (ContextEntryAccess, true) => 0x40,
            (ContextEntryAccess, false) => 0x09,
            (ContextEntryReserved, true) => 0x42,
            (ContextEntryReserved, false) => 0x0b,
            (ContextEntryInvalid, true) => 0x43,
            (ContextEntryInvalid, false) => 0x03,
            (PasidTooLarge, _) => 0x46,
            (PageRequestDisabled, _) => 0x47,
            (RidPasidInvalid, _) => 0x48,
            (PasidDirAccess, _) => 0x50,
            (PasidDirReserved, _) => 0x52,
            (PasidTableAccess, _) => 0x58,
            (PasidEntryReserved, _) => 0x5a,
            (PasidEntryInvalid, _) => 0x5b,
            (FirstStageAccess, _) => 0x60,
            (SecondStageAccess, true) => 0x70,
            (SecondStageAccess, false) => 0x07,
        }
    }
}

/// A fault found while reading guest tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TableFault {
    /// Why.
    pub reason: FaultReason,
    /// The guest address of the offending entry (or of the table a pointer names).
    pub addr: u64,
    /// The PASID, for faults on PASID-granular structures.
    pub pasid: Option<u32>,
    /// The entry had fault processing disabled (FPD): the fault is not recorded.
    pub fpd: bool,
}

impl TableFault {
    fn new(reason: FaultReason, addr: u64) -> Self {
        Self {
            reason,
            addr,
            pasid: None,
            fpd: false,
        }
    }

    fn with_pasid(mut self, pasid: u32) -> Self {
        self.pasid = Some(pasid);
        self
    }

    fn with_fpd(mut self, fpd: bool) -> Self {
        self.fpd |= fpd;
        self
    }
}

const PAGE: u64 = 4096;
const ADDR_MASK: u64 = !0xfff;

fn read_u64s<const N: usize>(
    mem: &dyn GuestMemoryAccess,
    gpa: u64,
    reason: FaultReason,
) -> Result<[u64; N], TableFault> {
    let mut buf = [0u8; 64];
    let bytes = buf.get_mut(..N * 8).ok_or(TableFault::new(reason, gpa))?;
    mem.read(gpa, bytes)
        .map_err(|_| TableFault::new(reason, gpa))?;
    Ok(qwords::<N>(bytes))
}

/// Whether the 4 KiB table at `gpa` lies inside guest RAM (its first and last qword read).
pub fn table_in_ram(mem: &dyn GuestMemoryAccess, gpa: u64) -> bool {
    let mut b = [0u8; 8];
    let Some(last) = gpa.checked_add(PAGE - 8) else {
        return false;
    };
    mem.read(gpa, &mut b).is_ok() && mem.read(last, &mut b).is_ok()
}

/// The scalable-mode context entry of one device (VT-d 9.4), present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SmContextEntry {
    /// Fault processing disable.
    pub fpd: bool,
    /// Device TLB enable.
    pub dte: bool,
    /// PASID enable: requests with PASID are allowed.
    pub paside: bool,
    /// Page request enable.
    pub pre: bool,
    /// PASID directory size: 2^(PDTS + 7) entries.
    pub pdts: u8,
    /// Guest physical address of the PASID directory.
    pub pasid_dir: u64,
    /// The PASID used for requests without PASID.
    pub rid_pasid: u32,
}

/// The legacy context entry of one device (VT-d 9.3), present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LegacyContextEntry {
    /// Fault processing disable.
    pub fpd: bool,
    /// The translation it names.
    pub translation: Translation,
}

/// A device's context, as the root and context tables say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceContext {
    /// Root or context entry not present: every request is blocked.
    NotPresent,
    /// A legacy context entry: one translation for requests without PASID.
    Legacy(LegacyContextEntry),
    /// A scalable-mode context entry: translations per PASID.
    Scalable(SmContextEntry),
}

/// Reads the context of requester `rid` from the root table that RTADDR (`rtaddr_reg`,
/// including TTM) names.
pub fn read_context(
    mem: &dyn GuestMemoryAccess,
    cfg: &VtdConfig,
    rtaddr_reg: u64,
    rid: u16,
) -> Result<DeviceContext, TableFault> {
    let root = rtaddr_reg & ADDR_MASK;
    let bus = u64::from(rid >> 8);
    let devfn = u64::from(rid & 0xff);
    let ttm = rtaddr_reg & rtaddr::TTM_MASK;
    let scalable = match ttm {
        rtaddr::TTM_LEGACY => false,
        rtaddr::TTM_SCALABLE if cfg.scalable_mode => true,
        _ => {
            return Err(TableFault::new(
                FaultReason::InvalidRootTableAddress,
                rtaddr_reg,
            ))
        }
    };
    let entry_addr = root
        .checked_add(bus * 16)
        .ok_or(TableFault::new(FaultReason::RootEntryAccess, root))?;
    let [lo, hi] = read_u64s::<2>(mem, entry_addr, FaultReason::RootEntryAccess)?;
    if scalable {
        // Scalable-mode root entry: lower context table (devfn 0..=127) in the low qword,
        // upper (128..=255) in the high qword; bits 11:1 of each reserved.
        let half = if devfn < 128 { lo } else { hi };
        if half & 1 == 0 {
            return Ok(DeviceContext::NotPresent);
        }
        if half & 0xffe != 0 {
            return Err(TableFault::new(FaultReason::RootEntryReserved, entry_addr));
        }
        let ctx_addr = (half & ADDR_MASK) + (devfn & 0x7f) * 32;
        let q = read_u64s::<4>(mem, ctx_addr, FaultReason::ContextEntryAccess)?;
        parse_sm_context(cfg, q, ctx_addr)
    } else {
        if lo & 1 == 0 {
            return Ok(DeviceContext::NotPresent);
        }
        if lo & 0xffe != 0 || hi != 0 {
            return Err(TableFault::new(FaultReason::RootEntryReserved, entry_addr));
        }
        let ctx_addr = (lo & ADDR_MASK) + devfn * 16;
        let q = read_u64s::<2>(mem, ctx_addr, FaultReason::ContextEntryAccess)?;
        parse_legacy_context(mem, cfg, q, ctx_addr)
    }
}

/// Parses a 256-bit scalable-mode context entry read at `addr`.
pub fn parse_sm_context(
    cfg: &VtdConfig,
    q: [u64; 4],
    addr: u64,
) -> Result<DeviceContext, TableFault> {
    let [q0, q1, q2, q3] = q;
    if q0 & 1 == 0 {
        return Ok(DeviceContext::NotPresent);
    }
    let fpd = q0 & 2 != 0;
    let fault = |r| TableFault::new(r, addr).with_fpd(fpd);
    // Reserved: qw0 bits 8:5, qw1 bits 63:21, qw2 and qw3.
    if q0 & 0x1e0 != 0 || q1 & !0x1f_ffff != 0 || q2 != 0 || q3 != 0 {
        return Err(fault(FaultReason::ContextEntryReserved));
    }
    let entry = SmContextEntry {
        fpd,
        dte: q0 & (1 << 2) != 0,
        paside: q0 & (1 << 3) != 0,
        pre: q0 & (1 << 4) != 0,
        pdts: ((q0 >> 9) & 7) as u8,
        pasid_dir: q0 & ADDR_MASK,
        rid_pasid: (q1 & 0xf_ffff) as u32,
    };
    // Enables of features the unit does not advertise are invalid programming.
    if (entry.dte && !cfg.device_tlb)
        || (entry.pre && !cfg.svm)
        || (entry.paside && cfg.pasid_bits == 0)
    {
        return Err(fault(FaultReason::ContextEntryInvalid));
    }
    if !pasid_in_range(cfg, entry.rid_pasid) {
        return Err(fault(FaultReason::RidPasidInvalid).with_pasid(entry.rid_pasid));
    }
    Ok(DeviceContext::Scalable(entry))
}

fn pasid_in_range(cfg: &VtdConfig, pasid: u32) -> bool {
    if cfg.pasid_bits == 0 {
        pasid == 0
    } else {
        u64::from(pasid) < (1u64 << cfg.pasid_bits)
    }
}

fn second_stage_levels(cfg: &VtdConfig, aw: u64) -> Option<u8> {
    // AW 1: 39-bit, 3 levels; 2: 48-bit, 4 levels; 3: 57-bit, 5 levels.
    match aw {
        1..=3 => {
            let levels = aw as u8 + 2;
            (levels <= cfg.max_levels()).then_some(levels)
        }
        _ => None,
    }
}

/// Parses a 128-bit legacy context entry read at `addr`.
pub fn parse_legacy_context(
    mem: &dyn GuestMemoryAccess,
    cfg: &VtdConfig,
    q: [u64; 2],
    addr: u64,
) -> Result<DeviceContext, TableFault> {
    let [lo, hi] = q;
    if lo & 1 == 0 {
        return Ok(DeviceContext::NotPresent);
    }
    let fpd = lo & 2 != 0;
    let fault = |r| TableFault::new(r, addr).with_fpd(fpd);
    // Reserved: lo bits 11:4; hi bit 7 and 63:24 (bits 6:3 are ignored).
    if lo & 0xff0 != 0 || hi & 0xffff_ffff_ff00_0080 != 0 {
        return Err(fault(FaultReason::ContextEntryReserved));
    }
    let did = ((hi >> 8) & 0xffff) as u16;
    let translation = match (lo >> 2) & 3 {
        0 | 1 => {
            if (lo >> 2) & 3 == 1 && !cfg.device_tlb {
                return Err(fault(FaultReason::ContextEntryInvalid));
            }
            let levels =
                second_stage_levels(cfg, hi & 7).ok_or(fault(FaultReason::ContextEntryInvalid))?;
            let root = lo & ADDR_MASK;
            if !table_in_ram(mem, root) {
                return Err(TableFault::new(FaultReason::SecondStageAccess, root).with_fpd(fpd));
            }
            Translation::SecondStage {
                did,
                table: SecondStage {
                    root,
                    levels,
                    slee: false,
                    slade: false,
                },
            }
        }
        2 => Translation::PassThrough,
        _ => return Err(fault(FaultReason::ContextEntryInvalid)),
    };
    Ok(DeviceContext::Legacy(LegacyContextEntry {
        fpd,
        translation,
    }))
}

/// PASID-granular translation types (PGTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pgtt {
    /// 001b.
    FirstStage,
    /// 010b.
    SecondStage,
    /// 011b (not supported: no ECAP.NEST).
    Nested,
    /// 100b.
    PassThrough,
}

/// A present scalable-mode PASID table entry (VT-d 9.6), decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PasidEntry {
    /// Fault processing disable.
    pub fpd: bool,
    /// Translation type.
    pub pgtt: Pgtt,
    /// Second-stage address width field (AW).
    pub aw: u8,
    /// Second-stage execute enable.
    pub slee: bool,
    /// Second-stage access/dirty enable.
    pub slade: bool,
    /// Domain id.
    pub did: u16,
    /// Second-stage table pointer.
    pub slptptr: u64,
    /// Supervisor requests enable.
    pub sre: bool,
    /// Write protect enable.
    pub wpe: bool,
    /// First-stage paging mode: 0 = 4-level, 1 = 5-level.
    pub flpm: u8,
    /// First-stage table pointer.
    pub flptptr: u64,
    /// Extended access flag enable.
    pub eafe: bool,
}

/// Parses a 512-bit PASID table entry read at `addr`. PWSNP/PGSNP and the memory type
/// fields are ignored (the host decides snooping).
pub fn parse_pasid_entry(
    q: &[u64; 8],
    addr: u64,
    pasid: u32,
) -> Result<Option<PasidEntry>, TableFault> {
    let [q0, q1, q2, ..] = *q;
    if q0 & 1 == 0 {
        return Ok(None);
    }
    let fpd = q0 & 2 != 0;
    let fault = |r| TableFault::new(r, addr).with_pasid(pasid).with_fpd(fpd);
    // Reserved: qw0 bits 11:10. (The other qwords are left alone: their reserved bits
    // differ between spec revisions and a false fault would break a correct guest.)
    if q0 & 0xc00 != 0 {
        return Err(fault(FaultReason::PasidEntryReserved));
    }
    let pgtt = match (q0 >> 6) & 7 {
        1 => Pgtt::FirstStage,
        2 => Pgtt::SecondStage,
        3 => Pgtt::Nested,
        4 => Pgtt::PassThrough,
        _ => return Err(fault(FaultReason::PasidEntryInvalid)),
    };
    let flpm = ((q2 >> 2) & 3) as u8;
    if flpm > 1 {
        return Err(fault(FaultReason::PasidEntryReserved));
    }
    Ok(Some(PasidEntry {
        fpd,
        pgtt,
        aw: ((q0 >> 2) & 7) as u8,
        slee: q0 & (1 << 5) != 0,
        slade: q0 & (1 << 9) != 0,
        did: (q1 & 0xffff) as u16,
        slptptr: q0 & ADDR_MASK,
        sre: q2 & 1 != 0,
        wpe: q2 & (1 << 4) != 0,
        flpm,
        flptptr: q2 & ADDR_MASK,
        eafe: q2 & (1 << 7) != 0,
    }))
}

impl PasidEntry {
    /// The translation this entry names, checked against the unit's capabilities and guest
    /// RAM. `addr` is the entry's guest address (for the fault record).
    pub fn translation(
        &self,
        mem: &dyn GuestMemoryAccess,
        cfg: &VtdConfig,
        addr: u64,
        pasid: u32,
    ) -> Result<Translation, TableFault> {
        let fault = |r, a| TableFault::new(r, a).with_pasid(pasid).with_fpd(self.fpd);
        match self.pgtt {
            Pgtt::PassThrough => Ok(Translation::PassThrough),
            Pgtt::Nested => Err(fault(FaultReason::PasidEntryInvalid, addr)),
            Pgtt::SecondStage => {
                let levels = second_stage_levels(cfg, u64::from(self.aw))
                    .ok_or(fault(FaultReason::PasidEntryInvalid, addr))?;
                if !table_in_ram(mem, self.slptptr) {
                    return Err(fault(FaultReason::SecondStageAccess, self.slptptr));
                }
                Ok(Translation::SecondStage {
                    did: self.did,
                    table: SecondStage {
                        root: self.slptptr,
                        levels,
                        slee: self.slee,
                        slade: self.slade,
                    },
                })
            }
            Pgtt::FirstStage => {
                if !cfg.first_stage || (self.flpm == 1 && cfg.aw_bits != 57) {
                    return Err(fault(FaultReason::PasidEntryInvalid, addr));
                }
                if !table_in_ram(mem, self.flptptr) {
                    return Err(fault(FaultReason::FirstStageAccess, self.flptptr));
                }
                Ok(Translation::FirstStage {
                    did: self.did,
                    table: VtdStage1 {
                        pgtbl_addr: self.flptptr,
                        addr_width: if self.flpm == 1 { 57 } else { 48 },
                        sre: self.sre,
                        wpe: self.wpe,
                        eafe: self.eafe,
                    },
                })
            }
        }
    }
}

/// Number of PASID directory entries a context entry allows, bounded by the unit's PASID
/// width (at least one: PASID 0 lives in entry 0).
fn dir_entries(cfg: &VtdConfig, ctx: &SmContextEntry) -> u64 {
    let by_pdts = 1u64 << (u32::from(ctx.pdts) + 7);
    let by_width = 1u64 << cfg.pasid_bits.saturating_sub(6);
    by_pdts.min(by_width)
}

/// Reads the PASID table entry of `pasid` under `ctx`: `Ok(None)` when the directory or
/// table entry is not present.
pub fn read_pasid(
    mem: &dyn GuestMemoryAccess,
    cfg: &VtdConfig,
    ctx: &SmContextEntry,
    pasid: u32,
) -> Result<Option<Translation>, TableFault> {
    let dir_index = u64::from(pasid >> 6);
    if !pasid_in_range(cfg, pasid) || dir_index >= dir_entries(cfg, ctx) {
        return Err(TableFault::new(FaultReason::PasidTooLarge, ctx.pasid_dir)
            .with_pasid(pasid)
            .with_fpd(ctx.fpd));
    }
    let dir_addr = ctx.pasid_dir.checked_add(dir_index * 8).ok_or(
        TableFault::new(FaultReason::PasidDirAccess, ctx.pasid_dir)
            .with_pasid(pasid)
            .with_fpd(ctx.fpd),
    )?;
    let [de] = read_u64s::<1>(mem, dir_addr, FaultReason::PasidDirAccess)
        .map_err(|f| f.with_pasid(pasid).with_fpd(ctx.fpd))?;
    let Some(table) = parse_dir_entry(de, dir_addr, pasid, ctx.fpd)? else {
        return Ok(None);
    };
    let entry_addr = table + u64::from(pasid & 0x3f) * 64;
    let q = read_u64s::<8>(mem, entry_addr, FaultReason::PasidTableAccess)
        .map_err(|f| f.with_pasid(pasid).with_fpd(ctx.fpd))?;
    match parse_pasid_entry(&q, entry_addr, pasid)? {
        None => Ok(None),
        Some(e) => e.translation(mem, cfg, entry_addr, pasid).map(Some),
    }
}

/// A PASID directory entry: `Ok(Some(table address))` when present.
fn parse_dir_entry(de: u64, addr: u64, pasid: u32, fpd: bool) -> Result<Option<u64>, TableFault> {
    if de & 1 == 0 {
        return Ok(None);
    }
    let fpd = fpd || de & 2 != 0;
    if de & 0xffc != 0 {
        return Err(TableFault::new(FaultReason::PasidDirReserved, addr)
            .with_pasid(pasid)
            .with_fpd(fpd));
    }
    Ok(Some(de & ADDR_MASK))
}

/// What a scan of a context's PASID tables found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PasidScan {
    /// Present PASIDs (other than RID_PASID) and their translations, in PASID order.
    pub present: Vec<(u32, Translation)>,
    /// Faults found on the way (those PASIDs are absent from `present`).
    pub faults: Vec<TableFault>,
}

fn qwords<const N: usize>(bytes: &[u8]) -> [u64; N] {
    let mut q = [0u64; N];
    for (slot, chunk) in q.iter_mut().zip(bytes.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *slot = u64::from_le_bytes(b);
    }
    q
}

/// Every present PASID of `ctx` other than its RID_PASID. The scan is bounded by the
/// directory size (PDTS) and the unit's PASID width, and reads the directory and each
/// present PASID table once.
pub fn scan_pasids(
    mem: &dyn GuestMemoryAccess,
    cfg: &VtdConfig,
    ctx: &SmContextEntry,
) -> PasidScan {
    let mut out = PasidScan::default();
    if !ctx.paside || cfg.pasid_bits == 0 {
        return out;
    }
    let n = dir_entries(cfg, ctx);
    let mut dir = vec![0u8; (n * 8) as usize];
    if mem.read(ctx.pasid_dir, &mut dir).is_err() {
        out.faults
            .push(TableFault::new(FaultReason::PasidDirAccess, ctx.pasid_dir).with_fpd(ctx.fpd));
        return out;
    }
    let mut table = vec![0u8; PAGE as usize];
    for (i, chunk) in dir.chunks_exact(8).enumerate() {
        let [de] = qwords::<1>(chunk);
        let first = (i as u32) << 6;
        let dir_addr = ctx.pasid_dir.wrapping_add(i as u64 * 8);
        let base = match parse_dir_entry(de, dir_addr, first, ctx.fpd) {
            Ok(Some(t)) => t,
            Ok(None) => continue,
            Err(f) => {
                out.faults.push(f);
                continue;
            }
        };
        if mem.read(base, &mut table).is_err() {
            out.faults.push(
                TableFault::new(FaultReason::PasidTableAccess, base)
                    .with_pasid(first)
                    .with_fpd(ctx.fpd),
            );
            continue;
        }
        for (j, e) in table.chunks_exact(64).enumerate() {
            let pasid = first | j as u32;
            if pasid == ctx.rid_pasid || !pasid_in_range(cfg, pasid) {
                continue;
            }
            let q = qwords::<8>(e);
            let entry_addr = base + j as u64 * 64;
            match parse_pasid_entry(&q, entry_addr, pasid).and_then(|pe| {
                pe.map(|pe| pe.translation(mem, cfg, entry_addr, pasid))
                    .transpose()
            }) {
                Ok(None) => {}
                Ok(Some(t)) => out.present.push((pasid, t)),
                Err(f) => out.faults.push(f),
            }
        }
    }
    out
}
