//! The Prometheus registry and every metric handle. Names and labels are a contract
//! (see DESIGN.md); code calls the methods here and never builds metric names inline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::time::now_ms;

/// Every metric the broker exports.
pub struct Metrics {
    registry: Registry,
    pub token_requests: IntCounterVec,
    pub cache_lookups: IntCounterVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    token_expiry: GaugeVec,
    pub tenants: IntGauge,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
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
    /// `broker_invalidations_total{tenant,outcome}`: callers' reports of rejected tokens.
    pub invalidations: IntCounterVec,
    /// `broker_proxy_requests_total{tenant,status_class}`: proxied API calls by the class of
    /// the answer the caller got (`2xx` … `5xx`).
    pub proxy_requests: IntCounterVec,
    /// `broker_proxy_cutoffs_total{tenant,reason}`: proxied calls refused or cut off by a
    /// limit (`response_too_large`, `response_timeout`, `caller_concurrency`).
    pub proxy_cutoffs: IntCounterVec,
    /// `broker_proxy_request_duration_seconds{tenant}`: whole proxied calls, to the answer head.
    pub proxy_duration: HistogramVec,
    /// `broker_circuit_open{tenant}`: 1 from a failed mint until a successful one.
    circuit_open: IntGaugeVec,
    /// `broker_last_mint_success_timestamp_seconds{tenant}`.
    last_mint_success: IntGaugeVec,
    /// `broker_dependency_up{dependency}`: 1 while the dependency answers real operations.
    pub dependency_up: IntGaugeVec,
    pub redis_up: IntGauge,
    pub database_up: IntGauge,
    expiry_at_ms: Mutex<HashMap<String, i64>>,
    /// Tenants with a `broker_circuit_open` series.
    circuit_series: Mutex<std::collections::HashSet<String>>,
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

    fn gauge_vec(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        self.add(GaugeVec::new(Opts::new(name, help), labels).expect("metric"))
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
/// Partner token request latency buckets: 10 ms to 10 s.
const UPSTREAM_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Proxied call latency buckets: 1 ms to 10 s.
const PROXY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Removes every series of `vec` whose `tenant` label is `tenant`.
fn drop_series<T: prometheus::core::MetricVecBuilder>(
    vec: &prometheus::core::MetricVec<T>,
    tenant: &str,
) {
    use prometheus::core::Collector;
    for family in vec.collect() {
        for m in family.get_metric() {
            let labels: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.get_name(), l.get_value()))
                .collect();
            if labels.get("tenant") == Some(&tenant) {
                let _ = vec.remove(&labels);
            }
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
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
        Self {
            token_requests: d.counter_vec("broker_token_requests_total", "Token fetches by tenant and outcome", &["tenant", "outcome"]),
            upstream_requests: d.counter_vec("broker_upstream_requests_total", "Token requests sent to partners, by tenant and outcome", &["tenant", "outcome"]),
            upstream_duration: d.histogram_vec("broker_upstream_request_duration_seconds", "Partner token request latency", UPSTREAM_BUCKETS, &["tenant"]),
            token_expiry: d.gauge_vec("broker_token_expiry_seconds", "Seconds left on the tenant's cached token", &["tenant"]),
            tenants: d.int_gauge("broker_tenants", "Registered tenants"),
            http_requests: d.counter_vec("http_requests_total", "HTTP requests by method, route and status", &["method", "route", "status"]),
            http_duration: d.histogram_vec("http_request_duration_seconds", "HTTP request latency", HTTP_BUCKETS, &["method", "route"]),
            audit_dropped: d.counter("broker_audit_dropped_total", "Audit entries that could not be queued"),
            admin_auth_throttled: d.counter("broker_admin_auth_throttled_total", "Failed admin authentications answered 429 (over the per-address budget)"),
            audit_write_failures: d.counter("broker_audit_write_failures_total", "Failed audit batch writes (retried)"),
            invalidations: d.counter_vec("broker_invalidations_total", "Callers' reports of rejected tokens, by tenant and outcome (dropped, stale, throttled)", &["tenant", "outcome"]),
            proxy_requests: d.counter_vec("broker_proxy_requests_total", "Proxied partner API calls, by tenant and the status class answered (2xx, 3xx, 4xx, 5xx)", &["tenant", "status_class"]),
            proxy_cutoffs: d.counter_vec("broker_proxy_cutoffs_total", "Proxied calls refused or cut off by a limit, by tenant and reason (response_too_large, response_timeout, caller_concurrency)", &["tenant", "reason"]),
            proxy_duration: d.histogram_vec("broker_proxy_request_duration_seconds", "Proxied partner API call latency, to the answer's head", PROXY_BUCKETS, &["tenant"]),
            circuit_open: d.int_gauge_vec("broker_circuit_open", "1 while the tenant's partner calls are paused or probed after a failed mint, 0 once one succeeds", &["tenant"]),
            last_mint_success: d.int_gauge_vec("broker_last_mint_success_timestamp_seconds", "Unix time of the tenant's last successful mint by this replica", &["tenant"]),
            lock_degraded: d.counter("broker_lock_degraded_total", "Mints done without the cross-replica lock because Redis was unavailable"),
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
            expiry_at_ms: Mutex::new(HashMap::new()),
            circuit_series: Mutex::new(std::collections::HashSet::new()),
        }
    }

    pub fn observe_upstream(&self, tenant: &str, outcome: &str, took: Duration) {
        self.upstream_requests
            .with_label_values(&[tenant, outcome])
            .inc();
        self.upstream_duration
            .with_label_values(&[tenant])
            .observe(took.as_secs_f64());
    }

    /// A mint of `tenant` succeeded (`true`) or failed.
    /// The circuit series exists only for tenants that ever failed here (a healthy tenant
    /// costs no series): set to 1 on failure, back to 0 on success.
    pub fn mint_outcome(&self, tenant: &str, ok: bool) {
        if ok {
            self.last_mint_success
                .with_label_values(&[tenant])
                .set(now_ms() / 1000);
        }
        let mut failed = self.circuit_series.lock().expect("circuit series");
        if !ok && !failed.contains(tenant) {
            failed.insert(tenant.to_owned());
        }
        if failed.contains(tenant) {
            self.circuit_open
                .with_label_values(&[tenant])
                .set(i64::from(!ok));
        }
    }

    /// Tenants this replica last saw failing (their circuit gauge is 1).
    pub fn circuits_flagged(&self) -> Vec<String> {
        let mut out = Vec::new();
        for family in prometheus::core::Collector::collect(&self.circuit_open) {
            for m in family.get_metric() {
                if m.get_gauge().get_value() >= 1.0 {
                    if let Some(l) = m.get_label().iter().find(|l| l.get_name() == "tenant") {
                        out.push(l.get_value().to_owned());
                    }
                }
            }
        }
        out
    }

    /// Sets the tenant's circuit gauge to what the shared circuit state says.
    pub fn set_circuit_open(&self, tenant: &str, open: bool) {
        self.circuit_open
            .with_label_values(&[tenant])
            .set(i64::from(open));
    }

    pub fn invalidation(&self, tenant: &str, outcome: &str) {
        self.invalidations
            .with_label_values(&[tenant, outcome])
            .inc();
    }

    pub fn token_request(&self, tenant: &str, outcome: &str) {
        self.token_requests
            .with_label_values(&[tenant, outcome])
            .inc();
    }

    /// Records when the tenant's cached token expires; the gauge counts down at each scrape.
    pub fn set_token_expiry(&self, tenant: &str, expires_at_ms: i64) {
        let mut map = self.expiry_at_ms.lock().expect("expiry map");
        match map.get_mut(tenant) {
            Some(at) => *at = expires_at_ms,
            None => {
                map.insert(tenant.to_owned(), expires_at_ms);
            }
        }
    }

    /// Drops every per-tenant series of a tenant whose token was dropped or that is gone.
    pub fn clear_token_expiry(&self, tenant: &str) {
        self.expiry_at_ms.lock().expect("expiry map").remove(tenant);
        let _ = self.token_expiry.remove_label_values(&[tenant]);
    }

    /// Forgets every series of a deleted tenant: gauges, counters and histograms, whatever
    /// their other labels (an outcome, a status class), so churn does not grow the scrape.
    pub fn forget_tenant(&self, tenant: &str) {
        self.clear_token_expiry(tenant);
        self.circuit_series
            .lock()
            .expect("circuit series")
            .remove(tenant);
        drop_series(&self.token_requests, tenant);
        drop_series(&self.upstream_requests, tenant);
        drop_series(&self.upstream_duration, tenant);
        drop_series(&self.invalidations, tenant);
        drop_series(&self.proxy_requests, tenant);
        drop_series(&self.proxy_cutoffs, tenant);
        drop_series(&self.proxy_duration, tenant);
        drop_series(&self.circuit_open, tenant);
        drop_series(&self.last_mint_success, tenant);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let now = now_ms();
        {
            let map = self.expiry_at_ms.lock().expect("expiry map");
            // An expired token stays visible at 0 until a new one arrives (or the tenant's
            // token is dropped): an alert on "< 60" must see it reach zero.
            for (tenant, at) in map.iter() {
                let left = ((*at - now) / 1000).max(0);
                self.token_expiry
                    .with_label_values(&[tenant])
                    .set(left as f64);
            }
        }
        let mut out = Vec::with_capacity(8 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}
