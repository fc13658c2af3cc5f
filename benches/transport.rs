//! Transport throughput and latency over mutual TLS on loopback.
//!
//! Usage: `cargo bench --bench transport -- [--calls N] [--seconds S] [--only PHASE]`
//! (`--only unary|c64|stream|unary_1MiB` runs the loopback floor and that phase alone: for
//! counting a phase's syscalls or instructions, with `strace -c -f` or callgrind).
//! Prints `BENCH <name> <value> <unit>` lines:
//! - `loopback_rtt_p50_us`: the floor, a plain blocking TCP ping-pong of 64 bytes over
//!   127.0.0.1 (`TCP_NODELAY`), measured first in the same run;
//! - `rpc_unary_p50_us`, `rpc_unary_p99_us`: 64-byte unary calls, one caller, handler on a
//!   service pool; `rpc_unary_inline_p50_us`, `rpc_unary_inline_p99_us`: the same with the
//!   handler inline on the reactor (how `raft.Step` and `kv.Apply` are served);
//!   `unary_p50_over_rtt` and `unary_inline_p50_over_rtt`: those p50s over the floor
//!   (issue 16's target for the pool one: ≤ 1.6);
//! - `rpc_unary_per_s_c64`: 64-byte unary calls, 64 concurrent callers on one connection;
//! - `rpc_1MiB_MBps`: 1 MiB messages streamed by one caller (client-streaming, pipelined);
//! - `rpc_unary_1MiB_MBps`: 1 MiB unary requests, one caller (no pipelining).
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/floor.rs"]
mod floor;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Bytes, Cluster, Number, TestServer};
use flotilla::ca::Role;
use flotilla::net::{CallOptions, Channel, Transport, TransportConfig};

struct Args {
    calls: usize,
    seconds: f64,
    /// The one phase to run, if not all.
    only: Option<String>,
}

impl Args {
    fn runs(&self, phase: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == phase)
    }
}

const PHASES: [&str; 4] = ["unary", "c64", "stream", "unary_1MiB"];

fn parse_args() -> Args {
    let mut args = Args {
        calls: 20_000,
        seconds: 3.0,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--calls" => args.calls = it.next().and_then(|v| v.parse().ok()).expect("--calls N"),
            "--seconds" => {
                args.seconds = it.next().and_then(|v| v.parse().ok()).expect("--seconds S")
            }
            "--only" => {
                let phase = it.next().expect("--only PHASE");
                assert!(
                    PHASES.contains(&phase.as_str()),
                    "--only takes one of {PHASES:?}"
                );
                args.only = Some(phase);
            }
            "--bench" => {}
            other => panic!("unknown argument {other}; use --calls N --seconds S --only PHASE"),
        }
    }
    args
}

fn opts() -> CallOptions {
    CallOptions::timeout(Duration::from_secs(30))
}

fn payload(bytes: usize) -> Bytes {
    Bytes {
        data: vec![0xAB; bytes],
        caller: String::new(),
    }
}

/// `method` on the server's pool (`test.Discard`) or inline on its reactor
/// (`test.InlineEcho`, how `raft.Step` and `kv.Apply` are served); `label` names the figures.
/// Returns the p50 in µs.
fn unary_latency(channel: &Channel, calls: usize, method: &str, label: &str) -> f64 {
    let request = payload(64);
    for _ in 0..1000 {
        channel.unary_raw(method, encode(&request), opts()).unwrap();
    }
    let mut samples_ns = Vec::with_capacity(calls);
    for _ in 0..calls {
        let start = Instant::now();
        channel.unary_raw(method, encode(&request), opts()).unwrap();
        samples_ns.push(start.elapsed().as_nanos() as u64);
    }
    samples_ns.sort_unstable();
    let percentile =
        |p: f64| samples_ns[((samples_ns.len() as f64 * p) as usize).min(samples_ns.len() - 1)];
    let p50_us = percentile(0.50) as f64 / 1000.0;
    println!("BENCH rpc_unary{label}_p50_us {p50_us:.1} us");
    println!(
        "BENCH rpc_unary{label}_p99_us {:.1} us",
        percentile(0.99) as f64 / 1000.0
    );
    p50_us
}

fn encode(request: &Bytes) -> bytes::Bytes {
    use prost::Message;
    bytes::Bytes::from(request.encode_to_vec())
}

fn unary_concurrent(channel: &Channel, callers: usize, seconds: f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..callers)
        .map(|_| {
            let (channel, stop, done) = (channel.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let request = payload(64);
                while !stop.load(Ordering::Relaxed) {
                    channel
                        .unary::<Bytes, Number>("test.Discard", &request, opts())
                        .unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300)); // warm up
    let start_count = done.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let calls = done.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    println!(
        "BENCH rpc_unary_per_s_c{callers} {:.0} ops/s",
        calls as f64 / elapsed
    );
}

fn streamed_throughput(channel: &Channel, seconds: f64) {
    let chunk = payload(1024 * 1024);
    let start = Instant::now();
    let mut upload = channel
        .client_stream::<Bytes, Number>("test.Sink", opts())
        .unwrap();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        upload.send(&chunk).unwrap();
        sent += chunk.data.len() as u64;
    }
    let received = upload.finish().unwrap().value as u64;
    assert_eq!(received, sent, "the server must receive every byte");
    let mb_per_s = sent as f64 / start.elapsed().as_secs_f64() / 1e6;
    println!("BENCH rpc_1MiB_MBps {mb_per_s:.0} MB/s");
}

fn unary_throughput(channel: &Channel, seconds: f64) {
    let chunk = payload(1024 * 1024);
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let reply: Number = channel.unary("test.Discard", &chunk, opts()).unwrap();
        sent += reply.value as u64;
    }
    let mb_per_s = sent as f64 / start.elapsed().as_secs_f64() / 1e6;
    println!("BENCH rpc_unary_1MiB_MBps {mb_per_s:.0} MB/s");
}

fn main() {
    let args = parse_args();
    let rtt_us = floor::loopback_rtt_p50_us(floor::RTT_ROUND_TRIPS_DEFAULT);
    println!("BENCH loopback_rtt_p50_us {rtt_us:.1} us");
    let cluster = Cluster::new();
    let server = TestServer::start(&cluster, TransportConfig::default());
    let client = Transport::start(TransportConfig::default()).unwrap();
    let channel = client.channel(&server.target(), &cluster.client_tls(Role::Worker));
    if args.runs("unary") {
        let pool_p50_us = unary_latency(&channel, args.calls, "test.Discard", "");
        floor::print_ratio("unary_p50_over_rtt", pool_p50_us, rtt_us);
        let inline_p50_us = unary_latency(&channel, args.calls, "test.InlineEcho", "_inline");
        floor::print_ratio("unary_inline_p50_over_rtt", inline_p50_us, rtt_us);
    }
    if args.runs("c64") {
        unary_concurrent(&channel, 64, args.seconds);
    }
    if args.runs("stream") {
        streamed_throughput(&channel, args.seconds);
    }
    if args.runs("unary_1MiB") {
        unary_throughput(&channel, args.seconds);
    }
    client.shutdown();
    server.stop();
}
