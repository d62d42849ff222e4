//! Proof of possession for callers and partners: a DPoP proof for the tenant's current token
//! (the key never leaves the broker), and the public halves of a tenant's keys as a JWK set,
//! for admins and, when the tenant publishes them, for its partner (`jwks_uri`).

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use super::problem::ApiError;
use super::token::{authorize, hand_out, no_store};
use super::{read_typed, AppState};
use crate::auth::{Admin, Caller};
use crate::tenants::TenantId;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/v1/tenants/{tenant_id}/dpop-proof").route(web::post().to(dpop_proof)),
    )
    .service(web::resource("/v1/tenants/{tenant_id}/jwks.json").route(web::get().to(public_jwks)))
    .service(web::resource("/admin/v1/tenants/{tenant_id}/jwks").route(web::get().to(admin_jwks)));
}

/// `POST …/dpop-proof` input.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProofRequest {
    htm: String,
    htu: String,
    #[serde(default)]
    nonce: Option<String>,
}

impl ProofRequest {
    /// `htm` an HTTP method token; `htu` an absolute http(s) URL, kept without query and
    /// fragment (RFC 9449 §4.2); `nonce` as the partner sent it (`pop::is_nonce`).
    fn checked(self) -> Result<(String, String, Option<String>), ApiError> {
        let ProofRequest { htm, htu, nonce } = self;
        if htm.is_empty() || htm.len() > 16 || !htm.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ApiError::invalid(
                "htm must be the request's HTTP method in upper case (GET, POST, …)",
                Some("htm"),
            ));
        }
        let url = url::Url::parse(&htu)
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http") && u.has_host() && htu.len() <= 2048)
            .ok_or_else(|| {
                ApiError::invalid(
                    "htu must be the absolute http(s) URL of the request",
                    Some("htu"),
                )
            })?;
        if nonce.as_deref().is_some_and(|n| !crate::pop::is_nonce(n)) {
            return Err(ApiError::invalid(
                "nonce must be the partner's DPoP-Nonce as sent",
                Some("nonce"),
            ));
        }
        Ok((htm, crate::issuers::htu_of(&url), nonce))
    }
}

/// A DPoP proof bound to the tenant's current token (`ath`): the caller sends the token as
/// `Authorization: DPoP <token>` and this proof as `DPoP` to the partner. Authentication,
/// scope, rate limit and audit are the token fetch's (the token is handed out through it).
async fn dpop_proof(
    state: web::Data<AppState>,
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let id = authorize(&state, &caller, &path, "token.fetch", &req)?;
    let asked: ProofRequest = read_typed(&req, payload).await?;
    let (htm, htu, nonce) = asked.checked()?;
    let token = hand_out(&state, &caller, &id, 0, Some("dpop proof"), &req).await?;
    let Some(jkt) = &token.dpop_jkt else {
        return Err(ApiError::DpopNotEnabled);
    };
    // The key the token is bound to: a replica that has not seen a rotation yet reads again.
    let mut keys = state.proxy.keys(&id, false).await?;
    if keys.dpop.as_ref().map(|k| k.thumbprint()) != Some(jkt.as_str()) {
        keys = state.proxy.keys(&id, true).await?;
    }
    let key = keys
        .dpop
        .as_ref()
        .filter(|k| k.thumbprint() == jkt)
        .ok_or(ApiError::Internal(
            "the tenant's DPoP key does not match its token".into(),
        ))?;
    let proof = key
        .dpop_proof(&htm, &htu, nonce.as_deref(), Some(token.ath()))
        .map_err(|e| ApiError::Internal(format!("DPoP proof: {e}")))?;
    Ok(no_store(HttpResponse::Ok()).body(json!({ "proof": proof, "jkt": jkt }).to_string()))
}

/// The JWK set of a tenant that publishes it (`issuer.publish_jwks`), unauthenticated; any
/// other id is simply not found.
async fn public_jwks(
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = TenantId::parse(&path).map_err(|_| ApiError::TenantNotFound)?;
    let keys = state.proxy.keys(&id, false).await?;
    if !keys.publish {
        return Err(ApiError::TenantNotFound);
    }
    Ok(jwks_answer(keys.jwks(), "public, max-age=60"))
}

/// The public halves of a tenant's keys, for an admin registering them at the partner.
async fn admin_jwks(
    _: Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = TenantId::parse(&path).map_err(|_| ApiError::TenantNotFound)?;
    let keys = state.proxy.keys(&id, true).await?;
    Ok(jwks_answer(keys.jwks(), "no-store"))
}

fn jwks_answer(set: Value, cache: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/jwk-set+json")
        .insert_header((header::CACHE_CONTROL, cache))
        .body(set.to_string())
}
