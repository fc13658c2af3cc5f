//! Global services: one slot per node. A node that takes tasks (`ACTIVE`, `READY`) and
//! satisfies the placement constraints gets a task, created on it; a node that is paused or
//! not ready keeps the tasks it has; a node that is deleted, drained, down past
//! [`NODE_DOWN_GRACE_MS`](super::NODE_DOWN_GRACE_MS) or no longer satisfies the constraints
//! has its task retired (never replaced elsewhere).
//!
//! Must never create a task for a node that does not take tasks.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::proto::objects::{Node, Service, TaskState};
use crate::store::spec::{Constraint, matches_all, parse_constraints};

use super::slot::{self, SlotRef};
use super::update::{self, Supervised};
use super::working::{TaskIx, Working};
use super::{Context, is_occupant, node_lost, node_takes_tasks};

/// The parsed placement constraints of `service`'s template; `None` if they do not parse
/// (validation refuses such specs, so this is a store written by something else).
pub(super) fn constraints_of(
    spec: Option<&crate::proto::objects::TaskSpec>,
) -> Option<Vec<Constraint>> {
    let texts = spec
        .and_then(|spec| spec.placement.as_ref())
        .map(|placement| placement.constraints.as_slice())
        .unwrap_or_default();
    parse_constraints("task.placement.constraints", texts).ok()
}

/// Reconciles the node slots of the global `service`.
pub(super) fn reconcile_service(working: &mut Working, context: &Context, service: &Arc<Service>) {
    let mut by_node: BTreeMap<String, Vec<TaskIx>> = BTreeMap::new();
    for &ix in working.tasks_of_service(&service.id) {
        if let Some(task) = working.get(ix) {
            by_node.entry(task.node_id.clone()).or_default().push(ix);
        }
    }
    let empty = Vec::new();
    // The update's slots: the nodes that take a task (one paused or not ready keeps an old
    // one, and the update does not wait for it).
    let eligible = |constraints: &Option<Vec<Constraint>>, node: &Node| {
        constraints
            .as_deref()
            .is_some_and(|constraints| matches_all(constraints, node))
            && node_takes_tasks(node)
    };
    let constraints = constraints_of(slot::template(service));
    let slots: Vec<&[TaskIx]> = context
        .nodes
        .iter()
        .filter(|node| eligible(&constraints, node))
        .map(|node| by_node.get(&node.id).unwrap_or(&empty).as_slice())
        .collect();
    let Supervised {
        service,
        mut budget,
    } = update::supervise(working, context, service, &slots);
    let service = service.as_ref();
    let constraints = constraints_of(slot::template(service));
    for node in &context.nodes {
        let node_id = node.id.as_str();
        let fits = constraints
            .as_deref()
            .is_some_and(|constraints| matches_all(constraints, node));
        let ids = by_node.get(node_id).unwrap_or(&empty);
        if !fits || node_lost(context, node_id).is_some() {
            retire_all(working, ids);
            continue;
        }
        let slot_ref = SlotRef {
            service,
            slot: 0,
            node_id: Some(node_id),
            may_create: node_takes_tasks(node),
        };
        slot::reconcile(working, context, &slot_ref, ids, &mut budget);
    }
    for (node_id, ids) in &by_node {
        if context.node(node_id).is_none() {
            retire_all(working, ids);
        }
    }
}

fn retire_all(working: &mut Working, ids: &[TaskIx]) {
    for &ix in ids {
        if working.get(ix).is_some_and(is_occupant) {
            working.retire(ix, TaskState::Shutdown);
        }
    }
}
