//! `Broker::token`: cache lookup, single-flight mint, and invalidation. Domain code only:
//! nothing here knows about HTTP.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::OwnedMutexGuard;

use crate::cache::{CacheError, CachedToken, TokenCache};
use crate::issuers::{Grant, IssuerError, Issuers};
use crate::metrics::Metrics;
use crate::tenants::store::StoreError;
use crate::tenants::{TenantId, TenantStore};
use crate::time::now_ms;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("tenant not found")]
    TenantNotFound,
    #[error("even a fresh token lives {lifetime_s} s, less than the {min_ttl_s} s asked for")]
    MinTtlUnsatisfiable { min_ttl_s: u64, lifetime_s: i64 },
    #[error(transparent)]
    Upstream(#[from] IssuerError),
    #[error(transparent)]
    Store(StoreError),
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::TenantNotFound,
            other => Self::Store(other),
        }
    }
}

/// Where a handed-out token came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    Minted,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Minted => "minted",
        }
    }
}

/// Per-tenant in-process mutexes: concurrent misses for one tenant share one mint, other
/// tenants are not blocked. Entries disappear when nobody holds or waits on them.
#[derive(Default)]
pub struct SingleFlight {
    map: Arc<Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>>,
}

pub struct FlightGuard {
    guard: Option<OwnedMutexGuard<()>>,
    tenant: TenantId,
    map: Arc<Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>>,
}

impl SingleFlight {
    pub async fn lock(&self, tenant: &TenantId) -> FlightGuard {
        let m = self
            .map
            .lock()
            .expect("single-flight map")
            .entry(tenant.clone())
            .or_default()
            .clone();
        FlightGuard {
            guard: Some(m.lock_owned().await),
            tenant: tenant.clone(),
            map: self.map.clone(),
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().expect("single-flight map");
        if map
            .get(&self.tenant)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.tenant);
        }
    }
}

/// The token broker.
pub struct Broker {
    store: TenantStore,
    issuers: Issuers,
    cache: Arc<dyn TokenCache>,
    flights: SingleFlight,
    metrics: Arc<Metrics>,
}

impl Broker {
    pub fn new(
        store: TenantStore,
        issuers: Issuers,
        cache: Arc<dyn TokenCache>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            store,
            issuers,
            cache,
            flights: SingleFlight::default(),
            metrics,
        }
    }

    pub fn cache(&self) -> &Arc<dyn TokenCache> {
        &self.cache
    }

    /// A usable token for `tenant` with at least `min_ttl_s` seconds left.
    pub async fn token(
        &self,
        tenant: &TenantId,
        min_ttl_s: u64,
    ) -> Result<(Arc<CachedToken>, Source), BrokerError> {
        let min_ttl_ms = (min_ttl_s as i64).saturating_mul(1000);
        if let Some(t) = self.cache.get(tenant).await? {
            if t.serves(now_ms(), min_ttl_ms) {
                return Ok((t, Source::Cache));
            }
        }
        let _flight = self.flights.lock(tenant).await;
        // Another request may have minted while this one waited.
        if let Some(t) = self.cache.get(tenant).await? {
            if t.serves(now_ms(), min_ttl_ms) {
                return Ok((t, Source::Cache));
            }
            // The partner's tokens live about as long as the last one did: if that is shorter
            // than min_ttl, minting again would only burn a partner call.
            let lifetime_ms = t.expires_at_ms - t.issued_at_ms;
            if lifetime_ms < min_ttl_ms {
                return Err(BrokerError::MinTtlUnsatisfiable {
                    min_ttl_s,
                    lifetime_s: lifetime_ms / 1000,
                });
            }
        }
        let token = self.mint(tenant).await?;
        let now = now_ms();
        if !token.serves(now, min_ttl_ms) {
            return Err(BrokerError::MinTtlUnsatisfiable {
                min_ttl_s,
                lifetime_s: (token.expires_at_ms - now) / 1000,
            });
        }
        Ok((token, Source::Minted))
    }

    /// Mints at the partner and stores the result (used by fetches and the admin test).
    pub async fn mint(&self, tenant_id: &TenantId) -> Result<Arc<CachedToken>, BrokerError> {
        let tenant = self.store.tenant(tenant_id).await?;
        let started = Instant::now();
        let result = self.issuers.mint(&tenant, Grant::Initial).await;
        let outcome = result.as_ref().map_or_else(IssuerError::outcome, |_| "ok");
        self.metrics
            .observe_upstream(tenant_id.as_str(), outcome, started.elapsed());
        let token = Arc::new(CachedToken::from_minted(result?));
        self.cache.put(tenant_id, token.clone()).await?;
        self.metrics
            .set_token_expiry(tenant_id.as_str(), token.expires_at_ms);
        Ok(token)
    }

    /// Drops the tenant's cached token (credential rotation, spec change, deletion).
    pub async fn forget(&self, tenant: &TenantId) -> Result<(), BrokerError> {
        self.cache.remove(tenant).await?;
        self.metrics.clear_token_expiry(tenant.as_str());
        Ok(())
    }

    /// Drops the cached token only if it is still `access_token`.
    pub async fn invalidate(
        &self,
        tenant: &TenantId,
        access_token: &str,
    ) -> Result<bool, BrokerError> {
        Ok(self.cache.remove_if_current(tenant, access_token).await?)
    }
}
