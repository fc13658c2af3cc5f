//! The node plane at swarm scale: N simulated agents, each a distinct node with its own key
//! and certificate, holding real mutual-TLS dispatcher sessions with a real cluster of three
//! `flotilla` manager processes on loopback (issue 14, "Benchmark `agents`").
//!
//! Usage: `cargo bench --bench agents -- [--agents N] [--seconds S] [--tasks T]
//! [--threads W] [--issuers P]` (defaults: 1,000 agents, 20 s of steady state, one task per
//! ten agents, 4 agent threads, 16 certificate requests in flight).
//!
//! What runs, in this order:
//! 1. Three managers (`init` + two `join`), and the leader's thread count and RSS from
//!    `/proc/<pid>/status` before any agent exists (the baseline).
//! 2. N certificates issued through the cluster's own join path: the worker join token,
//!    the root CA pinned by the token's digest, then one `ca.IssueNodeCertificate` per agent
//!    with a fresh P-256 key and CSR, P in flight, spread over the three managers (each holds
//!    the CA key). `BENCH certs_issued_per_s`.
//! 3. One load process (this one) opens the N sessions through the product's transport
//!    (`flotilla::net`: one reactor, one channel per agent and manager, the channel's TLS
//!    configuration carrying that agent's certificate). Each agent behaves as the product's
//!    agent does: `dispatcher.Session` with a manager picked at random, following a
//!    follower's NOT_LEADER `leader_addr`, swarmkit's backoff with jitter between attempts
//!    (`SessionBackoff`: min(100 ms + 2·previous, cap)), the registration limit's
//!    `retry_after` respected; heartbeats at the period its session gives (jittered by the
//!    leader); every assigned task reported RUNNING (`dispatcher.UpdateTaskStatus`), and
//!    every task's status reported again on each new session. `BENCH sessions_started_per_s`.
//! 4. A service of T replicas constrained to workers, so some agents get tasks; the load
//!    waits until every task was reported RUNNING. `BENCH tasks_reported_running`.
//! 5. S seconds of steady state: every heartbeat's latency (call to reply, as the agent sees
//!    it, through the load process's own reactor) is recorded. `BENCH heartbeat_p99_ms`,
//!    then the leader's `BENCH leader_threads` and `BENCH leader_rss_growth_MiB` (against the
//!    baseline) and `BENCH leader_rss_bytes_per_agent`.
//! 6. The leader is SIGKILLed. `BENCH reconnect_all_ms`: until every agent has a session
//!    again (with a surviving manager: only the leader serves sessions). Meanwhile and for
//!    two heartbeat periods after, the Node objects are listed every second through the
//!    control API of a surviving manager; `BENCH nodes_marked_down_falsely` counts the
//!    agents' nodes seen DOWN at any listing (the killed manager's own node excepted).
//!
//! Each figure is printed with its target beside it (issue 14, on a 2-core machine: 10,000
//! agents at a 5 s period, p99 ≤ 10 ms, leader threads ≤ 64, RSS growth ≤ 400 MiB,
//! reconnect ≤ 30 s, 0 false DOWN). The load process shares the machine with the managers:
//! its reactor's delays are in the heartbeat latencies, as an agent host's would be.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/procs/mod.rs"]
mod procs;

use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;
use prost::Message;
use rand::RngExt;

use flotilla::agent::session::SessionBackoff;
use flotilla::ca::{JoinToken, PendingIdentity, RootCert, load_node_files, tls};
use flotilla::net::{CallOptions, Channel, ResponseStream, Transport, TransportConfig};
use flotilla::proto::ca::rpc::{GET_ROOT_CA, ISSUE_NODE_CERTIFICATE};
use flotilla::proto::ca::{GetRootCaRequest, IssueNodeCertificateRequest};
use flotilla::proto::control as cpb;
use flotilla::proto::dispatcher as pb;
use flotilla::proto::dispatcher::rpc::{HEARTBEAT, SESSION, UPDATE_TASK_STATUS};
use flotilla::proto::objects::{NodeState, TaskState, TaskStatus};
use flotilla::wire::{Code, Status};
use procs::cluster::{Cluster, ClusterOptions};

/// Agents when `--agents` is not given.
const AGENTS_DEFAULT: usize = 1000;
/// Most agents one run may simulate (the dispatcher's `SESSIONS_MAX` is 20,000).
const AGENTS_MAX: usize = 20_000;
/// Steady-state seconds when `--seconds` is not given.
const SECONDS_DEFAULT: f64 = 20.0;
/// Agent threads when `--threads` is not given.
const THREADS_DEFAULT: usize = 4;
/// Certificate requests in flight when `--issuers` is not given (the CA pool queues 256).
const ISSUERS_DEFAULT: usize = 16;
/// Timeout of one heartbeat or status call (the product agent's RPC timeout).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an agent thread polls its agents' session streams for messages.
const STREAM_POLL: Duration = Duration::from_millis(50);
/// Heartbeat periods without a successful heartbeat after which an agent gives its session
/// up and opens a new one (the product agent's `HEARTBEAT_FAILURE_PERIODS_MAX`); a failed
/// heartbeat before that is tried again after half a period, as the product agent does.
const HEARTBEAT_FAILURE_PERIODS_MAX: u32 = 2;
/// How long each phase may take before the benchmark gives up (a broken build or a
/// machine far too slow, not a figure).
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest the failover may take before the benchmark reports what it saw and stops.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(180);
/// How often the Node objects are listed during the failover.
const NODE_LISTING_PERIOD: Duration = Duration::from_secs(1);
/// Heartbeat periods the Node listings go on after every agent is back.
const LISTING_PERIODS_AFTER: u32 = 2;
/// File descriptors per agent the load process needs at least: its session's connection.
const FDS_PER_AGENT_MIN: u64 = 1;
/// File descriptors per agent it may use at a peak: an agent that asked a follower first
/// keeps that connection until the follower closes it (idle for 60 s). Below this, a dial
/// may fail with EMFILE; the agent then backs off and tries again, as a real one would.
const FDS_PER_AGENT_PEAK: u64 = 2;
/// Descriptors kept for everything else (the cluster's pipes, the listing client).
const FDS_RESERVE: u64 = 512;

/// The targets of issue 14, printed beside the figures.
const TARGET_AGENTS: usize = 10_000;
const TARGET_HEARTBEAT_P99_MS: f64 = 10.0;
const TARGET_LEADER_THREADS: u64 = 64;
const TARGET_RSS_GROWTH_MIB: f64 = 400.0;
const TARGET_RECONNECT_MS: u128 = 30_000;

// ---------------------------------------------------------------------------------------
// Arguments

struct Args {
    agents: usize,
    seconds: f64,
    tasks: usize,
    threads: usize,
    issuers: usize,
}

const USAGE: &str = "usage: cargo bench --bench agents -- [--agents N (1..=20000, default \
                     1000)] [--seconds S (> 0, default 20)] [--tasks T (default N/10)] \
                     [--threads W (1..=64, default 4)] [--issuers P (1..=128, default 16)]";

fn parse_number<T: std::str::FromStr>(flag: &str, value: Option<String>) -> Result<T, String> {
    let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
    value
        .parse()
        .map_err(|_| format!("{flag} {value:?} is not a number"))
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut agents = AGENTS_DEFAULT;
    let mut seconds = SECONDS_DEFAULT;
    let mut tasks = None;
    let mut threads = THREADS_DEFAULT;
    let mut issuers = ISSUERS_DEFAULT;
    let mut it = args;
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--agents" => agents = parse_number("--agents", it.next())?,
            "--seconds" => seconds = parse_number("--seconds", it.next())?,
            "--tasks" => tasks = Some(parse_number("--tasks", it.next())?),
            "--threads" => threads = parse_number("--threads", it.next())?,
            "--issuers" => issuers = parse_number("--issuers", it.next())?,
            // cargo bench passes this to every benchmark.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !(1..=AGENTS_MAX).contains(&agents) {
        return Err(format!("--agents {agents}: give 1 to {AGENTS_MAX}"));
    }
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("--seconds {seconds}: give a positive number"));
    }
    if !(1..=64).contains(&threads) {
        return Err(format!("--threads {threads}: give 1 to 64"));
    }
    if !(1..=128).contains(&issuers) {
        return Err(format!("--issuers {issuers}: give 1 to 128"));
    }
    let tasks = tasks.unwrap_or(agents.div_ceil(10));
    Ok(Args {
        agents,
        seconds,
        tasks,
        threads,
        issuers,
    })
}

// ---------------------------------------------------------------------------------------
// The leader process, from /proc

/// Threads and resident bytes of process `pid` (`/proc/<pid>/status`).
fn proc_status(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("Threads:"), field("VmRSS:") * 1024)
}

/// CPU time (user + system) process `pid` used so far (`/proc/<pid>/stat`, in clock
/// ticks of `CLK_TCK`, 100 per second on Linux).
fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

// ---------------------------------------------------------------------------------------
// Certificates

/// One simulated node: its id and the client TLS configuration presenting its certificate.
struct Identity {
    node_id: String,
    tls: Arc<rustls::ClientConfig>,
}

/// Issues `count` node certificates through the worker join token, `issuers` requests in
/// flight spread over `managers`: the path a real `flotilla agent --token` takes.
fn issue_identities(
    transport: &Transport,
    managers: &[String],
    token: &str,
    count: usize,
    issuers: usize,
) -> Vec<Identity> {
    let token = JoinToken::parse(token).unwrap();
    let unverified = Arc::new(tls::bootstrap_client_config().unwrap());
    let served = transport
        .channel(&managers[0], &unverified)
        .call(
            GET_ROOT_CA,
            &GetRootCaRequest {},
            CallOptions::timeout(CALL_TIMEOUT),
        )
        .unwrap();
    let root = flotilla::ca::verify_root_for_token(&token, &served.root_cert_der).unwrap();
    let pinned = Arc::new(tls::pinned_root_client_config(&root).unwrap());
    let channels: Vec<Channel> = managers
        .iter()
        .map(|addr| transport.channel(addr, &pinned))
        .collect();
    let next = AtomicUsize::new(0);
    let issued = Mutex::new(Vec::with_capacity(count));
    std::thread::scope(|scope| {
        for _ in 0..issuers {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let identity = issue_one(&channels[i % channels.len()], &token, &root);
                    issued.lock().push(identity);
                }
            });
        }
    });
    issued.into_inner()
}

fn issue_one(channel: &Channel, token: &JoinToken, root: &RootCert) -> Identity {
    let started = Instant::now();
    loop {
        let pending = PendingIdentity::generate().unwrap();
        let request = IssueNodeCertificateRequest {
            token: token.to_string(),
            csr_der: pending.csr_der().to_vec().into(),
        };
        match channel.call(
            ISSUE_NODE_CERTIFICATE,
            &request,
            CallOptions::timeout(CALL_TIMEOUT),
        ) {
            Ok(issued) => {
                let identity = pending
                    .complete(&issued.cert_der, root, SystemTime::now())
                    .unwrap();
                return Identity {
                    node_id: identity.node_id().to_string(),
                    tls: Arc::new(tls::client_config(&identity, root).unwrap()),
                };
            }
            // A full CA queue or a manager without the key yet: nothing was issued.
            Err(status)
                if (status.is_retry_soon() || status.code == Code::ResourceExhausted)
                    && started.elapsed() < PHASE_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(status) => panic!("{}: certificate refused: {status}", channel.target()),
        }
    }
}

// ---------------------------------------------------------------------------------------
// What the agent threads share with the main thread

/// Counters and samples the agents feed and the phases read.
struct Shared {
    /// Agents whose current session has started.
    connected: AtomicUsize,
    /// Tasks (per agent) whose RUNNING report the leader acknowledged.
    tasks_running: AtomicUsize,
    /// Heartbeat latencies in microseconds, while `recording`.
    latencies_us: Mutex<Vec<u32>>,
    recording: AtomicBool,
    /// Heartbeats that failed while `recording` (each listed on stderr at the end).
    heartbeat_failures: Mutex<HashMap<String, usize>>,
    /// Set by the failover: the manager killed, and from when.
    killed: Mutex<Option<(usize, Instant)>>,
    /// Agents with a session started after the kill, with a surviving manager.
    reconnected: AtomicUsize,
    /// The heartbeat period of the latest session started, in milliseconds.
    period_ms: AtomicU64,
    /// When the last of them reconnected.
    last_reconnect: Mutex<Option<Instant>>,
    /// Session attempts refused, by the refusal (for the report on stderr).
    refusals: Mutex<HashMap<String, usize>>,
    stop: AtomicBool,
}

impl Shared {
    fn new() -> Self {
        Self {
            connected: AtomicUsize::new(0),
            tasks_running: AtomicUsize::new(0),
            latencies_us: Mutex::new(Vec::new()),
            recording: AtomicBool::new(false),
            heartbeat_failures: Mutex::new(HashMap::new()),
            killed: Mutex::new(None),
            reconnected: AtomicUsize::new(0),
            period_ms: AtomicU64::new(0),
            last_reconnect: Mutex::new(None),
            refusals: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        }
    }

    fn count_refusal(&self, status: &Status) {
        let key = format!("{:?}/{:?}", status.code, status.reason);
        *self.refusals.lock().entry(key).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------------------
// One simulated agent

/// An open session: its stream, and once started its id and period.
struct Session {
    stream: ResponseStream<pb::SessionMessage>,
    manager: usize,
    /// Increases with every session of this agent; replies for an older one are stale.
    generation: u64,
    started: Option<(String, Duration)>,
    /// When a heartbeat last succeeded (or the session started).
    last_beat_ok: Instant,
}

/// Where a reported task stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Report {
    /// To be sent (again).
    Due,
    /// Sent, not yet acknowledged.
    InFlight,
    /// Acknowledged by the leader.
    Delivered,
}

struct Agent {
    identity: Identity,
    session: Option<Session>,
    generation: u64,
    backoff: SessionBackoff,
    /// The manager to try first (a follower named it the leader), and the last one tried.
    leader_hint: Option<usize>,
    last_manager: Option<usize>,
    /// Tasks assigned to this node and where their RUNNING report stands.
    tasks: HashMap<String, Report>,
    /// Counted in `Shared::reconnected` already.
    reconnected: bool,
}

/// What happens to an agent next, on its thread's timer heap (earliest first).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: std::cmp::Reverse<Instant>,
    agent: usize,
    generation: u64,
    what: DueKind,
}

#[derive(PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum DueKind {
    OpenSession,
    Heartbeat,
}

/// Replies the transport's reactor hands back to an agent thread.
enum Reply {
    Heartbeat {
        agent: usize,
        generation: u64,
        outcome: Result<pb::HeartbeatResponse, Status>,
    },
    Statuses {
        agent: usize,
        task_ids: Vec<String>,
        outcome: Result<(), Status>,
    },
}

/// One agent thread: a shard of the agents, its timers, the replies for them.
struct Shard {
    agents: Vec<Agent>,
    managers: Arc<Vec<String>>,
    transport: Arc<Transport>,
    shared: Arc<Shared>,
    heap: BinaryHeap<Due>,
    replies_tx: Sender<Reply>,
    replies: Receiver<Reply>,
}

impl Shard {
    fn run(mut self) {
        let now = Instant::now();
        for agent in 0..self.agents.len() {
            // Spread the first attempts over a second: agents do not all boot at once.
            let offset = Duration::from_micros(rand::rng().random_range(0..1_000_000));
            self.schedule(agent, now + offset, DueKind::OpenSession);
        }
        let mut next_poll = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            self.run_due(now);
            while let Ok(reply) = self.replies.try_recv() {
                self.on_reply(reply);
            }
            if now >= next_poll {
                self.poll_streams();
                next_poll = Instant::now() + STREAM_POLL;
            }
            let wake = self
                .heap
                .peek()
                .map_or(next_poll, |due| due.at.0.min(next_poll));
            if let Ok(reply) = self.replies.recv_deadline(wake) {
                self.on_reply(reply);
            }
        }
        for agent in &mut self.agents {
            if let Some(session) = agent.session.take() {
                session.stream.cancel();
            }
        }
    }

    fn schedule(&mut self, agent: usize, at: Instant, what: DueKind) {
        let generation = self.agents[agent].generation;
        self.heap.push(Due {
            at: std::cmp::Reverse(at),
            agent,
            generation,
            what,
        });
    }

    fn run_due(&mut self, now: Instant) {
        while self.heap.peek().is_some_and(|due| due.at.0 <= now) {
            let due = self.heap.pop().expect("peeked");
            if due.generation != self.agents[due.agent].generation {
                continue;
            }
            match due.what {
                DueKind::OpenSession => self.open_session(due.agent),
                DueKind::Heartbeat => self.heartbeat(due.agent),
            }
        }
    }

    /// The manager to try: the leader a follower named, else one at random other than the
    /// last one tried (all weigh the same: the session messages carry no weights).
    fn pick_manager(&self, agent: usize) -> usize {
        let agent = &self.agents[agent];
        if let Some(hint) = agent.leader_hint {
            return hint;
        }
        let count = self.managers.len();
        loop {
            let pick = rand::rng().random_range(0..count);
            if count == 1 || Some(pick) != agent.last_manager {
                return pick;
            }
        }
    }

    fn open_session(&mut self, index: usize) {
        let manager = self.pick_manager(index);
        let agent = &mut self.agents[index];
        agent.leader_hint = None;
        agent.last_manager = Some(manager);
        agent.generation += 1;
        let channel = self
            .transport
            .channel(&self.managers[manager], &agent.identity.tls);
        let request = pb::SessionRequest {
            hostname: format!("load-{index}"),
            description: None,
        };
        match channel.call_server_stream(SESSION, &request, CallOptions { timeout: None }) {
            Ok(stream) => {
                agent.session = Some(Session {
                    stream,
                    manager,
                    generation: agent.generation,
                    started: None,
                    last_beat_ok: Instant::now(),
                });
            }
            Err(status) => self.session_failed(index, &status),
        }
    }

    /// The session (or the attempt) of agent `index` failed: back off and try again.
    fn session_failed(&mut self, index: usize, status: &Status) {
        self.shared.count_refusal(status);
        let agent = &mut self.agents[index];
        if let Some(session) = agent.session.take() {
            if let Some((_, period)) = session.started {
                self.shared.connected.fetch_sub(1, Ordering::Relaxed);
                agent.backoff.session_was_up(period);
            }
            session.stream.cancel();
        }
        agent.generation += 1;
        agent.leader_hint = status
            .leader_hint()
            .and_then(|addr| self.managers.iter().position(|m| m == addr));
        let (_, wait) = agent.backoff.next_wait();
        // A manager that refuses for a while (the registration limit) says how long.
        let wait = wait.max(status.retry_after().unwrap_or_default());
        self.schedule(index, Instant::now() + wait, DueKind::OpenSession);
    }

    fn poll_streams(&mut self) {
        for index in 0..self.agents.len() {
            while let Some(session) = self.agents[index].session.as_mut() {
                match session.stream.recv_timeout(Duration::ZERO) {
                    Ok(Some(message)) => self.on_message(index, message),
                    Ok(None) => {
                        let ended = Status::unavailable("the manager ended the session");
                        self.session_failed(index, &ended);
                        break;
                    }
                    Err(status) if status.code == Code::DeadlineExceeded => break,
                    Err(status) => {
                        self.session_failed(index, &status);
                        break;
                    }
                }
            }
        }
    }

    fn on_message(&mut self, index: usize, message: pb::SessionMessage) {
        match message.message {
            Some(pb::session_message::Message::Started(started)) => {
                self.on_started(index, started);
            }
            Some(pb::session_message::Message::Assignments(assignments)) => {
                self.on_assignments(index, assignments);
            }
            // The load agents keep the managers they were given, run no gossip and keep
            // no task logs.
            Some(
                pb::session_message::Message::ManagersChanged(_)
                | pb::session_message::Message::NetworkKeys(_)
                | pb::session_message::Message::LogSubscription(_),
            )
            | None => {}
        }
    }

    fn on_started(&mut self, index: usize, started: pb::SessionStarted) {
        let period = Duration::from_millis(u64::try_from(started.heartbeat_period_ms).unwrap())
            .max(Duration::from_millis(10));
        let agent = &mut self.agents[index];
        let session = agent.session.as_mut().expect("a message came on it");
        session.started = Some((started.session_id, period));
        session.last_beat_ok = Instant::now();
        let manager = session.manager;
        self.shared.connected.fetch_add(1, Ordering::Relaxed);
        self.shared.period_ms.store(
            u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        agent.backoff.session_was_up(period);
        let killed = *self.shared.killed.lock();
        if let Some((dead, _)) = killed
            && manager != dead
            && !agent.reconnected
        {
            agent.reconnected = true;
            self.shared.reconnected.fetch_add(1, Ordering::Relaxed);
            *self.shared.last_reconnect.lock() = Some(Instant::now());
        }
        // A new session: every task's status again (the manager may have missed some).
        for report in agent.tasks.values_mut() {
            *report = Report::Due;
        }
        self.schedule(index, Instant::now() + period, DueKind::Heartbeat);
        self.send_statuses(index);
    }

    fn on_assignments(&mut self, index: usize, assignments: pb::Assignments) {
        let agent = &mut self.agents[index];
        // A complete set (in one part or several) or changes: either way each task named
        // is assigned; what a complete set leaves out matters not here (nothing runs).
        for id in &assignments.removed {
            agent.tasks.remove(id);
        }
        for task in &assignments.tasks {
            let runs = task.desired_state == TaskState::Running as i32;
            let state = task.status.as_ref().map_or(0, |s| s.state);
            if runs && state < TaskState::Running as i32 {
                agent.tasks.entry(task.id.clone()).or_insert(Report::Due);
            } else if runs {
                agent
                    .tasks
                    .entry(task.id.clone())
                    .or_insert(Report::Delivered);
            }
        }
        self.send_statuses(index);
    }

    /// Reports RUNNING for every task of agent `index` whose report is due, in one call.
    fn send_statuses(&mut self, index: usize) {
        let agent = &mut self.agents[index];
        let Some(Session {
            started: Some((session_id, _)),
            manager,
            ..
        }) = &agent.session
        else {
            return;
        };
        let task_ids: Vec<String> = agent
            .tasks
            .iter()
            .filter(|(_, report)| **report == Report::Due)
            .map(|(id, _)| id.clone())
            .take(pb::STATUS_UPDATES_MAX)
            .collect();
        if task_ids.is_empty() {
            return;
        }
        let now_ms = flotilla::util::clock::unix_now_ms();
        let request = pb::UpdateTaskStatusRequest {
            session_id: session_id.clone(),
            updates: task_ids
                .iter()
                .map(|id| pb::TaskStatusUpdate {
                    task_id: id.clone(),
                    status: Some(TaskStatus {
                        state: TaskState::Running as i32,
                        message: "started".into(),
                        timestamp_ms: now_ms,
                        ..TaskStatus::default()
                    }),
                })
                .collect(),
        };
        for id in &task_ids {
            agent.tasks.insert(id.clone(), Report::InFlight);
        }
        let channel = self
            .transport
            .channel(&self.managers[*manager], &agent.identity.tls);
        let replies = self.replies_tx.clone();
        let sent = channel.unary_with(
            UPDATE_TASK_STATUS.name(),
            Bytes::from(request.encode_to_vec()),
            CallOptions::timeout(CALL_TIMEOUT),
            Box::new(move |outcome| {
                let _ = replies.send(Reply::Statuses {
                    agent: index,
                    task_ids,
                    outcome: outcome.map(|_| ()),
                });
            }),
        );
        if let Err(status) = sent {
            // Not sent: due again at the next session (or the next assignments).
            log::debug!("status report not sent: {status}");
            for report in agent.tasks.values_mut() {
                if *report == Report::InFlight {
                    *report = Report::Due;
                }
            }
        }
    }

    fn heartbeat(&mut self, index: usize) {
        let agent = &self.agents[index];
        let Some(Session {
            started: Some((session_id, _)),
            manager,
            generation,
            ..
        }) = &agent.session
        else {
            return;
        };
        let generation = *generation;
        let channel = self
            .transport
            .channel(&self.managers[*manager], &agent.identity.tls);
        let request = pb::HeartbeatRequest {
            session_id: session_id.clone(),
        };
        let replies = self.replies_tx.clone();
        let shared = self.shared.clone();
        let sent_at = Instant::now();
        let sent = channel.unary_with(
            HEARTBEAT.name(),
            Bytes::from(request.encode_to_vec()),
            CallOptions::timeout(CALL_TIMEOUT),
            Box::new(move |outcome| {
                let took = sent_at.elapsed();
                if shared.recording.load(Ordering::Relaxed) {
                    match &outcome {
                        Ok(_) => shared
                            .latencies_us
                            .lock()
                            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX)),
                        Err(status) => {
                            let key = format!("{:?}/{:?}", status.code, status.reason);
                            *shared.heartbeat_failures.lock().entry(key).or_default() += 1;
                        }
                    }
                }
                let outcome = outcome.and_then(|payload| {
                    pb::HeartbeatResponse::decode(payload)
                        .map_err(|e| Status::internal(format!("undecodable heartbeat: {e}")))
                });
                let _ = replies.send(Reply::Heartbeat {
                    agent: index,
                    generation,
                    outcome,
                });
            }),
        );
        if let Err(status) = sent {
            self.heartbeat_failed(index, &status);
        }
    }

    /// As the product agent: a session the manager no longer knows (`NotFound`) is given up
    /// at once; other failures (a full queue, a lost connection) only after
    /// [`HEARTBEAT_FAILURE_PERIODS_MAX`] periods without success, heartbeats being tried
    /// again every half period meanwhile (a lost connection usually ends the stream first).
    fn heartbeat_failed(&mut self, agent: usize, status: &Status) {
        let session = self.agents[agent].session.as_ref().expect("current");
        let period = session.started.as_ref().map_or(Duration::ZERO, |(_, p)| *p);
        if status.code == Code::NotFound
            || session.last_beat_ok.elapsed() >= period * HEARTBEAT_FAILURE_PERIODS_MAX
        {
            self.session_failed(agent, status);
            return;
        }
        let wait = (period / 2).max(status.retry_after().unwrap_or_default());
        self.schedule(agent, Instant::now() + wait, DueKind::Heartbeat);
    }

    fn on_reply(&mut self, reply: Reply) {
        match reply {
            Reply::Heartbeat {
                agent,
                generation,
                outcome,
            } => {
                let current = self.agents[agent]
                    .session
                    .as_ref()
                    .is_some_and(|s| s.generation == generation);
                if !current {
                    return;
                }
                match outcome {
                    Ok(response) => {
                        let period_ms = u64::try_from(response.heartbeat_period_ms).unwrap_or(0);
                        let period = Duration::from_millis(period_ms.max(10));
                        let session = self.agents[agent].session.as_mut().expect("current");
                        session.last_beat_ok = Instant::now();
                        self.schedule(agent, Instant::now() + period, DueKind::Heartbeat);
                    }
                    Err(status) => self.heartbeat_failed(agent, &status),
                }
            }
            Reply::Statuses {
                agent,
                task_ids,
                outcome,
            } => {
                let delivered = outcome.is_ok();
                let tasks = &mut self.agents[agent].tasks;
                for id in task_ids {
                    if let Some(report) = tasks.get_mut(&id) {
                        if delivered && *report == Report::InFlight {
                            *report = Report::Delivered;
                            self.shared.tasks_running.fetch_add(1, Ordering::Relaxed);
                        } else if *report == Report::InFlight {
                            *report = Report::Due;
                        }
                    }
                }
                if !delivered {
                    self.send_statuses(agent);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The phases

/// Waits until `done` holds, printing `what` and `progress` every few seconds; panics after
/// [`PHASE_TIMEOUT`].
fn wait_until(what: &str, progress: impl Fn() -> String, done: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    let mut last_print = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < PHASE_TIMEOUT,
            "{what}: not done within {PHASE_TIMEOUT:?} ({})",
            progress()
        );
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!("{what}: {} after {:?}", progress(), started.elapsed());
            last_print = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    started.elapsed()
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    let i = ((sorted_us.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted_us[i]) / 1e3
}

/// Lists every Node through the control API of one of `addrs` (the first that answers).
fn list_nodes(
    transport: &Transport,
    tls: &Arc<rustls::ClientConfig>,
    addrs: &[String],
) -> Option<Vec<flotilla::proto::objects::Node>> {
    for addr in addrs {
        let channel = transport.channel(addr, tls);
        let Ok(mut stream) = channel.call_server_stream(
            cpb::rpc::LIST_NODES,
            &cpb::ListNodesRequest {},
            CallOptions::timeout(Duration::from_secs(10)),
        ) else {
            continue;
        };
        let mut nodes = Vec::new();
        loop {
            match stream.recv() {
                Ok(Some(chunk)) => nodes.extend(chunk.nodes),
                Ok(None) => return Some(nodes),
                Err(_) => break,
            }
        }
    }
    None
}

fn node_state(node: &flotilla::proto::objects::Node) -> NodeState {
    node.status
        .as_ref()
        .and_then(|s| NodeState::try_from(s.state).ok())
        .unwrap_or(NodeState::Unknown)
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("agents: {problem}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let n = args.agents;
    // This process holds a socket per agent and manager it talks to.
    let needed_fds = n as u64 * FDS_PER_AGENT_MIN + FDS_RESERVE;
    let peak_fds = n as u64 * FDS_PER_AGENT_PEAK + FDS_RESERVE;
    let limit = flotilla::util::fdlimit::raise_open_files_limit(peak_fds).unwrap();
    if limit.soft < needed_fds {
        eprintln!(
            "agents: {n} agents need {needed_fds} open files in this process; the hard limit \
             is {} (raise it: `ulimit -Hn {peak_fds}` as root), or run fewer agents",
            limit.hard
        );
        std::process::exit(2);
    }
    if limit.soft < peak_fds {
        eprintln!(
            "agents: the open-files limit is {} (hard), under the {peak_fds} this run may \
             use at a peak: some dials may fail (EMFILE) and be retried after a backoff",
            limit.hard
        );
    }
    let uptime = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average before the run: {}", uptime.trim());

    // 1. The cluster, and the leader before any agent.
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let leader = cluster.leader_index(&client).expect("a leader");
    let leader_pid = cluster.managers[leader].proc().pid();
    std::thread::sleep(Duration::from_secs(2));
    let (threads_before, rss_before) = proc_status(leader_pid);
    eprintln!(
        "leader m{} (pid {leader_pid}) before the agents: {threads_before} threads, {} MiB",
        leader + 1,
        rss_before >> 20
    );
    let managers: Arc<Vec<String>> = Arc::new(cluster.addrs());
    let leader_dir = cluster.managers[leader].dir.clone();
    let token = procs::cli_ok(&leader_dir, &["join-token", "worker"])
        .trim()
        .to_string();

    // 2. Certificates.
    let transport = Arc::new(
        Transport::start(TransportConfig {
            connections_max: usize::try_from(limit.soft).unwrap(),
            ..TransportConfig::default()
        })
        .unwrap(),
    );
    let issue_started = Instant::now();
    let identities = issue_identities(&transport, &managers, &token, n, args.issuers);
    let issue_took = issue_started.elapsed();
    assert_eq!(identities.len(), n);
    let distinct: HashSet<&str> = identities.iter().map(|i| i.node_id.as_str()).collect();
    assert_eq!(distinct.len(), n, "every agent is a distinct node");
    let agent_nodes: HashSet<String> = distinct.iter().map(|s| (*s).to_string()).collect();
    println!(
        "BENCH certs_issued_per_s {:.0} certs/s",
        n as f64 / issue_took.as_secs_f64()
    );

    // 3. The agents.
    let shared = Arc::new(Shared::new());
    let mut shards: Vec<Vec<Agent>> = (0..args.threads).map(|_| Vec::new()).collect();
    for (i, identity) in identities.into_iter().enumerate() {
        shards[i % args.threads].push(Agent {
            identity,
            session: None,
            generation: 0,
            backoff: SessionBackoff::new(),
            leader_hint: None,
            last_manager: None,
            tasks: HashMap::new(),
            reconnected: false,
        });
    }
    let workers: Vec<_> = shards
        .into_iter()
        .enumerate()
        .map(|(i, agents)| {
            let (replies_tx, replies) = crossbeam_channel::unbounded();
            let shard = Shard {
                agents,
                managers: managers.clone(),
                transport: transport.clone(),
                shared: shared.clone(),
                heap: BinaryHeap::new(),
                replies_tx,
                replies,
            };
            std::thread::Builder::new()
                .name(format!("load-agents-{i}"))
                .spawn(move || shard.run())
                .unwrap()
        })
        .collect();
    let connected = || shared.connected.load(Ordering::Relaxed);
    let took = wait_until(
        "sessions",
        || format!("{} of {n} connected", connected()),
        || connected() == n,
    );
    println!("BENCH agents_connected {} agents", connected());
    println!(
        "BENCH sessions_started_per_s {:.0} sessions/s",
        n as f64 / took.as_secs_f64()
    );

    // 4. Tasks for some of the agents.
    if args.tasks > 0 {
        procs::cli_ok(
            &leader_dir,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                "load",
                "--replicas",
                &args.tasks.to_string(),
                "--constraint",
                "node.role==worker",
                "--",
                "true",
            ],
        );
        let running = || shared.tasks_running.load(Ordering::Relaxed);
        wait_until(
            "tasks",
            || format!("{} of {} reported running", running(), args.tasks),
            || running() >= args.tasks,
        );
    }
    println!(
        "BENCH tasks_reported_running {} tasks",
        shared.tasks_running.load(Ordering::Relaxed)
    );

    // 5. Steady state.
    shared.latencies_us.lock().clear();
    let (leader_cpu_before, load_cpu_before) = (proc_cpu(leader_pid), proc_cpu(std::process::id()));
    shared.recording.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    shared.recording.store(false, Ordering::SeqCst);
    let leader_cpu = proc_cpu(leader_pid).saturating_sub(leader_cpu_before);
    let load_cpu = proc_cpu(std::process::id()).saturating_sub(load_cpu_before);
    let mut latencies = std::mem::take(&mut *shared.latencies_us.lock());
    latencies.sort_unstable();
    let (threads, rss) = proc_status(leader_pid);
    let growth = rss.saturating_sub(rss_before);
    eprintln!(
        "steady state: {} heartbeats in {} s ({:.0}/s), failures {:?}, {} agents connected",
        latencies.len(),
        args.seconds,
        latencies.len() as f64 / args.seconds,
        shared.heartbeat_failures.lock(),
        connected()
    );
    println!(
        "BENCH agents_connected_steady {} agents (target {TARGET_AGENTS} at a 5 s period)",
        connected()
    );
    if latencies.is_empty() {
        eprintln!("no heartbeat in the steady state: make --seconds longer than the period");
    } else {
        println!(
            "BENCH heartbeat_p50_ms {:.2} ms",
            percentile_ms(&latencies, 0.50)
        );
        println!(
            "BENCH heartbeat_p99_ms {:.2} ms (target <= {TARGET_HEARTBEAT_P99_MS})",
            percentile_ms(&latencies, 0.99)
        );
    }
    // Shares of one core over the steady state: where the machine's CPU went.
    println!(
        "BENCH leader_cpu_percent {:.0} % (of one core; the load process: {:.0} %)",
        leader_cpu.as_secs_f64() * 100.0 / args.seconds,
        load_cpu.as_secs_f64() * 100.0 / args.seconds
    );
    println!("BENCH leader_threads {threads} threads (target <= {TARGET_LEADER_THREADS})");
    println!(
        "BENCH leader_rss_growth_MiB {:.1} MiB (target <= {TARGET_RSS_GROWTH_MIB})",
        growth as f64 / f64::from(1 << 20)
    );
    println!(
        "BENCH leader_rss_bytes_per_agent {} bytes",
        growth / n as u64
    );

    // 6. Failover.
    let survivors: Vec<String> = managers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, addr)| addr.clone())
        .collect();
    let (dead_identity, _) = load_node_files(&cluster.managers[leader].dir.join("node")).unwrap();
    let dead_node = dead_identity.node_id().to_string();
    let survivor = (leader + 1) % cluster.managers.len();
    let (lister_identity, lister_root) =
        load_node_files(&cluster.managers[survivor].dir.join("node")).unwrap();
    let lister_tls = Arc::new(tls::client_config(&lister_identity, &lister_root).unwrap());
    let lister = Transport::start(TransportConfig::default()).unwrap();
    let before = list_nodes(&lister, &lister_tls, &survivors).expect("a node listing");
    let not_ready = before
        .iter()
        .filter(|node| agent_nodes.contains(&node.id) && node_state(node) != NodeState::Ready)
        .count();
    eprintln!("before the failover: {not_ready} agent nodes not READY");
    let period = Duration::from_millis(shared.period_ms.load(Ordering::Relaxed));
    let killed_at = Instant::now();
    *shared.killed.lock() = Some((leader, killed_at));
    cluster.managers[leader].kill();
    let mut seen_down: HashSet<String> = HashSet::new();
    let mut all_back: Option<Instant> = None;
    let mut listings = 0;
    loop {
        let listing_started = Instant::now();
        if let Some(nodes) = list_nodes(&lister, &lister_tls, &survivors) {
            listings += 1;
            for node in nodes {
                if node.id != dead_node
                    && agent_nodes.contains(&node.id)
                    && node_state(&node) == NodeState::Down
                {
                    seen_down.insert(node.id);
                }
            }
        }
        let back = shared.reconnected.load(Ordering::Relaxed);
        if back == n && all_back.is_none() {
            all_back = Some(Instant::now());
        }
        if all_back.is_some_and(|at| at.elapsed() >= period * LISTING_PERIODS_AFTER) {
            break;
        }
        if killed_at.elapsed() > FAILOVER_TIMEOUT {
            eprintln!("failover: only {back} of {n} agents back after {FAILOVER_TIMEOUT:?}");
            break;
        }
        std::thread::sleep(NODE_LISTING_PERIOD.saturating_sub(listing_started.elapsed()));
    }
    let reconnected = shared.reconnected.load(Ordering::Relaxed);
    match *shared.last_reconnect.lock() {
        Some(last) if reconnected == n => println!(
            "BENCH reconnect_all_ms {} ms (target <= {TARGET_RECONNECT_MS})",
            last.duration_since(killed_at).as_millis()
        ),
        _ => println!(
            "BENCH reconnect_all_ms {} ms (only {reconnected} of {n} agents came back; \
             target <= {TARGET_RECONNECT_MS})",
            killed_at.elapsed().as_millis()
        ),
    }
    println!(
        "BENCH nodes_marked_down_falsely {} nodes (target 0; {listings} listings)",
        seen_down.len()
    );
    eprintln!(
        "session refusals and failures over the run: {:?}",
        shared.refusals.lock()
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("load average after the run: {}", load.trim());

    shared.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.join().unwrap();
    }
    transport.shutdown();
    lister.shutdown();
}
