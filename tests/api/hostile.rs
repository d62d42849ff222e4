//! Hostile traffic and lying partners: an unauthenticated flood, a looping invalidator, absurd
//! lifetimes, huge Retry-After values, slow and untyped bodies, loose key files, proxies in the
//! environment, metric labels for tenants that do not exist.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

fn db_bytes(env: &TestEnv) -> u64 {
    ["broker.db", "broker.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(env.dir.path().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

/// Unauthenticated requests at full speed (a 24,000-character tenant segment or an invalid
/// tenant id that differs every time, a fresh request id each) while a real caller fetches: the caller sees only 200s, even with a token-entry
/// queue of 64, and the database grows by a few rows a second, not one per request.
async fn an_unauthenticated_flood_neither_blocks_callers_nor_fills_the_disk(mut env: TestEnv) {
    env.extra.insert("BROKER_AUDIT_QUEUE".into(), "64".into());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let key = app.create_caller("billing", json!(["acme"])).await;
    assert_eq!(app.get_token("acme", &key).await.status, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before = db_bytes(&env);

    let long = "x".repeat(24_000);
    let sent = Arc::new(AtomicUsize::new(0));
    let until = Instant::now() + Duration::from_secs(4);
    let flood: Vec<_> = (0..24)
        .map(|i| {
            let (client, long_url, address, sent) = (
                app.client.clone(),
                format!("{}/v1/tenants/{long}/token", app.address),
                app.address.clone(),
                sent.clone(),
            );
            let junk_key = format!("tbk_{}", "A".repeat(49));
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    // Every fourth request has the 24,000-character segment (refused before
                    // routing), the others an invalid tenant id that differs every time.
                    let (url, want) = if n % 4 == 0 {
                        (long_url.clone(), 414)
                    } else {
                        (
                            format!("{address}/v1/tenants/Not-A-Tenant-{i}-{n}/token"),
                            401,
                        )
                    };
                    let mut req = client
                        .get(&url)
                        .header("x-request-id", format!("flood-{i}-{n}"));
                    req = match n % 3 {
                        0 => req,
                        1 => req.bearer_auth("garbage"),
                        _ => req.bearer_auth(&junk_key),
                    };
                    if let Ok(r) = req.send().await {
                        assert_eq!(r.status(), want);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let mut real = Vec::new();
    while Instant::now() < until {
        real.push(app.get_token("acme", &key).await.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for f in flood {
        f.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = db_bytes(&env);
    let flooded = sent.load(Ordering::Relaxed);
    eprintln!(
        "flood: {flooded} unauthenticated requests in 4 s ({}/s); real caller {} fetches, statuses {:?}; database {} -> {} bytes",
        flooded / 4,
        real.len(),
        {
            let mut s = real.clone();
            s.dedup();
            s
        },
        before,
        after
    );
    assert!(flooded > 1_000, "the flood was too slow to mean anything");
    assert!(real.len() > 20);
    assert!(real.iter().all(|s| *s == 200), "{real:?}");
    assert!(
        after.saturating_sub(before) < 3 * 1024 * 1024,
        "database grew by {} bytes",
        after - before
    );
    // The refusals are there, coalesced, and without the unparsed tenant segment.
    let entries = app.audit("limit=500").await;
    let refused: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "refused").collect();
    assert!(!refused.is_empty(), "{entries:?}");
    let counted: i64 = refused.iter().map(|e| e["count"].as_i64().unwrap()).sum();
    assert!(
        refused.len() < 200 && counted as usize >= flooded / 2 - flooded / 8,
        "{} refusal rows for {counted} refusals",
        refused.len()
    );
    assert!(
        refused.iter().all(|e| e["tenant"].is_null()),
        "an unparsed tenant id was stored"
    );
    assert!(!format!("{entries:?}").contains(&long[..100]));
    app.stop().await;
}
backends!(an_unauthenticated_flood_neither_blocks_callers_nor_fills_the_disk: Sqlite);

/// An authenticated caller in a loop, while the audit writer cannot write (another connection
/// holds the database's write lock, or on Postgres a lock on the audit table): proxied calls to a partner API that is down, on a
/// different path each time, and tenant ids outside its scope that differ each time, far past
/// its rate. With a queue of 64 rows, another caller's fetches stay 200: failing calls that
/// differ only in their request id are one row, and past its rate a caller's refusals are one
/// row per flush whatever path or tenant they name. (Before: one row per request, and the
/// other caller got 503 `audit_unavailable` once 64 were waiting.) Every request is on the
/// record once the lock is gone: the counts add up.
async fn a_callers_failing_loop_cannot_lock_the_others_out(mut env: TestEnv) {
    use sqlx::Connection;
    env.extra.insert("BROKER_AUDIT_QUEUE".into(), "64".into());
    env.extra.insert("BROKER_CALLER_RATE".into(), "5".into());
    env.extra.insert("BROKER_CALLER_BURST".into(), "5".into());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("other", &partner, "s")).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let mut spec = setu_spec("acme", &partner, "s");
    spec["proxy"] = json!({ "base_url": dead_url });
    assert_eq!(app.create_tenant(&spec).await.status, 201);
    let noisy = app.create_caller("noisy", json!(["acme"])).await;
    let billing = app.create_caller("billing", json!(["other"])).await;
    assert_eq!(app.get_token("other", &billing).await.status, 200);
    let proxied = |path: String| {
        app.client
            .get(format!("{}/v1/tenants/acme/proxy/{path}", app.address))
            .bearer_auth(&noisy)
            .send()
    };
    assert_eq!(proxied("warm".into()).await.unwrap().status(), 503);
    tokio::time::sleep(Duration::from_millis(600)).await;

    sqlx::any::install_default_drivers();
    let mut locker = sqlx::AnyConnection::connect(&env.database_url)
        .await
        .unwrap();
    // SQLite: the database's write lock; Postgres: the audit table, locked as a migration would.
    let lock = match env.backend {
        Backend::Sqlite => "BEGIN EXCLUSIVE",
        _ => "BEGIN; LOCK TABLE audit_log IN ACCESS EXCLUSIVE MODE",
    };
    sqlx::raw_sql(lock).execute(&mut locker).await.unwrap();
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    for n in 0..200 {
        let resp = if n % 2 == 0 {
            proxied(format!("accounts/{n}")).await.unwrap()
        } else {
            app.client
                .get(format!("{}/v1/tenants/t-{n}/token", app.address))
                .bearer_auth(&noisy)
                .send()
                .await
                .unwrap()
        };
        let body: Value = resp.json().await.unwrap();
        *statuses
            .entry(body["code"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    assert!(!statuses.contains_key("audit_unavailable"), "{statuses:?}");
    assert!(statuses["rate_limited"] >= 190, "{statuses:?}");
    let fetched = app.get_token("other", &billing).await;
    assert_eq!(fetched.status, 200, "{}", fetched.text);

    drop(locker);
    let deadline = Instant::now() + Duration::from_secs(10);
    let recorded = loop {
        let entries = app.audit("caller=noisy&limit=500").await;
        let counted: i64 = entries.iter().map(|e| e["count"].as_i64().unwrap()).sum();
        if counted >= 201 || Instant::now() > deadline {
            break (counted, entries.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(recorded.0, 201, "every request is on the record");
    assert!(recorded.1 < 20, "{} rows for 201 requests", recorded.1);
    app.stop().await;
}
backends!(a_callers_failing_loop_cannot_lock_the_others_out: Sqlite, Postgres);

/// A caller looping "fetch, report as rejected" for 3 s. With the re-mint guard the partner
/// sees two calls; with the guard off (`invalidate_min_age_ms: 0`), the default ceiling of one
/// partner call a second still holds.
async fn a_looping_invalidator_cannot_storm_the_partner(env: TestEnv) {
    let app = env.spawn().await;
    let guarded = comm100_partner(3600, 0).await;
    let unguarded = comm100_partner(3600, 0).await;
    app.create_tenant(&comm100_spec("guarded", &guarded.server, "pw"))
        .await;
    let mut spec = comm100_spec("unguarded", &unguarded.server, "pw");
    spec["issuer"]["invalidate_min_age_ms"] = json!(0);
    assert_eq!(app.create_tenant(&spec).await.status, 201);
    let key = app.create_caller("looper", json!("*")).await;

    for (tenant, partner) in [("guarded", &guarded), ("unguarded", &unguarded)] {
        let t0 = Instant::now();
        let mut outcomes = Vec::new();
        while t0.elapsed() < Duration::from_secs(3) {
            let a = app.get_token(tenant, &key).await;
            assert_eq!(a.status, 200, "{}", a.text);
            let token = a.json()["access_token"].as_str().unwrap().to_owned();
            let r = app.invalidate(tenant, &key, &token).await;
            match r.status {
                204 => outcomes.push("204".to_owned()),
                429 => {
                    let body = r.assert_problem(429, "invalidate_throttled");
                    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
                    // The window of a one-hour token is 5 % of it: 180 s.
                    assert!((1..=180).contains(&retry), "Retry-After {retry}");
                    assert!(!body.to_string().contains(&token));
                    outcomes.push("429".to_owned());
                }
                other => panic!("{other}: {}", r.text),
            }
        }
        let calls = partner.calls.load(Ordering::SeqCst);
        let rate = calls as f64 / t0.elapsed().as_secs_f64();
        outcomes.dedup();
        eprintln!(
            "looping invalidator on {tenant}: {calls} partner calls in {:?} ({rate:.1}/s); outcomes {outcomes:?}",
            t0.elapsed()
        );
        if tenant == "guarded" {
            assert!(calls <= 2, "{calls} partner calls");
            assert_eq!(outcomes.last().map(String::as_str), Some("429"));
        } else {
            assert!(calls >= 2, "every report is honoured");
            assert!(
                calls <= 5,
                "{calls} partner calls in 3 s: the 1 s default ceiling"
            );
        }
    }
    let metrics = app.get("/metrics").await.text;
    let throttled = [
        "outcome=\"throttled\",tenant=\"guarded\"",
        "tenant=\"guarded\",outcome=\"throttled\"",
    ]
    .iter()
    .filter_map(|l| series(&metrics, &format!("broker_invalidations_total{{{l}}}")))
    .fold(0.0, f64::max);
    assert!(throttled >= 1.0, "{metrics}");
    let audit = app.audit("tenant=guarded&limit=100").await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "token.invalidate" && e["outcome"] == "throttled"),
        "{audit:?}"
    );
    app.stop().await;
}
backends!(a_looping_invalidator_cannot_storm_the_partner: Sqlite, PostgresRedis);

/// Partners announcing absurd lifetimes: each tenant is minted once, and callers see an expiry
/// within a year, never 1970.
async fn a_partner_announcing_absurd_lifetimes_is_minted_once(env: TestEnv) {
    let app = env.spawn().await;
    let key = app.create_caller("c", json!("*")).await;
    let mut partners = Vec::new();
    let answers = [
        (
            "huge-expires-in",
            json!({"access_token": "a1", "token_type": "Bearer", "expires_in": 9e15}),
        ),
        (
            "inf-expires-in",
            json!({"access_token": "a2", "token_type": "Bearer", "expires_in": 1e300}),
        ),
        (
            "huge-jwt-exp",
            json!({"access_token": jwt(json!({"exp": 9_900_000_000_000_000_000u64, "iat": now_s()})), "token_type": "Bearer"}),
        ),
    ];
    for (id, answer) in answers {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer))
            .mount(&server)
            .await;
        let spec = json!({"id": id, "issuer": {"kind": "oauth2_client_credentials",
            "token_url": format!("{}/token", server.uri())},
            "credentials": {"client_id": "a", "client_secret": "b"}});
        assert_eq!(app.create_tenant(&spec).await.status, 201);
        partners.push((id, server));
    }
    let year = 366 * 86_400;
    for (id, server) in &partners {
        for _ in 0..8 {
            let a = app.get_token(id, &key).await;
            assert_eq!(a.status, 200, "{id}: {}", a.text);
            let body = a.json();
            let expires_in = body["expires_in"].as_i64().unwrap();
            assert!(expires_in > 0 && expires_in <= year, "{id}: {body}");
            let at = body["expires_at"].as_str().unwrap();
            assert!(!at.starts_with("1970"), "{id}: {body}");
        }
        let calls = server.received_requests().await.unwrap().len();
        assert_eq!(calls, 1, "{id}: {calls} partner calls for 8 fetches");
    }
    app.stop().await;
}
backends!(a_partner_announcing_absurd_lifetimes_is_minted_once: Sqlite);

/// A partner's 429 with `Retry-After: 99999999` reaches callers clamped to 300 s.
async fn a_huge_retry_after_is_clamped(env: TestEnv) {
    let app = env.spawn().await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "99999999"))
        .mount(&server)
        .await;
    app.create_tenant(&setu_spec("slowdown", &server, "s"))
        .await;
    let key = app.create_caller("c", json!("*")).await;
    for _ in 0..2 {
        let a = app.get_token("slowdown", &key).await;
        a.assert_problem(503, "upstream_rate_limited");
        let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=300).contains(&retry), "Retry-After {retry}");
    }
    app.stop().await;
}
backends!(a_huge_retry_after_is_clamped: Sqlite);

/// Bodies need `Content-Type: application/json` and must arrive whole within 10 s.
async fn untyped_and_slow_bodies_are_refused(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let key = app.create_caller("c", json!("*")).await;
    let untyped = app
        .send(
            app.client
                .post(format!("{}/v1/tenants/acme/token/invalidate", app.address))
                .bearer_auth(&key)
                .body(r#"{"access_token":"x"}"#),
        )
        .await;
    untyped.assert_problem(415, "unsupported_media_type");
    let untyped_admin = app
        .send(
            app.admin(Method::POST, "/admin/v1/callers")
                .body(r#"{"name":"x","tenants":"*"}"#),
        )
        .await;
    untyped_admin.assert_problem(415, "unsupported_media_type");

    // A body that trickles: headers promise 100 bytes, 10 arrive, then nothing.
    let mut sock = tokio::net::TcpStream::connect(app.address.trim_start_matches("http://"))
        .await
        .unwrap();
    let head = format!(
        "POST /v1/tenants/acme/token/invalidate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"access_"
    );
    sock.write_all(head.as_bytes()).await.unwrap();
    let t0 = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(20), sock.read(&mut answer))
        .await
        .expect("the broker answers a slow body within its deadline")
        .unwrap();
    let text = String::from_utf8_lossy(&answer[..n]);
    eprintln!("slow body answered after {:?}", t0.elapsed());
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert!(t0.elapsed() < Duration::from_secs(12));
    app.stop().await;
}
backends!(untyped_and_slow_bodies_are_refused: Sqlite);

/// A key file other users may read stops the start; at 0600 it is used.
async fn a_loose_key_file_stops_the_start(env: TestEnv) {
    use std::os::unix::fs::PermissionsExt;
    let key_file = env.dir.path().join("broker.db.key");
    std::fs::write(&key_file, "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n").unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = match token_broker::app::Application::build(env.settings()).await {
        Ok(_) => panic!("a 0644 key file was used"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
    assert!(
        !err.contains("AAECAwQF"),
        "the key leaked into the error: {err}"
    );
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let app = env.spawn().await;
    assert_eq!(app.get("/healthz").await.status, 200);
    app.stop().await;
}
backends!(a_loose_key_file_stops_the_start: Sqlite);

/// With proxies in the environment, partner calls still go direct (through a proxy the
/// address guard would not see the real target).
#[tokio::test]
async fn partner_calls_ignore_proxies_in_the_environment() {
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let proxied = Arc::new(AtomicUsize::new(0));
    let p = proxied.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = proxy.accept().await {
            p.fetch_add(1, Ordering::SeqCst);
            drop(sock);
        }
    });
    let broker = BrokerProcess::start(&[
        ("HTTP_PROXY", &proxy_url),
        ("HTTPS_PROXY", &proxy_url),
        ("ALL_PROXY", &proxy_url),
        ("http_proxy", &proxy_url),
    ])
    .await;
    let partner = setu_partner(300, 0).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let created = client
        .post(format!("{}/admin/v1/tenants", broker.address))
        .bearer_auth(ADMIN_TOKEN)
        .json(&setu_spec("acme", &partner, "s"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let caller: Value = client
        .post(format!("{}/admin/v1/callers", broker.address))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"name": "c", "tenants": "*"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got = client
        .get(format!("{}/v1/tenants/acme/token", broker.address))
        .bearer_auth(caller["api_key"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200, "{}", broker.stderr());
    assert_eq!(
        proxied.load(Ordering::SeqCst),
        0,
        "a partner call went through the proxy"
    );
    assert_eq!(partner.received_requests().await.unwrap().len(), 1);
}

/// `/metrics` behind `BROKER_METRICS_TOKEN`; requests for tenants that do not exist (even
/// rate-limited ones) create no series.
async fn metrics_need_their_token_and_label_only_registered_tenants(mut env: TestEnv) {
    env.extra
        .insert("BROKER_METRICS_TOKEN".into(), "metrics-secret".into());
    env.extra.insert("BROKER_CALLER_RATE".into(), "1".into());
    env.extra.insert("BROKER_CALLER_BURST".into(), "2".into());
    let app = env.spawn().await;
    let key = app.create_caller("star", json!("*")).await;
    let mut limited = 0;
    for i in 0..20 {
        let a = app.get_token(&format!("ghost-{i}"), &key).await;
        match a.status {
            404 => {}
            429 => limited += 1,
            s => panic!("{s}: {}", a.text),
        }
    }
    assert!(limited > 10);
    app.get("/metrics")
        .await
        .assert_problem(401, "unauthorized");
    let wrong = app
        .send(
            app.client
                .get(format!("{}/metrics", app.address))
                .bearer_auth("nope"),
        )
        .await;
    assert_eq!(wrong.status, 401);
    let ok = app
        .send(
            app.client
                .get(format!("{}/metrics", app.address))
                .bearer_auth("metrics-secret"),
        )
        .await;
    assert_eq!(ok.status, 200);
    assert!(ok.text.contains("broker_tenants"));
    assert!(!ok.text.contains("ghost-"), "{}", ok.text);
    app.stop().await;
}
backends!(metrics_need_their_token_and_label_only_registered_tenants: Sqlite);

/// Keys carry a checksum a scanner can check; keys issued before it keep working.
async fn api_keys_are_scannable_and_old_keys_still_work(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let key = app.create_caller("new", json!("*")).await;
    assert_eq!(key.len(), 53);
    assert!(key.starts_with("tbk_") && key[4..].bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(app.get_token("acme", &key).await.status, 200);
    // One character off: refused (before any lookup: the checksum fails).
    let mut typo = key.clone().into_bytes();
    typo[20] = if typo[20] == b'x' { b'y' } else { b'x' };
    app.get_token("acme", std::str::from_utf8(&typo).unwrap())
        .await
        .assert_problem(401, "unauthorized");
    // A key from before the checksum, as the store holds it.
    let legacy = format!("tbk_{}", "Ab1-_".repeat(8) + "Zz9");
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(legacy.as_bytes()));
    app.state
        .callers
        .create_caller(
            "cl_legacy",
            "legacy",
            &hash,
            &token_broker::auth::Scope::All,
            &token_broker::db::Nothing,
        )
        .await
        .unwrap();
    assert_eq!(app.get_token("acme", &legacy).await.status, 200);
    app.stop().await;
}
backends!(api_keys_are_scannable_and_old_keys_still_work: Sqlite);
