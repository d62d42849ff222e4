//! The admin console: a small page for people, served from files compiled into the binary
//! (`console/`: no build step, nothing fetched from elsewhere). The page holds no secret: it
//! asks for the admin token, keeps it in `sessionStorage` and sends it as a bearer header to the
//! admin API, so there are no cookies and no CSRF surface. Every answer carries a strict CSP (no
//! inline script or style, nothing but this origin), `X-Frame-Options: DENY` and `nosniff`.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

const INDEX_HTML: &str = include_str!("console/index.html");
const CONSOLE_JS: &str = include_str!("console/console.js");
const CONSOLE_CSS: &str = include_str!("console/console.css");

/// Only this origin, no inline code, no framing, no form posts elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(web::resource("/admin/console").route(web::get().to(index)))
        .service(web::resource("/admin/console/console.js").route(web::get().to(script)))
        .service(web::resource("/admin/console/console.css").route(web::get().to(style)));
}

fn page(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        .insert_header((header::CONTENT_SECURITY_POLICY, CSP))
        .insert_header((header::X_FRAME_OPTIONS, "DENY"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header(("cross-origin-opener-policy", "same-origin"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(body)
}

async fn index() -> HttpResponse {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> HttpResponse {
    page("text/javascript; charset=utf-8", CONSOLE_JS)
}

async fn style() -> HttpResponse {
    page("text/css; charset=utf-8", CONSOLE_CSS)
}
