//! Safety invariants, checked incrementally after every simulator step.
//!
//! Owns the global registries (leaders per term, every entry ever written, every committed and
//! applied entry). It must never influence the run: it only observes.

use std::collections::HashMap;

use crate::raft::core::{RaftCore, Role};
use crate::raft::types::{Entry, HardState, LogIndex, NO_NODE, NodeId, Term};

/// A content fingerprint of an entry (kind and payload).
pub fn entry_hash(entry: &Entry) -> u64 {
    let mut hash = 0xCBF2_9CE4_8422_2325u64 ^ entry.kind as u64;
    for chunk in entry.data.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        hash = (hash ^ u64::from_le_bytes(word)).wrapping_mul(0x0100_0000_01B3);
        hash ^= hash >> 29;
    }
    hash ^ entry.data.len() as u64
}

/// What a node last showed, to check monotonicity within one incarnation.
#[derive(Clone, Copy, Debug, Default)]
struct Watermark {
    term: Term,
    vote: NodeId,
    commit: LogIndex,
}

/// The invariant checker.
#[derive(Debug, Default)]
pub struct Checker {
    leaders: HashMap<Term, NodeId>,
    /// (index, term) -> (content hash, term of the previous entry): unique per key iff the
    /// log matching property holds.
    written: HashMap<(LogIndex, Term), (u64, Term)>,
    /// index -> (term, hash) of every entry known committed.
    committed: HashMap<LogIndex, (Term, u64)>,
    committed_max: LogIndex,
    /// Leader term -> highest index that leader committed.
    commit_points: std::collections::BTreeMap<Term, LogIndex>,
    /// index -> (term, hash) of every entry applied anywhere.
    applied: HashMap<LogIndex, (Term, u64)>,
    /// index -> state machine hash chain after applying it.
    chains: HashMap<LogIndex, u64>,
    memory: HashMap<NodeId, Watermark>,
    durable: HashMap<NodeId, Watermark>,
    /// First violation found.
    pub violation: Option<String>,
}

impl Checker {
    fn fail(&mut self, what: String) {
        if self.violation.is_none() {
            self.violation = Some(what);
        }
    }

    /// Highest index known committed anywhere.
    pub fn committed_max(&self) -> LogIndex {
        self.committed_max
    }

    /// The committed (term, hash) at `index`, if known.
    pub fn committed_at(&self, index: LogIndex) -> Option<(Term, u64)> {
        self.committed.get(&index).copied()
    }

    /// A node's disk is about to drop `entries` (truncation or a conflicting snapshot): none of
    /// them may be a committed entry (no committed entry is ever lost from a log holding it).
    pub fn entries_dropped(&mut self, node: NodeId, entries: &[Entry]) {
        for entry in entries {
            if self.committed.get(&entry.index) == Some(&(entry.term, entry_hash(entry))) {
                self.fail(format!(
                    "committed entry lost: node {node} drops committed ({}, {}) from its disk",
                    entry.index, entry.term
                ));
            }
        }
    }

    /// A node restarted: its volatile watermarks start over.
    pub fn restarted(&mut self, node: NodeId) {
        self.memory.remove(&node);
    }

    /// Entries a node is about to persist (and already holds in memory).
    pub fn entries_written(&mut self, node: NodeId, core: &RaftCore, entries: &[Entry]) {
        let mut prev_term = entries.first().and_then(|e| core.log_term(e.index - 1));
        for entry in entries {
            let hash = entry_hash(entry);
            if let Some(prev) = prev_term {
                match self.written.get(&(entry.index, entry.term)) {
                    Some(&(known_hash, known_prev)) if known_hash != hash || known_prev != prev => {
                        self.fail(format!(
                            "log matching: node {node} holds ({}, {}) with a different content \
                             or predecessor than another log",
                            entry.index, entry.term
                        ));
                    }
                    Some(_) => {}
                    None => {
                        self.written.insert((entry.index, entry.term), (hash, prev));
                    }
                }
            }
            prev_term = Some(entry.term);
        }
    }

    /// Role, term, vote and commit of a node after a step.
    pub fn observe(&mut self, node: NodeId, core: &RaftCore) {
        let hard_state = core.hard_state();
        if core.role() == Role::Leader {
            let leader = *self.leaders.entry(core.term()).or_insert(node);
            if leader != node {
                self.fail(format!(
                    "two leaders in term {}: {leader} and {node}",
                    core.term()
                ));
            }
        }
        let previous = self.memory.get(&node).copied().unwrap_or_default();
        if let Some(why) = regression(previous, hard_state) {
            self.fail(format!("node {node} in memory: {why}"));
        }
        if hard_state.commit > previous.commit {
            self.commit_advanced(node, core, previous.commit, hard_state.commit);
            if core.role() == Role::Leader {
                let point = self.commit_points.entry(core.term()).or_insert(0);
                *point = (*point).max(hard_state.commit);
            }
        }
        self.memory.insert(
            node,
            Watermark {
                term: hard_state.term,
                vote: hard_state.vote,
                commit: hard_state.commit,
            },
        );
    }

    fn commit_advanced(&mut self, node: NodeId, core: &RaftCore, from: LogIndex, to: LogIndex) {
        for index in (from + 1)..=to {
            let Some(entry) = core.log_entry(index) else {
                continue;
            };
            let fingerprint = (entry.term, entry_hash(entry));
            match self.committed.get(&index) {
                Some(known) if *known != fingerprint => {
                    self.fail(format!(
                        "two entries committed at index {index}: terms {} and {} (node {node})",
                        known.0, fingerprint.0
                    ));
                }
                Some(_) => {}
                None => {
                    self.committed.insert(index, fingerprint);
                }
            }
        }
        if to > self.committed_max {
            self.committed_max = to;
        }
    }

    /// A new leader must hold every entry committed by leaders of lower terms (leader
    /// completeness). A leader of an older term may legitimately win late, after a higher
    /// term committed more, so only lower-term commits are required.
    pub fn leader_elected(&mut self, node: NodeId, core: &RaftCore) {
        let Some(index) = self
            .commit_points
            .range(..core.term())
            .map(|(_, i)| *i)
            .max()
        else {
            return;
        };
        let Some((term, _)) = self.committed.get(&index).copied() else {
            return;
        };
        if index > core.last_index() || core.log_term(index).is_some_and(|t| t != term) {
            self.fail(format!(
                "leader completeness: leader {node} of term {} lacks committed index {index}",
                core.term()
            ));
        }
    }

    /// A node applied `entry` (state-machine safety).
    pub fn applied(&mut self, node: NodeId, entry: &Entry) {
        let fingerprint = (entry.term, entry_hash(entry));
        match self.applied.get(&entry.index) {
            Some(known) if *known != fingerprint => self.fail(format!(
                "state machine safety: node {node} applied term {} at index {}, another node term {}",
                entry.term, entry.index, known.0
            )),
            Some(_) => {}
            None => {
                self.applied.insert(entry.index, fingerprint);
            }
        }
        if let Some(known) = self.committed.get(&entry.index)
            && *known != fingerprint
        {
            self.fail(format!(
                "node {node} applied index {} which differs from the committed entry",
                entry.index
            ));
        }
    }

    /// A node's hard state became durable.
    pub fn durable_hard_state(&mut self, node: NodeId, hard_state: HardState) {
        let previous = self.durable.get(&node).copied().unwrap_or_default();
        if let Some(why) = regression(previous, hard_state) {
            self.fail(format!("node {node} on disk: {why}"));
        }
        self.durable.insert(
            node,
            Watermark {
                term: hard_state.term,
                vote: hard_state.vote,
                commit: hard_state.commit,
            },
        );
    }

    /// A node's state machine reached `chain` at `index` (by applying or by a snapshot).
    pub fn chain(&mut self, node: NodeId, index: LogIndex, chain: u64) {
        if index == 0 {
            return;
        }
        let known = *self.chains.entry(index).or_insert(chain);
        if known != chain {
            self.fail(format!(
                "state machine safety: node {node} diverged at index {index}"
            ));
        }
    }

    /// Records a violation found by the simulator itself.
    pub fn report(&mut self, what: String) {
        self.fail(what);
    }
}

fn regression(previous: Watermark, now: HardState) -> Option<String> {
    if now.term < previous.term {
        return Some(format!(
            "term went back from {} to {}",
            previous.term, now.term
        ));
    }
    if now.term == previous.term && previous.vote != NO_NODE && now.vote != previous.vote {
        return Some(format!(
            "vote changed within term {} from {} to {}",
            now.term, previous.vote, now.vote
        ));
    }
    if now.commit < previous.commit {
        return Some(format!(
            "commit went back from {} to {}",
            previous.commit, now.commit
        ));
    }
    None
}
