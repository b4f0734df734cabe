//! A 16550A UART (COM1) as a port-I/O [`BusDevice`].
//!
//! Models the registers Linux's 8250 driver probes and uses: RBR/THR, IER, IIR/FCR, LCR, MCR
//! (with loopback), LSR, MSR, SCR and the DLL/DLM divisor latch behind LCR.DLAB. Transmission
//! is instant, so THR is always empty; received bytes queue in a FIFO. Interrupts leave
//! through an [`InterruptLine`] with edge semantics: the line is pulsed each time an enabled
//! interrupt condition becomes pending.
//!
//! Output never blocks the vCPU: [`ConsoleOutput`] puts transmitted bytes in a bounded buffer
//! that a writer thread drains to stdout or a file; when the reader falls behind (a stdout
//! pipe nobody reads, a stopped terminal) further bytes are dropped and counted, and a file
//! stops growing at its size cap ([`DEFAULT_FILE_CAP`]). The buffer and its thread are in
//! `console`.

mod console;

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

pub use console::{ConsoleOutput, ConsoleStats, CONSOLE_BUFFER, DEFAULT_FILE_CAP};

use devices::bus::BusDevice;

use crate::irq::InterruptLine;

const DATA: u64 = 0;
const IER: u64 = 1;
const IIR_FCR: u64 = 2;
const LCR: u64 = 3;
const MCR: u64 = 4;
const LSR: u64 = 5;
const MSR: u64 = 6;
const SCR: u64 = 7;

const IER_RDA: u8 = 0x01;
const IER_THRE: u8 = 0x02;
const IER_RLS: u8 = 0x04;
const IER_MS: u8 = 0x08;
const IER_MASK: u8 = 0x0f;

const IIR_NONE: u8 = 0x01;
const IIR_MS: u8 = 0x00;
const IIR_THRE: u8 = 0x02;
const IIR_RDA: u8 = 0x04;
const IIR_RLS: u8 = 0x06;
const IIR_FIFO_ENABLED: u8 = 0xc0;

const FCR_ENABLE: u8 = 0x01;
const FCR_CLEAR_RX: u8 = 0x02;

const LCR_DLAB: u8 = 0x80;

const MCR_DTR: u8 = 0x01;
const MCR_RTS: u8 = 0x02;
const MCR_OUT1: u8 = 0x04;
const MCR_OUT2: u8 = 0x08;
const MCR_LOOP: u8 = 0x10;
const MCR_MASK: u8 = 0x1f;

const LSR_DR: u8 = 0x01;
const LSR_OE: u8 = 0x02;
const LSR_THRE: u8 = 0x20;
const LSR_TEMT: u8 = 0x40;

const MSR_DCTS: u8 = 0x01;
const MSR_DDSR: u8 = 0x02;
const MSR_TERI: u8 = 0x04;
const MSR_DDCD: u8 = 0x08;
const MSR_CTS: u8 = 0x10;
const MSR_DSR: u8 = 0x20;
const MSR_RI: u8 = 0x40;
const MSR_DCD: u8 = 0x80;

/// Receive FIFO depth; further input is dropped (and flags an overrun).
pub const RX_FIFO_SIZE: usize = 64;
/// Divisor for 115200 baud at the standard 1.8432 MHz clock.
const DEFAULT_DIVISOR: u16 = 1;

/// The 16550A state.
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    lsr_errors: u8,
    msr: u8,
    scr: u8,
    divisor: u16,
    fifo_enabled: bool,
    thre_pending: bool,
    rx: VecDeque<u8>,
    out: Option<Box<dyn Write + Send>>,
    irq: Option<Arc<dyn InterruptLine>>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial")
            .field("ier", &self.ier)
            .field("lcr", &self.lcr)
            .field("mcr", &self.mcr)
            .field("rx_len", &self.rx.len())
            .field("has_irq", &self.irq.is_some())
            .finish()
    }
}

impl Serial {
    /// A UART writing to `out` (`None`: output discarded), raising `irq` when given.
    pub fn new(out: Option<Box<dyn Write + Send>>, irq: Option<Arc<dyn InterruptLine>>) -> Self {
        Self {
            ier: 0,
            lcr: 0x03, // 8N1
            mcr: MCR_OUT2,
            lsr_errors: 0,
            msr: MSR_DCD | MSR_DSR | MSR_CTS,
            scr: 0,
            divisor: DEFAULT_DIVISOR,
            fifo_enabled: false,
            thre_pending: false,
            rx: VecDeque::new(),
            out,
            irq,
        }
    }

    /// Sets (or clears) the interrupt line after construction.
    pub fn set_interrupt(&mut self, irq: Option<Arc<dyn InterruptLine>>) {
        self.irq = irq;
    }

    /// Queues bytes the guest will read from RBR. Returns how many were accepted.
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let was_empty = self.rx.is_empty();
        let room = RX_FIFO_SIZE.saturating_sub(self.rx.len());
        let n = bytes.len().min(room);
        self.rx.extend(&bytes[..n]);
        if n < bytes.len() {
            self.lsr_errors |= LSR_OE;
        }
        if was_empty && n > 0 && self.ier & IER_RDA != 0 {
            self.raise();
        }
        n
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        RX_FIFO_SIZE.saturating_sub(self.rx.len())
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn raise(&self) {
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.trigger() {
                log::warn!("Serial: cannot raise the interrupt: {e}");
            }
        }
    }

    fn iir(&self) -> u8 {
        let id = if self.ier & IER_RLS != 0 && self.lsr_errors != 0 {
            IIR_RLS
        } else if self.ier & IER_RDA != 0 && !self.rx.is_empty() {
            IIR_RDA
        } else if self.ier & IER_THRE != 0 && self.thre_pending {
            IIR_THRE
        } else if self.ier & IER_MS != 0 && self.msr & 0x0f != 0 {
            IIR_MS
        } else {
            IIR_NONE
        };
        id | if self.fifo_enabled {
            IIR_FIFO_ENABLED
        } else {
            0
        }
    }

    fn msr_value(&self) -> u8 {
        if self.loopback() {
            // Loopback wires the modem outputs to the modem inputs.
            let mut v = self.msr & 0x0f;
            if self.mcr & MCR_RTS != 0 {
                v |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                v |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                v |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                v |= MSR_DCD;
            }
            v
        } else {
            self.msr
        }
    }

    fn read_reg(&mut self, offset: u64) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.divisor as u8,
            DATA => self.rx.pop_front().unwrap_or(0),
            IER if dlab => (self.divisor >> 8) as u8,
            IER => self.ier,
            IIR_FCR => {
                let v = self.iir();
                // Reading IIR acknowledges a THR-empty interrupt.
                if v & 0x0f == IIR_THRE {
                    self.thre_pending = false;
                }
                v
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let mut v = LSR_THRE | LSR_TEMT | self.lsr_errors;
                if !self.rx.is_empty() {
                    v |= LSR_DR;
                }
                self.lsr_errors = 0;
                v
            }
            MSR => {
                let v = self.msr_value();
                self.msr &= !(MSR_DCTS | MSR_DDSR | MSR_TERI | MSR_DDCD);
                v
            }
            SCR => self.scr,
            _ => 0,
        }
    }

    fn transmit(&mut self, byte: u8) {
        if self.loopback() {
            self.queue_input(&[byte]);
        } else if let Some(out) = self.out.as_mut() {
            if let Err(e) = out.write_all(&[byte]).and_then(|_| out.flush()) {
                log::warn!("Serial: output failed, discarding further output: {e}");
                self.out = None;
            }
        }
        // THR is empty again at once.
        self.thre_pending = true;
        if self.ier & IER_THRE != 0 {
            self.raise();
        }
    }

    fn write_reg(&mut self, offset: u64, v: u8) {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            DATA if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(v),
            DATA => self.transmit(v),
            IER if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(v) << 8),
            IER => {
                let old = self.ier;
                self.ier = v & IER_MASK;
                // Enabling THRE while THR is empty raises it at once (8250 behaviour the
                // Linux driver relies on).
                let newly = self.ier & !old;
                if newly & IER_THRE != 0 {
                    self.thre_pending = true;
                }
                if (newly & IER_THRE != 0) || (newly & IER_RDA != 0 && !self.rx.is_empty()) {
                    self.raise();
                }
            }
            IIR_FCR => {
                self.fifo_enabled = v & FCR_ENABLE != 0;
                if v & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
            }
            LCR => self.lcr = v,
            MCR => self.mcr = v & MCR_MASK,
            SCR => self.scr = v,
            _ => {}
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = self.read_reg(offset);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.write_reg(offset, v);
        }
    }
}

/// A clonable in-memory sink for serial output (tests, and the payload runner).
#[derive(Clone, Debug, Default)]
pub struct CaptureBuffer(Arc<Mutex<Vec<u8>>>);

impl CaptureBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Write for CaptureBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("Capture buffer lock poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Restores the terminal settings of stdin when dropped.
#[derive(Debug)]
pub struct TerminalGuard {
    saved: libc::termios,
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        // SAFETY: `saved` is a termios obtained from tcgetattr on fd 0; restoring it has no
        // memory-safety preconditions.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// When stdin is a terminal: switches it to non-canonical, no-echo mode (Ctrl-C still stops
/// the VMM), and starts a thread that feeds typed bytes to `serial`. Returns the guard that
/// restores the terminal, or `None` when stdin is not a terminal.
pub fn spawn_stdin_reader(serial: Arc<Mutex<Serial>>) -> Option<TerminalGuard> {
    // SAFETY: isatty only inspects fd 0.
    if unsafe { libc::isatty(0) } != 1 {
        return None;
    }
    // SAFETY: an all-zero termios is a valid value to be overwritten by tcgetattr.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid, writable termios.
    if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
        return None;
    }
    let guard = TerminalGuard { saved: t };
    t.c_lflag &= !(libc::ICANON | libc::ECHO);
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: `t` is a valid termios derived from the current one.
    unsafe {
        libc::tcsetattr(0, libc::TCSANOW, &t);
    }
    let spawned = std::thread::Builder::new()
        .name("serial-stdin".into())
        .spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    return;
                }
                let mut pending = &buf[..n as usize];
                while !pending.is_empty() {
                    let taken = serial
                        .lock()
                        .map(|mut s| {
                            let k = s.input_room().min(pending.len());
                            s.queue_input(&pending[..k])
                        })
                        .unwrap_or(pending.len());
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("Cannot start the serial input thread: {e}");
    }
    Some(guard)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct Counter(AtomicUsize);
    impl InterruptLine for Counter {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn uart() -> (Serial, CaptureBuffer, Arc<Counter>) {
        let buf = CaptureBuffer::new();
        let irq = Arc::new(Counter::default());
        let s = Serial::new(Some(Box::new(buf.clone())), Some(irq.clone()));
        (s, buf, irq)
    }

    fn rd(s: &mut Serial, off: u64) -> u8 {
        let mut b = [0u8];
        s.read(0x3f8, off, &mut b);
        b[0]
    }

    fn wr(s: &mut Serial, off: u64, v: u8) {
        s.write(0x3f8, off, &[v]);
    }

    #[test]
    fn transmit_goes_to_output() {
        let (mut s, buf, irq) = uart();
        for b in b"Hi\n" {
            wr(&mut s, DATA, *b);
        }
        assert_eq!(buf.contents(), b"Hi\n");
        assert_eq!(rd(&mut s, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        // No interrupt without IER.
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn divisor_latch_behind_dlab() {
        let (mut s, buf, _) = uart();
        wr(&mut s, LCR, 0x83);
        wr(&mut s, DATA, 0x0c);
        wr(&mut s, IER, 0x00);
        assert_eq!(rd(&mut s, DATA), 0x0c);
        assert_eq!(rd(&mut s, IER), 0x00);
        wr(&mut s, LCR, 0x03);
        assert_eq!(s.divisor, 0x000c);
        // The DLL write did not transmit.
        assert!(buf.contents().is_empty());
        assert_eq!(rd(&mut s, LCR), 0x03);
    }

    #[test]
    fn ier_probe_and_scratch_like_linux() {
        let (mut s, _, _) = uart();
        wr(&mut s, SCR, 0xa5);
        assert_eq!(rd(&mut s, SCR), 0xa5);
        wr(&mut s, IER, 0);
        assert_eq!(rd(&mut s, IER), 0);
        wr(&mut s, IER, 0xff);
        assert_eq!(rd(&mut s, IER), 0x0f);
    }

    #[test]
    fn loopback_maps_modem_lines() {
        let (mut s, buf, _) = uart();
        wr(&mut s, MCR, MCR_LOOP | 0x0a);
        assert_eq!(rd(&mut s, MSR) & 0xf0, 0x90);
        wr(&mut s, DATA, 0x55);
        assert!(buf.contents().is_empty());
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, DATA), 0x55);
        wr(&mut s, MCR, MCR_OUT2);
        assert_eq!(rd(&mut s, MSR) & 0xf0, 0xb0);
    }

    #[test]
    fn fifo_reported_in_iir() {
        let (mut s, _, _) = uart();
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
        wr(&mut s, IIR_FCR, 0x07);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE | IIR_FIFO_ENABLED);
    }

    #[test]
    fn thre_interrupt_raised_and_acked() {
        let (mut s, _, irq) = uart();
        wr(&mut s, IER, IER_THRE);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_THRE);
        // Reading IIR acknowledged it.
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
        wr(&mut s, DATA, b'x');
        assert_eq!(irq.0.load(Ordering::SeqCst), 2);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_THRE);
    }

    #[test]
    fn input_raises_rda_and_drains() {
        let (mut s, _, irq) = uart();
        wr(&mut s, IER, IER_RDA);
        assert_eq!(irq.0.load(Ordering::SeqCst), 0);
        assert_eq!(s.queue_input(b"ab"), 2);
        assert_eq!(irq.0.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_RDA);
        assert_eq!(rd(&mut s, DATA), b'a');
        assert_eq!(rd(&mut s, DATA), b'b');
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut s, IIR_FCR), IIR_NONE);
        // Overflow is bounded and flagged.
        let big = vec![b'z'; RX_FIFO_SIZE + 5];
        assert_eq!(s.queue_input(&big), RX_FIFO_SIZE);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, LSR_OE);
        assert_eq!(rd(&mut s, LSR) & LSR_OE, 0);
    }
}
