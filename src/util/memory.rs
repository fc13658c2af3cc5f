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
    fn resident_set_counts_touched_memory() {
        // Holding a touched 64 MiB block, the process cannot be resident in less than that
        // (other tests in this process only add to it). black_box keeps the block alive.
        let block = std::hint::black_box(vec![1u8; 64 << 20]);
        let rss_kib = super::rss_kib().unwrap();
        assert!(
            rss_kib >= 60 * 1024,
            "RSS {rss_kib} KiB while holding 64 MiB"
        );
        drop(std::hint::black_box(block));
    }
}
