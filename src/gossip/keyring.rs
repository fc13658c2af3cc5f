//! AES-256-GCM on every gossip datagram and bulk-sync chunk, under a keyring of the cluster's
//! network bootstrap keys (memberlist's keyring: add, use as primary, remove).
//!
//! A sealed message is `version (1) ‖ nonce (12) ‖ ciphertext ‖ tag (16)`; the additional
//! data names its kind ([`Kind`]), so a chunk never opens as a datagram nor the reverse.
//! Sealing uses the primary key; opening tries every key, primary first. A message under no
//! key of the ring is refused ([`OpenError::UnknownKey`]): its caller drops and counts it.
//!
//! Nonces are 96 random bits from the caller's CSPRNG (the driver passes ring's
//! `SystemRandom`; the benchmark a seeded generator). Why random nonces are safe here: a key
//! seals at most what the whole cluster sends during one rotation period. At 1,000 nodes
//! sending about 20 datagrams a second each (5 gossip rounds × 3 peers, probes and acks),
//! that is 20,000 a second, 8.6·10⁸ (≈ 2^30) in the 12 hours a key stays primary; the chance
//! that two of them share a nonce is about n²/2^97 ≈ 2^-37, below NIST SP 800-38D's bound of
//! 2^-32 for random nonces. A per-node counter would need a per-node prefix that a restart
//! never reuses, which costs more than it saves.
//!
//! Owns the keys; must never log or print them (no `Debug` of key bytes), nor seal without a
//! key, nor accept a key that is not 32 bytes.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

/// The key length (AES-256).
pub const KEY_BYTES: usize = 32;
/// Keys held at most (the leader keeps the current one and a few previous ones).
pub const KEYS_MAX: usize = 8;
/// The format version byte of a sealed message.
const VERSION: u8 = 1;
/// The authentication tag.
const TAG_BYTES: usize = 16;
/// What sealing adds to a message: version, nonce and tag.
pub const SEAL_OVERHEAD_BYTES: usize = 1 + NONCE_LEN + TAG_BYTES;

/// What a sealed message is: it is bound into the additional data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A UDP datagram (probe, gossip, push-pull).
    Packet,
    /// A bulk-sync chunk.
    Chunk,
}

impl Kind {
    fn aad(self) -> &'static [u8] {
        match self {
            Kind::Packet => b"flotilla-gossip-packet-v1",
            Kind::Chunk => b"flotilla-gossip-chunk-v1",
        }
    }
}

/// Why a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Keys are 32 bytes (AES-256).
    #[error("a gossip key is {KEY_BYTES} bytes, not {0}")]
    BadLength(usize),
    /// Remove a key first.
    #[error("the keyring holds {KEYS_MAX} keys already: remove one first")]
    Full,
    /// Add the key before using it.
    #[error("that key is not in the keyring: add it first")]
    Unknown,
    /// Make another key primary first.
    #[error("that key is the primary one: make another key primary before removing it")]
    Primary,
}

/// Why a sealed message was refused (drop it and count it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    /// Shorter than the overhead, or an unknown format version.
    #[error("malformed sealed message")]
    Malformed,
    /// No key of the ring opens it: another cluster, a key long rotated away, or tampering.
    #[error("no key of the keyring opens this message")]
    UnknownKey,
}

/// Why a message could not be sealed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// No key yet: the node has not received the cluster's keys (its session brings them).
    #[error("no gossip key yet: wait for the dispatcher session to deliver the cluster's keys")]
    NoKey,
}

struct Key {
    bytes: [u8; KEY_BYTES],
    aead: LessSafeKey,
}

/// The keys; the first is the primary one (it seals).
#[derive(Default)]
pub struct Keyring {
    keys: Vec<Key>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key bytes.
        f.debug_struct("Keyring")
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn key_array(key: &[u8]) -> Result<[u8; KEY_BYTES], KeyError> {
    key.try_into().map_err(|_| KeyError::BadLength(key.len()))
}

impl Keyring {
    /// An empty keyring: nothing seals until a key is added.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True without any key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// True if `key` is held.
    pub fn contains(&self, key: &[u8]) -> bool {
        self.keys.iter().any(|k| k.bytes[..] == *key)
    }

    /// True if `key` is the primary one.
    pub fn is_primary(&self, key: &[u8]) -> bool {
        self.keys.first().is_some_and(|k| k.bytes[..] == *key)
    }

    /// Adds `key` (a no-op if held); the first key added becomes primary.
    ///
    /// # Errors
    /// [`KeyError::BadLength`], [`KeyError::Full`].
    pub fn add(&mut self, key: &[u8]) -> Result<(), KeyError> {
        let bytes = key_array(key)?;
        if self.contains(key) {
            return Ok(());
        }
        if self.keys.len() >= KEYS_MAX {
            return Err(KeyError::Full);
        }
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| KeyError::BadLength(0))?;
        self.keys.push(Key {
            bytes,
            aead: LessSafeKey::new(unbound),
        });
        Ok(())
    }

    /// Makes `key` (already added) the one that seals.
    ///
    /// # Errors
    /// [`KeyError::Unknown`].
    pub fn use_primary(&mut self, key: &[u8]) -> Result<(), KeyError> {
        let at = self
            .keys
            .iter()
            .position(|k| k.bytes[..] == *key)
            .ok_or(KeyError::Unknown)?;
        // Primary first, so that opening tries it first (it opens almost everything).
        self.keys[..=at].rotate_right(1);
        Ok(())
    }

    /// Removes `key` (a no-op if not held).
    ///
    /// # Errors
    /// [`KeyError::Primary`]: make another key primary first.
    pub fn remove(&mut self, key: &[u8]) -> Result<(), KeyError> {
        if self.is_primary(key) {
            return Err(KeyError::Primary);
        }
        self.keys.retain(|k| k.bytes[..] != *key);
        Ok(())
    }

    /// Replaces the whole ring with `keys`, `primary` sealing (what the leader delivers).
    ///
    /// # Errors
    /// A bad key, too many, or a primary not among `keys`; the ring is unchanged then.
    pub fn replace(&mut self, primary: &[u8], keys: &[&[u8]]) -> Result<(), KeyError> {
        let mut ring = Keyring::new();
        ring.add(primary)?;
        for key in keys {
            ring.add(key)?;
        }
        *self = ring;
        Ok(())
    }

    /// Seals `plaintext` under the primary key with `nonce` (96 random bits).
    ///
    /// # Errors
    /// [`SealError::NoKey`].
    pub fn seal(
        &self,
        kind: Kind,
        nonce: [u8; NONCE_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let key = self.keys.first().ok_or(SealError::NoKey)?;
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD_BYTES);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kind.aad()),
                &mut out[1 + NONCE_LEN..],
            )
            .expect("AES-GCM seals any message under 64 GiB");
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a sealed message with the first key that authenticates it.
    ///
    /// # Errors
    /// [`OpenError::Malformed`], [`OpenError::UnknownKey`].
    pub fn open(&self, kind: Kind, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < SEAL_OVERHEAD_BYTES || sealed[0] != VERSION {
            return Err(OpenError::Malformed);
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..=NONCE_LEN]
            .try_into()
            .expect("the length was checked above");
        let body = &sealed[1 + NONCE_LEN..];
        for key in &self.keys {
            let mut buffer = body.to_vec();
            if let Ok(plain) = key.aead.open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(kind.aad()),
                &mut buffer,
            ) {
                let len = plain.len();
                buffer.truncate(len);
                return Ok(buffer);
            }
        }
        Err(OpenError::UnknownKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 32] = [1; 32];
    const B: [u8; 32] = [2; 32];
    const C: [u8; 32] = [3; 32];

    #[test]
    fn sealed_message_opens_under_the_same_ring() {
        let mut ring = Keyring::new();
        ring.add(&A).unwrap();
        let sealed = ring.seal(Kind::Packet, [7; 12], b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD_BYTES);
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(ring.open(Kind::Packet, &sealed).unwrap(), b"hello");
    }

    #[test]
    fn a_packet_never_opens_as_a_chunk() {
        let mut ring = Keyring::new();
        ring.add(&A).unwrap();
        let sealed = ring.seal(Kind::Packet, [7; 12], b"hello").unwrap();
        assert_eq!(ring.open(Kind::Chunk, &sealed), Err(OpenError::UnknownKey));
    }

    #[test]
    fn rotation_opens_old_and_new_seals_with_the_new_primary() {
        let mut old = Keyring::new();
        old.add(&A).unwrap();
        let mut ring = Keyring::new();
        ring.add(&A).unwrap();
        ring.add(&B).unwrap();
        ring.use_primary(&B).unwrap();
        assert!(ring.is_primary(&B));
        let from_old = old.seal(Kind::Packet, [1; 12], b"x").unwrap();
        assert_eq!(ring.open(Kind::Packet, &from_old).unwrap(), b"x");
        let from_new = ring.seal(Kind::Packet, [2; 12], b"y").unwrap();
        assert_eq!(
            old.open(Kind::Packet, &from_new),
            Err(OpenError::UnknownKey)
        );
        assert_eq!(ring.remove(&B), Err(KeyError::Primary));
        ring.remove(&A).unwrap();
        assert_eq!(
            ring.open(Kind::Packet, &from_old),
            Err(OpenError::UnknownKey)
        );
    }

    #[test]
    fn unknown_keys_tampering_and_garbage_are_refused() {
        let mut ring = Keyring::new();
        ring.add(&A).unwrap();
        let mut other = Keyring::new();
        other.add(&C).unwrap();
        let sealed = other.seal(Kind::Packet, [0; 12], b"payload").unwrap();
        assert_eq!(ring.open(Kind::Packet, &sealed), Err(OpenError::UnknownKey));
        let mut tampered = ring.seal(Kind::Packet, [0; 12], b"payload").unwrap();
        tampered[15] ^= 1;
        assert_eq!(
            ring.open(Kind::Packet, &tampered),
            Err(OpenError::UnknownKey)
        );
        assert_eq!(ring.open(Kind::Packet, &[1; 5]), Err(OpenError::Malformed));
        let mut versioned = ring.seal(Kind::Packet, [0; 12], b"p").unwrap();
        versioned[0] = 9;
        assert_eq!(
            ring.open(Kind::Packet, &versioned),
            Err(OpenError::Malformed)
        );
    }

    #[test]
    fn bad_keys_and_an_empty_ring_are_refused() {
        let mut ring = Keyring::new();
        assert_eq!(ring.add(&[0; 16]), Err(KeyError::BadLength(16)));
        assert_eq!(ring.seal(Kind::Chunk, [0; 12], b"x"), Err(SealError::NoKey));
        assert_eq!(ring.use_primary(&A), Err(KeyError::Unknown));
        for i in 0..KEYS_MAX {
            ring.add(&[i as u8 + 10; 32]).unwrap();
        }
        assert_eq!(ring.add(&A), Err(KeyError::Full));
        assert!(!format!("{ring:?}").contains("10"));
    }

    #[test]
    fn replace_installs_the_primary_first() {
        let mut ring = Keyring::new();
        ring.add(&C).unwrap();
        ring.replace(&B, &[&A, &B]).unwrap();
        assert!(ring.is_primary(&B));
        assert!(ring.contains(&A));
        assert!(!ring.contains(&C));
        assert_eq!(ring.replace(&A, &[&[0; 3]]), Err(KeyError::BadLength(3)));
        assert!(ring.is_primary(&B));
    }
}
