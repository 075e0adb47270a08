//! Unauthenticated operational routes: `/healthz` (the process answers), `/readyz` (the broker answers a real
//! round trip within a budget), `/metrics` and the OpenAPI document. They must stay cheap: probes hit them often.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::Api;

/// The OpenAPI 3.1 description of every route, kept next to the handlers it describes.
pub const OPENAPI: &str = include_str!("openapi.json");

/// How long readiness waits for the broker: shorter than a typical probe timeout, so an unready node answers
/// 503 instead of having the probe time out.
const READY_BUDGET: Duration = Duration::from_secs(2);

pub async fn healthz() -> &'static str {
    "ok"
}

pub async fn readyz(State(api): State<Api>) -> Response {
    let broker = match tokio::time::timeout(READY_BUDGET, api.app.broker.ping()).await {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: broker ping failed");
            "unavailable"
        }
        Err(_) => "timeout",
    };
    let checks = json!({ "broker": broker });
    if broker == "ok" {
        axum::Json(json!({"status": "ready", "checks": checks})).into_response()
    } else {
        let mut res = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "checks": checks})),
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
        api.metrics.render() + &api.app.hub.render_metrics(),
    )
        .into_response()
}

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
