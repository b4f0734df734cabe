//! Real-kernel tests of the `ioasid` crate: iommufd and type1 with QEMU's edu device behind
//! the emulated VT-d, and the mtty mdev. Every test goes through the crate's public API.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use ioasid::{
    sysfs, BackendKind, CopyRequest, DevId, DeviceSpec, HwInfo, IoasId, IommuBackend,
    IommufdBackend, MapUser, Perm, PtId, Type1Backend,
};
use vfio_ioctls::VfioDevice;

use super::env::{edu_path, mtty_path, pattern};
use crate::dmabuf::DmaBuf;
use crate::edu::{Edu, EDU_BUF_LEN, EDU_IDENT};
use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};
use crate::hexfile::read_hex;

const IOVA_SRC: u64 = 0x10_0000;
const IOVA_DST: u64 = 0x20_0000;
const LEN: usize = EDU_BUF_LEN;

/// The ioasid tests.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "iommufd_ioas_edu_dma",
            run: iommufd_ioas_edu_dma,
        },
        LabTest {
            name: "iommufd_unmap_blocks_dma",
            run: iommufd_unmap_blocks_dma,
        },
        LabTest {
            name: "type1_edu_dma",
            run: type1_edu_dma,
        },
        LabTest {
            name: "mtty_bind_attach",
            run: mtty_bind_attach,
        },
        LabTest {
            name: "ioas_copy_then_dma",
            run: ioas_copy_then_dma,
        },
        LabTest {
            name: "iova_ranges_enforced",
            run: iova_ranges_enforced,
        },
        LabTest {
            name: "hw_info_matches_sysfs",
            run: hw_info_matches_sysfs,
        },
        LabTest {
            name: "mdev_has_no_hw_info",
            run: mdev_has_no_hw_info,
        },
        LabTest {
            name: "detach_reattach_dma",
            run: detach_reattach_dma,
        },
        LabTest {
            name: "bad_inputs_decoded",
            run: bad_inputs_decoded,
        },
    ]
}

fn s(e: impl std::error::Error) -> String {
    chain(&e)
}

/// edu bound to a fresh iommufd, not yet attached.
struct EduIommufd {
    backend: Arc<IommufdBackend>,
    dev: DevId,
    vfio: Arc<VfioDevice>,
    spec: DeviceSpec,
}

impl EduIommufd {
    fn open() -> Result<Self, String> {
        let spec = sysfs::resolve(&edu_path()?).map_err(s)?;
        let backend = Arc::new(IommufdBackend::open().map_err(s)?);
        let (dev, vfio) = backend.bind(&spec).map_err(s)?;
        Ok(EduIommufd {
            backend,
            dev,
            vfio,
            spec,
        })
    }

    fn edu(&self) -> Result<Edu, String> {
        let edu = Edu::map(&self.vfio)?;
        let ident = edu.read32(0);
        ensure!(
            ident == EDU_IDENT,
            "edu ident {ident:#x}, want {EDU_IDENT:#x}"
        );
        Ok(edu)
    }
}

impl Drop for EduIommufd {
    fn drop(&mut self) {
        self.backend.unbind(self.dev);
    }
}

/// edu attached to a fresh IOAS, with a source and a destination buffer mapped at
/// `IOVA_SRC`/`IOVA_DST` and its BAR0 mapped: the setup of every plain DMA test.
struct EduDma {
    edu: Edu,
    src: DmaBuf,
    dst: DmaBuf,
    ioas: IoasId,
    f: EduIommufd,
}

impl EduDma {
    fn open() -> Result<Self, String> {
        let f = EduIommufd::open()?;
        let ioas = f.backend.ioas_alloc().map_err(s)?;
        f.backend.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
        let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
        map(&*f.backend, ioas, IOVA_SRC, &src)?;
        map(&*f.backend, ioas, IOVA_DST, &dst)?;
        let edu = f.edu()?;
        Ok(EduDma {
            edu,
            src,
            dst,
            ioas,
            f,
        })
    }
}

fn map(b: &dyn IommuBackend, ioas: IoasId, iova: u64, buf: &DmaBuf) -> Result<(), String> {
    // SAFETY: `buf` is only accessed with volatile operations and outlives the mapping in
    // every test (each test unmaps or drops the IOAS/backend before the buffer).
    let got = unsafe {
        b.ioas_map(
            ioas,
            &MapUser {
                iova: Some(iova),
                user_va: buf.va(),
                len: buf.len() as u64,
                perm: Perm::RW,
            },
        )
    }
    .map_err(s)?;
    ensure!(got == iova, "mapped at {got:#x}, asked for {iova:#x}");
    Ok(())
}

/// Copies a pattern RAM -> edu -> RAM and checks the bytes.
fn round_trip(
    edu: &Edu,
    src: &DmaBuf,
    dst: &DmaBuf,
    seed: u8,
    iova_src: u64,
    iova_dst: u64,
) -> Result<(), String> {
    let want = pattern(seed, LEN);
    src.write(0, &want);
    dst.fill(0);
    edu.round_trip(iova_src, iova_dst, LEN as u32)?;
    let got = dst.read(0, LEN);
    let bad = got.iter().zip(&want).position(|(a, b)| a != b);
    ensure!(
        bad.is_none(),
        "DMA data mismatch at byte {:?}: got {:02x?}.. want {:02x?}..",
        bad,
        &got[..8],
        &want[..8]
    );
    Ok(())
}

fn iommufd_ioas_edu_dma() -> TestResult {
    let EduDma {
        edu,
        src,
        dst,
        ioas,
        f,
    } = EduDma::open()?;
    round_trip(&edu, &src, &dst, 0x5a, IOVA_SRC, IOVA_DST)?;
    println!(
        "  {}: {} bytes RAM->edu->RAM through IOAS {} at IOVA {IOVA_SRC:#x}/{IOVA_DST:#x}: match",
        f.spec.name, LEN, ioas.0
    );
    Ok(Outcome::Pass)
}

fn iommufd_unmap_blocks_dma() -> TestResult {
    let EduDma {
        edu,
        src,
        dst,
        ioas,
        f,
    } = EduDma::open()?;
    // First prove the path works, so an untouched buffer below means "blocked", not "broken".
    round_trip(&edu, &src, &dst, 0x11, IOVA_SRC, IOVA_DST)?;
    let unmapped = f
        .backend
        .ioas_unmap(ioas, IOVA_DST, LEN as u64)
        .map_err(s)?;
    ensure!(
        unmapped == LEN as u64,
        "unmapped {unmapped} bytes, want {LEN}"
    );
    dst.fill(0xee);
    src.write(0, &pattern(0x77, LEN));
    edu.dma(IOVA_SRC, crate::edu::EDU_BUF, LEN as u32, false)?;
    edu.dma(crate::edu::EDU_BUF, IOVA_DST, LEN as u32, true)?;
    let after = dst.read(0, LEN);
    ensure!(
        after.iter().all(|&b| b == 0xee),
        "the device wrote to an unmapped IOVA: buffer changed ({:02x?}..)",
        &after[..8]
    );
    Ok(Outcome::Pass)
}

fn type1_edu_dma() -> TestResult {
    let spec = sysfs::resolve(&edu_path()?).map_err(s)?;
    let backend = Type1Backend::open().map_err(s)?;
    ensure!(backend.kind() == BackendKind::Type1, "wrong backend kind");
    let ioas = backend.ioas_alloc().map_err(s)?;
    let (dev, vfio) = backend.bind(&spec, ioas).map_err(s)?;
    let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
    map(&backend, ioas, IOVA_SRC, &src)?;
    map(&backend, ioas, IOVA_DST, &dst)?;
    let edu = Edu::map(&vfio)?;
    ensure!(edu.read32(0) == EDU_IDENT, "edu ident {:#x}", edu.read32(0));
    round_trip(&edu, &src, &dst, 0x3c, IOVA_SRC, IOVA_DST)?;
    let n = backend.ioas_unmap_all(ioas).map_err(s)?;
    ensure!(
        n == 2 * LEN as u64,
        "unmap-all removed {n} bytes, want {}",
        2 * LEN
    );
    drop(edu);
    backend.unbind(dev);
    Ok(Outcome::Pass)
}

fn mtty_bind_attach() -> TestResult {
    let spec = sysfs::resolve(&mtty_path()?).map_err(s)?;
    ensure!(spec.is_mdev, "{} is not an mdev", spec.name);
    let backend = IommufdBackend::open().map_err(s)?;
    let (dev, vfio) = backend.bind(&spec).map_err(s)?;
    let ioas = backend.ioas_alloc().map_err(s)?;
    backend.attach(dev, None, PtId::Ioas(ioas)).map_err(s)?;
    // mtty exposes a PCI-like config region; its vendor:device is 4348:3253.
    let mut id = [0u8; 4];
    vfio.region_read(
        vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX,
        &mut id,
        0,
    );
    let vendor = u16::from_le_bytes([id[0], id[1]]);
    ensure!(
        vendor == 0x4348,
        "mtty config vendor {vendor:#06x}, want 0x4348"
    );
    let buf = DmaBuf::new(LEN).map_err(s)?;
    map(&backend, ioas, IOVA_SRC, &buf)?;
    backend.ioas_unmap(ioas, IOVA_SRC, LEN as u64).map_err(s)?;
    backend.unbind(dev);
    Ok(Outcome::Pass)
}

fn ioas_copy_then_dma() -> TestResult {
    let f = EduIommufd::open()?;
    let a = f.backend.ioas_alloc().map_err(s)?;
    let b = f.backend.ioas_alloc().map_err(s)?;
    let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
    map(&*f.backend, a, IOVA_SRC, &src)?;
    map(&*f.backend, a, IOVA_DST, &dst)?;
    // Copy both to different IOVAs in B, then DMA through B only.
    let (b_src, b_dst) = (0x300_0000, 0x400_0000);
    for (from, to) in [(IOVA_SRC, b_src), (IOVA_DST, b_dst)] {
        let got = f
            .backend
            .ioas_copy(&CopyRequest {
                src: a,
                src_iova: from,
                dst: b,
                dst_iova: Some(to),
                len: LEN as u64,
                perm: Perm::RW,
            })
            .map_err(s)?;
        ensure!(got == to, "copied to {got:#x}, want {to:#x}");
    }
    f.backend.attach(f.dev, None, PtId::Ioas(b)).map_err(s)?;
    let edu = f.edu()?;
    round_trip(&edu, &src, &dst, 0x42, b_src, b_dst)?;
    // The original IOVAs do not exist in B.
    let e = f
        .backend
        .ioas_unmap(b, IOVA_SRC, LEN as u64)
        .err()
        .ok_or("unmap of an IOVA only in A succeeded on B")?;
    ensure!(e.errno() == Some(libc::ENOENT), "want ENOENT, got {e}");
    Ok(Outcome::Pass)
}

fn iova_ranges_enforced() -> TestResult {
    let f = EduIommufd::open()?;
    let ioas = f.backend.ioas_alloc().map_err(s)?;
    f.backend.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
    let r = f.backend.iova_ranges(ioas).map_err(s)?;
    println!(
        "  IOVA ranges of IOAS {}: {:x?}, alignment {:#x}",
        ioas.0, r.ranges, r.alignment
    );
    ensure!(!r.ranges.is_empty(), "no IOVA ranges reported");
    ensure!(
        r.alignment >= 1 && r.alignment <= 4096,
        "alignment {:#x}",
        r.alignment
    );
    // VT-d reserves the MSI window 0xfee00000..0xfeefffff: it must be outside every range.
    let msi = 0xfee0_0000u64;
    ensure!(
        !r.permits(msi, 4096),
        "the MSI window {msi:#x} is reported as mappable"
    );
    let buf = DmaBuf::new(LEN).map_err(s)?;
    for bad in [msi, 1u64 << 60] {
        ensure!(
            !r.permits(bad, LEN as u64),
            "{bad:#x} unexpectedly inside the ranges"
        );
        // SAFETY: as in `map`; the map is expected to fail.
        let res = unsafe {
            f.backend.ioas_map(
                ioas,
                &MapUser {
                    iova: Some(bad),
                    user_va: buf.va(),
                    len: LEN as u64,
                    perm: Perm::RW,
                },
            )
        };
        match res {
            Ok(_) => {
                return Err(format!(
                    "a map at {bad:#x}, outside the reported ranges, succeeded"
                ))
            }
            Err(e) => {
                let m = e.to_string();
                ensure!(
                    m.contains("IOMMU_IOAS_MAP") && m.contains(&format!("{bad:#x}")),
                    "error does not name the op and IOVA: {m}"
                );
                println!("  map at {bad:#x} refused: {m}");
            }
        }
    }
    // And a map inside the ranges works.
    map(&*f.backend, ioas, IOVA_SRC, &buf)?;
    Ok(Outcome::Pass)
}

fn hw_info_matches_sysfs() -> TestResult {
    let f = EduIommufd::open()?;
    let caps = f.backend.hw_info(f.dev).map_err(s)?;
    println!(
        "  caps: {}",
        serde_json::to_string(&caps).unwrap_or_default()
    );
    let HwInfo::IntelVtd(vtd) = &caps.info else {
        return Err(format!(
            "edu's IOMMU is not reported as VT-d: {:?}",
            caps.info
        ));
    };
    let iommu = fs::canonicalize(f.spec.sysfs.join("iommu"))
        .map_err(|e| format!("{}/iommu: {e}", f.spec.sysfs.display()))?;
    let cap = read_hex(&iommu.join("intel-iommu/cap"))?;
    let ecap = read_hex(&iommu.join("intel-iommu/ecap"))?;
    ensure!(
        vtd.cap_reg == cap,
        "GET_HW_INFO cap {:#x} != sysfs {cap:#x}",
        vtd.cap_reg
    );
    ensure!(
        vtd.ecap_reg == ecap,
        "GET_HW_INFO ecap {:#x} != sysfs {ecap:#x}",
        vtd.ecap_reg
    );
    ensure!(
        vtd.ecap.smts && vtd.ecap.flts,
        "QEMU x-scalable-mode/x-flts not visible: {:?}",
        vtd.ecap
    );
    ensure!(
        !caps.supports_nesting(),
        "QEMU's VT-d reports nesting, which it never advertises"
    );
    ensure!(
        caps.nesting_unsupported_reason()
            .is_some_and(|r| r.contains("NEST=0")),
        "no reason given"
    );
    Ok(Outcome::Pass)
}

fn mdev_has_no_hw_info() -> TestResult {
    let spec = sysfs::resolve(&mtty_path()?).map_err(s)?;
    let backend = IommufdBackend::open().map_err(s)?;
    let (dev, _vfio) = backend.bind(&spec).map_err(s)?;
    let ioas = backend.ioas_alloc().map_err(s)?;
    backend.attach(dev, None, PtId::Ioas(ioas)).map_err(s)?;
    let caps = backend.hw_info(dev).map_err(s)?;
    ensure!(
        !caps.has_hw_info(),
        "mtty reports hardware info: {:?}",
        caps.info
    );
    ensure!(
        !caps.supports_nesting() && caps.max_pasid_bits() == 0,
        "mtty claims nesting/PASID"
    );
    println!(
        "  {}: {}",
        spec.name,
        serde_json::to_string(&caps.info).unwrap_or_default()
    );
    backend.unbind(dev);
    Ok(Outcome::Pass)
}

fn detach_reattach_dma() -> TestResult {
    let EduDma {
        edu,
        src,
        dst,
        ioas,
        f,
    } = EduDma::open()?;
    round_trip(&edu, &src, &dst, 1, IOVA_SRC, IOVA_DST)?;
    f.backend.detach(f.dev, None).map_err(s)?;
    // Detached: DMA is blocked.
    dst.fill(0xcd);
    edu.dma(crate::edu::EDU_BUF, IOVA_DST, LEN as u32, true)?;
    ensure!(
        dst.read(0, LEN).iter().all(|&b| b == 0xcd),
        "a detached device wrote guest memory"
    );
    f.backend.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
    round_trip(&edu, &src, &dst, 2, IOVA_SRC, IOVA_DST)?;
    Ok(Outcome::Pass)
}

fn bad_inputs_decoded() -> TestResult {
    // 1. A BDF that does not exist.
    let e = sysfs::resolve(Path::new("/sys/bus/pci/devices/0000:7f:1f.7"))
        .err()
        .ok_or("a missing BDF resolved")?;
    let m = e.to_string();
    ensure!(
        m.contains("0000:7f:1f.7") && m.contains("no PCI device"),
        "missing BDF: {m}"
    );
    // 2. A device bound to another driver (any PCI function not on vfio-pci).
    let other = fs::read_dir("/sys/bus/pci/devices")
        .map_err(s)?
        .flatten()
        .find(|e| {
            fs::read_link(e.path().join("driver"))
                .ok()
                .and_then(|t| t.file_name().map(|n| n != "vfio-pci"))
                .unwrap_or(false)
        })
        .ok_or("no PCI function with a non-vfio driver in this guest")?;
    let p = Path::new("/sys/bus/pci/devices").join(other.file_name());
    let e = sysfs::resolve(&p)
        .err()
        .ok_or("a device on another driver resolved")?;
    let m = e.to_string();
    ensure!(
        m.contains("driver_override")
            && m.contains(&other.file_name().to_string_lossy().into_owned()),
        "wrong-driver: {m}"
    );
    // 3 and 4: a double map of one IOVA, and an unmap of nothing.
    let f = EduIommufd::open()?;
    let ioas = f.backend.ioas_alloc().map_err(s)?;
    f.backend.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
    let buf = DmaBuf::new(LEN).map_err(s)?;
    map(&*f.backend, ioas, IOVA_SRC, &buf)?;
    let e = map(&*f.backend, ioas, IOVA_SRC, &buf)
        .err()
        .ok_or("a double map succeeded")?;
    ensure!(
        e.contains("EEXIST") && e.contains("overlaps") && e.contains(&format!("{IOVA_SRC:#x}")),
        "double map: {e}"
    );
    let e = f
        .backend
        .ioas_unmap(ioas, 0x900_0000, LEN as u64)
        .err()
        .ok_or("an unmap of nothing succeeded")?;
    let m = e.to_string();
    ensure!(
        e.errno() == Some(libc::ENOENT)
            && m.contains("0x9000000")
            && m.contains("nothing is mapped"),
        "unmap of nothing: {m}"
    );
    println!("  decoded: {m}");
    Ok(Outcome::Pass)
}
