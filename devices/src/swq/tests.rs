//! Host tests of the SWQ device: portal assembly, the ENQCMD rule (PASID from the
//! submitting thread's IA32_PASID, translated), rejection without DMA, RETRY when full,
//! and the copy through a fake DMA path keyed by host PASID. Every wait has a deadline.
#![allow(clippy::unwrap_used, clippy::panic, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ioasid::{DmaRequest, Pasid};

use super::abi::{
    self, ctrl, flags, reg, status, CompletionStatus, RawDescriptor, SubmitStatus, PASID_VALID,
};
use super::portal::{Portal, Store};
use super::SwqDevice;
use crate::cpu_pasid::{set_current_ia32_pasid, PasidTranslate, IA32_PASID_VALID};
use crate::pci::config::{command, ext_cap_id, reg as creg};
use crate::pci::interrupt::{InterruptError, InterruptSink, MsiMessage, MsiVector};
use crate::pci::PciDevice;
use crate::sva::caps;
use crate::sva::dma::{AccessError, DeviceDma};

const PAGE: u64 = 4096;
const DEADLINE: Duration = Duration::from_secs(20);
const GUEST: u32 = 5;
const HOST: u32 = 0x42;

type Key = (Option<u32>, u64);

/// (PASID, page) → bytes; absent pages fault. Reads wait while the gate is closed.
#[derive(Default)]
struct FakeMem {
    pages: Mutex<HashMap<Key, Vec<u8>>>,
    log: Mutex<Vec<(Option<u32>, u64, bool)>>,
    gate: Mutex<bool>,
    gate_cv: Condvar,
}

impl FakeMem {
    fn map(&self, pasid: Option<u32>, addr: u64, len: u64) {
        let mut p = self.pages.lock().unwrap();
        let mut a = addr & !(PAGE - 1);
        while a < addr + len {
            p.entry((pasid, a))
                .or_insert_with(|| vec![0; PAGE as usize]);
            a += PAGE;
        }
    }

    fn poke(&self, pasid: Option<u32>, addr: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = addr + i as u64;
            let mut p = self.pages.lock().unwrap();
            p.get_mut(&(pasid, a & !(PAGE - 1))).unwrap()[(a % PAGE) as usize] = *b;
        }
    }

    fn peek(&self, pasid: Option<u32>, addr: u64, len: usize) -> Vec<u8> {
        let p = self.pages.lock().unwrap();
        (0..len as u64)
            .map(|i| {
                let a = addr + i;
                p.get(&(pasid, a & !(PAGE - 1))).unwrap()[(a % PAGE) as usize]
            })
            .collect()
    }

    fn close(&self) {
        *self.gate.lock().unwrap() = true;
    }

    fn open(&self) {
        *self.gate.lock().unwrap() = false;
        self.gate_cv.notify_all();
    }

    fn accesses(&self) -> usize {
        self.log.lock().unwrap().len()
    }
}

impl DeviceDma for FakeMem {
    fn read(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &mut [u8],
        _req: DmaRequest,
    ) -> Result<(), AccessError> {
        let end = Instant::now() + DEADLINE;
        let mut g = self.gate.lock().unwrap();
        while *g && Instant::now() < end {
            g = self
                .gate_cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap()
                .0;
        }
        drop(g);
        let pasid = pasid.map(|p| p.0);
        self.log.lock().unwrap().push((pasid, addr, false));
        let p = self.pages.lock().unwrap();
        let page = p
            .get(&(pasid, addr & !(PAGE - 1)))
            .ok_or(AccessError::Fault)?;
        let o = (addr % PAGE) as usize;
        buf.copy_from_slice(&page[o..o + buf.len()]);
        Ok(())
    }

    fn write(
        &self,
        pasid: Option<Pasid>,
        addr: u64,
        buf: &[u8],
        _req: DmaRequest,
    ) -> Result<(), AccessError> {
        let pasid = pasid.map(|p| p.0);
        self.log.lock().unwrap().push((pasid, addr, true));
        let mut p = self.pages.lock().unwrap();
        let page = p
            .get_mut(&(pasid, addr & !(PAGE - 1)))
            .ok_or(AccessError::Fault)?;
        let o = (addr % PAGE) as usize;
        page[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
}

struct Table(HashMap<u32, u32>);

impl PasidTranslate for Table {
    fn host_pasid(&self, guest: u32) -> Option<u32> {
        self.0.get(&guest).copied()
    }
}

struct NoIrq;

impl InterruptSink for NoIrq {
    fn msi_route(
        &self,
        _v: MsiVector,
        _m: MsiMessage,
        _masked: bool,
    ) -> Result<vmm_sys_util::eventfd::EventFd, InterruptError> {
        Ok(vmm_sys_util::eventfd::EventFd::new(0).unwrap())
    }
    fn msi_update(&self, _v: MsiVector, _m: MsiMessage) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_mask(&self, _v: MsiVector, _m: bool) -> Result<(), InterruptError> {
        Ok(())
    }
    fn msi_release(&self, _v: MsiVector) {}
}

fn device(mem: &Arc<FakeMem>) -> SwqDevice {
    let table = Arc::new(Table([(GUEST, HOST)].into_iter().collect()));
    let mut d = SwqDevice::new(mem.clone(), Arc::new(NoIrq), table).unwrap();
    cfg_w(
        &mut d,
        creg::COMMAND,
        &(command::MEMORY | command::BUS_MASTER).to_le_bytes(),
    );
    cfg_w(
        &mut d,
        caps::PASID_CAP + 6,
        &caps::PASID_CTRL_ENABLE.to_le_bytes(),
    );
    d.write_bar(0, reg::CTRL, &ctrl::ENABLE.to_le_bytes());
    d
}

fn cfg_w(d: &mut SwqDevice, off: usize, data: &[u8]) {
    d.write_config_register(off / 4, (off % 4) as u64, data);
}

fn reg_r(d: &mut SwqDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.read_bar(0, off, &mut b);
    u32::from_le_bytes(b)
}

/// Stores `desc` to the portal as eight qwords, as a guest's MOV stores arrive.
fn store(d: &mut SwqDevice, desc: &[u8; 64]) -> u32 {
    for (i, q) in desc.chunks(8).enumerate() {
        d.write_bar(abi::PORTAL_BAR, i as u64 * 8, q);
    }
    submit_status(d)
}

fn submit_status(d: &mut SwqDevice) -> u32 {
    let mut b = [0u8; 8];
    d.read_bar(abi::PORTAL_BAR, abi::PORTAL_STATUS, &mut b);
    u64::from_le_bytes(b) as u32
}

fn wait_record(mem: &FakeMem, pasid: Option<u32>, addr: u64) -> (u32, u64) {
    let end = Instant::now() + DEADLINE;
    loop {
        let rec: [u8; 16] = mem.peek(pasid, addr, 16).try_into().unwrap();
        let (s, n) = abi::decode_completion(&rec);
        if s != 0 {
            return (s, n);
        }
        assert!(Instant::now() < end, "no completion record at {addr:#x}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn copy_desc(src: u64, dst: u64, len: u64, comp: u64) -> RawDescriptor {
    RawDescriptor {
        // What the guest writes here is ignored: the device puts the host PASID in.
        pasid: 0x7fff_ffff,
        src,
        dst,
        len,
        completion: comp,
        ..Default::default()
    }
}

#[test]
fn swq_portal_assembles_per_submitter() {
    let mut p = Portal::default();
    let me = std::thread::current().id();
    let other = std::thread::spawn(|| std::thread::current().id())
        .join()
        .unwrap();
    let desc: Vec<u8> = (0..64u8).collect();
    // Interleaved: qwords from this thread, dwords from the other.
    for i in 0..8u64 {
        let q = &desc[i as usize * 8..i as usize * 8 + 8];
        let r = p.store(me, i * 8, q);
        let r2 = p.store(other, i * 8, &q[..4]);
        let r3 = p.store(other, i * 8 + 4, &q[4..]);
        assert_eq!(r2, Store::Staged);
        if i < 7 {
            assert_eq!((r.clone(), r3.clone()), (Store::Staged, Store::Staged));
        } else {
            let want = Store::Complete(Box::new(desc.clone().try_into().unwrap()));
            assert_eq!((r, r3), (want.clone(), want));
        }
    }
    // The last qword without the rest: dropped.
    assert_eq!(p.store(me, 0x38, &[1; 8]), Store::Malformed);
    assert_eq!(p.status(me), SubmitStatus::Malformed);
    // Bad stores: size, alignment, outside the window; each drops what was staged.
    for (off, len) in [
        (0u64, 2usize),
        (4, 8),
        (1, 4),
        (0x40, 8),
        (0xff8, 8),
        (u64::MAX - 3, 4),
    ] {
        assert_eq!(p.store(me, 0, &[0; 8]), Store::Staged);
        assert_eq!(
            p.store(me, off, &vec![0; len]),
            Store::Malformed,
            "{off:#x}+{len}"
        );
        for i in 1..7u64 {
            assert_eq!(p.store(me, i * 8, &[0; 8]), Store::Staged);
        }
        assert_eq!(p.store(me, 0x38, &[0; 8]), Store::Malformed, "{off:#x}");
    }
    assert_eq!(p.status(other), SubmitStatus::Idle);
}

#[test]
fn swq_config_space_and_identity() {
    let mem = Arc::new(FakeMem::default());
    let mut d = device(&mem);
    let id = d.read_config_register(0);
    assert_eq!((id & 0xffff, id >> 16), (0x1234, 0x5a5b));
    let ids: Vec<u16> = super::device::build_config()
        .unwrap()
        .ext_capabilities()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, [ext_cap_id::ATS, ext_cap_id::PASID, ext_cap_id::PRI]);
    let bars: Vec<u8> = d.bars().iter().map(|b| b.index).collect();
    assert_eq!(bars, [0, 2]);
    // BAR2 is a 64-bit memory BAR of 4 KiB: sizing reads back the mask.
    d.write_config_register(6, 0, &u32::MAX.to_le_bytes());
    assert_eq!(d.read_config_register(6) & !0xf, !0xfff);
    assert_eq!(reg_r(&mut d, reg::ID), abi::ID_VALUE);
    assert_eq!(reg_r(&mut d, reg::WQ_SIZE), abi::WQ_SIZE);
    assert_eq!(
        reg_r(&mut d, reg::STATUS) & status::ENABLED,
        status::ENABLED
    );
}

#[test]
fn swq_submit_copies_in_the_translated_pasid() {
    let mem = Arc::new(FakeMem::default());
    let mut d = device(&mem);
    let (src, dst, comp) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    for a in [src, dst, comp] {
        mem.map(Some(HOST), a, 3 * PAGE);
        // The same addresses in the guest PASID's own context: must stay untouched.
        mem.map(Some(GUEST), a, 3 * PAGE);
    }
    let data: Vec<u8> = (0..0x1800u32).map(|i| (i * 7 + 1) as u8).collect();
    mem.poke(Some(HOST), src + 0x10, &data);
    set_current_ia32_pasid(IA32_PASID_VALID | u64::from(GUEST));
    let desc = copy_desc(src + 0x10, dst + 0x20, 0x1800, comp);
    let st = store(&mut d, &desc.encode());
    set_current_ia32_pasid(0);
    assert_eq!(st, SubmitStatus::Accepted.code());
    assert_eq!(
        wait_record(&mem, Some(HOST), comp),
        (CompletionStatus::Success as u32, 0x1800)
    );
    assert_eq!(mem.peek(Some(HOST), dst + 0x20, 0x1800), data);
    assert!(mem
        .peek(Some(GUEST), dst, 3 * PAGE as usize)
        .iter()
        .all(|b| *b == 0));
    assert!(mem
        .log
        .lock()
        .unwrap()
        .iter()
        .all(|(p, _, _)| *p == Some(HOST)));
    assert_eq!(reg_r(&mut d, reg::SUBMITTED), 1);
    let end = Instant::now() + DEADLINE;
    while reg_r(&mut d, reg::COMPLETED) != 1 {
        assert!(Instant::now() < end);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(d.counters().bytes, 0x1800);
}

#[test]
fn swq_untranslated_and_invalid_pasids_are_rejected_without_dma() {
    let mem = Arc::new(FakeMem::default());
    let mut d = device(&mem);
    mem.map(Some(HOST), 0, 4 * PAGE);
    mem.map(Some(6), 0, 4 * PAGE);
    let desc = copy_desc(0, PAGE, 64, 2 * PAGE).encode();
    // Guest PASID 6 has no translation.
    set_current_ia32_pasid(IA32_PASID_VALID | 6);
    assert_eq!(store(&mut d, &desc), SubmitStatus::Untranslated.code());
    // IA32_PASID without its valid bit (ENQCMD would #GP).
    set_current_ia32_pasid(u64::from(GUEST));
    assert_eq!(store(&mut d, &desc), SubmitStatus::NoPasid.code());
    set_current_ia32_pasid(0);
    // Another PASID in the descriptor word changes nothing.
    let mut forged = desc;
    forged[0..4].copy_from_slice(&(HOST | PASID_VALID).to_le_bytes());
    assert_eq!(store(&mut d, &forged), SubmitStatus::NoPasid.code());
    assert_eq!(mem.accesses(), 0, "{:?}", mem.log.lock().unwrap());
    assert_eq!(reg_r(&mut d, reg::REJECTED), 3);
    assert_eq!(reg_r(&mut d, reg::SUBMITTED), 0);
    let c = d.counters();
    assert_eq!((c.untranslated, c.no_pasid, c.submitted), (1, 2, 0));
}

#[test]
fn swq_full_queue_answers_retry() {
    let mem = Arc::new(FakeMem::default());
    let mut d = device(&mem);
    mem.map(Some(HOST), 0, 64 * PAGE);
    mem.close();
    set_current_ia32_pasid(IA32_PASID_VALID | u64::from(GUEST));
    let n = abi::WQ_SIZE as u64;
    for i in 0..n {
        let desc = copy_desc(0, PAGE + i * 64, 64, 32 * PAGE + i * 16).encode();
        assert_eq!(store(&mut d, &desc), SubmitStatus::Accepted.code(), "{i}");
    }
    let extra = copy_desc(0, 16 * PAGE, 64, 48 * PAGE).encode();
    assert_eq!(store(&mut d, &extra), SubmitStatus::Retry.code());
    assert_eq!(reg_r(&mut d, reg::OCCUPANCY), abi::WQ_SIZE);
    assert_eq!(reg_r(&mut d, reg::RETRIES), 1);
    mem.open();
    for i in 0..n {
        let rec = wait_record(&mem, Some(HOST), 32 * PAGE + i * 16);
        assert_eq!(rec, (CompletionStatus::Success as u32, 64));
    }
    // Room again: the retried descriptor goes in.
    assert_eq!(store(&mut d, &extra), SubmitStatus::Accepted.code());
    assert_eq!(
        wait_record(&mem, Some(HOST), 48 * PAGE),
        (CompletionStatus::Success as u32, 64)
    );
    set_current_ia32_pasid(0);
}

#[test]
fn swq_disabled_privileged_and_reset() {
    let mem = Arc::new(FakeMem::default());
    let mut d = device(&mem);
    mem.map(Some(HOST), 0, 4 * PAGE);
    set_current_ia32_pasid(IA32_PASID_VALID | u64::from(GUEST));
    // PRIVILEGED: BAD_DESCRIPTOR in the descriptor's space, nothing copied.
    let mut p = copy_desc(0, PAGE, 64, 2 * PAGE);
    p.flags = flags::PRIVILEGED;
    assert_eq!(store(&mut d, &p.encode()), SubmitStatus::Accepted.code());
    assert_eq!(
        wait_record(&mem, Some(HOST), 2 * PAGE),
        (CompletionStatus::BadDescriptor as u32, 0)
    );
    // Disabled: refused, no DMA.
    d.write_bar(0, reg::CTRL, &0u32.to_le_bytes());
    let before = mem.accesses();
    let desc = copy_desc(0, PAGE, 64, 2 * PAGE + 16).encode();
    assert_eq!(store(&mut d, &desc), SubmitStatus::Disabled.code());
    // Bus Master Enable clear: refused as well.
    d.write_bar(0, reg::CTRL, &ctrl::ENABLE.to_le_bytes());
    cfg_w(&mut d, creg::COMMAND, &command::MEMORY.to_le_bytes());
    assert_eq!(store(&mut d, &desc), SubmitStatus::Disabled.code());
    assert_eq!(mem.accesses(), before);
    // RESET forgets the status and zeroes the counters.
    d.write_bar(0, reg::CTRL, &ctrl::RESET.to_le_bytes());
    assert_eq!(submit_status(&mut d), SubmitStatus::Idle.code());
    assert_eq!(reg_r(&mut d, reg::REJECTED), 0);
    assert_eq!(reg_r(&mut d, reg::STATUS) & status::ENABLED, 0);
    set_current_ia32_pasid(0);
    d.removed();
    assert!(!d.worker_running());
}
