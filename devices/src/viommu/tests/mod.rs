//! Tests of the VT-d model with a recording fake bridge.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::sync::{Arc, Mutex};

use ioasid::Pasid;

use crate::bus::BusDevice;
use crate::pci::{MsiMessage, PciBdf};

use super::bridge::{
    BridgeError, BridgeMode, GuestInvalidation, GuestPageResponse, Translation, ViommuBridge,
};
use super::caps::VtdConfig;
use super::linux_harness::VecGuestMemory;
use super::mem::MsiSignal;
use super::vtd::Vtd;

mod behaviour;
mod decode;
mod fuzz;
mod linux;
mod regs;

/// One bridge call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Call {
    Set(PciBdf, Pasid, Translation),
    Invalidate(Vec<GuestInvalidation>),
    Response(GuestPageResponse),
}

/// Records every call; answers Ok (or the error `fail` makes).
#[derive(Default)]
pub(crate) struct FakeBridge {
    pub calls: Mutex<Vec<Call>>,
    pub fail_set: Mutex<Option<FailFn>>,
}

/// Makes `set_translation` fail.
pub(crate) type FailFn = fn(PciBdf, Pasid) -> BridgeError;

impl FakeBridge {
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl ViommuBridge for FakeBridge {
    fn set_translation(
        &self,
        bdf: PciBdf,
        pasid: Pasid,
        t: Translation,
    ) -> Result<BridgeMode, BridgeError> {
        self.calls.lock().unwrap().push(Call::Set(bdf, pasid, t));
        if let Some(f) = *self.fail_set.lock().unwrap() {
            return Err(f(bdf, pasid));
        }
        Ok(BridgeMode::Soft)
    }

    fn invalidate(&self, batch: &[GuestInvalidation]) -> Result<(), BridgeError> {
        self.calls
            .lock()
            .unwrap()
            .push(Call::Invalidate(batch.to_vec()));
        Ok(())
    }

    fn page_response(&self, resp: GuestPageResponse) -> Result<(), BridgeError> {
        self.calls.lock().unwrap().push(Call::Response(resp));
        Ok(())
    }
}

/// Records every MSI.
#[derive(Default)]
pub(crate) struct FakeMsi {
    pub sent: Mutex<Vec<MsiMessage>>,
}

impl FakeMsi {
    pub fn take(&self) -> Vec<MsiMessage> {
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

impl MsiSignal for FakeMsi {
    fn signal(&self, msg: MsiMessage) {
        self.sent.lock().unwrap().push(msg);
    }
}

pub(crate) const RAM_BASE: u64 = 0;
pub(crate) const RAM_SIZE: usize = 16 << 20;

pub(crate) struct Rig {
    pub vtd: Vtd,
    pub mem: Arc<VecGuestMemory>,
    pub bridge: Arc<FakeBridge>,
    pub msi: Arc<FakeMsi>,
}

impl Rig {
    pub fn new(cfg: VtdConfig) -> Self {
        let mem = Arc::new(VecGuestMemory::new(RAM_BASE, RAM_SIZE));
        let bridge = Arc::new(FakeBridge::default());
        let msi = Arc::new(FakeMsi::default());
        let vtd = Vtd::new(cfg, mem.clone(), bridge.clone(), msi.clone()).unwrap();
        Self {
            vtd,
            mem,
            bridge,
            msi,
        }
    }

    pub fn w32(&mut self, off: u64, v: u32) {
        self.vtd.write(0, off, &v.to_le_bytes());
    }

    pub fn w64(&mut self, off: u64, v: u64) {
        self.vtd.write(0, off, &v.to_le_bytes());
    }

    pub fn r32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.vtd.read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn r64(&mut self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.vtd.read(0, off, &mut b);
        u64::from_le_bytes(b)
    }
}

pub(crate) fn bdf(dev: u8) -> PciBdf {
    PciBdf::new(0, 0, dev, 0).unwrap()
}

/// Scalable mode with PASID, first stage, device TLB and SVM.
pub(crate) fn full_cfg() -> VtdConfig {
    VtdConfig {
        scalable_mode: true,
        first_stage: true,
        pasid_bits: 8,
        svm: true,
        device_tlb: true,
        aw_bits: 48,
        segment: 0,
    }
}

/// A 256-bit invalidation queue at `base` (one page: 128 descriptors), QI enabled.
pub(crate) struct Queue {
    pub base: u64,
    pub tail: u64,
}

pub(crate) const QUEUE_BASE: u64 = 0x10_0000;
pub(crate) const STATUS: u64 = 0x10_f000;

impl Queue {
    pub fn enable(rig: &mut Rig) -> Queue {
        rig.w32(super::regs::IQT, 0);
        rig.w64(super::regs::IQA, QUEUE_BASE | super::regs::iqa::DW);
        // GCMD is write-one: keep the enables that are on (as Linux keeps iommu->gcmd).
        let on = rig.r32(super::regs::GSTS) & super::regs::gcmd::TE;
        rig.w32(super::regs::GCMD, on | super::regs::gcmd::QIE);
        assert_ne!(rig.r32(super::regs::GSTS) & super::regs::gcmd::QIE, 0);
        Queue {
            base: QUEUE_BASE,
            tail: 0,
        }
    }

    /// Writes `descs` at the tail (without ringing).
    pub fn push(&mut self, rig: &Rig, descs: &[[u64; 4]]) {
        for d in descs {
            for (i, q) in d.iter().enumerate() {
                rig.mem
                    .write_u64(self.base + self.tail + i as u64 * 8, *q)
                    .unwrap();
            }
            self.tail = (self.tail + 32) % 4096;
        }
    }

    /// Pushes and rings.
    pub fn submit(&mut self, rig: &mut Rig, descs: &[[u64; 4]]) {
        self.push(rig, descs);
        rig.w32(super::regs::IQT, self.tail as u32);
    }
}
