//! The worker's admin listener (`ferry worker --admin-listen`, default `127.0.0.1:9464`):
//!
//! * `GET /metrics`: the process registry in the Prometheus text format, after the readiness round trips that
//!   set `ferry_dependency_up`;
//! * `GET /healthz`: 200 while the process runs;
//! * `GET /readyz`: 200 when Redis answers a ping within [`Admin::ready_budget`] and the worker is not draining;
//!   otherwise 503, with the same body shape as the gateway's `/readyz`:
//!   `{"status": "unready", "checks": {"redis": {"ok", "ms", "error"}, ...}}`. The store (while a recorder runs)
//!   is checked too, but jobs run without it (the event log keeps what the recorder has not written), so a store
//!   that does not answer leaves the worker ready, `"status": "degraded"` (see [`ferry_telemetry::health`]).
//!
//! * `GET /debug/pprof/profile?seconds=10&hz=99`: a CPU profile of the process in the pprof protobuf format
//!   (`go tool pprof`), only when [`Admin::profiling`] is on (`--profiling`); otherwise 404 saying how to turn
//!   it on. One capture at a time (409 for the rest), `seconds` 1–60, `hz` 1–1000; errors are problem+json.
//!   Like the rest of the listener it has no authentication: keep the listener on loopback or a private
//!   interface, never a public one.
//!
//! Readiness turns false as soon as the drain starts, while the listener keeps serving until the process is done.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_broker::Broker;
use ferry_telemetry::health::{DependencyUp, Need};
use ferry_telemetry::profile::{DISABLED_DETAIL, ProfileError, Profiler};
use ferry_telemetry::prometheus::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::WorkerMonitor;

/// Longest a readiness ping may take unless configured (`--ready-budget-ms`).
pub const DEFAULT_READY_BUDGET: Duration = Duration::from_secs(2);

/// An extra readiness check (the store's ping): a fresh future per probe, `Err` with a reason when down.
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the admin routes read.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<Registry>,
    pub broker: Arc<dyn Broker>,
    pub worker: WorkerMonitor,
    /// Extra dependencies by name (`postgres` while a recorder runs). The worker runs jobs without them: a
    /// failed one makes `/readyz` say `degraded`, not unready.
    pub checks: Vec<(&'static str, ReadyCheck)>,
    /// Serve `GET /debug/pprof/profile` (CPU profiles). Off: the route answers 404.
    pub profiling: bool,
    /// Longest each readiness ping may take ([`DEFAULT_READY_BUDGET`] unless configured).
    pub ready_budget: Duration,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("worker", &self.worker)
            .field(
                "checks",
                &self.checks.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            )
            .field("profiling", &self.profiling)
            .finish_non_exhaustive()
    }
}

/// What the handlers share: the settings, and the `ferry_dependency_up` gauge registered once per router.
#[derive(Clone)]
struct Shared {
    admin: Admin,
    up: DependencyUp,
}

/// The admin routes (registers `ferry_dependency_up` in the admin's registry).
pub fn router(admin: Admin) -> Router {
    let up = DependencyUp::register(&admin.registry);
    let profile = if admin.profiling {
        let profiler = Arc::new(Profiler::new());
        get(
            move |query: Result<Query<HashMap<String, String>>, QueryRejection>| {
                let profiler = profiler.clone();
                async move {
                    match query {
                        Ok(Query(query)) => profile(&profiler, &query).await,
                        Err(r) => problem(StatusCode::BAD_REQUEST, r.body_text(), None),
                    }
                }
            },
        )
    } else {
        get(|| async { problem(StatusCode::NOT_FOUND, DISABLED_DETAIL.to_owned(), None) })
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/debug/pprof/profile", profile)
        .with_state(Shared { admin, up })
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

/// A capture through `profiler`, answered as a pprof protobuf download or a problem+json error.
async fn profile(profiler: &Profiler, query: &HashMap<String, String>) -> Response {
    let params = profiler.params(
        query.get("seconds").map(String::as_str),
        query.get("hz").map(String::as_str),
    );
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let captured = match params {
        Ok((seconds, hz)) => profiler.capture(seconds, hz).await,
        Err(e) => Err(e),
    };
    match captured {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"ferry-worker-{started}.pb\""),
                ),
                (header::CACHE_CONTROL, "no-store".to_owned()),
            ],
            body,
        )
            .into_response(),
        Err(ProfileError::BadRequest(field, rule)) => {
            let errors = json!([{"field": field, "message": rule}]);
            problem(
                StatusCode::BAD_REQUEST,
                format!("{field}: {rule}"),
                Some(errors),
            )
        }
        Err(e @ ProfileError::Busy) => problem(StatusCode::CONFLICT, e.to_string(), None),
        Err(ProfileError::Failed(detail)) => {
            tracing::error!(error = %detail, "CPU profile failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the CPU profile could not be captured; see the worker's log".to_owned(),
                None,
            )
        }
    }
}

/// An `application/problem+json` answer, shaped like the gateway's (`errors` names bad parameters).
fn problem(status: StatusCode, detail: String, errors: Option<Value>) -> Response {
    let (slug, title) = match status {
        StatusCode::BAD_REQUEST => ("bad-request", "Bad request"),
        StatusCode::NOT_FOUND => ("not-found", "Not found"),
        StatusCode::CONFLICT => ("conflict", "Conflict"),
        _ => ("internal", "Internal error"),
    };
    let mut body = json!({
        "type": format!("urn:ferry:problem:{slug}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    if let Some(errors) = errors {
        body["errors"] = errors;
    }
    let mut res = (status, axum::Json(body)).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    res
}

async fn metrics(State(shared): State<Shared>) -> Response {
    // The round trips set `ferry_dependency_up`, so the scrape reports the dependencies as they answer now.
    dependencies(&shared).await;
    let admin = &shared.admin;
    (
        [(
            header::CONTENT_TYPE,
            ferry_telemetry::metrics::TEXT_CONTENT_TYPE,
        )],
        ferry_telemetry::metrics::render(&admin.registry),
    )
        .into_response()
}

/// Every dependency's check, by name, with what its failure means; each one also sets `ferry_dependency_up`.
async fn dependencies(shared: &Shared) -> Vec<(&'static str, Need, bool, Value)> {
    let admin = &shared.admin;
    let redis = ferry_telemetry::health::check(admin.ready_budget, admin.broker.ping());
    let others = futures::future::join_all(admin.checks.iter().map(|(name, f)| async move {
        (
            *name,
            ferry_telemetry::health::check(admin.ready_budget, f()).await,
        )
    }));
    let ((redis_ok, redis), others) = tokio::join!(redis, others);
    let mut all = vec![("redis", Need::Required, redis_ok, redis)];
    all.extend(
        others
            .into_iter()
            .map(|(name, (ok, v))| (name, Need::Degraded, ok, v)),
    );
    for (name, _, ok, _) in &all {
        shared.up.set(name, *ok);
    }
    all
}

async fn readyz(State(shared): State<Shared>) -> Response {
    let admin = &shared.admin;
    let deps = dependencies(&shared).await;
    let mut checks = json!({});
    let mut needs = Vec::with_capacity(deps.len() + 1);
    for (name, need, ok, v) in deps {
        checks[name] = v;
        needs.push((need, ok));
    }
    let draining = admin.worker.draining();
    checks["worker"] = json!({
        "ok": !draining,
        "error": draining.then_some("draining"),
    });
    needs.push((Need::Required, !draining));
    let (ready, status) = ferry_telemetry::health::verdict(needs);
    if ready {
        axum::Json(json!({"status": status, "checks": checks})).into_response()
    } else {
        let mut res = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": status, "checks": checks})),
        )
            .into_response();
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1));
        res
    }
}
