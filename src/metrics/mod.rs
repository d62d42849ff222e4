//! The Prometheus registry and every metric handle. Names and labels are a contract
//! (see DESIGN.md); code calls the methods here and never builds metric names inline.

mod tenants;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::time::now_ms;
pub use tenants::CounterHandle;
use tenants::{Exporter, TenantSeries};

/// An HTTP series' labels: method, route template, status.
type HttpKey = (&'static str, &'static str, u16);

/// Every metric the broker exports.
pub struct Metrics {
    registry: Registry,
    /// Every series with a `tenant` label (`broker_token_requests_total`,
    /// `broker_upstream_*`, `broker_token_expiry_seconds`, `broker_invalidations_total`,
    /// `broker_proxy_*`, `broker_circuit_open`, `broker_last_mint_success_timestamp_seconds`).
    per_tenant: Arc<TenantSeries>,
    pub cache_lookups: IntCounterVec,
    pub tenants: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// The two HTTP series of each (method, route, status) served so far, resolved once:
    /// `with_label_values` hashes the label strings on every call.
    http_served: RwLock<HashMap<HttpKey, (IntCounter, Histogram), foldhash::fast::RandomState>>,
    pub audit_dropped: IntCounter,
    /// `broker_admin_auth_throttled_total`: failed admin authentications answered 429.
    pub admin_auth_throttled: IntCounter,
    pub lock_degraded: IntCounter,
    /// Pre-resolved `broker_cache_lookups_total` series (the hot path does no label lookups).
    pub l1_hit: IntCounter,
    pub l1_miss: IntCounter,
    pub l2_hit: IntCounter,
    pub l2_miss: IntCounter,
    pub l2_error: IntCounter,
    pub audit_write_failures: IntCounter,
    /// `broker_dependency_up{dependency}`: 1 while the dependency answers real operations.
    pub dependency_up: IntGaugeVec,
    pub redis_up: IntGauge,
    pub database_up: IntGauge,
}

/// Defines metrics in a registry: each helper builds one and registers it.
struct Define<'a>(&'a Registry);

impl Define<'_> {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&self, c: C) -> C {
        self.0.register(Box::new(c.clone())).expect("unique metric");
        c
    }

    fn counter(&self, name: &str, help: &str) -> IntCounter {
        self.add(IntCounter::new(name, help).expect("metric"))
    }

    fn counter_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
        self.add(IntCounterVec::new(Opts::new(name, help), labels).expect("metric"))
    }

    fn int_gauge(&self, name: &str, help: &str) -> IntGauge {
        self.add(IntGauge::new(name, help).expect("metric"))
    }

    fn int_gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
        self.add(IntGaugeVec::new(Opts::new(name, help), labels).expect("metric"))
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> HistogramVec {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.add(HistogramVec::new(opts, labels).expect("metric"))
    }
}

/// HTTP request latency buckets: 100 µs to 10 s.
const HTTP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Long because it is the table of metric families: one line each (name, help, labels).
    pub fn new() -> Self {
        let registry = Registry::new();
        let d = Define(&registry);
        let cache_lookups = d.counter_vec(
            "broker_cache_lookups_total",
            "Token cache lookups by layer and result",
            &["layer", "result"],
        );
        let lookup = |layer: &str, result: &str| cache_lookups.with_label_values(&[layer, result]);
        let dependency_up = d.int_gauge_vec(
            "broker_dependency_up",
            "1 while the dependency answers real operations, 0 while it is failing",
            &["dependency"],
        );
        let database_up = dependency_up.with_label_values(&["database"]);
        database_up.set(1);
        d.int_gauge_vec(
            "broker_build_info",
            "Always 1; the version that runs",
            &["version"],
        )
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let per_tenant = Arc::new(TenantSeries::new());
        registry
            .register(Box::new(Exporter(per_tenant.clone())))
            .expect("unique metric");
        Self {
            per_tenant,
            tenants: d.int_gauge("broker_tenants", "Registered tenants"),
            http_requests: d.counter_vec(
                "http_requests_total",
                "HTTP requests by method, route and status",
                &["method", "route", "status"],
            ),
            http_duration: d.histogram_vec(
                "http_request_duration_seconds",
                "HTTP request latency",
                HTTP_BUCKETS,
                &["method", "route"],
            ),
            http_served: RwLock::default(),
            audit_dropped: d.counter(
                "broker_audit_dropped_total",
                "Audit entries that could not be queued",
            ),
            admin_auth_throttled: d.counter(
                "broker_admin_auth_throttled_total",
                "Failed admin authentications answered 429 (over the per-address budget)",
            ),
            audit_write_failures: d.counter(
                "broker_audit_write_failures_total",
                "Failed audit batch writes (retried)",
            ),
            lock_degraded: d.counter(
                "broker_lock_degraded_total",
                "Mints done without the cross-replica lock because Redis was unavailable",
            ),
            l1_hit: lookup("l1", "hit"),
            l1_miss: lookup("l1", "miss"),
            l2_hit: lookup("l2", "hit"),
            l2_miss: lookup("l2", "miss"),
            l2_error: lookup("l2", "error"),
            redis_up: dependency_up.with_label_values(&["redis"]),
            database_up,
            dependency_up,
            cache_lookups,
            registry,
        }
    }

    /// Counts a served request and its latency (`http_requests_total`,
    /// `http_request_duration_seconds`). `method` and `route` come from fixed sets.
    pub fn http_served(
        &self,
        method: &'static str,
        route: &'static str,
        status: u16,
        took: Duration,
    ) {
        let key = (method, route, status);
        if let Some((count, latency)) = self.http_served.read().expect("http series").get(&key) {
            count.inc();
            latency.observe(took.as_secs_f64());
            return;
        }
        let mut status_text = itoa::Buffer::new();
        let series = (
            self.http_requests
                .with_label_values(&[method, route, status_text.format(status)]),
            self.http_duration.with_label_values(&[method, route]),
        );
        series.0.inc();
        series.1.observe(took.as_secs_f64());
        self.http_served
            .write()
            .expect("http series")
            .insert(key, series);
    }

    pub fn observe_upstream(&self, tenant: &str, outcome: &'static str, took: Duration) {
        self.per_tenant
            .upstream(tenant, outcome, took.as_secs_f64());
    }

    /// A mint of `tenant` succeeded (`true`) or failed.
    /// The circuit series exists only for tenants that ever failed here (a healthy tenant
    /// costs no series): set to 1 on failure, back to 0 on success.
    pub fn mint_outcome(&self, tenant: &str, ok: bool) {
        if ok {
            self.per_tenant
                .set_last_mint_success(tenant, now_ms() / 1000);
        }
        self.per_tenant.set_circuit(tenant, !ok, ok);
    }

    /// Tenants this replica last saw failing (their circuit gauge is 1).
    pub fn circuits_flagged(&self) -> Vec<String> {
        self.per_tenant.circuits_open()
    }

    /// Sets the tenant's circuit gauge to what the shared circuit state says.
    pub fn set_circuit_open(&self, tenant: &str, open: bool) {
        self.per_tenant.set_circuit(tenant, open, false);
    }

    pub fn invalidation(&self, tenant: &str, outcome: &'static str) {
        self.per_tenant.invalidation(tenant, outcome);
    }

    pub fn token_request(&self, tenant: &str, outcome: &'static str) {
        self.per_tenant.token_request(tenant, outcome);
    }

    /// The tenant's `broker_token_requests_total{outcome="cache"}` counter, to keep with its
    /// cached token (the hot path then counts a hit without a lookup).
    pub fn cache_hit_counter(&self, tenant: &str) -> CounterHandle {
        self.per_tenant.token_requests_handle(tenant, "cache")
    }

    /// A proxied call answered with `status_class` after `took`.
    pub fn proxied(&self, tenant: &str, status_class: &'static str, took: Duration) {
        self.per_tenant
            .proxied(tenant, status_class, took.as_secs_f64());
    }

    /// A proxied call refused or cut off by a limit.
    pub fn proxy_cutoff(&self, tenant: &str, reason: &'static str) {
        self.per_tenant.proxy_cutoff(tenant, reason);
    }

    /// Records when the tenant's cached token expires; the gauge counts down at each scrape.
    pub fn set_token_expiry(&self, tenant: &str, expires_at_ms: i64) {
        self.per_tenant.set_expiry(tenant, expires_at_ms);
    }

    /// Drops the expiry series of a tenant whose token was dropped.
    pub fn clear_token_expiry(&self, tenant: &str) {
        self.per_tenant.clear_expiry(tenant);
    }

    /// Forgets every series of a deleted tenant, whatever their other labels, so churn does
    /// not grow the scrape.
    pub fn forget_tenant(&self, tenant: &str) {
        self.per_tenant.forget(tenant);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
