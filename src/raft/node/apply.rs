//! The apply thread (`raft-apply-<id>`): applies committed entries to the state machine in
//! log order, answers proposers and readers, takes a snapshot every N applied entries, and
//! restores received snapshots.
//!
//! Owns the [`StateMachine`] and the waiters of proposals and reads, behind a mutex: the
//! raft thread applies small batches itself when the apply thread has nothing left to do
//! (see `ApplyLane`), sparing a thread wake-up between commit and reply. Must never
//! apply an entry the raft thread did not hand it, never skip one, never apply out of
//! order, and never block on the raft thread (its events go over a channel the raft
//! thread drains in every loop).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::directory::{self, Directory, Payload};
use super::{NodeError, ProposalCallback, ReadCallback, Shared, SnapshotWriter, StateMachine};
use crate::raft::core::membership;
use crate::raft::storage::snapshot::{SnapshotInfo, SnapshotReader, SnapshotStore};
use crate::raft::types::{Entry, EntryKind, LogIndex, Membership, SnapshotMeta, Term};

/// Committed entries the raft thread applies itself at most (else the apply thread does).
pub const INLINE_APPLY_ENTRIES_MAX: usize = 64;
/// Payload bytes the raft thread applies itself at most.
pub const INLINE_APPLY_BYTES_MAX: usize = 256 << 10;

/// Bytes buffered before a snapshot chunk is written to the file.
pub const SNAPSHOT_WRITE_CHUNK_BYTES: usize = 1 << 20;

/// Proposals waiting for their entries: `(index, term, callback)`.
pub(crate) type Waiters = Vec<(LogIndex, Term, ProposalCallback)>;

/// Work for the apply thread, in the order the raft thread produced it.
pub(crate) enum ApplyInput {
    Entries(Vec<Entry>),
    /// Proposals waiting for their entries: `(index, term, callback)`. The raft thread
    /// sends them just before the next other input, so they are always registered before
    /// their entries arrive, without a wake-up of this thread per proposal.
    Waiters(Waiters),
    Read {
        index: LogIndex,
        done: ReadCallback,
    },
    Restore(SnapshotInfo),
}

/// What the apply thread tells the raft thread.
pub(crate) enum ApplyEvent {
    SnapshotCreated { index: LogIndex },
    Restored { index: LogIndex, term: Term },
    Fatal(String),
}

/// A snapshot is written only once the log applied since the last one holds at least
/// 1/4 of the last snapshot's size, so that writing snapshots costs at most 4 bytes per
/// byte of log however big the state grows. (With a 70 MB state and 256-byte writes, a
/// snapshot every 10,000 entries meant one every 0.3 s and a core busy writing them.)
pub const SNAPSHOT_BYTES_PER_LOG_BYTE_MAX: u64 = 4;

/// Log bytes applied since the last snapshot past which a snapshot is due before the
/// interval's entries have passed (still subject to [`SNAPSHOT_BYTES_PER_LOG_BYTE_MAX`]):
/// the log (on disk and in the Raft core's memory, which drops entries only at a snapshot)
/// is then bounded by bytes, not only by entries. A burst of large entries (100,000 tasks
/// created, assigned and removed, in transactions of up to 1.5 MiB) otherwise sat in the
/// log and in memory (1.6 GB) until 10,000 more entries came.
pub const SNAPSHOT_LOG_BYTES_MAX: u64 = 64 << 20;

/// How long the apply thread must have applied nothing before the log counts as idle (see
/// [`SNAPSHOT_IDLE_LOG_BYTES_MIN`]).
pub const SNAPSHOT_IDLE_AFTER: Duration = Duration::from_secs(5);

/// How often the apply thread, with nothing to apply, checks for an idle snapshot.
const SNAPSHOT_IDLE_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// An idle log holding at least this many bytes since the last snapshot, and at least
/// 1/[`SNAPSHOT_IDLE_BYTES_PER_LOG_BYTE_MAX`] of that snapshot's size, is snapshotted (and
/// then compacted): once a load is gone, the log and the memory it holds shrink back
/// without waiting for the interval's entries, which an idle cluster never writes. Nobody
/// waits on an idle node, so the stricter cost rule of busy times does not apply.
pub const SNAPSHOT_IDLE_LOG_BYTES_MIN: u64 = 1 << 20;

/// The idle counterpart of [`SNAPSHOT_BYTES_PER_LOG_BYTE_MAX`].
pub const SNAPSHOT_IDLE_BYTES_PER_LOG_BYTE_MAX: u64 = 16;

/// How long the apply thread must have applied nothing before it hands the allocator's free
/// memory back to the system, once per idle period
/// ([`crate::util::memory::release_free_memory`]): long enough for an idle snapshot, the
/// compaction it allows and the memtable flush that follows, so that what they free goes
/// back too. glibc otherwise keeps a process at its peak size after a load is gone.
pub const MEMORY_RELEASE_IDLE_AFTER: Duration = Duration::from_secs(10);

pub(crate) struct Applier {
    pub(crate) state_machine: Box<dyn StateMachine>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) snapshots: SnapshotStore,
    pub(crate) events: Sender<ApplyEvent>,
    pub(crate) applied_index: LogIndex,
    pub(crate) applied_term: Term,
    pub(crate) membership: Membership,
    pub(crate) last_snapshot_index: LogIndex,
    /// Entry bytes applied since the last snapshot started (see [`SNAPSHOT_BYTES_PER_LOG_BYTE_MAX`]).
    applied_bytes_since_snapshot: u64,
    /// When entries were last applied (see [`SNAPSHOT_IDLE_AFTER`]).
    last_applied_at: Instant,
    /// Free memory was handed back since entries were last applied.
    memory_released: bool,
    waiters: BTreeMap<LogIndex, (Term, ProposalCallback)>,
    reads: BTreeMap<LogIndex, Vec<ReadCallback>>,
    snapshot_thread: Option<std::thread::JoinHandle<()>>,
}

/// One snapshot being written on its own thread.
struct SnapshotJob {
    index: LogIndex,
    builder: crate::raft::storage::snapshot::SnapshotBuilder,
    directory: Vec<u8>,
    write_state: SnapshotWriter,
    shared: Arc<Shared>,
    events: Sender<ApplyEvent>,
}

impl SnapshotJob {
    fn run(self) {
        let id = self.shared.config.id;
        let index = self.index;
        let (shared, events) = (self.shared.clone(), self.events.clone());
        match self.write() {
            Ok(info) => {
                log::info!(
                    "raft {id:x}: snapshot at index {index} ({} bytes)",
                    info.content_bytes
                );
                {
                    // A newer snapshot (installed from the leader meanwhile) stays the latest.
                    let mut latest = shared.latest_snapshot.lock();
                    if latest.as_ref().is_none_or(|l| l.meta.index < index) {
                        *latest = Some(info);
                    }
                }
                let _ = events.send(ApplyEvent::SnapshotCreated { index });
            }
            Err(reason) => {
                let _ = events.send(ApplyEvent::Fatal(format!(
                    "writing snapshot {index}: {reason}"
                )));
            }
        }
    }

    fn write(self) -> Result<SnapshotInfo, String> {
        let mut writer = ChunkWriter::new(self.builder);
        let section = self.directory;
        let write_state = self.write_state;
        let written = (|| {
            writer.write_all(&u32::try_from(section.len()).expect("small").to_be_bytes())?;
            writer.write_all(&section)?;
            write_state(&mut writer)?;
            writer.flush()
        })();
        written.map_err(|e| e.to_string())?;
        writer.builder.finish().map_err(|e| e.to_string())
    }
}

impl Applier {
    pub(crate) fn new(
        state_machine: Box<dyn StateMachine>,
        shared: Arc<Shared>,
        snapshots: SnapshotStore,
        events: Sender<ApplyEvent>,
        start: &SnapshotMeta,
    ) -> Self {
        Self {
            state_machine,
            shared,
            snapshots,
            events,
            applied_index: start.index,
            applied_term: start.term,
            membership: start.membership.clone(),
            last_snapshot_index: start.index,
            applied_bytes_since_snapshot: 0,
            last_applied_at: Instant::now(),
            memory_released: false,
            waiters: BTreeMap::new(),
            reads: BTreeMap::new(),
            snapshot_thread: None,
        }
    }

    /// After the apply thread stops: fails every waiter with `ShuttingDown`.
    fn fail_waiters(&mut self) {
        self.join_snapshot_thread();
        for (_, (_, done)) in std::mem::take(&mut self.waiters) {
            done(Err(NodeError::ShuttingDown));
        }
        for (_, reads) in std::mem::take(&mut self.reads) {
            for done in reads {
                done(Err(NodeError::ShuttingDown));
            }
        }
    }

    /// True if applying `entries` now would not start a snapshot (which must not run on
    /// the raft thread: capturing the state is O(state)).
    fn snapshot_not_due_after(&self, entries: &[Entry]) -> bool {
        let applied_after = self.applied_index + entries.len() as u64;
        let bytes: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
        !self.snapshot_due(applied_after, self.applied_bytes_since_snapshot + bytes)
    }

    /// A snapshot is due once `applied` is the snapshot interval past the last one, or the
    /// log applied since (`bytes_since`) holds [`SNAPSHOT_LOG_BYTES_MAX`], and that log holds
    /// at least 1/[`SNAPSHOT_BYTES_PER_LOG_BYTE_MAX`] of the last snapshot's size.
    fn snapshot_due(&self, applied: LogIndex, bytes_since: u64) -> bool {
        let interval = self
            .shared
            .snapshot_interval_entries
            .load(Ordering::Acquire);
        if applied - self.last_snapshot_index < interval && bytes_since < SNAPSHOT_LOG_BYTES_MAX {
            return false;
        }
        bytes_since.saturating_mul(SNAPSHOT_BYTES_PER_LOG_BYTE_MAX) >= self.last_snapshot_bytes()
    }

    fn last_snapshot_bytes(&self) -> u64 {
        self.shared
            .latest_snapshot
            .lock()
            .as_ref()
            .map_or(0, |info| info.content_bytes)
    }

    /// Takes a snapshot if nothing was applied for [`SNAPSHOT_IDLE_AFTER`] and the log since
    /// the last one is worth it (see [`SNAPSHOT_IDLE_LOG_BYTES_MIN`]); hands free memory
    /// back once per idle period (see [`MEMORY_RELEASE_IDLE_AFTER`]).
    ///
    /// # Errors
    /// As [`Self::take_snapshot`].
    fn snapshot_if_idle(&mut self, now: Instant) -> Result<(), String> {
        let idle_for = now.saturating_duration_since(self.last_applied_at);
        if idle_for >= MEMORY_RELEASE_IDLE_AFTER && !self.memory_released {
            self.memory_released = true;
            self.state_machine.release_idle_memory();
            crate::util::memory::release_free_memory();
        }
        let bytes_since = self.applied_bytes_since_snapshot;
        let idle = idle_for >= SNAPSHOT_IDLE_AFTER;
        let worth_it = bytes_since >= SNAPSHOT_IDLE_LOG_BYTES_MIN
            && bytes_since.saturating_mul(SNAPSHOT_IDLE_BYTES_PER_LOG_BYTE_MAX)
                >= self.last_snapshot_bytes();
        if idle && worth_it && self.applied_index > self.last_snapshot_index {
            log::info!(
                "raft {:x}: the log is idle with {bytes_since} bytes since the last snapshot; \
                 taking one so that it can be compacted",
                self.shared.config.id
            );
            self.take_snapshot()?;
        }
        Ok(())
    }

    fn handle(&mut self, input: ApplyInput) -> Result<(), String> {
        match input {
            ApplyInput::Entries(entries) => {
                self.last_applied_at = Instant::now();
                self.memory_released = false;
                for entry in entries {
                    self.apply_entry(entry)?;
                }
                self.shared
                    .applied
                    .store(self.applied_index, Ordering::Release);
                self.release_reads();
                if self.snapshot_due(self.applied_index, self.applied_bytes_since_snapshot) {
                    self.take_snapshot()?;
                }
            }
            ApplyInput::Waiters(waiters) => {
                for (index, term, done) in waiters {
                    if index <= self.applied_index {
                        // Covered by a snapshot installed meanwhile: it may or may not be in
                        // it.
                        done(Err(NodeError::Timeout));
                    } else {
                        self.waiters.insert(index, (term, done));
                    }
                }
            }
            ApplyInput::Read { index, done } => {
                if index <= self.applied_index {
                    done(Ok(index));
                } else {
                    self.reads.entry(index).or_default().push(done);
                }
            }
            ApplyInput::Restore(info) => self.restore(&info)?,
        }
        Ok(())
    }

    fn apply_entry(&mut self, entry: Entry) -> Result<(), String> {
        assert_eq!(
            entry.index,
            self.applied_index + 1,
            "entries are applied in order, without gaps"
        );
        self.applied_bytes_since_snapshot += entry.data.len() as u64;
        let reply = match entry.kind {
            EntryKind::Blank => Bytes::new(),
            EntryKind::Membership => {
                self.membership = membership::decode(&entry.data)
                    .ok_or_else(|| format!("membership entry {} is corrupt", entry.index))?;
                Bytes::new()
            }
            EntryKind::Normal => match directory::decode(&entry.data) {
                Some(Payload::App(data)) => self.state_machine.apply(entry.index, &data),
                Some(Payload::MemberAddr { id, addr }) => {
                    self.shared.directory.set(id, addr);
                    Bytes::new()
                }
                None => return Err(format!("entry {} has an unknown payload tag", entry.index)),
            },
        };
        self.applied_index = entry.index;
        self.applied_term = entry.term;
        self.answer_waiters(entry.index, entry.term, reply);
        Ok(())
    }

    /// Answers the waiter at `index` and fails older ones (their entries were replaced).
    fn answer_waiters(&mut self, index: LogIndex, term: Term, reply: Bytes) {
        while let Some(entry) = self.waiters.first_entry() {
            if *entry.key() > index {
                break;
            }
            let (waiter_index, (waiter_term, done)) = entry.remove_entry();
            if waiter_index == index && waiter_term == term {
                done(Ok(reply.clone()));
            } else {
                done(Err(NodeError::Lost));
            }
        }
    }

    fn release_reads(&mut self) {
        while let Some(entry) = self.reads.first_entry() {
            if *entry.key() > self.applied_index {
                break;
            }
            let (index, reads) = entry.remove_entry();
            for done in reads {
                done(Ok(index));
            }
        }
    }

    /// Captures the state and hands it to a `raft-snapshot-<id>` thread that writes the
    /// file and reports it; apply goes on meanwhile. One snapshot at a time: while one is
    /// being written, later triggers wait for it.
    fn take_snapshot(&mut self) -> Result<(), String> {
        if let Some(thread) = &self.snapshot_thread
            && !thread.is_finished()
        {
            return Ok(());
        }
        self.join_snapshot_thread();
        let meta = SnapshotMeta {
            index: self.applied_index,
            term: self.applied_term,
            membership: self.membership.clone(),
        };
        let job = SnapshotJob {
            index: meta.index,
            builder: self
                .snapshots
                .create(meta.clone())
                .map_err(|e| e.to_string())?,
            directory: self.shared.directory.encode(),
            write_state: self.state_machine.snapshot(),
            shared: self.shared.clone(),
            events: self.events.clone(),
        };
        // Counted as taken now, so the next trigger is an interval after this one.
        self.last_snapshot_index = meta.index;
        self.applied_bytes_since_snapshot = 0;
        let name = format!("raft-snapshot-{:x}", self.shared.config.id);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || job.run())
            .map_err(|e| format!("cannot start the snapshot thread: {e}"))?;
        self.snapshot_thread = Some(thread);
        Ok(())
    }

    /// Waits for the snapshot being written, if any.
    fn join_snapshot_thread(&mut self) {
        if let Some(thread) = self.snapshot_thread.take()
            && thread.join().is_err()
        {
            log::error!("the raft snapshot thread panicked");
        }
    }

    fn restore(&mut self, info: &SnapshotInfo) -> Result<(), String> {
        let meta = info.meta.clone();
        restore_from_file(info, self.state_machine.as_mut(), &self.shared.directory)
            .map_err(|e| format!("restoring snapshot {}: {e}", info.path.display()))?;
        self.applied_index = meta.index;
        self.applied_term = meta.term;
        self.membership = meta.membership.clone();
        self.last_snapshot_index = meta.index;
        self.applied_bytes_since_snapshot = 0;
        self.shared.applied.store(meta.index, Ordering::Release);
        // Waiters at or below the snapshot cannot learn their outcome from the log.
        while let Some(entry) = self.waiters.first_entry() {
            if *entry.key() > meta.index {
                break;
            }
            let (_, (_, done)) = entry.remove_entry();
            done(Err(NodeError::Timeout));
        }
        self.release_reads();
        let _ = self.events.send(ApplyEvent::Restored {
            index: meta.index,
            term: meta.term,
        });
        Ok(())
    }
}

/// The two ways work reaches the [`Applier`]: its thread, fed in order through the bounded
/// apply queue, and the raft thread itself, which may apply a small batch of entries
/// directly when everything it queued has been handled (`queued` is zero) and the apply
/// thread is not holding the applier. Order is kept because only the raft thread adds
/// work, and it applies directly only when nothing it added earlier is still pending.
pub(crate) struct ApplyLane {
    applier: Arc<Mutex<Applier>>,
    /// Inputs sent to the apply thread and not yet fully handled by it.
    queued: Arc<AtomicUsize>,
}

impl ApplyLane {
    /// Starts the apply thread (`raft-apply-<id>`) over `applier`, fed by `inputs`.
    pub(crate) fn start(
        applier: Applier,
        inputs: Receiver<ApplyInput>,
        name: String,
    ) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let applier = Arc::new(Mutex::new(applier));
        let queued = Arc::new(AtomicUsize::new(0));
        let lane = Self {
            applier: applier.clone(),
            queued: queued.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run_apply_thread(&applier, &inputs, &queued))?;
        Ok((lane, thread))
    }

    /// Counts an input the raft thread is about to send to the apply thread.
    pub(crate) fn will_queue(&self) {
        self.queued.fetch_add(1, Ordering::AcqRel);
    }

    /// Takes back the count of an input that could not be sent.
    pub(crate) fn not_queued(&self) {
        self.queued.fetch_sub(1, Ordering::AcqRel);
    }

    /// Raft thread: applies `waiters` and `entries` here and now if the batch is small,
    /// the apply thread has handled everything queued, and no snapshot falls due; gives
    /// them back otherwise. `Err` is fatal, as on the apply thread.
    #[allow(clippy::type_complexity)]
    pub(crate) fn try_apply_here(
        &self,
        waiters: Vec<(LogIndex, Term, ProposalCallback)>,
        entries: Vec<Entry>,
    ) -> Result<Result<(), (Vec<(LogIndex, Term, ProposalCallback)>, Vec<Entry>)>, String> {
        let small = entries.len() <= INLINE_APPLY_ENTRIES_MAX
            && entries.iter().map(|e| e.data.len()).sum::<usize>() <= INLINE_APPLY_BYTES_MAX;
        if !small || self.queued.load(Ordering::Acquire) != 0 {
            return Ok(Err((waiters, entries)));
        }
        let Some(mut applier) = self.applier.try_lock() else {
            return Ok(Err((waiters, entries)));
        };
        if !applier.snapshot_not_due_after(&entries) {
            return Ok(Err((waiters, entries)));
        }
        if !waiters.is_empty() {
            applier.handle(ApplyInput::Waiters(waiters))?;
        }
        applier.handle(ApplyInput::Entries(entries))?;
        Ok(Ok(()))
    }
}

/// The apply thread: handles its queue in order until the raft thread drops the sender,
/// then fails every waiter with `ShuttingDown`. With nothing to apply, it checks every [`SNAPSHOT_IDLE_CHECK_PERIOD`] for an idle
/// snapshot (entries the raft thread applied itself count as activity too).
fn run_apply_thread(applier: &Mutex<Applier>, inputs: &Receiver<ApplyInput>, queued: &AtomicUsize) {
    loop {
        let outcome = match inputs.recv_timeout(SNAPSHOT_IDLE_CHECK_PERIOD) {
            Ok(input) => {
                let outcome = applier.lock().handle(input);
                // Counted down only once handled: the raft thread may apply directly from
                // now on.
                queued.fetch_sub(1, Ordering::AcqRel);
                outcome
            }
            Err(RecvTimeoutError::Timeout) => applier.lock().snapshot_if_idle(Instant::now()),
            Err(RecvTimeoutError::Disconnected) => break,
        };
        if let Err(reason) = outcome {
            let guard = applier.lock();
            log::error!("raft {:x}: apply failed: {reason}", guard.shared.config.id);
            let _ = guard.events.send(ApplyEvent::Fatal(reason));
            break;
        }
    }
    applier.lock().fail_waiters();
}

/// Restores `state_machine` and `directory` from the snapshot file `info`.
///
/// # Errors
/// IO errors, a damaged file (the reader checks the digest before the last chunk) or a
/// state machine that refuses the content.
pub(crate) fn restore_from_file(
    info: &SnapshotInfo,
    state_machine: &mut dyn StateMachine,
    directory: &Directory,
) -> std::io::Result<()> {
    let reader = SnapshotReader::open(&info.path).map_err(std::io::Error::other)?;
    let mut input = ChunkReader {
        reader,
        buffer: Bytes::new(),
        done: false,
    };
    let mut len = [0u8; 4];
    input.read_exact(&mut len)?;
    let mut section = vec![0u8; u32::from_be_bytes(len) as usize];
    input.read_exact(&mut section)?;
    let members = Directory::decode_section(&section).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "member directory is corrupt",
        )
    })?;
    state_machine.restore(&mut input)?;
    directory.replace(members);
    Ok(())
}

/// Buffers writes into chunks for a snapshot file.
struct ChunkWriter {
    builder: crate::raft::storage::snapshot::SnapshotBuilder,
    buffer: BytesMut,
}

impl ChunkWriter {
    fn new(builder: crate::raft::storage::snapshot::SnapshotBuilder) -> Self {
        Self {
            builder,
            buffer: BytesMut::with_capacity(SNAPSHOT_WRITE_CHUNK_BYTES),
        }
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= SNAPSHOT_WRITE_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let offset = self.builder.written_bytes();
        self.builder
            .write_chunk(offset, &self.buffer)
            .map_err(std::io::Error::other)?;
        self.buffer.clear();
        Ok(())
    }
}

/// Reads a snapshot file's content through its digest-checking chunk reader.
struct ChunkReader {
    reader: SnapshotReader,
    buffer: Bytes,
    done: bool,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buffer.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self
                .reader
                .next_chunk(SNAPSHOT_WRITE_CHUNK_BYTES)
                .map_err(std::io::Error::other)?
            {
                Some(chunk) => {
                    self.done = chunk.last;
                    self.buffer = chunk.data;
                }
                None => self.done = true,
            }
        }
        let n = out.len().min(self.buffer.len());
        out[..n].copy_from_slice(&self.buffer[..n]);
        let _ = self.buffer.split_to(n);
        Ok(n)
    }
}
