//! Proof of possession against fake partners that check what they receive: client assertions
//! verified with the broker's published JWK set, DPoP proofs and the nonce dance, bound tokens
//! through the shared cache, and the spec rules that keep keys usable and unseen. (Real
//! implementations — oidc-provider and a jose-checked resource server — are in `.ci/pop/`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

const RSA_KEY: &str = include_str!("../fixtures/rsa1.pem");
const EC_KEY: &str = include_str!("../fixtures/ec1.pem");

fn claims_of(jwt: &str) -> Value {
    serde_json::from_slice(&B64URL.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap()
}

/// A partner that records each token request's form and DPoP header and answers a token of
/// `token_type`.
async fn recording_partner(token_type: &'static str) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            ResponseTemplate::new(200).set_body_json(json!({
                "access_token": format!("at-{}", rand_suffix()),
                "token_type": token_type,
                "expires_in": 300,
            }))
        })
        .mount(&server)
        .await;
    server
}

fn rand_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

async fn private_key_jwt_assertions_verify_against_the_published_jwks(env: TestEnv) {
    init_logs();
    let app = env.spawn().await;
    let partner = recording_partner("Bearer").await;
    let token_url = format!("{}/oauth2/token", partner.uri());
    let made = app
        .create_tenant(&json!({
            "id": "bank",
            "issuer": {"kind": "oauth2_client_credentials", "token_url": token_url,
                       "auth_method": "private_key_jwt", "assertion_alg": "PS256",
                       "publish_jwks": true, "scope": "payments"},
            "credentials": {"client_id": "broker-client", "private_key": RSA_KEY, "key_id": "k1"}
        }))
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let secret_line = RSA_KEY.lines().nth(5).unwrap();
    assert!(!made.text.contains(secret_line));
    assert_eq!(
        made.json()["credential_fields"],
        json!(["client_id", "key_id", "private_key"])
    );
    let key = app.create_caller("c", json!("*")).await;
    assert_eq!(app.get_token("bank", &key).await.status, 200);

    let requests = partner.received_requests().await.unwrap();
    let form = form_of(&requests[0]);
    assert_eq!(
        form["client_assertion_type"],
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(form["client_id"], "broker-client");
    assert!(!form.contains_key("client_secret"));
    assert!(requests[0].headers.get("authorization").is_none());
    let assertion = &form["client_assertion"];
    let header = decode_header(assertion).unwrap();
    assert_eq!(
        (header.alg, header.kid.as_deref()),
        (Algorithm::PS256, Some("k1"))
    );
    // Verified with the public key the broker publishes, as the partner would.
    let jwks = app.get("/v1/tenants/bank/jwks.json").await;
    assert_eq!(jwks.status, 200);
    assert_eq!(jwks.content_type(), "application/jwk-set+json");
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks.text).unwrap();
    let jwk = set.find("k1").expect("kid k1 published");
    assert!(
        !jwks.text.contains("\"d\""),
        "no private member: {}",
        jwks.text
    );
    let mut v = Validation::new(Algorithm::PS256);
    v.set_audience(&[&token_url]);
    v.set_issuer(&["broker-client"]);
    let claims = decode::<Value>(assertion, &DecodingKey::from_jwk(jwk).unwrap(), &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], "broker-client");
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!((1..=60).contains(&lifetime), "{claims}");
    assert!(claims["jti"].as_str().unwrap().len() >= 16);
    // A second mint makes a new assertion.
    let test = app
        .send(app.admin(Method::POST, "/admin/v1/tenants/bank/test"))
        .await;
    assert_eq!(test.status, 200, "{}", test.text);
    let again = form_of(&partner.received_requests().await.unwrap()[1]);
    assert_ne!(
        claims_of(&again["client_assertion"])["jti"],
        claims["jti"],
        "a unique jti per assertion"
    );
    // The admin view and the logs hold the key's name, never the key.
    let view = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/bank"))
        .await;
    assert!(!view.text.contains(secret_line));
    assert!(!captured_logs().contains(secret_line));
    // Unpublished keys are not served.
    app.send(
        app.admin(Method::PATCH, "/admin/v1/tenants/bank")
            .json(&json!({"issuer": {"publish_jwks": null}})),
    )
    .await;
    app.get("/v1/tenants/bank/jwks.json")
        .await
        .assert_problem(404, "tenant_not_found");
    let admin_set = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/bank/jwks"))
        .await;
    assert_eq!(admin_set.status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&admin_set.text).unwrap()["keys"][0]["kid"],
        "k1"
    );
    app.stop().await;
}
backends!(private_key_jwt_assertions_verify_against_the_published_jwks: Sqlite);

/// A DPoP partner: asks for a nonce first, then binds the token; the broker's proofs carry
/// what RFC 9449 asks, the token is handed out as DPoP (also through Redis to another
/// replica), and a partner that answers an unbound token is refused.
async fn dpop_tenants_send_proofs_and_follow_the_nonce(env: TestEnv) {
    let apps = if env.redis_url.is_some() {
        vec![env.spawn().await, env.spawn().await]
    } else {
        vec![env.spawn().await]
    };
    let partner = MockServer::start().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    Mock::given(method("POST"))
        .respond_with(move |req: &wiremock::Request| {
            let proof = req.headers.get("dpop").map(|v| v.to_str().unwrap().to_owned());
            c.fetch_add(1, Ordering::SeqCst);
            match proof.map(|p| claims_of(&p)["nonce"].clone()) {
                Some(Value::String(n)) if n == "n-1" => ResponseTemplate::new(200)
                    .insert_header("dpop-nonce", "n-2")
                    .set_body_json(json!({"access_token": "bound-token", "token_type": "DPoP", "expires_in": 300})),
                _ => ResponseTemplate::new(400)
                    .insert_header("dpop-nonce", "n-1")
                    .set_body_json(json!({"error": "use_dpop_nonce"})),
            }
        })
        .mount(&partner)
        .await;
    let token_url = format!("{}/token", partner.uri());
    let made = apps[0]
        .create_tenant(&json!({
            "id": "bound",
            "issuer": {"kind": "oauth2_client_credentials", "token_url": token_url, "dpop": true},
            "credentials": {"client_id": "c", "client_secret": "s", "dpop_private_key": EC_KEY}
        }))
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let key = apps[0].create_caller("c", json!("*")).await;
    let got = apps[0].get_token("bound", &key).await;
    assert_eq!(got.status, 200, "{}", got.text);
    assert_eq!(
        (
            got.json()["access_token"].as_str(),
            got.json()["token_type"].as_str()
        ),
        (Some("bound-token"), Some("DPoP"))
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one retry with the nonce");
    let requests = partner.received_requests().await.unwrap();
    for (i, r) in requests.iter().enumerate() {
        let proof = r.headers.get("dpop").unwrap().to_str().unwrap();
        let header = decode_header(proof).unwrap();
        assert_eq!(header.typ.as_deref(), Some("dpop+jwt"));
        let jwk = header.jwk.expect("the public key in the header");
        let mut v = Validation::new(Algorithm::ES256);
        v.required_spec_claims.clear();
        let claims = decode::<Value>(proof, &DecodingKey::from_jwk(&jwk).unwrap(), &v)
            .unwrap()
            .claims;
        assert_eq!(
            (claims["htm"].as_str(), claims["htu"].as_str()),
            (Some("POST"), Some(token_url.as_str()))
        );
        assert!(claims.get("ath").is_none(), "no ath on token requests");
        assert_eq!(
            claims.get("nonce").and_then(Value::as_str),
            (i == 1).then_some("n-1")
        );
    }
    // The token is DPoP wherever it is read from.
    if let Some(other) = apps.get(1) {
        let there = other.get_token("bound", &key).await;
        assert_eq!(there.json()["token_type"], "DPoP", "{}", there.text);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "served from the shared cache"
        );
    }
    // A proof for callers, bound to the token.
    let proof = apps[0]
        .send(
            apps[0]
                .client
                .post(format!("{}/v1/tenants/bound/dpop-proof", apps[0].address))
                .bearer_auth(&key)
                .json(&json!({"htm": "PUT", "htu": "https://api.partner.example/v1/x?y=1", "nonce": "rs-1"})),
        )
        .await;
    assert_eq!(proof.status, 200, "{}", proof.text);
    let claims = claims_of(proof.json()["proof"].as_str().unwrap());
    assert_eq!(claims["htu"], "https://api.partner.example/v1/x");
    assert_eq!(claims["nonce"], "rs-1");
    use sha2::Digest;
    assert_eq!(
        claims["ath"],
        B64URL.encode(sha2::Sha256::digest(b"bound-token"))
    );
    // The OAuth face says DPoP too.
    let caller = apps[0]
        .send(apps[0].admin(Method::GET, "/admin/v1/callers"))
        .await
        .json();
    let id = caller["callers"][0]["id"].as_str().unwrap().to_owned();
    let oauth = apps[0]
        .send(
            apps[0]
                .client
                .post(format!("{}/oauth2/token", apps[0].address))
                .basic_auth(&id, Some(&key))
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("scope", "tenant:bound"),
                ]),
        )
        .await;
    assert_eq!(oauth.json()["token_type"], "DPoP", "{}", oauth.text);

    // A partner that does not bind the token is refused, not handed out as if bound.
    let unbound = recording_partner("Bearer").await;
    apps[0]
        .create_tenant(&json!({
            "id": "unbound",
            "issuer": {"kind": "oauth2_client_credentials", "token_url": format!("{}/token", unbound.uri()), "dpop": true},
            "credentials": {"client_id": "c", "client_secret": "s"}
        }))
        .await;
    let refused = apps[0].get_token("unbound", &key).await;
    let p = refused.assert_problem(502, "upstream_bad_response");
    assert!(p["detail"].as_str().unwrap().contains("DPoP"), "{p}");
    for app in &apps {
        app.stop().await;
    }
}
backends!(dpop_tenants_send_proofs_and_follow_the_nonce: Sqlite, PostgresRedis);

/// Each proof-of-possession setting only where it means something; keys that cannot sign are
/// refused at write, naming the field and never repeating the key.
async fn proof_settings_are_validated_at_write(env: TestEnv) {
    let app = env.spawn().await;
    let url = "http://127.0.0.1:9/token";
    let garbage = "-----BEGIN PRIVATE KEY-----\nTk9UQUtFWQ==\n-----END PRIVATE KEY-----";
    let cases = [
        (
            json!({"kind": "setu_partner", "token_url": url, "dpop": true}),
            json!({"client_id": "a", "client_secret": "b"}),
            "issuer.dpop",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "assertion_alg": "RS256"}),
            json!({"client_id": "a", "client_secret": "b"}),
            "issuer.assertion_alg",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "auth_method": "private_key_jwt"}),
            json!({"client_id": "a", "private_key": garbage}),
            "credentials.private_key",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "auth_method": "private_key_jwt", "assertion_alg": "RS256"}),
            json!({"client_id": "a", "private_key": EC_KEY}),
            "credentials.private_key",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "auth_method": "private_key_jwt"}),
            json!({"client_id": "a", "client_secret": "b"}),
            "credentials.private_key",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "auth_method": "tls_client_auth"}),
            json!({"client_id": "a", "tls_certificate": garbage}),
            "credentials.tls_private_key",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "publish_jwks": true}),
            json!({"client_id": "a", "client_secret": "b"}),
            "issuer.publish_jwks",
        ),
        (
            json!({"kind": "jwt_bearer", "token_url": url}),
            json!({"private_key": RSA_KEY}),
            "issuer.assertion",
        ),
        (
            json!({"kind": "oauth2_client_credentials", "token_url": url, "tls_ca": "not a certificate"}),
            json!({"client_id": "a", "client_secret": "b"}),
            "issuer.tls_ca",
        ),
    ];
    for (i, (issuer, credentials, field)) in cases.into_iter().enumerate() {
        let a = app
            .create_tenant(
                &json!({"id": format!("t{i}"), "issuer": issuer, "credentials": credentials}),
            )
            .await;
        let p = a.assert_problem(422, "invalid_spec");
        assert_eq!(p["field"], field, "case {i}: {p}");
        assert!(
            !a.text.contains("Tk9UQUtFWQ"),
            "case {i} repeats the key: {}",
            a.text
        );
    }
    // A DPoP tenant without a key gets one generated; turning DPoP off keeps it.
    let made = app
        .create_tenant(&json!({"id": "gen", "issuer": {"kind": "oauth2_client_credentials", "token_url": url, "dpop": true},
            "credentials": {"client_id": "a", "client_secret": "b"}}))
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    assert_eq!(
        made.json()["credential_fields"],
        json!(["client_id", "client_secret", "dpop_private_key"])
    );
    let jwks = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/gen/jwks"))
        .await
        .json();
    assert_eq!(jwks["keys"][0]["kty"], "EC");
    let off = app
        .send(
            app.admin(Method::PATCH, "/admin/v1/tenants/gen")
                .json(&json!({"issuer": {"dpop": false}})),
        )
        .await;
    assert_eq!(off.status, 200, "{}", off.text);
    assert_eq!(
        off.json()["credential_fields"],
        json!(["client_id", "client_secret", "dpop_private_key"])
    );
    app.stop().await;
}
backends!(proof_settings_are_validated_at_write: Sqlite);

/// `GET /admin/v1/kinds` is the one source of the fields a kind takes: a tenant made of
/// exactly the required fields it lists is accepted, for every kind a form can register and
/// every client authentication.
async fn the_kinds_the_broker_lists_are_the_ones_it_accepts(env: TestEnv) {
    let app = env.spawn().await;
    let kinds = app
        .send(app.admin(Method::GET, "/admin/v1/kinds"))
        .await
        .json();
    let value = |f: &Value| match (f["name"].as_str().unwrap(), f["input"].as_str().unwrap()) {
        ("private_key", _) => EC_KEY.to_owned(),
        ("tls_certificate", _) => include_str!("../fixtures/client-cert.pem").to_owned(),
        ("tls_private_key", _) => include_str!("../fixtures/client-cert.key").to_owned(),
        (_, "pem") => panic!("a pem field this test does not know: {f}"),
        (name, _) => format!("{name}-value"),
    };
    let required = |fields: &Value| -> serde_json::Map<String, Value> {
        fields
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["required"] == true)
            .map(|f| (f["name"].as_str().unwrap().to_owned(), json!(value(f))))
            .collect()
    };
    let mut made = 0;
    for k in kinds["kinds"].as_array().unwrap() {
        if k["form"] != true {
            continue;
        }
        let kind = k["kind"].as_str().unwrap();
        let mut cases = vec![(None, required(&k["credentials"]))];
        for m in k["auth_methods"].as_array().unwrap() {
            cases.push((Some(m["method"].clone()), required(&m["credentials"])));
        }
        for (method, creds) in cases {
            let mut issuer = json!({"kind": kind, "token_url": "http://127.0.0.1:9/token"});
            if let Some(m) = &method {
                issuer["auth_method"] = m.clone();
            }
            let id = format!("k{made}");
            let a = app
                .create_tenant(&json!({"id": id, "issuer": issuer, "credentials": creds}))
                .await;
            assert_eq!(a.status, 201, "{kind} {method:?}: {}", a.text);
            made += 1;
        }
    }
    assert!(made >= 4 + 2 * 6, "{made} combinations");
    app.stop().await;
}
backends!(the_kinds_the_broker_lists_are_the_ones_it_accepts: Sqlite);

/// A TLS partner on 127.0.0.1 with a certificate from its own CA that refuses any client
/// without a certificate from that CA: `POST …/token` answers a token, anything else
/// `{"ok": true}`. Records each request's first line and `Authorization`.
struct TlsPartner {
    url: String,
    ca_pem: String,
    client_pem: String,
    client_key_pem: String,
    seen: Seen,
}

/// Each request's first line and `Authorization`, in arrival order.
type Seen = Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

async fn tls_partner() -> TlsPartner {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let signed = |name: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (cert, key)
    };
    let (server_cert, server_key) = signed("127.0.0.1");
    let (client_cert, client_key) = signed("broker-client");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                // A client without a certificate from the CA fails the handshake here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
                    })
                };
                let length: usize = header("content-length").map_or(0, |n| n.parse().unwrap());
                let mut body = vec![0u8; length];
                tls.read_exact(&mut body).await.unwrap();
                let first = head.lines().next().unwrap_or_default().to_owned();
                let answer = if first.starts_with("POST ") && first.contains("/token ") {
                    r#"{"access_token":"mtls-bound-token","token_type":"Bearer","expires_in":300}"#
                } else {
                    r#"{"ok":true}"#
                };
                log.lock().unwrap().push((first, header("authorization")));
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    TlsPartner {
        url: format!("https://127.0.0.1:{port}"),
        ca_pem: ca.pem(),
        client_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        seen,
    }
}

async fn mutual_tls_reaches_the_partner_for_tokens_and_proxied_calls(env: TestEnv) {
    let app = env.spawn().await;
    let partner = tls_partner().await;
    let spec = |id: &str, ca: bool, cert: bool| {
        let mut issuer = json!({"kind": "oauth2_client_credentials",
            "token_url": format!("{}/token", partner.url), "auth_method": "tls_client_auth"});
        if ca {
            issuer["tls_ca"] = json!(partner.ca_pem);
        }
        let mut credentials = json!({"client_id": "mtls-client"});
        if !cert {
            issuer["auth_method"] = json!("client_secret_basic");
            credentials["client_secret"] = json!("s");
        } else {
            credentials["tls_certificate"] = json!(partner.client_pem);
            credentials["tls_private_key"] = json!(partner.client_key_pem);
        }
        json!({"id": id, "issuer": issuer, "credentials": credentials,
               "proxy": {"base_url": format!("{}/api", partner.url)}})
    };
    // Everything the broker answers or logs here, checked for the client's private key.
    let mut answers = Vec::new();
    for (id, ca, cert) in [
        ("mtls", true, true),
        ("no-ca", false, true),
        ("no-cert", true, false),
    ] {
        let made = app.create_tenant(&spec(id, ca, cert)).await;
        assert_eq!(made.status, 201, "{}", made.text);
        answers.push(made.text);
    }
    let key = app
        .create_caller("mtls-caller", json!(["mtls", "no-ca", "no-cert"]))
        .await;

    let t = app.get_token("mtls", &key).await;
    assert_eq!(t.status, 200, "{}", t.text);
    assert_eq!(t.json()["access_token"], "mtls-bound-token");
    let proxied = app
        .send(
            app.client
                .get(format!("{}/v1/tenants/mtls/proxy/accounts/7", app.address))
                .bearer_auth(&key),
        )
        .await;
    assert_eq!(proxied.status, 200, "{}", proxied.text);
    assert_eq!(proxied.json()["ok"], true);
    let seen = partner.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[0].0.starts_with("POST /token "), "{seen:?}");
    assert_eq!(seen[1].0, "GET /api/accounts/7 HTTP/1.1");
    assert_eq!(seen[1].1.as_deref(), Some("Bearer mtls-bound-token"));

    // Without the tenant's CA the partner's certificate is not trusted; without the client
    // certificate the partner refuses the handshake. Neither reaches the partner's HTTP.
    for id in ["no-ca", "no-cert"] {
        let failed = app.get_token(id, &key).await;
        failed.assert_problem(503, "upstream_unavailable");
        answers.push(failed.text);
    }
    for p in [
        "/admin/v1/tenants",
        "/admin/v1/tenants/mtls",
        "/admin/v1/audit",
    ] {
        answers.push(app.send(app.admin(Method::GET, p)).await.text);
    }
    let metrics = app.get("/metrics").await.text;
    assert!(
        metrics.contains("broker_upstream_requests_total"),
        "{metrics}"
    );
    answers.push(metrics);
    answers.push(captured_logs());
    // The key's base64 body, line by line, and the PEM whole.
    let key_lines: Vec<&str> = partner
        .client_key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && l.len() > 16)
        .collect();
    assert!(!key_lines.is_empty());
    for text in &answers {
        for line in &key_lines {
            assert!(!text.contains(line), "the TLS private key leaked: {text}");
        }
    }
    // A tenant without TLS settings proxies through the shared client: the usual roots only.
    let plain = recording_partner("Bearer").await;
    let made = app
        .create_tenant(
            &json!({"id": "plain", "issuer": {"kind": "oauth2_client_credentials",
            "token_url": format!("{}/token", plain.uri())},
            "credentials": {"client_id": "c", "client_secret": "s"},
            "proxy": {"base_url": format!("{}/api", partner.url)}}),
        )
        .await;
    assert_eq!(made.status, 201, "{}", made.text);
    let key = app.create_caller("plain-caller", json!(["plain"])).await;
    app.send(
        app.client
            .get(format!("{}/v1/tenants/plain/proxy/x", app.address))
            .bearer_auth(&key),
    )
    .await
    .assert_problem(503, "upstream_unavailable");
    assert_eq!(partner.seen.lock().unwrap().len(), 2);
}

backends!(mutual_tls_reaches_the_partner_for_tokens_and_proxied_calls: Sqlite);
