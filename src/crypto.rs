//! AES-256-GCM sealing of secrets at rest with a key ring: the key id travels inside every
//! ciphertext and the AAD binds the tenant and the field, so a ciphertext moved elsewhere fails.

use std::collections::HashMap;
use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rand::RngCore;
use zeroize::Zeroizing;

const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 12;
/// Key id used for a ring built from a single key (`BROKER_ENCRYPTION_KEY` or the key file).
pub const DEFAULT_KEY_ID: &str = "default";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("ciphertext is malformed")]
    Malformed,
    #[error("ciphertext was sealed with key `{0}`, which is not in the key ring")]
    UnknownKey(String),
    #[error("ciphertext does not open (tampered, or bound to another tenant or field)")]
    Tampered,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key `{id}` is not valid base64")]
    NotBase64 { id: String },
    #[error("key `{id}` is {len} bytes; AES-256 keys are exactly 32 bytes")]
    WrongLength { id: String, len: usize },
    #[error("key id `{0}` is invalid: use 1-32 characters of [A-Za-z0-9_-]")]
    BadId(String),
    #[error("key id `{0}` appears twice")]
    DuplicateId(String),
    #[error("entry {0} (counting from 1) is not of the form id:base64key")]
    BadEntry(usize),
    #[error("the key ring is empty")]
    Empty,
}

/// The keys this process can open with; the first (active) one seals.
#[derive(Clone)]
pub struct KeyRing {
    active: String,
    keys: HashMap<String, Aes256Gcm>,
    /// Per key: a subkey for audit fingerprints, derived so the key itself never leaves here.
    audit_keys: HashMap<String, [u8; 32]>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<_> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("ids", &ids)
            .finish()
    }
}

fn valid_id(id: &str) -> bool {
    (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn derive_audit_key(raw: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(raw).expect("any key length");
    mac.update(b"token-broker/v1 audit fingerprint");
    mac.finalize().into_bytes().into()
}

fn decode_key(id: &str, b64: &str) -> Result<(Aes256Gcm, [u8; 32]), KeyError> {
    let bytes = Zeroizing::new(
        B64.decode(b64.trim())
            .map_err(|_| KeyError::NotBase64 { id: id.to_owned() })?,
    );
    if bytes.len() != 32 {
        return Err(KeyError::WrongLength {
            id: id.to_owned(),
            len: bytes.len(),
        });
    }
    Ok((
        Aes256Gcm::new_from_slice(&bytes).expect("length checked"),
        derive_audit_key(&bytes),
    ))
}

impl KeyRing {
    /// A ring holding one key (base64 of 32 bytes) under [`DEFAULT_KEY_ID`].
    pub fn single(b64: &str) -> Result<Self, KeyError> {
        let (cipher, audit) = decode_key(DEFAULT_KEY_ID, b64)?;
        Ok(Self {
            active: DEFAULT_KEY_ID.to_owned(),
            keys: HashMap::from([(DEFAULT_KEY_ID.to_owned(), cipher)]),
            audit_keys: HashMap::from([(DEFAULT_KEY_ID.to_owned(), audit)]),
        })
    }

    /// Parses `id1:base64,id0:base64`; the first entry seals, all of them open.
    pub fn parse_list(list: &str) -> Result<Self, KeyError> {
        let mut active = None;
        let mut keys = HashMap::new();
        let mut audit_keys = HashMap::new();
        for (n, entry) in list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .enumerate()
        {
            let (id, b64) = entry.split_once(':').ok_or(KeyError::BadEntry(n + 1))?;
            let id = id.trim();
            if !valid_id(id) {
                return Err(KeyError::BadId(id.to_owned()));
            }
            let (cipher, audit) = decode_key(id, b64)?;
            if keys.insert(id.to_owned(), cipher).is_some() {
                return Err(KeyError::DuplicateId(id.to_owned()));
            }
            audit_keys.insert(id.to_owned(), audit);
            active.get_or_insert_with(|| id.to_owned());
        }
        Ok(Self {
            active: active.ok_or(KeyError::Empty)?,
            keys,
            audit_keys,
        })
    }

    /// A fresh random 32-byte key, base64-encoded.
    pub fn generate_key_b64() -> String {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::thread_rng().fill_bytes(key.as_mut());
        B64.encode(key.as_ref())
    }

    pub fn active_id(&self) -> &str {
        &self.active
    }

    /// A short keyed fingerprint of a token (`<key id>:<hex of 16 bytes of HMAC-SHA256>`):
    /// stable for one key, useless to anyone without it.
    pub fn fingerprint(&self, token: &str) -> String {
        use hmac::Mac;
        let key = &self.audit_keys[&self.active];
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key length");
        mac.update(token.as_bytes());
        let tag = mac.finalize().into_bytes();
        format!("{}:{}", self.active, hex::encode(&tag[..16]))
    }

    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }

    /// Seals `plaintext` for `tenant`'s `field` under the active key.
    pub fn seal(&self, tenant: &str, field: &str, plaintext: &[u8]) -> Vec<u8> {
        let cipher = &self.keys[&self.active];
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let aad = aad(tenant, field);
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let id = self.active.as_bytes();
        let mut out = Vec::with_capacity(2 + id.len() + NONCE_LEN + ct.len());
        out.push(FORMAT_V1);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a ciphertext sealed for `tenant`'s `field`.
    pub fn open(
        &self,
        tenant: &str,
        field: &str,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let (id, nonce, ct) = split(sealed)?;
        let cipher = self
            .keys
            .get(id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_owned()))?;
        let aad = aad(tenant, field);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Tampered)
    }
}

/// The id of the key a ciphertext was sealed with.
/// `N` random bytes from the thread's CSPRNG as lowercase hex: request ids, lock values,
/// caller and replica ids.
pub fn random_hex<const N: usize>() -> String {
    let mut raw = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    // Into one buffer: `hex::encode` collects char by char (2 % of a token fetch, for the
    // request id).
    let mut text = vec![0u8; 2 * N];
    hex::encode_to_slice(raw, &mut text).expect("twice the length");
    String::from_utf8(text).expect("hex is ASCII")
}

#[cfg(test)]
fn key_id_of(sealed: &[u8]) -> Result<&str, CryptoError> {
    split(sealed).map(|(id, _, _)| id)
}

fn split(sealed: &[u8]) -> Result<(&str, &[u8], &[u8]), CryptoError> {
    let (&version, rest) = sealed.split_first().ok_or(CryptoError::Malformed)?;
    let (&id_len, rest) = rest.split_first().ok_or(CryptoError::Malformed)?;
    if version != FORMAT_V1 || rest.len() < id_len as usize + NONCE_LEN + 16 {
        return Err(CryptoError::Malformed);
    }
    let (id, rest) = rest.split_at(id_len as usize);
    let (nonce, ct) = rest.split_at(NONCE_LEN);
    let id = std::str::from_utf8(id).map_err(|_| CryptoError::Malformed)?;
    Ok((id, nonce, ct))
}

fn aad(tenant: &str, field: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(20 + tenant.len() + field.len());
    aad.extend_from_slice(b"token-broker/v1\0");
    aad.extend_from_slice(tenant.as_bytes());
    aad.push(0);
    aad.extend_from_slice(field.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        KeyRing::single(&KeyRing::generate_key_b64()).unwrap()
    }

    #[test]
    fn round_trip() {
        let r = ring();
        let ct = r.seal("acme", "client_secret", b"s3cret");
        assert_eq!(
            &r.open("acme", "client_secret", &ct).unwrap()[..],
            b"s3cret"
        );
        assert_eq!(key_id_of(&ct).unwrap(), DEFAULT_KEY_ID);
        assert!(!ct.windows(6).any(|w| w == b"s3cret"));
    }

    #[test]
    fn bound_to_tenant_and_field() {
        let r = ring();
        let ct = r.seal("acme", "client_secret", b"s3cret");
        assert_eq!(
            r.open("other", "client_secret", &ct),
            Err(CryptoError::Tampered)
        );
        assert_eq!(r.open("acme", "client_id", &ct), Err(CryptoError::Tampered));
    }

    #[test]
    fn flipped_byte_fails() {
        let r = ring();
        let ct = r.seal("acme", "f", b"value");
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            assert!(r.open("acme", "f", &bad).is_err(), "byte {i}");
        }
    }

    #[test]
    fn rotation_ring_opens_old_and_seals_new() {
        let old = KeyRing::generate_key_b64();
        let new = KeyRing::generate_key_b64();
        let r0 = KeyRing::parse_list(&format!("k0:{old}")).unwrap();
        let ct0 = r0.seal("t", "f", b"v");
        let r1 = KeyRing::parse_list(&format!("k1:{new}, k0:{old}")).unwrap();
        assert_eq!(r1.active_id(), "k1");
        assert_eq!(&r1.open("t", "f", &ct0).unwrap()[..], b"v");
        assert_eq!(key_id_of(&r1.seal("t", "f", b"v")).unwrap(), "k1");
        let only_new = KeyRing::parse_list(&format!("k1:{new}")).unwrap();
        assert_eq!(
            only_new.open("t", "f", &ct0),
            Err(CryptoError::UnknownKey("k0".into()))
        );
    }

    #[test]
    fn rejects_bad_keys() {
        assert!(matches!(
            KeyRing::single(&B64.encode([0u8; 16])),
            Err(KeyError::WrongLength { len: 16, .. })
        ));
        assert!(matches!(
            KeyRing::single("not base64!"),
            Err(KeyError::NotBase64 { .. })
        ));
        let k = KeyRing::generate_key_b64();
        assert!(matches!(
            KeyRing::parse_list(&format!("a:{k},a:{k}")),
            Err(KeyError::DuplicateId(_))
        ));
        assert!(matches!(
            KeyRing::parse_list(&format!("bad id:{k}")),
            Err(KeyError::BadId(_))
        ));
        assert_eq!(KeyRing::parse_list(" , ").unwrap_err(), KeyError::Empty);
        assert!(matches!(
            KeyRing::parse_list("nocolon"),
            Err(KeyError::BadEntry(_))
        ));
    }

    #[test]
    fn debug_hides_keys() {
        let k = KeyRing::generate_key_b64();
        let dbg = format!("{:?}", KeyRing::single(&k).unwrap());
        assert!(!dbg.contains(&k));
    }
}
