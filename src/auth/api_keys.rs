//! API keys for callers: `tbk_` + 43 random base62 characters (256 bits) + a 6-character
//! base62 CRC32 of everything before it, as GitHub's tokens do. The fixed prefix and the
//! checksum let secret scanners find a leaked key offline with few false positives, and a
//! mistyped or made-up key is refused before any database lookup. Keys issued before the
//! checksum (`tbk_` + 43 base64url characters) keep working. Only the SHA-256 of a key is
//! stored; a slow password hash buys nothing at this entropy.

use rand::distributions::{Alphanumeric, DistString};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

pub const PREFIX: &str = "tbk_";
const RANDOM_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;
/// The regular expression secret scanners use for current keys (see README).
pub const SCANNER_REGEX: &str = r"\btbk_[0-9A-Za-z]{49}\b";

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// CRC32 (IEEE) of `s` in six base62 digits, most significant first.
fn checksum(s: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = u64::from(crc32fast::hash(s.as_bytes()));
    let mut out = [b'0'; CHECKSUM_LEN];
    for digit in out.iter_mut().rev() {
        *digit = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Whether `s` has one of the shapes the broker issues (current keys: with their checksum).
fn well_formed(s: &str) -> bool {
    let Some(body) = s.strip_prefix(PREFIX) else {
        return false;
    };
    match body.len() {
        // Current keys: base62 random part and checksum.
        n if n == RANDOM_LEN + CHECKSUM_LEN => {
            body.bytes().all(|b| b.is_ascii_alphanumeric())
                && checksum(&s[..PREFIX.len() + RANDOM_LEN]).as_slice()
                    == &body.as_bytes()[RANDOM_LEN..]
        }
        // Keys issued before the checksum: 32 random bytes in base64url.
        RANDOM_LEN => body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        _ => false,
    }
}

/// A syntactically valid API key.
pub struct ApiKey(SecretString);

impl ApiKey {
    /// Accepts only the exact shapes the broker issues (with a matching checksum), so junk
    /// and typos never reach the database.
    pub fn parse(s: &str) -> Option<Self> {
        well_formed(s).then(|| Self(SecretString::from(s.to_owned())))
    }

    /// SHA-256 of a presented key if it is well formed, without copying the key.
    pub fn digest_of(s: &str) -> Option<[u8; 32]> {
        well_formed(s).then(|| Sha256::digest(s.as_bytes()).into())
    }

    /// A new random key.
    pub fn generate() -> Self {
        let mut key = String::with_capacity(PREFIX.len() + RANDOM_LEN + CHECKSUM_LEN);
        key.push_str(PREFIX);
        Alphanumeric.append_string(&mut rand::thread_rng(), &mut key, RANDOM_LEN);
        let sum = checksum(&key);
        key.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
        Self(SecretString::from(key))
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
    fn generated_keys_parse_differ_and_match_the_scanner_shape() {
        let a = ApiKey::generate();
        let b = ApiKey::generate();
        assert!(ApiKey::parse(a.expose()).is_some());
        assert_ne!(a.expose(), b.expose());
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.hash().len(), 64);
        let k = a.expose();
        assert_eq!(k.len(), 4 + 49);
        assert!(k[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn checksum_is_crc32_in_base62() {
        // The six digits read back as base62 are the CRC32 of the input.
        let sum = checksum("tbk_abc");
        let mut n: u64 = 0;
        for d in sum {
            n = n * 62 + BASE62.iter().position(|&c| c == d).unwrap() as u64;
        }
        assert_eq!(n, u64::from(crc32fast::hash(b"tbk_abc")));
    }

    #[test]
    fn a_single_typo_is_refused_before_any_lookup() {
        let key = ApiKey::generate().expose().to_owned();
        for i in PREFIX.len()..key.len() {
            let mut typo = key.clone().into_bytes();
            typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(typo).unwrap();
            assert!(ApiKey::parse(&typo).is_none(), "typo at {i} accepted");
        }
    }

    #[test]
    fn keys_issued_before_the_checksum_still_parse() {
        let legacy = format!("tbk_{}", "aB3-_".repeat(8) + "xyz");
        assert_eq!(legacy.len(), 4 + 43);
        assert!(ApiKey::parse(&legacy).is_some());
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
            &format!("tbk_{}", "a".repeat(49)),
            &format!("tbk_{}-{}", "a".repeat(42), "a".repeat(6)),
        ] {
            assert!(ApiKey::parse(bad).is_none(), "{bad}");
        }
    }
}
