//! The shared token cache in Redis (single node or Cluster). Values are sealed like the
//! credentials; keys carry the tenant as a hash tag (`{prefix}:{<tenant>}:token`) so every
//! script touching one tenant stays in one cluster slot. A key lives until the token's usable end.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine;
use redis::{RedisError, Script, Value};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::breaker::{Admit, Breaker};
pub use super::target::{RedisConn, Target};
use super::{fingerprint, CacheError, CachedToken, LockToken, Record, SharedCache, Slot};
use crate::crypto::KeyRing;
use crate::tenants::TenantId;
use crate::time::now_ms;
use futures_util::future::BoxFuture;

#[derive(Serialize, Deserialize)]
struct Stored {
    a: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
    i: i64,
    e: i64,
    u: i64,
    f: i64,
    /// The thumbprint of the DPoP key the token is bound to (RFC 9449).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
}

impl Drop for Stored {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.a);
        if let Some(r) = &mut self.r {
            zeroize::Zeroize::zeroize(r);
        }
    }
}

const TOKEN_FIELD: &str = "cached_token";

/// Compare-and-delete on the token key: drop it only if its fingerprint matches.
const REMOVE_IF: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.match(v, '^%-?%d+:(%x+):') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0";

/// Fenced write: keep whichever token's mint started later (its trailing issued-at; a value
/// written before that field existed: whichever expires later); returns the kept value if it
/// is not ours.
const PUT_UNLESS_NEWER: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local iss = tonumber(string.match(cur, ':(%d+)$'))
  if iss then
    if iss > tonumber(ARGV[4]) then
      return cur
    end
  else
    local exp = tonumber(string.match(cur, '^(%-?%d+):'))
    if exp and exp > tonumber(ARGV[2]) then
      return cur
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return false";

/// Pacing: take the slot if free, else report how long until it frees.
const TAKE_SLOT: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return 0
end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then return 1 end
return left";

/// Owner-only lock release.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Owner-only lock extension: 1 if still ours (and extended), 0 if lost.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// How long a mint lock lives unless its holder extends it: short, so a holder that died is
/// replaced within this, while a live holder extends it every `LOCK_TTL / 4`.
pub const LOCK_TTL: Duration = Duration::from_millis(2_000);

/// The shared cache, mint lock and event channel.
#[derive(Clone)]
pub struct RedisCache {
    conn: RedisConn,
    prefix: Arc<str>,
    keys: Arc<KeyRing>,
    timeout: Duration,
    breaker: Arc<Breaker>,
    /// When the view of other replicas' writes last had a gap (a lost subscription, an
    /// outage): tokens held in memory from before it are re-checked here on next use.
    gap_at: Arc<AtomicI64>,
    /// When Redis last refused a write (unix ms; 0: never), to log it once in a while.
    writes_refused_at: Arc<AtomicI64>,
    up: Option<prometheus::IntGauge>,
    remove_if: Arc<Script>,
    put_unless_newer: Arc<Script>,
    release: Arc<Script>,
    extend: Arc<Script>,
    take_slot: Arc<Script>,
}

impl RedisCache {
    /// `up` is set to 0 while any slot is failing, 1 otherwise.
    pub fn new(
        conn: RedisConn,
        prefix: &str,
        keys: Arc<KeyRing>,
        timeout: Duration,
        up: Option<prometheus::IntGauge>,
    ) -> Self {
        if let Some(g) = &up {
            g.set(1);
        }
        Self {
            conn,
            prefix: Arc::from(prefix),
            keys,
            timeout,
            breaker: Arc::new(Breaker::new()),
            gap_at: Arc::new(AtomicI64::new(0)),
            writes_refused_at: Arc::new(AtomicI64::new(0)),
            up,
            remove_if: Arc::new(Script::new(REMOVE_IF)),
            put_unless_newer: Arc::new(Script::new(PUT_UNLESS_NEWER)),
            release: Arc::new(Script::new(RELEASE)),
            extend: Arc::new(Script::new(EXTEND)),
            take_slot: Arc::new(Script::new(TAKE_SLOT)),
        }
    }

    /// The pub/sub channel replicas tell each other about token changes on.
    pub fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Tells every replica that `tenant`'s shared token changed.
    pub async fn publish(&self, tenant: &TenantId, event: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.slot_of(tenant),
            redis::cmd("PUBLISH")
                .arg(self.events_channel())
                .arg(event)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// `{prefix}:{<tenant>}:<what>`.
    pub fn key(&self, tenant: &TenantId, what: &str) -> String {
        format!("{}:{{{}}}:{}", self.prefix, tenant, what)
    }

    fn is_cluster(&self) -> bool {
        matches!(self.conn, RedisConn::Cluster(_))
    }

    /// The cluster slot of the tenant's keys (0 on a single node: one breaker for all).
    pub fn slot_of(&self, tenant: &TenantId) -> u16 {
        self.slot_of_tag(tenant.as_str())
    }

    fn slot_of_tag(&self, tag: &str) -> u16 {
        if self.is_cluster() {
            redis::cluster_routing::get_slot(tag.as_bytes())
        } else {
            0
        }
    }

    /// A hash tag whose keys land in `start..=end` (any tag on a single node).
    fn tag_for(&self, start: u16, end: u16) -> String {
        if self.is_cluster() {
            tag_in_range(start, end)
        } else {
            "readyz".to_owned()
        }
    }

    /// One real key operation on the slot of `tag`: a short-lived write, through the breaker.
    async fn probe(&self, tag: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.slot_of_tag(tag),
            redis::cmd("SET")
                .arg(format!("{}:{{{tag}}}:readyz", self.prefix))
                .arg("1")
                .arg("PX")
                .arg(5_000)
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Marks a gap in what this replica knows of other replicas' writes.
    pub fn mark_gap(&self) {
        self.gap_at.store(now_ms(), Ordering::Relaxed);
    }

    /// When the last gap was (unix ms).
    pub fn gap_at(&self) -> i64 {
        self.gap_at.load(Ordering::Relaxed)
    }

    /// Whether the tenant's slot is down beyond doubt (see `breaker::CONFIRM_MS`): only then
    /// is a mint without the cross-replica lock worth its risk of a duplicate.
    pub fn outage_confirmed_for(&self, tenant: &TenantId) -> bool {
        self.breaker.outage_confirmed(self.slot_of(tenant))
    }

    /// Whether every slot answered its last call.
    pub fn is_healthy(&self) -> bool {
        self.breaker.is_healthy()
    }

    /// Runs one call for `slot` under the breaker and the per-call timeout.
    ///
    /// Long because the breaker's three states (closed, one probe, open) and the timeout
    /// are around one call together, so every way out updates the breaker.
    async fn timed<T>(
        &self,
        slot: u16,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, CacheError> {
        let admit = self.breaker.admit(slot);
        if admit == Admit::Refuse {
            return Err(CacheError::Unavailable(RedisError::from((
                redis::ErrorKind::IoError,
                "known to be unavailable (waiting for the next probe)",
            ))));
        }
        // A probe abandoned mid-way (its caller went away) must not block the next one.
        let mut guard = ProbeGuard {
            breaker: &self.breaker,
            slot,
            armed: admit == Admit::Probe,
        };
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::from((redis::ErrorKind::IoError, "timed out"))),
        };
        guard.armed = false;
        match result {
            Ok(v) => {
                if self.breaker.success(slot) {
                    tracing::info!(slot, "Redis answers again");
                    self.mark_gap();
                    self.set_up();
                }
                Ok(v)
            }
            // A script or type error is a bug, not an outage: it does not open the breaker.
            Err(e) if e.kind() == redis::ErrorKind::TypeError => Err(CacheError::Unavailable(e)),
            // Redis answers but will not take a write: reads still work, so the breaker stays
            // closed (opening it would block them too, and each read that worked would close
            // it again). A read-only node may be a demoted primary: look for the new one.
            Err(e) if refuses_writes(&e) => {
                if e.kind() == redis::ErrorKind::ReadOnly {
                    self.conn.suspect();
                }
                let why = describe(&e);
                let now = now_ms();
                if self.writes_refused_at.swap(now, Ordering::Relaxed) < now - 5_000 {
                    tracing::warn!(slot, reason = %why, "Redis refuses writes: tokens are served and minted without the shared cache's lock until it takes them again");
                }
                Err(CacheError::WriteRefused(why))
            }
            Err(e) => {
                let definitive = e.is_connection_refusal()
                    || e.is_connection_dropped()
                    || matches!(
                        e.kind(),
                        redis::ErrorKind::ReadOnly
                            | redis::ErrorKind::ClusterDown
                            | redis::ErrorKind::MasterDown
                    );
                if self
                    .breaker
                    .failure(slot, &describe(&e), definitive || admit == Admit::Probe)
                {
                    tracing::warn!(slot, error = %e, "Redis call failed: calls for this slot fail fast until a probe succeeds");
                    self.set_up();
                }
                self.conn.suspect();
                Err(CacheError::Unavailable(e))
            }
        }
    }

    /// Keeps the breaker true on a replica that gets no traffic: every slot that is down is
    /// probed every `PROBE_EVERY_MS` (so it is found healthy again), and while all is healthy
    /// the readiness check runs every `WATCH_EVERY` ticks (so an outage is noticed, and
    /// `broker_dependency_up` says so, without a request to notice it). One task per cache,
    /// started with it; it ends when every other handle is dropped.
    pub fn start_prober(&self) -> tokio::task::JoinHandle<()> {
        const WATCH_EVERY: u32 = 20; // ticks of PROBE_EVERY_MS: 5 s
        let me = self.clone();
        tokio::spawn(async move {
            let mut tags: std::collections::HashMap<u16, String> = Default::default();
            let mut tick = 0u32;
            // Only this task holds the breaker: the cache is gone.
            while Arc::strong_count(&me.breaker) > 1 {
                tokio::time::sleep(Duration::from_millis(super::breaker::PROBE_EVERY_MS as u64))
                    .await;
                tick = tick.wrapping_add(1);
                if me.breaker.is_healthy() {
                    if tick % WATCH_EVERY == 0 {
                        let _ = me.check().await;
                    }
                    continue;
                }
                for d in me.breaker.down_slots() {
                    let tag = tags
                        .entry(d.slot)
                        .or_insert_with(|| me.tag_for(d.slot, d.slot));
                    tracing::trace!(slot = d.slot, "probing Redis");
                    let _ = me.probe(tag).await;
                }
            }
        })
    }

    fn set_up(&self) {
        if let Some(g) = &self.up {
            g.set(i64::from(self.breaker.is_healthy()));
        }
    }

    fn encode(&self, tenant: &TenantId, t: &CachedToken) -> String {
        let stored = Stored {
            a: t.access_token.expose_secret().to_owned(),
            r: t.refresh_token
                .as_ref()
                .map(|r| r.expose_secret().to_owned()),
            i: t.issued_at_ms,
            e: t.expires_at_ms,
            u: t.usable_until_ms,
            f: t.refresh_at_ms,
            d: t.dpop_jkt.clone(),
        };
        let json = Zeroizing::new(serde_json::to_vec(&stored).expect("serialises"));
        let sealed = self.keys.seal(tenant.as_str(), TOKEN_FIELD, &json);
        // `<expires>:<fingerprint>:<sealed>:<issued>`: the fenced write orders tokens by when
        // their mint started (the trailing field), the expiry prefix stays for older readers.
        format!(
            "{}:{}:{}:{}",
            t.expires_at_ms,
            t.fingerprint(),
            B64.encode(sealed),
            t.issued_at_ms.max(0)
        )
    }

    fn decode(&self, tenant: &TenantId, raw: &str) -> Option<CachedToken> {
        // `<expires>:<fingerprint>:<sealed>[:<issued>]` (the issued field since fencing by order).
        let mut parts = raw.splitn(4, ':');
        let (_exp, _fp, b64) = (parts.next()?, parts.next()?, parts.next()?);
        let sealed = B64.decode(b64).ok()?;
        let json = match self.keys.open(tenant.as_str(), TOKEN_FIELD, &sealed) {
            Ok(j) => j,
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "cached token does not open; treating as a miss");
                return None;
            }
        };
        let mut s: Stored = serde_json::from_slice(&json).ok()?;
        // Move the secrets out (what is left behind is wiped by Stored's Drop).
        Some(CachedToken {
            access_token: SecretString::from(std::mem::take(&mut s.a)),
            refresh_token: s.r.take().map(SecretString::from),
            issued_at_ms: s.i,
            expires_at_ms: s.e,
            usable_until_ms: s.u,
            refresh_at_ms: s.f,
            dpop_jkt: s.d.take(),
            audit_fp: Default::default(),
            memo: Default::default(),
        })
    }
}

/// Frees the breaker's probe slot when a probe's future is dropped before it finished.
struct ProbeGuard<'a> {
    breaker: &'a Breaker,
    slot: u16,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.probe_abandoned(self.slot);
        }
    }
}

/// Whether Redis refused a write it was able to read for: out of memory under `maxmemory`
/// with `noeviction`, a failed background save (`MISCONF`), a read-only replica, too few
/// replicas for `min-replicas-to-write`.
fn refuses_writes(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::ReadOnly
        || matches!(
            e.code(),
            Some("OOM" | "MISCONF" | "NOREPLICAS" | "READONLY")
        )
}

/// A short, secret-free description of a Redis failure, for readiness reports.
fn describe(e: &RedisError) -> String {
    if e.is_timeout() || e.to_string().contains("timed out") {
        "timed out".into()
    } else if e.is_connection_refusal() {
        "connection refused".into()
    } else if e.is_connection_dropped() || e.is_io_error() {
        "connection lost".into()
    } else {
        match e.kind() {
            redis::ErrorKind::ReadOnly => "read-only replica".into(),
            redis::ErrorKind::ClusterDown => "cluster down".into(),
            redis::ErrorKind::MasterDown => "primary down".into(),
            redis::ErrorKind::BusyLoadingError => "loading".into(),
            redis::ErrorKind::TryAgain => "resharding".into(),
            redis::ErrorKind::AuthenticationFailed => "authentication failed".into(),
            _ => e.code().unwrap_or("error").to_ascii_lowercase(),
        }
    }
}

impl RedisCache {
    /// The tenant's token, if one is held (and opens).
    pub async fn get(&self, tenant: &TenantId) -> Result<Option<Arc<CachedToken>>, CacheError> {
        let mut conn = self.conn.clone();
        let key = self.key(tenant, "token");
        let raw: Option<String> = self
            .timed(
                self.slot_of(tenant),
                redis::cmd("GET").arg(&key).query_async(&mut conn),
            )
            .await?;
        Ok(raw
            .map(Zeroizing::new)
            .and_then(|r| self.decode(tenant, &r))
            .map(Arc::new))
    }

    /// Stores `token` until its usable end unless the held one expires later (a writer that
    /// stalled past its lock must not overwrite a newer token); returns the token kept.
    pub async fn put(
        &self,
        tenant: &TenantId,
        token: Arc<CachedToken>,
    ) -> Result<Arc<CachedToken>, CacheError> {
        let ttl = token.usable_until_ms - now_ms();
        if ttl <= 0 {
            return Ok(token);
        }
        let mut conn = self.conn.clone();
        let value = Zeroizing::new(self.encode(tenant, &token));
        let kept: Option<String> = self
            .timed(
                self.slot_of(tenant),
                self.put_unless_newer
                    .key(self.key(tenant, "token"))
                    .arg(value.as_str())
                    .arg(token.expires_at_ms)
                    .arg(ttl)
                    .arg(token.issued_at_ms)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(match kept.map(Zeroizing::new) {
            Some(raw) => self.decode(tenant, &raw).map(Arc::new).unwrap_or(token),
            None => token,
        })
    }

    /// Drops the tenant's token.
    pub async fn remove(&self, tenant: &TenantId) -> Result<(), CacheError> {
        self.delete_key(tenant, "token").await
    }

    /// Drops the tenant's token only if it is still `access_token`; true if dropped.
    pub async fn remove_if_current(
        &self,
        tenant: &TenantId,
        access_token: &str,
    ) -> Result<bool, CacheError> {
        let mut conn = self.conn.clone();
        let dropped: i64 = self
            .timed(
                self.slot_of(tenant),
                self.remove_if
                    .key(self.key(tenant, "token"))
                    .arg(fingerprint(access_token))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(dropped == 1)
    }

    /// A readiness check made of real key operations: a short-lived write to every primary
    /// (each slot range of a cluster). Its outcome feeds the breaker like any other call.
    /// `Err` names what fails, e.g. `slot 5461 unreachable (timed out)`.
    pub async fn check(&self) -> Result<(), String> {
        let ranges: Vec<(u16, u16)> = match &self.conn {
            RedisConn::Cluster(c) => {
                let mut conn = c.clone();
                let slots = tokio::time::timeout(
                    self.timeout.max(Duration::from_millis(500)),
                    redis::cmd("CLUSTER")
                        .arg("SLOTS")
                        .query_async::<Value>(&mut conn),
                )
                .await;
                match slots {
                    Ok(Ok(v)) => {
                        let ranges = slot_ranges(&v);
                        if let Some(hole) = first_uncovered(&ranges) {
                            return Err(format!("slot {hole} not served by any node"));
                        }
                        one_range_per_primary(&ranges)
                    }
                    Ok(Err(e)) => return Err(format!("cluster unreachable ({})", describe(&e))),
                    Err(_) => return Err("cluster unreachable (timed out)".into()),
                }
            }
            _ => vec![(0, 0)],
        };
        let probes = ranges.iter().map(|&(start, end)| async move {
            (start, self.probe(&self.tag_for(start, end)).await)
        });
        let mut refused = None;
        for (start, result) in futures_util::future::join_all(probes).await {
            match result {
                Err(CacheError::Unavailable(e)) => {
                    let what = if self.is_cluster() {
                        format!("slot {start} unreachable")
                    } else {
                        "unreachable".to_owned()
                    };
                    return Err(format!("unavailable: {what} ({})", describe(&e)));
                }
                Err(CacheError::WriteRefused(why)) => refused = Some(why),
                Ok(()) => {}
            }
        }
        // A slot that failed a real call and has not been probed since is still reported.
        if let Some(d) = self.breaker.down_slots().first() {
            return Err(if self.is_cluster() {
                format!("unavailable: slot {} unreachable ({})", d.slot, d.reason)
            } else {
                format!("unavailable: unreachable ({})", d.reason)
            });
        }
        match refused {
            Some(why) => Err(format!("refuses writes ({why})")),
            None => Ok(()),
        }
    }

    /// Nodes of the cluster as the cluster itself reports them (for the event listener).
    pub async fn cluster_nodes(&self) -> Vec<String> {
        let RedisConn::Cluster(c) = &self.conn else {
            return Vec::new();
        };
        let mut conn = c.clone();
        match tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut conn),
        )
        .await
        {
            Ok(Ok(v)) => slot_nodes(&v),
            _ => Vec::new(),
        }
    }
}

impl RedisCache {
    /// A small record under `{prefix}:{<tenant>}:<what>` (circuit state).
    pub async fn get_record(
        &self,
        tenant: &TenantId,
        what: &str,
    ) -> Result<Option<String>, CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.slot_of(tenant),
            redis::cmd("GET")
                .arg(self.key(tenant, what))
                .query_async(&mut conn),
        )
        .await
    }

    pub async fn set_record(
        &self,
        tenant: &TenantId,
        what: &str,
        value: &str,
        ttl_ms: i64,
    ) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.slot_of(tenant),
            redis::cmd("SET")
                .arg(self.key(tenant, what))
                .arg(value)
                .arg("PX")
                .arg(ttl_ms.max(1))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    pub async fn delete_key(&self, tenant: &TenantId, what: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.slot_of(tenant),
            redis::cmd("DEL")
                .arg(self.key(tenant, what))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Takes a slot of the tenant's `what` (`pace`, `probe`) that frees after `interval_ms`:
    /// 0 if taken, else ms until it frees.
    pub async fn take_slot(
        &self,
        tenant: &TenantId,
        what: &str,
        interval_ms: u64,
    ) -> Result<u64, CacheError> {
        let mut conn = self.conn.clone();
        let wait: i64 = self
            .timed(
                self.slot_of(tenant),
                self.take_slot
                    .key(self.key(tenant, what))
                    .arg(interval_ms.max(1))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(wait.max(0) as u64)
    }

    /// Takes the tenant's mint lock if it is free (`SET NX PX` with a random value). It lives
    /// `LOCK_TTL` unless extended.
    pub async fn try_acquire(&self, tenant: &TenantId) -> Result<Option<LockToken>, CacheError> {
        let value = crate::crypto::random_hex::<16>();
        let mut conn = self.conn.clone();
        let ok: Option<String> = self
            .timed(
                self.slot_of(tenant),
                redis::cmd("SET")
                    .arg(self.key(tenant, "lock"))
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(LOCK_TTL.as_millis() as u64)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(ok.map(|_| LockToken {
            tenant: tenant.clone(),
            value,
        }))
    }

    /// Extends the lock by `LOCK_TTL` if it is still ours; false if it was lost.
    pub async fn extend(&self, lock: &LockToken) -> Result<bool, CacheError> {
        let mut conn = self.conn.clone();
        let kept: i64 = self
            .timed(
                self.slot_of(&lock.tenant),
                self.extend
                    .key(self.key(&lock.tenant, "lock"))
                    .arg(&lock.value)
                    .arg(LOCK_TTL.as_millis() as u64)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(kept == 1)
    }

    /// Releases the lock only if it is still ours (it may have expired and been taken over).
    pub async fn release(&self, lock: LockToken) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.slot_of(&lock.tenant),
            self.release
                .key(self.key(&lock.tenant, "lock"))
                .arg(&lock.value)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(|_| ())
    }
}

impl SharedCache for RedisCache {
    fn get<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<Arc<CachedToken>>, CacheError>> {
        Box::pin(RedisCache::get(self, tenant))
    }
    fn put<'a>(
        &'a self,
        tenant: &'a TenantId,
        token: Arc<CachedToken>,
    ) -> BoxFuture<'a, Result<Arc<CachedToken>, CacheError>> {
        Box::pin(RedisCache::put(self, tenant, token))
    }
    fn remove<'a>(&'a self, tenant: &'a TenantId) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(RedisCache::remove(self, tenant))
    }
    fn remove_if_current<'a>(
        &'a self,
        tenant: &'a TenantId,
        access_token: &'a str,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(RedisCache::remove_if_current(self, tenant, access_token))
    }
    fn publish<'a>(
        &'a self,
        tenant: &'a TenantId,
        event: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(RedisCache::publish(self, tenant, event))
    }
    fn get_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
    ) -> BoxFuture<'a, Result<Option<String>, CacheError>> {
        Box::pin(RedisCache::get_record(self, tenant, what.as_str()))
    }
    fn set_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
        value: String,
        ttl_ms: i64,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            RedisCache::set_record(self, tenant, what.as_str(), &value, ttl_ms).await
        })
    }
    fn delete_record<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Record,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(RedisCache::delete_key(self, tenant, what.as_str()))
    }
    fn take_slot<'a>(
        &'a self,
        tenant: &'a TenantId,
        what: Slot,
        interval_ms: u64,
    ) -> BoxFuture<'a, Result<u64, CacheError>> {
        Box::pin(RedisCache::take_slot(
            self,
            tenant,
            what.as_str(),
            interval_ms,
        ))
    }
    fn try_acquire<'a>(
        &'a self,
        tenant: &'a TenantId,
    ) -> BoxFuture<'a, Result<Option<LockToken>, CacheError>> {
        Box::pin(RedisCache::try_acquire(self, tenant))
    }
    fn extend<'a>(&'a self, lock: &'a LockToken) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(RedisCache::extend(self, lock))
    }
    fn release(&self, lock: LockToken) -> BoxFuture<'_, Result<(), CacheError>> {
        Box::pin(RedisCache::release(self, lock))
    }
    fn gap_at(&self) -> i64 {
        RedisCache::gap_at(self)
    }
    fn outage_confirmed_for(&self, tenant: &TenantId) -> bool {
        RedisCache::outage_confirmed_for(self, tenant)
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(RedisCache::check(self))
    }
}

/// `(start, end, primary)` of every slot range in a `CLUSTER SLOTS` answer, by start.
fn slot_ranges(v: &Value) -> Vec<(u16, u16, String)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out: Vec<(u16, u16, String)> = items
        .iter()
        .filter_map(|item| match item {
            Value::Array(parts) => match (parts.first(), parts.get(1)) {
                (Some(Value::Int(a)), Some(Value::Int(b))) => Some((
                    *a as u16,
                    *b as u16,
                    parts.get(2).and_then(node_url).unwrap_or_default(),
                )),
                _ => None,
            },
            _ => None,
        })
        .collect();
    out.sort_unstable();
    out
}

/// `redis://host:port` of one node entry (`[host, port, id, …]`) of `CLUSTER SLOTS`.
fn node_url(node: &Value) -> Option<String> {
    let Value::Array(n) = node else { return None };
    let host = match n.first()? {
        Value::BulkString(h) => String::from_utf8_lossy(h).into_owned(),
        Value::SimpleString(h) => h.clone(),
        _ => return None,
    };
    match n.get(1)? {
        Value::Int(port) if !host.is_empty() => Some(format!("redis://{host}:{port}")),
        _ => None,
    }
}

/// The largest range of each primary: one probe per primary covers the cluster.
fn one_range_per_primary(ranges: &[(u16, u16, String)]) -> Vec<(u16, u16)> {
    let mut best: std::collections::BTreeMap<&str, (u16, u16)> = Default::default();
    for (a, b, primary) in ranges {
        let e = best.entry(primary.as_str()).or_insert((*a, *b));
        if b - a > e.1 - e.0 {
            *e = (*a, *b);
        }
    }
    best.into_values().collect()
}

/// The `redis://host:port` of every node (primaries and replicas) in a `CLUSTER SLOTS` answer.
fn slot_nodes(v: &Value) -> Vec<String> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for item in items {
        let Value::Array(parts) = item else { continue };
        for url in parts.iter().skip(2).filter_map(node_url) {
            if !out.contains(&url) {
                out.push(url);
            }
        }
    }
    out
}

/// The first slot no range covers, if any.
fn first_uncovered(sorted: &[(u16, u16, String)]) -> Option<u16> {
    let mut next: u32 = 0;
    for &(a, b, _) in sorted {
        if u32::from(a) > next {
            return Some(next as u16);
        }
        next = next.max(u32::from(b) + 1);
    }
    (next < 16_384).then_some(next as u16)
}

/// A hash tag whose slot lies in `start..=end`.
fn tag_in_range(start: u16, end: u16) -> String {
    (0u32..)
        .map(|i| format!("readyz-{i}"))
        .find(|t| (start..=end).contains(&redis::cluster_routing::get_slot(t.as_bytes())))
        .expect("some tag lands in every non-empty range")
}

/// Subscribes to the events channel and hands every message to `on_event`. Reconnects by
/// itself through any node it knows (the configured ones and, for a cluster, those the
/// cluster reports; for Sentinel, the current primary). A lost subscription is a gap (writes
/// by other replicas may go unseen) at the loss and again once it stands again: tokens held
/// from before either are re-checked on their next use.
///
/// Long because it is the listener's loop: connect through any node, subscribe, report gaps,
/// back off.
pub fn spawn_listener(
    target: Target,
    cache: RedisCache,
    on_event: impl Fn(&str) + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let channel = cache.events_channel();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(50);
        let mut first = true;
        let mut known: Vec<String> = match &target {
            Target::Cluster(nodes) => nodes.clone(),
            _ => Vec::new(),
        };
        let mut next = 0usize;
        loop {
            let client = match target.events_client().await {
                Some(client) => client,
                None => {
                    next = next.wrapping_add(1);
                    redis::Client::open(known[next % known.len()].as_str())
                }
            };
            let mut subscribed = false;
            let result: Result<(), RedisError> = async {
                let mut pubsub =
                    tokio::time::timeout(Duration::from_secs(1), client?.get_async_pubsub())
                        .await
                        .map_err(|_| {
                            RedisError::from((redis::ErrorKind::IoError, "connect timed out"))
                        })??;
                pubsub.subscribe(&channel).await?;
                subscribed = true;
                if !first {
                    tracing::info!("redis event subscription restored");
                    cache.mark_gap();
                }
                first = false;
                delay = Duration::from_millis(50);
                for n in cache.cluster_nodes().await {
                    if !known.contains(&n) {
                        known.push(n);
                    }
                }
                let mut messages = pubsub.on_message();
                while let Some(msg) = futures_util::StreamExt::next(&mut messages).await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        on_event(&payload);
                    }
                }
                Ok(())
            }
            .await;
            match result {
                Err(e) => {
                    tracing::debug!(error = %e, "redis event subscription not possible yet; trying the next node")
                }
                Ok(()) => tracing::warn!("redis event subscription lost; reconnecting"),
            }
            // Failed attempts to subscribe again change nothing: only a lost one is a gap.
            if subscribed {
                cache.mark_gap();
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncovered_slots_are_found() {
        let r = |a, b| (a, b, String::new());
        assert_eq!(
            first_uncovered(&[r(0, 5460), r(5461, 10922), r(10923, 16383)]),
            None
        );
        assert_eq!(first_uncovered(&[r(0, 5460), r(10923, 16383)]), Some(5461));
        assert_eq!(first_uncovered(&[r(0, 100)]), Some(101));
        assert_eq!(first_uncovered(&[]), Some(0));
        let p = |a, b, n: &str| (a, b, n.to_owned());
        assert_eq!(
            one_range_per_primary(&[p(0, 10, "a"), p(11, 5000, "b"), p(5001, 9000, "a")]),
            vec![(5001, 9000), (11, 5000)]
        );
    }

    #[test]
    fn a_tag_is_found_in_any_range() {
        for (a, b) in [(0, 5460), (5461, 10922), (16383, 16383), (100, 100)] {
            let slot = redis::cluster_routing::get_slot(tag_in_range(a, b).as_bytes());
            assert!((a..=b).contains(&slot));
        }
    }
}
