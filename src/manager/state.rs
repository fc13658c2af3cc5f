//! The manager's replicated state machine: the object store (cluster state) and, when
//! `manager.conf` turns it on (`kv_enabled`, for tests and benchmarks), the key-value map,
//! side by side in one Raft log.
//!
//! Entries are read as [`crate::replication::entry`] defines them; without the map, its
//! entries are no-ops. A snapshot holds each part as a framed section (so neither needs to
//! know its size in advance), in one of two layouts told apart by the first byte:
//! - with the map (and every snapshot of earlier builds): the map's section, then the
//!   store's; it starts with a frame length, at most [`SECTION_FRAME_BYTES_MAX`], whose
//!   first (big-endian) byte is 0;
//! - without the map: the byte [`SNAPSHOT_STORE_ONLY`], then the store's section.
//!
//! Either restores with the map on or off (a map section is skipped when the map is off;
//! the map is empty after a store-only snapshot). Must never apply an entry out of log
//! order or to the wrong part.

use std::io::{Read, Write};
use std::sync::Arc;

use bytes::Bytes;

use crate::control::access::AccessList;
use crate::kv::KvStateMachine;
use crate::raft::node::{SnapshotWriter, StateMachine};
use crate::raft::types::LogIndex;
use crate::replication::entry::{self, Decoded, encode_store_reply};
use crate::store::Store;

/// Bytes per frame of a snapshot section.
pub const SECTION_FRAME_BYTES_MAX: usize = 64 * 1024;
/// First byte of a snapshot without the key-value map's section.
pub const SNAPSHOT_STORE_ONLY: u8 = 1;

/// The key-value map and the object store as one state machine.
#[derive(Clone)]
pub struct ManagerState {
    /// The key-value map, if `manager.conf` turns it on (tests and benchmarks).
    pub kv: Option<KvStateMachine>,
    /// The object store.
    pub store: Arc<Store>,
    /// Revocations derived from the store, kept in step here from each transaction's
    /// events, and rebuilt after a restore.
    pub access: Arc<AccessList>,
}

impl ManagerState {
    /// An empty state: no entries applied; with the key-value map if `kv_enabled`.
    pub fn new(store_config: crate::store::StoreConfig, kv_enabled: bool) -> ManagerState {
        ManagerState {
            kv: kv_enabled.then(KvStateMachine::new),
            store: Arc::new(Store::new(store_config)),
            access: AccessList::new(),
        }
    }

    /// Applies a store transaction's outcome to the access list and encodes its reply.
    fn answer_store(
        &self,
        result: Result<crate::store::ApplyOutcome, crate::store::TxnError>,
    ) -> Bytes {
        if let Ok(outcome) = &result {
            self.access.apply_events(&outcome.events);
        }
        encode_store_reply(&result)
    }
}

impl StateMachine for ManagerState {
    fn apply(&mut self, index: LogIndex, data: &[u8]) -> Bytes {
        match entry::decode(data) {
            Decoded::Store(txn) => self.answer_store(self.store.apply(index, &txn)),
            Decoded::Kv(command) => match &self.kv {
                Some(kv) => kv.apply_command(index, command),
                None => Bytes::new(),
            },
            Decoded::LegacyStore(txn) => self.answer_store(self.store.apply_encoded(index, txn)),
            Decoded::LegacyKv(command) => match &mut self.kv {
                Some(kv) => kv.apply(index, command),
                None => Bytes::new(),
            },
            // Written by a newer version: ignored alike on every manager.
            Decoded::Unknown => Bytes::new(),
        }
    }

    fn snapshot(&mut self) -> SnapshotWriter {
        let kv = self.kv.as_mut().map(|kv| kv.snapshot());
        let mut store = self.store.snapshot();
        Box::new(move |out| {
            match kv {
                Some(kv) => {
                    let mut section = FramedWriter::new(&mut *out);
                    kv(&mut section)?;
                    section.finish()?;
                }
                None => out.write_all(&[SNAPSHOT_STORE_ONLY])?,
            }
            let mut section = FramedWriter::new(&mut *out);
            std::io::copy(&mut store, &mut section)?;
            section.finish()
        })
    }

    fn release_idle_memory(&mut self) {
        self.store.shrink_watch_history();
    }

    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()> {
        // The map restores aside and swaps after the store restored; the store restores
        // aside and swaps too. A damaged section changes neither.
        let mut first = [0u8; 1];
        input.read_exact(&mut first)?;
        let mut kv = KvStateMachine::new();
        match first[0] {
            SNAPSHOT_STORE_ONLY => {}
            0 => {
                // A frame length's first byte: the map's section comes first.
                let mut input = std::io::Cursor::new(first).chain(&mut *input);
                let mut section = FramedReader::new(&mut input);
                if self.kv.is_some() {
                    kv.restore(&mut section)?;
                } else {
                    std::io::copy(&mut section, &mut std::io::sink())?;
                }
                return self.restore_store_then_kv(&mut input, &kv);
            }
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("snapshot starts with the unknown byte {other}"),
                ));
            }
        }
        self.restore_store_then_kv(input, &kv)
    }
}

impl ManagerState {
    fn restore_store_then_kv(
        &mut self,
        input: &mut dyn Read,
        kv: &KvStateMachine,
    ) -> std::io::Result<()> {
        self.store
            .restore(FramedReader::new(input))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
        if let Some(map) = &self.kv {
            map.replace_with(kv);
        }
        self.access.refresh(&self.store);
        Ok(())
    }
}

/// Splits everything written to it into frames `u32 length, bytes`, ended by a zero length.
struct FramedWriter<'a> {
    out: &'a mut dyn Write,
    buffer: Vec<u8>,
}

impl<'a> FramedWriter<'a> {
    fn new(out: &'a mut dyn Write) -> Self {
        Self {
            out,
            buffer: Vec::with_capacity(SECTION_FRAME_BYTES_MAX),
        }
    }

    fn emit(&mut self) -> std::io::Result<()> {
        if !self.buffer.is_empty() {
            let len = u32::try_from(self.buffer.len()).expect("frames are small");
            self.out.write_all(&len.to_be_bytes())?;
            self.out.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<()> {
        self.emit()?;
        self.out.write_all(&0u32.to_be_bytes())
    }
}

impl Write for FramedWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = SECTION_FRAME_BYTES_MAX - self.buffer.len();
        let n = data.len().min(room);
        self.buffer.extend_from_slice(&data[..n]);
        if self.buffer.len() == SECTION_FRAME_BYTES_MAX {
            self.emit()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Reads one section written by [`FramedWriter`]; reports end of input at its terminator.
struct FramedReader<'a> {
    input: &'a mut dyn Read,
    left_in_frame: usize,
    ended: bool,
}

impl<'a> FramedReader<'a> {
    fn new(input: &'a mut dyn Read) -> Self {
        Self {
            input,
            left_in_frame: 0,
            ended: false,
        }
    }
}

impl Read for FramedReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.ended || out.is_empty() {
            return Ok(0);
        }
        if self.left_in_frame == 0 {
            let mut len = [0u8; 4];
            self.input.read_exact(&mut len)?;
            self.left_in_frame = u32::from_be_bytes(len) as usize;
            if self.left_in_frame == 0 {
                self.ended = true;
                return Ok(0);
            }
            if self.left_in_frame > SECTION_FRAME_BYTES_MAX {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "snapshot section frame too large",
                ));
            }
        }
        let n = out.len().min(self.left_in_frame);
        let read = self.input.read(&mut out[..n])?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left_in_frame -= read;
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{Node, NodeSpec, Transaction};
    use crate::replication::entry::{
        LEGACY_TAG_KV, LEGACY_TAG_STORE, decode_store_reply, encode_kv, encode_store,
    };
    use crate::store::{StoreConfig, create};
    use crate::wire::Code;
    use prost::Message;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            spec: Some(NodeSpec {
                hostname: format!("host-{id}"),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn image(state: &mut ManagerState) -> Vec<u8> {
        let mut image = Vec::new();
        (state.snapshot())(&mut image).unwrap();
        image
    }

    /// An earlier build's log (tag byte + bare payload) and this build's (typed entries)
    /// apply to the same state, with the same replies.
    #[test]
    fn legacy_entries_apply_as_typed_ones_do() {
        let put = crate::proto::kv::Command {
            op: Some(crate::proto::kv::command::Op::Put(crate::proto::kv::Put {
                key: "k".into(),
                value: Bytes::from_static(b"v"),
            })),
        };
        let txn = Transaction {
            changes: vec![create(node("n1"))],
            timestamp_ms: 1,
            request_id: None,
        };
        let legacy = |tag: u8, payload: Vec<u8>| [vec![tag], payload].concat();
        let legacy_log = [
            legacy(LEGACY_TAG_KV, put.encode_to_vec()),
            legacy(LEGACY_TAG_STORE, txn.encode_to_vec()),
            legacy(LEGACY_TAG_STORE, txn.encode_to_vec()),
        ];
        let typed_log = [encode_kv(&put), encode_store(&txn), encode_store(&txn)];
        let mut old = ManagerState::new(StoreConfig::default(), true);
        let mut new = ManagerState::new(StoreConfig::default(), true);
        for (i, (legacy_entry, typed_entry)) in legacy_log.iter().zip(&typed_log).enumerate() {
            let index = i as u64 + 1;
            assert_eq!(
                old.apply(index, legacy_entry),
                new.apply(index, typed_entry)
            );
        }
        assert_eq!(
            old.kv.as_ref().unwrap().get("k"),
            Some(Bytes::from_static(b"v"))
        );
        assert!(old.store.get::<Node>("n1").is_some());
        assert_eq!(image(&mut old), image(&mut new));

        // An earlier build's store entry that does not decode is refused, and counts as
        // applied: the next index must come after it.
        let refused = decode_store_reply(&old.apply(4, &[LEGACY_TAG_STORE, 0xff])).unwrap_err();
        assert_eq!(refused.code, Code::InvalidArgument, "{refused}");
        let again = decode_store_reply(&old.apply(4, &encode_store(&txn))).unwrap_err();
        assert_eq!(again.code, Code::FailedPrecondition, "{again}");
    }

    #[test]
    fn entries_reach_their_part_and_snapshots_carry_both() {
        let mut state = ManagerState::new(StoreConfig::default(), true);
        let put = crate::proto::kv::Command {
            op: Some(crate::proto::kv::command::Op::Put(crate::proto::kv::Put {
                key: "k".into(),
                value: Bytes::from(vec![7u8; 200_000]),
            })),
        };
        let mut entry = vec![LEGACY_TAG_KV];
        entry.extend(put.encode_to_vec());
        state.apply(1, &entry);
        let txn = Transaction {
            changes: vec![create(node("n1"))],
            timestamp_ms: 1,
            request_id: None,
        };
        let mut entry = vec![LEGACY_TAG_STORE];
        entry.extend(txn.encode_to_vec());
        assert_eq!(decode_store_reply(&state.apply(2, &entry)), Ok(2));
        // The same create again is refused with AlreadyExists, deterministically.
        let refused = decode_store_reply(&state.apply(3, &entry)).unwrap_err();
        assert_eq!(refused.code, Code::AlreadyExists, "{refused}");

        let mut image = Vec::new();
        (state.snapshot())(&mut image).unwrap();
        let mut copy = ManagerState::new(StoreConfig::default(), true);
        copy.restore(&mut image.as_slice()).unwrap();
        assert_eq!(copy.kv.as_ref().unwrap().get("k").unwrap().len(), 200_000);
        assert!(copy.store.get::<Node>("n1").is_some());

        let mut damaged = ManagerState::new(StoreConfig::default(), true);
        assert!(damaged.restore(&mut &image[..image.len() / 2]).is_err());
        assert!(damaged.kv.as_ref().unwrap().is_empty());
    }

    /// A production manager (no map) restores an earlier build's snapshot (always with a
    /// map section), applies kv entries as no-ops and writes no map section; a manager
    /// with the map restores a snapshot without one.
    #[test]
    fn without_the_map_kv_is_skipped_and_both_snapshot_layouts_restore() {
        let put = crate::proto::kv::Command {
            op: Some(crate::proto::kv::command::Op::Put(crate::proto::kv::Put {
                key: "k".into(),
                value: Bytes::from(vec![7u8; 100_000]),
            })),
        };
        let txn = Transaction {
            changes: vec![create(node("n1"))],
            timestamp_ms: 1,
            request_id: None,
        };
        let mut with_map = ManagerState::new(StoreConfig::default(), true);
        with_map.apply(1, &encode_kv(&put));
        with_map.apply(2, &encode_store(&txn));
        let with_map_image = image(&mut with_map);
        assert_eq!(with_map_image[0], 0, "the earlier builds' layout");

        let mut production = ManagerState::new(StoreConfig::default(), false);
        production.restore(&mut with_map_image.as_slice()).unwrap();
        assert!(production.kv.is_none());
        assert!(production.store.get::<Node>("n1").is_some());
        assert!(production.apply(3, &encode_kv(&put)).is_empty());
        let production_image = image(&mut production);
        assert_eq!(production_image[0], SNAPSHOT_STORE_ONLY);
        assert!(production_image.len() < with_map_image.len() - 100_000);

        let mut again = ManagerState::new(StoreConfig::default(), true);
        again.restore(&mut production_image.as_slice()).unwrap();
        assert!(again.store.get::<Node>("n1").is_some());
        assert!(again.kv.as_ref().unwrap().is_empty());
        let mut damaged = ManagerState::new(StoreConfig::default(), false);
        let cut = &production_image[..production_image.len() / 2];
        assert!(damaged.restore(&mut &cut[..]).is_err());
        assert!(damaged.store.get::<Node>("n1").is_none());
    }
}
