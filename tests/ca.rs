//! Cluster CA: every accept/refuse case of the join flow and of the TLS configurations, with
//! rustls client and server connections wired to each other in memory (no sockets).
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flotilla::ca::tls::{
    bootstrap_client_config, client_config, peer_identity, pinned_root_client_config,
    server_config, server_name,
};
use flotilla::ca::{
    CaError, CaPolicy, CaService, CertError, ClusterCa, FailureLimits, IssueError, JoinError,
    JoinToken, JoinTokens, NodeIdentity, PeerIdentity, PendingIdentity, Role, RootCert,
    StorageError, TokenError, load_node_files, renewal_instant, save_node_files,
};
use rand::SeedableRng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: Duration = Duration::from_secs(24 * 3600);

fn now() -> SystemTime {
    SystemTime::now()
}

fn new_ca() -> ClusterCa {
    ClusterCa::create(now(), CaPolicy::default()).unwrap()
}

fn identity(ca: &ClusterCa, role: Role) -> NodeIdentity {
    ca.issue_local_identity(role, now()).unwrap()
}

/// An identity issued at `issued_at` (in the past for expired, in the future for not yet
/// valid certificates).
fn identity_issued_at(ca: &ClusterCa, role: Role, issued_at: SystemTime) -> NodeIdentity {
    let pending = PendingIdentity::generate().unwrap();
    let issued = ca
        .issue_new_node(pending.csr_der(), role, issued_at)
        .unwrap();
    pending
        .complete(&issued.cert_der, ca.root(), issued_at)
        .unwrap()
}

/// A certificate signed by `ca`'s root key with an arbitrary subject, bypassing the CA's own
/// rules: what a bug or a stolen key could produce.
fn forged(
    ca: &ClusterCa,
    cn: &str,
    ou: &str,
    o: &str,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let blocks = pem::parse_many(ca.to_pem_bundle()).unwrap();
    let ca_key = rcgen::KeyPair::try_from(blocks[1].contents()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.root().der(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    dn.push(rcgen::DnType::OrganizationalUnitName, ou);
    dn.push(rcgen::DnType::OrganizationName, o);
    params.distinguished_name = dn;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2090, 1, 1);
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// A client config that verifies the server like `pinned_root_client_config(root)` but
/// presents an arbitrary certificate.
fn client_presenting(
    root: &RootCert,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
) -> ClientConfig {
    let mut config = pinned_root_client_config(root).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.der().clone()).unwrap();
    let donor = ClientConfig::builder_with_provider(flotilla::ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)
        .unwrap();
    config.client_auth_cert_resolver = donor.client_auth_cert_resolver.clone();
    config
}

#[derive(Debug)]
struct Outcome {
    client_error: Option<rustls::Error>,
    server_error: Option<rustls::Error>,
    /// Identity of the client as the server sees it (None: no certificate).
    client_seen_by_server: Option<PeerIdentity>,
    /// Identity of the server as the client sees it.
    server_seen_by_client: Option<PeerIdentity>,
    /// Application data went both ways after the handshake.
    data_flowed: bool,
}

impl Outcome {
    fn accepted(&self) -> bool {
        self.client_error.is_none() && self.server_error.is_none() && self.data_flowed
    }
}

/// Moves every pending TLS record from one side to the other; returns whether bytes moved.
fn transfer(
    from: &mut Connection,
    to: &mut Connection,
    to_error: &mut Option<rustls::Error>,
) -> bool {
    let mut bytes = Vec::new();
    while from.wants_write() {
        if from.write_tls(&mut bytes).unwrap() == 0 {
            break;
        }
    }
    if bytes.is_empty() || to_error.is_some() {
        return !bytes.is_empty();
    }
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        if to.read_tls(&mut rest).unwrap() == 0 {
            break;
        }
        if let Err(e) = to.process_new_packets() {
            *to_error = Some(e);
            break;
        }
    }
    true
}

/// Runs a handshake between the two configs in memory, then sends one message each way.
fn connect(client: ClientConfig, server: ServerConfig) -> Outcome {
    let mut c = Connection::Client(ClientConnection::new(Arc::new(client), server_name()).unwrap());
    let mut s = Connection::Server(ServerConnection::new(Arc::new(server)).unwrap());
    let mut client_error = None;
    let mut server_error = None;
    c.writer().write_all(b"ping").unwrap();
    let mut data_flowed = false;
    for _round in 0..16 {
        let a = transfer(&mut c, &mut s, &mut server_error);
        let b = transfer(&mut s, &mut c, &mut client_error);
        if server_error.is_none() && !s.is_handshaking() && !data_flowed {
            let mut got = [0u8; 4];
            if s.reader().read_exact(&mut got).is_ok() {
                assert_eq!(&got, b"ping");
                s.writer().write_all(b"pong").unwrap();
                data_flowed = true;
                continue;
            }
        }
        if !a && !b {
            break;
        }
    }
    if data_flowed {
        let mut got = [0u8; 4];
        data_flowed =
            client_error.is_none() && c.reader().read_exact(&mut got).is_ok() && &got == b"pong";
    }
    let client_seen_by_server = if server_error.is_none() {
        peer_identity(s.peer_certificates()).unwrap()
    } else {
        None
    };
    let server_seen_by_client = if client_error.is_none() {
        peer_identity(c.peer_certificates()).unwrap()
    } else {
        None
    };
    Outcome {
        client_error,
        server_error,
        client_seen_by_server,
        server_seen_by_client,
        data_flowed,
    }
}

fn assert_server_refused_client(outcome: &Outcome, what: &str) {
    assert!(
        matches!(
            outcome.server_error,
            Some(rustls::Error::InvalidCertificate(_))
        ),
        "{what}: server must refuse the client certificate at the handshake: {outcome:?}"
    );
    assert!(
        !outcome.data_flowed,
        "{what}: no data may flow: {outcome:?}"
    );
    assert!(
        outcome.client_error.is_some(),
        "{what}: the client must learn of the refusal (alert): {outcome:?}"
    );
}

fn assert_client_refused_server(outcome: &Outcome, what: &str) {
    assert!(
        matches!(
            outcome.client_error,
            Some(rustls::Error::InvalidCertificate(_))
        ),
        "{what}: client must refuse the server certificate: {outcome:?}"
    );
    assert!(
        !outcome.data_flowed,
        "{what}: no data may flow: {outcome:?}"
    );
}

fn cert_error_text(error: &Option<rustls::Error>) -> String {
    error.as_ref().map(ToString::to_string).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// TLS: server side.

#[test]
fn valid_client_certificate_is_accepted_and_identified() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let worker = identity(&ca, Role::Worker);
    let outcome = connect(
        client_config(&worker, ca.root()).unwrap(),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");
    assert_eq!(outcome.client_seen_by_server.as_ref(), Some(worker.peer()));
    assert_eq!(outcome.server_seen_by_client.as_ref(), Some(manager.peer()));
    assert_eq!(worker.peer().role, Role::Worker);
    assert_eq!(worker.peer().cluster_id, ca.cluster_id());
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let ca = new_ca();
    let other = new_ca();
    let manager = identity(&ca, Role::Manager);
    let stranger = identity(&other, Role::Worker);
    let client = client_presenting(
        ca.root(),
        stranger.cert_der().clone(),
        stranger.private_key(),
    );
    let outcome = connect(client, server_config(&manager, ca.root()).unwrap());
    assert_server_refused_client(&outcome, "other CA");
    assert!(
        cert_error_text(&outcome.server_error).contains("UnknownIssuer"),
        "{outcome:?}"
    );
}

#[test]
fn expired_client_certificate_is_refused() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let expired = identity_issued_at(&ca, Role::Worker, now() - 200 * DAY);
    assert!(!expired.is_valid_at(now()));
    let outcome = connect(
        client_config(&expired, ca.root()).unwrap(),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert_server_refused_client(&outcome, "expired");
    assert!(
        cert_error_text(&outcome.server_error).contains("xpired"),
        "{outcome:?}"
    );
}

#[test]
fn not_yet_valid_client_certificate_is_refused() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let future = identity_issued_at(&ca, Role::Worker, now() + 10 * DAY);
    let outcome = connect(
        client_config(&future, ca.root()).unwrap(),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert_server_refused_client(&outcome, "not yet valid");
}

#[test]
fn client_certificate_of_another_cluster_signed_by_our_root_is_refused() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let (cert, key) = forged(
        &ca,
        &flotilla::ca::random_id(),
        "worker",
        &flotilla::ca::random_id(),
    );
    let outcome = connect(
        client_presenting(ca.root(), cert, key),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert_server_refused_client(&outcome, "other cluster id");
    assert!(
        cert_error_text(&outcome.server_error).contains("belongs to cluster"),
        "{outcome:?}"
    );
}

#[test]
fn client_certificate_with_unknown_role_is_refused() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let (cert, key) = forged(&ca, &flotilla::ca::random_id(), "operator", ca.cluster_id());
    let outcome = connect(
        client_presenting(ca.root(), cert, key),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert_server_refused_client(&outcome, "unknown role");
    assert!(
        cert_error_text(&outcome.server_error).contains("not a known role"),
        "{outcome:?}"
    );
}

#[test]
fn forged_certificate_of_our_cluster_and_known_role_passes_the_verifier() {
    // Control for the two tests above: the same forging path with a correct subject is
    // accepted, so the refusals come from the subject checks and not from the forging.
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let node_id = flotilla::ca::random_id();
    let (cert, key) = forged(&ca, &node_id, "worker", ca.cluster_id());
    let outcome = connect(
        client_presenting(ca.root(), cert, key),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");
    assert_eq!(outcome.client_seen_by_server.unwrap().node_id, node_id);
}

#[test]
fn client_without_certificate_is_accepted_for_bootstrap_with_no_identity() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    for (name, client) in [
        ("bootstrap", bootstrap_client_config().unwrap()),
        ("pinned root", pinned_root_client_config(ca.root()).unwrap()),
    ] {
        let outcome = connect(client, server_config(&manager, ca.root()).unwrap());
        assert!(outcome.accepted(), "{name}: {outcome:?}");
        assert_eq!(
            outcome.client_seen_by_server, None,
            "{name}: no identity without a certificate"
        );
        assert_eq!(outcome.server_seen_by_client.as_ref(), Some(manager.peer()));
    }
}

// ---------------------------------------------------------------------------------------
// TLS: client side.

#[test]
fn client_refuses_a_server_of_another_cluster() {
    let ca = new_ca();
    let other = new_ca();
    let worker = identity(&ca, Role::Worker);
    let other_manager = identity(&other, Role::Manager);
    let outcome = connect(
        client_config(&worker, ca.root()).unwrap(),
        server_config(&other_manager, other.root()).unwrap(),
    );
    assert_client_refused_server(&outcome, "client_config vs other cluster");
    let outcome = connect(
        pinned_root_client_config(ca.root()).unwrap(),
        server_config(&other_manager, other.root()).unwrap(),
    );
    assert_client_refused_server(&outcome, "pinned root vs other cluster");
}

#[test]
fn client_refuses_a_worker_posing_as_a_server() {
    let ca = new_ca();
    let worker = identity(&ca, Role::Worker);
    let other_worker = identity(&ca, Role::Worker);
    let outcome = connect(
        client_config(&worker, ca.root()).unwrap(),
        server_config(&other_worker, ca.root()).unwrap(),
    );
    assert_client_refused_server(&outcome, "worker as server");
    assert!(
        cert_error_text(&outcome.client_error).contains("only a manager"),
        "{outcome:?}"
    );
}

#[test]
fn client_refuses_an_expired_server_and_a_forged_cluster_server() {
    let ca = new_ca();
    let worker = identity(&ca, Role::Worker);
    let expired_manager = identity_issued_at(&ca, Role::Manager, now() - 200 * DAY);
    let outcome = connect(
        client_config(&worker, ca.root()).unwrap(),
        server_config(&expired_manager, ca.root()).unwrap(),
    );
    assert_client_refused_server(&outcome, "expired server");

    let (cert, key) = forged(
        &ca,
        &flotilla::ca::random_id(),
        "manager",
        &flotilla::ca::random_id(),
    );
    let forged_server = ServerConfig::builder_with_provider(flotilla::ca::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let outcome = connect(client_config(&worker, ca.root()).unwrap(), forged_server);
    assert_client_refused_server(&outcome, "server cert of another cluster id");
}

#[test]
fn bootstrap_client_accepts_any_server_but_the_token_pin_catches_it() {
    let ca = new_ca();
    let impostor_ca = new_ca();
    let impostor = identity(&impostor_ca, Role::Manager);
    // The unverified connection itself succeeds: that is its whole point...
    let outcome = connect(
        bootstrap_client_config().unwrap(),
        server_config(&impostor, impostor_ca.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");
    // ...and what it fetched is refused against the token of the cluster we meant to join.
    let token = JoinTokens::generate(ca.root()).token(Role::Worker);
    let err = flotilla::ca::verify_root_for_token(&token, impostor_ca.root().der()).unwrap_err();
    assert!(matches!(err, JoinError::RootMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("does not belong to this cluster"),
        "{message}"
    );
    assert!(message.contains("intercepting"), "{message}");
    assert!(message.contains(&token.root_digest_hex()), "{message}");
}

#[test]
fn tls_configs_refuse_an_identity_of_another_cluster_than_the_root() {
    let ca = new_ca();
    let other = new_ca();
    let stranger = identity(&other, Role::Manager);
    assert!(server_config(&stranger, ca.root()).is_err());
    assert!(client_config(&stranger, ca.root()).is_err());
}

// ---------------------------------------------------------------------------------------
// Join flow (sans-IO, as the transport will drive it).

fn service(ca: ClusterCa) -> CaService {
    let tokens = JoinTokens::generate(ca.root());
    CaService::new(ca, tokens, FailureLimits::default())
}

const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));

/// The joining node's side: pin the root with the token, then send the CSR and token.
fn join(service: &CaService, token: &str, role_expected: Role) -> NodeIdentity {
    let parsed = JoinToken::parse(token).unwrap();
    // Step 1: the root as fetched over the unverified bootstrap connection.
    let root = flotilla::ca::verify_root_for_token(&parsed, service.root().der()).unwrap();
    let pending = PendingIdentity::generate().unwrap();
    let issued = service
        .join(SOURCE, token, pending.csr_der(), Instant::now(), now())
        .unwrap();
    assert_eq!(issued.identity.role, role_expected);
    let identity = pending.complete(&issued.cert_der, &root, now()).unwrap();
    assert_eq!(identity.peer(), &issued.identity);
    identity
}

#[test]
fn join_with_each_token_yields_the_token_role_and_a_working_identity() {
    let service = service(new_ca());
    let worker = join(
        &service,
        &service.token(Role::Worker).to_string(),
        Role::Worker,
    );
    let manager = join(
        &service,
        &service.token(Role::Manager).to_string(),
        Role::Manager,
    );
    assert_ne!(worker.node_id(), manager.node_id());
    assert_eq!(worker.cluster_id(), service.ca().cluster_id());
    let outcome = connect(
        client_config(&worker, service.root()).unwrap(),
        server_config(&manager, service.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");
}

#[test]
fn root_accepted_as_pem_too() {
    let ca = new_ca();
    let token = JoinTokens::generate(ca.root()).token(Role::Worker);
    let root = flotilla::ca::verify_root_for_token(&token, ca.root().to_pem().as_bytes()).unwrap();
    assert_eq!(&root, ca.root());
}

#[test]
fn wrong_secret_rotated_token_and_other_cluster_token_are_refused() {
    let service = service(new_ca());
    let pending = PendingIdentity::generate().unwrap();
    let csr = pending.csr_der();
    let t = Instant::now();

    let valid = service.token(Role::Worker).to_string();
    let mut wrong = valid.clone();
    let last = wrong.pop().unwrap();
    wrong.push(if last == '0' { '1' } else { '0' });
    let err = service.join(SOURCE, &wrong, csr, t, now()).unwrap_err();
    assert!(
        matches!(err, IssueError::Token(TokenError::WrongSecret)),
        "{err}"
    );

    let old = service.token(Role::Worker);
    let new = service.rotate_token(Role::Worker);
    let source2 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 8));
    let err = service
        .join(source2, &old.to_string(), csr, t, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Token(TokenError::WrongSecret)),
        "{err}"
    );
    assert!(
        service
            .join(source2, &new.to_string(), csr, t, now())
            .is_ok()
    );

    let foreign = JoinTokens::generate(new_ca().root())
        .token(Role::Worker)
        .to_string();
    let err = service.join(source2, &foreign, csr, t, now()).unwrap_err();
    assert!(
        matches!(err, IssueError::Token(TokenError::WrongCluster)),
        "{err}"
    );

    let err = service
        .join(source2, "SWMTKN-1-abc-def", csr, t, now())
        .unwrap_err();
    assert!(
        matches!(err, IssueError::Token(TokenError::Malformed(_))),
        "{err}"
    );
}

#[test]
fn repeated_failures_are_rate_limited_even_with_a_valid_token_afterwards() {
    let service = service(new_ca());
    let pending = PendingIdentity::generate().unwrap();
    let valid = service.token(Role::Worker).to_string();
    let bad = format!("FLT-1-{}-{}", service.root().digest_hex(), "0".repeat(32));
    let t0 = Instant::now();
    for i in 0..3 {
        let err = service
            .join(
                SOURCE,
                &bad,
                pending.csr_der(),
                t0 + Duration::from_secs(i),
                now(),
            )
            .unwrap_err();
        assert!(matches!(err, IssueError::Token(_)), "attempt {i}: {err}");
    }
    let err = service
        .join(
            SOURCE,
            &valid,
            pending.csr_der(),
            t0 + Duration::from_secs(3),
            now(),
        )
        .unwrap_err();
    match err {
        IssueError::RateLimited { retry_after } => assert_eq!(retry_after, Duration::from_secs(5)),
        other => panic!("expected a rate limit, got {other}"),
    }
    // Another address is not affected.
    let elsewhere = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    assert!(
        service
            .join(
                elsewhere,
                &valid,
                pending.csr_der(),
                t0 + Duration::from_secs(3),
                now()
            )
            .is_ok()
    );
    // After the window the valid token works from the limited address too.
    assert!(
        service
            .join(
                SOURCE,
                &valid,
                pending.csr_der(),
                t0 + Duration::from_secs(8),
                now()
            )
            .is_ok()
    );
}

#[test]
fn csr_subject_and_extensions_are_ignored() {
    let service = service(new_ca());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "chosen-node-id");
    dn.push(rcgen::DnType::OrganizationalUnitName, "manager");
    dn.push(rcgen::DnType::OrganizationName, "other-cluster");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let csr = params.serialize_request(&key).unwrap();
    let token = service.token(Role::Worker).to_string();
    let issued = service
        .join(
            SOURCE,
            &token,
            csr.pem().unwrap().as_bytes(),
            Instant::now(),
            now(),
        )
        .unwrap();

    let (_, cert) = X509Certificate::from_der(&issued.cert_der).unwrap();
    let cn: Vec<_> = cert
        .subject()
        .iter_common_name()
        .map(|a| a.as_str().unwrap())
        .collect();
    let ou: Vec<_> = cert
        .subject()
        .iter_organizational_unit()
        .map(|a| a.as_str().unwrap())
        .collect();
    let o: Vec<_> = cert
        .subject()
        .iter_organization()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(cn, vec![issued.identity.node_id.as_str()]);
    assert_ne!(cn[0], "chosen-node-id");
    assert_eq!(
        ou,
        vec!["worker"],
        "the role comes from the token, not the CSR"
    );
    assert_eq!(o, vec![service.ca().cluster_id()]);
    assert!(
        cert.subject_alternative_name().unwrap().is_none(),
        "no SAN copied from the CSR"
    );
    assert!(!cert.is_ca(), "a node certificate is never a CA");
    // The certificate carries the CSR's key.
    assert_eq!(
        cert.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    // Validity: backdated 1 h, 90 days ahead.
    let lifetime = issued.not_after.duration_since(issued.not_before).unwrap();
    assert_eq!(lifetime, 90 * DAY + flotilla::ca::CERT_BACKDATE);
}

#[test]
fn csr_with_a_bad_signature_is_refused_and_not_counted_as_a_guess() {
    let service = service(new_ca());
    let pending = PendingIdentity::generate().unwrap();
    let mut csr = pending.csr_der().to_vec();
    let last = csr.len() - 1;
    csr[last] ^= 0x55;
    let token = service.token(Role::Worker).to_string();
    let t = Instant::now();
    for _ in 0..5 {
        let err = service.join(SOURCE, &token, &csr, t, now()).unwrap_err();
        assert!(matches!(err, IssueError::Csr(_)), "{err}");
    }
}

use rcgen::PublicKeyData;

#[test]
fn renewal_keeps_node_id_and_role_and_changes_the_key() {
    let service = service(new_ca());
    let worker = join(
        &service,
        &service.token(Role::Worker).to_string(),
        Role::Worker,
    );

    // The CSR asks to become a manager; the CA ignores it.
    let pending = PendingIdentity::generate().unwrap();
    let issued = service
        .renew(worker.peer(), pending.csr_der(), now())
        .unwrap();
    let renewed = pending
        .complete_renewal(&issued.cert_der, service.root(), worker.peer(), now())
        .unwrap();
    assert_eq!(renewed.peer(), worker.peer());
    assert_ne!(renewed.cert_der(), worker.cert_der());
    assert_ne!(
        X509Certificate::from_der(renewed.cert_der())
            .unwrap()
            .1
            .public_key()
            .raw,
        X509Certificate::from_der(worker.cert_der())
            .unwrap()
            .1
            .public_key()
            .raw,
    );
    // A renewed certificate for someone else is refused by the node.
    let other = join(
        &service,
        &service.token(Role::Manager).to_string(),
        Role::Manager,
    );
    let pending = PendingIdentity::generate().unwrap();
    let issued = service
        .renew(other.peer(), pending.csr_der(), now())
        .unwrap();
    let err = pending
        .complete_renewal(&issued.cert_der, service.root(), worker.peer(), now())
        .unwrap_err();
    assert!(matches!(err, CertError::IdentityChanged { .. }), "{err}");
}

#[test]
fn renewal_for_an_identity_of_another_cluster_is_refused() {
    let service = service(new_ca());
    let stranger = identity(&new_ca(), Role::Manager);
    let pending = PendingIdentity::generate().unwrap();
    let err = service
        .renew(stranger.peer(), pending.csr_der(), now())
        .unwrap_err();
    assert!(matches!(err, IssueError::WrongCluster { .. }), "{err}");
}

#[test]
fn completing_with_a_wrong_certificate_is_refused() {
    let ca = new_ca();
    let other = new_ca();
    // A certificate for another key.
    let someone_else = identity(&ca, Role::Worker);
    let pending = PendingIdentity::generate().unwrap();
    let err = pending
        .complete(someone_else.cert_der(), ca.root(), now())
        .unwrap_err();
    assert!(matches!(err, CertError::KeyMismatch), "{err}");
    // A certificate for our key but from another CA.
    let pending = PendingIdentity::generate().unwrap();
    let issued = other
        .issue_new_node(pending.csr_der(), Role::Worker, now())
        .unwrap();
    let err = pending
        .complete(&issued.cert_der, ca.root(), now())
        .unwrap_err();
    assert!(matches!(err, CertError::NotSignedByRoot), "{err}");
}

// ---------------------------------------------------------------------------------------
// Files.

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_and_node_files_are_0600_and_load_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let ca_path = dir.path().join(flotilla::ca::CA_FILE_NAME);
    ca.save(&ca_path).unwrap();
    assert_eq!(mode(&ca_path), 0o600);

    let loaded = ClusterCa::load(&ca_path, CaPolicy::default()).unwrap();
    assert_eq!(loaded.root(), ca.root());
    assert_eq!(loaded.cluster_id(), ca.cluster_id());

    // The loaded CA issues certificates that the TLS layer accepts alongside the originals.
    let from_loaded = identity(&loaded, Role::Worker);
    let from_original = identity(&ca, Role::Manager);
    let outcome = connect(
        client_config(&from_loaded, ca.root()).unwrap(),
        server_config(&from_original, loaded.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");

    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    save_node_files(&node_dir, &from_loaded, ca.root()).unwrap();
    for name in [
        flotilla::ca::NODE_IDENTITY_FILE,
        flotilla::ca::ROOT_CERT_FILE,
    ] {
        assert_eq!(mode(&node_dir.join(name)), 0o600, "{name}");
    }
    let (back, root) = load_node_files(&node_dir).unwrap();
    assert_eq!(back.peer(), from_loaded.peer());
    assert_eq!(back.cert_der(), from_loaded.cert_der());
    assert_eq!(&root, ca.root());
    // And it still works for TLS.
    let outcome = connect(
        client_config(&back, &root).unwrap(),
        server_config(&from_original, ca.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");
}

#[test]
fn loading_refuses_missing_exposed_corrupt_and_mismatched_files() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let ca_path = dir.path().join("ca.pem");

    let err = ClusterCa::load(&ca_path, CaPolicy::default()).unwrap_err();
    assert!(
        matches!(err, CaError::Storage(StorageError::Missing { .. })),
        "{err}"
    );

    ca.save(&ca_path).unwrap();
    std::fs::set_permissions(&ca_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ClusterCa::load(&ca_path, CaPolicy::default()).unwrap_err();
    assert!(
        matches!(
            err,
            CaError::Storage(StorageError::InsecurePermissions { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("chmod 600"), "{err}");

    // Key of one CA with the certificate of another.
    let other = new_ca();
    let mine = pem::parse_many(ca.to_pem_bundle()).unwrap();
    let theirs = pem::parse_many(other.to_pem_bundle()).unwrap();
    let mixed = pem::encode_many(&[mine[0].clone(), theirs[1].clone()]);
    let err = ClusterCa::from_pem_bundle(mixed.as_bytes(), CaPolicy::default()).unwrap_err();
    assert!(
        matches!(err, CaError::Storage(StorageError::Corrupt { .. })),
        "{err}"
    );

    // Truncated file.
    let bundle = ca.to_pem_bundle();
    flotilla::util::fsutil::write_atomic(&ca_path, &bundle.as_bytes()[..bundle.len() / 2], 0o600)
        .unwrap();
    let err = ClusterCa::load(&ca_path, CaPolicy::default()).unwrap_err();
    assert!(
        matches!(err, CaError::Storage(StorageError::Corrupt { .. })),
        "{err}"
    );

    // Node files: identity of another cluster than the stored root.
    let node_dir = dir.path().join("node");
    std::fs::create_dir(&node_dir).unwrap();
    let err = load_node_files(&node_dir).unwrap_err();
    assert!(matches!(err, StorageError::Missing { .. }), "{err}");
    let stranger = identity(&other, Role::Worker);
    save_node_files(&node_dir, &stranger, ca.root()).unwrap();
    let err = load_node_files(&node_dir).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
    save_node_files(&node_dir, &stranger, other.root()).unwrap();
    let node_pem = node_dir.join(flotilla::ca::NODE_IDENTITY_FILE);
    std::fs::set_permissions(&node_pem, std::fs::Permissions::from_mode(0o604)).unwrap();
    let err = load_node_files(&node_dir).unwrap_err();
    assert!(
        matches!(err, StorageError::InsecurePermissions { .. }),
        "{err}"
    );
}

#[test]
fn an_expired_identity_still_loads_so_the_node_can_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let ca = new_ca();
    let expired = identity_issued_at(&ca, Role::Worker, now() - 200 * DAY);
    save_node_files(dir.path(), &expired, ca.root()).unwrap();
    let (back, _) = load_node_files(dir.path()).unwrap();
    assert!(!back.is_valid_at(now()));
    // But completing a join with an out-of-date certificate is refused.
    let pending = PendingIdentity::generate().unwrap();
    let issued = ca
        .issue_new_node(pending.csr_der(), Role::Worker, now() - 200 * DAY)
        .unwrap();
    let err = pending
        .complete(&issued.cert_der, ca.root(), now())
        .unwrap_err();
    assert!(matches!(err, CertError::OutsideValidity { .. }), "{err}");
}

#[test]
fn policy_bounds_are_enforced() {
    let short = CaPolicy {
        node_cert_validity: Duration::from_secs(59),
    };
    assert!(matches!(
        ClusterCa::create(now(), short),
        Err(CaError::BadPolicy(_))
    ));
    let minute = CaPolicy {
        node_cert_validity: Duration::from_secs(60),
    };
    let ca = ClusterCa::create(now(), minute).unwrap();
    let id = identity(&ca, Role::Worker);
    assert_eq!(
        id.not_after().duration_since(id.not_before()).unwrap(),
        Duration::from_secs(60) + flotilla::ca::CERT_BACKDATE
    );
}

// ---------------------------------------------------------------------------------------
// Renewal timing.

#[test]
fn renewal_instant_is_uniform_between_50_and_80_percent_of_the_lifetime() {
    let not_before = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let lifetime = 90 * DAY;
    let not_after = not_before + lifetime;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut min, mut max) = (f64::MAX, f64::MIN);
    let mut below_65 = 0;
    const SAMPLES: u32 = 10_000;
    for _ in 0..SAMPLES {
        let at = renewal_instant(not_before, not_after, &mut rng);
        let fraction =
            at.duration_since(not_before).unwrap().as_secs_f64() / lifetime.as_secs_f64();
        assert!(
            (0.5..=0.8).contains(&fraction),
            "renewal at {fraction} of the lifetime"
        );
        min = min.min(fraction);
        max = max.max(fraction);
        if fraction < 0.65 {
            below_65 += 1;
        }
    }
    // Spread over the whole window, and about half on each side of its middle.
    assert!(min < 0.505 && max > 0.795, "min {min}, max {max}");
    assert!(
        (4_500..=5_500).contains(&below_65),
        "{below_65} of {SAMPLES} below 65 %"
    );

    // The identity helper uses the certificate's own window.
    let ca = new_ca();
    let id = identity(&ca, Role::Worker);
    let at = id.renewal_at(&mut rng);
    let life = id.not_after().duration_since(id.not_before()).unwrap();
    let offset = at.duration_since(id.not_before()).unwrap();
    assert!(
        offset >= life / 2 && offset <= life * 4 / 5,
        "{offset:?} of {life:?}"
    );
    // An inverted window means "renew now".
    assert_eq!(renewal_instant(not_after, not_before, &mut rng), not_after);
}

#[test]
fn root_certificate_carries_the_cluster_id_and_a_20_year_validity() {
    let ca = new_ca();
    let (_, cert) = X509Certificate::from_der(ca.root().der()).unwrap();
    assert!(cert.is_ca());
    let o: Vec<_> = cert
        .subject()
        .iter_organization()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(o, vec![ca.cluster_id()]);
    assert!(flotilla::ca::is_valid_id(ca.cluster_id()));
    let v = cert.validity();
    let years = (v.not_after.timestamp() - v.not_before.timestamp()) as f64 / (365.25 * 86_400.0);
    assert!((19.99..20.01).contains(&years), "{years} years");
    // Public key: ECDSA P-256.
    assert_eq!(
        cert.public_key().algorithm.algorithm.to_id_string(),
        "1.2.840.10045.2.1",
        "id-ecPublicKey"
    );
    assert_ne!(new_ca().cluster_id(), ca.cluster_id());
}

/// An admin certificate issued by the CA from a CSR: the requested lifetime.
fn admin_identity(ca: &ClusterCa, lifetime: Duration) -> NodeIdentity {
    let pending = PendingIdentity::generate().unwrap();
    let issued = ca.issue_admin(pending.csr_der(), lifetime, now()).unwrap();
    assert_eq!(issued.identity.role, Role::Admin);
    pending
        .complete(&issued.cert_der, ca.root(), now())
        .unwrap()
}

#[test]
fn admin_certificate_is_a_client_with_its_own_lifetime_never_a_server_nor_renewed() {
    let ca = new_ca();
    let manager = identity(&ca, Role::Manager);
    let admin = admin_identity(&ca, 2 * DAY);
    let lifetime = admin
        .not_after()
        .duration_since(admin.not_before())
        .unwrap();
    assert!(
        lifetime >= 2 * DAY && lifetime <= 2 * DAY + flotilla::ca::CERT_BACKDATE,
        "{lifetime:?}"
    );
    assert_ne!(admin.node_id(), manager.node_id());

    // Accepted as a client, identified as an admin.
    let outcome = connect(
        client_config(&admin, ca.root()).unwrap(),
        server_config(&manager, ca.root()).unwrap(),
    );
    assert!(outcome.accepted(), "{outcome:?}");
    assert_eq!(
        outcome.client_seen_by_server.as_ref().map(|p| p.role),
        Some(Role::Admin)
    );

    // Never a server: a client refuses an admin as it refuses a worker.
    let outcome = connect(
        client_config(&manager, ca.root()).unwrap(),
        server_config(&admin, ca.root()).unwrap(),
    );
    assert_client_refused_server(&outcome, "admin as server");

    // Never renewed as a node.
    let pending = PendingIdentity::generate().unwrap();
    let err = service(ca)
        .renew(admin.peer(), pending.csr_der(), now())
        .unwrap_err();
    assert!(matches!(err, IssueError::NotANode { .. }), "{err}");
}
