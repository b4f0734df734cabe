//! `lifecycle`: the guest side of `linux_guest_lifecycle_via_rest`. The edu checks, then a
//! stretch of guest-clock ticks during which the host pauses and resumes the VM, then the
//! edu checks again; then it idles until the host shuts the VM down.

use std::time::{Duration, Instant, SystemTime};

use super::report;
use super::tasks::edu_all;

/// Ticks of [`TICK`] each printed while the host pauses and resumes the VM.
const TICKS: u32 = 40;
/// One tick of the guest's clock.
const TICK: Duration = Duration::from_millis(250);

/// See the module documentation. `L3-READY pause` tells the host the ticks start;
/// `L3-READY shutdown` that the second round of checks is done.
pub fn lifecycle() {
    edu_all("");
    let mono = Instant::now();
    let real = SystemTime::now();
    println!("L3-READY pause");
    let mut last = Duration::ZERO;
    let mut monotonic_ok = true;
    for n in 0..TICKS {
        std::thread::sleep(TICK);
        let now = mono.elapsed();
        monotonic_ok &= now > last;
        last = now;
        println!("L3-TICK {n} {} ms", now.as_millis());
    }
    let real_ms = real.elapsed().map(|d| d.as_millis()).unwrap_or(0);
    let slept = TICK * TICKS;
    report(
        "clock",
        &if monotonic_ok && last >= slept {
            Ok(format!(
                "{TICKS} sleeps of {} ms: monotonic {} ms, realtime {real_ms} ms",
                TICK.as_millis(),
                last.as_millis()
            ))
        } else {
            Err(format!(
                "monotonic clock went back or stalled: {} ms after {TICKS} sleeps of {} ms",
                last.as_millis(),
                TICK.as_millis()
            ))
        },
    );
    edu_all("resumed_");
    println!("L3-READY shutdown");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
