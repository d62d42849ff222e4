//! Planted secrets never reach admin answers, error bodies, metrics, logs or the database.

use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

/// Secrets planted in a tenant's credentials and in a partner's answers.
struct Planted {
    client_secret: String,
    password: String,
    new_password: String,
    access: String,
    refresh: String,
    partner: MockServer,
    /// The `X-Request-Id` of `chat`'s registration, to find its log lines.
    created_request: String,
}

impl Planted {
    /// A partner whose Comm100 answers carry planted tokens and whose Setu endpoint refuses
    /// with an error body that echoes the planted client secret.
    async fn new() -> Self {
        let tag = format!("{:x}", rand::random::<u64>());
        let client_secret = format!("PLANTED-client-secret-{tag}");
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
            .respond_with(ResponseTemplate::new(401).set_body_json(
                json!({"error": "invalid_client", "error_description": client_secret}),
            ))
            .mount(&partner)
            .await;

        Self {
            password: format!("PLANTED-password-{tag}"),
            new_password: format!("PLANTED-rotated-password-{tag}"),
            client_secret,
            access,
            refresh,
            partner,
            created_request: unique_request_id("planted-create"),
        }
    }

    /// Two tenants holding the planted credentials: `chat` (Comm100) and `pay` (Setu).
    async fn register(&self, app: &TestApp) -> Vec<String> {
        let (partner, password, client_secret) =
            (&self.partner, &self.password, &self.client_secret);
        let mut answers = Vec::new();
        let created = app
            .send(
                app.admin(Method::POST, "/admin/v1/tenants")
                    .header("x-request-id", &self.created_request)
                    .json(&comm100_spec("chat", partner, password)),
            )
            .await;
        assert_eq!(created.status, 201);
        answers.push(created.text);
        let created = app
            .create_tenant(&setu_spec("pay", partner, client_secret))
            .await;
        answers.push(created.text);
        // A secret put where it does not belong is not echoed in the 422.
        let mut misplaced = setu_spec("oops", partner, "s");
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

        answers
    }

    /// No answer and no log line holds any planted secret (nor `extra`).
    fn assert_none_in(&self, answers: &[String], extra: &[&str]) {
        assert!(
            logs_of_request(&self.created_request).contains("tenant created"),
            "this test's logs were captured"
        );
        let logs = captured_logs();
        let planted = [
            &self.client_secret,
            &self.password,
            &self.new_password,
            &self.access,
            &self.refresh,
        ];
        for secret in planted
            .iter()
            .map(|s| s.as_str())
            .chain(extra.iter().copied())
        {
            for (i, a) in answers.iter().enumerate() {
                assert!(!a.contains(secret), "answer {i} leaks a secret: {a}");
            }
            assert!(!logs.contains(secret), "the log leaks a secret");
        }
    }
}

/// Registering tenants (and misplacing a secret in a spec) echoes no secret.
async fn secrets_stay_out_of_admin_writes(env: TestEnv) {
    let app = env.spawn().await;
    let planted = Planted::new().await;
    let answers = planted.register(&app).await;
    planted.assert_none_in(&answers, &[]);
    app.stop().await;
}
backends!(secrets_stay_out_of_admin_writes: Sqlite);

/// Tokens are handed out only to callers; a partner's error body is not passed on; admin reads,
/// dry runs, updates and metrics hold no secret, and neither does the database file.
async fn secrets_stay_out_of_answers_logs_and_the_database(env: TestEnv) {
    let app = env.spawn().await;
    let planted = Planted::new().await;
    let mut answers = planted.register(&app).await;
    let (access, new_password) = (&planted.access, &planted.new_password);
    let key = app.create_caller("c", json!("*")).await;
    let fetch_request = unique_request_id("planted-fetch");
    let fetched = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/chat/token", app.address))
                .bearer_auth(&key)
                .header("x-request-id", &fetch_request),
        )
        .await;
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

    assert!(
        logs_of_request(&fetch_request).contains("token minted"),
        "the mint this test caused was logged"
    );
    planted.assert_none_in(&answers, &[&key]);
    let (client_secret, password) = (&planted.client_secret, &planted.password);

    if env.backend == Backend::Sqlite {
        let db = std::fs::read(env.dir.path().join("broker.db")).unwrap();
        let wal = std::fs::read(env.dir.path().join("broker.db-wal")).unwrap_or_default();
        for secret in [client_secret, password, new_password, &key] {
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
backends!(secrets_stay_out_of_answers_logs_and_the_database: Sqlite, PostgresRedis);
