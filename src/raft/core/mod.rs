//! The Raft core: one member's consensus state machine, pure and deterministic.
//!
//! Owns elections (randomized timeouts, pre-vote, check-quorum, leader stickiness),
//! replication (pipelined appends with per-peer flow control, fast backtracking, heartbeats
//! carrying the commit index), the figure-8 commit rule, linearizable reads (ReadIndex rounds
//! and an optional leader lease), leadership transfer, single-server membership changes with
//! learners, and snapshot-driven compaction.
//!
//! It must never read a clock, perform IO, spawn a thread or draw randomness other than from
//! its configured seed. The node layer drives it:
//!
//! - inputs: [`RaftCore::tick`], [`RaftCore::step`], [`RaftCore::propose`],
//!   [`RaftCore::propose_membership`], [`RaftCore::read_index`],
//!   [`RaftCore::transfer_leadership`], [`RaftCore::on_entries_persisted`],
//!   [`RaftCore::on_hard_state_persisted`], [`RaftCore::on_snapshot_installed`],
//!   [`RaftCore::on_snapshot_created`];
//! - output: [`RaftCore::ready`] returns a [`Ready`]: a snapshot to install, entries and hard
//!   state to persist, messages to send, committed entries to apply, confirmed reads.
//!
//! Messages that claim durability (vote grants, append acknowledgements) are held inside the
//! core until storage reports the state they depend on durable, so the node may send every
//! message of a Ready at once while its log writer persists in parallel. The leader counts
//! itself toward a commit quorum only for entries its own storage reported durable, and only
//! committed entries that are durable locally are handed out for application.

pub mod config;
pub mod error;
pub mod log;
pub mod membership;
pub mod message;
pub mod progress;
pub mod raw;

#[cfg(test)]
mod tests;

pub use config::Config;
pub use error::RaftError;
pub use membership::MembershipChange;
pub use message::{Message, MessageBody, RejectHint};
pub use progress::{Progress, ReplicationState};
pub use raw::{InitialState, Proposed, RaftCore, ReadState, Ready, Role, SoftState};
