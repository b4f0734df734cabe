//! REST API benchmarks (placeholder until written).

use crate::harness::LabTest;

/// The API benchmarks.
pub fn tests() -> Vec<LabTest> {
    Vec::new()
}
