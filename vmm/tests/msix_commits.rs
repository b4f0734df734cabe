//! MSI-X routing on the host's /dev/kvm: the guest write that enables every vector of a
//! 2048-entry table is one `KVM_SET_GSI_ROUTING`, counted at the router the VMM's interrupt
//! sink drives. `MSIX_BASELINE=1` also measures the old per-vector commits (printed only).
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::time::Instant;

use devices::pci::config::ConfigSpace;
use devices::pci::msix::{MsixCap, MsixState};
use devices::pci::{InterruptSink, MsiKind, MsiMessage, MsiVector};
use vmm::device_manager::interrupts::KvmInterruptSink;

use common::irqchip_vm;

const CAP: usize = 0x70;

fn msix_2048() -> (ConfigSpace, MsixState) {
    let cap = MsixCap::from_registers(CAP, 2047, 0x2000 | 2, 0x12000 | 2);
    let mut cfg = ConfigSpace::new(4096);
    cap.install(&mut cfg);
    (cfg, MsixState::new(cap))
}

#[test]
fn msix_enable_commits_once() {
    let name = "msix_enable_commits_once";
    let Some(pvm) = irqchip_vm(name) else {
        return;
    };
    let router = pvm.vm().gsi_router().unwrap().clone();
    let sink = KvmInterruptSink::new("0000:00:05.0", Some(router.clone()));
    let (mut cfg, mut msix) = msix_2048();
    let before = router.commits();
    cfg.write(CAP + 2, &0x8000u16.to_le_bytes());
    let t = Instant::now();
    msix.control_written(&cfg, &sink).unwrap();
    let enable_time = t.elapsed();
    assert!(msix.enabled());
    assert_eq!(sink.routes().len(), 2048, "every vector routed");
    assert_eq!(
        router.msi_routes().len(),
        2048,
        "every route in the committed table"
    );
    assert_eq!(
        router.commits() - before,
        1,
        "one KVM_SET_GSI_ROUTING for the enabling write"
    );
    // A table write to one entry while enabled is one commit too.
    msix.table_write(
        16,
        &0xfee0_0000u32.to_le_bytes(),
        &sink as &dyn InterruptSink,
    )
    .unwrap();
    assert_eq!(router.commits() - before, 2);
    cfg.write(CAP + 2, &0u16.to_le_bytes());
    msix.control_written(&cfg, &sink).unwrap();
    assert!(sink.routes().is_empty());
    assert!(router.msi_routes().is_empty());
    assert_eq!(
        router.commits() - before,
        3,
        "one commit for the disabling write"
    );
    println!("{name}: 2048 vectors enabled with 1 routing commit in {enable_time:?}");

    if std::env::var("MSIX_BASELINE").is_ok() {
        // The old behaviour: one commit per vector.
        let before = router.commits();
        let t = Instant::now();
        for i in 0..2048 {
            let v = MsiVector {
                kind: MsiKind::Msix,
                index: i,
            };
            sink.msi_route(v, MsiMessage::default(), true).unwrap();
        }
        println!(
            "{name}: baseline: 2048 vectors routed one commit each: {} commits in {:?}",
            router.commits() - before,
            t.elapsed()
        );
        sink.release_all();
    }
}
