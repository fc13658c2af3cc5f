//! The control API (`control.*`): what operators call on any manager over mutual TLS.
//!
//! ```text
//!  CLI ──mTLS──► any manager ── reads: linearizable read index, then the local store
//!                     │
//!                     └─ writes: leader? run here : control.Forward(method, payload,
//!                                caller id/role) ──► leader runs it as the caller
//! ```
//!
//! - Writes ([`write`]) run only on the leader: they read the local store, build one
//!   [`Transaction`](crate::proto::objects::Transaction) (updates carry the version the
//!   caller read, so a stale one fails with `Aborted`) and propose it through Raft.
//! - A follower forwards a write once, to the leader it knows, in a [`FORWARD`] envelope
//!   with the caller's verified identity. Only a manager may call [`FORWARD`]; the leader
//!   never forwards again (no chains, no loops).
//! - Reads wait for [`linearizable_read_index`] and then serve from the local store;
//!   listings stream in chunks of at most [`LIST_CHUNK_BYTES_MAX`] bytes.
//! - [`WATCH`] streams store events from a thread per watch ([`watch`]).
//! - [`managers`] delegates the Raft group's operator calls to the leader's `raft.*`.
//! - [`admin`] issues admin certificates (OU `admin`) from a CSR.
//! - Who may call: operators, that is managers and admin certificates ([`Allow::OPERATORS`]);
//!   never workers. [`FORWARD`] and [`REPORT_MANAGER`] are for managers only. Beyond the
//!   certificate's role, [`access`] refuses revoked identities (removed nodes, revoked admin
//!   certificates) and demoted managers on every manager, for every method (the
//!   transport's authorizer) and again on the leader for a forwarded caller.
//! - The CA key travels in the Cluster object (`root_ca`) and nowhere else: every reply and
//!   watch event that carries a Cluster goes through [`redact_cluster`].
//! - [`duties`] runs one thread per manager that records the manager as a Node object,
//!   creates the Cluster object on a new leader, keeps the CA's join tokens and the
//!   `join-tokens` file in sync with the replicated Cluster object, applies the cluster's
//!   snapshot interval to the Raft node, and runs the leader's [`roles`] reconciler
//!   (demotions).
//!
//! This module must never change the store except through a proposed transaction, nor
//! trust an identity that did not come from a certificate or a manager's forward.

pub mod access;
pub mod admin;
pub mod duties;
mod handlers;
pub mod managers;
mod reads;
pub mod roles;
pub mod watch;

use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use prost::Message;

use crate::ca::{PeerIdentity, Role, RootCert, SharedCa};
use crate::kv::linearizable_read_index;
use crate::manager::StateDir;
use crate::net::{Allow, CallContext, CallOptions, Router, ServicePool, Transport};
use crate::proto::control as pb;
use crate::proto::objects::NodeRole;
use crate::raft::node::NodeHandle;
use crate::store::Store;
use crate::wire::{Code, Status};

/// A new object id: [`crate::util::id::random_id`] under the name callers know.
pub use crate::util::id::random_id as new_object_id;

/// Runs a write on the leader as the caller named inside (managers only).
pub const FORWARD: &str = "control.Forward";
/// Creates a service.
pub const CREATE_SERVICE: &str = "control.CreateService";
/// Reads one service.
pub const GET_SERVICE: &str = "control.GetService";
/// Streams every service.
pub const LIST_SERVICES: &str = "control.ListServices";
/// Replaces a service's spec (with the version read).
pub const UPDATE_SERVICE: &str = "control.UpdateService";
/// Removes a service.
pub const REMOVE_SERVICE: &str = "control.RemoveService";
/// Streams every node.
pub const LIST_NODES: &str = "control.ListNodes";
/// Reads one node.
pub const GET_NODE: &str = "control.GetNode";
/// Replaces a node's spec (availability, labels, desired role).
pub const UPDATE_NODE: &str = "control.UpdateNode";
/// Removes a node.
pub const REMOVE_NODE: &str = "control.RemoveNode";
/// A manager records itself as a Node object.
pub const REPORT_MANAGER: &str = "control.ReportManager";
/// Streams tasks, optionally of one service or node.
pub const LIST_TASKS: &str = "control.ListTasks";
/// Reads one task.
pub const GET_TASK: &str = "control.GetTask";
/// Reads the cluster object.
pub const GET_CLUSTER: &str = "control.GetCluster";
/// Replaces the cluster spec (with the version read).
pub const UPDATE_CLUSTER: &str = "control.UpdateCluster";
/// Reads the join tokens.
pub const GET_JOIN_TOKENS: &str = "control.GetJoinTokens";
/// Replaces one join token.
pub const ROTATE_JOIN_TOKEN: &str = "control.RotateJoinToken";
/// Streams store events.
pub const WATCH: &str = "control.Watch";
/// Internal (managers only, never served to a client): a manager holding the CA key on
/// disk publishes it into the Cluster object.
pub const PUBLISH_ROOT_CA: &str = "control.PublishRootCa";
/// Internal (forwarded by the manager that served `control.RemoveManager`): records the
/// removed manager's node id as revoked.
pub const REVOKE_REMOVED_MANAGER: &str = "control.RevokeRemovedManager";

/// The write methods: run on the leader, forwarded by followers. (Also forwarded:
/// [`admin::ISSUE_ADMIN_CERTIFICATE`] by a manager without the CA key yet,
/// [`admin::REVOKE_ADMIN_CERTIFICATE`], and the internal [`PUBLISH_ROOT_CA`] and
/// [`REVOKE_REMOVED_MANAGER`].)
pub const WRITE_METHODS: [&str; 8] = [
    CREATE_SERVICE,
    UPDATE_SERVICE,
    REMOVE_SERVICE,
    UPDATE_NODE,
    REMOVE_NODE,
    REPORT_MANAGER,
    UPDATE_CLUSTER,
    ROTATE_JOIN_TOKEN,
];

/// Whether a follower may forward `method` to the leader.
fn is_forwardable(method: &str) -> bool {
    WRITE_METHODS.contains(&method)
        || [
            admin::ISSUE_ADMIN_CERTIFICATE,
            admin::REVOKE_ADMIN_CERTIFICATE,
            PUBLISH_ROOT_CA,
            REVOKE_REMOVED_MANAGER,
        ]
        .contains(&method)
}

/// Writes only a manager may have run (about itself or the cluster's own material).
fn is_manager_only(method: &str) -> bool {
    [REPORT_MANAGER, PUBLISH_ROOT_CA].contains(&method)
}

/// Removes the CA key from a Cluster object before it leaves this manager (a reply, a watch
/// event). Every path that hands a Cluster to a caller goes through here.
pub fn redact_cluster(cluster: &mut crate::proto::objects::Cluster) {
    cluster.root_ca = None;
}

pub use crate::manager::state::PROPOSE_TIMEOUT;
/// Bytes of objects per streamed listing chunk (well under the 4 MiB frame bound).
pub const LIST_CHUNK_BYTES_MAX: usize = 1024 * 1024;
/// Threads serving control calls (writes block on their proposal).
pub const CONTROL_POOL_THREADS: usize = 16;
/// Queued control calls before new ones are refused with `ResourceExhausted`.
pub const CONTROL_POOL_QUEUE_LEN_MAX: usize = 4096;

/// Who made a call: from the caller's certificate, or from a manager's forward.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's node id.
    pub node_id: String,
    /// The caller's role.
    pub role: Role,
    /// The manager that forwarded the call, if it was forwarded.
    pub forwarded_by: Option<String>,
}

impl Caller {
    fn from_peer(peer: Option<&PeerIdentity>) -> Result<Caller, Status> {
        let peer = peer.ok_or_else(|| {
            Status::new(
                Code::Unauthenticated,
                "the control API needs a cluster certificate",
            )
        })?;
        Ok(Caller {
            node_id: peer.node_id.clone(),
            role: peer.role,
            forwarded_by: None,
        })
    }
}

/// The coarse proto role of a forwarded caller: an admin is no manager.
pub(crate) fn role_to_proto(role: Role) -> NodeRole {
    match role {
        Role::Manager => NodeRole::Manager,
        Role::Worker | Role::Admin => NodeRole::Worker,
    }
}

/// The forwarded caller's role: its certificate's OU when sent, else the coarse enum (which
/// never grants more than a worker's rights unless it says manager).
fn forwarded_role(request: &pb::ForwardRequest) -> Result<Role, Status> {
    if !request.caller_role_name.is_empty() {
        return request.caller_role_name.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "caller_role_name: unknown role {:?}",
                request.caller_role_name
            ))
        });
    }
    Ok(match NodeRole::try_from(request.caller_role) {
        Ok(NodeRole::Manager) => Role::Manager,
        _ => Role::Worker,
    })
}

/// The control API of one manager: shared by its handlers, the watch threads and the
/// duties thread.
pub struct ControlApi {
    node: NodeHandle,
    store: Arc<Store>,
    transport: Arc<Transport>,
    client_tls: Arc<rustls::ClientConfig>,
    ca: Arc<SharedCa>,
    access: Arc<access::AccessList>,
    root: RootCert,
    dir: StateDir,
    watches: Mutex<watch::WatchThreads>,
}

/// What the control API needs besides the Raft node and the store.
pub struct ControlDeps {
    /// The transport, for forwarding and leader calls.
    pub transport: Arc<Transport>,
    /// This manager's client TLS configuration.
    pub client_tls: Arc<rustls::ClientConfig>,
    /// The CA this manager serves (filled when the replicated key arrives).
    pub ca: Arc<SharedCa>,
    /// The revocation state the apply thread maintains.
    pub access: Arc<access::AccessList>,
    /// This node's root certificate (the replicated key must belong to it).
    pub root: RootCert,
    /// The state directory (join tokens file).
    pub dir: StateDir,
}

impl ControlApi {
    /// The API over `node` and its applied `store`; `deps.ca` and `deps.dir` receive
    /// rotated tokens.
    pub fn new(node: NodeHandle, store: Arc<Store>, deps: ControlDeps) -> Arc<ControlApi> {
        Arc::new(ControlApi {
            node,
            store,
            transport: deps.transport,
            client_tls: deps.client_tls,
            ca: deps.ca,
            access: deps.access,
            root: deps.root,
            dir: deps.dir,
            watches: Mutex::new(watch::WatchThreads::default()),
        })
    }

    /// The CA this manager serves, if it holds the key.
    pub fn ca(&self) -> Option<Arc<crate::ca::CaService>> {
        self.ca.get()
    }

    /// The local store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn is_leader(&self) -> bool {
        self.node.leader() == Some(self.node.id())
    }

    /// Waits until the local store may serve a linearizable read.
    fn read_barrier(&self) -> Result<(), Status> {
        linearizable_read_index(&self.node, &self.transport, &self.client_tls)
            .map(|_| ())
            .map_err(|e| e.to_status())
    }

    /// Runs the write `method` (encoded `payload`) as `caller`: here if this manager leads,
    /// else forwarded to the leader.
    ///
    /// # Errors
    /// The write's own refusal, or `Unavailable` / `FailedPrecondition` (with a
    /// `leader_addr=` hint) when no leader can take it.
    pub fn write(&self, caller: &Caller, method: &str, payload: Bytes) -> Result<Bytes, Status> {
        if self.is_leader() {
            return handlers::execute(self, caller, method, payload);
        }
        let leader = self.node.leader().ok_or_else(|| {
            Status::retry_soon(
                Code::Unavailable,
                "no leader is known right now (an election); retry in a moment",
            )
        })?;
        let leader_addr = self.node.directory().addr(leader).ok_or_else(|| {
            Status::retry_soon(
                Code::Unavailable,
                format!("the address of leader {leader:x} is not known yet; retry in a moment"),
            )
        })?;
        let request = pb::ForwardRequest {
            method: method.to_string(),
            payload,
            caller_node_id: caller.node_id.clone(),
            caller_role: role_to_proto(caller.role) as i32,
            caller_role_name: caller.role.as_str().to_string(),
        };
        let response: pb::ForwardResponse = self
            .transport
            .channel(&leader_addr, &self.client_tls)
            .unary(FORWARD, &request, CallOptions::timeout(PROPOSE_TIMEOUT))
            .map_err(|status| match status.code {
                // Most often the leader just died and the election is not over: the caller
                // may retry (a write whose reply was lost may have happened; a create that
                // carries its id answers the retry with what the first attempt made).
                Code::Unavailable => Status::retry_soon(
                    Code::Unavailable,
                    format!(
                        "leader {leader_addr} is unreachable ({}); retry in a moment",
                        status.message
                    ),
                ),
                _ => status,
            })?;
        Ok(response.payload)
    }

    /// Stops every watch thread and waits for them.
    pub fn shutdown(&self) {
        let threads = std::mem::take(&mut *self.watches.lock());
        threads.stop_and_join();
    }
}

/// The leader's side of [`FORWARD`]: runs the write as the caller named in the envelope.
fn serve_forward(
    api: &ControlApi,
    ctx: &CallContext,
    request: pb::ForwardRequest,
) -> Result<pb::ForwardResponse, Status> {
    let forwarder = Caller::from_peer(ctx.peer())?;
    if forwarder.role != Role::Manager {
        return Err(Status::permission_denied(
            "only a manager may forward a call with another node's identity",
        ));
    }
    if !is_forwardable(&request.method) {
        return Err(Status::invalid_argument(format!(
            "{} cannot be forwarded: only control writes are",
            request.method
        )));
    }
    if request.caller_node_id.is_empty() {
        return Err(Status::invalid_argument(
            "caller_node_id: required: the original caller's node id",
        ));
    }
    if !api.is_leader() {
        // Never forward twice: the follower retries with the leader it learns next.
        let error = crate::raft::node::NodeError::NotLeader {
            leader: api.node.leader(),
            leader_addr: api
                .node
                .leader()
                .and_then(|id| api.node.directory().addr(id)),
        };
        return Err(error.to_status());
    }
    let caller = Caller {
        role: forwarded_role(&request)?,
        node_id: request.caller_node_id,
        forwarded_by: Some(forwarder.node_id),
    };
    // The follower checked the caller against the method's allow-list; check again here,
    // so that no path runs a control write for a worker.
    let allowed = match caller.role {
        Role::Manager => true,
        Role::Admin => !is_manager_only(&request.method),
        Role::Worker => false,
    };
    if !allowed {
        return Err(Status::permission_denied(format!(
            "{} may not be called by node {} with role {}",
            request.method, caller.node_id, caller.role
        )));
    }
    // The follower's store may lag behind this one: a caller revoked or demoted here is
    // refused even if the follower let it through.
    api.access
        .check_caller(&request.method, &caller.node_id, caller.role)?;
    handlers::execute(api, &caller, &request.method, request.payload)
        .map(|payload| pb::ForwardResponse { payload })
}

/// Serves write `method`: run on the leader, forwarded by a follower with the caller's
/// identity.
pub(super) fn register_write<Req, Resp>(
    router: &mut Router,
    pool: &ServicePool,
    api: &Arc<ControlApi>,
    method: &'static str,
) where
    Req: Message + Default + 'static,
    Resp: Message + Default + 'static,
{
    // A manager reports only itself; every other write is for operators.
    let allow = if method == REPORT_MANAGER {
        Allow::MANAGERS
    } else {
        Allow::OPERATORS
    };
    let api = api.clone();
    router.unary(method, allow, pool, move |ctx, request: Req| {
        let caller = Caller::from_peer(ctx.peer())?;
        let reply = api.write(&caller, method, Bytes::from(request.encode_to_vec()))?;
        Resp::decode(reply).map_err(|e| Status::internal(format!("undecodable reply: {e}")))
    });
}

/// Serves every `control.*` method of `api` on `pool`.
pub fn register(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    let a = api.clone();
    router.unary(FORWARD, Allow::MANAGERS, pool, move |ctx, request| {
        serve_forward(&a, ctx, request)
    });
    register_write::<pb::CreateServiceRequest, pb::ServiceResponse>(
        router,
        pool,
        api,
        CREATE_SERVICE,
    );
    register_write::<pb::UpdateServiceRequest, pb::ServiceResponse>(
        router,
        pool,
        api,
        UPDATE_SERVICE,
    );
    register_write::<pb::RemoveServiceRequest, pb::RemoveResponse>(
        router,
        pool,
        api,
        REMOVE_SERVICE,
    );
    register_write::<pb::UpdateNodeRequest, pb::NodeResponse>(router, pool, api, UPDATE_NODE);
    register_write::<pb::RemoveNodeRequest, pb::RemoveResponse>(router, pool, api, REMOVE_NODE);
    register_write::<pb::ReportManagerRequest, pb::ReportManagerResponse>(
        router,
        pool,
        api,
        REPORT_MANAGER,
    );
    register_write::<pb::UpdateClusterRequest, pb::ClusterResponse>(
        router,
        pool,
        api,
        UPDATE_CLUSTER,
    );
    register_write::<pb::RotateJoinTokenRequest, pb::JoinTokensResponse>(
        router,
        pool,
        api,
        ROTATE_JOIN_TOKEN,
    );
    reads::register(router, pool, api);
    watch::register(router, pool, api);
    managers::register(router, pool, api);
    admin::register(router, pool, api);
}
