//! The log entries of the manager state machine and the replies their application
//! returns.
//!
//! Every application entry starts with a one-byte tag saying whose it is ([`TAG_KV`],
//! [`TAG_STORE`]). Must never change how an entry already written is read: logs and
//! snapshots outlive builds.

use bytes::Bytes;
use prost::Message;

use crate::proto::objects::Transaction;
use crate::store::TxnError;
use crate::wire::{Code, Status};

/// Entries for the key-value map.
pub const TAG_KV: u8 = 1;
/// Entries for the object store (encoded [`Transaction`]s).
pub const TAG_STORE: u8 = 2;

/// The entry proposing `txn` to the object store.
pub fn encode_store(txn: &Transaction) -> Vec<u8> {
    let mut data = Vec::with_capacity(txn.encoded_len() + 1);
    data.push(TAG_STORE);
    txn.encode(&mut data).expect("a Vec grows as needed");
    data
}

/// The entry proposing the key-value `command`.
pub fn encode_kv(command: &crate::proto::kv::Command) -> Vec<u8> {
    let mut data = Vec::with_capacity(command.encoded_len() + 1);
    data.push(TAG_KV);
    command.encode(&mut data).expect("a Vec grows as needed");
    data
}

/// The reply to a store entry: the version it wrote, or why it was refused.
pub fn encode_store_reply(result: Result<u64, TxnError>) -> Bytes {
    let mut out = Vec::with_capacity(16);
    match result {
        Ok(version) => {
            out.push(0);
            out.extend_from_slice(&version.to_be_bytes());
        }
        Err(error) => {
            out.push(1);
            out.push(error.code() as u8);
            out.extend_from_slice(error.to_string().as_bytes());
        }
    }
    Bytes::from(out)
}

/// Reads a reply written by [`encode_store_reply`].
///
/// # Errors
/// The transaction's refusal, or `Internal` if the reply does not decode.
pub fn decode_store_reply(reply: &[u8]) -> Result<u64, Status> {
    match reply.split_first() {
        Some((0, version)) if version.len() == 8 => Ok(u64::from_be_bytes(
            version.try_into().expect("checked length"),
        )),
        Some((1, rest)) if !rest.is_empty() => {
            let code = Code::from_u32(u32::from(rest[0]));
            Err(Status::new(
                code,
                String::from_utf8_lossy(&rest[1..]).into_owned(),
            ))
        }
        _ => Err(Status::internal("undecodable store reply")),
    }
}
