//! Crash harness for Raft storage: a child process appends, truncates, snapshots and
//! compacts, printing every request before it submits it and every acknowledgement it
//! receives; the test SIGKILLs it at random moments and checks, after each kill, that the
//! recovered log and hard state are exactly what some prefix of the submitted requests
//! produces, and that this prefix includes every acknowledged request: nothing
//! acknowledged is lost, no gap, no stale suffix, entries and hard state of one request
//! never split.
//!
//! Default: 200 rounds. `FLOTILLA_CRASH_ROUNDS=5000 cargo test --release --test
//! storage_crash` runs more; `FLOTILLA_CRASH_SEED` fixes the seed.
//!
//! The child is this test binary re-executed with `FLOTILLA_CRASH_CHILD_DIR` set, running
//! only `crash_child_entry_point`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use flotilla::raft::storage::{AppendRequest, LogHandle, LogStore, StorageConfig, WriterEvent};
use flotilla::raft::types::{Entry, EntryKind, HardState, LogIndex, SnapshotMeta, Term};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

const CHILD_DIR_ENV: &str = "FLOTILLA_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "FLOTILLA_CRASH_CHILD_SEED";
const ROUNDS_ENV: &str = "FLOTILLA_CRASH_ROUNDS";
const SEED_ENV: &str = "FLOTILLA_CRASH_SEED";
const ROUNDS_DEFAULT: u64 = 200;
/// Requests the child keeps in flight before it waits for an acknowledgement.
const CHILD_IN_FLIGHT_MAX: u64 = 8;
/// The longest the test lets a child run before killing it.
const KILL_DELAY_MS_MAX: u64 = 60;
/// How far back (in entries from the durable end) the child snapshots.
const SNAPSHOT_LAG_ENTRIES: u64 = 50;
/// The child snapshots once its log is this long.
const SNAPSHOT_LOG_ENTRIES_MIN: u64 = 1500;

fn config() -> StorageConfig {
    StorageConfig {
        // Small tables and rounds so that flushes, journal rotation, compaction and
        // switches to a new generation of the log database all happen within a few rounds.
        memtable_bytes_max: 1 << 20,
        log_idle_after_ms: 0,
        generation_switch_bytes_min: 256 << 10,
        compaction_round_entries_max: 200,
        trailing_entries_kept: 300,
        request_queue_len_max: 16,
        ..StorageConfig::default()
    }
}

fn payload(index: LogIndex, term: Term) -> Bytes {
    let mut data = format!("{index}/{term}/").into_bytes();
    let len = 16 + ((index * 31 + term * 7) % 300) as usize;
    while data.len() < len {
        data.push(b'a' + (data.len() % 26) as u8);
    }
    Bytes::from(data)
}

fn entry(index: LogIndex, term: Term) -> Entry {
    Entry {
        term,
        index,
        kind: EntryKind::Normal,
        data: payload(index, term),
    }
}

/// Harness entry point, not a test: it does nothing unless this binary was re-executed as
/// the crash child.
#[test]
fn crash_child_entry_point() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_ENV).unwrap().parse().unwrap();
    run_child(Path::new(&dir), seed);
}

fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    out.write_fmt(line).unwrap();
    out.write_all(b"\n").unwrap();
    out.flush().unwrap();
}

fn run_child(dir: &Path, seed: u64) -> ! {
    let config = config();
    let (store, recovered) = LogStore::open(dir, &config).unwrap();
    let snapshot_index = recovered.snapshot.as_ref().map_or(0, |s| s.meta.index);
    let (mut handle, events) = LogHandle::start(store, &recovered, &config).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut term = recovered.hard_state.term.max(handle.last_term()).max(1);
    // Entries at or below `commit` are never truncated (they are "committed").
    let mut commit = recovered.hard_state.commit.max(snapshot_index);
    let mut last_snapshot = snapshot_index;
    let mut acked = 0u64;
    let mut submitted = 0u64;
    let mut durable_last = handle.last_index();
    say(format_args!("READY"));
    loop {
        // Collect acknowledgements; wait for one when too many are in flight.
        loop {
            let event = if submitted - acked >= CHILD_IN_FLIGHT_MAX {
                events.recv().ok()
            } else {
                events.try_recv().ok()
            };
            match event {
                Some(WriterEvent::Durable(d)) => {
                    handle.on_durable(&d);
                    acked = d.seq;
                    durable_last = d.last_index;
                    say(format_args!("ACK {}", d.seq));
                }
                Some(WriterEvent::Fatal(e)) => panic!("{e}"),
                None => break,
            }
        }
        let roll = rng.random_range(0..100u32);
        if roll < 3
            && acked == submitted
            && durable_last >= handle.first_index() + SNAPSHOT_LOG_ENTRIES_MIN
        {
            // Snapshot everything durable but the last few entries, then compact behind it.
            let index = durable_last - SNAPSHOT_LAG_ENTRIES;
            if index > last_snapshot {
                let meta = SnapshotMeta {
                    index,
                    term: handle.term(index).unwrap(),
                    membership: Default::default(),
                };
                commit = commit.max(index);
                // Announced before the file exists: the kill may land anywhere after.
                say(format_args!("SNAP {} {}", meta.index, meta.term));
                let mut builder = handle.store().snapshots().create(meta.clone()).unwrap();
                builder
                    .write_chunk(0, format!("state {index}").as_bytes())
                    .unwrap();
                builder.finish().unwrap();
                last_snapshot = index;
                handle.compact(index).unwrap();
            }
            continue;
        }
        // Installs wait for earlier writes to be acknowledged, so that every crash state is
        // a prefix of the request sequence (see `LogHandle::snapshot_installed` for the
        // other case).
        if roll == 99 && acked == submitted {
            // A snapshot received from a leader far ahead: install it, then restart the
            // log after it.
            term += 1;
            let index = handle.last_index() + rng.random_range(1..100);
            let meta = SnapshotMeta {
                index,
                term,
                membership: Default::default(),
            };
            submitted += 1;
            say(format_args!("INSTALL {submitted} {index} {term}"));
            let mut builder = handle.store().snapshots().create(meta.clone()).unwrap();
            for piece in 0..4u8 {
                builder
                    .write_chunk(u64::from(piece) * 1000, &[piece; 1000])
                    .unwrap();
            }
            builder.finish().unwrap();
            let seq = handle.snapshot_installed(&meta).unwrap();
            assert_eq!(seq, submitted);
            commit = index;
            last_snapshot = index;
            continue;
        }
        let last = handle.last_index();
        let (truncate_from, start) = if roll < 12 && last > commit {
            term += 1;
            let from = rng.random_range(commit + 1..=last);
            (Some(from), from)
        } else {
            (None, last + 1)
        };
        let count = rng.random_range(if truncate_from.is_some() {
            0..=20
        } else {
            1..=40
        });
        commit = commit.max(
            last.saturating_sub(rng.random_range(10..200))
                .min(start - 1),
        );
        let hard_state = HardState {
            term,
            vote: 1,
            commit,
        };
        submitted += 1;
        say(format_args!(
            "SUB {submitted} {} {start} {count} {term} {commit}",
            truncate_from.map_or("-".to_string(), |t| t.to_string())
        ));
        let seq = handle
            .submit(AppendRequest {
                truncate_from,
                entries: (start..start + count).map(|i| entry(i, term)).collect(),
                hard_state: Some(hard_state),
            })
            .unwrap();
        assert_eq!(seq, submitted);
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Sub {
    seq: u64,
    truncate_from: Option<LogIndex>,
    start: LogIndex,
    count: u64,
    term: Term,
    commit: LogIndex,
    /// An installed snapshot `(index, term)` instead of an append.
    install: Option<(LogIndex, Term)>,
}

/// What the test believes is on disk: the term of every index (1-based) and the hard state.
#[derive(Clone, Debug, Default)]
struct Model {
    terms: Vec<Term>,
    hard_state: HardState,
}

impl Model {
    fn apply(&mut self, sub: &Sub) {
        if let Some((index, term)) = sub.install {
            // The log restarts after the snapshot; the slots up to it only carry the
            // snapshot's term for the boundary check.
            self.terms.truncate(index as usize);
            self.terms.resize(index as usize, term);
            return;
        }
        if let Some(from) = sub.truncate_from {
            self.terms.truncate(from as usize - 1);
        }
        assert_eq!(
            self.terms.len() as u64 + 1,
            sub.start,
            "the child submits contiguous entries"
        );
        self.terms
            .extend(std::iter::repeat_n(sub.term, sub.count as usize));
        self.hard_state = HardState {
            term: sub.term,
            vote: 1,
            commit: sub.commit,
        };
    }
}

fn parse(lines: &[String]) -> (Vec<Sub>, u64, Vec<(LogIndex, Term)>) {
    let (mut subs, mut acked, mut snaps) = (Vec::new(), 0, Vec::new());
    for line in lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["SUB", seq, from, start, count, term, commit] => subs.push(Sub {
                seq: seq.parse().unwrap(),
                truncate_from: from.parse().ok(),
                start: start.parse().unwrap(),
                count: count.parse().unwrap(),
                term: term.parse().unwrap(),
                commit: commit.parse().unwrap(),
                install: None,
            }),
            ["INSTALL", seq, index, term] => {
                let at = (index.parse().unwrap(), term.parse().unwrap());
                snaps.push(at);
                subs.push(Sub {
                    seq: seq.parse().unwrap(),
                    truncate_from: None,
                    start: 0,
                    count: 0,
                    term: at.1,
                    commit: at.0,
                    install: Some(at),
                });
            }
            ["ACK", seq] => acked = acked.max(seq.parse().unwrap()),
            ["SNAP", index, term] => snaps.push((index.parse().unwrap(), term.parse().unwrap())),
            _ => {}
        }
    }
    (subs, acked, snaps)
}

/// Runs one child until a random kill; returns its complete output lines.
fn run_round(dir: &Path, seed: u64, kill_after: Duration) -> Vec<String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "crash_child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let reader = std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::new();
        let mut line = String::new();
        // Only whole lines count: the kill can cut the last one anywhere.
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            if !line.ends_with('\n') {
                break;
            }
            // libtest prints "test crash_child_entry_point ... " before the body runs.
            if line.ends_with("READY\n") {
                let _ = ready_tx.try_send(());
            }
            lines.push(std::mem::take(&mut line));
        }
        lines
    });
    let ready = ready_rx.recv_timeout(Duration::from_secs(60));
    if ready.is_ok() {
        std::thread::sleep(kill_after);
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    let lines = reader.join().unwrap();
    assert!(
        ready.is_ok(),
        "the child never became ready ({status}); its last lines: {:?}",
        &lines[lines.len().saturating_sub(10)..]
    );
    lines
}

/// Checks the recovered state against every state the submitted requests could have left,
/// from the last acknowledged one on; returns the matching model.
fn verify(
    dir: &Path,
    model: &Model,
    lines: &[String],
    snapshots: &mut Vec<(LogIndex, Term)>,
) -> Model {
    let (subs, acked, snaps) = parse(lines);
    snapshots.extend(snaps);
    let (store, recovered) = LogStore::open(dir, &config()).unwrap();
    assert!(
        recovered.corrupt_snapshots.is_empty(),
        "{:?}",
        recovered.corrupt_snapshots
    );
    let bounds = recovered.bounds;
    if let Some(snapshot) = &recovered.snapshot {
        let at = (snapshot.meta.index, snapshot.meta.term);
        assert!(snapshots.contains(&at), "unknown snapshot {at:?}");
        assert!(bounds.first_index <= at.0 + 1);
    }
    let log = if bounds.first_index <= bounds.last_index {
        store
            .entries(bounds.first_index..bounds.last_index + 1, u64::MAX)
            .unwrap()
    } else {
        Vec::new()
    };
    drop(store);
    for e in &log {
        assert_eq!(
            e.data,
            payload(e.index, e.term),
            "entry {} content",
            e.index
        );
    }
    let matches = |candidate: &Model| {
        candidate.terms.len() as u64 == bounds.last_index
            && candidate.hard_state == recovered.hard_state
            && (bounds.first_index == 1
                || candidate.terms[bounds.first_index as usize - 2] == bounds.prev_term)
            && log
                .iter()
                .all(|e| candidate.terms[e.index as usize - 1] == e.term)
    };
    let mut candidate = model.clone();
    let mut tried = Vec::new();
    for sub in std::iter::once(None).chain(subs.iter().map(Some)) {
        if let Some(sub) = sub {
            candidate.apply(sub);
        }
        let seq = sub.map_or(0, |s| s.seq);
        if seq >= acked {
            if matches(&candidate) {
                return candidate;
            }
            tried.push((seq, candidate.terms.len(), candidate.hard_state));
        }
    }
    panic!(
        "recovered log {}..={} (last term {}), hard state {:?} matches no state from the \
         last acknowledged request {acked} on; tried (seq, last index, hard state): {tried:?}",
        bounds.first_index, bounds.last_index, bounds.last_term, recovered.hard_state
    );
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if std::env::var(CHILD_DIR_ENV).is_ok() {
        return;
    }
    let rounds: u64 = std::env::var(ROUNDS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS_DEFAULT);
    let seed: u64 = std::env::var(SEED_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash harness: {rounds} rounds, {SEED_ENV}={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::default();
    let mut snapshots = Vec::new();
    let (mut acked_total, mut truncations, mut installs) = (0u64, 0usize, 0usize);
    let mut switch_rounds = 0usize;
    for round in 0..rounds {
        let kill_after = Duration::from_millis(rng.random_range(0..=KILL_DELAY_MS_MAX));
        let lines = run_round(dir.path(), rng.random(), kill_after);
        // A new generation's directory, current or left by the kill, before recovery.
        switch_rounds += usize::from(std::fs::read_dir(dir.path()).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("log.gen-")
        }));
        let (subs, acked, _) = parse(&lines);
        acked_total += acked;
        truncations += subs.iter().filter(|s| s.truncate_from.is_some()).count();
        installs += subs.iter().filter(|s| s.install.is_some()).count();
        model =
            std::panic::catch_unwind(|| verify(dir.path(), &model, &lines, &mut snapshots.clone()))
                .unwrap_or_else(|_| panic!("round {round} failed; rerun with {SEED_ENV}={seed}"));
        let (_, _, snaps) = parse(&lines);
        snapshots.extend(snaps);
    }
    // The log database's generation number counts the switches that completed.
    let generation = std::fs::read_to_string(dir.path().join("log.current"))
        .ok()
        .and_then(|name| name.trim().strip_prefix("log.gen-")?.parse::<u64>().ok())
        .unwrap_or(0);
    eprintln!(
        "crash harness: {rounds} rounds, {acked_total} acknowledged requests, {truncations} \
         truncations, {installs} installed snapshots, {} snapshots, final log length {}, \
         log database generation {generation} (rounds that left a new generation's \
         directory: {switch_rounds})",
        snapshots.len(),
        model.terms.len()
    );
    assert!(
        acked_total > 0,
        "the children acknowledged nothing: the harness tested nothing"
    );
    assert!(truncations > 0, "no truncation was exercised");
    // Kills land in the middle of switches to a new generation (a completed one is rarer:
    // the writer must find a moment with no write waiting); each round was verified above.
    assert!(
        switch_rounds > 0,
        "no switch to a new log generation was exercised"
    );
}
