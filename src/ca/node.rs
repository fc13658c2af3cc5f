//! A node's own identity: [`NodeIdentity`] (certificate + private key), the
//! [`PendingIdentity`] used while asking the CA for a certificate, the node's files on disk,
//! and when to renew.
//!
//! A node's certificate and key are written to ONE file so a crash can never leave a new
//! certificate next to an old key. Must never write a key with group/other permission bits,
//! never accept a certificate that does not carry its own key or does not chain to the root.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use rand::RngExt;
use rcgen::PublicKeyData;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::files::{self, PEM_CERTIFICATE, PEM_PRIVATE_KEY, Secrecy, StorageError};
use super::identity::{CertError, PeerIdentity, Role, check_valid_at, parse_cert, validity};
use super::root::RootCert;

/// Name of the file holding the node's certificate and key, inside the node's directory.
pub const NODE_IDENTITY_FILE: &str = "node.pem";
/// Name of the file holding the cluster's root certificate, inside the node's directory.
pub const ROOT_CERT_FILE: &str = "root-ca.pem";

/// Renewal happens at a uniformly random point in this fraction of the lifetime, so that
/// nodes issued together do not all come back at once (swarmkit's 50–80 %).
pub const RENEWAL_WINDOW_PERCENT: (u64, u64) = (50, 80);

/// The node's certificate and private key, checked to belong together and to name a valid
/// identity.
pub struct NodeIdentity {
    cert_der: CertificateDer<'static>,
    key_der: PrivatePkcs8KeyDer<'static>,
    peer: PeerIdentity,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("NodeIdentity")
            .field("peer", &self.peer)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity {
            cert_der: self.cert_der.clone(),
            key_der: self.key_der.clone_key(),
            peer: self.peer.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
        }
    }
}

impl NodeIdentity {
    /// Builds an identity from a DER certificate and a PKCS#8 DER key, checking that the key
    /// matches the certificate, that the certificate was signed by `root`, and that it names
    /// a node of `root`'s cluster. Dates are NOT checked (see [`Self::is_valid_at`]): an expired
    /// identity still loads, so the node can tell the operator to re-join it.
    ///
    /// # Errors
    /// [`CertError`] for any failed check.
    pub fn from_der(cert_der: &[u8], key_der: &[u8], root: &RootCert) -> Result<Self, CertError> {
        let key = KeyPair::try_from(key_der).map_err(|e| CertError::Malformed {
            reason: format!("private key does not parse ({e})"),
        })?;
        NodeIdentity::from_cert_and_key(cert_der, &key, root)
    }

    fn from_cert_and_key(
        cert_der: &[u8],
        key: &KeyPair,
        root: &RootCert,
    ) -> Result<Self, CertError> {
        let cert = parse_cert(cert_der)?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::KeyMismatch);
        }
        root.check_signed(&cert)?;
        let peer = PeerIdentity::from_x509(&cert)?;
        if peer.cluster_id != root.cluster_id() {
            return Err(CertError::ClusterMismatch {
                expected: root.cluster_id().to_owned(),
                found: peer.cluster_id,
            });
        }
        let (not_before, not_after) = validity(&cert);
        Ok(NodeIdentity {
            cert_der: CertificateDer::from(cert_der.to_vec()),
            key_der: PrivatePkcs8KeyDer::from(key.serialize_der()),
            peer,
            not_before,
            not_after,
        })
    }

    /// Who this certificate says we are.
    pub fn peer(&self) -> &PeerIdentity {
        &self.peer
    }

    /// Our node id (CN).
    pub fn node_id(&self) -> &str {
        &self.peer.node_id
    }

    /// Our role (OU).
    pub fn role(&self) -> Role {
        self.peer.role
    }

    /// Our cluster id (O).
    pub fn cluster_id(&self) -> &str {
        &self.peer.cluster_id
    }

    /// The certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The private key, for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// True when `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }

    /// A fresh random renewal instant for this certificate (see [`renewal_instant`]). Draw it
    /// once per certificate; if it is already past (the node was down), renew now.
    pub fn renewal_at(&self, rng: &mut impl rand::Rng) -> SystemTime {
        renewal_instant(self.not_before, self.not_after, rng)
    }

    fn pem_blocks(&self) -> [pem::Pem; 2] {
        [
            pem::Pem::new(PEM_CERTIFICATE, self.cert_der.to_vec()),
            pem::Pem::new(PEM_PRIVATE_KEY, self.key_der.secret_pkcs8_der().to_vec()),
        ]
    }
}

/// A uniformly random instant between 50 % and 80 % ([`RENEWAL_WINDOW_PERCENT`]) of the way
/// from `not_before` to `not_after` (millisecond resolution). An inverted window yields
/// `not_before`, i.e. "renew now".
pub fn renewal_instant(
    not_before: SystemTime,
    not_after: SystemTime,
    rng: &mut impl rand::Rng,
) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
    let (low_percent, high_percent) = RENEWAL_WINDOW_PERCENT;
    let low_ms = lifetime_ms / 100 * low_percent + lifetime_ms % 100 * low_percent / 100;
    let high_ms = lifetime_ms / 100 * high_percent + lifetime_ms % 100 * high_percent / 100;
    let offset_ms = rng.random_range(low_ms..=high_ms);
    not_before + Duration::from_millis(offset_ms)
}

/// Saves the node's identity and the cluster root into `dir` ([`ROOT_CERT_FILE`], then
/// [`NODE_IDENTITY_FILE`]), each 0600 and atomic.
///
/// # Errors
/// [`StorageError::Io`]; a failure leaves each file either old or new, never torn.
pub fn save_node_files(
    dir: &Path,
    identity: &NodeIdentity,
    root: &RootCert,
) -> Result<(), StorageError> {
    root.save(&dir.join(ROOT_CERT_FILE))?;
    files::write_pem_file(&dir.join(NODE_IDENTITY_FILE), &identity.pem_blocks())
}

/// Loads what [`save_node_files`] wrote and checks it: key matches certificate, certificate
/// signed by the root and of the root's cluster. An expired certificate still loads.
///
/// # Errors
/// [`StorageError::Missing`] when the node never joined; `InsecurePermissions` when
/// `node.pem` is readable by group or others; `Corrupt` when any check fails.
pub fn load_node_files(dir: &Path) -> Result<(NodeIdentity, RootCert), StorageError> {
    let root = RootCert::load(&dir.join(ROOT_CERT_FILE))?;
    let path = dir.join(NODE_IDENTITY_FILE);
    let blocks = files::read_pem_file(&path, Secrecy::PrivateKey)?;
    let [cert_der, key_der] =
        files::expect_blocks(&path, blocks, [PEM_CERTIFICATE, PEM_PRIVATE_KEY])?;
    let identity =
        NodeIdentity::from_der(&cert_der, &key_der, &root).map_err(|e| StorageError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    Ok((identity, root))
}

/// A fresh key pair and the CSR that carries its public key, waiting for the CA's answer.
/// Used both to join (with a token) and to renew (over mutual TLS).
pub struct PendingIdentity {
    key: KeyPair,
    csr_der: Vec<u8>,
}

impl fmt::Debug for PendingIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingIdentity").finish_non_exhaustive()
    }
}

impl PendingIdentity {
    /// Generates a P-256 key pair and a CSR for it. The CSR's subject is a placeholder: the
    /// CA chooses the real one.
    ///
    /// # Errors
    /// [`rcgen::Error`] if key generation or signing fails.
    pub fn generate() -> Result<PendingIdentity, rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "flotilla-node");
        params.distinguished_name = dn;
        let csr_der = params.serialize_request(&key)?.der().to_vec();
        Ok(PendingIdentity { key, csr_der })
    }

    /// The CSR to send to the CA, DER.
    pub fn csr_der(&self) -> &[u8] {
        &self.csr_der
    }

    /// Accepts the certificate the CA returned: it must carry our key, be signed by `root`,
    /// name a node of `root`'s cluster and be valid at `now`.
    ///
    /// # Errors
    /// [`CertError`] for any failed check.
    pub fn complete(
        self,
        cert: &[u8],
        root: &RootCert,
        now: SystemTime,
    ) -> Result<NodeIdentity, CertError> {
        let cert_der = files::der_from_der_or_pem(cert, PEM_CERTIFICATE)
            .map_err(|reason| CertError::Malformed { reason })?;
        let identity = NodeIdentity::from_cert_and_key(&cert_der, &self.key, root)?;
        check_valid_at(&parse_cert(&cert_der)?, now)?;
        Ok(identity)
    }

    /// As [`Self::complete`], and also refuses a renewed certificate whose node id or
    /// cluster differs from `current`. The role may differ: the CA issues the role the
    /// cluster gives the node now (after a promotion or a completed demotion).
    ///
    /// # Errors
    /// [`CertError::IdentityChanged`] or as [`Self::complete`].
    pub fn complete_renewal(
        self,
        cert: &[u8],
        root: &RootCert,
        current: &PeerIdentity,
        now: SystemTime,
    ) -> Result<NodeIdentity, CertError> {
        let identity = self.complete(cert, root, now)?;
        // The role may change (a promotion, a completed demotion); who the node is may not.
        if identity.peer().node_id != current.node_id
            || identity.peer().cluster_id != current.cluster_id
        {
            return Err(CertError::IdentityChanged {
                expected: current.to_string(),
                found: identity.peer().to_string(),
            });
        }
        Ok(identity)
    }
}
