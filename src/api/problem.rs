//! RFC 9457 problem details: the one HTTP error type, its stable `code`s, and the mapping
//! from domain errors. 5xx details are logged and hidden from the caller.

use actix_web::body::BoxBody;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use std::sync::Arc;

use crate::broker::BrokerError;
use crate::cache::CacheError;
use crate::issuers::IssuerError;
use crate::tenants::{Entity, SpecError, StoreError};

pub const PROBLEM_JSON: &str = "application/problem+json";

/// Every error an HTTP handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("this caller may not fetch tokens for tenant {0}")]
    Forbidden(String),
    #[error("no tenant with this id")]
    TenantNotFound,
    #[error("no caller with this id")]
    CallerNotFound,
    #[error("no such resource")]
    RouteNotFound,
    #[error(
        "this tenant's tokens are not bound with DPoP (issuer.dpop is off), so they need no proof"
    )]
    DpopNotEnabled,
    #[error("method not allowed on this resource")]
    MethodNotAllowed,
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{detail}")]
    InvalidRequest {
        detail: String,
        field: Option<String>,
    },
    #[error(transparent)]
    InvalidSpec(#[from] SpecError),
    #[error("{0}")]
    InvalidCaller(SpecError),
    #[error("{0}")]
    Conflict(&'static str),
    #[error("the tenant changed since the version in If-Match (now {0})")]
    PreconditionFailed(String),
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("{0}")]
    UnsupportedMediaType(&'static str),
    #[error("the request path is longer than {0} bytes")]
    UriTooLong(usize),
    #[error("the body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("this token was handed out {age_s} s ago and a token of this tenant was already dropped as rejected in the last {window_s} s: the partner's 401 is most likely not this token's fault (check the scope, the partner environment, the request); it stays cached")]
    InvalidateThrottled {
        age_s: u64,
        window_s: u64,
        retry_after: u64,
    },
    #[error("{0}")]
    AdminForbidden(&'static str),
    #[error("{0}")]
    MinTtlUnsatisfiable(String),
    #[error(transparent)]
    Upstream(#[from] IssuerError),
    /// A proxied call's exchange with the partner API failed: the same codes as the token
    /// endpoint's failures, a detail that names the API.
    #[error("{}", partner_api_detail(.0))]
    PartnerApi(IssuerError),
    #[error("the database is unavailable")]
    Store(#[source] Arc<StoreError>),
    #[error("the shared cache is unavailable")]
    Cache(#[source] Arc<CacheError>),
    #[error("{0}")]
    LockWaitTimeout(String),
    #[error("{last}; the broker pauses calls to this partner for {retry_after} s")]
    CircuitOpen { last: IssuerError, retry_after: u64 },
    #[error("this caller exceeds its request rate on this replica; retry in {0} s")]
    CallerRateLimited(u64),
    #[error("too many failed admin authentications from this address; retry in {0} s")]
    AdminAuthThrottled(u64),
    #[error("the audit trail cannot record this token, so it is not released")]
    AuditUnavailable,
    #[error("this tenant has no proxy settings (set proxy.base_url through the admin API)")]
    ProxyNotConfigured,
    #[error("this caller has {0} proxied requests in flight, its limit on this replica; retry when one completes")]
    ProxyConcurrencyLimited(usize),
    #[error("the partner's answer declares {declared} bytes, over the tenant's proxy.max_response_bytes ({max})")]
    ProxyResponseTooLarge { declared: u64, max: u64 },
    #[error("{0}")]
    InvalidProxyPath(crate::proxy::PathError),
    #[error("internal error")]
    Internal(String),
}

/// What a failed exchange with the partner API says (the issuer errors name the token
/// endpoint).
fn partner_api_detail(e: &IssuerError) -> String {
    match e {
        IssuerError::Unavailable(reason) => format!("the partner API is unavailable ({reason})"),
        IssuerError::Blocked(reason) => {
            format!("the partner API's address is not allowed: {reason}")
        }
        other => other.to_string(),
    }
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>, field: Option<&str>) -> Self {
        Self::InvalidRequest {
            detail: detail.into(),
            field: field.map(str::to_owned),
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthorized(_) => Code::Unauthorized,
            Self::Forbidden(_) => Code::Forbidden,
            Self::TenantNotFound => Code::TenantNotFound,
            Self::CallerNotFound => Code::CallerNotFound,
            Self::RouteNotFound => Code::NotFound,
            Self::DpopNotEnabled => Code::DpopNotEnabled,
            Self::MethodNotAllowed => Code::MethodNotAllowed,
            Self::InvalidJson(_) => Code::InvalidJson,
            Self::InvalidRequest { .. } => Code::InvalidRequest,
            Self::InvalidSpec(_) => Code::InvalidSpec,
            Self::InvalidCaller(_) => Code::InvalidCaller,
            Self::Conflict(_) => Code::Conflict,
            Self::PreconditionFailed(_) => Code::PreconditionFailed,
            Self::PayloadTooLarge(_) => Code::PayloadTooLarge,
            Self::UnsupportedMediaType(_) => Code::UnsupportedMediaType,
            Self::BodyTimeout(_) => Code::BodyTimeout,
            Self::UriTooLong(_) => Code::UriTooLong,
            Self::InvalidateThrottled { .. } => Code::InvalidateThrottled,
            Self::AdminForbidden(_) => Code::AdminForbidden,
            Self::MinTtlUnsatisfiable(_) => Code::MinTtlUnsatisfiable,
            Self::Upstream(e) | Self::PartnerApi(e) => Code::of_issuer(e),
            Self::Store(e) if matches!(**e, StoreError::Crypto(_)) => Code::CredentialsUnreadable,
            Self::Store(_) => Code::DatabaseUnavailable,
            Self::Cache(_) => Code::CacheUnavailable,
            Self::LockWaitTimeout(_) => Code::LockWaitTimeout,
            Self::CircuitOpen { last, .. } => Code::of_issuer(last),
            Self::AuditUnavailable => Code::AuditUnavailable,
            Self::CallerRateLimited(_) => Code::RateLimited,
            Self::AdminAuthThrottled(_) => Code::AdminAuthThrottled,
            Self::ProxyNotConfigured => Code::ProxyNotConfigured,
            Self::ProxyConcurrencyLimited(_) => Code::ProxyConcurrencyLimited,
            Self::ProxyResponseTooLarge { .. } => Code::ProxyResponseTooLarge,
            Self::InvalidProxyPath(_) => Code::InvalidProxyPath,
            Self::Internal(_) => Code::InternalError,
        }
    }

    /// The title: the table's, except where the same code has a more precise one.
    fn title(&self) -> &'static str {
        match self {
            Self::CircuitOpen { .. } => "The partner's token endpoint is failing",
            Self::Upstream(IssuerError::Paced { .. }) => "The partner's token endpoint failed",
            other => other.code().title(),
        }
    }

    /// How long the client should wait before trying again, when that is known.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Upstream(e) | Self::PartnerApi(e) => e.retry_after(),
            Self::ProxyConcurrencyLimited(_) => Some(1),
            Self::CallerRateLimited(s)
            | Self::AdminAuthThrottled(s)
            | Self::InvalidateThrottled { retry_after: s, .. } => Some(*s),
            Self::CircuitOpen { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The detail shown to the client; server-side failures keep theirs in the log.
    pub fn detail(&self) -> String {
        match self {
            Self::Store(e) if matches!(**e, StoreError::Crypto(_)) => {
                "the tenant's stored credentials cannot be opened with the configured keys".into()
            }
            Self::Store(_) | Self::Cache(_) => {
                "a backing service is unavailable; retry shortly".into()
            }
            Self::Internal(_) => "an internal error occurred".into(),
            other => other.to_string(),
        }
    }
}

/// Declares the problem codes: each variant with its wire name, HTTP status and title, checked
/// by the compiler (an unknown code does not build, a status outside 400-599 does not build)
/// instead of looked up at run time. Codes are a contract: add freely, never rename.
macro_rules! problem_codes {
    ($($variant:ident = $code:literal, $status:literal, $title:literal;)+) => {
        /// A stable problem code (RFC 9457 `code` member, and the `type` URN's last part).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Code {
            $($variant),+
        }

        impl Code {
            /// Every code, in the table's order.
            pub const ALL: &'static [Code] = &[$(Code::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $code),+
                }
            }

            pub const fn status_u16(self) -> u16 {
                match self {
                    $(Code::$variant => {
                        const _: () = assert!($status >= 400 && $status <= 599);
                        $status
                    }),+
                }
            }

            pub const fn title(self) -> &'static str {
                match self {
                    $(Code::$variant => $title),+
                }
            }
        }
    };
}

problem_codes! {
    Unauthorized = "unauthorized", 401, "Authentication required";
    Forbidden = "forbidden", 403, "Forbidden";
    AdminForbidden = "admin_forbidden", 403, "Not allowed for this admin role";
    TenantNotFound = "tenant_not_found", 404, "Tenant not found";
    CallerNotFound = "caller_not_found", 404, "Caller not found";
    NotFound = "not_found", 404, "Not found";
    DpopNotEnabled = "dpop_not_enabled", 409, "The tenant does not bind tokens with DPoP";
    ProxyNotConfigured = "proxy_not_configured", 404, "Proxy mode is not set up for this tenant";
    InvalidProxyPath = "invalid_proxy_path", 400, "Path not allowed through the proxy";
    ProxyConcurrencyLimited = "proxy_concurrency_limited", 429, "Too many proxied requests in flight for this caller";
    ProxyResponseTooLarge = "proxy_response_too_large", 502, "The partner's answer is over the tenant's limit";
    MethodNotAllowed = "method_not_allowed", 405, "Method not allowed";
    BodyTimeout = "body_timeout", 408, "Request body too slow";
    InvalidJson = "invalid_json", 400, "Malformed JSON";
    InvalidRequest = "invalid_request", 400, "Invalid request";
    InvalidSpec = "invalid_spec", 422, "Invalid tenant spec";
    InvalidCaller = "invalid_caller", 422, "Invalid caller";
    MinTtlUnsatisfiable = "min_ttl_unsatisfiable", 422, "min_ttl cannot be satisfied";
    Conflict = "conflict", 409, "Conflict";
    PreconditionFailed = "precondition_failed", 412, "Precondition failed";
    PayloadTooLarge = "payload_too_large", 413, "Payload too large";
    UriTooLong = "uri_too_long", 414, "URI too long";
    UnsupportedMediaType = "unsupported_media_type", 415, "Unsupported media type";
    RateLimited = "rate_limited", 429, "Too many requests";
    AdminAuthThrottled = "admin_auth_throttled", 429, "Too many failed admin authentications";
    InvalidateThrottled = "invalidate_throttled", 429, "Token too young to drop again";
    UpstreamRejectedCredentials = "upstream_rejected_credentials", 502, "The partner rejected the credentials";
    UpstreamRejectedRequest = "upstream_rejected_request", 502, "The partner's token endpoint failed";
    UpstreamBadResponse = "upstream_bad_response", 502, "The partner's token endpoint failed";
    UpstreamTokenExpiryUnknown = "upstream_token_expiry_unknown", 502, "The partner's token endpoint failed";
    UpstreamAddressBlocked = "upstream_address_blocked", 502, "The partner's token endpoint failed";
    RecipeError = "recipe_error", 502, "The partner's token endpoint failed";
    UpstreamRateLimited = "upstream_rate_limited", 503, "The partner is throttling";
    UpstreamUnavailable = "upstream_unavailable", 503, "The partner is unavailable";
    UpstreamTimeout = "upstream_timeout", 504, "The partner timed out";
    LockWaitTimeout = "lock_wait_timeout", 504, "Another replica's mint did not finish in time";
    CredentialsUnreadable = "credentials_unreadable", 503, "Stored credentials cannot be read";
    DatabaseUnavailable = "database_unavailable", 503, "Service unavailable";
    CacheUnavailable = "cache_unavailable", 503, "Service unavailable";
    AuditUnavailable = "audit_unavailable", 503, "Audit trail unavailable";
    InternalError = "internal_error", 500, "Internal error";
}

impl Code {
    pub fn status(self) -> StatusCode {
        StatusCode::from_u16(self.status_u16()).expect("checked at compile time")
    }

    /// The code a partner failure answers with: the one place an `IssuerError` becomes HTTP.
    pub fn of_issuer(e: &IssuerError) -> Self {
        match e {
            IssuerError::RejectedCredentials { .. } => Self::UpstreamRejectedCredentials,
            IssuerError::RejectedRequest { .. } => Self::UpstreamRejectedRequest,
            IssuerError::RateLimited { .. } | IssuerError::Paced { .. } => {
                Self::UpstreamRateLimited
            }
            IssuerError::Unavailable(_) => Self::UpstreamUnavailable,
            IssuerError::Timeout => Self::UpstreamTimeout,
            IssuerError::BadResponse(_) => Self::UpstreamBadResponse,
            IssuerError::NoExpiry(_) => Self::UpstreamTokenExpiryUnknown,
            IssuerError::Blocked(_) => Self::UpstreamAddressBlocked,
            IssuerError::Recipe(_) => Self::RecipeError,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The table as (code, status, title) rows, for the documents' drift check.
pub fn problems() -> impl Iterator<Item = (&'static str, u16, &'static str)> {
    Code::ALL
        .iter()
        .map(|c| (c.as_str(), c.status_u16(), c.title()))
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::TenantNotFound => Self::TenantNotFound,
            e @ BrokerError::MinTtlUnsatisfiable { .. } => Self::MinTtlUnsatisfiable(e.to_string()),
            BrokerError::Upstream(e) => Self::Upstream(e),
            BrokerError::Store(e) => Self::Store(e),
            BrokerError::Cache(e) => Self::Cache(e),
            e @ BrokerError::LockWaitTimeout(_) => Self::LockWaitTimeout(e.to_string()),
            BrokerError::CircuitOpen { last, retry_after } => {
                Self::CircuitOpen { last, retry_after }
            }
            e @ BrokerError::MintTaskFailed(_) => Self::Internal(e.to_string()),
        }
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        match e {
            crate::auth::AuthError::Unauthorized(reason) => Self::Unauthorized(reason),
            crate::auth::AuthError::Store(e) => e.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(Entity::Tenant) => Self::TenantNotFound,
            StoreError::NotFound(Entity::Caller) => Self::CallerNotFound,
            StoreError::Conflict => Self::Conflict("a record with this id already exists"),
            StoreError::VersionConflict => {
                Self::Conflict("the tenant changed concurrently; read it again and retry")
            }
            other => Self::Store(Arc::new(other)),
        }
    }
}

#[derive(Serialize)]
struct Problem<'a> {
    #[serde(rename = "type")]
    kind: String,
    title: &'a str,
    status: u16,
    detail: String,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code().status()
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::error!(code = self.code().as_str(), error = %self, source = ?std::error::Error::source(self).map(|s| s.to_string()), "request failed");
        }
        let field = match self {
            Self::InvalidSpec(e) | Self::InvalidCaller(e) => Some(e.field.as_str()),
            Self::InvalidRequest { field, .. } => field.as_deref(),
            _ => None,
        };
        let code = self.code().as_str();
        let body = Problem {
            kind: format!("urn:token-broker:problem:{code}"),
            title: self.title(),
            status: status.as_u16(),
            detail: self.detail(),
            code,
            field,
        };
        let mut resp = HttpResponse::build(status);
        resp.insert_header((header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON)))
            .insert_header((header::CACHE_CONTROL, HeaderValue::from_static("no-store")));
        if let Self::Unauthorized(_) = self {
            resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        if let Some(s) = self.retry_after() {
            resp.insert_header((header::RETRY_AFTER, s.to_string()));
        }
        resp.body(serde_json::to_string(&body).expect("problem serialises"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_one_row_and_the_spec_lists_it() {
        let spec =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
        let mut seen = std::collections::HashSet::new();
        for (code, _, title) in problems() {
            assert!(seen.insert(code), "{code} twice");
            assert!(!title.is_empty());
            assert!(spec.contains(code), "openapi.yaml does not list {code}");
        }
    }

    #[test]
    fn partner_failures_answer_with_the_code_the_domain_names() {
        // The domain's codes (health rows, metrics, the circuit) and HTTP's are one vocabulary.
        let all = [
            IssuerError::RejectedCredentials {
                status: 401,
                error: None,
            },
            IssuerError::RejectedRequest {
                status: 400,
                error: None,
            },
            IssuerError::RateLimited { retry_after: None },
            IssuerError::Paced { retry_after: 1 },
            IssuerError::Unavailable(String::new()),
            IssuerError::Timeout,
            IssuerError::BadResponse(String::new()),
            IssuerError::NoExpiry(String::new()),
            IssuerError::Blocked(String::new()),
            IssuerError::Recipe(String::new()),
        ];
        for e in all {
            assert_eq!(Code::of_issuer(&e).as_str(), e.code(), "{e:?}");
        }
    }

    #[test]
    fn statuses_and_titles_users_see_are_unchanged() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (ApiError::Unauthorized("x"), 401, "Authentication required"),
            (
                ApiError::AdminForbidden("x"),
                403,
                "Not allowed for this admin role",
            ),
            (ApiError::UriTooLong(1), 414, "URI too long"),
            (
                ApiError::Upstream(IssuerError::Timeout),
                504,
                "The partner timed out",
            ),
            (
                ApiError::Upstream(IssuerError::Paced { retry_after: 1 }),
                503,
                "The partner's token endpoint failed",
            ),
            (
                ApiError::CircuitOpen {
                    last: IssuerError::Timeout,
                    retry_after: 5,
                },
                504,
                "The partner's token endpoint is failing",
            ),
            (ApiError::AuditUnavailable, 503, "Audit trail unavailable"),
            (ApiError::Internal("x".into()), 500, "Internal error"),
        ];
        for (e, status, title) in cases {
            assert_eq!(e.status_code().as_u16(), status, "{e:?}");
            assert_eq!(e.title(), title, "{e:?}");
        }
    }
}
