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
use crate::tenants::{SpecError, StoreError};

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
    #[error("the audit trail cannot record this token, so it is not released")]
    AuditUnavailable,
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(detail: impl Into<String>, field: Option<&str>) -> Self {
        Self::InvalidRequest {
            detail: detail.into(),
            field: field.map(str::to_owned),
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::TenantNotFound => "tenant_not_found",
            Self::CallerNotFound => "caller_not_found",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::InvalidSpec(_) => "invalid_spec",
            Self::InvalidCaller(_) => "invalid_caller",
            Self::Conflict(_) => "conflict",
            Self::PreconditionFailed(_) => "precondition_failed",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::BodyTimeout(_) => "body_timeout",
            Self::UriTooLong(_) => "uri_too_long",
            Self::InvalidateThrottled { .. } => "invalidate_throttled",
            Self::AdminForbidden(_) => "admin_forbidden",
            Self::MinTtlUnsatisfiable(_) => "min_ttl_unsatisfiable",
            Self::Upstream(e) => e.code(),
            Self::Store(e) if matches!(**e, StoreError::Crypto(_)) => "credentials_unreadable",
            Self::Store(_) => "database_unavailable",
            Self::Cache(_) => "cache_unavailable",
            Self::LockWaitTimeout(_) => "lock_wait_timeout",
            Self::CircuitOpen { last, .. } => last.code(),
            Self::AuditUnavailable => "audit_unavailable",
            Self::CallerRateLimited(_) => "rate_limited",
            Self::Internal(_) => "internal_error",
        }
    }

    fn title(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "Authentication required",
            Self::Forbidden(_) => "Forbidden",
            Self::TenantNotFound => "Tenant not found",
            Self::CallerNotFound => "Caller not found",
            Self::RouteNotFound => "Not found",
            Self::MethodNotAllowed => "Method not allowed",
            Self::InvalidJson(_) => "Malformed JSON",
            Self::InvalidRequest { .. } => "Invalid request",
            Self::InvalidSpec(_) => "Invalid tenant spec",
            Self::InvalidCaller(_) => "Invalid caller",
            Self::Conflict(_) => "Conflict",
            Self::PreconditionFailed(_) => "Precondition failed",
            Self::PayloadTooLarge(_) => "Payload too large",
            Self::UnsupportedMediaType(_) => "Unsupported media type",
            Self::BodyTimeout(_) => "Request body too slow",
            Self::UriTooLong(_) => "URI too long",
            Self::InvalidateThrottled { .. } => "Token too young to drop again",
            Self::AdminForbidden(_) => "Not allowed for this admin role",
            Self::MinTtlUnsatisfiable(_) => "min_ttl cannot be satisfied",
            Self::Upstream(IssuerError::RejectedCredentials { .. }) => {
                "The partner rejected the credentials"
            }
            Self::Upstream(IssuerError::RateLimited { .. }) => "The partner is throttling",
            Self::Upstream(IssuerError::Timeout) => "The partner timed out",
            Self::Upstream(IssuerError::Unavailable(_)) => "The partner is unavailable",
            Self::Upstream(_) => "The partner's token endpoint failed",
            Self::Store(e) if matches!(**e, StoreError::Crypto(_)) => {
                "Stored credentials cannot be read"
            }
            Self::Store(_) | Self::Cache(_) => "Service unavailable",
            Self::LockWaitTimeout(_) => "Another replica's mint did not finish in time",
            Self::CircuitOpen { .. } => "The partner's token endpoint is failing",
            Self::AuditUnavailable => "Audit trail unavailable",
            Self::CallerRateLimited(_) => "Too many requests",
            Self::Internal(_) => "Internal error",
        }
    }

    /// The detail shown to the client; server-side failures keep theirs in the log.
    fn detail(&self) -> String {
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
            StoreError::NotFound => Self::TenantNotFound,
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
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::AdminForbidden(_) => StatusCode::FORBIDDEN,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            Self::InvalidateThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::TenantNotFound | Self::CallerNotFound | Self::RouteNotFound => {
                StatusCode::NOT_FOUND
            }
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidJson(_) | Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::InvalidSpec(_) | Self::InvalidCaller(_) | Self::MinTtlUnsatisfiable(_) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::CallerRateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Upstream(e) | Self::CircuitOpen { last: e, .. } => match e {
                IssuerError::RateLimited { .. }
                | IssuerError::Paced { .. }
                | IssuerError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                IssuerError::Timeout => StatusCode::GATEWAY_TIMEOUT,
                _ => StatusCode::BAD_GATEWAY,
            },
            Self::Store(_) | Self::Cache(_) | Self::AuditUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::LockWaitTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        let status = self.status_code();
        if status.is_server_error() {
            tracing::error!(code = self.code(), error = %self, source = ?std::error::Error::source(self).map(|s| s.to_string()), "request failed");
        }
        let field = match self {
            Self::InvalidSpec(e) | Self::InvalidCaller(e) => Some(e.field.as_str()),
            Self::InvalidRequest { field, .. } => field.as_deref(),
            _ => None,
        };
        let code = self.code();
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
        match self {
            Self::Unauthorized(_) => {
                resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
            }
            Self::Upstream(e) => {
                if let Some(s) = e.retry_after() {
                    resp.insert_header((header::RETRY_AFTER, s.to_string()));
                }
            }
            Self::CallerRateLimited(s) | Self::InvalidateThrottled { retry_after: s, .. } => {
                resp.insert_header((header::RETRY_AFTER, s.to_string()));
            }
            Self::CircuitOpen { retry_after, .. } => {
                resp.insert_header((header::RETRY_AFTER, retry_after.to_string()));
            }
            _ => {}
        }
        resp.body(serde_json::to_string(&body).expect("problem serialises"))
    }
}
