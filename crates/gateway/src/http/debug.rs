//! `GET /debug/pprof/profile?seconds=10&hz=99`: a CPU profile of this gateway process in the pprof protobuf
//! format, for operators (`go tool pprof`, pprof-rs tooling). Scope `admin`; one capture at a time per process
//! (409 for the rest); `seconds` 1–60 (default 10), `hz` 1–1000 (default 99).
//!
//! Served only when [`GatewayConfig::profiling`] is on (`--profiling`); otherwise the route still authenticates
//! first (401, 403 as when on: the route is documented, and a client must not learn more without a token) and
//! then answers 404 with a detail that says how to turn it on. The capture itself is
//! [`ferry_telemetry::profile::Profiler`]: it sleeps on the runtime and symbolizes in `spawn_blocking`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use ferry_core::ValidationError;
use ferry_telemetry::profile::{DISABLED_DETAIL, ProfileError, Profiler};

use super::Api;
use super::extract::Authed;
use crate::auth::Scope;
use crate::config::GatewayConfig;
use crate::error::ApiError;

/// The route's handler: the profiler when profiling is on, a 404 explaining how to turn it on otherwise.
pub fn route(config: &GatewayConfig) -> MethodRouter<Api> {
    if !config.profiling {
        return get(disabled);
    }
    let profiler = Arc::new(Profiler::new());
    get(
        move |Authed(p): Authed, query: Result<Query<HashMap<String, String>>, QueryRejection>| {
            let profiler = profiler.clone();
            async move {
                p.require(Scope::Admin)?;
                let Query(query) = query.map_err(|r| ApiError::bad_request(r.body_text()))?;
                profile(&profiler, &query).await
            }
        },
    )
}

async fn disabled(Authed(p): Authed) -> ApiError {
    if let Err(e) = p.require(Scope::Admin) {
        return e;
    }
    ApiError::NotFound(DISABLED_DETAIL.into())
}

async fn profile(
    profiler: &Profiler,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let (seconds, hz) = profiler
        .params(
            query.get("seconds").map(String::as_str),
            query.get("hz").map(String::as_str),
        )
        .map_err(to_api)?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let body = profiler.capture(seconds, hz).await.map_err(to_api)?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"ferry-gateway-{started}.pb\""),
            ),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        body,
    )
        .into_response())
}

fn to_api(e: ProfileError) -> ApiError {
    match e {
        ProfileError::BadRequest(field, rule) => ValidationError::field(field, rule).into(),
        ProfileError::Busy => ApiError::Conflict(e.to_string()),
        ProfileError::Failed(detail) => {
            tracing::error!(error = %detail, "CPU profile failed");
            ApiError::Internal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_errors_map_to_problems() {
        let e = to_api(ProfileError::BadRequest("hz", "must be 1 to 1000".into()));
        assert_eq!(e.status().as_u16(), 400);
        assert_eq!(e.problem()["errors"][0]["field"], "hz");
        assert_eq!(to_api(ProfileError::Busy).status().as_u16(), 409);
        let e = to_api(ProfileError::Failed("sigprof handler".into()));
        assert_eq!(e.status().as_u16(), 500);
        assert!(!e.problem().to_string().contains("sigprof"));
    }
}
