//! Networks and service discovery with real processes: the `flotilla network` commands and
//! their refusals, `service create --network/--port`, and the node's DNS responder asked
//! with a real DNS client (`dig`, Debian's `bind9-dnsutils`): a running task's node
//! address (A), its port (SRV), NXDOMAIN for unknown names, and the answer gone once the
//! task stopped.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "procs/mod.rs"]
mod procs;

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use procs::{Proc, cli_in, cli_ok, free_addr};

const TIMEOUT: Duration = Duration::from_secs(60);
const START: Duration = Duration::from_secs(60);

/// A UDP port on loopback that was free a moment ago.
fn free_udp_addr() -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap().to_string()
}

/// `flotilla up` in a fresh directory with its DNS responder on `dns`; waits until it
/// serves commands.
fn up(dir: &Path, dns: &str) -> Proc {
    up_listening(dir, dns, &free_addr())
}

/// As [`up`], listening on `listen` (other nodes join there; gossip binds its port + 1).
fn up_listening(dir: &Path, dns: &str, listen: &str) -> Proc {
    let mut proc = Proc::start(
        "up",
        &[
            "up",
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            listen,
            "--dns-listen",
            dns,
        ],
    );
    proc.wait_for("flotilla manager listening", START);
    proc.wait_for(&format!("answering DNS queries on {dns}"), START);
    // The cluster object (made by the leader's duties) is what writes wait for.
    procs::eventually("the cluster object", START, || {
        cli_in(dir, &["cluster", "inspect"]).0
    });
    proc
}

fn refused(dir: &Path, args: &[&str]) -> String {
    let (success, output) = cli_in(dir, args);
    assert!(!success, "flotilla {args:?} should have failed:\n{output}");
    assert!(output.contains("error:"), "no error on stderr:\n{output}");
    output
}

/// `dig @DNS NAME TYPE`: the status word and the answer lines (`+noall +answer` style).
fn dig(dns: &str, name: &str, rtype: &str) -> (String, Vec<String>) {
    let (host, port) = dns.rsplit_once(':').unwrap();
    let output = Command::new("dig")
        .args([
            &format!("@{host}"),
            "-p",
            port,
            "+tries=1",
            "+time=2",
            "+nocookie",
            name,
            rtype,
        ])
        .output()
        .expect("dig (package bind9-dnsutils) must be installed");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "dig {name} {rtype} failed:\n{text}"
    );
    let status = procs::dig_status(&text).unwrap_or_else(|| panic!("no status in:\n{text}"));
    let answers = procs::dig_answers(&text);
    (status, answers)
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn networks_are_created_listed_inspected_and_removed_with_clear_refusals() {
    let tmp = tmp();
    let dir = tmp.path().join("m1");
    let _manager = up(&dir, &free_udp_addr());

    let id = cli_ok(&dir, &["network", "create", "backend", "--label", "tier=2"])
        .trim()
        .to_string();
    assert_eq!(id.len(), 25, "a network id: {id}");
    let taken = refused(&dir, &["network", "create", "backend"]);
    assert!(taken.contains("is taken"), "{taken}");
    let bad = refused(&dir, &["network", "create", "back.end"]);
    assert!(bad.contains("name"), "{bad}");
    let driver = refused(&dir, &["network", "create", "other", "--driver", "bridge"]);
    assert!(driver.contains("only driver"), "{driver}");

    let table = cli_ok(&dir, &["network", "ls"]);
    assert!(
        table.contains("backend") && table.contains("overlay"),
        "{table}"
    );
    let json = cli_ok(&dir, &["network", "ls", "--format", "json"]);
    assert!(json.contains(&format!("\"id\": \"{id}\"")), "{json}");
    let inspected = cli_ok(&dir, &["network", "inspect", "backend"]);
    assert!(
        inspected.contains("\"name\": \"backend\"")
            && inspected.contains("\"driver\": \"overlay\"")
            && inspected.contains("\"tier\": \"2\""),
        "{inspected}"
    );
    let unknown = refused(&dir, &["network", "inspect", "nowhere"]);
    assert!(unknown.contains("no network \"nowhere\""), "{unknown}");

    let unknown = refused(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "api",
            "--network",
            "nowhere",
            "sleep",
            "300",
        ],
    );
    assert!(
        unknown.contains("--network nowhere") && unknown.contains("network create"),
        "{unknown}"
    );
    let bad_port = refused(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "api",
            "--port",
            "http:99999/tcp",
            "sleep",
            "1",
        ],
    );
    assert!(bad_port.contains("--port"), "{bad_port}");

    cli_ok(
        &dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "api",
            "--network",
            "backend",
            "--port",
            "http:8080/tcp",
            "sleep",
            "300",
        ],
    );
    let service = cli_ok(&dir, &["service", "inspect", "api"]);
    assert!(
        service.contains(&format!("\"{id}\"")) && service.contains("\"port\": 8080"),
        "the spec holds the network id and the port:\n{service}"
    );
    let in_use = refused(&dir, &["network", "rm", "backend"]);
    assert!(in_use.contains("in use by service(s) api"), "{in_use}");

    // Off the network: its task is replaced, the old one stops, then the network may go.
    cli_ok(
        &dir,
        &["service", "update", "--detach", "api", "--no-networks"],
    );
    cli_ok(&dir, &["service", "rm", "api"]);
    procs::eventually("the network can be removed", TIMEOUT, || {
        cli_in(&dir, &["network", "rm", "backend"]).0
    });
    let gone = refused(&dir, &["network", "inspect", id.as_str()]);
    assert!(gone.contains("no network"), "{gone}");
}

/// The task ids of `service` that are running, from `service ps --format json`.
fn running_task_ids(dir: &Path, service: &str) -> Vec<String> {
    let json = cli_ok(dir, &["service", "ps", service, "--format", "json"]);
    let tasks: serde_json::Value = serde_json::from_str(&json).unwrap();
    tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"]["state"] == "running")
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dig_resolves_a_running_service_and_forgets_it_once_its_tasks_stop() {
    let tmp = tmp();
    let dir = tmp.path().join("m1");
    let dns = free_udp_addr();
    let _manager = up(&dir, &dns);
    cli_ok(&dir, &["network", "create", "backend"]);
    let env_file: PathBuf = tmp.path().join("env");
    let script = format!(
        "echo \"$FLOTILLA_DNS\" > {}; exec sleep 300",
        env_file.display()
    );
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
            "--network",
            "backend",
            "--port",
            "http:8080/tcp",
            "--port",
            "admin:9090",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    procs::eventually("two running tasks", TIMEOUT, || {
        running_task_ids(&dir, "web").len() == 2
    });
    let tasks = running_task_ids(&dir, "web");

    procs::eventually("web.backend resolves", TIMEOUT, || {
        dig(&dns, "web.backend", "A").1.len() == 1
    });
    let (status, answers) = dig(&dns, "WEB.backend.", "A");
    assert_eq!(status, "NOERROR");
    // Both tasks run on this node: its address, once.
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0].ends_with("IN A 127.0.0.1"), "{answers:?}");

    let (status, answers) = dig(&dns, "_http._tcp.web.backend", "SRV");
    assert_eq!(status, "NOERROR");
    assert_eq!(answers.len(), 2, "one per task: {answers:?}");
    for task in &tasks {
        let target = format!("0 1 8080 {task}.web.backend.");
        assert!(
            answers.iter().any(|a| a.ends_with(&target)),
            "{target} missing in {answers:?}"
        );
        let (status, addr) = dig(&dns, &format!("{task}.web.backend"), "A");
        assert_eq!((status.as_str(), addr.len()), ("NOERROR", 1), "{addr:?}");
    }
    let (_, every_port) = dig(&dns, "web.backend", "SRV");
    assert_eq!(every_port.len(), 4, "two tasks, two ports: {every_port:?}");

    for unknown in ["api.backend", "web.frontend", "_smtp._tcp.web.backend"] {
        let (status, answers) = dig(&dns, unknown, "A");
        assert_eq!(status, "NXDOMAIN", "{unknown}");
        assert!(answers.is_empty());
    }
    // A datagram that is no query does not stop the responder.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.send_to(&[0xAB; 40], &dns).unwrap();
    socket.send_to(&[1], &dns).unwrap();

    procs::eventually("tasks got the resolver's address", TIMEOUT, || {
        std::fs::read_to_string(&env_file).is_ok_and(|s| s.trim() == dns)
    });
    let shown = cli_ok(&dir, &["network", "inspect", "backend", "--endpoints"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["attached"], true);
    let endpoints = shown["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2, "{shown}");
    assert!(endpoints.iter().all(|e| e["service_name"] == "web"
        && e["addr"] == "127.0.0.1"
        && e["network_name"] == "backend"));

    // Stopped: the answers go away, and the node leaves the network.
    cli_ok(&dir, &["service", "scale", "web=0"]);
    procs::eventually("web.backend is forgotten", TIMEOUT, || {
        dig(&dns, "web.backend", "A").0 == "NXDOMAIN"
    });
    assert_eq!(dig(&dns, "_http._tcp.web.backend", "SRV").0, "NXDOMAIN");
    let shown = cli_ok(&dir, &["network", "inspect", "backend", "--endpoints"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["attached"], false, "{shown}");
    assert!(shown["endpoints"].as_array().unwrap().is_empty());
}

#[test]
fn an_explicit_dns_address_in_use_stops_the_node_with_a_clear_error() {
    let tmp = tmp();
    let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tmp.path().join("m1");
    let listen = free_addr();
    let (status, output) = procs::run_to_end(
        &[
            "up",
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            &listen,
            "--dns-listen",
            &addr,
        ],
        TIMEOUT,
    );
    assert!(!status.success(), "{output}");
    assert!(
        output.contains(&format!("cannot listen for DNS queries on {addr}"))
            && output.contains("--dns-listen"),
        "{output}"
    );
    let (status, output) = procs::run_to_end(
        &[
            "up",
            "--state-dir",
            dir.to_str().unwrap(),
            "--dns-listen",
            "localhost",
        ],
        TIMEOUT,
    );
    assert!(!status.success());
    assert!(output.contains("expected IP:PORT"), "{output}");
}

/// The SRV answers for `web.front` on the responder at `dns`.
fn srv_answers(dns: &str) -> Vec<String> {
    dig(dns, "web.front", "SRV").1
}

/// Service discovery across nodes: a manager and a worker each run one task of a service on
/// a network. Each node publishes its own task's endpoint in the network's table; gossip
/// (networkdb over UDP, encrypted with the leader's keys) carries it to the other, so each
/// node's DNS responder, asked locally, names both tasks. A node killed without a word is
/// declared failed by gossip and its endpoint stops being answered elsewhere.
#[test]
fn each_nodes_dns_answers_for_the_tasks_of_every_node_through_gossip() {
    let tmp = tmp();
    let (dns_manager, dns_worker) = (free_udp_addr(), free_udp_addr());
    let manager_dir = tmp.path().join("m1");
    let manager_listen = free_addr();
    let _manager = up_listening(&manager_dir, &dns_manager, &manager_listen);
    let token = cli_ok(&manager_dir, &["join-token", "worker"])
        .trim()
        .to_string();
    let worker_dir = tmp.path().join("w1");
    let worker_listen = free_addr();
    let mut worker = Proc::start(
        "agent",
        &[
            "agent",
            "--state-dir",
            worker_dir.to_str().unwrap(),
            "--token",
            &token,
            "--manager",
            &manager_listen,
            "--listen",
            &worker_listen,
            "--dns-listen",
            &dns_worker,
        ],
    );
    worker.wait_for("running the tasks assigned", START);
    // Both nodes ready before the service, so that the scheduler spreads its two tasks.
    procs::eventually("two nodes ready", START, || {
        cli_ok(&manager_dir, &["node", "ls"])
            .matches(" ready ")
            .count()
            == 2
    });

    cli_ok(&manager_dir, &["network", "create", "front"]);
    cli_ok(
        &manager_dir,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "2",
            "--network",
            "front",
            "--port",
            "http:8080/tcp",
            "sleep",
            "300",
        ],
    );
    // One task per node (the scheduler spreads a service's tasks), each published by its
    // own node: both responders answer for both only if gossip carried them across.
    procs::eventually("both nodes answer for both tasks", TIMEOUT, || {
        srv_answers(&dns_manager).len() == 2 && srv_answers(&dns_worker).len() == 2
    });
    let answers = srv_answers(&dns_manager);
    assert!(
        answers
            .iter()
            .all(|a| a.contains(" SRV ") && a.contains(" 8080 ")),
        "{answers:?}"
    );

    // The worker dies without a word: gossip declares it failed and its endpoint goes from
    // the manager's answers (before the managers, much later, replace its task).
    worker.kill();
    procs::eventually(
        "the dead worker's endpoint no longer answered",
        TIMEOUT,
        || srv_answers(&dns_manager).len() == 1,
    );
}
