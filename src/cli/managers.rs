//! `flotilla manager ls|rm|transfer`: operator calls to the Raft group through the local
//! manager, over mutual TLS with the node's own identity. Calls that only the leader can
//! serve follow the `leader_addr=` redirect once.

use std::sync::Arc;
use std::time::Duration;

use super::ManagerCommand;
use crate::ca::{load_node_files, tls};
use crate::manager::StateDir;
use crate::manager::register::leader_addr;
use crate::net::{CallOptions, Transport, TransportConfig};
use crate::proto::raft as pb;
use crate::raft::node::service::{REMOVE_MEMBER, STATUS, TRANSFER_LEADERSHIP};
use crate::wire::Status;

/// Deadline of one operator call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

struct Client {
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
    local_addr: String,
}

impl Client {
    fn connect(dir: &StateDir) -> Result<Self, String> {
        // Reading the settings first gives a clear error for a directory that holds no node.
        dir.load_settings()
            .map_err(|e| format!("{e}\nhint: point --state-dir at a manager's state directory"))?;
        let (identity, root) = load_node_files(&dir.node_dir()).map_err(|e| e.to_string())?;
        let tls = Arc::new(tls::client_config(&identity, &root).map_err(|e| e.to_string())?);
        let transport = Transport::start(TransportConfig::default())
            .map_err(|e| format!("cannot start the transport: {e}"))?;
        let local_addr = dir.local_target().map_err(|e| e.to_string())?;
        Ok(Self {
            transport,
            tls,
            local_addr,
        })
    }

    fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        method: &str,
        request: &Req,
    ) -> Result<Resp, String> {
        let first = self.call_at(&self.local_addr, method, request);
        match first {
            Err(status) => match leader_addr(&status.message) {
                Some(leader) => self
                    .call_at(&leader, method, request)
                    .map_err(|s| describe(&leader, &s)),
                None => Err(describe(&self.local_addr, &status)),
            },
            Ok(response) => Ok(response),
        }
    }

    fn call_at<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        addr: &str,
        method: &str,
        request: &Req,
    ) -> Result<Resp, Status> {
        self.transport.channel(addr, &self.tls).unary(
            method,
            request,
            CallOptions::timeout(CALL_TIMEOUT),
        )
    }
}

fn describe(addr: &str, status: &Status) -> String {
    let hint = match status.code {
        crate::wire::Code::Unavailable => {
            "\nhint: is the manager running? (`flotilla run --state-dir …`)"
        }
        _ => "",
    };
    format!("{addr}: {status}{hint}")
}

fn parse_id(id: &str) -> Result<u64, String> {
    u64::from_str_radix(id.trim_start_matches("0x"), 16)
        .map_err(|_| format!("{id:?} is not a manager id; `flotilla manager ls` lists them (hex)"))
}

/// Runs one `manager` subcommand.
///
/// # Errors
/// A message for stderr.
pub fn run(dir: &StateDir, command: ManagerCommand) -> Result<(), String> {
    let client = Client::connect(dir)?;
    let result = match command {
        ManagerCommand::Ls => list(&client),
        ManagerCommand::Rm { id, force } => {
            let raft_id = parse_id(&id)?;
            client
                .call::<_, pb::RemoveMemberResponse>(
                    REMOVE_MEMBER,
                    &pb::RemoveMemberRequest { raft_id, force },
                )
                .map(|_| println!("removed manager {raft_id:x}"))
        }
        ManagerCommand::Transfer { id } => {
            let raft_id = parse_id(&id)?;
            client
                .call::<_, pb::TransferLeadershipResponse>(
                    TRANSFER_LEADERSHIP,
                    &pb::TransferLeadershipRequest { raft_id },
                )
                .map(|_| println!("manager {raft_id:x} is now the leader"))
        }
    };
    client.transport.shutdown();
    result
}

fn list(client: &Client) -> Result<(), String> {
    // Ask the local manager who leads, then the leader: only it knows replication progress.
    let local: pb::StatusResponse = client
        .call_at(&client.local_addr, STATUS, &pb::StatusRequest {})
        .map_err(|s| describe(&client.local_addr, &s))?;
    let leader_addr = local
        .members
        .iter()
        .find(|m| m.raft_id == local.leader)
        .map(|m| m.addr.clone());
    let status = match leader_addr {
        Some(addr) if !addr.is_empty() && local.leader != local.id => client
            .call_at(&addr, STATUS, &pb::StatusRequest {})
            .unwrap_or(local),
        _ => local,
    };
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
    Ok(())
}
