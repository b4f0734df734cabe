//! Console output that never blocks the vCPU: a bounded buffer drained by a writer thread,
//! dropping and counting what does not fit, with a size cap for log files.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes buffered between the vCPU and the console writer thread.
pub const CONSOLE_BUFFER: usize = 64 << 10;
/// Default size cap of a `--serial file=` log.
pub const DEFAULT_FILE_CAP: u64 = 64 << 20;
/// Most bytes the writer thread writes per call: at most `PIPE_BUF`, so a write to a pipe
/// that `poll` reported writable does not block.
const WRITE_CHUNK: usize = 4096;
/// How often the writer thread looks at the stop flag while its sink is not writable.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How long shutdown waits for the writer thread to drain before leaving it behind.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// Where the writer thread writes.
enum ConsoleSink {
    /// A file descriptor (stdout, a pipe, a tty): polled before each write, so a reader
    /// that never reads cannot wedge the thread either.
    Fd(OwnedFd),
    /// A regular file (never blocks for long), with its size cap.
    File(std::fs::File),
}

#[derive(Debug, Default)]
struct ConsoleState {
    buf: VecDeque<u8>,
    /// Bytes dropped: the buffer was full, or the file reached its cap.
    dropped: u64,
    /// Bytes handed to the sink.
    written: u64,
    stop: bool,
    /// The writer thread has exited.
    done: bool,
    /// The file cap was reached (warned once).
    capped: bool,
    /// Bytes the writer took from `buf` and has not written yet.
    in_flight: usize,
}

#[derive(Debug, Default)]
struct ConsoleShared {
    state: Mutex<ConsoleState>,
    /// Signalled when bytes arrive, on stop, and when the writer exits.
    cv: Condvar,
}

impl ConsoleShared {
    fn lock(&self) -> MutexGuard<'_, ConsoleState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Counters of a [`ConsoleOutput`], readable from any thread.
#[derive(Clone, Debug)]
pub struct ConsoleStats(Arc<ConsoleShared>);

impl ConsoleStats {
    /// Bytes dropped because the reader fell behind or the file cap was reached.
    pub fn dropped(&self) -> u64 {
        self.0.lock().dropped
    }

    /// Bytes written to the sink.
    pub fn written(&self) -> u64 {
        self.0.lock().written
    }

    /// Bytes accepted and not yet written or dropped (in the buffer or being written).
    pub fn buffered(&self) -> usize {
        let s = self.0.lock();
        s.buf.len() + s.in_flight
    }
}

/// Serial output that never blocks its writer: a bounded buffer drained by a thread.
/// `write` takes what fits, counts the rest as dropped, and returns at once.
pub struct ConsoleOutput {
    shared: Arc<ConsoleShared>,
    capacity: usize,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleOutput")
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl ConsoleOutput {
    /// Output to the process's stdout (a duplicate of fd 1, so the writer never holds the
    /// standard library's stdout lock).
    pub fn stdout() -> std::io::Result<Self> {
        use std::os::fd::AsFd;
        let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Self::spawn(ConsoleSink::Fd(fd), CONSOLE_BUFFER, u64::MAX))
    }

    /// Output to any file descriptor (a pipe, a tty), polled before each write.
    pub fn fd(fd: OwnedFd, capacity: usize) -> Self {
        Self::spawn(ConsoleSink::Fd(fd), capacity, u64::MAX)
    }

    /// Output to a log file that stops growing after `cap` bytes (see
    /// [`DEFAULT_FILE_CAP`]); later bytes are dropped and counted.
    pub fn file(file: std::fs::File, cap: u64) -> Self {
        Self::spawn(ConsoleSink::File(file), CONSOLE_BUFFER, cap)
    }

    fn spawn(sink: ConsoleSink, capacity: usize, cap: u64) -> Self {
        let shared = Arc::new(ConsoleShared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || {
                writer_loop(&s, sink, cap);
                s.lock().done = true;
                s.cv.notify_all();
            });
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                log::warn!("Cannot start the serial output thread, output is discarded: {e}");
                shared.lock().done = true;
                None
            }
        };
        Self {
            shared,
            capacity,
            thread,
        }
    }

    /// The counters.
    pub fn stats(&self) -> ConsoleStats {
        ConsoleStats(self.shared.clone())
    }
}

impl Write for ConsoleOutput {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let mut s = self.shared.lock();
        if s.done {
            s.dropped = s.dropped.saturating_add(data.len() as u64);
            return Ok(data.len());
        }
        let room = self.capacity.saturating_sub(s.buf.len());
        let n = room.min(data.len());
        s.buf.extend(&data[..n]);
        s.dropped = s.dropped.saturating_add((data.len() - n) as u64);
        drop(s);
        if n > 0 {
            self.shared.cv.notify_all();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleOutput {
    /// Stops the writer after it drained what is buffered, waiting at most
    /// [`DRAIN_DEADLINE`]: a sink that never drains is left to its thread, which stops at
    /// its next poll, so shutdown never hangs on the console.
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        s.stop = true;
        self.shared.cv.notify_all();
        let deadline = std::time::Instant::now() + DRAIN_DEADLINE;
        while !s.done {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            s = self
                .shared
                .cv
                .wait_timeout(s, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let done = s.done;
        drop(s);
        if let Some(t) = self.thread.take() {
            if done {
                let _ = t.join();
            }
        }
    }
}

/// Waits until `fd` is writable or `stop` is set; returns whether it is writable.
fn wait_writable(fd: &OwnedFd, shared: &ConsoleShared) -> bool {
    loop {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, POLL_INTERVAL.as_millis() as libc::c_int) };
        if r > 0 {
            // POLLERR/POLLHUP: the write reports the error.
            return true;
        }
        if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return true;
        }
        let s = shared.lock();
        // On stop, give up only once the buffer cannot drain.
        if s.stop {
            return false;
        }
    }
}

fn write_fd(fd: &OwnedFd, chunk: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `chunk` is valid for reads of its length; `fd` is open while borrowed.
    let n = unsafe { libc::write(fd.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn writer_loop(shared: &ConsoleShared, mut sink: ConsoleSink, cap: u64) {
    let mut chunk = Vec::with_capacity(WRITE_CHUNK);
    loop {
        {
            let mut s = shared.lock();
            while s.buf.is_empty() && !s.stop {
                s = shared.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.buf.is_empty() {
                return;
            }
            let n = s.buf.len().min(WRITE_CHUNK);
            chunk.clear();
            chunk.extend(s.buf.drain(..n));
            // The file cap: what is past it is dropped.
            let left = cap.saturating_sub(s.written);
            if (chunk.len() as u64) > left {
                let keep = left as usize;
                s.dropped = s.dropped.saturating_add((chunk.len() - keep) as u64);
                chunk.truncate(keep);
                if !std::mem::replace(&mut s.capped, true) {
                    log::warn!(
                        "Serial output reached its cap of {cap} bytes; further output is dropped"
                    );
                }
            }
            s.in_flight = chunk.len();
        }
        let mut off = 0;
        while off < chunk.len() {
            let r = match &mut sink {
                ConsoleSink::Fd(fd) => {
                    if !wait_writable(fd, shared) {
                        let mut s = shared.lock();
                        let lost = (chunk.len() - off + s.buf.len()) as u64;
                        s.dropped = s.dropped.saturating_add(lost);
                        s.buf.clear();
                        s.in_flight = 0;
                        return;
                    }
                    write_fd(fd, &chunk[off..])
                }
                ConsoleSink::File(f) => f.write(&chunk[off..]),
            };
            match r {
                Ok(0) => {
                    let mut s = shared.lock();
                    s.dropped = s.dropped.saturating_add((chunk.len() - off) as u64);
                    s.in_flight = 0;
                    break;
                }
                Ok(n) => {
                    off += n;
                    let mut s = shared.lock();
                    s.written = s.written.saturating_add(n as u64);
                    s.in_flight = s.in_flight.saturating_sub(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    log::warn!("Serial output failed, discarding further output: {e}");
                    let mut s = shared.lock();
                    s.dropped = s.dropped.saturating_add((chunk.len() - off) as u64);
                    s.in_flight = 0;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::serial::Serial;
    use devices::bus::BusDevice;

    /// THR.
    const DATA: u64 = 0;

    /// A pipe whose read end nobody reads (until the test checks what arrived).
    fn pipe() -> (std::fs::File, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` is valid for two ints; the result is checked.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 returned two fresh fds that nothing else owns.
        let (r, w) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::fs::File::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        };
        (r, w)
    }

    /// Runs `f` on its own thread and waits for it with a deadline: a hang breaker, not a
    /// timing assertion. Returns whether `f` finished.
    fn finishes(what: &str, f: impl FnOnce() + Send + 'static) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f();
            let _ = tx.send(());
        });
        let ok = rx.recv_timeout(std::time::Duration::from_secs(20)).is_ok();
        if !ok {
            eprintln!("{what} did not finish within the deadline");
        }
        ok
    }

    const PATTERN_LEN: usize = 1 << 20;

    fn pattern(i: usize) -> u8 {
        (i % 251) as u8
    }

    /// The guest writes 1 MiB to a COM1 whose stdout is a pipe nobody reads: every vCPU-side
    /// write returns, the bytes that do not fit are dropped and counted, the VMM can drop
    /// the UART (shutdown), and what reached the pipe is an in-order prefix of the output.
    #[test]
    fn serial_backpressure_never_blocks_vcpu() {
        let (mut reader, w) = pipe();
        let console = ConsoleOutput::fd(w, CONSOLE_BUFFER);
        let stats = console.stats();
        let serial = Arc::new(Mutex::new(Serial::new(Some(Box::new(console)), None)));
        let vcpu = serial.clone();
        assert!(
            finishes("the vCPU's 1 MiB of THR writes", move || {
                for i in 0..PATTERN_LEN {
                    // As a vCPU port exit does: the bus lock, then one byte to THR.
                    vcpu.lock().unwrap().write(0x3f8, DATA, &[pattern(i)]);
                }
            }),
            "a vCPU blocked on serial output"
        );
        // The pipe holds at most 64 KiB, the buffer CONSOLE_BUFFER: the rest was dropped.
        let (dropped, written, buffered) = (stats.dropped(), stats.written(), stats.buffered());
        assert!(dropped > 0, "nothing dropped");
        assert_eq!(dropped + written + buffered as u64, PATTERN_LEN as u64);
        assert!(buffered <= CONSOLE_BUFFER + WRITE_CHUNK);
        assert!(
            finishes("shutdown", move || drop(serial)),
            "dropping the UART hung on its output"
        );
        // What arrived: the first `n` bytes, in order (the writer stalled, then dropped).
        let mut got = Vec::new();
        // SAFETY: fcntl on an fd this test owns, with integer arguments.
        unsafe {
            libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK);
        }
        let _ = std::io::Read::read_to_end(&mut reader, &mut got);
        assert!(!got.is_empty());
        assert!(got.len() as u64 <= written);
        assert!(got.iter().enumerate().all(|(i, b)| *b == pattern(i)));
    }

    /// A `--serial file=` log stops at its cap; the bytes past it are counted as dropped.
    #[test]
    fn serial_file_capped() {
        let path = std::env::temp_dir().join(format!("serial-cap-{}.log", std::process::id()));
        let f = std::fs::File::create(&path).unwrap();
        let mut console = ConsoleOutput::file(f, 1000);
        let stats = console.stats();
        for i in 0..5000 {
            console.write_all(&[pattern(i)]).unwrap();
        }
        drop(console);
        let data = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(data.len(), 1000);
        assert!(data.iter().enumerate().all(|(i, b)| *b == pattern(i)));
        assert_eq!(stats.written(), 1000);
        assert_eq!(stats.dropped(), 4000);
    }
}
