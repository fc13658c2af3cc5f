//! The dispatcher's session table: every agent session of this leader as state, not as a
//! thread. Owns, per node: the session id, when it was last heard from, its stream (while
//! the agent reads it), the assignments waiting for flow-control credit (coalesced: the
//! latest of each task), and the version its agent is up to; the fan-out of the one store
//! watch's task changes to sessions by node id; the registration rate limit.
//!
//! Assignments (swarmkit's): the first message of a session is the complete set, then
//! incremental messages, every one chained (`applies_to` = the previous message's
//! `results_in`, a new sequence id in `results_in`; parts of a large set too). Changes are
//! batched per session: held until [`ASSIGNMENT_BATCH_DELAY`] passed without another
//! change, or [`ASSIGNMENT_BATCH_WAIT_MAX`] after the first one held, or until
//! [`ASSIGNMENT_CHANGES_PER_MESSAGE_MAX`] are held; the batch deadlines sit on a
//! [`TimerWheel`] the dispatcher thread advances ([`SessionTable::flush_due`]). A change
//! the agent does not act on is dropped before it is held ([`AgentView`]): the table
//! remembers, per task the agent holds, a digest of what it acts on.
//!
//! Pure: no clock (callers pass `now_ms` from one monotonic origin), no thread, no store.
//! Must never block: a stream is only written with `try_send`, and a session whose agent
//! does not read falls behind only up to [`PENDING_TASKS_MAX`] before it is ended (its
//! agent opens a new one and receives a complete set).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::dispatcher as pb;
use crate::proto::objects::{Task, TaskState};
use crate::timer::{TimerId, TimerWheel};
use crate::wire::Status;

/// Sessions one leader serves at once. A session costs memory only, about 650 bytes
/// in the dispatcher: its table entry (~300: node and session ids, times, empty queues),
/// its stream handle and flow-control state (~200), its pending heartbeat deadline on the
/// timer (~150), plus the assignments it holds back; 20,000 sessions ≈ 13 MiB. The
/// connection it came on (TLS session, reactor buffers) is `net`'s and not counted here.
pub const SESSIONS_MAX: usize = 20_000;
/// Distinct changed tasks a session may hold back while its agent does not grant credit;
/// past it the session ends (the agent opens a new one and receives a complete set).
pub const PENDING_TASKS_MAX: usize = 10_000;
/// Assignment messages built but not yet sent that a session may hold (a complete set of
/// up to this many parts of `ASSIGNMENTS_BYTES_MAX`); past it the session ends.
pub const OUTBOX_MESSAGES_MAX: usize = 32;
/// Session openings a node may attempt within [`REGISTRATION_WINDOW`] (seed: 3 per 8 s).
pub const REGISTRATION_ATTEMPTS_MAX: usize = 3;
/// The window of the registration rate limit.
pub const REGISTRATION_WINDOW: Duration = Duration::from_secs(8);
/// Held assignment changes go this long after the last one came (seed: 100 ms; its
/// `batchingWaitTime`).
pub const ASSIGNMENT_BATCH_DELAY: Duration = Duration::from_millis(100);
/// Held assignment changes go at the latest this long after the first one was held, even
/// while changes keep coming (a bound the seed lacks: its wait could reach 10 s).
pub const ASSIGNMENT_BATCH_WAIT_MAX: Duration = Duration::from_secs(1);
/// Changed or removed tasks per incremental message (seed: 100, `modificationBatchLimit`);
/// this many held make the batch due at once.
pub const ASSIGNMENT_CHANGES_PER_MESSAGE_MAX: usize = 100;

/// What the agent acts on in a task (`agent::tasks`' reconcile rule): its desired state,
/// its spec, and of its status only the class of its state (not started yet, started,
/// ended). Everything else (`meta` and its version, the status's message, timestamps and
/// exit code, the orchestrator's bookkeeping) changes nothing on the node. Kept per task
/// the agent holds, 17 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentView {
    /// SHA-256 (first 16 bytes) of the encoded desired state and spec.
    digest: [u8; 16],
    /// [`status_class`] of the task's state.
    class: u8,
}

impl AgentView {
    /// The view of `task`.
    pub fn of(task: &Task) -> AgentView {
        let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
        hasher.update(&task.desired_state.to_le_bytes());
        if let Some(spec) = &task.spec {
            hasher.update(&prost::Message::encode_to_vec(spec));
        }
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&hasher.finish().as_ref()[..16]);
        AgentView {
            digest,
            class: status_class(task.status.as_ref().map_or(0, |s| s.state)),
        }
    }
}

/// The class of a task state, as the agent acts on it: 0 before STARTING (it may start
/// the task), 1 STARTING or RUNNING (it started: a task it did not start itself failed
/// meanwhile), 2 ended (nothing to start; a process still running is stopped). States only
/// move forward, so a class only grows.
pub fn status_class(state: i32) -> u8 {
    if state >= TaskState::Complete as i32 {
        2
    } else if state >= TaskState::Starting as i32 {
        1
    } else {
        0
    }
}

/// Where a session's assignments go: the agent's stream.
pub trait SessionSink: Send {
    /// Sends if the agent has room, never blocking: `Ok(false)` when it has not.
    ///
    /// # Errors
    /// The stream ended (the agent left or the connection closed).
    fn try_send(&self, message: &pb::SessionMessage) -> Result<bool, Status>;
    /// True once the agent closed the stream or the connection closed.
    fn is_cancelled(&self) -> bool;
    /// Ends the stream with `status`.
    fn fail(self, status: Status);
}

impl SessionSink for crate::net::ServerStream<pb::SessionMessage> {
    fn try_send(&self, message: &pb::SessionMessage) -> Result<bool, Status> {
        crate::net::ServerStream::try_send(self, message)
    }

    fn is_cancelled(&self) -> bool {
        crate::net::ServerStream::is_cancelled(self)
    }

    fn fail(self, status: Status) {
        crate::net::ServerStream::fail(self, status);
    }
}

/// A session that ended (its stream failed or its agent fell too far behind): node id,
/// session id, its stream (to be failed with the status), why. It lingers in the table.
pub type Ended<S> = (String, String, Option<S>, Status);

/// Adds to an assignments message, as it is sent, the values (secrets, configs) its tasks
/// read (see [`super::attach_values`]).
pub type AttachValues = Arc<dyn Fn(&mut pb::Assignments) + Send + Sync>;

/// One node's current session.
pub struct Session<S> {
    /// The session id the agent heartbeats with.
    pub id: String,
    /// The heartbeat period given to this agent (jittered).
    pub period_ms: u64,
    /// Silence after which the node is down.
    pub grace_ms: u64,
    last_heard_ms: u64,
    /// `None` while opening (the node is being recorded ready) and once the agent closed
    /// it (the session lingers until the heartbeats stop or a new session replaces it).
    stream: Option<S>,
    /// Whether the agent had a stream that it then closed.
    closed: bool,
    outbox: VecDeque<pb::Assignments>,
    /// Whether the outbox holds (the rest of) a complete set, which goes as built.
    outbox_complete: bool,
    changed: BTreeMap<String, Task>,
    removed: BTreeSet<String>,
    /// The store version the agent's assignments are up to (sent or queued).
    version: u64,
    /// What the agent holds (or will, once the held changes are sent), per task id.
    known: HashMap<String, AgentView>,
    /// The sequence number of the last message sent (its `results_in`); 0 before the first.
    sequence: u64,
    /// When the first held change came (ms), while changes are held.
    held_since_ms: Option<u64>,
    /// When the last held change came (ms).
    last_change_ms: u64,
    /// The batch deadline on the table's wheel, while changes are held.
    batch_timer: Option<TimerId>,
}

impl<S> Session<S> {
    /// Changed and removed tasks held.
    fn held(&self) -> usize {
        self.changed.len() + self.removed.len()
    }

    /// When the held changes are due (ms): [`ASSIGNMENT_BATCH_DELAY`] after the last,
    /// at most [`ASSIGNMENT_BATCH_WAIT_MAX`] after the first; at once when a message's
    /// worth is held.
    fn batch_due_ms(&self) -> Option<u64> {
        let since = self.held_since_ms?;
        if self.held() >= ASSIGNMENT_CHANGES_PER_MESSAGE_MAX {
            return Some(since);
        }
        Some(
            (self.last_change_ms + millis(ASSIGNMENT_BATCH_DELAY))
                .min(since + millis(ASSIGNMENT_BATCH_WAIT_MAX)),
        )
    }

    /// Sets the held changes' baseline: the complete set `tasks` (sent or queued).
    fn know_set(&mut self, tasks: &[Task]) {
        self.known = tasks
            .iter()
            .map(|t| (t.id.clone(), AgentView::of(t)))
            .collect();
        self.changed.clear();
        self.removed.clear();
        self.held_since_ms = None;
    }

    /// Holds `task`'s change unless the agent would not act on it. True if held.
    fn hold_upsert(&mut self, task: &Task) -> bool {
        let view = AgentView::of(task);
        if self.known.get(&task.id) == Some(&view) {
            return false;
        }
        self.known.insert(task.id.clone(), view);
        self.removed.remove(&task.id);
        self.changed.insert(task.id.clone(), task.clone());
        true
    }

    /// Holds the removal of `task_id` unless the agent never had it. True if held.
    fn hold_delete(&mut self, task_id: &str) -> bool {
        if self.known.remove(task_id).is_none() {
            return false;
        }
        self.changed.remove(task_id);
        self.removed.insert(task_id.to_string());
        true
    }
}

/// What a session's heartbeat deadline found.
#[derive(Debug, PartialEq, Eq)]
pub enum Deadline {
    /// No longer the node's session: nothing to do.
    Gone,
    /// Heard from since: check again after this many ms.
    Wait(u64),
    /// Silent this many ms: forgotten (its stream, if any, is returned to be failed).
    Expired(u64),
}

/// The sessions of one leader, by node id.
pub struct SessionTable<S> {
    sessions: HashMap<String, Session<S>>,
    /// Changes of the transaction being delivered by the watch, until its commit marker.
    staged: Vec<(String, StagedChange)>,
    /// Node id → its recent session openings (ms), at most [`REGISTRATION_ATTEMPTS_MAX`].
    attempts: HashMap<String, VecDeque<u64>>,
    /// Whether the store watch runs (sessions may open only then: otherwise changes made
    /// between a session's complete set and the watch's start would be lost).
    watching: bool,
    /// Batch deadlines of the sessions holding changes (node ids; at most one per session).
    batch_timers: TimerWheel<String>,
    /// Adds the secret and config values to each message as it is sent (none in tests
    /// that do not set it).
    attach_values: Option<AttachValues>,
}

/// One staged task change.
enum StagedChange {
    Upsert(Arc<Task>),
    Delete(String),
}

impl<S: SessionSink> Default for SessionTable<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: SessionSink> SessionTable<S> {
    /// Sends `message` (not an assignment: the network keys) to every streaming session
    /// that has room now; returns how many had none (they get it with their next session).
    pub fn send_to_streaming(&self, message: &pb::SessionMessage) -> usize {
        self.sessions
            .values()
            .filter_map(|s| s.stream.as_ref())
            .filter(|stream| !matches!(stream.try_send(message), Ok(true)))
            .count()
    }

    /// An empty table, not watching.
    pub fn new() -> Self {
        SessionTable {
            sessions: HashMap::new(),
            staged: Vec::new(),
            attempts: HashMap::new(),
            watching: false,
            batch_timers: TimerWheel::new(0),
            attach_values: None,
        }
    }

    /// Sets what adds the secret and config values to each assignments message sent.
    pub fn set_attach_values(&mut self, attach: AttachValues) {
        self.attach_values = Some(attach);
    }

    /// Sessions in the table (opening, streaming or lingering).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// True without sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether `node_id` has a session.
    pub fn has(&self, node_id: &str) -> bool {
        self.sessions.contains_key(node_id)
    }

    /// Whether `node_id`'s session is `session_id`.
    pub fn is_current(&self, node_id: &str, session_id: &str) -> bool {
        self.sessions
            .get(node_id)
            .is_some_and(|s| s.id == session_id)
    }

    /// Whether sessions may open (the store watch runs).
    pub fn watching(&self) -> bool {
        self.watching
    }

    /// Records that the store watch started (`true`) or stopped.
    pub fn set_watching(&mut self, watching: bool) {
        self.watching = watching;
        self.staged.clear();
    }

    /// Counts a session opening of `node_id`; refused with the wait until the next one is
    /// allowed when it made [`REGISTRATION_ATTEMPTS_MAX`] within [`REGISTRATION_WINDOW`].
    ///
    /// # Errors
    /// The wait, for the refusal's `retry_after`.
    pub fn admit(&mut self, node_id: &str, now_ms: u64) -> Result<(), Duration> {
        let window_ms = millis(REGISTRATION_WINDOW);
        let attempts = self.attempts.entry(node_id.to_string()).or_default();
        while attempts
            .front()
            .is_some_and(|&at| now_ms.saturating_sub(at) >= window_ms)
        {
            attempts.pop_front();
        }
        if attempts.len() >= REGISTRATION_ATTEMPTS_MAX {
            let oldest = *attempts.front().expect("the window holds attempts");
            let wait_ms = (oldest + window_ms).saturating_sub(now_ms).max(1);
            return Err(Duration::from_millis(wait_ms));
        }
        attempts.push_back(now_ms);
        Ok(())
    }

    /// Forgets rate-limit windows that have passed (bounded memory for nodes that left).
    pub fn prune_attempts(&mut self, now_ms: u64) {
        let window_ms = millis(REGISTRATION_WINDOW);
        self.attempts.retain(|_, attempts| {
            attempts
                .back()
                .is_some_and(|&at| now_ms.saturating_sub(at) < window_ms)
        });
    }

    /// Starts `session_id` for `node_id` (opening: no stream yet). Returns the stream of
    /// the session it replaces, to be ended.
    ///
    /// # Errors
    /// `ResourceExhausted` at [`SESSIONS_MAX`]; `Unavailable` before the watch runs.
    pub fn open(
        &mut self,
        node_id: &str,
        session_id: &str,
        period_ms: u64,
        grace_ms: u64,
        now_ms: u64,
    ) -> Result<Option<S>, Status> {
        if !self.watching {
            return Err(Status::retry_soon(
                crate::wire::Code::Unavailable,
                "this manager's dispatcher is starting (it just took the lead); retry in a moment",
            )
            .with_retry_after(Duration::from_millis(200)));
        }
        if !self.sessions.contains_key(node_id) && self.sessions.len() >= SESSIONS_MAX {
            return Err(Status::resource_exhausted(format!(
                "this manager already serves {SESSIONS_MAX} sessions; try another manager"
            )));
        }
        let previous = self.sessions.insert(
            node_id.to_string(),
            Session {
                id: session_id.to_string(),
                period_ms,
                grace_ms,
                last_heard_ms: now_ms,
                stream: None,
                closed: false,
                outbox: VecDeque::new(),
                outbox_complete: false,
                changed: BTreeMap::new(),
                removed: BTreeSet::new(),
                version: 0,
                known: HashMap::new(),
                sequence: 0,
                held_since_ms: None,
                last_change_ms: 0,
                batch_timer: None,
            },
        );
        if let Some(timer) = previous.as_ref().and_then(|s| s.batch_timer) {
            self.batch_timers.cancel(timer);
        }
        Ok(previous.and_then(|s| s.stream))
    }

    /// Hands `session_id` its stream with the node's complete set at `version`, and sends
    /// what the agent has room for. Gives the stream back if the session is no longer
    /// current (replaced or ended meanwhile).
    ///
    /// # Errors
    /// The stream, when the session is gone or it ended at once.
    pub fn attach(
        &mut self,
        node_id: &str,
        session_id: &str,
        stream: S,
        tasks: Vec<Task>,
        version: u64,
    ) -> Result<(), (S, Status)> {
        let Some(session) = self
            .sessions
            .get_mut(node_id)
            .filter(|s| s.id == session_id)
        else {
            return Err((
                stream,
                Status::cancelled("a newer session replaced this one"),
            ));
        };
        session.know_set(&tasks);
        session.outbox = super::assignment_parts(true, tasks, Vec::new(), version).into();
        session.outbox_complete = true;
        session.version = version;
        session.stream = Some(stream);
        match flush(session, 0, self.attach_values.as_ref()) {
            Ok(()) => Ok(()),
            Err(status) => {
                let stream = session.stream.take().expect("attached just now");
                linger(session);
                Err((stream, status))
            }
        }
    }

    /// Records a heartbeat (or any call) of `session_id`.
    ///
    /// # Errors
    /// `NotFound` when it is not `node_id`'s current session.
    pub fn touch(&mut self, node_id: &str, session_id: &str, now_ms: u64) -> Result<u64, Status> {
        match self.sessions.get_mut(node_id) {
            Some(session) if session.id == session_id => {
                session.last_heard_ms = now_ms;
                Ok(session.period_ms)
            }
            _ => Err(Status::not_found(format!(
                "session {session_id} is not this node's current session; open a new one"
            ))),
        }
    }

    /// Stages one task change of the transaction being delivered.
    pub fn stage_upsert(&mut self, task: Arc<Task>) {
        if self.sessions.contains_key(&task.node_id) {
            self.staged
                .push((task.node_id.clone(), StagedChange::Upsert(task)));
        }
    }

    /// Stages the deletion of a task of `node_id`.
    pub fn stage_delete(&mut self, node_id: &str, task_id: &str) {
        if self.sessions.contains_key(node_id) {
            self.staged.push((
                node_id.to_string(),
                StagedChange::Delete(task_id.to_string()),
            ));
        }
    }

    /// The transaction at `version` is complete: hands its staged changes to their nodes'
    /// streaming sessions (those whose complete set predates it), dropping those the agent
    /// would not act on, and holds them for the session's batch (sent at once when a
    /// message's worth is held). Returns the sessions that ended (stream ended, or fell too
    /// far behind): their node ids and streams.
    pub fn commit(&mut self, version: u64, now_ms: u64) -> Vec<Ended<S>> {
        let mut touched: Vec<String> = Vec::new();
        for (node_id, change) in std::mem::take(&mut self.staged) {
            let Some(session) = self.sessions.get_mut(&node_id) else {
                continue;
            };
            if session.stream.is_none() || session.version >= version {
                continue; // opening, lingering, or its complete set already holds it
            }
            let held = match change {
                StagedChange::Upsert(task) => session.hold_upsert(&task),
                StagedChange::Delete(task_id) => session.hold_delete(&task_id),
            };
            if held {
                session.held_since_ms.get_or_insert(now_ms);
                session.last_change_ms = now_ms;
                if touched.last() != Some(&node_id) {
                    touched.push(node_id);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        let mut due_now = Vec::new();
        for node_id in touched {
            let Some(session) = self.sessions.get_mut(&node_id) else {
                continue;
            };
            session.version = version;
            if session.held() >= ASSIGNMENT_CHANGES_PER_MESSAGE_MAX {
                due_now.push(node_id);
            } else {
                arm_batch(&mut self.batch_timers, &node_id, session);
            }
        }
        self.flush_nodes(due_now, now_ms)
    }

    /// The agent of `node_id` reported `state` for `task_id` on `session_id`: it knows that
    /// state, so the store's echo of it is not sent back.
    pub fn note_reported(&mut self, node_id: &str, session_id: &str, task_id: &str, state: i32) {
        if let Some(view) = self
            .sessions
            .get_mut(node_id)
            .filter(|s| s.id == session_id)
            .and_then(|s| s.known.get_mut(task_id))
        {
            view.class = view.class.max(status_class(state));
        }
    }

    /// When the table next needs [`SessionTable::flush_due`] (ms, a lower bound), if a
    /// session holds changes.
    pub fn next_batch_due_ms(&self) -> Option<u64> {
        self.batch_timers.next_deadline_ms()
    }

    /// Sends the batches whose time came. Returns the sessions that ended, as
    /// [`SessionTable::commit`] does.
    pub fn flush_due(&mut self, now_ms: u64) -> Vec<Ended<S>> {
        let mut fired = Vec::new();
        self.batch_timers.advance(now_ms, &mut fired);
        let mut due = Vec::new();
        for node_id in fired {
            let Some(session) = self.sessions.get_mut(&node_id) else {
                continue; // ended meanwhile
            };
            session.batch_timer = None;
            match session.batch_due_ms() {
                Some(at_ms) if at_ms <= now_ms => due.push(node_id),
                Some(_) => arm_batch(&mut self.batch_timers, &node_id, session),
                None => {}
            }
        }
        self.flush_nodes(due, now_ms)
    }

    /// Sends what every session holding back assignments has room for now (credit came
    /// back, a batch is due). Returns the sessions that ended, as [`SessionTable::commit`]
    /// does.
    pub fn flush_pending(&mut self, now_ms: u64) -> Vec<Ended<S>> {
        let waiting: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.stream.is_some()
                    && (!s.outbox.is_empty() || s.batch_due_ms().is_some_and(|at| at <= now_ms))
            })
            .map(|(node_id, _)| node_id.clone())
            .collect();
        self.flush_nodes(waiting, now_ms)
    }

    fn flush_nodes(&mut self, node_ids: Vec<String>, now_ms: u64) -> Vec<Ended<S>> {
        let mut ended = Vec::new();
        for node_id in node_ids {
            let Some(session) = self.sessions.get_mut(&node_id) else {
                continue;
            };
            let outcome = flush(session, now_ms, self.attach_values.as_ref());
            if let Some(timer) = session.batch_timer.take() {
                self.batch_timers.cancel(timer);
            }
            match outcome {
                Ok(()) => {
                    if session.held_since_ms.is_some() {
                        arm_batch(&mut self.batch_timers, &node_id, session);
                    }
                }
                Err(status) => {
                    let stream = session.stream.take();
                    linger(session);
                    ended.push((node_id, session.id.clone(), stream, status));
                }
            }
        }
        ended
    }

    /// Gives every streaming session the complete set `tasks_of` its node at `version` in
    /// place of what it held back (after the store watch fell behind). Returns the sessions
    /// that ended, as [`SessionTable::commit`] does.
    pub fn resync_all(
        &mut self,
        version: u64,
        now_ms: u64,
        mut tasks_of: impl FnMut(&str) -> Vec<Task>,
    ) -> Vec<Ended<S>> {
        self.staged.clear();
        let mut streaming = Vec::new();
        for (node_id, session) in &mut self.sessions {
            if session.stream.is_some() {
                let tasks = tasks_of(node_id);
                session.know_set(&tasks);
                session.outbox = super::assignment_parts(true, tasks, Vec::new(), version).into();
                session.outbox_complete = true;
                session.version = version;
                streaming.push(node_id.clone());
            }
        }
        self.flush_nodes(streaming, now_ms)
    }

    /// Streams the agents closed since the last call: the sessions linger (they end when
    /// their heartbeats stop or a new session replaces them). Returns their node ids and
    /// session ids.
    pub fn take_closed(&mut self) -> Vec<(String, String, S)> {
        let mut closed = Vec::new();
        for (node_id, session) in &mut self.sessions {
            if session
                .stream
                .as_ref()
                .is_some_and(SessionSink::is_cancelled)
            {
                let stream = session.stream.take().expect("checked just now");
                linger(session);
                closed.push((node_id.clone(), session.id.clone(), stream));
            }
        }
        closed
    }

    /// Whether `session_id` of `node_id` is lingering after its agent closed the stream.
    pub fn is_lingering(&self, node_id: &str, session_id: &str) -> bool {
        self.sessions
            .get(node_id)
            .is_some_and(|s| s.id == session_id && s.closed && s.stream.is_none())
    }

    /// The heartbeat deadline of `session_id` came: still heard from, or expired (then
    /// forgotten, its stream returned through `Deadline::Expired`'s caller).
    pub fn check_deadline(
        &mut self,
        node_id: &str,
        session_id: &str,
        now_ms: u64,
    ) -> (Deadline, Option<S>) {
        let Some(session) = self.sessions.get(node_id).filter(|s| s.id == session_id) else {
            return (Deadline::Gone, None);
        };
        let silent_ms = now_ms.saturating_sub(session.last_heard_ms);
        if silent_ms < session.grace_ms {
            return (Deadline::Wait(session.grace_ms - silent_ms), None);
        }
        let stream = self.forget(node_id);
        (Deadline::Expired(silent_ms), stream)
    }

    /// Forgets `session_id` if it is still `node_id`'s session; returns its stream.
    pub fn remove(&mut self, node_id: &str, session_id: &str) -> Option<S> {
        if self.is_current(node_id, session_id) {
            return self.forget(node_id);
        }
        None
    }

    /// Drops `node_id`'s session and its batch deadline; returns its stream.
    fn forget(&mut self, node_id: &str) -> Option<S> {
        let session = self.sessions.remove(node_id)?;
        if let Some(timer) = session.batch_timer {
            self.batch_timers.cancel(timer);
        }
        session.stream
    }

    /// Offers `message` (the manager list: not an assignment, so it goes beside the
    /// outbox) to every session with a stream, never blocking. Returns the sessions (node
    /// id, session id) whose agent had no room: the caller offers them the list again later
    /// ([`SessionTable::offer`]). A stream that failed is left to the usual paths.
    pub fn offer_all(&self, message: &pb::SessionMessage) -> Vec<(String, String)> {
        self.sessions
            .iter()
            .filter(|(_, session)| {
                session
                    .stream
                    .as_ref()
                    .is_some_and(|stream| matches!(stream.try_send(message), Ok(false)))
            })
            .map(|(node_id, session)| (node_id.clone(), session.id.clone()))
            .collect()
    }

    /// Offers `message` to `session_id` of `node_id`; false if it should be offered again
    /// (the agent had no room, or the session is still opening); true once sent or when
    /// there is no one left to send it to.
    pub fn offer(&self, node_id: &str, session_id: &str, message: &pb::SessionMessage) -> bool {
        let Some(session) = self.sessions.get(node_id).filter(|s| s.id == session_id) else {
            return true;
        };
        match &session.stream {
            Some(stream) => !matches!(stream.try_send(message), Ok(false)),
            None => session.closed,
        }
    }

    /// Sends `message` (not an assignment: a log subscription) to `node_id`'s session now;
    /// false if the node has no streaming session or its agent no room.
    pub fn send_to_node(&self, node_id: &str, message: &pb::SessionMessage) -> bool {
        self.sessions
            .get(node_id)
            .and_then(|session| session.stream.as_ref())
            .is_some_and(|stream| matches!(stream.try_send(message), Ok(true)))
    }

    /// Ends every session (this manager stops leading or shuts down): their streams.
    pub fn clear(&mut self) -> Vec<S> {
        self.staged.clear();
        self.batch_timers = TimerWheel::new(self.batch_timers.now_ms());
        self.sessions
            .drain()
            .filter_map(|(_, s)| s.stream)
            .collect()
    }
}

/// Moves the session's incremental messages back into its pending changes (newer pending
/// changes of the same tasks win).
fn unbuild<S>(session: &mut Session<S>) {
    for message in std::mem::take(&mut session.outbox) {
        for task in message.tasks {
            if !session.changed.contains_key(&task.id) && !session.removed.contains(&task.id) {
                session.changed.insert(task.id.clone(), task);
            }
        }
        for task_id in message.removed {
            if !session.changed.contains_key(&task_id) {
                session.removed.insert(task_id);
            }
        }
    }
}

/// A session that ended but lingers: it has no stream to send to, and ends for good when
/// its heartbeats stop (the node is then down) or a new session replaces it.
fn linger<S>(session: &mut Session<S>) {
    session.closed = true;
    session.outbox.clear();
    session.outbox_complete = false;
    session.changed.clear();
    session.removed.clear();
    session.known.clear();
    session.held_since_ms = None;
}

/// Puts the session's batch deadline on the wheel (in place of its previous one).
fn arm_batch<S>(wheel: &mut TimerWheel<String>, node_id: &str, session: &mut Session<S>) {
    if let Some(timer) = session.batch_timer.take() {
        wheel.cancel(timer);
    }
    if let Some(at_ms) = session.batch_due_ms() {
        session.batch_timer = Some(wheel.insert(at_ms, node_id.to_string()));
    }
}

/// Sends the session's outbox, then, if their batch is due at `now_ms`, its held changes
/// ([`ASSIGNMENT_CHANGES_PER_MESSAGE_MAX`] per message), while the agent has room. Each
/// message sent is chained to the previous one.
fn flush<S: SessionSink>(
    session: &mut Session<S>,
    now_ms: u64,
    attach_values: Option<&AttachValues>,
) -> Result<(), Status> {
    let Some(stream) = session.stream.as_ref() else {
        return Ok(());
    };
    loop {
        if session.outbox.is_empty()
            && session.held() > 0
            && session.batch_due_ms().is_some_and(|at_ms| at_ms <= now_ms)
        {
            let changed: Vec<Task> = std::mem::take(&mut session.changed).into_values().collect();
            let removed: Vec<String> = std::mem::take(&mut session.removed).into_iter().collect();
            session.outbox =
                super::assignment_parts(false, changed, removed, session.version).into();
        }
        let Some(part) = session.outbox.front() else {
            break;
        };
        let mut part = part.clone();
        // Values are added to the copy that goes, never kept in the outbox (whose messages
        // may be unbuilt and rebuilt): a message waiting holds no secret.
        if let Some(attach) = attach_values {
            attach(&mut part);
        }
        part.applies_to = sequence_id(session.sequence);
        part.results_in = sequence_id(session.sequence + 1);
        let message = pb::SessionMessage {
            message: Some(pb::session_message::Message::Assignments(part)),
        };
        if !stream.try_send(&message)? {
            break;
        }
        session.sequence += 1;
        session.outbox.pop_front();
        if session.outbox.is_empty() {
            session.outbox_complete = false;
        }
    }
    if !session.outbox_complete {
        // Changes built into messages that could not go yet: back to the held ones, so
        // that later changes of the same tasks coalesce with them.
        unbuild(session);
    }
    if session.held() == 0 {
        session.held_since_ms = None;
    }
    if session.held() > PENDING_TASKS_MAX || session.outbox.len() > OUTBOX_MESSAGES_MAX {
        return Err(Status::unavailable(
            "the agent did not read its assignments fast enough; open a new session for a \
             complete set",
        ));
    }
    Ok(())
}

/// The chain's sequence id of message number `n` of a session (`""` before the first).
fn sequence_id(n: u64) -> String {
    if n == 0 { String::new() } else { n.to_string() }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    use parking_lot::Mutex;

    /// A stream that records what it was sent and has `room` messages of credit.
    #[derive(Clone, Default)]
    struct FakeStream {
        sent: Arc<Mutex<Vec<pb::Assignments>>>,
        room: Arc<Mutex<usize>>,
        cancelled: Arc<Mutex<bool>>,
    }

    impl FakeStream {
        fn with_room(room: usize) -> Self {
            let stream = FakeStream::default();
            *stream.room.lock() = room;
            stream
        }
    }

    impl SessionSink for FakeStream {
        fn try_send(&self, message: &pb::SessionMessage) -> Result<bool, Status> {
            let mut room = self.room.lock();
            if *room == 0 {
                return Ok(false);
            }
            *room -= 1;
            if let Some(pb::session_message::Message::Assignments(a)) = &message.message {
                self.sent.lock().push(a.clone());
            }
            Ok(true)
        }

        fn is_cancelled(&self) -> bool {
            *self.cancelled.lock()
        }

        fn fail(self, _status: Status) {}
    }

    fn task(id: &str, node_id: &str) -> Arc<Task> {
        Arc::new(Task {
            id: id.into(),
            node_id: node_id.into(),
            ..Default::default()
        })
    }

    fn watching_table() -> SessionTable<FakeStream> {
        let mut table = SessionTable::new();
        table.set_watching(true);
        table
    }

    fn streaming(table: &mut SessionTable<FakeStream>, node: &str, version: u64) -> FakeStream {
        let stream = FakeStream::with_room(100);
        table
            .open(node, &format!("s-{node}"), 1000, 3000, 0)
            .unwrap();
        assert!(
            table
                .attach(
                    node,
                    &format!("s-{node}"),
                    stream.clone(),
                    Vec::new(),
                    version
                )
                .is_ok()
        );
        stream
    }

    #[test]
    fn the_manager_list_reaches_every_stream_and_waits_for_room_where_there_is_none() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 1);
        let b = streaming(&mut table, "b", 1);
        *b.room.lock() = 0;
        table.open("c", "s-c", 1000, 3000, 0).unwrap();
        let message = pb::SessionMessage {
            message: Some(pb::session_message::Message::ManagersChanged(
                pb::ManagersChanged::default(),
            )),
        };
        let room_a = *a.room.lock();
        let waiting = table.offer_all(&message);
        assert_eq!(waiting, vec![("b".to_string(), "s-b".to_string())]);
        assert_eq!(*a.room.lock(), room_a - 1, "a was sent the list");
        assert!(!table.offer("b", "s-b", &message), "still no room");
        *b.room.lock() = 1;
        assert!(table.offer("b", "s-b", &message));
        assert_eq!(*b.room.lock(), 0, "b was sent the list");
        assert!(
            !table.offer("c", "s-c", &message),
            "opening: offered again later"
        );
        assert!(
            table.offer("gone", "s-gone", &message),
            "no session: nothing to do"
        );
        assert!(table.offer("a", "old-session", &message));
    }

    #[test]
    fn changes_fan_out_to_the_sessions_of_their_nodes_only() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 1);
        let b = streaming(&mut table, "b", 1);
        table.stage_upsert(task("t1", "a"));
        table.stage_upsert(task("t2", "b"));
        table.stage_upsert(task("t3", "a"));
        table.stage_upsert(task("t4", "nobody"));
        table.stage_delete("b", "t0");
        assert!(table.commit(2, 0).is_empty());
        assert_eq!(a.sent.lock().len(), 1, "held for the batch");
        assert!(table.flush_due(100).is_empty());
        let a_sent = a.sent.lock().clone();
        let b_sent = b.sent.lock().clone();
        assert!(
            a_sent[0].complete && b_sent[0].complete,
            "complete sets first"
        );
        let ids = |m: &pb::Assignments| m.tasks.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&a_sent[1]), ["t1", "t3"]);
        assert!(a_sent[1].removed.is_empty() && !a_sent[1].complete);
        assert_eq!(ids(&b_sent[1]), ["t2"]);
        assert!(
            b_sent[1].removed.is_empty(),
            "b never held t0: nothing to remove"
        );
        assert_eq!((a_sent[1].version, b_sent[1].version), (2, 2));
    }

    #[test]
    fn a_change_the_complete_set_already_holds_is_not_sent_again() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 5);
        table.stage_upsert(task("t1", "a"));
        assert!(table.commit(5, 0).is_empty());
        assert!(table.flush_due(1000).is_empty());
        assert_eq!(a.sent.lock().len(), 1, "only the complete set");
    }

    #[test]
    fn changes_wait_for_credit_coalesced_and_a_session_too_far_behind_ends() {
        let mut table = watching_table();
        let stream = FakeStream::with_room(1);
        table.open("a", "s", 1000, 3000, 0).unwrap();
        assert!(
            table
                .attach("a", "s", stream.clone(), Vec::new(), 1)
                .is_ok()
        );
        for version in 2..5 {
            let mut t = task("t1", "a");
            Arc::make_mut(&mut t).desired_state = i32::try_from(version).unwrap();
            table.stage_upsert(t);
            assert!(table.commit(version, 0).is_empty());
        }
        assert!(table.flush_due(200).is_empty());
        assert_eq!(stream.sent.lock().len(), 1, "no credit: held back");
        *stream.room.lock() = 10;
        assert!(table.flush_pending(200).is_empty());
        let sent = stream.sent.lock().clone();
        assert_eq!(
            sent.len(),
            2,
            "three changes of one task coalesced into one message"
        );
        assert_eq!(sent[1].tasks[0].desired_state, 4, "the latest");
        // Without credit for good, the session ends past the bound.
        *stream.room.lock() = 0;
        for i in 0..=PENDING_TASKS_MAX {
            table.stage_upsert(task(&format!("x{i}"), "a"));
        }
        let ended = table.commit(10, 300);
        assert_eq!(ended.len(), 1);
        assert!(
            table.is_lingering("a", "s"),
            "it ends, and lingers until silent"
        );
    }

    #[test]
    fn a_silent_session_expires_and_one_heard_from_waits_again() {
        let mut table = watching_table();
        table.open("a", "s", 1000, 3000, 0).unwrap();
        table.touch("a", "s", 2000).unwrap();
        assert_eq!(table.check_deadline("a", "s", 3000).0, Deadline::Wait(2000));
        assert_eq!(table.check_deadline("a", "old", 9000).0, Deadline::Gone);
        assert_eq!(
            table.check_deadline("a", "s", 5000).0,
            Deadline::Expired(3000)
        );
        assert!(!table.has("a"));
        assert!(table.touch("a", "s", 5001).is_err(), "forgotten");
    }

    #[test]
    fn a_node_may_open_three_sessions_per_window() {
        let mut table: SessionTable<FakeStream> = watching_table();
        assert!(table.admit("a", 0).is_ok());
        assert!(table.admit("a", 1000).is_ok());
        assert!(table.admit("a", 2000).is_ok());
        assert_eq!(table.admit("a", 3000), Err(Duration::from_millis(5000)));
        assert!(table.admit("b", 3000).is_ok(), "per node");
        assert!(
            table.admit("a", 8000).is_ok(),
            "the first attempt left the window"
        );
        table.prune_attempts(100_000);
        assert!(table.attempts.is_empty());
    }

    #[test]
    fn sessions_open_only_while_watching_and_a_new_one_replaces_the_old() {
        let mut table: SessionTable<FakeStream> = SessionTable::new();
        assert!(table.open("a", "s1", 1000, 3000, 0).is_err());
        table.set_watching(true);
        let first = FakeStream::with_room(5);
        table.open("a", "s1", 1000, 3000, 0).unwrap();
        assert!(table.attach("a", "s1", first, Vec::new(), 1).is_ok());
        let replaced = table.open("a", "s2", 1000, 3000, 0).unwrap();
        assert!(
            replaced.is_some(),
            "the old stream is handed back to be ended"
        );
        assert!(table.is_current("a", "s2"));
        let late = FakeStream::with_room(5);
        assert!(table.attach("a", "s1", late, Vec::new(), 1).is_err());
    }

    #[test]
    fn a_closed_stream_lingers_until_replaced_or_expired() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 1);
        *a.cancelled.lock() = true;
        let closed = table.take_closed();
        assert_eq!(closed.len(), 1);
        assert!(table.is_lingering("a", "s-a"));
        assert!(table.take_closed().is_empty(), "reported once");
        table.stage_upsert(task("t", "a"));
        assert!(table.commit(2, 0).is_empty());
        assert!(table.flush_due(2000).is_empty());
        assert_eq!(a.sent.lock().len(), 1, "nothing sent to a closed stream");
    }

    fn with_desired(id: &str, node: &str, desired: i32) -> Arc<Task> {
        let mut t = task(id, node);
        Arc::make_mut(&mut t).desired_state = desired;
        t
    }

    #[test]
    fn changes_go_100_ms_after_the_last_one_and_at_most_1_s_after_the_first() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 1);
        table.stage_upsert(with_desired("t", "a", 1));
        assert!(table.commit(2, 0).is_empty());
        assert!(
            table.next_batch_due_ms().is_some_and(|at| at <= 100),
            "a lower bound of the deadline"
        );
        assert!(table.flush_due(99).is_empty());
        assert_eq!(a.sent.lock().len(), 1, "held until 100 ms passed");
        assert!(table.flush_due(100).is_empty());
        assert_eq!(a.sent.lock().len(), 2);

        // A change every 50 ms postpones the batch, but not past 1 s after the first.
        let mut version = 3;
        let mut now = 1000;
        let first = now;
        while now < first + 1000 {
            table.stage_upsert(with_desired("t", "a", i32::try_from(version).unwrap()));
            assert!(table.commit(version, now).is_empty());
            version += 1;
            now += 50;
            assert!(table.flush_due(now - 1).is_empty());
            if now < first + 1000 {
                assert_eq!(a.sent.lock().len(), 2, "still held at {now} ms");
            }
        }
        assert!(table.flush_due(first + 1000).is_empty());
        let sent = a.sent.lock().clone();
        assert_eq!(sent.len(), 3, "one message 1 s after the first change");
        assert_eq!(
            sent[2].tasks.len(),
            1,
            "twenty changes of one task, coalesced"
        );
        assert_eq!(
            sent[2].tasks[0].desired_state,
            i32::try_from(version - 1).unwrap()
        );
    }

    #[test]
    fn a_hundred_changes_go_at_once_and_larger_batches_in_chained_messages_of_100() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 1);
        for i in 0..99 {
            table.stage_upsert(task(&format!("t{i:03}"), "a"));
        }
        assert!(table.commit(2, 0).is_empty());
        assert_eq!(a.sent.lock().len(), 1, "99 held");
        table.stage_upsert(task("t099", "a"));
        assert!(table.commit(3, 0).is_empty());
        assert_eq!(a.sent.lock().len(), 2, "the 100th makes the batch due");
        for i in 100..350 {
            table.stage_upsert(task(&format!("t{i:03}"), "a"));
        }
        assert!(table.commit(4, 10).is_empty());
        let sent = a.sent.lock().clone();
        let sizes: Vec<usize> = sent[2..].iter().map(|m| m.tasks.len()).collect();
        assert_eq!(sizes, [100, 100, 50]);
        // Every message is chained to the one before it, from the complete set on.
        assert_eq!(sent[0].applies_to, "");
        for pair in sent.windows(2) {
            assert_eq!(pair[1].applies_to, pair[0].results_in);
            assert_ne!(pair[1].results_in, pair[0].results_in);
        }
        assert!(sent[1..].iter().all(|m| !m.complete && !m.more));
    }

    #[test]
    fn the_chain_has_no_gap_when_messages_wait_for_credit() {
        let mut table = watching_table();
        let stream = FakeStream::with_room(1);
        table.open("a", "s", 1000, 3000, 0).unwrap();
        assert!(
            table
                .attach("a", "s", stream.clone(), Vec::new(), 1)
                .is_ok()
        );
        for i in 0..250 {
            table.stage_upsert(task(&format!("t{i:03}"), "a"));
        }
        assert!(table.commit(2, 0).is_empty(), "built, but no credit");
        table.stage_upsert(with_desired("t000", "a", 5));
        assert!(table.commit(3, 50).is_empty());
        *stream.room.lock() = 1;
        assert!(table.flush_pending(200).is_empty());
        *stream.room.lock() = 10;
        assert!(table.flush_pending(300).is_empty());
        let sent = stream.sent.lock().clone();
        for pair in sent.windows(2) {
            assert_eq!(pair[1].applies_to, pair[0].results_in);
        }
        let mut delivered: BTreeMap<String, i32> = BTreeMap::new();
        for message in &sent[1..] {
            for t in &message.tasks {
                delivered.insert(t.id.clone(), t.desired_state);
            }
        }
        assert_eq!(
            delivered.len(),
            250,
            "every change delivered once the agent reads"
        );
        assert_eq!(
            delivered["t000"], 5,
            "the latest of a task waiting for credit"
        );
    }

    fn with_status(t: &Arc<Task>, state: TaskState, version: u64) -> Arc<Task> {
        let mut t = t.as_ref().clone();
        t.meta = Some(crate::proto::objects::Meta {
            version,
            ..Default::default()
        });
        t.status = Some(crate::proto::objects::TaskStatus {
            state: state as i32,
            message: format!("at {version}"),
            timestamp_ms: i64::try_from(version).unwrap(),
            ..Default::default()
        });
        Arc::new(t)
    }

    #[test]
    fn changes_the_agent_does_not_act_on_are_not_sent() {
        let mut table = watching_table();
        let stream = FakeStream::with_room(100);
        table.open("a", "s", 1000, 3000, 0).unwrap();
        let assigned = with_status(
            &with_desired("t", "a", TaskState::Running as i32),
            TaskState::Assigned,
            1,
        );
        let other = with_status(
            &with_desired("u", "a", TaskState::Running as i32),
            TaskState::Assigned,
            1,
        );
        assert!(
            table
                .attach(
                    "a",
                    "s",
                    stream.clone(),
                    vec![assigned.as_ref().clone(), other.as_ref().clone()],
                    1
                )
                .is_ok()
        );
        let mut now = 0;
        let mut step =
            |table: &mut SessionTable<FakeStream>, change: Option<Arc<Task>>, version: u64| {
                match change {
                    Some(t) => table.stage_upsert(t),
                    None => table.stage_delete("a", "gone"),
                }
                assert!(table.commit(version, now).is_empty());
                now += 2000;
                assert!(table.flush_due(now).is_empty());
                stream.sent.lock().len()
            };
        // The agent reports STARTING, RUNNING, then COMPLETE: the store's echoes of its own
        // reports (new meta, status message, timestamps) are not sent back.
        for (version, state) in [
            (2, TaskState::Starting),
            (3, TaskState::Running),
            (4, TaskState::Complete),
        ] {
            table.note_reported("a", "s", "t", state as i32);
            assert_eq!(
                step(
                    &mut table,
                    Some(with_status(&assigned, state, version)),
                    version
                ),
                1
            );
        }
        // A meta version bump alone: not sent.
        assert_eq!(
            step(
                &mut table,
                Some(with_status(&assigned, TaskState::Complete, 5)),
                5
            ),
            1
        );
        // A report on a stale session id teaches nothing: the manager's own terminal state
        // (ORPHANED, say) for a task the agent saw RUNNING at most is sent.
        table.note_reported("a", "stale", "u", TaskState::Complete as i32);
        assert_eq!(
            step(
                &mut table,
                Some(with_status(&other, TaskState::Orphaned, 6)),
                6
            ),
            2
        );
        // A desired state change is sent.
        let retired = with_desired("u", "a", TaskState::Shutdown as i32);
        assert_eq!(
            step(
                &mut table,
                Some(with_status(&retired, TaskState::Orphaned, 7)),
                7
            ),
            3
        );
        // The deletion of a task the agent never held: not sent; of one it holds: sent.
        assert_eq!(step(&mut table, None, 8), 3);
        table.stage_delete("a", "u");
        assert!(table.commit(9, now).is_empty());
        assert!(table.flush_due(now + 2000).is_empty());
        let sent = stream.sent.lock().clone();
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[3].removed, ["u"]);
    }
}
