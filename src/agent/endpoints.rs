//! Endpoint publishing: for every task this node runs that is attached to networks, an
//! entry (service name, task id, slot, node id and address, ports) in the endpoint table of
//! each of those networks, written while the task is RUNNING and deleted when it stops; the
//! node joins a network when its first task there runs and leaves it when its last one
//! stops.
//!
//! Called only from the `agent-tasks` thread ([`super::tasks`]), at each status it reports.
//! Must never block (the tables return at once) nor fail a task: a refused write is logged
//! and the task runs on without its entry.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::netdb::{ENDPOINTS_TABLE, NetworkTables, encode_endpoint};
use crate::proto::objects::{Endpoint, Task};

/// What a node needs to publish its tasks' endpoints and to tell its tasks where its
/// resolver is.
#[derive(Clone)]
pub struct NodeNetworking {
    /// The node's network tables (networkdb), shared with its DNS responder: a
    /// [`crate::netdb::TablesSlot`] that holds this node's own tables until the gossip
    /// driver runs ([`NodeNetworking::use_tables`]).
    pub tables: Arc<dyn NetworkTables>,
    slot: Arc<crate::netdb::TablesSlot>,
    /// The address of the node's DNS responder, if it runs (given to tasks as
    /// `FLOTILLA_DNS`).
    pub dns_addr: Option<std::net::SocketAddr>,
    /// Where the node's gossip binds (`--gossip-listen`), whatever role it runs in; `None`:
    /// the role's default (the listen port + 1).
    pub gossip_listen: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for NodeNetworking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeNetworking")
            .field("dns_addr", &self.dns_addr)
            .field("gossip_listen", &self.gossip_listen)
            .finish_non_exhaustive()
    }
}

/// Publishes the endpoints of this node's running tasks (see the module documentation).
pub struct EndpointPublisher {
    tables: Arc<dyn NetworkTables>,
    node_id: String,
    /// The node's address as its endpoints carry it (an IP address).
    addr: String,
    published: Mutex<Published>,
}

impl std::fmt::Debug for EndpointPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPublisher")
            .field("node_id", &self.node_id)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Published {
    /// Task id → the networks it has an entry in.
    by_task: HashMap<String, Vec<String>>,
    /// Network id → how many of this node's tasks have an entry there.
    tasks_per_network: HashMap<String, usize>,
}

impl EndpointPublisher {
    /// A publisher for node `node_id` whose tasks are reached at `addr`.
    pub fn new(tables: Arc<dyn NetworkTables>, node_id: &str, addr: &str) -> Self {
        EndpointPublisher {
            tables,
            node_id: node_id.to_string(),
            addr: addr.to_string(),
            published: Mutex::new(Published::default()),
        }
    }

    /// `task` runs: its entry goes into each network it is attached to (once; again is a
    /// no-op).
    pub fn task_running(&self, task: &Task) {
        let Some(spec) = task.spec.as_ref() else {
            return;
        };
        if spec.networks.is_empty() {
            return;
        }
        let mut published = self.published.lock();
        if published.by_task.contains_key(&task.id) {
            return;
        }
        let mut networks = Vec::new();
        for attachment in &spec.networks {
            let endpoint = Endpoint {
                service_name: spec.service_name.clone(),
                task_id: task.id.clone(),
                slot: task.slot,
                node_id: self.node_id.clone(),
                addr: self.addr.clone(),
                ports: spec.ports.clone(),
                network_id: attachment.id.clone(),
                network_name: attachment.name.clone(),
            };
            let written = encode_endpoint(&endpoint)
                .map_err(|e| e.to_string())
                .and_then(|value| {
                    self.tables
                        .join_network(&attachment.id)
                        .map_err(|e| e.to_string())?;
                    self.tables
                        .put(&attachment.id, ENDPOINTS_TABLE, &task.id, value)
                        .map_err(|e| e.to_string())
                });
            match written {
                Ok(()) => {
                    *published
                        .tasks_per_network
                        .entry(attachment.id.clone())
                        .or_default() += 1;
                    networks.push(attachment.id.clone());
                }
                Err(error) => log::warn!(
                    "task {}: no endpoint in network {} ({}): {error}",
                    task.id,
                    attachment.name,
                    attachment.id
                ),
            }
        }
        log::debug!(
            "task {}: endpoint published in {} network(s)",
            task.id,
            networks.len()
        );
        published.by_task.insert(task.id.clone(), networks);
    }

    /// Task `task_id` stopped (or was forgotten): its entries are deleted, and the node
    /// leaves each network where it has no task left.
    pub fn task_stopped(&self, task_id: &str) {
        let mut published = self.published.lock();
        let Some(networks) = published.by_task.remove(task_id) else {
            return;
        };
        for network in networks {
            if let Err(error) = self.tables.delete(&network, ENDPOINTS_TABLE, task_id) {
                log::warn!("task {task_id}: endpoint in network {network} not deleted: {error}");
            }
            let left = match published.tasks_per_network.get_mut(&network) {
                Some(count) => {
                    *count = count.saturating_sub(1);
                    *count == 0
                }
                None => true,
            };
            if left {
                published.tasks_per_network.remove(&network);
                self.tables.leave_network(&network);
            }
        }
    }

    /// Tasks with entries now.
    pub fn published_tasks(&self) -> usize {
        self.published.lock().by_task.len()
    }
}

impl NodeNetworking {
    /// Networking for a node on its own: in-memory tables ([`crate::netdb::LocalTables`]),
    /// no DNS responder.
    pub fn local_only() -> Self {
        let slot = Arc::new(crate::netdb::TablesSlot::new(Arc::new(
            crate::netdb::LocalTables::new(),
        )));
        NodeNetworking {
            tables: slot.clone(),
            slot,
            dns_addr: None,
            gossip_listen: None,
        }
    }

    /// From now on the endpoints go to, and the DNS responder answers from, `tables` (the
    /// gossip driver's handle, once the node runs it). Called before the node runs tasks:
    /// what the previous tables held is not carried over.
    pub fn use_tables(&self, tables: Arc<dyn NetworkTables>) {
        self.slot.replace(tables);
    }

    /// Sets up `runner` to publish the endpoints of node `node_id`'s tasks at `addr` and
    /// to give its tasks the resolver's address.
    pub fn configure(
        &self,
        runner: &mut super::RunnerConfig,
        node_id: &str,
        addr: std::net::IpAddr,
    ) {
        runner.endpoints = Some(Arc::new(EndpointPublisher::new(
            Arc::clone(&self.tables),
            node_id,
            &addr.to_string(),
        )));
        if let Some(dns) = self.dns_addr {
            runner
                .task_env
                .push(format!("{}={dns}", crate::dns::DNS_ENV_VAR));
        }
    }
}

/// The address a node's endpoints carry, from the address it is reached at (`host:port`,
/// its advertise address, or a manager it talks to): that host's IP if it is one, else the
/// local address this host uses to reach it, else loopback.
pub fn endpoint_ip(reached_at: &str) -> std::net::IpAddr {
    use std::net::ToSocketAddrs;
    let direct = reached_at
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    direct
        .or_else(|| local_ip_towards(reached_at))
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// The IP address this host uses to reach `peer` (`host:port`): the source address the
/// routing table picks, found by connecting a UDP socket (no packet is sent). `None` if the
/// peer does not resolve or no route leads there.
pub fn local_ip_towards(peer: &str) -> Option<std::net::IpAddr> {
    use std::net::{ToSocketAddrs, UdpSocket};
    let target = peer.to_socket_addrs().ok()?.next()?;
    let bind: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netdb::{LocalTables, decode_endpoint};
    use crate::proto::objects::{NetworkAttachment, PortSpec, TaskSpec};

    fn task(id: &str, networks: &[&str]) -> Task {
        Task {
            id: id.into(),
            slot: 2,
            spec: Some(TaskSpec {
                command: "true".into(),
                ports: vec![PortSpec {
                    name: "http".into(),
                    port: 80,
                    protocol: "tcp".into(),
                }],
                networks: networks
                    .iter()
                    .map(|n| NetworkAttachment {
                        id: format!("id-{n}"),
                        name: (*n).into(),
                    })
                    .collect(),
                service_name: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_running_task_is_published_in_each_network_until_it_stops() {
        let tables = Arc::new(LocalTables::new());
        let publisher = EndpointPublisher::new(tables.clone(), "node-1", "10.0.0.9");
        publisher.task_running(&task("t1", &["a", "b"]));
        publisher.task_running(&task("t1", &["a", "b"]));
        publisher.task_running(&task("t2", &["a"]));
        publisher.task_running(&task("t3", &[]));
        assert_eq!(
            tables.networks(),
            vec!["id-a".to_string(), "id-b".to_string()]
        );
        let in_a = tables.entries("id-a", ENDPOINTS_TABLE);
        assert_eq!(in_a.len(), 2);
        let endpoint = decode_endpoint(&in_a[0].1).unwrap();
        assert_eq!(
            (
                endpoint.service_name.as_str(),
                endpoint.task_id.as_str(),
                endpoint.slot,
                endpoint.node_id.as_str(),
                endpoint.addr.as_str(),
                endpoint.network_name.as_str(),
                endpoint.ports[0].port
            ),
            ("web", "t1", 2, "node-1", "10.0.0.9", "a", 80)
        );
        publisher.task_stopped("t1");
        // b had only t1: left; a keeps t2.
        assert_eq!(tables.networks(), vec!["id-a".to_string()]);
        assert_eq!(tables.entries("id-a", ENDPOINTS_TABLE).len(), 1);
        publisher.task_stopped("t2");
        publisher.task_stopped("t2");
        assert!(tables.networks().is_empty());
        assert_eq!(publisher.published_tasks(), 0);
    }

    #[test]
    fn the_local_address_towards_loopback_is_loopback() {
        assert_eq!(
            local_ip_towards("127.0.0.1:4242"),
            Some(std::net::IpAddr::from([127, 0, 0, 1]))
        );
        assert_eq!(local_ip_towards("not an address"), None);
    }
}
