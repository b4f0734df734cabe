//! A limit on the warnings a guest (or a device) can make the VMM log.
//!
//! A guest that rewrites a BAR or an MSI-X entry in a loop must not turn each write into a
//! log line: [`GuestWarn`] logs the first [`BURST`] warnings of each [`WINDOW`], counts the
//! rest, and reports the count with the next warning it lets through.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Warnings logged per window.
pub const BURST: u32 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    total: u64,
}

/// A rate limit for guest-triggered warnings, one per source (device, bus).
#[derive(Debug)]
pub struct GuestWarn {
    state: Mutex<State>,
}

impl Default for GuestWarn {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
                total: 0,
            }),
        }
    }
}

impl GuestWarn {
    /// A limiter with nothing logged yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Logs `args` as a warning unless this window's burst is used up; returns whether it
    /// was logged.
    pub fn warn(&self, args: std::fmt::Arguments<'_>) -> bool {
        self.warn_at(Instant::now(), args)
    }

    /// [`Self::warn`] at a given time (tests).
    pub fn warn_at(&self, now: Instant, args: std::fmt::Arguments<'_>) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_add(1);
        let fresh = s
            .window_start
            .is_none_or(|t| now.saturating_duration_since(t) >= WINDOW);
        if fresh {
            s.window_start = Some(now);
            s.in_window = 0;
        }
        if s.in_window >= BURST {
            s.suppressed = s.suppressed.saturating_add(1);
            return false;
        }
        s.in_window += 1;
        let suppressed = std::mem::take(&mut s.suppressed);
        drop(s);
        if suppressed > 0 {
            log::warn!("{args} ({suppressed} similar warnings suppressed)");
        } else {
            log::warn!("{args}");
        }
        true
    }

    /// Every warning asked for, logged or not.
    pub fn total(&self) -> u64 {
        self.state.lock().map(|s| s.total).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_per_window_and_counts_the_rest() {
        let w = GuestWarn::new();
        let t0 = Instant::now();
        let logged = (0..100)
            .filter(|_| w.warn_at(t0, format_args!("guest did it")))
            .count();
        assert_eq!(logged, BURST as usize);
        assert_eq!(w.total(), 100);
        assert!(w.warn_at(t0 + WINDOW, format_args!("again")));
    }
}
