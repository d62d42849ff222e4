//! `Broker::token`: the token path (in-process L1, shared L2 in Redis, single-flight mints
//! under a cross-replica lock, refresh-ahead, partner protection) plus invalidation. Domain
//! code only: nothing here knows about HTTP.

pub mod circuit;
mod upstream;

pub use upstream::{Backends, Upstream};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Notify;

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
            StoreError::NotFound => Self::TenantNotFound,
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

/// Redis failed on the flight's path: mint without it.
struct Degrade(CacheError);

/// One in-process mint for a tenant, shared by every request that needs it.
struct Flight {
    id: u64,
    done: Shared<BoxFuture<'static, FlightResult>>,
    phase: Arc<AtomicU8>,
}

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

/// How long an admin change keeps trying to drop the old token from an unreachable Redis
/// (the longest a partner token is cached is far shorter in practice; after this it expires
/// by itself).
const FORGET_RETRY_FOR: Duration = Duration::from_secs(600);

/// How long a failed background refresh waits before the next one.
const REFRESH_RETRY_MS: i64 = 5_000;
/// How often a waiter on another replica's mint looks at the shared cache between events.
const WAIT_POLL: Duration = Duration::from_millis(100);

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

/// What a flight is doing, so a caller whose deadline passes is told what held it up.
const PHASE_WORKING: u8 = 0;
const PHASE_WAITING_FOR_LOCK: u8 = 1;

/// Transient failures are retried this many times within the mint budget.
const RETRIES: u32 = 2;

/// How many partner attempts one mint may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tries {
    /// The first attempt and up to `RETRIES` retries of transient failures.
    WithRetries,
    /// One attempt: a half-open probe.
    Once,
}

/// Extends the held mint lock every `LOCK_TTL / 4` while the mint runs; abort it when done.
fn keep_lock(l2: SharedCache, lock: &LockToken) -> tokio::task::JoinHandle<()> {
    let lock = LockToken {
        tenant: lock.tenant.clone(),
        value: lock.value.clone(),
    };
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(LOCK_TTL / 4).await;
            match l2.extend(&lock).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(tenant = %lock.tenant, "mint lock lost while minting (the fenced write still keeps the newer token)");
                    return;
                }
                // Missed once: the lock outlives three missed extensions.
                Err(_) => {}
            }
        }
    })
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

    /// A token from a flight, within the caller deadline: joins the tenant's running flight
    /// (or starts one), and runs its own if the one joined was after less.
    async fn bounded_flight(
        self: &Arc<Self>,
        tenant: &TenantId,
        min_ttl_s: u64,
    ) -> Result<(Arc<CachedToken>, Source), BrokerError> {
        let want = Want::Usable {
            min_ttl_ms: (min_ttl_s as i64).saturating_mul(1000),
        };
        let started = now_ms();
        let deadline = Instant::now() + self.timing.caller_deadline;
        let caller_deadline = self.timing.caller_deadline;
        let bounded = |(f, phase): (_, Arc<AtomicU8>)| async move {
            tokio::time::timeout_at(deadline, f)
                .await
                .unwrap_or_else(|_| {
                    // Say what held the caller up: another replica's mint, or the partner.
                    Err(match phase.load(Ordering::Relaxed) {
                        PHASE_WAITING_FOR_LOCK => BrokerError::LockWaitTimeout(caller_deadline),
                        _ => BrokerError::Upstream(IssuerError::Timeout),
                    })
                })
        };
        let mut token = bounded(self.flight(tenant, want)).await?;
        if !want.satisfied_by(&token, now_ms()) {
            // The flight joined was after less (a refresh, a shorter min_ttl): run our own.
            token = bounded(self.flight(tenant, want)).await?;
        }
        let now = now_ms();
        if !want.satisfied_by(&token, now) {
            return Err(BrokerError::MinTtlUnsatisfiable {
                min_ttl_s,
                lifetime_s: (token.expires_at_ms - now) / 1000,
            });
        }
        let source = if token.issued_at_ms >= started {
            Source::Minted
        } else {
            Source::Cache
        };
        Ok((token, source))
    }

    /// Past the refresh point: start one background refresh, unless one runs or a failed one
    /// asked to wait. The caller is not held.
    fn refresh_ahead(self: &Arc<Self>, tenant: &TenantId, t: &CachedToken, now: i64) {
        if now < t.refresh_at_ms {
            return;
        }
        {
            let mut not_before = self.refresh_not_before.lock().expect("refresh map");
            if not_before.get(tenant).is_some_and(|&nb| now < nb) {
                return;
            }
            not_before.insert(tenant.clone(), now + REFRESH_RETRY_MS);
        }
        if self.flights.lock().expect("flights").contains_key(tenant) {
            return;
        }
        let me = self.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            match me.flight(&tenant, Want::Refreshed).0.await {
                Ok(_) => {
                    me.refresh_not_before
                        .lock()
                        .expect("refresh map")
                        .remove(&tenant);
                }
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "background refresh failed; the cached token is served until its usable end");
                }
            }
        });
    }

    /// Joins the tenant's flight, or starts one: its outcome, and what it is doing.
    fn flight(
        self: &Arc<Self>,
        tenant: &TenantId,
        want: Want,
    ) -> (Shared<BoxFuture<'static, FlightResult>>, Arc<AtomicU8>) {
        {
            let mut flights = self.flights.lock().expect("flights");
            match flights.get(tenant) {
                Some(f) => (f.done.clone(), f.phase.clone()),
                None => {
                    let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
                    let me = self.clone();
                    let t = tenant.clone();
                    let phase = Arc::new(AtomicU8::new(PHASE_WORKING));
                    let task_phase = phase.clone();
                    let task = tokio::spawn(async move {
                        let result = me.run_flight(&t, want, &task_phase).await;
                        let mut flights = me.flights.lock().expect("flights");
                        if flights.get(&t).is_some_and(|f| f.id == id) {
                            flights.remove(&t);
                        }
                        result
                    });
                    let done = async move {
                        task.await
                            .unwrap_or_else(|e| Err(BrokerError::MintTaskFailed(e.to_string())))
                    }
                    .boxed()
                    .shared();
                    flights.insert(
                        tenant.clone(),
                        Flight {
                            id,
                            done: done.clone(),
                            phase: phase.clone(),
                        },
                    );
                    (done, phase)
                }
            }
        }
    }

    /// The body of a flight: wait for (or take) the cross-replica lock, mint, write, announce.
    async fn run_flight(
        self: &Arc<Self>,
        tenant: &TenantId,
        want: Want,
        phase: &AtomicU8,
    ) -> FlightResult {
        let Some(l2) = &self.l2 else {
            let tries = self.check_circuit(tenant, want).await?;
            let prev = self.l1.get_now(tenant);
            return self.mint_and_store(tenant, prev.as_deref(), tries).await;
        };
        let deadline = Instant::now() + self.timing.lock_wait;
        let notify = self
            .waiters
            .lock()
            .expect("waiters")
            .entry(tenant.clone())
            .or_default()
            .clone();
        let result = async {
            loop {
                let woken = notify.notified();
                let current = match l2.get(tenant).await {
                    Ok(c) => c,
                    Err(e) if l2.outage_confirmed_for(tenant) || Instant::now() >= deadline => {
                        return Err(Degrade(e))
                    }
                    Err(_) => {
                        // Not (yet) a confirmed outage: look again shortly.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if let Some(t) = &current {
                    if want.satisfied_by(t, now_ms()) {
                        return Ok(Ok(self.l1.insert_unless_newer(tenant, t.clone())));
                    }
                }
                let tries = match self.check_circuit(tenant, want).await {
                    Ok(tries) => tries,
                    Err(e) => return Ok(Err(e)),
                };
                let lock = match l2.try_acquire(tenant).await {
                    Ok(lock) => lock,
                    // Redis that refuses writes will not take a lock now or in 20 ms: mint
                    // without it at once (it still serves the token once one is written).
                    Err(e @ CacheError::WriteRefused(_)) => return Err(Degrade(e)),
                    Err(e) if l2.outage_confirmed_for(tenant) || Instant::now() >= deadline => {
                        return Err(Degrade(e))
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                if let Some(lock) = lock {
                    phase.store(PHASE_WORKING, Ordering::Relaxed);
                    // Another replica may have written between our read and the lock.
                    let current = l2.get(tenant).await.ok().flatten().or(current);
                    if let Some(t) = &current {
                        if want.satisfied_by(t, now_ms()) {
                            let _ = l2.release(lock).await;
                            return Ok(Ok(self.l1.insert_unless_newer(tenant, t.clone())));
                        }
                    }
                    let prev = current.or_else(|| self.l1.get_now(tenant));
                    let keeper = keep_lock(l2.clone(), &lock);
                    let result = self.mint_and_store(tenant, prev.as_deref(), tries).await;
                    keeper.abort();
                    if let Err(e) = l2.release(lock).await {
                        tracing::warn!(tenant = %tenant, error = %e, "mint lock release failed; it expires by itself");
                    }
                    return Ok(result);
                }
                phase.store(PHASE_WAITING_FOR_LOCK, Ordering::Relaxed);
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Err(BrokerError::LockWaitTimeout(self.timing.lock_wait)));
                }
                let _ = tokio::time::timeout(WAIT_POLL.min(left), woken).await;
            }
        }
        .await;
        phase.store(PHASE_WORKING, Ordering::Relaxed);
        drop(notify);
        {
            let mut waiters = self.waiters.lock().expect("waiters");
            if waiters
                .get(tenant)
                .is_some_and(|n| Arc::strong_count(n) == 1)
            {
                waiters.remove(tenant);
            }
        }
        match result {
            Ok(r) => r,
            Err(Degrade(e)) => {
                // Redis is unreachable or refuses writes: this replica mints on its own rather
                // than fail.
                self.metrics.lock_degraded.inc();
                tracing::warn!(tenant = %tenant, error = %e, "shared cache unavailable: minting without the cross-replica lock");
                let tries = self.check_circuit(tenant, want).await?;
                let prev = self.l1.get_now(tenant);
                self.mint_and_store(tenant, prev.as_deref(), tries).await
            }
        }
    }

    /// While the tenant's circuit is open, answers with its last problem. Two exceptions: the
    /// admin dry run (`Want::Fresh`) is let through, and when the broker needs a token (callers
    /// have no usable one, or the held one is past its refresh point), one probe per
    /// `circuit::PROBE_EVERY_MS` (across replicas) is let through with a single attempt
    /// (half-open), so recovery follows the partner's within about that interval (refresh-ahead
    /// runs at most every `REFRESH_RETRY_MS` per replica) rather than after the cool-down.
    async fn check_circuit(&self, tenant: &TenantId, want: Want) -> Result<Tries, BrokerError> {
        if matches!(want, Want::Fresh) {
            return Ok(Tries::WithRetries);
        }
        let now = now_ms();
        match self.circuits.state(tenant).await {
            Some(s) if s.is_open(now) => {
                // Rejected credentials wait for an admin, a partner's Retry-After is honoured;
                // any other failure is probed early (`IssuerError::probed_early`).
                let probing = !matches!(want, Want::Fresh) && s.last_error.probed_early();
                if probing && self.circuits.try_probe(tenant).await {
                    tracing::info!(tenant = %tenant, "circuit open and no usable token: probing the partner once");
                    return Ok(Tries::Once);
                }
                let retry_after = if probing {
                    (circuit::PROBE_EVERY_MS as u64).div_ceil(1000)
                } else {
                    s.retry_after_s(now)
                };
                Err(BrokerError::CircuitOpen {
                    retry_after,
                    last: s.last_error,
                })
            }
            _ => Ok(Tries::WithRetries),
        }
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

    /// Mints (refresh grant first when the last answer carried a refresh token), then writes
    /// the token to the shared cache (fenced: a later token wins), announces it and keeps it in L1.
    async fn mint_and_store(
        &self,
        tenant_id: &TenantId,
        prev: Option<&CachedToken>,
        tries: Tries,
    ) -> FlightResult {
        let tenant = self.tenant_for_mint(tenant_id).await?;
        let deadline_ms = now_ms() + self.timing.mint_budget.as_millis() as i64;
        let result = self
            .mint_at_partner(&tenant, prev, deadline_ms, tries)
            .await;
        self.record_outcome(tenant_id, &result).await;
        let token = Arc::new(CachedToken::from_minted(result?));
        let kept = match &self.l2 {
            Some(l2) => match l2.put(tenant_id, token.clone()).await {
                Ok(kept) => {
                    self.unshared.lock().expect("unshared").remove(tenant_id);
                    self.announce(Event::Minted, tenant_id).await;
                    kept
                }
                Err(e) => {
                    tracing::warn!(tenant = %tenant_id, error = %e, "minted token not shared: the shared cache is unavailable (written back when it answers)");
                    self.unshared
                        .lock()
                        .expect("unshared")
                        .insert(tenant_id.clone());
                    token
                }
            },
            None => token,
        };
        let kept = self.l1.insert_unless_newer(tenant_id, kept);
        self.metrics
            .set_token_expiry(tenant_id.as_str(), kept.expires_at_ms);
        Ok(kept)
    }

    /// Circuit and health bookkeeping after a mint (the pacer's own refusals are not failures).
    /// The health row is written off the caller's path: a database that is slow to take writes
    /// (a lock, a full disk) must not hold back a token the partner already gave.
    async fn record_outcome(&self, tenant: &TenantId, result: &Result<Minted, IssuerError>) {
        let health = match result {
            Ok(_) => {
                self.circuits.reset(tenant).await;
                self.metrics.mint_outcome(tenant.as_str(), true);
                None
            }
            Err(IssuerError::Paced { .. }) => return,
            Err(e) => {
                self.circuits.record_failure(tenant, e).await;
                self.metrics.mint_outcome(tenant.as_str(), false);
                Some((e.code(), e.to_string()))
            }
        };
        let (upstream, tenant) = (self.upstream.clone(), tenant.clone());
        tokio::spawn(async move {
            let error = health
                .as_ref()
                .map(|(code, detail)| (*code, detail.as_str()));
            upstream.record_health(&tenant, error).await;
        });
    }

    async fn mint_at_partner(
        &self,
        tenant: &Tenant,
        prev: Option<&CachedToken>,
        deadline_ms: i64,
        tries: Tries,
    ) -> Result<Minted, IssuerError> {
        let refresh = prev
            .and_then(|p| p.refresh_token.as_ref())
            .filter(|_| supports_refresh(tenant.issuer.kind));
        if let Some(rt) = refresh {
            match self
                .call_partner(tenant, Grant::Refresh(rt), deadline_ms, tries)
                .await
            {
                Ok(mut m) => {
                    // An answer without a refresh token keeps the old one usable.
                    m.refresh_token.get_or_insert_with(|| rt.clone());
                    return Ok(m);
                }
                Err(e) if e.is_invalid_grant() => {
                    tracing::info!(tenant = %tenant.id, error = %e, "refresh token refused; using the full grant");
                }
                Err(e) => return Err(e),
            }
        }
        self.call_partner(tenant, Grant::Initial, deadline_ms, tries)
            .await
    }

    /// One partner call with pacing, and retries with jittered exponential backoff for
    /// transient failures, all before `deadline_ms`. Rejections are never retried.
    async fn call_partner(
        &self,
        tenant: &Tenant,
        grant: Grant<'_>,
        deadline_ms: i64,
        tries: Tries,
    ) -> Result<Minted, IssuerError> {
        let retries = match tries {
            Tries::WithRetries => RETRIES,
            Tries::Once => 0,
        };
        let attempt_timeout = tenant
            .issuer
            .timeout_ms
            .map_or(self.timing.attempt_timeout, Duration::from_millis);
        let mut attempt = 0;
        let interval = tenant
            .issuer
            .min_interval_ms
            .unwrap_or(self.timing.default_min_interval_ms);
        let mut last_error = None;
        loop {
            if interval > 0 {
                if let Err(wait) = self.pacer.take(&tenant.id, interval, deadline_ms).await {
                    // A retry that finds no call slot in time reports what it retried.
                    return Err(last_error.unwrap_or(IssuerError::Paced {
                        retry_after: wait.as_secs().max(1),
                    }));
                }
            }
            let left = deadline_ms - now_ms();
            if left <= 0 {
                return Err(IssuerError::Timeout);
            }
            let timeout = attempt_timeout.min(Duration::from_millis(left as u64));
            let started = Instant::now();
            let result = self.upstream.mint(tenant, grant, timeout).await;
            let outcome = result.as_ref().map_or_else(IssuerError::outcome, |_| "ok");
            self.metrics
                .observe_upstream(tenant.id.as_str(), outcome, started.elapsed());
            match result {
                Err(e) if e.is_transient() && attempt < retries => {
                    let cap = 200i64 << attempt;
                    let backoff = 50 + rand::Rng::gen_range(&mut rand::thread_rng(), 0..=cap);
                    // Worth it only if a meaningful attempt still fits.
                    if now_ms() + backoff + 250 >= deadline_ms {
                        return Err(e);
                    }
                    tracing::info!(tenant = %tenant.id, attempt, backoff_ms = backoff, error = %e, "retrying the partner");
                    tokio::time::sleep(Duration::from_millis(backoff as u64)).await;
                    attempt += 1;
                    last_error = Some(e);
                }
                other => return other,
            }
        }
    }

    /// Mints now, whatever is cached (the admin dry run); the result replaces the cached token.
    pub async fn mint_now(self: &Arc<Self>, tenant: &TenantId) -> FlightResult {
        self.run_flight(tenant, Want::Fresh, &AtomicU8::new(PHASE_WORKING))
            .await
    }

    /// The tenant as the database has it, with its credentials. While the database cannot be
    /// reached, the last copy read (kept sealed in memory, opened only here) lets minting go
    /// on; a tenant the database says is gone is forgotten.
    async fn tenant_for_mint(&self, id: &TenantId) -> Result<Tenant, BrokerError> {
        // Bounded: a locked table, an exhausted pool or a stalled disk is an unavailable
        // database after `DB_READ_BOUND`, not a caller waiting for the lock to go.
        let read = tokio::time::timeout(DB_READ_BOUND, self.upstream.sealed_tenant(id))
            .await
            .unwrap_or(Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut)));
        match read {
            Ok(sealed) => {
                let tenant = self.upstream.open_tenant(&sealed)?;
                self.last_read.insert(id.clone(), Arc::new(sealed));
                Ok(tenant)
            }
            Err(StoreError::NotFound) => {
                self.last_read.invalidate(id);
                Err(BrokerError::TenantNotFound)
            }
            Err(e @ StoreError::Unavailable(_)) => match self.last_read.get(id) {
                Some(sealed) => {
                    tracing::warn!(tenant = %id, error = %e, "database unavailable: minting with the tenant's last known credentials");
                    Ok(self.upstream.open_tenant(&sealed)?)
                }
                None => Err(e.into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// A deleted tenant: `forget`, this replica's metric series, and the other replicas told
    /// (`x <replica> <tenant>`) so they drop theirs.
    pub async fn forget_deleted(self: &Arc<Self>, tenant: &TenantId) {
        self.forget(tenant).await;
        self.metrics.forget_tenant(tenant.as_str());
        self.announce(Event::Deleted, tenant).await;
    }

    /// Drops the tenant's cached token everywhere and closes its circuit (credential rotation,
    /// spec change, creation, deletion: what failed before may work now). Never fails: the
    /// change that called it is already committed. Here the token is gone at once; if Redis
    /// does not answer, dropping it there is retried in the background until it does.
    pub async fn forget(self: &Arc<Self>, tenant: &TenantId) {
        self.l1.invalidate(tenant);
        self.unshared.lock().expect("unshared").remove(tenant);
        self.last_read.invalidate(tenant);
        self.metrics.clear_token_expiry(tenant.as_str());
        if self.forget_shared(tenant).await {
            return;
        }
        tracing::warn!(tenant = %tenant, "shared cache unavailable: the cached token will be dropped there when it answers");
        let me = self.clone();
        let tenant = tenant.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(100);
            let give_up = Instant::now() + FORGET_RETRY_FOR;
            while Instant::now() < give_up {
                tokio::time::sleep(delay).await;
                me.l1.invalidate(&tenant);
                if me.forget_shared(&tenant).await {
                    tracing::info!(tenant = %tenant, "cached token dropped from the shared cache");
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            tracing::error!(tenant = %tenant, "could not drop the cached token from the shared cache; it expires by itself");
        });
    }

    /// Before a scrape: a tenant this replica saw failing whose shared circuit has since
    /// closed (another replica minted, an admin changed it) shows 0 again.
    pub async fn refresh_circuit_gauges(&self) {
        for raw in self.metrics.circuits_flagged() {
            let Ok(tenant) = TenantId::parse(&raw) else {
                continue;
            };
            if self
                .circuits
                .state(&tenant)
                .await
                .map_or(true, |s| s.failures == 0)
            {
                self.metrics.set_circuit_open(&raw, false);
            }
        }
    }

    /// Closes the circuit and drops the shared token; true when Redis took both.
    async fn forget_shared(&self, tenant: &TenantId) -> bool {
        self.circuits.reset(tenant).await;
        match &self.l2 {
            None => true,
            Some(l2) => match l2.remove(tenant).await {
                Ok(()) => {
                    self.announce(Event::Dropped, tenant).await;
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// A caller's report that the partner rejected `access_token`. A token that is not the
    /// current one is stale (nothing happens). The current token is dropped, unless it is
    /// younger than the tenant's minimum age (`invalidate_min_age_ms`, else 10 s or 5 % of
    /// its lifetime, whichever is longer) and a young token of this tenant was already
    /// dropped within that window, across replicas: a caller whose 401 has another cause
    /// then cannot make the broker mint in a loop. Concurrent reports of one token drop it
    /// once (compare-and-delete).
    pub async fn invalidate(
        &self,
        tenant: &TenantId,
        access_token: &str,
    ) -> Result<Invalidation, BrokerError> {
        let current = match &self.l2 {
            Some(l2) => match l2.get(tenant).await {
                Ok(t) => t,
                Err(_) => self.l1.get_held(tenant).map(|h| h.0),
            },
            None => self.l1.get_held(tenant).map(|h| h.0),
        };
        let reported = crate::cache::fingerprint(access_token);
        if let Some(token) = current.filter(|t| t.fingerprint() == reported) {
            let now = now_ms();
            let age = (now - token.issued_at_ms).max(0);
            let min_age = self.invalidate_min_age(tenant, &token).await;
            if age < min_age {
                let wait = self
                    .pacer
                    .try_take(tenant, "invalidate", min_age as u64)
                    .await;
                if wait > 0 {
                    let retry_ms = (wait as i64).min(min_age - age).max(1);
                    return Ok(Invalidation::Throttled {
                        age_s: (age / 1000) as u64,
                        window_s: ((min_age + 999) / 1000) as u64,
                        retry_after_s: ((retry_ms + 999) / 1000) as u64,
                    });
                }
            }
        }
        let mut dropped = self.l1.remove_if_current(tenant, access_token);
        if let Some(l2) = &self.l2 {
            match l2.remove_if_current(tenant, access_token).await {
                Ok(true) => {
                    dropped = true;
                    self.announce(Event::Dropped, tenant).await;
                }
                Ok(false) => {}
                // Dropped here; Redis keeps its copy until it takes writes again (or the token
                // expires): other replicas may serve it meanwhile.
                Err(CacheError::WriteRefused(why)) => {
                    tracing::warn!(tenant = %tenant, reason = %why, "rejected token dropped in this replica only: Redis refuses writes");
                    if dropped {
                        self.announce(Event::Dropped, tenant).await;
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(if dropped {
            Invalidation::Dropped
        } else {
            Invalidation::Stale
        })
    }

    /// The age below which a token of `tenant` is protected from repeated drops.
    async fn invalidate_min_age(&self, tenant: &TenantId, token: &CachedToken) -> i64 {
        let configured = match self.last_read.get(tenant) {
            Some(sealed) => sealed.record.issuer.invalidate_min_age_ms,
            None => match self.upstream.tenant_record(tenant).await {
                Ok(record) => record.issuer.invalidate_min_age_ms,
                Err(_) => None,
            },
        };
        match configured {
            Some(ms) => ms as i64,
            None => {
                let lifetime = (token.expires_at_ms - token.issued_at_ms).max(0);
                INVALIDATE_MIN_AGE_MS.max(lifetime / 20)
            }
        }
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
