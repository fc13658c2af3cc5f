//! The dispatcher (`dispatcher.*`, swarmkit's): how each node's agent learns the tasks
//! assigned to it and reports their status. Served by the Raft leader only.
//!
//! ```text
//!  agent ──Session──► leader: SessionStarted{id, heartbeat period}, then Assignments
//!        │                    (the complete set of the node's tasks, then changes)
//!        ├──Heartbeat(id) every period ──► 3 missed periods: node DOWN, session ended
//!        └──UpdateTaskStatus(id, ≤ 200 updates) ──► one transaction, only the caller's
//!                                                   tasks, states only move forward
//! ```
//!
//! - A session starts by recording the node READY (a worker's Node object is created
//!   then). One session per node: a new one replaces the old, whose stream ends.
//! - Each session has a thread (`flotilla-session`, at most [`SESSIONS_MAX`]) that watches
//!   the store for the node's tasks and streams them, one message per transaction. It ends
//!   the stream when the heartbeat expires (and marks the node DOWN), when this manager
//!   stops leading (`Unavailable` with the reason [`NOT_LEADER`]), or at shutdown.
//! - A follower refuses every call with `FailedPrecondition` and the reason
//!   [`NOT_LEADER`]; the agent tries the leader next (the status's `leader_addr` names it).
//!
//! Must never change the store except through a proposed transaction, let a node touch
//! another node's tasks, or move a task's observed state backwards.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::ca::PeerIdentity;
use crate::net::{CallContext, Router, ServerStream, ServicePool};
use crate::proto::dispatcher as pb;
use crate::proto::dispatcher::rpc;
use crate::proto::objects::{
    Cluster, Node, NodeAvailability, NodeSpec, NodeState, NodeStatus, Task, Transaction,
};
use crate::raft::node::NodeHandle;
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction};
use crate::store::settings::ClusterSettings;
use crate::store::{
    Action, Kind, Object, Store, WatchError, WatchEvent, WatchFilter, WatchOptions,
};
use crate::util::clock::unix_now_ms as now_ms;
use crate::wire::{Code, Status};

/// The status reason of a refusal by a manager that is not the leader (the status names the
/// leader in its details when it is known).
pub const NOT_LEADER: crate::wire::Reason = crate::wire::Reason::NotLeader;
/// Sessions one leader serves at once (one thread each).
pub const SESSIONS_MAX: usize = 1024;
/// Status updates per `UpdateTaskStatus` call (one transaction's worth).
pub use crate::proto::dispatcher::STATUS_UPDATES_MAX;
/// Missed heartbeat periods after which a node is down.
pub const HEARTBEAT_MISSES_MAX: u32 = 3;
/// Encoded task bytes per assignments message; a bigger set is sent in several.
pub use crate::proto::dispatcher::ASSIGNMENTS_BYTES_MAX;
/// How often a session thread with nothing to send checks its heartbeat and leadership.
const SESSION_POLL_INTERVAL: Duration = Duration::from_millis(200);
/// Attempts of a write that met a concurrent change (`Aborted`) before giving up.
const WRITE_ATTEMPTS_MAX: u32 = 3;

/// What [`Dispatcher::check_session`] found.
enum SessionCheck {
    /// Current and heard from within the heartbeat bound.
    Live,
    /// No longer the node's session (a newer one replaced it).
    Replaced,
    /// Silent this long: forgotten, the node must be marked down.
    Expired(Duration),
}

/// One node's current session.
struct SessionEntry {
    id: String,
    last_heartbeat: Instant,
}

/// The dispatcher of one manager (it serves only while this manager leads).
pub struct Dispatcher {
    node: NodeHandle,
    store: Arc<Store>,
    /// Node id → its current session.
    sessions: Mutex<HashMap<String, SessionEntry>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    monitor: Mutex<Option<JoinHandle<()>>>,
    stopping: Arc<AtomicBool>,
}

impl Dispatcher {
    /// The dispatcher over `node` and its applied `store`.
    pub fn new(node: NodeHandle, store: Arc<Store>) -> Arc<Dispatcher> {
        Arc::new(Dispatcher {
            node,
            store,
            sessions: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
            monitor: Mutex::new(None),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the monitor thread (`flotilla-dispatcher`): while this manager leads, a node
    /// recorded READY that has had no session with it for [`HEARTBEAT_MISSES_MAX`]
    /// heartbeat periods since it took the lead is marked DOWN (its agent died, or was
    /// talking to the previous leader and never came over).
    ///
    /// # Errors
    /// The OS error if the thread cannot start.
    pub fn start_monitor(self: &Arc<Self>) -> std::io::Result<()> {
        let dispatcher = self.clone();
        let thread = std::thread::Builder::new()
            .name("flotilla-dispatcher".into())
            .spawn(move || dispatcher.monitor())?;
        *self.monitor.lock() = Some(thread);
        Ok(())
    }

    fn monitor(&self) {
        let mut leading_since: Option<Instant> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::sleep(SESSION_POLL_INTERVAL);
            if self.require_leader().is_err() {
                leading_since = None;
                continue;
            }
            let leading = leading_since.get_or_insert_with(Instant::now).elapsed();
            let Ok(period) = self.heartbeat_period() else {
                continue;
            };
            if leading < period * HEARTBEAT_MISSES_MAX {
                continue;
            }
            for node_id in self.ready_nodes_without_session() {
                let message = format!(
                    "no session with the leader in the {} ms since it took the lead",
                    leading.as_millis()
                );
                log::warn!("dispatcher: node {node_id} is down: {message}");
                if let Err(status) = self.mark_down(&node_id, &message) {
                    log::warn!("dispatcher: cannot mark node {node_id} down: {status}");
                }
            }
        }
    }

    fn ready_nodes_without_session(&self) -> Vec<String> {
        let ready: Vec<String> = self.store.view(|view| {
            view.list::<Node>()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .is_some_and(|s| s.state == NodeState::Ready as i32)
                })
                .map(|n| n.id.clone())
                .collect()
        });
        let sessions = self.sessions.lock();
        ready
            .into_iter()
            .filter(|id| !sessions.contains_key(id))
            .collect()
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
        router.serve_unary(rpc::UPDATE_TASK_STATUS, pool, move |ctx, request| {
            d.update_task_status(ctx, request)
        });
    }

    /// Ends every session stream and joins the session and monitor threads.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(monitor) = self.monitor.lock().take()
            && monitor.join().is_err()
        {
            log::error!("the dispatcher monitor thread panicked");
        }
        for thread in std::mem::take(&mut *self.threads.lock()) {
            if thread.join().is_err() {
                log::error!("a dispatcher session thread panicked");
            }
        }
    }

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

    fn heartbeat_period(&self) -> Result<Duration, Status> {
        self.store
            .view(|view| view.list::<Cluster>().next().cloned())
            .and_then(|c| c.spec.clone())
            .map(|spec| ClusterSettings::from_spec(&spec).heartbeat_period)
            .ok_or_else(|| {
                Status::unavailable(
                    "the cluster object does not exist yet (the leader creates it on election); \
                     retry in a moment",
                )
            })
    }

    fn open_session(
        self: &Arc<Self>,
        ctx: &CallContext,
        request: pb::SessionRequest,
        stream: ServerStream<pb::SessionMessage>,
    ) -> Result<(), Status> {
        self.require_leader()?;
        let caller = caller(ctx)?;
        let period = self.heartbeat_period()?;
        {
            let mut threads = self.threads.lock();
            threads.retain(|t| !t.is_finished());
            if threads.len() >= SESSIONS_MAX {
                return Err(Status::resource_exhausted(format!(
                    "this manager already serves {SESSIONS_MAX} sessions"
                )));
            }
        }
        // The session exists before the node is recorded ready, so that the monitor never
        // takes a node in the middle of opening one for a silent node.
        let session_id = crate::util::id::random_id();
        self.sessions.lock().insert(
            caller.node_id.clone(),
            SessionEntry {
                id: session_id.clone(),
                last_heartbeat: Instant::now(),
            },
        );
        let started = self
            .record_ready(&caller, &request)
            .and_then(|()| {
                stream.send(&pb::SessionMessage {
                    message: Some(pb::session_message::Message::Started(pb::SessionStarted {
                        session_id: session_id.clone(),
                        heartbeat_period_ms: millis(period),
                    })),
                })
            })
            .and_then(|()| self.spawn_session(&caller.node_id, &session_id, period, stream));
        if started.is_err() {
            self.forget_session(&caller.node_id, &session_id);
        }
        started
    }

    fn spawn_session(
        self: &Arc<Self>,
        node_id: &str,
        session_id: &str,
        period: Duration,
        stream: ServerStream<pb::SessionMessage>,
    ) -> Result<(), Status> {
        log::info!("dispatcher: session {session_id} for node {node_id}");
        let dispatcher = self.clone();
        let (node_id, session_id) = (node_id.to_string(), session_id.to_string());
        let thread = std::thread::Builder::new()
            .name("flotilla-session".into())
            .spawn(move || {
                let ended = dispatcher.pump(&node_id, &session_id, period, &stream);
                log::debug!("dispatcher: session {session_id} of {node_id} ends: {ended}");
                dispatcher.forget_session(&node_id, &session_id);
                stream.fail(ended);
            })
            .map_err(|e| Status::resource_exhausted(format!("cannot start a session: {e}")))?;
        self.threads.lock().push(thread);
        Ok(())
    }

    /// Forgets `session_id` if it is still `node_id`'s session: a node without a session
    /// is marked down by the monitor once its grace has passed.
    fn forget_session(&self, node_id: &str, session_id: &str) {
        let mut sessions = self.sessions.lock();
        if sessions.get(node_id).is_some_and(|e| e.id == session_id) {
            sessions.remove(node_id);
        }
    }

    /// Streams the node's assignments until the session ends; returns why it ended.
    fn pump(
        &self,
        node_id: &str,
        session_id: &str,
        period: Duration,
        stream: &ServerStream<pb::SessionMessage>,
    ) -> Status {
        let options = WatchOptions {
            include_commits: true,
            ..WatchOptions::filtered(vec![WatchFilter {
                kind: Some(Kind::Task),
                node_id: Some(node_id.to_string()),
                ..WatchFilter::default()
            }])
        };
        let ((version, tasks), watcher) = self.store.view_and_watch(options, |view| {
            let tasks: Vec<Task> = view
                .tasks_by_node(node_id)
                .map(|t| t.as_ref().clone())
                .collect();
            (view.version(), tasks)
        });
        if let Err(status) = send_assignments(stream, true, tasks, Vec::new(), version) {
            return status;
        }
        let mut changed: Vec<Task> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        loop {
            if let Some(reason) = self.session_over(node_id, session_id, period, stream) {
                return reason;
            }
            match watcher.recv_timeout(SESSION_POLL_INTERVAL) {
                Ok(WatchEvent::Change(event)) => {
                    if let Object::Task(task) = &event.object {
                        if event.action == Action::Delete {
                            changed.retain(|t| t.id != task.id);
                            removed.push(task.id.clone());
                        } else {
                            changed.retain(|t| t.id != task.id);
                            changed.push(task.as_ref().clone());
                        }
                    }
                }
                Ok(WatchEvent::Commit { version }) => {
                    let (c, r) = (std::mem::take(&mut changed), std::mem::take(&mut removed));
                    if let Err(status) = send_assignments(stream, false, c, r, version) {
                        return status;
                    }
                }
                Err(WatchError::Timeout) => {}
                Ok(WatchEvent::Dropped(reason)) => {
                    return Status::unavailable(format!(
                        "the session fell behind the store ({reason:?}); open a new one for a \
                         complete set"
                    ));
                }
                Err(error) => return Status::new(error.code(), error.to_string()),
            }
        }
    }

    /// Why the session must end now, if it must.
    fn session_over(
        &self,
        node_id: &str,
        session_id: &str,
        period: Duration,
        stream: &ServerStream<pb::SessionMessage>,
    ) -> Option<Status> {
        if let Some(reason) = self.serving_ends() {
            return Some(reason);
        }
        match self.check_session(node_id, session_id, period) {
            SessionCheck::Live if stream.is_cancelled() => {
                Some(self.linger(node_id, session_id, period))
            }
            SessionCheck::Live => None,
            SessionCheck::Replaced => Some(Status::cancelled("a newer session replaced this one")),
            SessionCheck::Expired(silent) => {
                let message = self.declare_down(node_id, silent);
                Some(Status::new(
                    Code::NotFound,
                    format!("session {session_id} expired ({message}); open a new one"),
                ))
            }
        }
    }

    /// After the agent closed its stream: waits until a new session replaces this one or
    /// the heartbeats stop for good (the node is then marked down); an agent that left may
    /// be back before that.
    fn linger(&self, node_id: &str, session_id: &str, period: Duration) -> Status {
        loop {
            std::thread::sleep(SESSION_POLL_INTERVAL);
            if let Some(reason) = self.serving_ends() {
                return reason;
            }
            match self.check_session(node_id, session_id, period) {
                SessionCheck::Live => {}
                SessionCheck::Replaced => return Status::cancelled("the agent came back"),
                SessionCheck::Expired(silent) => {
                    self.declare_down(node_id, silent);
                    return Status::cancelled("the agent left");
                }
            }
        }
    }

    /// Why no session can go on here: shutdown, or this manager no longer leads.
    fn serving_ends(&self) -> Option<Status> {
        if self.stopping.load(Ordering::SeqCst) {
            return Some(Status::unavailable("the manager is shutting down"));
        }
        self.require_leader().err().map(|mut status| {
            status.code = Code::Unavailable;
            status
        })
    }

    /// Whether `session_id` is still `node_id`'s session and heard from; an expired one is
    /// forgotten here, so that it expires once.
    fn check_session(&self, node_id: &str, session_id: &str, period: Duration) -> SessionCheck {
        let mut sessions = self.sessions.lock();
        let Some(entry) = sessions.get(node_id).filter(|e| e.id == session_id) else {
            return SessionCheck::Replaced;
        };
        let silent = entry.last_heartbeat.elapsed();
        if silent <= period * HEARTBEAT_MISSES_MAX {
            return SessionCheck::Live;
        }
        sessions.remove(node_id);
        SessionCheck::Expired(silent)
    }

    /// Marks `node_id` down for having been silent `silent`; returns why, for messages.
    fn declare_down(&self, node_id: &str, silent: Duration) -> String {
        let message = format!("no heartbeat for {} ms", silent.as_millis());
        log::warn!("dispatcher: node {node_id} is down: {message}");
        if let Err(status) = self.mark_down(node_id, &message) {
            log::warn!("dispatcher: cannot mark node {node_id} down: {status}");
        }
        message
    }

    fn heartbeat(
        &self,
        ctx: &CallContext,
        request: &pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        self.require_leader()?;
        let caller = caller(ctx)?;
        self.touch_session(&caller.node_id, &request.session_id)?;
        let certificate_role = self
            .store
            .get::<Node>(&caller.node_id)
            .and_then(|node| crate::control::roles::certificate_role(&node).ok())
            .map(|role| crate::control::role_to_proto(role) as i32);
        Ok(pb::HeartbeatResponse {
            heartbeat_period_ms: millis(self.heartbeat_period()?),
            certificate_role,
        })
    }

    /// Records a heartbeat of `session_id`, which must be `node_id`'s current session.
    fn touch_session(&self, node_id: &str, session_id: &str) -> Result<(), Status> {
        let mut sessions = self.sessions.lock();
        match sessions.get_mut(node_id) {
            Some(entry) if entry.id == session_id => {
                entry.last_heartbeat = Instant::now();
                Ok(())
            }
            _ => Err(Status::not_found(format!(
                "session {session_id} is not this node's current session; open a new one"
            ))),
        }
    }

    fn update_task_status(
        &self,
        ctx: &CallContext,
        request: pb::UpdateTaskStatusRequest,
    ) -> Result<pb::UpdateTaskStatusResponse, Status> {
        self.require_leader()?;
        let caller = caller(ctx)?;
        self.touch_session(&caller.node_id, &request.session_id)?;
        if request.updates.len() > STATUS_UPDATES_MAX {
            return Err(Status::invalid_argument(format!(
                "{} status updates in one call; send at most {STATUS_UPDATES_MAX}",
                request.updates.len()
            )));
        }
        self.write_with_retries(|store| status_changes(store, &caller.node_id, &request.updates))?;
        Ok(pb::UpdateTaskStatusResponse {})
    }

    /// Records the caller's node READY (creating a worker's Node object on its first
    /// session).
    fn record_ready(
        &self,
        caller: &PeerIdentity,
        request: &pb::SessionRequest,
    ) -> Result<(), Status> {
        self.write_with_retries(|store| {
            let change = match store.get::<Node>(&caller.node_id) {
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

    fn mark_down(&self, node_id: &str, message: &str) -> Result<(), Status> {
        self.write_with_retries(|store| {
            let Some(node) = store.get::<Node>(node_id) else {
                return Ok(Vec::new());
            };
            let mut node = node.as_ref().clone();
            let version = node.meta.as_ref().map_or(0, |m| m.version);
            let status = node.status.get_or_insert_with(NodeStatus::default);
            status.state = NodeState::Down as i32;
            status.message = message.to_string();
            Ok(vec![crate::store::update_expecting(node, version)])
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

fn caller(ctx: &CallContext) -> Result<PeerIdentity, Status> {
    ctx.peer().cloned().ok_or_else(|| {
        Status::new(
            Code::Unauthenticated,
            "the dispatcher needs a node certificate",
        )
    })
}

fn millis(period: Duration) -> i64 {
    i64::try_from(period.as_millis()).unwrap_or(i64::MAX)
}

/// A worker's (or a manager's, if it has none yet) Node object at its first session.
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

/// Sends `tasks` and `removed` as [`assignment_parts`].
fn send_assignments(
    stream: &ServerStream<pb::SessionMessage>,
    complete: bool,
    tasks: Vec<Task>,
    removed: Vec<String>,
    version: u64,
) -> Result<(), Status> {
    for part in assignment_parts(complete, tasks, removed, version) {
        stream.send(&pb::SessionMessage {
            message: Some(pb::session_message::Message::Assignments(part)),
        })?;
    }
    Ok(())
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
