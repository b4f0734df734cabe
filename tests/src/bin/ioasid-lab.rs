//! `ioasid-lab`: the lab suite, run inside the L2 guest by the lab's init.
//!
//! `ioasid-lab [--filter SUBSTR]` runs the tests; `ioasid-lab demo` shows the edu DMA round
//! trip step by step; `ioasid-lab bench` runs the lab benchmarks. All end with `LAB-DONE`.

use std::process::ExitCode;

use ioasid_tests::{harness, lab};

/// `ioasid-lab iommu-info PATH`: binds the device to a fresh iommufd and prints its decoded
/// IOMMU capabilities as JSON, before any attach.
fn iommu_info(path: Option<&str>) -> ExitCode {
    let Some(path) = path else {
        eprintln!("ioasid-lab iommu-info: expected a device path (/sys/bus/pci/devices/BDF or /sys/bus/mdev/devices/UUID)");
        return ExitCode::from(2);
    };
    let run = || -> Result<String, ioasid::Error> {
        let spec = ioasid::sysfs::resolve(std::path::Path::new(path))?;
        let backend = ioasid::IommufdBackend::open()?;
        let (dev, _vfio) = backend.bind(&spec)?;
        let caps = backend.hw_info(dev)?;
        let out = serde_json::json!({
            "device": spec.name.to_string(),
            "supports_nesting": caps.supports_nesting(),
            "nesting_unsupported_reason": caps.nesting_unsupported_reason(),
            "max_pasid_bits": caps.max_pasid_bits(),
            "prs": caps.supports_prs(),
            "caps": caps,
        });
        backend.unbind(dev);
        Ok(serde_json::to_string_pretty(&out).unwrap_or_default())
    };
    match run() {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ioasid-lab iommu-info: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = None;
    let mut demo = false;
    let mut bench = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "demo" => demo = true,
            "bench" => bench = true,
            "iommu-info" => return iommu_info(it.next().map(String::as_str)),
            "--filter" => filter = it.next().cloned(),
            "--list" => {
                for t in lab::all() {
                    println!("{}", t.name);
                }
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("ioasid-lab: unknown argument '{other}' (expected: demo, bench, iommu-info PATH, --filter SUBSTR, --list)");
                return ExitCode::from(2);
            }
        }
    }
    let tests = if demo {
        lab::demo()
    } else if bench {
        lab::bench()
    } else {
        lab::all()
    };
    let failed = harness::run_all(&tests, filter.as_deref().filter(|f| !f.is_empty()));
    println!("LAB-DONE");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
