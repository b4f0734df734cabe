//! Lab tests of the VMM on the legacy type1 backend (an L3 Linux guest with edu, and the
//! `iommufd=auto` fallback when `/dev/iommu` is hidden), and real-kernel tests of the iommufd
//! calls that had none: `IOMMU_OPTION` (huge pages, rlimit mode), `IOMMU_IOAS_ALLOW_IOVAS`
//! (with more than 8 ranges, so `IOMMU_IOAS_IOVA_RANGES` takes its EMSGSIZE retry), the
//! kernel-chosen-IOVA forms of `IOMMU_IOAS_MAP`, `IOMMU_IOAS_MAP_FILE` and `IOMMU_IOAS_COPY`,
//! and an explicit paging HWPT (`IOMMU_HWPT_ALLOC`) with edu attached. Each VMM-level option
//! is also checked with an L3 guest whose edu DMA must read back the bytes it wrote.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ioasid::iommufd::sys;
use ioasid::{
    sysfs, CopyRequest, DevId, HwptAlloc, HwptFlags, IoasId, IommuBackend, IommufdBackend,
    IovaRange, MapFile, MapUser, Perm, PinAccounting, PtId,
};
use vfio_ioctls::VfioDevice;

use super::env::{edu_path, pattern};
use super::l3_tests::{
    l3_cmdline, l3_pieces, remote, tail, L3Session, L3_INITRD, L3_KERNEL, MAIN_CPUS, REMOTE_BIN,
    VMM_BIN,
};
use crate::dmabuf::DmaBuf;
use crate::edu::{Edu, EDU_BUF_LEN, EDU_IDENT};
use crate::ensure;
use crate::harness::{chain, LabTest, Outcome, TestResult};

/// The lab tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![
        LabTest {
            name: "ioas_option_huge_pages_lab",
            run: ioas_option_huge_pages_lab,
        },
        LabTest {
            name: "iommufd_rlimit_mode_lab",
            run: iommufd_rlimit_mode_lab,
        },
        LabTest {
            name: "ioas_allow_iovas_lab",
            run: ioas_allow_iovas_lab,
        },
        LabTest {
            name: "ioas_kernel_chosen_iova_lab",
            run: ioas_kernel_chosen_iova_lab,
        },
        LabTest {
            name: "explicit_paging_hwpt_attach_lab",
            run: explicit_paging_hwpt_attach_lab,
        },
        LabTest {
            name: "linux_guest_edu_type1",
            run: linux_guest_edu_type1,
        },
        LabTest {
            name: "vmm_auto_falls_back_to_type1",
            run: vmm_auto_falls_back_to_type1,
        },
    ]
}

const LEN: usize = EDU_BUF_LEN;
const MIB: u64 = 1 << 20;

fn s(e: impl std::error::Error) -> String {
    chain(&e)
}

// ---- the ioasid crate on a real kernel --------------------------------------------------

/// edu bound to a fresh iommufd (not attached) and its BAR0.
struct EduFd {
    backend: Arc<IommufdBackend>,
    dev: DevId,
    vfio: Arc<VfioDevice>,
}

impl EduFd {
    fn open(accounting: PinAccounting) -> Result<Self, String> {
        let spec = sysfs::resolve(&edu_path()?).map_err(s)?;
        let backend = Arc::new(IommufdBackend::open_with(accounting).map_err(s)?);
        let (dev, vfio) = backend.bind(&spec).map_err(s)?;
        Ok(EduFd { backend, dev, vfio })
    }

    fn edu(&self) -> Result<Edu, String> {
        let edu = Edu::map(&self.vfio)?;
        let ident = edu.read32(0);
        ensure!(
            ident == EDU_IDENT,
            "edu ident {ident:#x}, want {EDU_IDENT:#x}"
        );
        Ok(edu)
    }
}

impl Drop for EduFd {
    fn drop(&mut self) {
        self.backend.unbind(self.dev);
    }
}

/// Maps `buf` into `ioas` at `iova` (`None`: the kernel chooses); returns the IOVA.
fn map(b: &dyn IommuBackend, ioas: IoasId, iova: Option<u64>, buf: &DmaBuf) -> Result<u64, String> {
    // SAFETY: `buf` is only accessed with volatile operations and outlives the mapping in
    // every test (each test unmaps, or drops the IOAS and backend, before the buffer).
    let got = unsafe {
        b.ioas_map(
            ioas,
            &MapUser {
                iova,
                user_va: buf.va(),
                len: buf.len() as u64,
                perm: Perm::RW,
            },
        )
    }
    .map_err(s)?;
    if let Some(want) = iova {
        ensure!(got == want, "mapped at {got:#x}, asked for {want:#x}");
    }
    Ok(got)
}

/// A pattern RAM -> edu -> RAM through `iova_src`/`iova_dst`; the bytes must match.
fn round_trip(
    edu: &Edu,
    src: &DmaBuf,
    dst: &DmaBuf,
    seed: u8,
    iova_src: u64,
    iova_dst: u64,
) -> Result<(), String> {
    let want = pattern(seed, LEN);
    src.write(0, &want);
    dst.fill(0);
    edu.round_trip(iova_src, iova_dst, LEN as u32)?;
    check_bytes(&dst.read(0, LEN), &want)
}

fn check_bytes(got: &[u8], want: &[u8]) -> Result<(), String> {
    let bad = got.iter().zip(want).position(|(a, b)| a != b);
    ensure!(
        bad.is_none() && got.len() == want.len(),
        "DMA data mismatch at byte {bad:?}: got {:02x?}.. want {:02x?}..",
        &got[..got.len().min(8)],
        &want[..want.len().min(8)]
    );
    Ok(())
}

fn errno_of(r: Result<impl std::fmt::Debug, ioasid::Error>) -> Result<i32, String> {
    match r {
        Ok(v) => Err(format!("succeeded ({v:?}), expected an error")),
        Err(e) => e.errno().ok_or(format!("not a kernel error: {e}")),
    }
}

/// Whether `[iova, iova + len)` lies inside one of `ranges`.
fn inside(ranges: &[IovaRange], iova: u64, len: u64) -> bool {
    ranges.iter().any(|r| r.contains(iova, len))
}

/// `IOMMU_OPTION_HUGE_PAGES` on an IOAS: GET, SET 0 then DMA through 4 KiB IOPTEs, SET 1,
/// and the kernel refusing SET 0 once a domain holds mappings; then the VMM sets it for
/// hugetlbfs guest RAM, under which an L3 guest's edu DMA must read back its bytes.
fn ioas_option_huge_pages_lab() -> TestResult {
    let f = EduFd::open(PinAccounting::User)?;
    let b = &f.backend;
    let ioas = b.ioas_alloc().map_err(s)?;
    ensure!(
        b.huge_pages(ioas).map_err(s)?,
        "a fresh IOAS reads HUGE_PAGES 0, the kernel default is 1"
    );
    b.set_huge_pages(ioas, false).map_err(s)?;
    ensure!(
        !b.huge_pages(ioas).map_err(s)?,
        "HUGE_PAGES reads 1 after SET 0"
    );
    b.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
    let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
    map(&**b, ioas, Some(0x10_0000), &src)?;
    map(&**b, ioas, Some(0x20_0000), &dst)?;
    let edu = f.edu()?;
    round_trip(&edu, &src, &dst, 0x21, 0x10_0000, 0x20_0000)?;
    b.set_huge_pages(ioas, true).map_err(s)?;
    ensure!(
        b.huge_pages(ioas).map_err(s)?,
        "HUGE_PAGES reads 0 after SET 1"
    );
    round_trip(&edu, &src, &dst, 0x22, 0x10_0000, 0x20_0000)?;
    // Large pages back on, a domain with mappings: the kernel refuses to turn them off.
    let e = errno_of(b.set_huge_pages(ioas, false))?;
    ensure!(
        e == libc::EINVAL,
        "SET HUGE_PAGES 0 with mappings in a domain: errno {e}, want EINVAL"
    );
    // On the fd itself (no object), HUGE_PAGES is an IOAS option: the kernel says ENOENT.
    let mut bad = iommufd_bindings::iommufd::iommu_option {
        option_id: iommufd_bindings::iommufd::iommufd_option_IOMMU_OPTION_HUGE_PAGES,
        op: iommufd_bindings::iommufd::iommufd_option_ops_IOMMU_OPTION_OP_GET as u16,
        object_id: 0,
        ..Default::default()
    };
    let r = sys::option(&**b.iommufd(), &mut bad);
    ensure!(r.is_err(), "HUGE_PAGES GET on object 0 succeeded");
    println!("LAB-INFO IOAS {}: HUGE_PAGES 1 -> 0 (DMA ok) -> 1 (DMA ok); SET 0 with mappings: EINVAL; object 0: {:?}", ioas.0, r.err());
    drop(edu);

    // The VMM: hugetlbfs guest RAM gets HUGE_PAGES set and read back before RAM is mapped.
    let want_pages = 160u64; // 256 MiB of L3 RAM in 2 MiB pages, plus slack
    let nr = Path::new("/proc/sys/vm/nr_hugepages");
    let before = std::fs::read_to_string(nr).unwrap_or_default();
    std::fs::write(nr, want_pages.to_string()).map_err(|e| format!("{}: {e}", nr.display()))?;
    let edu_dev = format!("path={},id=edu0", edu_path()?.display());
    drop(f);
    let out = L3::start(
        "hugepages",
        &l3_cmdline("up,edu", ""),
        &[edu_dev],
        &["--platform", "iommufd=on"],
        "size=256M,hugepages=on",
        false,
    )?
    .finish(Duration::from_secs(240));
    let _ = std::fs::write(nr, before.trim());
    let dma = out.result("edu_dma")?;
    ensure!(
        out.vmm_log
            .contains("IOMMU_OPTION_HUGE_PAGES set, reads back 1"),
        "the VMM did not set HUGE_PAGES for hugetlbfs RAM; log: {}",
        tail(&out.vmm_log, 12)
    );
    println!("LAB-INFO L3 on hugetlbfs RAM, HUGE_PAGES on: edu DMA {dma}");
    Ok(Outcome::Pass)
}

/// `VmLck` of this process in kB (/proc/self/status).
fn vm_locked_kb() -> Result<u64, String> {
    let st = std::fs::read_to_string("/proc/self/status").map_err(s)?;
    st.lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or("no VmLck in /proc/self/status".to_string())
}

/// `struct __user_cap_header_struct` of linux/capability.h.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct` of linux/capability.h (two of them for version 3).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_VERSION_3: u32 = 0x2008_0522;
/// `CAP_IPC_LOCK`.
const CAP_IPC_LOCK: u32 = 14;

/// Sets or clears CAP_IPC_LOCK in this thread's effective set (capabilities are per thread).
/// iommufd charges nothing for a task that has it, so the accounting test drops it while it
/// maps.
fn set_ipc_lock(on: bool) -> Result<(), String> {
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes one header and two data structs, both owned here and laid out
    // as the kernel's.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    ensure!(rc == 0, "capget: {}", std::io::Error::last_os_error());
    if on {
        data[0].effective |= 1 << CAP_IPC_LOCK;
    } else {
        data[0].effective &= !(1 << CAP_IPC_LOCK);
    }
    // SAFETY: capset reads the header and two data structs, owned here.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    ensure!(rc == 0, "capset: {}", std::io::Error::last_os_error());
    Ok(())
}

/// `IOMMU_OPTION_RLIMIT_MODE`: per-process accounting set on open reads back and charges
/// the pages edu's domain pins to this process's locked memory (`VmLck`), which per-user
/// accounting does not; SET once an object exists is EBUSY. (A task with CAP_IPC_LOCK is
/// charged nothing in either mode, so the maps run with it dropped from this thread.)
fn iommufd_rlimit_mode_lab() -> TestResult {
    const BIG: usize = 64 * 4096;
    let mut deltas = Vec::new();
    for mode in [PinAccounting::Process, PinAccounting::User] {
        let f = EduFd::open(mode)?;
        let b = &f.backend;
        let got = b.pin_accounting().map_err(s)?;
        ensure!(got == mode, "RLIMIT_MODE reads back {got:?}, set {mode:?}");
        let ioas = b.ioas_alloc().map_err(s)?;
        b.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
        let buf = DmaBuf::new(BIG).map_err(s)?;
        set_ipc_lock(false)?;
        let before = vm_locked_kb();
        let mapped = map(&**b, ioas, Some(0x40_0000), &buf);
        let after = vm_locked_kb();
        let unmapped = b.ioas_unmap(ioas, 0x40_0000, BIG as u64).map_err(s);
        let back = vm_locked_kb();
        set_ipc_lock(true)?;
        mapped?;
        unmapped?;
        let (before, after, back) = (before?, after?, back?);
        deltas.push((
            mode,
            after as i64 - before as i64,
            back as i64 - before as i64,
        ));
        // The backend holds objects now: the kernel refuses to change the mode.
        let mut opt = iommufd_bindings::iommufd::iommu_option {
            option_id: iommufd_bindings::iommufd::iommufd_option_IOMMU_OPTION_RLIMIT_MODE,
            op: iommufd_bindings::iommufd::iommufd_option_ops_IOMMU_OPTION_OP_SET as u16,
            object_id: 0,
            val64: 0,
            ..Default::default()
        };
        let r = sys::option(&**b.iommufd(), &mut opt);
        ensure!(
            r == Err(ioasid::Errno(libc::EBUSY)),
            "RLIMIT_MODE SET with objects on the iommufd: {r:?}, want EBUSY"
        );
    }
    println!("LAB-INFO VmLck change (kB) on map / after unmap: {deltas:?}");
    let kb = (BIG / 1024) as i64;
    ensure!(
        deltas[0].1 == kb && deltas[0].2 == 0,
        "per-process accounting: VmLck moved by {} kB on a {kb} kB map and {} kB after unmap",
        deltas[0].1,
        deltas[0].2
    );
    ensure!(
        deltas[1].1 == 0,
        "per-user accounting moved this process's VmLck by {} kB",
        deltas[1].1
    );
    // The VMM with `--platform rlimit_mode=process`: set on open, read back, and an L3 guest's
    // edu DMA through that iommufd.
    let edu_dev = format!("path={},id=edu0", edu_path()?.display());
    let out = L3::start(
        "rlimit-process",
        &l3_cmdline("up,edu", ""),
        &[edu_dev],
        &["--platform", "iommufd=on,rlimit_mode=process"],
        super::l3_tests::L3_MEMORY,
        false,
    )?
    .finish(Duration::from_secs(240));
    let dma = out.result("edu_dma")?;
    ensure!(
        out.vmm_log
            .contains("(IOMMU_OPTION_RLIMIT_MODE reads back Process)"),
        "the VMM did not set per-process accounting: {}",
        tail(&out.vmm_log, 12)
    );
    ensure!(out.status == Some(0), "{}", out.describe_exit());
    println!("LAB-INFO L3 with rlimit_mode=process: edu DMA {dma}");
    Ok(Outcome::Pass)
}

/// 12 disjoint 1 MiB windows below edu's 28-bit DMA mask.
fn windows(n: u64, base: u64) -> Vec<IovaRange> {
    (0..n)
        .map(|i| IovaRange {
            start: base + i * 2 * MIB,
            last: base + i * 2 * MIB + MIB - 1,
        })
        .collect()
}

/// `IOMMU_TEST_OP_ADD_RESERVED` (iommufd_test.h): reserves an IOVA range in an IOAS.
const TEST_OP_ADD_RESERVED: u32 = 1;

fn add_reserved(
    b: &IommufdBackend,
    ioas: IoasId,
    start: u64,
    len: u64,
) -> Result<(), ioasid::Errno> {
    let mut c = sys::IommuTestCmd::new(TEST_OP_ADD_RESERVED, ioas.0);
    c.union[0] = start;
    c.union[1] = len;
    sys::test_cmd(&**b.iommufd(), &mut c)
}

/// `IOMMU_IOAS_ALLOW_IOVAS`: a range over a reserved region (VT-d's MSI window) is refused;
/// with 12 windows allowed, kernel-chosen maps land inside them and carry edu's DMA, a map
/// larger than every window gets ENOSPC, a fixed map ignores the allowed set, and an empty
/// set lifts the restriction. Then `IOMMU_IOAS_IOVA_RANGES` with 13 windows (12 ranges
/// reserved through the selftest's `ADD_RESERVED`, the only way userspace can cut an IOAS's
/// windows; allowed ranges are not reported by IOVA_RANGES): more than the 8 the wrapper
/// asks for first, so its EMSGSIZE retry runs; and a reservation inside an allowed window is
/// refused.
fn ioas_allow_iovas_lab() -> TestResult {
    let f = EduFd::open(PinAccounting::User)?;
    let b = &f.backend;
    let ioas = b.ioas_alloc().map_err(s)?;
    b.attach(f.dev, None, PtId::Ioas(ioas)).map_err(s)?;
    let msi = IovaRange {
        start: 0xfee0_0000,
        last: 0xfee0_0000 + MIB - 1,
    };
    let e = errno_of(b.allow_iovas(ioas, &[msi]))?;
    ensure!(
        e == libc::EADDRINUSE,
        "allowing the reserved MSI window: errno {e}, want EADDRINUSE"
    );
    let allowed = windows(12, 0x100_0000);
    b.allow_iovas(ioas, &allowed).map_err(s)?;
    let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
    let a = map(&**b, ioas, None, &src)?;
    let d = map(&**b, ioas, None, &dst)?;
    for iova in [a, d] {
        ensure!(
            inside(&allowed, iova, LEN as u64),
            "kernel-chosen IOVA {iova:#x} is outside the allowed windows"
        );
    }
    let edu = f.edu()?;
    round_trip(&edu, &src, &dst, 0x31, a, d)?;
    let big = DmaBuf::new(2 * MIB as usize).map_err(s)?;
    let map_big = || {
        // SAFETY: as in `map`; `big` outlives the IOAS (dropped after the backend's fd).
        unsafe {
            b.ioas_map(
                ioas,
                &MapUser {
                    iova: None,
                    user_va: big.va(),
                    len: big.len() as u64,
                    perm: Perm::RW,
                },
            )
        }
    };
    let e = errno_of(map_big())?;
    ensure!(
        e == libc::ENOSPC,
        "a 2 MiB kernel-chosen map with 1 MiB windows: errno {e}, want ENOSPC"
    );
    // A fixed IOVA outside the allowed set is the caller's choice: the set does not apply.
    let fixed = DmaBuf::new(LEN).map_err(s)?;
    map(&**b, ioas, Some(0x80_0000), &fixed)?;
    round_trip(&edu, &src, &fixed, 0x32, a, 0x80_0000)?;
    // An empty set lifts the restriction: the 2 MiB map now finds room.
    b.allow_iovas(ioas, &[]).map_err(s)?;
    let big_iova = map_big().map_err(s)?;
    ensure!(
        !allowed.iter().any(|r| r.contains(big_iova, 1)),
        "the 2 MiB map landed at {big_iova:#x}, inside a 1 MiB window"
    );

    // IOVA_RANGES with more than 8 windows, on an IOAS of its own.
    let cut = b.ioas_alloc().map_err(s)?;
    b.allow_iovas(cut, &windows(2, 0x100_0000)).map_err(s)?;
    let r = add_reserved(b, cut, 0x100_0000, MIB);
    ensure!(
        r == Err(ioasid::Errno(libc::EADDRINUSE)),
        "reserving inside an allowed window: {r:?}, want EADDRINUSE (no CONFIG_IOMMUFD_TEST?)"
    );
    b.allow_iovas(cut, &[]).map_err(s)?;
    let holes: Vec<(u64, u64)> = (1..=12u64).map(|i| (i * 0x1000_0000, MIB)).collect();
    for (start, len) in &holes {
        add_reserved(b, cut, *start, *len)
            .map_err(|e| format!("IOMMU_TEST_OP_ADD_RESERVED {start:#x}+{len:#x}: {e}"))?;
    }
    let got = b.iova_ranges(cut).map_err(s)?;
    let mut want = Vec::new();
    let mut next = 0u64;
    for (start, len) in &holes {
        want.push(IovaRange {
            start: next,
            last: start - 1,
        });
        next = start + len;
    }
    want.push(IovaRange {
        start: next,
        last: u64::MAX,
    });
    ensure!(
        got.ranges.len() == 13 && got.ranges[..12] == want[..12] && got.ranges[12].start == next,
        "IOVA_RANGES with 12 reserved holes: {:x?}, want {want:x?}",
        got.ranges
    );
    println!(
        "LAB-INFO kernel chose {a:#x} and {d:#x} in 12 allowed windows; 2 MiB: ENOSPC, then \
         {big_iova:#x} once unrestricted; MSI window: EADDRINUSE; IOVA_RANGES read {} windows \
         (EMSGSIZE retry), last {:x?}",
        got.ranges.len(),
        got.ranges.last()
    );
    Ok(Outcome::Pass)
}

/// A memfd of `len` bytes holding `data`, and a shared mapping of it for reading back.
struct Memfd {
    fd: std::fs::File,
}

impl Memfd {
    fn with(data: &[u8], len: usize) -> Result<Self, String> {
        use std::io::Write;
        let name = CString::new("type1-lab").map_err(s)?;
        // SAFETY: a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        ensure!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let mut fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        fd.set_len(len as u64).map_err(s)?;
        fd.write_all(data).map_err(s)?;
        Ok(Memfd { fd })
    }
}

/// The kernel-chosen forms of `IOMMU_IOAS_MAP`, `IOMMU_IOAS_MAP_FILE` and `IOMMU_IOAS_COPY`,
/// each against an IOAS with an allowed set: every IOVA the kernel writes back is inside
/// it, and edu's DMA through those IOVAs moves the right bytes.
fn ioas_kernel_chosen_iova_lab() -> TestResult {
    let f = EduFd::open(PinAccounting::User)?;
    let b = &f.backend;
    let a = b.ioas_alloc().map_err(s)?;
    let dst_ioas = b.ioas_alloc().map_err(s)?;
    let allowed_a = windows(3, 0x200_0000);
    let allowed_b = windows(2, 0x400_0000);
    b.allow_iovas(a, &allowed_a).map_err(s)?;
    b.allow_iovas(dst_ioas, &allowed_b).map_err(s)?;
    // IOAS_MAP, kernel-chosen, in A.
    let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
    let src_a = map(&**b, a, None, &src)?;
    let dst_a = map(&**b, a, None, &dst)?;
    // IOAS_MAP_FILE, kernel-chosen, in A.
    let file_data = pattern(0x44, LEN);
    let memfd = Memfd::with(&file_data, LEN)?;
    let file_a = b
        .ioas_map_file(
            a,
            &MapFile {
                iova: None,
                fd: std::os::fd::AsRawFd::as_raw_fd(&memfd.fd),
                start: 0,
                len: LEN as u64,
                perm: Perm::RW,
            },
        )
        .map_err(s)?;
    for (what, iova) in [("MAP", src_a), ("MAP", dst_a), ("MAP_FILE", file_a)] {
        ensure!(
            inside(&allowed_a, iova, LEN as u64),
            "{what} without an IOVA: the kernel chose {iova:#x}, outside A's windows {allowed_a:x?}"
        );
    }
    // IOAS_COPY, kernel-chosen destination, A -> B, of all three.
    let mut in_b = Vec::new();
    for from in [src_a, dst_a, file_a] {
        let to = b
            .ioas_copy(&CopyRequest {
                src: a,
                src_iova: from,
                dst: dst_ioas,
                dst_iova: None,
                len: LEN as u64,
                perm: Perm::RW,
            })
            .map_err(s)?;
        ensure!(
            inside(&allowed_b, to, LEN as u64),
            "COPY without a destination IOVA: the kernel chose {to:#x}, outside B's windows {allowed_b:x?}"
        );
        in_b.push(to);
    }
    let edu = f.edu()?;
    // DMA through A's kernel-chosen IOVAs, then through B's copies.
    b.attach(f.dev, None, PtId::Ioas(a)).map_err(s)?;
    round_trip(&edu, &src, &dst, 0x51, src_a, dst_a)?;
    dst.fill(0);
    edu.round_trip(file_a, dst_a, LEN as u32)?;
    check_bytes(&dst.read(0, LEN), &file_data)?;
    b.attach(f.dev, None, PtId::Ioas(dst_ioas)).map_err(s)?;
    round_trip(&edu, &src, &dst, 0x52, in_b[0], in_b[1])?;
    dst.fill(0);
    edu.round_trip(in_b[2], in_b[1], LEN as u32)?;
    check_bytes(&dst.read(0, LEN), &file_data)?;
    println!(
        "LAB-INFO A {}: MAP chose {src_a:#x}, {dst_a:#x}, MAP_FILE chose {file_a:#x}; COPY into \
         B {} chose {:x?}; edu DMA through both matches",
        a.0, dst_ioas.0, in_b
    );
    Ok(Outcome::Pass)
}

/// An explicit paging HWPT (`IOMMU_HWPT_ALLOC`, no flags) on an IOAS with edu attached to
/// its id: DMA through it, an unmap in the IOAS blocks DMA through it, it and its IOAS are
/// busy while in use; then the VMM with `--platform hwpt=explicit` under an L3 guest whose
/// edu DMA must read back its bytes, with the mtty mdev (no HWPT possible) beside it.
fn explicit_paging_hwpt_attach_lab() -> TestResult {
    let f = EduFd::open(PinAccounting::User)?;
    let b = &f.backend;
    let ioas = b.ioas_alloc().map_err(s)?;
    let (src, dst) = (DmaBuf::new(LEN).map_err(s)?, DmaBuf::new(LEN).map_err(s)?);
    map(&**b, ioas, Some(0x10_0000), &src)?;
    map(&**b, ioas, Some(0x20_0000), &dst)?;
    let hwpt = b
        .hwpt_alloc(&HwptAlloc {
            dev: f.dev,
            parent: PtId::Ioas(ioas),
            flags: HwptFlags::default(),
            fault: None,
            stage1: None,
        })
        .map_err(s)?;
    ensure!(hwpt.0 != ioas.0, "the HWPT got the IOAS's id {}", ioas.0);
    b.attach(f.dev, None, PtId::Hwpt(hwpt)).map_err(s)?;
    let edu = f.edu()?;
    round_trip(&edu, &src, &dst, 0x61, 0x10_0000, 0x20_0000)?;
    let e = errno_of(b.destroy(hwpt.0))?;
    ensure!(
        e == libc::EBUSY,
        "destroying the attached HWPT: errno {e}, want EBUSY"
    );
    let e = errno_of(b.destroy(ioas.0))?;
    ensure!(
        e == libc::EBUSY,
        "destroying the HWPT's IOAS: errno {e}, want EBUSY"
    );
    // The HWPT follows its IOAS: an unmap there blocks DMA through it.
    b.ioas_unmap(ioas, 0x20_0000, LEN as u64).map_err(s)?;
    dst.fill(0xee);
    edu.dma(crate::edu::EDU_BUF, 0x20_0000, LEN as u32, true)?;
    ensure!(
        dst.read(0, LEN).iter().all(|&x| x == 0xee),
        "the device wrote through the HWPT to an IOVA unmapped from its IOAS"
    );
    map(&**b, ioas, Some(0x20_0000), &dst)?;
    round_trip(&edu, &src, &dst, 0x62, 0x10_0000, 0x20_0000)?;
    // Back to the IOAS: the kernel attaches through its own HWPT, never ours.
    let auto = b.attach_ioas_reporting_hwpt(f.dev, ioas).map_err(s)?;
    ensure!(
        auto.is_some_and(|h| h != hwpt),
        "attaching to the IOAS reported {auto:?}, want a kernel HWPT other than {}",
        hwpt.0
    );
    round_trip(&edu, &src, &dst, 0x63, 0x10_0000, 0x20_0000)?;
    b.destroy(hwpt.0).map_err(s)?;
    println!(
        "LAB-INFO explicit paging HWPT {} on IOAS {}: DMA ok, unmap blocks, busy while used; \
         kernel HWPT {:?} after re-attach to the IOAS",
        hwpt.0, ioas.0, auto
    );
    drop(edu);
    let devices = [
        format!("path={},id=edu0", edu_path()?.display()),
        format!("path={},id=mtty0", super::env::mtty_path()?.display()),
    ];
    drop(f);
    let out = L3::start(
        "hwpt-explicit",
        &l3_cmdline("up,edu,mtty", ""),
        &devices,
        &["--platform", "iommufd=on,hwpt=explicit"],
        super::l3_tests::L3_MEMORY,
        false,
    )?
    .finish(Duration::from_secs(240));
    let dma = out.result("edu_dma")?;
    let msi = out.result("edu_msi")?;
    // The mdev has no IOMMU, so no HWPT: it reaches the IOAS through an access either way.
    let mtty = out.result("mtty_echo")?;
    for want in [
        "(IOMMU_HWPT_ALLOC, hwpt=explicit)",
        "(IOMMU_IOAS_ALLOW_IOVAS)",
        "explicit paging HWPT",
    ] {
        ensure!(
            out.vmm_log.contains(want),
            "the VMM log lacks {want:?}: {}",
            tail(&out.vmm_log, 15)
        );
    }
    ensure!(out.status == Some(0), "{}", out.describe_exit());
    println!("LAB-INFO L3 with hwpt=explicit: edu DMA {dma}; MSI {msi}; mtty {mtty}");
    Ok(Outcome::Pass)
}

// ---- the VMM on type1 ----------------------------------------------------------------------

/// A private mount namespace for the VMM in which `/dev` is a tmpfs holding bind mounts of
/// every entry of the real `/dev` except `iommu`: the VMM sees a host without iommufd, with
/// the same paths for everything else (`/dev/vfio/N` stays `/dev/vfio/N` in its fd links).
struct HideIommu {
    root: CString,
    dev: CString,
    old: CString,
    tmpfs: CString,
    opts: CString,
    entries: Vec<Entry>,
}

enum Entry {
    /// A directory: mkdir, bind mount.
    Dir(CString, CString),
    /// A device node or file: create an empty file, bind mount.
    Node(CString, CString),
    /// A symlink: recreate it (target, path).
    Link(CString, CString),
}

const OLD_DEV: &str = "/tmp/type1-lab-olddev";

impl HideIommu {
    fn prepare() -> Result<Self, String> {
        std::fs::create_dir_all(OLD_DEV).map_err(|e| format!("{OLD_DEV}: {e}"))?;
        let c = |p: String| CString::new(p).map_err(s);
        let mut entries = Vec::new();
        for e in std::fs::read_dir("/dev").map_err(s)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "iommu" {
                continue;
            }
            let ft = e.file_type().map_err(s)?;
            let (old, new) = (format!("{OLD_DEV}/{name}"), format!("/dev/{name}"));
            entries.push(if ft.is_symlink() {
                let t = std::fs::read_link(e.path()).map_err(s)?;
                Entry::Link(c(t.to_string_lossy().into_owned())?, c(new)?)
            } else if ft.is_dir() {
                Entry::Dir(c(old)?, c(new)?)
            } else {
                Entry::Node(c(old)?, c(new)?)
            });
        }
        Ok(HideIommu {
            root: c("/".into())?,
            dev: c("/dev".into())?,
            old: c(OLD_DEV.into())?,
            tmpfs: c("tmpfs".into())?,
            opts: c("mode=0755".into())?,
            entries,
        })
    }

    /// Runs in the forked child before exec: only system calls, no allocation.
    fn apply(&self) -> std::io::Result<()> {
        let ok = |rc: libc::c_int| {
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: unshare takes a flag word and touches no memory of ours.
        ok(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
        // SAFETY: every pointer below is a NUL-terminated CString owned by `self` (alive for
        // the call) or null where mount(2) allows it; the calls only change this child's
        // private mount namespace. Making "/" private may fail on a rootfs without
        // propagation, which is harmless.
        unsafe {
            libc::mount(
                null,
                self.root.as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null.cast(),
            );
            ok(libc::mount(
                self.dev.as_ptr(),
                self.old.as_ptr(),
                null,
                libc::MS_BIND | libc::MS_REC,
                null.cast(),
            ))?;
            ok(libc::mount(
                self.tmpfs.as_ptr(),
                self.dev.as_ptr(),
                self.tmpfs.as_ptr(),
                0,
                self.opts.as_ptr().cast(),
            ))?;
        }
        for e in &self.entries {
            match e {
                Entry::Link(target, path) => {
                    // SAFETY: NUL-terminated CStrings owned by `self`; a system call only.
                    ok(unsafe { libc::symlink(target.as_ptr(), path.as_ptr()) })?
                }
                Entry::Dir(old, path) | Entry::Node(old, path) => {
                    if matches!(e, Entry::Dir(..)) {
                        // SAFETY: as above.
                        ok(unsafe { libc::mkdir(path.as_ptr(), 0o755) })?;
                    } else {
                        // SAFETY: as above; the new fd is closed at once.
                        let fd = unsafe {
                            libc::open(
                                path.as_ptr(),
                                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                                0o600,
                            )
                        };
                        ok(fd)?;
                        // SAFETY: `fd` was just opened by this code and is closed once.
                        unsafe { libc::close(fd) };
                    }
                    // SAFETY: as above.
                    ok(unsafe {
                        libc::mount(
                            old.as_ptr(),
                            path.as_ptr(),
                            null,
                            libc::MS_BIND | libc::MS_REC,
                            null.cast(),
                        )
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// An L3 guest under `ioasid-vmm` started with this module's options (RAM, a mount
/// namespace without `/dev/iommu`).
struct L3;

impl L3 {
    fn start(
        name: &str,
        cmdline: &str,
        devices: &[String],
        extra: &[&str],
        memory: &str,
        hide_iommu: bool,
    ) -> Result<L3Session, String> {
        l3_pieces()?;
        let serial = L3Session::serial_path(name);
        let _ = std::fs::remove_file(&serial);
        let mut c = Command::new(VMM_BIN);
        c.args([
            "--kernel",
            L3_KERNEL,
            "--initramfs",
            L3_INITRD,
            "--cmdline",
            cmdline,
        ])
        .args(["--memory", memory, "--cpus", &format!("boot={MAIN_CPUS}")])
        .arg("--serial")
        .arg(format!("file={}", serial.display()));
        for d in devices {
            c.arg("--device").arg(d);
        }
        c.args(extra).env("RUST_LOG", "info");
        if hide_iommu {
            let ns = HideIommu::prepare()?;
            // SAFETY: `apply` makes only async-signal-safe system calls on data prepared
            // before the fork (no allocation, no locks), as pre_exec requires.
            unsafe { c.pre_exec(move || ns.apply()) };
        }
        L3Session::spawn(name, c, serial)
    }
}

/// The VMM's open files (link targets of /proc/PID/fd), read by the kernel.
fn fd_targets(vm: &L3Session) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{}/fd", vm.pid()))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The VMM's VFIO files: the type1 container and edu's group open, no iommufd and no cdev.
fn check_type1_fds(fds: &[String], group: u32) -> Result<String, String> {
    let vfio: Vec<&String> = fds
        .iter()
        .filter(|t| t.contains("vfio") || t.contains("iommu"))
        .collect();
    ensure!(
        fds.iter().any(|t| t.ends_with("/vfio/vfio")),
        "no VFIO container (/dev/vfio/vfio) open in the VMM: {vfio:?}"
    );
    ensure!(
        fds.iter().any(|t| t.ends_with(&format!("/vfio/{group}"))),
        "edu's group /dev/vfio/{group} is not open in the VMM: {vfio:?}"
    );
    ensure!(
        !fds.iter()
            .any(|t| t.ends_with("/iommu") || t.contains("/vfio/devices/")),
        "the VMM has iommufd or a VFIO cdev open on type1: {vfio:?}"
    );
    Ok(format!("{vfio:?}"))
}

/// What the VMM logged about type1: RAM mapped by address, the group with KVM-VFIO.
fn check_type1_log(log: &str) -> Result<(), String> {
    for want in [
        "IOMMU backend type1 chosen",
        "(by host address)",
        "registered with the KVM-VFIO device",
    ] {
        ensure!(
            log.contains(want),
            "the VMM log lacks {want:?}: {}",
            tail(log, 15)
        );
    }
    ensure!(
        !log.contains("not registered with the KVM-VFIO device"),
        "the group was not registered with KVM-VFIO: {}",
        tail(log, 15)
    );
    Ok(())
}

fn edu_group() -> Result<u32, String> {
    sysfs::resolve(&edu_path()?)
        .map_err(s)?
        .group
        .ok_or("edu has no IOMMU group".to_string())
}

/// An L3 guest on `--platform iommufd=off`: edu hot-added over REST (type1 container, RAM
/// mapped by address, the group with KVM-VFIO), its MSI and a DMA round trip whose bytes
/// the guest checks, then hot-removed.
fn linux_guest_edu_type1() -> TestResult {
    ensure!(
        Path::new(REMOTE_BIN).exists(),
        "{REMOTE_BIN} is missing from the L2 initramfs"
    );
    let edu = edu_path()?;
    let group = edu_group()?;
    let sock = PathBuf::from("/tmp/l3-type1.sock");
    let _ = std::fs::remove_file(&sock);
    let sock_arg = sock.display().to_string();
    let mut vm = L3::start(
        "type1",
        &l3_cmdline("hotplug", ""),
        &[],
        &["--platform", "iommufd=off", "--api-socket", &sock_arg],
        super::l3_tests::L3_MEMORY,
        false,
    )?;
    if !vm.wait_serial("L3-READY hotplug", Duration::from_secs(120)) {
        let out = vm.finish(Duration::from_secs(1));
        return Err(format!(
            "the L3 guest never got ready for hotplug; {}",
            out.why(None)
        ));
    }
    let added = remote(
        &sock,
        &["add-device", &format!("path={},id=edu-t1", edu.display())],
    )?;
    ensure!(
        added.contains("edu-t1"),
        "add-device reply lacks the id: {added}"
    );
    let ready = vm.wait_serial("L3-READY unplug", Duration::from_secs(120));
    let fds = fd_targets(&vm);
    if ready {
        if let Err(e) = remote(&sock, &["remove-device", "edu-t1"]) {
            let out = vm.finish(Duration::from_secs(1));
            return Err(format!("{e}; {}", out.why(None)));
        }
    }
    let out = vm.finish(Duration::from_secs(150));
    for name in [
        "hotplug_added",
        "hotplug_sees_edu",
        "hotplug_edu_msi",
        "hotplug_edu_dma",
        "hotplug_removed",
    ] {
        let detail = out.result(name)?;
        println!("LAB-INFO {name}: {detail}");
    }
    let files = check_type1_fds(&fds, group)?;
    check_type1_log(&out.vmm_log)?;
    ensure!(
        out.vmm_log
            .contains("IOAS 1 destroyed; type1 backend closed")
            || out.vmm_log.contains("type1 backend closed"),
        "the container was not closed after the last device left: {}",
        tail(&out.vmm_log, 10)
    );
    ensure!(
        out.status == Some(0),
        "the guest passed every check but {}",
        out.describe_exit()
    );
    println!("LAB-INFO type1 VMM files while edu was assigned: {files}");
    Ok(Outcome::Pass)
}

/// `--platform iommufd=auto` in a mount namespace without `/dev/iommu`: the VMM logs at
/// info why it uses type1, and the L3 guest's edu MSI and DMA work through the container.
fn vmm_auto_falls_back_to_type1() -> TestResult {
    ensure!(
        Path::new("/dev/iommu").exists(),
        "/dev/iommu is absent in L2 already: the fallback would prove nothing"
    );
    let edu = edu_path()?;
    let group = edu_group()?;
    let mut vm = L3::start(
        "auto-type1",
        &l3_cmdline("up,edu", ""),
        &[format!("path={},id=edu0", edu.display())],
        &["--platform", "iommufd=auto"],
        super::l3_tests::L3_MEMORY,
        true,
    )?;
    let booted = vm.wait_serial("L3-INIT", Duration::from_secs(120));
    let fds = fd_targets(&vm);
    let out = vm.finish(Duration::from_secs(240));
    ensure!(
        booted,
        "the L3 guest never started its init; {}",
        out.why(None)
    );
    let seen = out.result("sees_edu")?;
    let msi = out.result("edu_msi")?;
    let dma = out.result("edu_dma")?;
    let reason = out
        .vmm_log
        .lines()
        .find(|l| l.contains("instead of iommufd"))
        .ok_or(format!(
            "the VMM logged no reason for leaving iommufd: {}",
            tail(&out.vmm_log, 15)
        ))?;
    ensure!(
        reason.contains("INFO") && reason.contains("/dev/iommu does not exist"),
        "the fallback's reason is not an info line naming /dev/iommu: {reason}"
    );
    let files = check_type1_fds(&fds, group)?;
    check_type1_log(&out.vmm_log)?;
    ensure!(out.status == Some(0), "{}", out.describe_exit());
    println!("LAB-INFO fallback: {}", reason.trim());
    println!("LAB-INFO L3 on auto->type1: {seen}; MSI {msi}; DMA {dma}; VMM files {files}");
    Ok(Outcome::Pass)
}
