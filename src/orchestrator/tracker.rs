//! What the orchestrator remembers between passes, so that a pass reads only what changed:
//! the store's watch events since the last pass mark services dirty, and a pass reconciles
//! those services alone (their tasks, through the store's service index), with the load the
//! rest of the tasks put on each node kept up to date from the same events.
//!
//! An event touches: a task, its service (before and after); a service, itself; a node, the
//! services with tasks on it, every global service and, like a task that stops holding room
//! on a node, every service with tasks waiting for a node (they may fit now). The clock
//! touches: a service whose pass noted a time (a restart delay, a restart window), and a
//! node `DOWN` when its grace ends ([`NODE_DOWN_GRACE_MS`]). Everything else about a service
//! that was reconciled is unchanged, so its pass would find nothing to do.
//!
//! A full pass (every task) comes first, after the watch was dropped (it fell behind, or
//! the store was restored from a snapshot: events were lost), after a change of the
//! cluster's task history retention, and when the caller asks (its slow safety net).
//!
//! Consistency: the events are drained under the store's read lock, in the same
//! [`Store::view`] that captures the pass's objects, so the load and the dirty set are at
//! exactly the captured version (the apply thread delivers a transaction's events before it
//! releases the write lock). Must never hold that lock for more than the drain (bounded by
//! the watch queue) and the pointer capture of the dirty services' tasks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::proto::objects::{Cluster, Node, NodeState, Service, ServiceMode, Task, TaskState};
use crate::store::settings::ClusterSettings;
use crate::store::{
    Action, Event, Kind, Object, ReadView, Store, WatchEvent, WatchFilter, WatchOptions, Watcher,
};

use super::runner::ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX;
use super::{NODE_DOWN_GRACE_MS, NodeLoad, Snapshot, is_occupant, node_state, observed};

/// What the next pass reads.
pub enum Capture {
    /// Every task: nothing is known about what changed.
    Full(Snapshot),
    /// The tasks of `services` (and those services).
    Scoped {
        /// What the pass reads.
        snapshot: Snapshot,
        /// The services it reconciles (some may be deleted).
        services: Vec<String>,
    },
    /// Nothing changed: no pass needed.
    Nothing,
}

/// The orchestrator's memory between passes (see the module doc).
#[derive(Default)]
pub struct Tracker {
    /// `None` until the first full capture, and after the watch was dropped.
    watcher: Option<Watcher>,
    /// Node id → the load of every task in the store on it.
    load: HashMap<String, NodeLoad>,
    /// Service id → its tasks waiting for a node (occupants, unassigned, not finished).
    waiting: HashMap<String, u64>,
    dirty_services: BTreeSet<String>,
    dirty_nodes: BTreeSet<String>,
    /// A task stopped holding room on a node since the last pass.
    room_freed: bool,
    /// The next pass must read everything.
    full_needed: bool,
    /// Service id → when the clock alone changes its reconcile (from its last pass).
    service_wakeups_ms: HashMap<String, i64>,
    /// Node id → when its `DOWN` grace ends.
    node_wakeups_ms: HashMap<String, i64>,
}

impl Tracker {
    /// A tracker whose first capture is a full one.
    pub fn new() -> Self {
        Self {
            full_needed: true,
            ..Self::default()
        }
    }

    /// The watch's channel, to wait on (`None` before the first full capture).
    pub fn receiver(&self) -> Option<&crossbeam_channel::Receiver<WatchEvent>> {
        self.watcher.as_ref().map(Watcher::receiver)
    }

    /// Asks for a full pass next.
    pub fn require_full(&mut self) {
        self.full_needed = true;
    }

    /// The earliest time the clock alone makes work, Unix milliseconds.
    pub fn next_wakeup_ms(&self) -> Option<i64> {
        self.service_wakeups_ms
            .values()
            .chain(self.node_wakeups_ms.values())
            .min()
            .copied()
    }

    /// Records the wake-up times a pass returned for the services it reconciled.
    pub fn record_wakeups(&mut self, wakeups_ms: BTreeMap<String, i64>) {
        self.service_wakeups_ms.extend(wakeups_ms);
    }

    /// A pass over `capture` did not get all of its changes committed: its services (or
    /// everything) are looked at again next pass.
    pub fn pass_incomplete(&mut self, capture: &Capture) {
        match capture {
            Capture::Full(_) => self.full_needed = true,
            Capture::Scoped { services, .. } => {
                self.dirty_services.extend(services.iter().cloned());
            }
            Capture::Nothing => {}
        }
    }

    /// Takes in one event received from [`Self::receiver`] (`None`: the channel closed).
    pub fn take(&mut self, event: Option<WatchEvent>) {
        match event {
            Some(WatchEvent::Change(event)) => self.observe(&event),
            Some(WatchEvent::Commit { .. }) => {}
            Some(WatchEvent::Dropped(_)) | None => {
                self.watcher = None;
                self.full_needed = true;
            }
        }
    }

    /// Takes in the events queued so far (outside any pass, to keep the queue short: a pass
    /// that proposes many transactions fills it with its own changes).
    pub fn drain(&mut self) {
        if !self.drain_queue() {
            self.full_needed = true;
        }
    }

    /// What the next pass at `now_ms` reads: everything, the services touched since the
    /// last pass, or nothing.
    pub fn capture(&mut self, store: &Store, now_ms: i64) -> Capture {
        if !self.full_needed && self.watcher.is_some() {
            self.take_due(now_ms);
            let scoped = store.view(|view| {
                if !self.drain_queue() {
                    return None;
                }
                Some(self.capture_scoped(view))
            });
            match scoped {
                Some(Some((snapshot, services))) => {
                    return Capture::Scoped { snapshot, services };
                }
                Some(None) => return Capture::Nothing,
                None => self.full_needed = true,
            }
        }
        self.capture_full(store)
    }

    fn capture_full(&mut self, store: &Store) -> Capture {
        let options = WatchOptions {
            filters: [Kind::Node, Kind::Service, Kind::Task, Kind::Cluster]
                .into_iter()
                .map(WatchFilter::kind)
                .collect(),
            include_commits: false,
            queue_events_max: Some(ORCHESTRATOR_WATCH_QUEUE_EVENTS_MAX),
        };
        let (snapshot, watcher) = store.view_and_watch(options, Snapshot::capture);
        self.watcher = Some(watcher);
        self.full_needed = false;
        self.room_freed = false;
        self.dirty_services.clear();
        self.dirty_nodes.clear();
        self.service_wakeups_ms.clear();
        self.load.clear();
        self.waiting.clear();
        for task in &snapshot.tasks {
            self.count(task, true);
        }
        self.node_wakeups_ms = snapshot
            .nodes
            .iter()
            .filter_map(|node| down_grace_end_ms(node).map(|at_ms| (node.id.clone(), at_ms)))
            .collect();
        Capture::Full(snapshot)
    }

    /// Moves what the clock made due by `now_ms` into the dirty sets.
    fn take_due(&mut self, now_ms: i64) {
        let due = |wakeups: &mut HashMap<String, i64>| -> Vec<String> {
            let ids: Vec<String> = wakeups
                .iter()
                .filter(|(_, at_ms)| **at_ms <= now_ms)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &ids {
                wakeups.remove(id);
            }
            ids
        };
        let services = due(&mut self.service_wakeups_ms);
        self.dirty_services.extend(services);
        let nodes = due(&mut self.node_wakeups_ms);
        self.dirty_nodes.extend(nodes);
    }

    /// Takes in every queued event; false if the watch was dropped (events were lost).
    fn drain_queue(&mut self) -> bool {
        let Some(watcher) = self.watcher.as_ref() else {
            return false;
        };
        let mut events = Vec::new();
        let alive = loop {
            match watcher.try_recv() {
                Ok(Some(WatchEvent::Change(event))) => events.push(event),
                Ok(Some(WatchEvent::Commit { .. })) => {}
                Ok(None) => break true,
                Ok(Some(WatchEvent::Dropped(_))) | Err(_) => break false,
            }
        };
        for event in &events {
            self.observe(event);
        }
        if !alive {
            self.watcher = None;
        }
        alive
    }

    fn observe(&mut self, event: &Event) {
        match &event.object {
            Object::Task(task) => {
                let old = match (&event.action, &event.old) {
                    (Action::Delete, _) => Some(task),
                    (Action::Update, Some(Object::Task(old))) => Some(old),
                    _ => None,
                };
                let new = (event.action != Action::Delete).then_some(task);
                if let Some(old) = old {
                    self.dirty_services.insert(old.service_id.clone());
                    self.count(old, false);
                }
                if let Some(new) = new {
                    self.dirty_services.insert(new.service_id.clone());
                    self.count(new, true);
                }
                let held = |task: Option<&Arc<Task>>| {
                    task.and_then(|task| NodeLoad::of(task).map(|(node, _)| node.to_string()))
                };
                let (before, after) = (held(old), held(new));
                if before.is_some() && before != after {
                    self.room_freed = true;
                }
            }
            Object::Service(service) => {
                self.dirty_services.insert(service.id.clone());
            }
            Object::Node(node) => {
                self.dirty_nodes.insert(node.id.clone());
                match down_grace_end_ms(node).filter(|_| event.action != Action::Delete) {
                    Some(at_ms) => self.node_wakeups_ms.insert(node.id.clone(), at_ms),
                    None => self.node_wakeups_ms.remove(&node.id),
                };
            }
            Object::Cluster(cluster) => {
                let old = match &event.old {
                    Some(Object::Cluster(old)) => Some(old),
                    _ => None,
                };
                if event.action != Action::Update
                    || retention(old.map(AsRef::as_ref)) != retention(Some(cluster))
                {
                    self.full_needed = true;
                }
            }
            _ => {}
        }
    }

    /// Adds (or removes) `task`'s share of the node loads and of the waiting tasks.
    fn count(&mut self, task: &Task, add: bool) {
        let apply = |value: &mut u64, by: u64| {
            *value = if add {
                value.saturating_add(by)
            } else {
                value.saturating_sub(by)
            };
        };
        if let Some((node_id, share)) = NodeLoad::of(task) {
            let load = self.load.entry(node_id.to_string()).or_default();
            *load = load.with(share, add);
            if *load == NodeLoad::default() {
                self.load.remove(node_id);
            }
        }
        if is_waiting(task) {
            let waiting = self.waiting.entry(task.service_id.clone()).or_default();
            apply(waiting, 1);
            if *waiting == 0 {
                self.waiting.remove(&task.service_id);
            }
        }
    }

    /// Under the read lock: the dirty services with everything the nodes' changes touch,
    /// and the pointers to what their pass reads; `None` if nothing is dirty.
    fn capture_scoped(&mut self, view: &ReadView<'_>) -> Option<(Snapshot, Vec<String>)> {
        if self.room_freed || !self.dirty_nodes.is_empty() {
            self.dirty_services.extend(self.waiting.keys().cloned());
        }
        if !self.dirty_nodes.is_empty() {
            for node_id in std::mem::take(&mut self.dirty_nodes) {
                let services = view.tasks_by_node(&node_id).map(|t| t.service_id.clone());
                self.dirty_services.extend(services);
            }
            let global = view
                .list::<Service>()
                .filter(|service| super::service_mode(service) == ServiceMode::Global)
                .map(|service| service.id.clone());
            self.dirty_services.extend(global);
        }
        self.room_freed = false;
        if self.dirty_services.is_empty() {
            return None;
        }
        let services: Vec<String> = std::mem::take(&mut self.dirty_services)
            .into_iter()
            .collect();
        for id in &services {
            self.service_wakeups_ms.remove(id);
        }
        let tasks: Vec<Arc<Task>> = services
            .iter()
            .flat_map(|id| view.tasks_by_service(id))
            .cloned()
            .collect();
        let mut base_load = self.load.clone();
        for task in &tasks {
            if let Some((node_id, share)) = NodeLoad::of(task) {
                let load = base_load.entry(node_id.to_string()).or_default();
                *load = load.with(share, false);
            }
        }
        let snapshot = Snapshot {
            tasks,
            nodes: view.list::<Node>().cloned().collect(),
            services: services
                .iter()
                .filter_map(|id| view.get::<Service>(id))
                .cloned()
                .collect(),
            cluster: view.list::<Cluster>().next().cloned(),
            base_load,
        };
        Some((snapshot, services))
    }
}

/// True if `task` waits for the scheduler: wanted running, on no node, not yet assigned.
fn is_waiting(task: &Task) -> bool {
    is_occupant(task) && task.node_id.is_empty() && observed(task) < TaskState::Assigned as i32
}

/// When the `DOWN` grace of `node` ends, if it is `DOWN`.
fn down_grace_end_ms(node: &Node) -> Option<i64> {
    let down_since_ms = node.meta.as_ref().map_or(0, |meta| meta.updated_at_ms);
    (node_state(node) == NodeState::Down).then(|| down_since_ms.saturating_add(NODE_DOWN_GRACE_MS))
}

fn retention(cluster: Option<&Cluster>) -> Option<u64> {
    cluster
        .and_then(|cluster| cluster.spec.as_ref())
        .map(|spec| ClusterSettings::from_spec(spec).task_history_retention)
}
