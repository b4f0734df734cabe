//! For the project's own tests only: a test that cannot run on this machine (no `/dev/kvm`,
//! no header, no tool) says why and records itself, so that `scripts/test` counts it as
//! skipped rather than passed. Not part of the crate's API.

use std::io::Write;

/// Prints `SKIP <test>: <reason>` and, when `$IOASID_TEST_SKIPS` names a file (set by
/// `scripts/test`), appends `<test>\t<reason>` to it. `test` empty: the name of the current
/// thread, which libtest names after the running test.
pub fn record(test: &str, reason: &str) {
    record_to(
        std::env::var_os("IOASID_TEST_SKIPS").as_deref(),
        test,
        reason,
    );
}

/// [`record`] into the file `path` (none: print only).
fn record_to(path: Option<&std::ffi::OsStr>, test: &str, reason: &str) {
    let thread = std::thread::current();
    let test = match test {
        "" => thread.name().unwrap_or("unnamed test"),
        t => t,
    };
    // The summary names the test by its last path segment, as cargo's own lines do not.
    let test = test.rsplit("::").next().unwrap_or(test);
    println!("SKIP {test}: {reason}");
    let Some(path) = path else {
        return;
    };
    let line = format!("{test}\t{}\n", reason.replace(['\t', '\n'], " "));
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("SKIP {test}: cannot record the skip in {path:?}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skip_is_recorded_under_the_running_test_name() {
        let dir = std::env::temp_dir().join(format!("ioasid-skip-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        record_to(Some(dir.as_os_str()), "", "no\tthing\nhere");
        record_to(Some(dir.as_os_str()), "named", "why");
        let got = std::fs::read_to_string(&dir).unwrap_or_default();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(
            got,
            "a_skip_is_recorded_under_the_running_test_name\tno thing here\nnamed\twhy\n"
        );
    }
}
