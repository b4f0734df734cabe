//! The API server thread: accepts connections on the Unix socket, reads requests and their
//! `SCM_RIGHTS` fds with bounds (`conn`), hands each to the [`Dispatcher`] and
//! writes the replies.
//!
//! One thread, `poll(2)` over the listener, a stop eventfd and the connections. Requests are
//! handled one at a time, in order; the thread blocks while the VMM works on one. Every
//! connection has an idle and a request-completion timeout, and its fds, header bytes and
//! unsent replies are bounded; the fds held for unfinished requests are bounded over all
//! connections too. When the connection table is full, the least recently active
//! connection is dropped for the new one, so clients that never finish cannot lock others
//! out. `accept` failing with EMFILE/ENFILE pauses accepting with an exponential back-off.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::conn::{send_nosignal, Conn, FdOverflow, Limits};
use crate::dispatch::Dispatcher;
use crate::http::{HttpStatus, Reply};
use crate::listener::{bind_private, ListenerError};
use crate::request::{self, ApiRequest};

/// Largest request body accepted (dbs-uhttp's default, as Cloud Hypervisor uses).
pub const MAX_BODY_BYTES: usize = 51_200;

/// How long the server waits for the VMM to answer one request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Most simultaneous client connections.
pub const MAX_CONNECTIONS: usize = 32;

/// Most bytes of request line plus headers of one request.
pub const MAX_HEADER_BYTES: usize = 8192;

/// Most fds one request may carry (`vm.add-device` takes one).
pub const MAX_FDS_PER_REQUEST: usize = 4;

/// Most received fds held for unfinished requests, all connections together.
pub const MAX_FDS_TOTAL: usize = 32;

/// Unsent reply bytes after which the server stops reading a connection.
pub const MAX_REPLY_BUFFER: usize = 64 * 1024;

/// A connection with no request in progress and no bytes moving is closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A request must be complete this long after its first byte, or it gets 408.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest pause of `accept` after EMFILE/ENFILE.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// How long `stop` keeps trying to flush replies still queued.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// Tunables of the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest request body (bytes); larger requests get 413.
    pub max_body_bytes: usize,
    /// How long to wait for the VMM's answer; afterwards the client gets 503.
    pub reply_timeout: Duration,
    /// Most simultaneous connections; a new one beyond it replaces the least recently
    /// active.
    pub max_connections: usize,
    /// Most bytes of request line plus headers; more get 431 and the connection closes.
    pub max_header_bytes: usize,
    /// Most fds one request may carry; more get 400, the fds are closed at once.
    pub max_fds_per_request: usize,
    /// Most received fds held for unfinished requests over all connections; the request
    /// that goes over gets 429, its fds are closed at once.
    pub max_fds_total: usize,
    /// Unsent reply bytes after which a connection is not read until its client reads.
    pub max_reply_buffer: usize,
    /// Idle connections (and ones whose client does not read) are closed after this.
    pub idle_timeout: Duration,
    /// A request not complete this long after its first byte gets 408.
    pub request_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: MAX_BODY_BYTES,
            reply_timeout: REPLY_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            max_header_bytes: MAX_HEADER_BYTES,
            max_fds_per_request: MAX_FDS_PER_REQUEST,
            max_fds_total: MAX_FDS_TOTAL,
            max_reply_buffer: MAX_REPLY_BUFFER,
            idle_timeout: IDLE_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
        }
    }
}

/// Errors starting or stopping the server.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The socket could not be created.
    #[error(transparent)]
    Listener(#[from] ListenerError),
    /// The stop eventfd could not be created.
    #[error("Cannot create the API server's stop eventfd")]
    EventFd(#[source] io::Error),
    /// The thread could not be spawned.
    #[error("Cannot spawn the API server thread")]
    Spawn(#[source] io::Error),
    /// The thread could not be told to stop.
    #[error("Cannot signal the API server thread to stop")]
    Signal(#[source] io::Error),
    /// The thread panicked.
    #[error("The API server thread panicked")]
    Panicked,
}

/// A running server. Dropping it stops the thread and removes the socket file.
pub struct ServerHandle {
    path: PathBuf,
    stop_evt: EventFd,
    /// Set before `stop_evt` is written: the VMM then takes no request still queued.
    stopping: Arc<AtomicBool>,
    accept_failures: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many `accept` calls have failed for lack of fds (EMFILE, ENFILE, ENOBUFS,
    /// ENOMEM) since the start; with the back-off, a handful per second at most.
    pub fn accept_failures(&self) -> u64 {
        self.accept_failures.load(Ordering::Relaxed)
    }

    /// Stops the thread (after it writes the replies it has, for up to a second), joins it
    /// and removes the socket file.
    pub fn stop(mut self) -> Result<(), ServerError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), ServerError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stopping.store(true, Ordering::SeqCst);
        let signalled = self.stop_evt.write(1).map_err(ServerError::Signal);
        let joined = if signalled.is_ok() {
            thread.join().map_err(|_| ServerError::Panicked)
        } else {
            Ok(())
        };
        let _ = std::fs::remove_file(&self.path);
        signalled.and(joined)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            error!("Stopping the API server: {e}");
        }
    }
}

/// Starts the API server on `path` (a Unix socket created with mode 0600; a stale socket
/// from a dead server is replaced) with default [`ServerOptions`]. Each request reaches the
/// VMM as an [`ApiRequest`] on `api_tx`, followed by a write to `api_evt`.
pub fn start_server(
    path: impl AsRef<Path>,
    api_tx: Sender<ApiRequest>,
    api_evt: EventFd,
) -> Result<ServerHandle, ServerError> {
    start_server_with_options(path, api_tx, api_evt, ServerOptions::default())
}

/// [`start_server`] with explicit options.
pub fn start_server_with_options(
    path: impl AsRef<Path>,
    api_tx: Sender<ApiRequest>,
    api_evt: EventFd,
    options: ServerOptions,
) -> Result<ServerHandle, ServerError> {
    let path = path.as_ref().to_path_buf();
    let listener = bind_private(&path)?;
    let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(ServerError::EventFd)?;
    let thread_stop = stop_evt.try_clone().map_err(ServerError::EventFd)?;
    let dispatcher = Dispatcher {
        api_tx,
        api_evt,
        reply_timeout: options.reply_timeout,
        stop_evt: stop_evt.try_clone().map_err(ServerError::EventFd)?,
    };
    let stopping = Arc::new(AtomicBool::new(false));
    let thread_stopping = Arc::clone(&stopping);
    let accept_failures = Arc::new(AtomicU64::new(0));
    let thread_failures = Arc::clone(&accept_failures);
    let thread = std::thread::Builder::new()
        .name("api-server".into())
        .spawn(move || {
            request::set_server_context(options.reply_timeout, thread_stopping);
            serve(listener, thread_stop, dispatcher, options, thread_failures)
        })
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            ServerError::Spawn(e)
        })?;
    Ok(ServerHandle {
        path: path.clone(),
        stop_evt,
        stopping,
        accept_failures,
        thread: Some(thread),
    })
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// `accept` with a back-off on EMFILE/ENFILE, logged once per burst.
#[derive(Default)]
struct Acceptor {
    paused_until: Option<Instant>,
    backoff: Duration,
    /// Failures in the current burst.
    failures: u64,
    total_failures: Arc<AtomicU64>,
}

impl Acceptor {
    fn wants_poll(&self, now: Instant) -> bool {
        self.paused_until.is_none_or(|t| now >= t)
    }

    fn on_fd_exhaustion(&mut self, e: &io::Error) {
        if self.failures == 0 {
            warn!("API accept failed: {e}; pausing new connections until fds are free");
        }
        self.failures += 1;
        self.total_failures.fetch_add(1, Ordering::Relaxed);
        self.backoff = (self.backoff * 2).clamp(ACCEPT_BACKOFF_MIN, ACCEPT_BACKOFF_MAX);
        self.paused_until = Some(Instant::now() + self.backoff);
    }

    fn on_success(&mut self) {
        if self.failures > 0 {
            info!(
                "API accept works again after {} failed attempts",
                self.failures
            );
        }
        self.failures = 0;
        self.backoff = Duration::ZERO;
        self.paused_until = None;
    }

    fn accept_all(
        &mut self,
        listener: &UnixListener,
        conns: &mut Vec<Conn>,
        options: &ServerOptions,
    ) {
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    self.on_success();
                    if let Err(e) = stream.set_nonblocking(true) {
                        warn!("API connection refused: cannot make it non-blocking: {e}");
                        continue;
                    }
                    if conns.len() >= options.max_connections.max(1) {
                        evict_least_active(conns);
                    }
                    conns.push(Conn::new(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    self.on_fd_exhaustion(&e);
                    return;
                }
                Err(e) => {
                    debug!("API accept failed: {e}");
                    return;
                }
            }
        }
    }
}

/// Drops the connection that moved bytes least recently (told with a 503 if its socket
/// takes it), to make room for a new one.
fn evict_least_active(conns: &mut Vec<Conn>) {
    let Some(i) = conns
        .iter()
        .enumerate()
        .min_by_key(|(_, c)| c.last_activity)
        .map(|(i, _)| i)
    else {
        return;
    };
    let c = conns.swap_remove(i);
    warn!("API connection table full: closing the least recently active connection");
    let reply = Reply::error(
        HttpStatus::ServiceUnavailable,
        "Too many API connections: this idle one was closed",
    )
    .closing();
    if c.out.is_empty() {
        let _ = send_nosignal(&c.stream, &reply.render(false));
    }
}

fn limits(options: &ServerOptions) -> Limits {
    Limits {
        max_body: options.max_body_bytes,
        max_header_bytes: options.max_header_bytes,
        max_fds_per_request: options.max_fds_per_request,
        max_reply_buffer: options.max_reply_buffer,
        idle_timeout: options.idle_timeout,
        request_timeout: options.request_timeout,
    }
}

fn read_conn(
    c: &mut Conn,
    dispatcher: &Dispatcher,
    limits: &Limits,
    fds_held: &mut usize,
    options: &ServerOptions,
) {
    let before = c.fds.len();
    let room = options.max_fds_total.saturating_sub(*fds_held);
    let overflow = c.read(limits, room);
    match overflow {
        Some(FdOverflow::PerRequest) => c.refuse(Reply::error(
            HttpStatus::BadRequest,
            format!(
                "Too many file descriptors on one request (at most {})",
                options.max_fds_per_request
            ),
        )),
        Some(FdOverflow::Total) => c.refuse(Reply::error(
            HttpStatus::TooManyRequests,
            format!(
                "The API server holds too many received file descriptors (at most {} over all \
                 connections); retry later",
                options.max_fds_total
            ),
        )),
        None => c.pump(dispatcher, limits),
    }
    *fds_held = (*fds_held + c.fds.len()).saturating_sub(before);
    c.flush();
}

fn serve(
    listener: UnixListener,
    stop: EventFd,
    dispatcher: Dispatcher,
    options: ServerOptions,
    accept_failures: Arc<AtomicU64>,
) {
    let limits = limits(&options);
    let mut conns: Vec<Conn> = Vec::new();
    let mut acceptor = Acceptor {
        total_failures: accept_failures,
        ..Acceptor::default()
    };
    loop {
        let now = Instant::now();
        let accepting = acceptor.wants_poll(now);
        let mut fds = vec![
            pollfd(
                listener.as_raw_fd(),
                if accepting { libc::POLLIN } else { 0 },
            ),
            pollfd(stop.as_raw_fd(), libc::POLLIN),
        ];
        let mut next = acceptor.paused_until;
        for c in &conns {
            let mut ev = 0;
            if c.wants_input(&limits) {
                ev |= libc::POLLIN;
            }
            if !c.out.is_empty() {
                ev |= libc::POLLOUT;
            }
            fds.push(pollfd(c.stream.as_raw_fd(), ev));
            let d = c.deadline(&limits);
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        let timeout_ms = next.map_or(-1, |d| {
            let left = d.saturating_duration_since(now);
            // Round up, so we do not wake just before the deadline.
            left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
        });
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            error!("API server poll failed, stopping: {e}");
            break;
        }
        if fds[1].revents != 0 {
            break;
        }
        let mut fds_held: usize = conns.iter().map(|c| c.fds.len()).sum();
        for (c, p) in conns.iter_mut().zip(&fds[2..]) {
            let r = p.revents;
            if r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && c.wants_input(&limits) {
                read_conn(c, &dispatcher, &limits, &mut fds_held, &options);
            }
            if r & libc::POLLOUT != 0 {
                c.flush();
            }
            // Room in the reply buffer again: answer requests already read.
            c.pump(&dispatcher, &limits);
            if r & (libc::POLLERR | libc::POLLNVAL) != 0 && !c.out.is_empty() {
                c.dead = true;
            }
        }
        let now = Instant::now();
        for c in conns.iter_mut() {
            if now >= c.deadline(&limits) && c.wants_input(&limits) {
                // Bytes the client sent while we waited on the VMM for someone else may
                // complete its request: read them before deciding it is late.
                read_conn(c, &dispatcher, &limits, &mut fds_held, &options);
            }
            c.expire(Instant::now(), &limits);
            c.flush();
        }
        conns.retain(|c| !c.finished());
        if fds[0].revents & libc::POLLIN != 0 || (accepting && fds[0].revents != 0) {
            acceptor.accept_all(&listener, &mut conns, &options);
        } else if !accepting && acceptor.wants_poll(Instant::now()) {
            // The pause is over: try at once rather than after the next poll.
            acceptor.accept_all(&listener, &mut conns, &options);
        }
    }
    // Best effort: deliver replies still queued (e.g. the one to vmm.shutdown).
    let deadline = Instant::now() + STOP_FLUSH;
    while Instant::now() < deadline && conns.iter().any(|c| !c.dead && !c.out.is_empty()) {
        for c in conns.iter_mut() {
            c.flush();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
