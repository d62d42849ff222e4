//! Refresh-ahead: a token past its refresh point is renewed in the background while it is
//! still handed out.

use super::*;

/// How long a failed background refresh waits before the next one.
pub(super) const REFRESH_RETRY_MS: i64 = 5_000;

impl Broker {
    /// Past the refresh point: start one background refresh, unless one runs or a failed one
    /// asked to wait. The caller is not held.
    pub(super) fn refresh_ahead(self: &Arc<Self>, tenant: &TenantId, t: &CachedToken, now: i64) {
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
}
