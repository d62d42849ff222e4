//! Integration tests: the real app on a random port, fake partners, real SQLite, Postgres and Redis.

mod helpers;

mod admin;
mod cluster;
mod contract;
mod failures;
mod faults;
mod flights;
mod hostile;
mod ops;
mod partners;
mod persistence;
mod secrets;
mod security;
mod token;

/// Runs an async test body once per backend: `backends!(name, body_fn, [Sqlite, PostgresRedis])`.
#[macro_export]
macro_rules! backends {
    ($body:ident: $($backend:ident),+) => {
        mod $body {
            $(
                #[allow(non_snake_case)]
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $backend() {
                    if let Some(env) = $crate::helpers::TestEnv::new($crate::helpers::Backend::$backend).await {
                        super::$body(env).await;
                    }
                }
            )+
        }
    };
}
