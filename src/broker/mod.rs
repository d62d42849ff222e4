//! `Broker::token`: the token path (in-process L1, shared L2 in Redis, single-flight mints
//! under a cross-replica lock, refresh-ahead, partner protection) plus invalidation. Domain
//! code only: nothing here knows about HTTP.

pub mod circuit;
mod flight;
mod invalidate;
mod mint;
mod refresh;
mod upstream;

pub use upstream::{Backends, Upstream};

use flight::{Flight, PHASE_WORKING};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Notify;
use tracing::Instrument;

use crate::cache::memory::MemoryCache;
use crate::cache::redis::LOCK_TTL;
use crate::cache::{CacheError, CachedToken, LockToken, Shared as SharedCache};
use crate::issuers::recipes::supports_refresh;
use crate::issuers::{Grant, IssuerError, Minted};
use crate::metrics::Metrics;
use crate::tenants::store::{SealedTenant, StoreError};
use crate::tenants::{Tenant, TenantId};
use crate::time::now_ms;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("tenant not found")]
    TenantNotFound,
    #[error("even a fresh token lives {lifetime_s} s, less than the {min_ttl_s} s asked for")]
    MinTtlUnsatisfiable { min_ttl_s: u64, lifetime_s: i64 },
    #[error("another replica's mint did not finish within {0:?}")]
    LockWaitTimeout(Duration),
    #[error("{last} (partner calls paused for {retry_after} s)")]
    CircuitOpen { last: IssuerError, retry_after: u64 },
    #[error(transparent)]
    Upstream(#[from] IssuerError),
    #[error(transparent)]
    Store(Arc<StoreError>),
    #[error(transparent)]
    Cache(Arc<CacheError>),
    /// The task running a mint ended without an answer (it panicked or was cancelled): a bug.
    #[error("the mint task failed: {0}")]
    MintTaskFailed(String),
}

impl BrokerError {
    /// The partner's token endpoint is down or slow (not a rejection, not ours).
    fn partner_unavailable(&self) -> bool {
        match self {
            Self::Upstream(e) | Self::CircuitOpen { last: e, .. } => e.is_transient(),
            _ => false,
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => Self::TenantNotFound,
            other => Self::Store(Arc::new(other)),
        }
    }
}

impl From<CacheError> for BrokerError {
    fn from(e: CacheError) -> Self {
        Self::Cache(Arc::new(e))
    }
}

/// What a replica tells the others about a tenant, as `<tag> <replica> <tenant>` on the
/// shared cache's channel (the one-letter tags are the wire format other versions speak).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// `m`: a newer token was written to the shared cache.
    Minted,
    /// `d`: the tenant's token was dropped.
    Dropped,
    /// `x`: the tenant was deleted.
    Deleted,
}

impl Event {
    const fn as_str(self) -> &'static str {
        match self {
            Self::Minted => "m",
            Self::Dropped => "d",
            Self::Deleted => "x",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Minted, Self::Dropped, Self::Deleted]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// Where a handed-out token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Cache,
    Minted,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Minted => "minted",
        }
    }

    /// The source a stored spelling names (the audit trail's).
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Cache, Self::Minted]
            .into_iter()
            .find(|v| v.as_str() == s)
    }
}

type FlightResult = Result<Arc<CachedToken>, BrokerError>;

/// What a flight must produce.
#[derive(Clone, Copy)]
enum Want {
    /// A token with at least this many ms left.
    Usable { min_ttl_ms: i64 },
    /// A token that is not yet past its refresh point.
    Refreshed,
    /// A new token, whatever is cached.
    Fresh,
}

impl Want {
    fn satisfied_by(self, t: &CachedToken, now: i64) -> bool {
        match self {
            Self::Usable { min_ttl_ms } => t.serves(now, min_ttl_ms),
            Self::Refreshed => t.serves(now, 0) && now < t.refresh_at_ms,
            Self::Fresh => false,
        }
    }
}

/// Longest a mint waits on the database for the tenant's row before it goes on with the copy
/// last read (or, for a tenant never read, answers that the database is unavailable).
pub const DB_READ_BOUND: Duration = Duration::from_millis(500);
/// With Redis as the shared truth, a held token is re-checked there after this long (a safety
/// net behind the events); if Redis does not answer, the held token keeps being served.
pub const L1_REVALIDATE_MS: i64 = 15_000;

/// The default ceiling on a tenant's partner calls: one a second, shared by every replica.
pub const DEFAULT_MIN_INTERVAL_MS: u64 = 1_000;
/// A token younger than this (or than 5 % of its lifetime, if longer) is dropped by a
/// caller's report at most once per window (see `Broker::invalidate`).
pub const INVALIDATE_MIN_AGE_MS: i64 = 10_000;

/// What a caller's report of a rejected token did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// The token was the current one and is gone: the next fetch mints.
    Dropped,
    /// The token was not (or no longer) the current one: nothing to drop.
    Stale,
    /// The token is current but young, and a young token of this tenant was dropped within
    /// the window already: it stays.
    Throttled {
        age_s: u64,
        window_s: u64,
        retry_after_s: u64,
    },
}

impl Invalidation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "dropped",
            Self::Stale => "stale",
            Self::Throttled { .. } => "throttled",
        }
    }
}

/// Time bounds of the token path.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Default timeout of one partner call (a tenant's `timeout_ms` overrides it).
    pub attempt_timeout: Duration,
    /// Everything one mint may take: attempts, retries, pacing, the refresh-grant fallback.
    pub mint_budget: Duration,
    /// How long a flight waits for another replica's lock: a live holder extends its lock
    /// for as long as its mint runs (at most `mint_budget`), a dead one loses it within
    /// `LOCK_TTL`.
    pub lock_wait: Duration,
    /// The longest a caller is held.
    pub caller_deadline: Duration,
    /// Whether fetches look in the in-process cache first (with Redis configured).
    pub l1_enabled: bool,
    /// The minimum interval between partner calls of a tenant whose spec sets no
    /// `min_interval_ms` (`BROKER_DEFAULT_MIN_INTERVAL_MS`; 0 turns the default off).
    pub default_min_interval_ms: u64,
}

impl Timing {
    /// Bounds derived from the upstream timeout: a caller waits at most 2 s past a mint's
    /// budget; a waiter on another replica's lock, a mint's budget plus the lock's life.
    pub fn from_upstream_timeout(t: Duration) -> Self {
        Self {
            attempt_timeout: t,
            mint_budget: t,
            lock_wait: t + LOCK_TTL + Duration::from_secs(1),
            caller_deadline: t + Duration::from_secs(2),
            l1_enabled: true,
            default_min_interval_ms: DEFAULT_MIN_INTERVAL_MS,
        }
    }
}

/// How many partner attempts one mint may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tries {
    /// The first attempt and up to `RETRIES` retries of transient failures.
    WithRetries,
    /// One attempt: a half-open probe.
    Once,
}

/// What a cache level found: a token to serve, or the last token known (for the lifetime
/// check), if any.
enum Lookup {
    Serve(Arc<CachedToken>),
    Known(Option<Arc<CachedToken>>),
}

/// The partner's tokens live about as long as the last one did: if that is shorter than
/// `min_ttl`, minting again would only burn a partner call.
fn check_lifetime(known: Option<&CachedToken>, min_ttl_s: u64) -> Result<(), BrokerError> {
    let min_ttl_ms = (min_ttl_s as i64).saturating_mul(1000);
    match known {
        Some(t) if min_ttl_ms > 0 && t.expires_at_ms - t.issued_at_ms < min_ttl_ms => {
            Err(BrokerError::MinTtlUnsatisfiable {
                min_ttl_s,
                lifetime_s: (t.expires_at_ms - t.issued_at_ms) / 1000,
            })
        }
        _ => Ok(()),
    }
}

/// The token broker.
pub struct Broker {
    upstream: Arc<dyn Upstream>,
    l1: MemoryCache,
    l2: Option<SharedCache>,
    metrics: Arc<Metrics>,
    /// Identifies this process in events, so it ignores its own.
    replica: String,
    timing: Timing,
    circuits: circuit::Circuits,
    pacer: circuit::Pacer,
    flights: Mutex<HashMap<TenantId, Flight>>,
    next_flight: AtomicU64,
    waiters: Mutex<HashMap<TenantId, Arc<Notify>>>,
    refresh_not_before: Mutex<HashMap<TenantId, i64>>,
    /// The last tenant rows read for a mint, still sealed: minting survives a database outage.
    last_read: moka::sync::Cache<TenantId, Arc<SealedTenant>>,
    /// Tenants whose token this replica minted but could not write to the shared cache (it was
    /// down or refused writes): written back (fenced) at the first miss once it answers, so
    /// the heal costs no partner call.
    unshared: Mutex<std::collections::HashSet<TenantId>>,
}

impl Broker {
    pub fn new(
        upstream: Arc<dyn Upstream>,
        l2: Option<SharedCache>,
        metrics: Arc<Metrics>,
        timing: Timing,
    ) -> Arc<Self> {
        let (circuits, pacer) = (
            circuit::Circuits::new(l2.clone()),
            circuit::Pacer::new(l2.clone()),
        );
        Arc::new(Self {
            upstream,
            l1: MemoryCache::new(1_000_000),
            l2,
            metrics,
            replica: crate::crypto::random_hex::<8>(),
            timing,
            circuits,
            pacer,
            flights: Mutex::new(HashMap::new()),
            next_flight: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            refresh_not_before: Mutex::new(HashMap::new()),
            last_read: moka::sync::Cache::new(1_000_000),
            unshared: Mutex::new(Default::default()),
        })
    }

    /// The shared cache, when replicas share one.
    pub fn shared_cache(&self) -> Option<&SharedCache> {
        self.l2.as_ref()
    }

    /// Handles an event from another replica: `<event> <replica> <tenant>` (see `Event`).
    pub fn on_event(&self, event: &str) {
        let mut parts = event.splitn(3, ' ');
        let (Some(kind), Some(replica), Some(tenant)) = (parts.next(), parts.next(), parts.next())
        else {
            return;
        };
        let Some(kind) = Event::parse(kind).filter(|_| replica != self.replica) else {
            return;
        };
        let Ok(tenant) = TenantId::parse(tenant) else {
            return;
        };
        if kind == Event::Minted {
            // A newer token is in the shared cache: read it there next time; if that read
            // fails (this replica's breaker still open), the held token is served meanwhile.
            self.l1.mark_stale(&tenant);
        } else {
            self.l1.invalidate(&tenant);
        }
        if kind == Event::Deleted {
            // Deleted on another replica: nothing of it stays here, its metric series included.
            self.last_read.invalidate(&tenant);
            self.metrics.forget_tenant(tenant.as_str());
        }
        if let Some(n) = self.waiters.lock().expect("waiters").get(&tenant) {
            n.notify_waiters();
        }
    }

    async fn announce(&self, kind: Event, tenant: &TenantId) {
        if let Some(l2) = &self.l2 {
            if let Err(e) = l2
                .publish(
                    tenant,
                    &format!("{} {} {tenant}", kind.as_str(), self.replica),
                )
                .await
            {
                tracing::warn!(tenant = %tenant, error = %e, "could not announce a token change");
            }
        }
    }

    /// A usable token for `tenant` with at least `min_ttl_s` seconds left: from this process,
    /// else from the shared cache, else from a flight (bounded by the caller deadline).
    pub async fn token(
        self: &Arc<Self>,
        tenant: &TenantId,
        min_ttl_s: u64,
    ) -> Result<(Arc<CachedToken>, Source), BrokerError> {
        let min_ttl_ms = (min_ttl_s as i64).saturating_mul(1000);
        let now = now_ms();
        let held = if self.timing.l1_enabled {
            self.l1.get_held(tenant)
        } else {
            None
        };
        if let Some(t) = self.in_process(tenant, held.as_ref(), now, min_ttl_ms) {
            return Ok((t, Source::Cache));
        }
        self.metrics.l1_miss.inc();
        let known = match self.shared(tenant, held, now, min_ttl_ms).await {
            Lookup::Serve(t) => return Ok((t, Source::Cache)),
            Lookup::Known(known) => known,
        };
        check_lifetime(known.as_deref(), min_ttl_s)?;
        match self.bounded_flight(tenant, min_ttl_s).await {
            // The partner cannot be reached, but this process still holds a token that Redis
            // no longer has (it restarted empty, or a drop went unannounced during a gap):
            // it is served to its usable end rather than failing the caller.
            Err(e) if e.partner_unavailable() => {
                match known.filter(|t| t.serves(now_ms(), min_ttl_ms)) {
                    Some(t) => {
                        tracing::warn!(tenant = %tenant, error = %e, "mint failed; serving the token this process holds");
                        Ok((t, Source::Cache))
                    }
                    None => Err(e),
                }
            }
            other => other,
        }
    }

    /// The token this process holds, if it may be trusted without asking Redis and serves
    /// `min_ttl`. With Redis as the truth, a held token is re-checked there every so often
    /// (events normally tell us sooner); without Redis, L1 is the truth. After a gap in events
    /// (a lost subscription, a Redis outage) every held token may be stale: each is re-checked
    /// once (and still served if Redis does not answer).
    fn in_process(
        self: &Arc<Self>,
        tenant: &TenantId,
        held: Option<&(Arc<CachedToken>, i64)>,
        now: i64,
        min_ttl_ms: i64,
    ) -> Option<Arc<CachedToken>> {
        let (t, since) = held?;
        let fresh = match &self.l2 {
            None => true,
            Some(l2) => now - since < L1_REVALIDATE_MS && *since > l2.gap_at(),
        };
        if !(fresh && t.serves(now, min_ttl_ms)) {
            return None;
        }
        self.metrics.l1_hit.inc();
        self.refresh_ahead(tenant, t, now);
        Some(t.clone())
    }

    /// The shared cache's token, when Redis is configured. Redis unreachable: what this
    /// process holds is served to its usable end.
    ///
    /// Long because the shared cache's read has three answers (hit, miss, unreachable:
    /// serve what this process holds), each with its metric.
    async fn shared(
        self: &Arc<Self>,
        tenant: &TenantId,
        held: Option<(Arc<CachedToken>, i64)>,
        now: i64,
        min_ttl_ms: i64,
    ) -> Lookup {
        let known = held.map(|(t, _)| t);
        let Some(l2) = &self.l2 else {
            return Lookup::Known(known);
        };
        match l2.get(tenant).await {
            Ok(Some(shared)) => {
                self.metrics.l2_hit.inc();
                let t = if self.timing.l1_enabled {
                    self.l1.insert_unless_newer(tenant, shared.clone())
                } else {
                    shared.clone()
                };
                // L1 kept its own, later mint, one the shared cache never took (it was away):
                // write it back so every replica converges on it.
                if !Arc::ptr_eq(&t, &shared)
                    && self.unshared.lock().expect("unshared").contains(tenant)
                {
                    let _ = self.write_back(l2, tenant, &t).await;
                }
                self.metrics
                    .set_token_expiry(tenant.as_str(), t.expires_at_ms);
                if t.serves(now, min_ttl_ms) {
                    self.refresh_ahead(tenant, &t, now);
                    return Lookup::Serve(t);
                }
                Lookup::Known(Some(t))
            }
            Ok(None) => {
                self.metrics.l2_miss.inc();
                // A token this replica minted while the shared cache was away: write it back
                // and serve what is kept.
                if let Some(t) = known.as_ref().filter(|t| t.serves(now, min_ttl_ms)) {
                    if self.unshared.lock().expect("unshared").contains(tenant) {
                        if let Some(kept) = self.write_back(l2, tenant, t).await {
                            let kept = self.l1.insert_unless_newer(tenant, kept);
                            if kept.serves(now, min_ttl_ms) {
                                return Lookup::Serve(kept);
                            }
                            return Lookup::Known(Some(kept));
                        }
                    }
                }
                // Dropped, expired, or lost with a Redis that restarted empty: a new token is
                // minted; the held one stays only as the fallback of a failed mint (see
                // `token`). Drops announced by events have already removed it here.
                Lookup::Known(known)
            }
            Err(e) => {
                self.metrics.l2_error.inc();
                match known {
                    Some(t) if t.serves(now, min_ttl_ms) => {
                        tracing::debug!(tenant = %tenant, error = %e, "shared cache unavailable; serving the held token");
                        Lookup::Serve(t)
                    }
                    other => Lookup::Known(other),
                }
            }
        }
    }

    /// Writes a token this replica minted while the shared cache was away (fenced: a later
    /// mint written meanwhile wins) and announces it if it was kept; the token kept, or `None`
    /// if the shared cache did not answer (it stays unshared, to try again).
    async fn write_back(
        &self,
        l2: &SharedCache,
        tenant: &TenantId,
        token: &Arc<CachedToken>,
    ) -> Option<Arc<CachedToken>> {
        let kept = l2.put(tenant, token.clone()).await.ok()?;
        self.unshared.lock().expect("unshared").remove(tenant);
        if Arc::ptr_eq(&kept, token) {
            tracing::info!(tenant = %tenant, "token minted while the shared cache was away written back");
            self.announce(Event::Minted, tenant).await;
        }
        Some(kept)
    }

    /// The token held for `tenant` (here, else in the shared cache) as (issued at, expires at)
    /// in unix ms, for the admin view; never mints.
    pub async fn held_token(&self, tenant: &TenantId) -> Option<(i64, i64)> {
        let now = now_ms();
        let held = match self.l1.get_now(tenant).filter(|t| t.expires_at_ms > now) {
            Some(t) => Some(t),
            None => match &self.l2 {
                Some(l2) => l2.get(tenant).await.ok().flatten(),
                None => None,
            },
        };
        held.filter(|t| t.expires_at_ms > now)
            .map(|t| (t.issued_at_ms, t.expires_at_ms))
    }

    /// The tenant's circuit, for the admin view.
    pub async fn circuit_state(&self, tenant: &TenantId) -> Option<circuit::CircuitState> {
        self.circuits.state(tenant).await
    }

    /// Whether the tenant is known to exist (a cached token or a recent read), so metrics
    /// may carry its id as a label; unknown ids never create series.
    pub fn knows_tenant(&self, tenant: &TenantId) -> bool {
        self.last_read.contains_key(tenant) || self.l1.get_held(tenant).is_some()
    }

    /// The shared cache's health from real key operations: `None` without one, else `Err`
    /// naming what fails.
    pub async fn check_shared(&self) -> Option<Result<(), String>> {
        match &self.l2 {
            Some(l2) => Some(l2.check().await),
            None => None,
        }
    }
}

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod tests;
