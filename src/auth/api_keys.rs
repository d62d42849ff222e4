//! API keys for callers: `tbk_` + 43 base64url characters (256 random bits). Only the
//! SHA-256 of a key is stored; a slow password hash buys nothing at this entropy.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "tbk_";
const BODY_LEN: usize = 43;

/// A syntactically valid API key.
pub struct ApiKey(SecretString);

impl ApiKey {
    /// Accepts only the exact shape the broker issues, so junk never reaches the database.
    pub fn parse(s: &str) -> Option<Self> {
        let body = s.strip_prefix(PREFIX)?;
        (body.len() == BODY_LEN
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        .then(|| Self(SecretString::from(s.to_owned())))
    }

    /// A new random key.
    pub fn generate() -> Self {
        let mut raw = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut raw);
        Self(SecretString::from(format!("{PREFIX}{}", B64.encode(raw))))
    }

    /// Hex SHA-256 of the key: what the store keeps and looks up by.
    pub fn hash(&self) -> String {
        hex::encode(self.digest())
    }

    /// SHA-256 of the key.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.expose_secret().as_bytes()).into()
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_differ() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert!(ApiKey::parse(a.expose()).is_some());
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 64);
    }

    #[test]
    fn rejects_other_shapes() {
        for bad in [
            "",
            "tbk_",
            "tbk_short",
            "Bearer x",
            &format!("xyz_{}", "a".repeat(43)),
            &format!("tbk_{}", "a".repeat(44)),
            &format!("tbk_{}!", "a".repeat(42)),
        ] {
            assert!(ApiKey::parse(bad).is_none(), "{bad}");
        }
    }
}
