//! The node side of task execution: a process executor, the local task manager that makes
//! this node's processes match the tasks assigned to it, the agent's side of the dispatcher
//! protocol, and the worker process (`flotilla agent`).
//!
//! Owns child processes of the agent and the `agent-tasks`, `agent-session`,
//! `agent-reporter` and `agent-logs` ([`logs`]: task output as timestamped lines, served to
//! the leader's log subscriptions) threads. The runner and executor never talk to the network:
//! [`node::Agent`] wires the dispatcher session ([`session`]), which hands assignments to
//! [`tasks::TaskRunner`] and carries its [`tasks::TaskStatusReport`]s to the managers.
//! [`runtime`] runs a worker node: its identity, its renewer, its transport and its agent.
//! [`managers`] holds the managers a worker calls, as given and as its sessions tell it.
//!
//! A task never runs twice because of a lost link: the agent stops its tasks itself
//! (self-fencing) before the managers may give them to other nodes, counting from the send
//! time of its last acknowledged heartbeat (rule and margin: [`session`]'s module doc).
//!
//! Must never import `dispatcher` (the managers' side): what both sides agree on (limits,
//! messages) lives in `proto::dispatcher`.

pub mod chain;
pub mod endpoints;
pub mod executor;
pub mod health;
pub mod host;
pub mod last_contact;
pub mod limits;
pub mod logs;
pub mod managers;
pub mod node;
pub mod runtime;
pub mod session;
mod sys;
pub mod tasks;
pub mod values;

pub use node::{Agent, AgentError};
pub use tasks::{
    AssignError, RunnerConfig, RunnerError, TASKS_RUNNING_MAX_DEFAULT, TaskRunner, TaskStatusReport,
};
