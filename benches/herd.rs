//! The cold herd for bench/run.sh: HERD_N concurrent callers (default 1000), released at once,
//! each on its own connection, spread over the replicas in HERD_BASES, all asking for
//! HERD_TENANT with HERD_KEY. Prints one JSON line: ok count, distinct tokens, latencies.
//!   HERD_BASES=http://127.0.0.1:8080,... HERD_KEY=tbk_... HERD_TENANT=herd0 cargo bench --bench herd

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let bases: Vec<String> = std::env::var("HERD_BASES")
        .expect("HERD_BASES")
        .split(',')
        .map(str::to_owned)
        .collect();
    let key = std::env::var("HERD_KEY").expect("HERD_KEY");
    let tenant = std::env::var("HERD_TENANT").expect("HERD_TENANT");
    let n: usize = std::env::var("HERD_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let go = Arc::new(tokio::sync::Notify::new());
        let ready = Arc::new(tokio::sync::Barrier::new(n + 1));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let url = format!("{}/v1/tenants/{tenant}/token", bases[i % bases.len()]);
            let (key, go, ready) = (key.clone(), go.clone(), ready.clone());
            tasks.push(tokio::spawn(async move {
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(0)
                    .timeout(Duration::from_secs(30))
                    .build()
                    .unwrap();
                let notified = go.notified();
                ready.wait().await;
                notified.await;
                let t0 = Instant::now();
                let r = client.get(url).bearer_auth(key).send().await;
                let body = match r {
                    Ok(r) if r.status() == 200 => r.json::<serde_json::Value>().await.ok(),
                    _ => None,
                };
                (t0.elapsed(), body.and_then(|b| b["access_token"].as_str().map(str::to_owned)))
            }));
        }
        ready.wait().await;
        go.notify_waiters();
        let mut lat = Vec::new();
        let mut tokens = HashSet::new();
        for t in tasks {
            let (took, token) = t.await.unwrap();
            if let Some(token) = token {
                lat.push(took);
                tokens.insert(token);
            }
        }
        lat.sort();
        let p = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1))).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
        println!(
            "{{\"callers\": {n}, \"ok\": {}, \"distinct_tokens\": {}, \"p50_ms\": {:.1}, \"p99_ms\": {:.1}, \"max_ms\": {:.1}}}",
            lat.len(),
            tokens.len(),
            p(0.5),
            p(0.99),
            lat.last().map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
        );
    });
}
