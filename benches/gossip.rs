//! Gossip convergence and cost through a simulation of N nodes running the real core, codec
//! and encryption (every packet sealed and opened with AES-256-GCM): `cargo bench --bench
//! gossip -- --nodes N [--bulk-entries E]`.
//!
//! - `gossip_converge_p999_ms_<N>` / `gossip_converge_all_ms_<N>`: simulated time from one
//!   update on one node until 99.9 % / all of the network's nodes hold it (10 ms steps,
//!   1–5 ms of delay per packet, no loss), the median over several updates;
//! - `gossip_bytes_per_node_per_s_<N>` (at rest) and `…_10ups_<N>` (under 10 updates a
//!   second): sealed bytes sent per node per simulated second;
//! - `bulk_sync_rss_growth_MiB`: the process's RSS growth while one node streams a table of
//!   E entries (default 1,000,000) to another chunk by chunk (each sealed, opened and
//!   merged), over the RSS with both tables built.
//!
//! Beside each convergence figure: memberlist's theory for the same parameters (push gossip,
//! fanout 3 every 200 ms: the infected fraction i grows as 1 − (1 − i)·e^(−3i) per round).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla::gossip::keyring::{Keyring, Kind};
use flotilla::gossip::{GOSSIP_FANOUT, GOSSIP_INTERVAL_MS, Gossip, GossipConfig, NodeAddr};

const STEP_MS: u64 = 10;
const NETWORK: &str = "bench";
const TABLE: &str = "endpoints";
const UPDATES_MEASURED: usize = 5;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

struct Sim {
    now_ms: u64,
    nodes: Vec<Gossip>,
    by_addr: BTreeMap<NodeAddr, usize>,
    in_flight: BTreeMap<(u64, u64), (usize, usize, Bytes)>,
    seq: u64,
    rng: Rng,
    keyring: Keyring,
    bytes_sent: u64,
}

impl Sim {
    fn new(count: usize) -> Self {
        let mut keyring = Keyring::new();
        keyring.add(&[7; 32]).unwrap();
        let mut sim = Sim {
            now_ms: 0,
            nodes: Vec::new(),
            by_addr: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            rng: Rng(42),
            keyring,
            bytes_sent: 0,
        };
        for i in 0..count {
            let addr = NodeAddr(format!(
                "10.{}.{}.{}:7946",
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ));
            let mut node = Gossip::new(
                GossipConfig::new(&format!("node-{i}"), addr.clone(), sim.rng.next()),
                0,
            );
            node.join_network(NETWORK).unwrap();
            sim.by_addr.insert(addr, i);
            sim.nodes.push(node);
        }
        let seed = vec![NodeAddr("10.0.0.0:7946".into())];
        for node in &mut sim.nodes {
            node.join(seed.clone());
        }
        sim
    }

    fn nonce(&mut self) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.rng.next().to_le_bytes());
        nonce[8..].copy_from_slice(&(self.rng.next() as u32).to_le_bytes());
        nonce
    }

    fn drain(&mut self, i: usize) {
        let output = self.nodes[i].poll_output();
        for (to, packet) in output.packets {
            let nonce = self.nonce();
            let sealed = self.keyring.seal(Kind::Packet, nonce, &packet).unwrap();
            self.bytes_sent += sealed.len() as u64;
            let Some(&to) = self.by_addr.get(&to) else {
                continue;
            };
            self.seq += 1;
            let at = self.now_ms + 1 + self.rng.next() % 5;
            self.in_flight
                .insert((at, self.seq), (i, to, Bytes::from(sealed)));
        }
        // Bulk sync is measured on its own (below): sessions here are sent whole.
        for (session, to) in output.bulk_sessions {
            let Some(&to) = self.by_addr.get(&to) else {
                continue;
            };
            let from = self.nodes[i].addr().clone();
            while let Some(chunk) = self.nodes[i].next_chunk(session) {
                let nonce = self.nonce();
                let sealed = self.keyring.seal(Kind::Chunk, nonce, &chunk).unwrap();
                let plain = self.keyring.open(Kind::Chunk, &sealed).unwrap();
                self.nodes[to].receive_chunk(&from, &plain, self.now_ms);
            }
        }
    }

    fn step(&mut self) {
        self.now_ms += STEP_MS;
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let (from, to, sealed) = entry.remove();
            let plain = self.keyring.open(Kind::Packet, &sealed).unwrap();
            let from_addr = self.nodes[from].addr().clone();
            self.nodes[to].receive(&from_addr, &plain, self.now_ms);
            self.drain(to);
        }
        for i in 0..self.nodes.len() {
            self.nodes[i].tick(self.now_ms);
            self.drain(i);
        }
    }

    fn run_for(&mut self, ms: u64) {
        let end = self.now_ms + ms;
        while self.now_ms < end {
            self.step();
        }
    }

    fn all_see_everyone(&self) -> bool {
        let n = self.nodes.len();
        self.nodes
            .iter()
            .all(|g| g.members().filter(|m| m.is_live()).count() == n - 1)
    }

    /// Puts one entry on node `writer` and steps until every node holds it: the times at
    /// which 99.9 % and all did, from the put.
    fn converge(&mut self, writer: usize, key: &str) -> (u64, u64) {
        let start = self.now_ms;
        self.nodes[writer]
            .put(TABLE, NETWORK, key, Bytes::from_static(b"10.0.0.1:80"))
            .unwrap();
        let n = self.nodes.len();
        let p999_count = (n * 999).div_ceil(1000);
        let mut p999_ms = None;
        loop {
            self.step();
            let holding = self
                .nodes
                .iter()
                .filter(|g| g.get(NETWORK, TABLE, key).is_some())
                .count();
            if p999_ms.is_none() && holding >= p999_count {
                p999_ms = Some(self.now_ms - start);
            }
            if holding == n {
                return (p999_ms.unwrap_or(self.now_ms - start), self.now_ms - start);
            }
            assert!(self.now_ms - start < 120_000, "no convergence in 120 s");
        }
    }
}

/// memberlist's push-gossip theory: rounds until a fraction `target` holds an update.
fn theory_rounds(n: usize, target: f64) -> u32 {
    let mut infected = 1.0 / n as f64;
    let mut rounds = 0;
    while infected < target && rounds < 1000 {
        infected = 1.0 - (1.0 - infected) * (-(GOSSIP_FANOUT as f64) * infected).exp();
        rounds += 1;
    }
    rounds
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values[values.len() / 2]
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn convergence(n: usize) {
    let mut sim = Sim::new(n);
    let mut waited_ms = 0;
    while !sim.all_see_everyone() {
        sim.run_for(1_000);
        waited_ms += 1_000;
        assert!(waited_ms < 600_000, "membership did not converge in 10 min");
    }
    // Let the join traffic and bulk syncs settle.
    sim.run_for(10_000);
    let rest_start = (sim.bytes_sent, sim.now_ms);
    sim.run_for(10_000);
    let per_node_s = |bytes: u64, ms: u64| bytes as f64 * 1000.0 / ms as f64 / n as f64;
    let rest = per_node_s(sim.bytes_sent - rest_start.0, sim.now_ms - rest_start.1);
    let (mut p999, mut all) = (Vec::new(), Vec::new());
    for u in 0..UPDATES_MEASURED {
        let writer = (u * 7919) % n;
        let (a, b) = sim.converge(writer, &format!("measured-{u}"));
        p999.push(a);
        all.push(b);
        sim.run_for(3_000);
    }
    // 10 updates a second (one every 100 ms, from rotating writers) for 10 s.
    let busy_start = (sim.bytes_sent, sim.now_ms);
    for u in 0..100 {
        let writer = (u * 104_729) % n;
        sim.nodes[writer]
            .put(
                TABLE,
                NETWORK,
                &format!("load-{}", u % 20),
                Bytes::from_static(b"x"),
            )
            .unwrap();
        sim.run_for(100);
    }
    let busy = per_node_s(sim.bytes_sent - busy_start.0, sim.now_ms - busy_start.1);
    let round_ms = GOSSIP_INTERVAL_MS;
    println!(
        "BENCH gossip_converge_p999_ms_{n} {} ms (memberlist theory: {} ms; target 2000)",
        median(p999),
        u64::from(theory_rounds(n, 0.999)) * round_ms
    );
    println!(
        "BENCH gossip_converge_all_ms_{n} {} ms (memberlist theory: {} ms; target 3000)",
        median(all),
        u64::from(theory_rounds(n, 1.0 - 0.5 / n as f64)) * round_ms
    );
    println!("BENCH gossip_bytes_per_node_per_s_{n} {rest:.0} B/s (at rest)");
    println!("BENCH gossip_bytes_per_node_per_s_10ups_{n} {busy:.0} B/s (10 updates/s)");
}

fn rss_mib() -> f64 {
    flotilla::util::memory::rss_kib().unwrap_or(0) as f64 / 1024.0
}

/// One node streams `entries` to another, one sealed chunk at a time.
fn bulk_sync_rss(entries: usize) {
    let a = NodeAddr("10.0.0.1:7946".into());
    let b = NodeAddr("10.0.0.2:7946".into());
    let mut sender = Gossip::new(GossipConfig::new("sender", a.clone(), 1), 0);
    let mut receiver = Gossip::new(GossipConfig::new("receiver", b.clone(), 2), 0);
    sender.join_network(NETWORK).unwrap();
    receiver.join_network(NETWORK).unwrap();
    // Meet (membership only: no table yet).
    sender.join(vec![b.clone()]);
    let mut now = 0;
    for _ in 0..50 {
        now += STEP_MS;
        for (from, to) in [(0, 1), (1, 0)] {
            let (src, dst) = if from == 0 {
                (&mut sender, &mut receiver)
            } else {
                (&mut receiver, &mut sender)
            };
            src.tick(now);
            let out = src.poll_output();
            let from_addr = if to == 1 { a.clone() } else { b.clone() };
            for (_, p) in out.packets {
                dst.receive(&from_addr, &p, now);
            }
            for (session, _) in out.bulk_sessions {
                while src.next_chunk(session).is_some() {}
            }
        }
    }
    for i in 0..entries {
        sender
            .put(
                TABLE,
                NETWORK,
                &format!("task-{i:08}"),
                Bytes::from(format!("10.0.{}.{}:80", (i >> 8) & 255, i & 255)),
            )
            .unwrap();
    }
    let _ = sender.poll_output();
    let mut keyring = Keyring::new();
    keyring.add(&[7; 32]).unwrap();
    let mut rng = Rng(9);
    // The first sync fills the receiver's table (its growth is the table's, not the
    // sync's); the second, measured, is the periodic one between nodes whose tables are
    // equal: what it costs beyond the tables is the sync's own memory.
    let _ = sync_once(&mut sender, &mut receiver, &keyring, &mut rng, now);
    flotilla::util::memory::release_free_memory();
    let before = rss_mib();
    let (chunks, peak) = sync_once(&mut sender, &mut receiver, &keyring, &mut rng, now);
    let held = receiver.entries(NETWORK).len();
    println!(
        "BENCH bulk_sync_rss_growth_MiB {:.1} MiB ({entries} entries in {chunks} chunks, {held} held by the receiver; target 64)",
        peak - before
    );
}

/// One full bulk sync from `sender` to `receiver`, each chunk sealed, opened and merged:
/// the chunks sent and the peak RSS seen (MiB).
fn sync_once(
    sender: &mut Gossip,
    receiver: &mut Gossip,
    keyring: &Keyring,
    rng: &mut Rng,
    now: u64,
) -> (usize, f64) {
    let from = sender.addr().clone();
    let mut peak = rss_mib();
    let mut chunks = 0;
    sender.sync_with("receiver");
    for (session, _) in sender.poll_output().bulk_sessions {
        while let Some(chunk) = sender.next_chunk(session) {
            let mut nonce = [0u8; 12];
            nonce[..8].copy_from_slice(&rng.next().to_le_bytes());
            let sealed = keyring.seal(Kind::Chunk, nonce, &chunk).unwrap();
            drop(chunk);
            let plain = keyring.open(Kind::Chunk, &sealed).unwrap();
            receiver.receive_chunk(&from, &plain, now);
            // An unsolicited session's end makes the receiver sync back: not measured.
            for (back, _) in receiver.poll_output().bulk_sessions {
                receiver.abort_session(back);
            }
            chunks += 1;
            peak = peak.max(rss_mib());
        }
    }
    (chunks, peak)
}

fn main() {
    let n = arg("--nodes", 100);
    let entries = arg("--bulk-entries", 1_000_000);
    convergence(n);
    bulk_sync_rss(entries);
}
