//! Raft consensus for the manager group.
//!
//! - [`types`]: the values every part agrees on (entries, hard state, membership, snapshot
//!   metadata).
//! - [`core`]: the pure state machine (no clock, no IO, no threads).
//! - [`sim`]: the deterministic simulator that checks the core under faults.

//!
//! Later submodules: `storage` (fjall log and snapshot files) and `node` (the threads that
//! drive the core).

pub mod core;
pub mod sim;
pub mod types;
