//! The wire format of the gossip layer: protobuf (`proto/flotilla/gossip.proto`) packets of
//! at most [`PACKET_BYTES_MAX`] bytes and bulk-sync chunks of at most [`BULK_CHUNK_BYTES_MAX`].
//! Owns encoding, packing messages into packets, and decoding with bounds: a decoder checks the
//! size before parsing and every string and list after, and rejects garbage with an error,
//! never a panic. Must never accept a field larger than its limit.

use bytes::Bytes;
use prost::Message as _;

use crate::proto::gossip::{Alive, BulkChunk, Message, Packet, TableEvent, message::Kind};

/// A gossip or probe packet at most (it fits a UDP datagram on any usual path MTU).
pub const PACKET_BYTES_MAX: usize = 1400;
/// A bulk-sync chunk at most.
pub const BULK_CHUNK_BYTES_MAX: usize = 1 << 20;
/// Messages in one packet at most.
pub const PACKET_MESSAGES_MAX: usize = 256;
/// A node name (its id) at most.
pub const NODE_NAME_BYTES_MAX: usize = 64;
/// A node's gossip address at most.
pub const NODE_ADDR_BYTES_MAX: usize = 64;
/// A network name at most.
pub const NETWORK_NAME_BYTES_MAX: usize = 32;
/// Networks one node is attached to at most (they travel in its `Alive`, in one packet).
pub const NETWORKS_PER_NODE_MAX: usize = 24;
/// A table name at most.
pub const TABLE_NAME_BYTES_MAX: usize = 32;
/// An entry key at most.
pub const KEY_BYTES_MAX: usize = 128;
/// An entry value at most (an entry always fits one packet).
pub const VALUE_BYTES_MAX: usize = 1024;
/// Member states in one push-pull packet at most.
pub const PUSH_PULL_MEMBERS_MAX: usize = 64;

/// Why a packet or chunk was refused (it is dropped and counted; nothing else happens).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Larger than its limit.
    #[error("{what} of {len_bytes} bytes is over the limit of {max_bytes}")]
    TooLarge {
        /// What was refused.
        what: &'static str,
        /// Its size.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// Not protobuf of the expected message.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A field over its limit, or a required field missing.
    #[error("invalid field {0}")]
    Invalid(&'static str),
}

/// Bytes a message takes inside a [`Packet`] (its field key, length and body).
pub(crate) fn message_cost_bytes(message: &Message) -> usize {
    let len = message.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// Packs `messages` into as few packets of at most [`PACKET_BYTES_MAX`] as greedy filling
/// gives, in order. A message too large for any packet (never built by this core) is dropped.
pub(crate) fn pack(messages: Vec<Message>) -> Vec<Bytes> {
    let mut packets = Vec::new();
    let mut current = Packet::default();
    let mut used_bytes = 0;
    for message in messages {
        let cost = message_cost_bytes(&message);
        if cost > PACKET_BYTES_MAX {
            continue;
        }
        let full =
            used_bytes + cost > PACKET_BYTES_MAX || current.messages.len() >= PACKET_MESSAGES_MAX;
        if full {
            packets.push(Bytes::from(std::mem::take(&mut current).encode_to_vec()));
            used_bytes = 0;
        }
        used_bytes += cost;
        current.messages.push(message);
    }
    if !current.messages.is_empty() {
        packets.push(Bytes::from(current.encode_to_vec()));
    }
    packets
}

/// A received packet, checked.
///
/// # Errors
/// [`DecodeError`] when it is too large, not a `Packet`, or any message is invalid.
pub fn decode_packet(bytes: &[u8]) -> Result<Packet, DecodeError> {
    check_len("packet", bytes.len(), PACKET_BYTES_MAX)?;
    let packet = Packet::decode(bytes).map_err(|_| DecodeError::Malformed("packet"))?;
    if packet.messages.len() > PACKET_MESSAGES_MAX {
        return Err(DecodeError::Invalid("messages"));
    }
    for message in &packet.messages {
        check_message(message)?;
    }
    Ok(packet)
}

/// A received bulk-sync chunk, checked.
///
/// # Errors
/// [`DecodeError`] when it is too large, not a `BulkChunk`, or any entry is invalid.
pub fn decode_chunk(bytes: &[u8]) -> Result<BulkChunk, DecodeError> {
    check_len("bulk chunk", bytes.len(), BULK_CHUNK_BYTES_MAX)?;
    let chunk = BulkChunk::decode(bytes).map_err(|_| DecodeError::Malformed("bulk chunk"))?;
    check_str("from", &chunk.from, NODE_NAME_BYTES_MAX)?;
    check_networks(&chunk.networks)?;
    for entry in &chunk.entries {
        check_table_event(entry)?;
    }
    Ok(chunk)
}

fn check_len(what: &'static str, len_bytes: usize, max_bytes: usize) -> Result<(), DecodeError> {
    if len_bytes > max_bytes {
        return Err(DecodeError::TooLarge {
            what,
            len_bytes,
            max_bytes,
        });
    }
    Ok(())
}

fn check_str(field: &'static str, value: &str, max_bytes: usize) -> Result<(), DecodeError> {
    if value.len() > max_bytes {
        return Err(DecodeError::Invalid(field));
    }
    Ok(())
}

fn check_name(field: &'static str, value: &str) -> Result<(), DecodeError> {
    if value.is_empty() {
        return Err(DecodeError::Invalid(field));
    }
    check_str(field, value, NODE_NAME_BYTES_MAX)
}

fn check_networks(networks: &[String]) -> Result<(), DecodeError> {
    if networks.len() > NETWORKS_PER_NODE_MAX {
        return Err(DecodeError::Invalid("networks"));
    }
    for network in networks {
        if network.is_empty() {
            return Err(DecodeError::Invalid("network"));
        }
        check_str("network", network, NETWORK_NAME_BYTES_MAX)?;
    }
    Ok(())
}

pub(crate) fn check_alive(alive: &Alive) -> Result<(), DecodeError> {
    check_name("alive.name", &alive.name)?;
    check_str("alive.addr", &alive.addr, NODE_ADDR_BYTES_MAX)?;
    check_networks(&alive.networks)
}

pub(crate) fn check_table_event(event: &TableEvent) -> Result<(), DecodeError> {
    if event.network.is_empty() || event.table.is_empty() {
        return Err(DecodeError::Invalid("table.network"));
    }
    check_str("table.network", &event.network, NETWORK_NAME_BYTES_MAX)?;
    check_str("table.table", &event.table, TABLE_NAME_BYTES_MAX)?;
    check_str("table.key", &event.key, KEY_BYTES_MAX)?;
    check_name("table.owner", &event.owner)?;
    if event.value.len() > VALUE_BYTES_MAX {
        return Err(DecodeError::Invalid("table.value"));
    }
    Ok(())
}

fn check_message(message: &Message) -> Result<(), DecodeError> {
    match message.kind.as_ref().ok_or(DecodeError::Invalid("kind"))? {
        Kind::Ping(ping) => check_name("ping.target", &ping.target),
        Kind::Ack(_) => Ok(()),
        Kind::IndirectPing(ping) => {
            check_name("indirect.target", &ping.target)?;
            check_str("indirect.addr", &ping.target_addr, NODE_ADDR_BYTES_MAX)
        }
        Kind::Alive(alive) => check_alive(alive),
        Kind::Suspect(s) => {
            check_name("suspect.name", &s.name)?;
            check_name("suspect.from", &s.from)
        }
        Kind::Dead(d) => {
            check_name("dead.name", &d.name)?;
            check_name("dead.from", &d.from)
        }
        Kind::PushPull(pp) => {
            check_name("push_pull.from", &pp.from)?;
            if pp.members.len() > PUSH_PULL_MEMBERS_MAX {
                return Err(DecodeError::Invalid("push_pull.members"));
            }
            for state in &pp.members {
                check_alive(state.alive.as_ref().ok_or(DecodeError::Invalid("member"))?)?;
            }
            Ok(())
        }
        Kind::Table(event) => check_table_event(event),
    }
}

/// Bytes a table event takes inside a [`BulkChunk`].
pub(crate) fn chunk_entry_cost_bytes(event: &TableEvent) -> usize {
    let len = event.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}
