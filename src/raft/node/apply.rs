//! The apply thread (`raft-apply-<id>`): applies committed entries to the state machine in
//! log order, answers proposers and readers, takes a snapshot every N applied entries, and
//! restores received snapshots.
//!
//! Owns the [`StateMachine`] and the waiters of proposals and reads. Must never apply an
//! entry the raft thread did not hand it, never skip one, and never block on the raft
//! thread (its events go over a channel the raft thread drains in every loop).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{Receiver, Sender};

use super::directory::{self, Directory, Payload};
use super::{NodeError, ProposalCallback, ReadCallback, Shared, SnapshotWriter, StateMachine};
use crate::raft::core::membership;
use crate::raft::storage::snapshot::{SnapshotInfo, SnapshotReader, SnapshotStore};
use crate::raft::types::{Entry, EntryKind, LogIndex, Membership, SnapshotMeta, Term};

/// Bytes buffered before a snapshot chunk is written to the file.
pub const SNAPSHOT_WRITE_CHUNK_BYTES: usize = 1 << 20;

/// Work for the apply thread, in the order the raft thread produced it.
pub(crate) enum ApplyInput {
    Entries(Vec<Entry>),
    /// Proposals waiting for their entries: `(index, term, callback)`. The raft thread
    /// sends them just before the next other input, so they are always registered before
    /// their entries arrive, without a wake-up of this thread per proposal.
    Waiters(Vec<(LogIndex, Term, ProposalCallback)>),
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

pub(crate) struct Applier {
    pub(crate) state_machine: Box<dyn StateMachine>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) snapshots: SnapshotStore,
    pub(crate) inputs: Receiver<ApplyInput>,
    pub(crate) events: Sender<ApplyEvent>,
    pub(crate) applied_index: LogIndex,
    pub(crate) applied_term: Term,
    pub(crate) membership: Membership,
    pub(crate) last_snapshot_index: LogIndex,
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
        channels: (Receiver<ApplyInput>, Sender<ApplyEvent>),
        start: &SnapshotMeta,
    ) -> Self {
        Self {
            state_machine,
            shared,
            snapshots,
            inputs: channels.0,
            events: channels.1,
            applied_index: start.index,
            applied_term: start.term,
            membership: start.membership.clone(),
            last_snapshot_index: start.index,
            waiters: BTreeMap::new(),
            reads: BTreeMap::new(),
            snapshot_thread: None,
        }
    }

    /// Runs until the raft thread drops its sender; then fails every waiter with
    /// `ShuttingDown`.
    pub(crate) fn run(mut self) {
        while let Ok(input) = self.inputs.recv() {
            if let Err(reason) = self.handle(input) {
                log::error!("raft {:x}: apply failed: {reason}", self.shared.config.id);
                let _ = self.events.send(ApplyEvent::Fatal(reason));
                break;
            }
        }
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

    fn handle(&mut self, input: ApplyInput) -> Result<(), String> {
        match input {
            ApplyInput::Entries(entries) => {
                for entry in entries {
                    self.apply_entry(entry)?;
                }
                self.shared
                    .applied
                    .store(self.applied_index, Ordering::Release);
                self.release_reads();
                if self.applied_index - self.last_snapshot_index
                    >= self
                        .shared
                        .snapshot_interval_entries
                        .load(Ordering::Acquire)
                {
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
