//! Test harness: the real app on a random port against SQLite, Postgres or Postgres + Redis,
//! fake partners (wiremock) that speak the documented formats, and captured logs.

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use token_broker::api::AppState;
use token_broker::app::Application;
use token_broker::config::Settings;
use wiremock::MockServer;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: SQLite and the in-process cache.
    Sqlite,
    /// Postgres and the in-process cache.
    Postgres,
    /// Postgres and Redis: the scaled-out shape.
    PostgresRedis,
}

// ---------- captured logs ----------

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        if std::env::var_os("TEST_LOG").is_some() {
            std::io::stderr().write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a subscriber at trace level for the broker (debug elsewhere) that records into memory.
pub fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        let filter = tracing_subscriber::EnvFilter::new(
            "debug,token_broker=trace,wiremock=off,hyper=info,h2=info,tokio=info,runtime=info,mio=info",
        );
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

/// Everything logged so far by this test binary.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.get().expect("init_logs").lock().unwrap()).into_owned()
}

// ---------- backing services ----------

/// A service a test needs is missing: the test fails, saying how to provide it. (Built with
/// `BROKER_TEST_SKIP_SERVICES=1`, such tests are ignored instead and never get here.)
pub fn skip(what: &str) {
    panic!(
        "{what} is not available. Tried: the URL in DATABASE_URL / REDIS_URL if set, else {STANDARD_POSTGRES} (a user that may create databases) / {STANDARD_REDIS}, else a throwaway server (PostgreSQL's initdb as a non-root user; redis-server on PATH). Start it and point the tests at it (e.g. DATABASE_URL=postgres://user@host:5432/postgres, REDIS_URL=redis://host:6379), or run with BROKER_TEST_SKIP_SERVICES=1 to report such tests as ignored"
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Throwaway {
    _child: Child,
    _dir: tempfile::TempDir,
    url: String,
}

static REDIS: OnceLock<Option<OwnRedis>> = OnceLock::new();

/// Where the suite looks when `REDIS_URL` / `DATABASE_URL` are unset: the services' standard
/// local ports, as a developer machine or CI runner has them.
const STANDARD_REDIS: &str = "redis://127.0.0.1:6379";
const STANDARD_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Says once, on the real stderr (libtest captures only the print macros), which service a
/// run uses when it was not told.
fn announce(what: &str, url: &str, how: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "tests: {what} at {url} ({how}; set {} to choose)",
        if what == "Redis" {
            "REDIS_URL"
        } else {
            "DATABASE_URL"
        }
    );
}

/// Does a Redis answer PING at this port?
fn redis_answers(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

static REDIS_URL: OnceLock<Option<String>> = OnceLock::new();

/// A Redis URL: `REDIS_URL`, else the one on the standard local port, else a throwaway
/// `redis-server` from PATH.
pub fn redis_url() -> Option<String> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Some(url);
    }
    REDIS_URL
        .get_or_init(|| {
            if redis_answers(6379) {
                announce(
                    "Redis",
                    STANDARD_REDIS,
                    "REDIS_URL unset, the standard local port",
                );
                return Some(STANDARD_REDIS.to_string());
            }
            let url = REDIS.get_or_init(OwnRedis::start).as_ref()?.url();
            announce("Redis", &url, "REDIS_URL unset, a throwaway redis-server");
            Some(url)
        })
        .clone()
}

static POSTGRES: OnceLock<Option<Throwaway>> = OnceLock::new();

fn find_pg_bin(name: &str) -> Option<std::path::PathBuf> {
    if let Ok(out) = Command::new("which").arg(name).output() {
        if out.status.success() {
            return Some(String::from_utf8_lossy(&out.stdout).trim().into());
        }
    }
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .collect();
    dirs.sort_by_key(|d| d.file_name());
    dirs.iter()
        .rev()
        .map(|d| d.path().join("bin").join(name))
        .find(|p| p.exists())
}

/// Can this URL's user create databases? (A connection of its own, on a thread of its own: the
/// caller may be inside a runtime.)
fn postgres_can_create_databases(url: &str) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        use sqlx::Connection;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let mut conn =
                tokio::time::timeout(Duration::from_secs(3), sqlx::PgConnection::connect(&url))
                    .await
                    .ok()?
                    .ok()?;
            sqlx::query_scalar::<_, bool>(
                "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user",
            )
            .fetch_one(&mut conn)
            .await
            .ok()
        })
    })
    .join()
    .ok()
    .flatten()
    .unwrap_or(false)
}

static POSTGRES_URL: OnceLock<Option<String>> = OnceLock::new();

/// An admin Postgres URL: `DATABASE_URL` (if postgres), else the one on the standard local port
/// (user `postgres`, trust auth), else a throwaway cluster from PATH (initdb refuses to run as
/// root, so as root this needs one of the first two).
pub fn postgres_admin_url() -> Option<String> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        if url.starts_with("postgres") {
            return Some(url);
        }
    }
    POSTGRES_URL
        .get_or_init(|| {
            if postgres_can_create_databases(STANDARD_POSTGRES) {
                announce(
                    "Postgres",
                    STANDARD_POSTGRES,
                    "DATABASE_URL unset, the standard local port",
                );
                return Some(STANDARD_POSTGRES.to_string());
            }
            let url = throwaway_postgres()?;
            announce("Postgres", &url, "DATABASE_URL unset, a throwaway cluster");
            Some(url)
        })
        .clone()
}

/// A throwaway Postgres cluster from PATH (or /usr/lib/postgresql), for the life of the run.
fn throwaway_postgres() -> Option<String> {
    POSTGRES
        .get_or_init(|| {
            let initdb = find_pg_bin("initdb")?;
            let pg_ctl = find_pg_bin("pg_ctl")?;
            let dir = tempfile::tempdir().ok()?;
            let data = dir.path().join("data");
            let ok = Command::new(&initdb)
                .args(["-U", "postgres", "--auth=trust", "-D"])
                .arg(&data)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .ok()?
                .success();
            if !ok {
                return None;
            }
            let port = free_port();
            let child = Command::new(&pg_ctl)
                .arg("-D")
                .arg(&data)
                .args(["-w", "-o"])
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1",
                    dir.path().display()
                ))
                .arg("start")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(Throwaway {
                        _child: child,
                        _dir: dir,
                        url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
                    });
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        })
        .as_ref()
        .map(|t| t.url.clone())
}

fn random_suffix() -> String {
    let mut raw = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
    hex::encode(raw)
}

/// A fresh, empty Postgres database for one test.
async fn fresh_postgres_db() -> Option<String> {
    use sqlx::Connection;
    let admin = postgres_admin_url()?;
    let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
    let name = format!("tb_test_{}", random_suffix());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .ok()?;
    let mut url = url::Url::parse(&admin).ok()?;
    url.set_path(&format!("/{name}"));
    Some(url.to_string())
}

// ---------- the environment of one test ----------

/// One test's database, cache namespace and key: several app instances may share it.
pub struct TestEnv {
    pub backend: Backend,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub dir: tempfile::TempDir,
    pub extra: HashMap<String, String>,
}

impl TestEnv {
    /// `None` (after a loud notice) when the backend's services are not available.
    pub async fn new(backend: Backend) -> Option<Self> {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let database_url = match backend {
            Backend::Sqlite => format!("sqlite://{}/broker.db?mode=rwc", dir.path().display()),
            Backend::Postgres | Backend::PostgresRedis => match fresh_postgres_db().await {
                Some(url) => url,
                None => {
                    skip("Postgres");
                    return None;
                }
            },
        };
        let redis_url = if backend == Backend::PostgresRedis {
            match redis_url() {
                Some(url) => Some(url),
                None => {
                    skip("Redis");
                    return None;
                }
            }
        } else {
            None
        };
        Some(Self {
            backend,
            database_url,
            redis_url,
            redis_prefix: format!("tbtest-{}", random_suffix()),
            dir,
            extra: HashMap::new(),
        })
    }

    pub fn settings(&self) -> Settings {
        let mut vars: HashMap<String, String> = HashMap::from([
            ("BROKER_LISTEN".into(), "127.0.0.1:0".into()),
            ("DATABASE_URL".into(), self.database_url.clone()),
            ("BROKER_ADMIN_TOKEN".into(), ADMIN_TOKEN.into()),
            ("BROKER_ALLOW_INSECURE_ISSUERS".into(), "true".into()),
            ("BROKER_REDIS_PREFIX".into(), self.redis_prefix.clone()),
            ("BROKER_WORKERS".into(), "2".into()),
        ]);
        if self.backend != Backend::Sqlite {
            vars.insert(
                "BROKER_ENCRYPTION_KEY".into(),
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into(),
            );
        }
        if let Some(r) = &self.redis_url {
            vars.insert("REDIS_URL".into(), r.clone());
        }
        vars.extend(self.extra.clone());
        Settings::from_lookup(|k| vars.get(k).cloned()).expect("test settings are valid")
    }

    /// Starts one app instance on a random port.
    pub async fn spawn(&self) -> TestApp {
        let app = Application::build(self.settings())
            .await
            .expect("app builds");
        let port = app.port();
        let handle = app.handle();
        let state = app.state();
        tokio::spawn(app.run_until_stopped());
        TestApp {
            address: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .unwrap(),
            handle,
            state,
        }
    }
}

/// A running app instance and a client with one helper per endpoint.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub handle: actix_web::dev::ServerHandle,
    pub state: actix_web::web::Data<AppState>,
}

pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.text))
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// Asserts a problem+json answer with this status and code.
    pub fn assert_problem(&self, status: u16, code: &str) -> Value {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(
            self.content_type(),
            "application/problem+json",
            "{}",
            self.text
        );
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        assert_eq!(body["status"], status);
        for k in ["type", "title", "detail"] {
            assert!(body[k].is_string(), "problem lacks {k}: {body}");
        }
        body
    }
}

impl TestApp {
    pub async fn stop(&self) {
        self.handle.stop(true).await;
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.expect("request sent");
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            text: resp.text().await.unwrap(),
        }
    }

    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.address))
            .bearer_auth(ADMIN_TOKEN)
    }

    pub async fn create_tenant(&self, spec: &Value) -> Answer {
        self.send(
            self.admin(reqwest::Method::POST, "/admin/v1/tenants")
                .json(spec),
        )
        .await
    }

    pub async fn create_caller(&self, name: &str, tenants: Value) -> String {
        let a = self
            .send(
                self.admin(reqwest::Method::POST, "/admin/v1/callers")
                    .json(&json!({"name": name, "tenants": tenants})),
            )
            .await;
        assert_eq!(a.status, 201, "{}", a.text);
        a.json()["api_key"].as_str().unwrap().to_owned()
    }

    pub async fn get_token(&self, tenant: &str, key: &str) -> Answer {
        self.send(
            self.client
                .get(format!("{}/v1/tenants/{tenant}/token", self.address))
                .bearer_auth(key),
        )
        .await
    }

    pub async fn get_token_min_ttl(&self, tenant: &str, key: &str, min_ttl: u64) -> Answer {
        self.send(
            self.client
                .get(format!(
                    "{}/v1/tenants/{tenant}/token?min_ttl={min_ttl}",
                    self.address
                ))
                .bearer_auth(key),
        )
        .await
    }

    pub async fn invalidate(&self, tenant: &str, key: &str, token: &str) -> Answer {
        self.send(
            self.client
                .post(format!(
                    "{}/v1/tenants/{tenant}/token/invalidate",
                    self.address
                ))
                .bearer_auth(key)
                .json(&json!({"access_token": token})),
        )
        .await
    }

    /// The audit entries `GET /admin/v1/audit?<query>` answers now, newest first.
    pub async fn audit(&self, query: &str) -> Vec<Value> {
        let a = self
            .send(self.admin(reqwest::Method::GET, &format!("/admin/v1/audit?{query}")))
            .await;
        assert_eq!(a.status, 200, "{}", a.text);
        a.json()["entries"].as_array().unwrap().clone()
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(self.client.get(format!("{}{path}", self.address)))
            .await
    }
}

// ---------- fake partners ----------

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

// ---------- test-owned services and processes ----------

/// A redis-server this test owns (so it can stop, pause and restart it).
pub struct OwnRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start() -> Option<Self> {
        let mut r = Self {
            port: free_port(),
            dir: tempfile::tempdir().ok()?,
            child: None,
        };
        r.restart().then_some(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port.
    pub fn restart(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        for _ in 0..50 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A TCP proxy the test can cut, standing in for a database that goes away.
pub struct CuttableProxy {
    pub port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttableProxy {
    pub async fn start(target: (String, u16)) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut watch = watch.clone();
                if *watch.borrow() {
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|c| *c) => {}
                    }
                });
            }
        });
        Self { port, cut }
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

/// The broker binary run as its own process, its stdout and stderr captured to files.
pub struct BrokerProcess {
    pub child: Child,
    pub address: String,
    pub log: std::path::PathBuf,
    pub out: std::path::PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl BrokerProcess {
    pub async fn start(envs: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut all = vec![("BROKER_ADMIN_TOKEN", ADMIN_TOKEN)];
        all.extend_from_slice(envs);
        let mut p = Self::start_in(dir.path(), &all).await;
        p._dir = Some(dir);
        p
    }

    /// `serve` on the SQLite database `broker.db` in `dir` (which outlives the process, so a
    /// test can start again on it), with only `envs` besides the listen address, the database
    /// and `BROKER_ALLOW_INSECURE_ISSUERS=true`.
    pub async fn start_in(dir: &std::path::Path, envs: &[(&str, &str)]) -> Self {
        let port = free_port();
        let n = std::fs::read_dir(dir).map_or(0, |d| d.count());
        let log = dir.join(format!("stderr-{n}.log"));
        let out = dir.join(format!("stdout-{n}.log"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_token-broker"));
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BROKER_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/broker.db", dir.display()),
            )
            .env("BROKER_ALLOW_INSECURE_ISSUERS", "true")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the broker binary starts");
        let address = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if reqwest::get(format!("{address}/healthz")).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            child,
            address,
            log,
            out,
            _dir: None,
        }
    }

    /// What the process printed on standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl CuttableProxy {
    /// Accepts connections again after `cut`.
    pub fn restore(&self) {
        let _ = self.cut.send(false);
    }
}

/// A port `p` below 45535 with `p` and `p + 10000` free (a cluster node's bus port).
fn free_cluster_port(taken: &[u16]) -> u16 {
    loop {
        let p: u16 = rand::Rng::gen_range(&mut rand::thread_rng(), 20_000..45_000);
        if taken
            .iter()
            .any(|t| t.abs_diff(p) < 2 || t.abs_diff(p + 10_000) < 2)
        {
            continue;
        }
        let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if free(p) && free(p + 10_000) {
            return p;
        }
    }
}

/// One `redis-server` process this test owns, started with extra arguments.
pub struct RedisNode {
    pub port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisNode {
    /// A node on a free port, started with `args`.
    pub fn spawn(args: &[&str]) -> Self {
        Self::start(free_cluster_port(&[]), args)
    }

    fn start(port: u16, args: &[&str]) -> Self {
        let mut n = Self {
            port,
            dir: tempfile::tempdir().unwrap(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        n.restart();
        n
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it (again) on the same port, empty (no persistence), with its cluster config
    /// file if it has one.
    pub fn restart(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("redis-server could not start ({e}); install it (apt-get install redis-server)")
        });
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not come up", self.port);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs one Redis command against `port` and returns its answer.
pub async fn redis_cmd(port: u16, args: &[&str]) -> redis::RedisResult<redis::Value> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await
}

pub fn redis_text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::VerbatimString { text, .. } => text.clone(),
        other => format!("{other:?}"),
    }
}

/// A throwaway Redis Cluster: 3 primaries and 3 replicas on loopback.
pub struct RedisCluster {
    pub nodes: Vec<RedisNode>,
}

impl RedisCluster {
    pub async fn start() -> Self {
        let mut ports = Vec::new();
        for _ in 0..6 {
            ports.push(free_cluster_port(&ports));
        }
        let nodes: Vec<RedisNode> = ports
            .iter()
            .map(|&p| {
                RedisNode::start(
                    p,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "1000",
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli is needed for the cluster tests (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = Self { nodes };
        cluster.wait_ok(Duration::from_secs(20)).await;
        cluster
    }

    /// `redis://a,redis://b,…` of the primaries the cluster started with.
    pub fn url(&self) -> String {
        self.nodes[..3]
            .iter()
            .map(RedisNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until every live node says `cluster_state:ok` and all slots are served.
    pub async fn wait_ok(&self, within: Duration) -> Duration {
        let started = std::time::Instant::now();
        loop {
            let mut all_ok = true;
            for n in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info = redis_cmd(n.port, &["CLUSTER", "INFO"])
                    .await
                    .map(|v| redis_text(&v))
                    .unwrap_or_default();
                if !info.contains("cluster_state:ok") {
                    all_ok = false;
                }
            }
            if all_ok {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "the cluster did not reach cluster_state:ok within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the node serving `slot` as primary.
    pub async fn primary_of(&self, slot: u16) -> usize {
        let v = redis_cmd(self.nodes[0].port, &["CLUSTER", "SLOTS"])
            .await
            .or(redis_cmd(self.nodes[1].port, &["CLUSTER", "SLOTS"]).await)
            .unwrap();
        let redis::Value::Array(ranges) = v else {
            panic!("CLUSTER SLOTS: {v:?}")
        };
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                continue;
            };
            if let (redis::Value::Int(a), redis::Value::Int(b), redis::Value::Array(primary)) =
                (&parts[0], &parts[1], &parts[2])
            {
                if (*a as u16..=*b as u16).contains(&slot) {
                    let redis::Value::Int(port) = primary[1] else {
                        panic!()
                    };
                    return self
                        .nodes
                        .iter()
                        .position(|n| n.port == port as u16)
                        .unwrap();
                }
            }
        }
        panic!("slot {slot} not served");
    }
}

/// A throwaway primary, one replica and three Sentinels watching them as `mymaster`.
pub struct RedisSentinels {
    pub primary: RedisNode,
    /// Kept running (Sentinel promotes it).
    _replica: RedisNode,
    pub sentinels: Vec<RedisNode>,
}

impl RedisSentinels {
    pub async fn start() -> Self {
        let mut ports = Vec::new();
        for _ in 0..5 {
            ports.push(free_cluster_port(&ports));
        }
        let primary = RedisNode::start(ports[0], &[]);
        let replica = RedisNode::start(
            ports[1],
            &["--replicaof", "127.0.0.1", &ports[0].to_string()],
        );
        let mut sentinels = Vec::new();
        for &p in &ports[2..] {
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {p}\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 {} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 3000\nsentinel parallel-syncs mymaster 1\n",
                    ports[0]
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            for _ in 0..100 {
                if std::net::TcpStream::connect(("127.0.0.1", p)).is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            sentinels.push(RedisNode {
                port: p,
                dir,
                args: Vec::new(),
                child: Some(child),
            });
        }
        let s = Self {
            primary,
            _replica: replica,
            sentinels,
        };
        // Wait until the Sentinels agree on the primary and know the replica.
        for _ in 0..100 {
            let v = redis_cmd(s.sentinels[0].port, &["SENTINEL", "REPLICAS", "mymaster"]).await;
            if matches!(v, Ok(redis::Value::Array(ref r)) if !r.is_empty()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinels
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+sentinel://{}/mymaster", hosts.join(","))
    }

    /// The port Sentinel currently names as primary.
    pub async fn primary_port(&self) -> Option<u16> {
        let v = redis_cmd(
            self.sentinels[0].port,
            &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"],
        )
        .await
        .ok()?;
        let redis::Value::Array(parts) = v else {
            return None;
        };
        redis_text(parts.get(1)?).parse().ok()
    }
}

// ---------- load and fault helpers ----------

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
