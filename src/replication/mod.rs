//! The replication layer: how the components (control, dispatcher, orchestrator, the
//! control duties) write to and read from the replicated state, below them and above the
//! Raft node ([`crate::raft::node`]) and the object store ([`crate::store`]).
//!
//! Owns the format of the manager state machine's log entries ([`entry`]), proposing
//! store transactions (waiting: [`propose_transaction`], [`PROPOSE_TIMEOUT`]; or not:
//! [`propose_transaction_with`], a completion callback) and the linearizable
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

/// Called once with a store transaction's outcome (the version it wrote, or the refusal),
/// on the node's apply or raft thread: it must not block.
pub type TransactionCallback = Box<dyn FnOnce(Result<u64, Status>) + Send>;

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
    checked(txn)?;
    outcome(node.propose(&entry::encode_store(txn), timeout))
}

/// Proposes a store transaction without waiting: `done` runs once with what
/// [`propose_transaction`] would return (here at once if the transaction is over the limits
/// or the node refuses it; else when the entry is applied here, or the proposal fails: lost
/// leadership, shutdown). No thread waits meanwhile. There is no deadline: `done` runs when
/// the entry's index is applied here (with `Lost` if another entry took it) or when the
/// node stops, which on a member cut off from a quorum may be much later; a caller that
/// must answer sooner answers on its own deadline and ignores the late outcome.
pub fn propose_transaction_with(node: &NodeHandle, txn: &Transaction, done: TransactionCallback) {
    if let Err(refused) = checked(txn) {
        done(Err(refused));
        return;
    }
    node.propose_with(
        &entry::encode_store(txn),
        Box::new(move |result| done(outcome(result))),
    );
}

/// Refuses a transaction over the store's limits before it reaches the log.
fn checked(txn: &Transaction) -> Result<(), Status> {
    check_limits(txn).map_err(|e| Status::new(e.code(), e.to_string()))
}

/// The outcome of a store proposal: the node's failure, or the state machine's reply.
fn outcome(result: Result<bytes::Bytes, NodeError>) -> Result<u64, Status> {
    let reply = result.map_err(|e: NodeError| e.to_status())?;
    entry::decode_store_reply(&reply)
}
