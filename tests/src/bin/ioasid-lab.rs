//! `ioasid-lab`: the lab suite, run inside the L2 guest by the lab's init.
//!
//! `ioasid-lab [--filter SUBSTR]` runs the tests; `ioasid-lab demo` shows the edu DMA round
//! trip step by step. Both end with `LAB-DONE`.

use std::process::ExitCode;

use ioasid_tests::{harness, lab};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = None;
    let mut demo = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "demo" => demo = true,
            "--filter" => filter = it.next().cloned(),
            "--list" => {
                for t in lab::all() {
                    println!("{}", t.name);
                }
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("ioasid-lab: unknown argument '{other}' (expected: demo, --filter SUBSTR, --list)");
                return ExitCode::from(2);
            }
        }
    }
    let tests = if demo { lab::demo() } else { lab::all() };
    let failed = harness::run_all(&tests, filter.as_deref().filter(|f| !f.is_empty()));
    println!("LAB-DONE");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
