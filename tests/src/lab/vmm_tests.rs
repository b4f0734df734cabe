//! Lab tests of the VMM's own bookkeeping against a real device: guest RAM reaches the
//! device's IOAS by region, not by page.

use super::api_tests::LabVmm;
use super::env;
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};
use crate::hexfile::read_hex;

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "vm_memory_mapped_by_region",
            run: vm_memory_mapped_by_region,
        },
        LabTest {
            name: "vmm_iommu_info_cli",
            run: vmm_iommu_info_cli,
        },
    ]
}

/// 3 GiB below the PCI hole plus 64 MiB above 4 GiB: two RAM regions.
const RAM_MIB: u64 = 3 * 1024 + 64;
const PAGE: u64 = 4096;

fn vm_memory_mapped_by_region() -> TestResult {
    let edu = env::edu_path()?;
    let vmm = LabVmm::start("regions", &format!("size={RAM_MIB}M"))?;
    let (id, bdf) = vmm.add(&format!(r#"{{"path":"{}"}}"#, edu.display()), &[])?;
    let counters = vmm.get("vm.counters")?;
    let ioasids = vmm.get("vm.ioasids")?;
    let vm = &counters["_vm"];
    let calls = vm["ram_map_calls"]
        .as_u64()
        .ok_or(format!("no ram_map_calls in {counters}"))?;
    let regions = vm["ram_regions"]
        .as_u64()
        .ok_or(format!("no ram_regions in {counters}"))?;
    let ioas = ioasids["ioases"]
        .as_array()
        .and_then(|a| a.first())
        .ok_or(format!("no IOAS in vm.ioasids: {ioasids}"))?;
    let mappings = ioas["mappings"].as_u64().unwrap_or(0);
    let bytes = ioas["mapped_bytes"].as_u64().unwrap_or(0);
    let ioas_id = ioas["id"]
        .as_u64()
        .ok_or(format!("IOAS without an id in vm.ioasids: {ioasids}"))?;
    let hwpts = ioasids["hwpts"]
        .as_array()
        .ok_or(format!("no hwpts array in vm.ioasids: {ioasids}"))?;
    let ram = RAM_MIB << 20;
    println!(
        "LAB-INFO {RAM_MIB} MiB guest RAM, {regions} regions: {calls} map calls, IOAS {ioas_id} has {mappings} mappings of {bytes:#x} bytes ({} pages); edu {id} at {bdf}; HWPTs {}",
        ram / PAGE,
        serde_json::Value::Array(hwpts.clone())
    );
    ensure!(
        hwpts.len() == 1,
        "one device on the IOAS, but vm.ioasids lists {} HWPTs: {ioasids}",
        hwpts.len()
    );
    let hwpt = &hwpts[0];
    let hwpt_id = hwpt["id"].as_u64().unwrap_or(0);
    ensure!(
        hwpt["ioas"].as_u64() == Some(ioas_id),
        "the HWPT is not over IOAS {ioas_id}: {hwpt}"
    );
    ensure!(
        hwpt_id != 0 && hwpt_id != ioas_id,
        "HWPT id {hwpt_id} is not a kernel-created HWPT distinct from IOAS {ioas_id}: {hwpt}"
    );
    ensure!(
        regions == 2,
        "the VMM reports {regions} RAM regions for {RAM_MIB} MiB, want 2 (split at 3 GiB)"
    );
    ensure!(
        calls == regions,
        "{calls} RAM map calls for {regions} regions"
    );
    ensure!(
        mappings == regions,
        "the IOAS holds {mappings} mappings for {regions} regions"
    );
    ensure!(
        bytes == ram,
        "the IOAS maps {bytes:#x} bytes, guest RAM is {ram:#x}"
    );
    vmm.remove(&id)?;
    let after = vmm.get("vm.ioasids")?;
    let left: u64 = after["ioases"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["mappings"].as_u64()).sum())
        .unwrap_or(0);
    ensure!(
        left == 0,
        "{left} IOAS mappings left after removing {id}: {after}"
    );
    vmm.shutdown()?;
    Ok(Outcome::Pass)
}

/// The first value stored under `key` anywhere in `v`.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// `ioasid-vmm iommu-info --device PATH` on edu (VT-d caps equal to sysfs), on the mtty mdev
/// (no hardware info, not an error), and on a path that is no device (error naming it).
fn vmm_iommu_info_cli() -> TestResult {
    let run = |path: &str| {
        std::process::Command::new(super::l3_tests::VMM_BIN)
            .args(["iommu-info", "--device", path])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", super::l3_tests::VMM_BIN))
    };
    let edu = env::edu_path()?;
    let out = run(&edu.display().to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "iommu-info {} failed: {}",
        edu.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("iommu-info printed no JSON ({e}): {text}"))?;
    let iommu = std::fs::canonicalize(edu.join("iommu"))
        .map_err(|e| format!("{}/iommu: {e}", edu.display()))?;
    let ecap = read_hex(&iommu.join("intel-iommu/ecap"))?;
    let got = find_key(&json, "ecap_reg").and_then(|v| v.as_u64());
    ensure!(
        got == Some(ecap),
        "iommu-info ecap_reg {got:?}, sysfs says {ecap:#x}: {text}"
    );
    ensure!(
        json["nesting"] == false,
        "edu behind QEMU's VT-d cannot nest: {text}"
    );
    ensure!(json["pasid_width"] == 0, "edu has no PASID: {text}");
    println!(
        "LAB-INFO iommu-info {}: ecap {ecap:#x}, nesting false, PASID width 0",
        edu.display()
    );

    let mtty = env::mtty_path()?;
    let out = run(&mtty.display().to_string())?;
    ensure!(
        out.status.success(),
        "iommu-info on the mdev {} failed: {}",
        mtty.display(),
        String::from_utf8_lossy(&out.stderr)
    );

    let bogus = "/sys/bus/pci/devices/0000:ff:1f.7";
    let out = run(bogus)?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "iommu-info on {bogus} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    ensure!(
        err.contains("0000:ff:1f.7"),
        "the error does not name the device: {err}"
    );
    println!("LAB-INFO iommu-info {bogus}: {}", err.trim());
    Ok(Outcome::Pass)
}
