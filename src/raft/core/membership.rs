//! Single-server membership changes: validation and the encoding of membership entries.
//!
//! A membership entry carries the whole resulting membership (voters, learners, removed ids),
//! so a member that joins late learns the full group from the entry that added it. The new
//! membership takes effect as soon as the entry is appended (Raft dissertation, 4.1).

use std::collections::BTreeSet;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::error::RaftError;
use crate::raft::types::{Membership, NO_NODE, NodeId};

/// Largest member count a membership entry may describe (a sanity bound on decoding).
pub const MEMBERS_MAX: usize = 4096;

/// One single-server change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a new member that replicates but does not vote.
    AddLearner(NodeId),
    /// Add a voter: a new id, or promote an existing learner.
    AddVoter(NodeId),
    /// Turn a voter into a learner.
    Demote(NodeId),
    /// Remove a member; its id can never be used again.
    Remove(NodeId),
}

/// The membership that results from applying `change` to `current`.
///
/// # Errors
/// [`RaftError::InvalidMembershipChange`] if the change is a no-op, reuses a removed id, names
/// an unknown member, or would leave no voter.
pub fn apply_change(
    current: &Membership,
    change: MembershipChange,
) -> Result<Membership, RaftError> {
    let invalid = |reason| Err(RaftError::InvalidMembershipChange { reason });
    let mut next = current.clone();
    match change {
        MembershipChange::AddLearner(id) | MembershipChange::AddVoter(id)
            if id == NO_NODE || current.removed.contains(&id) =>
        {
            return invalid("id is zero or was removed; ids are never reused");
        }
        MembershipChange::AddLearner(id) => {
            if current.contains(id) {
                return invalid("already a member");
            }
            next.learners.insert(id);
        }
        MembershipChange::AddVoter(id) => {
            if current.voters.contains(&id) {
                return invalid("already a voter");
            }
            next.learners.remove(&id);
            next.voters.insert(id);
        }
        MembershipChange::Demote(id) => {
            if !current.voters.contains(&id) {
                return invalid("not a voter");
            }
            next.voters.remove(&id);
            next.learners.insert(id);
        }
        MembershipChange::Remove(id) => {
            if !current.contains(id) {
                return invalid("not a member");
            }
            next.voters.remove(&id);
            next.learners.remove(&id);
            next.removed.insert(id);
        }
    }
    if next.voters.is_empty() {
        return invalid("the group would have no voter");
    }
    Ok(next)
}

/// Encodes a membership as the payload of a membership entry.
pub fn encode(membership: &Membership) -> Bytes {
    let ids = membership.voters.len() + membership.learners.len() + membership.removed.len();
    let mut buf = BytesMut::with_capacity(12 + 8 * ids);
    for set in [
        &membership.voters,
        &membership.learners,
        &membership.removed,
    ] {
        buf.put_u32(u32::try_from(set.len()).expect("member sets are bounded by MEMBERS_MAX"));
        for id in set {
            buf.put_u64(*id);
        }
    }
    buf.freeze()
}

/// Decodes a membership entry's payload; `None` if it is malformed.
pub fn decode(mut data: &[u8]) -> Option<Membership> {
    let mut sets: [BTreeSet<NodeId>; 3] = Default::default();
    for set in &mut sets {
        if data.remaining() < 4 {
            return None;
        }
        let count = data.get_u32() as usize;
        if count > MEMBERS_MAX || data.remaining() < count * 8 {
            return None;
        }
        for _ in 0..count {
            set.insert(data.get_u64());
        }
    }
    if data.has_remaining() {
        return None;
    }
    let [voters, learners, removed] = sets;
    Some(Membership {
        voters,
        learners,
        removed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voters(ids: &[NodeId]) -> Membership {
        Membership {
            voters: ids.iter().copied().collect(),
            ..Membership::default()
        }
    }

    #[test]
    fn encoding_round_trips() {
        let mut m = voters(&[1, 2, 3]);
        m.learners.insert(9);
        m.removed.insert(4);
        assert_eq!(decode(&encode(&m)), Some(m));
        assert_eq!(decode(&[0, 0]), None);
    }

    #[test]
    fn removed_ids_are_never_reused() {
        let m = apply_change(&voters(&[1, 2, 3]), MembershipChange::Remove(3)).unwrap();
        assert!(m.removed.contains(&3));
        assert!(matches!(
            apply_change(&m, MembershipChange::AddLearner(3)),
            Err(RaftError::InvalidMembershipChange { .. })
        ));
        assert!(matches!(
            apply_change(&m, MembershipChange::AddVoter(3)),
            Err(RaftError::InvalidMembershipChange { .. })
        ));
    }

    #[test]
    fn last_voter_cannot_leave() {
        assert!(apply_change(&voters(&[1]), MembershipChange::Remove(1)).is_err());
        let m = apply_change(&voters(&[1]), MembershipChange::AddLearner(2)).unwrap();
        let m = apply_change(&m, MembershipChange::AddVoter(2)).unwrap();
        assert_eq!(m.voters.len(), 2);
        assert!(m.learners.is_empty());
    }
}
