//! This process's memory use, as Linux reports it (`/proc/self/status`), and handing freed
//! memory back to the system.
//!
//! [`rss_kib`] must never be used for decisions, only for reports: it is a sample, and
//! other threads allocate at the same time. [`release_free_memory`] is one of the crate's
//! few `unsafe` blocks outside `agent::sys` (the others: `util::fdlimit`): a plain call of
//! glibc's `malloc_trim`.

/// The resident set size in KiB, or `None` where `/proc` is unavailable.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Returns the memory the allocator holds free to the system (glibc's `malloc_trim(0)`:
/// every arena's free pages, not only the top of the heap). glibc keeps freed memory for
/// reuse, so after a load is gone a process stays as large as at its peak: a manager that
/// held 100,000 tasks stayed at 600 MB with 150 MB in use. Call it when a large amount
/// was just freed and the process is idle (it walks every arena: milliseconds per GB).
/// Does nothing where the C library is not glibc.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[allow(unsafe_code)]
    // SAFETY: malloc_trim takes an integer, touches only the allocator's own state (under
    // its locks, like any malloc call) and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
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

    #[test]
    fn releasing_free_memory_keeps_what_is_in_use() {
        let kept = std::hint::black_box(vec![3u8; 1 << 20]);
        let freed: Vec<Vec<u8>> = (0..64).map(|i| vec![i as u8; 64 << 10]).collect();
        drop(std::hint::black_box(freed));
        super::release_free_memory();
        assert!(kept.iter().all(|&b| b == 3));
    }
}
