//! `flotilla manager ls|rm|transfer`: the Raft group's operator calls, made through the
//! control API (`control.ListManagers|RemoveManager|TransferLeadership`) with the same
//! client as every other command: the local `control.sock`, `--manager ADDR`, an admin
//! certificate, forwarding by followers and `--format json` all come with it.
//!
//! Must never call `raft.*` itself: the manager it talks to asks the leader. Must never talk
//! to the transport except through [`Client`], nor print a table itself (tables are in
//! [`super::output`]).

use clap::Subcommand;

use super::client::Client;
use super::output::{Format, print_managers};
use crate::cli::CommandError;
use crate::control::{LIST_MANAGERS, REMOVE_MANAGER, TRANSFER_LEADERSHIP};
use crate::proto::control as pb;
use crate::proto::raft::StatusResponse;

/// `flotilla manager …`
#[derive(Subcommand, Debug)]
pub enum ManagerCommand {
    /// List the managers: id, address, role, reachability, replication progress.
    Ls,
    /// Remove a manager from the group (refused if the rest would lack a quorum).
    Rm {
        /// The manager's Raft id (hex, as `manager ls` prints it).
        id: String,
        /// Remove it even if the remaining managers cannot form a quorum.
        #[arg(long)]
        force: bool,
    },
    /// Hand leadership to another manager.
    Transfer {
        /// The manager's Raft id (hex, as `manager ls` prints it).
        id: String,
    },
}

fn parse_id(id: &str) -> Result<u64, String> {
    u64::from_str_radix(id.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{id:?} is not a manager id; `flotilla manager ls` lists them (hex)"))
}

fn status_of(reply: pb::ManagersResponse) -> Result<StatusResponse, String> {
    reply
        .status
        .ok_or_else(|| "the manager sent an empty reply".to_string())
}

/// Runs one `manager` subcommand through `client`.
///
/// # Errors
/// A message for stderr, with a hint; [`CommandError::OutcomeUnknown`] when `rm` or
/// `transfer` may or may not have happened.
pub(crate) fn run(client: &Client, command: ManagerCommand) -> Result<(), CommandError> {
    match command {
        ManagerCommand::Ls => {
            let reply: pb::ManagersResponse =
                client.unary(LIST_MANAGERS, &pb::ListManagersRequest {})?;
            print_managers(client, &status_of(reply)?);
        }
        ManagerCommand::Rm { id, force } => {
            let raft_id = parse_id(&id)?;
            let reply: pb::ManagersResponse = client.write_without_request_id(
                REMOVE_MANAGER,
                &pb::RemoveManagerRequest { raft_id, force },
                "flotilla manager ls",
            )?;
            match client.format {
                Format::Json => print_managers(client, &status_of(reply)?),
                Format::Table => println!("removed manager {raft_id:x}"),
            }
        }
        ManagerCommand::Transfer { id } => {
            let raft_id = parse_id(&id)?;
            let reply: pb::ManagersResponse = client.write_without_request_id(
                TRANSFER_LEADERSHIP,
                &pb::TransferLeadershipRequest { raft_id },
                "flotilla manager ls",
            )?;
            match client.format {
                Format::Json => print_managers(client, &status_of(reply)?),
                Format::Table => println!("manager {raft_id:x} is now the leader"),
            }
        }
    }
    Ok(())
}
