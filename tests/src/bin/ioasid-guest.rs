//! `ioasid-guest`: the checks run inside the lab's L3 Linux guest (booted by `ioasid-vmm`
//! in L2). `ioasid-guest TASK...` with tasks `up`, `edu`, `mtty`, `hotplug`, `lifecycle`, and with the
//! vIOMMU `viommu`, `edu-viommu`, `viommu-unplug`; each prints
//! `L3-RESULT <name> PASS|FAIL <detail>` lines, and the run ends with `L3-DONE`.

use std::process::ExitCode;

use ioasid_tests::guest::{lifecycle, report, tasks, viommu};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!(
            "ioasid-guest: expected tasks: up, edu, mtty, hotplug, lifecycle, viommu, edu-viommu, viommu-unplug"
        );
        return ExitCode::from(2);
    }
    for task in &args {
        match task.as_str() {
            "up" => report("up", &tasks::up()),
            "edu" => tasks::edu_all(""),
            "mtty" => report("mtty_echo", &tasks::mtty_echo()),
            "hotplug" => tasks::hotplug(),
            "lifecycle" => lifecycle::lifecycle(),
            "viommu" => {
                report("viommu_dmar", &viommu::dmar());
                report("viommu_edu_group", &viommu::edu_group());
            }
            "edu-viommu" => viommu::edu_dma_all(),
            "viommu-unplug" => viommu::unplug(),
            other => report(other, &Err(format!("unknown task '{other}'"))),
        }
    }
    println!("L3-DONE");
    ExitCode::SUCCESS
}
