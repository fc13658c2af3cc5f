//! The replication layer: how the components (control, dispatcher, orchestrator, the
//! control duties) write to and read from the replicated state, below them and above the
//! Raft node ([`crate::raft::node`]) and the object store ([`crate::store`]).
//!
//! Owns the format of the manager state machine's log entries ([`entry`]), proposing
//! store transactions ([`propose_transaction`], [`PROPOSE_TIMEOUT`]) and the linearizable
//! read barrier ([`linearizable_read_index`]). The state machine that applies the entries
//! lives in `manager::state`, above this module.
//!
//! Must never apply an entry itself nor import a component above it (`manager`, `control`,
//! `dispatcher`, `orchestrator`, `kv`).

pub mod entry;
mod read_index;

use std::time::Duration;

use crate::proto::objects::Transaction;
use crate::raft::node::{NodeError, NodeHandle};
use crate::store::check_limits;
use crate::wire::Status;

pub use read_index::{READ_TIMEOUT, linearizable_read_index};

/// Deadline of a write's proposal (every component's: control, dispatcher, orchestrator,
/// duties), and of a control write's forward to the leader.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Proposes a store transaction and waits for its outcome: the version it wrote.
///
/// # Errors
/// The transaction's own refusal (conflict → `Aborted`, limits → `ResourceExhausted`, …), or
/// the node's ([`NodeError::to_status`]: not leader, naming the leader; timeout, …).
pub fn propose_transaction(
    node: &NodeHandle,
    txn: &Transaction,
    timeout: Duration,
) -> Result<u64, Status> {
    check_limits(txn).map_err(|e| Status::new(e.code(), e.to_string()))?;
    let reply = node
        .propose(&entry::encode_store(txn), timeout)
        .map_err(|e: NodeError| e.to_status())?;
    entry::decode_store_reply(&reply)
}
