//! Node roles and cluster settings acted on by real manager processes: `node demote` of
//! the leader (leadership moves first) and of a follower (the manager leaves the Raft group,
//! exits 0 saying it was demoted, its state directory refuses `run`), demotions that would
//! lose the quorum or the last manager refused, `node promote` followed by a rejoin with the
//! manager token, and `cluster update --snapshot-interval` applied live on every manager.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::ca::{load_node_files, tls};
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::raft as rpb;
use flotilla::wire::Status;
use procs::cluster::{Cluster, ClusterOptions, ManagerProc, START};
use procs::{Proc, run_to_end};

const CLI: Duration = Duration::from_secs(60);

use procs::{cli_in as cli, cli_ok as ok};

fn refused(dir: &Path, args: &[&str]) -> String {
    let (success, output) = cli(dir, args);
    assert!(!success, "flotilla {args:?} should have failed:\n{output}");
    assert!(output.contains("error:"), "no error on stderr:\n{output}");
    output
}

/// Runs a read until its output satisfies `done`.
fn wait_for_output(dir: &Path, args: &[&str], done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + START;
    loop {
        let (_, output) = cli(dir, args);
        if done(&output) {
            return output;
        }
        assert!(
            Instant::now() < deadline,
            "flotilla {args:?} never printed what was expected; last:\n{output}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The node id a manager logged at start.
fn node_id_of(manager: &mut ManagerProc) -> String {
    let line = manager.proc().wait_for("(raft id", START);
    let rest = line.split("manager ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_string()
}

/// The `node ls` row of `node_id`.
fn node_row(listing: &str, node_id: &str) -> Option<String> {
    listing
        .lines()
        .find(|l| l.starts_with(node_id))
        .map(str::to_string)
}

fn role_in_listing(listing: &str, node_id: &str) -> Option<String> {
    // ID HOSTNAME STATUS AVAILABILITY ROLE [MANAGER STATUS]; the hostname may be empty.
    node_row(listing, node_id).and_then(|row| {
        row.split_whitespace()
            .find(|w| *w == "manager" || *w == "worker")
            .map(str::to_string)
    })
}

/// Waits for a demoted manager's process to exit; returns its output (it must succeed).
fn wait_demoted_exit(manager: &mut ManagerProc) -> String {
    let mut proc = manager.proc.take().expect("running");
    let status = proc.wait_exit(START);
    let output = proc.output();
    assert!(
        status.success(),
        "{} exited with {status:?}:\n{output}",
        manager.name
    );
    assert!(
        output.contains("was demoted to worker") && output.contains("agent"),
        "{output}"
    );
    output
}

fn voters(cluster: &Cluster) -> usize {
    let client = cluster.client();
    let status = client.leader_status(cluster).expect("a leader");
    status
        .members
        .iter()
        .filter(|m| m.role != "learner")
        .count()
}

/// `flotilla join` on a demoted manager's state directory, as a running process.
fn start_rejoin(manager: &ManagerProc, token: &str, via: &str) -> Proc {
    let dir = manager.dir.to_str().unwrap();
    let args = [
        "join",
        "--state-dir",
        dir,
        "--listen",
        &manager.addr,
        "--token",
        token,
        via,
    ];
    Proc::start(&format!("{}-rejoined", manager.name), &args)
}

/// Calls `raft.Join` on `leader_addr` with the identity of the state directory `dir`.
fn raft_join_as(dir: &Path, leader_addr: &str) -> Result<rpb::JoinResponse, Status> {
    let (identity, root) = load_node_files(&dir.join("node")).unwrap();
    let transport = Transport::start(TransportConfig::default()).unwrap();
    let tls = Arc::new(tls::client_config(&identity, &root).unwrap());
    let reply = transport.channel(leader_addr, &tls).unary(
        "raft.Join",
        &rpb::JoinRequest {
            raft_id: 0x5eed,
            addr: "127.0.0.1:1".into(),
        },
        CallOptions::timeout(CLI),
    );
    transport.shutdown();
    reply
}

#[test]
fn demote_refuses_unsafe_moves_the_leader_first_and_a_promoted_node_rejoins() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let ids: Vec<String> = cluster.managers.iter_mut().map(node_id_of).collect();
    let dir1 = cluster.managers[0].dir.clone();
    wait_for_output(&dir1, &["node", "ls"], |out| {
        ids.iter()
            .all(|id| role_in_listing(out, id).as_deref() == Some("manager"))
    });
    let client = cluster.client();

    // One manager down: demoting either live one would leave 1 reachable of 2, refused.
    let leader = cluster.leader_index(&client).expect("a leader");
    let down = (leader + 1) % 3;
    let live = 3 - leader - down;
    let leader_dir = cluster.managers[leader].dir.clone();
    let leader_addr = cluster.managers[leader].addr.clone();
    cluster.managers[down].kill();
    let down_addr = cluster.managers[down].addr.clone();
    let deadline = Instant::now() + START;
    while client
        .leader_status(&cluster)
        .is_none_or(|s| s.members.iter().any(|m| m.addr == down_addr && m.reachable))
    {
        assert!(
            Instant::now() < deadline,
            "the leader never saw the manager go"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = refused(&leader_dir, &["node", "demote", &ids[live]]);
    assert!(output.contains("would lose quorum"), "{output}");
    let output = refused(&leader_dir, &["node", "demote", &ids[leader]]);
    assert!(output.contains("would lose quorum"), "{output}");

    // Demoting the one that is down keeps the quorum: it leaves the group while down, and
    // learns it was demoted (from its former peers) when it comes back.
    ok(&leader_dir, &["node", "demote", &ids[down]]);
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[down]).as_deref() == Some("worker")
    });
    assert_eq!(voters(&cluster), 2);
    cluster.managers[down].restart();
    wait_demoted_exit(&mut cluster.managers[down]);

    // Its certificate still names the manager role, but the leader does not let it back
    // into the group before a promotion.
    let error = raft_join_as(&cluster.managers[down].dir, &leader_addr).unwrap_err();
    assert!(error.message.contains("promote it first"), "{error:?}");

    // Promote: the CLI says how it takes effect; the rejoin restores the manager role of
    // the same node, with a new Raft member id.
    let token = ok(&leader_dir, &["join-token", "manager"])
        .trim()
        .to_string();
    let output = ok(&leader_dir, &["node", "promote", &ids[down]]);
    assert!(
        output.contains("desired role is now manager")
            && output.contains("flotilla join")
            && output.contains(&token),
        "{output}"
    );
    let mut rejoined = start_rejoin(&cluster.managers[down], &token, &leader_addr);
    rejoined.wait_for("flotilla manager listening", START);
    cluster.managers[down].proc = Some(rejoined);
    cluster.wait_voters(3, START);
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[down]).as_deref() == Some("manager")
    });

    // Three managers, a follower demoted: it leaves the group (2 voters), exits 0 saying
    // it was demoted, and `node ls` shows it a worker that is down.
    let leader = cluster.leader_index(&client).expect("a leader");
    let follower = (leader + 1) % 3;
    let leader_dir = cluster.managers[leader].dir.clone();
    let output = ok(&leader_dir, &["node", "demote", &ids[follower]]);
    assert!(output.contains("desired role is now worker"), "{output}");
    let output = wait_demoted_exit(&mut cluster.managers[follower]);
    assert!(output.contains("flotilla join"), "{output}");
    cluster.wait_voters(2, START);
    assert_eq!(voters(&cluster), 2);
    let listing = wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[follower]).as_deref() == Some("worker")
    });
    assert!(
        node_row(&listing, &ids[follower]).unwrap().contains("down"),
        "{listing}"
    );

    // Its state directory refuses to run as a manager, with what to do instead; its
    // identity and CA material stay.
    let demoted_dir = cluster.managers[follower].dir.clone();
    let (status, output) = run_to_end(
        &["run", "--state-dir", demoted_dir.to_str().unwrap()],
        START,
    );
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("demoted to worker") && output.contains("node promote"),
        "{output}"
    );
    assert!(demoted_dir.join("node").exists() && demoted_dir.join("ca").exists());

    // Demoting the leader: leadership moves to the other manager first, then it leaves;
    // the last manager cannot be demoted.
    let staying = 3 - leader - follower;
    let output = ok(&leader_dir, &["node", "demote", &ids[leader]]);
    assert!(output.contains("desired role is now worker"), "{output}");
    cluster.managers[leader]
        .proc()
        .wait_for("handing leadership to", START);
    wait_demoted_exit(&mut cluster.managers[leader]);
    cluster.wait_voters(1, START);
    assert_eq!(cluster.leader_index(&client), Some(staying));
    let leader_dir = cluster.managers[staying].dir.clone();
    let leader_addr = cluster.managers[staying].addr.clone();
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[leader]).as_deref() == Some("worker")
    });
    let output = refused(&leader_dir, &["node", "demote", &ids[staying]]);
    assert!(output.contains("last manager"), "{output}");

    // A rejoin before the promotion is refused with the command to run first.
    let mut early = start_rejoin(&cluster.managers[follower], &token, &leader_addr);
    let status = early.wait_exit(START);
    let output = early.output();
    assert!(
        !status.success() && output.contains("promote it first"),
        "{output}"
    );
    // So is a rejoin with a token that is not the manager token.
    let worker_token = ok(&leader_dir, &["join-token", "worker"])
        .trim()
        .to_string();
    ok(&leader_dir, &["node", "promote", &ids[follower]]);
    let mut wrong = start_rejoin(&cluster.managers[follower], &worker_token, &leader_addr);
    let status = wrong.wait_exit(START);
    let output = wrong.output();
    assert!(
        !status.success() && output.contains("worker token"),
        "{output}"
    );
    let mut rejoined = start_rejoin(&cluster.managers[follower], &token, &leader_addr);
    rejoined.wait_for("flotilla manager listening", START);
    cluster.managers[follower].proc = Some(rejoined);
    cluster.wait_voters(2, START);
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[follower]).as_deref() == Some("manager")
    });
    let inspect = ok(&leader_dir, &["node", "inspect", &ids[follower]]);
    assert!(
        inspect.contains("\"desired_role\": \"manager\"")
            && inspect.contains("\"role\": \"manager\"")
            && !inspect.contains("demoted"),
        "{inspect}"
    );
}

/// The newest snapshot index in a manager's raft directory (0 if none).
fn newest_snapshot_index(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir.join("raft").join("snapshots")) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let stem = name.strip_suffix(".snap")?;
            stem.split('-').next()?.parse::<u64>().ok()
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn a_lowered_snapshot_interval_applies_live_on_every_manager() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let dir1 = cluster.managers[0].dir.clone();
    wait_for_output(&dir1, &["cluster", "inspect"], |out| {
        out.contains("\"snapshot_interval_entries\": 10000")
    });

    // Out-of-range values are refused with the field and the bounds.
    let output = refused(&dir1, &["cluster", "update", "--snapshot-interval", "0"]);
    assert!(output.contains("snapshot_interval_entries"), "{output}");
    let output = refused(&dir1, &["cluster", "update", "--heartbeat-period", "500ms"]);
    assert!(
        output.contains("heartbeat_period_ms") && output.contains("1s"),
        "{output}"
    );
    let output = refused(
        &dir1,
        &["cluster", "update", "--task-history-retention", "5000"],
    );
    assert!(output.contains("task_history_retention"), "{output}");

    ok(&dir1, &["cluster", "update", "--snapshot-interval", "20"]);
    for manager in &mut cluster.managers {
        manager
            .proc()
            .wait_for("snapshot interval now 20 entries", START);
    }
    let client = cluster.client();
    let base = client.leader_status(&cluster).expect("a leader").commit;
    let leader = cluster.leader_index(&client).expect("a leader");
    let leader_addr = cluster.managers[leader].addr.clone();
    // Three intervals' worth: a snapshot still being written when one is due is skipped,
    // so the writes give every manager several chances.
    for i in 0..60 {
        client
            .put_at(&leader_addr, &format!("k{i}"), Bytes::from_static(b"v"))
            .unwrap();
    }
    // Every manager must have taken a snapshot after `base`.
    for manager in &cluster.managers {
        let deadline = Instant::now() + START;
        while newest_snapshot_index(&manager.dir) <= base {
            assert!(
                Instant::now() < deadline,
                "{} took no snapshot after index {base}",
                manager.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
