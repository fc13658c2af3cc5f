//! Client side of joining a cluster, without IO.
//!
//! The flow (the transport does the talking):
//! 1. parse the operator's token: [`JoinToken::parse`];
//! 2. fetch the root CA certificate over [`super::tls::bootstrap_client_config`] (TLS that
//!    verifies nothing) and pin it with [`verify_root_for_token`]: its SHA-256 must equal the
//!    token's digest, which makes the unverified fetch safe;
//! 3. [`super::PendingIdentity::generate`] a key and CSR, and send the CSR with the token over
//!    [`super::tls::pinned_root_client_config`], so the secret only ever goes to a server that
//!    holds a certificate of the pinned cluster;
//! 4. [`super::PendingIdentity::complete`] with the returned certificate, then
//!    [`super::save_node_files`].
//!
//! Must never send the token's secret before step 2 succeeded.

use super::files::{PEM_CERTIFICATE, der_from_der_or_pem};
use super::identity::CertError;
use super::root::{RootCert, sha256};
use super::token::JoinToken;

/// Why a joining node refused the root CA a manager served.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The served root is not the one the token pins.
    #[error(
        "the root CA certificate served by the manager (sha256 {served}) is not the one the \
         join token pins (sha256 {pinned}): the token does not belong to this cluster, the \
         manager address is wrong, or someone is intercepting the connection. Check the \
         address and the token; nothing was sent to the manager"
    )]
    RootMismatch {
        /// Digest from the token, hex.
        pinned: String,
        /// Digest of what the manager served, hex.
        served: String,
    },
    /// The served bytes match the token but are not a usable root CA.
    #[error("the root CA certificate matching the join token is unusable: {0}")]
    BadRoot(#[from] CertError),
}

/// Pins the root CA certificate a manager served (DER or PEM) against `token`.
///
/// # Errors
/// [`JoinError::RootMismatch`] when the digest differs (say so to the operator; do not
/// continue), [`JoinError::BadRoot`] when the bytes match but are not a root CA.
pub fn verify_root_for_token(token: &JoinToken, served_root: &[u8]) -> Result<RootCert, JoinError> {
    // Digest first, parse second: bytes that do not match the pin are never parsed.
    let der = der_from_der_or_pem(served_root, PEM_CERTIFICATE).map_err(|reason| {
        JoinError::RootMismatch {
            pinned: token.root_digest_hex(),
            served: format!("unknown: {reason}"),
        }
    })?;
    let served = sha256(&der);
    if served != token.root_digest() {
        return Err(JoinError::RootMismatch {
            pinned: token.root_digest_hex(),
            served: hex::encode(served),
        });
    }
    let root = RootCert::from_bytes(&der)?;
    debug_assert!(token.pins(&root));
    Ok(root)
}
