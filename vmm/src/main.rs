//! `ioasid-vmm`: the VMM binary. Parsing lives in `vmm::config`, running in `vmm::runner`.

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
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let action = match cli.action() {
        Ok(a) => a,
        Err(e) => {
            print_chain(&e);
            return ExitCode::from(2);
        }
    };
    match action {
        Action::IommuInfo { device } => {
            eprintln!(
                "Error: iommu-info for {} is not yet implemented (the ioasid crate will answer it)",
                device.display()
            );
            ExitCode::from(2)
        }
        Action::Run(cfg) => match vmm::runner::run(&cfg) {
            Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
            Err(e) => {
                print_chain(&e);
                ExitCode::FAILURE
            }
        },
    }
}
