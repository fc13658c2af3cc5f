//! The node side of task execution: a process executor and the local task manager that
//! makes this node's processes match the tasks assigned to it.
//!
//! Owns child processes of the agent and the `agent-tasks` thread. Must never talk to the
//! network: the dispatcher session hands assignments to [`tasks::TaskRunner`] and carries its
//! [`tasks::TaskStatusReport`]s to the managers.

pub mod executor;
mod sys;
pub mod tasks;

pub use tasks::{AssignError, RunnerConfig, RunnerError, TaskRunner, TaskStatusReport};
