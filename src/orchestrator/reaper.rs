//! The task reaper: deletes finished tasks (retired, and either ended or never assigned).
//! A live service keeps the newest `task_history_retention` per slot (replica number, or
//! node for a global service) for `task ls` and for counting restart attempts; a deleted
//! service's tasks are deleted as soon as they are finished.
//!
//! A task retired while assigned and never reported finished (its node is gone, or no
//! agent ran it) is kept: only its agent can say it stopped. Must never delete an occupant
//! (a task wanted running) or a task this pass created.

use std::collections::BTreeMap;

use super::working::Working;
use super::{Context, age_key, is_finished};

/// Deletes what is beyond retention.
pub(super) fn reap(working: &mut Working, context: &Context) {
    let retention = usize::try_from(context.task_history_retention).unwrap_or(usize::MAX);
    for service_id in working.service_ids() {
        let service_exists = context.services.contains_key(&service_id);
        let mut by_slot: BTreeMap<(u64, String), Vec<(i64, String)>> = BTreeMap::new();
        for task in working.tasks_of_service(&service_id) {
            if !is_finished(task) {
                continue;
            }
            let node_key = if task.slot == 0 {
                task.node_id.clone()
            } else {
                String::new()
            };
            let (created_ms, id) = age_key(task);
            by_slot
                .entry((task.slot, node_key))
                .or_default()
                .push((created_ms, id.to_string()));
        }
        for mut finished in by_slot.into_values() {
            finished.sort();
            let keep = if service_exists { retention } else { 0 };
            let excess = finished.len().saturating_sub(keep);
            for (_, id) in finished.into_iter().take(excess) {
                working.delete(&id);
            }
        }
    }
}
