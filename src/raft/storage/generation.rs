//! Generations of the log database: how the log's directory gives its disk space back.
//!
//! fjall deletes a journal file only once it rotates it, and it rotates only past 64 MB
//! (hard-coded), with no public way to ask for it. After a burst of writes is compacted
//! away, the journal would keep its size for as long as the log stays quiet. So when the
//! writer finds the log idle and its database far larger than the entries still live, it
//! copies the live entries and the metadata into a fresh database (the next *generation*),
//! makes that durable, switches to it and deletes the old one. Nothing here depends on
//! fjall's internals: a generation is a whole fjall database in its own directory.
//!
//! On disk, under the storage directory:
//!
//! ```text
//! log/              generation 0 (the only one before generations existed)
//! log.gen-<n>/      generation n >= 1
//! log.current       names the current generation's directory when it is not `log`
//!                   (one line, replaced atomically: util::fsutil::write_atomic)
//! ```
//!
//! The switch, all of it under the storage write lock (no write reaches either database
//! meanwhile, so the copy is exactly the durable state):
//!
//! 1. create `log.gen-<n+1>/` (removing a leftover of that name), copy every metadata key
//!    and every live segment from one read view of the current generation;
//! 2. `persist(SyncAll)`, read the copy back (bounds and hard state must match), then fsync
//!    every file and directory of the new tree and the storage directory;
//! 3. write `log.current` naming the new directory (temp, fsync, rename, fsync directory):
//!    this rename is the switch;
//! 4. readers and writers take the new generation from then on; the old one's directory is
//!    deleted when its last reader lets go of it.
//!
//! A crash before step 3 leaves `log.current` naming the old generation, complete; after
//! it, the new one, complete and durable. Whatever directory `log.current` does not name is
//! a leftover that [`open_current`] deletes. Must never delete the current generation or
//! anything it does not own (`log.damaged-*` set aside by `flotilla repair` stays), never
//! switch before the new generation is durable, and never let a write reach the new
//! generation before `log.current` names it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{CompressionType, Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use parking_lot::Mutex;

use super::codec::{Segment, encode_segment, index_of_key, log_key};
use super::{StorageConfig, StorageError};
use crate::raft::types::LogIndex;
use crate::util::fsutil::{self, MODE_PRIVATE};

/// Directory of generation 0.
pub(crate) const GENERATION_ZERO_DIR: &str = "log";
/// Prefix of the directory of generation n >= 1 (`log.gen-<n>`).
const GENERATION_DIR_PREFIX: &str = "log.gen-";
/// The pointer file: the current generation's directory name, when it is not `log`.
pub(crate) const POINTER_FILE: &str = "log.current";
/// Longest pointer file accepted (`log.gen-` and 20 digits, a newline).
const POINTER_BYTES_MAX: u64 = 64;
/// Bytes of segments copied per fjall batch while building a generation.
const COPY_BATCH_BYTES_MAX: u64 = 4 << 20;

const KEYSPACE_LOG: &str = "log";
const KEYSPACE_META: &str = "meta";

/// A fault the crash tests inject in a switch: the process aborts (no destructor runs,
/// like a crash) right after the named step.
#[cfg(feature = "sim")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchCrash {
    /// The new directory holds part of the copy (one batch written, not synced).
    AfterPartialCopy,
    /// The new generation is complete and durable; `log.current` still names the old.
    BeforePointer,
    /// `log.current` names the new generation; the old directory is still there.
    AfterPointer,
}

/// One fjall database holding the log: what readers and writers use.
pub(crate) struct Generation {
    pub(crate) db: Database,
    pub(crate) log: Keyspace,
    pub(crate) meta: Keyspace,
    /// The generation's number (0: the `log` directory).
    pub(crate) number: u64,
    /// Its directory.
    pub(crate) dir: PathBuf,
    /// Declared last, so dropped after the database (fields drop in order): deletes the
    /// directory of a retired generation once nothing uses it.
    removal: RemoveOnDrop,
}

impl Generation {
    /// Marks this generation retired: its directory is deleted when its last user drops it.
    fn retire(&self) {
        *self.removal.0.lock() = Some(self.dir.clone());
    }
}

/// Deletes the directory it holds, if any, when dropped.
struct RemoveOnDrop(Mutex<Option<PathBuf>>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(dir) = self.0.get_mut().take() else {
            return;
        };
        // A failure leaves a leftover that the next start deletes.
        match fs::remove_dir_all(&dir) {
            Ok(()) => log::info!(
                "raft storage: deleted the old log generation {}",
                dir.display()
            ),
            Err(e) => log::warn!(
                "raft storage: cannot delete the old log generation {} ({e}); the next start \
                 deletes it",
                dir.display()
            ),
        }
    }
}

/// The directory name of generation `number`.
fn dir_name(number: u64) -> String {
    if number == 0 {
        GENERATION_ZERO_DIR.to_owned()
    } else {
        format!("{GENERATION_DIR_PREFIX}{number}")
    }
}

/// The generation number a directory name stands for, if it is one of ours.
fn number_of(name: &str) -> Option<u64> {
    if name == GENERATION_ZERO_DIR {
        return Some(0);
    }
    let digits = name.strip_prefix(GENERATION_DIR_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|n| *n > 0)
}

/// The current generation's number, from the pointer file (0 without one).
///
/// # Errors
/// [`StorageError::CorruptLog`] if the pointer file is damaged (it then names no
/// generation: starting from another one could start with less than was acknowledged);
/// IO errors reading it.
fn current_number(storage_dir: &Path) -> Result<u64, StorageError> {
    let path = storage_dir.join(POINTER_FILE);
    let text = match fs::metadata(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(StorageError::io("stat", path, e)),
        Ok(meta) if meta.len() > POINTER_BYTES_MAX => {
            return Err(pointer_damaged(&path, "longer than any generation's name"));
        }
        Ok(_) => fs::read_to_string(&path).map_err(|e| StorageError::io("read", &path, e))?,
    };
    match text.strip_suffix('\n').and_then(number_of) {
        Some(number) if number > 0 => Ok(number),
        _ => Err(pointer_damaged(&path, "it names no log generation")),
    }
}

fn pointer_damaged(path: &Path, why: &str) -> StorageError {
    StorageError::CorruptLog(format!(
        "{} is damaged ({why}), so which log database is current is unknown",
        path.display()
    ))
}

/// The directory of the current generation of the log database under `storage_dir`.
///
/// # Errors
/// As for reading the pointer file ([`StorageError::CorruptLog`] if it is damaged).
pub fn current_log_dir(storage_dir: &Path) -> Result<PathBuf, StorageError> {
    Ok(storage_dir.join(dir_name(current_number(storage_dir)?)))
}

/// Makes generation 0 (`log`) current again by removing the pointer file, durably: used
/// by `flotilla repair` after it set the current generation aside, so that the next open
/// starts a new log.
///
/// # Errors
/// IO errors removing the file or syncing the directory.
pub fn reset_to_generation_zero(storage_dir: &Path) -> Result<(), StorageError> {
    let path = storage_dir.join(POINTER_FILE);
    match fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("remove", path, e)),
    }
    fsutil::fsync_dir(storage_dir).map_err(|e| StorageError::io("sync", storage_dir, e))
}

/// Renames every generation of the log database and the pointer file under `storage_dir`
/// to `<name>.damaged-<suffix>` (generation 0: `log.damaged-<suffix>`), so that the next
/// open starts a new, empty log and nothing of the old one is ever deleted or read again.
/// Used by `flotilla repair --accept-loss` on a log it cannot read. Returns the new paths.
///
/// # Errors
/// IO errors listing, renaming or syncing.
pub fn set_aside_all(storage_dir: &Path, suffix: &str) -> io::Result<Vec<PathBuf>> {
    let mut aside = Vec::new();
    for entry in fs::read_dir(storage_dir)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if number_of(&name).is_none() && name != POINTER_FILE {
            continue;
        }
        let to = storage_dir.join(format!("{name}.damaged-{suffix}"));
        fs::rename(storage_dir.join(&name), &to)?;
        aside.push(to);
    }
    fsutil::fsync_dir(storage_dir)?;
    aside.sort();
    Ok(aside)
}

/// Opens the current generation under `storage_dir` (creating generation 0 in a new
/// directory) and deletes every other generation and pointer temp file left by a crash.
///
/// # Errors
/// [`StorageError::CorruptLog`] if the pointer file is damaged or names a directory that
/// is gone; fjall and IO errors.
pub(crate) fn open_current(
    storage_dir: &Path,
    config: &StorageConfig,
) -> Result<Generation, StorageError> {
    let number = current_number(storage_dir)?;
    let dir = storage_dir.join(dir_name(number));
    if number > 0 && !dir.is_dir() {
        return Err(StorageError::CorruptLog(format!(
            "{} names the log database {}, which is missing",
            storage_dir.join(POINTER_FILE).display(),
            dir.display()
        )));
    }
    remove_leftovers(storage_dir, number)?;
    open_generation(&dir, number, config)
}

/// Deletes the generations other than `current` and the pointer file's temp files.
fn remove_leftovers(storage_dir: &Path, current: u64) -> Result<(), StorageError> {
    let entries =
        fs::read_dir(storage_dir).map_err(|e| StorageError::io("list", storage_dir, e))?;
    let pointer_temp = fsutil::temp_path_for(&storage_dir.join(POINTER_FILE));
    let pointer_temp_prefix = pointer_temp
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .and_then(|n| {
            n.rsplit_once('.')
                .map(|(prefix, _pid)| format!("{prefix}."))
        })
        .unwrap_or_default();
    let mut removed = false;
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list", storage_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if number_of(&name).is_some_and(|n| n != current) && path.is_dir() {
            log::info!(
                "raft storage: deleting {}, a log generation that is not current (left by a \
                 crash or an interrupted switch)",
                path.display()
            );
            fs::remove_dir_all(&path).map_err(|e| StorageError::io("remove", &path, e))?;
            removed = true;
        } else if !pointer_temp_prefix.is_empty() && name.starts_with(&pointer_temp_prefix) {
            fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
            removed = true;
        }
    }
    if removed {
        fsutil::fsync_dir(storage_dir).map_err(|e| StorageError::io("sync", storage_dir, e))?;
    }
    Ok(())
}

/// Opens (or creates) the fjall database of one generation.
fn open_generation(
    dir: &Path,
    number: u64,
    config: &StorageConfig,
) -> Result<Generation, StorageError> {
    let db = Database::builder(dir)
        .manual_journal_persist(true)
        // Compressing large entries in the journal would put CPU work on the commit path.
        .journal_compression(CompressionType::None)
        .cache_size(config.cache_bytes)
        .worker_threads(config.fjall_worker_threads)
        .max_journaling_size(super::journal_bytes_max(config.memtable_bytes_max))
        .open()?;
    let log = db.keyspace(KEYSPACE_LOG, || {
        // Entries are mostly read back once (by a slow follower) and then compacted:
        // compressing them on flush would spend CPU the writer needs on small hosts.
        KeyspaceCreateOptions::default()
            .data_block_compression_policy(fjall::config::CompressionPolicy::disabled())
            .max_memtable_size(config.memtable_bytes_max)
    })?;
    let meta = db.keyspace(KEYSPACE_META, || {
        KeyspaceCreateOptions::default().max_memtable_size(super::META_MEMTABLE_BYTES_MAX)
    })?;
    Ok(Generation {
        db,
        log,
        meta,
        number,
        dir: dir.to_path_buf(),
        removal: RemoveOnDrop(Mutex::new(None)),
    })
}

/// Bytes allocated on disk to the files under `dir` (the generation's size, as `du` counts
/// it: fjall preallocates its journal, so a file's length says little).
///
/// # Errors
/// IO errors listing or reading metadata.
pub(crate) fn tree_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    /// `st_blocks` counts 512-byte units whatever the file system's block size.
    const STAT_BLOCK_BYTES: u64 = 512;
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += tree_bytes(&entry.path())?;
        } else if kind.is_file() {
            total += entry.metadata()?.blocks() * STAT_BLOCK_BYTES;
        }
    }
    Ok(total)
}

/// fsyncs every file and directory under `dir`, and `dir` itself: the new generation is
/// durable whatever fjall did or did not sync when it created its files.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fsutil::fsync_dir(dir)
}

/// What the copy into a new generation must preserve, read from the old one.
pub(crate) struct CopyPlan {
    /// The key of the first live segment (the one holding the first live index).
    pub(crate) live_start_key: Vec<u8>,
    /// The first live index: the first segment is copied from it on (a segment holds up to
    /// 1,024 entries, and the compacted ones before it are not worth a copy).
    pub(crate) first_index: LogIndex,
    /// Copying stops (and the switch is abandoned) past this many bytes of segments.
    pub(crate) live_bytes_max: u64,
}

/// Why a switch was not made (none of these is an error: the old generation stays).
#[derive(Debug)]
pub(crate) enum NotSwitched {
    /// The live entries are not small enough beside the database to be worth a copy.
    LiveTooLarge,
}

/// Builds generation `old.number + 1` from one read view of `old` and makes it durable.
/// Returns it, not yet current: [`make_current`] switches.
///
/// # Errors
/// fjall and IO errors (the partial directory is left for the next start to delete).
pub(crate) fn build_next(
    storage_dir: &Path,
    old: &Generation,
    plan: &CopyPlan,
    config: &StorageConfig,
) -> Result<Result<Generation, NotSwitched>, StorageError> {
    let number = old.number + 1;
    let dir = storage_dir.join(dir_name(number));
    if dir.exists() {
        fs::remove_dir_all(&dir).map_err(|e| StorageError::io("remove", &dir, e))?;
    }
    let new = open_generation(&dir, number, config)?;
    let view = old.db.snapshot();
    let mut batch = new.db.batch().durability(None);
    for guard in view.range::<&[u8], _>(&old.meta, ..) {
        let (key, value) = guard.into_inner()?;
        batch.insert(&new.meta, key, value);
    }
    let mut batch_bytes = 0u64;
    let mut live_bytes = 0u64;
    for guard in view.range(&old.log, plan.live_start_key.as_slice()..) {
        let (mut key, mut value) = guard.into_inner()?;
        let first = index_of_key(&key)?;
        if first < plan.first_index {
            let segment = Segment::decode(first, value)?;
            let live: Vec<_> = (plan.first_index..=segment.last())
                .map(|index| segment.entry(index))
                .collect();
            key = log_key(plan.first_index).to_vec().into();
            value = encode_segment(&live);
        }
        let bytes = (key.len() + value.len()) as u64;
        live_bytes += bytes;
        if live_bytes > plan.live_bytes_max {
            drop(batch);
            discard(Arc::new(new));
            return Ok(Err(NotSwitched::LiveTooLarge));
        }
        batch.insert(&new.log, key, value);
        batch_bytes += bytes;
        if batch_bytes >= COPY_BATCH_BYTES_MAX {
            batch.commit()?;
            #[cfg(feature = "sim")]
            crash_if(config, SwitchCrash::AfterPartialCopy);
            batch = new.db.batch().durability(None);
            batch_bytes = 0;
        }
    }
    batch.commit()?;
    #[cfg(feature = "sim")]
    crash_if(config, SwitchCrash::AfterPartialCopy);
    new.db.persist(PersistMode::SyncAll)?;
    sync_tree(&dir).map_err(|e| StorageError::io("sync", &dir, e))?;
    fsutil::fsync_dir(storage_dir).map_err(|e| StorageError::io("sync", storage_dir, e))?;
    Ok(Ok(new))
}

/// Drops a generation that will never be current; its directory is deleted once its last
/// user lets go of it.
pub(crate) fn discard(generation: Arc<Generation>) {
    generation.retire();
    drop(generation);
}

/// The switch: writes the pointer file naming `new` (durably), then retires `old` (its
/// directory goes when its last reader drops it). Returns the new generation to publish.
///
/// # Errors
/// IO errors writing the pointer file. Then the pointer names the old generation or the
/// new one, both complete: the caller must not write again before a restart settles
/// which (it treats the error as fatal).
pub(crate) fn make_current(
    storage_dir: &Path,
    old: &Generation,
    new: Arc<Generation>,
    #[cfg_attr(not(feature = "sim"), allow(unused_variables))] config: &StorageConfig,
) -> Result<Arc<Generation>, StorageError> {
    #[cfg(feature = "sim")]
    crash_if(config, SwitchCrash::BeforePointer);
    let pointer = storage_dir.join(POINTER_FILE);
    let line = format!("{}\n", dir_name(new.number));
    fsutil::write_atomic(&pointer, line.as_bytes(), MODE_PRIVATE)
        .map_err(|e| StorageError::io("write", &pointer, e))?;
    #[cfg(feature = "sim")]
    crash_if(config, SwitchCrash::AfterPointer);
    old.retire();
    Ok(new)
}

#[cfg(feature = "sim")]
fn crash_if(config: &StorageConfig, step: SwitchCrash) {
    if config.crash_in_switch == Some(step) {
        log::error!("raft storage: injected crash at {step:?}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_names_are_generations() {
        assert_eq!(number_of("log"), Some(0));
        assert_eq!(number_of("log.gen-7"), Some(7));
        assert_eq!(dir_name(7), "log.gen-7");
        for other in [
            "log.gen-",
            "log.gen-0",
            "log.gen-x1",
            "log.damaged-17",
            "logs",
        ] {
            assert_eq!(number_of(other), None, "{other}");
        }
    }

    #[test]
    fn a_damaged_pointer_is_refused_and_a_missing_one_means_generation_zero() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(current_number(dir.path()).unwrap(), 0);
        let pointer = dir.path().join(POINTER_FILE);
        for bad in [
            &b""[..],
            b"log.gen-3",
            b"log\n",
            b"log.gen-\n",
            &[b'x'; 100][..],
        ] {
            fs::write(&pointer, bad).unwrap();
            assert!(
                matches!(current_number(dir.path()), Err(StorageError::CorruptLog(_))),
                "{bad:?}"
            );
        }
        fs::write(&pointer, b"log.gen-3\n").unwrap();
        assert_eq!(current_number(dir.path()).unwrap(), 3);
        let config = StorageConfig::default();
        assert!(
            matches!(
                open_current(dir.path(), &config),
                Err(StorageError::CorruptLog(_))
            ),
            "the named directory is missing: never start an empty log instead"
        );
        assert!(!dir.path().join("log").exists() && !dir.path().join("log.gen-3").exists());
    }
}
