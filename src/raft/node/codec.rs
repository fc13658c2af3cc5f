//! Conversions between the core's messages and their protobuf form on the wire.
//!
//! Pure functions. Must never accept a message that the core could misinterpret: an
//! unknown entry kind or a message without a body is refused, not guessed.

use crate::proto::raft as pb;
use crate::raft::core::{Message, MessageBody, RejectHint};
use crate::raft::types::{Entry, EntryKind, Membership, SnapshotMeta};

/// Why a wire message could not be turned into a core message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The oneof body is missing (a newer peer, or corruption).
    #[error("raft message from {from} has no body")]
    NoBody {
        /// The sender.
        from: u64,
    },
    /// An entry carries a kind this version does not know.
    #[error("entry {index} has unknown kind {kind}")]
    UnknownEntryKind {
        /// The entry's index.
        index: u64,
        /// The kind found.
        kind: u32,
    },
    /// A snapshot notice without metadata.
    #[error("snapshot notice without metadata")]
    NoSnapshotMeta,
}

/// The wire form of `entry`.
pub fn entry_to_pb(entry: &Entry) -> pb::Entry {
    pb::Entry {
        term: entry.term,
        index: entry.index,
        kind: u32::from(entry.kind as u8),
        data: entry.data.clone(),
    }
}

/// The entry `entry` describes.
///
/// # Errors
/// [`DecodeError::UnknownEntryKind`].
pub fn entry_from_pb(entry: pb::Entry) -> Result<Entry, DecodeError> {
    let kind = u8::try_from(entry.kind)
        .ok()
        .and_then(EntryKind::from_tag)
        .ok_or(DecodeError::UnknownEntryKind {
            index: entry.index,
            kind: entry.kind,
        })?;
    Ok(Entry {
        term: entry.term,
        index: entry.index,
        kind,
        data: entry.data,
    })
}

/// The wire form of `membership`.
pub fn membership_to_pb(membership: &Membership) -> pb::Membership {
    pb::Membership {
        voters: membership.voters.iter().copied().collect(),
        learners: membership.learners.iter().copied().collect(),
        removed: membership.removed.iter().copied().collect(),
    }
}

/// The membership `membership` describes.
pub fn membership_from_pb(membership: pb::Membership) -> Membership {
    Membership {
        voters: membership.voters.into_iter().collect(),
        learners: membership.learners.into_iter().collect(),
        removed: membership.removed.into_iter().collect(),
    }
}

/// The wire form of `meta`.
pub fn meta_to_pb(meta: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        index: meta.index,
        term: meta.term,
        membership: Some(membership_to_pb(&meta.membership)),
    }
}

/// The metadata `meta` describes.
pub fn meta_from_pb(meta: pb::SnapshotMeta) -> SnapshotMeta {
    SnapshotMeta {
        index: meta.index,
        term: meta.term,
        membership: meta.membership.map(membership_from_pb).unwrap_or_default(),
    }
}

/// The wire form of `message`.
pub fn message_to_pb(message: &Message) -> pb::Message {
    use pb::message::Body;
    let body = match &message.body {
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => Body::Append(pb::Append {
            prev_index: *prev_index,
            prev_term: *prev_term,
            entries: entries.iter().map(entry_to_pb).collect(),
            commit: *commit,
        }),
        MessageBody::AppendResponse {
            match_index,
            reject,
        } => Body::AppendResponse(pb::AppendResponse {
            match_index: *match_index,
            reject: reject.map(|hint| pb::RejectHint {
                rejected_index: hint.rejected_index,
                hint_index: hint.hint_index,
                hint_term: hint.hint_term,
            }),
        }),
        MessageBody::Heartbeat { commit, round } => Body::Heartbeat(pb::Heartbeat {
            commit: *commit,
            round: *round,
        }),
        MessageBody::HeartbeatResponse { round } => {
            Body::HeartbeatResponse(pb::HeartbeatResponse { round: *round })
        }
        MessageBody::Vote {
            pre_vote,
            transfer,
            last_index,
            last_term,
        } => Body::Vote(pb::Vote {
            pre_vote: *pre_vote,
            transfer: *transfer,
            last_index: *last_index,
            last_term: *last_term,
        }),
        MessageBody::VoteResponse { pre_vote, granted } => Body::VoteResponse(pb::VoteResponse {
            pre_vote: *pre_vote,
            granted: *granted,
        }),
        MessageBody::TimeoutNow => Body::TimeoutNow(pb::TimeoutNow {}),
        MessageBody::Snapshot { meta } => Body::Snapshot(pb::SnapshotNotice {
            meta: Some(meta_to_pb(meta)),
        }),
    };
    pb::Message {
        from: message.from,
        to: message.to,
        term: message.term,
        body: Some(body),
    }
}

/// The core message `message` describes.
///
/// # Errors
/// [`DecodeError`] for a message without a body, an unknown entry kind or a snapshot
/// notice without metadata.
pub fn message_from_pb(message: pb::Message) -> Result<Message, DecodeError> {
    use pb::message::Body;
    let body = match message
        .body
        .ok_or(DecodeError::NoBody { from: message.from })?
    {
        Body::Append(append) => MessageBody::Append {
            prev_index: append.prev_index,
            prev_term: append.prev_term,
            entries: append
                .entries
                .into_iter()
                .map(entry_from_pb)
                .collect::<Result<_, _>>()?,
            commit: append.commit,
        },
        Body::AppendResponse(response) => MessageBody::AppendResponse {
            match_index: response.match_index,
            reject: response.reject.map(|hint| RejectHint {
                rejected_index: hint.rejected_index,
                hint_index: hint.hint_index,
                hint_term: hint.hint_term,
            }),
        },
        Body::Heartbeat(heartbeat) => MessageBody::Heartbeat {
            commit: heartbeat.commit,
            round: heartbeat.round,
        },
        Body::HeartbeatResponse(response) => MessageBody::HeartbeatResponse {
            round: response.round,
        },
        Body::Vote(vote) => MessageBody::Vote {
            pre_vote: vote.pre_vote,
            transfer: vote.transfer,
            last_index: vote.last_index,
            last_term: vote.last_term,
        },
        Body::VoteResponse(response) => MessageBody::VoteResponse {
            pre_vote: response.pre_vote,
            granted: response.granted,
        },
        Body::TimeoutNow(_) => MessageBody::TimeoutNow,
        Body::Snapshot(notice) => MessageBody::Snapshot {
            meta: meta_from_pb(notice.meta.ok_or(DecodeError::NoSnapshotMeta)?),
        },
    };
    Ok(Message {
        from: message.from,
        to: message.to,
        term: message.term,
        body,
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn round_trip(message: Message) {
        let decoded = message_from_pb(message_to_pb(&message)).unwrap();
        assert_eq!(decoded, message);
    }

    #[test]
    fn every_message_kind_survives_the_wire() {
        let meta = SnapshotMeta {
            index: 9,
            term: 3,
            membership: Membership {
                voters: [1, 2].into(),
                learners: [4].into(),
                removed: [3].into(),
            },
        };
        let bodies = vec![
            MessageBody::Append {
                prev_index: 4,
                prev_term: 2,
                entries: vec![
                    Entry {
                        term: 2,
                        index: 5,
                        kind: EntryKind::Normal,
                        data: Bytes::from_static(b"x"),
                    },
                    Entry {
                        term: 3,
                        index: 6,
                        kind: EntryKind::Membership,
                        data: Bytes::new(),
                    },
                ],
                commit: 4,
            },
            MessageBody::AppendResponse {
                match_index: 6,
                reject: Some(RejectHint {
                    rejected_index: 7,
                    hint_index: 5,
                    hint_term: 2,
                }),
            },
            MessageBody::AppendResponse {
                match_index: 6,
                reject: None,
            },
            MessageBody::Heartbeat {
                commit: 5,
                round: 11,
            },
            MessageBody::HeartbeatResponse { round: 11 },
            MessageBody::Vote {
                pre_vote: true,
                transfer: false,
                last_index: 6,
                last_term: 3,
            },
            MessageBody::VoteResponse {
                pre_vote: false,
                granted: true,
            },
            MessageBody::TimeoutNow,
            MessageBody::Snapshot { meta },
        ];
        for body in bodies {
            round_trip(Message {
                from: 1,
                to: 2,
                term: 3,
                body,
            });
        }
    }

    #[test]
    fn unknown_entry_kinds_and_empty_bodies_are_refused() {
        let mut wire = message_to_pb(&Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![Entry {
                    term: 1,
                    index: 1,
                    kind: EntryKind::Normal,
                    data: Bytes::new(),
                }],
                commit: 0,
            },
        });
        if let Some(pb::message::Body::Append(append)) = wire.body.as_mut() {
            append.entries[0].kind = 9;
        }
        assert!(matches!(
            message_from_pb(wire),
            Err(DecodeError::UnknownEntryKind { kind: 9, .. })
        ));
        let empty = pb::Message {
            from: 1,
            to: 2,
            term: 1,
            body: None,
        };
        assert!(matches!(
            message_from_pb(empty),
            Err(DecodeError::NoBody { from: 1 })
        ));
    }
}
