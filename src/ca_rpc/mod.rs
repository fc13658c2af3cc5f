//! The CA over the network: serves `ca.GetRootCa` and `ca.IssueNodeCertificate` (the
//! bootstrap methods, callable without a client certificate) and `ca.RenewNodeCertificate`
//! (mutual TLS), and runs a node's side of joining and renewing ([`renewal`]: the
//! `ca-renewer` thread).
//!
//! `ca` itself is sans-IO and lies below `net` (the transport verifies peers with its TLS
//! configurations); this module is the CA's IO, above `net`, and does it only through
//! [`net`](crate::net). It must never send a join token's secret before the served root CA
//! was pinned against the token.

pub mod renewal;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::ca::{
    CaService, CertError, IssueError, JoinError, JoinToken, NodeIdentity, PeerIdentity,
    PendingIdentity, Role, RootCert, SharedCa, TokenError, TokenParseError, tls,
    verify_root_for_token,
};
use crate::net::{CallOptions, Channel, Router, ServicePool, Transport};
use crate::proto::ca::rpc::{GET_ROOT_CA, ISSUE_NODE_CERTIFICATE, RENEW_NODE_CERTIFICATE};
use crate::proto::ca::{
    GetRootCaRequest, GetRootCaResponse, IssueNodeCertificateRequest, IssueNodeCertificateResponse,
    RenewNodeCertificateRequest, RenewNodeCertificateResponse,
};
use crate::wire::{Code, Status};

/// Wait before asking again a manager that refused a join with
/// [`RETRY_SOON`](crate::wire::RETRY_SOON) (it does not hold the CA key yet); the join
/// retries so until its `timeout` runs out.
pub const JOIN_RETRY_SOON_WAIT: Duration = Duration::from_millis(250);

/// Decides the role a renewed certificate gets, from what the cluster knows of the caller
/// (its Node object): the role it holds now, or a new one after a promotion or a completed
/// demotion. `Err` refuses the renewal with the reason (for example a demotion still under
/// way). The CA itself never reads the cluster state; the manager supplies this.
pub type RoleResolver = Arc<dyn Fn(&PeerIdentity) -> Result<Role, String> + Send + Sync>;

/// A resolver that keeps every caller's role (no role changes at renewal).
pub fn keep_roles() -> RoleResolver {
    Arc::new(|caller: &PeerIdentity| Ok(caller.role))
}

/// Serves the CA's methods from `service` on `pool`; renewals keep the caller's role.
pub fn register(router: &mut Router, pool: &ServicePool, service: &Arc<CaService>) {
    let root = service.root().clone();
    register_shared(
        router,
        pool,
        &Arc::new(SharedCa::with(service.clone())),
        root,
        keep_roles(),
    );
}

/// The refusal of a manager that does not hold the CA key (yet).
fn no_ca_here() -> Status {
    Status::retry_soon(
        Code::FailedPrecondition,
        "this manager does not hold the cluster CA key yet (it arrives with the replicated \
         cluster object); retry in a moment or use another manager",
    )
}

/// Serves the CA's methods from whatever CA `shared` holds at each call; `root` (this
/// node's own trust anchor) answers `ca.GetRootCa` even before the key arrives.
pub fn register_shared(
    router: &mut Router,
    pool: &ServicePool,
    shared: &Arc<SharedCa>,
    root: RootCert,
    roles: RoleResolver,
) {
    router.serve_unary(GET_ROOT_CA, pool, move |_, _: GetRootCaRequest| {
        Ok(GetRootCaResponse {
            root_cert_der: root.der().to_vec().into(),
        })
    });
    let slot = shared.clone();
    router.serve_unary(
        ISSUE_NODE_CERTIFICATE,
        pool,
        move |ctx, request: IssueNodeCertificateRequest| {
            let ca = slot.get().ok_or_else(no_ca_here)?;
            let issued = ca
                .join(
                    ctx.peer_addr().ip(),
                    &request.token,
                    &request.csr_der,
                    Instant::now(),
                    SystemTime::now(),
                )
                .map_err(issue_status)?;
            Ok(IssueNodeCertificateResponse {
                cert_der: issued.cert_der.to_vec().into(),
            })
        },
    );
    let slot = shared.clone();
    router.serve_unary(
        RENEW_NODE_CERTIFICATE,
        pool,
        move |ctx, request: RenewNodeCertificateRequest| {
            let caller = ctx
                .peer()
                .expect("allow=nodes admits only callers with a verified certificate");
            let ca = slot.get().ok_or_else(no_ca_here)?;
            let role =
                roles(caller).map_err(|reason| Status::new(Code::FailedPrecondition, reason))?;
            let subject = PeerIdentity {
                role,
                ..caller.clone()
            };
            if role != caller.role {
                log::info!("ca: {caller} renews as {role} (its role in the cluster changed)");
            }
            let issued = ca
                .renew(&subject, &request.csr_der, SystemTime::now())
                .map_err(issue_status)?;
            Ok(RenewNodeCertificateResponse {
                cert_der: issued.cert_der.to_vec().into(),
            })
        },
    );
}

/// The status a caller sees for a failed issue or renewal.
pub(crate) fn issue_status(error: IssueError) -> Status {
    let code = match &error {
        IssueError::RateLimited { .. } => Code::ResourceExhausted,
        IssueError::Token(TokenError::Malformed(_)) | IssueError::Csr(_) => Code::InvalidArgument,
        IssueError::Token(_) | IssueError::WrongCluster { .. } | IssueError::NotANode { .. } => {
            Code::PermissionDenied
        }
        IssueError::Clock(_) | IssueError::Signing(_) | IssueError::Issued(_) => Code::Internal,
    };
    Status::new(code, error.to_string())
}

/// Why joining a cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum JoinClusterError {
    /// The token given by the operator does not parse.
    #[error("the join token is malformed: {0}")]
    Token(#[from] TokenParseError),
    /// The manager could not be asked for the root CA.
    #[error("cannot fetch the root CA certificate from {manager}: {status}")]
    FetchRoot {
        /// The manager's address.
        manager: String,
        /// What the call returned.
        status: Status,
    },
    /// The served root CA is not the one the token pins.
    #[error(transparent)]
    Root(#[from] JoinError),
    /// A key pair or CSR could not be made.
    #[error("cannot create a key pair: {0}")]
    Key(#[from] rcgen::Error),
    /// The manager refused the certificate request.
    #[error("{manager} refused to issue a certificate: {status}")]
    Refused {
        /// The manager's address.
        manager: String,
        /// Its answer (PermissionDenied for a wrong or rotated token, ResourceExhausted
        /// after repeated failures).
        status: Status,
    },
    /// The manager answered with a certificate we cannot use.
    #[error("the certificate the manager issued is unusable: {0}")]
    BadCertificate(#[from] CertError),
    /// A TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// Joins the cluster of `token` through the manager at `manager` (`host:port`): pins the
/// served root CA by the token's digest, then exchanges the token and a fresh CSR for a node
/// certificate. Returns the new identity and the root; save them with
/// [`save_node_files`](crate::ca::save_node_files).
///
/// A manager that does not hold the CA key yet is asked again until `timeout` has passed.
///
/// # Errors
/// [`JoinClusterError`]: each variant says which step failed and what to check.
pub fn join_cluster(
    transport: &Transport,
    manager: &str,
    token: &str,
    timeout: Duration,
) -> Result<(NodeIdentity, RootCert), JoinClusterError> {
    let token = JoinToken::parse(token)?;
    let options = CallOptions::timeout(timeout);
    // Step 1: the root, over TLS that verifies nothing; the token's digest makes it safe.
    let unverified = Arc::new(tls::bootstrap_client_config()?);
    let served: GetRootCaResponse = transport
        .channel(manager, &unverified)
        .call(GET_ROOT_CA, &GetRootCaRequest {}, options)
        .map_err(|status| JoinClusterError::FetchRoot {
            manager: manager.to_string(),
            status,
        })?;
    let root = verify_root_for_token(&token, &served.root_cert_der)?;
    // Step 2: the secret goes only to a server that proves it belongs to the pinned root.
    let pinned = Arc::new(tls::pinned_root_client_config(&root)?);
    let pending = PendingIdentity::generate()?;
    let request = IssueNodeCertificateRequest {
        token: token.to_string(),
        csr_der: pending.csr_der().to_vec().into(),
    };
    let deadline = Instant::now() + timeout;
    let channel = transport.channel(manager, &pinned);
    let issued: IssueNodeCertificateResponse = loop {
        match channel.call(ISSUE_NODE_CERTIFICATE, &request, options) {
            Ok(issued) => break issued,
            // Nothing was issued nor counted against the token: the key is on its way.
            Err(status)
                if status.is_retry_soon() && Instant::now() + JOIN_RETRY_SOON_WAIT < deadline =>
            {
                log::info!("{manager}: {status}; asking again");
                std::thread::sleep(JOIN_RETRY_SOON_WAIT);
            }
            Err(status) => {
                return Err(JoinClusterError::Refused {
                    manager: manager.to_string(),
                    status,
                });
            }
        }
    };
    let identity = pending.complete(&issued.cert_der, &root, SystemTime::now())?;
    Ok((identity, root))
}

/// Why renewing a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// A key pair or CSR could not be made.
    #[error("cannot create a key pair: {0}")]
    Key(#[from] rcgen::Error),
    /// The call failed; retry later (the current certificate stays valid until it expires).
    #[error("renewal call failed: {0}")]
    Call(#[from] Status),
    /// The manager answered with a certificate we cannot use.
    #[error("the renewed certificate is unusable: {0}")]
    BadCertificate(#[from] CertError),
}

/// Renews `current` over `channel` (a mutual-TLS channel presenting `current`): a new key,
/// the same node id and cluster; the role is the one the cluster gives the node now (it
/// changes after a promotion or a completed demotion).
///
/// # Errors
/// [`RenewError`]; the current identity remains usable on any error.
pub fn renew_certificate(
    channel: &Channel,
    current: &NodeIdentity,
    root: &RootCert,
    timeout: Duration,
) -> Result<NodeIdentity, RenewError> {
    let pending = PendingIdentity::generate()?;
    let request = RenewNodeCertificateRequest {
        csr_der: pending.csr_der().to_vec().into(),
    };
    let renewed: RenewNodeCertificateResponse = channel.call(
        RENEW_NODE_CERTIFICATE,
        &request,
        CallOptions::timeout(timeout),
    )?;
    Ok(pending.complete_renewal(&renewed.cert_der, root, current.peer(), SystemTime::now())?)
}
