//! Durable storage for the Raft core: the log and hard state in fjall, a group-commit writer
//! thread, and checksummed snapshot files.
//!
//! Owns everything the node keeps on disk for Raft under one directory:
//!
//! ```text
//! <dir>/log/        one fjall database: keyspace "log" (u64 BE index -> term, kind, data)
//!                   and keyspace "meta" (hard state, log boundary); after the log was
//!                   moved to a new generation, <dir>/log.gen-<n>/ named by
//!                   <dir>/log.current instead (see [`generation`])
//! <dir>/snapshots/  <index>-<term>.snap files (see [`snapshot`])
//! <dir>/watermark   what this member made durable, outside fjall (see [`watermark`])
//! ```
//!
//! - [`LogStore`]: open and recover, read entries, terms and bounds (any thread).
//! - [`LogHandle`]: the raft thread's side: submits writes to the `raft-log-writer` thread,
//!   keeps the submitted-but-not-yet-durable tail in memory so reads see it, and consumes
//!   [`WriterEvent`]s.
//! - [`snapshot`]: snapshot files (write locally, receive chunk by chunk, stream out).
//!
//! Must never acknowledge anything that is not durable: a [`Durable`] event is sent only
//! after `persist(SyncData)` returned, and a failed write or fsync stops the writer with
//! [`WriterEvent::Fatal`] (the node must then stop). Must never know what entries mean.

mod codec;
pub mod generation;
mod log;
pub mod snapshot;
pub mod watermark;
mod writer;

use std::io;
use std::path::PathBuf;

use crate::raft::types::LogIndex;

pub use self::generation::{current_log_dir, reset_to_generation_zero};
pub use self::log::{
    GENERATION_BYTES_PER_LIVE_BYTE_MIN, GENERATION_LIVE_BYTES_MAX, LOG_IDLE_AFTER_MS_DEFAULT,
    LogBounds, LogStore, Recovered,
};
pub use self::watermark::{Shortfall, Watermark, WatermarkError, WatermarkRecord};
pub use self::writer::{
    AppendRequest, Durable, LogHandle, WRITER_EVENTS_LEN_MAX, WRITER_THREAD_NAME, WriterEvent,
};

/// Tunables of the log store and its writer; every limit is named and documented.
#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Entries kept below a snapshot's index when the log is compacted, so that slightly
    /// slow followers catch up from the log instead of a snapshot (swarmkit keeps 500).
    pub trailing_entries_kept: u64,
    /// Entries removed per compaction round; the writer runs one round at a time between
    /// write groups, so a compaction never delays an append by more than one round.
    pub compaction_round_entries_max: u64,
    /// Write requests the raft thread may queue to the writer before `submit` blocks. This
    /// is the back-pressure point when the disk cannot keep up.
    pub request_queue_len_max: usize,
    /// Entries in one write group (one fjall batch and one fsync); requests beyond it wait
    /// for the next group. A single larger request is still written as one batch.
    pub group_entries_max: usize,
    /// Payload bytes in one write group, for the same reason as `group_entries_max`.
    pub group_bytes_max: usize,
    /// fjall block cache bytes (reads of old entries for slow followers).
    pub cache_bytes: u64,
    /// fjall memtable bytes of the log keyspace: what fjall keeps in memory (and replays
    /// from its journal on restart) before flushing to a table file. Entries compacted away
    /// before their memtable is flushed are never written a second time, so a larger
    /// memtable means fewer bytes written per byte appended (measured at 1000-entry groups,
    /// `benches/storage.rs`: 1.21 at 16 MiB, 1.16 at 32, 1.12 at 64, 1.08 at 256). Memory
    /// grows to this only under sustained writes; small hosts may lower it.
    pub memtable_bytes_max: u64,
    /// fjall background threads (memtable flushes, compactions). Two, so that a flush never
    /// waits behind a table compaction: fjall halts writes (100 ms sleeps) once four sealed
    /// memtables are queued.
    pub fjall_worker_threads: usize,
    /// Bytes of trailing entries (kept below a snapshot for followers a little behind) an
    /// idle log keeps ([`IDLE_TRAILING_BYTES_MAX_DEFAULT`]); `trailing_entries_kept` still
    /// bounds their number.
    pub idle_trailing_bytes_max: u64,
    /// How long without a write before a finished compaction counts the log as idle and
    /// gives back memory and disk space ([`LOG_IDLE_AFTER_MS_DEFAULT`]).
    pub log_idle_after_ms: u64,
    /// The log database's size on disk below which it is never moved to a new generation
    /// ([`GENERATION_SWITCH_BYTES_MIN_DEFAULT`]): an idle log takes about this much at most.
    pub generation_switch_bytes_min: u64,
    /// Test-only fault: the writer reports this group's fsync as failed.
    #[cfg(test)]
    pub(crate) fail_sync_at_group: Option<u64>,
    /// Crash tests only: abort the process at this step of a generation switch.
    #[cfg(feature = "sim")]
    pub crash_in_switch: Option<generation::SwitchCrash>,
}

/// Default for [`StorageConfig::trailing_entries_kept`].
pub const TRAILING_ENTRIES_KEPT_DEFAULT: u64 = 500;
/// Default for [`StorageConfig::compaction_round_entries_max`].
pub const COMPACTION_ROUND_ENTRIES_MAX_DEFAULT: u64 = 1024;
/// Default for [`StorageConfig::request_queue_len_max`].
pub const REQUEST_QUEUE_LEN_MAX_DEFAULT: usize = 1024;
/// Default for [`StorageConfig::group_entries_max`].
pub const GROUP_ENTRIES_MAX_DEFAULT: usize = 8192;
/// Default for [`StorageConfig::group_bytes_max`] (32 MiB).
pub const GROUP_BYTES_MAX_DEFAULT: usize = 32 << 20;
/// Default for [`StorageConfig::memtable_bytes_max`] (64 MiB: the smallest size that keeps
/// large write groups within 1.3x of a raw `fdatasync`, the storage target).
pub const MEMTABLE_BYTES_MAX_DEFAULT: u64 = 64 << 20;
/// Memtable bytes of the metadata keyspace (hard state, log boundary). Its records are tiny,
/// and a small memtable flushes often, which lets fjall delete old journal files sooner.
pub const META_MEMTABLE_BYTES_MAX: u64 = 1 << 20;
/// fjall's floor for its journal size bound (it refuses less).
const JOURNAL_BYTES_MAX_FLOOR: u64 = 64 << 20;

/// Journal bytes kept on disk before fjall forces the keyspaces holding the oldest journal
/// to flush: twice the log memtable (one being filled, one being flushed). fjall's default,
/// 512 MiB, would let the metadata keyspace pin that much journal, all replayed on restart.
pub(crate) fn journal_bytes_max(memtable_bytes_max: u64) -> u64 {
    memtable_bytes_max
        .saturating_mul(2)
        .max(JOURNAL_BYTES_MAX_FLOOR)
}
/// Default for [`StorageConfig::fjall_worker_threads`].
pub const FJALL_WORKER_THREADS_DEFAULT: usize = 2;
/// Default for [`StorageConfig::idle_trailing_bytes_max`] (1 MiB).
pub const IDLE_TRAILING_BYTES_MAX_DEFAULT: u64 = 1 << 20;
/// Default for [`StorageConfig::generation_switch_bytes_min`] (4 MiB: an idle manager's
/// log database takes about 1 MiB).
pub const GENERATION_SWITCH_BYTES_MIN_DEFAULT: u64 = 4 << 20;
/// Default for [`StorageConfig::cache_bytes`] (32 MiB).
pub const CACHE_BYTES_DEFAULT: u64 = 32 << 20;

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            trailing_entries_kept: TRAILING_ENTRIES_KEPT_DEFAULT,
            compaction_round_entries_max: COMPACTION_ROUND_ENTRIES_MAX_DEFAULT,
            request_queue_len_max: REQUEST_QUEUE_LEN_MAX_DEFAULT,
            group_entries_max: GROUP_ENTRIES_MAX_DEFAULT,
            group_bytes_max: GROUP_BYTES_MAX_DEFAULT,
            cache_bytes: CACHE_BYTES_DEFAULT,
            fjall_worker_threads: FJALL_WORKER_THREADS_DEFAULT,
            memtable_bytes_max: MEMTABLE_BYTES_MAX_DEFAULT,
            log_idle_after_ms: LOG_IDLE_AFTER_MS_DEFAULT,
            idle_trailing_bytes_max: IDLE_TRAILING_BYTES_MAX_DEFAULT,
            generation_switch_bytes_min: GENERATION_SWITCH_BYTES_MIN_DEFAULT,
            #[cfg(test)]
            fail_sync_at_group: None,
            #[cfg(feature = "sim")]
            crash_in_switch: None,
        }
    }
}

/// Everything that can go wrong in Raft storage. Each variant says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A write or fsync failed earlier; fjall refuses every further write because the
    /// state on disk is unknown. Fatal: stop the node and restart it, which recovers the
    /// last durable state.
    #[error(
        "FATAL: Raft storage is poisoned after a failed write or fsync; stop the node and \
         restart it (it recovers the last durable state); check the disk"
    )]
    Poisoned,
    /// Any other fjall error.
    #[error("fjall: {0}; if this repeats, check the disk and the log directory")]
    Fjall(fjall::Error),
    /// A file system operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The log on disk contradicts itself (a gap, an undecodable value, a boundary beyond
    /// the snapshot). Do not start the node from this directory: re-seed it from the leader.
    #[error("corrupt Raft log: {0}; re-seed this node from the leader")]
    CorruptLog(String),
    /// A snapshot file failed its checks; it was not applied.
    #[error("corrupt snapshot {path}: {reason}; it was not applied")]
    CorruptSnapshot {
        /// The file.
        path: PathBuf,
        /// Which check failed.
        reason: String,
    },
    /// The entry was compacted into a snapshot; send the snapshot instead.
    #[error("entry {index} is compacted (the log starts at {first_index}); send a snapshot")]
    Compacted {
        /// The requested index.
        index: LogIndex,
        /// The first index still in the log.
        first_index: LogIndex,
    },
    /// The entry does not exist yet.
    #[error("entry {index} is past the last index {last_index}")]
    Unavailable {
        /// The requested index.
        index: LogIndex,
        /// The last index in the log.
        last_index: LogIndex,
    },
    /// A write request that would break the log's shape (a gap, a decreasing term, a
    /// truncation of compacted entries). A bug in the caller; nothing was written.
    #[error("invalid write request: {0}")]
    InvalidRequest(String),
    /// The writer thread is gone (it stopped after a fatal error, or was shut down).
    #[error("the raft-log-writer thread has stopped; stop the node")]
    WriterStopped,
    /// A snapshot transfer broke its own rules (chunk out of order, too many bytes, digest
    /// mismatch); the partial file was discarded. Restart the transfer.
    #[error("snapshot transfer rejected: {0}; restart the transfer")]
    SnapshotTransfer(String),
}

impl From<fjall::Error> for StorageError {
    fn from(e: fjall::Error) -> Self {
        match e {
            fjall::Error::Poisoned => Self::Poisoned,
            other => Self::Fjall(other),
        }
    }
}

impl StorageError {
    /// An IO error with what was done and where.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// True if the node must stop: the disk state is unknown or contradictory.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            Self::Poisoned
                | Self::Fjall(_)
                | Self::Io { .. }
                | Self::CorruptLog(_)
                | Self::WriterStopped
        )
    }
}
