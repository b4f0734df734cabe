//! The lab test harness: named tests, a filter, and the serial-line protocol.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

/// A test's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It passed.
    Pass,
    /// It was not run, for this reason.
    Skip(String),
}

/// A test's result: `Err` carries the failure reason.
pub type TestResult = Result<Outcome, String>;

/// A named lab test.
pub struct LabTest {
    /// The name the log shows.
    pub name: &'static str,
    /// The body.
    pub run: fn() -> TestResult,
}

/// Fails the test with a message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

/// Formats any error with its source chain.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " | ")
}

/// Runs the tests whose names contain `filter`, printing one protocol line each; returns the
/// number of failures.
pub fn run_all(tests: &[LabTest], filter: Option<&str>) -> usize {
    let mut failed = 0;
    for t in tests
        .iter()
        .filter(|t| filter.is_none_or(|f| t.name.contains(f)))
    {
        println!("LAB-RUN {}", t.name);
        let start = Instant::now();
        let r = catch_unwind(AssertUnwindSafe(t.run));
        let ms = start.elapsed().as_millis();
        match r {
            Ok(Ok(Outcome::Pass)) => println!("LAB-TEST {} PASS ({ms} ms)", t.name),
            Ok(Ok(Outcome::Skip(why))) => println!("LAB-TEST {} SKIP {}", t.name, one_line(&why)),
            Ok(Err(why)) => {
                failed += 1;
                println!("LAB-TEST {} FAIL {}", t.name, one_line(&why));
            }
            Err(p) => {
                failed += 1;
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".to_string());
                println!("LAB-TEST {} FAIL panicked: {}", t.name, one_line(&msg));
            }
        }
    }
    failed
}
