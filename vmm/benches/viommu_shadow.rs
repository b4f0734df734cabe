//! The shadow path's host-call economy, measured (not asserted): a guest mapping burst
//! programmed as Linux's intel-iommu does it (the model's `LinuxHarness`: 4 KiB second-stage
//! leaves, one page-selective IOTLB invalidation per map under caching mode), through the
//! VT-d model and the bridge, on the soft backend (the host calls counted are the same
//! `IOAS_COPY`/`IOAS_UNMAP` calls the bridge makes on iommufd).
//!
//! Reported against the baseline a shadow without coalescing would make (one host map call
//! per 4 KiB page: 16384 for 64 MiB), and guest QI descriptors against host calls per
//! doorbell. Run with `cargo bench -p vmm --bench viommu_shadow` (or `scripts/bench viommu`).
#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::Arc;
use std::time::Instant;

use devices::pci::{MsiMessage, PciBdf};
use devices::viommu::linux_harness::{LinuxHarness, Stage};
use devices::viommu::{GuestMemoryAccess, MsiSignal, ViommuBridge, Vtd, VtdConfig};
use ioasid::soft::{SoftConfig, SoftIommu};
use ioasid::{IommuBackend, PtId};
use vmm::device_manager::dma::{map_ram, RamMapMode};
use vmm::memory::{GuestRam, RamConfig};
use vmm::viommu::{VmGuestMemory, VtdBridge};

const MIB: u64 = 1 << 20;
const RAM: u64 = 512 * MIB;
const TABLES: u64 = 16 * MIB;
const TABLES_END: u64 = 64 * MIB;
const BUFS: u64 = 128 * MIB;
const BURST: u64 = 64 * MIB;
const BASELINE: u64 = BURST / 4096;

struct NoMsi;
impl MsiSignal for NoMsi {
    fn signal(&self, _msg: MsiMessage) {}
}

struct Rig {
    _ram: GuestRam,
    bridge: Arc<VtdBridge>,
    vtd: Vtd,
    h: LinuxHarness,
    bdf: PciBdf,
}

fn rig() -> Rig {
    let ram = GuestRam::new(RamConfig {
        size: RAM,
        hugepages: false,
    })
    .unwrap();
    let soft = Arc::new(SoftIommu::from_guest_memory(ram.memory(), SoftConfig::default()).unwrap());
    let ram_ioas = soft.ioas_alloc().unwrap();
    map_ram(&*soft, ram_ioas, ram.regions(), RamMapMode::ByAddress).unwrap();
    let backend: Arc<dyn IommuBackend> = soft.clone();
    let bridge = Arc::new(VtdBridge::new(backend, ram_ioas, ram.regions().to_vec()));
    let mem: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(ram.memory().clone()));
    let dyn_bridge: Arc<dyn ViommuBridge> = bridge.clone();
    let mut vtd = Vtd::new(
        VtdConfig::default(),
        mem.clone(),
        dyn_bridge,
        Arc::new(NoMsi),
    )
    .unwrap();
    let bdf: PciBdf = "00:05.0".parse().unwrap();
    let dev = soft.register_device("assigned").unwrap();
    soft.attach(dev, None, PtId::Ioas(ram_ioas)).unwrap();
    bridge.add_assigned(bdf, dev, None).unwrap();
    vtd.add_device(bdf);
    let mut h = LinuxHarness::new(mem, TABLES..TABLES_END);
    h.boot(&mut vtd).unwrap();
    h.attach(&mut vtd, bdf, Stage::Second).unwrap();
    Rig {
        _ram: ram,
        bridge,
        vtd,
        h,
        bdf,
    }
}

/// Maps `BURST` bytes as `chunk`-sized buffers, each contiguous in GPA but scattered (in
/// reverse order), one harness map (= one doorbell) per buffer; returns the report line.
fn burst(name: &str, chunk: u64) -> String {
    let mut r = rig();
    let before = r.bridge.counters();
    let qi_before = r.vtd.counters();
    let n = BURST / chunk;
    let t = Instant::now();
    for i in 0..n {
        let gpa = BUFS + (n - 1 - i) * chunk;
        r.h.map(&mut r.vtd, r.bdf, 0x4000_0000 + i * chunk, gpa, chunk)
            .unwrap();
    }
    let dt = t.elapsed();
    let c = r.bridge.counters();
    let q = r.vtd.counters();
    let maps = c.shadow_map_calls - before.shadow_map_calls;
    let doorbells = q.doorbells - qi_before.doorbells;
    let descs = (q.desc_iotlb + q.desc_pasid_iotlb + q.desc_wait)
        - (qi_before.desc_iotlb + qi_before.desc_pasid_iotlb + qi_before.desc_wait);
    let resyncs = c.resyncs - before.resyncs;
    format!(
        "viommu_shadow {name}: 64 MiB in {n} buffers of {} KiB: {maps} host map calls \
         (4 KiB baseline {BASELINE}: {:.4}x), {doorbells} doorbells, {descs} guest QI \
         descriptors -> {resyncs} resyncs ({:.2} descriptors per host resync), {:.1} ms",
        chunk / 1024,
        maps as f64 / BASELINE as f64,
        descs as f64 / resyncs.max(1) as f64,
        dt.as_secs_f64() * 1e3
    )
}

fn main() {
    // `cargo test --benches` runs this with `--bench` absent: keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    println!("{}", burst("2m-contiguous", 2 * MIB));
    if !quick {
        println!("{}", burst("64k-contiguous", 64 * 1024));
        println!("{}", burst("4k-scattered", 4096));
    }
}
