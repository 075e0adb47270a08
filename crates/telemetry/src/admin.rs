//! The admin listener every role but the gateway serves (`--admin-listen`; the gateway serves the same routes on
//! its own listener, through [`ready_response`] and [`metrics_response`]):
//!
//! * `GET /metrics`: the process registry in the Prometheus text format, after the readiness checks ran, so the
//!   `ferry_dependency_up` gauges are as fresh as the scrape;
//! * `GET /healthz`: 200 `ok` while the process runs, draining or not;
//! * `GET /readyz`: the role's [`Readiness`] checks, answered `{"status", "checks": {name: {...}}}`: 200 when
//!   `ready` or `degraded`, 503 with `Retry-After: 1` when `unready` or `draining` (the rule is
//!   [`crate::health::verdict`]);
//! * `GET /debug/pprof/profile?seconds=10&hz=99`: a CPU profile in the pprof protobuf format, only when
//!   [`Admin::profiling`] is on; otherwise 404 saying how to turn it on. One capture at a time (409 for the
//!   rest), `seconds` 1–60, `hz` 1–1000; errors are problem+json.
//!
//! The listener has no authentication: keep it on loopback or a private interface, never a public one. The role
//! owns what is checked; this module owns how it is served and answered, the same for every role.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::{DependencyUp, Need};
use crate::profile::{DISABLED_DETAIL, ProfileError, Profiler};

/// One readiness check as `/readyz` reports it.
#[derive(Debug, Clone)]
pub struct Check {
    /// The key under `checks` in the body (`redis`, `postgres`, `worker`, `rounds`...).
    pub name: &'static str,
    /// What a failure means: unready, or ready and degraded.
    pub need: Need,
    pub ok: bool,
    /// The check's own fields (`{"ok", "ms", "error"}` for a round trip).
    pub report: Value,
    /// A dependency's round trip: it also sets `ferry_dependency_up{dependency=name}`.
    pub dependency: bool,
}

impl Check {
    /// A dependency's round trip, as [`crate::health::check`] returns it.
    pub fn dependency(name: &'static str, need: Need, (ok, report): (bool, Value)) -> Self {
        Self {
            name,
            need,
            ok,
            report,
            dependency: true,
        }
    }

    /// A state of the node itself that it cannot serve without (a recent round, an eligible gateway).
    pub fn state(name: &'static str, ok: bool, report: Value) -> Self {
        Self {
            name,
            need: Need::Required,
            ok,
            report,
            dependency: false,
        }
    }
}

/// What a role checks for `/readyz` (and before each `/metrics` scrape).
#[async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// Every check, run at once where they are round trips.
    async fn checks(&self) -> Vec<Check>;

    /// Draining: `/readyz` answers 503 `draining` (with the checks, for the operator).
    fn draining(&self) -> bool {
        false
    }
}

/// What the admin routes serve.
#[derive(Clone)]
pub struct Admin {
    /// The process's one registry (see [`crate::runner::Runner::registry`]).
    pub registry: Registry,
    pub readiness: Arc<dyn Readiness>,
    /// Serve `GET /debug/pprof/profile`. Off: the route answers 404.
    pub profiling: bool,
    /// The role's name, in the profile's file name (`ferry-worker-<time>.pb`).
    pub role: &'static str,
    /// Routes of the role's own, served beside these (the autoscaler's `GET /decisions`).
    pub extra: Option<Router>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("role", &self.role)
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
    let role = admin.role;
    let profile = if admin.profiling {
        let profiler = Arc::new(Profiler::new());
        get(
            move |query: Result<Query<HashMap<String, String>>, QueryRejection>| {
                let profiler = profiler.clone();
                async move {
                    match query {
                        Ok(Query(query)) => profile(&profiler, &query, role).await,
                        Err(r) => problem(StatusCode::BAD_REQUEST, r.body_text(), None),
                    }
                }
            },
        )
    } else {
        get(|| async { problem(StatusCode::NOT_FOUND, DISABLED_DETAIL.to_owned(), None) })
    };
    let extra = admin.extra.clone();
    let routes = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/debug/pprof/profile", profile)
        .with_state(Shared { admin, up });
    match extra {
        Some(extra) => routes.merge(extra),
        None => routes,
    }
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

/// Run the checks and set `ferry_dependency_up` from the dependencies' round trips.
async fn run_checks(shared: &Shared) -> Vec<Check> {
    let checks = shared.admin.readiness.checks().await;
    for c in checks.iter().filter(|c| c.dependency) {
        shared.up.set(c.name, c.ok);
    }
    checks
}

async fn readyz(State(shared): State<Shared>) -> Response {
    let checks = run_checks(&shared).await;
    ready_response(checks, shared.admin.readiness.draining())
}

async fn metrics(State(shared): State<Shared>) -> Response {
    // The round trips set `ferry_dependency_up`, so the scrape reports the dependencies as they answer now,
    // whether or not anything probes `/readyz`.
    run_checks(&shared).await;
    metrics_response(crate::metrics::render(&shared.admin.registry))
}

/// The `/readyz` answer over `checks`: 200 `{"status": "ready" | "degraded", "checks"}`, or 503 with
/// `Retry-After: 1` when a required check failed (`unready`) or the node is `draining`.
pub fn ready_response(checks: Vec<Check>, draining: bool) -> Response {
    let mut body = json!({});
    for c in &checks {
        body[c.name] = c.report.clone();
    }
    let (ready, status) = if draining {
        (false, "draining")
    } else {
        crate::health::verdict(checks.iter().map(|c| (c.need, c.ok)))
    };
    let body = axum::Json(json!({"status": status, "checks": body}));
    if ready {
        return body.into_response();
    }
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, body).into_response();
    res.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(1));
    res
}

/// A Prometheus text exposition.
pub fn metrics_response(text: String) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::TEXT_CONTENT_TYPE)],
        text,
    )
        .into_response()
}

/// A capture through `profiler`, answered as a pprof protobuf download or a problem+json error.
async fn profile(
    profiler: &Profiler,
    query: &HashMap<String, String>,
    role: &'static str,
) -> Response {
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
                    format!("attachment; filename=\"ferry-{role}-{started}.pb\""),
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
                format!("the CPU profile could not be captured; see the {role}'s log"),
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Vec<Check>, bool);

    #[async_trait]
    impl Readiness for Fixed {
        async fn checks(&self) -> Vec<Check> {
            self.0.clone()
        }
        fn draining(&self) -> bool {
            self.1
        }
    }

    async fn get(app: &Router, path: &str) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let res = app
            .clone()
            .oneshot(
                axum::http::Request::get(path)
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = res.status();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    fn app(checks: Vec<Check>, draining: bool) -> Router {
        router(Admin {
            registry: Registry::new(),
            readiness: Arc::new(Fixed(checks, draining)),
            profiling: false,
            role: "test",
            extra: None,
        })
    }

    #[tokio::test]
    async fn readiness_follows_the_checks_and_the_drain() {
        let redis = |ok| Check::dependency("redis", Need::Required, (ok, json!({"ok": ok})));
        let pg = |ok| Check::dependency("postgres", Need::Degraded, (ok, json!({"ok": ok})));
        let (s, body) = get(&app(vec![redis(true), pg(true)], false), "/readyz").await;
        assert_eq!(
            (s, body.contains(r#""status":"ready""#)),
            (StatusCode::OK, true)
        );
        let (s, body) = get(&app(vec![redis(true), pg(false)], false), "/readyz").await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.contains(r#""status":"degraded""#), "{body}");
        let (s, body) = get(&app(vec![redis(false), pg(true)], false), "/readyz").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""status":"unready""#), "{body}");
        let (s, body) = get(&app(vec![redis(true)], true), "/readyz").await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains(r#""status":"draining""#), "{body}");
        assert!(body.contains(r#""redis":{"ok":true}"#), "{body}");
    }

    #[tokio::test]
    async fn a_scrape_sets_the_dependency_gauges_and_health_always_answers() {
        let app = app(
            vec![
                Check::dependency("redis", Need::Required, (false, json!({}))),
                Check::state("rounds", true, json!({})),
            ],
            true,
        );
        let (s, text) = get(&app, "/metrics").await;
        assert_eq!(s, StatusCode::OK);
        assert!(
            text.contains(r#"ferry_dependency_up{dependency="redis"} 0"#),
            "{text}"
        );
        assert!(!text.contains(r#"dependency="rounds""#), "{text}");
        assert_eq!(get(&app, "/healthz").await, (StatusCode::OK, "ok".into()));
        let (s, body) = get(&app, "/debug/pprof/profile").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(body.contains("--profiling"), "{body}");
    }
}
