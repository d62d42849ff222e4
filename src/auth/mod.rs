//! Caller and admin identity: API keys, caller JWTs, the static admin token and named admins'
//! roles. Free of HTTP: `api::extract` turns requests into these identities.

pub mod admin_token;
pub mod api_keys;
pub mod callers;
pub mod jwt;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use moka::sync::Cache;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::StoreError;
use crate::time::now_ms;
use api_keys::ApiKey;
pub use callers::{CallerRecord, CallerStore, Scope};

/// Why a credential was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credential is missing, malformed, unknown or expired (the reason is fixed text,
    /// never credential content).
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The caller could not be looked up (and none was known from before).
    #[error(transparent)]
    Store(StoreError),
}

/// How a caller or an admin proved who it is (as the audit trail records it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    AdminToken,
}

impl AuthMethod {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::Jwt => "jwt",
            Self::AdminToken => "admin_token",
        }
    }

    /// The method a stored spelling names; `None` for one this build does not know.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::ApiKey, Self::Jwt, Self::AdminToken]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// An authenticated internal service.
#[derive(Clone, Debug)]
pub struct Caller {
    pub id: Arc<str>,
    pub name: Arc<str>,
    pub scope: Arc<Scope>,
    pub method: AuthMethod,
    /// For a rotated-out API key in its grace period: when it stops working (unix ms).
    pub key_expires_at_ms: Option<i64>,
}

impl Caller {
    pub fn may_fetch(&self, tenant: &str) -> bool {
        self.scope.allows(tenant)
    }
}

/// Where API keys are looked up: the caller table (`CallerStore`); unit tests put an
/// in-memory one here to test the cache's timing under a paused clock.
pub trait CallerLookup: Send + Sync {
    /// The caller whose current (or rotated-out, still in grace) key hashes to `hash`.
    fn caller_by_key_hash<'a>(
        &'a self,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<CallerRecord>, StoreError>>;
}

impl CallerLookup for CallerStore {
    fn caller_by_key_hash<'a>(
        &'a self,
        hash: &'a str,
    ) -> BoxFuture<'a, Result<Option<CallerRecord>, StoreError>> {
        Box::pin(CallerStore::caller_by_key_hash(self, hash))
    }
}

/// Resolves API keys to callers, with an in-process cache so the hot path does not touch the
/// database: an answer is trusted for 10 s (a deleted caller stops working here at once,
/// elsewhere within 10 s), and while the database is unreachable a known caller keeps
/// working on what was last read, for up to 10 minutes.
pub struct Authenticator {
    store: Arc<dyn CallerLookup>,
    known: Cache<[u8; 32], (Option<Arc<Caller>>, Instant), foldhash::fast::RandomState>,
    /// Unix ms before which a stale answer is served without asking the database (set after
    /// a failed lookup): one probe per `DB_PROBE_EVERY_MS` finds out when it is back.
    db_quiet_until: AtomicI64,
    database_up: Option<prometheus::IntGauge>,
}

/// While the database fails, how often one caller lookup is tried.
const DB_PROBE_EVERY_MS: i64 = 1_000;
/// A caller lookup that takes longer than this counts as failed (the stale answer is served).
const DB_LOOKUP_TIMEOUT: Duration = Duration::from_millis(500);

/// How long a resolved API key is trusted without asking the database again.
pub const CALLER_CACHE_TTL: Duration = Duration::from_secs(10);
/// How long a resolved key is kept to ride out a database outage.
const CALLER_STALE_TTL: Duration = Duration::from_secs(600);

impl Authenticator {
    pub fn new(
        store: impl CallerLookup + 'static,
        database_up: Option<prometheus::IntGauge>,
    ) -> Self {
        Self {
            store: Arc::new(store),
            known: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(CALLER_STALE_TTL)
                .build_with_hasher(Default::default()),
            db_quiet_until: AtomicI64::new(0),
            database_up,
        }
    }

    /// Whether this replica holds any resolved caller (it can serve them without the database).
    pub fn knows_callers(&self) -> bool {
        self.known.run_pending_tasks();
        self.known.iter().any(|(_, (c, _))| c.is_some())
    }

    /// True if this request should ask the database: it is not known to be failing, or this
    /// request won the next probe.
    fn may_ask_database(&self) -> bool {
        let now = now_ms();
        let until = self.db_quiet_until.load(Ordering::Acquire);
        now >= until
            && self
                .db_quiet_until
                .compare_exchange(
                    until,
                    now + DB_PROBE_EVERY_MS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Long because the lookup and its caches (a fresh answer, the last answer while the
    /// database fails, the negative cache) and the database gauge are in one place, so
    /// every outcome updates them.
    pub async fn api_key(&self, presented: &str) -> Result<Arc<Caller>, AuthError> {
        let digest =
            ApiKey::digest_of(presented).ok_or(AuthError::Unauthorized("invalid credentials"))?;
        let held = self.known.get(&digest);
        // A rotated-out key stops at the end of its grace period, cached or not.
        let held = held.filter(|(hit, _)| {
            hit.as_ref()
                .and_then(|c| c.key_expires_at_ms)
                .map_or(true, |until| now_ms() < until)
        });
        if let Some((hit, at)) = &held {
            if at.elapsed() < CALLER_CACHE_TTL {
                return hit
                    .clone()
                    .ok_or(AuthError::Unauthorized("invalid credentials"));
            }
        }
        let stale = match &held {
            Some((Some(caller), at)) if at.elapsed() < CALLER_STALE_TTL => Some(caller.clone()),
            _ => None,
        };
        if let Some(caller) = stale.as_ref().filter(|_| !self.may_ask_database()) {
            // The database is failing and another request is probing it: serve what we know.
            return Ok(caller.clone());
        }
        let lookup = tokio::time::timeout(
            DB_LOOKUP_TIMEOUT,
            self.store.caller_by_key_hash(&hex::encode(digest)),
        )
        .await
        .unwrap_or_else(|_| Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
        let looked_up = match lookup {
            Ok(found) => {
                if self.db_quiet_until.swap(0, Ordering::AcqRel) != 0 {
                    if let Some(g) = &self.database_up {
                        g.set(1);
                    }
                }
                found
            }
            Err(e) => {
                if matches!(e, StoreError::Unavailable(_)) {
                    self.db_quiet_until
                        .store(now_ms() + DB_PROBE_EVERY_MS, Ordering::Release);
                    if let Some(g) = &self.database_up {
                        g.set(0);
                    }
                }
                return match stale {
                    Some(caller) => {
                        tracing::debug!(error = %e, "caller lookup failed; using the last answer");
                        Ok(caller)
                    }
                    None => Err(AuthError::Store(e)),
                };
            }
        };
        let found = looked_up.map(|c| {
            Arc::new(Caller {
                id: c.id.into(),
                name: c.name.into(),
                scope: Arc::new(c.scope),
                method: AuthMethod::ApiKey,
                key_expires_at_ms: c.key_expires_at_ms,
            })
        });
        self.known.insert(digest, (found.clone(), Instant::now()));
        found.ok_or(AuthError::Unauthorized("invalid credentials"))
    }

    /// Forgets every cached key (after a caller is deleted).
    pub fn forget_all(&self) {
        self.known.invalidate_all();
    }
}

/// A static bearer token (the admin token, the metrics token), kept as its SHA-256 and
/// compared in constant time.
pub struct StaticToken(Option<[u8; 32]>);

impl StaticToken {
    pub fn new(token: Option<&SecretString>) -> Self {
        Self(token.map(|t| Sha256::digest(t.expose_secret().as_bytes()).into()))
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    pub fn verify(&self, presented: &str) -> bool {
        match &self.0 {
            Some(expected) => {
                let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
                bool::from(got.ct_eq(expected))
            }
            None => false,
        }
    }
}

/// Role values in the admin role claim.
pub const ADMIN_ROLE: &str = "token-broker-admin";
pub const AUDITOR_ROLE: &str = "token-broker-auditor";

/// What an admin may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminRole {
    /// Everything.
    Admin,
    /// Read tenants, callers and the audit trail; change nothing.
    Auditor,
}

impl AdminRole {
    /// The role an admin JWT's `roles` grant: admin over auditor; `None` for neither.
    pub fn from_roles(roles: &[String]) -> Option<Self> {
        if roles.iter().any(|r| r == ADMIN_ROLE) {
            Some(Self::Admin)
        } else if roles.iter().any(|r| r == AUDITOR_ROLE) {
            Some(Self::Auditor)
        } else {
            None
        }
    }
}

/// An authenticated admin: the static token (`admin-token`, for bootstrap and break-glass)
/// or a named person from the IdP. Handlers take it as an argument; auditors get past the
/// extractor only on reads (GET, HEAD).
#[derive(Clone, Debug)]
pub struct Admin {
    /// Recorded in the audit trail: `admin-token`, or the JWT's `sub`.
    pub name: Arc<str>,
    /// `AdminToken` or `Jwt`.
    pub method: AuthMethod,
    pub role: AdminRole,
}

impl Admin {
    pub fn static_token() -> Self {
        Self {
            name: "admin-token".into(),
            method: AuthMethod::AdminToken,
            role: AdminRole::Admin,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU32};
    use std::sync::Mutex;

    use tokio::time::sleep;

    use super::*;

    /// The caller table, in memory: one caller, and a switch that makes it unreachable.
    #[derive(Default)]
    struct Table {
        caller: Mutex<Option<CallerRecord>>,
        down: AtomicBool,
        lookups: AtomicU32,
    }

    impl CallerLookup for Arc<Table> {
        fn caller_by_key_hash<'a>(
            &'a self,
            _hash: &'a str,
        ) -> BoxFuture<'a, Result<Option<CallerRecord>, StoreError>> {
            self.lookups.fetch_add(1, Ordering::SeqCst);
            let result = if self.down.load(Ordering::SeqCst) {
                Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
            } else {
                Ok(self.caller.lock().unwrap().clone())
            };
            Box::pin(async move { result })
        }
    }

    fn setup() -> (Arc<Table>, Authenticator, String, prometheus::IntGauge) {
        let table = Arc::new(Table::default());
        *table.caller.lock().unwrap() = Some(CallerRecord {
            id: "c1".into(),
            name: "billing".into(),
            scope: Scope::All,
            created_at_ms: 0,
            key_expires_at_ms: None,
        });
        let up = prometheus::IntGauge::new("up", "up").unwrap();
        let auth = Authenticator::new(table.clone(), Some(up.clone()));
        (table, auth, ApiKey::generate().expose().to_owned(), up)
    }

    fn lookups(t: &Table) -> u32 {
        t.lookups.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_caller_rides_out_a_database_outage_for_ten_minutes() {
        let (table, auth, key, up) = setup();
        assert_eq!(&*auth.api_key(&key).await.unwrap().name, "billing");
        sleep(Duration::from_secs(5)).await;
        auth.api_key(&key).await.unwrap();
        assert_eq!(lookups(&table), 1, "trusted for 10 s");
        table.down.store(true, Ordering::SeqCst);
        sleep(Duration::from_secs(6)).await;
        assert_eq!(&*auth.api_key(&key).await.unwrap().name, "billing");
        assert_eq!((lookups(&table), up.get()), (2, 0), "asked, failed, served");
        for _ in 0..10 {
            auth.api_key(&key).await.unwrap();
        }
        assert_eq!(lookups(&table), 2, "one probe a second while it fails");
        sleep(Duration::from_millis(1_000)).await;
        auth.api_key(&key).await.unwrap();
        assert_eq!(lookups(&table), 3);
        // Ten minutes after the last read the stale answer is no longer trusted.
        sleep(CALLER_STALE_TTL - Duration::from_secs(13)).await;
        auth.api_key(&key).await.unwrap();
        sleep(Duration::from_secs(2)).await;
        assert!(matches!(auth.api_key(&key).await, Err(AuthError::Store(_))));
        table.down.store(false, Ordering::SeqCst);
        sleep(Duration::from_secs(1)).await;
        auth.api_key(&key).await.unwrap();
        assert_eq!(up.get(), 1, "the database is back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_caller_stops_working_within_the_cache_ttl() {
        let (table, auth, key, _) = setup();
        auth.api_key(&key).await.unwrap();
        *table.caller.lock().unwrap() = None;
        sleep(CALLER_CACHE_TTL - Duration::from_millis(100)).await;
        auth.api_key(&key).await.unwrap();
        sleep(Duration::from_millis(100)).await;
        assert!(matches!(
            auth.api_key(&key).await,
            Err(AuthError::Unauthorized(_))
        ));
        // An unknown key is remembered as unknown too: no lookup per request.
        let n = lookups(&table);
        for _ in 0..5 {
            assert!(auth.api_key(&key).await.is_err());
        }
        assert_eq!(lookups(&table), n);
    }
}
