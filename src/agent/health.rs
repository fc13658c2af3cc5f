//! The health state machine of one task (docker's health monitor, sans-IO): when the next
//! check is due, what a finished check changes, and the health the agent reports.
//!
//! Owns a task's health status, its failing streak and its last
//! [`HEALTH_LOG_ENTRIES_MAX`] results. Must never run a process, read a clock or touch the
//! task: `agent::tasks` runs the checks (`agent::executor::spawn_health_check`), hands each
//! result here with the times it saw, and stops a task this says is unhealthy.
//!
//! **Rules** (docker's `daemon/health.go`): the first check is due one interval after the
//! task started, each next one an interval after the previous one ended (one check per task
//! at a time). A check passes when it exits 0; it fails otherwise (a non-zero status, a
//! signal, killed at its timeout, could not run). A pass makes the task healthy and resets
//! the streak. A failure adds one to the streak, except while the task has never passed and
//! the check started within the start period of the task's start; once the streak reaches
//! `retries` the task is unhealthy (and its agent stops it).

use std::collections::VecDeque;
use std::time::Instant;

use crate::health::{HEALTH_LOG_ENTRIES_MAX, HealthSettings};
use crate::proto::objects::{HealthCheckResult, HealthStatus, TaskHealth};

/// How one check ended, for [`HealthMonitor::record`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckEnd {
    /// When the check started and ended (agent clock).
    pub started_at: Instant,
    /// When it ended.
    pub ended_at: Instant,
    /// The result as reported (times in Unix ms, exit code, output).
    pub result: HealthCheckResult,
}

impl CheckEnd {
    /// Whether the check passed (exited 0).
    pub fn passed(&self) -> bool {
        self.result.exit_code == 0
    }
}

/// One task's health (see the module doc for the rules).
#[derive(Clone, Debug)]
pub struct HealthMonitor {
    settings: HealthSettings,
    task_started_at: Instant,
    status: HealthStatus,
    failing_streak: u32,
    log: VecDeque<HealthCheckResult>,
    next_check_at: Instant,
}

impl HealthMonitor {
    /// The monitor of a task that started at `task_started_at`: starting, first check one
    /// interval later.
    pub fn new(settings: HealthSettings, task_started_at: Instant) -> Self {
        assert!(settings.retries > 0, "HealthSettings fills in the default");
        let next_check_at = task_started_at + settings.interval;
        HealthMonitor {
            settings,
            task_started_at,
            status: HealthStatus::Starting,
            failing_streak: 0,
            log: VecDeque::with_capacity(HEALTH_LOG_ENTRIES_MAX),
            next_check_at,
        }
    }

    /// The settings the checks run with.
    pub fn settings(&self) -> &HealthSettings {
        &self.settings
    }

    /// Whether a check should start at `now` (none is running: the caller knows).
    pub fn check_due(&self, now: Instant) -> bool {
        now >= self.next_check_at
    }

    /// When the next check is due.
    pub fn next_check_at(&self) -> Instant {
        self.next_check_at
    }

    /// The current status.
    pub fn status(&self) -> HealthStatus {
        self.status
    }

    /// Takes a finished check into account; returns the new status when it changed.
    pub fn record(&mut self, end: CheckEnd) -> Option<HealthStatus> {
        let before = self.status;
        if end.passed() {
            self.failing_streak = 0;
            self.status = HealthStatus::Healthy;
        } else if !self.within_start_period(end.started_at) {
            self.failing_streak = self.failing_streak.saturating_add(1);
            if self.failing_streak >= self.settings.retries {
                self.status = HealthStatus::Unhealthy;
            }
        }
        if self.log.len() == HEALTH_LOG_ENTRIES_MAX {
            self.log.pop_front();
        }
        self.log.push_back(end.result);
        assert!(self.log.len() <= HEALTH_LOG_ENTRIES_MAX);
        self.next_check_at = end.ended_at + self.settings.interval;
        (self.status != before).then_some(self.status)
    }

    /// A failure of a check started at `check_started_at` does not count: the task never
    /// passed a check and is still within its start period.
    fn within_start_period(&self, check_started_at: Instant) -> bool {
        self.status == HealthStatus::Starting
            && check_started_at.saturating_duration_since(self.task_started_at)
                < self.settings.start_period
    }

    /// The health as reported to the managers (with the last results, oldest first).
    pub fn report(&self) -> TaskHealth {
        TaskHealth {
            status: self.status as i32,
            failing_streak: self.failing_streak,
            log: self.log.iter().cloned().collect(),
        }
    }

    /// Why the task is unhealthy, in the user's terms (for its FAILED status).
    pub fn unhealthy_reason(&self) -> String {
        let last = self
            .log
            .back()
            .map(describe_result)
            .unwrap_or_else(|| "no result".to_owned());
        format!(
            "unhealthy container: the health check failed {} times in a row (retries {}); \
             last: {last}",
            self.failing_streak, self.settings.retries
        )
    }
}

/// `exit status 1: <first line of output>` (at most [`REASON_OUTPUT_CHARS_MAX`] characters of it).
fn describe_result(result: &HealthCheckResult) -> String {
    let first_line = result.output.lines().next().unwrap_or("").trim();
    let shown: String = first_line.chars().take(REASON_OUTPUT_CHARS_MAX).collect();
    let status = if result.exit_code == -1 {
        "did not exit".to_owned()
    } else {
        format!("exit status {}", result.exit_code)
    };
    if shown.is_empty() {
        status
    } else {
        format!("{status}: {shown}")
    }
}

/// Characters of a check's output quoted in an unhealthy task's error.
const REASON_OUTPUT_CHARS_MAX: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(retries: u32, start_period_ms: u64) -> HealthSettings {
        HealthSettings {
            command: "check".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            retries,
            start_period: Duration::from_millis(start_period_ms),
        }
    }

    /// A check that started `at_ms` after `t0`, ran 10 ms and exited `exit_code`.
    fn end(t0: Instant, at_ms: u64, exit_code: i32) -> CheckEnd {
        let started_at = t0 + Duration::from_millis(at_ms);
        CheckEnd {
            started_at,
            ended_at: started_at + Duration::from_millis(10),
            result: HealthCheckResult {
                start_ms: i64::try_from(at_ms).expect("small"),
                end_ms: i64::try_from(at_ms + 10).expect("small"),
                exit_code,
                output: format!("run at {at_ms}\nmore"),
            },
        }
    }

    #[test]
    fn checks_are_due_an_interval_after_the_start_then_after_each_end() {
        let t0 = Instant::now();
        let mut monitor = HealthMonitor::new(settings(3, 0), t0);
        assert!(!monitor.check_due(t0 + Duration::from_millis(999)));
        assert!(monitor.check_due(t0 + Duration::from_secs(1)));
        monitor.record(end(t0, 1_000, 0));
        assert_eq!(monitor.next_check_at(), t0 + Duration::from_millis(2_010));
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy_and_a_pass_resets_the_streak() {
        let t0 = Instant::now();
        let mut monitor = HealthMonitor::new(settings(2, 0), t0);
        assert_eq!(
            monitor.record(end(t0, 1_000, 0)),
            Some(HealthStatus::Healthy)
        );
        assert_eq!(monitor.record(end(t0, 2_000, 1)), None);
        assert_eq!(monitor.report().failing_streak, 1);
        assert_eq!(monitor.record(end(t0, 3_000, 0)), None, "still healthy");
        assert_eq!(monitor.report().failing_streak, 0);
        assert_eq!(monitor.record(end(t0, 4_000, 1)), None);
        assert_eq!(
            monitor.record(end(t0, 5_000, 7)),
            Some(HealthStatus::Unhealthy)
        );
        let reason = monitor.unhealthy_reason();
        assert!(reason.contains("2 times in a row"), "{reason}");
        assert!(reason.contains("exit status 7: run at 5000"), "{reason}");
        assert!(!reason.contains("more"), "{reason}");
    }

    #[test]
    fn failures_within_the_start_period_do_not_count_until_a_pass() {
        let t0 = Instant::now();
        let mut monitor = HealthMonitor::new(settings(1, 2_500), t0);
        assert_eq!(monitor.record(end(t0, 1_000, 1)), None);
        assert_eq!(monitor.record(end(t0, 2_000, 1)), None);
        assert_eq!(monitor.status(), HealthStatus::Starting);
        assert_eq!(monitor.report().failing_streak, 0);
        // Started after the start period: it counts.
        assert_eq!(
            monitor.record(end(t0, 3_000, 1)),
            Some(HealthStatus::Unhealthy)
        );

        // Once it passed, the start period no longer excuses a failure.
        let mut passed = HealthMonitor::new(settings(1, 10_000), t0);
        passed.record(end(t0, 1_000, 0));
        assert_eq!(
            passed.record(end(t0, 2_000, 1)),
            Some(HealthStatus::Unhealthy)
        );
    }

    #[test]
    fn a_timed_out_check_is_a_failure_and_says_so() {
        let t0 = Instant::now();
        let mut monitor = HealthMonitor::new(settings(1, 0), t0);
        let mut timed_out = end(t0, 1_000, -1);
        timed_out.result.output = "Health check exceeded timeout (500ms)".into();
        assert_eq!(monitor.record(timed_out), Some(HealthStatus::Unhealthy));
        let reason = monitor.unhealthy_reason();
        assert!(
            reason.contains("did not exit: Health check exceeded timeout"),
            "{reason}"
        );
    }

    #[test]
    fn only_the_last_results_are_kept() {
        let t0 = Instant::now();
        let mut monitor = HealthMonitor::new(settings(100, 0), t0);
        for i in 0..8u64 {
            monitor.record(end(t0, 1_000 * (i + 1), 1));
        }
        let report = monitor.report();
        assert_eq!(report.log.len(), HEALTH_LOG_ENTRIES_MAX);
        assert_eq!(report.log[0].start_ms, 4_000, "oldest first");
        assert_eq!(report.log[4].start_ms, 8_000);
        assert_eq!(report.failing_streak, 8);
        assert_eq!(report.status, HealthStatus::Starting as i32);
    }
}
