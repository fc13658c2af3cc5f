//! Node roles and cluster settings acted on by real processes: `node demote` of the leader
//! (leadership moves first) and of a follower (the manager leaves the Raft group and the
//! same process goes on as a worker, renewing its certificate as a worker's), demotions that
//! would lose the quorum or the last manager refused, `node promote` of a demoted manager
//! and of a worker started with `flotilla agent` (the same process becomes a manager, same
//! node id), and `cluster update --snapshot-interval` applied live on every manager.
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

/// Waits until a demoted node's process says (after line `mark`) it goes on as a worker
/// and its agent runs.
fn wait_demoted(proc: &mut Proc, mark: usize) {
    let (at, _) = proc.wait_for_after(mark, "was demoted to worker", START);
    proc.wait_for_after(at, "running the tasks assigned to it", START);
}

/// Waits until a promoted node's process runs as a manager (after line `mark`).
fn wait_promoted(proc: &mut Proc, mark: usize) {
    let (at, _) = proc.wait_for_after(mark, "this node is a manager now", START);
    proc.wait_for_after(at, "flotilla manager listening", START);
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
fn demote_refuses_unsafe_moves_the_leader_first_and_promotion_keeps_the_node() {
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

    // Demoting the one that is down keeps the quorum: it leaves the group while down,
    // learns it was demoted (from its former peers) when it comes back, and goes on as a
    // worker in the same process; its certificate is renewed as a worker's.
    ok(&leader_dir, &["node", "demote", &ids[down]]);
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[down]).as_deref() == Some("worker")
    });
    assert_eq!(voters(&cluster), 2);
    let down_dir = cluster.managers[down].dir.clone();
    let mut restarted = Proc::start(
        "m-down",
        &["run", "--state-dir", down_dir.to_str().unwrap()],
    );
    restarted.wait_for("was demoted to worker", START);
    restarted.wait_for("running the tasks assigned to it", START);
    restarted.wait_for("certificate renewed (worker)", START);
    assert!(down_dir.join("demoted").exists());
    // It is a worker now: the managers' Raft service refuses it.
    assert!(raft_join_as(&down_dir, &leader_addr).is_err());
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        node_row(out, &ids[down]).is_some_and(|row| row.contains("ready"))
    });

    // Promote: the same process becomes a manager again, with the same node id and a new
    // Raft member id.
    let mark = restarted.mark();
    let output = ok(&leader_dir, &["node", "promote", &ids[down]]);
    assert!(
        output.contains("desired role is now manager") && output.contains("in place"),
        "{output}"
    );
    wait_promoted(&mut restarted, mark);
    assert!(!down_dir.join("demoted").exists());
    cluster.managers[down].proc = Some(restarted);
    cluster.wait_voters(3, START);
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[down]).as_deref() == Some("manager")
    });

    // Three managers, a follower demoted: it leaves the group (2 voters) and goes on as a
    // worker; `node ls` shows it a worker.
    let leader = cluster.leader_index(&client).expect("a leader");
    let follower = (leader + 1) % 3;
    let leader_dir = cluster.managers[leader].dir.clone();
    let mark = cluster.managers[follower].proc().mark();
    let output = ok(&leader_dir, &["node", "demote", &ids[follower]]);
    assert!(output.contains("desired role is now worker"), "{output}");
    wait_demoted(cluster.managers[follower].proc(), mark);
    cluster.wait_voters(2, START);
    assert_eq!(voters(&cluster), 2);
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[follower]).as_deref() == Some("worker")
    });
    // Its directory is in use by the worker it runs now.
    let demoted_dir = cluster.managers[follower].dir.clone();
    let (status, output) = run_to_end(
        &["run", "--state-dir", demoted_dir.to_str().unwrap()],
        START,
    );
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("in use by another flotilla process"),
        "{output}"
    );
    assert!(demoted_dir.join("node").exists() && demoted_dir.join("ca").exists());

    // Demoting the leader: leadership moves to the other manager first, then it leaves;
    // the last manager cannot be demoted.
    let staying = 3 - leader - follower;
    let mark = cluster.managers[leader].proc().mark();
    let output = ok(&leader_dir, &["node", "demote", &ids[leader]]);
    assert!(output.contains("desired role is now worker"), "{output}");
    cluster.managers[leader]
        .proc()
        .wait_for_after(mark, "handing leadership to", START);
    wait_demoted(cluster.managers[leader].proc(), mark);
    cluster.wait_voters(1, START);
    assert_eq!(cluster.leader_index(&client), Some(staying));
    let leader_dir = cluster.managers[staying].dir.clone();
    wait_for_output(&leader_dir, &["node", "ls"], |out| {
        role_in_listing(out, &ids[leader]).as_deref() == Some("worker")
    });
    let output = refused(&leader_dir, &["node", "demote", &ids[staying]]);
    assert!(output.contains("last manager"), "{output}");

    // Promoting the demoted follower brings it back in place.
    let mark = cluster.managers[follower].proc().mark();
    ok(&leader_dir, &["node", "promote", &ids[follower]]);
    wait_promoted(cluster.managers[follower].proc(), mark);
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

#[test]
fn a_promoted_worker_becomes_a_manager_in_place() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let manager_dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    let token = ok(&manager_dir, &["join-token", "worker"]);
    let token = token
        .split_whitespace()
        .find(|w| w.starts_with("FLT-1-"))
        .unwrap()
        .to_string();
    let start_worker = |name: &str, listen: Option<&str>| {
        let dir = cluster.tmp.path().join(name);
        let dir_arg = dir.to_str().unwrap().to_string();
        let mut args = vec![
            "agent",
            "--state-dir",
            &dir_arg,
            "--token",
            &token,
            "--manager",
            &manager_addr,
        ];
        if let Some(listen) = listen {
            args.extend(["--listen", listen]);
        }
        let mut proc = Proc::start(name, &args);
        let line = proc.wait_for("running the tasks assigned to it", START);
        let node_id = line.split_whitespace().nth(2).unwrap().to_string();
        (proc, dir, node_id)
    };
    let listen = procs::free_addr();
    let (mut worker, worker_dir, worker_id) = start_worker("w1", Some(&listen));
    let (mut plain, _plain_dir, plain_id) = start_worker("w2", None);
    wait_for_output(&manager_dir, &["node", "ls"], |out| {
        [&worker_id, &plain_id]
            .iter()
            .all(|id| node_row(out, id).is_some_and(|row| row.contains("ready")))
    });

    let mark = worker.mark();
    ok(&manager_dir, &["node", "promote", &worker_id]);
    worker.wait_for_after(mark, "certificate renewed (manager)", START);
    wait_promoted(&mut worker, mark);
    cluster.wait_voters(2, START);
    let listing = wait_for_output(&manager_dir, &["node", "ls"], |out| {
        role_in_listing(out, &worker_id).as_deref() == Some("manager")
    });
    assert_eq!(
        listing
            .lines()
            .filter(|l| l.starts_with(&worker_id))
            .count(),
        1,
        "the promoted worker is one node, not a second one:\n{listing}"
    );
    assert!(worker_dir.join("manager.conf").exists());
    let managers = ok(&manager_dir, &["manager", "ls", "--format", "json"]);
    assert!(managers.contains(&listen), "{managers}");

    // A worker started without --listen cannot become a manager: it says so and stays.
    ok(&manager_dir, &["node", "promote", &plain_id]);
    plain.wait_for("has no address to listen on", START);
    assert_eq!(voters(&cluster), 2);

    // Demoted again, the promoted worker goes on as a worker in the same process.
    let mark = worker.mark();
    ok(&manager_dir, &["node", "demote", &worker_id]);
    wait_demoted(&mut worker, mark);
    cluster.wait_voters(1, START);
    for proc in [&mut worker, &mut plain] {
        proc.signal(15);
        assert!(proc.wait_exit(START).success(), "{}", proc.output());
    }
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
