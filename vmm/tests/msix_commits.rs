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
    // A new message for a masked entry waits for its unmask: one commit, at the unmask.
    msix.table_write(
        16,
        &0xfee0_0000u32.to_le_bytes(),
        &sink as &dyn InterruptSink,
    )
    .unwrap();
    assert_eq!(router.commits() - before, 1);
    msix.table_write(16 + 12, &0u32.to_le_bytes(), &sink)
        .unwrap();
    assert_eq!(router.commits() - before, 2);
    let gsi = sink.routes()[1].gsi;
    let kvm = router
        .msi_routes()
        .into_iter()
        .find(|(g, _)| *g == gsi)
        .unwrap()
        .1;
    assert_eq!(kvm.address, 0xfee0_0000, "the unmask wrote the new message");
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

/// Linux's MSI-X setup on a real router: enable with the function masked, program every
/// (masked) entry, clear the function mask, then unmask the entries one by one. Programming
/// masked entries costs no routing commit; each unmask is one (it writes the vector's new
/// message), and every route ends with the message the guest programmed.
#[test]
fn msix_masked_table_programming_commits_at_unmask() {
    let name = "msix_masked_table_programming_commits_at_unmask";
    let Some(pvm) = irqchip_vm(name) else {
        return;
    };
    let router = pvm.vm().gsi_router().unwrap().clone();
    let sink = KvmInterruptSink::new("0000:00:06.0", Some(router.clone()));
    let (mut cfg, mut msix) = msix_2048();
    let before = router.commits();
    cfg.write(CAP + 2, &0xc000u16.to_le_bytes());
    msix.control_written(&cfg, &sink).unwrap();
    assert_eq!(router.commits() - before, 1, "enable: one commit");
    let msg = |i: u64| {
        (
            0xfee0_0000u32 | ((i as u32 & 0xff) << 12),
            0x4000 + i as u32,
        )
    };
    for i in 0..2048u64 {
        let (addr, data) = msg(i);
        msix.table_write(i * 16, &addr.to_le_bytes(), &sink)
            .unwrap();
        msix.table_write(i * 16 + 4, &0u32.to_le_bytes(), &sink)
            .unwrap();
        msix.table_write(i * 16 + 8, &data.to_le_bytes(), &sink)
            .unwrap();
    }
    let programmed = router.commits() - before - 1;
    cfg.write(CAP + 2, &0x8000u16.to_le_bytes());
    msix.control_written(&cfg, &sink).unwrap();
    for i in 0..2048u64 {
        msix.table_write(i * 16 + 12, &0u32.to_le_bytes(), &sink)
            .unwrap();
    }
    let total = router.commits() - before;
    println!("{name}: {programmed} commits while programming 2048 masked entries, {total} in all");
    assert_eq!(
        programmed, 0,
        "masked entries are programmed without commits"
    );
    assert!(
        total <= 1 + 2048,
        "at most one commit per guest write: {total}"
    );
    let routes = router.msi_routes();
    for r in sink.routes() {
        assert!(!r.masked);
        let (addr, data) = msg(u64::from(r.vector.index));
        let kvm = routes.iter().find(|(g, _)| *g == r.gsi).unwrap().1;
        assert_eq!(
            (kvm.address, kvm.data),
            (u64::from(addr), data),
            "{:?}",
            r.vector
        );
    }
}
