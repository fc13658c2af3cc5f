//! The restart supervisor's rule: what to do with a slot's occupant (desired `RUNNING`)
//! that has reached a terminal state.
//!
//! Owns the reading of a task template's [`RestartPolicy`]: the condition, the delay and
//! the attempts allowed within a window. Attempts are counted from the slot's kept history
//! (finished tasks that ended on their own: `COMPLETE`, `FAILED`, `REJECTED`, `ORPHANED`),
//! so they survive a leader change but not the reaper: past `task_history_retention`
//! finished tasks per slot, older attempts are forgotten. A task that ended `SHUTDOWN` is
//! not counted (a retired task reports the same state, so the two cannot be told apart).
//!
//! The delay is honoured without an intermediate state: the finished occupant stays in its
//! slot (desired `RUNNING`) until `now ≥ end + delay`; the pass that sees that retires it and
//! creates the replacement in one transaction. A replacement is therefore late by at most
//! [`super::ORCHESTRATOR_IDLE_RECHECK`] (1 s: how long an idle pass result stands while the
//! store does not change).
//!
//! Must never change anything itself: it only decides.

use crate::proto::objects::{RestartCondition, RestartPolicy, Task, TaskState};

use super::{DEFAULT_RESTART_DELAY_MS, is_terminal, observed, status_time_ms};

/// What to do with a finished occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// It stays in its slot for good (the policy does not restart it).
    Keep,
    /// It will be restarted, but its delay has not passed yet.
    Wait,
    /// Retire it and create its replacement now.
    Restart,
}

/// Decides for `task` (a finished occupant) given the other tasks of its slot, at `now_ms`.
pub(super) fn decide(task: &Task, slot_history: &[&Task], now_ms: i64) -> Decision {
    let state = observed(task);
    assert!(is_terminal(state), "only a finished occupant is restarted");
    let policy = task.spec.as_ref().and_then(|spec| spec.restart);
    let condition = policy
        .as_ref()
        .and_then(|policy| RestartCondition::try_from(policy.condition).ok())
        .unwrap_or(RestartCondition::Any);
    let wanted = match condition {
        RestartCondition::None => false,
        RestartCondition::OnFailure => state != TaskState::Complete as i32,
        RestartCondition::Any | RestartCondition::Unspecified => true,
    };
    if !wanted || attempts_exhausted(policy.as_ref(), slot_history, now_ms) {
        return Decision::Keep;
    }
    let delay_ms = policy
        .as_ref()
        .map_or(DEFAULT_RESTART_DELAY_MS, |policy| policy.delay_ms.max(0));
    if now_ms < status_time_ms(task).saturating_add(delay_ms) {
        Decision::Wait
    } else {
        Decision::Restart
    }
}

/// True if the slot already used its `max_attempts` restarts within `window_ms`.
fn attempts_exhausted(policy: Option<&RestartPolicy>, slot_history: &[&Task], now_ms: i64) -> bool {
    let Some(policy) = policy.filter(|policy| policy.max_attempts > 0) else {
        return false;
    };
    let window_start_ms = if policy.window_ms > 0 {
        now_ms.saturating_sub(policy.window_ms)
    } else {
        i64::MIN
    };
    let attempts = slot_history
        .iter()
        .filter(|task| ended_on_its_own(task) && status_time_ms(task) >= window_start_ms)
        .count();
    attempts as u64 >= policy.max_attempts
}

/// True if `task` is history that ended by itself (each such task was restarted once).
fn ended_on_its_own(task: &Task) -> bool {
    task.desired_state > TaskState::Running as i32
        && [
            TaskState::Complete,
            TaskState::Failed,
            TaskState::Rejected,
            TaskState::Orphaned,
        ]
        .iter()
        .any(|state| observed(task) == *state as i32)
}
