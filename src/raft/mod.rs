//! Raft consensus for the manager group.
//!
//! - [`types`]: the values every part agrees on (entries, hard state, membership, snapshot
//!   metadata).
//! - [`core`]: the pure state machine (no clock, no IO, no threads).
//! - `sim` (with the `sim` feature: tests, benchmarks, examples): the deterministic simulator
//!   that checks the core under faults.
//! - [`storage`]: the fjall log and hard state, the group-commit writer, snapshot files.
//! - [`node`]: the threads that drive the core over the transport.

pub mod core;
pub mod node;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod storage;
pub mod types;
