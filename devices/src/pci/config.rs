//! A PCI configuration space: registers with write masks and write-1-to-clear bits, BARs
//! that follow the sizing protocol, and capability-list building and walking.
//!
//! Every guest write goes through [`ConfigSpace::write`]: for each bit, a set write-mask bit
//! lets the guest's value in, a set W1C bit clears the register bit when the guest writes 1,
//! and every other bit is read-only. A BAR is simply a register whose writable bits are its
//! address bits above the size: writing all ones and reading back gives the size, as on real
//! hardware. The device model sets registers with the `set_*` methods, which ignore the masks.

use thiserror::Error;

use super::bar::{BarKind, PciBarInfo};

/// Size of a conventional PCI config space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Size of a PCIe (extended) config space.
pub const EXT_CONFIG_SPACE_SIZE: usize = 4096;
/// First byte of the extended capability area.
pub const EXT_CAP_START: usize = 0x100;
/// First byte a standard capability may use.
pub const CAP_START: usize = 0x40;

/// Type 0 header register offsets.
pub mod reg {
    /// Vendor ID (u16).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (u16).
    pub const COMMAND: usize = 0x04;
    /// Status (u16).
    pub const STATUS: usize = 0x06;
    /// Revision ID (u8).
    pub const REVISION_ID: usize = 0x08;
    /// Class code: programming interface, subclass, class (3 bytes).
    pub const CLASS_PROG: usize = 0x09;
    /// Cache line size (u8).
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    /// Latency timer (u8).
    pub const LATENCY_TIMER: usize = 0x0d;
    /// Header type (u8).
    pub const HEADER_TYPE: usize = 0x0e;
    /// BIST (u8).
    pub const BIST: usize = 0x0f;
    /// CardBus CIS pointer (u32).
    pub const CARDBUS_CIS: usize = 0x28;
    /// Subsystem vendor ID (u16).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// Expansion ROM BAR (u32).
    pub const ROM_ADDRESS: usize = 0x30;
    /// Capabilities pointer (u8).
    pub const CAPABILITY_LIST: usize = 0x34;
    /// Interrupt line (u8).
    pub const INTERRUPT_LINE: usize = 0x3c;
    /// Interrupt pin (u8).
    pub const INTERRUPT_PIN: usize = 0x3d;
    /// Min grant (u8).
    pub const MIN_GNT: usize = 0x3e;
    /// Max latency (u8).
    pub const MAX_LAT: usize = 0x3f;
    /// End of the type 0 header.
    pub const HEADER_END: usize = 0x40;
}

/// Command register bits.
pub mod command {
    /// I/O space decode enable.
    pub const IO: u16 = 1 << 0;
    /// Memory space decode enable.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus master enable.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Special cycles.
    pub const SPECIAL: u16 = 1 << 3;
    /// Memory write and invalidate.
    pub const INVALIDATE: u16 = 1 << 4;
    /// VGA palette snoop.
    pub const VGA_PALETTE: u16 = 1 << 5;
    /// Parity error response.
    pub const PARITY: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// Fast back-to-back enable.
    pub const FAST_BACK: u16 = 1 << 9;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits.
pub mod status {
    /// INTx asserted.
    pub const INTERRUPT: u16 = 1 << 3;
    /// A capability list is present.
    pub const CAP_LIST: u16 = 1 << 4;
    /// The error bits, all write-1-to-clear.
    pub const W1C: u16 = 0xf900;
}

/// Standard capability IDs.
pub mod cap_id {
    /// Power management.
    pub const PM: u8 = 0x01;
    /// Vital product data.
    pub const VPD: u8 = 0x03;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const EXP: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Extended capability IDs.
pub mod ext_cap_id {
    /// Advanced error reporting.
    pub const AER: u16 = 0x0001;
    /// Vendor specific extended capability.
    pub const VSEC: u16 = 0x000b;
    /// Address translation services.
    pub const ATS: u16 = 0x000f;
    /// Single root I/O virtualization.
    pub const SRIOV: u16 = 0x0010;
    /// Page request interface.
    pub const PRI: u16 = 0x0013;
    /// Process address space ID.
    pub const PASID: u16 = 0x001b;
    /// Designated vendor specific extended capability.
    pub const DVSEC: u16 = 0x0023;
    /// Device 3 (PCIe 6.0): carries the DMWr routing and requester-enable controls.
    pub const DEV3: u16 = 0x002f;
}

/// Capability building errors.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The capability does not fit in the remaining space.
    #[error("Capability {id:#x} of {len} bytes does not fit in config space")]
    NoRoom {
        /// Capability ID.
        id: u16,
        /// Length including the header.
        len: usize,
    },
    /// Extended capabilities need a 4 KiB config space.
    #[error("Extended capability {id:#x} needs a 4 KiB config space")]
    NotExtended {
        /// Capability ID.
        id: u16,
    },
}

/// A standard capability found by [`walk_capabilities`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapEntry {
    /// Config-space offset of the header.
    pub offset: usize,
    /// Capability ID.
    pub id: u8,
}

/// An extended capability found by [`walk_ext_capabilities`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtCapEntry {
    /// Config-space offset of the header.
    pub offset: usize,
    /// Capability ID.
    pub id: u16,
    /// Capability version.
    pub version: u8,
}

fn le_u32(bytes: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, v) in b.iter_mut().enumerate() {
        *v = off
            .checked_add(i)
            .and_then(|o| bytes.get(o))
            .copied()
            .unwrap_or(0);
    }
    u32::from_le_bytes(b)
}

/// Most standard capabilities a list can hold: (256 - 0x40) / 4 headers (Linux stops at 48).
pub const MAX_CAPABILITIES: usize = 48;
/// Most extended capabilities a list can hold: (4096 - 0x100) / 4 headers.
pub const MAX_EXT_CAPABILITIES: usize = (EXT_CONFIG_SPACE_SIZE - EXT_CAP_START) / 4;

/// Walks the standard capability list of a config-space image. Every entry's 2-byte header
/// lies inside the image and the first 256 bytes; the walk stops at a pointer below 0x40, a
/// header that would cross the end, an offset already visited (a looped list), or after
/// [`MAX_CAPABILITIES`] entries. A device controls these bytes: nothing here may index
/// past the image.
pub fn walk_capabilities(bytes: &[u8]) -> Vec<CapEntry> {
    let mut out = Vec::new();
    let status = u16::from(bytes.get(reg::STATUS).copied().unwrap_or(0));
    if status & status::CAP_LIST == 0 {
        return out;
    }
    let end = bytes.len().min(CONFIG_SPACE_SIZE);
    let mut visited = [false; CONFIG_SPACE_SIZE / 4];
    let mut ptr = usize::from(bytes.get(reg::CAPABILITY_LIST).copied().unwrap_or(0)) & !3;
    while ptr >= CAP_START && ptr + 2 <= end && out.len() < MAX_CAPABILITIES {
        let (Some(&id), Some(&next), Some(seen)) =
            (bytes.get(ptr), bytes.get(ptr + 1), visited.get_mut(ptr / 4))
        else {
            break;
        };
        if std::mem::replace(seen, true) {
            break;
        }
        out.push(CapEntry { offset: ptr, id });
        ptr = usize::from(next) & !3;
    }
    out
}

/// Walks the extended capability list of a config-space image (empty for a 256-byte image).
/// Every entry's 4-byte header lies inside the image; the walk stops at a zero or all-ones
/// header, a pointer below 0x100, a header that would cross the end, an offset already
/// visited, or after [`MAX_EXT_CAPABILITIES`] entries.
pub fn walk_ext_capabilities(bytes: &[u8]) -> Vec<ExtCapEntry> {
    let mut out = Vec::new();
    let end = bytes.len().min(EXT_CONFIG_SPACE_SIZE);
    let mut visited = [false; EXT_CONFIG_SPACE_SIZE / 4];
    let mut ptr = EXT_CAP_START;
    while ptr >= EXT_CAP_START && ptr + 4 <= end && out.len() < MAX_EXT_CAPABILITIES {
        let Some(seen) = visited.get_mut(ptr / 4) else {
            break;
        };
        if std::mem::replace(seen, true) {
            break;
        }
        let hdr = le_u32(bytes, ptr);
        if hdr == 0 || hdr == u32::MAX {
            break;
        }
        out.push(ExtCapEntry {
            offset: ptr,
            id: (hdr & 0xffff) as u16,
            version: ((hdr >> 16) & 0xf) as u8,
        });
        ptr = ((hdr >> 20) as usize) & !3;
    }
    out
}

/// The little-endian u32 at `off` of a device image; bytes past the end read as 0.
pub fn image_u32(bytes: &[u8], off: usize) -> u32 {
    le_u32(bytes, off)
}

/// The little-endian u16 at `off` of a device image; bytes past the end read as 0.
pub fn image_u16(bytes: &[u8], off: usize) -> u16 {
    le_u32(bytes, off) as u16
}

/// Identity of a type 0 function.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TypeZeroHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code as `class << 16 | subclass << 8 | prog_if`.
    pub class_code: u32,
    /// Revision ID.
    pub revision_id: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Interrupt pin (0 none, 1..=4 INTA..INTD).
    pub interrupt_pin: u8,
}

/// Registers, their write masks and W1C masks.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: Vec<u8>,
    wmask: Vec<u8>,
    w1c: Vec<u8>,
    last_cap: Option<usize>,
    next_cap: usize,
    last_ext_cap: Option<usize>,
    next_ext_cap: usize,
}

impl ConfigSpace {
    /// An all-zero, read-only config space of `size` bytes (256 or 4096).
    pub fn new(size: usize) -> Self {
        let size = if size > CONFIG_SPACE_SIZE {
            EXT_CONFIG_SPACE_SIZE
        } else {
            CONFIG_SPACE_SIZE
        };
        Self {
            bytes: vec![0; size],
            wmask: vec![0; size],
            w1c: vec![0; size],
            last_cap: None,
            next_cap: CAP_START,
            last_ext_cap: None,
            next_ext_cap: EXT_CAP_START,
        }
    }

    /// A type 0 header with the usual writable registers: command (I/O, memory, bus
    /// master, parity, SERR, INTx disable), the status error bits (W1C), cache line size,
    /// latency timer and interrupt line.
    pub fn type0(size: usize, h: &TypeZeroHeader) -> Self {
        let mut c = Self::new(size);
        c.set_u16(reg::VENDOR_ID, h.vendor_id);
        c.set_u16(reg::DEVICE_ID, h.device_id);
        c.set_u8(reg::REVISION_ID, h.revision_id);
        let class = h.class_code.to_le_bytes();
        c.set_bytes(reg::CLASS_PROG, &class[..3]);
        c.set_u16(reg::SUBSYSTEM_VENDOR_ID, h.subsystem_vendor_id);
        c.set_u16(reg::SUBSYSTEM_ID, h.subsystem_id);
        c.set_u8(reg::INTERRUPT_PIN, h.interrupt_pin);
        c.set_wmask_u16(reg::COMMAND, Self::COMMAND_WRITABLE);
        c.set_w1c_u16(reg::STATUS, status::W1C);
        c.set_wmask_u8(reg::CACHE_LINE_SIZE, 0xff);
        c.set_wmask_u8(reg::LATENCY_TIMER, 0xff);
        c.set_wmask_u8(reg::INTERRUPT_LINE, 0xff);
        c
    }

    /// Command bits a guest may set on a plain endpoint.
    pub const COMMAND_WRITABLE: u16 = command::IO
        | command::MEMORY
        | command::BUS_MASTER
        | command::PARITY
        | command::SERR
        | command::INTX_DISABLE;

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a config space has at least 256 bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The raw register image.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Reads the byte at `offset` (0 past the end).
    pub fn read_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    /// Reads the little-endian u16 at `offset`.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Reads the little-endian u32 at `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        le_u32(&self.bytes, offset)
    }

    /// A guest write: masked by the write mask, W1C bits cleared by ones. Bytes past the
    /// end are dropped.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let o = offset + i;
            if o >= self.bytes.len() {
                break;
            }
            let m = self.wmask[o];
            let old = self.bytes[o];
            let new = (old & !m) | (v & m);
            self.bytes[o] = new & !(v & self.w1c[o]);
        }
    }

    /// Sets bytes regardless of masks (device side).
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            if let Some(b) = self.bytes.get_mut(offset + i) {
                *b = *v;
            }
        }
    }

    /// Sets a byte regardless of masks.
    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.set_bytes(offset, &[v]);
    }

    /// Sets a u16 regardless of masks.
    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Sets a u32 regardless of masks.
    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.set_bytes(offset, &v.to_le_bytes());
    }

    /// Sets the write mask of the bytes at `offset`.
    pub fn set_wmask(&mut self, offset: usize, mask: &[u8]) {
        for (i, v) in mask.iter().enumerate() {
            if let Some(b) = self.wmask.get_mut(offset + i) {
                *b = *v;
            }
        }
    }

    /// Sets the write mask of one byte.
    pub fn set_wmask_u8(&mut self, offset: usize, mask: u8) {
        self.set_wmask(offset, &[mask]);
    }

    /// Sets the write mask of a u16 register.
    pub fn set_wmask_u16(&mut self, offset: usize, mask: u16) {
        self.set_wmask(offset, &mask.to_le_bytes());
    }

    /// Sets the write mask of a u32 register.
    pub fn set_wmask_u32(&mut self, offset: usize, mask: u32) {
        self.set_wmask(offset, &mask.to_le_bytes());
    }

    /// Sets the W1C mask of a u16 register (those bits are also made non-writable).
    pub fn set_w1c_u16(&mut self, offset: usize, mask: u16) {
        for (i, m) in mask.to_le_bytes().iter().enumerate() {
            if let (Some(w), Some(c)) =
                (self.wmask.get_mut(offset + i), self.w1c.get_mut(offset + i))
            {
                *c = *m;
                *w &= !*m;
            }
        }
    }

    /// Makes `len` bytes at `offset` read-only.
    pub fn set_read_only(&mut self, offset: usize, len: usize) {
        for o in offset..(offset + len).min(self.bytes.len()) {
            self.wmask[o] = 0;
            self.w1c[o] = 0;
        }
    }

    /// Declares a BAR: flag bits read-only, address bits above the size writable, address 0.
    pub fn add_bar(&mut self, bar: &PciBarInfo) {
        let off = bar.offset();
        self.set_u32(off, bar.flags());
        self.set_wmask_u32(off, bar.low_mask());
        if bar.kind == BarKind::Mem64 {
            self.set_u32(off + 4, 0);
            self.set_wmask_u32(off + 4, bar.high_mask());
        }
    }

    /// The address a declared BAR holds now.
    pub fn bar_address(&self, bar: &PciBarInfo) -> u64 {
        let off = bar.offset();
        bar.decode(self.read_u32(off), self.read_u32(off + 4))
    }

    /// Appends a standard capability (`body` follows the 2-byte ID/next header) and links it
    /// at the end of the list. Returns its offset. The body is read-only until the caller
    /// sets write masks.
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, ConfigError> {
        let len = body.len() + 2;
        let off = self.next_cap;
        if off + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom {
                id: u16::from(id),
                len,
            });
        }
        self.set_u8(off, id);
        self.set_u8(off + 1, 0);
        self.set_bytes(off + 2, body);
        match self.last_cap {
            Some(prev) => self.set_u8(prev + 1, off as u8),
            None => self.set_u8(reg::CAPABILITY_LIST, off as u8),
        }
        let st = self.read_u16(reg::STATUS) | status::CAP_LIST;
        self.set_u16(reg::STATUS, st);
        self.last_cap = Some(off);
        self.next_cap = (off + len + 3) & !3;
        Ok(off)
    }

    /// Appends an extended capability (`body` follows the 4-byte header) and links it.
    /// Returns its offset.
    pub fn add_ext_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
    ) -> Result<usize, ConfigError> {
        if self.bytes.len() < EXT_CONFIG_SPACE_SIZE {
            return Err(ConfigError::NotExtended { id });
        }
        let len = body.len() + 4;
        let off = self.next_ext_cap;
        if off + len > EXT_CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom { id, len });
        }
        self.set_u32(off, u32::from(id) | (u32::from(version & 0xf) << 16));
        self.set_bytes(off + 4, body);
        if let Some(prev) = self.last_ext_cap {
            let hdr = (self.read_u32(prev) & 0x000f_ffff) | ((off as u32) << 20);
            self.set_u32(prev, hdr);
        }
        self.last_ext_cap = Some(off);
        self.next_ext_cap = (off + len + 3) & !3;
        Ok(off)
    }

    /// The standard capabilities, in list order.
    pub fn capabilities(&self) -> Vec<CapEntry> {
        walk_capabilities(&self.bytes)
    }

    /// The extended capabilities, in list order.
    pub fn ext_capabilities(&self) -> Vec<ExtCapEntry> {
        walk_ext_capabilities(&self.bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn hdr() -> TypeZeroHeader {
        TypeZeroHeader {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: 0x02_00_00,
            ..Default::default()
        }
    }

    #[test]
    fn masks_and_w1c() {
        let mut c = ConfigSpace::type0(256, &hdr());
        c.write(reg::VENDOR_ID, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::VENDOR_ID), 0x1234);
        c.write(reg::COMMAND, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::COMMAND), ConfigSpace::COMMAND_WRITABLE);
        c.set_u16(reg::STATUS, 0x8000 | status::CAP_LIST);
        // Writing 0 leaves W1C bits; writing 1 clears only them.
        c.write(reg::STATUS, &[0, 0]);
        assert_eq!(c.read_u16(reg::STATUS), 0x8010);
        c.write(reg::STATUS, &[0xff, 0xff]);
        assert_eq!(c.read_u16(reg::STATUS), 0x0010);
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = ConfigSpace::type0(256, &hdr());
        let b64 = PciBarInfo::new(2, BarKind::Mem64, 1 << 20, true).unwrap();
        let io = PciBarInfo::new(4, BarKind::Io, 64, false).unwrap();
        c.add_bar(&b64);
        c.add_bar(&io);
        c.write(0x18, &[0xff; 4]);
        c.write(0x1c, &[0xff; 4]);
        c.write(0x20, &[0xff; 4]);
        assert_eq!(c.read_u32(0x18), 0xfff0_000c);
        assert_eq!(c.read_u32(0x1c), 0xffff_ffff);
        assert_eq!(c.read_u32(0x20), 0xffff_ffc1);
        c.write(0x18, &0x8010_0000u32.to_le_bytes());
        c.write(0x1c, &1u32.to_le_bytes());
        assert_eq!(c.bar_address(&b64), 0x1_8010_0000);
        // Unused BAR reads 0 even after a sizing write.
        c.write(0x10, &[0xff; 4]);
        assert_eq!(c.read_u32(0x10), 0);
    }

    #[test]
    fn capability_lists_link() {
        let mut c = ConfigSpace::type0(4096, &hdr());
        assert!(c.capabilities().is_empty());
        let a = c.add_capability(cap_id::PM, &[0; 6]).unwrap();
        let b = c.add_capability(cap_id::MSI, &[0; 12]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(
            c.capabilities(),
            vec![
                CapEntry {
                    offset: 0x40,
                    id: cap_id::PM
                },
                CapEntry {
                    offset: 0x48,
                    id: cap_id::MSI
                }
            ]
        );
        let e1 = c.add_ext_capability(ext_cap_id::ATS, 1, &[0; 4]).unwrap();
        let e2 = c.add_ext_capability(ext_cap_id::PASID, 1, &[0; 4]).unwrap();
        assert_eq!((e1, e2), (0x100, 0x108));
        let ids: Vec<u16> = c.ext_capabilities().iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![ext_cap_id::ATS, ext_cap_id::PASID]);
        let mut small = ConfigSpace::new(256);
        assert!(small.add_ext_capability(1, 1, &[]).is_err());
        assert!(small.add_capability(9, &[0; 250]).is_err());
    }

    #[test]
    fn looped_list_terminates() {
        let mut img = vec![0u8; 256];
        img[reg::STATUS] = status::CAP_LIST as u8;
        img[reg::CAPABILITY_LIST] = 0x40;
        img[0x40] = 1;
        img[0x41] = 0x40;
        assert_eq!(
            walk_capabilities(&img).len(),
            1,
            "a looped list is walked once"
        );
        let mut ext = vec![0u8; 4096];
        ext[0x100..0x104].copy_from_slice(&(0x000b_u32 | (0x100 << 20)).to_le_bytes());
        assert_eq!(walk_ext_capabilities(&ext).len(), 1);
    }
}
