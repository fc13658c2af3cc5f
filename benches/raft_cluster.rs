//! Replicated writes through three real manager processes on loopback (fsync on), and
//! snapshot streaming to a joining manager.
//!
//! Usage: `cargo bench --bench raft_cluster -- [--seconds D] [--clients 1,16,64,256]
//! [--snapshot-mib N] [--etcd-load PATH]` (`--snapshot-mib 0` skips the snapshot part).
//! Prints first the floors, measured before the clusters start: `fsync_p50_us` (append +
//! `fdatasync` in the directory the managers' state goes to) and `loopback_rtt_p50_us`;
//! then, for each client count C: `writes_per_s_c<C>`, `write_p50_us_c<C>`,
//! `write_p99_us_c<C>`, and after C = 1 `c1_p50_over_floor` (write_p50_us_c1 over
//! fsync_p50_us + loopback_rtt_p50_us: a replicated write cannot beat one fsync and one
//! round trip; issue 16's target is ≤ 2.0), and the CPU each write cost, per process:
//! `cpu_us_per_write_c<C>_leader`, `_followers` (both together) and `_client` (this
//! process), with each thread's share on stderr.
//!
//! The etcd 3.4 peer, same machine, same run, when `etcd` is on the `PATH` and the
//! `etcd-load` client is found (`--etcd-load PATH`, else `$ETCD_LOAD`, else the `PATH`;
//! build it from `../shared/tools/etcd-load`): three members on loopback, 256 clients of
//! 256-byte puts against the leader for the same duration: `etcd_writes_per_s_c256`,
//! `etcd_write_p50_us_c256`, its CPU per write (`etcd_cpu_us_per_write_c256_leader`,
//! `_followers`, `_client`) and `c256_over_etcd` (flotilla's c256 throughput over etcd's;
//! issue 16's target is ≥ 3). Then `snapshot_stream_MBps` and `snapshot_rss_growth_MiB`.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "common/cpu.rs"]
mod cpu;
#[path = "common/etcd.rs"]
mod etcd;
#[path = "common/floor.rs"]
mod floor;
#[path = "../tests/procs/mod.rs"]
mod procs;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use procs::cluster::{Cluster, ClusterOptions};

struct Args {
    seconds: f64,
    clients: Vec<usize>,
    snapshot_mib: usize,
    etcd_load: Option<PathBuf>,
}

/// The clients of the etcd comparison (issue 16's target 2).
const ETCD_CLIENTS: usize = 256;

fn parse_args() -> Args {
    let mut args = Args {
        seconds: 5.0,
        clients: vec![1, 16, 64, 256],
        snapshot_mib: 1024,
        etcd_load: std::env::var_os("ETCD_LOAD")
            .map(PathBuf::from)
            .or_else(|| etcd::on_path("etcd-load")),
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
            "--etcd-load" => args.etcd_load = Some(PathBuf::from(value())),
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

/// What one load phase measured.
struct Phase {
    writes_per_s: f64,
    p50_us: f64,
}

/// Runs `clients` closed-loop writers for `seconds`, prints the figures.
fn writes(cluster: &Cluster, clients: usize, seconds: f64) -> Phase {
    let probe = cluster.client();
    let leader_index = cluster.leader_index(&probe).expect("a leader");
    let leader = cluster.managers[leader_index].addr.clone();
    let pids: Vec<u32> = cluster
        .managers
        .iter()
        .map(|manager| manager.proc.as_ref().expect("running").pid())
        .collect();
    let managers_before: Vec<cpu::Sample> = pids.iter().map(|pid| cpu::sample(*pid)).collect();
    let client_before = cpu::sample(std::process::id());
    let client = Arc::new(cluster.client());
    let stop = Arc::new(AtomicBool::new(false));
    let value = Bytes::from(vec![0x5a; 256]);
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let (client, stop, leader, value) =
                (client.clone(), stop.clone(), leader.clone(), value.clone());
            std::thread::Builder::new()
                .name("bench-client".into())
                .spawn(move || {
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
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    // Before the join: the client threads still exist (an ended thread leaves /proc).
    let client_after = cpu::sample(std::process::id());
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let elapsed = started.elapsed().as_secs_f64();
    let managers_after: Vec<cpu::Sample> = pids.iter().map(|pid| cpu::sample(*pid)).collect();
    all.sort_unstable();
    let writes_per_s = all.len() as f64 / elapsed;
    println!("BENCH writes_per_s_c{clients} {writes_per_s:.0} ops/s");
    let p50_us = percentile(&all, 0.50);
    println!("BENCH write_p50_us_c{clients} {p50_us:.0} us");
    println!(
        "BENCH write_p99_us_c{clients} {:.0} us",
        percentile(&all, 0.99)
    );
    let count = all.len() as u64;
    let (leader_us, followers_us) = managers_cpu_us(
        &managers_before,
        &managers_after,
        leader_index,
        count,
        &format!("cpu_us_per_write_c{clients}"),
    );
    let client_us = cpu::report(
        &format!("cpu_us_per_write_c{clients}_client"),
        &client_before,
        &client_after,
        count,
    );
    eprintln!(
        "  c{clients}: {:.1} us of CPU per write in all ({leader_us:.1} leader, {followers_us:.1} \
         followers, {client_us:.1} client)",
        leader_us + followers_us + client_us
    );
    drop(client);
    probe.transport.shutdown();
    Phase {
        writes_per_s,
        p50_us,
    }
}

/// Prints the CPU per write of the leader and of the followers together (each follower's
/// threads on stderr); returns both.
fn managers_cpu_us(
    before: &[cpu::Sample],
    after: &[cpu::Sample],
    leader: usize,
    writes: u64,
    prefix: &str,
) -> (f64, f64) {
    let leader_us = cpu::report(
        &format!("{prefix}_leader"),
        &before[leader],
        &after[leader],
        writes,
    );
    let mut followers_us = 0.0;
    for index in (0..before.len()).filter(|index| *index != leader) {
        let (threads, total) = cpu::per_op_us(&before[index], &after[index], writes);
        let detail: Vec<String> = threads
            .iter()
            .map(|(thread, us)| format!("{thread} {us:.1}"))
            .collect();
        eprintln!("  {prefix}_follower{index}: {}", detail.join(", "));
        followers_us += total;
    }
    println!("BENCH {prefix}_followers {followers_us:.1} us");
    (leader_us, followers_us)
}

/// Total CPU (user + system) of this process's waited-for children, in microseconds
/// (`cutime` and `cstime` of `/proc/self/stat`).
fn children_cpu_us() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<u64> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .skip(13)
        .take(2)
        .map(|field| field.parse().unwrap())
        .collect();
    // USER_HZ: 100 ticks a second.
    (fields[0] + fields[1]) as f64 * 1e4
}

/// etcd 3.4, three members on loopback, under the same closed-loop load as flotilla's c256;
/// returns its throughput.
fn etcd_c256(etcd_load: &std::path::Path, seconds: f64) -> f64 {
    let etcd = etcd::Etcd3::start(&std::env::temp_dir());
    let leader = etcd.leader_index().expect("etcd has a leader");
    let pids: Vec<u32> = (0..3).map(|index| etcd.pid(index)).collect();
    let before: Vec<cpu::Sample> = pids.iter().map(|pid| cpu::sample(*pid)).collect();
    let children_before_us = children_cpu_us();
    let seconds = seconds.ceil().max(1.0) as u64;
    let load = etcd::finish_load(etcd.spawn_load(etcd_load, leader, ETCD_CLIENTS, seconds));
    let client_us = (children_cpu_us() - children_before_us) / load.ops.max(1) as f64;
    let after: Vec<cpu::Sample> = pids.iter().map(|pid| cpu::sample(*pid)).collect();
    println!(
        "BENCH etcd_writes_per_s_c{ETCD_CLIENTS} {:.0} ops/s",
        load.ops_per_s
    );
    println!(
        "BENCH etcd_write_p50_us_c{ETCD_CLIENTS} {:.0} us",
        load.p50_us
    );
    println!(
        "BENCH etcd_write_p99_us_c{ETCD_CLIENTS} {:.0} us",
        load.p99_us
    );
    let (leader_us, followers_us) = managers_cpu_us(
        &before,
        &after,
        leader,
        load.ops,
        &format!("etcd_cpu_us_per_write_c{ETCD_CLIENTS}"),
    );
    println!("BENCH etcd_cpu_us_per_write_c{ETCD_CLIENTS}_client {client_us:.1} us");
    eprintln!(
        "  etcd c{ETCD_CLIENTS}: {:.1} us of CPU per write in all ({leader_us:.1} leader, \
         {followers_us:.1} followers, {client_us:.1} client)",
        leader_us + followers_us + client_us
    );
    load.ops_per_s
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
    let mut c256_writes_per_s = None;
    {
        let cluster = Cluster::start(3, ClusterOptions::default());
        for &clients in &args.clients {
            let phase = writes(&cluster, clients, args.seconds);
            if clients == 1 {
                floor::print_ratio("c1_p50_over_floor", phase.p50_us, floors.commit_floor_us());
            }
            if clients == ETCD_CLIENTS {
                c256_writes_per_s = Some(phase.writes_per_s);
            }
        }
    }
    match (&args.etcd_load, etcd::on_path("etcd"), c256_writes_per_s) {
        (Some(etcd_load), Some(_), Some(ours)) => {
            let theirs = etcd_c256(etcd_load, args.seconds);
            println!("BENCH c{ETCD_CLIENTS}_over_etcd {:.2} x", ours / theirs);
        }
        (_, _, None) => eprintln!("no c{ETCD_CLIENTS} phase: etcd is not measured"),
        _ => eprintln!("etcd or etcd-load not found: the etcd peer is not measured"),
    }
    if args.snapshot_mib > 0 {
        snapshot(args.snapshot_mib);
    }
}
