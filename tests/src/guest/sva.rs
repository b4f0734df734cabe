//! The L3 guest as a Linux SVA client of ioasid-vmm's emulated SVA copy engine (PCI
//! 1234:5a5a) behind its emulated VT-d: the test module `sva_copy.ko` (tests/l3-module)
//! binds this process's mm with `iommu_sva_bind_device()`, and the device copies between
//! plain virtual addresses of this process under the PASID Linux gave it.
//!
//! Tasks: `sva-copy` (`sva_bind_and_copy`: a copy between two of our buffers, data
//! verified), `sva-iopf` (`sva_iopf`: the destination is freshly mmap-ed and never touched,
//! so the device faults, L3's PRQ handler (its `dmarN-prq` interrupt counts) and iopf queue
//! fault the pages in and answer;
//! also `sva_iopf_invalid`: a source with no mapping at all is answered Invalid and the
//! record says PAGE_FAULT), `sva-two-procs` (`sva_two_processes_isolated`: two processes
//! with the same virtual addresses and different contents never see each other's memory).
//! `sva-child TAG` is the internal child of `sva-two-procs`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use super::pagemap::PAGE;
use super::{dmesg, pci, report};

/// The copy engine's PCI IDs (SVA-ABI.md).
pub const SVA_IDS: (u16, u16) = (0x1234, 0x5a5a);
/// Where scripts/lab/run.sh puts the module in the L3 initramfs.
pub const MODULE_PATH: &str = "/lib/modules/sva_copy.ko";
/// The module's name (in /sys/module).
const MODULE_NAME: &str = "sva_copy";
/// Completion record status SUCCESS.
pub const STATUS_SUCCESS: u32 = 1;
/// Completion record status PAGE_FAULT.
pub const STATUS_PAGE_FAULT: u32 = 2;
/// `SVA_COPY_F_NO_PRI`.
pub const F_NO_PRI: u32 = 1;
/// The address both children of `sva-two-procs` map their buffers at.
const CHILD_VA: u64 = 0x3a5a_0000_0000;

/// `struct sva_copy_info` of tests/l3-module/sva_copy_uapi.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct Info {
    /// The PASID of this process's binding.
    pub pasid: u32,
    /// Ring descriptors.
    pub ring_size: u32,
    /// COMPLETED register.
    pub completed: u32,
    /// PRQ_STATS register.
    pub prq_stats: u32,
    /// STATUS register.
    pub status: u32,
    /// Completion interrupts the driver saw.
    pub irqs: u32,
    /// Error interrupts the driver saw.
    pub error_irqs: u32,
    /// Zero.
    pub reserved: u32,
}

/// `struct sva_copy_req` of tests/l3-module/sva_copy_uapi.h.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyReq {
    /// Source address in this process.
    pub src: u64,
    /// Destination address in this process.
    pub dst: u64,
    /// Bytes.
    pub len: u64,
    /// Completion record address (16-byte aligned).
    pub completion: u64,
    /// `SVA_COPY_F_*`.
    pub flags: u32,
    /// Bound of the driver's wait; 0: 20 s.
    pub timeout_ms: u32,
    /// Out: the completion record's status.
    pub status: u32,
    /// Out: the PASID the descriptor carried.
    pub pasid: u32,
    /// Out: the completion record's byte count.
    pub bytes: u64,
    /// Out: PRQ_STATS before the doorbell.
    pub prq_before: u32,
    /// Out: PRQ_STATS after the completion.
    pub prq_after: u32,
}

const _: () = assert!(std::mem::size_of::<Info>() == 32);
const _: () = assert!(std::mem::size_of::<CopyReq>() == 64);

/// `_IOC(dir, 'S', nr, size)` as Linux encodes it on x86.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | ((b'S' as u64) << 8) | nr
}
/// `SVA_COPY_IOC_INFO`: `_IOR('S', 0x40, struct sva_copy_info)`.
const IOC_INFO: u64 = ioc(2, 0x40, std::mem::size_of::<Info>());
/// `SVA_COPY_IOC_COPY`: `_IOWR('S', 0x41, struct sva_copy_req)`.
const IOC_COPY: u64 = ioc(3, 0x41, std::mem::size_of::<CopyReq>());

/// A completion record's status in words.
pub fn status_name(s: u32) -> &'static str {
    match s {
        0 => "none (not written)",
        1 => "SUCCESS",
        2 => "PAGE_FAULT",
        3 => "TIMEOUT",
        4 => "BAD_DESCRIPTOR",
        5 => "BAD_PASID",
        _ => "unknown",
    }
}

// --- the module and the device ---------------------------------------------------------

/// Loads sva_copy.ko (finit_module) unless it is loaded; then waits for the driver to bind
/// the engine and for its /dev node. Returns the node and a description of the device.
pub fn setup() -> Result<(PathBuf, String), String> {
    let bdf = match pci::find(SVA_IDS.0, SVA_IDS.1).as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(
                "no 1234:5a5a function (the SVA copy engine) in /sys/bus/pci/devices: the VMM did not add it"
                    .into(),
            )
        }
        many => return Err(format!("{} SVA copy engines: {many:?}", many.len())),
    };
    if !Path::new("/sys/module").join(MODULE_NAME).exists() {
        let f = File::open(MODULE_PATH)
            .map_err(|e| format!("{MODULE_PATH}: {e} (run.sh carries the module)"))?;
        let params = c"";
        // SAFETY: finit_module reads the module from a valid open fd and a NUL-terminated
        // parameter string that lives across the call; the result is checked.
        let r = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                f.as_raw_fd(),
                params.as_ptr(),
                0 as libc::c_int,
            )
        };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                let log = dmesg::read().unwrap_or_default();
                let last: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("sva_copy") || l.contains("module"))
                    .collect();
                return Err(format!(
                    "finit_module({MODULE_PATH}): {e}; kernel log: {}",
                    last[last.len().saturating_sub(4)..].join(" | ")
                ));
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let node = loop {
        if let Some(n) = dev_node(&bdf) {
            if n.exists() {
                break n;
            }
        }
        if Instant::now() > deadline {
            let log = dmesg::read().unwrap_or_default();
            let ours: Vec<&str> = log
                .lines()
                .filter(|l| l.contains(&bdf) || l.contains("sva_copy"))
                .collect();
            return Err(format!(
                "{bdf}: no /dev/sva_copy* 20 s after loading the module (driver: {:?}); kernel log: {}; {}",
                pci::driver(&bdf),
                ours[ours.len().saturating_sub(6)..].join(" | "),
                pci::describe(&bdf)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // What the driver's probe said: PASID, PRI and ATS as intel-iommu enabled them.
    let log = dmesg::read().unwrap_or_default();
    let probe = log
        .lines()
        .rev()
        .find(|l| l.contains("SVA copy engine:"))
        .map(|l| {
            l.split("SVA copy engine:")
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "no probe line".into());
    Ok((node, format!("{bdf} ({probe})")))
}

/// The /dev node of the engine at `bdf` (its misc device's name under the PCI device).
fn dev_node(bdf: &str) -> Option<PathBuf> {
    let misc = pci::dir(bdf).join("misc");
    let name = std::fs::read_dir(misc)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("sva_copy"))?;
    Some(PathBuf::from("/dev").join(name))
}

/// An open binding: this process's mm bound to the engine under one PASID.
pub struct Binding {
    file: File,
    /// The PASID.
    pub pasid: u32,
}

impl Binding {
    /// Opens `node` (the driver binds our mm in open()).
    pub fn open(node: &Path) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(node)
            .map_err(|e| {
                let log = dmesg::read().unwrap_or_default();
                let ours: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("sva") || l.contains("DMAR") || l.contains("iommu"))
                    .collect();
                format!(
                    "open {} (iommu_sva_bind_device): {e}; kernel log: {}",
                    node.display(),
                    ours[ours.len().saturating_sub(6)..].join(" | ")
                )
            })?;
        let mut b = Binding { file, pasid: 0 };
        b.pasid = b.info()?.pasid;
        Ok(b)
    }

    /// SVA_COPY_IOC_INFO.
    pub fn info(&self) -> Result<Info, String> {
        let mut info = Info::default();
        // SAFETY: the ioctl writes one `struct sva_copy_info` (the same layout as `Info`,
        // size checked above) into `info`, which lives across the call.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), IOC_INFO as _, &mut info) };
        if r != 0 {
            return Err(format!(
                "SVA_COPY_IOC_INFO: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(info)
    }

    /// SVA_COPY_IOC_COPY: `len` bytes from `src` to `dst` with the record at `record`.
    pub fn copy(
        &self,
        src: u64,
        dst: u64,
        len: u64,
        record: u64,
        flags: u32,
    ) -> Result<CopyReq, String> {
        let mut req = CopyReq {
            src,
            dst,
            len,
            completion: record,
            flags,
            timeout_ms: 60_000,
            ..CopyReq::default()
        };
        // SAFETY: the ioctl reads and writes one `struct sva_copy_req` (the layout of
        // `CopyReq`, size checked above) in `req`, which lives across the call. The device
        // reaches only addresses of this process, through its PASID, as the caller chose.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), IOC_COPY as _, &mut req) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let info = self.info().map(|i| format!("{i:?}")).unwrap_or_else(|e| e);
            return Err(format!(
                "SVA_COPY_IOC_COPY {len} bytes {src:#x} -> {dst:#x} under PASID {}: {e}; device {info}",
                self.pasid
            ));
        }
        Ok(req)
    }
}

// --- memory ----------------------------------------------------------------------------

/// An anonymous private mapping of whole pages, touched or not, accessed only with volatile
/// loads and stores (the device writes it behind the compiler's back).
pub struct Region {
    ptr: *mut u8,
    len: usize,
}

impl Region {
    /// Maps `pages` pages, at `fixed` exactly when given; writes every byte when `touch`.
    pub fn new(pages: usize, fixed: Option<u64>, touch: bool) -> Result<Self, String> {
        let len = pages * PAGE;
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if fixed.is_some() {
            flags |= libc::MAP_FIXED_NOREPLACE;
        }
        let hint = fixed.unwrap_or(0) as *mut libc::c_void;
        // SAFETY: a new private anonymous mapping; with MAP_FIXED_NOREPLACE the kernel
        // refuses to replace anything already mapped. The result is checked.
        let p = unsafe { libc::mmap(hint, len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(format!(
                "mmap {len:#x} bytes at {:?}: {}",
                fixed.map(|a| format!("{a:#x}")),
                std::io::Error::last_os_error()
            ));
        }
        if let Some(a) = fixed {
            if p as u64 != a {
                // SAFETY: unmaps exactly the mapping just made.
                unsafe { libc::munmap(p, len) };
                return Err(format!("mmap at {a:#x} gave {p:?}"));
            }
        }
        let r = Region { ptr: p.cast(), len };
        if touch {
            r.fill(0, &vec![0u8; len]);
        }
        Ok(r)
    }

    /// The address of byte `off`.
    pub fn addr(&self, off: usize) -> u64 {
        self.ptr as u64 + off as u64
    }

    /// Writes `data` at `off` (clipped to the mapping).
    pub fn fill(&self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if off + i >= self.len {
                break;
            }
            // SAFETY: off + i < len: inside the mapping owned by self.
            unsafe { self.ptr.add(off + i).write_volatile(*b) };
        }
    }

    /// Reads `n` bytes at `off` (clipped to the mapping).
    pub fn read(&self, off: usize, n: usize) -> Vec<u8> {
        (off..(off + n).min(self.len))
            // SAFETY: i < len: inside the mapping owned by self.
            .map(|i| unsafe { self.ptr.add(i).read_volatile() })
            .collect()
    }

    /// Pages of the mapping that /proc/self/pagemap shows present.
    pub fn present_pages(&self) -> Result<usize, String> {
        let f = File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        let mut n = 0;
        for page in 0..self.len / PAGE {
            let mut e = [0u8; 8];
            f.read_exact_at(&mut e, (self.addr(page * PAGE) / PAGE as u64) * 8)
                .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
            if u64::from_le_bytes(e) & (1 << 63) != 0 {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Interrupts of intel-iommu's page request event (`dmarN-prq` in /proc/interrupts, the
/// irq whose thread, `prq_event_thread`, reads the PRQ), summed over units and CPUs.
fn prq_interrupts() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/interrupts")
        .map_err(|e| format!("/proc/interrupts: {e}"))?;
    let cpus = text
        .lines()
        .next()
        .map_or(0, |h| h.split_whitespace().count());
    let mut found = false;
    let mut sum = 0u64;
    for line in text.lines().skip(1) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if !words
            .last()
            .is_some_and(|w| w.starts_with("dmar") && w.ends_with("-prq"))
        {
            continue;
        }
        found = true;
        sum += words
            .iter()
            .skip(1)
            .take(cpus)
            .filter_map(|w| w.parse::<u64>().ok())
            .sum::<u64>();
    }
    if found {
        Ok(sum)
    } else {
        Err("no dmarN-prq line in /proc/interrupts: intel-iommu did not enable its page request queue (ECAP.PRS?)".into())
    }
}

/// A pattern that differs per `seed` and per byte.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

/// The first byte where `got` differs from `want`, in words.
fn first_diff(got: &[u8], want: &[u8], what: &str) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{what}: {} bytes, want {}", got.len(), want.len()));
    }
    (0..want.len())
        .find(|&i| got[i] != want[i])
        .map(|i| format!("{what}: byte {i} is {:#04x}, want {:#04x}", got[i], want[i]))
}

/// Checks a finished copy: SUCCESS, all bytes, the PASID of the binding.
fn check_record(req: &CopyReq, b: &Binding) -> Result<(), String> {
    if req.status != STATUS_SUCCESS || req.bytes != req.len {
        return Err(format!(
            "completion record: status {} ({}), {} of {} bytes copied (PASID {})",
            req.status,
            status_name(req.status),
            req.bytes,
            req.len,
            req.pasid
        ));
    }
    if req.pasid != b.pasid {
        return Err(format!(
            "the descriptor carried PASID {}, the binding has {}",
            req.pasid, b.pasid
        ));
    }
    Ok(())
}

// --- the tasks -------------------------------------------------------------------------

/// `sva-copy` (`sva_bind_and_copy`): 2 pages and 300 bytes, from and to unaligned virtual
/// addresses of two buffers of ours; the bytes around the destination stay untouched.
pub fn bind_and_copy() -> Result<String, String> {
    let (node, dev) = setup()?;
    let b = Binding::open(&node)?;
    if b.pasid == 0 {
        return Err("iommu_sva_bind_device gave PASID 0 (IOMMU_NO_PASID)".into());
    }
    let len = 2 * PAGE + 300;
    let src = Region::new(4, None, true)?;
    let dst = Region::new(4, None, true)?;
    let rec = Region::new(1, None, true)?;
    let (s_off, d_off) = (123, 2048 + 5);
    let want = pattern(len, 0x3c);
    src.fill(s_off, &want);
    let poison = vec![0xa5u8; 4 * PAGE];
    dst.fill(0, &poison);
    let before = b.info()?;
    let req = b.copy(src.addr(s_off), dst.addr(d_off), len as u64, rec.addr(0), 0)?;
    check_record(&req, &b)?;
    if let Some(d) = first_diff(&dst.read(d_off, len), &want, "destination") {
        return Err(format!(
            "{d} (copy {:#x} -> {:#x} under PASID {}): the device did not copy through the process's page tables",
            src.addr(s_off),
            dst.addr(d_off),
            b.pasid
        ));
    }
    let around = [
        dst.read(0, d_off),
        dst.read(d_off + len, 4 * PAGE - d_off - len),
    ]
    .concat();
    if let Some(d) = first_diff(
        &around,
        &poison[..around.len()],
        "bytes around the destination",
    ) {
        return Err(d);
    }
    let after = b.info()?;
    Ok(format!(
        "device {dev}; {} pasid={} {len} bytes {:#x} -> {:#x} status={} bytes={} completed={}->{} irqs={}->{}",
        node.display(),
        b.pasid,
        src.addr(s_off),
        dst.addr(d_off),
        status_name(req.status),
        req.bytes,
        before.completed,
        after.completed,
        before.irqs,
        after.irqs
    ))
}

/// `sva-iopf` (`sva_iopf`, `sva_iopf_invalid`).
pub fn iopf_all() {
    let (node, dev) = match setup() {
        Ok(x) => x,
        Err(e) => {
            report("sva_iopf", &Err(e.clone()));
            report("sva_iopf_invalid", &Err(e));
            return;
        }
    };
    let b = match Binding::open(&node) {
        Ok(b) => b,
        Err(e) => {
            report("sva_iopf", &Err(e.clone()));
            report("sva_iopf_invalid", &Err(e));
            return;
        }
    };
    report("sva_iopf", &iopf(&b, &dev));
    report("sva_iopf_invalid", &iopf_invalid(&b));
}

/// The destination is 4 freshly mmap-ed pages nobody touched (pagemap shows none present):
/// the device's writes fault, L3's PRQ handler and iopf queue fault the pages in and
/// answer Success, and the copy completes.
fn iopf(b: &Binding, dev: &str) -> Result<String, String> {
    const PAGES: usize = 4;
    let len = PAGES * PAGE;
    let src = Region::new(PAGES, None, true)?;
    let rec = Region::new(1, None, true)?;
    let want = pattern(len, 0x6b);
    src.fill(0, &want);
    let dst = Region::new(PAGES, None, false)?;
    let present = dst.present_pages()?;
    if present != 0 {
        return Err(format!(
            "{present} of the fresh destination's {PAGES} pages are present before the copy"
        ));
    }
    let irqs_before = prq_interrupts()?;
    let req = b.copy(src.addr(0), dst.addr(0), len as u64, rec.addr(0), 0)?;
    check_record(&req, b)?;
    let prq_irqs = prq_interrupts()?.saturating_sub(irqs_before);
    let prq = req.prq_after.wrapping_sub(req.prq_before);
    let present = dst.present_pages()?;
    if let Some(d) = first_diff(&dst.read(0, len), &want, "fresh destination") {
        return Err(format!("{d} (status SUCCESS, {prq} page request(s) sent)"));
    }
    if present != PAGES {
        return Err(format!(
            "after the copy {present} of {PAGES} destination pages are present"
        ));
    }
    if prq == 0 {
        return Err(format!(
            "the device's PRQ_STATS did not move ({} -> {}): it sent no page request for the untouched destination",
            req.prq_before, req.prq_after
        ));
    }
    if prq_irqs == 0 {
        return Err(format!(
            "{prq} page request(s) but no dmarN-prq interrupt: L3's PRQ handler was not woken"
        ));
    }
    Ok(format!(
        "device {dev}; pasid={} {len} bytes into {PAGES} untouched pages at {:#x}: {prq} page request(s) (PRQ_STATS {}->{}), {prq_irqs} page request interrupt(s) of L3's intel-iommu, all {PAGES} pages present after, data verified",
        b.pasid,
        dst.addr(0),
        req.prq_before,
        req.prq_after
    ))
}

/// A source with no mapping at all (a page just unmapped): Linux's iopf handler finds no
/// VMA and answers Invalid; the record says PAGE_FAULT and the destination is untouched.
fn iopf_invalid(b: &Binding) -> Result<String, String> {
    let dst = Region::new(1, None, true)?;
    let rec = Region::new(1, None, true)?;
    // Made last, so that no mapping of ours takes its place after the unmap.
    let hole = Region::new(1, None, false)?;
    let addr = hole.addr(0);
    drop(hole);
    let poison = vec![0x5au8; PAGE];
    dst.fill(0, &poison);
    let req = b.copy(addr, dst.addr(0), PAGE as u64, rec.addr(0), 0)?;
    if req.status != STATUS_PAGE_FAULT {
        return Err(format!(
            "copy from the unmapped {addr:#x}: status {} ({}), want PAGE_FAULT; {} bytes",
            req.status,
            status_name(req.status),
            req.bytes
        ));
    }
    if let Some(d) = first_diff(&dst.read(0, PAGE), &poison, "destination") {
        return Err(format!("{d}: data came from an unmapped source"));
    }
    Ok(format!(
        "copy from the unmapped {addr:#x}: PAGE_FAULT after {} page request(s), {} bytes",
        req.prq_after.wrapping_sub(req.prq_before),
        req.bytes
    ))
}

/// Lines a child prints to its parent.
const CHILD_TAG: &str = "SVA-CHILD";

/// `sva-two-procs` (`sva_two_processes_isolated`).
pub fn two_processes() -> Result<String, String> {
    let (_, dev) = setup()?;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut a = ChildProc::spawn(&exe, "a")?;
    let mut b = ChildProc::spawn(&exe, "b")?;
    let limit = Duration::from_secs(120);
    let bound_a = a.expect("BOUND", limit)?;
    let bound_b = b.expect("BOUND", limit)?;
    let (pa, pb) = (word(&bound_a, "pasid"), word(&bound_b, "pasid"));
    // Both are bound now. A copies, then B copies at the same virtual addresses, then each
    // checks again that its own buffers hold its own data.
    a.send("GO")?;
    let copied_a = a.expect("COPIED", limit)?;
    b.send("GO")?;
    let copied_b = b.expect("COPIED", limit)?;
    a.send("CHECK")?;
    b.send("CHECK")?;
    let ok_a = a.expect("OK", limit)?;
    let ok_b = b.expect("OK", limit)?;
    a.finish();
    b.finish();
    if pa.is_none() || pa == pb {
        return Err(format!(
            "the two processes got PASIDs {pa:?} and {pb:?}: not two address spaces"
        ));
    }
    Ok(format!(
        "device {dev}; A: {bound_a}; {copied_a}; {ok_a} | B: {bound_b}; {copied_b}; {ok_b}"
    ))
}

/// `key=value` from a child's line.
fn word(line: &str, key: &str) -> Option<String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

/// One child of `sva-two-procs` and the lines it printed.
struct ChildProc {
    tag: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl ChildProc {
    fn spawn(exe: &Path, tag: &str) -> Result<Self, String> {
        let mut child = Command::new(exe)
            .args(["sva-child", tag])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn {} sva-child {tag}: {e}", exe.display()))?;
        let out = child.stdout.take().ok_or("child has no stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ChildProc {
            tag: tag.to_string(),
            stdin: child.stdin.take(),
            child,
            lines: rx,
        })
    }

    fn send(&mut self, word: &str) -> Result<(), String> {
        let s = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("child {}: stdin closed", self.tag))?;
        writeln!(s, "{word}").map_err(|e| format!("child {}: write {word}: {e}", self.tag))
    }

    /// Waits for the child's `SVA-CHILD <what> ...` line; a `FAIL` line or its end is an
    /// error.
    fn expect(&mut self, what: &str, limit: Duration) -> Result<String, String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self.lines.recv_timeout(left).map_err(|_| {
                format!(
                    "child {} said no {what} within {} s (or exited)",
                    self.tag,
                    limit.as_secs()
                )
            })?;
            let Some(rest) = line.strip_prefix(CHILD_TAG) else {
                continue;
            };
            let rest = rest.trim();
            if let Some(why) = rest.strip_prefix("FAIL") {
                return Err(format!("child {}: {}", self.tag, why.trim()));
            }
            if let Some(detail) = rest.strip_prefix(what) {
                return Ok(format!("{what} {}", detail.trim()));
            }
        }
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sva-child TAG`: maps its buffers at [`CHILD_VA`] (the same in both children), binds,
/// and copies on the parent's word; prints `SVA-CHILD ...` lines.
pub fn child(tag: &str) {
    if let Err(e) = child_steps(tag) {
        println!("{CHILD_TAG} FAIL {}", e.replace('\n', " | "));
    }
}

fn child_steps(tag: &str) -> Result<(), String> {
    let seed = tag
        .bytes()
        .fold(0x11u8, |a, c| a.wrapping_mul(7).wrapping_add(c));
    // page 0: source, page 1: destination, page 2: completion record.
    let region = Region::new(3, Some(CHILD_VA), true)?;
    let want = pattern(PAGE, seed);
    let poison = vec![seed ^ 0xff; PAGE];
    region.fill(0, &want);
    region.fill(PAGE, &poison);
    let (node, _) = setup()?;
    let b = Binding::open(&node)?;
    println!(
        "{CHILD_TAG} BOUND tag={tag} pid={} pasid={} va={CHILD_VA:#x}",
        std::process::id(),
        b.pasid
    );
    flush();
    let mut stdin = std::io::stdin().lock();
    wait_word(&mut stdin, "GO")?;
    let req = b.copy(
        region.addr(0),
        region.addr(PAGE),
        PAGE as u64,
        region.addr(2 * PAGE),
        0,
    )?;
    check_record(&req, &b)?;
    if let Some(d) = first_diff(&region.read(PAGE, PAGE), &want, "own destination") {
        return Err(format!(
            "{d}: the copy under PASID {} did not land in this process (another address space?)",
            b.pasid
        ));
    }
    println!("{CHILD_TAG} COPIED status={}", status_name(req.status));
    flush();
    wait_word(&mut stdin, "CHECK")?;
    if let Some(d) = first_diff(
        &region.read(0, 2 * PAGE),
        &[want.clone(), want].concat(),
        "own buffers after the other's copy",
    ) {
        return Err(format!(
            "{d}: the other process's copy at the same virtual addresses reached this process"
        ));
    }
    println!("{CHILD_TAG} OK tag={tag} own data intact after both copies");
    flush();
    drop(b);
    Ok(())
}

fn flush() {
    let _ = std::io::stdout().flush();
}

/// Reads lines until `word`; the end of input is an error.
fn wait_word(input: &mut impl BufRead, word: &str) -> Result<(), String> {
    let mut line = String::new();
    loop {
        line.clear();
        match input.read_line(&mut line) {
            Ok(0) => return Err(format!("the parent closed stdin before {word}")),
            Ok(_) if line.trim() == word => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("reading stdin: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_c_header() {
        // _IOR('S', 0x40, 32 bytes) and _IOWR('S', 0x41, 64 bytes) as Linux computes them.
        assert_eq!(IOC_INFO, 0x8020_5340);
        assert_eq!(IOC_COPY, 0xc040_5341);
    }

    #[test]
    fn words_and_patterns() {
        assert_eq!(
            word("BOUND tag=a pid=7 pasid=3 va=0x1", "pasid").as_deref(),
            Some("3")
        );
        assert_eq!(word("BOUND tag=a", "pasid"), None);
        assert_ne!(pattern(64, 1), pattern(64, 2));
        assert_eq!(first_diff(&[1, 2], &[1, 2], "x"), None);
        assert!(first_diff(&[1, 3], &[1, 2], "x").is_some());
        assert_eq!(status_name(STATUS_PAGE_FAULT), "PAGE_FAULT");
    }

    #[test]
    fn regions_read_back_and_report_presence() {
        let r = Region::new(2, None, false).expect("mmap");
        assert_eq!(r.present_pages().expect("pagemap"), 0);
        r.fill(10, &[1, 2, 3]);
        assert_eq!(r.read(10, 3), vec![1, 2, 3]);
        assert_eq!(r.read(2 * PAGE - 1, 5).len(), 1);
        assert!(r.present_pages().expect("pagemap") >= 1);
    }
}
