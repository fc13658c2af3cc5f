//! Exactly-once writes through the real CLI, under leader kills: `service update
//! --if-version` run in a loop against every manager of a 3-manager cluster while the leader
//! is killed again and again. Each command must succeed, report "outcome unknown" (exit 3),
//! or fail; a failure must mean the write did not happen, and a version conflict must be
//! reported only where the version really was written by someone else. Afterwards the
//! service's history (what is stored) is checked against the CLI's answers.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flotilla::ca::{load_node_files, tls};
use flotilla::control as api;
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::control as pb;
use flotilla::proto::objects::Service;
use procs::cluster::{Cluster, ClusterOptions};
use procs::run_to_end;

/// Leader kills during the run.
const LEADER_KILLS: usize = 6;
/// Writers, each updating its own service in a loop.
const WRITERS: usize = 4;
/// Exit code of a write whose outcome is unknown (`flotilla::cli::EXIT_OUTCOME_UNKNOWN`).
const EXIT_OUTCOME_UNKNOWN: i32 = flotilla::cli::EXIT_OUTCOME_UNKNOWN as i32;
/// Every this many commands, one is sent with a version known to be stale: a conflict is
/// then the right answer.
const STALE_EVERY: u64 = 5;

/// What the CLI answered to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// Exit 0, "updated to version N".
    Updated(u64),
    /// Exit 3.
    Unknown,
    /// Exit 1 with a version conflict (the code `Aborted`).
    Conflict,
    /// Exit 1 otherwise (a manager down, no leader for too long).
    Failed,
}

/// One command and what came of it.
#[derive(Debug)]
struct Attempt {
    number: u64,
    /// The version sent with `--if-version`.
    if_version: u64,
    /// Whether that version was known to be stale when sent.
    stale: bool,
    answer: Answer,
    output: String,
    /// Whether the service showed this attempt's label right after the answer.
    visible_after: bool,
}

/// Reads services with a manager's identity, through whichever manager answers.
struct Reader {
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
    addrs: Vec<String>,
}

impl Reader {
    fn new(node_dir: &Path, addrs: Vec<String>) -> Reader {
        let (identity, root) = load_node_files(node_dir).unwrap();
        Reader {
            transport: Transport::start(TransportConfig::default()).unwrap(),
            tls: Arc::new(tls::client_config(&identity, &root).unwrap()),
            addrs,
        }
    }

    /// The service `name`, read linearizably from the first manager that answers.
    fn service(&self, name: &str) -> Service {
        for _ in 0..300 {
            for addr in &self.addrs {
                let reply: Result<pb::ServiceResponse, _> =
                    self.transport.channel(addr, &self.tls).unary(
                        api::GET_SERVICE,
                        &pb::GetServiceRequest {
                            reference: name.to_string(),
                        },
                        CallOptions::timeout(Duration::from_secs(3)),
                    );
                if let Ok(reply) = reply {
                    return reply.service.unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no manager answered a read of {name}");
    }
}

fn version_of(service: &Service) -> u64 {
    service.meta.as_ref().unwrap().version
}

fn attempt_label(service: &Service) -> Option<u64> {
    service
        .spec
        .as_ref()?
        .labels
        .get("attempt")
        .and_then(|v| v.parse().ok())
}

/// Runs `flotilla service update NAME --if-version V --label attempt=N` through `manager`.
fn update(
    state_dir: &Path,
    manager: &str,
    name: &str,
    if_version: u64,
    number: u64,
) -> (Answer, String) {
    let (dir, version, label) = (
        state_dir.to_str().unwrap().to_string(),
        if_version.to_string(),
        format!("attempt={number}"),
    );
    let args = [
        "service",
        "--state-dir",
        &dir,
        "--manager",
        manager,
        "update",
        "--detach",
        name,
        "--if-version",
        &version,
        "--label",
        &label,
    ];
    let (status, output) = run_to_end(&args, Duration::from_secs(300));
    let answer = match status.code() {
        Some(0) => Answer::Updated(
            output
                .lines()
                .find_map(|l| l.split("updated to version ").nth(1))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no version in:\n{output}")),
        ),
        Some(EXIT_OUTCOME_UNKNOWN) => Answer::Unknown,
        // The CLI prints the status code's name: the test reads what a user reads.
        Some(1) if output.contains("Aborted") => Answer::Conflict,
        Some(1) => Answer::Failed,
        other => panic!("flotilla service update exited with {other:?}:\n{output}"),
    };
    (answer, output)
}

/// Sends updates of service `name` until `stop`, each with the version the service is known
/// to be at (every fifth with one known to be stale), and records the answers.
fn run_updates(
    state_dir: PathBuf,
    addrs: Vec<String>,
    name: &str,
    reader: &Reader,
    stop: &AtomicBool,
) -> Vec<Attempt> {
    let mut attempts = Vec::new();
    let mut known = version_of(&reader.service(name));
    let mut number = 0u64;
    while !stop.load(Ordering::Acquire) {
        number += 1;
        let stale = number.is_multiple_of(STALE_EVERY);
        // A version below the current one: the service was written at `known` since.
        let if_version = if stale { known - 1 } else { known };
        let manager = &addrs[number as usize % addrs.len()];
        let (answer, output) = update(&state_dir, manager, name, if_version, number);
        if answer == Answer::Unknown {
            // Let a proposal the leader still holds commit before looking (the read is
            // linearizable; this only spares it a race with an entry not yet committed).
            std::thread::sleep(Duration::from_secs(1));
        }
        let now = reader.service(name);
        let visible_after = attempt_label(&now) == Some(number);
        known = match &answer {
            Answer::Updated(version) => *version,
            // Nothing else writes the service: what is stored now is the truth.
            Answer::Unknown | Answer::Conflict | Answer::Failed => version_of(&now),
        };
        attempts.push(Attempt {
            number,
            if_version,
            stale,
            answer,
            output,
            visible_after,
        });
    }
    attempts
}

#[test]
fn updates_under_leader_kills_are_answered_truthfully() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let client = cluster.client();
    let state_dir = cluster.managers[0].dir.clone();
    let addrs = cluster.addrs();
    let dir = state_dir.to_str().unwrap().to_string();
    let names: Vec<String> = (0..WRITERS).map(|w| format!("web{w}")).collect();
    for name in &names {
        let (created, output) = run_to_end(
            &[
                "service",
                "--state-dir",
                &dir,
                "--manager",
                &addrs[1],
                "create",
                "--detach",
                "--name",
                name,
                "--replicas",
                "0",
                "sleep",
                "1000",
            ],
            Duration::from_secs(60),
        );
        assert!(created.success(), "{output}");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = names
        .iter()
        .enumerate()
        .map(|(w, name)| {
            let (stop, state_dir, name) = (stop.clone(), state_dir.clone(), name.clone());
            // Each writer starts on another manager.
            let mut addrs = addrs.clone();
            let turn = w % addrs.len();
            addrs.rotate_left(turn);
            std::thread::spawn(move || {
                let reader = Reader::new(&state_dir.join("node"), addrs.clone());
                let attempts = run_updates(state_dir, addrs, &name, &reader, &stop);
                reader.transport.shutdown();
                attempts
            })
        })
        .collect();
    // How often a retry met its own first attempt, in the logs (a figure, not asserted).
    let repeats_in = |manager: &mut procs::cluster::ManagerProc| {
        manager
            .proc()
            .output()
            .matches("answering a repeated request")
            .count()
    };
    let mut repeats = 0;
    for _ in 0..LEADER_KILLS {
        std::thread::sleep(Duration::from_secs(2));
        let Some(leader) = cluster.leader_index(&client) else {
            continue;
        };
        // Killed right as it starts a forwarded write: the likeliest moment for the
        // follower to lose the answer of a write that commits.
        let manager = &mut cluster.managers[leader];
        let mark = manager.proc().mark();
        manager.proc().wait_for_after(
            mark,
            "control.UpdateService by node",
            Duration::from_secs(30),
        );
        repeats += repeats_in(manager);
        manager.kill();
        std::thread::sleep(Duration::from_secs(3));
        manager.restart();
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    let histories: Vec<Vec<Attempt>> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    repeats += cluster.managers.iter_mut().map(repeats_in).sum::<usize>();
    println!("FIGURE exactly_once_repeats_answered_from_the_table {repeats} (surviving logs)");

    let reader = Reader::new(&state_dir.join("node"), addrs);
    for (name, attempts) in names.iter().zip(&histories) {
        check(attempts, &reader.service(name));
    }
    reader.transport.shutdown();
    client.transport.shutdown();
}

/// Checks the CLI's answers against what the service shows.
fn check(attempts: &[Attempt], last: &Service) {
    let count = |wanted: fn(&Answer) -> bool| attempts.iter().filter(|a| wanted(&a.answer)).count();
    println!(
        "FIGURE exactly_once_commands {} (updated {}, outcome unknown {}, conflicts {}, failed {})",
        attempts.len(),
        count(|a| matches!(a, Answer::Updated(_))),
        count(|a| *a == Answer::Unknown),
        count(|a| *a == Answer::Conflict),
        count(|a| *a == Answer::Failed),
    );
    assert!(
        count(|a| matches!(a, Answer::Updated(_))) > 5,
        "too few updates went through: {attempts:#?}"
    );
    let mut versions = Vec::new();
    for attempt in attempts {
        let what = format!("attempt {attempt:#?}");
        match &attempt.answer {
            Answer::Updated(version) => {
                assert!(!attempt.stale, "a stale version was accepted: {what}");
                assert!(*version > attempt.if_version, "{what}");
                versions.push(*version);
                assert!(
                    attempt.visible_after,
                    "reported updated, not stored: {what}"
                );
            }
            // A conflict only where the version sent had been written over by another
            // command; never for a write that happened (its own retry meeting it).
            Answer::Conflict => {
                assert!(
                    attempt.stale,
                    "a conflict reported for the current version: {what}"
                );
                assert!(
                    !attempt.visible_after,
                    "reported as a conflict, but written: {what}"
                );
            }
            // Failed means not done.
            Answer::Failed => {
                assert!(
                    !attempt.visible_after,
                    "reported failed, but written: {what}"
                );
            }
            // Either way is right; the message must say how to find out.
            Answer::Unknown => {
                assert!(
                    attempt.output.contains("outcome unknown")
                        && attempt.output.contains("flotilla service inspect"),
                    "{what}"
                );
                assert!(!attempt.stale || !attempt.visible_after, "{what}");
            }
        }
    }
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "versions reported out of order: {versions:?}"
    );
    // The stored service is the last write that happened.
    let last_written = attempts
        .iter()
        .rev()
        .find(|a| a.visible_after)
        .map(|a| a.number);
    assert_eq!(attempt_label(last), last_written, "{last:#?}");
    if let Some(version) = versions.last() {
        assert!(version_of(last) >= *version);
    }
}
