//! The switch to a new generation of the Raft log database, crashed at each of its steps by
//! a real process: a child (this test binary re-executed) writes and acknowledges entries,
//! snapshots and compacts them, and the writer switches generations, where an injected
//! fault aborts the process (no destructor runs, as in a crash). The test then reopens the
//! storage and checks that every acknowledged entry and the hard state are there, that the
//! leftover generation is gone, and that a later switch works from there.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use flotilla::raft::storage::generation::SwitchCrash;
use flotilla::raft::storage::{
    AppendRequest, LogBounds, LogHandle, LogStore, StorageConfig, WriterEvent,
};
use flotilla::raft::types::{Entry, EntryKind, HardState, LogIndex, SnapshotMeta};

const CHILD_DIR_ENV: &str = "FLOTILLA_GENERATION_CHILD_DIR";
const CHILD_CRASH_ENV: &str = "FLOTILLA_GENERATION_CHILD_CRASH";
/// Entries per request, requests per child run.
const REQUEST_ENTRIES: u64 = 100;
const REQUESTS: u64 = 20;
/// The child snapshots this far behind its last entry and keeps this many entries below.
const SNAPSHOT_LAG_ENTRIES: u64 = 10;
const TRAILING_ENTRIES_KEPT: u64 = 30;

fn config(crash: Option<SwitchCrash>) -> StorageConfig {
    StorageConfig {
        trailing_entries_kept: TRAILING_ENTRIES_KEPT,
        log_idle_after_ms: 0,
        generation_switch_bytes_min: 256 << 10,
        crash_in_switch: crash,
        ..StorageConfig::default()
    }
}

fn entry(index: LogIndex, term: u64) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Normal,
        data: Bytes::from(format!("{index}/{term}/{}", "x".repeat(500))),
    }
}

fn crash_from_name(name: &str) -> Option<SwitchCrash> {
    match name {
        "partial" => Some(SwitchCrash::AfterPartialCopy),
        "before-pointer" => Some(SwitchCrash::BeforePointer),
        "after-pointer" => Some(SwitchCrash::AfterPointer),
        _ => None,
    }
}

/// Harness entry point, not a test: it does nothing unless this binary was re-executed as
/// the child.
#[test]
fn generation_child_entry_point() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let crash = crash_from_name(&std::env::var(CHILD_CRASH_ENV).unwrap_or_default());
    let _ = env_logger::builder()
        .filter_level(log::LevelFilter::Info)
        .try_init();
    run_child(Path::new(&dir), crash);
}

/// Appends `REQUESTS` requests after what is there (term 2 + the run's number of
/// generations), prints `ACKED <last> <commit>` once all are durable, snapshots and
/// compacts, then waits for the switch (or the injected crash) and prints `SWITCHED`.
fn run_child(dir: &Path, crash: Option<SwitchCrash>) {
    let config = config(crash);
    let (store, recovered) = LogStore::open(dir, &config).unwrap();
    let (mut handle, events) = LogHandle::start(store, &recovered, &config).unwrap();
    let term = recovered.hard_state.term + 1;
    let mut seq = 0;
    for _ in 0..REQUESTS {
        let start = handle.last_index() + 1;
        let last = start + REQUEST_ENTRIES - 1;
        seq = handle
            .submit(AppendRequest {
                truncate_from: None,
                entries: (start..=last).map(|i| entry(i, term)).collect(),
                hard_state: Some(HardState {
                    term,
                    vote: 1,
                    commit: start - 1,
                }),
            })
            .unwrap();
    }
    loop {
        match events.recv().unwrap() {
            WriterEvent::Durable(d) => {
                handle.on_durable(&d);
                if d.seq == seq {
                    println!("ACKED {} {} {term}", d.last_index, d.hard_state.commit);
                    break;
                }
            }
            WriterEvent::Fatal(e) => panic!("{e}"),
        }
    }
    let index = handle.last_index() - SNAPSHOT_LAG_ENTRIES;
    let meta = SnapshotMeta {
        index,
        term,
        membership: Default::default(),
    };
    let mut builder = handle.store().snapshots().create(meta).unwrap();
    builder.write_chunk(0, b"state").unwrap();
    builder.finish().unwrap();
    let before = handle.store().log_dir();
    handle.compact(index).unwrap();
    for _ in 0..3000 {
        if handle.store().log_dir() != before {
            println!("SWITCHED {}", handle.store().log_dir().display());
            handle.shutdown().unwrap();
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no switch within 30 s");
}

/// Runs a child to its end (or its crash); returns `(last acknowledged index, commit,
/// term, switched)`.
fn run(dir: &Path, crash: &str) -> (LogIndex, LogIndex, u64, bool) {
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "generation_child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_CRASH_ENV, crash)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let (mut acked, mut switched) = (None, false);
    for line in BufReader::new(output.stdout.as_slice()).lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [.., "ACKED", last, commit, term] => {
                acked = Some((
                    last.parse().unwrap(),
                    commit.parse().unwrap(),
                    term.parse().unwrap(),
                ))
            }
            [.., "SWITCHED", _] => switched = true,
            _ => {}
        }
    }
    let (last, commit, term) = acked.expect("the child acknowledged its writes");
    if crash.is_empty() {
        assert!(output.status.success(), "the child failed: {output:?}");
    } else {
        assert!(
            !output.status.success(),
            "the injected crash did not happen"
        );
    }
    (last, commit, term, switched)
}

fn log_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("log") || n.starts_with(".log"))
        .collect();
    names.sort();
    names
}

/// Reopens the storage and checks it holds everything acknowledged: returns the bounds.
fn check_everything_acknowledged_is_there(
    dir: &Path,
    last: LogIndex,
    commit: LogIndex,
    term: u64,
) -> LogBounds {
    let (store, recovered) = LogStore::open(dir, &config(None)).unwrap();
    assert_eq!(
        recovered.hard_state,
        HardState {
            term,
            vote: 1,
            commit
        }
    );
    let bounds = recovered.bounds;
    assert_eq!((bounds.last_index, bounds.last_term), (last, term));
    assert!(bounds.first_index <= last - SNAPSHOT_LAG_ENTRIES - TRAILING_ENTRIES_KEPT + 1);
    let entries = store
        .entries(bounds.first_index..last + 1, u64::MAX)
        .unwrap();
    assert_eq!(entries.len() as u64, last + 1 - bounds.first_index);
    for e in entries {
        assert_eq!(e, entry(e.index, e.term), "entry {} intact", e.index);
    }
    bounds
}

fn crash_at_then_recover(crash: &str, expected_after_crash: &[&str], current: &str) {
    let dir = tempfile::tempdir().unwrap();
    // A first run without a fault: the log moves to generation 1.
    let (last, commit, term, switched) = run(dir.path(), "");
    assert!(switched);
    assert_eq!(log_names(dir.path()), ["log.current", "log.gen-1"]);
    check_everything_acknowledged_is_there(dir.path(), last, commit, term);
    // The second run crashes while moving it to generation 2.
    let (last, commit, term, switched) = run(dir.path(), crash);
    assert!(!switched);
    assert_eq!(
        log_names(dir.path()),
        expected_after_crash,
        "what the crash left"
    );
    check_everything_acknowledged_is_there(dir.path(), last, commit, term);
    assert_eq!(
        log_names(dir.path()),
        ["log.current", current],
        "the leftover is gone"
    );
    assert_eq!(
        fs::read_to_string(dir.path().join("log.current")).unwrap(),
        format!("{current}\n")
    );
    // And the next switch works from there.
    let (last, commit, term, switched) = run(dir.path(), "");
    assert!(switched);
    check_everything_acknowledged_is_there(dir.path(), last, commit, term);
    assert_eq!(log_names(dir.path()).len(), 2);
}

#[test]
fn a_crash_in_the_middle_of_the_copy_keeps_the_old_generation() {
    crash_at_then_recover(
        "partial",
        &["log.current", "log.gen-1", "log.gen-2"],
        "log.gen-1",
    );
}

#[test]
fn a_crash_before_the_pointer_moves_keeps_the_old_generation() {
    crash_at_then_recover(
        "before-pointer",
        &["log.current", "log.gen-1", "log.gen-2"],
        "log.gen-1",
    );
}

#[test]
fn a_crash_after_the_pointer_moved_keeps_the_new_generation() {
    crash_at_then_recover(
        "after-pointer",
        &["log.current", "log.gen-1", "log.gen-2"],
        "log.gen-2",
    );
}

#[test]
fn a_damaged_or_missing_generation_is_refused_never_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    let (last, ..) = run(dir.path(), "");
    assert!(last > 0);
    let pointer = dir.path().join("log.current");
    // A pointer cut short names nothing: refused.
    fs::write(&pointer, b"log.gen").unwrap();
    let error = LogStore::open(dir.path(), &config(None)).unwrap_err();
    assert!(
        error.to_string().contains("log.current is damaged"),
        "{error}"
    );
    // A pointer naming a generation that is gone: refused, and nothing is created.
    fs::write(&pointer, b"log.gen-9\n").unwrap();
    let error = LogStore::open(dir.path(), &config(None)).unwrap_err();
    assert!(error.to_string().contains("missing"), "{error}");
    assert!(dir.path().join("log.gen-1").exists(), "nothing was deleted");
    assert!(!dir.path().join("log.gen-9").exists());
}
