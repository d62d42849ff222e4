//! HTTP handlers only: each module registers its own routes; shared request plumbing
//! (JSON bodies with limits, problem rendering for framework errors, request spans) is here.

pub mod admin;
pub mod console;
pub mod extract;
pub mod oauth;
pub mod ops;
pub mod pop;
pub mod problem;
pub mod proxy;
pub mod ratelimit;
pub mod token;

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::{ErrorHandlerResponse, Next};
use actix_web::{web, HttpMessage, HttpRequest, ResponseError};
use futures_util::StreamExt;
use serde_json::Value;
use tracing::Instrument;

use crate::audit::Audit;
use crate::auth::admin_token::AdminToken;
use crate::auth::jwt::JwtVerifier;
use crate::auth::{Authenticator, CallerStore, StaticToken};
use crate::broker::Broker;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::tenants::{HealthStore, TenantStore};
use problem::{ApiError, PROBLEM_JSON};
use ratelimit::CallerLimiter;

/// Shared state every handler receives.
pub struct AppState {
    pub broker: Arc<Broker>,
    pub audit: Arc<Audit>,
    pub limiter: CallerLimiter,
    /// Failed admin authentications per source address (`BROKER_ADMIN_AUTH_FAILURES_*`); a
    /// request with the right credentials is never counted or throttled.
    pub admin_failures: CallerLimiter,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub store: TenantStore,
    pub callers: CallerStore,
    pub health: HealthStore,
    /// Proxy mode's per-tenant targets and client.
    pub proxy: crate::proxy::Targets,
    pub auth: Authenticator,
    pub admin: AdminToken,
    /// The admin port when `BROKER_ADMIN_LISTEN` separates it.
    pub admin_port: Option<u16>,
    /// `BROKER_METRICS_TOKEN`: `/metrics` is open unless it is set.
    pub metrics_token: StaticToken,
    pub metrics: Arc<Metrics>,
    pub settings: Arc<Settings>,
}

/// Longest request path accepted (the longest real one is under 200 bytes).
pub const MAX_PATH_BYTES: usize = 2048;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a request body may take to arrive, whole: a client trickling an authenticated
/// body a byte at a time holds a connection and a task only this long.
pub const BODY_READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a JSON body: 415 unless the content type is JSON (it is required), 413 past the cap,
/// 408 if it does not arrive within `BODY_READ_DEADLINE`, 400 if malformed.
pub async fn read_json(req: &HttpRequest, payload: web::Payload) -> Result<Value, ApiError> {
    let body = read_body(req, payload, "application/json").await?;
    let mut value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::InvalidJson(format!(
            "{} at line {} column {}",
            match e.classify() {
                serde_json::error::Category::Eof => "unexpected end of input",
                _ => "syntax error",
            },
            e.line(),
            e.column()
        ))
    })?;
    integral_numbers_as_integers(&mut value);
    Ok(value)
}

/// A JSON body as `T` (415, 413, 408 and malformed JSON as `read_json`); a body that does
/// not fit `T` is 400 `invalid_request` naming the first field that does not (the path, never
/// the value sent).
pub async fn read_typed<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    read_typed_or(req, payload, |e| ApiError::InvalidRequest {
        detail: e.to_string(),
        field: (!e.field.is_empty()).then_some(e.field),
    })
    .await
}

/// `read_typed` for a route whose ill-fitting bodies have their own code (a caller's are
/// 422 `invalid_caller`): `misfit` turns the field and message into the answer.
pub async fn read_typed_or<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: web::Payload,
    misfit: impl FnOnce(crate::tenants::SpecError) -> ApiError,
) -> Result<T, ApiError> {
    let value = read_json(req, payload).await?;
    crate::tenants::spec::from_value(value, "").map_err(misfit)
}

/// `253.0` is the integer 253 to JSON Schema (and to every encoder that writes all numbers as
/// floats): whole numbers written with a fraction are read as integers, so `"grace_seconds":
/// 253.0` means what it says instead of failing a whole-number check.
fn integral_numbers_as_integers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            // Exactly representable whole numbers only (|f| < 2^53).
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                *value = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(integral_numbers_as_integers),
        Value::Object(fields) => fields.values_mut().for_each(integral_numbers_as_integers),
        _ => {}
    }
}

/// Reads a body of the given media type (for JSON, `+json` types too): 415 on another type
/// (Content-Type is required), 413 past `MAX_BODY_BYTES`, 408 past `BODY_READ_DEADLINE`. The
/// bytes are wiped when dropped (bodies carry secrets).
pub async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    media_type: &'static str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ApiError> {
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    let json = media_type == "application/json";
    if !(essence == media_type || json && essence.ends_with("+json")) {
        return Err(ApiError::UnsupportedMediaType(if json {
            "send the body as application/json (Content-Type is required)"
        } else {
            "send the body as application/x-www-form-urlencoded (Content-Type is required)"
        }));
    }
    let body = tokio::time::timeout(BODY_READ_DEADLINE, read_capped(payload))
        .await
        .map_err(|_| ApiError::BodyTimeout(BODY_READ_DEADLINE.as_secs()))??;
    Ok(zeroize::Zeroizing::new(body.to_vec()))
}

async fn read_capped(mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::invalid("the body could not be read", None))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(ApiError::PayloadTooLarge(MAX_BODY_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Replaces framework error answers (unknown route, wrong method, bad query) with problems.
pub fn problem_for_framework_errors<B: MessageBody + 'static>(
    res: ServiceResponse<B>,
) -> actix_web::Result<ErrorHandlerResponse<B>> {
    // Our own answers (problems, and JSON such as /readyz's 503) and a partner's answers in
    // proxy mode pass through untouched.
    let ours = res.headers().get(header::CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes() == PROBLEM_JSON.as_bytes() || v.as_bytes().starts_with(b"application/json")
    }) || res.response().extensions().contains::<proxy::Relayed>();
    if ours {
        return Ok(ErrorHandlerResponse::Response(res.map_into_left_body()));
    }
    let err = match res.status().as_u16() {
        404 => ApiError::RouteNotFound,
        405 => ApiError::MethodNotAllowed,
        413 => ApiError::PayloadTooLarge(MAX_BODY_BYTES),
        400..=499 => ApiError::invalid("the request is malformed", None),
        _ => ApiError::Internal(format!("framework error {}", res.status())),
    };
    let (req, _) = res.into_parts();
    let mut resp = err.error_response();
    if let Some(allow) = matches!(err, ApiError::MethodNotAllowed)
        .then(|| allowed_methods(route_template(req.path())))
        .flatten()
    {
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    }
    Ok(ErrorHandlerResponse::Response(
        ServiceResponse::new(req, resp).map_into_right_body(),
    ))
}

/// Every route template, for metric labels.
pub const ROUTES: &[&str] = &[
    "/v1/tenants/{tenant_id}/token",
    "/v1/tenants/{tenant_id}/token/invalidate",
    "/v1/tenants/{tenant_id}/proxy/{path}",
    "/v1/tenants/{tenant_id}/dpop-proof",
    "/v1/tenants/{tenant_id}/jwks.json",
    "/admin/v1/tenants",
    "/admin/v1/tenants/{tenant_id}",
    "/admin/v1/tenants/{tenant_id}/credentials",
    "/admin/v1/tenants/{tenant_id}/test",
    "/admin/v1/tenants/{tenant_id}/jwks",
    "/admin/v1/callers",
    "/admin/v1/callers/{caller_id}",
    "/admin/v1/callers/{caller_id}/rotate-key",
    "/admin/v1/audit",
    "/admin/v1/kinds",
    "/admin/console",
    "/admin/console/console.js",
    "/admin/console/console.css",
    "/healthz",
    "/readyz",
    "/metrics",
    "/oauth2/token",
    "/.well-known/oauth-authorization-server",
];

/// The methods a route answers: the `Allow` header of its 405s (RFC 9110 §15.5.6). Held to
/// openapi.yaml by the contract test.
pub fn allowed_methods(template: &str) -> Option<&'static str> {
    Some(match template {
        "/v1/tenants/{tenant_id}/token" => "GET",
        "/v1/tenants/{tenant_id}/token/invalidate" | "/v1/tenants/{tenant_id}/dpop-proof" => "POST",
        "/v1/tenants/{tenant_id}/proxy/{path}" => "GET, POST, PUT, PATCH, DELETE",
        "/admin/v1/tenants" | "/admin/v1/callers" => "GET, POST",
        "/admin/v1/tenants/{tenant_id}" => "GET, PATCH, DELETE",
        "/admin/v1/tenants/{tenant_id}/credentials" => "PUT",
        "/admin/v1/tenants/{tenant_id}/test" | "/admin/v1/callers/{caller_id}/rotate-key" => "POST",
        "/admin/v1/callers/{caller_id}" => "PATCH, DELETE",
        "/oauth2/token" => "POST",
        "/admin/v1/audit"
        | "/admin/v1/kinds"
        | "/v1/tenants/{tenant_id}/jwks.json"
        | "/admin/v1/tenants/{tenant_id}/jwks"
        | "/admin/console"
        | "/admin/console/console.js"
        | "/admin/console/console.css"
        | "/healthz"
        | "/readyz"
        | "/metrics"
        | "/.well-known/oauth-authorization-server" => "GET",
        _ => return None,
    })
}

/// The route template a path falls under (`unmatched` if none): the router's own
/// `match_pattern` would run its regexes a second time on every request.
pub fn route_template(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|route| falls_under(route, path))
        .copied()
        .unwrap_or("unmatched")
}

/// Whether `path` falls under `route`, byte by byte: a `{name}` segment takes one non-empty
/// segment, a final `{path}` whatever is left. A route that differs early costs a few bytes
/// (splitting both into segments was 3 % of a token fetch, 8 % of `/oauth2/token`).
fn falls_under(route: &str, path: &str) -> bool {
    let (route, path) = (route.as_bytes(), path.as_bytes());
    let (mut r, mut p) = (0, 0);
    while r < route.len() {
        if route[r] != b'{' {
            if path.get(p) != Some(&route[r]) {
                return false;
            }
            r += 1;
            p += 1;
            continue;
        }
        let name_end = r + route[r..]
            .iter()
            .position(|&b| b == b'}')
            .expect("a closed {name}");
        if &route[r..=name_end] == b"{path}" && name_end + 1 == route.len() {
            return true;
        }
        let segment = path[p..].iter().take_while(|&&b| b != b'/').count();
        if segment == 0 {
            return false;
        }
        r = name_end + 1;
        p += segment;
    }
    p == path.len()
}

/// The request id of a request (`X-Request-Id` if sane, else generated).
#[derive(Clone)]
pub struct RequestId(pub String);

fn request_id(req: &ServiceRequest) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            (1..=128).contains(&v.len())
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map(str::to_owned)
        .unwrap_or_else(crate::crypto::random_hex::<12>)
}

/// The request id the middleware assigned to `req`.
pub fn request_id_of(req: &HttpRequest) -> Option<String> {
    req.extensions().get::<RequestId>().map(|r| r.0.clone())
}

/// Whether a path belongs on the admin port.
fn admin_side(path: &str) -> bool {
    path == "/metrics" || path == "/admin" || path.starts_with("/admin/")
}

/// Whether this request came to a port that does not serve its path (404 as if absent). With
/// an admin port (`BROKER_ADMIN_LISTEN`), the admin API, the console and `/metrics` answer only
/// there, the token API, proxy mode and OAuth only on the main port; health on both.
fn wrong_port(req: &ServiceRequest, admin_port: Option<u16>) -> bool {
    let Some(admin) = admin_port else {
        return false;
    };
    let path = req.path();
    if matches!(path, "/healthz" | "/readyz") {
        return false;
    }
    let on_admin_port = req.app_config().local_addr().port() == admin;
    on_admin_port != admin_side(path)
}

/// Per-request span, request id echo and HTTP metrics, labelled by route template.
pub async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if req.path().len() > MAX_PATH_BYTES {
        // Before routing: matching a 24 KB path against every route costs ~2 ms of CPU.
        return Err(ApiError::UriTooLong(MAX_PATH_BYTES).into());
    }
    let started = Instant::now();
    let state = req.app_data::<web::Data<AppState>>().cloned();
    if wrong_port(&req, state.as_ref().and_then(|s| s.admin_port)) {
        return Err(ApiError::RouteNotFound.into());
    }
    let route = route_template(req.path());
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    };
    let id = request_id(&req);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method,
        route,
        tenant = tracing::field::Empty,
        caller = tracing::field::Empty,
    );
    let mut res = next.call(req).instrument(span.clone()).await?;
    let status = res.status();
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut()
            .insert(header::HeaderName::from_static("x-request-id"), v);
    }
    let elapsed = started.elapsed();
    if let Some(state) = state {
        state
            .metrics
            .http_served(method, route, status.as_u16(), elapsed);
    }
    span.in_scope(|| {
        tracing::debug!(
            status = status.as_u16(),
            elapsed_us = elapsed.as_micros() as u64,
            "served"
        )
    });
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_templates() {
        for r in ROUTES {
            let concrete = r
                .replace("{tenant_id}", "acme")
                .replace("{caller_id}", "cl_1")
                .replace("{path}", "a/b/c");
            assert_eq!(route_template(&concrete), *r);
        }
        for other in [
            "/",
            "/healthz/",
            "/v1/tenants//token",
            "/v1/tenants/a/token/x",
            "/admin",
            "/nope",
        ] {
            assert_eq!(route_template(other), "unmatched", "{other}");
        }
        // Proxy mode: any rest after `/proxy/`, even none; the tenant segment must be there.
        let proxy = "/v1/tenants/{tenant_id}/proxy/{path}";
        for path in [
            "/v1/tenants/a/proxy/",
            "/v1/tenants/a/proxy//x/",
            "/v1/tenants/a/proxy/token",
        ] {
            assert_eq!(route_template(path), proxy, "{path}");
        }
        for path in [
            "/v1/tenants//proxy/x",
            "/v1/tenants/a/proxy",
            "/v1/tenants/a/b/proxy/x",
        ] {
            assert_eq!(route_template(path), "unmatched", "{path}");
        }
    }
}
