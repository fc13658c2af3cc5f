//! The cluster certificate authority: root CA, node certificates, join tokens, renewal, and
//! the rustls configurations the transport uses.
//!
//! Owns: the root CA key and certificate ([`ClusterCa`]), issuing node certificates from CSRs
//! (CN = node id, OU = role, O = cluster id) and operators' admin certificates (OU `admin`,
//! [`ClusterCa::issue_admin`]: control API only, never a node), join tokens ([`JoinTokens`], `FLT-1-…`), the
//! per-address limiter of failed joins, a node's identity files ([`NodeIdentity`]), the
//! client side of joining ([`verify_root_for_token`], [`PendingIdentity`]) and the TLS
//! verifiers ([`tls`]).
//!
//! Sans-IO: no sockets, no threads, no clock reads in the core paths (callers pass `now`).
//! File IO is limited to explicit `save`/`load` calls; no network IO: `ca_rpc` serves the
//! CA's methods and runs the joining node's side (and the renewer) through `net`, which sits
//! above `ca` (the transport verifies peers with [`tls`]).
//!
//! Must never: copy anything but the public key from a CSR; let a renewal change a node's id
//! or role; compare a secret in variable time; log or `Debug`-print a secret or a private key;
//! write a key file readable by anyone but its owner; read one that is; issue or renew an
//! admin certificate as a node (no join token makes one; renewal refuses one).
//!
//! # Lifecycle
//! - `init`: [`ClusterCa::create`] → [`ClusterCa::save`]; [`JoinTokens::generate`];
//!   [`ClusterCa::issue_local_identity`] → [`save_node_files`].
//! - manager serving: [`CaService`] (join, renew) in a [`SharedCa`] slot (every manager: the
//!   founder loads the key from its `ca/` file, the others receive it through the
//!   replicated Cluster object: [`ClusterCa::to_der_parts`] / [`ClusterCa::from_der_parts`]),
//!   [`tls::server_config`].
//! - `join`: see [`join`] for the four steps.
//! - every node: [`load_node_files`], [`tls::client_config`], renew at
//!   [`NodeIdentity::renewal_at`] with [`PendingIdentity`] + [`PendingIdentity::complete_renewal`].

mod authority;
mod csr;
mod files;
mod identity;
pub mod join;
mod node;
mod ratelimit;
mod root;
mod service;
pub mod tls;
mod token;

pub use authority::{
    CA_FILE_NAME, CERT_BACKDATE, CaError, CaPolicy, ClusterCa, IssueError, IssuedCertificate,
    NODE_CERT_VALIDITY_DEFAULT, NODE_CERT_VALIDITY_MIN, ROOT_CA_COMMON_NAME, ROOT_CA_VALIDITY,
};
pub use csr::{CSR_BYTES_MAX, CsrError, CsrPublicKey, verified_csr_public_key};
pub use files::{PEM_FILE_BYTES_MAX, StorageError};
pub use identity::{CertError, ID_CHARS, ID_CHARS_MAX, PeerIdentity, Role, is_valid_id, random_id};
pub use join::{JoinError, verify_root_for_token};
pub use node::{
    NODE_IDENTITY_FILE, NodeIdentity, PendingIdentity, RENEWAL_WINDOW_PERCENT, ROOT_CERT_FILE,
    load_node_files, renewal_instant, save_node_files,
};
pub use ratelimit::{FailureLimits, FailureRateLimiter, RateLimited};
pub use root::{ROOT_CERT_BYTES_MAX, RootCert};
pub use service::{CaService, SharedCa};

/// The reason ([`crate::wire::Status::reason`]) of the `PermissionDenied` a manager answers
/// a revoked certificate with: a Raft peer that sees it knows (from the committed,
/// replicated revocation list) that it was removed from the cluster.
pub const CERTIFICATE_REVOKED: crate::wire::Reason = crate::wire::Reason::CertificateRevoked;
pub use token::{
    JoinToken, JoinTokens, TOKEN_CHARS_MAX, TOKEN_DIGEST_BYTES, TOKEN_PREFIX, TOKEN_SECRET_BYTES,
    TOKEN_VERSION, TokenError, TokenParseError,
};
