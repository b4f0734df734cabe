//! `ioasid-vmm`: the VMM binary. Parsing lives in `vmm::config`, running in `vmm::runner`,
//! `iommu-info` in `vmm::device_manager::host_iommu_info`.

use std::process::ExitCode;

use clap::Parser;
use vmm::config::{Action, Cli};

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
    .init();
    let cli = Cli::parse();
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
        Action::Run(cfg) => match vmm::runner::run(&cfg) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                print_chain(&e);
                ExitCode::FAILURE
            }
        },
    }
}
