//! The local task manager (swarmkit's agent worker): makes the processes of this node match
//! the tasks assigned to it, and reports every change of their state.
//!
//! Owns the node's assigned tasks, their [`TaskProcess`]es and the `agent-tasks` thread, the
//! only thread that touches them. Must never block on its callers or its reporter (the
//! dispatcher session feeding it and carrying its reports may be slow or reconnecting), never
//! start a task id twice (restarts are the orchestrator's, through a new task), never drop a
//! task's terminal status, and never leave a process of its own unreaped or running after
//! [`TaskRunner::shutdown`].
//!
//! **Inputs.** [`TaskRunner::assign_part`] (a part of the complete set of this node's tasks;
//! [`TaskRunner::assign`] is a set in one part) and [`TaskRunner::update`] (changes and
//! removals) never lose anything: they merge into a mailbox and wake the thread through a
//! 1-slot channel; the thread takes the whole mailbox at each turn. A complete set may
//! arrive in any number of parts: the thread applies each part as it comes (starting what
//! it names), remembers which tasks the set named, and stops and forgets the others only
//! once the last part arrived, so a set of any size is taken part by part and a task in a
//! later part is never stopped for being absent from an earlier one. A first part replaces
//! everything waiting; an update while a set is being received folds into it. The mailbox
//! holds at most [`ASSIGNMENT_TASKS_MAX`] tasks (or one delivery of any size when empty): a
//! caller with more waits until the thread has taken what waits (at most
//! [`ASSIGNMENT_ROOM_WAIT`]), which pushes back on the session stream instead of refusing
//! the set (before, a set past 10,000 tasks was refused whole, forever).
//!
//! **Reconcile rule**, per task, each time it is assigned or changes:
//! - desired RUNNING, never started here, status not terminal → start it (reports STARTING,
//!   then RUNNING with the pid, or REJECTED if it cannot start);
//! - desired past RUNNING (SHUTDOWN, REMOVE…) while its process runs → stop it (SIGTERM to its
//!   process group, SIGKILL after `stop_grace`) → SHUTDOWN;
//! - desired past RUNNING, never started, status not terminal → SHUTDOWN (without starting);
//! - status already terminal, or already finished here → nothing;
//! - started by a previous run of the agent whose process still runs (its `pid` file names a
//!   live process with the recorded start time) → adopted at start
//!   ([`executor::adopt_leftovers`]): it stays RUNNING (reported again, with its pid) and is
//!   watched and stopped like the others; if the first complete set does not name it, it is
//!   stopped; if its assigned status is already terminal, it is stopped (the managers count
//!   it finished and may have replaced it);
//! - desired RUNNING, never started in this run, not adopted, but its status says it
//!   started, or its task directory exists (a previous run of the agent started it and its
//!   process is gone) → FAILED: it ended while no agent watched it;
//! - absent from a full set, or removed → stopped if running, then forgotten: its task
//!   directory (logs included) is deleted and its id is remembered
//!   ([`FORGOTTEN_IDS_MAX`] most recent) so that it is never started again.
//!
//! **Fencing.** The session gives the runner a deadline ([`TaskRunner::set_fence_deadline`],
//! moved forward at each contact with the managers; see `agent::session` for the rule). The
//! thread checks it at every turn (every `exit_poll_period` while a process lives: it never
//! waits on the network, unlike the session's threads); once it passed, it stops every live
//! process (SIGTERM, SIGKILL after [`FENCE_KILL_GRACE`]) and reports each FAILED with the
//! reason; while fenced no task starts (a task assigned meanwhile waits, idle). A later
//! deadline lifts the fence: tasks still wanted running and never started here start then;
//! a fenced task is never started again (its id ran once).
//!
//! **Exits** are found by polling: every `exit_poll_period` (50 ms) while a process lives, the
//! thread asks the kernel about each live leader without blocking (`waitid` `WNOHANG`); with
//! at most `tasks_running_max` (256) processes this costs little, needs no thread per task and
//! no process-wide SIGCHLD handler, and bounds the delay of an exit report by the period.
//!
//! **Resync.** [`TaskRunner::resync_reports`] (called by the session on each new session)
//! has the thread report again the latest status of every task it holds, so a manager that
//! missed a report (a previous leader, a lost session) learns it; the dispatcher ignores a
//! status equal to or behind the recorded one, so a repeat never moves a task backwards.
//!
//! **Reports** go to the caller's bounded channel with `try_send`. When it is full, the report
//! waits in a map keeping only the latest status per task (a task's terminal status is always
//! its latest, so it is never lost), retried every turn; a task with a report waiting never
//! overtakes it. Reports still waiting when the runner stops are returned by
//! [`TaskRunner::shutdown`].
//!
//! **Limits.** [`TASKS_RUNNING_MAX_DEFAULT`] processes at once (configurable; past it a task
//! is REJECTED), [`TASKS_TRACKED_MAX`] tasks held, [`ASSIGNMENT_TASKS_MAX`] tasks waiting in the
//! mailbox, [`FORGOTTEN_IDS_MAX`] forgotten ids, log files as in [`executor`]. The agent's
//! process must not set SIGCHLD to "ignore" (the kernel would reap the children itself and no
//! exit status could be reported).
//!
//! **Glue** (the dispatcher session, on its own thread; `TaskRunner` is `Send + Sync`):
//!
//! ```text
//! let (reports_tx, reports_rx) = crossbeam_channel::bounded(REPORTS_QUEUE_LEN_DEFAULT);
//! let runner = TaskRunner::start(RunnerConfig::new(state_dir.join("tasks")), reports_tx)?;
//! // each assignments message:  a part of a complete set → runner.assign_part(tasks, first, last)?
//! //                            INCREMENTAL              → runner.update(changed, removed_ids)?
//! // a reporter loop: batch reports_rx.recv() into UpdateTaskStatus calls; on a failed call,
//! //   keep the batch (latest status per task) and retry after reconnecting.
//! // stop: for report in runner.shutdown() { send it, or drop it knowingly }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use parking_lot::{Condvar, Mutex};

use crate::agent::endpoints::EndpointPublisher;
use crate::agent::executor::{self, ExitOutcome, HealthCheckProcess, TaskProcess};
use crate::agent::health::{CheckEnd, HealthMonitor};
use crate::agent::limits::Limiter;
use crate::agent::values::TaskValues;
use crate::health::HealthSettings;
use crate::proto::objects::{
    HealthCheckResult, HealthStatus, Task, TaskHealth, TaskSpec, TaskState, TaskStatus,
};

/// How many task processes run at once on a node unless configured otherwise; a task that
/// would exceed it is REJECTED (the scheduler should have placed it elsewhere).
pub const TASKS_RUNNING_MAX_DEFAULT: usize = 256;

/// Most tasks waiting in the mailbox (parts of a complete set plus changes); a delivery
/// that would exceed it waits for the thread to take what waits (a delivery to an empty
/// mailbox is taken whatever its size: the caller holds it in memory already).
pub const ASSIGNMENT_TASKS_MAX: usize = 10_000;

/// How long a delivery waits for room in the mailbox before it is refused with
/// [`AssignError::TooManyTasks`]: the thread takes the mailbox at every turn (a turn starts
/// at most `tasks_running_max` processes), so only a wedged runner makes a caller wait this
/// long.
pub const ASSIGNMENT_ROOM_WAIT: Duration = Duration::from_secs(60);

/// Most tasks the runner holds; a new task past it is REJECTED without being held.
pub const TASKS_TRACKED_MAX: usize = ASSIGNMENT_TASKS_MAX;

/// How many forgotten task ids are remembered, so that a removed task assigned again is not
/// started again (oldest forgotten first).
pub const FORGOTTEN_IDS_MAX: usize = 10_000;

/// How often the thread looks for exits and sends due SIGKILLs while a process lives.
pub const EXIT_POLL_PERIOD_DEFAULT: Duration = Duration::from_millis(50);

/// How often log files of live tasks are checked against their cap.
pub const LOG_CHECK_PERIOD: Duration = Duration::from_secs(1);

/// How long a stopping runner keeps offering the reports its channel had no room for (the
/// rest are returned by [`TaskRunner::shutdown`]).
pub const SHUTDOWN_REPORTS_WAIT: Duration = Duration::from_secs(1);

/// How long the thread sleeps when no process lives and no report waits.
const IDLE_WAKE_PERIOD: Duration = Duration::from_secs(1);

/// A bound that suits the caller's report channel: a full assignment's burst of starts
/// (STARTING and RUNNING per task) fits in it.
pub const REPORTS_QUEUE_LEN_DEFAULT: usize = 2 * TASKS_RUNNING_MAX_DEFAULT;

/// The thread's name.
pub const THREAD_NAME: &str = "agent-tasks";
/// Time between SIGTERM and SIGKILL for a task stopped by a fence (at most its stop grace):
/// short, so that it is gone well within the fence's margin.
pub const FENCE_KILL_GRACE: Duration = Duration::from_secs(1);

/// The runner's settings.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Where task directories live (`<work_dir>/<task id>/`); created if missing.
    pub work_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL when a task is stopped.
    pub stop_grace: Duration,
    /// Most task processes running at once.
    pub tasks_running_max: usize,
    /// Size at which a task's `stdout.log` or `stderr.log` is rotated (see [`executor`]).
    pub log_file_bytes_max: u64,
    /// How often live processes are checked for an exit.
    pub exit_poll_period: Duration,
    /// Publishes the endpoints of running tasks attached to networks (none: nothing is
    /// published).
    pub endpoints: Option<Arc<EndpointPublisher>>,
    /// `KEY=VALUE` entries added to every task's environment unless its spec sets the key
    /// (the node's resolver, `FLOTILLA_DNS`).
    pub task_env: Vec<String>,
    /// The secret and config values the managers sent, written as files for each task that
    /// reads them (see [`crate::agent::values`]).
    pub values: Arc<TaskValues>,
}

impl RunnerConfig {
    /// The defaults, with task directories under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        let work_dir = work_dir.into();
        RunnerConfig {
            values: Arc::new(TaskValues::for_work_dir(&work_dir)),
            work_dir,
            stop_grace: executor::STOP_GRACE_DEFAULT,
            tasks_running_max: TASKS_RUNNING_MAX_DEFAULT,
            log_file_bytes_max: executor::LOG_FILE_BYTES_MAX_DEFAULT,
            exit_poll_period: EXIT_POLL_PERIOD_DEFAULT,
            endpoints: None,
            task_env: Vec::new(),
        }
    }
}

/// One change of a task's state, for the managers (`UpdateTaskStatus`).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskStatusReport {
    /// The task.
    pub task_id: String,
    /// Its new status (`timestamp_ms`: when the agent saw it).
    pub status: TaskStatus,
}

/// Why the runner could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    /// The work directory could not be created.
    #[error(
        "cannot create the agent's work directory {path:?}: {source}; check its parent's permissions and free space"
    )]
    WorkDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The thread could not be spawned.
    #[error("cannot spawn the {THREAD_NAME} thread: {0}; the host is out of threads or memory")]
    Thread(std::io::Error),
}

/// Why an assignment was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AssignError {
    /// The mailbox stayed too full to take the delivery for [`ASSIGNMENT_ROOM_WAIT`].
    #[error(
        "{tasks} tasks would wait for the task runner, more than {ASSIGNMENT_TASKS_MAX}, and it \
         took nothing for {ASSIGNMENT_ROOM_WAIT:?}; the runner is stuck: restart the agent"
    )]
    TooManyTasks {
        /// How many would have waited.
        tasks: usize,
    },
    /// The runner is stopping or its thread died.
    #[error("the task runner is stopped; start a new one")]
    Stopped,
}

/// Handle to the `agent-tasks` thread. Dropping it runs [`TaskRunner::shutdown`].
#[derive(Debug)]
pub struct TaskRunner {
    tasks_running_max: usize,
    mailbox: Arc<Shared>,
    wake: Sender<()>,
    thread: Mutex<Option<JoinHandle<Vec<TaskStatusReport>>>>,
}

/// The mailbox and the signal that the thread took it (callers waiting for room wait on it).
#[derive(Debug, Default)]
struct Shared {
    mailbox: Mutex<Mailbox>,
    taken: Condvar,
}

/// What the callers handed over since the thread last looked.
#[derive(Debug, Default)]
struct Mailbox {
    /// The parts of a complete set waiting (later updates folded in) start a new set.
    set_begins: bool,
    /// Tasks of the complete set being received, not yet taken by the thread.
    set: BTreeMap<String, Task>,
    /// Ids removed by an update while the set was being received.
    set_removed: BTreeSet<String>,
    /// The set's last part arrived: once the thread applied what waits, the tasks the set
    /// did not name are stopped and forgotten.
    set_ends: bool,
    /// A set is being received: its first part came, its last not yet.
    set_open: bool,
    /// Changes (`Some`) and removals (`None`) on top of what the thread holds.
    changes: BTreeMap<String, Option<Task>>,
    /// Report every held task's latest status again (a new session began).
    resync: bool,
    /// A new fence deadline, and why the tasks stop if it passes.
    fence_deadline: Option<(Instant, String)>,
    shutdown: bool,
    /// Values received for tasks not yet handed over (they move to `values` with them).
    staged_values: Values,
    /// Values for the tasks waiting here, taken with them.
    values: Values,
}

/// Secret and config values (their Debug never shows a secret's value: see `SecretSpec`).
#[derive(Debug, Default)]
struct Values {
    secrets: Vec<crate::proto::objects::Secret>,
    configs: Vec<crate::proto::objects::Config>,
}

/// What the thread takes from the mailbox at one turn.
#[derive(Debug, Default)]
struct Delivery {
    set_begins: bool,
    set: BTreeMap<String, Task>,
    set_removed: BTreeSet<String>,
    set_ends: bool,
    changes: BTreeMap<String, Option<Task>>,
    values: Values,
}

impl Mailbox {
    /// The staged values go with the tasks being handed over now.
    fn release_values(&mut self) {
        let staged = std::mem::take(&mut self.staged_values);
        self.values.secrets.extend(staged.secrets);
        self.values.configs.extend(staged.configs);
    }

    fn tasks(&self) -> usize {
        self.set.len() + self.set_removed.len() + self.changes.len()
    }

    /// True if `incoming` more tasks may wait now.
    fn has_room_for(&self, incoming: usize) -> bool {
        let waiting = self.tasks();
        waiting == 0 || waiting + incoming <= ASSIGNMENT_TASKS_MAX
    }

    /// A part of a complete set: `first` starts a new one (replacing everything waiting),
    /// `last` ends it. A continuation without a set being received is taken as changes.
    fn assign_part(&mut self, tasks: Vec<Task>, first: bool, last: bool) {
        self.release_values();
        if first {
            self.set_begins = true;
            self.set.clear();
            self.set_removed.clear();
            self.set_ends = false;
            self.changes.clear();
            self.set_open = true;
        } else if !self.set_open {
            log::warn!("agent: a part of an assignment set without its start; taken as changes");
            self.update(tasks, Vec::new());
            return;
        }
        self.set
            .extend(tasks.into_iter().map(|task| (task.id.clone(), task)));
        if last {
            self.set_open = false;
            self.set_ends = true;
        }
    }

    /// Changes fold into a set being received (which stays complete), else into the changes.
    fn update(&mut self, changed: Vec<Task>, removed: Vec<String>) {
        self.release_values();
        if self.set_open {
            for task in changed {
                self.set_removed.remove(&task.id);
                self.set.insert(task.id.clone(), task);
            }
            for id in removed {
                self.set.remove(&id);
                self.set_removed.insert(id);
            }
            return;
        }
        for task in changed {
            self.changes.insert(task.id.clone(), Some(task));
        }
        for id in removed {
            self.changes.insert(id, None);
        }
    }

    /// Everything waiting, for the thread (a set being received stays open).
    fn take(&mut self) -> Delivery {
        Delivery {
            set_begins: std::mem::take(&mut self.set_begins),
            set: std::mem::take(&mut self.set),
            set_removed: std::mem::take(&mut self.set_removed),
            set_ends: std::mem::take(&mut self.set_ends),
            changes: std::mem::take(&mut self.changes),
            values: std::mem::take(&mut self.values),
        }
    }
}

impl Shared {
    /// Locks the mailbox once it has room for `incoming` tasks (a first part makes its own
    /// room: it replaces what waits), waiting at most [`ASSIGNMENT_ROOM_WAIT`].
    fn lock_with_room(
        &self,
        incoming: usize,
        replaces_waiting: bool,
    ) -> Result<parking_lot::MutexGuard<'_, Mailbox>, AssignError> {
        let deadline = Instant::now() + ASSIGNMENT_ROOM_WAIT;
        let mut mailbox = self.mailbox.lock();
        loop {
            if mailbox.shutdown {
                return Err(AssignError::Stopped);
            }
            if replaces_waiting || mailbox.has_room_for(incoming) {
                return Ok(mailbox);
            }
            if self.taken.wait_until(&mut mailbox, deadline).timed_out() {
                return Err(AssignError::TooManyTasks {
                    tasks: mailbox.tasks() + incoming,
                });
            }
        }
    }
}

impl TaskRunner {
    /// Creates the work directory, kills the process groups a previous run of the agent left
    /// there, and starts the `agent-tasks` thread, which sends every status change to
    /// `reports` (see the module doc for what happens when it is full).
    ///
    /// # Errors
    ///
    /// [`RunnerError`]: the work directory or the thread could not be created.
    pub fn start(
        config: RunnerConfig,
        reports: Sender<TaskStatusReport>,
    ) -> Result<TaskRunner, RunnerError> {
        assert!(
            config.tasks_running_max > 0,
            "a node runs at least one task"
        );
        assert!(
            !config.exit_poll_period.is_zero(),
            "a zero poll period would spin"
        );
        fs::create_dir_all(&config.work_dir).map_err(|source| RunnerError::WorkDir {
            path: config.work_dir.clone(),
            source,
        })?;
        let adopted = executor::adopt_leftovers(&config.work_dir).unwrap_or_else(|error| {
            log::warn!("cannot look for processes left by a previous agent: {error}");
            Vec::new()
        });
        if !adopted.is_empty() {
            log::info!(
                "adopted {} task processes a previous run of the agent left running",
                adopted.len()
            );
        }
        let tasks_running_max = config.tasks_running_max;
        let values = Arc::clone(&config.values);
        if !values.on_tmpfs() {
            log::warn!(
                "agent: no tmpfs at {}: secrets are written for their tasks under {:?}, on \
                 disk, while the tasks run",
                crate::agent::values::TMPFS_DIR,
                values.root()
            );
        }
        let mailbox = Arc::new(Shared::default());
        // One slot: a wake-up pending is all the thread needs to know.
        let (wake, woken) = crossbeam_channel::bounded(1);
        let mut worker = Worker::new(config, Arc::clone(&mailbox), Reporter::new(reports));
        for leftover in adopted {
            worker.adopt(leftover);
        }
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || worker.run(&woken))
            .map_err(RunnerError::Thread)?;
        Ok(TaskRunner {
            tasks_running_max,
            mailbox,
            wake,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The most task processes this runner runs at once (reported to the managers, whose
    /// scheduler assigns no more).
    pub fn tasks_running_max(&self) -> usize {
        self.tasks_running_max
    }

    /// Holds the secret and config values the managers sent with tasks until the tasks
    /// themselves are handed over ([`TaskRunner::assign_part`], [`TaskRunner::update`]): the
    /// thread takes both at once, so a value is there when its task starts and is never
    /// forgotten before its task is held.
    pub fn receive_values(
        &self,
        secrets: Vec<crate::proto::objects::Secret>,
        configs: Vec<crate::proto::objects::Config>,
    ) {
        let mut mailbox = self.mailbox.mailbox.lock();
        mailbox.staged_values.secrets.extend(secrets);
        mailbox.staged_values.configs.extend(configs);
    }

    /// Hands over the complete set of tasks assigned to this node in one part: tasks not in
    /// it are stopped and forgotten. Replaces whatever the thread has not taken yet.
    ///
    /// # Errors
    ///
    /// [`AssignError::Stopped`].
    pub fn assign(&self, full: Vec<Task>) -> Result<(), AssignError> {
        self.assign_part(full, true, true)
    }

    /// Hands over a part of the complete set of tasks assigned to this node: `first` starts
    /// a new set (what waits is replaced), `last` ends it; once the last part is applied,
    /// tasks the set did not name are stopped and forgotten. Waits for room in the mailbox
    /// (see [`ASSIGNMENT_TASKS_MAX`]).
    ///
    /// # Errors
    ///
    /// [`AssignError::TooManyTasks`] if no room came within [`ASSIGNMENT_ROOM_WAIT`];
    /// [`AssignError::Stopped`].
    pub fn assign_part(
        &self,
        tasks: Vec<Task>,
        first: bool,
        last: bool,
    ) -> Result<(), AssignError> {
        self.mailbox
            .lock_with_room(tasks.len(), first)?
            .assign_part(tasks, first, last);
        self.wake_thread()
    }

    /// Hands over changed (or new) tasks and the ids of removed ones (stopped if running, then
    /// forgotten). Waits for room in the mailbox (see [`ASSIGNMENT_TASKS_MAX`]).
    ///
    /// # Errors
    ///
    /// [`AssignError::TooManyTasks`] if no room came within [`ASSIGNMENT_ROOM_WAIT`] (nothing
    /// is applied); [`AssignError::Stopped`].
    pub fn update(&self, changed: Vec<Task>, removed: Vec<String>) -> Result<(), AssignError> {
        self.mailbox
            .lock_with_room(changed.len() + removed.len(), false)?
            .update(changed, removed);
        self.wake_thread()
    }

    /// Unless a later deadline comes first, every running task is stopped at `deadline`
    /// (SIGTERM, SIGKILL after [`FENCE_KILL_GRACE`]) and reported FAILED saying `why`, and
    /// none starts until a later deadline is set (which lifts the fence). For an agent out
    /// of contact with the managers for so long that they may give its tasks to other
    /// nodes: a task must not run twice. No deadline until the first call.
    ///
    /// # Errors
    ///
    /// [`AssignError::Stopped`].
    pub fn set_fence_deadline(&self, deadline: Instant, why: String) -> Result<(), AssignError> {
        {
            let mut mailbox = self.mailbox.mailbox.lock();
            if mailbox.shutdown {
                return Err(AssignError::Stopped);
            }
            mailbox.fence_deadline = Some((deadline, why));
        }
        self.wake_thread()
    }

    /// Has the thread report the latest status of every task it holds again (a new session
    /// began: its manager may have missed reports).
    ///
    /// # Errors
    ///
    /// [`AssignError::Stopped`].
    pub fn resync_reports(&self) -> Result<(), AssignError> {
        {
            let mut mailbox = self.mailbox.mailbox.lock();
            if mailbox.shutdown {
                return Err(AssignError::Stopped);
            }
            mailbox.resync = true;
        }
        self.wake_thread()
    }

    fn wake_thread(&self) -> Result<(), AssignError> {
        match self.wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => Ok(()),
            Err(TrySendError::Disconnected(())) => Err(AssignError::Stopped),
        }
    }

    /// Stops every running task (SIGTERM to each group, SIGKILL after the grace period),
    /// reports SHUTDOWN for each, and joins the thread. Returns the reports the channel had no
    /// room for (the caller forwards them or gives up on them knowingly).
    pub fn shutdown(self) -> Vec<TaskStatusReport> {
        self.stop()
    }

    /// [`TaskRunner::shutdown`] through a shared handle: later calls (and assignments)
    /// find the runner stopped.
    pub fn stop(&self) -> Vec<TaskStatusReport> {
        let Some(thread) = self.thread.lock().take() else {
            return Vec::new();
        };
        self.mailbox.mailbox.lock().shutdown = true;
        self.mailbox.taken.notify_all();
        // Full: a wake-up is pending already. Disconnected: the thread is gone.
        let _ = self.wake.try_send(());
        match thread.join() {
            Ok(unsent) => unsent,
            Err(_) => {
                log::error!("the {THREAD_NAME} thread panicked; its processes were killed");
                Vec::new()
            }
        }
    }
}

impl Drop for TaskRunner {
    fn drop(&mut self) {
        let unsent = self.stop();
        if !unsent.is_empty() {
            log::warn!(
                "{} task status reports dropped with the task runner",
                unsent.len()
            );
        }
    }
}

/// Sends reports without ever blocking; keeps the latest per task when the channel is full.
#[derive(Debug)]
struct Reporter {
    reports: Sender<TaskStatusReport>,
    /// Reports the channel had no room for, latest per task.
    waiting: BTreeMap<String, TaskStatus>,
}

impl Reporter {
    fn new(reports: Sender<TaskStatusReport>) -> Self {
        Reporter {
            reports,
            waiting: BTreeMap::new(),
        }
    }

    fn report(&mut self, task_id: &str, status: TaskStatus) {
        if let Some(older) = self.waiting.get_mut(task_id) {
            // Never overtake a report of the same task; the newer status supersedes it, unless
            // the older one is terminal. A task reaches a terminal state once per id, so that
            // takes an id forgotten (its memory evicted) and assigned again while its last
            // report still waits: the first end is the one the managers must see.
            if is_terminal(older.state) {
                log::error!("task {task_id}: status {status:?} after a terminal one; dropped");
            } else {
                *older = status;
            }
            return;
        }
        let report = TaskStatusReport {
            task_id: task_id.to_owned(),
            status,
        };
        match self.reports.try_send(report) {
            Ok(()) => {}
            // Disconnected too: kept, so shutdown can hand it back.
            Err(TrySendError::Full(report) | TrySendError::Disconnected(report)) => {
                self.waiting.insert(report.task_id, report.status);
            }
        }
    }

    /// Retries the waiting reports until the channel is full again.
    fn flush(&mut self) {
        while let Some((task_id, status)) = self.waiting.pop_first() {
            let report = TaskStatusReport { task_id, status };
            if let Err(TrySendError::Full(report) | TrySendError::Disconnected(report)) =
                self.reports.try_send(report)
            {
                self.waiting.insert(report.task_id, report.status);
                return;
            }
        }
    }

    fn into_waiting(self) -> Vec<TaskStatusReport> {
        self.waiting
            .into_iter()
            .map(|(task_id, status)| TaskStatusReport { task_id, status })
            .collect()
    }
}

/// Where a task stands on this node.
#[derive(Debug)]
enum Phase {
    /// Not started (yet): its desired state does not ask for it.
    Idle,
    /// Its process runs (or is stopping).
    Live(TaskProcess),
    /// Started and ended, refused, or terminal when assigned: never acted on again.
    Done,
}

#[derive(Debug)]
struct Entry {
    task: Task,
    phase: Phase,
    /// Removed from the assignment: forget it once its process is reaped.
    forget: bool,
    /// The latest status reported for it (reported again on a resync).
    reported: Option<TaskStatus>,
    /// Stopped by a fence: why (its exit is reported FAILED with it).
    fenced: Option<String>,
    /// The limits of its spec this node does not enforce, and why (in every status
    /// reported once it started).
    limits_note: String,
    /// Its health check, while its process lives (none: the spec has no check).
    health: Option<HealthWatch>,
    /// Stopped for being unhealthy: why (its exit is reported FAILED with it).
    unhealthy: Option<String>,
}

/// A live task's health check: its state machine, the effective spec its checks run with
/// (the task's env and working directory), and the check running now (one at a time).
#[derive(Debug)]
struct HealthWatch {
    monitor: HealthMonitor,
    spec: TaskSpec,
    check: Option<HealthCheckProcess>,
}

impl HealthWatch {
    /// The watch of a task whose effective spec is `spec`, started at `started_at`; `None`
    /// when the spec has no health check.
    fn new(spec: &TaskSpec, started_at: Instant) -> Option<HealthWatch> {
        let settings = HealthSettings::from_config(spec.health.as_ref()?)?;
        Some(HealthWatch {
            monitor: HealthMonitor::new(settings, started_at),
            spec: spec.clone(),
            check: None,
        })
    }

    /// Collects the running check if it ended, or starts one if due; returns the new health
    /// status when a result changed it. Never blocks.
    fn advance(
        &mut self,
        work_dir: &std::path::Path,
        id: &str,
        now: Instant,
    ) -> Option<HealthStatus> {
        if let Some(check) = &mut self.check {
            let started_at = check.started_at();
            let result = match check.poll(now) {
                Ok(None) => return None,
                Ok(Some(result)) => result,
                // Dropping the check kills its group and reaps it.
                Err(error) => failed_check(format!("cannot watch the health check: {error}")),
            };
            self.check = None;
            return self.monitor.record(CheckEnd {
                started_at,
                ended_at: now,
                result,
            });
        }
        if !self.monitor.check_due(now) {
            return None;
        }
        let settings = self.monitor.settings();
        match executor::spawn_health_check(
            work_dir,
            id,
            &self.spec,
            &settings.command,
            settings.timeout,
        ) {
            Ok(check) => {
                self.check = Some(check);
                None
            }
            Err(error) => self.monitor.record(CheckEnd {
                started_at: now,
                ended_at: now,
                result: failed_check(format!("the health check could not start: {error}")),
            }),
        }
    }
}

/// The result of a check that could not run or be watched: a failure saying why.
fn failed_check(why: String) -> HealthCheckResult {
    let now_ms = now_unix_ms();
    HealthCheckResult {
        start_ms: now_ms,
        end_ms: now_ms,
        exit_code: -1,
        output: why,
    }
}

/// The state of the `agent-tasks` thread.
struct Worker {
    config: RunnerConfig,
    mailbox: Arc<Shared>,
    reporter: Reporter,
    entries: HashMap<String, Entry>,
    /// The ids named so far by the complete set being received (`None` between sets).
    set_seen: Option<HashSet<String>>,
    forgotten_order: VecDeque<String>,
    forgotten: HashSet<String>,
    live: usize,
    next_log_check: Instant,
    /// Fenced: why. No task starts meanwhile.
    fenced: Option<String>,
    /// When to fence, and why.
    fence_deadline: Option<(Instant, String)>,
    /// How this node enforces the tasks' resource limits.
    limiter: Limiter,
}

impl Worker {
    fn new(config: RunnerConfig, mailbox: Arc<Shared>, reporter: Reporter) -> Self {
        Worker {
            config,
            mailbox,
            reporter,
            entries: HashMap::new(),
            set_seen: None,
            forgotten_order: VecDeque::new(),
            forgotten: HashSet::new(),
            live: 0,
            next_log_check: Instant::now() + LOG_CHECK_PERIOD,
            fenced: None,
            fence_deadline: None,
            limiter: Limiter::detect(),
        }
    }

    fn run(mut self, woken: &Receiver<()>) -> Vec<TaskStatusReport> {
        // Disconnected: the handle is gone without a shutdown (it always sets the flag first).
        while let Ok(()) | Err(RecvTimeoutError::Timeout) =
            woken.recv_timeout(self.wait_period(Instant::now()))
        {
            let (delivery, resync, fence, shutdown) = {
                let mut mailbox = self.mailbox.mailbox.lock();
                let resync = std::mem::take(&mut mailbox.resync);
                let fence = mailbox.fence_deadline.take();
                (mailbox.take(), resync, fence, mailbox.shutdown)
            };
            self.mailbox.taken.notify_all();
            if shutdown {
                break;
            }
            if let Some((deadline, why)) = fence {
                if deadline > Instant::now() {
                    self.lift_fence();
                }
                self.fence_deadline = Some((deadline, why));
            }
            if resync {
                self.report_all_again();
            }
            let mut delivery = delivery;
            let values = std::mem::take(&mut delivery.values);
            self.config.values.receive(values.secrets, values.configs);
            self.apply_delivery(delivery);
            self.turn(Instant::now());
            // Values no held task reads are forgotten (their tasks came with them, so a
            // value still needed is always named here).
            self.config
                .values
                .retain(self.entries.values().filter_map(|e| e.task.spec.as_ref()));
        }
        self.stop_all();
        self.reporter.into_waiting()
    }

    /// Holds a process a previous run of the agent left running, under a placeholder task
    /// (desired RUNNING) until an assignment names it, and reports it RUNNING.
    fn adopt(&mut self, leftover: executor::Adopted) {
        let executor::Adopted { task_id, process } = leftover;
        let message = format!(
            "running as pid {} (adopted: started by a previous run of the agent)",
            process.pid()
        );
        let task = Task {
            id: task_id.clone(),
            desired_state: TaskState::Running as i32,
            ..Task::default()
        };
        let entry = Entry {
            task,
            phase: Phase::Live(process),
            forget: false,
            reported: None,
            fenced: None,
            limits_note: String::new(),
            health: None,
            unhealthy: None,
        };
        self.entries.insert(task_id.clone(), entry);
        self.live += 1;
        self.report(&task_id, new_status(TaskState::Running, &message));
    }

    /// Reports `status` for task `id`, remembered as its latest (if held); a task that runs
    /// gets its endpoints published, one that ended has them withdrawn.
    fn report(&mut self, id: &str, mut status: TaskStatus) {
        if let Some(entry) = self.entries.get_mut(id) {
            status.limits_note.clone_from(&entry.limits_note);
            entry.reported = Some(status.clone());
            if let Some(endpoints) = &self.config.endpoints
                && status.state == TaskState::Running as i32
            {
                if is_unhealthy(&status) {
                    endpoints.task_stopped(id);
                } else {
                    endpoints.task_running(&entry.task);
                }
            }
        }
        if let Some(endpoints) = &self.config.endpoints
            && is_terminal(status.state)
        {
            endpoints.task_stopped(id);
        }
        self.reporter.report(id, status);
    }

    /// Reports every held task's latest status again (a new session).
    fn report_all_again(&mut self) {
        let latest: Vec<(String, TaskStatus)> = self
            .entries
            .iter()
            .filter_map(|(id, entry)| Some((id.clone(), entry.reported.clone()?)))
            .collect();
        for (id, status) in latest {
            // Only if nothing newer waits: a waiting report is the latest already.
            if !self.reporter.waiting.contains_key(&id) {
                self.reporter.report(&id, status);
            }
        }
    }

    /// How long to sleep: short while processes live or reports wait.
    fn wait_period(&self, now: Instant) -> Duration {
        if self.live == 0 && self.reporter.waiting.is_empty() {
            return IDLE_WAKE_PERIOD;
        }
        let next_kill = self
            .live_processes()
            .filter_map(TaskProcess::kill_deadline)
            .min()
            .map_or(self.config.exit_poll_period, |deadline| {
                deadline.saturating_duration_since(now)
            });
        next_kill.min(self.config.exit_poll_period)
    }

    fn live_processes(&self) -> impl Iterator<Item = &TaskProcess> {
        self.entries
            .values()
            .filter_map(|entry| match &entry.phase {
                Phase::Live(process) => Some(process),
                _ => None,
            })
    }

    /// Fences when its deadline passed, polls live processes, caps their logs when due,
    /// retries waiting reports.
    fn turn(&mut self, now: Instant) {
        if self.fenced.is_none()
            && let Some((deadline, why)) = &self.fence_deadline
            && now >= *deadline
        {
            let why = why.clone();
            self.fence(why, FENCE_KILL_GRACE);
        }
        self.poll_processes(now);
        self.run_health_checks(now);
        if now >= self.next_log_check {
            self.next_log_check = now + LOG_CHECK_PERIOD;
            self.cap_logs();
        }
        self.reporter.flush();
    }

    /// Applies a delivery in the order it was made: the set's parts (with the updates folded
    /// into them), the end of the set, then the changes that came after it.
    fn apply_delivery(&mut self, delivery: Delivery) {
        if delivery.set_begins {
            self.set_seen = Some(HashSet::new());
        }
        for task in delivery.set.into_values() {
            if let Some(seen) = &mut self.set_seen {
                seen.insert(task.id.clone());
            }
            self.upsert(task);
        }
        for id in delivery.set_removed {
            if let Some(seen) = &mut self.set_seen {
                seen.remove(&id);
            }
            self.remove(&id);
        }
        if delivery.set_ends
            && let Some(seen) = self.set_seen.take()
        {
            self.end_set(&seen);
        }
        self.apply_changes(delivery.changes);
    }

    /// A complete set was applied: what it did not name is stopped and forgotten.
    fn end_set(&mut self, named: &HashSet<String>) {
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|id| !named.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    fn apply_changes(&mut self, changes: BTreeMap<String, Option<Task>>) {
        for (id, change) in changes {
            match change {
                Some(task) => self.upsert(task),
                None => self.remove(&id),
            }
        }
    }

    fn upsert(&mut self, task: Task) {
        let id = task.id.clone();
        if self.forgotten.contains(&id) {
            log::debug!("task {id}: assigned again after it was removed; ignored");
            return;
        }
        let tracked = self.entries.len();
        if let Some(entry) = self.entries.get_mut(&id) {
            // An adopted process was held under a placeholder: its endpoints are published
            // once its assignment (with its networks) arrives.
            if let (Phase::Live(process), Some(endpoints)) = (&entry.phase, &self.config.endpoints)
                && !process.is_stopping()
            {
                endpoints.task_running(&task);
            }
            entry.task = task;
            entry.forget = false;
            if let Phase::Live(process) = &entry.phase
                && entry.health.is_none()
                && !process.is_stopping()
            {
                let mut spec = entry.task.spec.clone().unwrap_or_default();
                add_env(&mut spec.env, &self.config.task_env);
                entry.health = HealthWatch::new(&spec, Instant::now());
            }
        } else if tracked >= TASKS_TRACKED_MAX {
            let why = format!(
                "this node already holds {TASKS_TRACKED_MAX} tasks (TASKS_TRACKED_MAX); the \
                 managers must remove finished tasks from its assignment"
            );
            self.report(&id, refusal_status(TaskState::Rejected, &why));
            return;
        } else {
            let entry = Entry {
                task,
                phase: Phase::Idle,
                forget: false,
                reported: None,
                fenced: None,
                limits_note: String::new(),
                health: None,
                unhealthy: None,
            };
            self.entries.insert(id.clone(), entry);
        }
        self.reconcile(&id);
    }

    fn remove(&mut self, id: &str) {
        let Some(entry) = self.entries.get_mut(id) else {
            return;
        };
        entry.forget = true;
        match &mut entry.phase {
            Phase::Live(process) => {
                if let Err(error) = process.begin_stop(Instant::now(), self.config.stop_grace) {
                    log::warn!("task {id}: cannot signal its processes: {error}");
                }
            }
            Phase::Idle | Phase::Done => self.forget(id),
        }
    }

    /// Drops a task whose process (if any) was reaped: its directory goes, its id is
    /// remembered so that it never starts again.
    fn forget(&mut self, id: &str) {
        if let Some(endpoints) = &self.config.endpoints {
            endpoints.task_stopped(id);
        }
        let entry = self
            .entries
            .remove(id)
            .expect("forget is called on a known task");
        assert!(
            !matches!(entry.phase, Phase::Live(_)),
            "a live task is stopped before it is forgotten"
        );
        if executor::validate_task_id(id).is_ok() {
            self.config.values.remove_for(id);
        }
        if executor::validate_task_id(id).is_ok() {
            let dir = executor::task_dir(&self.config.work_dir, id);
            if let Err(error) = fs::remove_dir_all(&dir)
                && error.kind() != std::io::ErrorKind::NotFound
            {
                log::warn!("task {id}: cannot remove {dir:?}: {error}");
            }
        }
        if self.forgotten.insert(id.to_owned()) {
            self.forgotten_order.push_back(id.to_owned());
        }
        while self.forgotten_order.len() > FORGOTTEN_IDS_MAX {
            let oldest = self
                .forgotten_order
                .pop_front()
                .expect("longer than a positive bound");
            self.forgotten.remove(&oldest);
        }
    }

    /// Stops every live process (at most `kill_grace` between SIGTERM and SIGKILL); their
    /// exits are reported FAILED with `why`. Nothing starts until the fence is lifted.
    fn fence(&mut self, why: String, kill_grace: Duration) {
        let now = Instant::now();
        let grace = kill_grace.min(self.config.stop_grace);
        let mut stopped = 0;
        for (id, entry) in &mut self.entries {
            let Phase::Live(process) = &mut entry.phase else {
                continue;
            };
            // One already stopping (not wanted any more) ends as SHUTDOWN, only sooner.
            if !process.is_stopping() {
                entry.fenced = Some(why.clone());
                stopped += 1;
            }
            if let Err(error) = process.begin_stop(now, grace) {
                log::warn!("task {id}: cannot signal its processes: {error}");
            }
        }
        if stopped > 0 {
            log::warn!("agent: stopping its {stopped} running tasks: {why}");
        }
        self.fenced = Some(why);
    }

    /// Ends the fence: tasks wanted running that never started here start now.
    fn lift_fence(&mut self) {
        if self.fenced.take().is_none() {
            return;
        }
        log::info!("agent: in contact with the managers again; tasks may start");
        let idle: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, entry)| matches!(entry.phase, Phase::Idle))
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            self.reconcile(&id);
        }
    }

    /// Applies the reconcile rule (module doc) to one known task.
    fn reconcile(&mut self, id: &str) {
        let fenced = self.fenced.is_some();
        let entry = self.entries.get_mut(id).expect("reconcile a known task");
        let desired = entry.task.desired_state;
        let assigned_state = entry.task.status.as_ref().map_or(0, |status| status.state);
        match &mut entry.phase {
            Phase::Done => {}
            Phase::Live(process) => {
                // Terminal when assigned: an adopted process the managers count finished.
                if (desired > TaskState::Running as i32 || is_terminal(assigned_state))
                    && !process.is_stopping()
                    && let Err(error) = process.begin_stop(Instant::now(), self.config.stop_grace)
                {
                    log::warn!("task {id}: cannot signal its processes: {error}");
                }
            }
            Phase::Idle if is_terminal(assigned_state) => entry.phase = Phase::Done,
            Phase::Idle if desired > TaskState::Running as i32 => {
                entry.phase = Phase::Done;
                let status = new_status(TaskState::Shutdown, "shut down before it started");
                self.report(id, status);
            }
            // Fenced: it waits (the fence's lift reconciles it again).
            Phase::Idle if desired == TaskState::Running as i32 && fenced => {}
            Phase::Idle if desired == TaskState::Running as i32 => {
                self.start(id, assigned_state);
            }
            // Desired state not yet RUNNING: wait for it.
            Phase::Idle => {}
        }
    }

    fn start(&mut self, id: &str, assigned_state: i32) {
        let already_started = assigned_state >= TaskState::Starting as i32
            || (executor::validate_task_id(id).is_ok()
                && executor::task_dir(&self.config.work_dir, id).exists());
        let refusal = if already_started {
            Some(refusal_status(
                TaskState::Failed,
                "the agent restarted after starting this task, and its process had ended \
                 meanwhile (how is unknown: no agent watched it); the orchestrator replaces \
                 the task",
            ))
        } else if self.live >= self.config.tasks_running_max {
            Some(refusal_status(
                TaskState::Rejected,
                &format!(
                    "this node already runs {} tasks, its limit (tasks_running_max); the \
                     scheduler should place the task on another node",
                    self.live
                ),
            ))
        } else {
            None
        };
        let entry = self.entries.get_mut(id).expect("start a known task");
        if let Some(status) = refusal {
            entry.phase = Phase::Done;
            self.report(id, status);
            return;
        }
        let mut spec = entry.task.spec.clone().unwrap_or_default();
        add_env(&mut spec.env, &self.config.task_env);
        let starting = new_status(TaskState::Starting, &format!("starting {:?}", spec.command));
        self.report(id, starting);
        let limits = self.limiter.prepare(id, &spec);
        if !limits.note.is_empty() {
            log::info!("task {id}: {}", limits.note);
        }
        self.entries
            .get_mut(id)
            .expect("start a known task")
            .limits_note = limits.note.clone();
        let spawned = self.write_values(id, &mut spec).and_then(|()| {
            executor::spawn_limited(&self.config.work_dir, id, &spec, limits)
                .map_err(|e| e.to_string())
        });
        if spawned.is_err() && executor::validate_task_id(id).is_ok() {
            self.config.values.remove_for(id);
        }
        let (phase, health, status) = match spawned {
            Ok(process) => {
                let message = format!("running as pid {} (its own process group)", process.pid());
                self.live += 1;
                let health = HealthWatch::new(&spec, Instant::now());
                let mut status = new_status(TaskState::Running, &message);
                status.health = health.as_ref().map(|watch| watch.monitor.report());
                (Phase::Live(process), health, status)
            }
            Err(error) => {
                self.limiter.release(id);
                (
                    Phase::Done,
                    None,
                    refusal_status(TaskState::Rejected, &error),
                )
            }
        };
        let entry = self.entries.get_mut(id).expect("start a known task");
        entry.phase = phase;
        entry.health = health;
        self.report(id, status);
    }

    /// Writes the secret and config files of task `id` and names their directories in
    /// `spec.env` (its own entries win).
    fn write_values(
        &self,
        id: &str,
        spec: &mut crate::proto::objects::TaskSpec,
    ) -> Result<(), String> {
        if spec.secrets.is_empty() && spec.configs.is_empty() {
            return Ok(());
        }
        executor::validate_task_id(id).map_err(|e| e.to_string())?;
        let env = self.config.values.write_for(id, spec)?;
        log::info!(
            "task {id}: {} secret and {} config file(s) written",
            spec.secrets.len(),
            spec.configs.len()
        );
        add_env(&mut spec.env, &env);
        Ok(())
    }

    fn poll_processes(&mut self, now: Instant) {
        let mut ended = Vec::new();
        for (id, entry) in &mut self.entries {
            let Phase::Live(process) = &mut entry.phase else {
                continue;
            };
            let mut status = match process.poll(now) {
                Ok(None) => continue,
                Ok(Some(outcome)) => match (&entry.fenced, &entry.unhealthy) {
                    (Some(why), _) => {
                        let mut status = refusal_status(
                            TaskState::Failed,
                            &format!("stopped by its agent ({outcome}): {why}"),
                        );
                        status.exit_code = outcome.exit_code().unwrap_or_default();
                        status
                    }
                    (None, Some(why)) => {
                        let mut status = refusal_status(TaskState::Failed, why);
                        status.message = format!("stopped by its agent ({outcome}): {why}");
                        status.exit_code = outcome.exit_code().unwrap_or_default();
                        status
                    }
                    (None, None) => exit_status(process, outcome),
                },
                Err(error) => {
                    // Dropping the process kills its group and reaps it.
                    let err = format!("cannot watch its process: {error}");
                    refusal_status(TaskState::Failed, &err)
                }
            };
            entry.phase = Phase::Done;
            // The last health seen stays in the final status; a running check is killed.
            status.health = entry.health.take().map(|watch| watch.monitor.report());
            ended.push((id.clone(), status, entry.forget));
        }
        for (id, status, forget) in ended {
            self.live -= 1;
            self.limiter.release(&id);
            // Its secrets go as soon as it ended (its directory stays until forgotten).
            if executor::validate_task_id(&id).is_ok() {
                self.config.values.remove_for(&id);
            }
            // Forgotten first: whoever sees the report finds the directory gone.
            if forget {
                self.forget(&id);
            }
            self.report(&id, status);
        }
    }

    /// Advances the health check of every live task that has one (collects a check that
    /// ended, starts one that is due); reports each change of health, and stops a task that
    /// became unhealthy (its exit is reported FAILED). A stopping task's check is killed.
    fn run_health_checks(&mut self, now: Instant) {
        let mut changed = Vec::new();
        for (id, entry) in &mut self.entries {
            let (Phase::Live(process), Some(watch)) = (&entry.phase, &mut entry.health) else {
                continue;
            };
            if process.is_stopping() {
                watch.check = None;
                continue;
            }
            if let Some(status) = watch.advance(&self.config.work_dir, id, now) {
                changed.push((id.clone(), status));
            }
        }
        for (id, status) in changed {
            self.health_changed(&id, status, now);
        }
    }

    /// Reports task `id`'s new health (its RUNNING status, same time, new health); an
    /// unhealthy task is stopped, to be reported FAILED (swarmkit's "unhealthy container":
    /// the orchestrator then restarts it per its restart policy).
    fn health_changed(&mut self, id: &str, health: HealthStatus, now: Instant) {
        let stop_grace = self.config.stop_grace;
        let entry = self
            .entries
            .get_mut(id)
            .expect("a live task's health changed");
        let watch = entry.health.as_ref().expect("a task with a health check");
        let report = watch.monitor.report();
        log::debug!("task {id}: health {}", health.as_str_name());
        if health == HealthStatus::Unhealthy {
            let reason = watch.monitor.unhealthy_reason();
            log::info!("task {id}: {reason}; stopping it");
            if let Phase::Live(process) = &mut entry.phase
                && let Err(error) = process.begin_stop(now, stop_grace)
            {
                log::warn!("task {id}: cannot signal its processes: {error}");
            }
            entry.unhealthy = Some(reason);
        }
        let mut status = entry
            .reported
            .clone()
            .filter(|status| status.state == TaskState::Running as i32)
            .unwrap_or_else(|| new_status(TaskState::Running, "running"));
        status.health = Some(report);
        self.report(id, status);
    }

    fn cap_logs(&self) {
        for process in self.live_processes() {
            if let Err(error) = process.cap_logs(self.config.log_file_bytes_max) {
                log::debug!("cannot cap the logs of pid {}: {error}", process.pid());
            }
        }
    }

    /// The shutdown barrier: stop every live process, wait for all to be reaped (the grace
    /// period bounds it), report each, then retry waiting reports while the channel takes
    /// them, for at most [`SHUTDOWN_REPORTS_WAIT`] (the caller's reporter may still deliver
    /// them: the managers then see the tasks stopped instead of still running).
    fn stop_all(&mut self) {
        let now = Instant::now();
        for (id, entry) in &mut self.entries {
            if let Some(watch) = &mut entry.health {
                // Killed and reaped now: no check outlives the runner.
                watch.check = None;
            }
            if let Phase::Live(process) = &mut entry.phase
                && let Err(error) = process.begin_stop(now, self.config.stop_grace)
            {
                log::warn!("task {id}: cannot signal its processes: {error}");
            }
        }
        while self.live > 0 {
            std::thread::sleep(self.wait_period(Instant::now()));
            self.poll_processes(Instant::now());
            self.reporter.flush();
        }
        let give_up = Instant::now() + SHUTDOWN_REPORTS_WAIT;
        while !self.reporter.waiting.is_empty() && Instant::now() < give_up {
            std::thread::sleep(self.config.exit_poll_period);
            self.reporter.flush();
        }
    }
}

/// Adds each `KEY=VALUE` of `extra` to `env` unless `env` sets that key already (the
/// task's own value wins).
fn add_env(env: &mut Vec<String>, extra: &[String]) {
    for entry in extra {
        let key = entry.split_once('=').map_or(entry.as_str(), |(key, _)| key);
        let set = env
            .iter()
            .any(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key);
        if !set {
            env.push(entry.clone());
        }
    }
}

/// The status of a task whose process was reaped.
fn exit_status(process: &TaskProcess, outcome: ExitOutcome) -> TaskStatus {
    let mut status = if process.is_stopping() {
        let how = if process.was_killed() {
            "after the grace period, SIGKILL"
        } else {
            "on SIGTERM"
        };
        new_status(TaskState::Shutdown, &format!("stopped {how}: {outcome}"))
    } else if outcome.is_success() {
        new_status(TaskState::Complete, &outcome.to_string())
    } else {
        refusal_status(TaskState::Failed, &outcome.to_string())
    };
    status.exit_code = outcome.exit_code().unwrap_or_default();
    status
}

/// A status whose message and `err` both say why.
fn refusal_status(state: TaskState, why: &str) -> TaskStatus {
    let mut status = new_status(state, why);
    status.err = why.to_owned();
    status
}

fn new_status(state: TaskState, message: &str) -> TaskStatus {
    TaskStatus {
        state: state as i32,
        message: message.to_owned(),
        timestamp_ms: now_unix_ms(),
        err: String::new(),
        exit_code: 0,
        limits_note: String::new(),
        health: None,
    }
}

/// Whether `status` says the task's health check found it unhealthy.
fn is_unhealthy(status: &TaskStatus) -> bool {
    status
        .health
        .as_ref()
        .is_some_and(|health: &TaskHealth| health.status == HealthStatus::Unhealthy as i32)
}

fn now_unix_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// COMPLETE and every state after it: the task will not run (again) on this node.
fn is_terminal(state: i32) -> bool {
    state >= TaskState::Complete as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::sys;
    use crate::proto::objects::TaskSpec;
    use crossbeam_channel::Receiver;
    use std::collections::VecDeque;

    /// Bound on any wait in these tests (a hang fails instead of blocking).
    const WAIT_LIMIT: Duration = Duration::from_secs(20);

    fn task(id: &str, desired: TaskState, command: &str, args: &[&str]) -> Task {
        Task {
            id: id.to_owned(),
            desired_state: desired as i32,
            status: Some(TaskStatus {
                state: TaskState::Assigned as i32,
                ..TaskStatus::default()
            }),
            spec: Some(TaskSpec {
                command: command.to_owned(),
                args: args.iter().map(|arg| (*arg).to_owned()).collect(),
                ..TaskSpec::default()
            }),
            ..Task::default()
        }
    }

    fn with_desired(mut task: Task, desired: TaskState) -> Task {
        task.desired_state = desired as i32;
        task
    }

    struct Node {
        dir: tempfile::TempDir,
        runner: Option<TaskRunner>,
        reports: Receiver<TaskStatusReport>,
        /// Reports received for other tasks than the one awaited, in order.
        received: HashMap<String, VecDeque<TaskStatus>>,
    }

    impl Node {
        fn start(configure: impl FnOnce(&mut RunnerConfig), reports_len: usize) -> Node {
            Node::start_in(
                tempfile::tempdir().expect("tempdir"),
                configure,
                reports_len,
            )
        }

        /// A runner whose work directory is `<dir>/tasks`.
        fn start_in(
            dir: tempfile::TempDir,
            configure: impl FnOnce(&mut RunnerConfig),
            reports_len: usize,
        ) -> Node {
            let mut config = RunnerConfig::new(dir.path().join("tasks"));
            config.stop_grace = Duration::from_secs(5);
            configure(&mut config);
            let (sender, reports) = crossbeam_channel::bounded(reports_len);
            let runner = TaskRunner::start(config, sender).expect("start");
            Node {
                dir,
                runner: Some(runner),
                reports,
                received: HashMap::new(),
            }
        }

        fn new() -> Node {
            Node::start(|_| {}, REPORTS_QUEUE_LEN_DEFAULT)
        }

        fn runner(&self) -> &TaskRunner {
            self.runner.as_ref().expect("running")
        }

        fn work_dir(&self) -> PathBuf {
            self.dir.path().join("tasks")
        }

        /// The next status reported for `id`.
        fn next(&mut self, id: &str) -> TaskStatus {
            if let Some(status) = self.received.get_mut(id).and_then(VecDeque::pop_front) {
                return status;
            }
            loop {
                let report = self
                    .reports
                    .recv_timeout(WAIT_LIMIT)
                    .unwrap_or_else(|error| panic!("no report for {id}: {error}"));
                if report.task_id == id {
                    return report.status;
                }
                self.received
                    .entry(report.task_id)
                    .or_default()
                    .push_back(report.status);
            }
        }

        fn expect(&mut self, id: &str, state: TaskState) -> TaskStatus {
            let status = self.next(id);
            assert_eq!(
                status.state, state as i32,
                "task {id}: expected {state:?}, got {status:?}"
            );
            status
        }

        /// Starts `id` and returns its pid.
        fn expect_running(&mut self, id: &str) -> u32 {
            self.expect(id, TaskState::Starting);
            let running = self.expect(id, TaskState::Running);
            pid_in(&running.message)
        }

        /// Asserts that nothing was reported for `id` so far.
        fn assert_nothing_for(&mut self, id: &str) {
            while let Ok(report) = self.reports.try_recv() {
                self.received
                    .entry(report.task_id)
                    .or_default()
                    .push_back(report.status);
            }
            let queued = self.received.get(id).map_or(0, VecDeque::len);
            assert_eq!(queued, 0, "task {id} reported {:?}", self.received.get(id));
        }

        fn shutdown(&mut self) -> Vec<TaskStatusReport> {
            self.runner.take().expect("running").shutdown()
        }
    }

    fn pid_in(message: &str) -> u32 {
        message
            .split_whitespace()
            .skip_while(|word| *word != "pid")
            .nth(1)
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {message:?}"))
    }

    #[test]
    fn a_running_task_is_stopped_when_its_desired_state_is_shutdown() {
        let mut node = Node::new();
        let sleeper = task("t-sleep", TaskState::Running, "sleep", &["30"]);
        node.runner().assign(vec![sleeper.clone()]).expect("assign");
        let pid = node.expect_running("t-sleep");
        assert!(!sys::process_dead(pid));

        let stop = with_desired(sleeper, TaskState::Shutdown);
        node.runner()
            .update(vec![stop], Vec::new())
            .expect("update");
        let status = node.expect("t-sleep", TaskState::Shutdown);
        assert_eq!(status.exit_code, 128 + sys::SIGTERM);
        assert!(status.message.contains("on SIGTERM"), "{status:?}");
        assert!(sys::process_dead(pid), "pid {pid} survived its stop");
        assert!(node.shutdown().is_empty());
    }

    #[test]
    fn a_fence_stops_every_task_as_failed_and_starts_nothing_until_it_is_lifted() {
        let mut node = Node::new();
        // Ignores SIGTERM: the fence's short grace, not the 5 s stop grace, ends it.
        let stubborn = task(
            "t-stubborn",
            TaskState::Running,
            "sh",
            &["-c", "trap '' TERM; sleep 30"],
        );
        node.runner()
            .assign(vec![stubborn.clone()])
            .expect("assign");
        let pid = node.expect_running("t-stubborn");
        node.runner()
            .set_fence_deadline(Instant::now(), "out of contact".into())
            .expect("fence");
        let failed = node.expect("t-stubborn", TaskState::Failed);
        assert!(failed.err.contains("out of contact"), "{failed:?}");
        assert!(
            failed.message.contains("stopped by its agent"),
            "{failed:?}"
        );
        assert!(sys::process_dead(pid), "pid {pid} survived the fence");

        // Assigned while fenced: it waits, idle.
        let later = task("t-later", TaskState::Running, "sleep", &["30"]);
        node.runner().assign(vec![stubborn, later]).expect("assign");
        std::thread::sleep(Duration::from_millis(300));
        node.assert_nothing_for("t-later");
        node.assert_nothing_for("t-stubborn");
        node.runner()
            .set_fence_deadline(Instant::now() + WAIT_LIMIT * 3, "out of contact".into())
            .expect("lift");
        let pid = node.expect_running("t-later");
        assert!(!sys::process_dead(pid));
        // The fenced task ran once: it does not start again.
        node.assert_nothing_for("t-stubborn");
        node.shutdown();
    }

    #[test]
    fn exits_are_reported_complete_failed_or_rejected() {
        let mut node = Node::new();
        node.runner()
            .assign(vec![
                task("t-true", TaskState::Running, "true", &[]),
                task("t-three", TaskState::Running, "sh", &["-c", "exit 3"]),
                task(
                    "t-missing",
                    TaskState::Running,
                    "no-such-command-flotilla",
                    &[],
                ),
            ])
            .expect("assign");

        node.expect_running("t-true");
        let complete = node.expect("t-true", TaskState::Complete);
        assert_eq!((complete.exit_code, complete.err.as_str()), (0, ""));

        node.expect_running("t-three");
        let failed = node.expect("t-three", TaskState::Failed);
        assert_eq!(failed.exit_code, 3);
        assert_eq!(failed.err, "exited with status 3");

        node.expect("t-missing", TaskState::Starting);
        let rejected = node.expect("t-missing", TaskState::Rejected);
        assert!(rejected.err.contains("cannot execute"), "{rejected:?}");
        assert!(rejected.err.contains("does not exist"), "{rejected:?}");
        assert!(rejected.err.contains("No such file"), "{rejected:?}");
        assert!(rejected.timestamp_ms > 0);
        node.shutdown();
    }

    #[test]
    fn a_task_ignoring_sigterm_is_killed_after_the_grace() {
        let mut node = Node::start(
            |config| config.stop_grace = Duration::from_millis(200),
            REPORTS_QUEUE_LEN_DEFAULT,
        );
        let ready = node.dir.path().join("ready");
        let script = format!("trap '' TERM; echo $$ > {}; sleep 30", ready.display());
        let stubborn = task("t-stubborn", TaskState::Running, "sh", &["-c", &script]);
        node.runner()
            .assign(vec![stubborn.clone()])
            .expect("assign");
        let pid = node.expect_running("t-stubborn");
        wait_for_file(&ready);

        let stop = with_desired(stubborn, TaskState::Shutdown);
        node.runner()
            .update(vec![stop], Vec::new())
            .expect("update");
        let status = node.expect("t-stubborn", TaskState::Shutdown);
        assert_eq!(status.exit_code, 128 + sys::SIGKILL);
        assert!(status.message.contains("SIGKILL"), "{status:?}");
        assert!(sys::process_dead(pid));
        node.shutdown();
    }

    fn wait_for_file(path: &std::path::Path) -> String {
        let give_up = Instant::now() + WAIT_LIMIT;
        while Instant::now() < give_up {
            if let Ok(content) = fs::read_to_string(path)
                && content.ends_with('\n')
            {
                return content;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{path:?} was never written");
    }

    #[test]
    fn a_stop_reaches_the_children_of_a_task() {
        let mut node = Node::new();
        let child_pid_file = node.dir.path().join("child.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", child_pid_file.display());
        let parent = task("t-parent", TaskState::Running, "sh", &["-c", &script]);
        node.runner().assign(vec![parent.clone()]).expect("assign");
        node.expect_running("t-parent");
        let grandchild: u32 = wait_for_file(&child_pid_file).trim().parse().expect("pid");

        let stop = with_desired(parent, TaskState::Shutdown);
        node.runner()
            .update(vec![stop], Vec::new())
            .expect("update");
        node.expect("t-parent", TaskState::Shutdown);
        assert!(
            sys::wait_dead(grandchild, WAIT_LIMIT),
            "the grandchild survived the stop"
        );
        node.shutdown();
    }

    #[test]
    fn a_task_left_out_of_a_full_assignment_is_stopped_and_forgotten() {
        let mut node = Node::new();
        let sleeper = task("t-a", TaskState::Running, "sleep", &["30"]);
        node.runner().assign(vec![sleeper.clone()]).expect("assign");
        let pid = node.expect_running("t-a");
        assert!(executor::task_dir(&node.work_dir(), "t-a").exists());

        let other = task("t-b", TaskState::Running, "sleep", &["30"]);
        node.runner().assign(vec![other]).expect("assign");
        node.expect_running("t-b");
        node.expect("t-a", TaskState::Shutdown);
        assert!(sys::process_dead(pid));
        assert!(!executor::task_dir(&node.work_dir(), "t-a").exists());

        // Assigned again after it was forgotten: not started again. The sentinel's reports
        // come after anything t-a would have reported in the same turn.
        let sentinel = task("t-z", TaskState::Running, "true", &[]);
        node.runner()
            .update(vec![sleeper, sentinel], Vec::new())
            .expect("update");
        node.expect("t-z", TaskState::Starting);
        node.assert_nothing_for("t-a");
        let reports = node.shutdown();
        assert!(reports.is_empty());
    }

    #[test]
    fn a_finished_task_assigned_again_is_not_restarted() {
        let mut node = Node::new();
        let once = task("t-a", TaskState::Running, "true", &[]);
        node.runner().assign(vec![once.clone()]).expect("assign");
        node.expect_running("t-a");
        node.expect("t-a", TaskState::Complete);

        // The manager may not have seen the report yet: same task, still ASSIGNED.
        let sentinel = task("t-z", TaskState::Running, "true", &[]);
        node.runner()
            .assign(vec![once.clone(), sentinel])
            .expect("assign");
        node.expect("t-z", TaskState::Starting);
        node.runner()
            .update(vec![once], Vec::new())
            .expect("update");
        node.expect("t-z", TaskState::Running);
        node.assert_nothing_for("t-a");
        node.shutdown();
    }

    #[test]
    fn terminal_or_not_yet_running_tasks_are_not_started() {
        let mut node = Node::new();
        let mut done = task("t-done", TaskState::Running, "true", &[]);
        done.status.as_mut().expect("status").state = TaskState::Failed as i32;
        let cancelled = task("t-cancelled", TaskState::Shutdown, "true", &[]);
        let later = task("t-later", TaskState::Assigned, "true", &[]);
        let sentinel = task("t-z", TaskState::Running, "true", &[]);
        node.runner()
            .assign(vec![done, cancelled, later.clone(), sentinel])
            .expect("assign");
        let shut = node.expect("t-cancelled", TaskState::Shutdown);
        assert!(shut.message.contains("before it started"), "{shut:?}");
        node.expect("t-z", TaskState::Starting);
        node.assert_nothing_for("t-done");
        node.assert_nothing_for("t-later");

        // Its desired state reaches RUNNING: now it starts.
        let go = with_desired(later, TaskState::Running);
        node.runner().update(vec![go], Vec::new()).expect("update");
        node.expect_running("t-later");
        node.shutdown();
    }

    #[test]
    fn a_task_started_by_a_previous_agent_run_fails_instead_of_starting_twice() {
        let mut node = Node::new();
        fs::create_dir_all(executor::task_dir(&node.work_dir(), "t-old")).expect("mkdir");
        let mut reported_running = task("t-seen", TaskState::Running, "true", &[]);
        reported_running.status.as_mut().expect("status").state = TaskState::Running as i32;
        node.runner()
            .assign(vec![
                task("t-old", TaskState::Running, "true", &[]),
                reported_running,
            ])
            .expect("assign");
        let old = node.expect("t-old", TaskState::Failed);
        assert!(old.err.contains("agent restarted"), "{old:?}");
        node.expect("t-seen", TaskState::Failed);
        node.shutdown();
    }

    #[test]
    fn a_restarted_runner_adopts_the_processes_left_running_instead_of_failing_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let work_dir = dir.path().join("tasks");
        let kept = executor::tests::orphan_task(&work_dir, "t-kept");
        let dropped = executor::tests::orphan_task(&work_dir, "t-dropped");
        let unwanted = executor::tests::orphan_task(&work_dir, "t-unwanted");
        let mut node = Node::start_in(dir, |_| {}, REPORTS_QUEUE_LEN_DEFAULT);
        for (id, pid) in [
            ("t-kept", kept),
            ("t-dropped", dropped),
            ("t-unwanted", unwanted),
        ] {
            let running = node.expect(id, TaskState::Running);
            assert!(running.message.contains("adopted"), "{running:?}");
            assert_eq!(pid_in(&running.message), pid);
        }
        let mut kept_task = task("t-kept", TaskState::Running, "sleep", &["300"]);
        kept_task.status.as_mut().expect("status").state = TaskState::Running as i32;
        let mut unwanted_task = with_desired(kept_task.clone(), TaskState::Shutdown);
        unwanted_task.id = "t-unwanted".into();
        node.runner()
            .assign(vec![kept_task, unwanted_task])
            .expect("assign");
        node.expect("t-unwanted", TaskState::Shutdown);
        node.expect("t-dropped", TaskState::Shutdown);
        assert!(sys::wait_dead(unwanted, WAIT_LIMIT));
        assert!(sys::wait_dead(dropped, WAIT_LIMIT));
        // Adopted, not started again nor failed: the same process runs on.
        assert!(!sys::process_dead(kept));
        node.assert_nothing_for("t-kept");

        // A new session: the latest status of every held task is reported again.
        node.runner().resync_reports().expect("resync");
        let again = node.expect("t-kept", TaskState::Running);
        assert_eq!(pid_in(&again.message), kept);

        // Its end is seen although it is not the runner's child; its status is unknown.
        sys::signal_group(kept, sys::SIGKILL).expect("kill");
        let failed = node.expect("t-kept", TaskState::Failed);
        assert!(failed.err.contains("unknown exit status"), "{failed:?}");
        assert!(node.shutdown().is_empty());
    }

    #[test]
    fn tasks_past_the_node_limit_are_rejected() {
        let mut node = Node::start(|config| config.tasks_running_max = 1, 64);
        node.runner()
            .assign(vec![
                task("t-1", TaskState::Running, "sleep", &["30"]),
                task("t-2", TaskState::Running, "sleep", &["30"]),
            ])
            .expect("assign");
        node.expect_running("t-1");
        let rejected = node.expect("t-2", TaskState::Rejected);
        assert!(rejected.err.contains("tasks_running_max"), "{rejected:?}");
        node.shutdown();
    }

    #[test]
    fn shutdown_stops_every_task_and_joins() {
        let mut node = Node::new();
        node.runner()
            .assign(vec![
                task("t-1", TaskState::Running, "sleep", &["30"]),
                task("t-2", TaskState::Running, "sleep", &["30"]),
            ])
            .expect("assign");
        let pids = [node.expect_running("t-1"), node.expect_running("t-2")];
        let unsent = node.shutdown();
        assert!(unsent.is_empty());
        node.expect("t-1", TaskState::Shutdown);
        node.expect("t-2", TaskState::Shutdown);
        for pid in pids {
            assert!(sys::process_dead(pid), "pid {pid} survived shutdown");
        }
        // The thread is gone with its end of the channel.
        assert!(matches!(
            node.reports.recv_timeout(WAIT_LIMIT),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected)
        ));
    }

    #[test]
    fn a_full_report_channel_keeps_the_latest_status_and_never_a_stale_one() {
        // One slot: STARTING fills it; RUNNING waits and COMPLETE replaces it.
        let mut node = Node::start(|_| {}, 1);
        node.runner()
            .assign(vec![task("t-a", TaskState::Running, "true", &[])])
            .expect("assign");
        node.expect("t-a", TaskState::Starting);
        let mut status = node.next("t-a");
        if status.state == TaskState::Running as i32 {
            status = node.next("t-a");
        }
        assert_eq!(status.state, TaskState::Complete as i32, "{status:?}");
        node.shutdown();
        assert!(
            node.reports.try_recv().is_err(),
            "nothing after the terminal status"
        );
    }

    #[test]
    fn shutdown_hands_back_the_reports_the_channel_had_no_room_for() {
        let mut node = Node::start(|_| {}, 1);
        node.runner()
            .assign(vec![
                task("t-1", TaskState::Running, "sleep", &["30"]),
                task("t-2", TaskState::Running, "sleep", &["30"]),
            ])
            .expect("assign");
        // Nobody reads: only t-1's STARTING fits. Once it is there, the thread is applying
        // the assignment, which it finishes before it looks at the shutdown flag.
        let give_up = Instant::now() + WAIT_LIMIT;
        while node.reports.is_empty() {
            assert!(Instant::now() < give_up, "the assignment was never applied");
            std::thread::sleep(Duration::from_millis(5));
        }
        let unsent = node.shutdown();
        let first = node.reports.try_recv().expect("the one that fit");
        assert_eq!(first.task_id, "t-1");
        assert_eq!(first.status.state, TaskState::Starting as i32);
        let states: Vec<(String, i32)> = unsent
            .into_iter()
            .map(|report| (report.task_id, report.status.state))
            .collect();
        let shutdown = TaskState::Shutdown as i32;
        assert_eq!(
            states,
            vec![("t-1".to_owned(), shutdown), ("t-2".to_owned(), shutdown)]
        );
    }

    #[test]
    fn the_mailbox_folds_updates_into_a_set_being_received() {
        let sleeper = |id: &str| task(id, TaskState::Running, "sleep", &["30"]);
        let mut mailbox = Mailbox::default();
        mailbox.update(vec![sleeper("t-old")], Vec::new());
        // A first part makes earlier changes moot.
        mailbox.assign_part(vec![sleeper("t-1"), sleeper("t-2")], true, false);
        assert!(mailbox.changes.is_empty());
        let stop = with_desired(sleeper("t-1"), TaskState::Shutdown);
        mailbox.update(vec![stop, sleeper("t-3")], vec!["t-2".to_owned()]);
        let first = mailbox.take();
        assert!(first.set_begins && !first.set_ends);
        let ids: Vec<&str> = first.set.keys().map(String::as_str).collect();
        assert_eq!(ids, ["t-1", "t-3"]);
        assert_eq!(first.set["t-1"].desired_state, TaskState::Shutdown as i32);
        assert!(first.set_removed.contains("t-2"));

        // The set is still open: the next part and an update join it; the last part ends it.
        mailbox.assign_part(vec![sleeper("t-4")], false, false);
        mailbox.update(Vec::new(), vec!["t-3".to_owned()]);
        mailbox.assign_part(vec![sleeper("t-5")], false, true);
        let second = mailbox.take();
        assert!(!second.set_begins && second.set_ends);
        assert_eq!(second.set.keys().collect::<Vec<_>>(), ["t-4", "t-5"]);
        assert!(second.set_removed.contains("t-3"));

        // Between sets, changes and removals are kept as such.
        mailbox.update(vec![sleeper("t-6")], vec!["t-7".to_owned()]);
        let third = mailbox.take();
        assert!(third.set.is_empty() && !third.set_begins && !third.set_ends);
        assert!(third.changes["t-6"].is_some());
        assert!(third.changes["t-7"].is_none());
        // A continuation without a start is taken as changes, not as a set.
        mailbox.assign_part(vec![sleeper("t-8")], false, true);
        assert!(mailbox.take().changes["t-8"].is_some());
    }

    #[test]
    fn a_full_mailbox_makes_the_caller_wait_for_the_thread_instead_of_refusing() {
        let shared = Arc::new(Shared::default());
        let many: Vec<Task> = (0..ASSIGNMENT_TASKS_MAX)
            .map(|i| task(&format!("t-{i}"), TaskState::Assigned, "true", &[]))
            .collect();
        // An empty mailbox takes a delivery of any size.
        shared
            .lock_with_room(many.len() + 1, false)
            .expect("room")
            .update(many, Vec::new());
        let taker = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                let taken = shared.mailbox.lock().take();
                shared.taken.notify_all();
                taken.changes.len()
            })
        };
        let waited = Instant::now();
        drop(shared.lock_with_room(1, false).expect("room once taken"));
        assert!(waited.elapsed() >= Duration::from_millis(150));
        assert_eq!(taker.join().expect("taker"), ASSIGNMENT_TASKS_MAX);
        // A first part replaces what waits: it never waits.
        shared.mailbox.lock().update(
            vec![task("t-x", TaskState::Assigned, "true", &[])],
            Vec::new(),
        );
        shared
            .mailbox
            .lock()
            .changes
            .extend((0..ASSIGNMENT_TASKS_MAX).map(|i| (format!("u-{i}"), None)));
        drop(shared.lock_with_room(5, true).expect("a first part"));
        shared.mailbox.lock().shutdown = true;
        assert_eq!(
            shared.lock_with_room(1, false).err(),
            Some(AssignError::Stopped)
        );
    }

    #[test]
    fn a_set_in_parts_stops_only_what_none_of_its_parts_names() {
        let mut node = Node::new();
        let a = task("t-a", TaskState::Running, "sleep", &["30"]);
        let b = task("t-b", TaskState::Running, "sleep", &["30"]);
        node.runner()
            .assign(vec![a.clone(), b.clone()])
            .expect("assign");
        let pid_a = node.expect_running("t-a");
        let pid_b = node.expect_running("t-b");

        // A new session's set: t-a comes in the second part, t-b in none.
        let c = task("t-c", TaskState::Running, "sleep", &["30"]);
        node.runner()
            .assign_part(vec![c], true, false)
            .expect("first part");
        node.expect_running("t-c");
        node.assert_nothing_for("t-a");
        node.assert_nothing_for("t-b");
        node.runner()
            .assign_part(vec![a], false, true)
            .expect("last part");
        node.expect("t-b", TaskState::Shutdown);
        assert!(sys::process_dead(pid_b));
        node.assert_nothing_for("t-a");
        assert!(!sys::process_dead(pid_a), "t-a was named by the set");
        node.shutdown();
    }

    fn with_health(mut task: Task, command: &str, retries: u32) -> Task {
        task.spec.as_mut().expect("spec").health = Some(crate::proto::objects::HealthConfig {
            command: command.to_owned(),
            interval_ms: 100,
            timeout_ms: 300,
            retries,
            start_period_ms: 0,
        });
        task
    }

    fn health_of(status: &TaskStatus) -> HealthStatus {
        let health = status.health.as_ref().expect("a health report");
        HealthStatus::try_from(health.status).expect("a known status")
    }

    #[test]
    fn a_passing_check_reports_the_running_task_healthy_at_the_same_time() {
        let mut node = Node::new();
        let sleeper = task("t-ok", TaskState::Running, "sleep", &["30"]);
        node.runner()
            .assign(vec![with_health(sleeper, "exit 0", 2)])
            .expect("assign");
        node.expect("t-ok", TaskState::Starting);
        let running = node.expect("t-ok", TaskState::Running);
        assert_eq!(health_of(&running), HealthStatus::Starting);
        let healthy = node.expect("t-ok", TaskState::Running);
        assert_eq!(health_of(&healthy), HealthStatus::Healthy);
        assert_eq!(healthy.timestamp_ms, running.timestamp_ms);
        assert_eq!(healthy.message, running.message);
        assert_eq!(healthy.health.expect("health").log[0].exit_code, 0);
        node.shutdown();
    }

    #[test]
    fn an_unhealthy_task_is_stopped_and_reported_failed_with_the_reason() {
        let mut node = Node::new();
        let sleeper = task("t-sick", TaskState::Running, "sleep", &["30"]);
        let script = "echo not ready; exit 1";
        node.runner()
            .assign(vec![with_health(sleeper, script, 2)])
            .expect("assign");
        let pid = node.expect_running("t-sick");
        let unhealthy = node.expect("t-sick", TaskState::Running);
        assert_eq!(health_of(&unhealthy), HealthStatus::Unhealthy);
        let failed = node.expect("t-sick", TaskState::Failed);
        assert!(
            failed
                .err
                .starts_with("unhealthy container: the health check failed 2 times"),
            "{failed:?}"
        );
        assert!(
            failed.err.contains("exit status 1: not ready"),
            "{failed:?}"
        );
        assert_eq!(health_of(&failed), HealthStatus::Unhealthy);
        assert_eq!(failed.exit_code, 128 + sys::SIGTERM);
        assert!(sys::process_dead(pid));
        node.shutdown();
    }

    #[test]
    fn a_check_that_hangs_is_killed_at_its_timeout_and_counts_as_failed() {
        let mut node = Node::new();
        let sleeper = task("t-hang", TaskState::Running, "sleep", &["30"]);
        node.runner()
            .assign(vec![with_health(sleeper, "sleep 30", 1)])
            .expect("assign");
        node.expect_running("t-hang");
        node.expect("t-hang", TaskState::Running);
        let failed = node.expect("t-hang", TaskState::Failed);
        assert!(failed.err.contains("exceeded timeout"), "{failed:?}");
        node.shutdown();
    }

    #[test]
    fn the_runner_handle_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<TaskRunner>();
        shareable::<TaskStatusReport>();
    }
}
