//! The deterministic simulator of the gossip core (tests only): N nodes on a simulated
//! network and clock, every choice from one seed ([`crate::util::rng::SimRng`]). The faulty
//! phase mixes packet loss, delay (so reordering), duplication, garbage packets, partitions,
//! pauses (a node that stops and resumes with its state), crashes with a fresh restart (state
//! lost, entries republished), graceful leaves and rejoins, network joins and leaves, and
//! puts and deletes (own keys, and shared keys written by several nodes: Lamport ties). Then
//! everything heals and, after [`HEAL_MS`], the invariants must hold:
//!
//! Every packet and chunk travels sealed with the real keyring (AES-256-GCM), as the driver
//! sends them, and a mangled one is dropped when it fails to authenticate. Mangling plain
//! protobuf made well-formed but false messages that no real node can receive (seed 1136:
//! one flipped byte turned node-0's tombstone of `node-0/k2` into one of `node-3/k2`, which
//! buried node-3's live entry everywhere); the decoders' robustness against garbage is the
//! fuzz targets' job (`fuzz/`).
//! - every live node sees every other live node alive (no live, reachable node stays failed);
//! - every live node attached to a network holds the same visible table;
//! - each node's own keys there are exactly what it last wrote (nothing deleted comes back,
//!   nothing written is lost), and no entry is owned by a node that left or is not attached;
//! - a node not attached to a network holds nothing of it.
//!
//! `GOSSIP_SIM_SEEDS=N` runs N seeds (default [`DEFAULT_SEEDS`]); `GOSSIP_SIM_SEED=S` replays
//! one. Must never use wall-clock time or OS randomness.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

use super::keyring::{Keyring, Kind};
use super::{Gossip, GossipConfig, MemberStatus, NodeAddr, codec};
use crate::util::rng::SimRng;

/// Seeds run by `cargo test` (about half a second each in release).
const DEFAULT_SEEDS: u64 = 24;
/// Simulated step.
const STEP_MS: u64 = 10;
/// Length of the faulty phase at most.
const FAULTY_MS_MAX: u64 = 90_000;
/// Time given to converge after everything healed (more than the 30 s periodic bulk sync,
/// several times).
const HEAL_MS: u64 = 150_000;
/// A leaving node keeps gossiping this long before it stops.
const LEAVE_LINGER_MS: u64 = 3_000;
const NETWORKS: [&str; 3] = ["red", "blue", "green"];
const TABLE: &str = "endpoints";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    Up,
    Paused,
    Crashed,
    Leaving(u64),
    Left,
}

struct Node {
    name: String,
    addr: NodeAddr,
    gossip: Gossip,
    run: Run,
    networks: BTreeSet<String>,
    /// (network, key) → what this node last wrote (None: deleted).
    own: BTreeMap<(String, String), Option<Bytes>>,
}

enum Payload {
    Packet(Bytes),
    Chunk(Bytes),
}

struct InFlight {
    from: usize,
    to: usize,
    payload: Payload,
}

struct Faults {
    loss_per_million: u32,
    dup_per_million: u32,
    garbage_per_million: u32,
    delay_ms_max: u64,
}

struct Sim {
    seed: u64,
    rng: SimRng,
    now_ms: u64,
    nodes: Vec<Node>,
    by_addr: BTreeMap<NodeAddr, usize>,
    in_flight: BTreeMap<(u64, u64), InFlight>,
    next_seq: u64,
    partition: Option<Vec<u8>>,
    faults: Faults,
    written: u64,
    chunk_bytes_max: usize,
    trace_last: Vec<String>,
    /// The cluster key every packet and chunk is sealed under (as the driver does).
    keyring: Keyring,
    /// Packets and chunks dropped because they did not authenticate (the mangled ones).
    unauthenticated: u64,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut rng = SimRng::new(seed);
        let count = rng.range(3, 8) as usize;
        let faults = Faults {
            loss_per_million: rng.range(0, 200_000) as u32,
            dup_per_million: rng.range(0, 50_000) as u32,
            garbage_per_million: rng.range(0, 5_000) as u32,
            delay_ms_max: rng.range(1, 300),
        };
        let mut sim = Self {
            seed,
            rng,
            now_ms: 0,
            nodes: Vec::new(),
            by_addr: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            next_seq: 0,
            partition: None,
            faults,
            written: 0,
            chunk_bytes_max: 0,
            trace_last: Vec::new(),
            keyring: Keyring::new(),
            unauthenticated: 0,
        };
        sim.keyring
            .add(&[0x5a; super::keyring::KEY_BYTES])
            .expect("a 32-byte key");
        for i in 0..count {
            let name = format!("node-{i}");
            let addr = NodeAddr(format!("10.0.0.{i}:7946"));
            let gossip = sim.fresh_gossip(&name, &addr);
            sim.by_addr.insert(addr.clone(), i);
            sim.nodes.push(Node {
                name,
                addr,
                gossip,
                run: Run::Up,
                networks: BTreeSet::new(),
                own: BTreeMap::new(),
            });
        }
        for i in 0..count {
            let network = NETWORKS[sim.rng.below(NETWORKS.len() as u64) as usize];
            sim.join_network(i, network);
            let seeds = sim.seeds();
            sim.nodes[i].gossip.join(seeds);
        }
        sim
    }

    fn fresh_gossip(&mut self, name: &str, addr: &NodeAddr) -> Gossip {
        let config = GossipConfig::new(name, addr.clone(), self.rng.next_u64());
        Gossip::new(config, self.now_ms)
    }

    fn seeds(&self) -> Vec<NodeAddr> {
        self.nodes.iter().map(|n| n.addr.clone()).collect()
    }

    fn is_running(&self, i: usize) -> bool {
        matches!(self.nodes[i].run, Run::Up | Run::Leaving(_))
    }

    fn is_up(&self, i: usize) -> bool {
        self.nodes[i].run == Run::Up
    }

    fn cut(&self, a: usize, b: usize) -> bool {
        self.partition
            .as_ref()
            .is_some_and(|side| side[a] != side[b])
    }

    // ---- network ----

    fn enqueue(&mut self, from: usize, to: usize, payload: Payload, delay_ms: u64) {
        self.next_seq += 1;
        let at = self.now_ms + delay_ms;
        self.in_flight
            .insert((at, self.next_seq), InFlight { from, to, payload });
    }

    fn transmit_packet(&mut self, from: usize, to_addr: &NodeAddr, packet: Bytes) {
        assert!(
            packet.len() <= codec::PACKET_BYTES_MAX,
            "seed {}: a packet of {} bytes",
            self.seed,
            packet.len()
        );
        let Some(&to) = self.by_addr.get(to_addr) else {
            return;
        };
        if self.cut(from, to) || self.rng.chance(self.faults.loss_per_million) {
            return;
        }
        let copies = if self.rng.chance(self.faults.dup_per_million) {
            2
        } else {
            1
        };
        // Sealed like the driver seals it: a mangled copy then fails authentication.
        let packet = self.seal(Kind::Packet, &packet);
        for _ in 0..copies {
            let delay = self.rng.range(1, self.faults.delay_ms_max);
            self.enqueue(from, to, Payload::Packet(packet.clone()), delay);
        }
        if self.rng.chance(self.faults.garbage_per_million) {
            let garbage = self.garbage(&packet);
            self.enqueue(from, to, Payload::Packet(garbage), 1);
        }
    }

    /// `plain` sealed under the cluster key, with a nonce from the seed.
    fn seal(&mut self, kind: Kind, plain: &[u8]) -> Bytes {
        let mut nonce = [0u8; 12];
        nonce[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
        nonce[8..].copy_from_slice(&(self.rng.next_u64() as u32).to_le_bytes());
        Bytes::from(
            self.keyring
                .seal(kind, nonce, plain)
                .expect("the simulator's keyring holds a key"),
        )
    }

    /// A mangled copy: random bytes over a random part, or a truncation.
    fn garbage(&mut self, packet: &Bytes) -> Bytes {
        let mut bytes = packet.to_vec();
        if bytes.is_empty() || self.rng.chance(300_000) {
            bytes.truncate(self.rng.below(bytes.len() as u64 + 1) as usize);
            return Bytes::from(bytes);
        }
        for _ in 0..self.rng.range(1, 8) {
            let at = self.rng.below(bytes.len() as u64) as usize;
            bytes[at] = self.rng.next_u64() as u8;
        }
        Bytes::from(bytes)
    }

    fn stream_session(&mut self, from: usize, session: u64, to_addr: &NodeAddr) {
        let to = self.by_addr.get(to_addr).copied();
        let delay = self.rng.range(1, self.faults.delay_ms_max);
        while let Some(chunk) = self.nodes[from].gossip.next_chunk(session) {
            self.chunk_bytes_max = self.chunk_bytes_max.max(chunk.len());
            assert!(chunk.len() <= codec::BULK_CHUNK_BYTES_MAX);
            match to {
                Some(to) if !self.cut(from, to) => {
                    let chunk = self.seal(Kind::Chunk, &chunk);
                    self.enqueue(from, to, Payload::Chunk(chunk), delay)
                }
                _ => {
                    self.nodes[from].gossip.abort_session(session);
                    return;
                }
            }
        }
    }

    fn drain(&mut self, i: usize) {
        let output = self.nodes[i].gossip.poll_output();
        for (to, packet) in output.packets {
            self.transmit_packet(i, &to, packet);
        }
        for (session, to) in output.bulk_sessions {
            self.stream_session(i, session, &to);
        }
    }

    fn deliver_due(&mut self) {
        while let Some(entry) = self.in_flight.first_entry() {
            if entry.key().0 > self.now_ms {
                break;
            }
            let message = entry.remove();
            let (from, to) = (message.from, message.to);
            if !self.is_running(to) || self.cut(from, to) {
                continue;
            }
            let from_addr = self.nodes[from].addr.clone();
            let now = self.now_ms;
            let (kind, sealed) = match &message.payload {
                Payload::Packet(p) => (Kind::Packet, p),
                Payload::Chunk(c) => (Kind::Chunk, c),
            };
            // What the driver does: a datagram or chunk that does not authenticate is
            // dropped before the core sees it.
            let Ok(plain) = self.keyring.open(kind, sealed) else {
                self.unauthenticated += 1;
                continue;
            };
            match kind {
                Kind::Packet => self.nodes[to].gossip.receive(&from_addr, &plain, now),
                Kind::Chunk => self.nodes[to].gossip.receive_chunk(&from_addr, &plain, now),
            }
            self.drain(to);
        }
    }

    fn trace_key(&mut self) {
        let Ok(spec) = std::env::var("GOSSIP_SIM_TRACE") else {
            return;
        };
        let mut parts = spec.split(',');
        let (Some(network), Some(key)) = (parts.next(), parts.next()) else {
            return;
        };
        let k = (network.to_string(), TABLE.to_string(), key.to_string());
        let now: Vec<String> = self
            .nodes
            .iter()
            .map(|n| {
                format!(
                    "{:?} {:?} own={:?}",
                    n.run,
                    n.gossip.tables.get(&k),
                    n.own.get(&(network.to_string(), key.to_string()))
                )
            })
            .collect();
        if now != self.trace_last {
            for (i, line) in now.iter().enumerate() {
                if self.trace_last.get(i) != Some(line) {
                    eprintln!("t={} node-{i}: {line}", self.now_ms);
                }
            }
            self.trace_last = now;
        }
    }

    fn step(&mut self) {
        self.trace_key();
        self.now_ms += STEP_MS;
        self.deliver_due();
        for i in 0..self.nodes.len() {
            if let Run::Leaving(until) = self.nodes[i].run
                && self.now_ms >= until
            {
                self.nodes[i].run = Run::Left;
            }
            if self.is_running(i) {
                self.nodes[i].gossip.tick(self.now_ms);
                self.drain(i);
            }
        }
    }

    // ---- workload and faults ----

    fn join_network(&mut self, i: usize, network: &str) {
        self.nodes[i]
            .gossip
            .join_network(network)
            .expect("a valid network name");
        self.nodes[i].networks.insert(network.to_string());
    }

    fn leave_network(&mut self, i: usize, network: &str) {
        self.nodes[i].gossip.leave_network(network);
        self.nodes[i].networks.remove(network);
        self.nodes[i].own.retain(|(n, _), _| n != network);
    }

    fn random_up(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect();
        self.rng.pick(&up)
    }

    fn random_network_of(&mut self, i: usize) -> Option<String> {
        let networks: Vec<&String> = self.nodes[i].networks.iter().collect();
        let pick = self.rng.pick(&(0..networks.len()).collect::<Vec<_>>())?;
        Some(networks[pick].clone())
    }

    fn put_own(&mut self, i: usize) {
        let Some(network) = self.random_network_of(i) else {
            return;
        };
        let key = format!("{}/k{}", self.nodes[i].name, self.rng.below(6));
        self.written += 1;
        let value = Bytes::from(format!("v{}-{}", self.written, self.rng.next_u64()));
        self.nodes[i]
            .gossip
            .put(TABLE, &network, &key, value.clone())
            .expect("attached, small");
        self.nodes[i].own.insert((network, key), Some(value));
    }

    fn delete_own(&mut self, i: usize) {
        let live: Vec<(String, String)> = self.nodes[i]
            .own
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        let Some(pick) = self.rng.pick(&(0..live.len()).collect::<Vec<_>>()) else {
            return;
        };
        let (network, key) = live[pick].clone();
        self.nodes[i]
            .gossip
            .delete(TABLE, &network, &key)
            .expect("attached");
        self.nodes[i].own.insert((network, key), None);
    }

    fn put_shared(&mut self, i: usize) {
        let Some(network) = self.random_network_of(i) else {
            return;
        };
        let key = format!("shared/k{}", self.rng.below(3));
        let value = Bytes::from(format!("s{}", self.rng.below(4)));
        if self.rng.chance(300_000) {
            let _ = self.nodes[i].gossip.delete(TABLE, &network, &key);
        } else {
            let _ = self.nodes[i].gossip.put(TABLE, &network, &key, value);
        }
    }

    fn toggle_network(&mut self, i: usize) {
        let network = NETWORKS[self.rng.below(NETWORKS.len() as u64) as usize];
        if self.nodes[i].networks.contains(network) {
            self.leave_network(i, network);
        } else {
            self.join_network(i, network);
        }
    }

    fn workload(&mut self) {
        let Some(i) = self.random_up() else { return };
        match self.rng.below(10) {
            0..=3 => self.put_own(i),
            4..=5 => self.delete_own(i),
            6..=7 => self.put_shared(i),
            _ => self.toggle_network(i),
        }
    }

    fn partition_randomly(&mut self) {
        let sides: Vec<u8> = (0..self.nodes.len())
            .map(|_| self.rng.below(2) as u8)
            .collect();
        self.partition = Some(sides);
    }

    /// A fresh process under the same name and address: joins again, attaches to its
    /// networks and republishes what it holds (as an agent republishes its endpoints).
    fn restart_fresh(&mut self, i: usize) {
        let (name, addr) = (self.nodes[i].name.clone(), self.nodes[i].addr.clone());
        self.nodes[i].gossip = self.fresh_gossip(&name, &addr);
        self.nodes[i].run = Run::Up;
        let seeds = self.seeds();
        self.nodes[i].gossip.join(seeds);
        for network in self.nodes[i].networks.clone() {
            self.nodes[i]
                .gossip
                .join_network(&network)
                .expect("a valid network name");
        }
        let own: Vec<((String, String), Bytes)> = self.nodes[i]
            .own
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)))
            .collect();
        for ((network, key), value) in own {
            self.nodes[i]
                .gossip
                .put(TABLE, &network, &key, value)
                .expect("attached, small");
        }
    }

    fn down_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.run != Run::Up).count()
    }

    fn fault(&mut self) {
        let i = self.rng.below(self.nodes.len() as u64) as usize;
        let may_stop = self.down_count() + 2 < self.nodes.len();
        match (self.rng.below(8), self.nodes[i].run) {
            (0, _) => self.partition_randomly(),
            (1, _) => self.partition = None,
            (2, Run::Up) if may_stop => self.nodes[i].run = Run::Paused,
            (3, Run::Up) if may_stop => self.nodes[i].run = Run::Crashed,
            (4, Run::Up) if may_stop => {
                self.nodes[i].gossip.leave();
                self.nodes[i].own.clear();
                self.nodes[i].run = Run::Leaving(self.now_ms + LEAVE_LINGER_MS);
            }
            (5, Run::Paused) => self.nodes[i].run = Run::Up,
            (6, Run::Crashed | Run::Left) => self.restart_fresh(i),
            _ => {}
        }
    }

    fn heal(&mut self) {
        self.partition = None;
        self.faults = Faults {
            loss_per_million: 0,
            dup_per_million: 0,
            garbage_per_million: 0,
            delay_ms_max: self.faults.delay_ms_max,
        };
        for i in 0..self.nodes.len() {
            match self.nodes[i].run {
                Run::Paused => self.nodes[i].run = Run::Up,
                Run::Crashed => self.restart_fresh(i),
                _ => {}
            }
        }
    }

    fn run(&mut self) -> Result<(), String> {
        let faulty_ms = self.rng.range(10_000, FAULTY_MS_MAX);
        let workload_per_million = self.rng.range(20_000, 100_000) as u32;
        let fault_per_million = self.rng.range(1_000, 10_000) as u32;
        while self.now_ms < faulty_ms {
            self.step();
            if self.rng.chance(workload_per_million) {
                self.workload();
            }
            if self.rng.chance(fault_per_million) {
                self.fault();
            }
        }
        self.heal();
        let end = self.now_ms + HEAL_MS;
        while self.now_ms < end {
            self.step();
        }
        self.check()
    }

    // ---- invariants ----

    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.is_up(i)).collect()
    }

    fn check(&self) -> Result<(), String> {
        self.check_members()?;
        for network in NETWORKS {
            self.check_network(network)?;
        }
        Ok(())
    }

    fn check_members(&self) -> Result<(), String> {
        let live = self.live();
        for &a in &live {
            for &b in &live {
                if a == b {
                    continue;
                }
                let seen = self.nodes[a].gossip.member(&self.nodes[b].name);
                if seen.is_none_or(|m| m.status != MemberStatus::Alive) {
                    return Err(format!(
                        "{} sees live {} as {:?}",
                        self.nodes[a].name,
                        self.nodes[b].name,
                        seen.map(|m| m.status)
                    ));
                }
            }
        }
        Ok(())
    }

    /// (key → (value, owner)) of `network` as node `i` sees it.
    fn table_of(&self, i: usize, network: &str) -> BTreeMap<String, (Bytes, String)> {
        self.nodes[i]
            .gossip
            .entries(network)
            .into_iter()
            .map(|(k, e)| (k.2, (e.value, e.owner)))
            .collect()
    }

    fn expected_own(&self, network: &str, holders: &[usize]) -> BTreeMap<String, (Bytes, String)> {
        let mut expected = BTreeMap::new();
        for &o in holders {
            for ((n, key), value) in &self.nodes[o].own {
                if let (true, Some(value)) = (n == network, value) {
                    expected.insert(key.clone(), (value.clone(), self.nodes[o].name.clone()));
                }
            }
        }
        expected
    }

    fn check_network(&self, network: &str) -> Result<(), String> {
        let live = self.live();
        let (holders, others): (Vec<usize>, Vec<usize>) = live
            .iter()
            .partition(|&&i| self.nodes[i].networks.contains(network));
        for &i in &others {
            if !self.table_of(i, network).is_empty() {
                return Err(format!(
                    "{} holds {network} without being attached",
                    self.nodes[i].name
                ));
            }
        }
        let Some(&first) = holders.first() else {
            return Ok(());
        };
        let reference = self.table_of(first, network);
        for &i in &holders[1..] {
            let table = self.table_of(i, network);
            if table != reference {
                return Err(format!(
                    "{network}: {} holds {:?}\n but {} holds {:?}",
                    self.nodes[first].name, reference, self.nodes[i].name, table
                ));
            }
        }
        let owners: BTreeSet<&String> = holders.iter().map(|&i| &self.nodes[i].name).collect();
        if let Some((key, (_, owner))) = reference.iter().find(|(_, (_, o))| !owners.contains(o)) {
            return Err(format!(
                "{network}: {key} owned by {owner}, not a live member there"
            ));
        }
        let own: BTreeMap<String, (Bytes, String)> = reference
            .into_iter()
            .filter(|(k, _)| !k.starts_with("shared/"))
            .collect();
        let expected = self.expected_own(network, &holders);
        if own != expected {
            return Err(format!("{network}: holds {own:?}\n expected {expected:?}"));
        }
        Ok(())
    }
}

fn run_seed(seed: u64) {
    let mut sim = Sim::new(seed);
    if let Err(failure) = sim.run() {
        panic!(
            "gossip sim seed {seed} ({} nodes) failed: {failure}\n\
             replay: GOSSIP_SIM_SEED={seed} cargo test --release --lib gossip::sim",
            sim.nodes.len()
        );
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeds_converge_after_faults() {
    if let Some(seed) = env_u64("GOSSIP_SIM_SEED") {
        run_seed(seed);
        return;
    }
    let seeds = env_u64("GOSSIP_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    for seed in 0..seeds {
        run_seed(seed);
    }
}

#[test]
fn same_seed_same_run() {
    let digest = |seed| {
        let mut sim = Sim::new(seed);
        sim.run().expect("seed 7 converges");
        let tables: Vec<_> = (0..sim.nodes.len())
            .map(|i| {
                NETWORKS
                    .iter()
                    .map(|n| sim.table_of(i, n))
                    .collect::<Vec<_>>()
            })
            .collect();
        (sim.next_seq, sim.written, format!("{tables:?}"))
    };
    assert_eq!(digest(7), digest(7));
}

#[test]
fn bulk_sync_chunks_stay_bounded_for_a_large_table() {
    let mut sim = Sim::new(1);
    sim.faults = Faults {
        loss_per_million: 0,
        dup_per_million: 0,
        garbage_per_million: 0,
        delay_ms_max: 5,
    };
    // Put everyone on one network with a table far larger than one chunk.
    for i in 0..sim.nodes.len() {
        sim.join_network(i, "red");
    }
    for k in 0..3_000 {
        let key = format!("node-0/bulk{k}");
        let value = Bytes::from(vec![b'x'; 1000]);
        sim.nodes[0]
            .gossip
            .put(TABLE, "red", &key, value.clone())
            .expect("attached");
        sim.nodes[0].own.insert(("red".into(), key), Some(value));
    }
    let end = sim.now_ms + HEAL_MS;
    while sim.now_ms < end {
        sim.step();
    }
    sim.check().expect("converges");
    assert!(
        sim.chunk_bytes_max > codec::BULK_CHUNK_BYTES_MAX / 2,
        "several chunks were used"
    );
    assert!(sim.chunk_bytes_max <= codec::BULK_CHUNK_BYTES_MAX);
}

#[test]
#[ignore = "debugging aid"]
fn debug_seed() {
    let seed = env_u64("GOSSIP_SIM_SEED").unwrap_or(7);
    let mut sim = Sim::new(seed);
    let result = sim.run();
    for node in &sim.nodes {
        eprintln!(
            "{} run={:?} inc={} nets={:?} truth={:?} stats={:?}",
            node.name,
            node.run,
            node.gossip.incarnation(),
            node.gossip.networks(),
            node.networks,
            node.gossip.stats()
        );
        for m in node.gossip.members() {
            eprintln!(
                "   sees {} {:?} inc={} nets={:?}",
                m.name, m.status, m.incarnation, m.networks
            );
        }
    }
    for node in &sim.nodes {
        for network in NETWORKS {
            let key = (
                network.to_string(),
                TABLE.to_string(),
                "shared/k2".to_string(),
            );
            eprintln!(
                "{} {network} shared/k2: {:?}",
                node.name,
                node.gossip.tables.get(&key)
            );
        }
    }
    eprintln!("{result:?}");
}
