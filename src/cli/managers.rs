//! `flotilla manager ls|rm|transfer`: the Raft group's operator calls, made through the
//! control API (`control.ListManagers|RemoveManager|TransferLeadership`) with the same
//! client as every other command: the local `control.sock`, `--manager ADDR`, an admin
//! certificate, forwarding by followers and `--format json` all come with it.
//!
//! Must never call `raft.*` itself: the manager it talks to asks the leader.

use super::ManagerCommand;
use super::control::{Client, Format};
use crate::control::{LIST_MANAGERS, REMOVE_MANAGER, TRANSFER_LEADERSHIP};
use crate::proto::control as pb;
use crate::proto::raft::StatusResponse;

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
/// A message for stderr, with a hint.
pub(crate) fn run(client: &Client, command: ManagerCommand) -> Result<(), String> {
    match command {
        ManagerCommand::Ls => {
            let reply: pb::ManagersResponse =
                client.unary(LIST_MANAGERS, &pb::ListManagersRequest {})?;
            print_managers(client, &status_of(reply)?);
        }
        ManagerCommand::Rm { id, force } => {
            let raft_id = parse_id(&id)?;
            let reply: pb::ManagersResponse =
                client.unary(REMOVE_MANAGER, &pb::RemoveManagerRequest { raft_id, force })?;
            match client.format {
                Format::Json => print_managers(client, &status_of(reply)?),
                Format::Table => println!("removed manager {raft_id:x}"),
            }
        }
        ManagerCommand::Transfer { id } => {
            let raft_id = parse_id(&id)?;
            let reply: pb::ManagersResponse = client.unary(
                TRANSFER_LEADERSHIP,
                &pb::TransferLeadershipRequest { raft_id },
            )?;
            match client.format {
                Format::Json => print_managers(client, &status_of(reply)?),
                Format::Table => println!("manager {raft_id:x} is now the leader"),
            }
        }
    }
    Ok(())
}

/// One member in `manager ls --format json`: ids in hex, as the table prints them and
/// `rm`/`transfer` take them.
#[derive(serde::Serialize)]
struct MemberShown<'a> {
    id: String,
    addr: &'a str,
    role: &'a str,
    reachable: bool,
    last_contact_ms: u64,
    match_index: u64,
    problem: &'a str,
}

/// The group in `manager ls --format json`.
#[derive(serde::Serialize)]
struct GroupShown<'a> {
    leader: String,
    term: u64,
    commit: u64,
    members: Vec<MemberShown<'a>>,
}

fn managers_json(status: &StatusResponse) -> GroupShown<'_> {
    GroupShown {
        leader: format!("{:x}", status.leader),
        term: status.term,
        commit: status.commit,
        members: status
            .members
            .iter()
            .map(|m| MemberShown {
                id: format!("{:x}", m.raft_id),
                addr: &m.addr,
                role: &m.role,
                reachable: m.reachable,
                last_contact_ms: m.last_contact_ms,
                match_index: m.match_index,
                problem: &m.problem,
            })
            .collect(),
    }
}

fn print_managers(client: &Client, status: &StatusResponse) {
    if client.format == Format::Json {
        client.print_json(&managers_json(status));
        return;
    }
    println!(
        "{:<18} {:<22} {:<9} {:<10} {:>13} {:>12}  PROBLEM",
        "ID", "ADDRESS", "ROLE", "REACHABLE", "LAST CONTACT", "MATCH INDEX"
    );
    for m in &status.members {
        let contact = match m.last_contact_ms {
            0 => "-".to_string(),
            u64::MAX => "never".to_string(),
            ms => format!("{ms} ms ago"),
        };
        println!(
            "{:<18} {:<22} {:<9} {:<10} {:>13} {:>12}  {}",
            format!("{:x}", m.raft_id),
            if m.addr.is_empty() { "?" } else { &m.addr },
            m.role,
            if m.reachable { "yes" } else { "no" },
            contact,
            m.match_index,
            m.problem
        );
    }
    println!(
        "leader {:x}, term {}, commit index {}",
        status.leader, status.term, status.commit
    );
}
