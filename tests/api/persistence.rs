//! What is stored survives restarts; rotation and deletion drop cached tokens.

use reqwest::Method;
use serde_json::json;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

async fn tenants_and_callers_survive_a_restart(env: TestEnv) {
    let partner = setu_partner(300, 0).await;
    let app = env.spawn().await;
    assert_eq!(
        app.create_tenant(&setu_spec("durable", &partner, "keep-me"))
            .await
            .status,
        201
    );
    let key = app.create_caller("svc", json!(["durable"])).await;
    app.stop().await;

    let again = env.spawn().await;
    let list = again
        .send(again.admin(Method::GET, "/admin/v1/tenants"))
        .await
        .json();
    assert_eq!(list["tenants"][0]["id"], "durable");
    let a = again.get_token("durable", &key).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let form = form_of(&partner.received_requests().await.unwrap()[0]);
    assert_eq!(
        form["client_secret"], "keep-me",
        "credentials open after a restart"
    );
    again.stop().await;

    if env.backend == Backend::Sqlite {
        use std::os::unix::fs::PermissionsExt;
        let key_file = env.dir.path().join("broker.db.key");
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the generated key file is private");
    }
}
backends!(tenants_and_callers_survive_a_restart: Sqlite, Postgres);

async fn rotation_and_deletion_drop_the_cached_token(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/auth/token"))
        .respond_with(|req: &wiremock::Request| {
            let form = form_of(req);
            if ["old-secret", "new-secret"].contains(&form["client_secret"].as_str()) {
                ResponseTemplate::new(200).set_body_json(json!({"accessToken": setu_jwt(300)}))
            } else {
                ResponseTemplate::new(401).set_body_json(json!({"error": "invalid_client"}))
            }
        })
        .mount(&partner)
        .await;
    app.create_tenant(&setu_spec("rot", &partner, "old-secret"))
        .await;
    let key = app.create_caller("svc", json!("*")).await;
    let before = app.get_token("rot", &key).await.json()["access_token"].clone();
    assert_eq!(
        app.get_token("rot", &key).await.json()["access_token"],
        before
    );

    let bad = app
        .send(
            app.admin(Method::PUT, "/admin/v1/tenants/rot/credentials")
                .json(&json!({"client_id": "x"})),
        )
        .await;
    assert_eq!(
        bad.assert_problem(422, "invalid_spec")["field"],
        "credentials.client_secret"
    );
    app.send(
        app.admin(Method::PUT, "/admin/v1/tenants/rot/credentials")
            .body("nope")
            .header("content-type", "application/json"),
    )
    .await
    .assert_problem(400, "invalid_json");
    // Failed rotations kept the cached token.
    assert_eq!(
        app.get_token("rot", &key).await.json()["access_token"],
        before
    );

    let put = app
        .send(
            app.admin(Method::PUT, "/admin/v1/tenants/rot/credentials")
                .json(&json!({
            "client_id": "rot-client", "client_secret": "new-secret"})),
        )
        .await;
    assert_eq!(put.status, 204, "{}", put.text);
    let after = app.get_token("rot", &key).await.json()["access_token"].clone();
    assert_ne!(after, before, "rotation dropped the cached token");
    let reqs = partner.received_requests().await.unwrap();
    assert_eq!(reqs.len(), 2);
    assert_eq!(form_of(&reqs[1])["client_secret"], "new-secret");

    assert_eq!(
        app.send(app.admin(Method::DELETE, "/admin/v1/tenants/rot"))
            .await
            .status,
        204
    );
    app.get_token("rot", &key)
        .await
        .assert_problem(404, "tenant_not_found");
    // Re-registering the id starts from a fresh mint, not the deleted tenant's token.
    app.create_tenant(&setu_spec("rot", &partner, "new-secret"))
        .await;
    assert_ne!(
        app.get_token("rot", &key).await.json()["access_token"],
        after
    );
    app.stop().await;
}
backends!(rotation_and_deletion_drop_the_cached_token: Sqlite, Postgres, PostgresRedis);
