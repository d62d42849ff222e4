//! The admin API: validation, conflicts, and the CRUD round trip.

use reqwest::Method;
use serde_json::json;
use wiremock::MockServer;

use crate::backends;
use crate::helpers::*;

async fn malformed_bodies_get_clear_problems(env: TestEnv) {
    let app = env.spawn().await;
    let post = |body: &str| {
        app.admin(Method::POST, "/admin/v1/tenants")
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    app.send(post("{not json"))
        .await
        .assert_problem(400, "invalid_json");
    app.send(post("")).await.assert_problem(400, "invalid_json");
    app.send(post("[1,2]"))
        .await
        .assert_problem(422, "invalid_spec");
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    app.send(post(&deep))
        .await
        .assert_problem(400, "invalid_json");
    let huge = format!("{{\"id\": \"{}\"}}", "a".repeat(70 * 1024));
    app.send(post(&huge))
        .await
        .assert_problem(413, "payload_too_large");
    app.send(
        app.admin(Method::POST, "/admin/v1/tenants")
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await
    .assert_problem(415, "unsupported_media_type");
    app.stop().await;
}
backends!(malformed_bodies_get_clear_problems: Sqlite);

async fn invalid_specs_name_the_field_and_change_nothing(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let good = setu_spec("acme", &partner, "s");
    let cases = [
        ("/issuer/kind", json!("carrier_pigeon"), "issuer.kind"),
        ("/issuer/token_url", json!("not a url"), "issuer.token_url"),
        (
            "/issuer/token_url",
            json!("ftp://x.example.com/t"),
            "issuer.token_url",
        ),
        (
            "/issuer/default_ttl_seconds",
            json!(-5),
            "issuer.default_ttl_seconds",
        ),
        ("/id", json!("UPPER case"), "id"),
        (
            "/credentials/client_secret",
            json!(""),
            "credentials.client_secret",
        ),
        (
            "/credentials",
            json!({"client_id": "x"}),
            "credentials.client_secret",
        ),
        ("/issuer/scope", json!("read"), "issuer.scope"),
    ];
    for (pointer, value, field) in cases {
        let mut spec = good.clone();
        let (parent, leaf) = pointer.rsplit_once('/').unwrap();
        spec.pointer_mut(parent).unwrap()[leaf] = value;
        let body = app
            .create_tenant(&spec)
            .await
            .assert_problem(422, "invalid_spec");
        assert_eq!(body["field"], field, "{body}");
    }
    let mut no_issuer = good.clone();
    no_issuer.as_object_mut().unwrap().remove("issuer");
    assert_eq!(
        app.create_tenant(&no_issuer)
            .await
            .assert_problem(422, "invalid_spec")["field"],
        "issuer"
    );

    assert_eq!(app.create_tenant(&good).await.status, 201);
    app.create_tenant(&good)
        .await
        .assert_problem(409, "conflict");
    // The conflicting create changed nothing.
    let t = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/acme"))
        .await
        .json();
    assert_eq!(t["version"], 1);
    app.stop().await;
}
backends!(invalid_specs_name_the_field_and_change_nothing: Sqlite, Postgres);

async fn invalid_callers_routes_and_queries(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    assert_eq!(
        app.create_tenant(&setu_spec("acme", &partner, "s"))
            .await
            .status,
        201
    );
    for bad in [
        json!({"name": "x"}),
        json!({"name": "", "tenants": "*"}),
        json!({"name": "x", "tenants": []}),
        json!({"name": "x", "tenants": ["Bad Id"]}),
        json!({"name": "x", "tenants": "all"}),
    ] {
        app.send(app.admin(Method::POST, "/admin/v1/callers").json(&bad))
            .await
            .assert_problem(422, "invalid_caller");
    }
    app.create_caller("dup", json!("*")).await;
    app.send(
        app.admin(Method::POST, "/admin/v1/callers")
            .json(&json!({"name": "dup", "tenants": "*"})),
    )
    .await
    .assert_problem(409, "conflict");

    // Unknown routes and methods, bad query parameters.
    app.get("/nope").await.assert_problem(404, "not_found");
    app.send(app.client.delete(format!("{}/healthz", app.address)))
        .await
        .assert_problem(405, "method_not_allowed");
    app.send(app.admin(Method::GET, "/admin/v1/tenants?limit=0"))
        .await
        .assert_problem(400, "invalid_request");
    app.send(app.admin(Method::GET, "/admin/v1/tenants/acme%2Fx"))
        .await
        .assert_problem(404, "tenant_not_found");
    app.stop().await;
}
backends!(invalid_callers_routes_and_queries: Sqlite, Postgres);

async fn tenant_crud_round_trip(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    for id in ["a1", "a2", "a3"] {
        assert_eq!(
            app.create_tenant(&setu_spec(id, &partner, "s"))
                .await
                .status,
            201
        );
    }
    let page = app
        .send(app.admin(Method::GET, "/admin/v1/tenants?limit=2"))
        .await
        .json();
    assert_eq!(page["tenants"].as_array().unwrap().len(), 2);
    assert_eq!(page["next_after"], "a2");
    let rest = app
        .send(app.admin(Method::GET, "/admin/v1/tenants?limit=2&after=a2"))
        .await
        .json();
    assert_eq!(rest["tenants"][0]["id"], "a3");
    assert!(rest["next_after"].is_null());
    assert_eq!(
        rest["tenants"][0]["credential_fields"],
        json!(["client_id", "client_secret"])
    );

    let p = app
        .send(
            app.admin(Method::PATCH, "/admin/v1/tenants/a1")
                .json(&json!({"display_name": "Renamed"})),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text);
    assert_eq!(p.json()["display_name"], "Renamed");
    assert_eq!(p.json()["version"], 2);
    assert_eq!(p.headers["etag"], "\"v2\"");
    // A kind change whose credentials no longer fit is refused and changes nothing.
    let bad = app
        .send(
            app.admin(Method::PATCH, "/admin/v1/tenants/a1")
                .json(&json!({"issuer": {"kind": "comm100_partner"}})),
        )
        .await;
    assert_eq!(
        bad.assert_problem(422, "invalid_spec")["field"],
        "credentials.email"
    );
    let now = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/a1"))
        .await
        .json();
    assert_eq!(now["issuer"]["kind"], "setu_partner");
    assert_eq!(now["version"], 2);

    let d = app
        .send(app.admin(Method::DELETE, "/admin/v1/tenants/a1"))
        .await;
    assert_eq!(d.status, 204);
    app.send(app.admin(Method::GET, "/admin/v1/tenants/a1"))
        .await
        .assert_problem(404, "tenant_not_found");
    app.send(app.admin(Method::DELETE, "/admin/v1/tenants/a1"))
        .await
        .assert_problem(404, "tenant_not_found");
    app.send(app.admin(Method::DELETE, "/admin/v1/callers/cl_nothing"))
        .await
        .assert_problem(404, "caller_not_found");
    app.stop().await;
}
backends!(tenant_crud_round_trip: Sqlite, Postgres);

async fn concurrent_updates_and_if_match(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    assert_eq!(
        app.create_tenant(&setu_spec("cc", &partner, "s"))
            .await
            .status,
        201
    );
    let etag = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/cc"))
        .await
        .headers["etag"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(etag, "\"v1\"");
    let patch = |tag: &str, body: serde_json::Value| {
        app.admin(Method::PATCH, "/admin/v1/tenants/cc")
            .header("if-match", tag)
            .json(&body)
    };
    let ok = app
        .send(patch(&etag, json!({"display_name": "First"})))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.headers["etag"], "\"v2\"");
    // A writer holding the old ETag loses, and changes nothing.
    app.send(patch(&etag, json!({"display_name": "Stale"})))
        .await
        .assert_problem(412, "precondition_failed");
    app.send(
        app.admin(Method::PUT, "/admin/v1/tenants/cc/credentials")
            .header("if-match", "\"v1\"")
            .json(&json!({"client_id": "a", "client_secret": "b"})),
    )
    .await
    .assert_problem(412, "precondition_failed");
    app.send(
        app.admin(Method::DELETE, "/admin/v1/tenants/cc")
            .header("if-match", "\"v1\""),
    )
    .await
    .assert_problem(412, "precondition_failed");
    // A header that is not an entity-tag list is a bad request, not a lost race.
    for bad in ["", "v2", "\"v2", "*, \"v2\""] {
        let p = app
            .send(patch(bad, json!({"display_name": "Malformed"})))
            .await
            .assert_problem(400, "invalid_request");
        assert_eq!(p["field"], "If-Match", "{bad:?}");
    }
    let now = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/cc"))
        .await
        .json();
    assert_eq!(
        (now["display_name"].as_str(), now["version"].as_i64()),
        (Some("First"), Some(2))
    );

    // Twenty concurrent merge patches without If-Match: none is lost.
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let req = app
                .admin(Method::PATCH, "/admin/v1/tenants/cc")
                .json(&json!({"display_name": format!("n{i}")}));
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => ok += 1,
            409 => {}
            other => panic!("unexpected {other}"),
        }
    }
    let now = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/cc"))
        .await
        .json();
    assert_eq!(
        now["version"].as_i64().unwrap(),
        2 + ok,
        "every accepted write bumped the version once"
    );
    assert_eq!(ok, 20, "{ok} of 20 concurrent patches went through");
    let del = app
        .send(
            app.admin(Method::DELETE, "/admin/v1/tenants/cc")
                .header("if-match", format!("\"v{}\"", 2 + ok)),
        )
        .await;
    assert_eq!(del.status, 204);
    app.stop().await;
}
backends!(concurrent_updates_and_if_match: Sqlite, Postgres);

async fn callers_are_rate_limited(mut env: TestEnv) {
    env.extra.insert("BROKER_CALLER_RATE".into(), "5".into());
    env.extra.insert("BROKER_CALLER_BURST".into(), "5".into());
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(|_: &wiremock::Request| {
            wiremock::ResponseTemplate::new(200)
                .set_body_json(json!({"accessToken": setu_jwt(300)}))
        })
        .mount(&partner)
        .await;
    app.create_tenant(&setu_spec("rl", &partner, "s")).await;
    let (noisy, quiet) = (
        app.create_caller("noisy", json!("*")).await,
        app.create_caller("quiet", json!("*")).await,
    );
    let mut limited = None;
    for _ in 0..8 {
        let a = app.get_token("rl", &noisy).await;
        if a.status == 429 {
            limited = Some(a);
            break;
        }
    }
    let a = limited.expect("the noisy caller is limited after its burst");
    a.assert_problem(429, "rate_limited");
    assert!(a.headers.contains_key("retry-after"));
    assert_eq!(
        app.get_token("rl", &quiet).await.status,
        200,
        "other callers are not starved"
    );
    app.stop().await;
}
backends!(callers_are_rate_limited: Sqlite);

/// Two tenants (`alpha`, `beta`) and a caller `svc` scoped to `alpha`: (app, partner, id, key).
async fn tenants_and_a_caller(env: &TestEnv) -> (TestApp, MockServer, String, String) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("alpha", &partner, "s")).await;
    app.create_tenant(&setu_spec("beta", &partner, "s")).await;
    // Unknown tenants in a scope: 422 naming the entry; "*" stays allowed.
    let a = app
        .send(
            app.admin(Method::POST, "/admin/v1/callers")
                .json(&json!({"name": "svc", "tenants": ["alpha", "ghost"]})),
        )
        .await;
    let body = a.assert_problem(422, "invalid_caller");
    assert_eq!(body["field"], "tenants.1", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("ghost"));
    let created = app
        .send(
            app.admin(Method::POST, "/admin/v1/callers")
                .json(&json!({"name": "svc", "tenants": ["alpha"]})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let key = created.json()["api_key"].as_str().unwrap().to_owned();
    assert_eq!(app.get_token("alpha", &key).await.status, 200);
    app.get_token("beta", &key)
        .await
        .assert_problem(403, "forbidden");

    (app, partner, id, key)
}

/// A caller's scope names registered tenants only (422 naming the entry); `"*"` stays allowed.
async fn caller_scopes_name_registered_tenants(env: TestEnv) {
    let (app, _partner, _id, _key) = tenants_and_a_caller(&env).await;
    let unknown = app
        .send(
            app.admin(Method::POST, "/admin/v1/callers")
                .json(&json!({"name": "ghostly", "tenants": ["alpha", "ghost"]})),
        )
        .await;
    let body = unknown.assert_problem(422, "invalid_caller");
    assert!(
        body["field"].as_str().unwrap_or("").starts_with("tenants"),
        "{body}"
    );
    assert!(
        body["detail"].as_str().unwrap_or("").contains("ghost"),
        "{body}"
    );
    let names: Vec<String> = app
        .send(app.admin(Method::GET, "/admin/v1/callers"))
        .await
        .json()["callers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        !names.contains(&"ghostly".to_owned()),
        "refused, not created"
    );
    // Every tenant, registered or to come, stays allowed.
    app.create_caller("everything", json!("*")).await;
    app.stop().await;
}
backends!(caller_scopes_name_registered_tenants: Sqlite);

/// Callers are renamed and rescoped without being deleted (the key stays); the tenant list
/// shows each tenant's health.
async fn callers_change_without_being_deleted(env: TestEnv) {
    let (app, _partner, id, key) = tenants_and_a_caller(&env).await;
    // PATCH: new scope and name, same key.
    let path = format!("/admin/v1/callers/{id}");
    app.send(
        app.admin(Method::PATCH, &path)
            .json(&json!({"tenants": ["ghost"]})),
    )
    .await
    .assert_problem(422, "invalid_caller");
    app.send(app.admin(Method::PATCH, &path).json(&json!({})))
        .await
        .assert_problem(422, "invalid_caller");
    // Nothing of a caller can be removed: null is refused, naming the field.
    for field in ["name", "tenants"] {
        let body = app
            .send(
                app.admin(Method::PATCH, &path)
                    .json(&json!({ field: null })),
            )
            .await
            .assert_problem(422, "invalid_caller");
        assert_eq!(body["field"], field, "{body}");
    }
    app.create_caller("taken", json!("*")).await;
    app.send(
        app.admin(Method::PATCH, &path)
            .json(&json!({"name": "taken"})),
    )
    .await
    .assert_problem(409, "conflict");
    app.send(
        app.admin(Method::PATCH, "/admin/v1/callers/cl_nope")
            .json(&json!({"name": "x"})),
    )
    .await
    .assert_problem(404, "caller_not_found");
    let patched = app
        .send(
            app.admin(Method::PATCH, &path)
                .json(&json!({"name": "svc-renamed", "tenants": ["beta"]})),
        )
        .await;
    assert_eq!(patched.status, 200, "{}", patched.text);
    assert_eq!(patched.json()["name"], "svc-renamed");
    assert_eq!(patched.json()["tenants"], json!(["beta"]));
    assert!(patched.json().get("api_key").is_none());
    assert_eq!(app.get_token("beta", &key).await.status, 200);
    app.get_token("alpha", &key)
        .await
        .assert_problem(403, "forbidden");

    // The tenant list shows each tenant's health. The health row is written off the caller's
    // path (a mint does not wait on it), so the list may show it a moment after the token.
    let mut beta = json!(null);
    for _ in 0..50 {
        let list = app
            .send(app.admin(Method::GET, "/admin/v1/tenants"))
            .await
            .json();
        beta = list["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == "beta")
            .unwrap()
            .clone();
        if beta["health"]["last_success_at"].is_string() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(beta["health"]["last_success_at"].is_string(), "{beta}");
    assert!(beta["health"].get("circuit").is_some(), "{beta}");
    app.stop().await;
}
backends!(callers_change_without_being_deleted: Sqlite, PostgresRedis);

/// A caller gets a new key; the old one keeps working through an optional grace period, and
/// the changes are audited without any key.
async fn caller_keys_rotate_with_an_optional_grace(env: TestEnv) {
    let (app, _partner, id, key) = tenants_and_a_caller(&env).await;
    app.send(
        app.admin(Method::PATCH, &format!("/admin/v1/callers/{id}"))
            .json(&json!({"tenants": ["beta"]})),
    )
    .await;
    // Rotate without grace: the new key works, the old one at once no longer.
    let rotate = format!("/admin/v1/callers/{id}/rotate-key");
    let r = app.send(app.admin(Method::POST, &rotate)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let key2 = r.json()["api_key"].as_str().unwrap().to_owned();
    assert_ne!(key2, key);
    assert!(r.json()["previous_key_expires_at"].is_null());
    assert_eq!(app.get_token("beta", &key2).await.status, 200);
    app.get_token("beta", &key)
        .await
        .assert_problem(401, "unauthorized");

    // Rotate with a 2 s grace: both work, then only the new one.
    let r = app
        .send(
            app.admin(Method::POST, &rotate)
                .json(&json!({"grace_seconds": 2})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let key3 = r.json()["api_key"].as_str().unwrap().to_owned();
    assert!(r.json()["previous_key_expires_at"].is_string());
    assert_eq!(app.get_token("beta", &key2).await.status, 200);
    assert_eq!(app.get_token("beta", &key3).await.status, 200);
    // The 2 s grace ends: polled, not slept through.
    let mut refused = None;
    for _ in 0..50 {
        let a = app.get_token("beta", &key2).await;
        if a.status == 401 {
            refused = Some(a);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    refused
        .expect("the old key stops working after its grace")
        .assert_problem(401, "unauthorized");
    assert_eq!(app.get_token("beta", &key3).await.status, 200);
    app.send(
        app.admin(Method::POST, &rotate)
            .json(&json!({"grace_seconds": 999999999})),
    )
    .await
    .assert_problem(422, "invalid_caller");
    app.send(app.admin(Method::POST, "/admin/v1/callers/cl_nope/rotate-key"))
        .await
        .assert_problem(404, "caller_not_found");

    // Audited, without any key.
    let audit = app
        .send(app.admin(Method::GET, "/admin/v1/audit?limit=100"))
        .await;
    let text = audit.text.clone();
    let entries = audit.json()["entries"].as_array().unwrap().clone();
    for action in ["caller.update", "caller.rotate_key"] {
        assert!(
            entries.iter().any(|e| e["action"] == action),
            "{action} not audited"
        );
    }
    for k in [&key, &key2, &key3] {
        assert!(!text.contains(k.as_str()));
    }

    app.stop().await;
}
backends!(caller_keys_rotate_with_an_optional_grace: Sqlite, PostgresRedis);
