//! In-memory stand-ins for what the broker talks to, for its unit tests under a paused clock:
//! a shared cache with Redis's semantics (expiring keys, a fenced put, a lock with a TTL,
//! slots, events delivered to every replica) that can be switched off, and a scripted partner
//! (delay, lifetime, failure) with a tenant that can become unreadable.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use secrecy::ExposeSecret;

use super::{Broker, Upstream};
use crate::cache::redis::LOCK_TTL;
use crate::cache::{fingerprint, CacheError, CachedToken, LockToken, Record, SharedCache, Slot};
use crate::issuers::{Grant, IssuerError, Minted};
use crate::tenants::store::{SealedTenant, StoreError, TenantRecord};
use crate::tenants::{Credentials, IssuerSpec, Tenant, TenantId};
use crate::time::now_ms;

/// A value and when it expires (unix ms on the test clock).
type Expiring<T> = (T, i64);

#[derive(Default)]
struct Keys {
    tokens: HashMap<TenantId, Expiring<Arc<CachedToken>>>,
    records: HashMap<(TenantId, String), Expiring<String>>,
    slots: HashMap<(TenantId, String), i64>,
    locks: HashMap<TenantId, Expiring<String>>,
}

fn live<T: Clone>(entry: Option<&Expiring<T>>, now: i64) -> Option<T> {
    entry
        .filter(|(_, until)| now < *until)
        .map(|(v, _)| v.clone())
}

/// The shared cache, in memory.
#[derive(Default)]
pub struct MemoryShared {
    keys: Mutex<Keys>,
    down: AtomicBool,
    confirmed: AtomicBool,
    gap_at: AtomicI64,
    replicas: Mutex<Vec<Weak<Broker>>>,
    /// Calls answered (or refused while down), for tests that count round trips.
    pub calls: AtomicU32,
}

impl MemoryShared {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Delivers events to `broker`, as its subscription would.
    pub fn subscribe(&self, broker: &Arc<Broker>) {
        self.replicas.lock().unwrap().push(Arc::downgrade(broker));
    }

    /// Every call fails from now on (`confirmed`: the breaker has confirmed the outage).
    pub fn go_down(&self, confirmed: bool) {
        self.down.store(true, Ordering::SeqCst);
        self.confirmed.store(confirmed, Ordering::SeqCst);
    }

    pub fn come_back(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.confirmed.store(false, Ordering::SeqCst);
    }

    /// A gap in the events (a lost subscription): held tokens are re-checked.
    pub fn mark_gap(&self) {
        self.gap_at.store(now_ms(), Ordering::SeqCst);
    }

    /// Writes a token behind every replica's back (no event), as a write whose event was
    /// lost would.
    pub fn overwrite_silently(&self, tenant: &TenantId, token: Arc<CachedToken>) {
        let until = token.usable_until_ms;
        self.keys
            .lock()
            .unwrap()
            .tokens
            .insert(tenant.clone(), (token, until));
    }

    /// Forgets every key, as a Redis restarted without persistence does (a gap for every
    /// replica).
    pub fn restart_empty(&self) {
        *self.keys.lock().unwrap() = Keys::default();
        self.mark_gap();
    }

    /// Takes the tenant's mint lock for a replica that then dies (never extends it).
    pub fn take_lock_and_die(&self, tenant: &TenantId) {
        self.keys.lock().unwrap().locks.insert(
            tenant.clone(),
            ("dead".into(), now_ms() + LOCK_TTL.as_millis() as i64),
        );
    }

    /// Whether anyone holds the tenant's lock now.
    pub fn locked(&self, tenant: &TenantId) -> bool {
        live(self.keys.lock().unwrap().locks.get(tenant), now_ms()).is_some()
    }

    /// Runs `f` on the keys, or fails as an unreachable Redis would.
    fn op<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Keys, i64) -> T + Send,
    ) -> BoxFuture<'_, Result<T, CacheError>> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let result = if self.down.load(Ordering::SeqCst) {
            Err(CacheError::Unavailable(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "connection refused",
            ))))
        } else {
            Ok(f(&mut self.keys.lock().unwrap(), now_ms()))
        };
        Box::pin(async move {
            // A round trip: let other tasks run, as a network call would.
            tokio::task::yield_now().await;
            result
        })
    }
}

impl SharedCache for MemoryShared {
    fn get<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedToken>>, CacheError>> {
        self.op(move |k, now| live(k.tokens.get(tenant), now))
    }

    fn put<'a>(
        &'a self,
        tenant: &'a TenantId,
        token: Arc<CachedToken>,
    ) -> BoxFuture<'a, Result<Arc<CachedToken>, CacheError>> {
        self.op(move |k, now| match live(k.tokens.get(tenant), now) {
            Some(held) if held.issued_at_ms > token.issued_at_ms => held,
            _ => {
                let until = token.usable_until_ms;
                k.tokens.insert(tenant.clone(), (token.clone(), until));
                token
            }
        })
    }

    fn remove<'a>(&'a self, tenant: &'a TenantId) -> BoxFuture<'a, Result<(), CacheError>> {
        self.op(move |k, _| {
            k.tokens.remove(tenant);
        })
    }

    fn remove_if_current<'a>(
        &'a self,
        tenant: &'a TenantId,
        access_token: &'a str,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        let reported = fingerprint(access_token);
        self.op(move |k, now| match live(k.tokens.get(tenant), now) {
            Some(t) if t.fingerprint() == reported => k.tokens.remove(tenant).is_some(),
            _ => false,
        })
    }

    fn publish<'a>(
        &'a self,
        _tenant: &'a TenantId,
        event: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        let replicas: Vec<_> = self.replicas.lock().unwrap().clone();
        self.op(move |_, _| {
            for r in replicas.iter().filter_map(Weak::upgrade) {
                r.on_event(event);
            }
        })
    }

    fn get_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
    ) -> BoxFuture<'a, Result<Option<String>, CacheError>> {
        self.op(move |k, now| {
            live(
                k.records.get(&(tenant.clone(), what.as_str().to_owned())),
                now,
            )
        })
    }

    fn set_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
        value: String,
        ttl_ms: i64,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        self.op(move |k, now| {
            k.records.insert(
                (tenant.clone(), what.as_str().to_owned()),
                (value, now + ttl_ms),
            );
        })
    }

    fn delete_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        self.op(move |k, _| {
            k.records
                .remove(&(tenant.clone(), what.as_str().to_owned()));
        })
    }

    fn take_slot<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Slot,
        interval_ms: u64,
    ) -> BoxFuture<'a, Result<u64, CacheError>> {
        self.op(move |k, now| {
            let key = (tenant.clone(), what.as_str().to_owned());
            match k.slots.get(&key) {
                Some(&free_at) if now < free_at => (free_at - now) as u64,
                _ => {
                    k.slots.insert(key, now + interval_ms as i64);
                    0
                }
            }
        })
    }

    fn try_acquire<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<LockToken>, CacheError>> {
        self.op(move |k, now| {
            if live(k.locks.get(tenant), now).is_some() {
                return None;
            }
            let value = crate::crypto::random_hex::<16>();
            k.locks.insert(
                tenant.clone(),
                (value.clone(), now + LOCK_TTL.as_millis() as i64),
            );
            Some(LockToken {
                tenant: tenant.clone(),
                value,
            })
        })
    }

    fn extend<'a>(&'a self, lock: &'a LockToken) -> BoxFuture<'a, Result<bool, CacheError>> {
        self.op(move |k, now| match k.locks.get_mut(&lock.tenant) {
            Some((v, until)) if *v == lock.value && now < *until => {
                *until = now + LOCK_TTL.as_millis() as i64;
                true
            }
            _ => false,
        })
    }

    fn release(&self, lock: LockToken) -> BoxFuture<'_, Result<(), CacheError>> {
        self.op(move |k, now| {
            if live(k.locks.get(&lock.tenant), now).as_deref() == Some(lock.value.as_str()) {
                k.locks.remove(&lock.tenant);
            }
        })
    }

    fn gap_at(&self) -> i64 {
        self.gap_at.load(Ordering::SeqCst)
    }

    fn outage_confirmed_for(&self, _tenant: &TenantId) -> bool {
        self.confirmed.load(Ordering::SeqCst)
    }

    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        let down = self.down.load(Ordering::SeqCst);
        Box::pin(async move {
            if down {
                Err("unavailable: unreachable (connection refused)".into())
            } else {
                Ok(())
            }
        })
    }
}

/// A partner that answers after `delay` with tokens of `lifetime`, or with `failure`; the
/// tenant's row can become unreadable (`db_down`).
pub struct FakePartner {
    record: TenantRecord,
    pub delay: Mutex<Duration>,
    pub lifetime: Mutex<Duration>,
    pub failure: Mutex<Option<IssuerError>>,
    pub db_down: AtomicBool,
    /// The tenant's row cannot be read and the read never ends (a locked table, a stalled
    /// disk, an exhausted pool): what `db_down` is, without the database saying so.
    pub db_stalled: AtomicBool,
    /// Partner calls made, and their grants (`initial`, `refresh_token`).
    pub grants: Mutex<Vec<&'static str>>,
    /// What was recorded for the tenant's health: `None` for a success, else the code.
    pub health: Mutex<Vec<Option<String>>>,
    /// When each call started (test-clock ms).
    pub started_at: Mutex<Vec<i64>>,
    /// Whether answers carry a refresh token.
    pub refresh_tokens: AtomicBool,
}

impl FakePartner {
    /// Tenant `t`, tokens of `lifetime`, answered after `delay`; `issuer` adds fields to the
    /// issuer spec (e.g. `{"min_interval_ms": 0}`).
    pub fn new(lifetime: Duration, delay: Duration, issuer: serde_json::Value) -> Arc<Self> {
        let mut spec = serde_json::json!({
            "kind": "oauth2_client_credentials",
            "token_url": "https://partner.example/token",
        });
        for (k, v) in issuer.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        let issuer: IssuerSpec = serde_json::from_value(spec).expect("issuer spec");
        Arc::new(Self {
            record: TenantRecord {
                id: TenantId::parse("t").unwrap(),
                display_name: "t".into(),
                issuer,
                credential_fields: Vec::new(),
                proxy: None,
                version: 1,
                created_at_ms: 0,
                updated_at_ms: 0,
            },
            delay: Mutex::new(delay),
            lifetime: Mutex::new(lifetime),
            failure: Mutex::new(None),
            db_down: AtomicBool::new(false),
            db_stalled: AtomicBool::new(false),
            grants: Mutex::new(Vec::new()),
            health: Mutex::new(Vec::new()),
            started_at: Mutex::new(Vec::new()),
            refresh_tokens: AtomicBool::new(false),
        })
    }

    pub fn tenant(&self) -> TenantId {
        self.record.id.clone()
    }

    pub fn calls(&self) -> usize {
        self.grants.lock().unwrap().len()
    }

    pub fn fail_with(&self, e: Option<IssuerError>) {
        *self.failure.lock().unwrap() = e;
    }

    fn unreadable() -> StoreError {
        StoreError::Unavailable(sqlx::Error::PoolTimedOut)
    }
}

impl Upstream for FakePartner {
    fn sealed_tenant<'a>(
        &'a self,
        _id: &'a TenantId,
    ) -> BoxFuture<'a, Result<SealedTenant, StoreError>> {
        let result = if self.db_down.load(Ordering::SeqCst) {
            Err(Self::unreadable())
        } else {
            Ok(SealedTenant::new(self.record.clone(), Vec::new()))
        };
        let stalled = self.db_stalled.load(Ordering::SeqCst);
        Box::pin(async move {
            if stalled {
                std::future::pending::<()>().await;
            }
            result
        })
    }

    fn open_tenant(&self, sealed: &SealedTenant) -> Result<Tenant, StoreError> {
        let none = || Credentials::new(Default::default());
        Ok(sealed.record.with_secrets(none(), none()))
    }

    fn tenant_record<'a>(
        &'a self,
        _id: &'a TenantId,
    ) -> BoxFuture<'a, Result<TenantRecord, StoreError>> {
        let result = if self.db_down.load(Ordering::SeqCst) {
            Err(Self::unreadable())
        } else {
            Ok(self.record.clone())
        };
        Box::pin(async move { result })
    }

    fn mint<'a>(
        &'a self,
        _tenant: &'a Tenant,
        grant: Grant<'a>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Minted, IssuerError>> {
        let n = {
            let mut grants = self.grants.lock().unwrap();
            grants.push(match grant {
                Grant::Initial => "initial",
                Grant::Refresh(rt) => {
                    assert!(rt.expose_secret().starts_with("rt-"));
                    "refresh_token"
                }
            });
            grants.len()
        };
        self.started_at.lock().unwrap().push(now_ms());
        let delay = *self.delay.lock().unwrap();
        Box::pin(async move {
            let issued_at_ms = now_ms();
            if tokio::time::timeout(timeout, tokio::time::sleep(delay))
                .await
                .is_err()
            {
                return Err(IssuerError::Timeout);
            }
            if let Some(e) = self.failure.lock().unwrap().clone() {
                return Err(e);
            }
            let lifetime = self.lifetime.lock().unwrap().as_millis() as i64;
            Ok(Minted {
                access_token: format!("token-{n}").into(),
                refresh_token: self
                    .refresh_tokens
                    .load(Ordering::SeqCst)
                    .then(|| format!("rt-{n}").into()),
                issued_at_ms,
                expires_at_ms: issued_at_ms + lifetime,
                dpop_jkt: None,
            })
        })
    }

    fn record_health<'a>(
        &'a self,
        _id: &'a TenantId,
        error: Option<(&'a str, &'a str)>,
    ) -> BoxFuture<'a, ()> {
        self.health
            .lock()
            .unwrap()
            .push(error.map(|(code, _)| code.to_owned()));
        Box::pin(async {})
    }
}
