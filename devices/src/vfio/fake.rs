//! A fake VFIO device and a fake interrupt sink for the model's tests.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io;
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::*;
use super::bar::BarMapper;
use crate::pci::interrupt::*;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IrqCall {
    Enable(u32, usize),
    Disable(u32),
    Resample,
    Unmask,
}

pub struct FakeVfio {
    pub config: Mutex<Vec<u8>>,
    pub config_writes: Mutex<Vec<(u64, Vec<u8>)>>,
    pub regions: BTreeMap<u32, RegionInfo>,
    pub bar_mem: Mutex<BTreeMap<u32, Vec<u8>>>,
    pub irqs: BTreeMap<u32, IrqInfo>,
    pub irq_log: Mutex<Vec<IrqCall>>,
    pub resample_supported: bool,
    pub mmaps: Mutex<Vec<(u32, u64, u64)>>,
}

fn put16(c: &mut [u8], o: usize, v: u16) {
    c[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(c: &mut [u8], o: usize, v: u32) {
    c[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

fn rw(size: u64) -> RegionInfo {
    RegionInfo {
        size,
        read: true,
        write: true,
        ..Default::default()
    }
}

fn irq(count: u32) -> IrqInfo {
    IrqInfo {
        count,
        eventfd: true,
        maskable: true,
        automasked: false,
    }
}

/// Offsets of the NIC-like fake's capabilities.
pub mod nic {
    pub const PM: usize = 0x40;
    pub const MSI: usize = 0x50;
    pub const MSIX: usize = 0x70;
    pub const EXP: usize = 0xa0;
    pub const VPD: usize = 0xe0;
    pub const VNDR: usize = 0xe8;
    pub const AER: usize = 0x100;
    pub const ATS: usize = 0x148;
    pub const PRI: usize = 0x150;
    pub const PASID: usize = 0x160;
    pub const VSEC: usize = 0x170;
    pub const BAR0_IDENT: u32 = 0x010000ed;
}

impl FakeVfio {
    /// A PCIe NIC-like function: Mem32 BAR0 (64 KiB, mmap), I/O BAR1 (32 B), 64-bit
    /// prefetchable BAR2 (1 MiB, sparse mmap around the MSI-X table at 0x2000 and PBA at
    /// 0x3000), Mem32 BAR4 (0x1800-byte region, no mmap). Capabilities PM, MSI (64-bit,
    /// per-vector mask, 4 vectors), MSI-X (16), PCIe v2, VPD, vendor; extended AER, ATS,
    /// PRI, PASID, VSEC.
    pub fn nic() -> Self {
        let mut c = vec![0u8; 4096];
        put16(&mut c, 0x00, 0x8086);
        put16(&mut c, 0x02, 0x1234);
        put16(&mut c, 0x04, 0x0008); // special cycles: a device-owned bit
        put16(&mut c, 0x06, 0x0010 | 0x0008 | 0x2000);
        c[0x08] = 0x02;
        c[0x09..0x0c].copy_from_slice(&[0x00, 0x00, 0x02]);
        c[0x0e] = 0x80;
        put32(&mut c, 0x10, 0x0000_0000);
        put32(&mut c, 0x14, 0x0000_0001);
        put32(&mut c, 0x18, 0x0000_000c);
        put32(&mut c, 0x20, 0x0000_0000);
        put16(&mut c, 0x2c, 0x8086);
        put16(&mut c, 0x2e, 0x0001);
        put32(&mut c, 0x30, 0xfffe_0001);
        c[0x34] = nic::PM as u8;
        c[0x3c] = 0x0b;
        c[0x3d] = 0x01;
        // PM
        c[nic::PM] = 0x01;
        c[nic::PM + 1] = nic::MSI as u8;
        put16(&mut c, nic::PM + 2, 0x0003);
        // MSI: 64-bit, per-vector mask, MMC = 2 (4 vectors)
        c[nic::MSI] = 0x05;
        c[nic::MSI + 1] = nic::MSIX as u8;
        put16(&mut c, nic::MSI + 2, 0x0180 | (2 << 1));
        // MSI-X: 16 entries, table BAR2+0x2000, PBA BAR2+0x3000
        c[nic::MSIX] = 0x11;
        c[nic::MSIX + 1] = nic::EXP as u8;
        put16(&mut c, nic::MSIX + 2, 15);
        put32(&mut c, nic::MSIX + 4, 0x2000 | 2);
        put32(&mut c, nic::MSIX + 8, 0x3000 | 2);
        // PCIe v2 endpoint
        c[nic::EXP] = 0x10;
        c[nic::EXP + 1] = nic::VPD as u8;
        put16(&mut c, nic::EXP + 2, 0x0002);
        put32(&mut c, nic::EXP + 4, 0x1000_8fe0);
        put16(&mut c, nic::EXP + 0x12, 0x1011); // link status
                                                // VPD (hidden)
        c[nic::VPD] = 0x03;
        c[nic::VPD + 1] = nic::VNDR as u8;
        // Vendor specific, 8 bytes
        c[nic::VNDR] = 0x09;
        c[nic::VNDR + 1] = 0;
        c[nic::VNDR + 2] = 8;
        c[nic::VNDR + 4] = 0xab;
        // Extended
        put32(
            &mut c,
            nic::AER,
            0x0001 | (2 << 16) | ((nic::ATS as u32) << 20),
        );
        put32(
            &mut c,
            nic::ATS,
            0x000f | (1 << 16) | ((nic::PRI as u32) << 20),
        );
        put32(
            &mut c,
            nic::PRI,
            0x0013 | (1 << 16) | ((nic::PASID as u32) << 20),
        );
        put32(
            &mut c,
            nic::PASID,
            0x001b | (1 << 16) | ((nic::VSEC as u32) << 20),
        );
        put16(&mut c, nic::PASID + 4, 0x1406);
        put32(&mut c, nic::VSEC, 0x000b | (1 << 16));
        put32(&mut c, nic::VSEC + 4, 0x1234 | (1 << 16) | (0x18 << 20));

        let mut regions = BTreeMap::new();
        regions.insert(
            0,
            RegionInfo {
                mmap: true,
                ..rw(0x10000)
            },
        );
        regions.insert(1, rw(0x20));
        regions.insert(
            2,
            RegionInfo {
                mmap: true,
                sparse_mmap: Some(vec![
                    MmapWindow {
                        offset: 0,
                        len: 0x2000,
                    },
                    MmapWindow {
                        offset: 0x4000,
                        len: 0xfc000,
                    },
                ]),
                ..rw(0x10_0000)
            },
        );
        regions.insert(4, rw(0x1800));
        regions.insert(CONFIG_REGION, rw(4096));
        let mut bar_mem = BTreeMap::new();
        for (i, r) in &regions {
            if *i != CONFIG_REGION {
                let mut m: Vec<u8> = (0..r.size).map(|x| (x as u8) ^ (*i as u8)).collect();
                if *i == 0 {
                    m[..4].copy_from_slice(&nic::BAR0_IDENT.to_le_bytes());
                }
                bar_mem.insert(*i, m);
            }
        }
        let mut irqs = BTreeMap::new();
        irqs.insert(INTX_IRQ, irq(1));
        irqs.insert(MSI_IRQ, irq(4));
        irqs.insert(MSIX_IRQ, irq(16));
        Self::from_parts(c, regions, bar_mem, irqs, true)
    }

    /// An mtty-like mdev: 256-byte config, no capabilities, two 8-byte I/O BARs, no mmap,
    /// INTx and one MSI vector in the IRQ info (but no MSI capability), no MSI-X, and no INTx
    /// resample support.
    pub fn mtty() -> Self {
        let mut c = vec![0u8; 256];
        put16(&mut c, 0x00, 0x4348);
        put16(&mut c, 0x02, 0x3253);
        c[0x09..0x0c].copy_from_slice(&[0x02, 0x00, 0x07]);
        put32(&mut c, 0x10, 0x0000_0001);
        put32(&mut c, 0x14, 0x0000_0001);
        c[0x3d] = 0x01;
        let mut regions = BTreeMap::new();
        regions.insert(0, rw(8));
        regions.insert(1, rw(8));
        regions.insert(CONFIG_REGION, rw(256));
        let mut bar_mem = BTreeMap::new();
        bar_mem.insert(0, vec![0x60, 1, 2, 3, 4, 5, 6, 7]);
        bar_mem.insert(1, vec![0x61, 1, 2, 3, 4, 5, 6, 7]);
        let mut irqs = BTreeMap::new();
        irqs.insert(INTX_IRQ, irq(1));
        irqs.insert(MSI_IRQ, irq(1));
        Self::from_parts(c, regions, bar_mem, irqs, false)
    }

    pub fn from_parts(
        config: Vec<u8>,
        regions: BTreeMap<u32, RegionInfo>,
        bar_mem: BTreeMap<u32, Vec<u8>>,
        irqs: BTreeMap<u32, IrqInfo>,
        resample_supported: bool,
    ) -> Self {
        Self {
            config: Mutex::new(config),
            config_writes: Mutex::new(Vec::new()),
            regions,
            bar_mem: Mutex::new(bar_mem),
            irqs,
            irq_log: Mutex::new(Vec::new()),
            resample_supported,
            mmaps: Mutex::new(Vec::new()),
        }
    }

    pub fn device_u16(&self, off: usize) -> u16 {
        let c = self.config.lock().unwrap();
        u16::from_le_bytes([c[off], c[off + 1]])
    }

    pub fn irq_log(&self) -> Vec<IrqCall> {
        self.irq_log.lock().unwrap().clone()
    }

    pub fn config_writes_in(&self, start: usize, end: usize) -> Vec<(u64, Vec<u8>)> {
        self.config_writes
            .lock()
            .unwrap()
            .iter()
            .filter(|(o, d)| (*o as usize) < end && start < *o as usize + d.len())
            .cloned()
            .collect()
    }
}

fn oob() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "out of bounds")
}

impl VfioRegions for FakeVfio {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.regions.get(&index).cloned()
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        if index == CONFIG_REGION {
            let c = self.config.lock().unwrap();
            let src = c.get(o..o + data.len()).ok_or_else(oob)?;
            data.copy_from_slice(src);
            return Ok(());
        }
        let m = self.bar_mem.lock().unwrap();
        let src = m
            .get(&index)
            .and_then(|m| m.get(o..o + data.len()))
            .ok_or_else(oob)?;
        data.copy_from_slice(src);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()> {
        let o = offset as usize;
        if index == CONFIG_REGION {
            self.config_writes
                .lock()
                .unwrap()
                .push((offset, data.to_vec()));
            let mut c = self.config.lock().unwrap();
            c.get_mut(o..o + data.len())
                .ok_or_else(oob)?
                .copy_from_slice(data);
            return Ok(());
        }
        let mut m = self.bar_mem.lock().unwrap();
        m.get_mut(&index)
            .and_then(|m| m.get_mut(o..o + data.len()))
            .ok_or_else(oob)?
            .copy_from_slice(data);
        Ok(())
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.irqs.get(&index).copied()
    }

    fn enable_irq(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let count = self.irqs.get(&index).map(|i| i.count).unwrap_or(0) as usize;
        if fds.is_empty() || fds.len() > count {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.irq_log
            .lock()
            .unwrap()
            .push(IrqCall::Enable(index, fds.len()));
        Ok(())
    }

    fn disable_irq(&self, index: u32) -> io::Result<()> {
        self.irq_log.lock().unwrap().push(IrqCall::Disable(index));
        Ok(())
    }

    fn set_intx_resample(&self, _fd: &EventFd) -> io::Result<()> {
        if !self.resample_supported {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        self.irq_log.lock().unwrap().push(IrqCall::Resample);
        Ok(())
    }

    fn unmask_intx(&self) -> io::Result<()> {
        self.irq_log.lock().unwrap().push(IrqCall::Unmask);
        Ok(())
    }

    fn mmap_region(
        &self,
        index: u32,
        offset: u64,
        len: u64,
        _writable: bool,
    ) -> io::Result<MmapArea> {
        let r = self.regions.get(&index).ok_or_else(oob)?;
        if !r.mmap || offset + len > r.size {
            return Err(oob());
        }
        self.mmaps.lock().unwrap().push((index, offset, len));
        MmapArea::anonymous(len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkCall {
    Route(MsiVector, MsiMessage, bool),
    Update(MsiVector, MsiMessage),
    Mask(MsiVector, bool),
    Release(MsiVector),
}

#[derive(Default)]
pub struct FakeSink {
    pub calls: Mutex<Vec<SinkCall>>,
    pub wire_intx: bool,
    /// Give no resample eventfd (the VMM pulses the line).
    pub no_resample: bool,
    /// The pin asked for, and the VMM's ends of the eventfds handed out.
    pub intx_given: Mutex<Option<(IntxPin, EventFd, Option<EventFd>)>>,
    pub intx_released: Mutex<u32>,
    /// Routing-table commits, as a VMM that commits each route change outside a batch and
    /// once per outermost batch with changes would make them.
    pub commits: Mutex<u32>,
    /// (open batch depth, a change is waiting for the batch's commit)
    pub batch: Mutex<(u32, bool)>,
}

impl FakeSink {
    pub fn with_intx() -> Self {
        Self {
            wire_intx: true,
            ..Default::default()
        }
    }

    /// Signals the resample eventfd, as the VMM does when the guest EOIs the line.
    pub fn eoi(&self) {
        let g = self.intx_given.lock().unwrap();
        g.as_ref().unwrap().2.as_ref().unwrap().write(1).unwrap();
    }

    pub fn take(&self) -> Vec<SinkCall> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }

    pub fn commits(&self) -> u32 {
        *self.commits.lock().unwrap()
    }

    /// A route table change: committed now, or at the end of the open batch.
    fn changed(&self) {
        let mut b = self.batch.lock().unwrap();
        if b.0 > 0 {
            b.1 = true;
        } else {
            *self.commits.lock().unwrap() += 1;
        }
    }
}

impl InterruptSink for FakeSink {
    fn msi_route(
        &self,
        vector: MsiVector,
        msg: MsiMessage,
        masked: bool,
    ) -> Result<EventFd, InterruptError> {
        self.calls
            .lock()
            .unwrap()
            .push(SinkCall::Route(vector, msg, masked));
        self.changed();
        EventFd::new(EFD_NONBLOCK).map_err(|source| InterruptError::Route { vector, source })
    }
    fn msi_update(&self, vector: MsiVector, msg: MsiMessage) -> Result<(), InterruptError> {
        self.calls
            .lock()
            .unwrap()
            .push(SinkCall::Update(vector, msg));
        self.changed();
        Ok(())
    }
    fn msi_mask(&self, vector: MsiVector, masked: bool) -> Result<(), InterruptError> {
        self.calls
            .lock()
            .unwrap()
            .push(SinkCall::Mask(vector, masked));
        Ok(())
    }
    fn msi_release(&self, vector: MsiVector) {
        self.calls.lock().unwrap().push(SinkCall::Release(vector));
        self.changed();
    }
    fn begin_route_batch(&self) {
        self.batch.lock().unwrap().0 += 1;
    }
    fn end_route_batch(&self) -> Result<(), InterruptError> {
        let mut b = self.batch.lock().unwrap();
        b.0 -= 1;
        if b.0 == 0 && std::mem::take(&mut b.1) {
            *self.commits.lock().unwrap() += 1;
        }
        Ok(())
    }
    fn intx(&self, pin: IntxPin) -> Option<IntxEventFds> {
        if !self.wire_intx {
            return None;
        }
        let trigger = EventFd::new(EFD_NONBLOCK).unwrap();
        let resample = (!self.no_resample).then(|| EventFd::new(EFD_NONBLOCK).unwrap());
        *self.intx_given.lock().unwrap() = Some((
            pin,
            trigger.try_clone().unwrap(),
            resample.as_ref().map(|r| r.try_clone().unwrap()),
        ));
        Some(IntxEventFds { trigger, resample })
    }
    fn intx_release(&self) {
        *self.intx_released.lock().unwrap() += 1;
    }
}

#[derive(Default)]
pub struct FakeMapper {
    pub maps: Mutex<Vec<(bool, u64, u64)>>,
}

impl BarMapper for FakeMapper {
    fn map(&self, guest_addr: u64, _host_addr: u64, len: u64) -> io::Result<()> {
        self.maps.lock().unwrap().push((true, guest_addr, len));
        Ok(())
    }
    fn unmap(&self, guest_addr: u64, len: u64) -> io::Result<()> {
        self.maps.lock().unwrap().push((false, guest_addr, len));
        Ok(())
    }
}
