//! [`FailureRateLimiter`]: refuses join attempts from a source address that failed too often.
//!
//! The rule is a sliding window: a source that failed [`FailureLimits::failures_max`] times
//! within [`FailureLimits::window`] is refused until the oldest of those failures leaves the
//! window (swarmkit allows 3 attempts per 8 s). Refused attempts are not checked and not
//! counted, so being refused costs the CA nothing and reveals nothing.
//!
//! Memory is bounded: at most [`FailureLimits::tracked_sources_max`] sources, each keeping at
//! most `failures_max` instants; when full, the source whose last failure is oldest is
//! forgotten. IPv6 sources are grouped by /64 (one host usually owns a whole /64, so counting
//! single addresses would let it dodge the limit); IPv4-mapped IPv6 counts as IPv4.
//! The 128-bit secret is what actually resists guessing; this limiter keeps noise and
//! brute-force load off the CA. Sans-IO: callers pass the current `Instant`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// Limits of the failure rate limiter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailureLimits {
    /// Failures allowed in one window before the source is refused (default 3).
    pub failures_max: usize,
    /// Length of the sliding window (default 8 s).
    pub window: Duration,
    /// Sources remembered at once (default 4096, about 400 KiB at most).
    pub tracked_sources_max: usize,
}

impl Default for FailureLimits {
    fn default() -> Self {
        FailureLimits {
            failures_max: 3,
            window: Duration::from_secs(8),
            tracked_sources_max: 4096,
        }
    }
}

/// A source is refused; it may try again after `retry_after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimited {
    /// How long until the next attempt will be checked.
    pub retry_after: Duration,
}

struct Source {
    /// Instants of the most recent failures, oldest first, at most `failures_max`.
    failures: VecDeque<Instant>,
    /// Recency key in `FailureRateLimiter::by_recency`.
    sequence: u64,
}

/// Counts failed attempts per source address (see the module documentation).
pub struct FailureRateLimiter {
    limits: FailureLimits,
    sources: HashMap<IpAddr, Source>,
    /// Sources ordered by their last failure, for eviction.
    by_recency: BTreeMap<u64, IpAddr>,
    next_sequence: u64,
}

impl FailureRateLimiter {
    /// A limiter with `limits`.
    ///
    /// # Panics
    /// When a limit is zero (a limiter that refuses or forgets everything is a bug).
    pub fn new(limits: FailureLimits) -> FailureRateLimiter {
        assert!(limits.failures_max > 0, "failures_max must be positive");
        assert!(!limits.window.is_zero(), "window must be positive");
        assert!(
            limits.tracked_sources_max > 0,
            "tracked_sources_max must be positive"
        );
        FailureRateLimiter {
            limits,
            sources: HashMap::new(),
            by_recency: BTreeMap::new(),
            next_sequence: 0,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &FailureLimits {
        &self.limits
    }

    /// Whether `source` may make an attempt at `now`.
    ///
    /// # Errors
    /// [`RateLimited`] with the time left until the oldest counted failure leaves the window.
    pub fn check(&self, source: IpAddr, now: Instant) -> Result<(), RateLimited> {
        let Some(entry) = self.sources.get(&source_key(source)) else {
            return Ok(());
        };
        if entry.failures.len() < self.limits.failures_max {
            return Ok(());
        }
        let oldest = *entry
            .failures
            .front()
            .expect("failures_max > 0 failures are stored");
        let free_at = oldest + self.limits.window;
        if now < free_at {
            Err(RateLimited {
                retry_after: free_at - now,
            })
        } else {
            Ok(())
        }
    }

    /// Records a failed attempt by `source` at `now`.
    pub fn record_failure(&mut self, source: IpAddr, now: Instant) {
        let key = source_key(source);
        if !self.sources.contains_key(&key) && self.sources.len() >= self.limits.tracked_sources_max
        {
            self.evict_least_recent();
        }
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let entry = self.sources.entry(key).or_insert_with(|| Source {
            failures: VecDeque::with_capacity(self.limits.failures_max),
            sequence,
        });
        self.by_recency.remove(&entry.sequence);
        entry.sequence = sequence;
        self.by_recency.insert(sequence, key);
        if entry.failures.len() == self.limits.failures_max {
            entry.failures.pop_front();
        }
        entry.failures.push_back(now);
        debug_assert!(entry.failures.len() <= self.limits.failures_max);
        debug_assert_eq!(self.sources.len(), self.by_recency.len());
        assert!(self.sources.len() <= self.limits.tracked_sources_max);
    }

    /// Forgets the failures of `source` after it succeeded.
    pub fn record_success(&mut self, source: IpAddr) {
        if let Some(entry) = self.sources.remove(&source_key(source)) {
            self.by_recency.remove(&entry.sequence);
        }
    }

    /// How many sources are tracked now.
    pub fn tracked_sources(&self) -> usize {
        self.sources.len()
    }

    fn evict_least_recent(&mut self) {
        if let Some((_, key)) = self.by_recency.pop_first() {
            self.sources.remove(&key);
        }
    }
}

/// The address a source is counted under: IPv4 as is, IPv4-mapped IPv6 as IPv4, other IPv6
/// by its /64 prefix.
fn source_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = v6.to_bits() & !u128::from(u64::MAX);
                IpAddr::V6(Ipv6Addr::from_bits(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    #[test]
    fn three_failures_in_eight_seconds_block_until_the_first_leaves_the_window() {
        let mut limiter = FailureRateLimiter::new(FailureLimits::default());
        let t0 = Instant::now();
        let a = ip(1);
        for i in 0..3 {
            assert_eq!(limiter.check(a, t0 + Duration::from_secs(i)), Ok(()));
            limiter.record_failure(a, t0 + Duration::from_secs(i));
        }
        assert_eq!(
            limiter.check(a, t0 + Duration::from_secs(3)),
            Err(RateLimited {
                retry_after: Duration::from_secs(5)
            })
        );
        // Another address is unaffected.
        assert_eq!(limiter.check(ip(2), t0 + Duration::from_secs(3)), Ok(()));
        // Once the first failure is 8 s old, one more attempt is allowed...
        assert_eq!(limiter.check(a, t0 + Duration::from_secs(8)), Ok(()));
        limiter.record_failure(a, t0 + Duration::from_secs(8));
        // ...and failing it blocks again until the second failure (t0+1) expires.
        assert_eq!(
            limiter.check(a, t0 + Duration::from_secs(8)),
            Err(RateLimited {
                retry_after: Duration::from_secs(1)
            })
        );
        assert_eq!(limiter.check(a, t0 + Duration::from_secs(9)), Ok(()));
    }

    #[test]
    fn success_clears_the_count() {
        let mut limiter = FailureRateLimiter::new(FailureLimits::default());
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.record_failure(ip(1), t0);
        }
        assert!(limiter.check(ip(1), t0).is_err());
        limiter.record_success(ip(1));
        assert_eq!(limiter.check(ip(1), t0), Ok(()));
        assert_eq!(limiter.tracked_sources(), 0);
    }

    #[test]
    fn memory_is_bounded_and_the_least_recent_source_is_evicted() {
        let limits = FailureLimits {
            tracked_sources_max: 4,
            ..FailureLimits::default()
        };
        let mut limiter = FailureRateLimiter::new(limits);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.record_failure(ip(0), t0);
        }
        for last in 1..=3 {
            limiter.record_failure(ip(last), t0);
        }
        // ip(0) failed again most recently of all, so it is not the one evicted.
        limiter.record_failure(ip(0), t0);
        for last in 4..=100 {
            limiter.record_failure(ip(last), t0);
            assert!(limiter.tracked_sources() <= 4);
        }
        assert_eq!(limiter.tracked_sources(), 4);
        // ip(0) was eventually evicted by the flood: its state is gone.
        assert_eq!(limiter.check(ip(0), t0), Ok(()));
    }

    #[test]
    fn eviction_order_follows_last_failure() {
        let limits = FailureLimits {
            tracked_sources_max: 2,
            ..FailureLimits::default()
        };
        let mut limiter = FailureRateLimiter::new(limits);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.record_failure(ip(1), t0);
        }
        limiter.record_failure(ip(2), t0);
        limiter.record_failure(ip(1), t0); // ip(1) is now the most recent
        limiter.record_failure(ip(3), t0); // evicts ip(2), not ip(1)
        assert!(limiter.check(ip(1), t0).is_err());
        assert_eq!(limiter.tracked_sources(), 2);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let mut limiter = FailureRateLimiter::new(FailureLimits::default());
        let t0 = Instant::now();
        for host in 1..=3u16 {
            let addr: Ipv6Addr = format!("2001:db8:1:2::{host:x}").parse().unwrap();
            limiter.record_failure(IpAddr::V6(addr), t0);
        }
        let same_64: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert!(limiter.check(IpAddr::V6(same_64), t0).is_err());
        let other_64: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limiter.check(IpAddr::V6(other_64), t0), Ok(()));

        for _ in 0..3 {
            limiter.record_failure(ip(7), t0);
        }
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 7).to_ipv6_mapped());
        assert!(limiter.check(mapped, t0).is_err());
    }
}
