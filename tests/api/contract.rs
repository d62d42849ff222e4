//! openapi.yaml is the one list of routes, and the code is checked against it: every route the
//! code registers is in the spec, every path and method in the spec is registered (and answers
//! with something other than "no such route" on a live app), and `api::ROUTES` (the metric
//! labels) holds exactly the spec's paths.

use std::collections::BTreeSet;

use reqwest::Method;

use crate::backends;
use crate::helpers::*;

fn spec_routes() -> BTreeSet<(String, String)> {
    let text =
        std::fs::read_to_string(format!("{}/openapi.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().unwrap() {
        for (method, _) in item.as_mapping().unwrap() {
            let m = method.as_str().unwrap();
            if ["get", "post", "put", "patch", "delete", "head", "options"].contains(&m) {
                out.insert((m.to_uppercase(), path.as_str().unwrap().to_owned()));
            }
        }
    }
    out
}

/// Routes as registered in `src/api/*.rs`: each `web::resource("…")` with the methods of the
/// `.route(web::<method>()…)` calls that follow it.
fn code_routes() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    // Proxy mode: a scope whose default service takes every method under `{path}`.
    let proxy = std::fs::read_to_string(format!("{}/src/api/proxy.rs", env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    if let Some(at) = proxy.find("web::scope(\"") {
        let rest = &proxy[at + "web::scope(\"".len()..];
        let prefix = &rest[..rest.find('"').unwrap()];
        if rest.contains(".default_service(web::to(forward))") {
            for m in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
                out.insert((m.to_owned(), format!("{prefix}/{{path}}")));
            }
        }
    }
    let dir = format!("{}/src/api", env!("CARGO_MANIFEST_DIR"));
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().map_or(true, |e| e != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(path).unwrap();
        let mut rest = src.as_str();
        while let Some(at) = rest.find("web::resource(\"") {
            rest = &rest[at + "web::resource(\"".len()..];
            let end = rest.find('"').unwrap();
            // A tail parameter with a pattern (`{path:.*}`) is `{path}` in the spec.
            let path = rest[..end].replace(":.*}", "}");
            let scope_end = rest.find("web::resource(\"").unwrap_or(rest.len());
            let scope = &rest[..scope_end];
            for m in ["get", "post", "put", "patch", "delete"] {
                if scope.contains(&format!(".route(web::{m}()")) {
                    out.insert((m.to_uppercase(), path.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn spec_and_router_list_the_same_routes() {
    let (spec, code) = (spec_routes(), code_routes());
    assert!(
        code.len() >= 16,
        "found only {} routes in the code",
        code.len()
    );
    let missing_in_spec: Vec<_> = code.difference(&spec).collect();
    let missing_in_code: Vec<_> = spec.difference(&code).collect();
    assert!(
        missing_in_spec.is_empty(),
        "routes the spec lacks: {missing_in_spec:?}"
    );
    assert!(
        missing_in_code.is_empty(),
        "spec routes the router lacks: {missing_in_code:?}"
    );
}

#[test]
fn metric_route_labels_are_the_spec_paths() {
    let spec: BTreeSet<String> = spec_routes().into_iter().map(|(_, p)| p).collect();
    let labels: BTreeSet<String> = token_broker::api::ROUTES
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        labels, spec,
        "api::ROUTES (route labels) and openapi.yaml's paths differ"
    );
}

#[test]
fn allow_headers_list_the_spec_methods() {
    let mut by_path: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for (method, path) in spec_routes() {
        by_path.entry(path).or_default().insert(method);
    }
    for (path, methods) in by_path {
        let allow: BTreeSet<String> = token_broker::api::allowed_methods(&path)
            .unwrap_or_else(|| panic!("no Allow for {path}"))
            .split(", ")
            .map(str::to_owned)
            .collect();
        assert_eq!(allow, methods, "Allow of {path}");
    }
}

/// A 405 says which methods the resource takes (RFC 9110 §15.5.6).
async fn a_405_names_the_allowed_methods(env: TestEnv) {
    let app = env.spawn().await;
    for (method, path, allow) in [
        (Method::DELETE, "/v1/tenants/acme/token", "GET"),
        (Method::GET, "/oauth2/token", "POST"),
        (Method::PUT, "/admin/v1/tenants", "GET, POST"),
        (Method::POST, "/admin/v1/callers/cl_x", "PATCH, DELETE"),
    ] {
        let a = app
            .send(
                app.client
                    .request(method.clone(), format!("{}{path}", app.address)),
            )
            .await;
        a.assert_problem(405, "method_not_allowed");
        assert_eq!(a.headers["allow"], allow, "{method} {path}");
    }
}
backends!(a_405_names_the_allowed_methods: Sqlite);

async fn every_spec_route_is_live(env: TestEnv) {
    let app = env.spawn().await;
    for (method, path) in spec_routes() {
        let concrete = path
            .replace("{tenant_id}", "some-tenant")
            .replace("{caller_id}", "cl_x");
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        let a = app
            .send(
                app.client
                    .request(m, format!("{}{concrete}", app.address))
                    .bearer_auth(ADMIN_TOKEN),
            )
            .await;
        let code = if a.content_type() == "application/problem+json" {
            a.json()["code"].as_str().unwrap_or("").to_owned()
        } else {
            String::new()
        };
        assert!(
            code != "not_found" && code != "method_not_allowed",
            "{method} {path} is in the spec but the app answers {} {code}",
            a.status
        );
    }
    app.stop().await;
}
backends!(every_spec_route_is_live: Sqlite);
