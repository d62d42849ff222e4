//! Proof of possession at partners (below `tenants` and `issuers`, which both use it): the
//! signed client assertions of RFC 7523 (`private_key_jwt`, `client_secret_jwt`, the JWT
//! bearer grant) and DPoP proofs (RFC 9449), the tenant keys they are signed with, and those
//! keys' public halves as JWKs (RFC 7517) with RFC 7638 thumbprints.
//!
//! A `SigningKey` holds `ring`'s parsed key pair and signs compact JWS itself: jsonwebtoken
//! (which signs with `ring` too) parses the private key again for every signature, which made
//! a DPoP proof per proxied call cost two P-256 scalar multiplications instead of one
//! (bench/run.sh, case (g) with a DPoP tenant). HS256 assertions stay jsonwebtoken's. Errors
//! name a problem, never key material.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaEncoding, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
    RSA_PKCS1_SHA256, RSA_PSS_SHA256,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Longest life of a client assertion or a DPoP proof the broker signs.
pub const ASSERTION_LIFETIME_S: i64 = 60;

/// The signature algorithm asked for with an RSA key (`issuer.assertion_alg`); a P-256 key
/// always signs ES256.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum AssertionAlg {
    RS256,
    PS256,
    ES256,
}

/// Why a key cannot be used (never the key itself).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("not a PEM private key (PKCS#8 `PRIVATE KEY`, or `RSA PRIVATE KEY`)")]
    NotPem,
    #[error("not an RSA (2048 bits or more) or EC P-256 private key")]
    Unsupported,
    #[error("an EC P-256 key signs ES256 only")]
    EcKeyAlg,
    #[error("an RSA key signs RS256 or PS256")]
    RsaKeyAlg,
    #[error("the key could not sign")]
    Sign,
}

/// The parsed key pair, kept for the key's life.
enum Signer {
    Ec(EcdsaKeyPair),
    Rsa(RsaKeyPair, &'static dyn RsaEncoding),
}

/// A tenant's private key, ready to sign, with its public JWK.
pub struct SigningKey {
    alg: AssertionAlg,
    signer: Signer,
    rng: ring::rand::SystemRandom,
    /// The public half as a JWK (`kty` and its members only), without `kid`/`alg`/`use`.
    public: Value,
    /// `key_id` when given, else the RFC 7638 thumbprint.
    pub kid: String,
    /// The RFC 7638 thumbprint of the public key (DPoP's `jkt`).
    jkt: String,
    /// The encoded JWS headers, made once: `{alg, typ: JWT, kid}` and DPoP's
    /// `{typ: dpop+jwt, alg, jwk}`.
    jwt_header: String,
    dpop_header: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A DPoP proof's claims (RFC 9449 §4.2), serialised without a `Value` in between.
#[derive(Serialize)]
struct ProofClaims<'a> {
    jti: &'a str,
    htm: &'a str,
    htu: &'a str,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ath: Option<&'a str>,
}

impl SigningKey {
    /// Reads a PEM private key: RSA (PKCS#8 or PKCS#1; RS256 unless `alg` says PS256) or EC
    /// P-256 (PKCS#8; ES256). `kid` defaults to the JWK thumbprint.
    pub fn from_pem(
        pem_text: &str,
        alg: Option<AssertionAlg>,
        kid: Option<&str>,
    ) -> Result<Self, KeyError> {
        let block = pem::parse(pem_text.trim()).map_err(|_| KeyError::NotPem)?;
        let der = Zeroizing::new(block.contents().to_vec());
        let rng = ring::rand::SystemRandom::new();
        let (alg, signer, public) = match block.tag() {
            "PRIVATE KEY" => {
                match EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der, &rng) {
                    Ok(ec) => {
                        if !matches!(alg, None | Some(AssertionAlg::ES256)) {
                            return Err(KeyError::EcKeyAlg);
                        }
                        let point = ec.public_key().as_ref();
                        let public = json!({
                            "crv": "P-256",
                            "kty": "EC",
                            "x": B64URL.encode(&point[1..33]),
                            "y": B64URL.encode(&point[33..65]),
                        });
                        (AssertionAlg::ES256, Signer::Ec(ec), public)
                    }
                    Err(_) => {
                        let rsa =
                            RsaKeyPair::from_pkcs8(&der).map_err(|_| KeyError::Unsupported)?;
                        rsa_signer(rsa, alg)?
                    }
                }
            }
            "RSA PRIVATE KEY" => rsa_signer(
                RsaKeyPair::from_der(&der).map_err(|_| KeyError::Unsupported)?,
                alg,
            )?,
            _ => return Err(KeyError::NotPem),
        };
        let jkt = thumbprint(&public);
        let kid = kid.map_or_else(|| jkt.clone(), str::to_owned);
        let alg_name = match alg {
            AssertionAlg::ES256 => "ES256",
            AssertionAlg::PS256 => "PS256",
            AssertionAlg::RS256 => "RS256",
        };
        let encode = |v: Value| B64URL.encode(v.to_string());
        let me = Self {
            jwt_header: encode(json!({"alg": alg_name, "typ": "JWT", "kid": kid})),
            dpop_header: encode(json!({"typ": "dpop+jwt", "alg": alg_name, "jwk": public})),
            alg,
            signer,
            rng,
            public,
            kid,
            jkt,
        };
        // A key that cannot sign is refused now, not at the first mint.
        me.sign(&me.jwt_header, b"{}")?;
        Ok(me)
    }

    /// A fresh EC P-256 key as PKCS#8 PEM (the broker's own DPoP key for a tenant).
    pub fn generate_p256_pem() -> Zeroizing<String> {
        let rng = ring::rand::SystemRandom::new();
        let der = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("the system random source works");
        Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref())))
    }

    pub fn alg_name(&self) -> &'static str {
        match self.alg {
            AssertionAlg::ES256 => "ES256",
            AssertionAlg::PS256 => "PS256",
            AssertionAlg::RS256 => "RS256",
        }
    }

    /// The public JWK as published: `kid`, `alg` and `use` added.
    pub fn public_jwk(&self, use_: &str) -> Value {
        let mut jwk = self.public.clone();
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.alg_name());
        jwk["use"] = json!(use_);
        jwk
    }

    /// The RFC 7638 thumbprint of the public key (DPoP's `jkt`).
    pub fn thumbprint(&self) -> &str {
        &self.jkt
    }

    /// A compact JWS (RFC 7515 §7.1) of `payload` under the encoded `header`.
    fn sign(&self, header: &str, payload: &[u8]) -> Result<String, KeyError> {
        let mut jws = String::with_capacity(header.len() + payload.len() * 4 / 3 + 360);
        jws.push_str(header);
        jws.push('.');
        B64URL.encode_string(payload, &mut jws);
        let signature = match &self.signer {
            Signer::Ec(kp) => kp
                .sign(&self.rng, jws.as_bytes())
                .map_err(|_| KeyError::Sign)?
                .as_ref()
                .to_vec(),
            Signer::Rsa(kp, padding) => {
                let mut sig = vec![0; kp.public().modulus_len()];
                kp.sign(*padding, &self.rng, jws.as_bytes(), &mut sig)
                    .map_err(|_| KeyError::Sign)?;
                sig
            }
        };
        jws.push('.');
        B64URL.encode_string(signature, &mut jws);
        Ok(jws)
    }

    /// An RFC 7523 client assertion (`private_key_jwt`, OIDC Core §9): `iss` = `sub` =
    /// `client_id`, `aud`, a unique `jti`, `iat`, `exp` 60 s later.
    pub fn client_assertion(&self, client_id: &str, aud: &str) -> Result<String, KeyError> {
        self.grant_assertion(&assertion_claims(client_id, client_id, aud, None, None))
    }

    /// A signed assertion with these claims (the JWT bearer grant's, RFC 7523 §2.1).
    pub fn grant_assertion(&self, claims: &Value) -> Result<String, KeyError> {
        self.sign(&self.jwt_header, claims.to_string().as_bytes())
    }

    /// A DPoP proof (RFC 9449 §4.2): `typ` `dpop+jwt`, the public `jwk` in the header, `jti`,
    /// `htm`, `htu`, `iat`, and `nonce` and `ath` (the access token's hash, `ath_of`) when
    /// given.
    pub fn dpop_proof(
        &self,
        htm: &str,
        htu: &str,
        nonce: Option<&str>,
        ath: Option<&str>,
    ) -> Result<String, KeyError> {
        let claims = ProofClaims {
            jti: &jti(),
            htm,
            htu,
            iat: crate::time::now_ms() / 1000,
            nonce,
            ath,
        };
        let payload = serde_json::to_vec(&claims).map_err(|_| KeyError::Sign)?;
        self.sign(&self.dpop_header, &payload)
    }
}

/// A DPoP nonce as RFC 9449 §8.1 allows it (`1*NQCHAR`: printable ASCII but `"` and `\`),
/// at most 512 bytes: what the broker takes from a partner and from a caller.
pub fn is_nonce(s: &str) -> bool {
    (1..=512).contains(&s.len())
        && s.bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\')
}

/// A DPoP proof's `ath`: base64url of the access token's SHA-256 (RFC 9449 §4.2).
pub fn ath_of(access_token: &str) -> String {
    B64URL.encode(Sha256::digest(access_token.as_bytes()))
}

fn rsa_signer(
    rsa: RsaKeyPair,
    alg: Option<AssertionAlg>,
) -> Result<(AssertionAlg, Signer, Value), KeyError> {
    let (alg, padding): (AssertionAlg, &'static dyn RsaEncoding) = match alg {
        None | Some(AssertionAlg::RS256) => (AssertionAlg::RS256, &RSA_PKCS1_SHA256),
        Some(AssertionAlg::PS256) => (AssertionAlg::PS256, &RSA_PSS_SHA256),
        Some(AssertionAlg::ES256) => return Err(KeyError::RsaKeyAlg),
    };
    let c = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(rsa.public());
    let public = json!({"e": B64URL.encode(&c.e), "kty": "RSA", "n": B64URL.encode(&c.n)});
    Ok((alg, Signer::Rsa(rsa, padding), public))
}

/// `client_secret_jwt` (RFC 7523, OIDC Core §9): the same claims, HS256 with the secret.
pub fn secret_assertion(client_id: &str, secret: &str, aud: &str) -> Result<String, KeyError> {
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("JWT".into());
    jsonwebtoken::encode(
        &header,
        &assertion_claims(client_id, client_id, aud, None, None),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|_| KeyError::Sign)
}

/// Claims of an assertion: `iss`, `sub`, `aud`, `jti`, `iat`, `exp` (≤ 60 s, or `lifetime_s`),
/// and `scope` when given.
pub fn assertion_claims(
    iss: &str,
    sub: &str,
    aud: &str,
    scope: Option<&str>,
    lifetime_s: Option<i64>,
) -> Value {
    let now = crate::time::now_ms() / 1000;
    let mut claims = json!({
        "iss": iss,
        "sub": sub,
        "aud": aud,
        "jti": jti(),
        "iat": now,
        "exp": now + lifetime_s.unwrap_or(ASSERTION_LIFETIME_S),
    });
    if let Some(s) = scope {
        claims["scope"] = json!(s);
    }
    claims
}

/// 128 random bits, URL-safe: unique per assertion and proof.
fn jti() -> String {
    B64URL.encode(rand::random::<[u8; 16]>())
}

/// The RFC 7638 thumbprint: SHA-256 over the required members in lexicographic order.
fn thumbprint(public: &Value) -> String {
    let canonical = match public["kty"].as_str() {
        Some("EC") => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            public["crv"].as_str().unwrap_or(""),
            public["x"].as_str().unwrap_or(""),
            public["y"].as_str().unwrap_or("")
        ),
        _ => format!(
            r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#,
            public["e"].as_str().unwrap_or(""),
            public["n"].as_str().unwrap_or("")
        ),
    };
    B64URL.encode(Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};

    fn ec_key() -> SigningKey {
        SigningKey::from_pem(&SigningKey::generate_p256_pem(), None, None).unwrap()
    }

    #[test]
    fn a_generated_p256_key_signs_dpop_proofs_that_verify_with_the_header_jwk() {
        let key = ec_key();
        let proof = key
            .dpop_proof(
                "POST",
                "https://as.example/token",
                Some("n-1"),
                Some(&ath_of("tok")),
            )
            .unwrap();
        let header = decode_header(&proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        assert_eq!(header.alg, Algorithm::ES256);
        let jwk = header.jwk.expect("jwk in the header");
        let mut v = Validation::new(Algorithm::ES256);
        v.required_spec_claims.clear();
        v.validate_exp = false;
        let claims = decode::<Value>(&proof, &DecodingKey::from_jwk(&jwk).unwrap(), &v)
            .unwrap()
            .claims;
        assert_eq!(claims["htm"], "POST");
        assert_eq!(claims["htu"], "https://as.example/token");
        assert_eq!(claims["nonce"], "n-1");
        // ath = base64url(SHA-256("tok"))
        assert_eq!(claims["ath"], B64URL.encode(Sha256::digest(b"tok")));
        // No private member ever reaches the header.
        let header_json =
            String::from_utf8(B64URL.decode(proof.split('.').next().unwrap()).unwrap()).unwrap();
        assert!(!header_json.contains("\"d\""), "{header_json}");
        assert_eq!(key.thumbprint().len(), 43);
    }

    #[test]
    fn rfc_7638_thumbprint_of_its_example_key() {
        // RFC 7638 §3.1.
        let jwk = json!({"kty": "RSA", "e": "AQAB", "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn client_assertions_carry_the_rfc_7523_claims() {
        let key = ec_key();
        let jwt = key
            .client_assertion("client-1", "https://as.example/token")
            .unwrap();
        let header = decode_header(&jwt).unwrap();
        assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
        let parts: Vec<&str> = jwt.split('.').collect();
        let claims: Value = serde_json::from_slice(&B64URL.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://as.example/token");
        let (iat, exp) = (
            claims["iat"].as_i64().unwrap(),
            claims["exp"].as_i64().unwrap(),
        );
        assert!(exp > iat && exp - iat <= 60);
        let other = key
            .client_assertion("client-1", "https://as.example/token")
            .unwrap();
        let jti = |j: &str| -> Value {
            serde_json::from_slice::<Value>(&B64URL.decode(j.split('.').nth(1).unwrap()).unwrap())
                .unwrap()["jti"]
                .clone()
        };
        assert_ne!(jti(&jwt), jti(&other), "a unique jti per assertion");
        let hs = secret_assertion("client-1", "s3cret", "https://as.example/token").unwrap();
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&["https://as.example/token"]);
        decode::<Value>(&hs, &DecodingKey::from_secret(b"s3cret"), &v).unwrap();
    }

    #[test]
    fn rsa_keys_in_pkcs8_and_pkcs1_sign_rs256_and_ps256() {
        let pkcs8 = include_str!("../tests/fixtures/rsa1.pem");
        let pkcs1 = include_str!("../tests/fixtures/rsa1-pkcs1.pem");
        let a = SigningKey::from_pem(pkcs8, None, Some("k1")).unwrap();
        let b = SigningKey::from_pem(pkcs1, Some(AssertionAlg::PS256), None).unwrap();
        assert_eq!((a.alg_name(), a.kid.as_str()), ("RS256", "k1"));
        assert_eq!(b.alg_name(), "PS256");
        assert_eq!(a.thumbprint(), b.thumbprint(), "one key, two encodings");
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(a.public_jwk("sig")).unwrap();
        for key in [&a, &b] {
            let jwt = key.client_assertion("c", "https://as.example/t").unwrap();
            let alg = if key.alg_name() == "PS256" {
                Algorithm::PS256
            } else {
                Algorithm::RS256
            };
            let mut v = Validation::new(alg);
            v.set_audience(&["https://as.example/t"]);
            decode::<Value>(&jwt, &DecodingKey::from_jwk(&jwk).unwrap(), &v).unwrap();
        }
    }

    #[test]
    fn keys_that_cannot_sign_are_refused_without_echoing_them() {
        for bad in [
            "",
            "not a key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
        ] {
            let e = SigningKey::from_pem(bad, None, None).unwrap_err();
            assert!(!e.to_string().contains("AAAA"));
        }
        let pem = SigningKey::generate_p256_pem();
        assert_eq!(
            SigningKey::from_pem(&pem, Some(AssertionAlg::RS256), None).unwrap_err(),
            KeyError::EcKeyAlg
        );
        assert!(format!("{:?}", ec_key()).contains("kid"));
        assert!(!format!("{:?}", ec_key()).contains("PRIVATE"));
    }
}
