//! The read side of the control API: linearizable on any manager (wait for the read
//! index, then read the local store), listings streamed in chunks.
//!
//! Must never propose anything.

use std::sync::Arc;

use prost::Message;

use super::managers::{GroupView, group_view};
use super::{ControlApi, LIST_CHUNK_BYTES_MAX};
use crate::net::{Router, ServerStream, ServicePool};
use crate::proto::control as pb;
use crate::proto::control::rpc;
use crate::proto::objects::{
    Cluster, Config, Network, Node, RaftReachability, Secret, Service, Task,
};
use crate::store::{ReadView, Record};
use crate::wire::{Code, Status};

fn not_found(kind: &str, reference: &str, listing: &str) -> Status {
    Status::not_found(format!(
        "no {kind} {reference:?}; `flotilla {listing} ls` lists them (use an id, a unique id \
         prefix or a name)"
    ))
}

/// The one `T` that `reference` names: an exact id, then `by_name` (if any), then a
/// unique id prefix.
fn resolve<T: Record>(
    view: &ReadView<'_>,
    reference: &str,
    by_name: impl FnOnce(&ReadView<'_>) -> Option<Arc<T>>,
    kind: &str,
    listing: &str,
) -> Result<Arc<T>, Status> {
    if reference.is_empty() {
        return Err(Status::invalid_argument(format!(
            "reference: required: the {kind}'s id or name"
        )));
    }
    if let Some(found) = view.get::<T>(reference) {
        return Ok(found.clone());
    }
    if let Some(found) = by_name(view) {
        return Ok(found);
    }
    let mut matches = view.find_by_id_prefix::<T>(reference).take(2);
    match (matches.next(), matches.next()) {
        (Some(found), None) => Ok(found.clone()),
        (Some(_), Some(_)) => Err(Status::invalid_argument(format!(
            "{kind} id prefix {reference:?} is ambiguous; type more of the id"
        ))),
        _ => Err(not_found(kind, reference, listing)),
    }
}

/// The service with id, name or unique id prefix `reference`.
///
/// # Errors
/// `NotFound` (with a hint) or `InvalidArgument` for an ambiguous prefix.
pub(super) fn resolve_service(
    view: &ReadView<'_>,
    reference: &str,
) -> Result<Arc<Service>, Status> {
    resolve(
        view,
        reference,
        |v| v.get_by_name::<Service>(reference).cloned(),
        "service",
        "service",
    )
}

/// The node with id, hostname or unique id prefix `reference`.
///
/// # Errors
/// As [`resolve_service`]; a hostname shared by several nodes is ambiguous.
pub(super) fn resolve_node(view: &ReadView<'_>, reference: &str) -> Result<Arc<Node>, Status> {
    let mut by_hostname: Vec<Arc<Node>> = view.nodes_by_hostname(reference).cloned().collect();
    if by_hostname.len() > 1 && view.get::<Node>(reference).is_none() {
        return Err(Status::invalid_argument(format!(
            "several nodes have hostname {reference:?}; use the node id"
        )));
    }
    resolve(view, reference, |_| by_hostname.pop(), "node", "node")
}

/// The network with id, name or unique id prefix `reference`.
///
/// # Errors
/// As [`resolve_service`].
pub(super) fn resolve_network(
    view: &ReadView<'_>,
    reference: &str,
) -> Result<Arc<Network>, Status> {
    resolve(
        view,
        reference,
        |v| v.get_by_name::<Network>(reference).cloned(),
        "network",
        "network",
    )
}

/// The secret with id, name or unique id prefix `reference`.
///
/// # Errors
/// As [`resolve_service`].
pub(super) fn resolve_secret(view: &ReadView<'_>, reference: &str) -> Result<Arc<Secret>, Status> {
    resolve(
        view,
        reference,
        |v| v.get_by_name::<Secret>(reference).cloned(),
        "secret",
        "secret",
    )
}

/// The config with id, name or unique id prefix `reference`.
///
/// # Errors
/// As [`resolve_service`].
pub(super) fn resolve_config(view: &ReadView<'_>, reference: &str) -> Result<Arc<Config>, Status> {
    resolve(
        view,
        reference,
        |v| v.get_by_name::<Config>(reference).cloned(),
        "config",
        "config",
    )
}

/// The task with id or unique id prefix `reference`.
///
/// # Errors
/// As [`resolve_service`].
pub(super) fn resolve_task(view: &ReadView<'_>, reference: &str) -> Result<Arc<Task>, Status> {
    resolve(view, reference, |_| None, "task", "task")
}

/// The cluster object.
///
/// # Errors
/// `Unavailable` if the leader has not created it yet.
pub(super) fn the_cluster(view: &ReadView<'_>) -> Result<Arc<Cluster>, Status> {
    view.list::<Cluster>().next().cloned().ok_or_else(|| {
        Status::retry_soon(
            Code::Unavailable,
            "the cluster object does not exist yet (the leader creates it on election); retry \
             in a moment",
        )
    })
}

/// Sends `objects` in chunks of at most [`LIST_CHUNK_BYTES_MAX`] encoded bytes (at least one
/// object per chunk). An empty listing sends no chunk.
fn stream_chunks<T: Message + Clone, C: Message>(
    objects: &[Arc<T>],
    stream: &ServerStream<C>,
    chunk: impl Fn(Vec<T>) -> C,
) -> Result<(), Status> {
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for object in objects {
        let len = object.encoded_len();
        if !batch.is_empty() && batch_bytes + len > LIST_CHUNK_BYTES_MAX {
            stream.send(&chunk(std::mem::take(&mut batch)))?;
            batch_bytes = 0;
        }
        batch_bytes += len;
        batch.push(object.as_ref().clone());
    }
    if !batch.is_empty() {
        stream.send(&chunk(batch))?;
    }
    Ok(())
}

/// Fills in a manager node's leader flag and reachability, known only at read time, from
/// the leader's view of the group (`view`, the same as `manager ls` shows); without it
/// (no leader answers), the leader this manager knows and an unknown reachability.
fn with_manager_view(api: &ControlApi, view: Option<&GroupView>, node: &Node) -> Node {
    let mut node = node.clone();
    let Some(status) = node.manager_status.as_mut() else {
        return node;
    };
    match view {
        Some(view) => {
            status.leader = view.leader == status.raft_id;
            status.reachability = match view.reachable.get(&status.raft_id) {
                Some(true) => RaftReachability::Reachable,
                Some(false) => RaftReachability::Unreachable,
                // Not a member (removed): neither.
                None => RaftReachability::Unknown,
            } as i32;
        }
        None => {
            status.leader = api.node.leader() == Some(status.raft_id);
            status.reachability = RaftReachability::Unknown as i32;
        }
    }
    node
}

/// The endpoints of `network` as this manager's node sees them (its own tables: the gossip
/// view, not the replicated state), sorted by service and task.
fn local_endpoints(api: &ControlApi, network: Network) -> pb::ListEndpointsResponse {
    let tables = &api.tables;
    let attached = tables.networks().contains(&network.id);
    let mut endpoints: Vec<crate::proto::objects::Endpoint> = tables
        .entries(&network.id, crate::netdb::ENDPOINTS_TABLE)
        .into_iter()
        .filter_map(|(key, value)| match crate::netdb::decode_endpoint(&value) {
            Ok(endpoint) => Some(endpoint),
            Err(error) => {
                log::debug!("endpoint {key} of network {}: {error}", network.id);
                None
            }
        })
        .collect();
    endpoints.sort_by(|a, b| (&a.service_name, &a.task_id).cmp(&(&b.service_name, &b.task_id)));
    pb::ListEndpointsResponse {
        network: Some(network),
        attached,
        endpoints,
    }
}

/// Serves the read methods.
pub(super) fn register(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    let a = api.clone();
    router.serve_unary(
        rpc::GET_SERVICE,
        pool,
        move |_, request: pb::GetServiceRequest| {
            a.read_barrier()?;
            let service = a
                .store
                .view(|view| resolve_service(view, &request.reference))?;
            Ok(pb::ServiceResponse {
                service: Some(service.as_ref().clone()),
            })
        },
    );
    let a = api.clone();
    router.serve_server_stream(
        rpc::LIST_SERVICES,
        pool,
        move |_, _: pb::ListServicesRequest, stream| {
            a.read_barrier()?;
            let services = a.store.list::<Service>();
            stream_chunks(&services, &stream, |services| pb::ServiceChunk { services })
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::GET_NODE,
        pool,
        move |ctx, request: pb::GetNodeRequest| {
            // A demoted manager's certificate reaches this method only to read its own
            // Node object (see `access`).
            if let Some(peer) = ctx.peer()
                && peer.node_id != request.reference
            {
                a.access.check(&rpc::LIST_NODES.method(), peer)?;
            }
            a.read_barrier()?;
            let node = a
                .store
                .view(|view| resolve_node(view, &request.reference))?;
            // Only a manager's record needs the leader's view.
            let view = node.manager_status.as_ref().and_then(|_| group_view(&a));
            Ok(pb::NodeResponse {
                node: Some(with_manager_view(&a, view.as_ref(), &node)),
            })
        },
    );
    let a = api.clone();
    router.serve_server_stream(
        rpc::LIST_NODES,
        pool,
        move |_, _: pb::ListNodesRequest, stream| {
            a.read_barrier()?;
            let nodes = a.store.list::<Node>();
            let view = nodes
                .iter()
                .any(|node| node.manager_status.is_some())
                .then(|| group_view(&a))
                .flatten();
            let nodes: Vec<Arc<Node>> = nodes
                .iter()
                .map(|node| Arc::new(with_manager_view(&a, view.as_ref(), node)))
                .collect();
            stream_chunks(&nodes, &stream, |nodes| pb::NodeChunk { nodes })
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::GET_TASK,
        pool,
        move |_, request: pb::GetTaskRequest| {
            a.read_barrier()?;
            let task = a
                .store
                .view(|view| resolve_task(view, &request.reference))?;
            Ok(pb::TaskResponse {
                task: Some(task.as_ref().clone()),
            })
        },
    );
    let a = api.clone();
    router.serve_server_stream(
        rpc::LIST_TASKS,
        pool,
        move |_, request: pb::ListTasksRequest, stream| {
            a.read_barrier()?;
            let tasks: Vec<Arc<Task>> = a.store.view(|view| {
                if !request.service_id.is_empty() {
                    let service = resolve_service(view, &request.service_id)?;
                    // The node may be named as in `--node` alone (hostname, id prefix).
                    let node_id = match request.node_id.as_str() {
                        "" => None,
                        reference => Some(resolve_node(view, reference)?.id.clone()),
                    };
                    Ok(view
                        .tasks_by_service(&service.id)
                        .filter(|t| node_id.as_ref().is_none_or(|id| &t.node_id == id))
                        .cloned()
                        .collect())
                } else if !request.node_id.is_empty() {
                    let node = resolve_node(view, &request.node_id)?;
                    Ok(view.tasks_by_node(&node.id).cloned().collect())
                } else {
                    Ok::<_, Status>(view.list::<Task>().cloned().collect())
                }
            })?;
            stream_chunks(&tasks, &stream, |tasks| pb::TaskChunk { tasks })
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::GET_CLUSTER,
        pool,
        move |_, _: pb::GetClusterRequest| {
            a.read_barrier()?;
            let mut cluster = a.store.view(the_cluster)?.as_ref().clone();
            super::redact_cluster(&mut cluster);
            Ok(pb::ClusterResponse {
                cluster: Some(cluster),
            })
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::GET_NETWORK,
        pool,
        move |_, request: pb::GetNetworkRequest| {
            a.read_barrier()?;
            let network = a
                .store
                .view(|view| resolve_network(view, &request.reference))?;
            Ok(pb::NetworkResponse {
                network: Some(network.as_ref().clone()),
            })
        },
    );
    let a = api.clone();
    router.serve_server_stream(
        rpc::LIST_NETWORKS,
        pool,
        move |_, _: pb::ListNetworksRequest, stream| {
            a.read_barrier()?;
            let networks = a.store.list::<Network>();
            stream_chunks(&networks, &stream, |networks| pb::NetworkChunk { networks })
        },
    );
    register_secret_reads(router, pool, api);
    let a = api.clone();
    router.serve_unary(
        rpc::LIST_ENDPOINTS,
        pool,
        move |_, request: pb::ListEndpointsRequest| {
            a.read_barrier()?;
            let network = a
                .store
                .view(|view| resolve_network(view, &request.reference))?;
            Ok(local_endpoints(&a, network.as_ref().clone()))
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::GET_JOIN_TOKENS,
        pool,
        move |_, _: pb::GetJoinTokensRequest| {
            a.read_barrier()?;
            let cluster = a.store.view(the_cluster)?;
            let tokens = super::handlers::cluster_tokens(&cluster)?;
            Ok(pb::JoinTokensResponse {
                tokens: Some(super::handlers::tokens_to_proto(&tokens)),
            })
        },
    );
}

/// `control.GetSecret`, `ListSecrets` (never with a value), `GetConfig`, `ListConfigs`.
fn register_secret_reads(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    let a = api.clone();
    router.serve_unary(
        rpc::GET_SECRET,
        pool,
        move |_, request: pb::GetSecretRequest| {
            a.read_barrier()?;
            let mut secret = a
                .store
                .view(|view| resolve_secret(view, &request.reference))?
                .as_ref()
                .clone();
            super::redact_secret(&mut secret);
            Ok(pb::SecretResponse {
                secret: Some(secret),
            })
        },
    );
    let a = api.clone();
    router.serve_server_stream(
        rpc::LIST_SECRETS,
        pool,
        move |_, _: pb::ListSecretsRequest, stream| {
            a.read_barrier()?;
            let secrets: Vec<Arc<Secret>> = a
                .store
                .list::<Secret>()
                .iter()
                .map(|s| {
                    let mut shown = s.as_ref().clone();
                    super::redact_secret(&mut shown);
                    Arc::new(shown)
                })
                .collect();
            stream_chunks(&secrets, &stream, |secrets| pb::SecretChunk { secrets })
        },
    );
    let a = api.clone();
    router.serve_unary(
        rpc::GET_CONFIG,
        pool,
        move |_, request: pb::GetConfigRequest| {
            a.read_barrier()?;
            let config = a
                .store
                .view(|view| resolve_config(view, &request.reference))?;
            Ok(pb::ConfigResponse {
                config: Some(config.as_ref().clone()),
            })
        },
    );
    let a = api.clone();
    router.serve_server_stream(
        rpc::LIST_CONFIGS,
        pool,
        move |_, _: pb::ListConfigsRequest, stream| {
            a.read_barrier()?;
            let configs = a.store.list::<Config>();
            stream_chunks(&configs, &stream, |configs| pb::ConfigChunk { configs })
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::objects::{ServiceSpec, Transaction};
    use crate::store::{Store, StoreConfig, create};

    fn service(id: &str, name: &str) -> Service {
        Service {
            id: id.into(),
            spec: Some(ServiceSpec {
                name: name.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn references_resolve_by_id_name_or_unique_prefix() {
        let store = Store::new(StoreConfig::default());
        let txn = Transaction {
            changes: vec![
                create(service("abc111", "web")),
                create(service("abc222", "db")),
                create(service("xyz333", "abc111x")),
            ],
            timestamp_ms: 1,
            request_id: None,
        };
        store.apply(1, &txn).unwrap();
        store.view(|view| {
            assert_eq!(resolve_service(view, "abc111").unwrap().id, "abc111");
            assert_eq!(resolve_service(view, "db").unwrap().id, "abc222");
            assert_eq!(resolve_service(view, "xyz").unwrap().id, "xyz333");
            let ambiguous = resolve_service(view, "abc").unwrap_err();
            assert_eq!(ambiguous.code, Code::InvalidArgument, "{ambiguous}");
            let missing = resolve_service(view, "nope").unwrap_err();
            assert_eq!(missing.code, Code::NotFound);
            assert!(missing.message.contains("flotilla service ls"), "{missing}");
            assert_eq!(
                resolve_service(view, "").unwrap_err().code,
                Code::InvalidArgument
            );
            assert_eq!(the_cluster(view).unwrap_err().code, Code::Unavailable);
        });
    }
}
