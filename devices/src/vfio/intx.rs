//! INTx of the vfio-pci model: who unmasks the device's line after the guest EOIs it.
//!
//! VFIO masks a level-triggered INTx line each time it fires (`VFIO_IRQ_INFO_AUTOMASKED`;
//! mtty does the same since Linux 6.7) and fires nothing more until it is unmasked. The VMM's
//! irqfd keeps the guest's line asserted until the guest EOIs it, then deasserts it and
//! signals the resample eventfd. Three ways to close the loop, best first:
//!
//! - [`IntxUnmask::Kernel`]: VFIO takes the resample eventfd as its unmask eventfd
//!   (`VFIO_IRQ_SET_ACTION_UNMASK` + `DATA_EVENTFD`), so an EOI unmasks the device inside
//!   the kernel. vfio-pci does this.
//! - [`IntxUnmask::AfterEoi`]: the device refuses the unmask eventfd (mtty answers `ENOTTY`).
//!   The model unmasks it (`ACTION_UNMASK` + `DATA_NONE`) each time the resample eventfd
//!   reports an EOI: a small thread waits on it, and every trapped BAR access checks it first,
//!   so a guest register access right after an EOI never reaches a still-masked device (mtty
//!   drops what it would raise while masked).
//! - [`IntxUnmask::OnAccess`]: no resample eventfd (the VMM pulses the line): the model
//!   unmasks before every trapped BAR access, as QEMU does for INTx outside KVM.
//!
//! A device that does not mask ([`IntxUnmask::NotNeeded`]) needs none of it: the VMM's irqfd
//! deasserts the line at EOI by itself.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use super::backend::VfioRegions;

/// How the model's INTx line is unmasked after the guest EOIs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntxUnmask {
    /// VFIO unmasks on the resample eventfd, in the kernel.
    Kernel,
    /// The model unmasks after each EOI the resample eventfd reports.
    AfterEoi,
    /// The model unmasks before each trapped BAR access (no resample eventfd).
    OnAccess,
    /// The device does not mask its line.
    NotNeeded,
}

impl IntxUnmask {
    /// A short name for logs and introspection.
    pub fn name(self) -> &'static str {
        match self {
            IntxUnmask::Kernel => "unmask eventfd (in the kernel)",
            IntxUnmask::AfterEoi => "unmask by the VMM after each guest EOI",
            IntxUnmask::OnAccess => "unmask by the VMM before each trapped BAR access",
            IntxUnmask::NotNeeded => "no unmask (the device does not mask)",
        }
    }
}

/// True when `fd` is readable now.
fn readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, live for the call; a zero timeout does not block.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// State shared by the model and the resample thread.
struct Shared {
    device: String,
    regions: Arc<dyn VfioRegions>,
    resample: EventFd,
    armed: AtomicBool,
    unmasks: AtomicU64,
    /// Held across "did the guest EOI? then unmask", so the thread and a BAR access never
    /// split one EOI between them.
    lock: Mutex<()>,
}

impl Shared {
    fn unmask(&self) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        match self.regions.unmask_intx() {
            Ok(()) => {
                self.unmasks.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => debug!("{}: INTx unmask failed: {e}", self.device),
        }
    }

    /// Unmasks if the guest EOIed the line since the last call.
    fn service(&self) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if readable(self.resample.as_raw_fd()) && self.resample.read().is_ok() {
            self.unmask();
        }
    }
}

/// The part of the model's INTx that unmasks the device itself ([`IntxUnmask::AfterEoi`]
/// and [`IntxUnmask::OnAccess`]). Dropping it stops the thread.
pub(crate) struct IntxUnmasker {
    mode: IntxUnmask,
    shared: Option<Arc<Shared>>,
    stop: Option<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// [`IntxUnmask::OnAccess`]: the device, and whether the line is armed.
    on_access: Option<(Arc<dyn VfioRegions>, AtomicBool, AtomicU64)>,
}

impl IntxUnmasker {
    /// Nothing to do: the kernel unmasks, or the device does not mask.
    pub(crate) fn passive(mode: IntxUnmask) -> Self {
        Self {
            mode,
            shared: None,
            stop: None,
            thread: None,
            on_access: None,
        }
    }

    /// [`IntxUnmask::OnAccess`].
    pub(crate) fn on_access(regions: Arc<dyn VfioRegions>) -> Self {
        Self {
            mode: IntxUnmask::OnAccess,
            shared: None,
            stop: None,
            thread: None,
            on_access: Some((regions, AtomicBool::new(true), AtomicU64::new(0))),
        }
    }

    /// [`IntxUnmask::AfterEoi`] on `resample` (a duplicate of the VMM's resample eventfd).
    /// Starts the thread; if it cannot start, BAR accesses still check for EOIs.
    pub(crate) fn after_eoi(
        device: &str,
        regions: Arc<dyn VfioRegions>,
        resample: EventFd,
    ) -> Self {
        let shared = Arc::new(Shared {
            device: device.to_string(),
            regions,
            resample,
            armed: AtomicBool::new(true),
            unmasks: AtomicU64::new(0),
            lock: Mutex::new(()),
        });
        let mut me = Self {
            mode: IntxUnmask::AfterEoi,
            shared: Some(shared.clone()),
            stop: None,
            thread: None,
            on_access: None,
        };
        match Self::spawn(shared) {
            Ok((stop, thread)) => {
                me.stop = Some(stop);
                me.thread = Some(thread);
            }
            Err(e) => warn!(
                "{device}: cannot start the INTx resample thread ({e}); INTx is unmasked only \
                 on the guest's next BAR access after each EOI"
            ),
        }
        me
    }

    fn spawn(shared: Arc<Shared>) -> io::Result<(EventFd, JoinHandle<()>)> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop_fd = stop.try_clone()?;
        let name = format!("intx-{}", shared.device);
        let thread = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || loop {
                let mut fds = [
                    libc::pollfd {
                        fd: shared.resample.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: stop_fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds in a live array; the count matches its length.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    warn!("{}: INTx resample thread stops: {e}", shared.device);
                    return;
                }
                if fds[1].revents != 0 {
                    return;
                }
                if fds[0].revents & libc::POLLIN != 0 {
                    shared.service();
                }
            })?;
        Ok((stop, thread))
    }

    /// Which way the line is unmasked.
    pub(crate) fn mode(&self) -> IntxUnmask {
        self.mode
    }

    /// The line is armed (INTx on) or not (MSI/MSI-X on, or removal): unmasks only happen
    /// while armed.
    pub(crate) fn set_armed(&self, armed: bool) {
        if let Some(s) = &self.shared {
            s.armed.store(armed, Ordering::Release);
        }
        if let Some((_, a, _)) = &self.on_access {
            a.store(armed, Ordering::Release);
        }
    }

    /// Called before each trapped BAR access.
    pub(crate) fn before_access(&self) {
        if let Some(s) = &self.shared {
            s.service();
        }
        if let Some((regions, armed, count)) = &self.on_access {
            if armed.load(Ordering::Acquire) && regions.unmask_intx().is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Unmasks the model issued so far.
    pub(crate) fn unmasks(&self) -> u64 {
        self.shared
            .as_ref()
            .map(|s| s.unmasks.load(Ordering::Relaxed))
            .or_else(|| {
                self.on_access
                    .as_ref()
                    .map(|(_, _, c)| c.load(Ordering::Relaxed))
            })
            .unwrap_or(0)
    }
}

impl Drop for IntxUnmasker {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            s.armed.store(false, Ordering::Release);
        }
        if let Some(stop) = &self.stop {
            if let Err(e) = stop.write(1) {
                warn!("cannot stop the INTx resample thread: {e}");
                return;
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
