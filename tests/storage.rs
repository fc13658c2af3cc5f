//! Raft storage: recovery, truncation, compaction, snapshot files and their corruption, a
//! torn journal tail.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use crossbeam_channel::Receiver;
use flotilla::raft::storage::snapshot::{SNAPSHOT_CHUNK_BYTES_DEFAULT, SnapshotReader};
use flotilla::raft::storage::{
    AppendRequest, LogHandle, LogStore, Recovered, StorageConfig, StorageError, WriterEvent,
};
use flotilla::raft::types::{
    Entry, EntryKind, HardState, LogIndex, Membership, SnapshotMeta, Term,
};

fn entry(index: LogIndex, term: Term) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Normal,
        data: Bytes::from(format!("entry {index} of term {term}").into_bytes()),
    }
}

fn entries(range: std::ops::RangeInclusive<LogIndex>, term: Term) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

struct Node {
    handle: LogHandle,
    events: Receiver<WriterEvent>,
    recovered: Recovered,
}

fn open_with(dir: &Path, config: &StorageConfig) -> Node {
    let (store, recovered) = LogStore::open(dir, config).unwrap();
    let (handle, events) = LogHandle::start(store, &recovered, config).unwrap();
    Node {
        handle,
        events,
        recovered,
    }
}

fn open(dir: &Path) -> Node {
    open_with(dir, &StorageConfig::default())
}

impl Node {
    /// Submits and waits until the request is durable.
    fn write(&mut self, request: AppendRequest) {
        let seq = self.handle.submit(request).unwrap();
        self.wait(seq);
    }

    fn wait(&mut self, seq: u64) {
        loop {
            match self.events.recv().unwrap() {
                WriterEvent::Durable(d) => {
                    self.handle.on_durable(&d);
                    if d.seq >= seq {
                        return;
                    }
                }
                WriterEvent::Fatal(e) => panic!("{e}"),
            }
        }
    }

    fn append(&mut self, entries: Vec<Entry>, hard_state: Option<HardState>) {
        self.write(AppendRequest {
            truncate_from: None,
            entries,
            hard_state,
        });
    }

    fn all(&self) -> Vec<Entry> {
        let first = self.handle.first_index();
        self.handle
            .entries(first..self.handle.last_index() + 1, u64::MAX)
            .unwrap()
    }
}

fn hs(term: Term, commit: LogIndex) -> Option<HardState> {
    Some(HardState {
        term,
        vote: 1,
        commit,
    })
}

#[test]
fn recovers_entries_and_hard_state_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    assert_eq!(node.recovered.hard_state, HardState::default());
    assert_eq!(
        (node.handle.first_index(), node.handle.last_index()),
        (1, 0)
    );
    node.append(entries(1..=5, 1), hs(1, 0));
    node.append(entries(6..=3000, 2), hs(2, 5));
    drop(node);

    let node = open(dir.path());
    assert_eq!(node.recovered.hard_state, hs(2, 5).unwrap());
    assert_eq!(node.recovered.bounds.last_index, 3000);
    assert_eq!(node.recovered.bounds.last_term, 2);
    let all = node.all();
    assert_eq!(all.len(), 3000);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(*e, entry(i as u64 + 1, if i < 5 { 1 } else { 2 }));
    }
    assert_eq!(node.handle.term(5).unwrap(), 1);
    assert_eq!(node.handle.term(0).unwrap(), 0);
    assert!(matches!(
        node.handle.term(3001),
        Err(StorageError::Unavailable { .. })
    ));
    // Byte-bounded reads return at least one entry and stop at the bound.
    let some = node.handle.entries(10..3000, 100).unwrap();
    assert!(!some.is_empty() && some.len() < 10, "{}", some.len());
    assert_eq!(node.handle.entries(10..11, 0).unwrap().len(), 1);
}

#[test]
fn truncation_and_append_replace_a_suffix_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=10, 1), hs(1, 2));
    node.append(entries(11..=20, 1), None);
    // A new leader overwrites from 8: the suffix 8..=20 goes, 8..=9 of term 2 come.
    node.write(AppendRequest {
        truncate_from: Some(8),
        entries: entries(8..=9, 2),
        hard_state: hs(2, 2),
    });
    assert_eq!(node.handle.last_index(), 9);
    drop(node);

    let mut node = open(dir.path());
    assert_eq!(node.recovered.bounds.last_index, 9);
    let all = node.all();
    assert_eq!(all[..7], entries(1..=7, 1)[..]);
    assert_eq!(all[7..], entries(8..=9, 2)[..]);
    // A truncation without new entries, then an append in the same write group.
    let a = node
        .handle
        .submit(AppendRequest {
            truncate_from: Some(5),
            entries: vec![],
            hard_state: None,
        })
        .unwrap();
    let b = node
        .handle
        .submit(AppendRequest {
            truncate_from: None,
            entries: entries(5..=6, 3),
            hard_state: hs(3, 2),
        })
        .unwrap();
    assert!(a < b);
    node.wait(b);
    drop(node);
    let node = open(dir.path());
    let all = node.all();
    assert_eq!(all.len(), 6);
    assert_eq!(all[4..], entries(5..=6, 3)[..]);
    assert_eq!(node.recovered.hard_state, hs(3, 2).unwrap());
}

#[test]
fn reads_see_submitted_entries_before_they_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=3, 1), None);
    // Nothing below waits for the writer: every read must come from the handle's view.
    node.handle
        .submit(AppendRequest {
            truncate_from: None,
            entries: entries(4..=6, 1),
            hard_state: None,
        })
        .unwrap();
    node.handle
        .submit(AppendRequest {
            truncate_from: Some(5),
            entries: entries(5..=5, 2),
            hard_state: hs(2, 0),
        })
        .unwrap();
    assert_eq!(node.handle.last_index(), 5);
    assert_eq!(node.handle.last_term(), 2);
    assert_eq!(node.handle.term(4).unwrap(), 1);
    let all = node.all();
    assert_eq!(all[..4], entries(1..=4, 1)[..]);
    assert_eq!(all[4], entry(5, 2));
    assert_eq!(node.handle.hard_state(), hs(2, 0).unwrap());
    let seq = node.handle.submit(AppendRequest::default()).unwrap();
    node.wait(seq);
    assert_eq!(node.all(), all, "the durable log equals the view");
    assert_eq!(node.handle.store().last_index(), 5);
}

#[test]
fn invalid_requests_are_refused_and_nothing_is_queued() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=3, 2), hs(2, 1));
    let refused = [
        AppendRequest {
            truncate_from: None,
            entries: entries(5..=5, 2),
            hard_state: None,
        },
        AppendRequest {
            truncate_from: None,
            entries: entries(3..=3, 2),
            hard_state: None,
        },
        AppendRequest {
            truncate_from: None,
            entries: entries(4..=4, 1),
            hard_state: None,
        },
        AppendRequest {
            truncate_from: Some(9),
            entries: vec![],
            hard_state: None,
        },
        AppendRequest {
            truncate_from: None,
            entries: vec![],
            hard_state: hs(1, 1),
        },
    ];
    for request in refused {
        let result = node.handle.submit(request.clone());
        assert!(
            matches!(result, Err(StorageError::InvalidRequest(_))),
            "{request:?}: {result:?}"
        );
    }
    assert_eq!(node.handle.last_index(), 3);
}

#[test]
fn compaction_keeps_trailing_entries_in_bounded_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        compaction_round_entries_max: 100,
        ..StorageConfig::default()
    };
    let mut node = open_with(dir.path(), &config);
    for batch in 0..30 {
        node.append(entries(batch * 100 + 1..=batch * 100 + 100, 1), None);
    }
    // Compaction follows a durable snapshot: without one, the log could not be recovered.
    write_snapshot(&node, meta(2500, 1), b"state at 2500");
    node.handle.compact(2500).unwrap();
    // Compaction runs in rounds while the writer is idle; wait for it without asserting
    // on time.
    for _ in 0..1000 {
        if node.handle.first_index() == 2001 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        node.handle.first_index(),
        2001,
        "snapshot 2500 minus 500 kept"
    );
    assert_eq!(
        node.handle.term(2000).unwrap(),
        1,
        "the boundary keeps the term before it"
    );
    assert!(matches!(
        node.handle.entries(1999..2002, u64::MAX),
        Err(StorageError::Compacted {
            first_index: 2001,
            ..
        })
    ));
    assert_eq!(
        node.handle.entries(2001..2002, u64::MAX).unwrap(),
        vec![entry(2001, 1)]
    );
    // Appends keep working, and a restart sees the same boundary.
    node.append(entries(3001..=3001, 1), None);
    drop(node);
    let node = open_with(dir.path(), &config);
    assert_eq!(node.recovered.bounds.first_index, 2001);
    assert_eq!(node.recovered.bounds.prev_term, 1);
    assert_eq!(node.all(), entries(2001..=3001, 1));
}

#[test]
fn compaction_deletes_snapshot_files_the_log_no_longer_joins() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    for batch in 0..30 {
        node.append(entries(batch * 100 + 1..=batch * 100 + 100, 1), None);
    }
    let old = write_snapshot(&node, meta(1000, 1), b"state at 1000");
    let new = write_snapshot(&node, meta(2500, 1), b"state at 2500");
    assert!(old.path.exists(), "two snapshots are kept at creation");
    node.handle.compact(2500).unwrap();
    // The log now starts at 2001: the snapshot at 1000 could never be recovered from.
    for _ in 0..1000 {
        if !old.path.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(node.handle.first_index(), 2001);
    assert!(!old.path.exists(), "the unjoinable snapshot is deleted");
    assert!(new.path.exists(), "the newest is kept");
    drop(node);
    let node = open(dir.path());
    assert_eq!(node.recovered.snapshot.unwrap().meta.index, 2500);
    assert!(node.recovered.corrupt_snapshots.is_empty());
}

fn meta(index: LogIndex, term: Term) -> SnapshotMeta {
    let mut membership = Membership::default();
    membership.voters.extend([1, 2, 3]);
    membership.learners.insert(9);
    SnapshotMeta {
        index,
        term,
        membership,
    }
}

fn content(bytes: usize, seed: u8) -> Vec<u8> {
    (0..bytes)
        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
        .collect()
}

fn write_snapshot(
    node: &Node,
    meta: SnapshotMeta,
    data: &[u8],
) -> flotilla::raft::storage::snapshot::SnapshotInfo {
    let mut builder = node.handle.store().snapshots().create(meta).unwrap();
    for chunk in data.chunks(100_000) {
        std::io::Write::write_all(&mut builder, chunk).unwrap();
    }
    builder.finish().unwrap()
}

fn read_all(path: &Path) -> Vec<u8> {
    let mut reader = SnapshotReader::open(path).unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk(SNAPSHOT_CHUNK_BYTES_DEFAULT).unwrap() {
        assert_eq!(chunk.offset, out.len() as u64);
        out.extend_from_slice(&chunk.data);
        if chunk.last {
            break;
        }
    }
    out
}

#[test]
fn snapshot_round_trips_and_recovery_uses_the_newest_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=100, 1), hs(1, 100));
    let data = content(2_500_000, 1);
    let info = write_snapshot(&node, meta(100, 1), &data);
    assert_eq!(read_all(&info.path), data);
    drop(node);
    let node = open(dir.path());
    let recovered = node.recovered.snapshot.clone().unwrap();
    assert_eq!(recovered.meta, meta(100, 1));
    assert_eq!(recovered.content_bytes, data.len() as u64);
    assert!(node.recovered.corrupt_snapshots.is_empty());
    // An empty snapshot is valid and streams as one empty last chunk.
    let empty = write_snapshot(&node, SnapshotMeta::default(), &[]);
    let mut reader = SnapshotReader::open(&empty.path).unwrap();
    let chunk = reader.next_chunk(16).unwrap().unwrap();
    assert!(chunk.last && chunk.data.is_empty());
    assert!(reader.next_chunk(16).unwrap().is_none());
}

/// Damages the newest snapshot in `how`, reopens, and checks the damage is reported, the
/// file never applied, and the older valid snapshot used instead.
fn corrupted_snapshot_is_reported_and_skipped(how: fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=200, 1), hs(1, 200));
    write_snapshot(&node, meta(100, 1), &content(300_000, 1));
    let newest = write_snapshot(&node, meta(200, 1), &content(300_000, 2));
    drop(node);
    how(&newest.path);
    assert!(
        SnapshotReader::open(&newest.path).is_err() || {
            let mut reader = SnapshotReader::open(&newest.path).unwrap();
            let mut failed = false;
            while let Some(result) = reader.next_chunk(SNAPSHOT_CHUNK_BYTES_DEFAULT).transpose() {
                match result {
                    Ok(chunk) if chunk.last => break,
                    Ok(_) => {}
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            failed
        }
    );
    let node = open(dir.path());
    assert_eq!(
        node.recovered.corrupt_snapshots.len(),
        1,
        "{:?}",
        node.recovered.corrupt_snapshots
    );
    assert!(matches!(
        node.recovered.corrupt_snapshots[0],
        StorageError::CorruptSnapshot { .. }
    ));
    assert_eq!(node.recovered.snapshot.as_ref().unwrap().meta.index, 100);
    assert!(!newest.path.exists(), "the damaged file is moved aside");
    assert_eq!(
        node.recovered.bounds.last_index, 200,
        "the log is untouched"
    );
}

fn flip_byte_at(path: &Path, offset_from_end: u64) {
    let mut data = fs::read(path).unwrap();
    let at = data.len() - offset_from_end as usize;
    data[at] ^= 0x40;
    fs::write(path, data).unwrap();
}

#[test]
fn snapshot_with_a_flipped_content_byte_is_rejected() {
    corrupted_snapshot_is_reported_and_skipped(|p| flip_byte_at(p, 1000));
}

#[test]
fn snapshot_with_a_flipped_header_byte_is_rejected() {
    // Byte 20 is the first byte of the term field: the header digest must catch it.
    corrupted_snapshot_is_reported_and_skipped(|p| {
        let len = fs::metadata(p).unwrap().len();
        flip_byte_at(p, len - 20);
    });
}

#[test]
fn truncated_snapshot_is_rejected() {
    corrupted_snapshot_is_reported_and_skipped(|p| {
        let len = fs::metadata(p).unwrap().len();
        fs::OpenOptions::new()
            .write(true)
            .open(p)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
    });
}

#[test]
fn received_snapshot_is_verified_before_install() {
    let dir = tempfile::tempdir().unwrap();
    let leader_dir = tempfile::tempdir().unwrap();
    let leader = open(leader_dir.path());
    let data = content(3 * SNAPSHOT_CHUNK_BYTES_DEFAULT + 123, 5);
    let sent = write_snapshot(&leader, meta(500, 3), &data);
    let mut follower = open(dir.path());
    follower.append(entries(1..=10, 1), hs(1, 5));
    let store = follower.handle.store().snapshots().clone();

    // Wrong digest: refused, nothing installed, no temp file left.
    let mut bad_sha = sent.content_sha256;
    bad_sha[0] ^= 1;
    let mut builder = store
        .receive(sent.meta.clone(), sent.content_bytes, bad_sha)
        .unwrap();
    let mut reader = SnapshotReader::open(&sent.path).unwrap();
    while let Some(chunk) = reader.next_chunk(SNAPSHOT_CHUNK_BYTES_DEFAULT).unwrap() {
        builder.write_chunk(chunk.offset, &chunk.data).unwrap();
        if chunk.last {
            break;
        }
    }
    assert!(matches!(
        builder.finish(),
        Err(StorageError::SnapshotTransfer(_))
    ));
    // Out-of-order and overlong chunks are refused.
    let mut builder = store
        .receive(sent.meta.clone(), sent.content_bytes, sent.content_sha256)
        .unwrap();
    assert!(builder.write_chunk(10, b"x").is_err());
    assert!(builder.write_chunk(0, &vec![0; data.len() + 1]).is_err());
    drop(builder);
    // Short: refused.
    let mut builder = store
        .receive(sent.meta.clone(), sent.content_bytes, sent.content_sha256)
        .unwrap();
    builder.write_chunk(0, &data[..100]).unwrap();
    assert!(builder.finish().is_err());
    assert_eq!(
        fs::read_dir(store.dir()).unwrap().count(),
        0,
        "nothing installed, no temp left"
    );

    // The real transfer, chunk by chunk.
    let mut builder = store
        .receive(sent.meta.clone(), sent.content_bytes, sent.content_sha256)
        .unwrap();
    let mut reader = SnapshotReader::open(&sent.path).unwrap();
    while let Some(chunk) = reader.next_chunk(SNAPSHOT_CHUNK_BYTES_DEFAULT).unwrap() {
        builder.write_chunk(chunk.offset, &chunk.data).unwrap();
        if chunk.last {
            break;
        }
    }
    let installed = builder.finish().unwrap();
    assert_eq!(read_all(&installed.path), data);
    // The log (1..=10 of term 1) does not contain (500, 3): it restarts after the snapshot.
    let seq = follower.handle.snapshot_installed(&installed.meta).unwrap();
    assert_eq!(follower.handle.first_index(), 501);
    assert_eq!(follower.handle.last_index(), 500);
    follower.wait(seq);
    follower.append(entries(501..=502, 3), hs(3, 500));
    drop(follower);
    let follower = open(dir.path());
    assert_eq!(
        follower.recovered.snapshot.as_ref().unwrap().meta,
        meta(500, 3)
    );
    assert_eq!(follower.recovered.bounds.first_index, 501);
    assert_eq!(follower.all(), entries(501..=502, 3));
}

#[test]
fn snapshot_inside_a_matching_log_keeps_the_entries_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=20, 2), hs(2, 10));
    let info = write_snapshot(&node, meta(10, 2), b"state");
    let seq = node.handle.snapshot_installed(&info.meta).unwrap();
    node.wait(seq);
    assert_eq!(node.all(), entries(1..=20, 2));
}

#[test]
fn crash_between_snapshot_install_and_log_reset_is_repaired_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    node.append(entries(1..=30, 1), hs(1, 5));
    // Installed file, but the node died before telling the writer.
    write_snapshot(&node, meta(40, 4), b"state");
    drop(node);
    let node = open(dir.path());
    assert_eq!(node.recovered.bounds.first_index, 41);
    assert_eq!(node.recovered.bounds.last_index, 40);
    assert_eq!(node.handle.term(40).unwrap(), 4);
    assert!(node.all().is_empty());
}

#[test]
fn torn_journal_tail_recovers_a_prefix_of_whole_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = open(dir.path());
    for batch in 0..20u64 {
        node.append(
            entries(batch * 10 + 1..=batch * 10 + 10, 1),
            hs(1, batch * 10),
        );
    }
    drop(node);
    // Cut the newest journal inside its last record (the file is preallocated with zeros:
    // the data ends at the last non-zero byte).
    let journal = fs::read_dir(dir.path().join("log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .max_by_key(|p| fs::metadata(p).unwrap().modified().unwrap())
        .unwrap();
    let data = fs::read(&journal).unwrap();
    let end = data.iter().rposition(|b| *b != 0).unwrap() + 1;
    let file = fs::OpenOptions::new().write(true).open(&journal).unwrap();
    file.set_len((end - 40) as u64).unwrap();
    drop(file);

    let node = open(dir.path());
    let last = node.recovered.bounds.last_index;
    assert!(
        last < 200 && last.is_multiple_of(10),
        "a whole write was lost, nothing else: {last}"
    );
    assert_eq!(
        node.recovered.hard_state.commit,
        last - 10,
        "hard state of the same write"
    );
    let all = node.all();
    assert_eq!(all, entries(1..=last, 1));
}

#[test]
fn a_raft_thread_that_never_drains_events_neither_blocks_the_writer_nor_loses_progress() {
    let dir = tempfile::tempdir().unwrap();
    let config = StorageConfig {
        request_queue_len_max: 4,
        ..StorageConfig::default()
    };
    let mut node = open_with(dir.path(), &config);
    // Far more requests than the request queue and the event channel hold together; the
    // events are not read until the end.
    let mut last_seq = 0;
    for index in 1..=2000 {
        last_seq = node
            .handle
            .submit(AppendRequest {
                truncate_from: None,
                entries: vec![entry(index, 1)],
                hard_state: None,
            })
            .unwrap();
    }
    let mut events = 0;
    loop {
        match node.events.recv().unwrap() {
            WriterEvent::Durable(d) => {
                events += 1;
                node.handle.on_durable(&d);
                if d.seq == last_seq {
                    assert_eq!((d.last_index, d.last_term), (2000, 1));
                    break;
                }
            }
            WriterEvent::Fatal(e) => panic!("{e}"),
        }
    }
    // While the channel is full the writer coalesces: at most the channel's worth, the one
    // it holds, and one per group written after the draining started (those groups can
    // only hold what the request queue held).
    let bound =
        flotilla::raft::storage::WRITER_EVENTS_LEN_MAX + 1 + config.request_queue_len_max + 1;
    assert!(
        events <= bound,
        "{events} events for 2000 requests, bound {bound}"
    );
    assert_eq!(node.all(), entries(1..=2000, 1));
}
