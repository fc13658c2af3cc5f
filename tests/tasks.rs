//! Services run as processes: the leader's orchestrator and scheduler create and assign
//! tasks, the dispatcher streams them to each manager's in-process agent, which runs them
//! and reports their status back through the dispatcher.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::path::Path;
use std::time::{Duration, Instant};

use procs::cluster::{Cluster, ClusterOptions};
use procs::{cli_ok, count, task_states};

const TIMEOUT: Duration = Duration::from_secs(30);

fn eventually(what: &str, check: impl Fn() -> bool) {
    procs::eventually(what, TIMEOUT, check);
}

/// Creates service `name` of one task running `script` (which appends its pid to
/// `pid_file`) on a worker; returns the pid once it runs.
fn one_task_on_a_worker(dir: &Path, name: &str, script: &str, pid_file: &Path) -> Vec<u32> {
    cli_ok(
        dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            name,
            "--constraint",
            "node.role==worker",
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    eventually("the task running on a worker", || {
        count(&task_states(dir, name), "running", "running") == 1
    });
    let started = pids(pid_file);
    assert_eq!(started.len(), 1, "{started:?}");
    started
}

fn alive(pid: u32) -> bool {
    // Zombies count as gone: the agent reaps its children.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
}

fn pids(file: &Path) -> Vec<u32> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Starts a worker agent in `worker_dir` that joins through `manager_addr` with the worker
/// token of the manager whose state is in `manager_dir`, and waits until it runs tasks.
fn join_worker(manager_dir: &Path, worker_dir: &str, manager_addr: &str) -> procs::Proc {
    let token = cli_ok(manager_dir, &["join-token", "worker"])
        .trim()
        .to_string();
    let mut agent = procs::Proc::start(
        "worker",
        &[
            "agent",
            "--state-dir",
            worker_dir,
            "--token",
            &token,
            "--manager",
            manager_addr,
        ],
    );
    agent.wait_for("running the tasks assigned", TIMEOUT);
    agent
}

#[test]
fn a_replicated_service_runs_as_processes_and_scaling_down_stops_them() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let pid_file = cluster.tmp.path().join("pids");
    let script = format!("echo $$ >> {}; exec sleep 300", pid_file.display());
    cli_ok(
        &dir,
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
        count(&task_states(&dir, "web"), "running", "running") == 2
    });
    let started = pids(&pid_file);
    assert_eq!(started.len(), 2, "{started:?}");
    assert!(started.iter().all(|&pid| alive(pid)), "{started:?}");

    cli_ok(&dir, &["service", "scale", "web=1"]);
    eventually("one process stopped, its task shut down", || {
        let states = task_states(&dir, "web");
        count(&states, "running", "running") == 1
            && count(&states, "shutdown", "shutdown") == 1
            && started.iter().filter(|&&pid| alive(pid)).count() == 1
    });

    cli_ok(&dir, &["service", "rm", "web"]);
    eventually("every process stopped", || {
        started.iter().all(|&pid| !alive(pid))
    });
}

#[test]
fn a_failing_task_reports_its_exit_code_and_is_restarted_up_to_its_limit() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "bad",
            "--restart-condition",
            "on-failure",
            "--restart-delay",
            "100ms",
            "--restart-max-attempts",
            "2",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    );
    // The first run and its two restarts fail; then the slot stays failed.
    eventually("three failed runs", || {
        task_states(&dir, "bad")
            .iter()
            .filter(|(_, current)| current == "failed")
            .count()
            == 3
    });
    let tasks = cli_ok(&dir, &["task", "ls", "--format", "json"]);
    assert!(
        tasks.contains("\"exit_code\": 3") || tasks.contains("\"exit_code\":3"),
        "{tasks}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        task_states(&dir, "bad").len(),
        3,
        "no restart past --restart-max-attempts"
    );
}

#[test]
fn the_tasks_of_a_stopped_leader_are_rescheduled_on_the_remaining_managers() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "2s"]);
    eventually("three ready nodes", || {
        cli_ok(&dir, &["node", "ls"]).matches("ready").count() == 3
    });
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "spread",
            "--replicas",
            "3",
            "--",
            "sleep",
            "300",
        ],
    );
    eventually("three running tasks", || {
        count(&task_states(&dir, "spread"), "running", "running") == 3
    });
    // `(slot, node, desired, current)` of every task, from one `service ps` snapshot.
    let rows = |dir: &Path| -> Vec<(String, String, String, String)> {
        procs::task_rows(dir, &["service", "ps", "spread"])
            .into_iter()
            .map(|row| (row.slot.to_string(), row.node, row.desired, row.current))
            .collect()
    };
    let nodes_of = |rows: &[(String, String, String, String)]| {
        rows.iter()
            .map(|row| row.1.clone())
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(nodes_of(&rows(&dir)).len(), 3, "one task per manager");
    let client = cluster.client();
    let leader = cluster.leader_index(&client).unwrap();
    client.transport.shutdown();
    let stopped_node = cli_ok(&cluster.managers[leader].dir, &["node", "ls"])
        .lines()
        .find(|line| line.trim_end().ends_with("leader"))
        .and_then(|line| line.split_whitespace().next())
        .map(str::to_string)
        .unwrap();
    cluster.managers[leader].stop();
    let survivor = cluster.managers[(leader + 1) % 3].dir.clone();
    // The new leader never hears from the old leader's node: down after three heartbeat
    // periods, and after the grace its task is replaced on a live node.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (ok, nodes) = procs::cli_in(&survivor, &["node", "ls"]);
        let states = if ok { rows(&survivor) } else { Vec::new() };
        let wanted: Vec<_> = states.iter().filter(|r| r.2 == "running").collect();
        let down = nodes
            .lines()
            .filter(|line| line.contains(" down "))
            .filter_map(|line| line.split_whitespace().next().map(str::to_string))
            .collect::<Vec<_>>();
        if down == [stopped_node.clone()]
            && wanted.len() == 3
            && wanted
                .iter()
                .all(|r| r.3 == "running" && r.1 != stopped_node)
        {
            // The stopped node's task is retired (nobody is left to report it stopped), and
            // each slot has exactly one task meant to run: nothing was duplicated.
            assert!(
                states
                    .iter()
                    .any(|r| r.1 == stopped_node && r.2 == "shutdown"),
                "{states:?}"
            );
            let mut slots: Vec<&str> = wanted.iter().map(|r| r.0.as_str()).collect();
            slots.sort_unstable();
            assert_eq!(slots, ["1", "2", "3"], "{states:?}");
            assert_eq!(
                nodes_of(&states).len(),
                3,
                "two live nodes and the stopped one"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never rescheduled; nodes:\n{nodes}\ntasks: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_worker_agent_joins_runs_its_tasks_and_stops_them_when_it_stops() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "1s"]);
    let worker_dir = cluster.tmp.path().join("worker");
    let worker_dir_arg = worker_dir.to_str().unwrap();

    // A manager token makes no worker.
    let manager_token = cli_ok(&dir, &["join-token", "manager"]).trim().to_string();
    let (status, output) = procs::run_to_end(
        &[
            "agent",
            "--state-dir",
            worker_dir_arg,
            "--token",
            &manager_token,
            "--manager",
            &manager_addr,
        ],
        TIMEOUT,
    );
    assert!(!status.success());
    assert!(output.contains("worker token"), "{output}");

    let mut agent = join_worker(&dir, worker_dir_arg, &manager_addr);
    let worker_line = || {
        cli_ok(&dir, &["node", "ls"])
            .lines()
            .find(|line| line.contains(" worker "))
            .unwrap_or_default()
            .to_string()
    };
    eventually("the worker, ready", || worker_line().contains("ready"));
    let worker_id = worker_line().split_whitespace().next().unwrap().to_string();

    let pid_file = cluster.tmp.path().join("worker-pids");
    let script = format!("echo $$ >> {}; exec sleep 300", pid_file.display());
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "onworker",
            "--replicas",
            "2",
            "--constraint",
            "node.role==worker",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually("two running tasks on the worker", || {
        count(&task_states(&dir, "onworker"), "running", "running") == 2
    });
    assert!(
        procs::task_rows(&dir, &["service", "ps", "onworker"])
            .iter()
            .filter(|row| row.node == worker_id)
            .count()
            == 2,
        "both tasks on the worker"
    );
    let started = pids(&pid_file);
    assert_eq!(started.len(), 2, "{started:?}");
    assert!(started.iter().all(|&pid| alive(pid)));

    // SIGTERM: the agent stops its tasks before it exits; the node goes down.
    agent.signal(15);
    assert!(agent.wait_exit(TIMEOUT).success());
    assert!(started.iter().all(|&pid| !alive(pid)), "{started:?}");
    // Their final status reached the managers before the agent exited: none shows running.
    let states = task_states(&dir, "onworker");
    assert_eq!(count(&states, "running", "shutdown"), 2, "{states:?}");
    assert!(
        states.iter().all(|(_, current)| current != "running"),
        "{states:?}"
    );
    eventually("the worker, down", || worker_line().contains("down"));

    // A later run needs no token: same node, ready again.
    let mut again = procs::Proc::start("worker-again", &["agent", "--state-dir", worker_dir_arg]);
    again.wait_for("running the tasks assigned", TIMEOUT);
    eventually("the same worker, ready again", || {
        let line = worker_line();
        line.contains(&worker_id) && line.contains("ready")
    });
    again.signal(15);
    assert!(again.wait_exit(TIMEOUT).success());
}

/// Kills the listed processes when dropped (tasks an agent killed by the test left behind,
/// should the test fail before their agent stops them).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .output();
        }
    }
}

/// `(task id, current state)` of the service's tasks, from `service ps`.
fn task_ids(dir: &Path, service: &str) -> Vec<(String, String)> {
    procs::task_rows(dir, &["service", "ps", service])
        .into_iter()
        .map(|row| (row.id, row.current))
        .collect()
}

#[test]
fn a_restarted_worker_agent_adopts_its_running_tasks_instead_of_failing_them() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "2s"]);
    let worker_dir = cluster.tmp.path().join("worker");
    let worker_dir_arg = worker_dir.to_str().unwrap();
    let mut agent = join_worker(&dir, worker_dir_arg, &manager_addr);
    let pid_file = cluster.tmp.path().join("kept-pids");
    let script = format!("echo $$ >> {}; exec sleep 300", pid_file.display());
    let started = one_task_on_a_worker(&dir, "kept", &script, &pid_file);
    let _cleanup = KillOnDrop(started.clone());
    let tasks_before = task_ids(&dir, "kept");

    // The agent dies without stopping anything; its task runs on, nobody's child now.
    agent.kill();
    assert!(alive(started[0]));
    let mut again = procs::Proc::start("worker-again", &["agent", "--state-dir", worker_dir_arg]);
    again.wait_for("adopted 1 task processes", TIMEOUT);
    again.wait_for("running the tasks assigned", TIMEOUT);
    eventually("the worker ready again", || {
        cli_ok(&dir, &["node", "ls"])
            .lines()
            .any(|line| line.contains(" worker ") && line.contains("ready"))
    });
    // Several heartbeat periods: time for a wrong FAILED report or a replacement to show.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        task_ids(&dir, "kept"),
        tasks_before,
        "the task was replaced"
    );
    assert!(alive(started[0]), "the adopted process was killed");
    assert_eq!(pids(&pid_file), started, "the task was started again");

    // The adopted process is stopped like any other when its agent stops.
    again.signal(15);
    assert!(again.wait_exit(TIMEOUT).success());
    eventually("the adopted process stopped", || !alive(started[0]));
    let states = task_states(&dir, "kept");
    assert_eq!(count(&states, "running", "shutdown"), 1, "{states:?}");
}

/// A task script that records its pid in `pids` and, first, every pid already recorded
/// there whose process still lives in `overlaps`: a replacement started beside the task it
/// replaces leaves a line there (checked by the replacement itself, at its own start).
fn overlap_checking_script(pids: &Path, overlaps: &Path) -> String {
    format!(
        "for p in $(cat {pids} 2>/dev/null); do \
           if [ -e /proc/$p ] && ! grep -q ') Z' /proc/$p/stat; then echo $p >> {overlaps}; fi; \
         done; echo $$ >> {pids}; exec sleep 300",
        pids = pids.display(),
        overlaps = overlaps.display()
    )
}

/// Starts `flotilla agent` in `worker_dir` given only `manager_addr` (joining with `token`
/// on its first run); returns it and its node id once it runs tasks.
fn start_worker(
    name: &str,
    worker_dir: &Path,
    token: &str,
    manager_addr: &str,
) -> (procs::Proc, String) {
    let mut agent = procs::Proc::start(
        name,
        &[
            "agent",
            "--state-dir",
            worker_dir.to_str().unwrap(),
            "--token",
            token,
            "--manager",
            manager_addr,
        ],
    );
    let line = agent.wait_for("running the tasks assigned", TIMEOUT);
    let node_id = line
        .split_whitespace()
        .skip_while(|word| *word != "agent")
        .nth(1)
        .unwrap()
        .to_string();
    (agent, node_id)
}

fn node_ready(dir: &Path, node_id: &str) -> bool {
    cli_ok(dir, &["node", "ls"])
        .lines()
        .any(|line| line.starts_with(node_id) && line.contains(" ready "))
}

/// The scenario, as a new user met it: a worker started with `--manager` naming one
/// manager, which is then killed and restarted as a follower. The worker learned the other
/// managers from its session and reaches the new leader; restarted (SIGKILL, so its task
/// runs on) with only that manager named again, it follows the leader the follower names,
/// says so at the default log level, and adopts its task. Past the time the managers would
/// have given the task to the second worker had the node stayed down, nothing was replaced
/// and the task never ran twice: one process, on one node.
#[test]
fn a_worker_naming_one_manager_follows_the_leader_after_it_restarts_as_a_follower() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let a = cluster.leader_index(&client).unwrap();
    let b = (a + 1) % 3;
    let dir_b = cluster.managers[b].dir.clone();
    let addr_a = cluster.managers[a].addr.clone();
    cli_ok(&dir_b, &["cluster", "update", "--heartbeat-period", "1s"]);
    let token = cli_ok(&dir_b, &["join-token", "worker"]).trim().to_string();
    let tmp = cluster.tmp.path().to_path_buf();

    let w1_dir = tmp.join("w1");
    let (mut w1, w1_id) = start_worker("w1", &w1_dir, &token, &addr_a);
    // Its session tells it the three managers (kept in its state directory).
    eventually("the worker knows the three managers", || {
        std::fs::read_to_string(w1_dir.join("managers"))
            .unwrap_or_default()
            .lines()
            .count()
            == 3
    });
    let (pid_file, overlaps) = (tmp.join("once-pids"), tmp.join("once-overlaps"));
    let script = overlap_checking_script(&pid_file, &overlaps);
    let started = one_task_on_a_worker(&dir_b, "once", &script, &pid_file);
    let _cleanup = KillOnDrop(started.clone());
    let tasks_before = task_ids(&dir_b, "once");
    // A second worker, where a replacement would go.
    let (_w2, _) = start_worker("w2", &tmp.join("w2"), &token, &cluster.managers[b].addr);

    // A dies: the worker reaches the new leader through the managers it learned.
    let mark = w1.mark();
    cluster.managers[a].kill();
    w1.wait_for_after(mark, "agent: session", TIMEOUT);
    cluster.managers[a].restart();
    eventually("A back, as a follower", || {
        cluster
            .leader_index(&client)
            .is_some_and(|leader| leader != a)
    });

    // Restarted naming only A (the remembered list is replaced): A names the leader.
    w1.kill();
    assert!(alive(started[0]), "the task died with its agent");
    let mut w1 = procs::Proc::start(
        "w1-again",
        &[
            "agent",
            "--state-dir",
            w1_dir.to_str().unwrap(),
            "--manager",
            &addr_a,
        ],
    );
    w1.wait_for("adopted 1 task processes", TIMEOUT);
    let (_, said) = w1.wait_for_after(0, "trying the leader it names", TIMEOUT);
    assert!(said.contains(&addr_a) && said.contains("WARN"), "{said}");
    w1.wait_for("agent: session", TIMEOUT);
    eventually("the first worker ready", || node_ready(&dir_b, &w1_id));
    eventually("the managers it learned, remembered", || {
        std::fs::read_to_string(w1_dir.join("managers"))
            .unwrap()
            .lines()
            .count()
            == 3
    });

    // Past the node-down grace (3.3 s) and the orchestrator's 10 s: a replacement would
    // exist by now had the node been down since A died.
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(
        task_ids(&dir_b, "once"),
        tasks_before,
        "the task was replaced"
    );
    assert_eq!(pids(&pid_file), started, "the task was started again");
    assert!(
        alive(started[0]),
        "the task's process is not the one that started"
    );
    assert!(!overlaps.exists(), "a task ran twice");
    assert!(node_ready(&dir_b, &w1_id));
}

/// `service create` and `service update` without `--detach` wait, showing progress, until
/// every task runs the service's spec and kept running for the monitor period; a service
/// whose tasks keep failing ends the wait with the reason and a failed exit.
#[test]
fn create_and_update_wait_until_the_service_converges_or_fails() {
    let cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();

    let (ok, output) = procs::cli_in(
        &dir,
        &[
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "2",
            "--",
            "sleep",
            "301",
        ],
    );
    assert!(ok, "{output}");
    assert!(output.contains("web.1: running"), "{output}");
    assert!(output.contains("web.2: running"), "{output}");
    assert!(
        output.contains("web: converged, 2 task(s) running"),
        "{output}"
    );
    // Converged means running now, not just once.
    assert_eq!(count(&task_states(&dir, "web"), "running", "running"), 2);

    let (ok, output) = procs::cli_in(&dir, &["service", "update", "web", "--", "sleep", "302"]);
    assert!(ok, "{output}");
    assert!(
        output.contains("web: converged, 2 task(s) running"),
        "{output}"
    );
    let running = procs::task_rows(&dir, &["service", "ps", "web"])
        .into_iter()
        .filter(|row| row.desired == "running" && row.current == "running")
        .count();
    assert_eq!(running, 2);
    let json = cli_ok(
        &dir,
        &["task", "ls", "--service", "web", "--format", "json"],
    );
    // Every task still wanted runs the new command: the wait ended after the update did.
    let tasks: Vec<serde_json::Value> =
        serde_json::from_str(&json[json.find('[').unwrap()..]).unwrap();
    for task in tasks.iter().filter(|t| t["desired_state"] == "running") {
        assert_eq!(task["spec"]["args"][0], "302", "{task:#}");
    }

    let (ok, output) = procs::cli_in(
        &dir,
        &[
            "service",
            "create",
            "--name",
            "broken",
            "--restart-delay",
            "100ms",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    );
    assert!(
        !ok,
        "a service that never runs must fail the command:\n{output}"
    );
    assert!(
        output.contains("broken did not converge: broken.1 failed 3 times")
            && output.contains("exited with status 3"),
        "{output}"
    );
    // The service stays, as written: the user fixes or removes it.
    cli_ok(&dir, &["service", "inspect", "broken"]);

    // --detach returns at once, before anything runs.
    let (ok, output) = procs::cli_in(
        &dir,
        &[
            "service", "create", "--detach", "--name", "quick", "--", "sleep", "303",
        ],
    );
    assert!(ok, "{output}");
    assert!(!output.contains("converged"), "{output}");
}

#[test]
fn a_restarted_agent_fences_its_adopted_tasks_from_its_last_contact_not_from_its_start() {
    let mut cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    // Reassigned after 3 periods + the orchestrator's 10 s: 13 s; the agent fences 2 s
    // before, 11 s after its last acknowledged heartbeat.
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "1s"]);
    let worker_dir = cluster.tmp.path().join("worker");
    let worker_dir_arg = worker_dir.to_str().unwrap();
    let mut agent = join_worker(&dir, worker_dir_arg, &manager_addr);
    let pid_file = cluster.tmp.path().join("fenced-pids");
    let script = format!("echo $$ >> {}; exec sleep 300", pid_file.display());
    let started = one_task_on_a_worker(&dir, "fenced", &script, &pid_file);
    let _cleanup = KillOnDrop(started.clone());
    // A heartbeat answer with the 1 s period's allowance has been recorded by now.
    std::thread::sleep(Duration::from_secs(3));

    // The manager stops answering, and the agent dies with its task left running.
    cluster.managers[0].proc().signal(19);
    agent.kill();
    assert!(alive(started[0]));
    // Past the agent's allowance, counted from its last contact (≤ now).
    std::thread::sleep(Duration::from_secs(12));

    let mut again = procs::Proc::start("worker-again", &["agent", "--state-dir", worker_dir_arg]);
    let line = again.wait_for("the managers last acknowledged this node", TIMEOUT);
    assert!(line.contains("stop in 0 s"), "{line}");
    // Counted from the start instead, the deadline would be 11 s away ("stop in 11 s"); the
    // managers may give the task to another node 13 s after the last contact.
    eventually("the adopted process fenced", || !alive(started[0]));
    cluster.managers[0].proc().signal(18);
    eventually("the fenced task reported failed", || {
        procs::task_rows(&dir, &["service", "ps", "fenced"])
            .iter()
            .any(|row| row.problem.contains("no heartbeat acknowledged"))
    });
    again.signal(15);
    assert!(again.wait_exit(TIMEOUT).success());
}
