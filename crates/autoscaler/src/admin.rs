//! The autoscaler's admin listener (`--admin-listen`, default `127.0.0.1:9465`): `GET /metrics` (the process
//! registry, with the `ferry_autoscaler_*` series an HPA or KEDA can scale on), `GET /healthz` (alive) and
//! `GET /readyz` (a complete round ended within three intervals).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_telemetry::prometheus::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub last_round: Arc<Mutex<Option<Instant>>>,
    pub interval: Duration,
}

pub async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route("/readyz", get(readyz))
        .with_state(admin);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

async fn metrics(State(admin): State<Admin>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            ferry_telemetry::metrics::TEXT_CONTENT_TYPE,
        )],
        ferry_telemetry::metrics::render(&admin.registry),
    )
        .into_response()
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let last = *admin.last_round.lock().unwrap_or_else(|p| p.into_inner());
    let age = last.map(|t| t.elapsed());
    let ready = age.is_some_and(|a| a <= admin.interval * 3);
    let body = json!({
        "status": if ready { "ready" } else { "unready" },
        "checks": {"rounds": {
            "ok": ready,
            "last_round_ms_ago": age.map(|a| a.as_millis() as u64),
        }},
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
