//! Joining a cluster and renewing a certificate over real sockets: the CA's bootstrap
//! methods, token pinning, refusals and the rate limiter.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{Bytes, fast_config};
use flotilla::ca::{
    CaPolicy, CaService, ClusterCa, FailureLimits, JoinError, JoinToken, JoinTokens, Role,
    load_node_files, tls,
};
use flotilla::ca_rpc::renewal::{Renewer, RenewerConfig, RenewerSetup};
use flotilla::ca_rpc::{JoinClusterError, join_cluster, renew_certificate};
use flotilla::net::{Allow, CallOptions, Router, ServicePool, Transport};
use flotilla::wire::Code;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Manager {
    service: Arc<CaService>,
    addr: SocketAddr,
    _transport: Transport,
    _pool: ServicePool,
}

impl Manager {
    fn start() -> Self {
        let ca = ClusterCa::create(SystemTime::now(), CaPolicy::default()).unwrap();
        let identity = ca
            .issue_local_identity(Role::Manager, SystemTime::now())
            .unwrap();
        let server_tls = Arc::new(tls::server_config(&identity, ca.root()).unwrap());
        let tokens = JoinTokens::generate(ca.root());
        let service = Arc::new(CaService::new(ca, tokens, FailureLimits::default()));
        let pool = ServicePool::new("ca", 2, 64).unwrap();
        let mut router = Router::new();
        flotilla::ca_rpc::register(&mut router, &pool, &service);
        router.unary("test.WhoAmI", Allow::NODES, &pool, |ctx, _: Bytes| {
            Ok(Bytes {
                data: vec![],
                caller: ctx.peer().unwrap().to_string(),
            })
        });
        let transport = Transport::start(fast_config()).unwrap();
        let addr = transport
            .listen("127.0.0.1:0".parse().unwrap(), server_tls, Arc::new(router))
            .unwrap();
        Self {
            service,
            addr,
            _transport: transport,
            _pool: pool,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }
}

#[test]
fn worker_and_manager_tokens_yield_certificates_of_their_role() {
    let manager = Manager::start();
    let client = Transport::start(fast_config()).unwrap();
    for role in [Role::Worker, Role::Manager] {
        let token = manager.service.token(role).to_string();
        let (identity, root) = join_cluster(&client, &manager.target(), &token, TIMEOUT).unwrap();
        assert_eq!(identity.role(), role);
        assert_eq!(identity.cluster_id(), manager.service.ca().cluster_id());
        assert_eq!(root.der(), manager.service.root().der());
        // The new certificate opens mutual TLS, and the manager sees exactly that identity.
        let mtls = Arc::new(tls::client_config(&identity, &root).unwrap());
        let reply: Bytes = client
            .channel(&manager.target(), &mtls)
            .unary(
                "test.WhoAmI",
                &Bytes::default(),
                CallOptions::timeout(TIMEOUT),
            )
            .unwrap();
        assert_eq!(reply.caller, identity.peer().to_string());
    }
}

#[test]
fn token_of_another_cluster_is_refused_before_the_secret_is_sent() {
    let manager = Manager::start();
    let other = Manager::start();
    let client = Transport::start(fast_config()).unwrap();
    let foreign = other.service.token(Role::Worker).to_string();
    let err = join_cluster(&client, &manager.target(), &foreign, TIMEOUT).unwrap_err();
    assert!(
        matches!(err, JoinClusterError::Root(JoinError::RootMismatch { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("nothing was sent"), "{err}");
}

#[test]
fn wrong_secret_is_denied_then_rate_limited() {
    let manager = Manager::start();
    let client = Transport::start(fast_config()).unwrap();
    let real = manager.service.token(Role::Worker);
    // Same pinned root, forged secret.
    let forged = format!("FLT-1-{}-{}", real.root_digest_hex(), "0".repeat(32));
    JoinToken::parse(&forged).unwrap();
    let mut codes = Vec::new();
    for _ in 0..4 {
        match join_cluster(&client, &manager.target(), &forged, TIMEOUT).unwrap_err() {
            JoinClusterError::Refused { status, .. } => codes.push(status.code),
            other => panic!("expected a refusal, got {other}"),
        }
    }
    assert_eq!(
        codes,
        [
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::PermissionDenied,
            Code::ResourceExhausted
        ]
    );
    // While limited, even the right token from this address is refused.
    let err = join_cluster(&client, &manager.target(), &real.to_string(), TIMEOUT).unwrap_err();
    assert!(
        matches!(&err, JoinClusterError::Refused { status, .. } if status.code == Code::ResourceExhausted),
        "{err}"
    );
}

#[test]
fn rotated_token_is_refused() {
    let manager = Manager::start();
    let client = Transport::start(fast_config()).unwrap();
    let old = manager.service.token(Role::Worker).to_string();
    let new = manager.service.rotate_token(Role::Worker).to_string();
    let err = join_cluster(&client, &manager.target(), &old, TIMEOUT).unwrap_err();
    assert!(
        matches!(&err, JoinClusterError::Refused { status, .. } if status.code == Code::PermissionDenied),
        "{err}"
    );
    join_cluster(&client, &manager.target(), &new, TIMEOUT).unwrap();
}

#[test]
fn renewal_keeps_node_id_and_role_with_a_new_key() {
    let manager = Manager::start();
    let client = Transport::start(fast_config()).unwrap();
    let token = manager.service.token(Role::Worker).to_string();
    let (identity, root) = join_cluster(&client, &manager.target(), &token, TIMEOUT).unwrap();
    let mtls = Arc::new(tls::client_config(&identity, &root).unwrap());
    let channel = client.channel(&manager.target(), &mtls);
    let renewed = renew_certificate(&channel, &identity, &root, TIMEOUT).unwrap();
    assert_eq!(renewed.peer(), identity.peer());
    assert_ne!(renewed.cert_der(), identity.cert_der());
    // Renewal needs a certificate: an anonymous caller is turned away.
    let pinned = Arc::new(tls::pinned_root_client_config(&root).unwrap());
    let err = renew_certificate(
        &client.channel(&manager.target(), &pinned),
        &identity,
        &root,
        TIMEOUT,
    )
    .unwrap_err();
    assert!(err.to_string().contains("Unauthenticated"), "{err}");
}

#[test]
fn renewer_renews_a_certificate_past_its_renewal_point_and_saves_it() {
    let manager = Manager::start();
    let days = |n: u64| Duration::from_secs(n * 24 * 3600);
    // 85 of 90 days gone: past the 50–80 % window, so renewal is due at once.
    let aged = manager
        .service
        .ca()
        .issue_local_identity(Role::Worker, SystemTime::now() - days(85))
        .unwrap();
    assert!(aged.renewal_at(&mut rand::rng()) < SystemTime::now());
    let dir = tempfile::tempdir().unwrap();
    let (renewed_tx, renewed_rx) = crossbeam_channel::unbounded();
    let renewer = Renewer::start(
        RenewerSetup {
            transport: Arc::new(Transport::start(fast_config()).unwrap()),
            managers: vec![manager.target()],
            state_dir: dir.path().to_path_buf(),
            identity: aged.clone(),
            root: manager.service.root().clone(),
        },
        RenewerConfig::default(),
        move |identity| renewed_tx.send(identity.clone()).unwrap(),
    )
    .unwrap();
    let renewed = renewed_rx
        .recv_timeout(TIMEOUT)
        .expect("no renewal happened");
    assert_eq!(renewed.peer(), aged.peer());
    assert!(renewed.not_after() > aged.not_after() + days(80));
    // The fresh certificate is not due for weeks: the renewer now waits, and stops on request.
    assert!(renewed.renewal_at(&mut rand::rng()) > SystemTime::now() + days(40));
    renewer.stop();
    assert!(renewed_rx.try_recv().is_err(), "renewed twice");
    let (on_disk, _) = load_node_files(dir.path()).unwrap();
    assert_eq!(on_disk.cert_der(), renewed.cert_der());
}
