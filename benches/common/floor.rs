//! The physical floors a benchmark is judged against, measured in the same run (they differ
//! between machines, and on a shared one from minute to minute): a durable append
//! (`write` + `fdatasync` of a small record at the end of a plain file) and a loopback TCP
//! round trip (a blocking ping-pong with `TCP_NODELAY`). Included by the benchmarks with
//! `#[path = "common/floor.rs"] mod floor;`.
//!
//! Owns nothing beyond the temporary file and sockets of one measurement; must never touch
//! flotilla's own code paths (it measures what the hardware and kernel give, not flotilla).
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Appends measured for the fsync floor (after [`WARMUP_ITERATIONS`]).
pub const FSYNC_ITERATIONS_DEFAULT: usize = 1000;
/// Round trips measured for the loopback floor (after [`WARMUP_ITERATIONS`]).
pub const RTT_ROUND_TRIPS_DEFAULT: usize = 2000;
/// Bytes of one ping (and of its pong).
pub const RTT_MESSAGE_BYTES: usize = 64;
/// Smallest and largest append of the fsync floor: each iteration appends a size cycling
/// through this range, the sizes of small Raft batches.
pub const FSYNC_APPEND_BYTES_MIN: usize = 256;
/// See [`FSYNC_APPEND_BYTES_MIN`].
pub const FSYNC_APPEND_BYTES_MAX: usize = 4096;
/// Iterations run first and not counted (file creation, first block allocation, connect).
pub const WARMUP_ITERATIONS: usize = 50;

/// The two floors of one run, in microseconds (medians).
#[derive(Clone, Copy, Debug)]
pub struct Floors {
    /// Median `write` + `fdatasync` of a small append.
    pub fsync_p50_us: f64,
    /// Median loopback TCP round trip of [`RTT_MESSAGE_BYTES`].
    pub loopback_rtt_p50_us: f64,
}

impl Floors {
    /// What one replicated write cannot beat: one fsync plus one round trip.
    pub fn commit_floor_us(&self) -> f64 {
        self.fsync_p50_us + self.loopback_rtt_p50_us
    }
}

/// Measures both floors (the disk one in `dir`) and prints their `BENCH` lines.
pub fn measure_and_print(dir: &Path) -> Floors {
    let floors = Floors {
        fsync_p50_us: fsync_p50_us(dir, FSYNC_ITERATIONS_DEFAULT),
        loopback_rtt_p50_us: loopback_rtt_p50_us(RTT_ROUND_TRIPS_DEFAULT),
    };
    println!("BENCH fsync_p50_us {:.0} us", floors.fsync_p50_us);
    println!(
        "BENCH loopback_rtt_p50_us {:.1} us",
        floors.loopback_rtt_p50_us
    );
    floors
}

/// Prints `BENCH <name> <ratio> x`, the figure over its floor (`figure_us / floor_us`).
pub fn print_ratio(name: &str, figure_us: f64, floor_us: f64) {
    println!("BENCH {name} {:.2} x", figure_us / floor_us);
}

/// Writes `bytes` at the end of `file` and makes them durable (`fdatasync`): the least a
/// hand-written log could do per write. Returns how long it took.
pub fn append_and_sync(file: &mut File, bytes: &[u8]) -> Duration {
    let start = Instant::now();
    file.write_all(bytes).unwrap();
    file.sync_data().unwrap();
    start.elapsed()
}

/// Median of `iterations` appends + `fdatasync` to a new file in `dir` (removed after),
/// each of a size between [`FSYNC_APPEND_BYTES_MIN`] and [`FSYNC_APPEND_BYTES_MAX`].
pub fn fsync_p50_us(dir: &Path, iterations: usize) -> f64 {
    let tmp = tempfile::tempdir_in(dir).unwrap();
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp.path().join("fsync-floor.log"))
        .unwrap();
    let record = vec![0x5a_u8; FSYNC_APPEND_BYTES_MAX];
    let span = FSYNC_APPEND_BYTES_MAX - FSYNC_APPEND_BYTES_MIN + 1;
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..WARMUP_ITERATIONS + iterations {
        // A spread of sizes without a random generator: a step coprime with the span.
        let bytes = FSYNC_APPEND_BYTES_MIN + (i * 977) % span;
        let took = append_and_sync(&mut file, &record[..bytes]);
        if i >= WARMUP_ITERATIONS {
            samples.push(took);
        }
    }
    p50_us(samples)
}

/// Median of `round_trips` blocking ping-pongs of [`RTT_MESSAGE_BYTES`] over 127.0.0.1
/// (`TCP_NODELAY` on both ends), the echo served by a thread of its own.
pub fn loopback_rtt_p50_us(round_trips: usize) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let total = WARMUP_ITERATIONS + round_trips;
    let echo = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept().unwrap();
        socket.set_nodelay(true).unwrap();
        let mut message = [0u8; RTT_MESSAGE_BYTES];
        for _ in 0..total {
            socket.read_exact(&mut message).unwrap();
            socket.write_all(&message).unwrap();
        }
    });
    let mut socket = TcpStream::connect(addr).unwrap();
    socket.set_nodelay(true).unwrap();
    let mut message = [0xa5u8; RTT_MESSAGE_BYTES];
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..total {
        let start = Instant::now();
        socket.write_all(&message).unwrap();
        socket.read_exact(&mut message).unwrap();
        if i >= WARMUP_ITERATIONS {
            samples.push(start.elapsed());
        }
    }
    echo.join().unwrap();
    p50_us(samples)
}

/// The median of `samples`, in microseconds.
pub fn p50_us(mut samples: Vec<Duration>) -> f64 {
    assert!(!samples.is_empty(), "a median needs samples");
    samples.sort_unstable();
    samples[samples.len() / 2].as_secs_f64() * 1e6
}
