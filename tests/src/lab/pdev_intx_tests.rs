//! INTx of an assigned device on a real kernel, through the host [`VfioRegions`]
//! implementation the vfio-pci model uses: the no-data `VFIO_IRQ_SET_ACTION_UNMASK` the
//! model falls back to when a device refuses the resample eventfd (`unmask_intx`).

use std::sync::Arc;
use std::time::Duration;

use devices::vfio::backend::{CONFIG_REGION, INTX_IRQ};
use devices::vfio::VfioRegions;
use vmm_sys_util::eventfd::EventFd;

use crate::ensure;
use crate::harness::{LabTest, Outcome, TestResult};

use super::pdev_fixture::*;

/// The tests of this module.
pub fn tests() -> Vec<LabTest> {
    vec![LabTest {
        name: "pdev_intx_unmask_without_eventfd",
        run: pdev_intx_unmask_without_eventfd,
    }]
}

/// How long an interrupt edu raised may take to reach the eventfd (L2 runs under TCG).
const FIRE: Duration = Duration::from_secs(5);
/// How long a masked line is watched for a signal that must not come. A kernel that failed
/// to mask would deliver within microseconds; the window only bounds the wait.
const QUIET: Duration = Duration::from_millis(500);

/// Reads the eventfd's count (it is non-blocking): 0 when it was not signalled.
fn take(fd: &EventFd) -> Result<u64, String> {
    match fd.read() {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(format!("read of the INTx trigger eventfd: {e}")),
    }
}

/// edu with MSI off raises INTx; VFIO signals the trigger eventfd and masks the line
/// (level INTx is auto-masked); a second raise stays silent while masked; after the guest's
/// ack and a no-data UNMASK, the next raise signals again.
fn pdev_intx_unmask_without_eventfd() -> TestResult {
    let a = Assigned::edu(Kind::Iommufd, None, Arc::default())?;
    let edu = a.bring_up()?;
    let m = &a.m;
    // Through the trait: `VfioDevice`'s inherent methods of the same names differ.
    let vfio: &dyn VfioRegions = &*a.vfio;

    // MSI stays off, so edu signals on its INTx pin (QEMU edu: `pci_set_irq` unless MSI).
    let cap = m
        .find_cap(EDU_SLOT, 0x05)?
        .ok_or("edu's MSI capability is not in the guest's capability list")?;
    let ctrl = m.cfg_read(EDU_SLOT, cap + 2, 2)?;
    ensure!(ctrl & 1 == 0, "edu's MSI is enabled ({ctrl:#06x})");
    let mut pin = [0u8; 1];
    vfio.region_read(CONFIG_REGION, 0x3d, &mut pin)
        .map_err(|e| format!("read of edu's interrupt pin through VFIO: {e}"))?;
    let pin = pin[0];
    ensure!(pin != 0, "edu reports no INTx pin in its real config space");
    let info = vfio
        .irq_info(INTX_IRQ)
        .ok_or("VFIO reports no INTx interrupt index for edu")?;
    ensure!(
        info.count == 1 && info.eventfd,
        "VFIO INTx info {info:?}: want one vector that signals an eventfd"
    );
    ensure!(
        info.automasked,
        "VFIO INTx info {info:?}: want the line auto-masked after each trigger"
    );
    println!("  edu INTx pin {pin}, VFIO INTx {info:?}");

    // A clean line, then the trigger eventfd and no resample eventfd.
    edu.write32(EDU_IRQ_ACK, u32::MAX)?;
    let trigger = EventFd::new(libc::EFD_NONBLOCK).map_err(s)?;
    vfio.enable_irq(INTX_IRQ, &[&trigger])
        .map_err(|e| format!("VFIO_DEVICE_SET_IRQS INTx trigger: {e}"))?;
    let result = exercise(&edu, vfio, &trigger);
    let off = vfio.disable_irq(INTX_IRQ);
    edu.write32(EDU_IRQ_ACK, u32::MAX)?;
    result?;
    off.map_err(|e| format!("VFIO_DEVICE_SET_IRQS INTx off: {e}"))?;
    Ok(Outcome::Pass)
}

fn exercise(edu: &EduBus<'_>, vfio: &dyn VfioRegions, trigger: &EventFd) -> Result<(), String> {
    ensure!(
        !wait_readable(trigger, Duration::ZERO)?,
        "the INTx eventfd was signalled before edu raised anything"
    );

    // 1. The first raise fires once.
    edu.write32(EDU_IRQ_RAISE, 1)?;
    ensure!(
        wait_readable(trigger, FIRE)?,
        "edu raised INTx (status {:#x}) and the eventfd was not signalled within {FIRE:?}",
        edu.read32(EDU_IRQ_STATUS)?
    );
    let n = take(trigger)?;
    ensure!(n == 1, "INTx eventfd count {n} after one raise, want 1");

    // 2. The kernel masked the line: a second raise (edu keeps the level asserted and ORs
    //    the status) signals nothing.
    edu.write32(EDU_IRQ_RAISE, 2)?;
    let status = edu.read32(EDU_IRQ_STATUS)?;
    ensure!(
        status == 3,
        "edu status {status:#x} after raising 1 and 2, want 0x3"
    );
    ensure!(
        !wait_readable(trigger, QUIET)?,
        "the INTx eventfd was signalled again while VFIO had the line masked (count {})",
        take(trigger)?
    );

    // 3. The guest acks (edu deasserts), the VMM unmasks with no data: still quiet, as the
    //    line is low.
    edu.write32(EDU_IRQ_ACK, status)?;
    let status = edu.read32(EDU_IRQ_STATUS)?;
    ensure!(status == 0, "edu status {status:#x} after the ack, want 0");
    vfio.unmask_intx()
        .map_err(|e| format!("VFIO_DEVICE_SET_IRQS INTx UNMASK without data: {e}"))?;
    ensure!(
        !wait_readable(trigger, QUIET)?,
        "the INTx eventfd was signalled after the unmask with edu's line low (count {})",
        take(trigger)?
    );

    // 4. The next raise reaches the eventfd again: the unmask took effect.
    edu.write32(EDU_IRQ_RAISE, 4)?;
    ensure!(
        wait_readable(trigger, FIRE)?,
        "edu raised INTx after the no-data UNMASK (status {:#x}) and the eventfd was not \
         signalled within {FIRE:?}",
        edu.read32(EDU_IRQ_STATUS)?
    );
    let n = take(trigger)?;
    ensure!(
        n == 1,
        "INTx eventfd count {n} after the raise past the unmask, want 1"
    );
    let status = edu.read32(EDU_IRQ_STATUS)?;
    ensure!(
        status == 4,
        "edu status {status:#x} after raising 4, want 0x4"
    );
    edu.write32(EDU_IRQ_ACK, status)?;
    Ok(())
}
