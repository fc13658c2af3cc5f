//! The plug-in point for client workloads (for example a key-value store checked for
//! linearizability): a [`Workload`] acts through a [`Client`] after every simulator step and
//! observes what every node applies and which reads it confirmed.
//!
//! A workload must never reach into the simulator beyond [`Client`]: everything it does has
//! to stay reproducible from the seed.

use bytes::Bytes;

use super::rng::SimRng;
use crate::raft::core::{Proposed, RaftError, ReadState, Role};
use crate::raft::types::{Entry, NodeId, Term};

/// A client workload driven by the simulator.
///
/// Call order per node: `restore` (at start with empty data, after a restart, after a snapshot
/// install), then `on_applied` for each applied entry in log order; `snapshot` whenever the
/// simulator compacts that node; `on_crash` when the node loses its volatile state.
pub trait Workload {
    /// Called after every simulator step: may propose or request reads through `client`.
    fn on_step(&mut self, client: &mut Client<'_>);
    /// `node` applied `entry` (every kind; client data is in `EntryKind::Normal` entries).
    fn on_applied(&mut self, node: NodeId, entry: &Entry, now: u64);
    /// A read requested on `node` with [`Client::read_index`] is confirmed and `node` has
    /// applied at least `read.index`: it may be served from `node`'s state now.
    fn on_read_ready(&mut self, node: NodeId, read: ReadState, now: u64);
    /// `node` crashed: its state machine and every request pending on it are gone.
    fn on_crash(&mut self, node: NodeId);
    /// Serializes `node`'s state machine (for a snapshot).
    fn snapshot(&mut self, node: NodeId) -> Bytes;
    /// Replaces `node`'s state machine with `data` (empty = initial state).
    fn restore(&mut self, node: NodeId, data: &Bytes);
    /// The verdict once the run is over (e.g. the linearizability check).
    ///
    /// # Errors
    /// A description of the violation found.
    fn finish(&mut self, now: u64) -> Result<(), String>;
}

/// A live node as seen by a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Node id.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its term.
    pub term: Term,
}

/// What a workload may do during a step.
pub struct Client<'a> {
    pub(super) now: u64,
    pub(super) nodes: &'a mut [super::cluster::SimNode],
    pub(super) rng: &'a mut SimRng,
}

impl Client<'_> {
    /// Simulated time.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// A random generator derived from the seed (use it, not another source, to replay).
    pub fn rng(&mut self) -> &mut SimRng {
        self.rng
    }

    /// Live nodes.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.nodes
            .iter()
            .filter_map(|n| {
                n.core.as_ref().map(|c| NodeView {
                    id: n.id,
                    role: c.role(),
                    term: c.term(),
                })
            })
            .collect()
    }

    /// The live leader with the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes()
            .into_iter()
            .filter(|n| n.role == Role::Leader)
            .max_by_key(|n| n.term)
            .map(|n| n.id)
    }

    /// Proposes `data` on `node`.
    ///
    /// # Errors
    /// The core's refusal, or [`RaftError::ShuttingDown`] if `node` is down.
    pub fn propose(&mut self, node: NodeId, data: Bytes) -> Result<Proposed, RaftError> {
        self.core(node)?.propose(data)
    }

    /// Requests a linearizable read `ctx` on `node`; [`Workload::on_read_ready`] follows.
    ///
    /// # Errors
    /// The core's refusal, or [`RaftError::ShuttingDown`] if `node` is down.
    pub fn read_index(&mut self, node: NodeId, ctx: u64) -> Result<(), RaftError> {
        self.core(node)?.read_index(ctx)
    }

    fn core(&mut self, node: NodeId) -> Result<&mut crate::raft::core::RaftCore, RaftError> {
        self.nodes
            .iter_mut()
            .find(|n| n.id == node)
            .and_then(|n| {
                n.dirty = true;
                n.core.as_mut()
            })
            .ok_or(RaftError::ShuttingDown)
    }
}
