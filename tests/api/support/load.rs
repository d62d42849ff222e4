//! Load and fault helpers: concurrent callers, percentiles, metric series.

use super::*;

/// What callers saw while a load ran.
#[derive(Default, Debug)]
pub struct Seen {
    pub ok: usize,
    pub errors: Vec<(u16, String)>,
    pub took: Vec<Duration>,
}

impl Seen {
    /// The distinct (status, code) pairs seen, with counts.
    pub fn codes(&self) -> Vec<((u16, String), usize)> {
        let mut m = std::collections::BTreeMap::new();
        for e in &self.errors {
            *m.entry(e.clone()).or_insert(0) += 1;
        }
        m.into_iter().collect()
    }

    pub fn p99(&mut self) -> Duration {
        self.took.sort();
        self.took
            .get(self.took.len().saturating_mul(99) / 100)
            .copied()
            .unwrap_or_default()
    }
}

/// Closed-loop load far exceeds the default per-caller rate: these tests measure faults.
pub fn unlimited(env: &mut TestEnv) {
    env.extra.insert("BROKER_CALLER_RATE".into(), "0".into());
}

/// `workers` closed-loop callers over `apps` for `tenants`, for `run`.
pub async fn load(
    apps: &[TestApp],
    tenants: &[&str],
    key: &str,
    workers: usize,
    run: Duration,
) -> Seen {
    let until = std::time::Instant::now() + run;
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let app = &apps[w % apps.len()];
            let (client, base, key) = (app.client.clone(), app.address.clone(), key.to_owned());
            let tenants: Vec<String> = tenants.iter().map(|t| t.to_string()).collect();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut i = w;
                while std::time::Instant::now() < until {
                    let t = &tenants[i % tenants.len()];
                    i += 1;
                    let t0 = std::time::Instant::now();
                    let r = client
                        .get(format!("{base}/v1/tenants/{t}/token"))
                        .bearer_auth(&key)
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let body: Value = r.json().await.unwrap_or(Value::Null);
                    seen.took.push(t0.elapsed());
                    if status == 200 {
                        seen.ok += 1;
                    } else {
                        seen.errors
                            .push((status, body["code"].as_str().unwrap_or("").to_owned()));
                    }
                }
                seen
            })
        })
        .collect();
    let mut all = Seen::default();
    for t in tasks {
        let s = t.await.unwrap();
        all.ok += s.ok;
        all.errors.extend(s.errors);
        all.took.extend(s.took);
    }
    all
}

/// A Comm100-style partner (the documented answer: `access_token`, `expires_in`, `token_type`,
/// `refresh_token`, `scope`) whose latency, token lifetime and health the test controls.
pub struct Partner {
    pub server: MockServer,
    pub failing: Arc<std::sync::atomic::AtomicBool>,
    pub calls: Arc<std::sync::atomic::AtomicUsize>,
}

pub async fn comm100_partner(lifetime_s: i64, delay_ms: u64) -> Partner {
    let server = MockServer::start().await;
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (f, c) = (failing.clone(), calls.clone());
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(move |_: &wiremock::Request| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if f.load(std::sync::atomic::Ordering::SeqCst) {
                return wiremock::ResponseTemplate::new(500);
            }
            wiremock::ResponseTemplate::new(200)
                .set_body_json(json!({
                    "access_token": comm100_jwt(lifetime_s),
                    "expires_in": lifetime_s,
                    "token_type": "Bearer",
                    // As Comm100's documentation shows it.
                    "refresh_token": "F13741023427FFB7404FDE64EF485D858721D88A488763592B08CF303E721BE0",
                    "scope": "comm100 offline_access",
                }))
                .set_delay(Duration::from_millis(delay_ms))
        })
        .mount(&server)
        .await;
    Partner {
        server,
        failing,
        calls,
    }
}

impl TestEnv {
    /// Points the database URL at a TCP proxy the test can cut, standing in for a database
    /// that goes away.
    pub async fn database_through_cuttable_proxy(&mut self) -> CuttableProxy {
        let url = url::Url::parse(&self.database_url).unwrap();
        let proxy = CuttableProxy::start((
            url.host_str().unwrap().to_owned(),
            url.port().unwrap_or(5432),
        ))
        .await;
        let mut via = url.clone();
        via.set_port(Some(proxy.port)).unwrap();
        self.database_url = via.to_string();
        proxy
    }
}

/// The value of the first metric line starting with `prefix` (name and labels as exposed).
pub fn series(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
