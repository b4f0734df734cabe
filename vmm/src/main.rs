//! `ioasid-vmm`: the VMM binary. Parsing lives in `vmm::config`, the VMM process (REST API,
//! life cycle, signals) in `vmm::control`, building a VM in `vmm::runner`, `iommu-info` in
//! `vmm::device_manager::host_iommu_info`.

use std::process::ExitCode;

use clap::Parser;
use vmm::config::{Action, Cli, VmArgs};

fn print_chain(e: &dyn std::error::Error) {
    eprintln!("Error: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        eprintln!("  Caused by: {s}");
        src = s.source();
    }
}

fn main() -> ExitCode {
    // vfio-ioctls warns about every interrupt index an mdev does not implement (mtty has
    // three); our own log says what the device offers.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,vfio_ioctls=error"),
    )
    // Milliseconds: the boot-overhead bench reads the VMM's start-up steps off the log.
    .format_timestamp_millis()
    .init();
    let cli = Cli::parse();
    if cli.command.is_none() && cli.vm.kernel.is_none() && cli.vm.payload.is_none() {
        if let Some(sock) = &cli.vm.api_socket {
            // Cloud Hypervisor's empty VMM: no VM until `vm.create` on the API.
            if let Some(flag) = vm_flag_given(&cli.vm) {
                eprintln!(
                    "Error: {flag} describes a VM, which needs --kernel; without VM flags, \
                     --api-socket starts an empty VMM that waits for vm.create"
                );
                return ExitCode::from(2);
            }
            return finish(vmm::control::run(None, Some(sock.clone())));
        }
    }
    let action = match cli.action() {
        Ok(a) => a,
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(2);
        }
    };
    match action {
        Action::IommuInfo { device } => match vmm::device_manager::host_iommu_info(&device) {
            Ok(caps) => match serde_json::to_string_pretty(&caps) {
                Ok(json) => {
                    println!("{json}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!(
                        "Error: cannot print the capabilities of {}: {e}",
                        device.display()
                    );
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("Error: iommu-info for {}: {e}", device.display());
                ExitCode::FAILURE
            }
        },
        Action::Run(cfg) => {
            let sock = cfg.api_socket.clone();
            finish(vmm::control::run(Some(*cfg), sock))
        }
    }
}

/// The first VM flag in `a` other than `--kernel`, `--payload` and `--api-socket`.
fn vm_flag_given(a: &VmArgs) -> Option<&'static str> {
    [
        ("--cmdline", a.cmdline.is_some()),
        ("--initramfs", a.initramfs.is_some()),
        ("--cpus", a.cpus.is_some()),
        ("--memory", a.memory.is_some()),
        ("--device", !a.device.is_empty()),
        ("--platform", a.platform.is_some()),
        ("--serial", a.serial.is_some()),
    ]
    .into_iter()
    .find_map(|(flag, given)| given.then_some(flag))
}

fn finish(r: Result<i32, vmm::control::ControlError>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            print_chain(&e);
            ExitCode::FAILURE
        }
    }
}
