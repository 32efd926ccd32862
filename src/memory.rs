//! Resident-memory readings of this process (Linux `/proc/self/status`).

/// Peak resident set size (`VmHWM`) in bytes, if the platform reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_field("VmHWM:")
}

/// Current resident set size (`VmRSS`) in bytes, if the platform reports it.
pub fn current_rss_bytes() -> Option<u64> {
    status_field("VmRSS:")
}

/// Resets the peak (`VmHWM`) to the current RSS, where the kernel allows it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_field(name: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Memory the system can still give this process without swapping (`MemAvailable` of
/// `/proc/meminfo`), in bytes, where the platform reports it.
pub fn available_bytes() -> Option<u64> {
    meminfo_field("MemAvailable:")
}

/// Physical memory of the machine (`MemTotal` of `/proc/meminfo`), in bytes.
pub fn total_bytes() -> Option<u64> {
    meminfo_field("MemTotal:")
}

fn meminfo_field(name: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with(name))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Bytes as GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0 * 1024.0)
}
