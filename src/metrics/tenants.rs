//! The per-tenant series (`tenant` label), kept compactly: one small record per tenant,
//! turned into Prometheus families only when scraped.
//!
//! The prometheus crate gives every labelled child its own descriptor (name, help text and
//! label pairs copied per child): with 10,000 tenants its per-tenant children were about
//! 15 MB. Here a tenant costs its record (counters by outcome, the partner-call histogram)
//! and the scrape builds the same families, names, labels and values as before.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};

/// A counter another module may hold on to (the cached token keeps its tenant's hit counter).
pub type CounterHandle = Arc<AtomicU64>;

/// Counters of one tenant by the value of their second label (`outcome`, `status_class`,
/// `reason`): a handful each, so a short list.
#[derive(Default)]
struct Labelled(Mutex<Vec<(&'static str, CounterHandle)>>);

impl Labelled {
    fn handle(&self, value: &'static str) -> CounterHandle {
        let mut list = self.0.lock().expect("tenant counters");
        if let Some((_, c)) = list.iter().find(|(v, _)| *v == value) {
            return c.clone();
        }
        let c = CounterHandle::default();
        list.push((value, c.clone()));
        c
    }

    fn inc(&self, value: &'static str) {
        self.handle(value).fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let list = self.0.lock().expect("tenant counters");
        list.iter()
            .map(|(v, c)| (*v, c.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A histogram's counts per bucket (not cumulative), total count and sum (f64 bits).
struct Hist {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_bits: AtomicU64,
}

impl Hist {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_bits: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|b| v <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .sum_bits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn proto(&self) -> proto::Histogram {
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(self.buckets.iter())
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                let mut b = proto::Bucket::default();
                b.set_upper_bound(*bound);
                b.set_cumulative_count(cumulative);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_count(self.count.load(Ordering::Relaxed).max(cumulative));
        h.set_sample_sum(f64::from_bits(self.sum_bits.load(Ordering::Relaxed)));
        h
    }
}

/// "No value" for the gauges below.
const UNSET: i64 = i64::MIN;

/// Everything exported about one tenant.
struct Tenant {
    token_requests: Labelled,
    upstream_requests: Labelled,
    invalidations: Labelled,
    proxy_requests: Labelled,
    proxy_cutoffs: Labelled,
    upstream_duration: std::sync::OnceLock<Hist>,
    proxy_duration: std::sync::OnceLock<Hist>,
    /// `broker_circuit_open`: UNSET until the tenant first fails here.
    circuit_open: AtomicI64,
    /// `broker_last_mint_success_timestamp_seconds`: UNSET until a mint succeeds here.
    last_mint_success: AtomicI64,
    /// When the cached token expires (ms); `broker_token_expiry_seconds` counts down to it.
    expiry_at_ms: AtomicI64,
}

impl Default for Tenant {
    fn default() -> Self {
        Self {
            token_requests: Labelled::default(),
            upstream_requests: Labelled::default(),
            invalidations: Labelled::default(),
            proxy_requests: Labelled::default(),
            proxy_cutoffs: Labelled::default(),
            upstream_duration: std::sync::OnceLock::new(),
            proxy_duration: std::sync::OnceLock::new(),
            circuit_open: AtomicI64::new(UNSET),
            last_mint_success: AtomicI64::new(UNSET),
            expiry_at_ms: AtomicI64::new(UNSET),
        }
    }
}

impl Tenant {
    /// This tenant's series, each pushed onto its family's list (indexed like `FAMILIES`).
    fn export(&self, id: &str, now_ms: i64, metrics: &mut [Vec<proto::Metric>]) {
        let t = self;
        let labelled = [
            (TOKEN_REQUESTS, &t.token_requests),
            (UPSTREAM_REQUESTS, &t.upstream_requests),
            (INVALIDATIONS, &t.invalidations),
            (PROXY_REQUESTS, &t.proxy_requests),
            (PROXY_CUTOFFS, &t.proxy_cutoffs),
        ];
        for (family, counters) in labelled {
            for (value, n) in counters.snapshot() {
                let mut m = metric(id, FAMILIES[family].second_label.map(|l| (l, value)));
                let mut c = proto::Counter::default();
                c.set_value(n as f64);
                m.set_counter(c);
                metrics[family].push(m);
            }
        }
        for (family, hist) in [
            (UPSTREAM_DURATION, &t.upstream_duration),
            (PROXY_DURATION, &t.proxy_duration),
        ] {
            if let Some(h) = hist.get() {
                let mut m = metric(id, None);
                m.set_histogram(h.proto());
                metrics[family].push(m);
            }
        }
        // An expired token stays visible at 0 until a new one arrives (or the tenant's
        // token is dropped): an alert on "< 60" must see it reach zero.
        let expiry = t.expiry_at_ms.load(Ordering::Relaxed);
        let gauges = [
            (
                TOKEN_EXPIRY,
                (expiry != UNSET).then(|| ((expiry - now_ms) / 1000).max(0)),
            ),
            (CIRCUIT_OPEN, Some(t.circuit_open.load(Ordering::Relaxed))),
            (
                LAST_MINT_SUCCESS,
                Some(t.last_mint_success.load(Ordering::Relaxed)),
            ),
        ];
        for (family, value) in gauges {
            if let Some(v) = value.filter(|v| *v != UNSET) {
                let mut m = metric(id, None);
                let mut g = proto::Gauge::default();
                g.set_value(v as f64);
                m.set_gauge(g);
                metrics[family].push(m);
            }
        }
    }
}

/// A family's name, help and second label (if any): the contract, in one table.
struct FamilyDef {
    name: &'static str,
    help: &'static str,
    second_label: Option<&'static str>,
    kind: MetricType,
}

const TOKEN_REQUESTS: usize = 0;
const UPSTREAM_REQUESTS: usize = 1;
const UPSTREAM_DURATION: usize = 2;
const TOKEN_EXPIRY: usize = 3;
const INVALIDATIONS: usize = 4;
const PROXY_REQUESTS: usize = 5;
const PROXY_CUTOFFS: usize = 6;
const PROXY_DURATION: usize = 7;
const CIRCUIT_OPEN: usize = 8;
const LAST_MINT_SUCCESS: usize = 9;

const FAMILIES: [FamilyDef; 10] = [
    FamilyDef { name: "broker_token_requests_total", help: "Token fetches by tenant and outcome", second_label: Some("outcome"), kind: MetricType::COUNTER },
    FamilyDef { name: "broker_upstream_requests_total", help: "Token requests sent to partners, by tenant and outcome", second_label: Some("outcome"), kind: MetricType::COUNTER },
    FamilyDef { name: "broker_upstream_request_duration_seconds", help: "Partner token request latency", second_label: None, kind: MetricType::HISTOGRAM },
    FamilyDef { name: "broker_token_expiry_seconds", help: "Seconds left on the tenant's cached token", second_label: None, kind: MetricType::GAUGE },
    FamilyDef { name: "broker_invalidations_total", help: "Callers' reports of rejected tokens, by tenant and outcome (dropped, stale, throttled)", second_label: Some("outcome"), kind: MetricType::COUNTER },
    FamilyDef { name: "broker_proxy_requests_total", help: "Proxied partner API calls, by tenant and the status class answered (2xx, 3xx, 4xx, 5xx)", second_label: Some("status_class"), kind: MetricType::COUNTER },
    FamilyDef { name: "broker_proxy_cutoffs_total", help: "Proxied calls refused or cut off by a limit, by tenant and reason (response_too_large, response_timeout, caller_concurrency)", second_label: Some("reason"), kind: MetricType::COUNTER },
    FamilyDef { name: "broker_proxy_request_duration_seconds", help: "Proxied partner API call latency, to the answer's head", second_label: None, kind: MetricType::HISTOGRAM },
    FamilyDef { name: "broker_circuit_open", help: "1 while the tenant's partner calls are paused or probed after a failed mint, 0 once one succeeds", second_label: None, kind: MetricType::GAUGE },
    FamilyDef { name: "broker_last_mint_success_timestamp_seconds", help: "Unix time of the tenant's last successful mint by this replica", second_label: None, kind: MetricType::GAUGE },
];

/// Partner token request latency buckets: 10 ms to 10 s.
pub const UPSTREAM_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Proxied call latency buckets: 1 ms to 10 s.
pub const PROXY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every tenant's series, and the collector that exports them.
pub struct TenantSeries {
    /// Read-locked on every event (workers share it), write-locked only for a new tenant.
    tenants: RwLock<HashMap<Box<str>, Arc<Tenant>>>,
    descs: Vec<Desc>,
}

impl Default for TenantSeries {
    fn default() -> Self {
        Self::new()
    }
}

impl TenantSeries {
    pub fn new() -> Self {
        let descs = FAMILIES
            .iter()
            .map(|f| {
                let mut labels = vec!["tenant".to_owned()];
                labels.extend(f.second_label.map(str::to_owned));
                Desc::new(f.name.into(), f.help.into(), labels, HashMap::new())
                    .expect("a valid metric descriptor")
            })
            .collect();
        Self {
            tenants: RwLock::new(HashMap::new()),
            descs,
        }
    }

    fn tenant(&self, id: &str) -> Arc<Tenant> {
        if let Some(t) = self.tenants.read().expect("tenant series").get(id) {
            return t.clone();
        }
        let mut map = self.tenants.write().expect("tenant series");
        map.entry(id.into()).or_default().clone()
    }

    /// `broker_token_requests_total{tenant,outcome}` as a handle to keep.
    pub fn token_requests_handle(&self, tenant: &str, outcome: &'static str) -> CounterHandle {
        self.tenant(tenant).token_requests.handle(outcome)
    }

    pub fn token_request(&self, tenant: &str, outcome: &'static str) {
        self.tenant(tenant).token_requests.inc(outcome);
    }

    pub fn upstream(&self, tenant: &str, outcome: &'static str, seconds: f64) {
        let t = self.tenant(tenant);
        t.upstream_requests.inc(outcome);
        t.upstream_duration
            .get_or_init(|| Hist::new(UPSTREAM_BUCKETS))
            .observe(seconds);
    }

    pub fn invalidation(&self, tenant: &str, outcome: &'static str) {
        self.tenant(tenant).invalidations.inc(outcome);
    }

    pub fn proxied(&self, tenant: &str, status_class: &'static str, seconds: f64) {
        let t = self.tenant(tenant);
        t.proxy_requests.inc(status_class);
        t.proxy_duration
            .get_or_init(|| Hist::new(PROXY_BUCKETS))
            .observe(seconds);
    }

    pub fn proxy_cutoff(&self, tenant: &str, reason: &'static str) {
        self.tenant(tenant).proxy_cutoffs.inc(reason);
    }

    pub fn set_last_mint_success(&self, tenant: &str, unix_s: i64) {
        self.tenant(tenant)
            .last_mint_success
            .store(unix_s, Ordering::Relaxed);
    }

    /// Sets the circuit gauge; `only_if_present` leaves a tenant without the series alone.
    pub fn set_circuit(&self, tenant: &str, open: bool, only_if_present: bool) {
        let t = self.tenant(tenant);
        if only_if_present && t.circuit_open.load(Ordering::Relaxed) == UNSET {
            return;
        }
        t.circuit_open.store(i64::from(open), Ordering::Relaxed);
    }

    /// Tenants whose circuit gauge is 1.
    pub fn circuits_open(&self) -> Vec<String> {
        let map = self.tenants.read().expect("tenant series");
        map.iter()
            .filter(|(_, t)| t.circuit_open.load(Ordering::Relaxed) == 1)
            .map(|(id, _)| id.to_string())
            .collect()
    }

    pub fn set_expiry(&self, tenant: &str, expires_at_ms: i64) {
        self.tenant(tenant)
            .expiry_at_ms
            .store(expires_at_ms, Ordering::Relaxed);
    }

    pub fn clear_expiry(&self, tenant: &str) {
        let map = self.tenants.read().expect("tenant series");
        if let Some(t) = map.get(tenant) {
            t.expiry_at_ms.store(UNSET, Ordering::Relaxed);
        }
    }

    /// Drops every series of the tenant.
    pub fn forget(&self, tenant: &str) {
        self.tenants.write().expect("tenant series").remove(tenant);
    }

    /// The families, as the scrape at `now_ms` sees them.
    fn families(&self, now_ms: i64) -> Vec<MetricFamily> {
        let tenants: Vec<(String, Arc<Tenant>)> = {
            let map = self.tenants.read().expect("tenant series");
            map.iter()
                .map(|(k, t)| (k.to_string(), t.clone()))
                .collect()
        };
        let mut metrics: Vec<Vec<proto::Metric>> = FAMILIES.iter().map(|_| Vec::new()).collect();
        for (id, t) in &tenants {
            t.export(id, now_ms, &mut metrics);
        }
        FAMILIES
            .iter()
            .zip(metrics)
            .filter(|(_, m)| !m.is_empty())
            .map(|(def, m)| {
                let mut f = MetricFamily::default();
                f.set_name(def.name.into());
                f.set_help(def.help.into());
                f.set_field_type(def.kind);
                f.set_metric(m);
                f
            })
            .collect()
    }
}

/// A metric with its labels sorted by name, as the prometheus crate writes them.
fn metric(tenant: &str, second: Option<(&str, &str)>) -> proto::Metric {
    let pair = |name: &str, value: &str| {
        let mut l = proto::LabelPair::default();
        l.set_name(name.into());
        l.set_value(value.into());
        l
    };
    let mut labels = vec![pair("tenant", tenant)];
    if let Some((name, value)) = second {
        labels.push(pair(name, value));
    }
    labels.sort_by(|a, b| a.get_name().cmp(b.get_name()));
    let mut m = proto::Metric::default();
    m.set_label(labels);
    m
}

/// The collector registered with the registry (the series themselves are shared).
#[derive(Clone)]
pub struct Exporter(pub Arc<TenantSeries>);

impl Collector for Exporter {
    fn desc(&self) -> Vec<&Desc> {
        self.0.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.families(crate::time::now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(series: &Arc<TenantSeries>, now_ms: i64) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &series.families(now_ms),
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn exports_what_the_labelled_vectors_did() {
        let s = Arc::new(TenantSeries::new());
        s.token_request("t1", "minted");
        let hits = s.token_requests_handle("t1", "cache");
        hits.fetch_add(3, Ordering::Relaxed);
        s.upstream("t1", "ok", 0.03);
        s.upstream("t1", "ok", 20.0);
        s.set_expiry("t1", 90_500);
        s.set_last_mint_success("t1", 1_700_000_000);
        s.set_circuit("t2", true, true);
        s.proxy_cutoff("t2", "caller_concurrency");
        let t = text(&s, 30_000);
        for line in [
            "broker_token_requests_total{outcome=\"minted\",tenant=\"t1\"} 1",
            "broker_token_requests_total{outcome=\"cache\",tenant=\"t1\"} 3",
            "broker_upstream_requests_total{outcome=\"ok\",tenant=\"t1\"} 2",
            "broker_upstream_request_duration_seconds_bucket{tenant=\"t1\",le=\"0.01\"} 0",
            "broker_upstream_request_duration_seconds_bucket{tenant=\"t1\",le=\"0.05\"} 1",
            "broker_upstream_request_duration_seconds_bucket{tenant=\"t1\",le=\"10\"} 1",
            "broker_upstream_request_duration_seconds_bucket{tenant=\"t1\",le=\"+Inf\"} 2",
            "broker_upstream_request_duration_seconds_sum{tenant=\"t1\"} 20.03",
            "broker_upstream_request_duration_seconds_count{tenant=\"t1\"} 2",
            "broker_token_expiry_seconds{tenant=\"t1\"} 60",
            "broker_last_mint_success_timestamp_seconds{tenant=\"t1\"} 1700000000",
            "broker_proxy_cutoffs_total{reason=\"caller_concurrency\",tenant=\"t2\"} 1",
            "# TYPE broker_upstream_request_duration_seconds histogram",
        ] {
            assert!(t.contains(line), "missing {line} in\n{t}");
        }
        // A circuit series only for tenants that failed (set_circuit with only_if_present
        // does not create one), and an expired token shows 0, not a negative number.
        assert!(!t.contains("broker_circuit_open"), "{t}");
        s.set_circuit("t2", true, false);
        s.set_circuit("t1", false, true);
        let t = text(&s, 200_000);
        assert!(t.contains("broker_circuit_open{tenant=\"t2\"} 1"), "{t}");
        assert!(!t.contains("broker_circuit_open{tenant=\"t1\"}"), "{t}");
        assert!(
            t.contains("broker_token_expiry_seconds{tenant=\"t1\"} 0"),
            "{t}"
        );
        assert_eq!(s.circuits_open(), vec!["t2".to_string()]);
        s.clear_expiry("t1");
        s.forget("t2");
        let t = text(&s, 200_000);
        assert!(!t.contains("broker_token_expiry_seconds"), "{t}");
        assert!(!t.contains("t2"), "{t}");
    }
}
