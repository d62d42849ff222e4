//! Request extractors: the `Caller` of the token endpoints and the `Admin` of the admin API,
//! from the bearer credential, with refusals audited. Identity rules live in `auth`.

use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;

use super::problem::ApiError;
use super::AppState;
use crate::auth::{api_keys, Admin, AdminRole, AuthMethod, Caller};

/// The bearer credential of a request, if it has one.
pub fn bearer(req: &HttpRequest) -> Option<&str> {
    let value = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)?
        .as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&value[..space], value[space + 1..].trim_ascii());
    // Visible ASCII, spaces and tabs only (what `HeaderValue::to_str` checks), tested without
    // an early exit so it vectorizes: a JWT is a kilobyte, and the byte-by-byte check was 9 %
    // of a JWT caller's token fetch.
    let plain = rest.iter().fold(true, |ok, &b| {
        ok & ((0x20..0x7f).contains(&b) | (b == b'\t'))
    });
    (scheme.eq_ignore_ascii_case(b"bearer") && plain && !rest.is_empty())
        .then(|| std::str::from_utf8(rest).ok())
        .flatten()
}

fn state(req: &HttpRequest) -> web::Data<AppState> {
    req.app_data::<web::Data<AppState>>()
        .expect("AppState is registered")
        .clone()
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = state(req);
        // The request itself (a reference count), not copies of its credential and tenant.
        let req = req.clone();
        Box::pin(async move {
            let result = match bearer(&req) {
                None => Err(ApiError::Unauthorized("missing bearer credentials")),
                Some(t) if t.starts_with(api_keys::PREFIX) => state
                    .auth
                    .api_key(t)
                    .await
                    .map(|c| (*c).clone())
                    .map_err(ApiError::from),
                Some(t) => match &state.jwt {
                    Some(v) => v.verify(t).await.map_err(|reason| {
                        tracing::info!(reason = %reason, "caller JWT refused");
                        ApiError::Unauthorized("invalid credentials")
                    }),
                    None => Err(ApiError::Unauthorized("invalid credentials")),
                },
            };
            let tenant = req.match_info().get("tenant_id");
            if let Ok(c) = &result {
                let span = tracing::Span::current();
                span.record("caller", &*c.name);
                if let Some(t) = tenant {
                    span.record("tenant", t);
                }
            }
            if let Err(ApiError::Unauthorized(reason)) = &result {
                let request_id = super::request_id_of(&req);
                refusal(
                    &state,
                    "token.fetch",
                    tenant.map(str::to_owned),
                    reason,
                    request_id,
                );
            }
            result
        })
    }
}

/// Records a refused credential (best effort, coalesced: floods cost a row, not a row each).
fn refusal(
    state: &AppState,
    action: &'static str,
    tenant: Option<String>,
    reason: &str,
    request_id: Option<String>,
) {
    let mut entry = crate::audit::Entry::new(crate::audit::Kind::Refused, action, "unauthorized");
    entry.tenant = tenant.map(Into::into);
    entry.detail = Some(reason.to_owned());
    entry.request_id = request_id;
    state.audit.record_best_effort(entry);
}

/// `refusal` for a handler that authenticates by itself (the OAuth token endpoint).
pub fn audit_refusal(
    state: &AppState,
    req: &HttpRequest,
    action: &'static str,
    tenant: Option<String>,
    reason: &str,
) {
    refusal(state, action, tenant, reason, super::request_id_of(req));
}

fn looks_like_jwt(t: &str) -> bool {
    t.len() <= 16 * 1024 && t.bytes().filter(|&b| b == b'.').count() == 2
}

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    /// An admin's authentication in order of trust (the static or generated token, then a
    /// named admin's JWT) under the failure throttle. Long because every path through it must
    /// pass the throttle and the refusal audit, which one future keeps in view.
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = state(req);
        let token = bearer(req).map(str::to_owned);
        let req = req.clone();
        Box::pin(async move {
            let result = match (token, &state.settings.admin_jwt, &state.jwt) {
                (None, _, _) => Err(ApiError::Unauthorized("missing bearer credentials")),
                (Some(t), _, _) if state.admin.verify(&t) => Ok(Admin::static_token()),
                (Some(t), Some(cfg), Some(verifier)) if looks_like_jwt(&t) => {
                    match verifier
                        .verify_admin(&t, &cfg.audience, &cfg.role_claim)
                        .await
                    {
                        Ok(claims) => {
                            match AdminRole::from_roles(&claims.roles) {
                                Some(role) => Ok(Admin {
                                    name: claims.sub.into(),
                                    method: AuthMethod::Jwt,
                                    role,
                                }),
                                None => Err(ApiError::AdminForbidden(
                                    "the token carries neither the token-broker-admin nor the token-broker-auditor role",
                                )),
                            }
                        }
                        Err(reason) => {
                            tracing::info!(reason = %reason, "admin JWT refused");
                            Err(ApiError::Unauthorized("invalid credentials"))
                        }
                    }
                }
                (Some(_), _, _) => Err(ApiError::Unauthorized("invalid credentials")),
            };
            // Failed authentications (never a right token) spend the source address's budget.
            let result = match result {
                Err(ApiError::Unauthorized(reason)) => {
                    let source: std::sync::Arc<str> = req
                        .peer_addr()
                        .map_or_else(|| "unknown".into(), |a| a.ip().to_string().into());
                    match state.admin_failures.check(&source) {
                        Ok(()) => Err(ApiError::Unauthorized(reason)),
                        Err(retry_after) => {
                            state.metrics.admin_auth_throttled.inc();
                            Err(ApiError::AdminAuthThrottled(retry_after))
                        }
                    }
                }
                other => other,
            };
            let result = result.and_then(|admin| {
                let reads = matches!(req.method().as_str(), "GET" | "HEAD");
                if admin.role == AdminRole::Auditor && !reads {
                    Err(ApiError::AdminForbidden(
                        "the token-broker-auditor role may read but not change anything",
                    ))
                } else {
                    Ok(admin)
                }
            });
            match &result {
                Ok(admin) => {
                    tracing::Span::current().record("caller", &*admin.name);
                }
                Err(e) => {
                    let action = format!(
                        "admin {} {}",
                        req.method(),
                        req.match_pattern().unwrap_or_default()
                    );
                    let mut entry = crate::audit::Entry::new(
                        crate::audit::Kind::Refused,
                        action,
                        e.code().as_str(),
                    );
                    entry.tenant = req.match_info().get("tenant_id").map(Into::into);
                    entry.detail = Some(e.to_string());
                    entry.request_id = super::request_id_of(&req);
                    state.audit.record_best_effort(entry);
                }
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderValue, AUTHORIZATION};
    use actix_web::test::TestRequest;

    fn bearer_of(value: &[u8]) -> Option<String> {
        let req = TestRequest::default()
            .insert_header((AUTHORIZATION, HeaderValue::from_bytes(value).unwrap()))
            .to_http_request();
        bearer(&req).map(str::to_owned)
    }

    #[test]
    fn bearer_reads_the_credential_as_headers_allow() {
        assert_eq!(bearer_of(b"Bearer abc").as_deref(), Some("abc"));
        assert_eq!(bearer_of(b"bEaReR   abc \t").as_deref(), Some("abc"));
        assert_eq!(bearer_of(b"Bearer a b").as_deref(), Some("a b"));
        for refused in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer  \t ",
            b"Bearer\tabc",
            b"Bearerabc",
            b"Bearer ab\xc3\xa9",
        ] {
            assert_eq!(bearer_of(refused), None, "{refused:?}");
        }
        let none = TestRequest::default().to_http_request();
        assert_eq!(bearer(&none), None);
    }
}
