//! [`ClusterCa`]: the cluster's root CA key and certificate, and the issuing of node
//! certificates from CSRs.
//!
//! The CA decides every field of a node certificate itself: CN = node id (random for a new
//! node, the caller's for a renewal), OU = role, O = cluster id, the validity window, the key
//! usages. From the request it keeps only the public key. Must never copy a CSR's subject or
//! extensions, and never let a renewal change a node's id or role.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use time::OffsetDateTime;

use super::csr::{CsrError, CsrPublicKey, verified_csr_public_key};
use super::files::{self, PEM_CERTIFICATE, PEM_PRIVATE_KEY, Secrecy, StorageError};
use super::identity::{CertError, PeerIdentity, Role, parse_cert, random_id, validity};
use super::node::{NodeIdentity, PendingIdentity};
use super::root::RootCert;
use super::token::TokenError;

/// Lifetime of the root CA certificate: 20 years (of 365.25 days).
pub const ROOT_CA_VALIDITY: Duration = Duration::from_secs(7_305 * 24 * 3600);

/// Default lifetime of node certificates: 90 days, as in swarmkit.
pub const NODE_CERT_VALIDITY_DEFAULT: Duration = Duration::from_secs(90 * 24 * 3600);

/// How far into the past `not_before` is set, so that a peer whose clock is a little behind
/// ours does not see a fresh certificate as "not yet valid" (swarmkit backdates by 1 h too).
pub const CERT_BACKDATE: Duration = Duration::from_secs(3600);

/// Shortest node-certificate lifetime a policy may ask for. Tests use short lifetimes; below
/// a minute, renewal (at 50–80 % of the lifetime) could not keep up with the round trips.
pub const NODE_CERT_VALIDITY_MIN: Duration = Duration::from_secs(60);

/// CN of the root CA certificate (its O is the cluster id).
pub const ROOT_CA_COMMON_NAME: &str = "flotilla-root-ca";

/// Suggested file name for [`ClusterCa::save`] inside a manager's state directory.
pub const CA_FILE_NAME: &str = "ca.pem";

/// Tunables of the CA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPolicy {
    /// Lifetime of issued node certificates, counted from issuance (default 90 days;
    /// at least [`NODE_CERT_VALIDITY_MIN`], at most [`ROOT_CA_VALIDITY`]).
    pub node_cert_validity: Duration,
}

impl Default for CaPolicy {
    fn default() -> Self {
        CaPolicy {
            node_cert_validity: NODE_CERT_VALIDITY_DEFAULT,
        }
    }
}

/// A certificate just issued by the CA.
#[derive(Clone, Debug)]
pub struct IssuedCertificate {
    /// The certificate, DER; send it to the requester.
    pub cert_der: CertificateDer<'static>,
    /// Who it names.
    pub identity: PeerIdentity,
    /// Start of validity (backdated by [`CERT_BACKDATE`]).
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

/// Why the CA could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA file could not be read or written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Key generation or self-signing failed.
    #[error("cannot create the root CA: {0}")]
    Crypto(#[from] rcgen::Error),
    /// An admin certificate asked to be renewed as a node: admins get a new certificate
    /// through `control.IssueAdminCertificate` instead.
    #[error(
        "{caller} is an admin certificate, not a node; issue a new one with `flotilla \
         admin-cert issue`"
    )]
    NotANode {
        /// The caller.
        caller: PeerIdentity,
    },
    /// The system clock is outside the range certificates can express.
    #[error("the system clock ({0:?}) is before 1970 or beyond 9999; fix the clock")]
    Clock(SystemTime),
    /// The policy is outside its bounds.
    #[error("node certificate validity {0:?} is outside [1 min, 20 years]")]
    BadPolicy(Duration),
}

/// Why the CA refused or failed to issue a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// Too many failed join attempts from this source; nothing was checked.
    #[error("too many failed join attempts from this address; retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// When the source may try again.
        retry_after: Duration,
    },
    /// The join token is malformed, for another cluster, or its secret is wrong or rotated.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The CSR is unusable.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// A renewal came with an identity from another cluster (the TLS layer should never let
    /// that happen).
    #[error("caller {caller} is not a member of cluster {cluster_id}")]
    WrongCluster {
        /// The caller.
        caller: PeerIdentity,
        /// Our cluster.
        cluster_id: String,
    },
    /// An admin certificate asked to be renewed as a node: admins get a new certificate
    /// through `control.IssueAdminCertificate` instead.
    #[error(
        "{caller} is an admin certificate, not a node; issue a new one with `flotilla \
         admin-cert issue`"
    )]
    NotANode {
        /// The caller.
        caller: PeerIdentity,
    },
    /// The system clock is outside the range certificates can express.
    #[error("the system clock ({0:?}) is before 1970 or beyond 9999; fix the clock")]
    Clock(SystemTime),
    /// Signing failed (an internal error: the key or parameters are broken).
    #[error("signing the certificate failed: {0}")]
    Signing(#[from] rcgen::Error),
    /// The certificate just issued failed our own checks (an internal error).
    #[error("issued certificate is unusable: {0}")]
    Issued(#[from] CertError),
}

/// The cluster's certificate authority: root key, root certificate, policy.
pub struct ClusterCa {
    root: RootCert,
    issuer: Issuer<'static, KeyPair>,
    policy: CaPolicy,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa")
            .field("root", &self.root)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Creates a new cluster: a random cluster id and a fresh P-256 root CA valid for
    /// [`ROOT_CA_VALIDITY`] from `now` (backdated by [`CERT_BACKDATE`]).
    ///
    /// # Errors
    /// [`CaError::BadPolicy`], [`CaError::Clock`], or [`CaError::Crypto`] if key generation
    /// fails.
    pub fn create(now: SystemTime, policy: CaPolicy) -> Result<ClusterCa, CaError> {
        check_policy(&policy)?;
        let cluster_id = random_id();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(ROOT_CA_COMMON_NAME, None, &cluster_id);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_asn1_time(now.checked_sub(CERT_BACKDATE).unwrap_or(now))
            .ok_or(CaError::Clock(now))?;
        params.not_after = now
            .checked_add(ROOT_CA_VALIDITY)
            .and_then(to_asn1_time)
            .ok_or(CaError::Clock(now))?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let root = RootCert::from_bytes(cert.der()).map_err(|e| {
            CaError::Crypto(rcgen::Error::X509(format!(
                "fresh root CA is unusable: {e}"
            )))
        })?;
        Ok(ClusterCa {
            root,
            issuer: Issuer::new(params, key),
            policy,
        })
    }

    /// The root certificate (public).
    pub fn root(&self) -> &RootCert {
        &self.root
    }

    /// The cluster id.
    pub fn cluster_id(&self) -> &str {
        self.root.cluster_id()
    }

    /// The policy in force.
    pub fn policy(&self) -> &CaPolicy {
        &self.policy
    }

    /// Issues a certificate for a new node of `role` with a fresh random node id, keeping only
    /// the public key of `csr` (DER or PEM). The caller must already have authorized the
    /// request (join token checked): this method does not.
    ///
    /// # Errors
    /// [`IssueError::Csr`] for an unusable CSR; [`IssueError::Clock`]; internal signing errors.
    ///
    /// # Panics
    /// For [`Role::Admin`]: admins are not nodes ([`Self::issue_admin`] issues theirs).
    pub fn issue_new_node(
        &self,
        csr: &[u8],
        role: Role,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        assert_ne!(role, Role::Admin, "issue_admin issues admin certificates");
        let key = verified_csr_public_key(csr)?;
        let identity = PeerIdentity {
            node_id: random_id(),
            role,
            cluster_id: self.cluster_id().to_owned(),
        };
        self.sign(&key, identity, self.policy.node_cert_validity, now)
    }

    /// Issues an operator's client certificate (OU `admin`, a fresh random id as CN) valid
    /// for `validity`, keeping only the public key of `csr`. The caller must already have
    /// authorized the request (an operator over mutual TLS) and bounded `validity`.
    ///
    /// # Errors
    /// As [`Self::issue_new_node`].
    pub fn issue_admin(
        &self,
        csr: &[u8],
        validity: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let key = verified_csr_public_key(csr)?;
        let identity = PeerIdentity {
            node_id: random_id(),
            role: Role::Admin,
            cluster_id: self.cluster_id().to_owned(),
        };
        self.sign(&key, identity, validity, now)
    }

    /// Renews the certificate of an authenticated caller: same node id, same role, new key
    /// from `csr`. `caller` must be the identity rustls verified for the connection; the
    /// request carries nothing that could change it.
    ///
    /// # Errors
    /// [`IssueError::WrongCluster`] if `caller` is not of this cluster; as
    /// [`Self::issue_new_node`] otherwise.
    pub fn renew(
        &self,
        caller: &PeerIdentity,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        if caller.cluster_id != self.cluster_id() {
            return Err(IssueError::WrongCluster {
                caller: caller.clone(),
                cluster_id: self.cluster_id().to_owned(),
            });
        }
        if caller.role == Role::Admin {
            // An admin certificate is not a node's: it gets a new one from an operator.
            return Err(IssueError::NotANode {
                caller: caller.clone(),
            });
        }
        let key = verified_csr_public_key(csr)?;
        self.sign(&key, caller.clone(), self.policy.node_cert_validity, now)
    }

    /// Mints a complete identity for this very process (the first manager at `init`): key
    /// pair, CSR, certificate, all local.
    ///
    /// # Errors
    /// As [`Self::issue_new_node`].
    pub fn issue_local_identity(
        &self,
        role: Role,
        now: SystemTime,
    ) -> Result<NodeIdentity, IssueError> {
        let pending = PendingIdentity::generate()?;
        let issued = self.issue_new_node(pending.csr_der(), role, now)?;
        Ok(pending.complete(&issued.cert_der, &self.root, now)?)
    }

    fn sign(
        &self,
        key: &CsrPublicKey,
        identity: PeerIdentity,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<IssuedCertificate, IssueError> {
        let not_before = now.checked_sub(CERT_BACKDATE).unwrap_or(now);
        let not_after = now.checked_add(lifetime).ok_or(IssueError::Clock(now))?;
        let mut params = CertificateParams::default();
        params.distinguished_name =
            distinguished_name(&identity.node_id, Some(identity.role), &identity.cluster_id);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every node is both a TLS client and (managers) a TLS server.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_asn1_time(not_before).ok_or(IssueError::Clock(now))?;
        params.not_after = to_asn1_time(not_after).ok_or(IssueError::Clock(now))?;
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(key.key(), &self.issuer)?;
        let der = cert.der().clone();
        let parsed = parse_cert(&der)?;
        let (not_before, not_after) = validity(&parsed);
        // Read back what was written: a certificate that would not name exactly this
        // identity must never leave the CA.
        let written = PeerIdentity::from_x509(&parsed)?;
        if written != identity {
            return Err(IssueError::Issued(CertError::IdentityChanged {
                expected: identity.to_string(),
                found: written.to_string(),
            }));
        }
        Ok(IssuedCertificate {
            cert_der: der,
            identity,
            not_before,
            not_after,
        })
    }

    /// The root certificate followed by the root private key, PEM. This is the CA's whole
    /// secret: store it only where [`Self::save`] would (0600 file, replicated encrypted
    /// store).
    pub fn to_pem_bundle(&self) -> String {
        pem::encode_many(&self.pem_blocks())
    }

    fn pem_blocks(&self) -> [pem::Pem; 2] {
        [
            pem::Pem::new(PEM_CERTIFICATE, self.root.der().to_vec()),
            pem::Pem::new(PEM_PRIVATE_KEY, self.issuer.key().serialize_der()),
        ]
    }

    /// Rebuilds a CA from [`Self::to_pem_bundle`] output.
    ///
    /// # Errors
    /// [`CaError::Storage`] (`Corrupt`) when the bundle is not a root certificate followed by
    /// its own private key.
    pub fn from_pem_bundle(bundle: &[u8], policy: CaPolicy) -> Result<ClusterCa, CaError> {
        let origin = Path::new("<CA bundle>");
        let blocks = pem::parse_many(bundle).map_err(|e| StorageError::Corrupt {
            path: origin.to_owned(),
            reason: format!("not PEM ({e})"),
        })?;
        ClusterCa::from_blocks(origin, blocks, policy)
    }

    /// The root certificate and the root private key (PKCS#8), both DER: the CA's whole
    /// secret, for replicating it to the other managers through the Raft store only.
    /// Never log it, never put it in a reply.
    pub fn to_der_parts(&self) -> (Vec<u8>, Vec<u8>) {
        (self.root.der().to_vec(), self.issuer.key().serialize_der())
    }

    /// Rebuilds a CA from [`Self::to_der_parts`] output (as replicated in the store).
    ///
    /// # Errors
    /// [`CaError::Storage`] (`Corrupt`) when the certificate is not a root CA or the key is
    /// not its own; [`CaError::BadPolicy`].
    pub fn from_der_parts(
        cert_der: &[u8],
        key_der: &[u8],
        policy: CaPolicy,
    ) -> Result<ClusterCa, CaError> {
        let blocks = vec![
            pem::Pem::new(PEM_CERTIFICATE, cert_der.to_vec()),
            pem::Pem::new(PEM_PRIVATE_KEY, key_der.to_vec()),
        ];
        ClusterCa::from_blocks(Path::new("<replicated CA>"), blocks, policy)
    }

    /// Writes the CA (certificate + key, one file so they can never be out of step) to
    /// `path`, mode 0600, atomically.
    ///
    /// # Errors
    /// [`StorageError::Io`] when the write fails; the previous file is untouched then.
    pub fn save(&self, path: &Path) -> Result<(), StorageError> {
        files::write_pem_file(path, &self.pem_blocks())
    }

    /// Loads a CA written by [`Self::save`].
    ///
    /// Refuses a file that group or others may read (the key must be considered leaked),
    /// a missing file, and a file whose key does not match its certificate.
    ///
    /// # Errors
    /// [`CaError::Storage`] with `Missing`, `InsecurePermissions`, `TooLarge`, `Io` or
    /// `Corrupt`; [`CaError::BadPolicy`].
    pub fn load(path: &Path, policy: CaPolicy) -> Result<ClusterCa, CaError> {
        let blocks = files::read_pem_file(path, Secrecy::PrivateKey)?;
        ClusterCa::from_blocks(path, blocks, policy)
    }

    fn from_blocks(
        path: &Path,
        blocks: Vec<pem::Pem>,
        policy: CaPolicy,
    ) -> Result<ClusterCa, CaError> {
        check_policy(&policy)?;
        let corrupt = |reason: String| StorageError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let [cert_der, key_der] =
            files::expect_blocks(path, blocks, [PEM_CERTIFICATE, PEM_PRIVATE_KEY])?;
        let root = RootCert::from_bytes(&cert_der).map_err(|e| corrupt(e.to_string()))?;
        let key = KeyPair::try_from(key_der.as_slice())
            .map_err(|e| corrupt(format!("private key does not parse ({e})")))?;
        let cert = parse_cert(root.der()).expect("the root was parsed by RootCert::from_bytes");
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(corrupt(CertError::KeyMismatch.to_string()).into());
        }
        let issuer = Issuer::from_ca_cert_der(root.der(), key)
            .map_err(|e| corrupt(format!("root certificate unusable for signing ({e})")))?;
        Ok(ClusterCa {
            root,
            issuer,
            policy,
        })
    }
}

fn check_policy(policy: &CaPolicy) -> Result<(), CaError> {
    let v = policy.node_cert_validity;
    if v < NODE_CERT_VALIDITY_MIN || v > ROOT_CA_VALIDITY {
        return Err(CaError::BadPolicy(v));
    }
    Ok(())
}

fn distinguished_name(
    common_name: &str,
    role: Option<Role>,
    cluster_id: &str,
) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(role) = role {
        dn.push(DnType::OrganizationalUnitName, role.as_str());
    }
    dn.push(DnType::OrganizationName, cluster_id);
    dn
}

/// 128 random bits, positive and with a non-zero first byte so the DER integer is minimal
/// and always 16 bytes.
fn random_serial() -> SerialNumber {
    use rand::Rng;
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

/// Converts to the certificate time type; fails before 1970 or past year 9999.
pub(crate) fn to_asn1_time(t: SystemTime) -> Option<OffsetDateTime> {
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let odt = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    (odt.year() <= 9999).then_some(odt)
}
