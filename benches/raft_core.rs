//! Entries committed per second by the Raft core under the simulator, with no IO: instant
//! network and disk, no faults, no invariant checks. Shows that the core is never the
//! bottleneck of a real node (whose floor is fsync and the network).
//!
//! `cargo bench --bench raft_core -- [--steps N] [--burst B] [--payload-bytes P]`
//! prints `BENCH core_commits_per_s_3n <v> entries/s` and the same for 5 nodes.

use std::time::Instant;

use flotilla::raft::sim::{Sim, SimConfig};

fn measure(nodes: usize, steps: u64, burst: usize, payload_bytes: usize) -> f64 {
    let config = SimConfig {
        steps,
        faults: false,
        check: false,
        propose_per_million: 1_000_000,
        proposal_burst: burst,
        proposal_bytes: payload_bytes,
        liveness_ticks: 0,
        nodes,
        snapshot_interval_entries: 50_000,
    };
    let mut sim = Sim::new(1, config);
    let began = Instant::now();
    sim.run().expect("no faults, no violations");
    let seconds = began.elapsed().as_secs_f64();
    assert!(sim.stats.elections >= 1, "a leader was elected");
    sim.stats.committed as f64 / seconds
}

fn main() {
    let mut steps = 100_000u64;
    let mut burst = 1024usize;
    let mut payload_bytes = 64usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().and_then(|v| v.parse::<u64>().ok());
        match arg.as_str() {
            "--steps" => steps = value().expect("--steps N"),
            "--burst" => burst = value().expect("--burst B") as usize,
            "--payload-bytes" => payload_bytes = value().expect("--payload-bytes P") as usize,
            _ => {} // cargo bench passes --bench
        }
    }
    for nodes in [3, 5] {
        let rate = measure(nodes, steps, burst, payload_bytes);
        println!("BENCH core_commits_per_s_{nodes}n {rate:.0} entries/s");
    }
}
