//! Durable log appends through the group-commit writer, beside a raw `fdatasync` floor.
//!
//! Usage: `cargo bench --bench storage -- [--sizes 1,10,100,1000] [--entry-bytes 256]
//! [--seconds S] [--repeats R] [--dir PATH] [--memtable-mib N]
//! [--fjall-workers N] [--snapshot-every N]`
//!
//! For each batch size B, R repeats of S seconds each, alternating one batch of each kind
//! (so both see the same disk, whatever else the machine is doing):
//! - append: one `AppendRequest` of B entries (plus the hard state) submitted to the
//!   `raft-log-writer`, then wait for its `Durable` event (one fjall batch + one
//!   `persist(SyncData)`). Like a node in steady state, the log is compacted every
//!   `--snapshot-every` entries (default 10,000, swarmkit's snapshot interval; keeping the
//!   default 500 trailing entries), and that compaction runs in the writer inside the
//!   measured time; `--snapshot-every 0` never compacts (an ever-growing log);
//! - raw: copy the same B payloads into one buffer, `write` it to the end of a plain file
//!   and `fdatasync` it (the least a hand-written log could do).
//!
//! Prints the median over the repeats: `BENCH append_per_s_b<B> <v> entries/s`,
//! `BENCH raw_per_s_b<B> <v> entries/s`, `BENCH append_vs_raw_b<B> <ratio> x` (ratio of
//! those medians), and `BENCH append_vs_raw_pair_median_b<B> <ratio> x`: the median, over
//! back-to-back pairs, of raw time / append time, which a burst of other IO on a shared
//! disk cannot skew. The per-repeat figures go to stderr.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "common/floor.rs"]
mod floor;

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::raft::storage::{AppendRequest, LogHandle, LogStore, StorageConfig, WriterEvent};
use flotilla::raft::types::{Entry, EntryKind, HardState};

struct Args {
    sizes: Vec<usize>,
    entry_bytes: usize,
    seconds: f64,
    repeats: usize,
    dir: Option<PathBuf>,
    memtable_mib: Option<u64>,
    fjall_workers: Option<usize>,
    snapshot_every: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![1, 10, 100, 1000],
        entry_bytes: 256,
        seconds: 1.5,
        repeats: 3,
        dir: None,
        memtable_mib: None,
        fjall_workers: None,
        snapshot_every: 10_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--sizes" => {
                args.sizes = value()
                    .split(',')
                    .map(|s| s.parse().expect("--sizes 1,10"))
                    .collect()
            }
            "--entry-bytes" => args.entry_bytes = value().parse().expect("--entry-bytes N"),
            "--seconds" => args.seconds = value().parse().expect("--seconds S"),
            "--repeats" => args.repeats = value().parse().expect("--repeats R"),
            "--dir" => args.dir = Some(PathBuf::from(value())),
            "--fjall-workers" => {
                args.fjall_workers = Some(value().parse().expect("--fjall-workers N"))
            }
            "--snapshot-every" => {
                args.snapshot_every = value().parse().expect("--snapshot-every N")
            }
            "--memtable-mib" => {
                args.memtable_mib = Some(value().parse().expect("--memtable-mib N"))
            }
            "--bench" => {}
            other => panic!(
                "unknown argument {other}; use --sizes 1,10,100,1000 --entry-bytes N --seconds S --repeats R --dir PATH"
            ),
        }
    }
    args
}

struct AppendBench {
    handle: LogHandle,
    events: crossbeam_channel::Receiver<WriterEvent>,
    term: u64,
    /// Compact every this many entries, as a node does after each snapshot (0: never).
    snapshot_every: u64,
    last_snapshot: u64,
}

impl AppendBench {
    /// One durable batch of `batch` entries; returns how long it took.
    fn batch(&mut self, batch: usize, payloads: &[Bytes]) -> Duration {
        let start = Instant::now();
        let first = self.handle.last_index() + 1;
        let entries: Vec<Entry> = (0..batch)
            .map(|i| Entry {
                term: self.term,
                index: first + i as u64,
                kind: EntryKind::Normal,
                data: payloads[i % payloads.len()].clone(),
            })
            .collect();
        let hard_state = HardState {
            term: self.term,
            vote: 1,
            commit: first - 1,
        };
        let seq = self
            .handle
            .submit(AppendRequest {
                truncate_from: None,
                entries,
                hard_state: Some(hard_state),
            })
            .unwrap();
        loop {
            match self.events.recv().unwrap() {
                WriterEvent::Durable(d) => {
                    self.handle.on_durable(&d);
                    if d.seq >= seq {
                        break;
                    }
                }
                WriterEvent::Fatal(e) => panic!("{e}"),
            }
        }
        let last = self.handle.last_index();
        if self.snapshot_every > 0 && last >= self.last_snapshot + self.snapshot_every {
            // The snapshot file itself is the state machine's cost, not the log's: only the
            // compaction it allows runs here (in the writer, between groups).
            self.handle.compact(last).unwrap();
            self.last_snapshot = last;
        }
        start.elapsed()
    }
}

/// One raw batch: copy the payloads into one buffer, append it, fdatasync (the floor's own
/// append, [`floor::append_and_sync`]).
fn raw_batch(
    file: &mut std::fs::File,
    buffer: &mut Vec<u8>,
    batch: usize,
    payloads: &[Bytes],
) -> Duration {
    let start = Instant::now();
    buffer.clear();
    for i in 0..batch {
        buffer.extend_from_slice(&payloads[i % payloads.len()]);
    }
    let copied = start.elapsed();
    copied + floor::append_and_sync(file, buffer)
}

/// Alternates one raw batch and one append batch for `duration`, so that both see the
/// same disk (other tenants' IO hits both equally); returns entries/s of (append, raw) and
/// the median over pairs of raw time / append time (robust to bursts of foreign IO).
fn measure(
    append: &mut AppendBench,
    raw: &mut std::fs::File,
    batch: usize,
    payloads: &[Bytes],
    duration: Duration,
) -> (f64, f64, f64) {
    let mut buffer = Vec::with_capacity(batch * payloads[0].len());
    let (mut append_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
    let mut pair_ratios = Vec::new();
    let (mut appends_us, mut raws_us) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while start.elapsed() < duration {
        let raw_one = raw_batch(raw, &mut buffer, batch, payloads);
        let append_one = append.batch(batch, payloads);
        raw_time += raw_one;
        append_time += append_one;
        pair_ratios.push(raw_one.as_secs_f64() / append_one.as_secs_f64());
        appends_us.push(append_one.as_secs_f64() * 1e6);
        raws_us.push(raw_one.as_secs_f64() * 1e6);
    }
    eprintln!(
        "  b={batch} batch us p50/p99/max: append {} raw {}",
        spread(appends_us),
        spread(raws_us)
    );
    let entries = (pair_ratios.len() * batch) as f64;
    (
        entries / append_time.as_secs_f64(),
        entries / raw_time.as_secs_f64(),
        median(pair_ratios),
    )
}

/// "p50/p99/max" of `values`.
fn spread(mut values: Vec<f64>) -> String {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| values[((values.len() - 1) as f64 * q) as usize];
    format!("{:.0}/{:.0}/{:.0}", at(0.5), at(0.99), at(1.0))
}

/// Smallest batch (in payload bytes) whose write accounting is printed: below it the
/// page-granular counters mostly measure partial pages rewritten at every fsync.
const WRITE_ACCOUNTING_BATCH_BYTES_MIN: usize = 64 << 10;

/// Bytes this process has caused to be written to storage (`write_bytes` in
/// `/proc/self/io`), if the kernel reports it.
fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|line| line.strip_prefix("write_bytes: "))
        .and_then(|value| value.trim().parse().ok())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn main() {
    let args = parse_args();
    let base = args.dir.clone().unwrap_or_else(|| PathBuf::from("target"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(&base).unwrap();
    let payloads: Vec<Bytes> = (0..64u8)
        .map(|seed| {
            Bytes::from(
                (0..args.entry_bytes)
                    .map(|i| seed ^ (i as u8).wrapping_mul(31))
                    .collect::<Vec<u8>>(),
            )
        })
        .collect();
    let mut config = StorageConfig::default();
    if let Some(n) = args.fjall_workers {
        config.fjall_worker_threads = n;
    }
    if let Some(mib) = args.memtable_mib {
        config.memtable_bytes_max = mib << 20;
    }
    let (store, recovered) = LogStore::open(&dir.path().join("store"), &config).unwrap();
    let (handle, events) = LogHandle::start(store, &recovered, &config).unwrap();
    let mut append = AppendBench {
        handle,
        events,
        term: 1,
        snapshot_every: args.snapshot_every,
        last_snapshot: 0,
    };
    let mut raw_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("raw.log"))
        .unwrap();
    let duration = Duration::from_secs_f64(args.seconds);
    // Warm up both paths (file creation, journal preallocation, page cache).
    measure(
        &mut append,
        &mut raw_file,
        10,
        &payloads,
        Duration::from_millis(300),
    );
    for &batch in &args.sizes {
        let written_before = process_write_bytes();
        let raw_len_before = raw_file.metadata().unwrap().len();
        let appended_before = append.handle.last_index();
        let mut appends = Vec::new();
        let mut raws = Vec::new();
        let mut pair_medians = Vec::new();
        for _ in 0..args.repeats {
            let (a, r, p) = measure(&mut append, &mut raw_file, batch, &payloads, duration);
            appends.push(a);
            raws.push(r);
            pair_medians.push(p);
        }
        let ratios: Vec<String> = appends
            .iter()
            .zip(&raws)
            .map(|(a, r)| format!("{:.2}", a / r))
            .collect();
        eprintln!(
            "b={batch}: append {:?} raw {:?} per-repeat ratios {:?} pair medians {:.2?}",
            appends.iter().map(|v| *v as u64).collect::<Vec<_>>(),
            raws.iter().map(|v| *v as u64).collect::<Vec<_>>(),
            ratios,
            pair_medians
        );
        let append_per_s = median(appends);
        let raw_per_s = median(raws);
        println!("BENCH append_per_s_b{batch} {append_per_s:.0} entries/s");
        println!("BENCH raw_per_s_b{batch} {raw_per_s:.0} entries/s");
        println!(
            "BENCH append_vs_raw_b{batch} {:.2} x",
            append_per_s / raw_per_s
        );
        println!(
            "BENCH append_vs_raw_pair_median_b{batch} {:.2} x",
            median(pair_medians)
        );
        // Bytes the process sent to the disk for the log (its own writes minus the raw
        // file's), per payload byte appended: the journal write plus whatever fjall wrote
        // again at memtable flush and table compaction. The kernel counts whole pages, so
        // only batches of many pages give a meaningful figure.
        let raw_bytes = raw_file.metadata().unwrap().len() - raw_len_before;
        let appended_bytes =
            (append.handle.last_index() - appended_before) * args.entry_bytes as u64;
        let many_pages = batch * args.entry_bytes >= WRITE_ACCOUNTING_BATCH_BYTES_MIN;
        if let (true, Some(before), Some(after)) =
            (many_pages, written_before, process_write_bytes())
        {
            let log_bytes = (after - before).saturating_sub(raw_bytes);
            println!(
                "BENCH append_bytes_written_per_payload_byte_b{batch} {:.2} x",
                log_bytes as f64 / appended_bytes as f64
            );
        }
    }
    append.handle.shutdown().unwrap();
}
