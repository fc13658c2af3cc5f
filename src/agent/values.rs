//! The secret and config values a node's tasks read: kept in memory as the managers send
//! them (with the tasks that read them), written as files for a task just before it starts,
//! removed when it ends.
//!
//! Owns [`TaskValues`] (the values by id, shared by the session that receives them and the
//! runner thread that writes them) and the files: `<root>/<task id>/secrets/<target>` (mode
//! 0400 unless the reference says otherwise) and `<root>/<task id>/configs/<target>` (0444),
//! named to the task by `FLOTILLA_SECRETS_DIR` and `FLOTILLA_CONFIGS_DIR`. The root is on
//! tmpfs (`/dev/shm`) where the host mounts one, so a secret never reaches a disk; otherwise
//! beside the agent's task directories (then the disk holds it while the task runs: said in
//! the log at start). The root is named after the agent's work directory, so a restarted
//! agent finds the files of the tasks it adopts and removes them when they end.
//!
//! Must never log or print a value, keep a value no held task reads (the runner calls
//! [`TaskValues::retain`]), or leave a task's files behind once it ended.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use parking_lot::Mutex;

use crate::proto::objects::{Config, Secret, SecretReference, TaskSpec};
use crate::store::spec::reference_target;

/// The variable naming a task's secrets directory.
pub const SECRETS_DIR_ENV: &str = "FLOTILLA_SECRETS_DIR";
/// The variable naming a task's configs directory.
pub const CONFIGS_DIR_ENV: &str = "FLOTILLA_CONFIGS_DIR";
/// A secret file's mode unless its reference sets one (Docker's).
pub const SECRET_FILE_MODE_DEFAULT: u32 = 0o400;
/// A config file's mode unless its reference sets one (Docker's).
pub const CONFIG_FILE_MODE_DEFAULT: u32 = 0o444;
/// The in-memory filesystem the values are written to where the host has it.
pub const TMPFS_DIR: &str = "/dev/shm";
/// Values kept at once (secrets plus configs): a task reads at most 64, a node runs at most
/// its `tasks_running_max`; past this, the oldest are not evicted, new ones are refused
/// (logged), and a task whose value is missing is rejected with the reason.
pub const VALUES_MAX: usize = 16_384;

/// The values this node's tasks read, by secret (config) id.
pub struct TaskValues {
    root: PathBuf,
    on_tmpfs: bool,
    secrets: Mutex<HashMap<String, Bytes>>,
    configs: Mutex<HashMap<String, Bytes>>,
}

impl std::fmt::Debug for TaskValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskValues")
            .field("root", &self.root)
            .field("on_tmpfs", &self.on_tmpfs)
            .field("secrets", &self.secrets.lock().len())
            .field("configs", &self.configs.lock().len())
            .finish()
    }
}

impl TaskValues {
    /// Values for the agent whose task directories are under `work_dir`: files on tmpfs
    /// where the host has it, else in `<work_dir>-values`.
    pub fn for_work_dir(work_dir: &Path) -> TaskValues {
        let on_tmpfs = is_tmpfs(Path::new(TMPFS_DIR));
        let root = if on_tmpfs {
            Path::new(TMPFS_DIR).join(format!("flotilla-{}", short_hash(work_dir)))
        } else {
            let mut name = work_dir.as_os_str().to_owned();
            name.push("-values");
            PathBuf::from(name)
        };
        TaskValues::at(root, on_tmpfs)
    }

    /// Values whose files go under `root`.
    pub fn at(root: PathBuf, on_tmpfs: bool) -> TaskValues {
        TaskValues {
            root,
            on_tmpfs,
            secrets: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        }
    }

    /// Where the task files go.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the files are in memory (tmpfs).
    pub fn on_tmpfs(&self) -> bool {
        self.on_tmpfs
    }

    /// Keeps the values the managers sent with a task.
    pub fn receive(&self, secrets: Vec<Secret>, configs: Vec<Config>) {
        // Ids only: never a value.
        log::info!(
            "agent: received the values of secrets {:?} and configs {:?} for its tasks",
            secrets.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            configs.iter().map(|c| c.id.as_str()).collect::<Vec<_>>()
        );
        let mut kept = self.secrets.lock();
        for secret in secrets {
            let data = secret.spec.map(|s| s.data).unwrap_or_default();
            keep(&mut kept, secret.id, data, "secret");
        }
        drop(kept);
        let mut kept = self.configs.lock();
        for config in configs {
            let data = config.spec.map(|s| s.data).unwrap_or_default();
            keep(&mut kept, config.id, data, "config");
        }
    }

    /// Forgets every value no spec of `specs` reads.
    pub fn retain<'a>(&self, specs: impl Iterator<Item = &'a TaskSpec>) {
        let mut secret_ids = HashSet::new();
        let mut config_ids = HashSet::new();
        for spec in specs {
            secret_ids.extend(spec.secrets.iter().map(|r| r.id.as_str()));
            config_ids.extend(spec.configs.iter().map(|r| r.id.as_str()));
        }
        self.secrets
            .lock()
            .retain(|id, _| secret_ids.contains(id.as_str()));
        self.configs
            .lock()
            .retain(|id, _| config_ids.contains(id.as_str()));
    }

    /// Writes the files of task `task_id` (its spec `spec`) and returns the variables that
    /// name their directories (none when it reads nothing).
    ///
    /// # Errors
    /// A reason for the task's rejection: a value the managers did not send, or a file that
    /// cannot be written.
    pub fn write_for(&self, task_id: &str, spec: &TaskSpec) -> Result<Vec<String>, String> {
        let mut env = Vec::new();
        if !spec.secrets.is_empty() {
            let dir = self.task_root(task_id).join("secrets");
            let values = self.secrets.lock();
            write_files(
                &dir,
                &spec.secrets,
                &values,
                SECRET_FILE_MODE_DEFAULT,
                "secret",
            )?;
            env.push(format!("{SECRETS_DIR_ENV}={}", dir.display()));
        }
        if !spec.configs.is_empty() {
            let dir = self.task_root(task_id).join("configs");
            let values = self.configs.lock();
            write_files(
                &dir,
                &spec.configs,
                &values,
                CONFIG_FILE_MODE_DEFAULT,
                "config",
            )?;
            env.push(format!("{CONFIGS_DIR_ENV}={}", dir.display()));
        }
        Ok(env)
    }

    /// Removes the files of task `task_id`, if it has any.
    pub fn remove_for(&self, task_id: &str) {
        let dir = self.task_root(task_id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => log::debug!("task {task_id}: its secret and config files are removed"),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => log::warn!("task {task_id}: cannot remove {dir:?}: {error}"),
        }
    }

    fn task_root(&self, task_id: &str) -> PathBuf {
        assert!(
            crate::agent::executor::validate_task_id(task_id).is_ok(),
            "task ids are checked before their files are written"
        );
        self.root.join(task_id)
    }
}

fn keep(kept: &mut HashMap<String, Bytes>, id: String, data: Bytes, kind: &str) {
    if kept.len() >= VALUES_MAX && !kept.contains_key(&id) {
        log::warn!("agent: {kind} {id} not kept: the agent holds {VALUES_MAX} values already");
        return;
    }
    kept.insert(id, data);
}

/// Writes one file per reference into `dir` (made, mode 0700), from `values`.
fn write_files(
    dir: &Path,
    references: &[SecretReference],
    values: &HashMap<String, Bytes>,
    mode_default: u32,
    kind: &str,
) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create the {kind} directory {dir:?}: {e}"))?;
    for reference in references {
        let value = values.get(&reference.id).ok_or_else(|| {
            format!(
                "the managers did not send the value of {kind} {} ({}) with the task; it \
                 will be sent with the replacement task",
                reference.name, reference.id
            )
        })?;
        let path = dir.join(reference_target(reference));
        let mode = if reference.mode == 0 {
            mode_default
        } else {
            reference.mode
        };
        write_file(&path, value, mode)
            .map_err(|e| format!("cannot write {kind} {} as {path:?}: {e}", reference.name))?;
    }
    Ok(())
}

/// Writes `value` to a new file at `path` (replacing one a failed start left), then sets
/// its mode (after writing: a mode of 0400 would refuse the write itself).
fn write_file(path: &Path, value: &[u8], mode: u32) -> std::io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(value)?;
    file.set_permissions(fs::Permissions::from_mode(mode))
}

/// Whether `dir` is a tmpfs mount point (per `/proc/mounts`).
fn is_tmpfs(dir: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return false;
    };
    let wanted = dir.to_string_lossy();
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, mount_point, fs_type) = (fields.next(), fields.next(), fields.next());
        mount_point == Some(wanted.as_ref()) && fs_type == Some("tmpfs")
    })
}

/// 16 hex digits of SHA-256 of `path` (its absolute form when it can be had).
fn short_hash(path: &Path) -> String {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        absolute.as_os_str().as_encoded_bytes(),
    );
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::SecretSpec;

    fn secret(id: &str, data: &'static [u8]) -> Secret {
        Secret {
            id: id.into(),
            meta: None,
            spec: Some(SecretSpec {
                name: id.into(),
                labels: Default::default(),
                data: Bytes::from_static(data),
            }),
        }
    }

    fn reference(id: &str, target: &str) -> SecretReference {
        SecretReference {
            id: id.into(),
            name: id.into(),
            target: target.into(),
            mode: 0,
        }
    }

    #[test]
    fn files_are_written_with_their_modes_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let values = TaskValues::at(dir.path().join("values"), false);
        values.receive(vec![secret("s1", b"hunter2")], Vec::new());
        let spec = TaskSpec {
            secrets: vec![reference("s1", ""), reference("s1", "copy")],
            ..Default::default()
        };
        let env = values.write_for("t1", &spec).unwrap();
        let secrets_dir = dir.path().join("values/t1/secrets");
        assert_eq!(
            env,
            [format!("{SECRETS_DIR_ENV}={}", secrets_dir.display())]
        );
        for name in ["s1", "copy"] {
            let path = secrets_dir.join(name);
            assert_eq!(fs::read(&path).unwrap(), b"hunter2");
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o400, "{name}");
        }
        values.remove_for("t1");
        assert!(!dir.path().join("values/t1").exists());
        values.retain(std::iter::empty());
        let missing = values.write_for("t2", &spec).unwrap_err();
        assert!(missing.contains("did not send"), "{missing}");
        assert!(!format!("{values:?}").contains("hunter2"));
    }
}
