//! Typed refusals of the core's client-facing calls.
//!
//! Each variant says what the caller should do next; none may carry a panic-worthy state
//! (broken invariants are assertions, not errors).

use crate::raft::types::NodeId;

/// Why the core refused a proposal, read, membership change or transfer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RaftError {
    /// Only the leader accepts this; retry on `leader` if known, otherwise after an election.
    #[error("not the leader (leader hint: {leader:?})")]
    NotLeader {
        /// The leader this member knows of, if any.
        leader: Option<NodeId>,
    },
    /// The payload exceeds the proposal limit; split it.
    #[error("proposal of {bytes} bytes exceeds the limit of {bytes_max}")]
    ProposalTooLarge {
        /// Size of the refused payload.
        bytes: u64,
        /// The configured limit.
        bytes_max: u64,
    },
    /// The leader holds too many uncommitted bytes (followers or its disk are behind); back
    /// off and retry.
    #[error("too many uncommitted proposals (limit {bytes_max} bytes)")]
    UncommittedLimit {
        /// The configured limit.
        bytes_max: u64,
    },
    /// Leadership is being handed to `target`; retry on the new leader.
    #[error("leadership transfer to {target} in progress")]
    TransferInProgress {
        /// The member that should become leader.
        target: NodeId,
    },
    /// A membership change is not yet committed, or this leader has not yet committed an
    /// entry of its own term; retry shortly.
    #[error("membership change in progress")]
    MembershipChangeInProgress,
    /// The membership change makes no sense (unknown id, removed id reused, last voter).
    #[error("invalid membership change: {reason}")]
    InvalidMembershipChange {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The core is shutting down and accepts nothing new.
    #[error("shutting down")]
    ShuttingDown,
}
