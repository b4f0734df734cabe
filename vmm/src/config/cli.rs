//! The command line as clap sees it (strings); [`super::VmConfig`] is the typed form.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The `ioasid-vmm` command line.
#[derive(Debug, Parser)]
#[command(
    name = "ioasid-vmm",
    version,
    about = "A KVM VMM with iommufd-based (\"/dev/ioasid\") device passthrough",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// A subcommand instead of running a VM.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// VM options.
    #[command(flatten)]
    pub vm: VmArgs,
}

/// Subcommands.
#[derive(Debug, Subcommand, PartialEq, Eq)]
pub enum Command {
    /// Report the IOMMU capabilities of a VFIO device (GET_HW_INFO and related).
    IommuInfo {
        /// The device: /dev/vfio/devices/vfioN, or a sysfs device path.
        #[arg(long)]
        device: PathBuf,
    },
}

/// The VM options as clap sees them (strings); see [`VmConfig`] for the typed form.
#[derive(Debug, Args, Default)]
pub struct VmArgs {
    /// Kernel image: bzImage, or an ELF vmlinux with a PVH note.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING")]
    pub cmdline: Option<String>,
    /// Initramfs image.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// vCPUs: boot=N, enqcmd=on|off|auto (offer ENQCMD, CPUID.7.0:ECX[29]; default auto).
    /// ENQCMD in a guest needs a CPU with ENQCMD and VT-x PASID translation, and a KVM that
    /// maps guest PASIDs to host PASIDs in it (a map/unmap ioctl) and reports a missing
    /// translation (an exit). No kernel offers that, so auto and off keep ENQCMD hidden and
    /// on fails at start. IA32_PASID (MSR 0xD93) is still virtualized (MSR filter) for
    /// shared work queue portals. See docs/ENQCMD.md.
    #[arg(long, value_name = "boot=<count>,enqcmd=on|off|auto")]
    pub cpus: Option<String>,
    /// Guest RAM: size=SIZE[,hugepages=on|off] (sizes like 512M, 2G).
    #[arg(long, value_name = "size=<size>,hugepages=on|off")]
    pub memory: Option<String>,
    /// A device (repeatable, or several values after one flag): path=PATH (sysfs device or
    /// VFIO cdev) or fd=FD (a VFIO cdev fd) for passthrough, or emulated=sva-copy (the SVA
    /// copy engine: PASID, ATS and PRI, DMA through the vIOMMU; needs iommu=on and
    /// --platform viommu=vtd,fsts=on,pasid-bits=20,svm=on) or emulated=swq (a shared work
    /// queue portal: each descriptor's PASID is the submitting vCPU's IA32_PASID translated
    /// to the host PASID, as ENQCMD would; needs iommu=on and --platform
    /// viommu=vtd,pasid-bits=20), iommu=on|off (put it
    /// behind the vIOMMU: the guest programs its DMA translation; needs --platform
    /// viommu=vtd), pasid=on|off (let the guest use PASIDs with it; needs iommu=on and
    /// pasid-bits; x_pasid_offset=OFF places the synthesized PASID/ATS/PRI capabilities),
    /// id=ID, pci_segment=N, pci_device_id=SLOT (0-31; devices behind the vIOMMU
    /// take the slots its DMAR scope reserves, 24-31, unless one is given at boot).
    #[arg(long, value_name = "path=..|fd=..|emulated=..,iommu=on|off,pasid=on|off,id=..", num_args = 1..)]
    pub device: Vec<String>,
    /// Platform: iommufd=on|off|auto (iommufd cdevs or the VFIO container; auto falls back
    /// to the container when /dev/iommu or the device's cdev is missing, and logs why),
    /// hwpt=auto|explicit (iommufd: attach devices to the guest-RAM IOAS and let the kernel
    /// pick the paging HWPT, or allocate one with IOMMU_HWPT_ALLOC and attach to it),
    /// rlimit_mode=user|process (iommufd: charge pinned guest RAM to the user's or to this
    /// process's RLIMIT_MEMLOCK, as the VFIO container does; process needs
    /// CAP_SYS_RESOURCE),
    /// iommu_address_width=BITS (vIOMMU guest address width, default 48; with viommu=vtd 39,
    /// 48 or 57; the DMAR's host address width is BITS-1), viommu=vtd|off (an emulated
    /// Intel VT-d that the guest programs itself). With viommu=vtd, QEMU's intel-iommu
    /// property names:
    /// scalable-mode=on|off (default on), fsts=on|off|auto (first-stage translation, ECAP.FSTS;
    /// auto: only where the host can honour it; on fails at start for a device behind the
    /// vIOMMU whose host IOMMU has no nesting, because Linux does not invalidate after
    /// first-stage maps and a shadow could not follow), pasid-bits=N (PASID width offered to
    /// the guest, 0-20, default 0 = none), svm=on|off (shared virtual addressing with page
    /// requests; needs pasid-bits and first stage).
    #[arg(long, value_name = "key=value,...")]
    pub platform: Option<String>,
    /// Serial console (COM1): tty, file=PATH[,max_size=BYTES] or off. Output never blocks
    /// the guest: what stdout or the file cannot take is dropped and counted; a file stops
    /// growing after max_size bytes from this run (default 64M; K, M, G suffixes).
    #[arg(long, value_name = "tty|file=<path>[,max_size=<bytes>]|off")]
    pub serial: Option<String>,
    /// REST API socket path.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Test aid: run a raw payload: FILE[,gpa=ADDR,mode=real|long,irqchip=on|off].
    #[arg(
        long,
        hide = true,
        value_name = "FILE[,gpa=..,mode=real|long,irqchip=on|off]"
    )]
    pub payload: Option<String>,
}
