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
//!   then). One session per node: a new one replaces the old, whose stream ends. A node
//!   may open [`sessions::REGISTRATION_ATTEMPTS_MAX`] sessions per
//!   [`sessions::REGISTRATION_WINDOW`]; past that it is refused with `retry_after`.
//! - An agent that closes its stream leaves its node DISCONNECTED; silent for
//!   [`HEARTBEAT_MISSES_MAX`] periods, the node is DOWN. A manager that takes the lead
//!   marks the nodes it has no session with UNKNOWN and gives them twice that grace
//!   before marking them DOWN (no storm of DOWN after a leader change).
//! - A follower refuses every call with `FailedPrecondition` and the reason
//!   [`NOT_LEADER`]; the agent tries the leader next (the status's `leader_addr` names it).
//!
//! Must never change the store except through a proposed transaction, let a node touch
//! another node's tasks, move a task's observed state backwards, or block its thread on a
//! stream or a proposal.

pub mod sessions;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::ca::PeerIdentity;
use crate::net::{CallContext, Responder, Router, ServerStream, ServicePool};
use crate::proto::dispatcher as pb;
use crate::proto::dispatcher::rpc;
use crate::proto::objects::{
    Cluster, Node, NodeAvailability, NodeSpec, NodeState, NodeStatus, Task, Transaction,
};
use crate::raft::node::NodeHandle;
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction, propose_transaction_with};
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
/// Node state changes per transaction the dispatcher thread proposes.
const NODE_WRITES_PER_TXN_MAX: usize = 100;

/// What the dispatcher thread is told (timer callbacks and proposal callbacks post here;
/// unbounded, but at most one deadline per session, one grace per leadership and one
/// retry per write in flight).
enum Event {
    /// A session's heartbeat deadline came.
    Deadline { node_id: String, session_id: String },
    /// The grace after taking the lead (of lead `generation`) is over.
    LeaderGrace { generation: u64, until: Instant },
    /// Node state writes to build again (a concurrent change aborted them).
    Write {
        writes: Vec<NodeWrite>,
        attempt: u32,
    },
    /// The status batch is due (its delay passed, or it is full).
    FlushStatuses,
    /// Status reports to build again (a concurrent change aborted their transaction).
    Statuses(Vec<StatusRequest>),
}

/// One `UpdateTaskStatus` call waiting for its batch.
struct StatusRequest {
    node_id: String,
    updates: Vec<pb::TaskStatusUpdate>,
    responder: Responder<pb::UpdateTaskStatusResponse>,
    attempt: u32,
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
    /// Timed events the timer could not take, posted at the next tick.
    deferred: Mutex<Vec<Event>>,
    /// The Lamport times of the network keys last handed to the sessions (`None`: not
    /// looked yet).
    keys_sent: Mutex<Option<Vec<u64>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    stopping: AtomicBool,
}

impl Dispatcher {
    /// The dispatcher over `node` and its applied `store`.
    pub fn new(node: NodeHandle, store: Arc<Store>) -> Arc<Dispatcher> {
        let (events, events_rx) = crossbeam_channel::unbounded();
        Arc::new(Dispatcher {
            node,
            store,
            table: Mutex::new(SessionTable::new()),
            origin: Instant::now(),
            events,
            events_rx,
            timers: Mutex::new(None),
            deferred: Mutex::new(Vec::new()),
            keys_sent: Mutex::new(None),
            statuses: Mutex::new(StatusBatch::default()),
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
        self.end_all(&Status::unavailable("the manager is shutting down"));
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
                default(TICK) => {}
            }
            if last_tick.elapsed() >= TICK {
                last_tick = Instant::now();
                self.tick(&mut watch, &mut generation);
            }
        }
        drop(watch);
        self.table.lock().set_watching(false);
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
        }
        if watch.is_none() {
            return;
        }
        self.push_rotated_keys();
        let now = self.now_ms();
        let (ended, closed) = {
            let mut table = self.table.lock();
            table.prune_attempts(now);
            (table.flush_pending(), table.take_closed())
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
        let mut table = self.table.lock();
        let (resync, watcher) = self.store.view_and_watch(
            WatchOptions {
                include_commits: true,
                queue_events_max: Some(WATCH_QUEUE_EVENTS_MAX),
                ..WatchOptions::filtered(vec![WatchFilter::kind(Kind::Task)])
            },
            |view| {
                let version = view.version();
                table.resync_all(version, |node_id| {
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
                Some(WatchEvent::Commit { version }) => ended.extend(table.commit(version)),
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
            Event::Write { writes, attempt } => self.write_node_states(writes, attempt),
            Event::FlushStatuses => self.flush_statuses(),
            Event::Statuses(requests) => self.propose_statuses(requests),
        }
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

    /// Proposes `writes` (whose guards still hold), [`NODE_WRITES_PER_TXN_MAX`] per
    /// transaction, without waiting: an aborted batch is built again by this thread.
    fn write_node_states(&self, writes: Vec<NodeWrite>, attempt: u32) {
        for batch in writes.chunks(NODE_WRITES_PER_TXN_MAX) {
            let changes = {
                let table = self.table.lock();
                batch
                    .iter()
                    .filter(|w| match &w.guard {
                        Guard::NoSession => !table.has(&w.node_id),
                        Guard::Lingering(session_id) => table.is_lingering(&w.node_id, session_id),
                    })
                    .filter_map(|w| node_state_change(&self.store, w))
                    .collect::<Vec<_>>()
            };
            if changes.is_empty() {
                continue;
            }
            let txn = Transaction {
                changes,
                timestamp_ms: now_ms(),
                request_id: None,
            };
            let events = self.events.clone();
            let batch = batch.to_vec();
            propose_transaction_with(
                &self.node,
                &txn,
                Box::new(move |outcome| match outcome {
                    Ok(_) => {}
                    Err(status) if status.code == Code::Aborted && attempt < WRITE_ATTEMPTS_MAX => {
                        let _ = events.send(Event::Write {
                            writes: batch,
                            attempt: attempt + 1,
                        });
                    }
                    Err(status) => log::warn!("dispatcher: cannot record node states: {status}"),
                }),
            );
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
        self.arm_deadline(node_id.clone(), session_id.clone(), grace);
        let started = self.record_ready(&caller, &request).and_then(|()| {
            stream.send(&pb::SessionMessage {
                message: Some(pb::session_message::Message::Started(pb::SessionStarted {
                    session_id: session_id.clone(),
                    heartbeat_period_ms: i64::try_from(millis(period)).unwrap_or(i64::MAX),
                    network_keys: self.network_keys(),
                })),
            })
        });
        if let Err(status) = started {
            drop(self.table.lock().remove(&node_id, &session_id));
            return Err(status);
        }
        log::info!("dispatcher: session {session_id} for node {node_id}");
        // The complete set is read under the table's lock, so that the dispatcher thread
        // hands this session exactly the changes after it.
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
        if let Err((stream, status)) = attached {
            log::debug!("dispatcher: session {session_id} of {node_id} ends: {status}");
            stream.fail(status);
        }
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
        Ok(pb::HeartbeatResponse {
            heartbeat_period_ms: i64::try_from(period_ms).unwrap_or(i64::MAX),
            certificate_role,
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
        self.table
            .lock()
            .touch(&caller.node_id, &request.session_id, self.now_ms())?;
        if request.updates.len() > STATUS_UPDATES_MAX {
            return Err(Status::invalid_argument(format!(
                "{} status updates in one call; send at most {STATUS_UPDATES_MAX}",
                request.updates.len()
            )));
        }
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

    /// Records the caller's node READY (creating a worker's Node object on its first
    /// session). A manager's Node object is made by its own report (`control.ReportManager`,
    /// with its Raft id): until then its agent is asked to retry, so that no manager's Node
    /// ever lacks the Raft id that a demotion needs to remove it from the group.
    fn record_ready(
        &self,
        caller: &PeerIdentity,
        request: &pb::SessionRequest,
    ) -> Result<(), Status> {
        self.write_with_retries(|store| {
            let change = match store.get::<Node>(&caller.node_id) {
                None if caller.role == crate::ca::Role::Manager => {
                    return Err(Status::retry_soon(
                        Code::Unavailable,
                        format!(
                            "manager {} has not recorded itself as a node yet (it does within \
                             a second of joining); retry in a moment",
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
            };
            Ok(vec![change])
        })
    }

    /// Builds changes from the current store and proposes them, again after a concurrent
    /// change (`Aborted`), at most [`WRITE_ATTEMPTS_MAX`] times.
    fn write_with_retries(
        &self,
        build: impl Fn(&Store) -> Result<Vec<crate::proto::objects::Change>, Status>,
    ) -> Result<(), Status> {
        let mut attempt = 1;
        loop {
            let changes = build(&self.store)?;
            if changes.is_empty() {
                return Ok(());
            }
            // The store stamps objects with the transaction's time: the orchestrator's
            // node-down grace counts from it.
            let txn = Transaction {
                changes,
                timestamp_ms: now_ms(),
                request_id: None,
            };
            match propose_transaction(&self.node, &txn, PROPOSE_TIMEOUT) {
                Ok(_) => return Ok(()),
                Err(status) if status.code == Code::Aborted && attempt < WRITE_ATTEMPTS_MAX => {
                    attempt += 1;
                }
                Err(status) => return Err(status),
            }
        }
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

/// `period` within ± [`HEARTBEAT_JITTER_PERCENT`].
fn jittered(period: Duration) -> Duration {
    let spread = HEARTBEAT_JITTER_PERCENT as f64 / 100.0;
    let factor: f64 = rand::random_range((1.0 - spread)..=(1.0 + spread));
    period.mul_f64(factor)
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

/// One assignments message per [`ASSIGNMENTS_BYTES_MAX`] of tasks; only the first of a
/// complete set says `complete`, and every part but the last says `more` (the agent
/// removes what a complete set does not name only once its last part arrived).
fn assignment_parts(
    complete: bool,
    tasks: Vec<Task>,
    removed: Vec<String>,
    version: u64,
) -> Vec<pb::Assignments> {
    let mut chunks: Vec<Vec<Task>> = vec![Vec::new()];
    let mut bytes = 0;
    for task in tasks {
        let len = prost::Message::encoded_len(&task);
        let last = chunks.last_mut().expect("one chunk at least");
        if bytes + len > ASSIGNMENTS_BYTES_MAX && !last.is_empty() {
            chunks.push(Vec::new());
            bytes = 0;
        }
        bytes += len;
        chunks.last_mut().expect("one chunk at least").push(task);
    }
    let mut removed = Some(removed);
    let parts = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, tasks)| pb::Assignments {
            complete: complete && i == 0,
            tasks,
            removed: removed.take().unwrap_or_default(),
            version,
            more: i + 1 < parts,
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
