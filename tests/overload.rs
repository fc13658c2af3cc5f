//! Overload a cluster never recovers from, with real processes: a service larger than the
//! node can run converges (the rest waits PENDING with the reason), a task that ends at once
//! is restarted no faster than the restart delay, a large service is created and removed
//! with the log and the snapshots shrinking back, no task is ever left RUNNING for a
//! process that is gone (after a process is killed, and across a manager restart), and a
//! complete assignment set too large for one message keeps every running task.
//!
//! `FLOTILLA_OVERLOAD_REPLICAS=100000` runs the create-and-remove test at the size of the
//! original report (20,000 by default, to keep the default run short).
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::path::Path;
use std::time::{Duration, Instant};

use procs::cli_ok;
use procs::cluster::{Cluster, ClusterOptions};

const TIMEOUT: Duration = Duration::from_secs(60);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// A one-manager cluster whose node runs at most `tasks_running_max` tasks at once (the
/// agent's default, 256, without one), once its agent has reported that to the managers.
fn cluster_with_room(tasks_running_max: Option<u32>) -> Cluster {
    let mut cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    if let Some(tasks) = tasks_running_max {
        cluster.managers[0].stop();
        let conf = dir.join("manager.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(&format!("tasks_running_max = {tasks}\n"));
        std::fs::write(&conf, text).unwrap();
        cluster.managers[0].restart();
    }
    let reported = format!("\"tasks_max\": {}", tasks_running_max.unwrap_or(256));
    eventually("the node's capacity, reported", || {
        cli_ok(&dir, &["node", "ls", "--format", "json"]).contains(&reported)
    });
    cluster
}

/// One row of `service ps`: `(desired, current, error)`.
fn ps_rows(dir: &Path, service: &str) -> Vec<(String, String, String)> {
    procs::task_rows(dir, &["service", "ps", service])
        .into_iter()
        .map(|row| (row.desired, row.current, row.problem))
        .collect()
}

fn count(rows: &[(String, String, String)], desired: &str, current: &str) -> usize {
    rows.iter()
        .filter(|(d, c, _)| d == desired && c == current)
        .count()
}

/// True if `pid` is a live process (not a zombie) running `program`.
fn runs(pid: u32, program: &str) -> bool {
    let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    alive && String::from_utf8_lossy(&cmdline).contains(program)
}

/// The pids of the tasks the managers record RUNNING (from their status messages, "running
/// as pid N"), and how many RUNNING tasks had no pid in their message.
fn running_pids(dir: &Path) -> (Vec<u32>, usize) {
    let json = cli_ok(dir, &["task", "ls", "--format", "json"]);
    let mut pids = Vec::new();
    let mut without = 0;
    // Each task's status object holds "state" then "message": pair them up in order.
    let mut state = String::new();
    for line in json.lines().map(str::trim) {
        if let Some(value) = line.strip_prefix("\"state\": ") {
            state = value.trim_end_matches(',').trim_matches('"').to_string();
        } else if let Some(value) = line.strip_prefix("\"message\": ")
            && state == "running"
        {
            let pid = value
                .split_whitespace()
                .skip_while(|word| *word != "pid")
                .nth(1)
                .and_then(|pid| pid.parse().ok());
            match pid {
                Some(pid) => pids.push(pid),
                None => without += 1,
            }
            state.clear();
        }
    }
    (pids, without)
}

/// Every task recorded RUNNING has a live `program` process, and there are `expected`.
fn running_tasks_are_live(dir: &Path, program: &str, expected: usize) -> bool {
    let (pids, without) = running_pids(dir);
    without == 0 && pids.len() == expected && pids.iter().all(|&pid| runs(pid, program))
}

#[test]
fn a_service_larger_than_the_node_runs_what_fits_and_the_rest_waits_with_the_reason() {
    let cluster = cluster_with_room(Some(3));
    let dir = cluster.managers[0].dir.clone();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "wide",
            "--replicas",
            "5",
            "--",
            "sleep",
            "302",
        ],
    );
    eventually("three running, two pending", || {
        let rows = ps_rows(&dir, "wide");
        count(&rows, "running", "running") == 3 && count(&rows, "running", "pending") == 2
    });
    // The reason is shown, and the state is steady: nothing is rejected or restarted.
    let rows = ps_rows(&dir, "wide");
    for (_, current, error) in &rows {
        if current == "pending" {
            assert!(
                error.contains("no node has room") && error.contains("maximum of 3 tasks"),
                "{rows:?}"
            );
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    let later = ps_rows(&dir, "wide");
    assert_eq!(
        later.len(),
        5,
        "no task was refused and replaced: {later:?}"
    );
    assert!(running_tasks_are_live(&dir, "sleep", 3));

    // Another service waits too; once room frees up, its task takes it.
    cli_ok(
        &dir,
        &[
            "service", "create", "--detach", "--name", "late", "--", "sleep", "302",
        ],
    );
    eventually("the late task pending", || {
        count(&ps_rows(&dir, "late"), "running", "pending") == 1
    });
    cli_ok(&dir, &["service", "scale", "wide=2"]);
    eventually("the late task running", || {
        count(&ps_rows(&dir, "late"), "running", "running") == 1
    });
    assert!(running_tasks_are_live(&dir, "sleep", 3));
    cli_ok(&dir, &["service", "rm", "wide"]);
    cli_ok(&dir, &["service", "rm", "late"]);
    eventually("every task gone", || {
        cli_ok(&dir, &["task", "ls"]).lines().count() <= 1
    });
}

#[test]
fn a_task_that_ends_at_once_restarts_no_faster_than_the_default_delay() {
    let cluster = cluster_with_room(None);
    let dir = cluster.managers[0].dir.clone();
    let created = Instant::now();
    cli_ok(
        &dir,
        &[
            "service", "create", "--detach", "--name", "storm", "--", "true",
        ],
    );
    eventually("a restart", || ps_rows(&dir, "storm").len() >= 2);
    std::thread::sleep(Duration::from_secs(12).saturating_sub(created.elapsed()));
    // The first run ends at once; 5 s later the second, which ends at once too, so the
    // third waits 10 s (backoff): within 12 s of the creation, at most three runs (two
    // unless the machine is slow to start them). Without a delay it restarted about 83
    // times a second.
    let runs = ps_rows(&dir, "storm").len();
    assert!(runs <= 3, "{runs} tasks in {:?}", created.elapsed());
    let inspect = cli_ok(&dir, &["service", "inspect", "storm"]);
    assert!(inspect.contains("\"delay_ms\": 5000"), "{inspect}");
}

#[test]
fn a_large_service_is_created_and_removed_and_the_log_shrinks_back() {
    let replicas: u64 = std::env::var("FLOTILLA_OVERLOAD_REPLICAS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(20_000);
    let cluster = cluster_with_room(Some(2));
    let dir = cluster.managers[0].dir.clone();
    let replicas_arg = replicas.to_string();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "huge",
            "--replicas",
            &replicas_arg,
            "--",
            "sleep",
            "303",
        ],
    );
    let task_lines = || {
        cli_ok(&dir, &["task", "ls"])
            .lines()
            .count()
            .saturating_sub(1)
    };
    procs::eventually("every task created", Duration::from_secs(120), || {
        task_lines() as u64 == replicas
    });
    eventually("two running, the rest pending", || {
        let rows = ps_rows(&dir, "huge");
        count(&rows, "running", "running") == 2
            && count(&rows, "running", "pending") as u64 == replicas - 2
    });

    let (pids, _) = running_pids(&dir);
    assert_eq!(pids.len(), 2);
    let removed = Instant::now();
    cli_ok(&dir, &["service", "rm", "huge"]);
    eventually("every task gone", || task_lines() == 0);
    println!("{replicas} tasks removed in {:?}", removed.elapsed());
    // Once idle, the shrunken state is snapshotted and the log compacted: one small
    // snapshot is left, the large one the log no longer joins is deleted.
    let snapshots = dir.join("raft").join("snapshots");
    eventually("one small snapshot", || {
        let files: Vec<u64> = std::fs::read_dir(&snapshots)
            .unwrap()
            .filter_map(|entry| entry.ok())
            .filter(|entry| entry.file_name().to_string_lossy().ends_with(".snap"))
            .map(|entry| entry.metadata().unwrap().len())
            .collect();
        files.len() == 1 && files[0] < 64 * 1024
    });
    assert!(
        pids.iter().all(|&pid| !runs(pid, "sleep")),
        "every process of the service stopped"
    );
}

#[test]
fn no_task_stays_running_for_a_process_that_is_gone() {
    let mut cluster = cluster_with_room(Some(3));
    let dir = cluster.managers[0].dir.clone();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "live",
            "--replicas",
            "4",
            "--",
            "sleep",
            "304",
        ],
    );
    eventually("three running tasks, each with a live process", || {
        running_tasks_are_live(&dir, "sleep", 3)
    });

    // A process dies behind the agent's back: its task leaves RUNNING.
    let (pids, _) = running_pids(&dir);
    let status = std::process::Command::new("kill")
        .arg("-9")
        .arg(pids[0].to_string())
        .status()
        .unwrap();
    assert!(status.success());
    eventually("the killed task no longer running", || {
        let (now, _) = running_pids(&dir);
        !now.contains(&pids[0])
    });
    eventually("every running task has a live process", || {
        running_tasks_are_live(&dir, "sleep", 3)
    });

    // A manager restart: its agent stops the processes on the way out and reports them;
    // after the restart, what is RUNNING is what runs.
    let (before_stop, _) = running_pids(&dir);
    cluster.managers[0].stop();
    assert!(
        before_stop.iter().all(|&pid| !runs(pid, "sleep")),
        "the stopping agent stopped its tasks"
    );
    cluster.managers[0].restart();
    let (after_restart, _) = running_pids(&dir);
    assert!(
        after_restart.iter().all(|&pid| runs(pid, "sleep")),
        "right after the restart, no RUNNING task without its process: {after_restart:?}"
    );
    eventually(
        "three running tasks again, each with a live process",
        || running_tasks_are_live(&dir, "sleep", 3),
    );
}

/// The node id a manager logged at start ("manager ID (raft id …) listening").
fn node_id_of(proc: &mut procs::Proc) -> String {
    let line = proc.wait_for("(raft id", TIMEOUT);
    let rest = line.split("manager ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_complete_set_in_several_parts_keeps_every_running_task() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let leader = cluster.leader_index(&client).unwrap();
    let (node, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let node_id = node_id_of(cluster.managers[node].proc());
    let dir = cluster.managers[leader].dir.clone();
    // 20 tasks of 60 KiB each on one follower: its complete set takes two messages.
    let env = format!("FILL={}", "x".repeat(60 * 1024));
    let constraint = format!("node.id=={node_id}");
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "parts",
            "--replicas",
            "20",
            "--env",
            &env,
            "--constraint",
            &constraint,
            "--",
            "sleep",
            "305",
        ],
    );
    eventually("twenty running tasks", || {
        running_tasks_are_live(&dir, "sleep", 20)
    });
    let (before, _) = running_pids(&dir);
    let sessions = |proc: &mut procs::Proc| proc.output().matches("agent: session ").count();
    let sessions_before = sessions(cluster.managers[node].proc());

    // A new leader: the follower's agent opens a session with it and gets its complete set
    // again, in parts. Before, the first part was taken as the whole set and the tasks of
    // the second were stopped.
    let listing = cli_ok(&dir, &["manager", "ls"]);
    let target = listing
        .lines()
        .find(|line| line.contains(&cluster.managers[other].addr))
        .and_then(|line| line.split_whitespace().next())
        .unwrap()
        .to_string();
    cli_ok(&dir, &["manager", "transfer", &target]);
    let node_dir = cluster.managers[node].dir.clone();
    let deadline = Instant::now() + TIMEOUT;
    while sessions(cluster.managers[node].proc()) <= sessions_before {
        assert!(Instant::now() < deadline, "no session with the new leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    eventually("the same twenty processes, running", || {
        let (now, _) = running_pids(&node_dir);
        let mut now = now;
        now.sort_unstable();
        let mut expected = before.clone();
        expected.sort_unstable();
        now == expected
    });
    std::thread::sleep(Duration::from_secs(2));
    let rows = ps_rows(&node_dir, "parts");
    assert_eq!(rows.len(), 20, "no task was stopped and replaced: {rows:?}");
    assert!(before.iter().all(|&pid| runs(pid, "sleep")));
}
