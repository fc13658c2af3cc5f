//! A real network partition: three managers in network namespaces; one follower's link is
//! taken down while the others keep writing, then brought back. Pre-vote keeps the isolated
//! follower from disturbing the leader when it returns: same leader, same term, and it
//! catches up. Needs root (network namespaces), like the rest of this test machine.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::time::{Duration, Instant};

use bytes::Bytes;
use procs::cli_ok;
use procs::cluster::{Cluster, ClusterOptions, START};
use procs::netns::Hosts;

#[test]
fn partitioned_follower_catches_up_without_disturbing_the_leader() {
    let hosts = Hosts::create(3);
    let options = ClusterOptions {
        addrs: (0..3).map(|i| format!("{}:4242", hosts.addr(i))).collect(),
        wrappers: (0..3).map(|i| hosts.wrapper(i)).collect(),
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, options);
    let client = cluster.client();
    let before = client.leader_status(&cluster).expect("a leader");
    let leader = cluster.leader_index(&client).unwrap();
    let follower = (leader + 1) % 3;
    let leader_addr = cluster.managers[leader].addr.clone();

    hosts.cut(follower);
    // Several election timeouts (1-2 s each): the isolated follower's election timer fires
    // repeatedly; with pre-vote it never raises its term.
    let cut_until = Instant::now() + Duration::from_secs(6);
    let mut written = 0;
    while Instant::now() < cut_until {
        client
            .put_at(
                &leader_addr,
                &format!("during-cut-{written}"),
                Bytes::from_static(b"v"),
            )
            .unwrap();
        written += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let follower_addr = cluster.managers[follower].addr.clone();
    assert!(
        client.status(&follower_addr).is_err(),
        "the cut follower is still reachable: the partition is not real"
    );
    hosts.heal(follower);

    let deadline = Instant::now() + START;
    let commit = client.status(&leader_addr).unwrap().commit;
    loop {
        if let Ok(status) = client.status(&follower_addr)
            && status.applied >= commit
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the healed follower never caught up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = client.status(&leader_addr).unwrap();
    assert_eq!(after.leader, before.leader, "the leader changed");
    assert_eq!(
        after.term, before.term,
        "the healed follower disturbed the term"
    );
    let got = client
        .get_at(&follower_addr, &format!("during-cut-{}", written - 1))
        .unwrap();
    assert!(got.found, "the follower missed writes made during the cut");
    for manager in &mut cluster.managers {
        manager.stop();
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.split_whitespace().nth(2).is_none_or(|s| s != "Z"))
}

/// `(task id, desired, current)` of the service's tasks, from `service ps`.
fn tasks_of(dir: &std::path::Path, service: &str) -> Vec<(String, String, String)> {
    procs::task_rows(dir, &["service", "ps", service])
        .into_iter()
        .map(|row| (row.id, row.desired, row.current))
        .collect()
}

fn worker_line(dir: &std::path::Path) -> String {
    cli_ok(dir, &["node", "ls"])
        .lines()
        .find(|line| line.contains(" worker "))
        .unwrap_or_default()
        .to_string()
}

/// A worker's link to its manager is cut for longer than its session survives (the agent
/// gives the session up after 2 heartbeat periods, the manager after 3) but shorter than
/// the grace after which the orchestrator replaces a down node's tasks: nothing restarts.
/// The task's process runs through the cut (same pid), no replacement task is created, the
/// agent opens a new session and reports its task again.
#[test]
fn a_link_cut_shorter_than_the_node_down_grace_restarts_nothing() {
    let hosts = Hosts::create(2);
    let options = ClusterOptions {
        addrs: vec![format!("{}:4242", hosts.addr(0))],
        wrappers: vec![hosts.wrapper(0)],
        ..Default::default()
    };
    let cluster = Cluster::start(1, options);
    let dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "1s"]);
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let worker_dir = cluster.tmp.path().join("worker");
    let mut args: Vec<&str> = vec!["netns", "exec"];
    let ns = hosts.ns(1);
    args.push(&ns);
    args.extend([
        procs::flotilla_bin(),
        "agent",
        "--state-dir",
        worker_dir.to_str().unwrap(),
        "--token",
        &token,
        "--manager",
        &manager_addr,
    ]);
    let mut agent = procs::Proc::start_program("worker", "ip", &args);
    agent.wait_for("running the tasks assigned", START);
    procs::eventually("the worker ready", START, || {
        worker_line(&dir).contains("ready")
    });
    let worker_id = worker_line(&dir)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let inspect = cli_ok(&dir, &["node", "inspect", &worker_id]);
    assert!(inspect.contains("\"memory_bytes\""), "{inspect}");
    assert!(inspect.contains("\"nano_cpus\""), "{inspect}");
    assert!(
        inspect.contains(&format!("\"addr\": \"{}\"", hosts.addr(1))),
        "the node reports its address: {inspect}"
    );

    let pid_file = cluster.tmp.path().join("pids");
    let script = format!("echo $$ >> {}; exec sleep 300", pid_file.display());
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "steady",
            "--constraint",
            "node.role==worker",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    procs::eventually("the task running on the worker", START, || {
        tasks_of(&dir, "steady")
            .iter()
            .any(|(_, desired, current)| desired == "running" && current == "running")
    });
    let pids = || -> Vec<u32> {
        std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    let started = pids();
    assert_eq!(started.len(), 1, "{started:?}");
    let before = tasks_of(&dir, "steady");

    let mark = agent.mark();
    hosts.cut(1);
    std::thread::sleep(Duration::from_secs(4));
    assert!(alive(started[0]), "the task died during the cut");
    hosts.heal(1);

    // The agent gave the cut session up and opened a new one.
    let (lost, _) = agent.wait_for_after(mark, "opening a new one, tasks keep running", START);
    agent.wait_for_after(lost + 1, "agent: session", START);
    procs::eventually("the worker ready again", START, || {
        worker_line(&dir).contains("ready")
    });
    // Past the orchestrator's grace for a node down since the cut began: a replacement
    // would exist by now if the node had stayed down.
    std::thread::sleep(Duration::from_secs(12));
    let after = tasks_of(&dir, "steady");
    assert_eq!(after, before, "a task was replaced or changed state");
    assert_eq!(pids(), started, "the task was started again");
    assert!(alive(started[0]), "the task's process is not the same");
    assert!(worker_line(&dir).contains("ready"));

    agent.signal(15);
    assert!(agent.wait_exit(START).success());
    assert!(!alive(started[0]));
}

/// Starts `flotilla agent` on host `host` of `hosts`, joining through `manager_addr`.
fn start_agent_on(
    hosts: &Hosts,
    host: usize,
    dir: &std::path::Path,
    token: &str,
    manager_addr: &str,
) -> procs::Proc {
    let ns = hosts.ns(host);
    let args: Vec<&str> = vec![
        "netns",
        "exec",
        &ns,
        procs::flotilla_bin(),
        "agent",
        "--state-dir",
        dir.to_str().unwrap(),
        "--token",
        token,
        "--manager",
        manager_addr,
    ];
    let mut agent = procs::Proc::start_program(&format!("worker{host}"), "ip", &args);
    agent.wait_for("running the tasks assigned", START);
    agent
}

/// A worker's link is cut for longer than the managers wait before they give its task to
/// another worker. The cut-off agent stops its task itself (self-fencing) before then, so
/// that the replacement never runs beside it: the replacement, at its own start, finds the
/// old process gone (its script records any pid it finds alive), and so does this test
/// when the replacement's pid first shows. Once the link is back, the agent reports the
/// stopped task FAILED and one process runs, the replacement. The order of events is
/// printed, not asserted as timings.
#[test]
fn a_link_cut_longer_than_the_grace_stops_the_old_task_before_its_replacement_starts() {
    let hosts = Hosts::create(3);
    let options = ClusterOptions {
        addrs: vec![format!("{}:4242", hosts.addr(0))],
        wrappers: vec![hosts.wrapper(0)],
        ..Default::default()
    };
    let cluster = Cluster::start(1, options);
    let dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    cli_ok(&dir, &["cluster", "update", "--heartbeat-period", "1s"]);
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let tmp = cluster.tmp.path().to_path_buf();
    let mut cut_agent = start_agent_on(&hosts, 1, &tmp.join("w1"), &token, &manager_addr);
    procs::eventually("the worker ready", START, || {
        worker_line(&dir).contains("ready")
    });

    let (pid_file, overlaps) = (tmp.join("pids"), tmp.join("overlaps"));
    let script = format!(
        "for p in $(cat {pids} 2>/dev/null); do \
           if [ -e /proc/$p ] && ! grep -q ') Z' /proc/$p/stat; then echo $p >> {overlaps}; fi; \
         done; echo $$ >> {pids}; exec sleep 300",
        pids = pid_file.display(),
        overlaps = overlaps.display()
    );
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "fenced",
            "--constraint",
            "node.role==worker",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let pids = || -> Vec<u32> {
        std::fs::read_to_string(&pid_file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    procs::eventually("the task running on the first worker", START, || {
        pids().len() == 1
    });
    let old = pids()[0];
    // The second worker, where the replacement goes.
    let mut other = start_agent_on(&hosts, 2, &tmp.join("w2"), &token, &manager_addr);

    let mark = cut_agent.mark();
    let cut_at = Instant::now();
    hosts.cut(1);
    let mut old_gone_at = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    let new = loop {
        assert!(
            Instant::now() < deadline,
            "no replacement within 90 s of the cut"
        );
        if old_gone_at.is_none() && !alive(old) {
            old_gone_at = Some(cut_at.elapsed());
        }
        if let Some(&new) = pids().get(1) {
            assert!(
                !alive(old),
                "the replacement {new} started while the old task {old} still ran"
            );
            break new;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let replaced_at = cut_at.elapsed();
    eprintln!(
        "link cut: old task {old} gone after {:?}, replacement {new} seen after {replaced_at:?}",
        old_gone_at.unwrap_or(replaced_at)
    );
    assert!(
        !overlaps.exists(),
        "the replacement found the old task alive at its start"
    );
    let (_, fenced) = cut_agent.wait_for_after(mark, "stopping its 1 running tasks", START);
    assert!(fenced.contains("WARN"), "{fenced}");

    hosts.heal(1);
    procs::eventually("the cut worker back", START, || {
        cli_ok(&dir, &["node", "ls"])
            .lines()
            .filter(|line| line.contains(" worker ") && line.contains("ready"))
            .count()
            == 2
    });
    // The old task is reported FAILED, or already reaped (retired on a node down past the
    // grace): either way it no longer shows running.
    procs::eventually("one task running: the replacement", START, || {
        tasks_of(&dir, "fenced")
            .iter()
            .filter(|(_, _, current)| current == "running")
            .count()
            == 1
    });
    assert!(alive(new) && !alive(old));
    assert_eq!(pids(), vec![old, new], "no third start");
    assert!(!overlaps.exists());
    cut_agent.signal(15);
    assert!(cut_agent.wait_exit(START).success());
    other.signal(15);
    assert!(other.wait_exit(START).success());
    assert!(!alive(new), "the replacement outlived its agent");
}
