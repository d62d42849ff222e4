//! The shared token cache in Redis (single node or Cluster). Values are sealed like the
//! credentials; keys carry the tenant as a hash tag (`{prefix}:{<tenant>}:token`) so every
//! script touching one tenant stays in one cluster slot. A key lives until the token's usable end.

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use base64::Engine;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Script, Value};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{fingerprint, CacheError, CachedToken, LockToken};
use crate::crypto::KeyRing;
use crate::tenants::TenantId;
use crate::time::now_ms;

/// One connection type for a single Redis and for Redis Cluster.
#[derive(Clone)]
pub enum RedisConn {
    Single(Box<ConnectionManager>),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConn {
    /// Connects to `url`; a comma-separated list of node URLs selects cluster mode.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, RedisError> {
        let nodes: Vec<&str> = url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        if nodes.len() > 1 {
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(timeout.max(Duration::from_secs(1)))
                .response_timeout(timeout)
                .build()?;
            Ok(Self::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(timeout.max(Duration::from_secs(1)))
                .set_response_timeout(timeout)
                .set_number_of_retries(2)
                .set_max_delay(1000);
            Ok(Self::Single(Box::new(
                ConnectionManager::new_with_config(client, config).await?,
            )))
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Stored {
    a: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    r: Option<String>,
    i: i64,
    e: i64,
    u: i64,
    f: i64,
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

/// Fenced write: keep whichever token expires later; returns the kept value if it is not ours.
const PUT_UNLESS_NEWER: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local exp = tonumber(string.match(cur, '^(%-?%d+):'))
  if exp and exp > tonumber(ARGV[2]) then
    return cur
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

/// The shared cache, mint lock and event channel.
#[derive(Clone)]
pub struct RedisCache {
    conn: RedisConn,
    prefix: Arc<str>,
    keys: Arc<KeyRing>,
    timeout: Duration,
    lock_ttl: Duration,
    remove_if: Arc<Script>,
    put_unless_newer: Arc<Script>,
    release: Arc<Script>,
    take_slot: Arc<Script>,
}

impl RedisCache {
    /// `lock_ttl` must outlast a partner call (the upstream timeout plus a margin).
    pub fn new(
        conn: RedisConn,
        prefix: &str,
        keys: Arc<KeyRing>,
        timeout: Duration,
        lock_ttl: Duration,
    ) -> Self {
        Self {
            conn,
            prefix: Arc::from(prefix),
            keys,
            timeout,
            lock_ttl,
            remove_if: Arc::new(Script::new(REMOVE_IF)),
            put_unless_newer: Arc::new(Script::new(PUT_UNLESS_NEWER)),
            release: Arc::new(Script::new(RELEASE)),
            take_slot: Arc::new(Script::new(TAKE_SLOT)),
        }
    }

    /// The pub/sub channel replicas tell each other about token changes on.
    pub fn events_channel(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Tells every replica that `tenant`'s shared token changed.
    pub async fn publish(&self, event: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
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

    async fn timed<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, CacheError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r.map_err(CacheError::Unavailable),
            Err(_) => Err(CacheError::Unavailable(RedisError::from((
                redis::ErrorKind::IoError,
                "timed out",
            )))),
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
        };
        let json = Zeroizing::new(serde_json::to_vec(&stored).expect("serialises"));
        let sealed = self.keys.seal(tenant.as_str(), TOKEN_FIELD, &json);
        format!(
            "{}:{}:{}",
            t.expires_at_ms,
            t.fingerprint(),
            B64.encode(sealed)
        )
    }

    fn decode(&self, tenant: &TenantId, raw: &str) -> Option<CachedToken> {
        let mut parts = raw.splitn(3, ':');
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
            audit_fp: Default::default(),
            memo: Default::default(),
        })
    }
}

impl RedisCache {
    /// The tenant's token, if one is held (and opens).
    pub async fn get(&self, tenant: &TenantId) -> Result<Option<Arc<CachedToken>>, CacheError> {
        let mut conn = self.conn.clone();
        let key = self.key(tenant, "token");
        let raw: Option<String> = self
            .timed(redis::cmd("GET").arg(&key).query_async(&mut conn))
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
                self.put_unless_newer
                    .key(self.key(tenant, "token"))
                    .arg(value.as_str())
                    .arg(token.expires_at_ms)
                    .arg(ttl)
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
        let mut conn = self.conn.clone();
        self.timed(
            redis::cmd("DEL")
                .arg(self.key(tenant, "token"))
                .query_async::<()>(&mut conn),
        )
        .await
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
                self.remove_if
                    .key(self.key(tenant, "token"))
                    .arg(fingerprint(access_token))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(dropped == 1)
    }

    pub async fn ping(&self) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(redis::cmd("PING").query_async::<()>(&mut conn))
            .await
    }
}

impl RedisCache {
    /// A small JSON record under `{prefix}:{<tenant>}:<what>` (circuit state).
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        tenant: &TenantId,
        what: &str,
    ) -> Result<Option<T>, CacheError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = self
            .timed(
                redis::cmd("GET")
                    .arg(self.key(tenant, what))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    pub async fn set_json<T: Serialize>(
        &self,
        tenant: &TenantId,
        what: &str,
        value: &T,
        ttl_ms: i64,
    ) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            redis::cmd("SET")
                .arg(self.key(tenant, what))
                .arg(serde_json::to_string(value).expect("serialises"))
                .arg("PX")
                .arg(ttl_ms.max(1))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    pub async fn delete_key(&self, tenant: &TenantId, what: &str) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            redis::cmd("DEL")
                .arg(self.key(tenant, what))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Takes the tenant's next partner-call slot: 0 if taken, else ms until it frees.
    pub async fn take_slot(&self, tenant: &TenantId, interval_ms: u64) -> Result<u64, CacheError> {
        let mut conn = self.conn.clone();
        let wait: i64 = self
            .timed(
                self.take_slot
                    .key(self.key(tenant, "pace"))
                    .arg(interval_ms)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(wait.max(0) as u64)
    }

    /// Takes the tenant's mint lock if it is free (`SET NX PX` with a random value).
    pub async fn try_acquire(&self, tenant: &TenantId) -> Result<Option<LockToken>, CacheError> {
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
        let value = hex::encode(raw);
        let mut conn = self.conn.clone();
        let ok: Option<String> = self
            .timed(
                redis::cmd("SET")
                    .arg(self.key(tenant, "lock"))
                    .arg(&value)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.lock_ttl.as_millis() as u64)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(ok.map(|_| LockToken {
            tenant: tenant.clone(),
            value,
        }))
    }

    /// Releases the lock only if it is still ours (it may have expired and been taken over).
    pub async fn release(&self, lock: LockToken) -> Result<(), CacheError> {
        let mut conn = self.conn.clone();
        self.timed(
            self.release
                .key(self.key(&lock.tenant, "lock"))
                .arg(&lock.value)
                .invoke_async::<i64>(&mut conn),
        )
        .await
        .map(|_| ())
    }
}

/// Subscribes to the events channel and hands every message to `on_event`; reconnects by
/// itself, calling `on_reconnect` after a gap (messages may have been missed).
pub fn spawn_listener(
    url: &str,
    channel: String,
    on_event: impl Fn(&str) + Send + Sync + 'static,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    // With a cluster, PUBLISH reaches every node: subscribing on the first one suffices.
    let node = url
        .split(',')
        .map(str::trim)
        .find(|s| !s.is_empty())
        .unwrap_or("")
        .to_owned();
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(100);
        let mut first = true;
        loop {
            let result: Result<(), RedisError> = async {
                let client = redis::Client::open(node.as_str())?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                if !first {
                    on_reconnect();
                }
                first = false;
                delay = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                while let Some(msg) = futures_util::StreamExt::next(&mut messages).await {
                    if let Ok(payload) = msg.get_payload::<String>() {
                        on_event(&payload);
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "redis event subscription lost; reconnecting");
            }
            on_reconnect();
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    })
}
