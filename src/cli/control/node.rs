//! `flotilla node ls|inspect|update|rm|promote|demote`: the node commands and their
//! arguments.
//!
//! Must never talk to the transport except through [`Client`], nor print a table itself
//! (tables are in [`super::output`]).

use clap::Subcommand;

use super::client::Client;
use super::flags::{parse_choice, parse_pairs};
use super::output::{Format, print_nodes};
use crate::cli::{CommandError, json};
use crate::control as api;
use crate::proto::control as pb;
use crate::proto::json::label;
use crate::proto::objects::{NodeAvailability, NodeRole};

/// `flotilla node …`
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the nodes.
    Ls,
    /// Show a node (JSON).
    Inspect {
        /// Id, unique id prefix or hostname.
        node: String,
    },
    /// Change a node's availability or labels.
    Update {
        /// Id, unique id prefix or hostname.
        node: String,
        /// `active`, `pause` or `drain`.
        #[arg(long)]
        availability: Option<String>,
        /// Add or replace a label KEY=VALUE (repeatable).
        #[arg(long)]
        label_add: Vec<String>,
        /// Remove a label (repeatable).
        #[arg(long)]
        label_rm: Vec<String>,
        /// Refuse the update unless the node is still at this version.
        #[arg(long)]
        if_version: Option<u64>,
    },
    /// Remove a node from the cluster.
    Rm {
        /// Id, unique id prefix or hostname.
        node: String,
        /// Remove it even if it looks up.
        #[arg(long)]
        force: bool,
    },
    /// Ask for a node to become a manager: a demoted (stopped) worker then rejoins with
    /// `flotilla join` and the manager token, as the command prints.
    Promote {
        /// Id, unique id prefix or hostname.
        node: String,
    },
    /// Ask for a manager to become a worker: refused if it would cost the quorum; the
    /// leader removes it from the managers (handing leadership over first if it leads),
    /// and it stops.
    Demote {
        /// Id, unique id prefix or hostname.
        node: String,
    },
}

fn get_node(client: &Client, reference: &str) -> Result<crate::proto::objects::Node, String> {
    let reply: pb::NodeResponse = client.unary(
        api::GET_NODE,
        &pb::GetNodeRequest {
            reference: reference.to_string(),
        },
    )?;
    reply
        .node
        .ok_or_else(|| "the manager sent an empty reply".to_string())
}

fn update_node(
    client: &Client,
    reference: &str,
    if_version: Option<u64>,
    change: impl FnOnce(&mut crate::proto::objects::NodeSpec) -> Result<(), String>,
) -> Result<crate::proto::objects::Node, CommandError> {
    let current = get_node(client, reference)?;
    let mut spec = current.spec.clone().unwrap_or_default();
    change(&mut spec)?;
    let version = if_version.unwrap_or_else(|| current.meta.as_ref().map_or(0, |m| m.version));
    let reply: pb::NodeResponse = client.write(
        api::UPDATE_NODE,
        &pb::UpdateNodeRequest {
            reference: current.id.clone(),
            version,
            spec: Some(spec),
            request_id: client.next_request(),
        },
        &format!("flotilla node inspect {}", current.id),
    )?;
    Ok(reply
        .node
        .ok_or_else(|| "the manager sent an empty reply".to_string())?)
}

pub(super) fn run(client: &Client, command: NodeCommand) -> Result<(), CommandError> {
    let set_role = |node: &str, role: NodeRole| -> Result<(), CommandError> {
        let updated = update_node(client, node, None, |spec| {
            spec.desired_role = role as i32;
            Ok(())
        })?;
        out!(
            "node {} desired role is now {}",
            updated.id,
            label::<NodeRole>(role as i32)
        );
        print_role_hint(&updated, role);
        Ok(())
    };
    match command {
        NodeCommand::Ls => {
            let nodes = client.list(
                api::LIST_NODES,
                &pb::ListNodesRequest {},
                |c: pb::NodeChunk| c.nodes,
            )?;
            print_nodes(client, &nodes);
        }
        NodeCommand::Inspect { node } => client.print_json(&json::node(&get_node(client, &node)?)),
        NodeCommand::Update {
            node,
            availability,
            label_add,
            label_rm,
            if_version,
        } => {
            let updated = update_node(client, &node, if_version, |spec| {
                if let Some(availability) = availability {
                    spec.availability =
                        parse_choice::<NodeAvailability>("availability", &availability)? as i32;
                }
                spec.labels.extend(parse_pairs("label-add", &label_add)?);
                for key in &label_rm {
                    spec.labels.remove(key);
                }
                Ok(())
            })?;
            match client.format {
                Format::Json => client.print_json(&json::node(&updated)),
                Format::Table => out!("{}", updated.id),
            }
        }
        NodeCommand::Rm { node, force } => {
            let check = format!("flotilla node inspect {node}");
            let reply: pb::RemoveResponse = client.write(
                api::REMOVE_NODE,
                &pb::RemoveNodeRequest {
                    reference: node,
                    force,
                    request_id: client.next_request(),
                },
                &check,
            )?;
            out!("{}", reply.id);
        }
        NodeCommand::Promote { node } => set_role(&node, NodeRole::Manager)?,
        NodeCommand::Demote { node } => set_role(&node, NodeRole::Worker)?,
    }
    Ok(())
}

/// Says how a role change takes effect: a demotion is carried out by the leader, a
/// promotion of a (stopped) worker by rejoining it with the manager token.
fn print_role_hint(node: &crate::proto::objects::Node, role: NodeRole) {
    let is_manager = node.role == NodeRole::Manager as i32;
    match role {
        NodeRole::Worker if is_manager => out!(
            "the leader removes it from the managers as soon as that keeps a quorum; it then \
             goes on as a worker (`flotilla manager ls` shows the managers, `flotilla node ls` \
             its role)"
        ),
        NodeRole::Manager if !is_manager => out!(
            "the node becomes a manager in place: within a heartbeat its agent renews its \
             certificate as a manager's and joins the managers (a worker started without \
             `--listen` says it needs one). `flotilla manager ls` shows it once it has joined"
        ),
        _ => {}
    }
}
