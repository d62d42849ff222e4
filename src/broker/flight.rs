//! Flights: one mint per tenant at a time in this process (joined by every caller that needs
//! it), and across replicas the shared cache's lock: wait for another replica's mint, or take
//! the lock, mint and release it; the circuit's check before any partner call.

use super::*;

/// Extends the held mint lock every `LOCK_TTL / 4` while the mint runs; abort it when done.
pub(super) fn keep_lock(l2: SharedCache, lock: &LockToken) -> tokio::task::JoinHandle<()> {
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

/// What a flight is doing, so a caller whose deadline passes is told what held it up.
pub(super) const PHASE_WORKING: u8 = 0;

pub(super) const PHASE_WAITING_FOR_LOCK: u8 = 1;

/// How often a waiter on another replica's mint looks at the shared cache between events.
pub(super) const WAIT_POLL: Duration = Duration::from_millis(100);

/// Redis failed on the flight's path: mint without it.
pub(super) struct Degrade(CacheError);

/// One in-process mint for a tenant, shared by every request that needs it.
pub(super) struct Flight {
    id: u64,
    done: Shared<BoxFuture<'static, FlightResult>>,
    phase: Arc<AtomicU8>,
}

impl Broker {
    /// A token from a flight, within the caller deadline: joins the tenant's running flight
    /// (or starts one), and runs its own if the one joined was after less.
    pub(super) async fn bounded_flight(
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

    /// Joins the tenant's flight, or starts one: its outcome, and what it is doing.
    pub(super) fn flight(
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
                    // In the span of the request that started it: its log lines (the
                    // partner call, "token minted") carry that request's id.
                    let task = tokio::spawn(
                        async move {
                            let result = me.run_flight(&t, want, &task_phase).await;
                            let mut flights = me.flights.lock().expect("flights");
                            if flights.get(&t).is_some_and(|f| f.id == id) {
                                flights.remove(&t);
                            }
                            result
                        }
                        .in_current_span(),
                    );
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

    /// The body of a flight: without a shared cache, mint; with one, wait for another replica's
    /// token or take the lock and mint (`under_shared_lock`); when Redis is unreachable or
    /// refuses writes, mint without the lock rather than fail.
    pub(super) async fn run_flight(
        self: &Arc<Self>,
        tenant: &TenantId,
        want: Want,
        phase: &AtomicU8,
    ) -> FlightResult {
        let Some(l2) = &self.l2 else {
            return self.mint_alone(tenant, want).await;
        };
        let notify = self
            .waiters
            .lock()
            .expect("waiters")
            .entry(tenant.clone())
            .or_default()
            .clone();
        let result = self
            .under_shared_lock(l2, tenant, want, phase, &notify)
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
                self.metrics.lock_degraded.inc();
                tracing::warn!(tenant = %tenant, error = %e, "shared cache unavailable: minting without the cross-replica lock");
                self.mint_alone(tenant, want).await
            }
        }
    }

    /// A mint by this replica alone: no shared cache, or one that cannot be used now.
    async fn mint_alone(&self, tenant: &TenantId, want: Want) -> FlightResult {
        let tries = self.check_circuit(tenant, want).await?;
        let prev = self.l1.get_now(tenant);
        self.mint_and_store(tenant, prev.as_deref(), tries).await
    }

    /// Until the lock wait's deadline: a token another replica wrote that satisfies `want`, or
    /// the lock and a mint under it. `Err(Degrade)` when Redis is unreachable (confirmed, or
    /// past the deadline) or refuses writes; `Ok(Err(LockWaitTimeout))` when another replica
    /// held the lock the whole time.
    async fn under_shared_lock(
        &self,
        l2: &SharedCache,
        tenant: &TenantId,
        want: Want,
        phase: &AtomicU8,
        notify: &Notify,
    ) -> Result<FlightResult, Degrade> {
        let deadline = Instant::now() + self.timing.lock_wait;
        // A failure that is not (yet) a confirmed outage is looked at again shortly.
        let give_up = |e: CacheError| {
            (l2.outage_confirmed_for(tenant) || Instant::now() >= deadline).then_some(Degrade(e))
        };
        loop {
            let woken = notify.notified();
            let current = match l2.get(tenant).await {
                Ok(c) => c,
                Err(e) => {
                    if let Some(d) = give_up(e) {
                        return Err(d);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if let Some(t) = current.as_ref().filter(|t| want.satisfied_by(t, now_ms())) {
                return Ok(Ok(self.l1.insert_unless_newer(tenant, t.clone())));
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
                Err(e) => {
                    if let Some(d) = give_up(e) {
                        return Err(d);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            if let Some(lock) = lock {
                phase.store(PHASE_WORKING, Ordering::Relaxed);
                return Ok(self
                    .mint_holding(l2, tenant, want, lock, current, tries)
                    .await);
            }
            phase.store(PHASE_WAITING_FOR_LOCK, Ordering::Relaxed);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Err(BrokerError::LockWaitTimeout(self.timing.lock_wait)));
            }
            let _ = tokio::time::timeout(WAIT_POLL.min(left), woken).await;
        }
    }

    /// Holding the shared lock: unless another replica wrote a satisfying token between the
    /// read and the lock, mint (the lock kept alive meanwhile), then release it.
    async fn mint_holding(
        &self,
        l2: &SharedCache,
        tenant: &TenantId,
        want: Want,
        lock: LockToken,
        read: Option<Arc<CachedToken>>,
        tries: Tries,
    ) -> FlightResult {
        let current = l2.get(tenant).await.ok().flatten().or(read);
        if let Some(t) = current.as_ref().filter(|t| want.satisfied_by(t, now_ms())) {
            let _ = l2.release(lock).await;
            return Ok(self.l1.insert_unless_newer(tenant, t.clone()));
        }
        let prev = current.or_else(|| self.l1.get_now(tenant));
        let keeper = keep_lock(l2.clone(), &lock);
        let result = self.mint_and_store(tenant, prev.as_deref(), tries).await;
        keeper.abort();
        if let Err(e) = l2.release(lock).await {
            tracing::warn!(tenant = %tenant, error = %e, "mint lock release failed; it expires by itself");
        }
        result
    }

    /// While the tenant's circuit is open, answers with its last problem. Two exceptions: the
    /// admin dry run (`Want::Fresh`) is let through, and when the broker needs a token (callers
    /// have no usable one, or the held one is past its refresh point), one probe per
    /// `circuit::PROBE_EVERY_MS` (across replicas) is let through with a single attempt
    /// (half-open), so recovery follows the partner's within about that interval (refresh-ahead
    /// runs at most every `REFRESH_RETRY_MS` per replica) rather than after the cool-down.
    pub(super) async fn check_circuit(
        &self,
        tenant: &TenantId,
        want: Want,
    ) -> Result<Tries, BrokerError> {
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
}
