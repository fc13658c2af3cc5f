//! Task health checks as every layer sees them (layer 1: imports only `proto`): docker's
//! defaults for a `HealthConfig`, the limits the control API enforces on one, the settings
//! an agent runs a check with ([`HealthSettings`]), and what the rest of the cluster reads
//! from a task's reported health ([`task_health`], [`task_counts_as_up`]).
//!
//! Owns no state, threads or IO. Must never run a check (the agent does: `agent::health`
//! decides, `agent::executor` runs the process) nor decide what happens to an unhealthy task
//! beyond what its agent reports (FAILED; the orchestrator's restart policy does the rest).

use std::time::Duration;

use crate::proto::objects::{HealthConfig, HealthStatus, Task, TaskState};

/// Time between two checks when the spec leaves it at 0 (docker's default).
pub const HEALTH_INTERVAL_MS_DEFAULT: i64 = 30_000;
/// How long a check may run when the spec leaves it at 0 (docker's default).
pub const HEALTH_TIMEOUT_MS_DEFAULT: i64 = 30_000;
/// Failures in a row that make a task unhealthy when the spec leaves it at 0 (docker's).
pub const HEALTH_RETRIES_DEFAULT: u32 = 3;
/// The shortest interval accepted: each check is a process (`/bin/sh -c`), and a node runs
/// one check per task at a time, so a shorter one would mostly measure process creation.
pub const HEALTH_INTERVAL_MS_MIN: i64 = 100;
/// The shortest timeout accepted (docker's minimum is 1 ms; a shell cannot start in less
/// than a few).
pub const HEALTH_TIMEOUT_MS_MIN: i64 = 10;
/// The longest interval, timeout or start period accepted: one day.
pub const HEALTH_DURATION_MS_MAX: i64 = 24 * 60 * 60 * 1000;
/// The most failures in a row a spec may ask for before a task counts as unhealthy.
pub const HEALTH_RETRIES_MAX: u32 = 1_000;
/// The longest health command (it is one argument of `/bin/sh -c`).
pub const HEALTH_COMMAND_BYTES_MAX: usize = 4 * 1024;
/// Results kept per task, oldest dropped first (docker's `maxLogEntries`).
pub const HEALTH_LOG_ENTRIES_MAX: usize = 5;
/// Bytes of a check's output kept per result (docker's `maxOutputLen`).
pub const HEALTH_OUTPUT_BYTES_MAX: usize = 4 * 1024;

/// A health check with docker's defaults filled in: what the agent runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthSettings {
    /// Run with `/bin/sh -c`.
    pub command: String,
    /// Time from the start (or the end of the previous check) to the next check.
    pub interval: Duration,
    /// A check still running after this is killed and counts as failed.
    pub timeout: Duration,
    /// Failures in a row (outside the start period) that make the task unhealthy; ≥ 1.
    pub retries: u32,
    /// Failures within this time of the start do not count.
    pub start_period: Duration,
}

impl HealthSettings {
    /// The settings of `config`, or `None` when it names no command (no check).
    pub fn from_config(config: &HealthConfig) -> Option<HealthSettings> {
        if config.command.is_empty() {
            return None;
        }
        let millis = |value: i64, default: i64| {
            let ms = if value > 0 { value } else { default };
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        };
        Some(HealthSettings {
            command: config.command.clone(),
            interval: millis(config.interval_ms, HEALTH_INTERVAL_MS_DEFAULT),
            timeout: millis(config.timeout_ms, HEALTH_TIMEOUT_MS_DEFAULT),
            retries: if config.retries > 0 {
                config.retries
            } else {
                HEALTH_RETRIES_DEFAULT
            },
            start_period: millis(config.start_period_ms, 0),
        })
    }
}

/// The health of `task` as last reported: `None` for a task without a health check (or
/// whose agent has not reported one yet).
pub fn task_health(task: &Task) -> Option<HealthStatus> {
    let health = task.status.as_ref()?.health.as_ref()?;
    Some(HealthStatus::try_from(health.status).unwrap_or(HealthStatus::Starting))
}

/// Whether `task` runs and, if its spec has a health check, has been reported healthy: what
/// an update waits for before it counts a new task as updated successfully (docker's rule:
/// a task with a health check is up only once healthy).
pub fn task_counts_as_up(task: &Task) -> bool {
    let running = task
        .status
        .as_ref()
        .is_some_and(|status| status.state == TaskState::Running as i32);
    let has_check = task
        .spec
        .as_ref()
        .and_then(|spec| spec.health.as_ref())
        .is_some_and(|health| !health.command.is_empty());
    running && (!has_check || task_health(task) == Some(HealthStatus::Healthy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{TaskHealth, TaskSpec, TaskStatus};

    #[test]
    fn zero_values_take_dockers_defaults() {
        assert_eq!(HealthSettings::from_config(&HealthConfig::default()), None);
        let settings = HealthSettings::from_config(&HealthConfig {
            command: "true".into(),
            ..HealthConfig::default()
        })
        .expect("a command");
        assert_eq!(settings.interval, Duration::from_secs(30));
        assert_eq!(settings.timeout, Duration::from_secs(30));
        assert_eq!(settings.retries, 3);
        assert_eq!(settings.start_period, Duration::ZERO);
    }

    #[test]
    fn a_task_with_a_check_counts_as_up_only_once_healthy() {
        let task = |check: bool, health: Option<HealthStatus>| Task {
            spec: Some(TaskSpec {
                health: check.then(|| HealthConfig {
                    command: "true".into(),
                    ..HealthConfig::default()
                }),
                ..TaskSpec::default()
            }),
            status: Some(TaskStatus {
                state: TaskState::Running as i32,
                health: health.map(|status| TaskHealth {
                    status: status as i32,
                    ..TaskHealth::default()
                }),
                ..TaskStatus::default()
            }),
            ..Task::default()
        };
        assert!(task_counts_as_up(&task(false, None)));
        assert!(!task_counts_as_up(&task(true, None)));
        assert!(!task_counts_as_up(&task(
            true,
            Some(HealthStatus::Starting)
        )));
        assert!(!task_counts_as_up(&task(
            true,
            Some(HealthStatus::Unhealthy)
        )));
        assert!(task_counts_as_up(&task(true, Some(HealthStatus::Healthy))));
    }
}
