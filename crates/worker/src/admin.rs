//! The worker's admin listener (`ferry worker --admin-listen`, default `127.0.0.1:9464`):
//!
//! * `GET /metrics`: the process registry in the Prometheus text format;
//! * `GET /healthz`: 200 while the process runs;
//! * `GET /readyz`: 200 when Redis (and the store, when a recorder runs) answer a ping within
//!   [`READY_BUDGET`] and the worker is not draining; otherwise 503 with the same body shape as the gateway's
//!   `/readyz`: `{"status": "unready", "checks": {"redis": {"ok", "ms", "error"}, ...}}`.
//!
//! Readiness turns false as soon as the drain starts, while the listener keeps serving until the process is done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_broker::Broker;
use ferry_telemetry::prometheus::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::WorkerMonitor;

/// Longest a readiness ping may take.
pub const READY_BUDGET: Duration = Duration::from_secs(2);

/// An extra readiness check (the store's ping): a fresh future per probe, `Err` with a reason when down.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the admin routes read.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub broker: Arc<dyn Broker>,
    pub worker: WorkerMonitor,
    /// Extra dependencies by name (`postgres` while a recorder runs).
    pub checks: Vec<(&'static str, ReadyCheck)>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("worker", &self.worker)
            .field(
                "checks",
                &self.checks.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The admin routes.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(admin)
}

/// Serve the admin routes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    admin: Admin,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(admin))
        .with_graceful_shutdown(async move { shutdown.cancelled_owned().await })
        .await
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

async fn check<E: std::fmt::Display>(ping: impl Future<Output = Result<(), E>>) -> (bool, Value) {
    let started = Instant::now();
    let (ok, error) = match tokio::time::timeout(READY_BUDGET, ping).await {
        Ok(Ok(())) => (true, None),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: ping failed");
            (false, Some("unavailable".to_owned()))
        }
        Err(_) => (
            false,
            Some(format!("no answer within {} ms", READY_BUDGET.as_millis())),
        ),
    };
    let ms = started.elapsed().as_millis() as u64;
    (ok, json!({"ok": ok, "ms": ms, "error": error}))
}

async fn readyz(State(admin): State<Admin>) -> Response {
    let redis = check(admin.broker.ping());
    let others = futures::future::join_all(
        admin
            .checks
            .iter()
            .map(|(name, f)| async move { (*name, check(f()).await) }),
    );
    let ((redis_ok, redis), others) = tokio::join!(redis, others);
    let mut ready = redis_ok;
    let mut checks = json!({ "redis": redis });
    for (name, (ok, v)) in others {
        checks[name] = v;
        ready &= ok;
    }
    let draining = admin.worker.draining();
    checks["worker"] = json!({
        "ok": !draining,
        "error": draining.then_some("draining"),
    });
    ready &= !draining;
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
