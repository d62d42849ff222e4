//! Fake partners (wiremock) that speak the documented Setu and Comm100 formats.

use super::*;

/// The audit entries for `query` once there are at least `want` (the writer batches: polls up
/// to 4 s).
pub async fn audit_entries(app: &TestApp, query: &str, want: usize) -> Vec<Value> {
    for _ in 0..40 {
        let entries = app.audit(query).await;
        if entries.len() >= want {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {want} audit entries for {query}");
}

pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An unsigned JWT-shaped token with these claims (the broker never verifies partner tokens).
pub fn jwt(claims: Value) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
    format!(
        "{}.{}.{}",
        enc(&json!({"alg": "RS256", "typ": "JWT", "kid": "partner-key"})),
        enc(&claims),
        URL_SAFE_NO_PAD.encode(random_suffix())
    )
}

/// A Setu-style access token living `secs` from now, unique per call.
pub fn setu_jwt(secs: i64) -> String {
    let now = now_s();
    jwt(
        json!({"exp": now + secs, "iat": now, "jti": random_suffix(), "typ": "Bearer", "azp": "test"}),
    )
}

/// A Comm100-style access token living `secs` from now.
pub fn comm100_jwt(secs: i64) -> String {
    let now = now_s();
    jwt(
        json!({"nbf": now, "exp": now + secs, "iat": now, "jti": random_suffix(), "partnerId": "10000"}),
    )
}

pub fn setu_spec(id: &str, server: &MockServer, secret: &str) -> Value {
    json!({
        "id": id,
        "display_name": format!("{id} (Setu)"),
        "issuer": {"kind": "setu_partner", "token_url": format!("{}/auth/token", server.uri()), "default_ttl_seconds": 900},
        "credentials": {"client_id": format!("{id}-client"), "client_secret": secret}
    })
}

pub fn comm100_spec(id: &str, server: &MockServer, password: &str) -> Value {
    json!({
        "id": id,
        "issuer": {"kind": "comm100_partner", "token_url": format!("{}/oauth/token", server.uri())},
        "credentials": {"client_id": "client1", "email": "client1@company.com", "password": password}
    })
}

/// A fake Setu partner: every POST gets a fresh token living `lifetime` s, after `delay_ms`.
pub async fn setu_partner(lifetime: i64, delay_ms: u64) -> MockServer {
    let server = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            wiremock::ResponseTemplate::new(200)
                .set_body_json(json!({
                    "accessToken": setu_jwt(lifetime),
                    "refreshToken": jwt(json!({"exp": now_s() + 1800, "typ": "Refresh"})),
                }))
                .set_delay(std::time::Duration::from_millis(delay_ms))
        })
        .mount(&server)
        .await;
    server
}

/// `n` concurrent token fetches spread over `apps`; each must answer 200. The tokens, in order.
pub async fn fetch_many(apps: &[TestApp], tenant: &str, key: &str, n: usize) -> Vec<Value> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let app = &apps[i % apps.len()];
            let (client, url, key) = (
                app.client.clone(),
                format!("{}/v1/tenants/{tenant}/token", app.address),
                key.to_owned(),
            );
            tokio::spawn(async move {
                let r = client.get(url).bearer_auth(key).send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()["access_token"].clone()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// The form fields of a request body.
pub fn form_of(req: &wiremock::Request) -> HashMap<String, String> {
    url::form_urlencoded::parse(&req.body)
        .into_owned()
        .collect()
}
