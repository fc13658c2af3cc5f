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

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::agent::TASKS_RUNNING_MAX_DEFAULT;
use crate::proto::objects::{Node, Task, TaskState};
use crate::store::spec::{Constraint, matches_all};

use super::global::constraints_of;
use super::working::{TaskIx, Working};
use super::{Context, is_occupant, is_terminal, node_takes_tasks, observed};

/// Active tasks (wanted running, not finished) per node, and unfinished tasks per node
/// against its room, indexed by the node's position in `Context::nodes` (id order).
struct Load {
    total: Vec<u64>,
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
        let base = |node: &Node| context.base_load.get(&node.id).copied().unwrap_or_default();
        Self {
            total: context.nodes.iter().map(|node| base(node).active).collect(),
            busy: context.nodes.iter().map(|node| base(node).busy).collect(),
            room: context.nodes.iter().map(|node| node_room(node)).collect(),
        }
    }

    fn has_room(&self, node: usize) -> bool {
        self.busy[node] < self.room[node]
    }
}

/// One service's tasks as the scheduler sees them.
#[derive(Default)]
struct ServiceLoad {
    /// Positions of the nodes its active tasks run on (one entry per task).
    active_on: Vec<usize>,
    /// Its unassigned runnable tasks.
    waiting: Vec<TaskIx>,
}

/// The most tasks `node` runs at once: what its agent reported, else the agent default.
pub(crate) fn node_room(node: &Node) -> u64 {
    match node.description.as_ref().map_or(0, |d| d.tasks_max) {
        0 => TASKS_RUNNING_MAX_DEFAULT as u64,
        reported => u64::from(reported),
    }
}

/// Assigns every unassigned runnable task it can: services in id order, each one's tasks
/// in (slot, id) order.
pub(super) fn schedule(working: &mut Working, context: &Context) {
    let mut load = Load::new(context);
    let mut services: Vec<(String, ServiceLoad)> = Vec::new();
    for service_id in working.service_ids() {
        let mut service = ServiceLoad::default();
        for &ix in working.tasks_of_service(&service_id) {
            let Some(task) = working.get(ix) else {
                continue;
            };
            if is_terminal(observed(task)) {
                continue;
            }
            if !task.node_id.is_empty() {
                // A task on a node that no longer exists loads no node.
                if let Some(&node) = context.node_index.get(&task.node_id) {
                    load.busy[node] += 1;
                    if is_occupant(task) {
                        load.total[node] += 1;
                        service.active_on.push(node);
                    }
                }
            } else if is_occupant(task) && observed(task) < TaskState::Assigned as i32 {
                service.waiting.push(ix);
            }
        }
        if !service.waiting.is_empty() {
            services.push((service_id, service));
        }
    }
    for (_, service) in services {
        schedule_service(working, context, &mut load, service);
    }
}

/// Places the waiting tasks of one service, in runs of tasks with the same constraints.
fn schedule_service(
    working: &mut Working,
    context: &Context,
    load: &mut Load,
    mut service: ServiceLoad,
) {
    let slot_and_id = |ix: &TaskIx| {
        let task = working.get(*ix).expect("waiting tasks are live");
        (task.slot, task.id.as_str())
    };
    service
        .waiting
        .sort_by(|a, b| slot_and_id(a).cmp(&slot_and_id(b)));
    let mut per_node = vec![0_u64; context.nodes.len()];
    for node in service.active_on {
        per_node[node] += 1;
    }
    let mut start = 0;
    while start < service.waiting.len() {
        let constraints_text = |ix: TaskIx| {
            working
                .get(ix)
                .and_then(|task| task.spec.as_ref())
                .and_then(|spec| spec.placement.as_ref())
                .map(|placement| placement.constraints.clone())
                .unwrap_or_default()
        };
        let first = constraints_text(service.waiting[start]);
        let run_len = service.waiting[start..]
            .iter()
            .take_while(|ix| constraints_text(**ix) == first)
            .count();
        let run: Vec<TaskIx> = service.waiting[start..start + run_len].to_vec();
        start += run_len;
        place_run(working, context, load, &mut per_node, &run);
    }
}

/// Places `run`, tasks of one service with the same constraints: each on the eligible node
/// with room that has the fewest tasks of the service, then the fewest active tasks, then
/// the smallest id (position). Only the chosen node's counts change between two tasks, so a
/// heap of the eligible nodes gives each choice in O(log nodes) instead of a scan of every
/// node per task.
fn place_run(
    working: &mut Working,
    context: &Context,
    load: &mut Load,
    per_node: &mut [u64],
    run: &[TaskIx],
) {
    let spec = working.get(run[0]).and_then(|task| task.spec.clone());
    let Some(constraints) = constraints_of(spec.as_ref()) else {
        let reason = "the task's placement constraints do not parse".to_string();
        for &ix in run {
            leave_pending(working, context, ix, &reason);
        }
        return;
    };
    let eligible: Vec<usize> = context
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| node_takes_tasks(node) && matches_all(&constraints, node))
        .map(|(position, _)| position)
        .collect();
    let key = |load: &Load, node: usize| Reverse((per_node[node], load.total[node], node));
    let mut heap: BinaryHeap<Reverse<(u64, u64, usize)>> = eligible
        .iter()
        .filter(|node| load.has_room(**node))
        .map(|node| key(load, *node))
        .collect();
    let mut reason: Option<String> = None;
    for &ix in run {
        let Some(Reverse((_, _, node))) = heap.pop() else {
            let reason = reason.get_or_insert_with(|| {
                if eligible.is_empty() {
                    no_node_reason(context, &constraints)
                } else {
                    let rooms: Vec<u64> = eligible.iter().map(|node| load.room[*node]).collect();
                    no_room_reason(&rooms)
                }
            });
            leave_pending(working, context, ix, reason);
            continue;
        };
        per_node[node] += 1;
        load.total[node] += 1;
        load.busy[node] += 1;
        if load.has_room(node) {
            heap.push(Reverse((per_node[node], load.total[node], node)));
        }
        assign(working, context, ix, &context.nodes[node].id);
    }
}

fn assign(working: &mut Working, context: &Context, ix: TaskIx, node_id: &str) {
    let message = format!("assigned to node {node_id} by the scheduler");
    working.modify(ix, |task| {
        task.node_id = node_id.to_string();
        let status = task.status.get_or_insert_with(Default::default);
        status.state = TaskState::Assigned as i32;
        status.message = message;
        status.timestamp_ms = context.now_ms;
    });
}

/// Leaves task `ix` `PENDING` with `reason`, written only when the reason changes.
fn leave_pending(working: &mut Working, context: &Context, ix: TaskIx, reason: &str) {
    let task: &Task = working.get(ix).expect("waiting tasks are live");
    let unchanged = observed(task) == TaskState::Pending as i32
        && task.status.as_ref().is_some_and(|s| s.message == reason);
    if !unchanged {
        working.modify(ix, |task| {
            let status = task.status.get_or_insert_with(Default::default);
            status.state = TaskState::Pending as i32;
            status.message = reason.to_string();
            status.timestamp_ms = context.now_ms;
        });
    }
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
        .iter()
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
