//! This process's memory use, as Linux reports it (`/proc/self/status`).
//!
//! Must never be used for decisions, only for reports: it is a sample, and other threads
//! allocate at the same time.

/// The resident set size in KiB, or `None` where `/proc` is unavailable.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn resident_set_is_reported_and_grows_with_touched_memory() {
        let before = super::rss_kib().unwrap();
        let block = vec![1u8; 32 << 20];
        let after = super::rss_kib().unwrap();
        assert!(after >= before + 16 * 1024, "{before} KiB -> {after} KiB");
        drop(block);
    }
}
