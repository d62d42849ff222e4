//! Protecting partners: the per-tenant circuit (after failures, stop calling for a growing
//! cool-down and answer with the last problem) and the per-tenant call pacing. Both live in
//! Redis when it is configured, so ten replicas do not make ten times the attempts.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::{Record, Shared, Slot};
use crate::issuers::IssuerError;
use crate::tenants::TenantId;
use crate::time::now_ms;

/// First cool-down after a failure; it doubles with each further failure.
pub const FIRST_COOLDOWN_MS: i64 = 5_000;
/// Longest cool-down.
pub const MAX_COOLDOWN_MS: i64 = 300_000;
/// While the circuit is open and callers have no usable token, one probe per this interval
/// (across replicas) is let through to find out whether the partner is back.
pub const PROBE_EVERY_MS: i64 = 1_000;
/// How long the failure count is remembered after the cool-down ends.
const MEMORY_MS: i64 = 600_000;

/// A tenant's circuit after one or more failed mints.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CircuitState {
    pub failures: u32,
    pub open_until_ms: i64,
    pub last_error: IssuerError,
}

impl CircuitState {
    pub fn is_open(&self, now: i64) -> bool {
        now < self.open_until_ms
    }

    /// Whole seconds until the cool-down ends (at least 1 while open).
    pub fn retry_after_s(&self, now: i64) -> u64 {
        ((self.open_until_ms - now + 999) / 1000).max(1) as u64
    }

    /// Whether the open circuit is probed (one call per `PROBE_EVERY_MS` when a token is
    /// needed) rather than waited out: every failure but a credential rejection and a 429.
    pub fn probed(&self) -> bool {
        self.last_error.probed_early()
    }

    /// Whole seconds until the broker calls the partner again once it needs a token: the probe
    /// interval for a probed circuit, the rest of the cool-down otherwise; `None` when closed.
    pub fn next_call_in_s(&self, now: i64) -> Option<u64> {
        if !self.is_open(now) {
            return None;
        }
        Some(if self.probed() {
            (PROBE_EVERY_MS as u64)
                .div_ceil(1000)
                .min(self.retry_after_s(now))
        } else {
            self.retry_after_s(now)
        })
    }
}

/// The cool-down after the `failures`-th failure, stretched to the partner's `Retry-After`.
pub fn cooldown_ms(failures: u32, error: &IssuerError) -> i64 {
    let doubled = FIRST_COOLDOWN_MS.saturating_mul(1i64 << failures.saturating_sub(1).min(16));
    let base = doubled.min(MAX_COOLDOWN_MS);
    match error {
        IssuerError::RateLimited {
            retry_after: Some(s),
        } => base
            .max((*s as i64).saturating_mul(1000))
            .min(MAX_COOLDOWN_MS.max(base)),
        _ => base,
    }
}

/// Circuit states: in process, and in the shared cache when configured.
pub struct Circuits {
    local: Mutex<HashMap<TenantId, CircuitState>>,
    probes: Mutex<HashMap<TenantId, i64>>,
    shared: Option<Shared>,
}

impl Circuits {
    pub fn new(shared: Option<Shared>) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            shared,
        }
    }

    /// Takes the tenant's half-open probe slot: true for at most one caller per
    /// `PROBE_EVERY_MS` across replicas (per replica while Redis is unavailable).
    pub async fn try_probe(&self, tenant: &TenantId) -> bool {
        if let Some(r) = &self.shared {
            match r
                .take_slot(tenant, Slot::Probe, PROBE_EVERY_MS as u64)
                .await
            {
                Ok(wait) => return wait == 0,
                Err(e) => {
                    tracing::debug!(tenant = %tenant, error = %e, "shared probe slot unavailable; using this replica's")
                }
            }
        }
        let now = now_ms();
        let mut probes = self.probes.lock().expect("probes");
        match probes.get(tenant) {
            Some(&next) if now < next => false,
            _ => {
                probes.insert(tenant.clone(), now + PROBE_EVERY_MS);
                true
            }
        }
    }

    /// The tenant's circuit state (shared when Redis is configured; local if Redis fails).
    pub async fn state(&self, tenant: &TenantId) -> Option<CircuitState> {
        if let Some(r) = &self.shared {
            match r.get_record(tenant, Record::Circuit).await {
                Ok(s) => return s.and_then(|s| serde_json::from_str(&s).ok()),
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "circuit state unavailable in redis; using this replica's")
                }
            }
        }
        self.local.lock().expect("circuits").get(tenant).cloned()
    }

    /// Counts a failed mint and opens (or extends) the circuit.
    pub async fn record_failure(&self, tenant: &TenantId, error: &IssuerError) -> CircuitState {
        let now = now_ms();
        let failures = self
            .state(tenant)
            .await
            .map_or(1, |s| s.failures.saturating_add(1));
        let state = CircuitState {
            failures,
            open_until_ms: now + cooldown_ms(failures, error),
            last_error: error.clone(),
        };
        self.local
            .lock()
            .expect("circuits")
            .insert(tenant.clone(), state.clone());
        if let Some(r) = &self.shared {
            let ttl = state.open_until_ms - now + MEMORY_MS;
            if let Err(e) = r
                .set_record(
                    tenant,
                    Record::Circuit,
                    serde_json::to_string(&state).expect("serialises"),
                    ttl,
                )
                .await
            {
                tracing::warn!(tenant = %tenant, error = %e, "could not share the circuit state");
            }
        }
        tracing::warn!(tenant = %tenant, failures, cooldown_ms = state.open_until_ms - now, code = error.code(), "partner calls paused for this tenant");
        state
    }

    /// Closes the circuit (a success, a credential rotation, a successful admin test).
    pub async fn reset(&self, tenant: &TenantId) {
        self.local.lock().expect("circuits").remove(tenant);
        if let Some(r) = &self.shared {
            if let Err(e) = r.delete_record(tenant, Record::Circuit).await {
                tracing::warn!(tenant = %tenant, error = %e, "could not reset the shared circuit state");
            }
        }
    }
}

/// Per-tenant pacing of partner calls (and of young-token drops), shared through Redis when
/// configured, else per process.
pub struct Pacer {
    local: Mutex<HashMap<(TenantId, Slot), i64>>,
    shared: Option<Shared>,
}

impl Pacer {
    pub fn new(shared: Option<Shared>) -> Self {
        Self {
            local: Mutex::new(HashMap::new()),
            shared,
        }
    }

    /// Takes the tenant's next call slot, waiting for it if that ends before `deadline_ms`;
    /// otherwise returns how long the caller would have had to wait.
    pub async fn take(
        &self,
        tenant: &TenantId,
        interval_ms: u64,
        deadline_ms: i64,
    ) -> Result<(), Duration> {
        loop {
            let wait_ms = self.try_take(tenant, Slot::Pace, interval_ms).await;
            if wait_ms == 0 {
                return Ok(());
            }
            if now_ms() + wait_ms as i64 > deadline_ms {
                return Err(Duration::from_millis(wait_ms));
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        }
    }

    /// Takes the tenant's `what` slot if it is free (it stays taken `interval_ms`); else how
    /// many ms until it frees.
    pub async fn try_take(&self, tenant: &TenantId, what: Slot, interval_ms: u64) -> u64 {
        match &self.shared {
            Some(r) => match r.take_slot(tenant, what, interval_ms).await {
                Ok(wait) => wait,
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, what = what.as_str(), "shared pacing unavailable; pacing in this replica");
                    self.take_local(tenant, what, interval_ms)
                }
            },
            None => self.take_local(tenant, what, interval_ms),
        }
    }

    fn take_local(&self, tenant: &TenantId, what: Slot, interval_ms: u64) -> u64 {
        let now = now_ms();
        let mut map = self.local.lock().expect("pacer");
        let key = (tenant.clone(), what);
        let next = map.get(&key).copied().unwrap_or(0);
        if now >= next {
            map.insert(key, now + interval_ms as i64);
            0
        } else {
            (next - now) as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cooldown_grows_to_a_cap_and_honours_retry_after() {
        let e = IssuerError::Unavailable("HTTP 503".into());
        assert_eq!(cooldown_ms(1, &e), 5_000);
        assert_eq!(cooldown_ms(2, &e), 10_000);
        assert_eq!(cooldown_ms(4, &e), 40_000);
        assert_eq!(cooldown_ms(9, &e), MAX_COOLDOWN_MS);
        assert_eq!(cooldown_ms(60, &e), MAX_COOLDOWN_MS);
        let throttled = IssuerError::RateLimited {
            retry_after: Some(42),
        };
        assert_eq!(cooldown_ms(1, &throttled), 42_000);
        assert_eq!(cooldown_ms(4, &throttled), 42_000);
    }

    #[test]
    fn open_state_reports_retry_after() {
        let s = CircuitState {
            failures: 1,
            open_until_ms: 10_500,
            last_error: IssuerError::Timeout,
        };
        assert!(s.is_open(10_000) && !s.is_open(10_500));
        assert_eq!(s.retry_after_s(10_000), 1);
        assert_eq!(s.retry_after_s(0), 11);
    }

    #[test]
    fn local_pacing() {
        let p = Pacer::new(None);
        let t = TenantId::parse("t").unwrap();
        assert_eq!(p.take_local(&t, Slot::Pace, 1000), 0);
        let wait = p.take_local(&t, Slot::Pace, 1000);
        assert!(wait > 900 && wait <= 1000, "{wait}");
    }
}
