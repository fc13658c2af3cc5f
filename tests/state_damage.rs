//! A manager whose state directory was damaged never starts with less than it acknowledged:
//! every file of a stopped manager's state directory is damaged in turn (deleted, emptied,
//! cut in half, a block zeroed), and `flotilla run` must then either refuse with an error
//! that says what to do, or start with every acknowledged service. Also: a crash (`kill
//! -9`) is never mistaken for damage, `flotilla repair` starts a single manager over from
//! what is left, and `flotilla rejoin` brings a damaged manager of three back from the
//! others.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use procs::cluster::{Cluster, ClusterOptions};
use procs::{Proc, cli_in, cli_ok, eventually, free_addr, run_to_end};

const START: Duration = Duration::from_secs(30);
/// Services each test creates: every one was acknowledged, so every one must survive.
const SERVICES: usize = 12;
/// Bytes zeroed by the "zero a block" damage (one file system block).
const BLOCK_BYTES: u64 = 4096;

/// Files whose damage is not a loss of state: the process lock, the control socket, the
/// agent's task logs, fjall's own lock file.
fn is_runtime_file(relative: &Path) -> bool {
    let text = relative.to_string_lossy();
    text == "flotilla.lock"
        || text == "control.sock"
        || text.starts_with("tasks/")
        || text == "raft/log/lock"
}

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let relative = path.strip_prefix(root).unwrap().to_path_buf();
                if !is_runtime_file(&relative) {
                    out.push(relative);
                }
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Length of the file up to its last non-zero byte: fjall preallocates its journal with
/// zeros, so "half the file" must mean half of what was written.
fn data_len(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .rposition(|&b| b != 0)
        .map_or(0, |i| i as u64 + 1)
}

#[derive(Clone, Copy, Debug)]
enum Damage {
    Delete,
    Empty,
    CutInHalf,
    ZeroBlock,
}

/// Applies `damage` to `path`; `false` if it would change nothing (an empty file).
fn damage(path: &Path, damage: Damage) -> bool {
    use std::os::unix::fs::FileExt;
    let len = data_len(path);
    match damage {
        Damage::Delete => std::fs::remove_file(path).unwrap(),
        Damage::Empty => {
            if std::fs::metadata(path).unwrap().len() == 0 {
                return false;
            }
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
        Damage::CutInHalf => {
            if len < 2 {
                return false;
            }
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        }
        Damage::ZeroBlock => {
            if len == 0 {
                return false;
            }
            let at = (len / 2) / BLOCK_BYTES * BLOCK_BYTES;
            let zeros = vec![0u8; BLOCK_BYTES.min(len - at) as usize];
            std::fs::File::options()
                .write(true)
                .open(path)
                .unwrap()
                .write_all_at(&zeros, at)
                .unwrap();
        }
    }
    true
}

fn create_services(dir: &Path, names: &[String]) {
    for name in names {
        cli_ok(
            dir,
            &[
                "service",
                "create",
                "--detach",
                "--name",
                name,
                "--replicas",
                "0",
                "--",
                "/bin/true",
            ],
        );
    }
}

fn service_names(dir: &Path) -> Option<Vec<String>> {
    let (ok, output) = cli_in(dir, &["service", "ls", "--format", "json"]);
    if !ok {
        return None;
    }
    let mut names: Vec<String> = output
        .lines()
        .filter_map(|l| l.trim().strip_prefix("\"name\": \""))
        .map(|v| v.trim_end_matches("\",").trim_end_matches('"').to_string())
        .collect();
    names.sort();
    Some(names)
}

/// What one start of a damaged directory did.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Refused with an error that says what to do.
    Refused,
    /// Started, with every acknowledged service.
    StartedWhole,
}

/// Starts the manager in `dir`: it must refuse with guidance or start with `expected`.
/// `Err` says how it failed.
fn start_and_judge(dir: &Path, expected: &[String], case: &str) -> Result<Outcome, String> {
    let dir_arg = dir.to_str().unwrap();
    let mut proc = Proc::start("damaged", &["run", "--state-dir", dir_arg]);
    match proc.wait_for_or_exit("flotilla manager listening on", START) {
        Err(status) => {
            let output = proc.output();
            if status.success() {
                return Err(format!("{case}: exited 0 without starting:\n{output}"));
            }
            if output.contains("panicked") {
                return Err(format!("{case}: panicked:\n{output}"));
            }
            let Some(at) = output.find("error:") else {
                return Err(format!("{case}: no error line:\n{output}"));
            };
            let error = &output[at..];
            let lower = error.to_lowercase();
            let guided = ["restore", "rejoin", "repair", "delete", "stop"]
                .iter()
                .any(|hint| lower.contains(hint));
            if !guided {
                return Err(format!(
                    "{case}: the error does not say what to do: {error}"
                ));
            }
            Ok(Outcome::Refused)
        }
        Ok(_) => {
            eventually(&format!("{case}: service ls answers"), START, || {
                service_names(dir).is_some()
            });
            let names = service_names(dir).unwrap();
            let missing: Vec<&String> = expected.iter().filter(|n| !names.contains(n)).collect();
            proc.signal(15);
            let status = proc.wait_exit(START);
            if !missing.is_empty() {
                return Err(format!(
                    "{case}: started without {missing:?}, acknowledged before the damage"
                ));
            }
            if !status.success() {
                return Err(format!("{case}: {status:?}:\n{}", proc.output()));
            }
            Ok(Outcome::StartedWhole)
        }
    }
}

/// Starts a new single-manager cluster in `dir` that snapshots every
/// `snapshot_interval_entries` applied entries.
fn init_manager(dir: &Path, addr: &str, snapshot_interval_entries: u64) -> Proc {
    let interval = snapshot_interval_entries.to_string();
    let mut proc = Proc::start(
        "m1",
        &[
            "init",
            "--state-dir",
            dir.to_str().unwrap(),
            "--listen",
            addr,
            "--snapshot-interval-entries",
            &interval,
        ],
    );
    proc.wait_for("flotilla manager listening on", START);
    proc
}

fn service_list(count: usize, prefix: &str) -> Vec<String> {
    (1..=count).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn no_damaged_file_makes_a_manager_start_with_less_than_it_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let pristine = tmp.path().join("pristine");
    // Snapshots early, so that snapshot files are among the damaged ones.
    let mut proc = init_manager(&dir, &free_addr(), 5);
    let names = service_list(SERVICES, "s");
    create_services(&dir, &names);
    proc.signal(15);
    assert!(proc.wait_exit(START).success(), "{}", proc.output());
    drop(proc);
    copy_dir(&dir, &pristine);
    let files = files_under(&pristine);
    for must in ["manager.conf", "raft/watermark", "node/node.pem"] {
        assert!(
            files.iter().any(|f| f == Path::new(must)),
            "{must} not in {files:?}"
        );
    }
    assert!(
        files.iter().any(|f| f.starts_with("raft/snapshots")),
        "no snapshot file to damage: {files:?}"
    );
    let mut outcomes: BTreeMap<Outcome, Vec<String>> = BTreeMap::new();
    let mut failures = Vec::new();
    for file in &files {
        for kind in [
            Damage::Delete,
            Damage::Empty,
            Damage::CutInHalf,
            Damage::ZeroBlock,
        ] {
            copy_dir(&pristine, &dir);
            if !damage(&dir.join(file), kind) {
                continue;
            }
            let case = format!("{kind:?} {}", file.display());
            match start_and_judge(&dir, &names, &case) {
                Ok(outcome) => outcomes.entry(outcome).or_default().push(case),
                Err(failure) => failures.push(failure),
            }
        }
    }
    eprintln!("damage outcomes: {outcomes:#?}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The cases that lose acknowledged state if nothing stops them.
    let refused = &outcomes[&Outcome::Refused];
    for must_refuse in [
        "Empty raft/log/0.jnl",
        "Delete raft/watermark",
        "Delete manager.conf",
    ] {
        assert!(
            refused.iter().any(|c| c == must_refuse),
            "{must_refuse} was not refused: {outcomes:#?}"
        );
    }
}

#[test]
fn a_crash_is_never_mistaken_for_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let addr = free_addr();
    let mut proc = init_manager(&dir, &addr, 5);
    let mut acknowledged = Vec::new();
    for round in 0..4 {
        // Writes in flight when the process dies: a reply that arrived was acknowledged.
        let writer = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut done = Vec::new();
                for i in 0..40 {
                    let name = format!("r{round}x{i}");
                    let (ok, _) = cli_in(
                        &dir,
                        &[
                            "service",
                            "create",
                            "--detach",
                            "--name",
                            &name,
                            "--replicas",
                            "0",
                            "--",
                            "/bin/true",
                        ],
                    );
                    if !ok {
                        break;
                    }
                    done.push(name);
                }
                done
            })
        };
        std::thread::sleep(Duration::from_millis(300 + 250 * round));
        proc.kill();
        acknowledged.extend(writer.join().unwrap());
        let mut restarted = Proc::start("m1", &["run", "--state-dir", dir.to_str().unwrap()]);
        match restarted.wait_for_or_exit("flotilla manager listening on", START) {
            Ok(_) => {}
            Err(status) => panic!(
                "round {round}: a crash was taken for damage ({status:?}):\n{}",
                restarted.output()
            ),
        }
        eventually("service ls answers", START, || {
            service_names(&dir).is_some()
        });
        let names = service_names(&dir).unwrap();
        for name in &acknowledged {
            assert!(names.contains(name), "round {round}: lost {name}");
        }
        proc = restarted;
    }
    assert!(acknowledged.len() > 10, "too few writes: {acknowledged:?}");
    proc.signal(15);
    assert!(proc.wait_exit(START).success());
}

#[test]
fn repair_starts_a_single_manager_over_from_what_is_left_only_when_told() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let dir_arg = dir.to_str().unwrap().to_string();
    // No snapshot: every write is in the journal only, so cutting it loses some for sure.
    let mut proc = init_manager(&dir, &free_addr(), 100_000);
    let names = service_list(SERVICES, "s");
    create_services(&dir, &names);
    proc.signal(15);
    assert!(proc.wait_exit(START).success());
    drop(proc);

    // Whole: repair changes nothing and says so.
    let (status, output) = run_to_end(&["repair", "--state-dir", &dir_arg], START);
    assert!(status.success(), "{output}");
    assert!(output.contains("whole"), "{output}");

    let journal = dir.join("raft/log/0.jnl");
    let cut = data_len(&journal) / 2;
    std::fs::File::options()
        .write(true)
        .open(&journal)
        .unwrap()
        .set_len(cut)
        .unwrap();
    let (status, output) = run_to_end(&["run", "--state-dir", &dir_arg], START);
    assert!(!status.success(), "started damaged:\n{output}");
    assert!(output.contains("flotilla repair"), "{output}");

    // Without --accept-loss: a diagnosis, non-zero, nothing changed.
    let before = std::fs::read(dir.join("raft/watermark")).unwrap();
    let (status, output) = run_to_end(&["repair", "--state-dir", &dir_arg], START);
    assert!(!status.success(), "{output}");
    assert!(output.contains("--accept-loss"), "{output}");
    assert_eq!(std::fs::read(dir.join("raft/watermark")).unwrap(), before);

    let (status, output) = run_to_end(&["repair", "--state-dir", &dir_arg, "--accept-loss"], START);
    assert!(status.success(), "{output}");
    let mut proc = Proc::start("m1", &["run", "--state-dir", &dir_arg]);
    proc.wait_for("flotilla manager listening on", START);
    eventually("service ls answers", START, || {
        service_names(&dir).is_some()
    });
    // It runs, and takes writes again; what it kept is a prefix of what was created.
    let kept = service_names(&dir).unwrap();
    assert!(kept.len() < SERVICES, "nothing was lost? {kept:?}");
    create_services(&dir, &["after".to_string()]);
    assert!(service_names(&dir).unwrap().contains(&"after".to_string()));
    proc.signal(15);
    assert!(proc.wait_exit(START).success());
    // A second process on the same directory is refused with a clear error.
    let _running = {
        let mut p = Proc::start("m1", &["run", "--state-dir", &dir_arg]);
        p.wait_for("flotilla manager listening on", START);
        p
    };
    let (status, output) = run_to_end(&["run", "--state-dir", &dir_arg], START);
    assert!(!status.success());
    assert!(
        output.contains("in use by another flotilla process"),
        "{output}"
    );
}

#[test]
fn rejoin_brings_a_damaged_manager_back_from_the_others() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let first = cluster.managers[0].dir.clone();
    let names = service_list(4, "c");
    create_services(&first, &names);
    let victim = 2;
    let victim_dir = cluster.managers[victim].dir.clone();
    let victim_addr = cluster.managers[victim].addr.clone();
    let old_listing = cli_ok(&first, &["manager", "ls", "--format", "json"]);
    let old_raft_id = procs::raft_id_of(&old_listing, &victim_addr);
    cluster.managers[victim].stop();
    std::fs::File::options()
        .write(true)
        .open(victim_dir.join("raft/log/0.jnl"))
        .unwrap()
        .set_len(0)
        .unwrap();
    let victim_arg = victim_dir.to_str().unwrap().to_string();
    let (status, output) = run_to_end(&["run", "--state-dir", &victim_arg], START);
    assert!(!status.success(), "started damaged:\n{output}");
    assert!(output.contains("flotilla rejoin"), "{output}");

    let token = cli_ok(&first, &["join-token", "manager"]);
    let token = token
        .split_whitespace()
        .find(|w| w.starts_with("FLT-1-"))
        .unwrap()
        .to_string();
    let mut rejoined = Proc::start(
        "rejoined",
        &[
            "rejoin",
            "--state-dir",
            &victim_arg,
            "--token",
            &token,
            &cluster.managers[0].addr,
        ],
    );
    rejoined.wait_for("flotilla manager listening on", START);
    let aside: Vec<_> = std::fs::read_dir(&victim_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("raft.damaged-"))
        .collect();
    assert_eq!(aside.len(), 1, "the damaged Raft files are kept");
    eventually("the rejoined manager is a voter again", START, || {
        let listing = cli_ok(&first, &["manager", "ls", "--format", "json"]);
        listing.contains(&format!("\"addr\": \"{victim_addr}\""))
            && procs::raft_id_of(&listing, &victim_addr) != old_raft_id
            && !listing.contains(&format!("\"id\": \"{old_raft_id}\""))
            && listing.matches("\"role\"").count() == 3
            && !listing.contains("\"learner\"")
    });
    // It holds the cluster's state again, read through itself.
    eventually("the rejoined manager caught up", START, || {
        service_names(&victim_dir).is_some_and(|n| names.iter().all(|s| n.contains(s)))
    });
    cluster.managers[victim].proc = Some(rejoined);
}

#[test]
fn up_never_builds_a_new_cluster_over_a_damaged_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    let dir_arg = dir.to_str().unwrap().to_string();
    let mut proc = init_manager(&dir, &free_addr(), 100_000);
    create_services(&dir, &service_list(3, "s"));
    proc.signal(15);
    assert!(proc.wait_exit(START).success());
    drop(proc);
    std::fs::remove_file(dir.join("manager.conf")).unwrap();
    let identity = std::fs::read(dir.join("node/node.pem")).unwrap();
    let watermark = std::fs::read(dir.join("raft/watermark")).unwrap();
    let (status, output) = run_to_end(
        &["up", "--state-dir", &dir_arg, "--listen", &free_addr()],
        START,
    );
    assert!(!status.success(), "{output}");
    assert!(
        output.contains("manager.conf") && output.contains("restore"),
        "{output}"
    );
    assert!(!output.contains("afresh"), "{output}");
    // Nothing was replaced or removed: the identity, the watermark and the log stay.
    assert_eq!(std::fs::read(dir.join("node/node.pem")).unwrap(), identity);
    assert_eq!(
        std::fs::read(dir.join("raft/watermark")).unwrap(),
        watermark
    );
    assert!(dir.join("raft/log").exists());
    assert!(!dir.join("manager.conf").exists());
}
