//! Caller JWTs and the RFC 8725 attack set, the audit trail, and online key rotation.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{json, Value};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::backends;
use crate::helpers::*;

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "token-broker";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn jwk(name: &str) -> Value {
    let all: Value = serde_json::from_slice(&fixture("jwks_keys.json")).unwrap();
    all[name].clone()
}

pub(crate) fn sign(claims: &Value, alg: Algorithm, pem: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&fixture(pem)).unwrap(),
        _ => EncodingKey::from_rsa_pem(&fixture(pem)).unwrap(),
    };
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

pub(crate) fn claims(tenants: Value) -> Value {
    let now = now_s();
    json!({"sub": "svc-billing", "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, "tenants": tenants})
}

pub(crate) async fn idp(keys: &[&str]) -> MockServer {
    let server = MockServer::start().await;
    publish(&server, keys).await;
    server
}

async fn publish(server: &MockServer, keys: &[&str]) {
    server.reset().await;
    let doc = json!({"keys": keys.iter().map(|k| jwk(k)).collect::<Vec<_>>()});
    Mock::given(method("GET"))
        .and(path("/jwks"))
        .respond_with(ResponseTemplate::new(200).set_body_json(doc))
        .mount(server)
        .await;
}

pub(crate) fn with_jwt(env: &mut TestEnv, idp: &MockServer) {
    env.extra
        .insert("BROKER_JWT_JWKS_URL".into(), format!("{}/jwks", idp.uri()));
    env.extra.insert("BROKER_JWT_ISSUER".into(), ISSUER.into());
    env.extra
        .insert("BROKER_JWT_AUDIENCE".into(), AUDIENCE.into());
}

/// An app accepting caller JWTs from a fake IdP (keys `rsa1`, `ec1`), with tenants `t1` and
/// `t2`: (app, IdP, partner).
async fn jwt_app(env: &mut TestEnv) -> (TestApp, MockServer, MockServer) {
    let idp = idp(&["rsa1", "ec1"]).await;
    with_jwt(env, &idp);
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("t1", &partner, "s")).await;
    app.create_tenant(&setu_spec("t2", &partner, "s")).await;
    (app, idp, partner)
}

async fn jwt_callers_are_scoped_by_their_tenants_claim(mut env: TestEnv) {
    let (app, _idp, _partner) = jwt_app(&mut env).await;

    let good = sign(
        &claims(json!(["t1"])),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    let a = app.get_token("t1", &good).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let es = sign(&claims(json!("*")), Algorithm::ES256, "ec1.pem", Some("e1"));
    assert_eq!(app.get_token("t2", &es).await.status, 200);
    let ps = sign(
        &claims(json!(["t1"])),
        Algorithm::PS256,
        "rsa1.pem",
        Some("k1"),
    );
    assert_eq!(app.get_token("t1", &ps).await.status, 200);
    app.get_token("t2", &good)
        .await
        .assert_problem(403, "forbidden");
    let no_scope = sign(
        &json!({"sub": "x", "iss": ISSUER, "aud": AUDIENCE, "exp": now_s() + 60}),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    app.get_token("t1", &no_scope)
        .await
        .assert_problem(403, "forbidden");
    app.stop().await;
}
backends!(jwt_callers_are_scoped_by_their_tenants_claim: Sqlite);

/// RFC 8725's attack set: every one is 401 `unauthorized`.
async fn the_jwt_attack_set_is_refused(mut env: TestEnv) {
    let (app, _idp, _partner) = jwt_app(&mut env).await;
    let cases = rfc8725_attacks();
    for (what, token) in cases {
        let a = app.get_token("t1", &token).await;
        assert_eq!(a.status, 401, "{what}: {}", a.text);
        assert_eq!(a.json()["code"], "unauthorized", "{what}");
    }
    app.stop().await;
}
backends!(the_jwt_attack_set_is_refused: Sqlite);

/// RFC 8725's attack set against caller JWTs (the IdP's keys are `rsa1` as `k1`, `ec1` as
/// `e1`): a name and a token each.
fn rfc8725_attacks() -> Vec<(&'static str, String)> {
    let good = sign(
        &claims(json!(["t1"])),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    let now = now_s();
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let alg_none = format!(
        "{}.{}.",
        enc(&json!({"alg": "none", "typ": "JWT", "kid": "k1"})),
        enc(&claims(json!("*")))
    );
    let hs_with_public_key = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(
            &h,
            &claims(json!("*")),
            &EncodingKey::from_secret(&fixture("rsa1.pub.pem")),
        )
        .unwrap()
    };
    let tampered = {
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], enc(&claims(json!("*"))), parts[2])
    };
    let mut c = claims(json!("*"));
    let with = |k: &str, v: Value| {
        let mut c = claims(json!("*"));
        c[k] = v;
        c
    };
    c.as_object_mut().unwrap().remove("exp");
    vec![
        ("alg none", alg_none),
        ("HS256 keyed with the RSA public key", hs_with_public_key),
        (
            "valid signature from another key",
            sign(
                &claims(json!("*")),
                Algorithm::RS256,
                "rsa_other.pem",
                Some("k1"),
            ),
        ),
        (
            "unknown kid",
            sign(
                &claims(json!("*")),
                Algorithm::RS256,
                "rsa1.pem",
                Some("k9"),
            ),
        ),
        (
            "no kid",
            sign(&claims(json!("*")), Algorithm::RS256, "rsa1.pem", None),
        ),
        (
            "RSA key used as ES256 kid",
            sign(
                &claims(json!("*")),
                Algorithm::RS256,
                "rsa1.pem",
                Some("e1"),
            ),
        ),
        (
            "expired",
            sign(
                &with("exp", json!(now - 120)),
                Algorithm::RS256,
                "rsa1.pem",
                Some("k1"),
            ),
        ),
        (
            "nbf in the future",
            sign(
                &with("nbf", json!(now + 120)),
                Algorithm::RS256,
                "rsa1.pem",
                Some("k1"),
            ),
        ),
        (
            "wrong aud",
            sign(
                &with("aud", json!("someone-else")),
                Algorithm::RS256,
                "rsa1.pem",
                Some("k1"),
            ),
        ),
        (
            "wrong iss",
            sign(
                &with("iss", json!("https://evil.example")),
                Algorithm::RS256,
                "rsa1.pem",
                Some("k1"),
            ),
        ),
        (
            "missing exp",
            sign(&c, Algorithm::RS256, "rsa1.pem", Some("k1")),
        ),
        ("payload tampered after signing", tampered),
        ("not a JWT", "hello-there".into()),
        ("three dots", "a.b.c".into()),
    ]
}

async fn a_key_added_at_the_idp_needs_no_restart(mut env: TestEnv) {
    let (app, idp, _partner) = jwt_app(&mut env).await;
    // A key added at the IdP is accepted without a restart.
    publish(&idp, &["rsa1", "rsa2", "ec1"]).await;
    let rotated = sign(
        &claims(json!(["t1"])),
        Algorithm::RS256,
        "rsa2.pem",
        Some("k2"),
    );
    // Accepted once the broker has looked at the IdP again (polled, up to 5 s).
    let mut a = app.get_token("t1", &rotated).await;
    for _ in 0..50 {
        if a.status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        a = app.get_token("t1", &rotated).await;
    }
    assert_eq!(a.status, 200, "{}", a.text);
    app.stop().await;
}
backends!(a_key_added_at_the_idp_needs_no_restart: Sqlite);

async fn the_audit_trail(mut env: TestEnv) {
    let idp = idp(&["rsa1"]).await;
    with_jwt(&mut env, &idp);
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("audited", &partner, "AUDIT-SECRET-123"))
        .await;
    let key = app.create_caller("billing", json!(["audited"])).await;
    let token = app.get_token("audited", &key).await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..5 {
        app.get_token("audited", &key).await;
    }
    let jwt = sign(
        &claims(json!(["audited"])),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    assert_eq!(app.get_token("audited", &jwt).await.status, 200);
    app.get_token("audited", "tbk_not-a-real-key-at-all-000000000000000000000")
        .await;
    app.create_tenant(&setu_spec("elsewhere", &partner, "s"))
        .await;
    let other = app.create_caller("other", json!(["elsewhere"])).await;
    app.get_token("audited", &other)
        .await
        .assert_problem(403, "forbidden");

    let entries = audit_entries(&app, "tenant=audited", 5).await;
    let text = serde_json::to_string(&entries).unwrap();
    assert!(
        !text.contains(&token)
            && !text.contains("AUDIT-SECRET-123")
            && !text.contains(&key)
            && !text.contains(&jwt)
    );
    let fetches: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "token.fetch" && e["outcome"] == "ok")
        .collect();
    let by_key: i64 = fetches
        .iter()
        .filter(|e| e["caller"] == "billing")
        .map(|e| e["count"].as_i64().unwrap())
        .sum();
    assert_eq!(by_key, 6, "six fetches by the API-key caller: {text}");
    let first = fetches.iter().find(|e| e["caller"] == "billing").unwrap();
    assert_eq!(first["auth_method"], "api_key");
    assert!(first["fingerprint"].as_str().unwrap().len() > 20);
    assert!(fetches
        .iter()
        .any(|e| e["caller"] == "svc-billing" && e["auth_method"] == "jwt"));
    assert!(entries
        .iter()
        .any(|e| e["kind"] == "refused" && e["outcome"] == "unauthorized"));
    assert!(entries
        .iter()
        .any(|e| e["kind"] == "refused" && e["outcome"] == "forbidden"));
    assert!(entries
        .iter()
        .any(|e| e["kind"] == "admin" && e["action"] == "tenant.create"));
    // Newest first, filterable by caller.
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]));
    let mine = audit_entries(&app, "caller=svc-billing", 1).await;
    assert!(mine.iter().all(|e| e["caller"] == "svc-billing"));
    app.send(app.admin(Method::GET, "/admin/v1/audit?limit=0"))
        .await
        .assert_problem(400, "invalid_request");
    app.stop().await;
}
backends!(the_audit_trail: Sqlite, PostgresRedis);

async fn no_audit_no_token(mut env: TestEnv) {
    env.extra.insert("BROKER_AUDIT_QUEUE".into(), "4".into());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("guarded", &partner, "s"))
        .await;
    // Fetches of one token by one caller coalesce into one row while the database is away;
    // distinct tenants make distinct rows, which is what fills the queue.
    for i in 0..8 {
        app.create_tenant(&setu_spec(&format!("other{i}"), &partner, "s"))
            .await;
    }
    let key = app.create_caller("c", json!("*")).await;
    assert_eq!(app.get_token("guarded", &key).await.status, 200);
    audit_entries(&app, "tenant=guarded", 1).await;

    // The audit store goes away.
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&env.database_url).await.unwrap();
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_away")
        .execute(&db)
        .await
        .unwrap();
    let mut statuses = Vec::new();
    for i in 0..40 {
        let tenant = if i % 2 == 0 {
            "guarded".to_owned()
        } else {
            format!("other{}", (i / 2) % 8)
        };
        let a = app.get_token(&tenant, &key).await;
        if a.status != 200 {
            let body = a.assert_problem(503, "audit_unavailable");
            assert!(body.get("access_token").is_none());
        }
        statuses.push(a.status);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let tail = &statuses[statuses.len() - 20..];
    assert!(
        tail.iter().all(|s| *s == 503),
        "once the queue is full no token is released: {statuses:?}"
    );

    // It comes back: the queued entries are written and tokens flow again.
    sqlx::query("ALTER TABLE audit_log_away RENAME TO audit_log")
        .execute(&db)
        .await
        .unwrap();
    let mut ok = false;
    for _ in 0..60 {
        if app.get_token("guarded", &key).await.status == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "tokens flow again once the audit store is back");
    app.stop().await;
}
backends!(no_audit_no_token: Sqlite, Postgres);

const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const KEY_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

async fn online_key_rotation(mut env: TestEnv) {
    env.extra
        .insert("BROKER_ENCRYPTION_KEYS".into(), format!("k0:{KEY_A}"));
    let app_a = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    for id in ["r1", "r2", "r3"] {
        app_a
            .create_tenant(&setu_spec(id, &partner, &format!("{id}-secret")))
            .await;
    }
    let key = app_a.create_caller("c", json!("*")).await;
    for id in ["r1", "r2", "r3"] {
        assert_eq!(app_a.get_token(id, &key).await.status, 200);
    }
    let minted_before = partner.received_requests().await.unwrap().len();

    let load = SteadyLoad::start(&app_a.address, &key, &["r1", "r2", "r3"]);

    // Roll: a replica with the new key first, then retire the old one.
    env.extra.insert(
        "BROKER_ENCRYPTION_KEYS".into(),
        format!("k1:{KEY_B},k0:{KEY_A}"),
    );
    let app_b = env.spawn().await;
    load.add(&app_b.address);
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.remove(&app_a.address);
    tokio::time::sleep(Duration::from_millis(100)).await;
    app_a.stop().await;
    // A credential written now is sealed with k1.
    let put = app_b
        .send(
            app_b
                .admin(Method::PUT, "/admin/v1/tenants/r3/credentials")
                .json(&json!({"client_id": "r3-client", "client_secret": "r3-new"})),
        )
        .await;
    assert_eq!(put.status, 204);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Re-seal everything with k1, then drop k0.
    let (rows, tokens) = token_broker::app::rekey(&env.settings()).await.unwrap();
    assert!(rows >= 4, "re-sealed {rows} rows");
    let (again, _) = token_broker::app::rekey(&env.settings()).await.unwrap();
    assert_eq!(again, 0, "rekey is idempotent");
    let store = token_broker::app::open_store(&env.settings())
        .await
        .unwrap();
    assert_eq!(
        store.key_usage().await.unwrap(),
        vec![("k1".to_string(), 6)]
    );
    env.extra
        .insert("BROKER_ENCRYPTION_KEYS".into(), format!("k1:{KEY_B}"));
    let app_c = env.spawn().await;
    load.add(&app_c.address);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (done, failures) = load.finish().await;
    eprintln!("key rotation under load: {done} requests, {failures} failed, {rows} rows and {tokens} cached tokens re-sealed");
    assert_eq!(failures, 0);
    assert!(done > 50);
    // The k1-only replica opened the re-sealed cached tokens instead of minting again
    // (only r3's rotation minted).
    assert_eq!(
        partner.received_requests().await.unwrap().len(),
        minted_before + 1
    );

    app_b.stop().await;
    app_c.stop().await;
}
backends!(online_key_rotation: PostgresRedis);

/// A key that still seals stored credentials cannot be dropped silently: the broker refuses to
/// start, naming the key and the rows.
async fn a_key_still_in_use_cannot_be_dropped(mut env: TestEnv) {
    env.extra
        .insert("BROKER_ENCRYPTION_KEYS".into(), format!("k1:{KEY_B}"));
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("r1", &partner, "r1-secret"))
        .await;
    app.stop().await;
    env.extra
        .insert("BROKER_ENCRYPTION_KEYS".into(), format!("k0:{KEY_A}"));
    let err = token_broker::app::Application::build(env.settings())
        .await
        .err()
        .expect("refuses to start");
    let msg = err.to_string();
    assert!(
        msg.contains("k1") && msg.contains("r1/client_secret"),
        "{msg}"
    );
}
backends!(a_key_still_in_use_cannot_be_dropped: Sqlite);

/// Token fetches every 5 ms spread over a changing set of replicas, counting every failure.
struct SteadyLoad {
    targets: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl SteadyLoad {
    fn start(first: &str, key: &str, tenants: &'static [&'static str]) -> Self {
        let targets = Arc::new(Mutex::new(vec![first.to_owned()]));
        let (stop, failures, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (t, st, f, d, key) = (
            targets.clone(),
            stop.clone(),
            failures.clone(),
            done.clone(),
            key.to_owned(),
        );
        let client = reqwest::Client::new();
        let task = tokio::spawn(async move {
            let mut i = 0usize;
            while !st.load(Ordering::SeqCst) {
                let addr = {
                    let t = t.lock().unwrap();
                    t[i % t.len()].clone()
                };
                let tenant = tenants[i % tenants.len()];
                i += 1;
                let r = client
                    .get(format!("{addr}/v1/tenants/{tenant}/token"))
                    .bearer_auth(&key)
                    .send()
                    .await;
                if !matches!(r, Ok(ref r) if r.status() == 200) {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                d.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        Self {
            targets,
            stop,
            failures,
            done,
            task,
        }
    }

    fn add(&self, address: &str) {
        self.targets.lock().unwrap().push(address.to_owned());
    }

    fn remove(&self, address: &str) {
        self.targets.lock().unwrap().retain(|a| a != address);
    }

    /// Stops the load: (requests, failures).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap();
        (
            self.done.load(Ordering::SeqCst),
            self.failures.load(Ordering::SeqCst),
        )
    }
}

async fn tampered_or_moved_ciphertexts_fail_closed(env: TestEnv) {
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    for id in ["victim", "donor", "moved"] {
        app.create_tenant(&setu_spec(id, &partner, &format!("{id}-secret")))
            .await;
    }
    let key = app.create_caller("c", json!("*")).await;
    sqlx::any::install_default_drivers();
    let db = sqlx::AnyPool::connect(&env.database_url).await.unwrap();
    use sqlx::Row;
    let sealed: Vec<u8> = sqlx::query(
        "SELECT sealed FROM tenant_credentials WHERE tenant_id = $1 AND field = 'client_secret'",
    )
    .bind("victim")
    .fetch_one(&db)
    .await
    .unwrap()
    .get("sealed");
    let mut flipped = sealed.clone();
    let last = flipped.len() - 5;
    flipped[last] ^= 0x01;
    sqlx::query("UPDATE tenant_credentials SET sealed = $1 WHERE tenant_id = $2 AND field = 'client_secret'")
        .bind(flipped)
        .bind("victim")
        .execute(&db)
        .await
        .unwrap();
    let donor: Vec<u8> = sqlx::query(
        "SELECT sealed FROM tenant_credentials WHERE tenant_id = $1 AND field = 'client_secret'",
    )
    .bind("donor")
    .fetch_one(&db)
    .await
    .unwrap()
    .get("sealed");
    sqlx::query("UPDATE tenant_credentials SET sealed = $1 WHERE tenant_id = $2 AND field = 'client_secret'")
        .bind(donor)
        .bind("moved")
        .execute(&db)
        .await
        .unwrap();
    for id in ["victim", "moved"] {
        let a = app.get_token(id, &key).await;
        let body = a.assert_problem(503, "credentials_unreadable");
        assert!(!a.text.contains("secret"), "{body}");
    }
    assert_eq!(
        partner.received_requests().await.unwrap().len(),
        0,
        "the partner was not called"
    );
    assert_eq!(app.get_token("donor", &key).await.status, 200);
    app.stop().await;
}
backends!(tampered_or_moved_ciphertexts_fail_closed: Sqlite, Postgres);

/// A token signed by a known key whose header lists `crit` extensions.
fn sign_with_crit(claims: &Value) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    let head = enc(&json!({"alg": "RS256", "typ": "JWT", "kid": "k1", "crit": ["exp"]}));
    let message = format!("{head}.{}", enc(claims));
    let key = EncodingKey::from_rsa_pem(&fixture("rsa1.pem")).unwrap();
    let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::RS256).unwrap();
    format!("{message}.{sig}")
}

/// 30 tokens with junk kids and a caller whose key the IdP just rotated in, all at once: the
/// JWKS is fetched once or twice for all of them, the real caller waits for one fetch, and the
/// junk kids are then refused without fetching. A `crit` header is refused.
async fn jwks_refetches_are_shared_and_junk_kids_remembered(mut env: TestEnv) {
    let idp = idp(&["rsa1"]).await;
    with_jwt(&mut env, &idp);
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("t1", &partner, "s")).await;
    let good = sign(
        &claims(json!("*")),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    assert_eq!(app.get_token("t1", &good).await.status, 200);
    app.get_token("t1", &sign_with_crit(&claims(json!("*"))))
        .await
        .assert_problem(401, "unauthorized");

    publish(&idp, &["rsa1", "rsa2"]).await;
    let junk: Vec<String> = (0..30)
        .map(|i| {
            sign(
                &claims(json!("*")),
                Algorithm::RS256,
                "rsa1.pem",
                Some(&format!("junk-{i}")),
            )
        })
        .collect();
    let rotated = sign(
        &claims(json!("*")),
        Algorithm::RS256,
        "rsa2.pem",
        Some("k2"),
    );
    let t0 = std::time::Instant::now();
    let junk_calls: Vec<_> = junk
        .iter()
        .map(|t| {
            let (client, url, t) = (
                app.client.clone(),
                format!("{}/v1/tenants/t1/token", app.address),
                t.clone(),
            );
            tokio::spawn(async move {
                client
                    .get(url)
                    .bearer_auth(t)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let a = app.get_token("t1", &rotated).await;
    let waited = t0.elapsed();
    assert_eq!(a.status, 200, "{}", a.text);
    for c in junk_calls {
        assert_eq!(c.await.unwrap(), 401);
    }
    let fetches = idp.received_requests().await.unwrap().len();
    eprintln!("rotated key accepted after {waited:?} behind 30 junk kids; {fetches} JWKS fetches");
    assert!(waited < Duration::from_millis(2_500), "{waited:?}");
    assert!(fetches <= 2, "{fetches} JWKS fetches");

    // The same junk again: refused at once, no fetch.
    let t0 = std::time::Instant::now();
    for t in &junk[..10] {
        assert_eq!(app.get_token("t1", t).await.status, 401);
    }
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(idp.received_requests().await.unwrap().len(), fetches);
    app.stop().await;
}
backends!(jwks_refetches_are_shared_and_junk_kids_remembered: Sqlite);

const ADMIN_AUDIENCE: &str = "token-broker-admin-api";

fn admin_claims(sub: &str, roles: Value) -> Value {
    let now = now_s();
    json!({"sub": sub, "iss": ISSUER, "aud": ADMIN_AUDIENCE, "iat": now, "exp": now + 300, "roles": roles})
}

/// An app accepting admin JWTs from a fake IdP (keys `rsa1`, `ec1`): (app, partner, IdP).
async fn named_admin_app(env: &mut TestEnv) -> (TestApp, MockServer, MockServer) {
    let idp = idp(&["rsa1", "ec1"]).await;
    with_jwt(env, &idp);
    env.extra
        .insert("BROKER_ADMIN_JWT_AUDIENCE".into(), ADMIN_AUDIENCE.into());
    (env.spawn().await, setu_partner(300, 0).await, idp)
}

fn as_admin(app: &TestApp, token: &str, m: Method, p: &str) -> reqwest::RequestBuilder {
    app.client
        .request(m, format!("{}{p}", app.address))
        .bearer_auth(token)
}

/// Named admins: IdP JWTs with the admin audience and a role; auditors read only; every
/// change is audited with the admin's `sub`; the static token is recorded as `admin-token`.
async fn named_admins_from_the_idp(mut env: TestEnv) {
    let (app, partner, _idp) = named_admin_app(&mut env).await;
    let as_admin = |token: &str, m: Method, p: &str| as_admin(&app, token, m, p);
    let alice = sign(
        &admin_claims("alice@example.com", json!(["token-broker-admin", "other"])),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    let bob = sign(
        &admin_claims("bob@example.com", json!("token-broker-auditor")),
        Algorithm::ES256,
        "ec1.pem",
        Some("e1"),
    );
    let nobody = sign(
        &admin_claims("eve@example.com", json!(["viewer"])),
        Algorithm::RS256,
        "rsa1.pem",
        Some("k1"),
    );
    let created = app
        .send(
            as_admin(&alice, Method::POST, "/admin/v1/tenants")
                .json(&setu_spec("named", &partner, "s")),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(
        app.send(as_admin(&bob, Method::GET, "/admin/v1/tenants"))
            .await
            .status,
        200
    );
    assert_eq!(
        app.send(as_admin(&bob, Method::GET, "/admin/v1/audit"))
            .await
            .status,
        200
    );
    app.send(as_admin(&bob, Method::DELETE, "/admin/v1/tenants/named"))
        .await
        .assert_problem(403, "admin_forbidden");
    app.send(
        as_admin(&bob, Method::POST, "/admin/v1/callers")
            .json(&json!({"name": "x", "tenants": "*"})),
    )
    .await
    .assert_problem(403, "admin_forbidden");
    app.send(as_admin(&nobody, Method::GET, "/admin/v1/tenants"))
        .await
        .assert_problem(403, "admin_forbidden");
    // An admin token is not a caller token either.
    app.get_token("named", &alice)
        .await
        .assert_problem(401, "unauthorized");
    // The static token still works, recorded as admin-token.
    assert_eq!(
        app.send(app.admin(Method::DELETE, "/admin/v1/tenants/named"))
            .await
            .status,
        204
    );
    let entries = audit_entries(&app, "tenant=named", 2).await;
    let create = entries
        .iter()
        .find(|e| e["action"] == "tenant.create")
        .expect("create audited");
    assert_eq!(create["caller"], "alice@example.com");
    assert_eq!(create["auth_method"], "jwt");
    let delete = entries
        .iter()
        .find(|e| e["action"] == "tenant.delete")
        .expect("delete audited");
    assert_eq!(delete["caller"], "admin-token");
    assert_eq!(delete["auth_method"], "admin_token");
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains(&alice) && !text.contains(ADMIN_TOKEN));
    app.stop().await;
}
backends!(named_admins_from_the_idp: Sqlite, PostgresRedis);

/// Forged, expired, foreign-key, unsigned and `crit` admin tokens, and a caller's token that
/// carries the admin role, are all refused.
async fn forged_admin_tokens_are_refused(mut env: TestEnv) {
    let (app, _partner, _idp) = named_admin_app(&mut env).await;
    let as_admin = |token: &str, m: Method, p: &str| as_admin(&app, token, m, p);
    // The same attacks as for callers, and a caller's token (wrong audience) carrying the role.
    let mut caller_token = claims(json!("*"));
    caller_token["roles"] = json!(["token-broker-admin"]);
    let mut expired = admin_claims("alice@example.com", json!(["token-broker-admin"]));
    expired["exp"] = json!(now_s() - 120);
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    for (what, token) in [
        (
            "caller audience",
            sign(&caller_token, Algorithm::RS256, "rsa1.pem", Some("k1")),
        ),
        (
            "expired",
            sign(&expired, Algorithm::RS256, "rsa1.pem", Some("k1")),
        ),
        (
            "other key",
            sign(
                &admin_claims("alice@example.com", json!(["token-broker-admin"])),
                Algorithm::RS256,
                "rsa_other.pem",
                Some("k1"),
            ),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                enc(&json!({"alg": "none", "kid": "k1"})),
                enc(&admin_claims(
                    "alice@example.com",
                    json!(["token-broker-admin"])
                ))
            ),
        ),
        (
            "crit",
            sign_with_crit(&admin_claims(
                "alice@example.com",
                json!(["token-broker-admin"]),
            )),
        ),
    ] {
        let a = app
            .send(
                as_admin(&token, Method::POST, "/admin/v1/callers")
                    .json(&json!({"name": "y", "tenants": "*"})),
            )
            .await;
        assert_eq!(a.status, 401, "{what}: {}", a.text);
    }
    app.stop().await;
}
backends!(forged_admin_tokens_are_refused: Sqlite);

/// Guessing the admin token: past a burst of failures a source address gets 429 with
/// Retry-After (counted), while the right token is never throttled, even from that address.
async fn admin_token_guessing_is_throttled(env: TestEnv) {
    let app = env.spawn().await;
    let guess = |t: &'static str| {
        app.client
            .get(format!("{}/admin/v1/tenants", app.address))
            .bearer_auth(t)
    };
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(
            app.send(guess("wrong-guess-0123456789abcdef0123456789"))
                .await,
        );
    }
    let refused = statuses.iter().filter(|a| a.status == 401).count();
    assert!(
        (20..=25).contains(&refused),
        "a burst of about 20: {refused}"
    );
    let throttled = statuses
        .iter()
        .find(|a| a.status == 429)
        .expect("throttled");
    throttled.assert_problem(429, "admin_auth_throttled");
    assert!(
        throttled.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    let right = app.send(app.admin(Method::GET, "/admin/v1/tenants")).await;
    assert_eq!(right.status, 200, "the right token is never throttled");
    let metrics = app.get("/metrics").await.text;
    let n = series(&metrics, "broker_admin_auth_throttled_total").unwrap_or(0.0);
    assert!(n >= 15.0, "{n}");
}
backends!(admin_token_guessing_is_throttled: Sqlite);

/// The failed-admin-authentication throttle follows its settings.
async fn the_admin_auth_throttle_is_configurable(mut env: TestEnv) {
    env.extra
        .insert("BROKER_ADMIN_AUTH_FAILURES_PER_SECOND".into(), "1".into());
    env.extra
        .insert("BROKER_ADMIN_AUTH_FAILURES_BURST".into(), "3".into());
    let app = env.spawn().await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let a = app
            .send(
                app.client
                    .get(format!("{}/admin/v1/tenants", app.address))
                    .bearer_auth("wrong-guess-0123456789abcdef0123456789"),
            )
            .await;
        statuses.push(a.status);
    }
    assert_eq!(&statuses[..3], &[401, 401, 401], "{statuses:?}");
    assert_eq!(statuses[4], 429, "{statuses:?}");
    app.stop().await;
}
backends!(the_admin_auth_throttle_is_configurable: Sqlite);
