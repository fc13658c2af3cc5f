//! [`RaftCore`]: one member's Raft state machine, driven by inputs and drained through
//! [`Ready`].
//!
//! It owns the term, vote, role, log cursors, membership history, peer progress, pending
//! reads and held-back messages. It must never touch a clock, a file, a socket or a thread,
//! and never let out a message whose claim (a vote, an acknowledgement) is not yet durable.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::config::Config;
use super::error::RaftError;
use super::log::RaftLog;
use super::membership::{self, MembershipChange};
use super::message::{Message, MessageBody, RejectHint, entries_bytes};
use super::progress::{Progress, ReplicationState};
use crate::raft::types::{
    Entry, EntryKind, HardState, LogIndex, Membership, NO_NODE, NodeId, SnapshotMeta, Term,
};

/// Payload bytes of committed entries handed out per [`Ready`]; the rest follow in the next.
pub const APPLY_BATCH_BYTES_MAX: u64 = 8 * 1024 * 1024;
/// Heartbeat rounds remembered for lease accounting; older rounds no longer extend the lease.
pub const ROUNDS_TRACKED_MAX: usize = 64;
/// Ticks a leader may go without any durable progress on its own log (while entries wait)
/// before its lease is void; a stall of an election timeout makes it step down.
pub const LEASE_DISK_STALL_TICKS_MAX: u32 = 2;

/// The role a member plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes; the term has not changed.
    PreCandidate,
    /// Asking for votes in a new term.
    Candidate,
    /// Leads the current term.
    Leader,
}

/// Volatile state reported when it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// Current role.
    pub role: Role,
    /// Known leader, if any.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: Term,
}

/// A confirmed linearizable read: once the state machine has applied `index`, the read
/// identified by `ctx` may be served from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The caller's read identifier.
    pub ctx: u64,
    /// Apply at least up to here before serving the read.
    pub index: LogIndex,
}

/// The index and term a proposal was appended at. It is committed if an entry with the same
/// index *and term* is applied; another term at that index means it was lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Proposed {
    /// Log position.
    pub index: LogIndex,
    /// Leader term.
    pub term: Term,
}

/// Everything the node layer must do next. Order of handling: install `snapshot` (storage and
/// state machine), persist `entries` and `hard_state` (the hard state durable no later than
/// the entries: one batch), send `messages` (any time: those that depended on persistence
/// were held back until it was reported), apply `committed_entries` in order, then serve
/// `read_states` once applied.
#[derive(Debug, Default)]
pub struct Ready {
    /// A received snapshot to install; report with [`RaftCore::on_snapshot_installed`].
    pub snapshot: Option<SnapshotMeta>,
    /// Entries to persist; the first may overwrite (truncate) a previously written suffix.
    /// Report with [`RaftCore::on_entries_persisted`].
    pub entries: Vec<Entry>,
    /// Hard state to persist; report with [`RaftCore::on_hard_state_persisted`]. Set when
    /// the term or vote changed, or with entries; a new commit index alone waits for those.
    pub hard_state: Option<HardState>,
    /// Messages to send now. A `Snapshot` message asks the node layer to stream the snapshot
    /// it describes to `to`.
    pub messages: Vec<Message>,
    /// Committed, locally durable entries to apply, in order.
    pub committed_entries: Vec<Entry>,
    /// Reads confirmed since the last Ready.
    pub read_states: Vec<ReadState>,
    /// New role / leader / term, if changed.
    pub soft_state: Option<SoftState>,
}

/// What a member starts from: its durable state.
#[derive(Clone, Debug, Default)]
pub struct InitialState {
    /// The durable hard state.
    pub hard_state: HardState,
    /// The durable snapshot; for a new cluster: index 0, term 0 and the founding voters;
    /// for a member joining an existing cluster: index 0 and an empty membership.
    pub snapshot: SnapshotMeta,
    /// Durable entries following the snapshot.
    pub entries: Vec<Entry>,
    /// Highest index the durable state machine already reflects (at least the snapshot's).
    pub applied: LogIndex,
}

/// What must be durable before a held-back message may leave.
#[derive(Clone, Copy, Debug)]
struct Gate {
    term: Term,
    vote: NodeId,
    /// Entries up to here must be durable, with `index_term` at `index`.
    index: LogIndex,
    index_term: Term,
}

#[derive(Clone, Copy, Debug)]
struct Transfer {
    target: NodeId,
    elapsed_ticks: u32,
}

#[derive(Clone, Copy, Debug)]
struct PendingRead {
    round: u64,
    ctx: u64,
    index: Option<LogIndex>,
}

/// One member's Raft state machine. Pure: no clock (time is `tick`), no IO (persistence is
/// requested through [`Ready`] and confirmed through the `on_*` calls), no threads, and its
/// only randomness comes from [`Config::seed`].
#[derive(Debug)]
pub struct RaftCore {
    config: Config,
    rng_state: u64,
    term: Term,
    vote: NodeId,
    leader: NodeId,
    role: Role,
    log: RaftLog,
    /// Membership history: `(index, membership)`, oldest first; the first is in force at the
    /// compaction point, the last is the one in force (it takes effect when appended).
    configs: Vec<(LogIndex, Membership)>,
    progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    election_elapsed_ticks: u32,
    heartbeat_elapsed_ticks: u32,
    randomized_election_ticks: u32,
    tick_count: u64,
    term_start_index: LogIndex,
    transfer: Option<Transfer>,
    round: u64,
    rounds_sent: VecDeque<(u64, u64)>,
    lease_start_tick: Option<u64>,
    pending_reads: VecDeque<PendingRead>,
    read_states: Vec<ReadState>,
    read_round_needed: bool,
    broadcast_needed: bool,
    commit_broadcast_needed: bool,
    messages: Vec<Message>,
    gated: Vec<(Message, Gate)>,
    durable_hard_state: HardState,
    emitted_hard_state: HardState,
    emitted_soft_state: SoftState,
    disk_stall_ticks: u32,
    shutting_down: bool,
    scratch: Vec<LogIndex>,
    /// Leader only: payload bytes of uncommitted normal entries it appended (backpressure).
    uncommitted_bytes: u64,
    /// Leader only: a TimeoutNow was sent in this term, so the lease may not be trusted.
    lease_forfeited: bool,
}

impl RaftCore {
    /// A member starting (or restarting) from its durable state.
    pub fn new(config: Config, initial: InitialState) -> Self {
        config.validate();
        let snapshot = initial.snapshot;
        let mut configs = vec![(snapshot.index, snapshot.membership.clone())];
        for entry in &initial.entries {
            if entry.kind == EntryKind::Membership {
                configs.push((entry.index, decode_membership(entry)));
            }
        }
        let mut log = RaftLog::restore(snapshot, initial.entries, initial.hard_state.commit);
        if initial.applied > log.applied() {
            // The durable state machine already reflects these; never hand them out again.
            let applied = initial.applied.min(log.commit());
            while log.applied() < applied {
                log.take_committed(u64::MAX);
            }
        }
        let mut term = initial.hard_state.term;
        let mut vote = initial.hard_state.vote;
        if log.last_term() > term {
            // Entries of a later term were durable before the hard state: whom we voted for
            // then is unknown, so count the vote as cast (for ourselves) and never vote again.
            term = log.last_term();
            vote = config.id;
        }
        let soft = SoftState {
            role: Role::Follower,
            leader: None,
            term,
        };
        let mut core = Self {
            rng_state: config.seed ^ 0x9E37_79B9_7F4A_7C15 ^ config.id,
            config,
            term,
            vote,
            leader: NO_NODE,
            role: Role::Follower,
            log,
            configs,
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed_ticks: 0,
            heartbeat_elapsed_ticks: 0,
            randomized_election_ticks: 0,
            tick_count: 0,
            term_start_index: 0,
            transfer: None,
            round: 0,
            rounds_sent: VecDeque::new(),
            lease_start_tick: None,
            pending_reads: VecDeque::new(),
            read_states: Vec::new(),
            read_round_needed: false,
            broadcast_needed: false,
            commit_broadcast_needed: false,
            messages: Vec::new(),
            gated: Vec::new(),
            durable_hard_state: initial.hard_state,
            emitted_hard_state: initial.hard_state,
            emitted_soft_state: soft,
            disk_stall_ticks: 0,
            shutting_down: false,
            scratch: Vec::new(),
            uncommitted_bytes: 0,
            lease_forfeited: false,
        };
        core.reset_election_timer();
        core
    }

    // ----- accessors -------------------------------------------------------------------

    /// This member's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Vote cast in the current term ([`NO_NODE`] if none).
    pub fn vote(&self) -> NodeId {
        self.vote
    }

    /// Current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The known leader.
    pub fn leader(&self) -> Option<NodeId> {
        (self.leader != NO_NODE).then_some(self.leader)
    }

    /// The hard state as of now (not necessarily durable).
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.commit(),
        }
    }

    /// Commit index.
    pub fn commit_index(&self) -> LogIndex {
        self.log.commit()
    }

    /// Highest index handed out for application.
    pub fn applied_index(&self) -> LogIndex {
        self.log.applied()
    }

    /// Highest index known durable locally.
    pub fn durable_index(&self) -> LogIndex {
        self.log.durable()
    }

    /// First index held in memory.
    pub fn first_index(&self) -> LogIndex {
        self.log.first_index()
    }

    /// Last index of the log.
    pub fn last_index(&self) -> LogIndex {
        self.log.last_index()
    }

    /// Term at `index`, if known.
    pub fn log_term(&self, index: LogIndex) -> Option<Term> {
        self.log.term(index)
    }

    /// The entry at `index`, if in memory.
    pub fn log_entry(&self, index: LogIndex) -> Option<&Entry> {
        self.log.entry(index)
    }

    /// The latest snapshot known (taken or installed).
    pub fn snapshot_meta(&self) -> &SnapshotMeta {
        self.log.snapshot()
    }

    /// The membership in force (the latest in the log, committed or not).
    pub fn membership(&self) -> &Membership {
        &self.configs.last().expect("there is always a membership").1
    }

    /// The membership in force at `index` (which must not precede the compaction point).
    pub fn membership_at(&self, index: LogIndex) -> &Membership {
        let position = self.configs.partition_point(|(at, _)| *at <= index);
        &self.configs[position.max(1) - 1].1
    }

    /// The leader's replication progress of `peer`.
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        self.progress.get(&peer)
    }

    /// The target of an ongoing leadership transfer.
    pub fn transfer_target(&self) -> Option<NodeId> {
        self.transfer.map(|t| t.target)
    }

    /// True if this leader has committed an entry of its own term (it may serve reads and
    /// accept membership changes).
    pub fn term_committed(&self) -> bool {
        self.role == Role::Leader && self.log.commit() >= self.term_start_index
    }

    /// True if this leader may serve a read without a heartbeat round: it heard from a
    /// quorum, within the election timeout minus the drift margin, in answer to heartbeats
    /// sent after that time, and its own disk is not stalled.
    pub fn lease_valid(&self) -> bool {
        if self.role != Role::Leader || !self.config.check_quorum {
            return false;
        }
        if self.disk_stall_ticks >= LEASE_DISK_STALL_TICKS_MAX || self.lease_forfeited {
            return false;
        }
        let lease_ticks =
            u64::from(self.config.election_timeout_ticks - self.config.lease_margin_ticks);
        self.lease_start_tick
            .is_some_and(|start| self.tick_count < start + lease_ticks)
    }

    /// Timers and persistence gates, for diagnosis.
    pub fn debug_summary(&self) -> String {
        format!(
            "elapsed={}/{} durable_hs={:?} gated={} promotable={}",
            self.election_elapsed_ticks,
            self.randomized_election_ticks,
            self.durable_hard_state,
            self.gated.len(),
            self.promotable()
        )
    }

    fn is_voter(&self) -> bool {
        self.membership().voters.contains(&self.config.id)
    }

    /// Index of the entry that set the membership in force (the compaction point or
    /// snapshot index if no later membership entry exists).
    pub fn membership_index(&self) -> LogIndex {
        self.last_config_index()
    }

    fn last_config_index(&self) -> LogIndex {
        self.configs.last().expect("there is always a membership").0
    }

    // ----- client inputs ---------------------------------------------------------------

    /// Appends `data` to the log (leader only); it is replicated at the next [`Ready`] together
    /// with every other proposal made since (batching).
    ///
    /// # Errors
    /// [`RaftError::NotLeader`], [`RaftError::ShuttingDown`], [`RaftError::TransferInProgress`]
    /// or [`RaftError::ProposalTooLarge`].
    pub fn propose(&mut self, data: Bytes) -> Result<Proposed, RaftError> {
        self.check_can_propose()?;
        let bytes = data.len() as u64;
        if bytes > self.config.proposal_bytes_max {
            return Err(RaftError::ProposalTooLarge {
                bytes,
                bytes_max: self.config.proposal_bytes_max,
            });
        }
        if self.uncommitted_bytes + bytes > self.config.uncommitted_bytes_max {
            return Err(RaftError::UncommittedLimit {
                bytes_max: self.config.uncommitted_bytes_max,
            });
        }
        self.uncommitted_bytes += entry_bytes_of(bytes);
        Ok(self.append_entry(EntryKind::Normal, data))
    }

    /// Proposes a single-server membership change (leader only).
    ///
    /// # Errors
    /// Those of [`RaftCore::propose`]; [`RaftError::MembershipChangeInProgress`] until this
    /// leader has committed an entry of its term and while another change is uncommitted;
    /// [`RaftError::InvalidMembershipChange`] if the change itself is invalid.
    pub fn propose_membership(&mut self, change: MembershipChange) -> Result<Proposed, RaftError> {
        self.check_can_propose()?;
        if !self.term_committed() || self.last_config_index() > self.log.commit() {
            return Err(RaftError::MembershipChangeInProgress);
        }
        let next = membership::apply_change(self.membership(), change)?;
        let data = membership::encode(&next);
        let proposed = self.append_entry(EntryKind::Membership, data);
        self.configs.push((proposed.index, next));
        self.sync_progress_with_membership();
        Ok(proposed)
    }

    /// Requests a linearizable read identified by `ctx` (leader only). The confirmation comes
    /// as a [`ReadState`] in a later [`Ready`] (immediately with a valid lease if
    /// [`Config::lease_reads`]). A read pending when leadership is lost is dropped: callers
    /// time out and retry.
    ///
    /// # Errors
    /// [`RaftError::NotLeader`] or [`RaftError::ShuttingDown`].
    pub fn read_index(&mut self, ctx: u64) -> Result<(), RaftError> {
        if self.shutting_down {
            return Err(RaftError::ShuttingDown);
        }
        if self.role != Role::Leader {
            return Err(self.not_leader());
        }
        let committed = self.term_committed();
        if self.config.lease_reads && committed && self.lease_valid() {
            self.read_states.push(ReadState {
                ctx,
                index: self.log.commit(),
            });
            return Ok(());
        }
        self.pending_reads.push_back(PendingRead {
            round: self.round + 1,
            ctx,
            index: committed.then(|| self.log.commit()),
        });
        self.read_round_needed = true;
        Ok(())
    }

    /// Hands leadership to `target` (leader only): it is caught up, then told to campaign at
    /// once. Proposals are refused until the transfer ends; it is abandoned after an election
    /// timeout.
    ///
    /// # Errors
    /// [`RaftError::NotLeader`], [`RaftError::ShuttingDown`], [`RaftError::TransferInProgress`]
    /// (to another target), [`RaftError::InvalidMembershipChange`] if `target` is not a voter.
    pub fn transfer_leadership(&mut self, target: NodeId) -> Result<(), RaftError> {
        if self.shutting_down {
            return Err(RaftError::ShuttingDown);
        }
        if self.role != Role::Leader {
            return Err(self.not_leader());
        }
        if target == self.config.id {
            return Ok(());
        }
        if let Some(transfer) = self.transfer {
            if transfer.target == target {
                return Ok(());
            }
            return Err(RaftError::TransferInProgress {
                target: transfer.target,
            });
        }
        if !self.membership().voters.contains(&target) {
            return Err(RaftError::InvalidMembershipChange {
                reason: "transfer target is not a voter",
            });
        }
        self.transfer = Some(Transfer {
            target,
            elapsed_ticks: 0,
        });
        let caught_up = self
            .progress
            .get(&target)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            self.send_timeout_now(target);
        } else {
            self.send_append(target, false);
        }
        Ok(())
    }

    /// Refuses every later proposal, read and transfer with [`RaftError::ShuttingDown`].
    pub fn shutdown(&mut self) {
        self.shutting_down = true;
    }

    fn check_can_propose(&self) -> Result<(), RaftError> {
        if self.shutting_down {
            return Err(RaftError::ShuttingDown);
        }
        if self.role != Role::Leader {
            return Err(self.not_leader());
        }
        if let Some(transfer) = self.transfer {
            return Err(RaftError::TransferInProgress {
                target: transfer.target,
            });
        }
        Ok(())
    }

    fn not_leader(&self) -> RaftError {
        RaftError::NotLeader {
            leader: self.leader(),
        }
    }

    fn append_entry(&mut self, kind: EntryKind, data: Bytes) -> Proposed {
        let index = self.log.last_index() + 1;
        self.log.append(Entry {
            term: self.term,
            index,
            kind,
            data,
        });
        self.broadcast_needed = true;
        Proposed {
            index,
            term: self.term,
        }
    }

    // ----- persistence and snapshot inputs ---------------------------------------------

    /// Storage made entries durable up to (`index`, `term`) (reports may lag; stale ones after
    /// a truncation are ignored).
    pub fn on_entries_persisted(&mut self, index: LogIndex, term: Term) {
        if self.log.persisted(index, term) {
            self.disk_stall_ticks = 0;
            if self.role == Role::Leader {
                self.maybe_commit();
            }
            self.release_gated();
        }
    }

    /// Storage made `hard_state` durable.
    pub fn on_hard_state_persisted(&mut self, hard_state: HardState) {
        let durable = &mut self.durable_hard_state;
        if hard_state.term > durable.term
            || (hard_state.term == durable.term && durable.vote == NO_NODE)
            || (hard_state.term == durable.term && hard_state.commit > durable.commit)
        {
            *durable = hard_state;
            self.release_gated();
            if self.role == Role::Candidate
                && self.own_vote_durable()
                && !self.votes.contains_key(&self.config.id)
                && self.record_vote(self.config.id, true)
            {
                self.win_election();
            }
        }
    }

    fn own_vote_durable(&self) -> bool {
        self.durable_hard_state.term == self.term && self.durable_hard_state.vote == self.config.id
    }

    /// Storage and state machine installed the received snapshot (`index`, `term`).
    pub fn on_snapshot_installed(&mut self, index: LogIndex, term: Term) {
        if self.log.snapshot_installed(index, term) {
            self.release_gated();
        }
    }

    /// The state machine took a snapshot covering everything up to `index` (at most the
    /// applied index). Entries up to the returned index (`index` minus
    /// [`Config::snapshot_keep_entries`]) are dropped from memory; storage may drop them too.
    pub fn on_snapshot_created(&mut self, index: LogIndex) -> LogIndex {
        assert!(
            index <= self.log.applied(),
            "a snapshot covers applied entries only"
        );
        let offset = self.log.first_index() - 1;
        if index <= self.log.snapshot().index || index < offset {
            return offset;
        }
        let meta = SnapshotMeta {
            index,
            term: self
                .log
                .term(index)
                .expect("applied entries past the offset are in memory"),
            membership: self.membership_at(index).clone(),
        };
        let compact_to = self.keep_from(index).max(offset);
        self.log.snapshot_taken(meta, compact_to);
        self.compact_configs(compact_to);
        compact_to
    }

    /// The index up to which memory may be compacted behind a snapshot at `index`: at most
    /// [`Config::snapshot_keep_entries`] entries are kept, and no more than
    /// [`Config::snapshot_keep_bytes_max`] payload bytes of them.
    fn keep_from(&self, index: LogIndex) -> LogIndex {
        let by_count = index.saturating_sub(self.config.snapshot_keep_entries);
        let mut kept_bytes = 0u64;
        let mut compact_to = index;
        while compact_to > by_count {
            let Some(entry) = self.log.entry(compact_to) else {
                break;
            };
            kept_bytes += entry.data.len() as u64;
            if kept_bytes > self.config.snapshot_keep_bytes_max {
                break;
            }
            compact_to -= 1;
        }
        compact_to
    }

    fn compact_configs(&mut self, compact_to: LogIndex) {
        let keep_from = self
            .configs
            .partition_point(|(at, _)| *at <= compact_to)
            .max(1)
            - 1;
        self.configs.drain(..keep_from);
    }

    // ----- ready -----------------------------------------------------------------------

    /// True if [`RaftCore::ready`] has something to hand out.
    pub fn has_ready(&self) -> bool {
        !self.messages.is_empty()
            || self.log.has_unstable()
            || self.log.has_pending_install()
            || self.hard_state_must_persist()
            || self.log.appliable() > self.log.applied()
            || !self.read_states.is_empty()
            || self.soft_state() != self.emitted_soft_state
            || (self.role == Role::Leader
                && (self.broadcast_needed
                    || self.commit_broadcast_needed
                    || self.read_round_needed))
    }

    /// True if the term or vote changed since the last emitted hard state: those must be
    /// durable before anything that depends on them leaves (the commit index need not).
    fn hard_state_must_persist(&self) -> bool {
        self.term != self.emitted_hard_state.term || self.vote != self.emitted_hard_state.vote
    }

    /// Hands out everything pending (see [`Ready`] for how to handle it).
    pub fn ready(&mut self) -> Ready {
        self.flush();
        let hard_state = self.hard_state();
        let soft_state = self.soft_state();
        let snapshot = self.log.take_pending_install();
        let entries = self.log.take_unstable();
        // A new commit index alone is not worth an fsync (persisting it only shortens the
        // replay after a restart): it rides along with the next entries or term change.
        let emit_hard_state = self.hard_state_must_persist()
            || (!entries.is_empty() && hard_state != self.emitted_hard_state);
        Ready {
            snapshot,
            entries,
            hard_state: emit_hard_state.then(|| {
                self.emitted_hard_state = hard_state;
                hard_state
            }),
            messages: std::mem::take(&mut self.messages),
            committed_entries: self.log.take_committed(APPLY_BATCH_BYTES_MAX),
            read_states: std::mem::take(&mut self.read_states),
            soft_state: (soft_state != self.emitted_soft_state).then(|| {
                self.emitted_soft_state = soft_state;
                soft_state
            }),
        }
    }

    fn soft_state(&self) -> SoftState {
        SoftState {
            role: self.role,
            leader: self.leader(),
            term: self.term,
        }
    }

    /// Leader work deferred to Ready time so that proposals and reads are batched.
    fn flush(&mut self) {
        if self.role != Role::Leader {
            return;
        }
        if self.read_round_needed {
            self.read_round_needed = false;
            self.broadcast_heartbeat();
        }
        if self.broadcast_needed || self.commit_broadcast_needed {
            let with_commit = self.commit_broadcast_needed;
            self.broadcast_needed = false;
            self.commit_broadcast_needed = false;
            for peer in self.peers() {
                let mut allow_empty = with_commit;
                while self.send_append(peer, allow_empty) {
                    allow_empty = false;
                }
            }
        }
    }

    fn peers(&self) -> Vec<NodeId> {
        self.progress.keys().copied().collect()
    }

    // ----- time ------------------------------------------------------------------------

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.tick_count += 1;
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.tick_election();
        }
    }

    fn tick_election(&mut self) {
        if self.campaign_if_sole_voter() {
            return;
        }
        self.election_elapsed_ticks = self.election_elapsed_ticks.saturating_add(1);
        if self.election_elapsed_ticks >= self.randomized_election_ticks {
            if self.promotable() {
                self.election_elapsed_ticks = 0;
                self.campaign(self.config.pre_vote, false);
            } else {
                // Silent for an election timeout: the leader is gone. Forget it (so votes are
                // no longer refused for its sake) but keep the timer expired: restarting it
                // would make a member that cannot campaign refuse votes forever.
                self.leader = NO_NODE;
            }
        }
    }

    /// Starts an election at once, without waiting out an election timeout, when this
    /// member is a follower with no leader and the only voter of both its latest and its
    /// committed membership (a single-manager cluster starting or restarting); returns
    /// whether it did. Its own vote is a quorum, so the pre-vote and the election complete
    /// as soon as its vote is durable. Safe: the timeout exists so that members do not
    /// disrupt a leader they have not heard from yet, and no other member can lead a
    /// membership whose only voter is this one; requiring the committed membership too
    /// keeps a member that merely appended a change leaving it alone from unseating a
    /// leader that may still hold a lease in the committed membership. The raft thread calls
    /// it once when it starts; [`RaftCore::tick`] calls it before counting the timeout.
    pub fn campaign_if_sole_voter(&mut self) -> bool {
        let alone = self.role == Role::Follower
            && self.leader == NO_NODE
            && self.promotable()
            && is_only_voter(self.membership(), self.config.id)
            && is_only_voter(self.membership_at(self.log.commit()), self.config.id);
        if alone {
            self.election_elapsed_ticks = 0;
            self.campaign(self.config.pre_vote, false);
        }
        alone
    }

    /// May campaign: a voter of the latest membership, or of the committed one while a change
    /// removing us is uncommitted (we may be the only member holding that change, so the group
    /// may need us to lead until it commits; votes are still counted in the latest membership).
    fn promotable(&self) -> bool {
        let id = self.config.id;
        let member = self.is_voter() || self.membership_at(self.log.commit()).voters.contains(&id);
        member && !self.log.has_pending_install()
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed_ticks += 1;
        self.election_elapsed_ticks += 1;
        if self.election_elapsed_ticks >= self.config.election_timeout_ticks {
            self.election_elapsed_ticks = 0;
            if self.config.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, NO_NODE);
                return;
            }
            for progress in self.progress.values_mut() {
                progress.recent_active = false;
            }
        }
        if let Some(transfer) = &mut self.transfer {
            transfer.elapsed_ticks += 1;
            if transfer.elapsed_ticks >= self.config.election_timeout_ticks {
                self.transfer = None;
            }
        }
        if self.log.durable() < self.log.last_index() {
            self.disk_stall_ticks += 1;
            if self.disk_stall_ticks >= self.config.election_timeout_ticks {
                // A leader whose own disk is wedged must not hold the cluster hostage with
                // heartbeats: step down so a healthy member can lead.
                self.become_follower(self.term, NO_NODE);
                return;
            }
        } else {
            self.disk_stall_ticks = 0;
        }
        if self.heartbeat_elapsed_ticks >= self.config.heartbeat_ticks {
            self.heartbeat_elapsed_ticks = 0;
            self.broadcast_heartbeat();
        }
        self.reprobe_stalled_peers();
    }

    fn quorum_recently_active(&self) -> bool {
        let membership = self.membership();
        let active = membership
            .voters
            .iter()
            .filter(|v| {
                **v == self.config.id || self.progress.get(v).is_some_and(|p| p.recent_active)
            })
            .count();
        active >= membership.quorum()
    }

    /// Lost appends leave a pipelined peer waiting forever; probe again after a stall.
    fn reprobe_stalled_peers(&mut self) {
        let now = self.tick_count;
        let stall_ticks = u64::from(self.config.replicate_stall_ticks);
        let snapshot_ticks = u64::from(self.config.election_timeout_ticks);
        let last = self.log.last_index();
        for progress in self.progress.values_mut() {
            let idle = now.saturating_sub(progress.last_progress_tick);
            match progress.state {
                ReplicationState::Replicate
                    if progress.match_index < last && idle >= stall_ticks =>
                {
                    progress.become_probe(now);
                }
                ReplicationState::Snapshot { .. } if idle >= snapshot_ticks => {
                    progress.become_probe(now);
                }
                _ => {}
            }
        }
    }

    fn reset_election_timer(&mut self) {
        self.election_elapsed_ticks = 0;
        self.heartbeat_elapsed_ticks = 0;
        let base = self.config.election_timeout_ticks;
        self.randomized_election_ticks = base + (self.next_random() % u64::from(base)) as u32;
    }

    /// xorshift64*: tiny, deterministic, and good enough to spread election timeouts.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng_state;
        if x == 0 {
            x = 0x2545_F491_4F6C_DD1D;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng_state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    // ----- role changes ----------------------------------------------------------------

    fn become_follower(&mut self, term: Term, leader: NodeId) {
        if term > self.term {
            self.term = term;
            self.vote = NO_NODE;
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.reset_election_timer();
        self.clear_leader_state();
    }

    fn clear_leader_state(&mut self) {
        self.progress.clear();
        self.votes.clear();
        self.transfer = None;
        self.pending_reads.clear();
        self.rounds_sent.clear();
        self.lease_start_tick = None;
        self.disk_stall_ticks = 0;
        self.broadcast_needed = false;
        self.commit_broadcast_needed = false;
        self.read_round_needed = false;
    }

    fn campaign(&mut self, pre_vote: bool, transfer: bool) {
        self.clear_leader_state();
        self.leader = NO_NODE;
        let campaign_term = if pre_vote {
            self.role = Role::PreCandidate;
            self.term + 1
        } else {
            self.term += 1;
            self.vote = self.config.id;
            self.role = Role::Candidate;
            self.term
        };
        self.reset_election_timer();
        // Our own real vote counts only once durable: a member that led a term it had not
        // persisted could crash, lead the same term again and reuse (index, term) pairs.
        let own_vote_durable = pre_vote || self.own_vote_durable();
        if own_vote_durable && self.record_vote(self.config.id, true) {
            self.win_election();
            return;
        }
        let voters: Vec<NodeId> = self.membership().voters.iter().copied().collect();
        let (last_index, last_term) = (self.log.last_index(), self.log.last_term());
        let me = self.config.id;
        for voter in voters.into_iter().filter(|v| *v != me) {
            let body = MessageBody::Vote {
                pre_vote,
                transfer,
                last_index,
                last_term,
            };
            self.send(voter, campaign_term, body, 0);
        }
    }

    /// Records a vote; true if it completes a winning quorum.
    fn record_vote(&mut self, from: NodeId, granted: bool) -> bool {
        if !self.membership().voters.contains(&from) {
            return false;
        }
        self.votes.entry(from).or_insert(granted);
        let granted_count = self.votes.values().filter(|g| **g).count();
        granted_count >= self.membership().quorum()
    }

    fn lost_election(&self) -> bool {
        let rejected = self.votes.values().filter(|g| !**g).count();
        let voters = self.membership().voters.len();
        rejected > voters - self.membership().quorum()
    }

    fn win_election(&mut self) {
        if self.role == Role::PreCandidate {
            self.campaign(false, false);
        } else {
            self.become_leader();
        }
    }

    fn become_leader(&mut self) {
        assert_eq!(self.role, Role::Candidate, "only candidates become leaders");
        self.role = Role::Leader;
        self.leader = self.config.id;
        self.reset_election_timer();
        self.clear_leader_state();
        self.lease_forfeited = false;
        self.uncommitted_bytes = ((self.log.commit() + 1)..=self.log.last_index())
            .filter_map(|i| self.log.entry(i))
            .map(super::message::entry_bytes)
            .sum();
        // Progress first, so the first append to every peer carries the new term's entry.
        self.sync_progress_with_membership();
        let proposed = self.append_entry(EntryKind::Blank, Bytes::new());
        self.term_start_index = proposed.index;
    }

    /// Keeps one progress per member other than ourselves.
    fn sync_progress_with_membership(&mut self) {
        let membership = self
            .configs
            .last()
            .expect("there is always a membership")
            .1
            .clone();
        self.progress.retain(|id, _| membership.contains(*id));
        let last = self.log.last_index();
        let now = self.tick_count;
        for id in membership.voters.iter().chain(membership.learners.iter()) {
            if *id != self.config.id {
                self.progress
                    .entry(*id)
                    .or_insert_with(|| Progress::new(last, now));
            }
        }
    }

    // ----- messages --------------------------------------------------------------------

    /// Handles a message from another member.
    pub fn step(&mut self, message: Message) {
        if message.to != self.config.id || message.from == self.config.id {
            return;
        }
        if message.term > self.term {
            if !self.accept_higher_term(&message) {
                return;
            }
        } else if message.term < self.term {
            self.answer_lower_term(&message);
            return;
        }
        let from = message.from;
        match message.body {
            MessageBody::Vote {
                pre_vote,
                last_index,
                last_term,
                ..
            } => {
                self.handle_vote(from, message.term, pre_vote, last_index, last_term);
            }
            MessageBody::VoteResponse { pre_vote, granted } => {
                self.handle_vote_response(from, pre_vote, granted);
            }
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                if self.follow(from) {
                    self.handle_append(from, prev_index, prev_term, entries, commit);
                }
            }
            MessageBody::Heartbeat { commit, round } => {
                if self.follow(from) {
                    self.log.commit_to(commit.min(self.log.last_index()));
                    let body = MessageBody::HeartbeatResponse { round };
                    self.send(from, self.term, body, 0);
                }
            }
            MessageBody::Snapshot { meta } => {
                if self.follow(from) {
                    self.handle_snapshot(from, meta);
                }
            }
            MessageBody::AppendResponse {
                match_index,
                reject,
            } => {
                if self.role == Role::Leader {
                    self.handle_append_response(from, match_index, reject);
                }
            }
            MessageBody::HeartbeatResponse { round } => {
                if self.role == Role::Leader {
                    self.handle_heartbeat_response(from, round);
                }
            }
            MessageBody::TimeoutNow => {
                if self.role != Role::Leader && self.promotable() {
                    self.campaign(false, true);
                }
            }
        }
    }

    /// True while we promise a leader not to help elect another (leader stickiness): we
    /// heard from it within the election timeout, or we started less than an election
    /// timeout ago (a restart must not void a promise made before the crash).
    fn in_leader_lease(&self) -> bool {
        let timeout = self.config.election_timeout_ticks;
        self.config.check_quorum
            && (self.leader != NO_NODE || self.tick_count < u64::from(timeout))
            && self.election_elapsed_ticks < timeout
    }

    /// A message from a higher term; returns false if it must be ignored.
    fn accept_higher_term(&mut self, message: &Message) -> bool {
        match message.body {
            MessageBody::Vote {
                pre_vote, transfer, ..
            } => {
                if self.in_leader_lease() && !transfer {
                    // Leader stickiness: we heard from a live leader within an election
                    // timeout, so a disruptive (or removed) candidate gets no term change.
                    return false;
                }
                if !pre_vote {
                    self.become_follower(message.term, NO_NODE);
                }
            }
            // A granted pre-vote carries the term we would campaign in.
            MessageBody::VoteResponse {
                pre_vote: true,
                granted: true,
            } => {}
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. } => {
                self.become_follower(message.term, message.from);
            }
            _ => self.become_follower(message.term, NO_NODE),
        }
        true
    }

    fn answer_lower_term(&mut self, message: &Message) {
        match message.body {
            MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => {
                // A stale leader (or a member whose term rose while partitioned cannot win):
                // tell the sender our term so the stale side steps down and elections resume.
                // Always (as in the paper): without check-quorum a stale leader would never
                // learn of the newer term otherwise.
                let body = MessageBody::AppendResponse {
                    match_index: 0,
                    reject: None,
                };
                self.send(message.from, self.term, body, 0);
            }
            MessageBody::Vote { pre_vote, .. } => {
                // Reject with our term so a (pre-)candidate with a lower term catches up and can
                // win later: otherwise pre-vote + check-quorum can leave the group leaderless,
                // and a candidate that alone holds the longest log may chase terms forever.
                let body = MessageBody::VoteResponse {
                    pre_vote,
                    granted: false,
                };
                self.send(message.from, self.term, body, 0);
            }
            _ => {}
        }
    }

    /// Accepts `from` as the leader of the current term; false if we lead it ourselves.
    fn follow(&mut self, from: NodeId) -> bool {
        match self.role {
            Role::Leader => false,
            Role::Follower => {
                self.leader = from;
                self.election_elapsed_ticks = 0;
                true
            }
            Role::PreCandidate | Role::Candidate => {
                self.become_follower(self.term, from);
                true
            }
        }
    }

    fn handle_vote(
        &mut self,
        from: NodeId,
        term: Term,
        pre_vote: bool,
        last_index: LogIndex,
        last_term: Term,
    ) {
        let can_vote = self.vote == from
            || (self.vote == NO_NODE && self.leader == NO_NODE)
            || (pre_vote && term > self.term);
        if can_vote && self.log.is_up_to_date(last_index, last_term) {
            if !pre_vote {
                // A real vote resets the election timer; a pre-vote must not (it would let a
                // pre-candidate that cannot win delay everyone's elections).
                self.vote = from;
                self.election_elapsed_ticks = 0;
            }
            self.send(
                from,
                term,
                MessageBody::VoteResponse {
                    pre_vote,
                    granted: true,
                },
                0,
            );
        } else {
            let body = MessageBody::VoteResponse {
                pre_vote,
                granted: false,
            };
            self.send(from, self.term, body, 0);
        }
    }

    fn handle_vote_response(&mut self, from: NodeId, pre_vote: bool, granted: bool) {
        let expected = if pre_vote {
            Role::PreCandidate
        } else {
            Role::Candidate
        };
        if self.role != expected {
            return;
        }
        if self.record_vote(from, granted) {
            self.win_election();
        } else if self.lost_election() {
            self.become_follower(self.term, NO_NODE);
        }
    }

    fn handle_append(
        &mut self,
        from: NodeId,
        mut prev_index: LogIndex,
        mut prev_term: Term,
        mut entries: Vec<Entry>,
        commit: LogIndex,
    ) {
        let our_commit = self.log.commit();
        if prev_index < our_commit {
            // Everything up to our commit matches any current leader: skip that part.
            let skip = ((our_commit - prev_index) as usize).min(entries.len());
            entries.drain(..skip);
            if entries.is_empty() {
                self.respond_match(from, our_commit);
                return;
            }
            prev_index = our_commit;
            prev_term = self
                .log
                .term(our_commit)
                .expect("the commit index is never compacted");
        }
        match self.log.maybe_append(prev_index, prev_term, &entries) {
            Some(outcome) => {
                if let Some(at) = outcome.truncated_at {
                    self.configs.retain(|(index, _)| *index < at);
                    assert!(
                        !self.configs.is_empty(),
                        "the base membership is never truncated"
                    );
                }
                if let Some(from_index) = outcome.appended_from {
                    for entry in entries.iter().filter(|e| e.index >= from_index) {
                        if entry.kind == EntryKind::Membership {
                            self.configs.push((entry.index, decode_membership(entry)));
                        }
                    }
                }
                self.log.commit_to(commit.min(outcome.last_new_index));
                self.respond_match(from, outcome.last_new_index);
            }
            None => {
                let probe = prev_index.min(self.log.last_index());
                let (hint_index, hint_term) = self.log.find_conflict_by_term(probe, prev_term);
                let reject = RejectHint {
                    rejected_index: prev_index,
                    hint_index,
                    hint_term,
                };
                let body = MessageBody::AppendResponse {
                    match_index: 0,
                    reject: Some(reject),
                };
                self.send(from, self.term, body, 0);
            }
        }
    }

    /// Acknowledges a match at `index`; held back until it is durable here.
    fn respond_match(&mut self, to: NodeId, index: LogIndex) {
        let body = MessageBody::AppendResponse {
            match_index: index,
            reject: None,
        };
        self.send(to, self.term, body, index);
    }

    fn handle_snapshot(&mut self, from: NodeId, meta: SnapshotMeta) {
        if meta.index <= self.log.commit() {
            self.respond_match(from, self.log.commit());
            return;
        }
        if self.log.term(meta.index) == Some(meta.term) {
            self.log.commit_to(meta.index);
            self.respond_match(from, meta.index);
            return;
        }
        let index = meta.index;
        self.configs = vec![(index, meta.membership.clone())];
        self.log.install_snapshot(meta);
        self.respond_match(from, index);
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        match_index: LogIndex,
        reject: Option<RejectHint>,
    ) {
        let now = self.tick_count;
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.recent_active = true;
        if let Some(hint) = reject {
            let stale = match progress.state {
                ReplicationState::Replicate => hint.rejected_index <= progress.match_index,
                ReplicationState::Probe => hint.rejected_index + 1 != progress.next_index,
                ReplicationState::Snapshot { .. } => true,
            };
            if stale {
                return;
            }
            let probe_at = if hint.hint_term > 0 {
                self.log
                    .find_conflict_by_term(hint.hint_index, hint.hint_term)
                    .0
            } else {
                hint.hint_index
            };
            progress.become_probe(now);
            progress.next_index = (probe_at + 1)
                .min(hint.rejected_index)
                .max(progress.match_index + 1);
            self.send_append(from, false);
            return;
        }
        if match_index < progress.match_index {
            return;
        }
        let moved = progress.acknowledge(match_index, now);
        match progress.state {
            ReplicationState::Probe => progress.become_replicate(now),
            ReplicationState::Snapshot { index } if progress.match_index >= index => {
                progress.become_replicate(now);
            }
            _ => {}
        }
        if moved {
            self.maybe_commit();
        }
        if self.role != Role::Leader {
            return;
        }
        let last = self.log.last_index();
        if self.transfer.is_some_and(|t| t.target == from)
            && self
                .progress
                .get(&from)
                .is_some_and(|p| p.match_index == last)
        {
            self.send_timeout_now(from);
        }
        while self.send_append(from, false) {}
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, round: u64) {
        let (msgs_max, bytes_max) = (
            self.config.inflight_msgs_max,
            self.config.inflight_bytes_max,
        );
        let Some(progress) = self.progress.get_mut(&from) else {
            return;
        };
        progress.recent_active = true;
        progress.probe_sent = false;
        if progress.state == ReplicationState::Replicate && progress.is_paused(msgs_max, bytes_max)
        {
            progress.free_first_inflight();
        }
        let behind = progress.match_index < self.log.last_index();
        if round > progress.round_acked {
            progress.round_acked = round;
            self.advance_reads();
        }
        if behind {
            self.send_append(from, false);
        }
    }

    /// Sends the next append to `peer` if flow control allows; true if it carried entries.
    fn send_append(&mut self, peer: NodeId, allow_empty: bool) -> bool {
        let (msgs_max, bytes_max) = (
            self.config.inflight_msgs_max,
            self.config.inflight_bytes_max,
        );
        let Some(progress) = self.progress.get(&peer) else {
            return false;
        };
        if progress.is_paused(msgs_max, bytes_max) {
            return false;
        }
        let probing = progress.state == ReplicationState::Probe;
        let next = progress.next_index;
        let prev_index = next - 1;
        let Some(prev_term) = self.log.term(prev_index) else {
            self.send_snapshot(peer);
            return false;
        };
        let entries = if next <= self.log.last_index() {
            self.log.slice(next, self.config.append_bytes_max)
        } else {
            Vec::new()
        };
        if entries.is_empty() && !allow_empty && !probing {
            return false;
        }
        let carried = !entries.is_empty();
        let last_sent = entries.last().map_or(prev_index, |e| e.index);
        let bytes = entries_bytes(&entries);
        self.progress
            .get_mut(&peer)
            .expect("progress looked up above")
            .sent_append(last_sent, bytes, carried);
        let body = MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit: self.log.commit(),
        };
        self.send(peer, self.term, body, 0);
        carried && !probing
    }

    fn send_snapshot(&mut self, peer: NodeId) {
        let meta = self.log.snapshot().clone();
        let now = self.tick_count;
        if let Some(progress) = self.progress.get_mut(&peer) {
            progress.become_snapshot(meta.index, now);
        }
        self.send(peer, self.term, MessageBody::Snapshot { meta }, 0);
    }

    fn send_timeout_now(&mut self, peer: NodeId) {
        // The target's campaign bypasses leader stickiness, which is what the lease relies on,
        // and a delayed TimeoutNow may still start it after the transfer was abandoned: no
        // lease for the rest of this term.
        self.lease_forfeited = true;
        self.send(peer, self.term, MessageBody::TimeoutNow, 0);
    }

    fn broadcast_heartbeat(&mut self) {
        self.round += 1;
        self.rounds_sent.push_back((self.round, self.tick_count));
        if self.rounds_sent.len() > ROUNDS_TRACKED_MAX {
            self.rounds_sent.pop_front();
        }
        let commit = self.log.commit();
        let targets: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .map(|(id, p)| (*id, p.match_index.min(commit)))
            .collect();
        for (peer, commit) in targets {
            let body = MessageBody::Heartbeat {
                commit,
                round: self.round,
            };
            self.send(peer, self.term, body, 0);
        }
        self.advance_reads();
    }

    /// Completes reads whose heartbeat round a quorum echoed, and extends the lease.
    fn advance_reads(&mut self) {
        let membership = self
            .configs
            .last()
            .expect("there is always a membership")
            .1
            .clone();
        self.scratch.clear();
        for voter in &membership.voters {
            let acked = if *voter == self.config.id {
                self.round
            } else {
                self.progress.get(voter).map_or(0, |p| p.round_acked)
            };
            self.scratch.push(acked);
        }
        self.scratch.sort_unstable_by(|a, b| b.cmp(a));
        let Some(&quorum_round) = self.scratch.get(membership.quorum() - 1) else {
            return;
        };
        while let Some(&(round, tick)) = self.rounds_sent.front() {
            if round > quorum_round {
                break;
            }
            if round == quorum_round {
                self.lease_start_tick = Some(tick);
            }
            self.rounds_sent.pop_front();
        }
        if !self.term_committed() {
            return;
        }
        let commit = self.log.commit();
        while let Some(read) = self.pending_reads.front() {
            if read.round > quorum_round {
                break;
            }
            let index = read.index.unwrap_or(commit);
            self.read_states.push(ReadState {
                ctx: read.ctx,
                index,
            });
            self.pending_reads.pop_front();
        }
    }

    fn maybe_commit(&mut self) {
        let membership = &self.configs.last().expect("there is always a membership").1;
        if membership.voters.is_empty() {
            return;
        }
        self.scratch.clear();
        for voter in &membership.voters {
            // The leader counts itself only for entries its own storage reported durable.
            let matched = if *voter == self.config.id {
                self.log.durable()
            } else {
                self.progress.get(voter).map_or(0, |p| p.match_index)
            };
            self.scratch.push(matched);
        }
        self.scratch.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = self.scratch[membership.quorum() - 1];
        // Figure 8: only an entry of the current term is committed by counting replicas.
        if candidate <= self.log.commit() || self.log.term(candidate) != Some(self.term) {
            return;
        }
        let was_term_committed = self.term_committed();
        let newly_committed: u64 = ((self.log.commit() + 1)..=candidate)
            .filter_map(|i| self.log.entry(i))
            .map(super::message::entry_bytes)
            .sum();
        self.uncommitted_bytes = self.uncommitted_bytes.saturating_sub(newly_committed);
        self.log.commit_to(candidate);
        self.commit_broadcast_needed = true;
        if !was_term_committed {
            self.advance_reads();
        }
        if !self.is_voter() && self.last_config_index() <= self.log.commit() {
            self.step_down_after_removal();
        }
    }

    /// Our removal (or demotion) committed: hand over to the most caught-up voter and step
    /// down, so that even a two-member group elects its remaining member at once.
    fn step_down_after_removal(&mut self) {
        self.flush();
        let last = self.log.last_index();
        let successor = self
            .membership()
            .voters
            .iter()
            .filter_map(|v| self.progress.get(v).map(|p| (p.match_index, *v)))
            .max();
        if let Some((matched, successor)) = successor
            && matched == last
        {
            self.send_timeout_now(successor);
        }
        self.become_follower(self.term, NO_NODE);
    }

    // ----- sending and persistence gates -----------------------------------------------

    /// Queues a message; held back until our current term/vote and (if `durable_index` is
    /// not zero) our entries up to `durable_index` are durable.
    fn send(&mut self, to: NodeId, term: Term, body: MessageBody, durable_index: LogIndex) {
        let message = Message {
            from: self.config.id,
            to,
            term,
            body,
        };
        let gate = Gate {
            term: self.term,
            vote: self.vote,
            index: durable_index,
            index_term: self.log.term(durable_index).unwrap_or(0),
        };
        if self.gate_open(&gate) {
            self.messages.push(message);
        } else {
            self.gated.push((message, gate));
        }
    }

    fn gate_open(&self, gate: &Gate) -> bool {
        let durable = &self.durable_hard_state;
        let hard_state_durable = durable.term > gate.term
            || (durable.term == gate.term && (gate.vote == NO_NODE || durable.vote == gate.vote));
        hard_state_durable && self.log.durable() >= gate.index
    }

    /// A held-back acknowledgement is void if its entries were since truncated.
    fn gate_void(&self, gate: &Gate) -> bool {
        if gate.index < self.log.first_index() {
            return false;
        }
        self.log.term(gate.index) != Some(gate.index_term)
    }

    fn release_gated(&mut self) {
        if self.gated.is_empty() {
            return;
        }
        let gated = std::mem::take(&mut self.gated);
        for (message, gate) in gated {
            if self.gate_void(&gate) {
                continue;
            }
            if self.gate_open(&gate) {
                self.messages.push(message);
            } else {
                self.gated.push((message, gate));
            }
        }
    }
}

fn entry_bytes_of(payload_bytes: u64) -> u64 {
    payload_bytes + super::message::ENTRY_OVERHEAD_BYTES
}

fn decode_membership(entry: &Entry) -> Membership {
    membership::decode(&entry.data).expect("membership entries are written by the core itself")
}

/// True if `id` is the one and only voter of `membership` (learners aside: they never vote).
fn is_only_voter(membership: &Membership, id: NodeId) -> bool {
    membership.voters.len() == 1 && membership.voters.contains(&id)
}
