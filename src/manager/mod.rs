//! The manager process: bootstrap (`init`, `join`, `rejoin`, undoing
//! a failed first start), `repair`, and the running components with their start and
//! shutdown order.
//!
//! Owns the wiring between components. Must never implement a component's logic itself
//! (consensus lives in `raft`, certificates in `ca`, sockets in `net`).

pub mod bootstrap;
pub mod first_start;
pub mod register;
pub mod repair;
pub mod runtime;
pub mod state;

/// The node's state directory, which the manager runs from (it lives below `agent` and
/// `control`, which use it too).
pub use crate::state_dir::{Settings, StateDir, StateDirError};
pub use bootstrap::{
    BootstrapError, Rejoined, become_manager, init, join, random_raft_id, rejoin_damaged,
};
pub use runtime::{Manager, StartError, Stopped};
