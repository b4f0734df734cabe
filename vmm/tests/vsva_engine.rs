//! The SVA copy engine in a VM: `--device emulated=sva-copy,iommu=on` on a VM with
//! `--platform viommu=vtd,fsts=on,pasid-bits=20,svm=on`, through the device manager, on this
//! host's KVM (a VM without vCPUs running: the guest's side is the model's Linux harness on
//! the test thread). The engine's worker DMAs with PRI through the bridge's soft path; the
//! device manager's page request pump thread moves the fault into the guest's PRQ; the
//! "guest" maps the page and answers with a page group response; the engine retries and
//! completes. Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::panic)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::DeviceConfig;
use devices::bus::BusDevice;
use devices::pci::config::{command, reg as creg};
use devices::pci::{PciBdf, SharedPciDevice};
use devices::sva::abi::{self, ctrl, reg, status, CompletionStatus, RawDescriptor, PASID_VALID};
use devices::sva::caps;
use devices::viommu::linux_harness::{desc, LinuxHarness, Stage};
use devices::viommu::{GuestMemoryAccess, Vtd};
use vm_memory::{Bytes, GuestAddress};
use vmm::boot::payload::{PayloadMode, DEFAULT_LONG_GPA};
use vmm::config::{OnOffAuto, ViommuConfig};
use vmm::device_manager::viommu::ViommuSetup;
use vmm::device_manager::{DeviceManager, DeviceManagerConfig, IntxWiring};
use vmm::layout::VTD_REGS_START;
use vmm::memory::{GuestMemory, RamConfig};
use vmm::runner::PayloadVm;
use vmm::viommu::VmGuestMemory;
use vmm::vm::{IrqchipMode, Vm, VmOptions};

use common::{assert_halted, kvm_available, read_guest, HANG_GUARD};

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const TABLES: u64 = 8 * MIB;
const TABLES_END: u64 = 16 * MIB;
const BUFS: u64 = 32 * MIB;
/// IOVA of the ring on PASID 0 (the driver's DMA API).
const RING_IOVA: u64 = 0x10_0000;
const GVA: u64 = 0x7f00_0000_0000;
const DEADLINE: Duration = Duration::from_secs(20);

const RTADDR: u64 = 0x20;
const PQH: u64 = 0xc0;
const PQT: u64 = 0xc8;
const PQA: u64 = 0xd0;
const PRS: u64 = 0xdc;
const PECTL: u64 = 0xe0;

fn w64(v: &mut dyn BusDevice, off: u64, x: u64) {
    v.write(0, off, &x.to_le_bytes());
}

fn w32(v: &mut dyn BusDevice, off: u64, x: u32) {
    v.write(0, off, &x.to_le_bytes());
}

fn r64(v: &mut dyn BusDevice, off: u64) -> u64 {
    let mut b = [0u8; 8];
    v.read(0, off, &mut b);
    u64::from_le_bytes(b)
}

fn cfg_w(e: &SharedPciDevice, off: usize, data: &[u8]) {
    e.lock()
        .unwrap()
        .write_config_register(off / 4, (off % 4) as u64, data);
}

fn bar_w(e: &SharedPciDevice, off: u64, v: u32) {
    e.lock().unwrap().write_bar(0, off, &v.to_le_bytes());
}

fn bar_r(e: &SharedPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    e.lock().unwrap().read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn svm_vm(name: &str) -> Option<(Vm, DeviceManager)> {
    if !kvm_available(name) {
        return None;
    }
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: RAM,
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .unwrap();
    let dm = DeviceManager::new(&vm, svm_setup()).unwrap();
    Some((vm, dm))
}

/// `--platform viommu=vtd,fsts=on,pasid-bits=20,svm=on`.
fn svm_setup() -> DeviceManagerConfig {
    DeviceManagerConfig {
        intx: IntxWiring::Off,
        viommu: Some(ViommuSetup {
            vtd: ViommuConfig {
                scalable_mode: true,
                fsts: OnOffAuto::On,
                pasid_bits: 20,
                svm: true,
            },
            address_width: 48,
        }),
        ..DeviceManagerConfig::default()
    }
}

/// The engine as the driver programs it: bus master, PASID and PRI enabled, a 4-entry ring
/// at [`RING_IOVA`], enabled.
fn program_engine(engine: &SharedPciDevice) {
    cfg_w(
        engine,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    cfg_w(
        engine,
        caps::PASID_CAP + 6,
        &caps::PASID_CTRL_ENABLE.to_le_bytes(),
    );
    cfg_w(engine, caps::PRI_CAP + 12, &32u32.to_le_bytes());
    cfg_w(
        engine,
        caps::PRI_CAP + 4,
        &caps::PRI_CTRL_ENABLE.to_le_bytes(),
    );
    bar_w(engine, reg::RING_BASE, RING_IOVA as u32);
    bar_w(engine, reg::RING_BASE_HI, 0);
    bar_w(engine, reg::RING_SIZE, 4);
    bar_w(engine, reg::CTRL, ctrl::ENABLE);
    assert_eq!(
        bar_r(engine, reg::STATUS) & status::ENABLED,
        status::ENABLED
    );
}

struct Guest {
    mem: GuestMemory,
    vtd: Arc<Mutex<Vtd>>,
    h: LinuxHarness,
    bdf: PciBdf,
    prq: u64,
    prq_head: u64,
}

impl Guest {
    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(gpa)).unwrap();
    }

    fn r64g(&self, gpa: u64) -> u64 {
        self.mem.read_obj(GuestAddress(gpa)).unwrap()
    }

    /// Boots the unit, enables the PRQ, probes the device and sets PRE in its context
    /// entry (what intel-iommu does before `iommu_sva_bind_device` can succeed).
    fn boot(&mut self) {
        let mut v = self.vtd.lock().unwrap();
        self.h.ats = true;
        self.h.boot(&mut *v).unwrap();
        self.prq = self.h.alloc(1).unwrap();
        w64(&mut *v, PQH, 0);
        w64(&mut *v, PQT, 0);
        w64(&mut *v, PQA, self.prq);
        w32(&mut *v, PECTL, 0);
        self.h.probe(&mut *v, self.bdf).unwrap();
        let root = r64(&mut *v, RTADDR) & !0xfff;
        // Scalable mode: the lower half of the root entry covers devfn 0-127, the upper
        // half 128-255.
        let devfn = u64::from(self.bdf.rid() & 0xff);
        let half = if devfn >= 128 { 8 } else { 0 };
        let re = self.r64g(root + u64::from(self.bdf.bus()) * 16 + half);
        let ctx = (re & !0xfff) + (devfn & 0x7f) * 32;
        let lo = self.r64g(ctx);
        self.mem
            .write_obj(lo | (1 << 4), GuestAddress(ctx))
            .unwrap();
        self.h
            .submit(&mut *v, &[desc::context_device(0, self.bdf.rid(), 0)])
            .unwrap();
    }

    /// The guest's PRQ handler for one pass: for each request, `fix` then a page group
    /// response Success; returns the requests' addresses.
    fn serve_prq(&mut self, mut fix: impl FnMut(&mut Self, u64)) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        loop {
            let tail = {
                let mut v = self.vtd.lock().unwrap();
                r64(&mut *v, PQT)
            };
            if tail == self.prq_head {
                return out;
            }
            // A device that keeps requesting (or a tail the head never reaches) fails the
            // test instead of hanging it.
            assert!(
                out.len() < 4096,
                "still serving page requests after 4096 (PQT {tail:#x})"
            );
            let a = self.prq + self.prq_head;
            let (q0, q1) = (self.r64g(a), self.r64g(a + 8));
            self.prq_head = (self.prq_head + 32) % 4096;
            fix(self, q1 & !0xfff);
            let mut v = self.vtd.lock().unwrap();
            w64(&mut *v, PQH, self.prq_head);
            w32(&mut *v, PRS, 2);
            let pasid = (q0 & (1 << 8) != 0).then_some(((q0 >> 32) & 0xf_ffff) as u32);
            let prgi = ((q1 >> 3) & 0x1ff) as u16;
            self.h
                .submit(
                    &mut *v,
                    &[desc::page_response((q0 >> 16) as u16, pasid, prgi, 0)],
                )
                .unwrap();
            out.push((q0, q1));
        }
    }
}

#[test]
fn vsva_engine_in_vm_faults_through_prq() {
    let name = "vsva_engine_in_vm_faults_through_prq";
    let Some((vm, mut dm)) = svm_vm(name) else {
        return;
    };
    let cfg = DeviceConfig::parse("emulated=sva-copy,id=sva0,iommu=on").unwrap();
    let added = dm.add_device(&cfg, None).unwrap();
    let engine = dm.emulated_model("sva0").unwrap();
    let vtd = dm.vtd().unwrap();
    let mem: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(vm.ram().memory().clone()));
    let mut g = Guest {
        mem: vm.ram().memory().clone(),
        vtd,
        h: LinuxHarness::new(mem, TABLES..TABLES_END),
        bdf: added.bdf,
        prq: 0,
        prq_head: 0,
    };
    g.boot();
    // The driver: PASID 0 (DMA API) first stage with the ring and records mapped; the
    // process's PASID 5 with its source mapped and its destination never touched.
    let (ring_gpa, src_gpa) = (BUFS, BUFS + 0x10_0000);
    {
        let mut v = g.vtd.lock().unwrap();
        g.h.attach(&mut *v, g.bdf, Stage::First).unwrap();
        g.h.map(&mut *v, g.bdf, RING_IOVA, ring_gpa, 0x2000)
            .unwrap();
        g.h.attach_pasid(&mut *v, g.bdf, 5, Stage::First).unwrap();
        g.h.map_pasid(&mut *v, g.bdf, 5, GVA, src_gpa, 0x2000)
            .unwrap();
    }
    let data: Vec<u8> = (0..0x2000u32).map(|i| (i * 7 + 3) as u8).collect();
    g.write(src_gpa, &data);
    program_engine(&engine);
    // One copy on PASID 5 into fresh memory; the completion record goes to the
    // descriptor's space, mapped on PASID 5.
    let comp_gva = GVA + 0x80_0000;
    {
        let mut v = g.vtd.lock().unwrap();
        g.h.map_pasid(&mut *v, g.bdf, 5, comp_gva, ring_gpa + 0x1000, 0x1000)
            .unwrap();
    }
    let d = RawDescriptor {
        pasid: 5 | PASID_VALID,
        src: GVA + 0x10,
        dst: GVA + 0x40_0010,
        len: 0x1800,
        completion: comp_gva,
        ..Default::default()
    };
    g.write(ring_gpa, &d.encode());
    g.write(ring_gpa + 0x1000, &[0u8; 16]);
    bar_w(&engine, reg::RING_TAIL, 1);
    // The guest's side until the record says done.
    let end = Instant::now() + DEADLINE;
    let mut served = Vec::new();
    let mut next_dst = BUFS + 0x30_0000;
    let st = loop {
        let mut fixed = g.serve_prq(|g, addr| {
            let gpa = next_dst;
            next_dst += 0x1000;
            let mut v = g.vtd.lock().unwrap();
            g.h.map_pasid(&mut *v, g.bdf, 5, addr, gpa, 0x1000).unwrap();
        });
        served.append(&mut fixed);
        let rec = g.read(ring_gpa + 0x1000, 16);
        let (s, n) = abi::decode_completion(&rec.clone().try_into().unwrap());
        if s != 0 {
            break (s, n);
        }
        assert!(
            Instant::now() < end,
            "{name}: no completion; page requests served {served:x?}, counters {:?}",
            dm.viommu_counters()
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(
        st,
        (CompletionStatus::Success as u32, 0x1800),
        "{served:x?} {:?}",
        dm.viommu_counters()
    );
    // Two destination pages were faulted in, in order, each one page request for PASID 5
    // with the write bit, from the engine's RID.
    assert_eq!(served.len(), 2, "{served:x?}");
    for (i, (q0, q1)) in served.iter().enumerate() {
        assert_eq!((q0 >> 32) & 0xf_ffff, 5);
        assert_eq!((q0 >> 16) & 0xffff, u64::from(g.bdf.rid()));
        assert_eq!(q1 & 2, 2, "write access");
        assert_eq!(q1 & !0xfff, GVA + 0x40_0000 + i as u64 * 0x1000);
    }
    let mut got = g.read(BUFS + 0x30_0010, 0x1000 - 0x10);
    got.extend(g.read(BUFS + 0x30_1000, 0x1800 - (0x1000 - 0x10)));
    assert_eq!(got, data[0x10..0x1810].to_vec());
    // vm.pasids and vm.counters.
    let pasids = dm.pasids();
    assert_eq!(pasids.entries.len(), 1, "{pasids:?}");
    assert_eq!(pasids.entries[0].gpasid, 5);
    assert_eq!(pasids.entries[0].device, "sva0");
    assert!(pasids.entries[0].hwpt.is_some(), "{pasids:?}");
    let (_, bridge) = dm.viommu_counters().unwrap();
    assert_eq!(
        (bridge.page_requests, bridge.page_responses_success),
        (2, 2),
        "{bridge:?}"
    );
    // The engine's own counters under its id (the record is written before the count).
    let end = Instant::now() + DEADLINE;
    let sva = loop {
        let c = dm.counters().devices["sva0"].clone();
        if c.get("descriptors") == Some(&1) || Instant::now() > end {
            break c;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let got = |k: &str| sva.get(k).copied();
    assert_eq!(got("descriptors"), Some(1), "{sva:?}");
    assert_eq!(got("errors"), Some(0), "{sva:?}");
    assert_eq!(got("bytes"), Some(0x1800), "{sva:?}");
    assert_eq!(got("page_requests"), Some(2), "{sva:?}");
    assert_eq!(got("responses_success"), Some(2), "{sva:?}");
    // Hot-unplug: the engine goes, and with it its PASID binding.
    dm.remove_device("sva0").unwrap();
    assert!(dm.pasids().entries.is_empty());
    assert!(!dm.counters().devices.contains_key("sva0"));
}

#[test]
fn vsva_engine_needs_svm_platform() {
    let name = "vsva_engine_needs_svm_platform";
    if !kvm_available(name) {
        return;
    }
    let vm = Vm::new(VmOptions {
        vcpus: 1,
        ram: RamConfig {
            size: RAM,
            hugepages: false,
        },
        irqchip: IrqchipMode::Off,
    })
    .unwrap();
    let mut dm = DeviceManager::new(
        &vm,
        DeviceManagerConfig {
            intx: IntxWiring::Off,
            viommu: Some(ViommuSetup {
                vtd: ViommuConfig {
                    fsts: OnOffAuto::Off,
                    ..ViommuConfig::default()
                },
                address_width: 48,
            }),
            ..DeviceManagerConfig::default()
        },
    )
    .unwrap();
    let cfg = DeviceConfig::parse("emulated=sva-copy,id=sva0,iommu=on").unwrap();
    let e = dm.add_device(&cfg, None).unwrap_err().message();
    assert!(e.contains("svm=on"), "{e}");
    assert!(dm.emulated_model("sva0").is_none());
}

/// The guest's PRQ handler as a long-mode payload on this host's KVM, through MMIO: poll
/// PQT against PQH, read the page request descriptor, set the faulting address's leaf PTE
/// (first stage, a fresh page), advance PQH and clear PRS.PPR, queue a page group response
/// (RID, PASID and PRGI of the request) and a wait descriptor, ring IQT, wait for the status
/// write; as many times as the mailbox says, then `OK` on COM1.
///
/// Mailbox at 0x8000: +0 leaf table GPA, +8 first data page GPA, +16/+24 the wait
/// descriptor (its status address at +24), +32 faults to serve; the payload writes the
/// served count at +0x38, FSTS at +0x30 on failure, each request's q1 at +0x40 and q0 at
/// +0x80.
///
/// ```text
///     mov rbx, 0xfed90000          # VT-d registers
///     mov r15, 0x8000              # mailbox
///     mov r14, [r15]               # leaf table of the faulting range (first stage, PASID 5)
///     mov r13, [r15+8]             # next free data page (GPA)
///     mov r12, [r15+32]            # faults to serve
///     xor r11, r11                 # served
/// next:
///     mov ecx, 0x4000000
/// 1:  mov rax, [rbx+0xc8]          # PQT
///     mov rdx, [rbx+0xc0]          # PQH
///     cmp rax, rdx
///     jne 2f
///     pause
///     dec ecx
///     jnz 1b
///     jmp fail
/// 2:  mov rsi, [rbx+0xd0]          # PQA
///     and rsi, -4096
///     add rsi, rdx
///     mov r8, [rsi]                # page request q0
///     mov r9, [rsi+8]              # q1
///     mov [r15+0x40+r11*8], r9     # record the request's q1 (address, PRGI, R/W/L)
///     mov [r15+0x80+r11*8], r8     # and q0 (RID, PASID)
///     mov rdi, r9                  # the leaf PTE of the faulting address
///     shr rdi, 12
///     and edi, 0x1ff
///     shl rdi, 3
///     add rdi, r14
///     mov rax, r13
///     or rax, 0x67                 # P RW US A D
///     mov [rdi], rax
///     add r13, 0x1000
///     add rdx, 32                  # PQH past the descriptor (one-page queue)
///     and edx, 0xfff
///     mov [rbx+0xc0], rdx
///     mov dword ptr [rbx+0xdc], 2  # PRS.PPR: write one to clear
///     mov rsi, [rbx+0x90]          # IQA
///     and rsi, -4096
///     mov rdx, [rbx+0x88]          # IQT
///     add rsi, rdx
///     mov rax, 0x000fffffffff0000  # page group response: RID and PASID of the request
///     and rax, r8
///     or rax, 0x19                 # type 9, PASID present
///     mov [rsi], rax
///     mov rax, r9
///     and rax, 0xff8               # PRGI
///     or rax, 4                    # last page in group
///     mov [rsi+8], rax
///     mov qword ptr [rsi+16], 0
///     mov qword ptr [rsi+24], 0
///     mov rax, [r15+16]            # wait descriptor (status write), from the mailbox
///     mov [rsi+32], rax
///     mov rax, [r15+24]
///     mov [rsi+40], rax
///     mov qword ptr [rsi+48], 0
///     mov qword ptr [rsi+56], 0
///     mov rdi, [r15+24]            # status address
///     mov dword ptr [rdi], 0
///     add rdx, 64
///     and edx, 0x1fff              # two-page queue
///     mov [rbx+0x88], rdx          # doorbell
///     mov ecx, 0x4000000
/// 3:  mov eax, [rdi]
///     test eax, eax
///     jnz 4f
///     pause
///     dec ecx
///     jnz 3b
///     jmp fail
/// 4:  inc r11
///     mov [r15+0x38], r11
///     cmp r11, r12
///     jne next
///     mov dx, 0x3f8
///     mov al, 'O'
///     out dx, al
///     mov al, 'K'
///     out dx, al
///     hlt
/// fail:
///     mov eax, [rbx+0x34]          # FSTS
///     mov [r15+0x30], eax
///     mov dx, 0x3f8
///     mov al, 'F'
///     out dx, al
///     hlt
/// ```
const PRQ_PAYLOAD: [u8; 364] = [
    0x48, 0xbb, 0x00, 0x00, 0xd9, 0xfe, 0x00, 0x00, 0x00, 0x00, 0x49, 0xc7, 0xc7, 0x00, 0x80, 0x00,
    0x00, 0x4d, 0x8b, 0x37, 0x4d, 0x8b, 0x6f, 0x08, 0x4d, 0x8b, 0x67, 0x20, 0x4d, 0x31, 0xdb, 0xb9,
    0x00, 0x00, 0x00, 0x04, 0x48, 0x8b, 0x83, 0xc8, 0x00, 0x00, 0x00, 0x48, 0x8b, 0x93, 0xc0, 0x00,
    0x00, 0x00, 0x48, 0x39, 0xd0, 0x75, 0x0b, 0xf3, 0x90, 0xff, 0xc9, 0x75, 0xe7, 0xe9, 0x1b, 0x01,
    0x00, 0x00, 0x48, 0x8b, 0xb3, 0xd0, 0x00, 0x00, 0x00, 0x48, 0x81, 0xe6, 0x00, 0xf0, 0xff, 0xff,
    0x48, 0x01, 0xd6, 0x4c, 0x8b, 0x06, 0x4c, 0x8b, 0x4e, 0x08, 0x4f, 0x89, 0x4c, 0xdf, 0x40, 0x4f,
    0x89, 0x84, 0xdf, 0x80, 0x00, 0x00, 0x00, 0x4c, 0x89, 0xcf, 0x48, 0xc1, 0xef, 0x0c, 0x81, 0xe7,
    0xff, 0x01, 0x00, 0x00, 0x48, 0xc1, 0xe7, 0x03, 0x4c, 0x01, 0xf7, 0x4c, 0x89, 0xe8, 0x48, 0x83,
    0xc8, 0x67, 0x48, 0x89, 0x07, 0x49, 0x81, 0xc5, 0x00, 0x10, 0x00, 0x00, 0x48, 0x83, 0xc2, 0x20,
    0x81, 0xe2, 0xff, 0x0f, 0x00, 0x00, 0x48, 0x89, 0x93, 0xc0, 0x00, 0x00, 0x00, 0xc7, 0x83, 0xdc,
    0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x48, 0x8b, 0xb3, 0x90, 0x00, 0x00, 0x00, 0x48, 0x81,
    0xe6, 0x00, 0xf0, 0xff, 0xff, 0x48, 0x8b, 0x93, 0x88, 0x00, 0x00, 0x00, 0x48, 0x01, 0xd6, 0x48,
    0xb8, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x00, 0x4c, 0x21, 0xc0, 0x48, 0x83, 0xc8, 0x19,
    0x48, 0x89, 0x06, 0x4c, 0x89, 0xc8, 0x48, 0x25, 0xf8, 0x0f, 0x00, 0x00, 0x48, 0x83, 0xc8, 0x04,
    0x48, 0x89, 0x46, 0x08, 0x48, 0xc7, 0x46, 0x10, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x46, 0x18,
    0x00, 0x00, 0x00, 0x00, 0x49, 0x8b, 0x47, 0x10, 0x48, 0x89, 0x46, 0x20, 0x49, 0x8b, 0x47, 0x18,
    0x48, 0x89, 0x46, 0x28, 0x48, 0xc7, 0x46, 0x30, 0x00, 0x00, 0x00, 0x00, 0x48, 0xc7, 0x46, 0x38,
    0x00, 0x00, 0x00, 0x00, 0x49, 0x8b, 0x7f, 0x18, 0xc7, 0x07, 0x00, 0x00, 0x00, 0x00, 0x48, 0x83,
    0xc2, 0x40, 0x81, 0xe2, 0xff, 0x1f, 0x00, 0x00, 0x48, 0x89, 0x93, 0x88, 0x00, 0x00, 0x00, 0xb9,
    0x00, 0x00, 0x00, 0x04, 0x8b, 0x07, 0x85, 0xc0, 0x75, 0x08, 0xf3, 0x90, 0xff, 0xc9, 0x75, 0xf4,
    0xeb, 0x1b, 0x49, 0xff, 0xc3, 0x4d, 0x89, 0x5f, 0x38, 0x4d, 0x39, 0xe3, 0x0f, 0x85, 0xcd, 0xfe,
    0xff, 0xff, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x4f, 0xee, 0xb0, 0x4b, 0xee, 0xf4, 0x8b, 0x43, 0x34,
    0x41, 0x89, 0x47, 0x30, 0x66, 0xba, 0xf8, 0x03, 0xb0, 0x46, 0xee, 0xf4,
];

const MAILBOX: u64 = 0x8000;
const STATUS_GPA: u64 = 0x8800;

#[test]
fn vsva_vcpu_fault_loop() {
    let name = "vsva_vcpu_fault_loop";
    if !kvm_available(name) {
        return;
    }
    assert_eq!(
        VTD_REGS_START, 0xfed9_0000,
        "the payload hard-codes the base"
    );
    let mut pvm = PayloadVm::new(RAM, IrqchipMode::Off).unwrap();
    let mut dm = DeviceManager::new(pvm.vm(), svm_setup()).unwrap();
    let cfg = DeviceConfig::parse("emulated=sva-copy,id=sva0,iommu=on").unwrap();
    let added = dm.add_device(&cfg, None).unwrap();
    let engine = dm.emulated_model("sva0").unwrap();
    let mem = pvm.vm().ram().memory().clone();
    let gm: Arc<dyn GuestMemoryAccess> = Arc::new(VmGuestMemory::new(mem.clone()));
    let mut g = Guest {
        mem,
        vtd: dm.vtd().unwrap(),
        h: LinuxHarness::new(gm, TABLES..TABLES_END),
        bdf: added.bdf,
        prq: 0,
        prq_head: 0,
    };
    g.boot();
    let (ring_gpa, src_gpa, comp_gpa) = (BUFS, BUFS + 0x10_0000, BUFS + 0x1000);
    let (dst_gva, comp_gva) = (GVA + 0x40_0000, GVA + 0x80_0000);
    {
        let mut v = g.vtd.lock().unwrap();
        g.h.attach(&mut *v, g.bdf, Stage::First).unwrap();
        g.h.map(&mut *v, g.bdf, RING_IOVA, ring_gpa, 0x1000)
            .unwrap();
        g.h.attach_pasid(&mut *v, g.bdf, 5, Stage::First).unwrap();
        g.h.map_pasid(&mut *v, g.bdf, 5, GVA, src_gpa, 0x2000)
            .unwrap();
        g.h.map_pasid(&mut *v, g.bdf, 5, comp_gva, comp_gpa, 0x1000)
            .unwrap();
        // A neighbour in the destination's 2 MiB range, so that its leaf table exists
        // (the payload only sets leaf entries).
        g.h.map_pasid(
            &mut *v,
            g.bdf,
            5,
            dst_gva + 0x1f_f000,
            BUFS + 0x2000,
            0x1000,
        )
        .unwrap();
    }
    // The destination's leaf table, walked as the payload's "kernel" knows it.
    let mut table = g.h.attached_pasid(g.bdf, 5).unwrap().pgtable;
    for level in (2..=4u32).rev() {
        let e = g.r64g(table + ((dst_gva >> (12 + 9 * (level - 1))) & 0x1ff) * 8);
        assert_eq!(e & 1, 1, "level {level} present");
        table = e & 0x000f_ffff_ffff_f000;
    }
    let data_gpa = BUFS + 0x30_0000;
    let wait = desc::wait(STATUS_GPA, 1, false, false);
    for (off, v) in [
        (0u64, table),
        (8, data_gpa),
        (16, wait[0]),
        (24, wait[1]),
        (32, 2),
    ] {
        g.mem.write_obj(v, GuestAddress(MAILBOX + off)).unwrap();
    }
    let data: Vec<u8> = (0..0x2000u32).map(|i| (i * 13 + 1) as u8).collect();
    g.write(src_gpa, &data);
    g.write(comp_gpa, &[0u8; 16]);
    program_engine(&engine);
    let d = RawDescriptor {
        pasid: 5 | PASID_VALID,
        src: GVA + 0x20,
        dst: dst_gva + 0x20,
        len: 0x1800,
        completion: comp_gva,
        ..Default::default()
    };
    g.write(ring_gpa, &d.encode());
    bar_w(&engine, reg::RING_TAIL, 1);
    // The vCPU serves the PRQ; the engine waits on its worker thread meanwhile.
    let running = pvm
        .start(&PRQ_PAYLOAD, DEFAULT_LONG_GPA, PayloadMode::Long)
        .unwrap();
    let out = pvm.finish_within(running, HANG_GUARD);
    let served: u64 = read_guest(&pvm, MAILBOX + 0x38);
    let fsts: u32 = read_guest(&pvm, MAILBOX + 0x30);
    println!("{name}: exit {:?}, serial {:?}", out.exit, out.serial);
    assert_halted(&out);
    assert_eq!(
        out.serial,
        b"OK",
        "the payload gave up after {served} page requests (FSTS {fsts:#x}); counters {:?}",
        dm.viommu_counters()
    );
    // What the payload read from its PRQ: the engine's write faults on the two destination
    // pages, for PASID 5, from the engine's RID, in order.
    for i in 0..2u64 {
        let q1: u64 = read_guest(&pvm, MAILBOX + 0x40 + i * 8);
        let q0: u64 = read_guest(&pvm, MAILBOX + 0x80 + i * 8);
        assert_eq!(q1 & !0xfff, dst_gva + i * 0x1000, "request {i}");
        assert_eq!(q1 & 7, 2 | 4, "request {i}: write, last page in group");
        assert_eq!((q0 >> 16) & 0xffff, u64::from(g.bdf.rid()));
        assert_eq!(((q0 >> 8) & 1, (q0 >> 32) & 0xf_ffff), (1, 5));
    }
    // The copy completed after the vCPU's answers.
    let end = Instant::now() + DEADLINE;
    let (st, n) = loop {
        let rec: [u8; 16] = g.read(comp_gpa, 16).try_into().unwrap();
        let (s, n) = abi::decode_completion(&rec);
        if s != 0 {
            break (s, n);
        }
        assert!(Instant::now() < end, "{name}: no completion record");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((st, n), (CompletionStatus::Success as u32, 0x1800));
    let mut got = g.read(data_gpa + 0x20, 0x1000 - 0x20);
    got.extend(g.read(data_gpa + 0x1000, 0x1800 - (0x1000 - 0x20)));
    assert_eq!(got, data[0x20..0x1820].to_vec());
    let (model, bridge) = dm.viommu_counters().unwrap();
    assert_eq!(
        (bridge.page_requests, bridge.page_responses_success),
        (2, 2),
        "{bridge:?}"
    );
    assert_eq!(
        (model.page_requests, model.page_responses),
        (2, 2),
        "{model:?}"
    );
}
