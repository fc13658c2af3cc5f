//! A replicated key-value map on the Raft node: the state machine the node runtime is
//! tested and benchmarked with, and its methods `kv.Apply` (a command through Raft) and
//! `kv.Get` (a linearizable read, from any member).
//!
//! Owns the map. Must never change it except through the node's applier (the apply thread,
//! or the raft thread applying a small batch), in log order.
//!
//! A snapshot copies the map on the apply thread (so that applying goes on while another
//! thread writes the copy out), which is why keys are `Arc<str>` and values `Bytes`: the copy
//! costs a reference count per key and value, not an allocation and a memcpy per key. A
//! write to a key that exists replaces its value in place and allocates no key.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::RwLock;
use prost::Message;

use crate::net::{Router, ServicePool, Transport};
use crate::proto::kv as pb;
use crate::proto::kv::rpc;
use crate::raft::node::{NodeHandle, SnapshotWriter, StateMachine};
use crate::raft::types::LogIndex;
use crate::replication::entry::encode_kv;
use crate::replication::linearizable_read_index;
use crate::wire::Status;

/// Longest key accepted.
pub const KEY_BYTES_MAX: usize = 1024;
/// Longest record accepted while restoring a snapshot (a value is at most one proposal).
pub const SNAPSHOT_RECORD_BYTES_MAX: usize = 4 << 20;
/// Encoded pairs gathered before they are handed to the snapshot's writer (fewer calls
/// through its `dyn Write`; the writer frames and buffers them again anyway).
const SNAPSHOT_BATCH_BYTES: usize = 64 << 10;

type Pairs = BTreeMap<Arc<str>, Bytes>;
type Map = Arc<RwLock<Pairs>>;

/// The state machine: applies [`pb::Command`]s to the map.
#[derive(Clone, Default)]
pub struct KvStateMachine {
    map: Map,
}

impl KvStateMachine {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key` as applied locally (not linearizable by itself).
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.map.read().get(key).cloned()
    }

    /// Replaces this map's contents with `other`'s (a restore built aside).
    pub fn replace_with(&self, other: &KvStateMachine) {
        let fresh = std::mem::take(&mut *other.map.write());
        *self.map.write() = fresh;
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    /// True if the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.read().is_empty()
    }

    /// Applies a decoded `command` at `index` (an entry of the manager state machine) and
    /// returns the encoded [`pb::ApplyResult`], as [`StateMachine::apply`] does.
    pub fn apply_command(&self, index: LogIndex, command: pb::Command) -> Bytes {
        Bytes::from(self.execute(index, command).encode_to_vec())
    }

    fn execute(&self, index: LogIndex, command: pb::Command) -> pb::ApplyResult {
        let mut map = self.map.write();
        let mut result = pb::ApplyResult {
            ok: true,
            index,
            ..Default::default()
        };
        let mut record_previous = |previous: Option<&Bytes>| {
            result.existed = previous.is_some();
            result.previous = previous.cloned().unwrap_or_default();
        };
        match command.op {
            Some(pb::command::Op::Put(put)) => {
                record_previous(set(&mut map, put.key, put.value).as_ref());
            }
            Some(pb::command::Op::Delete(delete)) => {
                record_previous(map.remove(delete.key.as_str()).as_ref());
            }
            Some(pb::command::Op::Cas(cas)) => {
                let current = map.get(cas.key.as_str()).cloned();
                record_previous(current.as_ref());
                let holds = match &current {
                    None => cas.expect_absent,
                    Some(value) => !cas.expect_absent && *value == cas.expected,
                };
                if holds {
                    set(&mut map, cas.key, cas.value);
                }
                result.ok = holds;
            }
            None => result.ok = false,
        }
        result
    }
}

/// Sets `key` to `value`, returning the previous value; allocates a key only if it is new.
fn set(map: &mut Pairs, key: String, value: Bytes) -> Option<Bytes> {
    match map.get_mut(key.as_str()) {
        Some(slot) => Some(std::mem::replace(slot, value)),
        None => map.insert(Arc::from(key), value),
    }
}

impl StateMachine for KvStateMachine {
    fn apply(&mut self, index: LogIndex, data: &[u8]) -> Bytes {
        // Commands were validated before they were proposed; one that does not decode
        // (a newer version's) is applied as a no-op on every member alike.
        let result = match pb::Command::decode(data) {
            Ok(command) => self.execute(index, command),
            Err(_) => pb::ApplyResult {
                ok: false,
                index,
                ..Default::default()
            },
        };
        Bytes::from(result.encode_to_vec())
    }

    fn snapshot(&mut self) -> SnapshotWriter {
        // Keys and values are shared: O(keys) reference counts, no bytes copied.
        let map = self.map.read().clone();
        Box::new(move |out| write_pairs(&map, out))
    }

    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()> {
        let mut fresh = BTreeMap::new();
        let mut record = Vec::new();
        while let Some(len) = read_varint(input)? {
            if len > SNAPSHOT_RECORD_BYTES_MAX {
                return Err(invalid(format!("record of {len} bytes is too large")));
            }
            record.resize(len, 0);
            input.read_exact(&mut record)?;
            let pair = pb::Pair::decode(record.as_slice()).map_err(|e| invalid(e.to_string()))?;
            fresh.insert(Arc::from(pair.key), pair.value);
        }
        *self.map.write() = fresh;
        Ok(())
    }
}

/// Writes `map` as length-delimited [`pb::Pair`]s, in batches of about
/// [`SNAPSHOT_BATCH_BYTES`].
fn write_pairs(map: &Pairs, out: &mut dyn Write) -> std::io::Result<()> {
    let mut batch = Vec::with_capacity(SNAPSHOT_BATCH_BYTES);
    for (key, value) in map {
        encode_pair(key, value, &mut batch);
        if batch.len() >= SNAPSHOT_BATCH_BYTES {
            out.write_all(&batch)?;
            batch.clear();
        }
    }
    out.write_all(&batch)
}

/// Appends `key` and `value` as a length-delimited [`pb::Pair`], the bytes prost would
/// write (proto3: an empty field is left out), without copying them into a message first.
fn encode_pair(key: &str, value: &[u8], out: &mut Vec<u8>) {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
    let field_len = |tag: u32, len: usize| {
        if len == 0 {
            0
        } else {
            key_len(tag) + encoded_len_varint(len as u64) + len
        }
    };
    let body_len = field_len(1, key.len()) + field_len(2, value.len());
    encode_varint(body_len as u64, out);
    for (tag, bytes) in [(1, key.as_bytes()), (2, value)] {
        if !bytes.is_empty() {
            encode_key(tag, WireType::LengthDelimited, out);
            encode_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        }
    }
}

fn invalid(reason: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, reason)
}

/// Reads a protobuf varint; `None` at a clean end of input.
fn read_varint(input: &mut dyn Read) -> std::io::Result<Option<usize>> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        if input.read(&mut byte)? == 0 {
            return if shift == 0 {
                Ok(None)
            } else {
                Err(invalid("snapshot ends inside a length".into()))
            };
        }
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            return usize::try_from(value)
                .map(Some)
                .map_err(|_| invalid("length overflows".into()));
        }
    }
    Err(invalid("length varint is too long".into()))
}

fn validate(command: &pb::Command) -> Result<(), Status> {
    let key = match &command.op {
        Some(pb::command::Op::Put(put)) => &put.key,
        Some(pb::command::Op::Cas(cas)) => &cas.key,
        Some(pb::command::Op::Delete(delete)) => &delete.key,
        None => return Err(Status::invalid_argument("the command has no operation")),
    };
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "keys must be 1 to {KEY_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

/// Serves `kv.Apply` and `kv.Get` for `machine` on `node`: proposals are the manager state
/// machine's kv entries ([`encode_kv`]).
pub fn register(
    router: &mut Router,
    pool: &ServicePool,
    node: &NodeHandle,
    machine: &KvStateMachine,
    transport: &Arc<Transport>,
    client_tls: &Arc<rustls::ClientConfig>,
) {
    let n = node.clone();
    // Inline on the reactor: validation and a `try_send` to the raft thread; the apply
    // thread answers later through the responder.
    router.serve_unary_deferred_inline(rpc::APPLY, move |_, command: pb::Command, responder| {
        if let Err(status) = validate(&command) {
            responder.respond(Err(status));
            return;
        }
        let proposal = encode_kv(&command);
        n.propose_with(
            &proposal,
            Box::new(move |result| {
                responder.respond(result.map_err(|e| e.to_status()).and_then(|reply| {
                    pb::ApplyResult::decode(reply).map_err(|e| Status::internal(e.to_string()))
                }));
            }),
        );
    });
    let (n, m, t, tls) = (
        node.clone(),
        machine.clone(),
        transport.clone(),
        client_tls.clone(),
    );
    router.serve_unary(rpc::GET, pool, move |_, request: pb::GetRequest| {
        let index = linearizable_read_index(&n, &t, &tls).map_err(|e| e.to_status())?;
        let value = m.get(&request.key);
        Ok(pb::GetResponse {
            found: value.is_some(),
            value: value.unwrap_or_default(),
            index,
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &[u8]) -> pb::Command {
        pb::Command {
            op: Some(pb::command::Op::Put(pb::Put {
                key: key.into(),
                value: Bytes::copy_from_slice(value),
            })),
        }
    }

    fn apply(machine: &mut KvStateMachine, index: u64, command: &pb::Command) -> pb::ApplyResult {
        pb::ApplyResult::decode(machine.apply(index, &command.encode_to_vec())).unwrap()
    }

    #[test]
    fn commands_apply_and_cas_checks_its_expectation() {
        let mut machine = KvStateMachine::new();
        assert!(!apply(&mut machine, 1, &put("a", b"1")).existed);
        let cas = |expected: &[u8], value: &[u8]| pb::Command {
            op: Some(pb::command::Op::Cas(pb::Cas {
                key: "a".into(),
                expected: Bytes::copy_from_slice(expected),
                expect_absent: false,
                value: Bytes::copy_from_slice(value),
            })),
        };
        assert!(!apply(&mut machine, 2, &cas(b"0", b"2")).ok);
        assert_eq!(machine.get("a").unwrap(), Bytes::from_static(b"1"));
        let result = apply(&mut machine, 3, &cas(b"1", b"2"));
        assert!(result.ok && result.existed && result.index == 3);
        assert_eq!(machine.get("a").unwrap(), Bytes::from_static(b"2"));
    }

    #[test]
    fn pairs_are_encoded_as_prost_encodes_them() {
        for (key, value) in [("k", &b"v"[..]), ("key", b""), ("", b"value"), ("", b"")] {
            let mut ours = Vec::new();
            encode_pair(key, value, &mut ours);
            let pair = pb::Pair {
                key: key.into(),
                value: Bytes::copy_from_slice(value),
            };
            assert_eq!(ours, pair.encode_length_delimited_to_vec(), "{key:?}");
        }
        let long = vec![7u8; 300];
        let mut ours = Vec::new();
        encode_pair("a longer key", &long, &mut ours);
        let pair = pb::Pair {
            key: "a longer key".into(),
            value: Bytes::from(long),
        };
        assert_eq!(ours, pair.encode_length_delimited_to_vec());
    }

    #[test]
    fn snapshot_round_trips_and_a_damaged_one_changes_nothing() {
        let mut machine = KvStateMachine::new();
        for i in 0..100 {
            apply(
                &mut machine,
                i + 1,
                &put(&format!("k{i}"), &vec![i as u8; 300]),
            );
        }
        let mut image = Vec::new();
        (machine.snapshot())(&mut image).unwrap();
        let mut copy = KvStateMachine::new();
        copy.restore(&mut image.as_slice()).unwrap();
        assert_eq!(*copy.map.read(), *machine.map.read());

        let mut damaged = KvStateMachine::new();
        apply(&mut damaged, 1, &put("keep", b"me"));
        let cut = &image[..image.len() - 10];
        assert!(damaged.restore(&mut &cut[..]).is_err());
        assert_eq!(
            damaged.len(),
            1,
            "a failed restore must leave the old state"
        );
    }
}
