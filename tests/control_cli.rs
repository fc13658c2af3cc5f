//! The control API and the `flotilla` CLI against real manager processes: the service
//! lifecycle, conflicts, invalid specs, unknown ids, transaction limits, join-token
//! rotation, forwarding with the caller's identity, linearizable reads from a follower, a
//! watch resumed across a leader change, and a whole-cluster restart.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flotilla::ca::{Role, load_node_files, tls};
use flotilla::net::{CallOptions, ResponseStream, Transport, TransportConfig};
use flotilla::proto::control as pb;
use flotilla::proto::objects::{ObjectKind, store_object};
use procs::cluster::{Cluster, ClusterOptions, ManagerProc, START};
use procs::{raft_id_of, run_to_end};

const CLI: Duration = Duration::from_secs(60);

/// Runs `flotilla ARGS --state-dir DIR [--manager ADDR]`: success and everything printed.
fn cli(dir: &Path, manager: Option<&str>, args: &[&str]) -> (bool, String) {
    // Connection flags right after the command word: a service's COMMAND ARGS come last.
    let dir = dir.to_str().unwrap();
    let mut all: Vec<&str> = vec![args[0], "--state-dir", dir];
    if let Some(addr) = manager {
        all.extend(["--manager", addr]);
    }
    all.extend(&args[1..]);
    let (status, output) = run_to_end(&all, CLI);
    (status.success(), output)
}

fn ok(dir: &Path, manager: Option<&str>, args: &[&str]) -> String {
    let (success, output) = cli(dir, manager, args);
    assert!(success, "flotilla {args:?} failed:\n{output}");
    output
}

fn refused(dir: &Path, manager: Option<&str>, args: &[&str]) -> String {
    let (success, output) = cli(dir, manager, args);
    assert!(!success, "flotilla {args:?} should have failed:\n{output}");
    assert!(output.contains("error:"), "no error on stderr:\n{output}");
    output
}

/// The first `"version": N` of a JSON document (the object's own version).
fn version_in(json: &str) -> u64 {
    json.lines()
        .find_map(|l| l.trim().strip_prefix("\"version\": "))
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .unwrap_or_else(|| panic!("no version in:\n{json}"))
}

/// Runs a read until its output contains `needle`: for what a manager's duties thread
/// records shortly after an election (its Node object, the Cluster object).
fn wait_for_output(dir: &Path, manager: Option<&str>, args: &[&str], needle: &str) -> String {
    for _ in 0..100 {
        let output = ok(dir, manager, args);
        if output.contains(needle) {
            return output;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("flotilla {args:?} never printed {needle:?}");
}

/// The node id a manager logged at start.
fn node_id_of(manager: &mut ManagerProc) -> String {
    let line = manager.proc().wait_for("(raft id", START);
    let rest = line.split("manager ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_string()
}

#[test]
fn one_manager_service_lifecycle_limits_tokens_and_restart() {
    let mut cluster = Cluster::start(1, ClusterOptions::default());
    let dir = cluster.managers[0].dir.clone();

    let id = ok(
        &dir,
        None,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "web",
            "--replicas",
            "2",
            "--env",
            "A=1",
            "--workdir",
            "/srv",
            "--restart-condition",
            "on-failure",
            "--restart-delay",
            "250ms",
            "--restart-max-attempts",
            "3",
            "--restart-window",
            "1m",
            "--constraint",
            "node.role==manager",
            "--update-parallelism",
            "2",
            "--update-delay",
            "1s",
            "--update-failure-action",
            "rollback",
            "--update-order",
            "start-first",
            "sleep",
            "100",
        ],
    )
    .trim()
    .to_string();
    assert_eq!(id.len(), 25, "a service id: {id}");
    let inspect = ok(&dir, None, &["service", "inspect", "web"]);
    for expected in [
        "\"replicas\": 2",
        "\"A=1\"",
        "\"working_dir\": \"/srv\"",
        "\"condition\": \"on-failure\"",
        "\"delay_ms\": 250",
        "\"max_attempts\": 3",
        "\"window_ms\": 60000",
        "\"node.role==manager\"",
        "\"failure_action\": \"rollback\"",
        "\"order\": \"start-first\"",
    ] {
        assert!(inspect.contains(expected), "{expected} missing:\n{inspect}");
    }

    // Scale and update change the spec and bump the version.
    let before = version_in(&inspect);
    ok(&dir, None, &["service", "scale", "web=5"]);
    ok(
        &dir,
        None,
        &[
            "service",
            "update",
            "--detach",
            "web",
            "--env",
            "B=2",
            "--workdir",
            "/tmp",
        ],
    );
    // The orchestrator records an update's progress on the service (a new version each
    // time): read the version once it has settled, no update in progress and no new version
    // for longer than the 5 s monitor. (When the orchestrator had not yet made the tasks of
    // the old spec, there is no update to record at all.)
    let update_timeout = std::time::Duration::from_secs(120);
    let last_inspect = std::cell::RefCell::new(String::new());
    let last_change = std::cell::Cell::new((0u64, std::time::Instant::now()));
    let settled = procs::poll_until(update_timeout, || {
        let inspect = ok(&dir, None, &["service", "inspect", &id[..8]]);
        let version = version_in(&inspect);
        if last_change.get().0 != version {
            last_change.set((version, std::time::Instant::now()));
        }
        let quiet = last_change.get().1.elapsed() >= std::time::Duration::from_secs(6);
        let updating = inspect.contains("\"state\": \"updating\"");
        *last_inspect.borrow_mut() = inspect;
        quiet && !updating
    });
    assert!(
        settled,
        "the update never settled:\n{}\n{}",
        last_inspect.borrow(),
        ok(&dir, None, &["service", "ps", &id[..8]])
    );
    let inspect = ok(&dir, None, &["service", "inspect", &id[..8]]);
    assert!(inspect.contains("\"replicas\": 5") && inspect.contains("\"B=2\""));
    let current_spec = inspect.split("previous_spec").next().unwrap();
    assert!(
        !current_spec.contains("\"A=1\""),
        "--env replaces the list:\n{inspect}"
    );
    let version = version_in(&inspect);
    assert!(version > before);
    let table = ok(&dir, None, &["service", "ls"]);
    assert!(
        table.contains("web") && table.contains("replicated"),
        "{table}"
    );

    // Two concurrent updates from the same read: exactly one wins, the other gets the
    // conflict error with a hint.
    let v = version.to_string();
    let racers: Vec<_> = ["7", "8"]
        .into_iter()
        .map(|replicas| {
            let (dir, v) = (dir.clone(), v.clone());
            std::thread::spawn(move || {
                let args = [
                    "service",
                    "update",
                    "--detach",
                    "web",
                    "--replicas",
                    replicas,
                    "--if-version",
                    &v,
                ];
                (replicas, cli(&dir, None, &args))
            })
        })
        .collect();
    let outcomes: Vec<_> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<_> = outcomes
        .iter()
        .filter(|(_, (success, _))| *success)
        .collect();
    assert_eq!(winners.len(), 1, "exactly one update wins: {outcomes:?}");
    let (_, (_, loser)) = outcomes.iter().find(|(_, (success, _))| !success).unwrap();
    // Refused by the leader's check, or (if both passed it) by the store at apply.
    assert!(
        loser.contains("Aborted") && loser.contains("changed since") && loser.contains("hint:"),
        "{loser}"
    );
    let winner = winners[0].0;
    assert!(
        ok(&dir, None, &["service", "inspect", "web"]).contains(&format!("\"replicas\": {winner}"))
    );

    // Invalid specs name the field and the reason; unknown ids say how to find real ones.
    let out = refused(
        &dir,
        None,
        &[
            "service", "create", "--detach", "--name", "bad name", "true",
        ],
    );
    assert!(
        out.contains("InvalidArgument") && out.contains("name:"),
        "{out}"
    );
    let out = refused(
        &dir,
        None,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "c",
            "--constraint",
            "node.color==red",
            "true",
        ],
    );
    assert!(out.contains("constraints[0]"), "{out}");
    let out = refused(
        &dir,
        None,
        &["service", "create", "--detach", "--name", "web", "true"],
    );
    assert!(out.contains("AlreadyExists"), "{out}");
    let out = refused(&dir, None, &["service", "inspect", "nosuch"]);
    assert!(
        out.contains("NotFound") && out.contains("service ls"),
        "{out}"
    );
    let out = refused(&dir, None, &["node", "inspect", "nosuch"]);
    assert!(out.contains("NotFound") && out.contains("node ls"), "{out}");

    // An environment beyond what a task may have (64 KiB) is refused with its size and
    // the limit, before any task fails to start with E2BIG.
    let env_file = cluster.tmp.path().join("big.env");
    let line = format!("K={}\n", "x".repeat(1000));
    std::fs::write(&env_file, line.repeat(2000)).unwrap();
    let out = refused(
        &dir,
        None,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "big",
            "--env-file",
            env_file.to_str().unwrap(),
            "true",
        ],
    );
    assert!(
        out.contains("InvalidArgument")
            && out.contains("task.env")
            && out.contains("2,006,000 bytes")
            && out.contains("64 KiB"),
        "{out}"
    );

    // Why a task waits shows in `service ps` and `task ls` (docker's ERROR column), not only
    // in `task inspect`.
    ok(
        &dir,
        None,
        &[
            "service",
            "create",
            "--detach",
            "--name",
            "nowhere",
            "--constraint",
            "node.labels.zone==mars",
            "true",
        ],
    );
    let reason = "no node satisfies node.labels.zone==mars";
    let ps = wait_for_output(&dir, None, &["service", "ps", "nowhere"], reason);
    let line = ps.lines().find(|l| l.contains(reason)).unwrap();
    assert!(line.contains("Pending"), "{ps}");
    assert!(ps.lines().next().unwrap().contains("ERROR"), "{ps}");
    let tasks = ok(&dir, None, &["task", "ls", "--service", "nowhere"]);
    assert!(tasks.contains(reason), "{tasks}");
    ok(&dir, None, &["service", "rm", "nowhere"]);

    // Resource settings that cannot work are refused, saying why and what to change.
    for (flags, why) in [
        (
            &["--limit-memory", "1M"][..],
            "too small for a process to start",
        ),
        (
            &["--reserve-memory", "64M", "--limit-memory", "32M"][..],
            "lower --reserve-memory or raise --limit-memory",
        ),
    ] {
        let mut args = vec!["service", "create", "--detach", "--name", "limited"];
        args.extend(flags);
        args.push("true");
        let out = refused(&dir, None, &args);
        assert!(
            out.contains("InvalidArgument") && out.contains(why),
            "{flags:?}: {out}"
        );
    }

    // Nodes: the manager recorded itself; availability, labels and desired role update.
    let nodes = wait_for_output(&dir, None, &["node", "ls"], "leader");
    assert!(nodes.contains("manager"), "{nodes}");
    let node_id = node_id_of(&mut cluster.managers[0]);
    ok(
        &dir,
        None,
        &[
            "node",
            "update",
            &node_id,
            "--availability",
            "drain",
            "--label-add",
            "zone=a",
        ],
    );
    // The only manager cannot be demoted (tests/roles.rs covers demotions).
    let out = refused(&dir, None, &["node", "demote", &node_id]);
    assert!(out.contains("last manager"), "{out}");
    let node = ok(&dir, None, &["node", "inspect", &node_id]);
    assert!(node.contains("\"availability\": \"drain\"") && node.contains("\"zone\": \"a\""));
    assert!(node.contains("\"desired_role\": \"manager\""), "{node}");
    let out = refused(&dir, None, &["node", "rm", &node_id]);
    assert!(out.contains("is a manager"), "{out}");

    // Cluster settings.
    ok(
        &dir,
        None,
        &[
            "cluster",
            "update",
            "--heartbeat-period",
            "7s",
            "--task-history-retention",
            "9",
        ],
    );
    let inspect = ok(&dir, None, &["cluster", "inspect"]);
    assert!(
        inspect.contains("\"heartbeat_period_ms\": 7000"),
        "{inspect}"
    );
    assert!(
        inspect.contains("\"task_history_retention\": 9"),
        "{inspect}"
    );
    let out = refused(
        &dir,
        None,
        &["cluster", "update", "--heartbeat-period", "0ms"],
    );
    assert!(out.contains("heartbeat_period_ms"), "{out}");

    // Join tokens: rotation replaces one token, everywhere (file included).
    let worker = ok(&dir, None, &["join-token", "worker"]).trim().to_string();
    let manager = ok(&dir, None, &["join-token", "manager"])
        .trim()
        .to_string();
    assert!(worker.starts_with("FLT-1-") && worker != manager);
    let rotated = ok(&dir, None, &["join-token", "worker", "--rotate"])
        .trim()
        .to_string();
    assert_ne!(rotated, worker);
    assert_eq!(ok(&dir, None, &["join-token", "manager"]).trim(), manager);
    let file = std::fs::read_to_string(dir.join("join-tokens")).unwrap();
    assert!(file.contains(&rotated) && !file.contains(&worker), "{file}");

    // JSON for scripts; removal; then a restart keeps everything.
    let json = ok(&dir, None, &["service", "ls", "--format", "json"]);
    assert!(
        json.trim_start().starts_with('[') && json.contains(&id),
        "{json}"
    );
    ok(
        &dir,
        None,
        &["service", "create", "--detach", "--name", "gone", "true"],
    );
    ok(&dir, None, &["service", "rm", "gone"]);
    refused(&dir, None, &["service", "inspect", "gone"]);
    let before = ok(&dir, None, &["service", "inspect", "web"]);
    // A watch through the local socket across the restart: it names the socket it lost
    // (a unix socket has no network address to show) and resumes.
    let mut watch = procs::Proc::start(
        "watch-local",
        &[
            "watch",
            "--state-dir",
            dir.to_str().unwrap(),
            "--kind",
            "service",
            "--format",
            "json",
        ],
    );
    watch.wait_for("watch: from version", START);
    cluster.managers[0].stop();
    let lost = watch.wait_for("resuming after version", START);
    assert!(
        lost.contains("control.sock") && !lost.contains("127.0.0.1:0"),
        "{lost}"
    );
    cluster.managers[0].restart();
    let after = ok(&dir, None, &["service", "inspect", "web"]);
    assert_eq!(before, after, "the service survives a restart unchanged");
    assert_eq!(ok(&dir, None, &["join-token", "worker"]).trim(), rotated);
    ok(
        &dir,
        None,
        &["service", "create", "--detach", "--name", "after", "true"],
    );
    watch.wait_for("\"name\":\"after\"", START);
}

/// A raw `control.Watch` client.
struct WatchClient {
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
}

impl WatchClient {
    fn new(node_dir: &Path) -> WatchClient {
        let (identity, root) = load_node_files(node_dir).unwrap();
        WatchClient {
            transport: Transport::start(TransportConfig::default()).unwrap(),
            tls: Arc::new(tls::client_config(&identity, &root).unwrap()),
        }
    }

    fn watch(&self, addr: &str, since: Option<u64>) -> ResponseStream<pb::WatchMessage> {
        let request = pb::WatchRequest {
            filters: vec![pb::WatchFilter {
                kind: ObjectKind::Service as i32,
                ..Default::default()
            }],
            resume: since.is_some(),
            since_version: since.unwrap_or(0),
            include_commits: false,
        };
        let mut stream = self
            .transport
            .channel(addr, &self.tls)
            .server_stream::<_, pb::WatchMessage>(
                flotilla::control::WATCH,
                &request,
                CallOptions::timeout(CLI),
            )
            .unwrap();
        let start = stream.recv().unwrap().unwrap();
        assert_eq!(start.action, pb::WatchAction::Start as i32);
        stream
    }
}

/// Records the creates a watch delivers: service id → versions seen.
fn record(seen: &mut BTreeMap<String, Vec<u64>>, last: &mut u64, message: &pb::WatchMessage) {
    assert!(message.version > *last, "versions only increase");
    *last = message.version;
    if message.action == pb::WatchAction::Create as i32
        && let Some(store_object::Object::Service(service)) =
            message.object.as_ref().and_then(|o| o.object.clone())
    {
        seen.entry(service.spec.unwrap().name)
            .or_default()
            .push(message.version);
    }
}

#[test]
fn three_managers_forward_read_watch_and_restart() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let leader = cluster.leader_index(&client).unwrap();
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let leader_addr = cluster.managers[leader].addr.clone();
    let follower_addr = cluster.managers[follower].addr.clone();
    let other_id = node_id_of(&mut cluster.managers[other]);
    let follower_id = node_id_of(&mut cluster.managers[follower]);
    let other_dir = cluster.managers[other].dir.clone();

    // Watch from the leader, from the version it is at now.
    let watcher = WatchClient::new(&other_dir.join("node"));
    let mut stream = watcher.watch(&leader_addr, None);

    // The Raft group through the control API of a follower: the leader's view.
    let managers: pb::ManagersResponse = watcher
        .transport
        .channel(&follower_addr, &watcher.tls)
        .unary(
            flotilla::control::LIST_MANAGERS,
            &pb::ListManagersRequest {},
            CallOptions::timeout(CLI),
        )
        .unwrap();
    let status = managers.status.unwrap();
    assert_eq!(status.members.len(), 3);
    assert_eq!(status.id, status.leader, "answered by the leader");

    // A write to a follower, made with a third manager's identity: the leader runs it as
    // that caller and says who forwarded it.
    ok(
        &other_dir,
        Some(&follower_addr),
        &["service", "create", "--detach", "--name", "s1", "true"],
    );
    let line = cluster.managers[leader]
        .proc()
        .wait_for("control.CreateService by node", START);
    assert!(
        line.contains(&format!(
            "by node {other_id} (Manager) forwarded by {follower_id}"
        )),
        "{line}"
    );

    // Linearizable reads: written through the leader, visible at once through a follower.
    for i in 2..=4 {
        let name = format!("s{i}");
        ok(
            &other_dir,
            Some(&leader_addr),
            &["service", "create", "--detach", "--name", &name, "true"],
        );
        let seen = ok(
            &other_dir,
            Some(&follower_addr),
            &["service", "inspect", &name],
        );
        assert!(seen.contains(&format!("\"name\": \"{name}\"")), "{seen}");
    }

    let mut seen = BTreeMap::new();
    let mut last = 0;
    while seen.len() < 4 {
        record(&mut seen, &mut last, &stream.recv().unwrap().unwrap());
    }

    // The leader dies; the watch is resumed on a survivor from the last version seen.
    cluster.managers[leader].kill();
    assert!(
        stream.recv().is_err(),
        "the stream from a dead manager fails"
    );
    let mut stream = watcher.watch(&follower_addr, Some(last));
    for i in 5..=7 {
        let name = format!("s{i}");
        ok(
            &other_dir,
            Some(&follower_addr),
            &["service", "create", "--detach", "--name", &name, "true"],
        );
    }
    while seen.len() < 7 {
        record(&mut seen, &mut last, &stream.recv().unwrap().unwrap());
    }
    stream.cancel();
    for (name, versions) in &seen {
        assert_eq!(versions.len(), 1, "{name} seen exactly once: {versions:?}");
    }
    watcher.transport.shutdown();

    // The whole cluster restarts with its state.
    cluster.managers[leader].restart();
    let before = ok(
        &other_dir,
        Some(&follower_addr),
        &["service", "ls", "--format", "json"],
    );
    for manager in &mut cluster.managers {
        manager.stop();
    }
    for manager in &mut cluster.managers {
        manager.restart();
    }
    let after = ok(
        &other_dir,
        Some(&follower_addr),
        &["service", "ls", "--format", "json"],
    );
    assert_eq!(before, after);
    for i in 1..=7 {
        assert!(
            after.contains(&format!("\"name\": \"s{i}\"")),
            "s{i} missing:\n{after}"
        );
    }

    // A manager removed from the Raft group can then be removed as a node.
    let leader_now = cluster.leader_index(&client).unwrap();
    let gone = (0..3).find(|&i| i != leader_now && i != follower).unwrap();
    let gone_id = node_id_of(&mut cluster.managers[gone]);
    let line = cluster.managers[gone].proc().wait_for("(raft id", START);
    let gone_raft_id = line
        .split("(raft id ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    let follower_dir = cluster.managers[follower].dir.clone();
    wait_for_output(&follower_dir, None, &["node", "ls"], &gone_id);
    let out = refused(&follower_dir, None, &["node", "rm", &gone_id]);
    assert!(out.contains("is a manager"), "{out}");
    let (removed, out) = run_to_end(
        &[
            "manager",
            "rm",
            gone_raft_id,
            "--state-dir",
            follower_dir.to_str().unwrap(),
        ],
        CLI,
    );
    assert!(removed.success(), "{out}");
    ok(&follower_dir, None, &["node", "rm", &gone_id]);
    refused(&follower_dir, None, &["node", "inspect", &gone_id]);
    client.transport.shutdown();
}

/// Runs `flotilla ARGS[0] --cert-dir DIR --manager ADDR ARGS[1..]` with an admin certificate.
fn admin_cli(cert_dir: &Path, manager: &str, args: &[&str]) -> (bool, String) {
    let dir = cert_dir.to_str().unwrap();
    let mut all: Vec<&str> = vec![args[0], "--cert-dir", dir, "--manager", manager];
    all.extend(&args[1..]);
    let (status, output) = run_to_end(&all, CLI);
    (status.success(), output)
}

fn admin_ok(cert_dir: &Path, manager: &str, args: &[&str]) -> String {
    let (success, output) = admin_cli(cert_dir, manager, args);
    assert!(success, "flotilla {args:?} (admin) failed:\n{output}");
    output
}

/// Starts `flotilla watch --kind service --format json` and waits until it is subscribed.
fn start_watch(name: &str, identity: [&str; 2], manager: &str) -> procs::Proc {
    let args = [
        "watch",
        identity[0],
        identity[1],
        "--manager",
        manager,
        "--kind",
        "service",
        "--format",
        "json",
    ];
    let mut watch = procs::Proc::start(name, &args);
    watch.wait_for("watch: from version", START);
    watch
}

/// How many times a `watch --format json` output shows service `name` being created.
fn creates_of(output: &str, name: &str) -> usize {
    let needle = format!("\"name\":\"{name}\"");
    output
        .lines()
        .filter(|l| {
            l.contains("\"action\":\"create\"")
                && l.contains("\"kind\":\"service\"")
                && l.contains(&needle)
        })
        .count()
}

#[test]
fn admin_certificate_from_afar_and_cli_watch_across_a_leader_change() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    // The joiners get the CA key with the replicated cluster object, shortly after joining:
    // wait for it rather than race it (the CLI would also retry a refusal that says so).
    for joiner in 1..3 {
        cluster.managers[joiner]
            .proc()
            .wait_for("now runs the cluster CA", START);
    }
    let client = cluster.client();
    let leader = cluster.leader_index(&client).unwrap();
    let follower = (leader + 1) % 3;
    let follower_addr = cluster.managers[follower].addr.clone();
    let follower_id = node_id_of(&mut cluster.managers[follower]);

    // An admin certificate, issued through the founding manager's local socket (it holds
    // the CA key). The key was made by the CLI and is stored 0600.
    let admin_dir = cluster.tmp.path().join("admin");
    let founder_dir = cluster.managers[0].dir.clone();
    let admin_arg = admin_dir.to_str().unwrap();
    let issued = ok(
        &founder_dir,
        None,
        &[
            "admin-cert",
            "issue",
            "--out",
            admin_arg,
            "--validity",
            "1d",
            "--name",
            "ops",
        ],
    );
    let admin_id = issued
        .split("admin certificate ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no id in:\n{issued}"))
        .to_string();
    assert_eq!(procs::mode(&admin_dir.join("node.pem")), 0o600);
    let again = refused(
        &founder_dir,
        None,
        &["admin-cert", "issue", "--out", admin_arg],
    );
    assert!(again.contains("already holds an identity"), "{again}");

    // Used remotely against a follower: a write is forwarded with the admin's identity.
    admin_ok(
        &admin_dir,
        &follower_addr,
        &["service", "create", "--detach", "--name", "s1", "true"],
    );
    let line = cluster.managers[leader]
        .proc()
        .wait_for(&format!("by node {admin_id}"), START);
    assert!(
        line.contains(&format!("(Admin) forwarded by {follower_id}")),
        "{line}"
    );
    let managers = admin_ok(
        &admin_dir,
        &follower_addr,
        &["manager", "ls", "--format", "json"],
    );
    for manager in &cluster.managers {
        assert!(managers.contains(&manager.addr), "{managers}");
    }
    // It is refused on Raft's own methods, and needs --manager.
    let (identity, root) = load_node_files(&admin_dir).unwrap();
    let transport = Transport::start(TransportConfig::default()).unwrap();
    let admin_tls = Arc::new(tls::client_config(&identity, &root).unwrap());
    let status = transport
        .channel(&follower_addr, &admin_tls)
        .unary::<_, flotilla::proto::raft::StatusResponse>(
            flotilla::proto::raft::rpc::name::STATUS,
            &flotilla::proto::raft::StatusRequest {},
            CallOptions::timeout(CLI),
        )
        .unwrap_err();
    assert_eq!(
        status.code,
        flotilla::wire::Code::PermissionDenied,
        "{status}"
    );
    transport.shutdown();
    // An admin may get another certificate through any manager: the CA key is replicated,
    // so it works while the founder leads and while another manager leads. The admin moves
    // leadership itself.
    let transfer_to = |index: usize| {
        let id = raft_id_of(&managers, &cluster.managers[index].addr);
        admin_ok(&admin_dir, &follower_addr, &["manager", "transfer", &id]);
        procs::eventually("the transfer target leads", START, || {
            cluster.leader_index(&client) == Some(index)
        });
    };
    let issue_through = |index: usize, out: &str| {
        let out = cluster.tmp.path().join(out);
        let addr = &cluster.managers[index].addr;
        let args = ["admin-cert", "issue", "--out", out.to_str().unwrap()];
        (admin_cli(&admin_dir, addr, &args), out)
    };
    if leader != 0 {
        transfer_to(0);
    }
    let ((success, output), second_dir) = issue_through(1, "admin2");
    assert!(success, "{output}");
    assert_eq!(load_node_files(&second_dir).unwrap().0.role(), Role::Admin);
    transfer_to(1);
    let ((success, output), third_dir) = issue_through(2, "admin3");
    assert!(success, "{output}");
    assert_eq!(load_node_files(&third_dir).unwrap().0.role(), Role::Admin);
    // From here on, the leader is manager 1.
    let leader = 1;
    let follower = 2;
    let (leader_addr, follower_addr) = (
        cluster.managers[leader].addr.clone(),
        cluster.managers[follower].addr.clone(),
    );

    let (success, output) = run_to_end(&["service", "ls", "--cert-dir", admin_arg], CLI);
    assert!(
        !success.success() && output.contains("needs --manager"),
        "{output}"
    );

    // Two watches: through a follower (with the admin certificate), and through the
    // leader (with a manager's identity), which must fail over when the leader dies.
    let via_follower = start_watch("watch-follower", ["--cert-dir", admin_arg], &follower_addr);
    let other_dir = cluster.managers[(leader + 2) % 3].dir.clone();
    let via_leader = start_watch(
        "watch-leader",
        ["--state-dir", other_dir.to_str().unwrap()],
        &leader_addr,
    );
    let mut watches = [via_follower, via_leader];
    let create_services = |numbers: std::ops::RangeInclusive<u32>| {
        for i in numbers {
            let name = format!("s{i}");
            admin_ok(
                &admin_dir,
                &follower_addr,
                &["service", "create", "--detach", "--name", &name, "true"],
            );
        }
    };
    create_services(2..=4);
    for watch in &mut watches {
        watch.wait_for("\"name\":\"s4\"", START);
    }
    cluster.managers[leader].kill();
    create_services(5..=7);
    for watch in &mut watches {
        watch.wait_for("\"name\":\"s7\"", START);
        let output = watch.output();
        assert_eq!(creates_of(&output, "s1"), 0, "s1 came before the watch");
        for i in 2..=7 {
            let name = format!("s{i}");
            assert_eq!(
                creates_of(&output, &name),
                1,
                "{}: {name} seen exactly once:\n{output}",
                watch.name
            );
        }
    }
    let [_, mut via_leader] = watches;
    assert!(
        via_leader.output().contains("resuming after version"),
        "the watch through the leader re-subscribed:\n{}",
        via_leader.output()
    );
    client.transport.shutdown();
}

/// Whether the member at `addr` is reachable in a `manager ls --format json` listing.
fn reachable_in(listing: &str, addr: &str) -> Option<bool> {
    let mut lines = listing.lines().map(str::trim);
    lines.find(|l| l.contains(&format!("\"addr\": \"{addr}\"")))?;
    lines
        .find_map(|l| l.strip_prefix("\"reachable\": "))
        .map(|v| v.trim_end_matches(',') == "true")
}

/// The MANAGER STATUS `node ls` shows for `node_id` (the last column of its line).
fn manager_status_in(table: &str, node_id: &str) -> Option<String> {
    let line = table.lines().find(|l| l.starts_with(node_id))?;
    line.split_whitespace().last().map(str::to_string)
}

#[test]
fn node_ls_and_manager_ls_agree_on_a_killed_manager() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let leader = cluster.leader_index(&client).unwrap();
    let (victim, survivor) = ((leader + 1) % 3, (leader + 2) % 3);
    let victim_id = node_id_of(&mut cluster.managers[victim]);
    let victim_addr = cluster.managers[victim].addr.clone();
    // Asked through a follower: the answers must still be the leader's view.
    let dir = cluster.managers[survivor].dir.clone();
    let both = || {
        let managers = ok(&dir, None, &["manager", "ls", "--format", "json"]);
        let nodes = ok(&dir, None, &["node", "ls"]);
        (
            reachable_in(&managers, &victim_addr),
            manager_status_in(&nodes, &victim_id),
        )
    };
    procs::eventually("both listings show the manager reachable", START, || {
        both() == (Some(true), Some("reachable".to_string()))
    });

    // A transfer to an id no manager has says so, and where to find the ids.
    let out = refused(&dir, None, &["manager", "transfer", "abcdef"]);
    assert!(
        out.contains("no manager has id abcdef") && out.contains("flotilla manager ls"),
        "{out}"
    );
    assert!(!out.contains("voter"), "{out}");

    cluster.managers[victim].kill();
    procs::eventually(
        "both listings show the killed manager unreachable",
        START,
        || both() == (Some(false), Some("unreachable".to_string())),
    );
    let inspect = ok(&dir, None, &["node", "inspect", &victim_id]);
    assert!(
        inspect.contains("\"reachability\": \"unreachable\""),
        "{inspect}"
    );
    client.transport.shutdown();
}
