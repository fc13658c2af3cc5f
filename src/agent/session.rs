//! The agent's side of the dispatcher: keeps one session with the leader, hands the
//! assignments it streams to a [`TaskSink`], heartbeats, and reports task status.
//!
//! Two threads: `agent-session` opens the session (a manager picked at random, the leader a
//! follower named first; swarmkit's backoff with jitter between attempts, [`SessionBackoff`])
//! and reads its stream; `agent-reporter` heartbeats the current session every
//! half period and sends the status reports it receives, in batches of at most
//! [`STATUS_UPDATES_MAX`]. A report that cannot be sent is kept
//! (the latest per task) and retried until delivered; each new session also asks the
//! [`TaskSink`] to report every task's latest status again ([`TaskSink::session_started`]),
//! so a manager that missed one learns it. Must never block the task runner:
//! reports arrive on a channel the runner only `try_send`s to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use rand::RngExt;

use super::TaskStatusReport;
use crate::ca::Role;
use crate::net::{CallOptions, Transport};
use crate::proto::dispatcher::rpc::{HEARTBEAT, SESSION, UPDATE_TASK_STATUS};
use crate::proto::dispatcher::{self as pb, STATUS_UPDATES_MAX};
use crate::proto::objects::{NodeDescription, NodeRole, Task, TaskStatus};
use crate::wire::{Code, Status};

/// What each failed attempt adds to the backoff before doubling the previous one
/// (swarmkit's `initialSessionFailureBackoff`): `min(100 ms + 2 · previous, max)`.
pub const SESSION_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest backoff between session attempts (swarmkit's `maxSessionFailureBackoff`).
pub const SESSION_BACKOFF_MAX: Duration = Duration::from_secs(8);
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
    /// A new session began: report every task's latest status again (its manager may have
    /// missed some). Nothing by default.
    fn session_started(&self) {}
}

/// The wait between session attempts: `min(100 ms + 2 · previous, cap)` after each failure,
/// back to zero once a session was up; each wait drawn uniformly from the upper half of the
/// backoff (jitter, so that agents cut off together do not come back together, while a
/// failing manager still sees at least half the backoff between attempts).
#[derive(Clone, Debug)]
pub struct SessionBackoff {
    previous: Duration,
    cap: Duration,
}

impl SessionBackoff {
    /// No failure yet; backoff up to [`SESSION_BACKOFF_MAX`].
    pub fn new() -> Self {
        SessionBackoff {
            previous: Duration::ZERO,
            cap: SESSION_BACKOFF_MAX,
        }
    }

    /// The backoff after one more failure, `min(100 ms + 2 · previous, cap)`, and the
    /// jittered wait to sleep, in `[backoff / 2, backoff]`.
    pub fn next_wait(&mut self) -> (Duration, Duration) {
        let backoff = (SESSION_BACKOFF_INITIAL + self.previous * 2).min(self.cap);
        self.previous = backoff;
        let half = backoff / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        let wait = half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
        (backoff, wait)
    }

    /// A session was up with heartbeat `period`: start over, and keep every later wait
    /// within half a period, so the agent is back well within the 3 periods a leader waits
    /// before it marks the node down (a shorter cap than swarmkit's 8 s when the period is
    /// under 16 s).
    pub fn session_was_up(&mut self, period: Duration) {
        self.previous = Duration::ZERO;
        self.cap = (period / 2).clamp(SESSION_BACKOFF_INITIAL, SESSION_BACKOFF_MAX);
    }
}

impl Default for SessionBackoff {
    fn default() -> Self {
        Self::new()
    }
}

/// The manager to try next: the leader a follower named, if it is one of `managers`;
/// otherwise one picked at random, other than `last` when there is a choice (all weigh the
/// same: the session messages carry no weights yet).
fn pick_manager(
    managers: &[String],
    last: Option<&str>,
    leader_hint: Option<&str>,
) -> Option<String> {
    if let Some(leader) = leader_hint.filter(|leader| managers.iter().any(|m| m == leader)) {
        return Some(leader.to_string());
    }
    let choices: Vec<&String> = managers
        .iter()
        .filter(|m| managers.len() == 1 || Some(m.as_str()) != last)
        .collect();
    if choices.is_empty() {
        return None;
    }
    let index = rand::rng().random_range(0..choices.len());
    Some(choices[index].clone())
}

/// How to reach the managers.
pub struct AgentConfig {
    /// Manager addresses to try, in order (the leader serves; others name it).
    pub managers: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// This node's client TLS configuration (its certificate is its identity).
    pub tls: Arc<rustls::ClientConfig>,
    /// Recorded in a new worker's Node object.
    pub hostname: String,
    /// Called with the cluster's network bootstrap keys (gossip encryption, oldest first)
    /// each time a session starts or the leader sends new ones; `None`: not wanted.
    pub network_keys: Option<NetworkKeysCallback>,
}

/// Receives the cluster's network bootstrap keys (see [`AgentConfig::network_keys`]). It
/// runs on the session thread: it must return at once.
pub type NetworkKeysCallback = Arc<dyn Fn(Vec<crate::proto::objects::EncryptionKey>) + Send + Sync>;

/// The running session and reporter threads. Stop with [`AgentSession::stop`].
pub struct AgentSession {
    stopping: Arc<AtomicBool>,
    current: Arc<Mutex<Option<Current>>>,
    certificate_role: Arc<Mutex<Option<Role>>>,
    threads: Vec<JoinHandle<()>>,
}

/// How many heartbeat periods without a successful heartbeat make the agent give a session
/// up and open a new one (the manager gives up after 3: the new session comes before the
/// node is marked down when the manager is reachable again).
const HEARTBEAT_FAILURE_PERIODS_MAX: u32 = 2;

/// The session the reporter uses: its id, its manager, its heartbeat period, and whether
/// the reporter found it dead (the manager no longer knows it, or heartbeats keep failing).
#[derive(Clone)]
struct Current {
    session_id: String,
    addr: String,
    period: Duration,
    broken: Arc<AtomicBool>,
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
    let mut backoff = SessionBackoff::new();
    let mut last: Option<String> = None;
    let mut leader_hint: Option<String> = None;
    while !stopping.load(Ordering::SeqCst) {
        let managers = (config.managers)();
        let mut retry_after = None;
        if let Some(addr) = pick_manager(&managers, last.as_deref(), leader_hint.as_deref()) {
            leader_hint = None;
            let outcome = session(transport, config, &addr, sink, stopping, current);
            if let Some(session) = current.lock().take() {
                backoff.session_was_up(session.period);
            }
            if let Err(status) = outcome {
                log::debug!("agent: session with {addr}: {status}");
                // A manager that refuses for a while (the registration rate limit) says
                // how long: no attempt before that.
                retry_after = status.retry_after();
                // A follower names the leader: go there next if it is one of ours.
                leader_hint = status.leader_hint().map(str::to_string);
            }
            last = Some(addr);
        }
        let (_, wait) = backoff.next_wait();
        sleep_unless_stopping(wait.max(retry_after.unwrap_or_default()), stopping);
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
    let mut description = sink.description();
    if description.addr.is_empty() {
        description.addr = super::host::local_addr_towards(addr).unwrap_or_default();
    }
    let request = pb::SessionRequest {
        hostname: config.hostname.clone(),
        description: Some(description),
    };
    let mut stream =
        channel.call_server_stream(SESSION, &request, CallOptions { timeout: None })?;
    // The previous message was a part of a complete set with more parts to come.
    let mut in_set = false;
    while !stopping.load(Ordering::SeqCst) {
        if current
            .lock()
            .as_ref()
            .is_some_and(|session| session.broken.load(Ordering::SeqCst))
        {
            stream.cancel();
            return Err(Status::unavailable(
                "the session's heartbeats failed; opening a new one",
            ));
        }
        let message = match stream.recv_timeout(STOP_CHECK_INTERVAL) {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(()),
            Err(status) if status.code == Code::DeadlineExceeded => continue,
            Err(status) => return Err(status),
        };
        match message.message {
            Some(pb::session_message::Message::Started(started)) => {
                log::info!("agent: session {} with {addr}", started.session_id);
                if let Some(deliver) = &config.network_keys {
                    deliver(started.network_keys.clone());
                }
                sink.session_started();
                *current.lock() = Some(Current {
                    session_id: started.session_id,
                    addr: addr.to_string(),
                    period: Duration::from_millis(
                        u64::try_from(started.heartbeat_period_ms).unwrap_or(1000),
                    )
                    .max(Duration::from_millis(10)),
                    broken: Arc::new(AtomicBool::new(false)),
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
            Some(pb::session_message::Message::NetworkKeys(keys)) => {
                if let Some(deliver) = &config.network_keys {
                    deliver(keys.keys);
                }
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
        // The session heartbeated and when it last succeeded (or began).
        let mut beating: Option<(String, std::time::Instant)> = None;
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
            if beating
                .as_ref()
                .is_none_or(|(id, _)| *id != session.session_id)
            {
                beating = Some((session.session_id.clone(), std::time::Instant::now()));
            }
            if last_beat.elapsed() >= session.period / 2 {
                last_beat = std::time::Instant::now();
                let last_ok = &mut beating.as_mut().expect("set above").1;
                self.heartbeat(&channel, &session, last_ok);
            }
        }
    }

    /// Heartbeats `session`; marks it broken when the manager does not know it, or when no
    /// heartbeat succeeded since `last_ok` for [`HEARTBEAT_FAILURE_PERIODS_MAX`] periods (a
    /// link cut: the session thread then opens a new one, whose complete set and repeated
    /// reports bring both sides back in step; nothing is stopped meanwhile).
    fn heartbeat(
        &self,
        channel: &crate::net::Channel,
        session: &Current,
        last_ok: &mut std::time::Instant,
    ) {
        let request = pb::HeartbeatRequest {
            session_id: session.session_id.clone(),
        };
        // A heartbeat slower than a period is as good as lost.
        let timeout = session.period.min(CALL_TIMEOUT);
        match channel.call(HEARTBEAT, &request, CallOptions::timeout(timeout)) {
            Ok(response) => {
                *last_ok = std::time::Instant::now();
                // The manager may change the period (cluster settings, per-agent jitter).
                if let Ok(period_ms) = u64::try_from(response.heartbeat_period_ms)
                    && period_ms > 0
                    && let Some(current) = self
                        .current
                        .lock()
                        .as_mut()
                        .filter(|current| current.session_id == session.session_id)
                {
                    current.period =
                        Duration::from_millis(period_ms).max(Duration::from_millis(10));
                }
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
            Err(status) => {
                log::debug!("agent: heartbeat: {status}");
                let unknown = status.code == Code::NotFound;
                if unknown || last_ok.elapsed() >= session.period * HEARTBEAT_FAILURE_PERIODS_MAX {
                    log::info!(
                        "agent: lost session {} with {} ({status}); opening a new one, tasks \
                         keep running",
                        session.session_id,
                        session.addr
                    );
                    session.broken.store(true, Ordering::SeqCst);
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_follows_100ms_plus_twice_the_previous_up_to_8s_with_jitter() {
        let mut backoff = SessionBackoff::new();
        let mut expected = Duration::ZERO;
        for _ in 0..20 {
            expected = (Duration::from_millis(100) + expected * 2).min(Duration::from_secs(8));
            let (bound, wait) = backoff.next_wait();
            assert_eq!(bound, expected);
            assert!(
                wait >= bound / 2 && wait <= bound,
                "{wait:?} outside {bound:?}"
            );
        }
        assert_eq!(expected, Duration::from_secs(8));
        let firsts: Vec<u64> = {
            let mut b = SessionBackoff::new();
            (0..7)
                .map(|_| u64::try_from(b.next_wait().0.as_millis()).unwrap())
                .collect()
        };
        assert_eq!(firsts, [100, 300, 700, 1500, 3100, 6300, 8000]);
    }

    #[test]
    fn a_session_that_was_up_starts_the_backoff_over_within_half_a_period() {
        let mut backoff = SessionBackoff::new();
        for _ in 0..10 {
            backoff.next_wait();
        }
        backoff.session_was_up(Duration::from_secs(2));
        assert_eq!(backoff.next_wait().0, Duration::from_millis(100));
        for _ in 0..10 {
            let (bound, wait) = backoff.next_wait();
            assert!(bound <= Duration::from_secs(1), "{bound:?}");
            assert!(wait <= Duration::from_secs(1));
        }
        // A long period keeps swarmkit's cap.
        backoff.session_was_up(Duration::from_secs(60));
        let last = (0..20).map(|_| backoff.next_wait().0).last().unwrap();
        assert_eq!(last, SESSION_BACKOFF_MAX);
    }

    #[test]
    fn managers_are_picked_at_random_the_named_leader_first() {
        let managers: Vec<String> = ["a:1", "b:1", "c:1"].map(String::from).to_vec();
        assert_eq!(
            pick_manager(&managers, Some("a:1"), Some("c:1")).as_deref(),
            Some("c:1")
        );
        // A leader we do not know is not followed.
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let picked = pick_manager(&managers, Some("a:1"), Some("z:9")).unwrap();
            assert_ne!(picked, "a:1", "the manager just tried is not picked again");
            seen.insert(picked);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(
            pick_manager(&managers[..1], Some("a:1"), None).as_deref(),
            Some("a:1")
        );
        assert_eq!(pick_manager(&[], None, None), None);
    }
}
