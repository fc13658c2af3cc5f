//! Feeds arbitrary bytes to `Store::restore`.
//!
//! Properties checked on every input: restore never panics; a refused stream leaves the
//! store exactly as it was; an accepted store's own snapshot restores to the same bytes.
//! (Streams need a valid SHA-256 trailer to be accepted, so this mostly fuzzes the refusals:
//! no panic, no allocation beyond the record limit.)
#![no_main]

use std::io::Read;

use flotilla::proto::objects::{Service, ServiceSpec, Transaction};
use flotilla::store::{Store, create};
use libfuzzer_sys::fuzz_target;

fn snapshot_bytes(store: &Store) -> Vec<u8> {
    let mut bytes = Vec::new();
    store
        .snapshot()
        .read_to_end(&mut bytes)
        .expect("reading a snapshot stream cannot fail");
    bytes
}

fuzz_target!(|data: &[u8]| {
    let store = Store::default();
    let seed = Service {
        id: "seed".into(),
        spec: Some(ServiceSpec {
            name: "seed".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    store
        .apply(
            1,
            &Transaction {
                changes: vec![create(seed)],
                timestamp_ms: 0,
                request_id: None,
            },
        )
        .expect("seeding an empty store succeeds");
    let before = snapshot_bytes(&store);
    match store.restore(data) {
        Ok(_) => {
            let again = snapshot_bytes(&store);
            let copy = Store::default();
            copy.restore(again.as_slice())
                .expect("a store's own snapshot always restores");
            assert_eq!(snapshot_bytes(&copy), again);
        }
        Err(_) => assert_eq!(snapshot_bytes(&store), before, "a refused snapshot changes nothing"),
    }
});
