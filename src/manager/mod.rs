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

/// The control duties keep the join tokens file in step with the replicated Cluster object.
/// (Implemented here, where the manager wires `control` to its directory: `state_dir` lies
/// below `control` and must not import it.)
impl crate::control::TokensFile for StateDir {
    fn load_tokens(&self) -> Result<crate::ca::JoinTokens, crate::control::TokensFileError> {
        Ok(StateDir::load_tokens(self)?)
    }

    fn save_tokens(
        &self,
        tokens: &crate::ca::JoinTokens,
    ) -> Result<(), crate::control::TokensFileError> {
        Ok(StateDir::save_tokens(self, tokens)?)
    }
}
