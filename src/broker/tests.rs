//! The broker's timing and concurrency logic under a paused clock (`start_paused`): flights,
//! lock waits, refresh-ahead, degradation, event gaps, the circuit and pacing, against the
//! in-memory shared cache and a scripted partner (`fakes`). Time moves only when every task
//! waits (`sleep` in a test lets every task run up to that point), so each case runs in microseconds and its timings are exact.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use secrecy::ExposeSecret;
use serde_json::json;
use tokio::time::{sleep, Instant};

use super::fakes::{FakePartner, MemoryShared};
use super::flight::WAIT_POLL;
use super::mint::RETRIES;
use super::*;
use crate::cache::SharedCache as _;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

struct Replica {
    broker: Arc<Broker>,
    metrics: Arc<Metrics>,
}

/// One replica over `partner`, sharing `shared` (and its events) when given.
fn replica(partner: &Arc<FakePartner>, shared: Option<&Arc<MemoryShared>>) -> Replica {
    let metrics = Arc::new(Metrics::new());
    let broker = Broker::new(
        partner.clone(),
        shared.map(|s| s.clone() as SharedCache),
        metrics.clone(),
        Timing::from_upstream_timeout(secs(5)),
    );
    if let Some(s) = shared {
        s.subscribe(&broker);
    }
    Replica { broker, metrics }
}

fn value(t: &CachedToken) -> &str {
    t.access_token.expose_secret()
}

/// The token's value, or the broker's error.
async fn fetch(b: &Arc<Broker>, tenant: &TenantId, min_ttl_s: u64) -> Result<String, BrokerError> {
    b.token(tenant, min_ttl_s)
        .await
        .map(|(t, _)| value(&t).to_owned())
}

fn token(value: &str, lifetime_ms: i64) -> Arc<CachedToken> {
    let now = now_ms();
    Arc::new(CachedToken::from_minted(Minted {
        access_token: value.to_owned().into(),
        refresh_token: None,
        issued_at_ms: now,
        expires_at_ms: now + lifetime_ms,
        dpop_jkt: None,
    }))
}

#[test]
fn a_min_ttl_beyond_the_partner_lifetime_is_refused_without_a_mint() {
    let five_minutes = token("t", 300_000);
    assert!(check_lifetime(None, 600).is_ok(), "nothing known: mint");
    assert!(check_lifetime(Some(&five_minutes), 0).is_ok());
    assert!(check_lifetime(Some(&five_minutes), 299).is_ok());
    match check_lifetime(Some(&five_minutes), 301) {
        Err(BrokerError::MinTtlUnsatisfiable {
            min_ttl_s: 301,
            lifetime_s: 300,
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_mint() {
    let p = FakePartner::new(secs(300), ms(200), json!({}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    let t0 = Instant::now();
    let all = join_all((0..50).map(|_| r.broker.token(&tenant, 0))).await;
    assert_eq!(
        t0.elapsed(),
        ms(200),
        "every caller waited for the one mint"
    );
    assert_eq!(p.calls(), 1);
    for a in all {
        let (t, source) = a.unwrap();
        assert_eq!((value(&t), source), ("token-1", Source::Minted));
    }
    let (t, source) = r.broker.token(&tenant, 0).await.unwrap();
    assert_eq!((value(&t), source), ("token-1", Source::Cache));
    assert_eq!(t0.elapsed(), ms(200), "a hit takes no time");
}

#[tokio::test(start_paused = true)]
async fn replicas_mint_once_and_waiters_are_woken_by_the_event() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(250), json!({}));
    let replicas: Vec<_> = (0..3).map(|_| replica(&p, Some(&shared))).collect();
    let tenant = p.tenant();
    let t0 = Instant::now();
    let all = join_all((0..30).map(|i| fetch(&replicas[i % 3].broker, &tenant, 0))).await;
    assert!(
        all.iter().all(|a| a.as_deref().ok() == Some("token-1")),
        "{all:?}"
    );
    assert_eq!(p.calls(), 1, "one mint across replicas");
    // Waiters poll every 100 ms; the mint's event wakes them at once instead.
    assert!(t0.elapsed() < ms(260), "{:?}", t0.elapsed());
    assert!(!shared.locked(&p.tenant()), "the lock is released");
}

#[tokio::test(start_paused = true)]
async fn a_dead_lock_holder_is_outwaited_within_the_lock_ttl() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, Some(&shared));
    shared.take_lock_and_die(&p.tenant());
    let t0 = Instant::now();
    assert_eq!(fetch(&r.broker, &p.tenant(), 0).await.unwrap(), "token-1");
    let waited = t0.elapsed();
    assert!(
        waited >= LOCK_TTL && waited <= LOCK_TTL + WAIT_POLL + ms(10),
        "{waited:?}"
    );
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_live_holder_keeps_its_lock_past_the_lock_ttl() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), secs(4), json!({}));
    let (a, b) = (replica(&p, Some(&shared)), replica(&p, Some(&shared)));
    let tenant = p.tenant();
    let first = tokio::spawn({
        let a = a.broker.clone();
        let t = tenant.clone();
        async move { fetch(&a, &t, 0).await }
    });
    sleep(ms(100)).await;
    assert!(shared.locked(&tenant));
    // The holder's mint takes twice the lock's life: it extends the lock, so b waits.
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-1");
    assert_eq!(first.await.unwrap().unwrap(), "token-1");
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_lock_held_past_the_caller_deadline_is_a_lock_wait_timeout() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, Some(&shared));
    let lock = shared.try_acquire(&p.tenant()).await.unwrap().unwrap();
    let holder = tokio::spawn({
        let shared = shared.clone();
        async move {
            loop {
                tokio::time::sleep(LOCK_TTL / 4).await;
                assert!(shared.extend(&lock).await.unwrap());
            }
        }
    });
    let t0 = Instant::now();
    match fetch(&r.broker, &p.tenant(), 0).await {
        Err(BrokerError::LockWaitTimeout(d)) => assert_eq!(d, secs(7)),
        other => panic!("{other:?}"),
    }
    assert_eq!(t0.elapsed(), secs(7), "the caller deadline");
    assert_eq!(p.calls(), 0);
    holder.abort();
}

#[tokio::test(start_paused = true)]
async fn past_the_refresh_point_callers_get_the_held_token_while_one_refresh_runs() {
    let p = FakePartner::new(secs(60), secs(1), json!({}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-1");
    // Refresh point: 40 s into the lifetime, pulled earlier by up to 3 s; usable to ~52 s.
    sleep(secs(41)).await;
    let t0 = Instant::now();
    for _ in 0..10 {
        let (t, source) = r.broker.token(&tenant, 0).await.unwrap();
        assert_eq!((value(&t), source), ("token-1", Source::Cache));
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "callers are not held");
    sleep(ms(1_100)).await;
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-2");
    assert_eq!(p.calls(), 2, "one refresh for all those callers");
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_serves_the_held_token_to_its_usable_end_then_the_problem() {
    let p = FakePartner::new(secs(12), ms(0), json!({}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    let t0 = Instant::now();
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-1");
    p.fail_with(Some(IssuerError::Unavailable("HTTP 503".into())));
    // 12 s token: refresh point 7.4-8 s, usable until 9 s (skew 3 s).
    sleep(ms(8_100)).await;
    for _ in 0..8 {
        assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-1");
        sleep(ms(100)).await;
    }
    assert!(t0.elapsed() > ms(8_800));
    // One background refresh (three attempts paced a second apart), not one per caller.
    sleep(secs(5)).await;
    assert_eq!(p.calls(), 1 + 1 + RETRIES as usize);
    assert_eq!(
        p.health.lock().unwrap().as_slice(),
        [None, Some("upstream_unavailable".to_owned())]
    );
    // Past its usable end it is no longer handed out: the partner's problem is.
    match fetch(&r.broker, &tenant, 0).await {
        Err(BrokerError::Upstream(IssuerError::Unavailable(_)))
        | Err(BrokerError::CircuitOpen {
            last: IssuerError::Unavailable(_),
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_confirmed_outage_of_the_shared_cache_mints_without_the_lock() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, Some(&shared));
    shared.go_down(true);
    assert_eq!(fetch(&r.broker, &p.tenant(), 0).await.unwrap(), "token-1");
    assert_eq!(r.metrics.lock_degraded.get(), 1);
    // The token it minted is held here and served while the shared cache stays down.
    assert_eq!(fetch(&r.broker, &p.tenant(), 0).await.unwrap(), "token-1");
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_blip_of_the_shared_cache_is_ridden_out_under_the_lock() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, Some(&shared));
    shared.go_down(false);
    tokio::spawn({
        let shared = shared.clone();
        async move {
            tokio::time::sleep(ms(500)).await;
            shared.come_back();
        }
    });
    let t0 = Instant::now();
    assert_eq!(fetch(&r.broker, &p.tenant(), 0).await.unwrap(), "token-1");
    assert!(t0.elapsed() >= ms(500));
    assert_eq!(r.metrics.lock_degraded.get(), 0, "not a confirmed outage");
    let held = shared.get(&p.tenant()).await.unwrap().unwrap();
    assert_eq!(value(&held), "token-1", "shared once the cache is back");
}

#[tokio::test(start_paused = true)]
async fn held_tokens_are_rechecked_after_an_event_gap_and_every_15_s() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, Some(&shared));
    let tenant = p.tenant();
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-1");
    // A write whose event was lost: the held token is trusted and Redis not asked.
    shared.overwrite_silently(&tenant, token("other", 300_000));
    let calls = shared.calls.load(Ordering::Relaxed);
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-1");
    assert_eq!(shared.calls.load(Ordering::Relaxed), calls);
    // The lost subscription is a gap: held tokens are re-checked once.
    sleep(ms(1)).await;
    shared.mark_gap();
    sleep(ms(1)).await;
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "other");
    // Without a gap, a held token is re-checked after 15 s.
    shared.overwrite_silently(&tenant, token("third", 300_000));
    sleep(ms(L1_REVALIDATE_MS as u64 - 100)).await;
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "other");
    sleep(ms(100)).await;
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "third");
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_drop_reaches_every_replica_and_young_drops_are_throttled() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let (a, b) = (replica(&p, Some(&shared)), replica(&p, Some(&shared)));
    let tenant = p.tenant();
    assert_eq!(fetch(&a.broker, &tenant, 0).await.unwrap(), "token-1");
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-1");
    assert_eq!(
        a.broker.invalidate(&tenant, "not-current").await.unwrap(),
        Invalidation::Stale
    );
    assert_eq!(
        a.broker.invalidate(&tenant, "token-1").await.unwrap(),
        Invalidation::Dropped
    );
    // b held token-1; the drop's event made it look again, and it mints.
    sleep(secs(1)).await;
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-2");
    // A second young token within the 15 s window (5 % of 300 s) stays.
    match a.broker.invalidate(&tenant, "token-2").await.unwrap() {
        Invalidation::Throttled {
            window_s: 15,
            retry_after_s,
            ..
        } => assert_eq!(retry_after_s, 14),
        other => panic!("{other:?}"),
    }
    sleep(secs(14)).await;
    assert_eq!(
        a.broker.invalidate(&tenant, "token-2").await.unwrap(),
        Invalidation::Dropped
    );
    assert_eq!(p.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn rejected_credentials_open_the_circuit_for_a_growing_cool_down() {
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    p.fail_with(Some(IssuerError::RejectedCredentials {
        status: 401,
        error: Some("invalid_client".into()),
    }));
    let rejected = |e: &BrokerError| {
        matches!(
            e,
            BrokerError::Upstream(IssuerError::RejectedCredentials { .. })
        )
    };
    assert!(rejected(&fetch(&r.broker, &tenant, 0).await.unwrap_err()));
    assert_eq!(p.calls(), 1, "a rejection is not retried");
    for wait in [5, 10, 20] {
        match fetch(&r.broker, &tenant, 0).await {
            Err(BrokerError::CircuitOpen { retry_after, .. }) => assert_eq!(retry_after, wait),
            other => panic!("{other:?}"),
        }
        let calls = p.calls();
        sleep(secs(wait)).await;
        assert!(rejected(&fetch(&r.broker, &tenant, 0).await.unwrap_err()));
        assert_eq!(p.calls(), calls + 1, "one call after each cool-down");
    }
    p.fail_with(None);
    sleep(secs(40)).await;
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-5");
    assert!(r.broker.circuit_state(&tenant).await.is_none(), "closed");
}

#[tokio::test(start_paused = true)]
async fn a_partner_fixed_after_bad_answers_is_used_within_a_second_or_two() {
    let p = FakePartner::new(secs(300), ms(0), json!({"min_interval_ms": 0}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    p.fail_with(Some(IssuerError::BadResponse("an expired JWT".into())));
    assert!(fetch(&r.broker, &tenant, 0).await.is_err());
    let open = r.broker.circuit_state(&tenant).await.expect("open");
    assert!(open.open_until_ms - now_ms() >= 4_000, "a 5 s cool-down");
    sleep(ms(500)).await;
    p.fail_with(None);
    let fixed = Instant::now();
    let token = loop {
        match fetch(&r.broker, &tenant, 0).await {
            Ok(t) => break t,
            Err(_) => sleep(ms(100)).await,
        }
    };
    assert!(token.starts_with("token-"));
    assert!(
        fixed.elapsed() <= secs(2),
        "{:?} after the fix",
        fixed.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn partner_calls_are_paced_and_transient_failures_retried_within_the_budget() {
    let p = FakePartner::new(secs(300), ms(0), json!({"min_interval_ms": 1000}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    fetch(&r.broker, &tenant, 0).await.unwrap();
    let t0 = Instant::now();
    r.broker.mint_now(&tenant).await.unwrap();
    assert_eq!(t0.elapsed(), secs(1), "the second call waited for its slot");
    p.fail_with(Some(IssuerError::Unavailable("HTTP 502".into())));
    let t0 = Instant::now();
    assert!(r.broker.mint_now(&tenant).await.is_err());
    let started = p.started_at.lock().unwrap().clone();
    assert_eq!(started.len(), 2 + 1 + RETRIES as usize);
    for pair in started.windows(2) {
        assert!(pair[1] - pair[0] >= 1000, "{started:?}");
    }
    assert!(t0.elapsed() < secs(5), "within the mint budget");
}

#[tokio::test(start_paused = true)]
async fn a_hanging_partner_releases_the_caller_at_the_mint_budget() {
    let p = FakePartner::new(secs(300), secs(60), json!({}));
    let r = replica(&p, None);
    let t0 = Instant::now();
    match fetch(&r.broker, &p.tenant(), 0).await {
        Err(BrokerError::Upstream(IssuerError::Timeout)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(t0.elapsed(), secs(5));
    assert_eq!(p.calls(), 1, "no retry fits in what is left");
}

#[tokio::test(start_paused = true)]
async fn minting_goes_on_with_the_last_read_tenant_while_the_database_is_down() {
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    fetch(&r.broker, &tenant, 0).await.unwrap();
    p.db_down.store(true, Ordering::SeqCst);
    sleep(secs(1)).await;
    let t = r.broker.mint_now(&tenant).await.unwrap();
    assert_eq!(value(&t), "token-2");
    // A replica that never read the tenant cannot mint it.
    let fresh = replica(&p, None);
    match fetch(&fresh.broker, &tenant, 0).await {
        Err(BrokerError::Store(_)) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_stalled_database_costs_a_mint_half_a_second_not_the_lock_wait() {
    let p = FakePartner::new(secs(300), ms(0), json!({"min_interval_ms": 0}));
    let r = replica(&p, None);
    let tenant = p.tenant();
    fetch(&r.broker, &tenant, 0).await.unwrap();
    p.db_stalled.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let t = r.broker.mint_now(&tenant).await.unwrap();
    assert_eq!(value(&t), "token-2");
    assert_eq!(
        t0.elapsed(),
        DB_READ_BOUND,
        "minted with the copy held in memory"
    );
    // A replica that never read the tenant says the database is unavailable, just as soon.
    let fresh = replica(&p, None);
    let t0 = Instant::now();
    match fetch(&fresh.broker, &tenant, 0).await {
        Err(BrokerError::Store(e)) => assert!(matches!(*e, StoreError::Unavailable(_)), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(t0.elapsed(), DB_READ_BOUND);
}

#[tokio::test(start_paused = true)]
async fn tokens_minted_during_an_outage_are_written_back_without_a_partner_call() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({"min_interval_ms": 0}));
    let (a, b) = (replica(&p, Some(&shared)), replica(&p, Some(&shared)));
    let tenant = p.tenant();
    shared.go_down(true);
    // Each replica mints on its own while Redis is away.
    assert_eq!(fetch(&a.broker, &tenant, 0).await.unwrap(), "token-1");
    sleep(ms(10)).await;
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-2");
    assert_eq!(p.calls(), 2);
    // Redis is back (empty of these tokens); every replica re-checks what it holds.
    shared.come_back();
    shared.mark_gap();
    sleep(ms(10)).await;
    let from_a = fetch(&a.broker, &tenant, 0).await.unwrap();
    let from_b = fetch(&b.broker, &tenant, 0).await.unwrap();
    sleep(ms(10)).await;
    let again_a = fetch(&a.broker, &tenant, 0).await.unwrap();
    assert_eq!(p.calls(), 2, "no partner call at the heal");
    assert_eq!(
        (from_b.as_str(), again_a.as_str()),
        ("token-2", "token-2"),
        "both converge on the later mint (a served {from_a} first)"
    );
    let in_redis = shared.get(&tenant).await.unwrap().unwrap();
    assert_eq!(value(&in_redis), "token-2");
}

#[tokio::test(start_paused = true)]
async fn a_new_token_event_while_redis_cannot_be_read_keeps_the_held_token() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({"min_interval_ms": 0}));
    let (a, b) = (replica(&p, Some(&shared)), replica(&p, Some(&shared)));
    let tenant = p.tenant();
    assert_eq!(fetch(&a.broker, &tenant, 0).await.unwrap(), "token-1");
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-1");
    // Another replica's "new token" event arrives, then this replica cannot read Redis.
    b.broker.on_event(&format!("m other-replica {tenant}"));
    shared.go_down(true);
    assert_eq!(
        fetch(&b.broker, &tenant, 0).await.unwrap(),
        "token-1",
        "the held token is served, not a lock-less mint"
    );
    assert_eq!(p.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_longer_min_ttl_renews_with_the_refresh_grant() {
    let p = FakePartner::new(secs(60), ms(0), json!({}));
    p.refresh_tokens.store(true, Ordering::SeqCst);
    let r = replica(&p, None);
    let tenant = p.tenant();
    assert_eq!(fetch(&r.broker, &tenant, 59).await.unwrap(), "token-1");
    sleep(secs(2)).await;
    assert_eq!(fetch(&r.broker, &tenant, 50).await.unwrap(), "token-1");
    assert_eq!(fetch(&r.broker, &tenant, 59).await.unwrap(), "token-2");
    assert_eq!(*p.grants.lock().unwrap(), ["initial", "refresh_token"]);
    match fetch(&r.broker, &tenant, 61).await {
        Err(BrokerError::MinTtlUnsatisfiable { lifetime_s: 60, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(p.calls(), 2, "an impossible min_ttl costs no partner call");
}

#[tokio::test(start_paused = true)]
async fn an_admin_change_drops_the_shared_token_once_the_cache_answers_again() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let (a, b) = (replica(&p, Some(&shared)), replica(&p, Some(&shared)));
    let tenant = p.tenant();
    assert_eq!(fetch(&a.broker, &tenant, 0).await.unwrap(), "token-1");
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-1");
    shared.go_down(true);
    a.broker.forget(&tenant).await;
    sleep(secs(5)).await;
    shared.come_back();
    // Retried with backoff capped at 2 s: dropped there, and b told so.
    sleep(ms(2_100)).await;
    assert!(shared.get(&tenant).await.unwrap().is_none());
    assert_eq!(fetch(&b.broker, &tenant, 0).await.unwrap(), "token-2");
    assert_eq!(p.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_held_token_outlives_a_redis_restart_while_the_partner_is_down() {
    let shared = MemoryShared::new();
    let p = FakePartner::new(secs(300), ms(0), json!({}));
    let r = replica(&p, Some(&shared));
    let tenant = p.tenant();
    assert_eq!(fetch(&r.broker, &tenant, 0).await.unwrap(), "token-1");
    p.fail_with(Some(IssuerError::Unavailable("connection failed".into())));
    shared.restart_empty();
    sleep(ms(1)).await;
    // Redis lost it and the partner is down: the token held here is still good.
    for _ in 0..3 {
        let (t, source) = r.broker.token(&tenant, 0).await.unwrap();
        assert_eq!((value(&t), source), ("token-1", Source::Cache));
    }
    // A rejection is not an outage: then the problem is the answer.
    p.fail_with(Some(IssuerError::RejectedCredentials {
        status: 401,
        error: None,
    }));
    r.broker.forget(&tenant).await;
    assert!(fetch(&r.broker, &tenant, 0).await.is_err());
    // The partner back: a new token, shared again.
    p.fail_with(None);
    sleep(secs(10)).await;
    let fresh = fetch(&r.broker, &tenant, 0).await.unwrap();
    assert_ne!(fresh, "token-1");
    let shared_now = shared.get(&tenant).await.unwrap().unwrap();
    assert_eq!(value(&shared_now), fresh);
}
