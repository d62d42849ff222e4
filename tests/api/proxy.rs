//! Proxy mode against a wiremock partner API: the injected token and fixed headers, what never
//! crosses, the one retry after a 401, path tricks, limits and failures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

/// A Setu-style tenant whose proxy points at `api` + `/v2`, with a fixed secret header.
fn proxied_spec(id: &str, partner: &MockServer, api: &str, extra: Value) -> Value {
    let mut spec = setu_spec(id, partner, "s");
    spec["issuer"]["min_interval_ms"] = json!(0);
    let mut proxy = json!({
        "base_url": format!("{api}/v2"),
        "headers": {"X-Product-Instance-Id": "planted-instance-id"}
    });
    for (k, v) in extra.as_object().unwrap() {
        proxy[k] = v.clone();
    }
    spec["proxy"] = proxy;
    spec
}

/// A body of `n` chunks of `size` bytes, sent chunked (no declared length).
fn chunked(n: usize, size: usize) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::iter(
        (0..n).map(move |_| Ok::<_, std::io::Error>(vec![b'y'; size])),
    ))
}

/// Sends a request line and headers as written (no client-side path normalisation).
async fn raw_request(app: &TestApp, method: &str, target: &str, key: &str) -> u16 {
    let addr = app.address.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

async fn forwards_with_the_token_and_nothing_else(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let api = MockServer::start().await;
    let seen: Arc<Mutex<Vec<wiremock::Request>>> = Arc::default();
    let log = seen.clone();
    Mock::given(wiremock::matchers::any())
        .respond_with(move |r: &wiremock::Request| {
            log.lock().unwrap().push(r.clone());
            ResponseTemplate::new(201)
                .insert_header("x-partner", "yes")
                .insert_header("set-cookie", "partner-session=1")
                .set_body_raw(r.body.clone(), "application/json")
        })
        .mount(&api)
        .await;
    let created = app
        .create_tenant(&proxied_spec("acme", &partner, &api.uri(), json!({})))
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert!(!created.text.contains("planted-instance-id"));
    assert_eq!(
        created.json()["proxy"]["header_names"],
        json!(["x-product-instance-id"])
    );
    let key = app.create_caller("billing", json!(["acme"])).await;

    let a = app
        .send(
            app.client
                .post(format!(
                    "{}/v1/tenants/acme/proxy/accounts/42/pay?b=%20x&a=1",
                    app.address
                ))
                .bearer_auth(&key)
                .header("cookie", "caller-session=planted-cookie")
                .header("x-forwarded-for", "10.0.0.1")
                .header("connection", "x-hop")
                .header("x-hop", "planted-hop")
                .header("x-custom", "kept")
                .header("true-client-ip", "10.0.0.2")
                .header("x-original-url", "/admin")
                .header("x-rewrite-url", "/admin")
                .header("x-http-method-override", "DELETE")
                .header("content-type", "application/json")
                .body(r#"{"amount": 5}"#),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.text);
    assert_eq!(a.text, r#"{"amount": 5}"#);
    assert_eq!(a.headers["x-partner"], "yes");
    assert!(a.headers.get("set-cookie").is_none());
    let token = app.get_token("acme", &key).await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!a.text.contains(&token));

    let r = seen.lock().unwrap()[0].clone();
    assert_eq!(r.url.path(), "/v2/accounts/42/pay");
    assert_eq!(r.url.query(), Some("b=%20x&a=1"));
    let h = |n: &str| r.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(h("authorization"), Some(format!("Bearer {token}")));
    assert_eq!(
        h("x-product-instance-id").as_deref(),
        Some("planted-instance-id")
    );
    assert_eq!(h("x-custom").as_deref(), Some("kept"));
    assert!(h("x-request-id").is_some());
    for gone in [
        "cookie",
        "x-forwarded-for",
        "x-hop",
        "true-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
    ] {
        assert!(h(gone).is_none(), "{gone} crossed");
    }
    assert_eq!(partner.received_requests().await.unwrap().len(), 1);

    let metrics = app.get("/metrics").await.text;
    assert_eq!(
        series(
            &metrics,
            "broker_proxy_requests_total{status_class=\"2xx\",tenant=\"acme\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    let entries = audit_entries(&app, "caller=billing", 1).await;
    let proxied: Vec<_> = entries
        .iter()
        .filter(|e| e["action"] == "token.proxy")
        .collect();
    assert!(
        proxied.iter().any(
            |e| e["detail"] == "partner status 201: POST /accounts/42/pay"
                && e["fingerprint"].is_string()
        ),
        "{entries:?}"
    );
    // The method and path, never the query string.
    assert!(!format!("{entries:?}").contains("b=%20x"), "{entries:?}");
    let everything = format!("{}{}", captured_logs(), app.get("/metrics").await.text);
    assert!(!everything.contains("planted-instance-id"));
    assert!(!everything.contains(&token));
}
backends!(forwards_with_the_token_and_nothing_else: Sqlite, PostgresRedis);

/// An app with tenant `acme` proxied to a partner API that answers 200 to anything:
/// (app, token partner, partner API).
async fn proxied_app(env: &TestEnv) -> (TestApp, MockServer, MockServer) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let api = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(ResponseTemplate::new(200))
        .mount(&api)
        .await;
    app.create_tenant(&proxied_spec("acme", &partner, &api.uri(), json!({})))
        .await;
    (app, partner, api)
}

async fn scope_and_settings_come_before_the_partner(env: TestEnv) {
    let (app, partner, api) = proxied_app(&env).await;
    // Scope first, then settings: 403 and 404 never reach the partner.
    app.create_tenant(&setu_spec("plain", &partner, "s")).await;
    let other = app.create_caller("other", json!(["plain"])).await;
    let forbidden = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/acme/proxy/x", app.address))
                .bearer_auth(&other),
        )
        .await;
    forbidden.assert_problem(403, "forbidden");
    let unset = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/plain/proxy/x", app.address))
                .bearer_auth(&other),
        )
        .await;
    unset.assert_problem(404, "proxy_not_configured");
    assert!(api.received_requests().await.unwrap().is_empty());
    assert!(partner.received_requests().await.unwrap().is_empty());
}
backends!(scope_and_settings_come_before_the_partner: Sqlite);

/// The unauthenticated side path held at its bound for the whole test (as a sustained flood
/// of distinct refusals holds it; a few hundred real ones are sent too): every out-of-scope
/// probe and every proxied call of an authenticated caller is still on the record, each with
/// its method and path. (Before, both shared that path: 7 of 15 of each were kept.)
async fn a_flood_cannot_push_a_callers_actions_out_of_the_audit(env: TestEnv) {
    let (app, partner, _api) = proxied_app(&env).await;
    app.create_tenant(&setu_spec("other", &partner, "s")).await;
    let key = app.create_caller("billing", json!(["acme"])).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (state, halt) = (app.state.clone(), stop.clone());
    let filler = tokio::spawn(async move {
        let mut n = 0u64;
        while !halt.load(Ordering::Relaxed) {
            for _ in 0..token_broker::audit::SIDE_ROWS + 10 {
                n += 1;
                let mut e = token_broker::audit::Entry::new(
                    token_broker::audit::Kind::Refused,
                    "token.fetch",
                    "unauthorized",
                );
                e.detail = Some(format!("flood {n}"));
                state.audit.record_best_effort(e);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let unauthenticated: Vec<_> = (0..300)
        .map(|i| {
            let (client, url) = (
                app.client.clone(),
                format!("{}/v1/tenants/acme-{i}/proxy/x", app.address),
            );
            tokio::spawn(async move {
                client
                    .get(url)
                    .bearer_auth("tbk_nope")
                    .send()
                    .await
                    .unwrap()
                    .status()
            })
        })
        .collect();
    for i in 0..15 {
        let probe = app
            .send(
                app.client
                    .get(format!("{}/v1/tenants/other/token", app.address))
                    .bearer_auth(&key),
            )
            .await;
        probe.assert_problem(403, "forbidden");
        let call = app
            .send(
                app.client
                    .post(format!(
                        "{}/v1/tenants/acme/proxy/pay/{i}?secret=q{i}",
                        app.address
                    ))
                    .bearer_auth(&key)
                    .body("{}"),
            )
            .await;
        assert_eq!(call.status, 200, "{}", call.text);
    }
    for u in unauthenticated {
        assert_eq!(u.await.unwrap(), 401);
    }
    stop.store(true, Ordering::Relaxed);
    filler.await.unwrap();

    let count = |entries: &[Value], pred: &dyn Fn(&Value) -> bool| -> i64 {
        entries
            .iter()
            .filter(|e| pred(e))
            .map(|e| e["count"].as_i64().unwrap_or(1))
            .sum()
    };
    let mut entries = Vec::new();
    for _ in 0..50 {
        entries = app.audit("caller=billing&limit=200").await;
        let probes = count(&entries, &|e| e["outcome"] == "forbidden");
        let calls = count(&entries, &|e| e["action"] == "token.proxy");
        if probes == 15 && calls == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        count(&entries, &|e| e["outcome"] == "forbidden"),
        15,
        "{entries:?}"
    );
    for i in 0..15 {
        let want = format!("partner status 200: POST /pay/{i}");
        assert_eq!(
            count(&entries, &|e| e["detail"] == want.as_str()),
            1,
            "{want}: {entries:?}"
        );
    }
    assert!(
        !format!("{entries:?}").contains("secret=q"),
        "no query string"
    );
}
backends!(a_flood_cannot_push_a_callers_actions_out_of_the_audit: Sqlite);

async fn a_refused_token_is_replaced_once(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let api = MockServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let first_token: Arc<Mutex<Option<String>>> = Arc::default();
    let (c, first) = (calls.clone(), first_token.clone());
    Mock::given(wiremock::matchers::path("/v2/revoking"))
        .respond_with(move |r: &wiremock::Request| {
            c.fetch_add(1, Ordering::SeqCst);
            let auth = r.headers["authorization"].to_str().unwrap().to_owned();
            let mut first = first.lock().unwrap();
            if first.get_or_insert(auth.clone()) == &auth {
                ResponseTemplate::new(401)
            } else {
                ResponseTemplate::new(200).set_body_string("fresh")
            }
        })
        .mount(&api)
        .await;
    let always = Arc::new(AtomicUsize::new(0));
    let a2 = always.clone();
    Mock::given(wiremock::matchers::path("/v2/always"))
        .respond_with(move |_: &wiremock::Request| {
            a2.fetch_add(1, Ordering::SeqCst);
            ResponseTemplate::new(403)
                .insert_header("www-authenticate", "Bearer error=\"invalid_token\"")
        })
        .mount(&api)
        .await;
    let mut spec = proxied_spec("acme", &partner, &api.uri(), json!({}));
    spec["issuer"]["invalidate_min_age_ms"] = json!(0);
    app.create_tenant(&spec).await;
    let key = app.create_caller("billing", json!(["acme"])).await;
    let get = |p: &str| {
        app.client
            .get(format!("{}/v1/tenants/acme/proxy/{p}", app.address))
            .bearer_auth(&key)
    };
    let a = app.send(get("revoking").body("small body")).await;
    assert_eq!((a.status, a.text.as_str()), (200, "fresh"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        partner.received_requests().await.unwrap().len(),
        2,
        "one re-mint"
    );

    let a = app.send(get("always")).await;
    assert_eq!(a.status, 403, "passed through after one retry: {}", a.text);
    assert_eq!(always.load(Ordering::SeqCst), 2, "never hammered");
}
backends!(a_refused_token_is_replaced_once: Sqlite, PostgresRedis);

async fn path_tricks_never_reach_the_network(env: TestEnv) {
    let (app, _partner, api) = proxied_app(&env).await;
    let key = app.create_caller("billing", json!(["acme"])).await;
    for path in [
        "../admin",
        "a/../../admin",
        "%2e%2e/admin",
        "..%2fadmin",
        "a%2F..%2F..%2Fadmin",
        "%5c..%5cadmin",
        "/evil.example.com/x",
        "@evil.example.com/x",
        "a%00b",
        "a%0d%0aX-Injected:%201",
        "..;/..;/x",
        "a/..;/b",
        "%252e%252e/x",
        "%c0%ae%c0%ae/x",
    ] {
        let status =
            raw_request(&app, "GET", &format!("/v1/tenants/acme/proxy/{path}"), &key).await;
        assert_eq!(status, 400, "{path}");
    }
    let a = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/acme/proxy/a%2fb", app.address))
                .bearer_auth(&key),
        )
        .await;
    a.assert_problem(400, "invalid_proxy_path");
    assert!(api.received_requests().await.unwrap().is_empty());
    let ok = raw_request(&app, "GET", "/v1/tenants/acme/proxy/a.b/c%20d", &key).await;
    assert_eq!(ok, 200);
    assert_eq!(
        api.received_requests().await.unwrap()[0].url.path(),
        "/v2/a.b/c%20d"
    );
}
backends!(path_tricks_never_reach_the_network: Sqlite);

/// A partner API that answers every request with a chunked body of `chunk` bytes every
/// `every`, never ending, after holding the head for `head_delay`. Returns its base URL.
async fn endless_partner(chunk: usize, every: Duration, head_delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(head_delay).await;
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n";
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let body = format!("{chunk:x}\r\n{}\r\n", "y".repeat(chunk));
                loop {
                    if sock.write_all(body.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(every).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Reads an answer's body until it ends or breaks off: (bytes read, whether it ended cleanly).
async fn read_all(resp: reqwest::Response) -> (usize, bool) {
    let mut stream = resp.bytes_stream();
    let mut n = 0;
    while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
        match chunk {
            Ok(c) => n += c.len(),
            Err(_) => return (n, false),
        }
    }
    (n, true)
}

/// The partner's answer is bounded: a declared length over `max_response_bytes` is refused,
/// a streamed one is cut off there, a never-ending one at `response_timeout_ms`; one caller
/// holds at most `BROKER_PROXY_CALLER_CONCURRENCY` requests in flight. Each cut is counted.
async fn answers_and_callers_are_bounded(mut env: TestEnv) {
    env.extra
        .insert("BROKER_PROXY_CALLER_CONCURRENCY".into(), "2".into());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let api = MockServer::start().await;
    Mock::given(wiremock::matchers::path("/v2/big"))
        .respond_with(ResponseTemplate::new(200).set_body_string("z".repeat(5000)))
        .mount(&api)
        .await;
    let fast = endless_partner(512, Duration::from_millis(1), Duration::ZERO).await;
    let slow = endless_partner(16, Duration::from_millis(50), Duration::ZERO).await;
    let held = endless_partner(16, Duration::from_millis(50), Duration::from_secs(2)).await;
    let limits = json!({"max_response_bytes": 4000, "response_timeout_ms": 800});
    for (id, base) in [("wm", api.uri()), ("fast", fast), ("slow", slow)] {
        app.create_tenant(&proxied_spec(id, &partner, &base, limits.clone()))
            .await;
    }
    // Its heads take 2 s: the default deadline (60 s) leaves them be; a 64-byte cap ends them.
    let small = json!({"max_response_bytes": 64});
    app.create_tenant(&proxied_spec("held", &partner, &held, small))
        .await;
    let key = app
        .create_caller("billing", json!(["wm", "fast", "slow", "held"]))
        .await;
    let other = app.create_caller("other", json!(["held"])).await;
    let get = |t: &str, key: &str| {
        app.client
            .get(format!("{}/v1/tenants/{t}/proxy/x", app.address))
            .bearer_auth(key)
            .send()
    };

    let declared = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/wm/proxy/big", app.address))
                .bearer_auth(&key),
        )
        .await;
    declared.assert_problem(502, "proxy_response_too_large");

    let (n, clean) = read_all(get("fast", &key).await.unwrap()).await;
    assert!(
        !clean && n <= 4000,
        "cut at the size cap: {n} bytes, clean {clean}"
    );

    let started = std::time::Instant::now();
    let (_, clean) = read_all(get("slow", &key).await.unwrap()).await;
    let took = started.elapsed();
    assert!(!clean, "a never-ending answer is cut off");
    assert!(
        took < Duration::from_secs(3),
        "cut at the deadline: {took:?}"
    );

    // Two requests in flight (heads held 2 s): a third of the same caller is refused at once,
    // another caller is not affected.
    let first = tokio::spawn(get("held", &key));
    let second = tokio::spawn(get("held", &key));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/held/proxy/x", app.address))
                .bearer_auth(&key),
        )
        .await;
    third.assert_problem(429, "proxy_concurrency_limited");
    assert!(third.headers.get("retry-after").is_some());
    let others = tokio::spawn(get("held", &other));
    for r in [first, second, others] {
        let resp = r.await.unwrap().unwrap();
        assert_eq!(resp.status(), 200);
        drop(resp);
    }

    let metrics = app.get("/metrics").await.text;
    for (tenant, reason) in [
        ("wm", "response_too_large"),
        ("fast", "response_too_large"),
        ("slow", "response_timeout"),
        ("held", "caller_concurrency"),
    ] {
        let name = format!("broker_proxy_cutoffs_total{{reason=\"{reason}\",tenant=\"{tenant}\"}}");
        assert!(
            series(&metrics, &name).unwrap_or(0.0) >= 1.0,
            "{name}: {metrics}"
        );
    }
}
backends!(answers_and_callers_are_bounded: Sqlite);

async fn limits_and_failures(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let api = MockServer::start().await;
    Mock::given(wiremock::matchers::path("/v2/slow"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(1500)))
        .mount(&api)
        .await;
    Mock::given(wiremock::matchers::path("/v2/fail"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&api)
        .await;
    Mock::given(wiremock::matchers::path("/v2/upload"))
        .respond_with(|r: &wiremock::Request| {
            ResponseTemplate::new(200).set_body_string(r.body.len().to_string())
        })
        .mount(&api)
        .await;
    app.create_tenant(&proxied_spec(
        "acme",
        &partner,
        &api.uri(),
        json!({"max_body_bytes": 3_000_000}),
    ))
    .await;
    // The timeout runs to the answer's head, upload included: a tenant of its own.
    app.create_tenant(&proxied_spec(
        "hasty",
        &partner,
        &api.uri(),
        json!({"timeout_ms": 300}),
    ))
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    app.create_tenant(&proxied_spec("gone", &partner, &dead_url, json!({})))
        .await;
    let key = app
        .create_caller("billing", json!(["acme", "gone", "hasty"]))
        .await;
    let url = |t: &str, p: &str| format!("{}/v1/tenants/{t}/proxy/{p}", app.address);

    let big = vec![b'x'; 3_000_001];
    let a = app
        .send(
            app.client
                .post(url("acme", "upload"))
                .bearer_auth(&key)
                .body(big),
        )
        .await;
    a.assert_problem(413, "payload_too_large");
    // A streamed (chunked) upload over the cap is cut off on the way.
    let chunks = chunked(40, 100_000);
    let a = app
        .send(
            app.client
                .post(url("acme", "upload"))
                .bearer_auth(&key)
                .body(chunks),
        )
        .await;
    a.assert_problem(413, "payload_too_large");
    let fits = chunked(25, 100_000);
    let a = app
        .send(
            app.client
                .post(url("acme", "upload"))
                .bearer_auth(&key)
                .body(fits),
        )
        .await;
    assert_eq!((a.status, a.text.as_str()), (200, "2500000"));

    app.send(app.client.get(url("hasty", "slow")).bearer_auth(&key))
        .await
        .assert_problem(504, "upstream_timeout");
    let gone = app
        .send(app.client.get(url("gone", "x")).bearer_auth(&key))
        .await
        .assert_problem(503, "upstream_unavailable");
    // The partner API failed, not its token endpoint: the detail says which.
    assert_eq!(
        gone["detail"],
        "the partner API is unavailable (connection failed)"
    );
    for _ in 0..3 {
        assert_eq!(
            app.send(app.client.get(url("acme", "fail")).bearer_auth(&key))
                .await
                .status,
            500
        );
    }
    // API failures are the partner API's, not its token endpoint's: no circuit opens.
    let view = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/acme"))
        .await
        .json();
    assert!(view["health"]["circuit"].is_null(), "{view}");
    assert_eq!(app.get_token("acme", &key).await.status, 200);
}
backends!(limits_and_failures: Sqlite);

async fn admin_patches_the_proxy(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let patch = |body: Value| {
        app.send(
            app.admin(Method::PATCH, "/admin/v1/tenants/acme")
                .header("content-type", "application/merge-patch+json")
                .json(&body),
        )
    };
    let a = patch(json!({"proxy": {"base_url": "http://127.0.0.1:1/api", "headers": {"x-a": "planted-a", "x-b": "planted-b"}}})).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["proxy"]["header_names"], json!(["x-a", "x-b"]));
    let a = patch(json!({"proxy": {"headers": {"x-a": null}, "timeout_ms": 2000}})).await;
    assert_eq!(a.json()["proxy"]["header_names"], json!(["x-b"]));
    assert_eq!(a.json()["proxy"]["timeout_ms"], 2000);
    // Rotating credentials leaves the proxy headers alone.
    let put = app
        .send(
            app.admin(Method::PUT, "/admin/v1/tenants/acme/credentials")
                .json(&json!({"client_id": "c", "client_secret": "new"})),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.text);
    let view = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/acme"))
        .await;
    assert_eq!(view.json()["proxy"]["header_names"], json!(["x-b"]));
    assert_eq!(
        view.json()["credential_fields"],
        json!(["client_id", "client_secret"])
    );
    let bad = patch(json!({"proxy": {"headers": {"Host": "planted-host"}}})).await;
    let body = bad.assert_problem(422, "invalid_spec");
    assert_eq!(body["field"], "proxy.headers.Host");
    let a = patch(json!({"proxy": null})).await;
    assert!(a.json().get("proxy").is_none(), "{}", a.text);
    for text in [&view.text, &bad.text, &captured_logs()] {
        assert!(!text.contains("planted"), "{text}");
    }
}
backends!(admin_patches_the_proxy: Sqlite, PostgresRedis);

/// `BROKER_ALLOWED_NETWORKS` opens its ranges to token and proxy URLs, with https still
/// required and every other range still closed.
#[tokio::test]
async fn allowed_networks_open_only_their_ranges() {
    let broker = BrokerProcess::start(&[
        ("BROKER_ALLOW_INSECURE_ISSUERS", "false"),
        ("BROKER_ALLOWED_NETWORKS", "10.20.0.0/16,fd00:1::/32"),
    ])
    .await;
    let client = reqwest::Client::new();
    let create = |id: &str, token_url: &str, proxy: &str| {
        client
            .post(format!("{}/admin/v1/tenants", broker.address))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({
                "id": id,
                "issuer": {"kind": "setu_partner", "token_url": token_url},
                "credentials": {"client_id": "c", "client_secret": "s"},
                "proxy": {"base_url": proxy}
            }))
            .send()
    };
    let ok = create("a", "https://10.20.1.2/token", "https://[fd00:1::5]/api")
        .await
        .unwrap();
    assert_eq!(ok.status(), 201, "{}", ok.text().await.unwrap());
    for (id, token_url, proxy, field) in [
        (
            "b",
            "http://10.20.1.2/token",
            "https://10.20.1.2/api",
            "issuer.token_url",
        ),
        (
            "c",
            "https://10.21.0.1/token",
            "https://10.20.1.2/api",
            "issuer.token_url",
        ),
        (
            "d",
            "https://127.0.0.1/token",
            "https://10.20.1.2/api",
            "issuer.token_url",
        ),
        (
            "e",
            "https://10.20.1.2/token",
            "https://169.254.169.254/api",
            "proxy.base_url",
        ),
    ] {
        let r = create(id, token_url, proxy).await.unwrap();
        assert_eq!(r.status(), 422, "{token_url} {proxy}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["field"], field, "{body}");
    }
}

/// A partner API that accepts the connection and never answers the TLS handshake: the call
/// ends at the connect timeout (which covers TLS), not at the tenant's longer call timeout.
async fn a_stalled_handshake_ends_at_the_connect_timeout(mut env: TestEnv) {
    env.extra
        .insert("BROKER_UPSTREAM_CONNECT_TIMEOUT_MS".into(), "300".into());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    let stalled = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", stalled.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = stalled.accept().await {
            held.push(socket);
        }
    });
    let made = app
        .create_tenant(&proxied_spec(
            "stalled",
            &partner,
            &base,
            json!({"timeout_ms": 8000}),
        ))
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let key = app.create_caller("billing", json!(["stalled"])).await;
    let started = std::time::Instant::now();
    app.send(
        app.client
            .get(format!("{}/v1/tenants/stalled/proxy/x", app.address))
            .bearer_auth(&key),
    )
    .await
    .assert_problem(504, "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}
backends!(a_stalled_handshake_ends_at_the_connect_timeout: Sqlite);
