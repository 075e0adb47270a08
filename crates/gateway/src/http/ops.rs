//! Unauthenticated operational routes: `/healthz` (the process answers, even while draining), `/readyz` (not
//! draining; Redis answers a real round trip within a budget; the pub/sub canary comes back through this node's
//! channel feed; the store, if any, is checked and reported but only degrades), `/metrics` and the OpenAPI
//! document. They must stay cheap: probes hit them often.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use ferry_telemetry::admin::{Check, metrics_response, ready_response};
use ferry_telemetry::health::Need;
use serde_json::{Value, json};

use super::Api;

/// The OpenAPI 3.1 description of every route, kept next to the handlers it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The process is alive: 200 whatever the dependencies, and while draining too (a drain is not a reason to
/// restart the process).
pub async fn healthz() -> &'static str {
    "ok"
}

/// Redis's and (if the gateway has one) the store's round trips within their call timeouts
/// (`ResilienceConfig::broker_timeout` / `store_timeout`), at once; each sets `ferry_dependency_up`.
async fn dependencies(api: &Api) -> ((bool, Value), Option<(bool, Value)>) {
    let r = &api.app.resilience.config;
    let redis = ferry_telemetry::health::check(r.broker_timeout, api.app.broker.ping());
    let store = async {
        match &api.app.config.store {
            Some(store) => {
                Some(ferry_telemetry::health::check(r.store_timeout, store.ping()).await)
            }
            None => None,
        }
    };
    let (redis, store) = tokio::join!(redis, store);
    if !api.app.config.readiness.embedded {
        let up = &api.metrics.dependency_up;
        up.set("redis", redis.0);
        if let Some((ok, _)) = &store {
            up.set("postgres", *ok);
        }
    }
    (redis, store)
}

/// Ready when the node is not draining, Redis answers a ping within its call timeout and the pub/sub canary
/// ([`crate::ws::Hub::probe_pubsub`]) comes back within `ReadinessConfig::pubsub_budget`, all checked at once.
/// The store is checked alongside, but submissions, lookups of live jobs and fan-out need only Redis: a store
/// that does not answer leaves the node ready, `"status": "degraded"` with the `postgres` check false (see
/// [`ferry_telemetry::health`]), so a load balancer keeps the gateways through a database outage. The breakers
/// are not consulted: readiness reports what the dependencies answer now. A draining node answers 503
/// `draining` at once, without checking anything.
pub async fn readyz(State(api): State<Api>) -> Response {
    let hub = &api.app.hub;
    if hub.is_draining() {
        return ready_response(Vec::new(), true);
    }
    let pubsub = hub.probe_pubsub(api.app.config.readiness.pubsub_budget);
    let ((redis, store), pubsub) = tokio::join!(dependencies(&api), pubsub);
    // `ferry dev` has neither Redis nor PostgreSQL: its checks name what it has.
    let (broker_check, store_check) = if api.app.config.readiness.embedded {
        ("engine", "store")
    } else {
        ("redis", "postgres")
    };
    let mut checks = vec![
        Check::dependency(broker_check, Need::Required, redis),
        Check::state(
            "pubsub",
            pubsub.ok,
            json!({"ok": pubsub.ok, "ms": pubsub.ms, "error": pubsub.error}),
        ),
    ];
    if let Some(pg) = store {
        checks.push(Check::dependency(store_check, Need::Degraded, pg));
    }
    // Draining may have started while the checks ran.
    ready_response(checks, hub.is_draining())
}

pub async fn metrics(State(api): State<Api>) -> Response {
    // The round trips set `ferry_dependency_up`, so the scrape reports the dependencies as they answer now,
    // whether or not anything probes `/readyz`.
    dependencies(&api).await;
    metrics_response(super::metrics::render_all(&api))
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
