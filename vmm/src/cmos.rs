//! The CMOS real-time clock at ports 0x70/0x71 (an MC146818 as PCs have it), enough for
//! Linux's `rtc_cmos` and its boot-time clock read.
//!
//! Without it, every read of port 0x71 returns 0xFF, which Linux takes for "update in
//! progress" and polls for seconds during boot (`rtc_cmos: broken or not accessible`). The
//! clock reads the host's UTC time at each access, in BCD and 24-hour mode; it has no alarm
//! and raises no interrupt (IRQ 8 is not wired). The other 114 bytes are plain CMOS RAM.
//! Guest writes to the time registers are accepted and ignored: the guest cannot set the
//! host's clock, and nothing else depends on them.

use std::time::{SystemTime, UNIX_EPOCH};

use devices::bus::BusDevice;

/// The first port (index register); the data register follows it.
pub const CMOS_PORT: u64 = 0x70;
/// The number of ports.
pub const CMOS_PORT_COUNT: u64 = 2;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: 32.768 kHz time base, 1024 Hz rate; update-in-progress (bit 7) always clear.
const STATUS_A: u8 = 0x26;
/// Status B: 24-hour mode (bit 1); BCD (bit 2 clear); no interrupts enabled.
const STATUS_B: u8 = 0x02;
/// Status D: valid RAM and time (bit 7).
const STATUS_D: u8 = 0x80;

/// A civil date and time in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilTime {
    /// Full year (e.g. 2026).
    pub year: u32,
    /// 1..=12.
    pub month: u32,
    /// 1..=31.
    pub day: u32,
    /// 0..=23.
    pub hour: u32,
    /// 0..=59.
    pub minute: u32,
    /// 0..=59.
    pub second: u32,
    /// 1 (Sunday) ..= 7, as the RTC counts.
    pub weekday: u32,
}

impl CivilTime {
    /// The civil time `secs` seconds after 1970-01-01 00:00:00 UTC (days-from-civil inverse,
    /// proleptic Gregorian calendar).
    pub fn from_unix(secs: u64) -> Self {
        let days = secs / 86_400;
        let rem = secs % 86_400;
        // 1970-01-01 was a Thursday (RTC weekday 5).
        let weekday = ((days + 4) % 7) as u32 + 1;
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
        CivilTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            weekday,
        }
    }
}

fn bcd(v: u32) -> u8 {
    let v = v % 100;
    ((v / 10) << 4 | (v % 10)) as u8
}

/// The CMOS RTC device.
pub struct Cmos {
    index: u8,
    ram: [u8; 128],
    now: Box<dyn Fn() -> u64 + Send>,
}

impl std::fmt::Debug for Cmos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmos").field("index", &self.index).finish()
    }
}

impl Default for Cmos {
    fn default() -> Self {
        Self::new()
    }
}

impl Cmos {
    /// A CMOS RTC reading the host's clock.
    pub fn new() -> Self {
        Self::with_clock(Box::new(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        }))
    }

    /// A CMOS RTC reading `now` (seconds since the Unix epoch) instead of the host's clock.
    pub fn with_clock(now: Box<dyn Fn() -> u64 + Send>) -> Self {
        Cmos {
            index: 0,
            ram: [0; 128],
            now,
        }
    }

    fn register(&self, index: u8) -> u8 {
        let t = || CivilTime::from_unix((self.now)());
        match index {
            REG_SECONDS => bcd(t().second),
            REG_MINUTES => bcd(t().minute),
            REG_HOURS => bcd(t().hour),
            REG_WEEKDAY => bcd(t().weekday),
            REG_DAY => bcd(t().day),
            REG_MONTH => bcd(t().month),
            REG_YEAR => bcd(t().year),
            REG_CENTURY => bcd(t().year / 100),
            REG_A => STATUS_A,
            REG_B => STATUS_B,
            REG_C => 0,
            REG_D => STATUS_D,
            i => self.ram[usize::from(i & 0x7f)],
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => self.index,
            1 => self.register(self.index),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            // Bit 7 is the NMI mask on PCs; the index is the low 7 bits.
            0 => self.index = v & 0x7f,
            1 => match self.index {
                REG_SECONDS..=REG_YEAR | REG_A..=REG_D | REG_CENTURY => {}
                i => self.ram[usize::from(i)] = v,
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn read(c: &mut Cmos, index: u8) -> u8 {
        c.write(CMOS_PORT, 0, &[index]);
        let mut b = [0u8];
        c.read(CMOS_PORT, 1, &mut b);
        b[0]
    }

    #[test]
    fn civil_time_of_known_instants() {
        assert_eq!(
            CivilTime::from_unix(0),
            CivilTime {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 5
            }
        );
        // 2000-02-29 12:34:56 UTC, a Tuesday.
        assert_eq!(
            CivilTime::from_unix(951_827_696),
            CivilTime {
                year: 2000,
                month: 2,
                day: 29,
                hour: 12,
                minute: 34,
                second: 56,
                weekday: 3
            }
        );
        // 2026-11-25 00:00:00 UTC, a Wednesday.
        assert_eq!(
            CivilTime::from_unix(1_795_564_800),
            CivilTime {
                year: 2026,
                month: 11,
                day: 25,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 4
            }
        );
    }

    #[test]
    fn registers_read_bcd_time_and_sane_status() {
        let mut c = Cmos::with_clock(Box::new(|| 951_827_696));
        assert_eq!(read(&mut c, REG_SECONDS), 0x56);
        assert_eq!(read(&mut c, REG_MINUTES), 0x34);
        assert_eq!(read(&mut c, REG_HOURS), 0x12);
        assert_eq!(read(&mut c, REG_DAY), 0x29);
        assert_eq!(read(&mut c, REG_MONTH), 0x02);
        assert_eq!(read(&mut c, REG_YEAR), 0x00);
        assert_eq!(read(&mut c, REG_CENTURY), 0x20);
        assert_eq!(
            read(&mut c, REG_A) & 0x80,
            0,
            "update-in-progress must be clear"
        );
        assert_eq!(read(&mut c, REG_B) & 0x06, 0x02, "24-hour BCD mode");
        assert_eq!(read(&mut c, REG_D), 0x80);
    }

    #[test]
    fn ram_keeps_writes_and_time_ignores_them() {
        let mut c = Cmos::with_clock(Box::new(|| 0));
        c.write(CMOS_PORT, 0, &[0x80 | 0x40]);
        c.write(CMOS_PORT, 1, &[0xa5]);
        assert_eq!(read(&mut c, 0x40), 0xa5);
        c.write(CMOS_PORT, 0, &[REG_SECONDS]);
        c.write(CMOS_PORT, 1, &[0x59]);
        assert_eq!(read(&mut c, REG_SECONDS), 0x00);
        // Odd offsets and empty accesses are harmless.
        c.write(CMOS_PORT, 7, &[1]);
        c.write(CMOS_PORT, 1, &[]);
        let mut b = [0u8; 2];
        c.read(CMOS_PORT, 3, &mut b);
        assert_eq!(b, [0xff, 0]);
    }
}
