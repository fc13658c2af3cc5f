//! The wall clock as the replicated objects record it.
//!
//! Owns nothing. Must never be read inside a Raft apply (replicated timestamps come from
//! the proposer's transaction, so every manager writes the same values).

/// Now, in Unix milliseconds (0 before 1970, saturating far in the future).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
