//! Linux direct boot: bzImage (64-bit boot protocol with a zero page) and ELF vmlinux (PVH
//! entry with `hvm_start_info`, or the 64-bit protocol when the ELF has no PVH note).
//!
//! References: Documentation/arch/x86/boot.rst (64-bit boot protocol, zero page fields),
//! the Xen PVH ABI (start info, memory map), and linux-loader 0.14's loaders.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::regs::{self, RegsError};
use super::{BootEntry, EntryMode};
use crate::layout::{
    BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIGH_RAM_START, HIMEM_START,
    MEM_32BIT_HOLE_START, PCI_ECAM_SIZE, PCI_ECAM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::memory::GuestRam;

/// E820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type: reserved.
pub const E820_RESERVED: u32 = 2;

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// setup_header.xloadflags: the kernel has the 64-bit entry at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point from the bzImage load address.
const STARTUP_64_OFFSET: u64 = 0x200;
/// initrd_addr_max to assume for old kernels that do not report it.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors of Linux boot preparation.
#[derive(Debug, Error)]
pub enum LinuxBootError {
    /// A kernel or initramfs file could not be read.
    #[error("Cannot read {what} {path}")]
    Open {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// linux-loader rejected the kernel image.
    #[error("Cannot load kernel {path} as {format}: {detail}")]
    Load {
        /// The kernel file.
        path: PathBuf,
        /// "bzImage" or "ELF".
        format: &'static str,
        /// linux-loader's error.
        detail: String,
    },
    /// The bzImage has no 64-bit entry point.
    #[error(
        "Kernel {path} has no 64-bit entry point (xloadflags {xloadflags:#x} lacks XLF_KERNEL_64)"
    )]
    No64BitEntry {
        /// The kernel file.
        path: PathBuf,
        /// The header's xloadflags.
        xloadflags: u16,
    },
    /// The command line is invalid or too long.
    #[error("Invalid kernel command line ({len} bytes, at most {max}): {detail}")]
    Cmdline {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
        /// Why.
        detail: String,
    },
    /// Guest RAM is too small for the boot layout.
    #[error("Guest RAM ends at {low_end:#x}, below {needed:#x} needed for {what}")]
    TooLittleRam {
        /// End of low RAM.
        low_end: u64,
        /// What does not fit.
        what: &'static str,
        /// The address needed.
        needed: u64,
    },
    /// The initramfs does not fit in low RAM above the kernel.
    #[error(
        "Initramfs of {size:#x} bytes does not fit between the kernel end {kernel_end:#x} and {max:#x}"
    )]
    InitramfsTooLarge {
        /// Its size.
        size: u64,
        /// End of the kernel image.
        kernel_end: u64,
        /// Highest usable address.
        max: u64,
    },
    /// Writing into guest memory failed.
    #[error("Cannot write {what} into guest memory at {gpa:#x}")]
    Write {
        /// What was written.
        what: &'static str,
        /// Where.
        gpa: u64,
        /// Details.
        detail: String,
    },
    /// Boot CPU structures (GDT, page tables) could not be written.
    #[error("Cannot write the boot CPU structures")]
    Regs(#[from] RegsError),
    /// More memory map entries than the zero page holds.
    #[error("The memory map has {n} entries; the zero page holds {max}")]
    TooManyE820 {
        /// Entries.
        n: usize,
        /// The limit.
        max: usize,
    },
}

/// What to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBootConfig {
    /// bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Address of the ACPI RSDP, when ACPI tables were written.
    pub rsdp: Option<u64>,
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The guest memory map for `ram`: low RAM below the EBDA, the BIOS area (ACPI tables)
/// reserved, RAM from 1 MiB to the hole, the ECAM window reserved, and RAM above 4 GiB.
pub fn e820_map(ram: &GuestRam) -> Vec<E820Entry> {
    e820_for_ranges(
        &ram.regions()
            .iter()
            .map(|r| (r.gpa, r.size))
            .collect::<Vec<_>>(),
    )
}

/// [`e820_map`] from raw `(gpa, size)` RAM ranges.
pub fn e820_for_ranges(ranges: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut v = Vec::new();
    for &(gpa, size) in ranges {
        let end = gpa + size;
        if gpa < MEM_32BIT_HOLE_START {
            v.push(E820Entry {
                addr: gpa,
                size: EBDA_START.min(end) - gpa,
                kind: E820_RAM,
            });
            if end > HIMEM_START {
                v.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820_RAM,
                });
            }
        } else if gpa >= HIGH_RAM_START {
            v.push(E820Entry {
                addr: gpa,
                size,
                kind: E820_RAM,
            });
        }
    }
    // The legacy BIOS area, where the ACPI tables live.
    v.push(E820Entry {
        addr: EBDA_START,
        size: HIMEM_START - EBDA_START,
        kind: E820_RESERVED,
    });
    v.push(E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820_RESERVED,
    });
    v.sort_by_key(|e| e.addr);
    v
}

fn open(what: &'static str, path: &Path) -> Result<File, LinuxBootError> {
    File::open(path).map_err(|source| LinuxBootError::Open {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn is_elf(file: &mut File, path: &Path) -> Result<bool, LinuxBootError> {
    let mut magic = [0u8; 4];
    let n = file
        .read(&mut magic)
        .map_err(|source| LinuxBootError::Open {
            what: "kernel",
            path: path.to_path_buf(),
            source,
        })?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

fn write_cmdline(ram: &GuestRam, cmdline: &str, max: usize) -> Result<u32, LinuxBootError> {
    let bad = |detail: String| LinuxBootError::Cmdline {
        len: cmdline.len(),
        max: max.saturating_sub(1),
        detail,
    };
    let cl = Cmdline::try_from(cmdline, max).map_err(|e| bad(e.to_string()))?;
    load_cmdline(ram.memory(), GuestAddress(CMDLINE_START), &cl).map_err(|e| {
        LinuxBootError::Write {
            what: "command line",
            gpa: CMDLINE_START,
            detail: e.to_string(),
        }
    })?;
    Ok((cmdline.len() + 1) as u32)
}

/// Loads `path` at the highest page-aligned address that keeps it below `max` (inclusive) and
/// above `kernel_end`. Returns `(gpa, size)`.
fn load_initramfs(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
    max: u64,
) -> Result<(u64, u64), LinuxBootError> {
    let mut f = open("initramfs", path)?;
    let size = f
        .metadata()
        .map_err(|source| LinuxBootError::Open {
            what: "initramfs",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let limit = max.min(ram.low_ram_end().saturating_sub(1));
    let too_large = LinuxBootError::InitramfsTooLarge {
        size,
        kernel_end,
        max: limit,
    };
    let top = limit
        .checked_add(1)
        .ok_or(LinuxBootError::InitramfsTooLarge {
            size,
            kernel_end,
            max: limit,
        })?;
    let addr = match top.checked_sub(size) {
        Some(a) => a & !0xfff,
        None => return Err(too_large),
    };
    if addr < kernel_end.next_multiple_of(0x1000) {
        return Err(too_large);
    }
    let len = usize::try_from(size).map_err(|_| LinuxBootError::InitramfsTooLarge {
        size,
        kernel_end,
        max: limit,
    })?;
    ram.memory()
        .read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| LinuxBootError::Write {
            what: "initramfs",
            gpa: addr,
            detail: e.to_string(),
        })?;
    Ok((addr, size))
}

/// Builds the zero page for a 64-bit boot-protocol entry.
pub fn build_zero_page(
    hdr: Option<setup_header>,
    cmdline_size: u32,
    initramfs: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: Option<u64>,
) -> Result<boot_params, LinuxBootError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(h) = hdr {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some((addr, size)) = initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    let max = params.e820_table.len();
    if e820.len() > max {
        return Err(LinuxBootError::TooManyE820 { n: e820.len(), max });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

fn write_zero_page(ram: &GuestRam, params: &boot_params) -> Result<(), LinuxBootError> {
    let bp = BootParams::new(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, ram.memory()).map_err(|e| LinuxBootError::Write {
        what: "zero page",
        gpa: ZERO_PAGE_START,
        detail: e.to_string(),
    })
}

fn check_ram(ram: &GuestRam) -> Result<(), LinuxBootError> {
    let needed = HIMEM_START + (16 << 20);
    if ram.low_ram_end() < needed {
        return Err(LinuxBootError::TooLittleRam {
            low_end: ram.low_ram_end(),
            what: "a Linux kernel",
            needed,
        });
    }
    Ok(())
}

fn long_mode_entry(rip: u64) -> BootEntry {
    BootEntry {
        mode: EntryMode::Long64,
        rip,
        rsp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        rbx: 0,
    }
}

/// Loads the kernel, command line and initramfs and writes the boot structures; returns how
/// the boot vCPU starts.
pub fn load_linux(ram: &GuestRam, cfg: &LinuxBootConfig) -> Result<BootEntry, LinuxBootError> {
    check_ram(ram)?;
    let mut kernel = open("kernel", &cfg.kernel)?;
    let elf = is_elf(&mut kernel, &cfg.kernel)?;
    let himem = Some(GuestAddress(HIMEM_START));
    regs::write_gdt_idt(ram.memory())?;
    regs::write_identity_page_tables(ram.memory())?;
    let e820 = e820_map(ram);

    if elf {
        let res = Elf::load(ram.memory(), None, &mut kernel, himem).map_err(|e| {
            LinuxBootError::Load {
                path: cfg.kernel.clone(),
                format: "ELF",
                detail: e.to_string(),
            }
        })?;
        let cmdline_size = write_cmdline(ram, &cfg.cmdline, CMDLINE_MAX_SIZE)?;
        let initrd = match &cfg.initramfs {
            Some(p) => Some(load_initramfs(
                ram,
                p,
                res.kernel_end,
                DEFAULT_INITRD_ADDR_MAX,
            )?),
            None => None,
        };
        if let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap {
            write_pvh_start_info(ram, &e820, initrd, cfg.rsdp)?;
            return Ok(BootEntry {
                mode: EntryMode::Protected32,
                rip: entry.0,
                rsp: 0,
                rsi: 0,
                rbx: PVH_INFO_START,
            });
        }
        // No PVH note: enter vmlinux's startup_64 (its ELF entry) with a zero page.
        log::info!(
            "Kernel {} has no PVH entry note; using the 64-bit boot protocol",
            cfg.kernel.display()
        );
        let zp = build_zero_page(None, cmdline_size, initrd, &e820, cfg.rsdp)?;
        write_zero_page(ram, &zp)?;
        return Ok(long_mode_entry(res.kernel_load.0));
    }

    let res = BzImage::load(ram.memory(), None, &mut kernel, himem).map_err(|e| {
        LinuxBootError::Load {
            path: cfg.kernel.clone(),
            format: "bzImage",
            detail: e.to_string(),
        }
    })?;
    let hdr = res.setup_header.unwrap_or_default();
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LinuxBootError::No64BitEntry {
            path: cfg.kernel.clone(),
            xloadflags: hdr.xloadflags,
        });
    }
    // Boot protocol >= 2.06 reports the command line limit (excluding the NUL).
    let max = if hdr.version >= 0x0206 && hdr.cmdline_size > 0 {
        (hdr.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE)
    } else {
        256
    };
    let cmdline_size = write_cmdline(ram, &cfg.cmdline, max)?;
    let initrd_max = if hdr.initrd_addr_max != 0 {
        u64::from(hdr.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    let initrd = match &cfg.initramfs {
        Some(p) => Some(load_initramfs(ram, p, res.kernel_end, initrd_max)?),
        None => None,
    };
    let zp = build_zero_page(Some(hdr), cmdline_size, initrd, &e820, cfg.rsdp)?;
    write_zero_page(ram, &zp)?;
    Ok(long_mode_entry(res.kernel_load.0 + STARTUP_64_OFFSET))
}

/// Builds the PVH start info, memory map and module list.
pub fn build_pvh(
    e820: &[E820Entry],
    initramfs: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, memmap, modules)
}

fn write_pvh_start_info(
    ram: &GuestRam,
    e820: &[E820Entry],
    initramfs: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> Result<(), LinuxBootError> {
    let (info, memmap, modules) = build_pvh(e820, initramfs, rsdp);
    let mut bp = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    bp.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&bp, ram.memory()).map_err(|e| {
        LinuxBootError::Write {
            what: "PVH start info",
            gpa: PVH_INFO_START,
            detail: e.to_string(),
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::memory::RamConfig;
    use std::io::Write;

    fn ram(size: u64) -> GuestRam {
        GuestRam::new(RamConfig {
            size,
            hugepages: false,
        })
        .unwrap()
    }

    #[test]
    fn e820_small_guest() {
        let m = e820_for_ranges(&[(0, 512 << 20)]);
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: EBDA_START,
                    size: HIMEM_START - EBDA_START,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: (512 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: PCI_ECAM_START,
                    size: PCI_ECAM_SIZE,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_respects_hole() {
        let m = e820_for_ranges(&crate::memory::ram_ranges(6 << 30));
        assert_eq!(m.len(), 5);
        assert_eq!(m[1].kind, E820_RESERVED);
        assert_eq!(m[2].addr + m[2].size, MEM_32BIT_HOLE_START);
        assert_eq!(m[3].kind, E820_RESERVED);
        assert_eq!((m[4].addr, m[4].size), (HIGH_RAM_START, 3 << 30));
        // Sorted and non-overlapping.
        for w in m.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:?}");
        }
        // No RAM entry overlaps the hole [3 GiB, 4 GiB).
        for e in m.iter().filter(|e| e.kind == E820_RAM) {
            let end = e.addr + e.size;
            assert!(
                end <= MEM_32BIT_HOLE_START || e.addr >= HIGH_RAM_START,
                "{e:?}"
            );
        }
    }

    #[test]
    fn zero_page_fields() {
        let hdr = setup_header {
            version: 0x020f,
            xloadflags: XLF_KERNEL_64,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        let e820 = e820_for_ranges(&[(0, 256 << 20)]);
        let zp = build_zero_page(
            Some(hdr),
            12,
            Some((0x0f00_0000, 0x1234)),
            &e820,
            Some(0xe_0000),
        )
        .unwrap();
        assert_eq!({ zp.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!({ zp.hdr.boot_flag }, 0xaa55);
        assert_eq!({ zp.hdr.header }, 0x5372_6448);
        assert_eq!({ zp.hdr.type_of_loader }, 0xff);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ zp.hdr.cmdline_size }, 12);
        assert_eq!({ zp.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ zp.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ zp.hdr.kernel_alignment }, 0x20_0000);
        assert_eq!(zp.e820_entries, 4);
        let e1 = zp.e820_table[2];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn pvh_start_info_fields() {
        let e820 = e820_for_ranges(&[(0, 256 << 20)]);
        let (info, memmap, mods) = build_pvh(&e820, Some((0x0800_0000, 0x4000)), Some(0xe_0000));
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.memmap_entries, 4);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(memmap[1].type_, E820_RESERVED);
        assert_eq!(memmap[3].type_, E820_RESERVED);
        assert_eq!((mods[0].paddr, mods[0].size), (0x0800_0000, 0x4000));
        // The memory map fits between the start info and the module list.
        assert!(PVH_MEMMAP_START + (memmap.len() as u64) * 24 <= PVH_MODLIST_START);
    }

    fn fake_bzimage(xloadflags: u16) -> Vec<u8> {
        // A minimal image: 4 setup sectors + boot sector, then a "kernel" payload.
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + 4096];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&KERNEL_HDR_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        let k = (setup_sects as usize + 1) * 512;
        img[k..k + 4].copy_from_slice(b"KERN");
        img
    }

    #[test]
    fn bzimage_boot_layout_in_guest_memory() {
        let dir = std::env::temp_dir().join(format!("vmm-linux-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kpath = dir.join("bzImage");
        std::fs::write(&kpath, fake_bzimage(XLF_KERNEL_64)).unwrap();
        let ipath = dir.join("initrd");
        let mut f = File::create(&ipath).unwrap();
        f.write_all(&[0x5a; 10000]).unwrap();
        drop(f);
        let ram = ram(64 << 20);
        let cfg = LinuxBootConfig {
            kernel: kpath.clone(),
            cmdline: "console=ttyS0 panic=-1".into(),
            initramfs: Some(ipath),
            rsdp: None,
        };
        let entry = load_linux(&ram, &cfg).unwrap();
        assert_eq!(entry.mode, EntryMode::Long64);
        assert_eq!(entry.rip, HIMEM_START + 0x200);
        assert_eq!(entry.rsi, ZERO_PAGE_START);
        let m = ram.memory();
        let mut k = [0u8; 4];
        m.read_slice(&mut k, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(&k, b"KERN");
        let zp: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.hdr.boot_flag }, 0xaa55);
        assert_eq!({ zp.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        let mut cl = vec![0u8; cfg.cmdline.len() + 1];
        m.read_slice(&mut cl, GuestAddress(CMDLINE_START)).unwrap();
        assert_eq!(&cl[..cfg.cmdline.len()], cfg.cmdline.as_bytes());
        assert_eq!(cl[cfg.cmdline.len()], 0);
        // The initramfs sits page-aligned at the top of RAM and holds the file's bytes.
        let (ri, rs) = (zp.hdr.ramdisk_image as u64, zp.hdr.ramdisk_size as u64);
        assert_eq!(rs, 10000);
        assert_eq!(ri % 4096, 0);
        assert!(ri + rs <= 64 << 20 && ri + rs + 4096 > 64 << 20);
        let b: u8 = m.read_obj(GuestAddress(ri + 9999)).unwrap();
        assert_eq!(b, 0x5a);
        assert!(zp.e820_entries >= 2);
        // Page tables are in place for the 64-bit entry.
        let pml4: u64 = m.read_obj(GuestAddress(crate::layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, crate::layout::PDPTE_START);

        // A kernel without a 64-bit entry is refused with the flag named.
        std::fs::write(&kpath, fake_bzimage(0)).unwrap();
        let e = load_linux(
            &ram,
            &LinuxBootConfig {
                initramfs: None,
                ..cfg.clone()
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("XLF_KERNEL_64"), "{e}");
        // A command line beyond the kernel's limit is refused.
        std::fs::write(&kpath, fake_bzimage(XLF_KERNEL_64)).unwrap();
        let long = "x".repeat(3000);
        let e = load_linux(
            &ram,
            &LinuxBootConfig {
                cmdline: long,
                initramfs: None,
                ..cfg
            },
        )
        .unwrap_err();
        assert!(matches!(e, LinuxBootError::Cmdline { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_kernel_names_path() {
        let ram = ram(64 << 20);
        let e = load_linux(
            &ram,
            &LinuxBootConfig {
                kernel: "/nonexistent/bzImage".into(),
                cmdline: String::new(),
                initramfs: None,
                rsdp: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/bzImage"), "{e}");
    }
}
