//! `flotilla service logs`: the tasks' output, timestamped by their agents, gathered by the
//! leader through the dispatcher sessions and streamed from any manager.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::path::Path;
use std::time::{Duration, Instant};

use procs::cluster::{Cluster, ClusterOptions};
use procs::{cli_in, cli_ok, count, task_rows, task_states};

const TIMEOUT: Duration = Duration::from_secs(30);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// The log lines (`<task>@<node>    | <line>`) `service logs ARGS` prints in `dir`.
fn log_lines(dir: &Path, args: &[&str]) -> Vec<String> {
    let mut all = vec!["service", "logs"];
    all.extend(args);
    cli_ok(dir, &all)
        .lines()
        .filter(|l| l.contains("    | "))
        .map(str::to_string)
        .collect()
}

fn containing(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// Waits until `proc` printed `n` lines containing `needle`.
fn wait_lines(proc: &mut procs::Proc, needle: &str, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let output = proc.output();
        if output.lines().filter(|l| l.contains(needle)).count() >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {n} lines with {needle:?}:\n{output}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn service_logs_gather_every_task_from_the_leader_or_a_follower_and_follow_new_ones() {
    let cluster = Cluster::start(2, ClusterOptions::default());
    let client = cluster.client();
    let leader = cluster.leader_index(&client).expect("a leader");
    let leader_dir = cluster.managers[leader].dir.clone();
    let follower_dir = cluster.managers[1 - leader].dir.clone();
    eventually("both nodes ready", || {
        let listing = cli_ok(&leader_dir, &["node", "ls", "--format", "json"]);
        listing.matches("\"ready\"").count() == 2
    });
    let trigger = cluster.tmp.path().join("trigger");
    // stderr first, alone in its pass; the two stdout lines after it; `later` once the
    // trigger file exists.
    let script = format!(
        "echo err-$$ >&2; sleep 1; echo one-$$; echo two-$$; \
         while [ ! -f {0} ]; do sleep 0.2; done; echo later-$$; exec sleep 300",
        trigger.display()
    );
    cli_ok(
        &leader_dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "2",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually("two running tasks", || {
        count(&task_states(&leader_dir, "web"), "running", "running") == 2
    });
    eventually("every task's three lines", || {
        log_lines(&leader_dir, &["web"]).len() == 6
    });
    let nodes: std::collections::BTreeSet<String> =
        task_rows(&leader_dir, &["service", "ps", "web"])
            .into_iter()
            .map(|row| row.node)
            .collect();
    assert_eq!(nodes.len(), 2, "the two tasks run on both nodes: {nodes:?}");

    for dir in [&leader_dir, &follower_dir] {
        let lines = log_lines(dir, &["web"]);
        assert_eq!(lines.len(), 6, "{lines:?}");
        for slot in ["web.1.", "web.2."] {
            assert_eq!(containing(&lines, slot), 3, "{slot}: {lines:?}");
        }
        assert!(
            lines.iter().all(|l| l.contains('@')),
            "tagged with the node: {lines:?}"
        );
        assert_eq!(containing(&lines, "| err-"), 2, "{lines:?}");
        // --tail 1: each task's last line.
        let last = log_lines(dir, &["web", "--tail", "1"]);
        assert_eq!(last.len(), 2, "{last:?}");
        assert_eq!(containing(&last, "| two-"), 2, "{last:?}");
    }

    // --since: a duration back or an RFC 3339 time.
    assert_eq!(log_lines(&follower_dir, &["web", "--since", "1h"]).len(), 6);
    assert!(log_lines(&leader_dir, &["web", "--since", "2100-01-01T00:00:00Z"]).is_empty());
    // --timestamps puts an RFC 3339 time first.
    let stamped = log_lines(&leader_dir, &["web", "--timestamps"]);
    assert!(
        stamped
            .iter()
            .all(|l| l.starts_with("20") && l.contains("Z web.")),
        "{stamped:?}"
    );

    // JSON: one object per line.
    let json = cli_ok(&leader_dir, &["service", "logs", "web", "--format", "json"]);
    let objects: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(objects.len(), 6, "{json}");
    let task_ids: std::collections::BTreeSet<&str> = objects
        .iter()
        .map(|o| o["task_id"].as_str().unwrap())
        .collect();
    assert_eq!(task_ids.len(), 2, "{json}");
    for object in &objects {
        let line = object["line"].as_str().unwrap();
        let stream = object["stream"].as_str().unwrap();
        assert_eq!(stream == "stderr", line.starts_with("err-"), "{object}");
        assert!(!object["node"].as_str().unwrap().is_empty(), "{object}");
        assert!(
            object["task"].as_str().unwrap().starts_with("web."),
            "{object}"
        );
    }

    // A task by its id: its lines only.
    let one = task_ids.iter().next().unwrap();
    assert_eq!(log_lines(&follower_dir, &[one]).len(), 3);

    let (ok, output) = cli_in(&leader_dir, &["service", "logs", "nosuchservice"]);
    assert!(!ok && output.contains("no service or task"), "{output}");

    // --follow from the follower: later lines, then the lines of a task created after.
    let mut follow = procs::Proc::start(
        "follow",
        &[
            "service",
            "--state-dir",
            follower_dir.to_str().unwrap(),
            "logs",
            "web",
            "--follow",
        ],
    );
    wait_lines(&mut follow, "| two-", 2);
    std::fs::write(&trigger, "go").unwrap();
    wait_lines(&mut follow, "| later-", 2);
    cli_ok(&leader_dir, &["service", "scale", "web=3"]);
    wait_lines(&mut follow, "| later-", 3);
    wait_lines(&mut follow, "web.3.", 4);
    follow.kill();
}

#[test]
fn a_task_keeps_its_logs_after_it_ends_until_it_is_removed() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "once",
            "--restart-condition",
            "none",
            "--",
            "sh",
            "-c",
            "echo bye-now",
        ],
    );
    eventually("the task complete", || {
        task_rows(&dir, &["service", "ps", "once"])
            .iter()
            .any(|row| row.current == "complete")
    });
    let task = task_rows(&dir, &["service", "ps", "once"]).remove(0).id;
    eventually("the ended task's line", || {
        containing(&log_lines(&dir, &["once"]), "| bye-now") == 1
    });
    assert_eq!(containing(&log_lines(&dir, &[&task]), "| bye-now"), 1);

    cli_ok(&dir, &["service", "rm", "once"]);
    let task_dir = dir.join("tasks").join(&task);
    eventually("the task's directory, lines included, removed", || {
        !task_dir.exists()
    });
    let (ok, output) = cli_in(&dir, &["service", "logs", &task]);
    assert!(!ok && output.contains("no service or task"), "{output}");
}
