//! The process executor: runs one task as a child process of the agent.
//!
//! Owns one child process per [`TaskProcess`], its process group, its per-task directory
//! (`<work dir>/<task id>/`: `stdout.log`, `stderr.log`, the `pid` file, and `work/`, the
//! working directory of a task that names none) and the stop protocol (SIGTERM to the group,
//! SIGKILL to the group after a grace period).
//!
//! Must never block: it checks for exits with `waitid(WNOHANG)` and leaves the waiting to its
//! caller's loop (the one wait is in dropping a live [`TaskProcess`], which kills its group and
//! reaps it right after the SIGKILL); never signal a group after its leader was reaped (the
//! group id could belong to someone else by then); never leave a child unreaped.
//!
//! **Environment.** A task starts from an empty environment, plus its own `KEY=VALUE` entries,
//! plus the agent's `PATH` when the task sets none. **Process group.** The child leads a new
//! process group (`setpgid(0, 0)`), so a stop reaches what it spawned; the survivors of a group
//! are killed when its leader exits (a task ends with its first process). A process that leaves
//! the group (`setsid`, `setpgid`) escapes both. **Logs.** stdout and stderr are appended to
//! their files by the child itself (no copy thread); [`TaskProcess::cap_logs`], called
//! periodically, moves a file larger than its cap to `<name>.1` and empties it, so a stream
//! uses at most twice its cap plus what the task writes between two calls; bytes written while
//! the file is copied may be lost. **Restart.** The `pid` file (`<pid> <start time>`) lets a
//! restarted agent adopt the groups its previous run left running ([`adopt_leftovers`]): a
//! leader whose pid still has the recorded start time is the same process. It is no longer the
//! agent's child (its parent died; init or a subreaper reaps it), so `waitid` cannot see it:
//! it is watched through a pidfd (`pidfd_open`, Linux 5.3+; readable once it exited, immune
//! to pid reuse), or, on an older kernel, through `/proc/<pid>/stat` (gone, a zombie, or
//! another start time: exited). Its exit status went to its new parent: an adopted task's
//! end is [`ExitOutcome::Unknown`]. Its output keeps going to the same log files (the child
//! holds them open in append mode) and they are still rotated.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::agent::limits::Prepared;
use crate::agent::sys;
use crate::health::HEALTH_OUTPUT_BYTES_MAX;
use crate::proto::objects::{HealthCheckResult, TaskSpec};

/// How long a stopping task has between SIGTERM and SIGKILL unless configured otherwise
/// (Docker's default stop timeout).
pub const STOP_GRACE_DEFAULT: Duration = Duration::from_secs(10);

/// Size above which a log file is rotated by [`TaskProcess::cap_logs`] unless configured
/// otherwise: 8 MiB per stream.
pub const LOG_FILE_BYTES_MAX_DEFAULT: u64 = 8 << 20;

/// Longest task id accepted (it names a directory).
pub const TASK_ID_BYTES_MAX: usize = 128;

/// The file that receives a task's standard output, in its task directory.
pub const STDOUT_LOG_FILE: &str = "stdout.log";
/// The file that receives a task's standard error, in its task directory.
pub const STDERR_LOG_FILE: &str = "stderr.log";
/// The file naming a live task's process group and its leader's start time.
pub const PID_FILE: &str = "pid";
/// The working directory of a task whose spec names none, in its task directory.
pub const DEFAULT_WORKING_DIR: &str = "work";

/// Why a task could not be started. Each is final for that task: the agent reports it
/// REJECTED and the orchestrator decides what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The task id cannot name a directory.
    #[error(
        "task id {0:?} is not a valid directory name (1 to {TASK_ID_BYTES_MAX} bytes of \
         A-Z a-z 0-9 . _ -, not starting with '.'); this is a manager bug: task ids are \
         generated"
    )]
    InvalidTaskId(String),
    /// The task carries no spec or an empty command.
    #[error("the task has no command to run; give its service a command")]
    NoCommand,
    /// An env entry lacks `=` or a key.
    #[error("env entry {index} ({entry:?}) is not KEY=VALUE; fix the service's env")]
    BadEnv {
        /// Position of the entry in `TaskSpec.env`.
        index: usize,
        /// The entry as given.
        entry: String,
    },
    /// The spec's working directory is relative or not a directory.
    #[error(
        "working directory {0:?} is not an absolute path to an existing directory on this \
         node; create it or change the service's working_dir"
    )]
    BadWorkingDir(PathBuf),
    /// The task directory or a log file could not be created.
    #[error(
        "cannot prepare {path:?}: {source}; check the agent's work directory (space, permissions)"
    )]
    TaskDir {
        /// The directory or file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The command could not be executed: the message says what happened in the terms of
    /// the spec (a missing program, a permission, a size) and what to change.
    #[error("{}", explain_spawn_error(command, source, *exec_bytes))]
    Spawn {
        /// The command as given.
        command: String,
        /// The OS error of `exec` (or `fork`).
        source: io::Error,
        /// Bytes of the arguments and environment handed to `exec` (each with its NUL).
        exec_bytes: usize,
    },
}

/// What a failed `exec` (or `fork`) means for the person who wrote the spec, and what to do.
fn explain_spawn_error(command: &str, error: &io::Error, exec_bytes: usize) -> String {
    let what = match error.raw_os_error() {
        Some(libc::ENOENT) => format!(
            "it does not exist on this node (for a script: its interpreter, named on its #! \
             line, does not); give an absolute path, or a name found in the task's PATH \
             ({})",
            std::env::var("PATH").unwrap_or_default()
        ),
        Some(libc::EACCES) => "permission denied: it is not executable by the agent's user, \
             or one of its directories cannot be searched; check its mode (chmod +x) and \
             owner"
            .to_string(),
        Some(libc::E2BIG) => format!(
            "its arguments and environment are too large for this system ({} bytes; Linux takes at most 128 KiB in any one argument or variable and about \
             2 MiB in all, a quarter of the stack limit); shorten the service's args or env, \
             or pass large data in a file",
            crate::store::spec::thousands(exec_bytes)
        ),
        Some(libc::ENOEXEC) => "it is not a program this node can run (a binary for another \
             architecture, or a script without a #! line); rebuild it for this node or add \
             the interpreter line"
            .to_string(),
        Some(libc::ETXTBSY) => "the file is being written by another process; start the \
             task again once it is complete"
            .to_string(),
        Some(libc::ENOTDIR) => {
            "a component of its path is not a directory; check the path".to_string()
        }
        Some(libc::ENOMEM | libc::EAGAIN) => "this node could not create a process (out of \
             memory, or at its process limit); the orchestrator starts a new task after the \
             restart delay"
            .to_string(),
        _ => "check that it exists and is executable by the agent's user".to_string(),
    };
    format!("cannot execute {command:?}: {what} ({error})")
}

/// Bytes `exec` receives for `spec` with environment `env`: every argument (the command
/// included) and every `KEY=VALUE`, each with its NUL.
fn exec_bytes(spec: &TaskSpec, env: &[(String, String)]) -> usize {
    let args: usize = std::iter::once(&spec.command)
        .chain(&spec.args)
        .map(|arg| arg.len() + 1)
        .sum();
    let env: usize = env
        .iter()
        .map(|(key, value)| key.len() + value.len() + 2)
        .sum();
    args + env
}

/// How a task's leader process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// It exited with this status.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// It was adopted from a previous run of the agent and has ended; its exit status went
    /// to its parent (init or a subreaper), not to this agent.
    Unknown,
}

impl ExitOutcome {
    fn from_status(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => ExitOutcome::Exited(code),
            (None, Some(signal)) => ExitOutcome::Signaled(signal),
            // Neither happens for a reaped (not stopped) child on unix.
            (None, None) => ExitOutcome::Exited(-1),
        }
    }

    /// The exit code a shell would show: the status, or 128 + the signal; `None` when
    /// unknown.
    pub fn exit_code(self) -> Option<i32> {
        match self {
            ExitOutcome::Exited(code) => Some(code),
            ExitOutcome::Signaled(signal) => Some(128 + signal),
            ExitOutcome::Unknown => None,
        }
    }

    /// Whether the process exited with status 0.
    pub fn is_success(self) -> bool {
        self == ExitOutcome::Exited(0)
    }
}

impl fmt::Display for ExitOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitOutcome::Exited(code) => write!(f, "exited with status {code}"),
            ExitOutcome::Signaled(signal) => write!(f, "killed by signal {signal}"),
            ExitOutcome::Unknown => write!(
                f,
                "ended with an unknown exit status (it was started by a previous run of the \
                 agent, so its exit status went to its new parent process)"
            ),
        }
    }
}

/// The stop in progress: SIGTERM was sent; SIGKILL follows at `kill_at`.
#[derive(Debug)]
struct Stop {
    kill_at: Instant,
    killed: bool,
}

/// The leader of a task's process group, and how its exit is seen.
#[derive(Debug)]
enum Leader {
    /// Spawned by this run of the agent: seen with `waitid(WNOWAIT)`, then reaped.
    Child(Child),
    /// Left running by a previous run and adopted: not our child, never reaped by us.
    Adopted {
        /// Readable once the process exited; `None` on a kernel without `pidfd_open`.
        pidfd: Option<std::os::fd::OwnedFd>,
        /// Its start time (`/proc/<pid>/stat` field 22), which tells a reused pid apart.
        start_time: u64,
    },
}

/// One task's process (spawned, or adopted from a previous run of the agent), leader of its
/// own process group.
#[derive(Debug)]
pub struct TaskProcess {
    leader: Leader,
    pid: u32,
    task_dir: PathBuf,
    stop: Option<Stop>,
    reaped: bool,
}

/// The directory of task `task_id` under `work_dir`.
pub fn task_dir(work_dir: &Path, task_id: &str) -> PathBuf {
    work_dir.join(task_id)
}

/// Checks that `task_id` can name a directory without escaping the work directory.
///
/// # Errors
///
/// [`StartError::InvalidTaskId`] if it is empty, longer than [`TASK_ID_BYTES_MAX`], starts with
/// `.` or holds anything but ASCII letters, digits, `.`, `_` and `-`.
pub fn validate_task_id(task_id: &str) -> Result<(), StartError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let valid = !task_id.is_empty()
        && task_id.len() <= TASK_ID_BYTES_MAX
        && !task_id.starts_with('.')
        && task_id.chars().all(allowed);
    if valid {
        Ok(())
    } else {
        Err(StartError::InvalidTaskId(task_id.to_owned()))
    }
}

/// Starts task `task_id` as described by `spec`, its directory under `work_dir`.
///
/// Returns once the command was executed (or failed to be): `std` reports an `exec` failure
/// through a close-on-exec pipe, so "cannot start" is known here and never looks like an exit.
///
/// # Errors
///
/// A [`StartError`]: the task cannot run on this node as given.
pub fn spawn(work_dir: &Path, task_id: &str, spec: &TaskSpec) -> Result<TaskProcess, StartError> {
    spawn_limited(work_dir, task_id, spec, Prepared::default())
}

/// [`spawn`], the child joining the cgroup and taking the rlimit of `limits` before it
/// executes its program (see [`super::limits`]).
///
/// # Errors
///
/// A [`StartError`]: the task cannot run on this node as given.
pub fn spawn_limited(
    work_dir: &Path,
    task_id: &str,
    spec: &TaskSpec,
    limits: Prepared,
) -> Result<TaskProcess, StartError> {
    validate_task_id(task_id)?;
    if spec.command.is_empty() {
        return Err(StartError::NoCommand);
    }
    let env = parse_env(&spec.env)?;
    let task_dir = task_dir(work_dir, task_id);
    let working_dir = prepare_working_dir(&task_dir, &spec.working_dir)?;
    let stdout = open_log(&task_dir.join(STDOUT_LOG_FILE))?;
    let stderr = open_log(&task_dir.join(STDERR_LOG_FILE))?;

    let mut command = Command::new(&spec.command);
    command
        .args(&spec.args)
        .env_clear()
        .envs(
            env.iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .current_dir(&working_dir)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    if !env.iter().any(|(key, _)| key == "PATH")
        && let Some(path) = std::env::var_os("PATH")
    {
        command.env("PATH", path);
    }
    super::limits::apply(&mut command, limits);
    let child = command.spawn().map_err(|source| StartError::Spawn {
        command: spec.command.clone(),
        source,
        exec_bytes: exec_bytes(spec, &env),
    })?;
    let pid = child.id();
    assert!(pid > 1, "a spawned child is neither init nor the idle task");
    let process = TaskProcess {
        leader: Leader::Child(child),
        pid,
        task_dir,
        stop: None,
        reaped: false,
    };
    if let Err(error) = process.write_pid_file() {
        // Only a restarted agent's cleanup needs it; the task itself is fine.
        log::warn!("task {task_id}: cannot write its pid file: {error}");
    }
    Ok(process)
}

fn parse_env(entries: &[String]) -> Result<Vec<(String, String)>, StartError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| match entry.split_once('=') {
            Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
            _ => Err(StartError::BadEnv {
                index,
                entry: entry.clone(),
            }),
        })
        .collect()
}

/// Creates the task directory and returns the directory the task runs in.
fn prepare_working_dir(task_dir: &Path, working_dir: &str) -> Result<PathBuf, StartError> {
    let default_dir = task_dir.join(DEFAULT_WORKING_DIR);
    fs::create_dir_all(&default_dir).map_err(|source| StartError::TaskDir {
        path: default_dir.clone(),
        source,
    })?;
    if working_dir.is_empty() {
        return Ok(default_dir);
    }
    let path = PathBuf::from(working_dir);
    if !path.is_absolute() || !path.is_dir() {
        return Err(StartError::BadWorkingDir(path));
    }
    Ok(path)
}

fn open_log(path: &Path) -> Result<File, StartError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| StartError::TaskDir {
            path: path.to_owned(),
            source,
        })
}

impl TaskProcess {
    /// The leader's pid, which is also the process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether [`TaskProcess::begin_stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_some()
    }

    /// Whether the stop had to send SIGKILL (the grace period ran out).
    pub fn was_killed(&self) -> bool {
        self.stop.as_ref().is_some_and(|stop| stop.killed)
    }

    /// When [`TaskProcess::poll`] must next run to send SIGKILL on time, if a stop is pending.
    pub fn kill_deadline(&self) -> Option<Instant> {
        self.stop
            .as_ref()
            .filter(|stop| !stop.killed)
            .map(|stop| stop.kill_at)
    }

    /// Sends SIGTERM to the process group; [`TaskProcess::poll`] sends SIGKILL once `grace` has
    /// passed. A second call sends nothing and only brings the SIGKILL forward if its grace
    /// ends sooner.
    ///
    /// # Errors
    ///
    /// The OS error of `kill(2)` (`EPERM`: no process of the group may be signalled).
    pub fn begin_stop(&mut self, now: Instant, grace: Duration) -> io::Result<()> {
        assert!(!self.reaped, "a reaped process is never stopped");
        if let Some(stop) = &mut self.stop {
            // A stop under way ends no later than this one would (a fence hastens it).
            stop.kill_at = stop.kill_at.min(now + grace);
            return Ok(());
        }
        self.stop = Some(Stop {
            kill_at: now + grace,
            killed: false,
        });
        sys::signal_group(self.pid, sys::SIGTERM).map(|_| ())
    }

    /// Checks whether the leader exited and, if so, kills the rest of its group and reaps it;
    /// otherwise sends SIGKILL if a stop's grace period is over. Never blocks.
    ///
    /// Returns `Some` exactly once, when the leader was reaped. A SIGKILL the kernel refuses
    /// (`EPERM`: the leader became a set-user-id program) is logged, not returned: the process
    /// may still exit on its own, and it stays watched.
    ///
    /// # Errors
    ///
    /// The OS error of `waitid(2)` or `wait(2)`. `ECHILD` (the child was reaped by someone
    /// else: the agent's process must not ignore SIGCHLD) leaves nothing to wait for, so a
    /// dropped [`TaskProcess`] will not try.
    pub fn poll(&mut self, now: Instant) -> io::Result<Option<ExitOutcome>> {
        assert!(!self.reaped, "poll after the exit was returned");
        if let Some(outcome) = self.poll_exit()? {
            self.reaped = true;
            self.remove_pid_file();
            return Ok(Some(outcome));
        }
        if let Some(stop) = &mut self.stop
            && !stop.killed
            && now >= stop.kill_at
        {
            stop.killed = true;
            if let Err(error) = sys::signal_group(self.pid, sys::SIGKILL) {
                log::warn!("cannot kill process group {}: {error}", self.pid);
            }
        }
        Ok(None)
    }

    /// The leader's exit, if it happened: the survivors of its group are killed and a child
    /// is reaped.
    fn poll_exit(&mut self) -> io::Result<Option<ExitOutcome>> {
        match &mut self.leader {
            Leader::Child(child) => {
                let exited = sys::exited_unreaped(self.pid).inspect_err(|error| {
                    if error.raw_os_error() == Some(libc::ECHILD) {
                        self.reaped = true;
                    }
                })?;
                if !exited {
                    return Ok(None);
                }
                // The leader's zombie still holds the group id: survivors are ours to kill.
                kill_rest_of_group(self.pid);
                let status = child.wait()?;
                Ok(Some(ExitOutcome::from_status(status)))
            }
            Leader::Adopted { pidfd, start_time } => {
                let exited = match pidfd {
                    Some(pidfd) => sys::pidfd_exited(std::os::fd::AsFd::as_fd(pidfd))?,
                    None => !process_alive_since(self.pid, *start_time),
                };
                if !exited {
                    return Ok(None);
                }
                // Its new parent may have reaped it already, and then the group id is free
                // once the last survivor is gone; a group id is reused only by a process
                // with that pid, so it is still the task's group unless that pid now names
                // another process (a different start time).
                let group_still_the_tasks =
                    process_start_time(self.pid).map_or(true, |now| now == *start_time);
                if group_still_the_tasks {
                    kill_rest_of_group(self.pid);
                }
                Ok(Some(ExitOutcome::Unknown))
            }
        }
    }

    /// Whether this process was adopted from a previous run of the agent.
    pub fn is_adopted(&self) -> bool {
        matches!(self.leader, Leader::Adopted { .. })
    }

    /// Rotates a log file larger than `file_bytes_max`: its content moves to `<name>.1`
    /// (replacing the previous one) and the file is emptied. The child keeps appending to the
    /// same file (it was opened with `O_APPEND`, so it writes at the new end).
    ///
    /// # Errors
    ///
    /// The OS error of reading, copying or truncating a log file.
    pub fn cap_logs(&self, file_bytes_max: u64) -> io::Result<()> {
        for name in [STDOUT_LOG_FILE, STDERR_LOG_FILE] {
            let path = self.task_dir.join(name);
            if fs::metadata(&path)?.len() <= file_bytes_max {
                continue;
            }
            fs::copy(&path, self.task_dir.join(format!("{name}.1")))?;
            OpenOptions::new().write(true).open(&path)?.set_len(0)?;
        }
        Ok(())
    }

    fn write_pid_file(&self) -> io::Result<()> {
        let start_time = process_start_time(self.pid)?;
        // No fsync: after a machine crash the processes it names are gone anyway.
        fs::write(
            self.task_dir.join(PID_FILE),
            format!("{} {start_time}\n", self.pid),
        )
    }

    fn remove_pid_file(&self) {
        let path = self.task_dir.join(PID_FILE);
        if let Err(error) = fs::remove_file(&path)
            && error.kind() != io::ErrorKind::NotFound
        {
            log::warn!("cannot remove {path:?}: {error}");
        }
    }
}

impl Drop for TaskProcess {
    /// A process nobody will wait for any more: kill its group and reap it (SIGKILL cannot be
    /// ignored, so the wait is short). If the kill is refused, the wait could last forever:
    /// the process is left running (and logged) rather than blocking the caller.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        if let Leader::Adopted { start_time, .. } = self.leader
            && !process_alive_since(self.pid, start_time)
        {
            // Gone already (its group may now be someone else's): nothing to kill.
            self.remove_pid_file();
            return;
        }
        if let Err(error) = sys::signal_group(self.pid, sys::SIGKILL) {
            log::error!(
                "cannot kill process group {}, left running: {error}",
                self.pid
            );
            return;
        }
        // An adopted process is reaped by its own parent.
        if let Leader::Child(child) = &mut self.leader
            && let Err(error) = child.wait()
        {
            log::warn!("cannot reap process {}: {error}", self.pid);
        }
        self.remove_pid_file();
    }
}

fn kill_rest_of_group(pgid: u32) {
    if let Err(error) = sys::signal_group(pgid, sys::SIGKILL) {
        log::warn!("cannot kill the rest of process group {pgid}: {error}");
    }
}

/// Whether `pid` is a live process (not a zombie) started at `start_time`.
fn process_alive_since(pid: u32, start_time: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X")) && process_start_time(pid).is_ok_and(|now| now == start_time)
}

/// The start time of process `pid` in clock ticks since boot (`/proc/<pid>/stat`, field 22):
/// with the pid, it names one process across pid reuse.
fn process_start_time(pid: u32) -> io::Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no ')' in stat"))?;
    // After the name come field 3 (state) onwards, so field 22 is the 20th.
    after_name
        .split_whitespace()
        .nth(19)
        .and_then(|field| field.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in stat"))
}

/// A process a previous run of the agent left running, adopted: the task it runs and its
/// process, watched from now on like one this run spawned.
#[derive(Debug)]
pub struct Adopted {
    /// The task (its directory's name).
    pub task_id: String,
    /// Its process group's leader.
    pub process: TaskProcess,
}

/// Adopts the process groups a previous run of the agent left running in `work_dir` (task
/// directories with a `pid` file whose leader is alive with the recorded start time); removes
/// the `pid` files of the others (their process is gone, or their pid now names another
/// process: never signalled).
///
/// # Errors
///
/// The OS error of listing `work_dir` (a missing `work_dir` is not an error).
pub fn adopt_leftovers(work_dir: &Path) -> io::Result<Vec<Adopted>> {
    let entries = match fs::read_dir(work_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => return Err(error),
    };
    let mut adopted = Vec::new();
    for entry in entries {
        let task_dir = entry?.path();
        let pid_file = task_dir.join(PID_FILE);
        let Ok(content) = fs::read_to_string(&pid_file) else {
            continue;
        };
        let task_id = task_dir
            .file_name()
            .and_then(|name| name.to_str())
            .filter(|name| validate_task_id(name).is_ok());
        if let (Some(task_id), Some((pid, start_time))) = (task_id, parse_pid_file(&content))
            && pid > 1
            && let Some(process) = adopt(task_dir.clone(), pid, start_time)
        {
            adopted.push(Adopted {
                task_id: task_id.to_owned(),
                process,
            });
            continue;
        }
        if let Err(error) = fs::remove_file(&pid_file) {
            log::warn!("cannot remove {pid_file:?}: {error}");
        }
    }
    Ok(adopted)
}

/// The process `pid` if it is still the one started at `start_time`.
fn adopt(task_dir: PathBuf, pid: u32, start_time: u64) -> Option<TaskProcess> {
    // Open the pidfd first: if the process behind the pid is alive with the recorded start
    // time afterwards, it existed before the open, so the pidfd names it (a pid names one
    // process at a time).
    let pidfd = match sys::pidfd_open(pid) {
        Ok(pidfd) => Some(pidfd),
        Err(error) if error.raw_os_error() == Some(libc::ESRCH) => return None,
        Err(error) => {
            log::debug!("pidfd_open({pid}): {error}; watching it through /proc instead");
            None
        }
    };
    if !process_alive_since(pid, start_time) {
        return None;
    }
    Some(TaskProcess {
        leader: Leader::Adopted { pidfd, start_time },
        pid,
        task_dir,
        stop: None,
        reaped: false,
    })
}

fn parse_pid_file(content: &str) -> Option<(u32, u64)> {
    let mut fields = content.split_whitespace();
    let pid = fields.next()?.parse().ok()?;
    let start_time = fields.next()?.parse().ok()?;
    Some((pid, start_time))
}

/// The file a running health check writes its standard output and error to, in the task
/// directory (emptied at each check; its first [`HEALTH_OUTPUT_BYTES_MAX`] bytes are kept).
pub const HEALTH_OUTPUT_FILE: &str = "health.out";

/// The shell a health command runs with (`/bin/sh -c CMD`, docker's `CMD-SHELL`).
pub const HEALTH_SHELL: &str = "/bin/sh";

/// One run of a task's health check: `/bin/sh -c CMD`, leader of its own process group, in
/// the task's environment and working directory, its output in [`HEALTH_OUTPUT_FILE`].
/// Watched like a task (never blocks): [`HealthCheckProcess::poll`] kills its group at the
/// timeout and reaps it; dropping a running one kills its group and reaps it.
#[derive(Debug)]
pub struct HealthCheckProcess {
    child: Child,
    pid: u32,
    output_path: PathBuf,
    started_at: Instant,
    started_unix_ms: i64,
    timeout: Duration,
    timed_out: bool,
    reaped: bool,
}

/// Starts a health check of task `task_id` (whose effective spec is `spec`: its env and
/// working directory) running `command`, to be killed once `timeout` has passed.
///
/// # Errors
///
/// A [`StartError`]: the check could not start (the caller counts it as a failed check).
pub fn spawn_health_check(
    work_dir: &Path,
    task_id: &str,
    spec: &TaskSpec,
    command: &str,
    timeout: Duration,
) -> Result<HealthCheckProcess, StartError> {
    validate_task_id(task_id)?;
    let env = parse_env(&spec.env)?;
    let task_dir = task_dir(work_dir, task_id);
    let working_dir = prepare_working_dir(&task_dir, &spec.working_dir)?;
    let output_path = task_dir.join(HEALTH_OUTPUT_FILE);
    let output = File::create(&output_path).map_err(|source| StartError::TaskDir {
        path: output_path.clone(),
        source,
    })?;
    let errors = output.try_clone().map_err(|source| StartError::TaskDir {
        path: output_path.clone(),
        source,
    })?;
    let mut shell = Command::new(HEALTH_SHELL);
    shell
        .args(["-c", command])
        .env_clear()
        .envs(
            env.iter()
                .map(|(key, value)| (key.as_str(), value.as_str())),
        )
        .current_dir(&working_dir)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        .process_group(0);
    if !env.iter().any(|(key, _)| key == "PATH")
        && let Some(path) = std::env::var_os("PATH")
    {
        shell.env("PATH", path);
    }
    let child = shell.spawn().map_err(|source| StartError::Spawn {
        command: HEALTH_SHELL.to_owned(),
        source,
        exec_bytes: command.len() + 4,
    })?;
    let pid = child.id();
    assert!(pid > 1, "a spawned child is neither init nor the idle task");
    Ok(HealthCheckProcess {
        child,
        pid,
        output_path,
        started_at: Instant::now(),
        started_unix_ms: unix_now_ms(),
        timeout,
        timed_out: false,
        reaped: false,
    })
}

impl HealthCheckProcess {
    /// When the check started (agent clock).
    pub fn started_at(&self) -> Instant {
        self.started_at
    }

    /// Checks whether the check ended; kills its group once its timeout passed. Returns the
    /// result exactly once, when the shell was reaped: its exit status (-1 if it was killed
    /// at the timeout, 128 + the signal for another signal) and the first
    /// [`HEALTH_OUTPUT_BYTES_MAX`] bytes of its output. Never blocks.
    ///
    /// # Errors
    ///
    /// The OS error of `waitid(2)` or `wait(2)`.
    pub fn poll(&mut self, now: Instant) -> io::Result<Option<HealthCheckResult>> {
        assert!(!self.reaped, "poll after the result was returned");
        if !sys::exited_unreaped(self.pid)? {
            if !self.timed_out && now >= self.started_at + self.timeout {
                // Its zombie-to-be holds the group id until it is reaped: safe to signal.
                self.timed_out = true;
                kill_rest_of_group(self.pid);
            }
            return Ok(None);
        }
        kill_rest_of_group(self.pid);
        let status = self.child.wait()?;
        self.reaped = true;
        let end_ms = unix_now_ms();
        let (exit_code, output) = if self.timed_out {
            let timeout = self.timeout;
            (-1, format!("Health check exceeded timeout ({timeout:?})"))
        } else {
            let code = ExitOutcome::from_status(status).exit_code().unwrap_or(-1);
            (code, read_head(&self.output_path, HEALTH_OUTPUT_BYTES_MAX))
        };
        Ok(Some(HealthCheckResult {
            start_ms: self.started_unix_ms,
            end_ms,
            exit_code,
            output,
        }))
    }
}

impl Drop for HealthCheckProcess {
    /// A check nobody waits for any more (its task ended): kill its group and reap it.
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        kill_rest_of_group(self.pid);
        if let Err(error) = self.child.wait() {
            log::warn!("cannot reap health check {}: {error}", self.pid);
        }
    }
}

/// The first `bytes_max` bytes of `path` as text (invalid UTF-8 replaced); empty if it
/// cannot be read.
fn read_head(path: &Path, bytes_max: usize) -> String {
    use std::io::Read as _;
    let mut head = Vec::with_capacity(bytes_max.min(4096));
    if let Ok(file) = File::open(path) {
        let limit = u64::try_from(bytes_max).unwrap_or(u64::MAX);
        if let Err(error) = file.take(limit).read_to_end(&mut head) {
            log::debug!("cannot read {path:?}: {error}");
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn unix_now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bound on any wait for a process in these tests (a hang fails instead of blocking).
    const WAIT_LIMIT: Duration = Duration::from_secs(20);
    const STEP: Duration = Duration::from_millis(10);

    fn spec(command: &str, args: &[&str]) -> TaskSpec {
        TaskSpec {
            command: command.to_owned(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            ..TaskSpec::default()
        }
    }

    fn wait_exit(process: &mut TaskProcess) -> ExitOutcome {
        let give_up = Instant::now() + WAIT_LIMIT;
        while Instant::now() < give_up {
            if let Some(outcome) = process.poll(Instant::now()).expect("poll") {
                return outcome;
            }
            std::thread::sleep(STEP);
        }
        panic!("process {} did not exit", process.pid());
    }

    fn wait_for_file(path: &Path) -> String {
        let give_up = Instant::now() + WAIT_LIMIT;
        while Instant::now() < give_up {
            if let Ok(content) = fs::read_to_string(path)
                && content.ends_with('\n')
            {
                return content;
            }
            std::thread::sleep(STEP);
        }
        panic!("{path:?} was never written");
    }

    fn read_pid(path: &Path) -> u32 {
        wait_for_file(path).trim().parse().expect("a pid")
    }

    #[test]
    fn exit_statuses_are_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ok = spawn(dir.path(), "t-true", &spec("true", &[])).expect("spawn true");
        assert_eq!(wait_exit(&mut ok), ExitOutcome::Exited(0));
        let mut three =
            spawn(dir.path(), "t-three", &spec("sh", &["-c", "exit 3"])).expect("spawn sh");
        let outcome = wait_exit(&mut three);
        assert_eq!(outcome, ExitOutcome::Exited(3));
        assert_eq!(outcome.to_string(), "exited with status 3");
        assert_eq!(outcome.exit_code(), Some(3));
        assert!(!dir.path().join("t-three").join(PID_FILE).exists());
    }

    #[test]
    fn a_command_that_cannot_start_is_a_start_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = spawn(dir.path(), "t1", &spec("no-such-command-flotilla", &[]));
        let Err(StartError::Spawn { source, .. }) = &missing else {
            panic!("expected a spawn error, got {missing:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::NotFound);
        let message = missing.expect_err("missing").to_string();
        assert!(message.contains("no-such-command-flotilla"), "{message}");
        assert!(message.contains("does not exist on this node"), "{message}");
        assert!(message.contains("PATH"), "{message}");

        let script = dir.path().join("not-executable.sh");
        fs::write(&script, "#!/bin/sh\n").expect("write");
        let path = script.to_str().expect("utf-8").to_owned();
        let denied = spawn(dir.path(), "t2", &spec(&path, &[]));
        let Err(StartError::Spawn { source, .. }) = &denied else {
            panic!("expected a spawn error, got {denied:?}");
        };
        assert_eq!(source.kind(), io::ErrorKind::PermissionDenied);
        let message = denied.expect_err("denied").to_string();
        assert!(message.contains("chmod +x"), "{message}");
    }

    #[test]
    fn an_oversized_environment_is_explained_not_called_missing() {
        // One variable past Linux's 128 KiB per string (the API refuses this; an agent may
        // still meet it from a spec written by something else, or a smaller stack limit).
        let dir = tempfile::tempdir().expect("tempdir");
        let mut big = spec("true", &[]);
        big.env = vec![format!("BIG={}", "x".repeat(200 * 1024))];
        let refused = spawn(dir.path(), "t-big", &big);
        let Err(StartError::Spawn { source, .. }) = &refused else {
            panic!("expected a spawn error, got {refused:?}");
        };
        assert_eq!(source.raw_os_error(), Some(libc::E2BIG));
        let message = refused.expect_err("too big").to_string();
        assert!(message.contains("too large"), "{message}");
        assert!(message.contains("(204,8"), "{message}");
        assert!(!message.contains("exists"), "{message}");
    }

    #[test]
    fn bad_specs_are_refused_before_spawning() {
        let dir = tempfile::tempdir().expect("tempdir");
        for id in ["", "..", "../x", "a/b", ".hidden"] {
            assert!(matches!(
                spawn(dir.path(), id, &spec("true", &[])),
                Err(StartError::InvalidTaskId(_))
            ));
        }
        assert!(matches!(
            spawn(dir.path(), "t", &spec("", &[])),
            Err(StartError::NoCommand)
        ));
        let mut bad_env = spec("true", &[]);
        bad_env.env = vec!["A=1".into(), "NOEQUALS".into()];
        assert!(matches!(
            spawn(dir.path(), "t", &bad_env),
            Err(StartError::BadEnv { index: 1, .. })
        ));
        let mut relative = spec("true", &[]);
        relative.working_dir = "relative/dir".into();
        assert!(matches!(
            spawn(dir.path(), "t", &relative),
            Err(StartError::BadWorkingDir(_))
        ));
    }

    #[test]
    fn env_working_dir_and_output_reach_the_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = tempfile::tempdir().expect("tempdir");
        let out_path = out.path().to_str().expect("utf-8");
        let mut task = spec(
            "sh",
            &[
                "-c",
                "env > \"$OUT/env.txt\"; pwd > \"$OUT/pwd.txt\"; echo hello; echo oops >&2",
            ],
        );
        task.env = vec![format!("OUT={out_path}"), "GREETING=a=b c".into()];
        task.working_dir = out_path.to_owned();
        let mut process = spawn(dir.path(), "t-env", &task).expect("spawn");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Exited(0));

        let env = fs::read_to_string(out.path().join("env.txt")).expect("env.txt");
        let lines: Vec<&str> = env.lines().collect();
        assert!(lines.contains(&"GREETING=a=b c"), "{env}");
        assert!(lines.contains(&format!("OUT={out_path}").as_str()), "{env}");
        let agent_path = std::env::var("PATH").expect("the test runs with a PATH");
        assert!(
            lines.contains(&format!("PATH={agent_path}").as_str()),
            "{env}"
        );
        for (key, _) in std::env::vars() {
            if !matches!(key.as_str(), "PATH" | "PWD" | "SHLVL" | "_" | "OLDPWD") {
                assert!(
                    !lines
                        .iter()
                        .any(|line| line.starts_with(&format!("{key}="))),
                    "the agent's {key} leaked into the task: {env}"
                );
            }
        }
        let pwd = fs::read_to_string(out.path().join("pwd.txt")).expect("pwd.txt");
        let canonical = out.path().canonicalize().expect("canonical");
        assert_eq!(
            Path::new(pwd.trim()).canonicalize().expect("pwd"),
            canonical
        );

        let task_dir = task_dir(dir.path(), "t-env");
        let stdout = fs::read_to_string(task_dir.join(STDOUT_LOG_FILE)).expect("stdout");
        assert_eq!(stdout, "hello\n");
        let stderr = fs::read_to_string(task_dir.join(STDERR_LOG_FILE)).expect("stderr");
        assert_eq!(stderr, "oops\n");
    }

    #[test]
    fn a_task_without_working_dir_runs_in_its_task_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut process = spawn(dir.path(), "t-pwd", &spec("pwd", &[])).expect("spawn");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Exited(0));
        let task_dir = task_dir(dir.path(), "t-pwd");
        let stdout = fs::read_to_string(task_dir.join(STDOUT_LOG_FILE)).expect("stdout");
        let expected = task_dir
            .join(DEFAULT_WORKING_DIR)
            .canonicalize()
            .expect("work");
        assert_eq!(
            Path::new(stdout.trim()).canonicalize().expect("pwd"),
            expected
        );
    }

    #[test]
    fn a_stop_terminates_the_process_and_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let child_pid_file = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", child_pid_file.display());
        let mut process =
            spawn(dir.path(), "t-group", &spec("sh", &["-c", &script])).expect("spawn");
        let grandchild = read_pid(&child_pid_file);
        assert!(
            !sys::process_dead(grandchild),
            "the grandchild runs before the stop"
        );
        process
            .begin_stop(Instant::now(), Duration::from_secs(20))
            .expect("stop");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Signaled(sys::SIGTERM));
        assert!(!process.was_killed());
        assert!(sys::process_dead(process.pid()));
        assert!(
            sys::wait_dead(grandchild, WAIT_LIMIT),
            "the grandchild survived the stop"
        );
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let script = format!("trap '' TERM; echo $$ > {}; sleep 30", ready.display());
        let mut process =
            spawn(dir.path(), "t-stubborn", &spec("sh", &["-c", &script])).expect("spawn");
        // The trap must be in place before the signal, or SIGTERM would simply work.
        read_pid(&ready);
        process
            .begin_stop(Instant::now(), Duration::from_millis(200))
            .expect("stop");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Signaled(sys::SIGKILL));
        assert!(process.was_killed());
        assert!(sys::process_dead(process.pid()));
    }

    #[test]
    fn survivors_of_a_group_die_with_its_leader() {
        let dir = tempfile::tempdir().expect("tempdir");
        let child_pid_file = dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}", child_pid_file.display());
        let mut process =
            spawn(dir.path(), "t-orphan", &spec("sh", &["-c", &script])).expect("spawn");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Exited(0));
        let grandchild = read_pid(&child_pid_file);
        assert!(
            sys::wait_dead(grandchild, WAIT_LIMIT),
            "the background child outlived its task"
        );
    }

    #[test]
    fn logs_past_their_cap_are_rotated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        let script = format!(
            "head -c 10000 /dev/zero; echo $$ > {}; sleep 30",
            ready.display()
        );
        let mut process =
            spawn(dir.path(), "t-logs", &spec("sh", &["-c", &script])).expect("spawn");
        read_pid(&ready);
        let task_dir = task_dir(dir.path(), "t-logs");
        process.cap_logs(20_000).expect("cap");
        assert_eq!(
            fs::metadata(task_dir.join(STDOUT_LOG_FILE))
                .expect("log")
                .len(),
            10_000
        );
        process.cap_logs(1_000).expect("cap");
        assert_eq!(
            fs::metadata(task_dir.join(STDOUT_LOG_FILE))
                .expect("log")
                .len(),
            0
        );
        let rotated = task_dir.join(format!("{STDOUT_LOG_FILE}.1"));
        assert_eq!(fs::metadata(rotated).expect("rotated").len(), 10_000);
        process
            .begin_stop(Instant::now(), Duration::from_secs(20))
            .expect("stop");
        wait_exit(&mut process);
    }

    /// Starts `sleep 300` as the leader of its own group whose parent exits at once (as
    /// if the agent that started it had died), with a pid file as `spawn` writes it; returns
    /// its pid.
    pub(crate) fn orphan_task(work_dir: &Path, task_id: &str) -> u32 {
        let task_dir = task_dir(work_dir, task_id);
        fs::create_dir_all(&task_dir).expect("task dir");
        let pid_path = work_dir.join(format!("{task_id}.pid"));
        let script = format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 300' >/dev/null 2>&1 &",
            pid_path.display()
        );
        let status = Command::new("sh")
            .args(["-c", &script])
            .status()
            .expect("sh");
        assert!(status.success());
        let pid = read_pid(&pid_path);
        // The pid file is written once the leader runs `sleep` (same process, same start time).
        let start_time = process_start_time(pid).expect("start time");
        fs::write(task_dir.join(PID_FILE), format!("{pid} {start_time}\n")).expect("pid file");
        pid
    }

    #[test]
    fn leftovers_of_a_previous_run_are_adopted_unless_their_pid_was_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut reused = spawn(dir.path(), "t-reused", &spec("sleep", &["30"])).expect("spawn");
        let reused_pid_file = task_dir(dir.path(), "t-reused").join(PID_FILE);
        // A start time that is not this process's: its pid was reused since.
        fs::write(&reused_pid_file, format!("{} 1\n", reused.pid())).expect("write");
        let gone_dir = task_dir(dir.path(), "t-gone");
        fs::create_dir_all(&gone_dir).expect("dir");
        fs::write(gone_dir.join(PID_FILE), "999999999 5\n").expect("write");
        let orphan = orphan_task(dir.path(), "t-orphan");

        let mut adopted = adopt_leftovers(dir.path()).expect("scan");
        assert_eq!(adopted.len(), 1, "{adopted:?}");
        let Adopted {
            task_id,
            mut process,
        } = adopted.pop().expect("one");
        assert_eq!(task_id, "t-orphan");
        assert_eq!(process.pid(), orphan);
        assert!(process.is_adopted());
        assert!(!reused_pid_file.exists());
        assert!(!gone_dir.join(PID_FILE).exists());
        assert!(
            reused.poll(Instant::now()).expect("poll").is_none(),
            "a reused pid was touched"
        );
        assert!(
            process.poll(Instant::now()).expect("poll").is_none(),
            "the adopted process runs"
        );
        assert!(!sys::process_dead(orphan));

        // Stopped like any task; its end is seen although it is not our child.
        process
            .begin_stop(Instant::now(), Duration::from_secs(20))
            .expect("stop");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Unknown);
        assert!(sys::wait_dead(orphan, WAIT_LIMIT));
        assert!(!task_dir(dir.path(), "t-orphan").join(PID_FILE).exists());
        reused
            .begin_stop(Instant::now(), Duration::from_secs(20))
            .expect("stop");
        wait_exit(&mut reused);
    }

    #[test]
    fn an_adopted_process_that_exits_on_its_own_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let orphan = orphan_task(dir.path(), "t-ends");
        let mut adopted = adopt_leftovers(dir.path()).expect("scan");
        let mut process = adopted.pop().expect("adopted").process;
        sys::signal_group(orphan, sys::SIGKILL).expect("kill");
        assert_eq!(wait_exit(&mut process), ExitOutcome::Unknown);
        assert!(!process.was_killed());
    }

    #[test]
    fn dropping_a_live_process_kills_and_reaps_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let process = spawn(dir.path(), "t-drop", &spec("sleep", &["30"])).expect("spawn");
        let pid = process.pid();
        drop(process);
        // Reaped, not a zombie: the pid is gone entirely (unless already reused).
        assert!(sys::process_dead(pid));
    }

    fn wait_check(check: &mut HealthCheckProcess) -> HealthCheckResult {
        let give_up = Instant::now() + WAIT_LIMIT;
        while Instant::now() < give_up {
            if let Some(result) = check.poll(Instant::now()).expect("poll") {
                return result;
            }
            std::thread::sleep(STEP);
        }
        panic!("health check {} did not end", check.pid);
    }

    #[test]
    fn a_health_check_runs_in_the_tasks_env_and_dir_and_keeps_its_output_head() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work = tempfile::tempdir().expect("tempdir");
        let mut task = spec("true", &[]);
        task.env = vec!["GREETING=hi".into()];
        task.working_dir = work.path().to_str().expect("utf-8").to_owned();
        let command =
            "echo \"$GREETING from $(pwd)\"; echo oops >&2; head -c 10000 /dev/zero; exit 3";
        let mut check = spawn_health_check(
            dir.path(),
            "t-check",
            &task,
            command,
            Duration::from_secs(20),
        )
        .expect("spawn");
        let result = wait_check(&mut check);
        assert_eq!(result.exit_code, 3);
        let canonical = work.path().canonicalize().expect("canonical");
        assert!(
            result
                .output
                .starts_with(&format!("hi from {}\noops\n", canonical.display()))
                || result
                    .output
                    .starts_with(&format!("hi from {}\noops\n", work.path().display())),
            "{:?}",
            &result.output[..64.min(result.output.len())]
        );
        assert_eq!(result.output.len(), HEALTH_OUTPUT_BYTES_MAX);
        assert!(result.end_ms >= result.start_ms);

        let mut passing = spawn_health_check(
            dir.path(),
            "t-check",
            &task,
            "exit 0",
            Duration::from_secs(20),
        )
        .expect("spawn");
        assert_eq!(wait_check(&mut passing).exit_code, 0);
    }

    #[test]
    fn a_health_check_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let child_pid_file = dir.path().join("child.pid");
        let command = format!("sleep 30 & echo $! > {}; wait", child_pid_file.display());
        let mut check = spawn_health_check(
            dir.path(),
            "t-hang",
            &spec("true", &[]),
            &command,
            Duration::from_millis(300),
        )
        .expect("spawn");
        let grandchild = read_pid(&child_pid_file);
        let result = wait_check(&mut check);
        assert_eq!(result.exit_code, -1);
        assert!(
            result.output.contains("exceeded timeout"),
            "{}",
            result.output
        );
        assert!(
            sys::wait_dead(grandchild, WAIT_LIMIT),
            "the check's child survived"
        );
    }
}
