//! The watermark: a record, outside fjall, of the most this member ever made durable, so
//! that a damaged log is told apart from a short one.
//!
//! fjall recovers its journal up to the first record that does not read back, silently:
//! that is right after a crash (the tail past the last fsync was never acknowledged), and
//! wrong when a file of the state directory was truncated, zeroed or deleted (the node
//! would start with less than it once acknowledged: an empty log looks like a new member,
//! a short one rolls the cluster back). The watermark says what a whole log must still
//! contain: the term and vote of the durable hard state, and the highest index known to
//! be committed and durable here, with its term. [`Watermark::check`] compares it with
//! what storage recovered, before the node starts.
//!
//! Every value recorded is one the journal made durable first (it is written after the
//! fsync that covered it) and never decreases (terms only grow, committed entries are never
//! truncated), so a watermark older than the journal (power lost before the page cache
//! reached the disk) is only less strict, never wrong. That is why it needs no fsync of its
//! own on the commit path: it is written with `pwrite` after each durable group, and synced
//! when the writer stops. A crash can tear at most the slot being written: the file holds
//! two checksummed slots, written alternately, and the newest valid one counts.
//!
//! Layout: a 1 KiB file `<raft dir>/watermark`, slots at offsets 0 and 512 (one disk
//! sector each), little-endian fields (see [`SLOT_BYTES`]).
//!
//! What it cannot see: entries acknowledged but not yet known committed (a follower's
//! newest, a leader's between its fsync and its commit), or committed between the last
//! record and a `kill -9`, if the log is then truncated by hand exactly there. Those are two
//! faults at once, and bounded by one replication round.
//!
//! Must never record a value the journal has not made durable, never move a value back,
//! and never be written by two threads at once (it lives behind the storage write lock).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::log::{LogStore, Recovered};
use crate::raft::types::{LogIndex, NO_NODE, NodeId, Term};

/// Name of the watermark file inside the Raft storage directory.
pub const WATERMARK_FILE_NAME: &str = "watermark";
/// Bytes of one slot: magic (4), version (4), sequence (8), raft id (8), term (8), vote (8),
/// commit (8), commit term (8), checksum (8, the first bytes of SHA-256 over the rest).
pub const SLOT_BYTES: usize = 64;
/// Where each slot starts: one disk sector apart, so that a torn write hits only one.
const SLOT_OFFSETS: [u64; 2] = [0, 512];
/// Size of the file.
const FILE_BYTES: u64 = 1024;
const MAGIC: &[u8; 4] = b"FLWM";
const VERSION: u32 = 1;

/// What the watermark says this member made durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatermarkRecord {
    /// The Raft member whose storage this is (a directory copied from another member is
    /// not this member's).
    pub raft_id: NodeId,
    /// The term of the durable hard state.
    pub term: Term,
    /// The durable vote in `term` ([`NO_NODE`] if none).
    pub vote: NodeId,
    /// The highest index known committed and durable here (0: none yet).
    pub commit: LogIndex,
    /// The term of the entry at `commit` (0 when `commit` is 0).
    pub commit_term: Term,
}

impl WatermarkRecord {
    /// The later of `self` and `next`, field by field, so that a stale caller can never
    /// move the record back: the larger term (with its vote), the larger commit (with its
    /// term).
    fn merged(self, next: Self) -> Self {
        let (term, vote) = if next.term > self.term || (next.term == self.term && self.vote == 0) {
            (next.term, next.vote)
        } else {
            (self.term, self.vote)
        };
        let (commit, commit_term) = if next.commit > self.commit {
            (next.commit, next.commit_term)
        } else {
            (self.commit, self.commit_term)
        };
        Self {
            raft_id: self.raft_id,
            term,
            vote,
            commit,
            commit_term,
        }
    }
}

/// Why the watermark could not be used.
#[derive(Debug, thiserror::Error)]
pub enum WatermarkError {
    /// The file does not exist.
    #[error("{0} is missing")]
    Missing(PathBuf),
    /// Neither slot passes its checks (zeroed, truncated or overwritten).
    #[error("{path} is unreadable: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The file exists already (creation refuses to overwrite it).
    #[error("{0} exists already")]
    Exists(PathBuf),
    /// An IO error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// How the recovered storage falls short of the watermark: the node must not start.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Shortfall {
    /// The directory belongs to another Raft member.
    #[error("it belongs to Raft member {found:x}, not to this member {expected:x}")]
    OtherMember {
        /// This member.
        expected: NodeId,
        /// The watermark's.
        found: NodeId,
    },
    /// The hard state is older than the one made durable.
    #[error(
        "its hard state is at term {found}, but term {recorded} was made durable (a lost \
         vote could elect two leaders)"
    )]
    TermBehind {
        /// The watermark's term.
        recorded: Term,
        /// The recovered term.
        found: Term,
    },
    /// The vote of the recorded term is gone or different.
    #[error("its vote in term {term} is {found:x}, but {recorded:x} was made durable")]
    VoteLost {
        /// The term.
        term: Term,
        /// The watermark's vote.
        recorded: NodeId,
        /// The recovered vote.
        found: NodeId,
    },
    /// A committed entry that was durable is no longer in the log or a snapshot.
    #[error("entry {commit} (term {commit_term}) was committed and made durable here, but {found}")]
    LogBehind {
        /// The watermark's commit index.
        commit: LogIndex,
        /// Its term.
        commit_term: Term,
        /// What storage holds instead.
        found: String,
    },
}

/// The open watermark file and the record it holds.
#[derive(Debug)]
pub struct Watermark {
    file: File,
    path: PathBuf,
    record: WatermarkRecord,
    /// The sequence number of the newest slot written; the next write goes to the other.
    seq: u64,
}

impl Watermark {
    /// The watermark's path in the Raft storage directory `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(WATERMARK_FILE_NAME)
    }

    /// Creates the watermark of a new member `raft_id` in `dir` (nothing durable yet) and
    /// syncs it and the directory: from now on its absence means damage.
    ///
    /// # Errors
    /// [`WatermarkError::Exists`] if there is one already (never overwritten);
    /// [`WatermarkError::Io`].
    pub fn create(dir: &Path, raft_id: NodeId) -> Result<Self, WatermarkError> {
        assert_ne!(raft_id, NO_NODE, "a member id is never zero");
        let path = Self::path_in(dir);
        let io_error = |source| WatermarkError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io_error)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| match source.kind() {
                io::ErrorKind::AlreadyExists => WatermarkError::Exists(path.clone()),
                _ => io_error(source),
            })?;
        file.set_len(FILE_BYTES).map_err(io_error)?;
        let mut watermark = Self {
            file,
            path: path.clone(),
            record: WatermarkRecord {
                raft_id,
                ..WatermarkRecord::default()
            },
            seq: 0,
        };
        // Both slots, so that a later torn write always leaves a valid one.
        for _ in SLOT_OFFSETS {
            watermark.write_slot().map_err(io_error)?;
        }
        watermark.sync().map_err(io_error)?;
        crate::util::fsutil::fsync_dir(dir).map_err(io_error)?;
        Ok(watermark)
    }

    /// Opens the watermark in `dir` and reads its newest valid slot.
    ///
    /// # Errors
    /// [`WatermarkError::Missing`], [`WatermarkError::Unreadable`] or
    /// [`WatermarkError::Io`].
    pub fn open(dir: &Path) -> Result<Self, WatermarkError> {
        let path = Self::path_in(dir);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(WatermarkError::Missing(path));
            }
            Err(source) => return Err(WatermarkError::Io { path, source }),
        };
        let mut best: Option<(u64, WatermarkRecord)> = None;
        let mut problems = Vec::new();
        for offset in SLOT_OFFSETS {
            let mut slot = [0u8; SLOT_BYTES];
            if let Err(e) = file.read_exact_at(&mut slot, offset) {
                problems.push(format!("slot at {offset}: {e}"));
                continue;
            }
            match decode_slot(&slot) {
                Ok((seq, record)) if best.is_none_or(|(s, _)| seq > s) => {
                    best = Some((seq, record));
                }
                Ok(_) => {}
                Err(reason) => problems.push(format!("slot at {offset}: {reason}")),
            }
        }
        let Some((seq, record)) = best else {
            return Err(WatermarkError::Unreadable {
                path,
                reason: problems.join("; "),
            });
        };
        Ok(Self {
            file,
            path,
            record,
            seq,
        })
    }

    /// What the watermark holds.
    pub fn record(&self) -> WatermarkRecord {
        self.record
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `next` (merged with what is there: nothing moves back). Writes one slot if
    /// anything changed; not synced (see the module doc for why that is enough).
    ///
    /// # Errors
    /// The OS error of the write.
    pub fn advance(&mut self, next: WatermarkRecord) -> io::Result<()> {
        let merged = self.record.merged(next);
        if merged == self.record {
            return Ok(());
        }
        self.record = merged;
        self.write_slot()
    }

    /// Replaces the record whatever it held: only for `flotilla repair`, which accepts the
    /// loss of what the log no longer holds, and syncs it.
    ///
    /// # Errors
    /// The OS error of the write or sync.
    pub fn reset(&mut self, record: WatermarkRecord) -> io::Result<()> {
        self.record = record;
        for _ in SLOT_OFFSETS {
            self.write_slot()?;
        }
        self.sync()
    }

    /// Makes the record durable (when the writer stops).
    ///
    /// # Errors
    /// The OS error of the fsync.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Checks that `recovered` storage holds everything the watermark says member
    /// `raft_id` made durable.
    ///
    /// # Errors
    /// The first [`Shortfall`] found; a store error reading the entry at the recorded
    /// commit counts as one.
    pub fn check(
        &self,
        raft_id: NodeId,
        recovered: &Recovered,
        store: &LogStore,
    ) -> Result<(), Shortfall> {
        let record = self.record;
        if record.raft_id != raft_id {
            return Err(Shortfall::OtherMember {
                expected: raft_id,
                found: record.raft_id,
            });
        }
        let hard = recovered.hard_state;
        if hard.term < record.term {
            return Err(Shortfall::TermBehind {
                recorded: record.term,
                found: hard.term,
            });
        }
        if hard.term == record.term && record.vote != NO_NODE && hard.vote != record.vote {
            return Err(Shortfall::VoteLost {
                term: record.term,
                recorded: record.vote,
                found: hard.vote,
            });
        }
        check_commit(&record, recovered, store)
    }
}

/// The recorded commit must be covered by the snapshot or held by the log with its term.
fn check_commit(
    record: &WatermarkRecord,
    recovered: &Recovered,
    store: &LogStore,
) -> Result<(), Shortfall> {
    if record.commit == 0 {
        return Ok(());
    }
    let snapshot_index = recovered.snapshot.as_ref().map_or(0, |s| s.meta.index);
    if snapshot_index >= record.commit {
        return Ok(());
    }
    let bounds = recovered.bounds;
    let shortfall = |found: String| Shortfall::LogBehind {
        commit: record.commit,
        commit_term: record.commit_term,
        found,
    };
    if bounds.last_index < record.commit {
        let snapshot = match &recovered.snapshot {
            Some(info) => format!("the newest snapshot at {}", info.meta.index),
            None => "there is no snapshot".into(),
        };
        let log = if bounds.last_index < bounds.first_index {
            "the log is empty".to_string()
        } else {
            format!("the log ends at {}", bounds.last_index)
        };
        return Err(shortfall(format!("{log} and {snapshot}")));
    }
    match store.term(record.commit) {
        Ok(term) if term == record.commit_term => Ok(()),
        Ok(term) => Err(shortfall(format!("the log holds term {term} there"))),
        Err(e) => Err(shortfall(format!("the log cannot read it ({e})"))),
    }
}

/// Makes the storage in `dir` whole as it is, for `flotilla repair` once the operator has
/// accepted losing what the log no longer holds: the hard state's term goes up to the
/// recorded one if it fell behind (a term, and a vote in it, are never reused), and the
/// watermark (created if missing) then records exactly what storage holds. Returns the new
/// record.
///
/// # Errors
/// Store errors writing the hard state, IO errors writing the watermark.
pub fn accept_recovered(
    dir: &Path,
    raft_id: NodeId,
    recovered: &Recovered,
    store: &LogStore,
) -> Result<WatermarkRecord, super::StorageError> {
    let io_error = |e: WatermarkError| match e {
        WatermarkError::Io { path, source } => super::StorageError::io("write", path, source),
        other => super::StorageError::io("write", Watermark::path_in(dir), io::Error::other(other)),
    };
    let previous = Watermark::open(dir).ok().map(|w| w.record());
    let bounds = recovered.bounds;
    let snapshot = recovered
        .snapshot
        .as_ref()
        .map(|s| (s.meta.index, s.meta.term));
    let mut hard = recovered.hard_state;
    if let Some(previous) = previous
        && previous.term > hard.term
    {
        hard.term = previous.term;
        hard.vote = previous.vote;
    }
    // Never more than storage holds: the core would wait for entries that are gone.
    let coverage = bounds
        .last_index
        .max(snapshot.map_or(0, |(index, _)| index));
    hard.commit = hard.commit.min(coverage);
    if hard != recovered.hard_state {
        store.write_group(&[], (bounds.last_index, bounds.last_term), Some(&hard))?;
        store.persist()?;
    }
    let commit = hard.commit.max(snapshot.map_or(0, |(index, _)| index));
    let commit_term = match snapshot {
        _ if commit == 0 => 0,
        Some((index, term)) if index == commit => term,
        _ => store.term(commit)?,
    };
    let record = WatermarkRecord {
        raft_id,
        term: hard.term,
        vote: hard.vote,
        commit,
        commit_term,
    };
    let mut watermark = match Watermark::open(dir) {
        Ok(watermark) => watermark,
        Err(WatermarkError::Missing(_)) => Watermark::create(dir, raft_id).map_err(io_error)?,
        Err(_) => {
            // Unreadable: replace it whole.
            std::fs::remove_file(Watermark::path_in(dir))
                .map_err(|e| super::StorageError::io("remove", Watermark::path_in(dir), e))?;
            Watermark::create(dir, raft_id).map_err(io_error)?
        }
    };
    watermark
        .reset(record)
        .map_err(|e| super::StorageError::io("write", Watermark::path_in(dir), e))?;
    Ok(record)
}

impl Watermark {
    fn write_slot(&mut self) -> io::Result<()> {
        self.seq += 1;
        let offset = SLOT_OFFSETS[(self.seq % 2) as usize];
        self.file
            .write_all_at(&encode_slot(self.seq, &self.record), offset)
    }
}

fn encode_slot(seq: u64, record: &WatermarkRecord) -> [u8; SLOT_BYTES] {
    let mut slot = [0u8; SLOT_BYTES];
    slot[0..4].copy_from_slice(MAGIC);
    slot[4..8].copy_from_slice(&VERSION.to_le_bytes());
    let fields = [
        seq,
        record.raft_id,
        record.term,
        record.vote,
        record.commit,
        record.commit_term,
    ];
    for (i, value) in fields.iter().enumerate() {
        slot[8 + i * 8..16 + i * 8].copy_from_slice(&value.to_le_bytes());
    }
    let digest = checksum(&slot[..SLOT_BYTES - 8]);
    slot[SLOT_BYTES - 8..].copy_from_slice(&digest);
    slot
}

fn decode_slot(slot: &[u8; SLOT_BYTES]) -> Result<(u64, WatermarkRecord), String> {
    if &slot[0..4] != MAGIC {
        return Err("no watermark record (bad magic)".into());
    }
    if checksum(&slot[..SLOT_BYTES - 8]) != slot[SLOT_BYTES - 8..] {
        return Err("checksum mismatch".into());
    }
    let version = u32::from_le_bytes(slot[4..8].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!("version {version}, this flotilla reads {VERSION}"));
    }
    let field = |i: usize| {
        u64::from_le_bytes(
            slot[8 + i * 8..16 + i * 8]
                .try_into()
                .expect("8 bytes inside the slot"),
        )
    };
    Ok((
        field(0),
        WatermarkRecord {
            raft_id: field(1),
            term: field(2),
            vote: field(3),
            commit: field(4),
            commit_term: field(5),
        },
    ))
}

fn checksum(bytes: &[u8]) -> [u8; 8] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref()[..8]
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(term: Term, vote: NodeId, commit: LogIndex) -> WatermarkRecord {
        WatermarkRecord {
            raft_id: 7,
            term,
            vote,
            commit,
            commit_term: term,
        }
    }

    #[test]
    fn the_newest_valid_slot_wins_and_a_torn_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut watermark = Watermark::create(dir.path(), 7).unwrap();
        watermark.advance(record(1, 7, 10)).unwrap();
        watermark.advance(record(2, 9, 20)).unwrap();
        assert_eq!(
            Watermark::open(dir.path()).unwrap().record(),
            record(2, 9, 20)
        );
        // Tear the newest slot: the older one (commit 10) is read back.
        let newest = SLOT_OFFSETS[(watermark.seq % 2) as usize];
        watermark
            .file
            .write_all_at(&[0xAB; 8], newest + 20)
            .unwrap();
        assert_eq!(
            Watermark::open(dir.path()).unwrap().record(),
            record(1, 7, 10)
        );
        // Both torn: unreadable, never silently empty.
        let older = SLOT_OFFSETS[((watermark.seq + 1) % 2) as usize];
        watermark.file.write_all_at(&[0; 64], older).unwrap();
        assert!(matches!(
            Watermark::open(dir.path()),
            Err(WatermarkError::Unreadable { .. })
        ));
    }

    #[test]
    fn nothing_moves_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut watermark = Watermark::create(dir.path(), 7).unwrap();
        watermark.advance(record(3, 5, 40)).unwrap();
        watermark.advance(record(2, 6, 30)).unwrap();
        assert_eq!(watermark.record(), record(3, 5, 40));
        // A vote cast later in the same term fills an empty vote, never replaces one.
        let mut fresh = Watermark::create(&dir.path().join("b"), 7).unwrap();
        fresh.advance(record(4, NO_NODE, 1)).unwrap();
        fresh.advance(record(4, 8, 1)).unwrap();
        assert_eq!(fresh.record().vote, 8);
        fresh.advance(record(4, 9, 2)).unwrap();
        assert_eq!((fresh.record().vote, fresh.record().commit), (8, 2));
    }

    #[test]
    fn missing_and_existing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Watermark::open(dir.path()),
            Err(WatermarkError::Missing(_))
        ));
        Watermark::create(dir.path(), 7).unwrap();
        assert!(matches!(
            Watermark::create(dir.path(), 7),
            Err(WatermarkError::Exists(_))
        ));
        std::fs::write(Watermark::path_in(dir.path()), b"").unwrap();
        assert!(matches!(
            Watermark::open(dir.path()),
            Err(WatermarkError::Unreadable { .. })
        ));
    }
}
