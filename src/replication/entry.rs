//! The log entries of the manager state machine and the replies their application
//! returns.
//!
//! An entry is the byte [`ENTRY_FORMAT_TYPED`] followed by an encoded [`pb::Entry`] (a
//! `oneof`: a store transaction, a kv command). Entries written by earlier builds start
//! with a tag byte instead ([`LEGACY_TAG_KV`], [`LEGACY_TAG_STORE`]) followed by the bare
//! command or transaction; [`decode`] still reads them, so old logs and snapshots apply the
//! same way. The first byte tells the formats apart: an encoded `Entry` never starts with
//! it (its first byte is a field key, `0x0a` or `0x12`), and the legacy tags are 1 and 2.
//!
//! A store transaction's reply is an encoded [`pb::StoreReply`] (the version written, or
//! the refusal). Replies are never stored: the proposer's own build writes and reads them.
//!
//! Must never change how an entry already written is read: logs and snapshots outlive
//! builds.

use bytes::Bytes;
use prost::Message;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

use crate::proto::kv::Command;
use crate::proto::objects::Transaction;
use crate::proto::replication as pb;
use crate::store::{ApplyOutcome, TxnError};
use crate::wire::{Code, Reason, Status};

/// First byte of an entry written by an earlier build for the key-value map (a bare
/// `kv.Command` follows). Read, never written.
pub const LEGACY_TAG_KV: u8 = 1;
/// First byte of an entry written by an earlier build for the object store (a bare
/// `objects.Transaction` follows). Read, never written.
pub const LEGACY_TAG_STORE: u8 = 2;
/// First byte of an entry this build writes: an encoded [`pb::Entry`] follows.
pub const ENTRY_FORMAT_TYPED: u8 = 3;

/// Field numbers of [`pb::Entry`]'s `kind` arms (`proto/flotilla/replication.proto`).
const ENTRY_FIELD_STORE: u32 = 1;
const ENTRY_FIELD_KV: u32 = 2;

/// What an entry asks of the state machine.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// A store transaction.
    Store(Transaction),
    /// A kv command.
    Kv(Command),
    /// An earlier build's store entry: the bare encoded transaction (the store decodes it,
    /// and refuses one that does not decode, as it always did).
    LegacyStore(&'a [u8]),
    /// An earlier build's kv entry: the bare encoded command.
    LegacyKv(&'a [u8]),
    /// Nothing this build knows (a newer build's, or damaged): a no-op on every manager.
    Unknown,
}

/// Reads an entry in either format.
pub fn decode(data: &[u8]) -> Decoded<'_> {
    match data.split_first() {
        Some((&ENTRY_FORMAT_TYPED, entry)) => match pb::Entry::decode(entry) {
            Ok(pb::Entry {
                kind: Some(pb::entry::Kind::Store(txn)),
            }) => Decoded::Store(txn),
            Ok(pb::Entry {
                kind: Some(pb::entry::Kind::Kv(command)),
            }) => Decoded::Kv(command),
            Ok(pb::Entry { kind: None }) | Err(_) => Decoded::Unknown,
        },
        Some((&LEGACY_TAG_STORE, txn)) => Decoded::LegacyStore(txn),
        Some((&LEGACY_TAG_KV, command)) => Decoded::LegacyKv(command),
        _ => Decoded::Unknown,
    }
}

/// The entry proposing `txn` to the object store.
pub fn encode_store(txn: &Transaction) -> Vec<u8> {
    encode_entry(ENTRY_FIELD_STORE, txn)
}

/// The entry proposing the key-value `command`.
pub fn encode_kv(command: &Command) -> Vec<u8> {
    encode_entry(ENTRY_FIELD_KV, command)
}

/// `[ENTRY_FORMAT_TYPED] + Entry { field: payload }`, encoded from a borrowed payload (the
/// bytes `pb::Entry::encode` writes, without cloning the payload into an `Entry`).
fn encode_entry(field: u32, payload: &impl Message) -> Vec<u8> {
    let payload_len = payload.encoded_len();
    let mut data = Vec::with_capacity(
        1 + key_len(field) + encoded_len_varint(payload_len as u64) + payload_len,
    );
    data.push(ENTRY_FORMAT_TYPED);
    encode_key(field, WireType::LengthDelimited, &mut data);
    encode_varint(payload_len as u64, &mut data);
    payload.encode(&mut data).expect("a Vec grows as needed");
    data
}

/// The reply to a store entry: the version it wrote, or why it was refused.
pub fn encode_store_reply(result: &Result<ApplyOutcome, TxnError>) -> Bytes {
    let outcome = match result {
        Ok(outcome) => pb::store_reply::Outcome::Written(pb::Written {
            version: outcome.version,
            repeated: outcome.repeated,
        }),
        Err(error) => pb::store_reply::Outcome::Refused(pb::Refused {
            code: error.code() as u32,
            message: error.to_string(),
            reason: refusal_reason(error) as i32,
        }),
    };
    Bytes::from(
        pb::StoreReply {
            outcome: Some(outcome),
        }
        .encode_to_vec(),
    )
}

/// The reason a caller acts on, for the refusals that have one.
fn refusal_reason(error: &TxnError) -> Reason {
    match error {
        // The request's first answer is no longer kept: nobody can tell what it did.
        TxnError::Superseded { .. } => Reason::OutcomeUnknown,
        _ => Reason::Unspecified,
    }
}

/// Reads a reply written by [`encode_store_reply`]: the version written.
///
/// # Errors
/// The transaction's refusal, or `Internal` if the reply does not decode.
pub fn decode_store_reply(reply: &[u8]) -> Result<u64, Status> {
    let outcome = pb::StoreReply::decode(reply)
        .ok()
        .and_then(|reply| reply.outcome);
    match outcome {
        Some(pb::store_reply::Outcome::Written(written)) => Ok(written.version),
        Some(pb::store_reply::Outcome::Refused(refused)) => {
            Err(Status::new(Code::from_u32(refused.code), refused.message)
                .with_reason(Reason::try_from(refused.reason).unwrap_or(Reason::Unspecified)))
        }
        None => Err(Status::internal("undecodable store reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::kv::{Put, command::Op};

    #[test]
    fn borrowed_encoding_is_the_entry_message_and_both_formats_decode() {
        let command = Command {
            op: Some(Op::Put(Put {
                key: "k".into(),
                value: Bytes::from_static(b"v"),
            })),
        };
        let entry = encode_kv(&command);
        let message = pb::Entry {
            kind: Some(pb::entry::Kind::Kv(command.clone())),
        };
        assert_eq!(entry[0], ENTRY_FORMAT_TYPED);
        assert_eq!(&entry[1..], message.encode_to_vec().as_slice());
        assert!(matches!(decode(&entry), Decoded::Kv(c) if c == command));

        let mut legacy = vec![LEGACY_TAG_KV];
        legacy.extend(command.encode_to_vec());
        assert!(matches!(decode(&legacy), Decoded::LegacyKv(c) if c == &legacy[1..]));
        assert!(matches!(decode(&[9, 1, 2]), Decoded::Unknown));
        assert!(matches!(decode(&[]), Decoded::Unknown));
        // A newer build's arm: decodes, names nothing this build knows.
        assert!(matches!(
            decode(&[ENTRY_FORMAT_TYPED, 0x18, 1]),
            Decoded::Unknown
        ));
    }

    #[test]
    fn a_superseded_request_is_refused_as_outcome_unknown() {
        let refused = decode_store_reply(&encode_store_reply(&Err(TxnError::Superseded {
            seq: 1,
            latest_seq: 2,
        })))
        .unwrap_err();
        assert_eq!(refused.code, Code::Unknown);
        assert_eq!(refused.reason, Reason::OutcomeUnknown);
    }
}
