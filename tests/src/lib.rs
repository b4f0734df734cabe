//! Integration tests of ioasid-vmm, and the lab suite that runs inside the L2 guest.
//!
//! The lab suite (`ioasid-lab`) talks to a real kernel: `/dev/iommu`, VFIO cdevs and groups,
//! QEMU's `edu` device behind the emulated VT-d, the `mtty` mdev sample, the iommufd selftest
//! mock, and `/dev/kvm` (nested, through emulated AMD SVM). Each test prints one
//! `LAB-TEST <name> PASS|FAIL <reason>|SKIP <reason>` line on the console, which the host
//! side (`scripts/lab/parse.py`) turns into the closing `N passed, N failed` line.
//!
//! Owns: the lab harness, drivers for the test devices (edu), and the tests. Must not touch:
//! anything outside the public APIs of the crates it tests.

pub mod dmabuf;
pub mod edu;
pub mod guest;
pub mod guest_ram;
pub mod harness;
pub mod hexfile;
pub mod lab;
