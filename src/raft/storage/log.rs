//! The Raft log and hard state in one fjall database.
//!
//! The log keyspace holds segments: each value is a run of contiguous entries (one write
//! group's, split at [`super::codec::SEGMENT_ENTRIES_MAX`]) under the big-endian index of
//! its first entry. One key per group instead of one per entry is what keeps the
//! group-commit path close to the raw disk: fjall's per-key work (memtable insert, journal
//! record) would otherwise dominate at large batches. An entry is found by the greatest key
//! at or below its index.
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fjall::{PersistMode, Readable};
use parking_lot::RwLock;

use super::codec::{
    META_KEY_HARD_STATE, META_KEY_LOG_START, Segment, decode_hard_state, decode_log_start,
    encode_hard_state, encode_log_start, encode_segment, index_of_key, log_key, segment_len,
};
use super::generation::{self, CopyPlan, Generation, NotSwitched};
use super::snapshot::{SnapshotInfo, SnapshotStore};
use super::{StorageConfig, StorageError};
use crate::raft::types::{Entry, HardState, LogIndex, SnapshotMeta, Term};

/// Default for [`StorageConfig::log_idle_after_ms`]: how long without a write before a
/// finished compaction also gives back memory and disk space (see
/// [`LogStore::release_compacted`]). An idle snapshot comes after 5 s without applied
/// entries, so its compaction finds the log idle.
pub const LOG_IDLE_AFTER_MS_DEFAULT: u64 = 2_000;

/// A generation is rewritten only when it takes at least this many times the bytes of the
/// live entries on disk: the copy then costs at most a quarter of what it gives back.
pub const GENERATION_BYTES_PER_LIVE_BYTE_MIN: u64 = 4;

/// Live log bytes above which a generation is never rewritten (the writer holds the write
/// lock while it copies them; a journal that large is rotated by fjall itself anyway).
pub const GENERATION_LIVE_BYTES_MAX: u64 = 64 << 20;

/// Name of the snapshot directory under the storage directory.
const SNAPSHOT_DIR: &str = "snapshots";

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
    /// The current generation of the log database (see [`super::generation`]). Readers
    /// clone the `Arc` for one read; the writer replaces it, under the storage write lock,
    /// when it switches generations.
    current: RwLock<Arc<Generation>>,
    snapshots: SnapshotStore,
    dir: PathBuf,
    /// How generations are opened and when they are switched.
    config: StorageConfig,
    bounds: RwLock<LogBounds>,
    /// When the store was opened: the epoch of `last_write_ms`.
    opened: Instant,
    /// Milliseconds after `opened` of the last write group (writer or inline).
    last_write_ms: AtomicU64,
}

/// One consistent read: a generation of the log database and a fjall snapshot of it.
/// Holding it keeps that generation open (and its directory on disk) after a switch.
struct View {
    generation: Arc<Generation>,
    snapshot: fjall::Snapshot,
}

impl View {
    fn of(generation: Arc<Generation>) -> Self {
        let snapshot = generation.db.snapshot();
        Self {
            generation,
            snapshot,
        }
    }
}

fn read_hard_state(generation: &Generation) -> Result<HardState, StorageError> {
    match generation.meta.get(META_KEY_HARD_STATE)? {
        Some(v) => decode_hard_state(&v),
        None => Ok(HardState::default()),
    }
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
        let current = generation::open_current(dir, config)?;
        let store = Self {
            inner: Arc::new(Inner {
                current: RwLock::new(Arc::new(current)),
                snapshots,
                dir: dir.to_path_buf(),
                config: config.clone(),
                bounds: RwLock::new(LogBounds::EMPTY),
                opened: Instant::now(),
                last_write_ms: AtomicU64::new(0),
            }),
        };
        let hard_state = read_hard_state(&store.generation())?;
        let scanned = store.scan_log(&store.view())?;
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

    /// The current generation of the log database.
    fn generation(&self) -> Arc<Generation> {
        self.inner.current.read().clone()
    }

    /// A consistent read view of the current generation.
    fn view(&self) -> View {
        View::of(self.generation())
    }

    /// The directory of the log database in use (it changes when generations switch).
    pub fn log_dir(&self) -> PathBuf {
        self.generation().dir.clone()
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
        match self.segment_containing(&self.view(), index)? {
            Some(segment) => Ok(segment.term(index)),
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
        self.entries_in(&self.view(), range, bytes_max)
    }

    /// The term at `prev_index` together with the entries after it up to `end` (exclusive,
    /// at least one if any, at most `bytes_max` of payload), all read from ONE fjall
    /// snapshot: a concurrent truncation can never pair the old log's term with the new
    /// log's entries (the ABA a replication thread must not fall into).
    ///
    /// # Errors
    /// As for [`LogStore::term`] and [`LogStore::entries`].
    pub fn entries_after(
        &self,
        prev_index: LogIndex,
        end: LogIndex,
        bytes_max: u64,
    ) -> Result<(Term, Vec<Entry>), StorageError> {
        let view = self.view();
        // Bounds after the snapshot: they can only be newer, so a range they allow is
        // either unchanged in the snapshot or reported missing, never mixed.
        let bounds = self.bounds();
        let prev_term = if prev_index + 1 == bounds.first_index {
            bounds.prev_term
        } else {
            check_readable(prev_index, prev_index + 1, &bounds)?;
            match self.segment_containing(&view, prev_index)? {
                Some(segment) => segment.term(prev_index),
                None => return Err(self.missing(prev_index)),
            }
        };
        let range = (prev_index + 1)..end.max(prev_index + 1);
        if range.is_empty() {
            return Ok((prev_term, Vec::new()));
        }
        check_readable(range.start, range.end, &bounds)?;
        Ok((prev_term, self.entries_in(&view, range, bytes_max)?))
    }

    fn entries_in(
        &self,
        view: &View,
        range: Range<LogIndex>,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let Some(mut segment) = self.segment_containing(view, range.start)? else {
            return Err(self.missing(range.start));
        };
        let mut later = view.snapshot.range(
            &view.generation.log,
            log_key(segment.last() + 1)..log_key(range.end),
        );
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let mut index = range.start;
        while index < range.end {
            if !segment.contains(index) {
                segment = match later.next() {
                    Some(guard) => {
                        let (key, value) = guard.into_inner()?;
                        Segment::decode(index_of_key(&key)?, value)?
                    }
                    None => return Err(self.missing(index)),
                };
                if segment.first != index {
                    return Err(self.missing(index));
                }
            }
            let entry = segment.entry(index);
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry);
            index += 1;
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    /// The segment holding `index`: the one under the greatest key at or below it.
    fn segment_containing(
        &self,
        view: &View,
        index: LogIndex,
    ) -> Result<Option<Segment>, StorageError> {
        let Some(guard) = view
            .snapshot
            .range(&view.generation.log, ..=log_key(index))
            .next_back()
        else {
            return Ok(None);
        };
        let (key, value) = guard.into_inner()?;
        let segment = Segment::decode(index_of_key(&key)?, value)?;
        Ok(segment.contains(index).then_some(segment))
    }

    /// Keys of every segment starting at or after `from`, in order (a suffix about to be
    /// replaced; recent, so short).
    fn keys_from(&self, view: &View, from: LogIndex) -> Result<Vec<LogIndex>, StorageError> {
        let mut keys = Vec::new();
        for guard in view.snapshot.range(&view.generation.log, log_key(from)..) {
            keys.push(index_of_key(&guard.key()?)?);
        }
        Ok(keys)
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
    fn scan_log(&self, view: &View) -> Result<LogBounds, StorageError> {
        let (first_index, prev_term) = match view
            .snapshot
            .get(&view.generation.meta, META_KEY_LOG_START)?
        {
            Some(v) => decode_log_start(&v)?,
            None => (1, 0),
        };
        let mut bounds = LogBounds {
            first_index,
            prev_term,
            last_index: first_index - 1,
            last_term: prev_term,
        };
        // Start at the segment holding the first live index (it may begin below it).
        let start = self
            .segment_containing(view, first_index)?
            .map_or(first_index, |segment| segment.first);
        for guard in view.snapshot.range(&view.generation.log, log_key(start)..) {
            let (key, value) = guard.into_inner()?;
            let segment = Segment::decode(index_of_key(&key)?, value)?;
            let expected = if bounds.last_index < first_index {
                start
            } else {
                bounds.last_index + 1
            };
            if segment.first != expected {
                return Err(StorageError::CorruptLog(format!(
                    "gap in the log: a segment starts at {} where {expected} was expected \
                     (log starts at {first_index})",
                    segment.first
                )));
            }
            let term = segment.term(segment.first.max(first_index));
            if term < bounds.last_term {
                return Err(StorageError::CorruptLog(format!(
                    "segment at {} has term {term}, below the previous entry's {}",
                    segment.first, bounds.last_term
                )));
            }
            bounds.last_index = segment.last();
            bounds.last_term = segment.term(segment.last());
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
        // Reads below go through the bounds: publish the scanned ones first.
        *self.inner.bounds.write() = scanned;
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
        Ok(self.term(index)? == term)
    }

    // ---- writer-thread operations: only `raft-log-writer` (and `open`) call these ----

    /// Writes one group in ONE fjall batch: `entries` (contiguous, as segments), the
    /// rewritten prefix of a segment cut by a truncation, removals of every other segment
    /// at or past the first changed index, and the hard state. Not synced: call
    /// [`LogStore::persist`].
    pub(crate) fn write_group(
        &self,
        entries: &[Entry],
        new_last: (LogIndex, Term),
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        let old = self.bounds();
        let (new_last_index, new_last_term) = new_last;
        let changed_from = entries.first().map_or(new_last_index + 1, |e| e.index);
        assert!(
            changed_from >= old.first_index,
            "a write never changes entries below the log boundary"
        );
        if entries.is_empty() && changed_from > old.last_index && hard_state.is_none() {
            // Nothing to write (a group holding only a compaction request): the log stays
            // idle, so that the compaction this request starts finds it so.
            return Ok(());
        }
        self.inner
            .last_write_ms
            .store(self.millis_since_open(), Ordering::Relaxed);
        let generation = self.generation();
        let mut batch = generation.db.batch().durability(None);
        let mut written = Vec::new();
        let mut rest = entries;
        while !rest.is_empty() {
            let (segment, tail) = rest.split_at(segment_len(rest));
            batch.insert(
                &generation.log,
                log_key(segment[0].index),
                encode_segment(segment),
            );
            written.push(segment[0].index);
            rest = tail;
        }
        if changed_from <= old.last_index {
            // A truncation reaches into what fjall holds: keep the cut segment's prefix,
            // remove every later segment that this batch does not overwrite. Strong
            // removes: these keys may be written again.
            let view = View::of(generation.clone());
            let cut = self
                .segment_containing(&view, changed_from)?
                .ok_or_else(|| {
                    StorageError::CorruptLog(format!("no segment holds entry {changed_from}"))
                })?;
            if cut.first < changed_from {
                let prefix: Vec<Entry> = (cut.first..changed_from).map(|i| cut.entry(i)).collect();
                batch.insert(
                    &view.generation.log,
                    log_key(cut.first),
                    encode_segment(&prefix),
                );
            }
            for key in self.keys_from(&view, changed_from)? {
                if !written.contains(&key) {
                    batch.remove(&view.generation.log, log_key(key));
                }
            }
        }
        if let Some(hs) = hard_state {
            batch.insert(&generation.meta, META_KEY_HARD_STATE, encode_hard_state(hs));
        }
        batch.commit()?;
        let mut bounds = self.inner.bounds.write();
        bounds.last_index = new_last_index;
        bounds.last_term = new_last_term;
        Ok(())
    }

    fn millis_since_open(&self) -> u64 {
        u64::try_from(self.inner.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// After a compaction reached its target: gives back what the compacted entries still
    /// hold. Snapshot files the log no longer joins (recovery could never use them) are
    /// deleted, the newest always kept. If nothing was written for
    /// [`StorageConfig::log_idle_after_ms`], the disk space too: when the database is at
    /// least [`StorageConfig::generation_switch_bytes_min`] and
    /// [`GENERATION_BYTES_PER_LIVE_BYTE_MIN`] times the live entries, the live entries move
    /// to a new generation of the database and the old one is deleted (see
    /// [`super::generation`]: fjall deletes a journal only past 64 MB). Otherwise the
    /// memtables are handed to fjall to flush (their deleted entries are then dropped from
    /// memory). Under load memtables fill and flush by themselves, and an entry compacted
    /// before its memtable is flushed is never written a second time, so only an idle log
    /// is flushed early or rewritten. The caller holds the storage write lock.
    ///
    /// # Errors
    /// IO errors listing or deleting snapshot files or measuring the database; fjall errors
    /// rotating a memtable or building a generation; a failed write of the generation
    /// pointer (fatal: which generation is current is settled by the next start).
    pub(crate) fn release_compacted(
        &self,
        snapshot_index: LogIndex,
    ) -> Result<Option<LogIndex>, StorageError> {
        let removed = self.inner.snapshots.remove_unjoinable(self.first_index())?;
        if removed > 0 {
            log::info!(
                "raft storage {}: deleted {removed} snapshot files older than the log",
                self.inner.dir.display()
            );
        }
        let idle_ms = self
            .millis_since_open()
            .saturating_sub(self.inner.last_write_ms.load(Ordering::Relaxed));
        if idle_ms < self.inner.config.log_idle_after_ms {
            return Ok(None);
        }
        let up_to = self.idle_compaction_target(snapshot_index)?;
        if up_to >= self.first_index() {
            return Ok(Some(up_to));
        }
        if self.switch_generation_if_worth_it()? {
            return Ok(None);
        }
        let generation = self.generation();
        generation.log.rotate_memtable()?;
        generation.meta.rotate_memtable()?;
        Ok(None)
    }

    /// How far an idle log may be compacted: the trailing entries kept below the snapshot
    /// at `snapshot_index` (for followers a little behind) are cut to
    /// [`StorageConfig::idle_trailing_bytes_max`]. After a burst of large entries, 500 of
    /// them can hold many megabytes; an idle leader's live followers have long caught up,
    /// and one that comes back later is sent the snapshot. Returns an index below the first
    /// one when there is nothing to cut. Counts whole segments.
    fn idle_compaction_target(&self, snapshot_index: LogIndex) -> Result<LogIndex, StorageError> {
        let bounds = self.bounds();
        let nothing = bounds.first_index.saturating_sub(1);
        if snapshot_index < bounds.first_index {
            return Ok(nothing);
        }
        let view = self.view();
        let bytes_max = self.inner.config.idle_trailing_bytes_max;
        let mut bytes = 0u64;
        for guard in view
            .snapshot
            .range(&view.generation.log, ..=log_key(snapshot_index))
            .rev()
        {
            let (key, value) = guard.into_inner()?;
            bytes += value.len() as u64;
            if bytes > bytes_max {
                let segment = Segment::decode(index_of_key(&key)?, value)?;
                return Ok(segment.last().min(snapshot_index));
            }
        }
        Ok(nothing)
    }

    /// Moves the live log to a new generation when the current one is far larger on disk
    /// than what it still holds. Returns true if it switched. The caller holds the storage
    /// write lock, so nothing is written meanwhile and the copy is the durable state.
    fn switch_generation_if_worth_it(&self) -> Result<bool, StorageError> {
        let config = &self.inner.config;
        let old = self.generation();
        let disk_bytes = generation::tree_bytes(&old.dir)
            .map_err(|e| StorageError::io("measure", &old.dir, e))?;
        if disk_bytes < config.generation_switch_bytes_min {
            return Ok(false);
        }
        let bounds = self.bounds();
        let live_start = self.live_start(&View::of(old.clone()), &bounds)?;
        let plan = CopyPlan {
            live_start_key: log_key(live_start).to_vec(),
            first_index: bounds.first_index,
            live_bytes_max: (disk_bytes / GENERATION_BYTES_PER_LIVE_BYTE_MIN)
                .min(GENERATION_LIVE_BYTES_MAX),
        };
        let started = Instant::now();
        let new = match generation::build_next(&self.inner.dir, &old, &plan, config)? {
            Ok(new) => Arc::new(new),
            Err(NotSwitched::LiveTooLarge) => {
                log::debug!(
                    "raft storage {}: the live log is too large beside {disk_bytes} bytes on \
                     disk to move it to a new generation",
                    self.inner.dir.display()
                );
                return Ok(false);
            }
        };
        // Read the copy back before trusting it with the log.
        let copied = self.scan_log(&View::of(new.clone()))?;
        let hard_state = read_hard_state(&old)?;
        if copied != bounds || read_hard_state(&new)? != hard_state {
            log::error!(
                "raft storage {}: the new log generation {} reads back as {copied:?} where the \
                 log is {bounds:?}; it is deleted and the current one kept",
                self.inner.dir.display(),
                new.dir.display()
            );
            generation::discard(new);
            return Ok(false);
        }
        let new = generation::make_current(&self.inner.dir, &old, new, config)?;
        *self.inner.current.write() = new.clone();
        log::info!(
            "raft storage {}: the log moved to {} ({} bytes on disk before, {} now, log \
             {}..={}) in {} ms",
            self.inner.dir.display(),
            new.dir.display(),
            disk_bytes,
            generation::tree_bytes(&new.dir).unwrap_or(0),
            bounds.first_index,
            bounds.last_index,
            started.elapsed().as_millis()
        );
        Ok(true)
    }

    /// Makes everything written so far durable (`fdatasync` of fjall's journal).
    pub(crate) fn persist(&self) -> Result<(), StorageError> {
        self.generation().db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// After a snapshot `(index, term)` was installed: keeps the log if it holds that entry
    /// (Raft §7: the entries after it are still valid); otherwise empties the log and
    /// restarts it at `index + 1`. Every segment reaching past the snapshot is removed in
    /// the same batch that moves the boundary; the segments wholly below it become garbage
    /// that bounded rounds remove. Returns the lowest key that may hold garbage.
    pub(crate) fn reset_to_snapshot(
        &self,
        index: LogIndex,
        term: Term,
    ) -> Result<Option<LogIndex>, StorageError> {
        let old = self.bounds();
        assert!(
            index + 1 >= old.first_index,
            "a snapshot never moves the boundary back"
        );
        if self.log_matches(&old, index, term)? {
            return Ok(None);
        }
        let view = self.view();
        let live_start = self.live_start(&view, &old)?;
        let past_start = self
            .segment_containing(&view, index + 1)?
            .map_or(index + 1, |segment| segment.first);
        let mut batch = view.generation.db.batch().durability(None);
        for key in self.keys_from(&view, past_start)? {
            batch.remove(&view.generation.log, log_key(key));
        }
        batch.insert(
            &view.generation.meta,
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
        Ok((live_start < past_start).then_some(live_start))
    }

    /// The key of the first live segment (the one holding the first index), or the first
    /// index when the log is empty.
    fn live_start(&self, view: &View, bounds: &LogBounds) -> Result<LogIndex, StorageError> {
        if bounds.first_index > bounds.last_index {
            return Ok(bounds.first_index);
        }
        Ok(self
            .segment_containing(view, bounds.first_index)?
            .map_or(bounds.first_index, |segment| segment.first))
    }

    /// One bounded compaction round towards "the first live index is `up_to + 1`" (never
    /// past the end of the log): moves the boundary by at most `round_max` entries and
    /// removes the segments wholly below it, in one batch. Returns true if more rounds
    /// are needed.
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
        let view = self.view();
        let from = self.live_start(&view, &old)?;
        let mut batch = view.generation.db.batch().durability(None);
        for guard in view
            .snapshot
            .range(&view.generation.log, log_key(from)..log_key(new_first))
        {
            let (key, value) = guard.into_inner()?;
            let segment = Segment::decode(index_of_key(&key)?, value)?;
            if segment.last() < new_first {
                batch.remove(&view.generation.log, key);
            }
        }
        batch.insert(
            &view.generation.meta,
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

    /// One bounded round removing garbage segments below the live log (left by a snapshot
    /// reset or a crash). Returns where the next round starts, or `None` when done.
    pub(crate) fn remove_garbage_round(
        &self,
        from: LogIndex,
        round_max: u64,
    ) -> Result<Option<LogIndex>, StorageError> {
        let view = self.view();
        let live_start = self.live_start(&view, &self.bounds())?;
        let mut batch = view.generation.db.batch().durability(None);
        let mut next = None;
        for guard in view
            .snapshot
            .range(&view.generation.log, log_key(from)..log_key(live_start))
            .take(usize::try_from(round_max).unwrap_or(usize::MAX) + 1)
        {
            let key = index_of_key(&guard.key()?)?;
            if batch.len() as u64 == round_max {
                next = Some(key);
                break;
            }
            batch.remove(&view.generation.log, log_key(key));
        }
        batch.commit()?;
        Ok(next)
    }

    /// The lowest key below the live log, if any (garbage a crash left behind). This may
    /// walk tombstones, so it runs once, when the writer starts.
    pub(crate) fn find_garbage(&self) -> Result<Option<LogIndex>, StorageError> {
        let view = self.view();
        let live_start = self.live_start(&view, &self.bounds())?;
        match view
            .snapshot
            .range(&view.generation.log, ..log_key(live_start))
            .next()
        {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::EntryKind;
    use bytes::Bytes;

    fn entries(range: std::ops::RangeInclusive<LogIndex>, term: Term) -> Vec<Entry> {
        range
            .map(|index| Entry {
                term,
                index,
                kind: EntryKind::Normal,
                data: Bytes::from(index.to_string()),
            })
            .collect()
    }

    #[test]
    fn compaction_moves_at_most_one_round_per_call() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), &StorageConfig::default()).unwrap();
        // Ten segments of 100 entries, then one of 1000.
        for k in 0..10 {
            let batch = entries(k * 100 + 1..=k * 100 + 100, 1);
            let last = batch.last().map(|e| (e.index, e.term)).unwrap();
            store.write_group(&batch, last, None).unwrap();
        }
        store
            .write_group(&entries(1001..=2000, 2), (2000, 2), None)
            .unwrap();
        assert!(
            store.compact_round(1500, 250).unwrap(),
            "more rounds needed"
        );
        assert_eq!(store.first_index(), 251);
        assert_eq!(store.term(250).unwrap(), 1);
        assert!(matches!(
            store.term(249),
            Err(StorageError::Compacted { .. })
        ));
        // The segment 201..=300 straddles the boundary and stays; 1..=200 are gone.
        assert_eq!(store.find_garbage().unwrap(), None);
        assert_eq!(store.keys_from(&store.view(), 1).unwrap()[0], 201);
        let mut rounds = 1;
        loop {
            rounds += 1;
            if !store.compact_round(1500, 250).unwrap() {
                break;
            }
        }
        assert_eq!(rounds, 6, "1500 entries in rounds of at most 250");
        assert_eq!(store.first_index(), 1501);
        assert_eq!(store.term(1500).unwrap(), 2);
        assert_eq!(
            store.entries(1501..1503, u64::MAX).unwrap(),
            entries(1501..=1502, 2)
        );
        assert!(
            !store.compact_round(1500, 250).unwrap(),
            "target reached: nothing to do"
        );
    }

    #[test]
    fn truncation_rewrites_the_cut_segment_and_drops_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path(), &StorageConfig::default()).unwrap();
        store
            .write_group(&entries(1..=10, 1), (10, 1), None)
            .unwrap();
        store
            .write_group(&entries(11..=20, 1), (20, 1), None)
            .unwrap();
        store
            .write_group(&entries(21..=30, 1), (30, 1), None)
            .unwrap();
        // Cut inside the first segment, append 6..=7 of term 2.
        store.write_group(&entries(6..=7, 2), (7, 2), None).unwrap();
        assert_eq!(store.keys_from(&store.view(), 1).unwrap(), vec![1, 6]);
        let all = store.entries(1..8, u64::MAX).unwrap();
        assert_eq!(all[..5], entries(1..=5, 1)[..]);
        assert_eq!(all[5..], entries(6..=7, 2)[..]);
        // A pure truncation at a segment start removes that segment.
        store.write_group(&[], (5, 1), None).unwrap();
        assert_eq!(store.keys_from(&store.view(), 1).unwrap(), vec![1]);
        assert_eq!(store.last_index(), 5);
        let (prev_term, after) = store.entries_after(3, 6, u64::MAX).unwrap();
        assert_eq!((prev_term, after), (1, entries(4..=5, 1)));
        assert_eq!(store.entries_after(5, 6, u64::MAX).unwrap(), (1, vec![]));
        assert_eq!(
            store.entries_after(0, 2, u64::MAX).unwrap(),
            (0, entries(1..=1, 1))
        );
        assert!(matches!(
            store.term(6),
            Err(StorageError::Unavailable { .. })
        ));
    }

    fn big_entries(range: std::ops::RangeInclusive<LogIndex>, term: Term) -> Vec<Entry> {
        range
            .map(|index| Entry {
                term,
                index,
                kind: EntryKind::Normal,
                data: Bytes::from(vec![(index % 251) as u8; 1024]),
            })
            .collect()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("log"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_idle_compacted_log_moves_to_a_new_generation_and_the_old_one_goes_when_unread() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            log_idle_after_ms: 0,
            generation_switch_bytes_min: 1 << 20,
            ..StorageConfig::default()
        };
        let (store, _) = LogStore::open(dir.path(), &config).unwrap();
        for k in 0..50 {
            let batch = big_entries(k * 100 + 1..=k * 100 + 100, 2);
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: k * 100 + 100,
            };
            store
                .write_group(&batch, (k * 100 + 100, 2), Some(&hs))
                .unwrap();
        }
        store.persist().unwrap();
        let meta = SnapshotMeta {
            index: 4990,
            term: 2,
            membership: Default::default(),
        };
        let mut builder = store.snapshots().create(meta).unwrap();
        builder.write_chunk(0, b"state").unwrap();
        builder.finish().unwrap();
        while store.compact_round(4950, 10_000).unwrap() {}
        let before = generation::tree_bytes(&dir.path().join("log")).unwrap();
        assert!(before > 4 << 20, "5 MB of entries were written: {before}");
        // A reader in the middle of a read when the switch comes keeps its generation.
        let reader = store.view();
        assert_eq!(store.release_compacted(4990).unwrap(), None);
        assert_eq!(store.log_dir(), dir.path().join("log.gen-1"));
        assert_eq!(names(dir.path()), ["log", "log.current", "log.gen-1"]);
        assert_eq!(
            store
                .segment_containing(&reader, 4960)
                .unwrap()
                .unwrap()
                .term(4960),
            2
        );
        drop(reader);
        assert_eq!(
            names(dir.path()),
            ["log.current", "log.gen-1"],
            "unread, so deleted"
        );
        let after = generation::tree_bytes(&dir.path().join("log.gen-1")).unwrap();
        assert!(after < before / 4, "{after} bytes left of {before}");
        assert_eq!(
            store.entries(4951..5001, u64::MAX).unwrap(),
            big_entries(4951..=5000, 2)
        );
        // Writes go to the new generation, and a reopen finds them and the hard state.
        let hs = HardState {
            term: 3,
            vote: 2,
            commit: 5000,
        };
        store
            .write_group(&big_entries(5001..=5010, 3), (5010, 3), Some(&hs))
            .unwrap();
        store.persist().unwrap();
        drop(store);
        let (store, recovered) = LogStore::open(dir.path(), &config).unwrap();
        assert_eq!(recovered.hard_state, hs);
        assert_eq!(
            recovered.bounds,
            LogBounds {
                first_index: 4951,
                prev_term: 2,
                last_index: 5010,
                last_term: 3
            }
        );
        assert_eq!(store.entries(4951..5011, u64::MAX).unwrap().len(), 60);
        // Not worth it again: the database is small now.
        assert_eq!(store.release_compacted(4990).unwrap(), None);
        assert_eq!(store.log_dir(), dir.path().join("log.gen-1"));
    }

    #[test]
    fn an_idle_log_keeps_trailing_entries_up_to_a_byte_bound_and_never_past_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            idle_trailing_bytes_max: 50_000,
            ..StorageConfig::default()
        };
        let (store, _) = LogStore::open(dir.path(), &config).unwrap();
        for k in 0..100 {
            let batch = big_entries(k * 10 + 1..=k * 10 + 10, 1);
            store.write_group(&batch, (k * 10 + 10, 1), None).unwrap();
        }
        // Five segments of ten 1 KiB entries pass 50,000 bytes: keep the four above.
        assert_eq!(store.idle_compaction_target(900).unwrap(), 860);
        // A segment larger than the bound alone: cut at the snapshot, not past it.
        store
            .write_group(&big_entries(1001..=1100, 1), (1100, 1), None)
            .unwrap();
        assert_eq!(store.idle_compaction_target(1050).unwrap(), 1050);
        while store.compact_round(1050, 10_000).unwrap() {}
        assert_eq!(store.first_index(), 1051);
        assert!(store.idle_compaction_target(1050).unwrap() < store.first_index());
    }

    #[test]
    fn a_reopened_generation_moves_again() {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            log_idle_after_ms: 0,
            generation_switch_bytes_min: 256 << 10,
            ..StorageConfig::default()
        };
        let mut last = 0;
        for round in 1..=3u64 {
            let (store, _) = LogStore::open(dir.path(), &config).unwrap();
            for _ in 0..20 {
                let batch = big_entries(last + 1..=last + 100, round);
                last += 100;
                let hs = HardState {
                    term: round,
                    vote: 1,
                    commit: last,
                };
                store.write_group(&batch, (last, round), Some(&hs)).unwrap();
            }
            store.persist().unwrap();
            let meta = SnapshotMeta {
                index: last - 10,
                term: round,
                membership: Default::default(),
            };
            let mut builder = store.snapshots().create(meta).unwrap();
            builder.write_chunk(0, b"state").unwrap();
            builder.finish().unwrap();
            while store.compact_round(last - 40, 10_000).unwrap() {}
            assert_eq!(store.release_compacted(last - 10).unwrap(), None);
            assert_eq!(
                store.log_dir(),
                dir.path().join(format!("log.gen-{round}")),
                "round {round}"
            );
        }
    }
}
