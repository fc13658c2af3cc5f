//! flotilla: the control plane of Docker swarm mode, rebuilt in Rust for constrained hosts.
//!
//! Managers form a Raft group that replicates the cluster state; agents connect to any
//! manager over mutual TLS, receive task assignments and run them. See `ARCHITECTURE.md` for
//! the modules, threads, channels and shutdown order.

pub mod agent;
pub mod ca;
pub mod ca_rpc;
pub mod cli;
pub mod control;
pub mod dispatcher;
pub mod dns;
pub mod gossip;
pub mod health;
pub mod kv;
#[cfg(any(test, feature = "sim"))]
pub mod lincheck;
pub mod manager;
pub mod net;
pub mod netdb;
pub mod networkdb;
pub mod orchestrator;
pub mod proto;
pub mod raft;
pub mod replication;
pub mod secrets;
pub mod state_dir;
pub mod store;
pub mod timer;
pub mod util;
pub mod wire;
