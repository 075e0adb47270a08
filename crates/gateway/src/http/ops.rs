//! Unauthenticated operational routes: `/healthz` (the process answers), `/readyz` (Redis and the store, if any,
//! answer a real round trip within a budget), `/metrics` and the OpenAPI document. They must stay cheap: probes hit them often.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Api;

/// The OpenAPI 3.1 description of every route, kept next to the handlers it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

pub async fn healthz() -> &'static str {
    "ok"
}

/// One readiness check: whether the dependency answered a real round trip within `budget`, how long it took,
/// and why not.
async fn check<E: std::fmt::Display>(
    budget: Duration,
    ping: impl std::future::Future<Output = Result<(), E>>,
) -> (bool, Value) {
    let started = Instant::now();
    let (ok, error) = match tokio::time::timeout(budget, ping).await {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: ping failed");
            (false, Some("unavailable".to_owned()))
        }
        Err(_) => (
            false,
            Some(format!("no answer within {} ms", budget.as_millis())),
        ),
    };
    let ms = started.elapsed().as_millis() as u64;
    (ok, json!({"ok": ok, "ms": ms, "error": error}))
}

/// Ready when Redis and (if the gateway has one) the store each answer a ping within their call timeout
/// (`ResilienceConfig::broker_timeout` / `store_timeout`), both pinged at once. The breakers are not consulted:
/// readiness reports what the dependencies answer now.
pub async fn readyz(State(api): State<Api>) -> Response {
    let r = &api.app.resilience.config;
    let redis = check(r.broker_timeout, api.app.broker.ping());
    let store = async {
        match &api.app.config.store {
            Some(store) => Some(check(r.store_timeout, store.ping()).await),
            None => None,
        }
    };
    let ((redis_ok, redis), store) = tokio::join!(redis, store);
    let mut checks = json!({ "redis": redis });
    let mut ready = redis_ok;
    if let Some((ok, pg)) = store {
        checks["postgres"] = pg;
        ready &= ok;
    }
    if ready {
        axum::Json(json!({"status": "ready", "checks": checks})).into_response()
    } else {
        let mut res = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unready", "checks": checks})),
        )
            .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
        res
    }
}

pub async fn metrics(State(api): State<Api>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        api.metrics.render()
            + &api.app.hub.render_metrics()
            + &api
                .app
                .resilience
                .render_metrics(api.app.config.store.is_some()),
    )
        .into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
