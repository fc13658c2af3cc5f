//! Certificate signing requests: the one thing the CA takes from a CSR is its public key.
//!
//! The CA checks the CSR's self-signature (so the requester proves it holds the private key)
//! and then throws everything else away: subject, requested extensions and alternative names
//! are attacker-chosen and never reach a certificate. Must never copy any CSR field other
//! than the public key into an issued certificate.

use rcgen::{PKCS_ECDSA_P256_SHA256, PublicKeyData, SubjectPublicKeyInfo};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use super::files::der_from_der_or_pem;

/// Largest CSR accepted, in bytes (DER or PEM). A P-256 CSR is about 250 bytes; the bound is
/// checked before any parsing.
pub const CSR_BYTES_MAX: usize = 16 * 1024;

/// PEM label of CSRs.
pub(crate) const PEM_CSR: &str = "CERTIFICATE REQUEST";

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// The CSR is larger than [`CSR_BYTES_MAX`].
    #[error("certificate signing request is {bytes} bytes, more than the {bytes_max} allowed")]
    TooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        bytes_max: usize,
    },
    /// The bytes are not a PKCS#10 request.
    #[error(
        "certificate signing request does not parse ({reason}); send a DER or PEM PKCS#10 request"
    )]
    Malformed {
        /// What the parser said.
        reason: String,
    },
    /// The request's signature does not verify with its own public key.
    #[error("certificate signing request is not signed by the key it contains")]
    BadSignature,
    /// The key is not ECDSA P-256.
    #[error(
        "certificate signing request carries a key that is not ECDSA P-256; flotilla issues P-256 certificates only"
    )]
    UnsupportedKey,
}

/// The public key of a verified CSR: everything the CA keeps from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrPublicKey(SubjectPublicKeyInfo);

impl CsrPublicKey {
    pub(crate) fn key(&self) -> &SubjectPublicKeyInfo {
        &self.0
    }

    /// DER SubjectPublicKeyInfo of the key.
    pub fn spki_der(&self) -> Vec<u8> {
        self.0.subject_public_key_info()
    }
}

/// Parses a CSR (DER or PEM), verifies its self-signature and returns only its public key.
///
/// # Errors
/// [`CsrError`] when it is too large, malformed, badly signed, or not a P-256 key.
pub fn verified_csr_public_key(csr: &[u8]) -> Result<CsrPublicKey, CsrError> {
    if csr.len() > CSR_BYTES_MAX {
        return Err(CsrError::TooLarge {
            bytes: csr.len(),
            bytes_max: CSR_BYTES_MAX,
        });
    }
    let der = der_from_der_or_pem(csr, PEM_CSR).map_err(|reason| CsrError::Malformed { reason })?;
    let (rest, request) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed {
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed {
            reason: format!("{} bytes after the request", rest.len()),
        });
    }
    request
        .verify_signature()
        .map_err(|_| CsrError::BadSignature)?;
    let spki = SubjectPublicKeyInfo::from_der(request.certification_request_info.subject_pki.raw)
        .map_err(|_| CsrError::UnsupportedKey)?;
    // Key type is uniform across the cluster: every certificate and every peer speaks P-256.
    if spki.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::UnsupportedKey);
    }
    Ok(CsrPublicKey(spki))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_der(key: &KeyPair) -> Vec<u8> {
        CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn accepts_der_and_pem_and_keeps_the_key() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let der = csr_der(&key);
        let from_der = verified_csr_public_key(&der).unwrap();
        let pem = pem::encode(&pem::Pem::new(PEM_CSR, der));
        let from_pem = verified_csr_public_key(pem.as_bytes()).unwrap();
        assert_eq!(from_der, from_pem);
        assert_eq!(from_der.spki_der(), key.subject_public_key_info());
    }

    #[test]
    fn refuses_tampered_signature() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_der(&key);
        let last = der.len() - 1;
        der[last] ^= 0x01;
        assert!(matches!(
            verified_csr_public_key(&der),
            Err(CsrError::BadSignature | CsrError::Malformed { .. })
        ));
    }

    #[test]
    fn refuses_other_key_types() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        assert!(matches!(
            verified_csr_public_key(&csr_der(&key)),
            Err(CsrError::UnsupportedKey)
        ));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(matches!(
            verified_csr_public_key(&csr_der(&key)),
            Err(CsrError::UnsupportedKey)
        ));
    }

    #[test]
    fn refuses_garbage_oversize_and_wrong_pem_label() {
        assert!(matches!(
            verified_csr_public_key(b"not a csr"),
            Err(CsrError::Malformed { .. })
        ));
        assert!(matches!(
            verified_csr_public_key(&vec![0x30; CSR_BYTES_MAX + 1]),
            Err(CsrError::TooLarge { .. })
        ));
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", csr_der(&key)));
        assert!(matches!(
            verified_csr_public_key(pem.as_bytes()),
            Err(CsrError::Malformed { .. })
        ));
        let mut trailing = csr_der(&key);
        trailing.push(0);
        assert!(matches!(
            verified_csr_public_key(&trailing),
            Err(CsrError::Malformed { .. })
        ));
    }
}
