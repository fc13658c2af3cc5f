//! The dispatcher (`dispatcher.*`, swarmkit's): how each node's agent learns the tasks
//! assigned to it and reports their status. Served by the Raft leader only.
//!
//! ```text
//!  agent ──Session──► leader: SessionStarted{id, heartbeat period ± 10 %}, then Assignments
//!        │                    (the complete set of the node's tasks, then changes)
//!        ├──Heartbeat(id) every period ──► 3 missed periods: node DOWN, session ended
//!        └──UpdateTaskStatus(id, ≤ 200 updates) ──► one transaction, only the caller's
//!                                                   tasks, states only move forward
//! ```
//!
//! - A session is state, not a thread ([`sessions::SessionTable`]): one thread,
//!   `flotilla-dispatcher`, holds the one store watch (every task change, with commit
//!   markers) and fans each transaction out to the sessions of the nodes it touches; it
//!   writes to their streams without ever blocking (a session whose agent does not read
//!   holds its changes back, coalesced, up to [`sessions::PENDING_TASKS_MAX`] tasks, then
//!   ends). Heartbeat deadlines and the grace after a leader change run on a timer thread
//!   (`flotilla-dispatch-timers`, [`crate::timer::Timers`]), whose callbacks only post to
//!   the dispatcher thread. The RPC handlers run on the `dispatcher` pool.
//! - A session starts by recording the node READY (a worker's Node object is created
//!   then) in the next node batch: node writes (READY, DOWN, DISCONNECTED, UNKNOWN) are
//!   queued, flushed every [`NODE_BATCH_DELAY`] or at [`NODE_BATCH_ITEMS_MAX`], packed into
//!   few transactions and proposed without waiting; the session's stream starts from the
//!   proposal's callback, so no pool thread waits. One session per node: a new one
//!   replaces the old, whose stream ends. A node may open
//!   [`sessions::REGISTRATION_ATTEMPTS_MAX`] sessions per [`sessions::REGISTRATION_WINDOW`];
//!   past that it is refused with `retry_after`.
//! - Assignments: the complete set, then batched, chained incremental messages of what the
//!   agent acts on ([`sessions`]).
//! - Tasks that may still run (ASSIGNED to RUNNING) on a node DOWN for the cluster's
//!   `orphan_after` (24 h by default) become ORPHANED.
//! - An agent that closes its stream leaves its node DISCONNECTED; silent for
//!   [`HEARTBEAT_MISSES_MAX`] periods, the node is DOWN. A manager that takes the lead
//!   marks the nodes it has no session with UNKNOWN and gives them twice that grace
//!   before marking them DOWN (no storm of DOWN after a leader change).
//! - A follower refuses every call with `FailedPrecondition` and the reason
//!   [`NOT_LEADER`]; the agent tries the leader next (the status's `leader_addr` names it).
//! - Every session learns the managers: `SessionStarted.managers`, then a
//!   `ManagersChanged` on every open session whenever the managers reachable from the
//!   leader change (one joined, was removed, became unreachable or reachable again; the
//!   leader looks every [`MANAGERS_REFRESH`], asking its Raft node without waiting). Each
//!   has the weight [`pb::MANAGER_WEIGHT_DEFAULT`]; an agent with no room for the list is
//!   offered it again at each tick. Each heartbeat answer says how long after it the
//!   managers may give the node's tasks to other nodes (`tasks_reassigned_after_ms`: the
//!   node-down grace plus the orchestrator's [`NODE_DOWN_GRACE_MS`]), which the agent's
//!   self-fencing counts from.
//!
//! Must never change the store except through a proposed transaction, let a node touch
//! another node's tasks, move a task's observed state backwards, or block its thread on a
//! stream or a proposal.

pub mod logs;
pub mod sessions;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::ca::PeerIdentity;
use crate::net::{CallContext, Responder, Router, ServerStream, ServicePool};
use crate::orchestrator::NODE_DOWN_GRACE_MS;
use crate::proto::dispatcher as pb;
use crate::proto::dispatcher::rpc;
use crate::proto::objects::{
    Cluster, Node, NodeAvailability, NodeSpec, NodeState, NodeStatus, Task, TaskState, TaskStatus,
    Transaction,
};
use crate::raft::node::{NodeHandle, NodeStatus as GroupStatus};
use crate::replication::propose_transaction_with;
use crate::store::TXN_CHANGES_MAX;
use crate::store::settings::ClusterSettings;
use crate::store::{Action, Kind, Object, Store, WatchEvent, WatchFilter, WatchOptions, Watcher};
use crate::timer::Timers;
use crate::util::clock::unix_now_ms as now_ms;
use crate::wire::{Code, Status};

use sessions::{Deadline, SessionTable};

/// The status reason of a refusal by a manager that is not the leader (the status names the
/// leader in its details when it is known).
pub const NOT_LEADER: crate::wire::Reason = crate::wire::Reason::NotLeader;
/// Status updates per `UpdateTaskStatus` call (one transaction's worth).
pub use crate::proto::dispatcher::STATUS_UPDATES_MAX;
/// Sessions one leader serves at once (state only: no thread each).
pub use sessions::SESSIONS_MAX;
/// Missed heartbeat periods after which a node is down.
pub const HEARTBEAT_MISSES_MAX: u32 = 3;
/// The grace after a leader change is this many times the usual one.
pub const LEADER_CHANGE_GRACE_FACTOR: u32 = 2;
/// Encoded task bytes per assignments message; a bigger set is sent in several.
pub use crate::proto::dispatcher::ASSIGNMENTS_BYTES_MAX;
/// The heartbeat period each agent is given is the cluster's within ± this many percent,
/// so that agents started together do not heartbeat together.
pub const HEARTBEAT_JITTER_PERCENT: u64 = 10;
/// How often the dispatcher thread checks leadership, closed streams and held-back
/// assignments when nothing else wakes it.
const TICK: Duration = Duration::from_millis(100);
/// Events the dispatcher's store watch may queue before the store drops it (the thread
/// then resubscribes and sends every session a complete set).
const WATCH_QUEUE_EVENTS_MAX: usize = 65_536;
/// Watch events handled per lock of the session table.
const WATCH_EVENTS_PER_TURN_MAX: usize = 4096;
/// Attempts of a write that met a concurrent change (`Aborted`) before giving up.
const WRITE_ATTEMPTS_MAX: u32 = 3;
/// How long a status report waits for others to share its transaction (seed: 100 ms).
pub const STATUS_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Status updates that make a batch due at once (seed: 10,000).
pub const STATUS_BATCH_UPDATES_MAX: usize = 10_000;
/// Status updates waiting at most; past it a report is refused with `RETRY_SOON`.
const STATUS_QUEUED_UPDATES_MAX: usize = 4 * STATUS_BATCH_UPDATES_MAX;
/// Encoded bytes of changes per status transaction (under the store's 1.5 MiB).
const STATUS_TXN_BYTES_MAX: usize = 1024 * 1024;
/// How long a node write (a session's READY, DOWN, DISCONNECTED, UNKNOWN) waits for others
/// to share its transaction (seed: 100 ms).
pub const NODE_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Node writes that make a batch due at once (seed: 10,000).
pub const NODE_BATCH_ITEMS_MAX: usize = 10_000;
/// Shortest interval between two looks for tasks to orphan (the interval is a tenth of the
/// cluster's `orphan_after`, within this and [`ORPHAN_CHECK_PERIOD_MAX`]).
const ORPHAN_CHECK_PERIOD_MIN: Duration = Duration::from_secs(1);
/// Longest interval between two looks for tasks to orphan.
const ORPHAN_CHECK_PERIOD_MAX: Duration = Duration::from_secs(60);
/// How often the leader looks at the group's members and their reachability for the
/// agents' manager list.
pub const MANAGERS_REFRESH: Duration = Duration::from_secs(1);
/// A manager the leader has not heard from for this long leaves the agents' manager list
/// (its Raft heartbeat answers come every 100 ms). Counted from its last message rather
/// than from the Raft core's `recent_active` flag, which check-quorum clears every election
/// timeout and a new leader starts without: the list would flap.
pub const MANAGER_SILENCE_MAX_MS: u64 = 3_000;

/// What the dispatcher thread is told (timer callbacks and proposal callbacks post here;
/// unbounded, but at most one deadline per session, one grace per leadership and one
/// retry per write in flight).
enum Event {
    /// A session's heartbeat deadline came.
    Deadline { node_id: String, session_id: String },
    /// The grace after taking the lead (of lead `generation`) is over.
    LeaderGrace { generation: u64, until: Instant },
    /// The node batch is due (its delay passed, or it is full).
    FlushNodes,
    /// A node batch's transaction ended.
    NodesWritten {
        items: Vec<PendingNode>,
        outcome: Result<(), Status>,
    },

    /// The status batch is due (its delay passed, or it is full).
    FlushStatuses,
    /// Status reports to build again (a concurrent change aborted their transaction).
    Statuses(Vec<StatusRequest>),
    /// The orphaning transaction in flight ended; `more`: it was full, look again now.
    Orphaned { more: bool },
    /// The Raft node's view of the group (for the agents' manager list).
    Group(GroupStatus),
}

/// The managers the sessions are told about, and the sessions still owed the latest list.
#[derive(Default)]
struct ManagerList {
    /// Bumped at each change of `peers`.
    version: u64,
    /// Reachable managers, by address.
    peers: Vec<pb::WeightedPeer>,
    /// Sessions (node id, session id) whose agent had no room for the latest list.
    owed: HashSet<(String, String)>,
    /// When the Raft node was last asked for its view of the group.
    asked_at: Option<Instant>,
}

/// One `UpdateTaskStatus` call waiting for its batch.
struct StatusRequest {
    node_id: String,
    updates: Vec<pb::TaskStatusUpdate>,
    responder: Responder<pb::UpdateTaskStatusResponse>,
    attempt: u32,
}

/// The dispatcher thread's look for tasks to orphan.
#[derive(Default)]
struct OrphanCheck {
    /// When it last looked (`None`: not since it took the lead).
    last: Option<Instant>,
    /// Its transaction is in flight.
    in_flight: bool,
}

/// The status reports waiting for the next batch.
#[derive(Default)]
struct StatusBatch {
    requests: Vec<StatusRequest>,
    /// Updates in `requests` (a call with none counts one).
    updates: usize,
    /// Whether a flush is due (a timer or an event is on its way).
    armed: bool,
}

/// The reports of one status transaction.
#[derive(Default)]
struct StatusPack {
    requests: Vec<StatusRequest>,
    changes: Vec<crate::proto::objects::Change>,
    bytes: usize,
    task_ids: std::collections::HashSet<String>,
}

/// A node write waiting for the next node batch.
struct PendingNode {
    kind: PendingKind,
    /// 1 for the first proposal; more after a concurrent change aborted it.
    attempt: u32,
}

enum PendingKind {
    /// A state change (DOWN, DISCONNECTED, UNKNOWN), if its guard holds.
    State(NodeWrite),
    /// A session opening: the node is recorded READY, then its stream starts.
    Ready(Box<ReadyOpen>),
}

impl PendingNode {
    fn node_id(&self) -> &str {
        match &self.kind {
            PendingKind::State(write) => &write.node_id,
            PendingKind::Ready(open) => &open.caller.node_id,
        }
    }
}

/// A session whose node is being recorded READY; its stream starts once that committed.
struct ReadyOpen {
    caller: PeerIdentity,
    request: pb::SessionRequest,
    session_id: String,
    /// The heartbeat period given to the agent (jittered).
    period_ms: u64,
    stream: ServerStream<pb::SessionMessage>,
}

/// The node writes waiting for the next batch (at most one state write per node and
/// session in the table plus one opening per session: bounded by [`SESSIONS_MAX`] and the
/// nodes).
#[derive(Default)]
struct NodeBatch {
    items: Vec<PendingNode>,
    /// Whether a flush is due (a timer or an event is on its way).
    armed: bool,
}

/// The writes of one node transaction.
#[derive(Default)]
struct NodePack {
    items: Vec<PendingNode>,
    changes: Vec<crate::proto::objects::Change>,
    bytes: usize,
}

/// A node state change the dispatcher thread proposes, if its guard still holds when the
/// change is built.
#[derive(Clone)]
struct NodeWrite {
    node_id: String,
    state: NodeState,
    message: String,
    guard: Guard,
}

#[derive(Clone)]
enum Guard {
    /// The node has no session.
    NoSession,
    /// The node's session is this one, lingering after its agent closed the stream.
    Lingering(String),
}

/// The dispatcher of one manager (it serves only while this manager leads).
pub struct Dispatcher {
    node: NodeHandle,
    store: Arc<Store>,
    table: Mutex<SessionTable<ServerStream<pb::SessionMessage>>>,
    /// The monotonic origin of the table's `now_ms`.
    origin: Instant,
    events: Sender<Event>,
    events_rx: Receiver<Event>,
    timers: Mutex<Option<Timers>>,
    /// Status reports waiting for their batch.
    statuses: Mutex<StatusBatch>,
    /// Node writes waiting for their batch.
    nodes: Mutex<NodeBatch>,
    /// Timed events the timer could not take, posted at the next tick.
    deferred: Mutex<Vec<Event>>,
    /// When the dispatcher thread last looked for tasks to orphan, and whether its
    /// transaction is in flight (one at a time).
    orphans: Mutex<OrphanCheck>,
    /// The managers agents are told about (lock order: `table` before `managers`).
    managers: Mutex<ManagerList>,
    /// The Lamport times of the network keys last handed to the sessions (`None`: not
    /// looked yet).
    keys_sent: Mutex<Option<Vec<u64>>>,
    /// The open log subscriptions ([`logs`]).
    logs: logs::LogBroker,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl Dispatcher {
    /// The dispatcher over `node` and its applied `store`.
    pub fn new(node: NodeHandle, store: Arc<Store>) -> Arc<Dispatcher> {
        let (events, events_rx) = crossbeam_channel::unbounded();
        let mut table = SessionTable::new();
        let values_store = Arc::clone(&store);
        table.set_attach_values(Arc::new(move |part: &mut pb::Assignments| {
            attach_values(&values_store, part);
        }));
        Arc::new(Dispatcher {
            node,
            store,
            table: Mutex::new(table),
            origin: Instant::now(),
            events,
            events_rx,
            timers: Mutex::new(None),
            deferred: Mutex::new(Vec::new()),
            orphans: Mutex::new(OrphanCheck::default()),
            managers: Mutex::new(ManagerList::default()),
            keys_sent: Mutex::new(None),
            logs: logs::LogBroker::default(),
            statuses: Mutex::new(StatusBatch::default()),
            nodes: Mutex::new(NodeBatch::default()),
            thread: Mutex::new(None),
            stopping: AtomicBool::new(false),
        })
    }

    /// Starts the dispatcher's two threads: `flotilla-dispatch-timers` (heartbeat
    /// deadlines, the grace after a leader change) and `flotilla-dispatcher` (the store
    /// watch, fan-out to sessions, node state writes). They serve only while this manager
    /// leads; the count does not grow with agents.
    ///
    /// # Errors
    /// The OS error if a thread cannot start.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        *self.timers.lock() = Some(Timers::start("dispatch-timers")?);
        let dispatcher = self.clone();
        let thread = std::thread::Builder::new()
            .name("flotilla-dispatcher".into())
            .spawn(move || dispatcher.run())?;
        *self.thread.lock() = Some(thread);
        Ok(())
    }

    /// Serves the dispatcher's methods on `router` (managers and workers may call, as their
    /// declared policies say).
    pub fn register(self: &Arc<Self>, router: &mut Router, pool: &ServicePool) {
        let d = self.clone();
        router.serve_server_stream(rpc::SESSION, pool, move |ctx, request, stream| {
            d.open_session(ctx, request, stream)
        });
        let d = self.clone();
        router.serve_unary(rpc::HEARTBEAT, pool, move |ctx, request| {
            d.heartbeat(ctx, &request)
        });
        let d = self.clone();
        router.serve_unary_deferred(
            rpc::UPDATE_TASK_STATUS,
            pool,
            move |ctx, request, responder| d.update_task_status(ctx, request, responder),
        );
        let d = self.clone();
        router.serve_unary(rpc::PUBLISH_LOGS, pool, move |ctx, request| {
            d.require_leader()?;
            d.logs.publish(&caller(ctx)?.node_id, request)?;
            Ok(pb::PublishLogsResponse {})
        });
    }

    /// Ends every session stream and joins the dispatcher and timer threads.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.lock().take()
            && thread.join().is_err()
        {
            log::error!("the dispatcher thread panicked");
        }
        if let Some(timers) = self.timers.lock().take() {
            timers.stop();
        }
        let status = Status::unavailable("the manager is shutting down");
        // Sessions whose READY was still waiting for its batch.
        for item in std::mem::take(&mut self.nodes.lock().items) {
            if let PendingKind::Ready(open) = item.kind {
                open.stream.fail(status.clone());
            }
        }
        self.end_all(&status);
    }

    /// Sessions in the table (opening, streaming or lingering).
    pub fn session_count(&self) -> usize {
        self.table.lock().len()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    // ---- the dispatcher thread ----

    fn run(self: &Arc<Self>) {
        let mut watch: Option<Watcher> = None;
        let mut generation = 0u64;
        let mut last_tick = Instant::now();
        let never = crossbeam_channel::never();
        while !self.stopping.load(Ordering::SeqCst) {
            let watch_rx = watch.as_ref().map_or(&never, Watcher::receiver);
            let wait = self.until_next_batch().min(TICK);
            crossbeam_channel::select! {
                recv(self.events_rx) -> event => {
                    if let Ok(event) = event {
                        self.handle(event, generation);
                    }
                }
                recv(watch_rx) -> event => {
                    if !self.deliver(event.ok(), watch.as_ref()) {
                        watch = Some(self.resubscribe());
                    }
                }
                default(wait) => {}
            }
            self.flush_due_batches();
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(&mut watch, &mut generation);
            }
        }
        drop(watch);
        self.table.lock().set_watching(false);
    }

    /// How long until the next session's assignment batch may be due (zero: now).
    fn until_next_batch(&self) -> Duration {
        let Some(due_ms) = self.table.lock().next_batch_due_ms() else {
            return TICK;
        };
        // At least 1 ms: a lower bound at the wheel's time must not spin the thread.
        Duration::from_millis(due_ms.saturating_sub(self.now_ms()).max(1))
    }

    /// Sends the assignment batches whose time came (on the dispatcher thread).
    fn flush_due_batches(&self) {
        let now = self.now_ms();
        let ended = self.table.lock().flush_due(now);
        if !ended.is_empty() {
            self.fail_ended(ended);
        }
    }

    /// Leadership changes, streams the agents closed, assignments held back for credit.
    fn tick(self: &Arc<Self>, watch: &mut Option<Watcher>, generation: &mut u64) {
        for event in std::mem::take(&mut *self.deferred.lock()) {
            let _ = self.events.send(event);
        }
        let leading = self.require_leader().is_ok();
        if leading && watch.is_none() {
            *generation += 1;
            *watch = Some(self.take_lead(*generation));
        } else if !leading && watch.is_some() {
            *watch = None;
            self.table.lock().set_watching(false);
            let mut status = self.require_leader().err().unwrap_or_else(|| {
                Status::unavailable("this manager no longer leads; open a session with the leader")
            });
            status.code = Code::Unavailable;
            self.end_all(&status);
            *self.managers.lock() = ManagerList::default();
        }
        if watch.is_none() {
            self.orphans.lock().last = None;
            return;
        }
        self.orphan_tasks_when_due();
        self.refresh_managers();
        self.push_rotated_keys();
        let now = self.now_ms();
        let (ended, closed) = {
            let mut table = self.table.lock();
            table.prune_attempts(now);
            (table.flush_pending(now), table.take_closed())
        };
        let mut writes = Vec::new();
        for (node_id, session_id, stream, status) in ended {
            log::info!("dispatcher: session {session_id} of {node_id} ends: {status}");
            if let Some(stream) = stream {
                stream.fail(status);
            }
            writes.push(disconnected(node_id, session_id));
        }
        for (node_id, session_id, stream) in closed {
            log::debug!("dispatcher: the agent of {node_id} closed session {session_id}");
            drop(stream);
            writes.push(disconnected(node_id, session_id));
        }
        self.write_node_states(writes, 1);
    }

    /// Subscribes to every task change and marks the nodes without a session UNKNOWN,
    /// giving them twice the usual grace before they are DOWN.
    fn take_lead(self: &Arc<Self>, generation: u64) -> Watcher {
        let watcher = self.subscribe();
        self.table.lock().set_watching(true);
        let grace = self.grace() * LEADER_CHANGE_GRACE_FACTOR;
        log::info!(
            "dispatcher: this manager leads; nodes without a session have {} ms to open one",
            grace.as_millis()
        );
        let writes = self
            .nodes_without_session(&[NodeState::Ready, NodeState::Disconnected])
            .into_iter()
            .map(|node_id| NodeWrite {
                node_id,
                state: NodeState::Unknown,
                message: "the leader changed; waiting for the node's agent".into(),
                guard: Guard::NoSession,
            })
            .collect();
        self.write_node_states(writes, 1);
        let until = Instant::now() + grace;
        self.post_after(grace, Event::LeaderGrace { generation, until });
        watcher
    }

    fn subscribe(&self) -> Watcher {
        self.store.watch(WatchOptions {
            include_commits: true,
            queue_events_max: Some(WATCH_QUEUE_EVENTS_MAX),
            ..WatchOptions::filtered(vec![WatchFilter::kind(Kind::Task)])
        })
    }

    /// After the watch fell behind: a new one, and every streaming session gets a complete
    /// set from the same view.
    fn resubscribe(&self) -> Watcher {
        log::warn!("dispatcher: the store watch fell behind; sending every agent a complete set");
        let now = self.now_ms();
        let mut table = self.table.lock();
        let (resync, watcher) = self.store.view_and_watch(
            WatchOptions {
                include_commits: true,
                queue_events_max: Some(WATCH_QUEUE_EVENTS_MAX),
                ..WatchOptions::filtered(vec![WatchFilter::kind(Kind::Task)])
            },
            |view| {
                let version = view.version();
                table.resync_all(version, now, |node_id| {
                    view.tasks_by_node(node_id)
                        .map(|t| t.as_ref().clone())
                        .collect()
                })
            },
        );
        drop(table);
        for (node_id, session_id, stream, status) in resync {
            log::info!("dispatcher: session {session_id} of {node_id} ends: {status}");
            if let Some(stream) = stream {
                stream.fail(status);
            }
        }
        watcher
    }

    /// Hands one watch event (and those queued behind it) to the table; false when the
    /// watch ended.
    fn deliver(&self, first: Option<WatchEvent>, watch: Option<&Watcher>) -> bool {
        let mut ended = Vec::new();
        let mut next = first;
        let mut handled = 0;
        let now = self.now_ms();
        let mut table = self.table.lock();
        loop {
            match next {
                Some(WatchEvent::Change(event)) => {
                    if let Object::Task(task) = &event.object {
                        if event.action == Action::Delete {
                            table.stage_delete(&task.node_id, &task.id);
                        } else {
                            table.stage_upsert(task.clone());
                        }
                    }
                }
                Some(WatchEvent::Commit { version }) => ended.extend(table.commit(version, now)),
                Some(WatchEvent::Dropped(_)) | None => {
                    drop(table);
                    self.fail_ended(ended);
                    return false;
                }
            }
            handled += 1;
            if handled >= WATCH_EVENTS_PER_TURN_MAX {
                break;
            }
            match watch.map(|w| w.receiver().try_recv()) {
                Some(Ok(event)) => next = Some(event),
                _ => break,
            }
        }
        drop(table);
        self.fail_ended(ended);
        true
    }

    fn fail_ended(
        &self,
        ended: Vec<(
            String,
            String,
            Option<ServerStream<pb::SessionMessage>>,
            Status,
        )>,
    ) {
        let mut writes = Vec::new();
        for (node_id, session_id, stream, status) in ended {
            log::info!("dispatcher: session {session_id} of {node_id} ends: {status}");
            if let Some(stream) = stream {
                stream.fail(status);
            }
            writes.push(disconnected(node_id, session_id));
        }
        self.write_node_states(writes, 1);
    }

    fn handle(self: &Arc<Self>, event: Event, generation: u64) {
        match event {
            Event::Deadline {
                node_id,
                session_id,
            } => self.deadline(node_id, session_id),
            Event::LeaderGrace {
                generation: of,
                until,
            } => {
                if of != generation || self.require_leader().is_err() {
                    return;
                }
                let now = Instant::now();
                if now < until {
                    self.post_after(until - now, Event::LeaderGrace { generation, until });
                } else {
                    self.leader_grace_over();
                }
            }
            Event::FlushNodes => self.flush_node_writes(),
            Event::NodesWritten { items, outcome } => self.node_writes_done(items, outcome),

            Event::FlushStatuses => self.flush_statuses(),
            Event::Statuses(requests) => self.propose_statuses(requests),
            Event::Orphaned { more } => {
                self.orphans.lock().in_flight = false;
                if more {
                    self.orphan_tasks();
                }
            }
            Event::Group(status) => self.managers_seen(&status),
        }
    }

    // ---- the agents' manager list ----

    /// Asks the Raft node for its view of the group when [`MANAGERS_REFRESH`] passed (the
    /// answer comes back as [`Event::Group`]), and offers the latest list again to the
    /// sessions that had no room for it.
    fn refresh_managers(&self) {
        let due = self
            .managers
            .lock()
            .asked_at
            .is_none_or(|at| at.elapsed() >= MANAGERS_REFRESH);
        if due {
            self.managers.lock().asked_at = Some(Instant::now());
            let events = self.events.clone();
            let asked = self.node.status_with(Box::new(move |status| {
                let _ = events.send(Event::Group(status));
            }));
            if let Err(error) = asked {
                log::debug!("dispatcher: cannot ask for the group's view: {error}");
            }
        }
        let table = self.table.lock();
        let mut managers = self.managers.lock();
        if managers.owed.is_empty() {
            return;
        }
        let message = managers_changed(&managers.peers);
        managers
            .owed
            .retain(|(node_id, session_id)| !table.offer(node_id, session_id, &message));
    }

    /// The group as the Raft node sees it: if the reachable managers changed, every session
    /// is sent the new list.
    fn managers_seen(&self, status: &GroupStatus) {
        if !status.is_leader {
            return;
        }
        let peers = self.reachable_managers(status);
        let table = self.table.lock();
        let mut managers = self.managers.lock();
        if managers.peers == peers {
            return;
        }
        let addrs: Vec<&str> = peers.iter().map(|p| p.addr.as_str()).collect();
        log::info!(
            "dispatcher: the managers agents may call: {}",
            addrs.join(", ")
        );
        managers.version += 1;
        managers.peers = peers;
        let message = managers_changed(&managers.peers);
        managers.owed = table.offer_all(&message).into_iter().collect();
    }

    /// The managers the leader heard from within [`MANAGER_SILENCE_MAX_MS`] (itself
    /// included), by address, each with the default weight and its node id (empty until its
    /// Node object records its Raft id).
    fn reachable_managers(&self, status: &GroupStatus) -> Vec<pb::WeightedPeer> {
        let node_ids: HashMap<u64, String> = self.store.view(|view| {
            view.list::<Node>()
                .filter_map(|node| Some((node.manager_status.as_ref()?.raft_id, node.id.clone())))
                .collect()
        });
        let mut peers: Vec<pb::WeightedPeer> = status
            .members
            .iter()
            .filter(|member| {
                member.id == status.id || member.last_contact_ms <= MANAGER_SILENCE_MAX_MS
            })
            .filter_map(|member| {
                Some(pb::WeightedPeer {
                    node_id: node_ids.get(&member.id).cloned().unwrap_or_default(),
                    addr: member.addr.clone().filter(|addr| !addr.is_empty())?,
                    weight: pb::MANAGER_WEIGHT_DEFAULT,
                })
            })
            .collect();
        peers.sort_by(|a, b| a.addr.cmp(&b.addr));
        peers.truncate(pb::MANAGERS_MAX);
        peers
    }

    fn deadline(self: &Arc<Self>, node_id: String, session_id: String) {
        let now = self.now_ms();
        let (deadline, stream) = self.table.lock().check_deadline(&node_id, &session_id, now);
        match deadline {
            Deadline::Gone => {}
            Deadline::Wait(wait_ms) => {
                self.arm_deadline(node_id, session_id, Duration::from_millis(wait_ms));
            }
            Deadline::Expired(silent_ms) => {
                let message = format!("no heartbeat for {silent_ms} ms");
                log::warn!("dispatcher: node {node_id} is down: {message}");
                if let Some(stream) = stream {
                    stream.fail(Status::new(
                        Code::NotFound,
                        format!("session {session_id} expired ({message}); open a new one"),
                    ));
                }
                self.write_node_states(
                    vec![NodeWrite {
                        node_id,
                        state: NodeState::Down,
                        message,
                        guard: Guard::NoSession,
                    }],
                    1,
                );
            }
        }
    }

    /// Looks for tasks to orphan if the interval since the last look passed (a tenth of
    /// `orphan_after`, within [1 s, 60 s]).
    fn orphan_tasks_when_due(&self) {
        let after = self.settings().unwrap_or_default().orphan_after;
        let period = (after / 10).clamp(ORPHAN_CHECK_PERIOD_MIN, ORPHAN_CHECK_PERIOD_MAX);
        let due = self
            .orphans
            .lock()
            .last
            .is_none_or(|last| last.elapsed() >= period);
        if due {
            self.orphan_tasks();
        }
    }

    /// Marks ORPHANED the tasks that may have been running (ASSIGNED to RUNNING) on nodes
    /// DOWN for `orphan_after` (swarmkit's `moveTasksToOrphaned`: nobody knows whether
    /// they still run; the orchestrator counts them ended). One transaction in flight at a
    /// time, proposed without waiting; a full one is followed by another at once.
    fn orphan_tasks(&self) {
        {
            let mut check = self.orphans.lock();
            if check.in_flight {
                return;
            }
            check.last = Some(Instant::now());
        }
        let after = self.settings().unwrap_or_default().orphan_after;
        let now = now_ms();
        let changes = {
            let table = self.table.lock();
            self.store.view(|view| {
                orphan_changes(
                    view,
                    now,
                    after,
                    |node_id| table.has(node_id),
                    TXN_CHANGES_MAX,
                )
            })
        };
        if changes.is_empty() {
            return;
        }
        let more = changes.len() >= TXN_CHANGES_MAX;
        log::warn!(
            "dispatcher: {} tasks on nodes down for {} s or more are now orphaned",
            changes.len(),
            after.as_secs()
        );
        self.orphans.lock().in_flight = true;
        let txn = Transaction {
            changes,
            timestamp_ms: now,
            request_id: None,
        };
        let events = self.events.clone();
        propose_transaction_with(
            &self.node,
            &txn,
            Box::new(move |outcome| {
                if let Err(status) = &outcome {
                    // Built again at the next look (a concurrent change, a lost lead).
                    log::debug!("dispatcher: orphaning tasks: {status}");
                }
                let _ = events.send(Event::Orphaned {
                    more: more && outcome.is_ok(),
                });
            }),
        );
    }

    fn leader_grace_over(&self) {
        let message = format!(
            "no session with the leader in the {} ms since it took the lead",
            (self.grace() * LEADER_CHANGE_GRACE_FACTOR).as_millis()
        );
        let writes: Vec<NodeWrite> = self
            .nodes_without_session(&[
                NodeState::Ready,
                NodeState::Unknown,
                NodeState::Disconnected,
            ])
            .into_iter()
            .map(|node_id| {
                log::warn!("dispatcher: node {node_id} is down: {message}");
                NodeWrite {
                    node_id,
                    state: NodeState::Down,
                    message: message.clone(),
                    guard: Guard::NoSession,
                }
            })
            .collect();
        self.write_node_states(writes, 1);
    }

    /// Nodes in one of `states` that have no session here.
    fn nodes_without_session(&self, states: &[NodeState]) -> Vec<String> {
        let nodes: Vec<String> = self.store.view(|view| {
            view.list::<Node>()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .is_some_and(|s| states.iter().any(|&state| s.state == state as i32))
                })
                .map(|n| n.id.clone())
                .collect()
        });
        let table = self.table.lock();
        nodes.into_iter().filter(|id| !table.has(id)).collect()
    }

    /// Queues node state `writes` for the next node batch (built when it is flushed, if
    /// their guards still hold then).
    fn write_node_states(&self, writes: Vec<NodeWrite>, attempt: u32) {
        self.queue_node_writes(
            writes
                .into_iter()
                .map(|write| PendingNode {
                    kind: PendingKind::State(write),
                    attempt,
                })
                .collect(),
        );
    }

    /// Queues node writes (state changes, session openings) for the next node batch: the
    /// first arms a [`NODE_BATCH_DELAY`] timer, [`NODE_BATCH_ITEMS_MAX`] make it due at
    /// once. Never waits (any thread).
    fn queue_node_writes(&self, items: Vec<PendingNode>) {
        if items.is_empty() {
            return;
        }
        let mut batch = self.nodes.lock();
        batch.items.extend(items);
        if batch.items.len() >= NODE_BATCH_ITEMS_MAX {
            batch.armed = true;
            drop(batch);
            let _ = self.events.send(Event::FlushNodes);
        } else if !batch.armed {
            batch.armed = true;
            drop(batch);
            self.post_after(NODE_BATCH_DELAY, Event::FlushNodes);
        }
    }

    /// Builds the waiting node writes from the current store and proposes them in as few
    /// transactions as the store's limits allow (on the dispatcher thread), without
    /// waiting: the sessions opened are started from the proposal's callback once their
    /// READY committed. A node named twice waits for the next batch (built after the first
    /// write, in order).
    fn flush_node_writes(&self) {
        let items = {
            let mut batch = self.nodes.lock();
            batch.armed = false;
            std::mem::take(&mut batch.items)
        };
        let mut pack = NodePack::default();
        let mut later = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for item in items {
            if !seen.insert(item.node_id().to_string()) {
                later.push(item);
                continue;
            }
            let change = match self.node_write_change(&item) {
                Ok(Some(change)) => change,
                Ok(None) => continue,
                Err(status) => {
                    if let PendingKind::Ready(open) = item.kind {
                        self.end_opening(
                            &open.caller.node_id,
                            &open.session_id,
                            Some(open.stream),
                            status,
                        );
                    }
                    continue;
                }
            };
            let bytes = prost::Message::encoded_len(&change);
            if !pack.items.is_empty()
                && (pack.changes.len() >= TXN_CHANGES_MAX
                    || pack.bytes + bytes > STATUS_TXN_BYTES_MAX)
            {
                self.propose_node_pack(std::mem::take(&mut pack));
            }
            pack.changes.push(change);
            pack.bytes += bytes;
            pack.items.push(item);
        }
        if !pack.items.is_empty() {
            self.propose_node_pack(pack);
        }
        self.queue_node_writes(later);
    }

    /// The change `item` makes now, if any: a state write whose guard holds and that
    /// changes the node; a session's READY while it is still the node's session.
    ///
    /// # Errors
    /// The READY of an opening session is refused (a manager's Node not recorded yet).
    fn node_write_change(
        &self,
        item: &PendingNode,
    ) -> Result<Option<crate::proto::objects::Change>, Status> {
        match &item.kind {
            PendingKind::State(write) => {
                let table = self.table.lock();
                let holds = match &write.guard {
                    Guard::NoSession => !table.has(&write.node_id),
                    Guard::Lingering(session_id) => table.is_lingering(&write.node_id, session_id),
                };
                drop(table);
                Ok(holds
                    .then(|| node_state_change(&self.store, write))
                    .flatten())
            }
            PendingKind::Ready(open) => {
                if !self
                    .table
                    .lock()
                    .is_current(&open.caller.node_id, &open.session_id)
                {
                    // Replaced meanwhile (the replacement ended nothing: this stream was not
                    // in the table yet): end it here.
                    return Err(Status::cancelled(
                        "a newer session of this node replaced this one",
                    ));
                }
                ready_change(&self.store, &open.caller, &open.request).map(Some)
            }
        }
    }

    fn propose_node_pack(&self, pack: NodePack) {
        let txn = Transaction {
            changes: pack.changes,
            timestamp_ms: now_ms(),
            request_id: None,
        };
        let items = pack.items;
        let events = self.events.clone();
        propose_transaction_with(
            &self.node,
            &txn,
            Box::new(move |outcome| {
                let _ = events.send(Event::NodesWritten {
                    items,
                    outcome: outcome.map(|_| ()),
                });
            }),
        );
    }

    /// A node batch's transaction ended (on the dispatcher thread): committed, the sessions
    /// it opened get their `SessionStarted` and complete set; aborted by a concurrent
    /// change, its writes are built again (at most [`WRITE_ATTEMPTS_MAX`] times); refused,
    /// the sessions end with the reason.
    fn node_writes_done(&self, items: Vec<PendingNode>, outcome: Result<(), Status>) {
        let mut again = Vec::new();
        for item in items {
            match (&outcome, item.kind) {
                (Ok(()), PendingKind::State(_)) => {}
                (Ok(()), PendingKind::Ready(open)) => self.start_stream(*open),
                (Err(status), kind)
                    if status.code == Code::Aborted && item.attempt < WRITE_ATTEMPTS_MAX =>
                {
                    again.push(PendingNode {
                        kind,
                        attempt: item.attempt + 1,
                    });
                }
                (Err(status), PendingKind::State(write)) => log::warn!(
                    "dispatcher: cannot record node {} {:?}: {status}",
                    write.node_id,
                    write.state
                ),
                (Err(status), PendingKind::Ready(open)) => {
                    self.end_opening(
                        &open.caller.node_id,
                        &open.session_id,
                        Some(open.stream),
                        status.clone(),
                    );
                }
            }
        }
        self.queue_node_writes(again);
    }

    /// Ends an opening session whose READY could not be recorded.
    fn end_opening(
        &self,
        node_id: &str,
        session_id: &str,
        stream: Option<ServerStream<pb::SessionMessage>>,
        status: Status,
    ) {
        log::debug!("dispatcher: session {session_id} of {node_id} not opened: {status}");
        drop(self.table.lock().remove(node_id, session_id));
        if let Some(stream) = stream {
            stream.fail(status);
        }
    }

    /// The node of an opening session is recorded READY: sends `SessionStarted`, then hands
    /// the session its stream with the node's complete set (on the dispatcher thread, never
    /// blocking: the first message goes on the stream's initial credit).
    fn start_stream(&self, open: ReadyOpen) {
        let ReadyOpen {
            caller,
            session_id,
            period_ms,
            stream,
            ..
        } = open;
        let node_id = caller.node_id;
        if !self.table.lock().is_current(&node_id, &session_id) {
            stream.fail(Status::cancelled(
                "a newer session of this node replaced this one",
            ));
            return;
        }
        let (managers_version, managers) = {
            let managers = self.managers.lock();
            (managers.version, managers.peers.clone())
        };
        let started = session_started(&session_id, period_ms, managers, self.network_keys());
        match stream.try_send(&started) {
            Ok(true) => {}
            Ok(false) => {
                let status = Status::unavailable(
                    "the session stream had no room for its first message; open a new session",
                );
                self.end_opening(&node_id, &session_id, Some(stream), status);
                return;
            }
            Err(status) => {
                self.end_opening(&node_id, &session_id, Some(stream), status);
                return;
            }
        }
        log::info!("dispatcher: session {session_id} for node {node_id}");
        // The complete set is read under the table's lock, so that this thread hands the
        // session exactly the changes after it.
        let mut table = self.table.lock();
        let (version, tasks) = self.store.view(|view| {
            let tasks: Vec<Task> = view
                .tasks_by_node(&node_id)
                .map(|t| t.as_ref().clone())
                .collect();
            (view.version(), tasks)
        });
        let attached = table.attach(&node_id, &session_id, stream, tasks, version);
        drop(table);
        // The list changed after this session was given it: it is owed the new one.
        let mut managers = self.managers.lock();
        if managers.version != managers_version {
            managers.owed.insert((node_id.clone(), session_id.clone()));
        }
        drop(managers);
        if let Err((stream, status)) = attached {
            log::debug!("dispatcher: session {session_id} of {node_id} ends: {status}");
            stream.fail(status);
        }
    }

    /// Posts `event` to the dispatcher thread after `delay`, from the timer thread. If the
    /// timer cannot take it (its queue is full) the event is posted at the next tick: every
    /// timed event checks on arrival whether its time has come, and waits again if not.
    fn post_after(&self, delay: Duration, event: Event) {
        let timers = self.timers.lock();
        let Some(timers) = timers.as_ref() else {
            return; // stopping
        };
        let slot = Arc::new(Mutex::new(Some(event)));
        let fired = slot.clone();
        let events = self.events.clone();
        let callback = Box::new(move || {
            if let Some(event) = fired.lock().take() {
                let _ = events.send(event);
            }
        });
        if let Err(error) = timers.after(delay, callback) {
            log::debug!("dispatcher: {error}; the event waits for the next tick");
            if let Some(event) = slot.lock().take() {
                self.deferred.lock().push(event);
            }
        }
    }

    fn arm_deadline(&self, node_id: String, session_id: String, delay: Duration) {
        self.post_after(
            delay,
            Event::Deadline {
                node_id,
                session_id,
            },
        );
    }

    fn end_all(&self, status: &Status) {
        self.logs.clear();
        let streams = self.table.lock().clear();
        for stream in streams {
            stream.fail(status.clone());
        }
    }

    // ---- the RPC handlers (the `dispatcher` pool) ----

    fn require_leader(&self) -> Result<(), Status> {
        if self.node.leader() == Some(self.node.id()) {
            return Ok(());
        }
        let leader_id = self.node.leader();
        let leader_addr = leader_id.and_then(|id| self.node.directory().addr(id));
        let leader = leader_addr
            .as_deref()
            .map_or_else(|| "not known yet".to_string(), |addr| format!("at {addr}"));
        Err(Status::not_leader(
            Code::FailedPrecondition,
            format!("this manager does not lead; the leader is {leader}"),
            leader_id,
            leader_addr,
        ))
    }

    fn settings(&self) -> Option<ClusterSettings> {
        self.store
            .view(|view| view.list::<Cluster>().next().cloned())
            .and_then(|c| c.spec.clone())
            .map(|spec| ClusterSettings::from_spec(&spec))
    }

    fn heartbeat_period(&self) -> Result<Duration, Status> {
        self.settings().map(|s| s.heartbeat_period).ok_or_else(|| {
            Status::unavailable(
                "the cluster object does not exist yet (the leader creates it on election); \
                 retry in a moment",
            )
        })
    }

    /// The silence after which a node is down ([`HEARTBEAT_MISSES_MAX`] periods, the
    /// jittered period at its longest).
    fn grace(&self) -> Duration {
        let period = self.settings().unwrap_or_default().heartbeat_period;
        period * HEARTBEAT_MISSES_MAX * (100 + u32::try_from(HEARTBEAT_JITTER_PERCENT).unwrap_or(0))
            / 100
    }

    fn open_session(
        self: &Arc<Self>,
        ctx: &CallContext,
        request: pb::SessionRequest,
        stream: ServerStream<pb::SessionMessage>,
    ) -> Result<(), Status> {
        self.require_leader()?;
        let caller = caller(ctx)?;
        let node_id = caller.node_id.clone();
        self.table
            .lock()
            .admit(&node_id, self.now_ms())
            .map_err(|wait| {
                Status::new(
                    Code::ResourceExhausted,
                    format!(
                        "node {node_id} opened {} sessions within {} s; wait {} ms before the \
                         next",
                        sessions::REGISTRATION_ATTEMPTS_MAX,
                        sessions::REGISTRATION_WINDOW.as_secs(),
                        wait.as_millis()
                    ),
                )
                .with_retry_after(wait)
            })?;
        let period = jittered(self.heartbeat_period()?);
        let grace = self.grace();
        // The session exists before the node is recorded ready, so that a DOWN or UNKNOWN
        // write built meanwhile sees it and is not proposed.
        let session_id = crate::util::id::random_id();
        let replaced = self.table.lock().open(
            &node_id,
            &session_id,
            millis(period),
            millis(grace),
            self.now_ms(),
        )?;
        if let Some(old) = replaced {
            old.fail(Status::cancelled(
                "a newer session of this node replaced this one",
            ));
        }
        self.arm_deadline(node_id, session_id.clone(), grace);
        // Recorded READY in the next node batch, without holding this thread; the stream
        // starts from the batch's callback once that committed.
        self.queue_node_writes(vec![PendingNode {
            kind: PendingKind::Ready(Box::new(ReadyOpen {
                caller,
                request,
                session_id,
                period_ms: millis(period),
                stream,
            })),
            attempt: 1,
        }]);
        Ok(())
    }

    /// The leader rotated the network keys: every streaming session gets them at once
    /// (a session with no room gets them with its next session: the previous keys stay
    /// valid for two rotations).
    fn push_rotated_keys(&self) {
        let keys = self.network_keys();
        let stamp: Vec<u64> = keys.iter().map(|k| k.lamport_time).collect();
        let mut sent = self.keys_sent.lock();
        if sent.as_ref() == Some(&stamp) {
            return;
        }
        // The first look: sessions got these keys in their SessionStarted.
        let first = sent.is_none();
        *sent = Some(stamp);
        drop(sent);
        if first {
            return;
        }
        let message = pb::SessionMessage {
            message: Some(pb::session_message::Message::NetworkKeys(pb::NetworkKeys {
                keys,
            })),
        };
        let missed = self.table.lock().send_to_streaming(&message);
        log::info!("dispatcher: network keys rotated; sent to the sessions ({missed} had no room)");
    }

    /// The cluster's network bootstrap keys (gossip encryption), oldest first.
    fn network_keys(&self) -> Vec<crate::proto::objects::EncryptionKey> {
        let mut keys = self
            .store
            .list::<crate::proto::objects::Cluster>()
            .first()
            .map(|c| c.network_bootstrap_keys.clone())
            .unwrap_or_default();
        keys.sort_by_key(|k| k.lamport_time);
        keys
    }

    fn heartbeat(
        &self,
        ctx: &CallContext,
        request: &pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        self.require_leader()?;
        let caller = caller(ctx)?;
        let period_ms =
            self.table
                .lock()
                .touch(&caller.node_id, &request.session_id, self.now_ms())?;
        let certificate_role = self
            .store
            .get::<Node>(&caller.node_id)
            .and_then(|node| crate::control::roles::certificate_role(&node).ok())
            .map(|role| crate::control::role_to_proto(role) as i32);
        // The session's own grace is 3 periods of the cluster's at its opening, at least
        // 3 of the jittered period it was given: the smaller bound is the safe one to tell.
        let grace_ms =
            millis(self.grace()).min(period_ms.saturating_mul(u64::from(HEARTBEAT_MISSES_MAX)));
        let reassigned_after_ms =
            grace_ms.saturating_add(u64::try_from(NODE_DOWN_GRACE_MS).unwrap_or(0));
        Ok(pb::HeartbeatResponse {
            heartbeat_period_ms: i64::try_from(period_ms).unwrap_or(i64::MAX),
            certificate_role,
            tasks_reassigned_after_ms: i64::try_from(reassigned_after_ms).unwrap_or(i64::MAX),
        })
    }

    /// Takes a status report into the next batch; answered once the batch's transaction
    /// committed (never before), from the proposal's callback.
    fn update_task_status(
        &self,
        ctx: &CallContext,
        request: pb::UpdateTaskStatusRequest,
        responder: Responder<pb::UpdateTaskStatusResponse>,
    ) {
        match self.admit_status(ctx, &request) {
            Ok(node_id) => self.queue_statuses(StatusRequest {
                node_id,
                updates: request.updates,
                responder,
                attempt: 1,
            }),
            Err(status) => responder.respond(Err(status)),
        }
    }

    fn admit_status(
        &self,
        ctx: &CallContext,
        request: &pb::UpdateTaskStatusRequest,
    ) -> Result<String, Status> {
        self.require_leader()?;
        let caller = caller(ctx)?;
        if request.updates.len() > STATUS_UPDATES_MAX {
            return Err(Status::invalid_argument(format!(
                "{} status updates in one call; send at most {STATUS_UPDATES_MAX}",
                request.updates.len()
            )));
        }
        let mut table = self.table.lock();
        table.touch(&caller.node_id, &request.session_id, self.now_ms())?;
        // The agent knows what it reports: the store's echo of it is not sent back.
        for update in &request.updates {
            if let Some(status) = &update.status {
                table.note_reported(
                    &caller.node_id,
                    &request.session_id,
                    &update.task_id,
                    status.state,
                );
            }
        }
        drop(table);
        Ok(caller.node_id)
    }

    fn queue_statuses(&self, request: StatusRequest) {
        let mut batch = self.statuses.lock();
        if batch.updates >= STATUS_QUEUED_UPDATES_MAX {
            drop(batch);
            request.responder.respond(Err(Status::retry_soon(
                Code::ResourceExhausted,
                "the leader has too many status updates waiting to be written; retry in a moment",
            )
            .with_retry_after(STATUS_BATCH_DELAY)));
            return;
        }
        batch.updates += request.updates.len().max(1);
        batch.requests.push(request);
        if batch.updates >= STATUS_BATCH_UPDATES_MAX {
            batch.armed = true;
            drop(batch);
            let _ = self.events.send(Event::FlushStatuses);
        } else if !batch.armed {
            batch.armed = true;
            drop(batch);
            self.post_after(STATUS_BATCH_DELAY, Event::FlushStatuses);
        }
    }

    /// Writes the waiting status reports (on the dispatcher thread).
    fn flush_statuses(&self) {
        let requests = {
            let mut batch = self.statuses.lock();
            batch.armed = false;
            batch.updates = 0;
            std::mem::take(&mut batch.requests)
        };
        self.propose_statuses(requests);
    }

    /// Packs the reports into as few transactions as the store's limits allow (one report
    /// never split: each call is all or nothing, as before) and proposes them without
    /// waiting; each report is answered when its transaction commits, or built again after
    /// a concurrent change (`Aborted`).
    fn propose_statuses(&self, requests: Vec<StatusRequest>) {
        let mut pack = StatusPack::default();
        for request in requests {
            let changes = match status_changes(&self.store, &request.node_id, &request.updates) {
                Ok(changes) => changes,
                Err(status) => {
                    request.responder.respond(Err(status));
                    continue;
                }
            };
            if changes.is_empty() {
                request
                    .responder
                    .respond(Ok(pb::UpdateTaskStatusResponse {}));
                continue;
            }
            let bytes: usize = changes.iter().map(prost::Message::encoded_len).sum();
            let overlaps = request
                .updates
                .iter()
                .any(|u| pack.task_ids.contains(&u.task_id));
            if !pack.requests.is_empty()
                && (overlaps
                    || pack.changes.len() + changes.len() > TXN_CHANGES_MAX
                    || pack.bytes + bytes > STATUS_TXN_BYTES_MAX)
            {
                self.propose_pack(std::mem::take(&mut pack));
            }
            pack.task_ids
                .extend(request.updates.iter().map(|u| u.task_id.clone()));
            pack.changes.extend(changes);
            pack.bytes += bytes;
            pack.requests.push(request);
        }
        if !pack.requests.is_empty() {
            self.propose_pack(pack);
        }
    }

    fn propose_pack(&self, pack: StatusPack) {
        let txn = Transaction {
            changes: pack.changes,
            timestamp_ms: now_ms(),
            request_id: None,
        };
        let requests = pack.requests;
        let events = self.events.clone();
        propose_transaction_with(
            &self.node,
            &txn,
            Box::new(move |outcome| match outcome {
                Ok(_) => {
                    for request in requests {
                        request
                            .responder
                            .respond(Ok(pb::UpdateTaskStatusResponse {}));
                    }
                }
                Err(status) if status.code == Code::Aborted => {
                    let (again, refused): (Vec<_>, Vec<_>) = requests
                        .into_iter()
                        .partition(|r| r.attempt < WRITE_ATTEMPTS_MAX);
                    for request in refused {
                        request.responder.respond(Err(status.clone()));
                    }
                    let again: Vec<StatusRequest> = again
                        .into_iter()
                        .map(|r| StatusRequest {
                            attempt: r.attempt + 1,
                            ..r
                        })
                        .collect();
                    if !again.is_empty() {
                        let _ = events.send(Event::Statuses(again));
                    }
                }
                Err(status) => {
                    for request in requests {
                        request.responder.respond(Err(status.clone()));
                    }
                }
            }),
        );
    }
}

/// The change recording the caller's node READY (creating a worker's Node object on its
/// first session). A manager's Node object is made by its own report
/// (`control.ReportManager`, with its Raft id): until then its agent is asked to retry, so
/// that no manager's Node ever lacks the Raft id that a demotion needs to remove it from the
/// group.
///
/// # Errors
/// `RETRY_SOON` for a manager whose Node object does not exist yet.
fn ready_change(
    store: &Store,
    caller: &PeerIdentity,
    request: &pb::SessionRequest,
) -> Result<crate::proto::objects::Change, Status> {
    Ok(match store.get::<Node>(&caller.node_id) {
        None if caller.role == crate::ca::Role::Manager => {
            return Err(Status::retry_soon(
                Code::Unavailable,
                format!(
                    "manager {} has not recorded itself as a node yet (it does within a second \
                     of joining); retry in a moment",
                    caller.node_id
                ),
            ));
        }
        None => crate::store::create(new_node(caller, request)),
        Some(node) => {
            let mut node = node.as_ref().clone();
            let version = node.meta.as_ref().map_or(0, |m| m.version);
            node.description = request.description.clone().or(node.description);
            let status = node.status.get_or_insert_with(NodeStatus::default);
            status.state = NodeState::Ready as i32;
            status.message.clear();
            crate::store::update_expecting(node, version)
        }
    })
}

/// The first message of a session: its id, its heartbeat period, the managers.
fn session_started(
    session_id: &str,
    period_ms: u64,
    managers: Vec<pb::WeightedPeer>,
    network_keys: Vec<crate::proto::objects::EncryptionKey>,
) -> pb::SessionMessage {
    pb::SessionMessage {
        message: Some(pb::session_message::Message::Started(pb::SessionStarted {
            session_id: session_id.to_string(),
            heartbeat_period_ms: i64::try_from(period_ms).unwrap_or(i64::MAX),
            managers,
            network_keys,
        })),
    }
}

/// The write marking `node_id` DISCONNECTED while `session_id` lingers.
fn disconnected(node_id: String, session_id: String) -> NodeWrite {
    NodeWrite {
        node_id,
        state: NodeState::Disconnected,
        message: "the agent's session stream closed; waiting for it to come back".into(),
        guard: Guard::Lingering(session_id),
    }
}

/// The change recording `write`, unless the node is gone or already in that state (a DOWN
/// node is not made DISCONNECTED or UNKNOWN either).
fn node_state_change(store: &Store, write: &NodeWrite) -> Option<crate::proto::objects::Change> {
    let node = store.get::<Node>(&write.node_id)?;
    let current = node.status.as_ref().map_or(0, |s| s.state);
    if current == write.state as i32
        || (current == NodeState::Down as i32 && write.state != NodeState::Down)
    {
        return None;
    }
    let mut node = node.as_ref().clone();
    let version = node.meta.as_ref().map_or(0, |m| m.version);
    let status = node.status.get_or_insert_with(NodeStatus::default);
    status.state = write.state as i32;
    status.message.clone_from(&write.message);
    Some(crate::store::update_expecting(node, version))
}

/// The changes marking ORPHANED, at most `changes_max`, the tasks in states ASSIGNED to
/// RUNNING of the nodes DOWN for `after` or more at `now_ms` (down since the node object's
/// last update, the DOWN write's time: a later change of the node, such as an operator's
/// update, only postpones this) and without a session (`has_session`).
fn orphan_changes(
    view: &crate::store::ReadView<'_>,
    now_ms: i64,
    after: Duration,
    has_session: impl Fn(&str) -> bool,
    changes_max: usize,
) -> Vec<crate::proto::objects::Change> {
    let after_ms = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
    let mut changes = Vec::new();
    let down_long = view.list::<Node>().filter(|node| {
        let down_since_ms = node.meta.as_ref().map_or(0, |m| m.updated_at_ms);
        node.status
            .as_ref()
            .is_some_and(|s| s.state == NodeState::Down as i32)
            && now_ms.saturating_sub(down_since_ms) >= after_ms
            && !has_session(&node.id)
    });
    for node in down_long {
        for task in view.tasks_by_node(&node.id) {
            let state = task.status.as_ref().map_or(0, |s| s.state);
            if !(TaskState::Assigned as i32..=TaskState::Running as i32).contains(&state) {
                continue;
            }
            if changes.len() >= changes_max {
                return changes;
            }
            let mut task = task.as_ref().clone();
            let version = task.meta.as_ref().map_or(0, |m| m.version);
            task.status = Some(TaskStatus {
                state: TaskState::Orphaned as i32,
                message: format!(
                    "node {} has been down for {} s or more: whether the task still runs is \
                     unknown",
                    node.id,
                    after.as_secs()
                ),
                timestamp_ms: now_ms,
                ..Default::default()
            });
            changes.push(crate::store::update_expecting(task, version));
        }
    }
    changes
}

/// The session message carrying the manager list `peers`.
fn managers_changed(peers: &[pb::WeightedPeer]) -> pb::SessionMessage {
    pb::SessionMessage {
        message: Some(pb::session_message::Message::ManagersChanged(
            pb::ManagersChanged {
                managers: peers.to_vec(),
            },
        )),
    }
}

/// `period` within ± [`HEARTBEAT_JITTER_PERCENT`].
fn jittered(period: Duration) -> Duration {
    let spread = HEARTBEAT_JITTER_PERCENT as f64 / 100.0;
    let factor: f64 = rand::random_range((1.0 - spread)..=(1.0 + spread));
    period.mul_f64(factor)
}

/// The leader's log subscriptions go out in the sessions this dispatcher holds.
impl crate::control::logs::LogSource for Dispatcher {
    fn open_logs(&self) -> crate::control::logs::LogFeed {
        self.logs.open()
    }

    fn send_log_subscription(&self, node_id: &str, subscription: &pb::LogSubscription) -> bool {
        // Noted first: the agent may answer before this returns.
        if !subscription.close && !self.logs.note_sent(&subscription.id, node_id) {
            return false;
        }
        let message = pb::SessionMessage {
            message: Some(pb::session_message::Message::LogSubscription(
                subscription.clone(),
            )),
        };
        self.table.lock().send_to_node(node_id, &message)
    }

    fn close_logs(&self, id: &str) {
        self.logs.close(id);
    }
}

fn caller(ctx: &CallContext) -> Result<PeerIdentity, Status> {
    ctx.peer().cloned().ok_or_else(|| {
        Status::new(
            Code::Unauthenticated,
            "the dispatcher needs a node certificate",
        )
    })
}

fn millis(period: Duration) -> u64 {
    u64::try_from(period.as_millis()).unwrap_or(u64::MAX)
}

/// A worker's Node object at its first session.
fn new_node(caller: &PeerIdentity, request: &pb::SessionRequest) -> Node {
    let role = crate::control::role_to_proto(caller.role);
    Node {
        id: caller.node_id.clone(),
        spec: Some(NodeSpec {
            hostname: request.hostname.clone(),
            availability: NodeAvailability::Active as i32,
            desired_role: role as i32,
            ..Default::default()
        }),
        status: Some(NodeStatus {
            state: NodeState::Ready as i32,
            ..Default::default()
        }),
        description: request.description.clone(),
        role: role as i32,
        ..Default::default()
    }
}

/// The changes recording `updates` from `node_id`: only its own tasks, and only a state at
/// or past the recorded one (a duplicate or late report changes nothing).
fn status_changes(
    store: &Store,
    node_id: &str,
    updates: &[pb::TaskStatusUpdate],
) -> Result<Vec<crate::proto::objects::Change>, Status> {
    let mut changes = Vec::new();
    for update in updates {
        let Some(task) = store.get::<Task>(&update.task_id) else {
            continue; // reaped meanwhile: nothing to record
        };
        if task.node_id != node_id {
            return Err(Status::permission_denied(format!(
                "task {} is not assigned to node {node_id}",
                update.task_id
            )));
        }
        let Some(mut status) = update.status.clone() else {
            return Err(Status::invalid_argument(format!(
                "the update of task {} has no status",
                update.task_id
            )));
        };
        let recorded = task.status.as_ref().map_or(0, |s| s.state);
        if status.state < recorded || task.status.as_ref() == Some(&status) {
            continue;
        }
        if status.timestamp_ms == 0 {
            status.timestamp_ms = now_ms();
        }
        let mut task = task.as_ref().clone();
        let version = task.meta.as_ref().map_or(0, |m| m.version);
        task.status = Some(status);
        changes.push(crate::store::update_expecting(task, version));
    }
    Ok(changes)
}

/// Secret and config values added to one assignments message at most (with the tasks'
/// [`ASSIGNMENTS_BYTES_MAX`], well under the 4 MiB frame bound). Values past it are not
/// sent: the agent refuses to start a task whose values it lacks (REJECTED, with the
/// reason), and the orchestrator's replacement is sent with fewer companions.
pub const ATTACHED_VALUES_BYTES_MAX: usize = 2 << 20;

/// Whether the agent may still start `task` (so it needs the values it reads): wanted
/// running, not started yet.
fn may_start(task: &Task) -> bool {
    task.desired_state <= TaskState::Running as i32
        && task.status.as_ref().map_or(0, |s| s.state) < TaskState::Starting as i32
}

/// Adds to `part` the values of the secrets and configs that its tasks the agent may still
/// start read: secrets opened with the cluster's secrets key. Only the node assigned such
/// a task ever gets a value, and only with that task. A value that cannot be found or
/// opened is left out (logged by id, never by value): the agent rejects the task with the
/// reason.
pub fn attach_values(store: &Store, part: &mut pb::Assignments) {
    use crate::proto::objects::{Config, Secret, SecretSpec};
    let mut secret_ids = std::collections::BTreeSet::new();
    let mut config_ids = std::collections::BTreeSet::new();
    for task in part.tasks.iter().filter(|t| may_start(t)) {
        if let Some(spec) = &task.spec {
            secret_ids.extend(spec.secrets.iter().map(|r| r.id.as_str()));
            config_ids.extend(spec.configs.iter().map(|r| r.id.as_str()));
        }
    }
    if secret_ids.is_empty() && config_ids.is_empty() {
        return;
    }
    let mut bytes = 0usize;
    let mut fits = |len: usize, kind: &str, id: &str| {
        bytes += len;
        let fit = bytes <= ATTACHED_VALUES_BYTES_MAX;
        if !fit {
            log::warn!(
                "dispatcher: {kind} {id} left out of an assignments message: its values pass \
                 {ATTACHED_VALUES_BYTES_MAX} bytes"
            );
        }
        fit
    };
    let (secrets, configs) = store.view(|view| {
        let key = view
            .list::<Cluster>()
            .next()
            .map(|c| c.secrets_key.clone())
            .unwrap_or_default();
        let mut secrets = Vec::new();
        for id in &secret_ids {
            let Some(secret) = view.get::<Secret>(id) else {
                log::warn!("dispatcher: secret {id} named by a task does not exist");
                continue;
            };
            let spec = secret.spec.clone().unwrap_or_default();
            match crate::secrets::open(&key, id, &spec.data) {
                Ok(plain) if fits(plain.len(), "secret", id) => secrets.push(Secret {
                    id: (*id).to_string(),
                    meta: None,
                    spec: Some(SecretSpec {
                        name: spec.name,
                        labels: Default::default(),
                        data: plain.into(),
                    }),
                }),
                Ok(_) => {}
                Err(error) => log::warn!("dispatcher: secret {id}: {error}"),
            }
        }
        let mut configs = Vec::new();
        for id in &config_ids {
            match view.get::<Config>(id) {
                Some(config) => {
                    let len = config.spec.as_ref().map_or(0, |s| s.data.len());
                    if fits(len, "config", id) {
                        let mut config = config.as_ref().clone();
                        config.meta = None;
                        configs.push(config);
                    }
                }
                None => log::warn!("dispatcher: config {id} named by a task does not exist"),
            }
        }
        (secrets, configs)
    });
    part.secrets = secrets;
    part.configs = configs;
}

/// One assignments message per [`ASSIGNMENTS_BYTES_MAX`] of tasks; only the first of a
/// complete set says `complete`, and every part but the last says `more` (the agent
/// removes what a complete set does not name only once its last part arrived). Changes
/// (`complete` false) go [`sessions::ASSIGNMENT_CHANGES_PER_MESSAGE_MAX`] changed or
/// removed tasks per message at most, each message standing alone (no `more`). The chain
/// fields are left empty: they are set as each message is sent.
fn assignment_parts(
    complete: bool,
    tasks: Vec<Task>,
    removed: Vec<String>,
    version: u64,
) -> Vec<pb::Assignments> {
    let count_max = if complete {
        usize::MAX
    } else {
        sessions::ASSIGNMENT_CHANGES_PER_MESSAGE_MAX
    };
    let mut chunks: Vec<(Vec<Task>, Vec<String>)> = vec![(Vec::new(), Vec::new())];
    let mut bytes = 0;
    for task in tasks {
        let len = prost::Message::encoded_len(&task);
        let last = &chunks.last().expect("one chunk at least").0;
        if !last.is_empty() && (bytes + len > ASSIGNMENTS_BYTES_MAX || last.len() >= count_max) {
            chunks.push((Vec::new(), Vec::new()));
            bytes = 0;
        }
        bytes += len;
        chunks.last_mut().expect("one chunk at least").0.push(task);
    }
    for task_id in removed {
        let last = chunks.last().expect("one chunk at least");
        if last.0.len() + last.1.len() >= count_max {
            chunks.push((Vec::new(), Vec::new()));
        }
        chunks
            .last_mut()
            .expect("one chunk at least")
            .1
            .push(task_id);
    }
    let parts = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, (tasks, removed))| pb::Assignments {
            complete: complete && i == 0,
            tasks,
            removed,
            version,
            more: complete && i + 1 < parts,
            applies_to: String::new(),
            results_in: String::new(),
            secrets: Vec::new(),
            configs: Vec::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{TaskState, TaskStatus};
    use crate::store::StoreConfig;

    fn task(id: &str, node_id: &str, state: TaskState) -> Task {
        Task {
            id: id.into(),
            service_id: "svc".into(),
            node_id: node_id.into(),
            slot: 1,
            desired_state: TaskState::Running as i32,
            status: Some(TaskStatus {
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn update(task_id: &str, state: TaskState) -> pb::TaskStatusUpdate {
        pb::TaskStatusUpdate {
            task_id: task_id.into(),
            status: Some(TaskStatus {
                state: state as i32,
                timestamp_ms: 5,
                ..Default::default()
            }),
        }
    }

    fn store_with(tasks: Vec<Task>) -> Store {
        let store = Store::new(StoreConfig::default());
        let txn = Transaction {
            changes: tasks.into_iter().map(crate::store::create).collect(),
            timestamp_ms: 1,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        store
    }

    fn states_after(store: &Store, changes: Vec<crate::proto::objects::Change>) -> Vec<i32> {
        store
            .apply(
                2,
                &Transaction {
                    changes,
                    timestamp_ms: 2,
                    request_id: None,
                },
            )
            .unwrap();
        let mut tasks = store.list::<Task>();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        tasks
            .iter()
            .map(|t| t.status.as_ref().map_or(0, |s| s.state))
            .collect()
    }

    #[test]
    fn values_go_opened_with_the_tasks_that_may_still_start_only() {
        use crate::proto::objects::{Secret, SecretReference, SecretSpec};
        let key = crate::secrets::new_key();
        let sealed = crate::secrets::seal(&key, "s1", b"hunter2").unwrap();
        let reads = |mut task: Task| {
            task.spec = Some(crate::proto::objects::TaskSpec {
                secrets: vec![SecretReference {
                    id: "s1".into(),
                    name: "db".into(),
                    ..Default::default()
                }],
                ..Default::default()
            });
            task
        };
        let store = store_with(vec![reads(task("t1", "a", TaskState::Assigned))]);
        let setup = Transaction {
            changes: vec![
                crate::store::create(Cluster {
                    id: "c".into(),
                    secrets_key: key.into(),
                    ..Default::default()
                }),
                crate::store::create(Secret {
                    id: "s1".into(),
                    meta: None,
                    spec: Some(SecretSpec {
                        name: "db".into(),
                        labels: Default::default(),
                        data: sealed.into(),
                    }),
                }),
            ],
            timestamp_ms: 2,
            request_id: None,
        };
        store.apply(2, &setup).unwrap();
        let mut part = pb::Assignments {
            tasks: vec![reads(task("t1", "a", TaskState::Assigned))],
            ..Default::default()
        };
        attach_values(&store, &mut part);
        assert_eq!(part.secrets.len(), 1);
        assert_eq!(
            part.secrets[0].spec.as_ref().unwrap().data.as_ref(),
            b"hunter2"
        );
        assert!(!format!("{part:?}").contains("hunter2"), "Debug redacts");
        // Started or ended already, or without secrets: nothing is sent.
        let mut part = pb::Assignments {
            tasks: vec![
                reads(task("t1", "a", TaskState::Running)),
                task("t2", "a", TaskState::Assigned),
            ],
            ..Default::default()
        };
        attach_values(&store, &mut part);
        assert!(part.secrets.is_empty());
    }

    #[test]
    fn status_reports_move_own_tasks_forward_only() {
        let store = store_with(vec![
            task("a", "n1", TaskState::Assigned),
            task("b", "n1", TaskState::Running),
            task("c", "n1", TaskState::Running),
        ]);
        let changes = status_changes(
            &store,
            "n1",
            &[
                update("a", TaskState::Running),
                // A late report of an earlier state is ignored, not an error.
                update("b", TaskState::Starting),
                update("c", TaskState::Failed),
                // Reaped meanwhile: nothing to record.
                update("gone", TaskState::Complete),
            ],
        )
        .unwrap();
        assert_eq!(changes.len(), 2, "a and c change; b and gone do not");
        assert_eq!(
            states_after(&store, changes),
            vec![
                TaskState::Running as i32,
                TaskState::Running as i32,
                TaskState::Failed as i32
            ]
        );
        // The same report again changes nothing.
        let again = status_changes(&store, "n1", &[update("c", TaskState::Failed)]).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn a_large_set_goes_in_parts_marked_first_and_more() {
        let mut big = task("t", "n1", TaskState::Assigned);
        big.spec = Some(crate::proto::objects::TaskSpec {
            command: "x".repeat(300 * 1024),
            ..Default::default()
        });
        let tasks: Vec<Task> = (0..10)
            .map(|i| Task {
                id: format!("t{i}"),
                ..big.clone()
            })
            .collect();
        let parts = assignment_parts(true, tasks, Vec::new(), 7);
        assert_eq!(parts.len(), 4, "three tasks of 300 KiB per MiB");
        assert!(parts[0].complete && parts[1..].iter().all(|p| !p.complete));
        assert!(parts[..3].iter().all(|p| p.more) && !parts[3].more);
        assert_eq!(parts.iter().map(|p| p.tasks.len()).sum::<usize>(), 10);
        // A small change set is one message, without `more`.
        let one = assignment_parts(
            false,
            vec![task("a", "n1", TaskState::Assigned)],
            vec!["b".into()],
            8,
        );
        assert_eq!(one.len(), 1);
        assert!(!one[0].complete && !one[0].more && one[0].removed == ["b"]);
    }

    #[test]
    fn each_agent_gets_the_period_within_ten_percent() {
        let period = Duration::from_secs(5);
        let given: Vec<Duration> = (0..200).map(|_| jittered(period)).collect();
        assert!(
            given
                .iter()
                .all(|p| *p >= Duration::from_millis(4500) && *p <= Duration::from_millis(5500))
        );
        assert!(
            given.iter().any(|p| *p != given[0]),
            "spread, not one value"
        );
    }

    #[test]
    fn a_down_node_is_not_made_disconnected_or_unknown_and_no_state_is_written_twice() {
        let store = Store::new(StoreConfig::default());
        let node = |id: &str, state: NodeState| Node {
            id: id.into(),
            status: Some(NodeStatus {
                state: state as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        let txn = Transaction {
            changes: vec![
                crate::store::create(node("down", NodeState::Down)),
                crate::store::create(node("ready", NodeState::Ready)),
            ],
            timestamp_ms: 1,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        let write = |id: &str, state: NodeState| NodeWrite {
            node_id: id.into(),
            state,
            message: "m".into(),
            guard: Guard::NoSession,
        };
        assert!(node_state_change(&store, &write("down", NodeState::Disconnected)).is_none());
        assert!(node_state_change(&store, &write("down", NodeState::Unknown)).is_none());
        assert!(node_state_change(&store, &write("down", NodeState::Down)).is_none());
        assert!(node_state_change(&store, &write("gone", NodeState::Down)).is_none());
        assert!(node_state_change(&store, &write("ready", NodeState::Disconnected)).is_some());
        assert!(node_state_change(&store, &write("ready", NodeState::Ready)).is_none());
    }

    #[test]
    fn tasks_that_may_run_on_a_node_down_long_enough_are_orphaned() {
        let store = Store::new(StoreConfig::default());
        let node = |id: &str, state: NodeState| {
            crate::store::create(Node {
                id: id.into(),
                status: Some(NodeStatus {
                    state: state as i32,
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        // Nodes written at 1,000 ms (their DOWN time), tasks in every state on them.
        let mut changes = vec![
            node("down", NodeState::Down),
            node("down-back", NodeState::Down),
            node("ready", NodeState::Ready),
        ];
        let states = [
            (TaskState::Pending, "pending"),
            (TaskState::Assigned, "assigned"),
            (TaskState::Starting, "starting"),
            (TaskState::Running, "running"),
            (TaskState::Complete, "complete"),
            (TaskState::Failed, "failed"),
        ];
        for node_id in ["down", "down-back", "ready"] {
            for (state, name) in states {
                changes.push(crate::store::create(task(
                    &format!("{node_id}-{name}"),
                    node_id,
                    state,
                )));
            }
        }
        let txn = Transaction {
            changes,
            timestamp_ms: 1_000,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        let after = Duration::from_secs(10);
        let has_session = |node_id: &str| node_id == "down-back";
        let orphaned = |now_ms: i64, max: usize| {
            store.view(|view| orphan_changes(view, now_ms, after, has_session, max))
        };
        assert!(orphaned(10_999, 100).is_empty(), "down for less than 10 s");
        assert_eq!(orphaned(11_000, 2).len(), 2, "bounded per transaction");
        let changes = orphaned(11_000, 100);
        store
            .apply(
                2,
                &Transaction {
                    changes,
                    timestamp_ms: 11_000,
                    request_id: None,
                },
            )
            .unwrap();
        let mut ids: Vec<String> = store
            .list::<Task>()
            .iter()
            .filter(|t| t.status.as_ref().unwrap().state == TaskState::Orphaned as i32)
            .map(|t| t.id.clone())
            .collect();
        ids.sort();
        assert_eq!(
            ids,
            ["down-assigned", "down-running", "down-starting"],
            "ASSIGNED to RUNNING on the node down without a session; not PENDING nor ended"
        );
        assert!(orphaned(20_000, 100).is_empty(), "done once");
    }

    #[test]
    fn a_node_cannot_report_for_another_nodes_task() {
        let store = store_with(vec![task("a", "n1", TaskState::Assigned)]);
        let refused = status_changes(&store, "n2", &[update("a", TaskState::Running)]).unwrap_err();
        assert_eq!(refused.code, Code::PermissionDenied, "{refused}");
        let missing = pb::TaskStatusUpdate {
            task_id: "a".into(),
            status: None,
        };
        let refused = status_changes(&store, "n1", &[missing]).unwrap_err();
        assert_eq!(refused.code, Code::InvalidArgument, "{refused}");
    }
}
