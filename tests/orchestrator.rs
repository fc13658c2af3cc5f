//! The orchestrator against real manager processes: a 3-manager cluster (the managers are
//! its nodes) turns `service create`, `service scale` and `service rm` into task changes
//! that `task ls` shows: tasks created and assigned to nodes, retired on scale down, asked
//! to be removed with their service; a new leader's orchestrator carries on after the
//! leader stops.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use procs::cluster::{Cluster, ClusterOptions};
use procs::run_to_end;

const CLI: Duration = Duration::from_secs(60);
/// Polls of `task ls` before a test gives up (100 ms apart).
const POLLS_MAX: usize = 300;

fn cli(dir: &Path, args: &[&str]) -> (bool, String) {
    let dir = dir.to_str().unwrap();
    let mut all: Vec<&str> = vec![args[0], "--state-dir", dir];
    all.extend(&args[1..]);
    let (status, output) = run_to_end(&all, CLI);
    (status.success(), output)
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let (success, output) = cli(dir, args);
    assert!(success, "flotilla {args:?} failed:\n{output}");
    output
}

/// Runs `args` until it succeeds (while a new leader is being elected).
fn ok_eventually(dir: &Path, args: &[&str]) -> String {
    let mut last = String::new();
    for _ in 0..POLLS_MAX {
        let (success, output) = cli(dir, args);
        if success {
            return output;
        }
        last = output;
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("flotilla {args:?} never succeeded; last:\n{last}");
}

/// One task of `task ls`.
type Row = procs::TaskRow;

/// Polls `task ls` until `done` accepts its rows; returns them.
fn wait_for_tasks(dir: &Path, what: &str, done: impl Fn(&[Row]) -> bool) -> Vec<Row> {
    let mut rows = Vec::new();
    for _ in 0..POLLS_MAX {
        rows = procs::task_rows(dir, &["task", "ls"]);
        if done(&rows) {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("tasks never reached: {what}; last seen: {rows:#?}");
}

#[test]
fn three_managers_create_scale_and_remove_a_service() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    // Every manager records itself as a READY, ACTIVE node.
    for _ in 0..POLLS_MAX {
        if ok(&dir, &["node", "ls"]).matches("ready").count() >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "3",
            "sleep",
            "100",
        ],
    );
    // Assigned, then run by each manager's own agent.
    let rows = wait_for_tasks(&dir, "3 running tasks", |rows| {
        rows.len() == 3
            && rows
                .iter()
                .all(|r| r.desired == "running" && r.current == "running" && !r.node.is_empty())
    });
    let slots: BTreeSet<u64> = rows.iter().map(|r| r.slot).collect();
    assert_eq!(slots, BTreeSet::from([1, 2, 3]));
    let nodes: BTreeSet<&str> = rows.iter().map(|r| r.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one task per manager node: {rows:#?}");

    // The leader stops cleanly (its orchestrator thread within the shutdown barrier); the
    // new leader's orchestrator takes over from the replicated tasks without duplicating
    // any: the scale down below leaves exactly the 3 tasks, 2 of them retired.
    let client = cluster.client();
    let leader = cluster.leader_index(&client).unwrap();
    client.transport.shutdown();
    let leader_node = ok(&cluster.managers[leader].dir, &["node", "ls"])
        .lines()
        .find(|line| line.trim_end().ends_with("leader"))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_string)
        .unwrap();
    cluster.managers[leader].stop();
    let dir = cluster.managers[(leader + 1) % 3].dir.clone();
    ok_eventually(&dir, &["service", "scale", "web=1"]);
    let rows = wait_for_tasks(&dir, "2 tasks retired by the scale down", |rows| {
        rows.iter().filter(|r| r.desired == "shutdown").count() == 2
    });
    let running: Vec<&Row> = rows.iter().filter(|r| r.desired == "running").collect();
    assert_eq!(running.len(), 1, "{rows:#?}");
    assert_eq!(rows.len(), 3, "no task was duplicated: {rows:#?}");
    assert_eq!(running[0].slot, 1);

    ok(&dir, &["service", "rm", "web"]);
    // The live managers' agents stop their tasks and the reaper deletes them; the stopped
    // manager's task waits (desired remove) for its agent to come back.
    let rows = wait_for_tasks(&dir, "every live task stopped and reaped", |rows| {
        rows.iter()
            .all(|r| r.node == leader_node && r.desired == "remove")
    });
    assert!(rows.len() <= 1, "{rows:#?}");
}
