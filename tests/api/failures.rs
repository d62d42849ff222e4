//! Partners that fail, hang, lie or throttle: bounded, clear, and never hammered.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

async fn many_callers_against_a_rejecting_partner(env: TestEnv) {
    let apps = if env.redis_url.is_some() {
        vec![env.spawn().await, env.spawn().await, env.spawn().await]
    } else {
        vec![env.spawn().await]
    };
    let partner = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"error": "invalid_client"}))
                .set_delay(Duration::from_millis(100)),
        )
        .mount(&partner)
        .await;
    apps[0]
        .create_tenant(&setu_spec("rejected", &partner, "wrong"))
        .await;
    let key = apps[0].create_caller("c", json!("*")).await;
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let app = &apps[i % apps.len()];
            let (client, url, key) = (
                app.client.clone(),
                format!("{}/v1/tenants/rejected/token", app.address),
                key.clone(),
            );
            tokio::spawn(async move {
                let r = client.get(url).bearer_auth(key).send().await.unwrap();
                (
                    r.status().as_u16(),
                    r.json::<Value>().await.unwrap()["code"].clone(),
                )
            })
        })
        .collect();
    for t in tasks {
        let (status, code) = t.await.unwrap();
        assert_eq!(
            (status, code.as_str().unwrap()),
            (502, "upstream_rejected_credentials")
        );
    }
    let attempts = partner.received_requests().await.unwrap().len();
    eprintln!(
        "60 callers over {} replica(s) against a rejecting partner: {attempts} attempt(s)",
        apps.len()
    );
    assert!(attempts <= apps.len(), "{attempts} attempts");
    // Later callers are answered from the circuit, without a partner call.
    let a = apps[0].get_token("rejected", &key).await;
    a.assert_problem(502, "upstream_rejected_credentials");
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(partner.received_requests().await.unwrap().len(), attempts);
    // A credential rotation closes the circuit: the partner is asked again at once.
    let put = apps[0]
        .send(
            apps[0]
                .admin(Method::PUT, "/admin/v1/tenants/rejected/credentials")
                .json(&json!({"client_id": "x", "client_secret": "y"})),
        )
        .await;
    assert_eq!(put.status, 204);
    apps[0]
        .get_token("rejected", &key)
        .await
        .assert_problem(502, "upstream_rejected_credentials");
    assert_eq!(
        partner.received_requests().await.unwrap().len(),
        attempts + 1
    );
    let view = apps[0]
        .send(apps[0].admin(Method::GET, "/admin/v1/tenants/rejected"))
        .await
        .json();
    assert_eq!(
        view["health"]["last_error"]["code"],
        "upstream_rejected_credentials"
    );
    assert_eq!(view["health"]["circuit"]["open"], true);
    for app in &apps {
        app.stop().await;
    }
}
backends!(many_callers_against_a_rejecting_partner: Sqlite, PostgresRedis);

async fn a_hanging_partner_releases_the_caller(mut env: TestEnv) {
    env.extra
        .insert("BROKER_UPSTREAM_TIMEOUT_MS".into(), "2000".into());
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .mount(&partner)
        .await;
    app.create_tenant(&setu_spec("hangs", &partner, "s")).await;
    let mut spec = setu_spec("hangs-fast", &partner, "s");
    spec["issuer"]["timeout_ms"] = json!(300);
    assert_eq!(app.create_tenant(&spec).await.status, 201);
    let key = app.create_caller("c", json!("*")).await;

    let t0 = Instant::now();
    app.get_token("hangs", &key)
        .await
        .assert_problem(504, "upstream_timeout");
    let waited = t0.elapsed();
    eprintln!("hanging partner: caller released after {waited:?} (bound 2 s mint budget + 2 s)");
    assert!(waited < Duration::from_millis(4_500), "{waited:?}");

    // With a 300 ms per-call timeout, the transient failure is retried within the budget.
    let t0 = Instant::now();
    app.get_token("hangs-fast", &key)
        .await
        .assert_problem(504, "upstream_timeout");
    let waited = t0.elapsed();
    let calls = partner.received_requests().await.unwrap().len();
    assert!(waited < Duration::from_millis(2_600), "{waited:?}");
    assert!(
        calls >= 3,
        "the per-tenant timeout allowed retries: {calls} calls in all"
    );
    app.stop().await;
}
backends!(a_hanging_partner_releases_the_caller: Sqlite);

async fn a_cached_token_is_served_while_the_partner_is_down(env: TestEnv) {
    // The timing (served to its usable end, one background refresh, then the problem) is in
    // `broker::tests` under a paused clock; here the same over HTTP without waiting: a renewal
    // forced by `min_ttl` fails, the held token is still served, and the partner's problem
    // reaches callers and the health view without the partner's text.
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    Mock::given(method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            if d.load(Ordering::SeqCst) {
                ResponseTemplate::new(503).set_body_string("down for maintenance")
            } else {
                ResponseTemplate::new(200).set_body_json(
                    json!({"access_token": "opaque-300s", "token_type": "Bearer", "expires_in": 300}),
                )
            }
        })
        .mount(&partner)
        .await;
    let spec = json!({"id": "flaky", "issuer": {"kind": "oauth2_client_credentials",
        "token_url": format!("{}/token", partner.uri()), "min_interval_ms": 0},
        "credentials": {"client_id": "a", "client_secret": "b"}});
    app.create_tenant(&spec).await;
    let key = app.create_caller("c", json!("*")).await;
    let token = app.get_token("flaky", &key).await.json()["access_token"].clone();
    down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    // 300 s asked, a little less left: a renewal, which fails.
    let renewal = app.get_token_min_ttl("flaky", &key, 300).await;
    renewal.assert_problem(503, "upstream_unavailable");
    assert!(!renewal.text.contains("maintenance"), "{}", renewal.text);
    assert!(partner.received_requests().await.unwrap().len() >= 2);
    for _ in 0..5 {
        let a = app.get_token("flaky", &key).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.json()["access_token"], token);
    }
    // Health rows are written off the caller's path: wait for the failed renewal's.
    let mut view = json!(null);
    for _ in 0..50 {
        view = app
            .send(app.admin(Method::GET, "/admin/v1/tenants/flaky"))
            .await
            .json();
        if view["health"]["last_error"]["code"].is_string() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(view["health"]["last_success_at"].is_string(), "{view}");
    assert_eq!(
        view["health"]["last_error"]["code"], "upstream_unavailable",
        "{view}"
    );
    assert!(!view.to_string().contains("maintenance"));
    app.stop().await;
}
backends!(a_cached_token_is_served_while_the_partner_is_down: Sqlite, PostgresRedis);

async fn transient_failures_are_retried_and_retry_after_is_honoured(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    Mock::given(method("POST"))
        .respond_with(move |req: &wiremock::Request| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            match (req.url.path(), n) {
                ("/flaky/auth/token", 0) => ResponseTemplate::new(502),
                ("/flaky/auth/token", _) => {
                    ResponseTemplate::new(200).set_body_json(json!({"accessToken": setu_jwt(300)}))
                }
                _ => ResponseTemplate::new(429).insert_header("retry-after", "7"),
            }
        })
        .mount(&partner)
        .await;
    let mut spec = setu_spec("flaky", &partner, "s");
    spec["issuer"]["token_url"] = json!(format!("{}/flaky/auth/token", partner.uri()));
    app.create_tenant(&spec).await;
    let key = app.create_caller("c", json!("*")).await;
    assert_eq!(app.get_token("flaky", &key).await.status, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one retry after the 502");

    let mut spec = setu_spec("throttled", &partner, "s");
    spec["issuer"]["token_url"] = json!(format!("{}/throttled/auth/token", partner.uri()));
    app.create_tenant(&spec).await;
    let a = app.get_token("throttled", &key).await;
    a.assert_problem(503, "upstream_rate_limited");
    assert_eq!(a.headers["retry-after"], "7");
    let before = calls.load(Ordering::SeqCst);
    let again = app.get_token("throttled", &key).await;
    again.assert_problem(503, "upstream_rate_limited");
    let ra: u64 = again.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((6..=7).contains(&ra), "Retry-After {ra}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before,
        "no call while the partner asked to wait"
    );
    app.stop().await;
}
backends!(transient_failures_are_retried_and_retry_after_is_honoured: Sqlite, PostgresRedis);

async fn min_interval_paces_every_minting_path(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let mut spec = setu_spec("paced", &partner, "s");
    spec["issuer"]["min_interval_ms"] = json!(700);
    app.create_tenant(&spec).await;
    let key = app.create_caller("c", json!("*")).await;
    let t0 = Instant::now();
    let tok = app.get_token("paced", &key).await.json()["access_token"].clone();
    assert_eq!(
        app.send(app.admin(Method::POST, "/admin/v1/tenants/paced/test"))
            .await
            .status,
        200
    );
    let now_token = app.get_token("paced", &key).await.json()["access_token"].clone();
    assert_ne!(now_token, tok);
    assert_eq!(
        app.invalidate("paced", &key, now_token.as_str().unwrap())
            .await
            .status,
        204
    );
    assert_eq!(app.get_token("paced", &key).await.status, 200);
    let took = t0.elapsed();
    assert_eq!(partner.received_requests().await.unwrap().len(), 3);
    assert!(
        took >= Duration::from_millis(1_350),
        "three mints 700 ms apart took {took:?}"
    );
    app.stop().await;
}
backends!(min_interval_paces_every_minting_path: Sqlite, PostgresRedis);

async fn token_urls_that_reach_inside_are_refused(mut env: TestEnv) {
    env.extra
        .insert("BROKER_ALLOW_INSECURE_ISSUERS".into(), "false".into());
    let app = env.spawn().await;
    for url in [
        "http://169.254.169.254/latest/meta-data/iam",
        "https://169.254.169.254/token",
        "https://127.0.0.1/token",
        "https://localhost/token",
        "https://[::1]/token",
        "https://2130706433/token",
        "https://127.1/token",
        "https://[::ffff:127.0.0.1]/token",
        "https://10.1.2.3/token",
        "https://172.20.0.1/token",
        "https://192.168.0.10/token",
        "https://[fd00::1]/token",
        "https://[fe80::1]/token",
        "https://metadata.google.internal/computeMetadata/v1/",
        "file:///etc/passwd",
        "http://partner.example.com/token",
        "https://user:pass@partner.example.com/token",
    ] {
        let spec = json!({"id": "ssrf", "issuer": {"kind": "setu_partner", "token_url": url},
            "credentials": {"client_id": "a", "client_secret": "b"}});
        let body = app
            .create_tenant(&spec)
            .await
            .assert_problem(422, "invalid_spec");
        assert_eq!(body["field"], "issuer.token_url", "{url}");
    }
    // Nothing was stored, so nothing can ever be sent there.
    let list = app
        .send(app.admin(Method::GET, "/admin/v1/tenants"))
        .await
        .json();
    assert_eq!(list["tenants"], json!([]));
    // A patch cannot smuggle one in either.
    let ok = json!({"id": "ok", "issuer": {"kind": "setu_partner", "token_url": "https://partner.example.com/auth/token"},
        "credentials": {"client_id": "a", "client_secret": "b"}});
    assert_eq!(app.create_tenant(&ok).await.status, 201);
    let p = app
        .send(
            app.admin(Method::PATCH, "/admin/v1/tenants/ok")
                .json(&json!({"issuer": {"token_url": "https://127.0.0.1:9/x"}})),
        )
        .await;
    assert_eq!(
        p.assert_problem(422, "invalid_spec")["field"],
        "issuer.token_url"
    );
    app.stop().await;
}
backends!(token_urls_that_reach_inside_are_refused: Sqlite);

/// A partner that failed while callers still held a usable token: the circuit's cool-down has
/// grown past the token's life, yet once the held token is past its refresh point the
/// background refresh probes the partner (one call a second at most) and closes the circuit.
/// The tenant view says so while it is open: probed, next call in 1 s, the cool-down apart.
async fn refresh_ahead_probes_an_open_circuit(env: TestEnv) {
    let app = env.spawn().await;
    let down = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let partner = MockServer::start().await;
    let (d, c) = (down.clone(), calls.clone());
    Mock::given(method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            c.fetch_add(1, Ordering::SeqCst);
            if d.load(Ordering::SeqCst) {
                ResponseTemplate::new(503)
            } else {
                ResponseTemplate::new(200).set_body_json(json!({"accessToken": setu_jwt(20)}))
            }
        })
        .mount(&partner)
        .await;
    let mut spec = setu_spec("recovers", &partner, "s");
    spec["issuer"]["min_interval_ms"] = json!(0);
    app.create_tenant(&spec).await;
    let key = app.create_caller("c", json!("*")).await;
    let started = Instant::now();
    let first = app.get_token("recovers", &key).await.json()["access_token"].clone();

    // The partner fails three admin tests: a cool-down of 20 s, longer than the token lives.
    down.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        let test = app
            .send(app.admin(Method::POST, "/admin/v1/tenants/recovers/test"))
            .await;
        assert_ne!(test.status, 200, "{:?}", test.json());
    }
    let view = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/recovers"))
        .await
        .json();
    let circuit = &view["health"]["circuit"];
    assert_eq!(circuit["open"], true, "{view}");
    assert_eq!(circuit["probed"], true, "{view}");
    assert_eq!(circuit["retry_after"], 1, "{view}");
    let cooldown = circuit["cooldown_remaining"].as_u64().unwrap();
    assert!((10..=20).contains(&cooldown), "{view}");

    // The partner is back; callers are still served the held token.
    down.store(false, Ordering::SeqCst);
    let before = calls.load(Ordering::SeqCst);
    // Past the refresh point (at most 13.4 s in), before the usable end (15.5 s in).
    tokio::time::sleep(Duration::from_millis(13_600).saturating_sub(started.elapsed())).await;
    let held = app.get_token("recovers", &key).await;
    assert_eq!(held.status, 200);
    assert_eq!(
        held.json()["access_token"],
        first,
        "the held token is served"
    );
    let mut closed = false;
    for _ in 0..30 {
        let view = app
            .send(app.admin(Method::GET, "/admin/v1/tenants/recovers"))
            .await
            .json();
        if view["health"]["circuit"].is_null() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        closed,
        "the refresh-ahead probe closes the circuit within 1.5 s"
    );
    assert_eq!(calls.load(Ordering::SeqCst), before + 1, "one probe");
    let now = app.get_token("recovers", &key).await.json()["access_token"].clone();
    assert_ne!(now, first, "the refreshed token is served");
    app.stop().await;
}
backends!(refresh_ahead_probes_an_open_circuit: Sqlite, PostgresRedis);
