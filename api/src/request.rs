//! The messages the API server sends the VMM, and the VMM-side helpers to answer them.
//!
//! The server thread validates a request, wraps it in an [`ApiRequest`] carrying a
//! [`Responder`] (a `std::sync::mpsc::Sender` for the reply), sends it on the channel given
//! to [`crate::start_server`] and writes the `EventFd`. The VMM's event loop polls that
//! eventfd, drains the channel ([`ApiReceiver::drain`]) and answers each request exactly once
//! ([`Responder::send`] or [`ApiRequest::fail`]). Replies are typed per request, so a VMM
//! cannot answer `Ping` with a `VmInfo`.
//!
//! **Withdrawal.** Each [`Responder`] carries a ticket: `Pending`, then `Taken` by the VMM or
//! `Withdrawn`. [`ApiReceiver::drain`] hands the VMM only the requests it could take, and
//! takes none whose server-side deadline has passed or whose server is stopping: those are
//! exactly the requests the server answers 503, so a request answered 503 for a timeout or a
//! stop never runs later. A VMM that receives requests another way calls
//! [`ApiRequest::take`] before executing one and drops it when that returns `false`.

use std::cell::RefCell;
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device_config::DeviceConfig;
use crate::error::ApiError;
use crate::types::{
    IoasidsInfo, IommuInfo, PasidsInfo, PciDeviceInfo, VmCounters, VmInfo, VmmPingResponse,
};
use crate::vm_config::VmConfig;

/// The result the VMM sends back for one request.
pub type ApiResult<T> = Result<T, ApiError>;

const PENDING: u8 = 0;
const TAKEN: u8 = 1;
const WITHDRAWN: u8 = 2;

/// What the server thread tells the responders it creates: when the server gives up on a
/// request, and whether it is stopping.
struct ServerContext {
    reply_timeout: Duration,
    stopping: Arc<AtomicBool>,
}

thread_local! {
    static SERVER_CONTEXT: RefCell<Option<ServerContext>> = const { RefCell::new(None) };
}

/// Called once on the server thread: responders created there get a deadline `reply_timeout`
/// from their creation (the dispatcher's own deadline starts later, after the send) and
/// follow `stopping`.
pub(crate) fn set_server_context(reply_timeout: Duration, stopping: Arc<AtomicBool>) {
    SERVER_CONTEXT.with(|c| {
        *c.borrow_mut() = Some(ServerContext {
            reply_timeout,
            stopping,
        })
    });
}

/// Whether the VMM may still execute a request.
struct Ticket {
    state: AtomicU8,
    /// After this the server answers 503; the VMM must not take the request.
    deadline: Option<Instant>,
    stopping: Option<Arc<AtomicBool>>,
}

impl Ticket {
    fn new() -> Ticket {
        SERVER_CONTEXT.with(|c| match &*c.borrow() {
            Some(ctx) => Ticket {
                state: AtomicU8::new(PENDING),
                deadline: Instant::now().checked_add(ctx.reply_timeout),
                stopping: Some(Arc::clone(&ctx.stopping)),
            },
            None => Ticket {
                state: AtomicU8::new(PENDING),
                deadline: None,
                stopping: None,
            },
        })
    }

    fn take(&self) -> bool {
        let expired = self.deadline.is_some_and(|d| Instant::now() >= d)
            || self
                .stopping
                .as_ref()
                .is_some_and(|s| s.load(Ordering::SeqCst));
        let next = if expired { WITHDRAWN } else { TAKEN };
        match self
            .state
            .compare_exchange(PENDING, next, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => next == TAKEN,
            Err(current) => current == TAKEN,
        }
    }
}

/// The server's handle on a request's ticket, from [`Responder::pair_tracked`].
pub struct TicketHandle(Arc<Ticket>);

impl TicketHandle {
    /// Withdraws the request unless the VMM has taken it: `true` when it is (now or
    /// already) withdrawn and will never run, so a 503 is truthful; `false` when the VMM is
    /// executing it and the server should keep waiting for its answer.
    pub fn withdraw(&self) -> bool {
        match self
            .0
            .state
            .compare_exchange(PENDING, WITHDRAWN, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => true,
            Err(current) => current == WITHDRAWN,
        }
    }

    /// Whether the VMM has taken the request.
    pub fn taken(&self) -> bool {
        self.0.state.load(Ordering::SeqCst) == TAKEN
    }
}

/// The reply half of one request. Consumed by [`Responder::send`], so each request is
/// answered once; dropping it unanswered makes the server reply 503.
pub struct Responder<T>(Sender<ApiResult<T>>, Arc<Ticket>);

impl<T> Responder<T> {
    /// A responder and the receiver the server waits on. Created on the server thread, it
    /// carries the server's deadline (see the module documentation).
    pub fn pair() -> (Responder<T>, Receiver<ApiResult<T>>) {
        let (tx, rx) = mpsc::channel();
        (Responder(tx, Arc::new(Ticket::new())), rx)
    }

    /// [`Responder::pair`] plus the server's handle on the ticket, for a dispatcher that
    /// withdraws a request before answering 503 ([`TicketHandle::withdraw`]) and keeps
    /// waiting for one the VMM has taken.
    pub fn pair_tracked() -> (Responder<T>, Receiver<ApiResult<T>>, TicketHandle) {
        let (responder, rx) = Responder::pair();
        let handle = TicketHandle(Arc::clone(&responder.1));
        (responder, rx, handle)
    }

    /// Sends the reply. If the server stopped waiting (timeout, shutdown) the reply is
    /// dropped with a warning.
    pub fn send(self, result: ApiResult<T>) {
        if self.0.send(result).is_err() {
            warn!("API reply dropped: the API server no longer waits for it");
        }
    }

    /// Takes the request for execution: `false` when the server has given up on it (its
    /// client got, or is getting, 503), in which case it must not run.
    pub fn take(&self) -> bool {
        self.1.take()
    }
}

impl<T> fmt::Debug for Responder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Responder")
    }
}

/// One API request for the VMM.
#[derive(Debug)]
pub enum ApiRequest {
    /// `GET /api/v1/vmm.ping`.
    Ping(Responder<VmmPingResponse>),
    /// `GET /api/v1/vm.info`.
    VmInfo(Responder<VmInfo>),
    /// `PUT /api/v1/vm.create`: store the configuration (parsed; its values are the VMM's to
    /// check). The VM is built at `vm.boot`.
    VmCreate {
        /// The configuration.
        config: Box<VmConfig>,
        /// Reply.
        reply: Responder<()>,
    },
    /// `PUT /api/v1/vm.boot`.
    VmBoot(Responder<()>),
    /// `PUT /api/v1/vm.pause`.
    VmPause(Responder<()>),
    /// `PUT /api/v1/vm.resume`.
    VmResume(Responder<()>),
    /// `PUT /api/v1/vm.reboot`.
    VmReboot(Responder<()>),
    /// `PUT /api/v1/vm.delete`.
    VmDelete(Responder<()>),
    /// `PUT /api/v1/vm.add-device`. `config` is validated ([`DeviceConfig::validate_with_fd`]):
    /// exactly one of `config.path` and `fd` is set, and `config.fd` is `None` (the number a
    /// client put in the body means nothing in this process; the fd itself is `fd`).
    AddDevice {
        /// The device.
        config: DeviceConfig,
        /// The VFIO cdev fd the client passed with `SCM_RIGHTS`, close-on-exec.
        fd: Option<OwnedFd>,
        /// Reply: the device's id and guest BDF (200), or `None` when the VM is created but
        /// not booted and the device was added to its configuration (204, as Cloud
        /// Hypervisor answers a cold add).
        reply: Responder<Option<PciDeviceInfo>>,
    },
    /// `PUT /api/v1/vm.remove-device`; `id` is a well-formed device id.
    RemoveDevice {
        /// The device id.
        id: String,
        /// Reply: `NotFound` for an unknown id.
        reply: Responder<()>,
    },
    /// `PUT /api/v1/vm.shutdown`: stop the VM; the VMM and its API stay.
    VmShutdown(Responder<()>),
    /// `PUT /api/v1/vmm.shutdown`. Reply first, then call
    /// [`crate::ServerHandle::stop`] before exiting so the reply reaches the client.
    VmmShutdown(Responder<()>),
    /// `GET /api/v1/vm.iommu`.
    Iommu(Responder<IommuInfo>),
    /// `GET /api/v1/vm.ioasids`.
    Ioasids(Responder<IoasidsInfo>),
    /// `GET /api/v1/vm.pasids`.
    Pasids(Responder<PasidsInfo>),
    /// `GET /api/v1/vm.counters`.
    Counters(Responder<VmCounters>),
}

impl ApiRequest {
    /// A short name for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ApiRequest::Ping(_) => "vmm.ping",
            ApiRequest::VmInfo(_) => "vm.info",
            ApiRequest::VmCreate { .. } => "vm.create",
            ApiRequest::VmBoot(_) => "vm.boot",
            ApiRequest::VmPause(_) => "vm.pause",
            ApiRequest::VmResume(_) => "vm.resume",
            ApiRequest::VmReboot(_) => "vm.reboot",
            ApiRequest::VmDelete(_) => "vm.delete",
            ApiRequest::AddDevice { .. } => "vm.add-device",
            ApiRequest::RemoveDevice { .. } => "vm.remove-device",
            ApiRequest::VmShutdown(_) => "vm.shutdown",
            ApiRequest::VmmShutdown(_) => "vmm.shutdown",
            ApiRequest::Iommu(_) => "vm.iommu",
            ApiRequest::Ioasids(_) => "vm.ioasids",
            ApiRequest::Pasids(_) => "vm.pasids",
            ApiRequest::Counters(_) => "vm.counters",
        }
    }

    /// Takes the request for execution (see the module documentation): `false` when the
    /// server has withdrawn it (deadline passed or server stopping); then drop it unexecuted.
    /// [`ApiReceiver::drain`] already does this. Taking twice returns `true` again.
    pub fn take(&self) -> bool {
        match self {
            ApiRequest::Ping(r) => r.take(),
            ApiRequest::VmInfo(r) => r.take(),
            ApiRequest::AddDevice { reply, .. } => reply.take(),
            ApiRequest::RemoveDevice { reply, .. } => reply.take(),
            ApiRequest::VmCreate { reply, .. } => reply.take(),
            ApiRequest::VmShutdown(r)
            | ApiRequest::VmmShutdown(r)
            | ApiRequest::VmBoot(r)
            | ApiRequest::VmPause(r)
            | ApiRequest::VmResume(r)
            | ApiRequest::VmReboot(r)
            | ApiRequest::VmDelete(r) => r.take(),
            ApiRequest::Iommu(r) => r.take(),
            ApiRequest::Ioasids(r) => r.take(),
            ApiRequest::Pasids(r) => r.take(),
            ApiRequest::Counters(r) => r.take(),
        }
    }

    /// Answers the request, whatever it is, with `error` (e.g. "VM not created").
    pub fn fail(self, error: ApiError) {
        match self {
            ApiRequest::Ping(r) => r.send(Err(error)),
            ApiRequest::VmInfo(r) => r.send(Err(error)),
            ApiRequest::AddDevice { reply, .. } => reply.send(Err(error)),
            ApiRequest::RemoveDevice { reply, .. } => reply.send(Err(error)),
            ApiRequest::VmCreate { reply, .. } => reply.send(Err(error)),
            ApiRequest::VmShutdown(r)
            | ApiRequest::VmmShutdown(r)
            | ApiRequest::VmBoot(r)
            | ApiRequest::VmPause(r)
            | ApiRequest::VmResume(r)
            | ApiRequest::VmReboot(r)
            | ApiRequest::VmDelete(r) => r.send(Err(error)),
            ApiRequest::Iommu(r) => r.send(Err(error)),
            ApiRequest::Ioasids(r) => r.send(Err(error)),
            ApiRequest::Pasids(r) => r.send(Err(error)),
            ApiRequest::Counters(r) => r.send(Err(error)),
        }
    }
}

/// The VMM's end of the API channel: the receiver and the eventfd to poll.
pub struct ApiReceiver {
    rx: Receiver<ApiRequest>,
    evt: EventFd,
}

/// What [`ApiReceiver::new`] returns: the VMM's end, plus the sender and eventfd to pass to
/// [`crate::start_server`].
pub type ApiChannel = (ApiReceiver, Sender<ApiRequest>, EventFd);

impl ApiReceiver {
    /// Creates the channel and a non-blocking eventfd.
    pub fn new() -> io::Result<ApiChannel> {
        let evt = EventFd::new(EFD_NONBLOCK)?;
        let server_evt = evt.try_clone()?;
        let (tx, rx) = mpsc::channel();
        Ok((ApiReceiver { rx, evt }, tx, server_evt))
    }

    /// The eventfd to add to the VMM's epoll set (readable when requests are queued).
    pub fn event_fd(&self) -> &EventFd {
        &self.evt
    }

    /// Clears the eventfd and returns every queued request the VMM may still execute,
    /// oldest first, each taken ([`ApiRequest::take`]). Requests the server withdrew (its
    /// client was answered 503) are dropped here, with a warning. Never blocks.
    pub fn drain(&self) -> Vec<ApiRequest> {
        // A spurious wake-up reads EAGAIN; the channel is the source of truth either way.
        let _ = self.evt.read();
        self.rx
            .try_iter()
            .filter(|r| {
                let taken = r.take();
                if !taken {
                    warn!(
                        "API request {} withdrawn: its client was answered 503 (timeout or \
                         stop); not executed",
                        r.name()
                    );
                }
                taken
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ticket_take_and_withdraw_exclude_each_other() {
        let (r, _rx, h) = Responder::<()>::pair_tracked();
        assert!(r.take());
        assert!(!h.withdraw(), "a taken request cannot be withdrawn");
        assert!(h.taken());
        let (r, _rx, h) = Responder::<()>::pair_tracked();
        assert!(h.withdraw());
        assert!(!r.take(), "a withdrawn request cannot be taken");
        assert!(h.withdraw());
    }

    #[test]
    fn drain_skips_requests_past_the_server_deadline() {
        let stopping = Arc::new(AtomicBool::new(false));
        let (receiver, tx, evt) = ApiReceiver::new().unwrap();
        set_server_context(Duration::ZERO, Arc::clone(&stopping));
        let (late, late_rx) = Responder::pair();
        set_server_context(Duration::from_secs(60), Arc::clone(&stopping));
        let (fresh, _fresh_rx) = Responder::pair();
        tx.send(ApiRequest::Ping(late)).unwrap();
        tx.send(ApiRequest::VmBoot(fresh)).unwrap();
        evt.write(1).unwrap();
        let got: Vec<&str> = receiver.drain().iter().map(|r| r.name()).collect();
        assert_eq!(got, vec!["vm.boot"]);
        // The withdrawn request was dropped unanswered.
        assert!(late_rx.try_recv().is_err());
        // A stopping server's requests are not taken either.
        let (r, _rx) = Responder::<()>::pair();
        stopping.store(true, Ordering::SeqCst);
        assert!(!r.take());
    }
}
