//! `Settings` from the environment, validated once at start; every bad value gets a message
//! naming the variable and what it expects (never the value, which may be a secret).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

pub use crate::audit::AuditMode;
use crate::cache::target::Target;
use crate::crypto::{KeyError, KeyRing};
use crate::db::Backend;
pub use crate::telemetry::LogFormat;

/// Where the encryption key ring comes from.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// `BROKER_ENCRYPTION_KEYS` or `BROKER_ENCRYPTION_KEY`.
    Configured(KeyRing),
    /// Embedded default: a key file beside the SQLite database, generated if missing.
    KeyFile(PathBuf),
    /// In-memory SQLite without a key: a throwaway key for this process.
    Ephemeral,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `BROKER_ADMIN_LISTEN`: a separate address for the admin API, the console and
    /// `/metrics` (unset: the same port as the token API).
    pub admin_listen: Option<SocketAddr>,
    pub database_url: String,
    /// `REDIS_URL`, parsed: one node, a cluster, or a Sentinel-managed primary.
    pub redis: Option<Target>,
    pub redis_prefix: String,
    pub redis_timeout: Duration,
    pub admin_token: Option<SecretString>,
    pub keys: KeySource,
    pub allow_insecure_issuers: bool,
    pub audit: AuditMode,
    pub audit_queue: usize,
    pub audit_retention_days: u64,
    pub jwt: Option<crate::auth::jwt::JwtSettings>,
    pub log_filter: String,
    pub log_format: LogFormat,
    pub workers: usize,
    pub caller_rate: u64,
    pub l1_cache: bool,
    pub caller_burst: u64,
    /// `BROKER_ADMIN_AUTH_FAILURES_PER_SECOND` / `_BURST`: failed admin authentications a
    /// source address may make before 429 `admin_auth_throttled`.
    pub admin_auth_failures_rate: u64,
    pub admin_auth_failures_burst: u64,
    /// `BROKER_PROXY_CALLER_CONCURRENCY`: proxied requests one caller may have in flight.
    pub proxy_caller_concurrency: usize,
    pub upstream_connect_timeout: Duration,
    pub upstream_timeout: Duration,
    /// `BROKER_DEFAULT_MIN_INTERVAL_MS`: partner call spacing for tenants that set none.
    pub default_min_interval_ms: u64,
    /// `BROKER_METRICS_TOKEN`: when set, `/metrics` wants it as a bearer token.
    pub metrics_token: Option<SecretString>,
    /// Admin JWTs (`BROKER_ADMIN_JWT_AUDIENCE`, with the `BROKER_JWT_*` IdP settings).
    pub admin_jwt: Option<AdminJwtSettings>,
    /// `BROKER_PUBLIC_URL`: the broker's base URL as callers reach it (the OAuth issuer),
    /// without a trailing slash; derived from each request when unset.
    pub public_url: Option<String>,
    /// `BROKER_ALLOWED_NETWORKS`: CIDR ranges token and proxy URLs may reach besides public
    /// addresses (https and every other guard rule still apply).
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// `BROKER_TRUSTED_PROXIES`: peers whose forwarding headers (`Forwarded`,
    /// `X-Forwarded-Host`/`-Proto`) the broker believes when it derives its own URL.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Named admins: JWTs from the callers' IdP with an admin audience and a role claim.
#[derive(Clone, Debug)]
pub struct AdminJwtSettings {
    pub audience: String,
    /// Claim holding the roles: a name, or a dotted path such as `realm_access.roles`.
    pub role_claim: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name}: {message}")]
    Invalid { name: &'static str, message: String },
    #[error("BROKER_ENCRYPTION_KEY{plural}: {source}", plural = if *.list { "S" } else { "" })]
    Key {
        list: bool,
        #[source]
        source: KeyError,
    },
}

/// The environment variables the broker and its CLI read: each name once, here (the README's
/// settings table is checked against these by the drift test).
pub mod env {
    pub const LISTEN: &str = "BROKER_LISTEN";
    pub const ADMIN_LISTEN: &str = "BROKER_ADMIN_LISTEN";
    pub const DATABASE_URL: &str = "DATABASE_URL";
    pub const REDIS_URL: &str = "REDIS_URL";
    pub const REDIS_PREFIX: &str = "BROKER_REDIS_PREFIX";
    pub const REDIS_TIMEOUT_MS: &str = "BROKER_REDIS_TIMEOUT_MS";
    pub const ADMIN_TOKEN: &str = "BROKER_ADMIN_TOKEN";
    pub const URL: &str = "BROKER_URL";
    pub const ADMIN_JWT_AUDIENCE: &str = "BROKER_ADMIN_JWT_AUDIENCE";
    pub const ADMIN_ROLE_CLAIM: &str = "BROKER_ADMIN_ROLE_CLAIM";
    pub const METRICS_TOKEN: &str = "BROKER_METRICS_TOKEN";
    pub const DEFAULT_MIN_INTERVAL_MS: &str = "BROKER_DEFAULT_MIN_INTERVAL_MS";
    pub const ENCRYPTION_KEY: &str = "BROKER_ENCRYPTION_KEY";
    pub const ENCRYPTION_KEYS: &str = "BROKER_ENCRYPTION_KEYS";
    pub const ALLOW_INSECURE_ISSUERS: &str = "BROKER_ALLOW_INSECURE_ISSUERS";
    pub const ALLOWED_NETWORKS: &str = "BROKER_ALLOWED_NETWORKS";
    pub const UPSTREAM_CONNECT_TIMEOUT_MS: &str = "BROKER_UPSTREAM_CONNECT_TIMEOUT_MS";
    pub const UPSTREAM_TIMEOUT_MS: &str = "BROKER_UPSTREAM_TIMEOUT_MS";
    pub const WORKERS: &str = "BROKER_WORKERS";
    pub const CALLER_RATE: &str = "BROKER_CALLER_RATE";
    pub const CALLER_BURST: &str = "BROKER_CALLER_BURST";
    pub const ADMIN_AUTH_FAILURES_PER_SECOND: &str = "BROKER_ADMIN_AUTH_FAILURES_PER_SECOND";
    pub const ADMIN_AUTH_FAILURES_BURST: &str = "BROKER_ADMIN_AUTH_FAILURES_BURST";
    pub const PROXY_CALLER_CONCURRENCY: &str = "BROKER_PROXY_CALLER_CONCURRENCY";
    pub const L1_CACHE: &str = "BROKER_L1_CACHE";
    pub const JWT_JWKS_URL: &str = "BROKER_JWT_JWKS_URL";
    pub const JWT_ISSUER: &str = "BROKER_JWT_ISSUER";
    pub const JWT_AUDIENCE: &str = "BROKER_JWT_AUDIENCE";
    pub const AUDIT: &str = "BROKER_AUDIT";
    pub const AUDIT_QUEUE: &str = "BROKER_AUDIT_QUEUE";
    pub const AUDIT_RETENTION_DAYS: &str = "BROKER_AUDIT_RETENTION_DAYS";
    pub const PUBLIC_URL: &str = "BROKER_PUBLIC_URL";
    pub const TRUSTED_PROXIES: &str = "BROKER_TRUSTED_PROXIES";
    pub const RUST_LOG: &str = "RUST_LOG";
    pub const LOG_FORMAT: &str = "BROKER_LOG_FORMAT";

    /// Every name above, in the README's order.
    pub const ALL: &[&str] = &[
        LISTEN,
        ADMIN_LISTEN,
        DATABASE_URL,
        REDIS_URL,
        REDIS_PREFIX,
        REDIS_TIMEOUT_MS,
        ADMIN_TOKEN,
        URL,
        ADMIN_JWT_AUDIENCE,
        ADMIN_ROLE_CLAIM,
        METRICS_TOKEN,
        DEFAULT_MIN_INTERVAL_MS,
        ENCRYPTION_KEY,
        ENCRYPTION_KEYS,
        ALLOW_INSECURE_ISSUERS,
        ALLOWED_NETWORKS,
        UPSTREAM_CONNECT_TIMEOUT_MS,
        UPSTREAM_TIMEOUT_MS,
        WORKERS,
        CALLER_RATE,
        CALLER_BURST,
        ADMIN_AUTH_FAILURES_PER_SECOND,
        ADMIN_AUTH_FAILURES_BURST,
        PROXY_CALLER_CONCURRENCY,
        L1_CACHE,
        JWT_JWKS_URL,
        JWT_ISSUER,
        JWT_AUDIENCE,
        AUDIT,
        AUDIT_QUEUE,
        AUDIT_RETENTION_DAYS,
        PUBLIC_URL,
        TRUSTED_PROXIES,
        RUST_LOG,
        LOG_FORMAT,
    ];
}

fn invalid(name: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name,
        message: message.into(),
    }
}

/// Settings that may be read from a file named by `<NAME>_FILE`.
pub const FILE_SETTINGS: &[&str] = &[
    env::ADMIN_TOKEN,
    env::ENCRYPTION_KEY,
    env::ENCRYPTION_KEYS,
    env::METRICS_TOKEN,
    env::DATABASE_URL,
    env::REDIS_URL,
];

/// The contents of `<NAME>_FILE` for each of `FILE_SETTINGS` given that way. Setting both
/// `NAME` and `NAME_FILE` is an error, as is a file that cannot be read (the message names the
/// variable and the file, never the contents).
fn secrets_from_files(
    get: &impl Fn(&str) -> Option<String>,
) -> Result<std::collections::HashMap<&'static str, String>, ConfigError> {
    let mut out = std::collections::HashMap::new();
    for name in FILE_SETTINGS {
        let file_var = format!("{name}_FILE");
        let Some(path) = get(&file_var).filter(|p| !p.trim().is_empty()) else {
            continue;
        };
        if get(name).is_some_and(|v| !v.trim().is_empty()) {
            return Err(invalid(
                name,
                format!("set either {name} or {file_var}, not both"),
            ));
        }
        let text = std::fs::read_to_string(path.trim()).map_err(|e| {
            invalid(
                name,
                format!("{file_var}: cannot read {}: {}", path.trim(), e.kind()),
            )
        })?;
        out.insert(*name, text);
    }
    Ok(out)
}

/// Shortest static admin token accepted.
pub const MIN_ADMIN_TOKEN_CHARS: usize = 32;

/// Placeholders that documentation and examples show, refused whatever their length.
const PLACEHOLDER_ADMIN_TOKENS: &[&str] = &[
    "change-me",
    "change-me-admin",
    "changeme",
    "tbadmin_…",
    "tbadmin_...",
    "<admin token>",
];

/// `BROKER_ADMIN_TOKEN` must be long enough not to be guessed and not an example's
/// placeholder. The message names the variable, never the value.
fn check_admin_token(token: &str) -> Result<(), ConfigError> {
    let placeholder = PLACEHOLDER_ADMIN_TOKENS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(token.trim()));
    if placeholder || token.chars().count() < MIN_ADMIN_TOKEN_CHARS {
        return Err(invalid(
            env::ADMIN_TOKEN,
            format!(
                "too weak: use at least {MIN_ADMIN_TOKEN_CHARS} random characters, not an example's placeholder (openssl rand -hex 24)"
            ),
        ));
    }
    Ok(())
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads settings through `get` (the environment, or a map in tests). A secret may come
    /// from a file instead (`<NAME>_FILE`, as mounted Kubernetes or Docker secrets are).
    ///
    /// Long because it reads the general settings in the README's order; each section with
    /// rules of its own already has its own parser (store and keys, Redis, audit, JWT
    /// callers, logs, limits).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let from_files = secrets_from_files(&get)?;
        let lookup = |k: &str| {
            get(k)
                .or_else(|| from_files.get(k).cloned())
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let var: Var<'_> = &lookup;
        let listen = var(env::LISTEN)
            .unwrap_or_else(|| "127.0.0.1:8080".into())
            .parse()
            .map_err(|_| invalid(env::LISTEN, "expected host:port such as 0.0.0.0:8080"))?;
        let admin_listen = var(env::ADMIN_LISTEN)
            .map(|v| {
                v.parse().map_err(|_| {
                    invalid(env::ADMIN_LISTEN, "expected host:port such as 0.0.0.0:9090")
                })
            })
            .transpose()?;
        let (database_url, keys) = store_section(var)?;
        let (redis, redis_prefix, redis_timeout) = redis_section(var)?;
        let admin_token = var(env::ADMIN_TOKEN)
            .map(|t| check_admin_token(&t).map(|()| SecretString::from(t)))
            .transpose()?;
        let allow_insecure_issuers = parse_bool(&var, env::ALLOW_INSECURE_ISSUERS, false)?;
        let (audit, audit_queue, audit_retention_days) = audit_section(var)?;
        let jwt = jwt_section(var, allow_insecure_issuers)?;
        let admin_jwt = admin_jwt_section(var, jwt.as_ref())?;
        let (log_filter, log_format) = log_section(var)?;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = parse_num(&var, env::WORKERS, cores as u64, 1..=256)? as usize;
        let l1_cache = parse_bool(&var, env::L1_CACHE, true)?;
        let (caller_rate, caller_burst) = callers_section(var)?;
        let admin_auth_failures_rate =
            parse_num(&var, env::ADMIN_AUTH_FAILURES_PER_SECOND, 10, 1..=1_000_000)?;
        let admin_auth_failures_burst = parse_num(
            &var,
            env::ADMIN_AUTH_FAILURES_BURST,
            admin_auth_failures_rate.saturating_mul(2),
            1..=10_000_000,
        )?;
        let proxy_caller_concurrency =
            parse_num(&var, env::PROXY_CALLER_CONCURRENCY, 64, 1..=100_000)? as usize;
        let (upstream_connect_timeout, upstream_timeout, default_min_interval_ms) =
            upstream_section(var)?;
        let metrics_token = var(env::METRICS_TOKEN).map(SecretString::from);
        let (public_url, allowed_networks, trusted_proxies) = reach_section(var)?;
        Ok(Self {
            listen,
            admin_listen,
            database_url,
            redis,
            redis_prefix,
            redis_timeout,
            admin_token,
            keys,
            allow_insecure_issuers,
            audit,
            audit_queue,
            audit_retention_days,
            jwt,
            log_filter,
            log_format,
            workers,
            caller_rate,
            caller_burst,
            admin_auth_failures_rate,
            admin_auth_failures_burst,
            proxy_caller_concurrency,
            l1_cache,
            upstream_connect_timeout,
            upstream_timeout,
            default_min_interval_ms,
            metrics_token,
            admin_jwt,
            public_url,
            allowed_networks,
            trusted_proxies,
        })
    }
}

impl Settings {
    /// `serve` needs a way in for admins: with Postgres, `BROKER_ADMIN_TOKEN` or named admins
    /// (replicas cannot share a generated token); the embedded default generates one.
    pub fn require_admin_credentials(&self) -> Result<(), ConfigError> {
        let postgres = Backend::from_url(&self.database_url) == Some(Backend::Postgres);
        if postgres && self.admin_token.is_none() && self.admin_jwt.is_none() {
            return Err(invalid(
                env::ADMIN_TOKEN,
                "required with Postgres (replicas cannot share a generated one): set it to a long random value (openssl rand -hex 32), or set BROKER_ADMIN_JWT_AUDIENCE for named admins",
            ));
        }
        Ok(())
    }

    /// Where the embedded default keeps the generated admin token's hash: `<db>.admin-token`
    /// beside a SQLite database file (`None` for Postgres and in-memory SQLite).
    pub fn admin_token_file(&self) -> Option<PathBuf> {
        sqlite_path(&self.database_url).map(|db| crate::auth::admin_token::hash_file_beside(&db))
    }
}

/// A comma-separated list of CIDR ranges (empty when unset).
fn cidr_list(var: Var<'_>, name: &'static str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    match var(name) {
        None => Ok(Vec::new()),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<ipnet::IpNet>().map(|n| n.trunc()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| {
                invalid(
                    name,
                    "expected a comma-separated list of CIDR ranges such as 10.20.0.0/16,fd00:1::/32",
                )
            }),
    }
}

/// What the reach section holds: `BROKER_PUBLIC_URL` (the OAuth issuer),
/// `BROKER_ALLOWED_NETWORKS` (private ranges outbound calls may reach) and
/// `BROKER_TRUSTED_PROXIES` (peers whose `Forwarded`/`X-Forwarded-*` headers are believed).
type Reach = (Option<String>, Vec<ipnet::IpNet>, Vec<ipnet::IpNet>);

fn reach_section(var: Var<'_>) -> Result<Reach, ConfigError> {
    let allowed_networks = cidr_list(var, env::ALLOWED_NETWORKS)?;
    let trusted_proxies = cidr_list(var, env::TRUSTED_PROXIES)?;
    let public_url = var(env::PUBLIC_URL)
        .map(|v| parse_public_url(&v))
        .transpose()?;
    Ok((public_url, allowed_networks, trusted_proxies))
}

/// `BROKER_PUBLIC_URL`: an absolute http(s) URL with no query, fragment or credentials (an
/// RFC 8414 issuer); a trailing slash is dropped.
fn parse_public_url(raw: &str) -> Result<String, ConfigError> {
    let bad = || {
        invalid(
            env::PUBLIC_URL,
            "expected the broker's base URL as callers reach it, such as https://broker.example.com (http or https, no query or fragment)",
        )
    };
    let url = url::Url::parse(raw).map_err(|_| bad())?;
    let ok = matches!(url.scheme(), "http" | "https")
        && url.host().is_some()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.username().is_empty()
        && url.password().is_none();
    if !ok {
        return Err(bad());
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

/// The environment, trimmed, with empty values as unset.
type Var<'a> = &'a dyn Fn(&str) -> Option<String>;

/// `DATABASE_URL` and the encryption keys (which depend on the backend).
fn store_section(var: Var<'_>) -> Result<(String, KeySource), ConfigError> {
    let database_url = normalise_database_url(
        &var(env::DATABASE_URL).unwrap_or_else(|| "sqlite://token-broker.db?mode=rwc".into()),
    )?;
    let backend = Backend::from_url(&database_url).expect("normalised");
    let keys = if let Some(list) = var(env::ENCRYPTION_KEYS) {
        KeySource::Configured(
            KeyRing::parse_list(&list).map_err(|source| ConfigError::Key { list: true, source })?,
        )
    } else if let Some(key) = var(env::ENCRYPTION_KEY) {
        KeySource::Configured(KeyRing::single(&key).map_err(|source| ConfigError::Key {
            list: false,
            source,
        })?)
    } else {
        match (backend, sqlite_path(&database_url)) {
            (Backend::Postgres, _) => {
                return Err(invalid(
                    env::ENCRYPTION_KEY,
                    "required with Postgres: set it to base64 of 32 random bytes (openssl rand -base64 32)",
                ))
            }
            (Backend::Sqlite, Some(db)) => {
                let mut file = db.into_os_string();
                file.push(".key");
                KeySource::KeyFile(file.into())
            }
            (Backend::Sqlite, None) => KeySource::Ephemeral,
        }
    };
    Ok((database_url, keys))
}

/// `REDIS_URL`, `BROKER_REDIS_PREFIX`, `BROKER_REDIS_TIMEOUT_MS`.
fn redis_section(var: Var<'_>) -> Result<(Option<Target>, String, Duration), ConfigError> {
    let redis = var(env::REDIS_URL)
        .map(|url| Target::parse(&url).map_err(|m| invalid(env::REDIS_URL, m)))
        .transpose()?;
    let redis_prefix = var(env::REDIS_PREFIX).unwrap_or_else(|| "token-broker".into());
    if redis_prefix.len() > 64 || redis_prefix.contains(['{', '}', ' ']) {
        return Err(invalid(
            env::REDIS_PREFIX,
            "at most 64 characters, without braces or spaces",
        ));
    }
    let redis_timeout =
        Duration::from_millis(parse_num(&var, env::REDIS_TIMEOUT_MS, 80, 5..=10_000)?);
    Ok((redis, redis_prefix, redis_timeout))
}

/// `BROKER_AUDIT`, `BROKER_AUDIT_QUEUE`, `BROKER_AUDIT_RETENTION_DAYS`.
fn audit_section(var: Var<'_>) -> Result<(AuditMode, usize, u64), ConfigError> {
    let audit = match var(env::AUDIT).as_deref() {
        None | Some("fail_closed") => AuditMode::FailClosed,
        Some("best_effort") => AuditMode::BestEffort,
        Some(_) => return Err(invalid(env::AUDIT, "expected fail_closed or best_effort")),
    };
    let audit_queue = parse_num(&var, env::AUDIT_QUEUE, 10_000, 1..=1_000_000)? as usize;
    let audit_retention_days = parse_num(&var, env::AUDIT_RETENTION_DAYS, 90, 1..=36_500)?;
    Ok((audit, audit_queue, audit_retention_days))
}

/// `BROKER_JWT_JWKS_URL`, `BROKER_JWT_ISSUER`, `BROKER_JWT_AUDIENCE`: all three or none.
fn jwt_section(
    var: Var<'_>,
    allow_insecure_issuers: bool,
) -> Result<Option<crate::auth::jwt::JwtSettings>, ConfigError> {
    let jwt = match (
        var(env::JWT_JWKS_URL),
        var(env::JWT_ISSUER),
        var(env::JWT_AUDIENCE),
    ) {
        (None, None, None) => None,
        (Some(jwks_url), Some(issuer), Some(audience)) => {
            let ok = url::Url::parse(&jwks_url).is_ok_and(|u| {
                u.scheme() == "https" || (u.scheme() == "http" && allow_insecure_issuers)
            });
            if !ok {
                return Err(invalid(
                    env::JWT_JWKS_URL,
                    "expected an https URL (http only with BROKER_ALLOW_INSECURE_ISSUERS=true)",
                ));
            }
            Some(crate::auth::jwt::JwtSettings {
                jwks_url,
                issuer,
                audience,
            })
        }
        _ => {
            return Err(invalid(
                env::JWT_JWKS_URL,
                "BROKER_JWT_JWKS_URL, BROKER_JWT_ISSUER and BROKER_JWT_AUDIENCE go together: set all three or none",
            ))
        }
    };
    Ok(jwt)
}

/// `BROKER_ADMIN_JWT_AUDIENCE`, `BROKER_ADMIN_ROLE_CLAIM` (needs the IdP settings).
fn admin_jwt_section(
    var: Var<'_>,
    jwt: Option<&crate::auth::jwt::JwtSettings>,
) -> Result<Option<AdminJwtSettings>, ConfigError> {
    let admin_jwt = match var(env::ADMIN_JWT_AUDIENCE) {
        None => None,
        Some(_) if jwt.is_none() => {
            return Err(invalid(
                env::ADMIN_JWT_AUDIENCE,
                "admin JWTs are checked against the IdP in BROKER_JWT_JWKS_URL and BROKER_JWT_ISSUER: set those too",
            ))
        }
        Some(audience) if jwt.is_some_and(|j| j.audience == audience) => {
            return Err(invalid(
                env::ADMIN_JWT_AUDIENCE,
                "must differ from BROKER_JWT_AUDIENCE, so a caller's token is never an admin's",
            ))
        }
        Some(audience) => Some(AdminJwtSettings {
            audience,
            role_claim: var(env::ADMIN_ROLE_CLAIM).unwrap_or_else(|| "roles".into()),
        }),
    };
    Ok(admin_jwt)
}

/// `RUST_LOG`, `BROKER_LOG_FORMAT`.
fn log_section(var: Var<'_>) -> Result<(String, LogFormat), ConfigError> {
    let log_format = match var(env::LOG_FORMAT).as_deref() {
        // Unset: readable lines for a person at a terminal, JSON for a log pipeline.
        None if std::io::IsTerminal::is_terminal(&std::io::stderr()) => LogFormat::Pretty,
        None | Some("json") => LogFormat::Json,
        Some("pretty") => LogFormat::Pretty,
        Some(_) => return Err(invalid(env::LOG_FORMAT, "expected json or pretty")),
    };
    let log_filter = var(env::RUST_LOG).unwrap_or_else(|| "info".into());
    tracing_subscriber::EnvFilter::try_new(&log_filter)
        .map_err(|_| invalid(env::RUST_LOG, "not a valid tracing filter"))?;
    Ok((log_filter, log_format))
}

/// `BROKER_CALLER_RATE`, `BROKER_CALLER_BURST`.
fn callers_section(var: Var<'_>) -> Result<(u64, u64), ConfigError> {
    let caller_rate = parse_num(&var, env::CALLER_RATE, 1_000, 0..=10_000_000)?;
    let caller_burst = parse_num(
        &var,
        env::CALLER_BURST,
        caller_rate.saturating_mul(2),
        0..=100_000_000,
    )?;
    Ok((caller_rate, caller_burst))
}

/// `BROKER_UPSTREAM_CONNECT_TIMEOUT_MS`, `BROKER_UPSTREAM_TIMEOUT_MS`,
/// `BROKER_DEFAULT_MIN_INTERVAL_MS`.
fn upstream_section(var: Var<'_>) -> Result<(Duration, Duration, u64), ConfigError> {
    let upstream_connect_timeout = Duration::from_millis(parse_num(
        &var,
        env::UPSTREAM_CONNECT_TIMEOUT_MS,
        3_000,
        100..=60_000,
    )?);
    let upstream_timeout = Duration::from_millis(parse_num(
        &var,
        env::UPSTREAM_TIMEOUT_MS,
        10_000,
        100..=120_000,
    )?);
    let default_min_interval_ms = parse_num(
        &var,
        env::DEFAULT_MIN_INTERVAL_MS,
        crate::broker::DEFAULT_MIN_INTERVAL_MS,
        0..=3_600_000,
    )?;
    Ok((
        upstream_connect_timeout,
        upstream_timeout,
        default_min_interval_ms,
    ))
}

fn parse_num(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
    range: std::ops::RangeInclusive<u64>,
) -> Result<u64, ConfigError> {
    match var(name) {
        None => Ok(default),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                invalid(
                    name,
                    format!(
                        "expected a whole number from {} to {}",
                        range.start(),
                        range.end()
                    ),
                )
            }),
    }
}

fn parse_bool(
    var: &impl Fn(&str) -> Option<String>,
    name: &'static str,
    default: bool,
) -> Result<bool, ConfigError> {
    match var(name).map(|v| v.to_ascii_lowercase()).as_deref() {
        None => Ok(default),
        Some("true" | "1" | "yes") => Ok(true),
        Some("false" | "0" | "no") => Ok(false),
        Some(_) => Err(invalid(name, "expected true or false")),
    }
}

/// Checks the scheme and makes SQLite create its file when missing.
fn normalise_database_url(url: &str) -> Result<String, ConfigError> {
    match Backend::from_url(url) {
        Some(Backend::Postgres) => Ok(url.to_owned()),
        Some(Backend::Sqlite) if url.contains(":memory:") || url.contains("mode=") => {
            Ok(url.to_owned())
        }
        Some(Backend::Sqlite) => Ok(if url.contains('?') {
            format!("{url}&mode=rwc")
        } else {
            format!("{url}?mode=rwc")
        }),
        None => Err(invalid(
            env::DATABASE_URL,
            "expected sqlite://path.db or postgres://user@host/db",
        )),
    }
}

/// The file behind a SQLite URL, or `None` for an in-memory database.
pub fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let path = rest.split('?').next().unwrap_or("");
    if path.is_empty() || path.contains(":memory:") {
        None
    } else {
        Some(PathBuf::from(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(vars: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn embedded_defaults() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.database_url, "sqlite://token-broker.db?mode=rwc");
        assert!(
            matches!(&s.keys, KeySource::KeyFile(p) if p.to_str() == Some("token-broker.db.key"))
        );
        assert!(s.redis.is_none() && s.admin_token.is_none());
        assert_eq!(s.audit, AuditMode::FailClosed);
    }

    #[test]
    fn secrets_may_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        let token_file = dir.path().join("admin-token");
        std::fs::write(&token_file, "4f0c1e6b2a9d83f5c7e1a0b9d2c4e6f8-from-file\n").unwrap();
        let url_file = dir.path().join("database-url");
        std::fs::write(&url_file, "postgres://broker@db/broker\n").unwrap();
        let path = |p: &std::path::Path| p.display().to_string();
        let s = settings(&[
            ("BROKER_ADMIN_TOKEN_FILE", &path(&token_file)),
            ("DATABASE_URL_FILE", &path(&url_file)),
            (
                "BROKER_ENCRYPTION_KEY",
                "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
            ),
        ])
        .unwrap();
        assert_eq!(
            s.admin_token
                .as_ref()
                .map(|t| secrecy::ExposeSecret::expose_secret(t).to_owned()),
            Some("4f0c1e6b2a9d83f5c7e1a0b9d2c4e6f8-from-file".to_owned())
        );
        assert_eq!(s.database_url, "postgres://broker@db/broker");
        let both = settings(&[
            ("BROKER_ADMIN_TOKEN_FILE", &path(&token_file)),
            ("BROKER_ADMIN_TOKEN", "4f0c1e6b2a9d83f5c7e1a0b9d2c4e6f8"),
        ])
        .err()
        .unwrap()
        .to_string();
        assert!(both.contains("not both"), "{both}");
        let missing = settings(&[("BROKER_ADMIN_TOKEN_FILE", "/nonexistent/secret")])
            .err()
            .unwrap()
            .to_string();
        assert!(
            missing.contains("BROKER_ADMIN_TOKEN_FILE") && missing.contains("/nonexistent/secret"),
            "{missing}"
        );
    }

    #[test]
    fn weak_admin_tokens_are_refused_without_being_shown() {
        for weak in [
            "a",
            "change-me-admin",
            "CHANGE-ME",
            "tbadmin_…",
            &"x".repeat(31),
        ] {
            let e = settings(&[("BROKER_ADMIN_TOKEN", weak)]).err().unwrap();
            let text = e.to_string();
            assert!(text.contains("BROKER_ADMIN_TOKEN"), "{text}");
            assert!(weak.len() < 3 || !text.contains(weak), "{text}");
        }
        let strong = "4f0c1e6b2a9d83f5c7e1a0b9d2c4e6f8";
        assert!(settings(&[("BROKER_ADMIN_TOKEN", strong)]).is_ok());
    }

    #[test]
    fn public_url() {
        let s = settings(&[("BROKER_PUBLIC_URL", "https://broker.example.com/")]).unwrap();
        assert_eq!(s.public_url.as_deref(), Some("https://broker.example.com"));
        let s = settings(&[("BROKER_PUBLIC_URL", "http://10.0.0.5:8080/tb")]).unwrap();
        assert_eq!(s.public_url.as_deref(), Some("http://10.0.0.5:8080/tb"));
        for bad in [
            "broker.example.com",
            "ftp://x",
            "https://x/?a=1",
            "https://x/#f",
            "https://u:p@x",
        ] {
            let e = settings(&[("BROKER_PUBLIC_URL", bad)]).unwrap_err();
            assert!(
                e.to_string().starts_with("BROKER_PUBLIC_URL:"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn allowed_networks() {
        let s = settings(&[("BROKER_ALLOWED_NETWORKS", "10.20.0.0/16, fd00:1::/32")]).unwrap();
        assert_eq!(s.allowed_networks.len(), 2);
        assert!(settings(&[]).unwrap().allowed_networks.is_empty());
        for bad in ["10.0.0.0", "10.0.0.0/33", "nope", "10.0.0.0/8;x"] {
            let e = settings(&[("BROKER_ALLOWED_NETWORKS", bad)]).unwrap_err();
            assert!(
                e.to_string().starts_with("BROKER_ALLOWED_NETWORKS:"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn postgres_needs_a_key() {
        let e = settings(&[("DATABASE_URL", "postgres://u@h/db")]).unwrap_err();
        assert!(e.to_string().starts_with("BROKER_ENCRYPTION_KEY:"), "{e}");
    }

    #[test]
    fn bad_values_name_the_variable_not_the_value() {
        for (k, v) in [
            ("BROKER_LISTEN", "nope"),
            ("DATABASE_URL", "mysql://x"),
            ("REDIS_URL", "localhost:6379"),
            ("BROKER_ALLOW_INSECURE_ISSUERS", "maybe"),
            ("BROKER_AUDIT", "sometimes"),
            ("BROKER_LOG_FORMAT", "xml"),
            ("BROKER_ENCRYPTION_KEY", "c2hvcnQ="),
            ("BROKER_ENCRYPTION_KEYS", "k1"),
        ] {
            let e = settings(&[(k, v)]).unwrap_err().to_string();
            assert!(e.starts_with(k), "{k}: {e}");
            assert!(!e.contains(v), "{k} echoes its value: {e}");
        }
    }

    #[test]
    fn sqlite_paths() {
        assert_eq!(
            sqlite_path("sqlite://a/b.db?mode=rwc"),
            Some("a/b.db".into())
        );
        assert_eq!(sqlite_path("sqlite:///tmp/x.db"), Some("/tmp/x.db".into()));
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(
            normalise_database_url("sqlite://x.db").unwrap(),
            "sqlite://x.db?mode=rwc"
        );
    }
}
