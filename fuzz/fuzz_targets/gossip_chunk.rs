//! Feeds arbitrary bytes to the gossip core as a bulk-sync chunk (after decryption: the
//! chunk decoder and the merge), and to the keyring as a sealed chunk.
//!
//! Properties checked on every input: nothing panics; a chunk that does not decode is
//! counted as malformed and merges nothing; whatever merged, a bulk sync back is made of
//! chunks within the 1 MiB limit.
#![no_main]

use flotilla::gossip::keyring::{Keyring, Kind};
use flotilla::gossip::{Gossip, GossipConfig, NodeAddr, codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut keyring = Keyring::new();
    keyring.add(&[5; 32]).expect("a 32-byte key");
    assert!(keyring.open(Kind::Chunk, data).is_err());
    let me = NodeAddr("10.0.0.1:7946".into());
    let from = NodeAddr("10.0.0.2:7946".into());
    let mut gossip = Gossip::new(GossipConfig::new("node-a", me, 7), 0);
    gossip.join_network("red").expect("a valid name");
    let malformed_before = gossip.stats().malformed;
    gossip.receive_chunk(&from, data, 10);
    let decodes = codec::decode_chunk(data).is_ok();
    assert_eq!(gossip.stats().malformed > malformed_before, !decodes);
    if !decodes {
        assert_eq!(gossip.entries_held(), 0, "a refused chunk merges nothing");
    }
    for (session, _) in gossip.poll_output().bulk_sessions {
        while let Some(chunk) = gossip.next_chunk(session) {
            assert!(chunk.len() <= codec::BULK_CHUNK_BYTES_MAX);
        }
    }
});
