//! Join tokens: `FLT-1-<sha256 of the root CA certificate, hex>-<128-bit secret, hex>`.
//!
//! The digest lets a joining node pin the root CA it fetched over an unverified connection;
//! the secret proves to the CA that the joiner was invited, and which role it gets (one
//! secret per role). Must never compare secrets in variable time, never print a secret in
//! `Debug` output or logs (only `Display` writes the whole token, for the operator).

use std::fmt;
use std::str::FromStr;

use rand::Rng;
use subtle::{Choice, ConstantTimeEq};

use super::identity::{Role, truncate_for_message};
use super::root::RootCert;

/// First field of every token.
pub const TOKEN_PREFIX: &str = "FLT";
/// Token format version written and accepted.
pub const TOKEN_VERSION: &str = "1";
/// Bytes of the root CA digest (SHA-256).
pub const TOKEN_DIGEST_BYTES: usize = 32;
/// Bytes of random secret per token: 128 bits.
pub const TOKEN_SECRET_BYTES: usize = 16;
/// Longest string [`JoinToken::parse`] looks at. A valid token has 103 characters; anything
/// much longer is refused before splitting.
pub const TOKEN_CHARS_MAX: usize = 256;

/// Why asking for an admin join token is a bug.
const NO_ADMIN_TOKEN: &str =
    "no join token makes an admin: admin certificates are issued over the control API";

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    root_digest: [u8; TOKEN_DIGEST_BYTES],
    secret: [u8; TOKEN_SECRET_BYTES],
}

/// Why a token string is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenParseError {
    /// Longer than [`TOKEN_CHARS_MAX`].
    #[error("join token is {chars} characters long; a token has 103 (FLT-1-<64 hex>-<32 hex>)")]
    TooLong {
        /// Its length.
        chars: usize,
    },
    /// Does not start with `FLT-`.
    #[error(
        "join token does not start with \"FLT-\"; copy the whole token printed by `flotilla join-token`"
    )]
    WrongPrefix,
    /// A version this build does not know.
    #[error(
        "join token version {found:?} is not supported (this flotilla reads version 1); get a token from a manager of the same release"
    )]
    UnsupportedVersion {
        /// The version field.
        found: String,
    },
    /// Not four `-`-separated fields.
    #[error(
        "join token must have four fields separated by '-' (FLT-1-<digest>-<secret>); it has {fields}"
    )]
    WrongFieldCount {
        /// How many fields were found.
        fields: usize,
    },
    /// The digest field is not 64 hex characters long.
    #[error(
        "join token root CA digest has {hex_chars} characters; it must be 64 hex characters (SHA-256)"
    )]
    BadDigestLength {
        /// Its length.
        hex_chars: usize,
    },
    /// The digest field is not hex.
    #[error("join token root CA digest is not hexadecimal")]
    BadDigestHex,
    /// The secret field is not 32 hex characters long.
    #[error(
        "join token secret has {hex_chars} characters; it must be 32 hex characters (128 bits)"
    )]
    BadSecretLength {
        /// Its length.
        hex_chars: usize,
    },
    /// The secret field is not hex.
    #[error("join token secret is not hexadecimal")]
    BadSecretHex,
}

/// Why a well-formed (or not) token was refused by the CA.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The token string does not parse.
    #[error(transparent)]
    Malformed(#[from] TokenParseError),
    /// The token pins another root CA: it belongs to another cluster.
    #[error(
        "join token belongs to another cluster (its root CA digest is not this cluster's); use a token of this cluster"
    )]
    WrongCluster,
    /// The secret matches no current token of this cluster (wrong, or rotated away).
    #[error(
        "join token secret is not valid for this cluster (wrong, or the token was rotated); ask an operator for the current token"
    )]
    WrongSecret,
    /// Two tokens given as a pair do not fit together.
    #[error("manager and worker tokens do not fit together: {0}")]
    Inconsistent(&'static str),
}

impl JoinToken {
    /// Parses `FLT-1-<64 hex>-<32 hex>` (surrounding whitespace ignored, hex in either case).
    ///
    /// # Errors
    /// [`TokenParseError`] naming the first field that is wrong.
    pub fn parse(token: &str) -> Result<JoinToken, TokenParseError> {
        let chars = token.chars().count();
        if chars > TOKEN_CHARS_MAX {
            return Err(TokenParseError::TooLong { chars });
        }
        let token = token.trim();
        let rest = token
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .ok_or(TokenParseError::WrongPrefix)?;
        let fields: Vec<&str> = rest.split('-').collect();
        let version = fields.first().copied().unwrap_or_default();
        if version != TOKEN_VERSION {
            return Err(TokenParseError::UnsupportedVersion {
                found: truncate_for_message(version),
            });
        }
        let [_, digest, secret] = fields[..] else {
            return Err(TokenParseError::WrongFieldCount {
                fields: fields.len() + 1,
            });
        };
        if digest.len() != TOKEN_DIGEST_BYTES * 2 {
            return Err(TokenParseError::BadDigestLength {
                hex_chars: digest.chars().count(),
            });
        }
        if secret.len() != TOKEN_SECRET_BYTES * 2 {
            return Err(TokenParseError::BadSecretLength {
                hex_chars: secret.chars().count(),
            });
        }
        Ok(JoinToken {
            root_digest: decode_hex(digest).ok_or(TokenParseError::BadDigestHex)?,
            secret: decode_hex(secret).ok_or(TokenParseError::BadSecretHex)?,
        })
    }

    /// The SHA-256 of the root CA certificate this token pins.
    pub fn root_digest(&self) -> [u8; TOKEN_DIGEST_BYTES] {
        self.root_digest
    }

    /// [`Self::root_digest`] in lowercase hex.
    pub fn root_digest_hex(&self) -> String {
        hex::encode(self.root_digest)
    }

    /// True when this token pins `root`.
    pub fn pins(&self, root: &RootCert) -> bool {
        bool::from(self.root_digest.ct_eq(&root.digest()))
    }
}

impl FromStr for JoinToken {
    type Err = TokenParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JoinToken::parse(s)
    }
}

impl fmt::Display for JoinToken {
    /// The whole token, secret included: only for showing it to the operator.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{TOKEN_PREFIX}-{TOKEN_VERSION}-{}-{}",
            hex::encode(self.root_digest),
            hex::encode(self.secret)
        )
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "JoinToken({TOKEN_PREFIX}-{TOKEN_VERSION}-{}-<secret>)",
            hex::encode(self.root_digest)
        )
    }
}

fn decode_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The current join tokens of a cluster: one secret per role, all pinning the same root.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinTokens {
    root_digest: [u8; TOKEN_DIGEST_BYTES],
    manager_secret: [u8; TOKEN_SECRET_BYTES],
    worker_secret: [u8; TOKEN_SECRET_BYTES],
}

impl fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinTokens")
            .field("root_digest", &hex::encode(self.root_digest))
            .finish_non_exhaustive()
    }
}

impl JoinTokens {
    /// Fresh random secrets for both roles, pinning `root`.
    pub fn generate(root: &RootCert) -> JoinTokens {
        let mut tokens = JoinTokens {
            root_digest: root.digest(),
            manager_secret: [0; TOKEN_SECRET_BYTES],
            worker_secret: [0; TOKEN_SECRET_BYTES],
        };
        tokens.rotate(Role::Manager);
        tokens.rotate(Role::Worker);
        tokens
    }

    /// Rebuilds the pair from stored tokens (e.g. the replicated cluster object).
    ///
    /// # Errors
    /// [`TokenError::Inconsistent`] when they pin different roots or share a secret.
    pub fn from_tokens(manager: &JoinToken, worker: &JoinToken) -> Result<JoinTokens, TokenError> {
        if manager.root_digest != worker.root_digest {
            return Err(TokenError::Inconsistent("they pin different root CAs"));
        }
        if bool::from(manager.secret.ct_eq(&worker.secret)) {
            return Err(TokenError::Inconsistent(
                "they share one secret, so the role is ambiguous",
            ));
        }
        Ok(JoinTokens {
            root_digest: manager.root_digest,
            manager_secret: manager.secret,
            worker_secret: worker.secret,
        })
    }

    /// The current token for `role`.
    ///
    /// # Panics
    /// For [`Role::Admin`]: no join token makes an admin (admin certificates are issued
    /// over the control API), so asking for one is a bug.
    pub fn token(&self, role: Role) -> JoinToken {
        JoinToken {
            root_digest: self.root_digest,
            secret: *self.secret(role),
        }
    }

    /// Replaces the secret of `role` with a fresh random one; the old token stops working
    /// at once. Returns the new token.
    ///
    /// # Panics
    /// For [`Role::Admin`], as [`Self::token`].
    pub fn rotate(&mut self, role: Role) -> JoinToken {
        loop {
            let mut secret = [0u8; TOKEN_SECRET_BYTES];
            rand::rng().fill_bytes(&mut secret);
            let other = match role {
                Role::Manager => self.worker_secret,
                Role::Worker => self.manager_secret,
                Role::Admin => panic!("{NO_ADMIN_TOKEN}"),
            };
            // A collision has probability 2^-128; the loop keeps the roles unambiguous anyway.
            if secret != other && secret != *self.secret(role) {
                *self.secret_mut(role) = secret;
                return self.token(role);
            }
        }
    }

    /// Checks a presented token and returns the role it grants. Both secrets are always
    /// compared, in constant time, so timing reveals neither the secret nor which role matched.
    ///
    /// # Errors
    /// [`TokenError::WrongCluster`] when the token pins another root;
    /// [`TokenError::WrongSecret`] when the secret is wrong or was rotated.
    pub fn verify(&self, presented: &JoinToken) -> Result<Role, TokenError> {
        if !bool::from(presented.root_digest.ct_eq(&self.root_digest)) {
            return Err(TokenError::WrongCluster);
        }
        let is_manager: Choice = presented.secret.ct_eq(&self.manager_secret);
        let is_worker: Choice = presented.secret.ct_eq(&self.worker_secret);
        match (bool::from(is_manager), bool::from(is_worker)) {
            (true, false) => Ok(Role::Manager),
            (false, true) => Ok(Role::Worker),
            (false, false) => Err(TokenError::WrongSecret),
            (true, true) => unreachable!("rotate and from_tokens keep the two secrets distinct"),
        }
    }

    /// Parses then [`Self::verify`]s a token string.
    ///
    /// # Errors
    /// [`TokenError::Malformed`] or as [`Self::verify`].
    pub fn verify_str(&self, presented: &str) -> Result<Role, TokenError> {
        self.verify(&JoinToken::parse(presented)?)
    }

    fn secret(&self, role: Role) -> &[u8; TOKEN_SECRET_BYTES] {
        match role {
            Role::Manager => &self.manager_secret,
            Role::Worker => &self.worker_secret,
            Role::Admin => panic!("{NO_ADMIN_TOKEN}"),
        }
    }

    fn secret_mut(&mut self, role: Role) -> &mut [u8; TOKEN_SECRET_BYTES] {
        match role {
            Role::Manager => &mut self.manager_secret,
            Role::Worker => &mut self.worker_secret,
            Role::Admin => panic!("{NO_ADMIN_TOKEN}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinToken {
        JoinToken {
            root_digest: [0xab; 32],
            secret: [0x01; 16],
        }
    }

    fn tokens() -> JoinTokens {
        let mut t = JoinTokens {
            root_digest: [7; 32],
            manager_secret: [0; 16],
            worker_secret: [0; 16],
        };
        t.rotate(Role::Manager);
        t.rotate(Role::Worker);
        t
    }

    #[test]
    fn display_parse_round_trip_and_shape() {
        let token = sample();
        let text = token.to_string();
        assert_eq!(text.len(), 103);
        assert_eq!(
            text,
            format!("FLT-1-{}-{}", "ab".repeat(32), "01".repeat(16))
        );
        assert_eq!(JoinToken::parse(&text).unwrap(), token);
        assert_eq!(
            JoinToken::parse(&format!("  {}\n", text.to_uppercase())).unwrap(),
            token
        );
        assert!(
            !format!("{token:?}").contains(&"01".repeat(16)),
            "Debug must hide the secret"
        );
    }

    #[test]
    fn parse_errors_are_precise() {
        let digest = "ab".repeat(32);
        let secret = "01".repeat(16);
        let cases = [
            (
                format!("SWMTKN-1-{digest}-{secret}"),
                TokenParseError::WrongPrefix,
            ),
            (
                format!("FLT1-{digest}-{secret}"),
                TokenParseError::WrongPrefix,
            ),
            (
                format!("FLT-2-{digest}-{secret}"),
                TokenParseError::UnsupportedVersion { found: "2".into() },
            ),
            (
                format!("FLT-1-{digest}"),
                TokenParseError::WrongFieldCount { fields: 3 },
            ),
            (
                format!("FLT-1-{digest}-{secret}-x"),
                TokenParseError::WrongFieldCount { fields: 5 },
            ),
            (
                format!("FLT-1-{}-{secret}", "ab".repeat(31)),
                TokenParseError::BadDigestLength { hex_chars: 62 },
            ),
            (
                format!("FLT-1-{}-{secret}", "zz".repeat(32)),
                TokenParseError::BadDigestHex,
            ),
            (
                format!("FLT-1-{digest}-{}", "01".repeat(15)),
                TokenParseError::BadSecretLength { hex_chars: 30 },
            ),
            (
                format!("FLT-1-{digest}-{}", "0g".repeat(16)),
                TokenParseError::BadSecretHex,
            ),
            (
                "x".repeat(TOKEN_CHARS_MAX + 1),
                TokenParseError::TooLong {
                    chars: TOKEN_CHARS_MAX + 1,
                },
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(JoinToken::parse(&text), Err(expected), "token {text:?}");
        }
        // Multi-byte characters of the right byte length are not hex, and must not panic.
        let odd = format!("FLT-1-{}{}-{secret}", "é".repeat(31), "ab");
        assert!(JoinToken::parse(&odd).is_err());
    }

    #[test]
    fn verify_grants_the_role_of_the_secret() {
        let t = tokens();
        assert_eq!(t.verify(&t.token(Role::Manager)), Ok(Role::Manager));
        assert_eq!(t.verify(&t.token(Role::Worker)), Ok(Role::Worker));
        assert_ne!(t.token(Role::Manager), t.token(Role::Worker));
    }

    #[test]
    fn wrong_secret_and_wrong_cluster_are_refused() {
        let t = tokens();
        let mut wrong = t.token(Role::Worker);
        wrong.secret[15] ^= 1;
        assert_eq!(t.verify(&wrong), Err(TokenError::WrongSecret));
        let mut other_cluster = t.token(Role::Worker);
        other_cluster.root_digest[0] ^= 1;
        assert_eq!(t.verify(&other_cluster), Err(TokenError::WrongCluster));
        assert!(matches!(
            t.verify_str("FLT-9-x-y"),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn rotation_invalidates_only_the_rotated_role() {
        let mut t = tokens();
        let old_worker = t.token(Role::Worker);
        let manager = t.token(Role::Manager);
        let new_worker = t.rotate(Role::Worker);
        assert_ne!(old_worker, new_worker);
        assert_eq!(t.verify(&old_worker), Err(TokenError::WrongSecret));
        assert_eq!(t.verify(&new_worker), Ok(Role::Worker));
        assert_eq!(t.verify(&manager), Ok(Role::Manager));
    }

    #[test]
    fn from_tokens_round_trips_and_checks_consistency() {
        let t = tokens();
        let back =
            JoinTokens::from_tokens(&t.token(Role::Manager), &t.token(Role::Worker)).unwrap();
        assert_eq!(back, t);
        assert!(JoinTokens::from_tokens(&t.token(Role::Worker), &t.token(Role::Worker)).is_err());
        let mut other = t.token(Role::Worker);
        other.root_digest[3] ^= 1;
        assert!(JoinTokens::from_tokens(&t.token(Role::Manager), &other).is_err());
    }
}
