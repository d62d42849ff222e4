//! The other issuer kinds and how partner failures reach callers.

use base64::Engine;
use serde_json::json;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

async fn oauth2_client_credentials_with_basic_auth(env: TestEnv) {
    let app = env.spawn().await;
    let idp = MockServer::start().await;
    let basic = base64::engine::general_purpose::STANDARD.encode("svc-client:s%3Acret");
    Mock::given(method("POST"))
        .and(path("/oauth2/token"))
        .and(header("authorization", format!("Basic {basic}").as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": "opaque-access-token-1", "token_type": "bearer", "expires_in": 3600
        })))
        .expect(1)
        .mount(&idp)
        .await;
    let spec = json!({"id": "kyc", "issuer": {"kind": "oauth2_client_credentials",
        "token_url": format!("{}/oauth2/token", idp.uri()), "scope": "kyc:read kyc:write"},
        "credentials": {"client_id": "svc-client", "client_secret": "s:cret"}});
    assert_eq!(app.create_tenant(&spec).await.status, 201);
    let key = app.create_caller("c", json!("*")).await;
    let body = app.get_token("kyc", &key).await.json();
    assert_eq!(body["access_token"], "opaque-access-token-1");
    assert!((3595..=3600).contains(&body["expires_in"].as_i64().unwrap()));
    let form = form_of(&idp.received_requests().await.unwrap()[0]);
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["scope"], "kyc:read kyc:write");
    assert!(!form.contains_key("client_secret"));
    app.stop().await;
}
backends!(oauth2_client_credentials_with_basic_auth: Sqlite);

async fn custom_json_recipe(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v2/auth/token"))
        .and(header("x-client-id", "cid-9"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "status": 200, "success": true, "data": {"expiresIn": "1800", "token": "v2-token"}
        })))
        .mount(&partner)
        .await;
    let spec = json!({"id": "setu-v2", "issuer": {"kind": "custom",
        "token_url": format!("{}/v2/auth/token", partner.uri()),
        "request": {"content_type": "json", "body": {"clientID": "{{client_id}}", "secret": "{{secret}}"},
                    "headers": {"x-client-id": "{{client_id}}"}},
        "response": {"access_token": "/data/token", "expires_in": "/data/expiresIn"}},
        "credentials": {"client_id": "cid-9", "secret": "v2-secret"}});
    let created = app.create_tenant(&spec).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let key = app.create_caller("c", json!("*")).await;
    let body = app.get_token("setu-v2", &key).await.json();
    assert_eq!(body["access_token"], "v2-token");
    assert!((1795..=1800).contains(&body["expires_in"].as_i64().unwrap()));
    let req = &partner.received_requests().await.unwrap()[0];
    let sent: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(sent, json!({"clientID": "cid-9", "secret": "v2-secret"}));
    assert_eq!(req.headers["content-type"], "application/json");
    app.stop().await;
}
backends!(custom_json_recipe: Sqlite);

async fn partner_failures_are_classified(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let cases = [
        (
            "rejects",
            ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_client"})),
            502,
            "upstream_rejected_credentials",
        ),
        (
            "badgrant",
            ResponseTemplate::new(400)
                .set_body_json(json!({"error": "invalid_grant", "error_description": "bad"})),
            502,
            "upstream_rejected_credentials",
        ),
        (
            "down",
            ResponseTemplate::new(503).set_body_string("maintenance"),
            503,
            "upstream_unavailable",
        ),
        (
            "html",
            ResponseTemplate::new(200).set_body_raw("<html>login</html>", "text/html"),
            502,
            "upstream_bad_response",
        ),
        (
            "notoken",
            ResponseTemplate::new(200).set_body_json(json!({"token": "x"})),
            502,
            "upstream_bad_response",
        ),
        (
            "throttles",
            ResponseTemplate::new(429).insert_header("retry-after", "7"),
            503,
            "upstream_rate_limited",
        ),
        (
            "redirects",
            ResponseTemplate::new(302).insert_header("location", "http://169.254.169.254/"),
            502,
            "upstream_bad_response",
        ),
    ];
    let key = app.create_caller("c", json!("*")).await;
    for (id, template, status, code) in cases {
        Mock::given(method("POST"))
            .and(path(format!("/{id}/auth/token")))
            .respond_with(template)
            .mount(&partner)
            .await;
        let mut spec = setu_spec(id, &partner, "s");
        spec["issuer"]["token_url"] = json!(format!("{}/{id}/auth/token", partner.uri()));
        assert_eq!(app.create_tenant(&spec).await.status, 201);
        let a = app.get_token(id, &key).await;
        let body = a.assert_problem(status, code);
        assert!(
            !a.text.contains("maintenance") && !a.text.contains("<html>"),
            "{body}"
        );
        if id == "throttles" {
            assert_eq!(a.headers["retry-after"], "7");
        }
    }
    // A token with no expiry and no default_ttl_seconds is refused.
    Mock::given(method("POST"))
        .and(path("/noexp/auth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"accessToken": "opaque"})))
        .mount(&partner)
        .await;
    let mut spec = setu_spec("noexp", &partner, "s");
    spec["issuer"] =
        json!({"kind": "setu_partner", "token_url": format!("{}/noexp/auth/token", partner.uri())});
    app.create_tenant(&spec).await;
    app.get_token("noexp", &key)
        .await
        .assert_problem(502, "upstream_token_expiry_unknown");
    // With a default, the same answer is served for that long.
    let p = app
        .send(
            app.admin(reqwest::Method::PATCH, "/admin/v1/tenants/noexp")
                .json(&json!({"issuer": {"default_ttl_seconds": 120}})),
        )
        .await;
    assert_eq!(p.status, 200, "{}", p.text);
    let body = app.get_token("noexp", &key).await.json();
    assert!((115..=120).contains(&body["expires_in"].as_i64().unwrap()));
    app.stop().await;
}
backends!(partner_failures_are_classified: Sqlite);

async fn admin_test_is_a_dry_run_and_create_never_calls_the_partner(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    let token = setu_jwt(300);
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"accessToken": token})))
        .mount(&partner)
        .await;
    assert_eq!(
        app.create_tenant(&setu_spec("dry", &partner, "s"))
            .await
            .status,
        201
    );
    assert_eq!(partner.received_requests().await.unwrap().len(), 0);
    let a = app
        .send(app.admin(reqwest::Method::POST, "/admin/v1/tenants/dry/test"))
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let body = a.json();
    assert_eq!(body["ok"], true);
    assert!((295..=300).contains(&body["expires_in"].as_i64().unwrap()));
    assert!(
        !a.text.contains(&token),
        "the test answer must not carry the token"
    );
    app.send(app.admin(reqwest::Method::POST, "/admin/v1/tenants/ghost/test"))
        .await
        .assert_problem(404, "tenant_not_found");
    app.stop().await;
}
backends!(admin_test_is_a_dry_run_and_create_never_calls_the_partner: Sqlite);
