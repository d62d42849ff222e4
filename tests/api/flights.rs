//! One mint per token lifetime: across replicas, under load, ahead of expiry, with refresh
//! tokens, and when a lock holder dies.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

async fn cold_herd_across_three_replicas(env: TestEnv) {
    let apps = vec![env.spawn().await, env.spawn().await, env.spawn().await];
    let partner = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(|_: &wiremock::Request| {
            ResponseTemplate::new(200)
                .set_body_json(json!({"accessToken": setu_jwt(300)}))
                .set_delay(Duration::from_millis(300))
        })
        .mount(&partner)
        .await;
    apps[0]
        .create_tenant(&setu_spec("herd", &partner, "s"))
        .await;
    let key = apps[0].create_caller("c", json!("*")).await;
    let started = Instant::now();
    let mut tokens = fetch_many(&apps, "herd", &key, 500).await;
    let took = started.elapsed();
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "every caller gets the same token");
    let calls = partner.received_requests().await.unwrap().len();
    eprintln!("cold herd: 500 callers over 3 replicas, {calls} partner call(s), {took:?}");
    assert_eq!(calls, 1);
    for app in &apps {
        app.stop().await;
    }
}
backends!(cold_herd_across_three_replicas: PostgresRedis);

/// A partner whose tokens live `lifetime` s, answering after 300 ms; Comm100-style answers
/// carry a refresh token, and refresh grants answer without one (so the old one is kept).
async fn slow_partner(
    lifetime: i64,
    comm100: bool,
) -> (MockServer, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let server = MockServer::start().await;
    let (full, refreshes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (f, r) = (full.clone(), refreshes.clone());
    Mock::given(method("POST"))
        .respond_with(move |req: &wiremock::Request| {
            let form = form_of(req);
            let body = if !comm100 {
                f.fetch_add(1, Ordering::SeqCst);
                json!({"accessToken": setu_jwt(lifetime)})
            } else if form.get("grant_type").map(String::as_str) == Some("refresh_token") {
                assert_eq!(form["refresh_token"], "RT-1", "the stored refresh token is used");
                r.fetch_add(1, Ordering::SeqCst);
                json!({"access_token": comm100_jwt(lifetime), "expires_in": lifetime, "token_type": "Bearer"})
            } else {
                f.fetch_add(1, Ordering::SeqCst);
                json!({"access_token": comm100_jwt(lifetime), "expires_in": lifetime, "token_type": "Bearer",
                       "refresh_token": "RT-1", "scope": "comm100 offline_access"})
            };
            ResponseTemplate::new(200)
                .set_body_json(body)
                .set_delay(Duration::from_millis(300))
        })
        .mount(&server)
        .await;
    (server, full, refreshes)
}

async fn steady_traffic_never_waits(env: TestEnv) {
    let app = env.spawn().await;
    let other = if env.redis_url.is_some() {
        Some(env.spawn().await)
    } else {
        None
    };
    let comm100 = env.redis_url.is_some();
    let lifetime = 12;
    let (partner, full, refreshes) = slow_partner(lifetime, comm100).await;
    let spec = if comm100 {
        comm100_spec("steady", &partner, "pw")
    } else {
        setu_spec("steady", &partner, "s")
    };
    app.create_tenant(&spec).await;
    let key = app.create_caller("c", json!("*")).await;
    assert_eq!(app.get_token("steady", &key).await.status, 200);
    let (mut worst_wait, mut least_left, mut seen) = (Duration::ZERO, i64::MAX, Vec::new());
    let end = Instant::now() + Duration::from_secs(2 * lifetime as u64 + 2);
    let mut i = 0;
    while Instant::now() < end {
        let target = match (&other, i % 2) {
            (Some(o), 1) => o,
            _ => &app,
        };
        i += 1;
        let t0 = Instant::now();
        let a = target.get_token("steady", &key).await;
        worst_wait = worst_wait.max(t0.elapsed());
        assert_eq!(a.status, 200, "{}", a.text);
        let body = a.json();
        least_left = least_left.min(body["expires_in"].as_i64().unwrap());
        if seen.last() != Some(&body["access_token"]) {
            seen.push(body["access_token"].clone());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (full, refreshes) = (
        full.load(Ordering::SeqCst),
        refreshes.load(Ordering::SeqCst),
    );
    eprintln!(
        "steady loop ({:?}): worst wait {worst_wait:?}, least time left {least_left} s, {} tokens, {full} full grants, {refreshes} refresh grants",
        env.backend,
        seen.len()
    );
    assert!(
        worst_wait < Duration::from_millis(150),
        "a caller waited {worst_wait:?} (the partner takes 300 ms)"
    );
    assert!(
        least_left >= 3,
        "a caller got a token with {least_left} s left"
    );
    assert!(seen.len() >= 3, "the token was renewed ahead of expiry");
    if comm100 {
        assert_eq!(full, 1, "renewals use the refresh token");
        assert!(refreshes >= 2);
    }
    app.stop().await;
    if let Some(o) = other {
        o.stop().await;
    }
}
backends!(steady_traffic_never_waits: Sqlite, PostgresRedis);

async fn invalid_refresh_token_falls_back_to_the_full_grant(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let grants = Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = grants.clone();
    Mock::given(method("POST"))
        .respond_with(move |req: &wiremock::Request| {
            let form = form_of(req);
            g.lock().unwrap().push(form["grant_type"].clone());
            if form["grant_type"] == "refresh_token" {
                ResponseTemplate::new(400).set_body_json(json!({"error": "invalid_grant"}))
            } else {
                ResponseTemplate::new(200).set_body_json(json!({"access_token": comm100_jwt(200),
                    "expires_in": 100, "token_type": "Bearer", "refresh_token": "RT"}))
            }
        })
        .mount(&partner)
        .await;
    let mut spec = comm100_spec("fallback", &partner, "pw");
    spec["issuer"]["min_interval_ms"] = json!(0); // no pacing between the three calls
    app.create_tenant(&spec).await;
    let key = app.create_caller("c", json!("*")).await;
    let first = app.get_token("fallback", &key).await.json()["access_token"].clone();
    // Asking for more than is left forces a renewal: refresh grant, refused, then the full grant.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let second = app.get_token_min_ttl("fallback", &key, 99).await;
    assert_eq!(second.status, 200, "{}", second.text);
    assert_ne!(second.json()["access_token"], first);
    assert_eq!(
        *grants.lock().unwrap(),
        ["password", "refresh_token", "password"]
    );
    app.stop().await;
}
backends!(invalid_refresh_token_falls_back_to_the_full_grant: Sqlite, PostgresRedis);

async fn invalidation_reaches_every_replica(env: TestEnv) {
    let (a, b) = (env.spawn().await, env.spawn().await);
    let partner = setu_partner(300, 0).await;
    a.create_tenant(&setu_spec("inv", &partner, "s")).await;
    let key = a.create_caller("c", json!("*")).await;
    let t1 = a.get_token("inv", &key).await.json()["access_token"].clone();
    assert_eq!(
        b.get_token("inv", &key).await.json()["access_token"],
        t1,
        "b holds it in L1 now"
    );
    // A stale report on b drops nothing anywhere.
    assert_eq!(
        b.invalidate("inv", &key, "an-older-token").await.status,
        204
    );
    assert_eq!(a.get_token("inv", &key).await.json()["access_token"], t1);
    // Reporting the current token on a drops it on b as well.
    assert_eq!(
        a.invalidate("inv", &key, t1.as_str().unwrap()).await.status,
        204
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t2 = b.get_token("inv", &key).await.json()["access_token"].clone();
    assert_ne!(t2, t1);
    assert_eq!(a.get_token("inv", &key).await.json()["access_token"], t2);
    assert_eq!(partner.received_requests().await.unwrap().len(), 2);
    a.stop().await;
    b.stop().await;
}
backends!(invalidation_reaches_every_replica: PostgresRedis);

async fn a_dead_lock_holder_delays_but_does_not_block(mut env: TestEnv) {
    env.extra
        .insert("BROKER_UPSTREAM_TIMEOUT_MS".into(), "1000".into());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("orphan", &partner, "s")).await;
    let key = app.create_caller("c", json!("*")).await;
    // A replica took the lock and died: its lock lives out its TTL (here 2 s).
    let client = redis::Client::open(env.redis_url.clone().unwrap()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let lock = format!("{}:{{orphan}}:lock", env.redis_prefix);
    let _: () = redis::cmd("SET")
        .arg(&lock)
        .arg("dead-replica")
        .arg("PX")
        .arg(2000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let t0 = Instant::now();
    let mut tokens = fetch_many(std::slice::from_ref(&app), "orphan", &key, 20).await;
    let waited = t0.elapsed();
    tokens.dedup();
    assert_eq!(tokens.len(), 1);
    assert_eq!(partner.received_requests().await.unwrap().len(), 1);
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "callers recovered after the lock's TTL, not before or much later: {waited:?}"
    );
    // The dead holder's late release cannot remove a live lock: its value no longer matches.
    let left: Option<String> = redis::cmd("GET")
        .arg(&lock)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_none(), "the new holder released its own lock");
    app.stop().await;
}
backends!(a_dead_lock_holder_delays_but_does_not_block: PostgresRedis);

async fn a_stalled_writer_cannot_overwrite_a_newer_token(env: TestEnv) {
    use token_broker::cache::CachedToken;
    use token_broker::issuers::Minted;
    let app = env.spawn().await;
    let shared = app.state.broker.shared_cache().unwrap().clone();
    let tenant = token_broker::tenants::TenantId::parse("fenced").unwrap();
    let now = token_broker::time::now_ms();
    let token = |value: &str, issued_ago_ms: i64, life_ms: i64| {
        Arc::new(CachedToken::from_minted(Minted {
            access_token: value.to_owned().into(),
            refresh_token: None,
            issued_at_ms: now - issued_ago_ms,
            expires_at_ms: now - issued_ago_ms + life_ms,
            dpop_jkt: None,
        }))
    };
    use secrecy::ExposeSecret;
    let newer = shared
        .put(&tenant, token("newer", 0, 300_000))
        .await
        .unwrap();
    assert_eq!(newer.access_token.expose_secret(), "newer");
    // A replica paused mid-mint writes late a token whose mint started earlier, though the
    // partner gave it a longer life: order is by mint start, not by expiry.
    let kept = shared
        .put(&tenant, token("stale", 5_000, 600_000))
        .await
        .unwrap();
    assert_eq!(
        kept.access_token.expose_secret(),
        "newer",
        "the later mint wins, whatever the expiries"
    );
    let got = shared.get(&tenant).await.unwrap().unwrap();
    assert_eq!(got.access_token.expose_secret(), "newer");
    // A later mint replaces it, even one that expires sooner.
    let later = shared
        .put(&tenant, token("later", -1_000, 60_000))
        .await
        .unwrap();
    assert_eq!(later.access_token.expose_secret(), "later");
    app.stop().await;
}
backends!(a_stalled_writer_cannot_overwrite_a_newer_token: PostgresRedis);
