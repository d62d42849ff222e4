//! Scale-out on real Redis topologies: a throwaway Redis Cluster (3 primaries, 3 replicas) and
//! a Sentinel set-up, with two broker replicas on one Postgres under concurrent callers.
//! Faults: a primary killed (failover), a node restarted empty, a slot migration under load,
//! a Sentinel failover. Each prints caller errors, partner mints and time to recover.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::backends;
use crate::helpers::*;

const TENANTS: usize = 10;

fn tenant(i: usize) -> String {
    format!("ct{i}")
}

/// Two replicas on `redis_url`, `TENANTS` tenants, one caller; each tenant fetched once.
async fn setup(
    mut env: TestEnv,
    redis_url: String,
) -> (Vec<TestApp>, String, Arc<AtomicUsize>, Partner) {
    env.redis_url = Some(redis_url);
    unlimited(&mut env);
    let apps = vec![env.spawn().await, env.spawn().await];
    let partner = comm100_partner(300, 0).await;
    let calls = partner.calls.clone();
    for i in 0..TENANTS {
        let a = apps[0]
            .create_tenant(&comm100_spec(&tenant(i), &partner.server, "pw"))
            .await;
        assert_eq!(a.status, 201, "{}", a.text);
    }
    let key = apps[0].create_caller("c", json!("*")).await;
    for i in 0..TENANTS {
        let tokens = fetch_many(&apps, &tenant(i), &key, 20).await;
        assert!(tokens.windows(2).all(|w| w[0] == w[1]));
    }
    assert_eq!(calls.load(Ordering::SeqCst), TENANTS, "one mint per tenant");
    (apps, key, calls, partner)
}

/// Until `within`, every `every`: invalidate each tenant (a real key operation on every slot
/// its id hashes to) on both replicas and fetch it; returns when all answer as they should.
async fn recovered(apps: &[TestApp], key: &str, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let mut all = true;
        for app in apps {
            for i in 0..TENANTS {
                let r = app
                    .send(
                        app.client
                            .post(format!(
                                "{}/v1/tenants/{}/token/invalidate",
                                app.address,
                                tenant(i)
                            ))
                            .bearer_auth(key)
                            .json(&json!({"access_token": "not-the-current-one"})),
                    )
                    .await;
                if r.status != 204 {
                    all = false;
                }
            }
            let ready = app.get("/readyz").await.json();
            if ready["status"] != "ready" {
                all = false;
            }
        }
        if all {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Closed-loop fetches of every tenant over both replicas for `run`; (ok, errors).
async fn fetch_loop(apps: &[TestApp], key: &str, run: Duration) -> (usize, Vec<(u16, String)>) {
    let names: Vec<String> = (0..TENANTS).map(tenant).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let seen = load(apps, &names, key, 8, run).await;
    (seen.ok, seen.errors)
}

async fn cluster_primary_failover(env: TestEnv) {
    let mut cluster = RedisCluster::start().await;
    let (apps, key, calls, _partner) = setup(env, cluster.url()).await;
    // Kill the primary holding the first tenant's slot.
    let slot = redis::cluster_routing::get_slot(tenant(0).as_bytes());
    let victim = cluster.primary_of(slot).await;
    cluster.nodes[victim].kill();
    let (ok, errors) = fetch_loop(&apps, &key, Duration::from_secs(2)).await;
    let healed = cluster.wait_ok(Duration::from_secs(30)).await;
    let back = recovered(&apps, &key, Duration::from_secs(20)).await;
    let mints = calls.load(Ordering::SeqCst) - TENANTS;
    eprintln!(
        "cluster primary failover: {ok} fetches ok and {} errors while it failed over; cluster ok after {healed:?}; broker fully recovered {back:?} after that; {mints} extra mint(s)",
        errors.len()
    );
    assert!(errors.is_empty(), "{errors:?}");
    let back = back.expect("the broker recovers by itself after a failover");
    assert!(back <= Duration::from_secs(5), "{back:?}");
    // Metrics say so too.
    for app in &apps {
        assert!(app
            .get("/metrics")
            .await
            .text
            .contains("broker_dependency_up{dependency=\"redis\"} 1"));
    }

    // The killed node comes back empty and rejoins (as a replica of its successor).
    cluster.nodes[victim].restart();
    cluster.wait_ok(Duration::from_secs(30)).await;
    let back = recovered(&apps, &key, Duration::from_secs(20)).await;
    eprintln!("cluster node restarted empty: broker fully recovered {back:?} after the cluster");
    assert!(back.expect("recovers") <= Duration::from_secs(5));
    let (ok, errors) = fetch_loop(&apps, &key, Duration::from_millis(500)).await;
    assert!(ok > 0 && errors.is_empty(), "{errors:?}");
    for app in &apps {
        app.stop().await;
    }
}
backends!(cluster_primary_failover: PostgresRedis);

async fn cluster_events_survive_the_loss_of_the_listening_node(env: TestEnv) {
    let mut cluster = RedisCluster::start().await;
    let (apps, key, _calls, _partner) = setup(env, cluster.url()).await;
    // The listener subscribes through the first node it can reach: the first in the URL.
    cluster.nodes[0].kill();
    cluster.wait_ok(Duration::from_secs(30)).await;
    recovered(&apps, &key, Duration::from_secs(20))
        .await
        .expect("recovers");
    // A change on one replica reaches the other through the events.
    let before = apps[1].get_token(&tenant(3), &key).await.json()["access_token"].clone();
    let put = apps[0]
        .send(
            apps[0]
                .admin(
                    Method::PUT,
                    &format!("/admin/v1/tenants/{}/credentials", tenant(3)),
                )
                .json(&json!({"client_id": "c", "email": "a@b.c", "password": "new"})),
        )
        .await;
    assert_eq!(put.status, 204);
    let t0 = Instant::now();
    let mut seen = false;
    while t0.elapsed() < Duration::from_secs(3) {
        let now = apps[1].get_token(&tenant(3), &key).await.json()["access_token"].clone();
        if now != before {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "events after losing the listening node: other replica saw the change after {:?}",
        t0.elapsed()
    );
    assert!(seen, "the other replica stops serving the old token");
    for app in &apps {
        app.stop().await;
    }
}
backends!(cluster_events_survive_the_loss_of_the_listening_node: PostgresRedis);

async fn cluster_slot_migration_under_load(env: TestEnv) {
    let cluster = RedisCluster::start().await;
    let (apps, key, calls, _partner) = setup(env, cluster.url()).await;
    // Move 2000 slots from one primary to another while callers fetch.
    let from = cluster.primary_of(0).await;
    let to = cluster.primary_of(16_383).await;
    let id = |port: u16| async move {
        redis_text(&redis_cmd(port, &["CLUSTER", "MYID"]).await.unwrap())
    };
    let (from_id, to_id) = (
        id(cluster.nodes[from].port).await,
        id(cluster.nodes[to].port).await,
    );
    let port = cluster.nodes[0].port;
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{port}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args([
                "--cluster-slots",
                "2000",
                "--cluster-yes",
                "--cluster-pipeline",
                "10",
            ])
            .output()
            .unwrap()
    });
    let (ok, errors) = fetch_loop(&apps, &key, Duration::from_secs(3)).await;
    let out = reshard.await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let back = recovered(&apps, &key, Duration::from_secs(20)).await;
    eprintln!(
        "slot migration (2000 slots) under load: {ok} fetches ok, {} errors, {} extra mint(s), invalidate/readyz clean {back:?} after",
        errors.len(),
        calls.load(Ordering::SeqCst) - TENANTS
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(back.expect("recovers") <= Duration::from_secs(5));
    for app in &apps {
        app.stop().await;
    }
}
backends!(cluster_slot_migration_under_load: PostgresRedis);

async fn sentinel_failover(env: TestEnv) {
    let mut s = RedisSentinels::start().await;
    let (apps, key, calls, _partner) = setup(env, s.url()).await;
    let old = s.primary.port;
    s.primary.kill();
    let t0 = Instant::now();
    let (ok, errors) = fetch_loop(&apps, &key, Duration::from_secs(2)).await;
    let mut promoted = None;
    while t0.elapsed() < Duration::from_secs(30) {
        if s.primary_port().await.is_some_and(|p| p != old) {
            promoted = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let promoted = promoted.expect("Sentinel promotes the replica");
    let back = recovered(&apps, &key, Duration::from_secs(20)).await;
    eprintln!(
        "Sentinel failover: {ok} fetches ok, {} errors while it failed over; promoted after {promoted:?}; broker followed {back:?} after that; {} extra mint(s)",
        errors.len(),
        calls.load(Ordering::SeqCst) - TENANTS
    );
    assert!(errors.is_empty(), "{errors:?}");
    assert!(back.expect("follows the new primary") <= Duration::from_secs(5));
    // Writes land on the new primary.
    let put = apps[0]
        .send(
            apps[0]
                .admin(
                    Method::PUT,
                    &format!("/admin/v1/tenants/{}/credentials", tenant(1)),
                )
                .json(&json!({"client_id": "c", "email": "a@b.c", "password": "new"})),
        )
        .await;
    assert_eq!(put.status, 204);
    assert_eq!(apps[1].get_token(&tenant(1), &key).await.status, 200);
    for app in &apps {
        app.stop().await;
    }
}
backends!(sentinel_failover: PostgresRedis);
