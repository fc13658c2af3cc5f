//! Cold start: how long `flotilla up` on an empty state directory takes to accept its first
//! write, the real binary started as an operator would (issue 16, target 4: ≤ 300 ms).
//!
//! Usage: `cargo bench --bench cold_start -- [--runs N] [--baseline PATH]` (default 5 runs).
//!
//! Each run starts `flotilla up` in a new temporary state directory on a free loopback port,
//! then runs `flotilla service create` (a service of 0 replicas: a control write through
//! Raft, no task started) again and again until one succeeds (the first attempts fail while
//! the state directory or the control socket does not exist yet), and times spawn → that
//! success; then kills the process. Prints the floor first, `BENCH fsync_p50_us` (append +
//! `fdatasync` where the state directories go: startup writes about 60 files and fsyncs,
//! fjall's included, so a slow disk weighs on it), then `BENCH up_to_first_write_ms`, the
//! median over the runs (each run on stderr). When `etcd` and `etcdctl` are on the `PATH`
//! (Debian's `etcd-server` and `etcd-client`) the peer is measured alike, alternating with
//! flotilla's runs: one member on an empty data directory, `etcdctl put` until one succeeds,
//! `BENCH etcd_up_to_first_write_ms`. `--baseline PATH` measures another `flotilla` binary
//! (an earlier build) the same way, alternating with this one:
//! `BENCH baseline_up_to_first_write_ms`.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "common/floor.rs"]
mod floor;
#[path = "../tests/procs/mod.rs"]
mod procs;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use procs::{Proc, flotilla_bin, free_addr};

/// Longest a run may take before the benchmark gives up (a broken build, not a slow one).
const RUN_TIMEOUT: Duration = Duration::from_secs(30);

struct Args {
    runs: usize,
    baseline: Option<String>,
}

fn parse_args() -> Args {
    let mut args = Args {
        runs: 5,
        baseline: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--runs" => args.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--baseline" => args.baseline = Some(it.next().expect("--baseline PATH")),
            "--bench" => {}
            other => panic!("unknown argument {other}; use --runs N --baseline PATH"),
        }
    }
    assert!(args.runs > 0, "--runs must be at least 1");
    args
}

/// Runs `attempt` until it returns true; panics after [`RUN_TIMEOUT`] from `started`.
fn until_success(started: Instant, what: &str, mut attempt: impl FnMut() -> bool) -> Duration {
    loop {
        if attempt() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < RUN_TIMEOUT,
            "{what}: no successful write within {RUN_TIMEOUT:?}"
        );
    }
}

/// Whether `program ARGS` exits successfully (its output discarded).
fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// One cold start of `flotilla up` (the binary `bin`, which also makes the writes) in a new
/// directory under `base`: spawn → first write.
fn flotilla_once(base: &Path, bin: &str) -> Duration {
    let tmp = tempfile::tempdir_in(base).unwrap();
    let state_dir = tmp.path().join("state");
    let state_dir = state_dir.to_str().unwrap();
    let addr = free_addr();
    let started = Instant::now();
    let mut up = Proc::start_program(
        "up",
        bin,
        &["up", "--state-dir", state_dir, "--listen", addr.as_str()],
    );
    let took = until_success(started, "flotilla up", || {
        succeeds(
            bin,
            &[
                "service",
                "create",
                "--detach",
                "--state-dir",
                state_dir,
                "--name",
                "first",
                "--replicas",
                "0",
                "--",
                "true",
            ],
        )
    });
    up.kill();
    took
}

/// Whether `name` is an executable on the `PATH`.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
}

/// One cold start of a single etcd member in a new directory under `base`: spawn → first
/// successful `etcdctl put`.
fn etcd_once(base: &Path) -> Duration {
    let tmp = tempfile::tempdir_in(base).unwrap();
    let data_dir = tmp.path().join("etcd");
    let client_url = format!("http://{}", free_addr());
    let peer_url = format!("http://{}", free_addr());
    let started = Instant::now();
    let mut etcd = Command::new("etcd")
        .args([
            "--name",
            "e1",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("e1={peer_url}"),
            "--initial-cluster-state",
            "new",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd");
    let took = until_success(started, "etcd", || {
        succeeds(
            "etcdctl",
            &[
                "--endpoints",
                &client_url,
                "--dial-timeout",
                "1s",
                "put",
                "first",
                "x",
            ],
        )
    });
    etcd.kill().unwrap();
    etcd.wait().unwrap();
    took
}

fn median_ms(mut runs: Vec<Duration>) -> f64 {
    runs.sort_unstable();
    runs[runs.len() / 2].as_secs_f64() * 1e3
}

fn main() {
    let args = parse_args();
    let base = std::env::temp_dir();
    let fsync_us = floor::fsync_p50_us(&base, floor::FSYNC_ITERATIONS_DEFAULT);
    println!("BENCH fsync_p50_us {fsync_us:.0} us");
    let with_etcd = on_path("etcd") && on_path("etcdctl");
    if !with_etcd {
        eprintln!("etcd or etcdctl is not on the PATH: the peer is not measured");
    }
    let (mut flotilla, mut baseline, mut etcd) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..args.runs {
        let took = flotilla_once(&base, flotilla_bin());
        eprintln!("run {run}: flotilla up → first write {took:?}");
        flotilla.push(took);
        if let Some(bin) = &args.baseline {
            let took = flotilla_once(&base, bin);
            eprintln!("run {run}: baseline up → first write {took:?}");
            baseline.push(took);
        }
        if with_etcd {
            let took = etcd_once(&base);
            eprintln!("run {run}: etcd → first write {took:?}");
            etcd.push(took);
        }
    }
    println!("BENCH up_to_first_write_ms {:.0} ms", median_ms(flotilla));
    if args.baseline.is_some() {
        println!(
            "BENCH baseline_up_to_first_write_ms {:.0} ms",
            median_ms(baseline)
        );
    }
    if with_etcd {
        println!("BENCH etcd_up_to_first_write_ms {:.0} ms", median_ms(etcd));
    }
}
