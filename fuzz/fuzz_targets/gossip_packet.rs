//! Feeds arbitrary bytes to the gossip core as a datagram, both as they arrive off the
//! socket (sealed: the keyring must refuse garbage without panicking) and as if they had
//! authenticated (plain: the packet decoder and every message handler).
//!
//! Properties checked on every input: nothing panics; a datagram over the packet limit or
//! that does not decode is counted as malformed and changes nothing else; what the core then
//! sends stays within the packet limit.
#![no_main]

use flotilla::gossip::keyring::{Keyring, Kind};
use flotilla::gossip::{Gossip, GossipConfig, NodeAddr, codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut keyring = Keyring::new();
    keyring.add(&[3; 32]).expect("a 32-byte key");
    // Before decryption: garbage never opens (a 2^-128 forgery aside).
    assert!(keyring.open(Kind::Packet, data).is_err());
    let sealed = keyring
        .seal(Kind::Packet, [1; 12], data)
        .expect("the keyring holds a key");
    let opened = keyring.open(Kind::Packet, &sealed).expect("own seal opens");
    assert_eq!(opened, data);
    // After decryption: the core's decoder and handlers.
    let me = NodeAddr("10.0.0.1:7946".into());
    let from = NodeAddr("10.0.0.2:7946".into());
    let mut gossip = Gossip::new(GossipConfig::new("node-a", me, 7), 0);
    gossip.join_network("red").expect("a valid name");
    let malformed_before = gossip.stats().malformed;
    gossip.receive(&from, &opened, 10);
    let refused = gossip.stats().malformed > malformed_before;
    if data.len() > codec::PACKET_BYTES_MAX {
        assert!(refused, "an oversized packet is refused");
    }
    // Run a little time so that anything the packet started (probes, syncs) goes out.
    for now in (20..3_000).step_by(100) {
        gossip.tick(now);
        for (_, packet) in gossip.poll_output().packets {
            assert!(packet.len() <= codec::PACKET_BYTES_MAX);
        }
    }
});
