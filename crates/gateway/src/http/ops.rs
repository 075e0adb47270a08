//! Unauthenticated operational routes: `/healthz` (the process answers, even while draining), `/readyz` (not
//! draining; Redis and the store, if any, answer a real round trip within a budget; the pub/sub canary comes
//! back through this node's channel feed), `/metrics` and the OpenAPI document. They must stay cheap: probes hit
//! them often.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Api;

/// The OpenAPI 3.1 description of every route, kept next to the handlers it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The process is alive: 200 whatever the dependencies, and while draining too (a drain is not a reason to
/// restart the process).
pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready when the node is not draining, Redis and (if the gateway has one) the store each answer a ping within
/// their call timeout (`ResilienceConfig::broker_timeout` / `store_timeout`), and the pub/sub canary
/// ([`crate::ws::Hub::probe_pubsub`]) comes back within `ReadinessConfig::pubsub_budget`, all at once. The
/// breakers are not consulted: readiness reports what the dependencies answer now. A draining node answers 503
/// `draining` at once, without checking anything.
pub async fn readyz(State(api): State<Api>) -> Response {
    let hub = &api.app.hub;
    if hub.is_draining() {
        return unready(json!({"status": "draining", "checks": {}}));
    }
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
    let pubsub = hub.probe_pubsub(api.app.config.readiness.pubsub_budget);
    let ((redis_ok, redis), store, pubsub) = tokio::join!(redis, store, pubsub);
    let mut checks = json!({
        "redis": redis,
        "pubsub": {"ok": pubsub.ok, "ms": pubsub.ms, "error": pubsub.error},
    });
    let mut ready = redis_ok && pubsub.ok;
    if let Some((ok, pg)) = store {
        checks["postgres"] = pg;
        ready &= ok;
    }
    if hub.is_draining() {
        // Started draining while the checks ran.
        return unready(json!({"status": "draining", "checks": checks}));
    }
    if ready {
        axum::Json(json!({"status": "ready", "checks": checks})).into_response()
    } else {
        unready(json!({"status": "unready", "checks": checks}))
    }
}

fn unready(body: Value) -> Response {
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    res
}

pub async fn metrics(State(api): State<Api>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            ferry_telemetry::metrics::TEXT_CONTENT_TYPE,
        )],
        super::metrics::render_all(&api),
    )
        .into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
