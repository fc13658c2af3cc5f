//! The dispatcher's session table: every agent session of this leader as state, not as a
//! thread. Owns, per node: the session id, when it was last heard from, its stream (while
//! the agent reads it), the assignments waiting for flow-control credit (coalesced: the
//! latest of each task), and the version its agent is up to; the fan-out of the one store
//! watch's task changes to sessions by node id; the registration rate limit.
//!
//! Pure: no clock (callers pass `now_ms` from one monotonic origin), no thread, no store.
//! Must never block: a stream is only written with `try_send`, and a session whose agent
//! does not read falls behind only up to [`PENDING_TASKS_MAX`] before it is ended (its
//! agent opens a new one and receives a complete set).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::proto::dispatcher as pb;
use crate::proto::objects::Task;
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
}

impl<S> Session<S> {
    fn pending(&self) -> bool {
        !self.outbox.is_empty() || !self.changed.is_empty() || !self.removed.is_empty()
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
        }
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
            },
        );
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
        session.outbox = super::assignment_parts(true, tasks, Vec::new(), version).into();
        session.outbox_complete = true;
        session.version = version;
        session.stream = Some(stream);
        match flush(session) {
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
    /// streaming sessions (those whose complete set predates it) and sends what each agent
    /// has room for. Returns the sessions that ended (stream ended, or fell too far
    /// behind): their node ids and streams.
    pub fn commit(&mut self, version: u64) -> Vec<Ended<S>> {
        let mut touched: Vec<String> = Vec::new();
        for (node_id, change) in self.staged.drain(..) {
            let Some(session) = self.sessions.get_mut(&node_id) else {
                continue;
            };
            if session.stream.is_none() || session.version >= version {
                continue; // opening, lingering, or its complete set already holds it
            }
            match change {
                StagedChange::Upsert(task) => {
                    session.removed.remove(&task.id);
                    session
                        .changed
                        .insert(task.id.clone(), task.as_ref().clone());
                }
                StagedChange::Delete(task_id) => {
                    session.changed.remove(&task_id);
                    session.removed.insert(task_id);
                }
            }
            if touched.last() != Some(&node_id) {
                touched.push(node_id);
            }
        }
        for node_id in &touched {
            if let Some(session) = self.sessions.get_mut(node_id) {
                session.version = version;
            }
        }
        touched.dedup();
        self.flush_nodes(touched)
    }

    /// Sends what every session holding back assignments has room for now (credit came
    /// back). Returns the sessions that ended, as [`SessionTable::commit`] does.
    pub fn flush_pending(&mut self) -> Vec<Ended<S>> {
        let waiting: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.stream.is_some() && s.pending())
            .map(|(node_id, _)| node_id.clone())
            .collect();
        self.flush_nodes(waiting)
    }

    fn flush_nodes(&mut self, node_ids: Vec<String>) -> Vec<Ended<S>> {
        let mut ended = Vec::new();
        for node_id in node_ids {
            let Some(session) = self.sessions.get_mut(&node_id) else {
                continue;
            };
            if let Err(status) = flush(session) {
                let stream = session.stream.take();
                linger(session);
                ended.push((node_id, session.id.clone(), stream, status));
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
        mut tasks_of: impl FnMut(&str) -> Vec<Task>,
    ) -> Vec<Ended<S>> {
        self.staged.clear();
        let mut streaming = Vec::new();
        for (node_id, session) in &mut self.sessions {
            if session.stream.is_some() {
                session.changed.clear();
                session.removed.clear();
                session.outbox =
                    super::assignment_parts(true, tasks_of(node_id), Vec::new(), version).into();
                session.outbox_complete = true;
                session.version = version;
                streaming.push(node_id.clone());
            }
        }
        self.flush_nodes(streaming)
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
        let stream = self.sessions.remove(node_id).and_then(|s| s.stream);
        (Deadline::Expired(silent_ms), stream)
    }

    /// Forgets `session_id` if it is still `node_id`'s session; returns its stream.
    pub fn remove(&mut self, node_id: &str, session_id: &str) -> Option<S> {
        if self.is_current(node_id, session_id) {
            return self.sessions.remove(node_id).and_then(|s| s.stream);
        }
        None
    }

    /// Ends every session (this manager stops leading or shuts down): their streams.
    pub fn clear(&mut self) -> Vec<S> {
        self.staged.clear();
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
}

/// Sends the session's outbox, then its coalesced changes, while the agent has room.
fn flush<S: SessionSink>(session: &mut Session<S>) -> Result<(), Status> {
    let Some(stream) = session.stream.as_ref() else {
        return Ok(());
    };
    loop {
        if session.outbox.is_empty() && (!session.changed.is_empty() || !session.removed.is_empty())
        {
            let changed: Vec<Task> = std::mem::take(&mut session.changed).into_values().collect();
            let removed: Vec<String> = std::mem::take(&mut session.removed).into_iter().collect();
            session.outbox =
                super::assignment_parts(false, changed, removed, session.version).into();
        }
        let Some(part) = session.outbox.front() else {
            return Ok(());
        };
        let message = pb::SessionMessage {
            message: Some(pb::session_message::Message::Assignments(part.clone())),
        };
        if !stream.try_send(&message)? {
            break;
        }
        session.outbox.pop_front();
        if session.outbox.is_empty() {
            session.outbox_complete = false;
        }
    }
    if !session.outbox_complete {
        // Changes built into messages that could not go yet: back to the pending ones, so
        // that later changes of the same tasks coalesce with them.
        unbuild(session);
    }
    if session.changed.len() + session.removed.len() > PENDING_TASKS_MAX
        || session.outbox.len() > OUTBOX_MESSAGES_MAX
    {
        return Err(Status::unavailable(
            "the agent did not read its assignments fast enough; open a new session for a \
             complete set",
        ));
    }
    Ok(())
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
    fn changes_fan_out_to_the_sessions_of_their_nodes_only() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 1);
        let b = streaming(&mut table, "b", 1);
        table.stage_upsert(task("t1", "a"));
        table.stage_upsert(task("t2", "b"));
        table.stage_upsert(task("t3", "a"));
        table.stage_upsert(task("t4", "nobody"));
        table.stage_delete("b", "t0");
        assert!(table.commit(2).is_empty());
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
        assert_eq!(b_sent[1].removed, ["t0"]);
        assert_eq!((a_sent[1].version, b_sent[1].version), (2, 2));
    }

    #[test]
    fn a_change_the_complete_set_already_holds_is_not_sent_again() {
        let mut table = watching_table();
        let a = streaming(&mut table, "a", 5);
        table.stage_upsert(task("t1", "a"));
        assert!(table.commit(5).is_empty());
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
            Arc::make_mut(&mut t).slot = version;
            table.stage_upsert(t);
            assert!(table.commit(version).is_empty());
        }
        assert_eq!(stream.sent.lock().len(), 1, "no credit: held back");
        *stream.room.lock() = 10;
        assert!(table.flush_pending().is_empty());
        let sent = stream.sent.lock().clone();
        assert_eq!(
            sent.len(),
            2,
            "three changes of one task coalesced into one message"
        );
        assert_eq!(sent[1].tasks[0].slot, 4, "the latest");
        // Without credit for good, the session ends past the bound.
        *stream.room.lock() = 0;
        for i in 0..=PENDING_TASKS_MAX {
            table.stage_upsert(task(&format!("x{i}"), "a"));
        }
        let ended = table.commit(10);
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
        assert!(table.commit(2).is_empty());
        assert_eq!(a.sent.lock().len(), 1, "nothing sent to a closed stream");
    }
}
