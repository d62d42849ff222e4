//! The OAuth 2.0 face: `POST /oauth2/token` (client credentials, RFC 8693 exchange) and RFC 8414
//! discovery. The real client libraries run in `.ci/oauth/`; these cases pin the edges.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use jsonwebtoken::Algorithm;
use reqwest::Method;
use serde_json::{json, Value};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;
use crate::security::{claims, idp, sign, with_jwt};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

fn resource(tenant: &str) -> String {
    format!("urn:token-broker:tenant:{tenant}")
}

/// A caller's id and key.
async fn client(app: &TestApp, name: &str, tenants: Value) -> (String, String) {
    let a = app
        .send(
            app.admin(Method::POST, "/admin/v1/callers")
                .json(&json!({"name": name, "tenants": tenants})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.text);
    let v = a.json();
    (
        v["id"].as_str().unwrap().into(),
        v["api_key"].as_str().unwrap().into(),
    )
}

async fn post_form(app: &TestApp, form: &[(&str, &str)], basic: Option<(&str, &str)>) -> Answer {
    let mut req = app
        .client
        .post(format!("{}/oauth2/token", app.address))
        .form(form);
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    app.send(req).await
}

fn assert_oauth_error(a: &Answer, status: u16, error: &str) -> Value {
    assert_eq!(a.status, status, "{}", a.text);
    assert_eq!(a.content_type(), "application/json", "{}", a.text);
    assert_eq!(a.headers["cache-control"], "no-store");
    let body = a.json();
    assert_eq!(body["error"], error, "{body}");
    let d = body["error_description"].as_str().unwrap();
    assert!(
        d.bytes()
            .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\'),
        "{d}"
    );
    body
}

async fn client_credentials_hand_out_the_rest_token(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "planted-partner-secret"))
        .await;
    app.create_tenant(&setu_spec("other", &partner, "s")).await;
    let (id, key) = client(&app, "billing", json!(["acme"])).await;

    let basic = post_form(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("resource", &resource("acme")),
        ],
        Some((&id, &key)),
    )
    .await;
    assert_eq!(basic.status, 200, "{}", basic.text);
    assert_eq!(basic.headers["cache-control"], "no-store");
    assert_eq!(basic.headers["pragma"], "no-cache");
    let tok = basic.json();
    assert_eq!(tok["token_type"], "Bearer");
    let expires_in = tok["expires_in"].as_i64().unwrap();
    assert!((295..=300).contains(&expires_in), "{tok}");
    assert!(tok.get("issued_token_type").is_none());
    let rest = app.get_token("acme", &key).await.json();
    assert_eq!(tok["access_token"], rest["access_token"]);

    let post = post_form(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &id),
            ("client_secret", &key),
            ("scope", "tenant:acme"),
            ("min_ttl", "60"),
        ],
        None,
    )
    .await;
    assert_eq!(post.json()["access_token"], rest["access_token"]);
    assert_eq!(partner.received_requests().await.unwrap().len(), 1);

    // Unknown tenant and tenant outside the scope: the same answer, nothing revealed.
    let unknown = post_form(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("resource", &resource("nope")),
        ],
        Some((&id, &key)),
    )
    .await;
    let outside = post_form(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("resource", &resource("other")),
        ],
        Some((&id, &key)),
    )
    .await;
    assert_eq!(
        assert_oauth_error(&unknown, 400, "invalid_target"),
        assert_oauth_error(&outside, 400, "invalid_target")
    );

    // Audited as token fetches marked oauth2; counted as token requests.
    let mut marked = false;
    for _ in 0..40 {
        let entries = audit_entries(&app, "caller=billing", 1).await;
        marked = entries.iter().any(|e| {
            e["action"] == "token.fetch" && e["detail"] == "oauth2" && e["outcome"] == "ok"
        });
        if marked {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(marked, "no token.fetch entry marked oauth2");
    let metrics = app.get("/metrics").await.text;
    // The REST fetch and the post were cache hits (the basic one minted).
    let hits = series(
        &metrics,
        "broker_token_requests_total{outcome=\"cache\",tenant=\"acme\"}",
    );
    assert_eq!(hits, Some(2.0), "{metrics}");
    let everything = format!("{}{}{}", basic.text, outside.text, captured_logs());
    assert!(!everything.contains("planted-partner-secret"));
    assert!(!everything.contains(&key));
}
backends!(client_credentials_hand_out_the_rest_token: Sqlite, PostgresRedis);

async fn refusals_follow_rfc_6749(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let (id, key) = client(&app, "billing", json!(["acme"])).await;
    let (other_id, _) = client(&app, "other", json!(["acme"])).await;
    let cc = ("grant_type", "client_credentials");
    let res = resource("acme");
    let target = ("resource", res.as_str());

    for (what, a) in [
        (
            "no client authentication",
            post_form(&app, &[cc, target], None).await,
        ),
        (
            "a wrong key",
            post_form(&app, &[cc, target], Some((&id, "tbk_wrong"))).await,
        ),
        (
            "another caller's id",
            post_form(&app, &[cc, target], Some((&other_id, &key))).await,
        ),
        (
            "a client id with a wrong secret in the body",
            post_form(
                &app,
                &[cc, target, ("client_id", &id), ("client_secret", "nope")],
                None,
            )
            .await,
        ),
        (
            "a bearer header",
            app.send(
                app.client
                    .post(format!("{}/oauth2/token", app.address))
                    .bearer_auth(&key)
                    .form(&[cc, target]),
            )
            .await,
        ),
    ] {
        assert_oauth_error(&a, 401, "invalid_client");
        // The Basic challenge only where the client used (or could use) the header: a client
        // that authenticated in the body (client_secret_post) gets none (RFC 6749 §5.2).
        if what.contains("in the body") {
            assert!(a.headers.get("www-authenticate").is_none(), "{what}");
        } else {
            assert_eq!(
                a.headers["www-authenticate"], "Basic realm=\"token-broker\"",
                "{what}"
            );
        }
    }

    let malformed = app
        .send(
            app.client
                .post(format!("{}/oauth2/token", app.address))
                .header("authorization", "Basic !!not-base64!!")
                .form(&[cc, target]),
        )
        .await;
    assert_oauth_error(&malformed, 401, "invalid_client");
    // Each refusal on the record with the client id presented, never the secret presented.
    let wanted = [
        format!("(client_id '{id}')"),
        format!("client_id is not the key's caller (client_id '{other_id}')"),
        "malformed Basic client credentials".to_string(),
        "client authentication is required".to_string(),
    ];
    let has = |entries: &[Value], want: &str| {
        entries.iter().any(|e| {
            e["action"] == "token.fetch"
                && e["outcome"] == "unauthorized"
                && e["detail"].as_str().unwrap_or("").contains(want)
        })
    };
    let mut refused = Vec::new();
    for _ in 0..40 {
        refused = app.audit("limit=200").await;
        if wanted.iter().all(|w| has(&refused, w)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for want in &wanted {
        assert!(has(&refused, want), "{want}: {refused:?}");
    }
    let text = format!("{refused:?}");
    assert!(!text.contains("tbk_wrong") && !text.contains("nope") && !text.contains(&key));

    let both = post_form(
        &app,
        &[cc, target, ("client_id", &id), ("client_secret", &key)],
        Some((&id, &key)),
    )
    .await;
    assert_oauth_error(&both, 400, "invalid_request");
    let twice = post_form(&app, &[cc, cc, target], Some((&id, &key))).await;
    assert_oauth_error(&twice, 400, "invalid_request");
    let no_grant = post_form(&app, &[target], Some((&id, &key))).await;
    assert_oauth_error(&no_grant, 400, "invalid_request");
    let password = post_form(
        &app,
        &[("grant_type", "password"), target],
        Some((&id, &key)),
    )
    .await;
    assert_oauth_error(&password, 400, "unsupported_grant_type");
    let scope = post_form(&app, &[cc, ("scope", "openid")], Some((&id, &key))).await;
    assert_oauth_error(&scope, 400, "invalid_scope");
    let none = post_form(&app, &[cc], Some((&id, &key))).await;
    assert_oauth_error(&none, 400, "invalid_target");
    let min_ttl = post_form(&app, &[cc, target, ("min_ttl", "-1")], Some((&id, &key))).await;
    assert_oauth_error(&min_ttl, 400, "invalid_request");
    let json_body = app
        .send(
            app.client
                .post(format!("{}/oauth2/token", app.address))
                .basic_auth(&id, Some(&key))
                .json(&json!({"grant_type": "client_credentials"})),
        )
        .await;
    assert_oauth_error(&json_body, 400, "invalid_request");
    let big = "x".repeat(70_000);
    let too_big = post_form(&app, &[cc, target, ("pad", &big)], Some((&id, &key))).await;
    assert_oauth_error(&too_big, 400, "invalid_request");
    // Thousands of distinct names in 64 KiB (a quadratic duplicate check cost a worker 100+ ms
    // per such body): refused by count, before any authentication.
    let mut names = String::new();
    let mut i = 0;
    while names.len() < 60_000 {
        names.push_str(&format!("p{i}=1&"));
        i += 1;
    }
    let flood = app
        .send(
            app.client
                .post(format!("{}/oauth2/token", app.address))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("{names}grant_type=client_credentials")),
        )
        .await;
    let body = assert_oauth_error(&flood, 400, "invalid_request");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("at most 32 parameters"),
        "{body}"
    );
    assert!(partner.received_requests().await.unwrap().is_empty());
    let get = app.get("/oauth2/token").await;
    get.assert_problem(405, "method_not_allowed");
}
backends!(refusals_follow_rfc_6749: Sqlite);

async fn partner_failures_keep_their_meaning(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            counter.fetch_add(1, Ordering::SeqCst);
            ResponseTemplate::new(401).set_body_json(json!({"error": "bad credentials"}))
        })
        .mount(&partner)
        .await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let (id, key) = client(&app, "billing", json!(["acme"])).await;
    let a = post_form(
        &app,
        &[
            ("grant_type", "client_credentials"),
            ("resource", &resource("acme")),
        ],
        Some((&id, &key)),
    )
    .await;
    let body = assert_oauth_error(&a, 502, "temporarily_unavailable");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("upstream_rejected_credentials: "),
        "{body}"
    );
    assert!(calls.load(Ordering::SeqCst) >= 1);
}
backends!(partner_failures_keep_their_meaning: Sqlite);

async fn token_exchange_for_jwt_callers(mut env: TestEnv) {
    let idp = idp(&["rsa1"]).await;
    with_jwt(&mut env, &idp);
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("t1", &partner, "s")).await;
    app.create_tenant(&setu_spec("t2", &partner, "s")).await;
    let subject = sign(
        &claims(json!(["t1"])),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    let exchange = |subject: String, tenant: &str, kind: &str| {
        vec![
            ("grant_type".to_owned(), EXCHANGE.to_owned()),
            ("subject_token".to_owned(), subject),
            ("subject_token_type".to_owned(), kind.to_owned()),
            ("resource".to_owned(), resource(tenant)),
        ]
    };
    let send = |form: Vec<(String, String)>| {
        app.send(
            app.client
                .post(format!("{}/oauth2/token", app.address))
                .form(&form),
        )
    };
    let a = send(exchange(subject.clone(), "t1", JWT_TYPE)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let tok = a.json();
    assert_eq!(
        tok["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    let rest = app.get_token("t1", &subject).await.json();
    assert_eq!(tok["access_token"], rest["access_token"]);
    let access = send(exchange(
        subject.clone(),
        "t1",
        "urn:ietf:params:oauth:token-type:access_token",
    ))
    .await;
    assert_eq!(access.status, 200, "{}", access.text);

    let outside = send(exchange(subject.clone(), "t2", JWT_TYPE)).await;
    assert_oauth_error(&outside, 400, "invalid_target");
    let forged = sign(
        &claims(json!("*")),
        Algorithm::RS256,
        "rsa_other.pem",
        Some("k1"),
    );
    assert_oauth_error(
        &send(exchange(forged, "t1", JWT_TYPE)).await,
        400,
        "invalid_request",
    );
    let saml = send(exchange(
        subject.clone(),
        "t1",
        "urn:ietf:params:oauth:token-type:saml2",
    ))
    .await;
    assert_oauth_error(&saml, 400, "invalid_request");
    let mut acting = exchange(subject.clone(), "t1", JWT_TYPE);
    acting.push(("actor_token".into(), subject.clone()));
    assert_oauth_error(&send(acting).await, 400, "invalid_request");
    // Credentials sent with an exchange must be valid.
    let bad_client = app
        .send(
            app.client
                .post(format!("{}/oauth2/token", app.address))
                .basic_auth("cl_x", Some("tbk_nope"))
                .form(&exchange(subject.clone(), "t1", JWT_TYPE)),
        )
        .await;
    assert_oauth_error(&bad_client, 401, "invalid_client");
    // An exchange by an authenticated client is recorded with both identities: the subject as
    // the caller, the client in the detail.
    let (client_id, client_key) = client(&app, "gateway", json!(["t2"])).await;
    let both = app
        .send(
            app.client
                .post(format!("{}/oauth2/token", app.address))
                .basic_auth(&client_id, Some(&client_key))
                .form(&exchange(subject.clone(), "t1", JWT_TYPE)),
        )
        .await;
    assert_eq!(both.status, 200, "{}", both.text);
    let recorded = |entries: &[Value]| {
        let both = entries.iter().any(|e| {
            e["action"] == "token.fetch"
                && e["outcome"] == "ok"
                && e["detail"] == "oauth2 token exchange, client gateway"
                && e["caller"].as_str().is_some_and(|c| c != "gateway")
        });
        let refused = entries
            .iter()
            .any(|e| e["detail"] == "token exchange: the subject token is not valid");
        both && refused
    };
    let mut entries = Vec::new();
    for _ in 0..40 {
        entries = app.audit("limit=200").await;
        if recorded(&entries) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recorded(&entries), "{entries:?}");

    let meta = app
        .get("/.well-known/oauth-authorization-server")
        .await
        .json();
    assert_eq!(
        meta["grant_types_supported"],
        json!(["client_credentials", EXCHANGE])
    );
    assert_eq!(partner.received_requests().await.unwrap().len(), 1);
}
backends!(token_exchange_for_jwt_callers: Sqlite);

/// The discovery document asked for with forwarding headers naming another host.
async fn spoofed(app: &TestApp) -> Answer {
    app.send(
        app.client
            .get(format!(
                "{}/.well-known/oauth-authorization-server",
                app.address
            ))
            .header("x-forwarded-host", "evil.example")
            .header("x-forwarded-proto", "https")
            .header("forwarded", "host=evil.example;proto=https"),
    )
    .await
}

async fn discovery(mut env: TestEnv) {
    let app = env.spawn().await;
    let unset_port = app.address.rsplit(':').next().unwrap().to_owned();
    let a = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(a.status, 200);
    let meta = a.json();
    assert_eq!(meta["issuer"], app.address);
    assert_eq!(
        meta["token_endpoint"],
        format!("{}/oauth2/token", app.address)
    );
    assert_eq!(meta["grant_types_supported"], json!(["client_credentials"]));
    assert_eq!(
        meta["token_endpoint_auth_methods_supported"],
        json!(["client_secret_basic", "client_secret_post"])
    );
    assert_eq!(meta["response_types_supported"], json!([]));
    // Without JWT callers there is nothing to exchange.
    let a = post_form(
        &app,
        &[
            ("grant_type", EXCHANGE),
            ("subject_token", "a.b.c"),
            ("subject_token_type", JWT_TYPE),
            ("resource", &resource("acme")),
        ],
        None,
    )
    .await;
    assert_oauth_error(&a, 400, "unsupported_grant_type");
    // Derived from the request: never cached, and forwarding headers from an untrusted peer
    // (every peer, by default) change nothing.
    let derived = app.get("/.well-known/oauth-authorization-server").await;
    assert_eq!(derived.headers["cache-control"], "no-store");
    let meta = spoofed(&app).await.json();
    assert_eq!(meta["issuer"], app.address, "{meta}");
    app.stop().await;

    // From a trusted proxy (here: loopback) the forwarded host is the broker's public one.
    env.extra
        .insert("BROKER_TRUSTED_PROXIES".into(), "127.0.0.0/8".into());
    let app = env.spawn().await;
    let meta = spoofed(&app).await.json();
    assert_eq!(meta["issuer"], "https://evil.example", "{meta}");
    app.stop().await;

    env.extra.insert(
        "BROKER_PUBLIC_URL".into(),
        "https://broker.example.com/".into(),
    );
    // Ports are reused within a run: only lines logged from here on can be this replica's.
    let logged_before = captured_logs().len();
    let app = env.spawn().await;
    let configured = app.get("/.well-known/oauth-authorization-server").await;
    assert!(configured.headers.get("cache-control").is_none());
    let meta = spoofed(&app).await.json();
    assert_eq!(meta["issuer"], "https://broker.example.com");
    assert_eq!(
        meta["token_endpoint"],
        "https://broker.example.com/oauth2/token"
    );
    // The replica started without BROKER_PUBLIC_URL said so at start (its own line, by port);
    // the one started with it did not.
    let warned = |port: &str, from: usize| {
        captured_logs()[from..].lines().any(|l| {
            let field = format!("\"port\":{port}");
            l.contains("BROKER_PUBLIC_URL is unset")
                && l.match_indices(&field)
                    .any(|(i, _)| !l[i + field.len()..].starts_with(|c: char| c.is_ascii_digit()))
        })
    };
    assert!(warned(&unset_port, 0));
    assert!(!warned(
        app.address.rsplit(':').next().unwrap(),
        logged_before
    ));
}
backends!(discovery: Sqlite);
