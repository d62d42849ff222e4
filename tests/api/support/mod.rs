//! Test support, by concern: backing services (`services.rs`), one test's environment and
//! apps (`app.rs`), fake partners (`partners.rs`), services and processes a test owns
//! (`processes.rs`), load and fault helpers (`load.rs`), captured logs (`logs.rs`).

mod app;
mod load;
mod logs;
mod partners;
mod processes;
mod services;

pub use app::*;
pub use load::*;
pub use logs::*;
pub use partners::*;
pub use processes::*;
pub use services::*;

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use token_broker::api::AppState;
use token_broker::app::Application;
use token_broker::config::Settings;
use wiremock::MockServer;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789abcdef0123";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded default: SQLite and the in-process cache.
    Sqlite,
    /// Postgres and the in-process cache.
    Postgres,
    /// Postgres and Redis: the scaled-out shape.
    PostgresRedis,
}
