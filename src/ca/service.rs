//! [`CaService`]: what the CA's RPC handlers call. It ties the [`ClusterCa`], the current
//! [`JoinTokens`] and the [`FailureRateLimiter`] together behind `&self` methods, so one
//! `Arc<CaService>` can be shared by every service thread.
//!
//! Methods map to RPCs as follows (the transport enforces who may call them):
//! - `GetRootCa` (bootstrap, no client certificate needed): [`CaService::root`]`.der()`.
//! - `IssueNodeCertificate` (bootstrap): [`CaService::join`] with the caller's IP address.
//! - `RenewNodeCertificate` (mutual TLS, any role): [`CaService::renew`] with the caller's
//!   verified [`PeerIdentity`].
//!
//! Must never check a token before the rate limiter allowed the attempt, never log a secret.

use std::net::IpAddr;
use std::time::{Instant, SystemTime};

use parking_lot::{Mutex, RwLock};

use super::authority::{ClusterCa, IssueError, IssuedCertificate};
use super::identity::{PeerIdentity, Role};
use super::ratelimit::{FailureLimits, FailureRateLimiter};
use super::root::RootCert;
use super::token::{JoinToken, JoinTokens, TokenError};

/// The CA as served to the cluster (see the module documentation).
pub struct CaService {
    ca: ClusterCa,
    tokens: RwLock<JoinTokens>,
    limiter: Mutex<FailureRateLimiter>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

impl CaService {
    /// Serves `ca` with `tokens` and a failure limiter with `limits`.
    ///
    /// # Panics
    /// When `tokens` pin another root than `ca`'s (a wiring bug), or a limit is zero.
    pub fn new(ca: ClusterCa, tokens: JoinTokens, limits: FailureLimits) -> CaService {
        assert!(
            tokens.token(Role::Worker).pins(ca.root()),
            "join tokens must pin the CA's own root"
        );
        CaService {
            ca,
            tokens: RwLock::new(tokens),
            limiter: Mutex::new(FailureRateLimiter::new(limits)),
        }
    }

    /// The CA.
    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// The root certificate, served to anyone who asks (it is public).
    pub fn root(&self) -> &RootCert {
        self.ca.root()
    }

    /// The current join token for `role`.
    pub fn token(&self, role: Role) -> JoinToken {
        self.tokens.read().token(role)
    }

    /// A copy of the current tokens (for storing them).
    pub fn tokens(&self) -> JoinTokens {
        self.tokens.read().clone()
    }

    /// Rotates the token of `role`: the old one is refused from now on. Returns the new one.
    pub fn rotate_token(&self, role: Role) -> JoinToken {
        let token = self.tokens.write().rotate(role);
        log::info!("ca: rotated the {role} join token");
        token
    }

    /// Replaces both tokens (e.g. after reading them from the replicated store).
    ///
    /// # Errors
    /// [`TokenError::WrongCluster`] when they pin another root CA.
    pub fn set_tokens(&self, tokens: JoinTokens) -> Result<(), TokenError> {
        if !tokens.token(Role::Worker).pins(self.ca.root()) {
            return Err(TokenError::WrongCluster);
        }
        *self.tokens.write() = tokens;
        Ok(())
    }

    /// Handles a join: rate limit by `source`, check `token` (constant time), then issue a
    /// certificate for a new node of the token's role with only the public key of `csr`.
    /// Failed token checks count against `source`; CSR problems do not (the caller proved it
    /// holds a valid secret). `now` drives the limiter, `wall_now` the certificate dates.
    ///
    /// # Errors
    /// [`IssueError::RateLimited`] (map to ResourceExhausted with the retry delay),
    /// [`IssueError::Token`] (PermissionDenied / InvalidArgument), [`IssueError::Csr`]
    /// (InvalidArgument), others (Internal).
    pub fn join(
        &self,
        source: IpAddr,
        token: &str,
        csr: &[u8],
        now: Instant,
        wall_now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let role = self.authorize_join(source, token, now)?;
        let issued = self
            .ca
            .issue_new_node(csr, role, wall_now)
            .inspect_err(|e| {
                log::warn!("ca: join from {source} with a valid {role} token failed: {e}");
            })?;
        log::info!("ca: {source} joined as {}", issued.identity);
        Ok(issued)
    }

    /// Rate limit and token check, under the limiter's lock so that concurrent attempts from
    /// one source cannot all slip past the check before any failure is recorded (the token
    /// check is a few constant-time comparisons, so holding the lock costs nothing).
    fn authorize_join(
        &self,
        source: IpAddr,
        token: &str,
        now: Instant,
    ) -> Result<Role, IssueError> {
        let mut limiter = self.limiter.lock();
        if let Err(limited) = limiter.check(source, now) {
            log::warn!(
                "ca: join from {source} refused: too many failed attempts, retry in {} ms",
                limited.retry_after.as_millis()
            );
            return Err(IssueError::RateLimited {
                retry_after: limited.retry_after,
            });
        }
        match self.tokens.read().verify_str(token) {
            Ok(role) => {
                limiter.record_success(source);
                Ok(role)
            }
            Err(e) => {
                limiter.record_failure(source, now);
                log::warn!("ca: join from {source} refused: {e}");
                Err(e.into())
            }
        }
    }

    /// Handles a renewal by an authenticated caller: same node id and role, new key from
    /// `csr`. `caller` must be the identity verified by the TLS layer for this connection.
    ///
    /// # Errors
    /// As [`ClusterCa::renew`].
    pub fn renew(
        &self,
        caller: &PeerIdentity,
        csr: &[u8],
        wall_now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let issued = self.ca.renew(caller, csr, wall_now).inspect_err(|e| {
            log::warn!("ca: renewal for {caller} failed: {e}");
        })?;
        log::info!("ca: renewed the certificate of {caller}");
        Ok(issued)
    }
}

/// The CA this manager serves, once it has one: the founder loads it from its state
/// directory at start; every other manager installs it when the replicated Cluster object
/// carries the key. Shared by the CA's RPC handlers and the control API.
#[derive(Debug, Default)]
pub struct SharedCa {
    slot: RwLock<Option<std::sync::Arc<CaService>>>,
}

impl SharedCa {
    /// An empty slot: joins and renewals are refused until [`Self::install`].
    pub fn empty() -> SharedCa {
        SharedCa::default()
    }

    /// A slot holding `service`.
    pub fn with(service: std::sync::Arc<CaService>) -> SharedCa {
        SharedCa {
            slot: RwLock::new(Some(service)),
        }
    }

    /// The CA, if this manager has it.
    pub fn get(&self) -> Option<std::sync::Arc<CaService>> {
        self.slot.read().clone()
    }

    /// Whether this manager can sign.
    pub fn is_present(&self) -> bool {
        self.slot.read().is_some()
    }

    /// Installs `service` unless one is already there (the first one stays: both hold the
    /// same root, checked by the caller). Returns whether it was installed.
    pub fn install(&self, service: CaService) -> bool {
        let mut slot = self.slot.write();
        if slot.is_some() {
            return false;
        }
        *slot = Some(std::sync::Arc::new(service));
        true
    }
}
