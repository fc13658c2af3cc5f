//! The scheduler: gives each runnable unassigned task (desired `RUNNING`, no node, state
//! `NEW`/`PENDING`) a node that takes tasks (`ACTIVE` and `READY`), satisfies its placement
//! constraints and has room, spreading: fewest tasks of the same service on the node, then
//! fewest active tasks overall, then the smallest node id (deterministic). The task gets
//! the node and state `ASSIGNED`.
//!
//! **Room.** A node runs at most the tasks its agent reported it runs at once
//! (`NodeDescription.tasks_max`, the agent's `tasks_running_max`; 256 when not reported,
//! [`TASKS_RUNNING_MAX_DEFAULT`]). Every task on the node that has not finished counts, whatever its
//! desired state: a task being stopped still holds its process. So a service larger than
//! the cluster can run converges: what fits runs, the rest stays `PENDING` ("no node has
//! room: …") and is placed as soon as a task ends or a node joins, instead of being
//! assigned to an agent that would refuse it and be restarted in a loop. Nodes report
//! their own capacity (as swarmkit nodes report their resources) so that a small host can
//! say it runs fewer.
//!
//! A task with no possible node stays `PENDING` with the reason in `status.message`
//! (e.g. "no node satisfies node.labels.zone==a"), written only when the reason changes,
//! so an unschedulable task costs no write per pass.
//!
//! Resources (`reservations`) are not accounted: the control API refuses them until they
//! are. Global services' tasks are created on their node by the orchestrator, not here, and
//! are not held back by room (the agent refuses what it cannot run). Must never assign a
//! task to a node that does not take tasks, fails a constraint or has no room.

use std::collections::{BTreeMap, HashMap};

use crate::agent::TASKS_RUNNING_MAX_DEFAULT;
use crate::proto::objects::{Node, Task, TaskState};
use crate::store::spec::{Constraint, matches_all};

use super::global::constraints_of;
use super::working::Working;
use super::{Context, is_occupant, is_terminal, node_takes_tasks, observed};

/// Active tasks (wanted running, not finished) per node and per (service, node), and
/// unfinished tasks per node against its room, indexed by the node's position in
/// `Context::nodes` (id order).
struct Load {
    node_index: BTreeMap<String, usize>,
    total: Vec<u64>,
    per_service: HashMap<String, Vec<u64>>,
    /// Tasks on the node that have not finished (any desired state): what its agent runs
    /// or is about to run or stop.
    busy: Vec<u64>,
    /// The most tasks the node runs at once.
    room: Vec<u64>,
}

impl Load {
    /// The load of the tasks outside the pass (`Context::base_load`); the pass's own tasks
    /// are added by [`schedule`].
    fn new(context: &Context) -> Self {
        let base = |id: &String| context.base_load.get(id).copied().unwrap_or_default();
        Self {
            node_index: context
                .nodes
                .keys()
                .enumerate()
                .map(|(index, id)| (id.clone(), index))
                .collect(),
            total: context.nodes.keys().map(|id| base(id).active).collect(),
            per_service: HashMap::new(),
            busy: context.nodes.keys().map(|id| base(id).busy).collect(),
            room: context.nodes.values().map(|node| node_room(node)).collect(),
        }
    }

    /// Counts an unfinished task on `node_id` against its room.
    fn add_busy(&mut self, node_id: &str) {
        if let Some(&index) = self.node_index.get(node_id) {
            self.busy[index] += 1;
        }
    }

    fn has_room(&self, index: usize) -> bool {
        self.busy[index] < self.room[index]
    }

    /// Counts an active task of `service_id` on `node_id` for spreading.
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

/// The most tasks `node` runs at once: what its agent reported, else the agent default.
pub(crate) fn node_room(node: &Node) -> u64 {
    match node.description.as_ref().map_or(0, |d| d.tasks_max) {
        0 => TASKS_RUNNING_MAX_DEFAULT as u64,
        reported => u64::from(reported),
    }
}

/// Assigns every unassigned runnable task it can.
pub(super) fn schedule(working: &mut Working, context: &Context) {
    let mut load = Load::new(context);
    let mut waiting: Vec<Task> = Vec::new();
    for id in working.ids() {
        let task = working.get(&id).expect("ids() lists live tasks");
        if is_terminal(observed(task)) {
            continue;
        }
        if !task.node_id.is_empty() {
            load.add_busy(&task.node_id);
        }
        if !is_occupant(task) {
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
                load.add_busy(&node_id);
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
    let eligible = || {
        context
            .nodes
            .values()
            .enumerate()
            .filter(|(_, node)| node_takes_tasks(node) && matches_all(&constraints, node))
    };
    eligible()
        .filter(|(index, _)| load.has_room(*index))
        .min_by_key(|(index, node)| {
            (
                per_service.map_or(0, |counts| counts[*index]),
                load.total[*index],
                node.id.as_str(),
            )
        })
        .map(|(_, node)| node.id.clone())
        .ok_or_else(|| {
            let full: Vec<u64> = eligible().map(|(index, _)| load.room[index]).collect();
            if full.is_empty() {
                no_node_reason(context, &constraints)
            } else {
                no_room_reason(&full)
            }
        })
}

/// Why a task waits when every eligible node is full; `rooms` holds each one's maximum.
fn no_room_reason(rooms: &[u64]) -> String {
    let smallest = rooms.iter().min().copied().unwrap_or(0);
    let largest = rooms.iter().max().copied().unwrap_or(0);
    match rooms.len() {
        1 => format!(
            "no node has room: the only eligible node already runs its maximum of {largest} \
             tasks; the task starts when one ends or a node joins"
        ),
        nodes => {
            let each = if smallest == largest {
                format!("{largest} each")
            } else {
                format!("{smallest} to {largest} each")
            };
            format!(
                "no node has room: all {nodes} eligible nodes already run their maximum of \
                 tasks ({each}); the task starts when one ends or a node joins"
            )
        }
    }
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
