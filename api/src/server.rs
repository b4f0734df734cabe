//! The API server thread: accepts connections on the Unix socket, reads requests with
//! dbs-uhttp's `HttpConnection` (which also collects `SCM_RIGHTS` fds), hands each to the
//! [`Dispatcher`] and writes the replies.
//!
//! One thread, `poll(2)` over the listener, a stop eventfd and the connections. Requests are
//! handled one at a time, in order; the thread blocks while the VMM works on one.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use dbs_uhttp::{ConnectionError, HttpConnection, RequestError, ScmSocket, Version};
use log::{debug, error, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::dispatch::Dispatcher;
use crate::http::{HttpStatus, Reply};
use crate::listener::{bind_private, ListenerError};
use crate::request::ApiRequest;

/// Largest request body accepted (dbs-uhttp's default, as Cloud Hypervisor uses).
pub const MAX_BODY_BYTES: usize = 51_200;

/// How long the server waits for the VMM to answer one request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Most simultaneous client connections.
pub const MAX_CONNECTIONS: usize = 32;

/// How long `stop` keeps trying to flush replies still queued.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// Tunables of the server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Largest request body (bytes); larger requests get 413.
    pub max_body_bytes: usize,
    /// How long to wait for the VMM's answer; afterwards the client gets 503.
    pub reply_timeout: Duration,
    /// Most simultaneous connections; more get 503 and are closed.
    pub max_connections: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_body_bytes: MAX_BODY_BYTES,
            reply_timeout: REPLY_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
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
    thread: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
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
    let thread = std::thread::Builder::new()
        .name("api-server".into())
        .spawn(move || serve(listener, thread_stop, dispatcher, options))
        .map_err(|e| {
            let _ = std::fs::remove_file(&path);
            ServerError::Spawn(e)
        })?;
    Ok(ServerHandle {
        path: path.clone(),
        stop_evt,
        thread: Some(thread),
    })
}

/// A stream dbs-uhttp reads from while we keep a handle to write replies.
struct SharedStream(Rc<UnixStream>);

impl Read for SharedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl Write for SharedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ScmSocket for SharedStream {
    fn socket_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// `send(2)` with `MSG_NOSIGNAL`, so a vanished client is an error, not a SIGPIPE.
fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice for `buf.len()` bytes for the whole call and
    // the fd is an open socket owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

struct Conn {
    http: HttpConnection<SharedStream>,
    stream: Rc<UnixStream>,
    out: Vec<u8>,
    /// No more reads: the client closed its side, or a parse error desynchronized us.
    closing: bool,
    /// Unusable; drop now.
    dead: bool,
}

impl Conn {
    fn new(stream: UnixStream, max_body: usize) -> Conn {
        let stream = Rc::new(stream);
        let mut http = HttpConnection::new(SharedStream(Rc::clone(&stream)));
        http.set_payload_max_size(max_body);
        Conn {
            http,
            stream,
            out: Vec::new(),
            closing: false,
            dead: false,
        }
    }

    fn queue(&mut self, reply: &Reply, http10: bool) {
        if reply.close {
            self.closing = true;
        }
        self.out.extend_from_slice(&reply.render(http10));
    }

    fn on_readable(&mut self, dispatcher: &Dispatcher) {
        let result = self.http.try_read();
        if self.http.pending_write() {
            // dbs-uhttp queued its own "100 Continue" for an `Expect:` header; send ours.
            self.http.clear_write_buffer();
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        // Requests completed before any error are answered first, in order.
        while let Some(req) = self.http.pop_parsed_request() {
            let http10 = req.http_version() == Version::Http10;
            let reply = dispatcher.handle(req);
            self.queue(&reply, http10);
        }
        match result {
            Ok(()) => {}
            Err(ConnectionError::ConnectionClosed) => self.closing = true,
            Err(ConnectionError::StreamReadError(e))
                if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {}
            Err(ConnectionError::ParseError(e)) => {
                warn!("API request refused: malformed HTTP: {e}");
                self.queue(&parse_error_reply(&e).closing(), false);
            }
            Err(e) => {
                debug!("API connection dropped: {e}");
                self.dead = true;
            }
        }
        self.flush();
    }

    fn flush(&mut self) {
        while !self.out.is_empty() {
            match send_nosignal(&self.stream, &self.out) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!("API reply not delivered: {e}");
                    self.dead = true;
                    return;
                }
            }
        }
    }

    fn finished(&self) -> bool {
        self.dead || (self.closing && self.out.is_empty())
    }
}

/// Longest parser message we echo back (dbs-uhttp quotes whole header lines).
const MAX_PARSE_MESSAGE: usize = 200;

fn parse_error_reply(e: &RequestError) -> Reply {
    if let RequestError::SizeLimitExceeded(limit, size) = e {
        return Reply::error(
            HttpStatus::PayloadTooLarge,
            format!("Request body of {size} bytes exceeds the limit of {limit} bytes"),
        );
    }
    let mut detail = e.to_string();
    if detail.len() > MAX_PARSE_MESSAGE {
        let mut cut = MAX_PARSE_MESSAGE;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str("...");
    }
    Reply::error(
        HttpStatus::BadRequest,
        format!("Malformed HTTP request: {detail}"),
    )
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn accept_all(listener: &UnixListener, conns: &mut Vec<Conn>, options: &ServerOptions) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = stream.set_nonblocking(true) {
                    warn!("API connection refused: cannot make it non-blocking: {e}");
                    continue;
                }
                if conns.len() >= options.max_connections {
                    warn!(
                        "API connection refused: more than {} connections",
                        options.max_connections
                    );
                    let reply = Reply::error(
                        HttpStatus::ServiceUnavailable,
                        format!(
                            "Too many API connections (at most {})",
                            options.max_connections
                        ),
                    )
                    .closing();
                    let _ = send_nosignal(&stream, &reply.render(false));
                    continue;
                }
                conns.push(Conn::new(stream, options.max_body_bytes));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                warn!("API accept failed: {e}");
                return;
            }
        }
    }
}

fn serve(listener: UnixListener, stop: EventFd, dispatcher: Dispatcher, options: ServerOptions) {
    let mut conns: Vec<Conn> = Vec::new();
    loop {
        let mut fds = vec![
            pollfd(listener.as_raw_fd(), libc::POLLIN),
            pollfd(stop.as_raw_fd(), libc::POLLIN),
        ];
        for c in &conns {
            let mut ev = 0;
            if !c.closing {
                ev |= libc::POLLIN;
            }
            if !c.out.is_empty() {
                ev |= libc::POLLOUT;
            }
            fds.push(pollfd(c.stream.as_raw_fd(), ev));
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
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
        if fds[0].revents & libc::POLLIN != 0 {
            accept_all(&listener, &mut conns, &options);
        }
        for (c, p) in conns.iter_mut().zip(&fds[2..]) {
            let r = p.revents;
            if r & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && !c.closing {
                c.on_readable(&dispatcher);
            }
            if r & libc::POLLOUT != 0 {
                c.flush();
            }
            if r & (libc::POLLERR | libc::POLLNVAL) != 0 && !c.out.is_empty() {
                c.dead = true;
            }
        }
        conns.retain(|c| !c.finished());
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
