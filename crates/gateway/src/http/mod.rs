//! The HTTP surface of the gateway: the `/v1` JSON API, the OpenAPI document, health, readiness and metrics.
//! The contract is docs/api.md; `openapi.json` describes the same routes.
//!
//! Every `/v1` request goes through the same steps, in this order: bearer token → [`Principal`]
//! ([`extract::Authed`], 401; 429 once the client's address has failed too often), the subject's rate limit ([`limit`], 429), the body (limit 413, JSON syntax 400),
//! then in the handler the route's scope (403) and the fields and names (400). Handlers only translate between HTTP and the [`ferry_broker::Broker`] (or the
//! [`ferry_store::Store`]), every call through [`crate::resilience`]; they must not decide job semantics.
//!
//! * [`extract`]: `Authed`, `Json`, `Path` extractors that reject with problem+json.
//! * [`tenancy`]: how a tenant's queue names map to broker queues.
//! * [`jobs`], [`history`], [`queues`], [`channels`]: the `/v1` handlers ([`history`] answers from the store). [`ops`]: health, readiness, metrics, OpenAPI.
//! * [`limit`], [`metrics`]: per-subject token buckets and request counters, one of each per router.
//! * [`wire`]: hyper's own 414 and 431 answers, rewritten as problem+json below hyper.
//! * [`debug`]: `GET /debug/pprof/profile`, CPU profiles for admins, only with `GatewayConfig::profiling`.
//!
//! [`Principal`]: crate::auth::Principal

pub mod autoscaler;
pub mod channels;
pub mod debug;
pub mod extract;
pub mod history;
pub mod jobs;
pub mod limit;
pub mod metrics;
pub mod ops;
pub mod queues;
pub mod tenancy;
pub mod wire;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::header;
use axum::response::Response;
use axum::routing::{get, post};

use tower_http::cors::CorsLayer;

use crate::error::ApiError;
use crate::state::AppState;

/// Router state: the shared [`AppState`] plus what only the HTTP layer owns. Handlers written against
/// `State<AppState>` (the WebSocket upgrade) still work through [`FromRef`].
#[derive(Debug, Clone)]
pub struct Api {
    pub app: AppState,
    pub limiter: Arc<limit::RateLimit>,
    pub metrics: Arc<metrics::Metrics>,
}

impl FromRef<Api> for AppState {
    fn from_ref(api: &Api) -> AppState {
        api.app.clone()
    }
}

/// Every path the router serves, as written in `openapi.json` (a unit test keeps the two in step).
pub const PATHS: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/debug/pprof/profile",
    "/v1/openapi.json",
    "/v1/queues",
    "/v1/queues/{queue}",
    "/v1/queues/{queue}/jobs",
    "/v1/queues/{queue}/jobs/batch",
    "/v1/queues/{queue}/pause",
    "/v1/queues/{queue}/resume",
    "/v1/queues/{queue}/dead",
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/events",
    "/v1/jobs/{id}/retry",
    "/v1/channels/{channel}/publish",
    "/v1/cluster",
    "/v1/autoscaler",
    "/v1/ws",
];

/// Every route of the gateway, WebSocket included.
pub fn router(state: AppState) -> Router {
    let limits = &state.config.limits;
    let api = Api {
        limiter: Arc::new(limit::RateLimit::new(limits)),
        metrics: Arc::new(match &state.config.registry {
            Some(r) => metrics::Metrics::new(r.clone()),
            None => metrics::Metrics::default(),
        }),
        app: state.clone(),
    };
    let router = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/debug/pprof/profile", debug::route(&state.config))
        .route("/v1/openapi.json", get(ops::openapi))
        .route("/v1/queues", get(queues::list))
        .route("/v1/queues/{queue}", get(queues::get))
        .route("/v1/queues/{queue}/jobs", post(jobs::submit))
        .route("/v1/queues/{queue}/jobs/batch", post(jobs::submit_batch))
        .route("/v1/queues/{queue}/pause", post(queues::pause))
        .route("/v1/queues/{queue}/resume", post(queues::resume))
        .route("/v1/queues/{queue}/dead", get(queues::dead))
        .route("/v1/jobs", get(history::list))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(history::events))
        .route("/v1/jobs/{id}/retry", post(jobs::retry))
        .route("/v1/channels/{channel}/publish", post(channels::publish))
        .route("/v1/cluster", get(crate::cluster::handler))
        .route("/v1/autoscaler", get(autoscaler::handler))
        // WebSocket (owned by crate::ws; the upgrade handler takes `State<AppState>` through `FromRef`).
        .route("/v1/ws", get(crate::ws::upgrade))
        // The dashboard's static assets (crate::ui), outside `/v1`: no token, nothing but embedded files.
        .merge(crate::ui::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(axum::middleware::from_fn_with_state(
            api.metrics.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::map_response(problem_json));
    // Outermost, so a preflight is answered before authentication and rate limits.
    let router = match cors(&state.config.cors_origin) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router.with_state(api)
}

/// The headers the API reads from a request besides the CORS-safelisted ones (`Authorization`, `Content-Type`
/// for JSON bodies, `X-Request-Id` and `traceparent` on submits). Idempotency keys travel in the body.
pub const CORS_ALLOW_HEADERS: [&str; 4] = [
    "authorization",
    "content-type",
    "x-request-id",
    "traceparent",
];

/// CORS for the origins of `GatewayConfig::cors_origin`; none configured: no layer.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    use axum::http::{HeaderValue, Method};
    use tower_http::cors::AllowOrigin;
    if origins.is_empty() {
        return None;
    }
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers(CORS_ALLOW_HEADERS.map(header::HeaderName::from_static))
            .expose_headers([
                header::RETRY_AFTER,
                header::HeaderName::from_static("x-request-id"),
                header::HeaderName::from_static("traceparent"),
            ])
            .max_age(std::time::Duration::from_secs(600)),
    )
}

/// Every error response leaves as problem+json: handlers already answer with [`ApiError`], and this turns what
/// the router and extractors answer on their own (axum's 405 with its `Allow` header, a rejection in plain
/// text) into the problem of the same status from the one table.
async fn problem_json(res: Response) -> Response {
    let status = res.status();
    // A JSON error body is one of ours: a problem, or a documented body such as `/readyz`'s 503.
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v == "application/json" || v.ends_with("+json"));
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        ApiError::for_status(status, res.headers())
    } else {
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_exactly_the_routes_served() {
        let doc: serde_json::Value = serde_json::from_str(ops::OPENAPI).expect("valid JSON");
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut served = PATHS.to_vec();
        documented.sort_unstable();
        served.sort_unstable();
        assert_eq!(documented, served);
    }
}
