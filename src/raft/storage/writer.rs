//! The group-commit log writer and the raft thread's view of the log.
//!
//! Owns the `raft-log-writer` thread and the channels to and from it. The raft thread holds
//! a [`LogHandle`]: it submits each Ready's `(truncate_from?, entries, hard state)` as one
//! [`AppendRequest`] and later receives [`WriterEvent::Durable`] on the event channel. The
//! writer drains every queued request, writes them as ONE fjall batch, calls
//! `persist(SyncData)` once, and only then reports the durable `(index, term)` and hard
//! state. Between groups, and only when no request is waiting, it runs one bounded
//! compaction round.
//!
//! Read model: the handle keeps every submitted entry that is not yet known durable in an
//! in-memory tail, so reads through the handle (`term`, `entries`, `last_index`) see the
//! log exactly as submitted, including truncations still in flight. Reads through a bare
//! [`LogStore`] (e.g. from another thread) see only what the writer has written to fjall.
//!
//! Inline writes: when nothing submitted is still in flight, the raft thread may write and
//! fsync a request itself ([`LogHandle::write_inline`]) instead of handing it over. A
//! follower does: it must persist before it acknowledges anyway, and two thread wake-ups
//! (to the writer and back) cost more than the fsync on a small host. Every store write
//! (a group, an inline write, a compaction round) holds the write lock, so the writer
//! thread and the raft thread never write at the same time.
//!
//! Must never report an index as durable before its fsync returned, never write after a
//! failed write or fsync (the writer stops and sends [`WriterEvent::Fatal`]), and never
//! block on the raft thread while holding unreported progress (events are coalesced).

use std::collections::VecDeque;
use std::ops::Range;
use std::thread::JoinHandle;

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use parking_lot::Mutex;

use super::log::{LogBounds, LogStore, Recovered};
use super::watermark::{Watermark, WatermarkRecord};
use super::{StorageConfig, StorageError};
use crate::raft::types::{Entry, HardState, LogIndex, SnapshotMeta, Term};

/// Name of the writer thread.
pub const WRITER_THREAD_NAME: &str = "raft-log-writer";

/// Events the writer may hold for the raft thread before it coalesces them: a [`Durable`]
/// supersedes the ones before it, so a slow raft thread only ever delays, never loses,
/// progress, and the writer never blocks on it.
pub const WRITER_EVENTS_LEN_MAX: usize = 64;

/// The writes of one Ready, made durable atomically: after a crash either all of it is on
/// disk or none of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendRequest {
    /// Remove every entry at or after this index first (a conflicting suffix). If
    /// `entries` is not empty it must start exactly here.
    pub truncate_from: Option<LogIndex>,
    /// Contiguous entries with non-decreasing terms, starting right after the log's last
    /// entry (or at `truncate_from`).
    pub entries: Vec<Entry>,
    /// The hard state to persist with them, if it changed.
    pub hard_state: Option<HardState>,
}

/// What the writer has made durable: everything submitted up to request `seq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Durable {
    /// The highest request sequence number included (as returned by `submit`).
    pub seq: u64,
    /// The last index of the durable log. After a truncation this can be lower than an
    /// index reported before; match `(last_index, last_term)` against your log before
    /// counting it (an entry with another term at that index is not the one you sent).
    pub last_index: LogIndex,
    /// The term of the entry at `last_index`.
    pub last_term: Term,
    /// The durable hard state.
    pub hard_state: HardState,
}

/// What the writer tells the raft thread.
#[derive(Debug)]
pub enum WriterEvent {
    /// Progress: requests up to `seq` are durable.
    Durable(Durable),
    /// A write or fsync failed; nothing after the last `Durable` is durable and the writer
    /// has stopped. The node must stop.
    Fatal(StorageError),
}

enum Request {
    Append {
        seq: u64,
        request: AppendRequest,
    },
    SnapshotInstalled {
        seq: u64,
        index: LogIndex,
        term: Term,
    },
    Compact {
        up_to: LogIndex,
        snapshot_index: LogIndex,
    },
}

/// What the writer thread and inline writes share, behind the write lock: holding it is
/// the right to write to the store.
struct Durability {
    /// The durable hard state.
    hard_state: HardState,
    /// Groups (and inline writes) fsynced so far; the test-only fault counts them.
    groups_written: u64,
    /// Where what became durable is recorded outside fjall (see [`super::watermark`]).
    watermark: Option<Watermark>,
}

impl Durability {
    /// Records the durable hard state in the watermark after an fsync. Its commit is the
    /// one the raft thread knew when it submitted the entries now durable: every entry up
    /// to it is in the durable log, and committed entries are never truncated, so the
    /// record stays true whatever is written later. `commit_term` reads the durable log.
    fn record_durable(
        &mut self,
        commit_term: impl FnOnce(LogIndex) -> Result<Term, StorageError>,
    ) -> Result<(), StorageError> {
        let hard_state = self.hard_state;
        self.record(hard_state.commit, commit_term)
    }

    /// Records `commit` (durable and committed) with the durable term and vote.
    fn record(
        &mut self,
        commit: LogIndex,
        commit_term: impl FnOnce(LogIndex) -> Result<Term, StorageError>,
    ) -> Result<(), StorageError> {
        let Some(watermark) = self.watermark.as_mut() else {
            return Ok(());
        };
        let current = watermark.record();
        let (commit, commit_term) = if commit > current.commit {
            match commit_term(commit) {
                Ok(term) => (commit, term),
                // Below the log boundary: a snapshot covers it; keep the recorded commit.
                Err(StorageError::Compacted { .. }) => (0, 0),
                Err(error) => return Err(error),
            }
        } else {
            (0, 0)
        };
        let next = WatermarkRecord {
            raft_id: current.raft_id,
            term: self.hard_state.term,
            vote: self.hard_state.vote,
            commit,
            commit_term,
        };
        watermark
            .advance(next)
            .map_err(|e| StorageError::io("write", watermark.path().to_path_buf(), e))
    }
}

/// The write lock.
type WriteLock = Arc<Mutex<Durability>>;

/// The raft thread's side of storage: the writer's input, the unstable tail, and reads
/// that see both. Dropping it (or [`LogHandle::shutdown`]) lets the writer finish what was
/// submitted and joins it.
pub struct LogHandle {
    store: LogStore,
    requests: Option<Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    next_seq: u64,
    /// The highest sequence number reported durable (`on_durable`).
    durable_seq: u64,
    /// The highest commit index [`LogHandle::record_commit`] recorded (spares the lock).
    recorded_commit: LogIndex,
    trailing_entries_kept: u64,
    view: View,
    hard_state: HardState,
    write_lock: WriteLock,
    #[cfg(test)]
    fail_sync_at_group: Option<u64>,
}

/// The log as submitted. The tail holds `(seq, entry)` for every entry not yet durable, and
/// always ends at `last_index`; below the tail the store is authoritative.
struct View {
    first_index: LogIndex,
    prev_term: Term,
    last_index: LogIndex,
    /// The term at `last_index`, kept so the hot path never reads the store for it.
    last_term: Term,
    tail: VecDeque<(u64, Entry)>,
}

impl View {
    fn tail_first(&self) -> LogIndex {
        self.last_index + 1 - self.tail.len() as u64
    }
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle")
            .field("first_index", &self.view.first_index)
            .field("last_index", &self.view.last_index)
            .field("tail_len", &self.view.tail.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl LogHandle {
    /// Starts the `raft-log-writer` thread over `store`, resuming from `recovered`.
    /// Returns the handle and the event channel the raft thread must drain.
    ///
    /// # Errors
    /// [`StorageError::Io`] if the thread cannot be spawned; fjall errors looking for
    /// garbage left below the log boundary.
    pub fn start(
        store: LogStore,
        recovered: &Recovered,
        config: &StorageConfig,
    ) -> Result<(Self, Receiver<WriterEvent>), StorageError> {
        assert!(config.request_queue_len_max > 0 && config.group_entries_max > 0);
        let (requests_tx, requests_rx) = crossbeam_channel::bounded(config.request_queue_len_max);
        let (events_tx, events_rx) = crossbeam_channel::bounded(WRITER_EVENTS_LEN_MAX);
        let bounds = store.bounds();
        let write_lock = Arc::new(Mutex::new(Durability {
            hard_state: recovered.hard_state,
            groups_written: 0,
            watermark: None,
        }));
        let writer = Writer {
            store: store.clone(),
            requests: requests_rx,
            events: events_tx,
            pending_event: None,
            write_lock: write_lock.clone(),
            compact_up_to: 0,
            snapshot_index: 0,
            garbage_from: store.find_garbage()?,
            config: config.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD_NAME.into())
            .spawn(move || writer.run())
            .map_err(|e| StorageError::io("spawn", WRITER_THREAD_NAME, e))?;
        Ok((
            Self {
                store,
                requests: Some(requests_tx),
                thread: Some(thread),
                next_seq: 1,
                durable_seq: 0,
                recorded_commit: 0,
                trailing_entries_kept: config.trailing_entries_kept,
                view: View {
                    first_index: bounds.first_index,
                    prev_term: bounds.prev_term,
                    last_index: bounds.last_index,
                    last_term: bounds.last_term,
                    tail: VecDeque::new(),
                },
                hard_state: recovered.hard_state,
                write_lock,
                #[cfg(test)]
                fail_sync_at_group: config.fail_sync_at_group,
            },
            events_rx,
        ))
    }

    /// The store underneath (reads of durable-or-written entries from any thread).
    pub fn store(&self) -> &LogStore {
        &self.store
    }

    /// Queues one Ready's writes; reads through this handle see them at once. Blocks while
    /// [`StorageConfig::request_queue_len_max`] requests are already queued. Returns the
    /// request's sequence number, which a later [`Durable::seq`] covers.
    ///
    /// # Errors
    /// [`StorageError::InvalidRequest`] if the request would leave a gap, truncate
    /// compacted entries, decrease a term or move the hard state backwards (nothing is
    /// queued); [`StorageError::WriterStopped`] if the writer is gone.
    pub fn submit(&mut self, request: AppendRequest) -> Result<u64, StorageError> {
        let term_before = self.validate(&request)?;
        let seq = self.next_seq;
        if self.requests.is_none() {
            return Err(StorageError::WriterStopped);
        }
        // Update the view first: it is what the raft thread reads, and it must reflect
        // the request whether or not the writer has picked it up yet.
        if let Some(from) = request.truncate_from {
            self.truncate_view(from, term_before);
        }
        for entry in &request.entries {
            self.view.tail.push_back((seq, entry.clone()));
        }
        self.view.last_index += request.entries.len() as u64;
        if let Some(last) = request.entries.last() {
            self.view.last_term = last.term;
        }
        if let Some(hs) = request.hard_state {
            self.hard_state = hs;
        }
        self.requests
            .as_ref()
            .ok_or(StorageError::WriterStopped)?
            .send(Request::Append { seq, request })
            .map_err(|_| StorageError::WriterStopped)?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// True when everything submitted has been reported durable (through
    /// [`LogHandle::on_durable`]): a [`LogHandle::write_inline`] now cannot overtake an
    /// earlier request.
    pub fn is_idle(&self) -> bool {
        self.durable_seq + 1 == self.next_seq
    }

    /// Writes `request` on the calling thread and fsyncs it, under the write lock (a
    /// compaction round of the writer may delay it by one round). Returns the durable
    /// progress to report to the core at once; its `seq` is the last submitted one.
    ///
    /// # Panics
    /// If a submitted request is still in flight ([`LogHandle::is_idle`] is false): the
    /// inline write would overtake it.
    ///
    /// # Errors
    /// [`StorageError::InvalidRequest`] as for [`LogHandle::submit`] (nothing written);
    /// [`StorageError::WriterStopped`] after shutdown; a failed write or fsync (fatal:
    /// the store refuses every later write, and the node must stop).
    pub fn write_inline(&mut self, request: AppendRequest) -> Result<Durable, StorageError> {
        assert!(
            self.is_idle(),
            "an inline write never overtakes a submitted request"
        );
        debug_assert!(self.view.tail.is_empty(), "nothing in flight, so no tail");
        if self.requests.is_none() {
            return Err(StorageError::WriterStopped);
        }
        let term_before = self.validate(&request)?;
        let new_last = match (request.entries.last(), request.truncate_from) {
            (Some(last), _) => (last.index, last.term),
            (None, Some(from)) => (from - 1, term_before),
            (None, None) => (self.view.last_index, self.view.last_term),
        };
        let hard_state = {
            let mut durability = self.write_lock.lock();
            self.store
                .write_group(&request.entries, new_last, request.hard_state.as_ref())?;
            durability.groups_written += 1;
            #[cfg(test)]
            if self.fail_sync_at_group == Some(durability.groups_written) {
                return Err(StorageError::Poisoned);
            }
            self.store.persist()?;
            if let Some(hs) = request.hard_state {
                durability.hard_state = hs;
            }
            let store = &self.store;
            durability.record_durable(|index| store.term(index))?;
            durability.hard_state
        };
        (self.view.last_index, self.view.last_term) = new_last;
        self.hard_state = hard_state;
        Ok(Durable {
            seq: self.durable_seq,
            last_index: new_last.0,
            last_term: new_last.1,
            hard_state,
        })
    }

    /// Tells the writer a snapshot `meta` was installed (its file is already durable): the
    /// log is kept if it holds the snapshot's last entry, otherwise it restarts right after
    /// it (Raft §7). Returns the sequence number a later [`Durable`] covers.
    ///
    /// Crash note: the snapshot file is durable before this request is. If earlier writes
    /// are still queued, a crash may recover the snapshot with the hard state of an
    /// earlier durable write (the log restarts after the snapshot either way). That is
    /// safe, since nothing in those writes was acknowledged.
    ///
    /// # Errors
    /// [`StorageError::InvalidRequest`] if the snapshot ends before the log's boundary (it
    /// would move the boundary back); [`StorageError::WriterStopped`] if the writer is gone.
    pub fn snapshot_installed(&mut self, meta: &SnapshotMeta) -> Result<u64, StorageError> {
        let seq = self.next_seq;
        if self.requests.is_none() {
            return Err(StorageError::WriterStopped);
        }
        let first_index = self.boundary().0;
        if meta.index + 1 < first_index {
            return Err(StorageError::InvalidRequest(format!(
                "snapshot at {} is older than the log boundary {first_index}",
                meta.index
            )));
        }
        if self.term(meta.index).ok() != Some(meta.term) {
            self.view.tail.clear();
            self.view.first_index = meta.index + 1;
            self.view.prev_term = meta.term;
            self.view.last_index = meta.index;
            self.view.last_term = meta.term;
        }
        self.requests
            .as_ref()
            .ok_or(StorageError::WriterStopped)?
            .send(Request::SnapshotInstalled {
                seq,
                index: meta.index,
                term: meta.term,
            })
            .map_err(|_| StorageError::WriterStopped)?;
        self.next_seq += 1;
        Ok(seq)
    }

    /// After a durable snapshot at `snapshot_index`, asks the writer to drop entries up to
    /// `snapshot_index - trailing_entries_kept`, in bounded rounds between write groups.
    /// Only call it once the snapshot file is installed: recovery refuses a log whose
    /// boundary has no valid snapshot behind it. The target is clamped to the log's end.
    ///
    /// # Errors
    /// [`StorageError::WriterStopped`] if the writer is gone.
    pub fn compact(&mut self, snapshot_index: LogIndex) -> Result<(), StorageError> {
        let up_to = snapshot_index.saturating_sub(self.trailing_entries_kept);
        if up_to == 0 {
            return Ok(());
        }
        let sender = self.requests.as_ref().ok_or(StorageError::WriterStopped)?;
        sender
            .send(Request::Compact {
                up_to,
                snapshot_index,
            })
            .map_err(|_| StorageError::WriterStopped)
    }

    /// Hands the writer the member's watermark (checked against the recovered storage by
    /// the caller): from now on every fsync records what it made durable there.
    pub fn keep_watermark(&mut self, watermark: Watermark) {
        self.recorded_commit = watermark.record().commit;
        self.write_lock.lock().watermark = Some(watermark);
    }

    /// Records `commit` in the watermark if everything submitted is durable (then the log
    /// as submitted is the durable log, and `commit` is in it). Call it when the commit
    /// index advances: a write group records the commit known when it was submitted, so
    /// without this the last group's entries would stay unrecorded until the next write.
    /// Does nothing while writes are in flight (the next group records a later commit).
    ///
    /// # Errors
    /// A failed write of the watermark (the disk is failing: stop the node).
    pub fn record_commit(&mut self, commit: LogIndex) -> Result<(), StorageError> {
        if commit <= self.recorded_commit || !self.is_idle() {
            return Ok(());
        }
        let term = match self.term(commit) {
            Ok(term) => term,
            // Covered by a snapshot already; nothing newer to record.
            Err(StorageError::Compacted { .. }) => return Ok(()),
            Err(error) => return Err(error),
        };
        self.write_lock.lock().record(commit, |_| Ok(term))?;
        self.recorded_commit = commit;
        Ok(())
    }

    /// Forgets the in-memory copies of entries the writer has made durable. Call it for
    /// every [`WriterEvent::Durable`].
    pub fn on_durable(&mut self, durable: &Durable) {
        self.durable_seq = self.durable_seq.max(durable.seq);
        while let Some((seq, _)) = self.view.tail.front() {
            if *seq > durable.seq {
                break;
            }
            self.view.tail.pop_front();
        }
    }

    /// The hard state most recently submitted (durable or not).
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// The first readable index.
    pub fn first_index(&self) -> LogIndex {
        self.boundary().0
    }

    /// The last submitted index.
    pub fn last_index(&self) -> LogIndex {
        self.view.last_index
    }

    /// The term of the last submitted entry.
    pub fn last_term(&self) -> Term {
        self.view.last_term
    }

    /// The term at `index`, counting submitted entries and the boundary
    /// (`first_index - 1`).
    ///
    /// # Errors
    /// [`StorageError::Compacted`], [`StorageError::Unavailable`], or a store error.
    pub fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index > self.view.last_index {
            return Err(StorageError::Unavailable {
                index,
                last_index: self.view.last_index,
            });
        }
        if index == self.view.last_index {
            return Ok(self.view.last_term);
        }
        let tail_first = self.view.tail_first();
        if index >= tail_first {
            return Ok(self.view.tail[(index - tail_first) as usize].1.term);
        }
        let (first_index, prev_term) = self.boundary();
        if index + 1 == first_index {
            return Ok(prev_term);
        }
        if index < first_index {
            return Err(StorageError::Compacted { index, first_index });
        }
        self.store.term(index)
    }

    /// The submitted entries in `range`, at least one, stopping once payloads exceed
    /// `bytes_max`.
    ///
    /// # Errors
    /// [`StorageError::Compacted`], [`StorageError::Unavailable`], or a store error.
    pub fn entries(
        &self,
        range: Range<LogIndex>,
        bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if range.end > self.view.last_index + 1 {
            return Err(StorageError::Unavailable {
                index: range.end - 1,
                last_index: self.view.last_index,
            });
        }
        let (first_index, _) = self.boundary();
        if range.start < first_index {
            return Err(StorageError::Compacted {
                index: range.start,
                first_index,
            });
        }
        let tail_first = self.view.tail_first();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        if range.start < tail_first {
            out = self
                .store
                .entries(range.start..range.end.min(tail_first), bytes_max)?;
            bytes = out.iter().map(|e| e.data.len() as u64).sum();
            if range.start + out.len() as u64 != range.end.min(tail_first) || bytes >= bytes_max {
                return Ok(out);
            }
        }
        for index in range.start.max(tail_first)..range.end {
            let entry = &self.view.tail[(index - tail_first) as usize].1;
            bytes += entry.data.len() as u64;
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            out.push(entry.clone());
            if bytes >= bytes_max {
                break;
            }
        }
        Ok(out)
    }

    /// Lets the writer finish every queued request, then joins it.
    ///
    /// # Errors
    /// [`StorageError::WriterStopped`] if the writer thread panicked.
    pub fn shutdown(mut self) -> Result<(), StorageError> {
        self.stop_writer()
    }

    fn stop_writer(&mut self) -> Result<(), StorageError> {
        self.requests = None;
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| StorageError::WriterStopped),
            None => Ok(()),
        }
    }

    /// The log boundary: the view's, or the store's if compaction has moved past it.
    fn boundary(&self) -> (LogIndex, Term) {
        let LogBounds {
            first_index,
            prev_term,
            ..
        } = self.store.bounds();
        if first_index > self.view.first_index {
            (first_index, prev_term)
        } else {
            (self.view.first_index, self.view.prev_term)
        }
    }

    /// Cuts the view at `from`; `term_before` is the term at `from - 1`.
    fn truncate_view(&mut self, from: LogIndex, term_before: Term) {
        let tail_first = self.view.tail_first();
        let kept = from.saturating_sub(tail_first) as usize;
        self.view.tail.truncate(kept);
        self.view.last_index = from - 1;
        self.view.last_term = term_before;
    }

    /// Checks `request` against the view; returns the term of the entry just before the
    /// request's first index (where a truncation leaves the log's end).
    fn validate(&self, request: &AppendRequest) -> Result<Term, StorageError> {
        let invalid = |why: String| Err(StorageError::InvalidRequest(why));
        let first_index = self.boundary().0;
        let start = match request.truncate_from {
            Some(from) if from < first_index || from > self.view.last_index + 1 => {
                return invalid(format!(
                    "truncate from {from} outside the log {first_index}..={}",
                    self.view.last_index
                ));
            }
            Some(from) => from,
            None => self.view.last_index + 1,
        };
        let term_before = self.term(start - 1)?;
        let mut prev_term = term_before;
        for (offset, entry) in request.entries.iter().enumerate() {
            if entry.index != start + offset as u64 {
                return invalid(format!(
                    "entry {} where {} was expected (set truncate_from to overwrite)",
                    entry.index,
                    start + offset as u64
                ));
            }
            if entry.term < prev_term {
                return invalid(format!(
                    "entry {} has term {}, below the previous term {prev_term}",
                    entry.index, entry.term
                ));
            }
            prev_term = entry.term;
        }
        if let Some(hs) = &request.hard_state
            && (hs.term < self.hard_state.term || hs.commit < self.hard_state.commit)
        {
            return invalid(format!(
                "hard state {hs:?} moves back from {:?}",
                self.hard_state
            ));
        }
        Ok(term_before)
    }
}

impl Drop for LogHandle {
    fn drop(&mut self) {
        if self.stop_writer().is_err() {
            log::error!("{WRITER_THREAD_NAME} panicked");
        }
    }
}

/// The writer thread's state.
struct Writer {
    store: LogStore,
    requests: Receiver<Request>,
    events: Sender<WriterEvent>,
    /// The newest durable progress not yet handed to the raft thread (its channel was full).
    pending_event: Option<Durable>,
    /// Held for every store write; guards the durable hard state.
    write_lock: WriteLock,
    /// Compaction target: the first live index should become `compact_up_to + 1`.
    compact_up_to: LogIndex,
    /// The newest snapshot's index a compaction was asked for: an idle log may be
    /// compacted further, never past it.
    snapshot_index: LogIndex,
    /// The lowest index below the boundary that may still hold a stale key.
    garbage_from: Option<LogIndex>,
    config: StorageConfig,
}

/// One group being assembled: the requests drained in one go, merged into the final shape
/// they give the log.
struct Group {
    /// Entries to insert: contiguous, ending at `last_index` when not empty.
    entries: Vec<Entry>,
    last_index: LogIndex,
    last_term: Term,
    hard_state: Option<HardState>,
    seq: u64,
    bytes: usize,
}

impl Writer {
    fn run(mut self) {
        loop {
            let first = match self.next_request() {
                Ok(Some(request)) => request,
                Ok(None) => break,
                Err(error) => return self.fail(error),
            };
            if let Err(error) = self.write_group(first) {
                return self.fail(error);
            }
        }
        // Shutting down: progress is durable already; report it if there is room, but
        // never block on a raft thread that may be gone or joining us.
        if let Some(durable) = self.pending_event.take() {
            let _ = self.events.try_send(WriterEvent::Durable(durable));
        }
        // A clean stop leaves an exact watermark even if power is lost afterwards.
        if let Some(watermark) = &self.write_lock.lock().watermark
            && let Err(e) = watermark.sync()
        {
            log::error!("cannot sync {}: {e}", watermark.path().display());
        }
    }

    /// Waits for the next request, reporting pending progress and running compaction
    /// rounds while there is nothing to write. `None` once the handle is gone.
    fn next_request(&mut self) -> Result<Option<Request>, StorageError> {
        loop {
            self.try_report();
            if self.has_compaction_work() {
                match self.requests.try_recv() {
                    Ok(request) => return Ok(Some(request)),
                    Err(TryRecvError::Disconnected) => return Ok(None),
                    Err(TryRecvError::Empty) => {
                        self.compaction_round()?;
                        continue;
                    }
                }
            }
            let Some(durable) = self.pending_event else {
                return Ok(self.requests.recv().ok());
            };
            crossbeam_channel::select! {
                recv(self.requests) -> request => return Ok(request.ok()),
                // Delivered, or the raft thread dropped its receiver (then the writer keeps
                // writing what the handle sends until the handle is dropped too).
                send(self.events, WriterEvent::Durable(durable)) -> _ => self.pending_event = None,
            }
        }
    }

    fn try_report(&mut self) {
        if let Some(durable) = self.pending_event {
            match self.events.try_send(WriterEvent::Durable(durable)) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => self.pending_event = None,
                Err(TrySendError::Full(_)) => {}
            }
        }
    }

    /// Drains every queued request (up to the group limits) into one batch, writes it,
    /// fsyncs once and records the progress to report.
    fn write_group(&mut self, first: Request) -> Result<(), StorageError> {
        let lock = self.write_lock.clone();
        let mut durability = lock.lock();
        let bounds = self.store.bounds();
        let mut group = Group {
            entries: Vec::new(),
            last_index: bounds.last_index,
            last_term: bounds.last_term,
            hard_state: None,
            seq: 0,
            bytes: 0,
        };
        let mut next = Some(first);
        while let Some(request) = next.take() {
            self.apply(&mut group, request)?;
            if group.entries.len() >= self.config.group_entries_max
                || group.bytes >= self.config.group_bytes_max
            {
                break;
            }
            next = self.requests.try_recv().ok();
        }
        self.commit(&mut group)?;
        self.sync(&mut durability)?;
        if let Some(hs) = group.hard_state {
            durability.hard_state = hs;
        }
        let store = &self.store;
        durability.record_durable(|index| store.term(index))?;
        if group.seq > 0 {
            self.pending_event = Some(Durable {
                seq: group.seq,
                last_index: group.last_index,
                last_term: group.last_term,
                hard_state: durability.hard_state,
            });
        }
        Ok(())
    }

    fn apply(&mut self, group: &mut Group, request: Request) -> Result<(), StorageError> {
        match request {
            Request::Append { seq, request } => {
                if let Some(from) = request.truncate_from {
                    self.truncate_group(group, from)?;
                }
                if let Some(last) = request.entries.last() {
                    assert_eq!(
                        request.entries[0].index,
                        group.last_index + 1,
                        "the handle validated contiguity"
                    );
                    group.last_index = last.index;
                    group.last_term = last.term;
                    group.bytes += request.entries.iter().map(|e| e.data.len()).sum::<usize>();
                    if group.entries.is_empty() {
                        group.entries = request.entries;
                    } else {
                        group.entries.extend(request.entries);
                    }
                }
                if request.hard_state.is_some() {
                    group.hard_state = request.hard_state;
                }
                group.seq = seq;
            }
            Request::SnapshotInstalled { seq, index, term } => {
                // The reset must see every earlier request in fjall: write them first (one
                // fsync still covers both batches: the journal is sequential).
                self.commit(group)?;
                if let Some(from) = self.store.reset_to_snapshot(index, term)? {
                    self.garbage_from = Some(self.garbage_from.map_or(from, |g| g.min(from)));
                }
                let bounds = self.store.bounds();
                group.last_index = bounds.last_index;
                group.last_term = bounds.last_term;
                group.seq = seq;
            }
            Request::Compact {
                up_to,
                snapshot_index,
            } => {
                self.compact_up_to = self.compact_up_to.max(up_to);
                self.snapshot_index = self.snapshot_index.max(snapshot_index);
            }
        }
        Ok(())
    }

    /// Cuts the group at `from`: drops group entries at or after it, and makes the group's
    /// last entry `from - 1` (read from the group or the store).
    fn truncate_group(&self, group: &mut Group, from: LogIndex) -> Result<(), StorageError> {
        let group_first = group.last_index + 1 - group.entries.len() as u64;
        if from >= group_first && !group.entries.is_empty() {
            group.entries.truncate((from - group_first) as usize);
        } else {
            group.entries.clear();
        }
        group.last_index = from - 1;
        group.last_term = match group.entries.last() {
            Some(entry) => entry.term,
            None => self.store.term(from - 1)?,
        };
        Ok(())
    }

    /// Writes the group's merged shape as one batch and empties it (its last index and
    /// term stay: they are the log's shape now).
    fn commit(&mut self, group: &mut Group) -> Result<(), StorageError> {
        self.store.write_group(
            &group.entries,
            (group.last_index, group.last_term),
            group.hard_state.as_ref(),
        )?;
        group.entries.clear();
        Ok(())
    }

    fn sync(&self, durability: &mut Durability) -> Result<(), StorageError> {
        durability.groups_written += 1;
        #[cfg(test)]
        if self.config.fail_sync_at_group == Some(durability.groups_written) {
            return Err(StorageError::Poisoned);
        }
        self.store.persist()
    }

    fn has_compaction_work(&self) -> bool {
        self.garbage_from.is_some() || self.compact_up_to >= self.store.first_index()
    }

    fn compaction_round(&mut self) -> Result<(), StorageError> {
        let lock = self.write_lock.clone();
        let _writing = lock.lock();
        let round_max = self.config.compaction_round_entries_max;
        if let Some(from) = self.garbage_from {
            self.garbage_from = self.store.remove_garbage_round(from, round_max)?;
            return Ok(());
        }
        let more = self.store.compact_round(self.compact_up_to, round_max)?;
        if !more {
            // Reached (or clamped at the end of the log): nothing left to do for now, unless
            // the log is idle and its trailing entries are worth dropping too.
            self.compact_up_to = self.store.first_index().saturating_sub(1);
            if let Some(up_to) = self.store.release_compacted(self.snapshot_index)? {
                self.compact_up_to = up_to;
            }
        }
        Ok(())
    }

    /// Stops the writer after a failed write or fsync: nothing more is written or
    /// acknowledged. Dropping the request receiver first unblocks a raft thread stuck in
    /// `submit` (it gets `WriterStopped`), so the blocking send below cannot deadlock.
    fn fail(self, error: StorageError) {
        log::error!("FATAL: {WRITER_THREAD_NAME} stops: {error}");
        let Self {
            requests, events, ..
        } = self;
        drop(requests);
        let _ = events.send(WriterEvent::Fatal(error));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::types::EntryKind;
    use bytes::Bytes;

    fn append(index: LogIndex) -> AppendRequest {
        AppendRequest {
            truncate_from: None,
            entries: vec![Entry {
                term: 1,
                index,
                kind: EntryKind::Normal,
                data: Bytes::from_static(b"x"),
            }],
            hard_state: Some(HardState {
                term: 1,
                vote: 1,
                commit: index - 1,
            }),
        }
    }

    #[test]
    fn failed_fsync_is_fatal_and_nothing_after_it_is_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig {
            fail_sync_at_group: Some(2),
            ..StorageConfig::default()
        };
        let (store, recovered) = LogStore::open(dir.path(), &config).unwrap();
        let (mut handle, events) = LogHandle::start(store, &recovered, &config).unwrap();
        let first = handle.submit(append(1)).unwrap();
        match events.recv().unwrap() {
            WriterEvent::Durable(d) => {
                assert_eq!((d.seq, d.last_index), (first, 1));
                handle.on_durable(&d);
            }
            WriterEvent::Fatal(e) => panic!("first group failed: {e}"),
        }
        handle.submit(append(2)).unwrap();
        match events.recv().unwrap() {
            WriterEvent::Fatal(e) => assert!(e.is_fatal() && matches!(e, StorageError::Poisoned)),
            WriterEvent::Durable(d) => panic!("acknowledged after a failed fsync: {d:?}"),
        }
        assert!(
            events.recv().is_err(),
            "the writer has stopped: no further events"
        );
        assert!(matches!(
            handle.submit(append(3)),
            Err(StorageError::WriterStopped)
        ));
        handle.shutdown().unwrap();
    }

    #[test]
    fn inline_writes_follow_submitted_ones_and_are_durable_when_they_return() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig::default();
        let (store, recovered) = LogStore::open(dir.path(), &config).unwrap();
        let (mut handle, events) = LogHandle::start(store, &recovered, &config).unwrap();
        assert!(handle.is_idle());
        let first = handle.submit(append(1)).unwrap();
        assert!(!handle.is_idle(), "request {first} is in flight");
        match events.recv().unwrap() {
            WriterEvent::Durable(d) => handle.on_durable(&d),
            WriterEvent::Fatal(e) => panic!("{e}"),
        }
        assert!(handle.is_idle());
        let durable = handle.write_inline(append(2)).unwrap();
        assert_eq!((durable.last_index, durable.last_term), (2, 1));
        assert_eq!(durable.hard_state.commit, 1);
        assert_eq!(handle.last_index(), 2);
        assert_eq!(handle.entries(1..3, u64::MAX).unwrap().len(), 2);
        // The writer picks up after the inline write.
        let third = handle.submit(append(3)).unwrap();
        match events.recv().unwrap() {
            WriterEvent::Durable(d) => {
                assert_eq!((d.seq, d.last_index, d.hard_state.commit), (third, 3, 2))
            }
            WriterEvent::Fatal(e) => panic!("{e}"),
        }
        handle.shutdown().unwrap();
        let (store, recovered) = LogStore::open(dir.path(), &config).unwrap();
        assert_eq!(store.last_index(), 3);
        assert_eq!(recovered.hard_state.commit, 2);
    }

    #[test]
    #[should_panic(expected = "never overtakes")]
    fn an_inline_write_may_not_overtake_a_submitted_one() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig::default();
        let (store, recovered) = LogStore::open(dir.path(), &config).unwrap();
        let (mut handle, _events) = LogHandle::start(store, &recovered, &config).unwrap();
        handle.submit(append(1)).unwrap();
        let _ = handle.write_inline(append(2));
    }
}
