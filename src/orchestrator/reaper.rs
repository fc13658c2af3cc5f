//! The task reaper: deletes finished tasks (retired, and either ended or never assigned).
//! A live service keeps the newest `task_history_retention` per slot (replica number, or
//! node for a global service) for `task ls` and for counting restart attempts; a deleted
//! service's tasks are deleted as soon as they are finished.
//!
//! Tasks nobody will ever report are reaped too (swarmkit's reaper and its orphaning of
//! tasks on dead nodes): a retired task on a node that is gone (deleted, or down past
//! [`NODE_DOWN_GRACE_MS`](super::NODE_DOWN_GRACE_MS)) counts as finished; and a task of a
//! deleted service that its agent never started (state below `STARTING`) is deleted at
//! once. Deleting it removes it from its node's assignments, so an agent that did receive
//! it stops whatever it started and forgets it; a node that comes back gets a complete set
//! without it. (Before, 36,443 tasks of a removed service stayed "desired remove, state
//! assigned" forever after their agent lost them.)
//!
//! A task retired while its agent runs it (`STARTING`, `RUNNING`) on a live node is kept
//! until that agent reports it stopped. Must never delete an occupant (a task wanted
//! running) or a task this pass created.

use std::collections::BTreeMap;

use crate::proto::objects::{Task, TaskState};

use super::working::{TaskIx, Working};
use super::{Context, age_key, is_finished, is_occupant, node_gone, observed};

/// A reapable task of a slot: (creation time, id, position), oldest first when sorted.
type Finished<'a> = (i64, &'a str, TaskIx);

/// Deletes what is beyond retention.
pub(super) fn reap(working: &mut Working, context: &Context) {
    let retention = usize::try_from(context.task_history_retention).unwrap_or(usize::MAX);
    for service_id in working.service_ids() {
        let service_exists = context.services.contains_key(&service_id);
        let mut by_slot: BTreeMap<(u64, &str), Vec<Finished<'_>>> = BTreeMap::new();
        for &ix in working.tasks_of_service(&service_id) {
            let Some(task) = working.get(ix) else {
                continue;
            };
            if !reapable(task, context, service_exists) {
                continue;
            }
            let node_key = if task.slot == 0 {
                task.node_id.as_str()
            } else {
                ""
            };
            let (created_ms, id) = age_key(task);
            by_slot
                .entry((task.slot, node_key))
                .or_default()
                .push((created_ms, id, ix));
        }
        let keep = if service_exists { retention } else { 0 };
        let mut doomed: Vec<TaskIx> = Vec::new();
        for mut finished in by_slot.into_values() {
            finished.sort_unstable();
            let excess = finished.len().saturating_sub(keep);
            doomed.extend(finished.into_iter().take(excess).map(|(_, _, ix)| ix));
        }
        for ix in doomed {
            working.delete(ix);
        }
    }
}

/// True if `task` is history the reaper may delete: finished, retired on a node that is
/// gone, or (service deleted) never started by its agent.
fn reapable(task: &Task, context: &Context, service_exists: bool) -> bool {
    if is_finished(task) {
        return true;
    }
    if is_occupant(task) {
        return false;
    }
    let on_gone_node = !task.node_id.is_empty() && node_gone(context, &task.node_id);
    let never_started = observed(task) < TaskState::Starting as i32;
    on_gone_node || (!service_exists && never_started)
}
