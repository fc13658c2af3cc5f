//! Protobuf types generated from `proto/` by `build.rs` (protox + prost-build).
//!
//! Each package with a `service` block also has an `rpc` module, generated from it: wire
//! names, typed method descriptors with their policies, the service's method table and a
//! typed client stub (see `build.rs` and [`crate::net::method`]). [`METHODS`] lists every
//! declared method and [`method_index`] finds one by wire name.
//!
//! This module owns no logic; it only gives the generated code a stable path.
#![allow(missing_docs, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/rpc_methods.rs"));

/// The RPC frame envelope (`proto/flotilla/wire.proto`).
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/flotilla.wire.rs"));
}

/// The cluster CA's methods (`proto/flotilla/ca.proto`).
pub mod ca {
    include!(concat!(env!("OUT_DIR"), "/flotilla.ca.rs"));
}

/// Messages between Raft members (`proto/flotilla/raft.proto`).
pub mod raft {
    include!(concat!(env!("OUT_DIR"), "/flotilla.raft.rs"));
}

/// The replicated key-value map used by tests and benchmarks (`proto/flotilla/kv.proto`).
pub mod kv {
    include!(concat!(env!("OUT_DIR"), "/flotilla.kv.rs"));
}

/// The replicated cluster objects and store transactions (`proto/flotilla/objects.proto`).
pub mod objects {
    include!(concat!(env!("OUT_DIR"), "/flotilla.objects.rs"));

    /// Never the key: a `{:?}` of a Cluster object may reach a log.
    impl std::fmt::Debug for RootCaKey {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RootCaKey")
                .field("cert_der_bytes", &self.cert_der.len())
                .field("key_der", &"<redacted>")
                .finish()
        }
    }
}

/// The control API (`proto/flotilla/control.proto`).
pub mod control {
    include!(concat!(env!("OUT_DIR"), "/flotilla.control.rs"));
}

/// The dispatcher: agent sessions, assignments, task status (`proto/flotilla/dispatcher.proto`).
pub mod dispatcher {
    include!(concat!(env!("OUT_DIR"), "/flotilla.dispatcher.rs"));

    /// Status updates per `UpdateTaskStatus` call (one transaction's worth): the dispatcher
    /// refuses more, the agent sends at most this many.
    pub const STATUS_UPDATES_MAX: usize = 200;
    /// Encoded task bytes per assignments message; a bigger set is sent in several.
    pub const ASSIGNMENTS_BYTES_MAX: usize = 1 << 20;
}
