//! Devices on an iommufd: bind (`VFIO_DEVICE_BIND_IOMMUFD`), attach and detach, by RID or
//! PASID, to an IOAS or a HWPT (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`, which replaces hitlessly),
//! for VFIO cdevs and the selftest's mock devices; and `IOMMU_GET_HW_INFO`.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use iommufd_bindings::iommufd::iommu_hw_info;
use vfio_ioctls::VfioDevice;

use super::{errno_of, selftest, sys, Bound, IommufdBackend};
use crate::caps::HwCaps;
use crate::error::{Ctx, Errno, Error, Op, Result};
use crate::sysfs::DeviceSpec;
use crate::types::{DevId, DeviceName, HwptId, IoasId, Pasid, PtId};

/// The error of a failed RID attach of `name` to object `pt_id`, the same whichever call
/// issued it.
fn attach_error(name: &DeviceName, pt_id: u32, errno: Errno) -> Error {
    Error::kernel(Op::Attach, Ctx::device(name).with_object(pt_id), errno)
}

/// `IOMMU_TEST_OP_MOCK_DOMAIN_REPLACE` (iommufd_test.h); the kernel writes the attached
/// HWPT's id back into the op's `pt_id`.
const TEST_OP_MOCK_DOMAIN_REPLACE: u32 = 10;

/// What an attach to `ioas` that wrote back `pt_id` attached the device to.
fn reported_hwpt(ioas: IoasId, pt_id: u32) -> Option<HwptId> {
    (pt_id != ioas.0 && pt_id != 0).then_some(HwptId(pt_id))
}

impl IommufdBackend {
    /// Opens the device's cdev and binds it (`VFIO_DEVICE_BIND_IOMMUFD`), without attaching.
    pub fn bind(&self, spec: &DeviceSpec) -> Result<(DevId, Arc<VfioDevice>)> {
        let cdev = spec.cdev.as_ref().ok_or_else(|| Error::DeviceNotFound {
            path: spec.sysfs.clone(),
            reason: format!(
                "{} has no VFIO cdev (no vfio-dev/ in sysfs): the kernel lacks CONFIG_VFIO_DEVICE_CDEV; use the type1 backend",
                spec.name
            ),
        })?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(cdev)
            .map_err(|e| Error::kernel(Op::OpenDevice, Ctx::device(&spec.name), e))?;
        self.bind_file(file, spec.name.clone())
    }

    /// Binds an already-open cdev (fd passing).
    pub fn bind_file(&self, file: File, name: DeviceName) -> Result<(DevId, Arc<VfioDevice>)> {
        self.count();
        let devid = sys::device_bind_iommufd(&file, self.fd.as_raw_fd())
            .map_err(|e| Error::kernel(Op::BindIommufd, Ctx::device(&name), e))?;
        let dev = VfioDevice::new_from_bound_fd(file, self.vfio.clone(), false)
            .map_err(|e| Error::kernel(Op::GetDeviceInfo, Ctx::device(&name), errno_of(&e)))?;
        let dev = Arc::new(dev);
        let id = DevId(devid);
        self.lock_devices().insert(
            id,
            Bound::Vfio {
                dev: dev.clone(),
                name,
            },
        );
        Ok((id, dev))
    }

    /// Forgets a device (its fd closes when the last `Arc<VfioDevice>` drops, which unbinds it).
    pub fn unbind(&self, dev: DevId) {
        self.lock_devices().remove(&dev);
    }

    /// Registers a selftest mock device created by [`selftest::Selftest::mock_domain`].
    pub(crate) fn register_mock(&self, dev: DevId, stdev_id: u32) {
        self.lock_devices().insert(
            dev,
            Bound::Mock {
                stdev_id,
                name: DeviceName::Mock(stdev_id),
            },
        );
    }

    /// Attaches `dev` (RID, no PASID) to `ioas`, as
    /// [`IommuBackend::attach`](crate::backend::IommuBackend::attach) with
    /// [`PtId::Ioas`] does (same ioctl, same errors), and returns the HWPT the kernel attached
    /// it to: `VFIO_DEVICE_ATTACH_IOMMUFD_PT` writes back the id of the paging HWPT it found
    /// or created for the device over that IOAS. Devices whose IOMMUs are compatible share
    /// one; the kernel creates another for a device that cannot use the existing ones. The
    /// HWPT is the kernel's: it is destroyed when its last device detaches, never by us.
    ///
    /// `Ok(None)`: the kernel reported the IOAS id itself, meaning no HWPT is involved (an
    /// emulated device such as an mdev reaches the IOAS through an iommufd access).
    pub fn attach_ioas_reporting_hwpt(&self, dev: DevId, ioas: IoasId) -> Result<Option<HwptId>> {
        let bound = self.bound(dev, Op::Attach)?;
        self.count();
        let pt_id = match &bound {
            Bound::Vfio { dev: d, name } => {
                sys::device_attach_pt(&**d, ioas.0).map_err(|e| attach_error(name, ioas.0, e))?
            }
            Bound::Mock { stdev_id, name } => {
                let mut c = sys::IommuTestCmd::new(TEST_OP_MOCK_DOMAIN_REPLACE, *stdev_id);
                c.set_u32(0, ioas.0);
                sys::test_cmd(&*self.fd, &mut c).map_err(|e| attach_error(name, ioas.0, e))?;
                c.get_u32(0)
            }
        };
        Ok(reported_hwpt(ioas, pt_id))
    }

    /// `IOMMU_GET_HW_INFO`: the IOMMU capabilities of a bound device, before any attach.
    pub fn hw_info(&self, dev: DevId) -> Result<HwCaps> {
        let mut data = [0u8; 128];
        let mut info = iommu_hw_info {
            size: std::mem::size_of::<iommu_hw_info>() as u32,
            dev_id: dev.0,
            data_len: data.len() as u32,
            data_uptr: data.as_mut_ptr() as u64,
            ..Default::default()
        };
        self.count();
        match self.fd.get_hw_info(&mut info) {
            Ok(()) => {
                let len = (info.data_len as usize).min(data.len());
                // SAFETY: both union members are a plain u32; on success the kernel wrote
                // out_data_type, and any bit pattern is a valid u32.
                let data_type = unsafe { info.__bindgen_anon_1.out_data_type };
                Ok(HwCaps::decode(
                    data_type,
                    &data[..len],
                    info.out_capabilities,
                    info.out_max_pasid_log2,
                ))
            }
            Err(e) => {
                let errno = errno_of(&e);
                let name = self.dev_name(dev);
                if matches!(errno.0, libc::ENOENT | libc::EOPNOTSUPP | libc::ENODEV) {
                    let what = match &name {
                        Some(DeviceName::Mdev(_)) => {
                            "an mdev is emulated by its parent driver; no IOMMU translates its DMA"
                        }
                        _ => "the device has no IOMMU hardware info",
                    };
                    return Ok(HwCaps::none(format!("{what} (IOMMU_GET_HW_INFO: {errno})")));
                }
                Err(Error::kernel(Op::GetHwInfo, self.ctx_dev(dev), errno))
            }
        }
    }

    /// [`IommuBackend::attach`](crate::backend::IommuBackend::attach): RID or PASID, VFIO
    /// cdev or selftest mock.
    pub(super) fn attach_pt(&self, dev: DevId, pasid: Option<Pasid>, pt: PtId) -> Result<()> {
        let bound = self.bound(dev, Op::Attach)?;
        self.count();
        match (&bound, pasid) {
            (Bound::Vfio { dev: d, name }, None) => d
                .attach_hwpt(pt.raw())
                .map_err(|e| attach_error(name, pt.raw(), errno_of(&e))),
            (Bound::Vfio { dev: d, name }, Some(p)) => {
                d.attach_iommufd_pt_pasid(pt.raw(), p.0).map_err(|e| {
                    Error::kernel(
                        Op::AttachPasid,
                        Ctx::device(name).with_object(pt.raw()).pasid(p),
                        errno_of(&e),
                    )
                })
            }
            (Bound::Mock { stdev_id, name }, None) => {
                selftest::mock_domain_replace(&self.fd, *stdev_id, pt.raw())
                    .map_err(|e| attach_error(name, pt.raw(), e))
            }
            (Bound::Mock { stdev_id, name }, Some(p)) => {
                selftest::pasid_attach(&self.fd, *stdev_id, p.0, pt.raw()).map_err(|e| {
                    Error::kernel(
                        Op::AttachPasid,
                        Ctx::device(name).with_object(pt.raw()).pasid(p),
                        e,
                    )
                })
            }
        }
    }

    /// [`IommuBackend::detach`](crate::backend::IommuBackend::detach).
    pub(super) fn detach_pt(&self, dev: DevId, pasid: Option<Pasid>) -> Result<()> {
        let bound = self.bound(dev, Op::Detach)?;
        self.count();
        match (&bound, pasid) {
            (Bound::Vfio { dev: d, name }, None) => d
                .detach_hwpt()
                .map_err(|e| Error::kernel(Op::Detach, Ctx::device(name), errno_of(&e))),
            (Bound::Vfio { dev: d, name }, Some(p)) => {
                d.detach_iommufd_pt_pasid(p.0).map_err(|e| {
                    Error::kernel(Op::DetachPasid, Ctx::device(name).pasid(p), errno_of(&e))
                })
            }
            (Bound::Mock { name, .. }, None) => Err(Error::InvalidArgument {
                op: Op::Detach,
                ctx: Ctx::device(name),
                reason: "a mock device is always attached; replace its domain instead".to_string(),
            }),
            (Bound::Mock { stdev_id, name }, Some(p)) => {
                selftest::pasid_detach(&self.fd, *stdev_id, p.0)
                    .map_err(|e| Error::kernel(Op::DetachPasid, Ctx::device(name).pasid(p), e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    #[test]
    fn attach_reports_the_hwpt_only_when_the_kernel_names_one() {
        assert_eq!(reported_hwpt(IoasId(3), 7), Some(HwptId(7)));
        // An emulated device: the kernel echoes the IOAS id.
        assert_eq!(reported_hwpt(IoasId(3), 3), None);
        assert_eq!(reported_hwpt(IoasId(3), 0), None);
    }

    #[test]
    fn attach_errors_name_the_device_the_object_and_the_errno() {
        let name = DeviceName::Mock(4);
        let e = attach_error(&name, 9, Errno(libc::EINVAL));
        match &e {
            Error::Kernel { op, ctx, errno, .. } => {
                assert_eq!(*op, Op::Attach);
                assert_eq!(ctx.device.as_ref(), Some(&name));
                assert_eq!(ctx.object, Some(9));
                assert_eq!(*errno, Errno(libc::EINVAL));
            }
            other => panic!("not a kernel error: {other:?}"),
        }
        let text = e.to_string();
        assert!(text.contains("VFIO_DEVICE_ATTACH_IOMMUFD_PT"), "{text}");
        assert!(text.contains("EINVAL"), "{text}");
    }
}
