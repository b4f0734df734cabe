//! The L3 guest as the client of ioasid-vmm's emulated VT-d: Linux's own intel-iommu driver
//! binds the unit, edu gets an IOMMU group behind it, and L3 userspace drives edu's DMA
//! through its own VFIO (the type1 container, then iommufd with the device cdev) at IOVAs
//! that only the guest's second-stage tables translate.
//!
//! The round trip of one DMA: L3 userspace maps a buffer at IOVA X; L3's intel-iommu writes
//! its second-stage tables and invalidates through the unit's queue; ioasid-vmm's model
//! decodes that and its shadow maps X into edu's host IOAS in L2; edu (behind QEMU's VT-d in
//! L2) then reaches the buffer at X. X is chosen unequal to the buffer's guest-physical
//! address, so a VMM that ignored the guest's tables (IOVA = GPA) would miss the buffer.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ioasid::caps::{VtdCap, VtdEcap};
use ioasid::{
    sysfs, DevId, IoasId, IommuBackend, IommufdBackend, MapUser, Perm, PtId, Type1Backend,
};
use vfio_ioctls::VfioDevice;

use super::pagemap::{PinnedPage, PAGE};
use super::tasks::{edu_bdf, EDU_IDS};
use super::{dmesg, pci, report};
use crate::edu::{Edu, EDU_BUF};

/// The IOVAs the DMA check may use: inside edu's 28-bit DMA mask, page aligned, and two
/// candidates so that one is always unequal to the buffers' guest-physical addresses.
const IOVA_CANDIDATES: [u64; 2] = [0x0a00_0000, 0x0b40_0000];

/// The DMAR unit intel-iommu put `bdf` behind (its `iommu` link in sysfs), e.g. `dmar0`.
fn unit_of(bdf: &str) -> Result<String, String> {
    let link = std::fs::read_link(pci::dir(bdf).join("iommu")).map_err(|e| {
        format!("{bdf} has no iommu link: no DMAR unit claims it (DRHD device scope?): {e}")
    })?;
    link.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format!("{bdf}: odd iommu link {}", link.display()))
}

/// The IOMMU group number of `bdf`.
fn group_of(bdf: &str) -> Result<u32, String> {
    let link = std::fs::read_link(pci::dir(bdf).join("iommu_group"))
        .map_err(|e| format!("{bdf} has no iommu_group link: {e}"))?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{bdf}: odd iommu_group link {}", link.display()))
}

/// Reads a hex register file of a unit under /sys/class/iommu/<unit>/intel-iommu/.
fn unit_reg(unit: &str, name: &str) -> Result<u64, String> {
    crate::hexfile::read_hex(
        &Path::new("/sys/class/iommu")
            .join(unit)
            .join("intel-iommu")
            .join(name),
    )
}

/// `viommu_dmar`: intel-iommu was asked on, found our unit in the ACPI DMAR table, runs it
/// in scalable mode with queued invalidation, and the registers it read at probe time are
/// the ones sysfs shows. The detail carries `unit= cap=0x.. ecap=0x..` for the L2 side to
/// compare with `vm.iommu`.
pub fn dmar() -> Result<String, String> {
    let log = dmesg::read()?;
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if !dmesg::has(&log, "DMAR: IOMMU enabled") {
        return Err(format!(
            "no 'DMAR: IOMMU enabled' in dmesg (intel_iommu=on missing? cmdline: {})",
            cmdline.trim()
        ));
    }
    let units = dmesg::dmar_units(&log);
    let bdf = edu_bdf()?;
    let unit_name = unit_of(&bdf)?;
    let unit = units
        .iter()
        .find(|u| u.name == unit_name)
        .ok_or_else(|| {
            format!(
                "edu is behind {unit_name}, but dmesg has no '{unit_name}: reg_base_addr' line (units seen: {units:?})"
            )
        })?;
    let (cap, ecap) = (unit_reg(&unit_name, "cap")?, unit_reg(&unit_name, "ecap")?);
    if (cap, ecap) != (unit.cap, unit.ecap) {
        return Err(format!(
            "{unit_name}: sysfs cap {cap:#x} ecap {ecap:#x} differ from the probe's cap {:#x} ecap {:#x}",
            unit.cap, unit.ecap
        ));
    }
    let c = VtdCap::decode(cap);
    let e = VtdEcap::decode(ecap);
    let mut missing = Vec::new();
    for (ok, what) in [
        (e.smts, "ECAP.SMTS (scalable mode)"),
        (e.qi, "ECAP.QI (queued invalidation)"),
        (e.slts, "ECAP.SSTS (second-stage translation)"),
        (c.cm, "CAP.CM (caching mode)"),
    ] {
        if !ok {
            missing.push(what);
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "{unit_name} (cap {cap:#x} ecap {ecap:#x}) lacks {}",
            missing.join(", ")
        ));
    }
    // Linux runs a unit in scalable mode when sm_on (or the config default) meets ECAP.SMTS
    // (`sm_supported`); it logs no line of its own for it.
    let sm_asked = dmesg::has(&log, "Enable scalable mode if hardware supports");
    if !sm_asked {
        return Err(format!(
            "intel_iommu=sm_on was not parsed (no 'Enable scalable mode' line); cmdline: {}",
            cmdline.trim()
        ));
    }
    let qi_line = format!("{unit_name}: Using Queued invalidation");
    if !dmesg::has(&log, &qi_line) {
        return Err(format!(
            "no '{qi_line}' in dmesg: intel-iommu did not enable the unit's invalidation queue"
        ));
    }
    if !dmesg::has(&log, "Intel(R) Virtualization Technology for Directed I/O") {
        return Err("intel-iommu did not finish its init (no 'Intel(R) Virtualization Technology for Directed I/O' line)".into());
    }
    let trouble = dmesg::trouble(&log);
    if !trouble.is_empty() {
        return Err(format!(
            "the kernel log shows trouble: {}",
            trouble.join(" | ")
        ));
    }
    Ok(format!(
        "unit={unit_name} base={:#x} ver={}:{} cap={cap:#x} ecap={ecap:#x} mgaw={} sagaw={:#x} pasid_bits={} units={} sm=on qi=on",
        unit.base,
        unit.ver.0,
        unit.ver.1,
        c.mgaw,
        c.sagaw,
        e.pasid_bits,
        units.len()
    ))
}

/// `viommu_edu_group`: edu sits in an IOMMU group of its own, made by intel-iommu (not a
/// VFIO no-IOMMU group), with a translating default domain.
pub fn edu_group() -> Result<String, String> {
    let bdf = edu_bdf()?;
    let unit = unit_of(&bdf)?;
    let group = group_of(&bdf)?;
    let gdir = Path::new("/sys/kernel/iommu_groups").join(group.to_string());
    let members: Vec<String> = std::fs::read_dir(gdir.join("devices"))
        .map_err(|e| format!("{}: {e}", gdir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if members != [bdf.clone()] {
        return Err(format!(
            "group {group} of {bdf} holds {members:?}, want only edu"
        ));
    }
    let kind = std::fs::read_to_string(gdir.join("type"))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("{}/type: {e}", gdir.display()))?;
    if !kind.starts_with("DMA") {
        return Err(format!(
            "group {group} of {bdf} has default domain type {kind:?}, want a translating DMA domain"
        ));
    }
    Ok(format!("edu={bdf} unit={unit} group={group} type={kind}"))
}

/// Which VFIO flavour L3 userspace uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// `/dev/vfio/vfio` container and `/dev/vfio/<group>` with the type1 IOMMU.
    Type1,
    /// `/dev/iommu` and `/dev/vfio/devices/vfioN`.
    Iommufd,
}

/// The backend and the device opened through it, unbound on drop.
enum Opened {
    Type1(Type1Backend, DevId),
    Iommufd(IommufdBackend, DevId),
}

impl Opened {
    fn backend(&self) -> &dyn IommuBackend {
        match self {
            Opened::Type1(b, _) => b,
            Opened::Iommufd(b, _) => b,
        }
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        match self {
            Opened::Type1(b, d) => b.unbind(*d),
            Opened::Iommufd(b, d) => b.unbind(*d),
        }
    }
}

/// Opens edu through `flavor` with a fresh IOAS; the detail names what was opened.
fn open(bdf: &str, flavor: Flavor) -> Result<(Opened, Arc<VfioDevice>, IoasId, String), String> {
    let spec = sysfs::resolve(&pci::dir(bdf)).map_err(|e| e.to_string())?;
    let group = spec
        .group
        .ok_or_else(|| format!("{bdf} has no IOMMU group"))?;
    if Path::new(&format!("/dev/vfio/noiommu-{group}")).exists() {
        return Err(format!(
            "{bdf}'s group {group} is a VFIO no-IOMMU group: intel-iommu does not translate it"
        ));
    }
    match flavor {
        Flavor::Type1 => {
            let b = Type1Backend::open().map_err(|e| e.to_string())?;
            let ioas = b.ioas_alloc().map_err(|e| e.to_string())?;
            let (dev, vfio) = b.bind(&spec, ioas).map_err(|e| e.to_string())?;
            Ok((
                Opened::Type1(b, dev),
                vfio,
                ioas,
                format!("type1 group {group}"),
            ))
        }
        Flavor::Iommufd => {
            let b = IommufdBackend::open().map_err(|e| e.to_string())?;
            let (dev, vfio) = b.bind(&spec).map_err(|e| e.to_string())?;
            // IOMMU_GET_HW_INFO: L3's intel-iommu reports our unit's registers to userspace.
            let hw = match b.hw_info(dev).map_err(|e| e.to_string())?.info {
                ioasid::HwInfo::IntelVtd(v) => {
                    format!("hw_info cap={:#x} ecap={:#x}", v.cap_reg, v.ecap_reg)
                }
                other => return Err(format!("IOMMU_GET_HW_INFO on {bdf}: not VT-d: {other:?}")),
            };
            let ioas = b.ioas_alloc().map_err(|e| e.to_string())?;
            b.attach(dev, None, PtId::Ioas(ioas))
                .map_err(|e| e.to_string())?;
            let cdev = spec
                .cdev
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            Ok((
                Opened::Iommufd(b, dev),
                vfio,
                ioas,
                format!("iommufd {cdev} {hw}"),
            ))
        }
    }
}

/// Maps `page` at `iova` (read and write).
fn map(b: &dyn IommuBackend, ioas: IoasId, iova: u64, page: &PinnedPage) -> Result<(), String> {
    let req = MapUser {
        iova: Some(iova),
        user_va: page.va(),
        len: PAGE as u64,
        perm: Perm::RW,
    };
    // SAFETY: the page stays mapped in this process until it is unmapped from the IOAS: the
    // caller unmaps it, and the backend (whose drop tears the IOAS down) is dropped before
    // the pages in `dma_through`; the page is only touched through volatile raw accesses.
    unsafe { b.ioas_map(ioas, &req) }
        .map(|_| ())
        .map_err(|e| format!("map {PAGE:#x} bytes at IOVA {iova:#x}: {e}"))
}

fn unmap(b: &dyn IommuBackend, ioas: IoasId, iova: u64) -> Result<(), String> {
    b.ioas_unmap(ioas, iova, PAGE as u64)
        .map(|_| ())
        .map_err(|e| format!("unmap IOVA {iova:#x}: {e}"))
}

/// The first byte where `got` differs from `want`, in words.
fn first_diff(got: &[u8], want: &[u8], what: &str) -> Option<String> {
    (0..want.len().min(got.len()))
        .find(|&i| got[i] != want[i])
        .map(|i| format!("{what}: byte {i} is {:#04x}, want {:#04x}", got[i], want[i]))
}

/// edu reads the page at `iova_src` into its buffer and writes it to `iova_dst`.
fn dma_through(bdf: &str, flavor: Flavor, seed: u8) -> Result<String, String> {
    // The pages are declared before the backend so that they outlive its mappings.
    let src = PinnedPage::new()?;
    let dst = PinnedPage::new()?;
    let pattern: Vec<u8> = (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    src.write_volatile(&pattern);
    let poison = vec![0x5au8; PAGE];
    dst.write_volatile(&poison);
    let iova = IOVA_CANDIDATES
        .into_iter()
        .find(|&x| {
            let ours = [x, x + PAGE as u64];
            !ours.contains(&src.phys()) && !ours.contains(&dst.phys())
        })
        .ok_or("no IOVA candidate differs from the buffers' guest-physical addresses")?;
    let (iova_src, iova_dst) = (iova, iova + PAGE as u64);

    let (opened, vfio, ioas, what) = open(bdf, flavor)?;
    let b = opened.backend();
    map(b, ioas, iova_src, &src)?;
    map(b, ioas, iova_dst, &dst)?;
    let edu = Edu::map(&vfio)?;

    // 1. Through the guest's tables: edu reaches the buffers at their IOVAs.
    edu.round_trip(iova_src, iova_dst, PAGE as u32)
        .map_err(|e| format!("{what}: DMA at IOVA {iova_src:#x} -> {iova_dst:#x}: {e}"))?;
    if let Some(d) = first_diff(&dst.read_volatile(), &pattern, "after the mapped DMA") {
        return Err(format!(
            "{what}: {d} (IOVA {iova_dst:#x}, GPA {:#x}): the DMA did not land through the vIOMMU",
            dst.phys()
        ));
    }

    // 2. The guest unmaps the destination: edu's write to it must not land in the page.
    dst.write_volatile(&poison);
    unmap(b, ioas, iova_dst)?;
    edu.dma(EDU_BUF, iova_dst, PAGE as u32, true).map_err(|e| {
        format!("{what}: DMA to the unmapped IOVA {iova_dst:#x} did not complete: {e}")
    })?;
    if let Some(d) = first_diff(&dst.read_volatile(), &poison, "after the unmap") {
        return Err(format!(
            "{what}: {d}: a DMA to the unmapped IOVA {iova_dst:#x} reached the page (GPA {:#x}): a stale mapping survived the guest's unmap",
            dst.phys()
        ));
    }

    // 3. Mapped again, the same DMA lands: the device survived, the miss was the unmap's.
    map(b, ioas, iova_dst, &dst)?;
    edu.dma(EDU_BUF, iova_dst, PAGE as u32, true)
        .map_err(|e| format!("{what}: DMA after the remap: {e}"))?;
    if let Some(d) = first_diff(&dst.read_volatile(), &pattern, "after the remap") {
        return Err(format!(
            "{what}: {d}: the remapped IOVA {iova_dst:#x} does not reach the page"
        ));
    }
    drop(edu);
    unmap(b, ioas, iova_src)?;
    unmap(b, ioas, iova_dst)?;
    drop(vfio);
    drop(opened);
    Ok(format!(
        "{what}; {PAGE} bytes IOVA {iova_src:#x} (GPA {:#x}) -> edu -> IOVA {iova_dst:#x} (GPA {:#x}); after unmap the DMA missed; after remap it landed",
        src.phys(),
        dst.phys()
    ))
}

/// `edu-viommu`: edu bound to vfio-pci, then the DMA check through type1 and through
/// iommufd, each reported (`edu_viommu_type1`, `edu_viommu_iommufd`).
pub fn edu_dma_all() {
    let names = ["edu_viommu_type1", "edu_viommu_iommufd"];
    let bdf = match edu_bdf().and_then(|b| pci::bind_vfio(&b).map(|()| b)) {
        Ok(b) => b,
        Err(e) => {
            for n in names {
                report(n, &Err(e.clone()));
            }
            return;
        }
    };
    report(names[0], &dma_through(&bdf, Flavor::Type1, 0x11));
    report(names[1], &dma_through(&bdf, Flavor::Iommufd, 0x77));
}

/// `viommu-unplug`: announces readiness, waits for edu to be hot-removed, then checks the
/// guest is healthy: no oops, WARN, stall or invalidation-queue error in its log (an
/// unanswered wait descriptor during the device's teardown would show here, or hang the
/// guest before it prints anything), and the DMAR unit still present.
pub fn unplug() {
    let before = edu_bdf().ok();
    println!("L3-READY viommu-unplug");
    let left = pci::wait_for(EDU_IDS.0, EDU_IDS.1, false, Duration::from_secs(180));
    report(
        "viommu_unplug_removed",
        &if left.is_empty() {
            Ok(format!(
                "edu {} is gone from /sys/bus/pci/devices",
                before.as_deref().unwrap_or("?")
            ))
        } else {
            Err(format!("edu still present after 180 s: {left:?}"))
        },
    );
    report("viommu_unplug_healthy", &healthy_after_unplug());
    // The L2 side reads the VMM's state now and then stops the VMM; the guest powers off by
    // itself if that does not come.
    println!("L3-READY viommu-done");
    std::thread::sleep(LINGER);
}

/// How long the guest stays up after its last unplug check, for the L2 side's queries.
const LINGER: Duration = Duration::from_secs(90);

fn healthy_after_unplug() -> Result<String, String> {
    let log = dmesg::read()?;
    let trouble = dmesg::trouble(&log);
    if !trouble.is_empty() {
        return Err(format!(
            "the kernel log shows trouble: {}",
            trouble.join(" | ")
        ));
    }
    let units: Vec<String> = std::fs::read_dir("/sys/class/iommu")
        .map_err(|e| format!("/sys/class/iommu: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if units.is_empty() {
        return Err("no DMAR unit left in /sys/class/iommu".into());
    }
    let groups = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|d| d.count())
        .unwrap_or(0);
    Ok(format!(
        "kernel log clean; units {units:?}; {groups} IOMMU group(s) left"
    ))
}
