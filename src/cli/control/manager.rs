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
use super::output::{Format, RaftNodes, print_managers};
use crate::cli::CommandError;
use crate::control::{LIST_MANAGERS, LIST_NODES, REMOVE_MANAGER, TRANSFER_LEADERSHIP};
use crate::proto::control as pb;
use crate::proto::raft::StatusResponse;

/// `flotilla manager …`
#[derive(Subcommand, Debug)]
pub enum ManagerCommand {
    /// List the managers: id, address, role, reachability, replication progress.
    Ls,
    /// Remove a manager from the group (refused if the rest would lack a quorum).
    Rm {
        /// The manager's node id (or a unique prefix), or its Raft id (hex), as `manager
        /// ls` prints them.
        id: String,
        /// Remove it even if the remaining managers cannot form a quorum.
        #[arg(long)]
        force: bool,
    },
    /// Hand leadership to another manager.
    Transfer {
        /// The manager's node id (or a unique prefix), or its Raft id (hex), as `manager
        /// ls` prints them.
        id: String,
    },
}

fn raft_nodes(client: &Client) -> Result<RaftNodes, String> {
    let nodes = client.list(LIST_NODES, &pb::ListNodesRequest {}, |c: pb::NodeChunk| {
        c.nodes
    })?;
    Ok(RaftNodes::new(&nodes))
}

/// The Raft id of the manager `reference` names: its node id, a unique prefix of it, or
/// its Raft id in hex (what `manager ls` prints). A whole node id wins over a Raft id, a
/// Raft id over a prefix.
fn resolve_member(
    reference: &str,
    nodes: &RaftNodes,
    status: &StatusResponse,
) -> Result<u64, String> {
    let members = || status.members.iter().map(|m| m.raft_id);
    if let Some(raft_id) = members().find(|id| nodes.node_of(*id) == Some(reference)) {
        return Ok(raft_id);
    }
    let hex = reference.trim_start_matches("0x");
    if let Some(raft_id) = u64::from_str_radix(hex, 16)
        .ok()
        .filter(|id| members().any(|m| m == *id))
    {
        return Ok(raft_id);
    }
    let by_prefix: Vec<u64> = members()
        .filter(|id| nodes.node_of(*id).is_some_and(|n| n.starts_with(reference)))
        .collect();
    match by_prefix.as_slice() {
        [raft_id] if !reference.is_empty() => Ok(*raft_id),
        [] | [_] => Err(format!(
            "no manager has id {reference}: it is not a manager's node id (or a unique prefix \
             of one) nor its Raft id; `flotilla manager ls` lists both"
        )),
        _ => Err(format!(
            "{reference:?} is the start of {} managers' node ids: give more of it",
            by_prefix.len()
        )),
    }
}

/// `node-id (raft id 1a2b)` for messages, or the Raft id alone when no node records it.
fn member_text(raft_id: u64, nodes: &RaftNodes) -> String {
    nodes.node_of(raft_id).map_or_else(
        || format!("{raft_id:x}"),
        |node| format!("{node} (raft id {raft_id:x})"),
    )
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
            print_managers(client, &status_of(reply)?, &raft_nodes(client)?);
        }
        ManagerCommand::Rm { id, force } => {
            let nodes = raft_nodes(client)?;
            let listing: pb::ManagersResponse =
                client.unary(LIST_MANAGERS, &pb::ListManagersRequest {})?;
            let raft_id = resolve_member(&id, &nodes, &status_of(listing)?)?;
            let reply: pb::ManagersResponse = client.write_without_request_id(
                REMOVE_MANAGER,
                &pb::RemoveManagerRequest { raft_id, force },
                "flotilla manager ls",
            )?;
            match client.format {
                Format::Json => print_managers(client, &status_of(reply)?, &nodes),
                Format::Table => out!("removed manager {}", member_text(raft_id, &nodes)),
            }
        }
        ManagerCommand::Transfer { id } => {
            let nodes = raft_nodes(client)?;
            let listing: pb::ManagersResponse =
                client.unary(LIST_MANAGERS, &pb::ListManagersRequest {})?;
            let raft_id = resolve_member(&id, &nodes, &status_of(listing)?)?;
            let reply: pb::ManagersResponse = client.write_without_request_id(
                TRANSFER_LEADERSHIP,
                &pb::TransferLeadershipRequest { raft_id },
                "flotilla manager ls",
            )?;
            match client.format {
                Format::Json => print_managers(client, &status_of(reply)?, &nodes),
                Format::Table => out!("manager {} is now the leader", member_text(raft_id, &nodes)),
            }
        }
    }
    Ok(())
}
