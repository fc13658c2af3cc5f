//! Secret values at rest: sealing a secret's value with the cluster's secrets key before it
//! goes into a transaction, and opening it where it must leave the managers (the dispatcher,
//! for the node that runs a task reading it).
//!
//! Owns the sealed format: version byte 1, a 96-bit random nonce, then the AES-256-GCM
//! ciphertext and tag, with `flotilla-secret:<secret id>` as additional data (a sealed value
//! copied onto another secret does not open). The key (`Cluster.secrets_key`, 32 random
//! bytes) is made by the leader with the first secret and replicated in the Cluster object,
//! so the Raft log and snapshots in a manager's state directory hold no secret value in
//! plain text. Random nonces are safe: a key seals one value per secret create, far below
//! the 2^32 values after which a nonce collision becomes likely.
//!
//! Must never log, print or return a value except to its one consumer (the dispatcher's
//! assignment to the node that needs it), nor reuse a nonce on purpose.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Bytes of a secrets key (AES-256).
pub const SECRETS_KEY_BYTES: usize = 32;
/// The sealed format's version byte.
const VERSION: u8 = 1;
/// Bytes a sealed value has beyond its plain value: version, nonce, tag.
pub const SEAL_OVERHEAD_BYTES: usize = 1 + NONCE_LEN + 16;

/// Why a sealed value could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Too short or of an unknown version.
    #[error("the stored secret value is malformed (not sealed by this version of flotilla)")]
    Malformed,
    /// The key or the secret id does not match (or the bytes were changed).
    #[error("the stored secret value does not open with the cluster's secrets key")]
    WrongKey,
    /// The cluster holds no secrets key.
    #[error("the cluster has no secrets key; the secret's value cannot be opened")]
    NoKey,
}

/// A new random secrets key.
///
/// # Panics
/// If the system's random generator fails (nothing sensible can go on without it).
pub fn new_key() -> Vec<u8> {
    let mut key = vec![0u8; SECRETS_KEY_BYTES];
    SystemRandom::new()
        .fill(&mut key)
        .expect("the system's random generator works");
    key
}

fn aead(key: &[u8]) -> Option<LessSafeKey> {
    UnboundKey::new(&AES_256_GCM, key)
        .ok()
        .map(LessSafeKey::new)
}

fn aad(secret_id: &str) -> Vec<u8> {
    format!("flotilla-secret:{secret_id}").into_bytes()
}

/// Seals `plain`, the value of secret `secret_id`, under `key`.
///
/// # Errors
/// [`OpenError::NoKey`] when `key` is not a [`SECRETS_KEY_BYTES`]-byte key.
pub fn seal(key: &[u8], secret_id: &str, plain: &[u8]) -> Result<Vec<u8>, OpenError> {
    let aead = aead(key).ok_or(OpenError::NoKey)?;
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .expect("the system's random generator works");
    let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD_BYTES);
    out.push(VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = aead
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(secret_id)),
            &mut out[1 + NONCE_LEN..],
        )
        .expect("AES-GCM seals any value under 64 GiB");
    out.extend_from_slice(tag.as_ref());
    debug_assert_eq!(out.len(), plain.len() + SEAL_OVERHEAD_BYTES);
    Ok(out)
}

/// Opens the sealed value of secret `secret_id` with `key`.
///
/// # Errors
/// [`OpenError`]: no key, a malformed value, or one that does not authenticate.
pub fn open(key: &[u8], secret_id: &str, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    let aead = aead(key).ok_or(OpenError::NoKey)?;
    if sealed.len() < SEAL_OVERHEAD_BYTES || sealed[0] != VERSION {
        return Err(OpenError::Malformed);
    }
    let nonce: [u8; NONCE_LEN] = sealed[1..=NONCE_LEN]
        .try_into()
        .expect("the length was checked above");
    let mut buffer = sealed[1 + NONCE_LEN..].to_vec();
    let len = aead
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad(secret_id)),
            &mut buffer,
        )
        .map_err(|_| OpenError::WrongKey)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_with_its_key_and_id_only() {
        let key = new_key();
        let sealed = seal(&key, "s1", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(open(&key, "s1", &sealed).unwrap(), b"hunter2");
        assert_eq!(open(&key, "s2", &sealed), Err(OpenError::WrongKey));
        assert_eq!(open(&new_key(), "s1", &sealed), Err(OpenError::WrongKey));
        assert_eq!(open(&key, "s1", &sealed[..5]), Err(OpenError::Malformed));
        assert_eq!(open(&[], "s1", &sealed), Err(OpenError::NoKey));
        assert_ne!(
            seal(&key, "s1", b"hunter2").unwrap(),
            sealed,
            "a fresh nonce each time"
        );
    }
}
