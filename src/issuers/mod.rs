//! Minting tokens at partners: the outbound client, the per-kind recipes, and the
//! classification of every upstream outcome.

pub mod expiry;
pub mod recipes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use secrecy::SecretString;
use serde_json::Value;

pub use recipes::Grant;

use std::collections::HashMap;

use crate::pop;
use crate::tenants::{Tenant, TenantId};
use crate::time::now_ms;

/// Largest partner answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A freshly minted token.
pub struct Minted {
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    /// When the request was sent (lifetimes count from here), unix ms.
    pub issued_at_ms: i64,
    pub expires_at_ms: i64,
    /// The thumbprint of the DPoP key the token is bound to (`token_type: DPoP`).
    pub dpop_jkt: Option<String>,
}

/// Why a mint failed. Messages are written for operators and never carry secrets or the
/// partner's body verbatim.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "info", rename_all = "snake_case")]
pub enum IssuerError {
    #[error("the partner rejected the credentials (HTTP {status}{})", oauth_error(.error))]
    RejectedCredentials { status: u16, error: Option<String> },
    #[error("the partner rejected the token request (HTTP {status}{})", oauth_error(.error))]
    RejectedRequest { status: u16, error: Option<String> },
    #[error("the partner is throttling token requests (HTTP 429)")]
    RateLimited { retry_after: Option<u64> },
    #[error("the tenant's partner call rate cap (min_interval_ms) leaves no call slot in time")]
    Paced { retry_after: u64 },
    #[error("the partner's token endpoint is unavailable ({0})")]
    Unavailable(String),
    #[error("the partner did not answer in time")]
    Timeout,
    #[error("the partner's answer is not usable: {0}")]
    BadResponse(String),
    #[error("{0}")]
    NoExpiry(String),
    #[error("the token endpoint address is not allowed: {0}")]
    Blocked(String),
    #[error("the tenant's recipe cannot be applied: {0}")]
    Recipe(String),
}

fn oauth_error(e: &Option<String>) -> String {
    e.as_ref()
        .map(|e| format!(", error {e}"))
        .unwrap_or_default()
}

impl IssuerError {
    /// A short, fixed label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::RejectedCredentials { .. } => "rejected_credentials",
            Self::RejectedRequest { .. } => "rejected_request",
            Self::RateLimited { .. } => "rate_limited",
            Self::Paced { .. } => "paced",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout => "timeout",
            Self::BadResponse(_) | Self::NoExpiry(_) => "bad_response",
            Self::Blocked(_) => "blocked",
            Self::Recipe(_) => "recipe_error",
        }
    }

    /// The stable problem code callers see.
    pub fn code(&self) -> &'static str {
        match self {
            Self::RejectedCredentials { .. } => "upstream_rejected_credentials",
            Self::RejectedRequest { .. } => "upstream_rejected_request",
            Self::RateLimited { .. } | Self::Paced { .. } => "upstream_rate_limited",
            Self::Unavailable(_) => "upstream_unavailable",
            Self::Timeout => "upstream_timeout",
            Self::BadResponse(_) => "upstream_bad_response",
            Self::NoExpiry(_) => "upstream_token_expiry_unknown",
            Self::Blocked(_) => "upstream_address_blocked",
            Self::Recipe(_) => "recipe_error",
        }
    }

    /// Seconds the caller should wait, when the cause says.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after } => *retry_after,
            Self::Paced { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Worth another attempt soon (the partner is down or slow), unlike a rejection.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Timeout)
    }

    /// Whether a tenant whose circuit this opened is probed early (once a second across
    /// replicas while callers have no usable token): every failure but a credential rejection
    /// (it waits for an admin) and the partner's own throttling (its Retry-After is honoured).
    /// A partner that sent bad answers, redirects or garbage is used again within about a
    /// second of being fixed.
    pub fn probed_early(&self) -> bool {
        !matches!(
            self,
            Self::RejectedCredentials { .. } | Self::RateLimited { .. } | Self::Paced { .. }
        )
    }

    /// The partner asked for a DPoP nonce (RFC 9449 §8): `error=use_dpop_nonce`.
    pub fn is_use_dpop_nonce(&self) -> bool {
        matches!(
            self,
            Self::RejectedRequest { error: Some(e), .. } | Self::RejectedCredentials { error: Some(e), .. }
                if e == "use_dpop_nonce"
        )
    }

    /// Whether the refresh-token grant failed in a way that calls for the full grant.
    pub fn is_invalid_grant(&self) -> bool {
        matches!(
            self,
            Self::RejectedCredentials { .. } | Self::RejectedRequest { .. }
        )
    }
}

/// Outbound settings.
#[derive(Clone, Debug)]
pub struct IssuerSettings {
    pub allow_insecure: bool,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

/// The outbound client shared by every tenant.
/// The longest partner `Retry-After` the broker honours or passes on (the circuit's cap):
/// a partner announcing `99999999` must not tell callers to go away for three years.
pub const MAX_RETRY_AFTER_S: u64 = 300;

#[derive(Clone)]
pub struct Issuers {
    client: reqwest::Client,
    settings: IssuerSettings,
    /// Clients of tenants with their own TLS settings (a client certificate, a private CA),
    /// keyed by tenant and a hash of those settings: a rotation gets a new client.
    tls_clients: moka::sync::Cache<(TenantId, [u8; 32]), reqwest::Client>,
    /// The latest `DPoP-Nonce` each DPoP tenant's token endpoint gave (RFC 9449 §8).
    nonces: Arc<std::sync::Mutex<HashMap<TenantId, String>>>,
}

/// The partner's `DPoP-Nonce` (`pop::is_nonce`); anything else is ignored.
pub fn dpop_nonce_of(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let v = headers.get("dpop-nonce")?.to_str().ok()?;
    pop::is_nonce(v).then(|| v.to_owned())
}

/// The `htu` of a DPoP proof: the URL without query and fragment (RFC 9449 §4.2).
pub fn htu_of(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// The tenant's DPoP key, when it binds tokens.
pub fn dpop_key(tenant: &Tenant) -> Result<Option<pop::SigningKey>, IssuerError> {
    if !tenant.issuer.dpop {
        return Ok(None);
    }
    crate::tenants::IssuerSpec::dpop_key(&tenant.credentials)
        .ok_or_else(|| IssuerError::Recipe("credential field dpop_private_key is missing".into()))?
        .map(Some)
        .map_err(|e| IssuerError::Recipe(format!("the DPoP key cannot sign: {e}")))
}

fn base_builder(settings: &IssuerSettings) -> reqwest::ClientBuilder {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .redirect(reqwest::redirect::Policy::none())
        // A proxy from the environment would see the real target instead of the address
        // guard: partner calls always go direct.
        .no_proxy()
        .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60));
    if !settings.allow_insecure {
        builder = builder
            .https_only(true)
            .dns_resolver(Arc::new(crate::egress::PublicOnlyResolver));
    }
    builder
}

/// The roots every partner call trusts (reqwest's, the webpki roots).
fn webpki_roots() -> rustls::RootCertStore {
    rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
}

/// rustls on ring with its default protocol versions, trusting `roots`.
fn tls_builder(
    roots: rustls::RootCertStore,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
}

/// The TLS settings of a tenant that has none of its own: the webpki roots, no certificate.
pub fn default_tls_config() -> rustls::ClientConfig {
    tls_builder(webpki_roots()).with_no_client_auth()
}

/// A tenant's own TLS settings: its client certificate (RFC 8705) and the private CA it trusts
/// for its partner, beside the usual (webpki) roots; `None` when it has neither. The one
/// source for both its token requests (`tenant_tls_client`) and its proxied calls.
pub fn tenant_tls_config(tenant: &Tenant) -> Result<Option<rustls::ClientConfig>, IssuerError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let identity = match (
        tenant.credentials.get("tls_certificate"),
        tenant.credentials.get("tls_private_key"),
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        _ => None,
    };
    let ca = tenant.issuer.tls_ca.as_deref();
    if identity.is_none() && ca.is_none() {
        return Ok(None);
    }
    let mut roots = webpki_roots();
    if let Some(ca) = ca {
        let unreadable = || IssuerError::Recipe("issuer.tls_ca cannot be read".into());
        for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots
                .add(cert.map_err(|_| unreadable())?)
                .map_err(|_| unreadable())?;
        }
    }
    let builder = tls_builder(roots);
    let Some((cert, key)) = identity else {
        return Ok(Some(builder.with_no_client_auth()));
    };
    let bad_identity =
        || IssuerError::Recipe("the tenant's TLS client certificate cannot be used".into());
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| bad_identity())?;
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|_| bad_identity())?;
    builder
        .with_client_auth_cert(chain, key)
        .map(Some)
        .map_err(|_| bad_identity())
}

/// A token-request client for a tenant's own TLS settings (`tenant_tls_config`); `None` when
/// it has none.
pub fn tenant_tls_client(
    settings: &IssuerSettings,
    tenant: &Tenant,
) -> Result<Option<reqwest::Client>, IssuerError> {
    let Some(config) = tenant_tls_config(tenant)? else {
        return Ok(None);
    };
    base_builder(settings)
        .use_preconfigured_tls(config)
        .build()
        .map(Some)
        .map_err(|_| IssuerError::Recipe("the tenant's TLS settings cannot be used".into()))
}

/// A hash of what a tenant's TLS client is built from (never kept or shown).
fn tls_settings_hash(tenant: &Tenant) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for part in [
        tenant.credentials.get("tls_certificate"),
        tenant.credentials.get("tls_private_key"),
        tenant.issuer.tls_ca.as_deref(),
    ] {
        h.update(part.unwrap_or("").as_bytes());
        h.update([0]);
    }
    h.finalize().into()
}

impl Issuers {
    pub fn new(settings: &IssuerSettings) -> Self {
        Self {
            client: base_builder(settings)
                .build()
                .expect("the TLS backend initialises"),
            settings: settings.clone(),
            tls_clients: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            nonces: Arc::default(),
        }
    }

    /// The client for `tenant`: the shared one, or its own when it has TLS settings.
    pub fn client_for(&self, tenant: &Tenant) -> Result<reqwest::Client, IssuerError> {
        if tenant.issuer.tls_ca.is_none() && tenant.credentials.get("tls_certificate").is_none() {
            return Ok(self.client.clone());
        }
        let key = (tenant.id.clone(), tls_settings_hash(tenant));
        if let Some(c) = self.tls_clients.get(&key) {
            return Ok(c);
        }
        let client =
            tenant_tls_client(&self.settings, tenant)?.unwrap_or_else(|| self.client.clone());
        self.tls_clients.insert(key, client.clone());
        Ok(client)
    }

    /// Asks the tenant's partner for a token, giving up after `timeout`.
    pub async fn mint(
        &self,
        tenant: &Tenant,
        grant: Grant<'_>,
        timeout: Duration,
    ) -> Result<Minted, IssuerError> {
        let url =
            crate::egress::check_token_url(&tenant.issuer.token_url, self.settings.allow_insecure)
                .map_err(|e| IssuerError::Blocked(e.to_string()))?;
        let dpop = dpop_key(tenant)?;
        let issued_at_ms = now_ms();
        let started = Instant::now();
        let span = tracing::info_span!(
            "partner_call",
            tenant = %tenant.id,
            kind = tenant.issuer.kind.as_str(),
            grant = match grant { Grant::Initial => "initial", Grant::Refresh(_) => "refresh_token" },
            status = tracing::field::Empty,
        );
        let result = self
            .ask(tenant, &grant, url, dpop.as_ref(), timeout, &span)
            .await;
        let _entered = span.enter();
        let elapsed_ms = started.elapsed().as_millis() as u64;
        let doc = result.inspect_err(|e| {
            tracing::warn!(tenant = %tenant.id, kind = tenant.issuer.kind.as_str(), elapsed_ms, error = %e, "token request failed");
        })?;
        let minted = minted_from(tenant, &doc, issued_at_ms, dpop.as_ref())?;
        tracing::info!(tenant = %tenant.id, kind = tenant.issuer.kind.as_str(), elapsed_ms, lifetime_s = (minted.expires_at_ms - issued_at_ms) / 1000, "token minted");
        Ok(minted)
    }

    /// The token request, sent through the tenant's client. A DPoP tenant sends a proof with
    /// the partner's latest nonce, and once more with a new one when the partner answers
    /// `use_dpop_nonce` (RFC 9449 §8); the request is prepared afresh for that (a client
    /// assertion's `jti` is used once).
    async fn ask(
        &self,
        tenant: &Tenant,
        grant: &Grant<'_>,
        url: reqwest::Url,
        dpop: Option<&pop::SigningKey>,
        timeout: Duration,
        span: &tracing::Span,
    ) -> Result<Value, IssuerError> {
        let client = self.client_for(tenant)?;
        let htu = htu_of(&url);
        let mut nonce =
            dpop.and_then(|_| self.nonces.lock().expect("nonces").get(&tenant.id).cloned());
        let mut retried = false;
        loop {
            let prepared =
                recipes::prepare(tenant, grant).map_err(|e| IssuerError::Recipe(e.to_string()))?;
            let mut req = client
                .post(url.clone())
                .header(CONTENT_TYPE, prepared.content_type)
                .header(ACCEPT, "application/json")
                .timeout(timeout);
            for (name, value) in prepared.headers {
                req = req.header(name, value);
            }
            if let Some(key) = dpop {
                let proof = key
                    .dpop_proof("POST", &htu, nonce.as_deref(), None)
                    .map_err(|e| IssuerError::Recipe(format!("the DPoP proof: {e}")))?;
                req = req.header("DPoP", proof);
            }
            let req = req.body(prepared.body.to_vec());
            let (result, new_nonce) =
                tracing::Instrument::instrument(self.exchange(req), span.clone()).await;
            if let (Some(n), Some(_)) = (&new_nonce, dpop) {
                self.nonces
                    .lock()
                    .expect("nonces")
                    .insert(tenant.id.clone(), n.clone());
            }
            match result {
                Err(e)
                    if dpop.is_some()
                        && !retried
                        && e.is_use_dpop_nonce()
                        && new_nonce.is_some() =>
                {
                    tracing::info!(tenant = %tenant.id, "partner asked for a DPoP nonce; sending the proof again with it");
                    nonce = new_nonce;
                    retried = true;
                }
                other => return other,
            }
        }
    }

    /// One exchange: the answer (or why it failed) and the `DPoP-Nonce` the partner sent.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
    ) -> (Result<Value, IssuerError>, Option<String>) {
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return (Err(classify_transport(e)), None),
        };
        let nonce = dpop_nonce_of(resp.headers());
        (Self::answer(resp).await, nonce)
    }

    async fn answer(resp: reqwest::Response) -> Result<Value, IssuerError> {
        let status = resp.status().as_u16();
        tracing::Span::current().record("status", status);
        let retry_after = resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| s.min(MAX_RETRY_AFTER_S));
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        let body = read_capped(resp).await?;
        let doc: Option<Value> = serde_json::from_slice(&body).ok();
        if (200..300).contains(&status) {
            return doc.ok_or_else(|| {
                IssuerError::BadResponse(format!(
                    "HTTP {status} but the answer is not JSON (content-type {})",
                    content_type.as_deref().unwrap_or("missing")
                ))
            });
        }
        let error = doc
            .as_ref()
            .and_then(|d| d.get("error"))
            .and_then(Value::as_str);
        Err(classify(status, error, retry_after))
    }
}

/// The token a successful answer carries, with its expiry worked out (the earliest of
/// `expires_in` and the JWT `exp`, else the tenant's default) and its DPoP binding.
fn minted_from(
    tenant: &Tenant,
    doc: &Value,
    issued_at_ms: i64,
    dpop: Option<&pop::SigningKey>,
) -> Result<Minted, IssuerError> {
    let extracted = recipes::extract(&tenant.issuer, doc)
        .map_err(|e| IssuerError::BadResponse(e.to_string()))?;
    let jwt_exp = expiry::jwt_exp(secrecy::ExposeSecret::expose_secret(
        &extracted.access_token,
    ));
    let expires_at_ms = expiry::expires_at_ms(
        issued_at_ms,
        extracted.expires_in,
        jwt_exp,
        tenant.issuer.default_ttl_seconds,
    )
    .map_err(|e| match e {
        expiry::ExpiryError::Unknown => IssuerError::NoExpiry(e.to_string()),
        expiry::ExpiryError::AlreadyExpired => IssuerError::BadResponse(e.to_string()),
    })?;
    Ok(Minted {
        access_token: extracted.access_token,
        refresh_token: extracted.refresh_token,
        issued_at_ms,
        expires_at_ms,
        dpop_jkt: dpop.map(|k| k.thumbprint().to_owned()),
    })
}

/// The partner's answer body, refused past `MAX_ANSWER_BYTES` (announced or received).
async fn read_capped(
    mut resp: reqwest::Response,
) -> Result<zeroize::Zeroizing<Vec<u8>>, IssuerError> {
    let too_large = || {
        IssuerError::BadResponse(format!(
            "the answer is larger than {} KiB",
            MAX_ANSWER_BYTES / 1024
        ))
    };
    if resp
        .content_length()
        .is_some_and(|l| l > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = zeroize::Zeroizing::new(Vec::new());
    while let Some(chunk) = resp.chunk().await.map_err(classify_transport)? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What a non-2xx answer means: the status, the OAuth `error` code if the body had a sane one
/// (lower-case letters and `_`, at most 64; anything else is ignored, never echoed), and the
/// clamped `Retry-After`.
pub fn classify(status: u16, error: Option<&str>, retry_after: Option<u64>) -> IssuerError {
    let error = error
        .filter(|e| {
            (1..=64).contains(&e.len()) && e.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        })
        .map(str::to_owned);
    match status {
        429 => IssuerError::RateLimited { retry_after },
        401 | 403 => IssuerError::RejectedCredentials { status, error },
        400..=499
            if matches!(
                error.as_deref(),
                Some("invalid_client" | "invalid_grant" | "unauthorized_client" | "access_denied")
            ) =>
        {
            IssuerError::RejectedCredentials { status, error }
        }
        400..=499 => IssuerError::RejectedRequest { status, error },
        300..=399 => IssuerError::BadResponse(format!(
            "HTTP {status} redirect (redirects are not followed)"
        )),
        _ => IssuerError::Unavailable(format!("HTTP {status}")),
    }
}

/// What decides a failed exchange's class deep in its error chain, for either client: the
/// egress guard's refusal, or a timed-out connection setup.
pub fn cause_of(e: &(dyn std::error::Error + 'static)) -> Option<IssuerError> {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<crate::egress::BlockedAddress>() {
            return Some(IssuerError::Blocked(s.to_string()));
        }
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return Some(IssuerError::Timeout);
        }
        source = s.source();
    }
    None
}

/// A failed exchange with a partner's token endpoint (not an answer) as an `IssuerError`.
pub fn classify_transport(e: reqwest::Error) -> IssuerError {
    if let Some(class) = cause_of(&e) {
        return class;
    }
    if e.is_timeout() {
        IssuerError::Timeout
    } else if e.is_connect() {
        IssuerError::Unavailable("connection failed".into())
    } else {
        IssuerError::Unavailable("the connection broke".into())
    }
}

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn answers_are_classified_by_status_and_oauth_error() {
        let cases: &[(u16, Option<&str>, Option<u64>, &str)] = &[
            (429, None, Some(30), "upstream_rate_limited"),
            (401, None, None, "upstream_rejected_credentials"),
            (403, Some("whatever"), None, "upstream_rejected_credentials"),
            (
                400,
                Some("invalid_client"),
                None,
                "upstream_rejected_credentials",
            ),
            (
                400,
                Some("invalid_grant"),
                None,
                "upstream_rejected_credentials",
            ),
            (
                400,
                Some("unauthorized_client"),
                None,
                "upstream_rejected_credentials",
            ),
            (
                400,
                Some("access_denied"),
                None,
                "upstream_rejected_credentials",
            ),
            (
                400,
                Some("invalid_scope"),
                None,
                "upstream_rejected_request",
            ),
            (
                400,
                Some("Invalid Client <script>"),
                None,
                "upstream_rejected_request",
            ),
            (404, None, None, "upstream_rejected_request"),
            (302, None, None, "upstream_bad_response"),
            (500, None, None, "upstream_unavailable"),
            (503, Some("invalid_client"), None, "upstream_unavailable"),
        ];
        for (status, error, retry, code) in cases {
            assert_eq!(
                classify(*status, *error, *retry).code(),
                *code,
                "{status} {error:?}"
            );
        }
        assert_eq!(classify(429, None, Some(30)).retry_after(), Some(30));
        // An error code that is not a plain OAuth code is dropped, never echoed.
        let odd = classify(400, Some("Invalid Client <script>"), None).to_string();
        assert!(!odd.contains("script"), "{odd}");
    }
}
