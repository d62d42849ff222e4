//! The caller endpoints: fetch a tenant's token, report a token the partner rejected.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::problem::ApiError;
use super::AppState;
use super::{read_typed, request_id_of};
use crate::audit::{Entry, Kind};
use crate::auth::Caller;
use crate::broker::{Invalidation, Source};
use crate::cache::CachedToken;
use crate::tenants::TenantId;
use crate::time::{now_ms, rfc3339};

/// Longest `min_ttl` accepted (one day).
pub const MAX_MIN_TTL: u64 = 86_400;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/v1/tenants/{tenant_id}/token").route(web::get().to(get_token)))
        .service(
            web::resource("/v1/tenants/{tenant_id}/token/invalidate")
                .route(web::post().to(invalidate)),
        );
}

#[derive(Deserialize)]
struct TokenQuery {
    min_ttl: Option<String>,
}

#[derive(Serialize)]
struct TokenAnswer<'a> {
    access_token: &'a str,
    token_type: &'static str,
    expires_at: &'a str,
    expires_in: i64,
}

fn entry(
    caller: &Caller,
    action: &'static str,
    outcome: &'static str,
    tenant: &TenantId,
    req: &HttpRequest,
) -> Entry {
    let mut e = entry_without_request(caller, action, outcome, tenant);
    e.request_id = request_id_of(req);
    e
}

/// An entry that carries no request id (identical ones coalesce into one row).
fn entry_without_request(
    caller: &Caller,
    action: &'static str,
    outcome: &'static str,
    tenant: &TenantId,
) -> Entry {
    let mut e = Entry::new(Kind::Token, action, outcome);
    e.caller = Some(caller.name.clone());
    e.auth_method = Some(caller.method);
    e.tenant = Some(tenant.shared());
    e
}

/// Parses the tenant id and checks the caller's scope (403 before any lookup).
pub(super) fn authorize(
    state: &AppState,
    caller: &Caller,
    raw: &str,
    action: &'static str,
    req: &HttpRequest,
) -> Result<TenantId, ApiError> {
    let id =
        TenantId::parse(raw).map_err(|e| ApiError::invalid(e.to_string(), Some("tenant_id")))?;
    check_scope(state, caller, &id, action, req)?;
    Ok(id)
}

/// 403 unless the caller's scope holds the tenant. The refusal is on the record like anything
/// else an authenticated caller does: when it cannot be, 503 `audit_unavailable`.
pub(super) fn check_scope(
    state: &AppState,
    caller: &Caller,
    id: &TenantId,
    action: &'static str,
    req: &HttpRequest,
) -> Result<(), ApiError> {
    if caller.may_fetch(id.as_str()) {
        return Ok(());
    }
    // A refusal counts against the caller's rate: past it, one row per flush whatever tenant
    // it names, so tenant ids it makes up cannot fill the audit queue.
    if let Err(retry_after) = state.limiter.check(&caller.id) {
        let mut e = entry_without_request(caller, action, "rate_limited", id);
        e.kind = Kind::Refused;
        e.tenant = None;
        e.detail = Some("tenant outside the caller's scope".into());
        record(state, e)?;
        return Err(ApiError::CallerRateLimited(retry_after));
    }
    let mut e = entry(caller, action, "forbidden", id, req);
    e.kind = Kind::Refused;
    e.detail = Some("tenant outside the caller's scope".into());
    record(state, e)?;
    Err(ApiError::Forbidden(id.to_string()))
}

/// Queues an authenticated caller's entry: recorded, or the request is refused (503
/// `audit_unavailable`; never in `best_effort` mode).
pub(super) fn record(state: &AppState, e: Entry) -> Result<(), ApiError> {
    state
        .audit
        .record(e)
        .map_err(|_| ApiError::AuditUnavailable)
}

pub(super) fn parse_min_ttl(raw: Option<&str>) -> Result<u64, ApiError> {
    match raw {
        None => Ok(0),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n <= MAX_MIN_TTL)
            .ok_or_else(|| {
                ApiError::invalid(
                    format!("min_ttl must be a whole number of seconds from 0 to {MAX_MIN_TTL}"),
                    Some("min_ttl"),
                )
            }),
    }
}

async fn get_token(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    query: web::Query<TokenQuery>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id = authorize(&state, &caller, &path, "token.fetch", &req)?;
    let min_ttl = parse_min_ttl(query.min_ttl.as_deref())?;
    let token = hand_out(&state, &caller, &id, min_ttl, None, &req).await?;
    let body = with_expires_in(&token, &token.memo.answer_prefix, "", || {
        serde_json::to_string(&TokenAnswer {
            access_token: token.access_token.expose_secret(),
            token_type: token.token_type(),
            expires_at: token
                .memo
                .expires_at
                .get_or_init(|| rfc3339(token.expires_at_ms)),
            expires_in: 0,
        })
    });
    Ok(no_store(HttpResponse::Ok()).body(body))
}

/// A token answer whose last field is `expires_in`. Everything before its value is serialized
/// once per token into `prefix` (escaping the token was 2 % of a fetch, 4 % of the OAuth
/// endpoint's work); then the seconds left, `tail` (fields after it, if any) and `}`.
/// `serialize` writes the answer with `"expires_in":0` as its last field. The prefix holds the
/// token, so it is wiped with it.
pub(super) fn with_expires_in(
    token: &CachedToken,
    prefix: &std::sync::OnceLock<zeroize::Zeroizing<String>>,
    tail: &str,
    serialize: impl FnOnce() -> serde_json::Result<String>,
) -> Vec<u8> {
    let prefix = prefix.get_or_init(|| {
        let mut full = zeroize::Zeroizing::new(serialize().expect("serialises"));
        let keep = full.len() - "0}".len();
        full.truncate(keep);
        full
    });
    let mut seconds = itoa::Buffer::new();
    let seconds = seconds.format(expires_in(token));
    let mut body = Vec::with_capacity(prefix.len() + seconds.len() + tail.len() + 1);
    body.extend_from_slice(prefix.as_bytes());
    body.extend_from_slice(seconds.as_bytes());
    body.extend_from_slice(tail.as_bytes());
    body.push(b'}');
    body
}

/// Seconds until the token expires (never negative).
pub(super) fn expires_in(token: &CachedToken) -> i64 {
    ((token.expires_at_ms - now_ms()) / 1000).max(0)
}

/// A 200 answer that carries a token: never stored by caches on the way.
pub(super) fn no_store(mut resp: HttpResponseBuilder) -> HttpResponseBuilder {
    // Static values: a `&str` would be checked and copied on every answer.
    resp.insert_header((
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    ))
    .insert_header((
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    ))
    .insert_header((header::PRAGMA, header::HeaderValue::from_static("no-cache")));
    resp
}

/// Hands a tenant's token to an authorized caller: the caller's rate limit, the broker's
/// lookup or mint, the audit entry (no entry, no token, unless `BROKER_AUDIT=best_effort`) and
/// the metrics. The one path behind `GET …/token` and `POST /oauth2/token`; `via` marks the
/// audit entries of the second.
pub(super) async fn hand_out(
    state: &AppState,
    caller: &Caller,
    id: &TenantId,
    min_ttl: u64,
    via: Option<&str>,
    req: &HttpRequest,
) -> Result<Arc<CachedToken>, ApiError> {
    if let Err(retry_after) = state.limiter.check(&caller.id) {
        // Before any lookup: only a tenant known to exist gets a series.
        if state.broker.knows_tenant(id) {
            state
                .metrics
                .token_request(id.as_str(), "caller_rate_limited");
        }
        // Without a request id: a caller over its limit costs a row per flush, not per request.
        let mut e = entry_without_request(caller, "token.fetch", "rate_limited", id);
        e.detail = via.map(Into::into);
        record(state, e)?;
        return Err(ApiError::CallerRateLimited(retry_after));
    }
    let (token, source) = match state.broker.token(id, min_ttl).await {
        Ok(ok) => ok,
        Err(e) => {
            let e = ApiError::from(e);
            if !matches!(e, ApiError::TenantNotFound) {
                state.metrics.token_request(id.as_str(), e.code().as_str());
            }
            let mut entry = entry(caller, "token.fetch", e.code().as_str(), id, req);
            entry.detail = via.map(Into::into);
            record(state, entry)?;
            return Err(e);
        }
    };
    // Successful fetches carry no request id: identical ones are coalesced into one row.
    let mut e = entry_without_request(caller, "token.fetch", "ok", id);
    e.detail = via.map(Into::into);
    e.source = Some(source);
    e.fingerprint = Some(token.audit_fingerprint(state.store.keys()).clone());
    if state.audit.record(e).is_err() {
        state
            .metrics
            .token_request(id.as_str(), "audit_unavailable");
        return Err(ApiError::AuditUnavailable);
    }
    match source {
        Source::Cache => {
            token
                .memo
                .hit_counter
                .get_or_init(|| state.metrics.cache_hit_counter(id.as_str()))
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Source::Minted => state.metrics.token_request(id.as_str(), source.as_str()),
    }
    tracing::debug!(tenant = %id, caller = %caller.name, source = source.as_str(), "token handed out");
    Ok(token)
}

/// `POST /v1/tenants/{id}/token/invalidate`'s body (other fields are ignored).
#[derive(Deserialize)]
struct Invalidate {
    access_token: RejectedToken,
}

/// The token a partner rejected, as the caller got it: non-empty, at most 16 KiB.
#[derive(Deserialize)]
#[serde(try_from = "Value")]
struct RejectedToken(String);

impl TryFrom<Value> for RejectedToken {
    type Error = &'static str;
    fn try_from(v: Value) -> Result<Self, Self::Error> {
        match v {
            Value::String(t) if !t.is_empty() && t.len() <= 16 * 1024 => Ok(Self(t)),
            _ => Err("must be the non-empty token the partner rejected"),
        }
    }
}

async fn invalidate(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = authorize(&state, &caller, &path, "token.invalidate", &req)?;
    let Invalidate {
        access_token: RejectedToken(token),
    } = read_typed(&req, payload).await?;
    let token = token.as_str();
    // The place for the entry first: an invalidation that happened is always on the record.
    let slot = state
        .audit
        .reserve()
        .map_err(|_| ApiError::AuditUnavailable)?;
    let mut e = entry(&caller, "token.invalidate", "", &id, &req);
    e.fingerprint = Some(state.store.keys().fingerprint(token).into());
    let outcome = match state.broker.invalidate(&id, token).await {
        Ok(outcome) => outcome,
        Err(err) => {
            let err = ApiError::from(err);
            e.outcome = err.code().as_str().into();
            slot.record(e);
            return Err(err);
        }
    };
    if !matches!(outcome, Invalidation::Stale) || state.broker.knows_tenant(&id) {
        state.metrics.invalidation(id.as_str(), outcome.as_str());
    }
    e.outcome = outcome.as_str().into();
    slot.record(e);
    tracing::info!(tenant = %id, caller = %caller.name, outcome = outcome.as_str(), "token reported as rejected");
    match outcome {
        Invalidation::Throttled {
            age_s,
            window_s,
            retry_after_s,
        } => Err(ApiError::InvalidateThrottled {
            age_s,
            window_s,
            retry_after: retry_after_s,
        }),
        _ => Ok(HttpResponse::NoContent().finish()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_ttl_bounds() {
        assert_eq!(parse_min_ttl(None).unwrap(), 0);
        assert_eq!(parse_min_ttl(Some("600")).unwrap(), 600);
        for bad in ["-1", "1.5", "abc", "86401", ""] {
            assert!(parse_min_ttl(Some(bad)).is_err(), "{bad}");
        }
    }
}
