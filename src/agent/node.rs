//! One node's agent: its task runner and its dispatcher session, wired together.
//!
//! ```text
//!  leader's dispatcher ──assignments──► agent-session ──TaskSink──► TaskRunner (agent-tasks)
//!          ▲                                                            │
//!          └──── UpdateTaskStatus, Heartbeat ◄── agent-reporter ◄──reports (bounded)
//! ```
//!
//! Every manager runs one in-process (swarmkit's managers are nodes too); a worker runs one
//! with `flotilla agent`. Must never hold component logic of its own: it only connects the
//! session's assignments to the runner and the runner's reports to the session.

use std::sync::Arc;

use crate::net::Transport;
use crate::proto::objects::{NodeDescription, Task};

use super::logs::LogService;
use super::session::{AgentConfig, AgentSession, TaskSink};
use super::tasks::{REPORTS_QUEUE_LEN_DEFAULT, RunnerConfig, RunnerError, TaskRunner};

/// How long a stopping agent waits for the final status of its tasks to reach the
/// managers before it closes its session.
pub const FINAL_REPORTS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The task runner could not start.
    #[error(transparent)]
    Runner(#[from] RunnerError),
    /// A session thread could not start.
    #[error("cannot start the agent's session threads: {0}; the host is out of threads")]
    Session(std::io::Error),
}

/// The running agent. Stop it with [`Agent::stop`].
pub struct Agent {
    session: Option<AgentSession>,
    runner: Arc<TaskRunner>,
    logs: Arc<LogService>,
}

/// Hands what the session receives to the runner (log subscriptions to the log service).
struct RunnerSink(Arc<TaskRunner>, Arc<LogService>);

impl TaskSink for RunnerSink {
    fn assign_part(&self, tasks: Vec<Task>, first: bool, last: bool) {
        if let Err(error) = self.0.assign_part(tasks, first, last) {
            log::error!("agent: cannot take the assignment set: {error}");
        }
    }

    fn update(&self, changed: Vec<Task>, removed: Vec<String>) {
        if let Err(error) = self.0.update(changed, removed) {
            log::error!("agent: cannot take an assignment change: {error}");
        }
    }

    fn values(
        &self,
        secrets: Vec<crate::proto::objects::Secret>,
        configs: Vec<crate::proto::objects::Config>,
    ) {
        self.0.receive_values(secrets, configs);
    }

    fn session_started(&self) {
        if let Err(error) = self.0.resync_reports() {
            log::debug!("agent: cannot report the tasks again: {error}");
        }
    }

    fn fence_deadline(&self, deadline: std::time::Instant, why: String) {
        if let Err(error) = self.0.set_fence_deadline(deadline, why) {
            log::debug!("agent: cannot set the fence deadline: {error}");
        }
    }

    fn log_subscription(
        &self,
        subscription: crate::proto::dispatcher::LogSubscription,
        session_id: &str,
        addr: &str,
    ) {
        self.1.subscribe(subscription, session_id, addr);
    }

    fn description(&self) -> NodeDescription {
        super::host::describe(u32::try_from(self.0.tasks_running_max()).unwrap_or(u32::MAX))
    }
}

impl Agent {
    /// Starts the task runner (tasks live under `runner.work_dir`) and the session with
    /// the managers `session` names.
    ///
    /// # Errors
    /// [`AgentError`]: the work directory or a thread could not be created.
    pub fn start(
        transport: Arc<Transport>,
        session: AgentConfig,
        runner: RunnerConfig,
    ) -> Result<Agent, AgentError> {
        let (reports_tx, reports_rx) = crossbeam_channel::bounded(REPORTS_QUEUE_LEN_DEFAULT);
        let work_dir = runner.work_dir.clone();
        let runner = Arc::new(TaskRunner::start(runner, reports_tx)?);
        let logs = Arc::new(
            LogService::start(work_dir, transport.clone(), session.tls.clone())
                .map_err(AgentError::Session)?,
        );
        let sink = Arc::new(RunnerSink(runner.clone(), logs.clone()));
        let session = AgentSession::start(transport, session, sink, reports_rx)
            .map_err(AgentError::Session)?;
        Ok(Agent {
            session: Some(session),
            runner,
            logs,
        })
    }

    /// The role the cluster wants this node's certificate to have (see
    /// [`AgentSession::certificate_role`]).
    pub fn certificate_role(&self) -> Option<crate::ca::Role> {
        self.session
            .as_ref()
            .and_then(AgentSession::certificate_role)
    }

    /// The manager the session is with (the leader), if one is open.
    pub fn manager_addr(&self) -> Option<String> {
        self.session.as_ref().and_then(AgentSession::manager_addr)
    }

    /// Stops every task process (SIGTERM, SIGKILL after the grace), gives the session up
    /// to [`FINAL_REPORTS_WAIT`] to deliver their final status (the managers then see them
    /// stopped, not still running), then stops the session and joins all threads.
    pub fn stop(mut self) {
        // The session holds the other reference (its sink); it only calls the runner, which
        // refuses assignments once stopping.
        let unsent = self.runner.stop();
        if !unsent.is_empty() {
            log::info!(
                "agent: {} final task reports did not fit the report queue",
                unsent.len()
            );
        }
        if let Some(session) = self.session.take() {
            if !session.wait_reports_delivered(FINAL_REPORTS_WAIT) {
                log::info!(
                    "agent: final task reports not all delivered within {FINAL_REPORTS_WAIT:?}"
                );
            }
            session.stop();
        }
        // The session held the other reference (its sink), and it is joined.
        match Arc::try_unwrap(self.logs) {
            Ok(logs) => logs.stop(),
            Err(_) => log::error!("agent: the log service is still shared at stop"),
        }
    }
}
