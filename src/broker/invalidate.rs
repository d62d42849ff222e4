//! Invalidation and forgetting: a caller's report of a rejected token (with the re-mint
//! guard for young tokens), an admin change or deletion dropping a tenant's token everywhere.

use super::*;

/// How long an admin change keeps trying to drop the old token from an unreachable Redis
/// (the longest a partner token is cached is far shorter in practice; after this it expires
/// by itself).
pub(super) const FORGET_RETRY_FOR: Duration = Duration::from_secs(600);

impl Broker {
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

    /// Closes the circuit and drops the shared token; true when Redis took both.
    pub(super) async fn forget_shared(&self, tenant: &TenantId) -> bool {
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
                    .try_take(tenant, crate::cache::Slot::Invalidate, min_age as u64)
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
    pub(super) async fn invalidate_min_age(&self, tenant: &TenantId, token: &CachedToken) -> i64 {
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
}
