//! The lab tests, in the order they run.

pub mod api_bench;
pub mod api_tests;
pub mod bench;
pub mod bench_smp;
pub mod demo;
pub mod dm_tests;
pub mod env;
pub mod ioasid_tests;
pub mod kvm;
pub mod l3_smp_tests;
pub mod l3_sva_tests;
pub mod l3_tests;
pub mod l3_viommu_tests;
pub mod lifecycle_tests;
pub mod mock_tests;
pub mod pdev_dma_tests;
pub mod pdev_fixture;
pub mod pdev_intx_tests;
pub mod pdev_tests;
pub mod type1_tests;
pub mod viommu_mock_tests;
pub mod viommu_shadow_tests;
pub mod vmm_tests;
pub mod vsva_mock_tests;

use crate::harness::LabTest;

/// Every lab test.
pub fn all() -> Vec<LabTest> {
    let mut v = ioasid_tests::tests();
    v.extend(pdev_tests::tests());
    v.extend(pdev_dma_tests::tests());
    v.extend(pdev_intx_tests::tests());
    v.extend(viommu_shadow_tests::tests());
    v.extend(mock_tests::tests());
    v.extend(viommu_mock_tests::tests());
    v.extend(vsva_mock_tests::tests());
    v.extend(kvm::tests());
    v.extend(l3_tests::tests());
    v.extend(l3_smp_tests::tests());
    v.extend(l3_viommu_tests::tests());
    v.extend(l3_sva_tests::tests());
    v.extend(vmm_tests::tests());
    v.extend(dm_tests::tests());
    v.extend(api_tests::tests());
    v.extend(lifecycle_tests::tests());
    v.extend(type1_tests::tests());
    v
}

/// The benchmarks (`ioasid-lab bench`).
pub fn bench() -> Vec<LabTest> {
    let mut v = bench::tests();
    v.extend(bench_smp::tests());
    v.extend(api_bench::tests());
    v.extend(l3_viommu_tests::peer_tests());
    v
}

/// The main-job demo.
pub fn demo() -> Vec<LabTest> {
    demo::tests()
}
