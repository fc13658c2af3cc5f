//! Values shared by the Raft core, its storage and the node runtime.
//!
//! Plain data only: this module must never grow behaviour that depends on a clock, IO or
//! another node's state.

use std::collections::BTreeSet;

use bytes::Bytes;

/// A Raft member id. Random, never zero, never reused after removal.
pub type NodeId = u64;
/// A Raft term. Term 0 precedes every election.
pub type Term = u64;
/// A position in the replicated log. Index 0 is the empty prefix; the first entry is 1.
pub type LogIndex = u64;

/// The id meaning "nobody" (no vote cast, no known leader).
pub const NO_NODE: NodeId = 0;

/// What an entry's payload means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EntryKind {
    /// Appended by a new leader at the start of its term; carries no data. Committing it is
    /// what lets the leader commit (and serve reads for) earlier-term entries.
    Blank = 0,
    /// Opaque application data, applied by the state machine.
    Normal = 1,
    /// A membership change; the payload is encoded and interpreted by the Raft core.
    Membership = 2,
}

impl EntryKind {
    /// The kind stored under `tag`, or `None` if the tag is not one of ours (corruption).
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(Self::Blank),
            1 => Some(Self::Normal),
            2 => Some(Self::Membership),
            _ => None,
        }
    }
}

/// One log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The leader term in which the entry was created.
    pub term: Term,
    /// Its position in the log.
    pub index: LogIndex,
    /// How to interpret `data`.
    pub kind: EntryKind,
    /// The payload; cloning shares the buffer.
    pub data: Bytes,
}

/// What a node must persist before it answers any message that depends on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// Whom this node voted for in `term`, or [`NO_NODE`].
    pub vote: NodeId,
    /// The highest index known committed. Persisting it is an optimisation (less replay on
    /// restart), never required for safety.
    pub commit: LogIndex,
}

/// The members of the group: voters decide, learners only replicate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    /// Members counted in every quorum.
    pub voters: BTreeSet<NodeId>,
    /// Members that receive the log but are never counted in any quorum.
    pub learners: BTreeSet<NodeId>,
    /// Ids removed from the group; carried forward so that they are never reused.
    pub removed: BTreeSet<NodeId>,
}

impl Membership {
    /// True if `id` is a voter or a learner.
    pub fn contains(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// The number of votes that forms a majority of the voters.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }
}

/// Describes a snapshot: the state machine after applying every entry up to `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The last entry the snapshot includes.
    pub index: LogIndex,
    /// That entry's term.
    pub term: Term,
    /// The membership in force at `index`.
    pub membership: Membership,
}
