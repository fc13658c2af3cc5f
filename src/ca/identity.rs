//! Who a certificate says its holder is: [`Role`], [`PeerIdentity`] and the random ids the CA
//! hands out, plus the certificate-reading helpers shared by the rest of `ca`.
//!
//! Reading a subject here never *verifies* anything: callers get a [`PeerIdentity`] only from a
//! certificate that rustls (through the verifiers of `ca::tls`) or the CA already checked.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::x509::X509Name;

/// Length of node and cluster ids ([`crate::util::id`]: 128 random bits in base 36, like
/// swarmkit's ids).
pub use crate::util::id::{ID_CHARS, random_id};

/// Longest id accepted when reading a certificate. Ids we mint are exactly [`ID_CHARS`]
/// long; the bound is looser so a future id format does not lock out old nodes, and tight
/// enough that a hostile certificate cannot make logs or maps grow.
pub const ID_CHARS_MAX: usize = 64;

/// The role a node plays, carried in the certificate's OU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Member of the Raft group; serves the control API, dispatcher and CA.
    Manager,
    /// Runs tasks; talks to managers only.
    Worker,
    /// An operator's client certificate (`flotilla admin-cert issue`): may call the control
    /// API, nothing else. Never a node: it cannot serve, join the Raft group, renew itself
    /// as a node, or be issued through a join token.
    Admin,
}

impl Role {
    /// Every role, in a stable order.
    pub const ALL: [Role; 3] = [Role::Manager, Role::Worker, Role::Admin];

    /// The OU string written in certificates: `manager`, `worker` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "manager" => Ok(Role::Manager),
            "worker" => Ok(Role::Worker),
            "admin" => Ok(Role::Admin),
            other => Err(CertError::UnknownRole {
                value: truncate_for_message(other),
            }),
        }
    }
}

/// The verified identity of the node at the other end of a connection (or of our own
/// certificate): node id = CN, role = OU, cluster id = O.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    /// Random id chosen by the CA when the node joined; kept across renewals.
    pub node_id: String,
    /// What the node may do.
    pub role: Role,
    /// Id of the cluster whose root CA signed the certificate.
    pub cluster_id: String,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}, cluster {})",
            self.node_id, self.role, self.cluster_id
        )
    }
}

impl PeerIdentity {
    /// Reads CN, OU and O from a DER certificate. Does not check any signature or date.
    ///
    /// # Errors
    /// [`CertError`] when the certificate does not parse, or an attribute is missing,
    /// repeated, not an id, or (for OU) not a known role.
    pub fn from_cert_der(der: &[u8]) -> Result<PeerIdentity, CertError> {
        let cert = parse_cert(der)?;
        PeerIdentity::from_x509(&cert)
    }

    pub(crate) fn from_x509(cert: &X509Certificate<'_>) -> Result<PeerIdentity, CertError> {
        let subject = cert.subject();
        let node_id = single_attribute(subject, Attribute::CommonName)?;
        let role = single_attribute(subject, Attribute::OrganizationalUnit)?;
        let cluster_id = single_attribute(subject, Attribute::Organization)?;
        check_id(Attribute::CommonName, node_id)?;
        check_id(Attribute::Organization, cluster_id)?;
        Ok(PeerIdentity {
            node_id: node_id.to_owned(),
            role: role.parse()?,
            cluster_id: cluster_id.to_owned(),
        })
    }
}

/// Problems found in a certificate's content (not in its transport or storage).
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The bytes are not a DER X.509 certificate (or a PEM block holding one).
    #[error("certificate does not parse ({reason}); it is corrupt or not a certificate")]
    Malformed {
        /// What the parser said.
        reason: String,
    },
    /// A subject attribute flotilla needs is absent.
    #[error("certificate subject has no {attribute}; it was not issued by a flotilla CA")]
    MissingAttribute {
        /// The attribute (CN, OU or O).
        attribute: &'static str,
    },
    /// A subject attribute appears more than once, which would make the identity ambiguous.
    #[error("certificate subject has several {attribute} values; refusing an ambiguous identity")]
    RepeatedAttribute {
        /// The attribute (CN, OU or O).
        attribute: &'static str,
    },
    /// A subject attribute is not a flotilla id (lowercase letters and digits, bounded).
    #[error("certificate {attribute} {value:?} is not a flotilla id")]
    BadId {
        /// The attribute (CN or O).
        attribute: &'static str,
        /// The offending value, truncated.
        value: String,
    },
    /// The OU is not `manager` or `worker`.
    #[error("certificate role {value:?} is not a known role (expected manager or worker)")]
    UnknownRole {
        /// The offending value, truncated.
        value: String,
    },
    /// A root certificate is not a CA certificate (or not self-signed).
    #[error("certificate is not a self-signed CA certificate: {reason}")]
    NotRootCa {
        /// What is missing.
        reason: &'static str,
    },
    /// A certificate was not signed by the cluster's root CA.
    #[error("certificate was not signed by this cluster's root CA")]
    NotSignedByRoot,
    /// A certificate does not carry the public key it was stored or requested with.
    #[error(
        "certificate does not match the private key stored with it; the identity files are \
         mixed up: restore them from the same backup or re-join the node"
    )]
    KeyMismatch,
    /// The certificate belongs to another cluster.
    #[error("certificate belongs to cluster {found}, not to this cluster {expected}")]
    ClusterMismatch {
        /// Our cluster id.
        expected: String,
        /// The certificate's cluster id (truncated).
        found: String,
    },
    /// A renewed certificate names another node or role than the current one.
    #[error("renewed certificate is for {found}, but this node is {expected}; refusing it")]
    IdentityChanged {
        /// The identity we hold.
        expected: String,
        /// The identity in the new certificate.
        found: String,
    },
    /// The certificate is outside its validity period at the given time.
    #[error(
        "certificate is not valid now (valid from {not_before_unix_s} to {not_after_unix_s}, \
         unix seconds); check the clock, or re-join the node if it expired"
    )]
    OutsideValidity {
        /// Start of validity.
        not_before_unix_s: i64,
        /// End of validity.
        not_after_unix_s: i64,
    },
}

/// True when `s` looks like an id: 1..=[`ID_CHARS_MAX`] lowercase ASCII letters or digits.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= ID_CHARS_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[derive(Clone, Copy)]
pub(crate) enum Attribute {
    CommonName,
    OrganizationalUnit,
    Organization,
}

impl Attribute {
    fn name(self) -> &'static str {
        match self {
            Attribute::CommonName => "CN (node id)",
            Attribute::OrganizationalUnit => "OU (role)",
            Attribute::Organization => "O (cluster id)",
        }
    }
}

pub(crate) fn single_attribute<'a>(
    name: &'a X509Name<'_>,
    attribute: Attribute,
) -> Result<&'a str, CertError> {
    let mut values = match attribute {
        Attribute::CommonName => name.iter_common_name().collect::<Vec<_>>(),
        Attribute::OrganizationalUnit => name.iter_organizational_unit().collect(),
        Attribute::Organization => name.iter_organization().collect(),
    };
    let value = match (values.pop(), values.is_empty()) {
        (None, _) => {
            return Err(CertError::MissingAttribute {
                attribute: attribute.name(),
            });
        }
        (Some(_), false) => {
            return Err(CertError::RepeatedAttribute {
                attribute: attribute.name(),
            });
        }
        (Some(value), true) => value,
    };
    value.as_str().map_err(|_| CertError::BadId {
        attribute: attribute.name(),
        value: "<not a string>".to_owned(),
    })
}

fn check_id(attribute: Attribute, value: &str) -> Result<(), CertError> {
    if is_valid_id(value) {
        Ok(())
    } else {
        Err(CertError::BadId {
            attribute: attribute.name(),
            value: truncate_for_message(value),
        })
    }
}

/// Parses one DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, CertError> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Malformed {
        reason: e.to_string(),
    })?;
    if !rest.is_empty() {
        return Err(CertError::Malformed {
            reason: format!("{} bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

/// The validity window of a certificate as system times (times before 1970 clamp to 1970).
pub(crate) fn validity(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let v = cert.validity();
    (
        unix_to_system(v.not_before.timestamp()),
        unix_to_system(v.not_after.timestamp()),
    )
}

/// Refuses a certificate that is not valid at `now`.
pub(crate) fn check_valid_at(cert: &X509Certificate<'_>, now: SystemTime) -> Result<(), CertError> {
    let (not_before, not_after) = validity(cert);
    if now < not_before || now > not_after {
        let v = cert.validity();
        return Err(CertError::OutsideValidity {
            not_before_unix_s: v.not_before.timestamp(),
            not_after_unix_s: v.not_after.timestamp(),
        });
    }
    Ok(())
}

fn unix_to_system(unix_s: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(unix_s).unwrap_or(0))
}

/// Bounds attacker-chosen strings before they go into an error message or a log line.
pub(crate) fn truncate_for_message(s: &str) -> String {
    const CHARS_MAX: usize = ID_CHARS_MAX;
    let mut out: String = s.chars().take(CHARS_MAX).collect();
    if s.chars().count() > CHARS_MAX {
        out.push('…');
    }
    out.escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_round_trips_and_refuses_unknown() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
        }
        assert!(matches!(
            "operator".parse::<Role>(),
            Err(CertError::UnknownRole { .. })
        ));
        assert!(
            "Manager".parse::<Role>().is_err(),
            "roles are case-sensitive"
        );
    }

    #[test]
    fn id_validation_refuses_odd_strings() {
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("ABC"));
        assert!(!is_valid_id("a-b"));
        assert!(!is_valid_id(&"a".repeat(ID_CHARS_MAX + 1)));
        assert!(is_valid_id(&"a".repeat(ID_CHARS_MAX)));
    }

    #[test]
    fn random_ids_are_valid_ids() {
        for _ in 0..100 {
            let id = crate::util::id::random_id();
            assert!(is_valid_id(&id), "{id}");
        }
    }
}
