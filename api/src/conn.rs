//! One API connection: receiving bytes and `SCM_RIGHTS` fds with bounds, framing requests,
//! and the reply buffer.
//!
//! dbs-uhttp's `HttpConnection` cannot be bounded from outside: it stores every header line
//! without a total limit, accepts any number of fds on an unfinished request (received
//! without `MSG_CMSG_CLOEXEC`), ignores `Transfer-Encoding: chunked` and lets the last of
//! several `Content-Length` headers win. So this layer replaces it. We receive with
//! `recvmsg(MSG_CMSG_CLOEXEC)` into a control buffer sized for a few fds (the kernel closes
//! any that do not fit and says so with `MSG_CTRUNC`), find the end of the request head
//! within [`Limits::max_header_bytes`], check the framing headers ourselves, wait for the
//! body the one `Content-Length` announces, and only then hand the complete request's bytes
//! to dbs-uhttp's `Request::try_from`, which parses the request line and the headers.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use dbs_uhttp::{Body, Request, RequestError, Version};
use log::{debug, warn};

use crate::dispatch::Dispatcher;
use crate::http::{HttpStatus, Reply};

/// Longest request or header line (dbs-uhttp's own line limit was 1024 bytes too).
const MAX_LINE_BYTES: usize = 1024;

/// Bytes read per `recvmsg`.
const READ_CHUNK: usize = 4096;

/// Bounds of one connection.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub(crate) max_body: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_fds_per_request: usize,
    pub(crate) max_reply_buffer: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) request_timeout: Duration,
}

/// What one `recvmsg` brought.
struct Received {
    bytes: usize,
    fds: Vec<OwnedFd>,
    /// The kernel had more fds than our control buffer holds and closed the rest.
    truncated: bool,
}

/// `recvmsg` with room for `max_fds` fds, close-on-exec, non-blocking.
fn recv_with_fds(stream: &UnixStream, buf: &mut [u8], max_fds: usize) -> io::Result<Received> {
    let max_fds = max_fds.max(1);
    // SAFETY: CMSG_SPACE is a pure computation on its argument.
    let space = unsafe { libc::CMSG_SPACE((max_fds * std::mem::size_of::<libc::c_int>()) as u32) };
    // u64 elements keep the buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; (space as usize).div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = control.len() * 8;
    // SAFETY: `msg` points at `iov` (valid for `buf.len()` writable bytes) and at `control`
    // (valid for `msg_controllen` bytes); all outlive the call.
    let n = unsafe {
        libc::recvmsg(
            stream.as_raw_fd(),
            &mut msg,
            libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
    // `msg_controllen`, and each SCM_RIGHTS payload holds whole c_ints the kernel installed
    // in our fd table, which nothing else owns yet.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const libc::c_int;
                let header = libc::CMSG_LEN(0) as usize;
                let count = ((*cmsg).cmsg_len as usize).saturating_sub(header)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    if fd >= 0 {
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        bytes: n as usize,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// `send(2)` with `MSG_NOSIGNAL`, so a vanished client is an error, not a SIGPIPE.
pub(crate) fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice for `buf.len()` bytes for the whole call and
    // the fd is an open socket owned by `stream`.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Where the bytes at the start of the input buffer stand.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// More bytes needed; `expect_continue` once the head is complete with
    /// `Expect: 100-continue` and the body is still missing.
    Incomplete { expect_continue: bool },
    /// A whole request is the first `len` bytes; its body starts at `body`.
    Complete { body: usize, len: usize },
    /// The bytes can never become an acceptable request; answer this and close.
    Refused(HttpStatus, String),
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Finds the request at the start of `buf` and checks its framing headers: exactly one
/// `Content-Length` (or none), no `Transfer-Encoding`, a head within `max_header_bytes`
/// and a body within `max_body`.
pub(crate) fn frame(buf: &[u8], max_header_bytes: usize, max_body: usize) -> Frame {
    let window = &buf[..buf.len().min(max_header_bytes.saturating_add(4))];
    let Some(head_end) = find(window, b"\r\n\r\n") else {
        if buf.len() > max_header_bytes {
            return Frame::Refused(
                HttpStatus::HeadersTooLarge,
                format!("Request line and headers exceed {max_header_bytes} bytes"),
            );
        }
        return Frame::Incomplete {
            expect_continue: false,
        };
    };
    let head = &buf[..head_end];
    let mut length: Option<u64> = None;
    let mut expect_continue = false;
    for (i, line) in head.split(|&b| b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE_BYTES {
            return Frame::Refused(
                HttpStatus::BadRequest,
                format!(
                    "Malformed HTTP request: a line of {} bytes (at most {MAX_LINE_BYTES})",
                    line.len()
                ),
            );
        }
        if i == 0 {
            continue;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = String::from_utf8_lossy(&line[..colon])
            .trim()
            .to_ascii_lowercase();
        let value = String::from_utf8_lossy(&line[colon + 1..])
            .trim()
            .to_string();
        match name.as_str() {
            "content-length" => {
                let Ok(n) = value.parse::<u64>() else {
                    return Frame::Refused(
                        HttpStatus::BadRequest,
                        "Content-Length is not a decimal number".into(),
                    );
                };
                match length {
                    Some(old) if old != n => {
                        return Frame::Refused(
                            HttpStatus::BadRequest,
                            format!("Conflicting Content-Length headers ({old} and {n})"),
                        )
                    }
                    Some(_) => {
                        return Frame::Refused(
                            HttpStatus::BadRequest,
                            "Duplicate Content-Length header".into(),
                        )
                    }
                    None => length = Some(n),
                }
            }
            "transfer-encoding" => {
                return Frame::Refused(
                    HttpStatus::BadRequest,
                    format!(
                        "Transfer-Encoding `{}` is not supported: send the body with one \
                         Content-Length",
                        value.chars().take(40).collect::<String>()
                    ),
                )
            }
            "expect" => expect_continue = value.eq_ignore_ascii_case("100-continue"),
            _ => {}
        }
    }
    let body = length.unwrap_or(0);
    if body > max_body as u64 {
        return Frame::Refused(
            HttpStatus::PayloadTooLarge,
            format!("Request body of {body} bytes exceeds the limit of {max_body} bytes"),
        );
    }
    let total = head_end + 4 + body as usize;
    if buf.len() >= total {
        Frame::Complete {
            body: head_end + 4,
            len: total,
        }
    } else {
        Frame::Incomplete {
            expect_continue: expect_continue && buf.len() == head_end + 4,
        }
    }
}

/// The request head (ending in an empty line) without its `Content-Length` line, which
/// [`frame`] has checked and applied.
fn head_without_length(head: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    for line in head.split_inclusive(|&b| b == b'\n') {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if line.contains(&b':')
            && String::from_utf8_lossy(name)
                .trim()
                .eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        out.extend_from_slice(line);
    }
    out
}

/// Longest parser message we echo back (dbs-uhttp quotes whole header lines).
const MAX_PARSE_MESSAGE: usize = 200;

fn parse_error_reply(e: &RequestError) -> Reply {
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

/// Why a connection's fds went over a bound.
pub(crate) enum FdOverflow {
    /// This request carries more than the per-request bound.
    PerRequest,
    /// All connections together hold more than the total bound.
    Total,
}

pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    inbuf: Vec<u8>,
    /// Fds received since the last complete request; they go with the next one.
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) out: Vec<u8>,
    /// No more reads: the client closed its side, or we answered and close.
    pub(crate) closing: bool,
    /// Unusable; drop now.
    pub(crate) dead: bool,
    /// The last time bytes moved in either direction.
    pub(crate) last_activity: Instant,
    /// When the first byte of the request in progress arrived.
    request_start: Option<Instant>,
    continue_sent: bool,
}

impl Conn {
    pub(crate) fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            inbuf: Vec::new(),
            fds: Vec::new(),
            out: Vec::new(),
            closing: false,
            dead: false,
            last_activity: Instant::now(),
            request_start: None,
            continue_sent: false,
        }
    }

    /// Whether the server should poll this connection for input.
    /// Not while the reply buffer is full (the client does not read), nor while the input
    /// buffer already holds a whole request's worth of bytes.
    pub(crate) fn wants_input(&self, limits: &Limits) -> bool {
        !self.closing
            && !self.dead
            && self.out.len() < limits.max_reply_buffer
            && self.inbuf.len() <= limits.max_header_bytes + limits.max_body
    }

    fn queue(&mut self, reply: &Reply, http10: bool) {
        if reply.close {
            self.closing = true;
        }
        self.out.extend_from_slice(&reply.render(http10));
    }

    /// Answers with `reply`, drops the request in progress and its fds, and closes.
    pub(crate) fn refuse(&mut self, reply: Reply) {
        warn!(
            "API request refused ({}): {}",
            reply.status.code(),
            reply
                .body
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
        );
        self.fds.clear();
        self.inbuf = Vec::new();
        self.request_start = None;
        self.queue(&reply.closing(), false);
    }

    /// Reads what the socket has, with room for `fd_room` more fds. Returns the fd bound
    /// that was crossed, if any (the caller answers and closes).
    pub(crate) fn read(&mut self, limits: &Limits, fd_room: usize) -> Option<FdOverflow> {
        let mut buf = [0u8; READ_CHUNK];
        let per_request_room = (limits.max_fds_per_request + 1).saturating_sub(self.fds.len());
        match recv_with_fds(&self.stream, &mut buf, per_request_room.min(fd_room + 1)) {
            Ok(r) => {
                self.last_activity = Instant::now();
                let over_request = r.fds.len() + self.fds.len() > limits.max_fds_per_request;
                let over_total = r.fds.len() > fd_room;
                self.fds.extend(r.fds);
                if r.bytes == 0 {
                    self.closing = true;
                    self.fds.clear();
                    return None;
                }
                if self.request_start.is_none() {
                    self.request_start = Some(self.last_activity);
                }
                self.inbuf.extend_from_slice(&buf[..r.bytes]);
                if over_request || (r.truncated && !over_total) {
                    return Some(FdOverflow::PerRequest);
                }
                if over_total || r.truncated {
                    return Some(FdOverflow::Total);
                }
                None
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => None,
            Err(e) => {
                debug!("API connection dropped: {e}");
                self.dead = true;
                None
            }
        }
    }

    /// Answers every complete request in the input buffer, in order, while the reply
    /// buffer has room.
    pub(crate) fn process(&mut self, dispatcher: &Dispatcher, limits: &Limits) {
        while !self.closing && !self.dead && self.out.len() < limits.max_reply_buffer {
            match frame(&self.inbuf, limits.max_header_bytes, limits.max_body) {
                Frame::Incomplete { expect_continue } => {
                    if expect_continue && !self.continue_sent {
                        self.continue_sent = true;
                        self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    return;
                }
                Frame::Refused(status, msg) => {
                    self.refuse(Reply::error(status, msg));
                    return;
                }
                Frame::Complete { body, len } => {
                    let rest = self.inbuf.split_off(len);
                    let mut bytes = std::mem::replace(&mut self.inbuf, rest);
                    let body_bytes = bytes.split_off(body);
                    let files: Vec<File> = self.fds.drain(..).map(File::from).collect();
                    self.continue_sent = false;
                    self.request_start = if self.inbuf.is_empty() {
                        None
                    } else {
                        Some(Instant::now())
                    };
                    // dbs-uhttp parses the head; the body we framed ourselves (its parser
                    // refuses a body on GET, which the dispatcher answers with a clearer
                    // message).
                    match Request::try_from(&head_without_length(&bytes), None) {
                        Ok(mut req) => {
                            req.files = files;
                            if !body_bytes.is_empty() {
                                req.body = Some(Body::new(body_bytes));
                            }
                            let http10 = req.http_version() == Version::Http10;
                            let reply = dispatcher.handle(req);
                            self.queue(&reply, http10);
                        }
                        Err(e) => {
                            warn!("API request refused: malformed HTTP: {e}");
                            self.refuse(parse_error_reply(&e));
                        }
                    }
                }
            }
        }
    }

    /// Answers buffered requests and sends the replies for as long as the socket takes
    /// them: stops when the socket is full (the client does not read) or no whole request
    /// is left.
    pub(crate) fn pump(&mut self, dispatcher: &Dispatcher, limits: &Limits) {
        loop {
            let before = self.inbuf.len();
            self.process(dispatcher, limits);
            self.flush();
            if !self.out.is_empty() || self.inbuf.len() == before || self.closing || self.dead {
                return;
            }
        }
    }

    /// Writes what the socket takes.
    pub(crate) fn flush(&mut self) {
        while !self.out.is_empty() {
            match send_nosignal(&self.stream, &self.out) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.last_activity = Instant::now();
                    self.out.drain(..n);
                    if self.out.is_empty() && self.request_start.is_some() {
                        // Bytes read while we were busy writing: their time starts now.
                        self.request_start = Some(self.last_activity);
                    }
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

    /// When this connection times out: the request in progress has `request_timeout`
    /// from its first byte (or from when our replies were all sent); otherwise, and while
    /// replies wait to be sent, the connection has `idle_timeout` from the last byte moved
    /// (a client that does not read its replies times out too).
    pub(crate) fn deadline(&self, limits: &Limits) -> Instant {
        match self.request_start {
            Some(start) if !self.closing && self.out.is_empty() => start + limits.request_timeout,
            _ => self.last_activity + limits.idle_timeout,
        }
    }

    /// Applies the deadline at `now`: a request in progress gets 408 and the connection
    /// closes; an idle or stalled connection is dropped.
    pub(crate) fn expire(&mut self, now: Instant, limits: &Limits) {
        if now < self.deadline(limits) {
            return;
        }
        if self.request_start.is_some() && !self.closing && self.out.is_empty() {
            self.refuse(Reply::error(
                HttpStatus::RequestTimeout,
                format!(
                    "Request not completed within {} ms",
                    limits.request_timeout.as_millis()
                ),
            ));
            // The 408 gets its own idle_timeout to be read.
            self.last_activity = now;
        } else {
            debug!("API connection idle or not reading its replies: closed");
            self.dead = true;
        }
    }

    pub(crate) fn finished(&self) -> bool {
        self.dead || (self.closing && self.out.is_empty())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn framing_rules() {
        let f = |b: &[u8]| frame(b, 64, 10);
        assert_eq!(
            f(b"GET / HTTP/1.1\r\n\r\n"),
            Frame::Complete { body: 18, len: 18 }
        );
        assert_eq!(
            f(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{"),
            Frame::Incomplete {
                expect_continue: false
            }
        );
        assert!(matches!(
            f(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\n"),
            Frame::Refused(HttpStatus::BadRequest, m) if m.contains("Conflicting")
        ));
        assert!(matches!(
            f(b"PUT / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n"),
            Frame::Refused(HttpStatus::BadRequest, m) if m.contains("Duplicate")
        ));
        assert!(matches!(
            f(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Frame::Refused(HttpStatus::BadRequest, m) if m.contains("chunked")
        ));
        assert!(matches!(
            f(b"PUT / HTTP/1.1\r\nContent-Length: 11\r\n\r\n"),
            Frame::Refused(HttpStatus::PayloadTooLarge, _)
        ));
        assert!(matches!(
            f(&[b'a'; 65]),
            Frame::Refused(HttpStatus::HeadersTooLarge, _)
        ));
        assert_eq!(
            f(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"),
            Frame::Incomplete {
                expect_continue: true
            }
        );
    }
}
