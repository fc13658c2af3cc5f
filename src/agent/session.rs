//! The agent's side of the dispatcher: keeps one session with the leader, hands the
//! assignments it streams to a [`TaskSink`], heartbeats, and reports task status.
//!
//! Two threads: `agent-session` opens the session (trying each manager in turn, with
//! backoff) and reads its stream; `agent-reporter` heartbeats the current session every
//! half period and sends the status reports it receives, in batches of at most
//! [`STATUS_UPDATES_MAX`]. A report that cannot be sent is kept
//! (the latest per task) and sent on the next session. Must never block the task runner:
//! reports arrive on a channel the runner only `try_send`s to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;

use super::TaskStatusReport;
use crate::ca::Role;
use crate::net::{CallOptions, Transport};
use crate::proto::dispatcher::rpc::{HEARTBEAT, SESSION, UPDATE_TASK_STATUS};
use crate::proto::dispatcher::{self as pb, STATUS_UPDATES_MAX};
use crate::proto::objects::{NodeDescription, NodeRole, Task, TaskStatus};
use crate::wire::{Code, Status};

/// First wait before reopening a failed session; doubles up to [`SESSION_BACKOFF_MAX`].
pub const SESSION_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest wait between session attempts.
pub const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a heartbeat or status call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the reporter wakes with nothing to report (to check for stop).
const REPORTER_POLL: Duration = Duration::from_millis(100);
/// How often the session thread, waiting for assignments, checks for stop.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Where the session delivers the node's assignments.
pub trait TaskSink: Send + Sync {
    /// `tasks` is a part of the complete set assigned to this node: `first` starts a new
    /// set, `last` ends it (then stop anything the set's parts did not name). A set of any
    /// size arrives in parts of at most [`pb::ASSIGNMENTS_BYTES_MAX`].
    fn assign_part(&self, tasks: Vec<Task>, first: bool, last: bool);
    /// `changed` tasks were created or changed; `removed` are no longer assigned.
    fn update(&self, changed: Vec<Task>, removed: Vec<String>);
    /// What the node running these tasks says about itself in each session request (its
    /// capacity, which the scheduler respects). Nothing by default.
    fn description(&self) -> NodeDescription {
        NodeDescription::default()
    }
}

/// How to reach the managers.
pub struct AgentConfig {
    /// Manager addresses to try, in order (the leader serves; others name it).
    pub managers: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// This node's client TLS configuration (its certificate is its identity).
    pub tls: Arc<rustls::ClientConfig>,
    /// Recorded in a new worker's Node object.
    pub hostname: String,
}

/// The running session and reporter threads. Stop with [`AgentSession::stop`].
pub struct AgentSession {
    stopping: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Current>>>,
    certificate_role: Arc<Mutex<Option<Role>>>,
    threads: Vec<JoinHandle<()>>,
}

/// The session the reporter uses: its id, its manager, its heartbeat period.
#[derive(Clone)]
struct Current {
    session_id: String,
    addr: String,
    period: Duration,
}

impl AgentSession {
    /// Starts both threads.
    ///
    /// # Errors
    /// The OS error if a thread cannot start.
    pub fn start(
        transport: Arc<Transport>,
        config: AgentConfig,
        sink: Arc<dyn TaskSink>,
        reports: Receiver<TaskStatusReport>,
    ) -> std::io::Result<AgentSession> {
        let stopping = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(None));
        let certificate_role = Arc::new(Mutex::new(None));
        let config = Arc::new(config);
        let session = {
            let (transport, config, stopping, current) = (
                transport.clone(),
                config.clone(),
                stopping.clone(),
                current.clone(),
            );
            std::thread::Builder::new()
                .name("agent-session".into())
                .spawn(move || run_sessions(&transport, &config, &*sink, &stopping, &current))?
        };
        let reporter = {
            let (stopping, current, role) =
                (stopping.clone(), current.clone(), certificate_role.clone());
            std::thread::Builder::new()
                .name("agent-reporter".into())
                .spawn(move || {
                    let reporter = Reporter {
                        transport: &transport,
                        config: &config,
                        stopping: &stopping,
                        current: &current,
                        certificate_role: &role,
                    };
                    reporter.run(&reports);
                })?
        };
        Ok(AgentSession {
            stopping,
            current,
            certificate_role,
            threads: vec![session, reporter],
        })
    }

    /// The role the cluster wants this node's certificate to have, from the latest
    /// heartbeat answer (`None` until one said): a node promoted to manager, or whose
    /// demotion is complete, sees it here within half a heartbeat period.
    pub fn certificate_role(&self) -> Option<Role> {
        *self.certificate_role.lock()
    }

    /// The manager the current session is with, if one is open: the leader (only the
    /// leader serves sessions).
    pub fn manager_addr(&self) -> Option<String> {
        self.current.lock().as_ref().map(|c| c.addr.clone())
    }

    /// The current session's id, if one is open (for tests and status displays).
    pub fn session_id(&self) -> Option<String> {
        self.current.lock().as_ref().map(|c| c.session_id.clone())
    }

    /// Waits until the reporter has sent every report the runner handed it, once the
    /// runner's end of the report channel is closed (its shutdown), for at most `timeout`.
    /// True if they were all delivered.
    pub fn wait_reports_delivered(&self, timeout: Duration) -> bool {
        let give_up = std::time::Instant::now() + timeout;
        let reporter = &self.threads[1];
        while !reporter.is_finished() {
            if std::time::Instant::now() >= give_up {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Stops both threads: the session stream is cancelled, reports not yet sent are
    /// dropped (the next session's complete set and reports start over). Joins them.
    pub fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        for thread in self.threads {
            if thread.join().is_err() {
                log::error!("an agent session thread panicked");
            }
        }
    }
}

fn run_sessions(
    transport: &Transport,
    config: &AgentConfig,
    sink: &dyn TaskSink,
    stopping: &AtomicBool,
    current: &Mutex<Option<Current>>,
) {
    let mut backoff = SESSION_BACKOFF_INITIAL;
    // Retries stay well within the time a leader waits before it declares this node down
    // (three heartbeat periods): at most half a period apart once a period is known.
    let mut backoff_max = SESSION_BACKOFF_MAX;
    let mut next_manager = 0usize;
    while !stopping.load(Ordering::SeqCst) {
        let managers = (config.managers)();
        let mut redirect = None;
        let mut retry_after = None;
        if let Some(addr) = managers.get(next_manager % managers.len().max(1)).cloned() {
            let outcome = session(transport, config, &addr, sink, stopping, current);
            if let Some(session) = current.lock().take() {
                // It was up: the next attempt starts over quickly.
                backoff = SESSION_BACKOFF_INITIAL;
                backoff_max =
                    (session.period / 2).clamp(SESSION_BACKOFF_INITIAL, SESSION_BACKOFF_MAX);
            }
            if let Err(status) = outcome {
                log::debug!("agent: session with {addr}: {status}");
                // A manager that refuses for a while (the registration rate limit) says
                // how long: no attempt before that.
                retry_after = status.retry_after();
                // A follower names the leader: go there next if it is one of ours.
                redirect = status
                    .leader_hint()
                    .and_then(|leader| managers.iter().position(|m| m == leader));
            }
        }
        next_manager = redirect.unwrap_or(next_manager.wrapping_add(1));
        sleep_unless_stopping(backoff.max(retry_after.unwrap_or_default()), stopping);
        backoff = (backoff * 2).min(backoff_max);
    }
}

/// One session with `addr`, until its stream ends or the agent stops.
fn session(
    transport: &Transport,
    config: &AgentConfig,
    addr: &str,
    sink: &dyn TaskSink,
    stopping: &AtomicBool,
    current: &Mutex<Option<Current>>,
) -> Result<(), Status> {
    let channel = transport.channel(addr, &config.tls);
    let request = pb::SessionRequest {
        hostname: config.hostname.clone(),
        description: Some(sink.description()),
    };
    let mut stream =
        channel.call_server_stream(SESSION, &request, CallOptions { timeout: None })?;
    // The previous message was a part of a complete set with more parts to come.
    let mut in_set = false;
    while !stopping.load(Ordering::SeqCst) {
        let message = match stream.recv_timeout(STOP_CHECK_INTERVAL) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            Err(status) if status.code == Code::DeadlineExceeded => continue,
            Err(status) => return Err(status),
        };
        match message.message {
            Some(pb::session_message::Message::Started(started)) => {
                log::info!("agent: session {} with {addr}", started.session_id);
                *current.lock() = Some(Current {
                    session_id: started.session_id,
                    addr: addr.to_string(),
                    period: Duration::from_millis(
                        u64::try_from(started.heartbeat_period_ms).unwrap_or(1000),
                    ),
                });
            }
            Some(pb::session_message::Message::Assignments(assignments))
                if assignments.complete || in_set =>
            {
                sink.assign_part(assignments.tasks, assignments.complete, !assignments.more);
                in_set = assignments.more;
            }
            Some(pb::session_message::Message::Assignments(assignments)) => {
                sink.update(assignments.tasks, assignments.removed);
            }
            None => {}
        }
    }
    stream.cancel();
    Ok(())
}

/// The `agent-reporter` thread's view of the session.
struct Reporter<'a> {
    transport: &'a Transport,
    config: &'a AgentConfig,
    stopping: &'a AtomicBool,
    current: &'a Mutex<Option<Current>>,
    certificate_role: &'a Mutex<Option<Role>>,
}

impl Reporter<'_> {
    fn run(&self, reports: &Receiver<TaskStatusReport>) {
        // Latest unsent status per task, in task id order.
        let mut pending: BTreeMap<String, TaskStatus> = BTreeMap::new();
        let mut last_beat = std::time::Instant::now();
        // The runner closed its end (it stopped): deliver what is pending, then end.
        let mut closed = false;
        while !self.stopping.load(Ordering::SeqCst) {
            if closed && pending.is_empty() {
                return;
            }
            match reports.recv_timeout(REPORTER_POLL) {
                Ok(report) => {
                    pending.insert(report.task_id, report.status);
                    while let Ok(report) = reports.try_recv() {
                        pending.insert(report.task_id, report.status);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    // Nothing more can arrive: no need to wait for the poll period.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let Some(session) = self.current.lock().clone() else {
                continue;
            };
            let channel = self.transport.channel(&session.addr, &self.config.tls);
            if !pending.is_empty() {
                send_reports(&channel, &session, &mut pending);
            }
            if last_beat.elapsed() >= session.period / 2 {
                last_beat = std::time::Instant::now();
                self.heartbeat(&channel, &session);
            }
        }
    }

    fn heartbeat(&self, channel: &crate::net::Channel, session: &Current) {
        let request = pb::HeartbeatRequest {
            session_id: session.session_id.clone(),
        };
        match channel.call(HEARTBEAT, &request, CallOptions::timeout(CALL_TIMEOUT)) {
            Ok(response) => {
                let role = response.certificate_role.map(|r| {
                    if r == NodeRole::Manager as i32 {
                        Role::Manager
                    } else {
                        Role::Worker
                    }
                });
                if role.is_some() {
                    *self.certificate_role.lock() = role;
                }
            }
            Err(status) => log::debug!("agent: heartbeat: {status}"),
        }
    }
}

/// Sends the pending reports in batches; what fails stays pending.
fn send_reports(
    channel: &crate::net::Channel,
    session: &Current,
    pending: &mut BTreeMap<String, TaskStatus>,
) {
    while !pending.is_empty() {
        let batch: Vec<pb::TaskStatusUpdate> = pending
            .iter()
            .take(STATUS_UPDATES_MAX)
            .map(|(task_id, status)| pb::TaskStatusUpdate {
                task_id: task_id.clone(),
                status: Some(status.clone()),
            })
            .collect();
        let request = pb::UpdateTaskStatusRequest {
            session_id: session.session_id.clone(),
            updates: batch,
        };
        match channel.call(
            UPDATE_TASK_STATUS,
            &request,
            CallOptions::timeout(CALL_TIMEOUT),
        ) {
            Ok(_) => {
                for update in &request.updates {
                    // A newer status may have arrived meanwhile: keep it.
                    if pending.get(&update.task_id) == update.status.as_ref() {
                        pending.remove(&update.task_id);
                    }
                }
            }
            Err(status) => {
                log::debug!("agent: status reports: {status}");
                return;
            }
        }
    }
}

fn sleep_unless_stopping(wait: Duration, stopping: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut waited = Duration::ZERO;
    while waited < wait && !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(step);
        waited += step;
    }
}
