//! Undoing a first start that failed: `init` (and `up` on a new directory) write a whole
//! node into the state directory before the manager starts; if it then cannot start (an
//! address in use, a thread that cannot be spawned), nothing of it ever ran or was seen by
//! anyone, and what was written must not shape the next attempt (which may well pass other
//! flags, such as another `--listen`).
//!
//! Owns nothing but the list of what the directory held before. Must never remove an entry
//! that existed before the first start began, nor touch a directory that holds a node
//! (`init` refuses those before anything is written).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::state_dir::{StateDir, StateDirError};

/// What a state directory held before a first start wrote anything.
#[derive(Debug)]
pub struct Untouched {
    /// The outermost directory of the state directory's path that did not exist (the
    /// state directory itself, or an ancestor `init` creates with it); `None` if the state
    /// directory existed.
    created_from: Option<PathBuf>,
    entries: BTreeSet<OsString>,
}

impl Untouched {
    /// Records what `dir` holds now (nothing if it does not exist).
    ///
    /// # Errors
    /// [`StateDirError::Io`] if the directory exists but cannot be listed.
    pub fn record(dir: &StateDir) -> Result<Untouched, StateDirError> {
        let root = dir.root();
        let listing = match fs::read_dir(root) {
            Ok(listing) => listing,
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                return Ok(Untouched {
                    created_from: Some(outermost_missing(root)),
                    entries: BTreeSet::new(),
                });
            }
            Err(source) => return Err(io_error(root, source)),
        };
        let mut entries = BTreeSet::new();
        for entry in listing {
            let entry = entry.map_err(|source| io_error(root, source))?;
            entries.insert(entry.file_name());
        }
        Ok(Untouched {
            created_from: None,
            entries,
        })
    }

    /// Removes everything the failed first start added to `dir`: the settings file first
    /// (so that an interrupted removal leaves a directory that is visibly not a node, which
    /// `init` and `up` set up afresh), then every other new entry; or, if the directory did
    /// not exist, the directory with every ancestor made for it.
    ///
    /// # Errors
    /// [`StateDirError::Io`] naming what could not be removed (the operator removes it).
    pub fn restore(&self, dir: &StateDir) -> Result<(), StateDirError> {
        let root = dir.root();
        let settings = dir.settings_file();
        if !self.existed(&settings) {
            remove(&settings)?;
            crate::util::fsutil::fsync_dir(root).map_err(|source| io_error(root, source))?;
        }
        if let Some(created) = &self.created_from {
            return fs::remove_dir_all(created).map_err(|source| io_error(created, source));
        }
        let listing = fs::read_dir(root).map_err(|source| io_error(root, source))?;
        for entry in listing {
            let entry = entry.map_err(|source| io_error(root, source))?;
            if !self.entries.contains(&entry.file_name()) {
                remove(&entry.path())?;
            }
        }
        Ok(())
    }

    fn existed(&self, path: &Path) -> bool {
        path.file_name()
            .is_some_and(|name| self.entries.contains(name))
    }
}

/// The outermost directory on the way to `root` that does not exist (`root` itself if its
/// parent exists).
fn outermost_missing(root: &Path) -> PathBuf {
    let mut outermost = root;
    while let Some(parent) = outermost.parent() {
        if parent.as_os_str().is_empty() || parent.exists() {
            break;
        }
        outermost = parent;
    }
    outermost.to_path_buf()
}

/// Removes a file, socket or directory tree; a missing one is fine.
fn remove(path: &Path) -> Result<(), StateDirError> {
    let removed = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error),
    };
    removed.map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: io::Error) -> StateDirError {
    StateDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_first_start_leaves_only_what_was_there() {
        let tmp = tempfile::tempdir().expect("tempdir");

        // A directory that did not exist, nor its parent: both gone again.
        let fresh = StateDir::new(tmp.path().join("parent").join("fresh"));
        let untouched = Untouched::record(&fresh).expect("record");
        fresh.create().expect("create");
        fs::write(fresh.settings_file(), "raft_id = 1\n").expect("write");
        fs::write(fresh.raft_dir().join("journal"), "x").expect("write");
        untouched.restore(&fresh).expect("restore");
        assert!(!tmp.path().join("parent").exists());
        assert!(tmp.path().exists());

        // An existing directory with the operator's own files: those stay, the rest goes.
        let existing = StateDir::new(tmp.path().join("existing"));
        fs::create_dir_all(existing.root()).expect("mkdir");
        fs::write(existing.root().join("notes.txt"), "mine").expect("write");
        let untouched = Untouched::record(&existing).expect("record");
        existing.create().expect("create");
        fs::write(existing.settings_file(), "raft_id = 1\n").expect("write");
        fs::write(existing.tokens_file(), "manager x\n").expect("write");
        untouched.restore(&existing).expect("restore");
        let left: Vec<_> = fs::read_dir(existing.root())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, [OsString::from("notes.txt")]);
        assert!(!existing.is_initialized());
    }
}
