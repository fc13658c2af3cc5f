//! The leader's orchestration: turns services into tasks and tasks onto nodes (swarmkit's
//! replicated and global orchestrators, restart supervisor, updater, task reaper and
//! scheduler), acting only on the replicated object store.
//!
//! [`reconcile`] is a pure function of a [`ReadView`] and the time: it returns the store
//! changes that move the tasks toward what the services ask for, packed into transactions
//! within the store's limits. [`Orchestrator`] is the thread (`flotilla-orchestrator`) that
//! runs it on the Raft leader and proposes what it returns.
//!
//! One pass, in order, on one working copy of the tasks (each step sees the earlier ones):
//!
//! 1. `replicated`: slots `1..=replicas` of every replicated service; slots above are
//!    retired (scale down).
//! 2. `global`: one slot per eligible node of every global service.
//! 3. Tasks of deleted services get desired state `REMOVE`.
//! 4. `scheduler`: unassigned runnable tasks get a node.
//! 5. `reaper`: finished tasks beyond the cluster's `task_history_retention` per slot,
//!    and finished tasks of deleted services, are deleted (tasks on gone nodes count as
//!    finished; a deleted service's tasks that never started are deleted at once).
//!
//! Each slot is reconciled by `slot` (lost nodes, `restart`, rolling update, filling an
//! empty slot). Task states: a task is created `PENDING` (there is no allocator step, so
//! it is ready to schedule at once) with desired state `RUNNING`; the scheduler moves it
//! to `ASSIGNED`, usually in the same pass, so most tasks are written once. Only agents move
//! a task further.
//!
//! Idempotence: a new task's id is derived from (service id, slot or node, the id of the
//! newest task already in that slot, or the service's version for an empty slot): a pass
//! that re-runs on a view that misses an earlier proposal (outcome unknown, or a new leader
//! behind) computes the same id, and the store refuses the second create (`AlreadyExists`)
//! and with it the whole transaction. Every update and delete carries the version read.
//! A slot's changes always travel in one transaction.
//!
//! Must never write anything but tasks, block, or read a clock (the time is an argument).

mod global;
mod reaper;
mod replicated;
mod restart;
mod runner;
mod scheduler;
mod slot;
mod tracker;
mod update;
mod working;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost::Message;

use crate::proto::objects::{
    Change, Cluster, Node, NodeAvailability, NodeState, Service, ServiceMode, Task, TaskState,
    Transaction,
};
use crate::store::settings::ClusterSettings;
use crate::store::{ReadView, TXN_BYTES_MAX, TXN_CHANGES_MAX};

pub use restart::{RESTART_BACKOFF_MAX_MS, RESTART_BACKOFF_MIN_MS, RESTART_QUICK_END_MS};
pub use runner::{
    ORCHESTRATOR_FULL_PASS_INTERVAL, ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX, Orchestrator, Proposer,
    run_with,
};
pub use tracker::{Capture, Tracker};

use working::{FastHash, Unit, Working};

/// How long a node must have been `DOWN` before the tasks on it are replaced elsewhere
/// (replicated) or retired (global). Measured from the node's last update, which for a
/// down node is the one that recorded `DOWN`. The dispatcher has already waited out the
/// missed heartbeats before that write; this absorbs a node that flaps straight back.
pub const NODE_DOWN_GRACE_MS: i64 = 10_000;

/// The restart delay of a task template whose restart policy names none (swarmkit's
/// default): a command that fails at once is restarted after 5 s, then later and later
/// (see [`RESTART_BACKOFF_MAX_MS`]), never on every pass.
pub const DEFAULT_RESTART_DELAY_MS: i64 = 5_000;

/// The length of a task id: the same as the ids the control API gives services.
pub const TASK_ID_CHARS: usize = crate::util::id::ID_CHARS;

/// What one pass reads besides the tasks.
pub(crate) struct Context {
    /// The time of the pass, Unix milliseconds.
    pub now_ms: i64,
    /// Every node, in id order (the scheduler's tie-break: a node's position).
    pub nodes: Vec<Arc<Node>>,
    /// Node id → its position in `nodes`.
    pub node_index: HashMap<String, usize, FastHash>,
    /// Every service, by id.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Finished tasks kept per slot.
    pub task_history_retention: u64,
    /// What the tasks outside the pass load each node with (empty for a full pass).
    pub base_load: HashMap<String, NodeLoad>,
}

/// What tasks load one node with: those not finished (they hold room and their
/// reservations) and, of them, the occupants (they count for spreading).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLoad {
    /// Unfinished tasks on the node, whatever their desired state.
    pub busy: u64,
    /// Unfinished occupants (wanted running) on the node.
    pub active: u64,
    /// What the unfinished tasks reserve (a task being stopped still holds its share).
    pub reserved: Reservation,
}

/// The CPU and memory a task reserves (`TaskSpec.resources.reservations`), or a sum of them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    /// CPUs, in units of 1e-9 CPUs.
    pub nano_cpus: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
}

impl Reservation {
    /// What `spec` reserves (negative amounts, refused by validation, count as 0).
    pub(crate) fn of_spec(spec: Option<&crate::proto::objects::TaskSpec>) -> Self {
        let reservations = spec
            .and_then(|spec| spec.resources.as_ref())
            .and_then(|resources| resources.reservations.as_ref());
        reservations.map_or_else(Self::default, |r| Self {
            nano_cpus: u64::try_from(r.nano_cpus).unwrap_or(0),
            memory_bytes: u64::try_from(r.memory_bytes).unwrap_or(0),
        })
    }

    /// What `node` has to reserve from, as its agent reported it (nothing if unreported).
    pub(crate) fn capacity_of(node: &Node) -> Self {
        let resources = node
            .description
            .as_ref()
            .and_then(|description| description.resources.as_ref());
        resources.map_or_else(Self::default, |r| Self {
            nano_cpus: u64::try_from(r.nano_cpus).unwrap_or(0),
            memory_bytes: u64::try_from(r.memory_bytes).unwrap_or(0),
        })
    }

    /// True if nothing is reserved.
    pub(crate) fn is_zero(self) -> bool {
        self == Self::default()
    }

    pub(crate) fn plus(self, other: Self) -> Self {
        Self {
            nano_cpus: self.nano_cpus.saturating_add(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
        }
    }

    pub(crate) fn minus(self, other: Self) -> Self {
        Self {
            nano_cpus: self.nano_cpus.saturating_sub(other.nano_cpus),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }

    /// True if `self` fits within `capacity`, one resource at a time (a resource not
    /// reserved fits whatever the node reported).
    pub(crate) fn fits_in(self, capacity: Self) -> bool {
        (self.nano_cpus == 0 || self.nano_cpus <= capacity.nano_cpus)
            && (self.memory_bytes == 0 || self.memory_bytes <= capacity.memory_bytes)
    }
}

impl NodeLoad {
    /// The load `task` puts on its node, and that node; `None` for a task on no node or
    /// finished.
    pub(crate) fn of(task: &Task) -> Option<(&str, NodeLoad)> {
        if task.node_id.is_empty() || is_terminal(observed(task)) {
            return None;
        }
        let active = u64::from(is_occupant(task));
        let reserved = Reservation::of_spec(task.spec.as_ref());
        Some((
            task.node_id.as_str(),
            NodeLoad {
                busy: 1,
                active,
                reserved,
            },
        ))
    }

    /// `self` with `other` added (`add`) or taken away, saturating.
    pub(crate) fn with(self, other: NodeLoad, add: bool) -> Self {
        if add {
            Self {
                busy: self.busy.saturating_add(other.busy),
                active: self.active.saturating_add(other.active),
                reserved: self.reserved.plus(other.reserved),
            }
        } else {
            Self {
                busy: self.busy.saturating_sub(other.busy),
                active: self.active.saturating_sub(other.active),
                reserved: self.reserved.minus(other.reserved),
            }
        }
    }
}

impl Context {
    /// The node `id`, if it exists.
    pub(crate) fn node(&self, id: &str) -> Option<&Arc<Node>> {
        self.node_index
            .get(id)
            .map(|position| &self.nodes[*position])
    }

    fn load(snapshot: &Snapshot, now_ms: i64) -> Self {
        let settings = snapshot
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.spec.as_ref().map(ClusterSettings::from_spec))
            .unwrap_or_default();
        let mut nodes = snapshot.nodes.clone();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        let node_index = nodes
            .iter()
            .enumerate()
            .map(|(position, node)| (node.id.clone(), position))
            .collect();
        Self {
            now_ms,
            nodes,
            node_index,
            services: snapshot
                .services
                .iter()
                .map(|service| (service.id.clone(), Arc::clone(service)))
                .collect(),
            task_history_retention: settings.task_history_retention,
            base_load: snapshot.base_load.clone(),
        }
    }
}

/// What a pass reads: shared pointers to the tasks and services it reconciles (every one,
/// or those of some services: [`Tracker`]), every node and the cluster object, taken under
/// the store's read lock (pointer copies only), so that the pass runs without holding it
/// (the apply thread waits for that lock).
pub struct Snapshot {
    tasks: Vec<Arc<Task>>,
    nodes: Vec<Arc<Node>>,
    services: Vec<Arc<Service>>,
    cluster: Option<Arc<Cluster>>,
    /// The load of the tasks left out of `tasks` (a scoped pass), per node id.
    base_load: HashMap<String, NodeLoad>,
}

impl Snapshot {
    /// Captures what a full pass needs from `view`.
    pub fn capture(view: &ReadView<'_>) -> Self {
        Self {
            tasks: view.list::<Task>().cloned().collect(),
            nodes: view.list::<Node>().cloned().collect(),
            services: view.list::<Service>().cloned().collect(),
            cluster: view.list::<Cluster>().next().cloned(),
            base_load: HashMap::new(),
        }
    }

    /// The number of tasks the pass reads.
    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }
}

/// What one pass decided.
#[derive(Debug, Default)]
pub struct PassOutcome {
    /// The changes, as transactions to propose in this order.
    pub transactions: Vec<Transaction>,
    /// Services whose reconcile changes by the clock alone (a restart delay ends, a restart
    /// window lets an attempt go), and the earliest such time, Unix milliseconds.
    pub wakeups_ms: BTreeMap<String, i64>,
}

/// Computes the changes that bring the tasks in `view` in line with the services and nodes,
/// at time `now_ms`, as transactions within the store's limits (in the order to propose
/// them). Empty when everything is in place.
pub fn reconcile(view: &ReadView<'_>, now_ms: i64) -> Vec<Transaction> {
    reconcile_snapshot(&Snapshot::capture(view), now_ms)
}

/// [`reconcile`] on a captured [`Snapshot`] (what the thread runs, outside the store's lock).
pub fn reconcile_snapshot(snapshot: &Snapshot, now_ms: i64) -> Vec<Transaction> {
    reconcile_pass(snapshot, now_ms).transactions
}

/// [`reconcile_snapshot`], with the times at which its services need another look.
pub fn reconcile_pass(snapshot: &Snapshot, now_ms: i64) -> PassOutcome {
    let context = Context::load(snapshot, now_ms);
    let mut working = Working::from_tasks(snapshot.tasks.iter());
    for service in context.services.values() {
        match service_mode(service) {
            ServiceMode::Global => global::reconcile_service(&mut working, &context, service),
            _ => replicated::reconcile_service(&mut working, &context, service),
        }
    }
    remove_tasks_of_deleted_services(&mut working, &context);
    scheduler::schedule(&mut working, &context);
    reaper::reap(&mut working, &context);
    let wakeups_ms = working.take_wakeups();
    PassOutcome {
        transactions: pack(working.into_units(), now_ms),
        wakeups_ms,
    }
}

fn service_mode(service: &Service) -> ServiceMode {
    service
        .spec
        .as_ref()
        .and_then(|spec| ServiceMode::try_from(spec.mode).ok())
        .unwrap_or(ServiceMode::Replicated)
}

/// Tasks whose service is gone are asked to be removed (desired `REMOVE`: the agent stops
/// them and forgets them; the reaper deletes them once finished).
fn remove_tasks_of_deleted_services(working: &mut Working, context: &Context) {
    for service_id in working.service_ids() {
        if context.services.contains_key(&service_id) {
            continue;
        }
        let tasks = working.tasks_of_service(&service_id).to_vec();
        for ix in tasks {
            working.retire(ix, TaskState::Remove);
        }
    }
}

/// Packs units (a slot's changes each) into transactions: whole units only, within
/// [`TXN_CHANGES_MAX`] changes and [`TXN_BYTES_MAX`] bytes. A unit that alone exceeds them
/// (a slot with hundreds of occupants, which only another writer could have made) is split
/// change by change rather than never proposed.
fn pack(units: Vec<Unit>, timestamp_ms: i64) -> Vec<Transaction> {
    /// Room for the transaction's own fields beside its changes.
    const TXN_HEADER_BYTES_MAX: usize = 16;
    let change_bytes = |change: &Change| {
        let len = change.encoded_len();
        1 + prost::length_delimiter_len(len) + len
    };
    let fits = |changes: usize, bytes: usize| {
        changes <= TXN_CHANGES_MAX && TXN_HEADER_BYTES_MAX + bytes <= TXN_BYTES_MAX
    };
    let mut transactions = Vec::new();
    let mut current: Vec<Change> = Vec::new();
    let mut current_bytes = 0;
    let units = units.into_iter().flat_map(|unit| {
        let bytes: usize = unit.iter().map(change_bytes).sum();
        if fits(unit.len(), bytes) {
            vec![unit]
        } else {
            unit.into_iter().map(|change| vec![change]).collect()
        }
    });
    for unit in units {
        let unit_bytes: usize = unit.iter().map(change_bytes).sum();
        if !current.is_empty() && !fits(current.len() + unit.len(), current_bytes + unit_bytes) {
            transactions.push(Transaction {
                changes: std::mem::take(&mut current),
                timestamp_ms,
                request_id: None,
            });
            current_bytes = 0;
        }
        current.extend(unit);
        current_bytes += unit_bytes;
    }
    if !current.is_empty() {
        transactions.push(Transaction {
            changes: current,
            timestamp_ms,
            request_id: None,
        });
    }
    transactions
}

// ----------------------------------------------------------------------------------------
// Facts about nodes and tasks shared by the components.

/// True if `node` takes new tasks: availability `ACTIVE` and status `READY`.
pub(crate) fn node_takes_tasks(node: &Node) -> bool {
    node_availability(node) == NodeAvailability::Active && node_state(node) == NodeState::Ready
}

pub(crate) fn node_availability(node: &Node) -> NodeAvailability {
    node.spec
        .as_ref()
        .and_then(|spec| NodeAvailability::try_from(spec.availability).ok())
        .unwrap_or(NodeAvailability::Active)
}

pub(crate) fn node_state(node: &Node) -> NodeState {
    node.status
        .as_ref()
        .and_then(|status| NodeState::try_from(status.state).ok())
        .unwrap_or(NodeState::Unknown)
}

/// Why the tasks on node `node_id` must leave it, if they must: the node is deleted,
/// drained, or down for longer than [`NODE_DOWN_GRACE_MS`].
pub(crate) fn node_lost(context: &Context, node_id: &str) -> Option<String> {
    let Some(node) = context.node(node_id) else {
        return Some(format!("node {node_id} was removed"));
    };
    if node_availability(node) == NodeAvailability::Drain {
        return Some(format!("node {node_id} is drained"));
    }
    if down_past_grace(context, node) {
        return Some(format!("node {node_id} is down"));
    }
    None
}

/// True if `node` has been `DOWN` for [`NODE_DOWN_GRACE_MS`] or more.
fn down_past_grace(context: &Context, node: &Node) -> bool {
    let down_since_ms = node.meta.as_ref().map_or(0, |meta| meta.updated_at_ms);
    node_state(node) == NodeState::Down
        && context.now_ms.saturating_sub(down_since_ms) >= NODE_DOWN_GRACE_MS
}

/// True if no agent will report on node `node_id` again (short of coming back, when it gets
/// a complete set): deleted, or down past [`NODE_DOWN_GRACE_MS`]. A drained node is not
/// gone: its agent stops its tasks and reports them.
pub(crate) fn node_gone(context: &Context, node_id: &str) -> bool {
    context
        .node(node_id)
        .is_none_or(|node| down_past_grace(context, node))
}

/// The observed state of `task`.
pub(crate) fn observed(task: &Task) -> i32 {
    task.status.as_ref().map_or(0, |status| status.state)
}

/// True for the states a task never leaves (it ran and ended, or never will run).
pub(crate) fn is_terminal(state: i32) -> bool {
    state >= TaskState::Complete as i32
}

/// True if `task` is wanted running: the occupant of its slot.
pub(crate) fn is_occupant(task: &Task) -> bool {
    task.desired_state <= TaskState::Running as i32
}

/// True if `task` is retired and will not run (again): reapable history.
pub(crate) fn is_finished(task: &Task) -> bool {
    !is_occupant(task)
        && (is_terminal(observed(task)) || observed(task) < TaskState::Assigned as i32)
}

/// When `task` reached its observed state (the reporter's time, else the last write).
pub(crate) fn status_time_ms(task: &Task) -> i64 {
    match task.status.as_ref().map(|status| status.timestamp_ms) {
        Some(ms) if ms > 0 => ms,
        _ => task.meta.as_ref().map_or(0, |meta| meta.updated_at_ms),
    }
}

/// Orders a slot's tasks oldest first: creation time, then id; tasks of this pass last.
pub(crate) fn age_key(task: &Task) -> (i64, &str) {
    (
        task.meta
            .as_ref()
            .map_or(i64::MAX, |meta| meta.created_at_ms),
        task.id.as_str(),
    )
}

/// The id of a new task for `service_id` in slot `slot_key` following task `predecessor`
/// (or, in an empty slot, the service version): the same inputs always give the same id.
pub(crate) fn derive_task_id(service_id: &str, slot_key: &str, predecessor: &str) -> String {
    crate::util::id::derived_id(&["flotilla-task", service_id, slot_key, predecessor])
}
