//! Planted secrets never reach admin answers, error bodies, metrics, logs or the database.

use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

async fn secrets_stay_secret(env: TestEnv) {
    let app = env.spawn().await;
    let tag = format!("{:x}", rand::random::<u64>());
    let client_secret = format!("PLANTED-client-secret-{tag}");
    let password = format!("PLANTED-password-{tag}");
    let new_password = format!("PLANTED-rotated-password-{tag}");
    let access = comm100_jwt(43200);
    let refresh = format!("PLANTEDREFRESH{tag}");
    let partner = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "access_token": access, "expires_in": 43200, "token_type": "Bearer",
            "refresh_token": refresh, "scope": "comm100 offline_access"
        })))
        .mount(&partner)
        .await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .respond_with(
            ResponseTemplate::new(401).set_body_json(
                json!({"error": "invalid_client", "error_description": client_secret}),
            ),
        )
        .mount(&partner)
        .await;

    let mut answers = Vec::new();
    let created = app
        .create_tenant(&comm100_spec("chat", &partner, &password))
        .await;
    assert_eq!(created.status, 201);
    answers.push(created.text);
    let created = app
        .create_tenant(&setu_spec("pay", &partner, &client_secret))
        .await;
    answers.push(created.text);
    // A secret put where it does not belong is not echoed in the 422.
    let mut misplaced = setu_spec("oops", &partner, "s");
    misplaced["issuer"]["default_ttl_seconds"] = json!(client_secret);
    answers.push(
        app.create_tenant(&misplaced)
            .await
            .assert_problem(422, "invalid_spec")
            .to_string(),
    );
    misplaced["issuer"]["default_ttl_seconds"] = json!(900);
    misplaced["issuer"]["kind"] = json!(password);
    answers.push(app.create_tenant(&misplaced).await.text);
    misplaced["issuer"]["kind"] = json!("setu_partner");
    misplaced["credentials"][&password] = json!("x");
    answers.push(app.create_tenant(&misplaced).await.text);

    let key = app.create_caller("c", json!("*")).await;
    let fetched = app.get_token("chat", &key).await;
    assert_eq!(fetched.json()["access_token"], access.as_str());
    // The partner's error body (which here echoes the secret) is not passed on.
    let failed = app.get_token("pay", &key).await;
    failed.assert_problem(502, "upstream_rejected_credentials");
    answers.push(failed.text);

    for p in [
        "/admin/v1/tenants",
        "/admin/v1/tenants/chat",
        "/admin/v1/tenants/pay",
        "/admin/v1/callers",
    ] {
        answers.push(app.send(app.admin(Method::GET, p)).await.text);
    }
    answers.push(
        app.send(app.admin(Method::POST, "/admin/v1/tenants/chat/test"))
            .await
            .text,
    );
    answers.push(
        app.send(
            app.admin(Method::PATCH, "/admin/v1/tenants/chat")
                .json(&json!({"display_name": "Chat"})),
        )
        .await
        .text,
    );
    let put = app
        .send(
            app.admin(Method::PUT, "/admin/v1/tenants/chat/credentials")
                .json(&json!({
            "client_id": "client1", "email": "client1@company.com", "password": new_password})),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.text);
    let metrics = app.get("/metrics").await.text;
    assert!(metrics.contains("broker_upstream_requests_total"));
    answers.push(metrics);

    let logs = captured_logs();
    assert!(logs.contains("token minted"), "logs were captured");
    for secret in [
        &client_secret,
        &password,
        &new_password,
        &access,
        &refresh,
        &key,
    ] {
        for (i, a) in answers.iter().enumerate() {
            assert!(
                !a.contains(secret.as_str()),
                "answer {i} leaks a secret: {a}"
            );
        }
        assert!(!logs.contains(secret.as_str()), "the log leaks a secret");
    }

    if env.backend == Backend::Sqlite {
        let db = std::fs::read(env.dir.path().join("broker.db")).unwrap();
        let wal = std::fs::read(env.dir.path().join("broker.db-wal")).unwrap_or_default();
        for secret in [&client_secret, &password, &new_password, &key] {
            for bytes in [&db, &wal] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "the database holds a plaintext secret"
                );
            }
        }
    }
    app.stop().await;
}
backends!(secrets_stay_secret: Sqlite, PostgresRedis);
