//! Operations endpoints: liveness, readiness and Prometheus metrics.

use std::time::Duration;

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::app::AppState;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/healthz").route(web::get().to(healthz)))
        .service(web::resource("/readyz").route(web::get().to(readyz)))
        .service(web::resource("/metrics").route(web::get().to(metrics)));
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let db = matches!(
        tokio::time::timeout(CHECK_TIMEOUT, state.store.ping()).await,
        Ok(Ok(()))
    );
    let redis = if state.settings.redis_url.is_some() {
        Some(matches!(
            tokio::time::timeout(CHECK_TIMEOUT, state.broker.ping_shared()).await,
            Ok(Ok(()))
        ))
    } else {
        None
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let checks = json!({
        "database": word(db),
        "redis": redis.map_or("not_configured", word),
    });
    if db && redis.unwrap_or(true) {
        HttpResponse::Ok().json(json!({"status": "ready", "checks": checks}))
    } else {
        HttpResponse::ServiceUnavailable().json(json!({"status": "unavailable", "checks": checks}))
    }
}

async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if let Ok(Ok(n)) = tokio::time::timeout(CHECK_TIMEOUT, state.store.count_tenants()).await {
        state.metrics.tenants.set(n);
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}
