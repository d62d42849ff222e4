//! The stack's own ceiling for proxy mode, for bench/run.sh's cases (g) and (n): the least an
//! actix-web server forwarding through the broker's proxy client can do per request (no auth,
//! no token, no audit, no metrics, no header rules): parse, forward to `FORWARD_TO` + path,
//! stream the answer back. Same server workers (the cores) and the same per-worker pooled
//! client as the broker's proxy: hyper-util's, without reqwest's layers. `FORWARD_CLIENT=reqwest`
//! forwards through reqwest (which wraps that client; proxy mode used it before), to show what
//! its layers (redirects, timeouts, its `Url` parsed twice) cost.
//!   FORWARD_PORT=9301 FORWARD_TO=http://127.0.0.1:9300 cargo bench --bench bare_forwarder

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures_util::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

thread_local! {
    static CLIENT: reqwest::Client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
}

thread_local! {
    static HYPER: Client<HttpConnector, Empty<web::Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
}

/// `FORWARD_TO` + the request's path and query.
fn target(req: &HttpRequest, base: &str) -> String {
    match req.uri().path_and_query() {
        Some(pq) => format!("{base}{}", pq.as_str()),
        None => base.to_owned(),
    }
}

async fn forward_hyper(req: HttpRequest, base: web::Data<String>) -> HttpResponse {
    let uri = target(&req, &base);
    let Ok(outbound) = hyper::Request::builder()
        .method(req.method().as_str())
        .uri(uri)
        .body(Empty::new())
    else {
        return HttpResponse::BadRequest().finish();
    };
    let sent = HYPER.with(|c| c.request(outbound));
    match sent.await {
        Ok(resp) => {
            let status = actix_web::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let mut b = HttpResponse::build(status);
            if let Some(ct) = resp.headers().get(hyper::header::CONTENT_TYPE) {
                b.insert_header(("content-type", ct.as_bytes()));
            }
            let body = resp
                .into_body()
                .into_data_stream()
                .map(|chunk| chunk.map_err(|e| actix_web::error::ErrorBadGateway(e.to_string())));
            b.streaming(body)
        }
        Err(_) => HttpResponse::BadGateway().finish(),
    }
}

async fn forward(req: HttpRequest, base: web::Data<String>) -> HttpResponse {
    let url = target(&req, &base);
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes()).unwrap();
    let sent = CLIENT.with(|c| c.request(method, url).send());
    match sent.await {
        Ok(resp) => {
            let status = actix_web::http::StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let mut b = HttpResponse::build(status);
            if let Some(ct) = resp.headers().get(reqwest::header::CONTENT_TYPE) {
                b.insert_header(("content-type", ct.as_bytes()));
            }
            b.streaming(resp.bytes_stream())
        }
        Err(_) => HttpResponse::BadGateway().finish(),
    }
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("FORWARD_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(9301);
    let to = std::env::var("FORWARD_TO").unwrap_or_else(|_| "http://127.0.0.1:9300".into());
    let reqwest = std::env::var("FORWARD_CLIENT").is_ok_and(|c| c == "reqwest");
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            let app = App::new().app_data(web::Data::new(to.clone()));
            if reqwest {
                app.default_service(web::to(forward))
            } else {
                app.default_service(web::to(forward_hyper))
            }
        })
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })
}
