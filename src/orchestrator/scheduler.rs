//! The scheduler: gives each runnable unassigned task (desired `RUNNING`, no node, state
//! `NEW`/`PENDING`) a node that takes tasks (`ACTIVE` and `READY`) and satisfies its
//! placement constraints, spreading: fewest tasks of the same service on the node, then
//! fewest active tasks overall, then the smallest node id (deterministic). The task gets
//! the node and state `ASSIGNED`.
//!
//! A task with no possible node stays `PENDING` with the reason in `status.message`
//! (e.g. "no node satisfies node.labels.zone==a"), written only when the reason changes,
//! so an unschedulable task costs no write per pass.
//!
//! Resources (`reservations`) are not accounted yet. Must never assign a task to a node that
//! does not take tasks or fails a constraint.

use std::collections::BTreeMap;

use crate::proto::objects::{Node, Task, TaskState};
use crate::store::spec::{Constraint, matches_all};

use super::global::constraints_of;
use super::working::Working;
use super::{Context, is_occupant, is_terminal, node_takes_tasks, observed};

/// Active tasks (wanted running, not finished) per node and per (service, node).
#[derive(Default)]
struct Load {
    total: BTreeMap<String, u64>,
    per_service: BTreeMap<(String, String), u64>,
}

impl Load {
    fn add(&mut self, service_id: &str, node_id: &str) {
        *self.total.entry(node_id.to_string()).or_default() += 1;
        *self
            .per_service
            .entry((service_id.to_string(), node_id.to_string()))
            .or_default() += 1;
    }

    fn rank<'n>(&self, service_id: &str, node: &'n Node) -> (u64, u64, &'n str) {
        (
            self.per_service
                .get(&(service_id.to_string(), node.id.clone()))
                .copied()
                .unwrap_or(0),
            self.total.get(&node.id).copied().unwrap_or(0),
            node.id.as_str(),
        )
    }
}

/// Assigns every unassigned runnable task it can.
pub(super) fn schedule(working: &mut Working, context: &Context) {
    let mut load = Load::default();
    let mut waiting: Vec<Task> = Vec::new();
    for id in working.ids() {
        let task = working.get(&id).expect("ids() lists live tasks");
        if !is_occupant(task) || is_terminal(observed(task)) {
            continue;
        }
        if !task.node_id.is_empty() {
            load.add(&task.service_id, &task.node_id);
        } else if observed(task) < TaskState::Assigned as i32 {
            waiting.push(task.clone());
        }
    }
    waiting.sort_by(|a, b| (&a.service_id, a.slot, &a.id).cmp(&(&b.service_id, b.slot, &b.id)));
    for task in waiting {
        match pick_node(context, &load, &task) {
            Ok(node_id) => {
                load.add(&task.service_id, &node_id);
                let message = format!("assigned to node {node_id} by the scheduler");
                working.modify(&task.id, |task| {
                    task.node_id = node_id;
                    let status = task.status.get_or_insert_with(Default::default);
                    status.state = TaskState::Assigned as i32;
                    status.message = message;
                    status.timestamp_ms = context.now_ms;
                });
            }
            Err(reason) => {
                let unchanged = observed(&task) == TaskState::Pending as i32
                    && task.status.as_ref().is_some_and(|s| s.message == reason);
                if !unchanged {
                    working.modify(&task.id, |task| {
                        let status = task.status.get_or_insert_with(Default::default);
                        status.state = TaskState::Pending as i32;
                        status.message = reason;
                        status.timestamp_ms = context.now_ms;
                    });
                }
            }
        }
    }
}

/// The node for `task`, or why there is none.
fn pick_node(context: &Context, load: &Load, task: &Task) -> Result<String, String> {
    let Some(constraints) = constraints_of(task.spec.as_ref()) else {
        return Err("the task's placement constraints do not parse".to_string());
    };
    context
        .nodes
        .values()
        .filter(|node| node_takes_tasks(node) && matches_all(&constraints, node))
        .min_by_key(|node| load.rank(&task.service_id, node))
        .map(|node| node.id.clone())
        .ok_or_else(|| no_node_reason(context, &constraints))
}

fn no_node_reason(context: &Context, constraints: &[Constraint]) -> String {
    if context.nodes.is_empty() {
        return "no node has joined the cluster".to_string();
    }
    let ready: Vec<&Node> = context
        .nodes
        .values()
        .filter(|node| node_takes_tasks(node))
        .map(AsRef::as_ref)
        .collect();
    if ready.is_empty() {
        return format!(
            "none of the {} nodes takes tasks (active and ready)",
            context.nodes.len()
        );
    }
    let unmet = constraints
        .iter()
        .find(|constraint| !ready.iter().any(|node| constraint.matches(node)));
    match unmet {
        Some(constraint) => format!("no node satisfies {constraint}"),
        None => {
            let all: Vec<String> = constraints.iter().map(ToString::to_string).collect();
            format!("no node satisfies all of {}", all.join(", "))
        }
    }
}
