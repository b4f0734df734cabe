//! The checks the L3 guest runs, by task name (`ioasid-guest TASK...`).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::noiommu::{NoiommuDevice, MSI_IRQ_INDEX};
use super::pagemap::{PinnedPage, PAGE};
use super::{pci, report};
use crate::edu::{Edu, EDU_IDENT};

/// edu's PCI IDs.
pub const EDU_IDS: (u16, u16) = (0x1234, 0x11e8);
/// mtty's PCI IDs.
pub const MTTY_IDS: (u16, u16) = (0x4348, 0x3253);

/// Waits until `fd` is readable or `ms` pass; true when readable.
fn poll_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, live for the call.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// `up`: the guest reached userspace.
pub fn up() -> Result<String, String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    Ok(format!(
        "kernel {} cpus {} online {} {mem}",
        release.trim(),
        cpu_count(online.trim()),
        online.trim()
    ))
}

/// How many CPUs a kernel CPU list ("0-1,3") names.
fn cpu_count(list: &str) -> usize {
    list.split(',')
        .filter(|r| !r.is_empty())
        .map(|r| match r.split_once('-') {
            Some((a, b)) => match (a.parse::<usize>(), b.parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => usize::from(r.parse::<usize>().is_ok()),
        })
        .sum()
}

/// The one edu function the guest sees.
pub fn edu_bdf() -> Result<String, String> {
    let found = pci::find(EDU_IDS.0, EDU_IDS.1);
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err("no 1234:11e8 function in /sys/bus/pci/devices".into()),
        many => Err(format!("{} edu functions: {many:?}", many.len())),
    }
}

/// `sees_edu`: 1234:11e8 with a 1 MiB memory BAR0.
fn sees_edu(bdf: &str) -> Result<String, String> {
    let (start, size, flags) = pci::bar(bdf, 0)?;
    if size != 1 << 20 {
        return Err(format!("{bdf}: BAR0 is {size:#x} bytes, edu's is 1 MiB"));
    }
    if flags & 0x200 == 0 {
        return Err(format!("{bdf}: BAR0 flags {flags:#x} lack IORESOURCE_MEM"));
    }
    Ok(format!("bdf={bdf} bar0={start:#x}+{size:#x}"))
}

/// Opens edu through vfio-pci no-IOMMU, enables memory and bus mastering, maps BAR0.
fn open_edu(bdf: &str) -> Result<(NoiommuDevice, Edu), String> {
    pci::bind_vfio(bdf)?;
    let dev = NoiommuDevice::open(bdf)?;
    let mut cmd = [0u8; 2];
    dev.config_read(4, &mut cmd)?;
    let want = u16::from_le_bytes(cmd) | 0x6;
    dev.config_write(4, &want.to_le_bytes())?;
    let bar0 = dev.region(0)?;
    let edu = Edu::map_region(dev.fd(), bar0.offset, bar0.size)?;
    let ident = edu.read32(0);
    if ident != EDU_IDENT {
        return Err(format!(
            "{bdf}: ident register {ident:#x}, want {EDU_IDENT:#x}"
        ));
    }
    edu.write32(4, 0x1234_5678);
    let live = edu.read32(4);
    if live != !0x1234_5678u32 {
        return Err(format!(
            "{bdf}: liveness register gave {live:#x}, want {:#x}",
            !0x1234_5678u32
        ));
    }
    Ok((dev, edu))
}

/// `edu_msi`: edu raises an interrupt; the MSI arrives through L2's irqfd route.
fn edu_msi(dev: &NoiommuDevice, edu: &Edu) -> Result<String, String> {
    let efd = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    dev.set_irq_eventfd(MSI_IRQ_INDEX, &efd)?;
    edu.write32(0x60, 0x5a);
    let got = poll_readable(efd.as_raw_fd(), 5000);
    let status = edu.read32(0x24);
    edu.write32(0x64, status);
    if !got {
        return Err(format!(
            "no MSI within 5 s after raising (edu interrupt status {status:#x})"
        ));
    }
    let n = efd.read().map_err(|e| format!("eventfd read: {e}"))?;
    Ok(format!("{n} interrupt(s), status {status:#x}"))
}

/// `edu_dma`: a RAM -> edu -> RAM round trip with guest-physical addresses.
fn edu_dma(edu: &Edu) -> Result<String, String> {
    let mut src = PinnedPage::new()?;
    let dst = PinnedPage::new()?;
    for (i, b) in src.bytes().iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(0x3c);
    }
    let want = src.bytes().to_vec();
    for p in [src.phys(), dst.phys()] {
        if p + PAGE as u64 > 1 << 28 {
            return Err(format!("page at GPA {p:#x} is above edu's 28-bit DMA mask"));
        }
    }
    edu.round_trip(src.phys(), dst.phys(), PAGE as u32)?;
    let got = dst.read_volatile();
    if let Some(i) = (0..PAGE).find(|&i| got[i] != want[i]) {
        return Err(format!(
            "byte {i} at GPA {:#x} is {:#04x}, want {:#04x} (src GPA {:#x})",
            dst.phys() + i as u64,
            got[i],
            want[i],
            src.phys()
        ));
    }
    Ok(format!(
        "{PAGE} bytes GPA {:#x} -> edu -> GPA {:#x}",
        src.phys(),
        dst.phys()
    ))
}

/// `edu`: sees_edu, edu_msi and edu_dma, each reported.
pub fn edu_all(prefix: &str) {
    let bdf = match edu_bdf() {
        Ok(b) => b,
        Err(e) => {
            for n in ["sees_edu", "edu_msi", "edu_dma"] {
                report(&format!("{prefix}{n}"), &Err(e.clone()));
            }
            return;
        }
    };
    report(&format!("{prefix}sees_edu"), &sees_edu(&bdf));
    match open_edu(&bdf) {
        Ok((dev, edu)) => {
            report(&format!("{prefix}edu_msi"), &edu_msi(&dev, &edu));
            report(&format!("{prefix}edu_dma"), &edu_dma(&edu));
        }
        Err(e) => {
            report(&format!("{prefix}edu_msi"), &Err(e.clone()));
            report(&format!("{prefix}edu_dma"), &Err(e));
        }
    }
}

/// `mtty`: the first mtty port echoes through the mdev (the sample loops TX back to RX).
pub fn mtty_echo() -> Result<String, String> {
    let found = pci::find(MTTY_IDS.0, MTTY_IDS.1);
    let bdf = found
        .first()
        .ok_or("no 4348:3253 (mtty) function in /sys/bus/pci/devices")?;
    if pci::driver(bdf).is_none() {
        // Ask the 8250 PCI driver ("serial") explicitly, so a probe failure shows its errno.
        if let Err(e) = std::fs::write("/sys/bus/pci/drivers/serial/bind", bdf) {
            return Err(format!(
                "{bdf}: no driver bound, and binding it to 8250_pci (\"serial\") failed: {e}; {}",
                pci::describe(bdf)
            ));
        }
    }
    let tty = pci::ttys_of(bdf)?.into_iter().next().ok_or(format!(
        "{bdf}: no ttyS* under it in /sys/class/tty (driver: {:?}); {}",
        pci::driver(bdf),
        pci::describe(bdf)
    ))?;
    let path = format!("/dev/{tty}");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&path)
        .map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: termios is plain data; tcgetattr fills it for a valid tty fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and a live termios.
    if unsafe { libc::tcgetattr(f.as_raw_fd(), &mut t) } != 0 {
        return Err(format!(
            "tcgetattr {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: cfmakeraw only edits the struct.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: valid fd and a live termios.
    if unsafe { libc::tcsetattr(f.as_raw_fd(), libc::TCSANOW, &t) } != 0 {
        return Err(format!(
            "tcsetattr {path}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // Under 16 bytes: mtty's loopback ring holds 16, and a full ring reads as empty in its
    // LSR while its IIR says data is waiting (a sample-driver quirk, the same under any VMM).
    let msg = b"ioasid-mtty-ok";
    f.write_all(msg).map_err(|e| format!("write {path}: {e}"))?;
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while got.len() < msg.len() && std::time::Instant::now() < deadline {
        if poll_readable(f.as_raw_fd(), 200) {
            let mut buf = [0u8; 64];
            match f.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(format!("read {path}: {e}")),
            }
        }
    }
    if got != msg {
        return Err(format!(
            "{path} ({bdf}) echoed {:?}, want {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(msg)
        ));
    }
    Ok(format!("{path} on {bdf} echoed {} bytes", msg.len()))
}

/// `hotplug`: announces readiness, waits for edu to be hot-added, checks it, then waits for
/// it to be hot-removed.
pub fn hotplug() {
    println!("L3-READY hotplug");
    let seen = pci::wait_for(EDU_IDS.0, EDU_IDS.1, true, Duration::from_secs(180));
    if seen.is_empty() {
        report(
            "hotplug_added",
            &Err("edu did not appear within 180 s".into()),
        );
        return;
    }
    report("hotplug_added", &Ok(format!("edu at {}", seen.join(","))));
    edu_all("hotplug_");
    println!("L3-READY unplug");
    let left = pci::wait_for(EDU_IDS.0, EDU_IDS.1, false, Duration::from_secs(180));
    report(
        "hotplug_removed",
        &if left.is_empty() {
            Ok("edu is gone from /sys/bus/pci/devices".into())
        } else {
            Err(format!("edu still present after 180 s: {left:?}"))
        },
    );
}
