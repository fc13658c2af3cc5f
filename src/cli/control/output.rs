//! What the control commands print: the output format, the tables of services, tasks, nodes
//! and managers (their columns and how each value is shown), and JSON printing
//! ([`Client::print_json`], the documents built by [`crate::cli::json`]).
//!
//! Must never call a manager or decide what to ask: commands hand it what they received.

use clap::ValueEnum;

use super::client::Client;
use crate::cli::json;
use crate::proto::json::label;
use crate::proto::objects::{
    ManagerStatus, NodeAvailability, NodeRole, NodeState, RaftReachability, ServiceMode,
    ServiceSpec, TaskState,
};
use crate::proto::raft::StatusResponse;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human tables.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

impl Client {
    pub(crate) fn print_json(&self, value: &impl serde::Serialize) {
        println!("{}", json::pretty(value));
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn replicas_text(spec: &ServiceSpec) -> String {
    if spec.mode == ServiceMode::Global as i32 {
        "global".to_string()
    } else {
        spec.replicas.to_string()
    }
}

pub(super) fn print_services(client: &Client, services: &[crate::proto::objects::Service]) {
    if client.format == Format::Json {
        client.print_json(&services.iter().map(json::service).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<12}  {:<24}  {:<10}  {:>8}  {:>8}  COMMAND",
        "ID", "NAME", "MODE", "REPLICAS", "VERSION"
    );
    for service in services {
        let spec = service.spec.clone().unwrap_or_default();
        let task = spec.task.clone().unwrap_or_default();
        println!(
            "{:<12}  {:<24}  {:<10}  {:>8}  {:>8}  {} {}",
            short(&service.id),
            spec.name,
            label::<ServiceMode>(spec.mode),
            replicas_text(&spec),
            service.meta.as_ref().map_or(0, |m| m.version),
            task.command,
            task.args.join(" ")
        );
    }
}

pub(super) fn print_networks(client: &Client, networks: &[crate::proto::objects::Network]) {
    if client.format == Format::Json {
        client.print_json(&networks.iter().map(json::network).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<12}  {:<24}  {:<10}  {:>8}",
        "ID", "NAME", "DRIVER", "VERSION"
    );
    for network in networks {
        let spec = network.spec.clone().unwrap_or_default();
        println!(
            "{:<12}  {:<24}  {:<10}  {:>8}",
            short(&network.id),
            spec.name,
            spec.driver,
            network.meta.as_ref().map_or(0, |m| m.version),
        );
    }
}

/// What `service ps` and `task ls` show in their ERROR column (docker's): why the task
/// failed, or why it is still pending (no node fits, none ready, …); empty otherwise.
fn task_problem(task: &crate::proto::objects::Task) -> &str {
    let Some(status) = task.status.as_ref() else {
        return "";
    };
    if !status.err.is_empty() {
        &status.err
    } else if status.state == TaskState::Pending as i32 {
        &status.message
    } else {
        ""
    }
}

pub(super) fn print_tasks(client: &Client, tasks: &[crate::proto::objects::Task]) {
    if client.format == Format::Json {
        client.print_json(&tasks.iter().map(json::task).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<12}  {:<12}  {:>5}  {:<12}  {:<10}  {:<10}  ERROR",
        "ID", "SERVICE", "SLOT", "NODE", "DESIRED", "CURRENT"
    );
    for task in tasks {
        println!(
            "{:<12}  {:<12}  {:>5}  {:<12}  {:<10}  {:<10}  {}",
            short(&task.id),
            short(&task.service_id),
            task.slot,
            if task.node_id.is_empty() {
                "-"
            } else {
                short(&task.node_id)
            },
            label::<TaskState>(task.desired_state),
            label::<TaskState>(task.status.as_ref().map_or(0, |s| s.state)),
            task_problem(task),
        );
    }
}

/// `node ls`'s MANAGER STATUS (docker's): `leader`, else the manager's reachability as the
/// leader sees it (as `manager ls` shows it).
fn manager_status_label(status: &ManagerStatus) -> String {
    if status.leader {
        "leader".to_string()
    } else {
        label::<RaftReachability>(status.reachability)
    }
}

pub(super) fn print_nodes(client: &Client, nodes: &[crate::proto::objects::Node]) {
    if client.format == Format::Json {
        client.print_json(&nodes.iter().map(json::node).collect::<Vec<_>>());
        return;
    }
    println!(
        "{:<25}  {:<20}  {:<8}  {:<12}  {:<8}  MANAGER STATUS",
        "ID", "HOSTNAME", "STATUS", "AVAILABILITY", "ROLE"
    );
    for node in nodes {
        let spec = node.spec.clone().unwrap_or_default();
        let manager = node
            .manager_status
            .as_ref()
            .map_or_else(String::new, manager_status_label);
        println!(
            "{:<25}  {:<20}  {:<8}  {:<12}  {:<8}  {manager}",
            node.id,
            spec.hostname,
            label::<NodeState>(node.status.as_ref().map_or(0, |s| s.state)),
            label::<NodeAvailability>(spec.availability),
            label::<NodeRole>(node.role),
        );
    }
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

pub(super) fn print_managers(client: &Client, status: &StatusResponse) {
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
