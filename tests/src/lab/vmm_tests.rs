//! Lab tests of the VMM's own bookkeeping against a real device: guest RAM reaches the
//! device's IOAS by region, not by page.

use super::api_tests::LabVmm;
use super::env;
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "vm_memory_mapped_by_region",
        run: vm_memory_mapped_by_region,
    }]
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
    let vm = &counters["devices"]["_vm"];
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
    let ram = RAM_MIB << 20;
    println!(
        "LAB-INFO {RAM_MIB} MiB guest RAM, {regions} regions: {calls} map calls, IOAS {} has {mappings} mappings of {bytes:#x} bytes ({} pages); edu {id} at {bdf}",
        ioas["id"],
        ram / PAGE
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
