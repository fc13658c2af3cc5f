//! Resources and placement with real processes: reservations the scheduler counts (a task
//! that fits nowhere waits, saying why), memory limits the agent enforces on the process
//! (cgroup v2 where the host has it, else `RLIMIT_AS`), and tasks moved when a node's
//! labels stop satisfying their constraints.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::path::Path;
use std::time::Duration;

use procs::cluster::{Cluster, ClusterOptions};
use procs::{cli_ok, count, task_rows, task_states};

const TIMEOUT: Duration = Duration::from_secs(60);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// `status.limits_note` of `service`'s tasks, from `service ps --format json`.
fn limits_notes(dir: &Path, service: &str) -> Vec<String> {
    let output = cli_ok(dir, &["service", "ps", service, "--format", "json"]);
    let json = &output[output.find('[').unwrap_or(0)..];
    let tasks: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    tasks
        .iter()
        .map(|t| {
            t["status"]["limits_note"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[test]
fn a_service_reserving_more_memory_than_any_node_has_stays_pending_with_the_reason() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "huge",
            "--reserve-memory",
            "100000G",
            "--",
            "sleep",
            "60",
        ],
    );
    eventually("the task pending with the reason", || {
        task_rows(&dir, &["service", "ps", "huge"])
            .iter()
            .any(|row| {
                row.current == "pending"
                    && row
                        .problem
                        .starts_with("no suitable node (insufficient resources on 1 node)")
            })
    });
    // The table shows it in its ERROR column, as `docker service ps` does.
    let table = cli_ok(&dir, &["service", "ps", "huge"]);
    assert!(table.contains("insufficient resources"), "{table}");
    assert!(
        table.contains("reserves 102400000 MiB of memory"),
        "{table}"
    );

    // A reservation that fits is placed and runs.
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "fits",
            "--reserve-memory",
            "1M",
            "--reserve-cpu",
            "0.01",
            "--",
            "sleep",
            "60",
        ],
    );
    eventually("the fitting task running", || {
        count(&task_states(&dir, "fits"), "running", "running") == 1
    });
    cli_ok(&dir, &["service", "rm", "huge", "fits"]);
}

#[test]
fn a_memory_limit_stops_a_task_that_allocates_beyond_it() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let marker = cluster.tmp.path().join("allocated");
    // The shell holds 50 MB in a variable, then says so and waits.
    let script = format!(
        "x=$(head -c 50000000 /dev/zero | tr '\\0' a); echo ${{#x}} > {}; exec sleep 60",
        marker.display()
    );
    let create = |name: &str, limit: &str| {
        cli_ok(
            &dir,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                name,
                "--limit-memory",
                limit,
                "--restart-condition",
                "none",
                "--",
                "sh",
                "-c",
                &script,
            ],
        );
    };
    create("small", "16M");
    create("large", "1G");
    eventually("the task over its limit failed", || {
        count(&task_states(&dir, "small"), "running", "failed") == 1
    });
    eventually("the task within its limit allocated and runs", || {
        std::fs::read_to_string(&marker).is_ok_and(|text| text.trim() == "50000000")
            && count(&task_states(&dir, "large"), "running", "running") == 1
    });
    // Where the memory controller of cgroup v2 is missing, the note says the rlimit
    // stands in for it.
    for note in limits_notes(&dir, "small") {
        assert!(note.is_empty() || note.contains("RLIMIT_AS"), "{note}");
    }
    let cgroup_v2_memory = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
        .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "memory"));
    if !cgroup_v2_memory {
        assert!(
            limits_notes(&dir, "small")
                .iter()
                .all(|note| note.contains("RLIMIT_AS")),
            "{:?}",
            limits_notes(&dir, "small")
        );
    }
    cli_ok(&dir, &["service", "rm", "small", "large"]);
}

/// Node ids of `node ls`: the manager's and the worker's, by role.
fn node_ids(dir: &Path) -> (String, String) {
    let output = cli_ok(dir, &["node", "ls", "--format", "json"]);
    let json = &output[output.find('[').unwrap_or(0)..];
    let nodes: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    let with_role = |role: &str| {
        nodes
            .iter()
            .find(|n| n["role"].as_str() == Some(role))
            .map(|n| n["id"].as_str().unwrap().to_string())
            .unwrap_or_default()
    };
    (with_role("manager"), with_role("worker"))
}

#[test]
fn changing_a_node_label_moves_a_constrained_task() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let worker_dir = cluster.tmp.path().join("w1");
    let mut worker = procs::Proc::start(
        "worker",
        &[
            "agent",
            "--state-dir",
            worker_dir.to_str().unwrap(),
            "--token",
            &token,
            "--manager",
            &cluster.managers[0].addr,
        ],
    );
    worker.wait_for("running the tasks assigned", TIMEOUT);
    eventually("two nodes listed", || {
        let (manager, worker) = node_ids(&dir);
        !manager.is_empty() && !worker.is_empty()
    });
    let (manager_id, worker_id) = node_ids(&dir);
    cli_ok(
        &dir,
        &["node", "update", &manager_id, "--label-add", "zone=x"],
    );
    cli_ok(
        &dir,
        &["node", "update", &worker_id, "--label-add", "zone=y"],
    );
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "zoned",
            "--constraint",
            "node.labels.zone==x",
            "--",
            "sleep",
            "60",
        ],
    );
    let running_on = |node: &str| {
        task_rows(&dir, &["service", "ps", "zoned"])
            .iter()
            .any(|row| row.node == node && row.desired == "running" && row.current == "running")
    };
    eventually("the task running on the manager (zone x)", || {
        running_on(&manager_id)
    });

    // The zones swap: the task is shut down on the manager and runs on the worker.
    cli_ok(
        &dir,
        &["node", "update", &manager_id, "--label-add", "zone=y"],
    );
    cli_ok(
        &dir,
        &["node", "update", &worker_id, "--label-add", "zone=x"],
    );
    eventually("the task moved to the worker", || {
        let rows = task_rows(&dir, &["service", "ps", "zoned"]);
        running_on(&worker_id)
            && rows
                .iter()
                .any(|row| row.node == manager_id && row.current == "shutdown")
    });
    cli_ok(&dir, &["service", "rm", "zoned"]);
    worker.signal(libc::SIGTERM);
    worker.wait_exit(TIMEOUT);
}
