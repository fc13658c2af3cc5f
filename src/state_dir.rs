//! A node's state directory (a manager's, or a worker's): where each piece of a node's durable
//! state lives, and the small settings file that says who this manager is. It lies below
//! `agent`, `control` and `manager`, which all use it.
//!
//! Layout (all files 0600, written atomically):
//! - `node/`: the node identity and the cluster root ([`crate::ca::save_node_files`]);
//! - `ca/`: the root CA key bundle (the founder only; other managers hold the key only in
//!   the replicated store, under `raft/`);
//! - `join-tokens`: the current manager and worker tokens, one per line;
//! - `manager.conf`: [`Settings`] (TOML; the `key = value` lines of earlier versions are
//!   read too, and rewritten as TOML when a manager starts);
//! - `raft/`: the Raft log, hard state and snapshots;
//! - `demoted`: present once the cluster demoted this manager to worker (it left the Raft
//!   group): the node runs as a worker (its agent) until the cluster promotes it again.
//! - `managers`: the managers a worker's agent calls (a demoted manager's former peers).
//! - `last-contact`: when the managers last acknowledged this node's agent
//!   ([`crate::agent::last_contact`]; replaced by a rename, not fsynced: see there).
//! - `agent.conf`: where a worker listens once promoted (`flotilla agent --listen`).
//! - `flotilla.lock`: locked (`flock`) by the one process that uses the directory, so that
//!   a second one is refused with a clear error instead of failing inside the storage.
//! - `raft.damaged-<unix seconds>/`: Raft state set aside by `flotilla rejoin` or
//!   `flotilla repair` (kept, never read again: the operator deletes it).
//!
//! Must never hold open handles or start threads: it only names paths and reads or writes
//! the small files above.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::ca::{JoinToken, JoinTokens, Role};
use crate::raft::node::Bootstrap;
use crate::raft::types::NodeId;
use crate::util::fsutil::{MODE_PRIVATE, write_atomic};

/// Longest settings or token file accepted: they are a few hundred bytes; anything larger is
/// not ours.
pub const SMALL_FILE_BYTES_MAX: u64 = 16 * 1024;

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// An IO error on `path`.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process uses the directory.
    #[error(
        "{} is in use by another flotilla process (it holds {}); stop that process first, \
         or use another --state-dir",
        .0.display(),
        .0.join(LOCK_FILE_NAME).display()
    )]
    InUse(PathBuf),
    /// `manager.conf` holds an unknown key or a bad value (the reason names its line).
    #[error(
        "{path}: {reason}\nfix that line (README.md describes every key), or restore the file \
         from a backup"
    )]
    Settings {
        /// The settings file.
        path: PathBuf,
        /// What is wrong, and where.
        reason: String,
    },
    /// A file exists but does not parse.
    #[error("{path} is corrupt: {reason}; restore it from a backup or start a new state dir")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// Name of the process lock file in a state directory.
pub const LOCK_FILE_NAME: &str = "flotilla.lock";

/// The process lock of a state directory ([`StateDir::lock`]); released when dropped (or
/// when the process exits, however it exits).
#[derive(Debug)]
pub struct StateDirLock {
    _file: fs::File,
}

/// Paths of one state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Names the state directory at `root` (nothing is created yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Node identity and root certificate.
    pub fn node_dir(&self) -> PathBuf {
        self.root.join("node")
    }

    /// The root CA key bundle.
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("ca").join(crate::ca::CA_FILE_NAME)
    }

    /// The current join tokens.
    pub fn tokens_file(&self) -> PathBuf {
        self.root.join("join-tokens")
    }

    /// The manager's [`Settings`].
    pub fn settings_file(&self) -> PathBuf {
        self.root.join("manager.conf")
    }

    /// The unix socket (0600) the local `flotilla` command reaches its manager through.
    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    /// Where the local `flotilla` command calls its manager: the control socket while the
    /// manager runs (it exists only then), else the manager's listen address.
    ///
    /// # Errors
    /// [`StateDirError`] if the settings cannot be read.
    pub fn local_target(&self) -> Result<String, StateDirError> {
        use std::os::unix::fs::FileTypeExt;
        let socket = self.control_socket();
        if fs::symlink_metadata(&socket).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(format!("unix:{}", socket.display()));
        }
        Ok(self
            .load_settings()?
            .listen_addr
            .replace("0.0.0.0", "127.0.0.1"))
    }

    /// The marker of a manager demoted to worker (holds its node id).
    pub fn demoted_file(&self) -> PathBuf {
        self.root.join("demoted")
    }

    /// True if the cluster demoted this node to worker (see [`StateDir::mark_demoted`]).
    pub fn is_demoted(&self) -> bool {
        self.demoted_file().exists()
    }

    /// Records that the cluster demoted `node_id` to worker: from now on `run` refuses the
    /// directory. The identity and CA material stay.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn mark_demoted(&self, node_id: &str) -> Result<(), StateDirError> {
        let path = self.demoted_file();
        let text = format!(
            "node {node_id} was demoted to worker and left the managers; it runs as a worker \
             until `flotilla node promote {node_id}` makes it a manager again\n"
        );
        write_atomic(&path, text.as_bytes(), MODE_PRIVATE)
            .map_err(|source| StateDirError::Io { path, source })
    }

    /// Removes the demotion marker (the last step of a rejoin as manager), durably.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn clear_demoted(&self) -> Result<(), StateDirError> {
        let path = self.demoted_file();
        fs::remove_file(&path).map_err(|source| StateDirError::Io {
            path: path.clone(),
            source,
        })?;
        crate::util::fsutil::fsync_dir(&self.root).map_err(|source| StateDirError::Io {
            path: self.root.clone(),
            source,
        })
    }

    /// Raft storage (log, hard state, snapshots).
    pub fn raft_dir(&self) -> PathBuf {
        self.root.join("raft")
    }

    /// True if Raft state was ever written here: a manager ran from this directory (its
    /// log database or a snapshot exists, or its watermark records progress). Then the
    /// directory is never "new", whatever else is missing.
    pub fn has_raft_state(&self) -> bool {
        let raft = self.raft_dir();
        // The log database (generation 0) or the file naming a later generation of it.
        if raft.join("log").exists() || raft.join("log.current").exists() {
            return true;
        }
        let has_snapshot =
            fs::read_dir(raft.join("snapshots")).is_ok_and(|mut entries| entries.next().is_some());
        let watermark_progress = crate::raft::storage::Watermark::open(&raft).map_or_else(
            // Unreadable is not "new": only a missing file is.
            |e| !matches!(e, crate::raft::storage::WatermarkError::Missing(_)),
            |w| w.record().term > 0 || w.record().commit > 0,
        );
        has_snapshot || watermark_progress
    }

    /// Moves the Raft directory aside as `raft.damaged-<unix seconds>` (kept for the
    /// operator, never read again) and syncs the state directory. Returns the new path,
    /// or `None` if there was no Raft directory.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn set_raft_dir_aside(&self) -> Result<Option<PathBuf>, StateDirError> {
        let raft = self.raft_dir();
        if !raft.exists() {
            return Ok(None);
        }
        let seconds = crate::util::clock::unix_now_ms() / 1000;
        let mut aside = self.root.join(format!("raft.damaged-{seconds}"));
        let mut n = 1;
        while aside.exists() {
            aside = self.root.join(format!("raft.damaged-{seconds}-{n}"));
            n += 1;
        }
        fs::rename(&raft, &aside).map_err(|source| StateDirError::Io {
            path: raft.clone(),
            source,
        })?;
        crate::util::fsutil::fsync_dir(&self.root).map_err(|source| StateDirError::Io {
            path: self.root.clone(),
            source,
        })?;
        Ok(Some(aside))
    }

    /// Takes the directory's process lock (`flotilla.lock`), creating the directory if
    /// needed; held until the returned guard is dropped.
    ///
    /// # Errors
    /// [`StateDirError::InUse`] if another process holds it; [`StateDirError::Io`].
    pub fn lock(&self) -> Result<StateDirLock, StateDirError> {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(|source| StateDirError::Io {
                path: self.root.clone(),
                source,
            })?;
        let path = self.root.join(LOCK_FILE_NAME);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StateDirError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(StateDirLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StateDirError::InUse(self.root.clone())),
            Err(fs::TryLockError::Error(source)) => Err(StateDirError::Io { path, source }),
        }
    }

    /// The managers a node's agent calls, one `host:port` a line (`flotilla agent` keeps it;
    /// a demoted manager writes its former peers there).
    pub fn managers_file(&self) -> PathBuf {
        self.root.join("managers")
    }

    /// Saves `managers` (one per line) to [`StateDir::managers_file`], atomically.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn save_managers(&self, managers: &[String]) -> Result<(), StateDirError> {
        let mut text = managers.join("\n");
        text.push('\n');
        let path = self.managers_file();
        write_atomic(&path, text.as_bytes(), MODE_PRIVATE)
            .map_err(|source| StateDirError::Io { path, source })
    }

    /// Where this node's agent keeps its tasks (`<task id>/`: logs, pid file, work dir).
    pub fn tasks_dir(&self) -> PathBuf {
        self.root.join("tasks")
    }

    /// True once a manager was initialized or joined here (its settings are written last).
    pub fn is_initialized(&self) -> bool {
        self.settings_file().exists()
    }

    /// Creates the directory tree (owner-only) if missing.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn create(&self) -> Result<(), StateDirError> {
        use std::os::unix::fs::DirBuilderExt;
        for dir in [
            self.root.clone(),
            self.node_dir(),
            self.root.join("ca"),
            self.raft_dir(),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|source| StateDirError::Io { path: dir, source })?;
        }
        Ok(())
    }

    /// Saves both join tokens.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn save_tokens(&self, tokens: &JoinTokens) -> Result<(), StateDirError> {
        let text = format!(
            "manager {}\nworker {}\n",
            tokens.token(Role::Manager),
            tokens.token(Role::Worker)
        );
        let path = self.tokens_file();
        write_atomic(&path, text.as_bytes(), MODE_PRIVATE)
            .map_err(|source| StateDirError::Io { path, source })
    }

    /// Loads the join tokens saved by [`StateDir::save_tokens`].
    ///
    /// # Errors
    /// [`StateDirError::Io`] or [`StateDirError::Corrupt`].
    pub fn load_tokens(&self) -> Result<JoinTokens, StateDirError> {
        let path = self.tokens_file();
        let text = read_small(&path)?;
        let corrupt = |reason: String| StateDirError::Corrupt {
            path: path.clone(),
            reason,
        };
        let mut manager = None;
        let mut worker = None;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (role, token) = line
                .split_once(' ')
                .ok_or_else(|| corrupt(format!("line {line:?} is not `<role> <token>`")))?;
            let token = JoinToken::parse(token.trim()).map_err(|e| corrupt(e.to_string()))?;
            match role {
                "manager" => manager = Some(token),
                "worker" => worker = Some(token),
                other => return Err(corrupt(format!("unknown role {other:?}"))),
            }
        }
        let (Some(manager), Some(worker)) = (manager, worker) else {
            return Err(corrupt(
                "both a manager and a worker token are needed".into(),
            ));
        };
        JoinTokens::from_tokens(&manager, &worker).map_err(|e| corrupt(e.to_string()))
    }

    /// Saves the manager's settings; written last by `init` and `join`, so its presence
    /// means the directory is complete.
    ///
    /// # Errors
    /// [`StateDirError::Io`].
    pub fn save_settings(&self, settings: &Settings) -> Result<(), StateDirError> {
        let path = self.settings_file();
        write_atomic(&path, settings.to_text().as_bytes(), MODE_PRIVATE)
            .map_err(|source| StateDirError::Io { path, source })
    }

    /// Loads the manager's settings.
    ///
    /// # Errors
    /// [`StateDirError::Io`] (including "not found" for an uninitialized directory) or
    /// [`StateDirError::Settings`].
    pub fn load_settings(&self) -> Result<Settings, StateDirError> {
        let path = self.settings_file();
        let text = read_small(&path)?;
        Settings::from_text(&text).map_err(|reason| StateDirError::Settings { path, reason })
    }

    /// Loads the manager's settings and, if the file is still in the format of earlier
    /// versions (`key = value` lines), rewrites it as TOML (atomically). Only the process
    /// holding the directory's lock does this: other readers read either format.
    ///
    /// # Errors
    /// As [`StateDir::load_settings`], or [`StateDirError::Io`] if the rewrite fails.
    pub fn load_settings_upgrading(&self, _lock: &StateDirLock) -> Result<Settings, StateDirError> {
        let path = self.settings_file();
        let text = read_small(&path)?;
        let settings = Settings::from_text(&text).map_err(|reason| StateDirError::Settings {
            path: path.clone(),
            reason,
        })?;
        if is_legacy_text(&text) {
            self.save_settings(&settings)?;
            log::info!("{}: rewritten as TOML", path.display());
        }
        Ok(settings)
    }
}

fn read_small(path: &Path) -> Result<String, StateDirError> {
    let io_error = |source| StateDirError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = fs::metadata(path).map_err(io_error)?.len();
    if len > SMALL_FILE_BYTES_MAX {
        return Err(StateDirError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, more than the {SMALL_FILE_BYTES_MAX} expected"),
        });
    }
    fs::read_to_string(path).map_err(io_error)
}

/// Who this manager is: fixed at `init` or `join`, read at every start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This manager's Raft member id (random, non-zero, never reused).
    pub raft_id: NodeId,
    /// The address the transport listens on (`host:port`).
    pub listen_addr: String,
    /// The address other managers dial to reach this one.
    pub advertise_addr: String,
    /// How this manager entered the cluster: founded it, or joined through `join_addr`.
    pub bootstrap: Bootstrap,
    /// The manager it joined through (asked to add it until it is a member).
    pub join_addr: Option<String>,
    /// Applied entries between Raft snapshots, pinned for this manager: it then ignores
    /// the cluster object's setting (and a founder seeds the new cluster object with it).
    /// `None`: the cluster object's `snapshot_interval_entries` applies, live (10,000
    /// until the object exists).
    pub snapshot_interval_entries: Option<u64>,
    /// Memory the Raft log's storage may hold before flushing (`log_memtable_mib`, 1 to
    /// [`LOG_MEMTABLE_MIB_MAX`]). `None`: the storage default (64 MiB, reached only under
    /// sustained writes); a small host may trade write throughput for memory here.
    pub log_memtable_mib: Option<u64>,
    /// The most task processes this manager's own agent runs at once (`tasks_running_max`,
    /// 1 to [`TASKS_RUNNING_MAX_CONF_MAX`]); reported to the scheduler, which assigns no
    /// more. `None`: the agent's default (256).
    pub tasks_running_max: Option<u64>,
    /// Serve, apply and snapshot the replicated key-value map (`kv_enabled = true`): the
    /// fixture of tests and benchmarks (`kv.Apply`, `kv.Get`). Off in production.
    pub kv_enabled: bool,
}

/// Largest `log_memtable_mib` accepted in `manager.conf`.
pub const LOG_MEMTABLE_MIB_MAX: u64 = 1024;

/// Largest `tasks_running_max` accepted in `manager.conf`: the agent looks at every live
/// process every 50 ms, and holds at most 10,000 tasks.
pub const TASKS_RUNNING_MAX_CONF_MAX: u64 = 4096;

impl Settings {
    /// The file's text: TOML, after a comment saying what it is.
    fn to_text(&self) -> String {
        let file = SettingsFile {
            raft_id: RaftIdHex(self.raft_id),
            listen_addr: self.listen_addr.clone(),
            advertise_addr: self.advertise_addr.clone(),
            bootstrap: match self.bootstrap {
                Bootstrap::NewCluster => BootstrapFile::NewCluster,
                Bootstrap::Join => BootstrapFile::Join,
            },
            join_addr: self.join_addr.clone(),
            snapshot_interval_entries: self.snapshot_interval_entries,
            log_memtable_mib: self.log_memtable_mib,
            tasks_running_max: self.tasks_running_max,
            kv_enabled: self.kv_enabled,
        };
        let body = toml::to_string(&file).expect("settings are strings and small integers");
        format!("{SETTINGS_HEADER}{body}")
    }

    /// Reads the file's text: TOML, or the `key = value` lines of earlier versions (see
    /// [`is_legacy_text`]).
    fn from_text(text: &str) -> Result<Self, String> {
        if is_legacy_text(text) {
            return Self::from_legacy_text(text);
        }
        let file: SettingsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self {
            raft_id: file.raft_id.0,
            listen_addr: file.listen_addr,
            advertise_addr: file.advertise_addr,
            bootstrap: match file.bootstrap {
                BootstrapFile::NewCluster => Bootstrap::NewCluster,
                BootstrapFile::Join => Bootstrap::Join,
            },
            join_addr: file.join_addr,
            snapshot_interval_entries: file.snapshot_interval_entries,
            log_memtable_mib: file.log_memtable_mib,
            tasks_running_max: file.tasks_running_max,
            kv_enabled: file.kv_enabled,
        })
    }

    /// Reads the format of earlier versions: `key = value` lines, values unquoted, the
    /// Raft id in decimal.
    fn from_legacy_text(text: &str) -> Result<Self, String> {
        let mut raft_id = None;
        let mut listen_addr = None;
        let mut advertise_addr = None;
        let mut bootstrap = None;
        let mut join_addr = None;
        let mut snapshot_interval_entries = None;
        let mut log_memtable_mib = None;
        let mut tasks_running_max = None;
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {line:?} is not `key = value`"))?;
            let value = value.trim().to_string();
            match key.trim() {
                "raft_id" => {
                    let id: NodeId = value
                        .parse()
                        .map_err(|_| format!("raft_id {value:?} is not a number"))?;
                    if id == crate::raft::types::NO_NODE {
                        return Err("raft_id must not be 0".into());
                    }
                    raft_id = Some(id);
                }
                "listen_addr" => listen_addr = Some(value),
                "advertise_addr" => advertise_addr = Some(value),
                "bootstrap" => {
                    bootstrap = Some(match value.as_str() {
                        "new-cluster" => Bootstrap::NewCluster,
                        "join" => Bootstrap::Join,
                        other => {
                            return Err(format!("bootstrap {other:?} is not new-cluster|join"));
                        }
                    });
                }
                "join_addr" => join_addr = Some(value),
                "snapshot_interval_entries" => {
                    let entries: u64 = value.parse().ok().filter(|&n| n > 0).ok_or_else(|| {
                        format!("snapshot_interval_entries {value:?} is not a positive number")
                    })?;
                    snapshot_interval_entries = Some(entries);
                }
                "log_memtable_mib" => {
                    let mib: u64 = value
                        .parse()
                        .ok()
                        .filter(|mib| (1..=LOG_MEMTABLE_MIB_MAX).contains(mib))
                        .ok_or_else(|| {
                            format!(
                                "log_memtable_mib {value:?} is not a number of MiB from 1 to \
                                 {LOG_MEMTABLE_MIB_MAX}"
                            )
                        })?;
                    log_memtable_mib = Some(mib);
                }
                "tasks_running_max" => {
                    let tasks: u64 = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=TASKS_RUNNING_MAX_CONF_MAX).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "tasks_running_max {value:?} is not a number of tasks from 1 \
                                 to {TASKS_RUNNING_MAX_CONF_MAX}"
                            )
                        })?;
                    tasks_running_max = Some(tasks);
                }
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        Ok(Self {
            raft_id: raft_id.ok_or("raft_id is missing")?,
            listen_addr: listen_addr.ok_or("listen_addr is missing")?,
            advertise_addr: advertise_addr.ok_or("advertise_addr is missing")?,
            bootstrap: bootstrap.ok_or("bootstrap is missing")?,
            join_addr,
            snapshot_interval_entries,
            log_memtable_mib,
            tasks_running_max,
            kv_enabled: false,
        })
    }
}

/// The first lines of `manager.conf`.
const SETTINGS_HEADER: &str = "\
# flotilla manager settings (TOML), written by `init` and `join`. The optional keys
# log_memtable_mib, tasks_running_max and snapshot_interval_entries may be set while the
# manager is stopped (README.md describes them); an unknown key stops the manager.
";

/// True for the format of earlier versions: it quotes nothing, while every TOML
/// `manager.conf` quotes its addresses (strings, and required).
fn is_legacy_text(text: &str) -> bool {
    !text.contains(['"', '\''])
}

/// `manager.conf` as TOML: every key known (an unknown one is an error naming its line), every
/// value checked while it is read (so the error names the line too).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    raft_id: RaftIdHex,
    listen_addr: String,
    advertise_addr: String,
    bootstrap: BootstrapFile,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    join_addr: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "snapshot_interval_entries"
    )]
    snapshot_interval_entries: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "log_memtable_mib"
    )]
    log_memtable_mib: Option<u64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "tasks_running_max"
    )]
    tasks_running_max: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    kv_enabled: bool,
}

fn is_false(value: &bool) -> bool {
    !value
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
enum BootstrapFile {
    NewCluster,
    Join,
}

/// A Raft id in hex, as the CLI prints and takes them (a TOML integer is signed 64-bit,
/// and half of the random ids do not fit one).
struct RaftIdHex(NodeId);

impl serde::Serialize for RaftIdHex {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{:x}", self.0))
    }
}

impl<'de> serde::Deserialize<'de> for RaftIdHex {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let id = NodeId::from_str_radix(&text, 16)
            .ok()
            .filter(|&id| id != crate::raft::types::NO_NODE)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "raft_id {text:?} is not a non-zero Raft id in hex (`flotilla manager ls` \
                     shows them)"
                ))
            })?;
        Ok(Self(id))
    }
}

/// An optional number from `min` to `max`, refused with `what` (`a number of MiB`).
fn number_in<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
    key: &str,
    what: &str,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, D::Error> {
    use serde::Deserialize;
    let value = i64::deserialize(deserializer)?;
    u64::try_from(value)
        .ok()
        .filter(|n| range.contains(n))
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{key} {value} is not {what} from {} to {}",
                range.start(),
                range.end()
            ))
        })
}

fn snapshot_interval_entries<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    number_in(
        deserializer,
        "snapshot_interval_entries",
        "a number of entries",
        1..=u64::MAX,
    )
}

fn log_memtable_mib<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    number_in(
        deserializer,
        "log_memtable_mib",
        "a number of MiB",
        1..=LOG_MEMTABLE_MIB_MAX,
    )
}

fn tasks_running_max<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    number_in(
        deserializer,
        "tasks_running_max",
        "a number of tasks",
        1..=TASKS_RUNNING_MAX_CONF_MAX,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_round_trip_and_reject_garbage() {
        let settings = Settings {
            raft_id: 42,
            listen_addr: "127.0.0.1:4242".into(),
            advertise_addr: "10.0.0.1:4242".into(),
            bootstrap: Bootstrap::Join,
            join_addr: Some("10.0.0.2:4242".into()),
            snapshot_interval_entries: Some(500),
            log_memtable_mib: Some(16),
            tasks_running_max: Some(3),
            kv_enabled: true,
        };
        assert_eq!(Settings::from_text(&settings.to_text()).unwrap(), settings);
        let base = "raft_id = 3\nlisten_addr = a\nadvertise_addr = a\nbootstrap = join\n";
        for bad in ["0", "4097", "many"] {
            let err =
                Settings::from_text(&format!("{base}tasks_running_max = {bad}\n")).unwrap_err();
            assert!(err.contains("tasks_running_max"), "{err}");
        }
        for bad in ["0", "1025", "lots"] {
            let err =
                Settings::from_text(&format!("{base}log_memtable_mib = {bad}\n")).unwrap_err();
            assert!(
                err.contains("log_memtable_mib") && err.contains("1 to 1024"),
                "{err}"
            );
        }
        assert!(Settings::from_text("raft_id = 0\n").is_err());
        assert!(Settings::from_text("raft_id = x\n").is_err());
        assert!(Settings::from_text("listen_addr\n").is_err());
        let err =
            Settings::from_text("raft_id = 3\nlisten_addr = a\nbootstrap = join\n").unwrap_err();
        assert!(err.contains("advertise_addr"), "{err}");
    }

    fn sample_settings() -> Settings {
        Settings {
            raft_id: u64::MAX - 7,
            listen_addr: "127.0.0.1:4242".into(),
            advertise_addr: "10.0.0.1:4242".into(),
            bootstrap: Bootstrap::NewCluster,
            join_addr: None,
            snapshot_interval_entries: None,
            log_memtable_mib: Some(16),
            tasks_running_max: None,
            kv_enabled: false,
        }
    }

    #[test]
    fn settings_are_toml_and_every_mistake_names_its_line() {
        let text = sample_settings().to_text();
        assert!(text.contains("raft_id = \"fffffffffffffff8\"\n"), "{text}");
        assert!(text.contains("bootstrap = \"new-cluster\"\n"), "{text}");
        assert!(!text.contains("join_addr"), "{text}");
        assert!(!text.contains("kv_enabled"), "{text}");
        assert!(!is_legacy_text(&text));
        assert_eq!(Settings::from_text(&text).unwrap(), sample_settings());

        let line_of = |key: &str| {
            1 + text
                .lines()
                .position(|l| l.starts_with(key))
                .unwrap_or_else(|| panic!("{key} in {text}"))
        };
        let mistakes = [
            (
                format!("{text}colour = \"blue\"\n"),
                text.lines().count() + 1,
                "colour",
            ),
            (
                text.replace("log_memtable_mib = 16", "log_memtable_mib = 0"),
                line_of("log_memtable_mib"),
                "1 to 1024",
            ),
            (
                text.replace("log_memtable_mib = 16", "log_memtable_mib = \"lots\""),
                line_of("log_memtable_mib"),
                "log_memtable_mib",
            ),
            (
                text.replace("\"fffffffffffffff8\"", "\"0\""),
                line_of("raft_id"),
                "raft_id",
            ),
            (
                text.replace("\"new-cluster\"", "\"found\""),
                line_of("bootstrap"),
                "found",
            ),
            (
                format!("{text}tasks_running_max = 5000\n"),
                text.lines().count() + 1,
                "1 to 4096",
            ),
        ];
        for (bad, line, words) in mistakes {
            let error = Settings::from_text(&bad).expect_err(&bad);
            assert!(
                error.contains(&format!("line {line}")) && error.contains(words),
                "line {line}, {words}: {error}"
            );
        }
        let missing = text.replace("advertise_addr", "# advertise_addr");
        let error = Settings::from_text(&missing).unwrap_err();
        assert!(error.contains("advertise_addr"), "{error}");
    }

    #[test]
    fn the_readme_example_is_a_valid_manager_conf() {
        let readme = include_str!("../README.md");
        let example = readme
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("README.md shows a manager.conf");
        let settings = Settings::from_text(example).unwrap();
        assert_eq!(settings.raft_id, 0xee35_1b6b_18da_02e4);
        assert_eq!(settings.tasks_running_max, Some(64));
    }

    #[test]
    fn a_settings_file_of_an_earlier_version_is_read_and_rewritten_as_toml() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("state"));
        dir.create().unwrap();
        let legacy = format!(
            "raft_id = {}\nlisten_addr = 127.0.0.1:4242\nadvertise_addr = 10.0.0.1:4242\n\
             bootstrap = new-cluster\nlog_memtable_mib = 16\n",
            u64::MAX - 7
        );
        fs::write(dir.settings_file(), &legacy).unwrap();
        assert_eq!(dir.load_settings().unwrap(), sample_settings());
        assert_eq!(
            fs::read_to_string(dir.settings_file()).unwrap(),
            legacy,
            "a plain read leaves the file alone"
        );
        let lock = dir.lock().unwrap();
        assert_eq!(
            dir.load_settings_upgrading(&lock).unwrap(),
            sample_settings()
        );
        let upgraded = fs::read_to_string(dir.settings_file()).unwrap();
        assert_eq!(upgraded, sample_settings().to_text());
        assert_eq!(dir.load_settings().unwrap(), sample_settings());
        let legacy_unknown = format!("{legacy}colour = blue\n");
        fs::write(dir.settings_file(), legacy_unknown).unwrap();
        let error = dir.load_settings().unwrap_err().to_string();
        assert!(error.contains("colour"), "{error}");
    }

    #[test]
    fn tokens_round_trip_and_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("state"));
        dir.create().unwrap();
        let ca = crate::ca::ClusterCa::create(
            std::time::SystemTime::now(),
            crate::ca::CaPolicy::default(),
        )
        .unwrap();
        let tokens = JoinTokens::generate(ca.root());
        dir.save_tokens(&tokens).unwrap();
        assert_eq!(dir.load_tokens().unwrap(), tokens);
        let mode = fs::metadata(dir.tokens_file())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(dir.tokens_file(), "manager nonsense\n").unwrap();
        assert!(matches!(
            dir.load_tokens(),
            Err(StateDirError::Corrupt { .. })
        ));
    }
}
