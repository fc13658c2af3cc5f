//! Runs the deterministic Raft simulator over a range of seeds.
//!
//! `cargo run --release --example raft_sim -- --seeds N --start S [--steps T] [--verbose]
//! [--dump] [--workload kv|reads]` runs every seed with a client workload, prints one line per
//! failing seed (with its reproduction command) and a last line exactly
//! `seeds=N violations=V steps=T`; it exits non-zero if any seed violated an invariant.
//!
//! Workloads: `kv` (the default) is the key-value client workload of `raft::sim::workload`,
//! whose history is checked for linearizability at the end of every seed (a non-linearizable
//! history is a violation); `reads` is the read-staleness workload (`ReadsSeeWrites`).

use std::process::ExitCode;
use std::time::Instant;

use flotilla::raft::sim::workload::{self, KvReportHandle, KvWorkloadConfig};
use flotilla::raft::sim::{ReadsSeeWrites, Sim, SimConfig, repro_command, run_seed_with};

/// Which client workload drives the seeds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WorkloadKind {
    Kv,
    Reads,
}

/// Installs the workload on `sim`; the key-value workload's report handle, if it is that one.
fn install_workload(sim: &mut Sim, kind: WorkloadKind) -> Option<KvReportHandle> {
    match kind {
        WorkloadKind::Kv => Some(workload::install(sim, KvWorkloadConfig::default())),
        WorkloadKind::Reads => {
            sim.set_workload(Box::new(ReadsSeeWrites::default()));
            None
        }
    }
}

fn main() -> ExitCode {
    let mut seeds = 100u64;
    let mut start = 0u64;
    let mut config = SimConfig::default();
    let mut verbose = false;
    let mut dump = false;
    let mut kind = WorkloadKind::Kv;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--workload" {
            kind = match args.next().as_deref() {
                Some("kv") => WorkloadKind::Kv,
                Some("reads") => WorkloadKind::Reads,
                other => {
                    eprintln!("--workload takes kv or reads, not {other:?}");
                    return ExitCode::from(2);
                }
            };
            continue;
        }
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
        let mut kv_report = None;
        let outcome = run_seed_with(seed, &config, |sim| {
            kv_report = install_workload(sim, kind);
        });
        steps += outcome.stats.steps;
        if verbose {
            println!("seed={seed} {:?}", outcome.stats);
            if let Some(report) = &kv_report {
                let report = report.report();
                println!(
                    "seed={seed} kv ops={} returned={} unknown={} retries={} states={} \
                     linearizable={:?}",
                    report.ops_called,
                    report.ops_returned,
                    report.ops_unknown,
                    report.retries,
                    report.states_explored,
                    report.linearizable
                );
            }
        }
        if dump {
            let mut sim = Sim::new(seed, config.clone());
            let dump_report = install_workload(&mut sim, kind);
            sim.trace_after = std::env::var("SIM_TRACE_AFTER")
                .ok()
                .and_then(|v| v.parse().ok());
            let verdict = sim.run();
            println!("{verdict:?} {:?}\n{}", sim.stats, sim.describe());
            if let Some(explanation) = dump_report.and_then(|r| r.report().explanation) {
                println!("{explanation}");
            }
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
