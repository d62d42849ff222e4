//! The in-process token cache (moka), each entry living until its token's usable end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;
use secrecy::ExposeSecret;

use super::{CacheError, CachedToken, TokenCache};
use crate::tenants::TenantId;
use crate::time::now_ms;

struct UntilUsableEnd;

impl Expiry<TenantId, Arc<CachedToken>> for UntilUsableEnd {
    fn expire_after_create(
        &self,
        _key: &TenantId,
        value: &Arc<CachedToken>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            (value.usable_until_ms - now_ms()).max(0) as u64,
        ))
    }

    fn expire_after_update(
        &self,
        key: &TenantId,
        value: &Arc<CachedToken>,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, now)
    }
}

/// Tokens held in this process only.
#[derive(Clone)]
pub struct MemoryCache {
    inner: Cache<TenantId, Arc<CachedToken>>,
}

impl MemoryCache {
    pub fn new(max_entries: u64) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(UntilUsableEnd)
                .build(),
        }
    }

    /// The held token, without checking its usable end (callers check `serves`).
    pub fn get_now(&self, tenant: &TenantId) -> Option<Arc<CachedToken>> {
        self.inner.get(tenant)
    }

    pub fn insert(&self, tenant: &TenantId, token: Arc<CachedToken>) {
        self.inner.insert(tenant.clone(), token);
    }

    pub fn invalidate(&self, tenant: &TenantId) {
        self.inner.invalidate(tenant);
    }

    pub fn remove_if_current(&self, tenant: &TenantId, access_token: &str) -> bool {
        let result = self
            .inner
            .entry(tenant.clone())
            .and_compute_with(|entry| match entry {
                Some(e) if e.value().access_token.expose_secret() == access_token => Op::Remove,
                _ => Op::Nop,
            });
        matches!(result, moka::ops::compute::CompResult::Removed(_))
    }

    pub fn entry_count(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }
}

#[async_trait]
impl TokenCache for MemoryCache {
    async fn get(&self, tenant: &TenantId) -> Result<Option<Arc<CachedToken>>, CacheError> {
        Ok(self.get_now(tenant))
    }

    async fn put(&self, tenant: &TenantId, token: Arc<CachedToken>) -> Result<(), CacheError> {
        self.insert(tenant, token);
        Ok(())
    }

    async fn remove(&self, tenant: &TenantId) -> Result<(), CacheError> {
        self.invalidate(tenant);
        Ok(())
    }

    async fn remove_if_current(
        &self,
        tenant: &TenantId,
        access_token: &str,
    ) -> Result<bool, CacheError> {
        Ok(MemoryCache::remove_if_current(self, tenant, access_token))
    }

    async fn ping(&self) -> Result<(), CacheError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn token(value: &str, usable_for_ms: i64) -> Arc<CachedToken> {
        let now = now_ms();
        Arc::new(CachedToken {
            access_token: SecretString::from(value.to_owned()),
            refresh_token: None,
            issued_at_ms: now,
            expires_at_ms: now + usable_for_ms + 1000,
            usable_until_ms: now + usable_for_ms,
            refresh_at_ms: now + usable_for_ms / 2,
        })
    }

    #[test]
    fn compare_and_delete() {
        let c = MemoryCache::new(100);
        let t = TenantId::parse("t").unwrap();
        c.insert(&t, token("new", 60_000));
        assert!(!c.remove_if_current(&t, "old"));
        assert!(c.get_now(&t).is_some());
        assert!(c.remove_if_current(&t, "new"));
        assert!(c.get_now(&t).is_none());
        assert!(!c.remove_if_current(&t, "new"));
    }

    #[test]
    fn entries_end_at_usable_end() {
        let c = MemoryCache::new(100);
        let t = TenantId::parse("t").unwrap();
        c.insert(&t, token("x", 50));
        assert!(c.get_now(&t).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(c.get_now(&t).is_none());
    }
}
