//! Binding the API socket with mode 0600 and no window in which others can connect.
//!
//! `UnixListener::bind` binds and listens in one call, so a chmod afterwards leaves a moment
//! where the socket is connectable with the umask's mode. Here the socket is bound, chmod-ed,
//! and only then put into the listening state; until `listen` every connect is refused.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Errors while creating the API socket.
#[derive(Debug, Error)]
pub enum ListenerError {
    /// The path does not fit in `sockaddr_un.sun_path`.
    #[error("API socket path {0} is too long (at most 107 bytes)")]
    PathTooLong(PathBuf),
    /// Something that is not a socket is in the way.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// A live server already listens there.
    #[error("API socket {0} is in use by another process")]
    InUse(PathBuf),
    /// A syscall failed.
    #[error("Cannot {op} API socket {path}")]
    Sys {
        /// What was attempted.
        op: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn sys<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenerError + 'a {
    move |source| ListenerError::Sys {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes a stale socket left by a dead server; refuses to touch anything else.
fn clear_stale(path: &Path) -> Result<(), ListenerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(sys("inspect", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ListenerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ListenerError::InUse(path.to_path_buf())),
        Err(_) => std::fs::remove_file(path).map_err(sys("remove stale", path)),
    }
}

/// Creates a listening, non-blocking, close-on-exec Unix socket at `path` with mode 0600.
pub(crate) fn bind_private(path: &Path) -> Result<UnixListener, ListenerError> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(ListenerError::PathTooLong(path.to_path_buf()));
    }
    clear_stale(path)?;
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }

    // SAFETY: socket() takes no pointers; the result is checked below.
    let raw = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if raw < 0 {
        return Err(sys("create", path)(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created socket fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let len = mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid, NUL-terminated sockaddr_un that outlives the call and `len`
    // is its size; `fd` is an open socket.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        )
    };
    if rc < 0 {
        return Err(sys("bind", path)(io::Error::last_os_error()));
    }
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(sys("chmod", path)(e));
    }
    // SAFETY: `fd` is a bound socket; listen() takes no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 32) } < 0 {
        let e = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(sys("listen on", path)(e));
    }
    Ok(UnixListener::from(fd))
}
