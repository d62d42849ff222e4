//! The in-process token cache (L1, moka), each entry living until its token's usable end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::ops::compute::Op;
use moka::sync::Cache;
use moka::Expiry;
use secrecy::ExposeSecret;

use super::CachedToken;
use crate::tenants::TenantId;
use crate::time::now_ms;

/// A held token and when this process last took it from the shared cache (or minted it).
type Held = (Arc<CachedToken>, i64);

/// Entries live until the token's usable end.
struct UntilUsableEnd;

impl Expiry<TenantId, Held> for UntilUsableEnd {
    fn expire_after_create(
        &self,
        _key: &TenantId,
        value: &Held,
        _now: Instant,
    ) -> Option<Duration> {
        Some(Duration::from_millis(
            (value.0.usable_until_ms - now_ms()).max(0) as u64,
        ))
    }

    fn expire_after_update(
        &self,
        key: &TenantId,
        value: &Held,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, now)
    }
}

/// Tokens held in this process.
#[derive(Clone)]
pub struct MemoryCache {
    inner: Cache<TenantId, Held, foldhash::fast::RandomState>,
}

impl MemoryCache {
    /// A cache of at most `max_entries` tokens.
    pub fn new(max_entries: u64) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(max_entries)
                .expire_after(UntilUsableEnd)
                .build_with_hasher(Default::default()),
        }
    }

    /// The held token, without checking its usable end (callers check `serves`).
    pub fn get_now(&self, tenant: &TenantId) -> Option<Arc<CachedToken>> {
        self.inner.get(tenant).map(|h| h.0)
    }

    /// The held token and when it was last taken from the shared cache or minted (unix ms).
    pub fn get_held(&self, tenant: &TenantId) -> Option<Held> {
        self.inner.get(tenant)
    }

    /// Inserts `token` unless the held one was minted later (the same order as the shared
    /// cache's fenced write); returns the token kept.
    pub fn insert_unless_newer(
        &self,
        tenant: &TenantId,
        token: Arc<CachedToken>,
    ) -> Arc<CachedToken> {
        let result = self
            .inner
            .entry(tenant.clone())
            .and_compute_with(|entry| match entry {
                Some(e) if e.value().0.issued_at_ms > token.issued_at_ms => Op::Nop,
                _ => Op::Put((token.clone(), now_ms())),
            });
        match result {
            moka::ops::compute::CompResult::Unchanged(e) => e.into_value().0,
            _ => token,
        }
    }

    /// Keeps the held token but has the next lookup check the shared cache first (another
    /// replica wrote a newer one): if the shared cache cannot be read then, the held token is
    /// still served instead of minting without the lock.
    pub fn mark_stale(&self, tenant: &TenantId) {
        self.inner
            .entry(tenant.clone())
            .and_compute_with(|entry| match entry {
                Some(e) => Op::Put((e.value().0.clone(), 0)),
                None => Op::Nop,
            });
    }

    pub fn invalidate(&self, tenant: &TenantId) {
        self.inner.invalidate(tenant);
    }

    pub fn remove_if_current(&self, tenant: &TenantId, access_token: &str) -> bool {
        let result = self
            .inner
            .entry(tenant.clone())
            .and_compute_with(|entry| match entry {
                Some(e) if e.value().0.access_token.expose_secret() == access_token => Op::Remove,
                _ => Op::Nop,
            });
        matches!(result, moka::ops::compute::CompResult::Removed(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn token(value: &str, usable_for_ms: i64) -> Arc<CachedToken> {
        minted(value, 0, usable_for_ms)
    }

    /// A token minted `ago_ms` before now, usable for `usable_for_ms` from now.
    fn minted(value: &str, ago_ms: i64, usable_for_ms: i64) -> Arc<CachedToken> {
        let now = now_ms();
        Arc::new(CachedToken {
            access_token: SecretString::from(value.to_owned()),
            refresh_token: None,
            issued_at_ms: now - ago_ms,
            expires_at_ms: now + usable_for_ms + 1000,
            usable_until_ms: now + usable_for_ms,
            refresh_at_ms: now + usable_for_ms / 2,
            dpop_jkt: None,
            audit_fp: Default::default(),
            memo: Default::default(),
        })
    }

    #[test]
    fn compare_and_delete() {
        let c = MemoryCache::new(100);
        let t = TenantId::parse("t").unwrap();
        c.insert_unless_newer(&t, token("new", 60_000));
        assert!(!c.remove_if_current(&t, "old"));
        assert!(c.get_now(&t).is_some());
        assert!(c.remove_if_current(&t, "new"));
        assert!(c.get_now(&t).is_none());
        assert!(!c.remove_if_current(&t, "new"));
    }

    #[test]
    fn a_later_mint_is_not_overwritten() {
        let c = MemoryCache::new(100);
        let t = TenantId::parse("t").unwrap();
        let newer = minted("newer", 0, 30_000);
        c.insert_unless_newer(&t, newer.clone());
        // Minted earlier, though it lives longer: the later mint stays.
        let kept = c.insert_unless_newer(&t, minted("older", 5_000, 90_000));
        assert!(Arc::ptr_eq(&kept, &newer));
        let newest = minted("newest", -1_000, 10_000);
        assert!(Arc::ptr_eq(
            &c.insert_unless_newer(&t, newest.clone()),
            &newest
        ));
    }

    #[test]
    fn a_stale_mark_keeps_the_token_but_asks_for_a_check() {
        let c = MemoryCache::new(100);
        let t = TenantId::parse("t").unwrap();
        c.insert_unless_newer(&t, token("x", 60_000));
        assert!(c.get_held(&t).unwrap().1 > 0);
        c.mark_stale(&t);
        let (held, checked) = c.get_held(&t).unwrap();
        assert_eq!((held.access_token.expose_secret(), checked), ("x", 0));
    }

    #[test]
    fn entries_end_at_usable_end() {
        let c = MemoryCache::new(100);
        let t = TenantId::parse("t").unwrap();
        c.insert_unless_newer(&t, token("x", 50));
        assert!(c.get_now(&t).is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(c.get_now(&t).is_none());
    }
}
