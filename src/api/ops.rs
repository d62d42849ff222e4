//! Operations endpoints: liveness, readiness and Prometheus metrics.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::AppState;
use crate::api::problem::ApiError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/healthz").route(web::get().to(healthz)))
        .service(web::resource("/readyz").route(web::get().to(readyz)))
        .service(web::resource("/metrics").route(web::get().to(metrics)));
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready unless this replica cannot serve tokens at all. A failing dependency that tokens
/// can be served without (Redis: held tokens and lock-less mints; the database: known
/// callers and the last credentials read) makes it `degraded`, still 200, so an orchestrator
/// does not pull every replica at once over an outage they ride out.
async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let (db, redis) = tokio::join!(
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()),
        tokio::time::timeout(CHECK_TIMEOUT, state.broker.check_shared()),
    );
    let db = matches!(db, Ok(Ok(())));
    // A database that answers reads but refuses writes (a full disk) is not "ok".
    let writes_fail = state.audit.write_failure();
    state
        .metrics
        .database_up
        .set(i64::from(db && writes_fail.is_none()));
    let redis: Option<Result<(), String>> = match redis {
        Ok(r) => r,
        Err(_) => Some(Err("unavailable: check timed out".into())),
    };
    let redis_word = match &redis {
        None => "not_configured".to_owned(),
        Some(Ok(())) => "ok".to_owned(),
        Some(Err(word)) => word.clone(),
    };
    let db_word = match (db, &writes_fail) {
        (false, _) => "unavailable".to_owned(),
        (true, Some(why)) => format!("degraded: writes fail ({why})"),
        (true, None) => "ok".to_owned(),
    };
    let checks = json!({
        "database": db_word,
        "redis": redis_word,
    });
    let degraded = !db || writes_fail.is_some() || matches!(redis, Some(Err(_)));
    // Without the database this replica can still serve callers it already knows.
    let can_serve = db || state.auth.knows_callers() || state.jwt.is_some();
    if !can_serve {
        HttpResponse::ServiceUnavailable().json(json!({"status": "unavailable", "checks": checks}))
    } else if degraded {
        HttpResponse::Ok().json(json!({"status": "degraded", "checks": checks}))
    } else {
        HttpResponse::Ok().json(json!({"status": "ready", "checks": checks}))
    }
}

/// The Prometheus exposition; with `BROKER_METRICS_TOKEN` set, only for that bearer token
/// (tenant ids are labels, and the broker does not tell strangers which tenants exist).
async fn metrics(state: web::Data<AppState>, req: HttpRequest) -> Result<HttpResponse, ApiError> {
    if state.metrics_token.is_set()
        && !super::extract::bearer(&req).is_some_and(|t| state.metrics_token.verify(t))
    {
        return Err(ApiError::Unauthorized(
            "/metrics wants the bearer token set in BROKER_METRICS_TOKEN",
        ));
    }
    let _ = tokio::time::timeout(CHECK_TIMEOUT, state.broker.refresh_circuit_gauges()).await;
    if let Ok(Ok(n)) = tokio::time::timeout(CHECK_TIMEOUT, state.store.count_tenants()).await {
        state.metrics.tenants.set(n);
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render()))
}
