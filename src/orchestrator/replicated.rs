//! Replicated services: slots `1..=replicas`, each reconciled by [`super::slot`]; tasks of
//! higher slots (after a scale down) and of slot 0 (a service that was global) are retired.
//!
//! Slots are fixed numbers, so a scale down retires exactly the slots above `replicas`, all
//! in the same pass (which of the tasks are running does not enter into it).
//!
//! Must never create a task outside `1..=replicas`.

use std::collections::BTreeMap;

use crate::proto::objects::{Service, TaskState};

use super::slot::{self, SlotRef, UpdateBudget};
use super::working::{TaskIx, Working};
use super::{Context, is_occupant};

/// Reconciles every slot of the replicated `service`.
pub(super) fn reconcile_service(working: &mut Working, context: &Context, service: &Service) {
    let replicas = service.spec.as_ref().map_or(0, |spec| spec.replicas);
    let mut by_slot: BTreeMap<u64, Vec<TaskIx>> = BTreeMap::new();
    for &ix in working.tasks_of_service(&service.id) {
        if let Some(task) = working.get(ix) {
            by_slot.entry(task.slot).or_default().push(ix);
        }
    }
    let updating = (1..=replicas)
        .filter(|number| {
            by_slot
                .get(number)
                .is_some_and(|ids| slot::is_updating(working, service, ids))
        })
        .count() as u64;
    let mut budget = UpdateBudget::new(service, updating);
    let empty = Vec::new();
    for number in 1..=replicas {
        let ids = by_slot.get(&number).unwrap_or(&empty);
        let slot_ref = SlotRef {
            service,
            slot: number,
            node_id: None,
            may_create: true,
        };
        slot::reconcile(working, context, &slot_ref, ids, &mut budget);
    }
    for (number, ids) in &by_slot {
        if *number >= 1 && *number <= replicas {
            continue;
        }
        for &ix in ids {
            if working.get(ix).is_some_and(is_occupant) {
                working.retire(ix, TaskState::Shutdown);
            }
        }
    }
}
