//! The admin listener (`--admin-listen`, default `127.0.0.1:9466`): `GET /metrics` (the process registry with
//! the `ferry_balancer_*` series), `GET /healthz` (alive) and `GET /readyz` (taking connections: not draining,
//! a membership read within the last 5 s, at least one eligible gateway).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_telemetry::prometheus::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    registry: Arc<Registry>,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            ferry_telemetry::metrics::TEXT_CONTENT_TYPE,
                        )],
                        ferry_telemetry::metrics::render(&registry),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/healthz",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/readyz",
            get(move || {
                let shared = shared.clone();
                async move { readyz(&shared) }
            }),
        );
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin listener failed");
    }
}

fn readyz(shared: &Shared) -> Response {
    let (ok, body) = shared.ready();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
