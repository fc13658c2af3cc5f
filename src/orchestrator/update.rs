//! The update supervisor (swarmkit's updater, as a rule of the pass): how far a service's
//! rolling update (or rollback) has come, whether its new tasks fail, and what it may do
//! next. It owns `Service.update_status` and, on an automatic rollback, the switch of the
//! spec back to `previous_spec`.
//!
//! Everything is read from the store, nothing remembered between passes, so a new leader
//! carries on where the old one stopped:
//! - an update is in progress while the state is `UPDATING` or `ROLLBACK_STARTED`; it starts
//!   (`UPDATING`, `started_at_ms` = now) when a slot's occupant runs an older template and no
//!   update is in progress or paused; the control API clears the state on every spec write
//!   (a paused update resumes with the next `service update`) and sets `ROLLBACK_STARTED` for
//!   `service rollback`;
//! - a slot is in flight while its old task is stopping, it is empty, or the task the
//!   update created for it has not reached `RUNNING`; at most `parallelism` are (0: all), and a new slot starts
//!   only `delay` after the last one came up (its new task's `RUNNING` time);
//! - a failure is a task of the current template created since the update started that
//!   ended on its own (`COMPLETE`, `FAILED`) within `monitor` of its creation, or was
//!   `REJECTED`. Once failures / slots exceeds `max_failure_ratio`, the failure action runs:
//!   `pause` (`PAUSED`, or `ROLLBACK_PAUSED` during a rollback, with the failed task in the
//!   message), `continue`, or `rollback` (the spec becomes `previous_spec`, `previous_spec` is
//!   cleared, `ROLLBACK_STARTED`; a rollback that fails is paused, never rolled back);
//! - the update completes (`COMPLETED` or `ROLLBACK_COMPLETED`) once no slot is old or in
//!   flight and `monitor` passed since the last slot came up (`delay` + 1 s if longer), as
//!   swarmkit watches the last tasks before declaring it done.
//!
//! A rollback uses the (restored) spec's `rollback` config. Absent configs take docker's
//! defaults ([`default_update_config`]). Differences from swarmkit: monitoring counts from
//! a task's creation, not from its `RUNNING` (the store keeps only a task's latest state),
//! and the ratio's denominator is the service's slots, not the slots still old when the
//! updater started.
//!
//! Must never change a task (the slots do) nor write a service whose update state and spec
//! did not change.

use std::sync::Arc;

use crate::proto::objects::{
    Service, Task, TaskState, UpdateConfig, UpdateFailureAction, UpdateState, UpdateStatus,
};
pub use crate::store::spec::default_update_config;

use super::slot::{UpdateBudget, is_current};
use super::working::{TaskIx, Working};
use super::{Context, is_occupant, is_terminal, node_lost, observed, status_time_ms};

/// What the supervisor decided for one service's pass.
pub(super) struct Supervised {
    /// The service the slots follow: the one read, or the one written (rolled back).
    pub service: Arc<Service>,
    /// How many slots may start their update in this pass.
    pub budget: UpdateBudget,
}

/// Supervises the update of `service` whose wanted slots hold `slots` (one entry per slot,
/// empty slots included): records its state, runs the failure action, and gives the budget
/// for the slots.
pub(super) fn supervise(
    working: &mut Working,
    context: &Context,
    service: &Arc<Service>,
    slots: &[&[TaskIx]],
) -> Supervised {
    let read_version = service.meta.as_ref().map_or(0, |meta| meta.version);
    let mut current = Arc::clone(service);
    if let Some(failed) = failure_action(working, context, &current, slots.len()) {
        current = Arc::new(failed);
    }
    let progress = Progress::of(working, context, &current, slots);
    let state = state_of(&current);
    let config = config_of(&current, state);
    let mut budget = UpdateBudget::none();
    match state {
        UpdateState::Paused | UpdateState::RollbackPaused => {}
        UpdateState::Updating | UpdateState::RollbackStarted if progress.is_done() => {
            let done_ms = progress.last_up_ms.unwrap_or_else(|| started_ms(&current));
            let due_ms = done_ms.saturating_add(watch_after_last_ms(&config));
            if context.now_ms >= due_ms {
                current = Arc::new(completed(&current, state, context.now_ms));
            } else {
                working.wake_at(&current.id, due_ms);
            }
        }
        _ if progress.old == 0 => {}
        state => {
            let mut progress = progress;
            if !matches!(state, UpdateState::Updating | UpdateState::RollbackStarted) {
                current = Arc::new(started(&current, context.now_ms));
                progress = Progress::of(working, context, &current, slots);
            }
            budget = budget_for(working, context, &current, &config, &progress);
        }
    }
    if !Arc::ptr_eq(&current, service) {
        working.write_service(current.as_ref().clone(), read_version);
    }
    Supervised {
        service: current,
        budget,
    }
}

/// The update state of `service` (`UNKNOWN` when it never had one).
pub(super) fn state_of(service: &Service) -> UpdateState {
    service
        .update_status
        .as_ref()
        .and_then(|status| UpdateState::try_from(status.state).ok())
        .unwrap_or(UpdateState::Unknown)
}

fn started_ms(service: &Service) -> i64 {
    service
        .update_status
        .as_ref()
        .map_or(0, |status| status.started_at_ms)
}

/// The config the update in `state` follows: the rollback's during a rollback.
fn config_of(service: &Service, state: UpdateState) -> UpdateConfig {
    let spec = service.spec.as_ref();
    let config = match state {
        UpdateState::RollbackStarted | UpdateState::RollbackPaused => {
            spec.and_then(|spec| spec.rollback)
        }
        _ => spec.and_then(|spec| spec.update),
    };
    config.unwrap_or_else(default_update_config)
}

/// How long the last slots are watched before the update counts as complete: the monitor
/// period, or the delay and a second if that is longer (swarmkit's rule).
fn watch_after_last_ms(config: &UpdateConfig) -> i64 {
    if config.delay_ms >= config.monitor_ms && config.delay_ms > 0 {
        config.delay_ms.saturating_add(1_000)
    } else {
        config.monitor_ms
    }
}

/// Where the slots of an update stand.
struct Progress {
    /// Slots whose occupant runs an older template.
    old: usize,
    /// Slots whose old task is stopping, or whose new task has not reached `RUNNING`.
    in_flight: u64,
    /// When the latest task of the update reached `RUNNING` (or ended), Unix milliseconds.
    last_up_ms: Option<i64>,
}

impl Progress {
    fn of(working: &Working, context: &Context, service: &Service, slots: &[&[TaskIx]]) -> Self {
        let since_ms = started_ms(service);
        let mut progress = Progress {
            old: 0,
            in_flight: 0,
            last_up_ms: None,
        };
        for ids in slots {
            let (mut old_occupant, mut old_stopping, mut new_waiting) = (false, false, false);
            let mut occupied = false;
            for task in ids.iter().filter_map(|ix| working.get(*ix)) {
                let current = is_current(task, service);
                let state = observed(task);
                occupied |= is_occupant(task);
                match (is_occupant(task), current) {
                    (true, false) => old_occupant = true,
                    (false, false) => {
                        old_stopping |= state >= TaskState::Assigned as i32
                            && !is_terminal(state)
                            && node_lost(context, &task.node_id).is_none();
                    }
                    (occupant, true) if created_since(task, since_ms) => {
                        if state >= TaskState::Running as i32 {
                            let up_ms = status_time_ms(task);
                            progress.last_up_ms = progress.last_up_ms.max(Some(up_ms));
                        } else {
                            new_waiting |= occupant;
                        }
                    }
                    (_, true) => {}
                }
            }
            progress.old += usize::from(old_occupant);
            // An empty slot is about to get its new task (a stop-first slot whose old task
            // just stopped): in flight already.
            progress.in_flight += u64::from(old_stopping || new_waiting || !occupied);
        }
        progress
    }

    fn is_done(&self) -> bool {
        self.old == 0 && self.in_flight == 0
    }
}

/// True if `task` was created at or after `since_ms` (or by this pass).
fn created_since(task: &Task, since_ms: i64) -> bool {
    task.meta
        .as_ref()
        .is_none_or(|meta| meta.created_at_ms >= since_ms)
}

/// The slots that may start now: `parallelism` less those in flight, none until `delay`
/// has passed since the last slot came up (then the service's pass is woken).
fn budget_for(
    working: &mut Working,
    context: &Context,
    service: &Service,
    config: &UpdateConfig,
    progress: &Progress,
) -> UpdateBudget {
    if let Some(up_ms) = progress.last_up_ms.filter(|_| config.delay_ms > 0) {
        let due_ms = up_ms.saturating_add(config.delay_ms);
        if context.now_ms < due_ms {
            working.wake_at(&service.id, due_ms);
            return UpdateBudget::none();
        }
    }
    UpdateBudget::new(config, progress.in_flight)
}

/// `service` with a new update started at `now_ms`.
fn started(service: &Service, now_ms: i64) -> Service {
    let mut next = service.clone();
    next.update_status = Some(UpdateStatus {
        state: UpdateState::Updating as i32,
        started_at_ms: now_ms,
        completed_at_ms: 0,
        message: "update in progress".into(),
    });
    next
}

/// `service` with its update (or rollback, by `state`) completed at `now_ms`.
fn completed(service: &Service, state: UpdateState, now_ms: i64) -> Service {
    let (state, message) = if state == UpdateState::RollbackStarted {
        (UpdateState::RollbackCompleted, "rollback completed")
    } else {
        (UpdateState::Completed, "update completed")
    };
    let mut next = service.clone();
    let status = next.update_status.get_or_insert_with(Default::default);
    status.state = state as i32;
    status.completed_at_ms = now_ms;
    status.message = message.into();
    next
}

/// The service after its failure action, if the failures of its update in progress went
/// past the ratio and the action changes something.
fn failure_action(
    working: &Working,
    context: &Context,
    service: &Service,
    slot_count: usize,
) -> Option<Service> {
    let state = state_of(service);
    if !matches!(state, UpdateState::Updating | UpdateState::RollbackStarted) {
        return None;
    }
    let config = config_of(service, state);
    let action =
        UpdateFailureAction::try_from(config.failure_action).unwrap_or(UpdateFailureAction::Pause);
    if action == UpdateFailureAction::Continue {
        return None;
    }
    let failures = failures(working, service, config.monitor_ms);
    let latest = failures.last()?;
    let ratio = failures.len() as f64 / slot_count.max(1) as f64;
    if ratio <= f64::from(config.max_failure_ratio) {
        return None;
    }
    let why = failure_text(latest);
    let mut next = service.clone();
    let rolling_back = state == UpdateState::RollbackStarted;
    let previous = if rolling_back || action != UpdateFailureAction::Rollback {
        None
    } else {
        next.previous_spec.take()
    };
    let status = next.update_status.get_or_insert_with(Default::default);
    match previous {
        Some(previous) => {
            next.spec = Some(previous);
            // Tasks made at the version read run the failed spec: the pass must not take
            // them for current by their version (`slot::is_current`), and the tasks it
            // makes carry no version (the store stamps the service's own on the write).
            if let Some(meta) = next.meta.as_mut() {
                meta.version = 0;
            }
            status.state = UpdateState::RollbackStarted as i32;
            status.started_at_ms = context.now_ms;
            status.message = format!("update rolled back due to {why}");
        }
        None if rolling_back => {
            status.state = UpdateState::RollbackPaused as i32;
            status.message = format!("rollback paused due to {why}");
        }
        None => {
            status.state = UpdateState::Paused as i32;
            status.message = if action == UpdateFailureAction::Rollback {
                format!("update paused due to {why} (no previous spec to roll back to)")
            } else {
                format!("update paused due to {why}")
            };
        }
    }
    Some(next)
}

/// `failure or early termination of task ID (ERROR)`, swarmkit's words with the reason.
fn failure_text(task: &Task) -> String {
    let status = task.status.clone().unwrap_or_default();
    let detail = if status.err.is_empty() {
        status.message
    } else {
        status.err
    };
    if detail.is_empty() {
        format!("failure or early termination of task {}", task.id)
    } else {
        format!(
            "failure or early termination of task {} ({detail})",
            task.id
        )
    }
}

/// The failed tasks of the update in progress (see the module doc), oldest first.
fn failures<'w>(working: &'w Working, service: &Service, monitor_ms: i64) -> Vec<&'w Task> {
    let since_ms = started_ms(service);
    let mut failed: Vec<&Task> = working
        .tasks_of_service(&service.id)
        .iter()
        .filter_map(|ix| working.get(*ix))
        .filter(|task| task.meta.is_some() && created_since(task, since_ms))
        .filter(|task| is_failure(task, monitor_ms) && is_current(task, service))
        .collect();
    failed.sort_by_key(|task| (status_time_ms(task), task.id.as_str()));
    failed
}

fn is_failure(task: &Task, monitor_ms: i64) -> bool {
    let state = observed(task);
    if state == TaskState::Rejected as i32 {
        return true;
    }
    let ended = state == TaskState::Complete as i32 || state == TaskState::Failed as i32;
    let created_ms = task.meta.as_ref().map_or(0, |meta| meta.created_at_ms);
    ended && status_time_ms(task).saturating_sub(created_ms) <= monitor_ms
}
