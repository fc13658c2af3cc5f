//! What the control commands print: the output format, the tables of services, tasks, nodes
//! and managers (their columns and how each value is shown), and JSON printing
//! ([`Client::print_json`], the documents built by [`crate::cli::json`]).
//!
//! Must never call a manager or decide what to ask: commands hand it what they received.

use std::collections::HashMap;

use clap::ValueEnum;

use super::client::Client;
use crate::cli::json;
use crate::proto::json::label;
use crate::proto::objects::{
    HealthStatus, ManagerStatus, Node, NodeAvailability, NodeRole, NodeState, RaftReachability,
    Service, ServiceMode, ServiceSpec, Task, TaskState, UpdateState,
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
        out!("{}", json::pretty(value));
    }
}

pub(super) fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// What the task tables show instead of ids: node hostnames and service names, as
/// `docker service ps` does. An id the maps lack (a node or service removed since) is shown
/// shortened.
pub(super) struct Names {
    hostnames: HashMap<String, String>,
    services: HashMap<String, String>,
}

impl Names {
    /// The names of `nodes` and `services`.
    pub(super) fn new(nodes: &[Node], services: &[Service]) -> Self {
        let hostname = |node: &Node| node.spec.as_ref().map(|s| s.hostname.clone());
        let name = |service: &Service| service.spec.as_ref().map(|s| s.name.clone());
        Self {
            hostnames: nodes
                .iter()
                .filter_map(|node| Some((node.id.clone(), hostname(node)?)))
                .filter(|(_, hostname)| !hostname.is_empty())
                .collect(),
            services: services
                .iter()
                .filter_map(|service| Some((service.id.clone(), name(service)?)))
                .collect(),
        }
    }

    fn node<'a>(&'a self, node_id: &'a str) -> &'a str {
        match self.hostnames.get(node_id) {
            Some(hostname) => hostname,
            None if node_id.is_empty() => "-",
            None => short(node_id),
        }
    }

    /// `<service>.<slot>` for a replicated task, `<service>.<node id>` for a global one
    /// (slot 0), as docker names them.
    fn service<'a>(&'a self, service_id: &'a str) -> &'a str {
        self.services
            .get(service_id)
            .map_or_else(|| short(service_id), String::as_str)
    }

    fn task(&self, task: &Task) -> String {
        let service = self.service(&task.service_id);
        if task.slot == 0 {
            format!("{service}.{}", short(&task.node_id))
        } else {
            format!("{service}.{}", task.slot)
        }
    }
}

/// `3/5`: tasks running out of those wanted running (docker's REPLICAS). A global service
/// wants one per eligible node, which is the number of its tasks desired running.
fn replicas_text(spec: &ServiceSpec, tasks: &[&Task]) -> String {
    let wanted = tasks
        .iter()
        .filter(|t| t.desired_state == TaskState::Running as i32)
        .count();
    let running = tasks
        .iter()
        .filter(|t| t.desired_state == TaskState::Running as i32)
        .filter(|t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.state == TaskState::Running as i32)
        })
        .count();
    if spec.mode == ServiceMode::Global as i32 {
        format!("{running}/{wanted}")
    } else {
        format!("{running}/{}", spec.replicas)
    }
}

/// The update state while one is in progress or paused (`updating`, `paused`,
/// `rollback-started`, `rollback-paused`), else `-`: `service inspect` has the message.
fn update_text(service: &Service) -> String {
    let state = service.update_status.as_ref().map_or(0, |s| s.state);
    let shown = [
        UpdateState::Updating,
        UpdateState::Paused,
        UpdateState::RollbackStarted,
        UpdateState::RollbackPaused,
    ];
    if shown.iter().any(|s| *s as i32 == state) {
        label::<UpdateState>(state)
    } else {
        "-".to_string()
    }
}

pub(super) fn print_services(client: &Client, services: &[Service], tasks: &[Task]) {
    if client.format == Format::Json {
        client.print_json(&services.iter().map(json::service).collect::<Vec<_>>());
        return;
    }
    let mut by_service: HashMap<&str, Vec<&Task>> = HashMap::new();
    for task in tasks {
        by_service.entry(&task.service_id).or_default().push(task);
    }
    out!(
        "{:<12}  {:<24}  {:<10}  {:>9}  {:>8}  {:<16}  COMMAND",
        "ID",
        "NAME",
        "MODE",
        "REPLICAS",
        "VERSION",
        "UPDATE"
    );
    for service in services {
        let spec = service.spec.clone().unwrap_or_default();
        let task = spec.task.clone().unwrap_or_default();
        let tasks = by_service
            .get(service.id.as_str())
            .map_or(&[][..], Vec::as_slice);
        out!(
            "{:<12}  {:<24}  {:<10}  {:>9}  {:>8}  {:<16}  {} {}",
            short(&service.id),
            spec.name,
            label::<ServiceMode>(spec.mode),
            replicas_text(&spec, tasks),
            service.meta.as_ref().map_or(0, |m| m.version),
            update_text(service),
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
/// failed, or why it is still pending (no node fits, none ready, …), or a resource limit
/// its node does not enforce; empty otherwise.
fn task_problem(task: &Task) -> &str {
    let Some(status) = task.status.as_ref() else {
        return "";
    };
    if !status.err.is_empty() {
        &status.err
    } else if status.state == TaskState::Pending as i32 {
        &status.message
    } else {
        &status.limits_note
    }
}

/// A duration as docker prints ages: `less than a second`, `5 seconds`, `1 minute`,
/// `3 hours`, `2 days`.
pub(super) fn human_duration(ms: i64) -> String {
    let plural = |n: i64, unit: &str| {
        if n == 1 {
            format!("1 {unit}")
        } else {
            format!("{n} {unit}s")
        }
    };
    let seconds = ms.max(0) / 1000;
    match seconds {
        0 => "less than a second".to_string(),
        1..60 => plural(seconds, "second"),
        60..3_600 => plural(seconds / 60, "minute"),
        3_600..172_800 => plural(seconds / 3_600, "hour"),
        _ => plural(seconds / 86_400, "day"),
    }
}

/// `Running 5 minutes ago`: the task's observed state and how long ago it was reported;
/// a running task with a health check adds its health (`Running 5 minutes ago (healthy)`).
fn current_state_text(task: &Task, now_ms: i64) -> String {
    let status = task.status.clone().unwrap_or_default();
    let mut state = label::<TaskState>(status.state);
    if let Some(first) = state.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    let health = match crate::health::task_health(task) {
        Some(health) if status.state == TaskState::Running as i32 => {
            format!(" ({})", label::<HealthStatus>(health as i32))
        }
        _ => String::new(),
    };
    if status.timestamp_ms <= 0 {
        return format!("{state}{health}");
    }
    format!(
        "{state} {} ago{health}",
        human_duration(now_ms - status.timestamp_ms)
    )
}

/// The tasks in docker's order: by name (service, then slot or node), the newest of each
/// slot first and its predecessors under it, marked `\_`.
fn in_slot_order<'a>(tasks: &'a [Task], names: &Names) -> Vec<(bool, String, &'a Task)> {
    // Slots sort as numbers (`web.2` before `web.10`); a global task's slot is its node.
    let key = |t: &'a Task| {
        let node = if t.slot == 0 { t.node_id.as_str() } else { "" };
        let created_ms = t.meta.as_ref().map_or(0, |m| m.created_at_ms);
        let service = names.service(&t.service_id).to_string();
        (
            service,
            t.slot,
            node,
            std::cmp::Reverse(created_ms),
            t.id.as_str(),
        )
    };
    let mut sorted: Vec<&Task> = tasks.iter().collect();
    sorted.sort_by_cached_key(|t| key(t));
    let mut previous: Option<String> = None;
    sorted
        .into_iter()
        .map(|task| {
            let name = names.task(task);
            let history = previous.as_deref() == Some(name.as_str());
            previous = Some(name.clone());
            (history, name, task)
        })
        .collect()
}

pub(super) fn print_tasks(client: &Client, tasks: &[Task], names: &Names) {
    if client.format == Format::Json {
        client.print_json(&tasks.iter().map(json::task).collect::<Vec<_>>());
        return;
    }
    let now_ms = crate::util::clock::unix_now_ms();
    out!(
        "{:<12}  {:<28}  {:<20}  {:<13}  {:<30}  ERROR",
        "ID",
        "NAME",
        "NODE",
        "DESIRED STATE",
        "CURRENT STATE"
    );
    for (history, name, task) in in_slot_order(tasks, names) {
        let name = if history {
            format!(" \\_ {name}")
        } else {
            name
        };
        let mut desired = label::<TaskState>(task.desired_state);
        if let Some(first) = desired.get_mut(..1) {
            first.make_ascii_uppercase();
        }
        out!(
            "{:<12}  {:<28}  {:<20}  {:<13}  {:<30}  {}",
            short(&task.id),
            name,
            names.node(&task.node_id),
            desired,
            current_state_text(task, now_ms),
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

pub(super) fn print_nodes(client: &Client, nodes: &[Node]) {
    if client.format == Format::Json {
        client.print_json(&nodes.iter().map(json::node).collect::<Vec<_>>());
        return;
    }
    out!(
        "{:<27}  {:<20}  {:<8}  {:<12}  {:<8}  MANAGER STATUS",
        "ID",
        "HOSTNAME",
        "STATUS",
        "AVAILABILITY",
        "ROLE"
    );
    for node in nodes {
        let spec = node.spec.clone().unwrap_or_default();
        let manager = node
            .manager_status
            .as_ref()
            .map_or_else(String::new, manager_status_label);
        // The node this command speaks for is marked, as `docker node ls` marks its own.
        let is_self = client.self_node_id.as_deref() == Some(node.id.as_str());
        out!(
            "{:<27}  {:<20}  {:<8}  {:<12}  {:<8}  {manager}",
            if is_self {
                format!("{} *", node.id)
            } else {
                node.id.clone()
            },
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
    /// The node id, as every other command names the node (empty: no Node object records
    /// this Raft member, e.g. one being removed).
    node_id: &'a str,
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

fn managers_json<'a>(status: &'a StatusResponse, nodes: &'a RaftNodes) -> GroupShown<'a> {
    GroupShown {
        leader: format!("{:x}", status.leader),
        term: status.term,
        commit: status.commit,
        members: status
            .members
            .iter()
            .map(|m| MemberShown {
                node_id: nodes.node_of(m.raft_id).unwrap_or_default(),
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

/// Which node each Raft member is (from the Node objects' manager status): `manager ls`
/// names managers by node id, like every other command, with the Raft id beside.
pub(super) struct RaftNodes(HashMap<u64, String>);

impl RaftNodes {
    /// The Raft ids `nodes` record.
    pub(super) fn new(nodes: &[Node]) -> Self {
        Self(
            nodes
                .iter()
                .filter_map(|n| Some((n.manager_status.as_ref()?.raft_id, n.id.clone())))
                .filter(|(raft_id, _)| *raft_id != 0)
                .collect(),
        )
    }

    /// The node id of Raft member `raft_id`, if a Node object records it.
    pub(super) fn node_of(&self, raft_id: u64) -> Option<&str> {
        self.0.get(&raft_id).map(String::as_str)
    }
}

pub(super) fn print_managers(client: &Client, status: &StatusResponse, nodes: &RaftNodes) {
    if client.format == Format::Json {
        client.print_json(&managers_json(status, nodes));
        return;
    }
    out!(
        "{:<27} {:<16} {:<22} {:<9} {:<10} {:>13} {:>12}  PROBLEM",
        "NODE",
        "RAFT ID",
        "ADDRESS",
        "ROLE",
        "REACHABLE",
        "LAST CONTACT",
        "MATCH INDEX"
    );
    for m in &status.members {
        let contact = match m.last_contact_ms {
            0 => "-".to_string(),
            u64::MAX => "never".to_string(),
            ms => format!("{ms} ms ago"),
        };
        // A member no Node object records yet (it has not reported itself) is named by its
        // Raft id, which `manager rm|transfer` take as well.
        let raft_id = format!("{:x}", m.raft_id);
        let node = nodes.node_of(m.raft_id).unwrap_or(&raft_id);
        let is_self = client.self_node_id.as_deref() == Some(node);
        out!(
            "{:<27} {:<16} {:<22} {:<9} {:<10} {:>13} {:>12}  {}",
            if is_self {
                format!("{node} *")
            } else {
                node.to_string()
            },
            raft_id,
            if m.addr.is_empty() { "?" } else { &m.addr },
            m.role,
            if m.reachable { "yes" } else { "no" },
            contact,
            m.match_index,
            m.problem
        );
    }
    let leader = nodes.node_of(status.leader).map_or_else(
        || format!("{:x}", status.leader),
        |node| format!("{node} (raft id {:x})", status.leader),
    );
    out!(
        "leader {leader}, term {}, commit index {}",
        status.term,
        status.commit
    );
}
