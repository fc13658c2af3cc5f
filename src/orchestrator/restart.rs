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
//! **Delay and backoff.** The delay is the policy's, 5 s when it names none
//! ([`DEFAULT_RESTART_DELAY_MS`], swarmkit's default). A task that ended on its own within
//! [`RESTART_QUICK_END_MS`] of its creation ended quickly; each quick end in a row doubles
//! the delay (from at least [`RESTART_BACKOFF_MIN_MS`], so even a delay of 0 backs off) up to
//! [`RESTART_BACKOFF_MAX_MS`] (or the policy's delay if longer): 5, 10, 20, 40, 60, 60 … s
//! by default. This is Docker's restart manager (100 ms doubling to 1 min for a container
//! that ran less than 10 s). A `/bin/true` that restarted on every pass (83 times a second)
//! now restarts once a minute. The streak travels in the task (`Task.quick_end_streak`, set
//! on the replacement from its predecessor), so it survives the reaper and leader changes;
//! a task that ran longer, or ended `SHUTDOWN`, starts the streak over.
//!
//! The delay is honoured without an intermediate state: the finished occupant stays in its
//! slot (desired `RUNNING`) until `now ≥ end + delay`; the pass that sees that retires it and
//! creates the replacement in one transaction. The pass that waits names the end of the
//! delay (and an exhausted window the moment its oldest attempt leaves it), and the thread
//! wakes the service's pass then: no pass runs for the clock otherwise.
//!
//! Must never change anything itself: it only decides.

use crate::proto::objects::{RestartCondition, RestartPolicy, Task, TaskState};

use super::{DEFAULT_RESTART_DELAY_MS, is_terminal, observed, status_time_ms};

/// A task that ends on its own sooner than this after its creation ended quickly, and its
/// restart backs off (Docker's restart manager uses the same 10 s of run time; creation is
/// what the store records, and it precedes the start by the scheduling only).
pub const RESTART_QUICK_END_MS: i64 = 10_000;

/// The shortest delay after a quick end, whatever the policy says (Docker's backoff starts
/// at 100 ms): a delay of 0 never restarts a crashing task on every pass.
pub const RESTART_BACKOFF_MIN_MS: i64 = 100;

/// The longest delay the backoff grows to (Docker's 1 minute); a policy delay longer than
/// this is used as it is.
pub const RESTART_BACKOFF_MAX_MS: i64 = 60_000;

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

/// Decides for `task` (a finished occupant) given the other tasks of its slot, at `now_ms`;
/// with it, the time after which the clock alone may change the decision (the end of the
/// delay, or the moment the window lets go of its oldest attempt), if there is one.
pub(super) fn decide(task: &Task, slot_history: &[&Task], now_ms: i64) -> (Decision, Option<i64>) {
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
    if !wanted {
        return (Decision::Keep, None);
    }
    if let Some(reopens_ms) = attempts_exhausted(policy.as_ref(), slot_history, now_ms) {
        return (Decision::Keep, reopens_ms);
    }
    let configured_ms = policy
        .as_ref()
        .and_then(|policy| policy.delay_ms)
        .map_or(DEFAULT_RESTART_DELAY_MS, |delay_ms| delay_ms.max(0));
    let delay_ms = backoff_delay_ms(configured_ms, quick_end_streak(task));
    let due_ms = status_time_ms(task).saturating_add(delay_ms);
    if now_ms < due_ms {
        (Decision::Wait, Some(due_ms))
    } else {
        (Decision::Restart, None)
    }
}

/// The quick ends in a row up to and including `task` (a finished task): its predecessors'
/// streak plus one if it ended on its own quickly; 0 if it did not.
pub(super) fn quick_end_streak(task: &Task) -> u32 {
    let ended_on_its_own = [TaskState::Complete, TaskState::Failed, TaskState::Rejected]
        .iter()
        .any(|state| observed(task) == *state as i32);
    let created_ms = task
        .meta
        .as_ref()
        .map_or(i64::MIN, |meta| meta.created_at_ms);
    let quick = status_time_ms(task).saturating_sub(created_ms) < RESTART_QUICK_END_MS;
    if ended_on_its_own && quick {
        task.quick_end_streak.saturating_add(1)
    } else {
        0
    }
}

/// The delay before restarting a task with `streak` quick ends in a row under a policy
/// delay of `configured_ms`: the policy's delay after a normal end, doubled for each quick
/// end after the first, within [`RESTART_BACKOFF_MIN_MS`] and [`RESTART_BACKOFF_MAX_MS`].
pub(super) fn backoff_delay_ms(configured_ms: i64, streak: u32) -> i64 {
    if streak == 0 {
        return configured_ms;
    }
    let base_ms = configured_ms.max(RESTART_BACKOFF_MIN_MS);
    let cap_ms = RESTART_BACKOFF_MAX_MS.max(configured_ms);
    // 2^30 × 100 ms is far past any cap: the shift stays small and the product finite.
    let doublings = (streak - 1).min(30);
    base_ms.saturating_mul(1_i64 << doublings).min(cap_ms)
}

/// `Some` if the slot already used its `max_attempts` restarts within `window_ms`: with the
/// time at which the oldest of them leaves the window (`None` without a window: never).
fn attempts_exhausted(
    policy: Option<&RestartPolicy>,
    slot_history: &[&Task],
    now_ms: i64,
) -> Option<Option<i64>> {
    let policy = policy.filter(|policy| policy.max_attempts > 0)?;
    let window_start_ms = if policy.window_ms > 0 {
        now_ms.saturating_sub(policy.window_ms)
    } else {
        i64::MIN
    };
    let counted: Vec<i64> = slot_history
        .iter()
        .filter(|task| ended_on_its_own(task))
        .map(|task| status_time_ms(task))
        .filter(|ended_ms| *ended_ms >= window_start_ms)
        .collect();
    if (counted.len() as u64) < policy.max_attempts {
        return None;
    }
    let reopens_ms = (policy.window_ms > 0)
        .then(|| counted.iter().min().copied())
        .flatten()
        .map(|oldest_ms| oldest_ms.saturating_add(policy.window_ms).saturating_add(1));
    Some(reopens_ms)
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
