//! JWTs from the organisation's IdP, for callers and (with their own audience) named admins:
//! RS256, ES256 and PS256 only; `exp`, `iss`, `aud` and `sub` required, `nbf` honoured, 15 s
//! leeway; a `crit` header is refused (the broker understands no extension). `kid` is only
//! ever a key into the in-memory key map; `jku`/`x5u`/`jwk` are ignored.
//!
//! The JWKS is fetched at start, on a schedule, and on an unknown `kid`: one fetch at a time,
//! at most one a second, shared by every request waiting for it (at most `MAX_WAITERS`; more
//! are refused at once), and a kid the fetched set still lacks is remembered as unknown for
//! `UNKNOWN_KID_TTL`. Junk kids therefore cost the IdP one request a second and a caller with
//! a freshly rotated key waits for one fetch, not behind every junk token.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Scope;
use super::{AuthMethod, Caller};
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
/// Requests that may wait for one JWKS fetch at the same time.
pub const MAX_WAITERS: usize = 64;
/// How long a kid the IdP's set lacks is refused without another fetch: long enough that
/// repeated junk costs nothing, short enough that a token signed with a key the IdP publishes
/// a moment later is accepted soon (keys already held are found before this is consulted).
pub const UNKNOWN_KID_TTL: Duration = Duration::from_secs(10);
/// The longest a request waits for a JWKS fetch.
const FETCH_WAIT: Duration = Duration::from_secs(6);

/// Why a JWT was refused: fixed reasons, never token content.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed JWT")]
    Malformed,
    #[error("JWT algorithm not allowed")]
    AlgorithmNotAllowed,
    #[error("JWT has no kid")]
    NoKid,
    #[error("unknown JWT key")]
    UnknownKey,
    #[error("JWT algorithm does not match its key")]
    AlgorithmMismatch,
    #[error("JWT rejected")]
    Rejected,
    #[error("JWT sub is not a usable name")]
    BadSub,
    #[error("JWT crit header names an extension the broker does not understand")]
    Crit,
}

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
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
}

/// A named admin from an IdP token.
#[derive(Clone, Debug)]
pub struct AdminClaims {
    pub sub: String,
    /// The values of the role claim (strings only).
    pub roles: Vec<String>,
}

#[derive(Default)]
struct FetchState {
    running: bool,
    last_at: Option<Instant>,
}

/// Verifies caller JWTs against the IdP's JWKS.
pub struct JwtVerifier {
    settings: JwtSettings,
    client: reqwest::Client,
    keys: RwLock<Arc<HashMap<String, Arc<Key>>>>,
    fetch: Mutex<FetchState>,
    /// Counts completed fetches; requests waiting for keys watch it.
    fetched: tokio::sync::watch::Sender<u64>,
    waiting: AtomicUsize,
    unknown_kids: Cache<String, ()>,
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
                .no_proxy()
                .build()
                .expect("the TLS backend initialises"),
            keys: RwLock::new(Arc::new(HashMap::new())),
            fetch: Mutex::new(FetchState::default()),
            fetched: tokio::sync::watch::channel(0).0,
            waiting: AtomicUsize::new(0),
            unknown_kids: Cache::builder()
                .max_capacity(10_000)
                .time_to_live(UNKNOWN_KID_TTL)
                .build(),
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
                me.schedule_fetch();
                drop(me);
                tokio::time::sleep(REFRESH_EVERY).await;
            }
        });
    }

    /// Starts a fetch unless one is running; it begins once `REFETCH_SPACING` has passed
    /// since the last one.
    fn schedule_fetch(self: &Arc<Self>) {
        let delay = {
            let mut st = self.fetch.lock().expect("jwks fetch state");
            if st.running {
                return;
            }
            st.running = true;
            st.last_at.map_or(Duration::ZERO, |at| {
                REFETCH_SPACING.saturating_sub(at.elapsed())
            })
        };
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = me.download().await;
            match result {
                Ok(keys) => {
                    tracing::debug!(keys = keys.len(), "caller JWKS loaded");
                    *me.keys.write().expect("jwks") = Arc::new(keys);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "caller JWKS could not be fetched; keeping the keys held")
                }
            }
            {
                let mut st = me.fetch.lock().expect("jwks fetch state");
                st.running = false;
                st.last_at = Some(Instant::now());
            }
            me.fetched.send_modify(|n| *n += 1);
        });
    }

    /// The key for a kid not held: waits for the next fetch, shared with every other request
    /// waiting for one; refused at once if the kid was recently missing or too many wait.
    async fn key_after_fetch(self: &Arc<Self>, kid: &str) -> Option<Arc<Key>> {
        if self.unknown_kids.contains_key(kid) {
            return None;
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= MAX_WAITERS {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let _waiting = Waiting(&self.waiting);
        let mut rx = self.fetched.subscribe();
        rx.borrow_and_update();
        self.schedule_fetch();
        let _ = tokio::time::timeout(FETCH_WAIT, rx.changed()).await;
        let key = self.key(kid);
        if key.is_none() {
            self.unknown_kids.insert(kid.to_owned(), ());
        }
        key
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
    pub async fn verify(self: &Arc<Self>, token: &str) -> Result<Caller, JwtError> {
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

    /// The full check of a caller token (header, key, signature, claims), without the cache.
    pub async fn verify_signature(
        self: &Arc<Self>,
        token: &str,
    ) -> Result<(Caller, i64), JwtError> {
        let mut claims = self.check(token, &self.settings.audience).await?;
        let caller = Caller {
            id: format!("jwt:{}", claims.sub).into(),
            name: claims.sub.into(),
            scope: Arc::new(scope_of(claims.rest.remove("tenants"))),
            method: AuthMethod::Jwt,
            key_expires_at_ms: None,
        };
        Ok((caller, claims.exp))
    }

    /// Checks an admin token: the same rules as for callers, with the admin audience; the
    /// roles are read from `role_claim` (a name or a dotted path; an array of strings or a
    /// space-separated string).
    pub async fn verify_admin(
        self: &Arc<Self>,
        token: &str,
        audience: &str,
        role_claim: &str,
    ) -> Result<AdminClaims, JwtError> {
        let claims = self.check(token, audience).await?;
        let mut at = claims.rest.get(role_claim.split('.').next().unwrap_or(""));
        for part in role_claim.split('.').skip(1) {
            at = at.and_then(|v| v.get(part));
        }
        Ok(AdminClaims {
            sub: claims.sub,
            roles: roles_in(at),
        })
    }

    /// Header, key, signature and registered claims of `token` for `audience`.
    async fn check(self: &Arc<Self>, token: &str, audience: &str) -> Result<Claims, JwtError> {
        refuse_crit(token)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        if !ALLOWED.contains(&header.alg) {
            return Err(JwtError::AlgorithmNotAllowed);
        }
        let kid = header.kid.as_deref().ok_or(JwtError::NoKid)?;
        if kid.len() > 256 {
            return Err(JwtError::UnknownKey);
        }
        let key = match self.key(kid) {
            Some(k) => k,
            None => self
                .key_after_fetch(kid)
                .await
                .ok_or(JwtError::UnknownKey)?,
        };
        if !key.algorithms.contains(&header.alg) {
            return Err(JwtError::AlgorithmMismatch);
        }
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = LEEWAY_S;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &v)
            .map_err(|_| JwtError::Rejected)?;
        if !valid_name(&data.claims.sub) {
            return Err(JwtError::BadSub);
        }
        Ok(data.claims)
    }
}

/// RFC 7515 §4.1.11: a header naming critical extensions the recipient does not understand
/// must be refused; the broker understands none.
fn refuse_crit(token: &str) -> Result<(), JwtError> {
    let head = token.split('.').next().unwrap_or("");
    if head.len() > 8 * 1024 {
        return Err(JwtError::Malformed);
    }
    let raw = B64URL.decode(head).map_err(|_| JwtError::Malformed)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)?;
    if header.contains_key("crit") {
        return Err(JwtError::Crit);
    }
    Ok(())
}

/// The roles a role claim holds: an array's string elements as they are (each must then equal
/// a role exactly), or a string split on ASCII spaces only (`"a\u00a0b"` is one role, not two:
/// Unicode whitespace must not make a role out of part of a value).
fn roles_in(claim: Option<&Value>) -> Vec<String> {
    match claim {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(s)) => s
            .split(' ')
            .filter(|r| !r.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn roles_split_on_ascii_space_only() {
        let roles = |v: Value| roles_in(Some(&v));
        assert_eq!(
            roles(json!("token-broker-admin  token-broker-auditor")),
            ["token-broker-admin", "token-broker-auditor"]
        );
        for smuggled in [
            "token-broker-admin\u{00a0}x",
            "x\u{2003}token-broker-admin",
            "token-broker-admin\tx",
            "token-broker-admin\nx",
        ] {
            assert!(
                !roles(json!(smuggled))
                    .iter()
                    .any(|r| r == "token-broker-admin"),
                "{smuggled:?}"
            );
        }
        assert_eq!(
            roles(json!(["token-broker-admin x", "token-broker-auditor"])),
            ["token-broker-admin x", "token-broker-auditor"]
        );
        assert!(roles(json!(42)).is_empty());
    }

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

    #[test]
    fn crit_headers_are_refused() {
        let enc = |h: Value| B64URL.encode(h.to_string());
        let with = format!(
            "{}.e30.sig",
            enc(json!({"alg": "RS256", "kid": "k", "crit": ["exp"], "exp": 1}))
        );
        assert!(refuse_crit(&with).is_err());
        let without = format!("{}.e30.sig", enc(json!({"alg": "RS256", "kid": "k"})));
        assert!(refuse_crit(&without).is_ok());
        assert!(refuse_crit("!!.e30.sig").is_err());
    }
}
