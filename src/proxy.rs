//! Proxy mode's rules, free of the HTTP server: which request paths are safe, the partner URL
//! they map to, which headers cross in each direction, and the per-tenant targets (the
//! tenant's proxy settings with its fixed headers opened), cached briefly.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use moka::sync::Cache;
use secrecy::ExposeSecret;
use url::Url;

use crate::tenants::proxy::{ProxySpec, HOP_BY_HOP};
use crate::tenants::{StoreError, TenantId, TenantStore};

/// Request bodies up to this size are buffered, so a request can be retried once with a fresh
/// token after a 401; larger ones stream and are not retried.
pub const RETRY_BUFFER_BYTES: u64 = 1024 * 1024;

/// How long a tenant's proxy settings are used without reading them again (a change takes
/// effect at once on the replica that made it, within this on the others).
pub const TARGET_TTL: Duration = Duration::from_secs(5);

/// Why a proxied path was refused (fixed reasons; the path is never echoed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path has an empty segment (a leading or doubled '/')")]
    EmptySegment,
    #[error("the path has a '.' or '..' segment (also when percent-encoded)")]
    DotSegment,
    #[error("the path has an encoded '/' or '\\', a backslash or an '@'")]
    Separator,
    #[error("the path has control characters or a malformed percent escape")]
    Malformed,
    #[error("the path leaves the tenant's base URL")]
    Escapes,
    #[error("the path has a ';' path parameter (also when percent-encoded)")]
    PathParameter,
    #[error("the path has a double-encoded reserved or dot character (a '%25' escape)")]
    DoubleEncoded,
    #[error("the path is not valid UTF-8 once decoded")]
    NotUtf8,
}

/// Whether a byte, percent-encoded inside an already decoded segment, would let a partner that
/// decodes twice see a separator, a dot, a parameter or a control character.
fn dangerous_when_decoded_twice(b: u8) -> bool {
    b < 0x20 || b == 0x7f || b"%./\\;:?#[]@!$&'()*+,=".contains(&b)
}

/// A decoded segment that still holds `%HH` escapes of dangerous bytes (`%252e` arrived).
fn double_encoded(decoded: &[u8]) -> bool {
    decoded.windows(3).any(|w| {
        w[0] == b'%'
            && w[1].is_ascii_hexdigit()
            && w[2].is_ascii_hexdigit()
            && u8::from_str_radix(std::str::from_utf8(&w[1..]).unwrap_or("00"), 16)
                .is_ok_and(dangerous_when_decoded_twice)
    })
}

fn valid_escapes(raw: &str) -> bool {
    let b = raw.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
            {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The partner URL for a proxied request: `base` + `/` + `raw_path` (as received, still
/// percent-encoded) + `?` + `raw_query` byte for byte. `raw_path` must be a plain relative
/// path: no empty, `.` or `..` segment (decoded), no encoded separators, backslashes, `@`
/// or control characters, no `;` path parameters (Tomcat and Spring resolve `..;/`), no
/// double-encoded reserved or dot characters (`%252e`, for partners that decode twice), valid
/// UTF-8 once decoded (`%c0%ae` is an overlong '.'); the result must keep `base`'s scheme,
/// host, port and path prefix.
pub fn partner_url(base: &Url, raw_path: &str, raw_query: Option<&str>) -> Result<Url, PathError> {
    if raw_path
        .bytes()
        .any(|b| b < 0x20 || b == 0x7f || b == b'\\' || b == b'@')
        || !valid_escapes(raw_path)
        || raw_query.is_some_and(|q| q.bytes().any(|b| b < 0x20 || b == 0x7f || b == b'#'))
    {
        return Err(if raw_path.contains(['\\', '@']) {
            PathError::Separator
        } else {
            PathError::Malformed
        });
    }
    if !raw_path.is_empty() {
        for segment in raw_path.split('/') {
            if segment.is_empty() {
                return Err(PathError::EmptySegment);
            }
            let decoded: Vec<u8> = percent_encoding::percent_decode_str(segment).collect();
            if decoded == b"." || decoded == b".." {
                return Err(PathError::DotSegment);
            }
            if decoded.contains(&b';') {
                return Err(PathError::PathParameter);
            }
            if std::str::from_utf8(&decoded).is_err() {
                return Err(PathError::NotUtf8);
            }
            if double_encoded(&decoded) {
                return Err(PathError::DoubleEncoded);
            }
            if decoded.iter().any(|&b| matches!(b, b'/' | b'\\' | b'@')) {
                return Err(PathError::Separator);
            }
            if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) {
                return Err(PathError::Malformed);
            }
        }
    }
    let prefix = base.path().trim_end_matches('/');
    // The base's own scheme, host and port, with only the path and query replaced: parsing
    // the whole URL again (host, IDNA) was 9 % of a proxied call's instructions.
    let mut url = base.clone();
    url.set_path(&format!("{prefix}/{raw_path}"));
    url.set_query(raw_query);
    let same_origin = url.scheme() == base.scheme()
        && url.host() == base.host()
        && url.port_or_known_default() == base.port_or_known_default();
    let keeps_prefix = url
        .path()
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.starts_with('/'));
    if !same_origin || !keeps_prefix {
        return Err(PathError::Escapes);
    }
    Ok(url)
}

/// The header names a `Connection` header lists (they are hop-by-hop too).
pub fn connection_listed(values: &[&str]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Headers that some servers and gateways trust to rewrite the path or method, or as the
/// client's address: a caller must not steer the partner with them.
const NOT_FORWARDED: &[&str] = &[
    "true-client-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-original-host",
    "x-original-method",
    "x-host",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Whether a caller's request header goes on to the partner. Never: the caller's credentials
/// (`Authorization`, `Cookie`), hop-by-hop headers, `Proxy-*`, forwarding headers from the
/// caller, its request id (the broker sends its own), or the tenant's auth or fixed headers.
pub fn forwards_request_header(name: &str, listed: &[String], target: &Target) -> bool {
    let n = name.to_ascii_lowercase();
    !(HOP_BY_HOP.contains(&n.as_str())
        || listed.contains(&n)
        || n == "authorization"
        || n == "cookie"
        || n.starts_with("proxy-")
        || n.starts_with("x-forwarded-")
        || n == "forwarded"
        || n == "x-real-ip"
        || NOT_FORWARDED.contains(&n.as_str())
        || n == "x-request-id"
        || n == target.auth_header.as_str()
        || target.headers.iter().any(|(h, _)| h.as_str() == n))
}

/// Whether a partner's answer header goes back to the caller (not `Set-Cookie`, not
/// hop-by-hop).
pub fn forwards_response_header(name: &str, listed: &[String]) -> bool {
    let n = name.to_ascii_lowercase();
    !(HOP_BY_HOP.contains(&n.as_str()) || listed.contains(&n) || n == "set-cookie")
}

/// Whether a partner's answer says the token was refused: 401, or 403 with a Bearer
/// challenge saying `error="invalid_token"` (RFC 6750 §3.1).
pub fn token_refused(status: u16, headers: &HeaderMap) -> bool {
    status == 401
        || status == 403
            && headers
                .get_all(hyper::header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    let v = v.to_ascii_lowercase();
                    v.trim_start().starts_with("bearer") && v.contains("invalid_token")
                })
}

/// A tenant's proxy target, ready to use: the parsed base URL and the fixed headers opened.
pub struct Target {
    pub spec: ProxySpec,
    pub base: Url,
    pub auth_header: HeaderName,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The tenant's DPoP key: every call carries a fresh proof (RFC 9449 §7).
    pub dpop: Option<crate::pop::SigningKey>,
    /// The partner API's latest `DPoP-Nonce` for this tenant.
    pub dpop_nonce: std::sync::Mutex<Option<String>>,
    /// The tenant's own client when it presents a certificate or trusts a private CA.
    pub tls_client: Option<Client>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("base", &self.base.as_str())
            .field("headers", &self.spec.header_names)
            .field("dpop", &self.dpop.is_some())
            .finish()
    }
}

/// Whether a partner API's answer asks for a DPoP nonce (RFC 9449 §9): 401 with a `DPoP`
/// challenge saying `error="use_dpop_nonce"`.
pub fn asks_for_dpop_nonce(status: u16, headers: &HeaderMap) -> bool {
    status == 401
        && headers
            .get_all(hyper::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.to_ascii_lowercase().contains("use_dpop_nonce"))
}

/// A proxied request's body: kept whole (replayable after a 401) or streamed.
pub type OutBody = http_body_util::Either<
    http_body_util::Full<hyper::body::Bytes>,
    http_body_util::StreamBody<
        futures_util::stream::BoxStream<
            'static,
            Result<hyper::body::Frame<hyper::body::Bytes>, std::io::Error>,
        >,
    >,
>;

/// Proxy mode's HTTP client: hyper's pooled client over rustls, dialling through the egress
/// guard. It follows no redirects and reads no proxy from the environment; timeouts are per
/// call (the tenant's `timeout_ms`, to the answer's head).
pub type Client = hyper_util::client::legacy::Client<
    ConnectTimeout<
        hyper_rustls::HttpsConnector<
            hyper_util::client::legacy::connect::HttpConnector<crate::egress::GuardedResolver>,
        >,
    >,
    OutBody,
>;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bounds a connection's whole setup (resolution, TCP, TLS) by the connect timeout, as
/// reqwest's did; hyper's own bounds only the TCP connect. Paid per new connection, not per
/// call.
#[derive(Clone)]
pub struct ConnectTimeout<C> {
    inner: C,
    limit: Duration,
}

impl<C> tower_service::Service<hyper::Uri> for ConnectTimeout<C>
where
    C: tower_service::Service<hyper::Uri>,
    C::Error: Into<BoxError>,
    C::Future: Send + 'static,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let (connecting, limit) = (self.inner.call(uri), self.limit);
        Box::pin(async move {
            match tokio::time::timeout(limit, connecting).await {
                Ok(done) => done.map_err(Into::into),
                Err(_) => Err(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection to the partner was not set up in time",
                )) as BoxError),
            }
        })
    }
}

/// A proxy client: https only through the public-address resolver unless insecure issuers are
/// allowed; `tls` is a tenant's own TLS settings, else the webpki roots.
pub fn client(
    connect_timeout: Duration,
    allow_insecure: bool,
    tls: Option<rustls::ClientConfig>,
) -> Client {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new_with_resolver(
        crate::egress::GuardedResolver {
            guard: !allow_insecure,
        },
    );
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let tls = tls.unwrap_or_else(crate::issuers::default_tls_config);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls);
    let https = if allow_insecure {
        builder.https_or_http().enable_http1().wrap_connector(http)
    } else {
        builder.https_only().enable_http1().wrap_connector(http)
    };
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .pool_timer(hyper_util::rt::TokioTimer::new())
        .build(ConnectTimeout {
            inner: https,
            limit: connect_timeout,
        })
}

/// A failed proxied exchange (not an answer) as an `IssuerError`.
pub fn classify(e: &hyper_util::client::legacy::Error) -> crate::issuers::IssuerError {
    use crate::issuers::IssuerError;
    if let Some(class) = crate::issuers::cause_of(e) {
        return class;
    }
    if e.is_connect() {
        IssuerError::Unavailable("connection failed".into())
    } else {
        IssuerError::Unavailable("the connection broke".into())
    }
}

/// A tenant's signing keys, opened: its `private_key` (client assertions, the JWT bearer
/// grant) and its DPoP key, and whether it publishes their public halves.
#[derive(Debug, Default)]
pub struct TenantKeys {
    pub private: Option<crate::pop::SigningKey>,
    pub dpop: Option<crate::pop::SigningKey>,
    pub publish: bool,
}

impl TenantKeys {
    /// The public JWK set (RFC 7517 §5): each key with `kid`, `alg` and `use`.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = [&self.private, &self.dpop]
            .into_iter()
            .flatten()
            .map(|k| k.public_jwk("sig"))
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

/// Tenants' proxy targets, read from the store and cached for `TARGET_TTL`, and the clients
/// that call them; tenants' signing keys, cached the same way.
pub struct Targets {
    store: TenantStore,
    cache: Cache<TenantId, Option<Arc<Target>>, foldhash::fast::RandomState>,
    keys: Cache<TenantId, Arc<TenantKeys>, foldhash::fast::RandomState>,
    connect_timeout: Duration,
    allow_insecure: bool,
    /// Proxied requests in flight per caller (`BROKER_PROXY_CALLER_CONCURRENCY`).
    pub in_flight: Arc<InFlight>,
}

/// Proxied requests each caller has in flight, up to a cap: one caller's slow requests cannot
/// take every socket and file descriptor the others need.
pub struct InFlight {
    cap: usize,
    /// foldhash: caller ids are authenticated, and SipHash here was 3 % of a proxied call's
    /// instructions.
    counts:
        std::sync::Mutex<std::collections::HashMap<Arc<str>, usize, foldhash::fast::RandomState>>,
}

/// One proxied request in flight; dropping it (when the answer's body has been sent, or the
/// request failed) frees its place.
pub struct InFlightGuard {
    owner: Arc<InFlight>,
    caller: Arc<str>,
}

impl InFlight {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            cap: cap.max(1),
            counts: Default::default(),
        })
    }

    /// A place for one more request of `caller`, or `None` at the cap.
    pub fn enter(self: &Arc<Self>, caller: &Arc<str>) -> Option<InFlightGuard> {
        let mut counts = self.counts.lock().expect("in-flight counts");
        let n = counts.entry(caller.clone()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(InFlightGuard {
            owner: self.clone(),
            caller: caller.clone(),
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().expect("in-flight counts");
        if let Some(n) = counts.get_mut(&self.caller) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.caller);
            }
        }
    }
}

thread_local! {
    /// One client per server worker thread: a pooled connection is driven by the runtime that
    /// opened it, so sharing one pool across workers' runtimes made every other call hop
    /// threads (p99 36 ms at 32 connections on two workers).
    static CLIENT: std::cell::OnceCell<Client> = const { std::cell::OnceCell::new() };
}

impl Targets {
    pub fn new(
        store: TenantStore,
        connect_timeout: Duration,
        allow_insecure: bool,
        caller_concurrency: usize,
    ) -> Self {
        Self {
            connect_timeout,
            allow_insecure,
            in_flight: InFlight::new(caller_concurrency),
            store,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TARGET_TTL)
                .build_with_hasher(Default::default()),
            keys: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(TARGET_TTL)
                .build_with_hasher(Default::default()),
        }
    }

    /// The tenant's signing keys (`NotFound` if there is no such tenant). `fresh` reads the
    /// store past the cache (a token bound to a key this replica has not seen yet).
    pub async fn keys(&self, id: &TenantId, fresh: bool) -> Result<Arc<TenantKeys>, StoreError> {
        if !fresh {
            if let Some(hit) = self.keys.get(id) {
                return Ok(hit);
            }
        }
        let tenant = self.store.tenant(id).await?;
        let unusable = |what: &str| StoreError::Corrupt(format!("{what} of tenant {id}"));
        let private = tenant
            .issuer
            .private_key(&tenant.credentials)
            .transpose()
            .map_err(|_| unusable("private_key"))?;
        let dpop = crate::tenants::IssuerSpec::dpop_key(&tenant.credentials)
            .transpose()
            .map_err(|_| unusable("dpop_private_key"))?;
        let keys = Arc::new(TenantKeys {
            private,
            dpop,
            publish: tenant.issuer.publish_jwks,
        });
        self.keys.insert(id.clone(), keys.clone());
        Ok(keys)
    }

    /// The tenant's target; `Ok(None)` if it has no proxy settings, `NotFound` if there is no
    /// such tenant.
    pub async fn get(&self, id: &TenantId) -> Result<Option<Arc<Target>>, StoreError> {
        if let Some(hit) = self.cache.get(id) {
            return Ok(hit);
        }
        let tenant = self.store.tenant(id).await?;
        let target = match tenant.proxy.clone() {
            None => None,
            Some(spec) => {
                let base = Url::parse(&spec.base_url)
                    .map_err(|_| StoreError::Corrupt(format!("proxy base URL of tenant {id}")))?;
                let mut headers = Vec::new();
                for (name, value) in tenant.proxy_headers.iter() {
                    let (Ok(n), Ok(mut v)) = (
                        HeaderName::from_bytes(name.as_bytes()),
                        HeaderValue::from_str(value.expose_secret()),
                    ) else {
                        return Err(StoreError::Corrupt(format!("proxy header of tenant {id}")));
                    };
                    v.set_sensitive(true);
                    headers.push((n, v));
                }
                let unusable = |what: &str| StoreError::Corrupt(format!("{what} of tenant {id}"));
                Some(Arc::new(Target {
                    auth_header: spec.auth_header(),
                    base,
                    headers,
                    spec,
                    dpop: crate::issuers::dpop_key(&tenant).map_err(|_| unusable("DPoP key"))?,
                    dpop_nonce: Default::default(),
                    tls_client: crate::issuers::tenant_tls_config(&tenant)
                        .map_err(|_| unusable("TLS settings"))?
                        .map(|tls| client(self.connect_timeout, self.allow_insecure, Some(tls))),
                }))
            }
        };
        self.cache.insert(id.clone(), target.clone());
        Ok(target)
    }

    /// Sends `req` with `target`'s own client when it has TLS settings, else with this
    /// thread's (a pooled connection is driven by the runtime that opened it).
    pub fn send(
        &self,
        target: &Target,
        req: hyper::Request<OutBody>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        match &target.tls_client {
            Some(c) => c.request(req),
            None => CLIENT.with(|c| {
                c.get_or_init(|| client(self.connect_timeout, self.allow_insecure, None))
                    .request(req)
            }),
        }
    }

    /// Drops a cached target (after the tenant changed on this replica).
    pub fn forget(&self, id: &TenantId) {
        self.cache.invalidate(id);
        self.keys.invalidate(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(base: &str, path: &str, query: Option<&str>) -> Result<String, PathError> {
        partner_url(&Url::parse(base).unwrap(), path, query).map(|u| u.to_string())
    }

    #[test]
    fn in_flight_places_per_caller() {
        let f = InFlight::new(2);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let one = f.enter(&a).unwrap();
        let _two = f.enter(&a).unwrap();
        assert!(f.enter(&a).is_none(), "a is at its cap");
        assert!(f.enter(&b).is_some(), "b is not affected");
        drop(one);
        assert!(f.enter(&a).is_some(), "a place freed");
    }

    #[test]
    fn plain_paths_map_under_the_base() {
        let base = "https://api.partner.example.com/v2/";
        assert_eq!(
            url(base, "accounts/42", Some("a=1&b=%20x")).unwrap(),
            "https://api.partner.example.com/v2/accounts/42?a=1&b=%20x"
        );
        assert_eq!(
            url("https://api.partner.example.com", "x%20y", None).unwrap(),
            "https://api.partner.example.com/x%20y"
        );
        assert_eq!(
            url(base, "", None).unwrap(),
            "https://api.partner.example.com/v2/"
        );
        assert_eq!(
            url("http://127.0.0.1:9000/api", "a.b/c..d/...", None).unwrap(),
            "http://127.0.0.1:9000/api/a.b/c..d/..."
        );
        // A '?' that reached the path stays in the path: it cannot start the query.
        assert_eq!(
            url(base, "a?b", Some("c=1")).unwrap(),
            "https://api.partner.example.com/v2/a%3Fb?c=1"
        );
    }

    #[test]
    fn tricks_never_reach_the_network() {
        let base = "https://api.partner.example.com/v2";
        for (path, why) in [
            ("../admin", PathError::DotSegment),
            ("a/../../admin", PathError::DotSegment),
            ("%2e%2e/admin", PathError::DotSegment),
            ("%2E%2e/admin", PathError::DotSegment),
            ("./a", PathError::DotSegment),
            ("a/%2e", PathError::DotSegment),
            ("..%2fadmin", PathError::Separator),
            ("a%2F..%2F..%2Fadmin", PathError::Separator),
            ("%5c..%5cadmin", PathError::Separator),
            ("a\\b", PathError::Separator),
            ("@evil.example.com/x", PathError::Separator),
            ("a%40evil.example.com", PathError::Separator),
            ("/evil.example.com/x", PathError::EmptySegment),
            ("a//b", PathError::EmptySegment),
            ("a/", PathError::EmptySegment),
            ("a%00b", PathError::Malformed),
            ("a%0d%0aX-Injected:%201", PathError::Malformed),
            ("a\tb", PathError::Malformed),
            ("a%zzb", PathError::Malformed),
            ("a%2", PathError::Malformed),
            ("..;/..;/x", PathError::PathParameter),
            ("a/..;/b", PathError::PathParameter),
            ("a;jsessionid=1/b", PathError::PathParameter),
            ("a%3bb", PathError::PathParameter),
            ("%252e%252e/x", PathError::DoubleEncoded),
            ("a%252fb", PathError::DoubleEncoded),
            ("a%255cb", PathError::DoubleEncoded),
            ("a%2525b", PathError::DoubleEncoded),
            ("%c0%ae%c0%ae/x", PathError::NotUtf8),
            ("a%ffb", PathError::NotUtf8),
        ] {
            assert_eq!(url(base, path, None), Err(why), "{path}");
        }
        assert_eq!(url(base, "a", Some("x#frag")), Err(PathError::Malformed));
    }

    #[test]
    fn headers_that_never_cross() {
        let spec: ProxySpec = serde_json::from_value(
            serde_json::json!({"base_url": "https://a.example.com", "auth_header": "x-api-key"}),
        )
        .unwrap();
        let target = Target {
            auth_header: spec.auth_header(),
            base: Url::parse(&spec.base_url).unwrap(),
            headers: vec![(
                HeaderName::from_static("x-product-instance-id"),
                HeaderValue::from_static("p"),
            )],
            spec,
            dpop: None,
            dpop_nonce: Default::default(),
            tls_client: None,
        };
        let listed = connection_listed(&["close, X-Secret-Hop"]);
        for h in [
            "Authorization",
            "Cookie",
            "Host",
            "Connection",
            "Keep-Alive",
            "TE",
            "Transfer-Encoding",
            "Upgrade",
            "Proxy-Authorization",
            "Proxy-Anything",
            "X-Forwarded-For",
            "X-Forwarded-Host",
            "Forwarded",
            "X-Secret-Hop",
            "True-Client-IP",
            "X-Original-URL",
            "X-Rewrite-URL",
            "X-HTTP-Method-Override",
            "X-Api-Key",
            "X-Product-Instance-Id",
            "X-Request-Id",
        ] {
            assert!(!forwards_request_header(h, &listed, &target), "{h}");
        }
        for h in ["Content-Type", "Accept", "X-Custom", "If-None-Match"] {
            assert!(forwards_request_header(h, &listed, &target), "{h}");
        }
        assert!(!forwards_response_header("Set-Cookie", &[]));
        assert!(!forwards_response_header("X-Secret-Hop", &listed));
        assert!(forwards_response_header("ETag", &[]));
    }

    #[test]
    fn what_counts_as_a_refused_token() {
        let mut h = HeaderMap::new();
        assert!(token_refused(401, &h));
        assert!(!token_refused(403, &h));
        h.insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(
                "Bearer error=\"invalid_token\", error_description=\"expired\"",
            ),
        );
        assert!(token_refused(403, &h));
        assert!(!token_refused(500, &h));
    }
}
