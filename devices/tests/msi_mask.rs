//! MSI-X function mask and per-vector mask, and MSI per-vector mask bits, as the interrupt
//! sink sees them: a vector must not deliver while masked (by its own bit or, for MSI-X, by
//! the function mask), and a signal the device raised while it was masked is delivered once
//! it is unmasked.
//!
//! The sink here behaves like the VMM's KVM sink: each route owns the eventfd it hands the
//! model, a masked route leaves signals pending in that eventfd, and [`MaskSink::pump`]
//! plays KVM delivering every unmasked route whose eventfd was signalled.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Mutex;

use devices::pci::msi::{MsiCap, MsiState};
use devices::pci::msix::{MsixCap, MsixState, ENTRY_SIZE};
use devices::pci::{ConfigSpace, InterruptError, InterruptSink, MsiMessage, MsiVector};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Route {
    fd: EventFd,
    msg: MsiMessage,
    masked: bool,
}

/// A sink that holds routes like KVM irqfds: masked routes keep their signal pending.
#[derive(Default)]
struct MaskSink {
    routes: Mutex<BTreeMap<MsiVector, Route>>,
    /// Calls on vectors without a route (a model bug).
    stray: Mutex<Vec<String>>,
}

impl MaskSink {
    /// Delivers every unmasked route whose eventfd was signalled: (vector index, message).
    fn pump(&self) -> Vec<(u16, MsiMessage)> {
        let routes = self.routes.lock().unwrap();
        let mut out = Vec::new();
        for (v, r) in routes.iter() {
            if r.masked {
                continue;
            }
            if r.fd.read().is_ok() {
                out.push((v.index, r.msg));
            }
        }
        out
    }

    /// The mask state of each routed vector, in index order.
    fn masks(&self) -> Vec<(u16, bool)> {
        let routes = self.routes.lock().unwrap();
        routes.iter().map(|(v, r)| (v.index, r.masked)).collect()
    }

    fn stray(&self) -> Vec<String> {
        self.stray.lock().unwrap().clone()
    }
}

impl InterruptSink for MaskSink {
    fn msi_route(
        &self,
        vector: MsiVector,
        msg: MsiMessage,
        masked: bool,
    ) -> Result<EventFd, InterruptError> {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let mine = fd.try_clone().unwrap();
        let old = self.routes.lock().unwrap().insert(
            vector,
            Route {
                fd: mine,
                msg,
                masked,
            },
        );
        if old.is_some() {
            self.stray
                .lock()
                .unwrap()
                .push(format!("route of {vector:?} twice"));
        }
        Ok(fd)
    }

    fn msi_update(&self, vector: MsiVector, msg: MsiMessage) -> Result<(), InterruptError> {
        match self.routes.lock().unwrap().get_mut(&vector) {
            Some(r) => r.msg = msg,
            None => self
                .stray
                .lock()
                .unwrap()
                .push(format!("update of unrouted {vector:?}")),
        }
        Ok(())
    }

    fn msi_mask(&self, vector: MsiVector, masked: bool) -> Result<(), InterruptError> {
        match self.routes.lock().unwrap().get_mut(&vector) {
            Some(r) => r.masked = masked,
            None => self
                .stray
                .lock()
                .unwrap()
                .push(format!("mask of unrouted {vector:?}")),
        }
        Ok(())
    }

    fn msi_release(&self, vector: MsiVector) {
        if self.routes.lock().unwrap().remove(&vector).is_none() {
            self.stray
                .lock()
                .unwrap()
                .push(format!("release of unrouted {vector:?}"));
        }
    }
}

const MSIX_OFF: usize = 0x40;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNC_MASK: u16 = 1 << 14;

fn msix_msg(i: u16) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | (u64::from(i) << 12),
        data: 0x40 + u32::from(i),
    }
}

/// Writes entry `i`'s message and vector control as a guest would (dword writes).
fn msix_program(state: &mut MsixState, sink: &MaskSink, i: u16, masked: bool) {
    let m = msix_msg(i);
    let base = u64::from(i) * ENTRY_SIZE;
    let dwords = [
        m.address as u32,
        (m.address >> 32) as u32,
        m.data,
        u32::from(masked),
    ];
    for (k, d) in dwords.iter().enumerate() {
        state
            .table_write(base + 4 * k as u64, &d.to_le_bytes(), sink)
            .unwrap();
    }
}

/// Rewrites only the vector control dword of entry `i`.
fn msix_set_mask(state: &mut MsixState, sink: &MaskSink, i: u16, masked: bool) {
    let off = u64::from(i) * ENTRY_SIZE + 12;
    state
        .table_write(off, &u32::from(masked).to_le_bytes(), sink)
        .unwrap();
}

/// A guest write of the MSI-X control word, then the model's reaction.
fn msix_control(cfg: &mut ConfigSpace, state: &mut MsixState, sink: &MaskSink, ctrl: u16) {
    cfg.write(MSIX_OFF + 2, &ctrl.to_le_bytes());
    state.control_written(cfg, sink).unwrap();
}

/// The device raises vector `i`.
fn fire(fds: &[EventFd], i: u16) {
    fds[usize::from(i)].write(1).unwrap();
}

fn msix_fds(state: &MsixState) -> Vec<EventFd> {
    state
        .eventfds()
        .iter()
        .map(|f| f.try_clone().unwrap())
        .collect()
}

#[test]
fn msix_function_mask_holds_vectors() {
    let cap = MsixCap {
        offset: MSIX_OFF,
        table_size: 4,
        table_bar: 0,
        table_offset: 0,
        pba_bar: 0,
        pba_offset: 0x800,
    };
    let mut cfg = ConfigSpace::new(256);
    cap.install(&mut cfg);
    let mut state = MsixState::new(cap);
    let sink = MaskSink::default();

    // Entries 0 and 1 unmasked, 2 and 3 masked, all programmed before enable.
    for i in 0..4 {
        msix_program(&mut state, &sink, i, i >= 2);
    }
    assert!(sink.masks().is_empty(), "routes before MSI-X enable");

    // Enable with the function mask set in the same write: every route starts masked.
    msix_control(&mut cfg, &mut state, &sink, CTRL_ENABLE | CTRL_FUNC_MASK);
    assert!(state.enabled());
    assert_eq!(
        sink.masks(),
        vec![(0, true), (1, true), (2, true), (3, true)],
        "enabled with the function mask set"
    );
    let fds = msix_fds(&state);
    assert_eq!(fds.len(), 4);
    for i in 0..4 {
        fire(&fds, i);
    }
    assert_eq!(sink.pump(), vec![], "delivered under the function mask");

    // Unmask entry 2 and mask entry 0 while the function is masked: nothing changes for
    // delivery, and entry 2's route stays masked.
    msix_set_mask(&mut state, &sink, 2, false);
    msix_set_mask(&mut state, &sink, 0, true);
    assert_eq!(
        sink.masks(),
        vec![(0, true), (1, true), (2, true), (3, true)],
        "an entry unmasked while the function is masked"
    );
    assert_eq!(sink.pump(), vec![], "delivered under the function mask");

    // Clear the function mask: the unmasked entries (1, 2) deliver what was pending, once,
    // with their message; the masked ones (0, 3) keep holding.
    msix_control(&mut cfg, &mut state, &sink, CTRL_ENABLE);
    assert_eq!(
        sink.masks(),
        vec![(0, true), (1, false), (2, false), (3, true)]
    );
    assert_eq!(sink.pump(), vec![(1, msix_msg(1)), (2, msix_msg(2))]);
    assert_eq!(sink.pump(), vec![], "a pending vector delivered twice");

    // Entry 0, masked by its own bit, delivers its pending signal when unmasked.
    msix_set_mask(&mut state, &sink, 0, false);
    assert_eq!(sink.pump(), vec![(0, msix_msg(0))]);

    // Setting the function mask again holds the unmasked entries; clearing it delivers.
    msix_control(&mut cfg, &mut state, &sink, CTRL_ENABLE | CTRL_FUNC_MASK);
    assert_eq!(
        sink.masks(),
        vec![(0, true), (1, true), (2, true), (3, true)],
        "function mask set while enabled"
    );
    fire(&fds, 1);
    fire(&fds, 2);
    assert_eq!(sink.pump(), vec![], "delivered under the function mask");
    msix_control(&mut cfg, &mut state, &sink, CTRL_ENABLE);
    assert_eq!(sink.pump(), vec![(1, msix_msg(1)), (2, msix_msg(2))]);

    // Entry 3 held its signal from the start; unmasking it now delivers it.
    msix_set_mask(&mut state, &sink, 3, false);
    assert_eq!(sink.pump(), vec![(3, msix_msg(3))]);

    // A vector masked by its own bit while the function is unmasked holds too.
    msix_set_mask(&mut state, &sink, 1, true);
    fire(&fds, 1);
    assert_eq!(sink.pump(), vec![]);
    msix_set_mask(&mut state, &sink, 1, false);
    assert_eq!(sink.pump(), vec![(1, msix_msg(1))]);

    // Vector control has one writable bit (mask): reserved bits read back as zero, and a
    // write with reserved bits set still masks by bit 0 alone.
    let vctrl = u64::from(2u16) * ENTRY_SIZE + 12;
    state
        .table_write(vctrl, &0xffff_fffeu32.to_le_bytes(), &sink)
        .unwrap();
    let mut back = [0u8; 4];
    state.table_read(vctrl, &mut back);
    assert_eq!(
        u32::from_le_bytes(back),
        0,
        "reserved vector control bits kept"
    );
    fire(&fds, 2);
    assert_eq!(sink.pump(), vec![(2, msix_msg(2))]);
    state
        .table_write(vctrl, &0xffff_ffffu32.to_le_bytes(), &sink)
        .unwrap();
    state.table_read(vctrl, &mut back);
    assert_eq!(u32::from_le_bytes(back), 1);
    fire(&fds, 2);
    assert_eq!(sink.pump(), vec![]);

    assert_eq!(sink.stray(), Vec::<String>::new());
}

#[test]
fn msix_enable_after_function_mask_holds_vectors() {
    // The function mask written first (MSI-X still disabled), then enable in a second write
    // that keeps the mask: the routes must still start masked.
    let cap = MsixCap {
        offset: MSIX_OFF,
        table_size: 2,
        table_bar: 0,
        table_offset: 0,
        pba_bar: 0,
        pba_offset: 0x800,
    };
    let mut cfg = ConfigSpace::new(256);
    cap.install(&mut cfg);
    let mut state = MsixState::new(cap);
    let sink = MaskSink::default();
    msix_control(&mut cfg, &mut state, &sink, CTRL_FUNC_MASK);
    for i in 0..2 {
        msix_program(&mut state, &sink, i, false);
    }
    msix_control(&mut cfg, &mut state, &sink, CTRL_ENABLE | CTRL_FUNC_MASK);
    assert_eq!(sink.masks(), vec![(0, true), (1, true)]);
    let fds = msix_fds(&state);
    fire(&fds, 0);
    assert_eq!(sink.pump(), vec![]);
    msix_control(&mut cfg, &mut state, &sink, CTRL_ENABLE);
    assert_eq!(sink.pump(), vec![(0, msix_msg(0))]);
    assert_eq!(sink.stray(), Vec::<String>::new());
}

const MSI_OFF: usize = 0x50;
const MSI_ADDR: u64 = 0x1_fee0_1000;
const MSI_DATA: u16 = 0x60;

fn msi_msg(i: u16) -> MsiMessage {
    MsiMessage {
        address: MSI_ADDR,
        data: u32::from(MSI_DATA | i),
    }
}

/// A guest write of the MSI mask bits, then the model's reaction.
fn msi_mask(cfg: &mut ConfigSpace, state: &mut MsiState, sink: &MaskSink, bits: u32) {
    cfg.write(MSI_OFF + 0x10, &bits.to_le_bytes());
    state.update(cfg, sink).unwrap();
}

#[test]
fn msi_mask_bits_hold_vectors() {
    // 64-bit MSI with per-vector masking, 4 vectors.
    let cap = MsiCap {
        offset: MSI_OFF,
        is_64: true,
        per_vector_mask: true,
        mmc_log2: 2,
    };
    let mut cfg = ConfigSpace::new(256);
    cap.install(&mut cfg);
    let mut state = MsiState::new(cap);
    let sink = MaskSink::default();

    cfg.write(MSI_OFF + 4, &(MSI_ADDR as u32).to_le_bytes());
    cfg.write(MSI_OFF + 8, &((MSI_ADDR >> 32) as u32).to_le_bytes());
    cfg.write(MSI_OFF + 0xc, &MSI_DATA.to_le_bytes());
    // Vectors 0 and 2 masked before enable.
    msi_mask(&mut cfg, &mut state, &sink, 0b0101);
    assert!(sink.masks().is_empty(), "routes before MSI enable");

    // Enable with Multiple Message Enable = 4 vectors.
    let ctrl: u16 = 1 | (2 << 4);
    cfg.write(MSI_OFF + 2, &ctrl.to_le_bytes());
    state.update(&cfg, &sink).unwrap();
    assert!(state.enabled());
    assert_eq!(
        sink.masks(),
        vec![(0, true), (1, false), (2, true), (3, false)],
        "enabled with mask bits 0b0101"
    );
    let fds: Vec<EventFd> = state
        .eventfds()
        .iter()
        .map(|f| f.try_clone().unwrap())
        .collect();
    assert_eq!(fds.len(), 4);
    for i in 0..4 {
        fire(&fds, i);
    }
    assert_eq!(sink.pump(), vec![(1, msi_msg(1)), (3, msi_msg(3))]);

    // Mask vector 1 too: its next signal is held.
    msi_mask(&mut cfg, &mut state, &sink, 0b0111);
    fire(&fds, 1);
    assert_eq!(sink.pump(), vec![], "delivered while its mask bit is set");

    // Unmask 0 and 1: both deliver what was pending, once. 2 keeps holding.
    msi_mask(&mut cfg, &mut state, &sink, 0b0100);
    assert_eq!(
        sink.masks(),
        vec![(0, false), (1, false), (2, true), (3, false)]
    );
    assert_eq!(sink.pump(), vec![(0, msi_msg(0)), (1, msi_msg(1))]);
    assert_eq!(sink.pump(), vec![], "a pending vector delivered twice");

    // Unmask 2: its signal from before still arrives.
    msi_mask(&mut cfg, &mut state, &sink, 0);
    assert_eq!(sink.pump(), vec![(2, msi_msg(2))]);

    // Mask bits outside the enabled vectors are not writable (MMC = 4 vectors).
    msi_mask(&mut cfg, &mut state, &sink, 0xffff_fff0);
    assert_eq!(cfg.read_u32(MSI_OFF + 0x10), 0);

    assert_eq!(sink.stray(), Vec::<String>::new());
}

/// Message Control decodes each field on its own: 64-bit address (bit 7), per-vector
/// masking (bit 8), Multiple Message Capable (bits 3:1, at most 32 vectors), and the layout
/// length follows (scripts/mutants found the decode untested beyond one value).
#[test]
fn msi_control_fields_each_on_their_own() {
    let cap = |control: u16| MsiCap::from_control(0x50, control);
    let fields = |c: MsiCap| (c.is_64, c.per_vector_mask, c.mmc_log2, c.len());
    assert_eq!(fields(cap(0)), (false, false, 0, 0x0a));
    assert_eq!(fields(cap(1 << 7)), (true, false, 0, 0x0e));
    assert_eq!(fields(cap(1 << 8)), (false, true, 0, 0x14));
    assert_eq!(fields(cap((1 << 7) | (1 << 8))), (true, true, 0, 0x18));
    for mmc in 0..8u16 {
        assert_eq!(cap(mmc << 1).mmc_log2, (mmc as u8).min(5), "MMC {mmc}");
    }
    // Other bits (enable, MME, extended data, reserved) change none of these.
    let others: u16 = !((1 << 7) | (1 << 8) | (0x7 << 1));
    assert_eq!(fields(cap(others)), (false, false, 0, 0x0a));
    assert_eq!(cap(others).offset, 0x50);
}

/// A config access touches the capability exactly when it overlaps `[offset, offset + len)`:
/// the byte before and the byte after do not (scripts/mutants found the ends untested).
#[test]
fn msi_cap_overlaps_exactly_its_bytes() {
    let cap = MsiCap::from_control(0x50, 1 << 7); // 64-bit: 0x0e bytes, 0x50..0x5e
    assert_eq!(cap.len(), 0x0e);
    assert!(!cap.overlaps(0x4c, 4), "ends right before it");
    assert!(cap.overlaps(0x4d, 4), "last byte is its first");
    assert!(cap.overlaps(0x50, 1));
    assert!(cap.overlaps(0x5d, 1), "its last byte");
    assert!(!cap.overlaps(0x5e, 2), "starts right after it");
    assert!(cap.overlaps(0x40, 0x40), "covers it");
    assert!(!cap.overlaps(0x10, 2));
}

/// What `install` leaves in config space, as the guest reads and writes it: the control word
/// at offset + 2 (capable bits set, only Enable and MME writable), the body zeroed over the
/// capability's length and nowhere else, the pending bits read-only (scripts/mutants found
/// the offsets untested).
#[test]
fn msi_install_lays_out_the_registers() {
    let cap = MsiCap {
        offset: 0x50,
        is_64: true,
        per_vector_mask: true,
        mmc_log2: 2,
    };
    let mut cfg = ConfigSpace::new(256);
    for off in 0x40..0x80 {
        cfg.set_u8(off, 0xaa);
    }
    // Even where the space was writable before, the pending bits end up read-only.
    cfg.set_wmask_u32(0x64, u32::MAX);
    cap.install(&mut cfg);
    assert_eq!(cfg.read_u16(0x52), (2 << 1) | (1 << 7) | (1 << 8));
    for off in 0x54..0x50 + cap.len() {
        assert_eq!(cfg.read_u8(off), 0, "body byte {off:#x}");
    }
    for off in (0x40..0x52).chain(0x50 + cap.len()..0x80) {
        assert_eq!(
            cfg.read_u8(off),
            0xaa,
            "byte {off:#x} outside the capability"
        );
    }
    cfg.write(0x52, &0xffffu16.to_le_bytes());
    assert_eq!(
        cfg.read_u16(0x52),
        (2 << 1) | (1 << 7) | (1 << 8) | 1 | (0x7 << 4),
        "only Enable and MME are writable"
    );
    // Mask bits (4 vectors) writable, pending bits read-only.
    cfg.write(0x60, &u32::MAX.to_le_bytes());
    assert_eq!(cfg.read_u32(0x60), 0xf);
    cfg.write(0x64, &u32::MAX.to_le_bytes());
    assert_eq!(cfg.read_u32(0x64), 0, "pending bits written by the guest");
}

/// A guest that changes Multiple Message Enable while MSI stays enabled gets routes for the
/// new vector count (a mutant that kept the old routes was missed).
#[test]
fn msi_vector_count_change_while_enabled_rebuilds_routes() {
    let cap = MsiCap {
        offset: MSI_OFF,
        is_64: true,
        per_vector_mask: true,
        mmc_log2: 2,
    };
    let mut cfg = ConfigSpace::new(256);
    cap.install(&mut cfg);
    let mut state = MsiState::new(cap);
    let sink = MaskSink::default();
    cfg.write(MSI_OFF + 4, &(MSI_ADDR as u32).to_le_bytes());
    cfg.write(MSI_OFF + 8, &((MSI_ADDR >> 32) as u32).to_le_bytes());
    cfg.write(MSI_OFF + 0xc, &MSI_DATA.to_le_bytes());
    cfg.write(MSI_OFF + 2, &1u16.to_le_bytes());
    state.update(&cfg, &sink).unwrap();
    assert_eq!(sink.masks(), vec![(0, false)], "one vector");
    cfg.write(MSI_OFF + 2, &(1u16 | (2 << 4)).to_le_bytes());
    state.update(&cfg, &sink).unwrap();
    assert_eq!(
        sink.masks(),
        vec![(0, false), (1, false), (2, false), (3, false)],
        "four vectors after MME = 2 while enabled"
    );
    assert_eq!(state.eventfds().len(), 4);
    cfg.write(MSI_OFF + 2, &1u16.to_le_bytes());
    state.update(&cfg, &sink).unwrap();
    assert_eq!(sink.masks(), vec![(0, false)], "back to one");
    assert_eq!(sink.stray(), Vec::<String>::new());
}
