//! The Raft node runtime in one process: three members over real mutual-TLS sockets,
//! driven through `NodeHandle`. Covers what needs a hand on the state machine: a leader whose
//! state machine wedges hands leadership over (swarmkit's wedged-leader problem), and the
//! snapshot policy (a big state is not snapshotted again until the log holds a quarter of
//! it).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Cluster as TestCa;
use flotilla::ca::Role;
use flotilla::net::{Router, Transport, TransportConfig};
use flotilla::raft::core::MembershipChange;
use flotilla::raft::node::service::{self, RaftPools};
use flotilla::raft::node::{Bootstrap, NodeConfig, RaftNode, SnapshotWriter, StateMachine};

/// Counts applied commands; while `wedged` is set, apply blocks (a stuck state machine).
#[derive(Clone, Default)]
struct Wedgeable {
    wedged: Arc<AtomicBool>,
    applied: Arc<parking_lot::Mutex<u64>>,
}

impl StateMachine for Wedgeable {
    fn apply(&mut self, _index: u64, _data: &[u8]) -> Bytes {
        while self.wedged.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(5));
        }
        *self.applied.lock() += 1;
        Bytes::new()
    }

    fn snapshot(&mut self) -> SnapshotWriter {
        let applied = *self.applied.lock();
        Box::new(move |out: &mut dyn Write| out.write_all(&applied.to_be_bytes()))
    }

    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()> {
        let mut bytes = [0u8; 8];
        input.read_exact(&mut bytes)?;
        *self.applied.lock() = u64::from_be_bytes(bytes);
        Ok(())
    }
}

struct Member {
    node: RaftNode,
    machine: Wedgeable,
    transport: Arc<Transport>,
    pools: Option<RaftPools>,
    _dir: tempfile::TempDir,
}

use common::free_addr;

fn start_member(ca: &TestCa, id: u64, bootstrap: Bootstrap) -> Member {
    let addr = free_addr();
    let identity = ca.identity(Role::Manager);
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let mut config = NodeConfig::new(id, addr.clone(), bootstrap);
    config.apply_stall_ms_max = 1_000;
    let machine = Wedgeable::default();
    let dir = tempfile::tempdir().unwrap();
    let node = RaftNode::start(
        config,
        dir.path(),
        Box::new(machine.clone()),
        transport.clone(),
        ca.client_tls_for(&identity),
    )
    .unwrap();
    let pools = RaftPools::start().unwrap();
    let mut router = Router::new();
    service::register(&mut router, &pools, node.handle(), &node.store());
    let server_tls = Arc::new(flotilla::ca::tls::server_config(&identity, ca.ca.root()).unwrap());
    transport
        .listen(addr.parse().unwrap(), server_tls, Arc::new(router))
        .unwrap();
    Member {
        node,
        machine,
        transport,
        pools: Some(pools),
        _dir: dir,
    }
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_leader_whose_state_machine_wedges_hands_leadership_over() {
    let ca = TestCa::new();
    let mut members = vec![start_member(&ca, 1, Bootstrap::NewCluster)];
    wait_until("a leader", || members[0].node.handle().leader() == Some(1));
    let founder = members[0].node.handle().clone();
    for id in [2, 3] {
        let member = start_member(&ca, id, Bootstrap::Join);
        let addr = member.node.handle().directory_own_addr();
        founder
            .propose_member_addr(id, &addr, Duration::from_secs(10))
            .unwrap();
        founder
            .change_membership(MembershipChange::AddLearner(id), Duration::from_secs(10))
            .unwrap();
        members.push(member);
    }
    wait_until("three voters", || {
        founder
            .status(Duration::from_secs(1))
            .is_ok_and(|s| s.members.iter().filter(|m| m.role != "learner").count() == 3)
    });
    for i in 0..20 {
        founder
            .propose(format!("before {i}").as_bytes(), Duration::from_secs(5))
            .unwrap();
    }

    // Wedge the leader's state machine, then give it something to apply.
    members[0].machine.wedged.store(true, Ordering::Release);
    let stuck = founder.clone();
    let proposer = std::thread::spawn(move || stuck.propose(b"stuck", Duration::from_secs(30)));
    wait_until("a new leader", || {
        let leader = members[1].node.handle().leader();
        leader.is_some() && leader != Some(1)
    });
    let new_leader = members[1].node.handle().leader().unwrap();
    let handle = members[usize::try_from(new_leader).unwrap() - 1]
        .node
        .handle()
        .clone();
    // The cluster goes on without the wedged member.
    handle
        .propose(b"after the handover", Duration::from_secs(10))
        .unwrap();
    members[0].machine.wedged.store(false, Ordering::Release);
    let _ = proposer.join().unwrap();
    for member in &mut members {
        let pools = member.pools.take().unwrap();
        member.transport.shutdown();
        pools.shutdown();
    }
    for member in members {
        member.node.shutdown();
    }
}

/// Keeps every byte applied: its snapshots grow with the log.
#[derive(Clone, Default)]
struct Hoarder {
    data: Arc<parking_lot::Mutex<Vec<u8>>>,
}

impl StateMachine for Hoarder {
    fn apply(&mut self, _index: u64, data: &[u8]) -> Bytes {
        self.data.lock().extend_from_slice(data);
        Bytes::new()
    }

    fn snapshot(&mut self) -> SnapshotWriter {
        let data = self.data.lock().clone();
        Box::new(move |out: &mut dyn Write| out.write_all(&data))
    }

    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()> {
        let mut data = Vec::new();
        input.read_to_end(&mut data)?;
        *self.data.lock() = data;
        Ok(())
    }
}

/// The highest log index among the snapshot files (`<index>-<term>.snap`) in `dir`.
fn newest_snapshot_index(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("snapshots"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.ends_with(".snap"))
                .filter_map(|name| name.split('-').next()?.parse().ok())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[test]
fn snapshots_wait_until_the_log_holds_a_quarter_of_the_last_one() {
    let mut config = NodeConfig::new(1, free_addr(), Bootstrap::NewCluster);
    config.snapshot_interval_entries = 10;
    let common::SoloLeader {
        node,
        transport,
        dir,
    } = common::start_solo_leader(config, Box::new(Hoarder::default()));
    let propose = |bytes: usize, count: usize| {
        for _ in 0..count {
            node.handle()
                .propose(&vec![7u8; bytes], Duration::from_secs(10))
                .unwrap();
        }
    };
    // 1 MiB of state, then small entries: the first snapshot comes at the interval.
    propose(1 << 20, 1);
    propose(1024, 20);
    wait_until("the first snapshot", || {
        newest_snapshot_index(dir.path()) > 0
    });
    let first = newest_snapshot_index(dir.path());
    // 100 KiB more is far past the interval (10 entries) but under a quarter of the
    // snapshot (256 KiB): no snapshot. (The decision is made as entries are applied, and
    // the proposals returned once applied; a due snapshot's file would follow at once.)
    propose(1024, 100);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(newest_snapshot_index(dir.path()), first);
    // Past a quarter: the next one comes.
    propose(1024, 200);
    wait_until("a second snapshot", || {
        newest_snapshot_index(dir.path()) > first
    });
    node.shutdown();
    transport.shutdown();
}

/// Keeps only a count of what it applied: its snapshots stay tiny however much is logged.
#[derive(Clone, Default)]
struct Counter {
    applied: Arc<parking_lot::Mutex<u64>>,
}

impl StateMachine for Counter {
    fn apply(&mut self, _index: u64, _data: &[u8]) -> Bytes {
        *self.applied.lock() += 1;
        Bytes::new()
    }

    fn snapshot(&mut self) -> SnapshotWriter {
        let applied = *self.applied.lock();
        Box::new(move |out: &mut dyn Write| out.write_all(&applied.to_be_bytes()))
    }

    fn restore(&mut self, input: &mut dyn Read) -> std::io::Result<()> {
        let mut bytes = [0u8; 8];
        input.read_exact(&mut bytes)?;
        *self.applied.lock() = u64::from_be_bytes(bytes);
        Ok(())
    }
}

#[test]
fn a_log_of_large_entries_is_snapshotted_by_bytes_and_an_idle_one_is_too() {
    use flotilla::raft::node::apply::{SNAPSHOT_IDLE_LOG_BYTES_MIN, SNAPSHOT_LOG_BYTES_MAX};
    let mut config = NodeConfig::new(1, free_addr(), Bootstrap::NewCluster);
    // Far more entries than this test writes: only bytes or idleness can trigger.
    config.snapshot_interval_entries = 1_000_000;
    let common::SoloLeader {
        node,
        transport,
        dir,
    } = common::start_solo_leader(config, Box::new(Counter::default()));
    let propose = |bytes: usize, count: u64| {
        for _ in 0..count {
            node.handle()
                .propose(&vec![7u8; bytes], Duration::from_secs(10))
                .unwrap();
        }
    };
    // Entries of 1 MiB, a little past the byte bound: a snapshot without the interval.
    propose(1 << 20, SNAPSHOT_LOG_BYTES_MAX / (1 << 20) + 2);
    wait_until("a snapshot by bytes", || {
        newest_snapshot_index(dir.path()) > 0
    });
    let by_bytes = newest_snapshot_index(dir.path());
    // A little more, then nothing: the idle log is snapshotted (and compacted).
    propose(1 << 20, SNAPSHOT_IDLE_LOG_BYTES_MIN / (1 << 20) + 1);
    wait_until("an idle snapshot", || {
        newest_snapshot_index(dir.path()) > by_bytes
    });
    node.shutdown();
    transport.shutdown();
}
