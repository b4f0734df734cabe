//! Reading the one-number sysfs files (`vendor`, `device`, VT-d `cap`/`ecap`, ...).

use std::path::Path;

/// The hexadecimal number (with or without `0x`) in the file at `p`.
pub fn read_hex(p: &Path) -> Result<u64, String> {
    let t = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    u64::from_str_radix(t.trim().trim_start_matches("0x"), 16)
        .map_err(|e| format!("{}: {e}", p.display()))
}
