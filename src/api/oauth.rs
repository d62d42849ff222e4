//! The OAuth 2.0 face for callers: `POST /oauth2/token` (RFC 6749 §4.4 client credentials,
//! RFC 8693 token exchange for JWT callers, RFC 8707 resource indicators naming the tenant) and
//! RFC 8414 discovery. The token handed out is the one `GET …/token` hands out, by the same
//! path (`token::hand_out`): same scope check, rate limit, audit and metrics.

use std::borrow::Cow;
use std::fmt;

use actix_web::body::BoxBody;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use base64::Engine;
use secrecy::ExposeSecret;
use serde::Serialize;

use super::problem::ApiError;
use super::token::{check_scope, hand_out, no_store, parse_min_ttl, with_expires_in};
use super::{read_body, AppState};
use crate::auth::{api_keys, Caller};
use crate::cache::CachedToken;
use crate::tenants::TenantId;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/oauth2/token").route(web::post().to(token)))
        .service(
            web::resource("/.well-known/oauth-authorization-server").route(web::get().to(metadata)),
        );
}

const TOKEN_PATH: &str = "/oauth2/token";

/// `resource=urn:token-broker:tenant:<tenant_id>` names the tenant (RFC 8707).
pub const RESOURCE_PREFIX: &str = "urn:token-broker:tenant:";
/// `scope=tenant:<tenant_id>`, for clients that cannot send `resource`.
pub const SCOPE_PREFIX: &str = "tenant:";

const CLIENT_CREDENTIALS: &str = "client_credentials";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// What unknown tenants and tenants outside the caller's scope both get: it reveals nothing.
const TARGET_REFUSED: &str = "the tenant is unknown or outside this client's scope";

/// An RFC 6749 §5.2 error answer.
#[derive(Debug)]
pub struct OAuthError {
    status: StatusCode,
    error: &'static str,
    description: Cow<'static, str>,
    retry_after: Option<u64>,
    /// `invalid_client` without a Basic challenge: the client authenticated in the body
    /// (`client_secret_post`), not with the Authorization header (RFC 6749 §5.2).
    no_challenge: bool,
}

impl OAuthError {
    fn new(status: u16, error: &'static str, description: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status: StatusCode::from_u16(status).expect("a valid status"),
            error,
            description: description.into(),
            retry_after: None,
            no_challenge: false,
        }
    }

    fn invalid_request(description: impl Into<Cow<'static, str>>) -> Self {
        Self::new(400, "invalid_request", description)
    }

    fn invalid_client(description: &'static str) -> Self {
        Self::new(401, "invalid_client", description)
    }

    fn invalid_target(description: &'static str) -> Self {
        Self::new(400, "invalid_target", description)
    }

    fn invalid_scope(description: &'static str) -> Self {
        Self::new(400, "invalid_scope", description)
    }

    /// A broker problem in OAuth terms: partner and service failures keep their status and
    /// carry the problem `code` first in the description.
    fn from_problem(e: ApiError) -> Self {
        let status = e.status_code().as_u16();
        let error = match (&e, status) {
            (ApiError::TenantNotFound | ApiError::Forbidden(_), _) => {
                return Self::invalid_target(TARGET_REFUSED)
            }
            (ApiError::Unauthorized(_), _) => "invalid_client",
            (_, 429) | (_, 502..=504) => "temporarily_unavailable",
            (_, 500..) => "server_error",
            _ => "invalid_request",
        };
        let status = match status {
            401 | 429 | 500.. => status,
            _ => 400,
        };
        Self {
            status: StatusCode::from_u16(status).expect("a valid status"),
            error,
            description: format!("{}: {}", e.code(), e.detail()).into(),
            retry_after: e.retry_after(),
            no_challenge: false,
        }
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.error, self.description)
    }
}

impl From<ApiError> for OAuthError {
    fn from(e: ApiError) -> Self {
        Self::from_problem(e)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_description: &'a str,
}

/// RFC 6749 §5.2 allows only printable ASCII other than `"` and `\` in a description.
fn description_chars(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' | '\\' => '\'',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

impl ResponseError for OAuthError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        if self.status.is_server_error() {
            tracing::warn!(status = self.status.as_u16(), error = self.error, description = %self.description, "oauth token request failed");
        }
        let description = description_chars(&self.description);
        let body = ErrorBody {
            error: self.error,
            error_description: &description,
        };
        let mut resp = HttpResponse::build(self.status);
        resp.content_type("application/json")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .insert_header((header::PRAGMA, "no-cache"));
        if self.error == "invalid_client" && !self.no_challenge {
            resp.insert_header((
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"token-broker\""),
            ));
        }
        if let Some(s) = self.retry_after {
            resp.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        resp.body(serde_json::to_string(&body).expect("serialises"))
    }
}

/// A parsed token request body. Parameters without a value count as absent (RFC 6749 §3.1);
/// any parameter but `resource` may appear once (RFC 8707 allows several `resource`s).
/// Names and values borrow from the body unless they had to be decoded; decoded values are
/// wiped when the form is dropped (the body itself is wiped by its owner).
struct Form<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl Drop for Form<'_> {
    fn drop(&mut self) {
        for (_, value) in &mut self.0 {
            if let Cow::Owned(decoded) = value {
                zeroize::Zeroize::zeroize(decoded);
            }
        }
    }
}

/// Most parameters a token request may carry (a real one has under ten). Parsing stops at the
/// first one over, so a body of thousands of names costs what a short one does (the duplicate
/// check below is a scan of at most this many).
const MAX_FORM_PARAMS: usize = 32;

impl<'a> Form<'a> {
    fn parse(body: &'a [u8]) -> Result<Self, OAuthError> {
        let mut form = Form(Vec::new());
        for (n, (k, v)) in url::form_urlencoded::parse(body).enumerate() {
            if n == MAX_FORM_PARAMS {
                return Err(OAuthError::invalid_request(format!(
                    "a token request carries at most {MAX_FORM_PARAMS} parameters"
                )));
            }
            if v.is_empty() {
                continue;
            }
            if k != "resource" && form.0.iter().any(|(seen, _)| *seen == k) {
                return Err(OAuthError::invalid_request(format!(
                    "the parameter {} appears more than once",
                    description_chars(&k).chars().take(64).collect::<String>()
                )));
            }
            form.0.push((k, v));
        }
        Ok(form)
    }

    fn get<'s>(&'s self, name: &'s str) -> Option<&'s str> {
        self.all(name).next()
    }

    fn all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s str> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
}

/// Client credentials as presented: `client_secret_basic` or `client_secret_post`.
struct ClientCredentials {
    id: String,
    secret: zeroize::Zeroizing<String>,
    /// Sent in the body (`client_secret_post`): a refusal carries no Basic challenge.
    in_body: bool,
}

/// The `Authorization: Basic` credentials, form-urldecoded (RFC 6749 §2.3.1).
fn basic_credentials(req: &HttpRequest) -> Result<Option<ClientCredentials>, OAuthError> {
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let malformed = || OAuthError::invalid_client("malformed Basic client credentials");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, encoded) = value.split_once(' ').ok_or_else(malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(OAuthError::invalid_client(
            "authenticate the client with HTTP Basic (client_secret_basic) or client_id and client_secret in the body (client_secret_post)",
        ));
    }
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|_| malformed())?,
    );
    let text = std::str::from_utf8(&decoded).map_err(|_| malformed())?;
    let (id, secret) = text.split_once(':').ok_or_else(malformed)?;
    let unescape = |s: &str| -> Option<String> {
        let plus = match s.contains('+') {
            true => Cow::Owned(s.replace('+', " ")),
            false => Cow::Borrowed(s),
        };
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8()
            .ok()
            .map(Cow::into_owned)
    };
    Ok(Some(ClientCredentials {
        id: unescape(id).ok_or_else(malformed)?,
        secret: zeroize::Zeroizing::new(unescape(secret).ok_or_else(malformed)?),
        in_body: false,
    }))
}

/// The client's credentials from the header or the body, never both (RFC 6749 §2.3).
fn client_credentials(
    req: &HttpRequest,
    form: &Form<'_>,
) -> Result<Option<ClientCredentials>, OAuthError> {
    let basic = basic_credentials(req)?;
    let (post_id, post_secret) = (form.get("client_id"), form.get("client_secret"));
    match (basic, post_id, post_secret) {
        (Some(_), _, Some(_)) => Err(OAuthError::invalid_request(
            "use one client authentication method: HTTP Basic or client_secret in the body, not both",
        )),
        (Some(basic), Some(id), None) if id != basic.id => Err(OAuthError::invalid_request(
            "client_id in the body differs from the one in the Authorization header",
        )),
        (Some(basic), _, None) => Ok(Some(basic)),
        (None, Some(id), Some(secret)) => Ok(Some(ClientCredentials {
            id: id.to_owned(),
            secret: zeroize::Zeroizing::new(secret.to_owned()),
            in_body: true,
        })),
        (None, None, Some(_)) => Err(OAuthError::invalid_request(
            "client_secret needs its client_id",
        )),
        (None, _, None) => Ok(None),
    }
}

/// Longest client id kept in an audit row.
const SHOWN_CLIENT_ID_CHARS: usize = 64;

/// A presented client id as an audit row shows it: quoted, printable ASCII, cut at 64
/// characters. (It is what the sender claimed, not an identity.)
fn shown_client_id(id: &str) -> String {
    let mut shown: String = description_chars(id)
        .chars()
        .take(SHOWN_CLIENT_ID_CHARS)
        .collect();
    if id.chars().count() > SHOWN_CLIENT_ID_CHARS {
        shown.push('…');
    }
    format!("'{shown}'")
}

/// The caller a client id and secret (an API key) stand for; the id must be the key's caller.
async fn authenticate(
    state: &AppState,
    client: ClientCredentials,
    req: &HttpRequest,
) -> Result<Caller, OAuthError> {
    let refused = |reason: &'static str| {
        let detail = format!("{reason} (client_id {})", shown_client_id(&client.id));
        super::extract::audit_refusal(state, req, "token.fetch", None, &detail);
        let mut e = OAuthError::invalid_client("client authentication failed");
        e.no_challenge = client.in_body;
        e
    };
    if !client.secret.starts_with(api_keys::PREFIX) {
        return Err(refused("invalid credentials"));
    }
    let caller = match state.auth.api_key(&client.secret).await {
        Ok(caller) => caller,
        Err(crate::auth::AuthError::Unauthorized(reason)) => return Err(refused(reason)),
        Err(e) => return Err(ApiError::from(e).into()),
    };
    if *caller.id != *client.id {
        return Err(refused("client_id is not the key's caller"));
    }
    Ok((*caller).clone())
}

/// RFC 8693: the subject token is a JWT from the organisation's IdP, verified exactly as a
/// Bearer JWT caller is.
async fn exchange_subject(
    state: &AppState,
    form: &Form<'_>,
    req: &HttpRequest,
) -> Result<Caller, OAuthError> {
    let Some(verifier) = &state.jwt else {
        return Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            "token exchange needs JWT callers: this broker has no BROKER_JWT_JWKS_URL",
        ));
    };
    if form.get("actor_token").is_some() {
        return Err(OAuthError::invalid_request(
            "delegation (actor_token) is not supported",
        ));
    }
    if form
        .get("requested_token_type")
        .is_some_and(|t| t != TYPE_ACCESS_TOKEN)
    {
        return Err(OAuthError::invalid_request(
            "requested_token_type can only be urn:ietf:params:oauth:token-type:access_token",
        ));
    }
    let subject = form
        .get("subject_token")
        .ok_or_else(|| OAuthError::invalid_request("subject_token is required"))?;
    match form.get("subject_token_type") {
        Some(TYPE_JWT | TYPE_ACCESS_TOKEN) => {}
        Some(_) => {
            return Err(OAuthError::invalid_request(
                "subject_token_type must be urn:ietf:params:oauth:token-type:jwt (or :access_token) for a JWT",
            ))
        }
        None => return Err(OAuthError::invalid_request("subject_token_type is required")),
    }
    if subject.len() > 16 * 1024 {
        return Err(OAuthError::invalid_request(
            "the subject token is not valid",
        ));
    }
    verifier.verify(subject).await.map_err(|reason| {
        tracing::info!(reason = %reason, "subject token refused");
        super::extract::audit_refusal(
            state,
            req,
            "token.fetch",
            None,
            "token exchange: the subject token is not valid",
        );
        OAuthError::invalid_request("the subject token is not valid")
    })
}

/// The one tenant a request names, by `resource` (RFC 8707) or `scope=tenant:<id>`.
fn target(form: &Form<'_>) -> Result<TenantId, OAuthError> {
    let mut resources = form.all("resource");
    let by_resource = match (resources.next(), resources.next()) {
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_target(
                "name exactly one tenant per request",
            ))
        }
        (Some(r), None) => Some(
            r.strip_prefix(RESOURCE_PREFIX)
                .and_then(|id| TenantId::parse(id).ok())
                .ok_or(OAuthError::invalid_target(
                    "resource must be urn:token-broker:tenant:<tenant_id>",
                ))?,
        ),
        (None, _) => None,
    };
    let by_scope = match form.get("scope") {
        None => None,
        Some(scope) => {
            let mut tenants = scope.split(' ').filter(|s| !s.is_empty()).map(|s| {
                s.strip_prefix(SCOPE_PREFIX)
                    .and_then(|id| TenantId::parse(id).ok())
                    .ok_or(OAuthError::invalid_scope(
                        "the only scope is tenant:<tenant_id>",
                    ))
            });
            match (tenants.next(), tenants.next()) {
                (Some(_), Some(_)) => {
                    return Err(OAuthError::invalid_scope(
                        "name exactly one tenant per request",
                    ))
                }
                (Some(t), None) => Some(t?),
                (None, _) => None,
            }
        }
    };
    match (by_resource, by_scope) {
        (Some(a), Some(b)) if a != b => Err(OAuthError::invalid_target(
            "resource and scope name different tenants",
        )),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Err(OAuthError::invalid_target(
            "name the tenant: resource=urn:token-broker:tenant:<tenant_id> (or scope=tenant:<tenant_id>)",
        )),
    }
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_in: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    issued_token_type: Option<&'static str>,
}

/// Long because it follows RFC 6749 §4.4 and RFC 8693 in their order: parse, authenticate the
/// client, pick the grant, name the tenant, hand out.
async fn token(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, OAuthError> {
    let body = read_body(&req, payload, "application/x-www-form-urlencoded").await?;
    let form = Form::parse(&body)?;
    let refused = |e: OAuthError| {
        if e.error == "invalid_client" {
            super::extract::audit_refusal(&state, &req, "token.fetch", None, &e.description);
        }
        e
    };
    let client = client_credentials(&req, &form).map_err(refused)?;
    let grant = form
        .get("grant_type")
        .ok_or_else(|| OAuthError::invalid_request("grant_type is required"))?;
    // `via`: what the audit entry says of how the token left (and, for an exchange, which
    // client asked for it besides the subject it is handed to).
    let (caller, via) = match grant {
        CLIENT_CREDENTIALS => {
            let client = client
                .ok_or_else(|| {
                    OAuthError::invalid_client(
                        "client authentication is required: client_secret_basic or client_secret_post",
                    )
                })
                .map_err(refused)?;
            (authenticate(&state, client, &req).await?, "oauth2".into())
        }
        TOKEN_EXCHANGE => {
            // Client authentication is optional here; credentials that are sent must be valid.
            let client = match client {
                Some(client) => Some(authenticate(&state, client, &req).await?),
                None => None,
            };
            let subject = exchange_subject(&state, &form, &req).await?;
            let via = match client {
                Some(c) => format!("oauth2 token exchange, client {}", c.name),
                None => "oauth2 token exchange".to_string(),
            };
            (subject, via)
        }
        _ => {
            return Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                "grant_type must be client_credentials or urn:ietf:params:oauth:grant-type:token-exchange",
            ))
        }
    };
    let span = tracing::Span::current();
    span.record("caller", &*caller.name);
    let id = target(&form)?;
    span.record("tenant", id.as_str());
    check_scope(&state, &caller, &id, "token.fetch", &req)?;
    let min_ttl = parse_min_ttl(form.get("min_ttl"))?;
    let token = hand_out(&state, &caller, &id, min_ttl, Some(&via), &req).await?;
    Ok(no_store(HttpResponse::Ok()).body(answer(&token, grant == TOKEN_EXCHANGE)))
}

/// The RFC 6749 §5.1 answer (`issued_token_type` after `expires_in` for an exchange).
fn answer(token: &CachedToken, exchanged: bool) -> Vec<u8> {
    let tail = match exchanged {
        true => format!(r#","issued_token_type":"{TYPE_ACCESS_TOKEN}""#),
        false => String::new(),
    };
    with_expires_in(token, &token.memo.oauth_prefix, &tail, || {
        serde_json::to_string(&TokenAnswer {
            access_token: token.access_token.expose_secret(),
            token_type: token.token_type(),
            expires_in: 0,
            issued_token_type: None,
        })
    })
}

/// The issuer: `BROKER_PUBLIC_URL`, else derived from this request (`false`): the scheme and
/// host a trusted proxy (`BROKER_TRUSTED_PROXIES`) forwarded, else the connection's own
/// scheme (the broker speaks plain HTTP) and the `Host` it was sent.
fn issuer(state: &AppState, req: &HttpRequest) -> (String, bool) {
    if let Some(url) = &state.settings.public_url {
        return (url.clone(), true);
    }
    let trusted = req.peer_addr().is_some_and(|peer| {
        state
            .settings
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer.ip()))
    });
    if trusted {
        let info = req.connection_info();
        return (format!("{}://{}", info.scheme(), info.host()), false);
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_else(|| req.app_config().host().to_owned());
    (format!("http://{host}"), false)
}

#[derive(Serialize)]
struct Metadata<'a> {
    issuer: &'a str,
    token_endpoint: String,
    grant_types_supported: Vec<&'static str>,
    token_endpoint_auth_methods_supported: [&'static str; 2],
    response_types_supported: [&'static str; 0],
}

async fn metadata(state: web::Data<AppState>, req: HttpRequest) -> HttpResponse {
    let (issuer, configured) = issuer(&state, &req);
    let mut grants = vec![CLIENT_CREDENTIALS];
    if state.jwt.is_some() {
        grants.push(TOKEN_EXCHANGE);
    }
    let mut resp = HttpResponse::Ok();
    if !configured {
        // Derived from this request: no cache on the way may keep it for another.
        resp.insert_header((header::CACHE_CONTROL, "no-store"));
    }
    resp.json(Metadata {
        token_endpoint: format!("{issuer}{TOKEN_PATH}"),
        issuer: &issuer,
        grant_types_supported: grants,
        token_endpoint_auth_methods_supported: ["client_secret_basic", "client_secret_post"],
        response_types_supported: [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(body: &str) -> Form<'_> {
        Form::parse(body.as_bytes()).unwrap()
    }

    fn target_of(body: &str) -> Result<String, &'static str> {
        target(&form(body))
            .map(|t| t.to_string())
            .map_err(|e| e.error)
    }

    #[test]
    fn the_tenant_comes_from_resource_or_scope() {
        assert_eq!(
            target_of("resource=urn%3Atoken-broker%3Atenant%3Aacme").unwrap(),
            "acme"
        );
        assert_eq!(target_of("scope=tenant%3Aacme").unwrap(), "acme");
        assert_eq!(
            target_of("resource=urn:token-broker:tenant:acme&scope=tenant:acme").unwrap(),
            "acme"
        );
        for (body, error) in [
            ("", "invalid_target"),
            (
                "resource=urn:token-broker:tenant:a&resource=urn:token-broker:tenant:b",
                "invalid_target",
            ),
            ("resource=https://api.example.com", "invalid_target"),
            ("resource=urn:token-broker:tenant:", "invalid_target"),
            (
                "resource=urn:token-broker:tenant:a&scope=tenant:b",
                "invalid_target",
            ),
            ("scope=tenant:a+tenant:b", "invalid_scope"),
            ("scope=openid", "invalid_scope"),
            ("scope=tenant:Bad%20Id", "invalid_scope"),
        ] {
            assert_eq!(target_of(body).unwrap_err(), error, "{body}");
        }
    }

    #[test]
    fn parameters_appear_once_and_empty_ones_are_absent() {
        assert!(Form::parse(b"grant_type=a&grant_type=b").is_err());
        let many: Vec<String> = (0..MAX_FORM_PARAMS).map(|i| format!("p{i}=1")).collect();
        assert!(Form::parse(many.join("&").as_bytes()).is_ok());
        let over: Vec<String> = (0..=MAX_FORM_PARAMS).map(|i| format!("p{i}=1")).collect();
        let e = Form::parse(over.join("&").as_bytes()).err().unwrap();
        assert_eq!(e.error, "invalid_request");
        let f = form("grant_type=&scope=x&grant_type=client_credentials");
        assert_eq!(f.get("grant_type"), Some("client_credentials"));
    }

    #[test]
    fn problems_keep_their_meaning() {
        let e = OAuthError::from(ApiError::TenantNotFound);
        let f = OAuthError::from(ApiError::Forbidden("acme".into()));
        assert_eq!((e.error, &e.description), (f.error, &f.description));
        assert_eq!(e.status.as_u16(), 400);
        let e = OAuthError::from(ApiError::Upstream(crate::issuers::IssuerError::Timeout));
        assert_eq!(
            (e.status.as_u16(), e.error),
            (504, "temporarily_unavailable")
        );
        assert!(e.description.starts_with("upstream_timeout: "));
        let e = OAuthError::from(ApiError::CallerRateLimited(3));
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(3)));
        let e = OAuthError::from(ApiError::AuditUnavailable);
        assert_eq!(
            (e.status.as_u16(), e.error),
            (503, "temporarily_unavailable")
        );
        let e = OAuthError::from(ApiError::invalid("min_ttl bad", Some("min_ttl")));
        assert_eq!((e.status.as_u16(), e.error), (400, "invalid_request"));
    }

    #[test]
    fn descriptions_stay_in_the_allowed_characters() {
        assert_eq!(description_chars("a \"b\" \\ é\n"), "a 'b' ' ??");
    }
}
