//! rustls configurations for the transport, and the certificate verifiers behind them.
//!
//! Every config uses the `ring` provider explicitly (never a process default), TLS 1.3 only
//! (all peers are flotilla; no legacy to talk to), and no session resumption: connections are
//! long-lived, one per peer, and a resumed session would carry a client identity that is not
//! re-verified (an expired certificate could live on through resumption).
//!
//! | config | presents | verifies the peer |
//! |---|---|---|
//! | [`server_config`] | node cert | client cert optional; if present: chains to the root, in date, O = cluster id, OU a known role |
//! | [`client_config`] | node cert | server chains to the root, in date, O = cluster id, OU = manager |
//! | [`pinned_root_client_config`] | nothing | as `client_config` (used to send a CSR + token secret) |
//! | [`bootstrap_client_config`] | nothing | NOTHING (used only to fetch the root CA, then pinned by the token digest) |
//!
//! Hostnames are not checked: node certificates name nodes, not addresses, and managers move.
//! That is safe because the only trust anchor is the cluster's own private root CA, which signs
//! nothing but this cluster's node certificates, and the verifier requires O = our cluster id
//! and OU = manager. A server passing it is by construction a manager of our cluster, which is
//! exactly what the caller wanted to reach; an attacker would need a manager's private key.
//!
//! A node presents its certificate through a [`LiveIdentity`]: a renewed certificate is
//! swapped in there and used from the next handshake on, without rebuilding any config.
//!
//! After the handshake, [`peer_identity`] reads the verified identity for the RPC handlers.
//! Must never accept a client certificate that the handshake would not (the server verifier
//! is the only gate), nor use [`bootstrap_client_config`] for anything but fetching the root.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, ParsedCertificate, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use super::identity::{CertError, PeerIdentity, Role};
use super::node::NodeIdentity;
use super::root::RootCert;

/// The server name to give `rustls::ClientConnection::new`. It is not checked by our
/// verifiers (see the module documentation) and is sent as SNI.
pub const TLS_SERVER_NAME: &str = "flotilla-manager";

/// [`TLS_SERVER_NAME`] as a rustls server name.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(TLS_SERVER_NAME).expect("TLS_SERVER_NAME is a valid DNS name")
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the configuration (for instance a key it cannot use).
    #[error("cannot build the TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A renewed identity is not the same node as the one it would replace.
    #[error(
        "the renewed certificate is for node {renewed}, not {current}; a renewal never changes \
         the node"
    )]
    OtherNode {
        /// The node presented until now.
        current: String,
        /// The node the new certificate names.
        renewed: String,
    },
    /// The node's identity and the root belong to different clusters.
    #[error(
        "node identity is of cluster {identity}, but the root CA is of cluster {root}; the node files are mixed up"
    )]
    ClusterMismatch {
        /// The identity's cluster.
        identity: String,
        /// The root's cluster.
        root: String,
    },
}

/// The crypto provider of every flotilla TLS config: ring, chosen explicitly.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server side for every manager listener: presents `identity`; asks for a client
/// certificate but lets clients without one finish the handshake (they may then only call
/// the CA bootstrap methods: the transport enforces that from [`peer_identity`] = `None`).
/// A client that DOES present a certificate is refused at the handshake unless it chains to
/// `root`, is in date, and names our cluster and a known role.
///
/// # Errors
/// [`TlsError`] when the identity is of another cluster or rustls refuses the key.
pub fn server_config(identity: &NodeIdentity, root: &RootCert) -> Result<ServerConfig, TlsError> {
    server_config_live(LiveIdentity::new(identity, root)?, root)
}

/// [`server_config`] presenting whatever `live` holds at each handshake.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn server_config_live(
    live: Arc<LiveIdentity>,
    root: &RootCert,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(root_store(root)?, provider.clone())
        .allow_unauthenticated()
        .build()?;
    let verifier = Arc::new(ClusterClientVerifier {
        webpki,
        cluster_id: root.cluster_id().to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(live);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client side for a node talking to a manager: presents `identity`, and accepts only a
/// server certificate that chains to `root`, is in date, and names a manager of our cluster.
///
/// # Errors
/// [`TlsError`] when the identity is of another cluster or rustls refuses the key.
pub fn client_config(identity: &NodeIdentity, root: &RootCert) -> Result<ClientConfig, TlsError> {
    client_config_live(LiveIdentity::new(identity, root)?, root)
}

/// [`client_config`] presenting whatever `live` holds at each handshake.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn client_config_live(
    live: Arc<LiveIdentity>,
    root: &RootCert,
) -> Result<ClientConfig, TlsError> {
    let config = client_builder(Arc::new(ClusterServerVerifier::new(root)?))?
        .with_client_cert_resolver(live);
    Ok(without_resumption(config))
}

/// [`client_config_live`] for node-to-node calls (gossip bulk sync): the server may be any
/// node of the cluster, worker or manager (its certificate still chains to `root` and names
/// our cluster).
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn peer_client_config_live(
    live: Arc<LiveIdentity>,
    root: &RootCert,
) -> Result<ClientConfig, TlsError> {
    let mut verifier = ClusterServerVerifier::new(root)?;
    verifier.role = None;
    let config = client_builder(Arc::new(verifier))?.with_client_cert_resolver(live);
    Ok(without_resumption(config))
}

/// This node's certificate and key as its handshakes present them, replaceable while the
/// node runs: a renewed certificate goes in with [`LiveIdentity::set`] and is presented from
/// the next handshake on, by every config built on it (connections already up keep theirs).
pub struct LiveIdentity {
    node_id: String,
    cluster_id: String,
    current: parking_lot::Mutex<Arc<CertifiedKey>>,
}

impl fmt::Debug for LiveIdentity {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LiveIdentity({})", self.node_id)
    }
}

impl LiveIdentity {
    /// Presents `identity`, which must belong to `root`'s cluster.
    ///
    /// # Errors
    /// [`TlsError::ClusterMismatch`], or rustls refusing the key.
    pub fn new(identity: &NodeIdentity, root: &RootCert) -> Result<Arc<LiveIdentity>, TlsError> {
        check_same_cluster(identity, root)?;
        Ok(Arc::new(LiveIdentity {
            node_id: identity.node_id().to_owned(),
            cluster_id: identity.cluster_id().to_owned(),
            current: parking_lot::Mutex::new(certified_key(identity)?),
        }))
    }

    /// Presents `renewed` from the next handshake on.
    ///
    /// # Errors
    /// [`TlsError::OtherNode`] or [`TlsError::ClusterMismatch`] if it is not the same node
    /// of the same cluster (nothing changes then); rustls refusing the key.
    pub fn set(&self, renewed: &NodeIdentity) -> Result<(), TlsError> {
        if renewed.node_id() != self.node_id {
            return Err(TlsError::OtherNode {
                current: self.node_id.clone(),
                renewed: renewed.node_id().to_owned(),
            });
        }
        if renewed.cluster_id() != self.cluster_id {
            return Err(TlsError::ClusterMismatch {
                identity: renewed.cluster_id().to_owned(),
                root: self.cluster_id.clone(),
            });
        }
        *self.current.lock() = certified_key(renewed)?;
        Ok(())
    }

    /// The certificate presented now.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.current.lock().cert[0].clone()
    }
}

impl rustls::client::ResolvesClientCert for LiveIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current.lock().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for LiveIdentity {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.lock().clone())
    }
}

fn certified_key(identity: &NodeIdentity) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = provider()
        .key_provider
        .load_private_key(identity.private_key())?;
    Ok(Arc::new(CertifiedKey::new(
        vec![identity.cert_der().clone()],
        key,
    )))
}

/// Client side for a joining node's second step: no client certificate; the server must be
/// a manager of the cluster whose root was pinned by the token, so the token's secret never
/// goes anywhere else.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn pinned_root_client_config(root: &RootCert) -> Result<ClientConfig, TlsError> {
    let config = client_builder(Arc::new(ClusterServerVerifier::new(root)?))?.with_no_client_auth();
    Ok(without_resumption(config))
}

/// Client side for a joining node's first step ONLY: no client certificate and NO server
/// verification. Use it to fetch the root CA certificate, then pin that with
/// [`super::verify_root_for_token`] before trusting anything it said; send nothing secret on
/// such a connection.
///
/// # Errors
/// [`TlsError`] if rustls refuses the configuration.
pub fn bootstrap_client_config() -> Result<ClientConfig, TlsError> {
    let verifier = Arc::new(UnverifiedServer {
        algorithms: provider().signature_verification_algorithms,
    });
    let config = client_builder(verifier)?.with_no_client_auth();
    Ok(without_resumption(config))
}

/// The verified identity of the peer of a finished handshake: `conn.peer_certificates()` of
/// a `ServerConnection` built from [`server_config`] (or a `ClientConnection` from
/// [`client_config`]). `None` means the client presented no certificate (bootstrap only).
///
/// # Errors
/// [`CertError`] if the certificate does not name an identity (cannot happen after our
/// verifiers accepted it; treat as Unauthenticated).
pub fn peer_identity(
    certificates: Option<&[CertificateDer<'_>]>,
) -> Result<Option<PeerIdentity>, CertError> {
    match certificates.and_then(<[_]>::first) {
        None => Ok(None),
        Some(end_entity) => PeerIdentity::from_cert_der(end_entity).map(Some),
    }
}

fn check_same_cluster(identity: &NodeIdentity, root: &RootCert) -> Result<(), TlsError> {
    if identity.cluster_id() != root.cluster_id() {
        return Err(TlsError::ClusterMismatch {
            identity: identity.cluster_id().to_owned(),
            root: root.cluster_id().to_owned(),
        });
    }
    Ok(())
}

fn root_store(root: &RootCert) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    store.add(root.der().clone())?;
    Ok(Arc::new(store))
}

fn client_builder(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

fn without_resumption(mut config: ClientConfig) -> ClientConfig {
    config.resumption = Resumption::disabled();
    config
}

/// Checks the cluster-specific part of an already chain-verified certificate.
fn check_member(
    end_entity: &CertificateDer<'_>,
    cluster_id: &str,
    required_role: Option<Role>,
) -> Result<PeerIdentity, rustls::Error> {
    let peer = PeerIdentity::from_cert_der(end_entity).map_err(refusal)?;
    if peer.cluster_id != cluster_id {
        return Err(refusal(CertError::ClusterMismatch {
            expected: cluster_id.to_owned(),
            found: peer.cluster_id,
        }));
    }
    if let Some(role) = required_role
        && peer.role != role
    {
        return Err(refusal(RoleRefused {
            found: peer.role,
            required: role,
        }));
    }
    Ok(peer)
}

fn refusal(error: impl std::error::Error) -> rustls::Error {
    log::debug!("tls: refusing peer certificate: {error}");
    let refusal = Refusal(error.to_string());
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(refusal))))
}

/// Why our verifier refused a certificate. rustls prints the `Debug` form of custom errors,
/// so `Debug` writes the readable message too.
struct Refusal(String);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refusal {}

/// A server certificate whose role may not serve (a worker posing as a manager).
#[derive(Debug, thiserror::Error)]
#[error("peer certificate is for a {found}, but only a {required} may serve this connection")]
struct RoleRefused {
    found: Role,
    required: Role,
}

/// webpki's client verifier (chain to the root, dates, key usage) plus the cluster checks.
struct ClusterClientVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    cluster_id: String,
}

impl fmt::Debug for ClusterClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterClientVerifier")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ClusterClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Bootstrap calls come without a certificate; per-method enforcement is the
        // transport's job (identity None => bootstrap methods only).
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.webpki
            .verify_client_cert(end_entity, intermediates, now)?;
        check_member(end_entity, &self.cluster_id, None)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Verifies a server against the pinned cluster root and cluster id instead of a hostname.
struct ClusterServerVerifier {
    roots: Arc<RootCertStore>,
    cluster_id: String,
    algorithms: WebPkiSupportedAlgorithms,
    /// The role the server must have (`None`: any node of the cluster).
    role: Option<Role>,
}

impl ClusterServerVerifier {
    fn new(root: &RootCert) -> Result<Self, TlsError> {
        Ok(ClusterServerVerifier {
            roots: root_store(root)?,
            cluster_id: root.cluster_id().to_owned(),
            algorithms: provider().signature_verification_algorithms,
            role: Some(Role::Manager),
        })
    }
}

impl fmt::Debug for ClusterServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterServerVerifier")
            .field("cluster_id", &self.cluster_id)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        // The name check a browser would do is replaced by this (module documentation).
        check_member(end_entity, &self.cluster_id, self.role)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Accepts any server certificate. Only for fetching the root CA, whose bytes are then
/// pinned by the join token's digest; the handshake signature is still checked (it proves
/// nothing useful here, but costs nothing and keeps the handshake well-formed).
struct UnverifiedServer {
    algorithms: WebPkiSupportedAlgorithms,
}

impl fmt::Debug for UnverifiedServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnverifiedServer")
    }
}

impl ServerCertVerifier for UnverifiedServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod live_identity_tests {
    use std::time::SystemTime;

    use rustls::client::ResolvesClientCert;

    use super::*;
    use crate::ca::node::PendingIdentity;
    use crate::ca::{CaPolicy, ClusterCa};

    fn presented(live: &LiveIdentity) -> CertificateDer<'static> {
        live.resolve(&[], &[])
            .expect("a live identity always presents")
            .cert[0]
            .clone()
    }

    #[test]
    fn a_renewed_certificate_is_presented_from_then_on_and_only_for_the_same_node() {
        let now = SystemTime::now();
        let ca = ClusterCa::create(now, CaPolicy::default()).unwrap();
        let first = ca.issue_local_identity(Role::Worker, now).unwrap();
        let live = LiveIdentity::new(&first, ca.root()).unwrap();
        assert_eq!(presented(&live), *first.cert_der());

        let pending = PendingIdentity::generate().unwrap();
        let issued = ca.renew(first.peer(), pending.csr_der(), now).unwrap();
        let renewed = pending
            .complete_renewal(&issued.cert_der, ca.root(), first.peer(), now)
            .unwrap();
        assert_ne!(renewed.cert_der(), first.cert_der());
        live.set(&renewed).unwrap();
        assert_eq!(presented(&live), *renewed.cert_der());
        assert_eq!(live.cert_der(), *renewed.cert_der());

        // Another node's certificate never replaces this node's.
        let other = ca.issue_local_identity(Role::Worker, now).unwrap();
        assert!(matches!(live.set(&other), Err(TlsError::OtherNode { .. })));
        assert_eq!(presented(&live), *renewed.cert_der());
        assert_eq!(
            format!("{live:?}"),
            format!("LiveIdentity({})", first.node_id())
        );
    }
}
