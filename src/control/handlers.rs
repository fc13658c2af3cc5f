//! The leader's side of every control write: read the local store, build one transaction,
//! propose it, answer with the object as written.
//!
//! No thread waits for a write to commit. A write runs in steps, each on a control pool
//! thread: its checks read the local store and decide ([`Prepared`]); the transaction is
//! proposed with a completion callback ([`propose_transaction_with`]); when it is applied
//! here, the Raft thread hands the rest back to the pool ([`crate::net::Continuations`]),
//! which builds the reply from the outcome and answers ([`Done`]).
//!
//! Exactly once ([`once`]): a write that carries a request id is answered from the store's
//! table of answers when that request was answered before (its first attempt committed,
//! and the client retried after losing the reply), before any of the write's own checks;
//! and a refusal by those checks is given only once the local store has caught up with the
//! log (a read barrier, waited for without a thread) and still shows no answer for the
//! request, and the write's checks, run again on it, refuse again. A retried
//! `update --if-version N` thus gets its first attempt's success, never a conflict with its
//! own write.
//!
//! Runs only on the leader (the caller checked). Must never write the store directly, nor
//! block a thread on a proposal or a read barrier.

mod secret_writes;

use std::sync::Arc;

use super::answer::Done;
use super::reads::{resolve_network, resolve_node, resolve_service, the_cluster};
use super::{Caller, ControlApi};
use crate::ca::{JoinToken, JoinTokens, Role};
use crate::proto::control as pb;
use crate::proto::control::forward_request::Call;
use crate::proto::control::forward_response::Reply;
use crate::proto::control::rpc::forward;
use crate::proto::objects::{
    Change, Cluster, ManagerStatus, Meta, Network, NetworkAttachment, Node, NodeAvailability,
    NodeRole, NodeSpec, NodeState, NodeStatus, RequestId, Service, ServiceSpec, Task, TaskState,
    Transaction, UpdateState, UpdateStatus,
};
use crate::replication::{PROPOSE_TIMEOUT, propose_transaction_with};
use crate::store::answers::{Answer, Lookup, Recorded};
use crate::store::spec::{
    validate_cluster_spec, validate_network_spec, validate_node_spec, validate_service_spec,
};
use crate::store::{Kind, Record, create, delete, update_expecting};
use crate::wire::{Code, Status, WriteFate};

/// Characters of a generated object id ([`crate::util::id`], like swarmkit's).
pub const OBJECT_ID_CHARS: usize = crate::util::id::ID_CHARS;

pub(super) use crate::util::clock::unix_now_ms as now_ms;

/// `done` for a reply of type `A`, given as the [`Reply`] variant `wrap`.
fn wrapped<A: 'static>(done: Done<Reply>, wrap: fn(A) -> Reply) -> Done<A> {
    Box::new(move |result| done(result.map(wrap)))
}

/// What a committed transaction wrote: the version (its log index) and the timestamp it
/// carried, from which the store stamped every object it wrote ([`as_written`]).
#[derive(Clone, Copy, Debug)]
pub(super) struct Applied {
    version: u64,
    timestamp_ms: i64,
}

/// Builds the reply once the transaction was applied here, from its outcome.
type AnswerFn<Resp> =
    Box<dyn FnOnce(&ControlApi, Result<Applied, Status>) -> Result<Resp, Status> + Send>;

/// What a write's checks decided.
pub(super) enum Prepared<Resp> {
    /// Nothing to write: the answer is known (the same request again, a revocation already
    /// in place).
    Answered(Resp),
    /// Propose `changes` as one transaction; `answer` builds the reply from its outcome.
    Propose {
        changes: Vec<Change>,
        answer: AnswerFn<Resp>,
    },
}

impl<Resp: 'static> Prepared<Resp> {
    /// Proposes `changes`; once applied, answers with `reply(applied)`; a refusal is the
    /// answer as it is.
    fn then(
        changes: Vec<Change>,
        reply: impl FnOnce(Applied) -> Resp + Send + 'static,
    ) -> Prepared<Resp> {
        Prepared::Propose {
            changes,
            answer: Box::new(move |_, applied| applied.map(reply)),
        }
    }
}

/// `object` as the store wrote it in the transaction `applied` (what it holds right after
/// that transaction, stamped as [`crate::store`] stamps every write): `created_at_ms` is
/// the stored object's for an update, the transaction's time for a create.
fn as_written<T: Record>(mut object: T, applied: Applied, created_at_ms: Option<i64>) -> T {
    object.set_meta(Meta {
        version: applied.version,
        created_at_ms: created_at_ms.unwrap_or(applied.timestamp_ms),
        updated_at_ms: applied.timestamp_ms,
    });
    object
}

/// The creation time of `object` as stored, for [`as_written`] after an update of it.
fn created_at_ms<T: Record>(object: &T) -> Option<i64> {
    object.meta().map(|meta| meta.created_at_ms)
}

/// Runs the forwarded or local write `call` as `caller`; `done` gets the reply. The caller
/// made sure this manager leads. The match is exhaustive: every forwardable write has its
/// handler.
///
/// The write's refusal goes to `done`: invalid spec (`InvalidArgument`, naming the field),
/// unknown id (`NotFound`), stale version (`Aborted`), or the proposal's failure.
pub(super) fn execute(api: &Arc<ControlApi>, caller: &Caller, call: Call, done: Done<Reply>) {
    let method = forward::method_of(&call).name;
    match &caller.forwarded_by {
        Some(forwarder) => log::info!(
            "{method} by node {} ({:?}) forwarded by {forwarder}",
            caller.node_id,
            caller.role
        ),
        None => log::debug!("{method} by node {} ({:?})", caller.node_id, caller.role),
    }
    match call {
        Call::CreateService(r) => once(
            api,
            r,
            service_reply,
            create_service,
            wrapped(done, Reply::CreateService),
        ),
        Call::UpdateService(r) => once(
            api,
            r,
            service_reply,
            update_service,
            wrapped(done, Reply::UpdateService),
        ),
        Call::RemoveService(r) => once(
            api,
            r,
            removal_reply,
            remove_service,
            wrapped(done, Reply::RemoveService),
        ),
        Call::UpdateNode(r) => once(
            api,
            r,
            node_reply,
            update_node,
            wrapped(done, Reply::UpdateNode),
        ),
        Call::RemoveNode(r) => once(
            api,
            r,
            removal_reply,
            remove_node,
            wrapped(done, Reply::RemoveNode),
        ),
        Call::ReportManager(r) => run(
            api,
            None,
            report_manager(api, caller, r),
            wrapped(done, Reply::ReportManager),
        ),
        Call::UpdateCluster(r) => once(
            api,
            r,
            cluster_reply,
            update_cluster,
            wrapped(done, Reply::UpdateCluster),
        ),
        Call::RotateJoinToken(r) => once(
            api,
            r,
            tokens_reply,
            rotate_join_token,
            wrapped(done, Reply::RotateJoinToken),
        ),
        Call::IssueAdminCertificate(r) => {
            done(super::admin::issue_here(api, caller, r).map(Reply::IssueAdminCertificate));
        }
        Call::RevokeAdminCertificate(r) => once(
            api,
            r,
            |_, _| Ok(pb::RevokeAdminCertificateResponse {}),
            revoke_admin,
            wrapped(done, Reply::RevokeAdminCertificate),
        ),
        Call::PublishRootCa(r) => run(
            api,
            None,
            publish_root_ca(api, caller, r),
            wrapped(done, Reply::PublishRootCa),
        ),
        Call::RevokeRemovedManager(r) => run(
            api,
            None,
            revoke_removed_manager(api, &r),
            wrapped(done, Reply::RevokeRemovedManager),
        ),
        Call::CreateNetwork(r) => once(
            api,
            r,
            network_reply,
            create_network,
            wrapped(done, Reply::CreateNetwork),
        ),
        Call::RemoveNetwork(r) => once(
            api,
            r,
            removal_reply,
            remove_network,
            wrapped(done, Reply::RemoveNetwork),
        ),
        Call::CreateSecret(r) => once(
            api,
            r,
            secret_writes::secret_reply,
            secret_writes::create_secret,
            wrapped(done, Reply::CreateSecret),
        ),
        Call::RemoveSecret(r) => once(
            api,
            r,
            removal_reply,
            secret_writes::remove_secret,
            wrapped(done, Reply::RemoveSecret),
        ),
        Call::CreateConfig(r) => once(
            api,
            r,
            secret_writes::config_reply,
            secret_writes::create_config,
            wrapped(done, Reply::CreateConfig),
        ),
        Call::RemoveConfig(r) => once(
            api,
            r,
            removal_reply,
            secret_writes::remove_config,
            wrapped(done, Reply::RemoveConfig),
        ),
    }
}

/// Carries out what a write's checks decided: answers at once, or proposes the
/// transaction (on behalf of `request_id`, if the client sent one: the store records its
/// answer and answers a repeat with it) and answers once it is applied here. No thread
/// waits meanwhile: the reply is built on the control pool.
fn run<Resp: Send + 'static>(
    api: &Arc<ControlApi>,
    request_id: Option<RequestId>,
    prepared: Result<Prepared<Resp>, Status>,
    done: Done<Resp>,
) {
    let (changes, answer) = match prepared {
        Err(refusal) => return done(Err(refusal)),
        Ok(Prepared::Answered(reply)) => return done(Ok(reply)),
        Ok(Prepared::Propose { changes, answer }) => (changes, answer),
    };
    let txn = Transaction {
        changes,
        timestamp_ms: now_ms(),
        request_id,
    };
    let timestamp_ms = txn.timestamp_ms;
    let api_after = Arc::clone(api);
    propose_transaction_with(
        &api.node,
        &txn,
        Box::new(move |outcome| {
            // On the Raft or apply thread (or here, refused at once): the reply is built on
            // the pool, never there.
            let continuations = api_after.continuations.clone();
            continuations.run(move || {
                let applied = outcome.map(|version| Applied {
                    version,
                    timestamp_ms,
                });
                done(answer(&api_after, applied));
            });
        }),
    );
}

/// A control write that may carry a request id (see [`once`]).
trait Requested: Clone {
    fn request_id(&self) -> Option<&RequestId>;
}

macro_rules! requested {
    ($($request:ty),*) => {$(
        impl Requested for $request {
            fn request_id(&self) -> Option<&RequestId> {
                self.request_id.as_ref()
            }
        }
    )*};
}

requested!(
    pb::CreateServiceRequest,
    pb::UpdateServiceRequest,
    pb::RemoveServiceRequest,
    pb::UpdateNodeRequest,
    pb::RemoveNodeRequest,
    pb::UpdateClusterRequest,
    pb::RotateJoinTokenRequest,
    pb::RevokeAdminCertificateRequest,
    pb::CreateNetworkRequest,
    pb::RemoveNetworkRequest,
    pb::CreateSecretRequest,
    pb::RemoveSecretRequest,
    pb::CreateConfigRequest,
    pb::RemoveConfigRequest
);

/// What the table of answers holds for `id`, read from the local store.
///
/// # Errors
/// `Unknown` with [`crate::wire::Reason::OutcomeUnknown`] when the client has sent a later
/// request since (this one's answer is no longer kept).
fn recorded_answer(api: &ControlApi, id: &RequestId) -> Result<Option<Recorded>, Status> {
    api.store
        .view(|view| match view.answer(&id.client_id, id.seq) {
            Lookup::New => Ok(None),
            Lookup::Repeat(recorded) => Ok(Some(recorded.clone())),
            Lookup::Superseded { latest_seq } => Err(Status::outcome_unknown(
                Code::Unknown,
                format!(
                    "request {} was followed by request {latest_seq} of the same client; its \
                    answer is no longer kept: read the object to see whether it took effect",
                    id.seq
                ),
            )),
        })
}

/// Rebuilds the reply a recorded request got from the store (`Recorded` holds the object's
/// id, not the object).
type ReplyFn<Resp> = fn(&ControlApi, &Recorded) -> Result<Resp, Status>;
/// A write's checks: what to propose, or the refusal.
type PrepareFn<Req, Resp> = fn(&ControlApi, Req) -> Result<Prepared<Resp>, Status>;

/// The answer recorded for a request, as the reply its first attempt got.
fn replay<Resp>(
    api: &ControlApi,
    recorded: &Recorded,
    reply: ReplyFn<Resp>,
) -> Result<Resp, Status> {
    log::info!(
        "answering a repeated request (seq {}) with its first answer from log index {}",
        recorded.seq,
        recorded.index
    );
    match &recorded.answer {
        Answer::Written { .. } => reply(api, recorded),
        Answer::Refused { code, message } => Err(Status::new(*code, message.clone())),
    }
}

/// Runs the write `prepare` exactly once per request id: a request answered before gets
/// that answer (`reply` rebuilds it from the store); a refusal is given only after the
/// local store caught up with the log (a read barrier) and still holds no answer for the
/// request, and the write's checks, run again on it, refuse again. (The local store may lag
/// the log on a new leader, or apply the request's first attempt between the answer lookup
/// and the checks.) Without a request id, the write runs as is.
fn once<Req, Resp>(
    api: &Arc<ControlApi>,
    request: Req,
    reply: ReplyFn<Resp>,
    prepare: PrepareFn<Req, Resp>,
    done: Done<Resp>,
) where
    Req: Requested + Send + 'static,
    Resp: Send + 'static,
{
    let Some(id) = request.request_id().cloned() else {
        return run(api, None, prepare(api, request), done);
    };
    match recorded_answer(api, &id) {
        Err(status) => return done(Err(status)),
        Ok(Some(recorded)) => return done(replay(api, &recorded, reply)),
        Ok(None) => {}
    }
    let first = prepare(api, request.clone());
    let proposed_for = Some(id.clone());
    let api_after = Arc::clone(api);
    let first_done: Done<Resp> = Box::new(move |result| match result {
        Err(refusal) if refusal.write_fate() == WriteFate::Refused => {
            recheck(&api_after, id, request, reply, prepare, done);
        }
        other => done(other),
    });
    run(api, proposed_for, first, first_done);
}

/// The second look at a refused request `id`: once the local store has applied everything
/// the leader committed before now (the read barrier, continued on the pool), its recorded
/// answer if it has one, else the checks again, whose outcome is final.
fn recheck<Req, Resp>(
    api: &Arc<ControlApi>,
    id: RequestId,
    request: Req,
    reply: ReplyFn<Resp>,
    prepare: PrepareFn<Req, Resp>,
    done: Done<Resp>,
) where
    Req: Requested + Send + 'static,
    Resp: Send + 'static,
{
    let api_after = Arc::clone(api);
    api.node.read_barrier_local_with(Box::new(move |barrier| {
        let continuations = api_after.continuations.clone();
        continuations.run(move || {
            if let Err(error) = barrier {
                return done(Err(error.to_status()));
            }
            match recorded_answer(&api_after, &id) {
                Err(status) => done(Err(status)),
                Ok(Some(recorded)) => done(replay(&api_after, &recorded, reply)),
                Ok(None) => {
                    let again = prepare(&api_after, request);
                    run(&api_after, Some(id), again, done);
                }
            }
        });
    }));
}

/// The reply to a repeated service write: the service as it is now.
fn service_reply(api: &ControlApi, recorded: &Recorded) -> Result<pb::ServiceResponse, Status> {
    let stub = |id| Service {
        id,
        ..Default::default()
    };
    Ok(pb::ServiceResponse {
        service: Some(recorded_object(api, recorded, stub)),
    })
}

/// The reply to a repeated node update: the node as it is now.
fn node_reply(api: &ControlApi, recorded: &Recorded) -> Result<pb::NodeResponse, Status> {
    let stub = |id| Node {
        id,
        ..Default::default()
    };
    Ok(pb::NodeResponse {
        node: Some(recorded_object(api, recorded, stub)),
    })
}

/// The reply to a repeated removal: the id removed.
fn removal_reply(_: &ControlApi, recorded: &Recorded) -> Result<pb::RemoveResponse, Status> {
    Ok(pb::RemoveResponse {
        id: recorded.object_id.clone(),
    })
}

/// The reply to a repeated cluster update: the cluster as it is now, without its key.
fn cluster_reply(api: &ControlApi, recorded: &Recorded) -> Result<pb::ClusterResponse, Status> {
    let stub = |id| Cluster {
        id,
        ..Default::default()
    };
    let mut cluster = recorded_object(api, recorded, stub);
    super::redact_cluster(&mut cluster);
    Ok(pb::ClusterResponse {
        cluster: Some(cluster),
    })
}

/// The reply to a repeated token rotation: the cluster's tokens now (also synced here, as
/// the first attempt's leader did before it answered).
fn tokens_reply(api: &ControlApi, _: &Recorded) -> Result<pb::JoinTokensResponse, Status> {
    let tokens = cluster_tokens(api.store.view(the_cluster)?.as_ref())?;
    super::duties::sync_tokens(api, &tokens);
    Ok(pb::JoinTokensResponse {
        tokens: Some(tokens_to_proto(&tokens)),
    })
}

/// The object a recorded request wrote, as it is now; if it was removed since, `stub(id)`
/// stamped with the version the request wrote (the request did happen: the reply must not
/// say otherwise).
fn recorded_object<T: Record>(api: &ControlApi, recorded: &Recorded, stub: fn(String) -> T) -> T {
    if let Some(object) = api.store.get::<T>(&recorded.object_id) {
        return object.as_ref().clone();
    }
    log::info!(
        "{} written by request {} was removed since; answering with its id",
        recorded.object_id,
        recorded.seq
    );
    let applied = Applied {
        version: recorded.index,
        timestamp_ms: recorded.timestamp_ms,
    };
    as_written(stub(recorded.object_id.clone()), applied, None)
}

fn spec_error(error: &crate::store::spec::SpecError) -> Status {
    Status::new(error.code(), error.to_string())
}

fn stale(kind: &str, id: &str, read: u64, now: u64) -> Status {
    Status::new(
        Code::Aborted,
        format!(
            "version conflict: {kind} {id} changed since version {read} (now {now}); read it \
             again and retry"
        ),
    )
}

/// Whether `id` has the form of the ids this module generates (a client may choose one).
fn is_object_id(id: &str) -> bool {
    id.len() == OBJECT_ID_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// A create whose id exists: the same request again (its first attempt committed) when the
/// spec is identical, else a refusal that says why.
fn create_again(existing: &Service, spec: &ServiceSpec) -> Result<pb::ServiceResponse, Status> {
    if existing.spec.as_ref() == Some(spec) {
        log::info!(
            "control.CreateService: service {} already created by this request; answering \
             with it",
            existing.id
        );
        return Ok(pb::ServiceResponse {
            service: Some(existing.clone()),
        });
    }
    Err(Status::new(
        Code::AlreadyExists,
        format!(
            "service {} already exists with another spec (it was changed since, or the id was \
             reused); create with a new id, or change it with `flotilla service update {}`",
            existing.id, existing.id
        ),
    ))
}

/// Creates a service. Idempotent per request: the client may choose the id once and send
/// the same request again after an unknown outcome; the retry answers with the service the
/// first attempt made (identical spec) instead of failing on its own name.
fn create_service(
    api: &ControlApi,
    request: pb::CreateServiceRequest,
) -> Result<Prepared<pb::ServiceResponse>, Status> {
    let spec = request
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
    validate_service_spec(&spec).map_err(|e| spec_error(&e))?;
    let spec = with_attachments(api, spec)?;
    let spec = secret_writes::with_secrets(api, spec)?;
    let id = chosen_or_new_id(request.id)?;
    if let Some(existing) = api.store.get::<Service>(&id) {
        return create_again(&existing, &spec).map(Prepared::Answered);
    }
    let service = Service {
        id: id.clone(),
        spec: Some(spec.clone()),
        ..Default::default()
    };
    Ok(Prepared::Propose {
        changes: vec![create(service.clone())],
        answer: Box::new(move |api, applied| match applied {
            Ok(applied) => Ok(pb::ServiceResponse {
                service: Some(as_written(service, applied, None)),
            }),
            // A concurrent attempt of the same request (a retry racing its first attempt)
            // committed first: answer as that attempt would.
            Err(status) if status.code == Code::AlreadyExists => {
                match api.store.get::<Service>(&id) {
                    Some(existing) => create_again(&existing, &spec),
                    None => Err(status),
                }
            }
            Err(status) => Err(status),
        }),
    })
}

fn update_service(
    api: &ControlApi,
    request: pb::UpdateServiceRequest,
) -> Result<Prepared<pb::ServiceResponse>, Status> {
    let current = api
        .store
        .view(|view| resolve_service(view, &request.reference))?;
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    if request.version != version {
        return Err(stale("service", &current.id, request.version, version));
    }
    let mut service = current.as_ref().clone();
    if request.rollback {
        roll_back(&mut service, request.spec.is_some())?;
    } else {
        let spec = request
            .spec
            .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
        validate_service_spec(&spec).map_err(|e| spec_error(&e))?;
        let spec = with_attachments(api, spec)?;
        let spec = secret_writes::with_secrets(api, spec)?;
        // The same spec again (a paused update resumed) keeps the rollback target.
        if service.spec.as_ref() != Some(&spec) {
            service.previous_spec = service.spec.replace(spec);
        }
        // A new update starts from nothing: the orchestrator's supervisor takes it from here,
        // and a paused one resumes.
        service.update_status = None;
    }
    let created = created_at_ms(current.as_ref());
    Ok(Prepared::then(
        vec![update_expecting(service.clone(), request.version)],
        move |applied| pb::ServiceResponse {
            service: Some(as_written(service, applied, created)),
        },
    ))
}

/// `service rollback`: the previous spec becomes the spec (and the spec the previous one),
/// and the orchestrator's update supervisor rolls the tasks back with the rollback config.
///
/// # Errors
/// `InvalidArgument` if a spec came with the request, `FailedPrecondition` if the service
/// has no previous spec.
fn roll_back(service: &mut Service, spec_given: bool) -> Result<(), Status> {
    if spec_given {
        return Err(Status::invalid_argument(
            "a rollback takes no spec: it returns to the previous one",
        ));
    }
    let Some(previous) = service.previous_spec.take() else {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "service {} has no previous spec to roll back to (it was never updated, or an \
                 automatic rollback already returned to it)",
                service.id
            ),
        ));
    };
    service.previous_spec = service.spec.replace(previous);
    service.update_status = Some(UpdateStatus {
        state: UpdateState::RollbackStarted as i32,
        started_at_ms: now_ms(),
        completed_at_ms: 0,
        message: "manually requested rollback".into(),
    });
    Ok(())
}

fn remove_service(
    api: &ControlApi,
    request: pb::RemoveServiceRequest,
) -> Result<Prepared<pb::RemoveResponse>, Status> {
    let current = api
        .store
        .view(|view| resolve_service(view, &request.reference))?;
    // The service's tasks stay: the orchestrator asks them to be removed (desired REMOVE,
    // so their agents stop them) and the reaper deletes them once finished.
    let id = current.id.clone();
    Ok(Prepared::then(
        vec![delete(Kind::Service, id.clone(), 0)],
        move |_| pb::RemoveResponse { id },
    ))
}

/// `spec` with its networks resolved (each reference, an id, a name or a unique id prefix,
/// becomes the network's id) and its task template told which networks its tasks attach to
/// and the service's name (what their endpoints carry).
///
/// # Errors
/// `NotFound` naming the unknown network and how to list or create networks.
fn with_attachments(api: &ControlApi, mut spec: ServiceSpec) -> Result<ServiceSpec, Status> {
    let networks: Vec<std::sync::Arc<Network>> = api.store.view(|view| {
        spec.networks
            .iter()
            .map(|reference| {
                resolve_network(view, reference).map_err(|refusal| {
                    Status::new(
                        refusal.code,
                        format!(
                            "--network {reference}: {}; create it with `flotilla network \
                             create {reference}`",
                            refusal.message
                        ),
                    )
                })
            })
            .collect::<Result<_, Status>>()
    })?;
    spec.networks = networks.iter().map(|n| n.id.clone()).collect();
    if let Some(index) =
        (1..spec.networks.len()).find(|i| spec.networks[..*i].contains(&spec.networks[*i]))
    {
        return Err(Status::invalid_argument(format!(
            "invalid spec: networks[{index}]: network {} is named twice",
            spec.networks[index]
        )));
    }
    let name = spec.name.clone();
    let task = spec.task.get_or_insert_with(Default::default);
    task.networks = networks
        .iter()
        .map(|n| NetworkAttachment {
            id: n.id.clone(),
            name: n.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
        })
        .collect();
    task.service_name = if task.networks.is_empty() {
        String::new()
    } else {
        name
    };
    Ok(spec)
}

/// The reply to a repeated network create: the network as it is now.
fn network_reply(api: &ControlApi, recorded: &Recorded) -> Result<pb::NetworkResponse, Status> {
    let stub = |id| Network {
        id,
        ..Default::default()
    };
    Ok(pb::NetworkResponse {
        network: Some(recorded_object(api, recorded, stub)),
    })
}

/// Creates a network. Idempotent per request as [`create_service`]: a retry of a create
/// whose first attempt committed answers with the network it made.
fn create_network(
    api: &ControlApi,
    request: pb::CreateNetworkRequest,
) -> Result<Prepared<pb::NetworkResponse>, Status> {
    let mut spec = request
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
    if spec.driver.is_empty() {
        spec.driver = crate::store::spec::NETWORK_DRIVER_DEFAULT.to_string();
    }
    validate_network_spec(&spec).map_err(|e| spec_error(&e))?;
    let id = chosen_or_new_id(request.id)?;
    if let Some(existing) = api.store.get::<Network>(&id) {
        if existing.spec.as_ref() == Some(&spec) {
            return Ok(Prepared::Answered(pb::NetworkResponse {
                network: Some(existing.as_ref().clone()),
            }));
        }
        return Err(Status::new(
            Code::AlreadyExists,
            format!("network {id} already exists with another spec; create with a new id"),
        ));
    }
    if let Some(holder) = api
        .store
        .view(|view| view.get_by_name::<Network>(&spec.name).cloned())
    {
        return Err(Status::new(
            Code::AlreadyExists,
            format!(
                "network name {:?} is taken by network {}; choose another name, or remove it \
                 first (`flotilla network rm {}`)",
                spec.name, holder.id, spec.name
            ),
        ));
    }
    let network = Network {
        id,
        spec: Some(spec),
        ..Default::default()
    };
    Ok(Prepared::then(
        vec![create(network.clone())],
        move |applied| pb::NetworkResponse {
            network: Some(as_written(network, applied, None)),
        },
    ))
}

/// Removes a network, refused while a service names it or a task attached to it has not
/// finished (its endpoints would dangle).
fn remove_network(
    api: &ControlApi,
    request: pb::RemoveNetworkRequest,
) -> Result<Prepared<pb::RemoveResponse>, Status> {
    let (current, users, attached_tasks) = api.store.view(|view| {
        let current = resolve_network(view, &request.reference)?;
        let users: Vec<String> = view
            .list::<Service>()
            .filter(|s| {
                s.spec
                    .as_ref()
                    .is_some_and(|spec| spec.networks.contains(&current.id))
            })
            .map(|s| {
                s.spec
                    .as_ref()
                    .map_or_else(|| s.id.clone(), |spec| spec.name.clone())
            })
            .collect();
        let attached_tasks = view
            .list::<Task>()
            .filter(|t| task_uses_network(t, &current.id))
            .count();
        Ok::<_, Status>((current, users, attached_tasks))
    })?;
    let name = current.spec.as_ref().map_or("", |s| s.name.as_str());
    if !users.is_empty() {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "network {name} is in use by service(s) {}; remove them, or give them \
                 other networks first (`flotilla service update SERVICE --network OTHER`, or \
                 `--no-networks`)",
                users.join(", ")
            ),
        ));
    }
    if attached_tasks > 0 {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "network {name} still has {attached_tasks} task(s) attached that have not \
                 finished; retry once they stopped (`flotilla task ls`)"
            ),
        ));
    }
    let id = current.id.clone();
    Ok(Prepared::then(
        vec![delete(Kind::Network, id.clone(), 0)],
        move |_| pb::RemoveResponse { id },
    ))
}

/// True if `task` is attached to network `id` and has not finished.
fn task_uses_network(task: &Task, id: &str) -> bool {
    let observed = task.status.as_ref().map_or(0, |s| s.state);
    // Finished, or asked to stop before any node took it (it never runs).
    let finished = observed >= TaskState::Complete as i32
        || (task.desired_state > TaskState::Running as i32
            && observed < TaskState::Assigned as i32);
    !finished
        && task
            .spec
            .as_ref()
            .is_some_and(|spec| spec.networks.iter().any(|n| n.id == id))
}

fn update_node(
    api: &ControlApi,
    request: pb::UpdateNodeRequest,
) -> Result<Prepared<pb::NodeResponse>, Status> {
    let current = api
        .store
        .view(|view| resolve_node(view, &request.reference))?;
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    if request.version != version {
        return Err(stale("node", &current.id, request.version, version));
    }
    let spec = request
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
    validate_node_spec(&spec).map_err(|e| spec_error(&e))?;
    let was_worker = current
        .spec
        .as_ref()
        .is_some_and(|s| s.desired_role == NodeRole::Worker as i32);
    if spec.desired_role == NodeRole::Worker as i32 && !was_worker {
        refuse_unsafe_demotion(api, &current)?;
    }
    let mut node = current.as_ref().clone();
    node.spec = Some(spec);
    let created = created_at_ms(current.as_ref());
    Ok(Prepared::then(
        vec![update_expecting(node.clone(), request.version)],
        move |applied| pb::NodeResponse {
            node: Some(as_written(node, applied, created)),
        },
    ))
}

/// A demotion that would cost the managers their quorum (or their last member) is refused
/// up front, counting the demotions already pending; one that becomes unsafe later waits in
/// the role reconciler.
fn refuse_unsafe_demotion(api: &ControlApi, node: &Node) -> Result<(), Status> {
    let Some(raft_id) = node.manager_status.as_ref().map(|m| m.raft_id) else {
        return Ok(());
    };
    if node.role != NodeRole::Manager as i32 {
        return Ok(());
    }
    let status = api
        .node
        .status(PROPOSE_TIMEOUT)
        .map_err(|e| e.to_status())?;
    if !status.members.iter().any(|m| m.id == raft_id) {
        return Ok(());
    }
    let mut leaving = super::roles::demoting_raft_ids(&api.store);
    leaving.push(raft_id);
    let refuse = |message: String| Err(Status::new(Code::FailedPrecondition, message));
    match crate::raft::node::service::removal_keeps_quorum(&status, &leaving) {
        Ok(()) => Ok(()),
        Err(shortfall) if shortfall.voters == 0 => refuse(format!(
            "can't demote node {}: it is the last manager{}; join another manager first \
             (`flotilla join-token manager` prints the token)",
            node.id,
            if leaving.len() > 1 {
                " not already being demoted"
            } else {
                ""
            }
        )),
        Err(shortfall) => refuse(format!(
            "can't demote node {}: would lose quorum: {} of the {} managers that would remain \
             are reachable and a quorum needs {}; bring managers back first (`flotilla \
             manager ls` shows them)",
            node.id, shortfall.reachable, shortfall.voters, shortfall.quorum
        )),
    }
}

fn remove_node(
    api: &ControlApi,
    request: pb::RemoveNodeRequest,
) -> Result<Prepared<pb::RemoveResponse>, Status> {
    let current = api
        .store
        .view(|view| resolve_node(view, &request.reference))?;
    let raft_id = current.manager_status.as_ref().map(|m| m.raft_id);
    let still_member = match raft_id {
        None => false,
        Some(raft_id) => api
            .node
            .status(PROPOSE_TIMEOUT)
            .map_err(|e| e.to_status())?
            .members
            .iter()
            .any(|m| m.id == raft_id),
    };
    if current.role == NodeRole::Manager as i32 && still_member {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "node {} is a manager; demote it first (`flotilla node demote {}`) or remove \
                 it from the Raft group (`flotilla manager rm`)",
                current.id, current.id
            ),
        ));
    }
    // A manager's status comes from its own report, not from a session: once it left
    // the Raft group it is stale, and the node may go.
    let ready = current.role != NodeRole::Manager as i32
        && current
            .status
            .as_ref()
            .is_some_and(|s| s.state == NodeState::Ready as i32);
    if ready && !request.force {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "node {} is up; stop it first, or remove it anyway with --force",
                current.id
            ),
        ));
    }
    let mut changes = vec![delete(Kind::Node, current.id.clone(), 0)];
    // Its certificate stays valid until it expires: revoke it cluster-wide in the same
    // transaction, so the node is never gone while its certificate still works.
    changes.extend(revocation(
        api,
        &current.id,
        REASON_NODE_REMOVED,
        node_cert_lifetime(),
    )?);
    let id = current.id.clone();
    Ok(Prepared::then(changes, move |_| pb::RemoveResponse { id }))
}

/// Why a node's certificate was revoked by `node rm`.
pub const REASON_NODE_REMOVED: &str = "node removed";
/// Why a manager's certificate was revoked by `manager rm`.
pub const REASON_MANAGER_REMOVED: &str = "manager removed from the Raft group";
/// Why an admin certificate was revoked.
pub const REASON_ADMIN_REVOKED: &str = "admin certificate revoked";
/// Revoked identities the Cluster object keeps at most (entries leave when every
/// certificate they could cover has expired).
pub const REVOKED_CERTIFICATES_MAX: usize = 10_000;

/// The longest a removed node's certificate may still be valid: it was renewed at most
/// just now (removed nodes are refused renewal from then on).
fn node_cert_lifetime() -> std::time::Duration {
    crate::ca::NODE_CERT_VALIDITY_DEFAULT + crate::ca::CERT_BACKDATE
}

fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The change that adds `id` to the Cluster object's revoked certificates (dropping
/// expired entries), or nothing if it is already there.
///
/// # Errors
/// `Unavailable` without a cluster object; `ResourceExhausted` past
/// [`REVOKED_CERTIFICATES_MAX`].
fn revocation(
    api: &ControlApi,
    id: &str,
    reason: &str,
    lifetime: std::time::Duration,
) -> Result<Option<Change>, Status> {
    let current = api.store.view(the_cluster)?;
    if current.revoked_certificates.iter().any(|r| r.id == id) {
        return Ok(None);
    }
    let now = now_ms();
    let mut cluster = current.as_ref().clone();
    cluster
        .revoked_certificates
        .retain(|r| r.expires_at_ms > now);
    if cluster.revoked_certificates.len() >= REVOKED_CERTIFICATES_MAX {
        return Err(Status::resource_exhausted(format!(
            "the cluster already keeps {REVOKED_CERTIFICATES_MAX} revoked certificates; they \
             leave as they expire"
        )));
    }
    cluster
        .revoked_certificates
        .push(crate::proto::objects::RevokedCertificate {
            id: id.to_string(),
            reason: reason.to_string(),
            revoked_at_ms: now,
            expires_at_ms: now.saturating_add(duration_ms(lifetime)),
        });
    log::info!("revoking the certificate of {id} cluster-wide: {reason}");
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    Ok(Some(update_expecting(cluster, version)))
}

/// `control.RevokeAdminCertificate`: refuses the admin certificate `id` cluster-wide.
fn revoke_admin(
    api: &ControlApi,
    request: pb::RevokeAdminCertificateRequest,
) -> Result<Prepared<pb::RevokeAdminCertificateResponse>, Status> {
    if !crate::ca::is_valid_id(&request.id) {
        return Err(Status::invalid_argument(format!(
            "id: {:?} is not a certificate id (the id `admin-cert issue` printed)",
            request.id
        )));
    }
    if api.store.get::<Node>(&request.id).is_some() {
        return Err(Status::invalid_argument(format!(
            "{} is a node, not an admin certificate; remove a node with `flotilla node rm`",
            request.id
        )));
    }
    let lifetime = super::admin::ADMIN_CERT_VALIDITY_MAX + crate::ca::CERT_BACKDATE;
    Ok(
        match revocation(api, &request.id, REASON_ADMIN_REVOKED, lifetime)? {
            Some(change) => Prepared::then(vec![change], |_| pb::RevokeAdminCertificateResponse {}),
            None => Prepared::Answered(pb::RevokeAdminCertificateResponse {}),
        },
    )
}

/// Records the node of a manager just removed from the Raft group as revoked (run by the
/// leader on behalf of whichever manager served `control.RemoveManager`).
fn revoke_removed_manager(
    api: &ControlApi,
    request: &pb::RemoveManagerRequest,
) -> Result<Prepared<pb::ManagersResponse>, Status> {
    let members = api
        .node
        .status(PROPOSE_TIMEOUT)
        .map_err(|e| e.to_status())?
        .members;
    if members.iter().any(|m| m.id == request.raft_id) {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "raft id {:x} is still a member; remove it first",
                request.raft_id
            ),
        ));
    }
    let node = api.store.view(|view| {
        view.list::<Node>()
            .find(|n| {
                n.manager_status
                    .as_ref()
                    .is_some_and(|m| m.raft_id == request.raft_id)
            })
            .cloned()
    });
    let Some(node) = node else {
        log::warn!(
            "removed raft member {:x} never recorded itself as a node; its certificate cannot \
             be revoked by id",
            request.raft_id
        );
        return Ok(Prepared::Answered(pb::ManagersResponse::default()));
    };
    Ok(
        match revocation(api, &node.id, REASON_MANAGER_REMOVED, node_cert_lifetime())? {
            Some(change) => Prepared::then(vec![change], |_| pb::ManagersResponse::default()),
            None => Prepared::Answered(pb::ManagersResponse::default()),
        },
    )
}

/// `control.PublishRootCa`: the CA key of a cluster created before it was replicated, sent
/// by the manager that holds it on disk. Checked against this manager's own root.
fn publish_root_ca(
    api: &ControlApi,
    caller: &Caller,
    request: pb::PublishRootCaRequest,
) -> Result<Prepared<pb::PublishRootCaResponse>, Status> {
    if caller.role != Role::Manager {
        return Err(Status::permission_denied(
            "only a manager publishes the CA key",
        ));
    }
    let material = request
        .root_ca
        .ok_or_else(|| Status::invalid_argument("root_ca: required"))?;
    let ca = crate::ca::ClusterCa::from_der_parts(
        &material.cert_der,
        &material.key_der,
        crate::ca::CaPolicy::default(),
    )
    .map_err(|e| Status::invalid_argument(format!("root_ca: unusable: {e}")))?;
    if ca.root().digest() != api.root.digest() {
        return Err(Status::invalid_argument(
            "root_ca: not this cluster's root CA",
        ));
    }
    let current = api.store.view(the_cluster)?;
    if current.root_ca.is_some() {
        return Ok(Prepared::Answered(pb::PublishRootCaResponse {}));
    }
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    let mut cluster = current.as_ref().clone();
    cluster.root_ca = Some(material);
    let publisher = caller.node_id.clone();
    Ok(Prepared::then(
        vec![update_expecting(cluster, version)],
        move |_| {
            log::info!(
                "the cluster CA key from node {publisher} is now replicated to every manager"
            );
            pb::PublishRootCaResponse {}
        },
    ))
}

fn report_manager(
    api: &ControlApi,
    caller: &Caller,
    request: pb::ReportManagerRequest,
) -> Result<Prepared<pb::ReportManagerResponse>, Status> {
    if caller.role != Role::Manager {
        return Err(Status::permission_denied("only a manager reports itself"));
    }
    // A manager removed from the group may report once more before it learns it was
    // removed; it must not come back as a node.
    let member = api
        .node
        .status(PROPOSE_TIMEOUT)
        .map_err(|e| e.to_status())?
        .members
        .iter()
        .any(|m| m.id == request.raft_id);
    if !member {
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "raft id {:x} is not a member of the Raft group",
                request.raft_id
            ),
        ));
    }
    let manager_status = ManagerStatus {
        raft_id: request.raft_id,
        addr: request.addr.clone(),
        ..Default::default()
    };
    let change = match api.store.get::<Node>(&caller.node_id) {
        None => create(Node {
            id: caller.node_id.clone(),
            spec: Some(NodeSpec {
                hostname: request.hostname.clone(),
                availability: NodeAvailability::Active as i32,
                desired_role: NodeRole::Manager as i32,
                ..Default::default()
            }),
            status: Some(NodeStatus {
                state: NodeState::Ready as i32,
                addr: request.addr.clone(),
                ..Default::default()
            }),
            role: NodeRole::Manager as i32,
            manager_status: Some(manager_status),
            ..Default::default()
        }),
        Some(node) => {
            let mut node = node.as_ref().clone();
            let version = node.meta.as_ref().map_or(0, |m| m.version);
            node.role = NodeRole::Manager as i32;
            node.manager_status = Some(manager_status);
            let status = node.status.get_or_insert_with(NodeStatus::default);
            status.state = NodeState::Ready as i32;
            status.message.clear();
            status.addr = request.addr.clone();
            update_expecting(node, version)
        }
    };
    Ok(Prepared::then(vec![change], |_| {
        pb::ReportManagerResponse {}
    }))
}

fn update_cluster(
    api: &ControlApi,
    request: pb::UpdateClusterRequest,
) -> Result<Prepared<pb::ClusterResponse>, Status> {
    let current = api.store.view(the_cluster)?;
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    if request.version != version {
        return Err(stale("cluster", &current.id, request.version, version));
    }
    let spec = request
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: spec: required"))?;
    validate_cluster_spec(&spec).map_err(|e| spec_error(&e))?;
    let mut cluster = current.as_ref().clone();
    cluster.spec = Some(spec);
    let created = created_at_ms(current.as_ref());
    Ok(Prepared::then(
        vec![update_expecting(cluster.clone(), request.version)],
        move |applied| {
            let mut written = as_written(cluster, applied, created);
            super::redact_cluster(&mut written);
            pb::ClusterResponse {
                cluster: Some(written),
            }
        },
    ))
}

/// The join tokens held by `cluster`, parsed.
///
/// # Errors
/// `FailedPrecondition` if the cluster holds none or they do not parse.
pub(super) fn cluster_tokens(cluster: &Cluster) -> Result<JoinTokens, Status> {
    let missing = || {
        Status::new(
            Code::FailedPrecondition,
            "the cluster object holds no join tokens; they are added by the founding manager",
        )
    };
    let tokens = cluster.join_tokens.as_ref().ok_or_else(missing)?;
    let manager = JoinToken::parse(&tokens.manager).map_err(|_| missing())?;
    let worker = JoinToken::parse(&tokens.worker).map_err(|_| missing())?;
    JoinTokens::from_tokens(&manager, &worker).map_err(|e| Status::internal(e.to_string()))
}

/// The proto form of `tokens`.
pub(super) fn tokens_to_proto(tokens: &JoinTokens) -> crate::proto::objects::JoinTokens {
    crate::proto::objects::JoinTokens {
        worker: tokens.token(Role::Worker).to_string(),
        manager: tokens.token(Role::Manager).to_string(),
    }
}

fn rotate_join_token(
    api: &ControlApi,
    request: pb::RotateJoinTokenRequest,
) -> Result<Prepared<pb::JoinTokensResponse>, Status> {
    let current = api.store.view(the_cluster)?;
    let version = current.meta.as_ref().map_or(0, |m| m.version);
    let mut tokens = cluster_tokens(&current)?;
    let role = match NodeRole::try_from(request.role) {
        Ok(NodeRole::Manager) => Role::Manager,
        _ => Role::Worker,
    };
    tokens.rotate(role);
    let mut cluster = current.as_ref().clone();
    cluster.join_tokens = Some(tokens_to_proto(&tokens));
    Ok(Prepared::Propose {
        changes: vec![update_expecting(cluster, version)],
        answer: Box::new(move |api, applied| {
            applied?;
            // The duties thread syncs every manager; the leader does it now so that the old
            // token is refused from the moment the caller hears of the new one.
            super::duties::sync_tokens(api, &tokens);
            Ok(pb::JoinTokensResponse {
                tokens: Some(tokens_to_proto(&tokens)),
            })
        }),
    })
}

/// The id a create request chose (checked), or a new one when it chose none. A client
/// chooses it so that every retry of the create names the same object.
///
/// # Errors
/// `InvalidArgument` when `id` is not an object id.
fn chosen_or_new_id(id: String) -> Result<String, Status> {
    if id.is_empty() {
        Ok(crate::util::id::random_id())
    } else if is_object_id(&id) {
        Ok(id)
    } else {
        Err(Status::invalid_argument(format!(
            "id: {id:?} is not an object id ({OBJECT_ID_CHARS} lowercase letters and digits); \
             leave it empty to have one chosen"
        )))
    }
}
