//! `flotilla watch`: streams store events (`control.Watch`) until interrupted.
//!
//! Exactly once across failures: the watch asks for a COMMIT marker after each
//! transaction's events, holds a transaction's events until its marker arrives, then prints
//! them and records the version as the last one seen. When the stream breaks (the manager
//! died or stopped, the watch was too slow), it subscribes again (the same manager first,
//! then the other managers it learnt at start) with `resume` from that version: the events
//! after it come again, those up to it do not. A half-received transaction is dropped and
//! received whole again.
//!
//! Must never print an event of a transaction whose marker it has not seen.

use clap::{Args, ValueEnum};

use super::client::{Client, RETRY_SOON_WAIT};
use super::output::Format;
use crate::cli::json;
use crate::control::{LIST_MANAGERS, WATCH};
use crate::net::{CallOptions, ResponseStream};
use crate::proto::control as pb;
use crate::proto::json::label;
use crate::proto::objects::{ObjectKind, StoreObject, store_object::Object};
use crate::wire::{Code, Status};

/// Failed subscription attempts in a row (across every known manager) before the watch
/// gives up; each waits [`RETRY_SOON_WAIT`] first: about a minute without any manager.
pub const WATCH_RESUBSCRIBE_ATTEMPTS_MAX: u32 = 240;
/// Events of one transaction held until its COMMIT marker (a transaction has at most
/// `store::TXN_CHANGES_MAX` changes; a stream that sends more is broken).
pub const WATCH_TXN_EVENTS_MAX: usize = crate::store::TXN_CHANGES_MAX;

/// Object kinds a watch can select.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WatchKind {
    /// Services.
    Service,
    /// Nodes.
    Node,
    /// Tasks.
    Task,
    /// The cluster object.
    Cluster,
    /// Networks.
    Network,
    /// Secrets (never their values).
    Secret,
    /// Configs.
    Config,
}

/// What `flotilla watch` selects.
#[derive(Args, Debug, Clone, Default)]
pub struct WatchArgs {
    /// Only objects of this kind.
    #[arg(long, value_enum)]
    pub kind: Option<WatchKind>,
    /// Only the object with this id.
    #[arg(long)]
    pub id: Option<String>,
    /// Only objects of this service (its tasks, and the service itself).
    #[arg(long)]
    pub service: Option<String>,
    /// Only objects on this node (its tasks, and the node itself).
    #[arg(long)]
    pub node: Option<String>,
}

fn kind_to_proto(kind: WatchKind) -> ObjectKind {
    match kind {
        WatchKind::Service => ObjectKind::Service,
        WatchKind::Node => ObjectKind::Node,
        WatchKind::Task => ObjectKind::Task,
        WatchKind::Cluster => ObjectKind::Cluster,
        WatchKind::Network => ObjectKind::Network,
        WatchKind::Secret => ObjectKind::Secret,
        WatchKind::Config => ObjectKind::Config,
    }
}

fn filters(args: &WatchArgs) -> Vec<pb::WatchFilter> {
    let filter = pb::WatchFilter {
        kind: args.kind.map_or(0, |k| kind_to_proto(k) as i32),
        id: args.id.clone().unwrap_or_default(),
        node_id: args.node.clone().unwrap_or_default(),
        service_id: args.service.clone().unwrap_or_default(),
    };
    if filter == pb::WatchFilter::default() {
        Vec::new()
    } else {
        vec![filter]
    }
}

/// `--service` and `--node` may name an object (a name, hostname or id prefix): the watch
/// filters by id, so resolve them while they exist (else they are taken as ids).
fn resolve_names(client: &Client, args: &WatchArgs) -> WatchArgs {
    let mut resolved = args.clone();
    if let Some(service) = &args.service {
        let reply: Result<pb::ServiceResponse, String> = client.unary(
            crate::control::GET_SERVICE,
            &pb::GetServiceRequest {
                reference: service.clone(),
            },
        );
        if let Ok(Some(found)) = reply.map(|r| r.service) {
            resolved.service = Some(found.id);
        }
    }
    if let Some(node) = &args.node {
        let reply: Result<pb::NodeResponse, String> = client.unary(
            crate::control::GET_NODE,
            &pb::GetNodeRequest {
                reference: node.clone(),
            },
        );
        if let Ok(Some(found)) = reply.map(|r| r.node) {
            resolved.node = Some(found.id);
        }
    }
    resolved
}

/// Refusals that another attempt cannot fix.
fn is_final(status: &Status) -> bool {
    matches!(
        status.code,
        Code::InvalidArgument
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::NotFound
    )
}

/// Where to subscribe again: the manager first called, then every manager of the group
/// (best effort: without a leader now, only the first).
fn candidates(client: &Client) -> Vec<String> {
    let mut addrs = vec![client.addr.clone()];
    let managers: Result<pb::ManagersResponse, String> =
        client.unary(LIST_MANAGERS, &pb::ListManagersRequest {});
    match managers {
        Ok(reply) => {
            for member in reply.status.unwrap_or_default().members {
                if !member.addr.is_empty() && !addrs.contains(&member.addr) {
                    addrs.push(member.addr);
                }
            }
        }
        Err(error) => log::warn!("watch: cannot list the managers to fail over to: {error}"),
    }
    addrs
}

/// One subscription: the stream after its START message, and that message's version.
fn subscribe(
    client: &Client,
    addr: &str,
    filters: &[pb::WatchFilter],
    since_version: Option<u64>,
) -> Result<(ResponseStream<pb::WatchMessage>, u64), Status> {
    let request = pb::WatchRequest {
        filters: filters.to_vec(),
        resume: since_version.is_some(),
        since_version: since_version.unwrap_or(0),
        include_commits: true,
    };
    // No deadline: a watch lives until interrupted.
    let mut stream = client
        .transport
        .channel(addr, &client.tls)
        .server_stream::<_, pb::WatchMessage>(WATCH, &request, CallOptions::default())?;
    match stream.recv()? {
        Some(start) if start.action == pb::WatchAction::Start as i32 => Ok((stream, start.version)),
        _ => Err(Status::internal(
            "the watch did not begin with a START message",
        )),
    }
}

/// A stored object as printed in a JSON event line (`null` for a kind this build does not
/// know).
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Shown {
    Service(Box<crate::proto::objects::Service>),
    Node(crate::proto::objects::Node),
    Task(Box<crate::proto::objects::Task>),
    Cluster(crate::proto::objects::Cluster),
    Network(crate::proto::objects::Network),
    Secret(crate::proto::objects::Secret),
    Config(crate::proto::objects::Config),
    Unknown,
}

/// One event as a JSON line.
#[derive(serde::Serialize)]
struct EventLine<'a> {
    version: u64,
    action: &'a str,
    kind: &'a str,
    id: String,
    name: String,
    object: Shown,
}

/// Kind, id, a human name, and the JSON form of a stored object.
fn describe_object(object: Option<&StoreObject>) -> (&'static str, String, String, Shown) {
    match object.and_then(|o| o.object.as_ref()) {
        Some(Object::Service(s)) => {
            let name = s.spec.as_ref().map(|spec| spec.name.clone());
            (
                "service",
                s.id.clone(),
                name.unwrap_or_default(),
                Shown::Service(Box::new(json::service(s))),
            )
        }
        Some(Object::Node(n)) => {
            let name = n.spec.as_ref().map(|spec| spec.hostname.clone());
            (
                "node",
                n.id.clone(),
                name.unwrap_or_default(),
                Shown::Node(json::node(n)),
            )
        }
        Some(Object::Task(t)) => {
            let name = format!("{}.{}", t.service_id, t.slot);
            (
                "task",
                t.id.clone(),
                name,
                Shown::Task(Box::new(json::task(t))),
            )
        }
        Some(Object::Cluster(c)) => {
            let name = c.spec.as_ref().map(|spec| spec.name.clone());
            (
                "cluster",
                c.id.clone(),
                name.unwrap_or_default(),
                Shown::Cluster(json::cluster(c)),
            )
        }
        Some(Object::Network(n)) => {
            let name = n.spec.as_ref().map(|spec| spec.name.clone());
            (
                "network",
                n.id.clone(),
                name.unwrap_or_default(),
                Shown::Network(json::network(n)),
            )
        }
        Some(Object::Secret(s)) => {
            let name = s.spec.as_ref().map(|spec| spec.name.clone());
            (
                "secret",
                s.id.clone(),
                name.unwrap_or_default(),
                Shown::Secret(json::secret(s)),
            )
        }
        Some(Object::Config(c)) => {
            let name = c.spec.as_ref().map(|spec| spec.name.clone());
            (
                "config",
                c.id.clone(),
                name.unwrap_or_default(),
                Shown::Config(json::config(c)),
            )
        }
        None => ("unknown", String::new(), String::new(), Shown::Unknown),
    }
}

fn print_event(format: Format, message: &pb::WatchMessage) {
    let (kind, id, name, object) = describe_object(message.object.as_ref());
    let action = label::<pb::WatchAction>(message.action);
    match format {
        Format::Json => {
            let line = EventLine {
                version: message.version,
                action: &action,
                kind,
                id,
                name,
                object,
            };
            out!("{}", json::line(&line));
        }
        Format::Table => out!(
            "{:>10}  {action:<7} {kind:<8} {id:<25}  {name}",
            message.version
        ),
    }
}

/// How one subscription ended.
enum Ended {
    /// It failed in a way another subscription may not: resubscribe.
    Broken(Status),
    /// A refusal no retry fixes.
    Final(Status),
}

/// Relays one subscription's events, whole transactions at a time, advancing `last`.
fn relay(stream: &mut ResponseStream<pb::WatchMessage>, format: Format, last: &mut u64) -> Ended {
    let mut pending: Vec<pb::WatchMessage> = Vec::new();
    loop {
        let message = match stream.recv() {
            Ok(Some(message)) => message,
            Ok(None) => return Ended::Broken(Status::unavailable("the manager ended the watch")),
            Err(status) if is_final(&status) => return Ended::Final(status),
            Err(status) => return Ended::Broken(status),
        };
        if message.version <= *last {
            // A resumed watch never repeats what it was asked to skip; refuse to print twice.
            return Ended::Final(Status::internal(format!(
                "the manager sent version {} again after {}",
                message.version, *last
            )));
        }
        if message.action == pb::WatchAction::Commit as i32 {
            for event in pending.drain(..) {
                print_event(format, &event);
            }
            *last = message.version;
            continue;
        }
        if pending.len() >= WATCH_TXN_EVENTS_MAX
            || pending
                .first()
                .is_some_and(|p| p.version != message.version)
        {
            return Ended::Broken(Status::internal(
                "a transaction's events came without their COMMIT marker",
            ));
        }
        pending.push(message);
    }
}

/// Runs `flotilla watch` until interrupted or a final refusal.
///
/// # Errors
/// A message for stderr: a refused watch, or no manager reachable for
/// [`WATCH_RESUBSCRIBE_ATTEMPTS_MAX`] attempts.
pub(crate) fn run(client: &Client, args: &WatchArgs) -> Result<(), String> {
    let filters = filters(&resolve_names(client, args));
    let addrs = candidates(client);
    if client.format == Format::Table {
        out!(
            "{:>10}  {:<7} {:<8} {:<25}  NAME",
            "VERSION",
            "ACTION",
            "KIND",
            "ID"
        );
    }
    let mut last: Option<u64> = None;
    let mut current = 0;
    let mut failures = 0;
    loop {
        let addr = &addrs[current % addrs.len()];
        let ended = match subscribe(client, addr, &filters, last) {
            Ok((mut stream, start)) => {
                failures = 0;
                if last.is_none() {
                    // On stderr: stdout carries only events (one JSON document a line).
                    eprintln!("watch: from version {start} on {addr}");
                }
                let mut seen = last.unwrap_or(start);
                let ended = relay(&mut stream, client.format, &mut seen);
                last = Some(seen);
                ended
            }
            Err(status) if is_final(&status) => Ended::Final(status),
            Err(status) => Ended::Broken(status),
        };
        let status = match ended {
            Ended::Final(status) => return Err(Client::describe(addr, &status)),
            Ended::Broken(status) => status,
        };
        failures += 1;
        if failures > WATCH_RESUBSCRIBE_ATTEMPTS_MAX {
            return Err(Client::describe(addr, &status));
        }
        // The same manager again after a drop it survived (too slow, a blip); the next
        // one when it is gone or cannot resume from our version.
        if failures > 1 || matches!(status.code, Code::Unavailable | Code::OutOfRange) {
            current += 1;
        }
        let next = &addrs[current % addrs.len()];
        match last {
            Some(version) => {
                eprintln!("watch: {addr}: {status}; resuming after version {version} on {next}");
            }
            None => eprintln!("watch: {addr}: {status}; trying {next}"),
        }
        std::thread::sleep(RETRY_SOON_WAIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flag_selects_everything_and_flags_make_one_filter() {
        assert!(filters(&WatchArgs::default()).is_empty());
        let selected = filters(&WatchArgs {
            kind: Some(WatchKind::Task),
            service: Some("web".into()),
            ..Default::default()
        });
        assert_eq!(selected.len(), 1);
        assert_eq!(selected[0].kind, ObjectKind::Task as i32);
        assert_eq!(selected[0].service_id, "web");
        assert!(selected[0].id.is_empty() && selected[0].node_id.is_empty());
    }
}
