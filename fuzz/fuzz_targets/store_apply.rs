//! Applies arbitrary log payloads to a store.
//!
//! The input is a sequence of records: a u16 length (little-endian) then that many bytes of
//! entry payload, applied at increasing indexes. Properties checked: apply never panics; a
//! refused entry changes nothing; after every entry the store survives a snapshot round trip
//! byte for byte (its indexes agree with its objects, or restore would refuse them).
#![no_main]

use std::io::Read;

use std::sync::Arc;

use flotilla::proto::objects::{Cluster, Network, Node, Service, Task};
use flotilla::store::Store;
use libfuzzer_sys::fuzz_target;

fn snapshot_bytes(store: &Store) -> Vec<u8> {
    let mut bytes = Vec::new();
    store
        .snapshot()
        .read_to_end(&mut bytes)
        .expect("reading a snapshot stream cannot fail");
    bytes
}

type Contents = (
    Vec<Arc<Node>>,
    Vec<Arc<Service>>,
    Vec<Arc<Task>>,
    Vec<Arc<Network>>,
    Vec<Arc<Cluster>>,
);

fn contents(store: &Store) -> Contents {
    (
        store.list(),
        store.list(),
        store.list(),
        store.list(),
        store.list(),
    )
}

fuzz_target!(|data: &[u8]| {
    let store = Store::default();
    let mut rest = data;
    let mut index = 0u64;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let payload = &rest[2..2 + len];
        rest = &rest[2 + len..];
        index += 1;
        let version_before = store.version();
        let contents_before = contents(&store);
        match store.apply_encoded(index, payload) {
            Ok(outcome) => assert_eq!(outcome.version, index),
            Err(_) => {
                assert_eq!(store.version(), version_before);
                assert!(contents(&store) == contents_before, "a refused entry changes nothing");
            }
        }
        let bytes = snapshot_bytes(&store);
        let copy = Store::default();
        copy.restore(bytes.as_slice())
            .expect("a store's own snapshot always restores");
        assert_eq!(snapshot_bytes(&copy), bytes);
    }
});
