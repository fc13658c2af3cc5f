//! A minimal client workload: writes through `propose`, reads through `read_index`, and the
//! check that every read observes each write acknowledged before the read was issued (reads
//! are never stale, whether served by a ReadIndex round or by the leader lease).
//!
//! It exists to exercise the [`Workload`] hook and lease safety under clock drift; the full
//! key-value workload with linearizability checking lives elsewhere. Test harness only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::hook::{Client, Workload};
use crate::raft::core::{Proposed, ReadState};
use crate::raft::types::{Entry, NodeId};

/// A small workload proving the hook: reads (ReadIndex or lease) must observe every write
/// acknowledged before they were issued.
#[derive(Default)]
pub struct ReadsSeeWrites {
    count: HashMap<NodeId, u64>,
    pending: Vec<(NodeId, Proposed)>,
    acknowledged: u64,
    reads: HashMap<u64, u64>,
    next_ctx: u64,
    served: Arc<AtomicU64>,
    violation: Option<String>,
}

impl ReadsSeeWrites {
    /// A workload that adds every served read to `served`.
    pub fn counting(served: Arc<AtomicU64>) -> Self {
        Self {
            served,
            ..Self::default()
        }
    }
}

impl Workload for ReadsSeeWrites {
    fn on_step(&mut self, client: &mut Client<'_>) {
        let Some(leader) = client.leader() else {
            return;
        };
        if client.rng().chance(20_000)
            && let Ok(proposed) = client.propose(leader, Bytes::from_static(b"rw"))
        {
            self.pending.push((leader, proposed));
        }
        if client.rng().chance(20_000) {
            self.next_ctx += 1;
            if client.read_index(leader, self.next_ctx).is_ok() {
                self.reads.insert(self.next_ctx, self.acknowledged);
            }
        }
    }

    fn on_applied(&mut self, node: NodeId, entry: &Entry, _now: u64) {
        if entry.data.as_ref() == b"rw" {
            *self.count.entry(node).or_default() += 1;
        }
        let before = self.pending.len();
        self.pending
            .retain(|(n, p)| !(*n == node && p.index == entry.index && p.term == entry.term));
        self.acknowledged += (before - self.pending.len()) as u64;
    }

    fn on_read_ready(&mut self, node: NodeId, read: ReadState, _now: u64) {
        let Some(expected) = self.reads.remove(&read.ctx) else {
            return;
        };
        self.served.fetch_add(1, Ordering::Relaxed);
        let seen = self.count.get(&node).copied().unwrap_or(0);
        if seen < expected && self.violation.is_none() {
            self.violation = Some(format!(
                "stale read {} on node {node}: {seen} < {expected}",
                read.ctx
            ));
        }
    }

    fn on_crash(&mut self, node: NodeId) {
        self.pending.retain(|(n, _)| *n != node);
    }

    fn snapshot(&mut self, node: NodeId) -> Bytes {
        Bytes::copy_from_slice(&self.count.get(&node).copied().unwrap_or(0).to_be_bytes())
    }

    fn restore(&mut self, node: NodeId, data: &Bytes) {
        let count = data
            .get(..8)
            .map_or(0, |b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        self.count.insert(node, count);
    }

    fn finish(&mut self, _now: u64) -> Result<(), String> {
        match self.violation.take() {
            Some(violation) => Err(violation),
            None => Ok(()),
        }
    }
}
