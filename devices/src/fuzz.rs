//! Seeded property runs ("fuzz targets") for the guest- and device-facing parsers of this
//! crate: a small deterministic generator and the seed/budget plumbing. Each target is a
//! plain `#[test]` with a fixed case budget, so it runs in `cargo test` on stable Rust. The
//! seed is printed; `FUZZ_SEED=<n>` replays a run and `FUZZ_CASES=<n>` changes the budget.
//! Every failure found becomes a named regression test next to the target.
#![allow(clippy::unwrap_used, clippy::panic)]

/// A splitmix64 generator: deterministic, no dependencies, good enough to spread cases.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A `usize` in `0..n`.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    /// One element of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.index(items.len())]
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The seed of a target run: `FUZZ_SEED` when set, else `default`. Printed, so a failing
/// CI log names the run to replay.
pub fn seed(target: &str, default: u64) -> u64 {
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let cases = cases(0);
    eprintln!("{target}: seed {seed} (replay with FUZZ_SEED={seed}{})", {
        if cases > 0 {
            format!(" FUZZ_CASES={cases}")
        } else {
            String::new()
        }
    });
    seed
}

/// The case budget: `FUZZ_CASES` when set, else `default`.
pub fn cases(default: usize) -> usize {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

thread_local! {
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs (once) a panic hook that keeps the report of a panic on a fuzz target's thread
/// for [`run`] instead of printing it with a backtrace per case; other threads' panics go
/// to the previous hook.
fn quiet_fuzz_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let fuzzing = std::thread::current()
                .name()
                .is_some_and(|n| n.contains("fuzz"));
            if !fuzzing {
                return previous(info);
            }
            let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = info.payload().downcast_ref::<String>() {
                s.clone()
            } else {
                "panic".to_string()
            };
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(format!("{at}: {msg}")));
        }));
    });
}

/// Runs `case` for `budget` cases with per-case generators derived from `seed`; a panic in
/// a case is caught and reported with the case's own seed, and the run fails at the end
/// with the number of failing cases.
pub fn run(target: &str, seed: u64, budget: usize, mut case: impl FnMut(&mut Rng)) -> usize {
    quiet_fuzz_panics();
    let mut failures = Vec::new();
    let mut master = Rng::new(seed);
    for i in 0..budget {
        let case_seed = master.next_u64();
        let mut rng = Rng::new(case_seed);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&mut rng)));
        if r.is_err() {
            let what = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_default();
            failures.push((i, case_seed, what));
        }
    }
    let mut by_site: std::collections::BTreeMap<&str, usize> = Default::default();
    for (_, _, what) in &failures {
        *by_site
            .entry(what.split(": ").next().unwrap_or(""))
            .or_default() += 1;
    }
    for (site, n) in &by_site {
        eprintln!("{target}: {n} failing cases at {site}");
    }
    for (i, s, what) in failures.iter().take(10) {
        eprintln!("{target}: case {i} failed (case seed {s:#x}): {what}");
    }
    failures.len()
}
