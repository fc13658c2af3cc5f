//! The ids flotilla mints: cluster, node, object, session and task ids, all 25 lowercase
//! letters and digits (128 bits written in base 36, zero-padded, as swarmkit's are).
//!
//! Owns the one alphabet and the one encoding. Must never reduce a random or hashed byte
//! modulo the alphabet (that favours the first 4 of 36 letters): every id is a whole
//! 128-bit number converted to base 36.

use rand::Rng;

/// Length of every id minted here: 36^25 > 2^128, so every 128-bit value fits.
pub const ID_CHARS: usize = 25;

const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A new random id: 128 bits from a CSPRNG, base 36, zero-padded to [`ID_CHARS`].
pub fn random_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    base36_padded(u128::from_be_bytes(bytes))
}

/// An id derived from `parts` alone: the first 128 bits of the SHA-256 of the parts (each
/// length-prefixed, so `["ab", "c"]` and `["a", "bc"]` differ), in base 36. The same parts
/// always give the same id, on every manager.
pub fn derived_id(parts: &[&str]) -> String {
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    for part in parts {
        hasher.update(&(part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finish();
    let first: [u8; 16] = digest.as_ref()[..16]
        .try_into()
        .expect("a SHA-256 digest has 32 bytes");
    base36_padded(u128::from_be_bytes(first))
}

pub(crate) fn base36_padded(mut value: u128) -> String {
    let mut out = [b'0'; ID_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value % 36) as usize];
        value /= 36;
    }
    // 36^25 > 2^128, so every u128 fits in ID_CHARS digits.
    assert_eq!(value, 0, "a u128 always fits in {ID_CHARS} base-36 digits");
    String::from_utf8(out.to_vec()).expect("base-36 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_fixed_length_base36_and_distinct() {
        let a = random_id();
        let b = random_id();
        assert_eq!(a.len(), ID_CHARS);
        // What `ca::is_valid_id` accepts (its tests check random ids; `util` is below `ca`).
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        );
        assert_ne!(a, b);
        assert_eq!(base36_padded(0), "0".repeat(ID_CHARS));
        assert_eq!(base36_padded(u128::MAX).len(), ID_CHARS);
        assert_eq!(base36_padded(35), format!("{}z", "0".repeat(ID_CHARS - 1)));
    }

    #[test]
    fn object_ids_are_25_lowercase_alphanumerics_and_differ() {
        let a = random_id();
        let b = random_id();
        assert_eq!(a.len(), ID_CHARS);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_digit() || c.is_ascii_lowercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn derived_ids_depend_on_every_part_and_its_boundaries() {
        let id = derived_id(&["svc", "1", "v7"]);
        assert_eq!(id, derived_id(&["svc", "1", "v7"]), "deterministic");
        assert_eq!(id.len(), ID_CHARS);
        assert_ne!(id, derived_id(&["svc", "1", "v8"]));
        assert_ne!(derived_id(&["ab", "c"]), derived_id(&["a", "bc"]));
    }

    /// Each character of a random id, past the first (which carries only 128 - 24·log2(36)
    /// ≈ 4 bits), is close to uniform: no letter is favoured the way `byte % 36` favours
    /// the first four (8/256 against 7/256).
    #[test]
    fn the_last_character_is_uniform() {
        let mut counts = [0u32; 36];
        let samples = 36 * 2000;
        for i in 0..samples {
            let id = derived_id(&["uniformity", &i.to_string()]);
            let last = id.as_bytes()[ID_CHARS - 1];
            let index = DIGITS
                .iter()
                .position(|&d| d == last)
                .expect("a base-36 digit");
            counts[index] += 1;
        }
        // Expected 2000 each; a modulo-biased encoding would put ~2250 on each of 0-3.
        // 5 standard deviations (~±220) bound a fair one (the inputs are fixed: no flakes).
        for count in counts {
            assert!((1780..=2220).contains(&count), "{counts:?}");
        }
    }
}
