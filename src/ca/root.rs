//! [`RootCert`]: the cluster's root CA certificate as every node holds it (no key).
//!
//! The root is the cluster's trust anchor and carries the cluster id in its O attribute, so a
//! node that has pinned the root (by the digest in its join token) also knows the cluster id.
//! Must never hold the CA's private key; that lives in [`super::ClusterCa`] only.

use std::fmt;
use std::path::Path;

use rustls::pki_types::CertificateDer;
use x509_parser::certificate::X509Certificate;

use super::files::{self, PEM_CERTIFICATE, Secrecy, StorageError};
use super::identity::{Attribute, CertError, is_valid_id, parse_cert, single_attribute};

/// Largest root certificate accepted from a peer, in bytes. Ours are about 450 bytes; the
/// bound keeps a hostile bootstrap server from making a joining node parse megabytes.
pub const ROOT_CERT_BYTES_MAX: usize = 16 * 1024;

/// A parsed, self-consistent root CA certificate: self-signed, a CA, naming a cluster id.
#[derive(Clone, PartialEq, Eq)]
pub struct RootCert {
    der: CertificateDer<'static>,
    cluster_id: String,
    digest: [u8; 32],
}

impl fmt::Debug for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCert")
            .field("cluster_id", &self.cluster_id)
            .field("sha256", &self.digest_hex())
            .finish()
    }
}

impl RootCert {
    /// Parses and checks a root certificate given as DER or as one PEM `CERTIFICATE` block.
    ///
    /// # Errors
    /// [`CertError`] when it does not parse, is larger than [`ROOT_CERT_BYTES_MAX`], is not a
    /// self-signed CA certificate, or carries no valid cluster id in O.
    pub fn from_bytes(bytes: &[u8]) -> Result<RootCert, CertError> {
        if bytes.len() > ROOT_CERT_BYTES_MAX {
            return Err(CertError::Malformed {
                reason: format!(
                    "{} bytes, more than the {ROOT_CERT_BYTES_MAX} a root certificate may have",
                    bytes.len()
                ),
            });
        }
        let der = files::der_from_der_or_pem(bytes, PEM_CERTIFICATE)
            .map_err(|reason| CertError::Malformed { reason })?;
        RootCert::from_der(der)
    }

    fn from_der(der: Vec<u8>) -> Result<RootCert, CertError> {
        let cluster_id = {
            let cert = parse_cert(&der)?;
            check_is_root_ca(&cert)?;
            let cluster_id = single_attribute(cert.subject(), Attribute::Organization)?;
            if !is_valid_id(cluster_id) {
                return Err(CertError::BadId {
                    attribute: "O (cluster id)",
                    value: super::identity::truncate_for_message(cluster_id),
                });
            }
            cluster_id.to_owned()
        };
        Ok(RootCert {
            digest: sha256(&der),
            der: CertificateDer::from(der),
            cluster_id,
        })
    }

    /// The certificate in DER, as handed to rustls and sent to joining nodes.
    pub fn der(&self) -> &CertificateDer<'static> {
        &self.der
    }

    /// The certificate as one PEM block.
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new(PEM_CERTIFICATE, self.der.to_vec()))
    }

    /// The cluster id (the root's O attribute).
    pub fn cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// SHA-256 of the DER certificate: what join tokens pin.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// [`Self::digest`] in lowercase hex, as written in join tokens.
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }

    /// Writes the root certificate to `path` (0600, atomic).
    ///
    /// # Errors
    /// [`StorageError::Io`] when the write fails; the old file is untouched then.
    pub fn save(&self, path: &Path) -> Result<(), StorageError> {
        files::write_pem_file(path, &[pem::Pem::new(PEM_CERTIFICATE, self.der.to_vec())])
    }

    /// Reads a root certificate written by [`Self::save`].
    ///
    /// # Errors
    /// [`StorageError`] when the file is missing, unreadable, or does not hold exactly one
    /// valid root certificate.
    pub fn load(path: &Path) -> Result<RootCert, StorageError> {
        let blocks = files::read_pem_file(path, Secrecy::Public)?;
        let [der] = files::expect_blocks(path, blocks, [PEM_CERTIFICATE])?;
        RootCert::from_der(der).map_err(|e| StorageError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Checks that `cert` was signed by this root's key (signature only, no dates).
    pub(crate) fn check_signed(&self, cert: &X509Certificate<'_>) -> Result<(), CertError> {
        let root = parse_cert(&self.der).expect("the root was parsed when it was constructed");
        cert.verify_signature(Some(root.public_key()))
            .map_err(|_| CertError::NotSignedByRoot)
    }
}

fn check_is_root_ca(cert: &X509Certificate<'_>) -> Result<(), CertError> {
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(CertError::NotRootCa {
            reason: "basic constraints do not say CA",
        });
    }
    if cert.subject().as_raw() != cert.issuer().as_raw() {
        return Err(CertError::NotRootCa {
            reason: "issuer differs from subject",
        });
    }
    cert.verify_signature(None)
        .map_err(|_| CertError::NotRootCa {
            reason: "its self-signature does not verify",
        })
}

/// SHA-256 of `bytes`.
pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .try_into()
        .expect("SHA-256 digests are 32 bytes")
}
