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

use std::collections::{BTreeMap, HashMap};

use crate::proto::objects::{Node, Task, TaskState};
use crate::store::spec::{Constraint, matches_all};

use super::global::constraints_of;
use super::working::Working;
use super::{Context, is_occupant, is_terminal, node_takes_tasks, observed};

/// Active tasks (wanted running, not finished) per node and per (service, node), indexed by
/// the node's position in `Context::nodes` (id order).
struct Load {
    node_index: BTreeMap<String, usize>,
    total: Vec<u64>,
    per_service: HashMap<String, Vec<u64>>,
}

impl Load {
    fn new(context: &Context) -> Self {
        Self {
            node_index: context
                .nodes
                .keys()
                .enumerate()
                .map(|(index, id)| (id.clone(), index))
                .collect(),
            total: vec![0; context.nodes.len()],
            per_service: HashMap::new(),
        }
    }

    fn add(&mut self, service_id: &str, node_id: &str) {
        // A task on a node that no longer exists loads no node.
        let Some(&index) = self.node_index.get(node_id) else {
            return;
        };
        self.total[index] += 1;
        let nodes = self.total.len();
        if !self.per_service.contains_key(service_id) {
            self.per_service
                .insert(service_id.to_string(), vec![0; nodes]);
        }
        let per_node = self
            .per_service
            .get_mut(service_id)
            .expect("inserted above if missing");
        per_node[index] += 1;
    }
}

/// Assigns every unassigned runnable task it can.
pub(super) fn schedule(working: &mut Working, context: &Context) {
    let mut load = Load::new(context);
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
    let per_service = load.per_service.get(&task.service_id);
    context
        .nodes
        .values()
        .enumerate()
        .filter(|(_, node)| node_takes_tasks(node) && matches_all(&constraints, node))
        .min_by_key(|(index, node)| {
            (
                per_service.map_or(0, |counts| counts[*index]),
                load.total[*index],
                node.id.as_str(),
            )
        })
        .map(|(_, node)| node.id.clone())
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
