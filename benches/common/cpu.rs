//! CPU time per thread of a process, from `/proc/<pid>/task/*/schedstat` (nanoseconds on
//! a CPU; `stat`'s 10 ms ticks round a short-lived pool thread down to nothing), sampled before and
//! after a load phase: what each thread of each process spent per operation. Included by
//! the benchmarks with `#[path = "common/cpu.rs"] mod cpu;`.
//!
//! Threads are grouped by name (`comm`, which Linux truncates to 15 characters): a pool's
//! threads add up under one name. Owns nothing; must never change the processes it reads.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;

/// CPU nanoseconds (user + system) per thread name of one process at one moment; threads
/// that ended since the start are lost, so sample while the phase's threads still exist.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    ns_by_thread: BTreeMap<String, u64>,
    /// The whole process (`/proc/<pid>/stat`, in 10 ms ticks): it keeps the CPU of threads
    /// that ended (a snapshot writer, say), which the per-thread figures lose.
    process_ns: u64,
}

/// `/proc/<pid>/stat` counts in USER_HZ, 100 ticks a second on every Linux architecture.
const NS_PER_TICK: u64 = 10_000_000;

/// User + system CPU of the whole process `pid`, threads that ended included.
fn process_ns(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    // After the command: state is field 0, utime 11, stime 12.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks * NS_PER_TICK
}

/// Reads the CPU of every thread of `pid` now (empty if the process is gone).
pub fn sample(pid: u32) -> Sample {
    let mut ns_by_thread = BTreeMap::new();
    let process_ns = process_ns(pid);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Sample::default();
    };
    for task in tasks.flatten() {
        let (Ok(comm), Ok(schedstat)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        // The first field: time spent on a CPU, in nanoseconds.
        let Some(ns) = schedstat
            .split_whitespace()
            .next()
            .and_then(|field| field.parse::<u64>().ok())
        else {
            continue;
        };
        *ns_by_thread.entry(comm.trim_end().to_string()).or_insert(0) += ns;
    }
    Sample {
        ns_by_thread,
        process_ns,
    }
}

/// Microseconds of CPU per operation between two samples of one process: per thread name
/// (largest first, those of 0.05 us or more) and in total.
pub fn per_op_us(before: &Sample, after: &Sample, ops: u64) -> (Vec<(String, f64)>, f64) {
    let us = |ns: u64| ns as f64 / 1e3 / ops.max(1) as f64;
    let mut threads: Vec<(String, f64)> = after
        .ns_by_thread
        .iter()
        .map(|(name, ns)| {
            let was = before.ns_by_thread.get(name).copied().unwrap_or(0);
            (name.clone(), us(ns.saturating_sub(was)))
        })
        .collect();
    let threads_total: f64 = threads.iter().map(|(_, us)| us).sum();
    // Threads that ended during the phase are only in the process's own count.
    let process_total = us(after.process_ns.saturating_sub(before.process_ns));
    let ended = process_total - threads_total;
    if ended > 0.05 * threads_total.max(1.0) {
        threads.push(("(threads that ended)".to_string(), ended));
    }
    let total = threads_total.max(process_total);
    // Named in the detail: threads of at least 0.05 us per operation (all count in the total).
    threads.retain(|(_, us)| *us >= 0.05);
    threads.sort_by(|a, b| b.1.total_cmp(&a.1));
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
