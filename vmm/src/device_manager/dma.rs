//! The VM's DMA address space: the `ioasid` backend chosen for it, its one IOAS, and guest
//! RAM mapped there at IOVA = GPA, once per RAM region.
//!
//! iommufd maps each region by file (`IOMMU_IOAS_MAP_FILE` on the RAM memfd, at the region's
//! file offset), so the kernel pins pages of the file, not of a process mapping. type1 maps each
//! region by its host address (`VFIO_IOMMU_MAP_DMA`). Either way: one call per region, never
//! per page. An iommufd without `IOMMU_IOAS_MAP_FILE` (Linux < 6.13 answers ENOTTY) gets guest
//! RAM by host address (`IOMMU_IOAS_MAP`).
//!
//! On iommufd, `--platform` adds: `rlimit_mode=process` (`IOMMU_OPTION_RLIMIT_MODE`, set when
//! the iommufd is opened), `hwpt=explicit` (a paging HWPT the VMM allocates on the IOAS with
//! `IOMMU_HWPT_ALLOC` and attaches devices to, instead of the one the kernel picks); with
//! hugetlbfs-backed guest RAM the IOAS gets `IOMMU_OPTION_HUGE_PAGES` set and read back before
//! RAM is mapped. After each attach the VMM restricts the IOVAs the kernel may choose in the
//! IOAS (`IOMMU_IOAS_ALLOW_IOVAS`) to the usable windows above the guest-physical address
//! space: the VMM itself maps only at fixed IOVAs (guest addresses), so a kernel-chosen IOVA in
//! the VM's IOAS, from whatever maps without one, can never land where guest RAM, a BAR or a
//! later RAM region must go, and can never be reached by a guest-physical DMA address.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use ioasid::{
    BackendKind, DevId, HwptAlloc, HwptFlags, HwptId, IoasId, IommuBackend, IommufdBackend,
    IovaRange, MapFile, MapUser, Perm, PinAccounting, PtId, Type1Backend,
};
use log::{info, warn};

use crate::config::{HwptMode, RlimitMode};
use crate::layout::pci_mmio64_window;
use crate::memory::RamRegion;

/// The backend in use, typed, because binding differs between them.
#[derive(Debug, Clone)]
pub enum Backend {
    /// `/dev/iommu` and VFIO cdevs.
    Iommufd(Arc<IommufdBackend>),
    /// VFIO container and groups.
    Type1(Arc<Type1Backend>),
}

impl Backend {
    /// The backend behind the common seam.
    pub fn as_dyn(&self) -> &dyn IommuBackend {
        match self {
            Backend::Iommufd(b) => b.as_ref(),
            Backend::Type1(b) => b.as_ref(),
        }
    }

    /// The backend as a shared trait object (for the vIOMMU's host bridge).
    pub fn as_arc(&self) -> Arc<dyn IommuBackend> {
        match self {
            Backend::Iommufd(b) => b.clone(),
            Backend::Type1(b) => b.clone(),
        }
    }

    /// Which one.
    pub fn kind(&self) -> BackendKind {
        self.as_dyn().kind()
    }
}

/// The iommufd options of `--platform` (`hwpt=`, `rlimit_mode=`); type1 ignores them (the
/// parser refuses them with `iommufd=off`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaOptions {
    /// How devices reach the IOAS.
    pub hwpt: HwptMode,
    /// How pinned guest RAM is charged.
    pub rlimit: RlimitMode,
}

impl DmaOptions {
    /// The `ioasid` pin accounting of `rlimit`.
    pub fn pin_accounting(&self) -> PinAccounting {
        match self.rlimit {
            RlimitMode::User => PinAccounting::User,
            RlimitMode::Process => PinAccounting::Process,
        }
    }
}

/// Opens the backend `kind` with `opts` (iommufd: the pin accounting is set on open).
pub fn open_backend(kind: BackendKind, opts: &DmaOptions) -> ioasid::Result<Backend> {
    match kind {
        BackendKind::Iommufd => {
            let b = IommufdBackend::open_with(opts.pin_accounting())?;
            if opts.rlimit == RlimitMode::Process {
                let got = b.pin_accounting()?;
                info!(
                    "iommufd pins guest RAM against RLIMIT_MEMLOCK per process \
                     (IOMMU_OPTION_RLIMIT_MODE reads back {got:?})"
                );
            }
            Ok(Backend::Iommufd(Arc::new(b)))
        }
        BackendKind::Type1 => Ok(Backend::Type1(Arc::new(Type1Backend::open()?))),
        BackendKind::Soft => Err(ioasid::Error::InvalidArgument {
            op: ioasid::Op::IoasAlloc,
            ctx: ioasid::Ctx::default(),
            reason: "the soft backend serves emulated devices, not VFIO devices".to_string(),
        }),
    }
}

/// The DMA side of the VM: backend, IOAS, and guest RAM mapped into it.
pub struct DmaState {
    /// The backend.
    pub backend: Backend,
    /// The VM's IOAS.
    pub ioas: IoasId,
    /// Guest RAM mapped into it (empty until the first device is bound).
    pub ram: Vec<RamMapping>,
    /// `--platform` iommufd options.
    pub options: DmaOptions,
    /// Paging HWPTs the VMM allocated on the IOAS (`hwpt=explicit`), destroyed with it.
    pub explicit_hwpts: Vec<HwptId>,
    /// The IOVA windows the kernel may choose from in the IOAS (`IOMMU_IOAS_ALLOW_IOVAS`),
    /// when restricted.
    pub allowed: Option<Vec<IovaRange>>,
    /// First IOVA above the guest-physical address space (RAM and the 64-bit PCI window).
    pub guest_top: u64,
}

impl DmaState {
    /// The VM's DMA state over `backend`: allocates its IOAS; on iommufd with
    /// hugetlbfs-backed `ram`, sets and reads back `IOMMU_OPTION_HUGE_PAGES` on it, before any
    /// RAM is mapped.
    pub fn new(backend: Backend, options: DmaOptions, ram: &[RamRegion]) -> ioasid::Result<Self> {
        let ioas = backend.as_dyn().ioas_alloc()?;
        let state = DmaState {
            backend,
            ioas,
            ram: Vec::new(),
            options,
            explicit_hwpts: Vec::new(),
            allowed: None,
            guest_top: guest_physical_top(ram),
        };
        if let (Backend::Iommufd(b), true) = (&state.backend, ram_is_hugetlb(ram)) {
            let set = b
                .set_huge_pages(ioas, true)
                .and_then(|()| b.huge_pages(ioas));
            match set {
                Ok(true) => info!(
                    "IOAS {}: large IOPTEs on for hugetlbfs-backed guest RAM \
                     (IOMMU_OPTION_HUGE_PAGES set, reads back 1)",
                    ioas.0
                ),
                Ok(false) => warn!(
                    "IOAS {}: IOMMU_OPTION_HUGE_PAGES reads back 0 after setting it: DMA to \
                     guest RAM uses 4 KiB IOPTEs",
                    ioas.0
                ),
                Err(e) => {
                    let _ = state.backend.as_dyn().destroy(ioas.0);
                    return Err(e);
                }
            }
        }
        Ok(state)
    }

    /// Attaches `dev` (RID) to the VM's IOAS on iommufd, as `--platform hwpt=` says, and
    /// returns the paging HWPT it reaches the IOAS through (`None`: the kernel reported the
    /// IOAS itself, as for an mdev). The kernel-chosen-IOVA restriction is lifted for the
    /// attach (a device's reserved regions may not intersect the allowed windows) and
    /// recomputed from the windows after it. An `emulated` device (an mdev: no IOMMU, no
    /// HWPT possible) is attached to the IOAS in either mode. type1 has nothing to attach:
    /// `Ok(None)`.
    pub fn attach_device(&mut self, dev: DevId, emulated: bool) -> ioasid::Result<Option<HwptId>> {
        let Backend::Iommufd(b) = self.backend.clone() else {
            return Ok(None);
        };
        if self.allowed.take().is_some() {
            b.allow_iovas(self.ioas, &[])?;
        }
        let hwpt = match (self.options.hwpt, emulated) {
            (HwptMode::Auto, _) | (HwptMode::Explicit, true) => {
                let h = b.attach_ioas_reporting_hwpt(dev, self.ioas)?;
                match h {
                    Some(h) => info!(
                        "dev_id {}: attached to IOAS {} through paging HWPT {} (allocated by \
                         the kernel)",
                        dev.0, self.ioas.0, h.0
                    ),
                    None => info!(
                        "dev_id {}: attached to IOAS {} (no HWPT: the kernel reported the IOAS \
                         itself, as for an emulated device)",
                        dev.0, self.ioas.0
                    ),
                }
                h
            }
            (HwptMode::Explicit, false) => Some(self.attach_explicit(&b, dev)?),
        };
        self.restrict_kernel_iovas(&b);
        Ok(hwpt)
    }

    /// `hwpt=explicit`: attaches `dev` to the first of the VMM's paging HWPTs its IOMMU
    /// accepts, or to a new one allocated for it on the IOAS.
    fn attach_explicit(&mut self, b: &IommufdBackend, dev: DevId) -> ioasid::Result<HwptId> {
        for h in &self.explicit_hwpts {
            match b.attach(dev, None, PtId::Hwpt(*h)) {
                Ok(()) => {
                    info!(
                        "dev_id {}: attached to explicit paging HWPT {} on IOAS {} (shared)",
                        dev.0, h.0, self.ioas.0
                    );
                    return Ok(*h);
                }
                // EINVAL: the HWPT's IOMMU or format does not fit this device; try the next.
                Err(e) if e.errno() == Some(libc::EINVAL) => {
                    info!("dev_id {}: HWPT {} does not fit it ({e})", dev.0, h.0)
                }
                Err(e) => return Err(e),
            }
        }
        let h = b.hwpt_alloc(&HwptAlloc {
            dev,
            parent: PtId::Ioas(self.ioas),
            flags: HwptFlags::default(),
            fault: None,
            stage1: None,
        })?;
        if let Err(e) = b.attach(dev, None, PtId::Hwpt(h)) {
            let _ = b.destroy(h.0);
            return Err(e);
        }
        self.explicit_hwpts.push(h);
        info!(
            "dev_id {}: attached to explicit paging HWPT {} allocated on IOAS {} \
             (IOMMU_HWPT_ALLOC, hwpt=explicit)",
            dev.0, h.0, self.ioas.0
        );
        Ok(h)
    }

    /// Restricts the IOVAs the kernel may choose in the IOAS to its usable windows above
    /// [`Self::guest_top`]. A failure leaves the IOAS unrestricted and is logged: the VMM
    /// itself never maps without a fixed IOVA.
    fn restrict_kernel_iovas(&mut self, b: &IommufdBackend) {
        let windows = match b.iova_ranges(self.ioas) {
            Ok(w) => w,
            Err(e) => {
                warn!(
                    "IOAS {}: kernel-chosen IOVAs left unrestricted: {e}",
                    self.ioas.0
                );
                return;
            }
        };
        let allowed = above(&windows.ranges, self.guest_top);
        if allowed.is_empty() {
            warn!(
                "IOAS {}: no IOVA window above the guest-physical space ({:#x}) in {:x?}: \
                 kernel-chosen IOVAs left unrestricted",
                self.ioas.0, self.guest_top, windows.ranges
            );
            return;
        }
        match b.allow_iovas(self.ioas, &allowed) {
            Ok(()) => {
                info!(
                    "IOAS {}: kernel-chosen IOVAs restricted to {} above the guest-physical \
                     space (IOMMU_IOAS_ALLOW_IOVAS)",
                    self.ioas.0,
                    allowed
                        .iter()
                        .map(|r| format!("{:#x}..={:#x}", r.start, r.last))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.allowed = Some(allowed);
            }
            Err(e) => warn!(
                "IOAS {}: kernel-chosen IOVAs left unrestricted: {e}",
                self.ioas.0
            ),
        }
    }

    /// Unmaps guest RAM, destroys the explicit HWPTs and then the IOAS (a HWPT holds its
    /// IOAS): the end of the VM's DMA space, with its last device.
    pub fn teardown(self) {
        let b = self.backend.as_dyn();
        if !self.ram.is_empty() {
            unmap_ram(b, self.ioas, &self.ram);
        }
        for h in &self.explicit_hwpts {
            match b.destroy(h.0) {
                Ok(()) => info!("explicit paging HWPT {} destroyed", h.0),
                Err(e) => warn!("{e}"),
            }
        }
        match b.destroy(self.ioas.0) {
            Ok(()) => info!(
                "IOAS {} destroyed; {} backend closed",
                self.ioas.0,
                self.backend.kind()
            ),
            Err(e) => warn!("{e}"),
        }
    }
}

/// The parts of `windows` at or above `floor`.
fn above(windows: &[IovaRange], floor: u64) -> Vec<IovaRange> {
    windows
        .iter()
        .filter(|r| r.last >= floor)
        .map(|r| IovaRange {
            start: r.start.max(floor),
            last: r.last,
        })
        .collect()
}

/// First address above the guest-physical space of a VM with `ram`: the end of the 64-bit
/// PCI window, which lies above all RAM.
pub fn guest_physical_top(ram: &[RamRegion]) -> u64 {
    let ram_end = ram.iter().map(|r| r.gpa + r.size).max().unwrap_or(0);
    let (base, size) = pci_mmio64_window(ram_end);
    base.saturating_add(size).max(ram_end)
}

/// `HUGETLBFS_MAGIC` of include/uapi/linux/magic.h.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether guest RAM lives in hugetlbfs (`--memory hugepages=on`): the memfd's filesystem.
fn ram_is_hugetlb(ram: &[RamRegion]) -> bool {
    let Some(r) = ram.first() else {
        return false;
    };
    // SAFETY: statfs is plain data; all-zero is a valid value that fstatfs overwrites.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd (the memfd, alive through `r`) and a live, writable statfs.
    let rc = unsafe { libc::fstatfs(r.memfd.as_raw_fd(), &mut st) };
    rc == 0 && st.f_type as i64 == HUGETLBFS_MAGIC
}

/// One RAM region mapped for DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamMapping {
    /// IOVA (= GPA).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

/// How RAM is handed to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamMapMode {
    /// `ioas_map_file` with the region's memfd and file offset.
    ByFile,
    /// `ioas_map` with the region's host address.
    ByAddress,
}

impl RamMapMode {
    /// The mode a backend needs: by file where it can (iommufd), else by address.
    pub fn for_kind(kind: BackendKind) -> Self {
        match kind {
            BackendKind::Iommufd => RamMapMode::ByFile,
            BackendKind::Type1 | BackendKind::Soft => RamMapMode::ByAddress,
        }
    }
}

/// A RAM region that could not be mapped, with how many map calls were issued in all.
#[derive(Debug)]
pub struct RamMapFailure {
    /// The region's GPA.
    pub gpa: u64,
    /// Its size.
    pub size: u64,
    /// The backend's error.
    pub error: Box<ioasid::Error>,
    /// Map calls issued before and including the failed one.
    pub calls: u64,
}

/// Maps every region of `regions` into `ioas` at IOVA = GPA, one call per region. On failure
/// the regions already mapped are unmapped again. Returns the mappings and the number of map
/// calls issued.
pub fn map_ram(
    backend: &dyn IommuBackend,
    ioas: IoasId,
    regions: &[RamRegion],
    mode: RamMapMode,
) -> Result<(Vec<RamMapping>, u64), RamMapFailure> {
    let mut done: Vec<RamMapping> = Vec::with_capacity(regions.len());
    let mut calls = 0u64;
    let mut mode = mode;
    for r in regions {
        calls += 1;
        // The kernel pins (and so allocates and zeroes) the region's pages in this call: the
        // largest part of a VM's start with an assigned device (the boot-overhead bench).
        let started = std::time::Instant::now();
        let mut result = map_region(backend, ioas, r, mode);
        // IOMMU_IOAS_MAP_FILE came with Linux 6.13; an older iommufd answers ENOTTY. The
        // first region tells: map everything by host address (IOMMU_IOAS_MAP) instead.
        if mode == RamMapMode::ByFile
            && done.is_empty()
            && matches!(&result, Err(e) if e.errno() == Some(libc::ENOTTY))
        {
            info!(
                "IOMMU_IOAS_MAP_FILE is unknown to this kernel (Linux < 6.13): guest RAM is \
                 mapped by host address (IOMMU_IOAS_MAP)"
            );
            mode = RamMapMode::ByAddress;
            calls += 1;
            result = map_region(backend, ioas, r, mode);
        }
        match result {
            Ok(iova) => {
                info!(
                    "Guest RAM GPA {:#x}+{:#x} mapped for DMA at IOVA {iova:#x} in IOAS {} ({}) in {} ms",
                    r.gpa,
                    r.size,
                    ioas.0,
                    match mode {
                        RamMapMode::ByFile => "by memfd",
                        RamMapMode::ByAddress => "by host address",
                    },
                    started.elapsed().as_millis()
                );
                done.push(RamMapping { iova, len: r.size });
            }
            Err(error) => {
                unmap_ram(backend, ioas, &done);
                return Err(RamMapFailure {
                    gpa: r.gpa,
                    size: r.size,
                    error: Box::new(error),
                    calls,
                });
            }
        }
    }
    Ok((done, calls))
}

/// Maps one region at IOVA = GPA, by file or by address.
fn map_region(
    backend: &dyn IommuBackend,
    ioas: IoasId,
    r: &RamRegion,
    mode: RamMapMode,
) -> ioasid::Result<u64> {
    match mode {
        RamMapMode::ByFile => backend.ioas_map_file(
            ioas,
            &MapFile {
                iova: Some(r.gpa),
                fd: r.memfd.as_raw_fd(),
                start: r.file_offset,
                len: r.size,
                perm: Perm::RW,
            },
        ),
        // SAFETY: `host_addr..+size` is the VM's shared RAM mapping, which lives as long as
        // the VM; guest RAM is only ever accessed through vm-memory's volatile accessors and
        // raw pointers, never through Rust references, so device DMA into it aliases no
        // reference. The kernel pins the pages, so even a later munmap cannot hand them to
        // another user while they are mapped for DMA.
        RamMapMode::ByAddress => unsafe {
            backend.ioas_map(
                ioas,
                &MapUser {
                    iova: Some(r.gpa),
                    user_va: r.host_addr,
                    len: r.size,
                    perm: Perm::RW,
                },
            )
        },
    }
}

/// Unmaps `mappings` from `ioas`, logging (not failing on) errors.
pub fn unmap_ram(backend: &dyn IommuBackend, ioas: IoasId, mappings: &[RamMapping]) {
    for m in mappings.iter().rev() {
        match backend.ioas_unmap(ioas, m.iova, m.len) {
            Ok(_) => info!(
                "Guest RAM IOVA {:#x}+{:#x} unmapped from IOAS {}",
                m.iova, m.len, ioas.0
            ),
            Err(e) => warn!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use std::sync::Mutex;

    use ioasid::{
        CopyRequest, DevId, Error, FaultQueue, HwptAlloc, HwptId, InvalidateOutcome, Invalidation,
        IovaRange, IovaRanges, Op, Pasid, PtId,
    };

    use super::*;
    use crate::memory::{GuestRam, RamConfig};

    /// Records map/unmap calls; fails the map of IOVA `fail_at`, if set.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Mutex<Vec<String>>,
        fail_at: Option<u64>,
        /// Every IOAS_MAP_FILE fails with this errno (a kernel without it: ENOTTY).
        file_errno: Option<i32>,
    }

    impl Recorder {
        fn log(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn unsupported<T>(op: Op) -> ioasid::Result<T> {
            Err(Error::Unsupported {
                op,
                backend: "recorder",
            })
        }
    }

    impl IommuBackend for Recorder {
        fn kind(&self) -> BackendKind {
            BackendKind::Soft
        }
        fn ioas_alloc(&self) -> ioasid::Result<IoasId> {
            Ok(IoasId(1))
        }
        fn destroy(&self, _id: u32) -> ioasid::Result<()> {
            Ok(())
        }
        unsafe fn ioas_map(&self, ioas: IoasId, req: &MapUser) -> ioasid::Result<u64> {
            let iova = req.iova.unwrap_or(0);
            if self.fail_at == Some(iova) {
                return Err(Error::kernel(
                    Op::DmaMap,
                    ioasid::Ctx::object(ioas.0).range(iova, req.len),
                    ioasid::Errno(libc::ENOMEM),
                ));
            }
            self.log(format!(
                "map va {:#x} iova {iova:#x} len {:#x}",
                req.user_va, req.len
            ));
            Ok(iova)
        }
        fn ioas_map_file(&self, ioas: IoasId, req: &MapFile) -> ioasid::Result<u64> {
            let iova = req.iova.unwrap_or(0);
            if let Some(e) = self.file_errno {
                return Err(Error::kernel(
                    Op::IoasMapFile,
                    ioasid::Ctx::object(ioas.0).range(iova, req.len),
                    ioasid::Errno(e),
                ));
            }
            self.log(format!(
                "map_file off {:#x} iova {iova:#x} len {:#x}",
                req.start, req.len
            ));
            Ok(iova)
        }
        fn ioas_unmap(&self, _ioas: IoasId, iova: u64, len: u64) -> ioasid::Result<u64> {
            self.log(format!("unmap iova {iova:#x} len {len:#x}"));
            Ok(len)
        }
        fn ioas_unmap_all(&self, _ioas: IoasId) -> ioasid::Result<u64> {
            Ok(0)
        }
        fn ioas_copy(&self, _req: &CopyRequest) -> ioasid::Result<u64> {
            Self::unsupported(Op::IoasCopy)
        }
        fn iova_ranges(&self, _ioas: IoasId) -> ioasid::Result<IovaRanges> {
            Self::unsupported(Op::IovaRanges)
        }
        fn allow_iovas(&self, _ioas: IoasId, _ranges: &[IovaRange]) -> ioasid::Result<()> {
            Self::unsupported(Op::AllowIovas)
        }
        fn attach(&self, _dev: DevId, _pasid: Option<Pasid>, _pt: PtId) -> ioasid::Result<()> {
            Ok(())
        }
        fn detach(&self, _dev: DevId, _pasid: Option<Pasid>) -> ioasid::Result<()> {
            Ok(())
        }
        fn hwpt_alloc(&self, _req: &HwptAlloc) -> ioasid::Result<HwptId> {
            Self::unsupported(Op::HwptAlloc)
        }
        fn hwpt_invalidate(
            &self,
            _hwpt: HwptId,
            _batch: &[Invalidation],
        ) -> ioasid::Result<InvalidateOutcome> {
            Self::unsupported(Op::HwptInvalidate)
        }
        fn fault_queue_alloc(&self) -> ioasid::Result<Box<dyn FaultQueue>> {
            Self::unsupported(Op::FaultQueueAlloc)
        }
    }

    /// 3 GiB + 8 MiB: two regions split around the PCI hole (cheap: MAP_NORESERVE).
    fn split_ram() -> GuestRam {
        GuestRam::new(RamConfig {
            size: (3 << 30) + (8 << 20),
            hugepages: false,
        })
        .unwrap()
    }

    #[test]
    fn by_file_maps_each_region_once_at_its_file_offset() {
        let ram = split_ram();
        let b = Recorder::default();
        let (maps, calls) = map_ram(&b, IoasId(1), ram.regions(), RamMapMode::ByFile).unwrap();
        assert_eq!(calls, ram.regions().len() as u64);
        assert_eq!(
            maps,
            vec![
                RamMapping {
                    iova: 0,
                    len: 3 << 30
                },
                RamMapping {
                    iova: 4 << 30,
                    len: 8 << 20
                }
            ]
        );
        assert_eq!(
            b.calls(),
            vec![
                "map_file off 0x0 iova 0x0 len 0xc0000000".to_string(),
                "map_file off 0xc0000000 iova 0x100000000 len 0x800000".to_string(),
            ]
        );
    }

    #[test]
    fn by_address_uses_host_addresses_and_rolls_back_on_failure() {
        let ram = split_ram();
        let r = ram.regions();
        let ok = Recorder::default();
        let (_, calls) = map_ram(&ok, IoasId(1), r, RamMapMode::ByAddress).unwrap();
        assert_eq!(calls, 2);
        assert_eq!(
            ok.calls()[1],
            format!("map va {:#x} iova 0x100000000 len 0x800000", r[1].host_addr)
        );

        let failing = Recorder {
            fail_at: Some(4 << 30),
            ..Default::default()
        };
        let e = map_ram(&failing, IoasId(1), r, RamMapMode::ByAddress).unwrap_err();
        assert_eq!((e.gpa, e.calls), (4 << 30, 2));
        assert!(
            e.error.to_string().contains("RLIMIT_MEMLOCK"),
            "{}",
            e.error
        );
        // The first region was mapped, then unmapped again.
        assert_eq!(
            failing.calls(),
            vec![
                format!("map va {:#x} iova 0x0 len 0xc0000000", r[0].host_addr),
                "unmap iova 0x0 len 0xc0000000".to_string(),
            ]
        );
    }

    #[test]
    fn a_kernel_without_map_file_gets_ram_by_address() {
        let ram = split_ram();
        let r = ram.regions();
        let old = Recorder {
            file_errno: Some(libc::ENOTTY),
            ..Default::default()
        };
        let (maps, calls) = map_ram(&old, IoasId(1), r, RamMapMode::ByFile).unwrap();
        // One refused MAP_FILE, then every region by address.
        assert_eq!(calls, 3);
        assert_eq!(maps.len(), 2);
        assert_eq!(
            old.calls(),
            vec![
                format!("map va {:#x} iova 0x0 len 0xc0000000", r[0].host_addr),
                format!("map va {:#x} iova 0x100000000 len 0x800000", r[1].host_addr),
            ]
        );
        // Any other MAP_FILE error is the error, with nothing left mapped.
        let broken = Recorder {
            file_errno: Some(libc::ENOMEM),
            ..Default::default()
        };
        let e = map_ram(&broken, IoasId(1), r, RamMapMode::ByFile).unwrap_err();
        assert_eq!((e.gpa, e.calls), (0, 1));
        assert!(broken.calls().is_empty());
    }

    #[test]
    fn kernel_iova_windows_start_above_the_guest_physical_space() {
        let ram = split_ram();
        // 3 GiB + 8 MiB: RAM ends at 4 GiB + 8 MiB, the 64-bit PCI window starts at the next
        // GiB (5 GiB) and is 64 GiB long.
        let top = guest_physical_top(ram.regions());
        assert_eq!(top, (5 << 30) + (64 << 30));
        // VT-d's windows: below the MSI window, and above it up to 2^48.
        let windows = [
            IovaRange {
                start: 0,
                last: 0xfedf_ffff,
            },
            IovaRange {
                start: 0xfef0_0000,
                last: (1 << 48) - 1,
            },
        ];
        assert_eq!(
            above(&windows, top),
            vec![IovaRange {
                start: top,
                last: (1 << 48) - 1
            }]
        );
        // A window that ends below the floor goes; one that straddles it is clipped.
        assert!(above(&windows[..1], top).is_empty());
        assert_eq!(above(&windows, 0), windows.to_vec());
        assert_eq!(guest_physical_top(&[]), (4 << 30) + (64 << 30));
    }

    #[test]
    fn mode_follows_backend() {
        assert_eq!(
            RamMapMode::for_kind(BackendKind::Iommufd),
            RamMapMode::ByFile
        );
        assert_eq!(
            RamMapMode::for_kind(BackendKind::Type1),
            RamMapMode::ByAddress
        );
    }
}
