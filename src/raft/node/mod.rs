//! The threads that drive the Raft core over the transport.
//!
//! ```text
//!             inputs (Step, Propose, Read, …)           committed entries, waiters
//!  rpc-raft-* ─────────────────────────────► raft-<id> ─────────────────────────► raft-apply-<id>
//!  NodeHandle ─────────────────────────────►   │  ▲  ◄──── snapshot created / restored ────┘
//!                                  AppendRequest│  │Durable
//!                                               ▼  │
//!                                        raft-log-writer
//!            raft-<id> ── raft.Step (direct lane, Channel::send_oneway) ──────────────────► peer
//!            raft-<id> ── messages ──► raft-peer-<peer> ── raft.Step / raft.InstallSnapshot ──► peer
//! ```
//!
//! - `raft-<id>` ([`raft_loop`]) owns the [`RaftCore`](crate::raft::core::RaftCore) and the
//!   storage handle: it ticks, steps inbound messages, proposes, submits each Ready's
//!   entries to the log writer (or, on an idle follower, writes and fsyncs them itself),
//!   sends messages to peers (itself over the direct lane, or through the peer threads)
//!   and hands committed entries to the apply thread (or applies a small batch itself
//!   when the apply thread is idle). Every wake-up of another thread costs tens of
//!   microseconds on a small virtual host, so the idle fast paths skip them.
//! - `raft-log-writer` (`raft::storage`) batches appends into one fsync each.
//! - `raft-peer-<peer>` ([`peer`]) sends one peer the messages the direct lane could not
//!   take (connection down, its queue not empty) and streams it snapshots chunk by chunk.
//! - `raft-apply-<id>` ([`apply`]) applies committed entries to the [`StateMachine`],
//!   answers proposals and reads, takes snapshots every N entries and restores received
//!   ones.
//!
//! Nothing is acknowledged before it is durable: the core holds back messages that depend
//! on persistence, and the apply thread only sees entries the core reports committed and
//! locally durable. Shutdown order: see [`RaftNode::shutdown`].

pub mod apply;
pub mod codec;
pub mod directory;
pub mod peer;
pub mod raft_loop;
pub mod service;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use parking_lot::Mutex;

use crate::net::Transport;
use crate::raft::core::{MembershipChange, RaftError, Role};
use crate::raft::storage::snapshot::SnapshotInfo;
use crate::raft::storage::{
    LogHandle, LogStore, Recovered, StorageConfig, StorageError, Watermark, WatermarkError,
    WatermarkRecord,
};
use crate::raft::types::{HardState, LogIndex, NodeId, Term};

pub use directory::Directory;

/// Inputs queued for the raft thread before senders are refused (RPC handlers) or block
/// (local callers).
pub const RAFT_INPUT_QUEUE_LEN_MAX: usize = 4096;
/// Batches of work queued for the apply thread; the raft thread blocks beyond it, which
/// stops heartbeats and so hands leadership to a healthier member.
pub const APPLY_QUEUE_LEN_MAX: usize = 1024;

/// How a member starts when its storage is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    /// The founder of a new cluster: the only voter at index 0.
    NewCluster,
    /// A member joining an existing cluster: no membership until the leader adds it.
    Join,
}

/// Tunables of one Raft member's runtime. Every timeout is a bound the node enforces.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This member's Raft id.
    pub id: NodeId,
    /// The address other members dial to reach this one.
    pub addr: String,
    /// What an empty storage means.
    pub bootstrap: Bootstrap,
    /// Length of one tick (default 100 ms).
    pub tick_ms: u64,
    /// Base election timeout in ticks (default 10: one second with the default tick).
    pub election_timeout_ticks: u32,
    /// Heartbeat interval in ticks (default 1).
    pub heartbeat_ticks: u32,
    /// Applied entries between automatic snapshots at start (default 10,000, like
    /// swarmkit); adjustable while running with
    /// [`NodeHandle::set_snapshot_interval_entries`].
    pub snapshot_interval_entries: u64,
    /// Bytes per snapshot chunk on the wire (default 1 MiB).
    pub snapshot_chunk_bytes: usize,
    /// Longest wait for one snapshot chunk to be sent or received (default 10 s); the
    /// transfer as a whole has no deadline.
    pub snapshot_chunk_timeout_ms: u64,
    /// Deadline of one `raft.Step` call (default 2 s).
    pub step_timeout_ms: u64,
    /// A leader whose state machine has not applied a committed entry for this long hands
    /// leadership over (default 10 s): swarmkit's wedged-leader problem.
    pub apply_stall_ms_max: u64,
    /// Storage tunables.
    pub storage: StorageConfig,
    /// Whether the storage's watermark must exist (managers: `init` and `join` create it,
    /// so its absence means the state directory lost files). Default `false`: a missing
    /// watermark is created when the storage is empty (a new member), and is damage
    /// otherwise.
    pub watermark_required: bool,
}

impl NodeConfig {
    /// Defaults for member `id` reachable at `addr`.
    pub fn new(id: NodeId, addr: String, bootstrap: Bootstrap) -> Self {
        Self {
            id,
            addr,
            bootstrap,
            tick_ms: 100,
            election_timeout_ticks: 10,
            heartbeat_ticks: 1,
            snapshot_interval_entries: 10_000,
            snapshot_chunk_bytes: 1 << 20,
            snapshot_chunk_timeout_ms: 10_000,
            step_timeout_ms: 2_000,
            apply_stall_ms_max: 10_000,
            storage: StorageConfig::default(),
            watermark_required: false,
        }
    }

    /// One election timeout, in wall-clock time.
    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.tick_ms * u64::from(self.election_timeout_ticks))
    }
}

/// The application's replicated state machine, driven by the apply thread (or by the raft
/// thread for a small batch when the apply thread is idle: one at a time, in log order).
pub trait StateMachine: Send + 'static {
    /// Applies the committed command `data` at `index` and returns the reply for whoever
    /// proposed it. Must be deterministic: every member applies the same commands in the
    /// same order and must reach the same state.
    fn apply(&mut self, index: LogIndex, data: &[u8]) -> Bytes;

    /// Captures the state as of the last applied entry and returns a writer that streams
    /// it. Capturing must be cheap (shared pointers, or a shallow clone): it runs on the
    /// apply thread. The writer runs on the `raft-snapshot-<id>` thread while apply goes
    /// on, so a large state never stalls the cluster (swarmkit marshalled its whole store
    /// under the apply lock).
    fn snapshot(&mut self) -> SnapshotWriter;

    /// Replaces the whole state with what `input` holds. On error the state must be left
    /// as it was (build aside, then swap).
    ///
    /// # Errors
    /// IO errors, or `InvalidData` for content that does not parse.
    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()>;

    /// Gives back memory kept only to serve a burst, once nothing was applied for
    /// [`apply::MEMORY_RELEASE_IDLE_AFTER`] (then the allocator's free memory is returned to
    /// the system). Must not change what `apply` or `snapshot` produce. Nothing by default.
    fn release_idle_memory(&mut self) {}
}

/// Streams a captured state into a snapshot file (see [`StateMachine::snapshot`]).
///
/// # Errors
/// IO errors from the output.
pub type SnapshotWriter = Box<dyn FnOnce(&mut dyn Write) -> std::io::Result<()> + Send>;

/// Why a proposal, read or membership call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// This member is not the leader; retry on `leader_addr` if known.
    #[error("this manager is not the leader (the leader is {})", leader_addr.as_deref().unwrap_or("not known yet"))]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's address, if known.
        leader_addr: Option<String>,
    },
    /// The core refused the call for another reason (too large, invalid change).
    #[error("{0}")]
    Refused(String),
    /// A passing condition refused the call and nothing was done: a leadership transfer or
    /// membership change in progress, too many uncommitted proposals, the leader out of
    /// reach. Retry shortly ([`crate::wire::RETRY_SOON`]).
    #[error("{0}; retry in a moment")]
    RetrySoon(String),
    /// The entry was overwritten by a new leader before it committed: it did not happen.
    /// Retrying is safe.
    #[error("the proposal was lost in a leader change; retry")]
    Lost,
    /// No answer within the caller's deadline: the proposal may or may not commit.
    #[error("no answer within the deadline; the outcome is unknown")]
    Timeout,
    /// The node is stopping or stopped.
    #[error("this manager is shutting down; call another manager")]
    ShuttingDown,
    /// Storage failed; the node is stopping.
    #[error("storage failed: {0}")]
    Storage(String),
}

impl NodeError {
    fn from_core(error: RaftError, directory: &Directory) -> Self {
        match error {
            RaftError::NotLeader { leader } => NodeError::NotLeader {
                leader,
                leader_addr: leader.and_then(|id| directory.addr(id)),
            },
            RaftError::ShuttingDown => NodeError::ShuttingDown,
            // Ids in hex, as `manager ls` prints them.
            RaftError::TransferInProgress { target } => {
                NodeError::RetrySoon(format!("leadership is being handed to manager {target:x}"))
            }
            transient @ (RaftError::MembershipChangeInProgress
            | RaftError::UncommittedLimit { .. }) => NodeError::RetrySoon(transient.to_string()),
            other => NodeError::Refused(other.to_string()),
        }
    }

    /// The transport status for this error: a NotLeader refusal names the leader in its
    /// details ([`crate::wire::Reason::NotLeader`]) so that clients can follow it; refusals
    /// that an election or a moment's wait fixes carry the reason
    /// [`crate::wire::RETRY_SOON`]; a proposal whose outcome is unknown (a timeout, a node
    /// that stopped while it waited) carries [`crate::wire::Reason::OutcomeUnknown`].
    pub fn to_status(&self) -> crate::wire::Status {
        use crate::wire::{Code, Status};
        match self {
            NodeError::NotLeader {
                leader,
                leader_addr,
            } => Status::not_leader(
                Code::FailedPrecondition,
                self.to_string(),
                *leader,
                leader_addr.clone(),
            ),
            NodeError::Refused(_) => Status::new(Code::FailedPrecondition, self.to_string()),
            NodeError::RetrySoon(_) => Status::retry_soon(Code::Unavailable, self.to_string()),
            // The entry was replaced by a new leader's: it never took effect.
            NodeError::Lost => Status::retry_soon(Code::Aborted, self.to_string()),
            NodeError::Timeout => Status::outcome_unknown(Code::DeadlineExceeded, self.to_string()),
            // A proposal waiting when the node stopped may still commit elsewhere.
            NodeError::ShuttingDown => Status::outcome_unknown(Code::Unavailable, self.to_string()),
            NodeError::Storage(_) => Status::new(Code::Internal, self.to_string()),
        }
    }
}

/// Decides whether the node whose certificate names `node_id` may add a new member to the
/// group through `raft.Join` (the application's rule; e.g. a manager demoted to worker may
/// not come back until it is promoted). The error is the reason, shown to the caller.
pub type JoinGate = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Called once with the outcome of a proposal: the state machine's reply once applied.
pub type ProposalCallback = Box<dyn FnOnce(Result<Bytes, NodeError>) + Send>;
/// Called once when a linearizable read may be served (the index is applied locally).
pub type ReadCallback = Box<dyn FnOnce(Result<LogIndex, NodeError>) + Send>;

/// What the raft thread is asked to do.
pub(crate) enum Input {
    Step(Vec<crate::raft::core::Message>),
    Propose {
        data: Bytes,
        done: ProposalCallback,
    },
    ProposeMembership {
        change: MembershipChange,
        done: ProposalCallback,
    },
    /// `apply`: wait until the read index is applied locally before calling `done`.
    ReadIndex {
        apply: bool,
        done: ReadCallback,
    },
    Transfer {
        target: NodeId,
        done: Box<dyn FnOnce(Result<(), NodeError>) + Send>,
    },
    Status {
        done: Box<dyn FnOnce(NodeStatus) + Send>,
    },
    /// A peer told us we were removed from the group.
    Removed,
}

/// One member as seen by this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its Raft id.
    pub id: NodeId,
    /// Its address, if known.
    pub addr: Option<String>,
    /// `leader`, `follower` or `learner`.
    pub role: &'static str,
    /// Leader only: it answered recently.
    pub reachable: bool,
    /// Time since a message from it last arrived, in ms (0 for this member, `u64::MAX` if never).
    pub last_contact_ms: u64,
    /// Leader only: highest index known replicated to it.
    pub match_index: LogIndex,
    /// A problem the operator should know (e.g. snapshot transfers failing).
    pub problem: Option<String>,
}

/// A snapshot of the node's state for operators.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeStatus {
    /// This member.
    pub id: NodeId,
    /// The known leader.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: Term,
    /// Commit index.
    pub commit: LogIndex,
    /// Applied index.
    pub applied: LogIndex,
    /// Every voter and learner.
    pub members: Vec<MemberStatus>,
    /// True once this member is the leader.
    pub is_leader: bool,
}

/// State shared by the node's threads and handles.
pub(crate) struct Shared {
    pub(crate) config: NodeConfig,
    pub(crate) directory: Directory,
    pub(crate) applied: AtomicU64,
    pub(crate) leader: AtomicU64,
    pub(crate) stopped: AtomicBool,
    pub(crate) latest_snapshot: Mutex<Option<SnapshotInfo>>,
    /// Problems per peer (failed snapshot transfers), shown by `manager ls`.
    pub(crate) peer_problems: Mutex<std::collections::BTreeMap<NodeId, String>>,
    /// Set when a fatal error or removal stopped the node; the reason.
    pub(crate) fatal: Mutex<Option<String>>,
    /// A snapshot file received and verified by `raft.InstallSnapshot`, waiting for the
    /// core to install it.
    pub(crate) received_snapshot: Mutex<Option<SnapshotInfo>>,
    /// Ids removed from the group, as the raft thread last saw them: their messages are
    /// answered with "you were removed".
    pub(crate) removed_ids: Mutex<std::collections::BTreeSet<NodeId>>,
    /// Applied entries between automatic snapshots, as currently in force (starts at
    /// `config.snapshot_interval_entries`; read by the apply thread after every batch).
    pub(crate) snapshot_interval_entries: AtomicU64,
    /// Set when a peer told this member it was removed from the group.
    pub(crate) removed: AtomicBool,
    /// The application's rule for `raft.Join` callers, if it set one.
    pub(crate) join_gate: parking_lot::RwLock<Option<JoinGate>>,
}

/// A clonable handle to a running node: propose, read, change membership, inspect.
#[derive(Clone)]
pub struct NodeHandle {
    inputs: Sender<Input>,
    shared: Arc<Shared>,
}

impl NodeHandle {
    fn send(&self, input: Input) -> Result<(), NodeError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(NodeError::ShuttingDown);
        }
        self.inputs.send(input).map_err(|_| NodeError::ShuttingDown)
    }

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.shared.config.id
    }

    /// The member directory.
    pub fn directory(&self) -> &Directory {
        &self.shared.directory
    }

    /// The address this member advertises.
    pub fn directory_own_addr(&self) -> String {
        self.shared.config.addr.clone()
    }

    /// The leader this member knows of.
    pub fn leader(&self) -> Option<NodeId> {
        match self.shared.leader.load(Ordering::Acquire) {
            0 => None,
            id => Some(id),
        }
    }

    /// The highest index applied locally.
    pub fn applied(&self) -> LogIndex {
        self.shared.applied.load(Ordering::Acquire)
    }

    /// Why the node stopped by itself (storage failure, removal), if it did.
    pub fn fatal(&self) -> Option<String> {
        self.shared.fatal.lock().clone()
    }

    /// True once a peer told this member it was removed from the group (the node then
    /// stops with [`NodeHandle::fatal`] set).
    pub fn was_removed(&self) -> bool {
        self.shared.removed.load(Ordering::Acquire)
    }

    /// Sets the rule `raft.Join` applies to the caller before adding a new member.
    pub fn set_join_gate(&self, gate: JoinGate) {
        *self.shared.join_gate.write() = Some(gate);
    }

    /// Applied entries between automatic snapshots, as currently in force.
    pub fn snapshot_interval_entries(&self) -> u64 {
        self.shared
            .snapshot_interval_entries
            .load(Ordering::Acquire)
    }

    /// Changes the number of applied entries between automatic snapshots; the apply
    /// thread uses it from its next batch on (a lower value than the entries applied since
    /// the last snapshot takes one at once). Returns the previous value.
    ///
    /// # Panics
    /// If `entries` is 0 (the log would never be compacted; callers validate first).
    pub fn set_snapshot_interval_entries(&self, entries: u64) -> u64 {
        assert!(
            entries > 0,
            "a snapshot interval of 0 entries is refused by validation"
        );
        self.shared
            .snapshot_interval_entries
            .swap(entries, Ordering::AcqRel)
    }

    /// Proposes application `data`; `done` runs (on the apply or raft thread) with the state
    /// machine's reply once the entry is applied here, or with an error. It must not block.
    pub fn propose_with(&self, data: &[u8], done: ProposalCallback) {
        self.send_or_fail(Input::Propose {
            data: directory::encode_app(data),
            done,
        });
    }

    /// Queues `input` for the raft thread without waiting; when it cannot be queued, its
    /// callback runs here: a full queue is a refusal to retry in a moment (nothing was
    /// done), a closed one means the node stopped.
    fn send_or_fail(&self, input: Input) {
        match self.inputs.try_send(input) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(input)) => raft_loop::fail_input_with(
                input,
                &NodeError::RetrySoon(format!(
                    "this manager's Raft thread has {RAFT_INPUT_QUEUE_LEN_MAX} inputs queued"
                )),
            ),
            Err(crossbeam_channel::TrySendError::Disconnected(input)) => {
                raft_loop::fail_input_with(input, &NodeError::ShuttingDown);
            }
        }
    }

    /// Proposes `data` and blocks until it is applied locally (the state machine's reply),
    /// or fails.
    ///
    /// # Errors
    /// [`NodeError`]; [`NodeError::Timeout`] leaves the outcome unknown.
    pub fn propose(&self, data: &[u8], timeout: Duration) -> Result<Bytes, NodeError> {
        self.call(
            |done| Input::Propose {
                data: directory::encode_app(data),
                done,
            },
            timeout,
        )?
    }

    /// Records in the replicated directory that `id` is reachable at `addr`.
    ///
    /// # Errors
    /// As [`NodeHandle::propose`].
    pub fn propose_member_addr(
        &self,
        id: NodeId,
        addr: &str,
        timeout: Duration,
    ) -> Result<(), NodeError> {
        let data = directory::encode_member_addr(id, addr);
        self.call(|done| Input::Propose { data, done }, timeout)??;
        Ok(())
    }

    /// Proposes a membership change and waits until it is applied locally.
    ///
    /// # Errors
    /// As [`NodeHandle::propose`].
    pub fn change_membership(
        &self,
        change: MembershipChange,
        timeout: Duration,
    ) -> Result<(), NodeError> {
        self.call(|done| Input::ProposeMembership { change, done }, timeout)??;
        Ok(())
    }

    /// Leader only: confirms leadership and returns the read index (without waiting for
    /// local application). Followers use it through `raft.ReadIndex`.
    ///
    /// # Errors
    /// [`NodeError::NotLeader`], [`NodeError::Timeout`], [`NodeError::ShuttingDown`].
    pub fn read_index(&self, timeout: Duration) -> Result<LogIndex, NodeError> {
        self.read(false, timeout)
    }

    /// Leader only: blocks until a linearizable read may be served from local state.
    ///
    /// # Errors
    /// As [`NodeHandle::read_index`].
    pub fn read_barrier_local(&self, timeout: Duration) -> Result<LogIndex, NodeError> {
        self.read(true, timeout)
    }

    /// Leader only: [`NodeHandle::read_barrier_local`] without waiting: `done` runs once,
    /// on the raft or apply thread (so it must not block), when a linearizable read may be
    /// served from local state, or with the failure (not leader, lost the lead, shutting
    /// down). No deadline: a leader that cannot reach a quorum steps down, which fails it.
    pub fn read_barrier_local_with(&self, done: ReadCallback) {
        self.send_or_fail(Input::ReadIndex { apply: true, done });
    }

    fn read(&self, apply: bool, timeout: Duration) -> Result<LogIndex, NodeError> {
        self.call(|done| Input::ReadIndex { apply, done }, timeout)?
    }

    /// Blocks until this member has applied `index`, or `deadline`.
    ///
    /// # Errors
    /// [`NodeError::Timeout`].
    pub fn wait_applied(&self, index: LogIndex, deadline: Instant) -> Result<(), NodeError> {
        while self.applied() < index {
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout);
            }
            if self.shared.stopped.load(Ordering::Acquire) {
                return Err(NodeError::ShuttingDown);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Hands leadership to `target` and waits until it holds it.
    ///
    /// # Errors
    /// [`NodeError`] from the core, or [`NodeError::Timeout`].
    pub fn transfer_leadership(&self, target: NodeId, timeout: Duration) -> Result<(), NodeError> {
        self.call(|done| Input::Transfer { target, done }, timeout)??;
        let deadline = Instant::now() + timeout;
        while self.leader() != Some(target) {
            if Instant::now() >= deadline {
                return Err(NodeError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The node's view of the group.
    ///
    /// # Errors
    /// [`NodeError::ShuttingDown`] or [`NodeError::Timeout`].
    pub fn status(&self, timeout: Duration) -> Result<NodeStatus, NodeError> {
        self.call(|done| Input::Status { done }, timeout)
    }

    /// The node's view of the group, handed to `done` by the raft thread (which must not be
    /// blocked by it): nobody waits, and a full input queue refuses at once.
    ///
    /// # Errors
    /// [`NodeError::RetrySoon`] when the input queue is full, [`NodeError::ShuttingDown`].
    pub fn status_with(&self, done: Box<dyn FnOnce(NodeStatus) + Send>) -> Result<(), NodeError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(NodeError::ShuttingDown);
        }
        match self.inputs.try_send(Input::Status { done }) {
            Ok(()) => Ok(()),
            Err(crossbeam_channel::TrySendError::Full(_)) => Err(NodeError::RetrySoon(
                "the raft thread's input queue is full".into(),
            )),
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => Err(NodeError::ShuttingDown),
        }
    }

    /// Sends the input `make` builds around a one-shot callback, and waits until `timeout`
    /// for the value the callback receives.
    fn call<T: Send + 'static>(
        &self,
        make: impl FnOnce(Box<dyn FnOnce(T) + Send>) -> Input,
        timeout: Duration,
    ) -> Result<T, NodeError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.send(make(Box::new(move |value| {
            let _ = tx.send(value);
        })))?;
        rx.recv_timeout(timeout).map_err(|_| NodeError::Timeout)
    }

    pub(crate) fn inputs(&self) -> &Sender<Input> {
        &self.inputs
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    /// Storage could not be opened or recovered.
    #[error("raft storage: {0}")]
    Storage(#[from] StorageError),
    /// Storage opened, but holds less than this member made durable (or its watermark is
    /// gone): starting would lose what it acknowledged, so it did not start.
    #[error(
        "the Raft state in {} is damaged: {problem}; the node did not start, so that \
         nothing it acknowledged is lost",
        dir.display()
    )]
    Damaged {
        /// The Raft storage directory.
        dir: std::path::PathBuf,
        /// What falls short, in the operator's terms.
        problem: String,
        /// What the watermark recorded, if it could be read.
        recorded: Option<WatermarkRecord>,
    },
    /// The snapshot could not be restored into the state machine.
    #[error("cannot restore snapshot {path}: {source}")]
    Restore {
        /// The snapshot file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A thread could not be spawned.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        /// The thread.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running Raft member: its threads and the handle to reach them.
pub struct RaftNode {
    handle: NodeHandle,
    store: LogStore,
    raft_thread: Option<JoinHandle<()>>,
    stop: Option<Sender<()>>,
}

impl RaftNode {
    /// Opens storage under `dir`, restores the newest snapshot into `state_machine`, and
    /// starts the raft, apply and log-writer threads. Peer threads start as members
    /// appear. Messages go out through `transport` with `client_tls`.
    ///
    /// # Errors
    /// [`NodeStartError`].
    pub fn start(
        config: NodeConfig,
        dir: &std::path::Path,
        state_machine: Box<dyn StateMachine>,
        transport: Arc<Transport>,
        client_tls: Arc<rustls::ClientConfig>,
    ) -> Result<RaftNode, NodeStartError> {
        let (store, recovered) = LogStore::open(dir, &config.storage)?;
        let watermark = open_watermark(dir, &config, &recovered, &store)?;
        for problem in &recovered.corrupt_snapshots {
            log::error!(
                "raft {:x}: ignored a corrupt snapshot: {problem}",
                config.id
            );
        }
        let shared = Arc::new(Shared {
            config: config.clone(),
            directory: Directory::default(),
            applied: AtomicU64::new(0),
            leader: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            latest_snapshot: Mutex::new(recovered.snapshot.clone()),
            peer_problems: Mutex::new(Default::default()),
            fatal: Mutex::new(None),
            received_snapshot: Mutex::new(None),
            removed_ids: Mutex::new(Default::default()),
            snapshot_interval_entries: AtomicU64::new(config.snapshot_interval_entries.max(1)),
            removed: AtomicBool::new(false),
            join_gate: parking_lot::RwLock::new(None),
        });
        let (mut log, writer_events) =
            LogHandle::start(store.clone(), &recovered, &config.storage)?;
        log.keep_watermark(watermark);
        let (inputs_tx, inputs_rx) = crossbeam_channel::bounded(RAFT_INPUT_QUEUE_LEN_MAX);
        let (stop_tx, stop_rx) = crossbeam_channel::bounded(0);
        let handle = NodeHandle {
            inputs: inputs_tx,
            shared: shared.clone(),
        };
        let setup = raft_loop::Setup {
            shared,
            store: store.clone(),
            recovered,
            log,
            writer_events,
            inputs: inputs_rx,
            stop: stop_rx,
            handle: handle.clone(),
            state_machine,
            transport,
            client_tls,
        };
        let name = format!("raft-{:x}", config.id);
        let ready = raft_loop::prepare(setup)?;
        let raft_thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || ready.run())
            .map_err(|source| NodeStartError::Thread { name, source })?;
        Ok(RaftNode {
            handle,
            store,
            raft_thread: Some(raft_thread),
            stop: Some(stop_tx),
        })
    }

    /// The handle to this node.
    pub fn handle(&self) -> &NodeHandle {
        &self.handle
    }

    /// The node's log store (snapshot files for `raft.InstallSnapshot`).
    pub fn store(&self) -> LogStore {
        self.store.clone()
    }

    /// Receives nothing; exists so callers can wait for a node that stops by itself.
    pub fn stopped(&self) -> bool {
        self.handle.shared.stopped.load(Ordering::Acquire)
    }

    /// The shutdown barrier: the raft thread refuses new work, stops its peer threads
    /// (joined), stops the apply thread after it applied what it was given (joined), then
    /// lets the log writer finish what was submitted and joins it; then it exits and is
    /// joined here. Waiting callers get [`NodeError::ShuttingDown`].
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.raft_thread.take()
            && thread.join().is_err()
        {
            log::error!("the raft thread panicked");
        }
    }
}

impl Drop for RaftNode {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Opens the watermark of the storage in `dir` and checks `recovered` against it; creates
/// it for a new member (empty storage) unless `config.watermark_required`.
fn open_watermark(
    dir: &std::path::Path,
    config: &NodeConfig,
    recovered: &Recovered,
    store: &LogStore,
) -> Result<Watermark, NodeStartError> {
    let damaged = |problem: String, recorded: Option<WatermarkRecord>| NodeStartError::Damaged {
        dir: dir.to_path_buf(),
        problem,
        recorded,
    };
    let is_empty = recovered.bounds.last_index == 0
        && recovered.snapshot.is_none()
        && recovered.hard_state == HardState::default();
    let watermark = match Watermark::open(dir) {
        Ok(watermark) => watermark,
        Err(WatermarkError::Missing(_)) if is_empty && !config.watermark_required => {
            return Watermark::create(dir, config.id)
                .map_err(|e| damaged(format!("cannot create the watermark: {e}"), None));
        }
        Err(WatermarkError::Missing(path)) => {
            return Err(damaged(
                format!(
                    "{} is missing: nothing says how much of the log must be there",
                    path.display()
                ),
                None,
            ));
        }
        Err(e) => return Err(damaged(e.to_string(), None)),
    };
    watermark
        .check(config.id, recovered, store)
        .map_err(|shortfall| damaged(shortfall.to_string(), Some(watermark.record())))?;
    Ok(watermark)
}

pub(crate) fn role_name(role: Role) -> &'static str {
    match role {
        Role::Leader => "leader",
        Role::Follower => "follower",
        Role::PreCandidate | Role::Candidate => "candidate",
    }
}
