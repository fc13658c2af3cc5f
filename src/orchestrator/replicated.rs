//! Replicated services: slots `1..=replicas`, each reconciled by [`super::slot`]; tasks of
//! higher slots (after a scale down) and of slot 0 (a service that was global) are retired.
//!
//! Slots are fixed numbers, so a scale down retires exactly the slots above `replicas`, all
//! in the same pass (which of the tasks are running does not enter into it).
//!
//! Must never create a task outside `1..=replicas`.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::proto::objects::{Service, TaskState};

use super::slot::{self, SlotRef};
use super::update::{self, Supervised};
use super::working::{TaskIx, Working};
use super::{Context, is_occupant};

/// Reconciles every slot of the replicated `service`.
pub(super) fn reconcile_service(working: &mut Working, context: &Context, service: &Arc<Service>) {
    let mut by_slot: BTreeMap<u64, Vec<TaskIx>> = BTreeMap::new();
    for &ix in working.tasks_of_service(&service.id) {
        if let Some(task) = working.get(ix) {
            by_slot.entry(task.slot).or_default().push(ix);
        }
    }
    let empty = Vec::new();
    let wanted = |service: &Service| service.spec.as_ref().map_or(0, |spec| spec.replicas);
    let slots: Vec<&[TaskIx]> = (1..=wanted(service))
        .map(|number| by_slot.get(&number).unwrap_or(&empty).as_slice())
        .collect();
    let Supervised {
        service,
        mut budget,
    } = update::supervise(working, context, service, &slots);
    // A rollback may have changed the spec (and with it the replicas).
    let service = service.as_ref();
    let replicas = wanted(service);
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
