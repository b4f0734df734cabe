//! The L3 guest's kernel log (`klogctl`, what busybox `dmesg` prints), and the lines of it
//! that the vIOMMU checks read: the DMAR units intel-iommu found, and signs of trouble.

/// `SYSLOG_ACTION_READ_ALL`: read the whole ring buffer, leaving it in place.
const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
/// `SYSLOG_ACTION_SIZE_BUFFER`: the ring buffer's size.
const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;

/// The kernel log as text, one message per line (the `<level>` prefixes stripped).
pub fn read() -> Result<String, String> {
    // SAFETY: SIZE_BUFFER ignores the buffer arguments and returns a size or -1.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size)
        .map_err(|_| format!("klogctl(SIZE_BUFFER): {}", std::io::Error::last_os_error()))?;
    let mut buf = vec![0u8; size.clamp(4096, 1 << 22)];
    let len = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which is at least that long
    // and lives across the call.
    let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), len) };
    let n = usize::try_from(n)
        .map_err(|_| format!("klogctl(READ_ALL): {}", std::io::Error::last_os_error()))?;
    let text = String::from_utf8_lossy(&buf[..n.min(buf.len())]).into_owned();
    Ok(text.lines().map(strip_level).collect::<Vec<_>>().join("\n"))
}

/// A log line without its `<N>` level prefix and `[ seconds]` timestamp.
fn strip_level(line: &str) -> &str {
    let mut l = line;
    if let Some(rest) = l.strip_prefix('<') {
        if let Some((lvl, after)) = rest.split_once('>') {
            if lvl.chars().all(|c| c.is_ascii_digit()) {
                l = after;
            }
        }
    }
    if let Some(rest) = l.strip_prefix('[') {
        if let Some((_, after)) = rest.split_once(']') {
            l = after.trim_start();
        }
    }
    l
}

/// One DMAR unit as intel-iommu's `alloc_iommu` reports it:
/// `DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap d2008c22260286 ecap f00f5e`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarUnit {
    /// `dmar0`, ...
    pub name: String,
    /// The register base (the DRHD's address).
    pub base: u64,
    /// VER_REG major and minor.
    pub ver: (u32, u32),
    /// CAP_REG as the driver read it.
    pub cap: u64,
    /// ECAP_REG as the driver read it.
    pub ecap: u64,
}

/// Every `reg_base_addr` line of `log`, in order.
pub fn dmar_units(log: &str) -> Vec<DmarUnit> {
    log.lines().filter_map(parse_unit).collect()
}

fn parse_unit(line: &str) -> Option<DmarUnit> {
    let (head, rest) = line.split_once(": reg_base_addr ")?;
    let name = head.rsplit(' ').next()?.to_string();
    let w: Vec<&str> = rest.split_whitespace().collect();
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    match w.as_slice() {
        [base, "ver", ver, "cap", cap, "ecap", ecap, ..] => {
            let (maj, min) = ver.split_once(':')?;
            Some(DmarUnit {
                name,
                base: hex(base)?,
                ver: (maj.parse().ok()?, min.parse().ok()?),
                cap: hex(cap)?,
                ecap: hex(ecap)?,
            })
        }
        _ => None,
    }
}

/// Whether some line of `log` contains `needle`.
pub fn has(log: &str, needle: &str) -> bool {
    log.lines().any(|l| l.contains(needle))
}

/// Lines that say the kernel is unwell: oopses, BUGs, WARNs, RCU or hung-task stalls, and
/// intel-iommu's invalidation-queue errors (a queue the VMM's model did not complete).
pub fn trouble(log: &str) -> Vec<String> {
    const SIGNS: &[&str] = &[
        "BUG:",
        "WARNING:",
        "Oops",
        "Kernel panic",
        "general protection fault",
        "rcu_sched detected stall",
        "rcu: INFO:",
        "blocked for more than",
        "Invalidation Queue Error",
        "Invalidation Time-out Error",
        "Invalidation Completion Error",
    ];
    log.lines()
        .filter(|l| SIGNS.iter().any(|s| l.contains(s)))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_alloc_iommu_line() {
        let log = "<6>DMAR: Host address width 39\n\
                   <6>DMAR: DRHD base: 0x000000fed90000 flags: 0x0\n\
                   <6>[    0.012345] DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap d2008c22260286 ecap f00f5e\n";
        let text: String = log.lines().map(strip_level).collect::<Vec<_>>().join("\n");
        let units = dmar_units(&text);
        assert_eq!(
            units,
            vec![DmarUnit {
                name: "dmar0".into(),
                base: 0xfed9_0000,
                ver: (1, 0),
                cap: 0xd2_008c_2226_0286,
                ecap: 0xf0_0f5e,
            }]
        );
    }

    #[test]
    fn odd_lines_are_not_units() {
        for l in [
            "DMAR: dmar0: reg_base_addr zz ver 1:0 cap 1 ecap 2",
            "DMAR: dmar0: reg_base_addr fed90000 ver 1 cap 1 ecap 2",
            "DMAR: dmar0: reg_base_addr fed90000",
            "",
        ] {
            assert_eq!(dmar_units(l), vec![], "{l:?}");
        }
    }

    #[test]
    fn trouble_finds_oops_and_qi_errors() {
        let log = "DMAR: IOMMU enabled\nWARNING: CPU: 0 PID: 1 at x\nDMAR: VT-d detected Invalidation Time-out Error: SID 0\nfine";
        assert_eq!(trouble(log).len(), 2);
        assert!(trouble("DMAR: IOMMU enabled\nfine").is_empty());
    }
}
