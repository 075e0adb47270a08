//! The gateway's Prometheus metrics, served by `GET /metrics` (names in `docs/metrics.md`). The registry is the
//! process's ([`crate::GatewayConfig::registry`], shared with `ferry dev`'s embedded worker) or one per router,
//! never the global default registry, so several gateways can run in one test process. It holds the
//! process and runtime collectors (see [`ferry_telemetry::metrics`]), `ferry_http_requests_total` and
//! `ferry_http_request_duration_seconds` by method and route template, and `ferry_jobs_enqueued_total` by broker
//! queue (the tenant-prefixed name, e.g. `acme:emails`: the name workers and the queue gauges use). The hub, the
//! resilience layer and the store's pool are read at scrape time ([`render_all`]).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use ferry_telemetry::prometheus::proto::MetricFamily;
use ferry_telemetry::prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use std::sync::Arc;
use tracing::Instrument as _;

use super::Api;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    enqueued: IntCounterVec,
    auth_failures: IntCounterVec,
    /// `ferry_dependency_up`, set by `/readyz` and by each scrape ([`super::ops`]).
    pub(crate) dependency_up: ferry_telemetry::health::DependencyUp,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(ferry_telemetry::metrics::registry())
    }
}

impl Metrics {
    /// The gateway's series, registered in `registry` (which should hold the process collectors: see
    /// [`ferry_telemetry::metrics::registry`]).
    pub fn new(registry: Registry) -> Self {
        let requests = IntCounterVec::new(
            Opts::new(
                "ferry_http_requests_total",
                "HTTP requests by method, route and status.",
            ),
            &["method", "route", "status"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "ferry_http_request_duration_seconds",
                "HTTP request latency by method and route.",
            )
            .buckets(ferry_telemetry::metrics::SECONDS_BUCKETS.to_vec()),
            &["method", "route"],
        )
        .expect("valid metric");
        let enqueued = IntCounterVec::new(
            Opts::new(
                "ferry_jobs_enqueued_total",
                "Jobs accepted, by broker queue (duplicates by idempotency key excluded).",
            ),
            &["queue"],
        )
        .expect("valid metric");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "ferry_http_auth_failures_total",
                "HTTP requests refused for their token, by outcome: unauthorized (401), too_many_failures (429 \
                 after repeated failures from one address).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for c in [requests.clone(), enqueued.clone(), auth_failures.clone()] {
            ferry_telemetry::metrics::register_or_log(&registry, Box::new(c));
        }
        ferry_telemetry::metrics::register_or_log(&registry, Box::new(duration.clone()));
        let dependency_up = ferry_telemetry::health::DependencyUp::register(&registry);
        Self {
            dependency_up,
            registry,
            requests,
            duration,
            enqueued,
            auth_failures,
        }
    }
}

impl Metrics {
    fn record(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .with_label_values(&[method, route, status.to_string().as_str()])
            .inc();
        self.duration
            .with_label_values(&[method, route])
            .observe(seconds);
    }

    /// Count `n` jobs accepted on the broker queue `queue` (not duplicates).
    pub fn enqueued(&self, queue: &str, n: u64) {
        if n > 0 {
            self.enqueued.with_label_values(&[queue]).inc_by(n);
        }
    }

    /// Count a request refused for its token (`unauthorized` or `too_many_failures`).
    pub fn count_auth_failure(&self, outcome: &str) {
        self.auth_failures.with_label_values(&[outcome]).inc();
    }

    /// The router's registry (process, runtime, HTTP and submission metrics).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry's metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        ferry_telemetry::metrics::render(&self.registry)
    }
}

/// Everything `/metrics` serves: the router's registry, the hub, the resilience layer and the store's pool.
pub fn render_all(api: &Api) -> String {
    let mut families: Vec<MetricFamily> = api.metrics.registry.gather();
    families.extend(api.app.hub.metric_families());
    families.extend(api.app.cluster.metric_families());
    families.extend(api.app.connections.metric_families());
    let store = api.app.config.store.as_ref();
    families.extend(api.app.resilience.metric_families(store.is_some()));
    if let Some(p) = store.and_then(|s| s.pool_stats()) {
        families.extend(pool_families(p));
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
    ferry_telemetry::metrics::render_families(&families)
}

fn pool_families(p: ferry_store::PoolStats) -> Vec<MetricFamily> {
    use ferry_telemetry::metrics::{FnCollector, FnKind};
    use ferry_telemetry::prometheus::core::Collector;
    let states = [
        ("size", p.size),
        ("available", p.available),
        ("waiting", p.waiting),
    ];
    let collectors = [
        FnCollector::new(
            "ferry_db_pool_connections",
            "PostgreSQL pool connections: size (open), available (idle), waiting (callers waiting for one).",
            FnKind::Gauge,
            &["state"],
            move |out| {
                out.extend(
                    states
                        .iter()
                        .map(|(s, n)| (vec![(*s).to_owned()], *n as f64)),
                )
            },
        ),
        FnCollector::single(
            "ferry_db_pool_max",
            "Configured PostgreSQL pool size.",
            FnKind::Gauge,
            move || p.max as f64,
        ),
    ];
    collectors
        .into_iter()
        .flatten()
        .flat_map(|c| c.collect())
        .collect()
}

/// Middleware: a server span for every request, named `{method} {route}` and joined to the request's W3C
/// `traceparent` (handlers' own spans, such as `submit_job`, are its children); and every response counted and
/// timed by its route template (`/v1/jobs/{id}`, not the id), or `unmatched`.
pub async fn track(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "http_request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(parent) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        ferry_telemetry::set_remote_parent(&span, parent);
    }
    let started = Instant::now();
    let res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    span.record("http.response.status_code", status);
    metrics.record(&method, &route, status, started.elapsed().as_secs_f64());
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renders_counters_with_labels() {
        let m = Metrics::default();
        m.record("GET", "/v1/jobs/{id}", 200, 0.01);
        m.record("GET", "/v1/jobs/{id}", 200, 0.02);
        m.record("POST", "unmatched", 404, 0.001);
        m.enqueued("acme:emails", 2);
        let text = m.render();
        assert!(text.contains(
            "ferry_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"200\"} 2"
        ));
        assert!(text.contains("# TYPE ferry_http_requests_total counter"));
        assert!(text.contains(
            "ferry_http_request_duration_seconds_count{method=\"GET\",route=\"/v1/jobs/{id}\"} 2"
        ));
        assert!(text.contains("ferry_jobs_enqueued_total{queue=\"acme:emails\"} 2"));
        assert!(text.contains("ferry_build_info{version="), "{text}");
    }
}
