//! Replicated writes through three real manager processes on loopback (fsync on), and
//! snapshot streaming to a joining manager.
//!
//! Usage: `cargo bench --bench raft_cluster -- [--seconds D] [--clients 1,16,64,256]
//! [--snapshot-mib N]` (`--snapshot-mib 0` skips the snapshot part).
//! Prints first the floors, measured before the clusters start: `fsync_p50_us` (append +
//! `fdatasync` in the directory the managers' state goes to) and `loopback_rtt_p50_us`;
//! then, for each client count C: `writes_per_s_c<C>`, `write_p50_us_c<C>`,
//! `write_p99_us_c<C>`, and after C = 1 `c1_p50_over_floor` (write_p50_us_c1 over
//! fsync_p50_us + loopback_rtt_p50_us: a replicated write cannot beat one fsync and one
//! round trip; issue 16's target is ≤ 2.0); then `snapshot_stream_MBps` and
//! `snapshot_rss_growth_MiB`.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "common/floor.rs"]
mod floor;
#[path = "../tests/procs/mod.rs"]
mod procs;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use procs::cluster::{Cluster, ClusterOptions};

struct Args {
    seconds: f64,
    clients: Vec<usize>,
    snapshot_mib: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 5.0,
        clients: vec![1, 16, 64, 256],
        snapshot_mib: 1024,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().expect("a value after the flag");
        match arg.as_str() {
            "--seconds" => args.seconds = value().parse().expect("--seconds S"),
            "--clients" => {
                args.clients = value()
                    .split(',')
                    .map(|c| c.parse().expect("--clients 1,16,…"))
                    .collect();
            }
            "--snapshot-mib" => args.snapshot_mib = value().parse().expect("--snapshot-mib N"),
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
    }
    args
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Runs `clients` closed-loop writers for `seconds`, prints the figures; returns the p50 in µs.
fn writes(cluster: &Cluster, clients: usize, seconds: f64) -> f64 {
    let probe = cluster.client();
    let leader = cluster.managers[cluster.leader_index(&probe).expect("a leader")]
        .addr
        .clone();
    let client = Arc::new(cluster.client());
    let stop = Arc::new(AtomicBool::new(false));
    let value = Bytes::from(vec![0x5a; 256]);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (client, stop, leader, value) =
                (client.clone(), stop.clone(), leader.clone(), value.clone());
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    client
                        .put_at(
                            &leader,
                            &format!("c{clients}-{c}-{}", seq % 1000),
                            value.clone(),
                        )
                        .unwrap();
                    latencies.push(started.elapsed());
                    seq += 1;
                }
                latencies
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    println!(
        "BENCH writes_per_s_c{clients} {:.0} ops/s",
        all.len() as f64 / elapsed
    );
    let p50_us = percentile(&all, 0.50);
    println!("BENCH write_p50_us_c{clients} {p50_us:.0} us");
    println!(
        "BENCH write_p99_us_c{clients} {:.0} us",
        percentile(&all, 0.99)
    );
    drop(client);
    probe.transport.shutdown();
    p50_us
}

fn snapshot(mib: usize) {
    let mut cluster = Cluster::start(
        1,
        ClusterOptions {
            snapshot_interval_entries: Some(mib as u64 + 600),
            ..Default::default()
        },
    );
    let client = cluster.client();
    let leader = cluster.managers[0].addr.clone();
    let chunk = Bytes::from(vec![0xa5; 1 << 20]);
    let load = Instant::now();
    for i in 0..mib {
        client
            .put_at(&leader, &format!("big-{i}"), chunk.clone())
            .unwrap();
    }
    for i in 0..700 {
        client
            .put_at(&leader, &format!("small-{i}"), Bytes::from_static(b"x"))
            .unwrap();
    }
    eprintln!("loaded {mib} MiB in {:?}", load.elapsed());
    cluster.managers[0]
        .proc()
        .wait_for("snapshot at index", Duration::from_secs(600));
    let joiner = cluster.add_joiner();
    // The joiner samples its own RSS at every chunk it receives and logs the peak growth.
    let received = cluster.managers[joiner]
        .proc()
        .wait_for("received snapshot", Duration::from_secs(600));
    let growth_mib: f64 = received
        .split("rss growth ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the joiner logs its rss growth");
    let sent = cluster.managers[0]
        .proc()
        .wait_for("sent a snapshot of", Duration::from_secs(60));
    let mbps: f64 = sent
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("the leader logs the transfer rate");
    println!("BENCH snapshot_stream_MBps {mbps:.0} MB/s");
    println!("BENCH snapshot_rss_growth_MiB {growth_mib:.1} MiB");
    client.transport.shutdown();
}

fn main() {
    let args = parse_args();
    // The managers' state directories are made under the system's temporary directory
    // (`Cluster::start`): the disk floor is measured there, before any manager runs.
    let floors = floor::measure_and_print(&std::env::temp_dir());
    {
        let cluster = Cluster::start(3, ClusterOptions::default());
        for &clients in &args.clients {
            let p50_us = writes(&cluster, clients, args.seconds);
            if clients == 1 {
                floor::print_ratio("c1_p50_over_floor", p50_us, floors.commit_floor_us());
            }
        }
    }
    if args.snapshot_mib > 0 {
        snapshot(args.snapshot_mib);
    }
}
