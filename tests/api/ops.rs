//! What ops see and run: metrics, readiness, Redis and Postgres outages, logs, shutdown.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

async fn the_metric_catalog(env: TestEnv) {
    let app = env.spawn().await;
    let p = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("m1", &p, "s")).await;
    let key = app.create_caller("c", json!("*")).await;
    for _ in 0..3 {
        assert_eq!(app.get_token("m1", &key).await.status, 200);
    }
    app.send(app.client.request(
        Method::from_bytes(b"BREW").unwrap(),
        format!("{}/healthz", app.address),
    ))
    .await;
    app.get("/no/such/path/123").await;
    let text = app.get("/metrics").await.text;
    for family in [
        "broker_token_requests_total{outcome=\"minted\",tenant=\"m1\"} 1",
        "broker_token_requests_total{outcome=\"cache\",tenant=\"m1\"} 2",
        "broker_cache_lookups_total{layer=\"l1\",result=\"hit\"}",
        "broker_upstream_requests_total{outcome=\"ok\",tenant=\"m1\"} 1",
        "broker_upstream_request_duration_seconds_bucket{tenant=\"m1\",le=\"10\"} 1",
        "broker_token_expiry_seconds{tenant=\"m1\"}",
        "broker_tenants 1",
        "http_requests_total{method=\"GET\",route=\"/v1/tenants/{tenant_id}/token\",status=\"200\"} 3",
        "http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/tenants/{tenant_id}/token\",le=\"0.0001\"}",
        "http_requests_total{method=\"OTHER\",route=\"/healthz\",status=\"405\"} 1",
        "http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"} 1",
    ] {
        assert!(text.contains(family), "missing {family}\n{text}");
    }
    assert!(
        !text.contains("/no/such/path"),
        "raw paths never become labels"
    );
    app.stop().await;
}
backends!(the_metric_catalog: Sqlite, PostgresRedis);

async fn redis_outage_and_slowness(mut env: TestEnv) {
    let Some(mut redis) = OwnRedis::start() else {
        skip("redis-server on PATH");
        return;
    };
    env.redis_url = Some(redis.url());
    let app = env.spawn().await;
    let p = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("held", &p, "s")).await;
    app.create_tenant(&setu_spec("cold", &p, "s")).await;
    let key = app.create_caller("c", json!("*")).await;
    let token = app.get_token("held", &key).await.json()["access_token"].clone();
    assert_eq!(app.get("/readyz").await.status, 200);

    // Paused Redis: cached tokens come from this process at cache-hit speed.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut took = Vec::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        assert_eq!(app.get_token("held", &key).await.status, 200);
        took.push(t0.elapsed());
    }
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    eprintln!("token p99 with Redis paused: {p99:?}");
    assert!(
        p99 < Duration::from_millis(80),
        "p99 {p99:?} is past the Redis timeout"
    );
    tokio::time::sleep(Duration::from_millis(1600)).await;

    // Stopped Redis: degraded but ready (tokens are still served), held tokens served, a
    // mint still works here.
    redis.stop();
    let r = app.get("/readyz").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json()["status"], "degraded");
    let why = r.json()["checks"]["redis"].as_str().unwrap().to_owned();
    assert!(why.starts_with("unavailable: "), "{why}");
    assert_eq!(r.json()["checks"]["database"], "ok");
    assert!(app
        .get("/metrics")
        .await
        .text
        .contains("broker_dependency_up{dependency=\"redis\"} 0"));
    assert_eq!(app.get("/healthz").await.status, 200);
    assert_eq!(
        app.get_token("held", &key).await.json()["access_token"],
        token
    );
    let cold = app.get_token("cold", &key).await;
    assert_eq!(
        cold.status, 200,
        "a mint works on a single replica without Redis: {}",
        cold.text
    );
    assert!(app
        .get("/metrics")
        .await
        .text
        .contains("broker_lock_degraded_total 1"));

    // Redis comes back: the broker reconnects by itself.
    assert!(redis.restart());
    let mut ready = false;
    for _ in 0..50 {
        if app.get("/readyz").await.json()["status"] == "ready" {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "readiness recovers when Redis is back");
    assert!(app
        .get("/metrics")
        .await
        .text
        .contains("broker_dependency_up{dependency=\"redis\"} 1"));
    assert_eq!(app.get_token("held", &key).await.status, 200);
    app.stop().await;
}
backends!(redis_outage_and_slowness: Postgres);

async fn postgres_outage(mut env: TestEnv) {
    let proxy = env.database_through_cuttable_proxy().await;
    let app = env.spawn().await;
    let p = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("pg", &p, "s")).await;
    let key = app.create_caller("c", json!("*")).await;
    let token = app.get_token("pg", &key).await.json()["access_token"].clone();

    proxy.cut();
    assert_eq!(app.get("/healthz").await.status, 200);
    // It still serves the callers it knows: degraded, not pulled from the load balancer.
    let r = app.get("/readyz").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "degraded");
    assert_eq!(r.json()["checks"]["database"], "unavailable");
    // (Past the caller cache's 10 s freshness too: `auth::tests` shows that under a paused
    // clock, and `faults::postgres_down_known_callers_and_mints_go_on` under load for 12 s.)
    assert_eq!(
        app.get_token("pg", &key).await.json()["access_token"],
        token,
        "cached tokens are still served"
    );
    let w = app.create_tenant(&setu_spec("new", &p, "s")).await;
    w.assert_problem(503, "database_unavailable");
    app.stop().await;
}
backends!(postgres_outage: Postgres);

async fn sigterm_drains_and_exits_zero(_env: TestEnv) {
    let p = setu_partner(300, 1500).await;
    let mut broker = BrokerProcess::start(&[]).await;
    let app_client = reqwest::Client::new();
    let admin = |m: Method, path: &str| {
        app_client
            .request(m, format!("{}{path}", broker.address))
            .bearer_auth(ADMIN_TOKEN)
    };
    assert_eq!(
        admin(Method::POST, "/admin/v1/tenants")
            .json(&setu_spec("slow", &p, "s"))
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let created: serde_json::Value = admin(Method::POST, "/admin/v1/callers")
        .json(&json!({"name": "c", "tenants": "*"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let in_flight = {
        let url = format!("{}/v1/tenants/slow/token", broker.address);
        tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .bearer_auth(key)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    broker.sigterm();
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        200,
        "the in-flight request completes"
    );
    let status = loop {
        if let Some(s) = broker.child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "exits within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "SIGTERM with a request in flight: exit {status} after {:?}",
        t0.elapsed()
    );
    assert!(status.success());
    assert!(broker.stderr().contains("token-broker stopped"));
}
backends!(sigterm_drains_and_exits_zero: Sqlite);

async fn trace_logs_hold_no_secrets(_env: TestEnv) {
    let tag = format!("{:x}", rand::random::<u64>());
    let secret = format!("TRACE-client-secret-{tag}");
    let password = format!("TRACE-password-{tag}");
    let refresh = format!("TRACEREFRESH{tag}");
    let access = comm100_jwt(43200);
    let p = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": access, "expires_in": 43200, "token_type": "Bearer", "refresh_token": refresh})))
        .mount(&p)
        .await;
    let broker = BrokerProcess::start(&[("RUST_LOG", "trace")]).await;
    let c = reqwest::Client::new();
    let admin = |m: Method, path: &str| {
        c.request(m, format!("{}{path}", broker.address))
            .bearer_auth(ADMIN_TOKEN)
    };
    let mut spec = comm100_spec("traced", &p, &password);
    spec["issuer"]["kind"] = json!("oauth2_password");
    spec["credentials"] =
        json!({"client_id": "cid", "client_secret": secret, "username": "u", "password": password});
    assert_eq!(
        admin(Method::POST, "/admin/v1/tenants")
            .json(&spec)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let created: serde_json::Value = admin(Method::POST, "/admin/v1/callers")
        .json(&json!({"name": "c", "tenants": "*"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["api_key"].as_str().unwrap().to_owned();
    let got: serde_json::Value = c
        .get(format!("{}/v1/tenants/traced/token", broker.address))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["access_token"], access.as_str());
    c.get(format!(
        "{}/v1/tenants/traced/token?min_ttl=43199",
        broker.address
    ))
    .bearer_auth(&key)
    .send()
    .await
    .unwrap();
    admin(Method::POST, "/admin/v1/tenants/traced/test")
        .send()
        .await
        .unwrap();
    admin(Method::PUT, "/admin/v1/tenants/traced/credentials")
        .json(&json!({"client_id": "cid", "client_secret": secret, "username": "u", "password": password}))
        .send()
        .await
        .unwrap();
    c.post(format!(
        "{}/v1/tenants/traced/token/invalidate",
        broker.address
    ))
    .bearer_auth(&key)
    .json(&json!({"access_token": access}))
    .send()
    .await
    .unwrap();
    broker.sigterm();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = broker.stderr();
    assert!(
        log.contains("TRACE") && log.len() > 10_000,
        "trace output was captured ({} bytes)",
        log.len()
    );
    for s in [
        &secret,
        &password,
        &refresh,
        &access,
        &key,
        &ADMIN_TOKEN.to_owned(),
    ] {
        assert!(
            !log.contains(s.as_str()),
            "a secret appears in trace-level logs"
        );
    }
}
backends!(trace_logs_hold_no_secrets: Sqlite);

/// The gauges the alerts stand on: the circuit gauge goes to 1 on a failed mint and back to 0
/// on a successful one; the last success is a timestamp; an expired token's gauge stays at 0;
/// build info and process metrics are there.
async fn alert_gauges_follow_the_code(env: TestEnv) {
    let app = env.spawn().await;
    let partner = comm100_partner(2, 0).await;
    app.create_tenant(&comm100_spec("gauged", &partner.server, "pw"))
        .await;
    let key = app.create_caller("c", json!("*")).await;
    partner
        .failing
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(app.get_token("gauged", &key).await.status, 503);
    let m = app.get("/metrics").await.text;
    assert_eq!(
        series(&m, "broker_circuit_open{tenant=\"gauged\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        series(
            &m,
            "broker_last_mint_success_timestamp_seconds{tenant=\"gauged\"}"
        ),
        None
    );
    partner
        .failing
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let tested = app
        .send(app.admin(Method::POST, "/admin/v1/tenants/gauged/test"))
        .await;
    assert_eq!(tested.status, 200, "{}", tested.text);
    let m = app.get("/metrics").await.text;
    assert_eq!(
        series(&m, "broker_circuit_open{tenant=\"gauged\"}"),
        Some(0.0)
    );
    let at = series(
        &m,
        "broker_last_mint_success_timestamp_seconds{tenant=\"gauged\"}",
    )
    .unwrap();
    assert!((at - now_s() as f64).abs() < 5.0, "{at}");
    assert!(series(&m, "broker_build_info{version=").is_some(), "{m}");
    assert!(series(&m, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(series(&m, "process_open_fds").is_some());
    // The 2 s token runs out: the gauge stays, at 0 (polled, up to 5 s).
    let mut m = String::new();
    for _ in 0..50 {
        m = app.get("/metrics").await.text;
        if series(&m, "broker_token_expiry_seconds{tenant=\"gauged\"}") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        series(&m, "broker_token_expiry_seconds{tenant=\"gauged\"}"),
        Some(0.0),
        "{m}"
    );
    app.stop().await;
}
backends!(alert_gauges_follow_the_code: Sqlite, PostgresRedis);

/// `token-broker ready` (the image's health check) exits 0 when /readyz answers 200, 1 when
/// nothing answers.
#[tokio::test]
async fn the_ready_command_checks_readyz() {
    let broker = BrokerProcess::start(&[]).await;
    let bin = env!("CARGO_BIN_EXE_token-broker");
    let ok = std::process::Command::new(bin)
        .args(["ready", "--url", &format!("{}/readyz", broker.address)])
        .env_clear()
        .status()
        .unwrap();
    assert!(ok.success());
    let port = broker.address.rsplit(':').next().unwrap().to_owned();
    let by_listen = std::process::Command::new(bin)
        .arg("ready")
        .env_clear()
        .env("BROKER_LISTEN", format!("0.0.0.0:{port}"))
        .status()
        .unwrap();
    assert!(by_listen.success(), "the port is taken from BROKER_LISTEN");
    drop(broker);
    let down = std::process::Command::new(bin)
        .args(["ready", "--url", &format!("http://127.0.0.1:{port}/readyz")])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stderr).contains("readyz"));
}

/// A deleted tenant's series (counters and histograms too, whatever their other labels) leave
/// `/metrics` on every replica, not only on the one that served the DELETE (before: ~22 series
/// per deleted tenant stayed on each other replica).
async fn a_deleted_tenants_series_leave_every_replica(env: TestEnv) {
    let (a, b) = (env.spawn().await, env.spawn().await);
    let partner = setu_partner(300, 0).await;
    a.create_tenant(&setu_spec("gone", &partner, "s")).await;
    a.create_tenant(&setu_spec("kept", &partner, "s")).await;
    let key = a.create_caller("billing", json!("*")).await;
    for app in [&a, &b] {
        for t in ["gone", "kept"] {
            assert_eq!(app.get_token(t, &key).await.status, 200);
        }
    }
    let series = |text: &str, t: &str| {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("tenant=\"{t}\"")))
            .count()
    };
    let before = b.get("/metrics").await.text;
    assert!(series(&before, "gone") >= 2, "{before}");
    let deleted = a
        .send(a.admin(Method::DELETE, "/admin/v1/tenants/gone"))
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
    for app in [&a, &b] {
        let mut left = usize::MAX;
        for _ in 0..50 {
            let text = app.get("/metrics").await.text;
            left = series(&text, "gone");
            if left == 0 {
                assert!(series(&text, "kept") >= 2, "other tenants keep theirs");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(left, 0, "{} kept series of the deleted tenant", app.address);
    }
}
backends!(a_deleted_tenants_series_leave_every_replica: PostgresRedis);

/// `BROKER_ADMIN_LISTEN`: the admin API, the console and `/metrics` answer only on the admin
/// port, the token API and OAuth only on the main one; health on both. (So a NetworkPolicy can
/// open the token port widely and the admin port narrowly.)
async fn an_admin_port_of_its_own(mut env: TestEnv) {
    env.extra
        .insert("BROKER_ADMIN_LISTEN".into(), "127.0.0.1:0".into());
    let app = token_broker::app::Application::build(env.settings())
        .await
        .unwrap();
    let (main, admin) = (app.port(), app.admin_port().expect("an admin port"));
    assert_ne!(main, admin);
    let handle = app.handle();
    tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let status = |port: u16, path: &'static str, admin_auth: bool| {
        let mut req = client.get(format!("http://127.0.0.1:{port}{path}"));
        if admin_auth {
            req = req.bearer_auth(ADMIN_TOKEN);
        }
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for (path, auth) in [
        ("/admin/v1/tenants", true),
        ("/metrics", false),
        ("/admin/console", false),
    ] {
        assert_eq!(
            status(admin, path, auth).await,
            200,
            "{path} on the admin port"
        );
        assert_eq!(
            status(main, path, auth).await,
            404,
            "{path} on the main port"
        );
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(status(main, path, false).await, 200, "{path}");
        assert_eq!(status(admin, path, false).await, 200, "{path}");
    }
    assert_eq!(
        status(main, "/.well-known/oauth-authorization-server", false).await,
        200
    );
    assert_eq!(
        status(admin, "/.well-known/oauth-authorization-server", false).await,
        404
    );
    assert_eq!(status(main, "/v1/tenants/acme/token", false).await, 401);
    assert_eq!(status(admin, "/v1/tenants/acme/token", false).await, 404);
    handle.stop(true).await;
}
backends!(an_admin_port_of_its_own: Sqlite);
