//! Integration tests: the real app on a random port, fake partners, real SQLite, Postgres and Redis.

mod helpers;
mod support;

mod admin;
mod cluster;
mod contract;
mod drift;
mod failures;
mod faults;
mod first_run;
mod flights;
mod hostile;
mod oauth;
mod ops;
mod partners;
mod persistence;
mod pop;
mod proxy;
mod secrets;
mod security;
mod token;

/// Runs an async test body once per backend: `backends!(name: Sqlite, PostgresRedis)`. Cases
/// that need Postgres or Redis fail when it is not available (saying how to start it), unless
/// the tests were built with `BROKER_TEST_SKIP_SERVICES=1`: then they are ignored.
#[macro_export]
macro_rules! backends {
    ($body:ident: $($backend:ident),+) => {
        mod $body {
            $( $crate::backend_case!($body, $backend); )+
        }
    };
}

#[macro_export]
macro_rules! backend_case {
    ($body:ident, Sqlite) => {
        #[allow(non_snake_case)]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn Sqlite() {
            let env = $crate::helpers::TestEnv::new($crate::helpers::Backend::Sqlite).await;
            super::$body(env.expect("SQLite needs no service")).await;
        }
    };
    ($body:ident, $backend:ident) => {
        #[allow(non_snake_case)]
        #[cfg_attr(
            skip_services,
            ignore = "BROKER_TEST_SKIP_SERVICES=1: needs Postgres/Redis"
        )]
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $backend() {
            if let Some(env) =
                $crate::helpers::TestEnv::new($crate::helpers::Backend::$backend).await
            {
                super::$body(env).await;
            }
        }
    };
}
