//! The cluster CA survives its founder, and certificates are revoked cluster-wide, with
//! real manager processes:
//!
//! - the root CA key is replicated through Raft: every manager installs it and runs the CA;
//!   with the founder stopped for good, a fourth manager joins through a non-founder, an
//!   admin certificate is issued through a non-founder, and a node certificate is renewed
//!   through a non-founder;
//! - the key never leaves the managers: `GetCluster`, `ListNodes`, `Watch` (as an admin)
//!   and `cluster inspect` carry no key bytes;
//! - `manager rm` + `node rm` of the lost founder revoke its certificate on every manager
//!   (control methods, `raft.Join`, renewal); a demoted manager's certificate is refused by
//!   every manager's control methods (and control.Forward), while it may still read its own
//!   Node object and renew it, as a worker's; `admin-cert revoke` refuses an admin
//!   certificate everywhere.
#![allow(clippy::unwrap_used, missing_docs)]

mod procs;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla::ca::{CaPolicy, ClusterCa, NodeIdentity, RootCert, load_node_files, tls};
use flotilla::control as api;
use flotilla::net::{CallOptions, Transport, TransportConfig};
use flotilla::proto::control as pb;
use flotilla::proto::objects::{ObjectKind, store_object};
use flotilla::wire::{Code, Status};
use procs::cluster::{Cluster, ClusterOptions, ManagerProc, START};

const CALL: Duration = Duration::from_secs(10);

use procs::{cli_in as cli, cli_ok as ok, raft_id_of};

fn node_id_of(manager: &mut ManagerProc) -> String {
    let line = manager.proc().wait_for("(raft id", START);
    let rest = line.split("manager ").nth(1).unwrap();
    rest.split_whitespace().next().unwrap().to_string()
}

/// Whether `needle` occurs in `haystack`.
fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Calls managers with one identity (a node's or an admin's certificate directory).
struct Caller {
    transport: Transport,
    tls: Arc<rustls::ClientConfig>,
    identity: NodeIdentity,
    root: RootCert,
}

impl Caller {
    fn new(cert_dir: &Path) -> Caller {
        let (identity, root) = load_node_files(cert_dir).unwrap();
        Caller {
            transport: Transport::start(TransportConfig::default()).unwrap(),
            tls: Arc::new(tls::client_config(&identity, &root).unwrap()),
            identity,
            root,
        }
    }

    fn unary<Req: prost::Message, Resp: prost::Message + Default>(
        &self,
        addr: &str,
        method: &str,
        request: &Req,
    ) -> Result<Resp, Status> {
        self.transport
            .channel(addr, &self.tls)
            .unary(method, request, CallOptions::timeout(CALL))
    }

    fn cluster(&self, addr: &str) -> Result<pb::ClusterResponse, Status> {
        self.unary(addr, api::GET_CLUSTER, &pb::GetClusterRequest {})
    }

    fn list_nodes(&self, addr: &str) -> Result<Vec<pb::NodeChunk>, Status> {
        let mut stream = self
            .transport
            .channel(addr, &self.tls)
            .server_stream::<_, pb::NodeChunk>(
                api::LIST_NODES,
                &pb::ListNodesRequest {},
                CallOptions::timeout(CALL),
            )?;
        let mut chunks = Vec::new();
        while let Some(chunk) = stream.recv()? {
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    fn renew(&self, addr: &str) -> Result<NodeIdentity, String> {
        let channel = self.transport.channel(addr, &self.tls);
        flotilla::ca_rpc::renew_certificate(&channel, &self.identity, &self.root, CALL)
            .map_err(|e| e.to_string())
    }
}

/// Retries `call` until it is refused with PermissionDenied (the revocation is applied
/// on that manager); returns the refusal.
fn eventually_denied<T: std::fmt::Debug>(
    what: &str,
    call: impl Fn() -> Result<T, Status>,
) -> Status {
    let deadline = Instant::now() + START;
    loop {
        match call() {
            Err(status) if status.code == Code::PermissionDenied => return status,
            other => assert!(
                Instant::now() < deadline,
                "{what} was never refused; last answer: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Retries `call` until it succeeds.
fn eventually_ok<T>(what: &str, call: impl Fn() -> Result<T, String>) -> T {
    let deadline = Instant::now() + START;
    loop {
        match call() {
            Ok(value) => return value,
            Err(error) => assert!(
                Instant::now() < deadline,
                "{what} never succeeded; last error: {error}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_ca_outlives_its_founder_and_revocations_reach_every_manager() {
    let mut cluster = Cluster::start(3, ClusterOptions::default());
    let ids: Vec<String> = cluster.managers.iter_mut().map(node_id_of).collect();
    // The CA key, as only the founder holds it on disk: what must never leave the managers.
    let founder_ca = ClusterCa::load(
        &cluster.managers[0].dir.join("ca").join("ca.pem"),
        CaPolicy::default(),
    )
    .unwrap();
    let (_, key_der) = founder_ca.to_der_parts();
    // Every other manager installs the replicated key, and writes no key file.
    for manager in &mut cluster.managers[1..] {
        manager
            .proc()
            .wait_for("this manager now runs the cluster CA", START);
        assert!(
            manager.dir.join("ca").read_dir().unwrap().next().is_none(),
            "{} wrote the CA key to a file",
            manager.name
        );
        // Its Raft log and snapshots hold the key: the directory is its owner's only.
        assert_eq!(procs::mode(&manager.dir.join("raft")), 0o700);
    }

    // The founder is lost for good.
    cluster.managers[0].kill();
    let m2 = cluster.managers[1].dir.clone();
    let m2_addr = cluster.managers[1].addr.clone();
    let m3_addr = cluster.managers[2].addr.clone();

    // An admin certificate, issued through a non-founder (its local socket).
    let admin_dir = cluster.tmp.path().join("admin");
    let issued = eventually_ok("admin-cert issue through m2", || {
        let (success, output) = cli(
            &m2,
            &["admin-cert", "issue", "--out", admin_dir.to_str().unwrap()],
        );
        if success { Ok(output) } else { Err(output) }
    });
    assert!(issued.contains("admin certificate"), "{issued}");
    let admin = Caller::new(&admin_dir);

    // The key never reaches an admin: GetCluster, ListNodes, Watch, `cluster inspect`.
    let mut watch = admin
        .transport
        .channel(&m3_addr, &admin.tls)
        .server_stream::<_, pb::WatchMessage>(
            api::WATCH,
            &pb::WatchRequest {
                filters: vec![pb::WatchFilter {
                    kind: ObjectKind::Cluster as i32,
                    ..Default::default()
                }],
                ..Default::default()
            },
            CallOptions::timeout(Duration::from_secs(120)),
        )
        .unwrap();
    assert_eq!(
        watch.recv().unwrap().unwrap().action,
        pb::WatchAction::Start as i32
    );
    for addr in [&m2_addr, &m3_addr] {
        let reply = eventually_ok("GetCluster as an admin", || {
            admin.cluster(addr).map_err(|e| e.to_string())
        });
        let cluster_object = reply.cluster.clone().unwrap();
        assert!(
            cluster_object.root_ca.is_none(),
            "GetCluster carries the key"
        );
        assert_eq!(
            cluster_object.root_ca_digest.as_ref(),
            founder_ca.root().digest()
        );
        assert!(!contains_bytes(
            &prost::Message::encode_to_vec(&reply),
            &key_der
        ));
        for chunk in admin.list_nodes(addr).unwrap() {
            assert!(!contains_bytes(
                &prost::Message::encode_to_vec(&chunk),
                &key_der
            ));
        }
    }
    ok(&m2, &["cluster", "update", "--task-history-retention", "7"]);
    let event = loop {
        let message = watch.recv().unwrap().expect("the watch ended early");
        if message.action == pb::WatchAction::Update as i32 {
            break message;
        }
    };
    assert!(!contains_bytes(
        &prost::Message::encode_to_vec(&event),
        &key_der
    ));
    for object in [&event.object, &event.old] {
        match object.as_ref().and_then(|o| o.object.as_ref()) {
            Some(store_object::Object::Cluster(c)) => assert!(c.root_ca.is_none()),
            other => panic!("expected a cluster object, got {other:?}"),
        }
    }
    let inspect = ok(&m2, &["cluster", "inspect"]);
    assert!(!inspect.contains(&hex::encode(&key_der)), "{inspect}");
    assert!(
        inspect.contains("\"task_history_retention\": 7"),
        "{inspect}"
    );

    // A fourth manager joins through a non-founder with the manager token.
    let m4 = cluster.add_joiner_via(2);
    cluster.wait_voters(3, START);
    let m4_id = node_id_of(&mut cluster.managers[m4]);
    cluster.managers[m4]
        .proc()
        .wait_for("this manager now runs the cluster CA", START);

    // A node certificate renewal through a non-founder: same node, same role, new key.
    let m3 = Caller::new(&cluster.managers[2].dir.join("node"));
    let renewed = m3.renew(&m2_addr).unwrap();
    assert_eq!(renewed.node_id(), m3.identity.node_id());
    assert_eq!(renewed.role(), m3.identity.role());
    assert!(renewed.not_after() >= m3.identity.not_after());

    // The lost founder is removed (`manager rm`, then `node rm`): its certificate is
    // refused by every manager, for control methods, raft.Join and renewal alike.
    let listing = ok(&m2, &["manager", "ls", "--format", "json"]);
    let founder_raft_id = raft_id_of(&listing, &cluster.managers[0].addr);
    ok(&m2, &["manager", "rm", &founder_raft_id]);
    ok(&m2, &["node", "rm", &ids[0]]);
    let founder = Caller::new(&cluster.managers[0].dir.join("node"));
    for addr in cluster.addrs().iter().skip(1) {
        let refused = eventually_denied("the removed founder's ListNodes", || {
            founder.list_nodes(addr)
        });
        assert!(refused.message.contains("revoked"), "{refused}");
        assert_eq!(
            refused.reason,
            flotilla::ca::CERTIFICATE_REVOKED,
            "{refused:?}"
        );
        let refused = founder
            .unary::<_, flotilla::proto::raft::JoinResponse>(
                addr,
                "raft.Join",
                &flotilla::proto::raft::JoinRequest {
                    raft_id: 0x5eed,
                    addr: "127.0.0.1:1".into(),
                },
            )
            .unwrap_err();
        assert_eq!(refused.code, Code::PermissionDenied, "{refused}");
        assert!(founder.renew(addr).unwrap_err().contains("revoked"));
        // Not even a Raft message is taken from it, whatever member id it claims.
        let refused = founder
            .unary::<_, flotilla::proto::raft::StepResponse>(
                addr,
                "raft.Step",
                &flotilla::proto::raft::StepRequest {
                    from: 0x5eed,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(refused.code, Code::PermissionDenied, "{refused}");
        // The reason a removed member's Raft peer thread acts on (it then stops).
        assert_eq!(
            refused.reason,
            flotilla::ca::CERTIFICATE_REVOKED,
            "{refused:?}"
        );
    }
    let inspect = ok(&m2, &["cluster", "inspect"]);
    assert!(
        inspect.contains(&ids[0]) && inspect.contains("removed"),
        "{inspect}"
    );

    // Demote the newest manager: its manager certificate (kept aside here: the node goes on
    // as a worker and renews it as a worker's) is refused by every manager on control
    // methods (also as a forwarder of another identity); it may still read its own Node
    // object, and a renewal gives it a worker's certificate.
    let kept = cluster.tmp.path().join("m4-manager-cert");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(cluster.managers[m4].dir.join("node"))
        .arg(&kept)
        .status()
        .unwrap();
    assert!(copied.success());
    ok(&m2, &["node", "demote", &m4_id]);
    let demoted_proc = cluster.managers[m4].proc();
    demoted_proc.wait_for("was demoted to worker", START);
    demoted_proc.wait_for("running the tasks assigned to it", START);
    let demoted = Caller::new(&kept);
    for addr in [&m2_addr, &m3_addr] {
        let refused =
            eventually_denied("the demoted manager's GetCluster", || demoted.cluster(addr));
        assert!(refused.message.contains("demoted"), "{refused}");
        let refused = demoted
            .unary::<_, pb::ForwardResponse>(
                addr,
                api::FORWARD,
                &pb::ForwardRequest {
                    call: Some(pb::forward_request::Call::CreateService(Default::default())),
                    caller_node_id: ids[1].clone(),
                    caller_role_name: "manager".into(),
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!(refused.code, Code::PermissionDenied, "{refused}");
        assert_eq!(
            demoted.list_nodes(addr).unwrap_err().code,
            Code::PermissionDenied
        );
        let renewed = demoted.renew(addr).unwrap();
        assert_eq!(renewed.node_id(), m4_id);
        assert_eq!(renewed.role(), flotilla::ca::Role::Worker);
        let own: pb::NodeResponse = demoted
            .unary(
                addr,
                api::GET_NODE,
                &pb::GetNodeRequest {
                    reference: m4_id.clone(),
                },
            )
            .unwrap();
        assert_eq!(own.node.unwrap().id, m4_id);
        let other = demoted
            .unary::<_, pb::NodeResponse>(
                addr,
                api::GET_NODE,
                &pb::GetNodeRequest {
                    reference: ids[1].clone(),
                },
            )
            .unwrap_err();
        assert_eq!(other.code, Code::PermissionDenied, "{other}");
    }

    // An admin certificate revoked by id is refused everywhere.
    let admin_id = admin.identity.node_id().to_string();
    let (success, output) = cli(&m2, &["admin-cert", "revoke", &admin_id]);
    assert!(success, "{output}");
    for addr in [&m2_addr, &m3_addr] {
        let refused = eventually_denied("the revoked admin's GetCluster", || admin.cluster(addr));
        assert!(refused.message.contains("revoked"), "{refused}");
    }
    // The managers themselves keep working.
    ok(&m2, &["node", "ls"]);
}
