//! The token path's honest ceiling, for bench/run.sh: an actix-web server with no middleware at
//! all (no request id, span, metrics, auth, audit) answering `GET /v1/tenants/{tenant_id}/token`
//! with a constant JSON body of `BODY_BYTES` bytes (the size of the broker's token answer), on
//! the same number of workers. The broker's token fetch is measured against this: the gap is
//! the broker's own per-request work.
//!   BARE_PORT=9302 BODY_BYTES=1200 cargo bench --bench bare_actix

use actix_web::{web, App, HttpResponse, HttpServer};

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("BARE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9302);
    let size: usize = std::env::var("BODY_BYTES")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1200);
    // {"access_token":"xxx…"} padded to `size` bytes.
    let filler = size.saturating_sub(r#"{"access_token":""}"#.len());
    let body = web::Bytes::from(format!(r#"{{"access_token":"{}"}}"#, "x".repeat(filler)));
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            let body = body.clone();
            App::new().route(
                "/v1/tenants/{tenant_id}/token",
                web::get().to(move || {
                    let body = body.clone();
                    async move {
                        HttpResponse::Ok()
                            .content_type("application/json")
                            .body(body)
                    }
                }),
            )
        })
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
