//! Rolling updates and rollback with real processes: the leader's update supervisor
//! replaces a service's tasks one batch at a time, watches the new ones, and pauses or rolls
//! back an update whose tasks fail; `service rollback` returns by hand; the CLI's wait
//! reports a paused or rolled-back update as a failure.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::cell::Cell;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use procs::cli_ok;
use procs::cluster::{Cluster, ClusterOptions};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// One task of `service ps --format json`, as these tests read it.
#[derive(Debug, Clone)]
struct Row {
    slot: u64,
    desired: String,
    current: String,
    /// The task's first argument (the version marker of `sleep N`).
    arg: String,
    /// When the agent saw the current state, Unix milliseconds.
    at_ms: i64,
}

fn rows(dir: &Path, service: &str) -> Vec<Row> {
    let output = cli_ok(dir, &["service", "ps", service, "--format", "json"]);
    let json = &output[output.find('[').unwrap_or(0)..];
    let tasks: Vec<Value> = serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("service ps printed no task list ({e}):\n{output}"));
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    tasks
        .iter()
        .map(|t| Row {
            slot: t["slot"].as_u64().unwrap_or_default(),
            desired: text(&t["desired_state"]),
            current: text(&t["status"]["state"]),
            arg: text(&t["spec"]["args"][0]),
            at_ms: t["status"]["timestamp_ms"].as_i64().unwrap_or_default(),
        })
        .collect()
}

/// The slots running `arg` (wanted and observed running).
fn slots_running(rows: &[Row], arg: &str) -> Vec<u64> {
    let mut slots: Vec<u64> = rows
        .iter()
        .filter(|r| r.desired == "running" && r.current == "running" && r.arg == arg)
        .map(|r| r.slot)
        .collect();
    slots.sort_unstable();
    slots
}

/// The service's update state label and message (`""` when it has none).
fn update_status(dir: &Path, service: &str) -> (String, String) {
    let output = cli_ok(dir, &["service", "inspect", service]);
    let json: Value = serde_json::from_str(&output[output.find('{').unwrap_or(0)..])
        .unwrap_or_else(|e| panic!("inspect printed no service ({e}):\n{output}"));
    let status = &json["update_status"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&status["state"]), text(&status["message"]))
}

fn spec_arg(dir: &Path, service: &str) -> String {
    let output = cli_ok(dir, &["service", "inspect", service]);
    let json: Value = serde_json::from_str(&output[output.find('{').unwrap_or(0)..]).unwrap();
    json["spec"]["task"]["args"][0]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn create(dir: &Path, name: &str, replicas: &str, extra: &[&str], arg: &str) {
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--replicas",
        replicas,
    ];
    args.extend(extra);
    args.extend(["--", "sleep", arg]);
    cli_ok(dir, &args);
    let wanted: u64 = replicas.parse().unwrap();
    eventually("every task running", || {
        slots_running(&rows(dir, name), arg).len() as u64 == wanted
    });
}

#[test]
fn an_update_to_a_command_that_exits_at_once_rolls_back_by_itself() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create(&dir, "web", "2", &[], "300");
    // Waiting (no --detach): the command fails once the supervisor rolls the update back.
    let (success, output) = procs::cli_in(
        &dir,
        &[
            "service",
            "update",
            "web",
            "--update-failure-action",
            "rollback",
            "--",
            "false",
        ],
    );
    assert!(!success, "a rolled-back update is a failure:\n{output}");
    assert!(
        output.contains("the update was rolled back: update rolled back due to failure"),
        "{output}"
    );
    eventually("the rollback completed", || {
        update_status(&dir, "web").0 == "rollback-completed"
    });
    assert_eq!(spec_arg(&dir, "web"), "300");
    eventually("both slots running the previous spec", || {
        slots_running(&rows(&dir, "web"), "300") == [1, 2]
    });
}

#[test]
fn a_failing_update_pauses_with_a_message_and_the_next_update_resumes_it() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create(&dir, "web", "2", &["--update-monitor", "2s"], "300");
    let (success, output) = procs::cli_in(&dir, &["service", "update", "web", "--", "false"]);
    assert!(!success, "a paused update is a failure:\n{output}");
    assert!(
        output.contains("the update was paused: update paused due to failure or early termination"),
        "{output}"
    );
    let (state, message) = update_status(&dir, "web");
    assert_eq!(state, "paused", "{message}");
    assert!(message.contains("update paused due to"), "{message}");
    let table = cli_ok(&dir, &["service", "ls"]);
    assert!(table.contains("paused"), "{table}");
    // One slot was updated and fails; the other still runs the old spec, untouched.
    assert_eq!(slots_running(&rows(&dir, "web"), "300").len(), 1);
    assert_eq!(update_status(&dir, "web").0, "paused");

    cli_ok(
        &dir,
        &["service", "update", "web", "--detach", "--", "sleep", "301"],
    );
    eventually("the resumed update completed", || {
        update_status(&dir, "web").0 == "completed"
    });
    assert_eq!(slots_running(&rows(&dir, "web"), "301"), [1, 2]);
}

#[test]
fn parallelism_one_updates_one_slot_at_a_time_and_start_first_starts_before_stopping() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create(&dir, "web", "3", &["--update-monitor", "1s"], "300");
    cli_ok(
        &dir,
        &["service", "update", "web", "--detach", "--", "sleep", "301"],
    );
    let mixed_seen = Cell::new(false);
    eventually("every slot running the new spec", || {
        let rows = rows(&dir, "web");
        let (old, new) = (slots_running(&rows, "300"), slots_running(&rows, "301"));
        let updating = 3 - old.len() - new.len();
        mixed_seen.set(mixed_seen.get() || (!old.is_empty() && !new.is_empty()));
        assert!(
            updating <= 1,
            "parallelism 1: {updating} slots without a running task at once: {rows:?}"
        );
        new.len() == 3
    });
    assert!(mixed_seen.get(), "the slots were updated one after another");
    eventually("the update completed", || {
        update_status(&dir, "web").0 == "completed"
    });

    cli_ok(
        &dir,
        &[
            "service",
            "update",
            "web",
            "--detach",
            "--update-order",
            "start-first",
            "--",
            "sleep",
            "302",
        ],
    );
    eventually("every slot running the start-first spec", || {
        let rows = rows(&dir, "web");
        slots_running(&rows, "302").len() == 3
            && rows
                .iter()
                .filter(|r| r.arg == "301")
                .all(|r| r.current == "shutdown")
    });
    let rows = rows(&dir, "web");
    let by_slot = |arg: &str, state: &str| -> BTreeMap<u64, i64> {
        rows.iter()
            .filter(|r| r.arg == arg && r.current == state)
            .map(|r| (r.slot, r.at_ms))
            .collect()
    };
    let (new_running, old_stopped) = (by_slot("302", "running"), by_slot("301", "shutdown"));
    for (slot, running_ms) in &new_running {
        let stopped_ms = old_stopped[slot];
        assert!(
            *running_ms <= stopped_ms,
            "slot {slot}: the new task ran at {running_ms}, after the old one stopped at \
             {stopped_ms}: {rows:?}"
        );
    }
}

#[test]
fn service_rollback_returns_to_the_previous_spec_by_hand() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create(&dir, "web", "2", &["--update-monitor", "1s"], "300");
    let (success, output) = procs::cli_in(&dir, &["service", "rollback", "web"]);
    assert!(!success, "nothing to roll back to:\n{output}");
    assert!(output.contains("no previous spec"), "{output}");

    cli_ok(&dir, &["service", "update", "web", "--", "sleep", "301"]);
    assert_eq!(slots_running(&rows(&dir, "web"), "301"), [1, 2]);
    let output = cli_ok(&dir, &["service", "rollback", "web"]);
    assert!(
        output.contains("rolled back to its previous spec"),
        "{output}"
    );
    assert_eq!(spec_arg(&dir, "web"), "300");
    assert_eq!(slots_running(&rows(&dir, "web"), "300"), [1, 2]);
    eventually("the rollback completed", || {
        update_status(&dir, "web")
            == (
                "rollback-completed".to_string(),
                "rollback completed".to_string(),
            )
    });
}
