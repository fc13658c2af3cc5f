//! CPU time per thread of a process, from `/proc/<pid>/task/*/stat`, sampled before and
//! after a load phase: what each thread of each process spent per operation. Included by
//! the benchmarks with `#[path = "common/cpu.rs"] mod cpu;`.
//!
//! Threads are grouped by name (`comm`, which Linux truncates to 15 characters): a pool's
//! threads add up under one name. Owns nothing; must never change the processes it reads.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;

/// `/proc` counts CPU time in USER_HZ, 100 a second on every Linux architecture.
const TICKS_PER_SECOND: u64 = 100;

/// CPU ticks (user + system) per thread name of one process at one moment; threads that
/// ended since the start are lost, so sample processes whose threads live through the phase.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    ticks_by_thread: BTreeMap<String, u64>,
}

/// Reads the CPU of every thread of `pid` now (empty if the process is gone).
pub fn sample(pid: u32) -> Sample {
    let mut ticks_by_thread = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Sample::default();
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map_or("?", |(_, name)| name).to_string();
        // The fields after the command: state is field 0, utime 11, stime 12.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        *ticks_by_thread.entry(name).or_insert(0) += ticks;
    }
    Sample { ticks_by_thread }
}

/// Microseconds of CPU per operation between two samples of one process: per thread name
/// (largest first) and in total.
pub fn per_op_us(before: &Sample, after: &Sample, ops: u64) -> (Vec<(String, f64)>, f64) {
    let us = |ticks: u64| ticks as f64 * 1e6 / TICKS_PER_SECOND as f64 / ops.max(1) as f64;
    let mut threads: Vec<(String, f64)> = after
        .ticks_by_thread
        .iter()
        .map(|(name, ticks)| {
            let was = before.ticks_by_thread.get(name).copied().unwrap_or(0);
            (name.clone(), us(ticks.saturating_sub(was)))
        })
        .filter(|(_, us)| *us > 0.0)
        .collect();
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
    let total = threads.iter().map(|(_, us)| us).sum();
    (threads, total)
}

/// Prints `BENCH <name> <total> us` and, on stderr, the threads behind it.
pub fn report(name: &str, before: &Sample, after: &Sample, ops: u64) -> f64 {
    let (threads, total) = per_op_us(before, after, ops);
    println!("BENCH {name} {total:.1} us");
    let detail: Vec<String> = threads
        .iter()
        .map(|(thread, us)| format!("{thread} {us:.1}"))
        .collect();
    eprintln!("  {name}: {}", detail.join(", "));
    total
}
