//! networkdb's driver with real sockets: several `NetworkDb`s in this process, each with
//! its own transport and node certificate, gossiping over UDP on loopback (every datagram
//! sealed) and bulk-syncing over mutual TLS.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla::ca::{Role, tls};
use flotilla::net::{Transport, TransportConfig};
use flotilla::networkdb::{NetworkDb, NetworkDbConfig};
use flotilla::proto::objects::EncryptionKey;

const NETWORK: &str = "blue";
const TABLE: &str = "endpoints";
const WAIT: Duration = Duration::from_secs(60);

struct Node {
    db: Arc<NetworkDb>,
    transport: Arc<Transport>,
}

impl Node {
    fn stop(self) {
        self.db.shutdown();
        self.transport.shutdown();
    }
}

fn key(byte: u8, lamport_time: u64) -> EncryptionKey {
    EncryptionKey {
        subsystem: "networking:gossip".into(),
        key: Bytes::from(vec![byte; 32]),
        lamport_time,
        created_at_ms: 0,
    }
}

fn start_node(
    cluster: &common::Cluster,
    name: &str,
    seeds: Vec<SocketAddr>,
    keys: Vec<EncryptionKey>,
) -> Node {
    let identity = cluster.identity(Role::Worker);
    let root = cluster.ca.root();
    let live = tls::LiveIdentity::new(&identity, root).unwrap();
    let transport = Arc::new(Transport::start(TransportConfig::default()).unwrap());
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
    let db = NetworkDb::start(NetworkDbConfig {
        node_id: name.to_string(),
        bind: loopback,
        advertise: loopback,
        seeds: Box::new(move || seeds.clone()),
        transport: transport.clone(),
        server_tls: Arc::new(tls::server_config_live(live.clone(), root).unwrap()),
        peer_tls: Arc::new(tls::peer_client_config_live(live, root).unwrap()),
    })
    .unwrap();
    db.set_network_keys(keys);
    db.join_network(NETWORK).unwrap();
    Node { db, transport }
}

fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let give_up = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < give_up, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn value_at(node: &Node, key: &str) -> Option<Bytes> {
    node.db
        .entries(NETWORK, TABLE)
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

fn start_cluster(cluster: &common::Cluster, count: usize) -> Vec<Node> {
    let first = start_node(cluster, "node-0", Vec::new(), vec![key(1, 1)]);
    let seed = first.db.local_addr();
    let mut nodes = vec![first];
    for i in 1..count {
        nodes.push(start_node(
            cluster,
            &format!("node-{i}"),
            vec![seed],
            vec![key(1, 1)],
        ));
    }
    eventually("every node sees every other alive", || {
        nodes.iter().all(|n| n.db.live_members().len() == count - 1)
    });
    nodes
}

#[test]
fn an_entry_reaches_every_node_and_its_deletion_too() {
    let cluster = common::Cluster::new();
    let nodes = start_cluster(&cluster, 5);
    let events = nodes[3].db.subscribe().unwrap();
    nodes[0]
        .db
        .put(NETWORK, TABLE, "task-a", Bytes::from_static(b"10.0.0.1:80"))
        .unwrap();
    eventually("the entry on every node", || {
        nodes
            .iter()
            .all(|n| value_at(n, "task-a").as_deref() == Some(&b"10.0.0.1:80"[..]))
    });
    let created = events.recv_timeout(WAIT).unwrap();
    assert!(
        format!("{created:?}").contains("task-a"),
        "a subscriber hears of the entry: {created:?}"
    );
    nodes[0].db.delete(NETWORK, TABLE, "task-a").unwrap();
    eventually("the entry gone everywhere", || {
        nodes.iter().all(|n| value_at(n, "task-a").is_none())
    });
    for node in nodes {
        node.stop();
    }
}

#[test]
fn a_node_that_leaves_has_its_entries_removed_and_rejoins_under_its_name() {
    let cluster = common::Cluster::new();
    let mut nodes = start_cluster(&cluster, 4);
    nodes[3]
        .db
        .put(NETWORK, TABLE, "task-b", Bytes::from_static(b"b"))
        .unwrap();
    eventually("the entry on every node", || {
        nodes.iter().all(|n| value_at(n, "task-b").is_some())
    });
    let seed = nodes[0].db.local_addr();
    nodes.pop().unwrap().stop();
    eventually("the departed node's entry gone everywhere", || {
        nodes.iter().all(|n| value_at(n, "task-b").is_none())
    });
    let back = start_node(&cluster, "node-3", vec![seed], vec![key(1, 1)]);
    back.db
        .put(NETWORK, TABLE, "task-b", Bytes::from_static(b"b2"))
        .unwrap();
    nodes.push(back);
    eventually("the restarted node's entry everywhere", || {
        nodes
            .iter()
            .all(|n| value_at(n, "task-b").as_deref() == Some(&b"b2"[..]))
    });
    eventually("the restarted node alive everywhere", || {
        nodes.iter().all(|n| n.db.live_members().len() == 3)
    });
    for node in nodes {
        node.stop();
    }
}

#[test]
fn a_late_joiner_gets_a_large_table_by_bulk_sync_in_chunks() {
    let cluster = common::Cluster::new();
    let nodes = start_cluster(&cluster, 2);
    let value = Bytes::from(vec![b'x'; 1000]);
    for i in 0..3_000 {
        nodes[0]
            .db
            .put(NETWORK, TABLE, &format!("bulk-{i}"), value.clone())
            .unwrap();
    }
    eventually("the table on the second node", || {
        nodes[1].db.entries(NETWORK, TABLE).len() == 3_000
    });
    let late = start_node(
        &cluster,
        "late",
        vec![nodes[0].db.local_addr()],
        vec![key(1, 1)],
    );
    eventually("the whole table on the late joiner", || {
        late.db.entries(NETWORK, TABLE).len() == 3_000
    });
    assert!(
        late.db
            .stats()
            .chunks_received
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 3,
        "3 MB of entries arrive in several chunks of at most 1 MiB"
    );
    late.stop();
    for node in nodes {
        node.stop();
    }
}

#[test]
fn a_node_under_another_key_is_never_heard_and_rotation_keeps_the_cluster_together() {
    let cluster = common::Cluster::new();
    let nodes = start_cluster(&cluster, 3);
    let seed = nodes[0].db.local_addr();
    let stranger = start_node(&cluster, "stranger", vec![seed], vec![key(9, 1)]);
    eventually(
        "the stranger's datagrams dropped as under an unknown key",
        || {
            nodes[0]
                .db
                .stats()
                .unknown_key
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        },
    );
    assert!(stranger.db.live_members().is_empty());
    assert!(nodes.iter().all(|n| n.db.live_members().len() == 2));
    stranger.stop();
    // Rotation as the leader does it: a new key first delivered (the old one still seals),
    // then used once a newer one exists.
    for node in &nodes {
        node.db.set_network_keys(vec![key(1, 1), key(2, 2)]);
    }
    for node in &nodes {
        node.db
            .set_network_keys(vec![key(1, 1), key(2, 2), key(3, 3)]);
    }
    nodes[1]
        .db
        .put(NETWORK, TABLE, "after-rotation", Bytes::from_static(b"r"))
        .unwrap();
    eventually("an entry written after the rotation everywhere", || {
        nodes
            .iter()
            .all(|n| value_at(n, "after-rotation").is_some())
    });
    for node in nodes {
        node.stop();
    }
}
