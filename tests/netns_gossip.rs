//! Gossip (networkdb) and service discovery across real `flotilla` processes:
//! - three managers on one host, each with its own gossip address (one by default, two by
//!   `--gossip-listen`) and DNS responder: each one's gossip runs and its DNS answers for
//!   the tasks of every node;
//! - five nodes (one manager, four agents), each in a network namespace of its own on a
//!   bridge of the test's own: one node partitioned while both sides change, then healed;
//!   one agent killed (its endpoints leave every other node's answers) and restarted (they
//!   come back). Every node is asked with a real DNS client (`dig`, Debian's
//!   `bind9-dnsutils`) on its own loopback.
//!
//! The namespace test needs root and `ip netns`; without them it says so and passes. It
//! touches only the namespaces, links and addresses it creates ([`procs::netns::Hosts`]:
//! names and a `10.231.x.0/24` range of its own, removed on drop, even after a panic).
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use procs::cli_ok;
use procs::cluster::{Cluster, ClusterOptions, START};
use procs::netns::Hosts;

/// Bound on each wait for the nodes' answers to converge.
const CONVERGE: Duration = Duration::from_secs(60);
/// Where each namespaced node's DNS responder answers (the default, on its own loopback).
const DNS_PORT: &str = "5354";
/// The cluster's heartbeat period in the namespace test: long enough that a partitioned
/// agent keeps its task (it fences itself 3 periods + 10 s - 2 s after its last answered
/// heartbeat, 38 s here) while gossip declares it failed (seconds).
const HEARTBEAT_PERIOD: &str = "10s";
/// The partition ends by then, well before the cut agent would fence its task.
const CUT_MAX: Duration = Duration::from_secs(22);

/// A UDP address on loopback that was free a moment ago.
fn free_udp_addr() -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}

/// `dig @ADDR -p PORT NAME TYPE`, run through `wrapper` (empty: on this host): the status
/// word and the answer section's records, one line each, whitespace collapsed.
fn dig(
    wrapper: &[String],
    addr: &str,
    port: &str,
    name: &str,
    rtype: &str,
) -> (String, Vec<String>) {
    let mut argv: Vec<String> = wrapper.to_vec();
    argv.extend(
        [
            "dig",
            &format!("@{addr}"),
            "-p",
            port,
            "+tries=1",
            "+time=2",
            "+nocookie",
            name,
            rtype,
        ]
        .map(String::from),
    );
    let output = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .expect("dig (package bind9-dnsutils) must be installed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let Some(status) = procs::dig_status(&text) else {
        // No answer in time (a loaded machine): not a status.
        return ("NO-ANSWER".into(), Vec::new());
    };
    let answers = procs::dig_answers(&text);
    (status, answers)
}

/// The task ids an SRV answer names (its targets are `<task id>.<service>.<network>.`).
fn srv_tasks(answers: &[String]) -> BTreeSet<String> {
    answers
        .iter()
        .filter(|a| a.contains(" SRV "))
        .filter_map(|a| a.split_whitespace().last())
        .filter_map(|target| target.split('.').next())
        .map(String::from)
        .collect()
}

/// The addresses an A answer names.
fn a_addrs(answers: &[String]) -> BTreeSet<String> {
    answers
        .iter()
        .filter(|a| a.contains(" A "))
        .filter_map(|a| a.split_whitespace().last())
        .map(String::from)
        .collect()
}

/// The ids of `service`'s tasks that run (desired and current state running).
fn running_tasks(dir: &Path, service: &str) -> BTreeSet<String> {
    procs::task_rows(dir, &["service", "ps", service])
        .into_iter()
        .filter(|row| row.desired == "running" && row.current == "running")
        .map(|row| row.id)
        .collect()
}

/// Three managers on one host: the first gossips on its default port (listen + 1), the
/// others on ports given with `--gossip-listen`; each has its own DNS responder. Each
/// manager says where its gossip runs, and each one's DNS answers for the tasks of all
/// three (one task per node, each published by its own node and carried by gossip).
#[test]
fn three_managers_on_one_host_each_gossip_and_answer_for_every_node() {
    let dns: Vec<String> = (0..3).map(|_| free_udp_addr()).collect();
    let gossip: Vec<Option<String>> =
        vec![None, Some(procs::free_addr()), Some(procs::free_addr())];
    let extra_args = (0..3)
        .map(|i| {
            let mut args = vec!["--dns-listen".to_string(), dns[i].clone()];
            if let Some(addr) = &gossip[i] {
                args.extend(["--gossip-listen".to_string(), addr.clone()]);
            }
            args
        })
        .collect();
    let options = ClusterOptions {
        extra_args,
        ..Default::default()
    };
    let mut cluster = Cluster::start(3, options);
    for (i, manager) in cluster.managers.iter_mut().enumerate() {
        let expected = gossip[i].clone().unwrap_or_else(|| {
            let (host, port) = manager.addr.rsplit_once(':').unwrap();
            format!("{host}:{}", port.parse::<u16>().unwrap() + 1)
        });
        let addr = manager.addr.clone();
        manager
            .proc()
            .wait_for(&format!("networkdb: gossip on {expected} "), START);
        eprintln!("manager at {addr}: gossip on {expected}");
    }
    let dir = cluster.managers[0].dir.clone();
    procs::eventually("three nodes ready", START, || {
        cli_ok(&dir, &["node", "ls"]).matches(" ready ").count() == 3
    });
    cli_ok(&dir, &["network", "create", "front"]);
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "3",
            "--network",
            "front",
            "--port",
            "http:8080/tcp",
            "sleep",
            "300",
        ],
    );
    procs::eventually("three tasks running", START, || {
        running_tasks(&dir, "web").len() == 3
    });
    let running = running_tasks(&dir, "web");
    procs::eventually("every manager's DNS names every task", CONVERGE, || {
        dns.iter().all(|addr| {
            let (host, port) = addr.rsplit_once(':').unwrap();
            srv_tasks(&dig(&[], host, port, "web.front", "SRV").1) == running
        })
    });
    for manager in &mut cluster.managers {
        manager.stop();
    }
}

/// Whether this machine lets the test make network namespaces: root and `ip netns`.
fn netns_unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(error) => Some(format!("no `ip` command: {error}")),
    }
}

/// Starts `flotilla agent` on host `host` (its own namespace), listening on the host's
/// address (so its gossip binds port 4243 there) with its DNS on the namespace's loopback.
fn start_agent(hosts: &Hosts, host: usize, dir: &Path, join: Option<(&str, &str)>) -> procs::Proc {
    let ns = hosts.ns(host);
    let listen = format!("{}:4242", hosts.addr(host));
    let mut args: Vec<&str> = vec![
        "netns",
        "exec",
        &ns,
        procs::flotilla_bin(),
        "agent",
        "--state-dir",
        dir.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    if let Some((token, manager)) = join {
        args.extend(["--token", token, "--manager", manager]);
    }
    let mut agent = procs::Proc::start_program(&format!("agent{host}"), "ip", &args);
    agent.wait_for("running the tasks assigned", START);
    agent
}

/// The five namespaced nodes, as the test asks them.
struct Nodes {
    hosts: Hosts,
    count: usize,
}

impl Nodes {
    /// Host `i`'s answer for `name`/`rtype` from its own responder.
    fn dig(&self, i: usize, name: &str, rtype: &str) -> (String, Vec<String>) {
        dig(&self.hosts.wrapper(i), "127.0.0.1", DNS_PORT, name, rtype)
    }

    /// The task ids host `i` answers for `service` on `mesh`.
    fn tasks_seen(&self, i: usize, service: &str) -> BTreeSet<String> {
        srv_tasks(&self.dig(i, &format!("{service}.mesh"), "SRV").1)
    }

    /// The node addresses host `i` answers for `service` on `mesh`.
    fn addrs_seen(&self, i: usize, service: &str) -> BTreeSet<String> {
        a_addrs(&self.dig(i, &format!("{service}.mesh"), "A").1)
    }

    /// Waits until every host in `which` answers `service` with exactly `expected()`'s task
    /// ids (read again at each try: tasks may still be starting).
    fn converge(
        &self,
        what: &str,
        which: &[usize],
        service: &str,
        expected: impl Fn() -> BTreeSet<String>,
    ) -> BTreeSet<String> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let want = expected();
            let seen: Vec<BTreeSet<String>> =
                which.iter().map(|&i| self.tasks_seen(i, service)).collect();
            if seen.iter().all(|s| *s == want) {
                return want;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: the nodes' answers never converged to {want:?}: {seen:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn all(&self) -> Vec<usize> {
        (0..self.count).collect()
    }
}

/// The node id of the worker whose address is `addr`, from `node ls` and `node inspect`.
fn node_id_at(dir: &Path, addr: &str) -> String {
    let listing = cli_ok(dir, &["node", "ls"]);
    listing
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().next())
        .map(|id| id.trim_end_matches('*').to_string())
        .find(|id| cli_ok(dir, &["node", "inspect", id]).contains(&format!("\"addr\": \"{addr}\"")))
        .unwrap_or_else(|| panic!("no node at {addr}:\n{listing}"))
}

/// Five nodes in network namespaces (a manager and four agents) run a service `web` on
/// the overlay network `mesh`, and a service `solo` pinned to node 4. Every node answers
/// DNS for every task from its own gossiped table.
/// - Partition: node 4's link goes down. The majority side scales `web` from 5 to 8 and
///   declares node 4 failed (its endpoint hidden there); on node 4, `solo`'s task ends (its
///   endpoint is deleted there, unseen by the others). Node 4's own `web` task keeps
///   running. The link comes back: every node's answers converge to the same set, the
///   running tasks of `web` (node 4's back), and `solo` is gone everywhere.
/// - Agent 3 is killed (SIGKILL): its address leaves every other node's answers. It is
///   restarted on the same state: it rejoins and its address comes back everywhere.
#[test]
fn five_namespaced_nodes_converge_after_a_partition_and_forget_then_relearn_a_killed_agent() {
    if let Some(why) = netns_unavailable() {
        eprintln!("SKIPPED: this test needs network namespaces (root and `ip netns`): {why}");
        return;
    }
    let nodes = Nodes {
        hosts: Hosts::create(5),
        count: 5,
    };
    let hosts = &nodes.hosts;
    let options = ClusterOptions {
        addrs: vec![format!("{}:4242", hosts.addr(0))],
        wrappers: vec![hosts.wrapper(0)],
        ..Default::default()
    };
    let mut cluster = Cluster::start(1, options);
    let dir = cluster.managers[0].dir.clone();
    let manager_addr = cluster.managers[0].addr.clone();
    cli_ok(
        &dir,
        &["cluster", "update", "--heartbeat-period", HEARTBEAT_PERIOD],
    );
    let token = cli_ok(&dir, &["join-token", "worker"]).trim().to_string();
    let tmp = cluster.tmp.path().to_path_buf();
    let mut agents: Vec<Option<procs::Proc>> = vec![None];
    for host in 1..5 {
        let agent_dir = tmp.join(format!("agent{host}"));
        agents.push(Some(start_agent(
            hosts,
            host,
            &agent_dir,
            Some((&token, &manager_addr)),
        )));
    }
    procs::eventually("five nodes ready", START, || {
        cli_ok(&dir, &["node", "ls"]).matches(" ready ").count() == 5
    });

    cli_ok(&dir, &["network", "create", "mesh"]);
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "5",
            "--network",
            "mesh",
            "--port",
            "http:8080/tcp",
            "sleep",
            "300",
        ],
    );
    let solo_stop = tmp.join("solo-stop");
    let solo_script = format!("while [ ! -e {} ]; do sleep 0.2; done", solo_stop.display());
    let node4 = node_id_at(&dir, &hosts.addr(4));
    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "solo",
            "--network",
            "mesh",
            "--port",
            "http:9090/tcp",
            "--restart-condition",
            "none",
            "--constraint",
            &format!("node.id=={node4}"),
            "--",
            "sh",
            "-c",
            &solo_script,
        ],
    );
    procs::eventually("web's five tasks and solo's running", START, || {
        running_tasks(&dir, "web").len() == 5 && running_tasks(&dir, "solo").len() == 1
    });
    let web = nodes.converge("at the start", &nodes.all(), "web", || {
        running_tasks(&dir, "web")
    });
    let solo = nodes.converge("solo at the start", &nodes.all(), "solo", || {
        running_tasks(&dir, "solo")
    });
    // The scheduler spreads web's five tasks, one per node: node 4 runs one.
    for i in nodes.all() {
        assert_eq!(
            nodes.addrs_seen(i, "web").len(),
            5,
            "web does not run on every node (host {i}'s answer)"
        );
    }
    let on_node4: BTreeSet<String> = web
        .iter()
        .filter(|task| {
            a_addrs(&nodes.dig(0, &format!("{task}.web.mesh"), "A").1).contains(&hosts.addr(4))
        })
        .cloned()
        .collect();
    assert_eq!(on_node4.len(), 1, "node 4's web task: {on_node4:?}");

    // The partition: node 4 alone on one side.
    let cut_at = Instant::now();
    hosts.cut(4);
    std::fs::write(&solo_stop, b"").unwrap();
    cli_ok(
        &dir,
        &["service", "update", "web", "--replicas", "8", "--detach"],
    );
    // Both sides changed: the majority names new tasks and, once gossip declared node 4
    // failed, no longer names node 4's task; node 4 no longer names solo.
    let majority = [0, 1, 2, 3];
    loop {
        let majority_changed = majority.iter().all(|&i| {
            let seen = nodes.tasks_seen(i, "web");
            seen.len() > web.len() - on_node4.len()
                && !web.is_superset(&seen)
                && seen.is_disjoint(&on_node4)
        });
        let node4_dropped_solo = nodes.dig(4, "solo.mesh", "SRV").0 == "NXDOMAIN";
        if majority_changed && node4_dropped_solo {
            break;
        }
        assert!(
            cut_at.elapsed() < CUT_MAX,
            "during the cut: the majority changed and forgot node 4: {majority_changed}, node \
             4 dropped solo: {node4_dropped_solo}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        nodes.tasks_seen(4, "web").is_superset(&on_node4),
        "node 4 lost its own running task's endpoint during the cut"
    );
    hosts.heal(4);
    eprintln!("partition healed after {:?}", cut_at.elapsed());

    let healed = nodes.converge("after the heal", &nodes.all(), "web", || {
        running_tasks(&dir, "web")
    });
    assert_eq!(healed.len(), 8, "{healed:?}");
    assert!(
        healed.is_superset(&on_node4),
        "node 4's task did not keep running through the cut: {on_node4:?} not in {healed:?}"
    );
    let heal_at = Instant::now();
    procs::eventually(
        &format!("solo's ended task {solo:?} forgotten by every node"),
        CONVERGE,
        || {
            nodes
                .all()
                .iter()
                .all(|&i| nodes.dig(i, "solo.mesh", "SRV").0 == "NXDOMAIN")
        },
    );
    eprintln!(
        "solo's deletion reached every node {:?} after web converged",
        heal_at.elapsed()
    );

    // Agent 3 dies without a word: its address leaves every other node's answers.
    let dead = hosts.addr(3);
    agents[3].as_mut().unwrap().kill();
    agents[3] = None;
    let others = [0, 1, 2, 4];
    procs::eventually(
        "the killed agent's endpoints gone everywhere",
        CONVERGE,
        || {
            others
                .iter()
                .all(|&i| !nodes.addrs_seen(i, "web").contains(&dead))
        },
    );
    // Restarted on its state, it rejoins the gossip and publishes its tasks again.
    agents[3] = Some(start_agent(hosts, 3, &tmp.join("agent3"), None));
    procs::eventually(
        "the restarted agent's endpoints back everywhere",
        CONVERGE,
        || {
            nodes
                .all()
                .iter()
                .all(|&i| nodes.addrs_seen(i, "web").contains(&dead))
        },
    );
    nodes.converge("after the restart", &nodes.all(), "web", || {
        running_tasks(&dir, "web")
    });

    for agent in agents.iter_mut().flatten() {
        agent.signal(15);
        assert!(agent.wait_exit(START).success());
    }
    cluster.managers[0].stop();
}
