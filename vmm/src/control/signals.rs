//! SIGTERM and SIGINT as an eventfd the control loop polls: the handler only writes the
//! eventfd (async-signal-safe), and the loop then shuts the VM down, which releases its
//! devices, and stops the API server, which removes its socket.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The eventfd the handler writes, or -1 before [`install`].
static SIGNAL_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signo: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let fd = SIGNAL_EVENT_FD.load(Ordering::SeqCst);
    if fd < 0 {
        return;
    }
    let v = u64::try_from(signo).unwrap_or(1).max(1);
    // SAFETY: write(2) is async-signal-safe; `v` is a valid 8-byte buffer for the call, and
    // `fd` is an eventfd that [`Signals`] keeps open for the rest of the process.
    unsafe {
        libc::write(fd, std::ptr::addr_of!(v).cast(), std::mem::size_of::<u64>());
    }
}

/// The termination signals, as an eventfd readable once one arrived.
#[derive(Debug)]
pub struct Signals {
    evt: EventFd,
}

/// Routes SIGTERM and SIGINT to the returned eventfd (once per process: a second call
/// replaces the first's eventfd).
pub fn install() -> io::Result<Signals> {
    let evt = EventFd::new(EFD_NONBLOCK)?;
    // The handler's copy: never closed, so the handler never writes to a reused number.
    let handler_copy = evt.try_clone()?;
    SIGNAL_EVENT_FD.store(handler_copy.as_raw_fd(), Ordering::SeqCst);
    std::mem::forget(handler_copy);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        vmm_sys_util::signal::register_signal_handler(sig, on_signal)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(Signals { evt })
}

impl Signals {
    /// The eventfd to poll.
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// The signal that arrived (the last one written), clearing the eventfd.
    pub fn take(&self) -> Option<libc::c_int> {
        // An eventfd adds up the values written; a single signal is the common case, and two
        // are reported as their sum's meaning "a termination signal".
        self.evt.read().ok().map(|v| {
            libc::c_int::try_from(v)
                .ok()
                .filter(|s| *s == libc::SIGTERM || *s == libc::SIGINT)
                .unwrap_or(libc::SIGTERM)
        })
    }
}

/// The name of a termination signal.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        _ => "SIGTERM",
    }
}
