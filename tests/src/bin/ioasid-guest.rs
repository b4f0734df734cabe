//! `ioasid-guest`: the checks run inside the lab's L3 Linux guest (booted by `ioasid-vmm`
//! in L2). `ioasid-guest TASK...` with tasks `up`, `smp`, `edu`, `mtty`, `hotplug`, `lifecycle`, and with the
//! vIOMMU `viommu`, `edu-viommu`, `viommu-unplug`, with the SVA copy engine `sva-copy`,
//! `sva-iopf`, `sva-two-procs`, `sva-ready` (`sva-child TAG` is internal); each prints
//! `L3-RESULT <name> PASS|FAIL <detail>` lines, and the run ends with `L3-DONE`.

use std::process::ExitCode;

use ioasid_tests::guest::{lifecycle, report, smp, sva, tasks, viommu};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!(
            "ioasid-guest: expected tasks: up, smp, edu, mtty, hotplug, lifecycle, viommu, edu-viommu, viommu-unplug, sva-copy, sva-iopf, sva-two-procs, sva-ready"
        );
        return ExitCode::from(2);
    }
    for task in &args {
        match task.as_str() {
            "up" => report("up", &tasks::up()),
            "smp" => report("smp", &smp::smp()),
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
            "sva-copy" => report("sva_bind_and_copy", &sva::bind_and_copy()),
            "sva-iopf" => sva::iopf_all(),
            "sva-two-procs" => report("sva_two_processes_isolated", &sva::two_processes()),
            "sva-child" => {
                // Internal: a child of sva-two-procs; its one argument is its tag.
                sva::child(args.get(1).map_or("?", String::as_str));
                return ExitCode::SUCCESS;
            }
            "sva-ready" => {
                // The L2 side reads the VMM's counters now, then stops the VMM.
                println!("L3-READY sva-done");
                std::thread::sleep(std::time::Duration::from_secs(90));
            }
            other => report(other, &Err(format!("unknown task '{other}'"))),
        }
    }
    println!("L3-DONE");
    ExitCode::SUCCESS
}
