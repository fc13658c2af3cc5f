//! The member directory: which address reaches which Raft member, replicated through the
//! log as node-internal entries and carried in every snapshot.
//!
//! Normal entries start with a one-byte tag: [`TAG_APP`] entries belong to the state
//! machine, [`TAG_MEMBER_ADDR`] entries update this directory. The state machine never sees
//! node-internal entries. Must never be written to except by the applier (in log order)
//! or by restoring a snapshot; everyone else reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::RwLock;

use crate::raft::types::NodeId;

/// Tag of entries that belong to the application's state machine.
pub const TAG_APP: u8 = 1;
/// Tag of entries that record a member's address.
pub const TAG_MEMBER_ADDR: u8 = 2;
/// Longest address accepted in the directory (a `host:port` is far shorter).
pub const ADDR_BYTES_MAX: usize = 256;

/// A decoded Normal entry payload.
#[derive(Debug, PartialEq, Eq)]
pub enum Payload {
    /// For the state machine.
    App(Bytes),
    /// `id` is reachable at `addr`.
    MemberAddr {
        /// The member.
        id: NodeId,
        /// Its advertised address.
        addr: String,
    },
}

/// Wraps application data for the log.
pub fn encode_app(data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 1);
    out.put_u8(TAG_APP);
    out.put_slice(data);
    out.freeze()
}

/// Encodes a directory update for the log.
pub fn encode_member_addr(id: NodeId, addr: &str) -> Bytes {
    assert!(addr.len() <= ADDR_BYTES_MAX, "address too long");
    let mut out = BytesMut::with_capacity(addr.len() + 9);
    out.put_u8(TAG_MEMBER_ADDR);
    out.put_u64(id);
    out.put_slice(addr.as_bytes());
    out.freeze()
}

/// Decodes a Normal entry payload; `None` for anything not written by this module
/// (corruption: the caller stops rather than guess).
pub fn decode(data: &Bytes) -> Option<Payload> {
    match *data.first()? {
        TAG_APP => Some(Payload::App(data.slice(1..))),
        TAG_MEMBER_ADDR if data.len() >= 9 => {
            let id = u64::from_be_bytes(data[1..9].try_into().ok()?);
            let addr = std::str::from_utf8(&data[9..]).ok()?.to_string();
            (addr.len() <= ADDR_BYTES_MAX).then_some(Payload::MemberAddr { id, addr })
        }
        _ => None,
    }
}

/// The shared directory: the apply thread writes, peer threads and status readers read.
#[derive(Clone, Debug, Default)]
pub struct Directory {
    inner: Arc<RwLock<BTreeMap<NodeId, String>>>,
}

impl Directory {
    /// The address of `id`, if known.
    pub fn addr(&self, id: NodeId) -> Option<String> {
        self.inner.read().get(&id).cloned()
    }

    /// True if `id` is known at `addr` (no copy: the raft thread checks it per send).
    pub fn addr_is(&self, id: NodeId, addr: &str) -> bool {
        self.inner
            .read()
            .get(&id)
            .is_some_and(|known| known == addr)
    }

    /// Records that `id` is at `addr`.
    pub fn set(&self, id: NodeId, addr: String) {
        self.inner.write().insert(id, addr);
    }

    /// Records `addr` for `id` only if nothing is known yet (addresses learned from
    /// traffic never override replicated ones).
    pub fn learn(&self, id: NodeId, addr: &str) {
        // Called for every inbound batch: the common case (already known) takes only the
        // read lock.
        if self.inner.read().contains_key(&id) {
            return;
        }
        let mut map = self.inner.write();
        map.entry(id).or_insert_with(|| addr.to_string());
    }

    /// A copy of every entry.
    pub fn all(&self) -> BTreeMap<NodeId, String> {
        self.inner.read().clone()
    }

    /// Replaces everything (snapshot restore).
    pub fn replace(&self, all: BTreeMap<NodeId, String>) {
        *self.inner.write() = all;
    }

    /// The snapshot section: `count u32`, then `id u64, len u16, addr` per member.
    pub fn encode(&self) -> Vec<u8> {
        let map = self.inner.read();
        let mut out = Vec::with_capacity(4 + map.len() * 32);
        out.extend_from_slice(&u32::try_from(map.len()).expect("few members").to_be_bytes());
        for (id, addr) in map.iter() {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&u16::try_from(addr.len()).expect("short addr").to_be_bytes());
            out.extend_from_slice(addr.as_bytes());
        }
        out
    }

    /// Parses [`Directory::encode`]'s output.
    pub fn decode_section(mut data: &[u8]) -> Option<BTreeMap<NodeId, String>> {
        let mut take = |n: usize| -> Option<&[u8]> {
            let (head, rest) = data.split_at_checked(n)?;
            data = rest;
            Some(head)
        };
        let count = u32::from_be_bytes(take(4)?.try_into().ok()?);
        let mut map = BTreeMap::new();
        for _ in 0..count {
            let id = u64::from_be_bytes(take(8)?.try_into().ok()?);
            let len = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
            if len > ADDR_BYTES_MAX {
                return None;
            }
            let addr = std::str::from_utf8(take(len)?).ok()?.to_string();
            map.insert(id, addr);
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_and_sections_round_trip() {
        assert_eq!(
            decode(&encode_app(b"hello")),
            Some(Payload::App(Bytes::from_static(b"hello")))
        );
        assert_eq!(
            decode(&encode_member_addr(7, "10.0.0.1:4242")),
            Some(Payload::MemberAddr {
                id: 7,
                addr: "10.0.0.1:4242".into()
            })
        );
        assert_eq!(decode(&Bytes::from_static(&[9, 1, 2])), None);
        assert_eq!(decode(&Bytes::new()), None);
        let dir = Directory::default();
        dir.set(1, "a:1".into());
        dir.set(2, "b:2".into());
        dir.learn(2, "ignored:3");
        let section = dir.encode();
        assert_eq!(Directory::decode_section(&section), Some(dir.all()));
        assert_eq!(
            Directory::decode_section(&section[..section.len() - 1]),
            None
        );
    }
}
