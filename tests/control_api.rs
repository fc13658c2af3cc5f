//! The control API in process, against one real manager: a retried create is idempotent,
//! and who may call what (managers and admin certificates operate; admins never reach
//! Raft, kv, forwarding or node renewal; workers reach no control method).
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flotilla::ca::{
    CaPolicy, ClusterCa, NodeIdentity, PendingIdentity, Role, RootCert, load_node_files, tls,
};
use flotilla::control::{self as api, ISSUE_ADMIN_CERTIFICATE, LIST_MANAGERS};
use flotilla::manager::{self, Manager, Settings, StateDir};
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::control as pb;
use flotilla::proto::objects::{RequestId, ServiceMode, ServiceSpec, TaskSpec};
use flotilla::raft::node::Bootstrap;
use flotilla::wire::{Code, Status};

const CALL: Duration = Duration::from_secs(30);

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: StateDir,
    manager: Option<Manager>,
    addr: String,
    transport: Transport,
    root: RootCert,
}

impl Fixture {
    /// One founding manager, running, with its Cluster object written.
    fn start() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("m1"));
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let settings = Settings {
            raft_id: manager::random_raft_id(),
            listen_addr: addr.clone(),
            advertise_addr: addr.clone(),
            bootstrap: Bootstrap::NewCluster,
            join_addr: None,
            snapshot_interval_entries: None,
            log_memtable_mib: None,
            tasks_running_max: None,
            // Served, so that the test sees an admin refused the kv fixture's methods.
            kv_enabled: true,
        };
        manager::init(&dir, &settings).unwrap();
        let manager = Manager::start(&dir).unwrap();
        let (_, root) = load_node_files(&dir.node_dir()).unwrap();
        let fixture = Fixture {
            _tmp: tmp,
            dir,
            manager: Some(manager),
            addr,
            transport: Transport::start(TransportConfig::default()).unwrap(),
            root,
        };
        let manager_tls = fixture.manager_tls();
        let deadline = Instant::now() + CALL;
        // Ready: the Cluster object is written and the leader's address is replicated.
        while fixture
            .call::<_, pb::ClusterResponse>(
                &manager_tls,
                api::GET_CLUSTER,
                &pb::GetClusterRequest {},
            )
            .is_err()
            || fixture
                .call::<_, pb::ManagersResponse>(
                    &manager_tls,
                    LIST_MANAGERS,
                    &pb::ListManagersRequest {},
                )
                .is_err()
        {
            assert!(Instant::now() < deadline, "the manager never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        fixture
    }

    fn manager_tls(&self) -> Arc<rustls::ClientConfig> {
        let (identity, root) = load_node_files(&self.dir.node_dir()).unwrap();
        Arc::new(tls::client_config(&identity, &root).unwrap())
    }

    fn tls_for(&self, identity: &NodeIdentity) -> Arc<rustls::ClientConfig> {
        Arc::new(tls::client_config(identity, &self.root).unwrap())
    }

    /// A worker identity minted with the cluster's CA key (as a join would).
    fn worker(&self) -> NodeIdentity {
        let ca = ClusterCa::load(&self.dir.ca_file(), CaPolicy::default()).unwrap();
        ca.issue_local_identity(Role::Worker, SystemTime::now())
            .unwrap()
    }

    /// An admin certificate asked for over the control API by `tls`'s holder.
    fn admin(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        validity_ms: i64,
    ) -> Result<NodeIdentity, Status> {
        let pending = PendingIdentity::generate().unwrap();
        let reply: pb::IssueAdminCertificateResponse = self.call(
            tls,
            ISSUE_ADMIN_CERTIFICATE,
            &pb::IssueAdminCertificateRequest {
                csr_der: pending.csr_der().to_vec().into(),
                validity_ms,
                name: "test operator".into(),
            },
        )?;
        assert_eq!(reply.root_cert_der.as_ref(), self.root.der().as_ref());
        Ok(pending
            .complete(&reply.cert_der, &self.root, SystemTime::now())
            .unwrap())
    }

    fn call<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        tls: &Arc<rustls::ClientConfig>,
        method: &str,
        request: &Req,
    ) -> Result<Resp, Status> {
        self.transport
            .channel(&self.addr, tls)
            .unary(method, request, CallOptions::timeout(CALL))
    }

    fn list_services(&self, tls: &Arc<rustls::ClientConfig>) -> Result<usize, Status> {
        let mut stream = self
            .transport
            .channel(&self.addr, tls)
            .server_stream::<_, pb::ServiceChunk>(
                api::LIST_SERVICES,
                &pb::ListServicesRequest {},
                CallOptions::timeout(CALL),
            )?;
        let mut count = 0;
        while let Some(chunk) = stream.recv()? {
            count += chunk.services.len();
        }
        Ok(count)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.transport.shutdown();
        if let Some(manager) = self.manager.take() {
            manager.shutdown();
        }
    }
}

fn spec(name: &str, replicas: u64) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        mode: ServiceMode::Replicated as i32,
        replicas,
        task: Some(TaskSpec {
            command: "sleep".into(),
            args: vec!["60".into()],
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn create(
    fixture: &Fixture,
    tls: &Arc<rustls::ClientConfig>,
    id: &str,
    spec: ServiceSpec,
) -> Result<pb::ServiceResponse, Status> {
    fixture.call(
        tls,
        api::CREATE_SERVICE,
        &pb::CreateServiceRequest {
            spec: Some(spec),
            id: id.into(),
            request_id: None,
        },
    )
}

#[test]
fn a_retried_create_answers_with_the_service_its_first_attempt_made() {
    let fixture = Fixture::start();
    let tls = fixture.manager_tls();
    let id = api::new_object_id();

    // The first attempt commits; its reply is "lost"; the client sends the same request.
    let first = create(&fixture, &tls, &id, spec("web", 3)).unwrap();
    let again = create(&fixture, &tls, &id, spec("web", 3)).unwrap();
    assert_eq!(first.service.as_ref().unwrap().id, id);
    assert_eq!(again, first, "the retry answers with the very same object");
    assert_eq!(fixture.list_services(&tls).unwrap(), 1, "created once");

    // The same id with another spec is not a retry.
    let other_spec = create(&fixture, &tls, &id, spec("web", 4)).unwrap_err();
    assert_eq!(other_spec.code, Code::AlreadyExists, "{other_spec}");
    assert!(
        other_spec.message.contains("another spec") && other_spec.message.contains(&id),
        "{other_spec}"
    );

    // Another create (new id) of a taken name still fails, saying which service holds it.
    let taken = create(&fixture, &tls, &api::new_object_id(), spec("web", 3)).unwrap_err();
    assert_eq!(taken.code, Code::AlreadyExists, "{taken}");
    assert!(
        taken.message.contains("\"web\"")
            && taken.message.contains(&id)
            && taken.message.contains("pick another name"),
        "{taken}"
    );
    // So does a create without an id (the leader picks one).
    let no_id = create(&fixture, &tls, "", spec("web", 3)).unwrap_err();
    assert_eq!(no_id.code, Code::AlreadyExists, "{no_id}");

    // A malformed id is refused before anything is proposed.
    let malformed = create(&fixture, &tls, "Not-An-Id", spec("api", 1)).unwrap_err();
    assert_eq!(malformed.code, Code::InvalidArgument, "{malformed}");
    assert!(malformed.message.contains("id:"), "{malformed}");

    // After an update, resending the original create is refused: the spec changed since.
    let service = first.service.unwrap();
    let _: pb::ServiceResponse = fixture
        .call(
            &tls,
            api::UPDATE_SERVICE,
            &pb::UpdateServiceRequest {
                reference: id.clone(),
                version: service.meta.unwrap().version,
                spec: Some(spec("web", 5)),
                request_id: None,
                rollback: false,
            },
        )
        .unwrap();
    let stale = create(&fixture, &tls, &id, spec("web", 3)).unwrap_err();
    assert_eq!(stale.code, Code::AlreadyExists, "{stale}");
    assert_eq!(fixture.list_services(&tls).unwrap(), 1);
}

fn request_id(client: u8, seq: u64) -> Option<RequestId> {
    Some(RequestId {
        client_id: vec![client; 16].into(),
        seq,
    })
}

#[test]
fn a_retried_write_gets_its_first_answer_never_a_conflict_with_itself() {
    let fixture = Fixture::start();
    let tls = fixture.manager_tls();
    let id = api::new_object_id();
    let created = create(&fixture, &tls, &id, spec("web", 1)).unwrap();
    let read = created.service.unwrap().meta.unwrap().version;
    let update = |client: u8, seq: u64, replicas: u64| {
        fixture.call::<_, pb::ServiceResponse>(
            &tls,
            api::UPDATE_SERVICE,
            &pb::UpdateServiceRequest {
                reference: id.clone(),
                version: read,
                spec: Some(spec("web", replicas)),
                request_id: request_id(client, seq),
                rollback: false,
            },
        )
    };

    // `update --if-version N`: the first attempt commits, its reply is "lost", the client
    // sends the very same request again: the first answer, not a version conflict.
    let first = update(1, 1, 5).unwrap().service.unwrap();
    let again = update(1, 1, 5).unwrap().service.unwrap();
    assert_eq!(
        again, first,
        "the retry answers with the object the first attempt wrote"
    );
    assert_ne!(first.meta.as_ref().unwrap().version, read);

    // Another client with the same stale version: a real conflict.
    let conflict = update(2, 1, 7).unwrap_err();
    assert_eq!(conflict.code, Code::Aborted, "{conflict}");
    // Retried, that refusal stays a refusal (it is the answer the request got).
    let conflict_again = update(2, 1, 7).unwrap_err();
    assert_eq!(conflict_again.code, Code::Aborted, "{conflict_again}");
    // The first client's next request is a new write, checked as such.
    let stale = update(1, 2, 9).unwrap_err();
    assert_eq!(stale.code, Code::Aborted, "{stale}");

    // A removal retried after it committed answers with the id it removed, though the
    // name no longer resolves.
    let remove = || {
        fixture.call::<_, pb::RemoveResponse>(
            &tls,
            api::REMOVE_SERVICE,
            &pb::RemoveServiceRequest {
                reference: "web".into(),
                request_id: request_id(3, 1),
            },
        )
    };
    assert_eq!(remove().unwrap().id, id);
    assert_eq!(
        remove().unwrap().id,
        id,
        "not NotFound: it was this request"
    );
    assert_eq!(fixture.list_services(&tls).unwrap(), 0);
}

fn assert_denied<T: std::fmt::Debug>(what: &str, result: Result<T, Status>) {
    let status = result.expect_err(what);
    assert_eq!(status.code, Code::PermissionDenied, "{what}: {status}");
}

#[test]
fn admins_operate_but_never_reach_raft_and_workers_reach_no_control_method() {
    let fixture = Fixture::start();
    let manager_tls = fixture.manager_tls();

    // An admin certificate: OU admin, a new id, the lifetime asked for.
    let asked = Duration::from_secs(2 * 86_400);
    let before = SystemTime::now();
    let admin = fixture
        .admin(&manager_tls, i64::try_from(asked.as_millis()).unwrap())
        .unwrap();
    assert_eq!(admin.role(), Role::Admin);
    assert_eq!(admin.cluster_id(), fixture.root.cluster_id());
    let lifetime = admin.not_after().duration_since(before).unwrap();
    assert!(
        lifetime <= asked + Duration::from_secs(60) && lifetime + Duration::from_secs(3600) > asked,
        "lifetime {lifetime:?}, asked {asked:?}"
    );
    let too_long = fixture.admin(&manager_tls, 400 * 86_400_000).unwrap_err();
    assert_eq!(too_long.code, Code::InvalidArgument, "{too_long}");

    // The admin operates: reads, writes, listings, the managers, more admin certificates.
    let admin_tls = fixture.tls_for(&admin);
    let _: pb::ClusterResponse = fixture
        .call(&admin_tls, api::GET_CLUSTER, &pb::GetClusterRequest {})
        .unwrap();
    create(
        &fixture,
        &admin_tls,
        &api::new_object_id(),
        spec("by-admin", 1),
    )
    .unwrap();
    assert_eq!(fixture.list_services(&admin_tls).unwrap(), 1);
    let _: pb::ManagersResponse = fixture
        .call(&admin_tls, LIST_MANAGERS, &pb::ListManagersRequest {})
        .unwrap();
    fixture.admin(&admin_tls, 86_400_000).unwrap();

    // ... but never touches Raft, kv, forwarding, manager reports or node renewal.
    use flotilla::proto::{ca as capb, kv as kvpb, raft as raftpb};
    assert_denied(
        "raft.Status",
        fixture.call::<_, raftpb::StatusResponse>(
            &admin_tls,
            flotilla::proto::raft::rpc::name::STATUS,
            &raftpb::StatusRequest {},
        ),
    );
    assert_denied(
        "kv.Get",
        fixture.call::<_, kvpb::GetResponse>(
            &admin_tls,
            flotilla::proto::kv::rpc::name::GET,
            &kvpb::GetRequest { key: "k".into() },
        ),
    );
    assert_denied(
        "control.Forward",
        fixture.call::<_, pb::ForwardResponse>(
            &admin_tls,
            api::FORWARD,
            &pb::ForwardRequest {
                call: Some(pb::forward_request::Call::CreateService(Default::default())),
                caller_node_id: "someoneelse".into(),
                ..Default::default()
            },
        ),
    );
    assert_denied(
        "control.ReportManager",
        fixture.call::<_, pb::ReportManagerResponse>(
            &admin_tls,
            api::REPORT_MANAGER,
            &pb::ReportManagerRequest::default(),
        ),
    );
    let pending = PendingIdentity::generate().unwrap();
    assert_denied(
        "ca.RenewNodeCertificate",
        fixture.call::<_, capb::RenewNodeCertificateResponse>(
            &admin_tls,
            flotilla::proto::ca::rpc::name::RENEW_NODE_CERTIFICATE,
            &capb::RenewNodeCertificateRequest {
                csr_der: pending.csr_der().to_vec().into(),
            },
        ),
    );

    // A worker reaches no control method: reads, writes, watch, managers, admin certs.
    let worker_tls = fixture.tls_for(&fixture.worker());
    assert_denied(
        "GetCluster",
        fixture.call::<_, pb::ClusterResponse>(
            &worker_tls,
            api::GET_CLUSTER,
            &pb::GetClusterRequest {},
        ),
    );
    assert_denied(
        "CreateService",
        create(&fixture, &worker_tls, &api::new_object_id(), spec("w", 1)),
    );
    assert_denied("ListServices", fixture.list_services(&worker_tls));
    assert_denied(
        "ListManagers",
        fixture.call::<_, pb::ManagersResponse>(
            &worker_tls,
            LIST_MANAGERS,
            &pb::ListManagersRequest {},
        ),
    );
    assert_denied(
        "IssueAdminCertificate",
        fixture.admin(&worker_tls, 86_400_000),
    );
    let watch = fixture
        .transport
        .channel(&fixture.addr, &worker_tls)
        .server_stream::<_, pb::WatchMessage>(
            api::WATCH,
            &pb::WatchRequest::default(),
            CallOptions::timeout(CALL),
        )
        .and_then(|mut stream| stream.recv());
    assert_denied("Watch", watch);
}

/// The Cluster object as this manager applied it.
fn applied_cluster(fixture: &Fixture) -> Arc<flotilla::proto::objects::Cluster> {
    let manager = fixture.manager.as_ref().unwrap();
    manager.state().store.list().first().cloned().unwrap()
}

#[test]
fn a_cluster_object_without_the_ca_key_gets_it_from_the_founder_and_replies_never_carry_it() {
    use flotilla::proto::objects::{Cluster, Transaction};

    let fixture = Fixture::start();
    let founder_ca = ClusterCa::load(&fixture.dir.ca_file(), CaPolicy::default()).unwrap();
    let (cert_der, key_der) = founder_ca.to_der_parts();
    // A new cluster replicates the key from its first Cluster object on.
    let cluster = applied_cluster(&fixture);
    let material = cluster
        .root_ca
        .clone()
        .expect("the founder replicates its key");
    assert_eq!(
        (material.cert_der.as_ref(), material.key_der.as_ref()),
        (cert_der.as_slice(), key_der.as_slice())
    );
    // Its Debug form (what a log could show) carries no key bytes.
    let debug = format!("{cluster:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(
        !debug.contains(&format!("{:?}", material.key_der)),
        "{debug}"
    );

    // A cluster created before the key was replicated: the object has none. The founder,
    // which holds the key on disk, publishes it.
    let mut legacy = cluster.as_ref().clone();
    legacy.root_ca = None;
    let version = legacy.meta.as_ref().unwrap().version;
    let txn = Transaction {
        changes: vec![flotilla::store::update_expecting(legacy, version)],
        timestamp_ms: 1,
        request_id: None,
    };
    let manager = fixture.manager.as_ref().unwrap();
    flotilla::replication::propose_transaction(manager.raft(), &txn, CALL).unwrap();
    let deadline = Instant::now() + CALL;
    let republished = loop {
        let cluster: Arc<Cluster> = applied_cluster(&fixture);
        if cluster.meta.as_ref().unwrap().version > version
            && let Some(material) = cluster.root_ca.clone()
        {
            break material;
        }
        assert!(
            Instant::now() < deadline,
            "the founder never published its key"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(republished.key_der.as_ref(), key_der.as_slice());

    // Neither a manager nor an admin ever receives it.
    let manager_tls = fixture.manager_tls();
    let admin = fixture.admin(&manager_tls, 86_400_000).unwrap();
    for tls in [manager_tls.clone(), fixture.tls_for(&admin)] {
        let reply: pb::ClusterResponse = fixture
            .call(&tls, api::GET_CLUSTER, &pb::GetClusterRequest {})
            .unwrap();
        assert!(reply.cluster.unwrap().root_ca.is_none());
    }
}
