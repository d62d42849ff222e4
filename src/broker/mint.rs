//! Minting: the tenant as stored (or as last read while the database is out), the partner
//! call with pacing and retries, the refresh grant first, and the shared write of the result.

use super::*;

/// Transient failures are retried this many times within the mint budget.
pub(super) const RETRIES: u32 = 2;

impl Broker {
    /// Mints (refresh grant first when the last answer carried a refresh token), then writes
    /// the token to the shared cache (fenced: a later token wins), announces it and keeps it in L1.
    pub(super) async fn mint_and_store(
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
    pub(super) async fn record_outcome(
        &self,
        tenant: &TenantId,
        result: &Result<Minted, IssuerError>,
    ) {
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

    pub(super) async fn mint_at_partner(
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
    pub(super) async fn call_partner(
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
    pub(super) async fn tenant_for_mint(&self, id: &TenantId) -> Result<Tenant, BrokerError> {
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
            Err(StoreError::NotFound(_)) => {
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
}
