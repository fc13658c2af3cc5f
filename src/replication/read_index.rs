//! The linearizable read barrier: waits until this member's applied state may serve a read
//! that sees every write committed before the read began.
//!
//! Owns nothing but the wait. Must never serve the read itself (the caller reads its own
//! applied state afterwards).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::net::{CallOptions, Transport};
use crate::proto::raft::rpc::READ_INDEX;
use crate::proto::raft::{ReadIndexRequest, ReadIndexResponse};
use crate::raft::node::{NodeError, NodeHandle};
use crate::raft::types::LogIndex;

/// Deadline of a read's wait for the leader's read index and local application.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Waits until this member may serve a linearizable read and returns the read index: the
/// leader confirms its leadership; a follower asks the leader for its commit index and
/// waits to apply it.
///
/// # Errors
/// [`NodeError`]: no leader, timeout, shutting down.
pub fn linearizable_read_index(
    node: &NodeHandle,
    transport: &Transport,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<LogIndex, NodeError> {
    let deadline = Instant::now() + READ_TIMEOUT;
    let leader = node.leader();
    if leader == Some(node.id()) {
        return node.read_barrier_local(READ_TIMEOUT);
    }
    let leader_addr =
        leader
            .and_then(|id| node.directory().addr(id))
            .ok_or(NodeError::NotLeader {
                leader,
                leader_addr: None,
            })?;
    let response: ReadIndexResponse = transport
        .channel(&leader_addr, tls)
        .call(
            READ_INDEX,
            &ReadIndexRequest {},
            CallOptions::timeout(READ_TIMEOUT),
        )
        // A read changes nothing: whatever kept the leader from answering (it died, lost
        // the lead, is busy), a retry in a moment is safe.
        .map_err(|status| NodeError::RetrySoon(format!("leader {leader_addr}: {status}")))?;
    node.wait_applied(response.index, deadline)?;
    Ok(response.index)
}
