//! `service create` and `service update` wait until the service converges, as `docker
//! service create` does without `--detach`: every task the service wants is running the
//! service's current task spec, and has stayed running for the monitor period (the
//! service's `update.monitor_ms`, else [`MONITOR_DEFAULT`], docker's 5 s). Progress goes to
//! stderr, one line per change of a task slot (`web.2: running`), so that stdout keeps only
//! what the command prints for scripts (the id, or the JSON).
//!
//! The wait gives up, with the reason and a failed exit, once one slot's new tasks have
//! failed [`SLOT_FAILURES_MAX`] times (a command that exits at once would otherwise be
//! waited for forever), or when the orchestrator's update supervisor paused the update or
//! rolled it back (the service's update status and its message; a `service rollback` waits
//! for the rollback, and fails only if that is paused). A task that stays pending (no node fits) is waited for, saying why,
//! as docker does: a node may come. Ctrl-C stops the wait, never the service.
//!
//! Must never change anything (reads only, through the [`Client`]), nor wait without saying
//! what it waits for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use super::client::Client;
use crate::cli::CommandError;
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::json::label;
use crate::proto::objects::{Service, ServiceMode, Task, TaskState, UpdateState};

/// How often the wait reads the service and its tasks, for a small service.
pub const POLL_PERIOD: Duration = Duration::from_millis(500);
/// Extra wait between reads per 1,000 tasks of the service: each read lists them all, so a
/// large service is read less often (100,000 tasks: every 5.5 s).
pub const POLL_PERIOD_PER_1000_TASKS: Duration = Duration::from_millis(50);
/// The longest wait between two reads.
pub const POLL_PERIOD_MAX: Duration = Duration::from_secs(10);
/// How long each task must stay running before the service counts as converged, when its
/// update config sets no monitor period (docker's default).
pub const MONITOR_DEFAULT: Duration = Duration::from_secs(5);
/// New tasks of one slot that may fail before the wait gives up on the service.
pub const SLOT_FAILURES_MAX: usize = 3;

/// What the wait saw in one read of the service and its tasks.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// `running` of `wanted` tasks run the current spec and have been running long enough.
    Converged { running: usize },
    /// Not yet: `running` of `wanted` run the current spec (some maybe not long enough).
    Waiting { running: usize, wanted: usize },
    /// A slot's new tasks failed [`SLOT_FAILURES_MAX`] times: the reason, for the user.
    Failed(String),
}

/// What the wait remembers between reads.
pub(super) struct Watch {
    /// Tasks that existed before the command's write: their failures are not this
    /// command's (an update's old failed attempts).
    before: HashSet<String>,
    /// When this process first saw each task running (its own clock, so a manager's clock
    /// never matters).
    running_since: HashMap<String, Instant>,
    /// The last state line printed per slot.
    shown: BTreeMap<String, String>,
    monitor: Duration,
    /// True when the command asked for a rollback: a rollback in progress is then no
    /// failure.
    rollback: bool,
}

impl Watch {
    /// A wait for the write that followed a listing of the tasks in `before`.
    pub(super) fn new(before: HashSet<String>, monitor: Duration) -> Self {
        Self {
            before,
            running_since: HashMap::new(),
            shown: BTreeMap::new(),
            monitor,
            rollback: false,
        }
    }

    /// The same wait for a rollback the command asked for.
    pub(super) fn for_rollback(mut self) -> Self {
        self.rollback = true;
        self
    }

    /// Judges one read of `service` and its `tasks` at `now`; returns the verdict and the
    /// progress lines to print (slots whose state changed since the last read).
    pub(super) fn judge(
        &mut self,
        service: &Service,
        tasks: &[Task],
        now: Instant,
    ) -> (Verdict, Vec<String>) {
        let spec = service.spec.clone().unwrap_or_default();
        let current_spec = spec.task.clone().unwrap_or_default();
        let is_current = |t: &Task| t.spec.as_ref() == Some(&current_spec);
        let is_running = |t: &Task| {
            t.status
                .as_ref()
                .is_some_and(|s| s.state == TaskState::Running as i32)
        };
        let wants_running = |t: &Task| t.desired_state == TaskState::Running as i32;

        let running: HashSet<&str> = tasks
            .iter()
            .filter(|t| is_running(t))
            .map(|t| t.id.as_str())
            .collect();
        self.running_since
            .retain(|id, _| running.contains(id.as_str()));
        for task in tasks.iter().filter(|t| is_running(t)) {
            self.running_since.entry(task.id.clone()).or_insert(now);
        }
        let lines = self.progress_lines(&spec.name, tasks);
        if let Some(reason) = self.stopped_update(service) {
            return (Verdict::Failed(reason), lines);
        }
        if let Some(reason) = self.failed_slot(&spec.name, tasks, &is_current) {
            return (Verdict::Failed(reason), lines);
        }

        let desired: Vec<&Task> = tasks.iter().filter(|t| wants_running(t)).collect();
        let wanted = if spec.mode == ServiceMode::Global as i32 {
            desired.len()
        } else {
            usize::try_from(spec.replicas).unwrap_or(usize::MAX)
        };
        let up_to_date: Vec<&&Task> = desired
            .iter()
            .filter(|t| is_current(t) && is_running(t))
            .collect();
        let stable = up_to_date
            .iter()
            .filter(|t| {
                self.running_since
                    .get(&t.id)
                    .is_some_and(|since| now.duration_since(*since) >= self.monitor)
            })
            .count();
        // Old tasks still wanted, or more running than wanted: the orchestrator is not done.
        let settled = desired.len() == wanted && up_to_date.len() == wanted;
        let verdict = if settled && stable == wanted {
            Verdict::Converged { running: stable }
        } else {
            Verdict::Waiting {
                running: up_to_date.len(),
                wanted,
            }
        };
        (verdict, lines)
    }

    /// Why the orchestrator stopped the update the command waits for, if it did: paused,
    /// or (unless the command asked for it) rolled back.
    fn stopped_update(&self, service: &Service) -> Option<String> {
        let status = service.update_status.as_ref()?;
        let state = UpdateState::try_from(status.state).ok()?;
        let what = match state {
            UpdateState::Paused => "the update was paused",
            UpdateState::RollbackPaused => "the rollback was paused",
            UpdateState::RollbackStarted | UpdateState::RollbackCompleted if !self.rollback => {
                "the update was rolled back"
            }
            _ => return None,
        };
        Some(format!("{what}: {}", status.message))
    }

    /// A slot whose new tasks of the current spec failed [`SLOT_FAILURES_MAX`] times, said
    /// for the user with the last error.
    fn failed_slot(
        &self,
        service: &str,
        tasks: &[Task],
        is_current: &dyn Fn(&Task) -> bool,
    ) -> Option<String> {
        let mut failures: BTreeMap<String, Vec<&Task>> = BTreeMap::new();
        for task in tasks {
            let state = task.status.as_ref().map_or(0, |s| s.state);
            let failed = state == TaskState::Failed as i32 || state == TaskState::Rejected as i32;
            if failed && is_current(task) && !self.before.contains(&task.id) {
                failures
                    .entry(slot_name(service, task))
                    .or_default()
                    .push(task);
            }
        }
        let (slot, failed) = failures
            .into_iter()
            .find(|(_, failed)| failed.len() >= SLOT_FAILURES_MAX)?;
        let last = failed
            .iter()
            .max_by_key(|t| t.meta.as_ref().map_or(0, |m| m.created_at_ms))
            .and_then(|t| t.status.as_ref())
            .map(problem_text)
            .unwrap_or_default();
        Some(format!(
            "{slot} failed {} times; last: {last}",
            failed.len()
        ))
    }

    /// `web.2: running` for each slot whose newest task changed state since the last read.
    fn progress_lines(&mut self, service: &str, tasks: &[Task]) -> Vec<String> {
        let mut newest: BTreeMap<String, &Task> = BTreeMap::new();
        for task in tasks.iter().filter(|t| !self.before.contains(&t.id)) {
            let created = |t: &Task| t.meta.as_ref().map_or(0, |m| m.created_at_ms);
            let slot = slot_name(service, task);
            if newest
                .get(&slot)
                .is_none_or(|n| created(n) <= created(task))
            {
                newest.insert(slot, task);
            }
        }
        let mut lines = Vec::new();
        for (slot, task) in newest {
            let status = task.status.clone().unwrap_or_default();
            let mut line = format!("{slot}: {}", label::<TaskState>(status.state));
            let problem = problem_text(&status);
            if !problem.is_empty() {
                line.push_str(&format!(" ({problem})"));
            }
            if self.shown.get(&slot) != Some(&line) {
                self.shown.insert(slot, line.clone());
                lines.push(line);
            }
        }
        lines
    }
}

/// Why a task failed, or why it is pending (as `service ps` shows it).
fn problem_text(status: &crate::proto::objects::TaskStatus) -> String {
    if !status.err.is_empty() {
        status.err.clone()
    } else if status.state == TaskState::Pending as i32 {
        status.message.clone()
    } else {
        String::new()
    }
}

/// `web.2`, or `web.<node>` for a global service's task.
fn slot_name(service: &str, task: &Task) -> String {
    if task.slot == 0 {
        format!("{service}.{}", &task.node_id[..task.node_id.len().min(12)])
    } else {
        format!("{service}.{}", task.slot)
    }
}

/// The ids of the tasks `service_id` has now: taken before an update, so that the wait
/// counts only the failures of the tasks the update makes.
///
/// # Errors
/// The manager's refusal, described.
pub(super) fn task_ids(client: &Client, service_id: &str) -> Result<HashSet<String>, String> {
    Ok(list_tasks(client, service_id)?
        .into_iter()
        .map(|t| t.id)
        .collect())
}

fn list_tasks(client: &Client, service_id: &str) -> Result<Vec<Task>, String> {
    client.list(
        api::LIST_TASKS,
        &pb::ListTasksRequest {
            service_id: service_id.to_string(),
            node_id: String::new(),
        },
        |c: pb::TaskChunk| c.tasks,
    )
}

/// Waits until `service` converges (see the module doc), printing progress to stderr.
///
/// # Errors
/// [`CommandError::Failed`] when a slot failed [`SLOT_FAILURES_MAX`] times, the service was
/// removed meanwhile, or the managers could not be read.
pub(super) fn wait_converged(
    client: &Client,
    service: &Service,
    before: HashSet<String>,
) -> Result<(), CommandError> {
    wait_with(client, service, Watch::new(before, monitor_of(service)))
}

/// [`wait_converged`] after `service rollback`: the rollback is what it waits for.
///
/// # Errors
/// As [`wait_converged`]; a paused rollback fails.
pub(super) fn wait_rolled_back(
    client: &Client,
    service: &Service,
    before: HashSet<String>,
) -> Result<(), CommandError> {
    let monitor = monitor_of(service);
    wait_with(client, service, Watch::new(before, monitor).for_rollback())
}

/// How long each task must stay running: the monitor period in force.
fn monitor_of(service: &Service) -> Duration {
    let rolling_back = service
        .update_status
        .as_ref()
        .is_some_and(|s| s.state == UpdateState::RollbackStarted as i32);
    service
        .spec
        .as_ref()
        .and_then(|s| {
            if rolling_back {
                s.rollback.as_ref()
            } else {
                s.update.as_ref()
            }
        })
        .map(|u| u.monitor_ms)
        .filter(|ms| *ms > 0)
        .map_or(MONITOR_DEFAULT, |ms| {
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        })
}

fn wait_with(client: &Client, service: &Service, mut watch: Watch) -> Result<(), CommandError> {
    let monitor = watch.monitor;
    let name = service
        .spec
        .as_ref()
        .map_or("", |s| s.name.as_str())
        .to_string();
    eprintln!(
        "waiting for {name} to converge (every task running for {} s; Ctrl-C stops the wait, \
         not the service; --detach returns at once)",
        monitor.as_secs_f64()
    );
    let mut last_count = None;
    loop {
        let reply: pb::ServiceResponse = client
            .unary(
                api::GET_SERVICE,
                &pb::GetServiceRequest {
                    reference: service.id.clone(),
                },
            )
            .map_err(|e| format!("{e}\nhint: the service was changed; it may have been removed"))?;
        let current = reply.service.unwrap_or_default();
        let tasks = list_tasks(client, &service.id)?;
        let (verdict, lines) = watch.judge(&current, &tasks, Instant::now());
        for line in lines {
            eprintln!("{line}");
        }
        match verdict {
            Verdict::Converged { running } => {
                eprintln!("{name}: converged, {running} task(s) running");
                return Ok(());
            }
            Verdict::Failed(reason) => {
                return Err(CommandError::Failed(format!(
                    "{name} did not converge: {reason}\nhint: `flotilla service ps {name}` \
                     shows every attempt, `flotilla service inspect {name}` the update status; \
                     fix it with `flotilla service update` (which also resumes a paused \
                     update), return with `flotilla service rollback {name}`, or remove it"
                )));
            }
            Verdict::Waiting { running, wanted } => {
                if last_count != Some((running, wanted)) {
                    eprintln!("{name}: {running}/{wanted} running");
                    last_count = Some((running, wanted));
                }
            }
        }
        std::thread::sleep(poll_period(tasks.len()));
    }
}

/// The wait before the next read of a service with `tasks` tasks.
fn poll_period(tasks: usize) -> Duration {
    let thousands = u32::try_from(tasks / 1000).unwrap_or(u32::MAX);
    POLL_PERIOD
        .saturating_add(POLL_PERIOD_PER_1000_TASKS.saturating_mul(thousands))
        .min(POLL_PERIOD_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{Meta, ServiceSpec, TaskSpec, TaskStatus};

    fn service(replicas: u64, command: &str) -> Service {
        Service {
            id: "s".into(),
            spec: Some(ServiceSpec {
                name: "web".into(),
                mode: ServiceMode::Replicated as i32,
                replicas,
                task: Some(spec(command)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn spec(command: &str) -> TaskSpec {
        TaskSpec {
            command: command.into(),
            ..Default::default()
        }
    }

    fn task(id: &str, slot: u64, command: &str, state: TaskState, created_ms: i64) -> Task {
        Task {
            id: id.into(),
            service_id: "s".into(),
            slot,
            node_id: "n1".into(),
            desired_state: TaskState::Running as i32,
            spec: Some(spec(command)),
            meta: Some(Meta {
                created_at_ms: created_ms,
                ..Default::default()
            }),
            status: Some(TaskStatus {
                state: state as i32,
                err: if state == TaskState::Failed {
                    "exited with status 3".into()
                } else {
                    String::new()
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn large_services_are_read_less_often() {
        assert_eq!(poll_period(10), POLL_PERIOD);
        assert_eq!(poll_period(100_000), Duration::from_millis(5_500));
        assert_eq!(poll_period(10_000_000), POLL_PERIOD_MAX);
    }

    #[test]
    fn converged_only_once_every_wanted_task_ran_the_monitor_period() {
        let monitor = Duration::from_secs(5);
        let mut watch = Watch::new(HashSet::new(), monitor);
        let t0 = Instant::now();
        let tasks = [
            task("a", 1, "sleep", TaskState::Running, 1),
            task("b", 2, "sleep", TaskState::Starting, 1),
        ];
        let (verdict, lines) = watch.judge(&service(2, "sleep"), &tasks, t0);
        assert_eq!(
            verdict,
            Verdict::Waiting {
                running: 1,
                wanted: 2
            }
        );
        assert_eq!(lines, ["web.1: running", "web.2: starting"]);

        let tasks = [
            task("a", 1, "sleep", TaskState::Running, 1),
            task("b", 2, "sleep", TaskState::Running, 1),
        ];
        let (verdict, lines) = watch.judge(&service(2, "sleep"), &tasks, t0 + monitor);
        // b has run for no time yet.
        assert_eq!(
            verdict,
            Verdict::Waiting {
                running: 2,
                wanted: 2
            }
        );
        assert_eq!(lines, ["web.2: running"]);
        let (verdict, lines) = watch.judge(&service(2, "sleep"), &tasks, t0 + monitor * 2);
        assert_eq!(verdict, Verdict::Converged { running: 2 });
        assert!(lines.is_empty(), "nothing changed: {lines:?}");
    }

    #[test]
    fn a_task_of_the_old_spec_still_running_is_not_converged() {
        let mut watch = Watch::new(HashSet::new(), Duration::ZERO);
        let tasks = [task("old", 1, "sleep", TaskState::Running, 1)];
        let (verdict, _) = watch.judge(&service(1, "sleep2"), &tasks, Instant::now());
        assert_eq!(
            verdict,
            Verdict::Waiting {
                running: 0,
                wanted: 1
            }
        );
    }

    #[test]
    fn a_slot_failing_three_times_gives_up_with_the_last_error() {
        let mut watch = Watch::new(HashSet::new(), Duration::ZERO);
        let mut tasks = vec![
            task("a", 1, "false", TaskState::Failed, 1),
            task("b", 1, "false", TaskState::Failed, 2),
        ];
        let (verdict, lines) = watch.judge(&service(1, "false"), &tasks, Instant::now());
        assert!(matches!(verdict, Verdict::Waiting { .. }), "{verdict:?}");
        assert_eq!(lines, ["web.1: failed (exited with status 3)"]);
        tasks.push(task("c", 1, "false", TaskState::Failed, 3));
        let (verdict, lines) = watch.judge(&service(1, "false"), &tasks, Instant::now());
        assert_eq!(
            verdict,
            Verdict::Failed("web.1 failed 3 times; last: exited with status 3".into())
        );
        assert!(
            lines.is_empty(),
            "the slot's line did not change: {lines:?}"
        );
    }

    #[test]
    fn a_paused_or_rolled_back_update_fails_the_wait_with_its_message() {
        use crate::proto::objects::UpdateStatus;
        let with_state = |state: UpdateState| {
            let mut service = service(1, "sleep");
            service.update_status = Some(UpdateStatus {
                state: state as i32,
                message: "because".into(),
                ..Default::default()
            });
            service
        };
        let tasks = [task("a", 1, "sleep", TaskState::Running, 1)];
        let judge =
            |watch: &mut Watch, state| watch.judge(&with_state(state), &tasks, Instant::now()).0;
        let mut update = Watch::new(HashSet::new(), Duration::ZERO);
        assert_eq!(
            judge(&mut update, UpdateState::Paused),
            Verdict::Failed("the update was paused: because".into())
        );
        assert_eq!(
            judge(&mut update, UpdateState::RollbackCompleted),
            Verdict::Failed("the update was rolled back: because".into())
        );
        assert_eq!(
            judge(&mut update, UpdateState::Updating),
            Verdict::Converged { running: 1 }
        );
        let mut rollback = Watch::new(HashSet::new(), Duration::ZERO).for_rollback();
        assert_eq!(
            judge(&mut rollback, UpdateState::RollbackStarted),
            Verdict::Converged { running: 1 }
        );
        assert_eq!(
            judge(&mut rollback, UpdateState::RollbackPaused),
            Verdict::Failed("the rollback was paused: because".into())
        );
    }

    #[test]
    fn failures_from_before_the_command_do_not_count() {
        let before: HashSet<String> = ["a", "b", "c"].map(String::from).into();
        let mut watch = Watch::new(before, Duration::ZERO);
        let retired = |mut task: Task| {
            task.desired_state = TaskState::Shutdown as i32;
            task
        };
        let tasks = [
            retired(task("a", 1, "false", TaskState::Failed, 1)),
            retired(task("b", 1, "false", TaskState::Failed, 2)),
            retired(task("c", 1, "false", TaskState::Failed, 3)),
            task("d", 1, "false", TaskState::Running, 4),
        ];
        let (verdict, lines) = watch.judge(&service(1, "false"), &tasks, Instant::now());
        assert_eq!(verdict, Verdict::Converged { running: 1 });
        assert_eq!(lines, ["web.1: running"]);
    }
}
