//! Runs the deterministic Raft simulator over a range of seeds.
//!
//! `cargo run --release --example raft_sim -- --seeds N --start S [--steps T] [--quiet]
//! [--no-kv]` prints one line per failing seed (with its reproduction command) and a last line
//! exactly `seeds=N violations=V steps=T`; it exits non-zero if any seed violated an
//! invariant. Every seed runs the key-value client workload (`raft::sim::workload`) and checks
//! its history for linearizability (a non-linearizable history is a violation) unless
//! `--no-kv` is given.

use std::process::ExitCode;
use std::time::Instant;

use flotilla::raft::sim::workload::{KvWorkloadConfig, run_seed_with_kv};
use flotilla::raft::sim::{SimConfig, repro_command, run_seed};

fn main() -> ExitCode {
    let mut seeds = 100u64;
    let mut start = 0u64;
    let mut config = SimConfig::default();
    let mut verbose = false;
    let mut kv = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("{arg} needs a number"))
        };
        match arg.as_str() {
            "--seeds" => seeds = value(),
            "--start" => start = value(),
            "--steps" => config.steps = value(),
            "--verbose" => verbose = true,
            "--no-kv" => kv = false,
            other => {
                eprintln!("unknown argument {other}");
                return ExitCode::from(2);
            }
        }
    }
    let began = Instant::now();
    let mut violations = 0u64;
    let mut steps = 0u64;
    for seed in start..start + seeds {
        let outcome = if kv {
            let (outcome, report) = run_seed_with_kv(seed, &config, &KvWorkloadConfig::default());
            if verbose {
                println!("seed={seed} {report:?}");
            }
            outcome
        } else {
            run_seed(seed, &config)
        };
        steps += outcome.stats.steps;
        if verbose {
            println!("seed={seed} {:?}", outcome.stats);
        }
        if let Some(violation) = outcome.violation {
            violations += 1;
            println!(
                "seed={seed} VIOLATION {violation} | repro: {}",
                repro_command(seed, config.steps)
            );
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    eprintln!(
        "{:.0} steps/s over {seconds:.1} s",
        steps as f64 / seconds.max(1e-9)
    );
    println!("seeds={seeds} violations={violations} steps={steps}");
    if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
