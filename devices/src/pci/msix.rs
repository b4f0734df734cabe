//! MSI-X emulation: the capability's control word in config space, and the vector table
//! and pending-bit array that live in a BAR and are always trapped.

use std::ops::Range;

use vmm_sys_util::eventfd::EventFd;

use super::config::ConfigSpace;
use super::interrupt::{InterruptError, InterruptSink, MsiKind, MsiMessage, MsiVector, RouteBatch};
use super::msi::MsiChange;

const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNC_MASK: u16 = 1 << 14;
const CTRL_SIZE_MASK: u16 = 0x7ff;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const VCTRL_MASKED: u32 = 1;

/// Layout of one MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCap {
    /// Config-space offset of the capability header.
    pub offset: usize,
    /// Number of table entries, 1..=2048.
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u64,
    /// BAR holding the pending-bit array.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u64,
}

impl MsixCap {
    /// Length of the capability in bytes.
    pub const LEN: usize = 12;

    /// The layout the device's registers describe (`control`, Table Offset/BIR and PBA
    /// Offset/BIR dwords).
    pub fn from_registers(offset: usize, control: u16, table: u32, pba: u32) -> Self {
        Self {
            offset,
            table_size: (control & CTRL_SIZE_MASK) + 1,
            table_bar: (table & 0x7) as u8,
            table_offset: u64::from(table & !0x7),
            pba_bar: (pba & 0x7) as u8,
            pba_offset: u64::from(pba & !0x7),
        }
    }

    /// The same layout with fewer vectors (the host may grant fewer than the table holds).
    pub fn with_table_size(mut self, size: u16) -> Self {
        self.table_size = size.clamp(1, self.table_size);
        self
    }

    /// The table's byte range inside its BAR.
    pub fn table_range(&self) -> Range<u64> {
        self.table_offset..self.table_offset + u64::from(self.table_size) * ENTRY_SIZE
    }

    /// The PBA's byte range inside its BAR.
    pub fn pba_range(&self) -> Range<u64> {
        let qwords = u64::from(self.table_size).div_ceil(64);
        self.pba_offset..self.pba_offset + qwords * 8
    }

    /// Whether a config access `[off, off + len)` touches the control word.
    pub fn touches_control(&self, off: usize, len: usize) -> bool {
        off < self.offset + 4 && self.offset + 2 < off + len
    }

    /// Writes the body in its reset state (disabled, function unmasked) and sets the
    /// guest-writable bits (enable and function mask only).
    pub fn install(&self, cfg: &mut ConfigSpace) {
        let o = self.offset;
        cfg.set_u16(o + 2, self.table_size - 1);
        cfg.set_wmask_u16(o + 2, CTRL_ENABLE | CTRL_FUNC_MASK);
        cfg.set_u32(o + 4, self.table_offset as u32 | u32::from(self.table_bar));
        cfg.set_u32(o + 8, self.pba_offset as u32 | u32::from(self.pba_bar));
        cfg.set_read_only(o + 4, 8);
    }

    fn control(&self, cfg: &ConfigSpace) -> (bool, bool) {
        let c = cfg.read_u16(self.offset + 2);
        (c & CTRL_ENABLE != 0, c & CTRL_FUNC_MASK != 0)
    }
}

/// The live MSI-X state: the emulated table and the routes.
pub struct MsixState {
    cap: MsixCap,
    table: Vec<u32>,
    enabled: bool,
    func_masked: bool,
    fds: Vec<EventFd>,
}

impl MsixState {
    /// Disabled MSI-X with every entry masked (the reset state).
    pub fn new(cap: MsixCap) -> Self {
        let mut table = vec![0u32; usize::from(cap.table_size) * 4];
        for e in table.chunks_mut(4) {
            e[3] = VCTRL_MASKED;
        }
        Self {
            cap,
            table,
            enabled: false,
            func_masked: false,
            fds: Vec::new(),
        }
    }

    /// The capability layout.
    pub fn cap(&self) -> &MsixCap {
        &self.cap
    }

    /// Whether MSI-X is enabled and routed.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The eventfds of all table entries (valid while enabled), in vector order.
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.fds.iter().collect()
    }

    /// Message and individual mask bit of entry `i`.
    pub fn entry(&self, i: u16) -> Option<(MsiMessage, bool)> {
        let e = self.table.get(usize::from(i) * 4..usize::from(i) * 4 + 4)?;
        Some((
            MsiMessage {
                address: u64::from(e[0]) | (u64::from(e[1]) << 32),
                data: e[2],
            },
            e[3] & VCTRL_MASKED != 0,
        ))
    }

    fn vector(i: u16) -> MsiVector {
        MsiVector {
            kind: MsiKind::Msix,
            index: i,
        }
    }

    /// Applies the control word after a guest config write. All route changes of one write
    /// form one [`RouteBatch`]: enabling 2048 vectors is one routing commit, not 2048.
    pub fn control_written(
        &mut self,
        cfg: &ConfigSpace,
        sink: &dyn InterruptSink,
    ) -> Result<MsiChange, InterruptError> {
        let (enable, fmask) = self.cap.control(cfg);
        let old_fmask = std::mem::replace(&mut self.func_masked, fmask);
        match (self.enabled, enable) {
            (false, true) => {
                let batch = RouteBatch::new(sink);
                let mut fds = Vec::with_capacity(usize::from(self.cap.table_size));
                for i in 0..self.cap.table_size {
                    let (msg, masked) = self.entry(i).unwrap_or_default();
                    match sink.msi_route(Self::vector(i), msg, masked || fmask) {
                        Ok(fd) => fds.push(fd),
                        Err(e) => {
                            for j in 0..i {
                                sink.msi_release(Self::vector(j));
                            }
                            batch.finish()?;
                            return Err(e);
                        }
                    }
                }
                if let Err(e) = batch.finish() {
                    let undo = RouteBatch::new(sink);
                    for i in 0..self.cap.table_size {
                        sink.msi_release(Self::vector(i));
                    }
                    undo.finish()?;
                    return Err(e);
                }
                self.fds = fds;
                self.enabled = true;
                Ok(MsiChange::Enabled)
            }
            (true, false) => {
                self.release(sink);
                Ok(MsiChange::Disabled)
            }
            (true, true) if old_fmask != fmask => {
                let batch = RouteBatch::new(sink);
                for i in 0..self.cap.table_size {
                    let (_, masked) = self.entry(i).unwrap_or_default();
                    if !masked {
                        sink.msi_mask(Self::vector(i), fmask)?;
                    }
                }
                batch.finish()?;
                Ok(MsiChange::None)
            }
            _ => Ok(MsiChange::None),
        }
    }

    /// A guest read of the table at `offset` from the table start.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset as usize + i;
            *b = self
                .table
                .get(o / 4)
                .map(|d| d.to_le_bytes()[o % 4])
                .unwrap_or(0);
        }
    }

    /// A guest write to the table at `offset` from the table start. Only aligned 4- and
    /// 8-byte writes are honoured (the spec leaves other sizes undefined).
    pub fn table_write(
        &mut self,
        offset: u64,
        data: &[u8],
        sink: &dyn InterruptSink,
    ) -> Result<(), InterruptError> {
        if !(data.len() == 4 || data.len() == 8) || !offset.is_multiple_of(data.len() as u64) {
            return Ok(());
        }
        let idx = (offset / ENTRY_SIZE) as u16;
        let Some(before) = self.entry(idx) else {
            return Ok(());
        };
        for (k, chunk) in data.chunks(4).enumerate() {
            let d = offset as usize / 4 + k;
            let mut v = [0u8; 4];
            v.copy_from_slice(chunk);
            let mut v = u32::from_le_bytes(v);
            if d % 4 == 3 {
                v &= VCTRL_MASKED;
            }
            if let Some(slot) = self.table.get_mut(d) {
                *slot = v;
            }
        }
        if !self.enabled {
            return Ok(());
        }
        let after = self.entry(idx).unwrap_or_default();
        let v = Self::vector(idx);
        if before.0 != after.0 {
            sink.msi_update(v, after.0)?;
        }
        if before.1 != after.1 && !self.func_masked {
            sink.msi_mask(v, after.1)?;
        }
        Ok(())
    }

    /// A guest read of the PBA. Delivery runs device → eventfd → KVM, so a masked vector's
    /// pending state lives in the VMM's eventfd, not here: the PBA reads as zero.
    pub fn pba_read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Releases every route (guest disable, reset or removal).
    pub fn release(&mut self, sink: &dyn InterruptSink) {
        if self.enabled {
            let batch = RouteBatch::new(sink);
            for i in 0..self.cap.table_size {
                sink.msi_release(Self::vector(i));
            }
            if let Err(e) = batch.finish() {
                log::warn!("MSI-X release: {e}");
            }
        }
        self.enabled = false;
        self.fds.clear();
    }

    /// Back to the reset state: routes released, every entry masked.
    pub fn reset(&mut self, sink: &dyn InterruptSink) {
        self.release(sink);
        *self = Self::new(self.cap);
    }
}
