//! Faults of the broker's own infrastructure, with 2 replicas under concurrent callers: a dead
//! lock holder, Redis down or stalled, Postgres down, a partner that comes back, and
//! concurrent admin writes. Each prints what a caller saw (errors, p99, partner calls, time
//! to recover).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::backends;
use crate::helpers::*;

fn lock_key(env: &TestEnv, tenant: &str) -> String {
    format!("{}:{{{tenant}}}:lock", env.redis_prefix)
}

async fn redis_conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn a_dead_lock_holder_is_replaced_within_the_lock_life(env: TestEnv) {
    let apps = vec![env.spawn().await, env.spawn().await];
    let p = comm100_partner(30, 1_000).await;
    apps[0]
        .create_tenant(&comm100_spec("dead", &p.server, "pw"))
        .await;
    let key = apps[0].create_caller("c", json!("*")).await;
    // A replica killed mid-mint leaves its lock behind with at most the lock's life left.
    let mut conn = redis_conn(env.redis_url.as_ref().unwrap()).await;
    let _: () = redis::cmd("SET")
        .arg(lock_key(&env, "dead"))
        .arg("a-replica-that-died")
        .arg("PX")
        .arg(2_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let t0 = Instant::now();
    let tokens = fetch_many(&apps, "dead", &key, 40).await;
    let took = t0.elapsed();
    let calls = p.calls.load(Ordering::SeqCst);
    eprintln!("dead lock holder: 40 callers over 2 replicas served after {took:?}, {calls} partner call(s), 0 errors (before: 12.9 s without a token, 504s)");
    assert!(tokens.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(calls, 1);
    assert!(took < Duration::from_millis(4_000), "{took:?}");
    for app in &apps {
        app.stop().await;
    }
}
backends!(a_dead_lock_holder_is_replaced_within_the_lock_life: PostgresRedis);

async fn a_caller_held_by_a_live_holder_hears_lock_wait_timeout(mut env: TestEnv) {
    env.extra
        .insert("BROKER_UPSTREAM_TIMEOUT_MS".into(), "1000".into());
    let app = env.spawn().await;
    let p = comm100_partner(30, 0).await;
    app.create_tenant(&comm100_spec("busy", &p.server, "pw"))
        .await;
    let key = app.create_caller("c", json!("*")).await;
    // Another replica's mint that never ends: it keeps extending its lock.
    let url = env.redis_url.clone().unwrap();
    let lock = lock_key(&env, "busy");
    let holder = tokio::spawn(async move {
        let mut conn = redis_conn(&url).await;
        loop {
            let _: () = redis::cmd("SET")
                .arg(&lock)
                .arg("live-holder")
                .arg("PX")
                .arg(2_000)
                .query_async(&mut conn)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = Instant::now();
    let a = app.get_token("busy", &key).await;
    a.assert_problem(504, "lock_wait_timeout");
    eprintln!(
        "live lock holder: caller released after {:?} with lock_wait_timeout",
        t0.elapsed()
    );
    assert_eq!(p.calls.load(Ordering::SeqCst), 0);
    holder.abort();
    app.stop().await;
}
backends!(a_caller_held_by_a_live_holder_hears_lock_wait_timeout: PostgresRedis);

async fn redis_down_costs_callers_nothing(mut env: TestEnv) {
    unlimited(&mut env);
    let Some(mut redis) = OwnRedis::start() else {
        panic!("redis-server must be on PATH for this test (apt-get install redis-server)");
    };
    env.redis_url = Some(redis.url());
    let apps = vec![env.spawn().await, env.spawn().await];
    let p = comm100_partner(300, 50).await;
    let tenants = ["r1", "r2", "r3"];
    for t in tenants {
        apps[0]
            .create_tenant(&comm100_spec(t, &p.server, "pw"))
            .await;
    }
    let key = apps[0].create_caller("c", json!("*")).await;
    let before = load(&apps, &tenants, &key, 8, Duration::from_millis(500)).await;
    assert!(before.errors.is_empty(), "{:?}", before.errors);

    redis.stop();
    let t0 = Instant::now();
    let mut during = load(&apps, &tenants, &key, 8, Duration::from_secs(3)).await;
    let p99 = during.p99();
    eprintln!(
        "Redis down 3 s: {} ok, {} errors, p99 {p99:?}, {} partner call(s) in all (before: 572 of 1680 requests >= 250 ms, max 1.36 s)",
        during.ok,
        during.errors.len(),
        p.calls.load(Ordering::SeqCst)
    );
    assert!(during.errors.is_empty(), "{:?}", during.codes());
    // Debug build, 2 cores shared with the load: the bound is generous, the figure is printed.
    assert!(p99 < Duration::from_millis(25), "p99 {p99:?}");
    assert_eq!(
        p.calls.load(Ordering::SeqCst),
        3,
        "held tokens served, no re-mint"
    );
    let r = apps[0].get("/readyz").await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("degraded"))
    );
    assert!(apps[0]
        .get("/metrics")
        .await
        .text
        .contains("broker_dependency_up{dependency=\"redis\"} 0"));

    assert!(redis.restart());
    let mut recovered = None;
    for _ in 0..100 {
        let mut ready = true;
        for a in &apps {
            ready &= a.get("/readyz").await.json()["status"] == "ready";
        }
        if ready {
            recovered = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("Redis back: ready again {recovered:?} after the stop (3 s of it down)");
    assert!(recovered.is_some(), "the broker recovers by itself");
    let after = load(&apps, &tenants, &key, 8, Duration::from_millis(500)).await;
    assert!(after.errors.is_empty(), "{:?}", after.errors);
    for app in &apps {
        app.stop().await;
    }
}
backends!(redis_down_costs_callers_nothing: PostgresRedis);

async fn an_admin_write_while_redis_stalls_is_committed_and_audited(mut env: TestEnv) {
    let Some(redis) = OwnRedis::start() else {
        panic!("redis-server must be on PATH for this test (apt-get install redis-server)");
    };
    env.redis_url = Some(redis.url());
    let app = env.spawn().await;
    let p = comm100_partner(300, 0).await;
    app.create_tenant(&comm100_spec("stall", &p.server, "pw"))
        .await;
    let key = app.create_caller("c", json!("*")).await;
    let old = app.get_token("stall", &key).await.json()["access_token"].clone();

    let mut conn = redis_conn(&redis.url()).await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3000)
        .arg("ALL")
        .query_async(&mut conn)
        .await
        .unwrap();
    let t0 = Instant::now();
    let put = app
        .send(
            app.admin(Method::PUT, "/admin/v1/tenants/stall/credentials")
                .json(&json!({"client_id": "client1", "email": "a@b.c", "password": "new-pw"})),
        )
        .await;
    eprintln!(
        "PUT credentials with Redis paused: {} after {:?}",
        put.status,
        t0.elapsed()
    );
    assert_eq!(put.status, 204, "{}", put.text);
    assert_eq!(put.headers["etag"], "\"v2\"");
    let view = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/stall"))
        .await
        .json();
    assert_eq!(view["version"], 2);
    let audit = app.audit("tenant=stall").await;
    assert!(
        audit
            .iter()
            .any(|e| e["action"] == "tenant.credentials" && e["outcome"] == "ok"),
        "{audit:?}"
    );
    // Once Redis answers, the old token is dropped there too: the next fetch mints.
    let mut fresh = false;
    for _ in 0..80 {
        let t = app.get_token("stall", &key).await.json()["access_token"].clone();
        if t != old {
            fresh = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        fresh,
        "the token minted with the old credentials is not served again"
    );
    app.stop().await;
}
backends!(an_admin_write_while_redis_stalls_is_committed_and_audited: PostgresRedis);

async fn postgres_down_known_callers_and_mints_go_on(mut env: TestEnv) {
    unlimited(&mut env);
    let proxy = env.database_through_cuttable_proxy().await;
    let apps = vec![env.spawn().await, env.spawn().await];
    // 4 s tokens: the outage outlives several, so minting must go on without the database.
    let p = comm100_partner(4, 20).await;
    apps[0]
        .create_tenant(&comm100_spec("pg1", &p.server, "pw"))
        .await;
    let key = apps[0].create_caller("c", json!("*")).await;
    let before = load(&apps, &["pg1"], &key, 4, Duration::from_millis(500)).await;
    assert!(before.errors.is_empty(), "{:?}", before.errors);
    let calls_before = p.calls.load(Ordering::SeqCst);

    proxy.cut();
    let t0 = Instant::now();
    // An admin write answers fast and changes nothing.
    let w = apps[1]
        .create_tenant(&comm100_spec("during", &p.server, "pw"))
        .await;
    let write_took = t0.elapsed();
    w.assert_problem(503, "database_unavailable");
    // Past the caller cache's 10 s freshness and several token lifetimes.
    let mut during = load(&apps, &["pg1"], &key, 4, Duration::from_secs(12)).await;
    let p99 = during.p99();
    let minted = p.calls.load(Ordering::SeqCst) - calls_before;
    eprintln!(
        "Postgres down 12 s: {} ok, {} errors, p99 {p99:?}, {minted} mint(s) with held credentials, admin write refused in {write_took:?} (before: 3.0 s per fetch, 503 database_unavailable after 6 s)",
        during.ok,
        during.errors.len()
    );
    assert!(during.errors.is_empty(), "{:?}", during.codes());
    assert!(p99 < Duration::from_millis(300), "p99 {p99:?}");
    assert!(minted >= 2, "tokens kept being minted: {minted}");
    assert!(write_took < Duration::from_millis(1_500), "{write_took:?}");
    let r = apps[0].get("/readyz").await;
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("degraded"))
    );

    proxy.restore();
    let mut back = false;
    for _ in 0..60 {
        if apps[0].get("/readyz").await.json()["status"] == "ready" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "ready again once the database is back");
    assert_eq!(
        apps[0]
            .send(apps[0].admin(Method::GET, "/admin/v1/tenants/during"))
            .await
            .status,
        404,
        "the refused write changed nothing"
    );
    // The fetches during the outage were coalesced and written once it was back.
    let mut written = 0;
    for _ in 0..50 {
        let a = apps[0]
            .send(apps[0].admin(Method::GET, "/admin/v1/audit?tenant=pg1&limit=1000"))
            .await
            .json();
        written = a["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "token.fetch")
            .map(|e| e["count"].as_i64().unwrap())
            .sum::<i64>();
        if written as usize >= before.ok + during.ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "audit: {written} fetches recorded of {} served",
        before.ok + during.ok
    );
    assert!(written as usize >= before.ok + during.ok);
    for app in &apps {
        app.stop().await;
    }
}
backends!(postgres_down_known_callers_and_mints_go_on: PostgresRedis);

async fn a_partner_that_comes_back_is_used_within_two_seconds(mut env: TestEnv) {
    unlimited(&mut env);
    let apps = vec![env.spawn().await, env.spawn().await];
    let p = comm100_partner(3, 0).await;
    apps[0]
        .create_tenant(&comm100_spec("flap", &p.server, "pw"))
        .await;
    let key = apps[0].create_caller("c", json!("*")).await;
    assert_eq!(apps[0].get_token("flap", &key).await.status, 200);

    p.failing.store(true, Ordering::SeqCst);
    let calls_at_failure = p.calls.load(Ordering::SeqCst);
    let failing_for = Duration::from_secs(8);
    let during = load(&apps, &["flap"], &key, 4, failing_for).await;
    let attempts = p.calls.load(Ordering::SeqCst) - calls_at_failure;
    eprintln!(
        "partner failing 8 s: {} ok, errors {:?}, {attempts} partner attempt(s) across 2 replicas",
        during.ok,
        during.codes()
    );
    // One full mint (3 attempts), then at most one probe a second across replicas.
    assert!(attempts <= 3 + 9 + 1, "{attempts} attempts");

    p.failing.store(false, Ordering::SeqCst);
    let back_at = Instant::now();
    let mut recovered = None;
    while back_at.elapsed() < Duration::from_secs(5) {
        if apps[1].get_token("flap", &key).await.status == 200 {
            recovered = Some(back_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("partner back: first token after {recovered:?} (before: 11.4-12.6 s)");
    let recovered = recovered.expect("recovered");
    assert!(recovered <= Duration::from_millis(2_000), "{recovered:?}");
    for app in &apps {
        app.stop().await;
    }
}
backends!(a_partner_that_comes_back_is_used_within_two_seconds: PostgresRedis);

async fn concurrent_credential_writes_all_land(env: TestEnv) {
    let apps = vec![env.spawn().await, env.spawn().await];
    let p = comm100_partner(300, 0).await;
    apps[0]
        .create_tenant(&comm100_spec("race", &p.server, "pw"))
        .await;
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let app = &apps[i % 2];
            let req = app
                .admin(Method::PUT, "/admin/v1/tenants/race/credentials")
                .json(&json!({"client_id": "c", "email": "a@b.c", "password": format!("pw{i}")}));
            tokio::spawn(async move { req.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let conflicts = statuses.iter().filter(|s| **s == 409).count();
    eprintln!("60 concurrent PUT credentials: {conflicts} conflict(s) (before: 81 of 200)");
    assert!(statuses.iter().all(|s| *s == 204), "{statuses:?}");
    let view = apps[0]
        .send(apps[0].admin(Method::GET, "/admin/v1/tenants/race"))
        .await
        .json();
    assert_eq!(view["version"], 61);
    // With If-Match naming an old version: 412, nothing changed.
    let stale = apps[0]
        .send(
            apps[0]
                .admin(Method::PUT, "/admin/v1/tenants/race/credentials")
                .header("if-match", "\"v1\"")
                .json(&json!({"client_id": "c", "email": "a@b.c", "password": "x"})),
        )
        .await;
    stale.assert_problem(412, "precondition_failed");
    for app in &apps {
        app.stop().await;
    }
}
backends!(concurrent_credential_writes_all_land: PostgresRedis, Sqlite);

async fn outage_reports_never_carry_secrets(mut env: TestEnv) {
    const REDIS_PW: &str = "PLANTED-REDIS-PASSWORD-7f3a";
    const PARTNER_PW: &str = "PLANTED-PARTNER-PASSWORD-91c4";
    let mut redis = RedisNode::spawn(&["--requirepass", REDIS_PW]);
    env.redis_url = Some(format!("redis://:{REDIS_PW}@127.0.0.1:{}", redis.port));
    let app = env.spawn().await;
    let p = comm100_partner(300, 0).await;
    app.create_tenant(&comm100_spec("quiet", &p.server, PARTNER_PW))
        .await;
    app.create_tenant(&comm100_spec("cold", &p.server, PARTNER_PW))
        .await;
    let key = app.create_caller("c", json!("*")).await;
    assert_eq!(app.get_token("quiet", &key).await.status, 200);

    // Redis goes away: every answer that now reports a failure is collected.
    redis.kill();
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(app.get_token("quiet", &key).await.text);
    }
    seen.push(app.get_token("cold", &key).await.text);
    seen.push(app.get("/readyz").await.text);
    seen.push(app.get("/metrics").await.text);
    seen.push(
        app.send(
            app.client
                .post(format!("{}/v1/tenants/quiet/token/invalidate", app.address))
                .bearer_auth(&key)
                .json(&json!({"access_token": "x"})),
        )
        .await
        .text,
    );
    for path in [
        "/admin/v1/tenants/quiet",
        "/admin/v1/tenants",
        "/admin/v1/audit",
    ] {
        seen.push(app.send(app.admin(Method::GET, path)).await.text);
    }
    // A partner that rejects: its error body must not echo the credentials either.
    p.failing.store(true, std::sync::atomic::Ordering::SeqCst);
    seen.push(
        app.send(app.admin(Method::POST, "/admin/v1/tenants/quiet/test"))
            .await
            .text,
    );
    redis.restart();
    tokio::time::sleep(Duration::from_millis(600)).await;
    seen.push(app.get("/readyz").await.text);
    seen.push(captured_logs());
    let all = seen.join("\n");
    assert!(all.contains("unavailable"), "the outage was reported");
    for secret in [REDIS_PW, PARTNER_PW] {
        assert!(!all.contains(secret), "{secret} leaked");
    }
    app.stop().await;
}
backends!(outage_reports_never_carry_secrets: PostgresRedis);

/// The `broker_dependency_up{dependency="redis"}` value, if the series exists.
async fn redis_up(app: &TestApp) -> Option<bool> {
    app.get("/metrics")
        .await
        .text
        .lines()
        .find(|l| l.starts_with("broker_dependency_up{dependency=\"redis\"}"))
        .map(|l| l.ends_with(" 1"))
}

async fn an_idle_replica_notices_an_outage_by_itself(mut env: TestEnv) {
    let Some(mut redis) = OwnRedis::start() else {
        panic!("redis-server must be on PATH for this test (apt-get install redis-server)");
    };
    env.redis_url = Some(redis.url());
    let app = env.spawn().await;
    assert_eq!(redis_up(&app).await, Some(true));
    // No request touches Redis from here on; the gauge must follow the outage anyway.
    redis.stop();
    let t0 = Instant::now();
    while redis_up(&app).await != Some(false) {
        assert!(
            t0.elapsed() < Duration::from_secs(8),
            "outage never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let noticed = t0.elapsed();
    assert!(redis.restart());
    let t1 = Instant::now();
    while redis_up(&app).await != Some(true) {
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "recovery never noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "idle replica: outage noticed after {noticed:?}, recovery after {:?}",
        t1.elapsed()
    );
    app.stop().await;
}
backends!(an_idle_replica_notices_an_outage_by_itself: PostgresRedis);

/// Another session holds `LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE` (as a migration or a
/// careless ALTER does): a fetch that needs a mint goes on with the credentials held in memory
/// within about half a second; an admin write answers 503 `database_unavailable` within 3 s
/// and changes nothing; both work again once the lock is gone. (Before: mints stalled ~11.5 s
/// and ended in 504 `lock_wait_timeout`; the PATCH hung 13 s.)
async fn a_locked_tenants_table_costs_callers_half_a_second(env: TestEnv) {
    use sqlx::Connection;
    let app = env.spawn().await;
    let partner = setu_partner(2, 0).await;
    let mut spec = setu_spec("acme", &partner, "s");
    spec["issuer"]["min_interval_ms"] = json!(0);
    app.create_tenant(&spec).await;
    let key = app.create_caller("billing", json!(["acme"])).await;
    assert_eq!(app.get_token("acme", &key).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2_200)).await; // the 2 s token is gone

    // Postgres: a session locks the table. SQLite: another connection (as another process's
    // would) holds the database's write lock with `BEGIN EXCLUSIVE`.
    sqlx::any::install_default_drivers();
    let mut locker = sqlx::AnyConnection::connect(&env.database_url)
        .await
        .unwrap();
    let lock = match env.backend {
        Backend::Sqlite => "BEGIN EXCLUSIVE",
        _ => "BEGIN; LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE",
    };
    sqlx::raw_sql(lock).execute(&mut locker).await.unwrap();

    let started = Instant::now();
    let fetched = app.get_token("acme", &key).await;
    let took = started.elapsed();
    eprintln!(
        "{:?} locked: fetch needing a mint {} in {took:?} (before: 504 after ~12 s on Postgres, 3.3-4.8 s on SQLite)",
        env.backend, fetched.status
    );
    assert_eq!(fetched.status, 200, "{}", fetched.text);
    assert!(took < Duration::from_millis(1_500), "{took:?}");

    let started = Instant::now();
    let patched = app
        .send(
            app.admin(Method::PATCH, "/admin/v1/tenants/acme")
                .header("content-type", "application/merge-patch+json")
                .body(r#"{"display_name": "changed under lock"}"#),
        )
        .await;
    let took = started.elapsed();
    eprintln!(
        "{:?} locked: admin PATCH {} in {took:?} (before: hung 13 s on Postgres)",
        env.backend, patched.status
    );
    patched.assert_problem(503, "database_unavailable");
    assert!(took < Duration::from_secs(3), "{took:?}");

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut locker)
        .await
        .unwrap();
    let shown = app
        .send(app.admin(Method::GET, "/admin/v1/tenants/acme"))
        .await
        .json();
    assert_eq!(
        shown["display_name"], "acme (Setu)",
        "the refused write changed nothing"
    );
    let again = app
        .send(
            app.admin(Method::PATCH, "/admin/v1/tenants/acme")
                .header("content-type", "application/merge-patch+json")
                .body(r#"{"display_name": "changed after"}"#),
        )
        .await;
    assert_eq!(again.status, 200, "{}", again.text);
    app.stop().await;
}
backends!(a_locked_tenants_table_costs_callers_half_a_second: Postgres, Sqlite);

/// A small filesystem of its own (tmpfs, mounted by the test: needs root), unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "this test mounts a small tmpfs to fill a disk: run it as root (or in CI, which does)"
        );
        Self { dir }
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Fills what is left with a junk file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let junk = self.dir.path().join("junk");
        let mut f = std::fs::File::create(&junk).unwrap();
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&block[..512]).is_ok() {}
        let _ = f.sync_all();
        junk
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// SQLite's disk fills and is then freed: while full, admin writes answer 503 and change
/// nothing, cached tokens are still served, `/readyz` says the database refuses writes; once
/// space returns, writes (and the audit rows held meanwhile) go through again within seconds,
/// without a restart, and a change made then is audited in its own transaction. (Before: every
/// transactional write kept failing until a restart, audit rows stopped, a caller created
/// after the free got 201 with no audit row, `/readyz` said "database ok".)
async fn a_full_disk_then_freed_recovers_without_a_restart(mut env: TestEnv) {
    let disk = SmallDisk::mount("6m");
    env.database_url = format!("sqlite://{}/broker.db?mode=rwc", disk.path().display());
    let app = env.spawn().await;
    let partner = setu_partner(300, 0).await;
    app.create_tenant(&setu_spec("acme", &partner, "s")).await;
    let key = app.create_caller("billing", json!(["acme"])).await;
    assert_eq!(app.get_token("acme", &key).await.status, 200);
    let rows = |entries: &[serde_json::Value], action: &str| -> i64 {
        entries
            .iter()
            .filter(|e| e["action"] == action)
            .map(|e| e["count"].as_i64().unwrap_or(1))
            .sum()
    };

    let junk = disk.fill();
    let refused = app
        .send(
            app.admin(Method::POST, "/admin/v1/callers")
                .json(&json!({"name": "during", "tenants": ["acme"]})),
        )
        .await;
    refused.assert_problem(503, "database_unavailable");
    let mut served = 0;
    let mut readiness = String::new();
    for _ in 0..40 {
        assert_eq!(app.get_token("acme", &key).await.status, 200);
        served += 1;
        readiness = app.get("/readyz").await.text;
        if readiness.contains("writes fail") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("disk full: {served} tokens served, readyz {readiness}");
    assert!(readiness.contains("degraded: writes fail"), "{readiness}");

    std::fs::remove_file(&junk).unwrap();
    let freed = Instant::now();
    let mut created = None;
    while freed.elapsed() < Duration::from_secs(10) {
        let a = app
            .send(
                app.admin(Method::POST, "/admin/v1/callers")
                    .json(&json!({"name": "after", "tenants": ["acme"]})),
            )
            .await;
        if a.status == 201 {
            created = Some(freed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("disk freed: first admin write after {created:?}");
    assert!(created.is_some(), "writes never came back");
    let callers = app
        .send(app.admin(Method::GET, "/admin/v1/callers"))
        .await
        .json();
    let names: Vec<_> = callers["callers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["after", "billing"],
        "the refused write changed nothing"
    );
    let mut entries = Vec::new();
    for _ in 0..50 {
        entries = app.audit("limit=500").await;
        if rows(&entries, "token.fetch") > served
            && app.get("/readyz").await.text.contains("\"ready\"")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        entries.iter().any(|e| e["action"] == "caller.create"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("caller after")),
        "the write after the free is audited: {entries:?}"
    );
    assert!(
        !entries.iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or("")
            .starts_with("caller during")),
        "the refused write left no row"
    );
    assert_eq!(
        rows(&entries, "token.fetch"),
        served + 1,
        "every token handed out is on the record"
    );
    let ready = app.get("/readyz").await.text;
    assert!(ready.contains("\"ready\""), "{ready}");
    app.stop().await;
}
backends!(a_full_disk_then_freed_recovers_without_a_restart: Sqlite);

/// Redis answers reads but refuses every write (`maxmemory` reached with `noeviction`): held
/// tokens are served at memory speed with no error, a cold tenant is minted at once without
/// the lock (counted as degraded) instead of retrying `SET NX` until the lock wait ends, an
/// invalidation still drops the token here, `/readyz` says Redis refuses writes, and the
/// breaker never opens (reads go on). (Before: throughput 200 → 32 req/s, p99 1.7 s, max
/// 11.1 s, the breaker flapping, invalidate 503 `cache_unavailable`.)
async fn a_redis_that_refuses_writes_is_not_an_outage(mut env: TestEnv) {
    unlimited(&mut env);
    let Some(redis) = OwnRedis::start() else {
        panic!("redis-server must be on PATH for this test (apt-get install redis-server)");
    };
    env.redis_url = Some(redis.url());
    let apps = vec![env.spawn().await, env.spawn().await];
    let p = comm100_partner(300, 20).await;
    for t in ["warm", "cold"] {
        apps[0]
            .create_tenant(&comm100_spec(t, &p.server, "pw"))
            .await;
    }
    let key = apps[0].create_caller("c", json!("*")).await;
    let warm = apps[0].get_token("warm", &key).await;
    assert_eq!(warm.status, 200);
    let calls_before = p.calls.load(Ordering::SeqCst);

    for args in [
        &["CONFIG", "SET", "maxmemory-policy", "noeviction"][..],
        &["CONFIG", "SET", "maxmemory", "1"][..],
    ] {
        redis_cmd(redis.port, args).await.unwrap();
    }
    let refused = redis_cmd(redis.port, &["SET", "probe", "x"]).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.code() == Some("OOM")),
        "{refused:?}"
    );

    let mut during = load(&apps, &["warm"], &key, 8, Duration::from_secs(2)).await;
    let p99 = during.p99();
    eprintln!(
        "Redis refusing writes 2 s: {} ok, errors {:?}, p99 {p99:?} (before: p99 1.7 s, max 11.1 s)",
        during.ok,
        during.codes()
    );
    assert!(during.errors.is_empty(), "{:?}", during.codes());
    assert!(p99 < Duration::from_millis(50), "p99 {p99:?}");

    let started = Instant::now();
    let cold = apps[1].get_token("cold", &key).await;
    let took = started.elapsed();
    eprintln!(
        "a cold tenant while Redis refuses writes: {} in {took:?}",
        cold.status
    );
    assert_eq!(cold.status, 200, "{}", cold.text);
    assert!(took < Duration::from_millis(1_000), "{took:?}");
    let metrics = apps[1].get("/metrics").await.text;
    assert!(series(&metrics, "broker_lock_degraded_total").unwrap_or(0.0) >= 1.0);
    assert!(
        metrics.contains("broker_dependency_up{dependency=\"redis\"} 1"),
        "reads work: the breaker stays closed"
    );

    let held = apps[1].get_token("cold", &key).await.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let inv = apps[1]
        .send(
            apps[1]
                .client
                .post(format!(
                    "{}/v1/tenants/cold/token/invalidate",
                    apps[1].address
                ))
                .bearer_auth(&key)
                .json(&json!({"access_token": held})),
        )
        .await;
    assert!(
        inv.status == 204 || inv.status == 429,
        "an invalidation answers what happened, not cache_unavailable: {} {}",
        inv.status,
        inv.text
    );

    let ready = apps[0].get("/readyz").await.json();
    eprintln!("readyz while Redis refuses writes: {ready}");
    assert_eq!(ready["status"], "degraded");
    assert!(
        ready["checks"]["redis"]
            .as_str()
            .unwrap()
            .starts_with("refuses writes (oom"),
        "{ready}"
    );
    assert!(
        p.calls.load(Ordering::SeqCst) - calls_before <= 2,
        "the warm tenant was not re-minted"
    );

    redis_cmd(redis.port, &["CONFIG", "SET", "maxmemory", "0"])
        .await
        .unwrap();
    let mut ready_again = false;
    for _ in 0..50 {
        if apps[0].get("/readyz").await.json()["status"] == "ready" {
            ready_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready_again, "ready once Redis takes writes again");
    for app in &apps {
        app.stop().await;
    }
}
backends!(a_redis_that_refuses_writes_is_not_an_outage: PostgresRedis);
