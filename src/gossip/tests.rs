//! Unit tests of the gossip core's parts: the version order, the codec's bounds, the
//! broadcast queue, refutation and the owner's authority over its entries.

use bytes::Bytes;
use prost::Message as _;

use super::*;
use crate::proto::gossip::{Alive, Dead, Packet, Suspect, TableEvent};
use crate::util::rng::SimRng;

fn entry(ltime: u64, owner: &str, deleting: bool, value: &str) -> Entry {
    Entry {
        value: Bytes::from(value.to_string()),
        owner: owner.into(),
        ltime,
        deleting,
        reap_at_ms: 0,
    }
}

#[test]
fn lamport_ties_are_broken_the_same_way_everywhere() {
    let versions = [
        entry(5, "b", false, "x"),
        entry(5, "a", false, "y"),
        entry(5, "b", true, ""),
        entry(4, "z", false, "z"),
        entry(5, "b", false, "w"),
    ];
    let winner = |order: &[usize]| {
        let mut held: Option<Entry> = None;
        for &i in order {
            let v = &versions[i];
            if held.as_ref().is_none_or(|h| v.cmp_version(h).is_gt()) {
                held = Some(v.clone());
            }
        }
        held.expect("one version")
    };
    let expected = winner(&[0, 1, 2, 3, 4]);
    assert_eq!(expected, entry(5, "b", true, ""));
    let mut rng = SimRng::new(3);
    for _ in 0..200 {
        let mut order: Vec<usize> = (0..versions.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        assert_eq!(winner(&order), expected, "order {order:?}");
    }
}

#[test]
fn ceil_log10_matches_memberlist() {
    assert_eq!(ceil_log10(1), 0);
    assert_eq!(ceil_log10(2), 1);
    assert_eq!(ceil_log10(10), 1);
    assert_eq!(ceil_log10(11), 2);
    assert_eq!(ceil_log10(1001), 4);
}

#[test]
fn decoders_reject_garbage_and_oversize_input() {
    let mut rng = SimRng::new(11);
    for len in 0..2_000usize {
        let bytes: Vec<u8> = (0..len % 1_500).map(|_| rng.next_u64() as u8).collect();
        let _ = codec::decode_packet(&bytes);
        let _ = codec::decode_chunk(&bytes);
    }
    let big = vec![0u8; codec::PACKET_BYTES_MAX + 1];
    assert!(matches!(
        codec::decode_packet(&big),
        Err(codec::DecodeError::TooLarge { .. })
    ));
    let huge = vec![0u8; codec::BULK_CHUNK_BYTES_MAX + 1];
    assert!(matches!(
        codec::decode_chunk(&huge),
        Err(codec::DecodeError::TooLarge { .. })
    ));
    let long_key = TableEvent {
        network: "n".into(),
        table: "t".into(),
        key: "k".repeat(codec::KEY_BYTES_MAX + 1),
        owner: "o".into(),
        ..TableEvent::default()
    };
    let packet = Packet {
        messages: vec![kind_message(Kind::Table(long_key))],
    };
    assert_eq!(
        codec::decode_packet(&packet.encode_to_vec()),
        Err(codec::DecodeError::Invalid("table.key"))
    );
}

#[test]
fn packets_stay_under_the_limit_with_the_largest_entries() {
    let event = TableEvent {
        network: "n".repeat(codec::NETWORK_NAME_BYTES_MAX),
        table: "t".repeat(codec::TABLE_NAME_BYTES_MAX),
        key: "k".repeat(codec::KEY_BYTES_MAX),
        value: Bytes::from(vec![7u8; codec::VALUE_BYTES_MAX]),
        owner: "o".repeat(codec::NODE_NAME_BYTES_MAX),
        ltime: u64::MAX,
        deleting: true,
        residual_reap_s: u32::MAX,
    };
    let messages = vec![kind_message(Kind::Table(event)); 5];
    let packets = codec::pack(messages);
    assert_eq!(packets.len(), 5, "one maximal entry per packet");
    for packet in &packets {
        assert!(packet.len() <= codec::PACKET_BYTES_MAX);
        assert_eq!(
            codec::decode_packet(packet).map(|p| p.messages.len()),
            Ok(1)
        );
    }
    let alive = Alive {
        name: "a".repeat(codec::NODE_NAME_BYTES_MAX),
        addr: "b".repeat(codec::NODE_ADDR_BYTES_MAX),
        incarnation: u64::MAX,
        networks: vec!["n".repeat(codec::NETWORK_NAME_BYTES_MAX); codec::NETWORKS_PER_NODE_MAX],
    };
    let packets = codec::pack(vec![kind_message(Kind::Alive(alive))]);
    assert_eq!(packets.len(), 1, "the largest Alive fits one packet");
}

#[test]
fn broadcasts_are_sent_the_limit_times_and_newer_replace_older() {
    let mut queue = broadcast::BroadcastQueue::default();
    let ack = |seq| kind_message(Kind::Ack(crate::proto::gossip::Ack { seq }));
    queue.push("a".into(), ack(1));
    queue.push("a".into(), ack(2));
    queue.push("b".into(), ack(3));
    assert_eq!(queue.len(), 2);
    for _ in 0..4 {
        let sent = queue.take(codec::PACKET_BYTES_MAX, 4);
        assert_eq!(sent.len(), 2);
        assert!(!sent.contains(&ack(1)), "replaced");
    }
    assert_eq!(queue.len(), 0);
}

fn node(name: &str) -> Gossip {
    Gossip::new(GossipConfig::new(name, NodeAddr(format!("{name}:1")), 1), 0)
}

fn introduce(a: &mut Gossip, b: &Gossip, incarnation: u64, networks: &[&str]) {
    a.on_alive(Alive {
        name: b.name().into(),
        addr: format!("{}:1", b.name()),
        incarnation,
        networks: networks.iter().map(ToString::to_string).collect(),
    });
}

#[test]
fn a_suspected_live_node_refutes_with_a_higher_incarnation() {
    let mut a = node("a");
    let before = a.incarnation();
    a.on_suspect(Suspect {
        name: "a".into(),
        incarnation: before,
        from: "b".into(),
    });
    assert_eq!(a.incarnation(), before + 1);
    a.on_dead(Dead {
        name: "a".into(),
        incarnation: before + 5,
        from: "b".into(),
    });
    assert_eq!(a.incarnation(), before + 6);
    let mut b = node("b");
    introduce(&mut b, &a, 0, &[]);
    b.on_suspect(Suspect {
        name: "a".into(),
        incarnation: 0,
        from: "c".into(),
    });
    assert_eq!(b.member("a").map(|m| m.status), Some(MemberStatus::Suspect));
    introduce(&mut b, &a, a.incarnation(), &[]);
    assert_eq!(b.member("a").map(|m| m.status), Some(MemberStatus::Alive));
}

#[test]
fn a_failed_members_entries_are_hidden_then_restored_and_a_departure_removes_them() {
    let mut a = node("a");
    let b = node("b");
    a.join_network("n").expect("valid");
    introduce(&mut a, &b, 1, &["n"]);
    a.on_table_event(
        TableEvent {
            network: "n".into(),
            table: "t".into(),
            key: "k".into(),
            value: Bytes::from_static(b"v"),
            owner: "b".into(),
            ltime: 3,
            ..TableEvent::default()
        },
        true,
    );
    assert!(a.get("n", "t", "k").is_some());
    a.on_dead(Dead {
        name: "b".into(),
        incarnation: 1,
        from: "c".into(),
    });
    assert!(a.get("n", "t", "k").is_none(), "hidden while failed");
    introduce(&mut a, &b, 2, &["n"]);
    assert!(a.get("n", "t", "k").is_some(), "back with its state");
    a.on_dead(Dead {
        name: "b".into(),
        incarnation: 2,
        from: "b".into(),
    });
    assert!(
        a.get("n", "t", "k").is_none(),
        "a departure deletes its entries"
    );
    let key = ("n".to_string(), "t".to_string(), "k".to_string());
    assert!(
        a.tables
            .get(&key)
            .is_some_and(|e| e.deleting && e.ltime == 3)
    );
}

#[test]
fn the_owner_answers_a_forgotten_entry_with_a_newer_tombstone() {
    let mut a = node("a");
    a.join_network("n").expect("valid");
    a.on_table_event(
        TableEvent {
            network: "n".into(),
            table: "t".into(),
            key: "k".into(),
            value: Bytes::from_static(b"old life"),
            owner: "a".into(),
            ltime: 40,
            ..TableEvent::default()
        },
        true,
    );
    assert!(a.get("n", "t", "k").is_none());
    let key = ("n".to_string(), "t".to_string(), "k".to_string());
    let held = a.tables.get(&key).expect("a tombstone");
    assert!(held.deleting && held.ltime > 40 && held.owner == "a");
}

#[test]
fn entries_of_unattached_networks_or_unknown_owners_are_refused() {
    let mut a = node("a");
    let event = |network: &str, owner: &str| TableEvent {
        network: network.into(),
        table: "t".into(),
        key: "k".into(),
        owner: owner.into(),
        ltime: 1,
        ..TableEvent::default()
    };
    a.on_table_event(event("n", "b"), true);
    a.join_network("n").expect("valid");
    a.on_table_event(event("n", "b"), true);
    assert_eq!(a.entries_held(), 0);
    assert_eq!(a.stats().entries_refused, 2);
    assert_eq!(
        a.put("t", "other", "k", Bytes::new()),
        Err(UpdateError::NotAttached("other".into()))
    );
    // A tombstone only deletes: taken from an unknown owner too (one that departed before
    // this node joined), and it beats an older live version.
    a.put("t", "n", "k", Bytes::from_static(b"v"))
        .expect("attached");
    let mut tombstone = event("n", "gone");
    tombstone.ltime = 10;
    tombstone.deleting = true;
    tombstone.residual_reap_s = 60;
    a.on_table_event(tombstone, true);
    assert!(a.get("n", "t", "k").is_none());
    assert_eq!(a.entries_held(), 1);
}
