//! MSI capability emulation: the registers live in the model's [`ConfigSpace`]; after each
//! guest write, [`MsiState::update`] turns the register state into routes on the
//! [`InterruptSink`].

use vmm_sys_util::eventfd::EventFd;

use super::config::ConfigSpace;
use super::interrupt::{InterruptError, InterruptSink, MsiKind, MsiMessage, MsiVector, RouteBatch};

const CTRL_ENABLE: u16 = 1;
const CTRL_MME_SHIFT: u16 = 4;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PVM: u16 = 1 << 8;

/// Layout of one MSI capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCap {
    /// Config-space offset of the capability header.
    pub offset: usize,
    /// 64-bit message address.
    pub is_64: bool,
    /// Per-vector masking.
    pub per_vector_mask: bool,
    /// log2 of the vectors the function may request (Multiple Message Capable), 0..=5.
    pub mmc_log2: u8,
}

/// What the registers say now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsiRegs {
    /// MSI enable bit.
    pub enabled: bool,
    /// Vectors granted by the guest (Multiple Message Enable, capped by the capability).
    pub count: u16,
    /// Message address.
    pub address: u64,
    /// Message data of vector 0.
    pub data: u16,
    /// Mask bits (0 without per-vector masking).
    pub mask: u32,
}

impl MsiCap {
    /// The layout a device's Message Control value describes.
    pub fn from_control(offset: usize, control: u16) -> Self {
        Self {
            offset,
            is_64: control & CTRL_64BIT != 0,
            per_vector_mask: control & CTRL_PVM != 0,
            mmc_log2: (((control >> 1) & 0x7) as u8).min(5),
        }
    }

    /// Length of the capability in bytes.
    pub fn len(&self) -> usize {
        match (self.is_64, self.per_vector_mask) {
            (false, false) => 0x0a,
            (true, false) => 0x0e,
            (false, true) => 0x14,
            (true, true) => 0x18,
        }
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn data_off(&self) -> usize {
        self.offset + if self.is_64 { 0x0c } else { 0x08 }
    }

    fn mask_off(&self) -> Option<usize> {
        self.per_vector_mask
            .then_some(self.offset + if self.is_64 { 0x10 } else { 0x0c })
    }

    /// Whether a config access `[off, off + len)` touches this capability.
    pub fn overlaps(&self, off: usize, len: usize) -> bool {
        off < self.offset + self.len() && self.offset < off + len
    }

    /// Writes the capability body (after the ID/next header) into `cfg` in its reset state
    /// and sets the guest-writable bits.
    pub fn install(&self, cfg: &mut ConfigSpace) {
        let o = self.offset;
        for i in 2..self.len() {
            cfg.set_u8(o + i, 0);
        }
        let ctrl = (u16::from(self.mmc_log2) << 1)
            | if self.is_64 { CTRL_64BIT } else { 0 }
            | if self.per_vector_mask { CTRL_PVM } else { 0 };
        cfg.set_u16(o + 2, ctrl);
        cfg.set_wmask_u16(o + 2, CTRL_ENABLE | (0x7 << CTRL_MME_SHIFT));
        cfg.set_wmask_u32(o + 4, 0xffff_fffc);
        if self.is_64 {
            cfg.set_wmask_u32(o + 8, 0xffff_ffff);
        }
        cfg.set_wmask_u16(self.data_off(), 0xffff);
        if let Some(m) = self.mask_off() {
            let vectors = 1u64 << self.mmc_log2;
            cfg.set_wmask_u32(m, ((1u64 << vectors) - 1) as u32);
            // Pending bits are read-only for software.
            cfg.set_read_only(m + 4, 4);
        }
    }

    /// Decodes the registers.
    pub fn regs(&self, cfg: &ConfigSpace) -> MsiRegs {
        let o = self.offset;
        let ctrl = cfg.read_u16(o + 2);
        let mme = ((ctrl >> CTRL_MME_SHIFT) & 0x7).min(u16::from(self.mmc_log2));
        let hi = if self.is_64 { cfg.read_u32(o + 8) } else { 0 };
        MsiRegs {
            enabled: ctrl & CTRL_ENABLE != 0,
            count: 1 << mme,
            address: u64::from(cfg.read_u32(o + 4)) | (u64::from(hi) << 32),
            data: cfg.read_u16(self.data_off()),
            mask: self.mask_off().map(|m| cfg.read_u32(m)).unwrap_or(0),
        }
    }
}

impl MsiRegs {
    /// The message of vector `i`: multi-message MSI puts the vector number in the low data bits.
    pub fn message(&self, i: u16) -> MsiMessage {
        let low = self.count.saturating_sub(1);
        MsiMessage {
            address: self.address,
            data: u32::from((self.data & !low) | (i & low)),
        }
    }
}

/// The effect of a guest write on the device's interrupt setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsiChange {
    /// Nothing for the device to do.
    None,
    /// Vectors are now enabled: hand [`MsiState::eventfds`] to the device.
    Enabled,
    /// Vectors are now disabled: stop the device's MSI.
    Disabled,
}

struct Active {
    regs: MsiRegs,
    fds: Vec<EventFd>,
}

/// The live MSI state of a function.
pub struct MsiState {
    cap: MsiCap,
    active: Option<Active>,
}

impl MsiState {
    /// Disabled MSI for `cap`.
    pub fn new(cap: MsiCap) -> Self {
        Self { cap, active: None }
    }

    /// The capability layout.
    pub fn cap(&self) -> &MsiCap {
        &self.cap
    }

    /// Whether vectors are routed.
    pub fn enabled(&self) -> bool {
        self.active.is_some()
    }

    /// The eventfds of the enabled vectors, in vector order.
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.active
            .as_ref()
            .map(|a| a.fds.iter().collect())
            .unwrap_or_default()
    }

    fn vector(i: u16) -> MsiVector {
        MsiVector {
            kind: MsiKind::Msi,
            index: i,
        }
    }

    /// Brings routes in line with the registers after a guest write.
    pub fn update(
        &mut self,
        cfg: &ConfigSpace,
        sink: &dyn InterruptSink,
    ) -> Result<MsiChange, InterruptError> {
        let batch = RouteBatch::new(sink);
        let change = self.apply(cfg, sink)?;
        if let Err(e) = batch.finish() {
            // The routes never reached the table: drop them rather than hand the device
            // eventfds that deliver nothing.
            if change == MsiChange::Enabled {
                self.release(sink);
            }
            return Err(e);
        }
        Ok(change)
    }

    fn apply(
        &mut self,
        cfg: &ConfigSpace,
        sink: &dyn InterruptSink,
    ) -> Result<MsiChange, InterruptError> {
        let regs = self.cap.regs(cfg);
        match (&mut self.active, regs.enabled) {
            (None, false) => Ok(MsiChange::None),
            (Some(_), false) => {
                self.release(sink);
                Ok(MsiChange::Disabled)
            }
            (Some(a), true) if a.regs.count != regs.count => {
                // A vector count change while enabled: rebuild.
                let _ = a;
                self.release(sink);
                self.enable(regs, sink)?;
                Ok(MsiChange::Enabled)
            }
            (Some(a), true) => {
                for i in 0..regs.count {
                    let v = Self::vector(i);
                    if a.regs.message(i) != regs.message(i) {
                        sink.msi_update(v, regs.message(i))?;
                    }
                    let bit = 1u32 << i;
                    if (a.regs.mask ^ regs.mask) & bit != 0 {
                        sink.msi_mask(v, regs.mask & bit != 0)?;
                    }
                }
                a.regs = regs;
                Ok(MsiChange::None)
            }
            (None, true) => {
                self.enable(regs, sink)?;
                Ok(MsiChange::Enabled)
            }
        }
    }

    fn enable(&mut self, regs: MsiRegs, sink: &dyn InterruptSink) -> Result<(), InterruptError> {
        let mut fds = Vec::with_capacity(usize::from(regs.count));
        for i in 0..regs.count {
            let masked = regs.mask & (1 << i) != 0;
            match sink.msi_route(Self::vector(i), regs.message(i), masked) {
                Ok(fd) => fds.push(fd),
                Err(e) => {
                    for j in 0..i {
                        sink.msi_release(Self::vector(j));
                    }
                    return Err(e);
                }
            }
        }
        self.active = Some(Active { regs, fds });
        Ok(())
    }

    /// Releases every route (guest disable, reset or removal).
    pub fn release(&mut self, sink: &dyn InterruptSink) {
        if let Some(a) = self.active.take() {
            let batch = RouteBatch::new(sink);
            for i in 0..a.regs.count {
                sink.msi_release(Self::vector(i));
            }
            if let Err(e) = batch.finish() {
                log::warn!("MSI release: {e}");
            }
        }
    }
}
