//! Bulk sync, sans-IO: a full exchange of the tables of the networks two nodes share, on
//! join, on reconnect and every 30 s. The sender's side is a cursor over its table store
//! that produces one chunk of at most [`codec::BULK_CHUNK_BYTES_MAX`] at a time when the
//! driver pulls it ([`Gossip::next_chunk`]); the receiver merges each chunk on its own. So
//! memory stays bounded by one chunk per open session whatever the table size (moby #36264:
//! one bulk-sync message reached a 38 GB heap). An unsolicited session's last chunk makes the
//! receiver sync back. Owns the open sessions; must never keep more than
//! [`BULK_SESSIONS_MAX`] nor one idle longer than [`BULK_SESSION_IDLE_MS`].

use std::collections::BTreeMap;

use bytes::Bytes;
use prost::Message as _;

use crate::proto::gossip::BulkChunk;

use super::{Gossip, NodeAddr, codec, table::EntryKey};

/// Bulk-sync sessions this node sends at once at most (more are skipped: a later one will do).
pub const BULK_SESSIONS_MAX: usize = 8;
/// A session not pulled for this long is dropped (its driver lost the stream).
pub const BULK_SESSION_IDLE_MS: u64 = 60_000;
/// Room kept in a chunk for its header (name, session, networks, flags).
const CHUNK_HEADER_BYTES_MAX: usize = 1024;

#[derive(Debug)]
struct Sender {
    peer: String,
    networks: Vec<String>,
    network_index: usize,
    after: Option<EntryKey>,
    unsolicited: bool,
    last_pull_ms: u64,
}

/// The open sending sessions.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    next_id: u64,
    open: BTreeMap<u64, Sender>,
}

impl Sessions {
    pub(super) fn expire(&mut self, now_ms: u64) {
        self.open
            .retain(|_, s| s.last_pull_ms + BULK_SESSION_IDLE_MS > now_ms);
    }
}

impl Gossip {
    /// Opens a session sending the tables this node shares with `peer` (none if they share
    /// no network, a session to it is open, or too many are).
    pub(super) fn start_bulk_sync(&mut self, peer: &str, unsolicited: bool) {
        let Some(member) = self.members.get(peer) else {
            return;
        };
        let networks: Vec<String> = self
            .networks
            .iter()
            .filter(|n| member.networks.contains(*n))
            .cloned()
            .collect();
        self.open_session(peer, networks, unsolicited);
    }

    fn open_session(&mut self, peer: &str, networks: Vec<String>, unsolicited: bool) {
        let busy = self.bulk.open.values().any(|s| s.peer == peer);
        if networks.is_empty() || busy || self.bulk.open.len() >= BULK_SESSIONS_MAX {
            return;
        }
        let Some(addr) = self.members.get(peer).map(|m| m.addr.clone()) else {
            return;
        };
        self.bulk.next_id += 1;
        let id = self.bulk.next_id;
        self.bulk.open.insert(
            id,
            Sender {
                peer: peer.to_string(),
                networks,
                network_index: 0,
                after: None,
                unsolicited,
                last_pull_ms: self.now_ms,
            },
        );
        self.new_sessions.push((id, addr));
    }

    /// The next chunk of session `session`, or `None` once its last chunk was taken (or it
    /// was dropped). The session closes with its last chunk.
    pub fn next_chunk(&mut self, session: u64) -> Option<Bytes> {
        let mut sender = self.bulk.open.remove(&session)?;
        sender.last_pull_ms = self.now_ms;
        let mut chunk = BulkChunk {
            from: self.config.name.clone(),
            session,
            networks: sender.networks.clone(),
            entries: Vec::new(),
            last: false,
            unsolicited: sender.unsolicited,
        };
        let budget = codec::BULK_CHUNK_BYTES_MAX - CHUNK_HEADER_BYTES_MAX;
        let mut used_bytes = 0;
        'fill: while let Some(network) = sender.networks.get(sender.network_index) {
            for (key, entry) in self.tables.network_from(network, sender.after.as_ref()) {
                let event = self.table_event(key, entry);
                let cost = codec::chunk_entry_cost_bytes(&event);
                if used_bytes + cost > budget {
                    break 'fill;
                }
                used_bytes += cost;
                chunk.entries.push(event);
                sender.after = Some(key.clone());
            }
            sender.network_index += 1;
            sender.after = None;
        }
        chunk.last = sender.network_index >= sender.networks.len();
        if !chunk.last {
            self.bulk.open.insert(session, sender);
        }
        Some(Bytes::from(chunk.encode_to_vec()))
    }

    /// The driver lost session `session`'s stream: forget it.
    pub fn abort_session(&mut self, session: u64) {
        self.bulk.open.remove(&session);
    }

    /// Merges a bulk-sync chunk from `from`. Garbage is dropped and counted.
    pub fn receive_chunk(&mut self, _from: &NodeAddr, chunk: &[u8], now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        let Ok(chunk) = codec::decode_chunk(chunk) else {
            self.stats.malformed += 1;
            return;
        };
        for event in chunk.entries {
            if chunk.networks.contains(&event.network) {
                self.on_table_event(event, false);
            }
        }
        if chunk.last && chunk.unsolicited && !self.leaving {
            let shared: Vec<String> = chunk
                .networks
                .into_iter()
                .filter(|n| self.networks.contains(n))
                .collect();
            self.open_session(&chunk.from, shared, false);
        }
    }
}
