//! A fast local partner API for bench/run.sh's proxy case (not Python: the broker must be the
//! slower hop). Any method on `/v2/{path}`: a small JSON answer; `POST /v2/upload` reads the
//! whole body and answers its length; `POST /token` a DPoP-bound token (for the DPoP tenant:
//! the proofs are the broker's cost to measure, not checked here). Runs until killed.
//!   PARTNER_API_PORT=9300 cargo bench --bench partner_api

use actix_web::{web, App, HttpResponse, HttpServer};
use futures_util::StreamExt;

async fn ping() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"ok":true,"balance":{"amount":4200,"currency":"INR"}}"#)
}

async fn dpop_token() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"access_token":"bench-dpop-token","token_type":"DPoP","expires_in":3600}"#)
}

async fn upload(mut body: web::Payload) -> HttpResponse {
    let mut n = 0usize;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => n += c.len(),
            Err(_) => return HttpResponse::BadRequest().finish(),
        }
    }
    HttpResponse::Ok().body(n.to_string())
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PARTNER_API_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9300);
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(|| {
            App::new()
                .app_data(web::PayloadConfig::new(usize::MAX))
                .route("/v2/upload", web::post().to(upload))
                .route("/token", web::post().to(dpop_token))
                .default_service(web::to(ping))
        })
        .workers(1)
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
