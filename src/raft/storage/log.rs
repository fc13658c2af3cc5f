//! The Raft log and hard state in one fjall database.
//!
//! Owns the database handle, the log's bounds (first live index, the term before it, last
//! index and term) and recovery. Readers on any thread use [`LogStore`]; only the
//! `raft-log-writer` thread calls the `pub(crate)` write methods, so writes never race each
//! other. Must never sync on a read path, never use weak removes (a removed index can be
//! written again after a truncation, and a weak tombstone could resurrect the old entry),
//! and never expose an entry below the boundary recorded in the metadata keyspace.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{CompressionType, Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use parking_lot::RwLock;

use super::codec::{
    META_KEY_HARD_STATE, META_KEY_LOG_START, decode_entry, decode_entry_header, decode_hard_state,
    decode_log_start, encode_entry_value, encode_hard_state, encode_log_start, index_of_key,
    log_key,
};
use super::snapshot::{SnapshotInfo, SnapshotStore};
use super::{StorageConfig, StorageError};
use crate::raft::types::{Entry, HardState, LogIndex, SnapshotMeta, Term};

/// Name of the fjall database directory under the storage directory.
const LOG_DB_DIR: &str = "log";
/// Name of the snapshot directory under the storage directory.
const SNAPSHOT_DIR: &str = "snapshots";
const KEYSPACE_LOG: &str = "log";
const KEYSPACE_META: &str = "meta";

/// The shape of the log as it is in fjall (not counting writes still queued).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBounds {
    /// The first index still readable. The log is empty when `first_index > last_index`.
    pub first_index: LogIndex,
    /// The term of the entry at `first_index - 1` (compacted or covered by a snapshot), or
    /// 0 when the log starts at 1.
    pub prev_term: Term,
    /// The last index in the log (`first_index - 1` when empty).
    pub last_index: LogIndex,
    /// The term of the last entry (`prev_term` when empty).
    pub last_term: Term,
}

impl LogBounds {
    const EMPTY: Self = Self {
        first_index: 1,
        prev_term: 0,
        last_index: 0,
        last_term: 0,
    };
}

/// What a restarted node resumes from.
#[derive(Debug)]
pub struct Recovered {
    /// The last durable hard state (default if none was ever written). Its `commit` may be
    /// below `snapshot.meta.index`: everything a snapshot covers is committed by definition.
    pub hard_state: HardState,
    /// The newest snapshot that passed every check, if any.
    pub snapshot: Option<SnapshotInfo>,
    /// Snapshots that failed their checks: reported, renamed to `*.corrupt`, never applied.
    pub corrupt_snapshots: Vec<StorageError>,
    /// The log after recovery. It always joins the snapshot: `first_index <= snapshot
    /// index + 1 <= last_index + 1`.
    pub bounds: LogBounds,
}

/// The Raft log and hard state: cheap to clone, safe to read from any thread.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    snapshots: SnapshotStore,
    dir: PathBuf,
    bounds: RwLock<LogBounds>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("dir", &self.inner.dir)
            .field("bounds", &*self.inner.bounds.read())
            .finish()
    }
}

impl LogStore {
    /// Opens (or creates) the storage under `dir` and recovers: the hard state, the newest
    /// valid snapshot and the log after it. A log left behind a snapshot by a crash in the
    /// middle of installing it is cut back to the snapshot here.
    ///
    /// # Errors
    /// [`StorageError::CorruptLog`] if the log has a gap or does not join the newest valid
    /// snapshot; IO and fjall errors otherwise. A corrupt snapshot is not an error: it is
    /// reported in [`Recovered::corrupt_snapshots`] and skipped.
    pub fn open(dir: &Path, config: &StorageConfig) -> Result<(Self, Recovered), StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io("create", dir, e))?;
        let (snapshots, snapshot, corrupt_snapshots) =
            SnapshotStore::open(&dir.join(SNAPSHOT_DIR))?;
        let db = Database::builder(dir.join(LOG_DB_DIR))
            .manual_journal_persist(true)
            // Compressing large entries in the journal would put CPU work on the commit path.
            .journal_compression(CompressionType::None)
            .cache_size(config.cache_bytes)
            .open()?;
        let log = db.keyspace(KEYSPACE_LOG, KeyspaceCreateOptions::default)?;
        let meta = db.keyspace(KEYSPACE_META, KeyspaceCreateOptions::default)?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                log,
                meta,
                snapshots,
                dir: dir.to_path_buf(),
                bounds: RwLock::new(LogBounds::EMPTY),
            }),
        };
        let hard_state = match store.inner.meta.get(META_KEY_HARD_STATE)? {
            Some(v) => decode_hard_state(&v)?,
            None => HardState::default(),
        };
        let scanned = store.scan_log()?;
        let bounds = store.join_snapshot(scanned, snapshot.as_ref().map(|s| &s.meta))?;
        *store.inner.bounds.write() = bounds;
        log::info!(
            "raft storage {}: log {}..={} (prev term {}), snapshot {:?}, hard state {:?}",
            dir.display(),
            bounds.first_index,
            bounds.last_index,
            bounds.prev_term,
            snapshot.as_ref().map(|s| (s.meta.index, s.meta.term)),
            hard_state,
        );
        Ok((
            store,
            Recovered {
                hard_state,
                snapshot,
                corrupt_snapshots,
                bounds,
            },
        ))
    }

    /// The snapshot files of this node.
    pub fn snapshots(&self) -> &SnapshotStore {
        &self.inner.snapshots
    }

    /// The log's bounds as written to fjall (writes still queued are not included).
    pub fn bounds(&self) -> LogBounds {
        *self.inner.bounds.read()
    }

    /// The first readable index.
    pub fn first_index(&self) -> LogIndex {
        self.bounds().first_index
    }

    /// The last index written.
    pub fn last_index(&self) -> LogIndex {
        self.bounds().last_index
    }

    /// The term of the entry at `index`; `first_index - 1` answers from the boundary.
    ///
    /// # Errors
    /// [`StorageError::Compacted`] below the boundary, [`StorageError::Unavailable`] past
    /// the last index, [`StorageError::CorruptLog`] for a missing or undecodable entry.
    pub fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        let bounds = self.bounds();
        if index + 1 == bounds.first_index {
            return Ok(bounds.prev_term);
        }
        check_readable(index, index + 1, &bounds)?;
        match self.inner.log.get(log_key(index))? {
            Some(value) => Ok(decode_entry_header(index, &value)?.0),
            None => Err(self.missing(index)),
        }
    }

    /// The entries in `range`, stopping early (but always returning at least one entry)
    /// once their payloads exceed `bytes_max`. Read from one fjall snapshot, so a
    /// concurrent truncation never yields a mix of old and new entries.
    ///
    /// # Errors
    /// As for [`LogStore::term`], for the first index outside the log.
    pub fn entries(
        &self,
        range: Range<LogIndex>,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        check_readable(range.start, range.end, &self.bounds())?;
        let view = self.inner.db.snapshot();
        let mut out = Vec::with_capacity(
            usize::try_from(range.end - range.start)
                .unwrap_or(0)
                .min(4096),
        );
        let mut bytes = 0u64;
        let mut expected = range.start;
        for guard in view.range(&self.inner.log, log_key(range.start)..log_key(range.end)) {
            let (key, value) = guard.into_inner()?;
            let index = index_of_key(&key)?;
            if index != expected {
                return Err(self.missing(expected));
            }
            let entry = decode_entry(index, value)?;
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry);
            expected += 1;
            if bytes >= bytes_max {
                break;
            }
        }
        if out.is_empty() {
            return Err(self.missing(range.start));
        }
        Ok(out)
    }

    /// Why `index`, inside the bounds a moment ago, was not found: compacted since, or lost.
    fn missing(&self, index: LogIndex) -> StorageError {
        let bounds = self.bounds();
        if index < bounds.first_index {
            StorageError::Compacted {
                index,
                first_index: bounds.first_index,
            }
        } else if index > bounds.last_index {
            StorageError::Unavailable {
                index,
                last_index: bounds.last_index,
            }
        } else {
            StorageError::CorruptLog(format!(
                "entry {index} is missing inside the log {}..={}",
                bounds.first_index, bounds.last_index
            ))
        }
    }

    /// Reads the boundary and walks every live key once: checks there is no gap and every
    /// value decodes, and finds the last index and term.
    fn scan_log(&self) -> Result<LogBounds, StorageError> {
        let (first_index, prev_term) = match self.inner.meta.get(META_KEY_LOG_START)? {
            Some(v) => decode_log_start(&v)?,
            None => (1, 0),
        };
        let mut bounds = LogBounds {
            first_index,
            prev_term,
            last_index: first_index - 1,
            last_term: prev_term,
        };
        for guard in self.inner.log.range(log_key(first_index)..) {
            let (key, value) = guard.into_inner()?;
            let index = index_of_key(&key)?;
            if index != bounds.last_index + 1 {
                return Err(StorageError::CorruptLog(format!(
                    "gap in the log: entry {} follows {} (log starts at {first_index})",
                    index, bounds.last_index
                )));
            }
            let (term, _) = decode_entry_header(index, &value)?;
            if term < bounds.last_term {
                return Err(StorageError::CorruptLog(format!(
                    "entry {index} has term {term}, below the previous entry's {}",
                    bounds.last_term
                )));
            }
            bounds.last_index = index;
            bounds.last_term = term;
        }
        Ok(bounds)
    }

    /// Makes the scanned log join the newest valid snapshot. If the log does not contain
    /// the snapshot's last entry with the snapshot's term (a crash while installing a
    /// received snapshot, or a log that fell behind it), the log restarts right after the
    /// snapshot, exactly as [`LogStore::reset_to_snapshot`] would have done.
    fn join_snapshot(
        &self,
        scanned: LogBounds,
        snapshot: Option<&SnapshotMeta>,
    ) -> Result<LogBounds, StorageError> {
        let Some(meta) = snapshot else {
            if scanned.first_index != 1 {
                return Err(StorageError::CorruptLog(format!(
                    "the log starts at {} but there is no valid snapshot before it",
                    scanned.first_index
                )));
            }
            return Ok(scanned);
        };
        if meta.index + 1 < scanned.first_index {
            return Err(StorageError::CorruptLog(format!(
                "the log starts at {} but the newest valid snapshot ends at {}",
                scanned.first_index, meta.index
            )));
        }
        if self.log_matches(&scanned, meta.index, meta.term)? {
            return Ok(scanned);
        }
        log::warn!(
            "log {}..={} does not contain snapshot ({}, {}): restarting the log after it",
            scanned.first_index,
            scanned.last_index,
            meta.index,
            meta.term
        );
        *self.inner.bounds.write() = scanned;
        self.reset_to_snapshot(meta.index, meta.term)?;
        self.persist()?;
        Ok(self.bounds())
    }

    /// True if the log holds `(index, term)`, counting the boundary.
    fn log_matches(
        &self,
        bounds: &LogBounds,
        index: LogIndex,
        term: Term,
    ) -> Result<bool, StorageError> {
        if index + 1 == bounds.first_index {
            return Ok(bounds.prev_term == term);
        }
        if index < bounds.first_index || index > bounds.last_index {
            return Ok(false);
        }
        match self.inner.log.get(log_key(index))? {
            Some(value) => Ok(decode_entry_header(index, &value)?.0 == term),
            None => Ok(false),
        }
    }

    // ---- writer-thread operations: only `raft-log-writer` (and `open`) call these ----

    /// Writes one group in ONE fjall batch: `entries` (contiguous), removals of every index
    /// past the group's new last index up to the old one (a truncated suffix that was not
    /// rewritten), and the hard state. Not synced: call [`LogStore::persist`].
    pub(crate) fn write_group<'a>(
        &self,
        entries: impl ExactSizeIterator<Item = &'a Entry>,
        new_last: (LogIndex, Term),
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        let old = self.bounds();
        let (new_last_index, new_last_term) = new_last;
        assert!(
            new_last_index + 1 >= old.first_index,
            "a write never truncates below the log boundary"
        );
        let removed = (new_last_index + 1)..(old.last_index + 1);
        let mut batch = self.inner.db.batch().durability(None);
        let count = entries.len();
        for entry in entries {
            batch.insert(
                &self.inner.log,
                log_key(entry.index),
                encode_entry_value(entry),
            );
        }
        for index in removed.clone() {
            // A strong tombstone: this index may be written again later.
            batch.remove(&self.inner.log, log_key(index));
        }
        if let Some(hs) = hard_state {
            batch.insert(&self.inner.meta, META_KEY_HARD_STATE, encode_hard_state(hs));
        }
        if count == 0 && removed.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        batch.commit()?;
        let mut bounds = self.inner.bounds.write();
        bounds.last_index = new_last_index;
        bounds.last_term = new_last_term;
        Ok(())
    }

    /// Makes everything written so far durable (`fdatasync` of fjall's journal).
    pub(crate) fn persist(&self) -> Result<(), StorageError> {
        self.inner.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// After a snapshot `(index, term)` was installed: keeps the log if it holds that entry
    /// (Raft §7: the entries after it are still valid); otherwise empties the log and
    /// restarts it at `index + 1`. The entries after the snapshot are removed in the same
    /// batch that moves the boundary; the ones below it become garbage that compaction
    /// removes in bounded rounds. Returns the lowest index that may hold garbage.
    pub(crate) fn reset_to_snapshot(
        &self,
        index: LogIndex,
        term: Term,
    ) -> Result<Option<LogIndex>, StorageError> {
        let old = self.bounds();
        if self.log_matches(&old, index, term)? {
            return Ok(None);
        }
        let mut batch = self.inner.db.batch().durability(None);
        for stale in (index + 1).max(old.first_index)..=old.last_index {
            batch.remove(&self.inner.log, log_key(stale));
        }
        batch.insert(
            &self.inner.meta,
            META_KEY_LOG_START,
            encode_log_start(index + 1, term),
        );
        batch.commit()?;
        *self.inner.bounds.write() = LogBounds {
            first_index: index + 1,
            prev_term: term,
            last_index: index,
            last_term: term,
        };
        let garbage_end = (index + 1).min(old.last_index + 1);
        Ok((old.first_index < garbage_end).then_some(old.first_index))
    }

    /// One bounded compaction round towards "the first live index is `up_to + 1`": removes
    /// at most `round_max` entries and moves the boundary in the same batch. Returns true if
    /// more rounds are needed. Never removes the last entry's successor boundary past the
    /// end of the log.
    pub(crate) fn compact_round(
        &self,
        up_to: LogIndex,
        round_max: u64,
    ) -> Result<bool, StorageError> {
        assert!(round_max > 0, "a compaction round must make progress");
        let old = self.bounds();
        let target_first = (up_to + 1).min(old.last_index + 1);
        if target_first <= old.first_index {
            return Ok(false);
        }
        let new_first = target_first.min(old.first_index + round_max);
        let prev_term = self.term(new_first - 1)?;
        let mut batch = self.inner.db.batch().durability(None);
        for index in old.first_index..new_first {
            batch.remove(&self.inner.log, log_key(index));
        }
        batch.insert(
            &self.inner.meta,
            META_KEY_LOG_START,
            encode_log_start(new_first, prev_term),
        );
        // Move the boundary before the keys vanish, so that a reader never finds a key
        // missing inside the bounds.
        {
            let mut bounds = self.inner.bounds.write();
            bounds.first_index = new_first;
            bounds.prev_term = prev_term;
        }
        batch.commit()?;
        Ok(new_first < target_first)
    }

    /// One bounded round removing garbage keys below the boundary (left by a snapshot
    /// reset). Returns where the next round starts, or `None` when no garbage is left.
    pub(crate) fn remove_garbage_round(
        &self,
        from: LogIndex,
        round_max: u64,
    ) -> Result<Option<LogIndex>, StorageError> {
        let first = self.first_index();
        if from >= first {
            return Ok(None);
        }
        let end = first.min(from + round_max);
        let mut batch = self.inner.db.batch().durability(None);
        for index in from..end {
            batch.remove(&self.inner.log, log_key(index));
        }
        batch.commit()?;
        Ok((end < first).then_some(end))
    }

    /// The lowest key below the boundary, if any (garbage a crash left behind). This may
    /// walk tombstones, so it runs once, when the writer starts.
    pub(crate) fn find_garbage(&self) -> Result<Option<LogIndex>, StorageError> {
        let first = self.first_index();
        match self.inner.log.range(..log_key(first)).next() {
            Some(guard) => Ok(Some(index_of_key(&guard.key()?)?)),
            None => Ok(None),
        }
    }
}

/// Checks that `start..end` lies inside the log.
fn check_readable(start: LogIndex, end: LogIndex, bounds: &LogBounds) -> Result<(), StorageError> {
    if start < bounds.first_index {
        return Err(StorageError::Compacted {
            index: start,
            first_index: bounds.first_index,
        });
    }
    if end > bounds.last_index + 1 {
        return Err(StorageError::Unavailable {
            index: end - 1,
            last_index: bounds.last_index,
        });
    }
    Ok(())
}
