//! Finding the host device a `DeviceConfig` names, and the KVM-VFIO pseudo device.
//!
//! A device is named by a sysfs path (`/sys/bus/pci/devices/<BDF>`,
//! `/sys/bus/mdev/devices/<UUID>`), by its VFIO cdev path (`/dev/vfio/devices/vfioN`), or by an
//! open cdev fd. The last two are traced back to their sysfs directory (through
//! `/sys/class/vfio-dev/vfioN/device`, or the fd's character device number) so that every
//! device has a name (BDF or UUID) for errors and for the "already assigned" check.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ioasid::{Bdf, DeviceName, DeviceSpec};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE,
    KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::{DeviceFd, VmFd};

pub use crate::config::CDEV_DIR;

/// What the user handed us, resolved.
#[derive(Debug)]
pub struct Source {
    /// The device's name (BDF, UUID, or the fd number when it cannot be traced).
    pub name: DeviceName,
    /// The sysfs description, when known (needed for type1 and for the backend choice).
    pub spec: Option<DeviceSpec>,
    /// An already-open cdev (fd passing).
    pub file: Option<File>,
    /// How the user named it, for messages.
    pub given: String,
}

/// The sysfs path (`/sys/bus/{pci,mdev}/devices/<name>`) of the device whose canonical
/// sysfs directory is `dir`.
fn bus_path(dir: &Path) -> Option<PathBuf> {
    let leaf = dir.file_name()?.to_str()?.to_string();
    if dir.join("mdev_type").exists() {
        return Some(PathBuf::from("/sys/bus/mdev/devices").join(leaf));
    }
    leaf.parse::<Bdf>()
        .ok()
        .map(|_| PathBuf::from("/sys/bus/pci/devices").join(leaf))
}

/// The sysfs path of the device behind the cdev named `vfioN`.
pub fn sysfs_of_cdev(cdev_name: &str) -> Result<PathBuf, String> {
    let link = Path::new("/sys/class/vfio-dev")
        .join(cdev_name)
        .join("device");
    let dir = std::fs::canonicalize(&link).map_err(|e| {
        format!(
            "cannot find its device in sysfs ({}: {e}); is the kernel built with \
             CONFIG_VFIO_DEVICE_CDEV and the device bound to a VFIO driver?",
            link.display()
        )
    })?;
    bus_path(&dir).ok_or_else(|| format!("{} is neither a PCI function nor an mdev", dir.display()))
}

/// The `vfioN` name of the VFIO cdev open as `fd`, from its character device number:
/// `Err` when the fd is certainly not a VFIO cdev, `Ok(None)` when sysfs cannot tell.
fn cdev_name_of_fd(fd: &File) -> Result<Option<String>, String> {
    let meta = fd
        .metadata()
        .map_err(|e| format!("fstat of the fd failed: {e}"))?;
    if meta.mode() & libc::S_IFMT != libc::S_IFCHR {
        return Err("it is not a character device (expected a VFIO cdev)".to_string());
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let link = PathBuf::from(format!("/sys/dev/char/{major}:{minor}"));
    let Ok(dir) = std::fs::canonicalize(&link) else {
        return Ok(None);
    };
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    if !name.starts_with("vfio") || !dir.to_string_lossy().contains("/vfio-dev/") {
        return Err(format!(
            "character device {major}:{minor} ({}) is not a VFIO cdev",
            dir.display()
        ));
    }
    Ok(Some(name))
}

/// Resolves a path: sysfs, or a cdev path traced back to sysfs.
pub fn resolve_path(path: &Path) -> Result<DeviceSpec, ioasid::Error> {
    if let Ok(rest) = path.strip_prefix(CDEV_DIR) {
        let name = rest.to_string_lossy().into_owned();
        let sysfs = sysfs_of_cdev(&name).map_err(|reason| ioasid::Error::DeviceNotFound {
            path: path.to_path_buf(),
            reason,
        })?;
        return ioasid::sysfs::resolve(&sysfs);
    }
    ioasid::sysfs::resolve(path)
}

/// Identifies the cdev open as `fd`. Fails (naming the fd number) when it is certainly not a
/// VFIO cdev; a cdev sysfs cannot trace is named by its fd number.
pub fn resolve_fd(fd: OwnedFd) -> Result<Source, String> {
    let number = fd.as_raw_fd();
    let file = File::from(fd);
    let name = cdev_name_of_fd(&file).map_err(|why| format!("cdev fd {number}: {why}"))?;
    let traced = name
        .ok_or_else(|| "its character device is unknown to sysfs".to_string())
        .and_then(|n| sysfs_of_cdev(&n))
        .and_then(|p| ioasid::sysfs::resolve(&p).map_err(|e| e.to_string()));
    Ok(match traced {
        Ok(spec) => Source {
            name: spec.name.clone(),
            given: format!("{} (cdev fd {number})", spec.name),
            spec: Some(spec),
            file: Some(file),
        },
        Err(why) => {
            log::info!("cdev fd {number}: device not identified in sysfs: {why}");
            Source {
                name: DeviceName::Fd(number),
                spec: None,
                file: Some(file),
                given: format!("cdev fd {number}"),
            }
        }
    })
}

/// The fd of `/dev/vfio/<group>` open in this process (the type1 backend opened it; the
/// group file can be open only once, so it is found rather than opened again).
pub fn find_group_fd(group: u32) -> Option<RawFd> {
    let want = PathBuf::from(format!("/dev/vfio/{group}"));
    std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_link(e.path()).ok().as_deref() == Some(want.as_path()))
        .and_then(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
}

/// The KVM-VFIO pseudo device (`KVM_DEV_TYPE_VFIO`): tells KVM which VFIO files (cdevs or
/// groups) the VM uses, for coherency and for architectures that need the association.
#[derive(Debug)]
pub struct KvmVfio {
    fd: DeviceFd,
}

impl KvmVfio {
    /// `KVM_CREATE_DEVICE(KVM_DEV_TYPE_VFIO)`.
    pub fn create(vm: &VmFd) -> Result<Self, kvm_ioctls::Error> {
        let mut dev = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        Ok(Self {
            fd: vm.create_device(&mut dev)?,
        })
    }

    fn file_attr(&self, fd: RawFd, attr: u32) -> Result<(), kvm_ioctls::Error> {
        let file = fd;
        let a = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: u64::from(attr),
            addr: &file as *const RawFd as u64,
        };
        // KVM reads the i32 at `addr` during the call; `file` outlives it.
        self.fd.set_device_attr(&a)
    }

    /// `KVM_DEV_VFIO_FILE_ADD`: KVM takes its own reference on the file.
    pub fn add(&self, fd: RawFd) -> Result<(), kvm_ioctls::Error> {
        self.file_attr(fd, KVM_DEV_VFIO_FILE_ADD)
    }

    /// `KVM_DEV_VFIO_FILE_DEL`: KVM drops its reference (needed before the file can close).
    pub fn del(&self, fd: RawFd) -> Result<(), kvm_ioctls::Error> {
        self.file_attr(fd, KVM_DEV_VFIO_FILE_DEL)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn cdev_path_without_sysfs_says_why() {
        let e = resolve_path(Path::new("/dev/vfio/devices/vfio97"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/vfio/devices/vfio97"), "{e}");
        assert!(e.contains("/sys/class/vfio-dev/vfio97/device"), "{e}");
    }

    #[test]
    fn non_vfio_fds_are_refused_by_number() {
        for path in ["/dev/null", "/proc/self/status"] {
            let f = File::open(path).unwrap();
            let n = f.as_raw_fd();
            let e = resolve_fd(OwnedFd::from(f)).unwrap_err();
            assert!(e.starts_with(&format!("cdev fd {n}: ")), "{path}: {e}");
            assert!(e.contains("not a"), "{path}: {e}");
        }
    }

    #[test]
    fn group_fd_lookup_misses_cleanly() {
        assert_eq!(find_group_fd(987_654), None);
    }
}
