//! The deterministic simulator: many [`crate::raft::core::RaftCore`]s on a simulated network,
//! disk and clock, all driven by one seed, with Raft's safety invariants checked after every
//! step.
//!
//! One seed drives message loss, delay, reordering and duplication, symmetric and asymmetric
//! partitions, crash and restart (losing every write not yet durable), per-node tick rates,
//! stalled disks, membership changes, leadership transfers, snapshots and compaction. The
//! checker ([`checker::Checker`]) verifies after every step: at most one leader per term; log
//! matching; leader completeness; state-machine safety (same entry and same state at every
//! index); no committed entry lost (never overwritten, durable on a quorum when committed);
//! monotonic term, vote and commit (in memory per incarnation, and on disk). After the faulty
//! phase everything heals and a fresh entry must commit (liveness). A failing seed is replayed
//! with the one-line command [`repro_command`] prints; runs are bit-for-bit reproducible
//! because every choice comes from [`rng::SimRng`] and events are ordered by (time, sequence).
//!
//! # Plugging in a client workload
//!
//! Implement [`hook::Workload`] and install it with [`cluster::Sim::set_workload`] before
//! [`cluster::Sim::run`]. After every step the simulator calls `Workload::on_step` with a
//! [`hook::Client`]: it can find the leader (`leader()`, `nodes()`), `propose(node, data)`
//! (returns the index and term the entry must be applied at) and `read_index(node, ctx)`.
//! The simulator reports `on_applied(node, entry, now)` for every entry each node applies (in
//! log order; a proposal succeeded iff an entry with its index *and* term is applied),
//! `on_read_ready(node, read, now)` once a confirmed read's index is applied on that node,
//! `on_crash(node)` when a node loses its state, and asks for `snapshot(node)` /
//! `restore(node, data)` of the workload's state machine when it compacts, installs or
//! restarts. `finish(now)` returns the verdict (e.g. a linearizability check). Timeouts are
//! the workload's business: use `Client::now`. Randomness must come from `Client::rng`.
//!
//! This module must never be used outside tests, examples and benchmarks: it is a harness.

pub mod checker;
pub mod cluster;
pub mod harness;
pub mod hook;
pub mod reads;
/// The seeded generator every choice of the simulator comes from (it lives in `util`, so that
/// `lincheck`'s randomized tests use it without importing `raft`).
pub use crate::util::rng;
pub mod workload;

pub use cluster::{Sim, SimConfig, SimStats};
pub use hook::{Client, NodeView, Workload};
pub use reads::ReadsSeeWrites;

/// Outcome of one seed.
#[derive(Clone, Debug)]
pub struct SeedOutcome {
    /// The seed.
    pub seed: u64,
    /// Counters of the run.
    pub stats: SimStats,
    /// The violation found, if any.
    pub violation: Option<String>,
}

/// The command that replays `seed` with the default run shape.
pub fn repro_command(seed: u64, steps: u64) -> String {
    format!("cargo run --release --example raft_sim -- --seeds 1 --start {seed} --steps {steps}")
}

/// Runs one seed, turning a panic inside the core into a violation.
pub fn run_seed(seed: u64, config: &SimConfig) -> SeedOutcome {
    run_seed_with(seed, config, |_| {})
}

/// Runs one seed after `setup` (for example installing a workload) prepared the simulator.
pub fn run_seed_with(seed: u64, config: &SimConfig, setup: impl FnOnce(&mut Sim)) -> SeedOutcome {
    let config = config.clone();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let mut sim = Sim::new(seed, config);
        setup(&mut sim);
        let verdict = sim.run();
        (sim.stats, verdict.err())
    }));
    match result {
        Ok((stats, violation)) => SeedOutcome {
            seed,
            stats,
            violation,
        },
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_else(|| "unknown panic".to_string());
            SeedOutcome {
                seed,
                stats: SimStats::default(),
                violation: Some(format!("panic: {what}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds run by `cargo test` (more through `examples/raft_sim.rs`).
    const TEST_SEEDS: u64 = 500;

    #[test]
    fn seeds_hold_every_invariant() {
        let config = SimConfig::default();
        let mut failures = Vec::new();
        let mut committed = 0;
        for seed in 0..TEST_SEEDS {
            let outcome = run_seed(seed, &config);
            committed += outcome.stats.committed;
            if let Some(violation) = outcome.violation {
                failures.push(format!(
                    "{violation}\n  repro: {}",
                    repro_command(seed, config.steps)
                ));
            }
        }
        assert!(
            failures.is_empty(),
            "{} failing seeds:\n{}",
            failures.len(),
            failures.join("\n")
        );
        assert!(
            committed > TEST_SEEDS * 10,
            "the runs must make progress, committed {committed}"
        );
    }

    #[test]
    fn reads_through_the_workload_hook_see_acknowledged_writes() {
        let config = SimConfig::default();
        let mut failures = Vec::new();
        let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        for seed in 0..200 {
            let workload = ReadsSeeWrites::counting(served.clone());
            let outcome = run_seed_with(seed, &config, |sim| sim.set_workload(Box::new(workload)));
            if let Some(violation) = outcome.violation {
                failures.push(format!("seed {seed}: {violation}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
        let served = served.load(std::sync::atomic::Ordering::Relaxed);
        assert!(served > 1000, "reads were served: {served}");
    }

    #[test]
    fn a_seed_replays_exactly() {
        let config = SimConfig::default();
        let first = run_seed(7, &config);
        let second = run_seed(7, &config);
        assert_eq!(format!("{:?}", first.stats), format!("{:?}", second.stats));
    }
}
