//! The simulated world: nodes (core + disk + state machine), a network, a clock and the fault
//! schedule, all driven by one seed. Everything happens as discrete events ordered by
//! (time, sequence number), so a seed replays exactly. It must never read the wall clock, a
//! thread-local random source or the environment.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};

use super::checker::{Checker, entry_hash};
use super::hook::{Client, Workload};
use super::rng::SimRng;
use crate::raft::core::{
    Config, InitialState, MembershipChange, Message, MessageBody, RaftCore, ReadState, Ready, Role,
};
use crate::raft::types::{Entry, HardState, LogIndex, Membership, NodeId, SnapshotMeta, Term};

/// Simulated time units per nominal tick; each node ticks at a rate within ±5 % of it (the
/// drift the default lease margin of 2 ticks in 10 tolerates).
pub const TICK_PERIOD_NOMINAL: u64 = 100;
/// Most nodes a run may grow to through membership changes.
pub const NODES_MAX: usize = 9;
/// Most voters a run may grow to.
pub const VOTERS_MAX: usize = 5;
/// Snapshots each node keeps for sending.
pub const SNAPSHOTS_KEPT_MAX: usize = 4;
/// The background load pauses while the leader has this many writes pending.
const PROPOSER_WRITES_PENDING_MAX: usize = 8;
/// Payload source of fault-free (benchmark) runs.
static BENCH_PAYLOAD: [u8; 4096] = [0; 4096];
/// Bytes of the simulator's own state machine header in a snapshot (applied index, chain).
const SNAPSHOT_HEADER_BYTES: usize = 16;

/// How a run is shaped.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Events processed in the faulty phase.
    pub steps: u64,
    /// Inject faults (partitions, crashes, loss, ...). Off for benchmarks.
    pub faults: bool,
    /// Check invariants after every step.
    pub check: bool,
    /// Chance per step (per million) that the background load proposes.
    pub propose_per_million: u32,
    /// Entries per background proposal burst.
    pub proposal_burst: usize,
    /// Payload bytes of each background proposal.
    pub proposal_bytes: usize,
    /// After the faulty phase, heal everything and require a fresh commit within this many
    /// nominal ticks (0 disables the liveness check).
    pub liveness_ticks: u64,
    /// Fixed cluster size (0 = chosen by the seed among 1, 3 and 5).
    pub nodes: usize,
    /// Snapshot every node whenever it applied this many entries past its last snapshot
    /// (0 = only the fault schedule snapshots). Bounds memory in long benchmark runs.
    pub snapshot_interval_entries: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            steps: 3000,
            faults: true,
            check: true,
            propose_per_million: 150_000,
            proposal_burst: 3,
            proposal_bytes: 16,
            liveness_ticks: 400,
            nodes: 0,
            snapshot_interval_entries: 0,
        }
    }
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default)]
pub struct SimStats {
    /// Events processed.
    pub steps: u64,
    /// Highest committed index reached.
    pub committed: LogIndex,
    /// Leaders elected.
    pub elections: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Crashes injected.
    pub crashes: u64,
    /// Snapshots taken.
    pub snapshots: u64,
    /// Snapshots installed from a leader.
    pub installs: u64,
    /// Membership changes accepted.
    pub membership_changes: u64,
    /// Leadership transfers started.
    pub transfers: u64,
    /// Partitions injected.
    pub partitions: u64,
}

/// A node's durable state.
#[derive(Clone, Debug, Default)]
pub struct Disk {
    /// Durable hard state.
    pub hard_state: HardState,
    /// Durable snapshot and its data.
    pub snapshot: SnapshotMeta,
    /// The snapshot's state machine image.
    pub snapshot_data: Bytes,
    /// Durable entries (may start before the snapshot index: kept for slow followers).
    pub entries: Vec<Entry>,
}

impl Disk {
    /// True if the entry (`index`, `term`) is durable here (in the log or under the snapshot).
    pub fn holds(&self, index: LogIndex, term: Term) -> bool {
        if index <= self.snapshot.index {
            return true;
        }
        let Some(first) = self.entries.first().map(|e| e.index) else {
            return false;
        };
        index >= first
            && self
                .entries
                .get((index - first) as usize)
                .is_some_and(|e| e.term == term)
    }

    fn write_entries(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        if let Some(disk_first) = self.entries.first().map(|e| e.index) {
            let keep = first.index.saturating_sub(disk_first) as usize;
            self.entries.truncate(keep);
        }
        let expected = self
            .entries
            .last()
            .map_or(self.snapshot.index + 1, |e| e.index + 1);
        assert_eq!(first.index, expected, "disk writes are contiguous");
        self.entries.extend_from_slice(entries);
    }
}

#[derive(Debug)]
struct PendingWrite {
    snapshot: Option<(SnapshotMeta, Bytes)>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
}

/// One simulated member.
pub struct SimNode {
    /// Member id.
    pub id: NodeId,
    /// The core; `None` while crashed.
    pub core: Option<RaftCore>,
    /// Durable state (survives crashes).
    pub disk: Disk,
    /// State machine: last applied index.
    pub applied: LogIndex,
    /// State machine: hash chain over applied entries.
    pub chain: u64,
    pub(super) dirty: bool,
    writes: VecDeque<PendingWrite>,
    last_write_due: u64,
    incarnation: u64,
    tick_period: u64,
    disk_latency_max: u64,
    disk_stalled_until: u64,
    reads: Vec<ReadState>,
    snapshots: VecDeque<(LogIndex, Bytes)>,
    received_snapshots: HashMap<LogIndex, Bytes>,
    leader_term_seen: Term,
    commit_checked: LogIndex,
    /// Removed from the group by a committed change and shut down for good (as an operator
    /// stops a removed manager).
    retired: bool,
    seed: u64,
}

impl SimNode {
    fn is_up(&self) -> bool {
        self.core.is_some()
    }
}

#[derive(Debug)]
enum Event {
    Tick {
        node: usize,
        incarnation: u64,
    },
    Deliver {
        message: Message,
        snapshot: Option<Bytes>,
    },
    DiskDone {
        node: usize,
        incarnation: u64,
    },
    Restart {
        node: usize,
    },
}

/// Per-seed core settings and fault rates.
#[derive(Clone, Debug)]
struct Shape {
    pre_vote: bool,
    check_quorum: bool,
    lease_reads: bool,
    inflight_msgs_max: usize,
    append_bytes_max: u64,
    snapshot_keep_entries: u64,
    uncommitted_bytes_max: u64,
    loss_per_million: u32,
    duplicate_per_million: u32,
    long_delay_per_million: u32,
    delay_max: u64,
    fault_per_million: u32,
}

/// The simulated cluster.
pub struct Sim {
    /// The seed everything derives from.
    pub seed: u64,
    /// Run shape.
    pub config: SimConfig,
    /// Invariant checker.
    pub checker: Checker,
    /// Counters.
    pub stats: SimStats,
    /// Nodes, in creation order.
    pub nodes: Vec<SimNode>,
    rng: SimRng,
    workload_rng: SimRng,
    now: u64,
    sequence: u64,
    events: BTreeMap<(u64, u64), Event>,
    blocked: HashSet<(NodeId, NodeId)>,
    link_clock: HashMap<(NodeId, NodeId), u64>,
    shape: Shape,
    next_id: NodeId,
    workload: Option<Box<dyn Workload>>,
    faults_enabled: bool,
    /// Print every delivered message after this time (diagnosis only).
    pub trace_after: Option<u64>,
}

impl Sim {
    /// A cluster shaped by `seed` (size, core settings, fault rates).
    pub fn new(seed: u64, config: SimConfig) -> Self {
        let mut rng = SimRng::new(seed);
        let size = if config.nodes > 0 {
            config.nodes
        } else {
            [1, 3, 3, 3, 5, 5][rng.range(0, 5) as usize]
        };
        // At least one of pre-vote and check-quorum is always on: with both off, a member
        // removed by a change that cannot commit yet may disrupt elections forever (Raft
        // dissertation 4.2.3), which is a documented limitation, not a bug to find.
        let pre_vote = !config.faults || rng.chance(800_000);
        let check_quorum = !config.faults || !pre_vote || rng.chance(800_000);
        let shape = if config.faults {
            Shape {
                pre_vote,
                check_quorum,
                lease_reads: check_quorum && rng.chance(500_000),
                inflight_msgs_max: rng.range(1, 8) as usize,
                append_bytes_max: rng.range(64, 512),
                snapshot_keep_entries: rng.range(0, 40),
                uncommitted_bytes_max: rng.range(1_000, 20_000),
                loss_per_million: rng.range(0, 100_000) as u32,
                duplicate_per_million: rng.range(0, 50_000) as u32,
                long_delay_per_million: rng.range(0, 50_000) as u32,
                delay_max: rng.range(2, 40),
                fault_per_million: rng.range(3_000, 20_000) as u32,
            }
        } else {
            Shape {
                pre_vote: true,
                check_quorum: true,
                lease_reads: false,
                inflight_msgs_max: 256,
                append_bytes_max: 1024 * 1024,
                snapshot_keep_entries: 1000,
                uncommitted_bytes_max: u64::MAX,
                loss_per_million: 0,
                duplicate_per_million: 0,
                long_delay_per_million: 0,
                delay_max: 1,
                fault_per_million: 0,
            }
        };
        let mut sim = Self {
            seed,
            faults_enabled: config.faults,
            config,
            checker: Checker::default(),
            stats: SimStats::default(),
            nodes: Vec::new(),
            workload_rng: SimRng::new(seed ^ 0x5EED_0FC1_1E47),
            rng,
            now: 0,
            sequence: 0,
            events: BTreeMap::new(),
            blocked: HashSet::new(),
            link_clock: HashMap::new(),
            shape,
            next_id: 1,
            workload: None,
            trace_after: None,
        };
        let voters: Vec<NodeId> = (0..size).map(|_| sim.allocate_id()).collect();
        let membership = Membership {
            voters: voters.iter().copied().collect(),
            ..Default::default()
        };
        for id in voters {
            sim.add_node(id, membership.clone());
        }
        sim
    }

    /// Plugs in a client workload (see [`Workload`]); call before running.
    pub fn set_workload(&mut self, mut workload: Box<dyn Workload>) {
        for node in &self.nodes {
            workload.restore(node.id, &Bytes::new());
        }
        self.workload = Some(workload);
    }

    /// Simulated time.
    pub fn now(&self) -> u64 {
        self.now
    }

    fn allocate_id(&mut self) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    fn core_config(&self, id: NodeId, seed: u64) -> Config {
        let mut config = Config::new(id, seed);
        config.pre_vote = self.shape.pre_vote;
        config.check_quorum = self.shape.check_quorum;
        config.lease_reads = self.shape.lease_reads;
        config.inflight_msgs_max = self.shape.inflight_msgs_max;
        config.append_bytes_max = self.shape.append_bytes_max;
        config.snapshot_keep_entries = self.shape.snapshot_keep_entries;
        config.uncommitted_bytes_max = self.shape.uncommitted_bytes_max;
        config
    }

    fn add_node(&mut self, id: NodeId, membership: Membership) -> usize {
        let seed = self.rng.next_u64();
        let tick_period = if self.config.faults {
            self.rng.range(
                TICK_PERIOD_NOMINAL * 95 / 100,
                TICK_PERIOD_NOMINAL * 105 / 100,
            )
        } else {
            TICK_PERIOD_NOMINAL
        };
        let disk = Disk {
            snapshot: SnapshotMeta {
                index: 0,
                term: 0,
                membership,
            },
            ..Disk::default()
        };
        let node = SimNode {
            id,
            core: None,
            disk,
            applied: 0,
            chain: 0,
            dirty: false,
            writes: VecDeque::new(),
            last_write_due: 0,
            incarnation: 0,
            tick_period,
            disk_latency_max: if self.config.faults {
                self.rng.range(1, 20)
            } else {
                1
            },
            disk_stalled_until: 0,
            reads: Vec::new(),
            snapshots: VecDeque::new(),
            received_snapshots: HashMap::new(),
            leader_term_seen: 0,
            commit_checked: 0,
            retired: false,
            seed,
        };
        self.nodes.push(node);
        let index = self.nodes.len() - 1;
        self.start_node(index);
        if let Some(workload) = self.workload.as_mut() {
            workload.restore(id, &Bytes::new());
        }
        index
    }

    fn start_node(&mut self, index: usize) {
        let node = &self.nodes[index];
        let initial = InitialState {
            hard_state: node.disk.hard_state,
            snapshot: node.disk.snapshot.clone(),
            entries: node
                .disk
                .entries
                .iter()
                .filter(|e| e.index > node.disk.snapshot.index)
                .cloned()
                .collect(),
            applied: node.disk.snapshot.index,
        };
        let config = self.core_config(node.id, node.seed ^ node.incarnation);
        let core = RaftCore::new(config, initial);
        let data = self.nodes[index].disk.snapshot_data.clone();
        let node = &mut self.nodes[index];
        node.core = Some(core);
        node.dirty = true;
        restore_state_machine(node, &data, self.workload.as_mut());
        let first_tick = self.now + self.rng.range(1, node.tick_period);
        let incarnation = node.incarnation;
        self.schedule(
            first_tick,
            Event::Tick {
                node: index,
                incarnation,
            },
        );
    }

    fn schedule(&mut self, at: u64, event: Event) {
        self.sequence += 1;
        self.events.insert((at, self.sequence), event);
    }

    fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    // ----- running ---------------------------------------------------------------------

    /// Runs the faulty phase, then the liveness phase; returns the first violation.
    ///
    /// # Errors
    /// The first invariant violation, described.
    pub fn run(&mut self) -> Result<(), String> {
        for _ in 0..self.config.steps {
            if !self.step() {
                break;
            }
            if let Some(violation) = &self.checker.violation {
                return Err(violation.clone());
            }
        }
        if self.config.liveness_ticks > 0 {
            self.check_liveness();
        }
        if let Some(violation) = &self.checker.violation {
            return Err(violation.clone());
        }
        let now = self.now;
        if let Some(workload) = self.workload.as_mut() {
            workload.finish(now)?;
        }
        Ok(())
    }

    /// Processes one event and everything it causes; false if no event is left.
    pub fn step(&mut self) -> bool {
        let Some(((at, _), event)) = self.events.pop_first() else {
            return false;
        };
        self.now = at;
        self.stats.steps += 1;
        self.handle(event);
        if self.faults_enabled && self.rng.chance(self.shape.fault_per_million) {
            self.inject_fault();
        }
        if self.rng.chance(self.config.propose_per_million) {
            self.background_propose();
        }
        if let Some(mut workload) = self.workload.take() {
            let mut client = Client {
                now: self.now,
                nodes: &mut self.nodes,
                rng: &mut self.workload_rng,
            };
            workload.on_step(&mut client);
            self.workload = Some(workload);
        }
        self.drive_dirty();
        if self.config.snapshot_interval_entries > 0 {
            self.snapshot_on_interval();
        }
        true
    }

    fn snapshot_on_interval(&mut self) {
        for index in 0..self.nodes.len() {
            let node = &self.nodes[index];
            let behind = node
                .core
                .as_ref()
                .map_or(0, |c| node.applied - c.snapshot_meta().index);
            if behind >= self.config.snapshot_interval_entries {
                self.snapshot_node(index);
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Tick { node, incarnation } => {
                let n = &mut self.nodes[node];
                if n.incarnation != incarnation {
                    return;
                }
                if let Some(core) = n.core.as_mut() {
                    core.tick();
                    n.dirty = true;
                    let next = self.now + n.tick_period;
                    self.schedule(next, Event::Tick { node, incarnation });
                }
            }
            Event::Deliver { message, snapshot } => self.deliver(message, snapshot),
            Event::DiskDone { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation {
                    self.complete_write(node);
                }
            }
            Event::Restart { node } => {
                if !self.nodes[node].is_up() && !self.nodes[node].retired {
                    self.checker.restarted(self.nodes[node].id);
                    self.start_node(node);
                }
            }
        }
    }

    fn deliver(&mut self, message: Message, snapshot: Option<Bytes>) {
        if self.blocked.contains(&(message.from, message.to)) {
            return;
        }
        let Some(index) = self.index_of(message.to) else {
            return;
        };
        let node = &mut self.nodes[index];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        if self.trace_after.is_some_and(|t| self.now >= t) {
            let brief = match &message.body {
                MessageBody::Append {
                    prev_index,
                    prev_term,
                    entries,
                    commit,
                } => format!(
                    "Append prev=({prev_index},{prev_term}) n={} commit={commit}",
                    entries.len()
                ),
                other => format!("{other:?}"),
            };
            println!(
                "t={} {}->{} term={} {brief}",
                self.now, message.from, message.to, message.term
            );
        }
        if let (MessageBody::Snapshot { meta }, Some(data)) = (&message.body, snapshot) {
            node.received_snapshots.insert(meta.index, data);
        }
        core.step(message);
        node.dirty = true;
        self.stats.delivered += 1;
    }

    fn drive_dirty(&mut self) {
        for index in 0..self.nodes.len() {
            if self.nodes[index].dirty {
                self.nodes[index].dirty = false;
                self.drive(index);
            }
        }
    }

    /// Drains a node's Ready until it has nothing more.
    pub fn drive(&mut self, index: usize) {
        loop {
            let node = &mut self.nodes[index];
            let Some(core) = node.core.as_mut() else {
                return;
            };
            if !core.has_ready() {
                break;
            }
            let ready = core.ready();
            self.handle_ready(index, ready);
        }
        self.observe(index);
        self.serve_reads(index);
    }

    fn handle_ready(&mut self, index: usize, ready: Ready) {
        let check = self.config.check;
        let node = &mut self.nodes[index];
        let id = node.id;
        if check && !ready.entries.is_empty() {
            let core = node.core.as_ref().expect("driven nodes are up");
            self.checker.entries_written(id, core, &ready.entries);
        }
        if ready.snapshot.is_some() || !ready.entries.is_empty() || ready.hard_state.is_some() {
            let snapshot = match ready.snapshot {
                Some(meta) => match node.received_snapshots.remove(&meta.index) {
                    Some(data) => Some((meta, data)),
                    None => {
                        self.checker
                            .report(format!("node {id}: snapshot data missing"));
                        None
                    }
                },
                None => None,
            };
            if snapshot.is_some() {
                self.stats.installs += 1;
            }
            let write = PendingWrite {
                snapshot,
                entries: ready.entries,
                hard_state: ready.hard_state,
            };
            self.queue_write(index, write);
        }
        for message in ready.messages {
            self.send(index, message);
        }
        for entry in &ready.committed_entries {
            self.apply(index, entry);
        }
        self.nodes[index].reads.extend(ready.read_states);
    }

    fn queue_write(&mut self, index: usize, write: PendingWrite) {
        let latency = if self.nodes[index].disk_latency_max == 0 {
            0
        } else {
            self.rng.range(1, self.nodes[index].disk_latency_max)
        };
        let node = &mut self.nodes[index];
        let due = self
            .now
            .max(node.last_write_due)
            .max(node.disk_stalled_until)
            + latency;
        node.last_write_due = due;
        node.writes.push_back(write);
        let incarnation = node.incarnation;
        self.schedule(
            due,
            Event::DiskDone {
                node: index,
                incarnation,
            },
        );
    }

    fn complete_write(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let Some(write) = node.writes.pop_front() else {
            return;
        };
        let id = node.id;
        if let Some((meta, data)) = &write.snapshot {
            node.disk.snapshot = meta.clone();
            node.disk.snapshot_data = data.clone();
            node.disk.entries.clear();
            remember_snapshot(node, meta.index, data.clone());
        }
        node.disk.write_entries(&write.entries);
        if let Some(hard_state) = write.hard_state {
            node.disk.hard_state = hard_state;
        }
        if let Some((meta, data)) = write.snapshot {
            // The state machine is replaced when the snapshot is durable, before any entry
            // after it is handed out for application.
            restore_state_machine(node, &data, self.workload.as_mut());
            if self.config.check {
                self.checker.chain(id, node.applied, node.chain);
            }
            if let Some(core) = node.core.as_mut() {
                core.on_snapshot_installed(meta.index, meta.term);
            }
        }
        let core = node
            .core
            .as_mut()
            .expect("writes of a crashed node are discarded");
        if let Some(hard_state) = write.hard_state {
            core.on_hard_state_persisted(hard_state);
            if self.config.check {
                self.checker.durable_hard_state(id, hard_state);
            }
        }
        if let Some(last) = write.entries.last() {
            core.on_entries_persisted(last.index, last.term);
        }
        node.dirty = true;
    }

    fn send(&mut self, from_index: usize, message: Message) {
        if self.blocked.contains(&(message.from, message.to)) {
            return;
        }
        let snapshot = if let MessageBody::Snapshot { meta } = &message.body {
            let node = &self.nodes[from_index];
            match node.snapshots.iter().find(|(i, _)| *i == meta.index) {
                Some((_, data)) => Some(data.clone()),
                None => return, // nothing to stream: the transfer fails and is retried
            }
        } else {
            None
        };
        if self.rng.chance(self.shape.loss_per_million) {
            return;
        }
        let copies = if self.rng.chance(self.shape.duplicate_per_million) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            // Links are FIFO like a TCP stream, except for occasional long delays that
            // others overtake (reordering, as across a reconnection).
            let at = if self.rng.chance(self.shape.long_delay_per_million) {
                self.now
                    + self
                        .rng
                        .range(self.shape.delay_max, 10 * TICK_PERIOD_NOMINAL)
            } else {
                let link = self
                    .link_clock
                    .entry((message.from, message.to))
                    .or_insert(0);
                let at = (self.now + self.rng.range(1, self.shape.delay_max)).max(*link);
                *link = at;
                at
            };
            self.schedule(
                at,
                Event::Deliver {
                    message: message.clone(),
                    snapshot: snapshot.clone(),
                },
            );
        }
    }

    fn apply(&mut self, index: usize, entry: &Entry) {
        let node = &mut self.nodes[index];
        if entry.index != node.applied + 1 {
            self.checker.report(format!(
                "node {} applied index {} after {}",
                node.id, entry.index, node.applied
            ));
            return;
        }
        node.applied = entry.index;
        if self.config.check {
            node.chain = chain_step(node.chain, entry);
            self.checker.applied(node.id, entry);
            self.checker.chain(node.id, entry.index, node.chain);
        }
        if let Some(workload) = self.workload.as_mut() {
            workload.on_applied(node.id, entry, self.now);
        }
    }

    fn serve_reads(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if node.reads.is_empty() {
            return;
        }
        let applied = node.applied;
        let id = node.id;
        let (ready, waiting): (Vec<ReadState>, Vec<ReadState>) =
            node.reads.drain(..).partition(|r| r.index <= applied);
        node.reads = waiting;
        if let Some(workload) = self.workload.as_mut() {
            for read in ready {
                workload.on_read_ready(id, read, self.now);
            }
        }
    }

    fn observe(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let Some(core) = node.core.as_ref() else {
            return;
        };
        let newly_leader = core.role() == Role::Leader && node.leader_term_seen != core.term();
        if newly_leader {
            node.leader_term_seen = core.term();
            // Commits known before winning were made by earlier leaders.
            node.commit_checked = core.commit_index();
            self.stats.elections += 1;
        }
        if self.config.check {
            self.checker.observe(node.id, core);
            if newly_leader {
                self.checker.leader_elected(node.id, core);
            }
            if core.role() == Role::Leader {
                self.check_durable_quorum(index);
            }
        }
        let commit = self.nodes[index]
            .core
            .as_ref()
            .map_or(0, RaftCore::commit_index);
        self.stats.committed = self.stats.committed.max(commit);
    }

    /// The newest committed entry must be durable on a quorum of the leader's membership
    /// (the one in force, or the previous one if a change was appended in the same step).
    fn check_durable_quorum(&mut self, leader_index: usize) {
        let core = self.nodes[leader_index]
            .core
            .as_ref()
            .expect("leader is up");
        let commit = core.commit_index();
        if commit == 0 || commit <= self.nodes[leader_index].commit_checked {
            return;
        }
        let Some((term, _)) = self.checker.committed_at(commit) else {
            return;
        };
        let current = core.membership();
        let previous = core.membership_at(core.membership_index().saturating_sub(1));
        let durable_quorum = |membership: &Membership| {
            let durable = membership
                .voters
                .iter()
                .filter(|v| {
                    self.index_of(**v)
                        .is_some_and(|i| self.nodes[i].disk.holds(commit, term))
                })
                .count();
            durable >= membership.quorum()
        };
        if !durable_quorum(current) && !durable_quorum(previous) {
            let leader = self.nodes[leader_index].id;
            self.checker.report(format!(
                "committed entry not durable: index {commit} not on a quorum of {:?} (leader {leader})",
                current.voters
            ));
        }
        self.nodes[leader_index].commit_checked = commit;
    }

    // ----- load and faults -------------------------------------------------------------

    fn leader_index(&self) -> Option<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.core.as_ref().map(|c| (i, c)))
            .filter(|(_, c)| c.role() == Role::Leader)
            .max_by_key(|(_, c)| c.term())
            .map(|(i, _)| i)
    }

    fn background_propose(&mut self) {
        let Some(index) = self.leader_index() else {
            return;
        };
        if self.nodes[index].writes.len() >= PROPOSER_WRITES_PENDING_MAX {
            // Backpressure like a node's bounded log-writer queue.
            return;
        }
        // Without faults (benchmarks) payloads are static zeros: measure the core, not the
        // allocator or a shared reference count.
        let shared = (!self.config.faults).then(|| {
            Bytes::from_static(
                &BENCH_PAYLOAD[..self.config.proposal_bytes.min(BENCH_PAYLOAD.len())],
            )
        });
        for _ in 0..self.config.proposal_burst {
            let data = match &shared {
                Some(bytes) => bytes.clone(),
                None => {
                    let mut data = BytesMut::with_capacity(self.config.proposal_bytes);
                    while data.len() + 8 <= self.config.proposal_bytes {
                        data.put_u64(self.rng.next_u64());
                    }
                    data.freeze()
                }
            };
            let node = &mut self.nodes[index];
            let core = node.core.as_mut().expect("leader is up");
            if core.propose(data).is_err() {
                break;
            }
            node.dirty = true;
        }
    }

    fn up_ids(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|n| n.is_up())
            .map(|n| n.id)
            .collect()
    }

    fn inject_fault(&mut self) {
        match self.rng.range(0, 99) {
            0..=14 => self.partition(),
            15..=29 => self.blocked.clear(),
            30..=41 => self.crash_random(),
            42..=49 => self.stall_disk(),
            50..=64 => self.change_membership(),
            65..=74 => self.transfer_leadership(),
            _ => self.take_snapshot(),
        }
    }

    fn partition(&mut self) {
        self.stats.partitions += 1;
        let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
        self.blocked.clear();
        if self.rng.chance(500_000) {
            // Symmetric: split into two sides.
            let side: Vec<bool> = ids.iter().map(|_| self.rng.chance(500_000)).collect();
            for (i, a) in ids.iter().enumerate() {
                for (j, b) in ids.iter().enumerate() {
                    if side[i] != side[j] {
                        self.blocked.insert((*a, *b));
                    }
                }
            }
        } else {
            // Asymmetric: some one-way links fail.
            let cuts = self.rng.range(1, ids.len() as u64 + 1);
            for _ in 0..cuts {
                let a = self.rng.pick(&ids).expect("there are nodes");
                let b = self.rng.pick(&ids).expect("there are nodes");
                if a != b {
                    self.blocked.insert((a, b));
                }
            }
        }
    }

    fn crash_random(&mut self) {
        let Some(id) = self.rng.pick(&self.up_ids()) else {
            return;
        };
        let index = self.index_of(id).expect("picked from the nodes");
        self.crash(index);
        let delay = self
            .rng
            .range(TICK_PERIOD_NOMINAL, 40 * TICK_PERIOD_NOMINAL);
        self.schedule(self.now + delay, Event::Restart { node: index });
    }

    /// Crashes node `index`: everything not yet durable is lost.
    pub fn crash(&mut self, index: usize) {
        self.stats.crashes += 1;
        let node = &mut self.nodes[index];
        node.core = None;
        node.writes.clear();
        node.last_write_due = 0;
        node.incarnation += 1;
        node.reads.clear();
        node.received_snapshots.clear();
        node.dirty = false;
        let id = node.id;
        if let Some(workload) = self.workload.as_mut() {
            workload.on_crash(id);
        }
    }

    fn stall_disk(&mut self) {
        let Some(id) = self.rng.pick(&self.up_ids()) else {
            return;
        };
        let index = self.index_of(id).expect("picked from the nodes");
        let stall = self
            .rng
            .range(TICK_PERIOD_NOMINAL, 30 * TICK_PERIOD_NOMINAL);
        self.nodes[index].disk_stalled_until = self.now + stall;
    }

    fn change_membership(&mut self) {
        let Some(leader) = self.leader_index() else {
            return;
        };
        let core = self.nodes[leader].core.as_ref().expect("leader is up");
        let membership = core.membership().clone();
        let voters: Vec<NodeId> = membership.voters.iter().copied().collect();
        let learners: Vec<NodeId> = membership.learners.iter().copied().collect();
        let members = voters.len() + learners.len();
        let mut new_id = None;
        let change = match self.rng.range(0, 9) {
            0..=2 if members < NODES_MAX && self.nodes.len() < 2 * NODES_MAX => {
                let id = self.next_id;
                new_id = Some(id);
                if self.rng.chance(300_000) && voters.len() < VOTERS_MAX {
                    MembershipChange::AddVoter(id)
                } else {
                    MembershipChange::AddLearner(id)
                }
            }
            3..=4 if !learners.is_empty() && voters.len() < VOTERS_MAX => {
                MembershipChange::AddVoter(self.rng.pick(&learners).expect("not empty"))
            }
            5 if voters.len() > 1 => {
                MembershipChange::Demote(self.rng.pick(&voters).expect("not empty"))
            }
            6..=7 if members > 1 => {
                let all: Vec<NodeId> = voters.iter().chain(learners.iter()).copied().collect();
                MembershipChange::Remove(self.rng.pick(&all).expect("not empty"))
            }
            _ => return,
        };
        let core = self.nodes[leader].core.as_mut().expect("leader is up");
        if core.propose_membership(change).is_ok() {
            self.stats.membership_changes += 1;
            self.nodes[leader].dirty = true;
            if let Some(id) = new_id {
                let allocated = self.allocate_id();
                assert_eq!(allocated, id, "the new member takes the next id");
                self.add_node(id, Membership::default());
            }
        }
    }

    fn transfer_leadership(&mut self) {
        let Some(leader) = self.leader_index() else {
            return;
        };
        let core = self.nodes[leader].core.as_ref().expect("leader is up");
        let voters: Vec<NodeId> = core.membership().voters.iter().copied().collect();
        let Some(target) = self.rng.pick(&voters) else {
            return;
        };
        let core = self.nodes[leader].core.as_mut().expect("leader is up");
        if core.transfer_leadership(target).is_ok() {
            self.stats.transfers += 1;
            self.nodes[leader].dirty = true;
        }
    }

    fn take_snapshot(&mut self) {
        let Some(id) = self.rng.pick(&self.up_ids()) else {
            return;
        };
        let index = self.index_of(id).expect("picked from the nodes");
        self.snapshot_node(index);
    }

    /// Snapshots node `index` at its applied index and compacts its log and disk.
    pub fn snapshot_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        if node.applied <= core.snapshot_meta().index
            || node.writes.iter().any(|w| w.snapshot.is_some())
        {
            return;
        }
        let applied = node.applied;
        let mut data = BytesMut::new();
        data.put_u64(applied);
        data.put_u64(node.chain);
        if let Some(workload) = self.workload.as_mut() {
            data.extend_from_slice(&workload.snapshot(node.id));
        }
        let data = data.freeze();
        let compact_to = core.on_snapshot_created(applied);
        let meta = core.snapshot_meta().clone();
        assert_eq!(
            meta.index, applied,
            "the core records the snapshot just created"
        );
        node.disk.snapshot = meta;
        node.disk.snapshot_data = data.clone();
        node.disk.entries.retain(|e| e.index > compact_to);
        remember_snapshot(node, applied, data);
        node.dirty = true;
        self.stats.snapshots += 1;
    }

    /// One line per node: role, term, vote, leader, log cursors and membership (for
    /// diagnosing a failing seed).
    pub fn describe(&self) -> String {
        let mut out = format!("now={} blocked={:?}\n", self.now, self.blocked);
        for node in &self.nodes {
            match &node.core {
                None => out.push_str(&format!("node {} DOWN\n", node.id)),
                Some(core) => out.push_str(&format!(
                    "node {} {:?} term={} vote={} leader={:?} commit={} applied={} durable={} last={} \
                     first={} snap={} voters={:?} learners={:?} transfer={:?} writes={} {}\n",
                    node.id,
                    core.role(),
                    core.term(),
                    core.vote(),
                    core.leader(),
                    core.commit_index(),
                    core.applied_index(),
                    core.durable_index(),
                    core.last_index(),
                    core.first_index(),
                    core.snapshot_meta().index,
                    core.membership().voters,
                    core.membership().learners,
                    core.transfer_target(),
                    node.writes.len(),
                    core.debug_summary(),
                )),
            }
            if let Some(core) = &node.core {
                for peer in self.nodes.iter().map(|n| n.id) {
                    if let Some(p) = core.progress(peer) {
                        out.push_str(&format!(
                            "    peer {peer}: match={} next={} {:?} probe_sent={} inflight={}\n",
                            p.match_index,
                            p.next_index,
                            p.state,
                            p.probe_sent,
                            p.inflight.len()
                        ));
                    }
                }
            }
        }
        out
    }

    // ----- liveness --------------------------------------------------------------------

    fn check_liveness(&mut self) {
        self.faults_enabled = false;
        self.blocked.clear();
        self.shape.loss_per_million = 0;
        self.shape.duplicate_per_million = 0;
        self.shape.long_delay_per_million = 0;
        for index in 0..self.nodes.len() {
            self.nodes[index].disk_stalled_until = 0;
            if !self.nodes[index].is_up() && !self.nodes[index].retired {
                self.schedule(self.now + 1, Event::Restart { node: index });
            }
        }
        let deadline = self.now + self.config.liveness_ticks * TICK_PERIOD_NOMINAL;
        let mut marker: Option<(usize, LogIndex, Term)> = None;
        while self.now < deadline && self.checker.violation.is_none() {
            if let Some((index, log_index, term)) = marker {
                let done = self.nodes[index].core.as_ref().is_some_and(|c| {
                    c.commit_index() >= log_index && c.log_term(log_index) == Some(term)
                });
                if done {
                    return;
                }
            }
            if let Some(leader) = self.leader_index() {
                let stale = marker.is_none_or(|(i, _, term)| {
                    i != leader
                        || self.nodes[leader]
                            .core
                            .as_ref()
                            .is_some_and(|c| c.term() != term)
                });
                if stale {
                    let core = self.nodes[leader].core.as_mut().expect("leader is up");
                    if let Ok(p) = core.propose(Bytes::from_static(b"liveness")) {
                        marker = Some((leader, p.index, p.term));
                        self.nodes[leader].dirty = true;
                        self.drive_dirty();
                    }
                }
            }
            if !self.step() {
                break;
            }
        }
        if self.checker.violation.is_none() {
            self.checker.report(format!(
                "liveness: no commit within {} ticks after healing",
                self.config.liveness_ticks
            ));
        }
    }
}

fn remember_snapshot(node: &mut SimNode, index: LogIndex, data: Bytes) {
    node.snapshots.push_back((index, data));
    while node.snapshots.len() > SNAPSHOTS_KEPT_MAX {
        node.snapshots.pop_front();
    }
}

fn restore_state_machine(
    node: &mut SimNode,
    data: &Bytes,
    workload: Option<&mut Box<dyn Workload>>,
) {
    if data.len() >= SNAPSHOT_HEADER_BYTES {
        node.applied = u64::from_be_bytes(data[..8].try_into().expect("8 bytes"));
        node.chain = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
    } else {
        node.applied = 0;
        node.chain = 0;
    }
    if let Some(workload) = workload {
        let rest = if data.len() >= SNAPSHOT_HEADER_BYTES {
            data.slice(SNAPSHOT_HEADER_BYTES..)
        } else {
            Bytes::new()
        };
        workload.restore(node.id, &rest);
    }
}

fn chain_step(chain: u64, entry: &Entry) -> u64 {
    let mixed =
        chain.rotate_left(17) ^ entry_hash(entry) ^ entry.term.wrapping_mul(31) ^ entry.index;
    mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}
