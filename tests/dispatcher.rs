//! The dispatcher against real manager processes: a worker's agent session (its Node is
//! created READY, it receives its complete set of assignments), the followers' refusal
//! naming the leader, a node that stops heartbeating marked DOWN, and the manager list the
//! sessions carry (an agent given only a follower reaches the leader and learns managers that
//! join or stop).
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::agent::session::{AgentConfig, AgentSession, TaskSink};
use flotilla::ca::tls;
use flotilla::ca_rpc::join_cluster;
use flotilla::dispatcher::NOT_LEADER;
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::dispatcher as pb;
use flotilla::proto::dispatcher::rpc::name::HEARTBEAT;
use flotilla::proto::objects::Task;
use parking_lot::Mutex;
use procs::cli_ok;
use procs::cluster::{Cluster, ClusterOptions};

const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Recorder {
    complete_sets: Mutex<Vec<Vec<Task>>>,
    fence_deadlines: Mutex<Vec<Instant>>,
}

impl TaskSink for Recorder {
    fn assign_part(&self, tasks: Vec<Task>, first: bool, _last: bool) {
        let mut sets = self.complete_sets.lock();
        match sets.last_mut() {
            Some(set) if !first => set.extend(tasks),
            _ => sets.push(tasks),
        }
    }

    fn update(&self, _changed: Vec<Task>, _removed: Vec<String>) {}

    fn fence_deadline(&self, deadline: Instant, _why: String) {
        self.fence_deadlines.lock().push(deadline);
    }
}

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

fn node_line(dir: &std::path::Path, hostname: &str) -> String {
    cli_ok(dir, &["node", "ls"])
        .lines()
        .find(|line| line.contains(hostname))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn a_worker_session_records_its_node_ready_and_a_silent_node_goes_down() {
    let cluster = Cluster::start(3, ClusterOptions::default());
    cluster.wait_voters(3, TIMEOUT);
    let leader = cluster.leader_index(&cluster.client()).unwrap();
    let follower = (leader + 1) % 3;
    let dir = cluster.managers[leader].dir.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "1s"]);
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let (identity, root) =
        join_cluster(&transport, &cluster.managers[leader].addr, &token, TIMEOUT).unwrap();
    let worker_tls = Arc::new(tls::client_config(&identity, &root).unwrap());

    // A follower serves no dispatcher call; its refusal says so by reason and names the
    // leader.
    let refused = transport
        .channel(&cluster.managers[follower].addr, &worker_tls)
        .unary::<_, pb::HeartbeatResponse>(
            HEARTBEAT,
            &pb::HeartbeatRequest {
                session_id: "none".into(),
            },
            CallOptions::timeout(TIMEOUT),
        )
        .unwrap_err();
    assert_eq!(refused.reason, NOT_LEADER, "{refused:?}");
    assert!(
        refused.message.contains(&cluster.managers[leader].addr),
        "{refused}"
    );
    // The leader is named in the structured details, which callers follow.
    assert_eq!(
        refused.leader_hint(),
        Some(cluster.managers[leader].addr.as_str()),
        "{refused:?}"
    );

    // The agent tries the follower first, and settles on the leader.
    let managers = vec![
        cluster.managers[follower].addr.clone(),
        cluster.managers[leader].addr.clone(),
    ];
    let sink = Arc::new(Recorder::default());
    let (_reports_tx, reports_rx) = crossbeam_channel::bounded(16);
    let session = AgentSession::start(
        transport.clone(),
        AgentConfig {
            managers: Box::new(move || managers.clone()),
            remember_managers: None,
            last_contact: None,
            tls: worker_tls,
            hostname: "worker-one".into(),
            network_keys: None,
        },
        sink.clone(),
        reports_rx,
    )
    .unwrap();
    eventually("a session", || session.session_id().is_some());
    eventually("the complete set of assignments", || {
        sink.complete_sets.lock().first().is_some_and(Vec::is_empty)
    });
    eventually("the worker's node, ready", || {
        let line = node_line(&dir, "worker-one");
        line.contains(identity.node_id()) && line.contains("ready") && line.contains("worker")
    });
    // Heartbeats keep it ready well past three periods.
    std::thread::sleep(Duration::from_secs(4));
    assert!(node_line(&dir, "worker-one").contains("ready"));

    // Silent for three periods: down.
    session.stop();
    eventually("the silent node, down", || {
        node_line(&dir, "worker-one").contains("down")
    });
    transport.shutdown();
}

/// The leader's threads, by name, from `/proc/<pid>/task`.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[test]
fn fifty_agent_sessions_add_no_thread_to_the_leader() {
    const AGENTS: usize = 50;
    let mut cluster = Cluster::start(1, ClusterOptions::default());
    cluster.wait_voters(1, TIMEOUT);
    let dir = cluster.managers[0].dir.clone();
    let addr = cluster.managers[0].addr.clone();
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let identities: Vec<_> = (0..AGENTS)
        .map(|_| join_cluster(&transport, &addr, &token, TIMEOUT).unwrap())
        .collect();
    eventually("the manager's own node, ready", || {
        cli_ok(&dir, &["node", "ls"]).contains("ready")
    });
    let pid = cluster.managers[0].proc().pid();
    let before = thread_names(pid);

    let mut sessions = Vec::new();
    let mut reports = Vec::new();
    for (i, (identity, root)) in identities.iter().enumerate() {
        let tls = Arc::new(tls::client_config(identity, root).unwrap());
        let managers = vec![addr.clone()];
        let (reports_tx, reports_rx) = crossbeam_channel::bounded(16);
        reports.push(reports_tx);
        sessions.push(
            AgentSession::start(
                transport.clone(),
                AgentConfig {
                    managers: Box::new(move || managers.clone()),
                    remember_managers: None,
                    last_contact: None,
                    tls,
                    hostname: format!("many-{i}"),
                    network_keys: None,
                },
                Arc::new(Recorder::default()),
                reports_rx,
            )
            .unwrap(),
        );
    }
    eventually("every agent with a session", || {
        sessions.iter().all(|s| s.session_id().is_some())
    });
    eventually("every agent's node, ready", || {
        let listing = cli_ok(&dir, &["node", "ls"]);
        (0..AGENTS).all(|i| {
            listing
                .lines()
                .any(|l| l.contains(&format!("many-{i} ")) && l.contains("ready"))
        })
    });
    let after = thread_names(pid);
    eprintln!(
        "leader threads: {} before, {} with {AGENTS} agents",
        before.len(),
        after.len()
    );
    assert!(
        // (`comm` keeps 15 bytes of a name: `flotilla-session` reads `flotilla-sessio`.)
        !after.iter().any(|name| name.starts_with("flotilla-sessio")),
        "no thread per session: {after:?}"
    );
    // A few threads may come and go (snapshots, renewal); one per agent would be 50.
    assert!(
        after.len() <= before.len() + 4,
        "the leader went from {} to {} threads with {AGENTS} agents: {before:?} → {after:?}",
        before.len(),
        after.len()
    );
    for session in sessions {
        session.stop();
    }
    transport.shutdown();
}

/// An agent that was given only a follower's address, and never reached the leader, follows
/// the leader the follower names in its refusal; each session tells it the managers, so it
/// learns one that joins later and forgets one that stopped (unreachable from the leader),
/// and keeps each list (the callback a worker writes `<state-dir>/managers` with). Each
/// acknowledged heartbeat moves its fence deadline forward.
#[test]
fn an_agent_given_only_a_follower_reaches_the_leader_and_learns_the_managers() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let leader = cluster.leader_index(&cluster.client()).unwrap();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let dir = cluster.managers[leader].dir.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "1s"]);
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let (identity, root) =
        join_cluster(&transport, &cluster.managers[leader].addr, &token, TIMEOUT).unwrap();
    let worker_tls = Arc::new(tls::client_config(&identity, &root).unwrap());

    let remembered: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let keep = remembered.clone();
    let only_follower = vec![cluster.managers[follower].addr.clone()];
    let sink = Arc::new(Recorder::default());
    let (_reports_tx, reports_rx) = crossbeam_channel::bounded(16);
    let session = AgentSession::start(
        transport.clone(),
        AgentConfig {
            managers: Box::new(move || only_follower.clone()),
            remember_managers: Some(Box::new(move |addrs: &[String]| {
                keep.lock().push(addrs.to_vec());
            })),
            tls: worker_tls,
            hostname: "worker-via-follower".into(),
            network_keys: None,
            last_contact: None,
        },
        sink.clone(),
        reports_rx,
    )
    .unwrap();
    let leader_addr = cluster.managers[leader].addr.clone();
    eventually("a session with the leader", || {
        session.manager_addr().as_deref() == Some(leader_addr.as_str())
    });
    eventually("the worker's node, ready", || {
        node_line(&dir, "worker-via-follower").contains("ready")
    });
    let sorted = |mut addrs: Vec<String>| {
        addrs.sort();
        addrs
    };
    let mut all = sorted(cluster.managers.iter().map(|m| m.addr.clone()).collect());
    eventually("every manager learned", || {
        remembered.lock().last() == Some(&all)
    });

    // A manager that joins later is learned without a new session.
    let session_id = session.session_id();
    let joined = cluster.add_joiner();
    cluster.wait_voters(4, TIMEOUT);
    all = sorted([all, vec![cluster.managers[joined].addr.clone()]].concat());
    eventually("the manager that joined, learned", || {
        remembered.lock().last() == Some(&all)
    });

    // One that stops is forgotten once the leader no longer hears from it.
    let stopped = cluster.managers[other].addr.clone();
    cluster.managers[other].kill();
    all.retain(|addr| *addr != stopped);
    eventually("the stopped manager, forgotten", || {
        remembered.lock().last() == Some(&all)
    });
    assert_eq!(session.session_id(), session_id, "one session all along");
    let deadlines = sink.fence_deadlines.lock().clone();
    assert!(
        deadlines.len() >= 3 && deadlines.last() > deadlines.get(1),
        "heartbeats move the fence deadline forward: {deadlines:?}"
    );
    session.stop();
}
