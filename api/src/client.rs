//! A small blocking HTTP client for the API socket, used by `ioasid-remote` and the tests.
//! One request per connection; fds go out with `SCM_RIGHTS` on the first write.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dbs_uhttp::ScmSocket;
use thiserror::Error;

use crate::routes::{HttpMethod, API_PREFIX};
use crate::types::ErrorBody;

/// Largest reply header block the client reads.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest reply body the client reads.
const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// Client errors (transport and protocol; an HTTP error status is not one of these).
#[derive(Debug, Error)]
pub enum ClientError {
    /// Cannot connect.
    #[error("Cannot connect to the API socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Sending failed.
    #[error("Cannot send the request")]
    Send(#[source] io::Error),
    /// Receiving failed.
    #[error("Cannot read the reply")]
    Receive(#[source] io::Error),
    /// The reply is not HTTP as we know it.
    #[error("Malformed reply from the server: {0}")]
    BadReply(String),
}

/// A reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    /// Status code.
    pub status: u16,
    /// Body bytes (empty for 204).
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as JSON (`Null` when empty).
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body)
    }

    /// The server's error message and its causes (the body, a JSON array of strings), or the
    /// raw body as one message when it is not one.
    pub fn error_messages(&self) -> Vec<String> {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => e.0,
            Err(_) => vec![String::from_utf8_lossy(&self.body).into_owned()],
        }
    }

    /// [`Self::error_messages`] joined with `: `.
    pub fn error_message(&self) -> String {
        self.error_messages().join(": ")
    }
}

/// Talks to one API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl ApiClient {
    /// A client for the socket at `path`, without timeouts.
    pub fn new(path: impl AsRef<Path>) -> ApiClient {
        ApiClient {
            path: path.as_ref().to_path_buf(),
            timeout: None,
        }
    }

    /// Sets a read/write timeout on each connection.
    pub fn with_timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = Some(timeout);
        self
    }

    /// `method` on `/api/v1/<endpoint>` with an optional JSON body and fds.
    pub fn request(
        &self,
        method: HttpMethod,
        endpoint: &str,
        body: Option<&[u8]>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<ClientResponse, ClientError> {
        let path = format!("{API_PREFIX}/{endpoint}");
        let mut raw = format!("{} {path} HTTP/1.1\r\nHost: localhost\r\n", method.as_str());
        if let Some(b) = body {
            raw.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        raw.push_str("\r\n");
        let mut bytes = raw.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        self.raw_request(&bytes, fds)
    }

    /// Sends `bytes` as they are (for tests of malformed requests) and reads one reply.
    pub fn raw_request(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<ClientResponse, ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream
            .set_read_timeout(self.timeout)
            .and_then(|_| stream.set_write_timeout(self.timeout))
            .map_err(ClientError::Send)?;
        let send_result = send_all(&mut stream, bytes, fds);
        // A server that rejects early (e.g. 413) may close before reading everything; its
        // reply is still readable, so try to read before reporting a send error.
        match (read_reply(&mut stream), send_result) {
            (Ok(r), _) => Ok(r),
            (Err(_), Err(e)) => Err(ClientError::Send(e)),
            (Err(e), Ok(())) => Err(e),
        }
    }
}

fn send_all(stream: &mut UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut rest = bytes;
    if !fds.is_empty() {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let n = stream
            .send_with_fds(&[rest], &raw)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        rest = &rest[n..];
    }
    stream.write_all(rest)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads one final (non-1xx) reply.
fn read_reply(stream: &mut UnixStream) -> Result<ClientResponse, ClientError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // Header block.
        let header_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i;
            }
            if buf.len() > MAX_HEADER_BYTES {
                return Err(ClientError::BadReply("header block too large".into()));
            }
            let n = stream.read(&mut chunk).map_err(ClientError::Receive)?;
            if n == 0 {
                return Err(ClientError::BadReply(
                    "connection closed before a complete reply".into(),
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.split(' ');
        let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
            return Err(ClientError::BadReply(format!(
                "status line `{status_line}`"
            )));
        };
        if !version.starts_with("HTTP/1.") {
            return Err(ClientError::BadReply(format!(
                "status line `{status_line}`"
            )));
        }
        let status: u16 = code
            .parse()
            .map_err(|_| ClientError::BadReply(format!("status line `{status_line}`")))?;
        let mut content_length = 0usize;
        for line in lines {
            if let Some((k, v)) = line.split_once(':') {
                if k.trim().eq_ignore_ascii_case("content-length") {
                    content_length = v.trim().parse().map_err(|_| {
                        ClientError::BadReply(format!("Content-Length `{}`", v.trim()))
                    })?;
                }
            }
        }
        buf.drain(..header_end + 4);
        if (100..200).contains(&status) {
            continue;
        }
        if content_length > MAX_REPLY_BYTES {
            return Err(ClientError::BadReply(format!(
                "reply body of {content_length} bytes is too large"
            )));
        }
        while buf.len() < content_length {
            let n = stream.read(&mut chunk).map_err(ClientError::Receive)?;
            if n == 0 {
                return Err(ClientError::BadReply("reply body cut short".into()));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        buf.truncate(content_length);
        return Ok(ClientResponse { status, body: buf });
    }
}
