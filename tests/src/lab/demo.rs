//! The main-job demo: assign edu through the ioasid crate and show a DMA round trip, then
//! boot a Linux L3 guest under `ioasid-vmm` with edu and the mtty mdev passed through and
//! show what the guest sees and its DMA result.

use std::sync::Arc;

use ioasid::{
    choose, sysfs, BackendChoice, HostFacts, IommuBackend, IommufdBackend, MapUser, Perm, PtId,
};

use super::env::{edu_path, pattern};
use crate::dmabuf::DmaBuf;
use crate::edu::{Edu, EDU_BUF, EDU_IDENT};
use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The demo, as one lab test.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "demo_edu_dma_round_trip",
            run: demo,
        },
        LabTest {
            name: "demo_linux_guest_with_edu_and_mtty",
            run: demo_l3,
        },
    ]
}

fn demo() -> TestResult {
    let s = |e: ioasid::Error| chain(&e);
    let path = edu_path()?;
    println!("DEMO 1. device {}", path.display());
    let spec = sysfs::resolve(&path).map_err(s)?;
    println!(
        "DEMO    {} in IOMMU group {:?}, cdev {:?}",
        spec.name, spec.group, spec.cdev
    );
    let kind = choose(BackendChoice::Auto, HostFacts::probe(), Some(&spec)).map_err(s)?;
    println!("DEMO 2. backend auto -> {kind}");
    let backend = Arc::new(IommufdBackend::open().map_err(s)?);
    let (dev, vfio) = backend.bind(&spec).map_err(s)?;
    println!("DEMO 3. VFIO_DEVICE_BIND_IOMMUFD -> dev_id {}", dev.0);
    let caps = backend.hw_info(dev).map_err(s)?;
    println!("DEMO 4. capabilities before attach (IOMMU_GET_HW_INFO):");
    println!(
        "{}",
        serde_json::to_string_pretty(&caps).unwrap_or_default()
    );
    println!(
        "DEMO    supports_nesting() = {} ({}), max_pasid_bits() = {}",
        caps.supports_nesting(),
        caps.nesting_unsupported_reason()
            .unwrap_or_else(|| "nesting available".into()),
        caps.max_pasid_bits()
    );
    let ioas = backend.ioas_alloc().map_err(s)?;
    backend.attach(dev, None, PtId::Ioas(ioas)).map_err(s)?;
    println!(
        "DEMO 5. IOMMU_IOAS_ALLOC -> IOAS {}; VFIO_DEVICE_ATTACH_IOMMUFD_PT ok",
        ioas.0
    );
    let ranges = backend.iova_ranges(ioas).map_err(s)?;
    println!(
        "DEMO    IOVA ranges {:x?} alignment {:#x}",
        ranges.ranges, ranges.alignment
    );
    let len = 4096usize;
    let src = DmaBuf::new(len).map_err(|e| e.to_string())?;
    let dst = DmaBuf::new(len).map_err(|e| e.to_string())?;
    for (iova, buf) in [(0x10_0000u64, &src), (0x20_0000, &dst)] {
        // SAFETY: the buffers are only accessed with volatile operations and outlive the
        // backend's mappings (the backend is dropped first at the end of this function).
        unsafe {
            backend.ioas_map(
                ioas,
                &MapUser {
                    iova: Some(iova),
                    user_va: buf.va(),
                    len: len as u64,
                    perm: Perm::RW,
                },
            )
        }
        .map_err(s)?;
        println!(
            "DEMO 6. IOMMU_IOAS_MAP va {:#x} -> IOVA {iova:#x} ({len} bytes)",
            buf.va()
        );
    }
    let edu = Edu::map(&vfio)?;
    let ident = edu.read32(0);
    ensure!(ident == EDU_IDENT, "edu ident {ident:#x}");
    println!("DEMO 7. BAR0 mmap: ident {ident:#010x}");
    let want = pattern(0xa5, len);
    src.write(0, &want);
    edu.dma(0x10_0000, EDU_BUF, len as u32, false)?;
    println!("DEMO 8. DMA RAM(IOVA 0x100000) -> edu buffer");
    edu.dma(EDU_BUF, 0x20_0000, len as u32, true)?;
    println!("DEMO 9. DMA edu buffer -> RAM(IOVA 0x200000)");
    let got = dst.read(0, len);
    println!("DEMO    sent     {:02x?}", &want[..16]);
    println!("DEMO    received {:02x?}", &got[..16]);
    ensure!(got == want, "the bytes differ");
    println!(
        "DEMO 10. {len} bytes match: edu reached our memory only through IOAS {}",
        ioas.0
    );
    drop(edu);
    backend.unbind(dev);
    Ok(Outcome::Pass)
}

fn demo_l3() -> TestResult {
    let edu = edu_path()?;
    let mtty = super::env::mtty_path()?;
    let devices = vec![
        format!("path={},id=edu0", edu.display()),
        format!("path={},id=mtty0", mtty.display()),
    ];
    println!("DEMO L3. ioasid-vmm boots a Linux guest (256 MiB, 1 vCPU) with:");
    for d in &devices {
        println!("DEMO        --device {d}");
    }
    let out = super::l3_tests::run_l3(
        "demo",
        "up,edu,mtty",
        &devices,
        std::time::Duration::from_secs(240),
    )?;
    println!("DEMO L3. the VMM's device steps (its log):");
    for line in out.vmm_log.lines().filter(|l| l.contains("device_manager")) {
        println!("DEMO   | {}", line.trim_end());
    }
    println!("DEMO L3. the guest's console:");
    for line in out.serial.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("L3-") {
            println!("DEMO   | {line}");
        }
    }
    println!("DEMO L3. {}", out.describe_exit());
    for name in ["up", "sees_edu", "edu_msi", "edu_dma", "mtty_echo"] {
        out.result(name)?;
    }
    Ok(Outcome::Pass)
}
