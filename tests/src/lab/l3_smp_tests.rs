//! Lab tests of SMP L3 guests under `ioasid-vmm`: every vCPU comes online and runs work
//! (a task pinned to each CPU reports back, which takes IPIs), and the REST hotplug flow
//! with edu's MSI and DMA runs in a 2-vCPU guest.

use std::time::Duration;

use super::env;
use super::l3_tests::{hotplug_via_rest, L3Session};
use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

/// vCPUs of the SMP tests' guests.
pub const SMP_CPUS: u32 = 2;

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "linux_guest_smp_boots",
            run: linux_guest_smp_boots,
        },
        LabTest {
            name: "linux_guest_smp_hotplug_and_dma",
            run: linux_guest_smp_hotplug_and_dma,
        },
    ]
}

/// The CPUs the `smp` task's detail names ("... reported: cpu0 cpu1; ...").
fn reported_cpus(detail: &str) -> Vec<String> {
    detail
        .split_once("reported: ")
        .map(|(_, r)| r.split(';').next().unwrap_or_default())
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn linux_guest_smp_boots() -> TestResult {
    let edu = env::edu_path()?;
    let devices = vec![format!("path={},id=edu0", edu.display())];
    let extra = ["--cpus".to_string(), format!("boot={SMP_CPUS}")];
    let s = L3Session::start("smp", "up,smp,edu", &devices, &extra)?;
    let out = s.finish(Duration::from_secs(240));
    let up = out.result("up")?;
    ensure!(
        up.contains(&format!("cpus {SMP_CPUS} ")),
        "the guest does not see its {SMP_CPUS} vCPUs online: {up}"
    );
    let smp = out.result("smp")?;
    let want: Vec<String> = (0..SMP_CPUS).map(|c| format!("cpu{c}")).collect();
    let got = reported_cpus(&smp);
    ensure!(
        got == want,
        "the pinned tasks reported from {got:?}, want {want:?}: {smp}"
    );
    // edu's MSI and DMA in the SMP guest: the interrupt lands on whichever vCPU the guest
    // routed it to.
    let msi = out.result("edu_msi")?;
    let dma = out.result("edu_dma")?;
    ensure!(
        out.status == Some(0),
        "every check passed but {}",
        out.describe_exit()
    );
    println!("LAB-INFO L3 smp: {up}; {smp}; MSI: {msi}; DMA: {dma}");
    Ok(Outcome::Pass)
}

fn linux_guest_smp_hotplug_and_dma() -> TestResult {
    hotplug_via_rest("smp-hotplug", SMP_CPUS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_reporting_cpus() {
        let d = "tasks on 2 of 2 online CPUs reported: cpu0 cpu1; RES 10/12 CAL 3/4";
        assert_eq!(reported_cpus(d), vec!["cpu0", "cpu1"]);
        assert!(reported_cpus("nothing").is_empty());
    }
}
