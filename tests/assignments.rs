//! The dispatcher's assignments against a real manager process, with an in-process agent
//! session whose task sink records every message: scaling a service up and down
//! repeatedly converges over one session's chained incremental messages (no gap, so no
//! second complete set), none of which only echoes a status the agent reported; and the
//! tasks of a node down past the cluster's `orphan_after` become ORPHANED.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use flotilla::agent::TaskStatusReport;
use flotilla::agent::session::{AgentConfig, AgentSession, TaskSink};
use flotilla::ca::tls;
use flotilla::ca_rpc::join_cluster;
use flotilla::net::{Transport, TransportConfig};
use flotilla::proto::objects::{Task, TaskState, TaskStatus};
use parking_lot::Mutex;
use procs::cluster::{Cluster, ClusterOptions};
use procs::{cli_ok, count, task_states};

const TIMEOUT: Duration = Duration::from_secs(40);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// The class of a state as the agent acts on it (not started, started, ended).
fn class(state: i32) -> u8 {
    if state >= TaskState::Complete as i32 {
        2
    } else if state >= TaskState::Starting as i32 {
        1
    } else {
        0
    }
}

fn state_of(task: &Task) -> i32 {
    task.status.as_ref().map_or(0, |s| s.state)
}

/// A fake node: holds what the session delivers, "runs" every task wanted running (reports
/// STARTING then RUNNING) and "stops" every task wanted past running (reports SHUTDOWN).
struct Node {
    reports: Sender<TaskStatusReport>,
    tasks: Mutex<BTreeMap<String, Task>>,
    /// The latest state this node reported per task.
    reported: Mutex<HashMap<String, i32>>,
    complete_sets: Mutex<usize>,
    updates: Mutex<usize>,
    /// Tasks of incremental messages that changed nothing this node acts on.
    echoes: Mutex<Vec<String>>,
    /// Incremental messages holding more than 100 changes.
    oversized: Mutex<usize>,
}

impl Node {
    fn new(reports: Sender<TaskStatusReport>) -> Node {
        Node {
            reports,
            tasks: Mutex::default(),
            reported: Mutex::default(),
            complete_sets: Mutex::default(),
            updates: Mutex::default(),
            echoes: Mutex::default(),
            oversized: Mutex::default(),
        }
    }

    fn report(&self, task_id: &str, state: TaskState) {
        self.reported
            .lock()
            .insert(task_id.to_string(), state as i32);
        let report = TaskStatusReport {
            task_id: task_id.to_string(),
            status: TaskStatus {
                state: state as i32,
                message: format!("{state:?} (fake node)"),
                timestamp_ms: 1,
                ..Default::default()
            },
        };
        self.reports.try_send(report).unwrap();
    }

    fn act(&self, task: &Task) {
        let reported = self.reported.lock().get(&task.id).copied().unwrap_or(0);
        let state = state_of(task).max(reported);
        if task.desired_state == TaskState::Running as i32 && state < TaskState::Starting as i32 {
            self.report(&task.id, TaskState::Starting);
            self.report(&task.id, TaskState::Running);
        } else if task.desired_state > TaskState::Running as i32
            && state < TaskState::Complete as i32
        {
            self.report(&task.id, TaskState::Shutdown);
        }
    }

    fn upsert(&self, task: Task) {
        self.act(&task);
        self.tasks.lock().insert(task.id.clone(), task);
    }

    /// Tasks this node holds wanted running.
    fn wanted_running(&self) -> usize {
        self.tasks
            .lock()
            .values()
            .filter(|t| t.desired_state == TaskState::Running as i32)
            .count()
    }
}

impl TaskSink for Node {
    fn assign_part(&self, tasks: Vec<Task>, first: bool, last: bool) {
        assert!(first && last, "small sets come in one part");
        *self.complete_sets.lock() += 1;
        self.tasks.lock().clear();
        for task in tasks {
            self.upsert(task);
        }
    }

    fn update(&self, changed: Vec<Task>, removed: Vec<String>) {
        *self.updates.lock() += 1;
        if changed.len() + removed.len() > 100 {
            *self.oversized.lock() += 1;
        }
        for task in changed {
            let held = self.tasks.lock().get(&task.id).cloned();
            let reported = self.reported.lock().get(&task.id).copied().unwrap_or(0);
            if let Some(held) = held
                && held.desired_state == task.desired_state
                && held.spec == task.spec
                && class(state_of(&task)) <= class(state_of(&held).max(reported))
            {
                self.echoes.lock().push(task.id.clone());
            }
            self.upsert(task);
        }
        let mut tasks = self.tasks.lock();
        for id in removed {
            tasks.remove(&id);
        }
    }
}

/// A worker joined to the cluster's leader, with an in-process agent session on `node`.
fn fake_worker(cluster: &Cluster, hostname: &str) -> (Arc<Transport>, AgentSession, Arc<Node>) {
    let dir = &cluster.managers[0].dir;
    let addr = cluster.managers[0].addr.clone();
    let token = cli_ok(dir, &["join-token", "worker"]).trim().to_string();
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let (identity, root) = join_cluster(&transport, &addr, &token, TIMEOUT).unwrap();
    let worker_tls = Arc::new(tls::client_config(&identity, &root).unwrap());
    let (reports_tx, reports_rx) = crossbeam_channel::bounded(4096);
    let node = Arc::new(Node::new(reports_tx));
    let session = AgentSession::start(
        transport.clone(),
        AgentConfig {
            managers: Box::new(move || vec![addr.clone()]),
            tls: worker_tls,
            network_keys: None,
            hostname: hostname.into(),
            remember_managers: None,
            last_contact: None,
        },
        node.clone(),
        reports_rx,
    )
    .unwrap();
    eventually("a session", || session.session_id().is_some());
    eventually("the complete set", || *node.complete_sets.lock() == 1);
    (transport, session, node)
}

#[test]
fn scaling_up_and_down_converges_over_one_sessions_chained_changes() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    cluster.wait_voters(1, TIMEOUT);
    let dir = cluster.managers[0].dir.clone();
    let (transport, session, node) = fake_worker(&cluster, "chain-worker");
    let session_id = session.session_id().unwrap();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "chain",
            "--replicas",
            "3",
            "--constraint",
            "node.hostname==chain-worker",
            "--",
            "sleep",
            "300",
        ],
    );
    for replicas in [3usize, 12, 1, 7, 0, 5, 2] {
        cli_ok(&dir, &["service", "scale", &format!("chain={replicas}")]);
        eventually(
            &format!("{replicas} tasks running on the fake node"),
            || {
                let states = task_states(&dir, "chain");
                count(&states, "running", "running") == replicas
                    && node.wanted_running() == replicas
            },
        );
    }
    assert_eq!(
        session.session_id().as_deref(),
        Some(session_id.as_str()),
        "one session throughout"
    );
    assert_eq!(
        *node.complete_sets.lock(),
        1,
        "no gap in the chain: no second complete set"
    );
    assert!(
        *node.updates.lock() > 0,
        "changes came as incremental messages"
    );
    assert_eq!(*node.oversized.lock(), 0, "at most 100 changes per message");
    let echoes = node.echoes.lock().clone();
    assert!(
        echoes.is_empty(),
        "incremental messages carried changes the agent does not act on: {echoes:?}"
    );
    session.stop();
    transport.shutdown();
}

#[test]
fn the_tasks_of_a_node_down_past_orphan_after_are_orphaned() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    cluster.wait_voters(1, TIMEOUT);
    let dir = cluster.managers[0].dir.clone();
    cli_ok(
        &dir,
        &[
            "cluster",
            "update",
            "--heartbeat-period",
            "1s",
            "--orphan-after",
            "2s",
        ],
    );
    assert!(
        cli_ok(&dir, &["cluster", "inspect"]).contains("\"orphan_after_ms\": 2000"),
        "the setting is stored and shown"
    );
    let (transport, session, node) = fake_worker(&cluster, "orphan-worker");
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "lost",
            "--replicas",
            "2",
            "--constraint",
            "node.hostname==orphan-worker",
            "--",
            "sleep",
            "300",
        ],
    );
    eventually("two tasks running on the fake node", || {
        count(&task_states(&dir, "lost"), "running", "running") == 2 && node.wanted_running() == 2
    });
    // The node's agent goes away: DOWN after 3 silent periods, then its tasks, which may
    // still run for all the managers know, become ORPHANED 2 s later.
    session.stop();
    eventually("the node down", || {
        cli_ok(&dir, &["node", "ls"])
            .lines()
            .any(|l| l.contains("orphan-worker") && l.contains("down"))
    });
    eventually("both tasks orphaned", || {
        task_states(&dir, "lost")
            .iter()
            .filter(|(_, current)| current == "orphaned")
            .count()
            == 2
    });
    transport.shutdown();
}
