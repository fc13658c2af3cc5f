//! A hand-driven cluster for scenario tests: the test decides every tick, every delivery and
//! every disk completion, so a known-bug scenario can be built step by step.
//!
//! Must never be used outside tests: it has no randomness of its own and no time.

use std::collections::{BTreeMap, HashSet, VecDeque};

use bytes::Bytes;

use crate::raft::core::{
    Config, InitialState, Message, MessageBody, Proposed, RaftCore, RaftError, ReadState, Role,
};
use crate::raft::types::{Entry, HardState, LogIndex, Membership, NodeId, SnapshotMeta};

/// One write handed out by a Ready and not yet durable.
#[derive(Clone, Debug)]
pub struct HarnessWrite {
    /// Snapshot to install.
    pub snapshot: Option<SnapshotMeta>,
    /// Entries to append (truncating any suffix from the first index).
    pub entries: Vec<Entry>,
    /// Hard state to store.
    pub hard_state: Option<HardState>,
}

/// One member of the harness.
pub struct HarnessNode {
    /// The core.
    pub core: RaftCore,
    /// Durable hard state.
    pub hard_state: HardState,
    /// Durable snapshot.
    pub snapshot: SnapshotMeta,
    /// Durable entries after the snapshot.
    pub entries: Vec<Entry>,
    /// Writes not yet durable, oldest first.
    pub pending: VecDeque<HarnessWrite>,
    /// Complete writes as soon as they are handed out.
    pub auto_persist: bool,
    /// Entries applied, in order.
    pub applied: Vec<Entry>,
    /// Reads confirmed.
    pub reads: Vec<ReadState>,
    config: Config,
}

/// The hand-driven cluster.
pub struct Harness {
    /// Members by id.
    pub nodes: BTreeMap<NodeId, HarnessNode>,
    /// Messages in flight, oldest first.
    pub queue: VecDeque<Message>,
    /// Directed links that drop messages.
    pub blocked: HashSet<(NodeId, NodeId)>,
}

impl Harness {
    /// A new group of `voters` and `learners`, every core configured by `tweak`.
    pub fn new(voters: &[NodeId], learners: &[NodeId], tweak: impl Fn(&mut Config)) -> Self {
        let membership = Membership {
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            ..Membership::default()
        };
        let mut harness = Self {
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            blocked: HashSet::new(),
        };
        for id in voters.iter().chain(learners) {
            let mut config = Config::new(*id, *id * 7919);
            tweak(&mut config);
            harness.add(
                config,
                SnapshotMeta {
                    index: 0,
                    term: 0,
                    membership: membership.clone(),
                },
            );
        }
        harness
    }

    /// Adds a member starting from `snapshot` (empty membership for a joiner).
    pub fn add(&mut self, config: Config, snapshot: SnapshotMeta) {
        let initial = InitialState {
            snapshot: snapshot.clone(),
            ..InitialState::default()
        };
        let node = HarnessNode {
            core: RaftCore::new(config.clone(), initial),
            hard_state: HardState::default(),
            snapshot,
            entries: Vec::new(),
            pending: VecDeque::new(),
            auto_persist: true,
            applied: Vec::new(),
            reads: Vec::new(),
            config,
        };
        self.nodes.insert(node.config.id, node);
    }

    /// The member `id`.
    pub fn node(&mut self, id: NodeId) -> &mut HarnessNode {
        self.nodes.get_mut(&id).expect("no such member")
    }

    /// The core of `id`.
    pub fn core(&self, id: NodeId) -> &RaftCore {
        &self.nodes[&id].core
    }

    /// Drains `id`'s Ready: queues writes (completing them if `auto_persist`), messages,
    /// applications and reads.
    pub fn process(&mut self, id: NodeId) {
        loop {
            let node = self.node(id);
            if !node.core.has_ready() {
                break;
            }
            let ready = node.core.ready();
            if ready.snapshot.is_some() || !ready.entries.is_empty() || ready.hard_state.is_some() {
                node.pending.push_back(HarnessWrite {
                    snapshot: ready.snapshot,
                    entries: ready.entries,
                    hard_state: ready.hard_state,
                });
            }
            node.applied.extend(ready.committed_entries);
            node.reads.extend(ready.read_states);
            let auto = node.auto_persist;
            self.queue.extend(ready.messages);
            if auto {
                self.persist(id);
            }
        }
    }

    /// Completes every pending write of `id` and reports it to the core.
    pub fn persist(&mut self, id: NodeId) {
        while self.persist_one(id) {}
    }

    /// Completes the oldest pending write of `id`; false if there was none.
    pub fn persist_one(&mut self, id: NodeId) -> bool {
        let node = self.node(id);
        let Some(write) = node.pending.pop_front() else {
            return false;
        };
        if let Some(meta) = &write.snapshot {
            node.snapshot = meta.clone();
            node.entries.clear();
            node.core.on_snapshot_installed(meta.index, meta.term);
        }
        if let Some(first) = write.entries.first() {
            node.entries.retain(|e| e.index < first.index);
            node.entries.extend(write.entries.iter().cloned());
        }
        if let Some(hard_state) = write.hard_state {
            node.hard_state = hard_state;
            node.core.on_hard_state_persisted(hard_state);
        }
        if let Some(last) = write.entries.last() {
            node.core.on_entries_persisted(last.index, last.term);
        }
        self.process(id);
        true
    }

    /// Persists only the entries of the oldest pending write, leaving its hard state
    /// unwritten (a storage that reorders the two; used to prove the core waits for both).
    pub fn persist_entries_only(&mut self, id: NodeId) {
        let node = self.node(id);
        let Some(write) = node.pending.front_mut() else {
            return;
        };
        let entries = std::mem::take(&mut write.entries);
        if let Some(first) = entries.first() {
            node.entries.retain(|e| e.index < first.index);
            node.entries.extend(entries.iter().cloned());
        }
        if let Some(last) = entries.last() {
            node.core.on_entries_persisted(last.index, last.term);
        }
        self.process(id);
    }

    /// Ticks `id` `ticks` times, processing after each.
    pub fn tick(&mut self, id: NodeId, ticks: u32) {
        for _ in 0..ticks {
            self.node(id).core.tick();
            self.process(id);
        }
    }

    /// Ticks every member `ticks` times and delivers after each round.
    pub fn tick_all(&mut self, ticks: u32) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for _ in 0..ticks {
            for id in &ids {
                self.tick(*id, 1);
            }
            self.deliver_all();
        }
    }

    /// Delivers one queued message (dropped if its link is blocked); false if none queued.
    pub fn deliver_one(&mut self) -> bool {
        let Some(message) = self.queue.pop_front() else {
            return false;
        };
        if self.blocked.contains(&(message.from, message.to)) {
            return true;
        }
        let to = message.to;
        if let Some(node) = self.nodes.get_mut(&to) {
            node.core.step(message);
            self.process(to);
        }
        true
    }

    /// Delivers until nothing is in flight.
    pub fn deliver_all(&mut self) {
        let mut delivered = 0u64;
        while self.deliver_one() {
            delivered += 1;
            assert!(
                delivered < 10_000_000,
                "message storm: the cluster never quiesces"
            );
        }
    }

    /// Steps a message into `id` directly.
    pub fn step(&mut self, message: Message) {
        let to = message.to;
        self.node(to).core.step(message);
        self.process(to);
    }

    /// Makes `id` campaign at once (as if told by a transferring leader) and delivers.
    pub fn campaign(&mut self, id: NodeId) {
        let term = self.core(id).term();
        // Any sender but `id` itself (a core ignores messages from itself).
        let from = *self
            .nodes
            .keys()
            .find(|other| **other != id)
            .unwrap_or(&NodeId::MAX);
        self.step(Message {
            from,
            to: id,
            term,
            body: MessageBody::TimeoutNow,
        });
        self.deliver_all();
    }

    /// Blocks every link to and from `id`.
    pub fn isolate(&mut self, id: NodeId) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for other in ids.into_iter().filter(|o| *o != id) {
            self.blocked.insert((id, other));
            self.blocked.insert((other, id));
        }
    }

    /// Unblocks every link.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Proposes `data` on `id`.
    ///
    /// # Errors
    /// The core's refusal.
    pub fn propose(&mut self, id: NodeId, data: &'static [u8]) -> Result<Proposed, RaftError> {
        let proposed = self.node(id).core.propose(Bytes::from_static(data))?;
        self.process(id);
        Ok(proposed)
    }

    /// The members that consider themselves leader.
    pub fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.core.role() == Role::Leader)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Restarts `id` from its durable state: pending writes and volatile state are lost.
    pub fn crash_restart(&mut self, id: NodeId) {
        let node = self.node(id);
        let initial = InitialState {
            hard_state: node.hard_state,
            snapshot: node.snapshot.clone(),
            entries: node.entries.clone(),
            applied: node.snapshot.index,
        };
        node.pending.clear();
        node.core = RaftCore::new(node.config.clone(), initial);
        node.applied.retain(|e| e.index <= node.snapshot.index);
        node.reads.clear();
        self.queue.retain(|m| m.to != id && m.from != id);
    }

    /// Indexes of the normal entries `id` applied.
    pub fn applied_data(&self, id: NodeId) -> Vec<(LogIndex, Bytes)> {
        self.nodes[&id]
            .applied
            .iter()
            .filter(|e| e.kind == crate::raft::types::EntryKind::Normal)
            .map(|e| (e.index, e.data.clone()))
            .collect()
    }
}
