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
//! **Reservations.** A task that reserves CPU or memory (`resources.reservations`) goes
//! only to a node whose reported resources (`NodeDescription.resources`) still hold it
//! beside what the node's unfinished tasks reserve; a node that reported none holds no
//! reservation. A task that fits nowhere stays `PENDING` with swarmkit's reason ("no
//! suitable node (insufficient resources on N nodes)", and what the task reserves).
//!
//! **Spreading over labels.** A task template's placement preferences
//! (`spread=node.labels.X`, outermost first) group the eligible nodes by each label's value
//! (nodes without the label form a group of their own), nested: a task goes to the group
//! holding the fewest tasks of its service at each level, then to a node of that group as
//! above. Each level is a heap of its groups, so a choice costs O(levels × log groups).
//!
//! Global services' tasks are created on their node by the orchestrator, not here, and are
//! not held back by room or reservations (the agent refuses what it cannot run; their
//! reservations still count against the node for the tasks placed here). Must never assign
//! a task to a node that does not take tasks, fails a constraint, has no room or cannot
//! hold its reservation.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::agent::TASKS_RUNNING_MAX_DEFAULT;
use crate::proto::objects::{Node, Placement, Task, TaskSpec, TaskState};
use crate::store::spec::{Constraint, matches_all, parse_preferences};

use super::global::constraints_of;
use super::working::{TaskIx, Working};
use super::{Context, Reservation, is_occupant, is_terminal, node_takes_tasks, observed};

/// Active tasks (wanted running, not finished) per node, and unfinished tasks per node
/// against its room and its resources, indexed by the node's position in `Context::nodes`
/// (id order).
struct Load {
    total: Vec<u64>,
    /// Tasks on the node that have not finished (any desired state): what its agent runs
    /// or is about to run or stop.
    busy: Vec<u64>,
    /// The most tasks the node runs at once.
    room: Vec<u64>,
    /// What the unfinished tasks on the node reserve.
    reserved: Vec<Reservation>,
    /// What the node has to reserve from.
    capacity: Vec<Reservation>,
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
            reserved: context
                .nodes
                .iter()
                .map(|node| base(node).reserved)
                .collect(),
            capacity: context
                .nodes
                .iter()
                .map(|node| Reservation::capacity_of(node))
                .collect(),
        }
    }

    fn has_room(&self, node: usize) -> bool {
        self.busy[node] < self.room[node]
    }

    /// True if `node` holds `want` beside what its tasks reserve already.
    fn fits(&self, node: usize, want: Reservation) -> bool {
        want.is_zero() || self.reserved[node].plus(want).fits_in(self.capacity[node])
    }

    /// True if `node` takes one more task reserving `want`.
    fn takes(&self, node: usize, want: Reservation) -> bool {
        self.has_room(node) && self.fits(node, want)
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
                    let reserved = Reservation::of_spec(task.spec.as_ref());
                    if !reserved.is_zero() {
                        load.reserved[node] = load.reserved[node].plus(reserved);
                    }
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

/// Places the waiting tasks of one service, in runs of tasks with the same placement and
/// reservations.
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
        let spec_of = |ix: TaskIx| working.get(ix).and_then(|task| task.spec.as_ref());
        let first = spec_of(service.waiting[start]);
        let run_len = service.waiting[start..]
            .iter()
            .take_while(|ix| same_run(spec_of(**ix), first))
            .count();
        let run: Vec<TaskIx> = service.waiting[start..start + run_len].to_vec();
        start += run_len;
        place_run(working, context, load, &mut per_node, &run);
    }
}

/// True if tasks of templates `a` and `b` are placed alike: same placement (constraints and
/// preferences) and same reservations.
fn same_run(a: Option<&TaskSpec>, b: Option<&TaskSpec>) -> bool {
    fn placement(spec: Option<&TaskSpec>) -> Option<&Placement> {
        spec.and_then(|spec| spec.placement.as_ref())
    }
    let empty = |placement: Option<&Placement>| {
        placement.is_none_or(|p| p.constraints.is_empty() && p.preferences.is_empty())
    };
    let same_placement = match (placement(a), placement(b)) {
        (Some(a), Some(b)) => a == b,
        (a, b) => empty(a) && empty(b),
    };
    same_placement && Reservation::of_spec(a) == Reservation::of_spec(b)
}

/// The label keys `spec`'s tasks are spread over, outermost first; `None` if they do not
/// parse (validation refuses such specs).
fn spread_labels(spec: Option<&TaskSpec>) -> Option<Vec<String>> {
    let preferences = spec
        .and_then(|spec| spec.placement.as_ref())
        .map(|placement| placement.preferences.as_slice())
        .unwrap_or_default();
    parse_preferences("task.placement.preferences", preferences).ok()
}

/// Places `run`, tasks of one service with the same placement and reservations: each in the
/// spread group with the fewest tasks of the service at every level (see the module doc),
/// then on the eligible node of that group that takes it and has the fewest tasks of the
/// service, then the fewest active tasks, then the smallest id (position). Only the chosen
/// node's counts change between two tasks, so heaps give each choice in O(log nodes)
/// instead of a scan of every node per task.
fn place_run(
    working: &mut Working,
    context: &Context,
    load: &mut Load,
    per_node: &mut [u64],
    run: &[TaskIx],
) {
    let spec = working.get(run[0]).and_then(|task| task.spec.clone());
    let (Some(constraints), Some(labels)) =
        (constraints_of(spec.as_ref()), spread_labels(spec.as_ref()))
    else {
        let reason = "the task's placement constraints or preferences do not parse".to_string();
        for &ix in run {
            leave_pending(working, context, ix, &reason);
        }
        return;
    };
    let want = Reservation::of_spec(spec.as_ref());
    let eligible: Vec<usize> = context
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, node)| node_takes_tasks(node) && matches_all(&constraints, node))
        .map(|(position, _)| position)
        .collect();
    let mut tree = Branch::build(context, load, per_node, &eligible, &labels, want);
    let mut reason: Option<String> = None;
    for &ix in run {
        let Some(node) = tree.pick(load, per_node, want) else {
            let reason = reason.get_or_insert_with(|| {
                if eligible.is_empty() {
                    no_node_reason(context, &constraints)
                } else {
                    no_fit_reason(load, &eligible, want)
                }
            });
            leave_pending(working, context, ix, reason);
            continue;
        };
        assign(working, context, ix, &context.nodes[node].id);
    }
}

/// The key of a node in a group's heap: fewest tasks of the service, then fewest active
/// tasks, then the smallest position.
type NodeKey = Reverse<(u64, u64, usize)>;

/// The eligible nodes of one run, grouped by the values of the spread labels (a single
/// group of every node when there are none).
enum Branch {
    /// The nodes of one group that take a task of the run.
    Nodes(BinaryHeap<NodeKey>),
    /// The groups of one level, keyed by the tasks of the service they hold, then by
    /// position (label values in order; nodes without the label first).
    Groups {
        heap: BinaryHeap<Reverse<(u64, usize)>>,
        children: Vec<Branch>,
    },
}

impl Branch {
    fn build(
        context: &Context,
        load: &Load,
        per_node: &[u64],
        nodes: &[usize],
        labels: &[String],
        want: Reservation,
    ) -> Self {
        let Some((label, inner)) = labels.split_first() else {
            let heap = nodes
                .iter()
                .filter(|node| load.takes(**node, want))
                .map(|node| Reverse((per_node[*node], load.total[*node], *node)))
                .collect();
            return Branch::Nodes(heap);
        };
        let mut groups: std::collections::BTreeMap<Option<&str>, Vec<usize>> =
            std::collections::BTreeMap::new();
        for &node in nodes {
            let value = context.nodes[node]
                .spec
                .as_ref()
                .and_then(|spec| spec.labels.get(label))
                .map(String::as_str);
            groups.entry(value).or_default().push(node);
        }
        let mut heap = BinaryHeap::with_capacity(groups.len());
        let mut children = Vec::with_capacity(groups.len());
        for members in groups.values() {
            let tasks: u64 = members.iter().map(|node| per_node[*node]).sum();
            heap.push(Reverse((tasks, children.len())));
            children.push(Branch::build(context, load, per_node, members, inner, want));
        }
        Branch::Groups { heap, children }
    }

    /// The node for one more task reserving `want`, counted in; `None` if no node of this
    /// branch takes it. A group found with no such node is dropped for the rest of the run
    /// (the run's tasks only add load).
    fn pick(&mut self, load: &mut Load, per_node: &mut [u64], want: Reservation) -> Option<usize> {
        match self {
            Branch::Nodes(heap) => {
                let Reverse((_, _, node)) = heap.pop()?;
                debug_assert!(load.takes(node, want), "only nodes that take it are queued");
                per_node[node] += 1;
                load.total[node] += 1;
                load.busy[node] += 1;
                load.reserved[node] = load.reserved[node].plus(want);
                if load.takes(node, want) {
                    heap.push(Reverse((per_node[node], load.total[node], node)));
                }
                Some(node)
            }
            Branch::Groups { heap, children } => loop {
                let Reverse((tasks, child)) = heap.pop()?;
                if let Some(node) = children[child].pick(load, per_node, want) {
                    heap.push(Reverse((tasks + 1, child)));
                    return Some(node);
                }
            },
        }
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

/// Why a task reserving `want` waits when none of the `eligible` nodes takes it: too
/// little room for tasks, or too few resources left (swarmkit's words).
fn no_fit_reason(load: &Load, eligible: &[usize], want: Reservation) -> String {
    let short: Vec<usize> = eligible
        .iter()
        .copied()
        .filter(|node| !load.fits(*node, want))
        .collect();
    if short.is_empty() {
        let rooms: Vec<u64> = eligible.iter().map(|node| load.room[*node]).collect();
        return no_room_reason(&rooms);
    }
    let nodes = match short.len() {
        1 => "1 node".to_string(),
        n => format!("{n} nodes"),
    };
    let most_free = short
        .iter()
        .map(|node| load.capacity[*node].minus(load.reserved[*node]))
        .fold(Reservation::default(), |most, free| Reservation {
            nano_cpus: most.nano_cpus.max(free.nano_cpus),
            memory_bytes: most.memory_bytes.max(free.memory_bytes),
        });
    format!(
        "no suitable node (insufficient resources on {nodes}): the task reserves {}, the \
         most any of them has free is {}; the task starts when resources are freed or a \
         larger node joins, or lower the service's --reserve-cpu/--reserve-memory",
        reservation_text(want, want),
        reservation_text(most_free, want)
    )
}

/// `0.5 CPUs and 64 MiB of memory`: `amount`, naming only what `want` reserves (both when
/// it reserves neither).
fn reservation_text(amount: Reservation, want: Reservation) -> String {
    /// Nano-CPUs per CPU.
    const NANO_CPUS_PER_CPU: f64 = 1e9;
    /// Bytes per MiB.
    const BYTES_PER_MIB: f64 = 1_048_576.0;
    #[allow(clippy::cast_precision_loss)]
    let cpus = format!("{} CPUs", amount.nano_cpus as f64 / NANO_CPUS_PER_CPU);
    #[allow(clippy::cast_precision_loss)]
    let memory = format!(
        "{:.0} MiB of memory",
        amount.memory_bytes as f64 / BYTES_PER_MIB
    );
    match (want.nano_cpus > 0, want.memory_bytes > 0) {
        (true, false) => cpus,
        (false, true) => memory,
        _ => format!("{cpus} and {memory}"),
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
