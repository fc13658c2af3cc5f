//! The object store through the whole control path on three real manager processes
//! (fsync on): small service updates (client RPC → leader → Raft → apply on every manager),
//! and store events delivered to many `control.Watch` streams.
//!
//! Usage: `cargo bench --bench store -- [--seconds D] [--clients C] [--watchers W]`
//! (defaults 5 s, 32 clients, 100 watchers). Prints `BENCH store_txn_per_s <v> txn/s`
//! (updates acknowledged per second, no watchers) and `BENCH watch_events_per_s <v>
//! events/s` (events received by all watchers together, per second, while the same update
//! load runs).
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/procs/mod.rs"]
mod procs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla::ca::{load_node_files, tls};
use flotilla::control as api;
use flotilla::net::{CallOptions, Channel, Transport, TransportConfig};
use flotilla::proto::control as pb;
use flotilla::proto::objects::{ObjectKind, ServiceMode, ServiceSpec, TaskSpec};
use procs::cluster::{Cluster, ClusterOptions};

const CALL: Duration = Duration::from_secs(30);

struct Args {
    seconds: f64,
    clients: usize,
    watchers: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 5.0,
        clients: 32,
        watchers: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value after the flag");
        match arg.as_str() {
            "--seconds" => args.seconds = value().parse().expect("--seconds S"),
            "--clients" => args.clients = value().parse().expect("--clients C"),
            "--watchers" => args.watchers = value().parse().expect("--watchers W"),
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
    }
    args
}

fn spec(name: &str, replicas: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated as i32,
        replicas,
        task: Some(TaskSpec {
            command: "sleep".into(),
            args: vec!["100".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One service per client, updated in a loop with the version of the last reply (never a
/// conflict). Returns the updates acknowledged.
fn update_load(channel: &Channel, clients: usize, seconds: f64, round: usize) -> u64 {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (channel, stop, acked) = (channel.clone(), stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let name = format!("bench-{round}-{c}");
                let created: pb::ServiceResponse = channel
                    .unary(
                        api::CREATE_SERVICE,
                        &pb::CreateServiceRequest {
                            spec: Some(spec(&name, 1)),
                            ..Default::default()
                        },
                        CallOptions::timeout(CALL),
                    )
                    .unwrap();
                let mut service = created.service.unwrap();
                let mut replicas = 1;
                while !stop.load(Ordering::Relaxed) {
                    replicas = replicas % 9 + 1;
                    let reply: pb::ServiceResponse = channel
                        .unary(
                            api::UPDATE_SERVICE,
                            &pb::UpdateServiceRequest {
                                reference: service.id.clone(),
                                version: service.meta.as_ref().unwrap().version,
                                spec: Some(spec(&name, replicas)),
                                request_id: None,
                                rollback: false,
                            },
                            CallOptions::timeout(CALL),
                        )
                        .unwrap();
                    service = reply.service.unwrap();
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let every client create its service before counting.
    std::thread::sleep(Duration::from_millis(500));
    let start = acked.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let done = acked.load(Ordering::Relaxed) - start;
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    done
}

fn main() {
    let args = parse_args();
    let cluster = Cluster::start(3, ClusterOptions::default());
    let probe = cluster.client();
    let leader = cluster.managers[cluster.leader_index(&probe).expect("a leader")]
        .addr
        .clone();
    let (identity, root) = load_node_files(&cluster.managers[0].dir.join("node")).unwrap();
    let tls = Arc::new(tls::client_config(&identity, &root).unwrap());
    let transport = Transport::start(TransportConfig::default()).unwrap();
    let channel = transport.channel(&leader, &tls);

    let acked = update_load(&channel, args.clients, args.seconds, 0);
    println!(
        "BENCH store_txn_per_s {:.0} txn/s",
        acked as f64 / args.seconds
    );

    // Watchers (each its own connection's worth of stream) on the leader, all services.
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let watch_threads: Vec<_> = (0..args.watchers)
        .map(|_| {
            let mut stream = channel
                .server_stream::<_, pb::WatchMessage>(
                    api::WATCH,
                    &pb::WatchRequest {
                        filters: vec![pb::WatchFilter {
                            kind: ObjectKind::Service as i32,
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                    CallOptions::default(),
                )
                .unwrap();
            let start = stream.recv().unwrap().unwrap();
            assert_eq!(start.action, pb::WatchAction::Start as i32);
            let (received, stop) = (received.clone(), stop.clone());
            std::thread::spawn(move || {
                while let Ok(Some(_)) = stream.recv() {
                    received.fetch_add(1, Ordering::Relaxed);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                stream.cancel();
            })
        })
        .collect();
    let started = Instant::now();
    let before = received.load(Ordering::Relaxed);
    let acked = update_load(&channel, args.clients, args.seconds, 1);
    let events = received.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "BENCH watch_events_per_s {:.0} events/s",
        events as f64 / elapsed
    );
    eprintln!(
        "({acked} updates acknowledged meanwhile, {} watchers, {:.1} s)",
        args.watchers, elapsed
    );
    stop.store(true, Ordering::Relaxed);
    // One more write wakes every watcher so it sees the stop flag.
    update_load(&channel, 1, 0.1, 2);
    for thread in watch_threads {
        thread.join().unwrap();
    }
    transport.shutdown();
    probe.transport.shutdown();
}
