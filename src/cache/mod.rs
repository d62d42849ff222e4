//! Token caches: the in-process L1 (`memory`) and the shared L2 (`SharedCache`: what replicas
//! share, i.e. tokens, the cross-replica mint lock, circuit and pacing slots, the event
//! channel). The service's one shared cache is Redis (`redis`); the trait exists so the
//! broker's concurrency logic can be tested against an in-memory one under a paused clock.

pub mod breaker;
pub mod memory;
pub mod redis;
pub mod target;

use std::sync::Arc;

use futures_util::future::BoxFuture;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::issuers::expiry::skew_ms;
use crate::issuers::Minted;
use crate::tenants::TenantId;

/// A tenant's small shared record, by the name its Redis key ends with
/// (`{prefix}:{<tenant>}:<name>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Record {
    /// The circuit's state.
    Circuit,
}

impl Record {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Circuit => "circuit",
        }
    }
}

/// A tenant's rate slot (taken, it frees after an interval), by its key's last name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Slot {
    /// Partner calls (`min_interval_ms`).
    Pace,
    /// The open circuit's probe.
    Probe,
    /// The re-mint guard for young tokens.
    Invalidate,
}

impl Slot {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pace => "pace",
            Self::Probe => "probe",
            Self::Invalidate => "invalidate",
        }
    }
}

/// A token as the broker keeps it.
pub struct CachedToken {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    /// When the partner was asked (unix ms).
    pub issued_at_ms: i64,
    /// The partner's expiry (unix ms).
    pub expires_at_ms: i64,
    /// After this the token is no longer handed out (`expires_at - skew`).
    pub usable_until_ms: i64,
    /// After this a fetch triggers a renewal.
    pub refresh_at_ms: i64,
    /// The RFC 7638 thumbprint of the DPoP key the token is bound to (RFC 9449): `token_type:
    /// DPoP`, usable only with a proof signed by that key.
    pub dpop_jkt: Option<String>,
    /// Per-token memos for the hot path, each computed once.
    pub audit_fp: std::sync::OnceLock<Arc<str>>,
    pub memo: Memo,
}

/// What the token path would otherwise recompute on every hit.
#[derive(Default)]
pub struct Memo {
    /// `expires_at` as RFC 3339.
    pub expires_at: std::sync::OnceLock<String>,
    /// The tenant's `broker_token_requests_total{outcome="cache"}` series.
    pub hit_counter: std::sync::OnceLock<Arc<std::sync::atomic::AtomicU64>>,
    /// The token answer up to its last field (`…,"expires_in":`), serialized once: only the
    /// seconds left change between hits. Holds the token, so it is wiped with it.
    pub answer_prefix: std::sync::OnceLock<zeroize::Zeroizing<String>>,
    /// The same for the OAuth 2.0 answer (`…,"expires_in":`).
    pub oauth_prefix: std::sync::OnceLock<zeroize::Zeroizing<String>>,
    /// The token's DPoP `ath` (its SHA-256), for the proofs bound to it.
    pub ath: std::sync::OnceLock<String>,
}

impl CachedToken {
    /// Works out the usable end and the refresh point of a fresh token. The refresh point is
    /// two thirds into the lifetime, pulled earlier by up to a twentieth at random so tenants
    /// minted together do not all refresh in the same second.
    pub fn from_minted(m: Minted) -> Self {
        // Expiry is clamped where it is computed; clamping here too keeps this arithmetic
        // safe whatever builds a `Minted`.
        let lifetime = m
            .expires_at_ms
            .saturating_sub(m.issued_at_ms)
            .clamp(0, crate::issuers::expiry::MAX_LIFETIME_MS);
        let usable_until_ms = m.expires_at_ms - skew_ms(lifetime);
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=lifetime / 20);
        let refresh_at_ms = (m.issued_at_ms + lifetime * 2 / 3 - jitter).min(usable_until_ms);
        Self {
            access_token: m.access_token,
            refresh_token: m.refresh_token,
            issued_at_ms: m.issued_at_ms,
            expires_at_ms: m.expires_at_ms,
            usable_until_ms,
            refresh_at_ms,
            dpop_jkt: m.dpop_jkt,
            audit_fp: Default::default(),
            memo: Memo::default(),
        }
    }

    /// The `ath` of DPoP proofs for this token, computed once.
    pub fn ath(&self) -> &str {
        self.memo
            .ath
            .get_or_init(|| crate::pop::ath_of(self.access_token.expose_secret()))
    }

    /// `DPoP` for a token bound to the tenant's key (RFC 9449), else `Bearer`.
    pub fn token_type(&self) -> &'static str {
        if self.dpop_jkt.is_some() {
            "DPoP"
        } else {
            "Bearer"
        }
    }

    /// The token's keyed audit fingerprint (see `KeyRing::fingerprint`), computed once.
    pub fn audit_fingerprint(&self, keys: &crate::crypto::KeyRing) -> &Arc<str> {
        self.audit_fp
            .get_or_init(|| keys.fingerprint(self.access_token.expose_secret()).into())
    }

    /// Whether it may be handed out at `now` to a caller that needs `min_ttl_ms` left.
    pub fn serves(&self, now_ms: i64, min_ttl_ms: i64) -> bool {
        now_ms < self.usable_until_ms && self.expires_at_ms - now_ms >= min_ttl_ms
    }

    /// A short fingerprint of the access token (hex SHA-256, 128 bits), for compare-and-delete.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.access_token.expose_secret())
    }
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("usable_until_ms", &self.usable_until_ms)
            .finish_non_exhaustive()
    }
}

/// Hex of the first 16 bytes of SHA-256(token).
pub fn fingerprint(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..16])
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("the shared cache is unavailable")]
    Unavailable(#[source] ::redis::RedisError),
    /// Redis answers but refuses writes (`OOM` under `maxmemory`, `MISCONF`, `READONLY`,
    /// `NOREPLICAS`): reads go on, so it is not an outage.
    #[error("the shared cache refuses writes ({0})")]
    WriteRefused(String),
}

/// Proof of holding a tenant's mint lock; give it back to `SharedCache::release`.
#[derive(Debug)]
pub struct LockToken {
    pub tenant: TenantId,
    pub value: String,
}

/// A handle on the shared cache.
pub type Shared = Arc<dyn SharedCache>;

/// The cache replicas share (see `redis::RedisCache`). Every call may fail with
/// `CacheError::Unavailable`; the broker degrades rather than fail its callers.
pub trait SharedCache: Send + Sync {
    /// The tenant's token, if one is held.
    fn get<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedToken>>, CacheError>>;
    /// Stores `token` until its usable end unless the held one expires later; returns the
    /// token kept.
    fn put<'a>(
        &'a self,
        tenant: &'a TenantId,
        token: Arc<CachedToken>,
    ) -> BoxFuture<'a, Result<Arc<CachedToken>, CacheError>>;
    /// Drops the tenant's token.
    fn remove<'a>(&'a self, tenant: &'a TenantId) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Drops the tenant's token only if it is still `access_token`; true if dropped.
    fn remove_if_current<'a>(
        &'a self,
        tenant: &'a TenantId,
        access_token: &'a str,
    ) -> BoxFuture<'a, Result<bool, CacheError>>;
    /// Tells every replica (this one too) that `tenant`'s token changed.
    fn publish<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// A small record of the tenant's.
    fn get_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
    ) -> BoxFuture<'a, Result<Option<String>, CacheError>>;
    /// Stores a small record for `ttl_ms`.
    fn set_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
        value: String,
        ttl_ms: i64,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    fn delete_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Takes the tenant's `what` slot that frees after `interval_ms`: 0 if taken, else ms
    /// until it frees.
    fn take_slot<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Slot,
        interval_ms: u64,
    ) -> BoxFuture<'a, Result<u64, CacheError>>;
    /// Takes the tenant's mint lock if it is free; it lives `redis::LOCK_TTL` unless extended.
    fn try_acquire<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<LockToken>, CacheError>>;
    /// Extends the lock by `LOCK_TTL` if it is still ours; false if it was lost.
    fn extend<'a>(&'a self, lock: &'a LockToken) -> BoxFuture<'a, Result<bool, CacheError>>;
    /// Releases the lock only if it is still ours.
    fn release(&self, lock: LockToken) -> BoxFuture<'_, Result<(), CacheError>>;
    /// When the view of other replicas' writes last had a gap (unix ms): tokens held from
    /// before it are re-checked.
    fn gap_at(&self) -> i64;
    /// Whether the tenant's part of the cache is down beyond doubt (then a mint without the
    /// lock is worth its risk of a duplicate).
    fn outage_confirmed_for(&self, tenant: &TenantId) -> bool;
    /// A readiness check made of real operations: `Err` is the readiness word, naming what
    /// fails (`unavailable: …`, `refuses writes (…)`).
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}
