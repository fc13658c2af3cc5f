//! The node side of task execution: a process executor and the local task manager that
//! makes this node's processes match the tasks assigned to it.
//!
//! Owns child processes of the agent and the `agent-tasks` thread. The runner and executor
//! never talk to the network: [`node::Agent`] wires the dispatcher session
//! (`dispatcher::client`), which hands assignments to [`tasks::TaskRunner`] and carries its
//! [`tasks::TaskStatusReport`]s to the managers.

pub mod executor;
pub mod node;
mod sys;
pub mod tasks;

pub use node::{Agent, AgentError};
pub use tasks::{
    AssignError, RunnerConfig, RunnerError, TASKS_RUNNING_MAX_DEFAULT, TaskRunner, TaskStatusReport,
};
