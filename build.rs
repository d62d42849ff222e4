// Test-only switch: with BROKER_TEST_SKIP_SERVICES=1, integration tests that need Postgres or
// Redis are compiled as #[ignore]d (reported as ignored, never as passed). Without it they run
// and fail with a message saying how to start the service.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(skip_services)");
    println!("cargo:rerun-if-env-changed=BROKER_TEST_SKIP_SERVICES");
    if std::env::var("BROKER_TEST_SKIP_SERVICES").is_ok_and(|v| v == "1") {
        println!("cargo:rustc-cfg=skip_services");
    }
}
