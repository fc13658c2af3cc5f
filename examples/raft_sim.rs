//! Runs the deterministic Raft simulator over a range of seeds.
//!
//! `cargo run --release --example raft_sim -- --seeds N --start S [--steps T] [--quiet]`
//! runs every seed with the read-staleness workload, prints one line per failing seed (with its reproduction command) and a last line exactly
//! `seeds=N violations=V steps=T`; it exits non-zero if any seed violated an invariant.

use std::process::ExitCode;
use std::time::Instant;

use flotilla::raft::sim::{ReadsSeeWrites, SimConfig, repro_command, run_seed_with};

fn main() -> ExitCode {
    let mut seeds = 100u64;
    let mut start = 0u64;
    let mut config = SimConfig::default();
    let mut verbose = false;
    let mut dump = false;
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
            "--dump" => dump = true,
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
        let outcome = run_seed_with(seed, &config, |sim| {
            sim.set_workload(Box::new(ReadsSeeWrites::default()));
        });
        steps += outcome.stats.steps;
        if verbose {
            println!("seed={seed} {:?}", outcome.stats);
        }
        if dump {
            let mut sim = flotilla::raft::sim::Sim::new(seed, config.clone());
            sim.set_workload(Box::new(ReadsSeeWrites::default()));
            sim.trace_after = std::env::var("SIM_TRACE_AFTER")
                .ok()
                .and_then(|v| v.parse().ok());
            let verdict = sim.run();
            println!("{verdict:?} {:?}\n{}", sim.stats, sim.describe());
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
