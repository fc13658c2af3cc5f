//! Messages exchanged between members. Each names its sender, its receiver and the sender's term.
//!
//! Data only: encoding for the wire belongs to the node layer; this module must never do IO.

use crate::raft::types::{Entry, LogIndex, NodeId, SnapshotMeta, Term};

/// Fixed per-entry overhead counted toward message byte limits.
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

/// One message from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The sender's term (for a pre-vote request: the term it would campaign in).
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// Why a follower refused an append, with a hint for fast backtracking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectHint {
    /// The `prev_index` of the refused append.
    pub rejected_index: LogIndex,
    /// The largest index at or below `rejected_index` whose term is at most the refused
    /// `prev_term` (or the follower's last index if its log is shorter).
    pub hint_index: LogIndex,
    /// The follower's term at `hint_index`.
    pub hint_term: Term,
}

/// The payload of a [`Message`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// Leader to follower: entries following (`prev_index`, `prev_term`).
    Append {
        /// Index preceding `entries`.
        prev_index: LogIndex,
        /// Term at `prev_index`.
        prev_term: Term,
        /// Entries to append (may be empty: a probe).
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: LogIndex,
    },
    /// Follower to leader: outcome of an append or snapshot.
    AppendResponse {
        /// On success the follower's log matches the leader's up to here, durably.
        match_index: LogIndex,
        /// `Some` when the append was refused.
        reject: Option<RejectHint>,
    },
    /// Leader to follower: "still here"; carries the commit (capped at what the follower
    /// matches) and a round number echoed for read confirmation and the lease.
    Heartbeat {
        /// Commit index the follower may adopt.
        commit: LogIndex,
        /// Heartbeat round.
        round: u64,
    },
    /// Follower to leader: echo of a heartbeat round.
    HeartbeatResponse {
        /// The round being acknowledged.
        round: u64,
    },
    /// Candidate to voter: a (pre-)vote request.
    Vote {
        /// True for a pre-vote (no term change on either side).
        pre_vote: bool,
        /// True when campaigning because of a leadership transfer: bypasses leader stickiness.
        transfer: bool,
        /// Candidate's last log index.
        last_index: LogIndex,
        /// Candidate's last log term.
        last_term: Term,
    },
    /// Voter to candidate.
    VoteResponse {
        /// Answer to a pre-vote (true) or a vote.
        pre_vote: bool,
        /// Whether the vote was granted.
        granted: bool,
    },
    /// Leader to transfer target: campaign now, skipping pre-vote.
    TimeoutNow,
    /// Leader to follower: the follower needs entries that were compacted; the node layer
    /// streams the snapshot described by `meta` alongside this message.
    Snapshot {
        /// Which snapshot.
        meta: SnapshotMeta,
    },
}

impl Message {
    /// Payload bytes this message counts against flow-control limits.
    pub fn payload_bytes(&self) -> u64 {
        match &self.body {
            MessageBody::Append { entries, .. } => entries_bytes(entries),
            _ => 0,
        }
    }
}

/// Bytes of `entries` as counted by flow control.
pub fn entries_bytes(entries: &[Entry]) -> u64 {
    entries.iter().map(entry_bytes).sum()
}

/// Bytes of one entry as counted by flow control.
pub fn entry_bytes(entry: &Entry) -> u64 {
    entry.data.len() as u64 + ENTRY_OVERHEAD_BYTES
}
