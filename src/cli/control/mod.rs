//! `flotilla service|node|network|task|cluster|join-token|manager|admin-cert|watch …`: control API
//! calls through a manager, over mutual TLS with the node identity in the state directory.
//! Writes may go to any manager (a follower forwards them to the leader); reads are
//! linearizable anywhere.
//!
//! Writes are exactly-once ([`Client::write`]): each carries this invocation's client id and
//! a request number, the same on every retry, so a retry after an unknown outcome gets the
//! first attempt's answer. A write whose outcome stays unknown after the retries is
//! reported as such ([`CommandError::OutcomeUnknown`], exit code
//! [`super::EXIT_OUTCOME_UNKNOWN`]), never as failed or as a conflict.
//!
//! One module per noun, each with its clap definitions and its commands ([`service`],
//! [`node`], [`network`], [`task`], [`cluster`], [`join_token`], [`manager`], [`admin_cert`], [`watch`]),
//! all calling through one [`Client`] ([`client`]: connection, retries, exactly-once
//! writes) and printing through [`output`] (tables, JSON); [`flags`] parses flag values.
//!
//! Must never change cluster state except through `control.*` calls. A noun module must
//! never talk to the transport except through the client (`watch` opens its stream on the
//! client's transport and TLS configuration, to the manager it picks), nor print a table
//! itself.

/// `println!` for command output: a reader that goes away (`flotilla task ls | head`) ends
/// the command quietly instead of panicking. SIGPIPE stays ignored (Rust's default), since
/// the same process writes to a manager's socket, where a broken pipe is an error to retry.
macro_rules! out {
    () => {
        $crate::cli::control::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::control::print_line(format_args!($($arg)*))
    };
}

/// Writes one line of command output; exits quietly (status 0) once stdout is closed.
pub(crate) fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(line)
        .and_then(|()| stdout.write_all(b"\n"));
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write the output: {e}");
            std::process::exit(1);
        }
    }
}

mod admin_cert;
mod client;
mod cluster;
mod flags;
mod join_token;
mod logs;
mod manager;
mod network;
mod node;
mod output;
mod progress;
mod secret;
mod service;
mod task;
pub mod watch;

pub use admin_cert::AdminCertCommand;
pub(crate) use client::Client;
pub use client::{
    CALL_TIMEOUT, CLIENT_ID_BYTES, Connection, RETRY_SOON_ATTEMPTS_MAX, RETRY_SOON_WAIT,
    UNKNOWN_OUTCOME_RETRIES_MAX,
};
pub use cluster::ClusterCommand;
pub use flags::{SpecFlags, parse_bytes, parse_duration_ms, parse_nano_cpus};
pub use join_token::TokenRole;
pub use manager::ManagerCommand;
pub use network::NetworkCommand;
pub use node::NodeCommand;
pub use output::Format;
pub use secret::{ValueCommand, ValueKind};
pub use service::ServiceCommand;
pub use task::TaskCommand;
pub use watch::WatchArgs;

use crate::cli::CommandError;

/// What a control command asks.
#[derive(Debug)]
pub enum ControlCommand {
    /// `service …`
    Service(Box<ServiceCommand>),
    /// `node …`
    Node(NodeCommand),
    /// `network …`
    Network(NetworkCommand),
    /// `secret …` or `config …`
    Value(ValueKind, ValueCommand),
    /// `task …`
    Task(TaskCommand),
    /// `cluster …`
    Cluster(ClusterCommand),
    /// `join-token ROLE [--rotate]`
    JoinToken {
        /// Which token.
        role: TokenRole,
        /// Replace it first.
        rotate: bool,
    },
    /// `manager …`
    Manager(ManagerCommand),
    /// `admin-cert …`
    AdminCert(AdminCertCommand),
    /// `watch …`
    Watch(WatchArgs),
}

/// Runs one control command through the manager `connection` names.
///
/// # Errors
/// A message for stderr, with a hint.
pub fn run(connection: &Connection, command: ControlCommand) -> Result<(), CommandError> {
    let client = Client::connect(connection)?;
    let result = match command {
        ControlCommand::Service(command) => service::run(&client, *command),
        ControlCommand::Node(command) => node::run(&client, command),
        ControlCommand::Network(command) => network::run(&client, command),
        ControlCommand::Value(kind, command) => secret::run(&client, kind, command),
        ControlCommand::Task(command) => task::run(&client, command).map_err(Into::into),
        ControlCommand::Cluster(command) => cluster::run(&client, command),
        ControlCommand::JoinToken { role, rotate } => join_token::run(&client, role, rotate),
        ControlCommand::Manager(command) => manager::run(&client, command),
        ControlCommand::AdminCert(command) => admin_cert::run(&client, command),
        ControlCommand::Watch(args) => watch::run(&client, &args).map_err(Into::into),
    };
    client.transport.shutdown();
    result
}
