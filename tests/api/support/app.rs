//! One test's environment (database, cache namespace, key) and the apps spawned on it.

use super::*;

/// One test's database, cache namespace and key: several app instances may share it.
pub struct TestEnv {
    pub backend: Backend,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub dir: tempfile::TempDir,
    pub extra: HashMap<String, String>,
    /// The Postgres database made for this test, if any.
    pub own_database: Option<Arc<OwnDatabase>>,
}

/// A test's own Postgres database, dropped when the last holder goes (the environment and
/// every app spawned from it: apps may outlive the environment that made them); kept, and
/// named, when the test failed, to look at.
pub struct OwnDatabase(String);

impl Drop for OwnDatabase {
    fn drop(&mut self) {
        let name = std::mem::take(&mut self.0);
        if std::thread::panicking() {
            let _ = writeln!(
                std::io::stderr(),
                "tests: kept database {name} of a failed test"
            );
            return;
        }
        // Its own thread and runtime: this runs at the end of an async test.
        let _ = std::thread::spawn(move || drop_postgres_db(&name)).join();
    }
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
        let own_database = (backend != Backend::Sqlite)
            .then(|| url::Url::parse(&database_url).ok())
            .flatten()
            .map(|u| Arc::new(OwnDatabase(u.path().trim_start_matches('/').to_owned())));
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
            own_database,
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
            _database: self.own_database.clone(),
        }
    }
}

/// A running app instance and a client with one helper per endpoint.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub handle: actix_web::dev::ServerHandle,
    pub state: actix_web::web::Data<AppState>,
    _database: Option<Arc<OwnDatabase>>,
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
