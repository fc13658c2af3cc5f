//! The agent's task runner with real processes: how fast a node starts short tasks and sees
//! them end, and how long stopping many running tasks takes.
//!
//! Usage: `cargo bench --bench agent_tasks -- [--tasks N]` (default 200). Prints
//! `BENCH agent_tasks_completed_per_s <v> tasks/s` (N `true` tasks from one full assignment
//! to their last COMPLETE report, divided into N), `BENCH agent_task_start_us <v> us` (mean
//! time from the assignment to each RUNNING report, N `sleep` tasks assigned at once) and
//! `BENCH agent_tasks_stop_all_ms <v> ms` (an empty full assignment to the last SHUTDOWN of
//! those N tasks, which all exit on SIGTERM).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use flotilla::agent::tasks::REPORTS_QUEUE_LEN_DEFAULT;
use flotilla::agent::{RunnerConfig, TaskRunner, TaskStatusReport};
use flotilla::proto::objects::{Task, TaskSpec, TaskState, TaskStatus};

const WAIT_LIMIT: Duration = Duration::from_secs(120);

fn parse_tasks() -> usize {
    let mut tasks = 200;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--tasks" => tasks = it.next().expect("--tasks N").parse().expect("--tasks N"),
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
    }
    tasks
}

fn task(id: String, command: &str, args: &[&str]) -> Task {
    Task {
        id,
        desired_state: TaskState::Running as i32,
        status: Some(TaskStatus {
            state: TaskState::Assigned as i32,
            ..TaskStatus::default()
        }),
        spec: Some(TaskSpec {
            command: command.into(),
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            ..TaskSpec::default()
        }),
        ..Task::default()
    }
}

/// Waits for `count` reports in `state`; returns when each arrived.
fn wait_for(reports: &Receiver<TaskStatusReport>, state: TaskState, count: usize) -> Vec<Instant> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let report = reports.recv_timeout(WAIT_LIMIT).expect("a report");
        if report.status.state == state as i32 {
            seen.push(Instant::now());
        }
    }
    seen
}

fn main() {
    let tasks = parse_tasks();
    let dir = tempfile::tempdir().unwrap();
    let mut config = RunnerConfig::new(dir.path().join("tasks"));
    config.tasks_running_max = tasks;
    let (sender, reports) = crossbeam_channel::bounded(REPORTS_QUEUE_LEN_DEFAULT.max(2 * tasks));
    let runner = TaskRunner::start(config, sender).unwrap();

    let short: Vec<Task> = (0..tasks)
        .map(|i| task(format!("true-{i}"), "true", &[]))
        .collect();
    let started = Instant::now();
    runner.assign(short).unwrap();
    let done = wait_for(&reports, TaskState::Complete, tasks);
    let elapsed = done.last().unwrap().duration_since(started).as_secs_f64();
    println!(
        "BENCH agent_tasks_completed_per_s {:.0} tasks/s",
        tasks as f64 / elapsed
    );

    let long: Vec<Task> = (0..tasks)
        .map(|i| task(format!("sleep-{i}"), "sleep", &["600"]))
        .collect();
    let assigned = Instant::now();
    runner.assign(long).unwrap();
    let running = wait_for(&reports, TaskState::Running, tasks);
    let total_us: f64 = running
        .iter()
        .map(|at| at.duration_since(assigned).as_secs_f64() * 1e6)
        .sum();
    println!(
        "BENCH agent_task_start_us {:.0} us",
        total_us / tasks as f64
    );

    let stopping = Instant::now();
    runner.assign(Vec::new()).unwrap();
    let stopped = wait_for(&reports, TaskState::Shutdown, tasks);
    let stop_ms = stopped
        .last()
        .unwrap()
        .duration_since(stopping)
        .as_secs_f64()
        * 1e3;
    println!("BENCH agent_tasks_stop_all_ms {stop_ms:.0} ms");
    assert!(runner.shutdown().is_empty());
}
