//! The agent's side of the dispatcher: keeps one session with the leader, hands the
//! assignments it streams to a [`TaskSink`], heartbeats, and reports task status.
//!
//! Two threads: `agent-session` opens the session (a manager picked at random in proportion
//! to its weight, the leader a follower named first, known or not: [`super::managers`];
//! swarmkit's backoff with jitter between attempts, [`SessionBackoff`]; a redirect to a named
//! leader goes at once, up to [`REDIRECTS_MAX`] in a row) and reads its stream, taking the
//! manager list each session sends (`SessionStarted.managers`, `ManagersChanged`);
//! `agent-reporter` heartbeats the current session every half period and sends the status
//! reports it receives, in batches of at most [`STATUS_UPDATES_MAX`] and 1 MiB. A report that cannot
//! be sent is kept (the latest per task) and retried until delivered; each new session also
//! asks the [`TaskSink`] to report every task's latest status again
//! ([`TaskSink::session_started`]), so a manager that missed one learns it. Must never block
//! the task runner: reports arrive on a channel the runner only `try_send`s to.
//!
//! **Self-fencing.** The managers may give this node's tasks to other nodes once it has been
//! silent for `tasks_reassigned_after_ms` (each heartbeat answer says: the node-down grace,
//! 3 heartbeat periods, then the orchestrator's wait for a down node; until an answer says,
//! [`REASSIGNED_AFTER_FLOOR`], the least any manager uses), counted on the leader from when
//! it last heard from the node, which is after the agent sent that call. So the agent counts
//! from the send time of its last acknowledged contact (a heartbeat answered, or a session
//! request answered by `SessionStarted`) and hands the task runner the deadline `sent +
//! reassigned_after − FENCE_MARGIN` ([`TaskSink::fence_deadline`]); past it the runner stops
//! every task itself (SIGKILL after `FENCE_KILL_GRACE`, 1 s) and reports them FAILED, and
//! starts none until the next contact. [`FENCE_MARGIN`] (2 s) covers that kill grace, the
//! runner's 50 ms poll and clock-rate differences; the replacement then still has to be
//! scheduled, sent and started elsewhere. A link cut shorter than that stops nothing: the
//! next session moves the deadline forward. At start (adopted processes of a previous run),
//! the deadline counts from the last contact the previous run recorded
//! ([`super::last_contact`]), or from the start with the floor when there is no record.
//!
//! **Logging.** A session that ends is logged at INFO once; while no session opens, each
//! distinct (manager, outcome) is logged once at WARN (a follower naming the leader, an
//! unreachable manager, a refusal), every retry only at DEBUG; the session that finally opens
//! says how many attempts failed.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::Mutex;
use rand::RngExt;

use super::TaskStatusReport;
use super::last_contact::{Contact, LastContact, deadline_at_start};
use super::managers::{Managers, RememberManagers};
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
/// How long before the managers may give its tasks to other nodes the agent stops them
/// (see the module doc: covers the fence's kill grace, 1 s, and the runner's poll).
pub const FENCE_MARGIN: Duration = Duration::from_secs(2);
/// Until a heartbeat answer says otherwise, the silence after which the managers may give
/// the node's tasks to other nodes: the least a manager of this build uses (3 heartbeat
/// periods of at least 1 s, then the orchestrator's 10 s for a down node).
pub const REASSIGNED_AFTER_FLOOR: Duration = Duration::from_secs(13);
/// Redirects to a leader a follower named that are followed at once, in a row; past it the
/// backoff applies (two managers naming each other must not make the agent spin).
pub const REDIRECTS_MAX: u32 = 3;
/// The pause before following a redirect.
const REDIRECT_WAIT: Duration = Duration::from_millis(20);
/// Distinct (manager, outcome) pairs logged while no session opens (a bound on the memory
/// of what was said; the rest go to DEBUG).
const ATTEMPT_OUTCOMES_LOGGED_MAX: usize = 64;

/// Where the session delivers the node's assignments.
pub trait TaskSink: Send + Sync {
    /// `tasks` is a part of the complete set assigned to this node: `first` starts a new
    /// set, `last` ends it (then stop anything the set's parts did not name). A set of any
    /// size arrives in parts of at most [`pb::ASSIGNMENTS_BYTES_MAX`].
    fn assign_part(&self, tasks: Vec<Task>, first: bool, last: bool);
    /// `changed` tasks were created or changed; `removed` are no longer assigned.
    fn update(&self, changed: Vec<Task>, removed: Vec<String>);
    /// The secret and config values the tasks of the message read, handed over before its
    /// tasks. Dropped by default.
    fn values(
        &self,
        secrets: Vec<crate::proto::objects::Secret>,
        configs: Vec<crate::proto::objects::Config>,
    ) {
        let _ = (secrets, configs);
    }
    /// What the node running these tasks says about itself in each session request (its
    /// capacity, which the scheduler respects). Nothing by default.
    fn description(&self) -> NodeDescription {
        NodeDescription::default()
    }
    /// A new session began: report every task's latest status again (its manager may have
    /// missed some). Nothing by default.
    fn session_started(&self) {}
    /// The managers heard from the agent: unless this is called again with a later
    /// deadline first, stop every task at `deadline` (saying `why`) and start none until
    /// then (see the module doc's self-fencing). Nothing by default.
    fn fence_deadline(&self, deadline: Instant, why: String) {
        let _ = (deadline, why);
    }
    /// The leader asks for task logs (session `session_id` with the manager at `addr`,
    /// where they are published). Nothing by default.
    fn log_subscription(&self, subscription: pb::LogSubscription, session_id: &str, addr: &str) {
        let _ = (subscription, session_id, addr);
    }
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

/// How to reach the managers.
pub struct AgentConfig {
    /// Manager addresses to try (the leader serves; others name it), until a session sends
    /// the list of managers (when `remember_managers` is set).
    pub managers: Box<dyn Fn() -> Vec<String> + Send + Sync>,
    /// `Some`: take the manager lists sessions send instead of `managers`, and keep each
    /// with this callback (a worker's `<state-dir>/managers`). `None`: always `managers` (a
    /// manager's own agent, which follows its Raft node's view of the leader).
    pub remember_managers: Option<RememberManagers>,
    /// This node's client TLS configuration (its certificate is its identity).
    pub tls: Arc<rustls::ClientConfig>,
    /// Recorded in a new worker's Node object.
    pub hostname: String,
    /// Called with the cluster's network bootstrap keys (gossip encryption, oldest first)
    /// each time a session starts or the leader sends new ones; `None`: not wanted.
    pub network_keys: Option<NetworkKeysCallback>,
    /// Where acknowledged contacts are recorded and read back at start (see
    /// [`super::last_contact`]); `None`: the adopted processes' deadline counts from the
    /// start with the floor.
    pub last_contact: Option<LastContact>,
}

/// What both threads use to reach the managers.
struct Setup {
    managers: Managers,
    tls: Arc<rustls::ClientConfig>,
    hostname: String,
    /// The latest `tasks_reassigned_after_ms` a heartbeat answer gave.
    reassigned_after: Mutex<Duration>,
    /// Where each acknowledged contact is recorded for a restarted agent.
    last_contact: Option<LastContact>,
    /// Where the cluster's network bootstrap keys go (the node's gossip keyring).
    network_keys: Option<NetworkKeysCallback>,
}

impl Setup {
    /// The leader acknowledged a call sent at `sent_at` (a heartbeat, or the session
    /// request): the task runner's fence deadline moves to `sent_at + reassigned_after −
    /// FENCE_MARGIN`, with `reassigned_after` as the answer says (if it does).
    fn contact(&self, sink: &dyn TaskSink, sent_at: Instant, reassigned_after: Option<Duration>) {
        let after = {
            let mut known = self.reassigned_after.lock();
            if let Some(after) = reassigned_after {
                *known = after;
            }
            *known
        };
        if let Some(record) = &self.last_contact {
            let ago_ms = i64::try_from(sent_at.elapsed().as_millis()).unwrap_or(i64::MAX);
            let contact = Contact {
                sent_at_unix_ms: crate::util::clock::unix_now_ms().saturating_sub(ago_ms),
                reassigned_after: after,
            };
            if let Err(error) = record.save(contact) {
                log::debug!("agent: cannot record the last contact: {error}");
            }
        }
        sink.fence_deadline(
            sent_at + after.saturating_sub(FENCE_MARGIN),
            fence_reason(after),
        );
    }
}

/// Processes adopted from a previous run: no contact yet in this one, so their deadline
/// counts from the previous run's last contact, if recorded.
fn fence_adopted_processes(sink: &dyn TaskSink, recorded: Option<Contact>, after: Duration) {
    let now = Instant::now();
    let now_unix_ms = crate::util::clock::unix_now_ms();
    let deadline = deadline_at_start(
        recorded,
        now,
        now_unix_ms,
        REASSIGNED_AFTER_FLOOR,
        FENCE_MARGIN,
    );
    if let Some(contact) = recorded {
        log::info!(
            "agent: the managers last acknowledged this node {} s ago; processes a previous \
             run left stop in {} s unless a manager answers first",
            now_unix_ms.saturating_sub(contact.sent_at_unix_ms).max(0) / 1000,
            deadline.saturating_duration_since(now).as_secs()
        );
    }
    sink.fence_deadline(deadline, fence_reason(after));
}

/// Why the tasks stop when the fence deadline passes.
fn fence_reason(reassigned_after: Duration) -> String {
    format!(
        "no heartbeat acknowledged by the managers for {} s; they may give this node's tasks \
         to other nodes {} s after the last one, so the agent stops them first (a task must \
         not run twice); they are replaced by the orchestrator",
        reassigned_after.saturating_sub(FENCE_MARGIN).as_secs(),
        reassigned_after.as_secs()
    )
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
        let AgentConfig {
            managers,
            remember_managers,
            tls,
            hostname,
            network_keys,
            last_contact,
        } = config;
        let recorded = last_contact.as_ref().and_then(LastContact::load);
        let config = Arc::new(Setup {
            managers: Managers::new(managers, remember_managers),
            tls,
            hostname,
            reassigned_after: Mutex::new(
                recorded.map_or(REASSIGNED_AFTER_FLOOR, |c| c.reassigned_after),
            ),
            network_keys,
            last_contact,
        });
        fence_adopted_processes(&*sink, recorded, *config.reassigned_after.lock());
        let session = {
            let (transport, config, stopping, current, sink) = (
                transport.clone(),
                config.clone(),
                stopping.clone(),
                current.clone(),
                sink.clone(),
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
                        sink: &*sink,
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
    config: &Setup,
    sink: &dyn TaskSink,
    stopping: &AtomicBool,
    current: &Mutex<Option<Current>>,
) {
    let mut backoff = SessionBackoff::new();
    let mut last: Option<String> = None;
    let mut leader_hint: Option<String> = None;
    let mut redirects = 0;
    let mut attempts = AttemptLog::default();
    while !stopping.load(Ordering::SeqCst) {
        let mut retry_after = None;
        let Some(addr) = config
            .managers
            .pick(last.as_deref(), leader_hint.take().as_deref())
        else {
            attempts.no_manager();
            sleep_unless_stopping(backoff.next_wait().1, stopping);
            continue;
        };
        let outcome = session(
            transport,
            config,
            &addr,
            sink,
            stopping,
            current,
            &mut attempts,
        );
        let was_up = current.lock().take();
        if let Some(session) = &was_up {
            backoff.session_was_up(session.period);
        }
        if let Err(status) = &outcome {
            // A manager that refuses for a while (the registration rate limit) says how
            // long: no attempt before that.
            retry_after = status.retry_after();
            // A follower (or a leader that stepped down) names the leader: go there next,
            // known or not.
            leader_hint = status.leader_hint().map(str::to_string);
        }
        match &outcome {
            Err(status) if was_up.is_some() => {
                log::info!("agent: the session with {addr} ended ({status}); opening a new one");
            }
            Err(status) => attempts.failed(&addr, status, leader_hint.as_deref()),
            Ok(()) if was_up.is_some() => {
                log::info!("agent: the session with {addr} ended; opening a new one");
            }
            Ok(()) => {}
        }
        last = Some(addr);
        if leader_hint.is_some() && redirects < REDIRECTS_MAX && retry_after.is_none() {
            redirects += 1;
            sleep_unless_stopping(REDIRECT_WAIT, stopping);
            continue;
        }
        redirects = 0;
        let (_, wait) = backoff.next_wait();
        sleep_unless_stopping(wait.max(retry_after.unwrap_or_default()), stopping);
    }
}

/// What the agent said about its failed session attempts since its last session: each
/// distinct (manager, outcome) once at WARN, every retry at DEBUG only.
#[derive(Default)]
struct AttemptLog {
    said: HashSet<String>,
    failures: u32,
    since: Option<Instant>,
}

impl AttemptLog {
    fn failed(&mut self, addr: &str, status: &Status, leader: Option<&str>) {
        self.failures += 1;
        self.since.get_or_insert_with(Instant::now);
        let outcome = format!(
            "{addr} {:?} {:?} {}",
            status.code,
            status.reason,
            leader.unwrap_or_default()
        );
        let next = match leader {
            Some(leader) => format!("trying the leader it names, {leader}"),
            None => "trying the managers it knows, with backoff".to_string(),
        };
        if self.said.len() < ATTEMPT_OUTCOMES_LOGGED_MAX && self.said.insert(outcome) {
            log::warn!("agent: no session with {addr}: {status}; {next}");
        } else {
            log::debug!("agent: no session with {addr}: {status}; {next}");
        }
    }

    fn no_manager(&mut self) {
        if self.said.insert("no manager".into()) {
            log::warn!("agent: no manager to call; name one with --manager HOST:PORT");
        }
    }

    fn succeeded(&mut self, addr: &str) {
        if let Some(since) = self.since.take() {
            log::info!(
                "agent: reached {addr} after {} failed attempts over {:.1} s",
                self.failures,
                since.elapsed().as_secs_f64()
            );
        }
        *self = AttemptLog::default();
    }
}

/// One session with `addr`, until its stream ends or the agent stops.
fn session(
    transport: &Transport,
    config: &Setup,
    addr: &str,
    sink: &dyn TaskSink,
    stopping: &AtomicBool,
    current: &Mutex<Option<Current>>,
    attempts: &mut AttemptLog,
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
    let sent_at = Instant::now();
    let mut stream =
        channel.call_server_stream(SESSION, &request, CallOptions { timeout: None })?;
    // The assignments chain of this session (a gap: a new session, for a complete set).
    let mut chain = super::chain::Chain::new();
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
                attempts.succeeded(addr);
                config.contact(sink, sent_at, None);
                learn_managers(config, &started.managers);
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
            Some(pb::session_message::Message::Assignments(assignments)) => {
                if let Err(status) = apply_assignments(&mut chain, assignments, sink) {
                    stream.cancel();
                    return Err(status);
                }
            }
            Some(pb::session_message::Message::ManagersChanged(changed)) => {
                learn_managers(config, &changed.managers);
            }
            Some(pb::session_message::Message::NetworkKeys(keys)) => {
                if let Some(deliver) = &config.network_keys {
                    deliver(keys.keys);
                }
            }
            Some(pb::session_message::Message::LogSubscription(subscription)) => {
                let session_id = current.lock().as_ref().map(|c| c.session_id.clone());
                if let Some(session_id) = session_id {
                    sink.log_subscription(subscription, &session_id, addr);
                }
            }
            None => {}
        }
    }
    stream.cancel();
    Ok(())
}

/// Hands one assignments message to `sink` if it applies to what the agent holds.
///
/// # Errors
/// A gap in the chain: the caller ends the session and opens a new one at once (no
/// backoff: the session was up), whose complete set brings the agent back in step.
fn apply_assignments(
    chain: &mut super::chain::Chain,
    assignments: pb::Assignments,
    sink: &dyn TaskSink,
) -> Result<(), Status> {
    let step = chain.accept(&assignments);
    log::debug!(
        "agent: assignments #{} {step:?} ({} tasks, {} removed, results in {:?})",
        chain.applied(),
        assignments.tasks.len(),
        assignments.removed.len(),
        assignments.results_in
    );
    if !matches!(step, super::chain::Step::Gap { .. })
        && (!assignments.secrets.is_empty() || !assignments.configs.is_empty())
    {
        sink.values(assignments.secrets, assignments.configs);
    }
    match step {
        super::chain::Step::Part { first, last } => {
            sink.assign_part(assignments.tasks, first, last)
        }
        super::chain::Step::Update => sink.update(assignments.tasks, assignments.removed),
        super::chain::Step::Gap { held, applies_to } => {
            log::warn!(
                "agent: assignments applying to {applies_to:?} while this agent holds \
                 {held:?} (a gap); opening a new session for a complete set"
            );
            return Err(Status::unavailable(
                "a gap in the assignments chain; opening a new session for a complete set",
            ));
        }
    }
    Ok(())
}

/// Takes a manager list a session sent (when this agent learns them).
fn learn_managers(config: &Setup, peers: &[pb::WeightedPeer]) {
    if let Some(addrs) = config.managers.learn(peers) {
        log::info!("agent: the managers are {}", addrs.join(", "));
    }
}

/// The `agent-reporter` thread's view of the session.
struct Reporter<'a> {
    transport: &'a Transport,
    config: &'a Setup,
    sink: &'a dyn TaskSink,
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
        let sent_at = Instant::now();
        match channel.call(HEARTBEAT, &request, CallOptions::timeout(timeout)) {
            Ok(response) => {
                *last_ok = std::time::Instant::now();
                let reassigned_after = u64::try_from(response.tasks_reassigned_after_ms)
                    .ok()
                    .filter(|&ms| ms > 0)
                    .map(Duration::from_millis);
                self.config.contact(self.sink, sent_at, reassigned_after);
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
        let batch = next_status_batch(pending);
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

/// Encoded bytes of status updates sent in one call, at most (a status with a health log
/// can hold 5 × 4 KiB of check output: [`STATUS_UPDATES_MAX`] of those would not fit in a
/// frame). A batch holds at least one update.
const STATUS_BATCH_BYTES_MAX: usize = 1 << 20;

/// The first pending updates, at most [`STATUS_UPDATES_MAX`] and [`STATUS_BATCH_BYTES_MAX`].
fn next_status_batch(pending: &BTreeMap<String, TaskStatus>) -> Vec<pb::TaskStatusUpdate> {
    let mut bytes = 0;
    let mut batch = Vec::new();
    for (task_id, status) in pending.iter().take(STATUS_UPDATES_MAX) {
        let update = pb::TaskStatusUpdate {
            task_id: task_id.clone(),
            status: Some(status.clone()),
        };
        bytes += prost::Message::encoded_len(&update);
        if !batch.is_empty() && bytes > STATUS_BATCH_BYTES_MAX {
            break;
        }
        batch.push(update);
    }
    batch
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
    fn a_status_batch_stays_within_its_bytes_and_holds_at_least_one() {
        use crate::proto::objects::{HealthCheckResult, TaskHealth};
        let big = |n: usize| TaskStatus {
            health: Some(TaskHealth {
                log: vec![
                    HealthCheckResult {
                        output: "x".repeat(n),
                        ..HealthCheckResult::default()
                    };
                    5
                ],
                ..TaskHealth::default()
            }),
            ..TaskStatus::default()
        };
        let pending: BTreeMap<String, TaskStatus> = (0..STATUS_UPDATES_MAX)
            .map(|i| (format!("t-{i:03}"), big(4096)))
            .collect();
        let batch = next_status_batch(&pending);
        let bytes: usize = batch.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes <= STATUS_BATCH_BYTES_MAX, "{bytes}");
        assert!(batch.len() > 1 && batch.len() < STATUS_UPDATES_MAX);
        let huge: BTreeMap<String, TaskStatus> =
            [("t".to_owned(), big(STATUS_BATCH_BYTES_MAX))].into();
        assert_eq!(next_status_batch(&huge).len(), 1);
        let small: BTreeMap<String, TaskStatus> = (0..STATUS_UPDATES_MAX + 5)
            .map(|i| (format!("t-{i:03}"), TaskStatus::default()))
            .collect();
        assert_eq!(next_status_batch(&small).len(), STATUS_UPDATES_MAX);
    }

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
}
