//! The raft thread (`raft-<id>`): owns the core and the storage handle, and turns every
//! Ready into work for the log writer, the peers and the apply thread. When idle it does
//! some of that work itself (a follower's fsync, sending to peers, applying a small
//! batch) to spare thread wake-ups on the commit path.
//!
//! Must never block on the network, and block on nothing but the apply queue (bounded: a
//! wedged state machine stops heartbeats and so hands leadership away), an inline fsync
//! (followers, when idle) and an inline apply (small batches). Never acknowledges anything
//! itself: acknowledgements are messages the core releases after persistence.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};

use super::apply::{Applier, ApplyEvent, ApplyInput, ApplyLane, restore_from_file};
use super::peer::{self, PeerHandle};
use super::{
    APPLY_QUEUE_LEN_MAX, Bootstrap, Input, MemberStatus, NodeError, NodeHandle, NodeStartError,
    NodeStatus, ProposalCallback, ReadCallback, Shared, StateMachine, directory,
};
use crate::net::Transport;
use crate::raft::core::{Config, InitialState, MembershipChange, Message, RaftCore, Ready, Role};
use crate::raft::storage::{AppendRequest, LogHandle, LogStore, Recovered, WriterEvent};
use crate::raft::types::{LogIndex, Membership, NodeId, SnapshotMeta};

/// Inputs handled per loop turn before the Ready is processed: proposals arriving together
/// are appended together (batching) without starving ticks.
pub const INPUT_DRAIN_MAX: usize = 1024;
/// A learner within this many entries of the leader's log is promoted to voter.
pub const PROMOTE_LAG_ENTRIES_MAX: u64 = 100;
/// Bytes of log entries loaded per read at start.
const LOAD_BATCH_BYTES: u64 = 16 << 20;

/// Everything `RaftNode::start` prepared for the raft thread.
pub(crate) struct Setup {
    pub(crate) shared: Arc<Shared>,
    pub(crate) store: LogStore,
    pub(crate) recovered: Recovered,
    pub(crate) log: LogHandle,
    pub(crate) writer_events: Receiver<WriterEvent>,
    pub(crate) inputs: Receiver<Input>,
    pub(crate) stop: Receiver<()>,
    pub(crate) handle: NodeHandle,
    pub(crate) state_machine: Box<dyn StateMachine>,
    pub(crate) transport: Arc<Transport>,
    pub(crate) client_tls: Arc<rustls::ClientConfig>,
}

pub(crate) struct RaftLoop {
    core: RaftCore,
    shared: Arc<Shared>,
    log: Option<LogHandle>,
    writer_events: Receiver<WriterEvent>,
    inputs: Receiver<Input>,
    inputs_tx: Sender<Input>,
    stop: Receiver<()>,
    apply_tx: Option<Sender<ApplyInput>>,
    apply_lane: ApplyLane,
    apply_events: Receiver<ApplyEvent>,
    apply_thread: Option<JoinHandle<()>>,
    peers: BTreeMap<NodeId, PeerHandle>,
    transport: Arc<Transport>,
    tls: Arc<rustls::ClientConfig>,
    pending_reads: HashMap<u64, (bool, ReadCallback)>,
    next_read_ctx: u64,
    handed_out: LogIndex,
    apply_watch: (LogIndex, Instant),
    addr_proposed_term: u64,
    membership: Membership,
    /// Ids whose removal is committed (mirrored into `Shared::removed_ids`).
    committed_removed: std::collections::BTreeSet<NodeId>,
    /// When a message from each peer last arrived (for `manager ls`).
    last_heard: HashMap<NodeId, Instant>,
    /// Proposal callbacks not yet handed to the apply thread (see `ApplyInput::Waiters`).
    pending_waiters: Vec<(LogIndex, crate::raft::types::Term, ProposalCallback)>,
    fatal: Option<String>,
}

fn initial_meta(config_id: NodeId, bootstrap: Bootstrap, recovered: &Recovered) -> SnapshotMeta {
    if let Some(info) = &recovered.snapshot {
        return info.meta.clone();
    }
    match bootstrap {
        Bootstrap::NewCluster => SnapshotMeta {
            index: 0,
            term: 0,
            membership: Membership {
                voters: [config_id].into(),
                ..Default::default()
            },
        },
        Bootstrap::Join => SnapshotMeta::default(),
    }
}

fn load_entries(
    store: &LogStore,
    after: LogIndex,
) -> Result<Vec<crate::raft::types::Entry>, NodeStartError> {
    let last = store.last_index();
    let mut entries = Vec::new();
    let mut next = after + 1;
    while next <= last {
        let batch = store.entries(next..last + 1, LOAD_BATCH_BYTES)?;
        next += batch.len() as u64;
        entries.extend(batch);
    }
    Ok(entries)
}

/// Builds the core from durable state, restores the state machine and starts the apply
/// thread; the raft thread then runs [`RaftLoop::run`].
pub(crate) fn prepare(setup: Setup) -> Result<RaftLoop, NodeStartError> {
    let Setup {
        shared,
        store,
        recovered,
        log,
        writer_events,
        inputs,
        stop,
        handle,
        mut state_machine,
        transport,
        client_tls,
    } = setup;
    let config = &shared.config;
    let meta = initial_meta(config.id, config.bootstrap, &recovered);
    if let Some(info) = &recovered.snapshot {
        restore_from_file(info, state_machine.as_mut(), &shared.directory).map_err(|source| {
            NodeStartError::Restore {
                path: info.path.display().to_string(),
                source,
            }
        })?;
        log::info!(
            "raft {:x}: restored snapshot at index {}",
            config.id,
            meta.index
        );
    }
    shared.applied.store(meta.index, Ordering::Release);
    let entries = load_entries(&store, meta.index)?;
    let mut core_config = Config::new(config.id, rand::random());
    core_config.election_timeout_ticks = config.election_timeout_ticks;
    core_config.heartbeat_ticks = config.heartbeat_ticks;
    let initial = InitialState {
        hard_state: recovered.hard_state,
        snapshot: meta.clone(),
        entries,
        applied: meta.index,
    };
    let core = RaftCore::new(core_config, initial);
    let (apply_tx, apply_rx) = crossbeam_channel::bounded(APPLY_QUEUE_LEN_MAX);
    // Unbounded, but at most a few events per snapshot: the apply thread must never block
    // on the raft thread, which may itself be blocked on the apply queue.
    let (events_tx, apply_events) = crossbeam_channel::unbounded();
    let applier = Applier::new(
        state_machine,
        shared.clone(),
        store.snapshots().clone(),
        events_tx,
        &meta,
    );
    let name = format!("raft-apply-{:x}", config.id);
    let (apply_lane, apply_thread) = ApplyLane::start(applier, apply_rx, name.clone())
        .map_err(|source| NodeStartError::Thread { name, source })?;
    Ok(RaftLoop {
        membership: core.membership().clone(),
        core,
        shared,
        log: Some(log),
        writer_events,
        inputs,
        inputs_tx: handle.inputs().clone(),
        stop,
        apply_tx: Some(apply_tx),
        apply_lane,
        apply_events,
        apply_thread: Some(apply_thread),
        peers: BTreeMap::new(),
        transport,
        tls: client_tls,
        pending_reads: HashMap::new(),
        next_read_ctx: 1,
        handed_out: meta.index,
        apply_watch: (meta.index, Instant::now()),
        addr_proposed_term: 0,
        last_heard: HashMap::new(),
        pending_waiters: Vec::new(),
        committed_removed: Default::default(),
        fatal: None,
    })
}

impl RaftLoop {
    pub(crate) fn run(mut self) {
        let ticker = crossbeam_channel::tick(Duration::from_millis(self.shared.config.tick_ms));
        log::info!(
            "raft {:x}: started (term {}, last index {}, members {:?})",
            self.core.id(),
            self.core.term(),
            self.core.last_index(),
            self.core.membership()
        );
        // A single manager needs nobody's vote: it leads as soon as its vote is durable,
        // instead of after an election timeout (a cold start's first write waits for it).
        if self.core.campaign_if_sole_voter() {
            self.process_ready();
        }
        while self.fatal.is_none() {
            select! {
                recv(self.stop) -> _ => break,
                recv(ticker) -> _ => {
                    self.core.tick();
                    self.on_tick();
                }
                recv(self.inputs) -> input => match input {
                    Ok(input) => self.handle_input(input),
                    Err(_) => break,
                },
                recv(self.writer_events) -> event => self.on_writer_event(event.ok()),
                recv(self.apply_events) -> event => {
                    if let Ok(event) = event {
                        self.on_apply_event(event);
                    }
                }
            }
            for _ in 0..INPUT_DRAIN_MAX {
                let Ok(input) = self.inputs.try_recv() else {
                    break;
                };
                self.handle_input(input);
            }
            while let Ok(event) = self.writer_events.try_recv() {
                self.on_writer_event(Some(event));
            }
            self.process_ready();
            let busy = !self.inputs.is_empty();
            for peer in self.peers.values_mut() {
                peer.flush(busy);
            }
        }
        self.shutdown();
    }

    fn set_fatal(&mut self, reason: String) {
        log::error!("raft {:x}: stopping: {reason}", self.core.id());
        *self.shared.fatal.lock() = Some(reason.clone());
        self.fatal = Some(reason);
    }

    fn log_mut(&mut self) -> &mut LogHandle {
        self.log
            .as_mut()
            .expect("the log handle lives until shutdown")
    }

    fn on_writer_event(&mut self, event: Option<WriterEvent>) {
        match event {
            Some(WriterEvent::Durable(durable)) => {
                self.log_mut().on_durable(&durable);
                self.core
                    .on_entries_persisted(durable.last_index, durable.last_term);
                self.core.on_hard_state_persisted(durable.hard_state);
            }
            Some(WriterEvent::Fatal(error)) => {
                self.set_fatal(format!("storage failed: {error}"));
            }
            None => self.set_fatal("the log writer stopped".into()),
        }
    }

    fn on_apply_event(&mut self, event: ApplyEvent) {
        match event {
            ApplyEvent::SnapshotCreated { index } => {
                self.core.on_snapshot_created(index);
                if let Err(error) = self.log_mut().compact(index) {
                    self.set_fatal(format!("compaction failed: {error}"));
                }
            }
            ApplyEvent::Restored { index, term } => self.core.on_snapshot_installed(index, term),
            ApplyEvent::Fatal(reason) => self.set_fatal(reason),
        }
    }

    /// Registers a proposal's callback; it travels with the next input to the apply thread.
    fn add_waiter(&mut self, proposed: crate::raft::core::Proposed, done: ProposalCallback) {
        self.pending_waiters
            .push((proposed.index, proposed.term, done));
    }

    fn send_to_apply(&mut self, input: ApplyInput) {
        if !self.pending_waiters.is_empty() {
            let waiters = std::mem::take(&mut self.pending_waiters);
            self.send_raw_to_apply(ApplyInput::Waiters(waiters));
        }
        self.send_raw_to_apply(input);
    }

    fn send_raw_to_apply(&mut self, input: ApplyInput) {
        if let Some(apply) = &self.apply_tx {
            self.apply_lane.will_queue();
            if apply.send(input).is_err() {
                self.apply_lane.not_queued();
                self.set_fatal("the apply thread stopped".into());
            }
        }
    }

    /// Committed entries: applied here if the batch is small and the apply thread idle
    /// (the reply then leaves without another thread wake-up), else queued to it.
    fn apply_committed(&mut self, entries: Vec<crate::raft::types::Entry>) {
        let waiters = std::mem::take(&mut self.pending_waiters);
        match self.apply_lane.try_apply_here(waiters, entries) {
            Ok(Ok(())) => {}
            Ok(Err((waiters, entries))) => {
                self.pending_waiters = waiters;
                self.send_to_apply(ApplyInput::Entries(entries));
            }
            Err(reason) => self.set_fatal(format!("apply failed: {reason}")),
        }
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Step(messages) => {
                if let Some(first) = messages.first() {
                    self.last_heard.insert(first.from, Instant::now());
                }
                for message in messages {
                    self.core.step(message);
                }
            }
            Input::Propose { data, done } => match self.core.propose(data) {
                Ok(proposed) => self.add_waiter(proposed, done),
                Err(error) => done(Err(NodeError::from_core(error, &self.shared.directory))),
            },
            Input::ProposeMembership { change, done } => {
                match self.core.propose_membership(change) {
                    Ok(proposed) => self.add_waiter(proposed, done),
                    Err(error) => done(Err(NodeError::from_core(error, &self.shared.directory))),
                }
            }
            Input::ReadIndex { apply, done } => {
                let ctx = self.next_read_ctx;
                self.next_read_ctx += 1;
                match self.core.read_index(ctx) {
                    Ok(()) => {
                        self.pending_reads.insert(ctx, (apply, done));
                    }
                    Err(error) => done(Err(NodeError::from_core(error, &self.shared.directory))),
                }
            }
            Input::Transfer { target, done } => done(
                self.core
                    .transfer_leadership(target)
                    .map_err(|e| NodeError::from_core(e, &self.shared.directory)),
            ),
            Input::Status { done } => done(self.status()),
            // Several peers may say so at once: stop once.
            Input::Removed if self.fatal.is_none() => {
                self.shared.removed.store(true, Ordering::Release);
                self.set_fatal("this manager was removed from the cluster".into());
            }
            Input::Removed => {}
        }
    }

    fn process_ready(&mut self) {
        while self.fatal.is_none() && self.core.has_ready() {
            let ready = self.core.ready();
            self.handle_ready(ready);
        }
        if self.core.membership() != &self.membership {
            self.membership = self.core.membership().clone();
            self.reconcile_peers();
        }
        let commit = self.core.commit_index();
        if let Err(error) = self.log_mut().record_commit(commit) {
            self.set_fatal(format!("cannot record the watermark: {error}"));
            return;
        }
        // Only a committed removal is announced to the removed member (it then stops): an
        // uncommitted one may still be truncated away by a new leader.
        let committed = self.core.membership_at(self.core.commit_index());
        if committed.removed != self.committed_removed {
            self.committed_removed = committed.removed.clone();
            *self.shared.removed_ids.lock() = self.committed_removed.clone();
        }
    }

    fn handle_ready(&mut self, ready: Ready) {
        if let Some(soft) = ready.soft_state {
            self.on_soft_state(soft.role, soft.leader, soft.term);
        }
        if let Some(meta) = ready.snapshot {
            self.install_received_snapshot(&meta);
        }
        let mut write_here = None;
        if !ready.entries.is_empty() || ready.hard_state.is_some() {
            let last_index = self.log_mut().last_index();
            let truncate_from = ready
                .entries
                .first()
                .map(|e| e.index)
                .filter(|&index| index <= last_index);
            let request = AppendRequest {
                truncate_from,
                entries: ready.entries,
                hard_state: ready.hard_state,
            };
            if self.persists_inline() {
                write_here = Some(request);
            } else if let Err(error) = self.log_mut().submit(request) {
                self.set_fatal(format!("cannot persist: {error}"));
                return;
            }
        }
        self.route(ready.messages);
        if let Some(request) = write_here {
            // What the core released does not wait for this fsync.
            for peer in self.peers.values_mut() {
                peer.flush(false);
            }
            match self.log_mut().write_inline(request) {
                Ok(durable) => {
                    self.core
                        .on_entries_persisted(durable.last_index, durable.last_term);
                    self.core.on_hard_state_persisted(durable.hard_state);
                }
                Err(error) => {
                    self.set_fatal(format!("cannot persist: {error}"));
                    return;
                }
            }
        }
        if let Some(last) = ready.committed_entries.last() {
            self.handed_out = last.index;
            self.apply_committed(ready.committed_entries);
        }
        for read in ready.read_states {
            if let Some((apply, done)) = self.pending_reads.remove(&read.ctx) {
                if apply {
                    self.send_to_apply(ApplyInput::Read {
                        index: read.index,
                        done,
                    });
                } else {
                    done(Ok(read.index));
                }
            }
        }
    }

    /// A member that is not the leader writes its log on this thread when idle, instead
    /// of waking the writer thread and being woken back: it acknowledges only after the
    /// fsync anyway, and inputs arriving meanwhile queue up and form the next group. The
    /// leader keeps the writer thread, so that its fsync overlaps the followers' (writing
    /// inline there measured no better). Only when nothing submitted is in flight, so
    /// that writes stay in order, and only when no input waits: under load the writer
    /// thread's fsync overlaps this thread's work on the next messages (pipelining beats
    /// the saved wake-ups there).
    fn persists_inline(&self) -> bool {
        self.core.role() != Role::Leader
            && self.inputs.is_empty()
            && self.log.as_ref().is_some_and(LogHandle::is_idle)
    }

    fn on_soft_state(&mut self, role: Role, leader: Option<NodeId>, term: u64) {
        let previous = self
            .shared
            .leader
            .swap(leader.unwrap_or(0), Ordering::AcqRel);
        if previous != leader.unwrap_or(0) || role == Role::Leader {
            log::info!(
                "raft {:x}: {} in term {term}, leader {}",
                self.core.id(),
                super::role_name(role),
                leader.map_or("unknown".into(), |id| format!("{id:x}"))
            );
        }
        if role != Role::Leader {
            let leader_addr = leader.and_then(|id| self.shared.directory.addr(id));
            for (_, (_, done)) in self.pending_reads.drain() {
                done(Err(NodeError::NotLeader {
                    leader,
                    leader_addr: leader_addr.clone(),
                }));
            }
        }
    }

    fn install_received_snapshot(&mut self, meta: &SnapshotMeta) {
        let received = self.shared.received_snapshot.lock().take();
        let Some(info) =
            received.filter(|info| info.meta.index == meta.index && info.meta.term == meta.term)
        else {
            self.set_fatal(format!(
                "the core installs snapshot {}/{} but no such file was received",
                meta.index, meta.term
            ));
            return;
        };
        if let Err(error) = self.log_mut().snapshot_installed(meta) {
            self.set_fatal(format!("cannot record the snapshot: {error}"));
            return;
        }
        *self.shared.latest_snapshot.lock() = Some(info.clone());
        self.handed_out = self.handed_out.max(meta.index);
        log::info!(
            "raft {:x}: installing received snapshot at index {}",
            self.core.id(),
            meta.index
        );
        self.send_to_apply(ApplyInput::Restore(info));
    }

    /// Sends a Ready's messages: to this member's own core at once, to each peer in order,
    /// as one call per peer.
    fn route(&mut self, messages: Vec<Message>) {
        let mut by_peer: BTreeMap<NodeId, Vec<Message>> = BTreeMap::new();
        for message in messages {
            if message.to == self.core.id() {
                self.core.step(message);
            } else {
                by_peer.entry(message.to).or_default().push(message);
            }
        }
        for (to, messages) in by_peer {
            if let Some(peer) = self.peer(to) {
                peer.send(messages);
            }
        }
    }

    /// The handle of peer `to`, starting its thread on first use.
    fn peer(&mut self, to: NodeId) -> Option<&mut PeerHandle> {
        if !self.peers.contains_key(&to) {
            match peer::spawn(
                to,
                self.shared.clone(),
                self.transport.clone(),
                self.tls.clone(),
                self.inputs_tx.clone(),
            ) {
                Ok(handle) => {
                    self.peers.insert(to, handle);
                }
                Err(error) => {
                    log::error!("raft: cannot start a peer thread for {to:x}: {error}");
                    return None;
                }
            }
        }
        self.peers.get_mut(&to)
    }

    /// Stops the peer threads of members that left the group.
    fn reconcile_peers(&mut self) {
        let gone: Vec<NodeId> = self
            .peers
            .keys()
            .copied()
            .filter(|id| self.membership.removed.contains(id))
            .collect();
        for id in gone {
            if let Some(handle) = self.peers.remove(&id) {
                handle.stop();
            }
        }
        if self.membership.removed.contains(&self.core.id()) {
            // Committed or not, our own removal is in the log; the leader will stop
            // talking to us. Stay until the change commits (we may be needed for it).
            log::warn!("raft {:x}: this member is being removed", self.core.id());
        }
    }

    fn on_tick(&mut self) {
        if self.core.role() != Role::Leader {
            return;
        }
        self.promote_caught_up_learners();
        self.record_own_address();
        self.watch_apply_progress();
    }

    fn promote_caught_up_learners(&mut self) {
        let last = self.core.last_index();
        let ready: Vec<NodeId> = self
            .core
            .membership()
            .learners
            .iter()
            .copied()
            .filter(|id| {
                self.core.progress(*id).is_some_and(|p| {
                    p.recent_active && p.match_index + PROMOTE_LAG_ENTRIES_MAX >= last
                })
            })
            .collect();
        if let Some(&id) = ready.first()
            && self
                .core
                .propose_membership(MembershipChange::AddVoter(id))
                .is_ok()
        {
            log::info!(
                "raft {:x}: promoting caught-up learner {id:x} to voter",
                self.core.id()
            );
        }
    }

    fn record_own_address(&mut self) {
        let id = self.core.id();
        let term = self.core.term();
        let addr = self.shared.config.addr.clone();
        if self.addr_proposed_term == term
            || !self.core.term_committed()
            || self.shared.directory.addr(id).as_deref() == Some(addr.as_str())
        {
            return;
        }
        self.addr_proposed_term = term;
        let data = directory::encode_member_addr(id, &addr);
        if let Ok(proposed) = self.core.propose(data) {
            self.add_waiter(proposed, Box::new(|_| {}));
        }
    }

    /// A leader whose state machine stopped applying hands leadership to the most
    /// caught-up voter: followers would otherwise keep a wedged leader forever.
    fn watch_apply_progress(&mut self) {
        let applied = self.shared.applied.load(Ordering::Acquire);
        if applied >= self.handed_out || applied != self.apply_watch.0 {
            self.apply_watch = (applied, Instant::now());
            return;
        }
        let stalled = self.apply_watch.1.elapsed();
        if stalled < Duration::from_millis(self.shared.config.apply_stall_ms_max) {
            return;
        }
        let id = self.core.id();
        let target = self
            .core
            .membership()
            .voters
            .iter()
            .copied()
            .filter(|&v| v != id)
            .max_by_key(|&v| self.core.progress(v).map_or(0, |p| p.match_index));
        if let Some(target) = target {
            log::error!(
                "raft {id:x}: the state machine applied nothing for {stalled:?}; handing \
                 leadership to {target:x}"
            );
            let _ = self.core.transfer_leadership(target);
        }
        self.apply_watch = (applied, Instant::now());
    }

    fn status(&self) -> NodeStatus {
        let membership = self.core.membership();
        let is_leader = self.core.role() == Role::Leader;
        let leader = self.core.leader();
        let problems = self.shared.peer_problems.lock().clone();
        let members = membership
            .voters
            .iter()
            .map(|&id| (id, true))
            .chain(membership.learners.iter().map(|&id| (id, false)))
            .map(|(id, voter)| {
                let progress = self.core.progress(id);
                let role = if Some(id) == leader {
                    "leader"
                } else if voter {
                    "follower"
                } else {
                    "learner"
                };
                MemberStatus {
                    id,
                    addr: self.shared.directory.addr(id),
                    role,
                    reachable: id == self.core.id() || progress.is_some_and(|p| p.recent_active),
                    last_contact_ms: if id == self.core.id() {
                        0
                    } else {
                        self.last_heard.get(&id).map_or(u64::MAX, |at| {
                            u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
                        })
                    },
                    match_index: if id == self.core.id() {
                        self.core.last_index()
                    } else {
                        progress.map_or(0, |p| p.match_index)
                    },
                    problem: problems.get(&id).cloned(),
                }
            })
            .collect();
        NodeStatus {
            id: self.core.id(),
            leader,
            term: self.core.term(),
            commit: self.core.commit_index(),
            applied: self.shared.applied.load(Ordering::Acquire),
            members,
            is_leader,
        }
    }

    /// The barrier: refuse new work, stop peers, let the apply thread finish what it was
    /// given, let the writer finish what was submitted; each joined in turn.
    fn shutdown(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.core.shutdown();
        for (_, (_, done)) in self.pending_reads.drain() {
            done(Err(NodeError::ShuttingDown));
        }
        while let Ok(input) = self.inputs.try_recv() {
            fail_input(input);
        }
        for (_, peer) in std::mem::take(&mut self.peers) {
            peer.stop();
        }
        for (_, _, done) in std::mem::take(&mut self.pending_waiters) {
            done(Err(NodeError::ShuttingDown));
        }
        drop(self.apply_tx.take());
        if let Some(thread) = self.apply_thread.take()
            && thread.join().is_err()
        {
            log::error!("the raft apply thread panicked");
        }
        if let Some(log) = self.log.take()
            && let Err(error) = log.shutdown()
        {
            log::error!("raft {:x}: log writer: {error}", self.core.id());
        }
        log::info!("raft {:x}: stopped", self.core.id());
    }
}

fn fail_input(input: Input) {
    fail_input_with(input, &NodeError::ShuttingDown);
}

/// Answers `input`'s callback, if it has one, with `error`.
pub(super) fn fail_input_with(input: Input, error: &NodeError) {
    match input {
        Input::Propose { done, .. } | Input::ProposeMembership { done, .. } => {
            done(Err(error.clone()));
        }
        Input::ReadIndex { done, .. } => done(Err(error.clone())),
        Input::Transfer { done, .. } => done(Err(error.clone())),
        Input::Step(_) | Input::Status { .. } | Input::Removed => {}
    }
}
