//! The admin API: validation, conflicts, and the CRUD round trip.

use reqwest::Method;
use serde_json::json;
use wiremock::MockServer;

use crate::backends;
use crate::helpers::*;

async fn bad_input_gets_clear_problems(env: TestEnv) {
    let app = env.spawn().await;
    let partner = MockServer::start().await;
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

    // Callers.
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
backends!(bad_input_gets_clear_problems: Sqlite, Postgres);

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
