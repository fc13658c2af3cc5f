//! Health checks on real processes: the agent runs `--health-cmd` in each task, `service ps`
//! shows the health, and an unhealthy task (a failing or hanging check) is stopped, reported
//! failed with the reason and replaced by a new task for its slot.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::path::Path;
use std::time::Duration;

use procs::cluster::{Cluster, ClusterOptions};
use procs::{TaskRow, cli_in, cli_ok, task_rows};

const TIMEOUT: Duration = Duration::from_secs(60);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// Creates service `name` running `sleep 300` with the health flags `health`.
fn create_with_health(dir: &Path, name: &str, health: &[&str]) {
    let mut args = vec![
        "service",
        "create",
        "--detach",
        "--name",
        name,
        "--restart-delay",
        "100ms",
    ];
    args.extend_from_slice(health);
    args.extend(["--", "sleep", "300"]);
    cli_ok(dir, &args);
}

/// The service's tasks as `service ps --format json` prints them, with their health.
fn tasks_with_health(dir: &Path, service: &str) -> Vec<(TaskRow, serde_json::Value)> {
    let rows = task_rows(dir, &["service", "ps", service]);
    let output = cli_ok(dir, &["service", "ps", service, "--format", "json"]);
    let json = &output[output.find('[').unwrap_or(0)..];
    let tasks: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    rows.into_iter()
        .map(|row| {
            let task = tasks.iter().find(|t| t["id"] == row.id.as_str()).unwrap();
            let health = task["status"]["health"].clone();
            (row, health)
        })
        .collect()
}

/// A failed task of `service` whose error contains `reason`, and another task for the same
/// slot (only a restart creates one: the replacement, which may be failing too by now).
fn replaced_with_reason(dir: &Path, service: &str, reason: &str) -> bool {
    let rows = task_rows(dir, &["service", "ps", service]);
    let failed = rows
        .iter()
        .find(|row| row.current == "failed" && row.problem.contains(reason));
    failed.is_some_and(|failed| {
        rows.iter()
            .any(|row| row.id != failed.id && row.slot == failed.slot)
    })
}

#[test]
fn a_passing_health_check_shows_healthy_in_service_ps_and_task_inspect() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create_with_health(
        &dir,
        "fine",
        &[
            "--health-cmd",
            "echo checked; test -d .",
            "--health-interval",
            "200ms",
        ],
    );
    eventually("the task healthy", || {
        tasks_with_health(&dir, "fine")
            .iter()
            .any(|(row, health)| row.current == "running" && health["status"] == "healthy")
    });
    let table = cli_ok(&dir, &["service", "ps", "fine"]);
    assert!(table.contains("ago (healthy)"), "{table}");
    let (row, _) = tasks_with_health(&dir, "fine").remove(0);
    let inspect = cli_ok(&dir, &["task", "inspect", &row.id]);
    let task: serde_json::Value =
        serde_json::from_str(&inspect[inspect.find('{').unwrap()..]).unwrap();
    let log = task["status"]["health"]["log"].as_array().unwrap();
    assert!(!log.is_empty(), "{inspect}");
    assert_eq!(log[0]["exit_code"], 0, "{inspect}");
    assert_eq!(log[0]["output"], "checked\n", "{inspect}");
    assert_eq!(task["spec"]["health"]["interval_ms"], 200, "{inspect}");

    // Bad input is refused in the user's terms.
    let (ok, output) = cli_in(
        &dir,
        &[
            "service",
            "update",
            "fine",
            "--detach",
            "--health-interval",
            "5ms",
        ],
    );
    assert!(!ok && output.contains("health.interval_ms"), "{output}");
    let (ok, output) = cli_in(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "nocmd",
            "--health-retries",
            "2",
            "--",
            "sleep",
            "300",
        ],
    );
    assert!(!ok && output.contains("--health-cmd"), "{output}");
}

#[test]
fn a_failing_health_check_makes_the_task_fail_unhealthy_and_be_replaced() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create_with_health(
        &dir,
        "sick",
        &[
            "--health-cmd",
            "false",
            "--health-interval",
            "1s",
            "--health-retries",
            "2",
        ],
    );
    eventually("the unhealthy task failed and replaced", || {
        replaced_with_reason(&dir, "sick", "unhealthy container")
    });
    let failed = tasks_with_health(&dir, "sick")
        .into_iter()
        .find(|(row, _)| row.current == "failed")
        .unwrap();
    assert_eq!(failed.1["status"], "unhealthy", "{:?}", failed.1);
    assert_eq!(failed.1["failing_streak"], 2, "{:?}", failed.1);
    assert!(
        failed.0.problem.contains("2 times in a row"),
        "{:?}",
        failed.0
    );
}

#[test]
fn a_health_check_that_hangs_past_its_timeout_counts_as_failed() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    create_with_health(
        &dir,
        "hangs",
        &[
            "--health-cmd",
            "sleep 30",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "300ms",
            "--health-retries",
            "1",
        ],
    );
    eventually("the hanging check failed the task", || {
        replaced_with_reason(&dir, "hangs", "exceeded timeout")
    });
}
