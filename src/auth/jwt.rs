//! JWT callers from the organisation's IdP: RS256, ES256 and PS256 only; `exp`, `iss` and
//! `aud` required, `nbf` honoured, 15 s leeway. `kid` is only ever a key into the in-memory key
//! map; `jku`/`x5u` are ignored. The JWKS is fetched at start, on a schedule, and on an unknown
//! `kid` (at most once a second, so garbage kids cannot make the broker hammer the IdP).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{AuthMethod, Caller};
use crate::tenants::store::Scope;
use crate::time::now_ms;

/// Algorithms a caller JWT may use. Never `none`, never HMAC.
pub const ALLOWED: [Algorithm; 3] = [Algorithm::RS256, Algorithm::ES256, Algorithm::PS256];
/// Clock leeway for `exp` and `nbf`.
pub const LEEWAY_S: u64 = 15;
/// Minimum spacing of JWKS fetches triggered by unknown key ids.
const REFETCH_SPACING: Duration = Duration::from_secs(1);
/// Scheduled JWKS refresh.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// Where caller JWTs come from.
#[derive(Clone, Debug)]
pub struct JwtSettings {
    pub jwks_url: String,
    pub issuer: String,
    pub audience: String,
}

struct Key {
    decoding: DecodingKey,
    algorithms: Vec<Algorithm>,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: i64,
    #[serde(default)]
    tenants: Option<Value>,
}

/// Verifies caller JWTs against the IdP's JWKS.
pub struct JwtVerifier {
    settings: JwtSettings,
    client: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, Arc<Key>>>>,
    fetch: tokio::sync::Mutex<Option<Instant>>,
    /// Verified tokens by SHA-256, so a caller's repeated token costs one hash, not a signature check.
    verified: Cache<[u8; 32], Arc<(Caller, i64)>>,
}

fn usable_key(jwk: &Jwk) -> Option<(String, Key)> {
    let kid = jwk.common.key_id.clone()?;
    let algorithms = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![Algorithm::RS256, Algorithm::PS256],
        AlgorithmParameters::EllipticCurve(ec)
            if ec.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
        {
            vec![Algorithm::ES256]
        }
        // Symmetric and other keys are never accepted.
        _ => return None,
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some((
        kid,
        Key {
            decoding,
            algorithms,
        },
    ))
}

/// Parses a JWKS document key by key, skipping keys the broker cannot or will not use.
fn parse_jwks(doc: &Value) -> HashMap<String, Arc<Key>> {
    doc.get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter_map(|jwk| usable_key(&jwk))
        .map(|(kid, key)| (kid, Arc::new(key)))
        .collect()
}

fn valid_name(sub: &str) -> bool {
    (1..=256).contains(&sub.len()) && !sub.chars().any(char::is_control)
}

fn scope_of(claim: Option<Value>) -> Scope {
    match claim {
        Some(Value::String(s)) if s == "*" => Scope::All,
        Some(Value::Array(items)) => Scope::Tenants(
            items
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => Scope::Tenants(Vec::new()),
    }
}

impl JwtVerifier {
    pub fn new(settings: JwtSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("the TLS backend initialises"),
            keys: RwLock::new(Arc::new(HashMap::new())),
            fetch: tokio::sync::Mutex::new(None),
            verified: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(60))
                .build(),
        })
    }

    /// Fetches the JWKS now, and then every `REFRESH_EVERY` for as long as the verifier lives.
    pub fn start(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(me) = weak.upgrade() else { return };
                me.refetch(false).await;
                drop(me);
                tokio::time::sleep(REFRESH_EVERY).await;
            }
        });
    }

    /// Fetches the JWKS; with `spaced`, waits out the minimum spacing since the last fetch.
    async fn refetch(&self, spaced: bool) {
        let mut last = self.fetch.lock().await;
        if spaced {
            if let Some(at) = *last {
                let since = at.elapsed();
                if since < REFETCH_SPACING {
                    tokio::time::sleep(REFETCH_SPACING - since).await;
                }
            }
        }
        *last = Some(Instant::now());
        match self.download().await {
            Ok(keys) => {
                tracing::debug!(keys = keys.len(), "caller JWKS loaded");
                *self.keys.write().expect("jwks") = Arc::new(keys);
            }
            Err(e) => {
                tracing::warn!(error = %e, "caller JWKS could not be fetched; keeping the keys held")
            }
        }
    }

    async fn download(&self) -> Result<HashMap<String, Arc<Key>>, String> {
        let mut resp = self
            .client
            .get(&self.settings.jwks_url)
            .send()
            .await
            .map_err(|e| e.without_url().to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| e.without_url().to_string())?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("JWKS larger than 256 KiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        let doc: Value =
            serde_json::from_slice(&body).map_err(|_| "JWKS is not JSON".to_owned())?;
        Ok(parse_jwks(&doc))
    }

    /// Loads keys from a JWKS document already in hand (tests, benchmarks).
    pub fn load_jwks(&self, doc: &Value) {
        *self.keys.write().expect("jwks") = Arc::new(parse_jwks(doc));
    }

    fn key(&self, kid: &str) -> Option<Arc<Key>> {
        self.keys.read().expect("jwks").get(kid).cloned()
    }

    /// The caller a JWT stands for, or why it is refused (a fixed reason, never token content).
    pub async fn verify(&self, token: &str) -> Result<Caller, &'static str> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(hit) = self.verified.get(&digest) {
            if now_ms() < hit.1 * 1000 + LEEWAY_S as i64 * 1000 {
                return Ok(hit.0.clone());
            }
            self.verified.invalidate(&digest);
        }
        let (caller, exp) = self.verify_signature(token).await?;
        self.verified
            .insert(digest, Arc::new((caller.clone(), exp)));
        Ok(caller)
    }

    /// The full check of a token (header, key, signature, claims), without the cache.
    pub async fn verify_signature(&self, token: &str) -> Result<(Caller, i64), &'static str> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| "malformed JWT")?;
        if !ALLOWED.contains(&header.alg) {
            return Err("JWT algorithm not allowed");
        }
        let kid = header.kid.as_deref().ok_or("JWT has no kid")?;
        if kid.len() > 256 {
            return Err("unknown JWT key");
        }
        let key = match self.key(kid) {
            Some(k) => k,
            None => {
                self.refetch(true).await;
                self.key(kid).ok_or("unknown JWT key")?
            }
        };
        if !key.algorithms.contains(&header.alg) {
            return Err("JWT algorithm does not match its key");
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = LEEWAY_S;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data =
            jsonwebtoken::decode::<Claims>(token, &key.decoding, &v).map_err(|_| "JWT rejected")?;
        let claims = data.claims;
        if !valid_name(&claims.sub) {
            return Err("JWT sub is not a usable caller name");
        }
        let caller = Caller {
            id: format!("jwt:{}", claims.sub).into(),
            name: claims.sub.into(),
            scope: Arc::new(scope_of(claims.tenants)),
            method: AuthMethod::Jwt,
        };
        Ok((caller, claims.exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn symmetric_and_unnamed_keys_are_skipped() {
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "RSA", "n": "sXch", "e": "AQAB"},
            {"kty": "whatever", "kid": "x"},
            {"kty": "RSA", "kid": "rsa", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"}
        ]});
        let keys = parse_jwks(&doc);
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys["rsa"].algorithms,
            vec![Algorithm::RS256, Algorithm::PS256]
        );
    }

    #[test]
    fn scope_claim() {
        assert_eq!(scope_of(Some(json!("*"))), Scope::All);
        assert_eq!(
            scope_of(Some(json!(["a", 1, "b"]))),
            Scope::Tenants(vec!["a".into(), "b".into()])
        );
        assert_eq!(scope_of(None), Scope::Tenants(vec![]));
        assert_eq!(scope_of(Some(json!("a"))), Scope::Tenants(vec![]));
    }
}
