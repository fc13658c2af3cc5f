//! Writes through one Raft member in this process, with the manager's state machine and its
//! key-value map (as `raft_cluster` runs it), and no network: the leader's CPU per write in
//! its raft, log-writer, apply and snapshot threads. Small and deterministic enough to run
//! under `valgrind --tool=callgrind`, which counts instructions whatever the machine's load
//! (A/B on a shared machine): instructions per write = (total at N writes − total at
//! `--writes 0`) / N.
//!
//! Usage: `cargo bench --bench kv_writes -- [--writes N] [--keys K] [--in-flight F]
//! [--value-bytes V]` (defaults 200,000 writes over 50,000 keys, 256 in flight, 256-byte
//! values: the map outgrows the snapshot interval, so snapshots follow the byte rule as in a
//! long `raft_cluster` run). Prints `kv_solo_writes_per_s` and `kv_solo_cpu_us_per_write`,
//! with each thread's share on stderr.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/cpu.rs"]
mod cpu;

use std::time::Instant;

use bytes::Bytes;
use flotilla::manager::state::ManagerState;
use flotilla::proto::kv as kvpb;
use flotilla::raft::node::{Bootstrap, NodeConfig};
use flotilla::replication::entry::encode_kv;
use flotilla::store::StoreConfig;

struct Args {
    writes: u64,
    keys: u64,
    in_flight: usize,
    value_bytes: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        writes: 200_000,
        keys: 50_000,
        in_flight: 256,
        value_bytes: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a number after the flag")
        };
        match arg.as_str() {
            "--writes" => args.writes = value(),
            "--keys" => args.keys = value().max(1),
            "--in-flight" => args.in_flight = value().max(1) as usize,
            "--value-bytes" => args.value_bytes = value() as usize,
            "--bench" => {}
            other => panic!("unknown argument {other}; see the file's doc comment"),
        }
    }
    args
}

fn put(key: u64, value: &Bytes) -> Vec<u8> {
    encode_kv(&kvpb::Command {
        op: Some(kvpb::command::Op::Put(kvpb::Put {
            key: format!("bench-key-{key}"),
            value: value.clone(),
        })),
    })
}

fn main() {
    let args = parse_args();
    let config = NodeConfig::new(1, "127.0.0.1:1".into(), Bootstrap::NewCluster);
    let machine = ManagerState::new(StoreConfig::default(), true);
    let solo = common::start_solo_leader(config, Box::new(machine));
    let node = solo.node.handle().clone();
    let value = Bytes::from(vec![0x5a; args.value_bytes]);
    // Closed loop: a token per write in flight, given back by the write's callback.
    let (tokens_tx, tokens_rx) = crossbeam_channel::bounded::<Result<(), String>>(args.in_flight);
    for _ in 0..args.in_flight {
        tokens_tx.send(Ok(())).unwrap();
    }
    let before = cpu::sample(std::process::id());
    let started = Instant::now();
    for i in 0..args.writes {
        tokens_rx.recv().unwrap().unwrap();
        let tokens = tokens_tx.clone();
        node.propose_with(
            &put(i % args.keys, &value),
            Box::new(move |result| {
                let _ = tokens.send(result.map(drop).map_err(|e| e.to_string()));
            }),
        );
    }
    for _ in 0..args.in_flight {
        tokens_rx.recv().unwrap().unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let after = cpu::sample(std::process::id());
    println!(
        "BENCH kv_solo_writes_per_s {:.0} ops/s",
        args.writes as f64 / seconds.max(1e-9)
    );
    cpu::report("kv_solo_cpu_us_per_write", &before, &after, args.writes);
    solo.node.shutdown();
    solo.transport.shutdown();
}
