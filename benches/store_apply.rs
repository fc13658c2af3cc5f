//! Store throughput without Raft: transactions applied directly, and events fanned out to
//! watchers.
//!
//! Usage: `cargo bench --bench store_apply -- [--txns N] [--services S] [--watchers W]
//! [--events E] [--snapshot-tasks T]`
//! Prints `BENCH <name> <value> <unit>` lines:
//! - `store_apply_txn_per_s`: transactions of one small service update (replica count,
//!   optimistic version checked) applied to a store holding S services;
//! - `store_apply_decoded_txn_per_s`: the same, decoding each transaction from its log bytes
//!   first (what a manager does with a committed entry);
//! - `store_watch_events_per_s`: events delivered to W watchers (each on its own thread,
//!   receiving every event) while E one-change transactions are applied, counted until the
//!   last watcher has its last event;
//! - `store_snapshot_MBps`, `store_restore_MBps`, `store_snapshot_bytes_per_task`: a store
//!   of T tasks (each with its task template) streamed out and restored.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Read;
use std::thread;
use std::time::Instant;

use flotilla::proto::objects::{
    Service, ServiceMode, ServiceSpec, Task, TaskSpec, TaskState, TaskStatus, Transaction,
};
use flotilla::store::{Store, StoreConfig, WatchEvent, WatchOptions, create, update_expecting};
use prost::Message;

struct Args {
    txns: u64,
    services: u64,
    watchers: usize,
    events: u64,
    snapshot_tasks: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        txns: 200_000,
        services: 1_000,
        watchers: 100,
        events: 20_000,
        snapshot_tasks: 100_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().and_then(|v| v.parse().ok());
        match arg.as_str() {
            "--txns" => args.txns = value().expect("--txns N"),
            "--services" => args.services = value().expect("--services S"),
            "--watchers" => args.watchers = value().expect("--watchers W") as usize,
            "--events" => args.events = value().expect("--events E"),
            "--snapshot-tasks" => args.snapshot_tasks = value().expect("--snapshot-tasks T"),
            "--bench" => {}
            other => panic!(
                "unknown argument {other}; use --txns N --services S --watchers W --events E \
                 --snapshot-tasks T"
            ),
        }
    }
    args
}

/// A 25-character id that looks random, like the ids the control API hands out (ids with
/// long shared prefixes would make every index comparison slower than in real life).
fn random_looking_id(kind: u64, index: u64) -> String {
    // splitmix64: a bijection, so ids never collide.
    let mut z = (kind << 56 | index).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    format!("{z:016x}{index:09}")
}

fn service_id(index: u64) -> String {
    random_looking_id(1, index)
}

fn service(index: u64) -> Service {
    Service {
        id: service_id(index),
        spec: Some(ServiceSpec {
            name: format!("service-{index}"),
            mode: ServiceMode::Replicated as i32,
            replicas: 1,
            task: Some(TaskSpec {
                command: "/usr/bin/sleep".into(),
                args: vec!["3600".into()],
                env: vec!["MODE=bench".into()],
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A store holding `services` services, the version each was created at, and the next free
/// log index.
fn seeded_store(services: u64, config: StoreConfig) -> (Store, Vec<u64>, u64) {
    let store = Store::new(config);
    let creates: Vec<_> = (0..services).map(|i| create(service(i))).collect();
    let mut index = 1;
    for txn in flotilla::store::split_into_transactions(creates, 0).unwrap() {
        store.apply(index, &txn).unwrap();
        index += 1;
    }
    let versions = store.view(|v| {
        (0..services)
            .map(|i| {
                v.get::<Service>(&service_id(i))
                    .unwrap()
                    .meta
                    .unwrap()
                    .version
            })
            .collect()
    });
    (store, versions, index)
}

/// `count` update transactions starting at log index `first_index`, each bumping one
/// service's replicas and expecting the version the previous write gave it.
fn update_log(mut versions: Vec<u64>, first_index: u64, count: u64) -> Vec<Transaction> {
    let services = versions.len() as u64;
    let mut templates: Vec<Service> = (0..services).map(service).collect();
    (0..count)
        .map(|i| {
            let index = first_index + i;
            let target = (i % services) as usize;
            let service = &mut templates[target];
            service.spec.as_mut().unwrap().replicas = i % 10 + 1;
            let change = update_expecting(service.clone(), versions[target]);
            versions[target] = index;
            Transaction {
                changes: vec![change],
                timestamp_ms: 1_700_000_000_000 + i as i64,
                request_id: None,
            }
        })
        .collect()
}

fn bench_apply(args: &Args) {
    let (store, versions, first_index) = seeded_store(args.services, StoreConfig::default());
    let log = update_log(versions, first_index, args.txns);
    let encoded: Vec<Vec<u8>> = log.iter().map(|t| t.encode_to_vec()).collect();

    let start = Instant::now();
    for (i, txn) in log.iter().enumerate() {
        store.apply(first_index + i as u64, txn).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "BENCH store_apply_txn_per_s {:.0} txn/s",
        args.txns as f64 / elapsed
    );

    let (store, _, first_index) = seeded_store(args.services, StoreConfig::default());
    let start = Instant::now();
    for (i, bytes) in encoded.iter().enumerate() {
        let txn = Transaction::decode(bytes.as_slice()).unwrap();
        store.apply(first_index + i as u64, &txn).unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "BENCH store_apply_decoded_txn_per_s {:.0} txn/s",
        args.txns as f64 / elapsed
    );
}

fn bench_watch(args: &Args) {
    // Queues hold every event, so the figure is delivery throughput, not a drop rate.
    let config = StoreConfig {
        watch_queue_events_max: args.events as usize + 1,
        ..StoreConfig::default()
    };
    let (store, versions, first_index) = seeded_store(args.services, config);
    let log = update_log(versions, first_index, args.events);
    let last_version = first_index + args.events - 1;
    let receivers: Vec<_> = (0..args.watchers)
        .map(|_| {
            let watcher = store.watch(WatchOptions::default());
            thread::spawn(move || {
                let mut received = 0u64;
                loop {
                    match watcher.recv().unwrap() {
                        WatchEvent::Change(event) => {
                            received += 1;
                            if event.version == last_version {
                                return received;
                            }
                        }
                        WatchEvent::Commit { .. } | WatchEvent::Dropped(_) => {}
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    for (i, txn) in log.iter().enumerate() {
        store.apply(first_index + i as u64, txn).unwrap();
    }
    let delivered: u64 = receivers.into_iter().map(|r| r.join().unwrap()).sum();
    let elapsed = start.elapsed().as_secs_f64();
    assert_eq!(
        delivered,
        args.events * args.watchers as u64,
        "no watcher missed an event"
    );
    println!(
        "BENCH store_watch_events_per_s {:.0} events/s",
        delivered as f64 / elapsed
    );
}

fn bench_snapshot(args: &Args) {
    let store = Store::default();
    let template = service(0).spec.unwrap().task;
    let tasks: Vec<_> = (0..args.snapshot_tasks)
        .map(|i| {
            create(Task {
                id: random_looking_id(2, i),
                service_id: service_id(i % 100),
                slot: i / 100 + 1,
                node_id: random_looking_id(3, i % 1000),
                desired_state: TaskState::Running as i32,
                status: Some(TaskStatus {
                    state: TaskState::Running as i32,
                    message: "started".into(),
                    timestamp_ms: 1_700_000_000_000,
                    ..Default::default()
                }),
                spec: template.clone(),
                service_version: 1,
                ..Default::default()
            })
        })
        .collect();
    let batches = flotilla::store::split_into_transactions(tasks, 0).unwrap();
    for (index, txn) in (1..).zip(&batches) {
        store.apply(index, txn).unwrap();
    }
    let start = Instant::now();
    let mut bytes = Vec::new();
    store.snapshot().read_to_end(&mut bytes).unwrap();
    let snapshot_s = start.elapsed().as_secs_f64();
    let megabytes = bytes.len() as f64 / 1e6;
    let target = Store::default();
    let start = Instant::now();
    target.restore(bytes.as_slice()).unwrap();
    let restore_s = start.elapsed().as_secs_f64();
    println!(
        "BENCH store_snapshot_MBps {:.0} MB/s",
        megabytes / snapshot_s
    );
    println!("BENCH store_restore_MBps {:.0} MB/s", megabytes / restore_s);
    println!(
        "BENCH store_snapshot_bytes_per_task {:.0} bytes",
        bytes.len() as f64 / args.snapshot_tasks.max(1) as f64
    );
}

fn main() {
    let args = parse_args();
    assert!(args.services > 0 && args.txns > 0 && args.events > 0);
    bench_apply(&args);
    bench_watch(&args);
    bench_snapshot(&args);
}
