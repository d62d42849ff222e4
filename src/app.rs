//! Wiring: settings → key ring, store, cache, broker → actix `App` and server with graceful
//! shutdown. Tests build the same `Application` on port 0.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::middleware::{from_fn, ErrorHandlers};
use actix_web::{web, App, HttpServer};

use crate::api::problem::ApiError;
use crate::api::ratelimit::CallerLimiter;
use crate::api::{
    admin, console, oauth, observe, ops, pop, problem_for_framework_errors, proxy, token, AppState,
};
use crate::audit::Audit;
use crate::auth::admin_token::{self, AdminToken};
use crate::auth::jwt::JwtVerifier;
use crate::auth::{Authenticator, CallerStore, StaticToken};
use crate::broker::{Backends, Broker, Timing};
use crate::cache::redis::{spawn_listener, RedisCache, RedisConn};
use crate::config::{ConfigError, KeySource, Settings};
use crate::crypto::{KeyError, KeyRing};
use crate::db::private_file;
use crate::issuers::{IssuerSettings, Issuers};
use crate::metrics::Metrics;
use crate::tenants::{HealthStore, StoreError, TenantStore};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("encryption key file {path}: {source}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encryption key file {path}: {source}")]
    KeyFileContent {
        path: String,
        #[source]
        source: KeyError,
    },
    #[error("database: {0}")]
    Store(#[from] StoreError),
    #[error("database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    KeysInUse(String),
    #[error("re-sealing the cached token of {tenant}: {source}")]
    RekeyCache {
        tenant: String,
        #[source]
        source: crate::cache::CacheError,
    },
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("cannot listen: {0}")]
    Bind(#[from] std::io::Error),
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("admin token file {path}: {source}")]
    AdminTokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The static admin token the settings call for, and on the start that generated it, the token
/// itself (to be shown once). `BROKER_ADMIN_TOKEN` wins; with named admins
/// (`BROKER_ADMIN_JWT_AUDIENCE`) and no token there is none; otherwise the embedded default
/// generates one at its first start and keeps its hash beside the database. Postgres needs one
/// of the two settings (replicas cannot share a generated token).
pub fn load_admin_token(
    settings: &Settings,
) -> Result<(AdminToken, Option<secrecy::SecretString>), BuildError> {
    if let Some(token) = &settings.admin_token {
        return Ok((AdminToken::fixed(Some(token)), None));
    }
    if settings.admin_jwt.is_some() {
        return Ok((AdminToken::fixed(None), None));
    }
    settings.require_admin_credentials()?;
    let Some(path) = settings.admin_token_file() else {
        // In-memory database: a token for this process only.
        let token = admin_token::generate();
        return Ok((AdminToken::fixed(Some(&token)), Some(token)));
    };
    let io = |source| BuildError::AdminTokenFile {
        path: path.display().to_string(),
        source,
    };
    // Created exclusively: of two processes starting on one database, one generates the token.
    let token = admin_token::generate();
    let generated = admin_token::create_hash_file(&path, &token)
        .map_err(io)?
        .then_some(token);
    if generated.is_some() {
        tracing::info!(file = %path.display(), "first start: generated an admin token (printed once on standard output; only its hash is kept)");
    } else {
        tracing::info!(file = %path.display(), "using the admin token generated at an earlier start (only its hash is kept; it was printed then). Lost it? `token-broker admin-token --rotate` prints a new one");
    }
    Ok((AdminToken::file(path.clone()).map_err(io)?, generated))
}

/// The key ring the settings call for, generating the embedded default's key file if needed.
pub fn load_keys(source: &KeySource) -> Result<KeyRing, BuildError> {
    match source {
        KeySource::Configured(ring) => Ok(ring.clone()),
        KeySource::Ephemeral => {
            tracing::warn!(
                "no BROKER_ENCRYPTION_KEY and an in-memory database: using a throwaway key"
            );
            Ok(KeyRing::single(&KeyRing::generate_key_b64()).expect("generated key is valid"))
        }
        KeySource::KeyFile(path) => {
            let shown = path.display().to_string();
            let io = |source| BuildError::KeyFile {
                path: shown.clone(),
                source,
            };
            let key = zeroize::Zeroizing::new(format!("{}\n", KeyRing::generate_key_b64()));
            if private_file::create(path, key.as_bytes()).map_err(io)? {
                tracing::warn!(key_file = %shown, "no BROKER_ENCRYPTION_KEY set: generated an encryption key file beside the database (mode 0600). Anyone with both files can read the stored credentials; for production set BROKER_ENCRYPTION_KEY to base64 of 32 random bytes (openssl rand -base64 32) from a secret store");
            } else {
                tracing::warn!(key_file = %shown, "no BROKER_ENCRYPTION_KEY set: using the key file beside the database; for production set BROKER_ENCRYPTION_KEY from a secret store");
            }
            // Whoever can read it and the database file reads every stored credential.
            private_file::check_mode(
                path,
                "lets other users read the key that unlocks every stored credential",
                "run `chmod 600` on it (or set BROKER_ENCRYPTION_KEY)",
            )
            .map_err(io)?;
            let content = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
            KeyRing::single(content.trim()).map_err(|source| BuildError::KeyFileContent {
                path: shown.clone(),
                source,
            })
        }
    }
}

/// Opens the store and applies migrations.
pub async fn open_store(settings: &Settings) -> Result<TenantStore, BuildError> {
    let keys = Arc::new(load_keys(&settings.keys)?);
    let store = TenantStore::connect(&settings.database_url, keys).await?;
    store.migrate().await?;
    Ok(store)
}

/// Refuses a key ring that lacks a key stored credentials still need, naming the rows.
pub async fn check_keys_in_use(store: &TenantStore) -> Result<(), BuildError> {
    let mut missing = Vec::new();
    for (key_id, rows) in store.key_usage().await? {
        if !store.keys().contains(&key_id) {
            let sample = store.rows_sealed_with(&key_id, 10).await?;
            missing.push(format!(
                "key `{key_id}` still seals {rows} credential row(s) (e.g. {}); put it back in BROKER_ENCRYPTION_KEYS and run `token-broker rekey` before removing it",
                sample.join(", ")
            ));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(BuildError::KeysInUse(missing.join("; ")))
    }
}

/// `token-broker rekey`: re-seals every stored credential, and every token cached in Redis,
/// with the active key. Safe to interrupt and run again. Returns (credential rows, cached tokens).
pub async fn rekey(settings: &Settings) -> Result<(u64, u64), BuildError> {
    let store = open_store(settings).await?;
    let rows = store.rekey().await?;
    let mut tokens = 0;
    if let Some(target) = &settings.redis {
        let conn =
            RedisConn::connect(target, settings.redis_timeout.max(Duration::from_secs(1))).await?;
        let cache = RedisCache::new(
            conn,
            &settings.redis_prefix,
            Arc::new(store.keys().clone()),
            settings.redis_timeout.max(Duration::from_secs(1)),
            None,
        );
        for tenant in store.tenant_ids().await? {
            match cache.get(&tenant).await {
                Ok(Some(token)) => {
                    cache
                        .put(&tenant, token)
                        .await
                        .map_err(|source| BuildError::RekeyCache {
                            tenant: tenant.to_string(),
                            source,
                        })?;
                    tokens += 1;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(tenant = %tenant, error = %e, "cached token not re-sealed")
                }
            }
        }
    }
    Ok((rows, tokens))
}

/// A built, bound, not yet running service.
pub struct Application {
    port: u16,
    admin_port: Option<u16>,
    server: Server,
    state: web::Data<AppState>,
    generated_admin_token: Option<secrecy::SecretString>,
}

impl Application {
    pub async fn build(settings: Settings) -> Result<Self, BuildError> {
        let listener = TcpListener::bind(settings.listen)?;
        Self::build_with_listener(settings, listener).await
    }

    pub async fn build_with_listener(
        settings: Settings,
        listener: TcpListener,
    ) -> Result<Self, BuildError> {
        let workers = settings.workers;
        let (admin, generated_admin_token) = load_admin_token(&settings)?;
        // A start that fails after generating the admin token removes its hash file: the token
        // was never shown, and a file left behind would lock the operator out.
        let forget_generated = |e: BuildError| {
            if let (Some(_), Some(path)) = (&generated_admin_token, settings.admin_token_file()) {
                let _ = std::fs::remove_file(&path);
                tracing::info!(file = %path.display(), "start failed: removed the admin token file it had generated");
            }
            e
        };
        let started = async {
            let admin_listener = match settings.admin_listen {
                Some(addr) => Some(TcpListener::bind(addr)?),
                None => None,
            };
            let admin_port = match &admin_listener {
                Some(l) => Some(l.local_addr()?.port()),
                None => None,
            };
            let state = build_state(settings.clone(), admin, admin_port).await?;
            let port = listener.local_addr()?.port();
            let server = serve(state.clone(), listener, admin_listener, workers)?;
            Ok::<_, BuildError>((state, port, admin_port, server))
        };
        let (state, port, admin_port, server) = started.await.map_err(forget_generated)?;
        match admin_port {
            Some(admin_port) => {
                tracing::info!(
                    port,
                    admin_port,
                    "token-broker listening (admin API, console and metrics on the admin port)"
                )
            }
            None => tracing::info!(port, "token-broker listening"),
        }
        if state.settings.public_url.is_none() {
            tracing::warn!(port, "BROKER_PUBLIC_URL is unset: the OAuth metadata's issuer and token_endpoint are derived from each request's Host (and from Forwarded/X-Forwarded-* only when the peer is in BROKER_TRUSTED_PROXIES); set BROKER_PUBLIC_URL to the URL callers use");
        }
        Ok(Self {
            port,
            admin_port,
            server,
            state,
            generated_admin_token,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The admin port, when `BROKER_ADMIN_LISTEN` separates it.
    pub fn admin_port(&self) -> Option<u16> {
        self.admin_port
    }

    /// The admin token this start generated (the embedded default's first start, or an
    /// in-memory database): the caller shows it once.
    pub fn take_generated_admin_token(&mut self) -> Option<secrecy::SecretString> {
        self.generated_admin_token.take()
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until SIGTERM/SIGINT, then drains in-flight requests and the audit queue.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await?;
        if !self.state.audit.flush(Duration::from_secs(3)).await {
            tracing::warn!("the audit queue could not be flushed before exit");
        }
        self.state.store.close().await;
        Ok(())
    }
}

/// Everything a replica holds: store, metrics, audit, JWT verifier, shared cache and its event
/// listener, broker, authenticators.
async fn build_state(
    settings: Settings,
    admin: AdminToken,
    admin_port: Option<u16>,
) -> Result<web::Data<AppState>, BuildError> {
    if !crate::egress::allow_networks(settings.allowed_networks.clone()) {
        tracing::warn!("BROKER_ALLOWED_NETWORKS differs from the ranges this process started with: the first ones stay in force");
    }
    let store = open_store(&settings).await?;
    check_keys_in_use(&store).await?;
    let metrics = Arc::new(Metrics::new());
    let audit = Audit::start(
        store.db().clone(),
        settings.audit,
        settings.audit_queue,
        settings.audit_retention_days,
        metrics.clone(),
    );
    let jwt = settings.jwt.clone().map(|j| {
        let v = JwtVerifier::new(j);
        v.start();
        v
    });
    let timing = Timing {
        // Without a shared cache the in-process one is the only cache: it stays on.
        l1_enabled: settings.l1_cache || settings.redis.is_none(),
        default_min_interval_ms: settings.default_min_interval_ms,
        ..Timing::from_upstream_timeout(settings.upstream_timeout)
    };
    let shared = open_shared_cache(&settings, &store, &metrics).await?;
    let broker = start_broker(&settings, &store, &metrics, shared, timing);
    let callers = CallerStore::new(store.db().clone());
    let proxy = crate::proxy::Targets::new(
        store.clone(),
        settings.upstream_connect_timeout,
        settings.allow_insecure_issuers,
        settings.proxy_caller_concurrency,
    );
    let state = web::Data::new(AppState {
        broker,
        audit,
        limiter: CallerLimiter::new(settings.caller_rate, settings.caller_burst),
        admin_failures: CallerLimiter::new(
            settings.admin_auth_failures_rate,
            settings.admin_auth_failures_burst,
        ),
        jwt,
        auth: Authenticator::new(callers.clone(), Some(metrics.database_up.clone())),
        callers,
        proxy,
        health: HealthStore::new(store.db().clone()),
        admin,
        admin_port,
        metrics_token: StaticToken::new(settings.metrics_token.as_ref()),
        store,
        metrics,
        settings: Arc::new(settings.clone()),
    });
    Ok(state)
}

/// The shared cache when Redis is configured (its prober started); without it the Redis
/// dependency series is dropped.
async fn open_shared_cache(
    settings: &Settings,
    store: &TenantStore,
    metrics: &Arc<Metrics>,
) -> Result<Option<RedisCache>, BuildError> {
    let Some(target) = &settings.redis else {
        let _ = metrics.dependency_up.remove_label_values(&["redis"]);
        return Ok(None);
    };
    let conn = RedisConn::connect(target, settings.redis_timeout).await?;
    let cache = RedisCache::new(
        conn,
        &settings.redis_prefix,
        Arc::new(store.keys().clone()),
        settings.redis_timeout,
        Some(metrics.redis_up.clone()),
    );
    cache.start_prober();
    Ok(Some(cache))
}

/// The broker over the store, the partners' client and the shared cache, listening to the
/// other replicas' events when there is one.
fn start_broker(
    settings: &Settings,
    store: &TenantStore,
    metrics: &Arc<Metrics>,
    shared: Option<RedisCache>,
    timing: Timing,
) -> Arc<Broker> {
    let issuers = Issuers::new(&IssuerSettings {
        allow_insecure: settings.allow_insecure_issuers,
        connect_timeout: settings.upstream_connect_timeout,
        request_timeout: settings.upstream_timeout,
    });
    if settings.allow_insecure_issuers {
        tracing::warn!(
            "BROKER_ALLOW_INSECURE_ISSUERS=true: token URLs may use http and internal addresses"
        );
    }
    let broker = Broker::new(
        Arc::new(Backends {
            store: store.clone(),
            health: HealthStore::new(store.db().clone()),
            issuers,
        }),
        shared.clone().map(|c| Arc::new(c) as crate::cache::Shared),
        metrics.clone(),
        timing,
    );
    if let (Some(target), Some(cache)) = (settings.redis.clone(), shared) {
        let on_event = Arc::downgrade(&broker);
        spawn_listener(target, cache, move |e| {
            if let Some(b) = on_event.upgrade() {
                b.on_event(e)
            }
        });
    }
    broker
}

/// The HTTP server over `state`: middleware, the three route groups, problem+json fallbacks.
fn serve(
    state: web::Data<AppState>,
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    workers: usize,
) -> Result<Server, BuildError> {
    let app_state = state;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(app_state.clone())
            .wrap(ErrorHandlers::new().default_handler(problem_for_framework_errors))
            .wrap(from_fn(observe))
            // The router tries patterns in order (each dynamic one is a regex): the token
            // routes first, then proxy mode and the OAuth endpoint, so no hot path pays for the
            // admin routes.
            .configure(token::routes)
            .configure(proxy::routes)
            .configure(oauth::routes)
            .configure(pop::routes)
            .configure(admin::routes)
            .configure(ops::routes)
            .configure(console::routes)
            .default_service(web::to(|| async {
                Err::<web::Json<()>, _>(ApiError::RouteNotFound)
            }))
    })
    .workers(workers)
    .shutdown_timeout(10)
    .client_request_timeout(Duration::from_secs(10))
    .listen(listener)?;
    let server = match admin_listener {
        Some(l) => server.listen(l)?,
        None => server,
    };
    Ok(server.run())
}
