//! The control API (`control.*`): what operators call on any manager over mutual TLS.
//!
//! ```text
//!  CLI ──mTLS──► any manager ── reads: linearizable read index, then the local store
//!                     │
//!                     └─ writes: leader? run here : control.Forward(typed request,
//!                                caller id/role) ──► leader runs it as the caller
//! ```
//!
//! - The methods and their policies (who may call, read or write, forwarded or not) are
//!   declared in `proto/flotilla/control.proto` and generated into
//!   [`crate::proto::control::rpc`]; registration and authorization read them there.
//! - Writes ([`ControlApi::write`]) run only on the leader: they read the local store, build
//!   one [`Transaction`](crate::proto::objects::Transaction) (updates carry the version the
//!   caller read, so a stale one fails with `Aborted`) and propose it through Raft.
//! - A follower forwards a write (`forward=yes`) once, to the leader it knows, in a
//!   `control.Forward` envelope carrying the typed request (encoded once, decoded once) and
//!   the caller's verified identity. Only a manager may call `control.Forward`; the leader
//!   checks the caller against the method's policy again and never forwards again (no
//!   chains, no loops).
//! - Reads wait for [`linearizable_read_index`] and then serve from the local store;
//!   listings stream in chunks of at most [`LIST_CHUNK_BYTES_MAX`] bytes.
//! - `control.Watch` streams store events from a thread per watch ([`watch`]).
//! - `control.ServiceLogs` streams task output the leader gathers from the agents
//!   ([`logs`]; a follower relays the leader's stream).
//! - [`managers`] delegates the Raft group's operator calls to the leader's `raft.*`.
//! - [`admin`] issues admin certificates (OU `admin`) from a CSR.
//! - Who may call: operators, that is managers and admin certificates
//!   ([`Allow::OPERATORS`](crate::net::Allow::OPERATORS)); never workers. `control.Forward`,
//!   `control.ReportManager` and `control.PublishRootCa` are for managers only. Beyond the
//!   certificate's role, [`access`] refuses revoked identities (removed nodes, revoked admin
//!   certificates) and demoted managers on every manager, for every method (the
//!   transport's authorizer) and again on the leader for a forwarded caller.
//! - The CA key travels in the Cluster object (`root_ca`) and nowhere else: every reply and
//!   watch event that carries a Cluster goes through [`redact_cluster`] (which also drops
//!   the secrets key), every one that carries a Secret through [`redact_secret`].
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
mod answer;
pub mod duties;
mod handlers;
pub mod logs;
pub mod managers;
mod reads;
pub mod roles;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::ca::{PeerIdentity, Role, RootCert, SharedCa};
use crate::net::{
    CallContext, CallOptions, Continuations, Responder, Router, ServicePool, Transport,
};
use crate::proto::control as pb;
use crate::proto::control::forward_request::Call;
use crate::proto::control::forward_response::Reply;
use crate::proto::control::rpc::{self, forward};
use crate::proto::objects::NodeRole;
use crate::raft::node::NodeHandle;
use crate::replication::{PROPOSE_TIMEOUT, linearizable_read_index};
use crate::store::Store;
use crate::timer::Timers;
use crate::wire::{Code, Reason, Status, WriteFate};

use answer::AnswerOnce;

/// The wire names of the control methods (`control::CREATE_SERVICE` is
/// `"control.CreateService"`), generated from `proto/flotilla/control.proto`; their typed
/// descriptors and policies are in [`crate::proto::control::rpc`].
pub use crate::proto::control::rpc::name::*;
/// Counts one control write in flight while it lives (see [`CONTROL_WRITES_IN_FLIGHT_MAX`]).
struct WriteInFlight(Arc<AtomicUsize>);

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        let before = self.0.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "a write in flight was counted out twice");
    }
}

/// A new object id: [`crate::util::id::random_id`] under the name callers know.
pub use crate::util::id::random_id as new_object_id;

/// Removes the CA key from a Cluster object before it leaves this manager (a reply, a watch
/// event). Every path that hands a Cluster to a caller goes through here.
pub fn redact_cluster(cluster: &mut crate::proto::objects::Cluster) {
    cluster.root_ca = None;
    cluster.network_bootstrap_keys.clear();
    cluster.secrets_key.clear();
}

/// Removes a secret's value (sealed in the store) before it leaves this manager (a reply, a
/// watch event), as Docker never returns a secret's data.
pub fn redact_secret(secret: &mut crate::proto::objects::Secret) {
    if let Some(spec) = secret.spec.as_mut() {
        spec.data = Default::default();
    }
}

/// Bytes of objects per streamed listing chunk (well under the 4 MiB frame bound).
pub const LIST_CHUNK_BYTES_MAX: usize = 1024 * 1024;
/// Threads serving control calls. Writes do not hold one while they commit; reads hold
/// one while they wait for the read barrier, listings while they stream.
pub const CONTROL_POOL_THREADS: usize = 16;
/// Queued control calls before new ones are refused with `ResourceExhausted`.
pub const CONTROL_POOL_QUEUE_LEN_MAX: usize = 4096;
/// Control writes this manager has started and not yet answered (proposing, or forwarded to
/// the leader); past it a write is refused with "retry soon" before anything is done. It
/// bounds the closures waiting in the Raft node and the pool's continuation queue.
pub const CONTROL_WRITES_IN_FLIGHT_MAX: usize = 1024;
/// How long a write refused for [`CONTROL_WRITES_IN_FLIGHT_MAX`] is told to wait.
pub const CONTROL_WRITES_BUSY_RETRY_AFTER: Duration = Duration::from_millis(200);

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
    tokens_file: Arc<dyn TokensFile>,
    watches: Mutex<watch::WatchThreads>,
    /// Runs the rest of a write on the control pool once its proposal or forward is over.
    continuations: Continuations,
    /// Writes started and not yet answered (see [`CONTROL_WRITES_IN_FLIGHT_MAX`]).
    writes_in_flight: Arc<AtomicUsize>,
    /// Deadlines of writes in flight.
    timers: Timers,
    /// This manager's node's network tables (`control.ListEndpoints` reads them).
    tables: Arc<dyn crate::netdb::NetworkTables>,
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
    /// The join tokens file of the state directory.
    pub tokens_file: Arc<dyn TokensFile>,
    /// The control pool's continuations: where a write continues once its proposal or its
    /// forward is over.
    pub continuations: Continuations,
    /// The timer thread that answers a write still in flight at its deadline.
    pub timers: Timers,
    /// This manager's node's network tables, shared with its agent and DNS responder.
    pub tables: Arc<dyn crate::netdb::NetworkTables>,
}

/// Why the join tokens file could not be read or written (the implementation's error).
pub type TokensFileError = Box<dyn std::error::Error + Send + Sync>;

/// Where this manager keeps the current join tokens on disk (the state directory's
/// `join-tokens` file): the duties keep it in step with the replicated Cluster object.
pub trait TokensFile: Send + Sync {
    /// The tokens saved last.
    ///
    /// # Errors
    /// The file is missing, unreadable or corrupt.
    fn load_tokens(&self) -> Result<crate::ca::JoinTokens, TokensFileError>;

    /// Replaces the saved tokens.
    ///
    /// # Errors
    /// The file could not be written.
    fn save_tokens(&self, tokens: &crate::ca::JoinTokens) -> Result<(), TokensFileError>;
}

impl ControlApi {
    /// The API over `node` and its applied `store`; `deps.ca` and `deps.tokens_file` receive
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
            tokens_file: deps.tokens_file,
            watches: Mutex::new(watch::WatchThreads::default()),
            continuations: deps.continuations,
            writes_in_flight: Arc::new(AtomicUsize::new(0)),
            timers: deps.timers,
            tables: deps.tables,
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

    /// Runs the forwardable write `write` with `request` as `caller`, here if this manager
    /// leads, else forwarded to the leader, and waits for the answer. For threads of their
    /// own (the duties): a control pool thread uses [`ControlApi::write_with`], since the
    /// answer may need a pool thread to be built.
    ///
    /// # Errors
    /// As [`ControlApi::write_with`] gives them.
    pub fn write<Req, Resp>(
        self: &Arc<Self>,
        caller: &Caller,
        write: forward::Write<Req, Resp>,
        request: Req,
    ) -> Result<Resp, Status>
    where
        Resp: Send + 'static,
    {
        let (answer, answered) = crossbeam_channel::bounded(1);
        self.write_with(
            caller,
            write,
            request,
            Box::new(move |result| {
                let _ = answer.send(result);
            }),
        );
        match answered.recv_timeout(PROPOSE_TIMEOUT) {
            Ok(answer) => answer,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Err(Status::outcome_unknown(
                Code::DeadlineExceeded,
                format!(
                    "no answer within {PROPOSE_TIMEOUT:?}; the write may or may not have happened"
                ),
            )),
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Status::outcome_unknown(
                Code::Unavailable,
                "this manager stopped before the write was answered; it may or may not have \
                 happened",
            )),
        }
    }

    /// Runs the forwardable write `write` with `request` as `caller`: here if this manager
    /// leads, else forwarded to the leader. No thread waits for the outcome: `done` runs
    /// once with it, on a control pool thread (or on this thread, when the write is refused
    /// at once).
    ///
    /// The refusals `done` may get: the write's own; [`Reason::RetrySoon`] when no leader can
    /// take it or too many writes are in flight (nothing was done); [`Reason::OutcomeUnknown`]
    /// when the forward reached the leader but its answer was lost (the leader died): the
    /// write may or may not have happened.
    pub fn write_with<Req, Resp>(
        self: &Arc<Self>,
        caller: &Caller,
        write: forward::Write<Req, Resp>,
        request: Req,
        done: answer::Done<Resp>,
    ) where
        Resp: Send + 'static,
    {
        let in_flight = match self.admit_write() {
            Ok(in_flight) => in_flight,
            Err(busy) => return done(Err(busy)),
        };
        let method = write.method.name();
        let unwrap = write.unwrap;
        let done = self.within_deadline(Box::new(move |reply: Result<Reply, Status>| {
            drop(in_flight);
            done(reply.and_then(|reply| {
                unwrap(reply).ok_or_else(|| {
                    Status::internal(format!(
                        "the leader answered {method} with another method's reply"
                    ))
                })
            }));
        }));
        self.write_call(caller, (write.wrap)(request), done);
    }

    /// `done`, answered by whichever comes first: the write's outcome, or
    /// [`PROPOSE_TIMEOUT`] passing, which answers "outcome unknown" (the write may still
    /// commit; its late outcome is dropped). Without a deadline (the timer thread is
    /// stopped or far behind) the write is answered by its outcome alone.
    fn within_deadline<T: Send + 'static>(&self, done: answer::Done<T>) -> answer::Done<T> {
        let answer = AnswerOnce::new(done);
        let on_deadline = answer.clone();
        let continuations = self.continuations.clone();
        let armed = self.timers.after(
            PROPOSE_TIMEOUT,
            Box::new(move || {
                // On the timer thread: the answer is given on the pool.
                continuations.run(move || {
                    on_deadline.answer(Err(Status::outcome_unknown(
                        Code::DeadlineExceeded,
                        format!(
                            "no answer within {PROPOSE_TIMEOUT:?}; the write may or may not \
                             have happened"
                        ),
                    )));
                });
            }),
        );
        let deadline = match armed {
            Ok(handle) => Some(handle),
            Err(error) => {
                log::warn!("a control write goes without its deadline: {error}");
                None
            }
        };
        let timers = self.timers.clone();
        Box::new(move |result| {
            if let Some(handle) = deadline {
                timers.cancel(handle);
            }
            answer.answer(result);
        })
    }

    /// Counts a write in flight until the returned guard drops, or refuses it when
    /// [`CONTROL_WRITES_IN_FLIGHT_MAX`] are.
    fn admit_write(&self) -> Result<WriteInFlight, Status> {
        let before = self.writes_in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = WriteInFlight(Arc::clone(&self.writes_in_flight));
        if before >= CONTROL_WRITES_IN_FLIGHT_MAX {
            return Err(Status::retry_soon(
                Code::ResourceExhausted,
                format!(
                    "this manager has {CONTROL_WRITES_IN_FLIGHT_MAX} control writes in flight; \
                    retry in a moment"
                ),
            )
            .with_retry_after(CONTROL_WRITES_BUSY_RETRY_AFTER));
        }
        Ok(guard)
    }

    /// Runs the write `call` as `caller`, here or on the leader; `done` gets the reply.
    fn write_call(self: &Arc<Self>, caller: &Caller, call: Call, done: answer::Done<Reply>) {
        if self.is_leader() {
            return handlers::execute(self, caller, call, done);
        }
        match self.leader_addr() {
            Ok(leader_addr) => self.forward(&leader_addr, caller, call, done),
            Err(no_leader) => done(Err(no_leader)),
        }
    }

    /// The leader's address, or why it is not known (an election: retry soon).
    pub(crate) fn leader_addr(&self) -> Result<String, Status> {
        let leader = self.node.leader().ok_or_else(|| {
            Status::retry_soon(
                Code::Unavailable,
                "no leader is known right now (an election); retry in a moment",
            )
        })?;
        self.node.directory().addr(leader).ok_or_else(|| {
            Status::retry_soon(
                Code::Unavailable,
                format!("the address of leader {leader:x} is not known yet; retry in a moment"),
            )
        })
    }

    /// Forwards the write `call` to the leader at `leader_addr`, without waiting for its
    /// answer: the reactor hands the answer to the pool, which gives it to `done`.
    fn forward(
        self: &Arc<Self>,
        leader_addr: &str,
        caller: &Caller,
        call: Call,
        done: answer::Done<Reply>,
    ) {
        let request = pb::ForwardRequest {
            call: Some(call),
            caller_node_id: caller.node_id.clone(),
            caller_role: role_to_proto(caller.role) as i32,
            caller_role_name: caller.role.as_str().to_string(),
        };
        let payload = bytes::Bytes::from(prost::Message::encode_to_vec(&request));
        let answer = AnswerOnce::new(done);
        let continuations = self.continuations.clone();
        let on_reply_answer = answer.clone();
        let on_reply_addr = leader_addr.to_string();
        let on_reply: crate::net::ReplyCallback = Box::new(move |reply| {
            // On the reactor thread: decoding and answering happen on the pool.
            continuations.run(move || {
                on_reply_answer.answer(forward_reply(&on_reply_addr, reply));
            });
        });
        let sent = self
            .transport
            .channel(leader_addr, &self.client_tls)
            .unary_with(
                rpc::FORWARD.name(),
                payload,
                CallOptions::timeout(PROPOSE_TIMEOUT),
                on_reply,
            );
        if let Err(unsent) = sent {
            answer.answer(Err(forward_failure(leader_addr, unsent)));
        }
    }

    /// Stops every watch thread and waits for them.
    pub fn shutdown(&self) {
        let threads = std::mem::take(&mut *self.watches.lock());
        threads.stop_and_join();
    }
}

/// The leader's answer to a forwarded write, as the write's caller learns it.
fn forward_reply(leader_addr: &str, reply: Result<bytes::Bytes, Status>) -> Result<Reply, Status> {
    let payload = reply.map_err(|status| forward_failure(leader_addr, status))?;
    let response: pb::ForwardResponse = prost::Message::decode(payload).map_err(|e| {
        Status::outcome_unknown(
            Code::Internal,
            format!("the leader's answer to a forwarded write does not decode ({e}); it may or may not have happened"),
        )
    })?;
    response
        .reply
        .ok_or_else(|| Status::internal("the leader's forward reply carries no reply"))
}

/// What the caller of a forwarded write learns when the forward failed.
fn forward_failure(leader_addr: &str, status: Status) -> Status {
    match (status.write_fate(), status.reason) {
        // Never sent: most often the leader just died and the election is not over.
        (WriteFate::NotDone, Reason::NotSent) => Status::retry_soon(
            Code::Unavailable,
            format!(
                "leader {leader_addr} is unreachable ({}); retry in a moment",
                status.message
            ),
        ),
        // The leader's own answer (a refusal, or an outcome it does not know itself).
        (WriteFate::NotDone | WriteFate::Refused, _) | (_, Reason::OutcomeUnknown) => status,
        // Sent, and the answer lost on the way back (the leader died, the deadline passed):
        // a write carrying a request id may be repeated; its repeat gets the first
        // attempt's answer.
        (WriteFate::Unknown, _) => Status::outcome_unknown(
            status.code,
            format!(
                "the write was handed to leader {leader_addr}, which did not answer ({}); it \
                 may or may not have happened",
                status.message
            ),
        ),
    }
}

/// The leader's side of `control.Forward`: runs the write as the caller named in the
/// envelope, if the write's policy admits the caller; the write answers `responder` once it
/// is over, no thread waiting meanwhile.
fn serve_forward(
    api: &Arc<ControlApi>,
    ctx: &CallContext,
    request: pb::ForwardRequest,
    responder: Responder<pb::ForwardResponse>,
) {
    let (caller, call) = match forwarded_call(api, ctx, request) {
        Ok(forwarded) => forwarded,
        Err(refusal) => return responder.respond(Err(refusal)),
    };
    let in_flight = match api.admit_write() {
        Ok(in_flight) => in_flight,
        Err(busy) => return responder.respond(Err(busy)),
    };
    let done = api.within_deadline(Box::new(move |reply: Result<Reply, Status>| {
        drop(in_flight);
        responder.respond(reply.map(|reply| pb::ForwardResponse { reply: Some(reply) }));
    }));
    handlers::execute(api, &caller, call, done);
}

/// The caller and the write of a forward, once checked: the forwarder is a manager, this
/// manager leads, and the caller's role and standing admit the write.
fn forwarded_call(
    api: &ControlApi,
    ctx: &CallContext,
    mut request: pb::ForwardRequest,
) -> Result<(Caller, Call), Status> {
    let forwarder = Caller::from_peer(ctx.peer())?;
    if forwarder.role != Role::Manager {
        return Err(Status::permission_denied(
            "only a manager may forward a call with another node's identity",
        ));
    }
    // The oneof holds forwardable writes only (build.rs checks it against the policies).
    let call = request.call.take().ok_or_else(|| {
        Status::invalid_argument("call: required: the forwarded write and its request")
    })?;
    let method = forward::method_of(&call);
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
    let role = forwarded_role(&request)?;
    let caller = Caller {
        role,
        node_id: request.caller_node_id,
        forwarded_by: Some(forwarder.node_id),
    };
    // The follower checked the caller against the method's allow-list; check again here,
    // so that no path runs a control write for a worker.
    if !method.policy.allow.admits(Some(caller.role)) {
        return Err(Status::permission_denied(format!(
            "{} may not be called by node {} with role {}",
            method.name, caller.node_id, caller.role
        )));
    }
    // The follower's store may lag behind this one: a caller revoked or demoted here is
    // refused even if the follower let it through.
    api.access
        .check_caller(&method, &caller.node_id, caller.role)?;
    Ok((caller, call))
}

/// Serves the forwardable write `write`: run on the leader, forwarded by a follower with the
/// caller's identity. Who may call is the method's declared policy.
pub(super) fn register_write<Req, Resp>(
    router: &mut Router,
    pool: &ServicePool,
    api: &Arc<ControlApi>,
    write: forward::Write<Req, Resp>,
) where
    Req: prost::Message + Default + 'static,
    Resp: prost::Message + Default + 'static,
{
    let api = api.clone();
    router.serve_unary_deferred(write.method, pool, move |ctx, request, responder| {
        let caller = match Caller::from_peer(ctx.peer()) {
            Ok(caller) => caller,
            Err(refusal) => return responder.respond(Err(refusal)),
        };
        api.write_with(
            &caller,
            write,
            request,
            Box::new(move |reply| responder.respond(reply)),
        );
    });
}

/// Serves every `control.*` method of `api` on `pool`.
pub fn register(router: &mut Router, pool: &ServicePool, api: &Arc<ControlApi>) {
    let a = api.clone();
    router.serve_unary_deferred(rpc::FORWARD, pool, move |ctx, request, responder| {
        serve_forward(&a, ctx, request, responder);
    });
    register_write(router, pool, api, forward::CREATE_SERVICE);
    register_write(router, pool, api, forward::UPDATE_SERVICE);
    register_write(router, pool, api, forward::REMOVE_SERVICE);
    register_write(router, pool, api, forward::UPDATE_NODE);
    register_write(router, pool, api, forward::REMOVE_NODE);
    register_write(router, pool, api, forward::REPORT_MANAGER);
    register_write(router, pool, api, forward::UPDATE_CLUSTER);
    register_write(router, pool, api, forward::ROTATE_JOIN_TOKEN);
    register_write(router, pool, api, forward::CREATE_NETWORK);
    register_write(router, pool, api, forward::REMOVE_NETWORK);
    register_write(router, pool, api, forward::CREATE_SECRET);
    register_write(router, pool, api, forward::REMOVE_SECRET);
    register_write(router, pool, api, forward::CREATE_CONFIG);
    register_write(router, pool, api, forward::REMOVE_CONFIG);
    reads::register(router, pool, api);
    watch::register(router, pool, api);
    managers::register(router, pool, api);
    admin::register(router, pool, api);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::net::Allow;
    use crate::net::method::Access;

    fn control_methods() -> impl Iterator<Item = crate::net::Method> {
        rpc::METHODS.into_iter()
    }

    /// The writes a follower forwards: the service, node, cluster, token and network writes, the admin certificate calls,
    /// and the two internal ones.
    #[test]
    fn the_forwarded_writes_are_those_of_before() {
        let forwarded: BTreeSet<&str> = control_methods()
            .filter(|m| m.policy.forward)
            .map(|m| m.name)
            .collect();
        assert_eq!(
            forwarded,
            BTreeSet::from([
                CREATE_SERVICE,
                UPDATE_SERVICE,
                REMOVE_SERVICE,
                UPDATE_NODE,
                REMOVE_NODE,
                REPORT_MANAGER,
                UPDATE_CLUSTER,
                ROTATE_JOIN_TOKEN,
                ISSUE_ADMIN_CERTIFICATE,
                REVOKE_ADMIN_CERTIFICATE,
                PUBLISH_ROOT_CA,
                REVOKE_REMOVED_MANAGER,
                CREATE_NETWORK,
                REMOVE_NETWORK,
                CREATE_SECRET,
                REMOVE_SECRET,
                CREATE_CONFIG,
                REMOVE_CONFIG,
            ])
        );
        let internal: BTreeSet<&str> = control_methods()
            .filter(|m| m.policy.internal)
            .map(|m| m.name)
            .collect();
        assert_eq!(
            internal,
            BTreeSet::from([PUBLISH_ROOT_CA, REVOKE_REMOVED_MANAGER])
        );
    }

    /// Every control write is forwarded to the leader and open to operators, except the
    /// manager-only ones (a manager's report about itself, the CA key it publishes), the
    /// forward itself, and the two that delegate to the leader's Raft methods.
    #[test]
    fn every_control_write_is_forwarded_for_operators_but_the_manager_only_ones() {
        let delegated = [FORWARD, REMOVE_MANAGER, TRANSFER_LEADERSHIP];
        let manager_only = [FORWARD, REPORT_MANAGER, PUBLISH_ROOT_CA];
        for method in control_methods() {
            let policy = method.policy;
            let expected_allow = if manager_only.contains(&method.name) {
                Allow::MANAGERS
            } else {
                Allow::OPERATORS
            };
            assert_eq!(policy.allow, expected_allow, "{}", method.name);
            assert!(
                !policy.allow.admits(Some(Role::Worker)),
                "{}: never workers",
                method.name
            );
            match policy.access {
                Access::Write => assert_eq!(
                    policy.forward,
                    !delegated.contains(&method.name),
                    "{}",
                    method.name
                ),
                Access::Read => assert!(!policy.forward, "{}", method.name),
            }
        }
    }

    /// Each forwarded write's request travels in its own oneof field, and its reply comes
    /// back only from its own.
    #[test]
    fn forwarded_writes_travel_in_their_own_oneof_fields() {
        fn round_trip<Req: Default, Resp: Default>(write: forward::Write<Req, Resp>) {
            let call = (write.wrap)(Req::default());
            assert_eq!(forward::method_of(&call), write.method.method());
            let other = Reply::PublishRootCa(pb::PublishRootCaResponse {});
            let is_publish = write.method.name() == PUBLISH_ROOT_CA;
            assert_eq!((write.unwrap)(other).is_some(), is_publish);
        }
        round_trip(forward::CREATE_SERVICE);
        round_trip(forward::UPDATE_SERVICE);
        round_trip(forward::REMOVE_SERVICE);
        round_trip(forward::UPDATE_NODE);
        round_trip(forward::REMOVE_NODE);
        round_trip(forward::REPORT_MANAGER);
        round_trip(forward::UPDATE_CLUSTER);
        round_trip(forward::ROTATE_JOIN_TOKEN);
        round_trip(forward::ISSUE_ADMIN_CERTIFICATE);
        round_trip(forward::REVOKE_ADMIN_CERTIFICATE);
        round_trip(forward::PUBLISH_ROOT_CA);
        round_trip(forward::REVOKE_REMOVED_MANAGER);
        let reply = (forward::CREATE_SERVICE.unwrap)(Reply::CreateService(pb::ServiceResponse {
            service: None,
        }));
        assert_eq!(reply, Some(pb::ServiceResponse { service: None }));
        assert_eq!(
            (forward::UPDATE_SERVICE.unwrap)(Reply::CreateService(Default::default())),
            None
        );
    }

    /// A forwarded caller passes the leader's check exactly when the method's policy admits
    /// its role: managers everywhere, admins but not where only managers may, workers nowhere.
    #[test]
    fn forwarded_callers_are_checked_against_the_policy() {
        let admits = |write: crate::net::Method, role| write.policy.allow.admits(Some(role));
        for method in control_methods().filter(|m| m.policy.forward) {
            assert!(admits(method, Role::Manager), "{}", method.name);
            assert!(!admits(method, Role::Worker), "{}", method.name);
            let manager_only = [REPORT_MANAGER, PUBLISH_ROOT_CA].contains(&method.name);
            assert_eq!(
                admits(method, Role::Admin),
                !manager_only,
                "{}",
                method.name
            );
        }
    }
}
